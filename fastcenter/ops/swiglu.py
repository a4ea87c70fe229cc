"""swiglu and geglu: argument checks, dispatch, the custom ops around kernels/swiglu.py, and the CPU implementation.

The math is written once, in the docstring of `fastcenter.kernels.swiglu`: the gated activations act(gate) * up,
one pair of kernels with the activation a constexpr ("silu" for swiglu; "gelu" or "gelu_tanh" for geglu). The
backward recomputes the activation from the saved inputs; for the packed [..., 2H] form its gradient is one
[N, 2H] tensor written by the kernel. The CPU implementation is an autograd Function doing the same with
PyTorch's own activation kernels (forward and backward).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ._dispatch import (
    TritonBackwardOp,
    TritonOp,
    as_output,
    as_rows,
    backend,
    check_float_tensor,
    check_same_device,
    differentiable_backward,
    math_dtype,
)

# geglu's `approximate` (as torch.nn.functional.gelu's) -> the kernels' activation, and back
GELU_ACTIVATIONS = {"none": "gelu", "tanh": "gelu_tanh"}
_APPROXIMATE = {activation: approximate for approximate, activation in GELU_ACTIVATIONS.items()}


def swiglu(gate: Tensor, up: Tensor | None = None) -> Tensor:
    """silu(gate) * up; with up=None, `gate` is the packed [..., 2H] projection [gate | up].

    Any leading shape; strided rows are read in place (a last dim with non-unit stride costs one copy).
    gate and up must have the same shape and dtype. The output is [..., H] in that dtype.
    """
    return _gated(gate, up, "silu")


def geglu(gate: Tensor, up: Tensor | None = None, *, approximate: str = "none") -> Tensor:
    """gelu(gate, approximate=approximate) * up, as `torch.nn.functional.gelu`: "none" (the exact, erf GELU, its
    default) or "tanh" (the tanh approximation: Gemma's `gelu_pytorch_tanh`). With up=None, `gate` is the packed
    [..., 2H] projection [gate | up]. Shapes, dtypes and layouts as `swiglu`.
    """
    if approximate not in GELU_ACTIVATIONS:
        raise ValueError(f"approximate must be 'none' or 'tanh' (as torch.nn.functional.gelu), got {approximate!r}")
    return _gated(gate, up, GELU_ACTIVATIONS[approximate])


def _gated(gate: Tensor, up: Tensor | None, activation: str) -> Tensor:
    check_float_tensor("gate", gate)
    if up is None:
        if gate.shape[-1] % 2:
            raise ValueError(
                f"with up=None, gate must be the packed [..., 2H] tensor [gate | up] with an even last dim, "
                f"got shape {tuple(gate.shape)}"
            )
        width = gate.shape[-1] // 2
    else:
        check_float_tensor("up", up)
        if up.shape != gate.shape:
            raise ValueError(f"up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
        if up.dtype != gate.dtype:
            raise TypeError(f"up must have gate's dtype {gate.dtype}, got {up.dtype}")
        check_same_device(gate=gate, up=up)
        width = gate.shape[-1]
    implementation = backend(gate, up)
    if implementation == "triton" and gate.numel() > 0:
        if up is None:
            out = _swiglu_fwd(as_rows(gate, 2 * width), None, activation)
        else:
            out = _swiglu_fwd(as_rows(gate, width), as_rows(up, width), activation)
        return out.view(*gate.shape[:-1], width)
    if implementation == "cpu":
        return _CPUGated.apply(gate, up, activation)
    return _reference(activation)(gate, up)


def _reference(activation: str):
    """The `fastcenter.reference` function of (gate, up) for this activation."""
    if activation == "silu":
        return reference.swiglu
    return functools.partial(reference.geglu, approximate=_APPROXIMATE[activation])


# ---------------------------------------------------------------------------------------------------------
# Triton: the custom ops around kernels/swiglu.py (called as _dispatch.TritonOp describes)
# ---------------------------------------------------------------------------------------------------------


def _swiglu_fwd_impl(gate: Tensor, up: Optional[Tensor], activation: str) -> Tensor:
    """gate, up: [N, H] rows with unit column stride; with up None, gate is the packed [N, 2H]. Returns [N, H].

    activation: "silu", "gelu" or "gelu_tanh" (the family's custom ops keep the name of its first member)."""
    from ..kernels import swiglu as swiglu_kernels

    return swiglu_kernels.swiglu_forward(gate, up, activation)


def _swiglu_bwd_impl(grad_out: Tensor, gate: Tensor, up: Optional[Tensor], activation: str) -> tuple[Tensor, Tensor]:
    """(grad of gate, grad of up); for the packed form (grad of the [N, 2H] input, empty tensor)."""
    from ..kernels import swiglu as swiglu_kernels

    return swiglu_kernels.swiglu_backward(grad_out, gate, up, activation)


_swiglu_bwd = TritonBackwardOp("fastcenter::swiglu_bwd", _swiglu_bwd_impl)


@_swiglu_bwd.register_fake
def _(grad_out, gate, up, activation):
    if up is None:
        return gate.new_empty(gate.shape), gate.new_empty(0)
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _swiglu_setup_context(ctx, inputs, output):
    gate, up, ctx.activation = inputs
    ctx.save_for_backward(gate, up)  # the inputs only: the backward recomputes the activation


def _swiglu_backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a backward that autograd can differentiate again
        grad_gate, grad_up = differentiable_backward(_reference(ctx.activation), [gate, up], [grad_out])
        return grad_gate, grad_up, None
    grad_gate, grad_up = _swiglu_bwd(grad_out, gate, up, ctx.activation)
    return grad_gate, (None if up is None else grad_up), None


_swiglu_fwd = TritonOp(
    "fastcenter::swiglu_fwd", _swiglu_fwd_impl, setup_context=_swiglu_setup_context, backward=_swiglu_backward
)


@_swiglu_fwd.register_fake
def _(gate, up, activation):
    width = gate.shape[1] if up is not None else gate.shape[1] // 2
    return gate.new_empty(gate.shape[0], width)


# ---------------------------------------------------------------------------------------------------------
# CPU: eager PyTorch; the backward recomputes the activation
# ---------------------------------------------------------------------------------------------------------


def cpu_swiglu(gate: Tensor, up: Tensor | None = None) -> Tensor:
    """silu(gate) * up; with up=None, `gate` is the packed [..., 2H] tensor [gate | up]."""
    return _CPUGated.apply(gate, up, "silu")


def cpu_geglu(gate: Tensor, up: Tensor | None = None, approximate: str = "none") -> Tensor:
    """gelu(gate, approximate=approximate) * up; with up=None, `gate` is the packed [..., 2H] tensor [gate | up]."""
    return _CPUGated.apply(gate, up, GELU_ACTIVATIONS[approximate])


def _split(gate: Tensor, up: Tensor | None) -> tuple[Tensor, Tensor]:
    return gate.chunk(2, dim=-1) if up is None else (gate, up)


def _act(g: Tensor, activation: str) -> Tensor:
    if activation == "silu":
        return F.silu(g)
    return F.gelu(g, approximate=_APPROXIMATE[activation])


def _act_backward(grad: Tensor, g: Tensor, activation: str, *, out: Tensor | None = None) -> Tensor:
    """grad * act'(g) by PyTorch's own backward kernel of the activation (one pass), into `out` if given."""
    if activation == "silu":
        if out is None:
            return torch.ops.aten.silu_backward(grad, g)
        return torch.ops.aten.silu_backward.grad_input(grad, g, grad_input=out)
    approximate = _APPROXIMATE[activation]
    if out is None:
        return torch.ops.aten.gelu_backward(grad, g, approximate=approximate)
    return torch.ops.aten.gelu_backward.grad_input(grad, g, approximate=approximate, grad_input=out)


class _CPUGated(torch.autograd.Function):
    """act(gate) * up; saves the inputs only and recomputes the activation in the backward."""

    @staticmethod
    def forward(gate, up, activation):
        g, u = _split(gate, up)
        dtype = math_dtype(g, u)
        return as_output(_act(g.to(dtype), activation).mul_(u), gate.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        gate, up, ctx.activation = inputs
        ctx.save_for_backward(gate, up)

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        activation = ctx.activation
        if torch.is_grad_enabled():  # create_graph=True
            grad_gate, grad_up = differentiable_backward(_reference(activation), [gate, up], [grad_out])
            return grad_gate, grad_up, None
        g, u = _split(gate, up)
        dtype = math_dtype(g, u)
        g, u, dy = g.to(dtype), u.to(dtype), grad_out.to(dtype)
        if up is None:  # the packed [..., 2H] input gets one [..., 2H] gradient, its halves written in place
            grad = torch.empty(gate.shape, dtype=dtype, device=gate.device)
            grad_g, grad_u = _split(grad, None)
            _write(grad_g, functools.partial(_act_backward, activation=activation), dy * u, g)
            _write(grad_u, torch.mul, dy, _act(g, activation))
            return grad.to(gate.dtype), None, None
        grad_g = _act_backward(dy * u, g, activation)
        grad_u = dy * _act(g, activation)
        return grad_g.to(gate.dtype), grad_u.to(up.dtype), None


def _write(dest: Tensor, op, *args) -> None:
    """dest <- op(*args), computed straight into dest (a strided view) with out=: a pass less than a copy or a
    concatenation. torch.compile refuses out= into a non-contiguous view; there it is a copy (which the compiler
    fuses away anyway)."""
    if torch.compiler.is_compiling():
        dest.copy_(op(*args))
    else:
        op(*args, out=dest)
