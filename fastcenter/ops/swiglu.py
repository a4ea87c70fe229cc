"""swiglu: argument checks, dispatch, and the custom ops around kernels/swiglu.py.

The math is written once, in the docstring of `fastcenter.kernels.swiglu`. The backward recomputes the
sigmoid from the saved inputs; for the packed [..., 2H] form its gradient is one [N, 2H] tensor written by
the kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ._dispatch import (
    as_rows,
    backend,
    check_float_tensor,
    check_same_device,
    differentiable_backward,
    eager,
)


@torch.library.custom_op("fastcenter::swiglu_fwd", mutates_args=())
def _swiglu_fwd(gate: Tensor, up: Optional[Tensor]) -> Tensor:
    """gate, up: [N, H] rows with unit column stride; with up None, gate is the packed [N, 2H]. Returns [N, H]."""
    from ..kernels import swiglu as swiglu_kernels

    return swiglu_kernels.swiglu_forward(gate, up)


@_swiglu_fwd.register_fake
def _(gate, up):
    width = gate.shape[1] if up is not None else gate.shape[1] // 2
    return gate.new_empty(gate.shape[0], width)


@torch.library.custom_op("fastcenter::swiglu_bwd", mutates_args=())
def _swiglu_bwd(grad_out: Tensor, gate: Tensor, up: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(grad of gate, grad of up); for the packed form (grad of the [N, 2H] input, empty tensor)."""
    from ..kernels import swiglu as swiglu_kernels

    return swiglu_kernels.swiglu_backward(grad_out, gate, up)


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


_swiglu_fwd.register_autograd(_swiglu_backward, setup_context=_swiglu_setup_context)


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
    if implementation != "triton" or gate.numel() == 0:
        return eager(implementation).swiglu(gate, up)
    if up is None:
        out = _swiglu_fwd(as_rows(gate, 2 * width), None)
    else:
        out = _swiglu_fwd(as_rows(gate, width), as_rows(up, width))
    return out.view(*gate.shape[:-1], width)


