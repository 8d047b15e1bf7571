"""Everything that can be checked before a weight is loaded, so that a bad argument costs seconds, not the
run: output path, data files, options that do not apply, opset, device, network, and — from the model's
config.json alone — its architecture, positions, (for --budget) its dense size and (for --refine e2e) the
memory end-to-end refinement will need."""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import socket
import tempfile
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import torch

from .config import RunConfig
from .output.folder import check_out_path

log = logging.getLogger(__name__)
NETWORK_TIMEOUT_S = 3.0


class PreflightError(ValueError):
    pass


def preflight(config: RunConfig, overwrite: bool = False) -> None:
    """Raise one clear error for the first problem found; change nothing on disk."""
    check_output(config.out, overwrite)
    check_options(config)
    for flag, source in (("--calib-data", config.calibration.source),
                         ("--eval-data", config.evaluation.source if config.evaluation else None),
                         ("--e2e-data", config.e2e_data.source if config.e2e_data else None)):
        check_data_source(flag, source)
    if "onnx" in config.formats:
        check_opset_supported(config.opset)
    check_device(config.device)
    model_config, location = model_config_of(config.model, needs_wikitext=uses_wikitext(config),
                                             full=config.compression.budget_bytes is not None)
    check_not_inside_model(Path(config.out), location)
    check_model_config(config, model_config)


# --- output --------------------------------------------------------------------------------------------

def check_output(out: str, overwrite: bool) -> None:
    path = check_out_path(out)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {path} exists and is not empty (use --overwrite)")
    ancestor = path.parent.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise PreflightError(f"--out {out}: {ancestor} is a file, not a folder")
    try:  # the real test (permissions, read-only mounts, root): create and remove a file there
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe-", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PreflightError(f"--out {out}: cannot write in {ancestor} ({exc.strerror})") from exc


def check_not_inside_model(out: Path, model_location: Path | None) -> None:
    """--overwrite into (or around) the input model would delete it while it is being read."""
    if model_location is None:
        return
    out, model = out.resolve(), model_location.resolve()
    if out == model or model in out.parents or out in model.parents:
        raise PreflightError(f"--out {out} overlaps the input model folder {model}: write the result elsewhere")


# --- options -------------------------------------------------------------------------------------------

