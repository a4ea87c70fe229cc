"""`python -m bench.first_contact --dry-run`: the GPU lease's one command, run through on the CPU.

Every phase (tests, the loss and op benchmarks, train.py runs, the files) runs here at tiny sizes, so the first GPU
session finds no plumbing bug, and the folder it leaves must be one a GPU lease brings back whole. Its pure helpers
(pytest output, metrics, the deadline, the bundle check) are checked directly.
"""

import json
import os
import pathlib
import sys
import tarfile
import time

import pytest
import torch

from bench import compare_plain, first_contact, report

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_dry_run_runs_every_phase_into_a_folder_that_comes_back(tmp_path, capsys):
    """The command itself runs in this process (its phases are child processes, with the interpreter setting
    they need whatever this process has)."""
    pytest.importorskip("pytest_benchmark")
    tracked = {p: p.read_bytes() for p in (REPO / "BENCHMARKS.md",) if p.exists()}
    results_before = sorted((REPO / "bench" / "results").rglob("*.json"))
    out = tmp_path / "fc"
    rc = first_contact.main(["--dry-run", "--out", str(out), "--budget-s", "400"])
    printed = capsys.readouterr()
    assert rc == 0, printed.out[-3000:] + printed.err[-3000:]

    assert first_contact.bundle_problems(out) == []
    names = ["bench-loss.json", "bench-ops.json", "logs.tar.gz", "measured.json", "results.json", "summary.md"]
    assert sorted(p.name for p in out.iterdir()) == names
    results = json.loads((out / "results.json").read_text())
    fc = results["first_contact"]
    assert fc["dry_run"] is True and fc["wall_s"] <= 400 and results["environment"]["git"]["commit"]
    phases = {p["name"]: p for p in fc["phases"]}
    assert list(phases) == list(first_contact.PHASES) and all(p["ok"] for p in phases.values()), phases
    assert phases["correctness"]["bf16_passed"] >= 1 and phases["correctness"]["failed"] == 0
    assert phases["loss"]["measured"] == 2 and phases["ops"]["measured"] == 1 and phases["tests"]["passed"] >= 1
    assert [r["variant"] for r in fc["train"]] == ["fused", "eager"]  # no torch.compile run on the CPU
    for run in fc["train"]:
        assert run["ok"] and run["stopped"] and run["tokens_per_sec"] > 0 and run["rows"], run
        assert run["peak_mem_gb"] == pytest.approx(run["peak_mem_mb"] * 2**20 / 1e9)
    assert {c["case"] for c in results["cases"]} == {
        "linear_cross_entropy-default-fwdbwd-fastcenter",
        "linear_cross_entropy-default-fwdbwd-eager",
        "swiglu-default-fwd-fastcenter",
    }
    assert all(c["times_ms"] for c in results["cases"])
    measured = json.loads((out / "measured.json").read_text())  # what bench.step_cost --measured reads
    assert measured["fused"]["tokens_per_sec"] == fc["train"][0]["tokens_per_sec"] and measured["device"]
    assert measured["eager"]["optimizer_step_ms"] == pytest.approx(1e3 * 2 * 16 / fc["train"][1]["tokens_per_sec"])
    summary = (out / "summary.md").read_text()
    assert "## First contact" in summary and "Dry run on the CPU" in summary and "## Targets" in summary
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {"correctness.log", "loss.log", "train-fused.log", "ops.log", "tests.log"} <= set(tar.getnames())
    assert report.main([str(out / "results.json"), "--results-dir", str(tmp_path / "r")]) == 2  # a dry run is no result
    assert {p: p.read_bytes() for p in tracked} == tracked  # nothing of the repository's was touched
    assert sorted((REPO / "bench" / "results").rglob("*.json")) == results_before


def test_the_gpu_selections_select_tests_that_exist():
    """Phases 1 and 5 name test files and -k expressions: they must collect what they mean to run (collected in
    this process)."""

    class Collected:
        def pytest_collection_finish(self, session):
            self.ids = [item.nodeid for item in session.items]

    for phase in ("correctness", "tests"):
        found = Collected()
        args = [
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            *first_contact.selections(False)[phase],
        ]
        assert pytest.main(args, plugins=[found]) == 0 and found.ids, phase
        if phase == "correctness":
            assert any("bf16_autocast" in node for node in found.ids)
            assert any(node.startswith(first_contact.shapes_test_file()) for node in found.ids)


