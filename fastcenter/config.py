"""A training run's configuration: `TrainConfig`, and one command-line flag per field of it and of GPTConfig.

Flags use dashes (`--grad-accum-steps 8`, `--center qk,v`, booleans as `--fused` / `--no-fused`). With
`--resume`, the run continues from `<out-dir>/ckpt.pt` with the configuration saved there, and the flags given
on the command line override it (e.g. `--max-iters` to extend a run); the model's shape cannot change.

Every invalid value -- out of range, not finite, beyond float32's range (the precision the run computes in),
of the wrong type -- is a `UsageError` whose message names the flag and what it must be: the command line
prints it as one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import re
import typing
from dataclasses import dataclass, field

from . import checkpoint, data
from .model import MLPS, NORMS, POSITIONS, GPTConfig
from .nn import CENTERING_MODES
from .ops._dispatch import is_real

__all__ = ["UsageError", "TrainConfig", "build_parser", "resolve_configs", "CHOICES", "CPU_COMMAND"]

# The README's run for a machine without a GPU ("On a CPU"; a test keeps the two equal): a model sized so that
# the loss visibly falls within about five minutes on two cores. train.py suggests it after a first CPU step.
CPU_COMMAND = (
    "python train.py --fused --device cpu --out-dir out-cpu --dim 128 --n-layers 2 --n-heads 4 --seq-len 128 "
    "--batch-size 8 --grad-accum-steps 1 --max-iters 300 --warmup-iters 30 --eval-interval 100 --eval-iters 4 "
    "--log-interval 10"
)


class UsageError(ValueError):
    """A configuration that cannot run (the message says which flag, and what to do)."""


FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: every float flag must fit in float32


def opt(default, help: str):
    """A config field with its command-line help."""
    return field(default=default, metadata={"help": help})


CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "centering_mode": CENTERING_MODES,
    "norm": NORMS,
    "mlp": MLPS,
    "positions": POSITIONS,
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """Everything about a run except the model's shape (that is GPTConfig). Defaults = the default configuration."""

    data: str = opt("", "directory holding train.bin and val.bin; empty: the demo corpus (stdlib source)")
    out_dir: str = opt("out", "run directory: config.json, metrics.jsonl, ckpt.pt, loss.png")
    resume: bool = opt(False, "continue from <out-dir>/ckpt.pt with its saved config (flags given override)")
    # The global batch: batch_size x grad_accum_steps sequences of seq_len tokens per optimizer step, run in
    # micro-batches of micro_batch sequences per process (any split computes the same mean loss and gradient).
    batch_size: int = opt(
        16, "the global batch is batch_size x grad_accum_steps sequences per step; also the validation batch"
    )
    grad_accum_steps: int = opt(
        4, "see --batch-size (micro-batches of batch_size over all processes; --micro-batch says how they run)"
    )
    micro_batch: typing.Union[int, str] = opt(
        "auto",
        "sequences per forward and backward (per process), a divisor of the sequences each process runs per "
        "step; the global batch and the data order stay those of batch_size x grad_accum_steps. auto: on CUDA "
        "the largest that fits the GPU's free memory (measured with two small trial steps before training), "
        "batch_size on a CPU or with centering (its statistics are per forward)",
    )
    seq_len: int = opt(512, "tokens per training sequence")
    # Optimisation: AdamW, linear warmup, cosine decay to lr * min_lr_ratio at lr_decay_iters.
    max_iters: int = opt(50_000, "optimizer steps to train for")
    lr: float = opt(1e-3, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "the cosine decay ends at lr * min_lr_ratio")
    warmup_iters: int = opt(1000, "steps of linear warmup")
    lr_decay_iters: int = opt(0, "step where the cosine decay ends; 0: max_iters")
    weight_decay: float = opt(0.1, "AdamW weight decay, on matrices only")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this; 0: off")
    # Evaluation, logging, checkpoints (a checkpoint is written after every evaluation and at the end).
    eval_interval: int = opt(500, "evaluate on the fixed validation windows, and checkpoint, every N steps")
    eval_iters: int = opt(20, "validation batches of batch_size windows")
    log_interval: int = opt(10, "log every N steps, and step 1 (the only steps that wait for the GPU)")
    # System.
    seed: int = opt(1337, "seed of the initialisation and of the data order")
    device: str = opt("auto", "auto (cuda if available), cpu or cuda")
    dtype: str = opt("auto", "autocast dtype; auto: bfloat16 on CUDA (float16 if unsupported), float32 on CPU")
    compile: bool = opt(False, "wrap the model in torch.compile")
    cuda_graph: bool = opt(
        False,
        "run each step's forwards, backwards and clipping as one CUDA graph (captured after 3 eager steps); "
        "off by default until a GPU run shows it right and faster. Where it cannot run (no CUDA, float16, "
        "torchrun, --compile, FASTCENTER_CHECKS=1, or a capture that fails) the run says so in one line and "
        "trains uncaptured",
    )

    def __post_init__(self):
        def bad(name, expected):
            raise UsageError(f"{flag(name)} must be {expected}, got {getattr(self, name)!r}")

        for name in (
            "batch_size",
            "grad_accum_steps",
            "seq_len",
            "max_iters",
            "eval_interval",
            "eval_iters",
            "log_interval",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(name, "an integer >= 1")
        for name in ("warmup_iters", "lr_decay_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                bad(name, "an integer >= 0")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            bad("seed", "an integer in [0, 2**32)")  # what NumPy's global generator takes
        ranges = {  # name: (test, what it must be)
            "lr": (lambda v: v > 0, "a finite number > 0"),
            "min_lr_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
            "weight_decay": (lambda v: v >= 0, "a finite number >= 0"),
            "beta1": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
            "beta2": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
            "grad_clip": (lambda v: v >= 0, "a finite number >= 0 (0: no clipping)"),
        }
        for name, (ok, expected) in ranges.items():
            value = getattr(self, name)
            if not _is_float32(value) or not ok(value):
                big = is_real(value) and math.isfinite(value) and ok(value)  # in range, but not in float32's
                bad(name, f"within float32's range (at most {FLOAT32_MAX:.4g})" if big else expected)
            setattr(self, name, float(value))
        for name in ("device", "dtype"):
            if getattr(self, name) not in CHOICES[name]:
                bad(name, f"one of {', '.join(CHOICES[name])}")
        micro = self.micro_batch
        if isinstance(micro, str) and micro.strip().isdigit():  # as config.json or a command line spells it
            micro = int(micro)
        if isinstance(micro, str) and micro.strip().lower() == "auto":
            micro = "auto"
        if micro != "auto" and (not isinstance(micro, int) or isinstance(micro, bool) or micro < 1):
            bad("micro_batch", "auto or an integer >= 1")
        self.micro_batch = micro

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum_steps * self.seq_len


MODEL_HELP = {
    "vocab_size": f"vocabulary size (GPT-2 BPE: {data.GPT2_VOCAB_SIZE}; a compacted corpus: its meta.json says)",
    "dim": "model width",
    "n_layers": "transformer blocks",
    "n_heads": "attention heads (with RoPE, dim / n_heads must be even)",
    "max_seq_len": "longest sequence (RoPE table, or learned positions); raised to --seq-len if smaller and not given",
    "mlp_hidden": "MLP hidden width; none: 4 * dim",
    "rope_base": "RoPE base (with --positions rope)",
    "norm_eps": "epsilon of the norms (nanoGPT's LayerNorm: 1e-5)",
    "center": "vector centering placements: comma list of embeddings,qk,v,residual,mlp (or all, none)",
    "centering_mode": "how the centre is computed",
    "fused": "use fastcenter's fused ops (Triton kernels on a GPU, the CPU implementation on a CPU); "
    "--no-fused: the eager reference ops",
    "norm": "rmsnorm, or layernorm (nanoGPT's; eager PyTorch)",
    "mlp": "swiglu, or gelu (nanoGPT's: up, exact GELU, down; eager PyTorch)",
    "positions": "rope, or learned (nanoGPT's absolute position embedding)",
    "bias": "a bias in every linear and LayerNorm (nanoGPT's GPTConfig default)",
}

TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
MODEL_FIELDS = {f.name for f in dataclasses.fields(GPTConfig)}


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is a UsageError (one line from the command line), not usage text and exit."""

    def error(self, message):
        raise UsageError(f"{message} (see python train.py --help)")


def build_parser() -> argparse.ArgumentParser:
    """One flag per field of TrainConfig and GPTConfig, generated from the dataclasses."""
    # SUPPRESS: flags not given stay absent, so a resumed run can tell "given" from "default".
    parser = _Parser(
        prog="train.py",
        description="Train the fastcenter GPT on token files (train.bin / val.bin). One flag per config field; "
        "with --resume, the run continues from <out-dir>/ckpt.pt with its saved config, which the flags given "
        "override. The docstring of train.py describes the run directory.",
        argument_default=argparse.SUPPRESS,
    )
    for title, cls in (("training", TrainConfig), ("model (GPTConfig)", GPTConfig)):
        group = parser.add_argument_group(title)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = ",".join(f.default) if isinstance(f.default, tuple) else f.default
            text = f.metadata.get("help") or MODEL_HELP.get(f.name, "")
            help_text = f"{text} (default: {'none' if default in ('', None) else default})"
            kind = hints[f.name]
            if kind is bool:
                group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, help=help_text)
            elif f.name in CHOICES:
                group.add_argument(flag(f.name), choices=CHOICES[f.name], help=help_text)
            elif kind in (int, float, str):
                metavar = {int: "N", float: "F"}.get(kind, "DIR" if f.name in ("data", "out_dir") else "STR")
                parse = _float_flag if kind is float else kind
                group.add_argument(flag(f.name), type=parse, metavar=metavar, help=help_text)
            elif f.name == "micro_batch":
                group.add_argument(flag(f.name), type=str, metavar="auto|N", help=help_text)
            elif kind == typing.Optional[int]:
                group.add_argument(flag(f.name), type=_optional_int, metavar="N", help=help_text)
            elif kind is tuple:  # center: GPTConfig parses "qk,v"
                group.add_argument(flag(f.name), type=str, metavar="LIST", help=help_text)
            else:
                raise TypeError(f"no command-line type for {cls.__name__}.{f.name}: {kind}")
    return parser


def _optional_int(text: str):
    return None if text.lower() == "none" else int(text)


def _is_float32(value) -> bool:
    """A real number that float32 holds without overflow (the run computes in float32)."""
    return is_real(value) and math.isfinite(value) and abs(value) <= FLOAT32_MAX


def _float_flag(text: str) -> float:
    """A float flag's value; one beyond float32's range is refused here, for every float flag alike."""
    value = float(text)
    if math.isfinite(value) and not _is_float32(value):
        raise argparse.ArgumentTypeError(f"{text} is beyond float32's range (at most {FLOAT32_MAX:.4g} in size)")
    return value


def _model_config(fields: dict) -> GPTConfig:
    try:
        return GPTConfig.from_dict(fields)
    except (TypeError, ValueError) as e:  # GPTConfig names its fields; the user knows them as flags
        names = "|".join(sorted(MODEL_FIELDS, key=len, reverse=True))
        raise UsageError(re.sub(rf"(?<![\w-])({names})(?!\w)", lambda m: flag(m.group(1)), str(e))) from None


def resolve_configs(argv) -> tuple[TrainConfig, GPTConfig, dict | None, list[str]]:
    """(train config, model config, checkpoint or None, notes to print) from the flags and, with --resume,
    the checkpoint's saved configuration."""
    given = vars(build_parser().parse_args(argv))
    train_given = {k: v for k, v in given.items() if k in TRAIN_FIELDS}
    model_given = {k: v for k, v in given.items() if k in MODEL_FIELDS}
    notes = []
    if train_given.get("data"):  # absolute: a resumed run finds the same directory from anywhere
        train_given["data"] = str(pathlib.Path(train_given["data"]).absolute())
    train_cfg = TrainConfig(**train_given)  # the flags given, checked on their own first
    ckpt = None
    if train_cfg.resume:
        path = pathlib.Path(train_cfg.out_dir) / "ckpt.pt"
        try:
            ckpt = checkpoint.load(path)
            saved_model = checkpoint.model_config(ckpt, path)
        except checkpoint.CheckpointError as e:
            raise UsageError(f"--resume: {e}") from None
        model_cfg = _model_config({**ckpt["config"]["model"], **model_given})
        # The weights fix the shape: only the choice of kernels may change on resume.
        changed = sorted(k for k in MODEL_FIELDS - {"fused"} if getattr(model_cfg, k) != getattr(saved_model, k))
        if changed:
            raise UsageError(f"--resume: cannot change model field(s) {changed} of the checkpoint {path}")
        saved_train = ckpt["config"]["train"]
        unknown = sorted(set(saved_train) - TRAIN_FIELDS)
        if unknown:
            raise UsageError(
                f"--resume: {path} has train field(s) {unknown} this version does not know: written "
                "by another version of fastcenter"
            )
        try:
            train_cfg = TrainConfig(**{**saved_train, **train_given})
        except UsageError as e:  # the flags given are valid: the checkpoint's value is not
            raise UsageError(f"--resume: {path} holds an invalid train config ({e}): a damaged checkpoint") from None
        if train_cfg.seed != ckpt["sampler"]["seed"]:
            seed = ckpt["sampler"]["seed"]
            raise UsageError(f"--resume: --seed cannot change (the checkpoint's data stream uses seed {seed})")
        notes.append(f"resuming {path} at step {ckpt['step']}")
    else:
        model_cfg = _model_config(model_given)
        ids = data.token_ids(train_cfg.data) if train_cfg.data else None
        if ids is not None and "vocab_size" not in model_given:  # a compacted corpus says its vocabulary size
            model_cfg = dataclasses.replace(model_cfg, vocab_size=len(ids))
            notes.append(f"vocab_size {len(ids):,}: the compacted vocabulary of {train_cfg.data} (meta.json)")
    if model_cfg.max_seq_len < train_cfg.seq_len:
        if "max_seq_len" in model_given:
            raise UsageError(f"--seq-len {train_cfg.seq_len} exceeds --max-seq-len {model_cfg.max_seq_len}")
        model_cfg = dataclasses.replace(model_cfg, max_seq_len=train_cfg.seq_len)
        notes.append(f"max_seq_len raised to --seq-len {train_cfg.seq_len}")
    return train_cfg, model_cfg, ckpt, notes
