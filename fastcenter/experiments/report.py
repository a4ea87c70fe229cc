"""The study's outputs: results.json, results.md and the plots, rebuilt from the finished runs (and, for the
regime, from OUT/ngrams.json: fastcenter/experiments/ngram.py)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
import subprocess
from collections.abc import Callable

import numpy as np

from ..environment import collect as collect_environment
from ..files import atomic_write, atomic_write_text
from .ngram import ORDERS, load_regime
from .plan import ARMS, BASELINE_MODE, CLAIMED_BASELINE_LOSS, CLAIMS, LEAK_TOLERANCE, MODE_ORDER, scale_differences
from .records import StudyError, check_compatible, load_runs
from .stats import (
    ANALYSIS,
    claim_verdicts,
    complete_seeds,
    contrasts,
    group_summaries,
    leak_control,
    mechanism_summary,
    paired_curves,
    seed_of,
    spread,
    steps_to_baseline,
)

RESULTS_FORMAT = "fastcenter.experiments.centering.results/3"


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


def _fmt_spread(s: dict | None, digits=3) -> str:
    """'median [min, max]' over seeds (one value alone when there is one seed)."""
    if s is None:
        return "-"
    g = lambda x: f"{x:.{digits}g}" if abs(x) >= 1000 else f"{x:.{digits}f}"
    return g(s["median"]) if s["n"] == 1 else f"{g(s['median'])} [{g(s['min'])}, {g(s['max'])}]"


def _ci(interval, digits=4) -> str:
    return "-" if interval is None else f"[{interval[0]:+.{digits}f}, {interval[1]:+.{digits}f}]"


def _module_kind(name: str) -> str:
    """'blocks.3.residual_center' -> 'residual_center (block 3)'; 'emb_center' stays."""
    parts = name.split(".")
    return f"{parts[-1]} (block {parts[1]})" if parts[0] == "blocks" else name


def _commit_note(commits: list[str]) -> str:
    """The commit(s) the runs recorded, and whether this checkout's history holds them."""
    if not commits:
        return "the runs recorded no commit"
    root = pathlib.Path(__file__).resolve().parents[2]
    notes = []
    for commit in commits:
        try:
            probe = ["git", "-C", str(root), "cat-file", "-e", f"{commit}^{{commit}}"]
            missing = subprocess.run(probe, capture_output=True, timeout=10, check=False).returncode != 0
        except (OSError, subprocess.SubprocessError):
            missing = False  # no git here: nothing to say
        notes.append(commit[:7] + (" (not in this repository's history)" if missing else ""))
    return "the runs recorded commit " + ", ".join(notes)


def regime_summary(regime: dict | None, runs: list[dict], seeds: list[int]) -> dict | None:
    """The n-gram losses of OUT/ngrams.json for the complete seeds: at the end of the runs (median and range over
    the seeds) and at every evaluation step (mean over the seeds), and whether the recomputed windows are the
    runs' (their batches_digest)."""
    if regime is None:
        return None
    have = [s for s in seeds if str(s) in regime["seeds"]]
    per_seed = [regime["seeds"][str(s)] for s in have]
    recorded = {r["seed"]: r["batches_digest"] for r in runs}
    steps = per_seed[0]["step"] if per_seed else []
    return {
        "method": regime["method"],
        "split": regime["split"],
        "validation": regime.get("validation"),
        "seeds": have,
        "targets_per_run": per_seed[0]["targets"] if per_seed else None,
        "batches_digest_match": all(regime["seeds"][str(s)]["batches_digest"] == recorded.get(s) for s in have),
        "run_tokens": {name: spread([p[name][-1] for p in per_seed]) for name in ORDERS} if per_seed else None,
        "step": steps,
        "by_step": {
            name: [statistics.fmean(p[name][i] for p in per_seed) for i in range(len(steps))] for name in ORDERS
        },
    }


