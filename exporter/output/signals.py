"""SIGTERM/SIGINT/SIGHUP during a CLI run: exit within a fraction of a second, leave nothing behind.

The work runs in a worker thread and the main thread only waits. Python runs signal handlers in the main
thread between bytecodes, so a handler in the thread doing the work would wait for a long LAPACK call to
return (minutes on a 7B-wide layer); the waiting main thread runs it at once. The handler removes what the
run created beside --out (output_dir.abandon), prints one line and leaves with os._exit(128 + signal):
143 for SIGTERM, 130 for SIGINT. Further signals while it cleans up are ignored (no second traceback).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable, TypeVar

from . import folder as output_dir

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
WORKER_STACK = 64 * 2**20  # deep exporter recursion (torch.export) must not hit a small thread stack
T = TypeVar("T")


def exit_code(signum: int) -> int:
    return 128 + signum


def on_signal(signum, _frame) -> None:
    for s in HANDLED:
        signal.signal(s, signal.SIG_IGN)
    kept = output_dir.abandon()
    line = f"svd-export: interrupted ({signal.Signals(signum).name}); nothing was written under the output name"
    if kept:
        line += "; kept for --resume: " + ", ".join(str(p) for p in kept)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os.write(2, (line + "\n").encode())
    os._exit(exit_code(signum))


def run_interruptible(work: Callable[[], T]) -> T:
    """Run `work` in a worker thread with the handlers installed; re-raise its exception here."""
    box: dict = {}

    def target():
        try:
            box["result"] = work()
        except BaseException as exc:  # noqa: BLE001 — handed to the main thread as is
            box["error"] = exc

    previous = {s: signal.getsignal(s) for s in HANDLED}
    for s in HANDLED:
        signal.signal(s, on_signal)
    old_stack = threading.stack_size(WORKER_STACK)
    try:
        worker = threading.Thread(target=target, name="svd-export-work", daemon=True)
        worker.start()
        threading.stack_size(old_stack)
        while worker.is_alive():
            worker.join(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if "error" in box:
        raise box["error"]
    return box.get("result")
