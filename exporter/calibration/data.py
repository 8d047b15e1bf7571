"""Token data for calibration and evaluation: wikitext-2 through `datasets`, a local file, or text
the model generates itself (data-free calibration). Never a silent fallback between them."""
from __future__ import annotations

import codecs
import inspect
import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

WIKITEXT = ("wikitext", "wikitext-2-raw-v1")
SOURCES = ("wikitext2", "generated")  # the named sources; anything else is a file path
KV_CACHE_BYTES = 2 * 2**30  # generated samples share one batch while their KV cache fits in this


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
    path = check_text_file(source)
    if path.suffix == ".jsonl":
        return "\n\n".join(jsonl_texts(path, path.read_text(encoding="utf-8")))
    return path.read_text(encoding="utf-8")


def check_text_file(source: str) -> Path:
    """A calibration/evaluation file exists, is not empty and is UTF-8 text (JSONL: a "text" per line).
    Cheap enough to run before any model is loaded; each failure names the file."""
    path = Path(source)
    if not path.exists():
        raise DataError(f"data file not found: {source} (use 'wikitext2', 'generated' or a file path)")
    if not path.is_file():
        raise DataError(f"data file {source} is a folder, not a text file")
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(2**20):
                decoder.decode(chunk)
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise DataError(f"data file {source} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                        f"{offset + exc.start}): give a .txt/.raw/.tokens/.jsonl text file") from exc
    except OSError as exc:
        raise DataError(f"cannot read data file {source}: {exc.strerror}") from exc
    if offset == 0:
        raise DataError(f"data file {source} is empty")
    if path.suffix == ".jsonl":
        jsonl_texts(path, path.read_text(encoding="utf-8"))
    return path


def jsonl_texts(path: Path, text: str) -> list[str]:
    texts = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                value = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{path}:{n}: each JSONL line needs a \"text\" field") from exc
            if not isinstance(value, str):
                raise DataError(f"{path}:{n}: \"text\" must be a string")
            texts.append(value)
    return texts


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() == 0:
        raise DataError("the data is empty after tokenization")
    return ids


def sample_windows(tokens: torch.Tensor, samples: int, seqlen: int, seed: int,
                   allow_overlap: bool = False) -> torch.Tensor:
    """`samples` windows of `seqlen` tokens at seeded random offsets (the papers' calibration). Fewer tokens
    than samples × seqlen would repeat text: an error unless the user allows overlapping windows."""
    if tokens.numel() <= seqlen:
        raise DataError(f"the calibration text has {tokens.numel()} tokens, fewer than --calib-seqlen {seqlen}")
    if tokens.numel() < samples * seqlen and not allow_overlap:
        raise DataError(f"the calibration text has {tokens.numel()} tokens, fewer than --calib-samples {samples} "
                        f"x --calib-seqlen {seqlen} = {samples * seqlen}: give more text, fewer samples, or "
                        "--calib-overlap to let the windows overlap")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (samples,), generator=gen)
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


def kv_bytes_per_sample(config, seqlen: int, element: int) -> int:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * seqlen * element


@torch.no_grad()
def generate_samples(model, tokenizer, samples: int, seqlen: int, seed: int, progress: bool | None = None,
                     desc: str = "generate text", top_k: int = 50) -> torch.Tensor:
    """Data-free calibration: the model writes its own text, seeded. Each sample starts from a random
    vocabulary token and is sampled (top-k) to `seqlen` tokens. All samples advance together, one
    token per step with the KV cache (one batch while the cache fits in KV_CACHE_BYTES), with a bar per step.
    progress=None: a bar unless TQDM_DISABLE is set (the CLI's -q sets it)."""
    param = next(model.parameters())
    per_sample = kv_bytes_per_sample(model.config, seqlen, param.element_size())
    batch = max(1, min(samples, KV_CACHE_BYTES // max(per_sample, 1)))
    gen = torch.Generator().manual_seed(seed)
    vocab = min(len(tokenizer), model.config.vocab_size)
    ids = torch.empty(samples, seqlen, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (samples,), generator=gen)
    cache = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.24 renamed it
    quiet = bool(os.environ.get("TQDM_DISABLE")) if progress is None else not progress
    bar = tqdm(total=samples * (seqlen - 1), desc=desc, unit="tok", unit_scale=True, disable=quiet)
    for start in range(0, samples, batch):
        rows = slice(start, min(start + batch, samples))
        out = model(input_ids=ids[rows, :1].to(param.device), use_cache=True)
        for t in range(1, seqlen):
            logits = out.logits[:, -1, :vocab].float().cpu()
            top = logits.topk(min(top_k, vocab), dim=-1)
            pick = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=gen)
            ids[rows, t] = top.indices.gather(1, pick)[:, 0]
            bar.update(ids[rows].shape[0])
            if t + 1 < seqlen:
                out = model(input_ids=ids[rows, t:t + 1].to(param.device), use_cache=True,
                            **{cache: getattr(out, cache)})
    bar.close()
    return ids


def calibration_batches(model, tokenizer, source: str, samples: int, seqlen: int, seed: int,
                        batch_size: int = 1, allow_overlap: bool = False) -> list[torch.Tensor]:
    if samples < 1 or seqlen < 2:
        raise DataError("calibration needs at least 1 sample of at least 2 tokens")
    if source == "generated":
        windows = generate_samples(model, tokenizer, samples, seqlen, seed, desc="calibration text (generated)")
    else:
        windows = sample_windows(tokenize(tokenizer, read_text(source, "train")), samples, seqlen, seed,
                                 allow_overlap)
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
