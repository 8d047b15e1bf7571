"""--refine e2e: gradient descent on all the factors towards the dense model's logits (exporter/refine/e2e.py)."""
import copy
import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import random_batches, tiny_model
from onnx_helpers import tiny_model_dir
from test_streaming import TEXT, config

from exporter import CompressionConfig, compress_, load_compressed
from exporter.config import CalibrationConfig
from exporter.data.windows import calibration_batches, evaluation_tokens
from exporter.refine.optimise import split_batches
from exporter.report.summary import summary
from exporter.run import run
from exporter.validate.perplexity import perplexity, torch_logits

V2 = dict(method="svd-llm-v2", ratio=0.6, allocation="uniform")


def kl(dense, model, batches) -> float:
    """Mean KL(p_dense ‖ p_model) per token over `batches`, from two whole models (no stream, no replayed head)."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            p = F.log_softmax(dense(input_ids=ids).logits.float(), -1)
            q = F.log_softmax(model(input_ids=ids).logits.float(), -1)
            total += float(F.kl_div(q, p, log_target=True, reduction="sum"))
            tokens += ids.numel()
    return total / tokens


@pytest.mark.parametrize("refine", ["e2e", "block+e2e"])
def test_never_increases_the_kl_to_the_dense_model_on_the_calibration_batches(arch, refine):
    dense, batches = tiny_model(arch), random_batches(16, 32, batch_size=1)
    train, held = split_batches(len(batches), 0.125)
    before, after = copy.deepcopy(dense), copy.deepcopy(dense)
    settings = dict(refine_steps=48, refine_lr=1e-2)
    without_e2e = {"e2e": "none", "block+e2e": "block"}[refine]
    compress_(before, batches, CompressionConfig(**V2, refine=without_e2e, **settings), progress=False)
    result = compress_(after, batches, CompressionConfig(**V2, refine=refine, **settings), progress=False)
    entry = result.extra["refine_e2e"]
    sets = {"train": [batches[b] for b in train], "held": [batches[b] for b in held]}
    kl_before = {k: kl(dense, before, v) for k, v in sets.items()}
    kl_after = {k: kl(dense, after, v) for k, v in sets.items()}
    assert kl_after["train"] <= kl_before["train"] and kl_after["held"] <= kl_before["held"]
    if arch == "llama":  # far enough from its dense model for a real gain (tiny qwen2 starts at a KL of 0.001)
        assert entry["kept"] and kl_after["train"] < 0.9 * kl_before["train"], (entry, kl_before, kl_after)
    # the objective it reports is the KL measured from the two whole models
    assert entry["loss_before"] == pytest.approx(kl_before["train"], rel=1e-4)
    assert entry["loss_after"] == pytest.approx(kl_after["train"], rel=1e-4)


def test_a_sharded_student_refines_a_model_in_memory_as_its_own_layers_do(monkeypatch):
    """refine/sharded.py on a model held in memory (as a GGUF's is), in a process group of one (gloo): the
    sharded copy of the decoder layers (FSDP2 parameters: DTensors) takes the steps the model's own layers take,
    and its refined factors come back whole into the model; without a process group it is one clear error."""
    import socket

    import torch.distributed as tdist

    from exporter.loop.compress import factor_state
    dense, batches = tiny_model("llama"), random_batches(16, 32, batch_size=1)
    settings = dict(**V2, refine="e2e", refine_steps=24, refine_lr=1e-2)
    with pytest.raises(ValueError, match="shards end-to-end refinement over a process group"):
        compress_(copy.deepcopy(dense), batches, CompressionConfig(**settings, e2e_parallel="fsdp"), progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(s.getsockname()[1]))
    tdist.init_process_group("gloo", rank=0, world_size=1)
    try:
        runs = {}
        for parallel in ("auto", "fsdp"):
            model = copy.deepcopy(dense)
            result = compress_(model, batches, CompressionConfig(**settings, e2e_parallel=parallel), progress=False)
            runs[parallel] = (result.extra["refine_e2e"], factor_state(model), model)
    finally:
        tdist.destroy_process_group()
    (own, own_factors, _), (sharded, sharded_factors, model) = runs["auto"], runs["fsdp"]
    assert (own["parallel"], sharded["parallel"]) == ("none", "fsdp")
    assert sharded["kept"] and (sharded["steps_run"], sharded["best_step"]) == (own["steps_run"], own["best_step"])
    assert sharded["loss_after"] == pytest.approx(own["loss_after"], rel=1e-5)
    for name, value in own_factors.items():
        assert torch.allclose(sharded_factors[name], value, rtol=1e-4, atol=1e-6), name
    assert kl(dense, model, batches) == pytest.approx(kl(dense, runs["auto"][2], batches), rel=1e-4)


def test_its_own_batches_are_what_it_trains_on_and_its_teacher_is_the_dense_model_on_them():
    """e2e_batches (--e2e-data/-samples/-seqlen): carried through the dense layers beside the calibration
    batches; the KL it reports is the one measured from the two whole models on those batches, of another
    count and length than the calibration's."""
    dense, batches = tiny_model("llama"), random_batches(4, 32, batch_size=1)
    own = random_batches(24, 48, batch_size=2, seed=5)
    train, _ = split_batches(len(own), 0.125)
    before, after = copy.deepcopy(dense), copy.deepcopy(dense)
    settings = dict(**V2, refine_steps=16, refine_lr=1e-2)
    compress_(before, batches, CompressionConfig(**settings, refine="none"), progress=False)
    result = compress_(after, batches, CompressionConfig(**settings, refine="e2e", e2e_steps=24), progress=False,
                       e2e_batches=own)
    entry = result.extra["refine_e2e"]
    assert (entry["sequences"], entry["seqlen"], entry["own_data"]) == (24, 48, True)
    assert entry["loss_before"] == pytest.approx(kl(dense, before, [own[b] for b in train]), rel=1e-4)
    assert entry["loss_after"] == pytest.approx(kl(dense, after, [own[b] for b in train]), rel=1e-4)
    assert entry["kept"] and 16 < entry["steps_run"] <= 24, entry  # --e2e-steps, not block refinement's 16


def test_runs_on_a_model_transformers_calls_quantized():
    """A de-quantized GGUF (the embedded SmolLM2) carries transformers' `is_quantized`, which refuses
    `.float()`: the optimisation's float32 cast must not go through it."""
    model = tiny_model("llama")
    model.is_quantized = True
    result = compress_(model, random_batches(8, 32, batch_size=1), CompressionConfig(**V2, refine="e2e",
                                                                                      refine_steps=8), progress=False)
    assert result.extra["refine_e2e"]["steps_run"] == 8


def test_a_half_precision_model_keeps_each_tensor_in_its_own_dtype():
    """The optimisation runs in float32; afterwards the weights are bfloat16 again and the float32 rotary
    frequencies a half-precision transformers model keeps stay float32 (not rounded to bfloat16)."""
    model = tiny_model("llama").to(torch.bfloat16)
    rotary = model.model.rotary_emb
    rotary.inv_freq = rotary.inv_freq.float()  # as from_pretrained(dtype=bfloat16) leaves it
    before = {name: t.dtype for name, t in [*model.named_parameters(), *model.named_buffers()]}
    result = compress_(model, random_batches(8, 32, batch_size=1), CompressionConfig(**V2, refine="block+e2e",
                                                                                      refine_steps=8), progress=False)
    assert result.extra["refine_e2e"]["steps_run"] == 8
    after = {name: t.dtype for name, t in [*model.named_parameters(), *model.named_buffers()]}
    assert after["model.rotary_emb.inv_freq"] == torch.float32
    assert all(after[n] == d for n, d in before.items() if n in after)  # the ones not swapped for factors
    assert all(d == torch.bfloat16 for n, d in after.items() if "inv_freq" not in n)  # the factors too


def test_zero_steps_reproduce_the_closed_form_factors_exactly():
    batches = random_batches(8, 32, batch_size=1)
    closed, refined = tiny_model("llama"), tiny_model("llama")
    compress_(closed, batches, CompressionConfig(**V2), progress=False)
    result = compress_(refined, batches, CompressionConfig(**V2, refine="e2e", refine_steps=0), progress=False)
    a, b = closed.state_dict(), refined.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert result.extra["refine_e2e"]["steps_run"] == 0 and not result.extra["refine_e2e"]["kept"]


@pytest.fixture
def text(tmp_path):
    """Words drawn at random: calibration batches that differ, so the held-out batch can improve too."""
    rng = random.Random(0)
    words = TEXT.split()[:18] + ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "seven", "north"]
    path = tmp_path / "text.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(6000)))
    return path


