"""The one transform: compress_(model, batches, config) — in place, torchao-style — and compress_source,
the same on any layer source (a resident model, or a checkpoint streamed one decoder layer at a time).

capture layer-0 inputs → (profile pass, if the allocation needs one) → rank plan → compression pass
(loop/layer.py: per layer observe → factorize each planned linear → swap in a LowRankLinear → carry the
activations on, and, when asked, the evaluation streams, the shard writer and the resume state) →
(end-to-end refinement). A resume state saved after every layer lets a killed run continue where it stopped.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from accelerate.utils import set_module_tensor_to_device

from .. import dist
from ..config import CompressionConfig, default_min_retention, graph_dtype
from ..factorize.base import get_method
from ..load.open import available_bytes
from ..load.resident import ResidentSource
from ..load.source import LayerSource
from ..model.activations import Activations, advance
from ..model.architecture import decoder_layers
from ..model.candidates import Matrix, list_matrices
from ..model.corrected import build_corrections
from ..model.layer_inputs import capture_inputs
from ..model.lowrank import LowRankLinear, build_skeleton
from ..model.quantized import attach_scales, drop_scales, is_scale_key
from ..output.resume_state import ResumeState
from ..plan import allocate
from ..plan import needs as allocation_needs
from ..plan.budget import ratio_for_budget
from ..plan.profile import Profile
from ..plan.rounding import round_ranks
from ..quantize.fake import factors_on_their_grids
from ..refine.e2e import KL_CHUNK, Teacher, refine_model
from ..refine.memory import parallel_plan, shape_of
from ..refine.sharded import gather_factors_, sharded_student, whole_factors
from .head_quantization import quantize_head_
from .layer import compression_pass, pass_state
from .profile import profile_pass
from .result import CompressionResult, restore_result
from .streams import Streams

log = logging.getLogger(__name__)


def own_profile(source: LayerSource, calib: Activations, batches: list[torch.Tensor], matrices: list[Matrix],
                needs: frozenset[str], state: dict | None, resume_state: ResumeState | None,
                progress: bool) -> Profile:
    """What the allocation needs, measured on this run's calibration data: the sensitivity backward, and the
    profile pass (continued from the resume state when a killed run stopped inside it); when the killed run
    was already compressing, what its profile measured comes from the resume state."""
    profile = Profile()
    if "sensitivity" in needs and not planned(state):  # a killed run that had planned needs it no more
        from ..plan.sensitivity import output_gradient_sensitivity
        profile.sensitivity = output_gradient_sensitivity(source, calib, batches, matrices)
    if needs - {"sensitivity"} and (state is None or state["pass"] == "profile"):
        start, running = 0, calib.copy()
        if state is not None:
            start = state["next"]
            profile.layer_similarity, profile.layer_seconds = list(state["similarity"]), list(state["seconds"])
            profile.uncalibrated = list(state["uncalibrated"])
            extra = resume_state.restore(state, {"profile": running})
            profile.spectra = {k[len("spectrum."):]: v for k, v in extra.items() if k.startswith("spectrum.")}
        profile_pass(source, running, needs, profile, start, resume_state, progress)
    elif planned(state):
        profile.layer_similarity = list(state["profile"]["similarity"])
        profile.uncalibrated = list(state["profile"]["uncalibrated"])
    return profile


def rank_plan(model: nn.Module, matrices: list[Matrix], profile: Profile, needs: frozenset[str],
              config: CompressionConfig, export_dtype: torch.dtype, state: dict | None) -> CompressionResult:
    """The ratio (from --budget when given), the allocation's plan rounded to --rank-multiple (or the killed
    run's plan), as the result the compression pass fills in."""
    ratio = config.ratio if config.budget_bytes is None else ratio_for_budget(model, matrices, config.budget_bytes,
                                                                             export_dtype)
    min_retention = config.min_retention if config.min_retention is not None else default_min_retention(ratio)
    if planned(state):
        plan = state["plan"]
    elif ratio == 0:  # --quantize alone (CompressionConfig allows it only then): every linear stays dense
        plan = {}
    else:
        plan = allocate(config.allocation_name, matrices, profile if needs else None, ratio, min_rank=config.min_rank,
                        min_retention=min_retention, keep_dense_above=config.keep_dense_above)
        plan = round_ranks(matrices, plan, config.rank_multiple)  # --rank-multiple; the plan itself for 1
    result = CompressionResult(config.method, config.allocation_name, ratio, plan, matrices)
    if profile.uncalibrated:
        result.extra["uncalibrated_experts"] = list(profile.uncalibrated)
    if config.allocation_name == "adacr":
        result.extra["adacr"] = {"min_retention": min_retention}
    return result


