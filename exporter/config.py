"""Frozen configuration objects: one per pipeline stage, JSON round-trip.

The CLI turns flags into these; the library takes them. Nothing else reads flags.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

ONNX_GRAPHS = ("auto", "fused", "plain")
METHODS = ("svd", "asvd", "fwsvd", "svd-llm", "svd-llm-v2", "adasvd")
ALLOCATIONS = ("uniform", "v2", "adacr", "global-relative", "global-fisher", "global-fisher-per-type")
REFINES = ("none", "block", "e2e", "block+e2e")
E2E_PARALLEL = ("auto", "ddp", "fsdp", "fsdp-offload")
SCHEDULES = ("constant", "cosine")
# The allocation each method's paper used, when --allocation is not given.
DEFAULT_ALLOCATION = {"svd-llm-v2": "v2", "adasvd": "adacr"}

# --quantize int4|int8: MatMulNBits weights (exporter/onnx/fused/quantize.py): a K×N matmul weight cut, per
# output column, into blocks of `block_size` along K, each block `bits`-bit integers with one scale.
QUANTIZE_CHOICES = {"int4": 4, "int8": 8}
# --quantizer: "gptq" puts the weights on that grid in the layer loop (exporter/quantize), "nearest" rounds
# each weight to nearest as the graph is written (ONNX Runtime's quantizer). docs/results/front.md compares them.
QUANTIZERS = ("gptq", "nearest")
# The defaults were measured on SmolLM2-135M, ORT CPU (docs/results/front.md): GPTQ at block 64 with the lm_head
# (and its tied table) at the decoder's 4 bits is smaller on disk than block 32 with an 8-bit head (78.2 against
# 100.8 MB), smaller, better and faster than onnxruntime-genai's own int4 (86.5 MB; validation 24.89 against
# 25.72; decode 100.9 against 97.2 tok/s); symmetric, accuracy level 4: docs/results/throughput-cpu.md.
DEFAULT_BLOCK_SIZE = 64


@dataclass(frozen=True)
class Quantization:
    bits: int = 4
    block_size: int = DEFAULT_BLOCK_SIZE
    symmetric: bool = True  # no zero points
    accuracy_level: int = 4  # MatMulNBits' compute type: 4 = int8 activations (CPU), 0 = the activations' type
    head_bits: int | None = None  # the lm_head's bits; None: the decoder's

    def __post_init__(self):
        if self.head_bits is None:
            object.__setattr__(self, "head_bits", self.bits)
        if self.bits not in QUANTIZE_CHOICES.values() or self.head_bits not in QUANTIZE_CHOICES.values():
            raise ValueError(f"quantization bits must be 4 or 8, got {self.bits} (lm_head {self.head_bits})")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"--block-size must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy level must be 0-4, got {self.accuracy_level}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def head(self) -> "Quantization":
        """The lm_head's setting: head_bits, the rest as for the decoder's linears."""
        return Quantization(self.head_bits, self.block_size, self.symmetric, self.accuracy_level, self.head_bits)

    @classmethod
    def parse(cls, name: str | None, block_size: int = DEFAULT_BLOCK_SIZE,
              head_bits: int | None = None) -> "Quantization | None":
        """'int4' | 'int8' | None/'none' -> the setting (None: float weights)."""
        if name in (None, "none"):
            return None
        if name not in QUANTIZE_CHOICES:
            raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {name!r}")
        return cls(bits=QUANTIZE_CHOICES[name], block_size=block_size, head_bits=head_bits)


def graph_dtype(export_dtype):
    """The ONNX graph's float type for an export dtype: bfloat16 (no ONNX Runtime CPU kernels) is written as
    float16. Quantization scales are chosen in it, so that the graph stores them exactly."""
    import torch
    return {torch.float32: torch.float32, torch.float16: torch.float16, torch.bfloat16: torch.float16}[export_dtype]


def default_min_retention(ratio: float) -> float:
    """AdaSVD's mrr when none is given: 0.4, the middle of the paper's tuned 0.3–0.5, capped at 3/4 of the
    target retention 1 − ratio (0.3 at 60%, the value the paper used there). A fixed 0.4 would make adaCR
    uniform at 60% and invalid above it."""
    return min(0.4, 0.75 * (1.0 - ratio))


@dataclass(frozen=True)
class CalibrationConfig:
    source: str = "wikitext2"  # "wikitext2" | "generated" | path to .txt/.raw/.tokens/.jsonl
    samples: int = 256
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 1
    allow_overlap: bool = False  # fewer tokens than samples × seqlen: overlapping windows instead of an error


def held_out_count(total: int, holdout: float) -> int:
    """How many of `total` (>= 2) calibration batches refinement holds out for early stopping: ⌈holdout·total⌉,
    at least one, and at least one left to train on (refine/optimise.py split_batches; recipe.e2e_steps)."""
    return min(total - 1, max(1, math.ceil(holdout * total)))


@dataclass(frozen=True)
class Refinement:
    """Settings of --refine: block (exporter/refine/block.py) and end-to-end (exporter/refine/e2e.py) refinement."""
    steps: int = 0  # Adam steps (one calibration batch each); 0 = the closed form, unchanged
    lr: float = 1e-3  # per step, relative to the RMS of each factor
    holdout: float = 0.125  # fraction of the calibration batches kept for early stopping
    eval_every: int = 8  # steps between two held-out evaluations
    patience: int = 3  # evaluations without a new best before stopping
    # The never-worse check on the training batches: 0 = all of them; k = k of them, evenly spaced (fixed)
    check_batches: int = 0
    # "constant": lr at every step; "cosine": linear warm-up over the first steps/8, then cosine decay to 0 at `steps`
    schedule: str = "constant"

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"--refine-steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"--refine-lr must be > 0, got {self.lr}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"--refine-holdout must be in (0, 1), got {self.holdout}")
        if self.eval_every < 1 or self.patience < 1:
            raise ValueError("refinement: eval_every and patience must be >= 1")
        if self.check_batches < 0:
            raise ValueError(f"refinement: check_batches must be >= 0, got {self.check_batches}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown step-size schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")


@dataclass(frozen=True)
class CompressionConfig:
    method: str = "svd-llm-v2"
    ratio: float = 0.2  # fraction of the compressed linears' parameters removed
    allocation: str | None = None  # None: the method's paper default (DEFAULT_ALLOCATION, else uniform)
    # Where the next layer's calibration inputs come from: the original layers (SVD-LLM v1) or the
    # already-compressed ones (needed by adaComp, whose target is the original output).
    propagate: str | None = None  # None: "compressed" for adasvd, else "original"
    min_rank: int = 1
    rank_multiple: int = 1  # every rank a multiple of this (exporter/plan/rounding.py), the budget still met
    adacomp_iterations: int = 1
    adacomp_strength: float = 0.25  # β: adaComp's target is W(β X_o + (1 − β) X_c); 1 = the paper's (docs/adasvd.md)
    adacomp_damping: float = 0.1  # λ of adaComp's down step, relative to the mean eigenvalue of X_c X_cᵀ
    min_retention: float | None = None  # AdaSVD's mrr; None: default_min_retention(ratio)
    asvd_alpha: float = 0.5
    budget_bytes: int | None = None  # alternative to ratio: when set, it replaces `ratio` (exporter/plan/budget.py)
    skip: tuple[str, ...] = ()  # module-name substrings never compressed
    # A planned rank keeping at least this share of a matrix's parameters: the matrix stays dense. 1 = off; the
    # default recipe uses 0.9 (exporter/recipe.py).
    keep_dense_above: float = 1.0
    # Block refinement (exporter/refine/optimise.py): Adam on each layer's factors towards the dense layer's output.
    # Then end-to-end refinement (exporter/refine/e2e.py): Adam on all factors towards the dense model's logits.
    refine: str = "none"  # "none" | "block" | "e2e" | "block+e2e"
    recipe: str = ""  # "default": these settings are the default recipe's (exporter/recipe.py); "": chosen by hand
    refine_steps: int = 64
    refine_lr: float = 1e-3
    refine_holdout: float = 0.125
    # Refinement.check_batches: the never-worse check on 16 training batches at most; at 16 x 256 calibration (14
    # training batches) that is all of them, at 256 x 2048 (224) it runs 2 x 16 forward passes instead of 2 x 224.
    # Measured on SmolLM2 at 0.4 (validation, docs/quality.md): 4 batches took the same decisions on all 30 layers.
    refine_check_batches: int = 16
    # Block refinement's target: β·dense(X_o) + (1 − β)·dense(X_c), β = this (1: the dense layer on the original
    # inputs, the closed form's adaComp uses 0.25 for its own target)
    refine_target_strength: float = 1.0
    # --quantize with --quantizer gptq: every linear of each layer put on the MatMulNBits grid in the layer loop
    # (exporter/quantize); None: float weights here (--quantizer nearest rounds them as the graph is written)
    quantization: Quantization | None = None
    # with a quantization: block refinement optimises the factors through their rounding (exporter/quantize/fake.py).
    # Off: measured on SmolLM2 at 0.2 int4 (docs/results/front.md), validation 40.07 through the rounding against
    # 39.03 in float, GPTQ rounding the refined factors either way (one seed).
    refine_rounded: bool = False
    # with a quantization: every dense linear of the decoder gets a float rank-r correction of its grid error
    # beside it (exporter/quantize/correction.py); 0 = none
    correction_rank: int = 0
    # Adam steps of end-to-end refinement; None: refine_steps (block and e2e alike). More e2e data wants more
    # steps: each step is one batch (docs/quality.md, the e2e data study).
    e2e_steps: int | None = None
    # Step size of end-to-end refinement, relative to each factor's RMS; None: refine_lr (block and e2e alike)
    e2e_lr: float | None = None
    # Step-size schedule of end-to-end refinement (Refinement.schedule); block refinement's steps are constant
    e2e_schedule: str = "constant"
    # Under torchrun: end-to-end refinement data-parallel ("ddp": every rank holds the whole student), sharded
    # ("fsdp": FSDP2 per decoder layer, exporter/refine/sharded.py), sharded with the shards, gradients and Adam's
    # moments in host memory ("fsdp-offload": FSDP2's CPUOffloadPolicy, for 70B), or "auto": the first of those
    # that its memory formula fits on the device (exporter/refine/memory.py). One process: none of them.
    e2e_parallel: str = "auto"

    def __post_init__(self):
        if isinstance(self.quantization, dict):  # from a run's config.json (resume)
            object.__setattr__(self, "quantization", Quantization(**self.quantization))
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"--ratio must be in [0, 1): it is the fraction of parameters removed, got {self.ratio}")
        if self.ratio == 0 and self.budget_bytes is None and self.quantization is None:
            raise ValueError("--ratio 0 removes nothing: there is nothing to compress (with --quantize it is GPTQ alone)")
        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        if self.propagate not in (None, "original", "compressed"):
            raise ValueError(f"--propagate must be 'original' or 'compressed', got {self.propagate!r}")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise ValueError(f"--budget must be a positive number of bytes, got {self.budget_bytes}")
        if not 0.0 <= self.adacomp_strength <= 1.0:
            raise ValueError(f"--adacomp-strength must be in [0, 1], got {self.adacomp_strength}")
        if self.rank_multiple < 1:
            raise ValueError(f"--rank-multiple must be >= 1, got {self.rank_multiple}")
        if not 0.0 < self.keep_dense_above <= 1.0:
            raise ValueError(f"--keep-dense-above must be in (0, 1], got {self.keep_dense_above}")
        if not self.adacomp_damping > 0:
            raise ValueError(f"--adacomp-damping must be > 0, got {self.adacomp_damping}")
        if self.min_retention is not None and not 0.0 < self.min_retention <= 1.0:
            raise ValueError(f"--min-retention must be in (0, 1], got {self.min_retention}")
        if not 0.0 <= self.refine_target_strength <= 1.0:
            raise ValueError(f"refine_target_strength must be in [0, 1], got {self.refine_target_strength}")
        if self.refine not in REFINES:
            raise ValueError(f"unknown --refine {self.refine!r}; choose one of {', '.join(REFINES)}")
        if self.refine_block and self.propagate == "original":
            raise ValueError("--refine block fits each layer to inputs propagated through the compressed layers: "
                             "it cannot run with --propagate original")
        if self.quantization is not None and self.refine_e2e and self.e2e_parallel.startswith("fsdp"):
            raise ValueError("end-to-end refinement on the --quantize grid runs in one process or data-parallel: "
                             f"--e2e-parallel {self.e2e_parallel} does not shard it (use auto or ddp)")
        if self.correction_rank < 0:
            raise ValueError(f"--correction-rank must be >= 0, got {self.correction_rank}")
        if self.correction_rank and self.quantization is None:
            raise ValueError("--correction-rank corrects the grid of --quantize int4/int8 with --quantizer gptq")
        if self.e2e_parallel not in E2E_PARALLEL:
            raise ValueError(f"unknown --e2e-parallel {self.e2e_parallel!r}; choose one of {', '.join(E2E_PARALLEL)}")
        if self.e2e_steps is not None and not self.refine_e2e:
            raise ValueError("--e2e-steps sets the steps of end-to-end refinement: add --refine e2e or block+e2e")
        if self.e2e_schedule != "constant" and not self.refine_e2e:
            raise ValueError("--e2e-schedule sets the step sizes of end-to-end refinement: add --refine e2e or block+e2e")
        if self.e2e_lr is not None and not self.refine_e2e:
            raise ValueError("--e2e-lr sets the step size of end-to-end refinement: add --refine e2e or block+e2e")
        self.refinement, self.e2e_refinement  # bad refinement settings are one clear error here

    @property
    def refinement(self) -> "Refinement":
        return Refinement(steps=self.refine_steps, lr=self.refine_lr, holdout=self.refine_holdout,
                          check_batches=self.refine_check_batches)

    @property
    def e2e_refinement(self) -> "Refinement":
        return dataclasses.replace(self.refinement, steps=self.refine_steps if self.e2e_steps is None
                                   else self.e2e_steps, lr=self.refine_lr if self.e2e_lr is None else self.e2e_lr,
                                   schedule=self.e2e_schedule)

    @property
    def refine_block(self) -> bool:
        return "block" in self.refine.split("+")

    @property
    def e2e_parallel_run(self) -> str:
        """--e2e-parallel as it runs: on the --quantize grid `auto` never shards (the factors' fake quantization,
        exporter/quantize/fake.py, is not built for FSDP2's sharded parameters): one process or data-parallel."""
        return "ddp" if self.quantization is not None and self.e2e_parallel == "auto" else self.e2e_parallel

    @property
    def refine_e2e(self) -> bool:
        return "e2e" in self.refine.split("+")

    @property
    def allocation_name(self) -> str:
        return self.allocation or DEFAULT_ALLOCATION.get(self.method, "uniform")

    @property
    def propagation(self) -> str:
        return self.propagate or ("compressed" if self.method == "adasvd" or self.refine_block else "original")


@dataclass(frozen=True)
class EvalConfig:
    source: str = "wikitext2"
    max_tokens: int | None = None  # cap on evaluated tokens, None = whole split
    seqlen: int = 2048  # window; capped by the model's own limit


@dataclass(frozen=True)
class RunConfig:
    model: str = "smollm2-135m"
    out: str = "svd-export-out"
    formats: tuple[str, ...] = ("safetensors",)
    dtype: str | None = None  # export dtype; None: the checkpoint's (float32 for a de-quantized GGUF)
    device: str | None = None  # None: cuda when available
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    evaluation: EvalConfig | None = field(default_factory=EvalConfig)
    opset: int = 18  # ONNX opset of the export
    # "fused": built from the weights with ORT's fused ops (exporter/onnx/fused); "plain": dynamo export + rewrite;
    # "auto": fused for the families the builder knows, plain for the others (report.json says which)
    onnx_graph: str = "auto"
    quantize: str | None = None  # "int4" | "int8": MatMulNBits weights in the fused graph (exporter/config.py)
    block_size: int = DEFAULT_BLOCK_SIZE  # quantization block along K
    head_bits: int | None = None  # the lm_head's bits (and the embedding table's where the graph packs it); None: --quantize's
    parity: bool = True  # ONNX: parity and ORT perplexity against PyTorch after the export
    validations: tuple[str, ...] = ()  # extra checks of the ONNX export, e.g. ("throughput",)
    # The sequences end-to-end refinement trains and stops early on (--e2e-data/-samples/-seqlen); None: the
    # calibration batches. Carried through the dense layers beside them: the teacher is their last hidden states.
    e2e_data: CalibrationConfig | None = None

    def __post_init__(self):
        if self.onnx_graph not in ONNX_GRAPHS:
            raise ValueError(f"--onnx-graph must be one of {', '.join(ONNX_GRAPHS)}, got {self.onnx_graph!r}")
        self.quantization  # checks the name, the block size and the head's bits
        if self.quantize is not None and self.onnx_graph == "plain":
            raise ValueError("--quantize writes MatMulNBits while the fused graph is built: it needs --onnx-graph fused")
        if self.e2e_data is not None and not self.compression.refine_e2e:
            raise ValueError("--e2e-data, --e2e-samples and --e2e-seqlen set the data of end-to-end refinement: "
                             "add --refine e2e or block+e2e")
        grid = self.compression.quantization
        if grid is not None and grid != self.quantization:
            raise ValueError(f"the layer loop's grid {grid} is not the graph's ({self.quantization})")

    @property
    def quantization(self) -> Quantization | None:
        """The graph's MatMulNBits setting; None: float weights."""
        return Quantization.parse(self.quantize, self.block_size, self.head_bits)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        d = json.loads(text)
        return cls(
            **{k: v for k, v in d.items() if k not in ("compression", "calibration", "evaluation", "formats",
                                                       "validations", "e2e_data")},
            formats=tuple(d["formats"]), validations=tuple(d.get("validations", ())),
            compression=CompressionConfig(**{**d["compression"], "skip": tuple(d["compression"]["skip"])}),
            calibration=CalibrationConfig(**d["calibration"]),
            evaluation=EvalConfig(**d["evaluation"]) if d["evaluation"] else None,
            e2e_data=CalibrationConfig(**d["e2e_data"]) if d.get("e2e_data") else None,
        )
