"""End-to-end refinement (`--refine e2e`, or `block+e2e` after block refinement): once every decoder layer is
compressed, gradient descent on all the model's low-rank factors at once so that the compressed model's
next-token distribution matches the dense model's on the calibration batches:

    minimise  (1/N) Σ_tokens KL(p_dense ‖ p_θ)        θ = every up/down of every LowRankLinear

The dense model is never held. The layer loop has carried the calibration batches through the dense layers
(the original stream), and the final norm and lm_head are not compressed, so p_dense is the model's own head
applied to that stream's last hidden states: written once to a file (Teacher) and read back a batch at a time.

The student is the compressed model: its frozen weights in the compute dtype, its factors in float32 (the
master copies; on a half-precision device the matmuls run in the compute dtype under autocast), each decoder
layer checkpointed (its activations are recomputed in the backward pass: only the layers' inputs are kept),
and the KL computed over chunks of positions, each chunk's backward run at once, so that one chunk's logits
exist at a time. What that holds in memory: refine/memory.py.

The optimisation is refine/optimise.py's loop, as for block refinement: Adam, held-out calibration batches for
early stopping, the factors it starts from restored exactly unless both the training and the held-out
objective went down.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

from ..config import Refinement
from ..model.activations import Activations, run_batch
from ..model.architecture import Architecture, decoder_layers
from ..model.head import head_forward
from .optimise import optimise, split_batches

KL_CHUNK = 256  # positions whose logits exist at once (batch × KL_CHUNK × vocab float32, about four times)


class Teacher:
    """The dense model's final hidden states of the calibration batches, written once to `folder` and read back
    one batch at a time (memory-mapped), so that the stream that carried them can be freed."""

    FILE = "teacher.safetensors"

    def __init__(self, folder: str | Path, hidden: list[torch.Tensor]):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.path = Path(folder) / self.FILE
        save_file({str(b): h.contiguous() for b, h in enumerate(hidden)}, str(self.path))

    def __getitem__(self, b: int) -> torch.Tensor:
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(str(b))


def student_hidden(layers: nn.ModuleList, inputs: Activations, b: int, device,
                   checkpointed: bool = True) -> torch.Tensor:
    """The compressed model's last decoder-layer output on batch `b` (`layers`: its decoder layers; `inputs`:
    decoder layer 0's inputs and every layer's keyword arguments), each layer checkpointed while gradients are
    recorded."""
    hidden = inputs.hidden[b].to(device)
    for i, layer in enumerate(layers):
        kwargs = inputs.kwargs_for(i)[b]
        if checkpointed and torch.is_grad_enabled():
            hidden = checkpoint(run_batch, layer, hidden, kwargs, device, use_reentrant=False)
        else:
            hidden = run_batch(layer, hidden, kwargs, device)
    return hidden


def chunked_kl(model: nn.Module, arch: Architecture, ids: torch.Tensor, final: torch.Tensor, teacher: torch.Tensor,
               device, chunk: int = KL_CHUNK) -> tuple[torch.Tensor, int]:
    """(Σ over the batch's tokens of KL(p_teacher ‖ p_model), number of tokens), the logits made `chunk`
    positions at a time. `final`: the model's last decoder-layer output; `teacher`: the dense model's. While
    gradients are recorded each chunk's backward runs here (into a leaf copy of `final`), and the returned sum
    carries their total as its gradient with respect to `final`: its own backward runs through the layers once."""
    leaf = final.detach().requires_grad_(torch.is_grad_enabled())
    total = torch.zeros((), dtype=torch.float64, device=final.device)
    for start in range(0, ids.shape[1], chunk):
        part = slice(start, start + chunk)
        with torch.no_grad():
            target = F.log_softmax(head_forward(model, arch, teacher[:, part], ids[:, part], device).float(), dim=-1)
        student = F.log_softmax(head_forward(model, arch, leaf[:, part], ids[:, part], device).float(), dim=-1)
        kl = F.kl_div(student, target, log_target=True, reduction="sum")
        if leaf.requires_grad:
            kl.backward()
        total += kl.detach()
    if not leaf.requires_grad:
        return total, ids.numel()
    link = (final * leaf.grad.to(final.dtype)).sum()  # its gradient w.r.t. `final` is the chunks' gradient
    return total + (link - link.detach()), ids.numel()


class Student(nn.Module):
    """The compressed model as refine/optimise.py calls it (and DistributedDataParallel wraps it under
    torchrun): batch index → its last decoder-layer output. (Sharded: refine/sharded.py's ShardedStudent.)"""

    def __init__(self, model: nn.Module, arch: Architecture, inputs: Activations, device):
        super().__init__()
        self.model = model
        self._rest = (arch, inputs, torch.device(device))  # not modules: kept out of the module tree

    def forward(self, b: int) -> torch.Tensor:
        arch, inputs, device = self._rest
        return student_hidden(decoder_layers(self.model, arch), inputs, b, device)


def refine_model(model: nn.Module, arch: Architecture, batches: list[torch.Tensor], inputs: Activations,
                 teacher: Teacher, settings: Refinement, device, export_dtype: torch.dtype,
                 compute_dtype: torch.dtype, chunk: int = KL_CHUNK, student: nn.Module | None = None) -> dict:
    """Refine every factor of `model` in place (see the module docstring). `inputs`: decoder layer 0's inputs
    and the layers' keyword arguments for `batches`; `teacher[b]`: the dense model's last hidden states on
    `batches[b]`; every decoder layer of `model` is on `device`. `student`: the sharded student
    (refine/sharded.py) refined in its place, `model` lending it its head. -> the report entry."""
    train, held = split_batches(len(batches), settings.holdout)
    device = torch.device(device)
    half = compute_dtype != torch.float32

    def error(student: nn.Module, b: int) -> tuple[torch.Tensor, int]:
        with torch.autocast(device.type, dtype=compute_dtype, enabled=half):
            return chunked_kl(model, arch, batches[b], student(b), teacher[b].to(device), device, chunk)
    forward = Student(model, arch, inputs, device) if student is None else student
    entry = optimise(model if student is None else student, error, train, held, settings,
                     seed=len(decoder_layers(model, arch)), export_dtype=export_dtype, factors_only=True,
                     forward=forward)
    return {**entry, "objective": "KL(dense || compressed) per token",
            "matrix_losses": "layers.*.loss are of the factors before end-to-end refinement"}
