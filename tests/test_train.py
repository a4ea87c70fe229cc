"""train.py as a user runs it (a subprocess each time): learning, exact resume, DDP = one process (and one set of
centering statistics), the run directory owned by one run, signals, divergence, a full disk or a file-size limit,
and every user error as one line with exit code 2. Damaged checkpoints, other corpora under --resume and other
mistakes that stop a run before it trains go through train.py's cli() in this process (no start-up to wait for).

Tiny models on the synthetic corpus (tests/helpers.py): nothing here needs ../shared or a tokenizer, except the
demo-corpus test, which skips without the GPT-2 BPE. The training core itself is tested in test_training.py.
"""

import io
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
from helpers import train_script

from fastcenter import checkpoint, data
from fastcenter.config import TrainConfig
from fastcenter.training import Trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "train.py"
INJECT = pathlib.Path(__file__).resolve().parent / "inject"
LN_V = math.log(data.GPT2_VOCAB_SIZE)


def tiny_args(data_dir, out_dir, **overrides) -> list[str]:
    """Command-line flags of a tiny run; keyword arguments override (True/False -> --flag/--no-flag, None -> absent)."""
    args = dict(
        data=data_dir,
        out_dir=out_dir,
        batch_size=4,
        grad_accum_steps=2,
        seq_len=16,
        dim=32,
        n_layers=2,
        n_heads=2,
        lr=3e-3,
        warmup_iters=2,
        eval_interval=5,
        eval_iters=2,
        log_interval=1,
        max_iters=10,
        seed=torch.initial_seed() % 2**31,  # the test's fresh seed (conftest): new init and data order each run
        device="cpu",  # CPU tests, also on a GPU machine (exactness and the DDP comparison need one device)
    )
    args.update(overrides)
    argv = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + key.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return argv


def env(**extra) -> dict:
    """A user's environment: one thread (the tests share the cores), no interpreter flag, faults on demand."""
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(INJECT), str(ROOT)]))
    environment.pop("TRITON_INTERPRET", None)  # conftest sets it for the kernels; a user's shell would not
    environment.pop("FASTCENTER_INJECT", None)
    environment.update(extra)
    return environment


def train(argv, timeout=300, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TRAIN_PY)] + argv, env=env(**extra_env), capture_output=True, text=True, timeout=timeout
    )


