"""Prefill / decode tokens/s of an exported decoder under ONNX Runtime, and of a PyTorch model under
`generate`, with the same protocol: random prompt ids [batch, prefill], then `decode` single-token steps
on the KV cache; warm-up runs, then the median of several repetitions.

ONNX Runtime runs with IO binding on preallocated buffers, so the decode loop allocates nothing and copies
nothing to the host. Two KV protocols:
  - shared (a graph whose genai_config.json says `past_present_share_buffer`: the fused graph, whose
    GroupQueryAttention writes each new key into the past buffer): one buffer of the final length per KV
    tensor, bound as both past and present; every decode step has the same shapes and addresses (a static
    [batch, final length] mask whose ones say the valid length), which is what onnxruntime-genai does and
    what CUDA graphs need (`cuda_graph`: the decode steps are captured once and replayed);
  - alternating (the plain graph, which concatenates past and new keys into present): per KV tensor two
    flat buffers of the final length, used in turn (step t reads its past from one and writes its present
    into the other: an op must not read and write one buffer).
Input and output names and the KV layout [batch, kv_heads, past, head_dim] are read from the session,
never written per model."""
from __future__ import annotations

import json
import os
import re
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .providers import CUDA, device_of

PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
ORT_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}  # KV and logits element types


def default_threads() -> int:
    """OMP_NUM_THREADS when set, else PyTorch's current intra-op thread count."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else torch.get_num_threads()


@dataclass(frozen=True)
class ThroughputSettings:
    batch: int = 4  # the papers' setting
    prefill: int = 1024
    decode: int = 256
    warmup: int = 1
    repeats: int = 3
    # Intra-op threads of both PyTorch and ONNX Runtime, one number for every row: more threads than free
    # cores makes PyTorch's rows many times slower on a shared machine (docs/throughput.md, "Threads").
    threads: int = field(default_factory=default_threads)

    def __post_init__(self):
        for key, value in asdict(self).items():
            if value < (0 if key == "warmup" else 1):
                raise ValueError(f"throughput {key} must be >= {0 if key == 'warmup' else 1}, got {value}")


def default_settings(provider: str) -> ThroughputSettings:
    if provider == CUDA:
        return ThroughputSettings()
    return ThroughputSettings(batch=1, prefill=128, decode=32, warmup=1, repeats=3)  # minutes, not hours


@contextmanager
def torch_threads(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Timing:
    prefill_s: float
    decode_s: float


def rates(timings: list[Timing], settings: ThroughputSettings, peak_gpu_mb: float | None) -> dict:
    """Median times -> tokens/s. End-to-end: generated tokens over prefill + decode time."""
    prefill_s = statistics.median(t.prefill_s for t in timings)
    decode_s = statistics.median(t.decode_s for t in timings)
    if prefill_s <= 0 or decode_s <= 0:  # guard: a clock that did not advance gives no rate
        raise RuntimeError(f"non-positive measured time (prefill {prefill_s} s, decode {decode_s} s)")
    generated = settings.batch * settings.decode
    return {"prefill_tokens_s": settings.batch * settings.prefill / prefill_s, "decode_tokens_s": generated / decode_s,
            "end_to_end_tokens_s": generated / (prefill_s + decode_s), "prefill_s": prefill_s, "decode_s": decode_s,
            "peak_gpu_mb": peak_gpu_mb}


def measure(run_once, settings: ThroughputSettings) -> list[Timing]:
    for _ in range(settings.warmup):
        run_once()
    return [run_once() for _ in range(settings.repeats)]


def gpu_free_bytes() -> int | None:
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None


# ---------------------------------------------------------------- ONNX Runtime


@dataclass(frozen=True)
class DecoderSignature:
    """What the benchmark needs to know about an exported decoder, read from its session."""
    past: tuple[str, ...]  # past_key_values.{i}.key|value, in layer order
    present: tuple[str, ...]  # the matching present.{i}.key|value outputs
    kv_heads: int
    head_dim: int
    kv_dtype: type
    vocab: int
    logits_dtype: type
    extra_inputs: tuple[str, ...]  # attention_mask / position_ids, where the graph has them


def _static(dim, what: str, fallback: int | None) -> int:
    if isinstance(dim, int):
        return dim
    if fallback is None:
        raise ValueError(f"the decoder's {what} dimension is symbolic ({dim!r}) and config.json does not give it")
    return int(fallback)


def read_signature(session, config: dict | None = None) -> DecoderSignature:
    config = config or {}
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if "input_ids" not in inputs or "logits" not in outputs:
        raise ValueError(f"not a decoder graph: inputs {sorted(inputs)[:4]}, outputs {sorted(outputs)[:4]}")
    past = sorted((n for n in inputs if PAST.match(n)),
                  key=lambda n: (int(PAST.match(n).group(1)), PAST.match(n).group(2) == "value"))
    if not past:
        raise ValueError("the decoder has no past_key_values.{i}.key/value inputs: it cannot decode with a KV cache")
    present = tuple(n.replace("past_key_values.", "present.", 1) for n in past)
    missing = [n for n in present if n not in outputs]
    if missing:
        raise ValueError(f"the decoder has no output {missing[0]} for its input {past[present.index(missing[0])]}")
    first = inputs[past[0]]
    heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (config["hidden_size"] // config["num_attention_heads"]
                                          if config.get("hidden_size") and config.get("num_attention_heads") else None)
    kv_dtype, logits_dtype = ORT_NUMPY.get(first.type), ORT_NUMPY.get(outputs["logits"].type)
    if kv_dtype is None or logits_dtype is None:
        raise ValueError(f"unsupported KV/logits element types {first.type} / {outputs['logits'].type}")
    return DecoderSignature(
        past=tuple(past), present=present, kv_heads=_static(first.shape[1], "kv-heads", heads),
        head_dim=_static(first.shape[3], "head", head_dim), kv_dtype=kv_dtype,
        vocab=_static(outputs["logits"].shape[-1], "vocabulary", config.get("vocab_size")), logits_dtype=logits_dtype,
        extra_inputs=tuple(n for n in ("attention_mask", "position_ids") if n in inputs))


@dataclass(frozen=True)
class Buffer:
    """A flat device buffer and its element type; bound under any shape that fits in it."""
    value: object  # onnxruntime.OrtValue
    dtype: type

    def pointer(self, offset_elements: int = 0) -> int:
        return self.value.data_ptr() + offset_elements * np.dtype(self.dtype).itemsize


class OrtDecodeLoop:
    """Preallocated buffers + IO binding for one session and one (batch, prefill, decode) setting."""

    def __init__(self, session, signature: DecoderSignature, provider: str, settings: ThroughputSettings,
                 vocab_limit: int | None = None, seed: int = 0, shared_kv: bool = False, cuda_graph: bool = False):
        from onnxruntime import OrtValue, RunOptions
        if cuda_graph and not shared_kv:
            raise ValueError("CUDA graphs need the shared KV buffer (static decode shapes): this graph's "
                             "genai_config.json does not declare past_present_share_buffer")
        self.session, self.sig, self.s, self.shared_kv = session, signature, settings, shared_kv
        self.prefill_options = RunOptions()
        if cuda_graph:  # the prefill has other shapes than the decode steps: never captured
            self.prefill_options.add_run_config_entry("gpu_graph_id", "-1")
        self.device = device_of(provider)
        b, p, d = settings.batch, settings.prefill, settings.decode
        total = p + d
        ids = np.random.default_rng(seed).integers(0, vocab_limit or signature.vocab, size=(b, total), dtype=np.int64)

        def put(array: np.ndarray) -> Buffer:
            array = np.ascontiguousarray(array)
            return Buffer(OrtValue.ortvalue_from_numpy(array, self.device, 0), array.dtype.type)

        def empty(elements: int, dtype) -> Buffer:
            return Buffer(OrtValue.ortvalue_from_shape_and_type([elements], dtype, self.device, 0), dtype)

        self.prompt = put(ids[:, :p])
        self.prompt_positions = put(np.broadcast_to(np.arange(p, dtype=np.int64), (b, p)))
        # decode step t reads row t of these [decode, batch] tables
        step_ids = np.ascontiguousarray(ids[:, p:].T)
        step_positions = np.ascontiguousarray(np.broadcast_to(np.arange(p, total, dtype=np.int64)[:, None], (d, b)))
        self.mask = put(np.ones(b * total, dtype=np.int64))  # all ones: any prefix is a [batch, length] mask
        kv_elements = b * signature.kv_heads * total * signature.head_dim
        self.kv = {name: tuple(empty(kv_elements, signature.kv_dtype) for _ in range(1 if shared_kv else 2))
                   for name in signature.past}
        self.logits = empty(b * p * signature.vocab, signature.logits_dtype)
        if shared_kv:  # the step's inputs at fixed addresses, rewritten in place from the host tables
            self.total = total
            self.host_ids, self.host_positions = step_ids.reshape(d, b, 1), step_positions.reshape(d, b, 1)
            self.host_masks = (np.arange(total)[None, None, :] < np.arange(p + 1, total + 1)[:, None, None]) \
                .repeat(b, axis=1).astype(np.int64)  # [decode, batch, total]: ones for the first p + t + 1
            self.token, self.position = put(self.host_ids[0]), put(self.host_positions[0])
            self.static_mask = put(self.host_masks[0])
        else:  # the tables on the device: one pointer offset per step, no copies
            self.step_ids, self.step_positions = put(step_ids), put(step_positions)

    def _bind(self, io, name: str, buffer: Buffer, shape, offset: int = 0, output: bool = False):
        bind = io.bind_output if output else io.bind_input
        bind(name, self.device, 0, buffer.dtype, list(shape), buffer.pointer(offset))

    def _step(self, ids: Buffer, positions: Buffer, offset: int, seqlen: int, past_len: int, parity: int,
              mask: tuple[Buffer, int] | None = None, options=None):
        """One forward pass. `mask`: (buffer, width) bound as the attention mask instead of the all-ones prefix of
        length past_len + seqlen. Shared KV: past and present are one buffer of the final length."""
        b, sig = self.s.batch, self.sig
        io = self.session.io_binding()
        self._bind(io, "input_ids", ids, (b, seqlen), offset)
        if "attention_mask" in sig.extra_inputs:
            buffer, width = mask or (self.mask, past_len + seqlen)
            self._bind(io, "attention_mask", buffer, (b, width))
        if "position_ids" in sig.extra_inputs:
            self._bind(io, "position_ids", positions, (b, seqlen), offset)
        for past, present in zip(sig.past, sig.present):
            if self.shared_kv:
                (read,) = (write,) = self.kv[past]
                past_shape = present_shape = (b, sig.kv_heads, self.total, sig.head_dim)
            else:
                read, write = self.kv[past][parity], self.kv[past][1 - parity]
                past_shape = (b, sig.kv_heads, past_len, sig.head_dim)
                present_shape = (b, sig.kv_heads, past_len + seqlen, sig.head_dim)
            self._bind(io, past, read, past_shape)
            self._bind(io, present, write, present_shape, output=True)
        self._bind(io, "logits", self.logits, (b, seqlen, sig.vocab), output=True)
        self.session.run_with_iobinding(io, options)
        io.synchronize_outputs()

    def _shared_step(self, t: int) -> None:
        """Decode step t on the shared KV buffer: token, position and the static mask (ones for the first
        prefill + t + 1 positions) are written in place, so every step binds the same shapes and addresses."""
        self.token.value.update_inplace(self.host_ids[t])
        self.position.value.update_inplace(self.host_positions[t])
        self.static_mask.value.update_inplace(self.host_masks[t])
        self._step(self.token, self.position, 0, 1, past_len=self.s.prefill + t, parity=0,
                   mask=(self.static_mask, self.total))

    def run_once(self) -> Timing:
        b, p = self.s.batch, self.s.prefill
        start = time.perf_counter()
        self._step(self.prompt, self.prompt_positions, 0, p, past_len=0, parity=0, options=self.prefill_options)
        prefilled = time.perf_counter()
        for t in range(self.s.decode):
            if self.shared_kv:
                self._shared_step(t)
            else:  # the present of step t is the past of step t+1: buffers alternate
                self._step(self.step_ids, self.step_positions, t * b, 1, past_len=p + t, parity=1 - t % 2)
        return Timing(prefilled - start, time.perf_counter() - prefilled)

    def last_logits(self) -> np.ndarray:
        """[batch, vocab] logits of the last step run (copies to the host; for checks)."""
        b, v = self.s.batch, self.sig.vocab
        return self.logits.value.numpy()[: b * v].reshape(b, v)


def folder_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def shares_kv_buffer(folder: Path) -> bool:
    """Whether the graph in `folder` writes its present KV into the past buffer (genai_config.json's
    past_present_share_buffer, which the fused writer sets and the plain export does not)."""
    path = Path(folder) / "genai_config.json"
    return path.exists() and bool(json.loads(path.read_text()).get("search", {}).get("past_present_share_buffer"))


def ort_throughput(model_path: str | Path, provider: str, settings: ThroughputSettings,
                   vocab_limit: int | None = None, cuda_graph: bool = False) -> dict:
    """Open the session (provider checked), run the protocol, release the session. Tokens/s + peak GPU MB.
    The KV protocol follows the graph (shared buffer where it declares one); `cuda_graph` (CUDA only) captures
    the decode step once and replays it."""
    from .providers import open_session
    model_path = Path(model_path)
    free_before = gpu_free_bytes() if provider == CUDA else None
    session = open_session(model_path, provider, threads=settings.threads, cuda_graph=cuda_graph)
    try:
        signature = read_signature(session, folder_config(model_path.parent))
        loop = OrtDecodeLoop(session, signature, provider, settings, vocab_limit,
                             shared_kv=shares_kv_buffer(model_path.parent), cuda_graph=cuda_graph)
        timings = measure(loop.run_once, settings)
        # ORT's arena keeps its peak: device memory in use now minus before the session is that peak
        peak = (free_before - gpu_free_bytes()) / 2**20 if free_before is not None else None
        return rates(timings, settings, peak)
    finally:
        del session


# ---------------------------------------------------------------- PyTorch eager


class StepClock:
    """A logits processor that only reads the clock: generate calls it once per forward pass, after the
    logits exist, so call 0 ends the prefill and calls 1..decode end the decode steps."""

    def __init__(self, cuda: bool):
        self.cuda, self.stamps = cuda, []

    def __call__(self, input_ids, scores):
        if self.cuda:
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return scores


@torch.no_grad()
def eager_throughput(model, settings: ThroughputSettings, seed: int = 0) -> dict:
    """`generate` with its KV cache, greedy, exactly settings.decode steps after the prefill (EOS disabled)."""
    from transformers import LogitsProcessorList
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(seed)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (settings.batch, settings.prefill), generator=gen).to(device)
    mask = torch.ones_like(ids)
    steps = settings.decode + 1  # the prefill's token, then `decode` single-token forward passes

    def run_once() -> Timing:
        clock = StepClock(cuda)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                       do_sample=False, use_cache=True, pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
        if len(clock.stamps) != steps:
            raise RuntimeError(f"generate ran {len(clock.stamps)} forward passes, expected {steps}")
        return Timing(clock.stamps[0] - start, clock.stamps[-1] - clock.stamps[0])

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with torch_threads(settings.threads):
        timings = measure(run_once, settings)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return rates(timings, settings, peak)
