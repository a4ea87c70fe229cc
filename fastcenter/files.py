"""Files that are never lost: atomic writes, and a run directory that belongs to one run at a time.

`atomic_write` replaces a file through a temp file in the same directory, fsync and rename: a crash leaves
the old file whole or the new one, never half of either. Token files, checkpoints, reports and plots all go
through it.

`RunDirectory` is what a training run owns (train.py's `--out-dir`):

    run.lock       held (an OS lock, fcntl.flock) for as long as the run lives: a second run into the same
                   directory is refused before it writes anything; the OS drops the lock when the process
                   dies, however it dies, so a killed run never blocks a later --resume
    config.json    the run's configuration
    metrics.jsonl  one JSON object per logged step, appended and flushed as they come
    ckpt.pt        the latest checkpoint (fastcenter.checkpoint)
    loss.png       the loss curves

A kill during `atomic_write` can leave a temp file behind (`<name>.<random>.tmp`); whoever holds the lock
removes them when it opens the directory, since no other writer can exist. A torn last line of metrics.jsonl
(a kill or a full disk mid-write) is dropped on resume, with a note: the checkpoint decides where the run is.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import BinaryIO, Callable

try:
    import fcntl
except ImportError:  # Windows: no advisory locks through fcntl; the run directory is then unguarded
    fcntl = None

TEMP_SUFFIX = ".tmp"


class RunDirectoryError(RuntimeError):
    """The run directory cannot be used (busy, or not a directory); the message says what to do."""


def atomic_write(path, write: Callable[[BinaryIO], object]) -> None:
    """Create or replace the file `path` through `write(f)` on a binary file object, atomically.

    The bytes go to a temp file beside `path`, are fsynced and renamed over it, and the rename is made durable.
    If anything fails (a full disk included), the temp file is removed and the old file is untouched.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
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

    `open()` creates the directory if needed, takes the lock (or raises RunDirectoryError naming the holder)
    and removes stale temp files. Nothing else is written by opening.
    """

    LOCK = "run.lock"

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.rows: list[dict] = []
        self._lock_fd: int | None = None
        self._metrics_file = None

    @property
    def checkpoint(self) -> pathlib.Path:
        return self.path / "ckpt.pt"

    @property
    def metrics(self) -> pathlib.Path:
        return self.path / "metrics.jsonl"

    def open(self) -> "RunDirectory":
        if self.path.exists() and not self.path.is_dir():
            raise RunDirectoryError(f"--out-dir {self.path} is a file, not a directory: choose another --out-dir")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / self.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirectoryError(f"cannot create the run directory {self.path}: {e.strerror or e}") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise RunDirectoryError(
                    f"{self.path} is in use by a running training run ({holder}); wait for it to finish, stop "
                    f"it, or choose another --out-dir"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename if hasattr(os, 'uname') else 'this host'}\n".encode())
        self._lock_fd = fd
        for stale in self.path.glob("*" + TEMP_SUFFIX):  # left by a run killed mid-write; nobody else writes here
            stale.unlink(missing_ok=True)
        return self

    def close(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock; the file stays (removing it would race)
            self._lock_fd = None

    def __enter__(self) -> "RunDirectory":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def write_config(self, config: dict) -> None:
        atomic_write_text(self.path / "config.json", json.dumps(config, indent=1) + "\n")

    def metrics_until(self, step: int) -> tuple[list[dict], int]:
        """The logged rows up to `step` (a resumed run drops the lost tail) and how many torn lines were dropped."""
        if not self.metrics.exists():
            return [], 0
        rows, dropped = read_jsonl(self.metrics)
        return [r for r in rows if isinstance(r.get("step"), int) and r["step"] <= step], dropped

    def start_metrics(self, rows: list[dict]) -> None:
        """Rewrite metrics.jsonl to hold `rows` (a resumed run's kept rows, or none), then append from here."""
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))
        self.rows = list(rows)
        self._metrics_file = open(self.metrics, "a")

    def log(self, row: dict) -> None:
        """Append one metrics row, flushed at once (a reader sees every finished line)."""
        self.rows.append(row)
        self._metrics_file.write(json.dumps(row) + "\n")
        self._metrics_file.flush()

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
        atomic_write(self.path / "loss.png", lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)
        return None
