"""The eager PyTorch meaning of every op in `fastcenter.ops`, one function for one function.

This file is the specification in code: plain float32 math, no fusion, no tricks, and it imports nothing
else of ours. `fastcenter.ops` runs these under `ops.using("reference")` or `FASTCENTER_BACKEND=reference`,
inside torch.func transforms, for a backward that will be differentiated again, and where the Triton kernels do
not take an input (see fastcenter/ops/_dispatch.py); the tests hold the Triton kernels and the CPU
implementation against them (and against float64 versions of the same formulas). Inputs are validated by
`fastcenter.ops`; these functions assume sane input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _f32(t: Tensor) -> Tensor:
    """Upcast to float32 for the math; float64 stays float64 (that is how the tests get their truth)."""
    return t if t.dtype == torch.float64 else t.float()


def rms_norm(
    input: Tensor,
    normalized_shape,
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    weight_offset: float = 0.0,
) -> Tensor:
    """`torch.nn.functional.rms_norm`: x / sqrt(mean(x**2) + eps) * weight over the trailing `normalized_shape`;
    with a weight_offset, * (weight + weight_offset) (Gemma's RMSNorm: 1.0).

    The output is in `out_dtype` (default: the input's dtype), rounded once from the float32 math."""
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    x = _f32(input)
    y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * (_f32(weight) + weight_offset)
    return y.to(out_dtype or input.dtype)


def center_rms_norm(
    input: Tensor,
    weight: Tensor | None,
    *,
    center: Tensor | None = None,
    residual: Tensor | None = None,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
    weight_offset: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """hidden = input (+ residual) (- center); normed = hidden * rsqrt(mean(hidden**2, -1) + eps) * (weight +
    weight_offset).

    Returns (normed, hidden): `normed` in `out_dtype` (default: the input's dtype), `hidden` (the new residual
    stream) in the input's dtype.
    """
    hidden = _f32(input)
    if residual is not None:
        hidden = hidden + _f32(residual)
    if center is not None:
        hidden = hidden - _f32(center)
    normed = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        normed = normed * (_f32(weight) + weight_offset)
    return normed.to(out_dtype or input.dtype), hidden.to(input.dtype)


def rope_cache(seq_len: int, head_dim: int, base: float = 10000.0, device=None) -> tuple[Tensor, Tensor]:
    """cos and sin tables [seq_len, head_dim // 2] (float32) for angles t * base**(-2i / head_dim).

    The angles are formed in float64 so that long positions keep their precision, then stored as float32.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv_freq)
    return angles.cos().float(), angles.sin().float()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """Rotate each pair (x1, x2) of the last dim by its angle: (x1 cos - x2 sin, x2 cos + x1 sin)."""
    T = x.shape[1]
    cos = _f32(cos[:T, None, :])  # [T, 1, Dh/2] broadcasts over batch and heads
    sin = _f32(sin[:T, None, :])
    xf = _f32(x)
    if interleaved:  # pairs (2i, 2i+1), GPT-J / original Llama
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:  # pairs (i, i + Dh/2), GPT-NeoX / Llama-HF
        half = x.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """Rotary position embedding of q [B, T, Hq, Dh] and k [B, T, Hk, Dh] with tables [>= T, Dh/2]."""
    return _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)


def swiglu(gate: Tensor, up: Tensor | None = None) -> Tensor:
    """silu(gate) * up; with up=None, `gate` is the packed [..., 2H] tensor [gate | up]."""
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    return (F.silu(_f32(gate)) * _f32(up)).to(gate.dtype)


def geglu(gate: Tensor, up: Tensor | None = None, *, approximate: str = "none") -> Tensor:
    """gelu(gate, approximate=approximate) * up ("none": erf GELU, "tanh": its tanh approximation); with up=None,
    `gate` is the packed [..., 2H] tensor [gate | up]."""
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    return (F.gelu(_f32(gate), approximate=approximate) * _f32(up)).to(gate.dtype)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> Tensor:
    """Softmax cross-entropy of logits [N, V] against class ids [N], as `F.cross_entropy` plus z-loss and softcap.

    Per non-ignored token: (1 - ls) * (lse - z_target) + ls * (lse - mean(z)) + z_loss * lse**2, where
    z = softcap * tanh(logits / softcap) (or the logits) and lse = logsumexp(z). Ignored tokens add 0; a target
    outside [0, V) that is not ignore_index gives NaN. "mean" divides by the number of non-ignored tokens,
    and is 0 when there are none.
    """
    if weight is not None:
        raise NotImplementedError("class weights (`weight`) are not supported by fastcenter's cross-entropy")
    z = _f32(input)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=-1)
    V = z.shape[-1]
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    z_target = z.gather(-1, torch.where(in_range, target, 0).unsqueeze(-1)).squeeze(-1)
    loss = lse - z_target
    if label_smoothing > 0.0:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - z.mean(dim=-1))
    if z_loss > 0.0:
        loss = loss + z_loss * lse.pow(2)
    loss = torch.where(in_range, loss, torch.full_like(loss, math.nan))
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """cross_entropy(input @ linear_weight.T + linear_bias, target, ...) with the logits formed in full.

    `input` is [N, D] or [B, T, D] with `target` [N] or [B, T]; "none" returns the per-token loss in the
    target's shape. `chunk_size` only bounds memory in `fastcenter.ops`; the meaning is the same.
    """
    bias = None if linear_bias is None else _f32(linear_bias)
    logits = F.linear(_f32(input), _f32(linear_weight), bias)
    loss = cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        target.reshape(-1),
        weight,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
    )
    return loss.reshape(target.shape) if reduction == "none" else loss
