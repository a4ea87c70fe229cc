"""The benchmark harness (bench/) on the CPU: everything in it that does not need a GPU.

- byte models against the bytes of the tensors an op really reads and writes; the FLOP model against PyTorch's
  FlopCounterMode; the records' rates; the timing statistics; memory accounting of views;
- the report: synthetic benchmark JSON -> results file -> BENCHMARKS.md tables, speed-ups and targets; a GPU run
  filed beside the CPU comparison and the compile check keeps every section; BENCHMARKS.md is what it writes;
- the suite without CUDA (subprocess): every GPU case skipped with one reason, said again at the session's end, the
  CPU comparison run instead; the dry run (subprocess) through the GPU code paths, its JSON refused as a measurement;
- the CPU comparison's summary (paired ratios, noise, targets), command line and BENCHMARKS.md section.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `bench` is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import cases, compare_plain, report  # noqa: E402
from bench.cases import DIRECTIONS, OP_SPECS, Case, op_record, parse_case_id, prepare, train_record  # noqa: E402
from bench.conftest import skip_reason  # noqa: E402
from bench.measure import CUDA_SKIP_REASON, DeviceClock, tensor_bytes, timing_summary  # noqa: E402
from fastcenter.data import GPT2_VOCAB_SIZE  # noqa: E402
from fastcenter.environment import collect, git_info, source_hash  # noqa: E402

# Small, awkward dims per op: enough to check the models' arithmetic, fast on the CPU.
SMALL = {
    "rms_norm": {"N": 6, "D": 10},
    "center_rms_norm": {"N": 7, "D": 12},
    "rope": {"B": 2, "T": 3, "H": 3, "Dh": 8},
    "swiglu": {"N": 5, "H": 6},
    "cross_entropy": {"N": 5, "V": 37},
    "linear_cross_entropy": {"N": 5, "D": 8, "V": 37},
}
# What each backward must read besides the grad_outputs: inputs by name, or outputs by position (a property of the
# op's math, stated here independently of the byte models in bench/cases.py).
BACKWARD_READS = {
    "rms_norm": (["x", "weight"], []),
    "center_rms_norm": (["weight"], [1]),  # the saved `hidden` output, not x / residual / centre
    "rope": (["cos", "sin"], []),
    "swiglu": (["packed"], []),
    "cross_entropy": (["logits", "target"], []),
    "linear_cross_entropy": (["x", "weight", "target"], []),
}


def uniform(low: float, high: float) -> float:
    """From torch's generator, which tests/conftest.py seeds (and prints on failure)."""
    return low + (high - low) * torch.rand(()).item()


def randint(low: int, high: int) -> int:
    return int(torch.randint(low, high + 1, ()).item())


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def test_case_ids_are_unique_and_round_trip():
    all_cases = cases.op_cases() + cases.train_cases()
    assert len({c.id for c in all_cases}) == len(all_cases)
    for c in all_cases:
        assert parse_case_id(c.id) == c == parse_case_id(f"bench/test_ops.py::test_op[{c.id}]")
    assert parse_case_id("tests/test_x.py::test_y") is None
    with pytest.raises(ValueError, match="may not"):
        Case("rms-norm", "default", "fwd", "eager")


