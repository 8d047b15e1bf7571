"""Per-shard checksums of a compressed folder: recorded at save in config.json (`svd_export.checksums`),
verified by load_compressed, so a truncated or bit-flipped file never loads."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .checks import CorruptInput, check_safetensors_file, safetensors_files

CHUNK = 16 * 2**20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def record_checksums(folder: str | Path) -> dict[str, dict]:
    """Write {shard: {bytes, sha256}} for every safetensors shard into config.json's svd_export entry."""
    from .artifacts import CONFIG_KEY

    folder = Path(folder)
    sums = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in safetensors_files(folder)}
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault(CONFIG_KEY, {})["checksums"] = sums
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return sums


def verify_checksums(folder: str | Path, meta: dict) -> None:
    """Every shard the folder needs exists, is complete and matches its recorded checksum (folders written
    before checksums existed get the header/size check only)."""
    folder = Path(folder)
    recorded = meta.get("checksums") or {}
    for path in safetensors_files(folder):
        if path.name not in recorded:
            check_safetensors_file(path)
            continue
        if not path.is_file():
            raise CorruptInput(f"{path}: file not found")
        want = recorded[path.name]
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CorruptInput(f"{path}: {size} bytes, {want['bytes']} were written: the file is truncated or "
                               "was replaced")
        if sha256(path) != want["sha256"]:
            raise CorruptInput(f"{path}: sha256 differs from the one recorded at save: the file is corrupt")
    missing = sorted(set(recorded) - {p.name for p in safetensors_files(folder)})
    if missing:
        raise CorruptInput(f"{folder / missing[0]}: file not found (recorded at save)")
