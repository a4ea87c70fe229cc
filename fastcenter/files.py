"""Files that are never lost: atomic writes, and a run directory that belongs to one run at a time.

`atomic_write` replaces a file through a temp file in the same directory, fsync and rename: a crash leaves
the old file whole or the new one, never half of either. Token files, checkpoints, reports and plots all go
through it.

`RunDirectory` is what a training run owns (train.py's `--out-dir`):

    run.lock       the holder's pid and host, for the message that refuses a second run
    config.json    the run's configuration
    metrics.jsonl  one JSON object per logged step, appended and flushed as they come
    ckpt.pt        the latest checkpoint (fastcenter.checkpoint)
    loss.png       the loss curves

The run holds two OS locks (fcntl.flock) for as long as it lives: one on the directory itself, which removing
run.lock cannot release, and one on run.lock, which NFS shares between hosts (it keeps flock on directories
local to one host). A second run into the directory is refused before it writes anything; the OS drops both
locks when the process dies, however it dies, so a killed run never blocks a later --resume. A file system
that cannot lock (an NFS mount without a lock service) is refused: the directory could not be guarded.

A kill during `atomic_write` can leave a temp file behind (`<name>.<random>.fastcenter-tmp`); whoever holds
the lock removes those of the files above when it opens the directory, and nothing else: the directory may be
shared with the user's files (`--out-dir .`). A torn last line of metrics.jsonl (a kill or a full disk
mid-write) is dropped on resume, with a note: the checkpoint decides where the run is.

Every failure to write (a full disk, a file-size limit) is a RunDirectoryError naming the file.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import pathlib
import re
import tempfile
from typing import BinaryIO, Callable

try:
    import fcntl
except ImportError:  # Windows: no advisory locks through fcntl; the run directory is then unguarded
    fcntl = None

TEMP_SUFFIX = ".fastcenter-tmp"


class RunDirectoryError(RuntimeError):
    """The run directory cannot be used (busy, not a directory, not writable); the message says what to do."""


def make_temp(path) -> tuple[int, str]:
    """(fd, name) of a new temp file beside `path`: `<name>.<random>.fastcenter-tmp`, what `atomic_write` writes."""
    path = pathlib.Path(path)
    return tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=TEMP_SUFFIX)


def is_temp_of(candidate: pathlib.Path, name: str) -> bool:
    """Whether `candidate` is a temp file `atomic_write` made for the file `name` (see `make_temp`)."""
    return re.fullmatch(re.escape(name) + r"\.[A-Za-z0-9_]+" + re.escape(TEMP_SUFFIX), candidate.name) is not None


def write_failure(path, error: OSError, what: str = "") -> str:
    """'could not write [what ]PATH: reason (what to do)' for an OSError met while writing `path`."""
    hint = {
        errno.ENOSPC: " (the disk is full: free some space)",
        errno.EDQUOT: " (the disk quota is exhausted: free some space)",
        errno.EFBIG: " (a file-size limit, ulimit -f, forbids it: raise the limit)",
    }.get(error.errno, "")
    return f"could not write {what}{path}: {error.strerror or error}{hint}"


class _Recording:
    """A binary file whose write errors are remembered: torch.save reports a failed write as a RuntimeError
    without its cause (a full disk, a file-size limit), so `atomic_write` raises the OSError it recorded."""

    def __init__(self, f: BinaryIO):
        self._f, self.error = f, None

    def write(self, b) -> int:
        try:
            return self._f.write(b)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def atomic_write(path, write: Callable[[BinaryIO], object]) -> None:
    """Create or replace the file `path` through `write(f)` on a binary file object, atomically.

    The bytes go to a temp file beside `path`, are fsynced and renamed over it, and the rename is made durable.
    If anything fails (a full disk included: raised as that OSError, whatever the writer made of it), the temp
    file is removed and the old file is untouched.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            recording = _Recording(f)
            try:
                write(recording)
            except Exception:
                if recording.error is not None:
                    raise recording.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; these are ordinary outputs
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: fsync the directory so the rename itself survives a crash
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def read_jsonl(path) -> tuple[list[dict], int]:
    """(rows, lines dropped) of a JSON-lines file: a line that does not parse (a torn write) is dropped."""
    rows, dropped = [], 0
    for line in pathlib.Path(path).read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            dropped += 1
    return rows, dropped


