"""The study's design fixed in code: arms, modes, the claims, the configuration, the plan of runs, and the paired
initial weights. See fastcenter/experiments/__init__.py for the design as a whole."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ..config import TrainConfig
from ..model import GPT, PLACEMENTS, GPTConfig
from ..nn import CENTERING_MODES, VectorCentering
from .centering import use_naive_centering

# Arm name -> placements. "all" is every placement at once (the claims' "aggressive" centering). The residual
# stream is tested whole ("residual", as the claims did) and in its two parts: the inner blocks, and the final
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
# The library's modes, and the study's leak control (fastcenter/experiments/centering.py: batch statistics in
# evaluation too), which is no mode of the library.
NAIVE_MODE = "naive"
STUDY_MODES = CENTERING_MODES + (NAIVE_MODE,)
# Defaults of --arms and --modes: the claims' recommended mode and the leak-free causal one. Each committed study
# names its own arms and modes in its command (bench/results/centering/*/).
DEFAULT_ARMS = ("baseline", "embeddings", "v", "qk+v", "residual-inner", "residual")
DEFAULT_MODES = ("adaptive", "causal")
BASELINE_MODE = "none"  # the mode label of baseline runs (no centering)
# Order of modes in tables and plots: the claims' recommended mode first, the leak control last.
MODE_ORDER = ("adaptive", "simple", "causal", "momentum", "learnable", NAIVE_MODE)
# Run records of this format are read and written; they may gain fields, never lose them.
RUN_FORMAT = "fastcenter.experiments.centering/1"
# A logit change above this fraction of max|logits| counts as a leak. Without a leak the change is exactly 0 (the
# other rows of every matmul do not enter a row's result); with one it is orders of magnitude larger.
LEAK_TOLERANCE = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# The claims: the origin study's table (val loss after 1000 iterations) and statements.
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """One claim of the origin study, tested per mode.

    kind "arm": the paired change of `arm` against the baseline; `claimed_pct` in the claims' convention
    (positive = lower loss = better) or None for a claim of direction only (`direction` +1 better, -1 worse).
    kind "pair": arm `arm` against arm `other` (same seeds, same mode); positive = `arm` better.
    kind "best": `arm` is better than every other centered arm (tested against each).
    kind "mode": mode `mode_a` against every other mode run, per arm and averaged over the centered arms.
    """

    id: str
    text: str
    kind: str
    direction: int
    arm: str = ""
    other: str = ""
    claimed_pct: float | None = None
    claimed_loss: float | None = None
    mode_a: str = ""


CLAIMED_BASELINE_LOSS = 5.0749
CLAIMS = (
    Claim(
        "embeddings",
        "embeddings centered: +2.26% (4.9603 vs 5.0749)",
        "arm",
        +1,
        "embeddings",
        claimed_pct=2.26,
        claimed_loss=4.9603,
    ),
    Claim("qk+v", "qk + v centered: +1.89% (4.9791)", "arm", +1, "qk+v", claimed_pct=1.89, claimed_loss=4.9791),
    Claim("v", "v only: +1.13% (5.0174)", "arm", +1, "v", claimed_pct=1.13, claimed_loss=5.0174),
    Claim("qk", 'qk centering helps ("time-tested technique", no number given)', "arm", +1, "qk"),
    Claim("residual", "residual centering hurts: -11.73%", "arm", -1, "residual", claimed_pct=-11.73),
    Claim("mlp", "mlp centering hurts: -0.57%", "arm", -1, "mlp", claimed_pct=-0.57),
    Claim("all", 'everything centered ("aggressive") is catastrophic: -88%', "arm", -1, "all", claimed_pct=-88.0),
    Claim("v>qk", "values matter more than q/k: v beats qk", "pair", +1, "v", other="qk"),
    Claim("embeddings-best", "embeddings centering is the most effective placement", "best", +1, "embeddings"),
    Claim("adaptive", "adaptive is the recommended mode: it beats the other modes", "mode", +1, mode_a="adaptive"),
)

# What the claims ran, as far as their document says: nanoGPT at 384-768 wide, 1000 iterations. It states no
# depth, heads, biases, batch size or context length. The default model is another architecture; the model's
# options rebuild nanoGPT's (fastcenter.model.NANOGPT).
CLAIMS_ARCHITECTURE = {"norm": "layernorm", "positions": "learned", "mlp": "gelu"}
CLAIMS_WIDTHS = (384, 768)
CLAIMS_ITERS = 1000
ARCHITECTURE_WORDS = {
    "norm": {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"},
    "positions": {"rope": "rotary positions", "learned": "learned absolute positions"},
    "mlp": {"swiglu": "SwiGLU MLP", "gelu": "GELU MLP"},
}
# The batch the project takes for "the claims' scale" (the default configuration's 16 x 4 x 512): an assumption,
# since the claims' document names none.
ASSUMED_CLAIMS_TOKENS_PER_STEP = 16 * 4 * 512


def architecture(model: dict) -> dict:
    """The architecture options of a recorded model configuration (`GPTConfig.to_dict()`); those it lacks (records
    written before the options existed) are the default model's."""
    return {name: model.get(name, getattr(GPTConfig, name)) for name in (*CLAIMS_ARCHITECTURE, "bias")}


