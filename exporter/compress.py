"""The one transform: compress_(model, batches, config) — in place, torchao-style — and compress_source,
the same on any layer source (a resident model, or a checkpoint streamed one decoder layer at a time).

capture layer-0 inputs → (profile pass, if the allocation needs one) → rank plan → compression pass:
per layer observe → factorize each planned linear → swap in a LowRankLinear → carry the activations on
(and, when asked, the evaluation streams, the shard writer and the per-layer checkpoint).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from . import allocation
from .allocation import Matrix, Profile, allocate
from .architectures import Architecture, decoder_layers, matrix_kind
from .host_memory import release_free_heap
from .linears import linear_dims, linear_weight
from .budget import ratio_for_budget
from .config import CompressionConfig, default_min_retention
from .lowrank import LowRankLinear, build_skeleton, swap_module
from .methods import MatrixInput, get_method
from .rank_rounding import round_ranks
from .refine import refine_layer
from .refine_e2e import refine_model
from .source import LayerSource, ResidentSource
from .stream.activations import Activations, advance, capture_inputs
from .stream.checkpoint import Checkpoint
from .stream.observe import observe

log = logging.getLogger(__name__)

# The profile pass's spectra only feed the allocations, which read tail sums of σ(WX)²: float32 products and
# eigenvalues keep those within 1e-4 wherever the tail holds 1e-3 of ‖WX‖² (tests/test_truncation_math.py)
# and take less time on a CPU (docs/scale.md, "Measured here"). The factorization, its loss and its minimum
# stay float64.
PROFILE_DTYPE = torch.float32


@dataclass
class MatrixRecord:
    rank: int
    loss: float  # ‖WX − W'X‖_F on the calibration statistics the method saw, factors as stored
    loss_min: float  # √Σ_{i>r} σ_i(WX)²: the best any rank-r factorization can do on the same X
    shape: tuple[int, int]


@dataclass
class CompressionResult:
    method: str
    allocation: str
    ratio: float
    plan: dict[str, int]
    matrices: list[Matrix]
    records: dict[str, MatrixRecord] = field(default_factory=dict)
    layer_similarity: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # method-specific report entries (e.g. adaComp losses)
    # seconds per layer: "profile" and "compress" (the passes); inside "compress": "observe" (forward passes of
    # the calibration streams and their statistics), "factorize" (the method), "refine" (--refine block)
    layer_seconds: dict[str, list[float]] = field(default_factory=dict)

    def linear_params(self) -> tuple[int, int]:
        """(dense, compressed) parameter counts over all candidate linears."""
        dense = sum(m.dense_params for m in self.matrices)
        after = sum(self.plan[m.name] * m.params_per_rank if m.name in self.plan else m.dense_params
                    for m in self.matrices)
        return dense, after

    def layer_ratios(self) -> list[float]:
        """Realised ratio of each decoder layer over its candidate linears (a dense one removes nothing)."""
        ratios = []
        for layer in sorted({m.layer for m in self.matrices}):
            group = [m for m in self.matrices if m.layer == layer]
            after = sum(self.plan[m.name] * m.params_per_rank if m.name in self.plan else m.dense_params
                        for m in group)
            ratios.append(1.0 - after / sum(m.dense_params for m in group))  # dense_params > 0 for any linear
        return ratios


def list_matrices(model: nn.Module, arch: Architecture, skip: tuple[str, ...] = ()) -> list[Matrix]:
    out = []
    for i, layer in enumerate(decoder_layers(model, arch)):
        for path in arch.linear_names(i):
            name = f"{arch.layers}.{i}.{path}"
            if any(s in name for s in skip):
                continue
            out.append(Matrix(name, matrix_kind(path), i, *linear_dims(layer.get_submodule(path))))
    return out


def _linears(arch: Architecture, index: int, layer: nn.Module, obs):
    """(full name, path in the layer, module, input statistics) of every candidate linear of one layer."""
    for group, stats in zip(arch.groups_of(index), obs.stats):
        for path in group.linears:
            yield f"{arch.layers}.{index}.{path}", path, layer.get_submodule(path), stats


@dataclass
class Streams:
    """The activations the compression pass carries from layer to layer."""
    calib: Activations  # calibration inputs through the original layers
    calib_compressed: Activations | None = None  # ... through the compressed layers (two-stream methods)
    eval_dense: Activations | None = None  # evaluation windows through the original layers
    eval_compressed: Activations | None = None  # ... through the compressed layers

    def named(self) -> dict[str, Activations]:
        return {k: v for k, v in vars(self).items() if v is not None}


def profile_pass(source: LayerSource, calib: Activations, needs: frozenset[str], profile: Profile,
                 start: int = 0, checkpoint: Checkpoint | None = None, progress: bool = True) -> Profile:
    """One pass over the original layers: the input/output similarity of every layer and, when asked,
    the spectrum σ(WX) of every linear (eigenvalues only; keeps vectors, never X Xᵀ). Linears no
    calibration token reached (an MoE expert) get no spectrum and are listed in profile.uncalibrated."""
    arch = source.arch
    for i, layer in source.layers(start, "profile" if progress else None):
        began = time.perf_counter()
        # adaCR needs only the layer similarities (and which linears the data reached): no X Xᵀ then
        obs = observe(i, layer, arch, calib, source.device, need_moments="spectra" in needs)
        profile.layer_similarity.append(obs.input_similarity)
        for name, _, linear, stats in _linears(arch, i, layer, obs):
            if stats.count == 0:
                profile.uncalibrated.append(name)
            elif "spectra" in needs:
                w = linear_weight(linear).detach().to(PROFILE_DTYPE)
                profile.spectra[name] = MatrixInput(name, w, stats).spectrum.to(torch.float64).cpu()
        del obs
        profile.layer_seconds.append(time.perf_counter() - began)
        if checkpoint is not None:
            checkpoint.save({"pass": "profile", "next": i + 1, "similarity": profile.layer_similarity,
                             "seconds": profile.layer_seconds, "uncalibrated": profile.uncalibrated}, {"profile": calib},
                            {f"spectrum.{k}": v for k, v in profile.spectra.items()})
    return profile


def factorize_layer(index: int, layer: nn.Module, arch: Architecture, obs, plan: dict[str, int], method,
                    export_dtype: torch.dtype, result: CompressionResult) -> None:
    """Factorize every planned linear of one layer and swap in its LowRankLinear, input group by input group;
    a group's pairing with X_o (adaComp's) is freed once its linears are done."""
    for group, stats in zip(arch.groups_of(index), obs.stats):
        for path in group.linears:
            name = f"{arch.layers}.{index}.{path}"
            if name in plan:
                factorize_linear(name, path, layer, stats, plan, method, export_dtype, result)
        stats.drop_cross()


def factorize_linear(name: str, path: str, layer: nn.Module, stats, plan: dict[str, int], method,
                     export_dtype: torch.dtype, result: CompressionResult) -> None:
    """Factorize one linear of `layer` at its planned rank and swap in its LowRankLinear. The factors are
    rounded to the export dtype first: the loss is reported, and the next layers see, the factors as stored."""
    linear = layer.get_submodule(path)
    if stats.count == 0:  # an MoE expert no calibration token was routed to: stays dense, reported
        del plan[name]
        result.extra.setdefault("uncalibrated_experts", []).append(name)
        return
    w = linear_weight(linear).detach().to(torch.float64)
    mi, rank = MatrixInput(name, w, stats), plan[name]
    try:
        up, down = method.factorize(mi, rank)
    except Exception as exc:  # a layer that fails to factorize is an error, never skipped
        raise RuntimeError(f"{method.name} failed to factorize {name} at rank {rank}: {exc}") from exc
    up, down = up.to(export_dtype), down.to(export_dtype)
    if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        raise FloatingPointError(f"{method.name} produced non-finite factors for {name} "
                                 f"(in {str(export_dtype).removeprefix('torch.')})")
    result.records[name] = MatrixRecord(rank, mi.loss(up, down), mi.min_loss(rank), tuple(w.shape))
    method.report(name, mi, up, down, result.extra)
    swap_module(layer, path, LowRankLinear.from_factors(up, down, linear.bias, dtype=linear.weight.dtype,
                                                        device=linear.weight.device))


def refine_and_record(index: int, layer: nn.Module, arch: Architecture, obs, dense_weights: dict, streams: Streams,
                      config: CompressionConfig, device, export_dtype: torch.dtype, result: CompressionResult) -> None:
    """--refine block on one factorized layer, then the records' losses of the factors as they now are."""
    began = time.perf_counter()
    entry = refine_layer(index, layer, streams.calib_compressed, streams.calib, config.refinement, device,
                         export_dtype)
    result.extra.setdefault("refine", {})[str(index)] = entry
    result.layer_seconds.setdefault("refine", []).append(time.perf_counter() - began)
    if not entry["kept"]:
        return
    for name, _, module, stats in _linears(arch, index, layer, obs):
        if name in dense_weights and name in result.records:  # factorized (not an uncalibrated expert)
            mi = MatrixInput(name, dense_weights[name].detach().to(torch.float64), stats)
            result.records[name].loss = mi.loss(module.up.weight.detach(), module.down.weight.detach())


