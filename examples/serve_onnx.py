"""Serve an svd-export ONNX folder with plain ONNX Runtime: a greedy generate loop on the KV cache.

    python examples/serve_onnx.py OUT_FOLDER "The capital of France is" --max-new-tokens 32 [--provider cuda]

Needs only onnxruntime (or onnxruntime-gpu), numpy and the tokenizer files in the folder (transformers).
The graph takes input_ids, attention_mask, [position_ids,] past_key_values.{i}.key/value and returns
logits and present.{i}.key/value: each step feeds the new token and the previous step's present as past.
(onnxruntime-genai can serve the same folder: it reads genai_config.json.)"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort
from transformers import AutoTokenizer

NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()

    provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[args.provider]
    providers = list(dict.fromkeys([provider, "CPUExecutionProvider"]))  # CPU runs what CUDA lacks
    session = ort.InferenceSession(str(args.folder / "model.onnx"), providers=providers)
    if session.get_providers()[0] != provider:  # ORT falls back to the CPU silently: say so instead
        raise SystemExit(f"ONNX Runtime could not use {provider} (got {session.get_providers()[0]})")
    tokenizer = AutoTokenizer.from_pretrained(args.folder)

    inputs = {i.name: i for i in session.get_inputs()}
    past_names = [n for n in inputs if n.startswith("past_key_values.")]
    outputs = ["logits", *(n.replace("past_key_values.", "present.", 1) for n in past_names)]
    _, kv_heads, _, head_dim = inputs[past_names[0]].shape
    kv_dtype = NUMPY[inputs[past_names[0]].type]

    ids = np.array([tokenizer(args.prompt)["input_ids"]], dtype=np.int64)
    past = {n: np.zeros((1, kv_heads, 0, head_dim), kv_dtype) for n in past_names}
    new_tokens, length = [], 0
    for _ in range(args.max_new_tokens):
        feed = {"input_ids": ids, "attention_mask": np.ones((1, length + ids.shape[1]), np.int64), **past}
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(length, length + ids.shape[1], dtype=np.int64)[None]
        logits, *present = session.run(outputs, feed)
        length += ids.shape[1]
        token = int(logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        new_tokens.append(token)
        ids = np.array([[token]], dtype=np.int64)
        past = dict(zip(past_names, present))  # the cache grows by one position per step
    print(args.prompt + tokenizer.decode(new_tokens))


if __name__ == "__main__":
    main()
