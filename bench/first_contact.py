"""A GPU's first contact: one command, under 10 minutes, that says whether the kernels work and what they are worth.

    python -m bench.first_contact                 # on a machine with an NVIDIA GPU, from the repository root
    python -m bench.first_contact --dry-run       # the same code on the CPU at tiny sizes (what CI runs)

Phases, each under its own time budget (the whole run cannot pass --budget-s, default 570 s):

1. kernel tests, compiled: the kernel test files (tests/test_default_shapes, norm, rope, swiglu, cross_entropy,
   autograd, layouts) on the GPU, where their bf16 cases run compiled and test_default_shapes.py runs every op at
   its real shapes in bf16 (it is skipped on the CPU). Counts of passed / failed / skipped, and of bf16 cases
   passed (the count is read line by line, so a run cut off by its budget still reports what it did);
2. op benchmarks: `pytest bench/test_ops.py --benchmark-only` (fastcenter vs eager, torch.compile, F.rms_norm,
   F.linear_cross_entropy, Liger where installed), seed shapes first, with the suite's own time budget;
3. train.py at the seed config, driven through its command line on fixed token files: --fused, --no-fused
   (eager) and --no-fused --compile (eager under torch.compile), a few dozen steps each; tokens/s, MFU and peak
   memory from each run's metrics.jsonl (the first logged steps, which include compilation, are left out);
4. report: bench/results/<device>-<date>.json (bench.report's results file, plus a "first_contact" section with
   phases 1 and 3) and BENCHMARKS.md regenerated.

Every phase runs as a subprocess under a timeout, so one that hangs or runs long is cut off and recorded as such,
and the later phases still get their time. The token files are prepared from text (Python standard library
sources, GPT-2 BPE) when tiktoken's encoding is available, else drawn at random with a fixed seed (throughput
does not depend on the text; the results file says which). The dry run (--dry-run, or FASTCENTER_BENCH_DRY_RUN=1)
runs every phase on the CPU at tiny sizes into --out only: it never touches bench/results or BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# In this order: a run cut off by its budget has done the most telling files (real shapes first; the layout
# enumeration, hundreds of small cases that each compile their own stride specialisation, last).
KERNEL_TEST_FILES = [
    "tests/test_default_shapes.py",
    "tests/test_norm.py",
    "tests/test_rope.py",
    "tests/test_swiglu.py",
    "tests/test_cross_entropy.py",
    "tests/test_autograd.py",
    "tests/test_layouts.py",
]
# torch.compile with inductor costs up to a minute a case on the GPU: of those, only the one that compiles
# every op together (tests/test_autograd.py) runs here.
GPU_TEST_SELECTION = "not compile or every_op"
# The dry run: two bf16 cases and the (skipped) default-shape file, enough to exercise the plumbing.
DRY_TEST_FILES = ["tests/test_swiglu.py", "tests/test_default_shapes.py"]
DRY_TEST_SELECTION = "swiglu_matches_float64 and bfloat16 and 2x5x40 or default_views"

SEED_TRAIN_FLAGS = ["--batch-size", "16", "--grad-accum-steps", "4", "--seq-len", "512"]
DRY_TRAIN_FLAGS = [
    "--batch-size", "2", "--grad-accum-steps", "1", "--seq-len", "16", "--dim", "32", "--n-layers", "1",
    "--n-heads", "2", "--vocab-size", "512", "--max-seq-len", "16",
]  # fmt: skip
TRAIN_VARIANTS = {  # name -> train.py flags
    "fused": ["--fused"],
    "eager": ["--no-fused"],
    "eager_compile": ["--no-fused", "--compile"],
}

# Seconds per phase, in the order they run (a phase never gets more than what is left of the whole budget once
# the budgets of the phases after it are set aside).
BUDGETS = {"kernel_tests": 120.0, "op_benchmarks": 200.0, "data": 20.0, "train": 200.0, "report": 15.0}


def after(phase: str) -> float:
    """The budgets of the phases that run after `phase`: what it must leave for them."""
    names = list(BUDGETS)
    return sum(BUDGETS[p] for p in names[names.index(phase) + 1 :])


def dry_run_requested() -> bool:
    return os.environ.get("FASTCENTER_BENCH_DRY_RUN", "0") == "1"


# ---------------------------------------------------------------------------------------------------------
# Running a phase: a subprocess with a deadline.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Clock:
    """The whole run's deadline."""

    budget_s: float
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def allow(self, phase_budget: float, reserve: float = 0.0) -> float:
        """Seconds a phase may take: its budget, but never eating into `reserve` kept for the phases after it.
        Budgets (BUDGETS) shrink in proportion when the whole run is given less than their sum."""
        scale = min(1.0, self.budget_s / sum(BUDGETS.values()))
        return max(0.0, min(phase_budget * scale, self.left() - reserve * scale))


