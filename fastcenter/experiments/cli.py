"""`python -m fastcenter.experiments centering ...`: the command line of the centering study."""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

from .. import data
from ..config import CHOICES
from .corpus import PYTHON_CORPUS_PACKAGES, build_python_corpus
from .plan import ARMS, DEFAULT_ARMS, DEFAULT_MODES, FLAGS, STUDY_MODES, StudyConfig
from .records import StudyError
from .report import build_results
from .run import prepare_text_corpus, regime_of_study, run_study

# Flags whose default is decided later: from --iters, from the data.
_LATE_DEFAULTS = {"warmup_iters", "vocab_size"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastcenter.experiments", description="Experiments with the fastcenter model."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "centering",
        help="the vector-centering study (paired seeds, eval-mode validation, leak check, verdicts)",
        description="The vector-centering study: does centering help a small GPT, where, and in which mode? Runs "
        "the study described in fastcenter/experiments/__init__.py; finished runs under --out are skipped, so an "
        "interrupted study continues where it stopped.",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--data",
        metavar="DIR",
        help="directory holding train.bin and val.bin (GPT-2 token ids); "
        "with --report-only: the study's data, to compute its n-gram baselines",
    )
    source.add_argument(
        "--text",
        nargs="+",
        metavar="FILE_OR_DIR",
        help="text files or directories (*.txt) to tokenize into OUT/data first",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="study directory (runs/, results.*, plots)")
    p.add_argument(
        "--arms",
        default=",".join(DEFAULT_ARMS),
        help=f"comma list of arms ({', '.join(ARMS)}), each run in every --modes, or arm/mode pairs run in "
        f"that mode only (e.g. embeddings/simple); the baseline always runs (default "
        f"{','.join(DEFAULT_ARMS)})",
    )
    p.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help=f"comma list of {', '.join(STUDY_MODES)} (naive: the leak control, batch statistics in "
        f"evaluation too; default {','.join(DEFAULT_MODES)})",
    )
    defaults = StudyConfig()
    for name, (_, name_there, help_text) in FLAGS.items():
        option = "--" + name.replace("_", "-")
        default = None if name in _LATE_DEFAULTS else defaults.flag_value(name)
        if isinstance(default, bool):
            shown = f" (default: {'yes' if default else 'no'})"
            p.add_argument(option, action=argparse.BooleanOptionalAction, default=None, help=help_text + shown)
        elif name_there in CHOICES:
            choices = CHOICES[name_there]
            p.add_argument(option, choices=choices, default=None, help=f"{help_text} (default {default})")
        else:
            kind = int if name in _LATE_DEFAULTS else type(default)
            shown = "" if default is None else f" (default {default:g})"
            p.add_argument(option, type=kind, default=None, help=help_text + shown)
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="runs at once, each in its own process (default 1). On a CPU, use one per core with "
        "--threads 1: two single-thread processes beat one two-thread process several times over",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per run (default: torch's choice; 1 per worker with --workers)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no run that would end later than this after the start (judged by this session's longest run); "
        "the runs left wait for the next session, which the same command resumes (with --workers 1)",
    )
    p.add_argument(
        "--bundle",
        metavar="FILE",
        help="after every finished run and at the end, also write the study directory as one .tar.gz (what a GPU "
        "lease brings back; unpacked beside a study directory of the same name, it resumes there)",
    )
    p.add_argument(
        "--no-regime",
        action="store_true",
        help="skip the n-gram baselines (CPU work), e.g. on a GPU lease; --report-only --data DIR adds them later",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: rebuild results.json, results.md and the plots from OUT/runs (with --data, "
        "also the n-gram baselines)",
    )
    c = sub.add_parser(
        "python-corpus",
        help="a corpus of Python source (the standard library and installed packages) for long runs",
        description="Tokenize the .py files of this Python's standard library and of installed packages into "
        "train.bin / val.bin / meta.json (fastcenter/experiments/corpus.py): a corpus that needs no download.",
    )
    c.add_argument("--out", required=True, metavar="DIR", help="output directory")
    c.add_argument(
        "--packages",
        default=",".join(PYTHON_CORPUS_PACKAGES),
        help=f"comma list of installed packages whose source joins the standard library's "
        f"(default {','.join(PYTHON_CORPUS_PACKAGES)})",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = pathlib.Path(args.out)
    try:
        if args.command == "python-corpus":
            build_python_corpus(out_dir, [p.strip() for p in args.packages.split(",") if p.strip()])
            return 0
        if args.report_only:
            if args.data:
                regime_of_study(out_dir, args.data)
            build_results(out_dir)
            print(f"rebuilt {out_dir / 'results.json'}, results.md and the plots from {out_dir / 'runs'}")
            return 0
        given = {k: v for k, v in vars(args).items() if (k in FLAGS or k in ("arms", "modes")) and v is not None}
        cfg = study_config(given)  # bad flags are refused before any data is touched
        if args.data:
            data_dir = pathlib.Path(args.data)
            print(f"data: {data_dir}")
        elif args.text:
            data_dir = prepare_text_corpus(args.text, out_dir)
        else:
            print("No --data or --text given: using the demo corpus (the Python standard library's own source).")
            data_dir = data.ensure_demo_corpus()
        ids = data.token_ids(data_dir)
        if ids is not None and "vocab_size" not in given:  # a compacted corpus says its vocabulary size
            cfg = study_config({**given, "vocab_size": len(ids)})
        if args.threads:
            torch.set_num_threads(args.threads)
        run_study(
            cfg,
            data_dir,
            out_dir,
            workers=args.workers,
            threads=args.threads,
            time_budget_s=args.time_budget,
            regime=not args.no_regime,
            bundle=args.bundle,
        )
    except (StudyError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def study_config(flags: dict) -> StudyConfig:
    try:
        return StudyConfig.from_flags(**flags)
    except (TypeError, ValueError) as e:
        raise StudyError(str(e)) from e
