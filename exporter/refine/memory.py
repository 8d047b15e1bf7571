"""What end-to-end refinement holds on its device, as a formula of the shapes, so that a run that cannot fit is
refused before it starts, with the numbers (and docs/e2e-memory.md can say what fits where).

    weights      frozen parameters in the compute dtype + the factors in float32 (the master copies) and, when
                 the compute dtype is a half type, their autocast copies in it
    gradients    float32, one per factor element (DDP adds its reduction buckets: one more)
    optimizer    Adam's two moments, float32
    snapshots    the factors it started from and the best held-out state, float32 (refine/optimise.py): kept on
                 the host, so on a GPU they are reported apart and not counted in the device's total
    activations  every decoder layer's input, kept for the backward (activation checkpointing), plus one
                 layer's own activations while it is recomputed
    logits       one chunk of positions: the teacher's log-probabilities, the student's logits, log-probabilities
                 and their gradient, float32
    teacher      one batch of the dense model's final hidden states (the rest stays memory-mapped on disk)

Sharded (FSDP2, `fully_shard` per decoder layer: refine/sharded.py): the decoder layers' weights, the
gradients, optimizer state and snapshots are divided by the world size, plus one decoder layer gathered whole at
a time; the embeddings and the head (not trained) stay whole on every rank. Sharded and offloaded (FSDP2's
CPUOffloadPolicy, `--e2e-parallel fsdp-offload`): those shards, their gradients and Adam's moments live in host
memory (`offloaded`; Adam steps there); the device holds the head, the layer gathered whole and its factors'
gradients before they are reduce-scattered, and the activations. Data-parallel (DDP): every rank holds all of
it. `parallel_plan` picks among them for --e2e-parallel. The constants of one layer's
recomputed activations are those of a Llama-style layer (attention scores materialised: the CPU kernels do);
they are checked against a measured peak (benchmarks/scale/e2e_memory.py).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace

GiB = 2**30


@dataclass(frozen=True)
class E2EShape:
    """What the formula reads of a model and a run."""
    frozen_params: int  # everything that is not a factor: embeddings, lm_head, norms, biases, dense linears
    factor_params: int  # every up and down of every LowRankLinear
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    largest_layer_params: int  # the decoder layer FSDP gathers whole (compressed)
    batch: int  # calibration sequences per step
    seqlen: int
    chunk: int  # positions per KL chunk
    compute_bytes: int  # 2 (bfloat16/float16 on a GPU) or 4 (float32: CPUs)
    head_params: int = 0  # of frozen_params, those outside the decoder layers (embeddings, final norm, lm_head)


@dataclass(frozen=True)
class E2EMemory:
    weights: int
    gradients: int
    optimizer: int
    snapshots: int
    activations: int
    logits: int
    teacher: int
    offloaded: int = 0  # fsdp-offload: the decoder layers' shards, their gradients and Adam's moments
    host: tuple[str, ...] = ()  # the parts in host memory, not the device's (on a CPU, host and device are one)

    @property
    def parts(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k != "host"}

    @property
    def total(self) -> int:
        """Bytes on the device."""
        return sum(v for k, v in self.parts.items() if k not in self.host)

    @property
    def host_total(self) -> int:
        """Bytes in host memory that are not the device's (0 on a CPU)."""
        return sum(v for k, v in self.parts.items() if k in self.host)

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GiB:.2f}" for name, value in self.parts.items()
                          if name not in self.host and (value or name != "offloaded"))
        host = ", ".join(f"{name} {self.parts[name] / GiB:.2f}" for name in self.host)
        return f"{self.total / GiB:.2f} GiB ({parts})" + (f"; {self.host_total / GiB:.2f} GiB on the host ({host})"
                                                           if self.host else "")