def compression_pass(source: LayerSource, streams: Streams, plan: dict[str, int], method, config: CompressionConfig,
                     result: CompressionResult, export_dtype: torch.dtype, start: int = 0, writer=None,
                     checkpoint: Checkpoint | None = None, state: dict | None = None, progress: bool = True) -> None:
    """`state`: what the checkpoint keeps besides this pass's own progress (the plan, the profile)."""
    arch, device, seconds = source.arch, source.device, result.layer_seconds
    for i, layer in source.layers(start, f"compress ({config.method})" if progress else None):
        began = time.perf_counter()
        obs = observe(i, layer, arch, streams.calib, device, compressed=streams.calib_compressed,
                      need_abs_mean="abs_mean" in method.needs, need_cross="cross" in method.needs)
        result.layer_similarity.append(obs.input_similarity)
        if streams.eval_dense is not None:
            advance(i, layer, streams.eval_dense, device)
        dense_weights = {name: linear_weight(lin) for name, _, lin, _ in _linears(arch, i, layer, obs)
                         if name in plan and config.refine_block}
        release_free_heap()  # the forward passes' per-batch blocks, before the factorization's large matrices
        factorizing = time.perf_counter()
        seconds.setdefault("observe", []).append(factorizing - began)
        factorize_layer(i, layer, arch, obs, plan, method, export_dtype, result)
        seconds.setdefault("factorize", []).append(time.perf_counter() - factorizing)
        if config.refine_block:
            refine_and_record(i, layer, arch, obs, dense_weights, streams, config, device, export_dtype, result)
        del obs, dense_weights
        for stream in (streams.calib_compressed, streams.eval_compressed):
            if stream is not None:
                advance(i, layer, stream, device)
        if writer is not None:
            writer.write_layer(i, layer, source.layer_prefix(i))
        seconds.setdefault("compress", []).append(time.perf_counter() - began)
        if checkpoint is not None:
            checkpoint.save({**(state or {}), "pass": "compress", "next": i + 1,
                             "records": {k: asdict(v) for k, v in result.records.items()},
                             "compress_similarity": result.layer_similarity, "extra": result.extra,
                             "layer_seconds": result.layer_seconds}, streams.named())


