"""report.md: the tables a reader wants from report.json (perplexity, throughput, ratio, ranks) and the
figure beside it. Rendering only: every number comes from report.json."""
from __future__ import annotations

import statistics
from pathlib import Path

from .plots import rank_grid, write_report_png


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def _num(value, fmt: str = ",.1f") -> str:
    return "–" if value is None else format(value, fmt)


def _ratio_section(report: dict) -> list[str]:
    r, p = report["ratio"], report["params"]
    return ["## Compression", "", *_table(
        ["", "value"],
        [["recipe", report.get("recipe", f"{report['method']} + {report['allocation']}")],
         ["method / allocation", f"{report['method']} / {report['allocation']} (propagate {report['propagate']})"],
         ["ratio requested", f"{r['requested']:.3f}"],
         ["ratio realised (compressed linears)", f"{r['realized_linears']:.4f}"],
         ["ratio realised (whole model)", f"{r['realized_model']:.4f}"],
         ["parameters", f"{p['dense_total']:,} → {p['compressed_total']:,}"],
         ["low-rank / dense linears", f"{len(report['layers'])} / {report['dense_linears']}"]]), ""]


def _perplexity_section(ppl: dict | None) -> list[str]:
    if not ppl or "dense" not in ppl:
        return []
    rows = [["dense", f"{ppl['dense']:.3f}", ""]]
    if "compressed" in ppl:
        rows.append(["compressed", f"{ppl['compressed']:.3f}", f"{ppl['compressed'] / ppl['dense']:.3f}×"])
    for variant in ("dense", "compressed"):  # ONNX Runtime rows, when the export validation measured them
        value = ppl.get(f"onnx_{variant}")
        if value is not None:
            rows.append([f"{variant} (ONNX Runtime)", f"{value:.3f}", f"{value / ppl['dense']:.3f}×"])
    note = [f"**In-sample**: {ppl['in_sample']}.", ""] if ppl.get("in_sample") else []
    return [f"## Perplexity ({ppl.get('source', '?')}, {ppl.get('tokens', '?')} tokens, window {ppl.get('window', '?')})",
            "", *note, *_table(["model", "perplexity", "vs dense"], rows), ""]


def _speed_row(label: str, m: dict | None) -> list:
    if m is None:
        return [label, "–", "–", "–", "–"]
    return [label, _num(m["prefill_tokens_s"]), _num(m["decode_tokens_s"]), _num(m["end_to_end_tokens_s"]),
            _num(m.get("peak_gpu_mb"), ",.0f")]


def _throughput_section(t: dict | None) -> list[str]:
    if not t:
        return []
    s = t["settings"]
    lines = [f"## Throughput (ONNX Runtime {t['provider']}, batch {s['batch']}, prefill {s['prefill']}, "
             f"decode {s['decode']}; median of {s['repeats']} after {s['warmup']} warm-up)", "",
             *_table(["run", "prefill tok/s", "decode tok/s", "end-to-end tok/s", "peak GPU MB"],
                     [_speed_row("ORT dense", t["dense"]), _speed_row("ORT compressed", t["compressed"])]
                     + ([_speed_row(f"PyTorch eager dense ({t['eager']['device']})", t["eager"]["dense"]),
                         _speed_row(f"PyTorch eager compressed ({t['eager']['device']})", t["eager"]["compressed"])]
                        if t.get("eager") else [])),
             "",
             f"Decode speedup (ORT, compressed vs dense): **{t['speedup_decode']:.3f}×**; memory-bandwidth bound "
             f"(weight bytes read per decoded token, dense / compressed): {t['bound_decode_speedup']:.3f}×.",
             ""]
    if t.get("eager") and t["eager"].get("note"):
        lines += [t["eager"]["note"], ""]
    lines += ["End-to-end tokens/s = generated tokens / (prefill + decode time). Peak GPU memory of an ORT "
              "session: device memory in use after the runs minus before the session (its arena keeps its peak); "
              "'–' on the CPU.", ""]
    return lines


def _rank_section(layers: dict) -> list[str]:
    if not layers:
        return ["## Ranks", "", "No matrix was factorized: every linear stayed dense.", ""]
    _, kinds, _, _ = rank_grid(layers)
    rows = []
    for kind in kinds:
        recs = [rec for name, rec in layers.items() if name.rsplit(".", 1)[-1] == kind]
        ranks = [rec["rank"] for rec in recs]
        out_f, in_f = recs[0]["shape"]
        rows.append([kind, f"{out_f}×{in_f}", len(recs), min(ranks), f"{statistics.median(ranks):g}", max(ranks)])
    return ["## Ranks", "", "![ranks](report.png)", "",
            *_table(["matrix", "shape", "count", "min rank", "median rank", "max rank"], rows), ""]


def render(report: dict) -> str:
    lines = [f"# svd-export report: {report['model']}", "", f"{report['tool']} · source `{report['source']}`", ""]
    lines += _ratio_section(report)
    lines += _perplexity_section(report.get("perplexity"))
    lines += _throughput_section(report.get("throughput"))
    lines += _rank_section(report["layers"])
    timings = report.get("timings_s") or {}
    if timings:
        lines += ["## Timings", "", *_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in timings.items()]), ""]
    return "\n".join(lines)


def write_report_md(report: dict, folder: Path) -> Path:
    """report.md and report.png next to report.json."""
    folder = Path(folder)
    if report["layers"]:
        write_report_png(report, folder)
    path = folder / "report.md"
    path.write_text(render(report))
    return path
