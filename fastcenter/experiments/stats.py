"""Statistics and verdicts of the study: per (arm, mode) summaries over seeds, paired against the baseline,
and the verdict on each of the seed's claims."""

from __future__ import annotations

import math
import statistics
from typing import Iterable, Optional

from .plan import ARMS, BASELINE_MODE, MODE_ORDER, SEED_CLAIMS, Claim

# Two-sided 95% quantiles of Student's t by degrees of freedom (n - 1), to say how wide +- 2 SE really is.
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}

# Verdicts: an effect counts when |mean| exceeds this many standard errors of the paired mean.
SE_MULTIPLE = 2.0


def _summary(values: list[float]) -> dict:
    """n, mean, sample std (ddof 1; 0 for one value), standard error of the mean."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "se": None}
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    return {"n": n, "mean": mean, "std": std, "se": std / math.sqrt(n) if n > 1 else None}


def _paired(improvements: list[float]) -> dict:
    s = _summary(improvements)
    s["t"] = s["mean"] / s["se"] if s["se"] else None
    s["values"] = improvements
    return s


def aggregate(records: list[dict]) -> dict:
    """Per (arm, mode) statistics over seeds, paired against the same seed's baseline.

    improvement_pct per seed = 100 * (baseline - arm) / baseline of the eval-mode validation loss (positive =
    better, the seed's convention); diff per seed = arm - baseline (negative = better).
    """
    by_key: dict[tuple, dict[int, dict]] = {}
    for r in records:
        by_key.setdefault((r["arm"], r["mode"]), {})[r["seed"]] = r
    baseline = by_key.get(("baseline", BASELINE_MODE), {})

    def final(r, name):
        return None if r["final"] is None else r["final"][name]

    groups = []
    for (arm, mode), runs in by_key.items():
        seeds = sorted(runs)
        ok = [s for s in seeds if final(runs[s], "val_loss") is not None]
        entry = {
            "arm": arm,
            "mode": mode,
            "seeds": seeds,
            "diverged_seeds": [s for s in seeds if s not in ok],
            "val_loss": {**_summary([final(runs[s], "val_loss") for s in ok]),
                         "values": {str(s): final(runs[s], "val_loss") for s in ok}},
            "val_loss_train_mode": _summary([final(runs[s], "val_loss_train_mode") for s in ok]),
            "train_loss_last10pct": _summary([final(runs[s], "train_loss_last10pct") for s in ok]),
            "s_per_step": _summary([runs[s]["timing"]["s_per_step"] for s in seeds]),
        }
        if arm != "baseline":
            paired = [s for s in ok if s in baseline and final(baseline[s], "val_loss") is not None]
            base = {s: final(baseline[s], "val_loss") for s in paired}
            arm_loss = {s: final(runs[s], "val_loss") for s in paired}
            entry["paired_seeds"] = paired
            entry["diff"] = _summary([arm_loss[s] - base[s] for s in paired])
            entry["improvement_pct"] = _paired([100.0 * (base[s] - arm_loss[s]) / base[s] for s in paired])
        leaks = [runs[s]["leak"] for s in seeds if runs[s]["leak"] is not None]
        entry["leak"] = {
            phase: {
                "leak": any(lk[phase]["leak"] for lk in leaks) if leaks else None,
                "future_change_max": max((lk[phase]["future_change"] for lk in leaks), default=None),
                "batch_change_max": max((lk[phase]["batch_change"] for lk in leaks), default=None),
            }
            for phase in ("eval", "train")
        }
        groups.append(entry)
    order = {a: i for i, a in enumerate(ARMS)}
    mode_order = {m: i for i, m in enumerate((BASELINE_MODE,) + MODE_ORDER)}
    groups.sort(key=lambda e: (mode_order.get(e["mode"], 99), order.get(e["arm"], 99)))
    return {"groups": groups}


def verdict_for(mean: Optional[float], se: Optional[float], n: int, direction: int,
                claimed: Optional[float] = None) -> tuple[str, str]:
    """(verdict, why) for a claimed effect, from the paired mean and its standard error (both in %, positive =
    better).

    The rule: with fewer than 2 paired seeds, inconclusive. Otherwise with k = SE_MULTIPLE (2):
      confirmed     the mean has the claimed sign and |mean| > k SE;
      refuted       the mean has the opposite sign and |mean| > k SE, or the effect is within noise but the
                    claimed size (if one was claimed) lies outside mean +- k SE: an effect that large is excluded;
      inconclusive  otherwise (within noise, and the claimed size not excluded).
    The verdict is about the direction. For a quantitative claim `size_for` says, separately, whether the
    claimed size lies inside mean +- k SE; `why` says it too.
    """
    if mean is None or n < 2:
        return "inconclusive", f"{n} paired seed(s): no standard error"
    if se == 0:
        return "inconclusive", f"the same change ({mean:+.2f}%) in all {n} seeds: no spread to judge it by"
    k = SE_MULTIPLE
    lo, hi = mean - k * se, mean + k * se
    interval = f"measured {mean:+.2f}% +- {k:g} SE = [{lo:+.2f}, {hi:+.2f}]% (n={n})"
    claimed_text = "" if claimed is None else f"claimed {claimed:+.2f}%; "
    if mean * direction > k * se:
        if claimed is None:
            return "confirmed", f"{interval}"
        if lo <= claimed <= hi:
            size = "the claimed size lies inside the interval"
        else:
            size = f"the effect is {'smaller' if abs(mean) < abs(claimed) else 'larger'} than claimed " \
                   f"({abs(mean) / abs(claimed):.2g}x the claimed size)"
        return "confirmed", f"{claimed_text}{interval}: {size}"
    if -mean * direction > k * se:
        return "refuted", f"{claimed_text}{interval}: a significant effect in the opposite direction"
    if claimed is not None and not lo <= claimed <= hi:
        return "refuted", f"{claimed_text}{interval}: within noise, and an effect of the claimed size is excluded"
    return "inconclusive", f"{claimed_text}{interval}: within noise"


def size_for(mean: Optional[float], se: Optional[float], claimed: Optional[float]) -> str:
    """How the claimed size compares with the measurement: "consistent" (inside mean +- k SE), "smaller" /
    "larger" than claimed (with the ratio), "opposite sign", or "-" when there is no claimed size or no SE."""
    if claimed is None or mean is None or not se:
        return "-"
    k = SE_MULTIPLE
    if mean - k * se <= claimed <= mean + k * se:
        return "consistent"
    if mean * claimed <= 0:
        return "opposite sign"
    return f"{'smaller' if abs(mean) < abs(claimed) else 'larger'} ({mean / claimed:.2g}x claimed)"


def _per_seed_losses(records: list[dict]) -> dict[tuple, dict[int, float]]:
    out: dict[tuple, dict[int, float]] = {}
    for r in records:
        if r["final"] is not None and r["final"]["val_loss"] is not None:
            out.setdefault((r["arm"], r["mode"]), {})[r["seed"]] = r["final"]["val_loss"]
    return out


def _relative_pair(a: dict[int, float], b: dict[int, float], ref: dict[int, float]) -> list[float]:
    """Per seed 100 * (b - a) / ref: how much better a is than b, in % of the seed's baseline."""
    seeds = sorted(set(a) & set(b) & set(ref))
    return [100.0 * (b[s] - a[s]) / ref[s] for s in seeds]


def claim_verdicts(records: list[dict], stats: dict, modes: Iterable[str]) -> list[dict]:
    """One verdict per (claim, mode) that the finished runs can speak to."""
    losses = _per_seed_losses(records)
    base = losses.get(("baseline", BASELINE_MODE), {})
    groups = {(g["arm"], g["mode"]): g for g in stats["groups"]}
    centered_arms = [a for a in ARMS if a != "baseline"]
    out = []

    def add(claim: Claim, mode: str, measured: dict, extra: str = "", verdict=None):
        v, why = verdict or verdict_for(measured["mean"], measured["se"], measured["n"], claim.direction,
                                        claim.claimed_pct)
        out.append({
            "claim": claim.id, "text": claim.text, "mode": mode, "claimed_pct": claim.claimed_pct,
            "measured_pct": measured["mean"], "se_pct": measured["se"], "std_pct": measured["std"],
            "n": measured["n"], "verdict": v, "size": size_for(measured["mean"], measured["se"], claim.claimed_pct),
            "why": (why + extra).strip(),
        })

    for mode in modes:
        for claim in SEED_CLAIMS:
            if claim.kind == "arm":
                g = groups.get((claim.arm, mode))
                if g is None:
                    continue
                if g["diverged_seeds"] and not g["val_loss"]["n"]:
                    # Every seed diverged: as bad as it gets.
                    measured = {"mean": None, "se": None, "std": None, "n": 0}
                    v = ("confirmed" if claim.direction < 0 else "refuted",
                         f"diverged (non-finite loss) in every seed {g['diverged_seeds']}")
                    add(claim, mode, measured, verdict=v)
                    continue
                extra = f"; diverged in seeds {g['diverged_seeds']}" if g["diverged_seeds"] else ""
                add(claim, mode, g["improvement_pct"], extra)
            elif claim.kind == "pair":
                a, b = losses.get((claim.arm, mode)), losses.get((claim.other, mode))
                if a is None or b is None:
                    continue
                add(claim, mode, _paired(_relative_pair(a, b, base)),
                    f" ({claim.arm} vs {claim.other}, in % of the baseline loss)")
            elif claim.kind == "best":
                others = [(arm, losses[(arm, mode)]) for arm in centered_arms
                          if arm != claim.arm and (arm, mode) in losses]
                if (claim.arm, mode) not in losses or not others:
                    continue
                mine = losses[(claim.arm, mode)]
                runner_up, theirs = min(others, key=lambda o: statistics.fmean(o[1].values()))
                add(claim, mode, _paired(_relative_pair(mine, theirs, base)),
                    f" ({claim.arm} vs the best other arm, {runner_up}, in % of the baseline loss)")
    # Mode claims compare modes: the claimed winner against each other mode that ran.
    for claim in SEED_CLAIMS:
        if claim.kind != "mode" or claim.mode_a not in modes:
            continue
        for other in modes:
            if other == claim.mode_a:
                continue
            per_seed = []
            for seed in sorted(base):
                diffs = [100.0 * (losses[(arm, other)][seed] - losses[(arm, claim.mode_a)][seed]) / base[seed]
                         for arm in centered_arms
                         if seed in losses.get((arm, other), {}) and seed in losses.get((arm, claim.mode_a), {})]
                if diffs:
                    per_seed.append(statistics.fmean(diffs))
            if per_seed:
                add(claim, f"{claim.mode_a} vs {other}", _paired(per_seed),
                    f" ({claim.mode_a} vs {other}, averaged over the centered arms per seed, "
                    "in % of the baseline loss)")
    return out


def mode_comparisons(records: list[dict], modes: Iterable[str], reference: str = "adaptive") -> list[dict]:
    """Per centered arm: the `reference` mode against each other mode, paired per seed.

    better_pct per seed = 100 * (loss[other] - loss[reference]) / baseline loss (positive = the reference mode is
    better). The "adaptive" verdict averages these over the arms; this table shows each arm on its own, so one
    arm with a huge difference cannot hide what the others do.
    """
    losses = _per_seed_losses(records)
    base = losses.get(("baseline", BASELINE_MODE), {})
    out = []
    for arm in ARMS:
        for other in modes:
            if arm == "baseline" or other == reference:
                continue
            a, b = losses.get((arm, reference)), losses.get((arm, other))
            if a is None or b is None:
                continue
            out.append({"arm": arm, "reference": reference, "other": other,
                        "better_pct": _paired(_relative_pair(a, b, base))})
    return out


