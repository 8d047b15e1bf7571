"""Shared by the bad-input tests: tiny random models saved to disk with a character tokenizer, a CLI runner
that returns (exit code, output), and snapshots of a folder to prove nothing beside --out changed."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("bad_inputs_driver.py")
# A tiny run: generated data, few tokens, uniform allocation (v2 refuses random weights' losses <= 1).
FAST = ["--calib-data", "generated", "--calib-samples", "4", "--calib-seqlen", "32", "--eval-data", "none",
        "--allocation", "uniform", "-q"]


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, **{chr(i): i - 31 for i in range(32, 127)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<unk>")


def save_tiny(folder: Path, arch: str = "llama", seed: int = 0) -> Path:
    from conftest import tiny_model
    tiny_model(arch, seed).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: content hash or 'dir' + mode} of everything under `folder`."""
    state = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            mode = oct(path.lstat().st_mode)
            state[rel] = mode + (":" + hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "")
    return state


def cli(args: list[str], env: dict | None = None) -> tuple[int, str]:
    from exporter.cli import main
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    return result.exit_code, result.output


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("svd-export: error:")]


def assert_one_error(output: str, fragment: str) -> None:
    lines = error_lines(output)
    assert len(lines) == 1 and fragment in lines[0], output
    assert "Traceback" not in output, output


def spawn(args: list[str], stage: str | None = None, gate: Path | None = None, ready: Path | None = None,
          env: dict | None = None) -> subprocess.Popen:
    """The CLI in a subprocess; with `stage`, driver.py replaces that stage by one that writes `ready` and
    then waits (in a LAPACK call for 'compress') until `gate` exists (bad_inputs_driver.py)."""
    command = [sys.executable, str(DRIVER), stage or "none", *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                "SVD_TEST_GATE": str(gate or ""), "SVD_TEST_READY": str(ready or ""), **(env or {})}
    return subprocess.Popen(command, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data))
