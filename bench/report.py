"""Results files and BENCHMARKS.md, from JSON only: nothing here measures, and nothing here imports what measures.

    python -m bench.report RUN.json [MORE.json ...]   # -> bench/results/<device>-<date>.json + BENCHMARKS.md
    python -m bench.report                            # regenerate BENCHMARKS.md from bench/results/ only

RUN.json is what `pytest bench/ --benchmark-json=...` writes (or its FASTCENTER_BENCH_PARTIAL file), or the
results.json of `python -m bench.first_contact`; several runs of one device merge into one results file.
BENCHMARKS.md shows the newest GPU results file in full, the newest CPU comparison (bench/results/cpu-*.json,
`python -m bench.compare_plain`), the compile check (bench/results/compile/*.json, `python -m bench.compile`) and
the performance targets (bench/targets.json: a GPU target names a case and a record field with a bound, or rival cases
it must be faster than; a CPU target, a figure of the CPU comparison); where nothing was measured it says so.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
MARKDOWN_PATH = REPO_ROOT / "BENCHMARKS.md"
_TARGETS = json.loads((pathlib.Path(__file__).parent / "targets.json").read_text())
TARGETS = [t for t in _TARGETS if "case" in t]
CPU_TARGETS = {t["cpu"]: t for t in _TARGETS if "cpu" in t}
RESULTS_SCHEMA = "fastcenter-bench-results/1"
RECORD_SCHEMA = "fastcenter-bench/1"
CPU_SCHEMA = "fastcenter-cpu-bench/1"
DEFAULT_SHAPES = ("default", "seed")  # results files before the rename call the default config "seed"
PASS_NAMES = {"fwd": "forward", "fwdbwd": "forward+backward"}
NOT_MEASURED = "not yet measured"
MB, GB = 1e6, 1e9  # memory in the report is in MB = 10^6 bytes and GB = 10^9 bytes (the targets' unit)


class ReportError(Exception):
    """Input that cannot be turned into a report (missing file, no fastcenter cases, mixed devices)."""


def load_json(path) -> dict:
    path = pathlib.Path(path)
    if not path.is_file():
        raise ReportError(f"{path} does not exist (pytest-benchmark writes its JSON only when a benchmark ran)")
    return json.loads(path.read_text())


def build_results(runs: list[tuple[str, dict]], dry_run_ok: bool = False) -> dict:
    """Merge (source name, pytest-benchmark JSON or bench session partial) pairs into one results dict (a dry
    run's records only when `dry_run_ok`: they measured nothing)."""
    if not runs:
        raise ReportError("no benchmark JSON given")
    cases, skipped, failed, devices, run_info = {}, {}, {}, set(), []
    environment = peaks = ops = None
    for source, run in runs:
        section = run.get("fastcenter") or {}
        env = section.get("environment")
        if env:
            devices.add(env.get("device", {}).get("name", "unknown"))
            environment = environment or env
        peaks, ops = peaks or section.get("peaks"), ops or section.get("ops")
        info = {"source": source, "datetime": run.get("datetime"), "wall_s": section.get("wall_s")}
        run_info.append({**info, "peaks": section.get("peaks"), "pytest_benchmark_version": run.get("version")})
        for bench in run.get("benchmarks", []):
            record = bench.get("extra_info") or {}
            if record.get("schema") != RECORD_SCHEMA:
                continue
            if record.get("dry_run") and not dry_run_ok:
                raise ReportError(f"{source} comes from a dry run (FASTCENTER_BENCH_DRY_RUN=1): it measured nothing")
            cases[record["case"]] = record
        skipped.update((item["id"], item) for item in section.get("skipped", []))
        failed.update((item["id"], item) for item in section.get("failed", []))
    if len(devices) > 1:
        raise ReportError(f"these runs come from different devices {sorted(devices)}: report each device separately")
    if not cases and not skipped and not failed:
        raise ReportError("the JSON holds no fastcenter benchmark cases (was it written by `pytest bench/ ...`?)")
    for case_id in cases:  # measured in one run, skipped in another: it was measured
        skipped.pop(case_id, None)
        failed.pop(case_id, None)
    latest = max((r["datetime"] for r in run_info if r["datetime"]), default=None)
    return {
        "schema": RESULTS_SCHEMA,
        "device": (environment or {}).get("device", {}).get("name", "unknown device"),
        "datetime": latest,
        "date": latest[:10] if latest else "undated",
        "environment": environment,
        "peaks": peaks,
        "ops": ops,
        "runs": run_info,
        "cases": list(cases.values()),  # in the order they ran: the suite's (bench/cases.py)
        "skipped": list(skipped.values()),
        "failed": list(failed.values()),
    }


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def write_results(results: dict, results_dir=RESULTS_DIR) -> pathlib.Path:
    """bench/results/<device>-<date>.json; the same run again overwrites its file, another run gets -2, -3..."""
    results_dir = pathlib.Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{slug(results['device'])}-{results['date']}"
    path, n = results_dir / f"{stem}.json", 1
    while path.exists():
        try:
            if json.loads(path.read_text()).get("datetime") == results["datetime"]:
                break
        except (OSError, ValueError):
            pass
        n += 1
        path = results_dir / f"{stem}-{n}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


def load_dir(folder, keep) -> list[tuple[str, dict]]:
    """(file name, data) of every JSON file in the folder whose data `keep` accepts, oldest first."""
    found = []
    for path in sorted(pathlib.Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and keep(data):
            found.append((path.name, data))
    return sorted(found, key=lambda item: (item[1].get("datetime") or "", item[0]))


# ---------------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------------


def fmt_ms(ms) -> str:
    return "-" if ms is None else f"{ms:.4f}" if ms < 0.1 else f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def fmt_x(ratio) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def fmt_mb(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / MB:,.1f}"


def fmt_pct(pct) -> str:
    return "-" if pct is None else f"{pct:.0f}%"


def fmt_num(x, digits=0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def fmt_spread(spread: dict | None, scale: float = 1.0, fmt: str = "{:,.0f}") -> str:
    if not spread:
        return "-"
    med, lo, hi = (fmt.format(spread[k] * scale) for k in ("median", "min", "max"))
    return f"{med} [{lo} - {hi}]"


UNITS = {
    "ms": lambda v: f"{fmt_ms(v)} ms",
    "MB": lambda v: f"{fmt_mb(v)} MB",
    "GB": lambda v: f"{v / GB:.3f} GB",
    "tokens/s": lambda v: f"{v:,.0f} tokens/s",
    "%": lambda v: f"{v:.0f}%",
}


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def columns(records: list[dict], spec: dict) -> list[str]:
    """A table with one column per (header, cell of a record) of `spec`."""
    return table(list(spec), [[cell(r) for cell in spec.values()] for r in records])


def find(results: dict | None, case_id: str) -> dict | None:
    return next((r for r in (results or {}).get("cases", []) if r["case"] == case_id), None)


def not_run_reason(results: dict | None, case_id: str) -> str | None:
    for item in (results or {}).get("skipped", []) + (results or {}).get("failed", []):
        if item["id"] == case_id:
            return item.get("reason") or f"failed: {item.get('message', '')}"
    return None


def describe_commit(git: dict | None) -> str:
    git = git or {}
    dirty = " (uncommitted changes)" if git.get("dirty") else ""
    return f"{git.get('commit', 'unknown')}{dirty}, source sha256 {git.get('source_sha256', '?')}"


def speedup(results: dict, record: dict, variant: str) -> float | None:
    base = find(results, "-".join([record["op"], record["shape"], record["direction"], variant]))
    return None if base is None else base["median_ms"] / record["median_ms"]


# ---------------------------------------------------------------------------------------------------------
# The performance targets
# ---------------------------------------------------------------------------------------------------------


def evaluate_target(target: dict, results: dict | None) -> tuple[str, str]:
    """(measured, status) of one target of bench/targets.json; results None -> nothing measured."""
    record = find(results, target["case"])
    rivals = [r for r in (find(results, c) for c in target.get("faster_than", [])) if r]
    wanted = [target["case"]] if record is None else target.get("faster_than", [])[:1] if not rivals else []
    if wanted:
        reason = not_run_reason(results, wanted[0])
        return "-", NOT_MEASURED if reason is None else f"not measured: {reason}"
    if "faster_than" in target:
        best = min(rivals, key=lambda r: r["median_ms"])
        value = best["median_ms"] / record["median_ms"]
        measured = (
            f"{value:.2f}x vs {best['variant']} ({fmt_ms(best['median_ms'])} vs {fmt_ms(record['median_ms'])} ms)"
        )
    else:
        value = record.get(target["field"])
        if value is None:
            return "-", NOT_MEASURED
        measured = UNITS[target["unit"]](value)
    ok = {
        "at_least": value >= target.get("at_least", value),
        "at_most": value <= target.get("at_most", value),
        "above": value > target["above"] if "above" in target else True,
    }
    status = "met" if all(ok.values()) else "**not met**"
    device = target.get("device")
    if device and device.lower() not in results["device"].lower():
        status += f" (the target is for an {device}; run on {results['device']})"
    return measured, status


def targets_section(results: dict | None) -> list[str]:
    intro = (
        "Each status is computed from the results file below."
        if results
        else ("Nothing has been measured on a GPU, so no target is met or missed yet.")
    )
    rows = [[t["text"], *evaluate_target(t, results)] for t in TARGETS]
    return [
        "## Targets",
        "",
        f"The performance targets of the design (bench/targets.json). {intro}",
        "",
        *table(["target", "measured", "status"], rows),
        "",
    ]


# ---------------------------------------------------------------------------------------------------------
# Sections of a GPU results file
# ---------------------------------------------------------------------------------------------------------


def run_section(results: dict, source: str) -> list[str]:
    env, peaks = results.get("environment") or {}, results.get("peaks") or {}
    device = env.get("device") or {}
    rows = [
        [
            "device",
            f"{results['device']} (compute capability {device.get('capability', '?')}, "
            f"{device.get('multiprocessors', '?')} SMs)",
        ],
        ["date (UTC)", results.get("datetime") or "-"],
        ["torch / triton / CUDA", f"{env.get('torch', '?')} / {env.get('triton', '?')} / {env.get('cuda', '?')}"],
        ["commit", describe_commit(env.get("git"))],
        ["measured copy bandwidth", f"{fmt_num(peaks.get('copy_gbps'))} GB/s (read + write)"],
        ["measured bf16 matmul", f"{fmt_num(peaks.get('matmul_tflops'))} TFLOP/s (8192^3, random data)"],
        ["results file", f"`bench/results/{source}`"],
    ]
    return ["## Run", "", *table(["", ""], rows), ""]


def op_tables(results: dict, op: str, cells: dict) -> tuple[list[dict], list[str]]:
    """An op's records, and its table (one column per cell of `cells`) followed by the cases that did not run."""
    records = [r for r in results["cases"] if r["op"] == op]
    items = [s for s in results.get("skipped", []) + results.get("failed", []) if s["id"].startswith(op + "-")]
    lines = [f"- not run: `{s['id']}`: {s.get('reason') or 'failed: ' + s.get('message', '')}" for s in items]
    return records, (columns(records, cells) + [""] if records else []) + lines + ([""] if lines else [])


def train_section(results: dict) -> list[str]:
    cells = {
        "variant": lambda r: r["variant"],
        "step ms": lambda r: fmt_ms(r["median_ms"]),
        "tokens/s": lambda r: fmt_num(r["tokens_per_s"]),
        "model TFLOP/s": lambda r: fmt_num(r.get("tflops"), 1),
        "% of matmul peak": lambda r: fmt_pct(r.get("pct_of_matmul")),
        "peak memory MB": lambda r: fmt_mb(r.get("train_peak_bytes")),
        "vs eager": lambda r: fmt_x(speedup(results, r, "eager")),
        "vs eager + compile": lambda r: fmt_x(speedup(results, r, "eager_compile")),
        "first step s": lambda r: fmt_num(r.get("first_step_s"), 1),
    }
    records, tables = op_tables(results, "train_step", cells)
    first = records[0] if records else {}
    params = f", {first['n_params']:,} parameters" if first.get("n_params") else ""
    intro = (
        f"The default model (GPTConfig defaults{params}), {first.get('grad_accum', 1)} micro-batch(es) of "
        f"{first.get('batch', 16)} x {first.get('seq_len', 512)} tokens per step, bf16 autocast, forward + "
        "backward + clipping + fused AdamW (the training core's step); steps back to back. Model TFLOP/s uses "
        "the model's `flops_per_token`. First step: compilation and warm-up."
    )
    return ["## Training step", "", intro, "", *tables] if tables else []


def op_section(results: dict, name: str, spec: dict) -> list[str]:
    compute = spec.get("bound") == "compute"
    fallback = "**fastcenter (reference fallback: no fused kernel ran)**"
    cells = {
        "shape": lambda r: f"{r['shape']}: " + " x ".join(f"{k}={v}" for k, v in r["dims"].items()),
        "pass": lambda r: PASS_NAMES.get(r["direction"], r["direction"]),
        "variant": lambda r: fallback if r["variant"] == "fastcenter" and r.get("fused") is False else r["variant"],
        "median ms": lambda r: fmt_ms(r["median_ms"]),
        "TFLOP/s" if compute else "GB/s": lambda r: fmt_num(r.get("tflops"), 1) if compute else fmt_num(r.get("gbps")),
        "% of matmul peak" if compute else "% of copy BW": lambda r: fmt_pct(
            r.get("pct_of_matmul" if compute else "pct_of_copy_bw")
        ),
        "vs eager": lambda r: fmt_x(speedup(results, r, "eager")),
        "vs compile": lambda r: fmt_x(speedup(results, r, "compile")),
        "peak MB": lambda r: fmt_mb(r.get("mem_peak_bytes")),
        "extra MB": lambda r: fmt_mb(r.get("mem_extra_bytes")),
    }
    _, tables = op_tables(results, name, cells)
    byte_model = f"Byte model: {spec.get('bytes_model', '-')}"
    return [f"### {name}", "", spec.get("notes", ""), "", *tables, byte_model, ""] if tables else []


def kernels_section(results: dict) -> list[str]:
    ops = results.get("ops") or {r["op"]: {} for r in results["cases"] if r["op"] != "train_step"}
    lines = [line for name, spec in ops.items() if name != "train_step" for line in op_section(results, name, spec)]
    if not lines:
        return []
    return [
        "## Kernels",
        "",
        "Speed-ups are eager's / compile's median time over the variant's (> 1: faster). Peak "
        "MB: new memory at the peak of one call; extra MB: that minus its outputs or gradients.",
        "",
        *lines,
    ]


def first_contact_section(results: dict) -> list[str]:
    """What `python -m bench.first_contact` adds to a results file: its test phases and train.py runs."""
    fc = results.get("first_contact")
    if not fc:
        return []
    lines = ["## First contact: tests and train.py", ""]
    if fc.get("dry_run"):
        lines += [
            "**Dry run on the CPU**: interpreted kernels, a tiny model; it checks the script, nothing here is "
            "a measurement.",
            "",
        ]
    for phase in fc.get("phases", []):
        if "passed" in phase:
            state = "cut off at its deadline" if phase.get("timed_out") else f"exit status {phase.get('rc')}"
            lines += [
                f"- {phase['title']}: {phase['passed']} passed ({phase.get('bf16_passed', 0)} of them bf16), "
                f"{phase['failed']} failed, {phase['skipped']} skipped, in {phase['wall_s']} s ({state})"
            ]
            lines += [f"  - failed: `{name}`" for name in phase.get("failures", [])]
    runs = fc.get("train") or []
    if runs:
        lines += [
            "",
            f"`train.py` at the default config ({runs[0].get('steps_timed', '?')} logged steps timed after "
            "compilation and warm-up, medians; peak memory is train.py's, in GB = 10^9 bytes):",
            "",
        ]
        spec = {
            "run": lambda r: r["variant"],
            "flags": lambda r: " ".join(r.get("flags", [])),
            "tokens/s": lambda r: fmt_num(r.get("tokens_per_sec")),
            "MFU": lambda r: "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%",
            "peak memory GB": lambda r: fmt_num(r.get("peak_mem_gb"), 3),
            "last loss": lambda r: fmt_num(r.get("last_loss"), 3),
            "wall s": lambda r: str(r.get("wall_s")),
            "status": lambda r: r.get("status", "failed"),
        }
        lines += columns(runs, spec)
        by = {r["variant"]: r.get("tokens_per_sec") for r in runs}
        if by.get("fused") and by.get("eager_compile"):
            lines += [
                "",
                f"fused / eager under torch.compile: {by['fused'] / by['eager_compile']:.2f}x (target >= 1.25x).",
            ]
    return lines + [""]


# ---------------------------------------------------------------------------------------------------------
# The CPU comparison and the compile check
# ---------------------------------------------------------------------------------------------------------


def describe_settings(r: dict) -> str:
    s = r["settings"]
    shape = "default config" if s["shape"] in DEFAULT_SHAPES else f"{s['shape']} shape (not the default config)"
    return (
        f"{shape}: batch {s['batch_size']} x {s['seq_len']} tokens, dim {s['dim']}, {s['n_layers']} layers, "
        f"{s['n_heads']} heads, vocab {s['vocab_size']}, one micro-step per step; {s['rounds']} round(s) x "
        f"{s['steps']} steps per run (the first step of each run left out), {s['threads']} thread(s)"
    )


def describe_noise(r: dict) -> str:
    noise = r["summary"]["noise"]
    other, load, spread = noise["other_busy_fraction"], noise["loadavg"], noise["run_to_run_spread"]
    parts = []
    if other:
        parts.append(
            f"other processes used {100 * other['median']:.0f}% of the machine's CPU time during a median "
            f"run ({100 * other['min']:.0f}-{100 * other['max']:.0f}% over the runs)"
        )
    if load:
        parts.append(
            f"1-minute load average {load['median']:.1f} (range {load['min']:.1f}-{load['max']:.1f}) "
            f"on {r['machine']['cpus_available']} CPUs"
        )
    if all(v is not None for v in spread.values()):
        parts.append(
            "the same run's tokens/s varied by up to "
            + " and ".join(f"{100 * v:.0f}% ({side})" for side, v in spread.items())
            + " between rounds"
        )
    return "; ".join(parts) or "no noise figures on this platform"


# How the CPU comparison's two sides are named (bench/compare_plain.py runs them): the report names them, so a
# results file written under older labels renders as a new one does.
CPU_LABELS = {
    "fastcenter": "train.py --fused (the ops' CPU implementation)",
    "plain": "plain PyTorch GPT (bench/plain_gpt.py)",
}


def cpu_section(cpu_results: list[tuple[str, dict]]) -> list[str]:
    """The newest CPU comparison: both sides' tokens/s and peak RSS, the paired ratio, the CPU targets, the noise."""
    lines = [
        "## On a CPU: train.py --fused against a plain-PyTorch GPT",
        "",
        "`python -m bench.compare_plain` runs `train.py --fused` on the CPU (where `fastcenter.ops` take their CPU "
        "implementation, fastcenter/ops/<family>.py: the chunked linear cross-entropy never forms the [N, V] logits) "
        "and "
        "`bench/plain_gpt.py`, a nanoGPT-style GPT of the same architecture, init and optimizer that forms the "
        "full logits and calls `F.cross_entropy`. Each run is its own process with the same thread count and "
        "synthetic data; the two alternate, the order swapped every round. A run's tokens/s is the median of "
        "its steps after the first (warm-up); peak RSS is the whole process's (`wait4`). The speed ratio is "
        "taken per round, from two runs made back to back, which cancels slow changes in the machine's load.",
        "",
    ]
    target_header = ["CPU target", "measured", "status"]
    if not cpu_results:
        rows = [[t["text"], "-", NOT_MEASURED] for t in CPU_TARGETS.values()]
        return lines + [
            "No CPU comparison has been recorded yet (see *How to run*).",
            "",
            *table(target_header, rows),
            "",
        ]
    source, r = cpu_results[-1]
    s, m = r["summary"], r["machine"]
    memory = f", {m['memory_bytes'] / 1e9:.0f} GB RAM" if m.get("memory_bytes") else ""
    about = [
        ["machine", f"{m['cpu_model']}, {m['cpus_available']} of {m['logical_cpus']} logical CPUs available{memory}"],
        ["software", f"torch {m['torch']} ({m['torch_cpu_capability']}), Python {m['python']}"],
        ["commit", describe_commit(r.get("git"))],
        ["date (UTC)", r["datetime"]],
        ["what ran", describe_settings(r)],
        ["results file", f"`bench/results/{source}`" if source else "not filed"],
    ]
    figures = []
    for side, label in CPU_LABELS.items():
        tps, n_failed = s[side]["tokens_per_sec"], s[side]["failed"]
        runs = str(tps["n"] if tps else 0) + (f" ({n_failed} failed)" if n_failed else "")
        figures.append([label, fmt_spread(tps), fmt_spread(s[side]["peak_rss_bytes"], 1e-6), runs])
    ratio, t = s["speedup"], s["targets"]

    def status(met):
        if r["settings"]["shape"] not in DEFAULT_SHAPES:
            return f"not measured at the default config ({r['settings']['shape']} shape)"
        return NOT_MEASURED if met is None else "met" if met else "**not met**"

    rss = t["peak_rss"]["measured_bytes"]
    measured = {
        "peak_rss": "-" if rss is None else f"{rss / MB:,.0f} MB (largest run)",
        "speedup": "-"
        if ratio is None
        else f"{ratio['median']:.2f}x (median of {ratio['n']} rounds; {ratio['min']:.2f}x-{ratio['max']:.2f}x)",
    }
    targets = [[target["text"], measured[name], status(t[name]["met"])] for name, target in CPU_TARGETS.items()]
    noise = describe_noise(r)
    lines += [
        *table(["", ""], about),
        "",
        *table(["", "tokens/s, median [min - max]", "peak RSS MB, median [min - max]", "runs"], figures),
        "",
        f"Speed ratio train.py --fused / plain, per round: {fmt_spread(ratio, fmt='{:.2f}x')}.",
        "",
        *table(target_header, targets),
        "",
        f'**How noisy the machine was.** {noise[0].upper()}{noise[1:]}. ("Other processes" is the machine-wide '
        "busy CPU time from /proc/stat while a run lasted, minus the run's own, as a share of all the CPUs' "
        "time: other agents share this machine.)",
        "",
    ]
    if len(cpu_results) > 1:
        earlier = ", ".join(f"`bench/results/{name}`" for name, _ in cpu_results[:-1])
        lines += [f"Earlier CPU comparisons: {earlier} (see *All results files*).", ""]
    return lines


def compile_section(compile_results: list[tuple[str, dict]]) -> list[str]:
    """One row per Triton version of bench/results/compile/*.json: did every kernel compile, fit, and not spill."""
    lines = [
        "## Compile check",
        "",
        "`python -m bench.compile` compiles every kernel specialisation the ops launch "
        "for sm_80 to sm_90 through a compile-only Triton driver (no GPU; nothing launched) and reads each "
        "cubin's resources. Compiling is not running: this says nothing of speed.",
        "",
    ]
    if not compile_results:
        return lines + ["No compile-check record has been committed yet.", ""]
    spec = {
        "Triton": lambda f: f[1].get("versions", {}).get("triton", "?"),
        "targets": lambda f: ", ".join(f"sm_{a}" for a in sorted({r["arch"] for r in f[1]["records"]})),
        "specialisations": lambda f: str(len(f[1]["records"])),
        "compile errors": lambda f: str(sum(1 for r in f[1]["records"] if r["error"])),
        "do not fit": lambda f: str(sum(1 for r in f[1]["records"] if not r["fits"])),
        "spilling": lambda f: str(sum(1 for r in f[1]["records"] if r["spill_instructions"] > 0)),
        "most registers": lambda f: str(max((r["registers"] for r in f[1]["records"]), default=0)),
        "file": lambda f: f"`bench/results/compile/{f[0]}`",
    }
    return lines + columns(compile_results, spec) + [""]


# ---------------------------------------------------------------------------------------------------------
# BENCHMARKS.md
# ---------------------------------------------------------------------------------------------------------

HOW_TO_RUN = """\
## How to run

On a machine with an NVIDIA GPU, from the repository root (an uninstalled clone works too):

    pytest bench/ --benchmark-only --benchmark-json=/tmp/bench.json
    python -m bench.report /tmp/bench.json    # -> bench/results/<device>-<date>.json and this file

- Without CUDA every GPU case is skipped with one reason, which the session states at its end, and the CPU
  comparison runs instead; no GPU results file is written.
- A subset: `-k rms_norm`, `-k "default and not compile"`, `-k train_step`. Runs split over several commands merge:
  `python -m bench.report a.json b.json` (one device per results file).
- `FASTCENTER_BENCH_PARTIAL=PATH` rewrites PATH after every case (a killed session keeps what it measured; the
  report reads it like the JSON). `FASTCENTER_GIT_COMMIT=<sha>` where the tree has no `.git`.
- `FASTCENTER_BENCH_GRAD_ACCUM=4` times train.py's default of 4 micro-batches per optimizer step (default 1).
- `FASTCENTER_BENCH_DRY_RUN=1` runs the suite's code on the CPU at tiny shapes (measures nothing; the report
  refuses its JSON).

### On a GPU lease: `python -m bench.first_contact`

One H200 for 15 minutes in all, no network, no install step, torch 2.11 / Triton 3.6 / Python 3.12 there; one
folder comes back (at most 8 files of 16 MiB). The command, given to the lease as is (the tree is copied there):

    PYTHONUNBUFFERED=1 FASTCENTER_GIT_COMMIT=<git rev-parse HEAD> TRITON_CACHE_DIR=$PWD/.triton-cache \
        python3 -m bench.first_contact --out $OUT          # timeout 540 s; carry: .triton-cache (optional)

It ends within 8 minutes (`--budget-s 480`), JIT included, and writes into $OUT, after every phase (the benchmark
files after every case): `results.json` (a results file: device, versions, commit, every timing and memory
figure, the tests' counts, train.py's metrics rows), `summary.md` (this page as that run makes it),
`bench-loss.json`, `bench-ops.json`, `measured.json` (for `python -m bench.step_cost --measured`) and
`logs.tar.gz`. Phases, most valuable first: every op at the default
shapes in bf16 and the model's fused-vs-eager agreement under bf16 autocast; the two losses against eager,
torch.compile, F.linear_cross_entropy and Liger (carried as a wheel, or skipped saying so); train.py fused vs
eager vs --compile (tokens/s, MFU, peak memory in GB); the other op benchmarks; the rest of the kernel tests over
16 workers. Back here: `python -m bench.report <files_at>/results.json` files it in bench/results/ and regenerates
this page; commit both.

The Triton cache warmed here saves the JIT time of every launch it holds (bench/compile.py's launch plans), if
Triton's build is the machine's (the cache keys hash it; `results.json` says under `first_contact.triton_cache`
whether it matched, and each phase how many cache entries it added). Warm it with the machine's versions:

    python3.12 -m venv /tmp/gpu-image && /tmp/gpu-image/bin/pip install torch==2.11.0 triton==3.6.0 "numpy<2.4"
    echo /.triton-cache/ >> .git/info/exclude
    TRITON_CACHE_DIR=$PWD/.triton-cache /tmp/gpu-image/bin/python -m bench.compile --arch 90 --quiet

`python -m bench.first_contact --dry-run --out DIR` runs the same plumbing on the CPU at tiny sizes (CI does).

### Without a GPU

`python -m bench.compare_plain [--rounds 6 --steps 4 --threads N]` writes `bench/results/cpu-<cpu>-<date>.json`
(every run's per-step rows, peak RSS, CPU time, the machine, the noise around each run) and regenerates this file.
`pytest bench/ --benchmark-only` runs it too where there is no GPU (or with FASTCENTER_BENCH_CPU=1), sized by
FASTCENTER_BENCH_CPU_SHAPE (default, or tiny), _ROUNDS, _STEPS and _THREADS, and files nothing.
"""

METHOD = """\
## Method

- **Timing**: pytest-benchmark's rounds, one call each, on a clock that advances by the time CUDA events measure
  around the call (bench/measure.py): pytest-benchmark's statistics are device times, and each case is timed once.
  The first calls (torch.compile, Triton's compiler, cuBLAS heuristics) are never timed. Before each round,
  untimed, the L2 is flushed by *reading* a buffer of max(256 MiB, 4 x L2), then the GPU spins for twice the
  host's time to enqueue one call, so the whole call is queued before its start event. The training step runs
  back to back instead (no flush, no spin): host overhead counts where the GPU would wait for it.
- **forward** runs under `torch.no_grad()`; **forward+backward** runs the forward, then `torch.autograd.grad`
  with a fixed random grad_output. All variants of a case get identical inputs. Before timing, the fastcenter
  result is held against eager PyTorch's (relative error bound 5e-2 in bf16, a sanity check; tests/ hold the
  precision), and a dispatch mode records whether the fastcenter custom ops really ran.
- **GB/s** = the bytes an ideal kernel must move (every input read once, every output written once, per pass) /
  median time; **% of peak** divides by the copy bandwidth (1 GiB device-to-device, read + written bytes) or the
  bf16 matmul rate (8192^3, random data) measured in the same session.
- **Memory**: `torch.cuda.max_memory_allocated` during one call, minus what was allocated before it; "extra" also
  subtracts what the call returns (outputs or gradients): memory beyond inputs and gradients. For the training
  step, the peak of everything the training owns, counted from before the model was built.
"""


def all_files(gpu_results, cpu_results) -> list[str]:
    lines = ["## All results files", ""]
    for name, r in gpu_results:
        commit = ((r.get("environment") or {}).get("git") or {}).get("commit", "unknown")
        lines.append(f"- `bench/results/{name}`: {r['device']}, {r.get('datetime') or r['date']}, commit {commit}")
    for name, r in cpu_results:
        commit = (r.get("git") or {}).get("commit", "unknown")
        lines.append(
            f"- `bench/results/{name}`: CPU comparison, {r['machine']['cpu_model']}, {r['datetime']}, commit {commit}"
        )
    return lines + [""]


def render_markdown(gpu_results: list[tuple[str, dict]], cpu_results=(), compile_results=()) -> str:
    """BENCHMARKS.md from (file name, results) pairs, each list oldest first; the newest of each shown in full."""
    lines = [
        "# fastcenter benchmarks",
        "",
        "<!-- Generated by `python -m bench.report` from bench/results/. Do not edit by hand. -->",
        "",
    ]
    newest = gpu_results[-1] if gpu_results else None
    if newest is None:
        lines += [
            "**Nothing has been measured on a GPU yet.** There is no GPU results file in `bench/results/`, so "
            "every GPU target below says so. Every number here comes from a results file; none is estimated "
            "or copied from elsewhere.",
            "",
        ]
    else:
        lines += run_section(newest[1], newest[0])
    results = newest[1] if newest else None
    lines += targets_section(results)
    if results:
        lines += train_section(results) + first_contact_section(results) + kernels_section(results)
    lines += cpu_section(list(cpu_results)) + compile_section(list(compile_results))
    lines += [HOW_TO_RUN, METHOD] + all_files(gpu_results, cpu_results)
    return "\n".join(lines).rstrip() + "\n"


def expected_markdown(results_dir=RESULTS_DIR) -> str:
    """BENCHMARKS.md as the results files in `results_dir` make it."""
    of = lambda schema: lambda data: data.get("schema") == schema  # noqa: E731
    return render_markdown(
        load_dir(results_dir, of(RESULTS_SCHEMA)),
        load_dir(results_dir, of(CPU_SCHEMA)),
        load_dir(pathlib.Path(results_dir) / "compile", lambda data: "records" in data),
    )


def regenerate_markdown(results_dir=RESULTS_DIR, markdown_path=MARKDOWN_PATH) -> pathlib.Path:
    path = pathlib.Path(markdown_path)
    path.write_text(expected_markdown(results_dir))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="*", help="benchmark JSON files of one device, or a first-contact results.json")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), help="where results files live")
    parser.add_argument("--markdown", default=str(MARKDOWN_PATH), help="the markdown file to regenerate")
    args = parser.parse_args(argv)
    try:
        if args.json:
            runs = [(str(p), load_json(p)) for p in args.json]
            filed = [data for _, data in runs if data.get("schema") == RESULTS_SCHEMA]
            if filed and len(runs) > 1:
                raise ReportError("a first-contact results.json is filed on its own")
            results = filed[0] if filed else build_results(runs)
            if (results.get("environment") or {}).get("dry_run") or (results.get("first_contact") or {}).get("dry_run"):
                raise ReportError("these results come from a dry run: they measured nothing")
            written = write_results(results, args.results_dir)
            print(
                f"wrote {written} ({len(results['cases'])} cases measured, {len(results['skipped'])} skipped, "
                f"{len(results['failed'])} failed)"
            )
        markdown = regenerate_markdown(args.results_dir, args.markdown)
    except ReportError as exc:
        print(f"bench.report: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
