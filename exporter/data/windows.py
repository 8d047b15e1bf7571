"""The token windows a run works on: calibration batches (seeded windows of a text, or generated text) and the
evaluation token stream."""
from __future__ import annotations

import torch

from .generated import generate_samples
from .text import DataError, read_text, tokenize


def sample_windows(tokens: torch.Tensor, samples: int, seqlen: int, seed: int,
                   allow_overlap: bool = False, flags: str = "--calib") -> torch.Tensor:
    """`samples` windows of `seqlen` tokens at seeded random offsets (the papers' calibration). Fewer tokens
    than samples × seqlen would repeat text: an error unless the user allows overlapping windows. `flags`: the
    options that set samples and seqlen, named in the errors."""
    what = "calibration" if flags == "--calib" else "end-to-end"
    if tokens.numel() <= seqlen:
        raise DataError(f"the {what} text has {tokens.numel()} tokens, fewer than {flags}-seqlen {seqlen}")
    if tokens.numel() < samples * seqlen and not allow_overlap:
        raise DataError(f"the {what} text has {tokens.numel()} tokens, fewer than {flags}-samples {samples} "
                        f"x {flags}-seqlen {seqlen} = {samples * seqlen}: give more text, fewer samples, or "
                        "--calib-overlap to let the windows overlap")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (samples,), generator=gen)
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


def calibration_batches(model, tokenizer, source: str, samples: int, seqlen: int, seed: int,
                        batch_size: int = 1, allow_overlap: bool = False,
                        flags: str = "--calib") -> list[torch.Tensor]:
    """`flags`: the options that set this data, "--calib" or "--e2e" (named in errors and progress bars)."""
    desc = "calibration text" if flags == "--calib" else "end-to-end text"
    if samples < 1 or seqlen < 2:
        raise DataError("calibration needs at least 1 sample of at least 2 tokens")
    if source == "generated":
        windows = generate_samples(model, tokenizer, samples, seqlen, seed, desc=f"{desc} (generated)")
    else:
        windows = sample_windows(tokenize(tokenizer, read_text(source, "train")), samples, seqlen, seed,
                                 allow_overlap, flags)
    return list(windows.split(batch_size))


def evaluation_tokens(model, tokenizer, source: str, max_tokens: int | None = None, seqlen: int = 2048,
                      seed: int = 1234) -> torch.Tensor:
    """One token stream to evaluate on. 'generated' samples held-out text from the dense model (another
    seed than calibration): it measures how far the compressed model drifts from the original, offline."""
    if source == "generated":
        total = max_tokens or 16 * seqlen
        samples = max(1, -(-total // seqlen))
        return generate_samples(model, tokenizer, samples, seqlen, seed,
                                desc="evaluation text (generated)").reshape(-1)[:total]
    tokens = tokenize(tokenizer, read_text(source, "test"))
    return tokens[:max_tokens] if max_tokens else tokens
