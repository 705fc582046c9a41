"""RBA Explorer core: find redundant blocks in vision transformers and approximate them linearly.

Importing this package has no side effects; the heavy modules (torch, transformers) load lazily.
"""

from rba_core.errors import RBAError

__all__ = ["RBAError"]
