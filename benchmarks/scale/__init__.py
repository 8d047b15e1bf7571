"""Scale: random-weight checkpoints of real shapes written and compressed by the CLI on this machine, with their
peak memory and seconds per layer (scale, results in docs/results/scale.md), and the peak memory of the
compression pass from the formulas of docs/scale.md (memory_budget)."""
