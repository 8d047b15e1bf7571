"""Speed: ONNX Runtime CPU throughput of SmolLM2-135M against its weight-bytes bound (throughput_cpu), where its
decode time goes per op (ort_profile), the two KV protocols of the decode loop (kv_protocol), PyTorch eager
throughput by thread count (eager_threads), the README's first command and signal latency (first_run), and the
GPU benchmark on 7B-shaped random-weight models (gpu, with gpu_device.sh, the device call of docs/gpu-howto.md)."""
