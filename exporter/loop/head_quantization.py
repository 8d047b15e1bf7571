"""--quantize with GPTQ: the lm_head on its grid too, after the last layer, with the Hessian of what it reads
(the final norm's output on the calibration stream the loop carried through the compressed layers).

A head tied to the embedding table stays tied: the one table goes on the grid chosen for the logits (the
embedding's lookups read the same values), and the graph packs it once for both, GatherBlockQuantized and
MatMulNBits reading one initializer (exporter/onnx/fused/embedding.py): the table is stored at the head's bits
instead of in float plus a second, quantized copy for the head.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from ..factorize.stats import InputStats
from ..model.architecture import Architecture
from ..model.head import head_forward
from ..quantize.layer import quantize_linear_
from .streams import Streams


@torch.no_grad()
def head_hessian(model: nn.Module, arch: Architecture, streams: Streams, batches: list[torch.Tensor],
                 device) -> InputStats:
    """X Xᵀ of the lm_head's input over the calibration batches (summed across ranks under torchrun)."""
    head = model.get_output_embeddings()
    stats = InputStats(head.in_features, device, keep_tokens=False)
    stream = streams.calib_compressed or streams.calib

    def record(_module, args):
        stats.add(args[0].reshape(-1, args[0].shape[-1]))

    handle = head.register_forward_pre_hook(record)
    try:
        for hidden, ids in zip(stream.hidden, batches):
            head_forward(model, arch, hidden, ids, device)
    finally:
        handle.remove()
    stats.reduce_across_ranks()
    return stats


def quantize_head_(model: nn.Module, arch: Architecture, streams: Streams, batches: list[torch.Tensor], q,
                   scale_dtype: torch.dtype, device) -> dict:
    """In place: the lm_head's weight on the grid of q.head() (GPTQ); a tied embedding table with it. -> its
    record for the report."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"--quantize writes the lm_head as MatMulNBits, but it is {type(head).__name__}")
    stats = head_hessian(model, arch, streams, batches, device)
    record = {"tied": head.weight is model.get_input_embeddings().weight}
    record.update(quantize_linear_(head, stats.gram, q.head(), scale_dtype))
    return record


@contextmanager
def head_weight(model: nn.Module, weight: torch.Tensor | None):
    """The lm_head computes with `weight` (the dense model's, kept before its quantization) for the duration of
    the block; the quantized one (tied to the table where it was) is back on exit. None: the head as it is."""
    head = model.get_output_embeddings()
    if weight is None:
        yield
        return
    own = head.weight
    head.weight = nn.Parameter(weight.to(own.device, own.dtype), requires_grad=False)
    try:
        yield
    finally:
        head.weight = own
