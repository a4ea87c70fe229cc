"""Train the fastcenter GPT on token files.

    python train.py --fused                                  # seed config on the demo corpus (stdlib source)
    python train.py --data DIR --out-dir runs/a --fused      # DIR holds train.bin and val.bin
    python train.py --out-dir runs/a --resume                # continue runs/a exactly where it stopped
    torchrun --nproc_per_node=8 train.py --data DIR --fused  # data-parallel, same global batch

Every field of `TrainConfig` (below) and of `fastcenter.model.GPTConfig` is a command-line flag with dashes
(`--grad-accum-steps 8`, `--center qk,v`, booleans as `--fused` / `--no-fused`); `python train.py --help` lists
them with their defaults. With `--resume`, the run continues from `<out-dir>/ckpt.pt` with the configuration
saved there; flags given on the command line override it (e.g. `--max-iters` to extend a run).

One optimizer step sees batch_size x grad_accum_steps sequences of seq_len tokens (the global batch: with N
processes, each runs grad_accum_steps / N micro-steps of batch_size sequences).

The run directory (`--out-dir`) holds:
    config.json    {"model": GPTConfig fields, "train": TrainConfig fields, "run": device, world size, ...}
    metrics.jsonl  one JSON object per logged step: step, loss (this step's mean over the global batch), lr,
                   grad_norm, tokens_per_sec, mfu (null when the GPU's peak is unknown), peak_mem_mb (CUDA: max
                   allocated; CPU: the process's peak RSS), elapsed_s, and val_loss on evaluation steps
    ckpt.pt        the latest checkpoint, written atomically (temp file in the same directory, fsync, rename):
                   {"format": "fastcenter.train/1",
                    "model": state_dict of the bare GPT (no DDP / torch.compile prefixes),
                    "optimizer": AdamW state_dict, "scaler": GradScaler state_dict or None (float16 only),
                    "step": optimizer steps completed,
                    "config": {"model": GPTConfig.to_dict(), "train": dataclasses.asdict(TrainConfig)},
                    "rng": {"python", "numpy", "torch", "cuda"}, "sampler": {"seed", "step"},
                    "val_loss": latest validation loss or None}
                   Only tensors and plain Python values: it loads with torch.load(..., weights_only=True), and
                   GPTConfig.from_dict(ckpt["config"]["model"]) rebuilds the model.
    loss.png       train and validation loss curves (needs matplotlib; skipped with a note otherwise)

Exactness: the windows of step s depend on (seed, s) only (fastcenter.data.WindowSampler), the learning rate on
s only, and the checkpoint holds everything else, so a resumed run reproduces the losses of an uninterrupted
one bit for bit (same machine and software). SIGINT/SIGTERM finish the current step (under torchrun: the
steps up to the next log step), checkpoint and exit cleanly; a second Ctrl-C kills at once. A non-finite loss
stops the run before anything is saved, so the last good checkpoint stays as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import random
import signal
import sys
import threading
import time
import typing
from dataclasses import dataclass, field

import numpy as np
import torch

from fastcenter import data
from fastcenter.data import DataError
from fastcenter.model import GPT, GPTConfig, warmup_cosine_lr
from fastcenter.nn import CENTERING_MODES

CHECKPOINT_FORMAT = "fastcenter.train/1"

# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------


def opt(default, help: str):
    """A config field with its command-line help."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything about a run except the model's shape (that is GPTConfig). Defaults = the seed."""

    data: str = opt("", "directory holding train.bin and val.bin; empty: the demo corpus (stdlib source)")
    out_dir: str = opt("out", "run directory: config.json, metrics.jsonl, ckpt.pt, loss.png")
    resume: bool = opt(False, "continue from <out-dir>/ckpt.pt with its saved config (flags given override)")
    # The batch: batch_size x grad_accum_steps sequences of seq_len tokens per optimizer step.
    batch_size: int = opt(16, "sequences per micro-batch (per process)")
    grad_accum_steps: int = opt(4, "micro-batches per optimizer step, over all processes")
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
    log_interval: int = opt(10, "log every N steps (the only steps that wait for the GPU)")
    # System.
    seed: int = opt(1337, "seed of the initialisation and of the data order")
    device: str = opt("auto", "auto (cuda if available), cpu or cuda")
    dtype: str = opt("auto", "autocast dtype; auto: bfloat16 on CUDA (float16 if unsupported), float32 on CPU")
    compile: bool = opt(False, "wrap the model in torch.compile")

    def __post_init__(self):
        positive = ("batch_size", "grad_accum_steps", "seq_len", "max_iters", "eval_interval", "eval_iters")
        for name in positive + ("log_interval",):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise UsageError(f"need --lr > 0 and 0 <= --min-lr-ratio <= 1, got {self.lr} and {self.min_lr_ratio}")
        if self.device not in CHOICES["device"] or self.dtype not in CHOICES["dtype"]:
            raise UsageError(f"--device must be one of {CHOICES['device']}, --dtype one of {CHOICES['dtype']}")