def describe_architecture(arch: dict) -> str:
    """'LayerNorm, learned absolute positions, GELU MLP' (+ ', biases' where a recorded architecture has them)."""
    words = [ARCHITECTURE_WORDS[name][arch[name]] for name in CLAIMS_ARCHITECTURE]
    return ", ".join(words + (["biases"] if arch.get("bias") else []))


def scale_differences(config: dict, model: dict) -> list[str]:
    """How a study's configuration (its result fields, and its runs' recorded model configuration `model`) differs
    from the claims'. Any difference makes every verdict one "at this scale"."""
    tokens_per_step = config["batch_size"] * config["grad_accum_steps"] * config["seq_len"]
    run_tokens = config["iters"] * tokens_per_step
    notes = []
    arch = architecture(model)
    if any(arch[name] != value for name, value in CLAIMS_ARCHITECTURE.items()):
        notes.append(
            f"architecture: {describe_architecture(arch)}; the claims': {describe_architecture(CLAIMS_ARCHITECTURE)} "
            "(nanoGPT)"
        )
    if not CLAIMS_WIDTHS[0] <= config["dim"] <= CLAIMS_WIDTHS[1]:
        notes.append(f"width {config['dim']}; the claims': {CLAIMS_WIDTHS[0]}-{CLAIMS_WIDTHS[1]}")
    if config["iters"] != CLAIMS_ITERS:
        notes.append(
            f"{config['iters']:,} steps; the claims': {CLAIMS_ITERS:,} iterations "
            f"({CLAIMS_ITERS / config['iters']:.3g}x this run's)"
        )
    assumed = CLAIMS_ITERS * ASSUMED_CLAIMS_TOKENS_PER_STEP
    notes.append(
        f"{tokens_per_step:,} tokens per step ({config['batch_size']} x {config['grad_accum_steps']} x "
        f"{config['seq_len']}), {run_tokens:,} per run; the claims state no batch size: only if they used the "
        f"default configuration's 16 x 4 x 512 would their run have seen {assumed / run_tokens:.3g}x these tokens"
    )
    return notes


# ---------------------------------------------------------------------------------------------------------------
# Configuration and the plan.
# ---------------------------------------------------------------------------------------------------------------

