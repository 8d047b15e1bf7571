"""Token data for calibration and evaluation: wikitext-2 through `datasets`, a local file, or text
the model generates itself (data-free calibration). Never a silent fallback between them."""
from __future__ import annotations

import json
from pathlib import Path

import torch

WIKITEXT = ("wikitext", "wikitext-2-raw-v1")


class DataError(RuntimeError):
    pass


def read_text(source: str, split: str) -> str:
    """The whole text of a source: 'wikitext2' (hub, `split`) or a local .txt/.raw/.tokens/.jsonl file."""
    if source == "wikitext2":
        try:
            import datasets
            rows = datasets.load_dataset(*WIKITEXT, split=split)["text"]
        except Exception as exc:  # offline, hub down, missing dataset: one clear line, no fallback
            raise DataError(
                f"could not load wikitext-2 ({split}) from the Hugging Face hub ({type(exc).__name__}). "
                "Pass a local file (--calib-data/--eval-data PATH) or --calib-data generated"
            ) from exc
        return "\n\n".join(rows)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"data file not found: {source} (use 'wikitext2', 'generated' or a file path)")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise DataError(f"{path}:{n}: each JSONL line needs a \"text\" field") from exc
        return "\n\n".join(texts)
    return path.read_text(encoding="utf-8")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() == 0:
        raise DataError("the data is empty after tokenization")
    return ids


def sample_windows(tokens: torch.Tensor, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`samples` windows of `seqlen` tokens at seeded random offsets (the papers' calibration)."""
    if tokens.numel() <= seqlen:
        raise DataError(f"the calibration text has {tokens.numel()} tokens, fewer than --calib-seqlen {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (samples,), generator=gen)
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


@torch.no_grad()
def generate_samples(model, tokenizer, samples: int, seqlen: int, seed: int, batch_size: int = 8) -> torch.Tensor:
    """Data-free calibration: the model writes its own text, seeded. Each sample starts from a random
    vocabulary token and is sampled (top-k 50) to `seqlen` tokens."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    vocab = min(len(tokenizer), model.config.vocab_size)
    out = []
    for start in range(0, samples, batch_size):
        n = min(batch_size, samples - start)
        torch.manual_seed(seed + start)
        first = torch.randint(0, vocab, (n, 1), generator=gen).to(device)
        ids = model.generate(first, attention_mask=torch.ones_like(first), do_sample=True, top_k=50,
                             max_new_tokens=seqlen - 1, min_new_tokens=seqlen - 1,
                             pad_token_id=tokenizer.eos_token_id or 0)
        out.append(ids[:, :seqlen].cpu())
    return torch.cat(out)


def calibration_batches(model, tokenizer, source: str, samples: int, seqlen: int, seed: int,
                        batch_size: int = 1) -> list[torch.Tensor]:
    if samples < 1 or seqlen < 2:
        raise DataError("calibration needs at least 1 sample of at least 2 tokens")
    if source == "generated":
        windows = generate_samples(model, tokenizer, samples, seqlen, seed)
    else:
        windows = sample_windows(tokenize(tokenizer, read_text(source, "train")), samples, seqlen, seed)
    return list(windows.split(batch_size))


def evaluation_tokens(model, tokenizer, source: str, max_tokens: int | None = None, seqlen: int = 2048,
                      seed: int = 1234) -> torch.Tensor:
    """One token stream to evaluate on. 'generated' samples held-out text from the dense model (another
    seed than calibration): it measures how far the compressed model drifts from the original, offline."""
    if source == "generated":
        total = max_tokens or 16 * seqlen
        samples = max(1, -(-total // seqlen))
        return generate_samples(model, tokenizer, samples, seqlen, seed).reshape(-1)[:total]
    tokens = tokenize(tokenizer, read_text(source, "test"))
    return tokens[:max_tokens] if max_tokens else tokens
