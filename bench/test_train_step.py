"""End to end: tokens/s and peak memory of one full training step of the default model.

A step is what train.py does per optimizer step: `fastcenter.training.Trainer.train_step` (windows drawn from a token
array, bf16 autocast forward of GPT(GPTConfig()) on batches of 16 x 512 tokens, FASTCENTER_BENCH_GRAD_ACCUM
micro-batches (default 1), backward, clipping at 1.0, fused AdamW, zero_grad). Variants: fused (fastcenter.ops) and
eager (fastcenter.reference), each also under torch.compile (`train.py --compile`).

Timed as training runs: steps back to back, no L2 flush and no GPU lead, so host overhead counts. Memory:
`train_peak_bytes` is the peak of everything the training owns (weights, gradients, optimizer state, batch,
activations) during one step, counted from before the model was built: the 1 GB target (bench/targets.json) is about this.
"""

import os
import time

import numpy as np
import pytest
import torch
import torch._dynamo

from bench.cases import Case, train_cases, train_record
from bench.measure import CLOCK, bench_device, describe, dry_run, peak_memory, sync, time_case

pytestmark = pytest.mark.benchmark(timer=CLOCK)
# The dry run's tiny stand-ins for the default model and batch (any dims will do to exercise the code).
MODEL_OVERRIDES = {"vocab_size": 211, "dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 16} if dry_run() else {}
BATCH, SEQ_LEN = (2, 16) if dry_run() else (16, 512)


@pytest.mark.parametrize("case", train_cases(), ids=str)
def test_train_step(case: Case, benchmark, bench_session):
    from fastcenter.config import TrainConfig
    from fastcenter.model import GPT, GPTConfig
    from fastcenter.training import Trainer

    device = bench_device()
    accum = int(os.environ.get("FASTCENTER_BENCH_GRAD_ACCUM", "1"))
    compile_ = case.variant.endswith("_compile")
    torch._dynamo.reset()
    torch.set_float32_matmul_precision("high")  # as train.py: TF32 for whatever runs outside autocast
    outside = torch.cuda.memory_allocated() if device == "cuda" else 0  # not this training's (e.g. the L2 flush)
    torch.manual_seed(0)
    config = GPTConfig(fused=case.variant.startswith("fused"), **MODEL_OVERRIDES)
    cfg = TrainConfig(
        batch_size=BATCH,
        grad_accum_steps=accum,
        seq_len=SEQ_LEN,
        max_iters=10**9,
        lr=3e-4,
        warmup_iters=0,
        device=device,
        dtype="bfloat16",
        compile=compile_,
    )
    tokens = np.random.default_rng(20240520).integers(0, config.vocab_size, size=1 << 20).astype(np.uint16)
    trainer = Trainer(
        GPT(config), cfg, train_tokens=tokens, val_tokens=tokens[: 4 * SEQ_LEN], device=torch.device(device)
    )
    start = time.perf_counter()
    try:
        loss = trainer.train_step()
        sync()
    except Exception as exc:  # noqa: BLE001 -- a compile failure is the skip reason of a compiled variant
        if not compile_:
            raise
        pytest.skip(f"{case.variant} could not run here: {describe(exc)}")
    first_step_s = time.perf_counter() - start
    assert torch.isfinite(loss).item(), f"the first training step gave a non-finite loss {loss.item()}"

    memory = peak_memory(trainer.train_step)
    benchmark.group = "train_step default"
    timing = time_case(benchmark, trainer.train_step, lead=False, target_ms=300.0, max_rounds=40)
    model = trainer.raw_model
    record = train_record(
        case,
        timing,
        tokens_per_step=BATCH * SEQ_LEN * accum,
        flops_per_token=model.flops_per_token(SEQ_LEN),
        peaks=bench_session.peaks,
        batch=BATCH,
        seq_len=SEQ_LEN,
        grad_accum=accum,
        n_params=sum(p.numel() for p in model.parameters()),
        train_peak_bytes=None if memory is None else memory.peak_bytes - outside,
        state_bytes=None if memory is None else memory.base_bytes - outside,
        step_extra_bytes=None if memory is None else memory.peak_bytes - memory.base_bytes,
        first_step_s=first_step_s,
        first_loss=loss.item(),
    )
    benchmark.extra_info.update(record)
    bench_session.add(record)
    torch._dynamo.reset()
    torch.set_float32_matmul_precision("highest")
