"""The first contact with a GPU: one command that fits one lease and brings everything home.

    python -m bench.first_contact --out DIR            # on the GPU machine, from the repository root
    python -m bench.first_contact --dry-run --out DIR  # the same plumbing on the CPU at tiny sizes (CI runs it)

Phases, most valuable first, each a subprocess with a deadline; the whole run ends within --budget-s (480):

    correctness  every op at the default shapes in bf16, compiled (tests/test_*shapes.py), and the model's fused
                 and eager paths under bf16 autocast (tests/test_model.py)
    loss         linear_cross_entropy and cross_entropy at the default shape, forward+backward, against eager,
                 torch.compile, F.linear_cross_entropy and Liger where present: time and peak memory
    train        train.py --fused, eager, and eager --compile at the default config: tokens/s, MFU, peak memory
    ops          the other op benchmarks (bench/test_ops.py)
    tests        the rest of the kernel tests, spread over the machine's cores (pytest-xdist, where installed)

DIR receives at most 8 files, none over 16 MiB, none in a subfolder (what one GPU lease brings back):

    results.json       a bench/results file: environment (device, versions, commit), every timing and memory
                       figure, each phase's counts and train.py's metrics rows (`python -m bench.report
                       DIR/results.json` files it in bench/results/ and regenerates BENCHMARKS.md)
    summary.md         BENCHMARKS.md as this run alone makes it: targets, tests, train.py, kernels
    measured.json      train.py's tokens/s and step time per path: `python -m bench.step_cost --measured` puts
                       the step-cost model's prediction beside them
    bench-loss.json    the benchmark sessions' records, rewritten after every case
    bench-ops.json
    logs.tar.gz        every phase's log

All but the bench files are rewritten (atomically) after every phase, so a kill at any moment keeps what was
measured. train.py writes its run directories (checkpoints) into a temporary folder and reads synthetic token files
(no tokenizer, no network); each run is stopped with SIGTERM once enough steps are logged, so it never evaluates
(which would make --compile compile a second graph). TRITON_CACHE_DIR, when set, is every phase's Triton cache: a
cache warmed on a CPU (`python -m bench.compile --arch 90` under the device's Python and Triton) saves the JIT time
of every specialisation whose key matches; the entries before and after each phase say how many were compiled.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import pathlib
import re
import statistics
import sys
import tarfile
import tempfile
import time

from fastcenter.data import GPT2_VOCAB_SIZE
from fastcenter.environment import collect as collect_environment
from fastcenter.environment import triton_build
from fastcenter.files import atomic_write, atomic_write_text

from . import report
from .compare_plain import read_rows, run, write_tokens
from .compile import WARM_MANIFEST

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
LIMITS = {"files": 8, "file_bytes": 16 << 20, "depth": 2}  # what comes back from a GPU lease
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
LOSS_CASES = "cross_entropy and default and fwdbwd"  # -k of bench/test_ops.py: both losses, every variant
KERNEL_TEST_FILES = [
    f"tests/test_{name}.py" for name in "norm rope swiglu cross_entropy autograd model layouts".split()
]
# name: (title, share of the budget); the last phase takes whatever is left.
PHASES = {
    "correctness": ("default shapes in bf16, compiled, and the model under bf16 autocast", 0.15),
    "loss": ("the loss benchmarks at the default shape", 0.18),
    "train": ("train.py fused vs eager vs --compile", 0.32),
    "ops": ("the other op benchmarks", 0.17),
    "tests": ("the rest of the kernel tests", None),
}
TRAIN_VARIANTS = {"fused": ["--fused"], "eager": ["--no-fused"], "eager_compile": ["--no-fused", "--compile"]}
DRY_TRAIN_FLAGS = "--batch-size 2 --grad-accum-steps 1 --seq-len 16 --dim 32 --n-layers 1 --n-heads 2 --vocab-size 512 --max-seq-len 16".split()
DEFAULT_TRAIN_FLAGS = "--batch-size 16 --grad-accum-steps 4 --seq-len 512".split()
TOKENS_PER_STEP = ("--batch-size", "--grad-accum-steps", "--seq-len")  # their product
PYTEST = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs"]


def shapes_test_file() -> str:
    """The file of the real-shape bf16 tests (named for the default shapes; found by pattern, not hard-coded)."""
    found = sorted(p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "tests").glob("test_*shapes.py"))
    return found[0] if found else "tests/test_shapes.py"


def selections(dry: bool) -> dict:
    """Per phase: the pytest arguments (test phases and benchmark phases) of this run."""
    if dry:  # two interpreted bf16 cases, the (GPU-only, skipped) shape tests, one case per benchmark phase
        return {
            "correctness": [shapes_test_file(), "tests/test_swiglu.py", "-k", "shapes or bfloat16 and 2x5x40"],
            "loss": ["-k", "linear_cross_entropy-default-fwdbwd and (fastcenter or eager)"],
            "ops": ["-k", "swiglu-default-fwd-fastcenter"],
            "tests": ["tests/test_rope.py", "-k", "float32 and not layout", "--maxfail", "3"],
        }
    return {
        "correctness": [shapes_test_file(), "tests/test_model.py", "-k", "shapes or bf16_autocast"],
        "loss": ["-k", LOSS_CASES],
        "ops": ["-k", f"not ({LOSS_CASES})"],
        # torch.compile with inductor costs up to a minute a test: only the one that compiles every op together.
        "tests": [*KERNEL_TEST_FILES, "-k", "not bf16_autocast and (not compile or every_op)"],
    }


class Deadline:
    """The whole run's end, and each phase's share of it."""

    def __init__(self, budget_s: float):
        self.budget_s, self.started = budget_s, time.monotonic()

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def allow(self, phase: str) -> float:
        """A phase's seconds: its share of the budget, never eating the shares of the phases after it; the last
        phase gets the rest (10 s are kept for the files)."""
        names = list(PHASES)
        later = sum(PHASES[p][1] or 0.0 for p in names[names.index(phase) + 1 :]) * self.budget_s
        left = self.left() - 10.0
        share = PHASES[phase][1]
        return max(0.0, left if share is None else min(share * self.budget_s, left - later))


_RESULT = re.compile(
    r"(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)|(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS) (tests/\S+::\S+)"
)


def parse_pytest_verbose(text: str) -> dict:
    """Counts from `pytest -v` lines, with or without xdist (read line by line: a run cut off still counts)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "bf16_passed": 0, "failures": []}
    for line in text.splitlines():
        match = _RESULT.search(line)
        if match is None:
            continue
        node, status = (match.group(1), match.group(2)) if match.group(1) else (match.group(4), match.group(3))
        if status in ("PASSED", "XPASS"):
            counts["passed"] += 1
            counts["bf16_passed"] += "bfloat16" in node or "bf16" in node
        elif status in ("FAILED", "ERROR"):
            counts["failed"] += 1
            counts["failures"].append(node)
        else:
            counts["skipped"] += 1
    return counts


