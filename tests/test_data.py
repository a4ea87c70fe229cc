"""fastcenter.data: preparing token files, reading both formats, refusing corrupt ones, and the samplers."""

import hashlib
import json
import math
import re
import shutil

import numpy as np
import pytest

from fastcenter import data
from fastcenter.data import DataError

PLAYS = ["macbeth.txt", "tempest.txt", "julius_caesar.txt", "sonnets.txt"]


@pytest.fixture
def enc(gpt2_encoding):
    """GPT-2's BPE from tiktoken's cache, or a skip (conftest): preparing text needs it, reading tokens does not."""
    return gpt2_encoding


def _write_texts(directory, texts: dict):
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def _decode_documents(enc, ids):
    """Split a token stream at EOT and decode each document."""
    ids = np.asarray(ids).tolist()
    assert ids[-1] == data.EOT_TOKEN, "every document ends with EOT"
    docs, current = [], []
    for t in ids:
        if t == data.EOT_TOKEN:
            docs.append(enc.decode(current))
            current = []
        else:
            current.append(t)
    return docs


# ---------------------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------------------


def test_prepare_round_trips_small_files(tmp_path, enc):
    rng = np.random.default_rng()
    words = ["alpha", "beta", "gamma", "δέλτα", "ёж", "  spaces\t", "\n", "<|endoftext|>", "x" * 7, "😀"]
    texts = {f"doc{i}.txt": " ".join(rng.choice(words, size=rng.integers(5, 60))) for i in range(5)}
    src = _write_texts(tmp_path / "src", texts)
    (src / "notes.md").write_text("not matched by *.txt")
    meta = data.prepare([src], tmp_path / "out", val_fraction=0.3, log=lambda s: None)

    train = data.open_tokens(tmp_path / "out" / "train.bin")
    val = data.open_tokens(tmp_path / "out" / "val.bin")
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    assert (
        meta["encoding"] == "r50k_base"
        and meta["vocab_size"] == enc.n_vocab == data.GPT2_VOCAB_SIZE
        and meta["eot_token"] == enc.eot_token
    )
    assert sorted(meta["train_documents"] + meta["val_documents"]) == sorted(texts)
    assert meta["train_documents"] and meta["val_documents"]
    # Each split is its documents, in order, each followed by EOT; "<|endoftext|>" in text is plain text.
    assert _decode_documents(enc, train) == [texts[n] for n in meta["train_documents"]]
    assert _decode_documents(enc, val) == [texts[n] for n in meta["val_documents"]]
    on_disk = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert on_disk == meta


def test_prepare_single_file_splits_by_tokens(tmp_path, enc):
    text = "word " * 1000
    path = tmp_path / "one.txt"
    path.write_text(text)
    meta = data.prepare([path], tmp_path / "out", val_fraction=0.25, log=lambda s: None)
    train = np.asarray(data.open_tokens(tmp_path / "out" / "train.bin"))
    val = np.asarray(data.open_tokens(tmp_path / "out" / "val.bin"))
    expected = enc.encode_ordinary(text) + [data.EOT_TOKEN]
    assert np.concatenate([train, val]).tolist() == expected
    assert abs(len(val) - 0.25 * len(expected)) <= 1
    assert meta["documents"] == 1


def test_prepare_shakespeare_is_deterministic_and_location_independent(tmp_path, enc, shakespeare_dir):
    plays = [shakespeare_dir / p for p in sorted(PLAYS)]  # files keep the order given; directories are sorted
    meta_a = data.prepare(plays, tmp_path / "a", val_fraction=0.2, log=lambda s: None)
    # The same plays found in another directory: the same bytes.
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for p in plays:
        shutil.copy(p, moved / p.name)
    meta_b = data.prepare([moved], tmp_path / "b", val_fraction=0.2, log=lambda s: None)
    for split in ("train.bin", "val.bin"):
        assert (tmp_path / "a" / split).read_bytes() == (tmp_path / "b" / split).read_bytes()
    assert meta_a["val_documents"] == meta_b["val_documents"]
    assert len(meta_a["val_documents"]) >= 1 and len(meta_a["train_documents"]) >= 1

    # Round trip against tiktoken directly, document by document.
    train = data.open_tokens(tmp_path / "a" / "train.bin")
    texts = {p.name: p.read_text(encoding="utf-8") for p in plays}
    decoded = _decode_documents(enc, train)
    assert decoded == [texts[n] for n in sorted(meta_b["train_documents"])]
    assert meta_a["train_tokens"] + meta_a["val_tokens"] == sum(len(enc.encode_ordinary(t)) + 1 for t in texts.values())


