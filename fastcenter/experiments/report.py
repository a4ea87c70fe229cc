"""The study's outputs: results.json, results.md and the plots, rebuilt from the finished runs."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import subprocess
from typing import Callable, Optional

import numpy as np
import torch

from ..files import atomic_write, atomic_write_text
from .plan import ARMS, BASELINE_MODE, LEAK_TOLERANCE, MODE_ORDER, SEED_BASELINE_LOSS, SEED_CLAIMS
from .stats import SE_MULTIPLE, T95, aggregate, claim_verdicts, mode_comparisons, verdict_for

def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        root = pathlib.Path(__file__).resolve().parents[1]
        env["git_commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def _cpu_name() -> Optional[str]:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _fmt(x, digits=4, sign=False) -> str:
    if x is None:
        return "-"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _pm(s: dict, digits=4, sign=False) -> str:
    if s is None or s.get("mean") is None:
        return "-"
    if s["n"] < 2:
        return _fmt(s["mean"], digits, sign)  # one value: no spread to show
    return f"{_fmt(s['mean'], digits, sign)} ± {_fmt(s['std'], digits)}"


def write_markdown(results: dict, path: pathlib.Path) -> None:
    cfg, runs, stats = results["config"], results["runs"], results["statistics"]
    seeds = sorted({r["seed"] for r in runs})
    wall = sum(r["timing"]["wall_s"] for r in runs)
    devices = sorted({r["device"] for r in runs})
    lines = [
        "# Centering study",
        "",
        f"{len(runs)} runs: {len(seeds)} seeds ({', '.join(map(str, seeds))}), model dim {cfg['dim']}, "
        f"{cfg['n_layers']} layers, {cfg['n_heads']} heads, vocab {cfg['vocab_size']}, "
        f"{runs[0]['parameters']:,} parameters (baseline); {cfg['iters']} steps of {cfg['batch_size']} x "
        f"{cfg['grad_accum_steps']} windows of {cfg['seq_len']} tokens "
        f"({cfg['iters'] * cfg['batch_size'] * cfg['grad_accum_steps'] * cfg['seq_len']:,} training tokens per run); "
        f"AdamW lr {cfg['lr']:g} (warmup {cfg['warmup_iters']}, cosine to {cfg['lr'] * cfg['min_lr_ratio']:g}), "
        f"weight decay {cfg['weight_decay']:g}, clip {cfg['grad_clip']:g}; validation on "
        f"{cfg['eval_batches'] * cfg['batch_size']} fixed windows "
        f"({cfg['eval_batches'] * cfg['batch_size'] * cfg['seq_len']:,} tokens). Device: {', '.join(devices)}"
        f" ({results['environment'].get('cuda_device') or results['environment'].get('cpu')}); "
        f"sum of run wall times {wall / 60:.1f} min.",
        "",
        "Every arm of a seed starts from the same weights and sees the same batches (digests in results.json), so "
        "the change against the baseline is paired per seed: improvement % = 100 * (baseline - arm) / baseline "
        "(positive = better, the seed's convention), then mean ± std over seeds, and SE = std / sqrt(n).",
        "",
        "## Validation loss (eval mode, fixed windows)",
        "",
        "| arm | mode | n | val loss (eval mode) | val loss (train mode) | Δ vs baseline (paired) | improvement % "
        "| SE % | t |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in stats["groups"]:
        imp = g.get("improvement_pct")
        div = f" ({len(g['diverged_seeds'])} diverged)" if g["diverged_seeds"] else ""
        lines.append(
            f"| {g['arm']} | {g['mode']} | {g['val_loss']['n']}{div} | {_pm(g['val_loss'])} | "
            f"{_pm(g['val_loss_train_mode'])} | {_pm(g.get('diff'), 4, True) if imp else '-'} | "
            f"{_pm(imp, 2, True) if imp else '-'} | {_fmt(imp['se'], 2) if imp else '-'} | "
            f"{_fmt(imp['t'], 1) if imp and imp['t'] is not None else '-'} |"
        )
    lines += [
        "",
        "## The seed's claims",
        "",
        f"The seed's numbers are for its own model after 1000 iterations (baseline {SEED_BASELINE_LOSS}); absolute "
        "losses here are not comparable with them, only the direction and the relative size of each effect, and "
        "only at the size that was run. Rule (`verdict_for`): with k = 2 standard errors of the paired mean, **confirmed** if the "
        "mean change has the claimed sign and |mean| > k SE; **refuted** if it has the opposite sign beyond k SE, "
        "or if it is within noise while the claimed size lies outside mean ± k SE; **inconclusive** otherwise. "
        "The verdict is about the direction; the claimed-size column says whether the seed's number lies inside "
        "mean ± k SE (consistent) or the measured effect is smaller or larger (ratio measured / claimed). "
        + (f"With n = {len(seeds)} seeds, a 95% t-interval is ± {T95[len(seeds) - 1]:g} SE, so ± 2 SE is a "
           "looser bar than it looks: treat borderline verdicts (|t| between 2 and that) as such."
           if len(seeds) - 1 in T95 else ""),
        "",
        "| claim | mode | claimed % | measured % (± SE) | verdict (direction) | claimed size | why |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in results["verdicts"]:
        measured = "-" if v["measured_pct"] is None else f"{v['measured_pct']:+.2f} ± {_fmt(v['se_pct'], 2)}"
        claimed = "-" if v["claimed_pct"] is None else f"{v['claimed_pct']:+.2f}"
        lines.append(f"| {v['text']} | {v['mode']} | {claimed} | {measured} | **{v['verdict']}** | {v['size']} | "
                     f"{v['why']} |")
    lines += [
        "",
        "## Modes compared per arm",
        "",
        "Paired per seed: 100 * (loss in the other mode - loss in adaptive) / baseline loss, mean ± SE over seeds "
        "(positive = adaptive better). The adaptive verdict above averages these over the arms.",
        "",
        "| arm | adaptive vs | adaptive better by % (± SE) | t |",
        "|---|---|---|---|",
    ]
    for c in results.get("mode_comparisons", []):
        b = c["better_pct"]
        lines.append(f"| {c['arm']} | {c['other']} | {_fmt(b['mean'], 2, True)} ± {_fmt(b['se'], 2)} | "
                     f"{_fmt(b['t'], 1) if b['t'] is not None else '-'} |")
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
    for g in stats["groups"]:
        cells = []
        for phase in ("eval", "train"):
            lk = g["leak"][phase]
            if lk["leak"] is None:
                cells += ["-", "-"]
            else:
                cells += ["**yes**" if lk["leak"] else "no",
                          f"{lk['future_change_max']:.2g} / {lk['batch_change_max']:.2g}"]
        lines.append(f"| {g['arm']} | {g['mode']} | " + " | ".join(cells) + " |")
    lines.append("")
    atomic_write_text(path, "\n".join(lines))


def _arm_colors(arms: list[str]) -> dict:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {arm: cmap(i % 10) for i, arm in enumerate(arms)}


def plot_results(results: dict, out_dir: pathlib.Path) -> Optional[str]:
    """loss_curves.png and bars.png; returns a note instead if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plots skipped (pip install matplotlib)"
    runs, stats = results["runs"], results["statistics"]
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

    groups = {(g["arm"], g["mode"]): g for g in stats["groups"]}
    centered = [a for a in arms if a != "baseline"]
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(centered) + 2), 5))
    width = 0.8 / max(1, len(modes))
    for j, mode in enumerate(modes):
        xs, ys, errs = [], [], []
        for i, arm in enumerate(centered):
            g = groups.get((arm, mode))
            if g is None or not g.get("improvement_pct") or g["improvement_pct"]["mean"] is None:
                continue
            imp = g["improvement_pct"]
            xs.append(i + (j - (len(modes) - 1) / 2) * width)
            ys.append(imp["mean"])
            errs.append(SE_MULTIPLE * imp["se"] if imp["se"] else 0.0)
        ax.bar(xs, ys, width=width, yerr=errs, capsize=3, label=mode)
    # The seed's claims: a marker where it fits the measured scale, and always a label under the arm (claims
    # like -88% would otherwise squash every measured bar to nothing).
    ax.autoscale_view()
    lo, hi = ax.get_ylim()
    lo, hi = min(lo, -0.5), max(hi, 0.5)
    span = hi - lo
    ax.set_ylim(lo - 0.12 * span, hi)
    for i, arm in enumerate(centered):
        claim = next((c for c in SEED_CLAIMS if c.kind == "arm" and c.arm == arm), None)
        if claim is None:
            continue
        text = f"seed: {claim.claimed_pct:+g}%" if claim.claimed_pct is not None else \
            f"seed: {'better' if claim.direction > 0 else 'worse'}"
        ax.text(i, lo - 0.08 * span, text, ha="center", va="center", fontsize=8)
        if claim.claimed_pct is not None and lo <= claim.claimed_pct <= hi:
            ax.plot([i], [claim.claimed_pct], "kx", markersize=9, mew=2,
                    label="seed's claim (its model, 1000 it.)" if not any(
                        h.get_label().startswith("seed") for h in ax.lines) else None)
    ax.axhline(0.0, color="k", linewidth=1)
    ax.set_xticks(range(len(centered)), centered)
    ax.set(ylabel="improvement over baseline, % (paired; > 0 = better)",
           title="Paired change of the eval-mode val loss (error bars: ± 2 SE)")
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, out_dir / "bars.png")
    plt.close(fig)
    return None


