"""Refinement after the closed form: Adam on the low-rank factors, never worse than where it started.

    optimise.py  the loop: float32 Adam, held-out batches for early stopping, the closed form restored unless
                 both the training and the held-out objective went down
    block.py     --refine block: one decoder layer against the dense layer's output (inside the layer loop)
    e2e.py       --refine e2e: the whole model against the dense model's logits (after the layer loop)
"""
