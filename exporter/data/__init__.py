"""Calibration and evaluation text, never mixed up and never a silent fallback between sources.

    text.py       wikitext-2 (hub) or a local .txt/.raw/.tokens/.jsonl file, checked before the model loads
    generated.py  text the model writes itself (data-free calibration, offline evaluation)
    windows.py    calibration batches (seeded windows) and the evaluation token stream
    splits.py     the held-out protocol: calibration / validation / test roles of a text
"""