def open_streams(source: LayerSource, calib: Activations, config: CompressionConfig,
                 eval_batches: list[torch.Tensor] | None, e2e_batches: list[torch.Tensor] | None = None) -> Streams:
    """The streams the compression pass carries: calibration through the original layers, through the
    compressed ones (when the method or refinement propagates them), the evaluation windows through both, and
    end-to-end refinement's own batches (when it has its own) through the original layers: its teacher."""
    streams = Streams(calib)
    if config.propagation == "compressed":
        streams.calib_compressed = calib.copy()
    if eval_batches is not None:
        streams.eval_dense = capture_inputs(source.model, source.arch, eval_batches, source.device)
        streams.eval_compressed = streams.eval_dense.copy()
    if e2e_batches is not None and config.refine_e2e:
        streams.e2e_dense = capture_inputs(source.model, source.arch, e2e_batches, source.device)
    return streams


def planned(state: dict | None) -> bool:
    """Whether the killed run this one resumes had made its rank plan (it was compressing, or refining end to
    end after its last layer)."""
    return state is not None and state["pass"] in ("compress", "e2e")


def resume_compression(source: LayerSource, state: dict | None, resume_state: ResumeState | None, streams: Streams,
                       result: CompressionResult, writer) -> tuple[int, dict[str, torch.Tensor] | None]:
    """The first layer the compression pass runs: 0, or the one after the killed run's last finished layer,
    whose streams, measurements and written layers are restored. -> (that layer, the factors end-to-end
    refinement ended with when the killed run had finished it, else None)."""
    if not planned(state):
        return 0, None
    start = state["next"]
    finished_e2e = state["pass"] == "e2e"  # only the evaluation streams are kept past that point
    kept = {k: v for k, v in streams.named().items() if k.startswith("eval") or not finished_e2e}
    extra = resume_state.restore(state, kept)
    restore_result(result, state)
    if writer is not None:
        writer.resume(start)
        restore_written_layers(source, result.plan, writer, start, result.extra.get("corrections", {}))
    return start, ({k[len("factor."):]: v for k, v in extra.items() if k.startswith("factor.")}
                   if finished_e2e else None)


def restore_written_layers(source: LayerSource, plan: dict[str, int], writer, start: int,
                           corrections: dict[str, int]) -> None:
    """--resume: the layers a killed run compressed (0 … start−1) get their low-rank structure (and their
    --correction-rank pairs) back, so that what follows the loop (parameter counts, the ONNX graph) sees the
    compressed model and not a fresh load's dense layers; a model held in memory also gets their written weights
    back."""
    for i in range(start):
        layer, prefix = decoder_layers(source.model, source.arch)[i], source.layer_prefix(i)
        build_skeleton(layer, {name[len(prefix):]: rank for name, rank in plan.items() if name.startswith(prefix)})
        build_corrections(layer, {name[len(prefix):]: rank for name, rank in corrections.items()
                                  if name.startswith(prefix)})
        if not source.streamed:  # a streamed layer is read back from the output when needed (WrittenSource)
            written = writer.read_layer(i)
            layer.load_state_dict({k[len(prefix):]: v for k, v in written.items()}, strict=True)


@contextmanager
def layer_on_device(source: LayerSource, writer, i: int):
    """Decoder layer `i` of the compressed model whole on the compute device: a streamed model's read back from
    its written shard (in the compute dtype) and put back on `meta` after; a resident model's moved to the device
    and back home."""
    layer = decoder_layers(source.model, source.arch)[i]
    if not source.streamed:
        home = next(layer.parameters()).device
        layer.to(source.device)
        try:
            yield layer
        finally:
            layer.to(home)
        return
    if writer is None:
        raise RuntimeError("--refine e2e on a streamed model reads the compressed layers back from their shards: "
                           "it needs the shard writer")
    prefix = source.layer_prefix(i)
    try:
        written = writer.read_layer(i)
        written = {k: v.to(source.device) if is_scale_key(k) else v for k, v in written.items()}
        for name, value in attach_scales(layer, written, prefix).items():  # --quantize: the scales as buffers
            value = value.to(source.compute_dtype) if value.is_floating_point() else value
            set_module_tensor_to_device(layer, name[len(prefix):], source.device, value=value, clear_cache=False)
        yield layer
    finally:
        for name, _ in list(layer.named_parameters()):
            set_module_tensor_to_device(layer, name, "meta", clear_cache=False)
        drop_scales(layer)  # --quantize: the scales went out with the layer's weights (the shard keeps them)


