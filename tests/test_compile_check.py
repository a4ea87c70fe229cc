"""Every kernel compiles for sm_80 and sm_90, with no register spill, checked on the CPU.

`python -m bench.compile` runs Triton's compiler through a compile-only driver (a CUDA target, nothing launched)
on the launches the ops make, down to a cubin, and reads each cubin's resources with cuobjdump. Here it runs
its "ci" selection (the default model's own launches and each kernel's worst case: the widest rows, every option
flag on) for sm_80 and sm_90, in a fresh process: the kernels must be compiled, not interpreted.
"""

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ARCHS = (80, 90)


def launched_kernels() -> set[str]:
    """The @triton.jit functions of kernels/*.py that launchers launch (named *_kernel; the others are helpers
    called from inside kernels)."""
    names = set()
    for path in (REPO / "kernels").glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                if any("jit" in ast.unparse(d) for d in node.decorator_list):
                    names.add(node.name)
    return names


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """One process per architecture, side by side (each compiles on its own core): the worst exit status, their
    output, and their records merged (None where one wrote none)."""
    pytest.importorskip("triton.backends.nvidia")
    out = tmp_path_factory.mktemp("compile")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    procs = []
    for arch in ARCHS:
        cmd = [sys.executable, "-m", "bench.compile", "--arch", str(arch), "--plans", "ci", "--quiet"]
        with open(out / f"sm_{arch}.log", "w") as log:
            cmd += ["--json", str(out / f"sm_{arch}.json")]
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    rc = max(proc.wait(timeout=900) for proc in procs)
    output = "".join((out / f"sm_{arch}.log").read_text() for arch in ARCHS)
    files = [out / f"sm_{arch}.json" for arch in ARCHS]
    if not all(f.is_file() for f in files):
        return rc, output, None
    parts = [json.loads(f.read_text()) for f in files]
    merged = {**parts[0], "records": [r for part in parts for r in part["records"]]}
    merged["archs"] = {arch: spec for part in parts for arch, spec in part["archs"].items()}
    return rc, output, merged


def test_every_kernel_compiles_without_spills_for_sm80_and_sm90(compiled):
    rc, output, data = compiled
    assert data is not None, output[-3000:]
    records = data["records"]
    bad = [r for r in records if r["error"] or not r["fits"] or r["spill_instructions"] != 0]
    assert not bad, "\n".join(
        f"sm_{r['arch']} {r['kernel']} ({r['plan']}): error={r['error']!r} fits={r['fits']} "
        f"spills={r['spill_instructions']} stack={r['stack']} regs={r['registers']}"
        for r in bad
    )
    assert rc == 0, output[-3000:]
    for arch in ARCHS:
        seen = {r["kernel"] for r in records if r["arch"] == arch}
        assert launched_kernels() <= seen, f"sm_{arch}: never compiled {launched_kernels() - seen}"
    for r in records:  # the resources were read from a real cubin
        assert r["registers"] > 0 and r["stack"] == 0 and r["local"] == 0, r


def test_the_check_reads_what_the_compiler_reports(compiled):
    """Registers within the hardware limit for the launch's warps; shared memory within the architecture's."""
    *_, data = compiled
    assert data is not None
    assert data["versions"]["triton"]
    for r in data["records"]:
        arch = data["archs"][str(r["arch"])]
        assert r["registers"] <= 255 and r["registers"] * 32 * r["num_warps"] <= arch["registers_per_sm"], r
        assert 0 <= r["shared"] <= arch["max_shared"], r