class RunDirectory:
    """A run directory held by this process until `close()` (see the module docstring).

    `open()` creates the directory if needed, takes the locks (or raises RunDirectoryError naming the holder)
    and removes the temp files a killed run left of its own files. Nothing else is written by opening.
    """

    LOCK = "run.lock"
    FILES = ("config.json", "metrics.jsonl", "ckpt.pt", "loss.png")  # what a run writes besides its lock

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.rows: list[dict] = []
        self._lock_fds: list[int] = []
        self._metrics_file = None

    @property
    def checkpoint(self) -> pathlib.Path:
        return self.path / "ckpt.pt"

    @property
    def metrics(self) -> pathlib.Path:
        return self.path / "metrics.jsonl"

    def check(self) -> None:
        """Refuse (RunDirectoryError) a path that is a file, or a run file that is not a file; reads only."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirectoryError(f"--out-dir {self.path} is a file, not a directory: choose another --out-dir")
        for name in (self.LOCK,) + self.FILES:
            path = self.path / name
            if (path.exists() or path.is_symlink()) and not path.is_file():
                raise RunDirectoryError(
                    f"{path} is not a file (a directory?), but a run writes its {name} there: move it away or "
                    f"choose another --out-dir"
                )

    def open(self) -> "RunDirectory":
        self.check()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirectoryError(f"cannot create the run directory {self.path}: {e.strerror or e}") from None
        if fcntl is not None:
            # The directory first: a refused run then creates nothing, not even run.lock.
            self._lock(os.O_RDONLY | getattr(os, "O_DIRECTORY", 0), self.path)
            self._lock(os.O_RDWR | os.O_CREAT, self.path / self.LOCK)
            lock_fd = self._lock_fds[-1]
        else:
            lock_fd = self._open(os.O_RDWR | os.O_CREAT, self.path / self.LOCK)
            self._lock_fds.append(lock_fd)
        host = os.uname().nodename if hasattr(os, "uname") else "this host"
        try:
            os.ftruncate(lock_fd, 0)
            os.write(lock_fd, f"pid {os.getpid()} on {host}\n".encode())
        except OSError as e:
            self.close()
            raise RunDirectoryError(write_failure(self.path / self.LOCK, e)) from None
        for name in self.FILES:  # temp files a run killed mid-write left; the holder is their only writer
            for stale in self.path.glob(glob.escape(name) + ".*" + TEMP_SUFFIX):
                if is_temp_of(stale, name):
                    stale.unlink(missing_ok=True)
        return self

    def _open(self, flags: int, path: pathlib.Path) -> int:
        try:
            return os.open(path, flags, 0o644)
        except OSError as e:
            self.close()
            raise RunDirectoryError(f"cannot open {path}: {e.strerror or e}") from None

    def _lock(self, flags: int, path: pathlib.Path) -> None:
        """Open `path` and take an exclusive flock on it, or raise RunDirectoryError (and release what is held)."""
        fd = self._open(flags, path)
        self._lock_fds.append(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self.close()
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirectoryError(
                    f"cannot lock {path}: {e.strerror or e}; without locks (an NFS mount with no lock service?) "
                    f"nothing keeps a second run out of {self.path}: choose an --out-dir on a file system that locks"
                ) from None
            try:
                holder = (self.path / self.LOCK).read_text(errors="replace").strip()
            except OSError:
                holder = ""
            raise RunDirectoryError(
                f"{self.path} is in use by a running training run ({holder or 'another process'}); wait for it to "
                f"finish, stop it, or choose another --out-dir"
            ) from None

    def close(self) -> None:
        if self._metrics_file is not None:
            try:
                self._metrics_file.close()
            except OSError:  # a write that failed was reported when it failed; the torn line is dropped on resume
                pass
            self._metrics_file = None
        for fd in reversed(self._lock_fds):
            os.close(fd)  # closing releases the flock; the file stays (removing it would race)
        self._lock_fds = []

    def __enter__(self) -> "RunDirectory":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _write_failure(self, path, error: OSError) -> RunDirectoryError:
        kept = f"the last checkpoint {self.checkpoint} is intact" if self.checkpoint.is_file() else "no checkpoint yet"
        return RunDirectoryError(f"{write_failure(path, error)}; {kept}")

    def write_config(self, config: dict) -> None:
        try:
            atomic_write_text(self.path / "config.json", json.dumps(config, indent=1) + "\n")
        except OSError as e:
            raise self._write_failure(self.path / "config.json", e) from None

    def metrics_until(self, step: int) -> tuple[list[dict], int]:
        """The logged rows up to `step` (a resumed run drops the lost tail) and how many torn lines were dropped."""
        if not self.metrics.exists():
            return [], 0
        try:
            rows, dropped = read_jsonl(self.metrics)
        except OSError as e:
            raise RunDirectoryError(f"cannot read {self.metrics}: {e.strerror or e}") from None
        return [r for r in rows if isinstance(r.get("step"), int) and r["step"] <= step], dropped

    def start_metrics(self, rows: list[dict]) -> None:
        """Rewrite metrics.jsonl to hold `rows` (a resumed run's kept rows, or none), then append from here."""
        try:
            atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))
            self._metrics_file = open(self.metrics, "a")
        except OSError as e:
            raise self._write_failure(self.metrics, e) from None
        self.rows = list(rows)

    def log(self, row: dict) -> None:
        """Append one metrics row, flushed at once (a reader sees every finished line)."""
        self.rows.append(row)
        try:
            self._metrics_file.write(json.dumps(row) + "\n")
            self._metrics_file.flush()
        except OSError as e:
            raise self._write_failure(self.metrics, e) from None

    def plot(self) -> str | None:
        """loss.png from the rows so far; without matplotlib, returns a note instead."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return "matplotlib is not installed: loss.png skipped (pip install matplotlib)"
        train = [(r["step"], r["loss"]) for r in self.rows]
        val = [(r["step"], r["val_loss"]) for r in self.rows if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(*zip(*train), label="train", linewidth=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation (fixed windows)", markersize=3)
        ax.set(xlabel="step", ylabel="loss (nats / token)", title=str(self.path))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        try:
            atomic_write(self.path / "loss.png", lambda f: fig.savefig(f, format="png", dpi=110))
        except OSError as e:
            raise self._write_failure(self.path / "loss.png", e) from None
        finally:
            plt.close(fig)
        return None
