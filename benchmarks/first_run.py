"""The README's first command, timed; the OpenMP wait policy's effect on text generation with 2 threads on a
shared machine; and the signal latency of a run stuck in a long LAPACK call. Writes docs/results/first-run.md
with the command, the machine's load average and what each printed.

    python benchmarks/first_run.py                # both
    python benchmarks/first_run.py --skip-readme  # only the signal latency (a tiny random model)
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def readme_command() -> list[str]:
    """The `svd-export …` part of the README's first code line."""
    line = next(line for line in (ROOT / "README.md").read_text().splitlines() if "svd-export --model" in line)
    return shlex.split(line[line.index("svd-export --model"):])


def time_readme(work: Path) -> dict:
    command = readme_command()
    command[command.index("--out") + 1] = str(work / "first-run")
    load_before = os.getloadavg()
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "exporter.cli", *command[1:]], cwd=ROOT, capture_output=True,
                          text=True)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    report = json.loads((work / "first-run" / "report.json").read_text())
    return {"command": shlex.join(command), "wall_s": wall, "load_before": load_before, "load_after": os.getloadavg(),
            "timings_s": report["timings_s"], "threads": os.environ.get("OMP_NUM_THREADS", "(unset)"),
            "summary": proc.stdout.strip()}


WAIT_POLICY_PROBE = """
import os, time, torch
from transformers import AutoModelForCausalLM, LlamaConfig
from exporter.data.windows import generate_samples
torch.manual_seed(0)
config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)  # SmolLM2-135M's shape
model = AutoModelForCausalLM.from_config(config).eval()
class Vocab:
    def __len__(self):
        return 49152
start, cpu = time.monotonic(), time.process_time()
generate_samples(model, Vocab(), 8, 64, 0, progress=False)
print(torch.get_num_threads(), time.monotonic() - start, time.process_time() - cpu, *os.getloadavg())
"""


def wait_policy(rounds: int = 2) -> list[tuple[str, int, float, float, float]]:
    """8 samples x 64 tokens of SmolLM2-shaped random weights, 2 threads, libgomp spinning or sleeping."""
    rows = []
    for _ in range(rounds):
        for policy in ("ACTIVE", "PASSIVE"):
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
            env.update(OMP_WAIT_POLICY=policy, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))
            out = subprocess.run([sys.executable, "-c", WAIT_POLICY_PROBE], env=env, capture_output=True, text=True,
                                 check=True).stdout.split()
            rows.append((policy, int(out[0]), float(out[1]), float(out[2]), float(out[3])))
    return rows


def signal_latency(work: Path) -> list[tuple[str, int, float]]:
    from bad_inputs_helpers import FAST, save_tiny, spawn
    model = save_tiny(work / "tiny-llama")
    rows = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        ready = work / f"ready-{sig.name}"
        proc = spawn(["-m", model, *FAST, "-o", work / "out"], stage="compress", gate=work / "never", ready=ready)
        while not ready.exists():
            time.sleep(0.05)
        time.sleep(3)  # inside the stand-in's 3000x3000 float64 SVD
        start = time.monotonic()
        proc.send_signal(sig)
        proc.communicate()
        rows.append((sig.name, proc.returncode, time.monotonic() - start))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-readme", action="store_true")
    parser.add_argument("--skip-wait-policy", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "first-run.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="first-run-"))
    try:
        lines = ["# The first run and signal latency", "",
                 f"`{shlex.join(['python', 'benchmarks/first_run.py', *sys.argv[1:]])}` on {os.cpu_count()} cores "
                 f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}). The machine is shared: its load "
                 "average is printed with each number.", ""]
        if not args.skip_readme:
            r = time_readme(work)
            lines += ["## The README's first command", "", f"    {r['command']}", "",
                      f"wall time **{r['wall_s']:.1f} s**; load average (1, 5, 15 min) before "
                      f"{', '.join(f'{x:.2f}' for x in r['load_before'])}, after "
                      f"{', '.join(f'{x:.2f}' for x in r['load_after'])}", "",
                      "| stage | seconds |", "|---|---|",
                      *[f"| {k} | {v:.1f} |" for k, v in r["timings_s"].items()], "", "```", r["summary"], "```", ""]
        if not args.skip_wait_policy:
            lines += ["## OpenMP threads: spinning (ACTIVE) or sleeping (PASSIVE) between parallel regions", "",
                      "Generated text, 8 samples x 64 tokens, SmolLM2-135M-shaped random weights, 2 threads. "
                      "The CLI sets OMP_WAIT_POLICY=PASSIVE unless the user set it.", "",
                      "| OMP_WAIT_POLICY | threads | wall s | cpu s | load average (1 min) before |", "|---|---|---|---|---|",
                      *[f"| {p} | {n} | {w:.1f} | {c:.1f} | {l:.2f} |" for p, n, w, c, l in wait_policy()], ""]
        load = os.getloadavg()
        rows = signal_latency(work)
        lines += ["## Signal to exit, inside a long LAPACK call", "",
                  "A tiny run whose compression stage is a loop of 3000x3000 float64 SVDs "
                  "(tests/bad_inputs_driver.py), signalled 3 s into it; seconds from the signal to the exit. "
                  f"Load average before: {', '.join(f'{x:.2f}' for x in load)}.", "",
                  "| signal | exit code | seconds |", "|---|---|---|",
                  *[f"| {name} | {code} | {dt:.3f} |" for name, code, dt in rows], ""]
        args.out.write_text("\n".join(lines))
        print("\n".join(lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
