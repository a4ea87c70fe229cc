"""On a CPU: `train.py --fused` against a plain-PyTorch GPT of the same architecture, side by side.

    python -m bench.compare_plain                       # default config, 6 rounds x 4 steps
    python -m bench.compare_plain --rounds 2 --steps 3  # shorter
    python -m bench.compare_plain --shape tiny          # a tiny model in seconds: checks the harness, proves nothing

Both sides run as a user runs them, each in its own process (so each has its own peak RSS):

    fastcenter  python train.py --fused --device cpu --batch-size B --grad-accum-steps 1 --seq-len T
                --max-iters S --eval-interval S --eval-iters 1 --log-interval 1 --data DIR --out-dir DIR
    plain       python -m bench.plain_gpt ...   (bench/plain_gpt.py: full logits + F.cross_entropy, nanoGPT style)

alternately, the order swapped every round (A B, B A, ...), with the same thread count on the same synthetic data
(uniform random token ids: speed does not depend on their values). The first step of every run is warm-up and left
out; a run's tokens/s is the median of its other steps. Peak RSS is the child's ru_maxrss from wait4 (the whole
process). The machine is shared: around every run the machine-wide CPU counters (/proc/stat) are read, so each run
records how much CPU time *other* processes took while it ran, and the speed ratio is formed per round (fastcenter
/ plain of the same round), which cancels slow drifts in the load.

Writes bench/results/cpu-<cpu>-<date>.json and regenerates BENCHMARKS.md. `pytest bench/ --benchmark-only` runs the
same comparison on a machine without a GPU (bench/test_compare_plain.py, sized by FASTCENTER_BENCH_CPU_*). `run` (one
child process with a deadline, its log, its CPU time and peak RSS) and `write_tokens` serve bench/first_contact.py too.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from fastcenter.environment import collect as collect_environment
from fastcenter.model import GPTConfig

from . import report
from .report import DEFAULT_SHAPES, describe_settings

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
SCHEMA = report.CPU_SCHEMA
LABELS = report.CPU_LABELS
SIDES = tuple(LABELS)
TARGET_PEAK_RSS_BYTES = report.CPU_TARGETS["peak_rss"]["at_most"]  # the CPU targets (bench/targets.json)
TARGET_SPEEDUP = report.CPU_TARGETS["speedup"]["at_least"]


@dataclass(frozen=True)
class Settings:
    """What one comparison runs; model fields not given keep GPTConfig's defaults."""

    shape: str = "default"
    rounds: int = 6
    steps: int = 4  # optimizer steps per run; the first is warm-up
    batch_size: int = 16
    seq_len: int = 512
    dim: int = GPTConfig.dim
    n_layers: int = GPTConfig.n_layers
    n_heads: int = GPTConfig.n_heads
    vocab_size: int = GPTConfig.vocab_size
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


# "tiny": seconds per run, for checking the harness (tests, a dry run), never for a claim.
SHAPES = {"default": {}, "tiny": dict(batch_size=2, seq_len=32, dim=32, n_layers=1, n_heads=2, vocab_size=1000)}
MODEL_FIELDS = ("dim", "n_layers", "n_heads", "vocab_size")


def settings_for(shape: str = "default", **overrides) -> Settings:
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    return Settings(shape=shape, **{**SHAPES[shape], **{k: v for k, v in overrides.items() if v is not None}})


def settings_from_env() -> Settings:
    """What `pytest bench/ --benchmark-only` runs: the default config, 2 rounds x 3 steps, unless
    FASTCENTER_BENCH_CPU_SHAPE / _ROUNDS / _STEPS / _THREADS say otherwise (a dry run takes the tiny shape)."""
    from .measure import dry_run

    def number(name: str, default: int | None) -> int | None:
        value = os.environ.get(f"FASTCENTER_BENCH_CPU_{name}")
        return default if value in (None, "") else int(value)

    shape = os.environ.get("FASTCENTER_BENCH_CPU_SHAPE") or ("tiny" if dry_run() else "default")
    return settings_for(shape, rounds=number("ROUNDS", 2), steps=number("STEPS", 3), threads=number("THREADS", None))


