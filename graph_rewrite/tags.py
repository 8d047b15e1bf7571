"""The node metadata every svd-export graph carries, whichever writer made it (the plain graph's rewrite here,
the fused builder in exporter/onnx/fused): which PyTorch module a weight matmul implements. Tests, the
throughput profiler and the quantized checks find the linears by these tags, never by position."""
MODULE_KEY = "svd_export.module"  # on a dense linear's MatMul/Gemm: the module's full name
LOWRANK_KEY = "svd_export.lowrank"  # on both MatMuls of a low-rank pair: the module they implement
