"""Token files, corpus preparation, the demo corpus, and the batch samplers used by train.py.

Token files
    nanoGPT's format: a raw array of little-endian uint16 token ids, no header (`train.bin`, `val.bin`).
    llm.c's format is detected and read too: a header of 256 int32 (magic 20240520, version, token count, then
    zeros) followed by the tokens (version 1: uint16, GPT-2; version 2: uint32, llm.c's LLaMA-3 files).
    Detection is unambiguous for GPT-2 vocabularies: the magic's first two bytes, read as a uint16 token,
    are 54216, which is not a GPT-2 id (< 50257), so a valid nanoGPT file never starts with it.
    Files are memory-mapped, never loaded whole; `check_tokens` scans them in chunks, so validating a
    multi-GB file costs a second of I/O and a few MB of memory.

Preparation
    `python -m fastcenter.data prepare --text FILES_OR_DIRS... --out DIR [--val-fraction 0.1]` encodes text with
    tiktoken's GPT-2 BPE (`r50k_base`), one file = one document, the end-of-text token 50256 after every
    document, and writes train.bin / val.bin / meta.json. The split is by document and deterministic (see
    `split_documents`).

Identity
    meta.json names the token files it describes: their token counts and digests (and, for a compacted
    vocabulary, the GPT-2 id of each token id). prepare writes it *first*, so an interrupted prepare leaves
    token files that do not match it -- refused on load -- never new token files beside an old mapping, nor
    compacted ids without their mapping. `load_corpus` checks a directory against its meta.json and returns
    its identity (the token files' digests and the mapping's), which checkpoints keep, so that --resume
    refuses another corpus. A directory without meta.json (nanoGPT's own files) holds GPT-2 ids.

Demo corpus
    With no data given, train.py trains on the Python standard library's own source (`ensure_demo_corpus`):
    about 15M tokens from the .py files of this interpreter's stdlib, no download, cached on disk.

Batches
    `WindowSampler` draws random windows of seq_len + 1 tokens from train.bin. The windows of optimizer step s
    are a pure function of (seed, s), so the sampler's whole state is the next step number: resuming from a
    checkpoint continues the stream exactly, and under DDP each rank takes its own micro-steps of the same
    global batch that a single process would draw. Validation uses `validation_positions`: evenly spaced,
    fixed windows over val.bin, the same in every run with the same shape, so losses compare across runs.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import pathlib
import sys
import sysconfig
import tempfile
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .files import atomic_write, atomic_write_text

__all__ = [
    "DataError",
    "ENCODING_NAME",
    "EOT_TOKEN",
    "GPT2_VOCAB_SIZE",
    "open_tokens",
    "check_tokens",
    "load_split",
    "load_corpus",
    "Corpus",
    "read_meta",
    "check_token_ids",
    "tokens_digest",
    "write_tokens",
    "get_encoding",
    "split_documents",
    "prepare",
    "token_ids",
    "ensure_demo_corpus",
    "WindowSampler",
    "validation_positions",
    "gather_windows",
    "to_inputs_targets",
]

ENCODING_NAME = "r50k_base"  # tiktoken's name for GPT-2's BPE
GPT2_VOCAB_SIZE = 50257
EOT_TOKEN = 50256  # <|endoftext|>, appended after every document

LLMC_MAGIC = 20240520
LLMC_HEADER_INTS = 256
LLMC_HEADER_BYTES = LLMC_HEADER_INTS * 4
LLMC_TOKEN_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}  # header version -> token dtype

# Validation scans this many tokens at a time (32 MB of uint16): bounded memory for files of any size.
SCAN_CHUNK_TOKENS = 1 << 24

SPLITS = ("train", "val")


class DataError(ValueError):
    """A token file or corpus that cannot be trained on; the message names the file and what is wrong."""


# ---------------------------------------------------------------------------------------------------------
# Reading and checking token files.
# ---------------------------------------------------------------------------------------------------------


def open_tokens(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a token file (nanoGPT raw uint16, or llm.c headered) as a 1-D read-only array.

    Raises DataError for a missing or empty file, an odd byte count, or an llm.c header that is truncated,
    has an unknown version, or disagrees with the file's length.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"{path}: token file not found")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: token file is empty")

    with open(path, "rb") as f:
        first = f.read(4)
    if len(first) == 4 and int.from_bytes(first, "little") == LLMC_MAGIC:
        return _open_llmc(path, size)

    if size % 2:
        raise DataError(
            f"{path}: odd byte count ({size} bytes) -- not a file of uint16 tokens "
            "(truncated, or written with another dtype?)"
        )
    return np.memmap(path, dtype="<u2", mode="r")


def _open_llmc(path: pathlib.Path, size: int) -> np.ndarray:
    if size < LLMC_HEADER_BYTES:
        raise DataError(
            f"{path}: starts with llm.c's magic {LLMC_MAGIC} but is {size} bytes, shorter than the "
            f"{LLMC_HEADER_BYTES}-byte header"
        )
    header = np.fromfile(path, dtype="<i4", count=LLMC_HEADER_INTS)
    version, count = int(header[1]), int(header[2])
    if version not in LLMC_TOKEN_DTYPES:
        raise DataError(
            f"{path}: llm.c header has version {version}; known versions are 1 (uint16 tokens) and 2 (uint32)"
        )
    dtype = LLMC_TOKEN_DTYPES[version]
    payload = size - LLMC_HEADER_BYTES
    if count < 0 or payload != count * dtype.itemsize:
        raise DataError(
            f"{path}: llm.c header says {count} tokens ({count * dtype.itemsize} bytes of {dtype.name}), "
            f"but the file holds {payload} bytes after the header (truncated or corrupt)"
        )
    if count == 0:
        raise DataError(f"{path}: llm.c file holds no tokens")
    return np.memmap(path, dtype=dtype, mode="r", offset=LLMC_HEADER_BYTES, shape=(count,))


def check_tokens(tokens: np.ndarray, path, *, vocab_size: int, min_tokens: int = 1) -> str:
    """Raise DataError if `tokens` is shorter than `min_tokens` or holds an id >= vocab_size; return the tokens'
    digest (see `tokens_digest`), computed in the same pass.

    The scan is vectorised, chunked and spread over threads (hashing and NumPy's max release the GIL): one
    max() per chunk, and the exact offender located only in a bad chunk.
    """
    if len(tokens) < min_tokens:
        raise DataError(
            f"{path}: {len(tokens)} tokens, too short for one training window of {min_tokens} tokens "
            f"(seq_len + 1); use a smaller --seq-len or more data"
        )

    def scan(start: int) -> tuple[int, bytes]:
        chunk = np.ascontiguousarray(tokens[start : start + SCAN_CHUNK_TOKENS])
        return int(chunk.max()), hashlib.sha256(chunk).digest()

    starts = range(0, len(tokens), SCAN_CHUNK_TOKENS)
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(starts)))) as pool:
        results = list(pool.map(scan, starts))
    for start, (top, _) in zip(starts, results):
        if top >= vocab_size:
            chunk = np.asarray(tokens[start : start + SCAN_CHUNK_TOKENS])
            bad = np.flatnonzero(chunk >= vocab_size)
            raise DataError(
                f"{path}: token id {int(chunk[bad[0]])} at position {start + int(bad[0])} is >= vocab_size "
                f"{vocab_size} ({len(bad)} such ids in tokens {start}..{start + len(chunk) - 1} alone); "
                "was the file made with another tokenizer, or is it corrupt?"
            )
    return _combine([digest for _, digest in results])


def tokens_digest(tokens: np.ndarray) -> str:
    """The identity of a token array: sha256 over the sha256 of each SCAN_CHUNK_TOKENS-token chunk of its
    little-endian bytes (chunks, so that large files hash in parallel)."""
    starts = range(0, len(tokens), SCAN_CHUNK_TOKENS)
    return _combine([hashlib.sha256(np.ascontiguousarray(tokens[s : s + SCAN_CHUNK_TOKENS])).digest() for s in starts])


def _combine(chunk_digests: list[bytes]) -> str:
    return hashlib.sha256(b"".join(chunk_digests)).hexdigest()


def read_meta(data_dir) -> dict | None:
    """The meta.json of a data directory, checked field by field (DataError naming the field), or None if absent.

    Its "token_ids" come back as an int64 array.
    """
    path = pathlib.Path(data_dir) / "meta.json"
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_file():
        raise DataError(f"{path} is not a file: a data directory's meta.json describes its token files")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); run prepare again") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read: {e.strerror or e}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: not a JSON object; run prepare again")

    def expect(name: str, ok: bool, what: str) -> None:
        if meta.get(name) is not None and not ok:
            raise DataError(f"{path}: {name} must be {what}, got {meta[name]!r}")

    for split in SPLITS:
        count, digest = meta.get(f"{split}_tokens"), meta.get(f"{split}_sha256")
        expect(f"{split}_tokens", _is_int(count) and count >= 0, "a token count (an int >= 0)")
        expect(f"{split}_sha256", isinstance(digest, str) and len(digest) == 64, "a sha256 digest (64 hex digits)")
    vocab_size = meta.get("vocab_size")
    expect("vocab_size", _is_int(vocab_size) and vocab_size >= 1, "an int >= 1")
    if "token_ids" in meta and meta["token_ids"] is not None:
        meta["token_ids"] = check_token_ids(meta["token_ids"], path)
        if vocab_size is not None and vocab_size != len(meta["token_ids"]):
            raise DataError(f"{path}: vocab_size {vocab_size} disagrees with its {len(meta['token_ids'])} token_ids")
    return meta


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_token_ids(ids, where) -> np.ndarray:
    """A compacted vocabulary's mapping (the GPT-2 id of each token id) as int64, or DataError: it must be a
    non-empty list of distinct ints in [0, GPT2_VOCAB_SIZE) -- a float or a string is never truncated."""
    if not isinstance(ids, (list, tuple)) or not ids:
        raise DataError(f"{where}: token_ids must be a non-empty list of GPT-2 token ids, got {ids!r:.40}")
    for i, x in enumerate(ids):
        if not _is_int(x) or not 0 <= x < GPT2_VOCAB_SIZE:
            raise DataError(
                f"{where}: token_ids[{i}] = {x!r:.40} is not a GPT-2 token id (an int in [0, {GPT2_VOCAB_SIZE}))"
            )
    array = np.asarray(ids, dtype=np.int64)
    if len(np.unique(array)) != len(array):
        raise DataError(f"{where}: token_ids repeats an id, so the mapping cannot be inverted")
    return array


def _load_split(data_dir, split: str, meta: dict | None, *, vocab_size: int, seq_len: int):
    """(tokens, digest) of `<data_dir>/<split>.bin`, checked against meta.json's count and digest."""
    path = pathlib.Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise DataError(f"{path}: not found (a data directory holds train.bin and val.bin)")
    tokens = open_tokens(path)
    count, digest = (meta or {}).get(f"{split}_tokens"), (meta or {}).get(f"{split}_sha256")
    if count is not None and count != len(tokens):
        raise _mismatch(path, f"{count:,} tokens", f"{len(tokens):,}")
    found = check_tokens(tokens, path, vocab_size=vocab_size, min_tokens=seq_len + 1)
    if digest is not None and digest != found:
        raise _mismatch(path, f"sha256 {digest[:12]}", found[:12])
    return tokens, found


def _mismatch(path: pathlib.Path, described: str, found: str) -> DataError:
    return DataError(
        f"{path} does not match {path.parent / 'meta.json'} ({described}; the file: {found}): an interrupted "
        "or concurrent prepare, or files copied from elsewhere? Run prepare again"
    )


def load_split(data_dir, split: str, *, vocab_size: int, seq_len: int) -> np.ndarray:
    """Open and validate `<data_dir>/<split>.bin` for windows of seq_len + 1 tokens (and against meta.json)."""
    return _load_split(data_dir, split, read_meta(data_dir), vocab_size=vocab_size, seq_len=seq_len)[0]


@dataclass
class Corpus:
    """A validated data directory: its token files, its mapping (compacted vocabulary) and its identity."""

    path: pathlib.Path
    train: np.ndarray
    val: np.ndarray
    token_ids: np.ndarray | None  # the GPT-2 id of each token id, or None (GPT-2 ids)
    identity: dict  # {"train.bin": {"tokens", "sha256"}, "val.bin": {...}, "vocabulary": "gpt2" or a sha256}

    @property
    def vocab_size(self) -> int:
        """The vocabulary the corpus is written in: its compacted size, or GPT-2's."""
        return GPT2_VOCAB_SIZE if self.token_ids is None else len(self.token_ids)

    def differences(self, saved: dict) -> list[str]:
        """How this corpus differs from the identity `saved` (a checkpoint's), in words; [] if it is the same."""
        out = []
        for name in (f"{split}.bin" for split in SPLITS):
            mine, theirs = self.identity[name], saved.get(name)
            if mine != theirs:
                theirs = theirs if isinstance(theirs, dict) else {}
                out.append(
                    f"{name} holds {mine['tokens']:,} tokens (sha256 {mine['sha256'][:12]}), the run's "
                    f"{theirs.get('tokens', '?')} (sha256 {str(theirs.get('sha256', '?'))[:12]})"
                )
        if self.identity["vocabulary"] != saved.get("vocabulary"):
            out.append("the vocabulary (meta.json's token_ids) differs")
        return out


def load_corpus(data_dir, *, vocab_size: int | None, seq_len: int) -> Corpus:
    """Open and validate a data directory (token files against meta.json, ids < vocab_size, at least one window
    of seq_len + 1 tokens each); vocab_size None: the corpus's own (`Corpus.vocab_size`)."""
    meta = read_meta(data_dir)
    ids = None if meta is None else meta.get("token_ids")
    if vocab_size is None:
        vocab_size = GPT2_VOCAB_SIZE if ids is None else len(ids)
    splits, identity = {}, {}
    for split in SPLITS:
        splits[split], digest = _load_split(data_dir, split, meta, vocab_size=vocab_size, seq_len=seq_len)
        identity[f"{split}.bin"] = {"tokens": len(splits[split]), "sha256": digest}
    identity["vocabulary"] = "gpt2" if ids is None else hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest()
    return Corpus(pathlib.Path(data_dir), splits["train"], splits["val"], ids, identity)


def write_tokens(path, ids, *, fmt: str = "nanogpt") -> None:
    """Write token ids as a nanoGPT file (raw uint16) or an llm.c file (header + uint16), atomically."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.uint16).max):
        raise ValueError("ids must fit in uint16 for these formats")
    if fmt not in ("nanogpt", "llmc"):
        raise ValueError(f"fmt must be 'nanogpt' or 'llmc', got {fmt!r}")
    parts = []
    if fmt == "llmc":
        header = np.zeros(LLMC_HEADER_INTS, dtype="<i4")
        header[:3] = (LLMC_MAGIC, 1, ids.size)
        parts.append(header.tobytes())
    parts.append(ids.astype("<u2").tobytes())
    atomic_write(path, lambda f: f.write(b"".join(parts)))


# ---------------------------------------------------------------------------------------------------------
# Tokenizing text into train.bin / val.bin.
# ---------------------------------------------------------------------------------------------------------


# Where tiktoken downloads r50k_base from (tiktoken_ext/openai_public.py), and how long to wait for that host.
ENCODING_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
NETWORK_TIMEOUT_S = 5.0
OFFLINE_HINT = "offline machines point TIKTOKEN_CACHE_DIR at a directory holding it (copied from tiktoken's cache)"


def encoding_cache_file() -> pathlib.Path | None:
    """The file tiktoken keeps r50k_base in once downloaded (tiktoken/load.py: sha1 of the URL in
    TIKTOKEN_CACHE_DIR, else DATA_GYM_CACHE_DIR, else the temp folder's data-gym-cache); None when caching is
    off (TIKTOKEN_CACHE_DIR="")."""
    for name in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if name in os.environ:
            directory = os.environ[name]
            break
    else:
        directory = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if directory == "":
        return None
    return pathlib.Path(directory) / hashlib.sha1(ENCODING_URL.encode()).hexdigest()


def _unreachable(url: str) -> str | None:
    """Why `url`'s host does not answer within NETWORK_TIMEOUT_S (through the environment's proxy settings, as a
    download would go), or None when it answers (any HTTP status will do)."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=NETWORK_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as e:  # URLError, a timeout, a refused or unroutable connection, a bad proxy
        reason = getattr(e, "reason", None) or e
        return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
    return None


def get_encoding():
    """tiktoken's GPT-2 BPE, or a one-line DataError when it is neither cached nor downloadable.

    tiktoken downloads a missing encoding with no timeout, so on a machine whose network drops packets it would
    wait forever: when the cache lacks the file, the download host is asked first, for NETWORK_TIMEOUT_S."""
    import tiktoken

    cached = encoding_cache_file()
    if cached is None or not cached.is_file():
        problem = _unreachable(ENCODING_URL)
        if problem is not None:
            where = "caching is off (TIKTOKEN_CACHE_DIR is empty)" if cached is None else f"{cached} does not exist"
            raise DataError(
                f"tiktoken's {ENCODING_NAME!r} encoding (GPT-2's BPE) is not cached ({where}) and its download host "
                f"cannot be reached ({problem}): {OFFLINE_HINT}"
            )
    try:
        return tiktoken.get_encoding(ENCODING_NAME)
    except Exception as e:  # network errors surface as various exception types
        raise DataError(
            f"cannot load tiktoken's {ENCODING_NAME!r} encoding ({type(e).__name__}: {e}); {OFFLINE_HINT}"
        ) from e


def _find_documents(sources: Sequence, pattern: str, skip_dirs: Sequence[str] = ()) -> list[tuple[pathlib.Path, str]]:
    """(path, name) of every document: files as given, directories walked recursively for file names matching
    `pattern`, in sorted order. Hidden files and directories, and directories named in `skip_dirs`, are skipped;
    a file reached twice counts once.

    A document's name is its path relative to the directory it was found in (its base name if it was given
    as a file): the names, not where the corpus happens to live, decide the train/val split.
    """
    found: dict[pathlib.Path, str] = {}
    for source in sources:
        source = pathlib.Path(source)
        if source.is_file():
            found.setdefault(source.resolve(), source.name)
        elif source.is_dir():
            for dirpath, dirnames, filenames in os.walk(source):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip_dirs)
                for name in sorted(filenames):
                    if not name.startswith(".") and fnmatch.fnmatch(name, pattern):
                        path = pathlib.Path(dirpath) / name
                        found.setdefault(path.resolve(), path.relative_to(source).as_posix())
        else:
            raise DataError(f"{source}: no such file or directory")
    if not found:
        raise DataError(f"no documents matching {pattern!r} found in {', '.join(map(str, sources))}")
    return list(found.items())


