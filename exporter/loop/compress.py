"""The one transform: compress_(model, batches, config) — in place, torchao-style — and compress_source,
the same on any layer source (a resident model, or a checkpoint streamed one decoder layer at a time).

capture layer-0 inputs → (profile pass, if the allocation needs one) → rank plan → compression pass
(loop/layer.py: per layer observe → factorize each planned linear → swap in a LowRankLinear → carry the
activations on, and, when asked, the evaluation streams, the shard writer and the resume state) →
(end-to-end refinement). A resume state saved after every layer lets a killed run continue where it stopped.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..config import CompressionConfig, default_min_retention
from ..factorize.base import get_method
from ..load.resident import ResidentSource
from ..load.source import LayerSource
from ..model.activations import Activations, advance
from ..model.architecture import decoder_layers
from ..model.candidates import Matrix, list_matrices
from ..model.layer_inputs import capture_inputs
from ..model.lowrank import build_skeleton
from ..output.resume_state import ResumeState
from ..plan import allocate
from ..plan import needs as allocation_needs
from ..plan.budget import ratio_for_budget
from ..plan.profile import Profile
from ..plan.rounding import round_ranks
from ..refine.e2e import refine_model
from .layer import compression_pass
from .profile import profile_pass
from .result import CompressionResult, restore_result
from .streams import Streams
from .walk import layer_by_layer

log = logging.getLogger(__name__)


def own_profile(source: LayerSource, calib: Activations, batches: list[torch.Tensor], matrices: list[Matrix],
                needs: frozenset[str], state: dict | None, resume_state: ResumeState | None,
                progress: bool) -> Profile:
    """What the allocation needs, measured on this run's calibration data: the sensitivity backward, and the
    profile pass (continued from the resume state when a killed run stopped inside it); when the killed run
    was already compressing, what its profile measured comes from the resume state."""
    profile = Profile()
    if "sensitivity" in needs:
        from ..plan.sensitivity import output_gradient_sensitivity
        profile.sensitivity = output_gradient_sensitivity(source.model, batches, matrices, source.device)
    if needs - {"sensitivity"} and (state is None or state["pass"] == "profile"):
        start, running = 0, calib.copy()
        if state is not None:
            start = state["next"]
            profile.layer_similarity, profile.layer_seconds = list(state["similarity"]), list(state["seconds"])
            profile.uncalibrated = list(state["uncalibrated"])
            extra = resume_state.restore(state, {"profile": running})
            profile.spectra = {k[len("spectrum."):]: v for k, v in extra.items() if k.startswith("spectrum.")}
        profile_pass(source, running, needs, profile, start, resume_state, progress)
    elif state is not None and state["pass"] == "compress":
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
    if state is not None and state["pass"] == "compress":
        plan = state["plan"]
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
                 eval_batches: list[torch.Tensor] | None) -> Streams:
    """The streams the compression pass carries: calibration through the original layers, through the
    compressed ones (when the method or refinement propagates them), and the evaluation windows through both."""
    streams = Streams(calib)
    if config.propagation == "compressed":
        streams.calib_compressed = calib.copy()
    if eval_batches is not None:
        streams.eval_dense = capture_inputs(source.model, source.arch, eval_batches, source.device)
        streams.eval_compressed = streams.eval_dense.copy()
    return streams


def resume_compression(source: LayerSource, state: dict | None, resume_state: ResumeState | None, streams: Streams,
                       result: CompressionResult, writer) -> int:
    """The first layer the compression pass runs: 0, or the one after the killed run's last finished layer,
    whose streams, measurements and written layers are restored. """
    if state is None or state["pass"] != "compress":
        return 0
    start = state["next"]
    resume_state.restore(state, streams.named())
    restore_result(result, state)
    if writer is not None:
        writer.resume(start)
        restore_written_layers(source, result.plan, writer, start)
    return start


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
    """--refine e2e after the layer loop (exporter/refine/e2e.py). The loop has written each layer and carried
    the evaluation windows through it: when refinement changed the factors, both are done again."""
    if source.streamed:  # run.whole_model_reason loads such a run whole, or refuses it
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
        for i, layer in layer_by_layer(source):
            advance(i, layer, streams.eval_compressed, source.device)


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
                    progress: bool = True) -> tuple[CompressionResult, Streams]:
    """Compress every planned linear of `source`'s model layer by layer. -> (result, the final streams: the
    evaluation windows' last hidden states through the dense and the compressed layers, when asked).
    `profile`: what the allocation needs, measured before (measure_profile) and shared by several runs."""
    export_dtype = export_dtype or source.compute_dtype
    method = get_method(config.method, alpha=config.asvd_alpha, iterations=config.adacomp_iterations,
                        strength=config.adacomp_strength, damping=config.adacomp_damping)
    matrices = list_matrices(source.model, source.arch, config.skip)
    needs = allocation_needs(config.allocation_name)
    state = resume_state.load() if resume_state is not None else None

    method.prepare(source.model, batches, matrices, source.device)  # whole-model work (FWSVD's Fisher), resident
    calib = capture_inputs(source.model, source.arch, batches, source.device)
    shared_profile = profile is not None
    if not shared_profile:
        profile = own_profile(source, calib, batches, matrices, needs, state, resume_state, progress)
    if profile.uncalibrated:  # experts no calibration token reached: dense, out of the budget's reach
        matrices = [m for m in matrices if m.name not in set(profile.uncalibrated)]
    result = rank_plan(source.model, matrices, profile, needs, config, export_dtype, state)
    profile_state = state["profile"] if state is not None and state["pass"] == "compress" else {
        "similarity": profile.layer_similarity, "seconds": profile.layer_seconds, "uncalibrated": profile.uncalibrated}
    if not shared_profile:
        profile.spectra = {}  # the plan is made: the spectra are not needed any more

    streams = open_streams(source, calib, config, eval_batches)
    start = resume_compression(source, state, resume_state, streams, result, writer)
    if profile_state.get("seconds"):
        result.layer_seconds["profile"] = profile_state["seconds"]
    compression_pass(source, streams, result.plan, method, config, result, export_dtype, start, writer, resume_state,
                     {"plan": result.plan, "profile": profile_state}, progress)
    if config.refine_e2e:
        refine_end_to_end(source, streams, batches, eval_batches, config, export_dtype, result, writer)
    check_complete(result, profile)
    return result, streams


@torch.no_grad()
def compress_(model: nn.Module, batches: list[torch.Tensor], config: CompressionConfig,
              device=None, progress: bool = True, profile: Profile | None = None) -> CompressionResult:
    """Compress a model that is in memory, in place (its decoder layers visit `device` one at a time)."""
    model.eval()
    result, _ = compress_source(ResidentSource(model, device), batches, config, profile=profile, progress=progress)
    return result
