"""ONNX graph passes (pattern + check + replacement), used by the ONNX export."""