def _read_texts(paths: Sequence[pathlib.Path]) -> tuple[list[str], list[pathlib.Path]]:
    """Decode every file as UTF-8; undecodable bytes become U+FFFD (the files are returned to warn about)."""
    texts, lossy = [], []
    for p in paths:
        raw = p.read_bytes()
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(raw.decode("utf-8", errors="replace"))
            lossy.append(p)
    return texts, lossy


def _encode_documents(texts: Sequence[str]) -> list[np.ndarray]:
    """Each text as uint16 ids followed by EOT. tiktoken releases the GIL, so a thread pool scales."""
    encoding = get_encoding()
    threads = max(1, min(8, os.cpu_count() or 1))
    ids = encoding.encode_ordinary_batch(list(texts), num_threads=threads)
    return [np.array(doc + [EOT_TOKEN], dtype=np.uint16) for doc in ids]


def split_documents(names: Sequence[str], lengths: Sequence[int], val_fraction: float) -> list[bool]:
    """Which documents go to validation: deterministic, and independent of the order they were given in.

    Documents are ranked by a hash of their name (a fixed pseudo-random order, so the validation set is not,
    say, the last plays alphabetically), and taken into validation until they hold val_fraction of all
    tokens. At least one document stays on each side. Returns one flag per document (True = validation).
    """
    n = len(names)
    is_val = [False] * n
    if n < 2 or val_fraction <= 0:
        return is_val
    target = val_fraction * sum(lengths)
    order = sorted(range(n), key=lambda i: hashlib.sha256(names[i].encode()).hexdigest())
    taken = 0
    for i in order[:-1]:  # never all of them
        # Stop once the target is met, or when this document would overshoot it by more than stopping
        # undershoots (but take at least one).
        if taken >= target or (taken > 0 and taken + lengths[i] / 2 > target):
            break
        is_val[i] = True
        taken += lengths[i]
    return is_val


