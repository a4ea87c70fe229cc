"""The study's analysis, fixed before the runs and written into the report (`ANALYSIS`).

Everything is paired by seed: for seed s, every arm started from the baseline's initial weights and saw the
baseline's batches, so the per-seed difference d_s = loss(arm, s) - loss(baseline, s), in nats of the final
eval-mode validation loss, cancels most seed-to-seed noise (negative = the arm is better).

Per contrast: the mean difference, its standard error, a 95% t-interval (n - 1 degrees of freedom) and a
two-sided p-value of the paired t-test. The family of contrasts is all of them at once -- every arm against
the baseline in every mode, the pre-specified comparisons between arms and between modes below -- and the
p-values are Holm-adjusted over that family (familywise error 5%). There is no post-hoc choice: no
"best of" picked after seeing the data.

A claim of the seed gets one verdict per mode:
    confirmed     Holm-adjusted p < 0.05, with the claimed sign
    refuted       Holm-adjusted p < 0.05 with the opposite sign; or, for a claimed size, the size is excluded:
                  the one-sided 95% bound on the effect in the claimed direction is below HALF the claimed size
    inconclusive  otherwise
Claimed sizes are the seed's percentages of its own baseline loss; here they are taken as the same share of
this study's baseline loss (mean over seeds), i.e. they are assumed to transfer as relative effects.
Secondary, descriptive: the first evaluation step at which an arm reaches the same seed's final baseline loss.
"""

from __future__ import annotations

import math
import statistics
from typing import Iterable, Optional

from .plan import ARMS, BASELINE_MODE, MODE_ORDER, SEED_CLAIMS, Claim

ALPHA = 0.05
ANALYSIS = __doc__


# ---------------------------------------------------------------------------------------------------------
# Student's t, from the regularized incomplete beta function (no SciPy needed)
# ---------------------------------------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: int) -> float:
    """P(T > t) for Student's t with df degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t (bisection on the CDF; p in (0, 1))."""
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 1.0 - t_sf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------------------------------------
# Paired contrasts and Holm's correction
# ---------------------------------------------------------------------------------------------------------


def paired(diffs: list[float]) -> dict:
    """Mean, SD, SE, 95% t-interval, t and two-sided p of paired differences (None where n < 2)."""
    n = len(diffs)
    out = {"n": n, "values": list(diffs), "mean": statistics.fmean(diffs) if n else None, "sd": None, "se": None,
           "ci95": None, "t": None, "p": None, "df": n - 1}  # fmt: skip
    if n < 2:
        return out
    sd = statistics.stdev(diffs)
    se = sd / math.sqrt(n)
    half = t_quantile(0.975, n - 1) * se
    out.update(sd=sd, se=se, ci95=[out["mean"] - half, out["mean"] + half])
    if se > 0:
        out["t"] = out["mean"] / se
        out["p"] = min(1.0, 2.0 * t_sf(abs(out["t"]), n - 1))
    else:  # the same difference in every seed: no spread to judge by
        out["p"] = 0.0 if out["mean"] != 0 else 1.0
    return out


def holm(p_values: list[Optional[float]]) -> list[Optional[float]]:
    """Holm-adjusted p-values (step-down, monotone); None stays None and does not count in the family."""
    ranked = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m, adjusted, running = len(ranked), [None] * len(p_values), 0.0
    for rank, (p, i) in enumerate(ranked):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def one_sided_bound(c: dict, direction: int) -> Optional[float]:
    """The one-sided 95% upper bound of the effect in `direction` (+1: improvement = -d; -1: harm = +d), nats."""
    if c["se"] is None:
        return None
    effect = -c["mean"] if direction > 0 else c["mean"]
    return effect + t_quantile(0.95, c["df"]) * c["se"]


# ---------------------------------------------------------------------------------------------------------
# From run records to contrasts, verdicts and the secondary outcome
# ---------------------------------------------------------------------------------------------------------


def final_losses(records: list[dict]) -> dict[tuple, dict[int, float]]:
    """{(arm, mode): {seed: final eval-mode validation loss}} of the runs that finished without diverging."""
    out: dict[tuple, dict[int, float]] = {}
    for r in records:
        if r["final"]["val_loss"] is not None:
            out.setdefault((r["arm"], r["mode"]), {})[r["seed"]] = r["final"]["val_loss"]
    return out


def complete_seeds(records: list[dict], planned: Optional[list[str]] = None) -> list[int]:
    """Seeds for which every (arm, mode) of the plan (or seen in any seed) has a finished record."""
    cells = {(r["arm"], r["mode"]) for r in records}
    by_seed: dict[int, set] = {}
    for r in records:
        by_seed.setdefault(r["seed"], set()).add((r["arm"], r["mode"]))
    if planned is not None:
        done = {r["run_id"] for r in records}
        seeds = {int(run_id.split("-")[0][1:]) for run_id in planned}
        return sorted(s for s in seeds if all(rid in done for rid in planned if rid.startswith(f"s{s}-")))
    return sorted(s for s, have in by_seed.items() if have >= cells)


