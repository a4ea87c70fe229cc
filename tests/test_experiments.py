"""The centering study end to end on a tiny configuration: outputs, pairing, statistics, verdicts, leaks, resume.

One study (2 seeds; baseline, embeddings and qk+v; modes adaptive and simple; a 1-layer dim-16 model, 6 steps
with gradient accumulation) runs once per module through the command line; the tests read what it wrote and
recompute from the per-run records what the aggregate claims. Reference ops on the CPU, one thread.
"""

import json
import math
import random
import shutil
import statistics

import numpy as np
import pytest
import torch

from fastcenter import data, experiments
from fastcenter.experiments import (
    ARMS,
    BASELINE_MODE,
    RunSpec,
    StudyConfig,
    build_model,
    initial_state,
    leak_check,
    plan_runs,
    verdict_for,
)
from fastcenter.experiments.plan import weights_digest
from fastcenter.training import preserved
from fastcenter.model import GPT, GPTConfig
from fastcenter.nn import CENTERING_MODES, VectorCentering

WORDS = (
    "the king queen lord lady night day sword crown love death blood heart hand eye fair foul sweet sour good ill "
    "come go speak hear see know think make take give tell call keep stand fall rise sleep wake die live "
    "and but or if when then now here there what who why how not no yes thou thee thy my mine our your his her"
).split()

TINY = dict(
    iters=6, seeds=2, arms="baseline,embeddings,qk+v", modes="adaptive,simple", dim=16, n_layers=1, n_heads=2,
    seq_len=16, batch_size=2, grad_accum_steps=2, eval_batches=2, eval_points=2, leak_batch=2, log_interval=3,
    lr=3e-3, device="cpu",
)


def cli_args(data_dir, out_dir, **overrides) -> list[str]:
    fields = {**TINY, **overrides}
    args = ["centering", "--data", str(data_dir), "--out", str(out_dir)]
    for key, value in fields.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return args


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(token_corpus):
    """The synthetic corpus of GPT-2 ids (conftest): no tokenizer needed."""
    return token_corpus


