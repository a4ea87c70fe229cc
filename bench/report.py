"""Turn pytest-benchmark JSON into a results file and regenerate BENCHMARKS.md.

    python -m bench.report RUN.json [MORE.json ...]   # -> bench/results/<device>-<date>.json + BENCHMARKS.md
    python -m bench.report                            # regenerate BENCHMARKS.md from bench/results/ only

Several JSON files (a suite split over several commands) are merged into one results file; they must come from
one device. BENCHMARKS.md shows the newest results file in full and lists the others. The CPU comparison
(`python -m bench.cpu`) writes its own results files, bench/results/cpu-*.json; BENCHMARKS.md shows the newest
in its CPU section. Nothing here measures anything: every number in the output comes from a results file, and
where there is none BENCHMARKS.md says that nothing has been measured.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

from . import cpu
from .cases import DIRECTIONS, OP_SPECS, RECORD_SCHEMA, TRAIN_VARIANTS, parse_case_id

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
MARKDOWN_PATH = REPO_ROOT / "BENCHMARKS.md"
RESULTS_SCHEMA = "fastcenter-bench-results/1"

MB = 1e6  # memory in the report is in MB = 10^6 bytes (and the targets' "1 GB" is 10^9 bytes)

# ---------------------------------------------------------------------------------------------------------
# pytest-benchmark JSON -> results
# ---------------------------------------------------------------------------------------------------------


class ReportError(Exception):
    """Input that cannot be turned into a report (missing file, no fastcenter cases, mixed devices)."""


def load_json(path) -> dict:
    path = pathlib.Path(path)
    if not path.is_file():
        raise ReportError(
            f"{path} does not exist. pytest-benchmark writes it only when at least one benchmark ran "
            "(without a GPU every case is skipped, and there is nothing to report)."
        )
    with open(path) as fh:
        return json.load(fh)


def _host_stats(bench: dict) -> dict:
    stats = bench.get("stats") or {}
    return {key: stats.get(key) for key in ("median", "min", "mean", "stddev", "rounds") if key in stats}


def build_results(runs: list[tuple[str, dict]]) -> dict:
    """Merge (source name, pytest-benchmark JSON) pairs into one results dict."""
    if not runs:
        raise ReportError("no benchmark JSON given")
    cases: dict[str, dict] = {}
    skipped: dict[str, dict] = {}
    failed: dict[str, dict] = {}
    environment, peaks, devices, run_info = None, None, set(), []
    for source, run in runs:
        section = run.get("fastcenter") or {}
        env = section.get("environment")
        if env:
            devices.add(env.get("device", {}).get("name", "unknown"))
            environment = environment or env
        peaks = peaks or section.get("peaks")
        run_info.append(
            {
                "source": source,
                "datetime": run.get("datetime"),
                "peaks": section.get("peaks"),
                "wall_s": section.get("wall_s"),
                "pytest_benchmark_version": run.get("version"),
            }
        )
        for bench in run.get("benchmarks", []):
            record = bench.get("extra_info") or {}
            if record.get("schema") != RECORD_SCHEMA:
                continue
            if record.get("dry_run"):
                raise ReportError(f"{source} comes from a dry run (FASTCENTER_BENCH_DRY_RUN=1): it measured nothing")
            cases[record["case"]] = {**record, "host_stats_s": _host_stats(bench)}
        for item in section.get("skipped", []):
            skipped[item["id"]] = item
        for item in section.get("failed", []):
            failed[item["id"]] = item
    if len(devices) > 1:
        raise ReportError(f"these runs come from different devices {sorted(devices)}: report each device separately")
    if not cases and not skipped and not failed:
        raise ReportError("the JSON holds no fastcenter benchmark cases (was it written by `pytest bench/ ...`?)")
    for case_id in cases:  # measured in one run, skipped in another: it was measured
        skipped.pop(case_id, None)
        failed.pop(case_id, None)
    datetimes = sorted(r["datetime"] for r in run_info if r["datetime"])
    latest = datetimes[-1] if datetimes else None
    return {
        "schema": RESULTS_SCHEMA,
        "device": (environment or {}).get("device", {}).get("name", "unknown device"),
        "datetime": latest,
        "date": latest[:10] if latest else "undated",
        "environment": environment,
        "peaks": peaks,
        "runs": run_info,
        "cases": sorted(cases.values(), key=lambda r: _case_order(r["case"])),
        "skipped": sorted(skipped.values(), key=lambda r: _case_order(r["id"])),
        "failed": sorted(failed.values(), key=lambda r: _case_order(r["id"])),
    }


def _case_order(case_id: str):
    """Sort key: op in OP_SPECS order (train step last), then shape, direction and variant as declared."""
    case = parse_case_id(case_id)
    if case is None:
        return (99, 0, 0, 0, case_id)
    if case.op == "train_step":
        v = TRAIN_VARIANTS.index(case.variant) if case.variant in TRAIN_VARIANTS else 99
        return (len(OP_SPECS), 0, 0, v, case_id)
    ops = list(OP_SPECS)
    if case.op not in OP_SPECS:
        return (98, 0, 0, 0, case_id)
    spec = OP_SPECS[case.op]
    shapes, variants = list(spec.shapes), list(spec.variants)
    return (
        ops.index(case.op),
        shapes.index(case.shape) if case.shape in shapes else 99,
        DIRECTIONS.index(case.direction) if case.direction in DIRECTIONS else 99,
        variants.index(case.variant) if case.variant in variants else 99,
        case_id,
    )


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
            same = json.loads(path.read_text()).get("datetime") == results["datetime"]
        except (OSError, ValueError):
            same = False
        if same:
            break
        n += 1
        path = results_dir / f"{stem}-{n}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


def load_results_dir(results_dir=RESULTS_DIR, schema: str = RESULTS_SCHEMA) -> list[tuple[str, dict]]:
    """(file name, results) of every results file of this schema (GPU suite by default), oldest first."""
    found = []
    for path in sorted(pathlib.Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("schema") == schema:
            found.append((path.name, data))
    return sorted(found, key=lambda item: (item[1].get("datetime") or "", item[0]))


def load_cpu_results(results_dir=RESULTS_DIR) -> list[tuple[str, dict]]:
    """(file name, results) of every CPU comparison (`python -m bench.cpu`), oldest first."""
    return load_results_dir(results_dir, cpu.SCHEMA)


# ---------------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------------


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms < 0.1:
        return f"{ms:.4f}"
    if ms < 10:
        return f"{ms:.3f}"
    return f"{ms:.1f}"


def fmt_x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def fmt_mb(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / MB:,.1f}"


def fmt_pct(pct) -> str:
    return "-" if pct is None else f"{pct:.0f}%"


def fmt_num(x, digits=0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def find(results: dict, op: str, shape: str, direction: str, variant: str) -> dict | None:
    for record in results["cases"]:
        if (record["op"], record["shape"], record["direction"], record["variant"]) == (op, shape, direction, variant):
            return record
    return None


def skip_reason(results: dict, op: str, shape: str, direction: str, variant: str) -> str | None:
    wanted = f"{op}-{shape}-{direction}-{variant}"
    for item in results.get("skipped", []) + results.get("failed", []):
        if item["id"] == wanted:
            return item.get("reason") or f"failed: {item.get('message', '')}"
    return None


def speedup(results: dict, record: dict, baseline_variant: str) -> float | None:
    base = find(results, record["op"], record["shape"], record["direction"], baseline_variant)
    return None if base is None else base["median_ms"] / record["median_ms"]


def variant_label(record: dict) -> str:
    if record["variant"] == "fastcenter" and record.get("fused") is False:
        return "**fastcenter (reference fallback: no fused kernel ran)**"
    return record["variant"]


# ---------------------------------------------------------------------------------------------------------
# The spec's performance targets
# ---------------------------------------------------------------------------------------------------------

NOT_MEASURED = "not yet measured"
BANDWIDTH_OPS = ("rms_norm", "center_rms_norm", "rope", "swiglu")
PASS_NAMES = {"fwd": "forward", "fwdbwd": "forward+backward"}


def _status(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _device_note(results: dict, device_word: str = "H100") -> str:
    device = results.get("device", "")
    return "" if device_word.lower() in device.lower() else f" (target stated for an {device_word}; run on {device})"


def evaluate_targets(results: dict | None) -> list[tuple[str, str, str]]:
    """(target, measured, status) for every performance target of the spec; results None -> nothing measured."""
    rows: list[tuple[str, str, str]] = []

    def add(target: str, measured: str | None, status: str | None):
        rows.append((target, measured or "-", status or NOT_MEASURED))

    def missing(op, shape, direction, variant) -> str:
        reason = None if results is None else skip_reason(results, op, shape, direction, variant)
        return NOT_MEASURED if reason is None else f"not measured: {reason}"

    get = (lambda *key: None) if results is None else (lambda *key: find(results, *key))

    # Training step.
    fused = get("train_step", "seed", "step", "fused")
    eager_compile = get("train_step", "seed", "step", "eager_compile")
    note = "" if results is None else _device_note(results)
    target = "Training throughput of the fused seed model: >= 3,000,000 tokens/s on one H100"
    if fused:
        add(target, f"{fused['tokens_per_s']:,.0f} tokens/s", _status(fused["tokens_per_s"] >= 3e6) + note)
    else:
        add(target, None, missing("train_step", "seed", "step", "fused"))
    target = "Fused training >= 1.25x the eager model under torch.compile (same session)"
    if fused and eager_compile:
        ratio = fused["tokens_per_s"] / eager_compile["tokens_per_s"]
        add(target, f"{ratio:.2f}x", _status(ratio >= 1.25))
    else:
        add(target, None, missing("train_step", "seed", "step", "fused" if not fused else "eager_compile"))
    target = "Peak GPU memory of a fused training step at batch 16: <= 1 GB"
    if fused and fused.get("train_peak_bytes") is not None:
        add(target, f"{fmt_mb(fused['train_peak_bytes'])} MB", _status(fused["train_peak_bytes"] <= 1e9))
    else:
        add(target, None, missing("train_step", "seed", "step", "fused"))

    # linear_cross_entropy at the seed shape, forward+backward.
    key = ("linear_cross_entropy", "seed", "fwdbwd")
    lce = get(*key, "fastcenter")
    target = "linear_cross_entropy, seed shape, bf16, forward+backward: <= 1.6 ms on an H100"
    if lce:
        add(target, f"{fmt_ms(lce['median_ms'])} ms", _status(lce["median_ms"] <= 1.6) + note)
    else:
        add(target, None, missing(*key, "fastcenter"))
    target = "linear_cross_entropy, seed shape: <= 100 MB beyond inputs and gradients"
    if lce and lce.get("mem_extra_bytes") is not None:
        add(target, f"{fmt_mb(lce['mem_extra_bytes'])} MB", _status(lce["mem_extra_bytes"] <= 100 * MB))
    else:
        add(target, None, missing(*key, "fastcenter"))
    for label, variants in (
        ("torch.compile of the eager loss", ("compile",)),
        ("PyTorch's F.linear_cross_entropy (where present)", ("torch_lce_chunked", "torch_lce_accurate")),
        ("Liger-Kernel's fused linear cross-entropy (where present)", ("liger",)),
    ):
        target = f"linear_cross_entropy, seed shape, forward+backward: faster than {label}"
        rivals = [r for r in (get(*key, v) for v in variants) if r]
        if lce and rivals:
            best = min(rivals, key=lambda r: r["median_ms"])
            ratio = best["median_ms"] / lce["median_ms"]
            add(target, f"{ratio:.2f}x vs {best['variant']} ({fmt_ms(best['median_ms'])} ms)", _status(ratio > 1.0))
        elif not lce:
            add(target, None, missing(*key, "fastcenter"))
        else:
            add(target, None, missing(*key, variants[0]))

    # Bandwidth-bound kernels.
    for op in BANDWIDTH_OPS:
        for direction in DIRECTIONS:
            target = f"{op}, large shape, {PASS_NAMES[direction]}: >= 85% of measured copy bandwidth"
            r = get(op, "large", direction, "fastcenter")
            if r and r.get("pct_of_copy_bw") is not None:
                add(target, f"{r['pct_of_copy_bw']:.0f}% ({r['gbps']:,.0f} GB/s)", _status(r["pct_of_copy_bw"] >= 85))
            else:
                add(target, None, missing(op, "large", direction, "fastcenter"))
    for op in BANDWIDTH_OPS:
        for direction in DIRECTIONS:
            target = f"{op}, seed shape, {PASS_NAMES[direction]}: no slower than torch.compile"
            r, c = get(op, "seed", direction, "fastcenter"), get(op, "seed", direction, "compile")
            if r and c:
                ratio = c["median_ms"] / r["median_ms"]
                measured = f"{ratio:.2f}x ({fmt_ms(r['median_ms'])} vs {fmt_ms(c['median_ms'])} ms)"
                add(target, measured, _status(ratio >= 1.0))
            else:
                add(target, None, missing(op, "seed", direction, "fastcenter" if not r else "compile"))
    return rows


# ---------------------------------------------------------------------------------------------------------
# BENCHMARKS.md
# ---------------------------------------------------------------------------------------------------------

HOW_TO_RUN = """\
## How to run