def prepare(
    sources: Sequence,
    out_dir,
    *,
    val_fraction: float = 0.1,
    pattern: str = "*.txt",
    skip_dirs: Sequence[str] = (),
    compact_vocab: bool = False,
    extra_meta: dict | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Tokenize text files into `out_dir`/train.bin, val.bin and meta.json; returns the meta dict.

    One file is one document, followed by EOT. With a single document there is nothing to split by, so its
    last val_fraction of tokens becomes val.bin.

    compact_vocab: renumber the token ids that occur in the corpus as 0..K-1 (in the order of the GPT-2 ids, so
    the mapping is monotone) and store the GPT-2 id of each in meta.json ("token_ids"): a model of this corpus
    then needs only K output rows instead of GPT2_VOCAB_SIZE (train.py reads K from meta.json; sampling maps back).
    extra_meta: more fields for meta.json.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir} is a file, not a directory")
    documents = _find_documents(sources, pattern, skip_dirs)
    paths = [path for path, _ in documents]
    names = [name for _, name in documents]
    texts, lossy = _read_texts(paths)
    if lossy:
        log(f"note: {len(lossy)} file(s) are not valid UTF-8; bad bytes became U+FFFD (e.g. {lossy[0]})")
    docs = _encode_documents(texts)
    lengths = [len(d) for d in docs]
    if sum(lengths) == len(docs):  # nothing but the end-of-text token after each document
        raise DataError(
            f"no text to tokenize: the {len(docs)} document(s) found in {', '.join(map(str, sources))} are empty"
        )

    if len(docs) == 1:
        cut = int(round(lengths[0] * (1.0 - val_fraction)))
        train_ids, val_ids = docs[0][:cut], docs[0][cut:]
        train_names, val_names = names, (names if len(val_ids) else [])
    else:
        is_val = split_documents(names, lengths, val_fraction)
        empty = np.zeros(0, np.uint16)
        train_ids = np.concatenate([d for d, v in zip(docs, is_val) if not v] or [empty])
        val_ids = np.concatenate([d for d, v in zip(docs, is_val) if v] or [empty])
        train_names = [n for n, v in zip(names, is_val) if not v]
        val_names = [n for n, v in zip(names, is_val) if v]

    if val_fraction > 0 and len(val_ids) == 0:
        raise DataError("val.bin would be empty: give more text (or several documents), or a larger --val-fraction")
    vocab_size, eot, token_ids = GPT2_VOCAB_SIZE, EOT_TOKEN, None
    if compact_vocab:
        token_ids = np.unique(np.concatenate([train_ids, val_ids]))  # sorted GPT-2 ids: a monotone renumbering
        train_ids, val_ids = (np.searchsorted(token_ids, ids).astype(np.uint16) for ids in (train_ids, val_ids))
        vocab_size = len(token_ids)
        eot = int(np.searchsorted(token_ids, EOT_TOKEN)) if EOT_TOKEN in token_ids else None
    train_ids, val_ids = train_ids.astype("<u2"), val_ids.astype("<u2")  # as write_tokens stores them
    meta = {
        "format": "nanogpt (raw little-endian uint16, no header)",
        "encoding": ENCODING_NAME,
        "vocab_size": vocab_size,
        "eot_token": eot,
        "train_tokens": int(len(train_ids)),
        "val_tokens": int(len(val_ids)),
        "train_sha256": tokens_digest(train_ids),
        "val_sha256": tokens_digest(val_ids),
        "documents": len(docs),
        "val_fraction": val_fraction,
        "sources": [str(s) for s in sources],
        "train_documents": train_names,
        "val_documents": val_names,
    }
    if token_ids is not None:
        meta["token_ids"] = token_ids.tolist()  # compact id i is GPT-2 id token_ids[i]
    meta.update(extra_meta or {})
    # meta.json first: it names the token files by digest, so a prepare interrupted from here on leaves files
    # that do not match it (refused on load), never new tokens beside an old mapping or compacted ids without one.
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=1) + "\n")
    write_tokens(out_dir / "train.bin", train_ids)
    write_tokens(out_dir / "val.bin", val_ids)
    compacted = (
        f"; vocabulary compacted to the {vocab_size:,} ids that occur (--vocab-size {vocab_size})"
        if token_ids is not None
        else ""
    )
    log(
        f"wrote {out_dir}/train.bin ({len(train_ids):,} tokens, {len(train_names)} documents) and "
        f"val.bin ({len(val_ids):,} tokens, {len(val_names)} documents){compacted}"
    )
    return meta


