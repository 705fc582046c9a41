"""RBA Explorer core: find redundant blocks in vision transformers and approximate them linearly.

Importing this package has no side effects; the heavy modules (torch, transformers) load lazily.
"""

from rba_core.errors import RBAError

__all__ = ["RBAError", "load_compressed"]


def __getattr__(name: str):
    """``rba_core.load_compressed`` imports torch only when first used."""
    if name == "load_compressed":
        from rba_core.export import load_compressed

        return load_compressed
    raise AttributeError(f"module 'rba_core' has no attribute {name!r}")