@contextmanager
def whole_student(source: LayerSource, writer):
    """Every decoder layer of the compressed model on the compute device at once, for end-to-end refinement
    in one process or data-parallel."""
    with contextlib.ExitStack() as stack:
        for i in range(source.num_layers):
            stack.enter_context(layer_on_device(source, writer, i))
        yield


def each_layer_on_device(source: LayerSource, writer):
    """The compressed model's decoder layers whole on the compute device one at a time, for the sharded student
    (refine/sharded.py): one is put back before the next comes."""
    for i in range(source.num_layers):
        with layer_on_device(source, writer, i) as layer:
            yield layer


@dataclass
class EndToEnd:
    """What end-to-end refinement keeps beyond memory, and what a killed run left of it."""
    work: Path | None  # the teacher's folder (a temporary one when None)
    resume_state: ResumeState | None
    base_state: dict  # the plan and the profile: recorded with the refined factors
    finished: dict[str, torch.Tensor] | None  # the factors a killed run ended with (None: refine afresh)
    writer: object = None  # the shard writer: the streamed student is read back from it, and rewritten


def factor_state(model: nn.Module, arch=None, student=None) -> dict[str, torch.Tensor]:
    """Every up and down weight of the model's LowRankLinear modules, by parameter name. `student`: the sharded
    student's instead (refine/sharded.py; the model's own layers may be streamed: on meta), gathered whole on
    the host in the model's dtypes."""
    if student is None:
        return {f"{name}.{part}.weight": getattr(module, part).weight.detach() for name, module in
                model.named_modules() if isinstance(module, LowRankLinear) for part in ("up", "down")}
    prefix = {id(module): name for name, module in model.named_modules()}
    return {f"{prefix[id(layer)]}.{name}": value.to("cpu", layer.get_parameter(name).dtype)
            for layer, shard in zip(decoder_layers(model, arch), student.layers)
            for name, value in whole_factors(shard)}