# The study's flags: name -> (part of StudyConfig, field there, help). The names are the command line's and the
# keys of `StudyConfig.result_fields()` (which run records hold), so they stay as they are.
FLAGS = {
    "iters": ("train", "max_iters", "optimizer steps per run"),
    "vocab_size": (
        "model",
        "vocab_size",
        "vocabulary size (default: the data's: its meta.json for a compacted corpus, else GPT-2's)",
    ),
    "dim": ("model", "dim", "model width"),
    "n_layers": ("model", "n_layers", "blocks"),
    "n_heads": ("model", "n_heads", "attention heads"),
    "seq_len": ("train", "seq_len", "tokens per window"),
    "batch_size": ("train", "batch_size", "windows per micro-batch"),
    "grad_accum_steps": ("train", "grad_accum_steps", "micro-batches per step"),
    "lr": ("train", "lr", "peak learning rate"),
    "min_lr_ratio": ("train", "min_lr_ratio", "cosine ends at lr * this"),
    "warmup_iters": ("train", "warmup_iters", "linear warmup steps (default iters // 10)"),
    "weight_decay": ("train", "weight_decay", "AdamW weight decay on matrices"),
    "beta1": ("train", "beta1", "AdamW beta1"),
    "beta2": ("train", "beta2", "AdamW beta2"),
    "grad_clip": ("train", "grad_clip", "gradient norm clip (0: off)"),
    "eval_batches": ("train", "eval_iters", "validation batches of batch-size fixed windows"),
    "eval_points": ("study", "eval_points", "validation evaluations along each run (the last at --iters)"),
    "leak_batch": ("study", "leak_batch", "sequences in the leak-check batch"),
    "fused": (
        "model",
        "fused",
        "fastcenter's fused ops (Triton on a GPU, the CPU implementation on a CPU); --no-fused: the eager reference",
    ),
    "norm": ("model", "norm", "rmsnorm, or layernorm (nanoGPT's)"),
    "mlp": ("model", "mlp", "swiglu, or gelu (nanoGPT's)"),
    "positions": ("model", "positions", "rope, or learned (nanoGPT's absolute position embedding)"),
    "bias": ("model", "bias", "a bias in every linear and LayerNorm (nanoGPT's)"),
    "norm_eps": ("model", "norm_eps", "epsilon of the norms (nanoGPT's LayerNorm: 1e-5)"),
    "seeds": ("study", "seeds", "paired seeds"),
    "seed_offset": ("study", "seed_offset", "first seed: seeds are offset..offset+K-1"),
    "log_interval": ("train", "log_interval", "print the training loss every N steps"),
    "device": ("train", "device", "auto (cuda if available), cpu or cuda"),
}
NOT_RESULTS = ("seeds", "seed_offset", "log_interval", "device")  # flags that decide which runs, or nothing
# Flags added after studies were recorded: in the result fields only where they leave the default model's value,
# so that the runs recorded before them still agree with a study of the default model.
ONLY_WHEN_CHANGED = ("norm", "mlp", "positions", "bias", "norm_eps")
# Fields each run sets for itself (or that decide nothing): not part of a study's configuration.
PER_RUN = {
    "model": ("center", "centering_mode", "max_seq_len"),
    "train": ("data", "out_dir", "resume", "seed", "device", "dtype", "eval_interval"),
}