def test_the_run_writes_and_evaluates_the_refined_factors(tmp_path, text):
    """The layer loop has already written each layer and carried the evaluation windows through it: after
    end-to-end refinement both are redone, so the artifact and the perplexity are the refined model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir = tiny_model_dir("llama", tmp_path / "model")
    compression = CompressionConfig(method="svd-llm-v2", ratio=0.8, allocation="uniform", refine="e2e",
                                    refine_steps=32, refine_lr=1e-2)
    cfg = dataclasses.replace(config(model_dir, tmp_path / "out", text), compression=compression,
                              calibration=CalibrationConfig(source=str(text), samples=16, seqlen=64))
    report = run(cfg, progress=False, echo=lambda *_: None)
    assert report["streamed"] and report["recipe"].endswith("refine e2e")  # the dense model is never held whole
    assert report["method_details"]["refine_e2e"]["kept"]
    assert "refine e2e   KL to the dense model per token" in summary(report) and "kept" in summary(report)

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    compress_(model, calibration_batches(model, tokenizer, str(text), 16, 64, 0), compression, progress=False)
    ids = evaluation_tokens(model, tokenizer, str(text), 512, 128)
    assert report["perplexity"]["compressed"] == pytest.approx(perplexity(torch_logits(model), ids, 128, progress=False),
                                                               rel=1e-4)
    reloaded = load_compressed(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids[None, :64]).logits, model(input_ids=ids[None, :64]).logits)


def test_generated_end_to_end_text_is_written_by_the_dense_model_and_trained_on(tmp_path, text):
    """--e2e-data generated (data-free distillation): the whole model is held (it writes the text token by
    token); the report says what end-to-end refinement trained on."""
    model_dir = tiny_model_dir("llama", tmp_path / "model")
    compression = CompressionConfig(method="svd-llm-v2", ratio=0.8, allocation="uniform", refine="block+e2e",
                                    refine_steps=8, refine_lr=1e-2, e2e_steps=12)
    cfg = dataclasses.replace(config(model_dir, tmp_path / "out", text), compression=compression,
                              calibration=CalibrationConfig(source=str(text), samples=4, seqlen=32),
                              e2e_data=CalibrationConfig(source="generated", samples=10, seqlen=24))
    report = run(cfg, progress=False, echo=lambda *_: None)
    entry = report["method_details"]["refine_e2e"]
    assert not report["streamed"] and report["config"]["e2e_data"]["source"] == "generated"
    assert (entry["sequences"], entry["seqlen"], entry["own_data"]) == (10, 24, True) and entry["steps_run"] > 8


def test_an_end_to_end_refinement_that_cannot_fit_is_refused_with_the_numbers(tmp_path, text, monkeypatch):
    """Before the run starts (from config.json alone: the most any plan can ask for), and again before the
    refinement itself (from the compressed model): one line with the formula's parts, nothing left behind."""
    model_dir = tiny_model_dir("llama", tmp_path / "model")
    monkeypatch.setattr("exporter.load.open.available_bytes", lambda device: 1000)
    monkeypatch.setattr("exporter.run.compress_source", lambda *a, **k: pytest.fail("refused too late"))
    with pytest.raises(MemoryError, match=r"--refine e2e needs .* GiB \(weights .*gradients .*\) on cpu"):
        run(config(model_dir, tmp_path / "out", text, refine="e2e"), progress=False, echo=lambda *_: None)
    assert not (tmp_path / "out").exists()


