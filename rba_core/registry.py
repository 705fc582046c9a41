"""Which models and datasets the tool knows by name, and where their local copies live."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: Environment variable naming a folder with local copies of the datasets, one sub-folder per
#: alias (``mnist/train.parquet``, ``cifar10/test.parquet``, ...), as in ``../shared/datasets``.
DATA_DIR_ENV = "RBA_DATA_DIR"

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo" / "digits-vit"

#: Paper encoders: alias -> Hugging Face hub id (or a folder shipped with the package).
MODELS: dict[str, str] = {
    "ViT-S": "WinKawaks/vit-small-patch16-224",
    "ViT-B": "google/vit-base-patch16-224",
    "DiNO-S": "facebook/dinov2-small",
    "DiNO-B": "facebook/dinov2-base",
    "DEiT-S": "facebook/deit-small-patch16-224",
    "digits-ViT": str(DEMO_MODEL_DIR),
}

#: Architecture families (config ``model_type``) whose blocks the tool knows how to run.
SUPPORTED_FAMILIES = ("vit", "deit", "dinov2")


@dataclass(frozen=True)
class DatasetInfo:
    """A known dataset: its hub id, columns and the local folder name it may be copied to."""

    alias: str
    hub_id: str
    image_column: str
    label_column: str
    local_name: str


DATASETS: dict[str, DatasetInfo] = {
    info.alias: info
    for info in (
        DatasetInfo("MNIST", "ylecun/mnist", "image", "label", "mnist"),
        DatasetInfo("Fashion-MNIST", "zalando-datasets/fashion_mnist", "image", "label", "fashion_mnist"),
        DatasetInfo("CIFAR-10", "uoft-cs/cifar10", "img", "label", "cifar10"),
        DatasetInfo("CIFAR-100-coarse", "uoft-cs/cifar100", "img", "coarse_label", "cifar100"),
        DatasetInfo("CIFAR-100-fine", "uoft-cs/cifar100", "img", "fine_label", "cifar100"),
        DatasetInfo("digits", "sklearn:digits", "image", "label", "digits"),
    )
}

#: The pair the app opens on when the hub cannot be reached: both ship with the package.
DEMO_PAIR = ("digits-ViT", "digits")


def _lookup(name: str, table: dict) -> str | None:
    folded = name.strip().lower().replace("_", "-")
    for alias in table:
        if alias.lower() == folded:
            return alias
    return None


def model_alias(name: str) -> str | None:
    """The registered alias matching ``name`` case-insensitively (DINOv2-S counts as DiNO-S)."""
    return _lookup(name.replace("DINOv2", "DiNO").replace("dinov2", "dino"), MODELS)


def resolve_model(name: str) -> str:
    """Hub id or local folder for an alias, hub id or folder path (returned unchanged)."""
    alias = model_alias(name)
    return MODELS[alias] if alias else name.strip()


def dataset_info(name: str) -> DatasetInfo | None:
    """The registry entry for a dataset alias (case-insensitive), or None."""
    alias = _lookup(name, DATASETS)
    return DATASETS[alias] if alias else None


def local_dataset_dir(info: DatasetInfo) -> Path | None:
    """The local copy of a registered dataset under ``$RBA_DATA_DIR``, if there is one."""
    root = os.environ.get(DATA_DIR_ENV)
    if not root:
        return None
    folder = Path(root) / info.local_name
    return folder if folder.is_dir() else None