On a machine with an NVIDIA GPU, from the repository root:

    pip install -e ".[dev]"            # offline, with torch/triton/pytest-benchmark already there:
                                       # pip install --no-deps --no-build-isolation -e .
    pytest bench/ --benchmark-only --benchmark-json=/tmp/bench.json
    python -m bench.report /tmp/bench.json    # -> bench/results/<device>-<date>.json and this file

- Without CUDA every GPU case is skipped with one reason, which the session's summary states at its end, and
  the CPU comparison runs instead (next section); no GPU results file is written.
- A subset: `-k rms_norm`, `-k "seed and not compile"`, `-k train_step`. A suite split over several commands
  is merged by passing every JSON: `python -m bench.report a.json b.json` (one device per results file).
- pytest exits non-zero when a case fails; the JSON is still written, so `;` instead of `&&` still gets a report
  (failures are listed in it).
- The device machine may have no `.git`: set `FASTCENTER_GIT_COMMIT=$(git rev-parse HEAD)` where git works;
  every results file also carries a hash of the sources it measured.
- `FASTCENTER_BENCH_GRAD_ACCUM=4` times train.py's default of 4 micro-batches per optimizer step (default 1).
- `FASTCENTER_BENCH_BUDGET_S` (default 450, 0 = none): no case starts later than this many seconds into the
  run (the training step goes first, then the seed shapes, then the large ones), so one run fits a 10-minute
  command; cases cut off are listed with that reason.
