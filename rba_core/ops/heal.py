"""Healing: after the ranges are replaced, fine-tune the maps (and, with ``lora_rank``, LoRA adapters on the kept
blocks after the first range) on the fit samples so that the approximated model matches the original one, then
merge the adapters into the weights, so an export stays a plain checkpoint (or the compressed format).

Distillation: the KL divergence of the approximated model's next-token distributions from the original's
(causal LMs), or the mean squared error between their final representations (encoders). The original model is
never changed: healing works on a copy of it. The report gives the metric on the evaluation samples before and
after healing (perplexity for language models, final MSE otherwise) and the training loss of the first and last
steps. Deterministic on CPU for a given seed.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rba_core.passes.approx import ApproximatedEncoder
from rba_core.data import open_sample
from rba_core.errors import RBAError
from rba_core.passes.extract import model_inputs
from rba_core.models import Encoder
from rba_core.ops.run import Run

#: Linear layers LoRA adapts, by class name (transformers' GPT-2 family uses Conv1D).
ADAPTED = ("Linear", "Conv1D")


@dataclass(frozen=True)
class HealPlan:
    """``steps`` Adam steps of ``batch`` fit samples at ``lr``; ``lora_rank`` > 0 adds LoRA adapters of that rank."""

    steps: int
    lora_rank: int = 0
    lr: float = 1e-4
    batch: int = 8

    def key(self) -> dict:
        return asdict(self)


def _twin(encoder: Encoder) -> Encoder:
    """The encoder over a deep copy of its model (same adapter, tokenizer, pooling and device)."""
    return type(encoder)(encoder.name, encoder.source, encoder.family, copy.deepcopy(encoder.model),
                         encoder.processor, encoder.device, encoder.pooling, encoder.max_length)


def _adapters(twin: Encoder, after: int, rank: int) -> None:
    """LoRA adapters (peft) on the linear layers of the kept blocks after block ``after``, in place."""
    from peft import LoraConfig, inject_adapter_in_model

    path = next(name for name, module in twin.model.named_modules() if module is twin.blocks)
    layers = {f"{path}.{k}.{name}": type(module).__name__ for k in range(after, twin.num_blocks)
              for name, module in twin.blocks[k].named_modules() if type(module).__name__ in ADAPTED}
    targets = list(layers)
    if not targets:
        raise RBAError("No linear layer of a kept block after the first range can take a LoRA adapter; heal without "
                       "--heal-lora.")
    conv = "Conv1D" in layers.values()  # GPT-2's layers keep their weights transposed
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0,
                                       fan_in_fan_out=conv), twin.model)


def _merge(twin: Encoder) -> None:
    """Fold every LoRA adapter into its layer's weights and restore the plain layer."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(twin.model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = twin.model.get_submodule(parent_name) if parent_name else twin.model
            setattr(parent, child, module.get_base_layer())


def _outputs(encoder: Encoder, net: ApproximatedEncoder | None, inputs: dict) -> torch.Tensor:
    """Next-token log-probabilities (causal LMs) or final representations of the original (``net`` None) or the
    approximated model."""
    hidden = encoder.hidden_states(inputs)[0][-1] if net is None else net.last_hidden(**inputs)
    owner = encoder if net is None else net.encoder
    if hasattr(owner, "logits"):
        return F.log_softmax(owner.logits(hidden).float(), dim=-1)
    return owner.final(hidden, owner.token_mask(inputs)).float()


def _loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, language: bool) -> torch.Tensor:
    if not language:
        return F.mse_loss(student, teacher)
    kl = (teacher.exp() * (teacher - student)).sum(-1)  # KL(original ‖ approximated) per position
    return kl.mean() if mask is None else kl[mask].mean()