def start(argv, **extra_env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(TRAIN_PY)] + argv,
        env=env(**extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    """Wait for a process from start() and return what train() would have."""
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def ok(result) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def one_line_error(result, pattern: str) -> None:
    """Exit code 2 and exactly one line on stderr, 'error: ...' matching `pattern`; no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(pattern, lines[0]), (pattern, lines[0])


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def wait_for_rows(proc, out_dir, n: int, timeout: float = 120) -> None:
    metrics = pathlib.Path(out_dir) / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    raise AssertionError(f"no {n} metrics rows within {timeout} s")


# train.py's cli() in this process (no start-up of its own): for errors and the runs tests only start from.


TRAIN = train_script()


def cli(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of train.py's command line, run in this process."""
    code = TRAIN.cli([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_error(argv, capsys, pattern: str) -> str:
    code, out, err = cli(argv, capsys)
    one_line_error(subprocess.CompletedProcess(argv, code, out, err), pattern)
    return err


@pytest.fixture(scope="module")
def trained_run(token_corpus, tmp_path_factory):
    """A finished two-step run (in-process), centering on: its directory is copied, never changed."""
    out = tmp_path_factory.mktemp("trained") / "run"
    torch.set_num_threads(1)
    assert TRAIN.cli(tiny_args(token_corpus, out, max_iters=2, center="residual")) == 0
    return out


def _copy_run(run, tmp_path) -> pathlib.Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


# ---------------------------------------------------------------------------------------------------------
# A real run
# ---------------------------------------------------------------------------------------------------------


def test_loss_falls_and_the_run_directory_is_complete(token_corpus, tmp_path):
    out = tmp_path / "run"
    result = ok(
        train(
            tiny_args(
                token_corpus,
                out,
                batch_size=8,
                grad_accum_steps=1,
                seq_len=32,
                lr=1e-2,
                warmup_iters=10,
                max_iters=60,
                eval_interval=30,
                eval_iters=4,
                log_interval=10,
            )
        )
    )
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 10, 20, 30, 40, 50, 60]  # step 1 at once, then every 10
    for r in rows:
        assert {"step", "loss", "lr", "tokens_per_sec", "peak_mem_mb", "grad_norm"} <= set(r)
        assert r["tokens_per_sec"] > 0 and r["peak_mem_mb"] > 0 and math.isfinite(r["loss"])
    assert [r["step"] for r in rows if "val_loss" in r] == [30, 60]
    # From ln(V) = 10.8 at init to far below on a corpus with structure: a real drop.
    assert np.mean([r["loss"] for r in rows[-3:]]) < LN_V - 3.0, rows
    assert rows[-1]["val_loss"] < rows[3]["val_loss"] < LN_V - 2.5, rows
    # The console: step 1 at once with the projected duration (a CPU), progress lines, the end.
    assert "step 1/60" in result.stdout and "would take about" in result.stdout
    assert "step 60/60" in result.stdout and "done: 60 steps" in result.stdout

    config = json.loads((out / "config.json").read_text())
    assert config["model"]["dim"] == 32 and config["model"]["fused"] is False
    assert config["train"]["max_iters"] == 60 and config["train"]["lr"] == 1e-2
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = checkpoint.load(out / "ckpt.pt")
    assert ckpt["step"] == 60 and ckpt["sampler"]["step"] == 60 and ckpt["val_loss"] == rows[-1]["val_loss"]
    assert checkpoint.model_config(ckpt).to_dict() == config["model"]
    assert checkpoint.load_model(out / "ckpt.pt").config.dim == 32
    assert not list(out.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------------------
# Resume is exact, and tolerates a torn metrics file
# ---------------------------------------------------------------------------------------------------------


def test_interrupted_and_resumed_run_matches_uninterrupted_bit_for_bit(token_corpus, tmp_path):
    # Centering with running statistics (buffers) and momentum mode: the checkpoint must carry all of it.
    common = dict(center="qk,residual", centering_mode="momentum", lr_decay_iters=12)
    a, b = start(tiny_args(token_corpus, tmp_path / "a", max_iters=12, **common)), None
    ok(train(tiny_args(token_corpus, tmp_path / "b", max_iters=7, **common)))
    # A crash after the checkpoint may leave later rows behind, the last one cut off mid-line: resume drops them.
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 99, "loss": 0.0}) + "\n" + '{"step": 100, "lo')
    b = ok(train(["--out-dir", str(tmp_path / "b"), "--resume", "--max-iters", "12"]))
    assert "dropped 1 unreadable line" in b.stdout and "resuming" in b.stdout
    a.communicate(timeout=300)
    assert a.returncode == 0

    rows_a, rows_b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in rows_b] == list(range(1, 13))
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]  # exact equality, not closeness
    assert [r["lr"] for r in rows_a] == [r["lr"] for r in rows_b]
    val_a = {r["step"]: r["val_loss"] for r in rows_a if "val_loss" in r}
    val_b = {r["step"]: r["val_loss"] for r in rows_b if "val_loss" in r}
    assert set(val_a) == {5, 10, 12} and all(val_a[s] == val_b[s] for s in val_a)
    state_a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    state_b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["model"]
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


# ---------------------------------------------------------------------------------------------------------
# A run directory belongs to one run; signals
# ---------------------------------------------------------------------------------------------------------


