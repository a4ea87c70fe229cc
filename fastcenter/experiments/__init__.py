"""The centering study: does vector centering help a small GPT, where, and in which mode?

    python -m fastcenter.experiments centering --data DIR --iters N --seeds K \\
        --arms baseline,embeddings,v,qk+v,residual-inner,residual --modes adaptive,causal --out DIR \\
        --workers 2 --threads 1

It tests the seed's claims (val loss after 1000 iterations of the seed model: baseline 5.0749, embeddings
centered 4.9603 (+2.26%), qk+v 4.9791 (+1.89%), v only 5.0174 (+1.13%), residual -11.73%, mlp -0.57%,
everything at once "catastrophic"; adaptive the recommended mode) with the package's model and data.

Design
    Arms and modes. An arm is a set of placements (`plan.ARMS`); every arm but the baseline runs once per mode.
        The baseline has no centering, so it runs once per seed. The residual stream is an arm whole and in its
        parts: the inner blocks, and the final stream (whose mean carries the token-frequency prior).
    Paired seeds. For seed s, the baseline model is built with `torch.manual_seed(s)` and its weights are
        loaded into every arm's model: all arms of a seed start from the same weights (the centering modules
        hold no weights except learnable centres, which start at zero, and their statistics, which start
        empty). The batches come from `fastcenter.data.WindowSampler` seeded with s, independent of the arm:
        every arm of a seed sees the same windows in the same order (digests of both are recorded).
    Training. Through the training core (`fastcenter.training.Trainer`: the very step, schedule and evaluation
        of train.py): AdamW over the model's parameter groups, linear warmup then cosine decay, gradient
        clipping, the same hyper-parameters for every arm; fastcenter's fused ops (Triton under bf16 autocast
        on a GPU, the CPU implementation in float32 on a CPU). On a CPU, runs go to `--workers` processes of
        one thread each.
    Evaluation. The validation loss in EVAL mode on fixed validation windows (the same for every run): the
        centering modules use their running statistics, so nothing leaks between tokens or sequences. Beside it
        the TRAIN-mode loss on the same windows (buffers restored before every batch and afterwards).
    Mechanisms. At every evaluation point, per centering module, on one validation batch in training mode:
        the norm of its running mean, of the batch mean entering it and of what is left after centering,
        against the stream's RMS; and every step's gradient norm before clipping (`run.measure_mechanisms`).
    Leak check. On one validation batch of the trained model, in eval and in train mode: replace the tokens
        after position t and measure the largest change of the logits at positions <= t (future leak); replace
        the other sequences of the batch and measure the largest change of the first sequence's logits
        (batch leak). A change above `LEAK_TOLERANCE` x max|logits| counts as a leak.
    Statistics and verdicts. Fixed in advance, in `stats.py` (its docstring is printed into results.md): paired
        differences in nats with 95% t-intervals, Holm's correction over the whole family of contrasts, a
        claimed size excluded only when the one-sided bound is below half of it, and a secondary "steps to
        reach the baseline's final loss". No verdict while any planned seed is incomplete.

Outputs (in --out)
    plan.json         the planned runs
    runs/<run>.json   one finished run each (config, digests, curves, mechanisms, final losses, leak check,
                      timings); written atomically when the run ends. A restarted study skips the runs found
                      there, so an interruption costs at most the runs in progress.
    results.json      config, environment, every run, contrasts, verdicts (rebuilt from runs/ every time)
    results.md        the analysis plan and the tables
    loss_curves.png   eval-mode validation loss against step, and its paired difference to the baseline
    contrasts.png     every arm-vs-baseline contrast with its 95% interval
    mechanisms.png    the mechanisms along training

Code
    plan.py    arms, modes, claims, StudyConfig, the plan of runs, the paired initial weights
    run.py     one run through the training core, the mechanisms, the leak check, the whole study (workers,
               resume)
    stats.py   the analysis: paired t, Holm, verdicts, steps to the baseline
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
from .run import Corpus, StudyError, leak_check, load_corpus, measure_mechanisms, run_study, train_run
from .stats import claim_verdicts, contrasts, holm, paired, verdict

__all__ = [
    "ARMS", "SEED_CLAIMS", "StudyConfig", "RunSpec", "plan_runs", "initial_state", "build_model", "train_run",
    "leak_check", "measure_mechanisms", "contrasts", "claim_verdicts", "verdict", "run_study", "build_results",
    "main", "Corpus", "StudyError", "load_corpus", "holm", "paired", "BASELINE_MODE", "DEFAULT_MODES", "Claim",
    "model_config", "build_parser",
]  # fmt: skip
