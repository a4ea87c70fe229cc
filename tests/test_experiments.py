"""The centering study end to end on a tiny configuration: outputs, pairing, statistics, verdicts, leaks, resume.

One study (2 seeds; baseline, embeddings and qk+v in modes adaptive and simple, and embeddings in the naive leak
control; a 1-layer dim-16 model, 6 steps with gradient accumulation) runs once per module through the command
line; the tests read what it wrote and recompute from the per-run records what the aggregate claims. The CPU
implementation of the ops (the study's own choice on a machine without a GPU; the kernels have their own tests),
one thread. The committed studies under bench/results/centering are read too: their records must stay readable.
"""

import dataclasses
import hashlib
import json
import math
import pathlib
import random
import shutil
import tarfile
from collections import Counter

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
from fastcenter.experiments.centering import NaiveCentering, measure_mechanisms, recording
from fastcenter.experiments.ngram import KneserNey, seen_windows
from fastcenter.experiments.plan import RUN_FORMAT, scale_differences, weights_digest
from fastcenter.experiments.records import load_runs
from fastcenter.experiments.stats import adjust, direction_verdict, holm, paired, size_verdict
from fastcenter.model import GPT, NANOGPT, GPTConfig
from fastcenter.nn import CENTERING_MODES, VectorCentering
from fastcenter.training import preserved

WORDS = (
    "the king queen lord lady night day sword crown love death blood heart hand eye fair foul sweet sour good ill "
    "come go speak hear see know think make take give tell call keep stand fall rise sleep wake die live "
    "and but or if when then now here there what who why how not no yes thou thee thy my mine our your his her"
).split()

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "centering"

