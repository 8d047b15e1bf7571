"""Perplexity of SmolLM2-135M under compression recipes × ratios × calibration seeds, on the held-out protocol
(exporter/data/splits.py): calibration windows from the first 75% of wiki.valid.tokens; `--split
validation` evaluates on the rest of wiki.valid.tokens (every choice of a hyperparameter is made there),
`--split test` on wiki.test.raw (reported only).

    python -m benchmarks.quality.smollm2 --split validation --eval-tokens 8192 --ratios 0.4 --seeds 0 \
        --rows svd-llm-v2:uniform,svd-llm-v2:uniform:refine=block:refine_steps=64

A row is `method:allocation[:option=value...]`, the options being CompressionConfig fields; `default` is the
default recipe of the ratio (exporter/recipe.py). Three more options give end-to-end refinement data of its
own (as --e2e-samples/--e2e-seqlen/--e2e-data do): `e2e_samples=64:e2e_seqlen=1024` windows of the calibration
part (seeded as the calibration windows), `e2e_source=generated` text the dense model writes (seeded). `quantize=int4[:block_size=64:head_bits=4]`: GPTQ
in the layer loop as `--quantize` runs it, the model evaluated in PyTorch with its grid values. Rows accumulate in docs/results/quality-smollm2.json
(keyed by setting, row, ratio and seed), so a later run adds rows without redoing old ones;
docs/results/<--doc>.md (and .png) is rewritten from every stored row of the current setting. Wall time is
the compression alone (a profile pass shared by the rows of one seed is charged to each); peak memory is the
process's resident set (sampled) during that row, model and evaluation data included.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import fcntl
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, WIKITEXT, PeakRSS, command_line, smollm2
from exporter import CompressionConfig, compress_
from exporter.config import DEFAULT_BLOCK_SIZE, Quantization
from exporter.data.splits import CALIBRATION_SHARE, split_tokens
from exporter.data.text import read_text, tokenize
from exporter.data.windows import sample_windows
from exporter.loop.profile import measure_profile
from exporter.recipe import default_compression
from exporter.validate.perplexity import perplexity, torch_logits

STORE = RESULTS / "quality-smollm2.json"


E2E_OPTIONS = ("e2e_samples", "e2e_seqlen", "e2e_source")  # row options that are not CompressionConfig fields
GRID_OPTIONS = ("quantize", "block_size", "head_bits")  # --quantize's (GPTQ in the loop), as the CLI takes them


def row_options(spec: str, ratio: float, batches: int) -> dict:
    """`method:allocation[:key=value...]` (or `default[:key=value...]`, the default recipe for `batches`
    calibration batches) -> its fields, values parsed as JSON where they are."""
    head, *options = spec.split(":")
    if head == "default":
        fields = default_compression(ratio, batches)
    else:
        fields = {"method": head, "allocation": options.pop(0)}
    for option in options:
        name, _, value = option.partition("=")
        try:
            fields[name] = json.loads(value)
        except json.JSONDecodeError:
            fields[name] = value
    return {**fields, "ratio": ratio}


def parse_row(spec: str, ratio: float, batches: int) -> CompressionConfig:
    """The CompressionConfig a row names."""
    fields = row_options(spec, ratio, batches)
    grid = {k: fields.pop(k) for k in GRID_OPTIONS if k in fields}
    if grid:  # the PyTorch model evaluated with the grid's values (float activations: accuracy level 0)
        fields["quantization"] = Quantization.parse(grid.get("quantize"), grid.get("block_size", DEFAULT_BLOCK_SIZE),
                                                    grid.get("head_bits"))
    return CompressionConfig(**{k: v for k, v in fields.items() if k not in E2E_OPTIONS})


def e2e_batches(spec: str, ratio: float, a, calib_text: torch.Tensor, seed: int, model, tokenizer):
    """The row's own end-to-end refinement batches (None: it trains on the calibration batches)."""
    fields = row_options(spec, ratio, 1)
    if not set(fields) & set(E2E_OPTIONS):
        return None
    samples, seqlen = fields.get("e2e_samples", a.calib_samples), fields.get("e2e_seqlen", a.calib_seqlen)
    if fields.get("e2e_source", "calibration") == "generated":
        from exporter.data.generated import generate_samples
        return list(generate_samples(model, tokenizer, samples, seqlen, seed, progress=False).split(a.calib_batch_size))
    return windows(calib_text, samples, seqlen, seed, a.calib_batch_size)


