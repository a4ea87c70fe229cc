"""The centering study: does vector centering help a small GPT, where, and in which mode?

    python -m fastcenter.experiments centering --data DIR --iters N --seeds K \\
        --arms baseline,embeddings,v,qk+v,residual-inner,residual --modes adaptive,simple --out DIR \\
        --workers 2 --threads 1

It tests the claims of the origin study (a nanoGPT model, LayerNorm, learned positions and GELU, 384-768 wide: val
loss after 1000 iterations, baseline 5.0749, embeddings centered 4.9603 (+2.26%), qk+v 4.9791 (+1.89%), v only
5.0174 (+1.13%), residual -11.73%, mlp -0.57%, everything at once "catastrophic"; adaptive the recommended mode)
with this package's model: the default model (RMSNorm, RoPE, SwiGLU), or nanoGPT's architecture through the
model's options (--norm layernorm --mlp gelu --positions learned --bias; fastcenter.model.NANOGPT).

Design
    Arms and modes. An arm is a set of placements (`plan.ARMS`); every arm but the baseline runs in every mode
        given, or ("arm/mode" on the command line) in one mode only. The baseline has no centering, so it runs
        once per seed. The residual stream is an arm whole and in its parts: the inner blocks, and the final
        stream (whose mean carries the token-frequency prior).
    Paired seeds. For seed s, the baseline model is built with `torch.manual_seed(s)` and its weights are
        loaded into every arm's model: all arms of a seed start from the same weights (the centering modules
        hold no weights except learnable centres, which start at zero, and their statistics, which start
        empty). The batches come from `fastcenter.data.WindowSampler` seeded with s, independent of the arm:
        every arm of a seed sees the same windows in the same order (digests of both are recorded).
    Training. Through the training core (`fastcenter.training.Trainer`: the very step, schedule and evaluation
        of train.py): AdamW over the model's parameter groups, linear warmup then cosine decay, gradient
        clipping, the same hyper-parameters for every arm; fastcenter's fused ops (Triton under bf16 autocast
        on a GPU, the CPU implementation in float32 on a CPU). On a CPU, runs go to `--workers` processes of
        one thread each. `StudyConfig` holds the model's `GPTConfig` and the training core's `TrainConfig`.
    Evaluation. The validation loss in EVAL mode on fixed validation windows (the same for every run): the
        centering modules use their running statistics, so nothing leaks between tokens or sequences. Beside it
        the TRAIN-mode loss on the same windows (buffers restored before every batch and afterwards).
    Mechanisms. At every evaluation point, per centering module, on one validation batch in training mode:
        the norm of its running mean, of the batch mean entering it and of what is left after centering,
        against the stream's RMS (a probe the study attaches: `centering.recording`); and every step's gradient
        norm before clipping.
    Leak check. On one validation batch of the trained model, in eval and in train mode: replace the tokens
        after position t and measure the largest change of the logits at positions <= t (future leak); replace
        the other sequences of the batch and measure the largest change of the first sequence's logits
        (batch leak). A change above `LEAK_TOLERANCE` x max|logits| counts as a leak.
    Leak control. Mode "naive" (`centering.NaiveCentering`, the study's own): the batch mean subtracted in
        evaluation too. What it "gains" on the validation loss is the leak's.
    Regime. Count-based n-gram models (`ngram.py`) fitted to the tokens each seed's runs saw and to the training
        split, scored on the same validation windows: which phase training reached.
    Statistics and verdicts. In `stats.py` (its docstring is printed into results.md): paired differences in
        nats with 95% t-intervals, Holm's correction over the whole family of contrasts, simultaneous intervals,
        verdicts on direction and on size apart, "at this scale" wherever the configuration is not the claims'.
        No verdict while any planned seed is incomplete.

Outputs (in --out)
    plan.json         the planned runs
    runs/<run>.json   one finished run each (config, the model's configuration, the data's identity, digests,
                      curves, mechanisms, final losses, leak check, timings); written atomically when the run
                      ends. A restarted study skips the runs found there, so an interruption costs at most the
                      runs in progress; --time-budget ends a session before a run it could not finish, and
                      --bundle FILE keeps the whole directory in one .tar.gz, rewritten after every run (what
                      a GPU lease brings back).
    ngrams.json       the n-gram baselines (the regime)
    results.json      config, environment, every run, contrasts, verdicts (rebuilt from runs/ every time)
    results.md        the analysis and the tables
    loss_curves.png   eval-mode validation loss against step with the n-gram levels, and every arm's paired
                      difference to the baseline against step
    contrasts.png     every arm-vs-baseline contrast with its intervals
    mechanisms.png    the mechanisms along training

Code
    plan.py       arms, modes, the claims, StudyConfig, the plan of runs, the paired initial weights
    centering.py  the study's own centering code: the mechanism probe and the naive leak control
    run.py        one run through the training core, the leak check, the whole study (workers, resume)
    records.py    the run records of a study directory, their compatibility, the data they name
    corpus.py     a corpus of Python source for long runs (`python -m fastcenter.experiments python-corpus`)
    ngram.py      the n-gram baselines
    stats.py      the analysis: paired t, Holm, simultaneous intervals, verdicts, secondary outcomes
    report.py     results.json, results.md, plots
    cli.py        the command line (also `python -m fastcenter.experiments`)
"""

from .centering import NaiveCentering, measure_mechanisms, recording, use_naive_centering
from .cli import build_parser, main
from .plan import (
    ARMS,
    BASELINE_MODE,
    CLAIMS,
    DEFAULT_MODES,
    Claim,
    RunSpec,
    StudyConfig,
    build_model,
    initial_state,
    model_config,
    plan_runs,
)
from .records import Corpus, StudyError, load_corpus
from .report import build_results
from .run import leak_check, run_study, train_run
from .stats import claim_verdicts, contrasts, direction_verdict, holm, paired, size_verdict

__all__ = [
    "ARMS",
    "CLAIMS",
    "StudyConfig",
    "RunSpec",
    "plan_runs",
    "initial_state",
    "build_model",
    "train_run",
    "leak_check",
    "measure_mechanisms",
    "recording",
    "NaiveCentering",
    "use_naive_centering",
    "contrasts",
    "claim_verdicts",
    "direction_verdict",
    "size_verdict",
    "run_study",
    "build_results",
    "main",
    "Corpus",
    "StudyError",
    "load_corpus",
    "holm",
    "paired",
    "BASELINE_MODE",
    "DEFAULT_MODES",
    "Claim",
    "model_config",
    "build_parser",
]
