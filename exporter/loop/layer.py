"""One decoder layer of the compression pass: observe its inputs → factorize each planned linear and swap in
its LowRankLinear → (block refinement) → (--quantize: every linear of the layer on the MatMulNBits grid) →
advance the compressed streams → write the layer → save the resume state. compression_pass runs it for every
layer from `start`."""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict

import torch
import torch.nn as nn

from .. import dist
from ..config import CompressionConfig, graph_dtype
from ..factorize.base import MatrixInput
from ..load.source import LayerSource
from ..model.activations import Activations, advance
from ..model.architecture import Architecture
from ..model.linears import linear_weight
from ..model.lowrank import LowRankLinear, swap_module
from ..output.resume_state import ResumeState
from ..quantize.correction import correct_linear_
from ..quantize.fake import rounded_factors
from ..quantize.gptq import SHRINKS
from ..quantize.grid import round_to_nearest
from ..quantize.layer import put_on_grid_, quantize_module_
from ..refine.block import refine_layer
from .host_memory import release_free_heap
from .observe import linears_with_stats, observe
from .result import CompressionResult, MatrixRecord
from .streams import Streams
from .walk import layer_by_layer


def factorize_layer(index: int, layer: nn.Module, arch: Architecture, obs, plan: dict[str, int], method,
                    export_dtype: torch.dtype, result: CompressionResult) -> None:
    """Factorize every planned linear of one layer and swap in its LowRankLinear, input group by input group;
    a group's pairing with X_o (adaComp's) is freed once its linears are done. Under torchrun the layer's
    planned linears are shared out: the k-th is factorized by rank k mod world size and broadcast."""
    position = 0
    for group, stats in zip(arch.groups_of(index), obs.stats):
        for path in group.linears:
            name = f"{arch.layers}.{index}.{path}"
            if name in plan:
                factorize_linear(name, path, layer, stats, plan, method, export_dtype, result,
                                 owner=position % dist.world_size())
                position += 1
        stats.drop_cross()


def factorization(name: str, linear: nn.Module, stats, rank: int, method,
                  export_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, MatrixRecord, dict]:
    """(up, down, record, the method's report entries) of one linear. The factors are rounded to the export
    dtype first: the loss is reported, and the next layers see, the factors as stored."""
    w = linear_weight(linear).detach().to(torch.float64)
    mi = MatrixInput(name, w, stats)
    try:
        up, down = method.factorize(mi, rank)
    except Exception as exc:  # a layer that fails to factorize is an error, never skipped
        raise RuntimeError(f"{method.name} failed to factorize {name} at rank {rank}: {exc}") from exc
    up, down = up.to(export_dtype), down.to(export_dtype)
    if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        raise FloatingPointError(f"{method.name} produced non-finite factors for {name} "
                                 f"(in {str(export_dtype).removeprefix('torch.')})")
    report: dict = {}
    method.report(name, mi, up, down, report)
    return up, down, MatrixRecord(rank, mi.loss(up, down), mi.min_loss(rank), tuple(w.shape)), report


def factorize_linear(name: str, path: str, layer: nn.Module, stats, plan: dict[str, int], method,
                     export_dtype: torch.dtype, result: CompressionResult, owner: int = 0) -> None:
    """Factorize one linear of `layer` at its planned rank (on rank `owner`, broadcast to the others under
    torchrun) and swap in its LowRankLinear."""
    linear = layer.get_submodule(path)
    if stats.count == 0:  # an MoE expert no calibration token was routed to: stays dense, reported
        del plan[name]
        result.extra.setdefault("uncalibrated_experts", []).append(name)
        return
    if not dist.active():
        outcome = factorization(name, linear, stats, plan[name], method, export_dtype)
    else:  # the owner's outcome, or its error, on every rank (a rank left waiting would hang)
        try:
            mine = factorization(name, linear, stats, plan[name], method, export_dtype) if dist.rank() == owner else None
        except Exception as exc:  # noqa: BLE001 — sent to the other ranks, then raised on all of them
            mine = exc
        outcome = dist.broadcast_objects([mine], src=owner)[0]
        if isinstance(outcome, Exception):
            raise outcome
    up, down, result.records[name], report = outcome
    for key, entries in report.items():
        result.extra.setdefault(key, {}).update(entries)
    swap_module(layer, path, LowRankLinear.from_factors(up, down, linear.bias, dtype=linear.weight.dtype,
                                                        device=linear.weight.device))


def refine_and_record(index: int, layer: nn.Module, arch: Architecture, obs, dense_weights: dict, streams: Streams,
                      config: CompressionConfig, device, export_dtype: torch.dtype, result: CompressionResult) -> None:
    """--refine block on one factorized layer, then the records' losses of the factors as they now are."""
    began = time.perf_counter()
    targets = streams.calib  # the dense layer's outputs on the original stream (observe advanced it)
    if obs.dense_on_compressed is not None:  # β·dense(X_o) + (1 − β)·dense(X_c)
        blended = [torch.lerp(c, o, config.refine_target_strength) for c, o in zip(obs.dense_on_compressed,
                                                                                    streams.calib.hidden)]
        targets = Activations(blended, streams.calib.layer_kwargs)
    rounding = (contextlib.nullcontext() if config.quantization is None or not config.refine_rounded else
                rounded_factors(layer, config.quantization, graph_dtype(export_dtype)))  # what GPTQ rounds next
    with rounding:
        entry = refine_layer(index, layer, streams.calib_compressed, targets, config.refinement, device, export_dtype)
    result.extra.setdefault("refine", {})[str(index)] = entry
    result.layer_seconds.setdefault("refine", []).append(time.perf_counter() - began)
    if not entry["kept"]:
        return
    for name, _, module, stats in linears_with_stats(arch, index, layer, obs):
        if name in dense_weights and name in result.records:  # factorized (not an uncalibrated expert)
            mi = MatrixInput(name, dense_weights[name].detach().to(torch.float64), stats)
            result.records[name].loss = mi.loss(module.up.weight.detach(), module.down.weight.detach())


