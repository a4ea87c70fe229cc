"""The one place that decides which implementation an op runs, and what every op family shares.

Three implementations of every public op exist:

    "triton"     the fused Triton kernels (kernels/<family>.py), wrapped as torch.library custom ops in
                 fastcenter/ops/<family>.py
    "cpu"        eager PyTorch built for speed and bounded memory on the CPU, in the same fastcenter/ops/<family>.py
                 (e.g. the linear cross-entropy in chunks, its gradient formed in the forward)
    "reference"  fastcenter.reference, the plain readable specification of every op

`backend(*tensors)` picks one, in this order:

0. inside a torch.func transform (grad, vjp, jvp, vmap, jacrev, ...) or a forward-mode AD scope
   (torch.autograd.forward_ad.dual_level): the reference. The custom ops' autograd (register_autograd) does not
   support these (torch.func raises an error that does not name the op; forward AD silently drops the tangent),
   and the reference's plain torch ops support all of them, to any order;
1. a scope opened with `using("reference")` (how `GPTConfig(fused=False)` runs the same model eagerly), or the
   environment variable FASTCENTER_BACKEND=reference: the reference;
2. CUDA tensors, or TRITON_INTERPRET=1 (the kernels then run on the CPU, slowly: how the tests exercise them):
   the Triton kernels;
3. otherwise (CPU tensors): the CPU implementation.

Each public op asks once and calls the function of its family that implements that choice. Reading the scope
and the environment here is cheap, and torch.compile specialises on both at trace time. An environment
variable of ours with a value it does not know is an error (`check_environment`), never silently ignored.

How the Triton implementation is called (`TritonOp`, `TritonBackwardOp`). Its kernels are wrapped as
torch.library custom ops, with fake implementations and registered autograd: what torch.compile, FakeTensorMode,
make_fx, any TorchDispatchMode and tensor subclasses see, since they see ops only through the dispatcher. A plain
eager call, with none of those watching (`traced`), calls the same Python implementation without the dispatcher,
under an autograd.Function made of the same setup_context and backward: the dispatcher's and torch.library's
Python layers cost more host time per call than the launches they wrap (`python -m bench.host_cost`).

Also here, shared by the families: the argument checks (metadata only, so no host sync), `as_rows`,
`math_dtype` (the CPU implementations' arithmetic dtype), `as_output` and `differentiable_backward`.
"""

from __future__ import annotations

import inspect
import os
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("triton", "cpu", "reference")


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_HAVE_TRITON = _triton_importable()


class _Scope:
    """The backend forced by the innermost `using(...)` scope, or None."""

    forced: str | None = None


_SCOPE = _Scope()


class using:
    """`with ops.using("reference"): ...` runs every op inside on the reference; `using(None)` changes nothing.

    A plain class (not a generator context manager): torch.compile(fullgraph=True) traces it inside a forward.
    """

    def __init__(self, backend: str | None):
        if backend not in (None, "reference"):
            raise ValueError(f"backend must be None or 'reference', got {backend!r}")
        self.backend = backend

    def __enter__(self):
        self.previous = _SCOPE.forced
        if self.backend is not None:
            _SCOPE.forced = self.backend
        return self

    def __exit__(self, *exc):
        _SCOPE.forced = self.previous
        return False


def _transformed() -> bool:
    """A torch.func transform or a forward-mode AD level is active (rule 0 of the module docstring).

    Not asked while torch.compile traces: Dynamo handles transforms itself, and the query would be one more
    thing for every torch version's Dynamo to trace.
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.maybe_current_level() is not None or torch.autograd.forward_ad._current_level >= 0


# The environment variables of ours and the values each takes (case-insensitive; "" is the same as unset).
ENVIRONMENT = {
    "FASTCENTER_BACKEND": ("auto", "reference"),  # "reference" forces the reference; "auto": backend() decides
    "FASTCENTER_CHECKS": ("0", "1"),  # "1" adds host-side value checks (a sync) where an op has them
}


def _environment(name: str) -> str:
    """The value of one of our environment variables, normalised; ValueError for a value it does not take."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    allowed = ENVIRONMENT[name]
    if value == "":
        return allowed[0]
    if value not in allowed:
        choices = " or ".join(repr(a) for a in allowed)
        raise ValueError(f"environment variable {name}={raw!r} is not one of {choices} (or unset)")
    return value


def check_environment() -> None:
    """Raise ValueError, naming the variable and the values it takes, if FASTCENTER_BACKEND or FASTCENTER_CHECKS
    holds a value fastcenter does not know. The ops check this at every call; a program can call it first, to
    report a mistyped variable before any work (train.py does)."""
    for name in ENVIRONMENT:
        _environment(name)