def commands(s: Settings, data_dir: pathlib.Path, out_dir: pathlib.Path) -> dict[str, tuple[list[str], pathlib.Path]]:
    """side -> (argv, the metrics.jsonl it writes). Model flags only where they differ from the defaults."""
    steps, default = str(s.steps), Settings()
    model = [
        f"--{name.replace('_', '-')}={getattr(s, name)}"
        for name in MODEL_FIELDS
        if getattr(s, name) != getattr(default, name)
    ]
    train = f"--fused --device cpu --batch-size {s.batch_size} --grad-accum-steps 1 --seq-len {s.seq_len} --max-iters "
    train += f"{steps} --eval-interval {steps} --eval-iters 1 --log-interval 1"
    fastcenter = [sys.executable, "train.py", *train.split(), "--data", str(data_dir)]
    fastcenter += ["--out-dir", str(out_dir / "fastcenter")]
    plain = f"--batch-size {s.batch_size} --seq-len {s.seq_len} --max-iters {steps} --dim {s.dim} "
    plain += f"--n-layers {s.n_layers} --n-heads {s.n_heads} --vocab-size {s.vocab_size}"
    plain_out = ["--data", str(data_dir), "--out", str(out_dir / "plain.jsonl")]
    return {
        "fastcenter": ([*fastcenter, *model], out_dir / "fastcenter" / "metrics.jsonl"),
        "plain": ([sys.executable, "-m", "bench.plain_gpt", *plain_out, *plain.split()], out_dir / "plain.jsonl"),
    }


def write_tokens(data_dir: pathlib.Path, vocab_size: int, sizes: dict[str, int], seed: int = 0) -> dict:
    """<split>.bin of uniform random ids (nanoGPT's raw uint16 format) for each split of `sizes` (its tokens):
    the speed of a step does not depend on the ids. Returns what the results keep of it."""
    import numpy as np

    rng = np.random.default_rng(seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        rng.integers(0, vocab_size, size=n, dtype=np.uint16).tofile(data_dir / f"{split}.bin")
    return {"kind": "uniform random token ids", "seed": seed, "vocab_size": vocab_size, "tokens": sizes}


def read_rows(path: pathlib.Path) -> list[dict]:
    """The JSON lines of a metrics file (train.py's metrics.jsonl), a torn last line left out."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def run(cmd: list[str], timeout_s: float, log_path: pathlib.Path, env: dict, *, stop_when=None) -> dict:
    """Run `cmd` from the repository root, its output to `log_path`, for at most `timeout_s` (then SIGKILL to its
    process group, so whatever it started ends with it, as it does if this process is interrupted); `stop_when()`,
    polled with the exit five times a second, sends SIGTERM once it holds. Returns rc, wall_s, timed_out, stopped
    and the child's own CPU time and peak RSS (wait4's rusage)."""
    started, stopped, timed_out = time.monotonic(), False, False
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(map(str, cmd)) + "\n")
        log.flush()
        # Its own process group, in this session (whatever ends the session ends it too): a deadline ends the
        # command and whatever it started (compile workers, xdist workers).
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=os.setpgrp
        )
        try:
            while not (reaped := os.wait4(proc.pid, os.WNOHANG))[0]:
                if not timed_out and time.monotonic() - started > max(timeout_s, 1.0):
                    os.killpg(proc.pid, signal.SIGKILL)
                    timed_out = True
                elif stop_when is not None and not stopped and stop_when():
                    proc.send_signal(signal.SIGTERM)
                    stopped = True
                time.sleep(0.2)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    _, status, usage = reaped
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen, so it does not wait again
    return {
        "rc": proc.returncode,
        "wall_s": round(time.monotonic() - started, 1),
        "timed_out": timed_out,
        "stopped": stopped,
        "cpu_user_s": usage.ru_utime,
        "cpu_sys_s": usage.ru_stime,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # kB on Linux
    }


def _cpu_counters() -> tuple[float, float, float] | None:
    """Machine-wide (busy, steal, total) CPU seconds from /proc/stat, or None where there is none."""
    try:
        ticks = [int(f) for f in pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return None
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


def run_one(argv: list[str], metrics: pathlib.Path, *, threads: int, timeout_s: float, log_path: pathlib.Path) -> dict:
    """Run one side to completion: its metrics rows, peak RSS, CPU time and the noise around it."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    for name in ("TRITON_INTERPRET", "FASTCENTER_BACKEND"):  # the CPU implementation, not interpreted kernels
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    before, load_before = _cpu_counters(), _loadavg()
    result = run(argv, timeout_s, log_path, env)
    after = _cpu_counters()
    noise = {"loadavg_before": load_before, "loadavg_after": _loadavg()}
    if before is not None and after is not None:
        busy, steal, total = (a - b for a, b in zip(after, before))
        own = result["cpu_user_s"] + result["cpu_sys_s"]
        # Machine-wide busy time minus this run's own: what other processes took, as a share of all the CPUs.
        noise["other_busy_fraction"] = max(0.0, busy - own) / total if total > 0 else None
        noise["steal_fraction"] = steal / total if total > 0 else None
    rows = read_rows(metrics)
    timed = [r["tokens_per_sec"] for r in rows if r["step"] > 1]
    record = {
        "argv": argv,
        "returncode": result["rc"],
        **{k: result[k] for k in ("wall_s", "cpu_user_s", "cpu_sys_s", "peak_rss_bytes")},
        "reported_peak_mem_mb": rows[-1].get("peak_mem_mb") if rows else None,
        "rows": rows,
        "noise": noise,
        "tokens_per_sec": statistics.median(timed) if timed else None,
    }
    if result["rc"] != 0 or record["tokens_per_sec"] is None:
        tail = log_path.read_text(errors="replace").strip().splitlines()[1:][-5:]  # after the command line
        killed = f"killed by signal {-result['rc']} (out of memory, or the {timeout_s:.0f} s timeout?)"
        record["error"] = killed if result["rc"] < 0 else " | ".join(tail) or f"exit code {result['rc']}"
    return record


