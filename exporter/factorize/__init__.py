"""Factorization methods: one weight plus the statistics of its input → low-rank factors (up, down).
A new method is one file here with one @register'd class (base.py holds the interface and the registry).

    base.py        MatrixInput (W and its input statistics), Method, register, get_method
    stats.py       InputStats: X Xᵀ (and adaComp's cross moments) summed in float64, batch by batch
    linalg.py      the truncation math: whitening, output Gram, loss and its theoretical minimum
    gradients.py   the whole-model LM-loss backward (FWSVD's Fisher)
    svd.py asvd.py fwsvd.py svd_llm.py svd_llm_v2.py adasvd.py   the methods
"""
