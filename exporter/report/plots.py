"""The report's figure: the rank plan as a heat map (decoder layer × matrix type) and, when measured,
tokens/s dense vs compressed. Reads only report.json's data, so it serves every method and allocation."""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

LAYER_INDEX = re.compile(r"\.(\d+)\.")


def rank_grid(layers: dict) -> tuple[list[int], list[str], np.ndarray, np.ndarray]:
    """-> (layer indices, matrix types, kept-parameter fraction r(m+n)/(mn), rank); NaN/0 where a matrix
    has no entry (left dense or never a candidate). Types keep their first-seen (architecture) order."""
    cells = {}
    for name, rec in layers.items():
        found = LAYER_INDEX.search(name)
        if found is None:
            raise ValueError(f"cannot place {name!r} in the rank heat map: no decoder-layer index in the name")
        out_f, in_f = rec["shape"]
        cells[(int(found.group(1)), name.rsplit(".", 1)[-1])] = (rec["rank"], rec["rank"] * (out_f + in_f) / (out_f * in_f))
    rows = sorted({layer for layer, _ in cells})
    cols = list(dict.fromkeys(kind for _, kind in cells))
    kept = np.full((len(rows), len(cols)), np.nan)
    ranks = np.zeros((len(rows), len(cols)), dtype=int)
    for (layer, kind), (rank, fraction) in cells.items():
        kept[rows.index(layer), cols.index(kind)] = fraction
        ranks[rows.index(layer), cols.index(kind)] = rank
    return rows, cols, kept, ranks


def plot_ranks(ax, layers: dict, title: str) -> None:
    rows, cols, kept, ranks = rank_grid(layers)
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")  # matrices without an entry stay dense
    image = ax.imshow(np.ma.masked_invalid(kept), aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0,
                      interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    step = max(1, len(rows) // 16)
    ax.set_yticks(range(0, len(rows), step), [str(r) for r in rows[::step]])
    ax.set_ylabel("decoder layer")
    ax.set_title(title)
    if len(rows) * len(cols) <= 160:  # rank numbers only where they stay legible
        for i in range(len(rows)):
            for j in range(len(cols)):
                if not np.isnan(kept[i, j]):
                    ax.text(j, i, str(ranks[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if kept[i, j] < 0.6 else "black")
    ax.figure.colorbar(image, ax=ax, label="kept parameters r(m+n)/(mn); grey: dense")


def plot_throughput(ax, throughput: dict) -> None:
    phases = [("prefill_tokens_s", "prefill"), ("decode_tokens_s", "decode"), ("end_to_end_tokens_s", "end-to-end")]
    x = np.arange(len(phases))
    for offset, variant in ((-0.2, "dense"), (0.2, "compressed")):
        ax.bar(x + offset, [throughput[variant][key] for key, _ in phases], width=0.4, label=variant)
    ax.set_xticks(x, [label for _, label in phases])
    ax.set_yscale("log")  # prefill and decode rates differ by orders of magnitude
    ax.set_ylabel("tokens/s")
    ax.set_title(f"ONNX Runtime, {throughput['provider']}")
    ax.legend()


def write_report_png(report: dict, folder: Path, name: str = "report.png") -> Path:
    throughput = report.get("throughput")
    panels = 2 if throughput else 1
    n_layers = len(rank_grid(report["layers"])[0])
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, max(4.0, 0.22 * n_layers + 2)), squeeze=False)
    title = f"{report['method']} / {report['allocation']}, ratio {report['ratio']['requested']}: ranks"
    plot_ranks(axes[0, 0], report["layers"], title)
    if throughput:
        plot_throughput(axes[0, 1], throughput)
    fig.tight_layout()
    path = Path(folder) / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