def test_busy_directory_is_refused_and_a_killed_run_does_not_block_resume(token_corpus, tmp_path, capsys):
    # The second runs are this process (cli()): another process than the running one, as a second user's would be.
    out = tmp_path / "run"
    first = start(tiny_args(token_corpus, out, max_iters=100_000, eval_interval=100_000, warmup_iters=10))
    try:
        wait_for_rows(first, out, 3)
        listing = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "metrics.jsonl"}
        cli_error(
            tiny_args(token_corpus, out, max_iters=5),
            capsys,
            rf"{out} is in use by a running training run \(pid {first.pid} ",
        )
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "metrics.jsonl"} == listing
        (out / "run.lock").unlink()  # the lock holds without its file: the directory itself is locked
        cli_error(tiny_args(token_corpus, out, max_iters=5), capsys, f"{out} is in use by a running training run")
        del listing["run.lock"]
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "metrics.jsonl"} == listing
        first.send_signal(signal.SIGTERM)
        stdout, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stdout + stderr
    assert "SIGTERM received: stopping after the current step" in stdout and "--resume" in stdout
    ckpt = checkpoint.load(out / "ckpt.pt")
    assert ckpt["step"] >= 3 and ckpt["step"] == read_metrics(out)[-1]["step"] == ckpt["sampler"]["step"]

    # kill -9 (no clean-up at all) while it runs: the OS drops the lock, so --resume goes on.
    killed = start(["--out-dir", str(out), "--resume", "--max-iters", "100000"])
    wait_for_rows(killed, out, len(read_metrics(out)) + 2)
    killed.kill()
    killed.communicate(timeout=60)
    code, stdout, stderr = cli(["--out-dir", out, "--resume", "--max-iters", ckpt["step"] + 2], capsys)
    assert code == 0 and f"done: {ckpt['step'] + 2} steps" in stdout, stdout + stderr


def test_two_process_gloo_run_matches_single_process(token_corpus, tmp_path):
    # The processes also split the global batch differently: each runs its 8 windows as 4 micro-steps of 2
    # (the middle ones summed by the trainer's multi-tensor add, the last by autograd for DDP's all-reduce).
    args = dict(grad_accum_steps=4, max_iters=6, eval_interval=3, eval_iters=3)
    single = start(tiny_args(token_corpus, tmp_path / "single", **args))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TRAIN_PY)]
    result = subprocess.run(
        command + tiny_args(token_corpus, tmp_path / "ddp", micro_batch=2, **args),
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    single.communicate(timeout=300)
    assert result.returncode == 0 and single.returncode == 0, result.stdout + result.stderr
    assert "(4 x 2 sequences per process) on 2 x cpu" in result.stdout
    rows_single, rows_ddp = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert [r["step"] for r in rows_ddp] == [r["step"] for r in rows_single] == list(range(1, 7))
    # Same windows, same weights; only the order of the gradient sums differs (float32 rounding).
    np.testing.assert_allclose([r["loss"] for r in rows_ddp], [r["loss"] for r in rows_single], rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        [r["val_loss"] for r in rows_ddp if "val_loss" in r],
        [r["val_loss"] for r in rows_single if "val_loss" in r],
        atol=1e-5,
    )
    w_single = torch.load(tmp_path / "single" / "ckpt.pt", weights_only=True)["model"]
    w_ddp = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)["model"]
    # AdamW moves each weight by about lr per step whatever its gradient's size, so an element whose gradient is
    # near zero (an embedding row few windows touch) can move a few 1e-5 further from rounding alone: atol is a
    # thirtieth of one step (lr 3e-3), far below what a wrong gradient or a skipped all-reduce would do.
    for name in w_single:
        torch.testing.assert_close(w_ddp[name], w_single[name], rtol=1e-4, atol=1e-4)


