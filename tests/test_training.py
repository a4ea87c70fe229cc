"""The training core (fastcenter.training, .config, .checkpoint, .files), in-process.

Tiny models on the synthetic corpus (tests/helpers.py), reference ops unless said otherwise. train.py itself, as
a user runs it, is tested in test_train.py.
"""

import dataclasses
import errno
import io
import json
import math
import os
import pathlib
import tempfile
import typing

import numpy as np
import pytest
import torch

from fastcenter import checkpoint, data, files, training
from fastcenter.config import TrainConfig, UsageError, build_parser, resolve_configs
from fastcenter.files import RunDirectory, RunDirectoryError, atomic_write, read_jsonl
from fastcenter.model import GPT, NANOGPT, GPTConfig
from fastcenter.training import NonFiniteLossError, Trainer, check_fits, gpu_peak_flops, learning_rate

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(vocab_size=data.GPT2_VOCAB_SIZE, dim=32, n_layers=2, n_heads=2, max_seq_len=16)


def make_trainer(corpus, *, seed=0, model=None, **train_overrides) -> Trainer:
    fields = dict(
        batch_size=4,
        grad_accum_steps=2,
        seq_len=16,
        max_iters=12,
        lr=3e-3,
        warmup_iters=2,
        eval_interval=5,
        eval_iters=2,
        log_interval=4,
        seed=seed,
        device="cpu",
    )
    cfg = TrainConfig(**{**fields, **train_overrides})
    tokens = data.load_split(corpus, "train", vocab_size=data.GPT2_VOCAB_SIZE, seq_len=cfg.seq_len)
    val = data.load_split(corpus, "val", vocab_size=data.GPT2_VOCAB_SIZE, seq_len=cfg.seq_len)
    if model is None:
        torch.manual_seed(seed)
        model = GPT(GPTConfig(**TINY))
    return Trainer(model, cfg, train_tokens=tokens, val_tokens=val, device=torch.device("cpu"))


def run_all(trainer):
    return [(r.step, r.loss.item(), r.row) for r in trainer.run()]


# ---------------------------------------------------------------------------------------------------------
# The loop: exact resume, reports, divergence
# ---------------------------------------------------------------------------------------------------------


def test_resumed_trainer_matches_an_uninterrupted_one_bit_for_bit(token_corpus):
    # Centering with running statistics (buffers) and momentum mode: the state must carry all of it.
    model_cfg = GPTConfig(**TINY, center="qk,residual", centering_mode="momentum")
    torch.manual_seed(1)
    straight = make_trainer(token_corpus, model=GPT(model_cfg), lr_decay_iters=12)
    full = run_all(straight)

    torch.manual_seed(1)
    first = make_trainer(token_corpus, model=GPT(model_cfg), lr_decay_iters=12, max_iters=7)
    part = run_all(first)
    state = first.state_dict()
    torch.manual_seed(999)  # a different init: everything must come from the state
    second = make_trainer(token_corpus, model=GPT(model_cfg), lr_decay_iters=12)
    second.load_state_dict(state)
    rest = run_all(second)

    assert [s for s, _, _ in part + rest] == list(range(1, 13))
    assert [l for _, l, _ in part + rest] == [l for _, l, _ in full]  # exact equality, not closeness
    assert len({l for _, l, _ in full}) > 1
    for name, tensor in straight.raw_model.state_dict().items():
        assert torch.equal(tensor, second.raw_model.state_dict()[name]), name
    assert any("running_mean" in k for k in state["model"])


def test_reports_log_the_first_step_every_interval_and_evaluate(token_corpus):
    trainer = make_trainer(token_corpus, max_iters=10, log_interval=4, eval_interval=5)
    reports = list(trainer.run())
    assert [r.step for r in reports] == list(range(1, 11))
    logged = [r.row for r in reports if r.row is not None]
    assert [r["step"] for r in logged] == [1, 4, 5, 8, 10]  # step 1, every 4, evaluations at 5 and 10
    assert [r["step"] for r in logged if "val_loss" in r] == [5, 10]
    for row, report in zip(logged, [r for r in reports if r.row is not None]):
        assert row["loss"] == report.loss.item()
        assert row["tokens_per_sec"] > 0 and row["grad_norm"] > 0 and row["mfu"] is None
        assert row["lr"] == learning_rate(row["step"] - 1, trainer.cfg)
    assert trainer.val_loss == logged[-1]["val_loss"] and math.isfinite(trainer.val_loss)


