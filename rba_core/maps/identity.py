"""``identity``: the blocks are skipped, no map (the paper's ablation)."""

from rba_core.maps.base import MapKind

KIND = MapKind("identity", "identity: skip the blocks (the paper's ablation)", lambda *_: None, lambda d: {})
