"""`python -m fastcenter.experiments centering ...`: the command line of the centering study."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
from typing import Optional

import torch

from .. import data
from ..nn import CENTERING_MODES
from .plan import ARMS, DEFAULT_ARMS, DEFAULT_MODES, StudyConfig
from .report import build_results
from .run import StudyError, prepare_text_corpus, run_study

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastcenter.experiments",
                                     description="Experiments with the fastcenter model.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "centering",
        help="the vector-centering study (paired seeds, eval-mode validation, leak check, verdicts)",
        description="The vector-centering study: does centering help a small GPT, where, and in which mode? Runs the study described in fastcenter/experiments/__init__.py; "
        "finished runs under --out are skipped, so an interrupted study continues where it stopped.",
    )
    d = StudyConfig()
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="DIR", help="directory holding train.bin and val.bin (GPT-2 token ids)")
    source.add_argument("--text", nargs="+", metavar="FILE_OR_DIR",
                        help="text files or directories (*.txt) to tokenize into OUT/data first")
    p.add_argument("--out", required=True, metavar="DIR", help="study directory (runs/, results.*, plots)")
    p.add_argument("--iters", type=int, default=d.iters, help=f"optimizer steps per run (default {d.iters})")
    p.add_argument("--seeds", type=int, default=d.seeds, help=f"paired seeds (default {d.seeds})")
    p.add_argument("--seed-offset", type=int, default=0, help="first seed (default 0): seeds are offset..offset+K-1")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma list of {', '.join(ARMS)} (default "
                   f"{','.join(DEFAULT_ARMS)}; the baseline always runs)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help=f"comma list of {', '.join(CENTERING_MODES)} (default {','.join(DEFAULT_MODES)})")
    for name, help_text in (("dim", "model width"), ("n_layers", "blocks"), ("n_heads", "attention heads"),
                            ("seq_len", "tokens per window"), ("batch_size", "windows per micro-batch"),
                            ("grad_accum_steps", "micro-batches per step"),
                            ("eval_batches", "validation batches of batch-size fixed windows"),
                            ("eval_points", "validation evaluations along each run (the last at --iters)"),
                            ("leak_batch", "sequences in the leak-check batch"),
                            ("log_interval", "print the training loss every N steps")):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name),
                       help=f"{help_text} (default {getattr(d, name)})")
    for name, help_text in (("lr", "peak learning rate"), ("min_lr_ratio", "cosine ends at lr * this"),
                            ("weight_decay", "AdamW weight decay on matrices"), ("beta1", "AdamW beta1"),
                            ("beta2", "AdamW beta2"), ("grad_clip", "gradient norm clip (0: off)")):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name),
                       help=f"{help_text} (default {getattr(d, name):g})")
    p.add_argument("--warmup-iters", type=int, default=None, help="linear warmup steps (default iters // 10)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size (default: the data's: its meta.json for a compacted corpus, else 50257)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=d.fused,
                   help="fastcenter's fused ops (Triton on a GPU, the CPU implementation on a CPU); --no-fused: the "
                   "eager reference (default: fused)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--workers", type=int, default=1,
                   help="runs at once, each in its own process (default 1). On a CPU, use one per core with "
                   "--threads 1: two single-thread processes beat one two-thread process several times over")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: torch's choice; 1 per worker with --workers)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rebuild results.json, results.md and the plots from OUT/runs")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = pathlib.Path(args.out)
    try:
        if args.report_only:
            build_results(out_dir)
            print(f"rebuilt {out_dir / 'results.json'}, results.md and the plots from {out_dir / 'runs'}")
            return 0
        fields = {f.name for f in dataclasses.fields(StudyConfig)}
        given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
        try:
            cfg = StudyConfig(**given)  # bad flags are refused before any data is touched
        except ValueError as e:
            raise StudyError(str(e)) from e
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
            cfg = dataclasses.replace(cfg, vocab_size=len(ids))
        if args.threads:
            torch.set_num_threads(args.threads)
        run_study(cfg, data_dir, out_dir, workers=args.workers, threads=args.threads)
    except (StudyError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