def run(cmd: list[str], timeout: float, log_path: pathlib.Path, env: dict | None = None) -> dict:
    """Run `cmd` from the repository root with output to `log_path`; {rc, wall_s, timed_out, log}."""
    started = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        # Its own process group: a timeout ends the phase's command and whatever it started (compile workers).
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=max(timeout, 1.0))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this command leads, by its id
            rc = proc.wait()
            timed_out = True
    return {"rc": rc, "wall_s": round(time.monotonic() - started, 1), "timed_out": timed_out, "log": str(log_path)}


def _env(dry: bool, *, interpret: bool = False, **extra) -> dict:
    """The environment of a phase. Only the dry run's kernel tests are interpreted (tests/conftest.py turns the
    interpreter on where there is no GPU, when TRITON_INTERPRET is unset); everything else compiles the kernels
    on a GPU, or takes the CPU implementation in a dry run."""
    env = {**os.environ, **extra}
    env.pop("TRITON_INTERPRET", None)
    if not interpret:
        env["TRITON_INTERPRET"] = "0"
    if dry:
        env.update(FASTCENTER_BENCH_DRY_RUN="1", CUDA_VISIBLE_DEVICES="")
    return env


# ---------------------------------------------------------------------------------------------------------
# Phase 1: kernel tests.
# ---------------------------------------------------------------------------------------------------------

_RESULT_LINE = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")


def parse_pytest_verbose(text: str) -> dict:
    """Counts from `pytest -v` lines (read line by line, so a run cut off by its timeout still counts)."""
    outcomes: dict[str, str] = {}
    for line in text.splitlines():
        match = _RESULT_LINE.match(line.strip())
        if match:
            outcomes[match.group(1)] = match.group(2)
    counts = {k.lower(): sum(1 for v in outcomes.values() if v == k) for k in ("PASSED", "FAILED", "SKIPPED", "ERROR")}
    bf16 = [t for t in outcomes if "bfloat16" in t or "bf16" in t or "test_default_shapes" in t]
    counts["bf16_passed"] = sum(1 for t in bf16 if outcomes[t] == "PASSED")
    counts["failures"] = sorted(t for t, v in outcomes.items() if v in ("FAILED", "ERROR"))[:50]
    return counts


def kernel_tests(out: pathlib.Path, clock: Clock, dry: bool) -> dict:
    files, selection = (DRY_TEST_FILES, DRY_TEST_SELECTION) if dry else (KERNEL_TEST_FILES, GPU_TEST_SELECTION)
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-o", "addopts=", "-rs", "-k", selection,
           *files]  # fmt: skip
    timeout = clock.allow(BUDGETS["kernel_tests"], reserve=after("kernel_tests"))
    result = run(cmd, timeout, out / "kernel_tests.log", _env(dry, interpret=True))
    result.update(parse_pytest_verbose(pathlib.Path(result["log"]).read_text()))
    result["ok"] = result["rc"] == 0 and not result["timed_out"]
    return result


# ---------------------------------------------------------------------------------------------------------
# Phase 2: op benchmarks.
# ---------------------------------------------------------------------------------------------------------


def op_benchmarks(out: pathlib.Path, clock: Clock, dry: bool) -> dict:
    bench_json = out / "op_benchmarks.json"
    timeout = clock.allow(BUDGETS["op_benchmarks"], reserve=after("op_benchmarks"))
    selection = ["-k", "swiglu-seed-fwdbwd-fastcenter or swiglu-seed-fwdbwd-eager"] if dry else []
    cmd = [sys.executable, "-m", "pytest", "bench/test_ops.py", "--benchmark-only", "-p", "no:cacheprovider", "-rs",
           f"--benchmark-json={bench_json}", *selection]  # fmt: skip
    # The suite starts no case after its budget: leave room for the case running then (a torch.compile variant
    # compiles for up to a minute) to finish before the hard timeout, which would lose the JSON.
    env = _env(dry, FASTCENTER_BENCH_BUDGET_S=str(max(1, int(timeout - 75))))
    result = run(cmd, timeout, out / "op_benchmarks.log", env)
    result["json"] = str(bench_json) if bench_json.is_file() else None
    result["ok"] = result["json"] is not None and not result["timed_out"]
    return result


