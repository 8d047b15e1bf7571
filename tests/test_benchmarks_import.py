"""Every benchmark script still imports: a refactor of exporter/ that removes what a script uses fails here,
not months later when someone reruns the script (allocation_plans.py and fused_split.py once imported
modules the streamed loop had removed)."""
import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_benchmark_imports(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as `python benchmarks/X.py` puts it on sys.path
    spec = importlib.util.spec_from_file_location(f"benchmark_{script[:-3]}", BENCHMARKS / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)  # runs the module body, not main(): every script guards __main__
    assert script == "command.py" or callable(getattr(module, "main", None))