def backend(*tensors: Tensor | None) -> str:
    """'triton', 'cpu' or 'reference' for an op on these tensors (see the module docstring)."""
    forced = _environment("FASTCENTER_BACKEND")  # a value it does not know is an error at every op, in any scope
    _environment("FASTCENTER_CHECKS")
    if _transformed() or _SCOPE.forced == "reference" or forced == "reference":
        return "reference"
    cuda = any(t is not None and t.is_cuda for t in tensors)
    if _HAVE_TRITON and (cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"):
        return "triton"
    return "reference" if cuda else "cpu"  # a GPU without Triton: the eager reference runs there


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def traced(*args) -> bool:
    """True when a call of the Triton implementation must go through the dispatcher (its custom ops): while
    torch.compile traces, under a TorchDispatchMode (FakeTensorMode, make_fx, an op recorder), or with a tensor
    subclass among the arguments. Otherwise it is a plain eager call (see the module docstring)."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return True
    return any(type(a) not in _PLAIN_TENSORS for a in args if isinstance(a, Tensor))


class TritonOp:
    """A forward custom op of the Triton implementation with its autograd, callable as `op(*args)`: through
    the dispatcher when `traced`, else the implementation itself, under an autograd.Function made of the same
    `setup_context` and `backward` when autograd needs it."""

    def __init__(self, name: str, impl: Callable, *, setup_context: Callable, backward: Callable):
        self.impl, self.parameters = impl, list(inspect.signature(impl).parameters)
        self.custom_op = torch.library.custom_op(name, impl, mutates_args=())
        self.custom_op.register_autograd(backward, setup_context=setup_context)

        def forward(ctx, *args):
            output = impl(*args)
            setup_context(ctx, args, output)
            return output

        # forward(ctx, ...) rather than a separate setup_context: Function.apply then skips binding the arguments
        # to forward's signature (inspect.signature at every call), which the torch.func support of that form
        # needs and this path does not (torch.func runs the reference).
        methods = dict(forward=staticmethod(forward), backward=staticmethod(backward))
        self.function = type(name.split("::")[-1], (torch.autograd.Function,), methods)

    def register_fake(self, fn: Callable) -> Callable:
        return self.custom_op.register_fake(fn)

    def __call__(self, *args, **kwargs):
        args = _positional(self.parameters, args, kwargs)
        if traced(*args):
            return self.custom_op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return self.function.apply(*args)
        return self.impl(*args)


class TritonBackwardOp:
    """A backward custom op (no autograd of its own), callable as `op(*args)` the same two ways as `TritonOp`."""

    def __init__(self, name: str, impl: Callable):
        self.impl, self.parameters = impl, list(inspect.signature(impl).parameters)
        self.custom_op = torch.library.custom_op(name, impl, mutates_args=())

    def register_fake(self, fn: Callable) -> Callable:
        return self.custom_op.register_fake(fn)

    def __call__(self, *args, **kwargs):
        args = _positional(self.parameters, args, kwargs)
        return self.custom_op(*args) if traced(*args) else self.impl(*args)


def _positional(parameters: list, args: tuple, kwargs: dict) -> tuple:
    """args + kwargs as positional arguments of an implementation whose every parameter is given (an
    autograd.Function takes positional arguments only)."""
    return args + tuple(kwargs[name] for name in parameters[len(args) :]) if kwargs else args


def checks_enabled() -> bool:
    return _environment("FASTCENTER_CHECKS") == "1"


# ---------------------------------------------------------------------------------------------------------
# Argument checks (metadata only: no host sync).
# ---------------------------------------------------------------------------------------------------------


def check_float_tensor(name: str, t, *, min_dim: int = 1) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")


def check_same_device(**tensors: Tensor | None) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}")


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # bool is an int subclass, never a valid size


def is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_eps(eps) -> None:
    if not is_real(eps) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")


def as_rows(t: Tensor, width: int) -> Tensor:
    """A [rows, width] view of `t` with unit stride along the last dim (one explicit copy if needed)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, width)


def math_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The CPU implementations' arithmetic dtype: float32, or float64 when an input is float64 (the tests call
    them in float64 to hold their analytic backwards to torch.autograd.gradcheck)."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def as_output(t: Tensor, dtype: torch.dtype) -> Tensor:
    """`t` in `dtype`, as a CPU implementation's autograd.Function returns it from its forward.

    Eager, `t` itself when it has that dtype. While torch.compile traces, a copy: an output that an op returned as
    an alias (an in-place op's result, or a `.to` that changes nothing) makes torch 2.11's Dynamo drop the
    Function's backward (its inputs get zero gradients); the compiler fuses the copy away.
    """
    if t.dtype != dtype:
        return t.to(dtype)
    return t.clone() if torch.compiler.is_compiling() else t


def differentiable_backward(
    fn: Callable, inputs: Sequence[Tensor | None], grad_outputs: Sequence[Tensor | None]
) -> list[Tensor | None]:
    """The backward of `fn` (a `fastcenter.reference` function of `inputs`) built from differentiable torch ops.

    A custom op's backward runs Triton kernels, which autograd cannot look into: a backward that will itself be
    differentiated (torch.autograd.grad(..., create_graph=True), e.g. a gradient penalty) would lose every
    second-order term. Such a backward (grad mode is on inside it exactly when create_graph=True) takes this
    path instead: `fn` is re-run eagerly on the saved inputs and differentiated with create_graph=True, so the
    gradients it returns carry their own graph. Slow, and it forms what the Triton and CPU implementations avoid
    (e.g. full logits), but exact. Returns one gradient per input: None for an input that is None or does not
    require grad.
    """
    wrt = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    result: list[Tensor | None] = [None] * len(inputs)
    if not wrt:
        return result
    with torch.enable_grad():
        # Differentiate w.r.t. fresh aliases, not the saved tensors themselves: a saved tensor may be an output of
        # the very op whose backward this is, and autograd.grad would then run that backward again, forever.
        inputs = [t.view_as(t) if i in wrt else t for i, t in enumerate(inputs)]
        outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
    grads = [None] * len(wrt)
    if pairs:
        grads = torch.autograd.grad(
            [o for o, _ in pairs], [inputs[i] for i in wrt], [g for _, g in pairs], create_graph=True, allow_unused=True
        )
    for i, g in zip(wrt, grads):
        result[i] = torch.zeros_like(inputs[i]) if g is None else g
    return result
