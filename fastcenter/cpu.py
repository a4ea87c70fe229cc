"""The CPU implementation of every op in `fastcenter.ops`: eager PyTorch, built for speed and bounded memory.

`fastcenter.ops` runs these for CPU tensors (see ops/_dispatch.py, the one place that decides). They compute the
same functions as `fastcenter.reference`, which stays the readable specification; what differs is how:

- **linear_cross_entropy** never forms the [N, V] logits. Rows go in chunks of C (a [C, V] float32 buffer of
  about `CHUNK_BYTES`, allocated once per call and reused); per chunk, with "mean"/"sum":

      z   = x_c @ W.T (+ b)                        torch.mm(out=buffer)
      z  <- softcap * tanh(z / softcap)            (optional; tanh kept for the derivative)
      lse, loss_c                                  max, exp in place, sum
      z  <- dloss/dz                               in place: softmax * coef - onehot - smoothing (x cap')
      dx_c = z @ W;  dW += z.T @ x_c;  db += sum(z)

  so the gradients are finished in the forward (3 GEMMs, as the full-logits path has) and the backward only
  scales them by the scalar grad_output. The eager `F.linear` + `F.cross_entropy` instead allocates several
  fresh [N, V] tensors per step (logits, log-softmax, the gradients of both: 1.6 GB each at the seed shape),
  which the kernel must map and zero page by page, and runs the log-softmax kernels over them: on a 2-core
  Xeon that cost more than the three GEMMs (bench/cpu.py measures the whole step). reduction="none" has a
  per-token grad_output, unknown in the forward: the forward keeps lse only and the backward recomputes each
  chunk's logits (4 GEMMs).
- **cross_entropy** (given logits) saves the logits and lse, and its backward recomputes the softmax chunk by
  chunk into the gradient.
- **rms_norm / center_rms_norm, rope, swiglu** are autograd Functions with analytic backwards that save only
  what they need: the norms their input (or the `hidden` they return) and the weight, RoPE nothing but the
  tables (its backward is the rotation by the negative angle), SwiGLU its inputs (the sigmoid is recomputed).

Contract (as the reference): inputs float32, bfloat16 or float16, math in float32 (float64 stays float64, so
`torch.autograd.gradcheck` can hold these backwards exactly), outputs in the input's dtype, losses in float32,
gradients in each argument's dtype, any strides, inputs never modified, no host synchronisation (the chunk
loops depend on shapes only). Argument checks live in `fastcenter.ops`, which calls these.

Autograd beyond first order: a backward that will itself be differentiated (create_graph=True; grad mode is on
inside the backward exactly then) differentiates the reference instead (`differentiable_backward`), exactly as
the Triton ops do, because the fast backwards use in-place buffers and quantities computed without a graph.
torch.func transforms never reach this module (`backend()` picks the reference under them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import reference
from .ops._dispatch import differentiable_backward

__all__ = ["rms_norm", "center_rms_norm", "rope", "swiglu", "cross_entropy", "linear_cross_entropy"]

# The [C, V] float32 chunk of logits. Each chunk re-reads W twice and the float32 dW accumulator once (read and
# written), about 200 MB at the seed shape, so chunks should not be small; each row of the chunk costs V x 4
# bytes. Measured on a shared 2-core Xeon VM (CPU seconds of one forward+backward at N = 8192, V = 50257, D = 256,
# best of 3): C = 333: 9.1 s, 512: 8.7 s, 1024: 7.9 s, 2048: 7.7 s; full logits + F.cross_entropy: 11.3 s.
# 256 MiB is C = 1335 at V = 50257 (7 even chunks of 1171 rows for 8192 tokens).
CHUNK_BYTES = 256 * 2**20


def _math_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float32, or float64 when an input is float64 (how the tests obtain exact gradients)."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


# ---------------------------------------------------------------------------------------------------------
# RMSNorm and the fused (residual add) + centering + RMSNorm
# ---------------------------------------------------------------------------------------------------------


def _rstd(h: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    """rsqrt(mean(h**2) + eps) over `dims`, kept for broadcasting (a norm: one pass, no [N, D] temporary)."""
    count = math.prod([h.shape[d] for d in dims])  # (lists, not generators: torch.compile traces these)
    mean_square = torch.linalg.vector_norm(h, 2, dims, keepdim=True).square_().div_(max(count, 1))
    return mean_square.add_(eps).rsqrt_()


def _norm_forward(h: Tensor, weight: Tensor | None, dims: tuple[int, ...], eps: float) -> Tensor:
    """h * rsqrt(mean(h**2) + eps) * weight, in h's (math) dtype."""
    out = h * _rstd(h, dims, eps)
    if weight is not None:
        out.mul_(weight.to(h.dtype))
    return out


