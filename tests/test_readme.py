"""The README's commands are the code's commands: every flag exists, the quick start is one path a user can
follow top to bottom (train -> resume -> sample in the same run directory), the CPU run is the one train.py
suggests, and CI installs and tests exactly as the README says."""

import pathlib
import re
import shlex

import pytest

from fastcenter import config, data, sample
from fastcenter.experiments import cli as experiments_cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def commands(text: str) -> list[list[str]]:
    """Every command line of the README's indented or fenced blocks (continuation lines joined), as argv lists;
    trailing comments dropped, and `cmd1 && cmd2` split."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not re.match(r"^(pip |python |torchrun )", line):
            continue
        line = line.split("  #")[0]
        for part in line.split("&&"):
            out.append(shlex.split(part))
    return out


def section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def train_args(argv: list[str]) -> list[str] | None:
    """The flags of a train.py command (plain or under torchrun), else None."""
    if "train.py" not in argv:
        return None
    return [a for a in argv[argv.index("train.py") + 1 :]]


ALL = commands(README)


def test_every_train_command_parses_with_the_real_flags():
    found = [args for args in map(train_args, ALL) if args is not None]
    assert len(found) >= 6
    for args in found:
        config.build_parser().parse_args(args)  # a UsageError (unknown flag, bad value) fails the test


@pytest.mark.parametrize(
    "module, parser",
    [
        ("fastcenter.sample", sample.build_parser),
        ("fastcenter.data", data.build_parser),
        ("fastcenter.experiments", experiments_cli.build_parser),
    ],
)
def test_every_module_command_parses_with_the_real_flags(module, parser):
    found = [argv[argv.index(module) + 1 :] for argv in ALL if argv[:2] == ["python", "-m"] and argv[2] == module]
    assert found, f"the README runs no {module} command"
    for args in found:
        parser().parse_args(args)


def test_quick_start_is_one_path_train_resume_sample():
    steps = commands(section("Quick start"))
    trains = [train_args(a) for a in steps if train_args(a) is not None]
    first, resume = trains[0], trains[1]
    out_dir = config.resolve_configs(first)[0].out_dir  # the default, as a user who types it gets
    assert "--resume" in resume and resume[resume.index("--out-dir") + 1] == out_dir
    (sampling,) = [a for a in steps if "fastcenter.sample" in a]
    ckpt = pathlib.Path(sampling[sampling.index("--ckpt") + 1])
    assert ckpt == pathlib.Path(out_dir) / "ckpt.pt"


def test_training_section_paths_fit_together():
    steps = commands(section("Training"))
    prepared = next(a[a.index("--out") + 1] for a in steps if "prepare" in a)
    runs = [train_args(a) for a in steps if train_args(a) is not None]
    first = runs[0]
    assert first[first.index("--data") + 1] == prepared
    run_dir = first[first.index("--out-dir") + 1]
    assert any("--resume" in r and r[r.index("--out-dir") + 1] == run_dir for r in runs)
    (sampling,) = [a for a in steps if "fastcenter.sample" in a]
    assert pathlib.Path(sampling[sampling.index("--ckpt") + 1]) == pathlib.Path(run_dir) / "ckpt.pt"


def test_the_cpu_run_is_the_one_train_py_suggests():
    (cpu,) = [a for a in commands(section("On a CPU")) if train_args(a) is not None]
    assert cpu == shlex.split(config.CPU_COMMAND)


def test_ci_installs_and_tests_exactly_as_the_readme_says():
    install_and_test = [a for a in commands(section("Quick start")) if a[:2] == ["pip", "install"]]
    ci = (ROOT / ".ci" / "run").read_text()
    test_install = next(a for a in install_and_test if "-e" in a and "dev" in a[-1])
    assert f'pip install -e "{test_install[-1]}"' in ci
    assert re.search(r"^python -m pytest$", ci, re.M) and "python -m pytest" in section("Quick start")
