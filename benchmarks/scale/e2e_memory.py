"""End-to-end refinement's memory: the formula (exporter/refine/memory.py) for real shapes, and one measurement
against it on this CPU.

    python -m benchmarks.scale.e2e_memory table     # Llama-2 7B / 13B / 70B at 0.2 and 0.4: one 80 GB GPU, 8 GPUs
                                                    # (DDP, FSDP2, FSDP2 offloaded)
    python -m benchmarks.scale.e2e_memory measure   # a 2-layer Llama-2-7B-shaped model, a few steps on the CPU

`table` writes docs/results/e2e-memory.md (the table part); `measure` appends its row to
docs/results/e2e-memory.json and rewrites the doc. The measurement builds the compressed model directly (random
factors at the uniform ranks of the ratio: memory and time depend on the shapes only), takes the teacher from a
dense forward, then runs exporter.refine.e2e.refine_model while a thread samples the process's resident set:
the peak during the refinement minus the resident set before it is what the formula's parts other than the
weights predict (on a CPU the weights are already resident when it starts; they are parameter counts times
element sizes, nothing to measure).
"""
from __future__ import annotations

import argparse
import gc
import json

import psutil
import torch

from benchmarks.common import RESULTS, PeakRSS, command_line

STORE, DOC = RESULTS / "e2e-memory.json", RESULTS / "e2e-memory.md"
GiB = 2**30
LLAMA_2 = {  # the real configurations (vocabulary included)
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       num_hidden_layers=32, vocab_size=32000),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
                        num_hidden_layers=40, vocab_size=32000),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                        num_hidden_layers=80, vocab_size=32000),
}


def skeleton(name: str, layers: int | None = None):
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM
    dims = {**LLAMA_2[name], **({"num_hidden_layers": layers} if layers else {})}
    with init_empty_weights(include_buffers=False):
        return LlamaForCausalLM(LlamaConfig(**dims, max_position_embeddings=4096))


def table_rows(batch: int, seqlen: int) -> list[dict]:
    from exporter.refine.e2e import KL_CHUNK
    from exporter.refine.memory import e2e_memory, shape_of
    rows = []
    for name in LLAMA_2:
        model = skeleton(name)
        for ratio in (0.2, 0.4):
            shape = shape_of(model, batch, seqlen, 2, KL_CHUNK, ratio=ratio)
            for gpus, mode in ((1, "none"), (1, "fsdp-offload"), (8, "ddp"), (8, "fsdp"), (8, "fsdp-offload")):
                need = e2e_memory(shape, world_size=gpus, sharded=mode.startswith("fsdp"), device_type="cuda",
                                  offload=mode == "fsdp-offload")
                rows.append({"model": name, "ratio": ratio, "gpus": gpus, "mode": mode,
                             "parts_gib": {k: v / GiB for k, v in need.parts.items()}, "total_gib": need.total / GiB,
                             "host_gib": need.host_total / GiB})
    return rows


@torch.no_grad()
def compressed_copy(dense, ratio: float):
    """The dense model with every decoder linear replaced by a LowRankLinear of the uniform rank (random
    factors scaled like the weight), the rest shared."""
    from exporter.model.candidates import list_matrices
    from exporter.model.discovery import architecture_of
    from exporter.model.lowrank import LowRankLinear, swap_module
    from exporter.plan.ranks import rank_for_keep
    arch = architecture_of(dense)
    for m in list_matrices(dense, arch):
        rank = rank_for_keep(m, 1 - ratio)
        low = LowRankLinear(m.in_features, m.out_features, rank, bias=False)
        low.down.weight.normal_(0, 0.02)
        low.up.weight.normal_(0, 0.02)
        swap_module(dense, m.name, low)
    return arch


def measure(ratio: float, batches: int, seqlen: int, steps: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from exporter.config import Refinement
    from exporter.model.activations import advance
    from exporter.model.architecture import decoder_layers
    from exporter.model.discovery import architecture_of
    from exporter.model.layer_inputs import capture_inputs
    from exporter.refine.e2e import KL_CHUNK, Teacher, refine_model
    from exporter.refine.memory import e2e_memory, shape_of
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**LLAMA_2["llama-2-7b"], "num_hidden_layers": 2},
                                         max_position_embeddings=4096)).eval()
    ids = [torch.randint(0, 32000, (1, seqlen)) for _ in range(batches)]
    arch = architecture_of(model)
    stream = capture_inputs(model, arch, ids, "cpu")
    for i, layer in enumerate(decoder_layers(model, arch)):
        advance(i, layer, stream, "cpu")
    arch = compressed_copy(model, ratio)  # the dense linears go: only the compressed model is held
    gc.collect()
    import tempfile
    with tempfile.TemporaryDirectory() as work:
        teacher = Teacher(work, stream.hidden)
        del stream
        inputs = capture_inputs(model, arch, ids, "cpu")
        need = e2e_memory(shape_of(model, 1, seqlen, 4, KL_CHUNK))
        gc.collect()
        before = psutil.Process().memory_info().rss
        settings = Refinement(steps=steps, lr=1e-3, eval_every=steps, patience=1)
        with PeakRSS(interval=0.02) as peak:
            entry = refine_model(model, arch, ids, inputs, teacher, settings, "cpu", torch.float32, torch.float32)
    predicted = need.total - need.weights
    return {"shape": "llama-2-7b, 2 layers", "ratio": ratio, "batches": batches, "seqlen": seqlen,
            "steps_run": entry["steps_run"], "seconds": entry["seconds"],
            "seconds_per_step": entry["seconds"] / max(entry["steps_run"], 1),  # guard: 0 steps (a refused run)
            "measured_gib": (peak.peak - before) / GiB, "formula_gib": predicted / GiB,
            "formula_parts_gib": {k: v / GiB for k, v in need.parts.items()}, "command": command_line()}