def train_end_to_end(source: LayerSource, streams: Streams, batches: list[torch.Tensor], config: CompressionConfig,
                     export_dtype: torch.dtype, result: CompressionResult, e2e: EndToEnd, stack) -> nn.Module | None:
    """Refine the factors, the teacher written to disk first: on the model's own layers (one process, or
    data-parallel: `stack` enters whole_student), or on a sharded copy of them (FSDP2, refine/sharded.py) when
    --e2e-parallel says so or only that fits; record the refined factors in the resume state before anything is
    rewritten. -> the sharded student (None when the model's own layers were refined)."""
    model, arch, device = source.model, source.arch, source.device
    shape = shape_of(model, batches[0].shape[0], batches[0].shape[1], source.compute_dtype.itemsize, KL_CHUNK)
    layer_params = {id(p) for p in decoder_layers(model, arch).parameters()}
    resident = [(p.numel() * p.element_size(), id(p) in layer_params) for p in model.parameters()
                if p.device.type != "meta"]
    mode, need = parallel_plan(shape, dist.world_size(), config.e2e_parallel_run, device, available_bytes(device),
                               (sum(n for n, _ in resident), sum(n for n, inside in resident if not inside)),
                               host_available=available_bytes(torch.device("cpu")))
    sharded = mode.startswith("fsdp")
    grouped = torch.distributed.is_available() and torch.distributed.is_initialized()
    if mode == "fsdp" and not grouped:
        raise ValueError("--e2e-parallel fsdp shards end-to-end refinement over a process group: run under torchrun")
    folder = e2e.work if e2e.work is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
    if sharded and not grouped:  # offloaded in one process: FSDP2 wants a process group, here of one
        stack.enter_context(dist.group_of_one(device, Path(stack.enter_context(tempfile.TemporaryDirectory()))))
    dense = streams.e2e_dense if streams.e2e_dense is not None else streams.calib  # `batches` through dense layers
    teacher = Teacher(folder, dense.hidden)
    streams.calib.hidden = dense.hidden = []  # the teacher is on disk now (and the loop is done with calibration)
    inputs = capture_inputs(model, arch, batches, device)  # decoder layer 0's inputs: the embeddings, frozen
    student = None
    if sharded:
        student = sharded_student(each_layer_on_device(source, e2e.writer), inputs, device, source.compute_dtype,
                                  offload=mode == "fsdp-offload")
    else:
        stack.enter_context(whole_student(source, e2e.writer))
    on_grid = (contextlib.nullcontext() if config.quantization is None else  # what the layer loop shipped stays
               factors_on_their_grids(model, config.quantization))  # shipped: the factors end on their grids
    with on_grid:
        entry = refine_model(model, arch, batches, inputs, teacher, config.e2e_refinement, device, export_dtype,
                             source.compute_dtype, student=student)
    result.extra["refine_e2e"] = {**entry, "memory_formula_gib": round(need.total / 2**30, 3),
                                  "host_formula_gib": round(need.host_total / 2**30, 3),
                                  "world_size": dist.world_size(), "parallel": mode,
                                  "sequences": int(dist.sum_floats(sum(len(b) for b in batches))[0]),
                                  "seqlen": batches[0].shape[1], "own_data": streams.e2e_dense is not None,
                                  "on_grid": config.quantization is not None}
    if e2e.resume_state is not None:  # a kill from here on resumes to these factors, never refines again
        evaluation = {k: v for k, v in streams.named().items() if k.startswith("eval")}
        e2e.resume_state.save(pass_state(result, e2e.base_state, "e2e", source.num_layers), evaluation,
                              {f"factor.{k}": v for k, v in factor_state(model, arch, student).items()})
    return student


def refine_end_to_end(source: LayerSource, streams: Streams, batches: list[torch.Tensor],
                      eval_batches: list[torch.Tensor] | None, config: CompressionConfig, export_dtype: torch.dtype,
                      result: CompressionResult, e2e: EndToEnd) -> None:
    """--refine e2e after the layer loop (exporter/refine/e2e.py), without the dense model: the teacher is the
    original stream's final hidden states, moved to disk. The loop has written each layer and carried the
    evaluation windows through it: when refinement changed the factors, both are done again, layer by layer
    (also when a killed run had finished refining: its factors come from the resume state)."""
    model, arch, device, writer = source.model, source.arch, source.device, e2e.writer
    with contextlib.ExitStack() as stack:
        student = None
        if e2e.finished is None:
            student = train_end_to_end(source, streams, batches, config, export_dtype, result, e2e, stack)
        else:
            stack.enter_context(whole_student(source, writer))
            with torch.no_grad():
                for name, value in e2e.finished.items():
                    model.get_parameter(name).copy_(value)
        if not result.extra["refine_e2e"]["kept"]:
            return
        if streams.eval_compressed is not None:
            streams.eval_compressed = capture_inputs(model, arch, eval_batches, device)
        for i, layer in enumerate(decoder_layers(model, arch)):
            with layer_on_device(source, writer, i) if student is not None else contextlib.nullcontext(layer):
                if student is not None:  # the sharded student's factors, whole, into the model's layer
                    gather_factors_(student.layers[i], layer)
                if writer is not None:
                    writer.write_layer(i, layer, source.layer_prefix(i))
                if streams.eval_compressed is not None:
                    advance(i, layer, streams.eval_compressed, device)


def check_complete(result: CompressionResult, profile: Profile) -> None:
    """What the report reads once the loop is over: the profile pass's similarities (measured on the original
    stream before any swap), the experts no token reached, and every planned module factorized."""
    if profile.layer_similarity:
        result.layer_similarity = profile.layer_similarity
    if "uncalibrated_experts" in result.extra:
        result.extra["uncalibrated_experts"] = sorted(result.extra["uncalibrated_experts"])
        log.warning("%d expert linear(s) received no calibration token and stay dense, e.g. %s",
                    len(result.extra["uncalibrated_experts"]), result.extra["uncalibrated_experts"][0])
    missing = set(result.plan) - set(result.records)
    if missing:
        raise RuntimeError(f"{len(missing)} planned modules were never factorized, e.g. {sorted(missing)[0]}")


