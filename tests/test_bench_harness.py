"""The benchmark harness (bench/) on the CPU: everything in it that does not need a GPU.

- byte models against the bytes of the real tensors an op reads and writes, FLOP model against PyTorch's
  FlopCounterMode;
- `measure` with a fake clock: warm-up excluded, setup/flush outside the timed region, one sync at the end;
- memory accounting of views and inputs;
- the report: a synthetic pytest-benchmark JSON -> results file -> BENCHMARKS.md tables, speed-ups and targets;
- the suite without CUDA (subprocess): every GPU case skipped with one reason, said again at the end of the
  session, and the CPU comparison run instead (tiny), its raw runs consistent with its summary; its run order
  and time budget;
- the CPU comparison's summary (paired ratios, noise, targets), its command line, and its BENCHMARKS.md section;
- a dry run (subprocess, FASTCENTER_BENCH_DRY_RUN=1) through the GPU code paths on the CPU, whose real
  pytest-benchmark JSON the report then reads (and refuses as a measurement);
- BENCHMARKS.md being exactly what the generator writes.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `bench` is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import cases, cpu, plugin, report  # noqa: E402
from bench.cases import DIRECTIONS, OP_SPECS, Case, op_record, parse_case_id, prepare, train_record  # noqa: E402
from bench.environment import CUDA_SKIP_REASON, git_info, skip_reason, source_hash  # noqa: E402
from bench.timing import HostClock, Timing, measure, tensor_bytes  # noqa: E402

# Small, awkward dims per op: enough to check the models' arithmetic, fast on the CPU.
SMALL = {
    "rms_norm": {"N": 6, "D": 10},
    "center_rms_norm": {"N": 7, "D": 12},
    "rope": {"B": 2, "T": 3, "H": 3, "Dh": 8},
    "swiglu": {"N": 5, "H": 6},
    "cross_entropy": {"N": 5, "V": 37},
    "linear_cross_entropy": {"N": 5, "D": 8, "V": 37},
}

# What each backward must read besides the grad_outputs: inputs by name, or outputs by position. (A property of
# the op's math, stated here independently of the byte models in bench/cases.py.)
BACKWARD_READS = {
    "rms_norm": (["x", "weight"], []),
    "center_rms_norm": (["weight"], [1]),  # the saved `hidden` output, not x / residual / centre
    "rope": (["cos", "sin"], []),
    "swiglu": (["packed"], []),
    "cross_entropy": (["logits", "target"], []),
    "linear_cross_entropy": (["x", "weight", "target"], []),
}


def uniform(low: float, high: float) -> float:
    """Random numbers from torch's generator, which tests/conftest.py seeds (and prints on failure)."""
    return low + (high - low) * torch.rand(()).item()


def randint(low: int, high: int) -> int:
    """An int in [low, high], from torch's seeded generator."""
    return int(torch.randint(low, high + 1, ()).item())


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------------------
# Case ids
# ---------------------------------------------------------------------------------------------------------


def test_case_ids_are_unique_and_round_trip():
    all_cases = cases.all_op_cases() + cases.train_cases()
    ids = [c.id for c in all_cases]
    assert len(ids) == len(set(ids))
    for c in all_cases:
        assert parse_case_id(c.id) == c
        assert parse_case_id(f"bench/test_ops.py::test_op[{c.id}]") == c
    assert parse_case_id("tests/test_x.py::test_y") is None
    with pytest.raises(ValueError, match="may not contain"):
        cases.case_id("rms-norm", "seed", "fwd", "eager")


def test_every_op_has_seed_shape_and_the_spec_variants():
    for spec in OP_SPECS.values():
        assert "seed" in spec.shapes
        assert {"fastcenter", "eager", "compile"} <= set(spec.variants)
    lce = OP_SPECS["linear_cross_entropy"]
    assert lce.shapes["seed"] == {"N": 16 * 512, "D": 256, "V": 50257}
    assert {"torch_lce_chunked", "liger"} <= set(lce.variants)
    for name in ("rms_norm", "center_rms_norm", "rope", "swiglu"):
        assert "large" in OP_SPECS[name].shapes


# ---------------------------------------------------------------------------------------------------------
# Cost models
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", list(OP_SPECS))
def test_byte_model_counts_the_tensors_the_op_reads_and_writes(op):
    """Forward: every input read, every output written. Backward: grad_outputs and the inputs/outputs the math
    needs read, every gradient written (input and residual of center_rms_norm share one)."""
    spec, dims = OP_SPECS[op], SMALL[op]
    fwd = prepare(Case(op, "seed", "fwd", "eager"), "cpu", dims=dims)
    inputs = fwd.inputs.tensors
    outputs = fwd.call()
    elt = torch.empty((), dtype=spec.dtype).element_size()
    forward_bytes = sum(nbytes(t) for t in inputs.values()) + sum(nbytes(t) for t in outputs)
    assert spec.bytes_moved(dims, elt, "fwd") == forward_bytes

    bwd = prepare(Case(op, "seed", "fwdbwd", "eager"), "cpu", dims=dims)
    grads = bwd.call()
    grad_outputs = [torch.empty_like(o) for o in outputs]  # same shapes and dtypes as the outputs
    named_grads = dict(zip(bwd.inputs.differentiable, grads))
    named_grads.pop("residual", None)  # one gradient tensor serves input and residual
    read_inputs, read_outputs = BACKWARD_READS[op]
    backward_bytes = (
        sum(nbytes(g) for g in grad_outputs)
        + sum(nbytes(inputs[name]) for name in read_inputs)
        + sum(nbytes(outputs[i]) for i in read_outputs)
        + sum(nbytes(g) for g in named_grads.values())
    )
    assert spec.bytes_moved(dims, elt, "fwdbwd") == forward_bytes + backward_bytes