TINY = dict(
    iters=6,
    seeds=2,
    arms="baseline,embeddings,qk+v,embeddings/naive",
    modes="adaptive,simple",
    dim=16,
    n_layers=1,
    n_heads=2,
    seq_len=16,
    batch_size=2,
    grad_accum_steps=2,
    eval_batches=2,
    eval_points=2,
    leak_batch=2,
    log_interval=3,
    lr=3e-3,
    device="cpu",
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
    cfg = StudyConfig.from_flags(**TINY)
    return cfg, out, json.loads((out / "results.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------


def test_every_planned_run_and_output_is_there(study):
    cfg, out, results = study
    names = (
        "results.json",
        "results.md",
        "loss_curves.png",
        "contrasts.png",
        "mechanisms.png",
        "plan.json",
        "ngrams.json",
    )
    for name in names:
        assert (out / name).stat().st_size > 0, name
    plan = plan_runs(cfg)
    # Baseline once per seed, every bare arm once per mode and seed, an arm/mode pair once per seed.
    assert cfg.cells == (
        ("embeddings", "adaptive"),
        ("qk+v", "adaptive"),
        ("embeddings", "simple"),
        ("qk+v", "simple"),
        ("embeddings", "naive"),
    )
    assert len(plan) == cfg.seeds * (1 + 2 * 2 + 1) == 12
    assert sorted(p.stem for p in (out / "runs").glob("*.json")) == sorted(s.run_id for s in plan)
    assert sorted(r["run_id"] for r in results["runs"]) == sorted(s.run_id for s in plan)
    for r in results["runs"]:
        assert r["steps_done"] == cfg.train.max_iters and len(r["train_loss_per_step"]) == cfg.train.max_iters
        assert r["curve"]["step"] == cfg.eval_steps == [3, 6]
        assert r["curve"]["val_loss"][-1] == r["final"]["val_loss"]
        assert all(math.isfinite(v) for v in r["curve"]["val_loss"] + [r["final"]["val_loss_train_mode"]])
        assert r["placements"] == list(ARMS[r["arm"]])
        assert (r["mode"] == BASELINE_MODE) == (r["arm"] == "baseline")
        assert r["configs"]["model"]["center"] == list(ARMS[r["arm"]]) and r["configs"]["train"]["seed"] == r["seed"]
    # The table names every arm and mode that ran, the regime, the verdicts, the leak control.
    md = (out / "results.md").read_text()
    for arm, mode in {(r["arm"], r["mode"]) for r in results["runs"]}:
        assert f"| {arm} | {mode} |" in md
    for section in (
        "## The regime",
        "## The claims",
        "## Paired differences along training",
        "## Leak control",
        "## Leak check",
    ):
        assert section in md


def test_adaptive_train_mode_loss_equals_eval_mode_and_simple_differs(study):
    """adaptive subtracts the stale running mean in both modes (identical losses); simple uses the batch mean
    in training, so its train-mode loss on the same windows differs."""
    _, _, results = study
    for r in results["runs"]:
        final = r["final"]
        if r["mode"] in (BASELINE_MODE, "adaptive", "naive"):  # naive: batch statistics in both modes
            assert final["val_loss_train_mode"] == pytest.approx(final["val_loss"], abs=1e-6), r["run_id"]
        else:
            assert abs(final["val_loss_train_mode"] - final["val_loss"]) > 1e-6, r["run_id"]


def test_mechanisms_are_measured_at_every_evaluation(study):
    cfg, _, results = study
    for r in results["runs"]:
        mech = r["mechanisms"]
        assert mech["step"] == cfg.eval_steps and len(r["grad_norm_per_step"]) == cfg.train.max_iters
        assert all(g > 0 and math.isfinite(g) for g in r["grad_norm_per_step"])
        if r["arm"] == "baseline":
            assert mech["modules"] == {}
            continue
        expected = {
            "embeddings": {"emb_center"},
            "qk+v": {"blocks.0.attn.q_center", "blocks.0.attn.k_center", "blocks.0.attn.v_center"},
        }[r["arm"]]
        assert set(mech["modules"]) == expected
        for stats in mech["modules"].values():  # naive keeps no running mean
            keys = {"stream_rms", "mean_before", "mean_after"} | (set() if r["mode"] == "naive" else {"running_mean"})
            assert set(stats) == keys
            assert all(len(v) == len(cfg.eval_steps) and all(math.isfinite(x) for x in v) for v in stats.values())
            if r["mode"] in ("simple", "naive"):  # training subtracts the batch mean itself: nothing of it is left
                assert max(stats["mean_after"]) <= 1e-5 * max(stats["stream_rms"])
            else:  # adaptive subtracts the running mean of earlier batches: some of this batch's mean stays
                assert min(stats["mean_after"]) > 0


def test_worker_processes_reproduce_the_in_process_runs(study, corpus, tmp_path):
    cfg, out, _ = study
    small = StudyConfig.from_flags(**{**TINY, "seeds": 1, "arms": "baseline,embeddings", "modes": "adaptive"})
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
    """Recompute the digest from a fresh WindowSampler with the seed: the runs saw exactly these windows (and the
    n-gram baselines count these windows)."""
    cfg, _, results = study
    t = cfg.train
    train = data.load_split(corpus, "train", vocab_size=cfg.model.vocab_size, seq_len=t.seq_len)
    for seed in cfg.seed_list:
        sampler = data.WindowSampler(
            train, seq_len=t.seq_len, batch_size=t.batch_size, grad_accum_steps=t.grad_accum_steps, seed=seed
        )
        h, seen = hashlib.sha256(), []
        for _ in range(t.max_iters):
            for windows in sampler.next_step():
                h.update(windows.tobytes())
                seen.append(windows)
        assert {r["batches_digest"] for r in results["runs"] if r["seed"] == seed} == {h.hexdigest()}
        windows, digest = seen_windows(train, cfg.result_fields(), seed)
        assert digest == h.hexdigest() and np.array_equal(windows, np.concatenate(seen))
    assert results["regime"]["batches_digest_match"]


def test_every_arm_and_mode_starts_from_the_baseline_weights():
    cfg = StudyConfig.from_flags(**{**TINY, "n_layers": 2, "arms": ",".join(ARMS), "modes": ",".join(CENTERING_MODES)})
    base = initial_state(cfg, seed=5)
    assert all(not torch.equal(base[k], initial_state(cfg, seed=6)[k]) for k in base if k.endswith("qkv.weight"))
    for arm in ARMS:
        for mode in [BASELINE_MODE] if arm == "baseline" else CENTERING_MODES:
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
    per_seed = [
        np.mean([loss[(a, "adaptive", s)] for a in ("embeddings", "qk+v")])
        - np.mean([loss[(a, "simple", s)] for a in ("embeddings", "qk+v")])
        for s in cfg.seed_list
    ]
    assert pooled["values"] == pytest.approx(per_seed, abs=1e-12)
    # Holm over the whole family.
    assert [c["p_holm"] for c in results["contrasts"]] == pytest.approx(holm([c["p"] for c in results["contrasts"]]))


def test_verdicts_follow_the_rule_and_wait_for_complete_seeds(study, tmp_path):
    cfg, out, results = study
    by_label = {c["label"]: c for c in results["contrasts"]}
    checked = 0
    for v in results["verdicts"]:
        if v["claim"] in ("embeddings", "qk+v"):
            c = by_label[f"{v['claim']} [{v['mode']}] - baseline"]
            assert v["claimed_nats"] == pytest.approx(-v["claimed_pct"] / 100 * results["baseline_mean"])
            # A 16-wide model for 6 steps is not the claims' configuration: every verdict is "at this scale".
            assert v["direction"] == direction_verdict(c, +1) + " at this scale"
            assert v["size"] == size_verdict(c, +1, v["claimed_nats"])
            checked += 1
    assert checked == 4
    assert results["scale_differences"] and "PRELIMINARY" not in (out / "results.md").read_text()
    # One run missing: the seed is incomplete, the report says so and gives no verdict.
    copy = tmp_path / "study"
    shutil.copytree(out, copy)
    (copy / "runs" / "s1-qk_v-simple.json").unlink()
    partial = experiments.build_results(copy, log=lambda s: None, plots=False)
    assert partial["complete_seeds"] == [0]
    md = (copy / "results.md").read_text()
    assert "PRELIMINARY" in md and "**pending**" in md
    assert "**confirmed" not in md and "**not reproduced" not in md and "**reversed" not in md


def _family(*diffs) -> list[dict]:
    return adjust([paired(list(d)) for d in diffs])


@pytest.mark.parametrize(
    "diffs, direction, expected",
    [
        ([-0.20, -0.22, -0.19, -0.21], +1, "confirmed"),  # significantly better, as claimed
        ([0.20, 0.22, 0.19, 0.21], +1, "reversed"),  # significantly worse: the opposite sign
        ([-0.01, 0.02, -0.02, 0.01], +1, "not reproduced"),  # within noise
        ([0.5, 0.6, 0.55, 0.52], -1, "confirmed"),  # "residual hurts", and it does
        ([-0.5, -0.6, -0.55, -0.52], -1, "reversed"),
        ([0.3], +1, "not tested"),  # one seed: no test
    ],
)
def test_direction_verdict(diffs, direction, expected):
    assert direction_verdict(_family(diffs)[0], direction) == expected


@pytest.mark.parametrize(
    "diffs, direction, claimed, expected",
    [
        ([-0.20, -0.22, -0.19, -0.21], +1, -0.2, "inside"),
        ([-0.01, 0.02, -0.02, 0.01], +1, -0.2, "excluded (smaller)"),  # a null that excludes the claimed gain
        ([-0.50, -0.52, -0.49, -0.51], +1, -0.2, "excluded (larger)"),
        ([0.20, 0.22, 0.19, 0.21], -1, 0.6, "excluded (smaller)"),  # a third of the claimed harm
        ([-0.10, 0.12, -0.15, 0.08], +1, -0.2, "inside"),  # within noise, the claim not excluded either
        ([-0.01, 0.02, -0.02, 0.01], +1, None, "no size claimed"),
        ([0.3], +1, -0.2, "not tested"),
    ],
)
def test_size_verdict(diffs, direction, claimed, expected):
    assert size_verdict(_family(diffs)[0], direction, claimed) == expected


def test_simultaneous_intervals_are_bonferroni_t_intervals():
    diffs = [
        [-0.01, 0.03, -0.02, 0.01],
        [0.1, 0.2, 0.15, 0.12],
        [0.0, 0.01, 0.02, -0.01],
        [1.0, 1.1, 0.9, 1.2],
        [-0.3, -0.2, -0.25, -0.22],
    ]
    family = _family(*diffs)
    alone = _family(diffs[0])[0]
    assert alone["ci_simultaneous"] == pytest.approx(alone["ci95"])  # a family of one: the 95% interval
    for c, d in zip(family, diffs):
        se = np.std(d, ddof=1) / math.sqrt(len(d))
        half = 5.84090930973336 * se  # t(1 - 0.05 / (2 * 5), 3 degrees of freedom), from tables
        assert c["family_size"] == 5
        assert c["ci_simultaneous"] == pytest.approx([np.mean(d) - half, np.mean(d) + half], rel=1e-6)


def test_holm_is_step_down_and_monotone():
    assert holm([0.01, 0.04, 0.03, None, 0.5]) == pytest.approx([0.04, 0.09, 0.09, None, 0.5])
    assert holm([0.001]) == [0.001] and holm([]) == []


# ---------------------------------------------------------------------------------------------------------------
# Leak check and state-preserving evaluation
# ---------------------------------------------------------------------------------------------------------------


def _trained_tiny_model(mode: str, center: str = "all") -> GPT:
    """A tiny model with centering (everywhere by default), after a few real steps (non-trivial statistics)."""
    model = GPT(
        GPTConfig(vocab_size=61, dim=16, n_layers=1, n_heads=2, max_seq_len=12, center=center, centering_mode=mode)
    )
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
    assert "12 already finished" in lines[0] and lines[2] == "to run: none"
    assert not any(line.startswith("[run") for line in lines), lines
    assert {p.name: p.read_text() for p in (copy / "runs").glob("*.json")} == before

    victim = "s1-qk_v-simple.json"
    (copy / "runs" / victim).unlink()
    lines = []
    rebuilt = experiments.run_study(cfg, corpus, copy, log=lines.append)
    trained = {line.split(":")[0] for line in lines if line.startswith("[run")}
    assert trained == {"[run 11/12] seed 1 qk+v simple"}, trained
    old, new = json.loads(before[victim]), json.loads((copy / "runs" / victim).read_text())
    # Same init, same batches, same arithmetic: the rerun reproduces the run (CPU, reference ops).
    assert new["init_digest"] == old["init_digest"] and new["batches_digest"] == old["batches_digest"]
    assert new["final"]["val_loss"] == pytest.approx(old["final"]["val_loss"], abs=1e-6)
    # The aggregate is rebuilt from the run files.
    assert len(rebuilt["runs"]) == 12
    new_groups = {(g["arm"], g["mode"]): g["val_loss"]["mean"] for g in rebuilt["groups"]}
    old_groups = {(g["arm"], g["mode"]): g["val_loss"]["mean"] for g in results["groups"]}
    assert new_groups == pytest.approx(old_groups, abs=1e-6)


def test_runs_name_their_data_by_the_corpus_identity(study, corpus):
    """Every record holds the identity fastcenter.data gives the corpus, and the digest of it."""
    _, _, results = study
    identity = data.load_corpus(corpus, vocab_size=None, seq_len=TINY["seq_len"]).identity
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    assert {json.dumps(r["data_identity"], sort_keys=True) for r in results["runs"]} == {
        json.dumps(identity, sort_keys=True)
    }
    assert {r["data_digest"] for r in results["runs"]} == {digest}


def test_a_directory_begun_before_the_identity_keeps_its_digest(study, corpus, tmp_path):
    """Records written before they held the corpus identity name the data by the sha256 of its files' bytes
    (as bench/results/centering/cpu-dim256 and cpu-dim256-1600 do): such a directory still resumes, its new runs
    take its digest, and other data is still refused."""
    cfg, out, _ = study
    copy = tmp_path / "study"
    shutil.copytree(out, copy)
    files = [hashlib.sha256((corpus / name).read_bytes()).hexdigest() for name in ("train.bin", "val.bin")]
    legacy = hashlib.sha256("".join(files).encode()).hexdigest()
    for path in (copy / "runs").glob("*.json"):
        record = json.loads(path.read_text())
        del record["data_identity"]
        path.write_text(json.dumps({**record, "data_digest": legacy}))
    (copy / "runs" / "s1-qk_v-simple.json").unlink()
    lines = []
    experiments.run_study(cfg, corpus, copy, log=lines.append)
    assert "11 already finished" in lines[0]
    rerun = json.loads((copy / "runs" / "s1-qk_v-simple.json").read_text())
    assert rerun["data_digest"] == legacy and "data_identity" in rerun
    other = tmp_path / "other"
    shutil.copytree(corpus, other)
    with open(other / "val.bin", "r+b") as f:  # one token changed: another corpus
        first = f.read(2)
        f.seek(0)
        f.write(bytes([first[0] ^ 1, first[1]]))
    with pytest.raises(experiments.StudyError, match="other data"):
        experiments.run_study(cfg, other, copy, log=lambda line: None)


def test_a_time_budget_leaves_runs_for_the_next_session_and_the_same_call_resumes(study, corpus, tmp_path):
    cfg, out, _ = study
    copy = tmp_path / "study"
    shutil.copytree(out, copy)
    for name in ("s1-embeddings-naive.json", "s1-qk_v-simple.json"):
        (copy / "runs" / name).unlink()
    lines = []
    experiments.run_study(cfg, corpus, copy, time_budget_s=1e-6, log=lines.append)  # spent before the first run
    assert any("2 run(s) left for the next session" in line for line in lines)
    assert not any(line.startswith("[run") for line in lines)
    sessions = [json.loads(line) for line in (copy / "sessions.jsonl").read_text().splitlines()]
    assert sessions[-1]["stopped_by_time_budget"] == 2 and sessions[-1]["runs_done"] == 0
    lines, bundle = [], copy / "bundle.tar.gz"  # inside the study directory: it leaves itself out
    experiments.run_study(cfg, corpus, copy, time_budget_s=1e6, bundle=bundle, log=lines.append)
    assert len({line.split(":")[0] for line in lines if line.startswith("[run")}) == 2
    assert len(list((copy / "runs").glob("*.json"))) == 12
    # The bundle is the study directory: unpacked elsewhere, it holds every record and rebuilds the same report.
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
        # Extraction filters exist from Python 3.11.4 / 3.10.12 on; pyproject.toml allows older patch releases.
        tar.extractall(tmp_path / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    assert "study/bundle.tar.gz" not in names and len([n for n in names if n.startswith("study/runs/")]) == 12
    rebuilt = experiments.build_results(tmp_path / "unpacked" / "study", log=lambda line: None, plots=False)
    assert rebuilt["contrasts"] == json.loads((copy / "results.json").read_text())["contrasts"]
    with pytest.raises(experiments.StudyError, match="--time-budget"):
        experiments.run_study(cfg, corpus, copy, workers=2, time_budget_s=60, log=lambda line: None)


def test_the_regime_can_wait_for_the_report(corpus, tmp_path):
    """--no-regime computes no n-gram baselines (a GPU lease's time); --report-only --data adds them later."""
    out = tmp_path / "later"
    args = cli_args(corpus, out, seeds=1, arms="baseline", iters=2, eval_points=1) + ["--no-regime"]
    assert experiments.main(args) == 0
    assert not (out / "ngrams.json").exists()
    assert json.loads((out / "results.json").read_text())["regime"] is None
    assert "Not computed" in (out / "results.md").read_text()
    assert experiments.main(["centering", "--out", str(out), "--report-only", "--data", str(corpus)]) == 0
    assert json.loads((out / "results.json").read_text())["regime"]["seeds"] == [0]


def test_the_python_corpus_is_the_source_of_the_standard_library_and_the_packages(tmp_path, monkeypatch, gpt2_encoding):
    std, site = tmp_path / "std", tmp_path / "site"
    for path, text in {
        std / "a.py": "import os\nprint(os.sep)\n",
        std / "json" / "b.py": "def f(x):\n    return x + 1\n",
        std / "site-packages" / "skipped.py": "x = 1\n",  # installed packages are not the standard library
        site / "mypkg" / "__init__.py": "__version__ = '0.1'\n",
        site / "mypkg" / "core.py": "class A:\n    pass\n",
    }.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.setattr(data, "stdlib_root", lambda: std)
    monkeypatch.syspath_prepend(str(site))
    out = tmp_path / "corpus"
    assert experiments.main(["python-corpus", "--out", str(out), "--packages", "mypkg"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["python_corpus"]["packages"] == {"mypkg": "0.1"}
    assert sorted(meta["train_documents"] + meta["val_documents"]) == ["__init__.py", "a.py", "core.py", "json/b.py"]
    tokens = np.concatenate([data.open_tokens(out / f"{split}.bin") for split in ("train", "val")])
    assert (tokens == data.EOT_TOKEN).sum() == 4 and len(tokens) == meta["train_tokens"] + meta["val_tokens"]
    assert experiments.main(["python-corpus", "--out", str(tmp_path / "x"), "--packages", "no_such_pkg"]) == 2


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
    args = [
        "centering",
        "--text",
        str(text_dir),
        "--out",
        str(out),
        "--iters",
        "1",
        "--seeds",
        "1",
        "--arms",
        "baseline",
        "--modes",
        "adaptive",
        "--dim",
        "16",
        "--n-layers",
        "1",
        "--n-heads",
        "2",
        "--seq-len",
        "8",
        "--batch-size",
        "2",
        "--grad-accum-steps",
        "1",
        "--eval-batches",
        "1",
        "--eval-points",
        "1",
        "--leak-batch",
        "2",
        "--device",
        "cpu",
    ]
    assert experiments.main(args) == 0
    assert (out / "data" / "train.bin").exists() and (out / "runs" / "s0-baseline-none.json").exists()
    capsys.readouterr()
    assert experiments.main(args) == 0  # second time: same sources, data reused, the finished run skipped
    printed = capsys.readouterr().out
    assert "reusing" in printed and "1 already finished" in printed


# ---------------------------------------------------------------------------------------------------------------
# The study's own instrumentation and leak control, attached from outside the library module
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["adaptive", "simple", "causal"])
def test_mechanism_probe_measures_what_the_definitions_say(mode):
    """The probe's numbers against the definitions, computed independently: the embedding centring (reached
    through center_for) from the token embeddings, the value centring (reached through forward) from what a
    forward hook sees enter and leave it; the running means as they were before the forward."""
    model = _trained_tiny_model(mode, center="embeddings,v")
    x, y = torch.randint(0, 61, (3, 12)), torch.randint(0, 61, (3, 12))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    measured = measure_mechanisms(model, x, y)
    assert set(measured) == {"emb_center", "blocks.0.attn.v_center"}
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and model.training

    def norms(s: torch.Tensor, after: torch.Tensor, running: torch.Tensor) -> dict:
        s, after = s.double().reshape(-1, s.shape[-1]), after.double().reshape(-1, s.shape[-1])
        return {
            "stream_rms": float(s.pow(2).sum(-1).mean().sqrt()),
            "mean_before": float(s.mean(0).norm()),
            "mean_after": float(after.mean(0).norm()),
            "running_mean": float(running.double().norm()),
        }

    emb = model.emb_center
    s = model.tok_emb.weight.detach()[x]
    if mode == "adaptive":
        center = state["emb_center.running_mean"]
    elif mode == "simple":
        center = s.mean((0, 1))
    else:
        prefix = s.double().cumsum(1) + emb.prior * state["emb_center.running_mean"].double()
        center = prefix / (torch.arange(1, 13, dtype=torch.float64) + emb.prior)[:, None]
    expected = {"emb_center": norms(s, s.double() - center.double(), state["emb_center.running_mean"])}
    seen = {}
    hook = model.blocks[0].attn.v_center.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad(), preserved(model, training=True) as reset:
        reset()
        model(x, y)
    hook.remove()
    expected["blocks.0.attn.v_center"] = norms(seen["x"], seen["y"], state["blocks.0.attn.v_center.running_mean"])
    for name, stats in expected.items():
        assert set(measured[name]) == set(stats)
        for key, value in stats.items():
            assert measured[name][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)


def test_the_probe_leaves_the_library_module_untouched():
    model = _trained_tiny_model("simple")
    centering = [m for m in model.modules() if isinstance(m, VectorCentering)]
    assert centering and not any(hasattr(m, attr) for m in centering for attr in ("track", "stats", "_record"))
    with recording(model) as stats:
        assert all("center_for" in vars(m) for m in centering)  # the wrapper, on the instance only
        model(torch.randint(0, 61, (2, 12)))
    assert len(stats) == len(centering)
    assert not any("center_for" in vars(m) for m in centering)
    assert all(m.center_for.__func__ is VectorCentering.center_for for m in centering)


def test_naive_centering_uses_batch_statistics_in_evaluation_too():
    naive = NaiveCentering(8).eval()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(naive(x), x - x.mean((0, 1)))
    residual = torch.randn(3, 5, 8)
    torch.testing.assert_close(naive.center_for(x.float(), residual), (x.float() + residual).mean((0, 1)))
    assert not list(naive.state_dict())


def test_naive_runs_train_as_simple_and_report_what_the_leak_gives(study):
    """The leak control trains the simple run's very weights; its eval-mode loss is the simple run's train-mode
    loss; its leak check finds the batch leak in evaluation; the report's "gain" is that loss minus the baseline."""
    cfg, _, results = study
    runs = {(r["arm"], r["mode"], r["seed"]): r for r in results["runs"]}
    for seed in cfg.seed_list:
        naive, simple = runs[("embeddings", "naive", seed)], runs[("embeddings", "simple", seed)]
        assert naive["train_loss_per_step"] == simple["train_loss_per_step"]
        assert naive["final"]["val_loss"] == pytest.approx(simple["final"]["val_loss_train_mode"], abs=1e-6)
        assert naive["leak"]["eval"]["future_leak"] and naive["leak"]["eval"]["batch_leak"]
        assert not simple["leak"]["eval"]["leak"]
    (control,) = [c for c in results["leak_control"] if c["arm"] == "embeddings"]
    assert control["source"] == "naive runs"
    base = {s: runs[("baseline", BASELINE_MODE, s)]["final"]["val_loss"] for s in cfg.seed_list}
    d = [runs[("embeddings", "naive", s)]["final"]["val_loss"] - base[s] for s in cfg.seed_list]
    assert control["values"] == pytest.approx(d, abs=1e-12)
    assert control["claimed_nats"] == pytest.approx(-0.0226 * results["baseline_mean"])
    # qk+v ran no naive arm: its control is read from the simple runs' train-mode loss.
    (qkv,) = [c for c in results["leak_control"] if c["arm"] == "qk+v"]
    assert qkv["source"].startswith("simple runs")
    # Not in the family of the claims' tests.
    assert not any(c.get("mode") == "naive" for c in results["contrasts"])


def test_paired_differences_along_training_are_recomputed_from_the_curves(study):
    cfg, _, results = study
    runs = {(r["arm"], r["mode"], r["seed"]): r for r in results["runs"]}
    curves = {(c["arm"], c["mode"]): c for c in results["paired_curves"]}
    assert set(curves) == {cell for cell in cfg.cells}
    for (arm, mode), c in curves.items():
        assert c["steps"] == cfg.eval_steps
        for seed in cfg.seed_list:
            a, b = (
                runs[(arm, mode, seed)]["curve"]["val_loss"],
                runs[("baseline", BASELINE_MODE, seed)]["curve"]["val_loss"],
            )
            assert c["per_seed"][str(seed)] == pytest.approx(np.subtract(a, b).tolist(), abs=1e-12)
        assert c["mean"] == pytest.approx(np.mean(list(c["per_seed"].values()), axis=0).tolist(), abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# The configuration: GPTConfig and TrainConfig inside, the flags and the committed studies unchanged
# ---------------------------------------------------------------------------------------------------------------

CPU_DIM256 = dict(
    iters=400,
    seeds=4,
    arms="baseline,embeddings,v,qk+v,residual-inner,residual",
    modes="adaptive,simple",
    dim=256,
    n_layers=4,
    n_heads=4,
    seq_len=256,
    batch_size=4,
    grad_accum_steps=1,
    eval_batches=20,
    eval_points=8,
    log_interval=25,
    device="cpu",
    vocab_size=19379,
)
HORIZON = {
    **CPU_DIM256,
    "iters": 1600,
    "seeds": 2,
    "arms": "baseline,embeddings,v",
    "modes": "simple",
    "eval_points": 16,
    "log_interval": 50,
}
CONFIRMATORY = {**HORIZON, "seeds": 4, "arms": "baseline,embeddings/simple,embeddings/adaptive,v/simple,qk+v/simple"}


def test_study_config_holds_the_model_and_training_configurations():
    cfg = StudyConfig.from_flags(**CPU_DIM256)
    assert isinstance(cfg.model, GPTConfig) and cfg.model.dim == 256 and cfg.model.max_seq_len == 256
    assert cfg.model.fused and cfg.train.max_iters == 400 and cfg.train.warmup_iters == 40
    assert cfg.train.eval_iters == 20 and cfg.eval_steps == [50, 100, 150, 200, 250, 300, 350, 400]
    run = cfg.run_config(3, torch.device("cpu"))
    assert (run.seed, run.device, run.dtype, run.max_iters, run.lr) == (3, "cpu", "float32", 400, 1e-3)
    # Every arm, the baseline included, splits its batch alike (train.py's "auto" would not on a GPU).
    assert run.micro_batch == run.batch_size == 4
    # The committed study's runs agree with these flags: same result fields, same plan.
    committed = json.loads((RESULTS / "cpu-dim256" / "plan.json").read_text())
    assert cfg.result_fields() == committed["config"]
    assert [s.run_id for s in plan_runs(cfg)] == committed["runs"]
    assert {r["config"] == committed["config"] for r in load_runs(RESULTS / "cpu-dim256")} == {True}
    assert all(r["format"] == RUN_FORMAT for r in load_runs(RESULTS / "cpu-dim256"))
    # A field with no flag of its own joins the result fields when it leaves its default.
    assert not any("." in k for k in cfg.result_fields())
    other = StudyConfig(
        model=dataclasses.replace(cfg.model, rope_base=500.0), train=cfg.train, arms=cfg.arms, modes=cfg.modes
    )
    assert other.result_fields() == {**cfg.result_fields(), "model.rope_base": 500.0}
    # So does an architecture flag, under its own name: the default model's studies keep their result fields.
    nanogpt = StudyConfig.from_flags(**CPU_DIM256, **NANOGPT)
    assert nanogpt.result_fields() == {**cfg.result_fields(), **NANOGPT}
    assert StudyConfig.from_flags(**CPU_DIM256, norm="rmsnorm", bias=False).result_fields() == cfg.result_fields()


def test_arm_mode_pairs_extend_the_horizon_into_the_confirmatory_design():
    """PLAN.md of cpu-dim256-1600: the confirmatory run reuses the horizon's 6 runs in the same directory."""
    horizon, confirmatory = StudyConfig.from_flags(**HORIZON), StudyConfig.from_flags(**CONFIRMATORY)
    assert horizon.result_fields() == confirmatory.result_fields()  # the finished runs agree with the new plan
    assert confirmatory.cells == (
        ("embeddings", "simple"),
        ("embeddings", "adaptive"),
        ("v", "simple"),
        ("qk+v", "simple"),
    )
    old, new = [s.run_id for s in plan_runs(horizon)], [s.run_id for s in plan_runs(confirmatory)]
    assert len(old) == 6 and len(new) == 4 * 5 and set(old) <= set(new)
    assert StudyConfig.from_flags(**{**HORIZON, "arms": "baseline,embeddings/simple,v/simple"}).cells == horizon.cells


@pytest.mark.parametrize(
    "arms, message",
    [
        ("baseline,embeddings/bogus", "unknown mode"),
        ("baseline/simple", "no centering mode"),
        ("bogus/simple", "unknown arm"),
    ],
)
def test_bad_arm_mode_pairs_are_one_line_errors(arms, message, tmp_path, capsys):
    assert experiments.main(["centering", "--out", str(tmp_path / "x"), "--arms", arms]) == 2
    assert message in capsys.readouterr().err


def test_the_study_flags_name_themselves_in_errors(tmp_path, capsys):
    assert experiments.main(["centering", "--out", str(tmp_path / "x"), "--iters", "0"]) == 2
    err = capsys.readouterr().err
    assert "--iters" in err and "--max-iters" not in err


def test_a_study_of_nanogpts_architecture_says_which_it_ran(corpus, tmp_path):
    """The architecture flags reach the model of every run, its record and the report's comparison with the
    claims: on nanoGPT's architecture the architecture is no difference (the width still is)."""
    out = tmp_path / "nanogpt"
    flags = dict(seeds=1, arms="baseline,v/simple", modes="simple", iters=2, eval_points=1)
    args = cli_args(corpus, out, **flags) + ["--norm", "layernorm", "--mlp", "gelu", "--positions", "learned"]
    assert experiments.main(args + ["--bias", "--norm-eps", "1e-5"]) == 0
    results = json.loads((out / "results.json").read_text())
    for r in results["runs"]:
        assert {k: r["configs"]["model"][k] for k in NANOGPT} == NANOGPT and r["config"]["norm"] == "layernorm"
        assert r["parameters"] == GPT(GPTConfig.from_dict(r["configs"]["model"])).num_params()
    notes = results["scale_differences"]
    assert not any(n.startswith("architecture") for n in notes) and any(n.startswith("width 16") for n in notes)
    default = scale_differences(results["config"], {})  # a record without a model config: the default model
    assert default[0] == (
        "architecture: RMSNorm, rotary positions, SwiGLU MLP; the claims': LayerNorm, learned absolute positions, "
        "GELU MLP (nanoGPT)"
    )


def test_the_committed_study_rebuilds_from_its_records(tmp_path):
    """bench/results/centering/cpu-dim256, written by an earlier version of this code: the rebuilt analysis has
    the contrasts it had (the tests are unchanged), its regime, and its verdicts in the new form."""
    copy = tmp_path / "cpu-dim256"
    shutil.copytree(RESULTS / "cpu-dim256", copy)
    committed = json.loads((RESULTS / "cpu-dim256" / "results.json").read_text())
    rebuilt = experiments.build_results(copy, log=lambda s: None, plots=False)
    assert len(rebuilt["runs"]) == 44 and rebuilt["complete_seeds"] == [0, 1, 2, 3]
    exact, numbers = ("label", "n", "significant"), ("mean", "ci95", "p", "p_holm")
    assert [{k: c[k] for k in exact} for c in rebuilt["contrasts"]] == [
        {k: c[k] for k in exact} for c in committed["contrasts"]
    ]
    # The same numbers to the last few bits: another numpy rounds the t distribution's tail in the 16th digit.
    assert [[c[k] for k in numbers] for c in rebuilt["contrasts"]] == [
        [pytest.approx(c[k], rel=1e-12, abs=0) for k in numbers] for c in committed["contrasts"]
    ]
    assert rebuilt["regime"]["batches_digest_match"] and len(rebuilt["regime"]["seeds"]) == 4
    assert {v["direction"].split(" at ")[0] for v in rebuilt["verdicts"]} <= {
        "confirmed",
        "not reproduced",
        "reversed",
        "not tested",
    }


# ---------------------------------------------------------------------------------------------------------------
# The n-gram baselines
# ---------------------------------------------------------------------------------------------------------------


def _kneser_ney_by_hand(windows: list[list[int]], order: int, V: int, D: float = 0.75):
    """Interpolated Kneser-Ney written out with dictionaries, for small data: the probability function."""
    grams = {k: Counter() for k in range(1, order + 2)}
    for w in windows:
        for t in range(1, len(w)):
            for k in range(1, order + 2):
                if t - k + 1 >= 0:
                    grams[k][tuple(w[t - k + 1 : t + 1])] += 1
    counts = {order: dict(grams[order])}
    for k in range(1, order):  # continuation counts from the distinct (k+1)-grams
        counts[k] = dict(Counter(g[1:] for g in grams[k + 1]))

    def p(context: tuple, w: int, k: int) -> float:
        if k == 0:
            return 1.0 / V
        lower = p(context, w, k - 1)
        if len(context) < k - 1:  # the window has no such context
            return lower
        h = context[len(context) - (k - 1) :]
        total = sum(c for g, c in counts[k].items() if g[:-1] == h)
        if total == 0:
            return lower
        types = sum(1 for g in counts[k] if g[:-1] == h)
        return (max(counts[k].get(h + (w,), 0) - D, 0) + D * types * lower) / total

    return lambda context, w: p(tuple(context), w, order)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_kneser_ney_matches_the_formula_written_out(order):
    rng = np.random.default_rng(order)
    V = 7
    train = rng.integers(0, 5, size=(6, 9))  # ids 5 and 6 never seen: only the uniform floor gives them mass
    val = rng.integers(0, V, size=(3, 9))
    model, by_hand = KneserNey(train, order, V), _kneser_ney_by_hand(train.tolist(), order, V)
    losses = [-math.log(by_hand(list(w[max(0, t - order + 1) : t]), int(w[t]))) for w in val for t in range(1, 9)]
    assert model.loss(val) == pytest.approx(np.mean(losses), rel=1e-12)
    # A distribution for every context: seen, unseen, and at the start of a window.
    for context in ([1, 2], [6, 6], [-1, 3], [-1, -1]):
        ctx = np.array([context[3 - order :]] * V, dtype=np.int64).reshape(V, order - 1)
        assert model.probability(ctx, np.arange(V)).sum() == pytest.approx(1.0, abs=1e-12)


def test_every_evaluation_step_is_reported_with_its_regime(corpus, tmp_path):
    """A horizon-like study (an evaluation at every one of 8 steps): the report carries every step's paired
    difference and every step's n-gram levels, and an arm/mode pair alone."""
    out = tmp_path / "horizon"
    args = cli_args(corpus, out, iters=8, eval_points=8, seeds=1, arms="baseline,v/simple", modes="adaptive")
    assert experiments.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert sorted(r["run_id"] for r in results["runs"]) == ["s0-baseline-none", "s0-v-simple"]
    (curve,) = results["paired_curves"]
    assert curve["steps"] == list(range(1, 9)) and results["regime"]["step"] == list(range(1, 9))
    md = (out / "results.md").read_text()
    along = md[md.index("## Paired differences along training") :]
    assert all(f"\n| {step} | " in along for step in range(1, 9))
    # Fewer tokens seen, a worse count table: the bigram's loss falls as the steps' windows accumulate.
    bigram = results["regime"]["by_step"]["bigram"]
    assert bigram[0] > bigram[-1]
