"""--quantize in the layer loop (exporter/quantize): the grid is ONNX Runtime's, GPTQ is the sequential
least-squares rounding it claims to be, the low-rank pair's up is refitted to its rounded down, and what the
layer loop ships is what the graph computes, bit for bit at accuracy level 0 and with the kernel's int8
activations at level 4."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import random_batches, tiny_config, tiny_model
from onnx_helpers import char_tokenizer
from test_refine_e2e import kl

from exporter.config import CompressionConfig, Quantization, RunConfig
from exporter.loop.compress import compress_
from exporter.model.lowrank import LowRankLinear
from exporter.model.quantized import scales_of
from exporter.onnx.fused import build_onnx
from exporter.onnx.fused.quantize import dequantize, pack, quantize_weight
from exporter.onnx.fused.reference import round_like_export
from exporter.quantize.activations import int8_blocks
from exporter.quantize.gptq import DAMPING, gptq, weighted_error
from exporter.quantize.grid import codes_of, encode, round_to_nearest, values_of
from exporter.quantize.grid import scales_of as grid_scales
from exporter.quantize.layer import refit_up
from exporter.validate.ort_session import OrtDecoder
from exporter.validate.parity import parity


@pytest.mark.parametrize("bits", [4, 8])
def test_round_to_nearest_and_the_packing_are_onnx_runtimes(bits):
    """Our grid is ORT's quantizer's: the same scales, the same values (at 8 bits up to near-ties, which its
    float32 arithmetic breaks the other way in a few codes), and encode + pack give back its very bytes."""
    q = Quantization(bits=bits, block_size=32)
    w = torch.randn(48, 100, dtype=torch.float64).to(torch.float32).to(torch.float64)  # in: not a block multiple
    ort = quantize_weight(w.T.numpy().astype(np.float32), q, np.float32)
    ours, scales = round_to_nearest(w, q, torch.float32)
    assert np.array_equal(ort.scales, scales.numpy().astype(np.float32))
    steps = np.abs(dequantize(ort, q) - ours.T.numpy()) / np.abs(np.repeat(ort.scales, 32, axis=1)[:, :100].T)
    assert steps.max() < 1 + 1e-3 and (steps > 0.5).mean() <= (0 if bits == 4 else 0.01)
    ort_values = torch.from_numpy(dequantize(ort, q).T.astype(np.float64))
    assert np.array_equal(pack(encode(ort_values, scales, q).numpy(), q), ort.packed)


def sequential_rounding(w: torch.Tensor, h: torch.Tensor, q: Quantization) -> torch.Tensor:
    """GPTQ's defining property, computed the long way: after columns 0..j are rounded, the remaining ones are
    the least-squares best given them (w_R + H_RR⁻¹ H_RF (w_F − q_F)), and column j+1 is that value rounded on
    its block's grid (the block's scale from the values when its first column comes up)."""
    n = w.shape[1]
    rounded, current, scale = torch.empty_like(w), w.clone(), None
    for j in range(n):
        if j % q.block_size == 0:
            scale = grid_scales(current[:, j:j + q.block_size], q, torch.float32)
        rounded[:, j:j + 1] = values_of(codes_of(current[:, j:j + 1], scale, q), scale, q)
        fixed, rest = slice(0, j + 1), slice(j + 1, n)
        if j + 1 < n:
            shift = torch.linalg.solve(h[rest, rest], h[rest, fixed] @ (w[:, fixed] - rounded[:, fixed]).T)
            current[:, rest] = w[:, rest] + shift.T
    return rounded


def damped(h: torch.Tensor) -> torch.Tensor:
    h = h.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    return h + DAMPING * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)


@pytest.mark.parametrize("tokens", [400, 20])  # 20 tokens < 40 inputs: X Xᵀ singular, a Cholesky of it fails
def test_gptq_is_the_sequential_least_squares_rounding(tokens):
    torch.manual_seed(0)
    q = Quantization(bits=4, block_size=16)
    w = torch.randn(12, 40, dtype=torch.float64)
    x = torch.randn(40, tokens, dtype=torch.float64) * torch.linspace(0.1, 3, 40, dtype=torch.float64)[:, None]
    x[7] = 0  # an input never excited: a zero row and column of H
    h = x @ x.T
    values, scales = gptq(w, h, q, torch.float32)
    assert torch.allclose(values, sequential_rounding(w, damped(h), q), atol=1e-12)
    back = (encode(values, scales, q).double() - 8).view(12, -1, 16) * scales[..., None]
    assert torch.equal(back.view(12, -1)[:, :40], values)  # on the grid: encode gives the codes back exactly
    nearest, _ = round_to_nearest(w, q, torch.float32)
    assert weighted_error(w, values, h) < weighted_error(w, nearest, h)


def test_refit_up_is_the_least_squares_up_given_the_rounded_down():
    torch.manual_seed(1)
    x = torch.randn(30, 500, dtype=torch.float64)
    gram = x @ x.T
    up, down = torch.randn(20, 6, dtype=torch.float64), torch.randn(6, 30, dtype=torch.float64)
    down_q = down + 0.05 * torch.randn_like(down)
    refit = refit_up(up, down, down_q, gram, damping=0.0)
    target, h = up @ down @ x, down_q @ x
    best = torch.linalg.lstsq(h.T, target.T).solution.T
    assert torch.allclose(refit, best, atol=1e-9)
    assert ((refit @ h - target).norm() < (up @ h - target).norm())


def test_int8_blocks_round_per_block_of_the_last_dimension():
    x = torch.tensor([[1.0, -0.5, 0.26, 0.0] * 4 + [0.0] * 16 + [3.0, 1.0]])  # 34 values: blocks of 32 and 2
    y = int8_blocks(x, 32)
    assert y[0, 2] == pytest.approx(round(0.26 * 127) / 127) and torch.equal(y[0, 16:32], torch.zeros(16))
    assert y[0, 32] == 3.0 and y[0, 33] == pytest.approx(round(127 / 3) * 3 / 127)  # the short block's own scale


@pytest.mark.parametrize("bits", [4, 8])
def test_one_matmulnbits_node_at_accuracy_level_4_rounds_its_input_as_int8_blocks(bits):
    """ONNX Runtime's kernel against PyTorch with int8_blocks on its input: equal to float32 rounding, where
    the same weights without the input rounding are 100× further off."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    k, n = 576, 64
    q = Quantization(bits=bits, block_size=32, accuracy_level=4)
    generator = torch.Generator().manual_seed(0)
    w = (0.05 * torch.randn(k, n, generator=generator)).numpy()
    x = (torch.randn(12, k, generator=generator) * torch.randn(k, generator=generator).exp()).float()
    nbits = quantize_weight(w, q, np.float32)
    node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=32, accuracy_level=4)
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(nbits.packed, "b"), numpy_helper.from_array(nbits.scales, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    weight = torch.from_numpy(dequantize(nbits, q)).double()
    rounded = (int8_blocks(x, 32).double() @ weight).numpy()
    unrounded = (x.double() @ weight).numpy()
    assert np.abs(got - rounded).max() < 1e-4 < 1e-2 < np.abs(got - unrounded).max()


@pytest.fixture(scope="module")
def gptq_model():
    """A tiny Llama compressed at 0.4 with every linear of every layer put on the int4 grid by the loop."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    q = Quantization(bits=4, block_size=16)
    result = compress_(model, random_batches(8, seqlen=32), CompressionConfig(method="svd", ratio=0.4, allocation="uniform",
                                                                              quantization=q), progress=False)
    return model, q, result


def test_the_loop_puts_every_layer_linear_on_the_grid(gptq_model):
    model, q, result = gptq_model
    linears = [(n, m) for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]
    assert any(isinstance(m, LowRankLinear) for m in model.modules()) and linears
    for name, linear in linears:
        scales = scales_of(linear)
        assert scales is not None and scales.dtype == torch.float32, name
        codes = encode(linear.weight.detach(), scales, q).double() - 8
        back = (codes.view(codes.shape[0], -1, 16) * scales[..., None].double()).view(codes.shape[0], -1)
        assert torch.equal(back[:, :linear.in_features].float(), linear.weight.detach()), name
    records = result.extra["quantize"]
    assert len(records) == 7 * len(model.model.layers)
    pairs = [r for r in records.values() if "up" in r]
    assert pairs and all(r["down"]["gptq"] <= r["down"]["nearest"] for r in pairs)


@pytest.mark.parametrize("level", [0, 4])
def test_the_graph_computes_what_the_loop_shipped(gptq_model, level, tmp_path):
    """The writer stores the loop's codes as they are (no second rounding): at accuracy level 0 the graph
    equals the model as float32 arithmetic allows; at level 4 it equals the reference whose linears round
    their inputs to int8 as the kernel does, to the same tolerance."""
    model, q4, _ = gptq_model
    q = Quantization(bits=4, block_size=16, accuracy_level=level)
    path = build_onnx(model, char_tokenizer(), tmp_path, quantization=q)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    result = parity(round_like_export(model, q), OrtDecoder.load(path), ids, "float32", steps=3, new_tokens=8)
    assert result["passed"] and result["greedy"]["equal"] and result["top1_agreement"] == 1.0, result
    # level 0: float32 rounding only. Level 4: the same, except where PyTorch's and ORT's activations, equal to
    # float rounding, fall on two sides of an int8 rounding boundary and the flip propagates
    assert result["max_abs_diff"] < (1e-5 if level == 0 else 1e-2)


def test_e2e_refinement_on_the_grid_optimises_the_shipped_model_and_ships_what_it_optimised():
    """--refine e2e with --quantize (exporter/quantize/fake.py, factors_on_their_grids): the factors train through
    their rounding on the grids the layer loop chose, whose scales stay fixed. Its defining properties: the loss
    it starts from is the shipped block-only model's, exactly (not a float model's), and the loss it ends with is
    the loss of the model it ships, every factor on its grid with the same scales; the codes moved, and the
    KL to the teacher went down. (The teacher is the dense model's last hidden states through the shipped head.)"""
    from exporter.refine.optimise import split_batches
    torch.manual_seed(0)
    dense, batches = tiny_model("llama"), random_batches(16, 32, batch_size=1)
    q = Quantization(bits=4, block_size=16)
    settings = dict(method="svd", ratio=0.4, allocation="uniform", quantization=q, refine_steps=48, refine_lr=1e-2)
    shipped, refined = copy.deepcopy(dense), copy.deepcopy(dense)
    compress_(shipped, batches, CompressionConfig(**settings), progress=False)
    entry = compress_(refined, batches, CompressionConfig(**settings, refine="e2e"), progress=False).extra["refine_e2e"]
    assert entry["on_grid"] and entry["kept"], entry

    grids = {n: m for n, m in refined.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}
    before = dict(shipped.model.layers.named_modules())
    moved = 0
    for name, linear in grids.items():
        scales = scales_of(linear)
        assert torch.equal(scales, scales_of(before[name])), name  # the grid itself is kept
        codes = encode(linear.weight.detach(), scales, q).double() - 8
        back = (codes.view(codes.shape[0], -1, 16) * scales[..., None].double()).view(codes.shape[0], -1)
        assert torch.equal(back[:, :linear.in_features].float(), linear.weight.detach()), name  # on it, exactly
        moved += int(not torch.equal(linear.weight, before[name].weight))
    assert moved > 0

    teacher = copy.deepcopy(dense)  # the dense layers, the shipped (quantized) head
    teacher.lm_head.weight = torch.nn.Parameter(refined.lm_head.weight.detach().clone())
    train = [batches[b] for b in split_batches(len(batches), 0.125)[0]]
    assert entry["loss_before"] == pytest.approx(kl(teacher, shipped, train), rel=1e-4)
    assert entry["loss_after"] == pytest.approx(kl(teacher, refined, train), rel=1e-4)
    assert entry["loss_after"] < entry["loss_before"]


def test_e2e_refinement_on_the_grid_is_not_sharded():
    for sharded in ("fsdp", "fsdp-offload"):
        with pytest.raises(ValueError, match=f"--e2e-parallel {sharded} does not shard it"):
            CompressionConfig(method="adasvd", refine="e2e", quantization=Quantization(), e2e_parallel=sharded)
    assert CompressionConfig(method="adasvd", refine="e2e", quantization=Quantization()).e2e_parallel_run == "ddp"
    assert CompressionConfig(method="adasvd", refine="e2e").e2e_parallel_run == "auto"


def test_a_run_config_with_a_grid_round_trips_through_json():
    config = RunConfig(formats=("onnx",), quantize="int4", compression=CompressionConfig(quantization=Quantization()))
    assert RunConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="grid"):
        RunConfig(formats=("onnx",), quantize="int8", compression=CompressionConfig(quantization=Quantization()))


