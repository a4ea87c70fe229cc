"""The training core: one optimizer step, evaluation on fixed windows, the schedule and the loop.

train.py, the centering study (fastcenter.experiments) and the training-step benchmark all train through
`Trainer`, so what the study measures is what train.py does:

    trainer = Trainer(model, cfg, train_tokens=..., val_tokens=..., device=device)
    for report in trainer.run():          # one report per optimizer step
        if report.row is not None:        # a log step: the metrics (and val_loss on evaluation steps)
            ...

One optimizer step (`Trainer.train_step`) sees batch_size x grad_accum_steps windows of seq_len tokens from
`fastcenter.data.WindowSampler` (with N processes each runs grad_accum_steps / N micro-steps): per micro-step a
forward under autocast and a backward of loss / micro-steps (DDP synchronises the gradients on the last one
only), then the gradients are unscaled (float16 loss scaling), clipped to `grad_clip` (the norm before
clipping is kept), and AdamW steps at the scheduled learning rate. Nothing in a step waits for the device: the
loss stays a device tensor, and non-finite losses are remembered on the device and checked at log steps.

Evaluation (`Trainer.evaluate`) is the mean loss over fixed validation windows (`data.validation_positions`),
in eval mode (centering uses its running statistics), or in training mode with every buffer restored before
each batch and afterwards. Under DDP the batches are dealt round-robin to the processes and the sums combined.

Centering statistics under DDP: each process updates its running means with its own micro-batches (DDP does
not broadcast buffers here), and after every step the processes average them, so that all hold one set: the
one evaluation and checkpoints use, and a resumed run restores. It is not one process's statistic over all
micro-batches (each process's update count and EMA see only its own), so centering modes that read the running
mean in training (adaptive, momentum, causal) train slightly differently than in one process.

The schedule: linear warmup over warmup_iters, then a cosine from lr down to lr * min_lr_ratio at
lr_decay_iters (or max_iters), flat after. Precision: parameters and optimizer state stay float32; autocast
runs the matmuls in bf16 (CUDA default) or float16 (with loss scaling), or nothing (float32, CPU default).

Exactness: the windows of step s depend on (seed, s) only, the learning rate on s only, and `state_dict()`
holds everything else (model, optimizer, scaler, RNGs, sampler), so a resumed run reproduces the losses of an
uninterrupted one bit for bit (same machine and software).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from . import checkpoint, data
from .config import TrainConfig, UsageError
from .model import GPT
from .nn import VectorCentering

__all__ = [
    "Trainer",
    "StepReport",
    "Precision",
    "Dist",
    "NonFiniteLossError",
    "learning_rate",
    "warmup_cosine_lr",
    "preserved",
    "check_fits",
]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite at `step`; nothing was saved after it."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


# ---------------------------------------------------------------------------------------------------------
# Schedule, precision, throughput
# ---------------------------------------------------------------------------------------------------------


def warmup_cosine_lr(step: int, *, lr: float, warmup_iters: int, decay_iters: int, min_lr: float) -> float:
    """Learning rate of the update with 0-based index `step`: linear warmup over `warmup_iters`, then a cosine
    from `lr` down to `min_lr` at `decay_iters`, flat after."""
    if step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    if step >= decay_iters:
        return min_lr
    progress = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    return warmup_cosine_lr(
        step,
        lr=cfg.lr,
        warmup_iters=cfg.warmup_iters,
        decay_iters=cfg.lr_decay_iters or cfg.max_iters,
        min_lr=cfg.lr * cfg.min_lr_ratio,
    )


class Precision:
    """The autocast dtype of a run and its loss scaler (enabled for float16 only; bf16 needs no scaling)."""

    def __init__(self, device: torch.device, dtype: str = "auto"):
        if dtype == "auto":
            if device.type != "cuda":
                dtype = "float32"
            else:
                dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        self.name = dtype
        self.dtype = getattr(torch, dtype)
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype != torch.float32)


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


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the most memory allocated so far; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # not on Windows
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


# ---------------------------------------------------------------------------------------------------------
# Processes (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE)
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

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op.upper()))
        return t


def device_memory(device: torch.device) -> Optional[int]:
    """Bytes of memory the device has in all (the GPU's, or the machine's RAM), or None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not on every OS
        return None