def test_linear_cross_entropy_flops_match_pytorch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    dims = {"N": randint(3, 9), "D": randint(4, 12), "V": randint(20, 60)}
    spec = OP_SPECS["linear_cross_entropy"]
    for direction in DIRECTIONS:
        prep = prepare(Case("linear_cross_entropy", "seed", direction, "eager"), "cpu", dims=dims)
        with FlopCounterMode(display=False) as counter:
            prep.call()
        assert spec.flops(dims, direction) == counter.get_total_flops()


def test_relative_error_catches_wrong_and_nan_results():
    e = torch.randn(50, dtype=torch.float64)
    scale = uniform(1e-3, 1e-1)
    noise = torch.randn(50, dtype=torch.float64)
    rel = cases.relative_error([e + scale * noise], [e])
    assert rel == pytest.approx((scale * noise).norm().item() / e.norm().item())
    assert cases.relative_error([e, torch.zeros(3)], [e, torch.zeros(3)]) == 0.0
    broken = e.clone()
    broken[randint(0, 49)] = float("nan")
    assert cases.relative_error([broken], [e]) == float("inf")


def test_op_record_rates_follow_from_the_models():
    case = Case("rms_norm", "large", "fwdbwd", "fastcenter")
    median = uniform(0.1, 5.0)
    peaks = {"copy_gbps": uniform(1000, 5000), "matmul_tflops": uniform(300, 1000)}
    record = op_record(case, _timing(median), peaks, fused=True)
    dims = OP_SPECS["rms_norm"].shapes["large"]
    expected_bytes = cases.rms_norm_bytes(dims, 2, "fwdbwd")
    assert record["bytes"] == expected_bytes
    assert record["gbps"] == pytest.approx(expected_bytes / (median * 1e-3) / 1e9)
    assert record["pct_of_copy_bw"] == pytest.approx(100 * record["gbps"] / peaks["copy_gbps"])
    assert record["tflops"] is None and record["fused"] is True

    lce = op_record(Case("linear_cross_entropy", "seed", "fwdbwd", "eager"), _timing(median), peaks)
    n, d, v = 8192, 256, 50257
    assert lce["tflops"] == pytest.approx(6 * n * d * v / (median * 1e-3) / 1e12)
    assert lce["pct_of_matmul"] == pytest.approx(100 * lce["tflops"] / peaks["matmul_tflops"])


# ---------------------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------------------


class FakeClock:
    """Time moves only when the fake work says so; counts syncs."""

    def __init__(self):
        self.now, self.syncs, self.leads = 0.0, 0, []

    def stamp(self):
        return self.now

    def lead(self, ms):
        self.leads.append(ms)
        self.now += ms  # the GPU spins; untimed

    def elapsed_ms(self, start, end):
        return end - start

    def sync(self):
        self.syncs += 1


def test_measure_excludes_warmup_setup_and_flush_and_syncs_once_at_the_end():
    clock = FakeClock()
    calls: list[float] = []
    untimed = {"setup": 0, "flush": 0}

    def fn():
        duration = 1000.0 if len(calls) < 2 else uniform(1.0, 3.0)  # the first two calls "compile"
        calls.append(duration)
        clock.now += duration

    def setup():
        untimed["setup"] += 1
        clock.now += 50.0

    def flush():
        untimed["flush"] += 1
        clock.now += 50.0

    timing = measure(fn, clock=clock, setup=setup, flush=flush, warmup_ms=10.0, target_ms=100.0)
    assert timing.times_ms == pytest.approx(calls[-timing.reps :])
    assert max(timing.times_ms) <= 3.0  # neither the compile calls nor setup/flush were timed
    assert 100 / 3.0 <= timing.reps <= 100 / 1.0 + 1
    assert untimed["setup"] == untimed["flush"] == len(calls) - 3  # every call but the 3 of the estimate
    assert clock.syncs == 3  # after warm-up, after the estimate, after the timed reps: none inside
    assert len(clock.leads) == timing.reps and all(ms > 0 for ms in clock.leads)  # the GPU ran ahead each rep
    assert timing.host_enqueue_ms is not None and timing.summary()["host_enqueue_ms"] == timing.host_enqueue_ms


