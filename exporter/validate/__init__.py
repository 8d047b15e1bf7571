"""Validation against the original model: numbers measured, never assumed.

    perplexity.py       exp(mean NLL) over non-overlapping windows, from any ids → logits function
    parity.py           ONNX Runtime against PyTorch: logits step by step, greedy tokens, onnxruntime-genai
    streamed_parity.py  the same for a model never whole in memory (PyTorch through the layer source)
    ort_session.py      ONNX Runtime sessions and a step function over the graph's KV cache
    providers.py        a provider that is checked (never a silent CPU fallback reported as CUDA)
    throughput.py       prefill / decode tokens/s under ORT (IO binding, shared KV buffer, CUDA graphs) and eager
    bound.py            the weight-bytes bound on the decode speedup
"""