# ---------------------------------------------------------------------------------------------------------
# Phase 3: train.py.
# ---------------------------------------------------------------------------------------------------------


def prepare_data(out: pathlib.Path, clock: Clock, dry: bool) -> dict:
    """train.bin / val.bin in out/data: tokenized standard-library sources, or fixed-seed random ids."""
    data_dir = out / "data"
    if not dry:
        stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
        texts = [str(p) for p in sorted(stdlib.glob("*.py"))[:150]]  # ~5 MB of text, ~1.5 M tokens
        cmd = [sys.executable, "-m", "fastcenter.data", "prepare", "--text", *texts, "--out", str(data_dir)]
        result = run(cmd, clock.allow(BUDGETS["data"], reserve=after("data")), out / "data.log")
        if result["rc"] == 0 and (data_dir / "train.bin").is_file() and (data_dir / "val.bin").is_file():
            return {**result, "dir": str(data_dir), "source": f"{len(texts)} Python standard library files, GPT-2 BPE"}
    import numpy as np

    vocab = 512 if dry else 50257
    rng = np.random.default_rng(20240520)
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, size in (("train.bin", 1 << (14 if dry else 21)), ("val.bin", 1 << (12 if dry else 17))):
        rng.integers(0, vocab, size=size, dtype=np.int64).astype("<u2").tofile(data_dir / name)
    return {"rc": 0, "dir": str(data_dir), "source": f"random token ids (seed 20240520, vocab {vocab})"}


