"""``deep-mlp``: TOAST's deep translator: :mod:`rba_core.maps.mlp` with two hidden layers of width D."""

from rba_core.maps.base import TRAINING, MapKind
from rba_core.maps.mlp import apply, fitter, shapes

KIND = MapKind("deep-mlp", "deep-mlp: the linear map plus a two-hidden-layer MLP (TOAST's deep translator), trained",
               fitter(2), shapes(2), apply, hypers=TRAINING, statistics=("tokens", "samples"))