def test_measure_respects_rep_bounds_and_runs_on_a_host_clock():
    timing = measure(lambda: sum(range(100)), clock=HostClock(), warmup_ms=0.0, target_ms=1e6, max_reps=17)
    assert timing.reps == 17
    slow = FakeClock()

    def slow_fn():
        slow.now += 500.0

    assert measure(slow_fn, clock=slow, target_ms=100.0, min_reps=7).reps == 7


def test_timing_statistics():
    values = [uniform(0.01, 10.0) for _ in range(randint(5, 40))]
    timing = Timing(values)
    assert timing.median_ms == pytest.approx(float(np.median(values)))
    for q in (0.2, 0.8):
        assert timing.quantile_ms(q) == pytest.approx(float(np.quantile(values, q)))
    summary = timing.summary()
    assert summary["reps"] == len(values) and summary["min_ms"] == min(values)
    assert summary["mean_ms"] == pytest.approx(float(np.mean(values)))
    assert summary["times_ms"] == [round(v, 6) for v in values]


def test_tensor_bytes_counts_storages_once_and_leaves_out_inputs():
    qkv = torch.randn(2, 5, 3, 4, 8, dtype=torch.bfloat16)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    fresh = torch.randn(7, 3)
    assert tensor_bytes((q, k)) == nbytes(qkv)
    assert tensor_bytes([q, {"a": fresh}]) == nbytes(qkv) + nbytes(fresh)
    assert tensor_bytes((q, fresh), exclude={"qkv": qkv}) == nbytes(fresh)


# ---------------------------------------------------------------------------------------------------------
# Environment and skip
# ---------------------------------------------------------------------------------------------------------


def test_skip_reason_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("FASTCENTER_BENCH_DRY_RUN", raising=False)
    assert skip_reason() == CUDA_SKIP_REASON
    monkeypatch.setenv("FASTCENTER_BENCH_DRY_RUN", "1")
    assert skip_reason() is None


def test_run_order_puts_the_training_step_first_then_seed_shapes():
    ids = [f"bench/test_ops.py::test_op[{c.id}]" for c in cases.all_op_cases()]
    ids += [f"bench/test_train_step.py::test_train_step[{c.id}]" for c in cases.train_cases()]
    ordered = sorted(ids, key=plugin.run_priority)
    shapes = [parse_case_id(i).shape for i in ordered]
    assert all(parse_case_id(i).op == "train_step" for i in ordered[:4])
    assert shapes[4:] == sorted(shapes[4:], key=lambda s: s != "seed")  # every seed case before any large one
    seed_ops = [i for i in ordered if parse_case_id(i).shape == "seed" and "train_step" not in i]
    assert seed_ops == [i for i in ids if parse_case_id(i).shape == "seed" and "train_step" not in i]


def test_time_budget(monkeypatch):
    budget = uniform(10, 1000)
    assert plugin.budget_skip_reason(budget * 0.99, budget) is None
    assert "FASTCENTER_BENCH_BUDGET_S" in plugin.budget_skip_reason(budget * 1.01, budget)
    assert plugin.budget_skip_reason(1e9, 0) is None  # 0: no budget
    monkeypatch.setenv("FASTCENTER_BENCH_BUDGET_S", str(budget))
    assert plugin.time_budget_s() == budget


def test_git_info_override_and_source_hash(monkeypatch):
    commit = "".join("0123456789abcdef"[randint(0, 15)] for _ in range(40))
    monkeypatch.setenv("FASTCENTER_GIT_COMMIT", commit)
    info = git_info()
    assert info["commit"] == commit
    assert info["source_sha256"] == source_hash() and re.fullmatch(r"[0-9a-f]{16}", info["source_sha256"])


def _pytest(args, env=None, cwd=ROOT, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_bench_suite_without_cuda_skips_gpu_cases_with_one_reason_and_runs_the_cpu_comparison(tmp_path):
    """`pytest bench/ --benchmark-only` on a machine without a GPU: every GPU case skipped with one reason, which
    the session's own summary repeats at its end (not only -rs), and the CPU comparison run (tiny here)."""
    pytest.importorskip("pytest_benchmark")
    out = tmp_path / "bench.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "FASTCENTER_BENCH_CPU_SHAPE": "tiny",
           "FASTCENTER_BENCH_CPU_ROUNDS": "1", "FASTCENTER_BENCH_CPU_STEPS": "2", "FASTCENTER_BENCH_CPU_THREADS": "1"}
    env.pop("FASTCENTER_BENCH_DRY_RUN", None)
    result = _pytest(["bench/", "--benchmark-only", "-rs", f"--benchmark-json={out}"], env=env, timeout=600)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-5000:]
    reasons = {line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("SKIPPED")}
    assert reasons == {CUDA_SKIP_REASON}, text[-5000:]
    assert "1 passed" in text and "error" not in text.lower() and "failed" not in text.lower()
    # The session's summary: the CPU comparison, then (last of fastcenter's sections) why GPU cases did not run.
    summary = text[text.index("fastcenter: CPU comparison"):]
    assert "CPU comparison, tiny shape" in summary and "speed ratio fastcenter / plain" in summary
    assert "targets: not evaluated (the tiny shape is not the seed config)" in summary
    gpu = summary[summary.index("fastcenter: GPU cases not run"):]
    assert re.search(rf"\d+ GPU benchmark case\(s\) skipped: {re.escape(CUDA_SKIP_REASON)}", gpu), gpu
    assert "benchmark: 1 tests" not in gpu  # after pytest-benchmark's table: only -rs's list and the count follow

    # The raw runs behind it, from the benchmark JSON: one per side, rows per step, consistent figures.
    (bench,) = json.loads(out.read_text())["benchmarks"]
    results = bench["extra_info"]["cpu_comparison"]
    assert results["schema"] == cpu.SCHEMA and results["settings"]["shape"] == "tiny"
    assert sorted(r["side"] for r in results["runs"]) == ["fastcenter", "plain"]
    for run in results["runs"]:
        assert run["returncode"] == 0 and not run.get("error")
        assert [row["step"] for row in run["rows"]] == [1, 2]
        assert run["tokens_per_sec"] == run["rows"][1]["tokens_per_sec"] > 0  # the first step is left out
        assert run["peak_rss_bytes"] > 50e6 and run["cpu_user_s"] > 0 and run["wall_s"] > 0
    assert "--fused" in results["runs"][0]["argv"] or "--fused" in results["runs"][1]["argv"]
    assert results["summary"] == cpu.summarize(results["runs"])
    md = report.render_markdown([], [("cpu-tiny.json", results)])
    assert "not measured at the seed config (tiny shape)" in md


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def _timing(median_ms: float) -> dict:
    times = [median_ms * f for f in (0.97, 1.0, 1.04)]
    return Timing(times).summary()


DEVICE = "NVIDIA H100 80GB HBM3"


def _environment(device=DEVICE):
    return {
        "device": {"name": device, "capability": "9.0", "multiprocessors": 132},
        "torch": "2.11.0",
        "triton": "3.6.0",
        "cuda": "13.0",
        "git": {"commit": "0123abc", "dirty": False, "source_sha256": "feedfacecafebeef"},
    }


def _benchmark_json(records, skipped=(), failed=(), device=DEVICE, when="2026-11-21T09:30:00+00:00", peaks=None):
    """A pytest-benchmark JSON as `--benchmark-json` writes it, with bench.plugin's section."""
    benchmarks = []
    for record in records:
        median_s = uniform(1e-3, 2e-2)
        benchmarks.append(
            {
                "group": f"{record['op']} {record['shape']} {record['direction']}",
                "name": f"test_op[{record['case']}]",
                "fullname": f"bench/test_ops.py::test_op[{record['case']}]",
                "params": None,
                "param": record["case"],
                "extra_info": record,
                "options": {},
                "stats": {"min": median_s * 0.9, "max": median_s * 1.2, "mean": median_s, "stddev": 1e-5,
                          "rounds": 10, "median": median_s, "data": [median_s] * 10},
            }
        )
    return {
        "machine_info": {},
        "commit_info": {},
        "benchmarks": benchmarks,
        "datetime": when,
        "version": "5.3.1",
        "fastcenter": {
            "schema": "fastcenter-bench-session/1",
            "environment": _environment(device),
            "peaks": peaks,
            "skipped": list(skipped),
            "failed": list(failed),
            "wall_s": 1.0,
        },
    }


def _synthetic_run():
    """Random medians for a representative set of cases; returns (records by id, json, peaks)."""
    peaks = {"copy_gbps": uniform(2000, 4000), "matmul_tflops": uniform(600, 900)}
    records = {}

    def op(op_name, shape, direction, variant, median, **extra):
        case = Case(op_name, shape, direction, variant)
        records[case.id] = op_record(case, _timing(median), peaks, **extra)

    for variant in ("fastcenter", "eager", "compile", "torch_lce_chunked"):
        extra = {"mem_extra_bytes": randint(10, 300) * 10**6} if variant == "fastcenter" else {}
        op("linear_cross_entropy", "seed", "fwdbwd", variant, uniform(0.8, 4.0), **extra)
    for direction in DIRECTIONS:
        op("rms_norm", "large", direction, "fastcenter", uniform(0.2, 2.0), fused=True)
        op("rms_norm", "seed", direction, "fastcenter", uniform(0.005, 0.05), fused=True)
        op("rms_norm", "seed", direction, "compile", uniform(0.005, 0.05))
    op("swiglu", "seed", "fwd", "fastcenter", uniform(0.01, 0.1), fused=False)
    for variant in ("fused", "eager", "eager_compile"):
        case = Case("train_step", "seed", "step", variant)
        records[case.id] = train_record(
            case, _timing(uniform(1.0, 8.0)), tokens_per_step=8192, flops_per_token=10**8, peaks=peaks,
            train_peak_bytes=randint(300, 1500) * 10**6,
        )
    skipped = [{"id": "linear_cross_entropy-seed-fwdbwd-liger", "nodeid": "x",
                "reason": "Liger-Kernel is not importable here (ModuleNotFoundError)"}]
    failed = [{"id": "rope-seed-fwd-fastcenter", "nodeid": "y", "when": "call", "message": "AssertionError: boom"}]
    return records, _benchmark_json(list(records.values()), skipped, failed, peaks=peaks), peaks


