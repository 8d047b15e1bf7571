"""Tiny random-weight models of every family the family tests cover, from transformers' config classes.

`linears` is the number of linears compress_ must factorize at ratio 0.4 (counted by hand from the
modeling code, not by the code under test): routers and shared-expert gates stay dense.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import transformers as T
from conftest import tiny_config

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
MOE = dict(num_key_value_heads=2, num_experts_per_tok=2)


@dataclass(frozen=True)
class Family:
    config: Callable[[], T.PretrainedConfig]
    linears: int
    note: str


def _registry_config(arch):
    def build():
        config = tiny_config(arch)
        config.bos_token_id, config.eos_token_id = 1, 2
        return config
    return build


FAMILIES: dict[str, Family] = {
    "llama": Family(_registry_config("llama"), 14, "SmolLM2's architecture"),
    "mistral": Family(_registry_config("mistral"), 14, "GQA"),
    "qwen2": Family(_registry_config("qwen2"), 14, "q/k/v biases"),
    "qwen3": Family(lambda: T.Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=16), 14, "q/k norms"),
    "opt": Family(_registry_config("opt"), 12, "learned positions, fc1/fc2"),
    "phi3": Family(lambda: T.Phi3Config(**COMMON, num_key_value_heads=2), 8,
                   "fused qkv_proj and gate_up_proj"),
    "gemma2": Family(lambda: T.Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=16, sliding_window=8), 14,
                     "sandwich norms, soft-capping, sliding window every other layer, GeGLU"),
    "gemma3_text": Family(lambda: T.Gemma3TextConfig(**COMMON, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                                     layer_types=["sliding_attention", "full_attention"]), 14,
                          "q/k norms, local/global rotary bases, sliding window"),
    "mixtral": Family(lambda: T.MixtralConfig(**COMMON, **MOE, num_local_experts=4), 24, "MoE, 4 experts top-2"),
    "qwen2_moe": Family(lambda: T.Qwen2MoeConfig(**COMMON, **MOE, num_experts=4, moe_intermediate_size=48,
                                                 shared_expert_intermediate_size=64, mlp_only_layers=[1]), 22,
                        "MoE + shared expert and its gate; layer 1 dense (layers differ)"),
    "qwen3_moe": Family(lambda: T.Qwen3MoeConfig(**COMMON, **MOE, num_experts=4, moe_intermediate_size=48,
                                                 head_dim=16), 24, "MoE, q/k norms"),
    "gpt2": Family(lambda: T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                        bos_token_id=1, eos_token_id=2), 8, "Conv1D (transposed weights), fused c_attn"),
    # Named nowhere in exporter/: discovery alone.
    "gpt_neox": Family(lambda: T.GPTNeoXConfig(**COMMON), 8, "fused query_key_value, parallel residual, partial rotary"),
    "starcoder2": Family(lambda: T.Starcoder2Config(**COMMON, num_key_value_heads=2), 12,
                         "LayerNorm, biases everywhere, c_fc/c_proj"),
}
UNNAMED = ("gpt_neox", "starcoder2")


def family_model(name: str, seed: int = 0):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[name].config())
    for module in model.modules():  # HF initialises biases to 0; make them matter
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.nn.Parameter) and bias.dim() == 1 and not isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(bias, std=0.02)
    return model.eval()
