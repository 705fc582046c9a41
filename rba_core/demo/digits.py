"""scikit-learn's bundled 8x8 digits as PIL images with a fixed stratified train/test split."""

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

DIGITS_SPLITS = ("train", "test")


def load_digits_split(split: str) -> tuple[list[Image.Image], np.ndarray, list[str]]:
    """Load one split of scikit-learn's digits dataset (no download needed).

    The 1,797 images are split 80/20, stratified by label, with ``random_state=0``,
    so the split is identical on every call and machine.

    Args:
        split: ``"train"`` or ``"test"``.

    Returns:
        A tuple ``(images, labels, label_names)``: 8x8 grayscale PIL images (mode
        ``"L"``, pixel values 0..16 scaled to 0..255), int64 labels of shape
        ``(n,)``, and the label names ``["0", ..., "9"]``.

    Raises:
        ValueError: If ``split`` is not one of ``DIGITS_SPLITS``.
    """
    if split not in DIGITS_SPLITS:
        raise ValueError(f"Unknown digits split {split!r}; expected one of {DIGITS_SPLITS}.")
    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        pixels, labels, test_size=0.2, stratify=labels, random_state=0
    )
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    images = [Image.fromarray(a, mode="L") for a in x]
    return images, y, [str(name) for name in digits.target_names]