def _row(markdown: str, *cells: str) -> str:
    """The one table row of markdown that starts with these cells."""
    prefix = "| " + " | ".join(cells) + " |"
    rows = [line for line in markdown.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, (prefix, rows)
    return rows[0]


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip("|").split("|")]


def test_report_from_synthetic_benchmark_json(tmp_path):
    records, run, peaks = _synthetic_run()
    src = tmp_path / "run.json"
    src.write_text(json.dumps(run))
    md_path, results_dir = tmp_path / "BENCHMARKS.md", tmp_path / "results"
    assert report.main([str(src), "--results-dir", str(results_dir), "--markdown", str(md_path)]) == 0

    written = sorted(results_dir.glob("*.json"))
    assert [p.name for p in written] == ["nvidia-h100-80gb-hbm3-2026-11-21.json"]
    results = json.loads(written[0].read_text())
    assert results["device"] == DEVICE and results["peaks"] == peaks
    assert {r["case"] for r in results["cases"]} == set(records)
    for r in results["cases"]:
        assert r["times_ms"] == records[r["case"]]["times_ms"]  # raw timings kept
        assert r["host_stats_s"]["rounds"] == 10
    assert [s["id"] for s in results["skipped"]] == ["linear_cross_entropy-seed-fwdbwd-liger"]
    assert [f["id"] for f in results["failed"]] == ["rope-seed-fwd-fastcenter"]

    md = md_path.read_text()
    assert "Nothing has been measured" not in md and DEVICE in md

    # A kernel row: median, TFLOP/s, % of peak and the speed-ups, from the records.
    lce_compile = records["linear_cross_entropy-seed-fwdbwd-compile"]
    lce_eager = records["linear_cross_entropy-seed-fwdbwd-eager"]
    cells = _cells(_row(md, "seed: N=8192 x D=256 x V=50257", "forward+backward", "compile"))
    assert cells[3] == report.fmt_ms(lce_compile["median_ms"])
    assert cells[4] == f"{6 * 8192 * 256 * 50257 / (lce_compile['median_ms'] * 1e-3) / 1e12:,.1f}"
    assert cells[5] == f"{lce_compile['pct_of_matmul']:.0f}%"
    assert cells[6] == f"{lce_eager['median_ms'] / lce_compile['median_ms']:.2f}x"
    assert cells[7] == "1.00x"
    assert "not run: `linear_cross_entropy-seed-fwdbwd-liger`: Liger-Kernel is not importable" in md
    assert "not run: `rope-seed-fwd-fastcenter`: failed: AssertionError: boom" in md
    assert "fastcenter (reference fallback" in _row(md, "seed: N=8192 x H=1024", "forward")

    # The training table and the targets, recomputed from the records.
    fused, eager_compile = records["train_step-seed-step-fused"], records["train_step-seed-step-eager_compile"]
    cells = _cells(_row(md, "fused"))
    assert cells[2] == f"{fused['tokens_per_s']:,.0f}"
    assert cells[7] == f"{eager_compile['median_ms'] / fused['median_ms']:.2f}x"

    def status(target_start: str) -> str:
        return _cells(_row(md, target_start))[2]

    met = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    assert status(">= 3,000,000 tokens/s".join(["Training throughput of the fused seed model: ", " on one H100"])) \
        == met(fused["tokens_per_s"] >= 3e6)
    ratio = fused["tokens_per_s"] / eager_compile["tokens_per_s"]
    assert status("Fused training >= 1.25x the eager model under torch.compile (same session)") == met(ratio >= 1.25)
    assert status("Peak GPU memory of a fused training step at batch 16: <= 1 GB") == met(
        fused["train_peak_bytes"] <= 1e9
    )
    lce = records["linear_cross_entropy-seed-fwdbwd-fastcenter"]
    assert status("linear_cross_entropy, seed shape, bf16, forward+backward: <= 1.6 ms on an H100") == met(
        lce["median_ms"] <= 1.6
    )
    assert status("linear_cross_entropy, seed shape: <= 100 MB beyond inputs and gradients") == met(
        lce["mem_extra_bytes"] <= 100e6
    )
    assert status("linear_cross_entropy, seed shape, forward+backward: faster than torch.compile of the eager loss") \
        == met(lce_compile["median_ms"] > lce["median_ms"])
    liger = _cells(_row(md, "linear_cross_entropy, seed shape, forward+backward: faster than Liger-Kernel's fused "
                            "linear cross-entropy (where present)"))
    assert liger[2].startswith("not measured: Liger-Kernel is not importable")
    for direction, word in (("fwd", "forward"), ("fwdbwd", "forward+backward")):
        large = records[f"rms_norm-large-{direction}-fastcenter"]
        assert status(f"rms_norm, large shape, {word}: >= 85% of measured copy bandwidth") == met(
            large["gbps"] / peaks["copy_gbps"] >= 0.85
        )
        seed, compiled = records[f"rms_norm-seed-{direction}-fastcenter"], records[f"rms_norm-seed-{direction}-compile"]
        assert status(f"rms_norm, seed shape, {word}: no slower than torch.compile") == met(
            compiled["median_ms"] >= seed["median_ms"]
        )
    assert status("rope, large shape, forward: >= 85% of measured copy bandwidth") == "not yet measured"

    # Regenerating without new input rewrites the same markdown (no timestamps of its own).
    assert report.main(["--results-dir", str(results_dir), "--markdown", str(md_path)]) == 0
    assert md_path.read_text() == md


