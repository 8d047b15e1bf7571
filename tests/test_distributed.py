"""Under torchrun (2 processes, gloo on this CPU): the layer loop splits the calibration batches and the
evaluation windows across ranks (statistics summed over both, matrices factorized by one rank each), block and
end-to-end refinement run data-parallel (DistributedDataParallel), and rank 0 alone writes. The result is the
one-process result up to the order of the sums and the batches per step."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from onnx_helpers import tiny_model_dir

WORDS = ("the quick brown fox jumps over lazy dog pack my box with five dozen liquor jugs alpha beta gamma delta "
         "river stone cloud seven north").split()


def cli(args, processes: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)] if processes > 1 else []
    return subprocess.run([sys.executable, *launcher, "-m", "exporter.cli", *args, "-q"], env=env,
                          capture_output=True, text=True, timeout=600)


def tiny_run_args(tmp_path, recipe: list[str]) -> list[str]:
    model = tiny_model_dir("llama", tmp_path / "model")
    rng = random.Random(0)
    (tmp_path / "calib.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(6000)))
    (tmp_path / "eval.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(3000)))
    refine = ["--refine-steps", "32", "--refine-lr", "0.01"] if "--refine" in recipe else []
    return ["--model", str(model), "--ratio", "0.8", *recipe, *refine, "--calib-data", str(tmp_path / "calib.txt"),
            "--calib-samples", "16", "--calib-seqlen", "64", "--eval-data", str(tmp_path / "eval.txt"),
            "--eval-tokens", "1024", "--eval-seqlen", "128"]


@pytest.mark.parametrize("recipe", [["--method", "svd-llm-v2", "--allocation", "uniform", "--refine", "block+e2e"],
                                    ["--method", "fwsvd", "--allocation", "global-fisher"]], ids=["refine", "gradients"])
def test_two_processes_give_the_perplexity_of_one(tmp_path, recipe):
    """Refinement (block and e2e, data-parallel), and the whole-model gradient statistics (FWSVD's Fisher, the
    global-fisher allocation's sensitivity), summed over the ranks."""
    args = tiny_run_args(tmp_path, recipe)
    one = cli([*args, "--out", str(tmp_path / "one")])
    two = cli([*args, "--out", str(tmp_path / "two")], processes=2)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("one", "two"))
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert b["perplexity"]["dense"] == pytest.approx(a["perplexity"]["dense"], rel=1e-4)  # the same windows, split
    assert b["perplexity"]["compressed"] == pytest.approx(a["perplexity"]["compressed"], rel=0.02)
    assert b["layers"].keys() == a["layers"].keys()
    assert sum(e["rank"] for e in b["layers"].values()) == pytest.approx(sum(e["rank"] for e in a["layers"].values()),
                                                                          rel=0.02)
    if "--refine" in recipe:
        assert all(b["layers"][k]["rank"] == a["layers"][k]["rank"] for k in a["layers"])  # uniform ranks
        e2e = b["method_details"]["refine_e2e"]
        assert e2e["world_size"] == 2 and e2e["steps_run"] > 0 and e2e["parallel"] == "ddp"  # auto: it fits
        assert e2e["sequences"] == a["method_details"]["refine_e2e"]["sequences"] == 16  # all ranks' together
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "eval.txt", "model", "one", "two"]
    assert two.stdout.count("wrote ") == 1  # rank 0 alone reports


def test_sharded_e2e_refines_as_data_parallel_does(tmp_path):
    """--e2e-parallel fsdp (each decoder layer sharded over the 2 ranks, FSDP2) and fsdp-offload (the shards,
    gradients and Adam's moments in host memory: CPUOffloadPolicy; on this CPU host and device are one memory,
    so this checks its code path, not a transfer; in one process too, over a group of one) take the steps DDP
    takes: the same losses, the same written factors (up to the order of the sums), gathered back whole into
    the artifact; and all within 2 % of one process's perplexity."""
    from safetensors.torch import load_file
    args = tiny_run_args(tmp_path, ["--method", "svd-llm-v2", "--allocation", "uniform", "--refine", "e2e"])
    runs = {"one": cli([*args, "--out", str(tmp_path / "one")]),  # and offloaded in one process (a group of one)
            "one-offload": cli([*args, "--e2e-parallel", "fsdp-offload", "--out", str(tmp_path / "one-offload")])}
    sharded = ("fsdp", "fsdp-offload")
    for parallel in ("ddp", *sharded):
        runs[parallel] = cli([*args, "--e2e-parallel", parallel, "--out", str(tmp_path / parallel)], processes=2)
    for name, done in runs.items():
        assert done.returncode == 0, (name, done.stderr[-2000:])
    report = {name: json.loads((tmp_path / name / "report.json").read_text()) for name in runs}
    e2e = {name: report[name]["method_details"]["refine_e2e"] for name in runs}
    assert (e2e["one"]["parallel"], e2e["one-offload"]["parallel"]) == ("none", "fsdp-offload")
    assert e2e["one-offload"]["world_size"] == 1 and e2e["one-offload"]["steps_run"] == e2e["one"]["steps_run"]
    for key in ("loss_after", "holdout_after"):  # one process sharded over a group of one: the same steps
        assert e2e["one-offload"][key] == pytest.approx(e2e["one"][key], rel=1e-4)
    assert report["one-offload"]["perplexity"]["compressed"] == pytest.approx(
        report["one"]["perplexity"]["compressed"], rel=1e-4)
    written = {name: load_file(str(next((tmp_path / name).glob("*.safetensors")))) for name in ("ddp", *sharded)}
    factors = [k for k in written["ddp"] if k.endswith(("up.weight", "down.weight"))]
    assert factors
    for mode in sharded:
        assert e2e[mode]["parallel"] == mode and e2e[mode]["kept"] and e2e[mode]["steps_run"] > 0
        assert e2e[mode]["holdout_after"] < e2e[mode]["holdout_before"]
        for key in ("steps_run", "best_step"):
            assert e2e[mode][key] == e2e["ddp"][key]
        for key in ("loss_after", "holdout_after"):
            assert e2e[mode][key] == pytest.approx(e2e["ddp"][key], rel=1e-4)
        compressed = report[mode]["perplexity"]["compressed"]
        assert compressed == pytest.approx(report["ddp"]["perplexity"]["compressed"], rel=1e-4)
        assert compressed == pytest.approx(report["one"]["perplexity"]["compressed"], rel=0.02)
        assert written[mode].keys() == written["ddp"].keys()
        for k in factors:  # DDP refines the model's own layers: FSDP's shards made it whole into the artifact
            assert torch.allclose(written[mode][k], written["ddp"][k], rtol=1e-3, atol=1e-5), (mode, k)


def test_resume_is_one_process_only(tmp_path):
    model = tiny_model_dir("llama", tmp_path / "model")
    (tmp_path / "calib.txt").write_text(" ".join(WORDS * 200))
    done = cli(["--model", str(model), "--ratio", "0.4", "--method", "svd", "--allocation", "uniform",
                "--calib-data", str(tmp_path / "calib.txt"), "--calib-samples", "4", "--calib-seqlen", "64",
                "--eval-data", "none", "--resume", "--out", str(tmp_path / "out")], processes=2)
    assert done.returncode != 0 and "--resume continues a run of one process" in done.stderr
    assert not (tmp_path / "out").exists()
