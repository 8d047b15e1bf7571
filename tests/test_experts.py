"""MoE experts as per-expert linears (exporter/model/experts.py): bit-for-bit the fused module, refused when a
class computes something else, each expert compressed with its own tokens, an expert without tokens kept
dense and reported."""
import pytest
import torch
from conftest import random_batches
from families import family_model
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from exporter import CompressionConfig, compress_, load_compressed
from exporter.model.experts import ExpertList, UnsupportedExperts, probe_routing, unfuse_experts
from exporter.model.lowrank import LowRankLinear
from exporter.output.artifact import save_compressed


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_unfused_experts_are_the_eager_model_bit_for_bit(family):
    model = family_model(family)
    model.config._experts_implementation = "eager"  # transformers' reference loop
    ids = random_batches(n=2, seqlen=16)[0]
    before = logits(model, ids)
    names = unfuse_experts(model)
    assert names and all(isinstance(model.get_submodule(n), ExpertList) for n in names)
    assert unfuse_experts(model) == []  # idempotent
    assert torch.equal(logits(model, ids), before)


class Doubled(MixtralExperts):
    def forward(self, hidden_states, top_k_index, top_k_weights):
        return 2 * super().forward(hidden_states, top_k_index, top_k_weights)


class CustomGate(MixtralExperts):
    def _apply_gate(self, gate_up_out):
        gate, up = gate_up_out.chunk(2, dim=-1)
        return gate * up


@pytest.mark.parametrize("cls,message", [(Doubled, "differs from the fused module"), (CustomGate, "custom gate")])
def test_an_experts_class_that_computes_otherwise_is_refused(cls, message):
    model = family_model("mixtral")
    original = model.model.layers[0].mlp.experts
    odd = cls(model.config)
    odd.load_state_dict(original.state_dict())
    model.model.layers[0].mlp.experts = odd
    with pytest.raises(UnsupportedExperts, match=message):
        unfuse_experts(model)


def test_each_expert_sees_only_its_tokens():
    experts = family_model("mixtral").model.layers[0].mlp.experts
    unfused = unfuse_experts_of(experts)
    x, index, weights = probe_routing(len(unfused), 64, torch.float32, "cpu")
    seen = {}
    for i, expert in enumerate(unfused):
        expert.down_proj.register_forward_pre_hook(lambda _m, args, i=i: seen.__setitem__(i, args[0].shape[0]))
    unfused(x, index, weights)
    assert seen == {i: int((index == i).sum()) for i in range(len(unfused))}


def unfuse_experts_of(module):
    holder = torch.nn.Module()
    holder.experts = module
    unfuse_experts(holder)
    return holder.experts


def never_route_to(expert: int):
    """A router hook that sends expert `expert`'s tokens to another expert (top-2)."""
    def hook(_module, _args, out):
        router_logits, scores, index = out
        other = index.flip(-1)
        spare = torch.where(other == 0, 1, 0)
        return router_logits, scores, torch.where(index == expert, spare, index)
    return hook


@pytest.mark.parametrize("allocation", ["uniform", "global-relative"])
def test_an_expert_without_tokens_stays_dense_and_is_reported(tmp_path, allocation):
    model = family_model("mixtral")
    handles = [layer.mlp.gate.register_forward_hook(never_route_to(3)) for layer in model.model.layers]
    with torch.no_grad():  # realistic scales for the spectra-based allocation
        for p in model.model.layers.parameters():
            p.mul_(10 if p.dim() >= 2 else 1)
    result = compress_(model, random_batches(), CompressionConfig(method="svd-llm-v2", ratio=0.4, allocation=allocation),
                       progress=False)
    for h in handles:
        h.remove()
    dense = [f"model.layers.{i}.mlp.experts.3.{p}" for i in range(2) for p in ("down_proj", "gate_up_proj")]
    assert result.extra["uncalibrated_experts"] == dense
    for name in dense:
        assert isinstance(model.get_submodule(name), torch.nn.Linear) and name not in result.plan
    assert isinstance(model.model.layers[0].mlp.experts[2].down_proj, LowRankLinear)
    save_compressed(model, _NoTokenizer(), tmp_path, {"ranks": result.plan})
    ids = random_batches(n=2, seqlen=16)[0]
    assert torch.equal(logits(load_compressed(tmp_path), ids), logits(model, ids))


def test_adacomp_is_refused_on_experts():
    with pytest.raises(ValueError, match="MoE experts route the original and the compressed stream differently"):
        compress_(family_model("mixtral"), random_batches(), CompressionConfig(method="adasvd", ratio=0.4,
                                                                               allocation="uniform"), progress=False)


class _NoTokenizer:
    def save_pretrained(self, folder):
        pass
