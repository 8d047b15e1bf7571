"""The optimiser loop of refinement, for any error function: block refinement (refine/block.py, one decoder layer
against the dense layer's output) and end-to-end refinement (refine/e2e.py, the whole model against the dense
logits) both run `optimise`.

The calibration batches are split: the last `holdout` fraction (at least one batch) is never trained on and
decides early stopping; the rest are visited in a seeded order (the seed is the layer index, so a resumed
run repeats the same steps). Adam, step size relative to each tensor's RMS (so `lr` is a relative change per
step and does not depend on how the closed form split the scale between up and down). The state with the
lowest held-out loss is kept, and only if it also does not raise the loss on the training batches;
otherwise the closed-form factors are restored exactly. So the objective on the calibration batches never
increases, and a budget of zero steps changes nothing.
"""
from __future__ import annotations

import functools
import math
import time

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from .. import dist
from ..config import Refinement, held_out_count
from ..model.lowrank import LowRankLinear, trained_weight


def factors(layer: nn.Module) -> list[nn.Parameter]:
    """The parameters block refinement trains: up and down of every LowRankLinear of the layer."""
    return [trained_weight(f) for m in layer.modules() if isinstance(m, LowRankLinear) for f in (m.down, m.up)]


def check_subset(train: list[int], count: int) -> list[int]:
    """The training batches the never-worse check runs on: all (count 0), else `count` of them evenly spaced,
    the same ones before and after the optimisation."""
    if count <= 0 or count >= len(train):
        return list(train)
    return [train[round(i * (len(train) - 1) / max(count - 1, 1))] for i in range(count)]


def split_batches(count: int, holdout: float) -> tuple[list[int], list[int]]:
    """(training batch indices, held-out batch indices) of this rank's `count` batches: the last
    ⌈holdout·total⌉ of all ranks' batches are held out (rank r holds batches r, r + W, r + 2W, … of the total:
    exporter/dist.py), the same split as one process makes."""
    total, world, rank = int(dist.sum_floats(count)[0]), dist.world_size(), dist.rank()
    if total < 2:
        raise ValueError(f"--refine holds out calibration batches for early stopping and needs at least 2; "
                         f"got {total} (raise --calib-samples or lower --calib-batch-size)")
    held = held_out_count(total, holdout)
    position = [rank + b * world for b in range(count)]  # each local batch's place among all of them
    return ([b for b in range(count) if position[b] < total - held],
            [b for b in range(count) if position[b] >= total - held])


@torch.no_grad()
def mean_error(error, batches: list[int]) -> float:
    """Σ error over `batches` / Σ their counts, for `error(b)` = (summed error of batch b, its count); the sums
    in float64, over every rank's `batches` under torchrun."""
    total, count = 0.0, 0
    for b in batches:
        err, n = error(b)
        total, count = total + float(err), count + n
    total, count = dist.sum_floats(total, count)
    return total / max(count, 1)  # guard: an empty batch list has no error


def _float32(module: nn.Module, factors_only: bool = False):
    """Cast `module` (or only its factors: the master copies of end-to-end refinement, the rest staying in the
    compute dtype under autocast) to float32 for the optimisation; -> a function that puts every parameter and
    buffer back in its own dtype (a half-precision model keeps float32 buffers, e.g. the rotary frequencies: one
    cast back to a single dtype would round them). nn.Module's own cast: transformers refuses .float() on a
    model it loaded from a quantized file (a de-quantized GGUF), whose weights are plain tensors by now."""
    dtypes = {name: t.dtype for name, t in [*module.named_parameters(), *module.named_buffers()]}
    if factors_only:
        for param in factors(module):
            if param.dtype != torch.float32:  # a sharded student's are already (refine/sharded.py)
                param.data = param.data.float()
    else:
        nn.Module.float(module)

    def restore() -> None:
        for name, param in module.named_parameters():
            if param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])
        for name, buffer in list(module.named_buffers()):
            owner, _, attr = name.rpartition(".")
            module.get_submodule(owner)._buffers[attr] = buffer.to(dtypes[name])  # as nn.Module._apply does
    return restore


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a factor: its shard when end-to-end refinement is sharded (FSDP2 makes the
    parameters DTensors), else the tensor itself. Snapshots and restores work on it, shard by shard."""
    return t.to_local() if isinstance(t, DTensor) else t


def _rms(t: torch.Tensor) -> float:
    """Root mean square of a whole factor (of all its shards, when sharded: summed over the ranks as floats, an
    offloaded shard being in host memory where the process group may not reach)."""
    square = float(_local(t.detach()).double().square().sum())
    if isinstance(t, DTensor):
        square = dist.sum_floats(square)[0]
    return math.sqrt(square / max(t.numel(), 1))  # guard: an empty factor (a rank-0 matrix is never refined)


def _snapshot(params: list[nn.Parameter], host: bool = False) -> list[torch.Tensor]:
    """A copy of the factors (of this rank's shards of them); on the host for end-to-end refinement (the whole
    model's factors: device memory is for the optimisation)."""
    return [_local(p.detach()).to("cpu", copy=True) if host else _local(p.detach()).clone() for p in params]


def data_parallel(forward: nn.Module) -> nn.Module:
    """`forward` for the training steps: itself in one process, wrapped in DistributedDataParallel under
    torchrun (its gradients averaged over the ranks in the backward pass, so every rank takes the same step).
    A sharded student (FSDP2, refine/sharded.py) averages them itself."""
    if not dist.active() or isinstance(forward, FSDPModule):
        return forward
    from torch.nn.parallel import DistributedDataParallel
    device = next(p for p in forward.parameters() if p.requires_grad).device
    return DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)


