"""The study's outputs: results.json, results.md and the plots, rebuilt from the finished runs."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
from typing import Callable, Optional

import numpy as np

from ..environment import collect as collect_environment
from ..files import atomic_write, atomic_write_text
from .plan import ARMS, BASELINE_MODE, LEAK_TOLERANCE, MODE_ORDER, SEED_BASELINE_LOSS, SEED_CLAIMS
from .stats import ANALYSIS, claim_verdicts, complete_seeds, contrasts, group_summaries, steps_to_baseline

RESULTS_FORMAT = "fastcenter.experiments.centering.results/2"


def environment() -> dict:
    """Where the runs ran (fastcenter.environment), with the study's names for the device and the commit."""
    env = collect_environment()
    cuda_device = None if env["device"]["name"] == "cpu" else env["device"]["name"]
    return {**env, "cuda_device": cuda_device, "git_commit": env["git"]["commit"]}


def _fmt(x, digits=4, sign=False) -> str:
    if x is None:
        return "-"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _mean_sd(s: dict, digits=4) -> str:
    if s is None or s.get("mean") is None:
        return "-"
    return _fmt(s["mean"], digits) if s.get("sd") is None else f"{_fmt(s['mean'], digits)} ± {_fmt(s['sd'], digits)}"


def mechanism_summary(runs: list[dict], seeds: list[int]) -> list[dict]:
    """Per (arm, mode, kind of module): at the last evaluation point, mean over seeds (and max over the modules
    of that kind) of running_mean / stream_rms and mean_after / stream_rms; and the largest gradient norm."""
    out = {}
    for r in runs:
        mech = r.get("mechanisms") or {}
        if r["seed"] not in seeds or not mech.get("modules"):
            continue
        for name, stats in mech["modules"].items():
            kind = _module_kind(name)
            rms = stats["stream_rms"][-1] or float("nan")
            cell = out.setdefault((r["arm"], r["mode"], kind), {"running": [], "after": [], "before": []})
            cell["running"].append(stats["running_mean"][-1] / rms)
            cell["after"].append(stats["mean_after"][-1] / rms)
            cell["before"].append(stats["mean_before"][-1] / rms)
    rows = []
    for (arm, mode, kind), cell in out.items():
        rows.append({"arm": arm, "mode": mode, "module": kind, "n": len(cell["running"]),
                     "running_mean_over_rms": max(cell["running"]), "mean_after_over_rms": max(cell["after"]),
                     "mean_before_over_rms": max(cell["before"])})  # fmt: skip
    grad = {}
    for r in runs:
        if r["seed"] in seeds and r.get("grad_norm_per_step"):
            grad.setdefault((r["arm"], r["mode"]), []).append(max(r["grad_norm_per_step"]))
    for row in rows:
        row["max_grad_norm"] = max(grad.get((row["arm"], row["mode"]), [float("nan")]))
    order = {a: i for i, a in enumerate(ARMS)}
    rows.sort(key=lambda r: (MODE_ORDER.index(r["mode"]) if r["mode"] in MODE_ORDER else 99, order.get(r["arm"], 99), r["module"]))
    return rows


def _module_kind(name: str) -> str:
    """'blocks.3.residual_center' -> 'residual_center (block 3)'; 'emb_center' stays."""
    parts = name.split(".")
    return f"{parts[-1]} (block {parts[1]})" if parts[0] == "blocks" else name