- `FASTCENTER_BENCH_DRY_RUN=1` runs the suite's code on the CPU at tiny shapes (checks the harness; measures
  nothing, and the report refuses its JSON).
- `python -m bench.report` with no argument regenerates this file from bench/results/.
"""

HOW_TO_RUN_CPU = """\
### Without a GPU

    python -m bench.cpu                       # seed config, 6 rounds x 4 steps: ~25 minutes on 2 cores
    python -m bench.cpu --rounds 2 --steps 3  # shorter; --threads N, --work-dir DIR (keeps the logs)
    pytest bench/ --benchmark-only            # runs the comparison too (2 rounds x 3 steps by default)

`python -m bench.cpu` writes `bench/results/cpu-<cpu>-<date>.json` (every run's per-step rows, peak RSS, CPU
time, the machine, and the noise around each run) and regenerates this file. Under pytest the same comparison
is sized by FASTCENTER_BENCH_CPU_SHAPE (seed, or tiny to check the harness), FASTCENTER_BENCH_CPU_ROUNDS,
FASTCENTER_BENCH_CPU_STEPS and FASTCENTER_BENCH_CPU_THREADS; it prints its summary at the end of the session and
puts the results in the pytest-benchmark JSON, but writes nothing here. Where a GPU is available it is skipped
unless FASTCENTER_BENCH_CPU=1. The plain GPT needs about 7 GB of memory at the seed config.
"""

METHOD = """\
## Method

