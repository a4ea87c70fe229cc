"""A Hugging Face Llama at the 1B shape: transformers' own model against the same model patched by fastcenter.hf.

The shape is Llama 3.2 1B's: hidden 2048, intermediate 8192, 32 query and 8 key/value heads of 64, vocabulary
128256, 16 layers; bf16 weights (what `from_pretrained` gives for a bf16 checkpoint), SDPA attention, a batch of
4 x 2048 tokens. Random weights: speed and memory do not depend on their values. Cases
("<op>-llama1b-<direction>-<variant>", variant "hf" = transformers' own, "fastcenter" = after `hf.patch`):

    hf_layer  one decoder layer (two RMSNorms, attention with RoPE, the SwiGLU MLP) on [B, T, D] hidden states,
              forward ("fwd", under no_grad) and forward+backward ("fwdbwd", torch.autograd.grad with a fixed
              random grad_output): what patch() changes inside the stack.
    hf_loss   the model with no decoder layers: embedding, final norm, lm_head and the loss, forward+backward
              with labels. transformers forms the [N, V] logits in bf16 and upcasts them to float32 for the
              loss; fastcenter's linear_cross_entropy never forms them.
    hf_model  the whole model (FASTCENTER_BENCH_HF_LAYERS decoder layers, default 16), forward+backward with
              labels, as a training step computes it (gradients dropped between reps, no optimizer).

Each record has the median CUDA-event time, tokens/s, peak memory of one call, and model TFLOP/s (matmul
FLOPs: 2 per multiply-add of every weight matrix per token, causal attention counted at half of 4*T*D per
token and layer; backward twice the forward). bench.report keeps these records in the merged results; the
markdown it renders does not have a table for them yet.

Without CUDA the whole suite is skipped with one reason (bench/conftest.py), so this module imports nothing of
transformers at collection; with CUDA but without transformers, each case is skipped saying so. With
FASTCENTER_BENCH_DRY_RUN=1 a tiny Llama runs the same code on the CPU (no numbers).
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from bench.cases import Case, base_record, case_seed
from bench.environment import bench_device, describe, dry_run
from bench.plugin import SESSION
from bench.timing import CudaClock, HostClock, measure, peak_memory

DRY_RUN = dry_run()
DEVICE = bench_device()
CLOCK = HostClock() if DRY_RUN else CudaClock()
MEASURE = (
    {"target_ms": 1.0, "warmup_ms": 0.0, "min_reps": 2, "max_reps": 2, "host_lead": False}
    if DRY_RUN
    else {"target_ms": 300.0, "min_reps": 5, "max_reps": 50}
)

SHAPE = "llama1b"
LLAMA_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True,
)  # fmt: skip
TINY = dict(
    vocab_size=211, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True,
)  # fmt: skip
DIMS = TINY if DRY_RUN else LLAMA_1B
BATCH, SEQ_LEN = (2, 16) if DRY_RUN else (4, 2048)
VARIANTS = ("hf", "fastcenter")
OPS = {"hf_layer": ("fwd", "fwdbwd"), "hf_loss": ("fwdbwd",), "hf_model": ("fwdbwd",)}


def hf_cases() -> list[Case]:
    return [Case(op, SHAPE, direction, variant) for op, directions in OPS.items() for direction in directions
            for variant in VARIANTS]  # fmt: skip


def model_layers() -> int:
    return int(os.environ.get("FASTCENTER_BENCH_HF_LAYERS", DIMS["num_hidden_layers"]))


def layers_for(op: str) -> int:
    return {"hf_layer": 1, "hf_loss": 0, "hf_model": model_layers()}[op]


def matmul_flops_per_token(dims: dict, layers: int, seq_len: int, head: bool) -> int:
    """Forward FLOPs per token (see the module docstring): weight matrices, causal attention, the lm_head."""
    D, F, Dh = dims["hidden_size"], dims["intermediate_size"], dims["head_dim"]
    q, kv = dims["num_attention_heads"] * Dh, dims["num_key_value_heads"] * Dh
    per_layer = 2 * (D * q + 2 * D * kv + q * D + 3 * D * F) + 2 * seq_len * q  # causal: half of 4 * T * q
    return layers * per_layer + (2 * D * dims["vocab_size"] if head else 0)


def build(case: Case):
    """The model for a case: seeded (both variants get the same weights), bf16, on the bench device."""
    try:
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM

        from fastcenter import hf
    except ImportError as exc:
        pytest.skip(f"transformers is not installed (pip install -e '.[hf]'): {describe(exc)}")
    config = AutoConfig.for_model("llama", **{**DIMS, "num_hidden_layers": layers_for(case.op)})
    torch.manual_seed(case_seed(case.op, case.shape))
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model = model.to(torch.bfloat16).train()
    if case.variant == "fastcenter":
        hf.patch(model)
    return model, transformers.__version__


def make_step(case: Case, model):
    """(step, tokens per call, the step's inputs): one call of what the case measures."""
    gen = torch.Generator(device=DEVICE).manual_seed(case_seed(case.op, case.shape) + 1)
    if case.op == "hf_layer":
        D = DIMS["hidden_size"]
        layer = model.model.layers[0]
        hidden = torch.randn(BATCH, SEQ_LEN, D, generator=gen, device=DEVICE, dtype=torch.bfloat16)
        grad_out = torch.randn(BATCH, SEQ_LEN, D, generator=gen, device=DEVICE, dtype=torch.bfloat16)
        positions = torch.arange(SEQ_LEN, device=DEVICE)[None]
        rope = model.model.rotary_emb(hidden, positions)  # sdpa with no mask: causal attention
        params = [p for p in layer.parameters()]

        def run(x):
            out = layer(x, attention_mask=None, position_ids=positions, position_embeddings=rope)
            return out[0] if isinstance(out, tuple) else out

        if case.direction == "fwd":

            def step():
                with torch.no_grad():
                    return run(hidden)

        else:
            leaf = hidden.detach().requires_grad_(True)

            def step():
                return torch.autograd.grad(run(leaf), [leaf] + params, grad_out)

        return step, BATCH * SEQ_LEN, (hidden, grad_out)

    ids = torch.randint(0, DIMS["vocab_size"], (BATCH, SEQ_LEN), generator=gen, device=DEVICE)

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach()

    return step, BATCH * SEQ_LEN, (ids,)


@pytest.fixture
def prepared(case: Case, within_budget, device_peaks):
    model, version = build(case)
    step, tokens, inputs = make_step(case, model)
    start = time.perf_counter()
    step()
    CLOCK.sync()
    first_call_s = time.perf_counter() - start
    yield model, step, tokens, inputs, first_call_s, version
    del model, step


@pytest.mark.parametrize("case", hf_cases(), ids=str)
def test_hf_llama(case: Case, prepared, benchmark, device_peaks):
    model, step, tokens, inputs, first_call_s, version = prepared
    timing = measure(step, clock=CLOCK, warmup_calls=1, **MEASURE).summary()
    memory = peak_memory(step, inputs=inputs, device=DEVICE)
    layers = layers_for(case.op)
    flops = matmul_flops_per_token(DIMS, layers, SEQ_LEN, head=case.op != "hf_layer") * tokens
    flops *= 1 if case.direction == "fwd" else 3
    seconds = timing["median_ms"] * 1e-3
    record = {
        **base_record(case, timing, "compute"),
        "dims": {**DIMS, "num_hidden_layers": layers, "batch": BATCH, "seq_len": SEQ_LEN},
        "dtype": "bfloat16",
        "tokens_per_call": tokens,
        "tokens_per_s": tokens / seconds,
        "flops": flops,
        "tflops": flops / seconds / 1e12,
        "pct_of_matmul": None if not device_peaks else 100.0 * flops / seconds / 1e12 / device_peaks["matmul_tflops"],
        "peak_bytes": None if memory is None else memory.peak_bytes - memory.base_bytes,
        "n_params": sum(p.numel() for p in model.parameters()),
        "transformers": version,
        "first_call_s": first_call_s,
        "dry_run": DRY_RUN,
    }
    benchmark.group = f"{case.op} {case.direction}"
    benchmark.extra_info.update(record)
    SESSION["records"].append(record)

    def synced():
        step()
        CLOCK.sync()

    benchmark.pedantic(synced, rounds=2 if DRY_RUN else 3, warmup_rounds=1)