def _norm_backward(grad_out: Tensor, h: Tensor, weight: Tensor | None, dims, eps: float):
    """(grad of h, grad of weight in the math dtype) for y = h * r * w, r = rsqrt(mean(h**2) + eps):

    dn = dy * w;  dh = r * (dn - h * r**2 * mean(dn * h));  dw = sum over rows of dy * h * r.
    """
    r = _rstd(h, dims, eps)
    dn = grad_out if weight is None else grad_out * weight.to(h.dtype)
    row_term = (dn * h).mean(dims, keepdim=True).mul_(r.square()).neg_()
    grad_h = torch.addcmul(dn, h, row_term).mul_(r)
    grad_weight = None if weight is None else (grad_out * (h * r)).sum_to_size(weight.shape)
    return grad_h, grad_weight


class _RMSNorm(torch.autograd.Function):
    """y = x * rsqrt(mean(x**2) + eps) * weight over the trailing `len(dims)` dims; saves x and weight."""

    @staticmethod
    def forward(input, weight, dims, eps):
        dtype = _math_dtype(input, weight)
        return _norm_forward(input.to(dtype), weight, dims, eps).to(input.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, ctx.dims, ctx.eps = inputs
        ctx.save_for_backward(input, weight)

    @staticmethod
    def backward(ctx, grad_out):
        input, weight = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a backward autograd can differentiate again
            normalized_shape = input.shape[len(input.shape) - len(ctx.dims) :]
            grad_input, grad_weight = differentiable_backward(
                lambda x, w: reference.rms_norm(x, normalized_shape, w, ctx.eps), [input, weight], [grad_out]
            )
            return grad_input, grad_weight, None, None
        dtype = _math_dtype(input, weight)
        grad_h, grad_weight = _norm_backward(grad_out.to(dtype), input.to(dtype), weight, ctx.dims, ctx.eps)
        return grad_h.to(input.dtype), _cast(grad_weight, weight.dtype if weight is not None else dtype), None, None


def rms_norm(input: Tensor, normalized_shape, weight: Tensor | None = None, eps: float | None = None) -> Tensor:
    """`torch.nn.functional.rms_norm` (see fastcenter.reference.rms_norm)."""
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    return _RMSNorm.apply(input, weight, dims, float(eps))


class _CenterRMSNorm(torch.autograd.Function):
    """(normed, hidden) with hidden = input (+ residual) (- center); saves `hidden` (its own output) and weight.

    Used only when there is a residual or a centre: otherwise hidden is the input itself (see center_rms_norm).
    """

    @staticmethod
    def forward(input, weight, center, residual, eps):
        dtype = _math_dtype(input, weight, center, residual)
        hidden = input.to(dtype)
        if residual is not None:
            hidden = hidden + residual.to(dtype)
        if center is not None:
            hidden = hidden - center.to(dtype)
        normed = _norm_forward(hidden, weight, (-1,), eps)
        return normed.to(input.dtype), hidden.to(input.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, center, residual, ctx.eps = inputs
        ctx.save_for_backward(output[1], weight)
        ctx.center_shape = None if center is None else center.shape
        ctx.dtypes = tuple([None if t is None else t.dtype for t in (input, center, residual)])
        ctx.set_materialize_grads(False)  # an unused output (often `hidden`) arrives as None, not zeros

    @staticmethod
    def backward(ctx, grad_normed, grad_hidden):
        hidden, weight = ctx.saved_tensors
        input_dtype, center_dtype, residual_dtype = ctx.dtypes
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference; terms through the saved
            # `hidden` (this op's own output) come back to this node as grad_hidden.
            grad_h, grad_weight = differentiable_backward(
                lambda h, w: reference.center_rms_norm(h, w, eps=ctx.eps), [hidden, weight], [grad_normed, grad_hidden]
            )
            if grad_h is None:
                grad_h = grad_hidden
        else:
            dtype = _math_dtype(hidden, weight)
            grad_h, grad_weight = None, None
            if grad_normed is not None:
                h = hidden.to(dtype)
                grad_h, grad_weight = _norm_backward(grad_normed.to(dtype), h, weight, (-1,), ctx.eps)
                grad_weight = _cast(grad_weight, weight.dtype if weight is not None else None)
            if grad_hidden is not None:
                grad_h = grad_hidden.to(dtype) if grad_h is None else grad_h.add_(grad_hidden)
        if grad_h is None:  # neither output reached the loss
            return None, None, None, None, None
        grad_center = None if center_dtype is None else (-grad_h).sum_to_size(ctx.center_shape).to(center_dtype)
        grad_residual = None if residual_dtype is None else grad_h.to(residual_dtype)
        return grad_h.to(input_dtype), grad_weight, grad_center, grad_residual, None


def center_rms_norm(
    input: Tensor,
    weight: Tensor | None,
    *,
    center: Tensor | None = None,
    residual: Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """(normed, hidden), hidden = input (+ residual) (- center) (see fastcenter.reference.center_rms_norm)."""
    if residual is None and center is None:  # hidden is the input itself: returned as it is (as the reference)
        return _RMSNorm.apply(input, weight, (-1,), float(eps)), input
    return _CenterRMSNorm.apply(input, weight, center, residual, float(eps))


# ---------------------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------------------


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


class _Rope(torch.autograd.Function):
    """q, k rotated by the tables; saves only the tables: the backward turns the gradients back."""

    @staticmethod
    def forward(q, k, cos, sin, interleaved):
        dtype = _math_dtype(q, k)
        T = q.shape[1]
        cos, sin = cos[:T].to(dtype), sin[:T].to(dtype)
        return _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)

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
        dtype = _math_dtype(grad_q, grad_k)
        cos, neg_sin = cos[:T].to(dtype), -sin[:T].to(dtype)
        grads = [None if g is None else _rotate(g, cos, neg_sin, ctx.interleaved) for g in (grad_q, grad_k)]
        return grads[0], grads[1], None, None, None


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """Rotary embedding of q [B, T, Hq, Dh] and k [B, T, Hk, Dh] (see fastcenter.reference.rope)."""
    return _Rope.apply(q, k, cos, sin, interleaved)


# ---------------------------------------------------------------------------------------------------------
# SwiGLU
# ---------------------------------------------------------------------------------------------------------


def _split(gate: Tensor, up: Tensor | None) -> tuple[Tensor, Tensor]:
    return gate.chunk(2, dim=-1) if up is None else (gate, up)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up; saves the inputs only and recomputes the sigmoid in the backward."""

    @staticmethod
    def forward(gate, up):
        g, u = _split(gate, up)
        dtype = _math_dtype(g, u)
        return torch.nn.functional.silu(g.to(dtype)).mul_(u).to(gate.dtype)

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
        dtype = _math_dtype(g, u)
        g, u, dy = g.to(dtype), u.to(dtype), grad_out.to(dtype)
        # PyTorch's fused silu kernels: d silu(g)/dg = sig(g) * (1 + g * (1 - sig(g))) in one pass.
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


def swiglu(gate: Tensor, up: Tensor | None = None) -> Tensor:
    """silu(gate) * up; with up=None, `gate` is the packed [..., 2H] tensor [gate | up]."""
    return _SwiGLU.apply(gate, up)


# ---------------------------------------------------------------------------------------------------------
# Cross-entropy: the per-chunk math, shared by cross_entropy and linear_cross_entropy
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None

    def reference_kwargs(self) -> dict:
        return dict(reduction=self.reduction, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                    z_loss=self.z_loss, softcap=self.softcap)  # fmt: skip


@dataclass
class _Targets:
    """Per-row bookkeeping of the targets, all on the device (no sync): which rows count, and how much."""

    safe: Tensor  # the target where it is in [0, V), else 0: an index that is always valid for gather/scatter
    in_range: Tensor  # bool [N]
    valid: Tensor  # bool [N]: not ignore_index (an out-of-range target is valid: its loss is NaN)
    weight: Tensor  # [N]: d(total loss)/d(row loss) for grad_output = 1: 1 or 1/n_valid on counted rows, else 0

    @classmethod
    def of(cls, target: Tensor, vocab: int, o: _Options, dtype: torch.dtype) -> "_Targets":
        in_range = (target >= 0) & (target < vocab)
        valid = target != o.ignore_index
        weight = (valid & in_range).to(dtype)
        if o.reduction == "mean":
            weight = weight / valid.sum().clamp(min=1).to(dtype)
        return cls(torch.where(in_range, target, 0), in_range, valid, weight)

    def reduce(self, loss: Tensor, o: _Options) -> Tensor:
        """Per-row losses -> the loss asked for: NaN for an out-of-range target, 0 for an ignored one."""
        loss = torch.where(self.in_range, loss, torch.full_like(loss, math.nan))
        loss = torch.where(self.valid, loss, torch.zeros_like(loss))
        if o.reduction == "none":
            return loss
        if o.reduction == "sum":
            return loss.sum()
        return loss.sum() / self.valid.sum().clamp(min=1)


def _cap_(z: Tensor, tanh_buffer: Tensor | None, softcap: float | None) -> Tensor | None:
    """z <- softcap * tanh(z / softcap) in place; returns tanh(z / softcap) (kept for the derivative), or None."""
    if softcap is None:
        return None
    t = torch.div(z, softcap, out=tanh_buffer).tanh_()
    torch.mul(t, softcap, out=z)
    return t


def _loss_rows_(z: Tensor, target: Tensor, o: _Options) -> tuple[Tensor, Tensor, Tensor]:
    """Row losses of one chunk of (capped) logits z [C, V], consuming z: on return z holds exp(z - max(z)).

    Returns (loss [C], lse [C], sum of exp(z - max) [C, 1]); loss is computed for every row, ignored or not."""
    z_target = z.gather(1, target[:, None]).squeeze(1)
    z_mean = z.mean(1) if o.label_smoothing > 0 else None
    row_max = z.amax(1, keepdim=True)
    sum_exp = z.sub_(row_max).exp_().sum(1, keepdim=True)
    lse = (row_max + sum_exp.log()).squeeze(1)
    loss = lse - z_target
    if z_mean is not None:
        loss = (1 - o.label_smoothing) * loss + o.label_smoothing * (lse - z_mean)
    if o.z_loss > 0:
        loss = loss + o.z_loss * lse.square()
    return loss, lse, sum_exp


def _to_grad_(e: Tensor, norm: Tensor | None, lse: Tensor, t: Tensor | None, target: Tensor, row_grad: Tensor,
              o: _Options) -> Tensor:  # fmt: skip
    """Turn e = exp(z - a) [C, V] in place into d(sum_r row_grad[r] * loss[r]) / d(logits before the cap).

    `norm` = exp(a - lse) as [C, 1] (None when a = lse already), so e * norm is the softmax p. With smoothing ls
    and z-loss zl: dz = row_grad * (p * (1 + 2 zl lse) - (1 - ls) * onehot(target) - ls / V); times
    1 - tanh**2 through the cap (t is consumed)."""
    g = row_grad[:, None]
    coef = g if norm is None else g * norm
    if o.z_loss > 0:
        coef = coef * (1 + 2 * o.z_loss * lse[:, None])
    e.mul_(coef)
    e.scatter_add_(1, target[:, None], g * -(1 - o.label_smoothing))
    if o.label_smoothing > 0:
        e.sub_(g * (o.label_smoothing / e.shape[1]))
    if t is not None:
        e.mul_(t.square_().neg_().add_(1))
    return e


def _rows_per_chunk(vocab: int, n_rows: int, chunk_size: int | None) -> int:
    """Rows per chunk: at most chunk_size (default: CHUNK_BYTES of float32 logits), and as even as the chunks
    can be (8192 rows at 1335 per chunk: 7 chunks of 1171, not 6 of 1335 and one of 182)."""
    limit = chunk_size if chunk_size is not None else CHUNK_BYTES // max(1, 4 * vocab)
    limit = max(1, min(limit, n_rows))
    n_chunks = -(-n_rows // limit)
    return max(1, -(-n_rows // max(1, n_chunks)))


def _chunks(n_rows: int, rows: int):
    return [(start, min(start + rows, n_rows)) for start in range(0, n_rows, rows)]


# ---------------------------------------------------------------------------------------------------------
# cross_entropy (given logits)
# ---------------------------------------------------------------------------------------------------------


class _CrossEntropy(torch.autograd.Function):
    """Loss from logits [N, V]; saves the logits and lse, the backward rebuilds the softmax chunk by chunk."""

    @staticmethod
    def forward(logits, target, o: _Options):
        N, V = logits.shape
        dtype = _math_dtype(logits)
        rows = _rows_per_chunk(V, N, None)
        targets = _Targets.of(target, V, o, dtype)
        buffer = torch.empty(rows, V, dtype=dtype, device=logits.device)
        tanh_buffer = torch.empty_like(buffer) if o.softcap is not None else None
        loss, lse = torch.empty(N, dtype=dtype, device=logits.device), torch.empty(N, dtype=dtype, device=logits.device)
        for start, end in _chunks(N, rows):
            z = buffer[: end - start].copy_(logits[start:end])  # never touch the caller's logits
            _cap_(z, None if tanh_buffer is None else tanh_buffer[: end - start], o.softcap)
            loss[start:end], lse[start:end], _ = _loss_rows_(z, targets.safe[start:end], o)
        return targets.reduce(loss, o), lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, ctx.options = inputs
        ctx.save_for_backward(logits, target, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        logits, target, lse = ctx.saved_tensors
        o = ctx.options
        if grad_loss is None:
            return None, None, None
        if torch.is_grad_enabled():  # create_graph=True
            (grad,) = differentiable_backward(
                lambda z: reference.cross_entropy(z, target, **o.reference_kwargs()), [logits], [grad_loss]
            )
            return grad, None, None
        N, V = logits.shape
        dtype = _math_dtype(logits)
        targets = _Targets.of(target, V, o, dtype)
        row_grad = targets.weight * grad_loss.to(dtype)  # a scalar, or per token for "none"
        grad = torch.empty(N, V, dtype=logits.dtype, device=logits.device)
        rows = _rows_per_chunk(V, N, None)
        buffer = torch.empty(rows, V, dtype=dtype, device=logits.device)
        tanh_buffer = torch.empty_like(buffer) if o.softcap is not None else None
        for start, end in _chunks(N, rows):
            z = buffer[: end - start].copy_(logits[start:end])
            t = _cap_(z, None if tanh_buffer is None else tanh_buffer[: end - start], o.softcap)
            e = z.sub_(lse[start:end, None]).exp_()  # the softmax itself: a = lse
            grad[start:end] = _to_grad_(e, None, lse[start:end], t, targets.safe[start:end], row_grad[start:end], o)
        return grad, None, None


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
    """Softmax cross-entropy of logits [N, V] (see fastcenter.reference.cross_entropy). The loss is float32."""
    if weight is not None:
        raise NotImplementedError("class weights (`weight`) are not supported by fastcenter's cross-entropy")
    o = _Options(reduction, ignore_index, float(label_smoothing), float(z_loss), softcap)
    return _CrossEntropy.apply(input, target, o)[0]


# ---------------------------------------------------------------------------------------------------------
# linear_cross_entropy: the chunked LM head
# ---------------------------------------------------------------------------------------------------------


def _lce_chunks(x, weight, bias, targets: _Targets, o: _Options, rows: int, *, lse=None, row_grad=None,
                grads=(None, None, None)):  # fmt: skip
    """The chunk loop behind linear_cross_entropy; x, weight, bias are in the math dtype.

    Forward (lse None): returns (row losses, lse), and with row_grad given also finishes the gradients into
    grads = (grad_x [N, D] or None, grad_weight [V, D] or None, grad_bias [V] or None), each zero-initialised
    where it accumulates. Backward of "none" (lse given): recomputes each chunk from lse and fills grads.
    """
    N, V = x.shape[0], weight.shape[0]
    grad_x, grad_weight, grad_bias = grads
    want_grads = row_grad is not None and any([g is not None for g in grads])
    buffer = torch.empty(rows, V, dtype=x.dtype, device=x.device)
    tanh_buffer = torch.empty_like(buffer) if o.softcap is not None else None
    forward = lse is None
    if forward:
        loss, lse = torch.empty(N, dtype=x.dtype, device=x.device), torch.empty(N, dtype=x.dtype, device=x.device)
    for start, end in _chunks(N, rows):
        x_c, z = x[start:end], buffer[: end - start]
        torch.mm(x_c, weight.t(), out=z)
        if bias is not None:
            z.add_(bias)
        t = _cap_(z, None if tanh_buffer is None else tanh_buffer[: end - start], o.softcap)
        target = targets.safe[start:end]
        if forward:
            loss[start:end], lse[start:end], sum_exp = _loss_rows_(z, target, o)
            norm = sum_exp.reciprocal_()
        else:
            z.sub_(lse[start:end, None]).exp_()
            norm = None
        if not want_grads:
            continue
        dz = _to_grad_(z, norm, lse[start:end], t, target, row_grad[start:end], o)
        if grad_x is not None:
            torch.mm(dz, weight, out=grad_x[start:end])
        if grad_weight is not None:
            grad_weight.addmm_(dz.t(), x_c)
        if grad_bias is not None:
            grad_bias.add_(dz.sum(0))
    return (loss, lse) if forward else None


def _empty_grads(x, weight, bias, needs) -> tuple:
    need_x, need_w, need_b = needs
    return (
        x.new_empty(x.shape) if need_x else None,  # contiguous rows, whatever x's strides
        torch.zeros_like(weight) if need_w else None,
        torch.zeros_like(bias) if need_b and bias is not None else None,
    )


class _LinearCrossEntropy(torch.autograd.Function):
    """The loss of x [N, D] against W [V, D] (+ b) without the [N, V] logits; see the module docstring.

    Outputs (loss, lse, grad_x, grad_weight, grad_bias): the last three (gradients for grad_output = 1, finished
    in the forward for "mean"/"sum"; empty otherwise) are outputs only so that autograd keeps them for the
    backward; the public function returns the loss.
    """

    @staticmethod
    def forward(x, weight, bias, target, o: _Options, rows: int, needs: tuple[bool, bool, bool]):
        with torch.autocast("cpu", enabled=False):  # our GEMMs write into float32 buffers: keep them float32
            dtype = _math_dtype(x, weight, bias)
            x_m, w_m, b_m = x.to(dtype), weight.to(dtype).contiguous(), _cast(bias, dtype)
            targets = _Targets.of(target, weight.shape[0], o, dtype)
            finish = o.reduction != "none" and any(needs)
            grads = _empty_grads(x_m, w_m, b_m, needs) if finish else (None, None, None)
            loss, lse = _lce_chunks(x_m, w_m, b_m, targets, o, rows, row_grad=targets.weight if finish else None,
                                    grads=grads)  # fmt: skip
            empty = x.new_empty(0)
            return (targets.reduce(loss, o), lse, *[empty if g is None else g for g in grads])

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, target, ctx.options, ctx.rows, ctx.needs = inputs
        _, lse, *finished = output
        ctx.mark_non_differentiable(*output[1:])
        # The inputs are saved whatever the reduction (references, no copies): "none" recomputes from them, and a
        # backward under create_graph=True differentiates the reference on them.
        ctx.save_for_backward(x, weight, bias, target, lse, *finished)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        x, weight, bias, target, lse, *finished = ctx.saved_tensors
        o = ctx.options
        if grad_loss is None:
            return (None,) * 7
        if torch.is_grad_enabled():
            # create_graph=True: the gradients finished in the forward are constants to autograd, and scaling
            # them would silently drop every second-order term. Differentiate the reference instead.
            grads = differentiable_backward(
                lambda x, w, b: reference.linear_cross_entropy(x, w, target, linear_bias=b, **o.reference_kwargs()),
                [x, weight, bias],
                [grad_loss],
            )
        elif o.reduction == "none":  # per-token grad_output: recompute chunk by chunk from lse
            with torch.autocast("cpu", enabled=False):
                dtype = _math_dtype(x, weight, bias)
                x_m, w_m, b_m = x.to(dtype), weight.to(dtype).contiguous(), _cast(bias, dtype)
                targets = _Targets.of(target, weight.shape[0], o, dtype)
                row_grad = targets.weight * grad_loss.reshape(-1).to(dtype)
                grads = _empty_grads(x_m, w_m, b_m, ctx.needs)
                _lce_chunks(x_m, w_m, b_m, targets, o, ctx.rows, lse=lse, row_grad=row_grad, grads=grads)
        else:  # one rounding each: the math-dtype gradients are scaled, then cast to each argument's dtype
            grads = [g * grad_loss if g.numel() else None for g in finished]
        grads = [None if g is None or not need else g.to(t.dtype)
                 for g, t, need in zip(grads, (x, weight, bias), ctx.needs)]  # fmt: skip
        return (*grads, None, None, None, None)


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
    """cross_entropy(input @ linear_weight.T + linear_bias, target, ...) with at most chunk_size x V logits at a
    time (default: about CHUNK_BYTES of them). input [N, D] or [B, T, D], target [N] or [B, T]; "none" returns
    the loss in target's shape. The loss is float32; the math is float32 whatever the inputs' dtype, also under
    torch.autocast (the bf16/fp16 GEMMs autocast would pick are slower than float32 on most CPUs)."""
    if weight is not None:
        raise NotImplementedError("class weights (`weight`) are not supported by fastcenter's cross-entropy")
    o = _Options(reduction, ignore_index, float(label_smoothing), float(z_loss), softcap)
    x = input.reshape(-1, input.shape[-1])
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and input.requires_grad,
        grad_on and linear_weight.requires_grad,
        grad_on and linear_bias is not None and linear_bias.requires_grad,
    )
    rows = _rows_per_chunk(linear_weight.shape[0], x.shape[0], chunk_size)
    loss = _LinearCrossEntropy.apply(x, linear_weight, linear_bias, target.reshape(-1), o, rows, needs)[0]
    return loss.view(target.shape) if reduction == "none" else loss
