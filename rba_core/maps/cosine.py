"""``cosine``: ReplaceMe's cosine variant, exact to its fold: range i→j's T is trained with Adam to minimise the
cosine distance between ``r + m·T`` and hs[j] (m: block i's MLP output, r = hs[i] − m; for i = 0, m = hs[0] and
r = 0), warm-started from the least-squares fold (:mod:`rba_core.maps.folded`). The same shape as ``folded``:
it folds into block i's MLP output layer, no added parameter, a plain checkpoint."""

from rba_core.maps.base import TRAINING, Fitted, FitData, MapKind, MissingStatistics
from rba_core.maps.folded import KIND as FOLDED, apply as folded_apply, check_fold_set, check_foldable


def fit(data: FitData, rng, params) -> Fitted:
    from rba_core.maps.training import Fitting, cosine_distance, train

    stats, samples = data.require("fold"), data.require("samples")
    if rng not in stats:
        raise MissingStatistics(f"The fold statistics of this pass do not hold range {rng[0]}→{rng[1]}.")
    start, conditioning = stats[rng].solve()
    m, r, target = samples.fold_target(rng)
    fitting = Fitting(folded_apply, (r + m, m if rng[0] else None), target, samples.held_out(), cosine_distance)
    tensors, report = train({"weight": start}, fitting, params, data.seed, data.progress)
    return Fitted(tensors, conditioning, report)


KIND = MapKind("cosine", "cosine: the folded map trained on the cosine distance (ReplaceMe's cosine variant); "
               "no added parameters", fit, FOLDED.shapes, folded_apply, hypers=TRAINING,
               statistics=("fold", "samples"), needs_mlp_output=True, folds=FOLDED.folds,
               check_ranges=check_fold_set, check_encoder=check_foldable)
