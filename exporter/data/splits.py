"""The held-out protocol: three roles for text, never mixed.

- calibration: the windows the statistics (and refinement) are computed on;
- validation: what every hyperparameter is chosen on (strengths, retentions, refinement steps, defaults);
- test: what results are reported on, never used for a choice (wikitext-2 `wiki.test.raw`).

Calibration and validation come from one text (locally: wikitext-2 `wiki.valid.tokens`), split by position:
the calibration windows are sampled from the first CALIBRATION_SHARE of its tokens only, the validation text
is the rest. A window never crosses the cut (sample_windows draws whole windows inside the part it is
given), so no token of the validation text is ever a calibration token.
"""
from __future__ import annotations

import torch

CALIBRATION_SHARE = 0.75


def split_tokens(tokens: torch.Tensor, share: float = CALIBRATION_SHARE) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration part, validation part) of one token stream: the first `share` and the rest."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"the calibration share must be in (0, 1), got {share}")
    cut = int(tokens.numel() * share)
    if cut == 0 or cut == tokens.numel():
        raise ValueError(f"{tokens.numel()} tokens cannot be split into calibration and validation parts")
    return tokens[:cut], tokens[cut:]


def calibration_windows(tokens: torch.Tensor, samples: int, seqlen: int, seed: int, batch_size: int = 1,
                        share: float = CALIBRATION_SHARE) -> list[torch.Tensor]:
    """Seeded calibration windows from the calibration part only, as batches."""
    from .windows import sample_windows
    part, _ = split_tokens(tokens, share)
    return list(sample_windows(part, samples, seqlen, seed).split(batch_size))


def validation_tokens(tokens: torch.Tensor, max_tokens: int | None = None,
                      share: float = CALIBRATION_SHARE) -> torch.Tensor:
    """The validation part (its first `max_tokens`)."""
    _, part = split_tokens(tokens, share)
    if max_tokens is not None and part.numel() < max_tokens:
        raise ValueError(f"the validation part has {part.numel()} tokens, fewer than the {max_tokens} asked for")
    return part[:max_tokens] if max_tokens else part
