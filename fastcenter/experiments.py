"""The centering study: does vector centering help a small GPT, where, and in which mode?

    python -m fastcenter.experiments centering --data DIR --iters N --seeds K \\
        --arms baseline,embeddings,v,qk,qk+v,residual,mlp,all --modes adaptive,simple,causal --out DIR

It tests the seed's claims (val loss after 1000 iterations of the seed model: baseline 5.0749, embeddings
centered 4.9603 (+2.26%), qk+v 4.9791 (+1.89%), v only 5.0174 (+1.13%), residual -11.73%, mlp -0.57%,
everything at once "catastrophic"; adaptive the recommended mode) with the package's model and data.

Design
    Arms and modes. An arm is a set of placements (`ARMS`); every arm but the baseline runs once per mode. The
        baseline has no centering, so it runs once per seed.
    Paired seeds. For seed s, the baseline model is built with `torch.manual_seed(s)` and its weights are
        loaded into every arm's model: all arms of a seed start from the same weights (the centering modules
        hold no weights except learnable centres, which start at zero, and their statistics, which start
        empty). The batches come from `fastcenter.data.WindowSampler` seeded with s, independent of the arm:
        every arm of a seed sees the same windows in the same order. Differences between arms of one seed are
        then due to the centering alone, and the paired difference (arm - baseline, per seed) cancels most of
        the seed-to-seed noise.
    Training. AdamW over the model's parameter groups, linear warmup then cosine decay, gradient clipping, the
        same hyper-parameters for every arm. On CUDA: the fused ops (`GPTConfig.fused`) under bf16 autocast;
        elsewhere the reference ops in float32.
    Evaluation. The validation loss in EVAL mode on fixed validation windows (`fastcenter.data`'s evenly spaced
        positions, the same for every run): the centering modules use their running statistics, so nothing
        leaks between tokens or sequences. Beside it the TRAIN-mode loss on the same windows (forward in
        training mode under no_grad, buffers restored before every batch and afterwards): for `simple` and
        `momentum` this is what the training loss measured, batch statistics included, and the gap between
        the two shows how far the training-time view was from what the model can do at inference.
    Leak check. On one validation batch of the trained model, in eval and in train mode: replace the tokens
        after position t and measure the largest change of the logits at positions <= t (future leak); replace
        the other sequences of the batch and measure the largest change of the first sequence's logits
        (batch leak). A change above `LEAK_TOLERANCE` x max|logits| counts as a leak. Expected: eval mode never
        leaks; in training, `simple` leaks (batch mean) and `momentum` leaks scaled by its alpha.
    Statistics and verdicts. Per arm and mode: mean +- std over seeds of the eval-mode loss; the paired change
        against the baseline, per seed 100 * (baseline - arm) / baseline (the seed's sign: positive = better),
        then its mean, std and standard error (SE = std / sqrt(n)). Each seed claim gets a verdict by
        `verdict_for` (the rule is written there and in results.md): confirmed if the measured change has the
        claimed sign and exceeds 2 SE; refuted if it has the opposite sign beyond 2 SE, or if it is within noise
        while the claimed size lies outside measured +- 2 SE; otherwise inconclusive.

Outputs (in --out)
    runs/<run>.json   one finished run each (config, weights and data digests, curves, final losses, leak
                      check, timings); written atomically when the run ends. A restarted study skips the runs
                      found there, so an interruption costs at most the run in progress.
    results.json      config, environment, every run, statistics, verdicts (rebuilt from runs/ every time)
    results.md        the tables: losses, paired changes, verdicts, leaks
    loss_curves.png   eval-mode validation loss against step, and its paired difference to the baseline
    bars.png          paired change per arm and mode with 2-SE error bars, the seed's claims marked

The numbers hold for the configuration that was run. A model, data set or number of steps other than the seed's
tests the claims at that size only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from . import data
from .model import GPT, PLACEMENTS, GPTConfig, warmup_cosine_lr
from .nn import CENTERING_MODES, VectorCentering

__all__ = [
    "ARMS",
    "SEED_CLAIMS",
    "StudyConfig",
    "RunSpec",
    "plan_runs",
    "initial_state",
    "build_model",
    "train_run",
    "evaluate",
    "leak_check",
    "aggregate",
    "verdict_for",
    "run_study",
    "main",
]

# Arm name -> placements. "all" is every placement at once (the seed's "aggressive" centering).
ARMS = {
    "baseline": (),
    "embeddings": ("embeddings",),
    "v": ("v",),
    "qk": ("qk",),
    "qk+v": ("qk", "v"),
    "residual": ("residual",),
    "mlp": ("mlp",),
    "all": PLACEMENTS,
}
DEFAULT_MODES = ("adaptive", "simple", "causal")
BASELINE_MODE = "none"  # the mode label of baseline runs (no centering)
# Order of modes in tables and plots: the seed's recommended mode first.
MODE_ORDER = ("adaptive", "simple", "causal", "momentum", "learnable")
# Two-sided 95% quantiles of Student's t by degrees of freedom (n - 1), to say how wide +- 2 SE really is.
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}

# A logit change above this fraction of max|logits| counts as a leak. Without a leak the change is exactly 0 (the
# other rows of every matmul do not enter a row's result); with one it is orders of magnitude larger.
LEAK_TOLERANCE = 1e-5
# Verdicts: an effect counts when |mean| exceeds this many standard errors of the paired mean.
SE_MULTIPLE = 2.0
RUN_FORMAT = "fastcenter.experiments.centering/1"


@dataclass(frozen=True)
class Claim:
    """One claim of the seed, tested per mode.

    kind "arm": the paired change of `arm` against the baseline; `claimed_pct` in the seed's convention
    (positive = lower loss = better) or None for a claim of direction only (`direction` +1 better, -1 worse).
    kind "pair": arm `arm` against arm `other` (same seeds, same mode); positive = `arm` better.
    kind "best": `arm` is better than every other centered arm (tested against the runner-up).
    kind "mode": mode `mode_a` against every other mode run, averaged over the centered arms of each seed.
    """

    id: str
    text: str
    kind: str
    direction: int
    arm: str = ""
    other: str = ""
    claimed_pct: Optional[float] = None
    claimed_loss: Optional[float] = None
    mode_a: str = ""


SEED_BASELINE_LOSS = 5.0749
SEED_CLAIMS = (
    Claim("embeddings", "embeddings centered: +2.26% (4.9603 vs 5.0749)", "arm", +1, "embeddings",
          claimed_pct=2.26, claimed_loss=4.9603),
    Claim("qk+v", "qk + v centered: +1.89% (4.9791)", "arm", +1, "qk+v", claimed_pct=1.89, claimed_loss=4.9791),
    Claim("v", "v only: +1.13% (5.0174)", "arm", +1, "v", claimed_pct=1.13, claimed_loss=5.0174),
    Claim("qk", "qk centering helps (\"time-tested technique\", no number given)", "arm", +1, "qk"),
    Claim("residual", "residual centering hurts: -11.73%", "arm", -1, "residual", claimed_pct=-11.73),
    Claim("mlp", "mlp centering hurts: -0.57%", "arm", -1, "mlp", claimed_pct=-0.57),
    Claim("all", "everything centered (\"aggressive\") is catastrophic: -88%", "arm", -1, "all", claimed_pct=-88.0),
    Claim("v>qk", "values matter more than q/k: v beats qk", "pair", +1, "v", other="qk"),
    Claim("embeddings-best", "embeddings centering is the most effective placement", "best", +1, "embeddings"),
    Claim("adaptive", "adaptive is the recommended mode: it beats the other modes", "mode", +1, mode_a="adaptive"),
)


# ---------------------------------------------------------------------------------------------------------------
# Configuration and the plan.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class StudyConfig:
    """Everything that decides a run's numbers, except its (arm, mode, seed). Defaults = the seed model."""

    iters: int = 1000
    seeds: int = 3
    seed_offset: int = 0
    arms: tuple = tuple(ARMS)
    modes: tuple = DEFAULT_MODES
    # Model (GPTConfig) and batch: one optimizer step sees batch_size x grad_accum_steps windows of seq_len.
    vocab_size: int = data.GPT2_VOCAB_SIZE
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 512
    batch_size: int = 16
    grad_accum_steps: int = 4
    # Optimisation.
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_iters: Optional[int] = None  # None: iters // 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # Evaluation: eval_batches batches of batch_size fixed windows; eval_points evaluations along the way.
    eval_batches: int = 20
    eval_points: int = 5
    leak_batch: int = 4
    log_interval: int = 10
    device: str = "auto"

    def __post_init__(self):
        self.arms = parse_arms(self.arms)
        self.modes = parse_modes(self.modes)
        for name in ("iters", "seeds", "dim", "n_layers", "n_heads", "seq_len", "batch_size", "grad_accum_steps",
                     "eval_batches", "eval_points", "log_interval", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (the leak check splits a window), got {self.seq_len}")
        if not 2 <= self.leak_batch <= self.eval_batches * self.batch_size:
            raise ValueError(f"leak_batch must be >= 2 (the batch-leak check needs other sequences) and at most "
                             f"the {self.eval_batches * self.batch_size} validation windows, got {self.leak_batch}")
        if self.warmup_iters is None:
            self.warmup_iters = max(1, self.iters // 10)
        if self.warmup_iters < 0 or not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.grad_clip < 0:
            raise ValueError("need warmup_iters >= 0, lr > 0, 0 <= min_lr_ratio <= 1 and grad_clip >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        GPTConfig(**self.model_fields())  # raises on a shape the model cannot take

    def model_fields(self) -> dict:
        return dict(vocab_size=self.vocab_size, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                    max_seq_len=self.seq_len)

    def result_fields(self) -> dict:
        """The fields that decide a run's numbers (not which runs are planned): runs agree iff these agree."""
        skip = {"seeds", "seed_offset", "arms", "modes", "log_interval", "device"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seed_offset, self.seed_offset + self.seeds))

    @property
    def eval_steps(self) -> list[int]:
        """Steps (after that many updates) where the validation loss is measured; the last is `iters`."""
        return sorted({max(1, round(i * self.iters / self.eval_points)) for i in range(1, self.eval_points + 1)})

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum_steps * self.seq_len


def parse_arms(arms) -> tuple:
    names = [a.strip() for a in arms.split(",")] if isinstance(arms, str) else list(arms)
    names = [a for a in names if a]
    unknown = [a for a in names if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; arms are {', '.join(ARMS)}")
    # The baseline is what every arm is compared with: always run it, first.
    return ("baseline",) + tuple(dict.fromkeys(a for a in names if a != "baseline"))


def parse_modes(modes) -> tuple:
    names = [m.strip() for m in modes.split(",")] if isinstance(modes, str) else list(modes)
    names = tuple(dict.fromkeys(m for m in names if m))
    unknown = [m for m in names if m not in CENTERING_MODES]
    if unknown or not names:
        raise ValueError(f"modes must be a non-empty subset of {CENTERING_MODES}, got {list(names)}")
    return names


@dataclass(frozen=True)
class RunSpec:
    seed: int
    arm: str
    mode: str  # BASELINE_MODE for the baseline

    @property
    def run_id(self) -> str:
        """A file-name-safe id: s0-baseline-none, s2-qk_v-adaptive."""
        return f"s{self.seed}-{self.arm.replace('+', '_')}-{self.mode}"


def plan_runs(cfg: StudyConfig) -> list[RunSpec]:
    """Seed-major order: after each seed the paired set (baseline + every arm and mode) is complete."""
    plan = []
    for seed in cfg.seed_list:
        plan.append(RunSpec(seed, "baseline", BASELINE_MODE))
        for mode in cfg.modes:
            plan.extend(RunSpec(seed, arm, mode) for arm in cfg.arms if arm != "baseline")
    return plan


def model_config(cfg: StudyConfig, arm: str, mode: str, fused: bool = False) -> GPTConfig:
    return GPTConfig(**cfg.model_fields(), center=ARMS[arm], centering_mode=mode if ARMS[arm] else "adaptive",
                     fused=fused)


# ---------------------------------------------------------------------------------------------------------------
# Paired initial weights.
# ---------------------------------------------------------------------------------------------------------------


def initial_state(cfg: StudyConfig, seed: int) -> dict:
    """The baseline model's initial weights for `seed` (built on the CPU: the same on every device)."""
    torch.manual_seed(seed)
    return GPT(model_config(cfg, "baseline", BASELINE_MODE)).state_dict()


def build_model(cfg: StudyConfig, spec: RunSpec, base_state: Optional[dict] = None, fused: bool = False) -> GPT:
    """The model of one run, holding the seed's baseline weights; centering modules start empty.

    Every key the arm's model has beyond the baseline's must belong to a VectorCentering module (its running
    statistics, or a learnable centre), and those are checked to be zero.
    """
    base_state = initial_state(cfg, spec.seed) if base_state is None else base_state
    model = GPT(model_config(cfg, spec.arm, spec.mode, fused))
    missing, unexpected = model.load_state_dict(base_state, strict=False)
    centering_prefixes = tuple(name + "." for name, m in model.named_modules() if isinstance(m, VectorCentering))
    stray = [k for k in missing if not k.startswith(centering_prefixes)]
    if unexpected or stray:
        raise RuntimeError(f"arm {spec.arm!r} does not share the baseline's weights: {unexpected or stray}")
    for key in missing:
        if model.state_dict()[key].count_nonzero() != 0:
            raise RuntimeError(f"centering state {key} of arm {spec.arm!r} does not start at zero")
    return model


def weights_digest(model: torch.nn.Module, keys: Iterable[str]) -> str:
    """sha256 over the named tensors (name, dtype, shape, bytes): equal digests = identical weights."""
    state = model.state_dict()
    h = hashlib.sha256()
    for key in sorted(keys):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_digest(path: pathlib.Path, limit: int = 1 << 28) -> str:
    """sha256 of a file; beyond `limit` bytes, of its size and first and last 16 MB (token files can be huge)."""
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


# ---------------------------------------------------------------------------------------------------------------
# Training and evaluation of one run.
# ---------------------------------------------------------------------------------------------------------------


def learning_rate(step: int, cfg: StudyConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at the last iteration."""
    return warmup_cosine_lr(
        step, lr=cfg.lr, warmup_iters=cfg.warmup_iters, decay_iters=cfg.iters, min_lr=cfg.lr * cfg.min_lr_ratio
    )


@contextlib.contextmanager
def preserved(model: torch.nn.Module, training: bool):
    """Run the model in the given mode, leaving no trace: yields `reset()`, which puts every buffer back to its
    value on entry (call it before each forward so each one sees the same statistics); on exit buffers and the
    mode are restored."""
    saved = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    was_training = model.training

    def reset() -> None:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(saved[name])

    model.train(training)
    try:
        yield reset
    finally:
        reset()
        model.train(was_training)


@torch.no_grad()
def evaluate(model: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]], autocast, training: bool = False) -> float:
    """Mean loss over the batches (all of one shape, so a token mean), in eval mode or, with training=True, in
    training mode with the statistics reset before every batch: the state of the model is left unchanged."""
    total = torch.zeros((), dtype=torch.float64, device=batches[0][0].device)
    with preserved(model, training) as reset:
        for x, y in batches:
            reset()
            with autocast:
                total += model(x, y).double()
    return float(total / len(batches))


@torch.no_grad()
def leak_check(model: GPT, tokens: torch.Tensor, autocast, seed: int = 0) -> dict:
    """Does a token's output depend on later tokens, or on other sequences of the batch? In eval and train mode.

    tokens: [B >= 2, T >= 2]. The future check replaces every token after position t = T // 2 - 1 and measures
    the largest logit change at positions <= t; the batch check replaces sequences 1.. and measures the largest
    change of sequence 0's logits. Replacement ids differ from the originals at every replaced position.
    """
    B, T = tokens.shape
    if B < 2 or T < 2:
        raise ValueError(f"tokens must be [B >= 2, T >= 2], got {tuple(tokens.shape)}")
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, V, tokens.shape, generator=g).to(tokens.device)
    replaced = (tokens + shift) % V
    t = T // 2 - 1
    future = torch.cat([tokens[:, : t + 1], replaced[:, t + 1 :]], dim=1)
    others = torch.cat([tokens[:1], replaced[1:]], dim=0)
    result = {"t": t, "tolerance": LEAK_TOLERANCE}
    for phase, training in (("eval", False), ("train", True)):
        with preserved(model, training) as reset:
            logits = {}
            for name, idx in (("clean", tokens), ("future", future), ("others", others)):
                reset()
                with autocast:
                    logits[name] = model(idx).float()
        scale = max(1.0, float(logits["clean"].abs().max()))
        future_change = float((logits["future"][:, : t + 1] - logits["clean"][:, : t + 1]).abs().max())
        batch_change = float((logits["others"][0] - logits["clean"][0]).abs().max())
        result[phase] = {
            "future_change": future_change,
            "batch_change": batch_change,
            "logit_scale": scale,
            "future_leak": future_change > LEAK_TOLERANCE * scale,
            "batch_leak": batch_change > LEAK_TOLERANCE * scale,
        }
        result[phase]["leak"] = result[phase]["future_leak"] or result[phase]["batch_leak"]
    return result


@dataclass
class Corpus:
    train: np.ndarray
    val: np.ndarray
    data_dir: str
    digest: str


def load_corpus(data_dir, cfg: StudyConfig) -> Corpus:
    data_dir = pathlib.Path(data_dir)
    train = data.load_split(data_dir, "train", vocab_size=cfg.vocab_size, seq_len=cfg.seq_len)
    val = data.load_split(data_dir, "val", vocab_size=cfg.vocab_size, seq_len=cfg.seq_len)
    digest = hashlib.sha256(
        (file_digest(data_dir / "train.bin") + file_digest(data_dir / "val.bin")).encode()
    ).hexdigest()
    return Corpus(train, val, str(data_dir.resolve()), digest)


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def train_run(
    spec: RunSpec,
    cfg: StudyConfig,
    corpus: Corpus,
    device: torch.device,
    *,
    base_state: Optional[dict] = None,
    log: Callable[[str], None] = print,
    prefix: str = "",
) -> dict:
    """Train one (seed, arm, mode) run and evaluate it; returns its record (see the module docstring)."""
    t_start = time.perf_counter()
    on_cuda = device.type == "cuda"
    model = build_model(cfg, spec, base_state, fused=on_cuda)
    base_keys = list(base_state) if base_state is not None else list(initial_state(cfg, spec.seed))
    init_digest = weights_digest(model, base_keys)
    model.to(device).train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda)
    optimizer = model.configure_optimizer(
        cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, device_type=device.type
    )
    sampler = data.WindowSampler(
        corpus.train, seq_len=cfg.seq_len, batch_size=cfg.batch_size, grad_accum_steps=cfg.grad_accum_steps,
        seed=spec.seed,
    )
    positions = data.validation_positions(len(corpus.val), cfg.seq_len, cfg.eval_batches * cfg.batch_size)
    val_batches = [
        data.to_inputs_targets(data.gather_windows(corpus.val, p, cfg.seq_len), device)
        for p in positions.reshape(cfg.eval_batches, cfg.batch_size)
    ]
    eval_steps = set(cfg.eval_steps)
    data_hash = hashlib.sha256()
    step_losses: list[torch.Tensor] = []  # kept on the device: the loop syncs only at log and eval steps
    curve = {"step": [], "val_loss": []}
    diverged_at = None
    t_train = 0.0
    t_mark = time.perf_counter()
    for step in range(cfg.iters):
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for windows in sampler.next_step():
            data_hash.update(windows.tobytes())
            x, y = data.to_inputs_targets(windows, device)
            with autocast:
                loss = model(x, y)
            (loss / cfg.grad_accum_steps).backward()
            loss_sum += loss.detach().float()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_losses.append(loss_sum / cfg.grad_accum_steps)
        done = step + 1
        if done % cfg.log_interval and done not in eval_steps:
            continue
        losses = torch.stack(step_losses)
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            diverged_at = int(bad[0]) + 1
            log(f"{prefix}non-finite training loss at step {diverged_at}: the run diverged; stopping it")
            break
        if done in eval_steps:
            t_train += time.perf_counter() - t_mark
            curve["step"].append(done)
            curve["val_loss"].append(evaluate(model, val_batches, autocast))
            t_mark = time.perf_counter()
            if not math.isfinite(curve["val_loss"][-1]):
                diverged_at = done
                log(f"{prefix}non-finite validation loss at step {done}: the run diverged; stopping it")
                break
        if done % cfg.log_interval == 0 or done == cfg.iters:
            elapsed = t_train + time.perf_counter() - t_mark
            val = f" | val {curve['val_loss'][-1]:.4f}" if curve["step"] and curve["step"][-1] == done else ""
            log(f"{prefix}step {done}/{cfg.iters} | loss {float(losses[-1]):.4f}{val} | lr {lr:.2e} | "
                f"{elapsed / done:.2f} s/step")
    t_train += time.perf_counter() - t_mark

    train_losses = [float(v) for v in torch.stack(step_losses).tolist()]
    curve["val_loss"] = [v if math.isfinite(v) else None for v in curve["val_loss"]]
    record = {
        "format": RUN_FORMAT,
        "run_id": spec.run_id,
        "seed": spec.seed,
        "arm": spec.arm,
        "mode": spec.mode,
        "placements": list(ARMS[spec.arm]),
        "config": cfg.result_fields(),
        "data_digest": corpus.digest,
        "device": device.type,
        "fused": on_cuda,
        "autocast": "bfloat16" if on_cuda else None,
        "parameters": model.num_params(),
        "environment": environment(),
        "init_digest": init_digest,
        "batches_digest": data_hash.hexdigest(),
        "steps_done": len(train_losses),
        "diverged_at": diverged_at,
        "train_loss_per_step": [round(v, 5) if math.isfinite(v) else None for v in train_losses],
        "curve": curve,
    }
    t_eval = time.perf_counter()
    if diverged_at is None:
        tail = train_losses[-max(1, cfg.iters // 10):]
        record["final"] = {
            "val_loss": curve["val_loss"][-1],
            "val_loss_train_mode": evaluate(model, val_batches, autocast, training=True),
            "train_loss_last10pct": sum(tail) / len(tail),
        }
        leak_windows = data.gather_windows(corpus.val, positions[: cfg.leak_batch], cfg.seq_len)
        record["leak"] = leak_check(model, data.to_inputs_targets(leak_windows, device)[0], autocast, seed=spec.seed)
    else:
        record["final"] = {"val_loss": None, "val_loss_train_mode": None, "train_loss_last10pct": None}
        record["leak"] = None
    now = time.perf_counter()
    record["timing"] = {
        "train_s": t_train,
        "final_eval_s": now - t_eval,
        "wall_s": now - t_start,
        "s_per_step": t_train / max(1, len(train_losses)),
    }
    record["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return record


# ---------------------------------------------------------------------------------------------------------------
# Statistics and verdicts.
# ---------------------------------------------------------------------------------------------------------------


def _summary(values: list[float]) -> dict:
    """n, mean, sample std (ddof 1; 0 for one value), standard error of the mean."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "se": None}
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    return {"n": n, "mean": mean, "std": std, "se": std / math.sqrt(n) if n > 1 else None}


def _paired(improvements: list[float]) -> dict:
    s = _summary(improvements)
    s["t"] = s["mean"] / s["se"] if s["se"] else None
    s["values"] = improvements
    return s


def aggregate(records: list[dict]) -> dict:
    """Per (arm, mode) statistics over seeds, paired against the same seed's baseline.

    improvement_pct per seed = 100 * (baseline - arm) / baseline of the eval-mode validation loss (positive =
    better, the seed's convention); diff per seed = arm - baseline (negative = better).
    """
    by_key: dict[tuple, dict[int, dict]] = {}
    for r in records:
        by_key.setdefault((r["arm"], r["mode"]), {})[r["seed"]] = r
    baseline = by_key.get(("baseline", BASELINE_MODE), {})

    def final(r, name):
        return None if r["final"] is None else r["final"][name]

    groups = []
    for (arm, mode), runs in by_key.items():
        seeds = sorted(runs)
        ok = [s for s in seeds if final(runs[s], "val_loss") is not None]
        entry = {
            "arm": arm,
            "mode": mode,
            "seeds": seeds,
            "diverged_seeds": [s for s in seeds if s not in ok],
            "val_loss": {**_summary([final(runs[s], "val_loss") for s in ok]),
                         "values": {str(s): final(runs[s], "val_loss") for s in ok}},
            "val_loss_train_mode": _summary([final(runs[s], "val_loss_train_mode") for s in ok]),
            "train_loss_last10pct": _summary([final(runs[s], "train_loss_last10pct") for s in ok]),
            "s_per_step": _summary([runs[s]["timing"]["s_per_step"] for s in seeds]),
        }
        if arm != "baseline":
            paired = [s for s in ok if s in baseline and final(baseline[s], "val_loss") is not None]
            base = {s: final(baseline[s], "val_loss") for s in paired}
            arm_loss = {s: final(runs[s], "val_loss") for s in paired}
            entry["paired_seeds"] = paired
            entry["diff"] = _summary([arm_loss[s] - base[s] for s in paired])
            entry["improvement_pct"] = _paired([100.0 * (base[s] - arm_loss[s]) / base[s] for s in paired])
        leaks = [runs[s]["leak"] for s in seeds if runs[s]["leak"] is not None]
        entry["leak"] = {
            phase: {
                "leak": any(lk[phase]["leak"] for lk in leaks) if leaks else None,
                "future_change_max": max((lk[phase]["future_change"] for lk in leaks), default=None),
                "batch_change_max": max((lk[phase]["batch_change"] for lk in leaks), default=None),
            }
            for phase in ("eval", "train")
        }
        groups.append(entry)
    order = {a: i for i, a in enumerate(ARMS)}
    mode_order = {m: i for i, m in enumerate((BASELINE_MODE,) + MODE_ORDER)}
    groups.sort(key=lambda e: (mode_order.get(e["mode"], 99), order.get(e["arm"], 99)))
    return {"groups": groups}


def verdict_for(mean: Optional[float], se: Optional[float], n: int, direction: int,
                claimed: Optional[float] = None) -> tuple[str, str]:
    """(verdict, why) for a claimed effect, from the paired mean and its standard error (both in %, positive =
    better).

    The rule: with fewer than 2 paired seeds, inconclusive. Otherwise with k = SE_MULTIPLE (2):
      confirmed     the mean has the claimed sign and |mean| > k SE;
      refuted       the mean has the opposite sign and |mean| > k SE, or the effect is within noise but the
                    claimed size (if one was claimed) lies outside mean +- k SE: an effect that large is excluded;
      inconclusive  otherwise (within noise, and the claimed size not excluded).
    The verdict is about the direction. For a quantitative claim `size_for` says, separately, whether the
    claimed size lies inside mean +- k SE; `why` says it too.
    """
    if mean is None or n < 2:
        return "inconclusive", f"{n} paired seed(s): no standard error"
    if se == 0:
        return "inconclusive", f"the same change ({mean:+.2f}%) in all {n} seeds: no spread to judge it by"
    k = SE_MULTIPLE
    lo, hi = mean - k * se, mean + k * se
    interval = f"measured {mean:+.2f}% +- {k:g} SE = [{lo:+.2f}, {hi:+.2f}]% (n={n})"
    claimed_text = "" if claimed is None else f"claimed {claimed:+.2f}%; "
    if mean * direction > k * se:
        if claimed is None:
            return "confirmed", f"{interval}"
        if lo <= claimed <= hi:
            size = "the claimed size lies inside the interval"
        else:
            size = f"the effect is {'smaller' if abs(mean) < abs(claimed) else 'larger'} than claimed " \
                   f"({abs(mean) / abs(claimed):.2g}x the claimed size)"
        return "confirmed", f"{claimed_text}{interval}: {size}"
    if -mean * direction > k * se:
        return "refuted", f"{claimed_text}{interval}: a significant effect in the opposite direction"
    if claimed is not None and not lo <= claimed <= hi:
        return "refuted", f"{claimed_text}{interval}: within noise, and an effect of the claimed size is excluded"
    return "inconclusive", f"{claimed_text}{interval}: within noise"


def size_for(mean: Optional[float], se: Optional[float], claimed: Optional[float]) -> str:
    """How the claimed size compares with the measurement: "consistent" (inside mean +- k SE), "smaller" /
    "larger" than claimed (with the ratio), "opposite sign", or "-" when there is no claimed size or no SE."""
    if claimed is None or mean is None or not se:
        return "-"
    k = SE_MULTIPLE
    if mean - k * se <= claimed <= mean + k * se:
        return "consistent"
    if mean * claimed <= 0:
        return "opposite sign"
    return f"{'smaller' if abs(mean) < abs(claimed) else 'larger'} ({mean / claimed:.2g}x claimed)"


def _per_seed_losses(records: list[dict]) -> dict[tuple, dict[int, float]]:
    out: dict[tuple, dict[int, float]] = {}
    for r in records:
        if r["final"] is not None and r["final"]["val_loss"] is not None:
            out.setdefault((r["arm"], r["mode"]), {})[r["seed"]] = r["final"]["val_loss"]
    return out


def _relative_pair(a: dict[int, float], b: dict[int, float], ref: dict[int, float]) -> list[float]:
    """Per seed 100 * (b - a) / ref: how much better a is than b, in % of the seed's baseline."""
    seeds = sorted(set(a) & set(b) & set(ref))
    return [100.0 * (b[s] - a[s]) / ref[s] for s in seeds]


def claim_verdicts(records: list[dict], stats: dict, modes: Iterable[str]) -> list[dict]:
    """One verdict per (claim, mode) that the finished runs can speak to."""
    losses = _per_seed_losses(records)
    base = losses.get(("baseline", BASELINE_MODE), {})
    groups = {(g["arm"], g["mode"]): g for g in stats["groups"]}
    centered_arms = [a for a in ARMS if a != "baseline"]
    out = []

    def add(claim: Claim, mode: str, measured: dict, extra: str = "", verdict=None):
        v, why = verdict or verdict_for(measured["mean"], measured["se"], measured["n"], claim.direction,
                                        claim.claimed_pct)
        out.append({
            "claim": claim.id, "text": claim.text, "mode": mode, "claimed_pct": claim.claimed_pct,
            "measured_pct": measured["mean"], "se_pct": measured["se"], "std_pct": measured["std"],
            "n": measured["n"], "verdict": v, "size": size_for(measured["mean"], measured["se"], claim.claimed_pct),
            "why": (why + extra).strip(),
        })

    for mode in modes:
        for claim in SEED_CLAIMS:
            if claim.kind == "arm":
                g = groups.get((claim.arm, mode))
                if g is None:
                    continue
                if g["diverged_seeds"] and not g["val_loss"]["n"]:
                    # Every seed diverged: as bad as it gets.
                    measured = {"mean": None, "se": None, "std": None, "n": 0}
                    v = ("confirmed" if claim.direction < 0 else "refuted",
                         f"diverged (non-finite loss) in every seed {g['diverged_seeds']}")
                    add(claim, mode, measured, verdict=v)
                    continue
                extra = f"; diverged in seeds {g['diverged_seeds']}" if g["diverged_seeds"] else ""
                add(claim, mode, g["improvement_pct"], extra)
            elif claim.kind == "pair":
                a, b = losses.get((claim.arm, mode)), losses.get((claim.other, mode))
                if a is None or b is None:
                    continue
                add(claim, mode, _paired(_relative_pair(a, b, base)),
                    f" ({claim.arm} vs {claim.other}, in % of the baseline loss)")
            elif claim.kind == "best":
                others = [(arm, losses[(arm, mode)]) for arm in centered_arms
                          if arm != claim.arm and (arm, mode) in losses]
                if (claim.arm, mode) not in losses or not others:
                    continue
                mine = losses[(claim.arm, mode)]
                runner_up, theirs = min(others, key=lambda o: statistics.fmean(o[1].values()))
                add(claim, mode, _paired(_relative_pair(mine, theirs, base)),
                    f" ({claim.arm} vs the best other arm, {runner_up}, in % of the baseline loss)")
    # Mode claims compare modes: the claimed winner against each other mode that ran.
    for claim in SEED_CLAIMS:
        if claim.kind != "mode" or claim.mode_a not in modes:
            continue
        for other in modes:
            if other == claim.mode_a:
                continue
            per_seed = []
            for seed in sorted(base):
                diffs = [100.0 * (losses[(arm, other)][seed] - losses[(arm, claim.mode_a)][seed]) / base[seed]
                         for arm in centered_arms
                         if seed in losses.get((arm, other), {}) and seed in losses.get((arm, claim.mode_a), {})]
                if diffs:
                    per_seed.append(statistics.fmean(diffs))
            if per_seed:
                add(claim, f"{claim.mode_a} vs {other}", _paired(per_seed),
                    f" ({claim.mode_a} vs {other}, averaged over the centered arms per seed, "
                    "in % of the baseline loss)")
    return out


def mode_comparisons(records: list[dict], modes: Iterable[str], reference: str = "adaptive") -> list[dict]:
    """Per centered arm: the `reference` mode against each other mode, paired per seed.

    better_pct per seed = 100 * (loss[other] - loss[reference]) / baseline loss (positive = the reference mode is
    better). The "adaptive" verdict averages these over the arms; this table shows each arm on its own, so one
    arm with a huge difference cannot hide what the others do.
    """
    losses = _per_seed_losses(records)
    base = losses.get(("baseline", BASELINE_MODE), {})
    out = []
    for arm in ARMS:
        for other in modes:
            if arm == "baseline" or other == reference:
                continue
            a, b = losses.get((arm, reference)), losses.get((arm, other))
            if a is None or b is None:
                continue
            out.append({"arm": arm, "reference": reference, "other": other,
                        "better_pct": _paired(_relative_pair(a, b, base))})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Reports: results.json, results.md, plots.
# ---------------------------------------------------------------------------------------------------------------


def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        root = pathlib.Path(__file__).resolve().parents[1]
        env["git_commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def _cpu_name() -> Optional[str]:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _fmt(x, digits=4, sign=False) -> str:
    if x is None:
        return "-"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _pm(s: dict, digits=4, sign=False) -> str:
    if s is None or s.get("mean") is None:
        return "-"
    if s["n"] < 2:
        return _fmt(s["mean"], digits, sign)  # one value: no spread to show
    return f"{_fmt(s['mean'], digits, sign)} ± {_fmt(s['std'], digits)}"


def write_markdown(results: dict, path: pathlib.Path) -> None:
    cfg, runs, stats = results["config"], results["runs"], results["statistics"]
    seeds = sorted({r["seed"] for r in runs})
    wall = sum(r["timing"]["wall_s"] for r in runs)
    devices = sorted({r["device"] for r in runs})
    lines = [
        "# Centering study",
        "",
        f"{len(runs)} runs: {len(seeds)} seeds ({', '.join(map(str, seeds))}), model dim {cfg['dim']}, "
        f"{cfg['n_layers']} layers, {cfg['n_heads']} heads, vocab {cfg['vocab_size']}, "
        f"{runs[0]['parameters']:,} parameters (baseline); {cfg['iters']} steps of {cfg['batch_size']} x "
        f"{cfg['grad_accum_steps']} windows of {cfg['seq_len']} tokens "
        f"({cfg['iters'] * cfg['batch_size'] * cfg['grad_accum_steps'] * cfg['seq_len']:,} training tokens per run); "
        f"AdamW lr {cfg['lr']:g} (warmup {cfg['warmup_iters']}, cosine to {cfg['lr'] * cfg['min_lr_ratio']:g}), "
        f"weight decay {cfg['weight_decay']:g}, clip {cfg['grad_clip']:g}; validation on "
        f"{cfg['eval_batches'] * cfg['batch_size']} fixed windows "
        f"({cfg['eval_batches'] * cfg['batch_size'] * cfg['seq_len']:,} tokens). Device: {', '.join(devices)}"
        f" ({results['environment'].get('cuda_device') or results['environment'].get('cpu')}); "
        f"sum of run wall times {wall / 60:.1f} min.",
        "",
        "Every arm of a seed starts from the same weights and sees the same batches (digests in results.json), so "
        "the change against the baseline is paired per seed: improvement % = 100 * (baseline - arm) / baseline "
        "(positive = better, the seed's convention), then mean ± std over seeds, and SE = std / sqrt(n).",
        "",
        "## Validation loss (eval mode, fixed windows)",
        "",
        "| arm | mode | n | val loss (eval mode) | val loss (train mode) | Δ vs baseline (paired) | improvement % "
        "| SE % | t |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in stats["groups"]:
        imp = g.get("improvement_pct")
        div = f" ({len(g['diverged_seeds'])} diverged)" if g["diverged_seeds"] else ""
        lines.append(
            f"| {g['arm']} | {g['mode']} | {g['val_loss']['n']}{div} | {_pm(g['val_loss'])} | "
            f"{_pm(g['val_loss_train_mode'])} | {_pm(g.get('diff'), 4, True) if imp else '-'} | "
            f"{_pm(imp, 2, True) if imp else '-'} | {_fmt(imp['se'], 2) if imp else '-'} | "
            f"{_fmt(imp['t'], 1) if imp and imp['t'] is not None else '-'} |"
        )
    lines += [
        "",
        "## The seed's claims",
        "",
        f"The seed's numbers are for its own model after 1000 iterations (baseline {SEED_BASELINE_LOSS}); absolute "
        "losses here are not comparable with them, only the direction and the relative size of each effect, and "
        "only at the size that was run. Rule (`verdict_for`): with k = 2 standard errors of the paired mean, **confirmed** if the "
        "mean change has the claimed sign and |mean| > k SE; **refuted** if it has the opposite sign beyond k SE, "
        "or if it is within noise while the claimed size lies outside mean ± k SE; **inconclusive** otherwise. "
        "The verdict is about the direction; the claimed-size column says whether the seed's number lies inside "
        "mean ± k SE (consistent) or the measured effect is smaller or larger (ratio measured / claimed). "
        + (f"With n = {len(seeds)} seeds, a 95% t-interval is ± {T95[len(seeds) - 1]:g} SE, so ± 2 SE is a "
           "looser bar than it looks: treat borderline verdicts (|t| between 2 and that) as such."
           if len(seeds) - 1 in T95 else ""),
        "",
        "| claim | mode | claimed % | measured % (± SE) | verdict (direction) | claimed size | why |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in results["verdicts"]:
        measured = "-" if v["measured_pct"] is None else f"{v['measured_pct']:+.2f} ± {_fmt(v['se_pct'], 2)}"
        claimed = "-" if v["claimed_pct"] is None else f"{v['claimed_pct']:+.2f}"
        lines.append(f"| {v['text']} | {v['mode']} | {claimed} | {measured} | **{v['verdict']}** | {v['size']} | "
                     f"{v['why']} |")
    lines += [
        "",
        "## Modes compared per arm",
        "",
        "Paired per seed: 100 * (loss in the other mode - loss in adaptive) / baseline loss, mean ± SE over seeds "
        "(positive = adaptive better). The adaptive verdict above averages these over the arms.",
        "",
        "| arm | adaptive vs | adaptive better by % (± SE) | t |",
        "|---|---|---|---|",
    ]
    for c in results.get("mode_comparisons", []):
        b = c["better_pct"]
        lines.append(f"| {c['arm']} | {c['other']} | {_fmt(b['mean'], 2, True)} ± {_fmt(b['se'], 2)} | "
                     f"{_fmt(b['t'], 1) if b['t'] is not None else '-'} |")
    lines += [
        "",
        "## Leak check",
        "",
        f"On one validation batch of each trained model: tokens after position t replaced (future), or the other "
        f"sequences replaced (batch); largest change of the logits that must not depend on them, max over seeds. "
        f"Leak = change > {LEAK_TOLERANCE:g} x max|logits|.",
        "",
        "| arm | mode | eval: leak | eval: future / batch change | train: leak | train: future / batch change |",
        "|---|---|---|---|---|---|",
    ]
    for g in stats["groups"]:
        cells = []
        for phase in ("eval", "train"):
            lk = g["leak"][phase]
            if lk["leak"] is None:
                cells += ["-", "-"]
            else:
                cells += ["**yes**" if lk["leak"] else "no",
                          f"{lk['future_change_max']:.2g} / {lk['batch_change_max']:.2g}"]
        lines.append(f"| {g['arm']} | {g['mode']} | " + " | ".join(cells) + " |")
    lines.append("")
    _atomic_write_text(path, "\n".join(lines))


def _arm_colors(arms: list[str]) -> dict:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {arm: cmap(i % 10) for i, arm in enumerate(arms)}


def plot_results(results: dict, out_dir: pathlib.Path) -> Optional[str]:
    """loss_curves.png and bars.png; returns a note instead if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plots skipped (pip install matplotlib)"
    runs, stats = results["runs"], results["statistics"]
    modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in runs)]
    arms = [a for a in ARMS if any(r["arm"] == a for r in runs)]
    colors = _arm_colors(arms)

    def mean_curve(arm, mode):
        curves = [r["curve"] for r in runs if r["arm"] == arm and r["mode"] == mode and r["diverged_at"] is None]
        if not curves:
            return None, None
        steps = curves[0]["step"]
        curves = [c for c in curves if c["step"] == steps]
        return steps, np.mean([c["val_loss"] for c in curves], axis=0)

    def paired_curve(arm, mode):
        base = {r["seed"]: r["curve"] for r in runs if r["arm"] == "baseline" and r["diverged_at"] is None}
        diffs = [np.array(r["curve"]["val_loss"]) - np.array(base[r["seed"]]["val_loss"])
                 for r in runs if r["arm"] == arm and r["mode"] == mode and r["diverged_at"] is None
                 and r["seed"] in base and r["curve"]["step"] == base[r["seed"]]["step"]]
        if not diffs:
            return None, None
        steps = next(r["curve"]["step"] for r in runs if r["arm"] == arm and r["mode"] == mode)
        return steps, np.mean(diffs, axis=0)

    ncols = max(1, len(modes))
    fig, axes = plt.subplots(2, ncols, figsize=(5 * ncols, 8), squeeze=False, sharex=True)
    for j, mode in enumerate(modes or [BASELINE_MODE]):
        top, bottom = axes[0][j], axes[1][j]
        steps, base_curve = mean_curve("baseline", BASELINE_MODE)
        if steps is not None:
            top.plot(steps, base_curve, "k-o", label="baseline", markersize=3, linewidth=2)
        bottom.axhline(0.0, color="k", linewidth=1)
        for arm in arms:
            if arm == "baseline":
                continue
            steps, curve = mean_curve(arm, mode)
            if steps is not None:
                top.plot(steps, curve, "-o", color=colors[arm], label=arm, markersize=3, linewidth=1)
            steps, diff = paired_curve(arm, mode)
            if steps is not None:
                bottom.plot(steps, diff, "-o", color=colors[arm], label=arm, markersize=3, linewidth=1)
        top.set(title=f"mode: {mode}", ylabel="val loss, eval mode (mean over seeds)")
        bottom.set(xlabel="step", ylabel="arm - baseline (paired mean; < 0 = better)")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        top.legend(fontsize=8)
    fig.suptitle("Centering study: validation loss along training")
    fig.tight_layout()
    _save_figure(fig, out_dir / "loss_curves.png")
    plt.close(fig)

    groups = {(g["arm"], g["mode"]): g for g in stats["groups"]}
    centered = [a for a in arms if a != "baseline"]
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(centered) + 2), 5))
    width = 0.8 / max(1, len(modes))
    for j, mode in enumerate(modes):
        xs, ys, errs = [], [], []
        for i, arm in enumerate(centered):
            g = groups.get((arm, mode))
            if g is None or not g.get("improvement_pct") or g["improvement_pct"]["mean"] is None:
                continue
            imp = g["improvement_pct"]
            xs.append(i + (j - (len(modes) - 1) / 2) * width)
            ys.append(imp["mean"])
            errs.append(SE_MULTIPLE * imp["se"] if imp["se"] else 0.0)
        ax.bar(xs, ys, width=width, yerr=errs, capsize=3, label=mode)
    # The seed's claims: a marker where it fits the measured scale, and always a label under the arm (claims
    # like -88% would otherwise squash every measured bar to nothing).
    ax.autoscale_view()
    lo, hi = ax.get_ylim()
    lo, hi = min(lo, -0.5), max(hi, 0.5)
    span = hi - lo
    ax.set_ylim(lo - 0.12 * span, hi)
    for i, arm in enumerate(centered):
        claim = next((c for c in SEED_CLAIMS if c.kind == "arm" and c.arm == arm), None)
        if claim is None:
            continue
        text = f"seed: {claim.claimed_pct:+g}%" if claim.claimed_pct is not None else \
            f"seed: {'better' if claim.direction > 0 else 'worse'}"
        ax.text(i, lo - 0.08 * span, text, ha="center", va="center", fontsize=8)
        if claim.claimed_pct is not None and lo <= claim.claimed_pct <= hi:
            ax.plot([i], [claim.claimed_pct], "kx", markersize=9, mew=2,
                    label="seed's claim (its model, 1000 it.)" if not any(
                        h.get_label().startswith("seed") for h in ax.lines) else None)
    ax.axhline(0.0, color="k", linewidth=1)
    ax.set_xticks(range(len(centered)), centered)
    ax.set(ylabel="improvement over baseline, % (paired; > 0 = better)",
           title="Paired change of the eval-mode val loss (error bars: ± 2 SE)")
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, out_dir / "bars.png")
    plt.close(fig)
    return None


def _save_figure(fig, path: pathlib.Path) -> None:
    data.atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
    data.atomic_write(path, lambda f: f.write(text.encode()))


# ---------------------------------------------------------------------------------------------------------------
# The study: plan, resume, run, report.
# ---------------------------------------------------------------------------------------------------------------


class StudyError(ValueError):
    """The study cannot run as asked (the message says why)."""


def load_runs(out_dir: pathlib.Path) -> list[dict]:
    runs = []
    for path in sorted((out_dir / "runs").glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise StudyError(f"{path}: not valid JSON ({e}); delete it to rerun that run") from e
        if record.get("format") != RUN_FORMAT:
            raise StudyError(f"{path}: not a run record of {RUN_FORMAT}")
        runs.append(record)
    return runs


def _check_compatible(records: list[dict], fields: dict, digest: Optional[str], out_dir: pathlib.Path) -> None:
    """Refuse to mix runs of different configurations or data in one study."""
    for r in records:
        changed = sorted(k for k in set(fields) | set(r["config"]) if fields.get(k) != r["config"].get(k))
        if changed:
            detail = ", ".join(f"{k}: {r['config'].get(k)!r} there, {fields.get(k)!r} now" for k in changed)
            raise StudyError(f"{out_dir}/runs holds runs of another configuration ({detail}); "
                             "use another --out, or the same settings")
        if digest is not None and r["data_digest"] != digest:
            raise StudyError(f"{out_dir}/runs holds runs trained on other data ({r['run_id']}); use another --out")


def build_results(out_dir: pathlib.Path, log: Callable[[str], None] = print, plots: bool = True) -> dict:
    """Rebuild results.json, results.md (and the plots) from every finished run under out_dir/runs."""
    runs = load_runs(out_dir)
    if not runs:
        raise StudyError(f"no finished runs under {out_dir}/runs")
    _check_compatible(runs, runs[0]["config"], runs[0]["data_digest"], out_dir)
    modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in runs)]
    stats = aggregate(runs)
    sessions_path = out_dir / "sessions.jsonl"
    sessions = [json.loads(line) for line in sessions_path.read_text().splitlines()] if sessions_path.exists() else []
    results = {
        "format": "fastcenter.experiments.centering.results/1",
        "config": runs[0]["config"],
        "data_digest": runs[0]["data_digest"],
        "environment": runs[0]["environment"],  # where the runs ran (each run record holds its own)
        "environments_differ": any(r["environment"] != runs[0]["environment"] for r in runs),
        "sessions": sessions,
        "wall_s_sum_of_runs": sum(r["timing"]["wall_s"] for r in runs),
        "claims": [dataclasses.asdict(c) for c in SEED_CLAIMS],
        "verdict_rule": verdict_for.__doc__,
        "statistics": stats,
        "verdicts": claim_verdicts(runs, stats, modes),
        "mode_comparisons": mode_comparisons(runs, modes),
        "runs": sorted(runs, key=lambda r: (r["seed"], r["arm"], r["mode"])),
    }
    _atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1) + "\n")
    write_markdown(results, out_dir / "results.md")
    if plots:
        note = plot_results(results, out_dir)
        if note:
            log(note)
    return results


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def run_study(cfg: StudyConfig, data_dir, out_dir, *, log: Callable[[str], None] = print) -> dict:
    """Run every planned run not already finished under out_dir/runs, then rebuild the results."""
    out_dir = pathlib.Path(out_dir)
    try:
        device = resolve_device(cfg.device)
    except ValueError as e:
        raise StudyError(str(e)) from e
    corpus = load_corpus(data_dir, cfg)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    finished = {r["run_id"]: r for r in load_runs(out_dir)}
    _check_compatible(list(finished.values()), cfg.result_fields(), corpus.digest, out_dir)
    plan = plan_runs(cfg)
    todo = [spec for spec in plan if spec.run_id not in finished]
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    log(
        f"centering study: {len(plan)} runs ({cfg.seeds} seeds x [baseline + {len(cfg.arms) - 1} arms x "
        f"{len(cfg.modes)} modes]), {len(plan) - len(todo)} already finished in {out_dir / 'runs'}; "
        f"{cfg.iters} steps of {cfg.tokens_per_step:,} tokens; data {corpus.data_dir} ({len(corpus.train):,} train / "
        f"{len(corpus.val):,} val tokens); {device.type}"
        f"{' (fused ops, bf16 autocast)' if device.type == 'cuda' else ' (reference ops, float32)'}, "
        f"{torch.get_num_threads()} threads"
    )
    session = {"started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "runs_planned": len(plan), "runs_to_do": len(todo), "runs_done": 0}
    t0 = time.perf_counter()
    base_states: dict[int, dict] = {}
    try:
        for i, spec in enumerate(todo, 1):
            number = plan.index(spec) + 1
            prefix = f"[run {number}/{len(plan)}] seed {spec.seed} {spec.arm} {spec.mode}: "
            if spec.seed not in base_states:
                base_states = {spec.seed: initial_state(cfg, spec.seed)}  # one seed at a time in memory
            record = train_run(spec, cfg, corpus, device, base_state=base_states[spec.seed], log=log, prefix=prefix)
            _atomic_write_text(out_dir / "runs" / f"{spec.run_id}.json", json.dumps(record) + "\n")
            session["runs_done"] += 1
            elapsed = time.perf_counter() - t0
            eta = elapsed / i * (len(todo) - i)
            final = record["final"]
            leak = record["leak"]
            leak_text = "-" if leak is None else (
                f"eval {'YES' if leak['eval']['leak'] else 'no'} / train {'YES' if leak['train']['leak'] else 'no'}")
            result = "DIVERGED" if final["val_loss"] is None else (
                f"val {final['val_loss']:.4f} (train mode {final['val_loss_train_mode']:.4f})")
            log(f"{prefix}done: {result}, leak {leak_text}, {record['timing']['wall_s']:.0f} s; "
                f"{i}/{len(todo)} this session, elapsed {_format_seconds(elapsed)}, ETA {_format_seconds(eta)}")
            build_results(out_dir, log, plots=False)  # partial results stay current
    finally:
        session["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        session["wall_s"] = time.perf_counter() - t0
        with open(out_dir / "sessions.jsonl", "a") as f:
            f.write(json.dumps(session) + "\n")
    results = build_results(out_dir, log)
    log(f"wrote {out_dir / 'results.json'}, results.md, loss_curves.png, bars.png")
    return results


# ---------------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------------


def prepare_text_corpus(sources: list[str], out_dir: pathlib.Path, log: Callable[[str], None] = print) -> pathlib.Path:
    """Tokenize text files into out_dir/data once (reused when its meta.json lists the same sources)."""
    data_dir = out_dir / "data"
    sources = [str(pathlib.Path(s).resolve()) for s in sources]
    meta_path = data_dir / "meta.json"
    if meta_path.is_file() and (data_dir / "train.bin").is_file() and (data_dir / "val.bin").is_file():
        if json.loads(meta_path.read_text()).get("sources") == sources:
            log(f"data: reusing {data_dir} (prepared from {', '.join(sources)})")
            return data_dir
    log(f"data: tokenizing {', '.join(sources)} with GPT-2 BPE into {data_dir}")
    data.prepare(sources, data_dir, log=log)
    return data_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastcenter.experiments",
                                     description="Experiments with the fastcenter model.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "centering",
        help="the vector-centering study (paired seeds, eval-mode validation, leak check, verdicts)",
        description=__doc__.split("\n\n")[0] + " Runs the study described in fastcenter/experiments.py; "
        "finished runs under --out are skipped, so an interrupted study continues where it stopped.",
    )
    d = StudyConfig()
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="DIR", help="directory holding train.bin and val.bin (GPT-2 token ids)")
    source.add_argument("--text", nargs="+", metavar="FILE_OR_DIR",
                        help="text files or directories (*.txt) to tokenize into OUT/data first")
    p.add_argument("--out", required=True, metavar="DIR", help="study directory (runs/, results.*, plots)")
    p.add_argument("--iters", type=int, default=d.iters, help=f"optimizer steps per run (default {d.iters})")
    p.add_argument("--seeds", type=int, default=d.seeds, help=f"paired seeds (default {d.seeds})")
    p.add_argument("--seed-offset", type=int, default=0, help="first seed (default 0): seeds are offset..offset+K-1")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)} (default: all; "
                   "the baseline always runs)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help=f"comma list of {', '.join(CENTERING_MODES)} (default {','.join(DEFAULT_MODES)})")
    for name, help_text in (("dim", "model width"), ("n_layers", "blocks"), ("n_heads", "attention heads"),
                            ("seq_len", "tokens per window"), ("batch_size", "windows per micro-batch"),
                            ("grad_accum_steps", "micro-batches per step"),
                            ("eval_batches", "validation batches of batch-size fixed windows"),
                            ("eval_points", "validation evaluations along each run (the last at --iters)"),
                            ("leak_batch", "sequences in the leak-check batch"),
                            ("log_interval", "print the training loss every N steps")):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name),
                       help=f"{help_text} (default {getattr(d, name)})")
    for name, help_text in (("lr", "peak learning rate"), ("min_lr_ratio", "cosine ends at lr * this"),
                            ("weight_decay", "AdamW weight decay on matrices"), ("beta1", "AdamW beta1"),
                            ("beta2", "AdamW beta2"), ("grad_clip", "gradient norm clip (0: off)")):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name),
                       help=f"{help_text} (default {getattr(d, name):g})")
    p.add_argument("--warmup-iters", type=int, default=None, help="linear warmup steps (default iters // 10)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rebuild results.json, results.md and the plots from OUT/runs")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = pathlib.Path(args.out)
    try:
        if args.report_only:
            build_results(out_dir)
            print(f"rebuilt {out_dir / 'results.json'}, results.md and the plots from {out_dir / 'runs'}")
            return 0
        fields = {f.name for f in dataclasses.fields(StudyConfig)}
        try:
            cfg = StudyConfig(**{k: v for k, v in vars(args).items() if k in fields})
        except ValueError as e:
            raise StudyError(str(e)) from e
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.data:
            data_dir = pathlib.Path(args.data)
            print(f"data: {data_dir}")
        elif args.text:
            data_dir = prepare_text_corpus(args.text, out_dir)
        else:
            print("No --data or --text given: using the demo corpus (the Python standard library's own source).")
            data_dir = data.ensure_demo_corpus()
        run_study(cfg, data_dir, out_dir)
    except (StudyError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