class UsageError(ValueError):
    """A configuration that cannot run (the message says which flag)."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; nothing was saved after it."""


CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "centering_mode": CENTERING_MODES,
}

MODEL_HELP = {
    "vocab_size": "vocabulary size (GPT-2 BPE: 50257)",
    "dim": "model width",
    "n_layers": "transformer blocks",
    "n_heads": "attention heads (dim / n_heads must be even)",
    "max_seq_len": "longest sequence (RoPE table); raised to --seq-len if smaller and not given",
    "mlp_hidden": "SwiGLU hidden width; none: 4 * dim",
    "rope_base": "RoPE base",
    "norm_eps": "RMSNorm epsilon",
    "center": "vector centering placements: comma list of embeddings,qk,v,residual,mlp (or all, none)",
    "centering_mode": "how the centre is computed",
    "fused": "use the fused Triton kernels (needs a GPU); --no-fused: eager reference ops",
}

TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
MODEL_FIELDS = {f.name for f in dataclasses.fields(GPTConfig)}


def build_parser() -> argparse.ArgumentParser:
    """One flag per field of TrainConfig and GPTConfig, generated from the dataclasses."""
    # SUPPRESS: flags not given stay absent, so a resumed run can tell "given" from "default".
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train the fastcenter GPT on token files (train.bin / val.bin). One flag per config field; "
        "with --resume, the run continues from <out-dir>/ckpt.pt with its saved config, which the flags given "
        "override. The docstring of train.py describes the run directory and the checkpoint format.",
        argument_default=argparse.SUPPRESS,
    )
    for title, cls in (("training", TrainConfig), ("model (GPTConfig)", GPTConfig)):
        group = parser.add_argument_group(title)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            default = ",".join(f.default) if isinstance(f.default, tuple) else f.default
            text = f.metadata.get("help") or MODEL_HELP.get(f.name, "")
            help_text = f"{text} (default: {'none' if default in ('', None) else default})"
            kind = hints[f.name]
            if kind is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
            elif f.name in CHOICES:
                group.add_argument(flag, choices=CHOICES[f.name], help=help_text)
            elif kind in (int, float, str):
                metavar = {int: "N", float: "F"}.get(kind, "DIR" if f.name in ("data", "out_dir") else "STR")
                group.add_argument(flag, type=kind, metavar=metavar, help=help_text)
            elif kind == typing.Optional[int]:
                group.add_argument(flag, type=lambda s: None if s.lower() == "none" else int(s), metavar="N",
                                   help=help_text)
            elif kind is tuple:  # center: GPTConfig parses "qk,v"
                group.add_argument(flag, type=str, metavar="LIST", help=help_text)
            else:
                raise TypeError(f"no command-line type for {cls.__name__}.{f.name}: {kind}")
    return parser