@dataclass
class StudyConfig:
    """The study: which runs (seeds, arms, modes), and in `model` and `train` everything that decides a run's
    numbers except its (seed, arm, mode).

    `model` is the baseline's model configuration (each arm sets `center` and `centering_mode`), `train` the
    training core's (each run sets its seed, device and autocast dtype; see `run_config`). An entry of `arms` is
    an arm, run in every mode of `modes`, or "arm/mode", that pair alone; the baseline always runs.
    Build it from the command line's names with `StudyConfig.from_flags(iters=..., dim=..., ...)`.
    """

    model: GPTConfig = field(default_factory=lambda: GPTConfig(fused=True))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_iters=1000, warmup_iters=100))
    seeds: int = 3
    seed_offset: int = 0
    arms: tuple = DEFAULT_ARMS
    modes: tuple = DEFAULT_MODES
    eval_points: int = 8
    leak_batch: int = 4

    def __post_init__(self):
        if not isinstance(self.model, GPTConfig) or not isinstance(self.train, TrainConfig):
            raise TypeError("model must be a GPTConfig and train a TrainConfig")
        self.modes = parse_modes(self.modes)
        self.arms = parse_arms(self.arms)
        self.cells = plan_cells(self.arms, self.modes)
        for name in ("seeds", "eval_points"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.seed_offset, int) or self.seed_offset < 0:
            raise ValueError(f"seed_offset must be an int >= 0, got {self.seed_offset!r}")
        if self.train.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (the leak check splits a window), got {self.train.seq_len}")
        if self.model.max_seq_len < self.train.seq_len:
            raise ValueError(f"the model's max_seq_len {self.model.max_seq_len} < seq_len {self.train.seq_len}")
        windows = self.train.eval_iters * self.train.batch_size
        if not 2 <= self.leak_batch <= windows:
            raise ValueError(
                f"leak_batch must be >= 2 (the batch-leak check needs other sequences) and at most "
                f"the {windows} validation windows, got {self.leak_batch}"
            )

    @classmethod
    def from_flags(cls, **flags) -> StudyConfig:
        """A StudyConfig from the command line's names (`FLAGS`): `from_flags(iters=400, dim=256, ...)`.

        Defaults: the default model with fused ops, TrainConfig's training defaults, 1000 steps with warmup
        iters // 10, and the model's max_seq_len equal to seq_len."""
        unknown = sorted(set(flags) - set(FLAGS) - {"arms", "modes"})
        if unknown:
            raise ValueError(f"unknown study setting(s) {unknown}")
        parts = {"model": {"fused": True}, "train": {"max_iters": 1000}, "study": {}}
        for name, value in flags.items():
            part, name_there = FLAGS[name][:2] if name in FLAGS else ("study", name)
            parts[part][name_there] = value
        train = parts["train"]
        if "warmup_iters" not in train and isinstance(train["max_iters"], int):
            train["warmup_iters"] = max(1, train["max_iters"] // 10)
        try:
            train_cfg = TrainConfig(**train)
        except ValueError as e:  # TrainConfig names its own flags; say the study's
            names = {"--" + FLAGS[k][1].replace("_", "-"): "--" + k.replace("_", "-") for k in FLAGS}
            raise ValueError(re.sub(r"--[a-z-]+", lambda m: names.get(m.group(0), m.group(0)), str(e))) from None
        model_cfg = GPTConfig(**parts["model"], max_seq_len=train_cfg.seq_len)
        return cls(model=model_cfg, train=train_cfg, **parts["study"])

    def flag_value(self, name: str):
        part, name_there = FLAGS[name][:2]
        return getattr(self if part == "study" else getattr(self, part), name_there)

    def result_fields(self) -> dict:
        """The fields that decide a run's numbers (not which runs are planned): runs agree iff these agree.

        The flags' values under the flags' names (those of ONLY_WHEN_CHANGED where they leave their default); a
        field of `model` or `train` that has no flag enters as "model.<field>" / "train.<field>", and only when
        it differs from its default, so that the records written before it existed still agree."""
        default_model = GPTConfig()
        out = {
            name: self.flag_value(name)
            for name in FLAGS
            if name not in NOT_RESULTS
            and (name not in ONLY_WHEN_CHANGED or self.flag_value(name) != getattr(default_model, FLAGS[name][1]))
        }
        flagged = {part: {spec[1] for spec in FLAGS.values() if spec[0] == part} for part in ("model", "train")}
        for part, cfg in (("model", self.model), ("train", self.train)):
            default = type(cfg)()
            for f in dataclasses.fields(cfg):
                if f.name in flagged[part] or f.name in PER_RUN[part]:
                    continue
                value = getattr(cfg, f.name)
                if value != getattr(default, f.name):
                    out[f"{part}.{f.name}"] = value
        return out

    def run_config(self, seed: int, device: torch.device) -> TrainConfig:
        """The training core's configuration of one run: the shared step, schedule and evaluation windows."""
        return dataclasses.replace(
            self.train,
            seed=seed,
            device=device.type,
            eval_interval=self.train.max_iters,
            dtype="bfloat16" if device.type == "cuda" else "float32",
            # Every arm splits its batch the same way: train.py's "auto" micro-batch keeps batch_size only for
            # models with centering, and a baseline split otherwise would round differently from its arms.
            micro_batch=self.train.batch_size,
        )

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seed_offset, self.seed_offset + self.seeds))

    @property
    def eval_steps(self) -> list[int]:
        return eval_steps(self.train.max_iters, self.eval_points)


