"""What a run leaves on disk, and only that: one writer per output name, nothing half-written under it or
beside it, and an artifact that verifies itself when it is loaded.

    folder.py        the output folder: lock, temporary folder, rename into place, cleanup of leftovers
    signals.py       SIGTERM/SIGINT during a run: exit at once, leave nothing behind
    shards.py        ShardWriter: the one safetensors writer (a decoder layer's tensors as it is compressed)
    artifact.py      the safetensors artifact: config entry with the rank plan, sidecars, checksums, save/load
    resume_state.py  the per-layer resume state of a run (--resume), inside its partial folder
"""
