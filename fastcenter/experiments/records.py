"""A study directory's records: the run records under OUT/runs, whether they belong together, and the data they
name. Read by the runner (run.py) and by the report (report.py) alike.

The data a run trained on is named in its record twice: `data_identity`, the corpus identity that
`fastcenter.data.load_corpus` returns (each token file's count and digest, and the vocabulary), and
`data_digest`, one sha256 for comparing records. Records written before they held the identity name the data by
an older digest (sha256 of the token files' bytes, `legacy_data_digest`); a directory holding such records keeps
that digest for the runs it gains, so its old and new records compare equal.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from dataclasses import dataclass

import numpy as np

from .. import data
from .plan import RUN_FORMAT


class StudyError(ValueError):
    """The study cannot run as asked (the message says why)."""


def load_runs(out_dir: pathlib.Path) -> list[dict]:
    """Every run record under out_dir/runs (sorted by file name)."""
    runs = []
    for path in sorted((pathlib.Path(out_dir) / "runs").glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise StudyError(f"{path}: not valid JSON ({e}); delete it to rerun that run") from e
        if record.get("format") != RUN_FORMAT:
            raise StudyError(f"{path}: not a run record of {RUN_FORMAT}")
        runs.append(record)
    return runs


def check_compatible(records: list[dict], fields: dict, digest: str | None, out_dir: pathlib.Path) -> None:
    """Refuse to mix runs of different configurations or data in one study."""
    for r in records:
        changed = sorted(k for k in set(fields) | set(r["config"]) if fields.get(k) != r["config"].get(k))
        if changed:
            detail = ", ".join(f"{k}: {r['config'].get(k)!r} there, {fields.get(k)!r} now" for k in changed)
            raise StudyError(
                f"{out_dir}/runs holds runs of another configuration ({detail}); "
                "use another --out, or the same settings"
            )
        if digest is not None and r["data_digest"] != digest:
            raise StudyError(f"{out_dir}/runs holds runs trained on other data ({r['run_id']}); use another --out")


@dataclass
class Corpus:
    """A study's data: the validated token files, their identity (`fastcenter.data.Corpus.identity`) and the
    digest the run records name them by."""

    train: np.ndarray
    val: np.ndarray
    data_dir: str
    identity: dict
    digest: str


def load_corpus(data_dir, vocab_size: int, seq_len: int, *, legacy: bool = False) -> Corpus:
    """The study's data, validated by `fastcenter.data.load_corpus` (against meta.json, ids < vocab_size, one
    window of seq_len + 1 tokens at least). legacy: name it by `legacy_data_digest`, for a directory whose
    records do (see `uses_legacy_digest`)."""
    corpus = data.load_corpus(data_dir, vocab_size=vocab_size, seq_len=seq_len)
    digest = legacy_data_digest(corpus.path) if legacy else identity_digest(corpus.identity)
    return Corpus(corpus.train, corpus.val, str(corpus.path.resolve()), corpus.identity, digest)


def identity_digest(identity: dict) -> str:
    """sha256 of a corpus identity written as canonical JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def uses_legacy_digest(records: list[dict]) -> bool:
    """Whether a study directory names its data by `legacy_data_digest`: it holds a record without the identity."""
    return any("data_identity" not in r for r in records)


def legacy_data_digest(data_dir) -> str:
    """The data digest of run records written before they held the corpus identity: sha256 over the hex sha256
    of train.bin's bytes and of val.bin's (of a file over 256 MiB: of its size, first and last 16 MiB)."""

    def file_digest(path: pathlib.Path, limit: int = 1 << 28) -> str:
        h = hashlib.sha256()
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size <= limit:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            else:
                h.update(str(size).encode())
                h.update(f.read(1 << 24))
                f.seek(size - (1 << 24))
                h.update(f.read())
        return h.hexdigest()

    data_dir = pathlib.Path(data_dir)
    return hashlib.sha256(
        (file_digest(data_dir / "train.bin") + file_digest(data_dir / "val.bin")).encode()
    ).hexdigest()