def test_sharding_divides_all_but_the_head_and_auto_shards_only_where_data_parallel_does_not_fit():
    """refine/memory.py: FSDP2 divides the decoder layers' weights, the gradients, Adam's moments and the
    snapshots by the world size and adds one whole layer; the embeddings and lm_head stay whole on every rank.
    --e2e-parallel auto: DDP where its formula fits, FSDP2 where only that fits, one line with the numbers where
    neither does."""
    from exporter.refine.memory import E2EShape, e2e_memory, parallel_plan
    shape = E2EShape(frozen_params=3_000, factor_params=8_000, layers=4, hidden=16, intermediate=32, heads=2,
                     vocab=100, largest_layer_params=2_500, batch=1, seqlen=8, chunk=8, compute_bytes=4,
                     head_params=1_000)
    one, ddp, fsdp = e2e_memory(shape), e2e_memory(shape, 4), e2e_memory(shape, 4, sharded=True)
    assert one.weights == ddp.weights == (3_000 + 8_000) * 4
    assert fsdp.weights == 1_000 * 4 + ((3_000 - 1_000) * 4 + 8_000 * 4) // 4 + 2_500 * 4
    assert (ddp.gradients, fsdp.gradients) == (2 * one.gradients, one.gradients // 4)
    assert (fsdp.optimizer, fsdp.snapshots) == (one.optimizer // 4, one.snapshots // 4)
    assert fsdp.activations == one.activations and fsdp.logits == one.logits
    assert parallel_plan(shape, 4, "auto", "cpu", ddp.total) == ("ddp", ddp)
    assert parallel_plan(shape, 4, "auto", "cpu", ddp.total - 1) == ("fsdp", fsdp)
    assert parallel_plan(shape, 1, "auto", "cpu", one.total) == ("none", one)  # one process: neither
    with pytest.raises(MemoryError, match=r"needs .* GiB .* per process \(data-parallel, DDP, world size 4\).*"
                                          r"--e2e-parallel fsdp"):
        parallel_plan(shape, 4, "ddp", "cpu", ddp.total - 1)
    with pytest.raises(MemoryError, match=r"per process \(sharded, FSDP2, world size 4\).*fsdp-offload"):
        parallel_plan(shape, 4, "fsdp", "cpu", fsdp.total - 1)
    resident = parallel_plan(shape, 4, "auto", "cpu", 10**9, resident=(44_000, 4_000))[1]
    assert resident.weights == 0  # data-parallel refines the model's own layers, already where they run


def test_offloading_moves_the_shards_their_gradients_and_adam_to_the_host():
    """fsdp-offload (FSDP2's CPUOffloadPolicy): on a GPU the device keeps the head, one gathered layer and its
    factors' gradients, the activations and the logits; the shards (frozen weights in the compute dtype, float32
    factor masters), their gradients and Adam's moments are host memory, as the snapshots are. --e2e-parallel auto
    offloads only where plain sharding does not fit the device, and the host is checked too."""
    from exporter.refine.memory import E2EShape, e2e_memory, parallel_plan
    shape = E2EShape(frozen_params=3_000, factor_params=8_000, layers=4, hidden=16, intermediate=32, heads=2,
                     vocab=100, largest_layer_params=2_500, batch=1, seqlen=8, chunk=8, compute_bytes=2,
                     head_params=1_000)
    fsdp = e2e_memory(shape, 4, sharded=True, device_type="cuda")
    off = e2e_memory(shape, 4, device_type="cuda", offload=True)
    assert off.weights == 1_000 * 2 + 2_500 * 2 and off.optimizer == 0 and off.gradients == 8_000 // 4 * 4
    assert off.offloaded == ((3_000 - 1_000) * 2 + 8_000 * 4) // 4 + 8_000 * 4 // 4 + 8_000 * 8 // 4
    assert (off.activations, off.logits, off.teacher, off.snapshots) == (fsdp.activations, fsdp.logits,
                                                                          fsdp.teacher, fsdp.snapshots)
    assert off.total == fsdp.total - fsdp.optimizer - fsdp.gradients + off.gradients - (fsdp.weights - off.weights)
    assert off.host_total == off.offloaded + off.snapshots and fsdp.host_total == fsdp.snapshots
    assert parallel_plan(shape, 4, "auto", "cuda", fsdp.total) == ("fsdp", fsdp)
    assert parallel_plan(shape, 4, "auto", "cuda", fsdp.total - 1, host_available=10**9) == ("fsdp-offload", off)
    with pytest.raises(MemoryError, match=r"\(sharded, FSDP2, offloaded to the host, world size 4\) and .* of "
                                          r"host memory is available to 4 process\(es\)"):
        parallel_plan(shape, 4, "auto", "cuda", fsdp.total - 1, host_available=4 * off.host_total - 1)
    alone, alone_off = e2e_memory(shape, device_type="cuda"), e2e_memory(shape, device_type="cuda", offload=True)
    assert alone_off.weights == 1_000 * 2 + 2_500 * 2  # in one process too: the head, and a layer copied in
    assert parallel_plan(shape, 1, "auto", "cuda", alone.total) == ("none", alone)
    assert parallel_plan(shape, 1, "auto", "cuda", alone.total - 1, host_available=10**9) == ("fsdp-offload",
                                                                                              alone_off)
    with pytest.raises(MemoryError, match=r"\(one process, world size 1\)"):  # a CPU: nothing to offload to
        parallel_plan(shape, 1, "auto", "cpu", e2e_memory(shape).total - 1, host_available=10**9)
    on_cpu = e2e_memory(shape, 4, device_type="cpu", offload=True)  # one memory: everything counts
    assert on_cpu.host == () and on_cpu.total == sum(on_cpu.parts.values())


def test_an_offloaded_shard_lives_on_the_host_and_comes_back_whole(tmp_path):
    """refine/sharded.py with offload: the layer's FSDP2 state carries CPUOffloadPolicy (the shards in host
    memory) and `gather_factors_` brings every factor back whole. One process group of one rank (gloo)."""
    import torch.distributed as torch_dist

    from exporter.model.lowrank import LowRankLinear
    from exporter.refine.sharded import gather_factors_, shard_layer
    layer = torch.nn.Sequential(LowRankLinear(8, 6, 3, bias=False), torch.nn.LayerNorm(6))
    torch.nn.init.normal_(layer[0].down.weight)
    torch.nn.init.normal_(layer[0].up.weight)
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for offload in (False, True):
            shard = shard_layer(layer, "cpu", torch.float32, offload=offload)
            params = shard._get_fsdp_state()._fsdp_param_group.fsdp_params  # torch's own record of the policy
            assert params and all(p.offload_to_cpu is offload for p in params)
            back = torch.nn.Sequential(LowRankLinear(8, 6, 3, bias=False), torch.nn.LayerNorm(6))
            gather_factors_(shard, back)
            assert torch.equal(back[0].down.weight, layer[0].down.weight)
            assert torch.equal(back[0].up.weight, layer[0].up.weight)
    finally:
        torch_dist.destroy_process_group()


def test_the_check_before_the_refinement_uses_the_compressed_model(tmp_path, text, monkeypatch):
    model_dir = tiny_model_dir("llama", tmp_path / "model")
    monkeypatch.setattr("exporter.loop.compress.available_bytes", lambda device: 1000)
    with pytest.raises(MemoryError, match="--refine e2e needs"):
        run(config(model_dir, tmp_path / "out", text, refine="e2e"), progress=False, echo=lambda *_: None)
    assert not (tmp_path / "out").exists()


def test_the_kl_over_chunks_of_positions_is_the_kl_of_the_whole_logits():
    """chunked_kl: the same sum and the same gradient w.r.t. the final hidden states as one log-softmax over
    every position at once; the layers' recomputation (checkpointing) gives the gradients of a plain pass."""
    from exporter.model.architecture import decoder_layers
    from exporter.model.discovery import architecture_of
    from exporter.model.head import head_forward
    from exporter.model.layer_inputs import capture_inputs
    from exporter.refine.e2e import chunked_kl, student_hidden
    model, dense = tiny_model("llama"), tiny_model("llama", seed=1)
    arch = architecture_of(model)
    ids = random_batches(1, 40, batch_size=1)[0]
    teacher = student_hidden(decoder_layers(dense, arch), capture_inputs(dense, arch, [ids], "cpu"), 0, "cpu")
    inputs = capture_inputs(model, arch, [ids], "cpu")
    grads = {}
    for chunk, checkpointed in ((7, True), (40, False)):
        model.zero_grad()
        final = student_hidden(decoder_layers(model, arch), inputs, 0, "cpu", checkpointed=checkpointed)
        value, count = chunked_kl(model, arch, ids, final, teacher, "cpu", chunk=chunk)
        value.backward()
        grads[chunk] = [p.grad.clone() for p in decoder_layers(model, arch).parameters()]
        whole = F.kl_div(F.log_softmax(head_forward(model, arch, final.detach(), ids, "cpu").float(), -1),
                         F.log_softmax(head_forward(model, arch, teacher, ids, "cpu").float(), -1),
                         log_target=True, reduction="sum")
        assert count == 40 and float(value) == pytest.approx(float(whole), rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(grads[7], grads[40]))


@pytest.mark.parametrize("when", ["training", "rewriting", "training-own-data", "rewriting-offloaded"])
def test_a_kill_during_end_to_end_refinement_resumes_to_the_same_artifacts(tmp_path, text, monkeypatch, when):
    """Killed while refining (the resume state still says the last layer: it refines again, from the same
    closed form) or while rewriting the shards (the refined factors are in the resume state first: it never
    refines again, and no mix of refined and unrefined layers is written). With data of its own
    (--e2e-samples/--e2e-seqlen) its dense stream is in the resume state too. Offloaded in one process
    (--e2e-parallel fsdp-offload) the refined factors are the sharded student's, gathered whole."""
    from conftest import Killed
    from safetensors.torch import load_file

    import exporter.loop.compress as loop
    from exporter.output.shards import ShardWriter
    model_dir = tiny_model_dir("llama", tmp_path / "model")
    compression = CompressionConfig(method="svd-llm-v2", ratio=0.8, allocation="uniform", refine="block+e2e",
                                    refine_steps=32, refine_lr=1e-2,
                                    e2e_parallel="fsdp-offload" if when.endswith("offloaded") else "auto")

    own = CalibrationConfig(source=str(text), samples=12, seqlen=96, seed=3) if when.endswith("own-data") else None

    def setting(out):
        return dataclasses.replace(config(model_dir, out, text), compression=compression, e2e_data=own,
                                   calibration=CalibrationConfig(source=str(text), samples=16, seqlen=64))
    whole = run(setting(tmp_path / "whole"), progress=False, echo=lambda *_: None)
    assert whole["method_details"]["refine_e2e"]["kept"]
    assert whole["method_details"]["refine_e2e"]["seqlen"] == (96 if own else 64)
    assert whole["method_details"]["refine_e2e"]["parallel"] == compression.e2e_parallel.replace("auto", "none")
    refined = []
    if when.startswith("training"):
        def die(*a, **k):
            raise Killed
        monkeypatch.setattr(loop, "refine_model", die)
    else:
        real_write, written = ShardWriter.write_layer, []

        def write_layer(self, i, layer, prefix):
            written.append(i)
            if len(written) > 2 + 1:  # the loop's 2 layers, then one refined layer rewritten
                raise Killed
            real_write(self, i, layer, prefix)
        monkeypatch.setattr(ShardWriter, "write_layer", write_layer)
    with pytest.raises(Killed):
        run(setting(tmp_path / "out"), progress=False, echo=lambda *_: None, resume=True)
    monkeypatch.undo()
    real_refine = loop.refine_model
    monkeypatch.setattr(loop, "refine_model", lambda *a, **k: refined.append(1) or real_refine(*a, **k))
    resumed = run(setting(tmp_path / "out"), progress=False, echo=lambda *_: None, resume=True)
    assert refined == ([1] if when.startswith("training") else [])
    assert resumed["perplexity"] == whole["perplexity"]
    strip = lambda e: {k: v for k, v in e.items() if k != "seconds"}  # noqa: E731
    assert strip(resumed["method_details"]["refine_e2e"]) == strip(whole["method_details"]["refine_e2e"])
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_streamed_run_on_the_int4_grid_refines_end_to_end_and_passes_its_checks(tmp_path, text):
    """--quantize int4 with --refine block+e2e on a streamed model: the written layers come back with their grids'
    scales (the student is read from its shards), the refined factors are written on those grids, and the graph
    passes its own parity check against them. The dense perplexity is the dense model's, float head included (the
    loop puts the model's own head on the grid before the evaluation streams reach it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exporter.config import Quantization
    from exporter.model.quantized import scales_of
    from exporter.quantize.grid import round_on
    model_dir = tiny_model_dir("llama", tmp_path / "model")
    q = Quantization(bits=4, block_size=16)
    compression = CompressionConfig(method="svd-llm-v2", ratio=0.4, allocation="uniform", refine="block+e2e",
                                    refine_steps=16, refine_lr=1e-2, e2e_steps=32, quantization=q)
    cfg = dataclasses.replace(config(model_dir, tmp_path / "out", text), compression=compression,
                              formats=("safetensors", "onnx"), quantize="int4", block_size=16,
                              calibration=CalibrationConfig(source=str(text), samples=16, seqlen=64))
    report = run(cfg, progress=False, echo=lambda *_: None)
    entry = report["method_details"]["refine_e2e"]
    assert report["streamed"] and entry["on_grid"] and entry["kept"], entry
    assert report["onnx"]["parity"]["compressed"]["passed"], report["onnx"]["parity"]
    reloaded = load_compressed(tmp_path / "out")
    linears = [m for m in reloaded.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(scales_of(m) is not None for m in linears)
    for m in linears:
        assert torch.equal(round_on(m.weight.detach(), scales_of(m), q), m.weight.detach())
    dense, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    ids = evaluation_tokens(dense, tokenizer, str(text), 512, 128)
    expected = perplexity(torch_logits(dense), ids, 128, progress=False)
    assert report["perplexity"]["dense"] == pytest.approx(expected, rel=1e-5)
