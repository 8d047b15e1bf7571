"""The output folder: one writer per output name, and nothing half-written under it or beside it.

    .{name}.lock                    held (fcntl) by the run writing `name`; its PID inside, for the message
    .{name}.partial-pid{PID}-{rnd}  a fresh run's work, renamed to `name` at the end
    .{name}.partial-{resume_key}    a resumable run's work (reused by the next run with the same key)
    .{name}.dense-onnx-pid{PID}-…   other work folders (work_folder()), removed when the run ends

A second run on the same name fails at once (OutputBusy). The lock is taken by `hold()` for a whole CLI
run and by `atomic_output()` for its own duration; atomic_output inside hold() reuses the held lock.
Folders whose owner PID is gone (a SIGKILLed run) are removed by the next run on that name. A signal
handler that must exit at once calls `abandon()`: it removes this process's work folders and lock files.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import threading
import weakref
from pathlib import Path

PID_FOLDER = re.compile(r"(partial|dense-onnx|old)-pid(\d+)-[0-9a-f]+")


class OutputBusy(RuntimeError):
    pass


class OutputPathError(ValueError):
    pass


def check_out_path(out: str | Path) -> Path:
    """--out must name a folder of its own: not '.', '..', '/', nor an existing file. A symbolic link stands
    for the folder it points to: the output is written there (its work folders beside it) and the link is
    left as it was, still pointing to it."""
    raw = str(out)
    path = Path(out)
    if raw.strip() == "" or path.name in ("", ".", "..") or raw.rstrip("/").endswith(("/.", "/..")):
        raise OutputPathError(f"--out {raw!r} must name a new folder (e.g. {Path.cwd().name}-out), "
                              "not the current, parent or root folder")
    if path.is_symlink():
        path = path.resolve()
        if path.name in ("", ".", ".."):
            raise OutputPathError(f"--out {raw} is a link to {path}, not to a folder of its own")
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"--out {raw}: exists and is a file, not a folder")
    return path


def umask() -> int:
    """The process umask, read without changing it (os.umask would race with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def follow_umask(folder: Path) -> None:
    """Folders 0777 and files 0666 less the umask, whatever created them (mkdtemp/mkstemp give 0700/0600)."""
    mask = umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Registry:
    """What this process has created beside output names, so that a signal handler can remove it."""

    def __init__(self):
        self.mutex = threading.Lock()  # held by the final rename and by abandon(): never both
        self.locks: dict[Path, OutputLock] = {}
        self.folders: dict[Path, bool] = {}  # folder -> keep it when abandoned
        self.parents: list[Path] = []  # folders created above --out, removed (if empty) when abandoned


_registry = _Registry()


class OutputLock:
    """An exclusive fcntl lock on `.{name}.lock` beside `out`. The kernel drops it when its process dies,
    so a lock file left by a killed run is simply taken over."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out.parent / f".{out.name}.lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot write beside --out {self.out} ({exc.strerror})",
                              str(self.path)) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OutputBusy(f"another svd-export run (pid {owner}) is writing {self.out}; "
                                 "wait for it to finish or choose another --out") from None
            # The file may have been unlinked by its previous owner between our open and our flock: then we
            # locked a file nobody else can see. Retry on the one at the path.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # unlink before unlocking: a waiting opener retries on a fresh file
        os.close(self.fd)
        self.fd = None


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (deepest last)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            pass
    return list(reversed(missing))


def _remove_parents(created: list[Path]) -> None:
    for d in reversed(created):
        with contextlib.suppress(OSError):
            d.rmdir()  # only when empty


@contextlib.contextmanager
def hold(out: str | Path):
    """Hold the output name's lock for the whole block (a CLI run); atomic_output inside reuses it."""
    out = check_out_path(out)
    key = out.resolve()
    if key in _registry.locks:
        yield _registry.locks[key]
        return
    created = _make_parents(out.parent)
    _registry.parents.extend(created)
    lock = OutputLock(out)
    try:
        lock.acquire()
    except BaseException:
        _remove_parents(created)
        raise
    _registry.locks[key] = lock
    try:
        remove_stale(out)
        yield lock
    finally:
        prefix = f".{out.name}."
        for folder, keep in list(_registry.folders.items()):  # work folders an error path did not reach
            if not keep and folder.parent == out.parent and folder.name.startswith(prefix):
                _discard(folder)
        _registry.locks.pop(key, None)
        lock.release()
        if not out.exists():
            _remove_parents(created)
        for d in created:
            with contextlib.suppress(ValueError):
                _registry.parents.remove(d)


def remove_stale(out: Path, resume_key: str | None = None, resume_folders: bool = False) -> list[Path]:
    """Under the lock: remove work folders of `out` whose owner PID is gone. With resume_folders, also the
    resumable partial folders (they are only used under the lock, so their owner is gone) except
    resume_key's. A stale `.old-*` (killed mid-rename) is renamed back when `out` is missing."""
    prefix = f".{out.name}."
    removed = []
    for path in out.parent.iterdir():
        if not path.name.startswith(prefix) or path.name == f"{prefix}lock":
            continue
        rest = path.name[len(prefix):]
        match = PID_FOLDER.fullmatch(rest)
        if match:
            if pid_alive(int(match.group(2))):
                continue
            if match.group(1) == "old" and not out.exists():
                path.rename(out)
                continue
        elif not (resume_folders and rest.startswith("partial-") and rest != f"partial-{resume_key}"):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def resume_folder(out: Path, resume_key: str) -> Path:
    """The partial folder of a resumable run (atomic_output with that resume_key)."""
    return out.parent / f".{out.name}.partial-{resume_key}"


def _new_sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-pid{os.getpid()}-{secrets.token_hex(4)}"


def _mkdir(path: Path, exist_ok: bool = False) -> None:
    try:
        path.mkdir(mode=0o777, exist_ok=exist_ok)  # 0777 less the umask, unlike mkdtemp's 0700
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create a folder beside --out ({exc.strerror})", str(path)) from exc


class WorkFolder:
    """A scratch folder beside `out` (e.g. the dense ONNX graph), removed by cleanup(), when the object is
    collected, when the hold() on `out` ends, or by abandon()."""

    def __init__(self, out: str | Path, kind: str):
        out = Path(out)
        _make_parents(out.parent)
        self.path = _new_sibling(out, kind)
        _mkdir(self.path)
        _registry.folders[self.path] = False
        self.name = str(self.path)
        self._finalizer = weakref.finalize(self, _discard, self.path)

    def cleanup(self) -> None:
        self._finalizer()


def empty_folder(folder: Path) -> None:
    """Remove everything inside `folder`, not the folder itself."""
    for entry in list(folder.iterdir()):
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


class ResumableWorkFolder:
    """A scratch folder inside a --resume run's partial folder (e.g. the dense ONNX graph): kept when the run
    is killed, so that the next run can reuse what it holds; cleanup() removes it before the partial folder
    becomes the output."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(exist_ok=True)
        self.name = str(self.path)

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    _registry.folders.pop(path, None)


def _replace(out: Path, tmp: Path, overwrite: bool) -> None:
    """Rename `tmp` to `out`; an existing `out` is moved aside first and put back if the rename fails."""
    with _registry.mutex:
        old = None
        if out.exists():
            if any(out.iterdir()) and not overwrite:
                raise FileExistsError(f"output folder {out} exists and is not empty (use --overwrite)")
            old = _new_sibling(out, "old")
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if old is not None:
                os.rename(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_output(out: str | Path, overwrite: bool = False, resume_key: str | None = None,
                  keep_on_interrupt: bool = False):
    """Yield a partial folder beside `out`; on success it replaces `out` (its files following the umask),
    on any failure it is removed, unless keep_on_interrupt (a --resume run keeps its checkpoint for the
    next run). With a resume_key the partial folder is `.{name}.partial-{resume_key}`, reused if present.
    The whole block runs under the output name's lock."""
    out = check_out_path(out)
    if resume_key is not None and (not re.fullmatch(r"[A-Za-z0-9_]+", resume_key) or resume_key.startswith("pid")):
        raise ValueError(f"resume_key must be alphanumeric and not start with 'pid', got {resume_key!r}")
    with hold(out):
        remove_stale(out, resume_key, resume_folders=True)
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"output folder {out} exists and is not empty (use --overwrite)")
        tmp = resume_folder(out, resume_key) if resume_key else _new_sibling(out, "partial")
        _mkdir(tmp, exist_ok=resume_key is not None)
        _registry.folders[tmp] = keep_on_interrupt
        try:
            yield tmp
            follow_umask(tmp)
            _replace(out, tmp, overwrite)
        except BaseException:
            if not keep_on_interrupt:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            _registry.folders.pop(tmp, None)


def abandon(timeout: float = 5.0) -> list[Path]:
    """For a signal handler about to os._exit: remove this process's work folders (except those kept for
    --resume) and lock files. Waits for a final rename in progress to finish. Returns the kept folders."""
    _registry.mutex.acquire(timeout=timeout)  # never released: the process exits next
    kept = [p for p, keep in _registry.folders.items() if keep and p.exists()]
    for path, keep in list(_registry.folders.items()):
        if not keep:
            for _ in range(3):  # a worker thread may still be adding files while we remove them
                shutil.rmtree(path, ignore_errors=True)
                if not path.exists():
                    break
    for lock in list(_registry.locks.values()):
        lock.release()
    _remove_parents(_registry.parents)
    return kept