def resolve_configs(argv) -> tuple[TrainConfig, GPTConfig, dict | None, list[str]]:
    """(train config, model config, checkpoint or None, notes to print) from the flags and, with --resume,
    the checkpoint's saved configuration."""
    given = vars(build_parser().parse_args(argv))
    train_given = {k: v for k, v in given.items() if k in TRAIN_FIELDS}
    model_given = {k: v for k, v in given.items() if k in MODEL_FIELDS}
    notes = []
    train_cfg = TrainConfig(**train_given)
    ckpt = None
    if train_cfg.resume:
        path = pathlib.Path(train_cfg.out_dir) / "ckpt.pt"
        if not path.is_file():
            raise UsageError(f"--resume: no checkpoint at {path}")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise UsageError(f"--resume: {path} is not a {CHECKPOINT_FORMAT} checkpoint")
        saved_model = GPTConfig.from_dict(ckpt["config"]["model"])
        model_cfg = GPTConfig.from_dict({**ckpt["config"]["model"], **model_given})
        # The weights fix the shape: only the choice of kernels may change on resume.
        changed = sorted(k for k in MODEL_FIELDS - {"fused"} if getattr(model_cfg, k) != getattr(saved_model, k))
        if changed:
            raise UsageError(f"--resume: cannot change model field(s) {changed} of the checkpoint {path}")
        train_cfg = TrainConfig(**{**ckpt["config"]["train"], **train_given})
        if train_cfg.seed != ckpt["sampler"]["seed"]:
            seed = ckpt["sampler"]["seed"]
            raise UsageError(f"--resume: --seed cannot change (the checkpoint's data stream uses seed {seed})")
        notes.append(f"resuming {path} at step {ckpt['step']}")
    else:
        model_cfg = GPTConfig(**model_given)
    if model_cfg.max_seq_len < train_cfg.seq_len:
        if "max_seq_len" in model_given:
            raise UsageError(f"--seq-len {train_cfg.seq_len} exceeds --max-seq-len {model_cfg.max_seq_len}")
        model_cfg = dataclasses.replace(model_cfg, max_seq_len=train_cfg.seq_len)
        notes.append(f"max_seq_len raised to --seq-len {train_cfg.seq_len}")
    return train_cfg, model_cfg, ckpt, notes


# ---------------------------------------------------------------------------------------------------------
# Small pieces: schedule, MFU, memory, RNG state, signals
# ---------------------------------------------------------------------------------------------------------


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at lr_decay_iters (or max_iters)."""
    return warmup_cosine_lr(
        step, lr=cfg.lr, warmup_iters=cfg.warmup_iters, decay_iters=cfg.lr_decay_iters or cfg.max_iters,
        min_lr=cfg.lr * cfg.min_lr_ratio,
    )


# Peak dense bf16 tensor-core FLOP/s of one GPU, for MFU. The first substring found in the device name wins;
# None means unknown: no MFU rather than a made-up one.
GPU_PEAK_FLOPS = (
    ("H100 NVL", None),
    ("H100 PCIe", 756e12),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("A100", 312e12),
)


def gpu_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_FLOPS if key in name), None)


def mfu(flops_per_token: int, tokens_per_sec: float, peak_flops: float, n_gpus: int) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak of all the GPUs."""
    return flops_per_token * tokens_per_sec / (peak_flops * n_gpus)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # not on Windows
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def rng_state(device: torch.device) -> dict:
    """Every RNG's state as tensors and plain Python values (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopSignal:
    """SIGINT/SIGTERM set a flag that the loop reads between steps; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------------
# Distributed setup (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(device_choice: str) -> tuple[Dist, torch.device]:
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(), torch.device("cuda" if use_cuda else "cpu")
    dist = Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    device = torch.device("cuda", dist.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if use_cuda else "gloo"
    torch.distributed.init_process_group(backend=backend, device_id=device if use_cuda else None)
    return dist, device


def all_reduce(t: torch.Tensor, dist: Dist, op: str = "sum") -> torch.Tensor:
    if dist.enabled:
        torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op.upper()))
    return t


