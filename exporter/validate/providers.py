"""ONNX Runtime sessions on a provider that is checked, not assumed.

ORT falls back to the CPU *silently* (one log line) when the CUDA libraries do not load, so a session
asked for CUDA is opened, then `get_providers()[0]` is compared with what was asked: a mismatch is an
error, never a CPU number reported as a GPU one."""
from __future__ import annotations

from pathlib import Path

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
CHOICES = ("auto", "cuda", "cpu")


def _ort():
    import onnxruntime as ort
    return ort


def resolve_provider(requested: str = "auto") -> str:
    """'auto' -> CUDA when this ONNX Runtime build has it, else CPU; 'cuda' must be available."""
    if requested not in CHOICES:
        raise ValueError(f"unknown provider {requested!r}; choose one of {', '.join(CHOICES)}")
    available = _ort().get_available_providers()
    if requested == "cpu":
        return CPU
    if CUDA in available:
        return CUDA
    if requested == "cuda":
        raise RuntimeError(f"CUDA was requested but this ONNX Runtime build has no {CUDA} (available: "
                           f"{', '.join(available)}); install onnxruntime-gpu instead of onnxruntime")
    return CPU


def check_provider(session, wanted: str) -> None:
    got = session.get_providers()[0]
    if got != wanted:
        raise RuntimeError(f"ONNX Runtime runs this session on {got}, not the requested {wanted}: the CUDA "
                           f"libraries did not load (check the CUDA/cuDNN versions onnxruntime-gpu needs)")


def open_session(model_path: str | Path, provider: str, threads: int = 0, cuda_graph: bool = False):
    """An InferenceSession whose first provider is `provider`, or an error that says why not.
    threads: intra-op threads (0: ONNX Runtime's default, one per physical core). cuda_graph: the CUDA provider
    captures a run's kernels once and replays them (every node must then run on CUDA: ORT refuses otherwise)."""
    from .ort_session import create_session
    ort = _ort()
    if provider == CUDA and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels (torch's), where the system has none
    if cuda_graph and provider != CUDA:
        raise ValueError(f"CUDA graphs need the {CUDA}, not {provider}")
    # CPU runs the ops CUDA does not have; with CUDA graphs no node may run there
    providers = [provider] if provider == CPU else [(provider, {"enable_cuda_graph": "1"})] if cuda_graph \
        else [provider, CPU]
    session = create_session(model_path, providers=providers, threads=threads)
    check_provider(session, provider)
    return session


def device_of(provider: str) -> str:
    """The OrtValue device type that goes with a provider."""
    return "cuda" if provider == CUDA else "cpu"
