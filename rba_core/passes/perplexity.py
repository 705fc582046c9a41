"""Perplexity and next-token agreement of a causal LM and its approximations, with the model's own LM head.

Perplexity = exp of the mean next-token loss over every position but the first of each window
(each window's tokens 2..T predicted from the tokens before them); top-1 agreement = the share of
those positions where a model's most likely next token is the original model's.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rba_core.passes.approx import ApproximatedEncoder, captured, mlp_outputs
from rba_core.errors import RBAError
from rba_core.models.decoder import DecoderLM
from rba_core.progress import Progress


@torch.inference_mode()
def lm_scores(encoder: DecoderLM, nets: dict[str, ApproximatedEncoder], windows: Sequence[np.ndarray],
              batch_size: int = 8, progress: Progress | None = None,
              finals: dict[str, list] | None = None) -> dict[str, dict[str, float]]:
    """``{"perplexity": {name: float}, "top1_agreement": {name: float}}`` for the original model
    (``"original"``) and every net in ``nets``, on ``windows`` (equal-length int64 token id arrays).

    The original runs once per batch keeping every block output; each net then runs only from its first
    range's start on (:meth:`ApproximatedEncoder.resume`), since up to there it computes what the original
    does. ``finals``, when given, receives each model's final representations (B, D) per batch by name."""
    starts = {i for net in nets.values() for i in net.mlp_starts()}
    names = ["original", *nets]
    loss = dict.fromkeys(names, 0.0)
    agree = dict.fromkeys(names, 0)
    positions = 0
    for start in range(0, len(windows), batch_size):
        inputs = encoder.preprocess(list(windows[start : start + batch_size]))
        targets = inputs["input_ids"][:, 1:]
        with captured(mlp_outputs(encoder, starts)) as m:
            hs, ctx = encoder.hidden_states(inputs)
        reference = None
        for name in names:
            hidden = hs[-1] if name == "original" else nets[name].resume(hs, m, ctx)
            logits = encoder.logits(hidden)[:, :-1].float()  # (B, T-1, V)
            loss[name] += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            top = logits.argmax(-1)
            reference = top if reference is None else reference
            agree[name] += int((top == reference).sum())
            if finals is not None:
                finals.setdefault(name, []).append(encoder.final(hidden, encoder.token_mask(inputs)).float().cpu())
        positions += targets.numel()
        if progress:
            progress(min(start + batch_size, len(windows)), len(windows))
    return {"perplexity": {name: math.exp(loss[name] / positions) for name in names},
            "top1_agreement": {name: agree[name] / positions for name in names}}


@torch.inference_mode()
def continue_text(encoder: DecoderLM, nets: dict[str, ApproximatedEncoder], prompt: str,
                  tokens: int = 40) -> dict[str, str]:
    """Greedy continuations of ``prompt`` (``tokens`` new tokens) by the original model (``"original"``)
    and every net in ``nets``, decoded with the model's own tokenizer (no cache: each step reruns the text)."""
    if not prompt.strip():
        raise RBAError("Type a prompt to continue.")
    models = {"original": ApproximatedEncoder(encoder, [], []), **nets}
    start = encoder.processor(prompt, return_tensors="pt")["input_ids"].to(encoder.device)
    out = {}
    for name, net in models.items():
        ids = start
        for _ in range(tokens):
            hidden = net.last_hidden(input_ids=ids, attention_mask=torch.ones_like(ids))
            ids = torch.cat([ids, encoder.logits(hidden[:, -1:]).argmax(-1)], dim=1)
        out[name] = encoder.processor.decode(ids[0, start.shape[1]:], skip_special_tokens=True)
    return out
