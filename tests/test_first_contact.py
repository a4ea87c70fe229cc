"""`python -m bench.first_contact --dry-run`: the GPU first-contact script, run through on the CPU.

The script's every phase (kernel tests, op benchmarks, token files, train.py runs, the results file and
BENCHMARKS.md) runs here at tiny sizes, so the first GPU session finds no plumbing bug. The dry run must write
into its own folder only. Its pure helpers (pytest output, metrics.jsonl, the markdown) are checked directly.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from bench import first_contact

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_dry_run_runs_every_phase_into_its_own_folder(tmp_path):
    pytest.importorskip("pytest_benchmark")
    tracked = {p: p.read_bytes() for p in (REPO / "BENCHMARKS.md",) if p.exists()}
    results_before = sorted((REPO / "bench" / "results").glob("*.json"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "fc"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.first_contact", "--dry-run", "--out", str(out), "--budget-s", "300"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    fc = json.loads((out / "first_contact.json").read_text())
    assert fc["dry_run"] is True and fc["wall_s"] <= 300
    tests = fc["kernel_tests"]
    assert tests["ok"] and tests["failed"] == 0 and tests["bf16_passed"] >= 1, tests
    assert fc["op_benchmarks"]["ok"] and pathlib.Path(fc["op_benchmarks"]["json"]).is_file()
    assert [r["variant"] for r in fc["train"]] == ["fused", "eager"]  # no torch.compile run on the CPU
    for run in fc["train"]:
        assert run["ok"] and run["tokens_per_sec"] > 0 and run["peak_mem_mb"] > 0, run

    results_file = next((out / "results").glob("*.json"))
    results = json.loads(results_file.read_text())
    assert results["first_contact"]["train"][0]["variant"] == "fused"
    assert any(case["op"] == "swiglu" for case in results["cases"])
    markdown = (out / "BENCHMARKS.md").read_text()
    assert first_contact.SECTION_TITLE in markdown and "Dry run on the CPU" in markdown
    # Nothing of the repository's was touched.
    assert {p: p.read_bytes() for p in tracked} == tracked
    assert sorted((REPO / "bench" / "results").glob("*.json")) == results_before


def test_without_a_gpu_the_real_run_refuses(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "FASTCENTER_BENCH_DRY_RUN": "0"}
    proc = subprocess.run([sys.executable, "-m", "bench.first_contact", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "--dry-run" in proc.stderr


def test_a_phase_past_its_time_is_cut_off(tmp_path):
    started = time.monotonic()
    result = first_contact.run([sys.executable, "-c", "import time; time.sleep(60)"], 1.0, tmp_path / "log")
    assert result["timed_out"] and result["rc"] != 0 and time.monotonic() - started < 30


def test_pytest_output_is_counted_even_when_cut_off():
    text = "\n".join([
        "tests/test_norm.py::test_a[torch.bfloat16] PASSED [  1%]",
        "tests/test_norm.py::test_a[torch.float32] PASSED [  2%]",
        "tests/test_norm.py::test_b[torch.bfloat16] FAILED [  3%]",
        "tests/test_default_shapes.py::test_swiglu_packed[default] SKIPPED (real shapes need a GPU) [  4%]",
        "tests/test_default_shapes.py::test_rope_default_views_of_packed_qkv[half_split] PASSED [  5%]",
        "tests/test_norm.py::test_c[torch.bfloat16] ",  # the run was killed here
    ])  # fmt: skip
    counts = first_contact.parse_pytest_verbose(text)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (3, 1, 1)
    assert counts["bf16_passed"] == 2 and counts["failures"] == ["tests/test_norm.py::test_b[torch.bfloat16]"]


def test_metrics_summary_leaves_out_the_warm_up_steps(tmp_path):
    rows = [
        {"step": 1, "loss": 10.9, "tokens_per_sec": 1e3, "mfu": 0.01, "peak_mem_mb": 900.0},
        {"step": 5, "loss": 9.0, "tokens_per_sec": 2e6, "mfu": 0.20, "peak_mem_mb": 950.0},
        {"step": 10, "loss": 8.0, "tokens_per_sec": 3e6, "mfu": 0.30, "peak_mem_mb": 940.0},
        {"step": 15, "loss": 7.5, "tokens_per_sec": 4e6, "mfu": 0.40, "peak_mem_mb": 940.0, "val_loss": 7.9},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = first_contact.summarise_metrics(path, skip_first=2)
    assert summary["timed_steps"] == [10, 15]
    assert summary["tokens_per_sec"] == 3.5e6 and summary["mfu"] == pytest.approx(0.35)
    assert summary["peak_mem_mb"] == 950.0 and summary["last_loss"] == 7.5 and summary["val_loss"] == 7.9
    assert first_contact.summarise_metrics(tmp_path / "missing.jsonl", skip_first=2)["tokens_per_sec"] is None


def test_markdown_section_compares_fused_with_compiled_eager():
    run = dict(flags=[], wall_s=30.0, ok=True, max_iters=40, timed_steps=[10, 15], mfu=0.3, peak_mem_mb=900.0,
               last_loss=7.0)  # fmt: skip
    fc = {"dry_run": False, "data": {"source": "text"}, "train": [
        {**run, "variant": "fused", "tokens_per_sec": 3.0e6},
        {**run, "variant": "eager_compile", "tokens_per_sec": 2.0e6},
    ]}  # fmt: skip
    text = "\n".join(first_contact.markdown_section({"first_contact": fc}))
    assert "1.50x" in text and "3,000,000" in text and "30.0%" in text and "Dry run" not in text


def test_phase_budgets_fit_ten_minutes():
    assert sum(first_contact.BUDGETS.values()) <= 570
    assert first_contact.after("kernel_tests") == sum(first_contact.BUDGETS.values()) - first_contact.BUDGETS[
        "kernel_tests"] and first_contact.after("report") == 0  # fmt: skip
    clock = first_contact.Clock(budget_s=sum(first_contact.BUDGETS.values()))
    assert clock.allow(80.0, reserve=50.0) == pytest.approx(80.0, abs=1.0) and clock.allow(10.0) <= 10.0
    small = first_contact.Clock(budget_s=sum(first_contact.BUDGETS.values()) / 2)  # budgets shrink in proportion
    assert small.allow(80.0, reserve=50.0) == pytest.approx(40.0, abs=1.0)
