"""Data-free text: the model writes its own, seeded (`--calib-data generated`, `--eval-data generated`)."""
from __future__ import annotations

import inspect
import os

import torch
from tqdm.auto import tqdm

KV_CACHE_BYTES = 2 * 2**30  # generated samples share one batch while their KV cache fits in this


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
