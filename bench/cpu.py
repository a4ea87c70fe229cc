"""The CPU comparison: `train.py --fused` on a CPU against a plain-PyTorch GPT of the same architecture.

    python -m bench.cpu                       # seed config, 6 rounds x 4 steps: ~20-30 minutes on 2 cores
    python -m bench.cpu --rounds 2 --steps 3  # shorter
    python -m bench.cpu --shape tiny          # a tiny model in seconds: checks the harness, proves nothing

Both sides run as they would for a user, each in its own process (so each has its own peak RSS):

    fastcenter  python train.py --fused --device cpu --batch-size B --grad-accum-steps 1 --seq-len T
                --max-iters S --eval-interval S --eval-iters 1 --log-interval 1 --data DIR --out-dir DIR
                (on a CPU the fused ops run fastcenter/cpu.py)
    plain       python -m bench.plain_gpt ...   (bench/plain_gpt.py: full logits + F.cross_entropy, nanoGPT style)

alternately, round after round, the order swapped every round (A B, B A, A B, ...), with the same thread count
(OMP_NUM_THREADS and MKL_NUM_THREADS set for both) on the same synthetic data (uniform random token ids: speed
does not depend on their values). Each process writes one metrics row per step; the first step of every run is
warm-up and is left out, and a run's tokens/s is the median of its other steps. Peak RSS is the child's
ru_maxrss from wait4 (the whole process: interpreter, torch, data, model, optimizer, activations; for train.py
also its final evaluation and checkpoint), with the value the process reported itself kept beside it.

Noise: this is meant for shared machines. Around every run the machine-wide CPU counters (/proc/stat) are read,
so each run records how much of the machine's CPU time went to *other* processes while it ran, besides the load
average. The speed ratio is formed per round (fastcenter / plain of the same round), which cancels slow drifts
in the load; the summary gives medians with min-max spreads.

Writes bench/results/cpu-<cpu>-<date>.json (raw rows, machine, settings, noise, summary) and regenerates
BENCHMARKS.md (its CPU section). `pytest bench/ --benchmark-only` runs the same comparison on a machine without
a GPU (bench/test_cpu.py; FASTCENTER_BENCH_CPU_* variables size it) and prints the same summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
SCHEMA = "fastcenter-cpu-bench/1"
SIDES = ("fastcenter", "plain")
LABELS = {"fastcenter": "train.py --fused (fastcenter/cpu.py)", "plain": "plain PyTorch GPT (bench/plain_gpt.py)"}

# The spec's CPU targets ("Without a GPU, and on a fresh machine"), at the seed config.
TARGET_PEAK_RSS_BYTES = 3e9
TARGET_SPEEDUP = 1.1


@dataclass(frozen=True)
class Settings:
    """What one comparison runs. The model fields not given keep GPTConfig's (seed) defaults."""

    shape: str = "seed"
    rounds: int = 6
    steps: int = 4  # optimizer steps per run; the first is warm-up
    batch_size: int = 16
    seq_len: int = 512
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    vocab_size: int = 50257
    threads: int = 0  # 0: every CPU this process may run on
    timeout_s: float = 3600.0  # per run

    def __post_init__(self):
        if self.rounds < 1 or self.steps < 2:
            raise ValueError(
                f"need rounds >= 1 and steps >= 2 (the first step is warm-up), got {self.rounds}, {self.steps}"
            )

    @property
    def n_threads(self) -> int:
        return self.threads or len(os.sched_getaffinity(0))


SHAPES = {
    "seed": {},
    # Seconds per run: for checking the harness (tests, a dry run), never for a claim.
    "tiny": dict(batch_size=2, seq_len=32, dim=32, n_layers=1, n_heads=2, vocab_size=1000),
}
SEED_MODEL = dict(dim=256, n_layers=4, n_heads=4, vocab_size=50257)


def settings_for(shape: str = "seed", **overrides) -> Settings:
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    return Settings(shape=shape, **{**SHAPES[shape], **{k: v for k, v in overrides.items() if v is not None}})


