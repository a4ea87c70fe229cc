"""train.py as a user runs it (a subprocess each time): learning, exact resume, DDP = one process, the run
directory owned by one run, signals, divergence, a full disk, and every user error as one line with exit code 2.

Tiny models on the synthetic corpus (tests/helpers.py): nothing here needs ../shared or a tokenizer, except the
demo-corpus test, which skips without the GPT-2 BPE. The training core itself is tested in test_training.py.
"""

import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from fastcenter import checkpoint, data

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "train.py"
INJECT = pathlib.Path(__file__).resolve().parent / "inject"
LN_V = math.log(50257)


def tiny_args(data_dir, out_dir, **overrides) -> list[str]:
    """Command-line flags of a tiny run; keyword arguments override (True/False -> --flag/--no-flag, None -> absent)."""
    args = dict(
        data=data_dir, out_dir=out_dir, batch_size=4, grad_accum_steps=2, seq_len=16, dim=32, n_layers=2,
        n_heads=2, lr=3e-3, warmup_iters=2, eval_interval=5, eval_iters=2, log_interval=1, max_iters=10,
        seed=torch.initial_seed() % 2**31,  # the test's fresh seed (conftest): new init and data order each run
        device="cpu",  # CPU tests, also on a GPU machine (exactness and the DDP comparison need one device)
    )  # fmt: skip
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
    return subprocess.run([sys.executable, str(TRAIN_PY)] + argv, env=env(**extra_env), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def start(argv, **extra_env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TRAIN_PY)] + argv, env=env(**extra_env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


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


# ---------------------------------------------------------------------------------------------------------
# A real run
# ---------------------------------------------------------------------------------------------------------


def test_loss_falls_and_the_run_directory_is_complete(token_corpus, tmp_path):
    out = tmp_path / "run"
    result = ok(train(tiny_args(token_corpus, out, batch_size=8, grad_accum_steps=1, seq_len=32, lr=1e-2,
                                warmup_iters=10, max_iters=60, eval_interval=30, eval_iters=4, log_interval=10)))  # fmt: skip
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


def test_busy_directory_is_refused_and_a_killed_run_does_not_block_resume(token_corpus, tmp_path):
    out = tmp_path / "run"
    first = start(tiny_args(token_corpus, out, max_iters=100_000, eval_interval=100_000, warmup_iters=10))
    try:
        wait_for_rows(first, out, 3)
        listing = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "metrics.jsonl"}
        second = train(tiny_args(token_corpus, out, max_iters=5))
        one_line_error(second, rf"{out} is in use by a running training run \(pid {first.pid} ")
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
    result = ok(train(["--out-dir", str(out), "--resume", "--max-iters", str(ckpt["step"] + 2)]))
    assert f"done: {ckpt['step'] + 2} steps" in result.stdout


def test_two_process_gloo_run_matches_single_process(token_corpus, tmp_path):
    args = dict(grad_accum_steps=4, max_iters=6, eval_interval=3, eval_iters=3)
    single = start(tiny_args(token_corpus, tmp_path / "single", **args))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TRAIN_PY)]
    result = subprocess.run(command + tiny_args(token_corpus, tmp_path / "ddp", **args), env=env(),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    single.communicate(timeout=300)
    assert result.returncode == 0 and single.returncode == 0, result.stdout + result.stderr
    assert "2 x cpu" in result.stdout
    rows_single, rows_ddp = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert [r["step"] for r in rows_ddp] == [r["step"] for r in rows_single] == list(range(1, 7))
    # Same windows, same weights; only the order of the gradient sums differs (float32 rounding).
    np.testing.assert_allclose([r["loss"] for r in rows_ddp], [r["loss"] for r in rows_single], rtol=0, atol=1e-5)
    np.testing.assert_allclose([r["val_loss"] for r in rows_ddp if "val_loss" in r],
                               [r["val_loss"] for r in rows_single if "val_loss" in r], atol=1e-5)  # fmt: skip
    w_single = torch.load(tmp_path / "single" / "ckpt.pt", weights_only=True)["model"]
    w_ddp = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)["model"]
    for name in w_single:
        torch.testing.assert_close(w_ddp[name], w_single[name], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Failures: divergence, a full disk, bad data, and every user error as one line
# ---------------------------------------------------------------------------------------------------------


def test_nonfinite_loss_stops_with_exit_1_and_keeps_the_last_good_checkpoint(token_corpus, tmp_path):
    # NaN from step 7 (training forwards 13 and 14, two micro-steps per step); logging every 4 steps, it is
    # noticed at step 8 and reported as step 7; the step-5 checkpoint must survive untouched.
    out = tmp_path / "run"
    result = train(tiny_args(token_corpus, out, max_iters=20, log_interval=4, eval_interval=5),
                   FASTCENTER_INJECT="nan_from_forward:13")  # fmt: skip
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


def test_corrupt_data_is_refused_before_anything_is_written(token_corpus, tmp_path):
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
        "short": (tiny_args(token_corpus, tmp_path / "o4", seq_len=200_000, max_seq_len=200_000),
                  "too short for one training window"),
    }  # fmt: skip
    procs = {name: start(argv) for name, (argv, _) in cases.items()}  # at once: each fails within seconds
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), cases[name][1])
    for out in ("o1", "o2", "o3", "o4"):  # refused before the run directory is made
        assert not (tmp_path / out).exists(), out


