"""Running the study: one run through the shared training core, the leak check, and the whole plan with resume.

Outputs of a run: `runs/<run_id>.json`, written atomically when the run ends (see the package docstring).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import multiprocessing
import pathlib
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch

from .. import data
from ..files import TEMP_SUFFIX, atomic_write, atomic_write_text
from ..training import NonFiniteLossError, Trainer, preserved
from .centering import measure_mechanisms
from .ngram import update_regime
from .plan import (
    ARMS,
    LEAK_TOLERANCE,
    RUN_FORMAT,
    RunSpec,
    StudyConfig,
    build_model,
    initial_state,
    plan_runs,
    weights_digest,
)
from .records import Corpus, StudyError, check_compatible, load_corpus, load_runs, uses_legacy_digest
from .report import build_results, environment
from .stats import seed_of


@torch.no_grad()
def leak_check(model, tokens: torch.Tensor, seed: int = 0) -> dict:
    """Does a token's output depend on later tokens, or on other sequences of the batch? In eval and train mode.

    tokens: [B >= 2, T >= 2]. The future check replaces every token after position t = T // 2 - 1 and measures
    the largest logit change at positions <= t; the batch check replaces sequences 1.. and measures the largest
    change of sequence 0's logits. Replacement ids differ from the originals at every replaced position.
    Runs under whatever autocast the caller has entered.
    """
    B, T = tokens.shape
    if B < 2 or T < 2:
        raise ValueError(f"tokens must be [B >= 2, T >= 2], got {tuple(tokens.shape)}")
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, V, tokens.shape, generator=g).to(tokens.device)
    replaced = (tokens + shift) % V
    t = T // 2 - 1
    future = torch.cat([tokens[:, : t + 1], replaced[:, t + 1 :]], dim=1)
    others = torch.cat([tokens[:1], replaced[1:]], dim=0)
    result = {"t": t, "tolerance": LEAK_TOLERANCE}
    for phase, training in (("eval", False), ("train", True)):
        with preserved(model, training) as reset:
            logits = {}
            for name, idx in (("clean", tokens), ("future", future), ("others", others)):
                reset()
                logits[name] = model(idx).float()
        scale = max(1.0, float(logits["clean"].abs().max()))
        future_change = float((logits["future"][:, : t + 1] - logits["clean"][:, : t + 1]).abs().max())
        batch_change = float((logits["others"][0] - logits["clean"][0]).abs().max())
        result[phase] = {
            "future_change": future_change,
            "batch_change": batch_change,
            "logit_scale": scale,
            "future_leak": future_change > LEAK_TOLERANCE * scale,
            "batch_leak": batch_change > LEAK_TOLERANCE * scale,
        }
        result[phase]["leak"] = result[phase]["future_leak"] or result[phase]["batch_leak"]
    return result


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def train_run(
    spec: RunSpec,
    cfg: StudyConfig,
    corpus: Corpus,
    device: torch.device,
    *,
    base_state: dict | None = None,
    log: Callable[[str], None] = print,
    prefix: str = "",
) -> dict:
    """Train one (seed, arm, mode) run with the training core and evaluate it; returns its record.

    At every evaluation point it also measures the mechanisms (`measure_mechanisms`), and it keeps the global
    gradient norm before clipping of every step.
    """
    t_start = time.perf_counter()
    model = build_model(cfg, spec, base_state)
    base_keys = list(base_state) if base_state is not None else list(initial_state(cfg, spec.seed))
    init_digest = weights_digest(model, base_keys)
    run_cfg = cfg.run_config(spec.seed, device)
    iters, log_interval = run_cfg.max_iters, run_cfg.log_interval
    trainer = Trainer(
        model.train(), run_cfg, train_tokens=corpus.train, val_tokens=corpus.val, device=device, digest_batches=True
    )
    probe_windows = data.gather_windows(corpus.val, trainer.val_positions[: run_cfg.batch_size], run_cfg.seq_len)
    probe = data.to_inputs_targets(probe_windows, device)
    eval_steps = set(cfg.eval_steps)
    step_losses, grad_norms = [], []  # device tensors: the loop syncs only at log and eval steps
    curve = {"step": [], "val_loss": []}
    mechanisms = {"step": [], "modules": {}}
    diverged_at, t_train = None, 0.0
    try:
        for report in trainer.run(is_eval_step=eval_steps.__contains__):
            step_losses.append(report.loss)
            if report.grad_norm is not None:
                grad_norms.append(report.grad_norm)
            row = report.row
            if row is None:
                continue
            t_train = row["elapsed_s"]
            if "val_loss" in row:
                curve["step"].append(report.step)
                curve["val_loss"].append(row["val_loss"])
                mechanisms["step"].append(report.step)
                with trainer.precision.autocast():
                    for name, stats in measure_mechanisms(model, *probe).items():
                        for key, value in stats.items():
                            mechanisms["modules"].setdefault(name, {}).setdefault(key, []).append(value)
            if report.step % log_interval == 0 or report.step == iters:
                val = f" | val {row['val_loss']:.4f}" if "val_loss" in row else ""
                log(
                    f"{prefix}step {report.step}/{iters} | loss {row['loss']:.4f}{val} | lr {row['lr']:.2e} | "
                    f"grad norm {row['grad_norm']:.3g} | {t_train / report.step:.2f} s/step"
                )
    except NonFiniteLossError as e:
        diverged_at = e.step
        log(f"{prefix}{e}: the run diverged; stopping it")

    train_losses = [float(v) for v in torch.stack(step_losses).tolist()]
    curve["val_loss"] = [v if math.isfinite(v) else None for v in curve["val_loss"]]
    record = {
        "format": RUN_FORMAT,
        "run_id": spec.run_id,
        "seed": spec.seed,
        "arm": spec.arm,
        "mode": spec.mode,
        "placements": list(ARMS[spec.arm]),
        "config": cfg.result_fields(),
        "configs": {"model": model.config.to_dict(), "train": dataclasses.asdict(run_cfg)},
        "data_digest": corpus.digest,
        "data_identity": corpus.identity,
        "device": device.type,
        "ops": ops_name(device, cfg.model.fused),
        "autocast": trainer.precision.name,
        "parameters": model.num_params(),
        "environment": environment(),
        "init_digest": init_digest,
        "batches_digest": trainer.batches_digest.hexdigest(),
        "steps_done": len(train_losses),
        "diverged_at": diverged_at,
        "train_loss_per_step": [round(v, 5) if math.isfinite(v) else None for v in train_losses],
        "grad_norm_per_step": [round(float(v), 5) for v in torch.stack(grad_norms).tolist()] if grad_norms else [],
        "curve": curve,
        "mechanisms": mechanisms,
    }
    t_eval = time.perf_counter()
    if diverged_at is None:
        tail = train_losses[-max(1, iters // 10) :]
        record["final"] = {
            "val_loss": curve["val_loss"][-1],
            "val_loss_train_mode": trainer.evaluate(training=True),
            "train_loss_last10pct": sum(tail) / len(tail),
        }
        with trainer.precision.autocast():
            record["leak"] = leak_check(model, probe[0][: cfg.leak_batch], seed=spec.seed)
    else:
        record["final"] = {"val_loss": None, "val_loss_train_mode": None, "train_loss_last10pct": None}
        record["leak"] = None
    now = time.perf_counter()
    record["timing"] = {
        "train_s": t_train,
        "final_eval_s": now - t_eval,
        "wall_s": now - t_start,
        "s_per_step": t_train / max(1, len(train_losses)),
    }
    record["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return record


def ops_name(device: torch.device, fused: bool) -> str:
    if not fused:
        return "reference"
    return "triton" if device.type == "cuda" else "cpu"


def regime_of_study(out_dir: pathlib.Path, data_dir, log: Callable[[str], None] = print) -> dict:
    """OUT/ngrams.json for the planned seeds of a study, from its data (`--report-only --data DIR`)."""
    runs = load_runs(out_dir)
    if not runs:
        raise StudyError(f"no finished runs under {out_dir}/runs")
    config, digest = runs[0]["config"], runs[0]["data_digest"]
    corpus = load_corpus(data_dir, config["vocab_size"], config["seq_len"], legacy=uses_legacy_digest(runs))
    if corpus.digest != digest:
        raise StudyError(f"{data_dir} is not the data the runs under {out_dir} trained on (another digest)")
    plan_path = out_dir / "plan.json"
    planned = json.loads(plan_path.read_text())["runs"] if plan_path.exists() else [r["run_id"] for r in runs]
    seeds = sorted({seed_of(run_id) for run_id in planned})
    return update_regime(out_dir, corpus.train, corpus.val, config, digest, seeds, log)


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def run_study(
    cfg: StudyConfig,
    data_dir,
    out_dir,
    *,
    workers: int = 1,
    threads: int | None = None,
    time_budget_s: float | None = None,
    regime: bool = True,
    bundle=None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run every planned run not already finished under out_dir/runs, then rebuild the results.

    workers > 1 runs that many runs at once in separate processes with `threads` torch threads each (default
    1): on a CPU, two single-thread processes do far more work than one two-thread process at these sizes.
    Each run writes its record when it ends, so an interruption loses at most the runs in progress.
    time_budget_s: start no run that would end past this many seconds after the call, judged by the longest run
    of this session so far (none before the first); the runs left wait for the next session, which the same
    call resumes (one worker only). regime=False: leave the n-gram baselines for later (`--report-only --data`).
    bundle: a .tar.gz path, rewritten with the whole study directory after every finished run and at the end
    (`write_bundle`): one file that a GPU lease brings back, complete whenever the session is cut off.
    """
    t_call = time.perf_counter()
    out_dir = pathlib.Path(out_dir)
    if time_budget_s is not None and (workers > 1 or not time_budget_s > 0):
        raise StudyError(f"--time-budget must be a number of seconds > 0, with --workers 1; got {time_budget_s}")
    try:
        device = resolve_device(cfg.train.device)
    except ValueError as e:
        raise StudyError(str(e)) from e
    if workers < 1:
        raise StudyError(f"--workers must be >= 1, got {workers}")
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    finished = {r["run_id"]: r for r in load_runs(out_dir)}
    legacy = uses_legacy_digest(list(finished.values()))  # a directory begun before records held the identity
    corpus = load_corpus(data_dir, cfg.model.vocab_size, cfg.train.seq_len, legacy=legacy)
    check_compatible(list(finished.values()), cfg.result_fields(), corpus.digest, out_dir)
    plan = plan_runs(cfg)
    atomic_write_text(
        out_dir / "plan.json",
        json.dumps({"runs": [spec.run_id for spec in plan], "config": cfg.result_fields()}, indent=1) + "\n",
    )
    todo = [spec for spec in plan if spec.run_id not in finished]
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    parallel = workers > 1 and len(todo) > 1
    log(
        f"centering study: {len(plan)} runs ({cfg.seeds} seeds x [baseline + {len(cfg.cells)} arm/mode pairs]), "
        f"{len(plan) - len(todo)} already finished in {out_dir / 'runs'}; {cfg.train.max_iters} steps of "
        f"{cfg.train.tokens_per_step:,} tokens; data {corpus.data_dir} ({len(corpus.train):,} train / "
        f"{len(corpus.val):,} val tokens, vocabulary {cfg.model.vocab_size:,}); {device.type}, "
        f"{ops_name(device, cfg.model.fused)} ops ({'bf16 autocast' if device.type == 'cuda' else 'float32'}), "
        + (
            f"{workers} worker processes x {threads or 1} thread(s)"
            if parallel
            else f"{torch.get_num_threads()} threads"
        )
    )
    log(f"finished: {', '.join(s.run_id for s in plan if s.run_id in finished) or 'none'}")
    log(f"to run: {', '.join(s.run_id for s in todo) or 'none'}")
    if regime:
        update_regime(out_dir, corpus.train, corpus.val, cfg.result_fields(), corpus.digest, cfg.seed_list, log)
    session = {
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "runs_planned": len(plan),
        "runs_to_do": len(todo),
        "runs_done": 0,
        "workers": workers if parallel else 1,
    }
    t0 = time.perf_counter()

    def finished_one(spec: RunSpec, record: dict) -> None:
        session["runs_done"] += 1
        done = session["runs_done"]
        elapsed = time.perf_counter() - t0
        final, leak = record["final"], record["leak"]
        leak_text = (
            "-"
            if leak is None
            else (f"eval {'YES' if leak['eval']['leak'] else 'no'} / train {'YES' if leak['train']['leak'] else 'no'}")
        )
        result = (
            "DIVERGED"
            if final["val_loss"] is None
            else (f"val {final['val_loss']:.4f} (train mode {final['val_loss_train_mode']:.4f})")
        )
        log(
            f"{_prefix(spec, plan)}done: {result}, leak {leak_text}, {record['timing']['wall_s']:.0f} s; "
            f"{done}/{len(todo)} this session, elapsed {_format_seconds(elapsed)}, "
            f"ETA {_format_seconds(elapsed / done * (len(todo) - done))}"
        )
        build_results(out_dir, log, plots=False)  # partial results stay current
        if bundle is not None:
            write_bundle(out_dir, bundle)

    try:
        if parallel:
            context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
            with ProcessPoolExecutor(
                workers, mp_context=context, initializer=_worker_init, initargs=(threads or 1,)
            ) as pool:
                futures = {
                    pool.submit(
                        _run_and_save, spec, cfg, str(data_dir), str(out_dir), legacy, _prefix(spec, plan)
                    ): spec
                    for spec in todo
                }
                try:
                    for future in as_completed(futures):
                        finished_one(futures[future], future.result())
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
        else:
            base_states: dict[int, dict] = {}
            longest = 0.0  # the longest run of this session, seconds
            for spec in todo:
                if time_budget_s is not None and time.perf_counter() - t_call + longest > time_budget_s:
                    left = len(todo) - session["runs_done"]
                    session["stopped_by_time_budget"] = left
                    log(
                        f"time budget of {time_budget_s:g} s: {left} run(s) left for the next session "
                        "(the same command resumes)"
                    )
                    break
                started = time.perf_counter()
                if spec.seed not in base_states:
                    base_states = {spec.seed: initial_state(cfg, spec.seed)}  # one seed at a time in memory
                record = train_run(
                    spec, cfg, corpus, device, base_state=base_states[spec.seed], log=log, prefix=_prefix(spec, plan)
                )
                atomic_write_text(out_dir / "runs" / f"{spec.run_id}.json", json.dumps(record) + "\n")
                finished_one(spec, record)
                longest = max(longest, time.perf_counter() - started)
    finally:
        session["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        session["wall_s"] = time.perf_counter() - t0
        with open(out_dir / "sessions.jsonl", "a") as f:
            f.write(json.dumps(session) + "\n")
    results = build_results(out_dir, log)
    log(f"wrote {out_dir / 'results.json'}, results.md and the plots")
    if bundle is not None:
        write_bundle(out_dir, bundle)
        log(f"wrote {bundle}")
    return results


def write_bundle(out_dir: pathlib.Path, path) -> None:
    """The study directory as one .tar.gz at `path`, written atomically (the bundle itself and temp files left out).

    Unpacked into the parent of a study directory of the same name, it resumes there."""
    out_dir, path = pathlib.Path(out_dir), pathlib.Path(path).resolve()

    def keep(info: tarfile.TarInfo):
        name = pathlib.Path(info.name).name
        left_out = name.endswith(TEMP_SUFFIX) or (out_dir.parent / info.name).resolve() == path
        return None if left_out else info

    def write(f) -> None:
        with tarfile.open(fileobj=f, mode="w:gz") as tar:
            tar.add(out_dir, arcname=out_dir.name, filter=keep)

    atomic_write(path, write)


def _prefix(spec: RunSpec, plan: list[RunSpec]) -> str:
    return f"[run {plan.index(spec) + 1}/{len(plan)}] seed {spec.seed} {spec.arm} {spec.mode}: "


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_and_save(spec: RunSpec, cfg: StudyConfig, data_dir: str, out_dir: str, legacy: bool, prefix: str) -> dict:
    """One run in a worker process: everything from the plan and the data, the record written when done (naming
    the data by the legacy digest where the study directory does)."""
    device = resolve_device(cfg.train.device)
    corpus = load_corpus(data_dir, cfg.model.vocab_size, cfg.train.seq_len, legacy=legacy)
    record = train_run(
        spec,
        cfg,
        corpus,
        device,
        base_state=initial_state(cfg, spec.seed),
        log=lambda line: print(line, flush=True),
        prefix=prefix,
    )
    atomic_write_text(pathlib.Path(out_dir) / "runs" / f"{spec.run_id}.json", json.dumps(record) + "\n")
    return record


def prepare_text_corpus(sources: list[str], out_dir: pathlib.Path, log: Callable[[str], None] = print) -> pathlib.Path:
    """Tokenize text files into out_dir/data once (reused when its meta.json lists the same sources)."""
    data_dir = out_dir / "data"
    sources = [str(pathlib.Path(s).resolve()) for s in sources]
    meta_path = data_dir / "meta.json"
    if meta_path.is_file() and (data_dir / "train.bin").is_file() and (data_dir / "val.bin").is_file():
        if json.loads(meta_path.read_text()).get("sources") == sources:
            log(f"data: reusing {data_dir} (prepared from {', '.join(sources)})")
            return data_dir
    log(f"data: tokenizing {', '.join(sources)} with GPT-2 BPE into {data_dir}")
    data.prepare(sources, data_dir, log=log)
    return data_dir
