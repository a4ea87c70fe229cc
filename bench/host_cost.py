"""The host cost of one call of each fastcenter op, measured on the CPU: microseconds of Python, dispatcher and
autograd work per call, which a GPU step pays on its critical path unless it runs as a CUDA graph.

    python -m bench.host_cost                       # a table; --json FILE also writes the numbers

No GPU is needed and none is used. Every op runs its Triton path ("triton" backend) on small CPU tensors:
argument checks, dispatch, the custom ops and autograd, the launchers' Python, and Triton's own launch path
(argument binding, specialisation, kernel cache lookup) run as on a GPU, through bench.compile's compile-only
driver (the first call of each specialisation compiles it for sm_90 and is not timed); only the driver's final
launch is a no-op, so a GPU adds its launch latency (a few microseconds a kernel) to these numbers. The tensors
are tiny and float32: host work depends on neither size nor dtype, while the arithmetic that does run here
(the LM head's GEMMs, autograd's own ops) should cost nothing. The backward is torch.autograd.grad (nothing is
accumulated into .grad). Beside the ops, aten ops with autograd for scale.

Each number is the minimum over repeats of a mean over many calls (the minimum: other processes sharing the
machine only ever add time); the median is printed beside it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
import time

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels (see bench/compile.py), not interpreted

import torch
import torch.nn.functional as F


def _setup() -> None:
    """Kernels imported compiled, the compile-only driver active, then TRITON_INTERPRET=1 so that the ops'
    dispatch picks their Triton path for CPU tensors (it reads the variable at every call)."""
    from triton.runtime import driver

    from .compile import ARCHS, CompileOnlyDriver

    kernels = importlib.import_module("fastcenter.kernels")
    for module in pkgutil.iter_modules(kernels.__path__):
        importlib.import_module(f"fastcenter.kernels.{module.name}")
    driver.set_active(CompileOnlyDriver(ARCHS[90]))
    os.environ["TRITON_INTERPRET"] = "1"


def _cases() -> dict:
    """name -> (forward(), tensors requiring grad, grad_outputs): the default model's calls, on 4 tokens and
    narrower rows."""
    from fastcenter import ops

    bf16 = torch.bfloat16
    B, T, D, H, Dh, V = 1, 4, 64, 2, 32, 64

    def leaf(*shape, dtype=torch.float32):
        return torch.randn(*shape, dtype=dtype).requires_grad_()

    x, r, w = leaf(B, T, D), leaf(B, T, D), leaf(D)
    qkv = leaf(B, T, 3, H, Dh)
    cos, sin = ops.rope_cache(T, Dh)
    packed = leaf(B, T, 8 * D)
    h, head, target = leaf(B, T, D), leaf(V, D), torch.randint(0, V, (B, T))
    a, lin = leaf(B * T, D), leaf(D, D)
    return {
        "center_rms_norm": (
            lambda: ops.center_rms_norm(x, w, residual=r, out_dtype=bf16),  # as the model calls it
            [x, r, w],
            [torch.randn(B, T, D, dtype=bf16), torch.randn(B, T, D)],
        ),
        "rms_norm": (lambda: (ops.rms_norm(x, (D,), w, 1e-6),), [x, w], [torch.randn(B, T, D)]),
        "rope": (
            lambda: ops.rope(qkv[:, :, 0], qkv[:, :, 1], cos, sin),
            [qkv],
            [torch.randn(B, T, H, Dh)] * 2,
        ),
        "swiglu": (lambda: (ops.swiglu(packed),), [packed], [torch.randn(B, T, 4 * D)]),
        "linear_cross_entropy": (
            lambda: (ops.linear_cross_entropy(h, head, target),),
            [h, head],
            [torch.tensor(1.0)],
        ),
        "aten add": (lambda: (torch.add(x, x),), [x], [torch.randn(B, T, D)]),
        "aten linear": (lambda: (F.linear(a, lin),), [a, lin], [torch.randn(B * T, D)]),
    }


def _time(fn, calls: int, repeats: int) -> tuple[float, float]:
    """(min, median) over `repeats` of the mean microseconds of `calls` calls of fn."""
    fn()
    means = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter_ns() - start) / calls / 1e3)
    means.sort()
    return means[0], means[len(means) // 2]


def measure(calls: int = 200, repeats: int = 7) -> dict:
    _setup()
    torch.set_num_threads(1)  # tiny arithmetic: no thread pool to wake (on a shared machine, waking it dominates)
    results = {}
    for name, (forward, leaves, grads) in _cases().items():

        def forward_no_grad(forward=forward):
            with torch.no_grad():
                forward()

        def forward_backward(forward=forward, leaves=leaves, grads=grads):
            torch.autograd.grad(forward(), leaves, grads)

        forward_backward()  # compiles every kernel of the op (not timed)
        results[name] = {
            "forward_no_grad": _time(forward_no_grad, calls, repeats),
            "forward": _time(forward, calls, repeats),
            "forward_backward": _time(forward_backward, max(1, calls // 2), repeats),
        }
    return results


def table(results: dict) -> str:
    lines = [
        "| op (one call) | forward, no grad | forward, with autograd | forward + backward |",
        "|---|---:|---:|---:|",
    ]
    for name, r in results.items():
        cells = " | ".join(f"{r[k][0]:.0f} ({r[k][1]:.0f})" for k in ("forward_no_grad", "forward", "forward_backward"))
        lines.append(f"| {name} | {cells} |")
    lines.append("")
    lines.append("microseconds per call: minimum over repeats (median in brackets)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.host_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per timing (default 200)")
    parser.add_argument("--repeats", type=int, default=7, help="timings per number (default 7)")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.repeats < 1:
        print("bench.host_cost: --calls and --repeats must be positive", file=sys.stderr)
        return 2
    results = measure(args.calls, args.repeats)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "unit": "us per call, (min, median)", "ops": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