def _spread(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(runs: list[dict]) -> dict:
    """Medians and spreads per side, the per-round speed ratio, the noise, and the two targets."""
    summary: dict = {}
    for side in SIDES:
        side_runs = [r for r in runs if r["side"] == side]
        summary[side] = {
            "tokens_per_sec": _spread([r["tokens_per_sec"] for r in side_runs]),
            "peak_rss_bytes": _spread([r["peak_rss_bytes"] for r in side_runs if r["returncode"] == 0]),
            "failed": sum(1 for r in side_runs if r.get("error")),
        }
    ratios = []
    for n in sorted({r["round"] for r in runs}):
        pair = {r["side"]: r["tokens_per_sec"] for r in runs if r["round"] == n}
        if pair.get("fastcenter") and pair.get("plain"):
            ratios.append(pair["fastcenter"] / pair["plain"])
    summary["speedup"] = speed = _spread(ratios)
    noise = [r["noise"] for r in runs]
    spread = {side: summary[side]["tokens_per_sec"] for side in SIDES}  # how much the same work varied
    summary["noise"] = {
        "other_busy_fraction": _spread([n.get("other_busy_fraction") for n in noise]),
        "steal_fraction": _spread([n.get("steal_fraction") for n in noise]),
        "loadavg": _spread([n.get(k) for n in noise for k in ("loadavg_before", "loadavg_after")]),
        "run_to_run_spread": {side: s["max"] / s["min"] - 1 if s else None for side, s in spread.items()},
    }
    rss = summary["fastcenter"]["peak_rss_bytes"]
    summary["targets"] = {
        "peak_rss": {
            "target_bytes": TARGET_PEAK_RSS_BYTES,
            "measured_bytes": rss["max"] if rss else None,
            "met": None if rss is None else rss["max"] <= TARGET_PEAK_RSS_BYTES,
        },
        "speedup": {
            "target": TARGET_SPEEDUP,
            "measured": speed["median"] if speed else None,
            "met": None if speed is None else speed["median"] >= TARGET_SPEEDUP,
        },
    }
    return summary


def machine_record(env: dict, threads: int) -> dict:
    """The "machine" of a results file, from fastcenter.environment.collect()."""
    keys = {
        "cpu_model": "cpu",
        "logical_cpus": "cpu_count",
        "cpus_available": "cpus_available",
        "memory_bytes": "memory_bytes",
        "platform": "platform",
        "python": "python",
        "torch": "torch",
        "torch_cpu_capability": "torch_cpu_capability",
    }
    return {**{k: env[v] for k, v in keys.items()}, "cpu_model": env["cpu"] or "unknown CPU", "threads": threads}


def compare(s: Settings, work_dir: pathlib.Path | None = None, say=print) -> dict:
    """Run the comparison and return the results dict (see SCHEMA); `say` gets one line per run."""
    started = datetime.datetime.now(datetime.timezone.utc)
    env = collect_environment()  # before the runs: the code they ran
    with tempfile.TemporaryDirectory(prefix="fastcenter-compare-plain-") as tmp:
        work = pathlib.Path(work_dir or tmp)
        window_tokens = 4 * s.batch_size * (s.seq_len + 1)  # enough for every window drawn
        sizes = {"train": max(1_000_000, window_tokens), "val": max(100_000, window_tokens)}
        data = write_tokens(work / "data", s.vocab_size, sizes)
        runs = []
        for n in range(s.rounds):
            for side in SIDES if n % 2 == 0 else SIDES[::-1]:
                out_dir = work / f"round{n}"
                argv, metrics = commands(s, work / "data", out_dir)[side]
                out_dir.mkdir(parents=True, exist_ok=True)
                run = run_one(
                    argv, metrics, threads=s.n_threads, timeout_s=s.timeout_s, log_path=out_dir / f"{side}.log"
                )
                runs.append({**run, "round": n, "side": side})
                say(_run_line(runs[-1], s))
    return {
        "schema": SCHEMA,
        "datetime": started.isoformat(timespec="seconds"),
        "date": started.date().isoformat(),
        "wall_s": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        "machine": machine_record(env, s.n_threads),
        "git": env["git"],
        "environment": env,
        "settings": {**dataclasses.asdict(s), "threads": s.n_threads},
        "data": data,
        "labels": LABELS,
        "runs": runs,
        "summary": summarize(runs),
    }


def _run_line(run: dict, s: Settings) -> str:
    text = f"round {run['round'] + 1}/{s.rounds} {run['side']:<10}"
    if run.get("error"):
        return f"{text} FAILED: {run['error']}"
    text += f" {run['tokens_per_sec']:>10,.0f} tokens/s  peak RSS {run['peak_rss_bytes'] / 1e6:>8,.0f} MB  ({run['wall_s']:.0f} s"
    other = run["noise"].get("other_busy_fraction")
    return text + ("" if other is None else f"; other processes used {100 * other:.0f}% of the CPUs") + ")"


def summary_text(r: dict) -> str:
    """The comparison as BENCHMARKS.md shows it (bench.report), for a terminal."""
    return "\n".join(report.cpu_section([("", r)])[4:]).strip()  # without its title and the method


def default_path(r: dict, results_dir=RESULTS_DIR) -> pathlib.Path:
    """bench/results/cpu-<cpu model>-<date>[-<shape>].json; another run the same day gets -2, -3, ..."""
    stem = f"cpu-{report.slug(r['machine']['cpu_model'])}-{r['date']}"
    stem += "" if r["settings"]["shape"] in DEFAULT_SHAPES else f"-{r['settings']['shape']}"
    path, n = pathlib.Path(results_dir) / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = pathlib.Path(results_dir) / f"{stem}-{n}.json"
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare_plain", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="default", choices=sorted(SHAPES), help="default (the targets' config) or tiny")
    p.add_argument("--rounds", type=int, help="rounds of one run per side (default 6)")
    p.add_argument("--steps", type=int, help="optimizer steps per run, the first one warm-up (default 4)")
    p.add_argument("--threads", type=int, help="threads for both sides (default: every CPU available)")
    p.add_argument("--out", help="results JSON (default: bench/results/cpu-<cpu>-<date>.json)")
    p.add_argument("--work-dir", help="keep the run directories and logs here (default: a temporary folder)")
    p.add_argument("--no-markdown", action="store_true", help="do not regenerate BENCHMARKS.md")
    args = p.parse_args(argv)
    s = settings_for(args.shape, rounds=args.rounds, steps=args.steps, threads=args.threads)
    print(
        f"CPU comparison, {describe_settings({'settings': {**dataclasses.asdict(s), 'threads': s.n_threads}})}",
        flush=True,
    )
    r = compare(s, pathlib.Path(args.work_dir) if args.work_dir else None, say=lambda line: print(line, flush=True))
    path = pathlib.Path(args.out) if args.out else default_path(r)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r, indent=1) + "\n")
    print(summary_text(r))
    print(f"wrote {path}")
    if not args.no_markdown and path.resolve().parent == RESULTS_DIR.resolve():
        print(f"wrote {report.regenerate_markdown()}")
    return 1 if any(r["summary"][side]["failed"] for side in SIDES) else 0


if __name__ == "__main__":
    sys.exit(main())
