"""The one transform: compress_(model, batches, config) — in place, torchao-style.

capture layer-0 inputs → (profiling pass, if the allocation needs one) → rank plan →
layer loop: observe → factorize each planned linear → swap in a LowRankLinear.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .allocation import NEEDS_PROFILE, NEEDS_SENSITIVITY, NEEDS_SPECTRA, Matrix, Profile, allocate
from .architectures import Architecture, decoder_layers, matrix_kind, prepare
from .budget import ratio_for_budget
from .calibration.sensitivity import output_gradient_sensitivity
from .calibration.sequential import LayerObservation, capture_layer0_inputs, place_outside_layers, run_layers
from .config import CompressionConfig, default_min_retention
from .linalg import min_truncation_loss, truncation_loss
from .linears import linear_dims, linear_weight
from .lowrank import LowRankLinear, swap_module
from .methods import MatrixInput, get_method

log = logging.getLogger(__name__)


@dataclass
class MatrixRecord:
    rank: int
    loss: float  # ‖WX − W'X‖_F on the calibration statistics the method saw
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


def default_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def layer_home(model, arch, device):
    """Where the decoder layers live when that is not the compute device (a model kept on the host and
    compressed on a GPU): each layer is moved to `device` for its turn and back home after, so only the
    current layer occupies the GPU. None when they already live on `device`."""
    home = next(decoder_layers(model, arch)[0].parameters()).device
    return home if home != torch.device(device) else None


def profile_model(model, arch, inputs, device, progress=True, spectra=True, uncalibrated=None) -> Profile:
    """One pass over the original layers: the whitened spectrum σ(WX) of every linear (unless
    spectra=False) and the input/output similarity of every layer. Keeps only vectors, never X Xᵀ.
    Linears that no calibration token reached (an MoE expert) get no spectrum; their names are added
    to `uncalibrated`."""
    profile = Profile()

    def visit(obs: LayerObservation):
        profile.layer_similarity.append(obs.input_similarity)
        for group, stats in zip(arch.groups_of(obs.index), obs.stats):
            if stats.count == 0 and uncalibrated is not None:
                uncalibrated.update(f"{arch.layers}.{obs.index}.{path}" for path in group.linears)
            if not spectra or stats.count == 0:
                continue
            for path in group.linears:
                name = f"{arch.layers}.{obs.index}.{path}"
                w = linear_weight(obs.layer.get_submodule(path)).detach().to(torch.float64)
                profile.spectra[name] = MatrixInput(name, w, stats).whitened.s.cpu()

    run_layers(model, arch, inputs, visit, device, offload=layer_home(model, arch, device),
               progress=(lambda it: tqdm(it, desc="profile", unit="layer")) if progress else None)
    return profile


@torch.no_grad()
def compress_(model: nn.Module, batches: list[torch.Tensor], config: CompressionConfig,
              device=None, progress: bool = True) -> CompressionResult:
    arch = prepare(model)  # discovery; MoE experts become per-expert linears (an equivalent model)
    device = torch.device(device) if device is not None else default_device(model)
    model.eval()
    place_outside_layers(model, arch, device)
    method = get_method(config.method, alpha=config.asvd_alpha, iterations=config.adacomp_iterations,
                        strength=config.adacomp_strength)
    matrices = list_matrices(model, arch, config.skip)
    method.prepare(model, batches, matrices, device)

    inputs = capture_layer0_inputs(model, arch, batches, device)
    allocation = config.allocation_name
    uncalibrated: set[str] = set()  # experts no calibration token was routed to: kept dense, reported
    profile = (profile_model(model, arch, inputs, device, progress, spectra=allocation in NEEDS_SPECTRA,
                             uncalibrated=uncalibrated)
               if allocation in NEEDS_PROFILE else None)
    matrices = [m for m in matrices if m.name not in uncalibrated]
    if allocation in NEEDS_SENSITIVITY:
        profile.sensitivity = output_gradient_sensitivity(model, batches, matrices, device)
    ratio = config.ratio if config.budget_bytes is None else ratio_for_budget(model, matrices, config.budget_bytes)
    min_retention = config.min_retention if config.min_retention is not None else default_min_retention(ratio)
    plan = allocate(allocation, matrices, profile, ratio, min_rank=config.min_rank, min_retention=min_retention)
    result = CompressionResult(config.method, allocation, ratio, plan, matrices)
    if allocation == "adacr":
        result.extra["adacr"] = {"min_retention": min_retention}
    if profile is not None:
        result.layer_similarity = profile.layer_similarity
    similarity = []

    def visit(obs: LayerObservation):
        similarity.append(obs.input_similarity)
        for group, stats in zip(arch.groups_of(obs.index), obs.stats):
            for path in group.linears:
                name = f"{arch.layers}.{obs.index}.{path}"
                if name not in plan:
                    continue
                if stats.count == 0:
                    uncalibrated.add(name)
                    del plan[name]
                    continue
                linear = obs.layer.get_submodule(path)
                w = linear_weight(linear).detach().to(torch.float64)
                mi = MatrixInput(name, w, stats)
                rank = plan[name]
                try:
                    up, down = method.factorize(mi, rank)
                except Exception as exc:  # a layer that fails to factorize is an error, never skipped
                    raise RuntimeError(f"{config.method} failed to factorize {name} at rank {rank}: {exc}") from exc
                if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
                    raise FloatingPointError(f"{config.method} produced non-finite factors for {name}")
                result.records[name] = MatrixRecord(
                    rank, truncation_loss(w, up @ down, stats.whitening), min_truncation_loss(mi.whitened.s, rank),
                    tuple(w.shape))
                method.report(name, mi, up, down, result.extra)
                swap_module(obs.layer, path, LowRankLinear.from_factors(
                    up, down, linear.bias, dtype=linear.weight.dtype, device=linear.weight.device))

    needs = method.needs
    run_layers(model, arch, inputs, visit, device, propagate=config.propagation,
               need_abs_mean="abs_mean" in needs, need_cross="cross" in needs,
               offload=layer_home(model, arch, device),
               progress=(lambda it: tqdm(it, desc=f"compress ({config.method})", unit="layer")) if progress else None)
    if not result.layer_similarity:
        result.layer_similarity = similarity
    if uncalibrated:
        log.warning("%d expert linear(s) received no calibration token and stay dense, e.g. %s",
                    len(uncalibrated), sorted(uncalibrated)[0])
        result.extra["uncalibrated_experts"] = sorted(uncalibrated)
    missing = set(plan) - set(result.records)
    if missing:
        raise RuntimeError(f"{len(missing)} planned modules were never factorized, e.g. {sorted(missing)[0]}")
    return result
