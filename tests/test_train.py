"""train.py: learning on real text, exact resume, DDP = one process, divergence, signals, fallbacks, refusals.

Tiny models (dim 32, 2 layers) on a few Shakespeare plays, reference ops (fused=False: the fused-vs-reference
equivalence is tested with the model). Runs are in-process through `train.main(argv)` where possible, and in
subprocesses where the real command line matters (torchrun, SIGTERM, the CPU fallback of --fused).
"""

import importlib.util
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import SHARED
from fastcenter import data
from fastcenter.data import DataError
from fastcenter.model import GPT, GPTConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "train.py"
PLAYS = ["macbeth.txt", "tempest.txt", "julius_caesar.txt", "sonnets.txt"]
LN_V = math.log(50257)


def _import_train():
    """train.py is a script at the repository root, not part of the package: import it by path."""
    if "train" in sys.modules and getattr(sys.modules["train"], "__file__", None) == str(TRAIN_PY):
        return sys.modules["train"]
    spec = importlib.util.spec_from_file_location("train", TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


train = _import_train()


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    out = tmp_path_factory.mktemp("shakespeare")
    data.prepare([SHARED / "corpora" / "shakespeare" / p for p in PLAYS], out, val_fraction=0.2, log=lambda s: None)
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_args(data_dir, out_dir, **overrides) -> list[str]:
    """Command-line flags of a tiny run; keyword arguments override (True/False -> --flag/--no-flag, None -> absent)."""
    args = dict(
        data=data_dir, out_dir=out_dir, batch_size=4, grad_accum_steps=2, seq_len=16, dim=32, n_layers=2,
        n_heads=2, lr=3e-3, warmup_iters=2, eval_interval=5, eval_iters=2, log_interval=1, max_iters=10,
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


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def subprocess_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    env.pop("TRITON_INTERPRET", None)  # conftest sets it for the kernels; a user's shell would not
    return env


# ---------------------------------------------------------------------------------------------------------
# A real run: the loss falls, and the run directory holds what it should
# ---------------------------------------------------------------------------------------------------------


def test_loss_falls_on_shakespeare_and_run_directory_is_complete(shakespeare, tmp_path):
    out = tmp_path / "run"
    summary = train.main(
        tiny_args(shakespeare, out, batch_size=8, grad_accum_steps=1, seq_len=32, lr=1e-2, warmup_iters=10,
                  max_iters=60, eval_interval=30, eval_iters=4, log_interval=10)
    )
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    for r in rows:
        assert {"step", "loss", "lr", "tokens_per_sec", "peak_mem_mb"} <= set(r)
        assert r["tokens_per_sec"] > 0 and r["peak_mem_mb"] > 0 and math.isfinite(r["loss"])
    assert [r["step"] for r in rows if "val_loss" in r] == [30, 60]
    # From ln(V) = 10.8 at init to well below (about 6.5 train / 7.5 validation here): a real drop on real text.
    assert np.mean([r["loss"] for r in rows[-3:]]) < LN_V - 3.0, rows
    assert rows[-1]["val_loss"] < LN_V - 2.5, rows
    assert rows[-1]["val_loss"] < rows[2]["val_loss"], rows  # still improving on held-out plays
    assert summary["step"] == 60 and summary["val_loss"] == rows[-1]["val_loss"]

    config = json.loads((out / "config.json").read_text())
    assert config["model"]["dim"] == 32 and config["model"]["fused"] is False
    assert config["train"]["max_iters"] == 60 and config["train"]["lr"] == 1e-2
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The checkpoint: the documented keys, plain enough for weights_only loading, and sample.py reads it.
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert {"format", "model", "optimizer", "scaler", "step", "config", "rng", "sampler", "val_loss"} <= set(ckpt)
    assert ckpt["step"] == 60 and ckpt["sampler"]["step"] == 60
    assert GPTConfig.from_dict(ckpt["config"]["model"]) == GPTConfig.from_dict(config["model"])
    model = GPT(GPTConfig.from_dict(ckpt["config"]["model"]))
    model.load_state_dict(ckpt["model"])
    from fastcenter import sample

    loaded = sample.load_model(str(out / "ckpt.pt"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert not list(out.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------------------
# Resume is exact
# ---------------------------------------------------------------------------------------------------------


def test_interrupted_and_resumed_run_matches_uninterrupted_bit_for_bit(shakespeare, tmp_path):
    # Centering with running statistics (buffers) and momentum mode: the checkpoint must carry all of it.
    common = dict(center="qk,residual", centering_mode="momentum", lr_decay_iters=12)
    train.main(tiny_args(shakespeare, tmp_path / "a", max_iters=12, **common))
    train.main(tiny_args(shakespeare, tmp_path / "b", max_iters=7, **common))
    # A crash after the checkpoint may leave later rows behind: resume cuts them.
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 99, "loss": 0.0}) + "\n")
    train.main(["--out-dir", str(tmp_path / "b"), "--resume", "--max-iters", "12"])

    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 13))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # exact equality, not closeness
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    val_a = {r["step"]: r["val_loss"] for r in a if "val_loss" in r}
    val_b = {r["step"]: r["val_loss"] for r in b if "val_loss" in r}
    assert set(val_a) == {5, 10, 12} and all(val_a[s] == val_b[s] for s in val_a)
    assert len(set(r["loss"] for r in a)) > 1

    state_a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    state_b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["model"]
    assert any("running_mean" in k for k in state_a)
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