def check_options(config: RunConfig) -> None:
    """Options that cannot apply to this configuration (visible from the config values alone)."""
    c = config.compression
    if c.min_retention is not None and c.allocation_name != "adacr":
        raise PreflightError(f"--min-retention is adaCR's minimum retention; allocation {c.allocation_name!r} "
                             "ignores it (use --allocation adacr or drop --min-retention)")
    if c.method == "adasvd" and c.propagation != "compressed":
        raise PreflightError("--method adasvd needs --propagate compressed (adaComp pairs the inputs of the "
                             "original and the compressed layers)")
    batches = -(-config.calibration.samples // config.calibration.batch_size)
    if c.refine != "none" and batches < 2:
        raise PreflightError(f"--refine {c.refine} holds out calibration batches for early stopping and needs at least 2; "
                             f"got {batches} (raise --calib-samples or lower --calib-batch-size)")
    e2e = config.e2e_data
    if e2e is not None and -(-e2e.samples // e2e.batch_size) < 2:
        raise PreflightError(f"--refine {c.refine} holds out end-to-end batches for early stopping and needs at least 2; "
                             f"got {-(-e2e.samples // e2e.batch_size)} (raise --e2e-samples)")
    unknown = set(config.formats) - {"safetensors", "onnx"}
    if unknown:
        raise PreflightError(f"unknown --format {sorted(unknown)[0]!r}; choose from safetensors, onnx")
    if "throughput" in config.validations and "onnx" not in config.formats:
        raise PreflightError("--validate throughput measures the ONNX export: add --format onnx")
    if c.refine_e2e and c.e2e_parallel in ("ddp", "fsdp") and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise PreflightError(f"--e2e-parallel {c.e2e_parallel} says how the processes of torchrun share end-to-end "
                             "refinement: run under torchrun --nproc_per_node N (N >= 2), or drop it")
    if config.calibration.allow_overlap and config.calibration.source == "generated":
        raise PreflightError("--calib-overlap applies to text files and wikitext2; generated samples never overlap")


def uses_wikitext(config: RunConfig) -> bool:
    return "wikitext2" in (config.calibration.source, config.evaluation.source if config.evaluation else None,
                           config.e2e_data.source if config.e2e_data else None)


def check_data_source(flag: str, source: str | None) -> None:
    from .data.text import SOURCES, DataError, check_text_file

    if source is None or source in SOURCES:
        return
    try:
        check_text_file(source)
    except DataError as exc:
        raise PreflightError(f"{flag}: {exc}") from exc


def check_opset_supported(opset: int) -> None:
    """The opset the exporter needs (>= 18) and one this ONNX Runtime can run: asked from ORT itself."""
    from .onnx.plain import check_opset

    check_opset(opset)
    if not _ort_runs_opset(opset):
        import onnxruntime

        highest = max(v for v in range(18, opset) if _ort_runs_opset(v)) if _ort_runs_opset(18) else None
        raise PreflightError(f"--opset {opset}: ONNX Runtime {onnxruntime.__version__} does not support it"
                             + (f" (highest: {highest})" if highest else ""))


def _ort_runs_opset(opset: int) -> bool:
    import onnxruntime
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    try:
        onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 — ORT raises its own Fail/InvalidGraph types
        return False
    return True


def check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise PreflightError(f"--device {device!r} is not a device (cpu, cuda, cuda:0, ...)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PreflightError(f"--device {device}: no CUDA device is available here (use --device cpu)")


# --- the model, from its config ------------------------------------------------------------------------

def hub_reachable(timeout: float = NETWORK_TIMEOUT_S) -> bool:
    """One TCP connection to the hub endpoint, a few seconds at most: huggingface_hub would instead retry
    every request for a minute, printing each retry. Behind a proxy the direct connection proves nothing:
    then the hub is assumed reachable and huggingface_hub's own errors apply."""
    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def go_offline() -> None:
    """Make huggingface_hub, transformers and datasets use their local caches only, without retries."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config
        datasets.config.HF_HUB_OFFLINE = True
        datasets.config.HF_DATASETS_OFFLINE = True
    except ImportError:
        pass


def model_config_of(spec: str, needs_wikitext: bool = False, full: bool = False):
    """(config, local folder or None) of --model, reading config.json / the GGUF header only. A hub id is
    looked up once: with no network it must be in the local cache, else one error line. For a GGUF file
    the config is the header's architecture and context length unless `full` (transformers' GGUF config
    parses the whole tokenizer: seconds)."""
    from transformers import AutoConfig

    from .load.integrity import check_gguf_file
    from .load.names import ModelLoadError, resolve

    try:
        source = resolve(spec)
    except ModelLoadError as exc:
        raise PreflightError(str(exc)) from exc
    local = Path(source.location)
    if source.gguf_file:
        header = check_gguf_file(local / source.gguf_file)
        if needs_wikitext:
            check_network()
        if full:
            return _config(AutoConfig, spec, source.location, gguf_file=source.gguf_file), local
        return gguf_config(header), local
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise PreflightError(f"--model {spec}: the folder has no config.json, it is not a Hugging Face model")
        if needs_wikitext:
            check_network()
        return _config(AutoConfig, spec, source.location), local
    if spec.startswith(("/", "./", "../", "~")) or spec.endswith("/") or spec.count("/") > 1:
        raise PreflightError(f"--model {spec}: no such model folder")
    online = check_network()
    try:
        return _config(AutoConfig, spec, source.location, local_files_only=not online), None
    except PreflightError as exc:
        if online:
            raise
        raise PreflightError(f"--model {spec} ({source.location}) is not in the local Hugging Face cache and "
                             f"{offline_reason()}: connect, or give a local folder or .gguf file") from exc


_DETECTED = {"offline": False}  # True once hub_reachable() failed in this process


def offline_reason() -> str:
    return "the hub cannot be reached (no network)" if _DETECTED["offline"] else "HF_HUB_OFFLINE is set"


def check_network() -> bool:
    """True when the hub may be used. Offline (HF_HUB_OFFLINE, or no connection): caches only, from now on."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        go_offline()
        return False
    if not hub_reachable():
        _DETECTED["offline"] = True
        go_offline()
        return False
    return True


def gguf_config(header: dict) -> SimpleNamespace:
    """The two fields preflight needs, from a GGUF header: model_type and max_position_embeddings."""
    arch = header.get("general.architecture", "?")
    return SimpleNamespace(model_type=arch, max_position_embeddings=header.get(f"{arch}.context_length"))


def _config(auto_config, spec: str, location: str, **kwargs):
    try:
        return auto_config.from_pretrained(location, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PreflightError(f"--model {spec}: cannot read its config ({first})") from exc


def check_model_config(config: RunConfig, model_config) -> None:
    """The architecture from its config alone: a meta-device skeleton must be a causal LM whose decoder
    layers discovery finds (the input groups need a forward, later). A GGUF header is checked by its load."""
    if not isinstance(model_config, SimpleNamespace):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        from .model.discovery import DiscoveryError, check_causal_lm, find_decoder_layers
        kind = getattr(model_config, "model_type", type(model_config).__name__)
        if getattr(model_config, "is_encoder_decoder", False):
            raise PreflightError(f"--model {config.model}: architecture {kind!r} is an encoder-decoder; "
                                 "only decoder-only causal LMs are supported")
        try:
            with init_empty_weights(include_buffers=False):
                skeleton = AutoModelForCausalLM.from_config(model_config)
        except ValueError as exc:  # transformers knows no causal-LM class for this config
            raise PreflightError(f"--model {config.model}: architecture {kind!r} has no causal LM class in "
                                 "transformers (AutoModelForCausalLM); only decoder-only causal LMs are supported") from exc
        try:
            check_causal_lm(skeleton)
            find_decoder_layers(skeleton)
        except (DiscoveryError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PreflightError(f"--model {config.model}: {first}") from exc
    positions = getattr(model_config, "max_position_embeddings", None)
    for flag, data in (("--calib-seqlen", config.calibration), ("--e2e-seqlen", config.e2e_data)):
        if positions and data is not None and data.seqlen > positions:
            raise PreflightError(f"{flag} {data.seqlen} exceeds the model's {positions} positions "
                                 "(max_position_embeddings)")
    if config.compression.budget_bytes is not None:
        check_budget(config, model_config)
    if config.compression.refine_e2e and not isinstance(model_config, SimpleNamespace):
        check_e2e_memory(config, model_config)


def check_e2e_memory(config: RunConfig, model_config) -> None:
    """--refine e2e holds the whole compressed model and its factors' optimiser state on the compute device (under
    torchrun data-parallel, or 1/N of it sharded: --e2e-parallel): the most any plan of this ratio can ask for
    (refine/memory.py), against what the device has now. (A GGUF's header does not say the shapes without a full
    parse; its run is checked before the refinement itself.)"""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .load.open import available_bytes, pick_device
    from .refine.e2e import KL_CHUNK
    from .refine.memory import parallel_plan, shape_of
    device = pick_device(config.device)
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    compute_bytes = 4 if device.type == "cpu" else compute_dtype(config, model_config).itemsize  # CPUs: float32
    ratio = config.compression.ratio if config.compression.budget_bytes is None else 0.0  # a budget: the most
    data = config.e2e_data or config.calibration  # what end-to-end refinement trains on
    shape = shape_of(skeleton, data.batch_size, data.seqlen, compute_bytes, KL_CHUNK, ratio=ratio)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's (the process group is joined later, by run)
    parallel_plan(shape, world, config.compression.e2e_parallel_run, device, available_bytes(device),
                  host_available=available_bytes(torch.device("cpu")))


def settle_default(config: RunConfig, allocation: bool, refinement: bool) -> RunConfig:
    """The default recipe's choices that depend on the model and the device: its allocation (`allocation`: no
    --allocation was given) and its last refinement step (`refinement`: no --refine was given). The model's full
    config (seconds for a GGUF file: its tokenizer is parsed) is read once, and only where a choice needs it."""
    model_config = functools.cache(lambda: model_config_of(config.model, full=True)[0])
    if allocation:
        config = settle_default_allocation(config, model_config)
    if refinement:
        config = settle_default_refinement(config, model_config)
    return config


def settle_default_allocation(config: RunConfig, model_config) -> RunConfig:
    """The default recipe allocates with global-fisher up to GLOBAL_FISHER_UP_TO (exporter/recipe.py), and with
    AdaSVD's adaCR above it: a --budget is first turned into the ratio it comes to, and the recipe's name then
    says why (report.json `recipe`). `model_config`: () -> the model's full config."""
    from .recipe import GLOBAL_FISHER_UP_TO
    c = config.compression
    if not c.recipe.startswith("default") or c.allocation != "global-fisher" or c.budget_bytes is None:
        return config
    ratio = check_budget(config, model_config())
    if ratio <= GLOBAL_FISHER_UP_TO:
        return config
    why = f"a --budget of ratio {ratio:.3f}, above {GLOBAL_FISHER_UP_TO} where global-fisher was measured better"
    return dataclasses.replace(config, compression=dataclasses.replace(c, allocation=None,
                                                                       recipe=with_reason(c.recipe, f"adacr: {why}")))


def with_reason(recipe: str, reason: str) -> str:
    """"default" -> "default (reason)"; "default (a)" -> "default (a; reason)"."""
    return f"{recipe[:-1]}; {reason})" if recipe.endswith(")") else f"{recipe} ({reason})"


def compute_dtype(config: RunConfig, model_config) -> torch.dtype:
    """The dtype the model is held and exported in (a GPU computes in it; CPUs in float32, load/checkpoint.py):
    --dtype, else the checkpoint's (float32 when it says none)."""
    from .load.open import parse_dtype
    stored = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    return parse_dtype(config.dtype) if config.dtype else (
        stored if isinstance(stored, torch.dtype) else parse_dtype(stored) if stored else torch.float32)


def settle_default_refinement(config: RunConfig, model_config) -> RunConfig:
    """The default recipe ends with end-to-end refinement on E2E_SAMPLES windows of the calibration text
    (exporter/recipe.py), for one pass over them (unless --e2e-steps says), wherever it can run: here the memory
    formula of refine/memory.py is checked against this device. A run it does not fit, one on --quantize's grid
    (not measured there yet), on generated calibration text, or on windows shorter than E2E_MIN_SEQLEN tokens
    keeps block refinement alone, and the recipe's name says why (report.json `recipe`). `model_config`: () ->
    the model's full config."""
    from .load.open import pick_device
    from .recipe import E2E_MIN_SEQLEN, e2e_data, e2e_steps
    c, cal = config.compression, config.calibration
    if not c.recipe.startswith("default") or c.refine != "block":
        return config
    data = e2e_data(cal)  # None: the calibration batches themselves
    own = data or cal
    why = None
    if c.quantization is not None:
        why = ("--quantize gptq: end-to-end refinement on the grid (--refine block+e2e) is not measured against "
               "block refinement alone yet")
    elif cal.source == "generated":
        why = "generated calibration text: end-to-end refinement on it made real text worse (docs/quality.md)"
    elif own.seqlen < E2E_MIN_SEQLEN:
        why = (f"calibration windows of {own.seqlen} tokens: end-to-end refinement on windows shorter than "
               f"{E2E_MIN_SEQLEN} tokens changed nothing where measured (exporter/recipe.py)")
    else:
        steps = c.e2e_steps
        if steps is None:  # one pass over its own training batches (exporter/recipe.py), unless --e2e-steps says
            world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's (the process group is joined later)
            steps = e2e_steps(-(-own.samples // own.batch_size), c.refine_holdout, world, c.refine_steps)
        upgraded = dataclasses.replace(config, compression=dataclasses.replace(c, refine="block+e2e", e2e_steps=steps),
                                       e2e_data=data)
        try:
            check_e2e_memory(upgraded, model_config())
            return upgraded
        except MemoryError as exc:  # the numbers go to the log: the recipe is part of --resume's settings
            log.warning("the default recipe refines block by block only: %s", " ".join(str(exc).split()))
            why = f"end-to-end refinement does not fit {pick_device(config.device)} (refine/memory.py)"
    return dataclasses.replace(config, compression=dataclasses.replace(c, recipe=with_reason(c.recipe,
                                                                                          f"block only: {why}")))


def check_budget(config: RunConfig, model_config) -> float:
    """A budget the dense model already meets compresses nothing: refused (measured on a meta skeleton
    built from the config, no weights read). -> the ratio of the compressed linears it comes to."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .model.candidates import list_matrices
    from .model.discovery import linears_only
    from .model.experts import unfuse_experts
    from .plan.budget import ratio_for_budget

    dtype = compute_dtype(config, model_config)  # counted in the export dtype (a GGUF is de-quantized to float32)
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    unfuse_experts(skeleton)  # MoE experts count as the per-expert linears they are compressed as
    return ratio_for_budget(skeleton, list_matrices(skeleton, linears_only(skeleton), config.compression.skip),
                            config.compression.budget_bytes, dtype)


# --- flags the user gave that do not apply (the CLI knows which were given) ----------------------------

ONLY_WITH = {  # option -> (applies?, what it needs)
    "opset": (lambda c: "onnx" in c.formats, "--format onnx"),
    "skip_parity": (lambda c: "onnx" in c.formats, "--format onnx"),
    "onnx_graph": (lambda c: "onnx" in c.formats, "--format onnx"),
    "quantize": (lambda c: "onnx" in c.formats, "--format onnx"),
    "block_size": (lambda c: c.quantize is not None, "--quantize int4 or int8"),
    "quantizer": (lambda c: c.quantize is not None, "--quantize int4 or int8"),
    "head_bits": (lambda c: c.quantize is not None, "--quantize int4 or int8"),
    "correction_rank": (lambda c: c.compression.quantization is not None, "--quantize with --quantizer gptq"),
    "refine_rounded": (lambda c: c.compression.quantization is not None and c.compression.refine_block,
                       "--quantize with --quantizer gptq and --refine block"),
    "adacomp_iterations": (lambda c: c.compression.method == "adasvd", "--method adasvd"),
    "adacomp_strength": (lambda c: c.compression.method == "adasvd", "--method adasvd"),
    "adacomp_damping": (lambda c: c.compression.method == "adasvd", "--method adasvd"),
    "refine_steps": (lambda c: c.compression.refine != "none", "--refine block or e2e"),
    "refine_lr": (lambda c: c.compression.refine != "none", "--refine block or e2e"),
    **{flag: (lambda c: c.compression.refine_e2e, "--refine e2e or block+e2e")
       for flag in ("e2e_data", "e2e_samples", "e2e_seqlen", "e2e_steps", "e2e_lr", "e2e_schedule",
                    "e2e_parallel")},
    "eval_tokens": (lambda c: c.evaluation is not None, "an --eval-data other than none"),
    "eval_seqlen": (lambda c: c.evaluation is not None, "an --eval-data other than none"),
    "calib_overlap": (lambda c: c.calibration.source != "generated", "--calib-data wikitext2 or a file"),
}


def check_flags_apply(given: set[str], config: RunConfig) -> None:
    """An option the user typed that this run would ignore is an error, never silently dropped."""
    for name in sorted(given & ONLY_WITH.keys()):
        applies, needs = ONLY_WITH[name]
        if not applies(config):
            raise PreflightError(f"--{name.replace('_', '-')} only applies with {needs}")
    check_options(config)
