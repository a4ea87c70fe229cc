"""bench.step_cost: the GPU cost of a training step counted on the CPU. Hand-checkable cases for the cost model,
the emulation's launch plan, and a whole step of a tiny model (no timings: counts and bytes only)."""

import json
import os
import pathlib
import sys

import pytest
import torch
import triton
import triton.language as tl

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `bench` is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import step_cost  # noqa: E402
from fastcenter import ops  # noqa: E402
from fastcenter.model import GPTConfig  # noqa: E402

TINY = dict(vocab_size=1000, dim=64, n_layers=2, n_heads=2, max_seq_len=64)
TINY_FLAGS = [f"--{name.replace('_', '-')}={value}" for name, value in TINY.items()]
TINY_FLAGS += ["--batch-size=2", "--grad-accum-steps=2"]


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta")


# -- aten ops ---------------------------------------------------------------------------------------------


def test_a_matmul_reads_each_operand_once_writes_its_output_once_and_does_2mnk_flops():
    a, b = meta(48, 40), meta(40, 72)
    out = torch.ops.aten.mm.default(a, b)
    (k,) = step_cost.aten_kernels(torch.ops.aten.mm.default, (a, b), {}, out, "matmuls")
    assert (k.read, k.written, k.flops) == ((48 * 40 + 40 * 72) * 2, 48 * 72 * 2, 2 * 48 * 40 * 72)


def test_an_accumulating_matmul_reads_its_accumulator_unless_beta_is_zero():
    acc, a, b = meta(72, 40, dtype=torch.float32), meta(72, 48), meta(48, 40)
    op = torch.ops.aten.addmm.dtype_out
    operands = (72 * 48 + 48 * 40) * 2
    for beta, acc_read in ((1.0, 72 * 40 * 4), (0.0, 0)):
        kwargs = {"beta": beta, "out": acc}
        (k,) = step_cost.aten_kernels(op, (acc, a, b, torch.float32), kwargs, acc, "LM head + CE")
        assert (k.read, k.written, k.flops) == (operands + acc_read, 72 * 40 * 4, 2 * 72 * 48 * 40)


def test_an_in_place_add_reads_both_operands_and_writes_one():
    x, y = meta(30, 50, dtype=torch.float32), meta(30, 50, dtype=torch.float32)
    (k,) = step_cost.aten_kernels(torch.ops.aten.add_.Tensor, (x, y), {}, x, "grad accumulation")
    assert (k.read, k.written, k.count) == (2 * 30 * 50 * 4, 30 * 50 * 4, 1)


def test_logsumexp_costs_the_passes_its_cuda_implementation_makes():
    x = meta(7, 300, dtype=torch.float32)
    func = torch.ops.aten.logsumexp.default
    kernels = step_cost.aten_kernels(func, (x, [1]), {}, func(x, [1]), "LM head + CE")
    assert sum(k.count for k in kernels) == 9
    big = 7 * 300 * 4
    assert sum(k.bytes * k.count for k in kernels) // big == 6  # amax, sub (r+w), exp (r+w), sum


def test_views_aliases_and_allocations_launch_nothing():
    x = meta(6, 8)
    for func, args in (
        (torch.ops.aten.view.default, (x, [8, 6])),
        (torch.ops.aten._unsafe_view.default, (x, [48])),
        (torch.ops.aten.t.default, (x,)),
        (torch.ops.aten.empty_like.default, (x,)),
    ):
        assert step_cost.aten_kernels(func, args, {}, func(*args), "elementwise/other") == [], func


def test_an_expanded_view_counts_its_elements_once():
    row = meta(1, 96, dtype=torch.float32).expand(300, 96)
    assert step_cost.view_bytes(row) == 96 * 4
    assert step_cost.view_bytes(meta(300, 96)) == 300 * 96 * 2


def test_multi_tensor_ops_launch_as_multi_tensor_apply_chunks_them():
    block = 65536
    assert step_cost._multi_tensor_launches([320 * block], depth=1) == 1  # 320 blocks a launch
    assert step_cost._multi_tensor_launches([320 * block + 1], depth=1) == 2
    assert step_cost._multi_tensor_launches([block] * 220, depth=1) == 2  # 110 tensors a launch for 1 list
    assert step_cost._multi_tensor_launches([10] * 110, depth=1) == 1
    assert step_cost._multi_tensor_launches([10] * 111, depth=1) == 2
    assert step_cost._multi_tensor_launches([10] * 37, depth=4) == 2  # 36 tensors a launch for 4 lists


