"""fastcenter.ops: the public ops, drop-in for the eager PyTorch ops they replace.

    rms_norm, center_rms_norm   ops/norm.py           kernels/norm.py
    rope_cache, rope            ops/rope.py           kernels/rope.py
    swiglu, geglu               ops/swiglu.py         kernels/swiglu.py
    cross_entropy,              ops/cross_entropy.py  kernels/cross_entropy.py
    linear_cross_entropy

One op family reads in two files: its kernels (the math in the module docstring, the Triton kernels and their
launchers) and its module here (the public ops, their custom ops and autograd, and the family's CPU
implementation). Every public function does three things, in this order:

1. validate its arguments, reading only tensor metadata (shapes, dtypes, devices), so no host sync;
2. ask `backend()` (ops/_dispatch.py, the one place that decides) which implementation runs: "triton",
   "cpu" or "reference";
3. call the function of its family that implements that choice: a `torch.library` custom op wrapping the
   kernels, the family's CPU implementation (`cpu_<op>`: eager PyTorch built for speed and bounded memory), or
   the op's function in `fastcenter.reference` (the readable specification).

The registration pattern, followed by every op family: a forward custom op (`fastcenter::<op>_fwd`) that
launches the forward kernel and returns its outputs plus whatever the backward needs; a backward custom op
(`fastcenter::<op>_bwd`); a fake (meta) implementation of each so `torch.compile(fullgraph=True)` can trace
shapes without running anything; and `register_autograd` on the forward op, whose backward calls the
backward op (`_dispatch.TritonOp`, `TritonBackwardOp`). Only what traces or watches ops (torch.compile,
FakeTensorMode, make_fx, a TorchDispatchMode, tensor subclasses) calls them through the dispatcher; a plain
eager call runs the same implementation, setup_context and backward under an autograd.Function, at about half
the host time (`python -m bench.host_cost`). Kernel modules (`fastcenter.kernels.*`) are imported lazily, so
`import fastcenter` works where Triton is not installed.

Autograd beyond one ordinary backward, the same for every op:

- a backward under create_graph=True (double backward, e.g. a gradient penalty) does not call the backward
  kernels, which autograd cannot differentiate: it differentiates the reference on the saved inputs instead
  (`_dispatch.differentiable_backward`), so every higher-order term is there (rope needs no such path: its
  backward is the same custom op, rotating by the negative angle);
- inside torch.func transforms (grad, vjp, jvp, vmap) and forward-mode AD, which custom ops do not support,
  `backend()` picks the reference;
- torch.compile(fullgraph=True) traces the custom ops through their fake implementations.

Tensor arguments may have any strides (views, stride-0 expansions, offsets); a kernel either honours them or
the op makes one explicit copy (a last dim that is not unit-stride). tests/test_layouts.py and
tests/test_autograd.py hold every op to this.
"""

from ._dispatch import BACKENDS, FLOAT_DTYPES, backend, check_environment, using
from .cross_entropy import cross_entropy, linear_cross_entropy
from .norm import MAX_FUSED_NORM_DIM, center_rms_norm, rms_norm
from .rope import rope, rope_cache
from .swiglu import geglu, swiglu

__all__ = [
    "BACKENDS",
    "FLOAT_DTYPES",
    "MAX_FUSED_NORM_DIM",
    "backend",
    "check_environment",
    "using",
    "rms_norm",
    "center_rms_norm",
    "rope_cache",
    "rope",
    "swiglu",
    "geglu",
    "cross_entropy",
    "linear_cross_entropy",
]
