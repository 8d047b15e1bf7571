"""Text for calibration and evaluation from a named source: wikitext-2 through `datasets` or a local
.txt/.raw/.tokens/.jsonl file (checked before any model is loaded), and its tokens. Never a silent fallback
between sources."""
from __future__ import annotations

import codecs
import json
from pathlib import Path

import torch

WIKITEXT = ("wikitext", "wikitext-2-raw-v1")
SOURCES = ("wikitext2", "generated")  # the named sources; anything else is a file path


class DataError(RuntimeError):
    pass


def read_text(source: str, split: str) -> str:
    """The whole text of a source: 'wikitext2' (hub, `split`) or a local .txt/.raw/.tokens/.jsonl file."""
    if source == "wikitext2":
        try:
            import datasets
            rows = datasets.load_dataset(*WIKITEXT, split=split)["text"]
        except Exception as exc:  # offline, hub down, missing dataset: one clear line, no fallback
            raise DataError(
                f"could not load wikitext-2 ({split}) from the Hugging Face hub ({type(exc).__name__}). "
                "Pass a local file (--calib-data/--eval-data PATH) or --calib-data generated"
            ) from exc
        return "\n\n".join(rows)
    path = check_text_file(source)
    if path.suffix == ".jsonl":
        return "\n\n".join(jsonl_texts(path, path.read_text(encoding="utf-8")))
    return path.read_text(encoding="utf-8")


def check_text_file(source: str) -> Path:
    """A calibration/evaluation file exists, is not empty and is UTF-8 text (JSONL: a "text" per line).
    Cheap enough to run before any model is loaded; each failure names the file."""
    path = Path(source)
    if not path.exists():
        raise DataError(f"data file not found: {source} (use 'wikitext2', 'generated' or a file path)")
    if not path.is_file():
        raise DataError(f"data file {source} is a folder, not a text file")
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(2**20):
                decoder.decode(chunk)
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise DataError(f"data file {source} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                        f"{offset + exc.start}): give a .txt/.raw/.tokens/.jsonl text file") from exc
    except OSError as exc:
        raise DataError(f"cannot read data file {source}: {exc.strerror}") from exc
    if offset == 0:
        raise DataError(f"data file {source} is empty")
    if path.suffix == ".jsonl":
        jsonl_texts(path, path.read_text(encoding="utf-8"))
    return path


def jsonl_texts(path: Path, text: str) -> list[str]:
    texts = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                value = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{path}:{n}: each JSONL line needs a \"text\" field") from exc
            if not isinstance(value, str):
                raise DataError(f"{path}:{n}: \"text\" must be a string")
            texts.append(value)
    return texts


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() == 0:
        raise DataError("the data is empty after tokenization")
    return ids