- **Timing**: CUDA events around each rep, one synchronisation after the last; the median over reps (sized to
  about 100 ms of work, at least 10). The first calls (torch.compile, Triton autotuning, cuBLAS heuristics) and
  about 25 ms more are warm-up and never timed. Before each rep, outside the timed region, the L2 is flushed by
  *reading* a buffer of max(256 MiB, 4 x L2) (no dirty lines left to write back during the next rep), so small
  shapes are not flattered by a warm cache; then the GPU spins for 1.5 x the host's time to enqueue one call,
  so the whole call is queued before its start event: the kernels' device time is measured, not an idle GPU
  waiting for Python. Every rep's time is kept in the results file, with the host enqueue time.
  The training step is timed differently: steps back to back, no flush and no spin, as in training, so host
  overhead counts where the GPU would wait for it.
- **forward** runs under `torch.no_grad()`; **forward+backward** runs the forward, then `torch.autograd.grad`
  with a fixed random grad_output (nothing accumulates between reps). All variants of a case get identical
  seeded inputs and grad_outputs. Before timing, the fastcenter result is held against eager PyTorch's
  (relative error bound 5e-2 in bf16, a sanity check; tests/ hold the precision), and one call under a
  dispatch mode records whether the fastcenter custom ops really ran.
- **GB/s** = the bytes an ideal kernel must move (every input read once, every output written once, per pass;
  the byte model of each op is printed under its table) / median time. **% of peak** divides by the copy
  bandwidth (device-to-device copy of 1 GiB, read + written bytes) or the bf16 matmul rate (8192^3, random
  data) measured in the same session. TFLOP/s of linear_cross_entropy counts 2*N*D*V per GEMM, 1 forward and
  3 forward+backward.