# -- Triton kernels ---------------------------------------------------------------------------------------


@triton.jit
def _copy_helper(SRC, DST, offsets):
    tl.store(DST + offsets, tl.load(SRC + offsets))


@triton.jit
def _toy_kernel(X, Y, Z, W, INDEX, n, FLAG: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offsets, mask=offsets < n)
    where = tl.load(INDEX + offsets)  # a loaded value used as an offset is data, not a pointer to INDEX
    if FLAG:
        tl.store(Y + where, x)
    else:
        tl.store(Z + offsets, x)
    _copy_helper(W, Z, offsets)


def test_the_kernel_source_decides_which_arguments_are_read_and_which_written():
    x, y, z, w = (meta(1000, dtype=torch.float32) for _ in range(4))
    index = meta(1000, dtype=torch.int64)
    for flag, written in ((True, 2 * 4000), (False, 4000)):  # Z is written by the helper either way
        k = step_cost.triton_kernel(
            _toy_kernel, (x, y, z, w, index, 1000), dict(FLAG=flag, BLOCK=128, num_warps=2), (8,), "toy", "toy op"
        )
        assert (k.read, k.written) == (4000 + 8000 + 4000, written), flag
        assert k.detail == "grid (8,), num_warps 2"


def test_one_norm_launch_reads_each_input_once_and_writes_each_output_once():
    n, d = 300, 96

    def norm():
        ops.center_rms_norm(torch.randn(n, d), torch.ones(d), residual=torch.randn(n, d, dtype=torch.bfloat16))

    host = [h for h in step_cost.record(norm).host_ops if h.name.startswith("fastcenter::")]
    assert [h.name for h in host] == ["fastcenter::norm_fwd"]
    (k,) = host[0].kernels
    assert k.klass == "norms" and k.name.startswith("_norm_fwd")
    assert k.read == n * d * 4 + n * d * 2 + d * 4  # x, residual, weight
    assert k.written == 2 * n * d * 4 + n * 4  # normed, hidden, rstd


def test_the_launchers_see_the_multiprocessors_of_the_gpu_modelled():
    from fastcenter.kernels import _device

    seen = []
    step_cost.record(lambda: seen.append(_device.multiprocessor_count(torch.device("cuda", 0))))
    assert seen == [step_cost.GPUS["H100"].multiprocessors]


def test_recording_leaves_nothing_patched():
    from triton.runtime.jit import JITFunction

    def patchable():
        return (
            os.environ.get("TRITON_INTERPRET"),
            torch.nn.utils.clip_grad_norm_,
            torch.nn.functional.linear,
            ops.rope,
            JITFunction.run,
            torch.cuda.get_device_properties,
        )

    before = patchable()
    step_cost.record(lambda: torch.randn(3))
    assert patchable() == before


# -- a whole step of a tiny model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return step_cost.predict(GPTConfig(**TINY), batch_size=2, grad_accum_steps=2)


def test_the_fused_step_launches_less_than_the_eager_one(tiny):
    fused, eager = tiny["paths"]["fused"]["micro_step"], tiny["paths"]["eager"]["micro_step"]
    assert 0 < fused["kernels"] < eager["kernels"]
    assert 0 < fused["host_ops"] < eager["host_ops"]
    assert fused["bytes"] < eager["bytes"]


def test_the_step_is_counted_whole_and_consistently(tiny):
    d, hidden = TINY["dim"], 4 * TINY["dim"]
    n_weights = TINY["vocab_size"] * d + TINY["n_layers"] * (4 * d * d + 3 * d * hidden + 2 * d) + d
    for path, r in tiny["paths"].items():
        m = r["micro_step"]
        assert m["kernels"] >= m["host_ops"] > 0, path
        for key in ("host_ops", "kernels", "bytes", "flops"):
            assert sum(c[key] for c in m["by_class"].values()) == m[key], (path, key)
            assert m["forward"][key] + m["backward"][key] == m[key], (path, key)
        # Accumulation: the last micro-step adds every gradient into the held ones in one multi-tensor add (as
        # many float32 bytes as the parameters, read twice and written once); the first adds none.
        accumulation = m["by_class"]["grad accumulation"]
        assert accumulation["host_ops"] == 1 and accumulation["bytes"] == 3 * 4 * n_weights, path
        assert "grad accumulation" not in r["first_micro_step"]["by_class"], path
        assert r["autocast_divergences"] == {} and r["host_syncs"] == 0, path
        assert r["optimizer"]["kernels"] >= 2 and r["clip"]["kernels"] >= 2, path
        total = r["optimizer_step"]
        assert total["floor_ms"]["H200"] < total["floor_ms"]["H100"], path
    fused = tiny["paths"]["fused"]["micro_step"]
    assert {"fastcenter::norm_fwd", "fastcenter::rope_rotate", "fastcenter::swiglu_fwd"} <= set(fused["host_op_names"])
    lm_head = [k for k in tiny["paths"]["fused"]["kernels"] if k["op"].startswith("fastcenter::linear_cross")]
    assert {"aten.mm.out", "_cross_entropy_kernel"} <= {k["kernel"] for k in lm_head}  # inside the custom op


def test_the_weights_are_cast_once_per_optimizer_step(tiny):
    # All micro-steps run in one autocast region: its cached bf16 copies of the linears' float32 weights are
    # made in the first micro-step only (the 4 linears of each block; the LM head casts inside its own op).
    linears = 4 * TINY["n_layers"]
    for path, r in tiny["paths"].items():
        first, last = r["first_micro_step"]["by_class"]["casts"], r["micro_step"]["by_class"]["casts"]
        assert first["host_ops"] - last["host_ops"] == linears, path


def test_one_micro_step_of_the_whole_batch_launches_less_per_token():
    split = step_cost.predict(GPTConfig(**TINY), paths=("fused",), batch_size=2, grad_accum_steps=2)
    whole = step_cost.predict(GPTConfig(**TINY), paths=("fused",), batch_size=2, grad_accum_steps=2, micro_batch=4)
    assert (whole["step"]["micro_batch"], whole["step"]["micro_steps"]) == (4, 1)
    split, whole = split["paths"]["fused"], whole["paths"]["fused"]
    assert whole["optimizer_step"]["tokens"] == split["optimizer_step"]["tokens"]
    per = f"per_{step_cost.PER_TOKENS}_tokens"
    assert whole[per]["host_ops"] < split[per]["host_ops"] and whole[per]["kernels"] < split[per]["kernels"]
    assert whole["optimizer_step"]["host_ops"] == whole["micro_step"]["host_ops"] + sum(
        whole[p]["host_ops"] for p in ("clip", "optimizer", "other")
    )
    # As a CUDA graph the host launches only what stays outside it: the optimizer and the step's bookkeeping.
    graphed = whole["graphed"]
    assert graphed["captured_kernels"] >= whole["micro_step"]["kernels"]
    outside = whole["optimizer_step"]["host_ops"] - graphed["captured_host_ops"]
    assert graphed["host_ops_per_optimizer_step"] == outside + 3 < whole["optimizer_step"]["host_ops"] / 5


def test_the_json_has_the_fields_a_reader_needs(tiny):
    data = json.loads(step_cost.dumps(tiny))
    assert {"commit", "git", "versions", "gpus", "step", "paths"} <= set(data) and data["git"]["source_sha256"]
    assert set(data["gpus"]) == {"H100", "H200"}
    for r in data["paths"].values():
        assert {"micro_step", "first_micro_step", "clip", "optimizer", "optimizer_step", "kernels"} <= set(r)
        assert {"host_ops", "kernels", "bytes", "flops", "floor_ms", "by_class"} <= set(r["micro_step"])
        assert {"phase", "class", "op", "kernel", "count", "read", "written", "flops"} <= set(r["kernels"][0])


def test_the_prediction_prints_beside_a_measurement(tiny):
    model_ms = tiny["paths"]["fused"]["micro_step"]["floor_ms"]["H200"]
    text = step_cost.beside_measurement(tiny, {"device": "NVIDIA H200", "fused": {"micro_step_ms": 3 * model_ms}})
    assert "H200 floor" in text and "| fused | micro-step time, ms |" in text and "| 3.00 |" in text


def test_the_command_runs_on_a_tiny_config(tmp_path, capsys):
    """The command line, in this process (the counting is the module's, above): a table per path and the JSON;
    a user error is one line and exit status 2."""
    out = tmp_path / "cost.json"
    assert step_cost.main([*TINY_FLAGS, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| class | host ops | kernels |" in printed and "eager path" in printed
    data = json.loads(out.read_text())
    assert set(data["paths"]) == {"fused", "eager"} and data["step"]["model"]["dim"] == TINY["dim"]
    assert step_cost.main(["--paths", "fast"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
