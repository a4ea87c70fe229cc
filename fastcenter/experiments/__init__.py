"""The centering study: does vector centering help a small GPT, where, and in which mode?

    python -m fastcenter.experiments centering --data DIR --iters N --seeds K \\
        --arms baseline,embeddings,v,qk,qk+v,residual,mlp,all --modes adaptive,simple,causal --out DIR

It tests the seed's claims (val loss after 1000 iterations of the seed model: baseline 5.0749, embeddings
centered 4.9603 (+2.26%), qk+v 4.9791 (+1.89%), v only 5.0174 (+1.13%), residual -11.73%, mlp -0.57%,
everything at once "catastrophic"; adaptive the recommended mode) with the package's model and data.

Design
    Arms and modes. An arm is a set of placements (`ARMS`); every arm but the baseline runs once per mode. The
        baseline has no centering, so it runs once per seed.
    Paired seeds. For seed s, the baseline model is built with `torch.manual_seed(s)` and its weights are
        loaded into every arm's model: all arms of a seed start from the same weights (the centering modules
        hold no weights except learnable centres, which start at zero, and their statistics, which start
        empty). The batches come from `fastcenter.data.WindowSampler` seeded with s, independent of the arm:
        every arm of a seed sees the same windows in the same order. Differences between arms of one seed are
        then due to the centering alone, and the paired difference (arm - baseline, per seed) cancels most of
        the seed-to-seed noise.
    Training. AdamW over the model's parameter groups, linear warmup then cosine decay, gradient clipping, the
        same hyper-parameters for every arm. On CUDA: the fused ops (`GPTConfig.fused`) under bf16 autocast;
        elsewhere the reference ops in float32.
    Evaluation. The validation loss in EVAL mode on fixed validation windows (`fastcenter.data`'s evenly spaced
        positions, the same for every run): the centering modules use their running statistics, so nothing
        leaks between tokens or sequences. Beside it the TRAIN-mode loss on the same windows (forward in
        training mode under no_grad, buffers restored before every batch and afterwards): for `simple` and
        `momentum` this is what the training loss measured, batch statistics included, and the gap between
        the two shows how far the training-time view was from what the model can do at inference.
    Leak check. On one validation batch of the trained model, in eval and in train mode: replace the tokens
        after position t and measure the largest change of the logits at positions <= t (future leak); replace
        the other sequences of the batch and measure the largest change of the first sequence's logits
        (batch leak). A change above `LEAK_TOLERANCE` x max|logits| counts as a leak. Expected: eval mode never
        leaks; in training, `simple` leaks (batch mean) and `momentum` leaks scaled by its alpha.
    Statistics and verdicts. Per arm and mode: mean +- std over seeds of the eval-mode loss; the paired change
        against the baseline, per seed 100 * (baseline - arm) / baseline (the seed's sign: positive = better),
        then its mean, std and standard error (SE = std / sqrt(n)). Each seed claim gets a verdict by
        `verdict_for` (the rule is written there and in results.md): confirmed if the measured change has the
        claimed sign and exceeds 2 SE; refuted if it has the opposite sign beyond 2 SE, or if it is within noise
        while the claimed size lies outside measured +- 2 SE; otherwise inconclusive.

Outputs (in --out)
    runs/<run>.json   one finished run each (config, weights and data digests, curves, final losses, leak
                      check, timings); written atomically when the run ends. A restarted study skips the runs
                      found there, so an interruption costs at most the run in progress.
    results.json      config, environment, every run, statistics, verdicts (rebuilt from runs/ every time)
    results.md        the tables: losses, paired changes, verdicts, leaks
    loss_curves.png   eval-mode validation loss against step, and its paired difference to the baseline
    bars.png          paired change per arm and mode with 2-SE error bars, the seed's claims marked

Code
    plan.py    arms, modes, claims, StudyConfig, the plan of runs, the paired initial weights
    run.py     one run through the training core (fastcenter.training.Trainer, the step train.py uses), the
               leak check, the whole study with resume
    stats.py   statistics and verdicts
    report.py  results.json, results.md, plots
    cli.py     the command line (also `python -m fastcenter.experiments`)

The numbers hold for the configuration that was run. A model, data set or number of steps other than the seed's
tests the claims at that size only.
"""

from .cli import build_parser, main
from .plan import (
    ARMS, BASELINE_MODE, DEFAULT_MODES, SEED_CLAIMS, Claim, RunSpec, StudyConfig, build_model, initial_state,
    model_config, plan_runs,
)  # fmt: skip
from .report import build_results
from .run import Corpus, StudyError, leak_check, load_corpus, run_study, train_run
from .stats import aggregate, size_for, verdict_for

__all__ = [
    "ARMS", "SEED_CLAIMS", "StudyConfig", "RunSpec", "plan_runs", "initial_state", "build_model", "train_run",
    "leak_check", "aggregate", "verdict_for", "run_study", "main",
]  # fmt: skip
