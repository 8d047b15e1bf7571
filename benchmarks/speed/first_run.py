"""The README's first command, timed; the same command under each OpenMP wait policy (libgomp's default,
PASSIVE, ACTIVE) in interleaved rounds; and the signal latency of a run stuck in a long LAPACK call. Writes
docs/results/first-run.md with the command, the machine's load average and what each printed.

    python -m benchmarks.speed.first_run                     # all three
    python -m benchmarks.speed.first_run --skip-readme --skip-wait-policy  # only the signal latency
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

from benchmarks.common import RESULTS, ROOT, module_name, tests_module


def readme_command() -> list[str]:
    """The `svd-export …` part of the README's first code line."""
    line = next(line for line in (ROOT / "README.md").read_text().splitlines() if "svd-export --model" in line)
    return shlex.split(line[line.index("svd-export --model"):])


def time_readme(work: Path, env: dict | None = None) -> dict:
    command = readme_command()
    command[command.index("--out") + 1] = str(work / "first-run")
    load_before = os.getloadavg()
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "exporter.cli", *command[1:]], cwd=ROOT, capture_output=True,
                          text=True, env=env)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    report = json.loads((work / "first-run" / "report.json").read_text())
    scratch = str(work)  # quoted as OUT: the results file names no path of this machine
    return {"command": shlex.join(command).replace(scratch, "OUT"), "wall_s": wall, "load_before": load_before,
            "load_after": os.getloadavg(), "timings_s": report["timings_s"],
            "threads": os.environ.get("OMP_NUM_THREADS", "(unset)"),
            "summary": proc.stdout.strip().replace(scratch, "OUT")}


POLICIES = ("(unset)", "PASSIVE", "ACTIVE")  # (unset): libgomp's default, a bounded spin, then sleep


def wait_policy(work: Path, rounds: int) -> list[tuple[int, str, float, float, float]]:
    """The README's first command under each OMP_WAIT_POLICY, the policies interleaved within a round so that
    a change of the shared machine's speed falls on all of them. -> (round, policy, wall s, compress s, load)."""
    rows = []
    for round_ in range(1, rounds + 1):
        for policy in POLICIES:
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            if policy != "(unset)":
                env["OMP_WAIT_POLICY"] = policy
            load = os.getloadavg()[0]
            shutil.rmtree(work / "first-run", ignore_errors=True)
            r = time_readme(work, env)
            rows.append((round_, policy, r["wall_s"], r["timings_s"]["compress"], load))
    return rows


def signal_latency(work: Path) -> list[tuple[str, int, float]]:
    helpers = tests_module("bad_inputs_helpers")  # tests/: tiny models, the CLI run with a stand-in stage
    model = helpers.save_tiny(work / "tiny-llama")
    rows = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        ready = work / f"ready-{sig.name}"
        proc = helpers.spawn(["-m", model, *helpers.FAST, "-o", work / "out"], stage="compress", gate=work / "never",
                             ready=ready)
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
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the wait-policy comparison")
    parser.add_argument("--out", type=Path, default=RESULTS / "first-run.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="first-run-"))
    try:
        lines = ["# The first run and signal latency", "",
                 f"`{shlex.join(['python', '-m', module_name(), *sys.argv[1:]])}` on {os.cpu_count()} cores "
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
            lines += ["## OpenMP threads between parallel regions: spin a while (libgomp's default), sleep "
                      "(PASSIVE) or spin (ACTIVE)", "",
                      "The README's first command again under each OMP_WAIT_POLICY, interleaved within each round. "
                      "The CLI leaves the policy to the user (libgomp's default when unset).", "",
                      "| round | OMP_WAIT_POLICY | wall s | compress s | load average (1 min) before |",
                      "|---|---|---|---|---|",
                      *[f"| {n} | {p} | {w:.1f} | {c:.1f} | {lo:.2f} |" for n, p, w, c, lo in wait_policy(work, args.rounds)],
                      ""]
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
