"""`python bad_inputs_driver.py STAGE CLI-ARGS...`: the svd-export CLI with one pipeline stage replaced by a
stand-in that does the stage's side effects, writes $SVD_TEST_READY and then waits until $SVD_TEST_GATE
exists (then runs the real stage). Signal and concurrency tests kill or race it at a known point.

Stages: load | compress (waits inside LAPACK: a 3000x3000 float64 SVD per round) | save (after the real
save wrote the partial folder) | onnx (after a file was written into the dense-ONNX work folder) | none.
"""
import os
import sys
import time
from pathlib import Path


def arrived() -> None:
    if os.environ.get("SVD_TEST_READY"):
        Path(os.environ["SVD_TEST_READY"]).write_text(str(os.getpid()))


def wait(lapack: bool = False) -> None:
    gate = os.environ.get("SVD_TEST_GATE")
    while not (gate and Path(gate).exists()):
        if lapack:
            import torch
            torch.linalg.svd(torch.randn(3000, 3000, dtype=torch.float64))  # minutes of C, no bytecode
        else:
            time.sleep(0.05)


def main() -> None:
    stage, args = sys.argv[1], sys.argv[2:]
    import exporter.output.artifact as artifact
    import exporter.run as pipeline

    if stage == "load":
        real_open = pipeline.open_source

        def open_source(*a, **k):
            arrived()
            wait()
            return real_open(*a, **k)
        pipeline.open_source = open_source
    elif stage == "compress":
        real_compress = pipeline.compress_source

        def compress_source(*a, **k):
            arrived()
            wait(lapack=True)
            return real_compress(*a, **k)
        pipeline.compress_source = compress_source
    elif stage == "save":
        real_save = artifact.write_sidecars

        def write_sidecars(*a, **k):
            real_save(*a, **k)
            arrived()
            wait()
        artifact.write_sidecars = write_sidecars
    elif stage == "onnx":
        from exporter.onnx.stage import OnnxStage
        real_export = OnnxStage.export_dense

        def export_dense(self, model, tokenizer, source=None):
            (Path(self.work.name) / "partial.onnx").write_bytes(b"x" * 1000)
            arrived()
            wait()
            return real_export(self, model, tokenizer, source)
        OnnxStage.export_dense = export_dense
    elif stage != "none":
        raise SystemExit(f"unknown stage {stage}")

    from exporter.cli import main as cli
    cli(args, prog_name="svd-export")


if __name__ == "__main__":
    main()