def test_under_ddp_every_process_evaluates_and_saves_the_same_centering_statistics(token_corpus, tmp_path):
    # Each process updates its running means with its own micro-batches; they are averaged after every step, so
    # evaluation (each process takes some validation batches) and the checkpoint (rank 0's) use one set.
    stats = tmp_path / "stats"
    stats.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TRAIN_PY)]
    args = tiny_args(
        token_corpus,
        tmp_path / "ddp",
        grad_accum_steps=4,
        max_iters=4,
        eval_interval=2,
        eval_iters=4,
        center="qk,residual",
        centering_mode="momentum",
    )
    result = subprocess.run(
        command + args,
        env=env(FASTCENTER_INJECT="buffers_at_eval:0", FASTCENTER_INJECT_DIR=str(stats)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for n in (1, 2):  # evaluations at steps 2 and 4
        rank0, rank1 = (torch.load(stats / f"rank{r}-eval{n}.pt", weights_only=True) for r in (0, 1))
        assert rank0 and set(rank0) == set(rank1)
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), (n, name)
    # The reported validation loss is that of the checkpoint's statistics, on every validation batch.
    ckpt = checkpoint.load(tmp_path / "ddp" / "ckpt.pt")
    cfg = TrainConfig(**ckpt["config"]["train"])
    corpus = data.load_corpus(token_corpus, vocab_size=None, seq_len=cfg.seq_len)
    trainer = Trainer(
        checkpoint.model_from(ckpt), cfg, train_tokens=corpus.train, val_tokens=corpus.val, device=torch.device("cpu")
    )
    assert trainer.evaluate() == pytest.approx(read_metrics(tmp_path / "ddp")[-1]["val_loss"], rel=0, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Failures: divergence, a full disk, bad data, and every user error as one line
# ---------------------------------------------------------------------------------------------------------


def test_nonfinite_loss_stops_with_exit_1_and_keeps_the_last_good_checkpoint(token_corpus, tmp_path):
    # NaN from step 7 (training forwards 13 and 14, two micro-steps per step); logging every 4 steps, it is
    # noticed at step 8 and reported as step 7; the step-5 checkpoint must survive untouched.
    out = tmp_path / "run"
    result = train(
        tiny_args(token_corpus, out, max_iters=20, log_interval=4, eval_interval=5),
        FASTCENTER_INJECT="nan_from_forward:13",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "non-finite" in result.stderr and "step 7" in result.stderr and "untouched" in result.stderr
    assert "Traceback" not in result.stderr
    ckpt = checkpoint.load(out / "ckpt.pt")
    assert ckpt["step"] == 5 and all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert [r["step"] for r in read_metrics(out)] == [1, 4, 5]
    assert not list(out.glob("*.tmp"))


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(token_corpus, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_args(token_corpus, out, max_iters=10, eval_interval=5), FASTCENTER_INJECT="enospc_on_save:2")
    one_line_error(result, r"could not write the checkpoint .*No space left on device.*ckpt.pt is intact")
    assert checkpoint.load(out / "ckpt.pt")["step"] == 5 and not list(out.glob("*.tmp"))


def test_corrupt_data_is_refused_before_anything_is_written(token_corpus, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "val.bin").write_bytes((token_corpus / "val.bin").read_bytes())
    ids = np.fromfile(token_corpus / "train.bin", dtype="<u2")[:5000].copy()
    ids[1234] = 60000
    data.write_tokens(bad / "train.bin", ids)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "val.bin").write_bytes((token_corpus / "val.bin").read_bytes())
    (odd / "train.bin").write_bytes((token_corpus / "train.bin").read_bytes() + b"\x00")
    cases = {
        "id": (tiny_args(bad, tmp_path / "o1"), r"train\.bin: token id 60000 at position 1234"),
        "odd": (tiny_args(odd, tmp_path / "o2"), "odd byte count"),
        "vocab": (tiny_args(token_corpus, tmp_path / "o3", vocab_size=1000), "vocab_size 1000"),
        "short": (
            tiny_args(token_corpus, tmp_path / "o4", seq_len=200_000, max_seq_len=200_000),
            "too short for one training window",
        ),
    }
    # The first as a user runs it (a process of its own), the others through the same cli() in this process.
    user_argv, user_pattern = cases.pop("id")
    proc = start(user_argv)
    for argv, pattern in cases.values():
        cli_error(argv, capsys, pattern)
    one_line_error(finish(proc), user_pattern)
    for out in ("o1", "o2", "o3", "o4"):  # refused before the run directory is made
        assert not (tmp_path / out).exists(), out


def test_user_errors_are_one_line_with_exit_code_2(token_corpus, trained_run, tmp_path, capsys):
    done = _copy_run(trained_run, tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "ckpt.pt").write_bytes(b"")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "ckpt.pt").write_bytes((done / "ckpt.pt").read_bytes()[:1000])
    (tmp_path / "a_file").write_text("not a directory")
    # Each kind of mistake once (every flag's invalid values are covered in-process by test_training.py). Two run
    # as a user runs them, in a process of their own: a bad flag value (argparse) and a checkpoint that cannot be
    # read; the rest go through the same cli() in this process (no start-up of their own).
    as_a_user = [
        (tiny_args(token_corpus, tmp_path / "x", batch_size="many"), "--batch-size.*invalid int value"),
        (["--out-dir", str(tmp_path / "empty"), "--resume"], "--resume: .*ckpt.pt is empty"),
    ]
    in_process = [
        (tiny_args(token_corpus, tmp_path / "x", beta1=1.5), r"--beta1 must be a number in \[0, 1\), got 1.5"),
        (tiny_args(token_corpus, tmp_path / "x", norm_eps=-1), "--norm-eps must be a finite number >= 0"),
        (tiny_args(token_corpus, tmp_path / "x", grad_clip="nan"), "--grad-clip must be a finite number"),
        (tiny_args(token_corpus, tmp_path / "a_file"), "is a file, not a directory"),
        (tiny_args(token_corpus, done, max_iters=4), "ckpt.pt exists: pass --resume"),
        (["--out-dir", str(done), "--resume", "--dim", "64"], r"cannot change model field.*dim"),
        (["--out-dir", str(tmp_path / "corrupt"), "--resume"], "--resume: .*not a readable checkpoint"),
    ]
    procs = [start(argv) for argv, _ in as_a_user]  # at once: each fails within seconds
    for argv, pattern in in_process:
        cli_error(argv, capsys, pattern)
    for proc, (_, pattern) in zip(procs, as_a_user):
        one_line_error(finish(proc), pattern)
    assert not (tmp_path / "x").exists()  # refused before the run directory is made


def test_fused_without_gpu_says_so_and_the_demo_corpus_is_announced(tmp_path, gpt2_encoding):
    # --device cpu: what a machine without a GPU does, whatever this machine has. No --data: the demo corpus is
    # built from the stdlib (a few seconds) into a private cache; it needs the GPT-2 BPE (gpt2_encoding skips).
    argv = tiny_args(None, tmp_path / "run", fused=True, max_iters=2, batch_size=2, grad_accum_steps=1, eval_iters=1)
    result = ok(train(argv, FASTCENTER_CACHE=str(tmp_path / "cache")))
    assert "fused ops run their CPU implementation (fastcenter/ops/<family>.py)" in result.stdout
    assert "No --data given" in result.stdout and "Python standard library" in result.stdout
    assert str(tmp_path / "cache") in result.stdout
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["fused"] is True
    meta = json.loads(pathlib.Path(config["run"]["data_dir"], "meta.json").read_text())
    assert meta["train_tokens"] > 5_000_000  # the whole stdlib, not a sample


# ---------------------------------------------------------------------------------------------------------
# Writes the system refuses: a file-size limit (RLIMIT_FSIZE: the real kernel behaviour, no mock)
# ---------------------------------------------------------------------------------------------------------


def _file_size_limit(n_bytes: int):
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="RLIMIT_FSIZE is POSIX")
def test_a_file_size_limit_while_writing_the_checkpoint_or_a_metrics_line_is_one_line(token_corpus, tmp_path):
    # The tiny model's checkpoint is ~20 MB: a 1 MB limit refuses it at the first evaluation; 3000 bytes let
    # config.json through and stop metrics.jsonl after a dozen rows. (Python ignores SIGXFSZ, so a write past
    # the limit fails with EFBIG instead of killing the process; torch.save hides that behind a RuntimeError.)
    cases = {
        "ckpt": (
            1 << 20,
            dict(max_iters=6, eval_interval=5),
            r"could not write the checkpoint .*ckpt\.pt: File too "
            r"large \(a file-size limit, ulimit -f.*no checkpoint was written",
        ),
        "metrics": (3000, dict(max_iters=40, eval_interval=100), r"could not write .*metrics\.jsonl: File too large"),
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(TRAIN_PY)] + tiny_args(token_corpus, tmp_path / name, **args),
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_file_size_limit(limit),  # noqa: PLW1509 -- only setrlimit, before exec
        )
        for name, (limit, args, _) in cases.items()
    }
    for name, proc in procs.items():
        one_line_error(finish(proc, timeout=300), cases[name][2])
        assert not list((tmp_path / name).glob("*.fastcenter-tmp")), name