def e2e_memory(s: E2EShape, world_size: int = 1, sharded: bool = False, device_type: str = "cpu",
               offload: bool = False) -> E2EMemory:
    """Bytes one rank holds during an end-to-end refinement step (on a CPU, host and device are one memory).
    `offload`: sharded with FSDP2's CPUOffloadPolicy (`sharded` implied)."""
    sharded = sharded or offload
    half = s.compute_bytes < 4
    factor_weight = 4 + (s.compute_bytes if half else 0)  # float32 masters (+ autocast copies)
    share = world_size if sharded else 1
    # the layer FSDP gathers whole on the device (offloaded: always, even in one process: its shard is on the host)
    gathered = s.largest_layer_params * s.compute_bytes if sharded and (world_size > 1 or offload) else 0
    tokens = s.batch * s.seqlen
    replicated = s.head_params if share > 1 or offload else 0  # sharded: the embeddings and the head stay whole
    recompute = tokens * (10 * s.hidden + 4 * s.intermediate) * 4 + s.batch * s.heads * s.seqlen ** 2 * 4
    shards = ((s.frozen_params - replicated) * s.compute_bytes + s.factor_params * 4) // share
    gradients = s.factor_params * 4 * (2 if world_size > 1 and not sharded else 1) // share
    optimizer = s.factor_params * 8 // share
    # offloaded, the device still holds one gathered layer's factor gradients, until they are reduce-scattered
    layer_gradients = -(-s.factor_params // max(s.layers, 1)) * 4  # guard: a model with no decoder layer
    on_gpu = device_type != "cpu"
    return E2EMemory(
        weights=replicated * s.compute_bytes + gathered
        + (0 if offload else ((s.frozen_params - replicated) * s.compute_bytes
                              + s.factor_params * factor_weight) // share),
        gradients=layer_gradients if offload else gradients,
        optimizer=0 if offload else optimizer,
        snapshots=s.factor_params * 8 // share,
        activations=s.layers * tokens * s.hidden * s.compute_bytes + recompute,
        logits=s.batch * s.chunk * s.vocab * 4 * 4,
        teacher=tokens * s.hidden * s.compute_bytes,
        offloaded=shards + gradients + optimizer if offload else 0,
        host=(("snapshots", "offloaded") if offload else ("snapshots",)) if on_gpu else (),
    )


def shape_of(model, batch: int, seqlen: int, compute_bytes: int, chunk: int, ratio: float | None = None) -> E2EShape:
    """The formula's inputs from a model (a meta skeleton will do). Compressed, its factors are counted as they
    are; not yet (`ratio`: before the run starts), the candidate linears at (1 − ratio) of their parameters,
    the budget every allocation keeps, all of it trainable (the most memory any plan can ask for)."""
    from ..model.architecture import decoder_layers
    from ..model.candidates import list_matrices
    from ..model.discovery import linears_only
    from ..model.lowrank import LowRankLinear

    total = sum(p.numel() for p in model.parameters())
    factors = sum(p.numel() for m in model.modules() if isinstance(m, LowRankLinear) for p in (m.up.weight,
                                                                                                m.down.weight))
    arch = linears_only(model)
    matrices = list_matrices(model, arch)
    if ratio is not None:
        linears = sum(m.dense_params for m in matrices)
        factors, total = int((1 - ratio) * linears), total - linears + int((1 - ratio) * linears)
    config = model.config.get_text_config()
    layers = decoder_layers(model, arch)
    in_layers = sum(p.numel() for p in layers.parameters())
    widest = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or 4 * config.hidden_size
    return E2EShape(frozen_params=total - factors, factor_params=factors, layers=len(layers),
                    hidden=config.hidden_size, intermediate=widest, heads=config.num_attention_heads,
                    vocab=model.get_output_embeddings().weight.shape[0],
                    largest_layer_params=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
                    batch=batch, seqlen=seqlen, chunk=min(chunk, seqlen), compute_bytes=compute_bytes,
                    head_params=sum(p.numel() for p in model.parameters()) - in_layers)


MODES = {"none": "one process", "ddp": "data-parallel, DDP", "fsdp": "sharded, FSDP2",
         "fsdp-offload": "sharded, FSDP2, offloaded to the host"}


def check_fits(need: E2EMemory, available: int, device, world_size: int = 1, mode: str = "none",
               host_available: int | None = None) -> None:
    """One line with the numbers when end-to-end refinement cannot fit, before it starts: on the device, and in
    host memory where `host_available` is given (what the processes of this machine share)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))  # torchrun's: the processes sharing this host
    if need.total <= available and (host_available is None or need.host_total * local <= host_available):
        return
    where = (f"{available / GiB:.2f} GiB is available" if need.total > available else
             f"{host_available / GiB:.2f} GiB of host memory is available to {local} process(es)")
    more = {"none": ", shard it over several devices (torchrun, --e2e-parallel fsdp)",
            "ddp": ", shard it (--e2e-parallel fsdp)", "fsdp": ", offload the shards (--e2e-parallel fsdp-offload)",
            "fsdp-offload": ", shard it over more devices"}[mode]
    raise MemoryError(f"--refine e2e needs {need.describe()} on {device} per process ({MODES[mode]}, world size "
                      f"{world_size}) and {where}: lower --calib-batch-size or --calib-seqlen{more}, use a "
                      f"device with more memory, or --refine block")


def parallel_plan(shape: E2EShape, world_size: int, parallel: str, device, available: int,
                  resident: tuple[int, int] = (0, 0), host_available: int | None = None) -> tuple[str, E2EMemory]:
    """(mode, what one rank needs) for --e2e-parallel `parallel`, checked against `available` bytes of the
    device (and `host_available` of the host, for the offloaded mode on a GPU). "auto": in one process "none",
    on a GPU else "fsdp-offload"; under torchrun the first of ddp, fsdp, fsdp-offload that fits. `resident`:
    bytes of the weights already where they are needed (all of them, those outside the decoder layers):
    data-parallel runs on the model's own layers, the sharded student is a copy of them (refine/sharded.py)."""
    device_type = str(device).split(":")[0]

    def need(mode: str) -> E2EMemory:
        memory = e2e_memory(shape, world_size, mode.startswith("fsdp"), device_type, offload=mode == "fsdp-offload")
        return replace(memory, weights=max(memory.weights - resident[1 if mode.startswith("fsdp") else 0], 0))
    if parallel == "auto":  # one process on a GPU may offload too (on a CPU, host and device are one memory)
        candidates = (["none"] + (["fsdp-offload"] if device_type != "cpu" else []) if world_size <= 1
                      else ["ddp", "fsdp", "fsdp-offload"])
        parallel = next((m for m in candidates if need(m).total <= available), candidates[-1])
    elif parallel == "ddp" and world_size <= 1:
        parallel = "none"
    check_fits(need(parallel), available, device, world_size, parallel,
               host_available if parallel == "fsdp-offload" and device_type != "cpu" else None)
    return parallel, need(parallel)