def restore_written_layers(source: LayerSource, plan: dict[str, int], writer, start: int) -> None:
    """--resume: the layers a killed run compressed (0 … start−1) get their low-rank structure back, so that
    what follows the loop (parameter counts, the ONNX graph) sees the compressed model and not a fresh load's
    dense layers; a model held in memory also gets their written weights back."""
    for i in range(start):
        layer, prefix = decoder_layers(source.model, source.arch)[i], source.layer_prefix(i)
        build_skeleton(layer, {name[len(prefix):]: rank for name, rank in plan.items() if name.startswith(prefix)})
        if not source.streamed:  # a streamed layer is read back from the output when needed (WrittenSource)
            written = writer.read_layer(i)
            layer.load_state_dict({k[len(prefix):]: v for k, v in written.items()}, strict=True)


def refine_end_to_end(source: LayerSource, streams: Streams, batches: list[torch.Tensor],
                      eval_batches: list[torch.Tensor] | None, config: CompressionConfig, export_dtype: torch.dtype,
                      result: CompressionResult, writer=None) -> None:
    """--refine e2e after the layer loop (exporter/refine_e2e.py). The loop has written each layer and carried
    the evaluation windows through it: when refinement changed the factors, both are done again."""
    if source.streamed:  # pipeline.whole_model_reason loads such a run whole, or refuses it
        raise RuntimeError("--refine e2e backpropagates through the whole model: it needs the model in memory")
    entry = refine_model(source.model, source.arch, batches, streams.calib.hidden, config.refinement, source.device,
                         export_dtype)
    result.extra["refine_e2e"] = entry
    if not entry["kept"]:
        return
    if writer is not None:
        for i, layer in enumerate(decoder_layers(source.model, source.arch)):
            writer.write_layer(i, layer, source.layer_prefix(i))
    if streams.eval_compressed is not None:
        streams.eval_compressed = capture_inputs(source.model, source.arch, eval_batches, source.device)
        for i, layer in source.layers():
            advance(i, layer, streams.eval_compressed, source.device)