def token_ids(data_dir) -> np.ndarray | None:
    """The GPT-2 id of each token id of a corpus prepared with compact_vocab (from its meta.json), else None."""
    meta = read_meta(data_dir)
    return None if meta is None else meta.get("token_ids")


# ---------------------------------------------------------------------------------------------------------
# The demo corpus: the Python standard library's own source.
# ---------------------------------------------------------------------------------------------------------

# Third-party packages live inside the stdlib directory on many installs; they are not the stdlib.
DEMO_SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def default_demo_dir() -> pathlib.Path:
    """$FASTCENTER_CACHE (or $XDG_CACHE_HOME/fastcenter, or ~/.cache/fastcenter) / demo-py3.X."""
    base = os.environ.get("FASTCENTER_CACHE")
    if base is None:
        base = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "fastcenter"
    return pathlib.Path(base) / f"demo-py{sys.version_info.major}.{sys.version_info.minor}"


def ensure_demo_corpus(
    cache_dir=None, *, root=None, log: Callable[[str], None] = print, val_fraction: float = 0.05
) -> pathlib.Path:
    """The demo data directory, built on first use from the stdlib's .py files and cached.

    About 15M tokens for CPython 3.11 (a few seconds to build). The cache is reused when its meta.json holds
    the same fingerprint (names and sizes of the source files): another Python, or an edited stdlib, rebuilds.
    `root` replaces the stdlib directory (tests use a small one).
    """
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_demo_dir()
    root = pathlib.Path(root) if root is not None else stdlib_root()
    documents = _find_documents([root], "*.py", DEMO_SKIP_DIRS)
    listing = "\n".join(f"{name}:{path.stat().st_size}" for path, name in documents)
    fingerprint = hashlib.sha256(listing.encode()).hexdigest()

    meta_path = cache_dir / "meta.json"
    if meta_path.is_file() and (cache_dir / "train.bin").is_file() and (cache_dir / "val.bin").is_file():
        try:
            cached = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            cached = None
        # A cache made before meta.json held digests is rebuilt (train.py checks the files against them).
        if isinstance(cached, dict) and cached.get("fingerprint") == fingerprint and "train_sha256" in cached:
            log(
                f"Demo corpus: the Python standard library's own source ({cached.get('train_tokens', 0):,} train / "
                f"{cached.get('val_tokens', 0):,} val tokens), cached in {cache_dir}"
            )
            return cache_dir

    log(
        f"Demo corpus: building it from the Python standard library's own source ({len(documents)} .py files "
        f"under {root}; no download) into {cache_dir} ..."
    )
    prepare(
        [root],
        cache_dir,
        val_fraction=val_fraction,
        pattern="*.py",
        skip_dirs=DEMO_SKIP_DIRS,
        extra_meta={"fingerprint": fingerprint},
        log=log,
    )
    return cache_dir