- **Memory**: `torch.cuda.max_memory_allocated` during one call, minus what was allocated before it; "extra"
  also subtracts what the call returns (outputs, or gradients), i.e. memory beyond inputs and gradients. For
  the training step, the peak of everything the training owns (weights, gradients, AdamW state, batch,
  activations), measured from before the model was built.
- pytest-benchmark's own statistics in the JSON (`host_stats_s` in the results file) are host wall-clock times
  of one call plus `torch.cuda.synchronize()`: the latency a Python caller sees, launch overhead included.
"""


def _run_section(results: dict, source: str) -> list[str]:
    env = results.get("environment") or {}
    device = env.get("device") or {}
    git = env.get("git") or {}
    peaks = results.get("peaks") or {}
    commit = git.get("commit", "unknown")
    if git.get("dirty"):
        commit += " (uncommitted changes)"
    rows = [
        ["device", f"{results['device']} (compute capability {device.get('capability', '?')}, "
         f"{device.get('multiprocessors', '?')} SMs)"],
        ["date (UTC)", results.get("datetime") or "-"],
        ["torch / triton / CUDA", f"{env.get('torch', '?')} / {env.get('triton', '?')} / {env.get('cuda', '?')}"],
        ["commit", f"{commit}, source sha256 {git.get('source_sha256', '?')}"],
        ["measured copy bandwidth", f"{fmt_num(peaks.get('copy_gbps'))} GB/s (read + write)"],
        ["measured bf16 matmul", f"{fmt_num(peaks.get('matmul_tflops'))} TFLOP/s (8192^3, random data)"],
        ["results file", f"`bench/results/{source}`"],
    ]
    return ["## Run", ""] + _table(["", ""], rows) + [""]


def _not_run(items: list[dict]) -> list[str]:
    """Bullet lines for skipped or failed cases, with their reasons."""
    lines = [f"- not run: `{s['id']}`: {s.get('reason') or 'failed: ' + s.get('message', '')}" for s in items]
    return lines + ([""] if lines else [])


def _train_section(results: dict) -> list[str]:
    records = [r for r in results["cases"] if r["op"] == "train_step"]
    skipped = [s for s in results.get("skipped", []) + results.get("failed", []) if s["id"].startswith("train_step-")]
    if not records and not skipped:
        return []
    first = records[0] if records else {}
    batch, seq_len, accum = first.get("batch", 16), first.get("seq_len", 512), first.get("grad_accum", 1)
    params = f", {first['n_params']:,} parameters" if first.get("n_params") else ""
    lines = [
        "## Training step",
        "",
        f"Seed model (GPTConfig defaults{params}), {accum} micro-batch(es) of {batch} x {seq_len} tokens "
        "per step, bf16 autocast, forward + backward + gradient clipping + fused AdamW step (train.py's step; "
        "train.py's default is 4 micro-batches, which spreads the optimizer step over more tokens). Model TFLOP/s "
        "uses the model's `flops_per_token` (6 x matmul weights + attention). First step: compile and warm-up.",
        "",
    ]
    rows = []
    for r in records:
        vs_eager = speedup(results, r, "eager")
        vs_compile = speedup(results, r, "eager_compile")
        rows.append(
            [
                r["variant"],
                fmt_ms(r["median_ms"]),
                fmt_num(r["tokens_per_s"]),
                fmt_num(r.get("tflops"), 1),
                fmt_pct(r.get("pct_of_matmul")),
                fmt_mb(r.get("train_peak_bytes")),
                fmt_x(vs_eager),
                fmt_x(vs_compile),
                fmt_num(r.get("first_step_s"), 1),
            ]
        )
    if rows:
        header = ["variant", "step ms", "tokens/s", "model TFLOP/s", "% of matmul peak", "peak memory MB",
                  "vs eager", "vs eager + compile", "first step s"]
        lines += _table(header, rows) + [""]
    return lines + _not_run(skipped)


def _dims_in_spec_order(spec, record: dict) -> dict:
    order = list(spec.shapes.get(record["shape"], {})) + sorted(record["dims"])
    return {key: record["dims"][key] for key in dict.fromkeys(order) if key in record["dims"]}


def _op_section(results: dict, name: str) -> list[str]:
    spec = OP_SPECS[name]
    records = [r for r in results["cases"] if r["op"] == name]
    skipped = [s for s in results.get("skipped", []) + results.get("failed", []) if s["id"].startswith(name + "-")]
    if not records and not skipped:
        return []
    compute = spec.bound == "compute"
    lines = [f"### {name}", "", spec.notes, ""]
    header = ["shape", "pass", "variant", "median ms", "TFLOP/s" if compute else "GB/s",
              "% of matmul peak" if compute else "% of copy BW", "vs eager", "vs compile", "peak MB", "extra MB"]
    rows = []
    for r in records:
        rate = fmt_num(r.get("tflops"), 1) if compute else fmt_num(r.get("gbps"))
        pct = r.get("pct_of_matmul") if compute else r.get("pct_of_copy_bw")
        rows.append(
            [
                f"{r['shape']}: {spec.shape_text(_dims_in_spec_order(spec, r))}",
                PASS_NAMES.get(r["direction"], r["direction"]),
                variant_label(r),
                fmt_ms(r["median_ms"]),
                rate,
                fmt_pct(pct),
                fmt_x(speedup(results, r, "eager")),
                fmt_x(speedup(results, r, "compile")),
                fmt_mb(r.get("mem_peak_bytes")),
                fmt_mb(r.get("mem_extra_bytes")),
            ]
        )
    if rows:
        lines += _table(header, rows) + [""]
    lines += _not_run(skipped)
    doc = " ".join((spec.bytes_moved.__doc__ or "").split())
    lines += [f"Byte model: {doc}", ""]
    return lines


def _targets_section(results: dict | None) -> list[str]:
    rows = [list(row) for row in evaluate_targets(results)]
    intro = (
        "From SPEC.md, \"Performance targets\". Each status is computed from the results file below."
        if results is not None
        else "From SPEC.md, \"Performance targets\". Nothing has been measured, so no target is met or missed yet."
    )
    return ["## Spec targets", "", intro, ""] + _table(["target", "measured", "status"], rows) + [""]


def render_markdown(all_results: list[tuple[str, dict]], cpu_results: list[tuple[str, dict]] = ()) -> str:
    """BENCHMARKS.md from (file name, results) pairs of the GPU suite and of the CPU comparison, each oldest
    first; the newest of each is shown in full."""
    lines = [
        "# fastcenter benchmarks",
        "",
        "<!-- Generated by `python -m bench.report` from bench/results/*.json. Do not edit by hand. -->",
        "",
    ]
    if not all_results:
        if cpu_results:
            lines += [
                "**Nothing has been measured on a GPU yet.** There is no GPU results file in `bench/results/`: "
                "the GPU suite needs an NVIDIA GPU, and no run on one has been recorded, so every GPU target below "
                "says so. The only measurement so far is the CPU comparison (*On a CPU*). Every number here comes "
                "from a results file; none is estimated or copied from elsewhere.",
                "",
            ]
        else:
            lines += [
                "**Nothing has been measured yet.** There is no results file in `bench/results/`: the suite needs "
                "an NVIDIA GPU, and no run on one has been recorded. Every number that appears here will come from "
                "such a run (see *How to run*); none is estimated or copied from elsewhere.",
                "",
            ]
        lines += _targets_section(None)
        lines += _cpu_section(cpu_results)
        lines += _cases_section()
        lines += [HOW_TO_RUN, HOW_TO_RUN_CPU, METHOD]
        if cpu_results:
            lines += _all_files(all_results, cpu_results)
        return "\n".join(lines).rstrip() + "\n"

    source, results = all_results[-1]
    lines += _run_section(results, source)
    lines += _targets_section(results)
    lines += _train_section(results)
    from .first_contact import markdown_section  # the first GPU contact's tests and train.py runs, if any

    lines += markdown_section(results)
    op_lines = []
    for name in OP_SPECS:
        op_lines += _op_section(results, name)
    if op_lines:
        lines += ["## Kernels", "", "Speed-ups are the variant's median time divided into eager's / compile's "
                  "(> 1: faster). Peak MB: new memory at the peak of one call; extra MB: that minus its outputs "
                  "or gradients.", ""] + op_lines
    lines += _cpu_section(cpu_results)
    lines += _cases_section()
    lines += [HOW_TO_RUN, HOW_TO_RUN_CPU, METHOD, *_all_files(all_results, cpu_results)]
    return "\n".join(lines).rstrip() + "\n"


def _all_files(all_results, cpu_results) -> list[str]:
    gpu = [f"- `bench/results/{name}`: {r['device']}, {r.get('datetime') or r['date']}, commit "
           f"{((r.get('environment') or {}).get('git') or {}).get('commit', 'unknown')}" for name, r in all_results]
    cpu_files = [f"- `bench/results/{name}`: CPU comparison, {r['machine']['cpu_model']}, {r['datetime']}, commit "
                 f"{(r.get('git') or {}).get('commit', 'unknown')}" for name, r in cpu_results]  # fmt: skip
    return ["## All results files", "", *gpu, *cpu_files, ""]


def _cpu_section(cpu_results) -> list[str]:
    """The newest CPU comparison: both sides' tokens/s and peak RSS, the paired ratio, the CPU targets, the noise."""
    lines = ["## On a CPU: train.py --fused against a plain-PyTorch GPT", ""]
    intro = (
        "`python -m bench.cpu` runs `train.py --fused` on the CPU (where the fused ops run `fastcenter/cpu.py`: "
        "the chunked linear cross-entropy never forms the [N, V] logits) and `bench/plain_gpt.py`, a ~100-line "
        "nanoGPT-style GPT of the same architecture, init and optimizer that forms the full logits and calls "
        "`F.cross_entropy`. Each run is its own process with the same thread count and synthetic data; the two "
        "alternate, round after round, the order swapped every round. A run's tokens/s is the median of its "
        "steps after the first (warm-up); peak RSS is the whole process's (`wait4`). The speed ratio is taken "
        "per round, from two runs made back to back, which cancels slow changes in the machine's load."
    )
    if not cpu_results:
        rows = [[t, "-", NOT_MEASURED] for t in _CPU_TARGETS]
        return lines + [intro, "", "No CPU comparison has been recorded yet (see *How to run*).", "",
                        *_table(["CPU target (SPEC.md, \"Without a GPU\")", "measured", "status"], rows), ""]
    source, r = cpu_results[-1]
    s = r["summary"]
    machine = r["machine"]
    git = r.get("git") or {}
    commit = git.get("commit", "unknown") + (" (uncommitted changes)" if git.get("dirty") else "")
    memory = f", {machine['memory_bytes'] / 1e9:.0f} GB RAM" if machine.get("memory_bytes") else ""
    about = [
        ["machine", f"{machine['cpu_model']}, {machine['cpus_available']} of {machine['logical_cpus']} logical "
                    f"CPUs available{memory}"],
        ["software", f"torch {machine['torch']} ({machine['torch_cpu_capability']}), Python {machine['python']}"],
        ["commit", f"{commit}, source sha256 {git.get('source_sha256', '?')}"],
        ["date (UTC)", r["datetime"]],
        ["what ran", cpu.describe_settings(r)],
        ["results file", f"`bench/results/{source}`"],
    ]  # fmt: skip
    figures = [
        [cpu.LABELS[side], cpu._fmt_spread(s[side]["tokens_per_sec"]), cpu._fmt_spread(s[side]["peak_rss_bytes"], 1e-6),
         str(s[side]["tokens_per_sec"]["n"] if s[side]["tokens_per_sec"] else 0) + (
             f" ({s[side]['failed']} failed)" if s[side]["failed"] else "")]
        for side in cpu.SIDES
    ]  # fmt: skip
    seed = r["settings"]["shape"] == "seed"
    t = s["targets"]
    rss, speed = t["peak_rss"], t["speedup"]

    def status(met):
        if not seed:
            return f"not measured at the seed config ({r['settings']['shape']} shape)"
        return NOT_MEASURED if met is None else _status(met)

    ratio = s["speedup"]
    rss_text = "-" if rss["measured_bytes"] is None else f"{rss['measured_bytes'] / MB:,.0f} MB (largest run)"
    targets = [
        [_CPU_TARGETS[0], rss_text, status(rss["met"])],
        [_CPU_TARGETS[1], "-" if ratio is None else
         f"{ratio['median']:.2f}x (median of {ratio['n']} rounds; {ratio['min']:.2f}x-{ratio['max']:.2f}x)",
         status(speed["met"])],
    ]  # fmt: skip
    lines += [intro, ""]
    lines += _table(["", ""], about) + [""]
    lines += _table(["", "tokens/s, median [min - max]", "peak RSS MB, median [min - max]", "runs"], figures) + [""]
    lines += [f"Speed ratio train.py --fused / plain, per round: {cpu._fmt_spread(ratio, fmt='{:.2f}x')}.", ""]
    lines += _table(["CPU target (SPEC.md, \"Without a GPU\")", "measured", "status"], targets) + [""]
    lines += [f"**How noisy the machine was.** {cpu.describe_noise(r)[0].upper()}{cpu.describe_noise(r)[1:]}. "
              "(\"Other processes\" is the machine-wide busy CPU time from /proc/stat while a run lasted, minus "
              "the run's own, as a share of all the CPUs' time: other agents share this machine.)", ""]  # fmt: skip
    if len(cpu_results) > 1:
        lines += ["Earlier CPU comparisons: " + ", ".join(f"`bench/results/{name}`" for name, _ in cpu_results[:-1])
                  + " (see *All results files*).", ""]  # fmt: skip
    return lines


