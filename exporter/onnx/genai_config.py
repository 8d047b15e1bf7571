"""genai_config.json: what onnxruntime-genai needs to load an exported folder and generate from it."""
from __future__ import annotations

import json
from pathlib import Path


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def genai_config(config, generation_config, tokenizer, genai_type: str, position_ids: bool, filename: str,
                 share_buffer: bool = False) -> dict:
    """share_buffer: the graph may write the present KV into the past buffer (GroupQueryAttention, the fused
    graph); the plain graph concatenates past and new keys (present = past + new), so it cannot."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
    gen = generation_config
    eos = (getattr(gen, "eos_token_id", None) if gen is not None else None) or config.eos_token_id \
        or tokenizer.eos_token_id
    bos = (getattr(gen, "bos_token_id", None) if gen is not None else None) or config.bos_token_id \
        or tokenizer.bos_token_id
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _first(eos)
    context = getattr(config, "max_position_embeddings", None) or 2048
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    if position_ids:
        inputs["position_ids"] = "position_ids"
    return {
        "model": {
            "type": genai_type,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "context_length": context,
            "vocab_size": config.vocab_size,
            "decoder": {
                "filename": filename,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": head_size,
                "hidden_size": config.hidden_size,
                "num_attention_heads": heads,
                "num_key_value_heads": kv_heads,
                "num_hidden_layers": config.num_hidden_layers,
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context, "min_length": 0,
            "past_present_share_buffer": share_buffer,
            "top_k": 1, "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
            "no_repeat_ngram_size": 0, "diversity_penalty": 0.0, "early_stopping": True,
        },
    }


def write_genai_config(config, generation_config, tokenizer, folder: Path, genai_type: str, position_ids: bool,
                       filename: str, share_buffer: bool = False) -> Path:
    path = Path(folder) / "genai_config.json"
    path.write_text(json.dumps(genai_config(config, generation_config, tokenizer, genai_type, position_ids,
                                            filename, share_buffer), indent=2))
    return path
