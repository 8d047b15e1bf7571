"""What the fused builder needs to know about each model family, as data, and the configurations it
refuses (one clear error each, never a silent fallback to something that computes differently).

Paths are relative to the causal-LM model (outside the decoder layers) or to one decoder layer.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Family:
    genai_type: str  # onnxruntime-genai's model.type
    norm: str  # "rms" (SimplifiedLayerNormalization) | "layer" (LayerNormalization with bias)
    rotary: bool  # rotary position embedding on q/k; else learned absolute positions
    qk_norm: bool  # per-head RMSNorm of q and k before the rotary (Qwen3)
    attn: str  # the attention module inside a layer
    q: str
    k: str
    v: str
    o: str
    norm_attn: str  # the norm before the attention
    norm_mlp: str  # the norm before the MLP
    mlp: tuple[str, ...]  # gated: (gate, up, down); plain: (fc1, fc2)
    embed: str
    final_norm: str
    layers: str  # the decoder layers' ModuleList, from the causal-LM model: every linear's name prefix
    positions: str | None = None  # learned position table (OPT)
    position_offset: int = 0  # OPT's table is indexed by position + 2

    @property
    def gated(self) -> bool:
        return len(self.mlp) == 3


LLAMA = Family(genai_type="llama", norm="rms", rotary=True, qk_norm=False, attn="self_attn",
               q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
               norm_attn="input_layernorm", norm_mlp="post_attention_layernorm",
               mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), embed="model.embed_tokens",
               final_norm="model.norm", layers="model.layers")
OPT = Family(genai_type="decoder", norm="layer", rotary=False, qk_norm=False, attn="self_attn",
             q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj",
             norm_attn="self_attn_layer_norm", norm_mlp="final_layer_norm", mlp=("fc1", "fc2"),
             embed="model.decoder.embed_tokens", final_norm="model.decoder.final_layer_norm",
             layers="model.decoder.layers",
             positions="model.decoder.embed_positions", position_offset=2)

FAMILIES = {
    "llama": LLAMA,
    "mistral": replace(LLAMA, genai_type="mistral"),
    "qwen2": replace(LLAMA, genai_type="qwen2"),  # q/k/v biases: every linear's bias is emitted
    "qwen3": replace(LLAMA, genai_type="qwen3", qk_norm=True),
    "opt": OPT,
}
# The activations ORT has one op for (QuickGelu with alpha 1 is x·sigmoid(x) = SiLU).
ACTIVATIONS = {"silu": ("QuickGelu", "com.microsoft", {"alpha": 1.0}), "relu": ("Relu", "", {}),
               "gelu": ("Gelu", "com.microsoft", {})}


class UnsupportedModel(ValueError):
    pass


def activation_of(config) -> str:
    return getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)


def family_of(config) -> Family:
    """The family of a Hugging Face config, or UnsupportedModel naming what is not handled."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModel(f"the fused ONNX graph does not handle architecture {model_type!r} "
                               f"(supported: {', '.join(sorted(FAMILIES))}); use --onnx-graph plain")
    family = FAMILIES[model_type]
    problems = []
    if activation_of(config) not in ACTIVATIONS:
        problems.append(f"activation {activation_of(config)!r}")
    if family.rotary:
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") == "dynamic":  # its frequencies change with the sequence length
            problems.append("dynamic rope scaling")
        if getattr(config, "use_sliding_window", False):
            problems.append("use_sliding_window (per-layer windows)")
    if model_type == "opt":
        if not getattr(config, "do_layer_norm_before", True):
            problems.append("post-layer-norm OPT (do_layer_norm_before=False, e.g. opt-350m)")
        if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
            problems.append("word_embed_proj_dim != hidden_size (project_in/out)")
        if not getattr(config, "enable_bias", True) or not getattr(config, "layer_norm_elementwise_affine", True):
            problems.append("OPT without biases or without affine layer norms")
    if problems:
        raise UnsupportedModel(f"the fused ONNX graph does not handle this {model_type} configuration: "
                               f"{'; '.join(problems)}; use --onnx-graph plain")
    return family
