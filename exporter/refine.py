"""Block refinement (`--refine block`): after the closed-form factorization of one decoder layer, gradient
descent on that layer's low-rank factors so that the compressed layer, fed the calibration inputs propagated
through the already-compressed prefix (X_c), reproduces the dense layer's output on the original inputs:

    minimise  L(θ) = (1/N) Σ_tokens ‖layer_θ(X_c) − layer_dense(X_o)‖²       θ = every up/down of the layer

It is adaComp made nonlinear and layer-wide: the attention softmax, the MLP activation and the residual are
inside the objective, and all the layer's factors move together. What it needs is already in the layer
loop: the compressed stream's inputs (before they advance) and the original stream's outputs (observe has
just advanced it through the dense layer). Memory: one layer's autograd activations for one calibration
batch, in float32, on top of the streams the loop keeps anyway.

The calibration batches are split: the last `holdout` fraction (at least one batch) is never trained on and
decides early stopping; the rest are visited in a seeded order (the seed is the layer index, so a resumed
run repeats the same steps). Adam, step size relative to each tensor's RMS (so `lr` is a relative change per
step and does not depend on how the closed form split the scale between up and down). The state with the
lowest held-out loss is kept, and only if it also does not raise the loss on the training batches;
otherwise the closed-form factors are restored exactly. So the objective on the calibration batches never
increases, and a budget of zero steps changes nothing. `optimise` is that loop for any error function;
end-to-end refinement (refine_e2e.py) runs it on the whole model.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn

from .config import BlockRefinement
from .lowrank import LowRankLinear
from .stream.activations import Activations, run_batch


def factors(layer: nn.Module) -> list[nn.Parameter]:
    """The parameters block refinement trains: up and down of every LowRankLinear of the layer."""
    return [p for m in layer.modules() if isinstance(m, LowRankLinear) for p in (m.down.weight, m.up.weight)]


def split_batches(count: int, holdout: float) -> tuple[list[int], list[int]]:
    """(training batch indices, held-out batch indices): the last ⌈holdout·count⌉ batches are held out."""
    if count < 2:
        raise ValueError(f"--refine holds out calibration batches for early stopping and needs at least 2; "
                         f"got {count} (raise --calib-samples or lower --calib-batch-size)")
    held = min(count - 1, max(1, math.ceil(holdout * count)))
    return list(range(count - held)), list(range(count - held, count))


def _squared_error(index: int, layer, inputs: Activations, targets: Activations, b: int,
                   device) -> tuple[torch.Tensor, int]:
    """(Σ over the batch's tokens of ‖layer(X_c) − target‖², number of tokens), float32. `index`: the decoder
    layer's position, which picks the keyword arguments the model gives it (masks, rotary tables)."""
    out = run_batch(layer, inputs.hidden[b], inputs.kwargs_for(index)[b], device).float()
    target = targets.hidden[b].to(device).float()
    return (out - target).square().sum(), target.shape[0] * target.shape[1]


@torch.no_grad()
def mean_error(error, batches: list[int]) -> float:
    """Σ error over `batches` / Σ their counts, for `error(b)` = (summed error of batch b, its count); the sums
    in float64."""
    total, count = 0.0, 0
    for b in batches:
        err, n = error(b)
        total, count = total + float(err), count + n
    return total / max(count, 1)  # guard: an empty batch list has no error


def objective(index: int, layer, inputs: Activations, targets: Activations, batches: list[int], device) -> float:
    """Block refinement's objective: mean squared error per token of the layer's output over `batches`."""
    return mean_error(lambda b: _squared_error(index, layer, inputs, targets, b, device), batches)


def _float32(module: nn.Module):
    """Cast `module` to float32 for the optimisation; -> a function that puts every parameter and buffer back
    in its own dtype (a half-precision model keeps float32 buffers, e.g. the rotary frequencies: one cast back
    to a single dtype would round them). nn.Module's own cast: transformers refuses .float() on a model it
    loaded from a quantized file (a de-quantized GGUF), whose weights are plain tensors by now."""
    dtypes = {name: t.dtype for name, t in [*module.named_parameters(), *module.named_buffers()]}
    nn.Module.float(module)

    def restore() -> None:
        for name, param in module.named_parameters():
            param.data = param.data.to(dtypes[name])
        for name, buffer in list(module.named_buffers()):
            owner, _, attr = name.rpartition(".")
            module.get_submodule(owner)._buffers[attr] = buffer.to(dtypes[name])  # as nn.Module._apply does
    return restore


def _snapshot(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _load(params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


def refine_layer(index: int, layer: nn.Module, inputs: Activations, targets: Activations, settings: BlockRefinement,
                 device, export_dtype: torch.dtype) -> dict:
    """Refine the factors of `layer` in place (see the module docstring). `inputs`: the compressed stream at the
    layer's input; `targets`: the dense layer's outputs on the original stream. -> the report entry."""
    train, held = split_batches(len(inputs.hidden), settings.holdout)
    return optimise(layer, lambda b: _squared_error(index, layer, inputs, targets, b, device), train, held, settings,
                    seed=index, export_dtype=export_dtype)


def optimise(module: nn.Module, error, train: list[int], held: list[int], settings: BlockRefinement, seed: int,
             export_dtype: torch.dtype) -> dict:
    """Adam on the LowRankLinear factors inside `module`, in float32, minimising the mean of `error(b)` =
    (summed error of batch b, its count) over the `train` batches, early stopping on the `held` ones; the
    factors end as the best held-out state rounded to `export_dtype`, or exactly as they were when that is not
    better on both sets. Shared by block (one decoder layer) and end-to-end (the whole model) refinement.
    -> the report entry: losses before/after, steps run, whether the new factors were kept, seconds."""
    began = time.perf_counter()
    params = factors(module)
    entry = {"steps": settings.steps, "lr": settings.lr}
    if settings.steps == 0 or not params:
        return {**entry, "steps_run": 0, "kept": False, "seconds": time.perf_counter() - began}
    restore_dtypes = _float32(module)  # the optimisation runs in float32 whatever the compute dtype
    params = factors(module)
    closed_form = _snapshot(params)
    flags = {p: p.requires_grad for p in module.parameters()}
    for p in module.parameters():
        p.requires_grad_(False)
    train_before = mean_error(error, train)
    held_before = best_held = mean_error(error, held)
    best, best_step, since_best, step = closed_form, 0, 0, 0
    order = torch.Generator().manual_seed(seed)
    groups = [{"params": [p], "lr": settings.lr * float(p.detach().square().mean().sqrt())} for p in params]
    # fused: the whole update of a tensor in one kernel (the per-op default is several times slower on a CPU)
    optimiser = torch.optim.Adam(groups, fused=True)
    for p in params:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            while step < settings.steps:
                for b in torch.randperm(len(train), generator=order).tolist():
                    err, n = error(train[b])
                    optimiser.zero_grad(set_to_none=True)
                    (err / n).backward()
                    optimiser.step()
                    step += 1
                    if step % settings.eval_every == 0 or step == settings.steps:
                        held_loss = mean_error(error, held)
                        if held_loss < best_held:
                            best, best_held, best_step, since_best = _snapshot(params), held_loss, step, 0
                        else:
                            since_best += 1
                    if step == settings.steps or since_best >= settings.patience:
                        break
                if since_best >= settings.patience:
                    break
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    _load(params, best)
    with torch.no_grad():  # the factors as they will be stored
        for p in params:
            p.copy_(p.to(export_dtype))
    train_after = mean_error(error, train)
    held_after = mean_error(error, held)
    kept = best_step > 0 and train_after <= train_before and held_after <= held_before
    if not kept:  # nothing better than the closed form: restore it exactly
        _load(params, closed_form)
        train_after, held_after = train_before, held_before
    restore_dtypes()
    return {**entry, "steps_run": step, "best_step": best_step if kept else 0, "kept": kept,
            "loss_before": train_before, "loss_after": train_after,
            "holdout_before": held_before, "holdout_after": held_after,
            "seconds": time.perf_counter() - began}