def windows(part: torch.Tensor, samples: int, seqlen: int, seed: int, batch_size: int) -> list[torch.Tensor]:
    """Seeded windows of the calibration part, as batches (exporter/data/splits.calibration_windows on the part)."""
    return list(sample_windows(part, samples, seqlen, seed).split(batch_size))


def without_unknown_markers(tokenizer, part: torch.Tensor) -> torch.Tensor:
    """A part of the token stream without WikiText's `<unk>` markers (its .tokens files put one where a rare word
    was): decoded, dropped, re-tokenized. An experiment's option (docs/quality.md, "The validation text"): the
    product calibrates on the text as given."""
    return tokenize(tokenizer, re.sub(r" ?<unk>", "", tokenizer.decode(part)))


def label(spec: str, ratio: float, batches: int) -> str:
    """The row's stored name: `default` resolved to the settings it ran (method, allocation, then its other
    fields), since the default recipe changes as rows are measured (it was svd-llm-v2:v2 before 2026-11-26)."""
    if not spec.startswith("default"):
        return spec
    config = parse_row(spec, ratio, batches)
    defaults = default_compression(ratio, batches)
    options = {k: v for k, v in defaults.items() if k not in ("method", "allocation", "recipe")}
    given = row_options(spec, ratio, batches)
    # an option the default already has (e.g. allocation=global-fisher where it is the default's) names nothing new
    extra = [o for o in spec.split(":")[1:] if defaults.get(o.partition("=")[0], object()) != given[o.partition("=")[0]]]
    return (f"{config.method}:{config.allocation_name}" + "".join(f":{k}={v}" for k, v in options.items())
            + "".join(f":{o}" for o in extra))


def key(row: dict) -> tuple:
    return row["setting"], row["row"], row["ratio"], row.get("seed", 0)


def setting_key(a) -> str:
    evaluated = (f"the validation part of {Path(a.calib_data).name}" if a.split == "validation"
                 else Path(a.test_data).name)
    if a.split == "validation" and a.eval_unk == "drop":
        evaluated += " without <unk>"
    calibrated = Path(a.calib_data).name + (" without <unk>" if a.calib_unk == "drop" else "")
    return (f"calib {a.calib_samples}x{a.calib_seqlen} from the first {CALIBRATION_SHARE:.0%} of "
            f"{calibrated}, eval {a.eval_tokens} tokens of {evaluated}, window {a.window}")


