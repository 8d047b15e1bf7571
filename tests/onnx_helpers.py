"""Helpers for the ONNX tests: a character-level tokenizer for the tiny models (vocab 128), and a tiny
model saved as a folder the CLI can load."""
from __future__ import annotations

import string
from pathlib import Path

from conftest import tiny_model

CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"


def char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    assert len(vocab) <= 128
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_model_dir(arch: str, folder: Path) -> Path:
    model = tiny_model(arch)
    model.config.bos_token_id, model.config.eos_token_id = 1, 2
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder
