"""The training core: one optimizer step, evaluation on fixed windows, the schedule and the loop.

train.py, the centering study (fastcenter.experiments) and the training-step benchmark all train through
`Trainer`, so what the study measures is what train.py does:

    trainer = Trainer(model, cfg, train_tokens=..., val_tokens=..., device=device)
    for report in trainer.run():          # one report per optimizer step
        if report.row is not None:        # a log step: the metrics (and val_loss on evaluation steps)
            ...

One optimizer step (`Trainer.train_step`) sees the global batch, batch_size x grad_accum_steps windows of seq_len
tokens from `fastcenter.data.WindowSampler` (with N processes each takes its 1/N share). A process copies its
windows to the device as one batch and `accumulate_gradients` runs them in micro-batches of `micro_batch`
windows (cfg.micro_batch: a number, or "auto": batch_size on a CPU or with centering, on CUDA the largest split
that fits in the GPU's free memory): per micro-batch a forward and a backward of loss / micro-steps (DDP
synchronises the gradients on the last one only), so the gradient is the mean over the global batch however it
is split. All forwards of a step run in one autocast region, so autocast's low-precision copies of the
float32 weights are made once per step; the gradients of later micro-steps are added to the held ones by one
multi-tensor add. Then the gradients are unscaled (float16 loss scaling) and clipped to `grad_clip` (the norm
before clipping is kept), and AdamW steps at the scheduled learning rate. Nothing in a step waits for the
device: the loss stays a device tensor, and non-finite losses are remembered on the device and checked at log
steps. So `accumulate_gradients` can run as one CUDA graph (cfg.cuda_graph; `StepGraph`), the optimizer step
after it staying eager.

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
uninterrupted one bit for bit (same machine, software and micro-batch). A resumed run may run another
micro-batch: the same windows in the same order, the same mean loss and gradient up to float rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
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
from .ops._dispatch import checks_enabled

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
    "check_split",
    "largest_fitting_divisor",
    "StepGraph",
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

    def paused(self):
        """Autocast off inside an autocast region (for a backward), without ending the region: autocast keeps
        its copies of the float32 weights until the outermost region exits."""
        return torch.autocast(self.device_type, enabled=False)


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
    mlp = (3 if config.mlp == "swiglu" else 2) * d * config.hidden_dim  # gate|up and down, or up and down
    matrices = config.vocab_size * d + config.n_layers * (4 * d * d + mlp)
    state, rope = 16 * matrices, (4 * config.max_seq_len * config.head_dim if config.positions == "rope" else 0)
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


def check_split(cfg: TrainConfig, dist: Dist) -> None:
    """UsageError unless the global batch splits evenly: its grad_accum_steps micro-batches of batch_size over the
    processes, and each process's share into micro-batches of cfg.micro_batch (when a number)."""
    if cfg.grad_accum_steps % dist.world_size:
        raise UsageError(
            f"--grad-accum-steps {cfg.grad_accum_steps} must be divisible by the number of processes "
            f"({dist.world_size}): the global batch stays batch_size x grad_accum_steps"
        )
    sequences = cfg.batch_size * cfg.grad_accum_steps // dist.world_size
    if cfg.micro_batch != "auto" and sequences % cfg.micro_batch:
        per = f" / {dist.world_size} processes" if dist.enabled else ""
        raise UsageError(
            f"--micro-batch {cfg.micro_batch} must divide the {sequences} sequences each process trains on per "
            f"step (--batch-size {cfg.batch_size} x --grad-accum-steps {cfg.grad_accum_steps}{per})"
        )


def largest_fitting_divisor(sequences: int, *, per_sequence: float, fixed: float, budget: float) -> int:
    """The largest divisor m of `sequences` with fixed + m * per_sequence <= budget (bytes), or 1 if none fits
    (then the run is as small as it can be, and a real shortage of memory shows itself as CUDA's error)."""
    fitting = [m for m in range(1, sequences + 1) if sequences % m == 0 and fixed + m * per_sequence <= budget]
    return max(fitting, default=1)


# ---------------------------------------------------------------------------------------------------------
# The step as a CUDA graph
# ---------------------------------------------------------------------------------------------------------