def _restore_result(result: CompressionResult, state: dict) -> None:
    result.records = {k: MatrixRecord(v["rank"], v["loss"], v["loss_min"], tuple(v["shape"]))
                      for k, v in state.get("records", {}).items()}
    result.layer_similarity = list(state.get("compress_similarity", []))
    result.extra = state.get("extra", {})
    result.layer_seconds = {k: list(v) for k, v in state.get("layer_seconds", {}).items()}


@torch.no_grad()
def compress_source(source: LayerSource, batches: list[torch.Tensor], config: CompressionConfig,
                    eval_batches: list[torch.Tensor] | None = None, writer=None, checkpoint: Checkpoint | None = None,
                    export_dtype: torch.dtype | None = None, profile: Profile | None = None,
                    progress: bool = True) -> tuple[CompressionResult, Streams]:
    """Compress every planned linear of `source`'s model layer by layer. -> (result, the final streams: the
    evaluation windows' last hidden states through the dense and the compressed layers, when asked).
    `profile`: what the allocation needs, measured before (measure_profile) and shared by several runs."""
    arch, device, model = source.arch, source.device, source.model
    export_dtype = export_dtype or source.compute_dtype
    method = get_method(config.method, alpha=config.asvd_alpha, iterations=config.adacomp_iterations,
                        strength=config.adacomp_strength, damping=config.adacomp_damping)
    matrices = list_matrices(model, arch, config.skip)
    name = config.allocation_name
    needs = allocation.needs(name)
    state = checkpoint.load() if checkpoint is not None else None

    method.prepare(model, batches, matrices, device)  # whole-model work (FWSVD's Fisher); resident models only
    calib = capture_inputs(model, arch, batches, device)
    own_profile = profile is None
    if own_profile:
        profile = Profile()
        if "sensitivity" in needs:
            from .calibration.sensitivity import output_gradient_sensitivity
            profile.sensitivity = output_gradient_sensitivity(model, batches, matrices, device)
        if needs - {"sensitivity"} and (state is None or state["pass"] == "profile"):
            start, running = 0, calib.copy()
            if state is not None:
                start = state["next"]
                profile.layer_similarity, profile.layer_seconds = list(state["similarity"]), list(state["seconds"])
                profile.uncalibrated = list(state["uncalibrated"])
                extra = checkpoint.restore(state, {"profile": running})
                profile.spectra = {k[len("spectrum."):]: v for k, v in extra.items() if k.startswith("spectrum.")}
            profile_pass(source, running, needs, profile, start, checkpoint, progress)
            del running
        elif state is not None and state["pass"] == "compress":
            profile.layer_similarity = list(state["profile"]["similarity"])
            profile.uncalibrated = list(state["profile"]["uncalibrated"])
    if profile.uncalibrated:  # experts no calibration token reached: dense, out of the budget's reach
        matrices = [m for m in matrices if m.name not in set(profile.uncalibrated)]
    ratio = config.ratio if config.budget_bytes is None else ratio_for_budget(model, matrices, config.budget_bytes,
                                                                             export_dtype)
    min_retention = config.min_retention if config.min_retention is not None else default_min_retention(ratio)
    if state is not None and state["pass"] == "compress":
        plan = state["plan"]
        profile_state = state["profile"]
    else:
        plan = allocate(name, matrices, profile if needs else None, ratio, min_rank=config.min_rank,
                        min_retention=min_retention, keep_dense_above=config.keep_dense_above)
        plan = round_ranks(matrices, plan, config.rank_multiple)  # --rank-multiple; the plan itself for 1
        profile_state = {"similarity": profile.layer_similarity, "seconds": profile.layer_seconds,
                         "uncalibrated": profile.uncalibrated}
    if own_profile:
        profile.spectra = {}  # the plan is made: the spectra are not needed any more
    result = CompressionResult(config.method, name, ratio, plan, matrices)
    if profile.uncalibrated:
        result.extra["uncalibrated_experts"] = list(profile.uncalibrated)
    if name == "adacr":
        result.extra["adacr"] = {"min_retention": min_retention}

    streams = Streams(calib)
    if config.propagation == "compressed":
        streams.calib_compressed = calib.copy()
    if eval_batches is not None:
        streams.eval_dense = capture_inputs(model, arch, eval_batches, device)
        streams.eval_compressed = streams.eval_dense.copy()
    start = 0
    if state is not None and state["pass"] == "compress":
        start = state["next"]
        checkpoint.restore(state, streams.named())
        _restore_result(result, state)
        if writer is not None:
            writer.resume(start)
            restore_written_layers(source, plan, writer, start)
    base_state = {"plan": plan, "profile": profile_state}
    if profile_state.get("seconds"):
        result.layer_seconds["profile"] = profile_state["seconds"]
    compression_pass(source, streams, plan, method, config, result, export_dtype, start, writer, checkpoint,
                     base_state, progress)
    if config.refine_e2e:
        refine_end_to_end(source, streams, batches, eval_batches, config, export_dtype, result, writer)
    if profile.layer_similarity:  # the profile pass measured it on the original stream before any swap
        result.layer_similarity = profile.layer_similarity
    if "uncalibrated_experts" in result.extra:
        result.extra["uncalibrated_experts"] = sorted(result.extra["uncalibrated_experts"])
        log.warning("%d expert linear(s) received no calibration token and stay dense, e.g. %s",
                    len(result.extra["uncalibrated_experts"]), result.extra["uncalibrated_experts"][0])
    missing = set(plan) - set(result.records)
    if missing:
        raise RuntimeError(f"{len(missing)} planned modules were never factorized, e.g. {sorted(missing)[0]}")
    return result, streams


@torch.no_grad()
def compress_(model: nn.Module, batches: list[torch.Tensor], config: CompressionConfig,
              device=None, progress: bool = True, profile: Profile | None = None) -> CompressionResult:
    """Compress a model that is in memory, in place (its decoder layers visit `device` one at a time)."""
    model.eval()
    result, _ = compress_source(ResidentSource(model, device), batches, config, profile=profile, progress=progress)
    return result


@torch.no_grad()
def measure_profile(model: nn.Module, batches: list[torch.Tensor], allocations: list[str], device=None,
                    progress: bool = True) -> Profile:
    """What the given allocations need from the original model (layer similarities, spectra, sensitivity),
    measured once for a resident model, to pass to several compress_ calls (benchmarks)."""
    source = ResidentSource(model, device)
    needs = frozenset().union(*(allocation.needs(a) for a in allocations))
    profile = Profile()
    if "sensitivity" in needs:
        from .calibration.sensitivity import output_gradient_sensitivity
        profile.sensitivity = output_gradient_sensitivity(model, batches, list_matrices(model, source.arch), source.device)
    if needs - {"sensitivity"}:
        profile_pass(source, capture_inputs(model, source.arch, batches, source.device), needs, profile,
                     progress=progress)
    return profile
