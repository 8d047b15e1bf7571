"""Quality on SmolLM2-135M and wikitext-2: perplexity of the compression recipes by ratio and calibration seed
(smollm2), adaComp's strength, adaCR's importance orientation, where each allocation puts the ranks, whether the
factorization may run in float32, fused projections as one matrix or split, and the README's family table from
the outcomes of tests/test_families.py (families)."""