def store_row(row: dict, setting: str, doc: str) -> None:
    """Add (or replace) one row in the JSON store and rewrite the doc. The store is re-read under a lock,
    so several benchmark processes can fill it side by side."""
    with open(STORE.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(STORE.read_text()) if STORE.exists() else []
        rows = [r for r in rows if key(r) != key(row)] + [row]
        partial = STORE.with_suffix(".json.partial")
        partial.write_text(json.dumps(rows, indent=1))
        os.replace(partial, STORE)  # readers outside the lock never see half a file
        write_doc(rows, setting, doc)


def spread(values: list[float]) -> str:
    """mean, and ± half the range when there are several seeds."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {(max(values) - min(values)) / 2:.2f}"


def pivot(rows: list[dict]) -> list[str]:
    """Perplexity per row (recipe) and ratio, mean over the seeds ± half their range; the best mean in bold."""
    ratios = sorted({r["ratio"] for r in rows})
    labels = sorted({r["row"] for r in rows})
    cell = {}
    for label in labels:
        for q in ratios:
            values = [r["ppl"] for r in rows if r["row"] == label and r["ratio"] == q]
            if values:
                cell[label, q] = (statistics.fmean(values), spread(values), len(values))
    best = {q: min(v[0] for (_, rr), v in cell.items() if rr == q) for q in ratios}
    lines = ["| recipe | " + " | ".join(f"{q:.1f}" for q in ratios) + " |", "|---|" + "---|" * len(ratios)]
    for label in labels:
        cells = []
        for q in ratios:
            if (label, q) not in cell:
                cells.append("")
                continue
            mean, text, n = cell[label, q]
            text += f" ({n} seeds)" if n > 1 else ""
            cells.append(f"**{text}**" if mean == best[q] else text)
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    return lines


def write_doc(rows: list[dict], setting: str, doc: str) -> None:
    rows = [r for r in rows if r["setting"] == setting]
    commands = list(dict.fromkeys(r["command"] for r in rows))
    dense = next((r["ppl"] for r in rows if r["row"] == "dense"), None)
    compressed = [r for r in rows if r["row"] != "dense"]
    lines = [
        f"# SmolLM2-135M perplexity by recipe and ratio ({'validation' if 'validation' in setting else 'test'})",
        "",
        f"Setting: {setting}. CPU, float32. Made by these commands (each adds its rows to",
        "`quality-smollm2.json`; the table shows every stored row of this setting):",
        "",
        *[f"    {c}" for c in commands],
        "",
        f"Dense model: perplexity **{dense:.2f}**." if dense else "",
        "",
        "A recipe is `method:allocation[:option=value...]` (CompressionConfig fields); `default` in a command is",
        "stored as the settings it ran (the default recipe then). Cells: mean over the calibration seeds ±",
        "half their range. What the rows show: [../quality.md](../quality.md).",
        "",
        *pivot(compressed),
        "",
        "Every row. `compress s` is the compression alone on a 2-core CPU shared with other jobs (`threads` PyTorch",
        "threads, `load` the 1-minute load average when the row finished: above 2 the times are inflated);",
        "`refine s/layer` the mean time of `--refine block` per decoder layer; peak RSS includes the model, the",
        "evaluation data and the activation streams.",
        "",
        "| recipe | ratio | seed | realised (linears) | perplexity | compress s | refine s/layer | threads | peak RSS MB | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(compressed, key=lambda r: (r["ratio"], r["row"], r["seed"])):
        refine = f"{r['refine_s_per_layer']:.1f}" if r.get("refine_s_per_layer") else "-"
        lines.append(f"| `{r['row']}` | {r['ratio']:.1f} | {r['seed']} | {r['realized_linears']:.3f} | {r['ppl']:.2f} | "
                     f"{r['wall_s']:.0f} | {refine} | {r['threads']} | {r['peak_rss_mb']:.0f} | {r['load_avg']:.1f} |")
    (RESULTS / f"{doc}.md").write_text("\n".join(lines) + f"\n\n![perplexity vs ratio]({doc}.png)\n")
    plot(compressed, dense, setting, RESULTS / f"{doc}.png")


def plot(rows, dense, setting, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(11, 5.5))
    for label in sorted({r["row"] for r in rows}):
        ratios = sorted({r["ratio"] for r in rows if r["row"] == label})
        means = [statistics.fmean(r["ppl"] for r in rows if r["row"] == label and r["ratio"] == q) for q in ratios]
        lows = [min(r["ppl"] for r in rows if r["row"] == label and r["ratio"] == q) for q in ratios]
        highs = [max(r["ppl"] for r in rows if r["row"] == label and r["ratio"] == q) for q in ratios]
        line = ax.plot(ratios, means, marker="o", ls="-" if "refine=block" in label or label.startswith("default")
                       else "--", label=label)[0]
        ax.fill_between(ratios, lows, highs, color=line.get_color(), alpha=0.15)
    if dense:
        ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense {dense:.1f}")
    ax.set_yscale("log")
    ax.set_xlabel("compression ratio (fraction of linear-layer parameters removed)")
    ax.set_ylabel("wikitext-2 perplexity (log)")
    ax.set_title("SmolLM2-135M (band: range over calibration seeds)", fontsize=11)
    ax.text(0.01, 0.01, setting, transform=ax.transAxes, fontsize=7, color="gray")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="default", help="comma-separated recipes (see the module docstring)")
    p.add_argument("--ratios", default="0.2,0.4,0.6,0.8")
    p.add_argument("--seeds", default="0", help="comma-separated calibration seeds")
    p.add_argument("--split", choices=("validation", "test"), required=True)
    p.add_argument("--calib-data", default=str(WIKITEXT / "wiki.valid.tokens"))
    p.add_argument("--test-data", default=str(WIKITEXT / "wiki.test.raw"))
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--calib-batch-size", type=int, default=2)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--doc", default=None, help="name of the doc written (default: quality-smollm2[-validation])")
    p.add_argument("--redo", action="store_true", help="recompute rows already stored")
    p.add_argument("--calib-unk", choices=("keep", "drop"), default="keep",
                   help="drop: calibrate on the calibration part without WikiText's <unk> markers")
    p.add_argument("--eval-unk", choices=("keep", "drop"), default="keep",
                   help="--split validation only; drop: evaluate on the validation part without its <unk> markers")
    a = p.parse_args()
    doc = a.doc or ("quality-smollm2" if a.split == "test" else "quality-smollm2-validation")
    command = command_line()
    setting = setting_key(a)
    ratios = [float(r) for r in a.ratios.split(",")]
    specs = a.rows.split(",")

    def stored() -> set[tuple]:  # re-read each time: other processes may be adding rows
        return {key(r) for r in json.loads(STORE.read_text())} if STORE.exists() else set()

    model, tokenizer = smollm2()
    calib_text, validation_text = split_tokens(tokenize(tokenizer, read_text(a.calib_data, "train")))
    if a.calib_unk == "drop":
        calib_text = without_unknown_markers(tokenizer, calib_text)
    if a.split == "validation":
        tokens = without_unknown_markers(tokenizer, validation_text) if a.eval_unk == "drop" else validation_text
        if tokens.numel() < a.eval_tokens:
            raise SystemExit(f"the validation part has {tokens.numel()} tokens, fewer than --eval-tokens {a.eval_tokens}")
        tokens = tokens[:a.eval_tokens]
    else:
        tokens = tokenize(tokenizer, read_text(a.test_data, "test"))[:a.eval_tokens]
    base = dict(setting=setting, command=command, threads=torch.get_num_threads())
    if (setting, "dense", 0.0, 0) not in stored():
        store_row({**base, "row": "dense", "ratio": 0.0, "seed": 0, "ppl": perplexity(torch_logits(model), tokens,
                   a.window, "dense")}, setting, doc)

    for seed in [int(s) for s in a.seeds.split(",")]:
        batches = windows(calib_text, a.calib_samples, a.calib_seqlen, seed, a.calib_batch_size)
        count = len(batches)
        todo = [(q, s) for q in ratios for s in specs
                if (setting, label(s, q, count), q, seed) not in stored() or a.redo]
        if not todo:
            continue
        allocations = sorted({parse_row(s, q, count).allocation_name for q, s in todo})
        start = time.perf_counter()
        profile = measure_profile(model, batches, allocations, progress=False)
        profile_s = time.perf_counter() - start
        for ratio, spec in todo:
            config = parse_row(spec, ratio, count)
            work = copy.deepcopy(model)
            with PeakRSS() as mem:
                start = time.perf_counter()
                result = compress_(work, batches, config, profile=copy.deepcopy(profile),
                                   e2e_batches=e2e_batches(spec, ratio, a, calib_text, seed, model, tokenizer))
                wall = time.perf_counter() - start + profile_s
            lin_dense, lin_after = result.linear_params()
            ppl = perplexity(torch_logits(work), tokens, a.window, f"{spec}@{ratio}")
            refine_s = result.layer_seconds.get("refine")
            store_row({**base, "row": label(spec, ratio, count), "ratio": ratio, "seed": seed, "config": dataclasses.asdict(config),
                       "realized_linears": 1 - lin_after / lin_dense, "ppl": ppl, "wall_s": wall,
                       "refine_s_per_layer": statistics.fmean(refine_s) if refine_s else None,
                       "refine": result.extra.get("refine"), "refine_e2e": result.extra.get("refine_e2e"),
                       "peak_rss_mb": mem.peak / 2**20,
                       "load_avg": os.getloadavg()[0]}, setting, doc)
            print(f"{spec} @{ratio} seed {seed}: ppl {ppl:.2f} ({wall:.0f}s)", flush=True)
            del work


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
