"""Resume: a per-layer checkpoint of a run, kept inside its partial output folder.

After every finished layer: the activations every stream carries to the next layer (one safetensors file)
and a small state.json (which pass, the next layer, what the passes measured so far). The state file is
replaced atomically after the activations are on disk, so a kill at any moment leaves the last complete
checkpoint. A checkpoint made with other settings is refused with the settings that differ, never mixed in.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..model.activations import Activations

FOLDER = ".resume"


class ResumeError(RuntimeError):
    pass


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} -> {b!r}")
    return out


def refuse_other_settings(candidates: list[Path], settings: dict) -> None:
    """--resume found no checkpoint of these settings: if one of other settings waits under the same output
    name, say what differs (resuming it with these options would mix two runs)."""
    for folder in candidates:
        state_file = folder / FOLDER / "state.json"
        if state_file.exists():
            diff = _differences(json.loads(state_file.read_text())["settings"], settings)
            if diff:
                raise ResumeError(f"the checkpoint in {folder} was made with other settings ({'; '.join(diff[:3])}): "
                                  "resume with the same options, or drop --resume to start afresh")


class ResumeState:
    def __init__(self, folder: Path, settings: dict):
        self.folder = Path(folder) / FOLDER
        self.settings = settings  # what makes two runs the same run (JSON-able)
        self.seq, self.tensors = 0, None  # the committed checkpoint's number and activations file

    @property
    def state_file(self) -> Path:
        return self.folder / "state.json"

    def load(self) -> dict | None:
        """The saved state, or None when there is none. Settings that differ are an error."""
        if not self.state_file.exists():
            return None
        state = json.loads(self.state_file.read_text())
        self.seq, self.tensors = state["seq"], state["tensors"]
        diff = _differences(state["settings"], self.settings)
        if diff:
            raise ResumeError(f"the checkpoint in {self.folder.parent} was made with other settings "
                              f"({'; '.join(diff[:3])}): resume with the same options, or drop --resume")
        return state

    def save(self, state: dict, streams: dict[str, Activations], tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Write the activations (and `tensors`), then commit `state` (JSON-able)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        seq = self.seq + 1
        data = {f"stream.{name}.{b}": h.contiguous() for name, acts in streams.items() if acts is not None
                for b, h in enumerate(acts.hidden)}
        data.update({f"extra.{k}": v.contiguous().cpu() for k, v in (tensors or {}).items()})
        tensor_file = self.folder / f"tensors-{seq}.safetensors"
        save_file(data, str(tensor_file))
        state = {**state, "seq": seq, "tensors": tensor_file.name, "settings": self.settings}
        tmp = self.folder / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_file)  # the commit point
        if self.tensors is not None:
            (self.folder / self.tensors).unlink(missing_ok=True)
        self.seq, self.tensors = seq, tensor_file.name

    def restore(self, state: dict, streams: dict[str, Activations]) -> dict[str, torch.Tensor]:
        """Put the saved activations into `streams` (captured afresh at layer 0, for their kwargs);
        -> the extra tensors."""
        data = load_file(str(self.folder / state["tensors"]))
        for name, acts in streams.items():
            if acts is None:
                continue
            keys = [f"stream.{name}.{b}" for b in range(len(acts.hidden))]
            if any(k not in data for k in keys) or f"stream.{name}.{len(keys)}" in data:
                raise ResumeError(f"the checkpoint's '{name}' activations do not match this run's batches")
            acts.hidden[:] = [data[k] for k in keys]
        return {k[len("extra."):]: v for k, v in data.items() if k.startswith("extra.")}
