"""Plain SVD: truncate W itself, blind to the data (the weakest baseline)."""
from __future__ import annotations

import torch

from .base import MatrixInput, Method, register
from .linalg import split_factors


@register
class PlainSVD(Method):
    name = "svd"

    def __init__(self, **_):
        pass

    def factorize(self, m: MatrixInput, rank: int):
        u, s, vh = torch.linalg.svd(m.weight, full_matrices=False)
        return split_factors(u, s, vh, rank)