# ---------------------------------------------------------------------------------------------------------
# Batches.
# ---------------------------------------------------------------------------------------------------------


class WindowSampler:
    """Random training windows of seq_len + 1 tokens; the draw for step s depends on (seed, s) only.

    One optimizer step consumes `grad_accum_steps` micro-batches of `batch_size` windows: the global batch.
    Under DDP the micro-steps are split into contiguous blocks, rank r taking block r, so the world together
    sees exactly the windows one process would (grad_accum_steps must be divisible by world_size).
    The state (`state_dict`) is the seed and the next step; nothing else is needed to resume exactly.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        seq_len: int,
        batch_size: int,
        grad_accum_steps: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if len(tokens) < seq_len + 1:
            raise DataError(f"{len(tokens)} tokens are too few for one window of seq_len + 1 = {seq_len + 1}")
        if grad_accum_steps % world_size:
            raise ValueError(
                f"grad_accum_steps ({grad_accum_steps}) must be divisible by the world size ({world_size})"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.tokens = tokens
        self.seq_len, self.batch_size, self.grad_accum_steps = seq_len, batch_size, grad_accum_steps
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.micro_steps_per_rank = grad_accum_steps // world_size
        self.step = 0

    def global_positions(self, step: int) -> np.ndarray:
        """Start offsets [grad_accum_steps, batch_size] of every window of optimizer step `step`."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, step])))
        high = len(self.tokens) - self.seq_len  # starts in [0, n - seq_len - 1]: the window fits
        return rng.integers(0, high, size=(self.grad_accum_steps, self.batch_size), dtype=np.int64)

    def next_step(self) -> list[np.ndarray]:
        """This rank's micro-batches of the next step: a list of [batch_size, seq_len + 1] int64 arrays."""
        positions = self.global_positions(self.step)
        first = self.rank * self.micro_steps_per_rank
        self.step += 1
        mine = positions[first : first + self.micro_steps_per_rank]
        return [gather_windows(self.tokens, starts, self.seq_len) for starts in mine]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"sampler state was saved with seed {state['seed']}, this sampler has seed {self.seed}: "
                "resuming would not continue the same data stream"
            )
        self.step = int(state["step"])