# ---------------------------------------------------------------------------------------------------------
# The run directory and the console (rank 0 only)
# ---------------------------------------------------------------------------------------------------------


class RunLog:
    """config.json, metrics.jsonl and loss.png in the run directory, and progress on the console.

    The console shows a tqdm bar when tqdm is installed and stderr is a terminal, else one line per log step.
    On resume, metrics.jsonl keeps its rows up to the checkpoint's step (later ones belong to the lost part of
    the interrupted run). On processes other than rank 0 every method does nothing.
    """

    def __init__(self, out_dir: pathlib.Path, *, active: bool, resume_step: int | None, total_steps: int):
        self.out_dir, self.active, self.total_steps = out_dir, active, total_steps
        self.rows: list[dict] = []
        self.bar, self.file, self._plot_note = None, None, None
        if not active:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics = out_dir / "metrics.jsonl"
        if resume_step is not None and metrics.exists():
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            self.rows = [r for r in rows if r["step"] <= resume_step]
        metrics.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self.file = open(metrics, "a")
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total_steps, initial=resume_step or 0, unit="step", dynamic_ncols=True)

    def say(self, message: str) -> None:
        if self.active:
            (self.bar.write if self.bar is not None else print)(message)

    def write_config(self, config: dict) -> None:
        if self.active:
            (self.out_dir / "config.json").write_text(json.dumps(config, indent=1) + "\n")

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, row: dict, eta_s: float) -> None:
        """Append a metrics row and show it (without val_loss: that is said separately)."""
        if not self.active:
            return
        self.rows.append(row)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        status = f"loss {row['loss']:.4f} | lr {row['lr']:.2e} | {row['tokens_per_sec']:,.0f} tok/s"
        if row["mfu"] is not None:
            status += f" | MFU {100 * row['mfu']:.1f}%"
        status += f" | {row['peak_mem_mb']:,.0f} MB"
        if self.bar is not None:
            self.bar.set_postfix_str(status, refresh=False)  # tqdm shows its own ETA
        else:
            eta = f"{eta_s / 3600:.1f}h" if eta_s >= 3600 else f"{eta_s / 60:.1f}m"
            print(f"step {row['step']}/{self.total_steps} | {status} | ETA {eta}")

    def plot(self) -> None:
        """loss.png from the rows so far; without matplotlib, a note (once) instead."""
        if not self.active:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            if self._plot_note is None:
                self._plot_note = "matplotlib is not installed: loss.png skipped (pip install matplotlib)"
                self.say(self._plot_note)
            return
        train = [(r["step"], r["loss"]) for r in self.rows]
        val = [(r["step"], r["val_loss"]) for r in self.rows if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(*zip(*train), label="train", linewidth=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation (fixed windows)", markersize=3)
        ax.set(xlabel="step", ylabel="loss (nats / token)", title=str(self.out_dir))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        data.atomic_write(self.out_dir / "loss.png", lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()


# ---------------------------------------------------------------------------------------------------------
# Setup helpers, one training step, evaluation
# ---------------------------------------------------------------------------------------------------------


def resolve_fused(model_cfg: GPTConfig, device: torch.device, say) -> GPTConfig:
    """The fused kernels are Triton: they compile for CUDA, or run (very slowly) under the CPU interpreter."""
    if not model_cfg.fused or device.type == "cuda":
        return model_cfg
    if os.environ.get("TRITON_INTERPRET") == "1":
        say("--fused on the CPU with TRITON_INTERPRET=1: the Triton kernels run interpreted, far too slow to train")
        return model_cfg
    say(
        "--fused: the fused Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1, which interprets them on the "
        "CPU, far too slowly to train). No GPU here: training with the reference ops instead (fused=False)."
    )
    return dataclasses.replace(model_cfg, fused=False)


def load_data(cfg: TrainConfig, vocab_size: int, dist: Dist, say) -> tuple[str, np.ndarray, np.ndarray]:
    """(data directory, train tokens, val tokens), validated; the demo corpus (built by rank 0) without --data."""
    data_dir = cfg.data
    if not data_dir:
        say("No --data given: training on the demo corpus (the Python standard library's own source).")
        if dist.master:
            data_dir = str(data.ensure_demo_corpus(log=say))
        if dist.enabled:
            box = [data_dir]
            torch.distributed.broadcast_object_list(box, src=0)  # also a barrier: rank 0 has built it
            data_dir = box[0]
    train_tokens = data.load_split(data_dir, "train", vocab_size=vocab_size, seq_len=cfg.seq_len)
    val_tokens = data.load_split(data_dir, "val", vocab_size=vocab_size, seq_len=cfg.seq_len)
    return data_dir, train_tokens, val_tokens


def train_step(model, raw_model, optimizer, scaler, micro_batches, autocast, cfg: TrainConfig, device, dist: Dist):
    """One optimizer step over this process's micro-batches; returns (mean loss tensor, grad norm or None).

    Each micro-batch loss is divided by the number of micro-steps here, and DDP averages over processes, so the
    gradient is the mean over the global batch, as in one process. Nothing here waits for the GPU.
    """
    n_micro = len(micro_batches)
    loss_sum = torch.zeros((), device=device)
    for i, windows in enumerate(micro_batches):
        x, y = data.to_inputs_targets(windows, device)
        # DDP all-reduces gradients in backward; on all but the last micro-step they only accumulate locally.
        skip_sync = dist.enabled and i < n_micro - 1
        with model.no_sync() if skip_sync else contextlib.nullcontext():
            with autocast:
                loss = model(x, y)
            scaler.scale(loss / n_micro).backward()
        loss_sum += loss.detach().float()
    grad_norm = None
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the float16-scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / n_micro, grad_norm


@torch.no_grad()
def evaluate(model, val_tokens, positions, cfg: TrainConfig, device, autocast, dist: Dist) -> float:
    """Mean loss over the fixed validation windows, in eval mode (centering uses its running statistics).

    The batches are dealt round-robin to the processes and the sums combined, so every window counts once.
    """
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)  # (sum of batch losses, batches)
    for b in range(dist.rank, cfg.eval_iters, dist.world_size):
        starts = positions[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        x, y = data.to_inputs_targets(data.gather_windows(val_tokens, starts, cfg.seq_len), device)
        with autocast:
            total[0] += model(x, y).double()
        total[1] += 1
    model.train()
    total = all_reduce(total, dist)
    return (total[0] / total[1]).item()  # every batch holds as many tokens: this is the mean over tokens


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    """Train; returns a summary {"step", "loss", "val_loss", "out_dir", "stopped_by"}.

    Raises DataError or UsageError before training starts when data or flags are wrong, and
    NonFiniteLossError when the loss diverges (the checkpoint on disk is then the last good one).
    """
    train_cfg, model_cfg, ckpt, notes = resolve_configs(argv)
    dist, device = setup_distributed(train_cfg.device)
    try:
        summary = run_training(train_cfg, model_cfg, ckpt, notes, dist, device)
        if dist.enabled:
            # Leave together: Gloo may abort a process whose peers close their connections while it is still
            # finishing (rank 0 writes the last checkpoint after the others are done).
            torch.distributed.barrier()
        return summary
    finally:
        if dist.enabled:
            torch.distributed.destroy_process_group()


def run_training(cfg: TrainConfig, model_cfg: GPTConfig, ckpt, notes, dist: Dist, device: torch.device) -> dict:
    say = print if dist.master else (lambda *args: None)
    for note in notes:
        say(note)
    out_dir = pathlib.Path(cfg.out_dir)
    if not cfg.resume and (out_dir / "ckpt.pt").exists():
        raise UsageError(f"{out_dir}/ckpt.pt exists: pass --resume to continue that run, or choose another --out-dir")
    if cfg.grad_accum_steps % dist.world_size:
        raise UsageError(
            f"--grad-accum-steps {cfg.grad_accum_steps} must be divisible by the number of processes "
            f"({dist.world_size}): the global batch stays batch_size x grad_accum_steps"
        )
    model_cfg = resolve_fused(model_cfg, device, say)
    # Data first: a corrupt or mismatched file stops the run before anything is built or written.
    data_dir, train_tokens, val_tokens = load_data(cfg, model_cfg.vocab_size, dist, say)

    # Precision: parameters and optimizer state stay float32; autocast runs the matmuls in bf16/fp16.
    dtype_name = cfg.dtype
    if dtype_name == "auto" and device.type != "cuda":
        dtype_name = "float32"
    elif dtype_name == "auto":
        dtype_name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    amp_dtype = getattr(torch, dtype_name)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # bf16 needs no scaling
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for whatever runs outside autocast

    # The same seed on every process gives identical initial weights (DDP broadcasts them anyway).
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    raw_model = GPT(model_cfg).to(device)
    optimizer = raw_model.configure_optimizer(
        cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, device_type=device.type
    )
    sampler = data.WindowSampler(
        train_tokens, seq_len=cfg.seq_len, batch_size=cfg.batch_size, grad_accum_steps=cfg.grad_accum_steps,
        seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
    )
    val_positions = data.validation_positions(len(val_tokens), cfg.seq_len, cfg.eval_iters * cfg.batch_size)
    step, val_loss = 0, None
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"] is not None:
            scaler.load_state_dict(ckpt["scaler"])
        sampler.load_state_dict(ckpt["sampler"])
        set_rng_state(ckpt["rng"])
        step, val_loss = ckpt["step"], ckpt["val_loss"]

    model = torch.compile(raw_model) if cfg.compile else raw_model
    eval_model = model  # evaluation bypasses DDP: there are no gradients to synchronise
    if dist.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    log = RunLog(out_dir, active=dist.master, resume_step=step if cfg.resume else None, total_steps=cfg.max_iters)
    say = log.say
    run_info = {
        "data_dir": str(pathlib.Path(data_dir).resolve()),
        "train_tokens": len(train_tokens),
        "val_tokens": len(val_tokens),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": dist.world_size,
        "autocast_dtype": dtype_name,
        "parameters": raw_model.num_params(),
        "torch": torch.__version__,
    }
    log.write_config({"model": model_cfg.to_dict(), "train": dataclasses.asdict(cfg), "run": run_info})
    tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * cfg.seq_len
    flops_per_token = raw_model.flops_per_token(cfg.seq_len)
    peak_flops = gpu_peak_flops(device)
    say(
        f"model: {raw_model.num_params():,} parameters, {'fused' if model_cfg.fused else 'reference'} ops, "
        f"center={','.join(model_cfg.center) or 'none'}; data: {data_dir} ({len(train_tokens):,} train / "
        f"{len(val_tokens):,} val tokens); {tokens_per_step:,} tokens per step on {dist.world_size} x {device} "
        f"({dtype_name}); out: {out_dir}"
    )

    def save_checkpoint() -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "step": step,
            "config": {"model": model_cfg.to_dict(), "train": dataclasses.asdict(cfg)},
            "rng": rng_state(device),
            "sampler": sampler.state_dict(),
            "val_loss": val_loss,
        }
        data.atomic_write(out_dir / "ckpt.pt", lambda f: torch.save(state, f))

    # The first step whose loss was not finite, or -1. It lives on the device and is read only at log and
    # checkpoint steps, so the loop never waits for the GPU in between, and nothing bad is ever saved.
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    stopped_by, last_loss = None, None
    t_last, steps_since_log, train_seconds, steps_timed = time.perf_counter(), 0, 0.0, 0
    try:
        with StopSignal() as stop:
            while step < cfg.max_iters:
                lr = learning_rate(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                step_loss, grad_norm = train_step(
                    model, raw_model, optimizer, scaler, sampler.next_step(), autocast, cfg, device, dist
                )
                step += 1
                steps_since_log += 1
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(step_loss), step, first_bad)
                log.advance()

                log_now = step % cfg.log_interval == 0 or step == cfg.max_iters
                eval_now = step % cfg.eval_interval == 0 or step == cfg.max_iters
                # A signal: one process sees its own flag at once; a group agrees at log steps (a collective).
                stop_now = stop.received is not None and not dist.enabled
                if dist.enabled and log_now:
                    flag = torch.tensor(float(stop.received is not None), device=device)
                    stop_now = all_reduce(flag, dist, "max").item() > 0
                if not (log_now or eval_now or stop_now):
                    continue

                bad_step = int(all_reduce(first_bad.clone(), dist, "max").item())
                if bad_step >= 0:
                    kept = out_dir / "ckpt.pt"
                    kept = f"the last good checkpoint {kept} is untouched" if kept.exists() else "none was written"
                    raise NonFiniteLossError(
                        f"the training loss became non-finite (NaN or inf) at step {bad_step}; stopped without "
                        f"saving: {kept}. Try a lower --lr or a longer --warmup-iters, or check the data."
                    )
                last_loss = all_reduce(step_loss.clone(), dist).item() / dist.world_size
                elapsed = time.perf_counter() - t_last
                train_seconds, steps_timed = train_seconds + elapsed, steps_timed + steps_since_log
                tokens_per_sec = steps_since_log * tokens_per_step / elapsed
                row = {
                    "step": step,
                    "loss": last_loss,
                    "lr": lr,
                    "grad_norm": None if grad_norm is None else grad_norm.item(),
                    "tokens_per_sec": tokens_per_sec,
                    "mfu": None if peak_flops is None else mfu(flops_per_token, tokens_per_sec, peak_flops, dist.world_size),
                    "peak_mem_mb": peak_memory_mb(device),
                    "elapsed_s": train_seconds,
                }
                if eval_now:
                    val_loss = evaluate(eval_model, val_tokens, val_positions, cfg, device, autocast, dist)
                    if not math.isfinite(val_loss):
                        raise NonFiniteLossError(f"the validation loss is {val_loss} at step {step}; nothing saved")
                    row["val_loss"] = val_loss
                log.log(row, eta_s=(cfg.max_iters - step) * train_seconds / steps_timed)
                if eval_now:
                    say(f"step {step}: val loss {val_loss:.4f} (train {last_loss:.4f})")
                if (eval_now or stop_now) and dist.master:
                    save_checkpoint()
                    log.plot()
                if stop_now:
                    stopped_by = stop.received or "signal"
                    say(
                        f"{stopped_by} received: stopped after step {step}, checkpoint saved to "
                        f"{out_dir / 'ckpt.pt'} (continue with: train.py --out-dir {out_dir} --resume)"
                    )
                    break
                # Evaluating and saving is not training time: the throughput clock restarts here.
                t_last, steps_since_log = time.perf_counter(), 0
    finally:
        log.close()
    if stopped_by is None:
        result = f"train loss {last_loss:.4f}, " if last_loss is not None else ""
        result += f"val loss {val_loss:.4f}" if val_loss is not None else "no validation yet"
        say(f"done: {step} steps, {result}; run directory {out_dir}")
    return {"step": step, "loss": last_loss, "val_loss": val_loss, "out_dir": str(out_dir), "stopped_by": stopped_by}


def cli(argv=None) -> int:
    """The command line: mistakes the user can fix are one clear line on stderr, not a traceback."""
    try:
        main(argv)
    except (DataError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
