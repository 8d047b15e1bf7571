"""What the benchmark scripts share: the repository's folders, the command line a results file quotes, and
SmolLM2-135M with its wikitext-2 calibration and test tokens."""
from __future__ import annotations

import importlib.util
import os
import shlex
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2"  # this machine's local copy of wikitext-2
TESTS = ROOT / "tests"


def module_name() -> str:
    """`benchmarks.<group>.<name>` of the script being run: `python -m` names it in __main__'s spec; else
    (a script started by its path) the path of sys.argv[0] under the repository."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name.startswith("benchmarks."):
        return spec.name
    path = Path(sys.argv[0]).resolve()
    try:
        return ".".join(path.relative_to(ROOT).with_suffix("").parts)
    except ValueError:  # not a file of this repository
        return path.stem


def command_line() -> str:
    """The command line the script was run with, as its results file quotes it: the thread count included,
    since it changes every timing. On the device machine an argument under $OUT (its output folder) is
    quoted as `$OUT/...`, not as that machine's path."""
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    out = os.environ.get("OUT")
    args = [shlex.quote(x) for x in sys.argv[1:]]
    if out:
        args = [f"$OUT{x[len(out):]}" if x == out or x.startswith(out.rstrip("/") + "/") else x for x in args]
    return f"{threads}python -m {module_name()} " + " ".join(args)


def smollm2():
    """SmolLM2-135M in float32 on the CPU. -> (model, tokenizer)."""
    from exporter.load.open import load
    model, tokenizer, _ = load("smollm2-135m", "float32", "cpu")
    return model, tokenizer


def calibration(model, tokenizer, samples: int, seqlen: int, seed: int = 0) -> list:
    """`samples` windows of `seqlen` tokens of wiki.valid.tokens, one per batch."""
    from exporter.data.windows import calibration_batches
    return calibration_batches(model, tokenizer, str(WIKITEXT / "wiki.valid.tokens"), samples, seqlen, seed)


def wiki_test_tokens(model, tokenizer, count: int):
    """The first `count` tokens of wiki.test.raw, one stream."""
    from exporter.data.windows import evaluation_tokens
    return evaluation_tokens(model, tokenizer, str(WIKITEXT / "wiki.test.raw"), count)


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every `interval` seconds)."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval

    def __enter__(self):
        import psutil
        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def tests_module(name: str):
    """A helper module of tests/ (families.py, bad_inputs_helpers.py), imported from its file: tests/ is no
    package and stays off sys.path. Its own `from conftest import ...` finds tests/conftest.py, imported the
    same way first (pytest has it under that name already when a test imports the benchmark)."""
    for module in ("conftest", name):
        if module not in sys.modules:
            spec = importlib.util.spec_from_file_location(module, TESTS / f"{module}.py")
            sys.modules[module] = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(sys.modules[module])
            except BaseException:
                del sys.modules[module]
                raise
    return sys.modules[name]
