"""rope_cache and rope: argument checks, dispatch, the custom op around kernels/rope.py, and the CPU
implementation.

The math is written once, in the docstring of `fastcenter.kernels.rope`. One custom op rotates q and k
together; its backward is the same op rotating the output gradients by the negative angle (so it is
differentiable again). The CPU implementation is an autograd Function doing the same in eager PyTorch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ._dispatch import (
    TritonOp,
    as_output,
    backend,
    check_float_tensor,
    check_same_device,
    is_int,
    is_real,
    math_dtype,
)


def rope_cache(seq_len: int, head_dim: int, base: float = 10000.0, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin tables [seq_len, head_dim // 2] in float32 for `rope`."""
    if not is_int(seq_len) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if not is_int(head_dim) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
    if not is_real(base) or not base > 1:
        raise ValueError(f"base must be a float > 1, got {base!r}")
    return reference.rope_cache(seq_len, head_dim, float(base), device)


def _check_rope_args(q, k, cos, sin, interleaved) -> None:
    check_float_tensor("q", q)
    check_float_tensor("k", k)
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, T, H, Dh], got {tuple(t.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    B, T, _, head_dim = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (B, T, head_dim):
        raise ValueError(
            f"k must match q in batch, sequence length and head dim (k: [B, T, Hk, Dh]); "
            f"got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"the head dim (last dim of q and k) must be a positive even number, got {head_dim}")
    for name, table in (("cos", cos), ("sin", sin)):
        if not isinstance(table, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(table).__name__}")
        if table.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 (from rope_cache), got {table.dtype}")
        if table.dim() != 2 or table.shape[0] < T or table.shape[1] != head_dim // 2:
            raise ValueError(
                f"{name} must have shape [T_cache >= {T}, {head_dim // 2}] (positions x head_dim / 2), "
                f"got {tuple(table.shape)}"
            )
        # The tables are constants here: rope does not differentiate with respect to them, so refuse rather
        # than silently give a learned table no gradient.
        if table.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} requires grad, but rope gives no gradient to cos/sin: pass {name}.detach()")
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
    check_same_device(q=q, k=k, cos=cos, sin=sin)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """Rotary embedding of q [B, T, Hq, Dh] and k [B, T, Hk, Dh] in one launch. Returns (q_out, k_out).

    q and k may be strided views (e.g. of a packed qkv projection) and need not have the same head count;
    they are read in place and never modified. cos, sin: float32 [T_cache >= T, Dh/2] from `rope_cache`; the
    first T rows are used (slice them, `cos[start:]`, to start at a later position). The default pairs
    (i, i + Dh/2) (GPT-NeoX / Llama-HF); `interleaved=True` pairs (2i, 2i + 1) (GPT-J). Outputs are new
    contiguous tensors in q's dtype. Gradients flow to q and k; cos and sin must not require grad.
    """
    _check_rope_args(q, k, cos, sin, interleaved)
    implementation = backend(q, k, cos, sin)
    if implementation == "triton" and q.numel() > 0 and k.numel() > 0:
        return _rope_rotate(q, k, cos, sin, interleaved, False)
    if implementation == "cpu":
        return cpu_rope(q, k, cos, sin, interleaved=interleaved)
    return reference.rope(q, k, cos, sin, interleaved=interleaved)


# ---------------------------------------------------------------------------------------------------------
# Triton: the custom op around kernels/rope.py
# ---------------------------------------------------------------------------------------------------------


def _rope_rotate_impl(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool
) -> tuple[Tensor, Tensor]:
    """q [B, T, Hq, Dh], k [B, T, Hk, Dh] (any strides) rotated by cos/sin [>= T, Dh/2], or by the negative
    angle when `inverse`. Returns new contiguous tensors."""
    from ..kernels import rope as rope_kernels

    return rope_kernels.rope_rotate(q, k, cos, sin, interleaved, inverse)


def _rope_setup_context(ctx, inputs, output):
    _, _, cos, sin, interleaved, inverse = inputs
    ctx.save_for_backward(cos, sin)  # the tables only: a rotation needs nothing of q and k to be undone
    ctx.interleaved = interleaved
    ctx.inverse = inverse


def _rope_backward(ctx, grad_q_out, grad_k_out):
    cos, sin = ctx.saved_tensors
    grad_q, grad_k = _rope_rotate(grad_q_out, grad_k_out, cos, sin, ctx.interleaved, not ctx.inverse)
    return grad_q, grad_k, None, None, None, None


_rope_rotate = TritonOp(
    "fastcenter::rope_rotate", _rope_rotate_impl, setup_context=_rope_setup_context, backward=_rope_backward
)


@_rope_rotate.register_fake
def _(q, k, cos, sin, interleaved, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


# ---------------------------------------------------------------------------------------------------------
# CPU: eager PyTorch; the backward is the rotation by the negative angle
# ---------------------------------------------------------------------------------------------------------


def cpu_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """Rotary embedding of q [B, T, Hq, Dh] and k [B, T, Hk, Dh] (see fastcenter.reference.rope)."""
    return _CPURope.apply(q, k, cos, sin, interleaved)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """Each pair (x1, x2) of the last dim of x [B, T, H, Dh] turned by its angle: (x1 c - x2 s, x2 c + x1 s).

    cos, sin: [T, Dh/2] in the math dtype (pass -sin to turn back). A new contiguous tensor in x's dtype: x times
    the cosines, then the sine terms added into each half in place (no temporaries the size of x)."""
    c, s = cos[:, None, :], sin[:, None, :]  # broadcast over batch and heads
    if interleaved:  # pairs (2i, 2i+1), GPT-J / original Llama
        out = x * torch.stack((c, c), dim=-1).flatten(-2)
        (x1, x2), (y1, y2) = (x[..., 0::2], x[..., 1::2]), (out[..., 0::2], out[..., 1::2])
    else:  # pairs (i, i + Dh/2), GPT-NeoX / Llama-HF
        half = x.shape[-1] // 2
        out = x * torch.cat((c, c), dim=-1)
        (x1, x2), (y1, y2) = (x[..., :half], x[..., half:]), (out[..., :half], out[..., half:])
    y1.addcmul_(x2, s, value=-1)
    y2.addcmul_(x1, s)
    return out.to(x.dtype)


class _CPURope(torch.autograd.Function):
    """q, k rotated by the tables; saves only the tables: the backward turns the gradients back."""

    @staticmethod
    def forward(q, k, cos, sin, interleaved):
        dtype = math_dtype(q, k)
        T = q.shape[1]
        cos, sin = cos[:T].to(dtype), sin[:T].to(dtype)
        return as_output(_rotate(q, cos, sin, interleaved), q.dtype), as_output(
            _rotate(k, cos, sin, interleaved), k.dtype
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, cos, sin, ctx.interleaved = inputs
        ctx.save_for_backward(cos, sin)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        if grad_q is None and grad_k is None:
            return None, None, None, None, None
        T = (grad_q if grad_q is not None else grad_k).shape[1]
        # The inverse rotation is itself a rotation (built from differentiable ops), so this backward is
        # exact under create_graph=True as it stands.
        dtype = math_dtype(grad_q, grad_k)
        cos, neg_sin = cos[:T].to(dtype), -sin[:T].to(dtype)
        grads = [None if g is None else _rotate(g, cos, neg_sin, ctx.interleaved) for g in (grad_q, grad_k)]
        return grads[0], grads[1], None, None, None