class StepGraph:
    """`Trainer.accumulate_gradients` captured once as a CUDA graph and replayed every step (--cuda-graph).

    Why: a micro-step launches a few hundred kernels, each through Python, the dispatcher and autograd; a
    replay launches all of a step's at once, so host time leaves the critical path. What stays eager is the
    optimizer step (fused AdamW: a few launches per step, and exactly the uncaptured step's arithmetic) and
    the bookkeeping around it.

    How: the first WARMUP_STEPS steps run eagerly on the capture's stream. They do every lazy first-call
    thing before the capture sees it: Triton compiles and loads each kernel, kernels/cross_entropy.py probes
    its float32-accumulation mode and kernels/_device.py the SM count (both cached), cuBLAS makes its
    workspace for the stream, AdamW creates its state. Then, with the gradients unset, one capture of
    accumulate_gradients over the batch buffer: its first micro-step's backward creates the gradients inside
    the graph's memory, so each replay overwrites them and nothing zeroes them again. Every later step copies
    its windows into the buffer and replays; the loss and the gradient norm are copied out of the graph's
    outputs, which the next replay overwrites. Nothing in the captured function waits for the device (that
    would fail the capture); a capture that fails anyway is reported in one line and the run goes on eagerly.
    """

    WARMUP_STEPS = 3

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer
        self.stream = torch.cuda.Stream(trainer.device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.outputs: Optional[tuple] = None
        self.eager_steps = 0

    @staticmethod
    def unsupported(trainer: "Trainer") -> Optional[str]:
        """Why this run cannot capture its step, or None."""
        if trainer.device.type != "cuda":
            return "it needs a CUDA device"
        if trainer.dist.enabled:
            return "it does not run under torchrun (DDP) yet"
        if trainer.precision.scaler.is_enabled():
            return "float16's loss scaling reads the device on the host every step"
        if trainer.cfg.compile:
            return "with --compile, torch.compile(mode='reduce-overhead') is the way to graphs"
        if checks_enabled():
            return "FASTCENTER_CHECKS=1 reads values on the host inside the ops"
        return None

    @classmethod
    def for_trainer(cls, trainer: "Trainer") -> Optional["StepGraph"]:
        reason = cls.unsupported(trainer)
        if reason is not None:
            trainer.say(f"--cuda-graph: the step runs uncaptured ({reason})")
            return None
        return cls(trainer)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def run(self, batch: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """This step's (loss, grad_norm): eagerly on the capture's stream while warming up, else by replay."""
        trainer = self.trainer
        if self.graph is None and self.eager_steps < self.WARMUP_STEPS:
            self.eager_steps += 1
            return self._on_stream(lambda: trainer.accumulate_gradients(batch))
        if self.graph is None:
            try:
                self._capture(batch)
            except Exception as e:  # noqa: BLE001 -- whatever refused the capture, the eager step still runs
                trainer._clear_gradients()
                trainer._graph = None
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                trainer.say(f"--cuda-graph: the capture failed ({first}); the step runs uncaptured")
                return trainer.accumulate_gradients(batch)
            trainer.say(f"--cuda-graph: step {trainer.step + 1} and every later step replay one captured graph")
        self.graph.replay()
        loss, grad_norm = self.outputs
        return loss.clone(), None if grad_norm is None else grad_norm.clone()

    def _on_stream(self, fn):
        current = torch.cuda.current_stream(self.trainer.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = fn()
        current.wait_stream(self.stream)
        return out

    def _capture(self, batch: torch.Tensor) -> None:
        self.trainer._clear_gradients()
        torch.cuda.synchronize(self.trainer.device)
        torch.cuda.empty_cache()  # the eager steps' cached blocks go back: the graph's own pool replaces them
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            outputs = self.trainer.accumulate_gradients(batch)
        self.graph, self.outputs = graph, outputs


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
    (cfg.compile) and DDP (dist), and owns the optimizer (AdamW over the model's groups, fused on CUDA). It
    decides the micro-batch (`micro_batch`, `micro_steps`) and, with cfg.cuda_graph, runs the step's device
    work as a CUDA graph; `say` prints its notes (the micro-batch auto chose, the graph's fate).
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
        say: Callable[[str], None] = print,
    ):
        check_split(cfg, dist)
        self.cfg, self.device, self.dist, self.say = cfg, device, dist, say
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
            # No buffer sync at forward: rank 0's statistics would overwrite the others' at every forward, discarding
            # their micro-batches; they are averaged after each step instead (`_average_statistics`). torch 2.13
            # renamed the flag (and warns at the old name); both still sync once at construction, where every
            # process holds the same statistics anyway (the same initialisation or checkpoint).
            no_forward_sync = (
                {"forward_sync_buffers": False}
                if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
                else {"broadcast_buffers": False}
            )
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.eval_model, device_ids=[device.index] if device.type == "cuda" else None, **no_forward_sync
            )
        self._statistics = [m.running_mean for m in model.modules() if isinstance(m, VectorCentering)]
        self._params = [p for p in model.parameters() if p.requires_grad]
        # This process's windows of the current step on the device, [sequences, seq_len + 1]: one buffer, refilled
        # every step (the CUDA graph reads it where it was captured).
        self._batch: Optional[torch.Tensor] = None
        self.micro_batch, note = self._choose_micro_batch()
        self.micro_steps = self.sequences_per_process // self.micro_batch
        if note:
            self.say(note)
        self._graph = StepGraph.for_trainer(self) if cfg.cuda_graph else None
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

    @property
    def sequences_per_process(self) -> int:
        """Windows each process trains on per optimizer step: its share of batch_size x grad_accum_steps."""
        return self.cfg.batch_size * self.cfg.grad_accum_steps // self.dist.world_size

    # -- the micro-batch -----------------------------------------------------------------------------------

    def _choose_micro_batch(self) -> tuple[int, Optional[str]]:
        """(sequences per forward, a note to print or None) for cfg.micro_batch: a number is checked, "auto" is
        batch_size on a CPU or with centering (its statistics are per forward, so the split is part of the
        math), and on CUDA the largest divisor of this process's sequences that fits (`_fitting_micro_batch`)."""
        cfg, sequences = self.cfg, self.sequences_per_process
        if cfg.micro_batch != "auto":
            return cfg.micro_batch, None  # check_split has checked it
        if self.device.type != "cuda":
            return cfg.batch_size, None
        if self.raw_model.config.center:
            return cfg.batch_size, (
                f"micro-batch: {cfg.batch_size} sequences (--batch-size; auto does not change it for a model with "
                "centering, whose statistics are per forward)"
            )
        try:
            micro, note = self._fitting_micro_batch()
        except torch.cuda.OutOfMemoryError:
            self._clear_gradients()
            torch.cuda.empty_cache()
            micro, note = cfg.batch_size, f"a trial step ran out of memory: --batch-size {cfg.batch_size}"
        if self.dist.enabled:  # every process runs the same split (the smallest choice divides every share)
            micro = int(self.dist.all_reduce(torch.tensor(micro, device=self.device), "min").item())
        return micro, f"micro-batch: {micro} sequences x {sequences // micro} micro-steps per step (auto; {note})"

    def _fitting_micro_batch(self) -> tuple[int, str]:
        """The largest divisor of this process's sequences whose forward and backward fit the GPU's free memory.

        Peak memory grows linearly in the micro-batch: two trial forwards and backwards (2 and 4 sequences, after
        one of 2 that makes the one-time allocations) give the slope and the intercept. They leave no trace: the
        model's buffers are put back and the gradients dropped. The budget is 85% of what is free (the driver's
        free memory and the allocator's unused cache) less AdamW's two moments, which the first step allocates.
        """
        peaks = [self._trial_peak(b) for b in (2, 2, 4)][1:]
        per_sequence = max((peaks[1] - peaks[0]) / 2, 1.0)
        fixed = max(peaks[0] - 2 * per_sequence, 0.0)
        free, _ = torch.cuda.mem_get_info(self.device)
        unused = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        moments = 8 * sum(p.numel() for p in self._params)
        budget = 0.85 * (free + unused) - moments
        torch.cuda.reset_peak_memory_stats(self.device)
        micro = largest_fitting_divisor(
            self.sequences_per_process, per_sequence=per_sequence, fixed=fixed, budget=budget
        )
        gib = 2**30
        return micro, (
            f"{fixed / gib:.2f} GiB + {per_sequence / 2**20:,.0f} MiB a sequence measured, "
            f"{budget / gib:,.1f} GiB to spend"
        )

    def _trial_peak(self, sequences: int) -> int:
        """Bytes a forward and backward of `sequences` windows allocate at their peak, beyond what was allocated."""
        x = torch.zeros((sequences, self.cfg.seq_len), dtype=torch.long, device=self.device)
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        with preserved(self.raw_model, training=True):
            with self.precision.autocast():
                loss = self.raw_model(x, x)
            loss.backward()
        self._clear_gradients()
        return torch.cuda.max_memory_allocated(self.device) - base

    def _clear_gradients(self) -> None:
        for p in self._params:
            p.grad = None

    # -- one step ------------------------------------------------------------------------------------------

    def train_step(self) -> torch.Tensor:
        """One optimizer step over this process's share of the global batch; returns its mean loss (a device
        tensor): the windows to the device, `accumulate_gradients` (eager, or replayed as a CUDA graph), then the
        optimizer step and the bookkeeping, eager."""
        self.lr = learning_rate(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        windows = np.concatenate(self.sampler.next_step())  # this process's windows, in the sampler's order
        if self.batches_digest is not None:
            self.batches_digest.update(windows.tobytes())
        self._load_batch(windows)
        if self._graph is not None:
            step_loss, self.grad_norm = self._graph.run(self._batch)
        else:
            step_loss, self.grad_norm = self.accumulate_gradients(self._batch)
        scaler = self.precision.scaler
        scaler.step(self.optimizer)
        scaler.update()
        if self._graph is None or not self._graph.captured:  # a graph's replays overwrite the gradients it holds
            self.optimizer.zero_grad(set_to_none=True)
        self._average_statistics()
        self.step += 1
        self._first_bad = torch.where((self._first_bad < 0) & ~torch.isfinite(step_loss), self.step, self._first_bad)
        return step_loss

    def _load_batch(self, windows: np.ndarray) -> None:
        """Copy the step's windows into the batch buffer (from pinned memory without waiting, on CUDA: the copy
        overlaps the previous step's kernels)."""
        batch = torch.from_numpy(windows)
        if self._batch is None or self._batch.shape != batch.shape:
            self._batch = torch.empty(batch.shape, dtype=batch.dtype, device=self.device)
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        self._batch.copy_(batch, non_blocking=True)

    def accumulate_gradients(self, batch: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The device work of one step on this process's windows `batch` [sequences, seq_len + 1]: a forward and
        backward per micro-batch of `micro_batch` windows, the gradients summed, unscaled and clipped. Returns
        (the step's mean loss, the gradient norm before clipping or None).

        The eager step and the CUDA graph (`StepGraph`) run this one function: it reads only `batch`, the model
        and the gradients, keeps no Python state between calls, and never waits for the device.

        Each micro-batch's loss / micro_steps is backpropagated (and DDP averages over processes): the gradient
        is the mean over the global batch however it is split. All forwards run in one autocast region, so the
        low-precision copies of the float32 weights that autocast caches for a region are made once per step;
        each backward runs with autocast paused, as outside a region.
        """
        n, m = self.micro_steps, self.micro_batch
        scaler = self.precision.scaler
        loss_sum = torch.zeros((), device=self.device)
        with self.precision.autocast():
            for i in range(n):
                windows = batch[i * m : (i + 1) * m]
                # DDP all-reduces gradients in backward; on all but the last micro-step they only accumulate
                # locally, and its last backward must add into .grad itself for the all-reduce to see the sum.
                skip_sync = self.dist.enabled and i < n - 1
                with self.model.no_sync() if skip_sync else contextlib.nullcontext():
                    loss = self.model(windows[:, :-1], windows[:, 1:])
                    with self.precision.paused():
                        self._backward(scaler.scale(loss / n), add=i > 0 and (skip_sync or not self.dist.enabled))
                loss_sum += loss.detach().float()
        step_loss, grad_norm = loss_sum / n, None
        if self.cfg.grad_clip > 0:
            scaler.unscale_(self.optimizer)  # clip the true gradients, not the float16-scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(self._params, self.cfg.grad_clip)
        return step_loss, grad_norm

    def _backward(self, loss: torch.Tensor, *, add: bool) -> None:
        """loss.backward(); with `add`, its gradients are added to those already held by one multi-tensor add
        instead of autograd's one add per parameter (the same float32 sums, in one launch per ~100 tensors)."""
        if not add:
            loss.backward()
            return
        held = [p.grad for p in self._params]
        self._clear_gradients()
        loss.backward()
        both = [(h, p.grad) for h, p in zip(held, self._params) if h is not None and p.grad is not None]
        if both:
            torch._foreach_add_([h for h, _ in both], [g for _, g in both])
        for p, h in zip(self._params, held):
            if h is not None:
                p.grad = h

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