_CPU_TARGETS = (
    "Peak RSS of `train.py --fused` on a CPU at the seed config (batch 16 x 512): <= 3 GB",
    "tokens/s of `train.py --fused` on a CPU: >= 1.1x a plain-PyTorch GPT of the same architecture, side by side",
)


def _cases_section() -> list[str]:
    """What the suite measures (from bench/cases.py; no numbers)."""
    lines = ["## What is measured", "", "Each op at each shape, forward and forward+backward, in each variant "
             "(fastcenter = the fused kernels; eager = plain PyTorch with the same float32 math; torch = the "
             "native PyTorch op in the input dtype; compile = torch.compile of eager):", ""]
    rows = []
    for spec in OP_SPECS.values():
        shapes = "; ".join(f"{label}: {spec.shape_text(dims)}" for label, dims in spec.shapes.items())
        doc = " ".join((spec.bytes_moved.__doc__ or "").split())
        rows.append([spec.name, shapes, ", ".join(spec.variants), doc])
    lines += _table(["op", "shapes", "variants", "bytes an ideal kernel moves"], rows)
    lines += ["", f"Training step: the seed model, variants {', '.join(TRAIN_VARIANTS)}.", ""]
    return lines


def expected_markdown(results_dir=RESULTS_DIR) -> str:
    """BENCHMARKS.md as the results files in `results_dir` make it."""
    return render_markdown(load_results_dir(results_dir), load_cpu_results(results_dir))


def regenerate_markdown(results_dir=RESULTS_DIR, markdown_path=MARKDOWN_PATH) -> pathlib.Path:
    path = pathlib.Path(markdown_path)
    path.write_text(expected_markdown(results_dir))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="*", help="pytest-benchmark JSON files (--benchmark-json) of one device")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), help="where results files live")
    parser.add_argument("--markdown", default=str(MARKDOWN_PATH), help="the markdown file to regenerate")
    args = parser.parse_args(argv)
    try:
        if args.json:
            results = build_results([(str(p), load_json(p)) for p in args.json])
            written = write_results(results, args.results_dir)
            print(f"wrote {written} ({len(results['cases'])} cases measured, {len(results['skipped'])} skipped, "
                  f"{len(results['failed'])} failed)")
        markdown = regenerate_markdown(args.results_dir, args.markdown)
    except ReportError as exc:
        print(f"bench.report: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
