"""RBA Explorer core: find redundant blocks in transformers and approximate them with linear maps.

The library API, for notebooks and scripts::

    import rba_core
    result = rba_core.analyze("MiniLM-L6", "debian-descriptions", n=256)   # or a loaded model, a list of texts
    result.block_redundancy, result.to_frame()
    approx = rba_core.approximate("MiniLM-L6", "debian-descriptions", 256, 128, 0, [(2, 4)])

Importing this package has no side effects; every name below loads its module (and torch,
transformers) only when first used.
"""

from rba_core.errors import RBAError

#: public name -> module that defines it
_EXPORTS = {
    "analyze": "rba_core.ops.analysis",
    "approximate": "rba_core.ops.analysis",
    "search": "rba_core.ops.search",
    "table": "rba_core.ops.table",
    "evaluate": "rba_core.ops.downstream",  # lm-eval tasks on a causal LM and its approximation
    "plan": "rba_core.ops.plan",
    "load_compressed": "rba_core.store.export",
    "save_compressed": "rba_core.store.export",
    "block_redundancy": "rba_core.measures.metrics",
    "cosine_matrix": "rba_core.measures.metrics",
    "linear_cka_matrix": "rba_core.measures.metrics",
    "ADAPTERS": "rba_core.models",
    "adapter_class": "rba_core.models",
    "load_encoder": "rba_core.models",
    "MAPS": "rba_core.maps",
    "MapParams": "rba_core.maps",
    "fit_map": "rba_core.maps",
    "AnalysisResult": "rba_core.store.results",
    "ApproximationResult": "rba_core.store.results",
    "SearchResult": "rba_core.store.results",
    "TableResult": "rba_core.store.results",
}

__all__ = ["RBAError", *_EXPORTS]


def __getattr__(name: str):
    """Load the module behind a public name on first use."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rba_core' has no attribute {name!r}")