def test_refused_without_a_gpu_or_into_a_full_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert first_contact.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--dry-run" in err and len(err.splitlines()) == 1
    (tmp_path / "old.txt").write_text("x")
    assert first_contact.main(["--out", str(tmp_path), "--dry-run"]) == 2
    assert "must be a new or empty folder" in capsys.readouterr().err


def test_a_phase_past_its_time_is_cut_off_and_a_stopped_one_ends(tmp_path):
    """bench.compare_plain.run, which runs every phase: the deadline ends the command and what it started."""
    started, log = time.monotonic(), tmp_path / "log"
    script = "import subprocess, time; print(subprocess.Popen(['sleep', '60']).pid, flush=True); time.sleep(60)"
    result = compare_plain.run([sys.executable, "-c", script], 1.0, log, dict(os.environ))
    assert result["timed_out"] and result["rc"] != 0 and time.monotonic() - started < 30
    grandchild = pathlib.Path("/proc", log.read_text().splitlines()[1])  # in the command's process group
    while grandchild.exists() and grandchild.joinpath("stat").read_text().split()[2] != "Z":
        assert time.monotonic() - started < 30, "the command's own child outlived its deadline"
        time.sleep(0.1)
    result = compare_plain.run([sys.executable, "-c", script], 30.0, log, dict(os.environ), stop_when=lambda: True)
    assert result["stopped"] and not result["timed_out"] and result["wall_s"] < 20 and result["peak_rss_bytes"] > 0


def test_pytest_output_is_counted_with_or_without_xdist_even_when_cut_off():
    text = "\n".join(
        [
            "tests/test_norm.py::test_a[torch.bfloat16] PASSED [  1%]",
            "[gw3] [  2%] PASSED tests/test_norm.py::test_a[torch.float32] ",
            "[gw0] [  3%] FAILED tests/test_norm.py::test_b[torch.bfloat16] ",
            "tests/test_default_shapes.py::test_swiglu_packed[x] SKIPPED (real shapes need a GPU) [  4%]",
            "tests/test_norm.py::test_c[bf16] PASSED [  5%]",
            "tests/test_norm.py::test_d[torch.bfloat16] ",  # the run was killed here
        ]
    )
    counts = first_contact.parse_pytest_verbose(text)
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["bf16_passed"]) == (3, 1, 1, 2)
    assert counts["failures"] == ["tests/test_norm.py::test_b[torch.bfloat16]"]


def test_metrics_summary_leaves_out_the_warm_up_steps_and_reports_gb():
    rows = [
        {"step": 1, "loss": 10.9, "tokens_per_sec": 1e3, "mfu": 0.01, "peak_mem_mb": 900.0},
        {"step": 20, "loss": 9.0, "tokens_per_sec": 2e6, "mfu": 0.20, "peak_mem_mb": 950.0},
        {"step": 40, "loss": 8.0, "tokens_per_sec": 3e6, "mfu": 0.30, "peak_mem_mb": 940.0},
        {"step": 60, "loss": 7.5, "tokens_per_sec": 4e6, "mfu": 0.40, "peak_mem_mb": 940.0},
    ]
    summary = first_contact.summarise_metrics(rows, skip_first=2)
    assert summary["timed_steps"] == [40, 60] and summary["tokens_per_sec"] == 3.5e6
    assert summary["mfu"] == pytest.approx(0.35) and summary["last_loss"] == 7.5
    assert summary["peak_mem_mb"] == 950.0 and summary["peak_mem_gb"] == pytest.approx(950 * 2**20 / 1e9)
    assert first_contact.summarise_metrics([], skip_first=2)["tokens_per_sec"] is None


def test_the_phases_fit_the_budget():
    deadline = first_contact.Deadline(480.0)
    shares = {name: deadline.allow(name) for name in first_contact.PHASES}
    assert sum(shares[n] for n in list(shares)[:-1]) < 480 - 10 and shares["tests"] > 0
    assert all(s > 0 for s in shares.values())
    deadline.started -= 470  # late: every phase gets what is left, never more
    assert all(deadline.allow(name) == 0 for name in first_contact.PHASES)


def test_bundle_limits(tmp_path):
    (tmp_path / "ok.json").write_text("{}")
    assert first_contact.bundle_problems(tmp_path) == []
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")
    (tmp_path / "bad name.txt").write_text("x")
    for i in range(7):
        (tmp_path / f"f{i}").write_text("x")
    problems = " ".join(first_contact.bundle_problems(tmp_path))
    assert "10 files" in problems and "deep.txt" in problems and "bad name.txt" in problems