def test_report_merges_runs_and_keeps_runs_apart(tmp_path):
    records, run, peaks = _synthetic_run()
    ids = sorted(records)
    first = _benchmark_json([records[i] for i in ids[:4]], peaks=peaks, when="2026-11-21T09:00:00+00:00")
    skipped_then_run = [{"id": ids[5], "nodeid": "z", "reason": "compile failed"}]
    second = _benchmark_json([records[i] for i in ids[4:]], skipped_then_run, peaks=peaks,
                             when="2026-11-21T09:20:00+00:00")
    merged = report.build_results([("a", first), ("b", second)])
    assert {r["case"] for r in merged["cases"]} == set(records) and merged["skipped"] == []
    assert merged["datetime"] == "2026-11-21T09:20:00+00:00"

    path_a = report.write_results(merged, tmp_path)
    assert report.write_results(merged, tmp_path) == path_a  # the same run again: the same file
    later = {**merged, "datetime": "2026-11-21T23:00:00+00:00"}
    assert report.write_results(later, tmp_path).name == path_a.stem + "-2.json"
    assert [name for name, _ in report.load_results_dir(tmp_path)] == [path_a.name, path_a.stem + "-2.json"]

    other = _benchmark_json([records[ids[0]]], device="NVIDIA H200", peaks=peaks)
    with pytest.raises(report.ReportError, match="different devices"):
        report.build_results([("a", first), ("c", other)])


def test_report_errors_are_clear(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing.json"), "--results-dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"benchmarks": [], "datetime": "2026-01-01T00:00:00"}))
    assert report.main([str(empty), "--results-dir", str(tmp_path)]) == 2
    assert "no fastcenter benchmark cases" in capsys.readouterr().err


def test_markdown_without_results_claims_nothing():
    md = report.render_markdown([])
    assert "Nothing has been measured yet" in md
    targets = md.split("## Spec targets")[1].split("\n## ")[0]
    target_rows = [line for line in targets.splitlines() if line.startswith("| ") and not line.startswith("| target")]
    assert target_rows and all(_cells(row)[1:] == ["-", "not yet measured"] for row in target_rows)
    assert "pytest bench/ --benchmark-only" in md and "python -m bench.report" in md


def test_benchmarks_md_is_what_the_generator_writes():
    expected = report.render_markdown(report.load_results_dir(report.RESULTS_DIR), report.load_cpu_results())
    assert (ROOT / "BENCHMARKS.md").read_text() == expected, "regenerate with: python -m bench.report"