def summarise_metrics(path: pathlib.Path, skip_first: int) -> dict:
    """Medians of tokens/s and MFU over the logged training steps after the first `skip_first` (warm-up,
    compilation), the largest peak memory, the last loss, and the last validation loss."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    steps = [r for r in rows if r.get("tokens_per_sec") is not None]
    timed = steps[skip_first:] or steps[-1:]

    def median(key):
        values = [r[key] for r in timed if isinstance(r.get(key), (int, float))]
        return statistics.median(values) if values else None

    peaks = [r["peak_mem_mb"] for r in steps if isinstance(r.get("peak_mem_mb"), (int, float))]
    val = [r["val_loss"] for r in rows if isinstance(r.get("val_loss"), (int, float))]
    return {
        "logged_steps": [r.get("step") for r in steps],
        "timed_steps": [r.get("step") for r in timed],
        "tokens_per_sec": median("tokens_per_sec"),
        "mfu": median("mfu"),
        "peak_mem_mb": max(peaks) if peaks else None,
        "last_loss": steps[-1].get("loss") if steps else None,
        "val_loss": val[-1] if val else None,
    }


def train_runs(out: pathlib.Path, clock: Clock, dry: bool, data_dir: str) -> list[dict]:
    iters, log_interval = (3, 1) if dry else (40, 5)
    variants = [v for v in TRAIN_VARIANTS if not (dry and "compile" in v)]  # no C++ toolchain promised on CI
    runs = []
    for i, variant in enumerate(variants):
        # Split what is left of the phase among the runs still to go; the compiled run gets a double share.
        weights = [2 if "compile" in v else 1 for v in variants[i:]]
        phase_left = clock.allow(BUDGETS["train"] - sum(r["wall_s"] for r in runs), reserve=after("train"))
        timeout = phase_left * weights[0] / sum(weights)
        run_dir = out / f"train-{variant}"
        device = ["--device", "cpu", "--dtype", "float32"] if dry else ["--device", "cuda", "--dtype", "bfloat16"]
        cmd = [sys.executable, "train.py", "--data", data_dir, "--out-dir", str(run_dir), "--max-iters", str(iters),
               "--eval-interval", str(iters), "--eval-iters", "2", "--log-interval", str(log_interval),
               "--warmup-iters", "0", *device, *(DRY_TRAIN_FLAGS if dry else SEED_TRAIN_FLAGS),
               *TRAIN_VARIANTS[variant]]  # fmt: skip
        result = run(cmd, timeout, out / f"train-{variant}.log", _env(dry))
        # Logged steps: 1, then every log_interval. Leave out step 1 and the first interval (compilation).
        result.update(summarise_metrics(run_dir / "metrics.jsonl", skip_first=0 if dry else 2))
        result.update(variant=variant, flags=TRAIN_VARIANTS[variant], max_iters=iters)
        result["ok"] = result["rc"] == 0 and not result["timed_out"] and result["tokens_per_sec"] is not None
        runs.append(result)
    return runs


# ---------------------------------------------------------------------------------------------------------
# Phase 4: the results file and BENCHMARKS.md.
# ---------------------------------------------------------------------------------------------------------

SECTION_TITLE = "## First contact: kernel tests and train.py"


def markdown_section(results: dict) -> list[str]:
    """The first-contact part of BENCHMARKS.md (kernel tests, train.py runs), from a results file."""
    fc = results.get("first_contact")
    if not fc:
        return []
    lines = [SECTION_TITLE, ""]
    if fc.get("dry_run"):
        lines += ["**Dry run on the CPU** (`--dry-run`): interpreted kernels, a tiny model; it checks the script, "
                  "nothing here is a measurement.", ""]  # fmt: skip
    where = "interpreted on the CPU" if fc.get("dry_run") else "compiled on the GPU"
    config = " ".join(DRY_TRAIN_FLAGS if fc.get("dry_run") else SEED_TRAIN_FLAGS)
    tests = fc.get("kernel_tests") or {}
    if tests:
        state = "cut off by its time budget" if tests.get("timed_out") else f"exit status {tests.get('rc')}"
        lines += [f"Kernel tests {where} (`{' '.join(tests.get('files', []))}`, -k "
                  f"\"{tests.get('selection', '')}\"): {tests.get('passed', 0)} passed "
                  f"({tests.get('bf16_passed', 0)} of them bf16), {tests.get('failed', 0)} failed, "
                  f"{tests.get('skipped', 0)} skipped, in {tests.get('wall_s', '?')} s ({state}).", ""]  # fmt: skip
        lines += [f"- failed: `{name}`" for name in tests.get("failures", [])]
        lines += [""] if tests.get("failures") else []
    runs = fc.get("train") or []
    if runs:
        data = fc.get("data") or {}
        lines += [f"`train.py` ({config}{'' if fc.get('dry_run') else ', bf16 autocast'}), "
                  f"{runs[0].get('max_iters')} steps per run on {data.get('source', '?')}; tokens/s and MFU are "
                  f"medians over the logged steps {runs[0].get('timed_steps')} (compilation and warm-up left out), "
                  "peak memory is train.py's:", ""]  # fmt: skip
        header = ["run", "flags", "tokens/s", "MFU", "peak MB", "last loss", "wall s", "status"]
        rows = []
        for r in runs:
            status = "ok" if r.get("ok") else ("cut off" if r.get("timed_out") else f"exit {r.get('rc')}")
            rows.append([r["variant"], " ".join(r.get("flags", [])), _num(r.get("tokens_per_sec"), 0),
                         _pct(r.get("mfu")), _num(r.get("peak_mem_mb"), 0), _num(r.get("last_loss"), 3),
                         str(r.get("wall_s")), status])  # fmt: skip
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
        by = {r["variant"]: r for r in runs}
        fused, compiled = by.get("fused", {}).get("tokens_per_sec"), by.get("eager_compile", {}).get("tokens_per_sec")
        if fused and compiled:
            lines += [f"fused / eager under torch.compile: {fused / compiled:.2f}x (target >= 1.25x).", ""]
    return lines


def _num(x, digits) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%" if x <= 1 else f"{x:.1f}%"


def write_report(out: pathlib.Path, first_contact: dict, bench_json: str | None, dry: bool,
                 results_dir: pathlib.Path, markdown_path: pathlib.Path) -> dict:  # fmt: skip
    from bench import report
    from bench.environment import collect_environment

    results = None
    problem = None
    if bench_json:
        data = report.load_json(bench_json)
        if dry:  # the report refuses dry-run records: mark them measured, into the dry run's own folder only
            for bench in data.get("benchmarks", []):
                (bench.get("extra_info") or {})["dry_run"] = False
        try:
            results = report.build_results([(bench_json, data)])
        except report.ReportError as exc:
            problem = str(exc)
    if results is None:  # no benchmark JSON: a results file of this run's environment and first contact only
        environment = collect_environment()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        results = {
            "schema": report.RESULTS_SCHEMA, "device": environment["device"]["name"], "datetime": stamp,
            "date": stamp[:10], "environment": environment, "peaks": None, "runs": [], "cases": [],
            "skipped": [], "failed": [],
        }  # fmt: skip
    results["first_contact"] = first_contact
    if problem:
        results["first_contact"]["report_problem"] = problem
    path = report.write_results(results, results_dir)
    markdown_path.write_text(report.render_markdown(report.load_results_dir(results_dir)))
    return {"results_file": str(path), "markdown": str(markdown_path), "problem": problem}


# ---------------------------------------------------------------------------------------------------------
# The command.
# ---------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.first_contact", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny, into --out only (also: "
                        "FASTCENTER_BENCH_DRY_RUN=1)")  # fmt: skip
    parser.add_argument("--out", default=None, help="working folder for logs, data and runs (default: a temp dir)")
    parser.add_argument("--budget-s", type=float, default=570.0, help="wall-clock limit of the whole run")
    parser.add_argument("--skip", default="", help="comma list of phases to skip: tests,bench,train")
    args = parser.parse_args(argv)
    dry = args.dry_run or dry_run_requested()
    clock = Clock(args.budget_s)
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="fastcenter-first-contact-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    skip = {s for s in args.skip.split(",") if s}
    if not dry:
        import torch

        if not torch.cuda.is_available():
            print("bench.first_contact: no CUDA device here; use --dry-run to check the script on the CPU",
                  file=sys.stderr)  # fmt: skip
            return 2
    results_dir = out / "results" if dry else REPO_ROOT / "bench" / "results"
    markdown_path = out / "BENCHMARKS.md" if dry else REPO_ROOT / "BENCHMARKS.md"

    def say(text):
        print(f"[{time.monotonic() - clock.started:6.1f} s] {text}", flush=True)

    fc: dict = {"dry_run": dry, "budget_s": args.budget_s, "out": str(out)}
    if "tests" not in skip:
        say("kernel tests ...")
        fc["kernel_tests"] = kernel_tests(out, clock, dry)
        fc["kernel_tests"].update(files=DRY_TEST_FILES if dry else KERNEL_TEST_FILES,
                                  selection=DRY_TEST_SELECTION if dry else GPU_TEST_SELECTION)  # fmt: skip
        t = fc["kernel_tests"]
        say(f"kernel tests: {t['passed']} passed ({t['bf16_passed']} bf16), {t['failed']} failed, "
            f"{t['skipped']} skipped, {t['wall_s']} s{' (cut off)' if t['timed_out'] else ''}")  # fmt: skip
    bench_json = None
    if "bench" not in skip:
        say("op benchmarks ...")
        fc["op_benchmarks"] = op_benchmarks(out, clock, dry)
        bench_json = fc["op_benchmarks"]["json"]
        say(f"op benchmarks: exit {fc['op_benchmarks']['rc']}, {fc['op_benchmarks']['wall_s']} s")
    if "train" not in skip:
        say("token files ...")
        fc["data"] = prepare_data(out, clock, dry)
        say(f"token files: {fc['data']['source']}")
        fc["train"] = train_runs(out, clock, dry, fc["data"]["dir"])
        for r in fc["train"]:
            say(f"train.py {' '.join(r['flags'])}: {_num(r['tokens_per_sec'], 0)} tokens/s, MFU {_pct(r['mfu'])}, "
                f"peak {_num(r['peak_mem_mb'], 0)} MB, {r['wall_s']} s{'' if r['ok'] else ' (NOT OK)'}")  # fmt: skip
    fc["wall_s"] = round(time.monotonic() - clock.started, 1)
    written = write_report(out, fc, bench_json, dry, results_dir, markdown_path)
    say(f"wrote {written['results_file']} and {written['markdown']}")
    (out / "first_contact.json").write_text(json.dumps(fc, indent=1) + "\n")
    phases_ok = [fc[p]["ok"] for p in ("kernel_tests", "op_benchmarks") if p in fc]
    phases_ok += [r["ok"] for r in fc.get("train", [])]
    return 0 if all(phases_ok) else 1


if __name__ == "__main__":
    sys.exit(main())
