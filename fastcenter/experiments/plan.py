"""The study's design fixed in code: arms, modes, the seed's claims, the configuration, the plan of runs, and
the paired initial weights. See fastcenter/experiments/__init__.py for the design as a whole."""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from .. import data
from ..config import TrainConfig
from ..model import GPT, PLACEMENTS, GPTConfig
from ..nn import CENTERING_MODES, VectorCentering

# Arm name -> placements. "all" is every placement at once (the seed's "aggressive" centering). The residual
# stream is tested whole ("residual", as the seed did) and in its two parts: the inner blocks, and the final
# stream alone, whose mean direction carries the token-frequency prior of this bias-free, tied-embedding model.
ARMS = {
    "baseline": (),
    "embeddings": ("embeddings",),
    "v": ("v",),
    "qk": ("qk",),
    "qk+v": ("qk", "v"),
    "residual-inner": ("residual_inner",),
    "residual-final": ("residual_final",),
    "residual": ("residual",),
    "mlp": ("mlp",),
    "all": PLACEMENTS,
}
# The study's pre-registered design (issue 13): the seed's recommended mode and the best-behaved other one.
DEFAULT_ARMS = ("baseline", "embeddings", "v", "qk+v", "residual-inner", "residual")
DEFAULT_MODES = ("adaptive", "causal")
BASELINE_MODE = "none"  # the mode label of baseline runs (no centering)
# Order of modes in tables and plots: the seed's recommended mode first.
MODE_ORDER = ("adaptive", "simple", "causal", "momentum", "learnable")
RUN_FORMAT = "fastcenter.experiments.centering/1"
# A logit change above this fraction of max|logits| counts as a leak. Without a leak the change is exactly 0 (the
# other rows of every matmul do not enter a row's result); with one it is orders of magnitude larger.
LEAK_TOLERANCE = 1e-5


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
    arms: tuple = DEFAULT_ARMS
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
    eval_points: int = 8
    leak_batch: int = 4
    log_interval: int = 10
    # fastcenter's fused ops (Triton on a GPU, the CPU implementation on a CPU) or the eager reference.
    fused: bool = True
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

    def train_config(self, seed: int, device: torch.device) -> TrainConfig:
        """The training core's configuration of one run: the shared step, schedule and evaluation windows."""
        return TrainConfig(
            batch_size=self.batch_size, grad_accum_steps=self.grad_accum_steps, seq_len=self.seq_len,
            max_iters=self.iters, lr=self.lr, min_lr_ratio=self.min_lr_ratio, warmup_iters=self.warmup_iters,
            lr_decay_iters=self.iters, weight_decay=self.weight_decay, beta1=self.beta1, beta2=self.beta2,
            grad_clip=self.grad_clip, eval_interval=self.iters, eval_iters=self.eval_batches,
            log_interval=self.log_interval, seed=seed, device=device.type,
            dtype="bfloat16" if device.type == "cuda" else "float32",
        )  # fmt: skip

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


def model_config(cfg: StudyConfig, arm: str, mode: str) -> GPTConfig:
    return GPTConfig(**cfg.model_fields(), center=ARMS[arm], centering_mode=mode if ARMS[arm] else "adaptive",
                     fused=cfg.fused)


# ---------------------------------------------------------------------------------------------------------------
# Paired initial weights.
# ---------------------------------------------------------------------------------------------------------------


def initial_state(cfg: StudyConfig, seed: int) -> dict:
    """The baseline model's initial weights for `seed` (built on the CPU: the same on every device)."""
    torch.manual_seed(seed)
    return GPT(model_config(cfg, "baseline", BASELINE_MODE)).state_dict()


def build_model(cfg: StudyConfig, spec: RunSpec, base_state: Optional[dict] = None) -> GPT:
    """The model of one run, holding the seed's baseline weights; centering modules start empty.

    Every key the arm's model has beyond the baseline's must belong to a VectorCentering module (its running
    statistics, or a learnable centre), and those are checked to be zero.
    """
    base_state = initial_state(cfg, spec.seed) if base_state is None else base_state
    model = GPT(model_config(cfg, spec.arm, spec.mode))
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


