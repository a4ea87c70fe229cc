"""A corpus for runs longer than Shakespeare, from what a machine without a network has: Python source.

    python -m fastcenter.experiments python-corpus --out DIR [--packages torch,numpy,triton]

Every .py file of this interpreter's standard library (as the demo corpus, `fastcenter.data.ensure_demo_corpus`)
and of the named installed packages, one file one document, tokenized with GPT-2's BPE by
`fastcenter.data.prepare` (2% of the tokens, by document, for validation). Deterministic for one Python and one
set of package versions, which meta.json records beside the files' digests. With CPython 3.11.7, torch 2.13.0,
numpy and triton 3.9.0 it holds about 40.5M training tokens (bench/results/centering/gpu-nanogpt384/PLAN.md).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pathlib
import platform
from collections.abc import Callable

from .. import data
from .records import StudyError

PYTHON_CORPUS_PACKAGES = ("torch", "numpy", "triton")
PYTHON_CORPUS_VAL_FRACTION = 0.02


def build_python_corpus(out_dir, packages=PYTHON_CORPUS_PACKAGES, log: Callable[[str], None] = print) -> dict:
    """Tokenize the standard library's and `packages`' .py files into out_dir; returns meta.json's content."""
    roots, versions = [data.stdlib_root()], {}
    for name in packages:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            raise StudyError(f"--packages: {name} is not installed here ({e})") from None
        if getattr(module, "__file__", None) is None:
            raise StudyError(f"--packages: {name} has no source folder (a namespace package?)")
        roots.append(pathlib.Path(module.__file__).parent)
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # imported from a folder, not installed
            versions[name] = getattr(module, "__version__", None)
    sources = {"python": platform.python_version(), "packages": versions}
    log(f"python-corpus: the .py files of Python {sources['python']}'s standard library and {versions}")
    return data.prepare(
        roots,
        out_dir,
        val_fraction=PYTHON_CORPUS_VAL_FRACTION,
        pattern="*.py",
        skip_dirs=data.DEMO_SKIP_DIRS,
        extra_meta={"python_corpus": sources},
        log=log,
    )