@pytest.fixture(scope="module")
def study(corpus, tmp_path_factory):
    """The tiny study, run once through the command line: (config, out_dir, results.json)."""
    out = tmp_path_factory.mktemp("study")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert experiments.main(cli_args(corpus, out)) == 0
    finally:
        torch.set_num_threads(threads)
    cfg = StudyConfig(**TINY)
    return cfg, out, json.loads((out / "results.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------


def test_every_planned_run_and_output_is_there(study):
    cfg, out, results = study
    for name in ("results.json", "results.md", "loss_curves.png", "bars.png"):
        assert (out / name).stat().st_size > 0, name
    plan = plan_runs(cfg)
    # Baseline once per seed, every other arm once per mode and seed.
    assert len(plan) == cfg.seeds * (1 + (len(cfg.arms) - 1) * len(cfg.modes)) == 10
    assert sorted(p.stem for p in (out / "runs").glob("*.json")) == sorted(s.run_id for s in plan)
    assert sorted(r["run_id"] for r in results["runs"]) == sorted(s.run_id for s in plan)
    for r in results["runs"]:
        assert r["steps_done"] == cfg.iters and len(r["train_loss_per_step"]) == cfg.iters
        assert r["curve"]["step"] == cfg.eval_steps == [3, 6]
        assert r["curve"]["val_loss"][-1] == r["final"]["val_loss"]
        assert all(math.isfinite(v) for v in r["curve"]["val_loss"] + [r["final"]["val_loss_train_mode"]])
        assert r["placements"] == list(ARMS[r["arm"]])
        assert (r["mode"] == BASELINE_MODE) == (r["arm"] == "baseline")
    # The table names every arm and mode that ran, and the verdicts.
    md = (out / "results.md").read_text()
    for arm, mode in {(r["arm"], r["mode"]) for r in results["runs"]}:
        assert f"| {arm} | {mode} |" in md
    assert "## The seed's claims" in md and "## Leak check" in md


def test_adaptive_train_mode_loss_equals_eval_mode_and_simple_differs(study):
    """adaptive subtracts the stale running mean in both modes (identical losses); simple uses the batch mean
    in training, so its train-mode loss on the same windows differs."""
    _, _, results = study
    for r in results["runs"]:
        final = r["final"]
        if r["mode"] in (BASELINE_MODE, "adaptive"):
            assert final["val_loss_train_mode"] == pytest.approx(final["val_loss"], abs=1e-6), r["run_id"]
        else:
            assert abs(final["val_loss_train_mode"] - final["val_loss"]) > 1e-6, r["run_id"]


# ---------------------------------------------------------------------------------------------------------------
# Pairing: same initial weights and same batches for every arm of a seed
# ---------------------------------------------------------------------------------------------------------------


def test_runs_of_a_seed_share_initial_weights_and_batches(study):
    cfg, _, results = study
    for key in ("init_digest", "batches_digest"):
        per_seed = {}
        for r in results["runs"]:
            per_seed.setdefault(r["seed"], set()).add(r[key])
        assert all(len(v) == 1 for v in per_seed.values()), (key, per_seed)
        assert len({next(iter(v)) for v in per_seed.values()}) == cfg.seeds, f"seeds must differ in {key}"


def test_batches_digest_is_the_seeded_sampler_stream(study, corpus):
    """Recompute the digest from a fresh WindowSampler with the seed: the runs saw exactly these windows."""
    import hashlib

    cfg, _, results = study
    train = data.load_split(corpus, "train", vocab_size=cfg.vocab_size, seq_len=cfg.seq_len)
    for seed in cfg.seed_list:
        sampler = data.WindowSampler(train, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                     grad_accum_steps=cfg.grad_accum_steps, seed=seed)
        h = hashlib.sha256()
        for _ in range(cfg.iters):
            for windows in sampler.next_step():
                h.update(windows.tobytes())
        assert {r["batches_digest"] for r in results["runs"] if r["seed"] == seed} == {h.hexdigest()}


def test_every_arm_and_mode_starts_from_the_baseline_weights():
    cfg = StudyConfig(**{**TINY, "arms": ",".join(ARMS), "modes": ",".join(CENTERING_MODES)})
    base = initial_state(cfg, seed=5)
    assert all(not torch.equal(base[k], initial_state(cfg, seed=6)[k]) for k in base if k.endswith("qkv.weight"))
    for arm in ARMS:
        for mode in ([BASELINE_MODE] if arm == "baseline" else CENTERING_MODES):
            model = build_model(cfg, RunSpec(5, arm, mode), base)
            state = model.state_dict()
            for key, tensor in base.items():
                assert torch.equal(state[key], tensor), (arm, mode, key)
            extra = set(state) - set(base)
            centering = [m for m in model.modules() if isinstance(m, VectorCentering)]
            assert bool(extra) == bool(centering) == (arm != "baseline")
            for key in extra:  # running statistics and learnable centres start at zero
                assert state[key].count_nonzero() == 0, key
            baseline = build_model(cfg, RunSpec(5, "baseline", BASELINE_MODE), base)
            assert weights_digest(model, base) == weights_digest(baseline, base)
    # The digest does see a change of one weight.
    model = build_model(cfg, RunSpec(5, "v", "adaptive"), base)
    before = weights_digest(model, base)
    with torch.no_grad():
        model.blocks[0].attn.proj.weight[0, 0] += 1e-3
    assert weights_digest(model, base) != before


# ---------------------------------------------------------------------------------------------------------------
# Statistics and verdicts, recomputed from the per-run numbers
# ---------------------------------------------------------------------------------------------------------------


def test_statistics_are_computed_from_the_runs(study):
    cfg, _, results = study
    loss = {(r["arm"], r["mode"], r["seed"]): r["final"]["val_loss"] for r in results["runs"]}
    train_mode = {(r["arm"], r["mode"], r["seed"]): r["final"]["val_loss_train_mode"] for r in results["runs"]}
    groups = {(g["arm"], g["mode"]): g for g in results["statistics"]["groups"]}
    assert set(groups) == {(a, m) for a, m, _ in loss}
    for (arm, mode), g in groups.items():
        values = np.array([loss[(arm, mode, s)] for s in cfg.seed_list])
        assert g["val_loss"]["n"] == cfg.seeds
        assert g["val_loss"]["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert g["val_loss"]["std"] == pytest.approx(values.std(ddof=1), rel=1e-9)
        tm = np.array([train_mode[(arm, mode, s)] for s in cfg.seed_list])
        assert g["val_loss_train_mode"]["mean"] == pytest.approx(tm.mean(), rel=1e-12)
        if arm == "baseline":
            assert "improvement_pct" not in g
            continue
        base = np.array([loss[("baseline", BASELINE_MODE, s)] for s in cfg.seed_list])
        diff = values - base
        improvement = 100.0 * (base - values) / base  # the seed's sign: positive = better
        assert g["diff"]["mean"] == pytest.approx(diff.mean(), rel=1e-9, abs=1e-12)
        assert g["diff"]["std"] == pytest.approx(diff.std(ddof=1), rel=1e-6, abs=1e-12)
        imp = g["improvement_pct"]
        assert imp["values"] == pytest.approx(list(improvement), rel=1e-9, abs=1e-12)
        assert imp["mean"] == pytest.approx(improvement.mean(), rel=1e-9, abs=1e-12)
        assert imp["se"] == pytest.approx(improvement.std(ddof=1) / math.sqrt(cfg.seeds), rel=1e-6, abs=1e-12)


def test_arm_verdicts_follow_the_rule_from_the_statistics(study):
    _, _, results = study
    groups = {(g["arm"], g["mode"]): g for g in results["statistics"]["groups"]}
    claims = {c.id: c for c in experiments.SEED_CLAIMS}
    arm_verdicts = [v for v in results["verdicts"] if claims[v["claim"]].kind == "arm"]
    # embeddings and qk+v, each in both modes
    assert sorted((v["claim"], v["mode"]) for v in arm_verdicts) == sorted(
        (c, m) for c in ("embeddings", "qk+v") for m in ("adaptive", "simple"))
    for v in arm_verdicts:
        claim = claims[v["claim"]]
        imp = groups[(claim.arm, v["mode"])]["improvement_pct"]
        assert v["measured_pct"] == imp["mean"] and v["se_pct"] == imp["se"]
        assert v["verdict"] == verdict_for(imp["mean"], imp["se"], imp["n"], claim.direction, claim.claimed_pct)[0]
    # The mode claim compares adaptive with simple, per seed averaged over the centered arms.
    (mode_verdict,) = [v for v in results["verdicts"] if v["claim"] == "adaptive"]
    assert mode_verdict["mode"] == "adaptive vs simple" and mode_verdict["n"] == 2


def test_mode_comparisons_per_arm_are_paired_per_seed(study):
    cfg, _, results = study
    loss = {(r["arm"], r["mode"], r["seed"]): r["final"]["val_loss"] for r in results["runs"]}
    comparisons = results["mode_comparisons"]
    assert sorted((c["arm"], c["other"]) for c in comparisons) == [("embeddings", "simple"), ("qk+v", "simple")]
    for c in comparisons:
        expected = [100.0 * (loss[(c["arm"], "simple", s)] - loss[(c["arm"], "adaptive", s)])
                    / loss[("baseline", BASELINE_MODE, s)] for s in cfg.seed_list]
        assert c["better_pct"]["values"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # The adaptive verdict is their mean over the arms, per seed.
    (verdict,) = [v for v in results["verdicts"] if v["claim"] == "adaptive"]
    per_seed = np.mean([c["better_pct"]["values"] for c in comparisons], axis=0)
    assert verdict["measured_pct"] == pytest.approx(per_seed.mean(), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    "mean, se, n, direction, claimed, expected, size",
    [
        (2.0, 0.3, 3, +1, 2.26, "confirmed", "consistent"),  # right sign, > 2 SE, claimed size inside +- 2 SE
        (0.5, 0.1, 3, +1, 2.26, "confirmed", "smaller (0.22x claimed)"),  # right sign, much smaller than claimed
        (-1.0, 0.2, 3, +1, 2.26, "refuted", "opposite sign"),  # significant in the opposite direction
        (0.1, 0.2, 3, +1, 2.26, "refuted", "smaller (0.044x claimed)"),  # within noise, +2.26 outside 0.1 +- 0.4
        (0.1, 0.2, 3, +1, None, "inconclusive", "-"),  # within noise, direction-only claim
        (-5.0, 4.0, 3, -1, -11.73, "inconclusive", "consistent"),  # within noise, claimed size not excluded
        (-12.0, 1.0, 3, -1, -11.73, "confirmed", "consistent"),
        (-30.0, 1.0, 3, -1, -11.73, "confirmed", "larger (2.6x claimed)"),
        (3.0, None, 1, +1, 2.26, "inconclusive", "-"),  # one seed: no standard error
    ],
)
def test_verdict_rule(mean, se, n, direction, claimed, expected, size):
    verdict, why = verdict_for(mean, se, n, direction, claimed)
    assert verdict == expected, why
    assert experiments.size_for(mean, se, claimed) == size


# ---------------------------------------------------------------------------------------------------------------
# Leak check and state-preserving evaluation
# ---------------------------------------------------------------------------------------------------------------


def _trained_tiny_model(mode: str) -> GPT:
    """A tiny model with centering everywhere, after a few real steps (non-trivial statistics)."""
    model = GPT(GPTConfig(vocab_size=61, dim=16, n_layers=1, n_heads=2, max_seq_len=12, center="all",
                          centering_mode=mode))
    opt = torch.optim.AdamW(model.optim_groups(0.1), lr=1e-2)
    for _ in range(3):
        idx = torch.randint(0, 61, (3, 13))
        model(idx[:, :-1], idx[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize("mode", CENTERING_MODES)
def test_leak_check_finds_exactly_the_training_leaks(mode):
    model = _trained_tiny_model(mode)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = leak_check(model, torch.randint(0, 61, (3, 12)), seed=1)
    # Eval mode never leaks: exactly no change.
    assert result["eval"]["future_change"] == 0.0 and result["eval"]["batch_change"] == 0.0
    assert not result["eval"]["leak"]
    # In training, the batch mean of simple and the alpha-weighted batch mean of momentum leak both ways.
    leaks = mode in ("simple", "momentum")
    assert result["train"]["future_leak"] == leaks and result["train"]["batch_leak"] == leaks, result["train"]
    # ... and the check changed nothing: buffers, parameters and the mode are as before.
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_train_mode_evaluation_restores_buffers_and_resets_them_per_batch():
    # What Trainer.evaluate(training=True) does: every batch judged from the same statistics, nothing kept.
    model = _trained_tiny_model("simple").eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randint(0, 61, (2, 12)), torch.randint(0, 61, (2, 12))) for _ in range(3)]
    losses = []
    with torch.no_grad(), preserved(model, training=True) as reset:
        for x, y in batches:
            reset()
            losses.append(float(model(x, y)))
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    expected = []
    for x, y in batches:
        fresh = _trained_tiny_model("simple")
        fresh.load_state_dict(state)
        with torch.no_grad():
            expected.append(float(fresh.train()(x, y)))
    assert losses == pytest.approx(expected, rel=1e-6)
    with torch.no_grad():
        assert float(model(*batches[0])) != pytest.approx(losses[0], rel=1e-6)  # eval mode differs


# ---------------------------------------------------------------------------------------------------------------
# Resume, refusals, report-only
# ---------------------------------------------------------------------------------------------------------------


def test_resume_skips_finished_runs_and_reruns_a_missing_one_identically(study, corpus, tmp_path):
    cfg, out, results = study
    copy = tmp_path / "study"
    shutil.copytree(out, copy)
    before = {p.name: p.read_text() for p in (copy / "runs").glob("*.json")}

    lines = []
    experiments.run_study(cfg, corpus, copy, log=lines.append)
    assert "10 already finished" in lines[0]
    assert not any(line.startswith("[run") for line in lines), lines
    assert {p.name: p.read_text() for p in (copy / "runs").glob("*.json")} == before

    victim = "s1-qk_v-simple.json"
    (copy / "runs" / victim).unlink()
    lines = []
    rebuilt = experiments.run_study(cfg, corpus, copy, log=lines.append)
    trained = {line.split(":")[0] for line in lines if line.startswith("[run")}
    assert trained == {"[run 10/10] seed 1 qk+v simple"}, trained
    old, new = json.loads(before[victim]), json.loads((copy / "runs" / victim).read_text())
    # Same init, same batches, same arithmetic: the rerun reproduces the run (CPU, reference ops).
    assert new["init_digest"] == old["init_digest"] and new["batches_digest"] == old["batches_digest"]
    assert new["final"]["val_loss"] == pytest.approx(old["final"]["val_loss"], abs=1e-6)
    # The aggregate is rebuilt from the run files.
    assert len(rebuilt["runs"]) == 10
    new_groups = {(g["arm"], g["mode"]): g["val_loss"]["mean"] for g in rebuilt["statistics"]["groups"]}
    old_groups = {(g["arm"], g["mode"]): g["val_loss"]["mean"] for g in results["statistics"]["groups"]}
    assert new_groups == pytest.approx(old_groups, abs=1e-6)


def test_runs_of_another_configuration_are_refused(study, corpus, tmp_path, capsys):
    _, out, _ = study
    copy = tmp_path / "study"
    shutil.copytree(out, copy)
    assert experiments.main(cli_args(corpus, copy, iters=7)) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "iters" in err


def test_report_only_rebuilds_from_the_runs_and_bad_flags_are_one_line_errors(study, tmp_path, capsys):
    _, out, results = study
    copy = tmp_path / "study"
    shutil.copytree(out, copy)
    for name in ("results.json", "results.md", "loss_curves.png", "bars.png"):
        (copy / name).unlink()
    assert experiments.main(["centering", "--out", str(copy), "--report-only"]) == 0
    rebuilt = json.loads((copy / "results.json").read_text())
    assert rebuilt["statistics"] == results["statistics"] and rebuilt["verdicts"] == results["verdicts"]
    assert (copy / "bars.png").exists() and (copy / "loss_curves.png").exists()
    capsys.readouterr()
    assert experiments.main(["centering", "--out", str(tmp_path / "x"), "--arms", "baseline,bogus"]) == 2
    assert "unknown arm" in capsys.readouterr().err
    assert experiments.main(["centering", "--out", str(tmp_path / "x"), "--modes", "sometimes"]) == 2
    assert "modes must be" in capsys.readouterr().err
    assert experiments.main(["centering", "--out", str(tmp_path / "empty"), "--report-only"]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_text_sources_are_prepared_once_under_the_study_directory(tmp_path, capsys, gpt2_encoding):
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    rng = random.Random(7)
    for i in range(3):
        (text_dir / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(800)))
    out = tmp_path / "study"
    args = ["centering", "--text", str(text_dir), "--out", str(out), "--iters", "1", "--seeds", "1",
            "--arms", "baseline", "--modes", "adaptive", "--dim", "16", "--n-layers", "1", "--n-heads", "2",
            "--seq-len", "8", "--batch-size", "2", "--grad-accum-steps", "1", "--eval-batches", "1",
            "--eval-points", "1", "--leak-batch", "2", "--device", "cpu"]
    assert experiments.main(args) == 0
    assert (out / "data" / "train.bin").exists() and (out / "runs" / "s0-baseline-none.json").exists()
    capsys.readouterr()
    assert experiments.main(args) == 0  # second time: same sources, data reused, the finished run skipped
    printed = capsys.readouterr().out
    assert "reusing" in printed and "1 already finished" in printed
