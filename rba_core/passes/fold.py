"""Folded maps (ReplaceMe's trick, done exactly): a plain checkpoint with fewer layers and no added module.

For range i→j of a pre-LN model, block i writes ``hs[i] = r + m``, m being the output of its MLP's
last linear layer and r the residual before it. T minimises ``||m·T - (hs[j] - r)||²`` over the real
tokens of the fit samples (ridge optional); folding it into that layer (``W ← W·T``, ``b ← b·T``)
makes block i emit ``r + m·T ≈ hs[j]``, so blocks i+1..j can be deleted. Where a per-channel scale
follows that layer (DINOv2's layer scale λ: m = λ ⊙ layer(x)), ``diag(λ)·T`` is folded and λ set to 1.
A range 0→j has r = 0 and m = hs[0]: T = lstsq(hs[0], hs[j]) is folded into every embedding
parameter hs[0] is linear in (patch projection, position and class tokens, token embeddings); an
output embedding tied to them is untied first, so the LM head keeps the original matrix.

With M = stacked m and H_k = stacked hs[k], the fit needs MᵀM and Mᵀ(H_j - H_i) only
(``hs[j] - r = H_j - H_i + M``), accumulated over batches like :mod:`rba_core.measures.stats`, with float64
products (as ReplaceMe forms them): a block's MLP output often spans few directions (MᵀM of demo-GPT's
block 5 has a condition number of 1e10), which float32 products turn into negative eigenvalues. The
difference is taken per token before the product: m is often far smaller than the residual stream, and
MᵀH_j - MᵀH_i would cancel most of the digits that the products keep.
"""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from rba_core.distributed import world
from rba_core.errors import RBAError
from rba_core.maps import Range
from rba_core.maps.folded import FoldStats, check_fold_set, check_foldable
from rba_core.passes.extract import PassOptions
from rba_core.models import Encoder, load_encoder, model_ref
from rba_core.passes.range_pass import collect, range_statistics


def fold_statistics(encoder: Encoder, batches: Iterable[dict[str, torch.Tensor]],
                    ranges: Sequence[Range]) -> dict[Range, FoldStats]:
    """MᵀM and Mᵀ(H_j - H_i) of every range over the real tokens of ``batches`` (the model's inputs), in
    float64; m is the output of :meth:`Encoder.mlp_output_module` of block i, and hs[0] for i = 0."""
    arrays = collect(encoder, ((None, inputs) for inputs in batches), ranges, tokens=False, fold=ranges)
    count = int(arrays["count"][0])
    return {(i, j): FoldStats(arrays[f"mm_{i}"], arrays[f"md_{i}_{j}"], count) for i, j in ranges}


_NOT_PER_LAYER = ("architectures", "stage_names", "out_features", "out_indices")


def cut_config(config, keep: list[int], num_blocks: int, ranges: Sequence[Range]) -> None:
    """The new layer count, every per-layer list of the config (``layer_types`` ...) cut to the kept
    layers, and a backbone config's stages (DINOv2: ``stage_names``, ``out_indices``) renumbered: the
    output of block j, last of a range, is now that of the folded block i."""
    for name, value in list(vars(config).items()):
        if (isinstance(value, (list, tuple)) and len(value) == num_blocks and not name.startswith("_")
                and name not in _NOT_PER_LAYER):
            setattr(config, name, type(value)(value[k] for k in keep))
    config.num_hidden_layers = len(keep)
    outputs = getattr(config, "out_indices", None)
    if outputs is not None and hasattr(config, "stage_names"):
        stage = {0: 0, **{k + 1: new + 1 for new, k in enumerate(keep)}}
        stage.update({j: stage[i] for i, j in ranges})
        config.stage_names = ["stem"] + [f"stage{n}" for n in range(1, len(keep) + 1)]
        config.out_indices = sorted({stage[k % (num_blocks + 1)] for k in outputs if k % (num_blocks + 1) in stage})


def fold_into_block(encoder: Encoder, block: nn.Module, t: torch.Tensor) -> None:
    """Block's m becomes m·T: T (times the layer scale, which becomes 1) into its MLP output layer."""
    layer = block.get_submodule(encoder.mlp_out)
    t = t.to(layer.weight.device)
    if encoder.mlp_scale:
        scale = block.get_parameter(encoder.mlp_scale)
        t = scale.float()[:, None] * t  # m = (x Wᵀ + b) diag(λ), so m·T = (x Wᵀ + b) diag(λ) T
        scale.fill_(1.0)
    # Linear stores (out, in) and computes x Wᵀ; GPT-2's Conv1D stores (in, out) and computes x W.
    weight = layer.weight.float()
    layer.weight.copy_(weight @ t if encoder.mlp_out_transposed else t.T @ weight)
    if layer.bias is not None:
        layer.bias.copy_(layer.bias.float() @ t)


