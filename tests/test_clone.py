"""A copy of the working tree that was never pip-installed runs the fused ops and `python train.py --fused`.

The GPU lease gets such a copy (no install step) and nanoGPT's users work that way: `fastcenter.kernels` must
then come from the copy's own kernels/ folder (fastcenter/__init__.py registers it), never from an installed
checkout. Everything runs in subprocesses whose working directory is the copy, without PYTHONPATH, with
TRITON_INTERPRET=1 so that the real Triton kernels run on CPU tensors.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Appended to the copy's kernels/norm.py: proves which file the run imported, from inside that run.
MARKER = """
import os as _os
if _os.environ.get("CLONE_MARKER"):
    with open(_os.environ["CLONE_MARKER"], "a") as _marker:
        _marker.write(f"{__name__} {__file__}\\n")
"""

OPS = """
import torch, fastcenter, fastcenter.kernels.norm as norm_kernels
from fastcenter import ops, reference
print(fastcenter.__file__)
print(norm_kernels.__file__)
torch.manual_seed(0)
x = torch.randn(5, 7, 24, requires_grad=True)
w = torch.randn(24, requires_grad=True)
assert ops.backend(x) == "triton", ops.backend(x)
y = ops.rms_norm(x, (24,), w)
torch.testing.assert_close(y, reference.rms_norm(x, (24,), w))
gate_up = torch.randn(6, 40, requires_grad=True)
torch.testing.assert_close(ops.swiglu(gate_up), reference.swiglu(gate_up))
q, k = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 1, 8)
cos, sin = ops.rope_cache(5, 8)
for a, b in zip(ops.rope(q, k, cos, sin), reference.rope(q, k, cos, sin)):
    torch.testing.assert_close(a, b)
h, emb, target = torch.randn(9, 24, requires_grad=True), torch.randn(53, 24, requires_grad=True), torch.randint(0, 53, (9,))
loss = ops.linear_cross_entropy(h, emb, target)
torch.testing.assert_close(loss, reference.linear_cross_entropy(h, emb, target))
(y.square().sum() + loss).backward()
assert torch.isfinite(x.grad).all() and torch.isfinite(emb.grad).all()
print("ops ok")
"""


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> pathlib.Path:
    """The files git tracks, plus the untracked ones it does not ignore, copied to a fresh folder."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True
    )
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout, nothing to copy a clone from: {listed.stderr.decode().strip()}")
    copy = tmp_path_factory.mktemp("clone") / "fastcenter"
    for name in sorted(set(listed.stdout.decode().split("\0")) - {""}):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is left out, as a clone of it would be
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    with open(copy / "kernels" / "norm.py", "a") as f:
        f.write(MARKER)
    return copy


def run_in(copy: pathlib.Path, args: list, marker: pathlib.Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TRITON_INTERPRET="1", CLONE_MARKER=str(marker))
    return subprocess.run([sys.executable, *args], cwd=copy, env=env, capture_output=True, text=True, timeout=300)


def assert_inside(path: str, folder: pathlib.Path) -> None:
    assert pathlib.Path(path).resolve().is_relative_to(folder.resolve()), f"{path} is not inside {folder}"


def test_the_fused_ops_run_the_copys_own_kernels(clone, tmp_path):
    marker = tmp_path / "imported.txt"
    result = run_in(clone, ["-c", OPS], marker)
    assert result.returncode == 0, result.stderr
    package, kernel, done = result.stdout.splitlines()
    assert done == "ops ok", result.stdout
    assert_inside(package, clone)
    assert_inside(kernel, clone)
    assert pathlib.Path(kernel).resolve() == (clone / "kernels" / "norm.py").resolve()
    assert marker.read_text().split() == ["fastcenter.kernels.norm", str(clone / "kernels" / "norm.py")]


def test_train_py_fused_trains_from_the_copy(clone, tmp_path):
    corpus = tmp_path / "data"  # nanoGPT token files (raw little-endian uint16) of a 512-id vocabulary
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("train.bin", 8_000), ("val.bin", 2_000)):
        rng.integers(0, 512, size).astype("<u2").tofile(corpus / name)
    marker, out = tmp_path / "imported.txt", tmp_path / "run"
    flags = [
        "--fused",
        "--device",
        "cpu",
        "--data",
        str(corpus),
        "--out-dir",
        str(out),
        "--vocab-size",
        "512",
        "--dim",
        "32",
        "--n-layers",
        "1",
        "--n-heads",
        "2",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--grad-accum-steps",
        "1",
        "--max-iters",
        "2",
        "--warmup-iters",
        "1",
        "--eval-interval",
        "2",
        "--eval-iters",
        "1",
        "--log-interval",
        "1",
    ]
    result = run_in(clone, ["train.py", *flags], marker)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows), rows
    imported = marker.read_text().split()
    assert imported[:2] == ["fastcenter.kernels.norm", str(clone / "kernels" / "norm.py")], imported
