"""A compressed model must leave compress_ in the state its reloaded artifact has, so that PyTorch
measures (and serves) the two alike. Issue 13: the pipeline's eager row decoded 10× slower than the
reloaded safetensors. Found: compress_ left every new LowRankLinear (and its two linears) in training mode
inside an eval model, and the eager measurement ran with all cores' threads while the reloaded one ran
with one (docs/throughput.md, "Threads"). Compared here: everything about the modules and parameters
that can change how a forward runs, never a timing."""
import torch
from conftest import random_batches, tiny_model

from exporter import CompressionConfig, compress_, load_compressed
from exporter.output.artifact import save_compressed


class NoTokenizer:
    def save_pretrained(self, folder):
        pass


def eager_state(model) -> dict:
    modules = {name: (type(m).__name__, m.training, len(m._forward_hooks), len(m._forward_pre_hooks),
                      len(m._backward_hooks), len(m._backward_pre_hooks)) for name, m in model.named_modules()}
    params = {name: (p.dtype, p.device.type, p.is_contiguous(), p.grad is None)
              for name, p in model.named_parameters()}
    return {"modules": modules, "params": params, "attention": model.config._attn_implementation,
            "use_cache": model.config.use_cache}


def differences(a: dict, b: dict) -> list:
    out = []
    for key in a:
        if isinstance(a[key], dict):
            out += [(key, n, a[key].get(n), b[key].get(n)) for n in a[key].keys() | b[key].keys()
                    if a[key].get(n) != b[key].get(n)]
        elif a[key] != b[key]:
            out.append((key, a[key], b[key]))
    return out


def test_compressed_model_is_in_the_state_of_its_reloaded_artifact(tmp_path):
    model = tiny_model("qwen2")
    result = compress_(model, random_batches(), CompressionConfig(method="svd", ratio=0.4, allocation="uniform"),
                       progress=False)
    save_compressed(model, NoTokenizer(), tmp_path, {"ranks": result.plan})
    reloaded = load_compressed(tmp_path)
    assert not differences(eager_state(model), eager_state(reloaded))
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=random_batches()[0]).logits, reloaded(input_ids=random_batches()[0]).logits)
