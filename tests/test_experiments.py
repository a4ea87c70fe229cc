"""The centering study end to end on a tiny configuration: outputs, pairing, statistics, verdicts, leaks, resume.

One study (2 seeds; baseline, embeddings and qk+v; modes adaptive and simple; a 1-layer dim-16 model, 6 steps
with gradient accumulation) runs once per module through the command line; the tests read what it wrote and
recompute from the per-run records what the aggregate claims. The CPU implementation of the ops (the study's
own choice on a machine without a GPU; the kernels have their own tests), one thread.
"""

import json
import math
import random
import shutil

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
)
from fastcenter.experiments.stats import holm, paired, verdict
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


pytestmark = pytest.mark.usefixtures("one_thread", "cpu_ops")


@pytest.fixture(scope="module")
def cpu_ops():
    """The ops' CPU implementation here and in the study's worker processes (which inherit the environment):
    conftest's TRITON_INTERPRET=1 would run every step of every run through the interpreted kernels, 20x slower."""
    with pytest.MonkeyPatch.context() as patch:
        if not torch.cuda.is_available():
            patch.setenv("TRITON_INTERPRET", "0")
        yield


@pytest.fixture(scope="module")
def corpus(token_corpus):
    """The synthetic corpus of GPT-2 ids (conftest): no tokenizer needed."""
    return token_corpus


@pytest.fixture(scope="module")
def study(corpus, tmp_path_factory, cpu_ops):
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
    for name in ("results.json", "results.md", "loss_curves.png", "contrasts.png", "mechanisms.png", "plan.json"):
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


def test_mechanisms_are_measured_at_every_evaluation(study):
    cfg, _, results = study
    for r in results["runs"]:
        mech = r["mechanisms"]
        assert mech["step"] == cfg.eval_steps and len(r["grad_norm_per_step"]) == cfg.iters
        assert all(g > 0 and math.isfinite(g) for g in r["grad_norm_per_step"])
        if r["arm"] == "baseline":
            assert mech["modules"] == {}
            continue
        expected = {"embeddings": {"emb_center"}, "qk+v": {"blocks.0.attn.q_center", "blocks.0.attn.k_center",
                                                           "blocks.0.attn.v_center"}}[r["arm"]]  # fmt: skip
        assert set(mech["modules"]) == expected
        for stats in mech["modules"].values():
            assert set(stats) == {"stream_rms", "mean_before", "mean_after", "running_mean"}
            assert all(len(v) == len(cfg.eval_steps) and all(math.isfinite(x) for x in v) for v in stats.values())
            if r["mode"] == "simple":  # training subtracts the batch mean itself: nothing of it is left
                assert max(stats["mean_after"]) <= 1e-5 * max(stats["stream_rms"])
            else:  # adaptive subtracts the running mean of earlier batches: some of this batch's mean stays
                assert min(stats["mean_after"]) > 0


def test_worker_processes_reproduce_the_in_process_runs(study, corpus, tmp_path):
    cfg, out, _ = study
    small = StudyConfig(**{**TINY, "seeds": 1, "arms": "baseline,embeddings", "modes": "adaptive"})
    experiments.run_study(small, corpus, tmp_path / "parallel", workers=2, threads=1, log=lambda s: None)
    for run_id in ("s0-baseline-none", "s0-embeddings-adaptive"):
        a = json.loads((out / "runs" / f"{run_id}.json").read_text())
        b = json.loads((tmp_path / "parallel" / "runs" / f"{run_id}.json").read_text())
        assert a["train_loss_per_step"] == b["train_loss_per_step"] and a["final"] == b["final"], run_id


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
    cfg = StudyConfig(**{**TINY, "n_layers": 2, "arms": ",".join(ARMS), "modes": ",".join(CENTERING_MODES)})
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


