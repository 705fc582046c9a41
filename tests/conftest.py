"""Shared fixtures: tiny random ViT / DeiT / DINOv2 encoders saved to disk, tiny image datasets, and a tiny
random Llama written as a GGUF file (with its safetensors twin)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One thread (see below), also where the code under test plans threads (rba_core.threads): the user's choice wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the threads
# contend: one thread makes a tiny-model test run up to 20x faster (measured on issue 4's tests).
torch.set_num_threads(1)

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
            image_size=32, patch_size=8)


def build_tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A random encoder of ``family``, the same for the same seed."""
    from transformers import DeiTConfig, DeiTModel, Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    torch.manual_seed(seed)
    if family == "vit":
        return ViTModel(ViTConfig(**TINY), add_pooling_layer=False)
    if family == "deit":
        return DeiTModel(DeiTConfig(**TINY), add_pooling_layer=False)
    return Dinov2Model(Dinov2Config(**{**TINY, "image_size": 32, "patch_size": 8}))


def save_tiny_model(folder: Path, family: str, seed: int = 0) -> Path:
    """Build a random encoder of ``family`` and save it with its image processor."""
    from transformers import ViTImageProcessor

    model = build_tiny_model(family, seed)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {fam: str(save_tiny_model(root / fam, fam)) for fam in ("vit", "deit", "dinov2")}


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> str:
    """Three classes of random grayscale and colour images, one sub-folder per class."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"class{c}").mkdir()
        for k in range(20):
            shape = (20, 24) if k % 2 else (20, 24, 3)
            pixels = (rng.random(shape) * 80 + 60 * c).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{k}.png")
    return str(root)


@pytest.fixture
def cache(tmp_path):
    from rba_core.cache import Cache

    return Cache(tmp_path / "cache")


# --- GGUF: a tiny random Llama written as llama.cpp's converter writes it ----------------------------

GGUF_SIZES = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=128, max_position_embeddings=512, rms_norm_eps=1e-5)


MERGES = [("Ġ", "t"), ("h", "e")]  # GGUF's byte-level tokenizers need merges (none makes transformers look for scores)


def byte_vocab() -> list[str]:
    """The tokens of a byte-level BPE: the 256 byte symbols, the two :data:`MERGES`, then end-of-text (id 258)."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet()) + ["".join(m) for m in MERGES] + ["<|endoftext|>"]


def tiny_llama(seed: int = 0):
    """A random 4-block Llama (GQA: 2 query heads, 1 key-value head) over the byte vocabulary, with random
    norm scales, and its tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokens = byte_vocab()
    torch.manual_seed(seed)
    eos = len(tokens) - 1
    model = LlamaForCausalLM(LlamaConfig(**GGUF_SIZES, vocab_size=len(tokens), bos_token_id=eos, eos_token_id=eos,
                                         tie_word_embeddings=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return model.eval(), PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _llama_cpp_permute(weights, heads: int):
    """The row order llama.cpp's convert_hf_to_gguf.py gives q_proj and k_proj (transformers undoes it)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def write_gguf(path: Path, model, qtype: str = "F32", tensor_qtype: dict | None = None) -> Path:
    """``model`` (a LlamaForCausalLM over :func:`byte_vocab`) as a GGUF file with the gguf package's writer:
    the metadata and tensor names llama.cpp writes, 2-D weights quantised as ``qtype`` with the package's
    own quantiser (norms stay F32); ``tensor_qtype`` maps a GGUF tensor name to a raw type written as zero
    bytes (a type nothing can read)."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    tokens = byte_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL])
    writer.add_token_merges([" ".join(m) for m in MERGES])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_add_bos_token(False)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        base, suffix = name.rsplit(".", 1)
        target = f"{names.get_name(base)}.{suffix}"
        data = tensor.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            data = _llama_cpp_permute(data, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = _llama_cpp_permute(data, config.num_key_value_heads)
        raw = (tensor_qtype or {}).get(target)
        if raw is not None:
            kind = gguf.GGMLQuantizationType[raw]
            block, size = gguf.GGML_QUANT_SIZES[kind]
            zeros = np.zeros((*data.shape[:-1], data.shape[-1] // block * size), np.uint8)
            writer.add_tensor(target, zeros, raw_dtype=kind)
        elif data.ndim == 2 and qtype != "F32":
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(target, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(target, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> dict[str, Path]:
    """A tiny random Llama as ``file`` (F32 GGUF), as a ``folder`` holding only that file, and as its
    ``twin``: the same weights and tokenizer saved by save_pretrained (safetensors)."""
    root = tmp_path_factory.mktemp("gguf")
    model, tokenizer = tiny_llama()
    (root / "folder").mkdir()
    write_gguf(root / "folder" / "tiny-llama.F32.gguf", model)
    file = write_gguf(root / "tiny-llama.F32.gguf", model)
    model.save_pretrained(root / "twin")
    tokenizer.save_pretrained(root / "twin")
    return {"file": file, "folder": root / "folder", "twin": root / "twin", "root": root}
