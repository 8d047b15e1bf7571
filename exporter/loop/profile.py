"""The profile pass: one pass over the original layers, before any matrix is compressed, for what the
allocations read (plan/profile.py): each layer's input/output similarity and, when asked, the spectrum σ(WX)
of every linear."""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from .. import plan as allocation
from ..factorize.base import MatrixInput
from ..load.resident import ResidentSource
from ..load.source import LayerSource
from ..model.activations import Activations
from ..model.candidates import list_matrices
from ..model.layer_inputs import capture_inputs
from ..model.linears import linear_weight
from ..output.resume_state import ResumeState
from ..plan.profile import Profile
from .observe import linears_with_stats, observe
from .walk import layer_by_layer

# The profile pass's spectra only feed the allocations, which read tail sums of σ(WX)²: float32 products and
# eigenvalues keep those within 1e-4 wherever the tail holds 1e-3 of ‖WX‖² (tests/test_truncation_math.py)
# and take less time on a CPU (docs/scale.md, "Measured here"). The factorization, its loss and its minimum
# stay float64.
PROFILE_DTYPE = torch.float32


def profile_pass(source: LayerSource, calib: Activations, needs: frozenset[str], profile: Profile,
                 start: int = 0, resume_state: ResumeState | None = None, progress: bool = True) -> Profile:
    """One pass over the original layers: the input/output similarity of every layer and, when asked,
    the spectrum σ(WX) of every linear (eigenvalues only; keeps vectors, never X Xᵀ). Linears no
    calibration token reached (an MoE expert) get no spectrum and are listed in profile.uncalibrated."""
    arch = source.arch
    for i, layer in layer_by_layer(source, start, "profile" if progress else None):
        began = time.perf_counter()
        # adaCR needs only the layer similarities (and which linears the data reached): no X Xᵀ then
        obs = observe(i, layer, arch, calib, source.device, need_moments="spectra" in needs)
        profile.layer_similarity.append(obs.input_similarity)
        for name, _, linear, stats in linears_with_stats(arch, i, layer, obs):
            if stats.count == 0:
                profile.uncalibrated.append(name)
            elif "spectra" in needs:
                w = linear_weight(linear).detach().to(PROFILE_DTYPE)
                profile.spectra[name] = MatrixInput(name, w, stats).spectrum.to(torch.float64).cpu()
        del obs
        profile.layer_seconds.append(time.perf_counter() - began)
        if resume_state is not None:
            resume_state.save({"pass": "profile", "next": i + 1, "similarity": profile.layer_similarity,
                             "seconds": profile.layer_seconds, "uncalibrated": profile.uncalibrated}, {"profile": calib},
                            {f"spectrum.{k}": v for k, v in profile.spectra.items()})
    return profile


@torch.no_grad()
def measure_profile(model: nn.Module, batches: list[torch.Tensor], allocations: list[str], device=None,
                    progress: bool = True) -> Profile:
    """What the given allocations need from the original model (layer similarities, spectra, sensitivity),
    measured once for a resident model, to pass to several compress_ calls (benchmarks)."""
    source = ResidentSource(model, device)
    needs = frozenset().union(*(allocation.needs(a) for a in allocations))
    profile = Profile()
    calib = capture_inputs(model, source.arch, batches, source.device)
    if "sensitivity" in needs:
        from ..plan.sensitivity import output_gradient_sensitivity
        profile.sensitivity = output_gradient_sensitivity(source, calib, batches, list_matrices(model, source.arch))
    if needs - {"sensitivity"}:
        profile_pass(source, calib, needs, profile, progress=progress)
    return profile