def _save_figure(fig, path: pathlib.Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))



def build_results(out_dir: pathlib.Path, log: Callable[[str], None] = print, plots: bool = True) -> dict:
    """Rebuild results.json, results.md (and the plots) from every finished run under out_dir/runs."""
    from .run import StudyError, check_compatible, load_runs

    runs = load_runs(out_dir)
    if not runs:
        raise StudyError(f"no finished runs under {out_dir}/runs")
    check_compatible(runs, runs[0]["config"], runs[0]["data_digest"], out_dir)
    modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in runs)]
    stats = aggregate(runs)
    sessions_path = out_dir / "sessions.jsonl"
    sessions = [json.loads(line) for line in sessions_path.read_text().splitlines()] if sessions_path.exists() else []
    results = {
        "format": "fastcenter.experiments.centering.results/1",
        "config": runs[0]["config"],
        "data_digest": runs[0]["data_digest"],
        "environment": runs[0]["environment"],  # where the runs ran (each run record holds its own)
        "environments_differ": any(r["environment"] != runs[0]["environment"] for r in runs),
        "sessions": sessions,
        "wall_s_sum_of_runs": sum(r["timing"]["wall_s"] for r in runs),
        "claims": [dataclasses.asdict(c) for c in SEED_CLAIMS],
        "verdict_rule": verdict_for.__doc__,
        "statistics": stats,
        "verdicts": claim_verdicts(runs, stats, modes),
        "mode_comparisons": mode_comparisons(runs, modes),
        "runs": sorted(runs, key=lambda r: (r["seed"], r["arm"], r["mode"])),
    }
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1) + "\n")
    write_markdown(results, out_dir / "results.md")
    if plots:
        note = plot_results(results, out_dir)
        if note:
            log(note)
    return results