# ---------------------------------------------------------------------------------------------------------
# In-process: train.py's cli() on damaged checkpoints, other corpora and other user errors (fast: no start-up)
# ---------------------------------------------------------------------------------------------------------


def _resave(path, mutate) -> None:
    ckpt = torch.load(path, weights_only=True)
    mutate(ckpt)
    torch.save(ckpt, path)


DAMAGED_FIELDS = {
    "weights of another shape": (
        lambda c: c["model"].__setitem__("tok_emb.weight", torch.zeros(10, 32)),
        "does not fit this model.*size mismatch for tok_emb.weight",
    ),
    "a weight missing": (
        lambda c: c["model"].pop("norm.weight"),
        'does not fit this model.*Missing key.*"norm.weight"',
    ),
    "NaN weights": (lambda c: c["model"]["norm.weight"].fill_(float("nan")), "norm.weight holds NaN or inf"),
    "another format version": (
        lambda c: c.__setitem__("format", "fastcenter.train/2"),
        "another version of fastcenter",
    ),
    "a train field from a newer version": (
        lambda c: c["config"]["train"].__setitem__("warmup_ratio", 0.1),
        r"train field\(s\) \['warmup_ratio'\] this version does not know",
    ),
    "a model field from a newer version": (
        lambda c: c["config"]["model"].__setitem__("qk_norm", True),
        r"model config is not valid \(unknown GPTConfig field",
    ),
    "a step that is text": (lambda c: c.__setitem__("step", "2"), "'step' is not a step count"),
    "a negative step": (lambda c: c.__setitem__("step", -1), "'step' is not a step count"),
    "a sampler at another step": (lambda c: c["sampler"].__setitem__("step", 7), "sampler is at step 7"),
    "RNG states missing": (lambda c: c.__setitem__("rng", {}), "'rng' is not a set of RNG states"),
    "an RNG state of another kind": (
        lambda c: c["rng"].__setitem__("torch", torch.zeros(3)),
        "does not fit this model",
    ),
    "no optimizer state": (lambda c: c.__setitem__("optimizer", {}), "'optimizer' is not an optimizer state"),
    "optimizer moments of another shape": (
        lambda c: c["optimizer"]["state"][0].__setitem__("exp_avg", torch.zeros(3)),
        "optimizer state 'exp_avg' does not fit",
    ),
    "an optimizer group too many": (
        lambda c: c["optimizer"]["param_groups"].append(c["optimizer"]["param_groups"][0]),
        "does not fit this model",
    ),
    "a train config that is a list": (lambda c: c["config"].__setitem__("train", [1]), "config has no train part"),
    "an invalid train value": (
        lambda c: c["config"]["train"].__setitem__("lr", "abc"),
        "holds an invalid train config",
    ),
    "a val loss that is text": (lambda c: c.__setitem__("val_loss", "low"), "'val_loss' is not a finite loss"),
    "a fractional token id": (lambda c: c.__setitem__("token_ids", [1, 2.5]), r"token_ids\[1\] = 2.5 is not"),
    "weights that are not a dict": (lambda c: c.__setitem__("model", [1]), "'model' is not a dict of named tensors"),
}


