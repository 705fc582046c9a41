"""The registry of map kinds: every kind file's declaration by name, their hyperparameters, :class:`MapParams`."""

from __future__ import annotations

from dataclasses import field, make_dataclass

from rba_core.errors import RBAError
from rba_core.maps import affine, cosine, deep_mlp, diagonal, folded, identity, linear, mlp, ridge
from rba_core.maps.base import Hyper, MapKind

#: Every kind, in the order the CLI and the pages list them.
KINDS = (linear, affine, ridge, identity, folded, diagonal, cosine, mlp, deep_mlp)
MAPS: dict[str, MapKind] = {module.KIND.name: module.KIND for module in KINDS}
#: Every kind's hyperparameters, once each.
HYPERS: tuple[Hyper, ...] = tuple({h.name: h for kind in MAPS.values() for h in kind.hypers}.values())

#: The hyperparameters of every kind in one value; each kind reads those it declares.
MapParams = make_dataclass("MapParams", [(h.name, h.type, field(default=h.default)) for h in HYPERS], frozen=True,
                           namespace={"__module__": __name__,
                                      "__doc__": "Hyperparameters of the map kinds; each kind reads those it declares."})


def map_kind(name: str) -> MapKind:
    """The declaration of a map kind; an :class:`RBAError` naming the choices otherwise."""
    if name not in MAPS:
        raise RBAError(f"Unknown map '{name}': use one of {', '.join(MAPS)}.")
    return MAPS[name]