def quantize_layer(index: int, layer: nn.Module, arch: Architecture, obs, config: CompressionConfig,
                   export_dtype: torch.dtype, result: CompressionResult) -> None:
    """--quantize: every linear of the layer, factors and dense ones alike, on the grid the graph stores (GPTQ
    with the statistics observe gathered), so the next layers and the written shards see the shipped weights;
    with --correction-rank a dense one then gets its float correction (quantize/correction.py). An MoE expert
    no calibration token reached has no Hessian: rounded to nearest, uncorrected, and reported."""
    began = time.perf_counter()
    q, scale_dtype = config.quantization, graph_dtype(export_dtype)
    records = result.extra.setdefault("quantize", {})
    result.extra["quantize_grid"] = {"bits": q.bits, "block_size": q.block_size, "scale_search": list(SHRINKS)}
    for name, path, module, stats in linears_with_stats(arch, index, layer, obs):
        if stats.count == 0:
            for linear in [module] if isinstance(module, nn.Linear) else [module.down, module.up]:
                put_on_grid_(linear, *round_to_nearest(linear.weight.detach().to(torch.float64), q, scale_dtype))
            result.extra.setdefault("quantize_uncalibrated", []).append(name)
            continue
        corrects = config.correction_rank > 0 and isinstance(module, nn.Linear)
        dense = module.weight.detach().clone() if corrects else None
        records[name] = quantize_module_(module, stats.gram, q, scale_dtype)
        if corrects:  # --correction-rank: the grid's error, its best rank-r part beside it in float
            records[name]["correction"] = correct_linear_(layer, path, dense, stats.gram, config.correction_rank)
            result.extra.setdefault("corrections", {})[name] = records[name]["correction"]["rank"]
    result.layer_seconds.setdefault("quantize", []).append(time.perf_counter() - began)


def compression_pass(source: LayerSource, streams: Streams, plan: dict[str, int], method, config: CompressionConfig,
                     result: CompressionResult, export_dtype: torch.dtype, start: int = 0, writer=None,
                     resume_state: ResumeState | None = None, state: dict | None = None, progress: bool = True) -> None:
    """`state`: what the checkpoint keeps besides this pass's own progress (the plan, the profile)."""
    arch, device, seconds = source.arch, source.device, result.layer_seconds
    for i, layer in layer_by_layer(source, start, f"compress ({config.method})" if progress else None):
        began = time.perf_counter()
        obs = observe(i, layer, arch, streams.calib, device, compressed=streams.calib_compressed,
                      need_abs_mean="abs_mean" in method.needs, need_cross="cross" in method.needs,
                      keep_dense_on_compressed=config.refine_block and config.refine_target_strength < 1)
        result.layer_similarity.append(obs.input_similarity)
        for stream in (streams.eval_dense, streams.e2e_dense):  # through the dense layer, before its swap
            if stream is not None:
                advance(i, layer, stream, device)
        dense_weights = {name: linear_weight(lin) for name, _, lin, _ in linears_with_stats(arch, i, layer, obs)
                         if name in plan and config.refine_block}
        release_free_heap()  # the forward passes' per-batch blocks, before the factorization's large matrices
        factorizing = time.perf_counter()
        seconds.setdefault("observe", []).append(factorizing - began)
        factorize_layer(i, layer, arch, obs, plan, method, export_dtype, result)
        seconds.setdefault("factorize", []).append(time.perf_counter() - factorizing)
        if config.refine_block:
            refine_and_record(i, layer, arch, obs, dense_weights, streams, config, device, export_dtype, result)
        if config.quantization is not None:
            quantize_layer(i, layer, arch, obs, config, export_dtype, result)
        del obs, dense_weights
        for stream in (streams.calib_compressed, streams.eval_compressed):
            if stream is not None:
                advance(i, layer, stream, device)
        if writer is not None:
            writer.write_layer(i, layer, source.layer_prefix(i))
        seconds.setdefault("compress", []).append(time.perf_counter() - began)
        if resume_state is not None:
            resume_state.save(pass_state(result, state, "compress", i + 1), streams.named())


def pass_state(result: CompressionResult, base: dict | None, name: str, next_layer: int) -> dict:
    """What the resume state records after a layer (pass "compress") or after end-to-end refinement (pass
    "e2e"): `base` (the plan, the profile) and what the pass measured so far."""
    return {**(base or {}), "pass": name, "next": next_layer,
            "records": {k: asdict(v) for k, v in result.records.items()},
            "compress_similarity": result.layer_similarity, "extra": result.extra,
            "layer_seconds": result.layer_seconds}