def summarise_metrics(rows: list[dict], skip_first: int) -> dict:
    """Medians of tokens/s and MFU over the logged steps after the first `skip_first` (compilation, warm-up), the
    largest peak memory (train.py's MiB, and in GB = 10^9 bytes), the last loss."""
    steps = [r for r in rows if r.get("tokens_per_sec") is not None]
    timed = steps[skip_first:] or steps[-1:]

    def median(key):
        values = [r[key] for r in timed if isinstance(r.get(key), (int, float))]
        return statistics.median(values) if values else None

    peak = max((r["peak_mem_mb"] for r in steps if isinstance(r.get("peak_mem_mb"), (int, float))), default=None)
    return {
        "timed_steps": [r.get("step") for r in timed],
        "steps_timed": len(timed),
        "tokens_per_sec": median("tokens_per_sec"),
        "mfu": median("mfu"),
        "peak_mem_mb": peak,
        "peak_mem_gb": None if peak is None else peak * 2**20 / 1e9,
        "last_loss": steps[-1].get("loss") if steps else None,
    }


def bundle_problems(out: pathlib.Path) -> list[str]:
    """What in `out` a GPU lease would not bring back (LIMITS, names of letters, digits, '.', '_', '-')."""
    files = [p for p in out.rglob("*") if p.is_file()]
    problems = [f"{len(files)} files (at most {LIMITS['files']})"] if len(files) > LIMITS["files"] else []
    for p in files:
        rel = p.relative_to(out)
        if p.stat().st_size > LIMITS["file_bytes"]:
            problems.append(f"{rel}: {p.stat().st_size} bytes (at most {LIMITS['file_bytes']})")
        if len(rel.parts) - 1 > LIMITS["depth"] or not all(NAME.match(part) for part in rel.parts):
            problems.append(f"{rel}: too deep or a name outside letters, digits, '.', '_', '-'")
    return problems


