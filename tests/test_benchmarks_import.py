"""Every benchmark module still imports: a refactor of exporter/ that removes what a script uses fails here,
not months later when someone reruns the script (allocation_plans.py and fused_split.py once imported
modules the streamed loop had removed). The modules are found by walking benchmarks/, so a new script is
covered without a line here; each is imported as `python -m benchmarks.<group>.<name>` imports it."""
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
if str(ROOT) not in sys.path:  # `python -m pytest` in the root puts it there; a bare `pytest` does not
    sys.path.insert(0, str(ROOT))


def module_names() -> list[str]:
    """benchmarks, benchmarks.common, benchmarks.<group> and every benchmarks.<group>.<name>."""
    names = []
    for path in sorted(BENCHMARKS.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_the_walk_finds_every_group():
    names = module_names()
    assert {"benchmarks", "benchmarks.common", "benchmarks.quality.smollm2", "benchmarks.speed.gpu",
            "benchmarks.scale.scale"} <= set(names)
    assert {name.split(".")[1] for name in names if name.count(".") == 2} == {"quality", "speed", "scale"}


@pytest.mark.parametrize("name", module_names())
def test_benchmark_imports(name, monkeypatch):
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, loaded)  # import it afresh: the module body runs here
    module = importlib.import_module(name)  # runs the module body, not main(): every script guards __main__
    assert Path(module.__file__).is_relative_to(BENCHMARKS)  # this repository's, not another `benchmarks`
    is_script = name.count(".") == 2 and not module.__file__.endswith("__init__.py")
    assert callable(getattr(module, "main", None)) or not is_script


def test_command_line_quotes_the_module(monkeypatch):
    """The command a results file quotes: `python -m benchmarks.<group>.<name> args`, the thread count first
    when set, an argument under the device's $OUT as `$OUT/...`."""
    common = importlib.import_module("benchmarks.common")
    main = types.ModuleType("__main__")
    main.__spec__ = importlib.util.find_spec("benchmarks.quality.smollm2")
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / "quality" / "smollm2.py"), "--split", "test", "--rows", "a b"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("OUT", raising=False)
    assert common.command_line() == "OMP_NUM_THREADS=1 python -m benchmarks.quality.smollm2 --split test --rows 'a b'"
    main.__spec__ = None  # started another way: the module is the path of sys.argv[0]
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / "speed" / "gpu.py"), "render", "--results", "/dev/out/gpu.json"])
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("OUT", "/dev/out")
    assert common.command_line() == "python -m benchmarks.speed.gpu render --results $OUT/gpu.json"