def test_every_op_has_the_default_shape_and_the_spec_variants():
    for spec in OP_SPECS.values():
        assert "default" in spec.shapes and {"fastcenter", "eager", "compile"} <= set(spec.variant_names)
    lce = OP_SPECS["linear_cross_entropy"]
    assert lce.shapes["default"] == {"N": 16 * 512, "D": 256, "V": GPT2_VOCAB_SIZE}
    assert {"torch_lce_chunked", "liger"} <= set(lce.variant_names)
    assert all("large" in OP_SPECS[name].shapes for name in ("rms_norm", "center_rms_norm", "rope", "swiglu"))
    ids = [c.id for c in cases.op_cases()]  # the default shapes run first, the losses first among them
    assert ids[0].startswith("linear_cross_entropy-default-") and "-large-" not in "".join(ids[: len(ids) // 2])


@pytest.mark.parametrize("op", list(OP_SPECS))
def test_byte_model_counts_the_tensors_the_op_reads_and_writes(op):
    """Forward: every input read, every output written. Backward: grad_outputs and the inputs/outputs the math
    needs read, every gradient written (input and residual of center_rms_norm share one)."""
    spec, dims = OP_SPECS[op], SMALL[op]
    fwd = prepare(Case(op, "default", "fwd", "eager"), "cpu", dims=dims)
    outputs = fwd.call()
    forward_bytes = sum(nbytes(t) for t in fwd.tensors.values()) + sum(nbytes(t) for t in outputs)
    assert spec.bytes_moved(dims, 2, "fwd") == forward_bytes

    bwd = prepare(Case(op, "default", "fwdbwd", "eager"), "cpu", dims=dims)
    named_grads = dict(zip(spec.differentiable, bwd.call()))
    named_grads.pop("residual", None)  # one gradient tensor serves input and residual
    read_inputs, read_outputs = BACKWARD_READS[op]
    backward_bytes = (
        sum(nbytes(o) for o in outputs)  # the grad_outputs: the outputs' shapes and dtypes
        + sum(nbytes(fwd.tensors[name]) for name in read_inputs)
        + sum(nbytes(outputs[i]) for i in read_outputs)
        + sum(nbytes(g) for g in named_grads.values())
    )
    assert spec.bytes_moved(dims, 2, "fwdbwd") == forward_bytes + backward_bytes


def test_linear_cross_entropy_flops_match_pytorch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    dims = {"N": randint(3, 9), "D": randint(4, 12), "V": randint(20, 60)}
    for direction in DIRECTIONS:
        prep = prepare(Case("linear_cross_entropy", "default", direction, "eager"), "cpu", dims=dims)
        with FlopCounterMode(display=False) as counter:
            prep.call()
        assert OP_SPECS["linear_cross_entropy"].flops(dims, direction) == counter.get_total_flops()


def test_relative_error_catches_wrong_and_nan_results():
    e, noise = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    scale = uniform(1e-3, 1e-1)
    assert cases.relative_error([e + scale * noise], [e]) == pytest.approx(
        (scale * noise).norm().item() / e.norm().item()
    )
    assert cases.relative_error([e, torch.zeros(3)], [e, torch.zeros(3)]) == 0.0
    broken = e.clone()
    broken[randint(0, 49)] = float("nan")
    assert cases.relative_error([broken], [e]) == float("inf")


def _timing(median_ms: float) -> dict:
    return timing_summary([median_ms * f * 1e-3 for f in (0.97, 1.0, 1.04)])


def test_op_record_rates_follow_from_the_models():
    median = uniform(0.1, 5.0)
    peaks = {"copy_gbps": uniform(1000, 5000), "matmul_tflops": uniform(300, 1000)}
    record = op_record(Case("rms_norm", "large", "fwdbwd", "fastcenter"), _timing(median), peaks, fused=True)
    expected_bytes = cases.rms_norm_bytes(OP_SPECS["rms_norm"].shapes["large"], 2, "fwdbwd")
    assert record["bytes"] == expected_bytes and record["tflops"] is None and record["fused"] is True
    assert record["gbps"] == pytest.approx(expected_bytes / (median * 1e-3) / 1e9)
    assert record["pct_of_copy_bw"] == pytest.approx(100 * record["gbps"] / peaks["copy_gbps"])
    lce = op_record(Case("linear_cross_entropy", "default", "fwdbwd", "eager"), _timing(median), peaks)
    assert lce["tflops"] == pytest.approx(6 * 8192 * 256 * GPT2_VOCAB_SIZE / (median * 1e-3) / 1e12)
    assert lce["pct_of_matmul"] == pytest.approx(100 * lce["tflops"] / peaks["matmul_tflops"])


def test_timing_statistics_and_the_host_clock():
    seconds = [uniform(1e-5, 1e-2) for _ in range(randint(5, 40))]
    summary = timing_summary(seconds, enqueue_ms=0.5)
    ms = np.array(seconds) * 1e3
    assert summary["median_ms"] == pytest.approx(np.median(ms)) and summary["reps"] == len(seconds)
    assert summary["q20_ms"] == pytest.approx(np.quantile(ms, 0.2)) and summary["q80_ms"] == pytest.approx(
        np.quantile(ms, 0.8)
    )
    assert summary["min_ms"] == pytest.approx(ms.min()) and summary["mean_ms"] == pytest.approx(ms.mean())
    assert summary["times_ms"] == [round(t * 1e3, 6) for t in seconds] and summary["host_enqueue_ms"] == 0.5
    clock = DeviceClock()  # no CUDA here: it advances by the host time of the wrapped call only
    before = clock()
    clock.timed(lambda: sum(range(20000)))()
    assert clock() > before and clock() == clock()


def test_tensor_bytes_counts_storages_once_and_leaves_out_inputs():
    qkv = torch.randn(2, 5, 3, 4, 8, dtype=torch.bfloat16)
    q, k, fresh = qkv[:, :, 0], qkv[:, :, 1], torch.randn(7, 3)
    assert tensor_bytes((q, k)) == nbytes(qkv)
    assert tensor_bytes([q, {"a": fresh}]) == nbytes(qkv) + nbytes(fresh)
    assert tensor_bytes((q, fresh), exclude={"qkv": qkv}) == nbytes(fresh)


def test_skip_reasons_with_and_without_cuda(monkeypatch):
    """The GPU cases run on a GPU or in a dry run; the CPU comparison where they cannot, in a dry run, or when
    asked for (FASTCENTER_BENCH_CPU=1)."""
    for name in ("FASTCENTER_BENCH_DRY_RUN", "FASTCENTER_BENCH_CPU"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert skip_reason() == CUDA_SKIP_REASON and skip_reason(cpu_comparison=True) is None
    monkeypatch.setenv("FASTCENTER_BENCH_DRY_RUN", "1")
    assert skip_reason() is None and skip_reason(cpu_comparison=True) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("FASTCENTER_BENCH_DRY_RUN", "0")
    assert skip_reason() is None and "FASTCENTER_BENCH_CPU=1" in skip_reason(cpu_comparison=True)
    monkeypatch.setenv("FASTCENTER_BENCH_CPU", "1")
    assert skip_reason(cpu_comparison=True) is None


def test_environment_commit_override_and_source_hash(monkeypatch):
    commit = "".join("0123456789abcdef"[randint(0, 15)] for _ in range(40))
    monkeypatch.setenv("FASTCENTER_GIT_COMMIT", commit)
    assert git_info()["commit"] == commit and re.fullmatch(r"[0-9a-f]{16}", source_hash())
    env = collect()
    assert env["git"]["commit"] == commit and env["torch"] == torch.__version__ and env["device"]["name"]
    assert {"python", "platform", "cpu", "triton", "transformers", "cuda"} <= set(env)


def _pytest(args, env, timeout=600):
    cmd = [sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_bench_suite_without_cuda_skips_gpu_cases_with_one_reason_and_runs_the_cpu_comparison(tmp_path):
    """`pytest bench/ --benchmark-only` without a GPU: every GPU case skipped with one reason, which the session's
    own summary repeats at its end (not only -rs), and the CPU comparison run (tiny here)."""
    pytest.importorskip("pytest_benchmark")
    out = tmp_path / "bench.json"
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "FASTCENTER_BENCH_CPU_SHAPE": "tiny",
        "FASTCENTER_BENCH_CPU_ROUNDS": "1",
        "FASTCENTER_BENCH_CPU_STEPS": "2",
        "FASTCENTER_BENCH_CPU_THREADS": "1",
    }
    env.pop("FASTCENTER_BENCH_DRY_RUN", None)
    result = _pytest(["bench/", "--benchmark-only", "-rs", f"--benchmark-json={out}"], env)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-5000:]
    reasons = {line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("SKIPPED")}
    assert reasons == {CUDA_SKIP_REASON}, text[-5000:]
    assert "1 passed" in text and "error" not in text.lower() and "failed" not in text.lower()
    summary = text[text.index("fastcenter: CPU comparison") :]
    assert "tiny shape (not the default config)" in summary and "Speed ratio train.py --fused / plain" in summary
    assert "not measured at the default config (tiny shape)" in summary
    gpu = summary[summary.index("fastcenter: GPU cases not run") :]
    assert re.search(rf"\d+ GPU benchmark case\(s\) skipped: {re.escape(CUDA_SKIP_REASON)}", gpu), gpu

    (bench,) = json.loads(out.read_text())["benchmarks"]  # the raw runs behind the summary
    results = bench["extra_info"]["cpu_comparison"]
    assert results["schema"] == compare_plain.SCHEMA and sorted(r["side"] for r in results["runs"]) == [
        "fastcenter",
        "plain",
    ]
    for run in results["runs"]:
        assert run["returncode"] == 0 and not run.get("error") and [row["step"] for row in run["rows"]] == [1, 2]
        assert run["tokens_per_sec"] == run["rows"][1]["tokens_per_sec"] > 0  # the first step is left out
        assert run["peak_rss_bytes"] > 50e6 and run["cpu_user_s"] > 0
    assert results["summary"] == compare_plain.summarize(results["runs"])


DEVICE = "NVIDIA H100 80GB HBM3"


def _benchmark_json(records, skipped=(), failed=(), device=DEVICE, when="2026-11-21T09:30:00+00:00", peaks=None):
    """A JSON as `--benchmark-json` (or FASTCENTER_BENCH_PARTIAL) writes it, with the session's section."""
    env = {
        "device": {"name": device, "capability": "9.0", "multiprocessors": 132},
        "torch": "2.11.0",
        "triton": "3.6.0",
        "cuda": "13.0",
        "git": {"commit": "0123abc", "dirty": False, "source_sha256": "feedface"},
    }
    section = {
        "environment": env,
        "peaks": peaks,
        "ops": cases.describe_ops(),
        "skipped": list(skipped),
        "failed": list(failed),
        "wall_s": 1.0,
    }
    return {
        "datetime": when,
        "version": "5.3.1",
        "benchmarks": [{"extra_info": r} for r in records],
        "fastcenter": section,
    }


def _synthetic_run():
    """Random medians for a representative set of cases: (records by id, json, peaks)."""
    peaks = {"copy_gbps": uniform(2000, 4000), "matmul_tflops": uniform(600, 900)}
    records = {}

    def op(name, shape, direction, variant, median, **extra):
        case = Case(name, shape, direction, variant)
        records[case.id] = op_record(case, _timing(median), peaks, **extra)

    for variant in ("fastcenter", "eager", "compile", "torch_lce_chunked"):
        extra = {"mem_extra_bytes": randint(10, 300) * 10**6} if variant == "fastcenter" else {}
        op("linear_cross_entropy", "default", "fwdbwd", variant, uniform(0.8, 4.0), **extra)
    for direction in DIRECTIONS:
        op("rms_norm", "large", direction, "fastcenter", uniform(0.2, 2.0), fused=True)
        op("rms_norm", "default", direction, "fastcenter", uniform(0.005, 0.05), fused=True)
        op("rms_norm", "default", direction, "compile", uniform(0.005, 0.05))
    op("swiglu", "default", "fwd", "fastcenter", uniform(0.01, 0.1), fused=False)
    for variant in ("fused", "eager", "eager_compile"):
        case = Case("train_step", "default", "step", variant)
        records[case.id] = train_record(
            case,
            _timing(uniform(1.0, 8.0)),
            tokens_per_step=8192,
            flops_per_token=10**8,
            peaks=peaks,
            train_peak_bytes=randint(300, 1500) * 10**6,
        )
    skipped = [{"id": "linear_cross_entropy-default-fwdbwd-liger", "nodeid": "x", "reason": "Liger-Kernel is not here"}]
    failed = [{"id": "rope-default-fwd-fastcenter", "nodeid": "y", "when": "call", "message": "AssertionError: boom"}]
    return records, _benchmark_json(list(records.values()), skipped, failed, peaks=peaks), peaks


def _row(markdown: str, *cells: str) -> list[str]:
    """The cells of the one table row of markdown that starts with these cells."""
    prefix = "| " + " | ".join(cells) + " |"
    rows = [line for line in markdown.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, (prefix, rows)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_report_from_synthetic_benchmark_json(tmp_path):
    records, run, peaks = _synthetic_run()
    (tmp_path / "run.json").write_text(json.dumps(run))
    md_path, results_dir = tmp_path / "BENCHMARKS.md", tmp_path / "results"
    assert report.main([str(tmp_path / "run.json"), "--results-dir", str(results_dir), "--markdown", str(md_path)]) == 0
    (written,) = results_dir.glob("*.json")
    results = json.loads(written.read_text())
    assert written.name == "nvidia-h100-80gb-hbm3-2026-11-21.json" and results["peaks"] == peaks
    assert {r["case"] for r in results["cases"]} == set(records)
    assert all(r["times_ms"] == records[r["case"]]["times_ms"] for r in results["cases"])  # raw timings kept
    assert [s["id"] for s in results["skipped"]] == ["linear_cross_entropy-default-fwdbwd-liger"]
    assert [f["id"] for f in results["failed"]] == ["rope-default-fwd-fastcenter"]

    md = md_path.read_text()
    assert "Nothing has been measured" not in md and DEVICE in md
    compiled, eager = (records[f"linear_cross_entropy-default-fwdbwd-{v}"] for v in ("compile", "eager"))
    cells = _row(md, f"default: N=8192 x D=256 x V={GPT2_VOCAB_SIZE}", "forward+backward", "compile")
    assert cells[3] == report.fmt_ms(compiled["median_ms"]) and cells[5] == f"{compiled['pct_of_matmul']:.0f}%"
    assert cells[4] == f"{6 * 8192 * 256 * GPT2_VOCAB_SIZE / (compiled['median_ms'] * 1e-3) / 1e12:,.1f}"
    assert cells[6] == f"{eager['median_ms'] / compiled['median_ms']:.2f}x" and cells[7] == "1.00x"
    assert "not run: `linear_cross_entropy-default-fwdbwd-liger`: Liger-Kernel is not here" in md
    assert "not run: `rope-default-fwd-fastcenter`: failed: AssertionError: boom" in md
    assert "fastcenter (reference fallback" in _row(md, "default: N=8192 x H=1024", "forward")[2]

    fused, eager_compile = records["train_step-default-step-fused"], records["train_step-default-step-eager_compile"]
    cells = _row(md, "fused")
    assert (
        cells[2] == f"{fused['tokens_per_s']:,.0f}"
        and cells[7] == f"{eager_compile['median_ms'] / fused['median_ms']:.2f}x"
    )
    status = lambda text: _row(md, text)[2]  # noqa: E731
    met = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    target = "Training throughput of the fused default model: >= 3,000,000 tokens/s on one H100"
    assert status(target) == met(fused["tokens_per_s"] >= 3e6)
    assert status(target.replace("3,000,000", "3,500,000").replace("H100", "H200")).startswith(
        met(fused["tokens_per_s"] >= 3.5e6) + " (the target is for an H200"
    )
    ratio = fused["tokens_per_s"] / eager_compile["tokens_per_s"]
    assert status("Fused training >= 1.25x the eager model under torch.compile (same session)") == met(ratio >= 1.25)
    assert _row(md, "Peak GPU memory of a fused training step at batch 16: <= 1 GB")[1:] == [
        f"{fused['train_peak_bytes'] / 1e9:.3f} GB",
        met(fused["train_peak_bytes"] <= 1e9),
    ]
    lce = records["linear_cross_entropy-default-fwdbwd-fastcenter"]
    assert status("linear_cross_entropy, default shape, bf16, forward+backward: <= 1.6 ms on an H100") == met(
        lce["median_ms"] <= 1.6
    )
    assert status("linear_cross_entropy, default shape: <= 100 MB beyond inputs and gradients") == met(
        lce["mem_extra_bytes"] <= 1e8
    )
    assert status(
        "linear_cross_entropy, default shape, forward+backward: faster than torch.compile of the eager loss"
    ) == met(compiled["median_ms"] > lce["median_ms"])
    liger = "linear_cross_entropy, default shape, forward+backward: faster than Liger-Kernel's fused linear cross-entropy (where present)"
    assert status(liger) == "not measured: Liger-Kernel is not here"
    for direction, word in (("fwd", "forward"), ("fwdbwd", "forward+backward")):
        large = records[f"rms_norm-large-{direction}-fastcenter"]
        assert status(f"rms_norm, large shape, {word}: >= 85% of measured copy bandwidth") == met(
            large["gbps"] / peaks["copy_gbps"] >= 0.85
        )
        ours, rival = (records[f"rms_norm-default-{direction}-{v}"] for v in ("fastcenter", "compile"))
        assert status(f"rms_norm, default shape, {word}: no slower than torch.compile") == met(
            rival["median_ms"] >= ours["median_ms"]
        )
    assert status("rope, large shape, forward: >= 85% of measured copy bandwidth") == "not yet measured"
    assert report.main(["--results-dir", str(results_dir), "--markdown", str(md_path)]) == 0
    assert md_path.read_text() == md  # regenerating rewrites the same markdown (no timestamps of its own)


def test_a_gpu_run_filed_beside_the_cpu_and_compile_results_keeps_every_section(tmp_path):
    """After a real GPU run is filed, BENCHMARKS.md still shows the CPU comparison and the compile check (the test
    of the committed file would otherwise turn red with the first GPU results)."""
    results_dir = tmp_path / "results"
    shutil.copytree(report.RESULTS_DIR, results_dir, ignore=shutil.ignore_patterns("centering"))
    before = report.expected_markdown(results_dir)
    _, run, _ = _synthetic_run()
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert (
        report.main([str(tmp_path / "run.json"), "--results-dir", str(results_dir), "--markdown", str(tmp_path / "md")])
        == 0
    )
    after = (tmp_path / "md").read_text()
    sections = lambda md: [line for line in md.splitlines() if line.startswith("## ")]  # noqa: E731
    assert set(sections(before)) < set(sections(after)) and {"## Run", "## Kernels", "## Training step"} <= set(
        sections(after)
    )
    for title in ("## On a CPU", "## Compile check"):  # the same text as before the GPU run
        assert before.split(title)[1].split("\n## ")[0] == after.split(title)[1].split("\n## ")[0]
    # ... and not empty: a row per committed compile-check file
    compile_files = sorted((results_dir / "compile").glob("triton-*.json"))
    assert compile_files
    for path in compile_files:
        version = json.loads(path.read_text())["versions"]["triton"]
        assert f"| {version} | sm_80, sm_86, sm_89, sm_90 |" in after.split("## Compile check")[1]


def test_report_merges_runs_and_keeps_runs_apart(tmp_path):
    records, run, peaks = _synthetic_run()
    ids = sorted(records)
    first = _benchmark_json([records[i] for i in ids[:4]], peaks=peaks, when="2026-11-21T09:00:00+00:00")
    second = _benchmark_json(
        [records[i] for i in ids[4:]],
        [{"id": ids[5], "nodeid": "z", "reason": "compile failed"}],
        peaks=peaks,
        when="2026-11-21T09:20:00+00:00",
    )
    merged = report.build_results([("a", first), ("b", second)])
    assert {r["case"] for r in merged["cases"]} == set(records) and merged["skipped"] == []
    assert merged["datetime"] == "2026-11-21T09:20:00+00:00"
    path = report.write_results(merged, tmp_path)
    assert report.write_results(merged, tmp_path) == path  # the same run again: the same file
    assert (
        report.write_results({**merged, "datetime": "2026-11-21T23:00:00+00:00"}, tmp_path).name
        == path.stem + "-2.json"
    )
    with pytest.raises(report.ReportError, match="different devices"):
        report.build_results([("a", first), ("c", _benchmark_json([records[ids[0]]], device="NVIDIA H200"))])


def test_report_errors_are_clear(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing.json"), "--results-dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty.json").write_text(json.dumps({"benchmarks": [], "datetime": "2026-01-01T00:00:00"}))
    assert report.main([str(tmp_path / "empty.json"), "--results-dir", str(tmp_path)]) == 2
    assert "no fastcenter benchmark cases" in capsys.readouterr().err


def test_markdown_without_results_claims_nothing():
    md = report.render_markdown([])
    assert "Nothing has been measured on a GPU yet" in md and "No CPU comparison has been recorded yet" in md
    targets = md.split("## Targets")[1].split("\n## ")[0]
    rows = [line for line in targets.splitlines() if line.startswith("| ") and not line.startswith("| target")]
    assert len(rows) == len(report.TARGETS) and all(r.endswith("| - | not yet measured |") for r in rows)
    assert "pytest bench/ --benchmark-only" in md and "python -m bench.report" in md


def test_benchmarks_md_is_what_the_generator_writes():
    assert (ROOT / "BENCHMARKS.md").read_text() == report.expected_markdown(), "regenerate: python -m bench.report"


def test_dry_run_goes_through_the_gpu_code_paths_and_the_report_refuses_it(tmp_path):
    """FASTCENTER_BENCH_DRY_RUN=1 runs the GPU suite's own code (timer, records, pytest-benchmark, the session's
    JSON and partial file) on the CPU at tiny shapes: what a first GPU session would otherwise find."""
    pytest.importorskip("pytest_benchmark")
    out, partial = tmp_path / "dry.json", tmp_path / "partial.json"
    env = {
        **os.environ,
        "FASTCENTER_BENCH_DRY_RUN": "1",
        "TRITON_INTERPRET": "0",
        "CUDA_VISIBLE_DEVICES": "",
        "FASTCENTER_BENCH_PARTIAL": str(partial),
    }
    selection = "train_step-default-step-fused and not compile or linear_cross_entropy-default-fwdbwd"
    result = _pytest(["bench/", "--benchmark-only", "-rs", "-k", selection, f"--benchmark-json={out}"], env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    section = data["fastcenter"]
    assert section["environment"]["device"]["name"] == "cpu (dry run)" and section["peaks"] is None
    records = {b["extra_info"]["case"]: b["extra_info"] for b in data["benchmarks"]}
    skipped = {s["id"]: s["reason"] for s in section["skipped"]}
    lce = {f"linear_cross_entropy-default-fwdbwd-{v}" for v in OP_SPECS["linear_cross_entropy"].variant_names}
    assert set(records) | set(skipped) == lce | {"train_step-default-step-fused"} and section["failed"] == []
    assert {"train_step-default-step-fused", "linear_cross_entropy-default-fwdbwd-compile"} <= set(records)
    fused = records["linear_cross_entropy-default-fwdbwd-fastcenter"]
    dims = cases.DRY_RUN_DIMS["linear_cross_entropy"]
    assert fused["dims"] == dims and fused["bytes"] == cases.linear_cross_entropy_bytes(dims, 2, "fwdbwd")
    assert fused["rel_err_vs_eager"] <= 5e-2 and fused["dry_run"] is True and len(fused["times_ms"]) == fused["reps"]
    timed = {b["extra_info"]["case"]: b["stats"] for b in data["benchmarks"]}  # pytest-benchmark's rounds = ours
    assert all(timed[c]["median"] * 1e3 == pytest.approx(r["median_ms"]) for c, r in records.items())
    assert {b["extra_info"]["case"] for b in json.loads(partial.read_text())["benchmarks"]} == set(records)
    with pytest.raises(report.ReportError, match="dry run"):
        report.build_results([(str(out), data)])
    md = report.render_markdown(
        [("dry.json", report.build_results([(str(partial), json.loads(partial.read_text()))], dry_run_ok=True))]
    )
    step = records["train_step-default-step-fused"]
    assert _row(md, "fused")[2] == f"{step['tokens_per_s']:,.0f}"
    _row(md, "default: N=5 x D=16 x V=37", "forward+backward", "compile")


def _cpu_run(side, round_, tokens_per_sec, peak, other=0.3, steps=4):
    """One run as compare_plain.run_one records it: per-step rows whose median after step 1 is tokens_per_sec."""
    rows = [{"step": 1, "tokens_per_sec": tokens_per_sec / 3}]
    rows += [{"step": s, "tokens_per_sec": tokens_per_sec * f} for s, f in zip(range(2, steps + 1), (0.9, 1.0, 1.2))]
    return {
        "side": side,
        "round": round_,
        "returncode": 0,
        "rows": rows,
        "tokens_per_sec": tokens_per_sec,
        "peak_rss_bytes": peak,
        "wall_s": 60.0,
        "cpu_user_s": 100.0,
        "cpu_sys_s": 5.0,
        "noise": {
            "loadavg_before": 1.0 + round_,
            "loadavg_after": 2.0 + round_,
            "other_busy_fraction": other,
            "steal_fraction": 0.0,
        },
    }


def _cpu_results(runs, shape="default"):
    env = {
        "cpu": "Test CPU @ 1 GHz",
        "cpu_count": 2,
        "cpus_available": 2,
        "memory_bytes": 8e9,
        "platform": "linux",
        "python": "3.11",
        "torch": "2.13.0",
        "torch_cpu_capability": "AVX512",
    }
    return {
        "schema": compare_plain.SCHEMA,
        "datetime": "2026-12-03T10:00:00+00:00",
        "date": "2026-12-03",
        "machine": compare_plain.machine_record(env, 2),
        "git": {"commit": "abc123", "source_sha256": "0123"},
        "settings": {**vars(compare_plain.settings_for(shape, rounds=len(runs) // 2)), "threads": 2},
        "labels": compare_plain.LABELS,
        "runs": runs,
        "summary": compare_plain.summarize(runs),
    }


def test_cpu_summary_pairs_runs_by_round_and_evaluates_the_targets():
    fast, slow = [uniform(500, 700) for _ in range(3)], [uniform(250, 450) for _ in range(3)]
    rss, others = [randint(1500, 2900) * 10**6 for _ in range(3)], [uniform(0, 0.9) for _ in range(6)]
    runs = [
        r
        for n in range(3)
        for r in (
            _cpu_run("fastcenter", n, fast[n], rss[n], others[2 * n]),
            _cpu_run("plain", n, slow[n], 7e9, others[2 * n + 1]),
        )
    ]
    s = compare_plain.summarize(runs)
    assert s["fastcenter"]["tokens_per_sec"]["median"] == pytest.approx(np.median(fast))
    assert s["plain"]["peak_rss_bytes"]["max"] == 7e9 and s["fastcenter"]["peak_rss_bytes"]["max"] == max(rss)
    ratios = [f / p for f, p in zip(fast, slow)]  # paired by round, not a ratio of medians
    assert s["speedup"]["median"] == pytest.approx(np.median(ratios)) and s["speedup"]["min"] == pytest.approx(
        min(ratios)
    )
    assert s["noise"]["other_busy_fraction"]["max"] == pytest.approx(max(others))
    assert s["targets"]["peak_rss"]["met"] and s["targets"]["speedup"]["met"] == (np.median(ratios) >= 1.1)
    runs[0] = {**_cpu_run("fastcenter", 0, 100.0, 4e9), "returncode": -9, "tokens_per_sec": None, "error": "killed"}
    s = compare_plain.summarize(runs)  # a failure is counted, not averaged
    assert s["fastcenter"]["failed"] == 1 and s["fastcenter"]["tokens_per_sec"]["n"] == 2 and s["speedup"]["n"] == 2
    assert compare_plain.summarize([_cpu_run("fastcenter", 0, 100.0, 4e9), _cpu_run("plain", 0, 200.0, 7e9)])[
        "targets"
    ] == {
        "peak_rss": {"target_bytes": 3e9, "measured_bytes": 4e9, "met": False},
        "speedup": {"target": 1.1, "measured": 0.5, "met": False},
    }


def test_cpu_comparison_commands_and_command_line(tmp_path, monkeypatch, capsys):
    argv, metrics = compare_plain.commands(compare_plain.settings_for(), tmp_path / "data", tmp_path / "out")[
        "fastcenter"
    ]
    flags = "--fused --device cpu --batch-size 16 --grad-accum-steps 1 --seq-len 512 --max-iters 4 --eval-interval 4"
    flags += " --eval-iters 1 --log-interval 1"
    data, out = str(tmp_path / "data"), str(tmp_path / "out" / "fastcenter")
    assert argv[1:] == ["train.py", *flags.split(), "--data", data, "--out-dir", out]
    assert metrics == tmp_path / "out" / "fastcenter" / "metrics.jsonl"
    tiny, _ = compare_plain.commands(compare_plain.settings_for("tiny"), tmp_path, tmp_path)["fastcenter"]
    assert "--dim=32" in tiny and not any(a.startswith("--dim") for a in argv)  # model flags only where not default
    plain, _ = compare_plain.commands(compare_plain.settings_for(), tmp_path, tmp_path)["plain"]
    assert plain[1:3] == ["-m", "bench.plain_gpt"] and plain[plain.index("--vocab-size") + 1] == str(GPT2_VOCAB_SIZE)
    with pytest.raises(ValueError, match="steps >= 2"):
        compare_plain.settings_for(steps=1)
    runs = [_cpu_run("fastcenter", 0, 600.0, 2e9), _cpu_run("plain", 0, 300.0, 7e9)]
    seen = {}
    monkeypatch.setattr(
        compare_plain, "compare", lambda s, work_dir=None, say=print: seen.update(s=s) or _cpu_results(runs)
    )
    out = tmp_path / "cpu.json"
    assert compare_plain.main(["--rounds", "1", "--steps", "3", "--threads", "1", "--out", str(out)]) == 0
    assert (seen["s"].rounds, seen["s"].steps, seen["s"].n_threads) == (1, 3, 1)
    assert json.loads(out.read_text())["summary"] == compare_plain.summarize(runs)
    printed = capsys.readouterr().out
    assert "2.00x (median of 1 rounds" in printed and "| 2,000 MB (largest run) | met |" in printed
    assert "BENCHMARKS.md" not in printed  # filed elsewhere than bench/results/: the markdown stays
    assert compare_plain.default_path(_cpu_results(runs), tmp_path).name == "cpu-test-cpu-1-ghz-2026-12-03.json"


def test_report_cpu_section_shows_the_newest_comparison():
    runs = [
        r
        for n in range(3)
        for r in (_cpu_run("fastcenter", n, 600.0 + n, 1.8e9, 0.4), _cpu_run("plain", n, 300.0, 6.9e9, 0.6))
    ]
    md = report.render_markdown([], [("cpu-old.json", _cpu_results(runs[:2])), ("cpu-new.json", _cpu_results(runs))])
    section = md.split("## On a CPU")[1].split("\n## ")[0]
    assert (
        "`bench/results/cpu-new.json`" in section and "Earlier CPU comparisons: `bench/results/cpu-old.json`" in section
    )
    assert _row(section, compare_plain.LABELS["fastcenter"])[1:] == ["601 [600 - 602]", "1,800 [1,800 - 1,800]", "3"]
    assert _row(section, compare_plain.LABELS["plain"])[1:] == ["300 [300 - 300]", "6,900 [6,900 - 6,900]", "3"]
    assert _row(section, report.CPU_TARGETS["peak_rss"]["text"])[1:] == ["1,800 MB (largest run)", "met"]
    assert _row(section, report.CPU_TARGETS["speedup"]["text"])[1:] == [
        "2.00x (median of 3 rounds; 2.00x-2.01x)",
        "met",
    ]
    assert "Other processes used 50%" in section
