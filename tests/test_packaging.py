"""The kernels/ folder installs as fastcenter.kernels and is never a top-level module named "kernels": from the
repository root (where `python -m pytest` puts it on sys.path) it must not shadow the PyPI package of that
name (Hugging Face's kernel hub, which transformers imports)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_at_root(code: str, tmp_path, with_other: bool) -> subprocess.CompletedProcess:
    env_path = []
    if with_other:  # another project's package named "kernels", installed elsewhere on sys.path
        (tmp_path / "site" / "kernels").mkdir(parents=True)
        (tmp_path / "site" / "kernels" / "__init__.py").write_text('WHO = "the other kernels package"\n')
        env_path = [str(tmp_path / "site")]
    prelude = f"import sys; sys.path[1:1] = {env_path!r}; "  # after '' (the root, as python -c / -m put it)
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_the_repository_folder_steps_aside_for_an_installed_kernels_package(tmp_path):
    result = run_at_root("import kernels; print(kernels.WHO)", tmp_path, with_other=True)
    assert result.returncode == 0 and result.stdout.strip() == "the other kernels package", result.stderr


def test_without_one_import_kernels_fails_as_if_the_folder_were_not_there(tmp_path):
    result = run_at_root("import kernels", tmp_path, with_other=False)
    assert result.returncode != 0 and "ModuleNotFoundError: No module named 'kernels'" in result.stderr


def test_fastcenter_kernels_is_the_folder(tmp_path):
    code = "import fastcenter.kernels as k, fastcenter.kernels.norm as n; print(k.__file__); print(n.__name__)"
    result = run_at_root(code, tmp_path, with_other=True)
    assert result.returncode == 0, result.stderr
    path, name = result.stdout.split()
    assert pathlib.Path(path) == ROOT / "kernels" / "__init__.py" and name == "fastcenter.kernels.norm"
