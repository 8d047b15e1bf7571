"""The PyTorch reference of a quantized graph: the model with exactly the weights the graph holds (the
layer loop's grid where it put one, else what the writer's round-to-nearest gives), the token table as
GatherBlockQuantized returns it, and the linears' inputs rounded to int8 as MatMulNBits does at accuracy
level 4 (exporter/quantize/activations.py). The ONNX stage checks the graph against it."""
from __future__ import annotations

import copy
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn

from ...config import Quantization
from ...model.corrected import grid_linears
from ...model.quantized import scales_of
from ...quantize.activations import add_int8_inputs, int8_linears, remove_int8_inputs
from .embedding import embedding_quantization, round_embedding_, shares_table
from .graph import to_numpy
from .quantize import dequantize, quantize_weight


def round_linear_(module, q: Quantization) -> None:
    """In place: an nn.Linear's weight becomes what the quantized graph holds for it (quantized by the same
    function, dequantized back). A weight the layer loop put on the grid (scales attached) is already that."""
    if scales_of(module) is not None:
        return
    back = dequantize(quantize_weight(to_numpy(module.weight).T, q, np.float32), q).T
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(np.ascontiguousarray(back)).to(module.weight.dtype))


def round_layer_(layer, q: Quantization) -> None:
    """Every nn.Linear the graph quantizes inside one decoder layer (both factors of each low-rank pair included,
    a --correction-rank pair not: it stays float), in place, with the kernel's int8 inputs at accuracy level 4
    (quantize/activations.py)."""
    for module in grid_linears(layer):
        round_linear_(module, q)
        if q.accuracy_level == 4:
            add_int8_inputs(module, q.block_size)


def round_like_export(model, q: Quantization, embedding_bits: int | None = None):
    """A copy of `model` whose linear weights are exactly what the quantized graph holds (lm_head with
    q.head(), the token table as GatherBlockQuantized returns it at `embedding_bits`, the writer's: None the
    lm_head's bits, 0 float), and whose linears round their inputs as the kernel does at accuracy level 4:
    the PyTorch reference of a quantized export. Norms, biases and position tables stay as in the graph."""
    rounded = copy.deepcopy(model)
    head, embedding = rounded.get_output_embeddings(), rounded.get_input_embeddings()
    if head.weight is embedding.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())  # untie: each is rounded at its own bits
    if embedding_bits != 0:
        shared = head if shares_table(rounded.config, q, embedding_bits) else None
        round_embedding_(embedding, embedding_quantization(q, embedding_bits), shared)
    for module in grid_linears(rounded):
        round_linear_(module, q.head() if module is head else q)
    if q.accuracy_level == 4:
        int8_linears(rounded, q.block_size)
    return rounded


def rounded_head(model, q: Quantization, embedding_bits: int | None = None):
    """Context: the model's lm_head and token table carry the rounded weights of the quantized graph (as in
    round_like_export) and the lm_head rounds its inputs as the kernel does; restored on exit, the int8 hooks of the
    streamed layers removed with it. For the streamed reference, whose layers are rounded as they are read
    (round_layer_)."""
    @contextmanager
    def swapped():
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        original, table = head.weight, embedding.weight
        head.weight = nn.Parameter(original.detach().clone(), requires_grad=False)
        embedding.weight = nn.Parameter(table.detach().clone(), requires_grad=False)
        round_linear_(head, q.head())
        if embedding_bits != 0:
            shared = head if shares_table(model.config, q, embedding_bits) else None
            round_embedding_(embedding, embedding_quantization(q, embedding_bits), shared)
        if q.accuracy_level == 4:
            add_int8_inputs(head, q.block_size)
        try:
            yield
        finally:
            head.weight, embedding.weight = original, table
            remove_int8_inputs(model)  # the head's and those the streamed layers got as they were read
    return swapped()
