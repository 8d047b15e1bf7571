"""The LM-loss backward pass shared by the gradient-based statistics (FWSVD's Fisher, global-fisher's
output sensitivity): every parameter frozen except those asked for, one forward + backward of the whole
model per calibration batch. What a caller keeps of the gradients is up to its own hooks."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F


@contextmanager
def grad_only_for(model: nn.Module, params=()):
    """Inside: no parameter requires grad except `params`; every flag is restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def lm_loss_backward(model: nn.Module, batches: list[torch.Tensor], device, what: str) -> None:
    """Backward of the summed next-token cross-entropy, batch by batch (the sum keeps a per-token gradient's
    scale independent of the batch size)."""
    with torch.enable_grad():
        for ids in batches:
            ids = ids.to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite LM loss in the {what}: the model overflowed in its dtype")
            loss.backward()
