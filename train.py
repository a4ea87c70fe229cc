"""Train the fastcenter GPT on token files.

    python train.py --fused                                  # default model on the demo corpus (stdlib source)
    python train.py --data DIR --out-dir out --fused         # DIR holds train.bin and val.bin
    python train.py --out-dir out --resume                   # continue out/ exactly where it stopped
    torchrun --nproc_per_node=8 train.py --data DIR --fused  # data-parallel, same global batch

Every field of TrainConfig and GPTConfig is a flag (`python train.py --help`; fastcenter/config.py). The work
is done by the training core, fastcenter/training.py: one optimizer step, evaluation on fixed windows, the
schedule and the loop, shared with the centering study and the benchmarks. This script wires it to a run
directory and a console:

    config.json    {"model": GPTConfig fields, "train": TrainConfig fields, "run": device, world size, ...}
    metrics.jsonl  one JSON object per logged step (step 1, then every --log-interval): step, loss, lr,
                   grad_norm, tokens_per_sec, mfu (null when the GPU's peak is unknown), peak_mem_mb (CUDA: max
                   allocated; CPU: the process's peak RSS), elapsed_s, and val_loss on evaluation steps
    ckpt.pt        the latest checkpoint, after every evaluation and when stopped (fastcenter/checkpoint.py)
    loss.png       train and validation loss curves (needs matplotlib)
    run.lock       the running run's pid; the run locks the directory (and this file) while it lives: a second
                   run into the same directory is refused, also when run.lock was removed (fastcenter/files.py)

SIGINT/SIGTERM: the run says at once that it will stop, finishes the current step (under torchrun: the steps up
to the next log step), checkpoints and exits cleanly; a second Ctrl-C aborts at once, keeping the last
checkpoint (so does a first one while the run is starting or finishing: there is no step to finish). A
non-finite loss stops the run before anything is saved. Mistakes the user can fix (a flag, the data, a busy or
unusable run directory, a damaged or foreign checkpoint, another corpus under --resume, a model too large for
the machine, a full disk or a file-size limit) are one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import gc
import os
import random
import signal
import sys
import threading
import time

import numpy as np
import torch

from fastcenter import checkpoint, data, ops
from fastcenter.config import CPU_COMMAND, UsageError, resolve_configs
from fastcenter.files import RunDirectory, RunDirectoryError
from fastcenter.model import GPT
from fastcenter.training import Dist, NonFiniteLossError, Trainer, check_fits, check_split, setup_distributed


def main(argv=None) -> dict:
    """Train; returns a summary {"step", "loss", "val_loss", "out_dir", "stopped_by"}."""
    StopSignal.first = None
    try:  # a mistyped FASTCENTER_BACKEND / FASTCENTER_CHECKS: said before anything else, not at the first op
        ops.check_environment()
    except ValueError as e:
        raise UsageError(str(e)) from None
    cfg, model_cfg, ckpt, notes = resolve_configs(argv)
    dist, device = setup_distributed(cfg.device)
    console = Console(active=dist.master)
    run_dir = RunDirectory(cfg.out_dir)
    try:
        for note in notes:
            console.say(note)
        run_dir.check()
        refuse_to_overwrite(cfg, run_dir)
        check_fits(model_cfg, device)
        check_split(cfg, dist)
        # Data first: a corrupt or mismatched file stops the run before anything is built or written.
        corpus = load_data(cfg, model_cfg.vocab_size, dist, console)
        if ckpt is not None:
            check_same_corpus(ckpt, corpus, run_dir.checkpoint, console)
        if dist.master:
            run_dir.open()  # refuses a directory another run holds, before anything is written there
            refuse_to_overwrite(cfg, run_dir)  # again, now that no other run can be writing it
        status = train(cfg, model_cfg, ckpt, dist, device, run_dir, console, corpus)
        if dist.enabled:
            # The processes leave together, once the master has written its last checkpoint: torchrun stops
            # every process when one exits badly, which must not cut the master's final save.
            torch.distributed.barrier()
        return status
    finally:
        run_dir.close()
        if dist.enabled:
            # The DDP wrapper sits in reference cycles (its hooks) that hold the process group: collected only at
            # interpreter exit, the group's gloo threads would still be releasing tensors then, and a thread that
            # needs the GIL during finalisation aborts the process. Collected now, destroy_process_group ends the
            # group while the interpreter is whole.
            gc.collect()
            torch.distributed.destroy_process_group()


def refuse_to_overwrite(cfg, run_dir: RunDirectory) -> None:
    if not cfg.resume and run_dir.checkpoint.exists():
        raise UsageError(
            f"{run_dir.checkpoint} exists: pass --resume to continue that run, or choose another --out-dir"
        )


def check_same_corpus(ckpt: dict, corpus: data.Corpus, path, console) -> None:
    """--resume trains on the corpus the checkpoint was trained on, or not at all: ids are only meaningful in
    their own corpus (a compacted vocabulary numbers them its own way)."""
    saved_ids = ckpt.get("token_ids")
    ids = None if corpus.token_ids is None else corpus.token_ids.tolist()
    problems = [] if ids == saved_ids else ["the vocabulary (meta.json's token_ids) differs"]
    if "data" in ckpt:
        problems = corpus.differences(ckpt["data"])
    elif not problems:
        console.say(f"note: {path} predates corpus identities: {corpus.path} cannot be checked against its corpus")
    if problems:
        raise UsageError(
            f"--resume: {corpus.path} is not the corpus {path} was trained on ({'; '.join(problems)}): pass the "
            "run's own --data"
        )


def train(cfg, model_cfg, ckpt, dist: Dist, device, run_dir: RunDirectory, console, corpus: data.Corpus) -> dict:
    if model_cfg.fused and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        console.say("--fused without a GPU: the fused ops run their CPU implementation (fastcenter/ops/<family>.py).")

    # The same seed on every process gives identical initial weights (DDP broadcasts them anyway).
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for whatever runs outside autocast
    try:
        model = GPT(model_cfg)
    except (RuntimeError, MemoryError) as e:  # check_fits let it through, but this machine has less free now
        raise UsageError(f"the model could not be allocated: {str(e).strip().splitlines()[0]}") from None
    trainer = Trainer(
        model, cfg, train_tokens=corpus.train, val_tokens=corpus.val, device=device, dist=dist, say=console.say
    )
    if ckpt is not None:
        try:
            trainer.load_state_dict(ckpt)
        except checkpoint.CheckpointError as e:
            raise checkpoint.CheckpointError(f"--resume: {run_dir.checkpoint}: {e}") from None
    # Sampling maps the model's ids back to GPT-2's; a resumed run checks that it trains on the same corpus.
    trainer.token_ids = None if corpus.token_ids is None else corpus.token_ids.tolist()
    trainer.data_identity = corpus.identity

    kept, torn = run_dir.metrics_until(trainer.step) if cfg.resume and dist.master else ([], 0)
    if torn:
        console.say(f"note: dropped {torn} unreadable line(s) of {run_dir.metrics} (a write cut short)")
    model = trainer.raw_model
    run_info = {
        "data_dir": str(corpus.path.resolve()),
        "data": corpus.identity,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": dist.world_size,
        "micro_batch": trainer.micro_batch,  # what --micro-batch resolved to (auto: measured)
        "autocast_dtype": trainer.precision.name,
        "parameters": model.num_params(),
        "torch": torch.__version__,
    }
    if dist.master:
        run_dir.write_config({**trainer.config(), "run": run_info})
        run_dir.start_metrics(kept)
    console.say(
        f"model: {model.num_params():,} parameters, {'fused' if model_cfg.fused else 'reference'} ops, "
        f"center={','.join(model_cfg.center) or 'none'}; data: {corpus.path} ({len(corpus.train):,} train / "
        f"{len(corpus.val):,} val tokens); {cfg.tokens_per_step:,} tokens per step ({trainer.micro_steps} x "
        f"{trainer.micro_batch} sequences per process) on {dist.world_size} x {device} ({trainer.precision.name}); "
        f"out: {run_dir.path}"
    )

    def save() -> None:
        if dist.master:
            trainer.save(run_dir.checkpoint)
            note = run_dir.plot()
            if note and note not in console.notes:
                console.say(note)
                console.notes.add(note)

    stopped_by, last_loss = None, None
    console.start(total=cfg.max_iters, done=trainer.step, tokens_per_step=cfg.tokens_per_step)
    try:
        with StopSignal(console) as stop:
            for report in trainer.run(should_stop=lambda: stop.received is not None):
                console.advance()
                row = report.row
                if row is None:
                    continue
                last_loss = row["loss"]
                if dist.master:
                    run_dir.log(row)
                console.show(row, cfg.max_iters)
                if report.step == 1 and not cfg.resume and device.type == "cpu":
                    console.cpu_projection(row, cfg)
                if "val_loss" in row:
                    console.say(f"step {report.step}: val loss {row['val_loss']:.4f} (train {last_loss:.4f})")
                if "val_loss" in row or report.stopping:
                    save()
                if report.stopping:
                    stopped_by = stop.received
                    console.say(
                        f"{stopped_by} received: stopped after step {report.step}, checkpoint saved to "
                        f"{run_dir.checkpoint} (continue with: python train.py --out-dir {run_dir.path} --resume)"
                    )
    except NonFiniteLossError as e:
        kept_ckpt = run_dir.checkpoint
        kept_ckpt = f"the last good checkpoint {kept_ckpt} is untouched" if kept_ckpt.exists() else "none was written"
        raise NonFiniteLossError(
            f"{e}; stopped without saving: {kept_ckpt}. Try a lower --lr or a longer --warmup-iters, or check the data.",
            e.step,
        ) from None
    finally:
        console.close()
    if stopped_by is None:
        result = f"train loss {last_loss:.4f}, " if last_loss is not None else ""
        result += f"val loss {trainer.val_loss:.4f}" if trainer.val_loss is not None else "no validation yet"
        console.say(f"done: {trainer.step} steps, {result}; run directory {run_dir.path}")
    return {
        "step": trainer.step,
        "loss": last_loss,
        "val_loss": trainer.val_loss,
        "out_dir": str(run_dir.path),
        "stopped_by": stopped_by,
    }


def load_data(cfg, vocab_size: int, dist: Dist, console) -> data.Corpus:
    """The corpus, validated (fastcenter.data.load_corpus); the demo corpus (built by rank 0) without --data."""
    data_dir = cfg.data
    if not data_dir:
        console.say("No --data given: training on the demo corpus (the Python standard library's own source).")
        if dist.master:
            data_dir = str(data.ensure_demo_corpus(log=console.say))
        if dist.enabled:
            box = [data_dir]
            torch.distributed.broadcast_object_list(box, src=0)  # also a barrier: rank 0 has built it
            data_dir = box[0]
    return data.load_corpus(data_dir, vocab_size=vocab_size, seq_len=cfg.seq_len)


class Console:
    """Progress on rank 0: a tqdm bar in tokens (its rate is tokens/s, with an ETA) when stderr is a terminal,
    else one line per log step; messages go above the bar."""

    def __init__(self, active: bool):
        self.active, self.bar, self.notes = active, None, set()
        self.t0 = time.perf_counter()

    def start(self, total: int, done: int, tokens_per_step: int) -> None:
        self.tokens_per_step = tokens_per_step
        if self.active and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total * tokens_per_step,
                initial=done * tokens_per_step,
                unit="tok",
                unit_scale=True,
                dynamic_ncols=True,
                smoothing=0.1,
            )

    def say(self, message: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(self.tokens_per_step)

    def show(self, row: dict, total: int) -> None:
        if not self.active:
            return
        status = f"loss {row['loss']:.4f} | lr {row['lr']:.2e} | {row['tokens_per_sec']:,.0f} tok/s"
        if row["mfu"] is not None:
            status += f" | MFU {100 * row['mfu']:.1f}%"
        status += f" | {row['peak_mem_mb']:,.0f} MB"
        if self.bar is not None:
            self.bar.set_postfix_str(status, refresh=True)  # the bar shows the step's share and the ETA itself
        else:
            eta = (total - row["step"]) * self.tokens_per_step / row["tokens_per_sec"]
            print(f"step {row['step']}/{total} | {status} | ETA {format_duration(eta)}", flush=True)

    def cpu_projection(self, row: dict, cfg) -> None:
        """After the first step on a CPU: how long this run would take, and, if that is long, the run that fits."""
        seconds = cfg.max_iters * self.tokens_per_step / row["tokens_per_sec"]
        note = (
            f"note: on this CPU the first step ran at {row['tokens_per_sec']:,.0f} tokens/s: {cfg.max_iters:,} "
            f"steps would take about {format_duration(seconds)}."
        )
        if seconds > 3600:
            note += f' A run sized for a CPU (README, "On a CPU"):\n    {CPU_COMMAND}'
        self.say(note)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


class StopSignal:
    """SIGINT/SIGTERM: say at once that the run stops after this step, and set the flag the loop reads; a second
    Ctrl-C interrupts at once."""

    first = None  # the first signal received by any StopSignal of this run: cli() tells a second Ctrl-C by it

    def __init__(self, console: Console):
        self.console, self.received, self._previous = console, None, {}

    def _handle(self, signum, frame):
        self.received = StopSignal.first = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.console.say(
            f"{self.received} received: stopping after the current step, then saving a checkpoint "
            "(press Ctrl-C again to abort without saving)"
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def cli(argv=None) -> int:
    """The command line: mistakes the user can fix are one clear line on stderr and exit code 2."""
    try:
        main(argv)
    except (UsageError, data.DataError, RunDirectoryError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the messages above did not name (unreadable, a full disk, ...)
        print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        when = "second Ctrl-C" if StopSignal.first else "Ctrl-C while the run was starting or finishing, not training"
        print(f"error: interrupted ({when}): the last checkpoint written, if any, is kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
