"""FusedDecoderWriter: the decoder-with-past graph written directly from the weights, one decoder layer
at a time, with ONNX Runtime's fused ops.

Streaming use (what the layer loop calls; memory stays bounded by one layer):

    writer = FusedDecoderWriter(config, folder, "float32", quantization=None)
    writer.add_outside(model)            # embeddings, final norm, lm_head: once, before or after the layers
    for i, layer in enumerate(layers):   # in order 0..L-1, each layer materialised only for this call
        writer.add_layer(i, layer)       # its weights are on disk when this returns; keep nothing of it
    writer.finish(tokenizer, generation_config)   # model.onnx + config/tokenizer/genai_config.json

add_layer writes the layer's initializers to model.onnx_data immediately and keeps only references
(ir.ExternalTensor) and nodes. Layers must come in order (the residual stream runs through them); the
outside parts may come at any time before finish() (their nodes meet the layers through placeholders,
and the graph is sorted at the end). add_outside(model) reads only the modules outside the decoder layers
(add_embeddings/add_head take them one by one).

The graph keeps the plain export's interface (Optimum names): input_ids, attention_mask, position_ids,
past_key_values.{i}.key/value [batch, kv_heads, past, head_size] → logits, present.{i}.key/value.
GroupQueryAttention reads the attention mask as lengths (seqlens_k = Σmask − 1, total = mask length), so
the mask must be all ones over the valid tokens at the left (unpadded, or right-padded as
onnxruntime-genai feeds it); a left-padded batch is not what this graph computes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
import torch.nn as nn

from graph_rewrite.tags import MODULE_KEY

from ...config import Quantization
from ..files import GRAPH_KEY, MODEL_FILE, QUANTIZE_KEY, write_onnx_sidecars
from .attention import AttentionInputs, AttentionShape, attention
from .embedding import QuantizedEmbedding
from .family import activation_of, family_of
from .graph import GraphBuilder, to_numpy
from .linear import Precision, linear
from .mlp import mlp
from .norms import normalize, skip_normalize, write_norm
from .rotary import rotary_caches
from .weight_file import WeightFile

DTYPES = {"float32": np.float32, "float16": np.float16, torch.float32: np.float32, torch.float16: np.float16}
ONNX_FLOAT = {np.float32: ir.DataType.FLOAT, np.float16: ir.DataType.FLOAT16}


def tensor_input(name: str, dtype: ir.DataType, dims: list) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape(dims), type=ir.TensorType(dtype))


class FusedDecoderWriter:
    def __init__(self, config, folder: str | Path, dtype: str | torch.dtype = "float32",
                 quantization: Quantization | None = None, opset: int = 18, embedding_bits: int | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"the fused ONNX graph supports --dtype float32 or float16, not {dtype}")
        self.config, self.family = config, family_of(config)
        self.folder = Path(folder)
        self.precision = Precision(DTYPES[dtype], quantization)
        self.head_precision = Precision(DTYPES[dtype], None if quantization is None else quantization.head())
        self.num_layers = config.num_hidden_layers
        self.shape = AttentionShape.of(config)
        self.weights = WeightFile(self.folder)
        self.b = GraphBuilder(self.weights, opset)
        # Quantized, the token table is GatherBlockQuantized's at `embedding_bits` (None: the lm_head's; 0: it
        # stays float), one packed table with a tied lm_head at the same bits (embedding.py)
        self.embedding = None if quantization is None or embedding_bits == 0 else QuantizedEmbedding(
            self.b, config, quantization, self.precision.dtype, embedding_bits, self.family.embed)
        self._make_io()
        self._make_attention_inputs()
        # Placeholders joining parts that may be added in any order.
        self.token_embeds = ir.Value(name="/model/embed_tokens/output_0")
        self.position_embeds = ir.Value(name="/model/embed_positions/output_0") if self.family.positions else None
        self.final_hidden = ir.Value(name="/model/final_norm/output_0")
        self._next_layer = 0
        self._residual = self._pending = self._pending_bias = None
        self._final_norm = self._table = None
        self._has_embeddings = self._has_head = False

    # ------------------------------------------------------------------ graph interface

    def _make_io(self) -> None:
        float_type = ONNX_FLOAT[self.precision.dtype]
        kv = [self.shape.kv_heads, self.shape.head_size]
        self.inputs = [tensor_input("input_ids", ir.DataType.INT64, ["batch_size", "sequence_length"]),
                       tensor_input("attention_mask", ir.DataType.INT64, ["batch_size", "total_sequence_length"]),
                       tensor_input("position_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])]
        self.past, self.present = [], []
        for i in range(self.num_layers):
            self.past.append(tuple(tensor_input(f"past_key_values.{i}.{kv_name}", float_type,
                                                ["batch_size", kv[0], "past_sequence_length", kv[1]])
                                   for kv_name in ("key", "value")))
            self.present.append(tuple(tensor_input(f"present.{i}.{kv_name}", float_type,
                                                   ["batch_size", kv[0], "total_sequence_length", kv[1]])
                                      for kv_name in ("key", "value")))
        self.inputs += [t for pair in self.past for t in pair]

    def _make_attention_inputs(self) -> None:
        """seqlens_k = Σ attention_mask − 1 (int32 [batch]) and total length = its width (int32 scalar)."""
        b, mask = self.b, self.inputs[1]
        valid = b.op("ReduceSum", [mask, b.constant("/model/mask/axis_1", np.array([1], np.int64))],
                     "/model/mask/ReduceSum", {"keepdims": 0})
        valid_minus_one = b.op("Sub", [valid, b.constant("/model/mask/one", np.array(1, np.int64))], "/model/mask/Sub")
        seqlens_k = b.op("Cast", [valid_minus_one], "/model/mask/seqlens_k", {"to": ir.DataType.INT32})
        width = b.op("Gather", [b.op("Shape", [mask], "/model/mask/Shape"),
                                b.constant("/model/mask/index_1", np.array(1, np.int64))], "/model/mask/Gather",
                     {"axis": 0})
        total_length = b.op("Cast", [width], "/model/mask/total_length", {"to": ir.DataType.INT32})
        cos = sin = None
        if self.family.rotary:
            cos_cache, sin_cache = rotary_caches(self.config, self.precision.dtype)
            cos, sin = b.weight("model.rotary.cos_cache", cos_cache), b.weight("model.rotary.sin_cache", sin_cache)
        self.attention_inputs = AttentionInputs(self.inputs[2], seqlens_k, total_length, cos, sin)

    # ------------------------------------------------------------------ the parts

    def add_embeddings(self, embed_tokens: nn.Embedding, embed_positions: nn.Embedding | None = None) -> None:
        if self._has_embeddings:
            raise RuntimeError("the embeddings were already added")
        if (embed_positions is None) != (self.position_embeds is None):
            raise ValueError(f"{self.config.model_type}: position table "
                             f"{'missing' if embed_positions is None else 'not expected'}")
        b, p = self.b, self.precision
        if self.embedding is not None:
            self.embedding.gather(embed_tokens.weight, self.inputs[0], out=self.token_embeds)
        else:
            table = self._token_table(embed_tokens.weight)
            b.op("Gather", [table, self.inputs[0]], "/model/embed_tokens/Gather", outputs=[self.token_embeds])
        if embed_positions is not None:
            positions = b.weight(f"{self.family.positions}.weight", _numpy(embed_positions.weight, p.dtype))
            index = b.op("Add", [self.inputs[2], b.constant("/model/embed_positions/offset",
                                                            np.array(self.family.position_offset, np.int64))],
                         "/model/embed_positions/Add")
            b.op("Gather", [positions, index], "/model/embed_positions/Gather", outputs=[self.position_embeds])
        self._has_embeddings = True

    def add_head(self, final_norm: nn.Module, lm_head: nn.Linear) -> None:
        if self._has_head:
            raise RuntimeError("the final norm and lm_head were already added")
        self._final_norm = write_norm(self.b, final_norm, self.family.final_norm, self.family.norm, self.precision)
        tied = getattr(self.config, "tie_word_embeddings", False) and self.head_precision.quantization is None
        shared = None if self.embedding is None else self.embedding.head(lm_head, self.final_hidden)
        self.logits = (self._tied_head(lm_head) if tied else shared if shared is not None else
                       linear(self.b, lm_head, "lm_head", self.final_hidden, self.head_precision))
        self.logits.name = "logits"  # the graph output, under its interface name
        self.logits.type = ir.TensorType(ONNX_FLOAT[self.precision.dtype])
        self.logits.shape = ir.Shape(["batch_size", "sequence_length", self.config.vocab_size])
        self._has_head = True

    def _token_table(self, weight: torch.Tensor) -> ir.Value:
        """The embedding table [vocab, hidden], written once: a tied lm_head reads the same one."""
        if self._table is None:
            self._table = self.b.weight(f"{self.family.embed}.weight", _numpy(weight, self.precision.dtype))
        elif tuple(self._table.shape) != tuple(weight.shape):
            raise ValueError(f"tied lm_head {tuple(weight.shape)} does not match the embedding table {self._table.shape}")
        return self._table

    def _tied_head(self, lm_head: nn.Linear) -> ir.Value:
        """logits = x·Eᵀ on the embedding table itself (Gemm transB=1 on [batch·seq, hidden]), so a tied
        float table is stored once."""
        b, hidden = self.b, self.config.hidden_size
        flat = b.op("Reshape", [self.final_hidden, b.constant("/lm_head/shape_2d", np.array([-1, hidden], np.int64))],
                    "/lm_head/Reshape")
        bias = lm_head.bias
        inputs = [flat, self._token_table(lm_head.weight)] + ([] if bias is None else [
            b.weight("lm_head.bias", _numpy(bias, self.precision.dtype))])
        scores = b.op("Gemm", inputs, "/lm_head/Gemm", {"transB": 1}, metadata={MODULE_KEY: "lm_head"})
        shape = b.op("Concat", [b.op("Shape", [self.inputs[0]], "/lm_head/Shape"),
                                b.constant("/lm_head/vocab", np.array([self.config.vocab_size], np.int64))],
                     "/lm_head/Concat", {"axis": 0})
        return b.op("Reshape", [scores, shape], "/lm_head/Reshape_3d")

    def add_outside(self, model: nn.Module) -> None:
        """Embeddings, final norm and lm_head of a causal-LM model (only those modules are read)."""
        positions = model.get_submodule(self.family.positions) if self.family.positions else None
        # the head first: a packed table it shares with the embedding takes its grid, when it has one
        self.add_head(model.get_submodule(self.family.final_norm), model.get_output_embeddings())
        self.add_embeddings(model.get_submodule(self.family.embed), positions)

    def add_layer(self, index: int, layer: nn.Module) -> None:
        """Decoder layer `index` (its nn.Linear / LowRankLinear modules as they are now): nodes added,
        weights written to the data file before this returns."""
        if index != self._next_layer:
            raise ValueError(f"decoder layers must be added in order: expected layer {self._next_layer}, got {index}")
        if index >= self.num_layers:
            raise ValueError(f"layer {index} is beyond the config's {self.num_layers} layers")
        b, p, fam = self.b, self.precision, self.family
        prefix = f"{self.family.layers}.{index}"
        norm_attn = write_norm(b, layer.get_submodule(fam.norm_attn), f"{prefix}.{fam.norm_attn}", fam.norm, p)
        if index > 0:
            hidden, residual = skip_normalize(b, self._residual, self._pending, self._pending_bias, norm_attn)
        elif self.position_embeds is not None:  # token + position embeddings, summed by the skip norm
            hidden, residual = skip_normalize(b, self.token_embeds, self.position_embeds, None, norm_attn)
        else:
            hidden, residual = normalize(b, self.token_embeds, norm_attn), self.token_embeds
        attn_out, attn_bias = attention(b, layer, prefix, hidden, self.past[index], self.present[index], self.shape,
                                        self.attention_inputs, fam, p)
        norm_mlp = write_norm(b, layer.get_submodule(fam.norm_mlp), f"{prefix}.{fam.norm_mlp}", fam.norm, p)
        hidden, residual = skip_normalize(b, residual, attn_out, attn_bias, norm_mlp)
        self._pending, self._pending_bias = mlp(b, layer, prefix, hidden, activation_of(self.config), fam, p)
        self._residual = residual
        self._next_layer += 1

    # ------------------------------------------------------------------ the end

    def finish(self, tokenizer=None, generation_config=None) -> Path:
        """Close the graph (final norm → lm_head → logits), write model.onnx and the sidecar files.
        -> the model.onnx path."""
        parts = {"embeddings": self._has_embeddings, "final norm and lm_head": self._has_head,
                 f"layers {self._next_layer}..{self.num_layers - 1}": self._next_layer == self.num_layers}
        missing = [part for part, added in parts.items() if not added]
        if missing:
            raise RuntimeError(f"cannot finish the ONNX model: {', '.join(missing)} not added")
        skip_normalize(self.b, self._residual, self._pending, self._pending_bias, self._final_norm,
                       out=self.final_hidden)
        self.weights.close()
        outputs = [self.logits] + [t for pair in self.present for t in pair]
        model = ir.Model(self.b.graph(self.inputs, outputs), ir_version=10, producer_name="svd-export")
        model.metadata_props[GRAPH_KEY] = "fused"
        q = self.precision.quantization
        model.metadata_props[QUANTIZE_KEY] = "none" if q is None else \
            f"{q.name} block {q.block_size} {'symmetric' if q.symmetric else 'asymmetric'}"
        path = self.folder / MODEL_FILE
        ir.save(model, path)  # the weights are already external: saved as the references they are
        self._write_sidecars(tokenizer, generation_config)
        return path

    def _write_sidecars(self, tokenizer, generation_config) -> None:
        # GroupQueryAttention may write the present into the past buffer: genai then keeps one buffer
        write_onnx_sidecars(self.config, generation_config, tokenizer, self.folder, self.family.genai_type, True,
                            share_buffer=True)


def _numpy(t: torch.Tensor, dtype) -> np.ndarray:
    return to_numpy(t).astype(dtype)