@pytest.mark.parametrize("damage", DAMAGED_FIELDS, ids=list(DAMAGED_FIELDS))
def test_a_damaged_or_foreign_checkpoint_is_one_line_and_left_as_it_was(trained_run, tmp_path, capsys, damage):
    out = _copy_run(trained_run, tmp_path)
    mutate, pattern = DAMAGED_FIELDS[damage]
    _resave(out / "ckpt.pt", mutate)
    before = (out / "ckpt.pt").read_bytes()
    cli_error(["--out-dir", out, "--resume", "--max-iters", 3], capsys, pattern)
    assert (out / "ckpt.pt").read_bytes() == before


def test_a_checkpoint_with_damaged_bytes_or_not_an_archive_is_refused(trained_run, tmp_path, capsys):
    out = _copy_run(trained_run, tmp_path)
    raw = (out / "ckpt.pt").read_bytes()
    # One byte flipped inside a tensor record: torch.load reads it as another weight without a word.
    with zipfile.ZipFile(out / "ckpt.pt") as archive:
        member = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 1000)
    inside = member.header_offset + 30 + len(member.filename) + len(member.extra) + member.file_size // 2
    damaged = bytearray(raw)
    damaged[inside] ^= 0x10
    (out / "ckpt.pt").write_bytes(bytes(damaged))
    cli_error(["--out-dir", out, "--resume", "--max-iters", 3], capsys, f"is damaged: its member {member.filename}")
    assert (out / "ckpt.pt").read_bytes() == bytes(damaged)  # refused, not rewritten with a valid checksum
    legacy = io.BytesIO()
    torch.save(torch.load(trained_run / "ckpt.pt", weights_only=True), legacy, _use_new_zipfile_serialization=False)
    (out / "ckpt.pt").write_bytes(legacy.getvalue())
    cli_error(["--out-dir", out, "--resume"], capsys, "not a readable checkpoint.*not a zip archive")


