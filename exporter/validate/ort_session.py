"""ONNX Runtime sessions for an exported decoder-with-past: providers (CUDA first when available),
graph optimisation level, and OrtDecoder, a thin step function over Optimum's input/output names."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}
ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def default_providers() -> list[str]:
    import onnxruntime as ort
    available = ort.get_available_providers()
    preferred = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return preferred or available


def create_session(path: str | Path, providers: list[str | tuple[str, dict]] | None = None, optimization: str = "all",
                   threads: int = 0, low_memory: bool = False):
    """threads: intra-op threads (0 = ORT's default). ORT silently falls back to CPU when a provider's
    libraries fail to load: the provider actually used is logged, and checked by callers that care.
    low_memory (validation of big models): no constant folding (it would keep a float32 copy of every float16
    weight that the CPU casts), no memory arena and no memory pattern (freed buffers go back to the system);
    the memory-mapped external data is then the only copy of the weights ORT keeps."""
    import onnxruntime as ort
    if optimization not in OPT_LEVELS:
        raise ValueError(f"unknown graph optimization level {optimization!r}; choose from {', '.join(OPT_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                               OPT_LEVELS["disable" if low_memory else optimization])
    options.enable_cpu_mem_arena = options.enable_mem_pattern = not low_memory
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers etc. are noise here
    requested = providers or default_providers()
    session = ort.InferenceSession(str(path), sess_options=options, providers=requested)
    first = requested[0][0] if isinstance(requested[0], tuple) else requested[0]  # (name, provider options)
    if session.get_providers()[0] != first:
        log.warning("ONNX Runtime runs %s on %s, not the requested %s", path, session.get_providers()[0], first)
    return session


class OrtDecoder:
    """One call = one forward of the decoder: new tokens + past → logits + present."""

    def __init__(self, session):
        self.session = session
        inputs = {i.name: i for i in session.get_inputs()}
        self.position_ids = "position_ids" in inputs
        self.num_layers = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
        key = inputs["past_key_values.0.key"]
        self.kv_heads, self.head_size = key.shape[1], key.shape[3]
        self.kv_dtype = ORT_TO_NUMPY[key.type]
        self.outputs = [o.name for o in session.get_outputs()]

    @classmethod
    def load(cls, path: str | Path, **session_kwargs) -> "OrtDecoder":
        return cls(create_session(path, **session_kwargs))

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_size)
        return [np.zeros(shape, self.kv_dtype) for _ in range(2 * self.num_layers)]

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray],
                 position_ids: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        if self.position_ids:
            if position_ids is None:  # left-aligned, unpadded: positions follow the past
                past_len = past[0].shape[2]
                position_ids = np.broadcast_to(np.arange(past_len, past_len + input_ids.shape[1]), input_ids.shape)
            feed["position_ids"] = np.ascontiguousarray(position_ids, dtype=np.int64)
        for i in range(self.num_layers):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        logits, *present = self.session.run(self.outputs, feed)
        return logits, present

    def prefill(self, input_ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        return self(input_ids, np.ones_like(input_ids), self.empty_past(input_ids.shape[0]))

    def logits_fn(self):
        """For validate.perplexity: input ids [1, L] (torch) → float32 logits [1, L, V] (torch)."""
        def run(ids: torch.Tensor) -> torch.Tensor:
            logits, _ = self.prefill(ids.cpu().numpy())
            return torch.from_numpy(logits.astype(np.float32))
        return run
