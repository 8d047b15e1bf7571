"""What a deployment pipeline does to a run: signals at several stages (also inside a long LAPACK call),
repeated signals, SIGKILL then a new run, and two runs racing for one output name. Real subprocesses of
the CLI (bad_inputs_driver.py holds a stage open at a known point)."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from bad_inputs_helpers import FAST, error_lines, save_tiny, snapshot, spawn

EXIT_WITHIN_S = 30  # a bound for the test, not a measurement: the LAPACK stand-in alone runs for minutes


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("model") / "llama")


def wait_for(path: Path, proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before the stage:\n{proc.communicate()[1]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the stage was never reached")
        time.sleep(0.05)


def run_until(stage: str, llama: Path, tmp_path: Path, extra=(), out_name="out"):
    """Start a run that stops at `stage`; returns (process, out, gate)."""
    out = tmp_path / "work" / out_name
    out.parent.mkdir(exist_ok=True)
    gate, ready = tmp_path / f"gate-{out_name}", tmp_path / f"ready-{out_name}"
    proc = spawn(["-m", llama, *FAST, "-o", out, *extra], stage=stage, gate=gate, ready=ready)
    wait_for(ready, proc)
    return proc, out, gate


@pytest.mark.parametrize("stage, sig, extra", [
    ("load", signal.SIGTERM, ()),
    ("compress", signal.SIGTERM, ()),  # inside a long LAPACK call
    ("compress", signal.SIGINT, ()),
    ("save", signal.SIGTERM, ()),  # the partial folder is full
    ("onnx", signal.SIGTERM, ("--format", "onnx", "--skip-parity")),  # the dense-ONNX work folder exists
    ("save", signal.SIGHUP, ()),
], ids=["term-load", "term-lapack", "int-lapack", "term-save", "term-onnx", "hup-save"])
def test_a_signal_exits_at_once_with_its_code_and_leaves_nothing(llama, tmp_path, stage, sig, extra):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "neighbour.txt").write_text("not ours")
    before = snapshot(tmp_path / "work")
    proc, out, _ = run_until(stage, llama, tmp_path, extra)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=EXIT_WITHIN_S)
    assert proc.returncode == 128 + sig, err
    assert err.strip().splitlines()[-1].startswith(f"svd-export: interrupted ({sig.name})"), err
    assert "Traceback" not in err, err
    assert snapshot(tmp_path / "work") == before


def test_repeated_signals_are_quiet(llama, tmp_path):
    (tmp_path / "work").mkdir()
    proc, out, _ = run_until("compress", llama, tmp_path)
    for _ in range(5):
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=EXIT_WITHIN_S)
    assert proc.returncode == 143
    assert [line for line in err.splitlines() if "interrupted" in line] == [
        "svd-export: interrupted (SIGTERM); nothing was written under the output name"], err
    assert "Traceback" not in err and list((tmp_path / "work").iterdir()) == []


def test_after_sigkill_the_next_run_removes_the_leftovers(llama, tmp_path):
    (tmp_path / "work").mkdir()
    proc, out, _ = run_until("save", llama, tmp_path)
    proc.kill()
    proc.communicate(timeout=EXIT_WITHIN_S)
    left = sorted(p.name for p in (tmp_path / "work").iterdir())
    assert ".out.lock" in left and any(n.startswith(".out.partial-") for n in left), left
    second = spawn(["-m", llama, *FAST, "-o", out])
    _, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["out"]


@pytest.mark.parametrize("first_overwrite", [False, True], ids=["plain-then-overwrite", "overwrite-then-plain"])
def test_two_runs_on_one_name_never_both_succeed(llama, tmp_path, first_overwrite):
    """Both orders of a run with and one without --overwrite; the second fails at once, the first finishes.
    Then the name is free: without --overwrite the finished folder is refused, with it replaced."""
    flag = ["--overwrite"]
    first, out, gate = run_until("load", llama, tmp_path, flag if first_overwrite else [])
    second = spawn(["-m", llama, *FAST, "-o", out, *([] if first_overwrite else flag)])
    _, err2 = second.communicate(timeout=120)
    assert second.returncode == 1
    assert len(error_lines(err2)) == 1 and f"another svd-export run (pid {first.pid}) is writing" in err2, err2
    gate.write_text("go")
    _, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    third = spawn(["-m", llama, *FAST, "-o", out, *(flag if first_overwrite else [])])
    _, err3 = third.communicate(timeout=300)
    if first_overwrite:
        assert third.returncode == 0, err3
    else:
        assert third.returncode == 1 and "exists and is not empty" in err3, err3
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_quiet_run_prints_nothing_on_stderr(llama, tmp_path):
    """-q silences every bar, ours and transformers' (loading weights, writing shards) and warnings."""
    proc = spawn(["-m", llama, "--calib-data", "generated", "--calib-samples", "4", "--calib-seqlen", "32",
                  "--eval-data", "generated", "--eval-tokens", "128", "--eval-seqlen", "32", "--allocation", "uniform",
                  "-q", "-o", tmp_path / "out"])
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and stderr == "", stderr
    assert stdout.strip().splitlines()[-1] == f"wrote {tmp_path / 'out'}/"
