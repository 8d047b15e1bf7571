"""Is low rank worth its bytes as a correction of int4's error? (issue 26, item 5: W ≈ Q(W) + up·down)

On SmolLM2-135M, GPTQ alone (`--ratio 0 --quantize int4 --head-bits 4`, the front's best rows) at block 64,
then each decoder linear given a rank-r correction of its residual R = W − Q(W): the loss-optimal rank-r
truncation of R under the metric of its inputs (‖(R − up·down)X‖ minimal: up = the top-r eigenvectors of
R X Xᵀ Rᵀ, down = upᵀR, exporter/factorize/linalg.py, as SVD-LLM V2 truncates a weight). X Xᵀ is gathered on
the quantized model (the stream an in-loop correction would see). Against the same bytes spent on GPTQ's own
grid: block 32 (twice the scales).

Bytes are the decoder linears' extra bytes over block 64 in a float32 graph (scales float32, the correction
pair float32, the graph dtype of SmolLM2; halve both for a float16 graph). Perplexity on the validation part
of wiki.valid.tokens (the held-out protocol, exporter/data/splits.py), in PyTorch with float activations:
every row is evaluated the same way, so the comparison holds; the ORT graph's int8 activations
(accuracy level 4) move each row a little (docs/results/front.md has the ORT numbers of the GPTQ rows).

    OMP_NUM_THREADS=1 python -m benchmarks.quality.int4_correction --ranks 4,8,16,32

writes docs/results/int4-correction.md.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from benchmarks.common import RESULTS, WIKITEXT, command_line, smollm2
from exporter import CompressionConfig, compress_
from exporter.config import Quantization
from exporter.data.splits import calibration_windows, validation_tokens
from exporter.data.text import read_text, tokenize
from exporter.factorize.linalg import descending_eigh, output_gram
from exporter.model.architecture import decoder_layers
from exporter.model.discovery import architecture_of
from exporter.model.linears import linear_weight
from exporter.validate.perplexity import perplexity, torch_logits


def gptq_alone(model, batches, block: int):
    quantized = copy.deepcopy(model)
    compress_(quantized, batches, CompressionConfig(ratio=0.0, quantization=Quantization(4, block, head_bits=4)),
              progress=False)
    return quantized


def decoder_linears(model) -> dict[str, torch.nn.Linear]:
    arch = architecture_of(model)
    return {f"{i}.{path}": layer.get_submodule(path) for i, layer in enumerate(decoder_layers(model, arch))
            for path in arch.linear_names(i)}


@torch.no_grad()
def input_grams(model, batches) -> dict[str, torch.Tensor]:
    """X Xᵀ (float64) of every decoder linear's input over the calibration batches."""
    linears, grams, hooks = decoder_linears(model), {}, []
    for name, linear in linears.items():
        def hook(module, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
            grams[name] = grams.get(name, 0) + x.T @ x
        hooks.append(linear.register_forward_pre_hook(hook))
    for ids in batches:
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return grams


@torch.no_grad()
def corrected(dense, quantized, grams, rank: int):
    """`quantized` with every decoder linear's weight Q + up·down (the residual's loss-optimal rank-r part)."""
    model = copy.deepcopy(quantized)
    dense_linears = decoder_linears(dense)
    for name, linear in decoder_linears(model).items():
        w = linear_weight(dense_linears[name]).to(torch.float64)
        q = linear.weight.to(torch.float64)
        residual = w - q
        _, vectors = descending_eigh(output_gram(residual, grams[name]))
        up = vectors[:, :rank]
        linear.weight.copy_((q + up @ (up.T @ residual)).to(linear.weight.dtype))
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", default="4,8,16,32")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=2048)
    a = p.parse_args()
    model, tokenizer = smollm2()
    text = tokenize(tokenizer, read_text(str(WIKITEXT / "wiki.valid.tokens"), "train"))
    batches = calibration_windows(text, a.calib_samples, a.calib_seqlen, seed=0, batch_size=2)
    tokens = validation_tokens(text, a.eval_tokens)

    def ppl(m, what):
        return perplexity(torch_logits(m), tokens, a.window, what, progress=False)

    shapes = [tuple(lin.weight.shape) for lin in decoder_linears(model).values()]
    weights = sum(m * n for m, n in shapes)
    rows = [("dense (float32)", None, ppl(model, "dense"))]
    start = time.perf_counter()
    b64 = gptq_alone(model, batches, 64)
    rows.append(("GPTQ alone, block 64", 0.0, ppl(b64, "b64")))
    b32 = gptq_alone(model, batches, 32)
    rows.append(("GPTQ alone, block 32", weights * 4 / 32 - weights * 4 / 64, ppl(b32, "b32")))
    grams = input_grams(b64, batches)
    for rank in [int(r) for r in a.ranks.split(",")]:
        extra = rank * sum(m + n for m, n in shapes) * 4
        rows.append((f"block 64 + rank-{rank} correction", extra, ppl(corrected(model, b64, grams, rank), f"r{rank}")))
        print(rows[-1], flush=True)
    lines = [
        "# Low rank as a correction of int4's error (SmolLM2-135M)", "",
        "Made by (`benchmarks/quality/int4_correction.py`; its docstring says what each row is):", "",
        f"    {command_line()}", "",
        f"Calibration {a.calib_samples} x {a.calib_seqlen} tokens of the first 75% of wiki.valid.tokens (seed 0); "
        f"perplexity on {a.eval_tokens} tokens of the rest (validation), window {a.window}, PyTorch float "
        f"activations. Extra MB: the decoder linears' bytes over GPTQ at block 64 in a float32 graph "
        f"({weights / 1e6:.1f} M weights; lm_head and table are the same in every row). "
        f"{time.perf_counter() - start:.0f} s on one thread.", "",
        "| row | extra MB | validation perplexity |", "|---|---|---|",
        *[f"| {name} | {'' if extra is None else f'{extra / 1e6:.2f}'} | {value:.2f} |" for name, extra, value in rows],
    ]
    (RESULTS / "int4-correction.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
