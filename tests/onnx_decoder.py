"""Test helper: export a tiny Hugging Face decoder with a flat KV cache under Optimum's names (the
contract of the ONNX export: input_ids, attention_mask, position_ids, past_key_values.{i}.key|value ->
logits, present.{i}.key|value), with torch.onnx.export(dynamo=True) as in /work/shared/notes/onnx.md.
The throughput tests use it so that they do not depend on the exporter's own module."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import DynamicCache


class FlatCacheDecoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.layers = model, model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers[: self.layers] for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def export_decoder(model, folder: Path) -> Path:
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads, head_dim = getattr(cfg, "num_key_value_heads", None) or heads, cfg.hidden_size // heads
    batch, new, past_len = 2, 3, 4  # every dynamic dimension's example >= 2, or torch.export freezes it
    past = [torch.randn(batch, kv_heads, past_len, head_dim) for _ in range(2 * cfg.num_hidden_layers)]
    args = (torch.randint(0, cfg.vocab_size, (batch, new)), torch.ones(batch, past_len + new, dtype=torch.long),
            torch.arange(past_len, past_len + new).expand(batch, new), *past)
    b, s, p, t = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    kv_names = [f"{i}.{k}" for i in range(cfg.num_hidden_layers) for k in ("key", "value")]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(
            FlatCacheDecoder(model).eval(), args, str(path), dynamo=True, opset_version=18,
            input_names=["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{n}" for n in kv_names)],
            output_names=["logits", *(f"present.{n}" for n in kv_names)],
            dynamic_shapes={"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: t}, "position_ids": {0: b, 1: s},
                            "past": tuple({0: b, 2: p} for _ in past)})
    if not (folder / "config.json").exists():  # an artifact's own config.json (with its rank plan) stays
        (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    return path