def check_fits(config, device: torch.device) -> None:
    """UsageError if training `config` needs more memory than `device` has in all, by a lower bound of what
    training cannot do without: the embedding and the blocks' matrices with their gradients and AdamW's two
    moments (16 bytes a parameter), and the RoPE tables (cos and sin of max_seq_len x head_dim / 2 float32).
    Arithmetic on the config: nothing is allocated, so a size too large to allocate is refused before it is tried.
    """
    d = config.dim
    matrices = config.vocab_size * d + config.n_layers * (4 * d * d + 3 * d * config.hidden_dim)
    state, rope = 16 * matrices, 4 * config.max_seq_len * config.head_dim
    available = device_memory(device)
    if available is not None and state + rope > available:

        def gib(n: int) -> str:
            return f"{n / 2**30:,.1f} GiB"

        raise UsageError(
            f"the model needs at least {gib(state + rope)} ({gib(state)} for weights, gradients and optimizer "
            f"state, {gib(rope)} for the RoPE tables of --max-seq-len {config.max_seq_len}), more than the "
            f"{gib(available)} of {device}: reduce --max-seq-len, --dim, --n-layers, --mlp-hidden or --vocab-size"
        )


def setup_distributed(device_choice: str) -> tuple[Dist, torch.device]:
    """The process group (NCCL on GPUs, Gloo on CPUs) when launched by torchrun, and this process's device."""
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available (use --device cpu or auto)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(), torch.device("cuda" if use_cuda else "cpu")
    dist = Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    device = torch.device("cuda", dist.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return dist, device


# ---------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------


@dataclass
class StepReport:
    """What `Trainer.run` yields after every optimizer step."""

    step: int  # optimizer steps completed
    loss: torch.Tensor  # this step's mean loss over the global batch, on the device (reading it waits for it)
    grad_norm: Optional[torch.Tensor]  # the global gradient norm before clipping (None without clipping)
    row: Optional[dict] = None  # on log steps: the metrics row (val_loss added on evaluation steps)
    stopping: bool = False  # the run stops after this step (a stop was requested)


class Trainer:
    """A model, its optimizer, precision and data stream, and the one training loop of the package.

    The model is built (and seeded) by the caller; the trainer moves it to `device`, wraps it in torch.compile
    (cfg.compile) and DDP (dist), and owns the optimizer (AdamW over the model's groups, fused on CUDA).
    """

    def __init__(
        self,
        model: GPT,
        cfg: TrainConfig,
        *,
        train_tokens: np.ndarray,
        val_tokens: np.ndarray,
        device: torch.device,
        dist: Dist = Dist(),
        digest_batches: bool = False,
    ):
        if cfg.grad_accum_steps % dist.world_size:
            raise UsageError(
                f"--grad-accum-steps {cfg.grad_accum_steps} must be divisible by the number of processes "
                f"({dist.world_size}): the global batch stays batch_size x grad_accum_steps"
            )
        self.cfg, self.device, self.dist = cfg, device, dist
        self.raw_model = model.to(device)
        self.precision = Precision(device, cfg.dtype)
        self.optimizer = model.configure_optimizer(
            cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, device_type=device.type
        )
        self.sampler = data.WindowSampler(
            train_tokens,
            seq_len=cfg.seq_len,
            batch_size=cfg.batch_size,
            grad_accum_steps=cfg.grad_accum_steps,
            seed=cfg.seed,
            rank=dist.rank,
            world_size=dist.world_size,
        )
        self.val_tokens = val_tokens
        self.val_positions = data.validation_positions(len(val_tokens), cfg.seq_len, cfg.eval_iters * cfg.batch_size)
        self.eval_model = torch.compile(self.raw_model) if cfg.compile else self.raw_model  # evaluation needs no DDP
        self.model = self.eval_model
        if dist.enabled:
            # broadcast_buffers=False: rank 0's statistics would overwrite the others' at every forward, discarding
            # their micro-batches; they are averaged after each step instead (`_average_statistics`).
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.eval_model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
            )
        self._statistics = [m.running_mean for m in model.modules() if isinstance(m, VectorCentering)]
        self.token_ids: Optional[list[int]] = None  # a compacted corpus's GPT-2 ids, saved for sampling
        self.data_identity: Optional[dict] = None  # the corpus's (data.Corpus.identity), saved for --resume
        self.step = 0  # optimizer steps completed
        self.lr = learning_rate(0, cfg)
        self.grad_norm: Optional[torch.Tensor] = None  # of the last step, before clipping
        self.val_loss: Optional[float] = None  # of the last evaluation
        # sha256 of every training window in order: the study's proof that paired runs saw the same batches.
        self.batches_digest = hashlib.sha256() if digest_batches else None
        # The first step whose loss was not finite, or -1: kept on the device, read only at log steps.
        self._first_bad = torch.full((), -1, dtype=torch.long, device=device)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.tokens_per_step

    # -- one step ------------------------------------------------------------------------------------------

    def train_step(self) -> torch.Tensor:
        """One optimizer step over this process's micro-batches; returns its mean loss (a device tensor)."""
        self.lr = learning_rate(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        micro_batches = self.sampler.next_step()
        n_micro = len(micro_batches)
        scaler = self.precision.scaler
        loss_sum = torch.zeros((), device=self.device)
        for i, windows in enumerate(micro_batches):
            if self.batches_digest is not None:
                self.batches_digest.update(windows.tobytes())
            x, y = data.to_inputs_targets(windows, self.device)
            # DDP all-reduces gradients in backward; on all but the last micro-step they only accumulate locally.
            skip_sync = self.dist.enabled and i < n_micro - 1
            with self.model.no_sync() if skip_sync else contextlib.nullcontext():
                with self.precision.autocast():
                    loss = self.model(x, y)
                # Each micro-batch loss / n_micro, and DDP averages over processes: the gradient is the mean
                # over the global batch, as in one process.
                scaler.scale(loss / n_micro).backward()
            loss_sum += loss.detach().float()
        self.grad_norm = None
        if self.cfg.grad_clip > 0:
            scaler.unscale_(self.optimizer)  # clip the true gradients, not the float16-scaled ones
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.grad_clip)
        scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._average_statistics()
        self.step += 1
        step_loss = loss_sum / n_micro
        self._first_bad = torch.where((self._first_bad < 0) & ~torch.isfinite(step_loss), self.step, self._first_bad)
        return step_loss

    @torch.no_grad()
    def _average_statistics(self) -> None:
        """Under DDP: average the centering modules' running means over the processes (one all-reduce)."""
        if not self.dist.enabled or not self._statistics:
            return
        flat = torch.cat([s.float() for s in self._statistics])
        self.dist.all_reduce(flat).div_(self.dist.world_size)
        for s, mean in zip(self._statistics, flat.split([s.numel() for s in self._statistics])):
            s.copy_(mean)

    # -- evaluation ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, *, training: bool = False) -> float:
        """Mean loss over the fixed validation windows, in eval mode; with training=True in training mode, every
        buffer (running statistics) put back before each batch and afterwards: the model is left unchanged."""
        cfg, model = self.cfg, self.eval_model
        total = torch.zeros(2, device=self.device, dtype=torch.float64)  # (sum of batch losses, batches)
        with preserved(model, training) as reset:
            for b in range(self.dist.rank, cfg.eval_iters, self.dist.world_size):
                reset()
                starts = self.val_positions[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                x, y = data.to_inputs_targets(data.gather_windows(self.val_tokens, starts, cfg.seq_len), self.device)
                with self.precision.autocast():
                    total[0] += model(x, y).double()
                total[1] += 1
        total = self.dist.all_reduce(total)
        return (total[0] / total[1]).item()  # every batch holds as many tokens: this is the mean over tokens

    # -- the loop ------------------------------------------------------------------------------------------

    def run(
        self,
        *,
        is_eval_step: Optional[Callable[[int], bool]] = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Iterator[StepReport]:
        """Train from the current step to cfg.max_iters, yielding a StepReport after every step.

        Log steps (the first step of this call, every log_interval, the last, and any step that evaluates or
        stops) read the device: they check the losses so far (NonFiniteLossError if one was not finite), and
        carry a metrics row: step, loss (this step's), lr, grad_norm, tokens_per_sec and mfu (over the steps
        since the last log step, evaluation excluded), peak_mem_mb, elapsed_s (training time), and val_loss on
        evaluation steps (every eval_interval and the last by default). `should_stop()` is asked after every
        step (under DDP the processes agree at log steps); the step where it holds is the last one yielded.
        """
        cfg, dist = self.cfg, self.dist
        if is_eval_step is None:
            is_eval_step = lambda step: step % cfg.eval_interval == 0 or step == cfg.max_iters  # noqa: E731
        peak_flops = gpu_peak_flops(self.device)
        flops_per_token = self.raw_model.flops_per_token(cfg.seq_len)
        first_step = self.step + 1
        t_last, steps_since_log, train_seconds = time.perf_counter(), 0, 0.0
        while self.step < cfg.max_iters:
            loss = self.train_step()
            steps_since_log += 1
            step = self.step
            log_now = step % cfg.log_interval == 0 or step in (first_step, cfg.max_iters)
            eval_now = is_eval_step(step)
            stop_now = should_stop() and not dist.enabled  # one process acts on its own flag at once
            if dist.enabled and (log_now or eval_now):  # a group agrees at log steps (a collective)
                flag = torch.tensor(float(should_stop()), device=self.device)
                stop_now = dist.all_reduce(flag, "max").item() > 0
            if not (log_now or eval_now or stop_now):
                yield StepReport(step, loss, self.grad_norm)
                continue

            bad_step = int(dist.all_reduce(self._first_bad.clone(), "max").item())
            if bad_step >= 0:
                raise NonFiniteLossError(
                    f"the training loss became non-finite (NaN or inf) at step {bad_step}", bad_step
                )
            elapsed = time.perf_counter() - t_last
            train_seconds += elapsed
            tokens_per_sec = steps_since_log * self.tokens_per_step / elapsed
            row = {
                "step": step,
                "loss": dist.all_reduce(loss.clone()).item() / dist.world_size,
                "lr": self.lr,
                "grad_norm": None if self.grad_norm is None else self.grad_norm.item(),
                "tokens_per_sec": tokens_per_sec,
                "mfu": None
                if peak_flops is None
                else flops_per_token * tokens_per_sec / (peak_flops * dist.world_size),
                "peak_mem_mb": peak_memory_mb(self.device),
                "elapsed_s": train_seconds,
            }
            if eval_now:
                self.val_loss = row["val_loss"] = self.evaluate()
                if not math.isfinite(self.val_loss):
                    raise NonFiniteLossError(f"the validation loss is {self.val_loss} at step {step}", step)
            yield StepReport(step, loss, self.grad_norm, row, stopping=stop_now)
            if stop_now:
                return
            # Evaluating, saving and logging are not training time: the throughput clock restarts here.
            t_last, steps_since_log = time.perf_counter(), 0

    # -- state ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a checkpoint holds besides its format and config (see fastcenter.checkpoint)."""
        scaler = self.precision.scaler
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "step": self.step,
            "rng": checkpoint.rng_state(self.device),
            "sampler": self.sampler.state_dict(),
            "val_loss": self.val_loss,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state (a checkpoint); CheckpointError if it does not fit this model and run.

        The optimizer's moments come from the state, its hyperparameters from this run's config (the same unless
        a resumed run's flags changed them, e.g. --weight-decay: then the flag holds, as config.json says).
        """
        try:
            self.raw_model.load_state_dict(state["model"])
            hyper = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
            self.optimizer.load_state_dict(state["optimizer"])
            for group, values in zip(self.optimizer.param_groups, hyper):
                group.update(values)
            for param, moments in self.optimizer.state.items():
                for name, value in moments.items():
                    if not isinstance(value, torch.Tensor) or (
                        value.dim() and (value.shape != param.shape or not bool(torch.isfinite(value).all()))
                    ):
                        raise ValueError(
                            f"optimizer state {name!r} does not fit a parameter of shape {tuple(param.shape)}"
                        )
            if state["scaler"] is not None:
                self.precision.scaler.load_state_dict(state["scaler"])
            self.sampler.load_state_dict(state["sampler"])
            checkpoint.set_rng_state(state["rng"])
        except (RuntimeError, KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise checkpoint.CheckpointError(
                f"its state does not fit this model and run ({checkpoint.error_summary(e)}): a damaged checkpoint, "
                "or one from another version of fastcenter"
            ) from None
        self.step, self.val_loss = state["step"], state["val_loss"]

    def config(self) -> dict:
        """The run's configuration as checkpoints and config.json hold it."""
        return {"model": self.raw_model.config.to_dict(), "train": dataclasses.asdict(self.cfg)}

    def save(self, path) -> None:
        """Write a checkpoint of the current state (atomic; CheckpointError when the disk refuses)."""
        extra = {} if self.token_ids is None else {"token_ids": self.token_ids}
        if self.data_identity is not None:
            extra["data"] = self.data_identity
        checkpoint.save(path, {**self.state_dict(), "config": self.config(), **extra})


@contextlib.contextmanager
def preserved(model: torch.nn.Module, training: bool):
    """Run `model` in the given mode leaving no trace: yields `reset()`, which puts every buffer (the running
    statistics of centering) back to its value on entry -- call it before each forward so that each one sees the
    same statistics; on exit the buffers and the mode are restored."""
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