def test_a_first_ctrl_c_before_training_is_not_called_the_second(token_corpus, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # what Python's SIGINT handler raises before the run installs its own

    monkeypatch.setattr(data, "open_tokens", interrupted)
    code, _, err = cli(tiny_args(token_corpus, tmp_path / "run"), capsys)
    assert code == 130 and "second" not in err and "starting or finishing" in err and err.count("\n") == 1


def test_a_micro_batch_that_does_not_divide_the_batch_is_one_line_before_the_run_starts(token_corpus, tmp_path, capsys):
    cli_error(tiny_args(token_corpus, tmp_path / "run", micro_batch=3), capsys, r"--micro-batch 3 must divide the 8")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("variable", ["FASTCENTER_BACKEND", "FASTCENTER_CHECKS"])
def test_an_unknown_environment_value_is_one_line_before_anything_runs(
    token_corpus, tmp_path, capsys, monkeypatch, variable
):
    monkeypatch.setenv(variable, "bogus")
    cli_error(
        tiny_args(token_corpus, tmp_path / "run"), capsys, rf"environment variable {variable}='bogus' is not one of"
    )
    assert not (tmp_path / "run").exists()


def test_an_offline_machine_without_the_tokenizer_fails_at_once_naming_tiktoken_cache_dir(
    tmp_path, capsys, monkeypatch
):
    # No --data: the demo corpus needs GPT-2's BPE, which is not cached here and cannot be downloaded (every
    # connection fails, as on a machine whose network drops packets). tiktoken would wait forever; the run fails
    # in one line, having tried the download host once, with a timeout.
    import socket

    import tiktoken

    attempts = []

    def unreachable(address, timeout=None, *args, **kwargs):
        attempts.append((address, timeout))
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: pytest.fail("tiktoken would download with no timeout"))
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("FASTCENTER_CACHE", str(tmp_path / "cache"))
    argv = tiny_args(None, tmp_path / "run", max_iters=1)
    cli_error(argv, capsys, r"'r50k_base' encoding .* not cached .*cannot be reached .*TIKTOKEN_CACHE_DIR")
    assert [host for (host, _), _ in attempts] == ["openaipublic.blob.core.windows.net"]
    assert all(0 < timeout <= data.NETWORK_TIMEOUT_S for _, timeout in attempts)
    assert not (tmp_path / "run").exists()


def test_a_model_too_large_to_allocate_is_one_line(token_corpus, tmp_path, capsys):
    for flags, pattern in [
        (dict(max_seq_len=10**12), r"needs at least .* GiB .*RoPE tables of --max-seq-len 1000000000000.*reduce"),
        (dict(max_seq_len=2**62), r"needs at least .*RoPE tables of --max-seq-len 4611686018427387904"),
        (dict(dim=2**20, n_heads=2, max_seq_len=16), r"needs at least .* GiB .*reduce --max-seq-len, --dim"),
    ]:
        cli_error(tiny_args(token_corpus, tmp_path / "run", **flags), capsys, pattern)
    assert not (tmp_path / "run").exists()


def _compact_corpus(path, words: str, monkeypatch):
    """A compacted corpus made without a tokenizer (bytes as GPT-2 ids), big enough for the tiny runs."""
    monkeypatch.setattr(
        data,
        "_encode_documents",
        lambda texts: [np.array([1000 + b for b in t.encode()] + [data.EOT_TOKEN], dtype=np.uint16) for t in texts],
    )
    src = path.parent / f"{path.name}-text"
    src.mkdir(parents=True)
    for i in range(4):
        (src / f"{i}.txt").write_text(f"{words} {i} " * 300)
    data.prepare([src], path, val_fraction=0.3, compact_vocab=True, log=lambda s: None)
    monkeypatch.undo()
    return path


