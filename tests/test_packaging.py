"""The kernels/ folder installs as fastcenter.kernels and is never a top-level module named "kernels": from the
repository root (where `python -m pytest` puts it on sys.path) it must not shadow the PyPI package of that
name (Hugging Face's kernel hub, which transformers imports)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_at_root(code: str, tmp_path, with_other: bool) -> subprocess.CompletedProcess:
    env_path = []
    if with_other:  # another project's package named "kernels", installed elsewhere on sys.path
        (tmp_path / "site" / "kernels").mkdir(parents=True)
        (tmp_path / "site" / "kernels" / "__init__.py").write_text('WHO = "the other kernels package"\n')
        env_path = [str(tmp_path / "site")]
    prelude = f"import sys; sys.path[1:1] = {env_path!r}; "  # after '' (the root, as python -c / -m put it)
    # -S (no site-packages) where the code needs only the standard library: whether this environment happens to
    # have PyPI's "kernels" installed (transformers 5 may pull it in) must not decide the outcome.
    isolated = not code.startswith("import fastcenter")
    env = {k: v for k, v in os.environ.items() if not (isolated and k == "PYTHONPATH")}
    return subprocess.run(
        [sys.executable, *(["-S"] if isolated else []), "-c", prelude + code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_repository_folder_steps_aside_for_an_installed_kernels_package(tmp_path):
    result = run_at_root("import kernels; print(kernels.WHO)", tmp_path, with_other=True)
    assert result.returncode == 0 and result.stdout.strip() == "the other kernels package", result.stderr


def test_without_one_import_kernels_gives_an_empty_namespace_that_transformers_reads_as_absent(tmp_path):
    # transformers' probe: find_spec("kernels"), then (no distribution metadata) import it and call a module
    # without __file__ and __version__ a namespace package, i.e. not installed. It must neither raise nor see code.
    code = (
        "import importlib, importlib.util; assert importlib.util.find_spec('kernels') is not None; "
        "m = importlib.import_module('kernels'); "
        "print(getattr(m, '__file__', None), getattr(m, '__version__', None), list(m.__path__), dir(m)); "
        "import kernels.norm"
    )
    result = run_at_root(code, tmp_path, with_other=False)
    assert "ModuleNotFoundError: No module named 'kernels.norm'" in result.stderr, result.stderr
    file, version, path, names = result.stdout.split(" ", 3)
    assert (file, version, path) == ("None", "None", "[]"), result.stdout
    assert not [n for n in eval(names) if not n.startswith("__")], names  # nothing of the folder's code


def test_fastcenter_kernels_is_the_folder(tmp_path):
    code = "import fastcenter.kernels as k, fastcenter.kernels.norm as n; print(k.__file__); print(n.__name__)"
    result = run_at_root(code, tmp_path, with_other=True)
    assert result.returncode == 0, result.stderr
    path, name = result.stdout.split()
    assert pathlib.Path(path) == ROOT / "kernels" / "__init__.py" and name == "fastcenter.kernels.norm"


def test_every_package_of_the_tree_is_in_the_wheel():
    # pyproject.toml lists its packages by hand (kernels/ must be mapped to fastcenter.kernels): a subpackage
    # missing from that list is silently left out of a built wheel, while an editable install still works.
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"fastcenter.kernels"} | {
        ".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "fastcenter").rglob("__init__.py")
    }
    assert listed == found, f"pyproject.toml lists {sorted(listed)}, the tree has {sorted(found)}"