def test_stop_request_ends_after_the_current_step(token_corpus):
    trainer = make_trainer(token_corpus, max_iters=50, log_interval=100)
    asked = []
    reports = list(trainer.run(should_stop=lambda: len(asked) >= 3 or asked.append(1)))
    assert reports[-1].stopping and reports[-1].row is not None and reports[-1].step == 4
    assert trainer.step == 4


def test_nonfinite_loss_is_caught_at_the_next_log_step(token_corpus, monkeypatch):
    # The loss turns NaN in step 7 (training forwards 13 and 14, two micro-steps per step); logging every 4 steps
    # it is noticed at step 8 and reported as step 7.
    original_forward, calls = GPT.forward, {"train": 0}

    def forward(self, idx, targets=None):
        loss = original_forward(self, idx, targets)
        if self.training:
            calls["train"] += 1
            if calls["train"] >= 13:
                loss = loss * float("nan")
        return loss

    monkeypatch.setattr(GPT, "forward", forward)
    trainer = make_trainer(token_corpus, max_iters=20, log_interval=4, eval_interval=100)
    seen = []
    with pytest.raises(NonFiniteLossError, match="non-finite .* at step 7") as err:
        for report in trainer.run():
            seen.append(report.step)
    assert err.value.step == 7 and seen == list(range(1, 8))  # step 8 raised before it was reported


def test_train_mode_evaluation_leaves_the_model_unchanged(token_corpus):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, center="embeddings,v", centering_mode="simple"))
    trainer = make_trainer(token_corpus, model=model, max_iters=3)
    run_all(trainer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    train_mode = trainer.evaluate(training=True)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    eval_mode = trainer.evaluate()
    assert math.isfinite(train_mode) and train_mode != eval_mode  # simple mode: batch statistics in training


def test_learning_rate_schedule():
    cfg = TrainConfig(lr=1e-3, min_lr_ratio=0.1, warmup_iters=10, max_iters=110)
    lrs = [learning_rate(s, cfg) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup to the peak
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # half-way down the cosine
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:110]))
    assert lrs[110:] == [pytest.approx(1e-4)] * 10
    decay = TrainConfig(lr=1e-3, warmup_iters=0, max_iters=100, lr_decay_iters=50)
    assert learning_rate(50, decay) == pytest.approx(1e-4) and learning_rate(0, decay) == 1e-3


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
    assert gpu_peak_flops(torch.device("cuda")) == peak
    assert gpu_peak_flops(torch.device("cpu")) is None


# ---------------------------------------------------------------------------------------------------------
# The step: one function over the batch buffer, any micro-batch, a CUDA graph
# ---------------------------------------------------------------------------------------------------------


def plain_step(trainer) -> tuple[torch.Tensor, torch.Tensor]:
    """An optimizer step written the obvious way, as the trainer's step was before it ran one function over a
    batch buffer: an autocast region per micro-batch, autograd's own gradient accumulation."""
    cfg, model, optimizer = trainer.cfg, trainer.raw_model, trainer.optimizer
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(trainer.step, cfg)
    micro_batches = trainer.sampler.next_step()
    loss_sum = torch.zeros(())
    for windows in micro_batches:
        x, y = data.to_inputs_targets(windows, "cpu")
        with trainer.precision.autocast():
            loss = model(x, y)
        (loss / len(micro_batches)).backward()
        loss_sum += loss.detach().float()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    trainer.step += 1
    return loss_sum / len(micro_batches), grad_norm


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_step_is_the_plain_step_bit_for_bit(token_corpus, dtype):
    # What StepGraph captures is the eager step's function; here it runs eagerly against the plain step: the same
    # losses, norms and weights bit for bit, with bf16 autocast's weight copies reused across the three
    # micro-steps and the gradients of the second and third added by one multi-tensor add.
    trainers = [make_trainer(token_corpus, seed=3, grad_accum_steps=3, dtype=dtype) for _ in range(2)]
    assert trainers[0].micro_steps == 3
    for _ in range(3):
        loss, (plain_loss, plain_norm) = trainers[0].train_step(), plain_step(trainers[1])
        assert torch.equal(loss, plain_loss) and torch.equal(trainers[0].grad_norm, plain_norm)
    for a, b in zip(trainers[0].raw_model.parameters(), trainers[1].raw_model.parameters()):
        assert torch.equal(a, b)