@torch.no_grad()
def _metric(original: Encoder, net: ApproximatedEncoder, source, indices: np.ndarray, reference: list) -> float:
    """Perplexity (causal LMs: ``reference`` empty) or final MSE against the original's final representations of
    the samples ``indices`` (``reference``: one per batch of 8, computed once; filled on the first call)."""
    total, count = 0.0, 0
    language = hasattr(original, "logits")
    batches = [indices[s : s + 8] for s in range(0, len(indices), 8)]
    for number, inputs in enumerate(model_inputs(original, source, batches)):
        ours = _outputs(original, net, inputs)
        if language:
            ids = inputs["input_ids"][:, 1:]
            total += float(F.nll_loss(ours[:, :-1].flatten(0, 1), ids.flatten(), reduction="sum"))
            count += ids.numel()
        else:
            if len(reference) <= number:
                reference.append(_outputs(original, None, inputs).double())
            total += float(((ours.double() - reference[number]) ** 2).sum())
            count += ours.numel()
    return float(np.exp(total / count)) if language else total / count


def heal(run: Run, ranges, maps, plan: HealPlan, encoder: Encoder | None = None) -> tuple[ApproximatedEncoder, dict]:
    """The approximated model of ``ranges`` and ``maps``, healed: a copy of the run's model (or of ``encoder``, a
    model already cut, with no ranges left to map) and of the maps trained ``plan.steps`` steps on the run's fit
    samples to match the run's original model (which is not changed), LoRA adapters merged. Returns the healed
    model and the report (``before`` and ``after``: the metric on the run's evaluation samples)."""
    if plan.steps < 1:
        raise RBAError(f"--heal must be at least 1 step, got {plan.steps}.")
    if plan.lora_rank < 0:
        raise RBAError(f"--heal-lora must be a positive rank (or 0 for none), got {plan.lora_rank}.")
    torch.manual_seed(run.seed)
    original = run.lazy()
    language = hasattr(original, "logits")
    twin = _twin(encoder or original)
    twin.model.requires_grad_(False)
    healed_maps = [None if m is None else copy.deepcopy(m) for m in maps]
    first = min((i for i, _ in ranges), default=0)
    net = ApproximatedEncoder(twin, ranges, healed_maps)
    test, test_indices = open_sample(run.data, "test", run.eval_n, run.seed) if run.eval_n else (None, None)
    reference: list = []  # the original's final representations of the evaluation samples, computed once
    before = _metric(original, net, test, test_indices, reference) if test is not None else None
    if plan.lora_rank:
        _adapters(twin, first + 1, plan.lora_rank)
    trainable = [getattr(m, n) for m in healed_maps if m is not None for n in m.names]
    for tensor in trainable:
        tensor.requires_grad_(True)
    trainable += [p for name, p in twin.model.named_parameters() if "lora_" in name]
    if not trainable:
        raise RBAError("These ranges are skipped (identity maps) and no LoRA rank was given: nothing to heal; add "
                       "--heal-lora R or use a map kind with tensors.")
    optimizer = torch.optim.Adam(trainable, lr=plan.lr)
    source, indices = open_sample(run.data, "train", run.fit_n, run.seed)
    order = np.random.default_rng(run.seed)
    losses = []
    net.train(False)
    for step in range(plan.steps):
        batch = np.sort(order.choice(indices, size=min(plan.batch, len(indices)), replace=False))
        inputs = next(model_inputs(original, source, [batch], 0))
        with torch.no_grad():
            teacher = _outputs(original, None, inputs)
        mask = original.token_mask(inputs) if language else None
        loss = _loss(_outputs(original, net, inputs), teacher, mask, language)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if run.progress:
            run.progress(step + 1, plan.steps)
    for tensor in trainable:
        tensor.requires_grad_(False)
    if plan.lora_rank:
        _merge(twin)
    net = ApproximatedEncoder(twin, ranges, healed_maps).eval()
    after = _metric(original, net, test, test_indices, reference) if test is not None else None
    metric = "perplexity" if language else "mse_final"
    return net, {**plan.key(), "metric": metric, "before": before, "after": after,
                 "loss": {"first": losses[0], "last": losses[-1]}}
