"""Architecture discovery (exporter/model/discovery.py): the grouping it finds equals the registry it replaced,
it works with one materialised layer, layers that differ get their own groups, every layer gets its own
arguments, and what cannot work is one clear line."""
import logging

import pytest
import torch
import torch.nn as nn
from conftest import random_batches, tiny_model
from families import family_model

from exporter import CompressionConfig, compress_
from exporter.model.architecture import ARCHITECTURES, Architecture, InputGroup
from exporter.model.discovery import DiscoveryError, architecture_of, discover, discover_layer_groups, prepare
from exporter.model.layer_inputs import capture_layer_inputs

# The registry's entries before discovery replaced them (exporter/model/architecture.py at c0bcdb4).
FORMER_REGISTRY = {
    "llama": Architecture(layers="model.layers", groups=(
        InputGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")), InputGroup(("self_attn.o_proj",)),
        InputGroup(("mlp.gate_proj", "mlp.up_proj")), InputGroup(("mlp.down_proj",)))),
    "opt": Architecture(layers="model.decoder.layers", groups=(
        InputGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")), InputGroup(("self_attn.out_proj",)),
        InputGroup(("fc1",)), InputGroup(("fc2",)))),
}
FORMER_REGISTRY.update(mistral=FORMER_REGISTRY["llama"], qwen2=FORMER_REGISTRY["llama"])


@pytest.mark.parametrize("arch_name", ["llama", "mistral", "qwen2", "opt"])
def test_discovery_finds_the_former_registry(arch_name):
    assert architecture_of(tiny_model(arch_name)) == FORMER_REGISTRY[arch_name]


@pytest.mark.slow
def test_smollm2_discovered_grouping_is_the_former_registry(smollm2):
    """SmolLM2's results stay unchanged: the same groups, in the same order, so the same statistics, matrices
    and allocations (only the type names gain their parent, e.g. self_attn.q_proj)."""
    model, _ = smollm2
    assert architecture_of(model) == FORMER_REGISTRY["llama"]


def test_layers_are_found_without_no_split_modules(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(type(model), "_no_split_modules", None)
    assert architecture_of(model) == FORMER_REGISTRY["llama"]


def test_a_compressed_model_has_nothing_left_to_discover():
    model = tiny_model("llama")
    compress_(model, random_batches(), CompressionConfig(ratio=0.4, allocation="uniform"), progress=False)
    assert architecture_of(model).groups == ()


def test_discovery_needs_only_one_materialised_layer():
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    real = tiny_model("llama")
    with init_empty_weights(include_buffers=False):  # every parameter on meta, rotary buffers real
        model = AutoModelForCausalLM.from_config(real.config).eval()
    for name in ("model.embed_tokens", "model.layers.1"):  # embeddings and ONE layer, not layer 0
        model.set_submodule(name, real.get_submodule(name))
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    assert discover(model) == FORMER_REGISTRY["llama"]

    model.set_submodule("model.layers.1", AutoModelForCausalLM.from_config(real.config).model.layers[1].to("meta"))
    with pytest.raises(DiscoveryError, match="model.layers.0 is on the meta device"):
        discover(model)
    materialised = []

    def materialize(i):  # what a streamed loader passes: load layer i for the duration
        class Loaded:
            def __enter__(self):
                materialised.append(i)
                model.model.layers[i] = real.model.layers[i]

            def __exit__(self, *exc):
                return False
        return Loaded()
    assert discover(model, materialize) == FORMER_REGISTRY["llama"] and materialised == [0]


def test_layers_that_differ_get_their_own_groups():
    model = family_model("qwen2_moe")  # layer 0 sparse (4 experts + shared expert), layer 1 dense
    arch = prepare(model)
    assert arch.per_layer is not None and arch.groups_of(0) == arch.groups
    attention = (InputGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                 InputGroup(("self_attn.o_proj",)))
    assert arch.groups_of(1) == attention + (InputGroup(("mlp.gate_proj", "mlp.up_proj")), InputGroup(("mlp.down_proj",)))
    sparse = arch.groups_of(0)
    experts = [g for g in sparse if g.routed]
    assert [g.linears for g in experts] == [(f"mlp.experts.{e}.{p}",) for e in range(4) for p in ("gate_up_proj", "down_proj")]
    assert InputGroup(("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")) in sparse
    names = arch.linear_names(0)
    assert "mlp.shared_expert_gate" not in names and "mlp.gate" not in names  # gates stay dense
    assert arch.matrix_kind("mlp.experts.3.down_proj") == "mlp.experts.down_proj"


def test_every_layer_gets_its_own_arguments():
    """Gemma 3: sliding-window and full layers get different masks and rotary embeddings. Replaying each
    layer with its captured arguments reproduces the model; with layer 0's, layer 1 would be wrong."""
    model = family_model("gemma3_text")  # window 8, 16 tokens: the masks differ
    ids = random_batches(n=1, seqlen=16, batch_size=1)[0]
    layers = model.model.layers
    captured = capture_layer_inputs(model, layers, [ids], "cpu")
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
        first = layers[0](captured.hidden[0], **captured.kwargs_for(0)[0])
        second = model.model.norm(layers[1](first, **captured.kwargs_for(1)[0]))
        wrong = model.model.norm(layers[1](first, **captured.kwargs_for(0)[0]))
    assert torch.equal(captured.hidden[0], states[0])
    assert torch.allclose(first, states[1], atol=1e-6) and torch.allclose(second, states[2], atol=1e-5)
    assert not torch.allclose(wrong, states[2], atol=1e-3)


def test_a_linear_run_twice_is_refused_and_an_unused_one_stays_dense(caplog):
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.unused = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.b(self.a(x)) + self.b(x)

    with pytest.raises(DiscoveryError, match="b runs 2 times"):
        discover_layer_groups(Layer(), torch.randn(1, 3, 8), {})

    class Once(Layer):
        def forward(self, x):
            return self.b(self.a(x)) + self.a(x).sum()

    with pytest.raises(DiscoveryError, match="a runs 2 times"):
        discover_layer_groups(Once(), torch.randn(1, 3, 8), {})

    class Unused(Layer):
        def forward(self, x):
            return self.b(self.a(x))

    with caplog.at_level(logging.WARNING):
        groups = discover_layer_groups(Unused(), torch.randn(1, 3, 8), {})
    assert groups == (InputGroup(("a",)), InputGroup(("b",))) and "never run" in caplog.text


def test_what_cannot_work_is_one_line_before_any_work():
    from transformers import LlamaModel, T5Config, T5ForConditionalGeneration
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=32, d_ff=64, num_layers=1, num_heads=2)).eval()
    with pytest.raises(DiscoveryError, match="'t5' is an encoder-decoder"):
        compress_(t5, random_batches(), CompressionConfig(ratio=0.4))
    headless = LlamaModel(tiny_model("llama").config).eval()
    with pytest.raises(DiscoveryError, match="has no causal LM head"):
        compress_(headless, random_batches(), CompressionConfig(ratio=0.4))


def test_a_registry_entry_overrides_discovery(monkeypatch):
    only_q = Architecture(layers="model.layers", groups=(InputGroup(("self_attn.q_proj",)),))
    monkeypatch.setitem(ARCHITECTURES, "llama", only_q)
    result = compress_(tiny_model("llama"), random_batches(), CompressionConfig(ratio=0.4, allocation="uniform"),
                       progress=False)
    assert sorted(result.plan) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