def test_any_micro_batch_gives_the_same_step(token_corpus):
    # A global batch of 4 x 4 sequences, as 4 micro-steps of 4 (the default on a CPU), 2 of 8 or 1 of 16: the
    # same windows, and the same mean loss and gradients up to float32 rounding (sums in another order).
    trainers = {m: make_trainer(token_corpus, seed=5, grad_accum_steps=4, micro_batch=m) for m in ("auto", 8, 16)}
    assert [(t.micro_batch, t.micro_steps) for t in trainers.values()] == [(4, 4), (8, 2), (16, 1)]
    windows = np.concatenate(trainers["auto"].sampler.global_positions(0))
    batch = torch.from_numpy(data.gather_windows(trainers["auto"].sampler.tokens, windows, 16))
    results = {m: t.accumulate_gradients(batch) for m, t in trainers.items()}
    grads = {m: [p.grad.clone() for p in t._params] for m, t in trainers.items()}
    for m in (8, 16):
        torch.testing.assert_close(results[m][0], results["auto"][0], rtol=1e-6, atol=0)  # the loss
        torch.testing.assert_close(results[m][1], results["auto"][1], rtol=1e-5, atol=0)  # the gradient norm
        for g, reference in zip(grads[m], grads["auto"]):
            torch.testing.assert_close(g, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
    # Training on: the same windows every step, losses within float32 rounding.
    for t in trainers.values():
        t._clear_gradients()
    steps = {m: [] for m in trainers}
    for _ in range(2):
        for m, t in trainers.items():
            steps[m].append((t.train_step().item(), t._batch.clone()))
    for m in (8, 16):
        assert all(torch.equal(b, ref) for (_, b), (_, ref) in zip(steps[m], steps["auto"]))
        np.testing.assert_allclose([l for l, _ in steps[m]], [l for l, _ in steps["auto"]], rtol=1e-5)


def test_a_resumed_run_may_change_its_micro_batch_not_its_batch_or_data(token_corpus):
    straight = make_trainer(token_corpus, seed=7, max_iters=6)
    losses = [r.loss.item() for r in straight.run()]
    first = make_trainer(token_corpus, seed=7, max_iters=3)
    part = [r.loss.item() for r in first.run()]
    torch.manual_seed(8)  # another init: everything comes from the state
    second = make_trainer(token_corpus, seed=7, max_iters=6, micro_batch=8, model=GPT(GPTConfig(**TINY)))
    second.load_state_dict(first.state_dict())
    assert (second.micro_batch, second.micro_steps) == (8, 1) and second.tokens_per_step == first.tokens_per_step
    seen, load = [], second._load_batch
    second._load_batch = lambda windows: seen.append(windows) or load(windows)
    rest = [r.loss.item() for r in second.run()]
    assert part == losses[:3]
    np.testing.assert_allclose(rest, losses[3:], rtol=1e-5)  # another split: float32 rounding only
    # The windows of steps 4-6, in the order the uninterrupted run drew them.
    replay = make_trainer(token_corpus, seed=7)
    replay.sampler.step = 3
    assert len(seen) == 3
    for windows in seen:
        assert np.array_equal(windows, np.concatenate(replay.sampler.next_step()))


def test_a_micro_batch_must_divide_each_processes_share(token_corpus):
    with pytest.raises(
        UsageError, match=r"--micro-batch 3 must divide the 8 sequences .*--batch-size 4 x --grad-accum"
    ):
        make_trainer(token_corpus, micro_batch=3)
    assert make_trainer(token_corpus, micro_batch=1).micro_steps == 8


def test_largest_fitting_divisor():
    fits = training.largest_fitting_divisor
    assert fits(64, per_sequence=1.0, fixed=10.0, budget=1000.0) == 64
    assert fits(64, per_sequence=10.0, fixed=100.0, budget=500.0) == 32  # 40 would fit, but does not divide 64
    assert fits(12, per_sequence=10.0, fixed=0.0, budget=59.0) == 4
    assert fits(12, per_sequence=10.0, fixed=100.0, budget=50.0) == 1  # nothing fits: the smallest


def test_cuda_graph_without_a_gpu_says_so_once_and_trains_uncaptured(token_corpus):
    said = []
    graphed = make_trainer(token_corpus, seed=9, max_iters=3, cuda_graph=True)
    assert graphed._graph is None
    plain = make_trainer(token_corpus, seed=9, max_iters=3)
    graphed.say = said.append
    graphed._graph = training.StepGraph.for_trainer(graphed)
    assert graphed._graph is None and said == ["--cuda-graph: the step runs uncaptured (it needs a CUDA device)"]
    assert [r.loss.item() for r in graphed.run()] == [r.loss.item() for r in plain.run()]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_trainer(corpus, **overrides) -> Trainer:
    fields = dict(
        batch_size=4, grad_accum_steps=2, seq_len=16, max_iters=8, lr=3e-3, warmup_iters=2, seed=11, device="cuda"
    )
    cfg = TrainConfig(**{**fields, **overrides})
    tokens = data.load_split(corpus, "train", vocab_size=data.GPT2_VOCAB_SIZE, seq_len=cfg.seq_len)
    torch.manual_seed(11)
    model = GPT(GPTConfig(**TINY, fused=True))
    return Trainer(model, cfg, train_tokens=tokens, val_tokens=tokens, device=torch.device("cuda"), say=lambda m: None)


@needs_cuda
def test_the_captured_step_is_the_uncaptured_step_bit_for_bit(token_corpus):
    # 3 eager warm-up steps, the capture and its replay at step 4, replays after; 4 micro-steps a step, so the
    # graph holds the multi-tensor gradient adds too. The same losses, gradient norms and weights as the run
    # that never captures, bit for bit -- where two uncaptured runs agree bit for bit (the control): a GPU whose
    # kernels are not deterministic can only show closeness.
    graphed, eager, control = (cuda_trainer(token_corpus, micro_batch=2, cuda_graph=g) for g in (True, False, False))
    runs = {"graphed": [], "eager": [], "control": []}
    for step in range(8):
        for name, trainer in zip(runs, (graphed, eager, control)):
            runs[name].append((trainer.train_step(), trainer.grad_norm))
        assert graphed._graph is not None and graphed._graph.captured == (step >= 3)
    weights = {name: list(t.raw_model.parameters()) for name, t in zip(runs, (graphed, eager, control))}

    def same(a, b, exact):
        for x, y in zip(a, b):
            assert torch.equal(x, y) if exact else torch.allclose(x, y, rtol=1e-3, atol=1e-4)

    exact = all(torch.equal(x, y) for pair in zip(runs["eager"], runs["control"]) for x, y in zip(*pair))
    for (loss, norm), (eager_loss, eager_norm) in zip(runs["graphed"], runs["eager"]):
        same((loss, norm), (eager_loss, eager_norm), exact)
    same(weights["graphed"], weights["eager"], exact)


@needs_cuda
def test_auto_micro_batch_on_cuda_measures_without_a_trace(token_corpus):
    trainer = cuda_trainer(token_corpus, micro_batch="auto")
    assert trainer.sequences_per_process % trainer.micro_batch == 0 and trainer.micro_batch == 8  # tiny: all fits
    assert all(p.grad is None for p in trainer.raw_model.parameters())
    fresh = cuda_trainer(token_corpus, micro_batch=8)
    for (name, a), b in zip(trainer.raw_model.state_dict().items(), fresh.raw_model.state_dict().values()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------------------
# Configuration and flags
# ---------------------------------------------------------------------------------------------------------


def test_every_config_field_is_a_flag():
    options = {s for action in build_parser()._actions for s in action.option_strings}
    for cls in (TrainConfig, GPTConfig):
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            assert flag in options, flag
            if isinstance(f.default, bool):
                assert "--no-" + f.name.replace("_", "-") in options
    cfg, model_cfg, ckpt, notes = resolve_configs(
        [
            "--center",
            "mlp,embeddings,qk,v,residual",
            "--centering-mode",
            "causal",
            "--no-fused",
            "--mlp-hidden",
            "none",
            "--seq-len",
            "1024",
            "--grad-accum-steps",
            "8",
            "--lr",
            "2e-4",
            "--compile",
            "--dtype",
            "float16",
        ]
    )
    assert model_cfg.center == ("embeddings", "mlp", "qk", "residual", "v")
    assert model_cfg.centering_mode == "causal" and model_cfg.fused is False and model_cfg.mlp_hidden is None
    assert model_cfg.max_seq_len == 1024 and any("max_seq_len" in n for n in notes)  # raised to fit seq_len
    assert cfg.grad_accum_steps == 8 and cfg.lr == 2e-4 and cfg.compile and cfg.dtype == "float16"
    assert ckpt is None
    # The defaults are the default configuration.
    cfg, model_cfg, _, _ = resolve_configs([])
    assert (cfg.batch_size, cfg.grad_accum_steps, cfg.seq_len, cfg.max_iters) == (16, 4, 512, 50_000)
    assert (cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.grad_clip) == (0.9, 0.95, 0.1, 1.0)
    assert (model_cfg.dim, model_cfg.n_layers, model_cfg.n_heads, model_cfg.max_seq_len) == (256, 4, 4, 512)
    with pytest.raises(UsageError, match="exceeds --max-seq-len"):
        resolve_configs(["--seq-len", "1024", "--max-seq-len", "512"])


# Every flag with a number: values out of range, not finite, or of the wrong type.
BAD_VALUES = {
    "--batch-size": ["0", "-3", "2.5"],
    "--grad-accum-steps": ["0"],
    "--seq-len": ["0"],
    "--max-iters": ["0"],
    "--eval-interval": ["0"],
    "--eval-iters": ["0"],
    "--log-interval": ["0"],
    "--warmup-iters": ["-1"],
    "--lr-decay-iters": ["-5"],
    "--seed": ["-1", str(2**32)],  # NumPy's global generator takes seeds below 2**32
    "--lr": ["0", "-1e-3", "nan", "inf"],
    "--min-lr-ratio": ["-0.1", "1.5", "nan"],
    "--weight-decay": ["-0.1", "inf", "nan"],
    "--beta1": ["1.5", "1.0", "-0.1", "nan"],
    "--beta2": ["1.0", "nan"],
    "--grad-clip": ["nan", "inf", "-1"],
    "--vocab-size": ["0"],
    "--dim": ["0", "30"],  # 30 is not divisible by the 4 default heads
    "--n-layers": ["0"],
    "--n-heads": ["0", "3"],
    "--max-seq-len": ["0"],
    "--mlp-hidden": ["0", "x"],
    "--rope-base": ["1", "0.5", "nan", "inf"],
    "--norm-eps": ["-1", "nan", "inf"],
    "--center": ["bogus"],
    "--centering-mode": ["mean"],
    "--norm": ["batchnorm"],
    "--mlp": ["relu"],
    "--positions": ["alibi"],
    "--device": ["tpu"],
    "--dtype": ["float64"],
    "--micro-batch": ["0", "-2", "x", "2.5"],
}


@pytest.mark.parametrize("flag, values", BAD_VALUES.items(), ids=list(BAD_VALUES))
def test_invalid_flag_values_are_usage_errors_naming_the_flag(flag, values):
    for value in values:
        with pytest.raises(UsageError) as err:
            resolve_configs([flag, value])
        message = str(err.value)
        assert (
            flag in message
            or (flag == "--dim" and "--n-heads" in message)
            or (flag == "--n-heads" and "--dim" in message)
        ), (flag, value, message)
        assert "\n" not in message


def test_every_float_flag_refuses_values_beyond_float32s_range():
    # The run computes in float32: 1e300 as --lr overflowed inside the optimizer (a traceback), as others would.
    floats = [
        f.name
        for cls in (TrainConfig, GPTConfig)
        for f in dataclasses.fields(cls)
        if typing.get_type_hints(cls)[f.name] is float
    ]
    assert {"lr", "weight_decay", "grad_clip", "rope_base", "norm_eps"} <= set(floats)
    for name in floats:
        flag = "--" + name.replace("_", "-")
        for value in ("1e300", "-3.5e38"):
            with pytest.raises(UsageError, match=f"argument {flag}: {value} is beyond float32's range"):
                resolve_configs([f"{flag}={value}"])
    with pytest.raises(UsageError, match="--lr must be within float32's range"):
        TrainConfig(lr=1e300)  # in-process too


@pytest.mark.parametrize(
    "fields",
    [{}, dict(dim=48, n_heads=4, n_layers=3, mlp_hidden=100, center="all"), dict(mlp_hidden=4096, **NANOGPT)],
)
def test_check_fits_refuses_only_what_cannot_fit(monkeypatch, fields):
    config = GPTConfig(**{**TINY, **fields})
    model = GPT(config)
    parameters = sum(p.numel() for p in model.parameters())
    need = 16 * parameters + sum(b.numel() * b.element_size() for b in model.buffers())  # float32 x 4, buffers
    monkeypatch.setattr(training, "device_memory", lambda device: need)
    check_fits(config, torch.device("cpu"))  # what the model really needs passes: the bound is a lower bound
    monkeypatch.setattr(training, "device_memory", lambda device: need // 2)
    with pytest.raises(UsageError, match="needs at least .* GiB"):
        check_fits(config, torch.device("cpu"))


def test_unknown_flag_is_a_usage_error():
    with pytest.raises(UsageError, match="unrecognized arguments: --bogus"):
        resolve_configs(["--bogus", "1"])


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_and_model_loading(token_corpus, tmp_path):
    trainer = make_trainer(token_corpus, max_iters=2)
    run_all(trainer)
    path = tmp_path / "ckpt.pt"
    trainer.save(path)
    ckpt = checkpoint.load(path)
    assert set(checkpoint.KEYS) <= set(ckpt) and ckpt["step"] == 2 and ckpt["format"] == checkpoint.FORMAT
    loaded = checkpoint.load_model(path)
    assert not loaded.training
    for name, tensor in trainer.raw_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert checkpoint.load_model(path, fused=True).config.fused is True


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"garbage that is not a zip or a pickle", "not a readable checkpoint"),
        (None, "not a fastcenter.train/1 checkpoint"),
    ],
)
def test_bad_checkpoints_are_refused_clearly(tmp_path, content, message):
    path = tmp_path / "ckpt.pt"
    if content is None:
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load(path)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint at"):
        checkpoint.load(tmp_path / "absent.pt")


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, {"step": 1})
    before = path.read_bytes()

    def full_disk(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device.*free some space.*intact"):
        checkpoint.save(path, {"step": 2})
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_atomic_write_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def failing(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_bytes() == b"old" and list(tmp_path.iterdir()) == [path]


# ---------------------------------------------------------------------------------------------------------
# The run directory
# ---------------------------------------------------------------------------------------------------------


POSIX_LOCKS = pytest.mark.skipif(os.name != "posix", reason="the run-directory lock uses fcntl.flock (POSIX)")


def killed_mid_write(path) -> pathlib.Path:
    """The temp file a run killed inside atomic_write leaves beside `path` (the same name atomic_write makes)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=files.TEMP_SUFFIX)
    os.close(fd)
    return pathlib.Path(tmp)


@POSIX_LOCKS
def test_a_run_directory_is_held_by_one_run(tmp_path):
    first = RunDirectory(tmp_path / "run").open()
    killed_mid_write(first.checkpoint)
    before = sorted(p.name for p in first.path.iterdir())
    with pytest.raises(RunDirectoryError, match=f"in use by a running training run \\(pid {os.getpid()}"):
        RunDirectory(tmp_path / "run").open()
    assert sorted(p.name for p in first.path.iterdir()) == before  # the refused run wrote nothing
    first.close()
    with RunDirectory(tmp_path / "run") as again:  # released when the holder closes (or dies)
        assert sorted(p.name for p in again.path.iterdir()) == ["run.lock"]  # the stale temp file is gone
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirectoryError, match="is a file, not a directory"):
        RunDirectory(tmp_path / "file").open()


@POSIX_LOCKS
def test_removing_the_lock_file_does_not_let_a_second_run_in(tmp_path):
    first = RunDirectory(tmp_path / "run").open()
    (first.path / "run.lock").unlink()
    with pytest.raises(RunDirectoryError, match="in use by a running training run \\(another process\\)"):
        RunDirectory(tmp_path / "run").open()
    assert list(first.path.iterdir()) == []  # the refused run created nothing, not even a lock file
    first.close()
    RunDirectory(tmp_path / "run").open().close()


@POSIX_LOCKS
def test_a_file_system_without_locks_is_refused_without_naming_a_stale_process(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.lock").write_text("pid 12345 on a-host-long-gone\n")  # left by a run long dead

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    with pytest.raises(RunDirectoryError) as err:
        RunDirectory(tmp_path / "run").open()
    assert "No locks available" in str(err.value) and "choose an --out-dir" in str(err.value)
    assert "12345" not in str(err.value) and "in use" not in str(err.value)


def test_only_the_runs_own_temp_files_are_removed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --out-dir . : the run shares the user's working directory
    users = ["notes.tmp", "ckpt.pt.tmp", "ckpt.pt.backup.tmp", "draft.txt.abc123.tmp", "results.csv"]
    users.append(killed_mid_write(tmp_path / "corpus.bin").name)  # atomic_write's, but not of a run's file
    for name in users[:-1]:
        (tmp_path / name).write_text("the user's")
    for name in RunDirectory.FILES:
        killed_mid_write(tmp_path / name)
    with RunDirectory("."):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(users + ["run.lock"])


@pytest.mark.parametrize("name", RunDirectory.FILES)
def test_a_run_file_that_is_a_directory_is_refused_before_anything_is_written(tmp_path, name):
    (tmp_path / "run" / name).mkdir(parents=True)
    with pytest.raises(RunDirectoryError, match=f"{name} is not a file.*move it away"):
        RunDirectory(tmp_path / "run").open()
    assert [p.name for p in (tmp_path / "run").iterdir()] == [name]


def test_every_write_of_a_run_directory_that_fails_is_one_clear_error(tmp_path, monkeypatch):
    full = OSError(errno.ENOSPC, "No space left on device")
    real_write = os.write

    def full_disk_write(fd, data):
        raise full

    monkeypatch.setattr(os, "write", full_disk_write)  # the lock file's pid line
    with pytest.raises(RunDirectoryError, match=r"could not write .*run.lock: No space left on device \(the disk"):
        RunDirectory(tmp_path / "run").open()
    monkeypatch.setattr(os, "write", real_write)
    with RunDirectory(tmp_path / "run") as run_dir:  # the failed attempt released its locks
        run_dir.start_metrics([])
        run_dir.log({"step": 1, "loss": 2.0})

        class FullFile(io.StringIO):
            def flush(self):
                raise full

        run_dir._metrics_file = FullFile()
        with pytest.raises(RunDirectoryError, match=r"could not write .*metrics.jsonl: No space.*no checkpoint yet"):
            run_dir.log({"step": 2, "loss": 1.0})

        def refuse(path, text):
            raise OSError(errno.EFBIG, "File too large")

        monkeypatch.setattr(files, "atomic_write_text", refuse)
        with pytest.raises(RunDirectoryError, match=r"config.json: File too large \(a file-size limit"):
            run_dir.write_config({})
        monkeypatch.undo()
        monkeypatch.setattr(files, "atomic_write", lambda path, write: refuse(path, None))
        run_dir.rows = [{"step": 1, "loss": 2.0}]
        with pytest.raises(RunDirectoryError, match=r"loss.png: File too large"):
            run_dir.plot()


def test_atomic_write_raises_the_write_error_a_writer_hid(tmp_path):
    # torch.save turns a failed write into "RuntimeError: unexpected pos"; the cause must come out.
    def writer_that_wraps_errors(f):
        try:
            f.write(b"x")
        except OSError:
            raise RuntimeError("unexpected pos 704 vs 598") from None

    class Full(io.BytesIO):
        def write(self, b):
            raise OSError(errno.EFBIG, "File too large")

    real_fdopen = os.fdopen
    with pytest.MonkeyPatch.context() as m:
        m.setattr(os, "fdopen", lambda fd, mode: (real_fdopen(fd, mode).close(), Full())[1])
        with pytest.raises(OSError, match="File too large"):
            atomic_write(tmp_path / "f.bin", writer_that_wraps_errors)
    assert list(tmp_path.iterdir()) == []


def test_metrics_keep_rows_up_to_the_checkpoint_and_drop_a_torn_line(tmp_path):
    with RunDirectory(tmp_path / "run") as run_dir:
        run_dir.start_metrics([])
        for step in (1, 5, 10):
            run_dir.log({"step": step, "loss": 1.0 / step})
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 15, "loss": 0.0')  # cut off mid-line
    rows, dropped = RunDirectory(tmp_path / "run").metrics_until(5)
    assert [r["step"] for r in rows] == [1, 5] and dropped == 1
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[1] == 1
    json.dumps(rows)
