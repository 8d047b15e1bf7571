"""Perplexity over non-overlapping windows: exp(mean token NLL). Backend-agnostic: give it a function
from input ids [1, L] to logits [1, L, V] (PyTorch here; ONNX Runtime in the ONNX validation)."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def model_window(model, requested: int) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or requested
    return min(requested, limit)


def torch_logits(model) -> LogitsFn:
    device = next(model.parameters()).device

    @torch.no_grad()
    def run(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()
    return run


def eval_windows(tokens: torch.Tensor, seqlen: int) -> list[torch.Tensor]:
    """The non-overlapping windows [1, seqlen] perplexity is computed on (a trailing remainder is dropped)."""
    windows = tokens.numel() // seqlen
    if windows == 0:
        raise ValueError(f"the evaluation data has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    return [tokens[w * seqlen:(w + 1) * seqlen].unsqueeze(0) for w in range(windows)]


def nll_sum(logits_fn: LogitsFn, windows: list[torch.Tensor], desc: str = "perplexity",
            progress: bool = True) -> tuple[float, int]:
    """(Σ next-token negative log-likelihood, number of predicted tokens) over `windows` [1, L] each."""
    nll, count = 0.0, 0
    for w, ids in enumerate(tqdm(windows, desc=desc, unit="window", disable=not progress)):
        logits = logits_fn(ids)[0, :-1].float()
        loss = F.cross_entropy(logits, ids[0, 1:], reduction="sum")
        if not torch.isfinite(loss):  # never skipped (SVD-LLM silently dropped NaN batches)
            raise FloatingPointError(f"non-finite loss in evaluation window {w}: the model produced NaN/Inf logits")
        nll += float(loss)
        count += ids.shape[1] - 1
    return nll, count


def perplexity(logits_fn: LogitsFn, tokens: torch.Tensor, seqlen: int, desc: str = "perplexity",
               progress: bool = True) -> float:
    nll, count = nll_sum(logits_fn, eval_windows(tokens, seqlen), desc, progress)
    return math.exp(nll / count)