def render(rows: list[dict], measured: list[dict], batch: int, seqlen: int) -> str:
    lines = ["# End-to-end refinement: memory", "",
             f"From `exporter/refine/memory.py` (bfloat16 compute, batch {batch} x {seqlen} tokens, KL chunks of 256 "
             "positions; the factors at (1 − ratio) of the linears, the most any plan of the ratio can ask for). "
             "GiB per GPU; DDP: every GPU holds all of it; FSDP2 (`--e2e-parallel fsdp`): each decoder layer sharded "
             "over the GPUs, the embeddings and lm_head whole on each; FSDP2 offloaded (`--e2e-parallel "
             "fsdp-offload`): the same, its shards, their gradients and Adam's moments in host memory "
             "(`offloaded`), the GPU holding the head, one gathered layer and its factors' gradients. "
             "`--e2e-parallel auto` takes the first of DDP, FSDP2, FSDP2 offloaded that fits (in one process: "
             "the model's own layers, else offloaded through a process group of one). "
             "Generated by `python -m benchmarks.scale.e2e_memory table`.", "",
             "| model | ratio | GPUs | mode | weights | gradients | optimizer | snapshots | offloaded | activations "
             "| logits | per GPU | fits 80 GB | host per GPU |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    names = {"none": "one GPU", "ddp": "DDP", "fsdp": "FSDP2", "fsdp-offload": "FSDP2 offloaded"}
    for r in rows:
        p = r["parts_gib"]
        lines.append(f"| {r['model']} | {r['ratio']} | {r['gpus']} | {names[r['mode']]} | {p['weights']:.1f} "
                     f"| {p['gradients']:.1f} | {p['optimizer']:.1f} | {p['snapshots']:.1f} | {p['offloaded']:.1f} "
                     f"| {p['activations']:.1f} | {p['logits']:.2f} | **{r['total_gib']:.1f}** "
                     f"| {'yes' if r['total_gib'] <= 80 else 'no'} | {r['host_gib']:.1f} |")
    lines += ["", "Snapshots (the factors refinement started from, and its best state) and the offloaded shards live "
              "on the host: they are listed, not counted in the device's total; `host per GPU` is their sum, which "
              "each process on a machine adds to the host's memory (the run checks both before it starts).", "",
              "## Measured on this CPU", "",
              "| shape | ratio | calibration | steps | s/step | measured GiB | formula GiB | measured / formula |",
              "|---|---|---|---|---|---|---|---|"]
    for m in measured:
        lines.append(f"| {m['shape']} | {m['ratio']} | {m['batches']} x {m['seqlen']} | {m['steps_run']} "
                     f"| {m['seconds_per_step']:.1f} | {m['measured_gib']:.2f} | {m['formula_gib']:.2f} "
                     f"| {m['measured_gib'] / m['formula_gib']:.2f} |")
    lines += ["", "Measured: peak resident set during `refine_model` minus the resident set before it (the weights are "
              "resident by then); formula: its parts other than the weights. Commands: "
              + "; ".join(f"`{m['command']}`" for m in measured), ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["table", "measure"])
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args()
    stored = json.loads(STORE.read_text()) if STORE.exists() else {"table": [], "measured": []}
    if a.part == "table":
        stored["table"] = table_rows(1, 2048)
    else:
        stored["measured"] = [m for m in stored["measured"] if (m["ratio"], m["seqlen"]) != (a.ratio, a.seqlen)]
        stored["measured"].append(measure(a.ratio, a.batches, a.seqlen, a.steps))
    STORE.write_text(json.dumps(stored, indent=1))
    DOC.write_text(render(stored["table"], stored["measured"], 1, 2048))
    print(DOC.read_text())


if __name__ == "__main__":
    main()