def write_markdown(results: dict, path: pathlib.Path) -> None:
    cfg, runs = results["config"], results["runs"]
    seeds, planned = results["complete_seeds"], results["planned_seeds"]
    wall = sum(r["timing"]["wall_s"] for r in runs)
    complete = len(seeds) == len(planned) and results["planned_runs"] == len(runs)
    env = results["environment"]
    lines = [
        "# Centering study",
        "",
        f"{len(runs)} of {results['planned_runs']} planned runs finished; {len(seeds)} of {len(planned)} paired seeds "
        f"complete ({', '.join(map(str, seeds)) or 'none'}). Model dim {cfg['dim']}, {cfg['n_layers']} layers, "
        f"{cfg['n_heads']} heads, vocabulary {cfg['vocab_size']:,}, {runs[0]['parameters']:,} parameters (baseline); "
        f"{cfg['iters']} steps of {cfg['batch_size']} x {cfg['grad_accum_steps']} windows of {cfg['seq_len']} tokens "
        f"({cfg['iters'] * cfg['batch_size'] * cfg['grad_accum_steps'] * cfg['seq_len']:,} training tokens per run); "
        f"AdamW lr {cfg['lr']:g} (warmup {cfg['warmup_iters']}, cosine to {cfg['lr'] * cfg['min_lr_ratio']:g}), "
        f"weight decay {cfg['weight_decay']:g}, clip {cfg['grad_clip']:g}; validation on "
        f"{cfg['eval_batches'] * cfg['batch_size']} fixed windows "
        f"({cfg['eval_batches'] * cfg['batch_size'] * cfg['seq_len']:,} tokens) at steps {', '.join(map(str, runs[0]['curve']['step'] or ['-']))}. "
        f"Ops: {', '.join(sorted({r.get('ops', '?') for r in runs}))}; device {env.get('cuda_device') or env.get('cpu')}, "
        f"torch {env.get('torch')}; sum of run wall times {wall / 3600:.2f} h.",
        "",
    ]
    if not complete:
        lines += ["**PRELIMINARY: not every planned run has finished. The tables show the complete seeds only; "
                  "no verdict is given until every planned seed is complete.**", ""]
    lines += ["## The analysis (fixed before the runs)", "", "```text", ANALYSIS.strip(), "```", ""]
    lines += [
        "## Final validation loss",
        "",
        "Eval mode (running statistics) on the fixed windows; train mode beside it (batch statistics, buffers "
        "reset per batch). Mean ± SD over the complete seeds, nats.",
        "",
        "| arm | mode | n | val loss (eval mode) | val loss (train mode) | diverged | s / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in results["groups"]:
        lines.append(f"| {g['arm']} | {g['mode']} | {g['n']} | {_mean_sd(g['val_loss'])} | "
                     f"{_mean_sd(g['val_loss_train_mode'])} | {', '.join(map(str, g['diverged'])) or '-'} | "
                     f"{g['s_per_step']:.2f} |")  # fmt: skip
    lines += [
        "",
        "## Contrasts (paired by seed; d < 0: the first is better)",
        "",
        "| contrast | n | d (nats) | 95% CI | % of baseline | t | p | p (Holm) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = results["baseline_mean"]
    for c in results["contrasts"]:
        ci = "-" if c["ci95"] is None else f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"
        pct = "-" if c["mean"] is None or not base else f"{-100 * c['mean'] / base:+.2f}%"
        sig = " **" if c["significant"] else ""
        lines.append(f"| {c['label']}{sig} | {c['n']} | {_fmt(c['mean'], 4, True)} | {ci} | {pct} | "
                     f"{_fmt(c['t'], 2, True)} | {_fmt(c['p'], 4)} | {_fmt(c['p_holm'], 4)} |")  # fmt: skip
    lines += ["", "** = significant at 5% familywise (Holm). % of baseline: the improvement as the seed reports "
              "it (positive = better).", ""]
    lines += [
        "## The seed's claims",
        "",
        f"The seed's numbers are for its model after 1000 iterations (baseline {SEED_BASELINE_LOSS}); a claimed "
        f"percentage is taken as the same share of this study's baseline loss ({_fmt(base, 4)} nats).",
        "",
        "| claim | mode | claimed | verdict | evidence |",
        "|---|---|---|---|---|",
    ]
    for v in results["verdicts"]:
        claimed = "-" if v["claimed_pct"] is None else f"{v['claimed_pct']:+.2f}%" + (
            "" if v["claimed_nats"] is None else f" ({v['claimed_nats']:+.4f} nats)")
        verdict = v["verdict"] if complete or v["verdict"] == "not tested" else "pending"
        lines.append(f"| {v['text']} | {v['mode']} | {claimed} | **{verdict}** | {v['why']} |")
    lines += [
        "",
        "## Secondary: steps to reach the baseline's final loss",
        "",
        "First evaluation step at which a run's eval-mode loss is at or below the same seed's final baseline loss "
        "(descriptive; evaluation points only).",
        "",
        "| arm | mode | reached (seeds) | median step | per seed |",
        "|---|---|---|---|---|",
    ]
    for s in results["steps_to_baseline"]:
        per_seed = ", ".join(f"{k}: {v if v is not None else 'no'}" for k, v in sorted(s["per_seed"].items()))
        lines.append(f"| {s['arm']} | {s['mode']} | {s['reached']}/{s['n']} | {_fmt(s['median_step'], 0)} | {per_seed} |")
    lines += [
        "",
        "## Mechanisms",
        "",
        "Measured at every evaluation point on one validation batch in training mode (what training sees), the "
        "model left unchanged; here at the last point, the largest over the modules of a kind and over seeds. "
        "All are L2 norms of D-vectors over the stream's RMS norm per token: `running mean` is the module's "
        "running mean, `mean before` / `mean after` the mean over the batch of what enters the module before and "
        "after its centre is subtracted. `max grad norm`: the largest global gradient norm before clipping over "
        "the run. mechanisms.png shows them along training.",
        "",
        "| arm | mode | module | running mean / rms | mean before / rms | mean after / rms | max grad norm |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in results["mechanisms"]:
        lines.append(f"| {m['arm']} | {m['mode']} | {m['module']} | {m['running_mean_over_rms']:.3f} | "
                     f"{m['mean_before_over_rms']:.3f} | {m['mean_after_over_rms']:.3f} | {m['max_grad_norm']:.3g} |")  # fmt: skip
    lines += [
        "",
        "## Leak check",
        "",
        f"On one validation batch of each trained model: tokens after position t replaced (future), or the other "
        f"sequences replaced (batch); largest change of the logits that must not depend on them, max over seeds. "
        f"Leak = change > {LEAK_TOLERANCE:g} x max|logits|.",
        "",
        "| arm | mode | eval: leak | eval: future / batch change | train: leak | train: future / batch change |",
        "|---|---|---|---|---|---|",
    ]
    for (arm, mode), leaks in _leaks(runs, seeds).items():
        cells = []
        for phase in ("eval", "train"):
            cells += ["**yes**" if any(lk[phase]["leak"] for lk in leaks) else "no",
                      f"{max(lk[phase]['future_change'] for lk in leaks):.2g} / "
                      f"{max(lk[phase]['batch_change'] for lk in leaks):.2g}"]  # fmt: skip
        lines.append(f"| {arm} | {mode} | " + " | ".join(cells) + " |")
    lines.append("")
    atomic_write_text(path, "\n".join(lines))


def _leaks(runs: list[dict], seeds: list[int]) -> dict:
    out = {}
    for r in runs:
        if r["seed"] in seeds and r["leak"] is not None:
            out.setdefault((r["arm"], r["mode"]), []).append(r["leak"])
    return out


def _arm_colors(arms: list[str]) -> dict:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {arm: cmap(i % 10) for i, arm in enumerate(arms)}


def plot_results(results: dict, out_dir: pathlib.Path) -> Optional[str]:
    """loss_curves.png, contrasts.png and mechanisms.png; returns a note instead if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plots skipped (pip install matplotlib)"
    runs = results["runs"]
    modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in runs)]
    arms = [a for a in ARMS if any(r["arm"] == a for r in runs)]
    colors = _arm_colors(arms)

    def mean_curve(arm, mode):
        curves = [r["curve"] for r in runs if r["arm"] == arm and r["mode"] == mode and r["diverged_at"] is None]
        if not curves:
            return None, None
        steps = curves[0]["step"]
        curves = [c for c in curves if c["step"] == steps]
        return steps, np.mean([c["val_loss"] for c in curves], axis=0)

    def paired_curve(arm, mode):
        base = {r["seed"]: r["curve"] for r in runs if r["arm"] == "baseline" and r["diverged_at"] is None}
        diffs = [np.array(r["curve"]["val_loss"]) - np.array(base[r["seed"]]["val_loss"])
                 for r in runs if r["arm"] == arm and r["mode"] == mode and r["diverged_at"] is None
                 and r["seed"] in base and r["curve"]["step"] == base[r["seed"]]["step"]]
        if not diffs:
            return None, None
        steps = next(r["curve"]["step"] for r in runs if r["arm"] == arm and r["mode"] == mode)
        return steps, np.mean(diffs, axis=0)

    ncols = max(1, len(modes))
    fig, axes = plt.subplots(2, ncols, figsize=(5 * ncols, 8), squeeze=False, sharex=True)
    for j, mode in enumerate(modes or [BASELINE_MODE]):
        top, bottom = axes[0][j], axes[1][j]
        steps, base_curve = mean_curve("baseline", BASELINE_MODE)
        if steps is not None:
            top.plot(steps, base_curve, "k-o", label="baseline", markersize=3, linewidth=2)
        bottom.axhline(0.0, color="k", linewidth=1)
        for arm in arms:
            if arm == "baseline":
                continue
            steps, curve = mean_curve(arm, mode)
            if steps is not None:
                top.plot(steps, curve, "-o", color=colors[arm], label=arm, markersize=3, linewidth=1)
            steps, diff = paired_curve(arm, mode)
            if steps is not None:
                bottom.plot(steps, diff, "-o", color=colors[arm], label=arm, markersize=3, linewidth=1)
        top.set(title=f"mode: {mode}", ylabel="val loss, eval mode (mean over seeds)")
        bottom.set(xlabel="step", ylabel="arm - baseline (paired mean; < 0 = better)")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        top.legend(fontsize=8)
    fig.suptitle("Centering study: validation loss along training")
    fig.tight_layout()
    _save_figure(fig, out_dir / "loss_curves.png")
    plt.close(fig)

    _plot_contrasts(results, out_dir, plt)
    _plot_mechanisms(results, out_dir, plt, colors)
    return None


def _plot_contrasts(results: dict, out_dir: pathlib.Path, plt) -> None:
    """contrasts.png: every arm-vs-baseline contrast with its 95% t-interval (Holm-significant ones filled)."""
    family = [c for c in results["contrasts"] if c["kind"] == "arm" and c["ci95"] is not None]
    if not family:
        return
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(family) + 1.5))
    for i, c in enumerate(family):
        ax.plot(c["ci95"], [i, i], "k-", linewidth=1.5)
        ax.plot([c["mean"]], [i], "o", color="k", markerfacecolor="k" if c["significant"] else "white", markersize=7)
    ax.axvline(0.0, color="grey", linewidth=1)
    ax.set_yticks(range(len(family)), [c["label"] for c in family])
    ax.invert_yaxis()
    ax.set(xlabel="d = arm - baseline, final eval-mode val loss (nats; < 0 = better)",
           title="Paired contrasts with 95% t-intervals (filled: significant after Holm)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, out_dir / "contrasts.png")
    plt.close(fig)


def _plot_mechanisms(results: dict, out_dir: pathlib.Path, plt, colors: dict) -> None:
    """mechanisms.png: per mode, mean_after / rms and running_mean / rms of the residual and embedding modules
    along training (mean over seeds, max over blocks), and the gradient norm before clipping."""
    runs = [r for r in results["runs"] if r.get("mechanisms") and r["seed"] in results["complete_seeds"]]
    modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in runs)]
    if not modes:
        return
    fig, axes = plt.subplots(3, len(modes), figsize=(5.5 * len(modes), 11), squeeze=False)
    for j, mode in enumerate(modes):
        for arm in [a for a in ARMS if any(r["arm"] == a and r["mode"] == mode for r in runs)]:
            mine = [r for r in runs if r["arm"] == arm and r["mode"] == mode]
            steps = mine[0]["mechanisms"]["step"]
            for row, key in ((0, "mean_after"), (1, "running_mean")):
                per_seed = []
                for r in mine:
                    mods = r["mechanisms"]["modules"].values()
                    per_seed.append(np.max([np.array(m[key]) / np.array(m["stream_rms"]) for m in mods], axis=0))
                axes[row][j].plot(steps, np.mean(per_seed, axis=0), "-o", color=colors.get(arm), markersize=3,
                                  label=arm)  # fmt: skip
            grads = [np.array(r["grad_norm_per_step"]) for r in mine if r["grad_norm_per_step"]]
            if grads:
                g = np.mean([x[: min(map(len, grads))] for x in grads], axis=0)
                k = max(1, len(g) // 50)
                axes[2][j].plot(np.arange(1, len(g) + 1)[k - 1 :: k], np.convolve(g, np.ones(k) / k, "valid")[::k],
                                color=colors.get(arm), label=arm)  # fmt: skip
        axes[0][j].set(title=f"mode: {mode}", ylabel="|mean after centering| / stream rms")
        axes[1][j].set(ylabel="|running mean| / stream rms", yscale="log")
        axes[2][j].set(xlabel="step", ylabel="grad norm before clipping (mean over seeds)", yscale="log")
        for row in range(3):
            axes[row][j].grid(alpha=0.3)
        axes[0][j].legend(fontsize=8)
    fig.suptitle("Centering study: what the centering modules do along training")
    fig.tight_layout()
    _save_figure(fig, out_dir / "mechanisms.png")
    plt.close(fig)


def _save_figure(fig, path: pathlib.Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))


def build_results(out_dir: pathlib.Path, log: Callable[[str], None] = print, plots: bool = True) -> dict:
    """Rebuild results.json, results.md (and the plots) from every finished run under out_dir/runs."""
    from .run import StudyError, check_compatible, load_runs

    runs = load_runs(out_dir)
    if not runs:
        raise StudyError(f"no finished runs under {out_dir}/runs")
    check_compatible(runs, runs[0]["config"], runs[0]["data_digest"], out_dir)
    plan_path = out_dir / "plan.json"
    planned = json.loads(plan_path.read_text())["runs"] if plan_path.exists() else [r["run_id"] for r in runs]
    seeds = complete_seeds(runs, planned)
    modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in runs)]
    family = contrasts(runs, seeds)
    base = [r["final"]["val_loss"] for r in runs if r["arm"] == "baseline" and r["seed"] in seeds
            and r["final"]["val_loss"] is not None]  # fmt: skip
    baseline_mean = statistics.fmean(base) if base else None
    sessions_path = out_dir / "sessions.jsonl"
    sessions = [json.loads(line) for line in sessions_path.read_text().splitlines() if line.strip()] if sessions_path.exists() else []
    results = {
        "format": RESULTS_FORMAT,
        "config": runs[0]["config"],
        "data_digest": runs[0]["data_digest"],
        "environment": runs[0]["environment"],  # where the runs ran (each run record holds its own)
        "environments_differ": any(r["environment"] != runs[0]["environment"] for r in runs),
        "sessions": sessions,
        "planned_runs": len(planned),
        "planned_seeds": sorted({int(run_id.split("-")[0][1:]) for run_id in planned}),
        "complete_seeds": seeds,
        "wall_s_sum_of_runs": sum(r["timing"]["wall_s"] for r in runs),
        "analysis": ANALYSIS,
        "claims": [dataclasses.asdict(c) for c in SEED_CLAIMS],
        "baseline_mean": baseline_mean,
        "groups": group_summaries(runs, seeds),
        "contrasts": family,
        "verdicts": claim_verdicts(family, baseline_mean, modes),
        "steps_to_baseline": steps_to_baseline(runs, seeds),
        "mechanisms": mechanism_summary(runs, seeds),
        "runs": sorted(runs, key=lambda r: (r["seed"], r["arm"], r["mode"])),
    }
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1) + "\n")
    write_markdown(results, out_dir / "results.md")
    if plots:
        note = plot_results(results, out_dir)
        if note:
            log(note)
    return results
