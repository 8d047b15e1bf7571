"""Faults during and around a run, in process: the output lock, stale folders of killed runs, a full disk,
a failing final rename, an error mid-run, the umask, and corrupted reloads of a compressed folder."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bad_inputs_helpers import FAST, assert_one_error, cli, save_tiny, snapshot

from exporter.load.integrity import CorruptInput
from exporter.output import folder as output_dir


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("model") / "llama")


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, llama):
    """One finished run, copied by the reload tests before they corrupt it."""
    out = tmp_path_factory.mktemp("done") / "out"
    code, output = cli(["-m", llama, *FAST, "-o", out])
    assert code == 0, output
    return out


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def hold_lock_in_another_process(out: Path) -> subprocess.Popen:
    """A process holding the output lock (as a concurrent run would), until its stdin closes."""
    code = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('held', flush=True); "
            "sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out.parent / f".{out.name}.lock")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


# --- one output, one writer ----------------------------------------------------------------------------

@pytest.mark.parametrize("target_state", ["missing", "empty", "full"])
def test_a_symlinked_out_is_written_through_and_leaves_nothing_beside(llama, tmp_path, target_state):
    """--out names a link: the output lands in the folder it points to (made when missing, replaced with
    --overwrite when full), the link stays as it was, and no work or old folder is left beside either."""
    target, link = tmp_path / "data" / "run7", tmp_path / "models" / "latest"
    link.parent.mkdir()
    target.parent.mkdir()
    if target_state != "missing":
        target.mkdir()
    if target_state == "full":
        (target / "stale.txt").write_text("from an earlier run")
    link.symlink_to(target, target_is_directory=True)
    code, output = cli(["-m", llama, *FAST, "-o", link, *(["--overwrite"] if target_state == "full" else [])])
    assert code == 0, output
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert (target / "report.json").is_file() and not (target / "stale.txt").exists()
    assert sorted(p.name for p in link.parent.iterdir()) == ["latest"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["run7"]



@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_a_second_run_on_a_locked_name_fails_at_once(llama, tmp_path, overwrite):
    out = tmp_path / "out"
    holder = hold_lock_in_another_process(out)
    try:
        before = snapshot(tmp_path)
        code, output = cli(["-m", llama, *FAST, "-o", out, *(["--overwrite"] if overwrite else [])])
        assert code == 1
        assert_one_error(output, f"another svd-export run (pid {holder.pid}) is writing {out}")
        assert snapshot(tmp_path) == before
    finally:
        holder.stdin.close()
        holder.wait()


def test_a_lock_left_by_a_dead_run_is_taken_over_and_removed(llama, tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.lock").write_text(f"{dead_pid()}\n")
    pid = dead_pid()
    (tmp_path / f".out.partial-pid{pid}-0badc0de").mkdir()
    (tmp_path / f".out.partial-pid{pid}-0badc0de" / "model.safetensors").write_bytes(b"half")
    (tmp_path / f".out.dense-onnx-pid{pid}-12345678").mkdir()
    code, output = cli(["-m", llama, *FAST, "-o", out])
    assert code == 0, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_folders_of_a_live_process_are_kept(tmp_path):
    out = tmp_path / "out"
    mine = tmp_path / f".out.dense-onnx-pid{os.getpid()}-abcdef01"
    mine.mkdir()
    with output_dir.hold(out):
        assert mine.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name]


def test_an_old_folder_of_a_run_killed_mid_rename_is_restored(tmp_path):
    out = tmp_path / "out"
    old = tmp_path / f".out.old-pid{dead_pid()}-abcdef01"
    old.mkdir()
    (old / "report.json").write_text("{}")
    with output_dir.hold(out):
        pass
    assert (out / "report.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_resume_key_reuses_its_partial_folder_and_keeps_it_on_interrupt(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with output_dir.atomic_output(out, resume_key="abc123", keep_on_interrupt=True) as tmp:
            (tmp / "layer-0.pt").write_text("checkpoint")
            raise KeyboardInterrupt
    partial = tmp_path / ".out.partial-abc123"
    assert (partial / "layer-0.pt").exists() and not out.exists() and not (tmp_path / ".out.lock").exists()
    (tmp_path / ".out.partial-otherkey").mkdir()  # another configuration's checkpoint, owner gone
    with output_dir.atomic_output(out, resume_key="abc123", keep_on_interrupt=True) as tmp:
        assert tmp == partial and (tmp / "layer-0.pt").read_text() == "checkpoint"
        assert not (tmp_path / ".out.partial-otherkey").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "layer-0.pt").exists()


def test_without_resume_an_error_removes_the_partial_folder(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with output_dir.atomic_output(out) as tmp:
            (tmp / "x").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_parents_created_for_out_are_removed_on_failure(llama, tmp_path):
    code, output = cli(["-m", llama, *FAST, "-o", tmp_path / "a" / "b" / "out", "--ratio", "0"])
    assert code == 1 and list(tmp_path.iterdir()) == [], output


# --- offline -------------------------------------------------------------------------------------------

@pytest.fixture
def no_network(monkeypatch):
    """The hub endpoint is a closed local port: what a machine without network sees, deterministically."""
    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr("exporter.preflight._DETECTED", {"offline": False})
    monkeypatch.setattr("exporter.preflight.go_offline", lambda: None)  # keep this test process online-capable


def test_hub_id_without_network_is_one_line_without_retries(tmp_path, no_network):
    code, output = cli(["-m", "nobody-xyz/not-a-model-123", *FAST, "-o", tmp_path / "out"])
    assert code == 1
    assert_one_error(output, "is not in the local Hugging Face cache and the hub cannot be reached (no network)")
    assert output.strip().count("\n") == 0 and "Retry" not in output  # no retry storm, no duplicated warnings
    assert list(tmp_path.iterdir()) == []


def test_wikitext_without_network_is_one_line(llama, tmp_path, no_network, monkeypatch):
    import datasets

    def unreachable(*a, **k):
        raise ConnectionError("offline")
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    code, output = cli(["-m", llama, "--calib-data", "wikitext2", "--calib-seqlen", "64", "--eval-data", "none", "--allocation",
                        "uniform", "-q", "-o", tmp_path / "out"])
    assert code == 1
    assert_one_error(output, "could not load wikitext-2 (train) from the Hugging Face hub")
    assert list(tmp_path.iterdir()) == []


# --- failures mid-run and at the end -------------------------------------------------------------------

def test_simulated_full_disk_during_save(llama, tmp_path, monkeypatch):
    def full(self, index, layer, prefix):
        (self.folder / ".shard-layer-00000.safetensors.tmp").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", str(self.folder / ".shard-layer-00000.safetensors"))
    monkeypatch.setattr("exporter.output.shards.ShardWriter.write_layer", full)
    code, output = cli(["-m", llama, *FAST, "-o", tmp_path / "out"])
    assert code == 1
    assert_one_error(output, "no space left on the device of --out")
    assert list(tmp_path.iterdir()) == []


def test_real_full_disk_on_a_small_tmpfs(llama, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated ENOSPC case covers it")
    try:
        (mount / "keep.txt").write_text("mine")
        before = snapshot(mount)
        code, output = cli(["-m", llama, *FAST, "-o", mount / "out"])
        assert code == 1
        assert_one_error(output, "no space left on the device of --out")
        assert snapshot(mount) == before
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_read_only_output_folder(llama, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                             capture_output=True).returncode == 0
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("root ignores permissions and tmpfs cannot be mounted here")
        ro.chmod(0o555)
    try:
        code, output = cli(["-m", llama, *FAST, "-o", ro / "out"])
        assert code == 1
        assert_one_error(output, "cannot write beside --out")
        assert list(ro.iterdir()) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], check=True)
        ro.chmod(0o755)


def test_error_mid_run_leaves_nothing(llama, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("factorization exploded")
    monkeypatch.setattr("exporter.run.compress_source", broken)
    code, output = cli(["-m", llama, *FAST, "-o", tmp_path / "out"])
    assert code == 1
    assert_one_error(output, "factorization exploded")
    assert list(tmp_path.iterdir()) == []


def test_error_after_the_dense_onnx_export_leaves_nothing(llama, tmp_path, monkeypatch):
    """The dense-ONNX work folder exists from the start of the run: an error later must remove it too."""
    def export_dense(self, model, tokenizer, source=None):
        (Path(self.work.name) / "model.onnx").write_bytes(b"dense graph")

    def broken(*a, **k):
        raise RuntimeError("factorization exploded")
    monkeypatch.setattr("exporter.onnx.stage.OnnxStage.export_dense", export_dense)
    monkeypatch.setattr("exporter.run.compress_source", broken)
    code, output = cli(["-m", llama, *FAST, "--format", "onnx", "-o", tmp_path / "out"])
    assert code == 1
    assert_one_error(output, "factorization exploded")
    assert list(tmp_path.iterdir()) == []


def test_failing_final_rename_restores_the_previous_output(llama, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old-result.txt").write_text("previous run")
    before = snapshot(tmp_path)
    real_rename = os.rename

    def rename(src, dst):
        if ".partial-" in str(src):
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        return real_rename(src, dst)
    monkeypatch.setattr(output_dir.os, "rename", rename)
    code, output = cli(["-m", llama, *FAST, "-o", out, "--overwrite"])
    assert code == 1
    assert_one_error(output, "Invalid cross-device link")
    assert snapshot(tmp_path) == before


def test_debug_shows_the_traceback(llama, tmp_path):
    code, output = cli(["-m", llama, *FAST, "-o", tmp_path / "out", "--ratio", "0", "--debug"])
    assert code == 1 and "Traceback" in output and "svd-export: error: --ratio 0 removes nothing" in output


@pytest.mark.parametrize("mask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)],
                         ids=["umask-022", "umask-027"])
def test_the_output_follows_the_umask(llama, tmp_path, mask, dir_mode, file_mode):
    old = os.umask(mask)
    try:
        code, output = cli(["-m", llama, *FAST, "-o", tmp_path / "out"])
    finally:
        os.umask(old)
    assert code == 0, output
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == dir_mode
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {file_mode}


def test_overwrite_replaces_and_leaves_nothing_beside(llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    code, output = cli(["-m", llama, *FAST, "-o", out, "--overwrite"])
    assert code == 0, output
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- verified reload -----------------------------------------------------------------------------------

def copy_of(compressed: Path, tmp_path: Path) -> Path:
    import shutil
    return Path(shutil.copytree(compressed, tmp_path / "copy"))


def test_checksums_are_recorded_and_a_clean_folder_loads(compressed):
    from exporter import load_compressed
    sums = json.loads((compressed / "config.json").read_text())["svd_export"]["checksums"]
    assert set(sums) == {"model.safetensors"} and len(sums["model.safetensors"]["sha256"]) == 64
    assert load_compressed(compressed) is not None


def test_reload_refuses_a_truncated_shard(compressed, tmp_path):
    from exporter import load_compressed
    folder = copy_of(compressed, tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptInput, match="model.safetensors: .* the file is truncated or was replaced"):
        load_compressed(folder)


def test_reload_refuses_a_bit_flip(compressed, tmp_path):
    from exporter import load_compressed
    folder = copy_of(compressed, tmp_path)
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # a mantissa bit: the weights stay finite, only the checksum can tell
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptInput, match="sha256 differs from the one recorded at save"):
        load_compressed(folder)


def test_reload_refuses_a_missing_shard(compressed, tmp_path):
    from exporter import load_compressed
    folder = copy_of(compressed, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CorruptInput, match="model.safetensors: file not found"):
        load_compressed(folder)


def test_reload_without_checksums_still_refuses_truncation_and_nan(compressed, tmp_path):
    """A folder written before checksums existed: the header/size check and the finite check remain."""
    from safetensors.torch import load_file, save_file

    from exporter import load_compressed
    folder = copy_of(compressed, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["svd_export"]["checksums"]
    (folder / "config.json").write_text(json.dumps(config))
    path = folder / "model.safetensors"
    state = load_file(path)
    name = sorted(n for n in state if n.endswith("down.weight"))[0]
    state[name][0, 0] = float("nan")
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(CorruptInput, match=f"tensor {name} has 1 non-finite"):
        load_compressed(folder)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptInput, match="model.safetensors: truncated"):
        load_compressed(folder)


def test_reload_refuses_a_folder_that_is_not_an_artifact(tmp_path, llama):
    from exporter import load_compressed
    with pytest.raises(ValueError, match="not an svd-export artifact"):
        load_compressed(llama)


def test_finite_check_names_the_tensor():
    from exporter.load.integrity import check_finite
    with pytest.raises(CorruptInput, match="w2 has 2 non-finite"):
        check_finite([("w1", torch.ones(3)), ("w2", torch.tensor([1.0, float("inf"), float("nan")]))], "x")


def test_cuda_device_without_cuda_is_refused_before_loading(llama, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, output = cli(["-m", llama, *FAST, "--device", "cuda", "-o", tmp_path / "out"])
    assert code == 1
    assert_one_error(output, "--device cuda: no CUDA device is available here")
    assert list(tmp_path.iterdir()) == []
