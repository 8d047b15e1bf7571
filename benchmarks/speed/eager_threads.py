"""PyTorch eager `generate` throughput of SmolLM2-135M with 1 and with 2 intra-op threads, alternated, with
the machine's load: why the throughput rows must run with one stated thread count (docs/throughput.md,
"Threads"; issue 13's 10× slower eager row).

    python -m benchmarks.speed.eager_threads

Writes docs/results/eager-threads.md.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone

from benchmarks.common import RESULTS, command_line, smollm2
from exporter.validate.throughput import ThroughputSettings, eager_throughput


def main():
    command = command_line()
    model, _ = smollm2()
    lines = ["| round | threads | prefill tok/s | decode tok/s | load before | load after |", "|---|---|---|---|---|---|"]
    for round_ in range(2):
        for threads in (1, 2):
            before = os.getloadavg()[0]
            r = eager_throughput(model, ThroughputSettings(batch=1, prefill=64, decode=16, warmup=1, repeats=2,
                                                           threads=threads))
            lines.append(f"| {round_} | {threads} | {r['prefill_tokens_s']:.1f} | {r['decode_tokens_s']:.2f} | "
                         f"{before:.1f} | {os.getloadavg()[0]:.1f} |")
            print(lines[-1], flush=True)
    text = ["# PyTorch eager throughput against its thread count on a shared machine", "",
            f"    {command}", "",
            f"SmolLM2-135M float32, `generate` with its KV cache, batch 1, prefill 64, decode 16, median of 2 "
            f"after one warm-up; {os.cpu_count()} CPUs shared with other jobs (load = 1-minute load average), "
            f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.", "", *lines, ""]
    out = RESULTS / "eager-threads.md"
    out.write_text("\n".join(text))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