def _contrast(kind: str, label: str, a: dict[int, float], b: dict[int, float], seeds: list[int], **extra) -> dict:
    """Paired differences a - b over the seeds both have (and that are complete)."""
    common = [s for s in seeds if s in a and s in b]
    return {"kind": kind, "label": label, "seeds": common, **extra, **paired([a[s] - b[s] for s in common])}


def contrasts(records: list[dict], seeds: list[int], reference_mode: str = "adaptive") -> list[dict]:
    """The whole pre-specified family, with Holm-adjusted p-values.

    arm:   every centered arm in every mode against the baseline (d = arm - baseline)
    arms:  embeddings against every other centered arm, per mode (d = embeddings - other): the seed's
           "embeddings is the most effective placement", tested against each rival named in advance; the
           seed's pairwise claims (v against qk); and residual against residual-inner (d = what centering the
           final stream adds to centering the inner blocks)
    modes: the reference mode against every other mode run, per arm (d = reference - other), and pooled: per
           seed the mean over the centered arms
    """
    losses = final_losses(records)
    base = losses.get(("baseline", BASELINE_MODE), {})
    modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in records)]
    arms = [a for a in ARMS if a != "baseline" and any(r["arm"] == a for r in records)]
    family = []
    for mode in modes:
        for arm in arms:
            if (arm, mode) in losses:
                family.append(_contrast("arm", f"{arm} [{mode}] - baseline", losses[(arm, mode)], base, seeds,
                                        arm=arm, mode=mode))  # fmt: skip
        pairs = [("embeddings", other) for other in arms if other != "embeddings"]  # the "best placement" claim
        pairs += [(c.arm, c.other) for c in SEED_CLAIMS if c.kind == "pair"]
        pairs += [("residual", "residual-inner")]  # what centering the final stream adds to the inner blocks
        for arm, other in dict.fromkeys(pairs):
            if (arm, mode) in losses and (other, mode) in losses:
                family.append(_contrast("arms", f"{arm} - {other} [{mode}]", losses[(arm, mode)],
                                        losses[(other, mode)], seeds, arm=arm, other=other, mode=mode))  # fmt: skip
    if reference_mode in modes:
        for other in modes:
            if other == reference_mode:
                continue
            pooled_a, pooled_b = {}, {}
            for arm in arms:
                a, b = losses.get((arm, reference_mode)), losses.get((arm, other))
                if a is None or b is None:
                    continue
                family.append(_contrast("modes", f"{arm}: {reference_mode} - {other}", a, b, seeds, arm=arm,
                                        mode=reference_mode, other=other))  # fmt: skip
                for s in seeds:
                    if s in a and s in b:
                        pooled_a.setdefault(s, []).append(a[s])
                        pooled_b.setdefault(s, []).append(b[s])
            full = [s for s in pooled_a if len(pooled_a[s]) == max(map(len, pooled_a.values()))]
            if full:
                family.append(_contrast("modes", f"all arms: {reference_mode} - {other}",
                                        {s: statistics.fmean(pooled_a[s]) for s in full},
                                        {s: statistics.fmean(pooled_b[s]) for s in full}, seeds, arm="(pooled)",
                                        mode=reference_mode, other=other))  # fmt: skip
    for c, adjusted in zip(family, holm([c["p"] for c in family])):
        c["p_holm"] = adjusted
        c["significant"] = adjusted is not None and adjusted < ALPHA
    return family


def verdict(c: Optional[dict], direction: int, claimed_nats: Optional[float]) -> tuple[str, str]:
    """(verdict, why) of a claim against its contrast. `direction` +1: the claim says lower loss (d < 0)."""
    if c is None or c["n"] < 2:
        return "not tested", "not run at this scale" if c is None else f"{c['n']} paired seed(s)"
    sign = -1 if c["mean"] < 0 else 1  # sign of d
    measured = f"d = {c['mean']:+.4f} nats, 95% CI [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}], p_holm = {c['p_holm']:.3g}"
    if c["significant"]:
        if sign == -direction:
            return "confirmed", measured
        return "refuted", f"{measured}: significant in the opposite direction"
    if claimed_nats is not None:
        bound = one_sided_bound(c, direction)
        if bound is not None and bound < abs(claimed_nats) / 2:
            return "refuted", (f"{measured}: the effect in the claimed direction is at most {bound:+.4f} nats (one-sided "
                               f"95%), below half the claimed {abs(claimed_nats):.4f}")  # fmt: skip
    return "inconclusive", measured