def validation_positions(n_tokens: int, seq_len: int, count: int) -> np.ndarray:
    """`count` window starts spread evenly over a file of n_tokens (first at 0, last at the very end)."""
    if n_tokens < seq_len + 1:
        raise DataError(f"{n_tokens} tokens are too few for one window of seq_len + 1 = {seq_len + 1}")
    last = n_tokens - seq_len - 1
    return np.linspace(0, last, num=count).astype(np.int64)


def gather_windows(tokens: np.ndarray, positions: np.ndarray, seq_len: int) -> np.ndarray:
    """The windows tokens[p : p + seq_len + 1] for every start p, as one [len(positions), seq_len + 1] int64 array."""
    index = np.asarray(positions, dtype=np.int64)[:, None] + np.arange(seq_len + 1, dtype=np.int64)
    return np.asarray(tokens[index], dtype=np.int64)


def to_inputs_targets(windows: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) on `device` from [B, T + 1] windows; pinned and non-blocking on CUDA so the copy
    overlaps the previous step's kernels."""
    batch = torch.from_numpy(windows)
    device = torch.device(device)
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    return batch[:, :-1], batch[:, 1:]


# ---------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastcenter.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize text files into train.bin / val.bin / meta.json")
    p.add_argument("--text", nargs="+", required=True, metavar="FILE_OR_DIR", help="text files or directories")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of tokens (by document) for val.bin")
    p.add_argument("--pattern", default="*.txt", help="file name pattern inside directories (default: *.txt)")
    p.add_argument(
        "--compact-vocab",
        action="store_true",
        help="renumber the ids that occur as 0..K-1 (meta.json keeps the mapping): a smaller output layer",
    )
    d = sub.add_parser("demo", help="build (or find) the demo corpus from the Python standard library's source")
    d.add_argument("--out", default=None, metavar="DIR", help=f"output directory (default: {default_demo_dir()})")
    c = sub.add_parser("check", help="validate token files (format, ids < vocab size)")
    c.add_argument("files", nargs="+")
    c.add_argument("--vocab-size", type=int, default=GPT2_VOCAB_SIZE)
    return parser


def main(argv: Iterable[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)

    try:
        if args.command == "prepare":
            prepare(
                args.text,
                args.out,
                val_fraction=args.val_fraction,
                pattern=args.pattern,
                compact_vocab=args.compact_vocab,
            )
        elif args.command == "demo":
            ensure_demo_corpus(args.out)
        else:
            for path in args.files:
                tokens = open_tokens(path)
                check_tokens(tokens, path, vocab_size=args.vocab_size)
                print(f"{path}: {len(tokens):,} tokens ({tokens.dtype}), all ids < {args.vocab_size}")
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be read or written
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