def settings_from_env() -> Settings:
    """What `pytest bench/ --benchmark-only` runs (bench/cpu_test.py): by default the seed config, 2 rounds x 3
    steps (~5-10 minutes on 2 cores, about a third of `python -m bench.cpu`); FASTCENTER_BENCH_CPU_SHAPE=tiny,
    FASTCENTER_BENCH_CPU_ROUNDS, FASTCENTER_BENCH_CPU_STEPS and FASTCENTER_BENCH_CPU_THREADS change it. A dry run
    (FASTCENTER_BENCH_DRY_RUN=1) takes the tiny shape."""
    from .environment import dry_run

    def number(name: str, default: int | None) -> int | None:
        value = os.environ.get(f"FASTCENTER_BENCH_CPU_{name}")
        return default if value in (None, "") else int(value)

    shape = os.environ.get("FASTCENTER_BENCH_CPU_SHAPE") or ("tiny" if dry_run() else "seed")
    return settings_for(shape, rounds=number("ROUNDS", 2), steps=number("STEPS", 3), threads=number("THREADS", None))


# ---------------------------------------------------------------------------------------------------------
# The two commands
# ---------------------------------------------------------------------------------------------------------


def _model_flags(s: Settings) -> list[str]:
    """Model-shape flags where they differ from the seed (so the seed command is exactly the documented one)."""
    flags = []
    for name, seed_value in SEED_MODEL.items():
        if getattr(s, name) != seed_value:
            flags += [f"--{name.replace('_', '-')}", str(getattr(s, name))]
    return flags


def commands(s: Settings, data_dir: pathlib.Path, out_dir: pathlib.Path) -> dict[str, tuple[list[str], pathlib.Path]]:
    """side -> (argv, the metrics.jsonl it writes)."""
    steps = str(s.steps)
    fastcenter = [
        sys.executable, "train.py", "--fused", "--device", "cpu", "--batch-size", str(s.batch_size),
        "--grad-accum-steps", "1", "--seq-len", str(s.seq_len), "--max-iters", steps, "--eval-interval", steps,
        "--eval-iters", "1", "--log-interval", "1", "--data", str(data_dir), "--out-dir", str(out_dir / "fastcenter"),
        *_model_flags(s),
    ]  # fmt: skip
    plain = [
        sys.executable, "-m", "bench.plain_gpt", "--data", str(data_dir), "--out", str(out_dir / "plain.jsonl"),
        "--batch-size", str(s.batch_size), "--seq-len", str(s.seq_len), "--max-iters", steps, "--dim", str(s.dim),
        "--n-layers", str(s.n_layers), "--n-heads", str(s.n_heads), "--vocab-size", str(s.vocab_size),
    ]  # fmt: skip
    return {
        "fastcenter": (fastcenter, out_dir / "fastcenter" / "metrics.jsonl"),
        "plain": (plain, out_dir / "plain.jsonl"),
    }


def write_data(data_dir: pathlib.Path, s: Settings, seed: int = 0) -> dict:
    """train.bin / val.bin of uniform random ids (nanoGPT's raw uint16 format), enough for every window drawn."""
    import numpy as np

    rng = np.random.default_rng(seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    window_tokens = 4 * s.batch_size * (s.seq_len + 1)
    sizes = {"train": max(1_000_000, window_tokens), "val": max(100_000, window_tokens)}
    for split, n in sizes.items():
        rng.integers(0, s.vocab_size, size=n, dtype=np.uint16).tofile(data_dir / f"{split}.bin")
    return {"kind": "uniform random token ids", "seed": seed, "tokens": sizes}


# ---------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------


def _cpu_counters() -> tuple[float, float, float] | None:
    """Machine-wide (busy, steal, total) CPU seconds from /proc/stat, or None where there is none."""
    try:
        fields = pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(f) for f in fields]
    hz = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    steal = ticks[7] if len(ticks) > 7 else 0
    total = sum(ticks[:8])  # guest time is already counted in user
    return (total - idle - steal) / hz, steal / hz, total / hz


