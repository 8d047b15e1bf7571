"""Perplexity of SmolLM2-135M under every method × allocation × ratio, one setting for all rows.

    python benchmarks/quality_smollm2.py --rows svd:uniform,svd-llm:uniform,svd-llm-v2:v2,svd-llm-v2:uniform \
        --ratios 0.2,0.4,0.6

Rows accumulate in docs/results/quality-smollm2.json (keyed by method, allocation, ratio and the setting),
so a later run adds rows without redoing old ones; docs/results/quality-smollm2.md and .png are rewritten
from every stored row of the current setting. Wall time is the compression alone; peak memory is the
process's resident set (sampled) during that row, model and evaluation data included. Several processes
may fill the store at once (on a 2-core machine: OMP_NUM_THREADS=1 each, disjoint --rows or --ratios).
"""
from __future__ import annotations

import argparse
import copy
import fcntl
import json
import os
import shlex
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter import CompressionConfig, compress, compress_  # noqa: E402
from exporter.calibration.data import calibration_batches, evaluation_tokens  # noqa: E402
from exporter.models import load  # noqa: E402
from exporter.validate.perplexity import perplexity, torch_logits  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
RESULTS = ROOT / "docs" / "results"


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 50 ms)."""

    def __enter__(self):
        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


class ComputedOnce:
    """Every row starts from the same dense model and calibration batches, so the profile pass (spectra,
    layer similarities) and the gradient sensitivity are the same for every row: compute each once per
    process (per distinct arguments) and charge its first-call time to every row that uses it, so the wall
    times stay those of a standalone run."""

    def __init__(self, fn):
        self.fn, self.cache, self.charged = fn, {}, 0.0

    def __call__(self, *args, **kwargs):
        key = tuple(sorted((k, v) for k, v in kwargs.items() if isinstance(v, (bool, int, float, str))))
        if key in self.cache:
            value, seconds = self.cache[key]
            self.charged += seconds  # the row's own clock did not run this
        else:
            start = time.perf_counter()
            value = self.fn(*args, **kwargs)
            self.cache[key] = (value, time.perf_counter() - start)
        return copy.deepcopy(value)


def key(row: dict) -> tuple:
    return row["setting"], row["method"], row["allocation"], row["ratio"]


def store_row(store: Path, row: dict, setting: str) -> None:
    """Add (or replace) one row in the JSON store and rewrite the docs. The store is re-read under a lock,
    so several benchmark processes (one thread each on this 2-core machine) can fill it side by side."""
    with open(store.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(store.read_text()) if store.exists() else []
        rows = [r for r in rows if key(r) != key(row)] + [row]
        partial = store.with_suffix(".json.partial")
        partial.write_text(json.dumps(rows, indent=1))
        os.replace(partial, store)  # readers outside the lock never see half a file
        write_docs(rows, setting)


def setting_key(a) -> str:
    return f"calib {a.calib_samples}x{a.calib_seqlen} ({Path(a.calib_data).name}, seed {a.seed}), " \
           f"eval {a.eval_tokens} tokens ({Path(a.eval_data).name}), window {a.window}"


def write_docs(rows: list[dict], setting: str) -> None:
    rows = [r for r in rows if r["setting"] == setting]
    commands = list(dict.fromkeys(r["command"] for r in rows))
    dense = next((r["ppl"] for r in rows if r["method"] == "dense"), None)
    lines = [
        "# Perplexity of SmolLM2-135M (wikitext-2) by method, allocation and ratio",
        "",
        f"Setting: {setting}. CPU, float32. Made by these commands (each adds its rows to",
        "`quality-smollm2.json`; the table shows every stored row of this setting):",
        "",
        *[f"    {c}" for c in commands],
        "",
        f"Dense model: perplexity **{dense:.2f}**." if dense else "",
        "",
        "What the rows show, and where the gains match, beat or fall short of the papers': [../quality.md](../quality.md).",
        "",
        "Wall time is the compression alone on a 2-core CPU with `threads` PyTorch threads (2: the row ran",
        "alone; 1: run with OMP_NUM_THREADS=1 while other benchmark processes shared the machine, up to four",
        "at once); `load` is the 1-minute load average when the row finished (above 2 the wall time is inflated).",
        "A profile or gradient pass shared by several rows of one process is charged to each of them.",
        "",
        *pivot(rows),
        "",
        "Every row:",
        "",
        "| method | allocation | ratio | realised (linears) | realised (model) | perplexity | compress wall s | threads | peak RSS MB | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted((r for r in rows if r["method"] != "dense"), key=lambda r: (r["ratio"], r["method"], r["allocation"])):
        lines.append(f"| {r['method']} | {r['allocation']} | {r['ratio']:.1f} | {r['realized_linears']:.3f} | "
                     f"{r['realized_model']:.3f} | {r['ppl']:.2f} | {r['wall_s']:.1f} | {r.get('threads', 2)} | {r['peak_rss_mb']:.0f} | "
                     f"{r.get('load_avg', float('nan')):.1f} |")
    (RESULTS / "quality-smollm2.md").write_text("\n".join(lines) + "\n\n![perplexity vs ratio](quality-smollm2.png)\n")
    plot(rows, dense, setting)


def pivot(rows: list[dict]) -> list[str]:
    """Perplexity per method × allocation (rows) and ratio (columns); the best of each column in bold."""
    rows = [r for r in rows if r["method"] != "dense"]
    ratios = sorted({r["ratio"] for r in rows})
    series = sorted({(r["method"], r["allocation"]) for r in rows})
    ppl = {(r["method"], r["allocation"], r["ratio"]): r["ppl"] for r in rows}
    best = {q: min(v for (_, _, rr), v in ppl.items() if rr == q) for q in ratios}
    lines = ["| method | allocation | " + " | ".join(f"{q:.1f}" for q in ratios) + " |",
             "|---|---|" + "---|" * len(ratios)]
    for m, al in series:
        cells = []
        for q in ratios:
            v = ppl.get((m, al, q))
            cells.append("" if v is None else f"**{v:.2f}**" if v == best[q] else f"{v:.2f}")
        lines.append(f"| {m} | {al} | " + " | ".join(cells) + " |")
    return lines


ALLOCATION_COLORS = {"uniform": "tab:gray", "v2": "tab:red", "adacr": "tab:blue", "global-relative": "tab:olive",
                     "global-fisher": "tab:orange", "global-fisher-per-type": "tab:green"}
METHOD_STYLES = {"adasvd": ("-", "o"), "svd-llm-v2": ("--", "s"), "svd-llm": (":", "^"), "svd": (":", "x"),
                 "asvd": (":", "v"), "fwsvd": (":", "D")}


def plot(rows, dense, setting):
    """Colour = allocation, line and marker = method, so 14 series stay tellable apart."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(11, 5.5))
    series = sorted({(r["method"], r["allocation"]) for r in rows if r["method"] != "dense"})
    for method, alloc in series:
        pts = sorted((r["ratio"], r["ppl"]) for r in rows if (r["method"], r["allocation"]) == (method, alloc))
        line, marker = METHOD_STYLES.get(method, ("-.", "."))
        ax.plot(*zip(*pts), ls=line, marker=marker, color=ALLOCATION_COLORS.get(alloc), label=f"{method} ({alloc})")
    if dense:
        ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense {dense:.1f}")
    ax.set_yscale("log")
    ax.set_xlabel("compression ratio (fraction of linear-layer parameters removed)")
    ax.set_ylabel("wikitext-2 perplexity (log)")
    ax.set_title("SmolLM2-135M", fontsize=11)
    ax.text(0.01, 0.01, setting, transform=ax.transAxes, fontsize=7, color="gray")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(RESULTS / "quality-smollm2.png", dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="svd:uniform,svd-llm:uniform,svd-llm-v2:v2,svd-llm-v2:uniform",
                   help="comma-separated method:allocation pairs")
    p.add_argument("--ratios", default="0.2,0.4,0.6")
    p.add_argument("--calib-data", default=str(DATA / "wiki.valid.tokens"))
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--eval-data", default=str(DATA / "wiki.test.raw"))
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--redo", action="store_true", help="recompute rows already stored")
    a = p.parse_args()
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = f"{threads}python benchmarks/quality_smollm2.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])

    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / "quality-smollm2.json"
    setting = setting_key(a)

    def stored() -> set[tuple]:  # re-read each time: other processes may be adding rows
        return {key(r) for r in json.loads(store.read_text())} if store.exists() else set()

    shared = [ComputedOnce(compress.profile_model), ComputedOnce(compress.output_gradient_sensitivity)]
    compress.profile_model, compress.output_gradient_sensitivity = shared
    model, tokenizer, _ = load("smollm2-135m", device="cpu")
    tokens = evaluation_tokens(model, tokenizer, a.eval_data, a.eval_tokens)
    batches = calibration_batches(model, tokenizer, a.calib_data, a.calib_samples, a.calib_seqlen, a.seed)
    if (setting, "dense", "-", 0.0) not in stored():
        store_row(store, dict(setting=setting, method="dense", allocation="-", ratio=0.0, realized_linears=0.0,
                              realized_model=0.0, ppl=perplexity(torch_logits(model), tokens, a.window, "dense"),
                              wall_s=0.0, peak_rss_mb=0.0, command=command), setting)
    dense_total = sum(p.numel() for p in model.parameters())

    for ratio in [float(r) for r in a.ratios.split(",")]:
        for spec in a.rows.split(","):
            method, alloc = spec.split(":")
            if (setting, method, alloc, ratio) in stored() and not a.redo:
                continue
            work = copy.deepcopy(model)
            for once in shared:
                once.charged = 0.0
            with PeakRSS() as mem:
                start = time.perf_counter()
                result = compress_(work, batches, CompressionConfig(method=method, ratio=ratio, allocation=alloc))
                wall = time.perf_counter() - start + sum(once.charged for once in shared)
            lin_dense, lin_after = result.linear_params()
            after_total = sum(p.numel() for p in work.parameters())
            ppl = perplexity(torch_logits(work), tokens, a.window, f"{method}/{alloc}@{ratio}")
            store_row(store, dict(setting=setting, method=method, allocation=alloc, ratio=ratio,
                                  realized_linears=1 - lin_after / lin_dense,
                                  realized_model=1 - after_total / dense_total, ppl=ppl, wall_s=wall,
                                  peak_rss_mb=mem.peak / 2**20, command=command, load_avg=os.getloadavg()[0],
                                  threads=torch.get_num_threads()), setting)
            print(f"{method:12s} {alloc:10s} {ratio:.1f}  ppl {ppl:10.2f}  {wall:6.1f}s", flush=True)
            del work


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