def step_scale(settings: Refinement, step: int) -> float:
    """The factor on `lr` at `step` (from 0): 1 ("constant"), or ("cosine") a linear warm-up over the first
    steps/8 then a cosine decay that reaches 0 at `steps`."""
    if settings.schedule == "constant":
        return 1.0
    warm = max(settings.steps // 8, 1)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min((step - warm) / max(settings.steps - warm, 1), 1.0)))


def min_over_ranks(value: int) -> int:
    """The smallest `value` over the ranks (a rank with fewer batches sets the others' epoch length)."""
    return int(dist.min_floats(value)[0])


def _load(params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values):
            _local(p).copy_(v)


def optimise(module: nn.Module, error, train: list[int], held: list[int], settings: Refinement, seed: int,
             export_dtype: torch.dtype, factors_only: bool = False, forward: nn.Module | None = None) -> dict:
    """Adam on the LowRankLinear factors inside `module`, in float32, minimising the mean of `error(f, b)` =
    (summed error of batch b computed by calling `f`, its count) over the `train` batches, early stopping on the
    `held` ones; the factors end as the best held-out state rounded to `export_dtype`, or exactly as they were
    when that is not better on both sets. Shared by block (one decoder layer) and end-to-end (the whole model)
    refinement. `forward`: what error() calls (default `module`); under torchrun the training steps get it
    wrapped in DistributedDataParallel, each rank's `train` and `held` being its own batches.
    factors_only: only the factors go to float32 (error() runs the rest under autocast); else the whole module.
    Exception-safe: whatever stops it (an error, an interrupt), the module is left as it came in: its factors
    and the dtype and gradient flag of every parameter and buffer.
    -> the report entry: losses before/after, steps run, whether the new factors were kept, seconds."""
    began = time.perf_counter()
    entry = {"steps": settings.steps, "lr": settings.lr,
             **({"schedule": settings.schedule} if settings.schedule != "constant" else {})}
    if settings.steps == 0 or not factors(module):
        return {**entry, "steps_run": 0, "kept": False, "seconds": time.perf_counter() - began}
    flags = {p: p.requires_grad for p in module.parameters()}
    restore_dtypes = _float32(module, factors_only)  # the optimisation runs in float32 whatever the compute dtype
    params = factors(module)
    closed_form = _snapshot(params, host=factors_only)
    try:
        for p in module.parameters():
            p.requires_grad_(False)
        outcome = _descend(params, closed_form, error, forward if forward is not None else module, train, held,
                           settings, seed, export_dtype, factors_only)
    except BaseException:
        _load(params, closed_form)
        raise
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        restore_dtypes()
    return {**entry, **outcome, "seconds": time.perf_counter() - began}


def _descend(params: list[nn.Parameter], closed_form: list[torch.Tensor], error, forward: nn.Module,
             train: list[int], held: list[int], settings: Refinement, seed: int, export_dtype: torch.dtype,
             host_snapshots: bool) -> dict:
    """optimise's loop on float32 `params` (starting at `closed_form`): Adam steps, held-out checks every
    `eval_every` steps, then the best state rounded to the export dtype, kept only if better on both sets
    (else the closed form, exactly)."""
    evaluate = functools.partial(error, forward)
    check = check_subset(train, settings.check_batches)
    train_before = mean_error(evaluate, check)
    held_before = best_held = mean_error(evaluate, held)
    best, best_step, since_best, step = closed_form, 0, 0, 0
    order = torch.Generator().manual_seed(seed)
    groups = [{"params": [p], "lr": settings.lr * _rms(p)} for p in params]
    # fused: the whole update of a tensor in one kernel (the per-op default is several times slower on a CPU)
    optimiser = torch.optim.Adam(groups, fused=True)
    scale = torch.optim.lr_scheduler.LambdaLR(optimiser, functools.partial(step_scale, settings))
    for p in params:
        p.requires_grad_(True)
    stepping = data_parallel(forward)
    epoch = min_over_ranks(len(train))  # every rank takes the same number of steps
    with torch.enable_grad():
        while step < settings.steps and since_best < settings.patience:
            for b in torch.randperm(len(train), generator=order)[:epoch].tolist():
                err, n = error(stepping, train[b])
                optimiser.zero_grad(set_to_none=True)
                (err / n).backward()
                optimiser.step()
                scale.step()
                step += 1
                if step % settings.eval_every == 0 or step == settings.steps:
                    held_loss = mean_error(evaluate, held)
                    if held_loss < best_held:
                        best, best_held, best_step, since_best = _snapshot(params, host_snapshots), held_loss, step, 0
                    else:
                        since_best += 1
                if step == settings.steps or since_best >= settings.patience:
                    break
    _load(params, best)
    with torch.no_grad():  # the factors as they will be stored
        for p in params:
            _local(p).copy_(_local(p).to(export_dtype))
    train_after = mean_error(evaluate, check)
    held_after = mean_error(evaluate, held)
    kept = best_step > 0 and train_after <= train_before and held_after <= held_before
    if not kept:  # nothing better than the closed form: restore it exactly
        _load(params, closed_form)
        train_after, held_after = train_before, held_before
    return {"steps_run": step, "best_step": best_step if kept else 0, "kept": kept, "check_batches": len(check),
            "loss_before": train_before, "loss_after": train_after,
            "holdout_before": held_before, "holdout_after": held_after}
