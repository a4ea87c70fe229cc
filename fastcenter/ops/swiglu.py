"""swiglu: argument checks, dispatch, the custom ops around kernels/swiglu.py, and the CPU implementation.

The math is written once, in the docstring of `fastcenter.kernels.swiglu`. The backward recomputes the
sigmoid from the saved inputs; for the packed [..., 2H] form its gradient is one [N, 2H] tensor written by
the kernel. The CPU implementation is an autograd Function doing the same with PyTorch's silu kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
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


def swiglu(gate: Tensor, up: Tensor | None = None) -> Tensor:
    """silu(gate) * up; with up=None, `gate` is the packed [..., 2H] projection [gate | up].

    Any leading shape; strided rows are read in place (a last dim with non-unit stride costs one copy).
    gate and up must have the same shape and dtype. The output is [..., H] in that dtype.
    """
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
            out = _swiglu_fwd(as_rows(gate, 2 * width), None)
        else:
            out = _swiglu_fwd(as_rows(gate, width), as_rows(up, width))
        return out.view(*gate.shape[:-1], width)
    if implementation == "cpu":
        return cpu_swiglu(gate, up)
    return reference.swiglu(gate, up)


# ---------------------------------------------------------------------------------------------------------
# Triton: the custom ops around kernels/swiglu.py
# ---------------------------------------------------------------------------------------------------------


def _swiglu_fwd_impl(gate: Tensor, up: Optional[Tensor]) -> Tensor:
    """gate, up: [N, H] rows with unit column stride; with up None, gate is the packed [N, 2H]. Returns [N, H]."""
    from ..kernels import swiglu as swiglu_kernels

    return swiglu_kernels.swiglu_forward(gate, up)


def _swiglu_bwd_impl(grad_out: Tensor, gate: Tensor, up: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(grad of gate, grad of up); for the packed form (grad of the [N, 2H] input, empty tensor)."""
    from ..kernels import swiglu as swiglu_kernels

    return swiglu_kernels.swiglu_backward(grad_out, gate, up)


_swiglu_bwd = TritonBackwardOp("fastcenter::swiglu_bwd", _swiglu_bwd_impl)


@_swiglu_bwd.register_fake
def _(grad_out, gate, up):
    if up is None:
        return gate.new_empty(gate.shape), gate.new_empty(0)
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _swiglu_setup_context(ctx, inputs, output):
    gate, up = inputs
    ctx.save_for_backward(gate, up)  # the inputs only: the backward recomputes the sigmoid


def _swiglu_backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a backward that autograd can differentiate again
        grad_gate, grad_up = differentiable_backward(reference.swiglu, [gate, up], [grad_out])
        return grad_gate, grad_up
    grad_gate, grad_up = _swiglu_bwd(grad_out, gate, up)
    return grad_gate, (None if up is None else grad_up)


_swiglu_fwd = TritonOp(
    "fastcenter::swiglu_fwd", _swiglu_fwd_impl, setup_context=_swiglu_setup_context, backward=_swiglu_backward
)


@_swiglu_fwd.register_fake
def _(gate, up):
    width = gate.shape[1] if up is not None else gate.shape[1] // 2
    return gate.new_empty(gate.shape[0], width)


# ---------------------------------------------------------------------------------------------------------
# CPU: eager PyTorch; the backward recomputes the sigmoid
# ---------------------------------------------------------------------------------------------------------


def cpu_swiglu(gate: Tensor, up: Tensor | None = None) -> Tensor:
    """silu(gate) * up; with up=None, `gate` is the packed [..., 2H] tensor [gate | up]."""
    return _CPUSwiGLU.apply(gate, up)


def _split(gate: Tensor, up: Tensor | None) -> tuple[Tensor, Tensor]:
    return gate.chunk(2, dim=-1) if up is None else (gate, up)


class _CPUSwiGLU(torch.autograd.Function):
    """silu(gate) * up; saves the inputs only and recomputes the sigmoid in the backward."""

    @staticmethod
    def forward(gate, up):
        g, u = _split(gate, up)
        dtype = math_dtype(g, u)
        return as_output(torch.nn.functional.silu(g.to(dtype)).mul_(u), gate.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            grad_gate, grad_up = differentiable_backward(reference.swiglu, [gate, up], [grad_out])
            return grad_gate, grad_up
        g, u = _split(gate, up)
        dtype = math_dtype(g, u)
        g, u, dy = g.to(dtype), u.to(dtype), grad_out.to(dtype)
        # PyTorch's silu_backward kernel: d silu(g)/dg = sig(g) * (1 + g * (1 - sig(g))) in one pass.
        if up is None:  # the packed [..., 2H] input gets one [..., 2H] gradient, its halves written in place
            grad = torch.empty(gate.shape, dtype=dtype, device=gate.device)
            grad_g, grad_u = _split(grad, None)
            _write(grad_g, _silu_backward, dy * u, g)
            _write(grad_u, torch.mul, dy, torch.nn.functional.silu(g))
            return grad.to(gate.dtype), None
        grad_g = _silu_backward(dy * u, g)
        grad_u = dy * torch.nn.functional.silu(g)
        return grad_g.to(gate.dtype), grad_u.to(up.dtype)


def _silu_backward(grad: Tensor, x: Tensor, *, out: Tensor | None = None) -> Tensor:
    if out is None:
        return torch.ops.aten.silu_backward(grad, x)
    return torch.ops.aten.silu_backward.grad_input(grad, x, grad_input=out)


def _write(dest: Tensor, op, *args) -> None:
    """dest <- op(*args), computed straight into dest (a strided view) with out=: a pass less than a copy or a
    concatenation. torch.compile refuses out= into a non-contiguous view; there it is a copy (which the compiler
    fuses away anyway)."""
    if torch.compiler.is_compiling():
        dest.copy_(op(*args))
    else:
        op(*args, out=dest)