@torch.no_grad()
def compress_source(source: LayerSource, batches: list[torch.Tensor], config: CompressionConfig,
                    eval_batches: list[torch.Tensor] | None = None, writer=None, resume_state: ResumeState | None = None,
                    export_dtype: torch.dtype | None = None, profile: Profile | None = None,
                    progress: bool = True, work: Path | None = None,
                    e2e_batches: list[torch.Tensor] | None = None) -> tuple[CompressionResult, Streams]:
    """Compress every planned linear of `source`'s model layer by layer. -> (result, the final streams: the
    evaluation windows' last hidden states through the dense and the compressed layers, when asked).
    `profile`: what the allocation needs, measured before (measure_profile) and shared by several runs.
    `work`: a folder for what end-to-end refinement keeps on disk (a temporary one when None).
    `e2e_batches`: the batches end-to-end refinement trains on (None: the calibration batches)."""
    export_dtype = export_dtype or source.compute_dtype
    method = get_method(config.method, alpha=config.asvd_alpha, iterations=config.adacomp_iterations,
                        strength=config.adacomp_strength, damping=config.adacomp_damping)
    matrices = list_matrices(source.model, source.arch, config.skip)
    needs = allocation_needs(config.allocation_name) if config.ratio > 0 or config.budget_bytes else frozenset()
    state = resume_state.load() if resume_state is not None else None

    method.prepare(source.model, batches, matrices, source.device)  # whole-model work (FWSVD's Fisher), resident
    calib = capture_inputs(source.model, source.arch, batches, source.device)
    shared_profile = profile is not None
    if not shared_profile:
        profile = own_profile(source, calib, batches, matrices, needs, state, resume_state, progress)
    if profile.uncalibrated:  # experts no calibration token reached: dense, out of the budget's reach
        matrices = [m for m in matrices if m.name not in set(profile.uncalibrated)]
    result = rank_plan(source.model, matrices, profile, needs, config, export_dtype, state)
    profile_state = state["profile"] if planned(state) else {
        "similarity": profile.layer_similarity, "seconds": profile.layer_seconds, "uncalibrated": profile.uncalibrated}
    if not shared_profile:
        profile.spectra = {}  # the plan is made: the spectra are not needed any more

    streams = open_streams(source, calib, config, eval_batches, e2e_batches)
    start, e2e_factors = resume_compression(source, state, resume_state, streams, result, writer)
    if profile_state.get("seconds"):
        result.layer_seconds["profile"] = profile_state["seconds"]
    base_state = {"plan": result.plan, "profile": profile_state}
    compression_pass(source, streams, result.plan, method, config, result, export_dtype, start, writer, resume_state,
                     base_state, progress)
    # the lm_head on the grid too, with what it reads after the last layer; before end-to-end refinement, which
    # then trains through the head as shipped (its teacher's logits come through that head too)
    if config.quantization is not None:
        if streams.eval_dense is not None:
            streams.dense_head = source.model.get_output_embeddings().weight.detach().to("cpu", copy=True)
        result.extra["quantize_head"] = quantize_head_(source.model, source.arch, streams, batches, config.quantization,
                                                       graph_dtype(export_dtype), source.device)
    if config.refine_e2e:
        e2e = EndToEnd(work, resume_state, base_state, e2e_factors, writer)
        refine_end_to_end(source, streams, batches if e2e_batches is None else e2e_batches, eval_batches, config,
                          export_dtype, result, e2e)
    check_complete(result, profile)
    return result, streams


@torch.no_grad()
def compress_(model: nn.Module, batches: list[torch.Tensor], config: CompressionConfig,
              device=None, progress: bool = True, profile: Profile | None = None,
              e2e_batches: list[torch.Tensor] | None = None) -> CompressionResult:
    """Compress a model that is in memory, in place (its decoder layers visit `device` one at a time).
    `e2e_batches`: end-to-end refinement's own batches (None: it trains on `batches`)."""
    model.eval()
    result, _ = compress_source(ResidentSource(model, device), batches, config, profile=profile, progress=progress,
                                e2e_batches=e2e_batches)
    return result