def write_markdown(results: dict, path: pathlib.Path) -> None:
    cfg, runs = results["config"], results["runs"]
    seeds, planned = results["complete_seeds"], results["planned_seeds"]
    wall = sum(r["timing"]["wall_s"] for r in runs)
    complete = results["complete"]
    env = results["environment"]
    tokens_per_step = cfg["batch_size"] * cfg["grad_accum_steps"] * cfg["seq_len"]
    lines = [
        "# Centering study",
        "",
        f"{len(runs)} of {results['planned_runs']} planned runs finished; {len(seeds)} of {len(planned)} paired seeds "
        f"complete ({', '.join(map(str, seeds)) or 'none'}). Model dim {cfg['dim']}, {cfg['n_layers']} layers, "
        f"{cfg['n_heads']} heads, vocabulary {cfg['vocab_size']:,}, {runs[0]['parameters']:,} parameters (baseline); "
        f"{cfg['iters']} steps of {cfg['batch_size']} x {cfg['grad_accum_steps']} windows of {cfg['seq_len']} tokens "
        f"({cfg['iters'] * tokens_per_step:,} training tokens per run); "
        f"AdamW lr {cfg['lr']:g} (warmup {cfg['warmup_iters']}, cosine to {cfg['lr'] * cfg['min_lr_ratio']:g}), "
        f"weight decay {cfg['weight_decay']:g}, clip {cfg['grad_clip']:g}; validation on "
        f"{cfg['eval_batches'] * cfg['batch_size']} fixed windows "
        f"({cfg['eval_batches'] * cfg['batch_size'] * cfg['seq_len']:,} tokens) at steps "
        f"{', '.join(map(str, runs[0]['curve']['step'] or ['-']))}. "
        f"Ops: {', '.join(sorted({r.get('ops', '?') for r in runs}))}; device {env.get('cuda_device') or env.get('cpu')}, "
        f"torch {env.get('torch')}; {_commit_note(results['commits'])}; sum of run wall times {wall / 3600:.2f} h.",
        "",
    ]
    if not complete:
        lines += [
            "**PRELIMINARY: not every planned run has finished. The tables show the complete seeds only; "
            "no verdict is given until every planned seed is complete.**",
            "",
        ]
    lines += ["## How this configuration differs from the claims'", ""]
    lines += [f"- {note}" for note in results["scale_differences"]]
    lines += ["", "So every verdict below holds at this scale only." if results["scale_differences"] else "", ""]
    lines += ["## The analysis", "", "```text", ANALYSIS.strip(), "```", ""]
    lines += _regime_lines(results)
    lines += [
        "## Final validation loss",
        "",
        "Eval mode (running statistics) on the fixed windows; train mode beside it (batch statistics, buffers "
        "reset per batch). Mean ± SD over the complete seeds, nats. The n-gram rows: count-based models of the same "
        "tokens on the same windows (see the regime above).",
        "",
        "| arm | mode | n | val loss (eval mode) | val loss (train mode) | diverged | s / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in results["groups"]:
        lines.append(
            f"| {g['arm']} | {g['mode']} | {g['n']} | {_mean_sd(g['val_loss'])} | "
            f"{_mean_sd(g['val_loss_train_mode'])} | {', '.join(map(str, g['diverged'])) or '-'} | "
            f"{g['s_per_step']:.2f} |"
        )
    regime = results["regime"]
    if regime is not None and regime["run_tokens"] is not None:
        for name in ORDERS:
            s = regime["run_tokens"][name]
            lines.append(f"| {name}, the run's tokens | - | {s['n']} | {_mean_sd(s)} | - | - | - |")
        for name in ORDERS:
            lines.append(f"| {name}, the training split | - | - | {_fmt(regime['split'][name])} | - | - | - |")
    base = results["baseline_mean"]
    lines += [
        "",
        "## Contrasts (paired by seed; d < 0: the first is better)",
        "",
        f"Simultaneous: the interval at level 1 - 0.05 / {results['family_size']} (Bonferroni over the family).",
        "",
        "| contrast | n | d (nats) | 95% CI | simultaneous CI | % of baseline | t | p | p (Holm) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["contrasts"]:
        pct = "-" if c["mean"] is None or not base else f"{-100 * c['mean'] / base:+.2f}%"
        sig = " **" if c["significant"] else ""
        lines.append(
            f"| {c['label']}{sig} | {c['n']} | {_fmt(c['mean'], 4, True)} | {_ci(c['ci95'])} | "
            f"{_ci(c['ci_simultaneous'])} | {pct} | {_fmt(c['t'], 2, True)} | {_fmt(c['p'], 4)} | "
            f"{_fmt(c['p_holm'], 4)} |"
        )
    lines += [
        "",
        "** = significant at 5% familywise (Holm). % of baseline: the improvement as the claims report "
        "it (positive = better).",
        "",
    ]
    lines += [
        "## The claims",
        "",
        f"The claims' numbers are for their model after 1000 iterations (baseline {CLAIMED_BASELINE_LOSS}); a claimed "
        f"percentage is taken as the same share of this study's baseline loss ({_fmt(base, 4)} nats). Direction: "
        "Holm over the family; size: is the claimed value inside the simultaneous interval?",
        "",
        "| claim | mode | claimed | direction | size | evidence |",
        "|---|---|---|---|---|---|",
    ]
    for v in results["verdicts"]:
        claimed = (
            "-"
            if v["claimed_pct"] is None
            else f"{v['claimed_pct']:+.2f}%"
            + ("" if v["claimed_nats"] is None else f" ({v['claimed_nats']:+.4f} nats)")
        )
        direction, size = v["direction"], v["size"]
        if not complete and direction != "not tested":
            direction, size = "pending", "pending"
        lines.append(f"| {v['text']} | {v['mode']} | {claimed} | **{direction}** | {size} | {v['why']} |")
    lines += _along_training_lines(results)
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
        lines.append(
            f"| {s['arm']} | {s['mode']} | {s['reached']}/{s['n']} | {_fmt(s['median_step'], 0)} | {per_seed} |"
        )
    lines += _leak_control_lines(results)
    lines += _mechanism_lines(results)
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
            cells += [
                "**yes**" if any(lk[phase]["leak"] for lk in leaks) else "no",
                f"{max(lk[phase]['future_change'] for lk in leaks):.2g} / "
                f"{max(lk[phase]['batch_change'] for lk in leaks):.2g}",
            ]
        lines.append(f"| {arm} | {mode} | " + " | ".join(cells) + " |")
    lines.append("")
    atomic_write_text(path, "\n".join(lines))


def _regime_lines(results: dict) -> list[str]:
    regime = results["regime"]
    lines = ["## The regime: n-gram baselines", ""]
    if regime is None:
        return lines + [
            "Not computed: rebuild the report with `--report-only --data DIR` (the study's data) to add them.",
            "",
        ]
    base_final = results["baseline_mean"]
    seen = (
        "no complete seed yet"
        if regime["run_tokens"] is None
        else (
            f"the {regime['targets_per_run']:,} training targets each seed's runs saw, recomputed from the sampler (they "
            f"match the runs' recorded batches: {'yes' if regime['batches_digest_match'] else '**NO**'})"
        )
    )
    lines += [
        f"Count-based models of the same tokens, scored like the runs' validation loss on the same "
        f"{regime['validation']['windows']} windows ({regime['validation']['targets']:,} targets): "
        f"{regime['method']}. The run's tokens: {seen}; the training split: all {regime['split']['tokens']:,} "
        f"tokens.",
        "",
        "| model | fitted to the run's tokens (median [range] over seeds) | fitted to the training split |",
        "|---|---|---|",
    ]
    for name in ORDERS:
        run = "-" if regime["run_tokens"] is None else _fmt_spread(regime["run_tokens"][name], 4)
        lines.append(f"| {name} | {run} | {_fmt(regime['split'][name])} |")
    lines += [f"| the transformer baseline (mean over seeds) | {_fmt(base_final)} | |", ""]
    if regime["step"]:
        lines += [
            "Along training: the baseline's eval-mode validation loss (mean over seeds) and the n-gram models "
            "fitted to the tokens seen up to that step (mean over seeds).",
            "",
            "| step | baseline | " + " | ".join(f"{name} (tokens so far)" for name in ORDERS) + " |",
            "|---|---|" + "---|" * len(ORDERS),
        ]
        steps, values = _mean_curve(results["runs"], "baseline", BASELINE_MODE, results["complete_seeds"])
        base_curve = dict(zip(steps, values)) if steps is not None else {}
        for i, step in enumerate(regime["step"]):
            cells = [_fmt(regime["by_step"][name][i]) for name in ORDERS]
            lines.append(f"| {step} | {_fmt(base_curve.get(step))} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _along_training_lines(results: dict) -> list[str]:
    curves = results["paired_curves"]
    if not curves:
        return []
    steps = curves[0]["steps"]
    lines = [
        "",
        "## Paired differences along training",
        "",
        "At every evaluation step: the eval-mode validation loss of the arm minus the same seed's baseline, nats "
        "(negative = better): the mean over the complete seeds, and [min, max] over them.",
        "",
        "| step | " + " | ".join(f"{c['arm']} [{c['mode']}]" for c in curves) + " |",
        "|---|" + "---|" * len(curves),
    ]
    for i, step in enumerate(steps):
        cells = []
        for c in curves:
            if i >= len(c["mean"]) or c["mean"][i] is None:
                cells.append("-")
            elif len(c["per_seed"]) == 1:
                cells.append(_fmt(c["mean"][i], 3, True))
            else:
                cells.append(f"{c['mean'][i]:+.3f} [{c['min'][i]:+.3f}, {c['max'][i]:+.3f}]")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines


def _leak_control_lines(results: dict) -> list[str]:
    rows = results["leak_control"]
    lines = [
        "",
        "## Leak control: naive centering",
        "",
        'The "gain" a naive centering reports on the validation loss: the mean over the whole batch and sequence '
        "subtracted in training and in evaluation alike (fastcenter/experiments/centering.py), so a token's output "
        "sees later tokens and the other sequences of its evaluation batch "
        f"({results['config']['batch_size']} windows). d = its validation loss - the same seed's baseline (negative "
        "= an apparent gain). If the claimed gain lies inside its interval, the leak could explain the claim at "
        "this scale; if not, it does not.",
        "",
    ]
    if not rows:
        return lines + ["Not measured: this study ran no naive and no simple arm.", ""]
    lines += ["| arm | source | n | d (nats) | 95% CI | claimed d | claimed inside |", "|---|---|---|---|---|---|---|"]
    for c in rows:
        inside = {None: "-", True: "yes", False: "no"}[c["claimed_inside_ci95"]]
        lines.append(
            f"| {c['arm']} | {c['source']} | {c['n']} | {_fmt(c['mean'], 4, True)} | {_ci(c['ci95'])} | "
            f"{_fmt(c['claimed_nats'], 4, True)} | {inside} |"
        )
    return lines + [""]


def _mechanism_lines(results: dict) -> list[str]:
    mech = results["mechanisms"]
    tail = mech["tail_steps"]
    lines = [
        "## Mechanisms",
        "",
        f"Measured at every evaluation point on one validation batch in training mode (what training sees), the "
        f"model left unchanged. Per seed the median over the evaluation points of the last {tail} steps; here the "
        f"median over the seeds and [min, max] over them. All are L2 norms of D-vectors over the stream's RMS norm "
        f"per token: `running mean` is the module's running mean, `mean before` / `mean after` the mean over the "
        f"batch of what enters the module before and after its centre is subtracted. mechanisms.png shows them "
        f"along training.",
        "",
        "| arm | mode | module | running mean / rms | mean before / rms | mean after / rms |",
        "|---|---|---|---|---|---|",
    ]
    for m in mech["modules"]:
        lines.append(
            f"| {m['arm']} | {m['mode']} | {_module_kind(m['module'])} | {_fmt_spread(m.get('running_mean'))} | "
            f"{_fmt_spread(m.get('mean_before'))} | {_fmt_spread(m.get('mean_after'))} |"
        )
    lines += [
        "",
        f"The global gradient norm before clipping: per seed the median over the last {tail} steps; the median over "
        f"the seeds and [min, max] over them.",
        "",
        "| arm | mode | gradient norm |",
        "|---|---|---|",
    ]
    lines += [f"| {g['arm']} | {g['mode']} | {_fmt_spread(g['grad_norm'])} |" for g in mech["grad_norm"]]
    return lines


def _leaks(runs: list[dict], seeds: list[int]) -> dict:
    out = {}
    for r in runs:
        if r["seed"] in seeds and r["leak"] is not None:
            out.setdefault((r["arm"], r["mode"]), []).append(r["leak"])
    return out


def _mean_curve(runs: list[dict], arm: str, mode: str, seeds: list[int]):
    """(steps, mean eval-mode validation loss over the seeds' runs that did not diverge), or (None, None)."""
    curves = [
        r["curve"]
        for r in runs
        if r["arm"] == arm and r["mode"] == mode and r["diverged_at"] is None and r["seed"] in seeds
    ]
    if not curves:
        return None, None
    steps = curves[0]["step"]
    curves = [c for c in curves if c["step"] == steps]
    return steps, np.mean([c["val_loss"] for c in curves], axis=0)


def _arm_colors(arms: list[str]) -> dict:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {arm: cmap(i % 10) for i, arm in enumerate(arms)}


def plot_results(results: dict, out_dir: pathlib.Path) -> str | None:
    """loss_curves.png, contrasts.png and mechanisms.png; returns a note instead if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plots skipped (pip install matplotlib)"
    runs, seeds = results["runs"], results["complete_seeds"]
    modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in runs)]
    arms = [a for a in ARMS if any(r["arm"] == a for r in runs)]
    colors = _arm_colors(arms)
    curves = {(c["arm"], c["mode"]): c for c in results["paired_curves"]}
    regime = results["regime"]

    ncols = max(1, len(modes))
    fig, axes = plt.subplots(2, ncols, figsize=(max(8.0, 5.5 * ncols), 9), squeeze=False, sharex=True)
    for j, mode in enumerate(modes or [BASELINE_MODE]):
        top, bottom = axes[0][j], axes[1][j]
        steps, base_curve = _mean_curve(runs, "baseline", BASELINE_MODE, seeds)
        if steps is not None:
            top.plot(steps, base_curve, "k-o", label="baseline", markersize=3, linewidth=2)
        if regime is not None and regime["run_tokens"] is not None:
            for name, style in (("bigram", "--"), ("trigram", ":")):
                top.axhline(
                    regime["run_tokens"][name]["median"],
                    color="grey",
                    linestyle=style,
                    linewidth=1,
                    label=f"{name}, the run's tokens",
                )
                top.axhline(
                    regime["split"][name],
                    color="k",
                    linestyle=style,
                    linewidth=0.8,
                    label=f"{name}, the training split",
                )
        bottom.axhline(0.0, color="k", linewidth=1)
        for arm in arms:
            if arm == "baseline":
                continue
            steps, curve = _mean_curve(runs, arm, mode, seeds)
            if steps is not None:
                top.plot(steps, curve, "-o", color=colors[arm], label=arm, markersize=3, linewidth=1)
            c = curves.get((arm, mode))
            if c is not None:
                for diffs in c["per_seed"].values():
                    bottom.plot(c["steps"], diffs, "-", color=colors[arm], linewidth=0.6, alpha=0.5)
                bottom.plot(c["steps"], c["mean"], "-o", color=colors[arm], label=arm, markersize=3, linewidth=1.5)
        top.set(title=f"mode: {mode}", ylabel="val loss, eval mode (mean over seeds)")
        bottom.set(xlabel="step", ylabel="arm - baseline, paired (thin: each seed; < 0 = better)")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.suptitle("Centering study: validation loss along training, with count-based n-gram baselines")
    fig.tight_layout()
    _save_figure(fig, out_dir / "loss_curves.png")
    plt.close(fig)

    _plot_contrasts(results, out_dir, plt)
    _plot_mechanisms(results, out_dir, plt, colors)
    return None


def _plot_contrasts(results: dict, out_dir: pathlib.Path, plt) -> None:
    """contrasts.png: every arm-vs-baseline contrast with its 95% t-interval (thick) and its simultaneous interval
    (thin); Holm-significant ones filled."""
    family = [c for c in results["contrasts"] if c["kind"] == "arm" and c["ci95"] is not None]
    if not family:
        return
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(family) + 1.5))
    for i, c in enumerate(family):
        ax.plot(c["ci_simultaneous"], [i, i], "k-", linewidth=0.8)
        ax.plot(c["ci95"], [i, i], "k-", linewidth=2.5)
        ax.plot([c["mean"]], [i], "o", color="k", markerfacecolor="k" if c["significant"] else "white", markersize=7)
    ax.axvline(0.0, color="grey", linewidth=1)
    ax.set_yticks(range(len(family)), [c["label"] for c in family])
    ax.invert_yaxis()
    ax.set(
        xlabel="d = arm - baseline, final eval-mode val loss (nats; < 0 = better)",
        title="Paired contrasts: 95% (thick) and simultaneous (thin) intervals\nfilled: significant after Holm",
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, out_dir / "contrasts.png")
    plt.close(fig)


def _plot_mechanisms(results: dict, out_dir: pathlib.Path, plt, colors: dict) -> None:
    """mechanisms.png: per mode, mean_after / rms and running_mean / rms of the centering modules along training
    (mean over seeds, max over modules), and the gradient norm before clipping."""
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
                    mods = [m for m in r["mechanisms"]["modules"].values() if key in m]
                    if mods:
                        per_seed.append(np.max([np.array(m[key]) / np.array(m["stream_rms"]) for m in mods], axis=0))
                if per_seed:
                    axes[row][j].plot(
                        steps, np.mean(per_seed, axis=0), "-o", color=colors.get(arm), markersize=3, label=arm
                    )
            grads = [np.array(r["grad_norm_per_step"]) for r in mine if r["grad_norm_per_step"]]
            if grads:
                g = np.mean([x[: min(map(len, grads))] for x in grads], axis=0)
                k = max(1, len(g) // 50)
                axes[2][j].plot(
                    np.arange(1, len(g) + 1)[k - 1 :: k],
                    np.convolve(g, np.ones(k) / k, "valid")[::k],
                    color=colors.get(arm),
                    label=arm,
                )
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
    runs = load_runs(out_dir)
    if not runs:
        raise StudyError(f"no finished runs under {out_dir}/runs")
    check_compatible(runs, runs[0]["config"], runs[0]["data_digest"], out_dir)
    plan_path = out_dir / "plan.json"
    planned = json.loads(plan_path.read_text())["runs"] if plan_path.exists() else [r["run_id"] for r in runs]
    seeds = complete_seeds(runs, planned)
    modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in runs)]
    family = contrasts(runs, seeds)
    base = [
        r["final"]["val_loss"]
        for r in runs
        if r["arm"] == "baseline" and r["seed"] in seeds and r["final"]["val_loss"] is not None
    ]
    baseline_mean = statistics.fmean(base) if base else None
    sessions_path = out_dir / "sessions.jsonl"
    sessions = (
        [json.loads(line) for line in sessions_path.read_text().splitlines() if line.strip()]
        if sessions_path.exists()
        else []
    )
    config = runs[0]["config"]
    # The model configuration the runs recorded (records written before they held it: the default model's).
    differences = scale_differences(config, runs[0].get("configs", {}).get("model", {}))
    regime = load_regime(out_dir, config, runs[0]["data_digest"])
    results = {
        "format": RESULTS_FORMAT,
        "config": config,
        "data_digest": runs[0]["data_digest"],
        "environment": runs[0]["environment"],  # where the runs ran (each run record holds its own)
        "environments_differ": any(r["environment"] != runs[0]["environment"] for r in runs),
        "commits": sorted({r["environment"].get("git_commit") for r in runs} - {None}),
        "sessions": sessions,
        "planned_runs": len(planned),
        "planned_seeds": sorted({seed_of(run_id) for run_id in planned}),
        "complete_seeds": seeds,
        "complete": len(runs) == len(planned) and all(r["run_id"] in planned for r in runs),
        "wall_s_sum_of_runs": sum(r["timing"]["wall_s"] for r in runs),
        "analysis": ANALYSIS,
        "claims": [dataclasses.asdict(c) for c in CLAIMS],
        "scale_differences": differences,
        "baseline_mean": baseline_mean,
        "regime": regime_summary(regime, runs, seeds),
        "groups": group_summaries(runs, seeds),
        "family_size": family[0]["family_size"] if family else 0,
        "contrasts": family,
        "verdicts": claim_verdicts(family, baseline_mean, modes, at_this_scale=bool(differences)),
        "paired_curves": paired_curves(runs, seeds),
        "steps_to_baseline": steps_to_baseline(runs, seeds),
        "leak_control": leak_control(runs, seeds, baseline_mean),
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
