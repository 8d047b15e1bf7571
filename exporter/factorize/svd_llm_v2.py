"""SVD-LLM V2 loss-optimized truncation (paper Alg. 2, Thm 3.1).

W' = P_r P_rᵀ W with P_r the top-r left singular vectors of WX (exporter/factorize/linalg.py explains why this is
the paper's truncation computed through one min(m, n)-sized eigendecomposition). Its loss ‖WX − W'X‖_F
equals the theoretical minimum √Σ_{i>r} σ_i(WX)² for any positive semi-definite X Xᵀ, singular included.
Factors: up = P_r (orthonormal columns), down = P_rᵀ W.
"""
from __future__ import annotations

from .base import MatrixInput, Method, register


@register
class SVDLLMV2(Method):
    name = "svd-llm-v2"

    def __init__(self, **_):
        pass

    def factorize(self, m: MatrixInput, rank: int):
        directions = m.top_directions(rank)
        return directions, directions.T @ m.weight
