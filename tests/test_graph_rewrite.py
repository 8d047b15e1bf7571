"""graph_rewrite on tiny graphs built in code: tagging by scope and by value, the low-rank rules on
MatMul and Gemm (with bias), the reasons a node does not match, and the errors of the pass."""
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_rewrite.module_names import SCOPES_KEY, tag_linears
from graph_rewrite.passes import RewriteError, rewrite_lowrank
from graph_rewrite.rules.lowrank import LowRankFactors, LowRankMatMul
from graph_rewrite.tags import LOWRANK_KEY, MODULE_KEY

RNG = np.random.default_rng(0)
IN, MID, OUT, RANK = 8, 12, 6, 3


def low_rank(out_features, in_features, rank):
    up = RNG.standard_normal((out_features, rank)).astype(np.float32)
    down = RNG.standard_normal((rank, in_features)).astype(np.float32)
    return up, down


def two_linears_graph(w1, b1, w2, b2, scopes: bool = True) -> ir.Model:
    """x[B, IN] → MatMul(W1ᵀ) + b1 → Relu → Gemm(W2, b2, transB=1): an MLP as the exporter writes it."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1_t"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    if scopes:
        for node, module in ((nodes[0], "m.mlp.fc1"), (nodes[3], "m.mlp.fc2")):
            entry = node.metadata_props.add()
            entry.key, entry.value = SCOPES_KEY, repr(["", "m", "m.mlp", module, "linear"])
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1.T.copy(), "w1_t"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", IN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", OUT])], inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture
def mlp():
    (up1, down1), (up2, down2) = low_rank(MID, IN, RANK), low_rank(OUT, MID, RANK)
    b1, b2 = RNG.standard_normal(MID).astype(np.float32), RNG.standard_normal(OUT).astype(np.float32)
    # Dense weights that are exactly rank RANK: the rewrite must then reproduce the graph's outputs.
    weights = {"mlp.fc1": up1 @ down1, "mlp.fc2": up2 @ down2}
    factors = {"mlp.fc1": LowRankFactors(down1, up1, b1), "mlp.fc2": LowRankFactors(down2, up2, b2)}
    return weights, factors, (b1, b2)


@pytest.mark.parametrize("scopes", [True, False], ids=["by-name", "by-value"])
def test_rewrite_replaces_matmul_and_gemm_and_drops_dense_weights(mlp, scopes):
    weights, factors, (b1, b2) = mlp
    model = two_linears_graph(weights["mlp.fc1"], b1, weights["mlp.fc2"], b2, scopes=scopes)
    x = RNG.standard_normal((5, IN)).astype(np.float32)
    dense_out = run(model, x)

    found = tag_linears(model, weights, prefix="m.")
    assert found == {"mlp.fc1": "fc1", "mlp.fc2": "fc2"}
    assert rewrite_lowrank(model, factors) == 2

    ops = [node.op_type for node in model.graph]
    assert ops.count("MatMul") == 4 and "Gemm" not in ops and ops.count("Add") == 2  # b1's Add and Gemm's C
    assert {node.metadata_props.get(LOWRANK_KEY) for node in model.graph if node.op_type == "MatMul"} \
        == {"mlp.fc1", "mlp.fc2"}
    assert not {"w1_t", "w2"} & set(model.graph.initializers)  # dense weights dropped by the cleanup
    onnx.checker.check_model(ir.serde.serialize_model(model))
    np.testing.assert_allclose(run(model, x), dense_out, rtol=1e-4, atol=1e-4)


def test_only_compressed_modules_are_rewritten(mlp):
    weights, factors, (b1, b2) = mlp
    model = two_linears_graph(weights["mlp.fc1"], b1, weights["mlp.fc2"], b2)
    tag_linears(model, weights, prefix="m.")
    assert rewrite_lowrank(model, {"mlp.fc2": factors["mlp.fc2"]}) == 1
    ops = [node.op_type for node in model.graph]
    assert ops.count("MatMul") == 3 and "w1_t" in model.graph.initializers


def test_check_says_why_a_node_does_not_match(mlp):
    weights, factors, (b1, b2) = mlp
    model = two_linears_graph(weights["mlp.fc1"], b1, weights["mlp.fc2"], b2)
    fc1 = next(node for node in model.graph if node.name == "fc1")
    rule = LowRankMatMul({"mlp.fc2": factors["mlp.fc2"]})
    assert "not tagged" in rule.check_weight(fc1, fc1.inputs[1]).reason
    tag_linears(model, weights, prefix="m.")
    assert "mlp.fc1 was not compressed" in rule.check_weight(fc1, fc1.inputs[1]).reason
    wrong_shape = LowRankMatMul({"mlp.fc1": factors["mlp.fc2"]})
    assert "!= factors" in wrong_shape.check_weight(fc1, fc1.inputs[1]).reason
    assert bool(LowRankMatMul(factors).check_weight(fc1, fc1.inputs[1]))


def test_a_compressed_module_not_in_the_graph_is_an_error(mlp):
    weights, factors, (b1, b2) = mlp
    model = two_linears_graph(weights["mlp.fc1"], b1, weights["mlp.fc2"], b2, scopes=False)
    tag_linears(model, {"mlp.fc2": weights["mlp.fc2"]})  # fc1 never matched
    with pytest.raises(RewriteError, match="1 compressed module.*no dense weight.*mlp.fc1"):
        rewrite_lowrank(model, factors)


def test_value_matching_never_guesses_between_equal_weights():
    w = RNG.standard_normal((MID, IN)).astype(np.float32)
    b = np.zeros(MID, np.float32)
    model = two_linears_graph(w, b, np.eye(OUT, MID, dtype=np.float32), np.zeros(OUT, np.float32), scopes=False)
    # Two modules with the same weight value: which graph weight is whose cannot be known.
    found = tag_linears(model, {"a": w, "b": w.copy()})
    assert found == {}
    assert not any(MODULE_KEY in node.metadata_props for node in model.graph)