def _fold_into_stem(encoder: Encoder, model: nn.Module, t: torch.Tensor) -> None:
    """hs[0] becomes hs[0]·T: every parameter of the linear stem times T along its hidden axis (the
    output channels of a convolution or linear layer's weight, the last axis of anything else).
    A parameter that a module outside the stem shares (an LM head tied to the token embedding)
    is first given to that module as a copy, and the config no longer ties them."""
    stem = [model.get_submodule(path) for path in encoder.linear_stem]
    inside = {id(m) for module in stem for m in module.modules()}
    shared = {id(p) for module in stem for p in module.parameters()}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)) if id(module) not in inside else ():
            if id(param) in shared:
                setattr(module, name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
                model.config.tie_word_embeddings = False
    for module in stem:
        for owner in module.modules():
            for name, param in owner.named_parameters(recurse=False):
                axis = 0 if name == "weight" and isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd)) else -1
                folded = torch.tensordot(param.float(), t.to(param.device), dims=([axis], [0]))
                param.copy_(folded.movedim(-1, axis))


def folded_model(encoder: Encoder, maps: dict[Range, np.ndarray]) -> nn.Module:
    """A copy of the encoder's model with each range's T folded into block i's MLP output layer (into
    the embeddings for i = 0) and blocks i+1..j deleted (layer indices renumbered, config cut to
    match). The encoder is untouched."""
    model = copy.deepcopy(encoder.model)
    path = next(name for name, module in encoder.model.named_modules() if module is encoder.blocks)
    layers = model.get_submodule(path)
    with torch.no_grad():
        for (i, _), t in maps.items():
            t = torch.as_tensor(t, dtype=torch.float32)  # products in float32, stored in the weights' dtype
            if i == 0:
                _fold_into_stem(encoder, model, t)
            else:
                fold_into_block(encoder, layers[i - 1], t)
    removed = {k for i, j in maps for k in range(i, j)}  # 0-based indices of blocks i+1..j
    keep = [k for k in range(len(layers)) if k not in removed]
    for k in sorted(removed, reverse=True):
        del layers[k]
    for new, block in enumerate(layers):  # caches and masks index layers by position
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    cut_config(model.config, keep, encoder.num_blocks, list(maps))
    return model.eval()


def folded_encoder(encoder: Encoder, maps: dict[Range, np.ndarray]) -> Encoder:
    """The folded model behind the same adapter (same tokenizer, pooling and device)."""
    model = folded_model(encoder, maps)
    return type(encoder)(encoder.name, encoder.source, encoder.family, model, encoder.processor, encoder.device,
                         encoder.pooling, encoder.max_length)


def fold_pass(model, dataset, n: int, seed: int, sets: Sequence[Sequence[Range]], **options) -> dict[Range, FoldStats]:
    """Fold statistics of every range of ``sets`` over the ``n`` fit samples (the train split, sampled as
    :func:`rba_core.passes.extract.extract` samples them): from the cache when stored, otherwise one pass
    (:func:`rba_core.passes.range_pass.range_statistics`), before which each set of ranges is checked to fold
    (:func:`check_foldable`, one sentence if not). ``options``: :class:`rba_core.passes.extract.PassOptions` (``encoder``:
    a loaded encoder or a function that loads one)."""
    how, _ = PassOptions.split(options, {})
    ref = model_ref(model, how.max_length)
    for checked in sets:  # before a cache hit too: a stored entry for the same ranges may have grouped them otherwise
        check_fold_set(checked, ref.info.num_blocks)
    ranges = sorted({(int(i), int(j)) for ranges in sets for i, j in ranges})
    loader = how.encoder or ref.loaded

    def checked_loader() -> Encoder:  # on a miss only: the ranges must fold into this model
        loaded = loader() if callable(loader) else loader or load_encoder(model, how.device or world().device,
                                                                          how.max_length)
        for checked in sets:
            check_foldable(loaded, checked)
        return loaded

    stats = range_statistics(model, dataset, n, seed, ranges, tokens=False, fold=True,
                             **{**options, "encoder": checked_loader}).fold
    missing = [rng for rng in ranges if rng not in stats]
    if missing:
        raise RBAError(f"Range {missing[0][0]}→{missing[0][1]} cannot be folded into this model; use --map linear, "
                       "affine or ridge instead.")
    return stats