def triton_cache_check(cache: str | None) -> dict:
    """Whether a carried Triton cache can serve this machine: its warm-up manifest (bench.compile) against this
    Triton's build. Equal builds mean equal keys for the launches the cache holds (same kernels, target, options)."""
    here = triton_build()
    manifest = pathlib.Path(cache or "/nonexistent") / WARM_MANIFEST
    warmed = json.loads(manifest.read_text()) if manifest.is_file() else None
    same = None if warmed is None else warmed.get("triton_build") == here
    return {"dir": cache, "triton_build": here, "warmed_by": warmed, "build_matches": same}


class FirstContact:
    """One run: its folders, its environment for subprocesses, and the files it keeps up to date in `out`."""

    def __init__(self, out: pathlib.Path, work: pathlib.Path, dry: bool, budget_s: float):
        self.out, self.work, self.dry, self.deadline = out, work, dry, Deadline(budget_s)
        (work / "logs").mkdir(parents=True, exist_ok=True)
        self.fc = {"dry_run": dry, "budget_s": budget_s, "phases": [], "train": []}
        self.environment = {**collect_environment(), "dry_run": dry, "argv": " ".join(sys.argv)}
        self.fc["triton_cache"] = triton_cache_check(os.environ.get("TRITON_CACHE_DIR"))
        self.cache = os.environ.get("TRITON_CACHE_DIR") or os.path.expanduser("~/.triton/cache")  # Triton's default

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.deadline.started:6.1f} s] {text}", flush=True)

    def env(self, *, bench: bool = False, partial: pathlib.Path | None = None) -> dict:
        """A phase's environment. On a GPU the kernels compile; in the dry run the test phases interpret them
        (tests/conftest.py turns the interpreter on without CUDA) and the benchmark phases take the CPU ops."""
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTCENTER_BENCH_PARTIAL")}
        env["PYTHONUNBUFFERED"] = "1"
        if self.dry:
            env.update(FASTCENTER_BENCH_DRY_RUN="1", CUDA_VISIBLE_DEVICES="")
            if bench:
                env["TRITON_INTERPRET"] = "0"
        if partial is not None:
            env["FASTCENTER_BENCH_PARTIAL"] = str(partial)
        return env

    def cache_entries(self) -> int | None:
        return len(os.listdir(self.cache)) if os.path.isdir(self.cache) else 0

    def phase(self, name: str, run_phase) -> dict:
        title = PHASES[name][0]
        timeout, entries = self.deadline.allow(name), self.cache_entries()
        self.say(f"{name}: {title} (at most {timeout:.0f} s) ...")
        result = {"name": name, "title": title, "budget_s": round(timeout, 1), **run_phase(timeout)}
        result.update(triton_cache_entries_before=entries, triton_cache_entries_after=self.cache_entries())
        self.fc["phases"].append(result)
        self.say(f"{name}: {'ok' if result.get('ok') else 'NOT OK'}, {result.get('wall_s')} s")
        self.write()
        return result

    def pytest_phase(self, name: str, args: list[str], timeout: float) -> dict:
        # Triton's compiler runs on the CPU: spreading the tests over workers spreads the JIT over the cores.
        workers = {"tests": min(16, os.cpu_count() or 1), "correctness": min(4, os.cpu_count() or 1)}.get(name, 1)
        xdist = ["-n", str(workers)] if workers > 1 and importlib.util.find_spec("xdist") else []
        log = self.work / "logs" / f"{name}.log"
        result = run([*PYTEST, "-v", "-o", "addopts=", *xdist, *args], timeout, log, self.env())
        counts = parse_pytest_verbose(log.read_text(errors="replace"))
        return {**result, **counts, "args": args, "ok": result["rc"] == 0 and not result["timed_out"]}

    def bench_phase(self, name: str, args: list[str], timeout: float) -> dict:
        partial, log = self.out / f"bench-{name}.json", self.work / "logs" / f"{name}.log"
        cmd = [*PYTEST, "bench/test_ops.py", "--benchmark-only", *args]
        result = run(cmd, timeout, log, self.env(bench=True, partial=partial))
        data = json.loads(partial.read_text()) if partial.is_file() else {}
        measured = len(data.get("benchmarks", []))
        return {**result, "args": args, "measured": measured, "ok": result["rc"] == 0 and not result["timed_out"]}

    def train_phase(self, timeout: float) -> dict:
        data, started, vocab = self.work / "data", time.monotonic(), 512 if self.dry else GPT2_VOCAB_SIZE
        sizes = {"train": 1 << (14 if self.dry else 22), "val": 1 << (12 if self.dry else 18)}
        self.fc["data"] = write_tokens(data, vocab, sizes, seed=20240520)
        self.fc["data"]["source"] = f"uniform random token ids (seed 20240520, vocab {vocab})"
        variants = [v for v in TRAIN_VARIANTS if not (self.dry and "compile" in v)]  # no C++ toolchain promised
        log_every, stop_at, skip = (1, 3, 0) if self.dry else (20, 200, 2)  # the first logs: compilation, warm-up
        device = "--device cpu --dtype float32" if self.dry else "--device cuda --dtype bfloat16"
        flags = (
            f"--max-iters 1000000 --eval-interval 1000000 --eval-iters 1 --log-interval {log_every} --warmup-iters 0"
        )
        flags = [*flags.split(), *device.split(), *(DRY_TRAIN_FLAGS if self.dry else DEFAULT_TRAIN_FLAGS)]
        for i, variant in enumerate(variants):
            weights = [2 if "compile" in v else 1 for v in variants[i:]]  # the compiled run gets a double share
            share = (timeout - (time.monotonic() - started)) * weights[0] / sum(weights)
            run_dir = self.work / f"run-{variant}"
            cmd = [sys.executable, "train.py", "--data", str(data), "--out-dir", str(run_dir), *flags]
            stop = lambda: any(r.get("step", 0) >= stop_at for r in read_rows(run_dir / "metrics.jsonl"))  # noqa: E731
            log = self.work / "logs" / f"train-{variant}.log"
            result = run([*cmd, *TRAIN_VARIANTS[variant]], share, log, self.env(), stop_when=stop)
            rows = read_rows(run_dir / "metrics.jsonl")
            summary = summarise_metrics(rows, skip_first=skip)
            ok = result["stopped"] and result["rc"] == 0 and summary["tokens_per_sec"] is not None
            status = "ok" if ok else "cut off" if result["timed_out"] else f"exit {result['rc']}"
            entry = {"variant": variant, "flags": TRAIN_VARIANTS[variant], **result, **summary, "ok": ok}
            entry["tokens_per_step"] = math.prod(int(flags[flags.index(f) + 1]) for f in TOKENS_PER_STEP)
            self.fc["train"].append({**entry, "status": status, "rows": rows})
            tokens, peak = report.fmt_num(summary["tokens_per_sec"]), report.fmt_num(summary["peak_mem_gb"], 3)
            self.say(f"train.py {' '.join(TRAIN_VARIANTS[variant])}: {tokens} tokens/s, peak {peak} GB, {status}")
            self.write()
        runs = self.fc["train"]
        return {"wall_s": round(time.monotonic() - started, 1), "ok": bool(runs) and all(r["ok"] for r in runs)}

    def results(self) -> dict:
        """The bench/results file of this run: the benchmark sessions' records and the first contact's own."""
        runs = [(p.name, json.loads(p.read_text())) for p in sorted(self.out.glob("bench-*.json"))]
        try:
            results = report.build_results(runs, dry_run_ok=self.dry)
        except report.ReportError:  # no benchmark measured anything (yet)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
            results = {
                "schema": report.RESULTS_SCHEMA,
                "device": self.environment["device"]["name"],
                "datetime": stamp,
                "date": stamp[:10],
                "peaks": None,
                "runs": [],
                "cases": [],
                "skipped": [],
                "failed": [],
            }
        self.fc["wall_s"] = round(time.monotonic() - self.deadline.started, 1)
        return {**results, "environment": self.environment, "first_contact": self.fc}

    def write(self) -> None:
        """results.json, summary.md and logs.tar.gz, each replaced atomically."""
        results = self.results()
        atomic_write_text(self.out / "results.json", json.dumps(results, indent=1) + "\n")
        atomic_write_text(self.out / "summary.md", report.render_markdown([("results.json", results)]))
        if self.fc["train"]:  # train.py's figures in the form `python -m bench.step_cost --measured` reads
            measured = {"device": results["device"]}
            for r in self.fc["train"]:
                tokens = r["tokens_per_sec"]
                step_ms = None if not tokens else 1e3 * r["tokens_per_step"] / tokens
                measured[r["variant"]] = {"tokens_per_sec": tokens, "optimizer_step_ms": step_ms}
            atomic_write_text(self.out / "measured.json", json.dumps(measured, indent=1) + "\n")

        def pack(f):
            with tarfile.open(fileobj=f, mode="w:gz") as tar:
                for log in sorted((self.work / "logs").glob("*.log")):
                    data = log.read_bytes()[-(4 << 20) :]  # the end of a runaway log is what tells
                    info = tarfile.TarInfo(log.name)
                    info.size, info.mtime = len(data), int(time.time())
                    tar.addfile(info, io.BytesIO(data))

        atomic_write(self.out / "logs.tar.gz", pack)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.first_contact", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the folder that comes back (made if missing; must be empty)")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny: checks the plumbing")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock limit of the whole run")
    parser.add_argument("--skip", default="", help=f"comma list of phases to skip: {','.join(PHASES)}")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out).resolve()
    skip = {s for s in args.skip.split(",") if s}
    problem = None
    if skip - set(PHASES):
        problem = f"--skip: unknown phase(s) {sorted(skip - set(PHASES))}; choose from {','.join(PHASES)}"
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        problem = f"--out {out} must be a new or empty folder (everything in it comes back)"
    elif not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            problem = "no CUDA device here; --dry-run checks the script on the CPU"
    if problem:
        print(f"bench.first_contact: {problem}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fastcenter-first-contact-") as work:
        fc = FirstContact(out, pathlib.Path(work), args.dry_run, args.budget_s)
        picked = selections(args.dry_run)
        fc.write()
        for name in PHASES:
            if name in skip:
                continue
            if name == "train":
                fc.phase(name, fc.train_phase)
            elif name in ("loss", "ops"):
                fc.phase(name, lambda t, name=name: fc.bench_phase(name, picked[name], t))
            else:
                fc.phase(name, lambda t, name=name: fc.pytest_phase(name, picked[name], t))
        fc.write()
    problems = bundle_problems(out)
    for p in problems:
        print(f"bench.first_contact: {p}", file=sys.stderr)
    fc.say(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    return 0 if all(p.get("ok") for p in fc.fc["phases"]) and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