def test_resume_refuses_another_corpus_given_by_flag(token_corpus, tmp_path, capsys, monkeypatch):
    a = _compact_corpus(tmp_path / "a", "the same words", monkeypatch)
    b = _compact_corpus(tmp_path / "b", "the other words", monkeypatch)
    run = tmp_path / "run"
    assert cli(tiny_args(a, run, max_iters=2), capsys)[0] == 0
    before = (run / "ckpt.pt").read_bytes()
    remapped = tmp_path / "remapped"  # a's token files under another mapping
    shutil.copytree(a, remapped)
    meta = json.loads((a / "meta.json").read_text())
    meta["token_ids"] = [i - 1 for i in meta["token_ids"]]
    (remapped / "meta.json").write_text(json.dumps(meta))
    for other, what in [(b, r"train\.bin holds"), (remapped, "the vocabulary")]:
        cli_error(
            ["--out-dir", run, "--resume", "--max-iters", 3, "--data", other],
            capsys,
            f"--resume: {other} is not the corpus .*ckpt.pt was trained on.*{what}",
        )
        assert (run / "ckpt.pt").read_bytes() == before
    code, out, _ = cli(["--out-dir", run, "--resume", "--max-iters", 3, "--data", a], capsys)
    assert code == 0 and "done: 3 steps" in out


def test_resume_from_another_directory_trains_on_the_runs_own_corpus(token_corpus, tmp_path, capsys, monkeypatch):
    # --data given relative; the resumed run starts where the same relative path names another corpus.
    (tmp_path / "first").mkdir()
    shutil.copytree(token_corpus, tmp_path / "first" / "corpus")
    _compact_corpus(tmp_path / "second" / "corpus", "another corpus", monkeypatch)
    monkeypatch.chdir(tmp_path / "first")
    assert cli(tiny_args("corpus", tmp_path / "run", max_iters=2), capsys)[0] == 0
    monkeypatch.chdir(tmp_path / "second")
    code, _, err = cli(["--out-dir", tmp_path / "run", "--resume", "--max-iters", 3], capsys)
    assert code == 0, err
    used = json.loads((tmp_path / "run" / "config.json").read_text())["run"]["data_dir"]
    assert used == str((tmp_path / "first" / "corpus").resolve())


def test_resume_refuses_a_corpus_whose_files_changed_under_the_same_name(trained_run, tmp_path, capsys):
    out = _copy_run(trained_run, tmp_path)
    corpus = tmp_path / "corpus"
    shutil.copytree(json.loads((out / "config.json").read_text())["run"]["data_dir"], corpus)
    _resave(out / "ckpt.pt", lambda c: c["config"]["train"].__setitem__("data", str(corpus)))
    ids = np.fromfile(corpus / "val.bin", dtype="<u2")
    data.write_tokens(corpus / "val.bin", np.roll(ids, 1))  # the same tokens in another order
    cli_error(["--out-dir", out, "--resume", "--max-iters", 3], capsys, r"is not the corpus .*val\.bin holds")


def test_a_checkpoint_from_before_corpus_identities_resumes_with_a_note(trained_run, tmp_path, capsys, monkeypatch):
    out = _copy_run(trained_run, tmp_path)
    _resave(out / "ckpt.pt", lambda c: c.pop("data"))
    code, stdout, err = cli(["--out-dir", out, "--resume", "--max-iters", 3], capsys)
    assert code == 0 and "predates corpus identities" in stdout and "done: 3 steps" in stdout, err
    assert "data" in torch.load(out / "ckpt.pt", weights_only=True)  # the new checkpoint has one
    # Its compacted mapping, if it has one, is still checked.
    compact = _compact_corpus(tmp_path / "compact", "some words", monkeypatch)
    assert cli(tiny_args(compact, tmp_path / "run2", max_iters=2), capsys)[0] == 0
    _resave(tmp_path / "run2" / "ckpt.pt", lambda c: (c.pop("data"), c.__setitem__("token_ids", c["token_ids"][1:])))
    cli_error(["--out-dir", tmp_path / "run2", "--resume", "--max-iters", 3], capsys, "the vocabulary .* differs")
