from .base import REGISTRY, MatrixInput, Method, get_method, register  # noqa: F401
