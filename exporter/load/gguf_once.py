"""A GGUF file parsed once per load. transformers reads a GGUF file's whole header (for SmolLM2: 49k tokenizer
strings: seconds on a CPU) once for the tokenizer, once for the config and once for the weights, and rebuilds
gguf's tensor-name table for every module it maps (seconds again). Inside `parsed_once()`, gguf hands out one reader
per file and one table per (architecture, layer count): the same objects, built once. The README's first
command's load stage: 8.8 s (docs/results/first-run.md), 24.6 s before; the weights and tokens are those of a
plain load (tests/test_real_smollm2.py)."""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager


@contextmanager
def parsed_once():
    import gguf

    make_reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], object] = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = make_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = make_reader, name_map