def test_contrasts_are_paired_t_tests_recomputed_from_the_runs(study):
    cfg, _, results = study
    loss = {(r["arm"], r["mode"], r["seed"]): r["final"]["val_loss"] for r in results["runs"]}
    assert results["complete_seeds"] == cfg.seed_list
    family = {c["label"]: c for c in results["contrasts"]}
    # Every centered arm in every mode against the baseline; embeddings against each other arm; adaptive
    # against simple per arm and pooled: the whole family, named before the data.
    expected = {f"{a} [{m}] - baseline" for a in ("embeddings", "qk+v") for m in cfg.modes}
    expected |= {f"embeddings - qk+v [{m}]" for m in cfg.modes}
    expected |= {"embeddings: adaptive - simple", "qk+v: adaptive - simple", "all arms: adaptive - simple"}
    assert set(family) == expected
    for mode in cfg.modes:
        c = family[f"embeddings [{mode}] - baseline"]
        d = np.array([loss[("embeddings", mode, s)] - loss[("baseline", BASELINE_MODE, s)] for s in cfg.seed_list])
        assert c["values"] == pytest.approx(list(d), abs=1e-12)
        se = d.std(ddof=1) / math.sqrt(len(d))
        assert c["mean"] == pytest.approx(d.mean(), abs=1e-12) and c["se"] == pytest.approx(se, rel=1e-9)
        half = 12.706204736174707 * se  # t(0.975, 1 degree of freedom)
        assert c["ci95"] == pytest.approx([d.mean() - half, d.mean() + half], rel=1e-6)
        t = d.mean() / se
        # Two seeds: t with 1 degree of freedom is Cauchy, p = 1 - 2 atan(|t|) / pi.
        assert c["p"] == pytest.approx(1 - 2 * math.atan(abs(t)) / math.pi, rel=1e-6)
    pooled = family["all arms: adaptive - simple"]
    per_seed = [np.mean([loss[(a, "adaptive", s)] for a in ("embeddings", "qk+v")])
                - np.mean([loss[(a, "simple", s)] for a in ("embeddings", "qk+v")]) for s in cfg.seed_list]
    assert pooled["values"] == pytest.approx(per_seed, abs=1e-12)
    # Holm over the whole family.
    assert [c["p_holm"] for c in results["contrasts"]] == pytest.approx(holm([c["p"] for c in results["contrasts"]]))


def test_verdicts_follow_the_rule_and_wait_for_complete_seeds(study, tmp_path):
    cfg, out, results = study
    by_label = {c["label"]: c for c in results["contrasts"]}
    for v in results["verdicts"]:
        if v["claim"] in ("embeddings", "qk+v"):
            c = by_label[f"{v['claim']} [{v['mode']}] - baseline"]
            assert v["claimed_nats"] == pytest.approx(-v["claimed_pct"] / 100 * results["baseline_mean"])
            assert v["verdict"] == verdict(c, +1, v["claimed_nats"])[0]
    assert "PRELIMINARY" not in (out / "results.md").read_text()
    # One run missing: the seed is incomplete, the report says so and gives no verdict.
    copy = tmp_path / "study"
    shutil.copytree(out, copy)
    (copy / "runs" / "s1-qk_v-simple.json").unlink()
    partial = experiments.build_results(copy, log=lambda s: None, plots=False)
    assert partial["complete_seeds"] == [0]
    md = (copy / "results.md").read_text()
    assert "PRELIMINARY" in md and "**confirmed**" not in md and "**refuted**" not in md


def _contrast(values):
    c = paired(values)
    c["p_holm"] = c["p"]
    c["significant"] = c["p"] is not None and c["p"] < 0.05
    return c


@pytest.mark.parametrize(
    "diffs, direction, claimed, expected",
    [
        ([-0.20, -0.22, -0.19, -0.21], +1, -0.2, "confirmed"),  # significantly better, as claimed
        ([0.20, 0.22, 0.19, 0.21], +1, -0.2, "refuted"),  # significantly worse: the opposite sign
        ([-0.01, 0.02, -0.02, 0.01], +1, -0.2, "refuted"),  # within noise, and 0.1 (half the claim) excluded
        ([-0.10, 0.12, -0.15, 0.08], +1, -0.2, "inconclusive"),  # within noise, half the claim not excluded
        ([-0.01, 0.02, -0.02, 0.01], +1, None, "inconclusive"),  # a claim of direction only
        ([0.5, 0.6, 0.55, 0.52], -1, 1.15, "confirmed"),  # "residual hurts", and it does
        ([0.3], +1, -0.2, "not tested"),  # one seed: no interval
    ],
)
def test_verdict_rule(diffs, direction, claimed, expected):
    assert verdict(_contrast(diffs), direction, claimed)[0] == expected


def test_holm_is_step_down_and_monotone():
    assert holm([0.01, 0.04, 0.03, None, 0.5]) == pytest.approx([0.04, 0.09, 0.09, None, 0.5])
    assert holm([0.001]) == [0.001] and holm([]) == []


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
    new_groups = {(g["arm"], g["mode"]): g["val_loss"]["mean"] for g in rebuilt["groups"]}
    old_groups = {(g["arm"], g["mode"]): g["val_loss"]["mean"] for g in results["groups"]}
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
    for name in ("results.json", "results.md", "loss_curves.png", "contrasts.png", "mechanisms.png", "plan.json"):
        (copy / name).unlink()
    assert experiments.main(["centering", "--out", str(copy), "--report-only"]) == 0
    rebuilt = json.loads((copy / "results.json").read_text())
    assert rebuilt["contrasts"] == results["contrasts"] and rebuilt["verdicts"] == results["verdicts"]
    assert (copy / "contrasts.png").exists() and (copy / "loss_curves.png").exists()
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