def test_dry_run_goes_through_the_gpu_code_paths_and_the_report_refuses_it(tmp_path):
    """FASTCENTER_BENCH_DRY_RUN=1 runs the GPU suite's own code (fixtures, measure, records, pytest-benchmark,
    bench.plugin's JSON hook) on the CPU at tiny shapes: what a first GPU session would otherwise find."""
    pytest.importorskip("pytest_benchmark")
    out = tmp_path / "dry.json"
    env = {**os.environ, "FASTCENTER_BENCH_DRY_RUN": "1", "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    selection = "train_step-seed-step-fused and not compile or linear_cross_entropy-seed-fwdbwd"
    result = _pytest(["bench/", "--benchmark-only", "-rs", "-k", selection, f"--benchmark-json={out}"], env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "CUDA-event medians" in result.stdout  # bench.plugin's terminal summary

    data = json.loads(out.read_text())
    section = data["fastcenter"]
    assert section["environment"]["device"]["name"] == "cpu (dry run)" and section["peaks"] is None
    records = {b["extra_info"]["case"]: b["extra_info"] for b in data["benchmarks"]}
    skipped = {s["id"]: s["reason"] for s in section["skipped"]}
    lce_variants = OP_SPECS["linear_cross_entropy"].variants
    assert set(records) | set(skipped) == {"train_step-seed-step-fused"} | {
        f"linear_cross_entropy-seed-fwdbwd-{v}" for v in lce_variants
    }
    assert {"train_step-seed-step-fused", "linear_cross_entropy-seed-fwdbwd-compile"} <= set(records)
    assert all(reason for reason in skipped.values()) and section["failed"] == []

    fused = records["linear_cross_entropy-seed-fwdbwd-fastcenter"]
    dims = cases.DRY_RUN_DIMS["linear_cross_entropy"]
    assert fused["dims"] == dims and fused["bytes"] == cases.linear_cross_entropy_bytes(dims, 2, "fwdbwd")
    assert fused["rel_err_vs_eager"] <= cases.SANITY_REL_ERROR[torch.bfloat16] and "fused" in fused
    assert len(fused["times_ms"]) == fused["reps"] and fused["dry_run"] is True
    step = records["train_step-seed-step-fused"]
    assert step["tokens_per_s"] == pytest.approx(step["tokens_per_step"] / (step["median_ms"] * 1e-3))

    with pytest.raises(report.ReportError, match="dry run"):
        report.build_results([(str(out), data)])
    for bench in data["benchmarks"]:  # as if measured: the report's tables accept what the harness writes
        bench["extra_info"]["dry_run"] = False
    md = report.render_markdown([("dry.json", report.build_results([(str(out), data)]))])
    assert _cells(_row(md, "fused"))[2] == f"{step['tokens_per_s']:,.0f}"
    _row(md, "seed: N=5 x D=16 x V=37", "forward+backward", "compile")


# ---------------------------------------------------------------------------------------------------------
# The CPU comparison (bench/cpu.py): summary, command line, report section
# ---------------------------------------------------------------------------------------------------------


def _cpu_run(side, round_, tokens_per_sec, peak, other=0.3, steps=4):
    """One run as bench.cpu.run_one records it: per-step rows whose median after step 1 is tokens_per_sec."""
    rows = [{"step": 1, "tokens_per_sec": tokens_per_sec / 3, "peak_mem_mb": peak / 2**20}]
    rows += [{"step": s, "tokens_per_sec": tokens_per_sec * f, "peak_mem_mb": peak / 2**20}
             for s, f in zip(range(2, steps + 1), (0.9, 1.0, 1.2))]  # fmt: skip
    return {"side": side, "round": round_, "returncode": 0, "rows": rows, "tokens_per_sec": tokens_per_sec,
            "peak_rss_bytes": peak, "wall_s": 60.0, "cpu_user_s": 100.0, "cpu_sys_s": 5.0,
            "noise": {"loadavg_before": 1.0 + round_, "loadavg_after": 2.0 + round_, "other_busy_fraction": other,
                      "steal_fraction": 0.0}}  # fmt: skip


def _cpu_results(runs, shape="seed"):
    settings = {**vars(cpu.settings_for(shape, rounds=len(runs) // 2)), "threads": 2}
    return {
        "schema": cpu.SCHEMA, "datetime": "2026-12-03T10:00:00+00:00", "date": "2026-12-03", "wall_s": 1.0,
        "machine": {"cpu_model": "Test CPU @ 1 GHz", "logical_cpus": 2, "cpus_available": 2, "threads": 2,
                    "memory_bytes": 8e9, "platform": "linux", "python": "3.11", "torch": "2.13.0",
                    "torch_cpu_capability": "AVX512"},
        "git": {"commit": "abc123", "dirty": False, "source_sha256": "0123456789abcdef"},
        "settings": settings, "data": {}, "labels": cpu.LABELS, "runs": runs, "summary": cpu.summarize(runs),
    }  # fmt: skip


def test_cpu_summary_pairs_runs_by_round_and_evaluates_the_targets():
    fast = [uniform(500, 700) for _ in range(3)]
    slow = [uniform(250, 450) for _ in range(3)]
    rss = [randint(1500, 2900) * 10**6 for _ in range(3)]
    others = [uniform(0, 0.9) for _ in range(6)]
    runs = []
    for n in range(3):
        runs.append(_cpu_run("fastcenter", n, fast[n], rss[n], others[2 * n]))
        runs.append(_cpu_run("plain", n, slow[n], 7e9, others[2 * n + 1]))
    s = cpu.summarize(runs)
    assert s["fastcenter"]["tokens_per_sec"]["median"] == pytest.approx(np.median(fast))
    assert s["plain"]["peak_rss_bytes"]["max"] == 7e9 and s["fastcenter"]["peak_rss_bytes"]["max"] == max(rss)
    ratios = [f / p for f, p in zip(fast, slow)]  # paired by round, not a ratio of medians
    assert s["speedup"]["median"] == pytest.approx(np.median(ratios))
    assert (s["speedup"]["min"], s["speedup"]["max"]) == (pytest.approx(min(ratios)), pytest.approx(max(ratios)))
    assert s["noise"]["other_busy_fraction"]["max"] == pytest.approx(max(others))
    assert s["targets"]["peak_rss"]["met"] and s["targets"]["speedup"]["met"] == (np.median(ratios) >= 1.1)
    # A bigger process, a slower one, a failed run: the targets say so, and a failure is counted, not averaged.
    runs[0] = {**_cpu_run("fastcenter", 0, 100.0, 4e9), "returncode": -9, "tokens_per_sec": None, "error": "killed"}
    s = cpu.summarize(runs)
    assert s["fastcenter"]["failed"] == 1 and s["fastcenter"]["tokens_per_sec"]["n"] == 2
    assert s["speedup"]["n"] == 2
    assert cpu.summarize([_cpu_run("fastcenter", 0, 100.0, 4e9), _cpu_run("plain", 0, 200.0, 7e9)])["targets"] == {
        "peak_rss": {"target_bytes": 3e9, "measured_bytes": 4e9, "met": False},
        "speedup": {"target": 1.1, "measured": 0.5, "met": False},
    }


def test_cpu_runner_commands_are_the_documented_ones(tmp_path):
    seed = cpu.settings_for("seed")
    argv, metrics = cpu.commands(seed, tmp_path / "data", tmp_path / "out")["fastcenter"]
    assert argv[1:] == ["train.py", "--fused", "--device", "cpu", "--batch-size", "16", "--grad-accum-steps", "1",
                        "--seq-len", "512", "--max-iters", "4", "--eval-interval", "4", "--eval-iters", "1",
                        "--log-interval", "1", "--data", str(tmp_path / "data"), "--out-dir",
                        str(tmp_path / "out" / "fastcenter")]  # fmt: skip
    assert metrics == tmp_path / "out" / "fastcenter" / "metrics.jsonl"
    tiny_argv, _ = cpu.commands(cpu.settings_for("tiny"), tmp_path, tmp_path)["fastcenter"]
    assert tiny_argv[tiny_argv.index("--dim") + 1] == "32"  # shape flags only where they differ from the seed
    plain, _ = cpu.commands(seed, tmp_path, tmp_path)["plain"]
    assert plain[1:3] == ["-m", "bench.plain_gpt"] and plain[plain.index("--vocab-size") + 1] == "50257"
    with pytest.raises(ValueError, match="steps >= 2"):
        cpu.settings_for("seed", steps=1)


def test_cpu_runner_command_line_writes_results_and_the_summary(tmp_path, monkeypatch, capsys):
    runs = [_cpu_run("fastcenter", 0, 600.0, 2e9), _cpu_run("plain", 0, 300.0, 7e9)]
    seen = {}

    def fake_compare(settings, work_dir=None, say=print):
        seen["settings"] = settings
        return _cpu_results(runs)

    monkeypatch.setattr(cpu, "compare", fake_compare)
    out = tmp_path / "cpu.json"
    assert cpu.main(["--rounds", "1", "--steps", "3", "--threads", "1", "--out", str(out)]) == 0
    assert (seen["settings"].rounds, seen["settings"].steps, seen["settings"].n_threads) == (1, 3, 1)
    assert json.loads(out.read_text())["summary"] == cpu.summarize(runs)
    printed = capsys.readouterr().out
    assert "2.00x" in printed and "peak RSS <= 3 GB: met" in printed and f"wrote {out}" in printed
    assert "BENCHMARKS.md" not in printed  # results written elsewhere than bench/results/: the markdown stays
    assert cpu.default_path(_cpu_results(runs), tmp_path).name == "cpu-test-cpu-1-ghz-2026-12-03.json"


def test_report_cpu_section_shows_the_newest_comparison_and_keeps_gpu_targets_unmeasured():
    runs = []
    for n in range(3):
        runs += [_cpu_run("fastcenter", n, 600.0 + n, 1.8e9, 0.4), _cpu_run("plain", n, 300.0, 6.9e9, 0.6)]
    results = _cpu_results(runs)
    md = report.render_markdown([], [("cpu-old.json", _cpu_results(runs[:2])), ("cpu-new.json", results)])
    assert "Nothing has been measured on a GPU yet" in md
    targets = md.split("## Spec targets")[1].split("\n## ")[0]
    rows = [line for line in targets.splitlines() if line.startswith("| ") and not line.startswith("| target")]
    assert rows and all(_cells(row)[1:] == ["-", "not yet measured"] for row in rows)
    section = md.split("## On a CPU")[1].split("\n## ")[0]
    assert "`bench/results/cpu-new.json`" in section
    assert "Earlier CPU comparisons: `bench/results/cpu-old.json`" in section
    assert _cells(_row(section, cpu.LABELS["fastcenter"]))[1:] == ["601 [600 - 602]", "1,800 [1,800 - 1,800]", "3"]
    assert _cells(_row(section, cpu.LABELS["plain"]))[1:] == ["300 [300 - 300]", "6,900 [6,900 - 6,900]", "3"]
    rss_row = [line for line in section.splitlines() if line.startswith("| Peak RSS")][0]
    speed_row = [line for line in section.splitlines() if line.startswith("| tokens/s of")][0]
    assert _cells(rss_row)[1:] == ["1,800 MB (largest run)", "met"]
    assert _cells(speed_row)[1:] == ["2.00x (median of 3 rounds; 2.00x-2.01x)", "met"]
    assert "Other processes used 50%" in section and "How noisy the machine was" in section
    # Without any CPU results the section says nothing was measured; GPU-less and CPU-less: as before.
    assert "No CPU comparison has been recorded yet" in report.render_markdown([])