def _loadavg() -> float | None:
    try:
        return float(pathlib.Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_rows(path: pathlib.Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_one(argv: list[str], metrics: pathlib.Path, *, threads: int, timeout_s: float, log_path: pathlib.Path) -> dict:
    """Run one side to completion; its metrics rows, peak RSS, CPU time and the noise around it."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("TRITON_INTERPRET", None)  # the CPU implementation, not interpreted kernels
    env.pop("FASTCENTER_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    before, load_before, t0 = _cpu_counters(), _loadavg(), time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # wait4: this child's own rusage (its peak RSS)
        finally:
            timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen, so it does not wait again
    wall = time.perf_counter() - t0
    after, load_after = _cpu_counters(), _loadavg()
    child_cpu = usage.ru_utime + usage.ru_stime
    noise = {"loadavg_before": load_before, "loadavg_after": load_after}
    if before is not None and after is not None:
        busy, steal, total = (a - b for a, b in zip(after, before))
        # Machine-wide busy time minus this run's own: what other processes took, as a share of all the CPUs.
        noise["other_busy_fraction"] = max(0.0, busy - child_cpu) / total if total > 0 else None
        noise["steal_fraction"] = steal / total if total > 0 else None
    rows = _read_rows(metrics)
    record = {
        "argv": argv,
        "returncode": proc.returncode,
        "wall_s": wall,
        "cpu_user_s": usage.ru_utime,
        "cpu_sys_s": usage.ru_stime,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # kB on Linux
        "reported_peak_mem_mb": rows[-1].get("peak_mem_mb") if rows else None,
        "rows": rows,
        "noise": noise,
    }
    timed = [r["tokens_per_sec"] for r in rows if r["step"] > 1]
    record["tokens_per_sec"] = statistics.median(timed) if timed else None
    if proc.returncode != 0 or record["tokens_per_sec"] is None:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:] if log_path.is_file() else []
        killed = proc.returncode < 0
        record["error"] = (f"killed by signal {-proc.returncode} (out of memory, or the {timeout_s:.0f} s timeout?)"
                           if killed else " | ".join(tail) or f"exit code {proc.returncode}")  # fmt: skip
    return record


# ---------------------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------------------


def _spread(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(runs: list[dict]) -> dict:
    """Medians and spreads per side, the per-round speed ratio, the noise, and the two targets."""
    by_side = {side: [r for r in runs if r["side"] == side] for side in SIDES}
    summary: dict = {}
    for side, side_runs in by_side.items():
        summary[side] = {
            "tokens_per_sec": _spread([r["tokens_per_sec"] for r in side_runs]),
            "peak_rss_bytes": _spread([r["peak_rss_bytes"] for r in side_runs if r["returncode"] == 0]),
            "failed": sum(1 for r in side_runs if r.get("error")),
        }
    rounds = sorted({r["round"] for r in runs})
    ratios = []
    for n in rounds:
        pair = {r["side"]: r["tokens_per_sec"] for r in runs if r["round"] == n}
        if pair.get("fastcenter") and pair.get("plain"):
            ratios.append(pair["fastcenter"] / pair["plain"])
    summary["speedup"] = _spread(ratios)
    summary["noise"] = {
        "other_busy_fraction": _spread([r["noise"].get("other_busy_fraction") for r in runs]),
        "steal_fraction": _spread([r["noise"].get("steal_fraction") for r in runs]),
        "loadavg": _spread([r["noise"].get(k) for r in runs for k in ("loadavg_before", "loadavg_after")]),
        # Spread of each side's own per-run tokens/s across rounds: how much the same work varied.
        "run_to_run_spread": {
            side: (s["tokens_per_sec"]["max"] / s["tokens_per_sec"]["min"] - 1) if s["tokens_per_sec"] else None
            for side, s in ((side, summary[side]) for side in SIDES)
        },
    }
    rss = summary["fastcenter"]["peak_rss_bytes"]
    speed = summary["speedup"]
    summary["targets"] = {
        "peak_rss": {"target_bytes": TARGET_PEAK_RSS_BYTES, "measured_bytes": rss["max"] if rss else None,
                     "met": None if rss is None else rss["max"] <= TARGET_PEAK_RSS_BYTES},
        "speedup": {"target": TARGET_SPEEDUP, "measured": speed["median"] if speed else None,
                    "met": None if speed is None else speed["median"] >= TARGET_SPEEDUP},
    }  # fmt: skip
    return summary


def machine_info(threads: int) -> dict:
    import torch

    from fastcenter.experiments.report import cpu_name

    memory = None
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return {
        "cpu_model": cpu_name() or "unknown CPU",
        "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "threads": threads,
        "memory_bytes": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def compare(s: Settings, work_dir: pathlib.Path | None = None, say=print) -> dict:
    """Run the comparison and return the results dict (see SCHEMA); `say` gets one line per run."""
    from .environment import git_info

    started = datetime.datetime.now(datetime.timezone.utc)
    source = git_info()  # before the runs: the code they ran
    with tempfile.TemporaryDirectory(prefix="fastcenter-cpu-bench-") as tmp:
        work = pathlib.Path(work_dir or tmp)
        data = write_data(work / "data", s)
        runs = []
        for n in range(s.rounds):
            order = SIDES if n % 2 == 0 else SIDES[::-1]
            for side in order:
                out_dir = work / f"round{n}"
                argv, metrics = commands(s, work / "data", out_dir)[side]
                out_dir.mkdir(parents=True, exist_ok=True)
                log = out_dir / f"{side}.log"
                run = run_one(argv, metrics, threads=s.n_threads, timeout_s=s.timeout_s, log_path=log)
                run.update(round=n, side=side)
                runs.append(run)
                say(_run_line(run, s))
    results = {
        "schema": SCHEMA,
        "datetime": started.isoformat(timespec="seconds"),
        "date": started.date().isoformat(),
        "wall_s": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        "machine": machine_info(s.n_threads),
        "git": source,
        "settings": {**dataclasses.asdict(s), "threads": s.n_threads},
        "data": data,
        "labels": LABELS,
        "runs": runs,
    }
    results["summary"] = summarize(runs)
    return results


# ---------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------


def _run_line(run: dict, s: Settings) -> str:
    text = f"round {run['round'] + 1}/{s.rounds} {run['side']:<10}"
    if run.get("error"):
        return f"{text} FAILED: {run['error']}"
    text += f" {run['tokens_per_sec']:>10,.0f} tokens/s  peak RSS {run['peak_rss_bytes'] / 1e6:>8,.0f} MB"
    text += f"  ({run['wall_s']:.0f} s"
    noise = run["noise"].get("other_busy_fraction")
    return text + ("" if noise is None else f"; other processes used {100 * noise:.0f}% of the CPUs") + ")"


def _fmt_spread(spread: dict | None, scale: float = 1.0, fmt: str = "{:,.0f}") -> str:
    if not spread:
        return "-"
    med, lo, hi = (fmt.format(spread[k] * scale) for k in ("median", "min", "max"))
    return f"{med} [{lo} - {hi}]"


def describe_settings(r: dict) -> str:
    s = r["settings"]
    shape = "seed config" if s["shape"] == "seed" else f"{s['shape']} shape (not the seed config)"
    return (f"{shape}: batch {s['batch_size']} x {s['seq_len']} tokens, dim {s['dim']}, {s['n_layers']} layers, "
            f"{s['n_heads']} heads, vocab {s['vocab_size']}, one micro-step per step; {s['rounds']} round(s) x "
            f"{s['steps']} steps per run (the first step of each run left out), {s['threads']} thread(s)")  # fmt: skip


def describe_machine(r: dict) -> str:
    m = r["machine"]
    git = r.get("git") or {}
    commit = git.get("commit", "unknown") + (" + uncommitted changes" if git.get("dirty") else "")
    memory = f", {m['memory_bytes'] / 1e9:.0f} GB RAM" if m.get("memory_bytes") else ""
    return (f"{m['cpu_model']} ({m['cpus_available']} of {m['logical_cpus']} logical CPUs available{memory}), "
            f"torch {m['torch']} ({m['torch_cpu_capability']}), Python {m['python']}; commit {commit}, "
            f"source sha256 {git.get('source_sha256', '?')}")  # fmt: skip


def describe_noise(r: dict) -> str:
    noise = r["summary"]["noise"]
    other, load = noise["other_busy_fraction"], noise["loadavg"]
    parts = []
    if other:
        parts.append(f"other processes used {100 * other['median']:.0f}% of the machine's CPU time during a median "
                     f"run ({100 * other['min']:.0f}-{100 * other['max']:.0f}% over the runs)")  # fmt: skip
    if load:
        parts.append(f"1-minute load average {load['median']:.1f} (range {load['min']:.1f}-{load['max']:.1f}) "
                     f"on {r['machine']['cpus_available']} CPUs")  # fmt: skip
    spread = noise["run_to_run_spread"]
    if all(v is not None for v in spread.values()):
        parts.append("the same run's tokens/s varied by up to " +
                     " and ".join(f"{100 * spread[side]:.0f}% ({side})" for side in SIDES) + " between rounds")
    return "; ".join(parts) or "no noise figures on this platform"


def summary_text(r: dict) -> str:
    s = r["summary"]
    lines = [
        f"CPU comparison, {describe_settings(r)}",
        f"machine: {describe_machine(r)}",
        f"{'':<42} {'tokens/s median [min - max]':>30}   {'peak RSS MB median [min - max]':>32}",
    ]
    for side in SIDES:
        lines.append(f"{LABELS[side]:<42} {_fmt_spread(s[side]['tokens_per_sec']):>30}   "
                     f"{_fmt_spread(s[side]['peak_rss_bytes'], 1e-6):>32}"
                     + (f"   ({s[side]['failed']} run(s) failed)" if s[side]["failed"] else ""))  # fmt: skip
    lines.append(f"speed ratio fastcenter / plain, paired by round: {_fmt_spread(s['speedup'], fmt='{:.2f}x')}")
    lines.append(f"noise: {describe_noise(r)}")
    if r["settings"]["shape"] != "seed":
        lines.append(f"targets: not evaluated (the {r['settings']['shape']} shape is not the seed config)")
        return "\n".join(lines)
    t = s["targets"]
    rss, speed = t["peak_rss"], t["speedup"]
    status = {True: "met", False: "NOT met", None: "not measured"}
    rss_text = "-" if rss["measured_bytes"] is None else f"{rss['measured_bytes'] / 1e6:,.0f} MB (largest run)"
    speed_text = "-" if speed["measured"] is None else f"{speed['measured']:.2f}x (median)"
    lines.append(f"targets (seed config): peak RSS <= 3 GB: {status[rss['met']]}, {rss_text}; "
                 f"tokens/s >= {TARGET_SPEEDUP}x plain: {status[speed['met']]}, {speed_text}")  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Files and the command line
# ---------------------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "cpu"


def default_path(r: dict, results_dir=RESULTS_DIR) -> pathlib.Path:
    """bench/results/cpu-<cpu model>-<date>.json; another run the same day gets -2, -3, ..."""
    stem = f"cpu-{_slug(r['machine']['cpu_model'])}-{r['date']}"
    if r["settings"]["shape"] != "seed":
        stem += f"-{r['settings']['shape']}"
    path, n = pathlib.Path(results_dir) / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = pathlib.Path(results_dir) / f"{stem}-{n}.json"
    return path


def write(r: dict, path: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r, indent=1) + "\n")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="seed", choices=sorted(SHAPES), help="seed (the targets' config) or tiny")
    p.add_argument("--rounds", type=int, help="rounds of one run per side (default 6)")
    p.add_argument("--steps", type=int, help="optimizer steps per run, the first one warm-up (default 4)")
    p.add_argument("--threads", type=int, help="threads for both sides (default: every CPU available)")
    p.add_argument("--out", help="results JSON (default: bench/results/cpu-<cpu>-<date>.json)")
    p.add_argument("--work-dir", help="keep the run directories and logs here (default: a temporary folder)")
    p.add_argument("--no-markdown", action="store_true", help="do not regenerate BENCHMARKS.md")
    args = p.parse_args(argv)
    s = settings_for(args.shape, rounds=args.rounds, steps=args.steps, threads=args.threads)
    print(f"CPU comparison, {describe_settings({'settings': {**dataclasses.asdict(s), 'threads': s.n_threads}})}",
          flush=True)  # fmt: skip
    r = compare(s, pathlib.Path(args.work_dir) if args.work_dir else None, say=lambda line: print(line, flush=True))
    path = write(r, pathlib.Path(args.out) if args.out else default_path(r))
    print(summary_text(r))
    print(f"wrote {path}")
    if not args.no_markdown and path.resolve().parent == RESULTS_DIR.resolve():
        from . import report

        print(f"wrote {report.regenerate_markdown()}")
    failed = sum(r["summary"][side]["failed"] for side in SIDES)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