def test_resume_and_fresh_start_refusals(shakespeare, tmp_path):
    train.main(tiny_args(shakespeare, tmp_path / "run", max_iters=2))
    with pytest.raises(train.UsageError, match="cannot change model field.*dim"):
        train.main(["--out-dir", str(tmp_path / "run"), "--resume", "--dim", "64"])
    with pytest.raises(train.UsageError, match="--seed cannot change"):
        train.main(["--out-dir", str(tmp_path / "run"), "--resume", "--seed", str(2**31 + 5)])
    with pytest.raises(train.UsageError, match="ckpt.pt exists: pass --resume"):
        train.main(tiny_args(shakespeare, tmp_path / "run", max_iters=2))
    with pytest.raises(train.UsageError, match="no checkpoint"):
        train.main(["--out-dir", str(tmp_path / "nothing"), "--resume"])


# ---------------------------------------------------------------------------------------------------------
# DDP over two processes = one process, same global batch
# ---------------------------------------------------------------------------------------------------------


def test_two_process_gloo_run_matches_single_process(shakespeare, tmp_path):
    args = dict(grad_accum_steps=4, max_iters=6, eval_interval=3, eval_iters=3)
    train.main(tiny_args(shakespeare, tmp_path / "single", **args))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TRAIN_PY)]
    result = subprocess.run(
        command + tiny_args(shakespeare, tmp_path / "ddp", **args),
        env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 x cpu" in result.stdout
    single, ddp = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == list(range(1, 7))
    # Same windows, same weights; only the order of the gradient sums differs (float32 rounding).
    np.testing.assert_allclose([r["loss"] for r in ddp], [r["loss"] for r in single], rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        [r["val_loss"] for r in ddp if "val_loss" in r], [r["val_loss"] for r in single if "val_loss" in r], atol=1e-5
    )
    w_single = torch.load(tmp_path / "single" / "ckpt.pt", weights_only=True)["model"]
    w_ddp = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)["model"]
    for name in w_single:
        torch.testing.assert_close(w_ddp[name], w_single[name], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Failure handling
# ---------------------------------------------------------------------------------------------------------


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(shakespeare, tmp_path, monkeypatch, capsys):
    # The loss turns NaN in step 7 (training forwards 13 and 14, two micro-steps per step). Logging every 4
    # steps, it is noticed at step 8, and reported as step 7; the step-5 checkpoint must survive untouched.
    original_forward = GPT.forward
    calls = {"train": 0}

    def forward(self, idx, targets=None):
        loss = original_forward(self, idx, targets)
        if self.training:
            calls["train"] += 1
            if calls["train"] >= 13:
                loss = loss * float("nan")
        return loss

    monkeypatch.setattr(GPT, "forward", forward)
    out = tmp_path / "run"
    code = train.cli(tiny_args(shakespeare, out, max_iters=20, log_interval=4, eval_interval=5))
    err = capsys.readouterr().err
    assert code == 1
    assert "non-finite" in err and "step 7" in err and "untouched" in err, err
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 5
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert [r["step"] for r in read_metrics(out)] == [4, 5]
    assert not list(out.glob("*.tmp"))


def test_sigterm_mid_run_leaves_a_loadable_checkpoint(shakespeare, tmp_path):
    out = tmp_path / "run"
    argv = tiny_args(shakespeare, out, max_iters=100_000, eval_interval=100_000, warmup_iters=10)
    proc = subprocess.Popen(
        [sys.executable, str(TRAIN_PY)] + argv, env=subprocess_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        metrics = out / "metrics.jsonl"
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout + stderr
    assert "SIGTERM received" in stdout and "--resume" in stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    rows = read_metrics(out)
    assert ckpt["step"] >= 3 and ckpt["step"] == rows[-1]["step"] == ckpt["sampler"]["step"]
    # It resumes from there.
    summary = train.main(["--out-dir", str(out), "--resume", "--max-iters", str(ckpt["step"] + 2)])
    assert summary["step"] == ckpt["step"] + 2 and summary["stopped_by"] is None


def test_fused_without_gpu_falls_back_loudly_and_demo_corpus_is_announced(tmp_path):
    # --device cpu (tiny_args): what a machine without a GPU does, whatever this machine has. No --data:
    # the demo corpus is built from the stdlib (a few seconds) into a private cache.
    argv = tiny_args(None, tmp_path / "run", fused=True, max_iters=2, batch_size=2, grad_accum_steps=1, eval_iters=1)
    result = subprocess.run(
        [sys.executable, str(TRAIN_PY)] + argv, env=subprocess_env(FASTCENTER_CACHE=str(tmp_path / "cache")),
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "fused Triton kernels need a CUDA GPU" in out and "TRITON_INTERPRET=1" in out
    assert "training with the reference ops instead (fused=False)" in out
    assert "No --data given" in out and "Python standard library" in out and str(tmp_path / "cache") in out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["fused"] is False
    meta = json.loads(pathlib.Path(config["run"]["data_dir"], "meta.json").read_text())
    assert meta["train_tokens"] > 5_000_000  # the whole stdlib, not a sample


def test_corrupt_data_is_refused_before_training(shakespeare, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "val.bin").write_bytes((shakespeare / "val.bin").read_bytes())
    ids = np.fromfile(shakespeare / "train.bin", dtype="<u2")[:5000].copy()
    ids[1234] = 60000
    data.write_tokens(bad / "train.bin", ids)
    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"train\.bin: token id 60000 at position 1234"):
        train.main(tiny_args(bad, out))
    assert not out.exists()  # nothing built or written

    (bad / "train.bin").write_bytes((shakespeare / "train.bin").read_bytes() + b"\x00")
    assert train.cli(tiny_args(bad, out)) == 2
    assert "odd byte count" in capsys.readouterr().err
    # A vocabulary smaller than the data's ids is a mismatch, caught the same way.
    with pytest.raises(DataError, match="vocab_size 1000"):
        train.main(tiny_args(shakespeare, out, vocab_size=1000))
    with pytest.raises(DataError, match="too short for one training window"):
        train.main(tiny_args(shakespeare, out, seq_len=200_000, max_seq_len=200_000))
    assert not out.exists()


def test_checkpoint_write_is_atomic(tmp_path):
    """train.py writes ckpt.pt through data.atomic_write: a failing write leaves the old file whole."""
    path = tmp_path / "ckpt.pt"
    data.atomic_write(path, lambda f: torch.save({"step": 1}, f))
    before = path.read_bytes()

    def failing_save(f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        data.atomic_write(path, failing_save)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]
    assert torch.load(path, weights_only=True) == {"step": 1}


# ---------------------------------------------------------------------------------------------------------
# Command line, schedule, MFU table
# ---------------------------------------------------------------------------------------------------------


def test_every_config_field_is_a_flag():
    parser = train.build_parser()
    options = {s for action in parser._actions for s in action.option_strings}
    import dataclasses

    for cls in (train.TrainConfig, GPTConfig):
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            assert flag in options, flag
            if isinstance(f.default, bool):
                assert "--no-" + f.name.replace("_", "-") in options
    cfg, model_cfg, ckpt, notes = train.resolve_configs(
        ["--center", "mlp,embeddings,qk,v,residual", "--centering-mode", "causal", "--no-fused", "--mlp-hidden",
         "none", "--seq-len", "1024", "--grad-accum-steps", "8", "--lr", "2e-4", "--compile", "--dtype", "float16"]
    )
    assert model_cfg.center == ("embeddings", "mlp", "qk", "residual", "v")
    assert model_cfg.centering_mode == "causal" and model_cfg.fused is False and model_cfg.mlp_hidden is None
    assert model_cfg.max_seq_len == 1024 and any("max_seq_len" in n for n in notes)  # raised to fit seq_len
    assert cfg.grad_accum_steps == 8 and cfg.lr == 2e-4 and cfg.compile and cfg.dtype == "float16"
    assert ckpt is None
    # Defaults are the seed's.
    cfg, model_cfg, _, _ = train.resolve_configs([])
    assert (cfg.batch_size, cfg.grad_accum_steps, cfg.seq_len, cfg.max_iters) == (16, 4, 512, 50_000)
    assert (cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.grad_clip) == (0.9, 0.95, 0.1, 1.0)
    assert (model_cfg.dim, model_cfg.n_layers, model_cfg.n_heads, model_cfg.max_seq_len) == (256, 4, 4, 512)
    with pytest.raises(train.UsageError, match="exceeds --max-seq-len"):
        train.resolve_configs(["--seq-len", "1024", "--max-seq-len", "512"])
    with pytest.raises(train.UsageError, match="--batch-size must be >= 1"):
        train.resolve_configs(["--batch-size", "0"])
    with pytest.raises(SystemExit):
        train.resolve_configs(["--device", "tpu"])


def test_learning_rate_schedule():
    cfg = train.TrainConfig(lr=1e-3, min_lr_ratio=0.1, warmup_iters=10, max_iters=110)
    lrs = [train.learning_rate(s, cfg) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup to the peak
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # half-way down the cosine
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:110]))
    assert lrs[110:] == [pytest.approx(1e-4)] * 10
    decay = train.TrainConfig(lr=1e-3, warmup_iters=0, max_iters=100, lr_decay_iters=50)
    assert train.learning_rate(50, decay) == pytest.approx(1e-4) and train.learning_rate(0, decay) == 1e-3


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_gpu_peak_table(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert train.gpu_peak_flops(torch.device("cuda")) == peak
    assert train.gpu_peak_flops(torch.device("cpu")) is None