def claim_verdicts(family: list[dict], baseline_mean: Optional[float], modes: Iterable[str]) -> list[dict]:
    """One verdict per (claim, mode) of the seed's claims, from the pre-specified contrasts."""
    by_label = {c["label"]: c for c in family}
    out = []

    def add(claim: Claim, mode: str, c: Optional[dict], direction: int, note: str = ""):
        claimed = None
        if claim.claimed_pct is not None and baseline_mean is not None:
            claimed = claim.claimed_pct / 100.0 * baseline_mean * (-1)  # as d in nats: an improvement is negative
        v, why = verdict(c, direction, claimed)
        out.append({"claim": claim.id, "text": claim.text, "mode": mode, "claimed_pct": claim.claimed_pct,
                    "claimed_nats": claimed, "verdict": v, "why": why + note,
                    "contrast": None if c is None else c["label"]})  # fmt: skip

    for mode in modes:
        for claim in SEED_CLAIMS:
            if claim.kind == "arm":
                add(claim, mode, by_label.get(f"{claim.arm} [{mode}] - baseline"), claim.direction)
            elif claim.kind == "pair":
                add(claim, mode, by_label.get(f"{claim.arm} - {claim.other} [{mode}]"), claim.direction)
            elif claim.kind == "best":
                rivals = [c for c in family if c["kind"] == "arms" and c["mode"] == mode and c["arm"] == claim.arm]
                if not rivals:
                    add(claim, mode, None, claim.direction)
                    continue
                worse = [c["other"] for c in rivals if c["significant"] and c["mean"] > 0]
                better = [c["other"] for c in rivals if c["significant"] and c["mean"] < 0]
                v = "refuted" if worse else ("confirmed" if len(better) == len(rivals) else "inconclusive")
                why = (f"significantly worse than {', '.join(worse)}" if worse else
                       f"significantly better than {len(better)} of {len(rivals)} rivals ({', '.join(better) or 'none'})")  # fmt: skip
                out.append({"claim": claim.id, "text": claim.text, "mode": mode, "claimed_pct": None,
                            "claimed_nats": None, "verdict": v, "why": why, "contrast": "embeddings - each other arm"})  # fmt: skip
    for claim in SEED_CLAIMS:
        if claim.kind != "mode":
            continue
        for c in family:
            if c["kind"] == "modes" and c["arm"] == "(pooled)" and c["mode"] == claim.mode_a:
                add(claim, f"{claim.mode_a} vs {c['other']}", c, claim.direction,
                    " (per seed, the mean over the centered arms)")
    return out


def steps_to_baseline(records: list[dict], seeds: list[int]) -> list[dict]:
    """Secondary: per (arm, mode), the first evaluation step at which each seed's run reaches that seed's final
    baseline loss (None: not reached), and the median over the seeds that reached it."""
    base = {r["seed"]: r["final"]["val_loss"] for r in records if r["arm"] == "baseline" and r["final"]["val_loss"]}
    out = []
    for (arm, mode) in sorted({(r["arm"], r["mode"]) for r in records if r["arm"] != "baseline"},
                              key=lambda k: (MODE_ORDER.index(k[1]) if k[1] in MODE_ORDER else 99, list(ARMS).index(k[0]))):  # fmt: skip
        per_seed = {}
        for r in records:
            if r["arm"] != arm or r["mode"] != mode or r["seed"] not in seeds or r["seed"] not in base:
                continue
            target = base[r["seed"]]
            per_seed[r["seed"]] = next((s for s, v in zip(r["curve"]["step"], r["curve"]["val_loss"])
                                        if v is not None and v <= target), None)  # fmt: skip
        reached = sorted(v for v in per_seed.values() if v is not None)
        out.append({"arm": arm, "mode": mode, "per_seed": per_seed, "reached": len(reached), "n": len(per_seed),
                    "median_step": statistics.median(reached) if reached else None})  # fmt: skip
    return out


def group_summaries(records: list[dict], seeds: list[int]) -> list[dict]:
    """Per (arm, mode): mean and SD over the complete seeds of the final losses (eval and train mode)."""
    groups = {}
    for r in records:
        if r["seed"] in seeds:
            groups.setdefault((r["arm"], r["mode"]), []).append(r)
    out = []
    order = {a: i for i, a in enumerate(ARMS)}
    mode_order = {m: i for i, m in enumerate((BASELINE_MODE,) + MODE_ORDER)}
    for (arm, mode), runs in sorted(groups.items(), key=lambda kv: (mode_order.get(kv[0][1], 99), order.get(kv[0][0], 99))):
        def summary(key):
            values = [r["final"][key] for r in runs if r["final"][key] is not None]
            return {"n": len(values), "mean": statistics.fmean(values) if values else None,
                    "sd": statistics.stdev(values) if len(values) > 1 else None}  # fmt: skip

        out.append({"arm": arm, "mode": mode, "n": len(runs), "diverged": sorted(r["seed"] for r in runs if r["diverged_at"]),
                    "val_loss": summary("val_loss"), "val_loss_train_mode": summary("val_loss_train_mode"),
                    "s_per_step": statistics.fmean(r["timing"]["s_per_step"] for r in runs)})  # fmt: skip
    return out