def test_split_documents_rules():
    lengths = list(np.random.default_rng().integers(100, 1000, size=40))
    names = [f"d{i}" for i in range(40)]
    flags = data.split_documents(names, lengths, 0.1)
    val = sum(l for l, f in zip(lengths, flags) if f)
    assert 0 < val < sum(lengths) and any(flags) and not all(flags)
    assert abs(val / sum(lengths) - 0.1) < 0.05
    # Independent of the order the documents are given in.
    perm = np.random.default_rng().permutation(40)
    flags_perm = data.split_documents([names[i] for i in perm], [lengths[i] for i in perm], 0.1)
    assert {names[i] for i, f in zip(perm, flags_perm) if f} == {n for n, f in zip(names, flags) if f}
    # Never everything into validation, nothing with fraction 0.
    assert data.split_documents(["a", "b"], [10, 10], 0.99) in ([True, False], [False, True])
    assert data.split_documents(["a", "b"], [10, 10], 0.0) == [False, False]


def test_prepare_cli(tmp_path, enc):
    src = _write_texts(tmp_path / "src", {"a.txt": "hello world", "b.txt": "another document"})
    assert data.main(["prepare", "--text", str(src), "--out", str(tmp_path / "out"), "--val-fraction", "0.5"]) == 0
    assert (tmp_path / "out" / "train.bin").is_file() and (tmp_path / "out" / "val.bin").is_file()
    assert data.main(["prepare", "--text", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2


def test_prepare_refuses_empty_source(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no documents matching"):
        data.prepare([tmp_path / "empty"], tmp_path / "out", log=lambda s: None)


def test_prepare_refuses_empty_text_a_file_as_out_and_an_empty_validation_split(tmp_path, enc, capsys):
    src = _write_texts(tmp_path / "src", {"a.txt": "", "b.txt": ""})
    with pytest.raises(DataError, match="no text to tokenize: the 2 document"):
        data.prepare([src], tmp_path / "out", log=lambda s: None)
    (tmp_path / "a_file").write_text("x")
    text = _write_texts(tmp_path / "text", {"a.txt": "some words here " * 20})
    with pytest.raises(DataError, match="is a file, not a directory"):
        data.prepare([text], tmp_path / "a_file", log=lambda s: None)
    with pytest.raises(DataError, match="val.bin would be empty"):
        data.prepare([_write_texts(tmp_path / "tiny", {"a.txt": "hi"})], tmp_path / "out", log=lambda s: None)
    # From the command line: one line, exit code 2, never a traceback.
    for argv in (
        ["--text", str(src), "--out", str(tmp_path / "o")],
        ["--text", str(text), "--out", str(tmp_path / "a_file" / "x")],
    ):
        assert data.main(["prepare", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_compact_vocabulary_renumbers_the_ids_that_occur_and_maps_back(tmp_path, enc):
    texts = {"a.txt": "the cat sat on the mat " * 30, "b.txt": "a dog ran in the fog " * 30, "c.txt": "the end " * 40}
    src = _write_texts(tmp_path / "src", texts)
    full = data.prepare([src], tmp_path / "full", val_fraction=0.3, log=lambda s: None)
    meta = data.prepare([src], tmp_path / "compact", val_fraction=0.3, compact_vocab=True, log=lambda s: None)
    ids = data.token_ids(tmp_path / "compact")
    assert data.token_ids(tmp_path / "full") is None and full["vocab_size"] == data.GPT2_VOCAB_SIZE
    assert meta["vocab_size"] == len(ids) < 30 and list(ids) == sorted(set(ids.tolist()))  # monotone renumbering
    assert ids[meta["eot_token"]] == data.EOT_TOKEN
    for split in ("train", "val"):
        compact = np.asarray(data.load_split(tmp_path / "compact", split, vocab_size=len(ids), seq_len=4))
        original = np.asarray(data.open_tokens(tmp_path / "full" / f"{split}.bin"))
        assert compact.max() < len(ids) and np.array_equal(ids[compact], original)


# ---------------------------------------------------------------------------------------------------------
# Reading both formats
# ---------------------------------------------------------------------------------------------------------


def test_nanogpt_and_llmc_formats_read_the_same(tmp_path):
    ids = np.random.default_rng().integers(0, data.GPT2_VOCAB_SIZE, size=1237).astype(np.uint16)
    data.write_tokens(tmp_path / "nano.bin", ids, fmt="nanogpt")
    data.write_tokens(tmp_path / "llmc.bin", ids, fmt="llmc")
    assert (tmp_path / "nano.bin").stat().st_size == 2 * len(ids)
    assert (tmp_path / "llmc.bin").stat().st_size == 1024 + 2 * len(ids)
    # Independent decoding of the raw bytes, not through our reader.
    assert np.array_equal(np.frombuffer((tmp_path / "nano.bin").read_bytes(), "<u2"), ids)
    header = np.frombuffer((tmp_path / "llmc.bin").read_bytes()[:1024], "<i4")
    assert header[:3].tolist() == [20240520, 1, len(ids)]
    for name in ("nano.bin", "llmc.bin"):
        tokens = data.open_tokens(tmp_path / name)
        assert np.array_equal(np.asarray(tokens), ids)
        data.check_tokens(tokens, name, vocab_size=data.GPT2_VOCAB_SIZE, min_tokens=17)


def test_llmc_version2_uint32(tmp_path):
    ids = np.random.default_rng().integers(0, 128_256, size=300).astype(np.uint32)
    header = np.zeros(256, "<i4")
    header[:3] = (20240520, 2, len(ids))
    (tmp_path / "l3.bin").write_bytes(header.tobytes() + ids.astype("<u4").tobytes())
    tokens = data.open_tokens(tmp_path / "l3.bin")
    assert tokens.dtype == np.uint32 and np.array_equal(np.asarray(tokens), ids)


def test_load_split_reads_a_prepared_directory(tmp_path, enc):
    src = _write_texts(tmp_path / "src", {"a.txt": "one two three " * 50, "b.txt": "four five six " * 50})
    data.prepare([src], tmp_path / "d", val_fraction=0.5, log=lambda s: None)
    train = data.load_split(tmp_path / "d", "train", vocab_size=data.GPT2_VOCAB_SIZE, seq_len=16)
    assert len(train) > 17


# ---------------------------------------------------------------------------------------------------------
# Corrupt files are refused with a message that names the file and the problem
# ---------------------------------------------------------------------------------------------------------


def _check(path, vocab_size=data.GPT2_VOCAB_SIZE, seq_len=8):
    tokens = data.open_tokens(path)
    data.check_tokens(tokens, path, vocab_size=vocab_size, min_tokens=seq_len + 1)


def test_odd_byte_count_refused(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(np.arange(100, dtype="<u2").tobytes() + b"\x01")
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*odd byte count"):
        _check(path)


def test_id_out_of_vocab_refused_with_position(tmp_path, monkeypatch):
    rng = np.random.default_rng()
    ids = rng.integers(0, 1000, size=5000).astype(np.uint16)
    where = int(rng.integers(1000, 5000))
    ids[where] = 1000 + int(rng.integers(0, 50))
    ids[where + 1 :] = np.minimum(ids[where + 1 :], 999)
    path = tmp_path / "vocab.bin"
    data.write_tokens(path, ids)
    # Small chunks, so the offender sits in a later chunk and its absolute position must be right.
    monkeypatch.setattr(data, "SCAN_CHUNK_TOKENS", 512)
    expected = rf"vocab\.bin: token id {ids[where]} at position {where} is >= vocab_size 1000"
    with pytest.raises(DataError, match=expected):
        _check(path, vocab_size=1000)
    _check(path, vocab_size=int(ids.max()) + 1)  # the same file is fine for a larger vocabulary
    # A nanoGPT file holding a GPT-2-invalid id (>= GPT2_VOCAB_SIZE) is refused against the default vocabulary.
    data.write_tokens(path, np.array([1, 2, 3, 65535] * 10, dtype=np.uint16))
    with pytest.raises(DataError, match="token id 65535 at position 3"):
        _check(path)


def test_too_short_refused(tmp_path):
    path = tmp_path / "short.bin"
    data.write_tokens(path, np.arange(8, dtype=np.uint16))
    with pytest.raises(DataError, match=r"short\.bin: 8 tokens, too short for one training window of 9"):
        _check(path, seq_len=8)
    _check(path, seq_len=7)


def test_empty_and_missing_refused(tmp_path):
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        _check(tmp_path / "empty.bin")
    with pytest.raises(DataError, match="not found"):
        data.load_split(tmp_path, "train", vocab_size=data.GPT2_VOCAB_SIZE, seq_len=8)


def test_bad_llmc_headers_refused(tmp_path):
    ids = np.arange(200, dtype=np.uint16)
    good = tmp_path / "good.bin"
    data.write_tokens(good, ids, fmt="llmc")
    raw = good.read_bytes()

    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(raw[:-10])
    with pytest.raises(DataError, match=r"truncated\.bin: llm\.c header says 200 tokens .* holds 390 bytes"):
        _check(truncated)

    wrong_count = tmp_path / "count.bin"
    header = np.frombuffer(raw[:1024], "<i4").copy()
    header[2] = 500
    wrong_count.write_bytes(header.tobytes() + raw[1024:])
    with pytest.raises(DataError, match="header says 500 tokens"):
        _check(wrong_count)

    version = tmp_path / "version.bin"
    header[1:3] = (7, 200)
    version.write_bytes(header.tobytes() + raw[1024:])
    with pytest.raises(DataError, match="version 7"):
        _check(version)

    short_header = tmp_path / "hdr.bin"
    short_header.write_bytes(raw[:100])
    with pytest.raises(DataError, match="shorter than the 1024-byte header"):
        _check(short_header)


def test_check_cli_reports(tmp_path, capsys):
    data.write_tokens(tmp_path / "ok.bin", np.arange(50, dtype=np.uint16))
    (tmp_path / "bad.bin").write_bytes(b"\x00\x01\x02")
    assert data.main(["check", str(tmp_path / "ok.bin")]) == 0
    assert data.main(["check", str(tmp_path / "bad.bin")]) == 2
    assert "odd byte count" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The demo corpus
# ---------------------------------------------------------------------------------------------------------


def test_demo_corpus_builds_caches_and_rebuilds(tmp_path, enc):
    # A stand-in for the stdlib directory: a few modules, and a site-packages that must be left out.
    root = tmp_path / "lib"
    _write_texts(root, {"a.py": "import os\nprint(os.sep)\n", "b.py": "x = 1\n" * 30})
    _write_texts(root / "pkg", {"c.py": "def f():\n    return 2\n", "README.txt": "not python"})
    _write_texts(root / "site-packages" / "third", {"d.py": "THIRD_PARTY = True\n"})
    messages = []
    out = data.ensure_demo_corpus(tmp_path / "cache", root=root, log=messages.append, val_fraction=0.3)
    assert "building" in messages[0] and str(root) in messages[0]
    meta = json.loads((out / "meta.json").read_text())
    assert sorted(meta["train_documents"] + meta["val_documents"]) == ["a.py", "b.py", "pkg/c.py"]
    both = np.concatenate([data.open_tokens(out / "train.bin"), data.open_tokens(out / "val.bin")])
    all_text = _decode_documents(enc, both)
    assert "THIRD_PARTY" not in "".join(all_text)

    messages.clear()
    mtime = (out / "train.bin").stat().st_mtime_ns
    data.ensure_demo_corpus(tmp_path / "cache", root=root, log=messages.append, val_fraction=0.3)
    assert "cached in" in messages[0] and (out / "train.bin").stat().st_mtime_ns == mtime

    (root / "b.py").write_text("y = 2\n" * 31)  # the source changed: rebuilt
    messages.clear()
    data.ensure_demo_corpus(tmp_path / "cache", root=root, log=messages.append, val_fraction=0.3)
    assert "building" in messages[0]


def test_default_demo_dir_honours_cache_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTCENTER_CACHE", str(tmp_path))
    assert data.default_demo_dir().parent == tmp_path
    assert data.default_demo_dir().name.startswith("demo-py3.")


# ---------------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------------


def _token_stream(n):
    return np.random.default_rng().integers(0, data.GPT2_VOCAB_SIZE, size=n).astype(np.uint16)


def test_windows_are_slices_of_the_file():
    tokens = _token_stream(1000)
    seed = int(np.random.default_rng().integers(0, 2**31))
    sampler = data.WindowSampler(tokens, seq_len=24, batch_size=5, grad_accum_steps=3, seed=seed)
    positions = sampler.global_positions(0)
    micro = sampler.next_step()
    assert len(micro) == 3 and all(w.shape == (5, 25) and w.dtype == np.int64 for w in micro)
    for batch, starts in zip(micro, positions):
        for window, start in zip(batch, starts):
            assert 0 <= start <= 1000 - 25
            assert np.array_equal(window, tokens[start : start + 25])
    x, y = data.to_inputs_targets(micro[0], "cpu")
    assert x.shape == y.shape == (5, 24) and (x[:, 1:] == y[:, :-1]).all()


def test_windows_reach_both_ends():
    tokens = _token_stream(40)  # 40 - 33 + 1 = 8 possible starts
    sampler = data.WindowSampler(tokens, seq_len=32, batch_size=64, grad_accum_steps=1, seed=0)
    starts = set(sampler.global_positions(0).ravel().tolist())
    assert starts == set(range(8))


def test_sampler_state_restores_the_stream():
    tokens = _token_stream(5000)
    seed = int(np.random.default_rng().integers(0, 2**31))
    kwargs = dict(seq_len=16, batch_size=4, grad_accum_steps=2, seed=seed)
    reference = data.WindowSampler(tokens, **kwargs)
    stream = [reference.next_step() for _ in range(10)]

    first = data.WindowSampler(tokens, **kwargs)
    for _ in range(6):
        first.next_step()
    state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
    resumed = data.WindowSampler(tokens, **kwargs)
    resumed.load_state_dict(state)
    for expected in stream[6:]:
        for a, b in zip(resumed.next_step(), expected):
            assert np.array_equal(a, b)
    # Different steps and different seeds draw different windows.
    assert not np.array_equal(stream[0][0], stream[1][0])
    other = data.WindowSampler(tokens, **{**kwargs, "seed": seed + 1})
    assert not np.array_equal(other.next_step()[0], stream[0][0])
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_ranks_split_the_global_batch():
    tokens = _token_stream(3000)
    seed = int(np.random.default_rng().integers(0, 2**31))
    single = data.WindowSampler(tokens, seq_len=8, batch_size=3, grad_accum_steps=4, seed=seed)
    ranks = [
        data.WindowSampler(tokens, seq_len=8, batch_size=3, grad_accum_steps=4, seed=seed, rank=r, world_size=2)
        for r in range(2)
    ]
    for _ in range(3):
        expected = single.next_step()
        together = ranks[0].next_step() + ranks[1].next_step()
        assert len(together) == 4
        for a, b in zip(together, expected):
            assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="divisible"):
        data.WindowSampler(tokens, seq_len=8, batch_size=3, grad_accum_steps=3, seed=0, rank=0, world_size=2)


def test_validation_windows_are_fixed_and_spread():
    n, seq_len, count = int(np.random.default_rng().integers(500, 5000)), 32, 12
    positions = data.validation_positions(n, seq_len, count)
    assert np.array_equal(positions, data.validation_positions(n, seq_len, count))  # no randomness at all
    assert positions[0] == 0 and positions[-1] == n - seq_len - 1
    gaps = np.diff(positions)
    assert (gaps > 0).all() and gaps.max() - gaps.min() <= 1
    assert math.isclose(gaps.mean(), (n - seq_len - 1) / (count - 1), rel_tol=0.01)
    with pytest.raises(DataError, match="too few"):
        data.validation_positions(seq_len, seq_len, 1)


# ---------------------------------------------------------------------------------------------------------
# A data directory proves what it is: meta.json names its token files (token counts, sha256) and mapping
# ---------------------------------------------------------------------------------------------------------


def _fake_encoder(texts):
    """A stand-in for tiktoken (these tests need no tokenizer): each byte -> a GPT-2 id, then EOT."""
    return [np.array([1000 + b for b in text.encode()] + [data.EOT_TOKEN], dtype=np.uint16) for text in texts]


def _prepare(tmp_path, out, words: str, **kw):
    src = _write_texts(tmp_path / f"src-{words}", {f"{i}.txt": f"{words} {i} " * 40 for i in range(4)})
    return data.prepare([src], out, val_fraction=0.3, log=lambda s: None, **kw)


def _load_both(directory, vocab_size):
    return [data.load_split(directory, split, vocab_size=vocab_size, seq_len=8) for split in ("train", "val")]


@pytest.mark.parametrize("compact", [False, True], ids=["gpt2", "compact"])
@pytest.mark.parametrize("fresh", [False, True], ids=["over-an-old-corpus", "into-a-new-directory"])
def test_an_interrupted_prepare_never_leaves_a_directory_that_loads_as_another_corpus(
    tmp_path, monkeypatch, compact, fresh
):
    monkeypatch.setattr(data, "_encode_documents", _fake_encoder)
    out = tmp_path / "d"
    if not fresh:
        _prepare(tmp_path, out, "old words", compact_vocab=compact)
    old = {p.name: p.read_bytes() for p in out.iterdir()} if not fresh else {}
    real_write, real_write_text = data.atomic_write, data.atomic_write_text
    for interrupted_at in range(1, 4):  # prepare writes three files; a kill may come before any of them is whole
        if out.exists():
            for p in out.iterdir():
                p.unlink()
            for name, raw in old.items():
                (out / name).write_bytes(raw)
        writes = []

        def counted(write, writes=writes, interrupted_at=interrupted_at):
            def wrapper(*args):
                writes.append(args[0])
                if len(writes) == interrupted_at:
                    raise KeyboardInterrupt
                return write(*args)

            return wrapper

        monkeypatch.setattr(data, "atomic_write", counted(real_write))
        monkeypatch.setattr(data, "atomic_write_text", counted(real_write_text))
        with pytest.raises(KeyboardInterrupt):
            _prepare(tmp_path, out, "new text", compact_vocab=compact)
        monkeypatch.setattr(data, "atomic_write", real_write)
        monkeypatch.setattr(data, "atomic_write_text", real_write_text)
        ids = data.token_ids(out) if (out / "meta.json").exists() else None
        vocab = data.GPT2_VOCAB_SIZE if ids is None else len(ids)
        # Either the old corpus, whole and as it was, or a refusal: never new tokens read with the old mapping,
        # nor compacted ids read as GPT-2's.
        try:
            loaded = _load_both(out, vocab)
        except DataError as e:
            assert re.search("not found|does not match|not the file", str(e)), str(e)
            continue
        assert old, f"interrupted at write {interrupted_at}: a half-written new directory loaded"
        assert {p.name: p.read_bytes() for p in out.iterdir()} == old, f"interrupted at write {interrupted_at}"
        assert all(len(t) for t in loaded)


def test_token_files_that_do_not_match_their_meta_json_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_encode_documents", _fake_encoder)
    meta = _prepare(tmp_path, tmp_path / "d", "some words", compact_vocab=True)
    # The digest is sha256 over the sha256 of each chunk of the file's bytes; a small file is one chunk.
    raw = (tmp_path / "d" / "train.bin").read_bytes()
    assert meta["train_sha256"] == hashlib.sha256(hashlib.sha256(raw).digest()).hexdigest()
    _prepare(tmp_path, tmp_path / "other", "other words here", compact_vocab=True)
    (tmp_path / "d" / "val.bin").write_bytes((tmp_path / "other" / "val.bin").read_bytes())
    with pytest.raises(DataError, match=r"val\.bin does not match .*meta\.json.*prepare"):
        _load_both(tmp_path / "d", meta["vocab_size"])


def test_a_corpus_knows_its_identity(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_encode_documents", _fake_encoder)
    monkeypatch.setattr(data, "SCAN_CHUNK_TOKENS", 64)  # many chunks: prepare's digest and the scan's must agree
    _prepare(tmp_path, tmp_path / "a", "some words", compact_vocab=True)
    _prepare(tmp_path, tmp_path / "b", "some words", compact_vocab=True)  # the same text: the same corpus
    _prepare(tmp_path, tmp_path / "c", "other words", compact_vocab=True)
    a, b, c = (data.load_corpus(tmp_path / n, vocab_size=None, seq_len=8) for n in "abc")
    assert a.vocab_size == len(a.token_ids) and a.identity == b.identity and a.identity != c.identity
    assert a.differences(b.identity) == [] and a.differences(c.identity)
    assert "train.bin" in " ".join(a.differences(c.identity))
    plain = tmp_path / "plain"
    for split in ("train", "val"):  # nanoGPT's files: no meta.json, GPT-2 ids
        data.write_tokens(plain / f"{split}.bin", np.arange(100, dtype=np.uint16))
    p = data.load_corpus(plain, vocab_size=None, seq_len=8)
    assert p.token_ids is None and p.vocab_size == data.GPT2_VOCAB_SIZE
    assert p.identity["train.bin"] == {"tokens": 100, "sha256": p.identity["train.bin"]["sha256"]}
    assert p.differences(a.identity) and "vocabulary" in " ".join(p.differences(a.identity))


@pytest.mark.parametrize(
    "meta, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"token_ids": [1, 2.7, 3]}', r"token_ids\[1\] = 2.7 is not a GPT-2 token id"),
        ('{"token_ids": [1, true]}', r"token_ids\[1\] = True is not a GPT-2 token id"),
        ('{"token_ids": [1, "2"]}', r"token_ids\[1\] = '2' is not a GPT-2 token id"),
        ('{"token_ids": [1, 60000]}', r"token_ids\[1\] = 60000 is not a GPT-2 token id"),
        ('{"token_ids": [5, 5]}', "repeats"),
        ('{"token_ids": 7}', "token_ids must be a non-empty list"),
        ('{"token_ids": [1, 2], "vocab_size": 3}', "vocab_size 3 .* 2 token_ids"),
        ('{"train_tokens": "many"}', "train_tokens must be"),
        ('{"val_sha256": 12}', "val_sha256 must be"),
    ],
)
def test_a_malformed_meta_json_is_one_clear_error(tmp_path, meta, message):
    for split in ("train", "val"):
        data.write_tokens(tmp_path / f"{split}.bin", np.arange(100, dtype=np.uint16))
    (tmp_path / "meta.json").write_text(meta)
    with pytest.raises(DataError, match=message) as err:
        data.load_corpus(tmp_path, vocab_size=None, seq_len=8)
    assert "meta.json" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match=message):
        data.token_ids(tmp_path)


def test_a_meta_json_that_is_a_directory_is_refused(tmp_path):
    (tmp_path / "meta.json").mkdir()
    with pytest.raises(DataError, match="meta.json is not a file"):
        data.token_ids(tmp_path)
