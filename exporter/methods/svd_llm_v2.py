"""SVD-LLM V2 loss-optimized truncation (paper Alg. 2, Thm 3.1).

C = U_s S_s U_sᵀ (eigendecomposition, any PSD C); D = W U_s √S_s = U_ws S_ws V_wsᵀ;
W' = U_ws Trunc_r(S_ws) V_wsᵀ √S_s⁻¹ U_sᵀ. Its loss ‖WX − W'X‖_F equals the theoretical minimum
√Σ_{i>r} σ_i(WX)² — no positive-definiteness needed. Directions where X Xᵀ has (numerically) zero
energy get a pseudo-inverse (0): nothing was observed there, so W' maps them to 0.
"""
from __future__ import annotations

from ..linalg import split_factors
from .base import MatrixInput, Method, register


@register
class SVDLLMV2(Method):
    name = "svd-llm-v2"

    def __init__(self, **_):
        pass

    def factorize(self, m: MatrixInput, rank: int):
        wh, d = m.stats.whitening, m.whitened
        up, down = split_factors(d.u, d.s, d.vh, rank)
        down = (down * wh.inv_sqrt_eig) @ wh.basis.T
        return up, down