def tied_llama():
    from transformers import AutoModelForCausalLM
    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_a_tied_head_and_its_table_go_on_one_grid_from_the_final_hidden_states(tmp_path):
    """--ratio 0 --quantize: GPTQ alone, every linear dense. The tied lm_head gets its grid (q.head(): 8 bits)
    from the final norm's outputs and stays tied, so the embedding reads the same values; the graph packs the
    table once (GatherBlockQuantized and the head's MatMulNBits read one initializer) and computes what PyTorch
    computes with it; the saved artifact gives the grid back."""
    import onnx

    from exporter.output.artifact import load_compressed, save_compressed
    model = tied_llama()
    table = model.model.embed_tokens.weight.detach().clone()
    q = Quantization(bits=4, block_size=16, accuracy_level=0, head_bits=8)
    result = compress_(model, random_batches(8, seqlen=32), CompressionConfig(ratio=0.0, quantization=q),
                       progress=False)
    assert result.plan == {} and not any(isinstance(m, LowRankLinear) for m in model.modules())
    head = result.extra["quantize_head"]
    assert head["tied"] and head["gptq"] < head["nearest"] and model.lm_head.weight is model.model.embed_tokens.weight
    assert not torch.equal(model.lm_head.weight, table) and scales_of(model.lm_head).shape == (128, 64 // 16)
    save_compressed(model, char_tokenizer(), tmp_path / "saved", {"ranks": {}})
    back = load_compressed(tmp_path / "saved")
    assert torch.equal(back.lm_head.weight, model.lm_head.weight) and torch.equal(scales_of(back.lm_head),
                                                                                   scales_of(model.lm_head))
    path = build_onnx(model, char_tokenizer(), tmp_path / "graph", quantization=q)
    graph = onnx.load(path, load_external_data=False).graph
    assert "GatherBlockQuantized" in [n.op_type for n in graph.node]
    outside = [t for t in graph.initializer if "layers." not in t.name and "rotary" not in t.name and len(t.dims) > 1]
    assert [(t.data_type, list(t.dims)) for t in outside] == [(onnx.TensorProto.UINT8, [128, 4, 16]),
                                                               (onnx.TensorProto.FLOAT, [128, 4])], outside
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    result = parity(round_like_export(model, q), OrtDecoder.load(path), ids, "float32", steps=2, new_tokens=4)
    assert result["passed"] and result["max_abs_diff"] < 1e-5, result


def test_the_searched_scales_round_closer_than_onnx_runtimes_rule():
    from exporter.quantize.gptq import SHRINKS
    torch.manual_seed(2)
    q = Quantization(bits=4, block_size=32)
    w = torch.randn(64, 128, dtype=torch.float64)
    x = torch.randn(128, 600, dtype=torch.float64) * torch.exp(0.7 * torch.randn(128, 1, dtype=torch.float64))
    h = x @ x.T
    plain, _ = gptq(w, h, q, torch.float32)
    searched, scales = gptq(w, h, q, torch.float32, shrinks=SHRINKS)
    assert weighted_error(w, searched, h) < 0.9 * weighted_error(w, plain, h)
    back = (encode(searched, scales, q).double() - 8).view(64, -1, 32) * scales[..., None]
    assert torch.equal(back.view(64, -1), searched)  # still exactly on the grid the writer stores


def test_refinement_through_the_rounding_trains_the_float_weights_and_leaves_them_plain():
    """Inside rounded_factors a factor computes with its grid values (what round-to-nearest gives) and the
    gradient reaches the float weight as if the grid values were the weight (straight through); refinement's
    optimiser trains the float weights; outside it the factors are plain parameters again, moved."""
    from exporter.config import Refinement
    from exporter.quantize.fake import rounded_factors
    from exporter.refine.optimise import factors, optimise
    torch.manual_seed(0)
    q = Quantization(bits=4, block_size=16)
    pair = LowRankLinear.from_factors(torch.randn(24, 8), torch.randn(8, 32), None, torch.float32, "cpu")
    layer = torch.nn.Sequential(pair)
    x, target = torch.randn(4, 32), torch.randn(4, 24)
    grid_down = round_to_nearest(pair.down.weight.detach().double(), q, torch.float32)[0].float()
    grid_up = round_to_nearest(pair.up.weight.detach().double(), q, torch.float32)[0].float()
    leaf = grid_down.clone().requires_grad_(True)
    expected = torch.autograd.grad(((x @ leaf.T) @ grid_up.T - target).square().sum(), leaf)[0]
    with rounded_factors(layer, q, torch.float32):
        assert torch.equal(pair.down.weight, grid_down) and torch.equal(pair.up.weight, grid_up)
        assert factors(layer)[0] is pair.down.parametrizations.weight.original
        (pair(x) - target).square().sum().backward()
        assert torch.allclose(factors(layer)[0].grad, expected)
        factors(layer)[0].grad = None
        before = pair.down.parametrizations.weight.original.detach().clone()
        entry = optimise(layer, lambda f, b: ((f(x) - target).square().sum(), 4), [0, 1], [0],
                         Refinement(steps=8, lr=1e-2, eval_every=2), seed=0, export_dtype=torch.float32)
    assert type(pair.down.weight) is torch.nn.Parameter and not hasattr(pair.down, "parametrizations")
    assert entry["steps_run"] == 8 and entry["kept"] and not torch.equal(pair.down.weight, before)
