"""Parity for a model that is never whole in memory (a streamed checkpoint): ONNX Runtime generates greedily
with its own KV cache (a prefill, then one decode step per token), and PyTorch computes the logits of that
same sequence in one teacher-forced pass through the layer source, one decoder layer at a time. Every ORT
logit row (each prefill position, each decode step) is compared with PyTorch's at the same position, so
ORT's cache wiring is checked as in validate/parity.py; ORT's greedy tokens equal PyTorch's argmax at every
generated position exactly when the two greedy texts are equal. PyTorch and ORT never hold the model at
the same time as two full copies: PyTorch holds one layer."""
from __future__ import annotations

import numpy as np
import torch

from ..loop.forward import source_logits
from .ort_session import OrtDecoder
from .parity import INT8_ACTIVATIONS, MIN_TOP1, TOLERANCE, _compare, scaled_tolerance


def ort_generate(decoder: OrtDecoder, ids: torch.Tensor, new_tokens: int) -> tuple[list[int], np.ndarray]:
    """-> (greedy tokens, ORT logits [S + new_tokens, V]: the prefill rows, then one row per decode step)."""
    logits, present = decoder.prefill(ids.numpy())
    rows, tokens, length = [logits[0]], [], ids.shape[1]
    for _ in range(new_tokens):
        token = logits[:, -1:].argmax(-1)
        tokens.append(int(token[0, 0]))
        length += 1
        logits, present = decoder(token, np.ones((1, length), np.int64), present)
        rows.append(logits[0])
    return tokens, np.concatenate(rows, 0)


def streamed_parity(source, decoder: OrtDecoder, ids: torch.Tensor, dtype: str, new_tokens: int = 32,
                    int8_activations: bool = False) -> dict:
    """int8_activations: as validate.parity.parity (INT8_ACTIVATIONS' tolerance; greedy equality reported)."""
    ids = ids[:1]
    prompt = ids.shape[1]
    tokens, ort_rows = ort_generate(decoder, ids, new_tokens)
    sequence = torch.cat([ids, torch.tensor([tokens], dtype=ids.dtype)], 1)
    torch_rows = source_logits(source, [sequence])[0][0]  # [S + new_tokens, V]
    diff, agree, total = _compare(ort_rows, torch_rows, int8_activations)
    reference = torch_rows[prompt - 1:prompt - 1 + new_tokens].argmax(-1).tolist()
    first_diff = next((i for i, (a, b) in enumerate(zip(reference, tokens)) if a != b), None)
    top1 = agree / total
    largest = float(torch_rows.abs().max())
    tolerance = scaled_tolerance(INT8_ACTIVATIONS["tolerance"] if int8_activations else TOLERANCE[dtype], largest)
    min_top1 = INT8_ACTIVATIONS["min_top1"] if int8_activations else MIN_TOP1[dtype]
    return {"mode": "streamed: ORT greedy with its KV cache against one teacher-forced PyTorch pass through the "
                    "layer source", "prefill_tokens": prompt, "decode_steps": new_tokens,
            "max_abs_diff": diff, "top1_agreement": top1, "tolerance": tolerance, "largest_logit": largest,
            "greedy": {"new_tokens": new_tokens, "torch": reference, "onnx": tokens, "equal": reference == tokens,
                       "first_difference": first_diff},
            "passed": diff <= tolerance and top1 >= min_top1 and (reference == tokens or int8_activations),
            "provider": decoder.provider}
