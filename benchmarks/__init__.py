"""The scripts that measure the exporter and write docs/results/, in three groups:

- quality: perplexity and truncation loss of the compression recipes on SmolLM2-135M (recipes × ratios ×
  seeds, adaComp's strength, adaCR's importance, where the allocations put the ranks, float32 factorization,
  fused projections) and the README's family table;
- speed: ONNX Runtime and PyTorch eager throughput on the CPU (against the weight-bytes bound, per op, per KV
  protocol, per thread count), the README's first run, and the GPU benchmark on 7B shapes;
- scale: real sizes on this machine (random-weight checkpoints of real shapes compressed by the CLI) and the
  memory formulas for them.

`benchmarks.common` holds what they share. Run one from the repository root as a module:

    python -m benchmarks.<group>.<name> --help      # e.g. python -m benchmarks.quality.smollm2 --help

Each results file quotes the command that wrote it in that form.
"""