def eval_steps(iters: int, points: int) -> list[int]:
    """Steps (after that many updates) where a study measures the validation loss; the last is `iters`."""
    return sorted({max(1, round(i * iters / points)) for i in range(1, points + 1)})


def parse_modes(modes) -> tuple:
    names = [m.strip() for m in modes.split(",")] if isinstance(modes, str) else list(modes)
    names = tuple(dict.fromkeys(m for m in names if m))
    unknown = [m for m in names if m not in STUDY_MODES]
    if unknown or not names:
        raise ValueError(f"modes must be a non-empty subset of {STUDY_MODES}, got {list(names)}")
    return names


def parse_arms(arms) -> tuple:
    """The entries of --arms ("arm" or "arm/mode"), checked; the baseline first."""
    names = [a.strip() for a in arms.split(",")] if isinstance(arms, str) else list(arms)
    entries = []
    for name in (n for n in names if n):
        arm, _, mode = name.partition("/")
        if arm not in ARMS:
            raise ValueError(f"unknown arm(s) [{arm!r}]; arms are {', '.join(ARMS)}")
        if arm == "baseline":
            if mode not in ("", BASELINE_MODE):
                raise ValueError(f"the baseline has no centering mode, got {name!r}")
            continue
        if mode and mode not in STUDY_MODES:
            raise ValueError(f"unknown mode {mode!r} in {name!r}; modes are {', '.join(STUDY_MODES)}")
        entries.append(name)
    # The baseline is what every arm is compared with: always run it, first.
    return ("baseline",) + tuple(dict.fromkeys(entries))


def plan_cells(arms: tuple, modes: tuple) -> tuple:
    """(arm, mode) of every centered run of one seed, in plan order: the bare arms in every mode (mode-major),
    then the "arm/mode" entries as given."""
    bare = [a for a in arms if a != "baseline" and "/" not in a]
    pairs = [(arm, mode) for mode in modes for arm in bare]
    pairs += [tuple(a.split("/")) for a in arms if "/" in a]
    return tuple(dict.fromkeys(pairs))


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
        plan.extend(RunSpec(seed, arm, mode) for arm, mode in cfg.cells)
    return plan


def model_config(cfg: StudyConfig, arm: str, mode: str) -> GPTConfig:
    """The model configuration of an arm. The naive leak control is built in simple mode (whose training it
    is), and `build_model` swaps its centering modules."""
    placements = ARMS[arm]
    mode = "simple" if mode == NAIVE_MODE else mode
    return dataclasses.replace(
        cfg.model, center=placements, centering_mode=mode if placements else cfg.model.centering_mode
    )


# ---------------------------------------------------------------------------------------------------------------
# Paired initial weights.
# ---------------------------------------------------------------------------------------------------------------


def initial_state(cfg: StudyConfig, seed: int) -> dict:
    """The baseline model's initial weights for `seed` (built on the CPU: the same on every device)."""
    torch.manual_seed(seed)
    return GPT(model_config(cfg, "baseline", BASELINE_MODE)).state_dict()


def build_model(cfg: StudyConfig, spec: RunSpec, base_state: dict | None = None) -> GPT:
    """The model of one run, holding the seed's baseline weights; centering modules start empty.

    Every key the arm's model has beyond the baseline's must belong to a VectorCentering module (its running
    statistics, or a learnable centre), and those are checked to be zero.
    """
    base_state = initial_state(cfg, spec.seed) if base_state is None else base_state
    model = GPT(model_config(cfg, spec.arm, spec.mode))
    if spec.mode == NAIVE_MODE:
        use_naive_centering(model)
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