def test_user_errors_are_one_line_with_exit_code_2(token_corpus, tmp_path):
    done = tmp_path / "done"
    ok(train(tiny_args(token_corpus, done, max_iters=2)))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "ckpt.pt").write_bytes(b"")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "ckpt.pt").write_bytes((done / "ckpt.pt").read_bytes()[:1000])
    (tmp_path / "a_file").write_text("not a directory")
    # Each kind of mistake once (every flag's invalid values are covered in-process by test_training.py).
    cases = [
        (tiny_args(token_corpus, tmp_path / "x", beta1=1.5), r"--beta1 must be a number in \[0, 1\), got 1.5"),
        (tiny_args(token_corpus, tmp_path / "x", norm_eps=-1), "--norm-eps must be a finite number >= 0"),
        (tiny_args(token_corpus, tmp_path / "x", grad_clip="nan"), "--grad-clip must be a finite number"),
        (tiny_args(token_corpus, tmp_path / "x", batch_size="many"), "--batch-size.*invalid int value"),
        (tiny_args(token_corpus, tmp_path / "a_file"), "is a file, not a directory"),
        (tiny_args(token_corpus, done, max_iters=4), "ckpt.pt exists: pass --resume"),
        (["--out-dir", str(done), "--resume", "--dim", "64"], r"cannot change model field.*dim"),
        (["--out-dir", str(tmp_path / "empty"), "--resume"], "--resume: .*ckpt.pt is empty"),
        (["--out-dir", str(tmp_path / "corrupt"), "--resume"], "--resume: .*not a readable checkpoint"),
    ]  # fmt: skip
    procs = [start(argv) for argv, _ in cases]  # at once: each fails within seconds
    for proc, (argv, pattern) in zip(procs, cases):
        stdout, stderr = proc.communicate(timeout=600)
        one_line_error(subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr), pattern)
    assert not (tmp_path / "x").exists()  # refused before the run directory is made


def test_fused_without_gpu_says_so_and_the_demo_corpus_is_announced(tmp_path, gpt2_encoding):
    # --device cpu: what a machine without a GPU does, whatever this machine has. No --data: the demo corpus is
    # built from the stdlib (a few seconds) into a private cache; it needs the GPT-2 BPE (gpt2_encoding skips).
    argv = tiny_args(None, tmp_path / "run", fused=True, max_iters=2, batch_size=2, grad_accum_steps=1, eval_iters=1)
    result = ok(train(argv, FASTCENTER_CACHE=str(tmp_path / "cache")))
    assert "fused ops run their CPU implementation" in result.stdout
    assert "No --data given" in result.stdout and "Python standard library" in result.stdout
    assert str(tmp_path / "cache") in result.stdout
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["fused"] is True
    meta = json.loads(pathlib.Path(config["run"]["data_dir"], "meta.json").read_text())
    assert meta["train_tokens"] > 5_000_000  # the whole stdlib, not a sample
