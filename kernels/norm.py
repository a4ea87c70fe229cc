"""Fused (residual add) + centering + RMSNorm, forward and backward, over the last dim of [N, D] rows.

Forward, per row (all math in float32):

    h      = x (+ r) (- c)                    the new residual stream, stored when r or c is given
    rstd   = 1 / sqrt(mean(h**2) + eps)       one float32 per row, kept for the backward
    y      = h * rstd * (w + o)               o: a constant weight offset (0; 1 for Gemma's (1 + w))

Backward, with n = h * rstd, g = dy * (w + o) and an incoming gradient dh_out of the stored `h` (if it was used):

    dh     = rstd * (g - n * mean(g * n)) + dh_out        = dx = dr;   dc = -dh
    dw     = sum over rows of dy * n
    dc_vec = -sum over rows of dh                          for a [D] centre vector

dx and dr are equal but are two tensors when both are asked for: the kernel stores dh into each (dr in the
residual's dtype), so that autograd may keep each as a leaf's .grad and add into it on its own.

The backward runs on a grid of a few programs per SM; each walks its own slab of rows and keeps float32
partial sums of dw (and dc_vec) in registers, written once as a [programs, D] tile and summed by torch:
the "small reduction" after the single pass. D need not be a power of two (lanes beyond D are masked).

Row width. The forward holds a whole row in registers up to `fastcenter.ops.norm.MAX_FUSED_NORM_DIM`. The
single-pass backward holds more per column (h, dy, w and the two partial sums), and past
WIDEST_SINGLE_PASS columns it spills registers to local memory (`python -m bench.compile` shows it, and checks
that no launch plan spills; bench/results/compile/ holds its records). Wider rows are split:
`_norm_bwd_dot_kernel` first computes each row's mean(g * n) in column chunks (one float32 per row), then the
same backward kernel runs on a 2-D grid of row slabs x column blocks of WIDE_ROW_BLOCK, reading that mean
instead of reducing the row itself. It reads dy and h twice (5 instead of 3 passes over N x D), only
for rows wider than WIDEST_SINGLE_PASS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import cdiv, max_registers, multiprocessor_count, next_power_of_2


@triton.jit
def _offset(w, W_OFFSET: tl.constexpr):
    """w + W_OFFSET; for the offset 0 no instruction at all (the launches without one compile as they always did)."""
    if W_OFFSET != 0.0:
        w += W_OFFSET
    return w


@triton.jit(do_not_specialize=["n_rows"])
def _norm_fwd_kernel(
    X, R, C, W, Y, H, RSTD,
    n_rows, n_cols, eps,
    stride_x, stride_r, stride_c_row, stride_c_col, stride_w, stride_y, stride_h,
    HAS_RESIDUAL: tl.constexpr, HAS_CENTER: tl.constexpr, HAS_WEIGHT: tl.constexpr, W_OFFSET: tl.constexpr,
    STORE_HIDDEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]  # row offsets in int64: N * D may pass 2**31

    h = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_CENTER:
        c_ptrs = C + rows64 * stride_c_row + cols[None, :] * stride_c_col
        h -= tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)

    rstd = tl.rsqrt(tl.sum(h * h, axis=1) / n_cols + eps)  # masked lanes hold 0 and add nothing
    y = h * rstd[:, None]
    if HAS_WEIGHT:
        y *= _offset(tl.load(W + cols * stride_w, mask=col_mask, other=0.0).to(tl.float32), W_OFFSET)[None, :]

    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if STORE_HIDDEN:
        tl.store(H + rows64 * stride_h + cols[None, :], h.to(H.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _norm_bwd_dot_kernel(
    DY, H, W, RSTD, DOT,
    n_cols, stride_dy, stride_h, stride_w,
    HAS_WEIGHT: tl.constexpr, W_OFFSET: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Wide rows: mean(g * n) = rstd * sum(dy * w * h) / D of one row, in column chunks of BLOCK_D."""
    row64 = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = cols < n_cols
        g = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            g *= _offset(tl.load(W + cols * stride_w, mask=mask, other=0.0).to(tl.float32), W_OFFSET)
        acc += g * tl.load(H + row64 * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(DOT + row64, tl.sum(acc, axis=0) * tl.load(RSTD + row64) / n_cols)


@triton.jit(do_not_specialize=["n_rows"])
def _norm_bwd_kernel(
    DY, DH_OUT, H, W, RSTD, DOT, DX, DR, DW_PARTIAL, DC_PARTIAL,
    n_rows, n_cols, rows_per_program,
    stride_dy, stride_dh_out, stride_h, stride_w, stride_dx, stride_dr,
    HAS_DH_OUT: tl.constexpr, HAS_WEIGHT: tl.constexpr, W_OFFSET: tl.constexpr, CENTER_IS_VECTOR: tl.constexpr, ROW_DOT: tl.constexpr,
    STORE_DR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Programs (row slab, column block). Without ROW_DOT a column block is the whole row; with it, the row's
    mean(g * n) comes from DOT (see the module docstring: rows wider than WIDEST_SINGLE_PASS). With STORE_DR, dh
    is stored twice: into DX and into DR, the residual's own gradient (in its dtype)."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < n_cols
    if HAS_WEIGHT:
        w = _offset(tl.load(W + cols * stride_w, mask=col_mask, other=0.0).to(tl.float32), W_OFFSET)[None, :]
    dw_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dc_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)

    first_row = pid * rows_per_program
    for offset in range(0, rows_per_program, BLOCK_M):
        rows = first_row + offset + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]

        h = tl.load(H + rows64 * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, None]
        n = h * rstd
        if HAS_WEIGHT:
            g = dy * w
        else:
            g = dy
        if ROW_DOT:
            dot = tl.load(DOT + rows, mask=row_mask, other=0.0)
        else:
            dot = tl.sum(g * n, axis=1) / n_cols
        dh = (g - n * dot[:, None]) * rstd
        if HAS_DH_OUT:
            dh += tl.load(DH_OUT + rows64 * stride_dh_out + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64 * stride_dx + cols[None, :], dh.to(DX.dtype.element_ty), mask=mask)
        if STORE_DR:
            tl.store(DR + rows64 * stride_dr + cols[None, :], dh.to(DR.dtype.element_ty), mask=mask)

        if HAS_WEIGHT:
            dw_acc += tl.sum(dy * n, axis=0)
        if CENTER_IS_VECTOR:
            dc_acc -= tl.sum(dh, axis=0)

    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=col_mask)
    if CENTER_IS_VECTOR:
        tl.store(DC_PARTIAL + pid * n_cols + cols, dc_acc, mask=col_mask)


# ---------------------------------------------------------------------------------------------------------
# Launchers: pick the block shapes, allocate outputs, launch.
# ---------------------------------------------------------------------------------------------------------


def _programs_per_wave(device: torch.device) -> int:
    """Enough programs to fill the GPU a few times over; a handful under the CPU interpreter."""
    return 4 * multiprocessor_count(device)


# The widest row the single-pass backward holds in registers, and the column block of wider rows (see the
# module docstring; both checked spill-free by `python -m bench.compile`).
WIDEST_SINGLE_PASS = 8192
WIDE_ROW_BLOCK = 4096


def _block_shape(block_d: int, elements_per_program: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps) for tiles of BLOCK_M rows x block_d columns, about `elements_per_program` in size."""
    block_m = max(1, min(64, elements_per_program // block_d))
    num_warps = max(1, min(16, block_m * block_d // 512))
    return block_m, num_warps


def norm_forward(x, weight, center, residual, eps: float, out_dtype=None, weight_offset: float = 0.0):
    """x, residual: [N, D] with unit column stride; center: [D] or [N, D] view, weight: [D] (any strides).

    Returns (normed [N, D] in out_dtype (default x's), hidden [N, D] in x's dtype or empty when there is nothing
    to add or subtract, rstd [N] fp32).
    """
    n_rows, n_cols = x.shape
    store_hidden = residual is not None or center is not None
    normed = torch.empty_like(x, dtype=out_dtype)  # the kernel rounds to whatever dtype it stores into
    hidden = torch.empty_like(x) if store_hidden else x.new_empty(0)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if center is None:
        c_strides = (0, 0)
    elif center.dim() == 1:
        c_strides = (0, center.stride(0))
    else:
        c_strides = (center.stride(0), center.stride(1))
    block_d = next_power_of_2(n_cols)
    block_m, num_warps = _block_shape(block_d, 4096)
    _norm_fwd_kernel[(cdiv(n_rows, block_m),)](
        x, residual, center, weight, normed, hidden, rstd,
        n_rows, n_cols, eps,
        x.stride(0), 0 if residual is None else residual.stride(0), *c_strides, _stride(weight),
        normed.stride(0), hidden.stride(0) if store_hidden else 0,
        HAS_RESIDUAL=residual is not None, HAS_CENTER=center is not None, HAS_WEIGHT=weight is not None,
        W_OFFSET=weight_offset, STORE_HIDDEN=store_hidden, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        maxnreg=max_registers(num_warps) if block_m == 1 else None,  # one row of >= 4096: see max_registers
    )  # fmt: skip
    return normed, hidden, rstd


def _stride(vector) -> int:
    """The element stride of a [D] vector argument (a weight may be a strided or stride-0 view), 0 if absent."""
    return 0 if vector is None else vector.stride(0)


def _unit_col_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def norm_backward(
    grad_normed, grad_hidden, hidden, weight, rstd, center_is_vector: bool, residual_grad_dtype=None, weight_offset=0.0
):
    """Returns (grad of h [N, D] in h's dtype, grad of weight, float32 grad of a [D] centre, grad of the residual).

    The residual's gradient equals h's; with `residual_grad_dtype` the kernel also writes it into a tensor of its
    own, in that dtype (an input's gradient must not share storage with another's). An absent weight, centre or
    residual gradient gets an empty tensor (custom ops cannot return None).
    """
    n_rows, n_cols = hidden.shape
    grad_normed = _unit_col_stride(grad_normed)
    if grad_hidden is not None:
        grad_hidden = _unit_col_stride(grad_hidden)
    grad_h = torch.empty_like(hidden)
    store_dr = residual_grad_dtype is not None
    grad_residual = torch.empty(hidden.shape if store_dr else 0, dtype=residual_grad_dtype, device=hidden.device)

    block_d = next_power_of_2(n_cols)
    wide = block_d > WIDEST_SINGLE_PASS
    dot = None
    if wide:  # a mean(g * n) per row first, then column blocks of the row (see the module docstring)
        block_d = WIDE_ROW_BLOCK
        dot = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        _norm_bwd_dot_kernel[(n_rows,)](
            grad_normed, hidden, weight, rstd, dot,
            n_cols, grad_normed.stride(0), hidden.stride(0), _stride(weight),
            HAS_WEIGHT=weight is not None, W_OFFSET=weight_offset, BLOCK_D=block_d, num_warps=8,
        )  # fmt: skip
    block_m, num_warps = _block_shape(block_d, 2048)
    n_tiles = cdiv(n_rows, block_m)
    n_programs = min(n_tiles, _programs_per_wave(hidden.device))
    rows_per_program = cdiv(n_tiles, n_programs) * block_m
    n_programs = cdiv(n_rows, rows_per_program)

    def partial():
        return torch.empty(n_programs, n_cols, dtype=torch.float32, device=hidden.device)

    dw_partial = partial() if weight is not None else None
    dc_partial = partial() if center_is_vector else None
    _norm_bwd_kernel[(n_programs, cdiv(n_cols, block_d))](
        grad_normed, grad_hidden, hidden, weight, rstd, dot, grad_h, grad_residual if store_dr else None,
        dw_partial, dc_partial,
        n_rows, n_cols, rows_per_program,
        grad_normed.stride(0), 0 if grad_hidden is None else grad_hidden.stride(0), hidden.stride(0), _stride(weight),
        grad_h.stride(0), grad_residual.stride(0) if store_dr else 0,
        HAS_DH_OUT=grad_hidden is not None, HAS_WEIGHT=weight is not None, W_OFFSET=weight_offset, CENTER_IS_VECTOR=center_is_vector,
        ROW_DOT=wide, STORE_DR=store_dr, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    grad_weight = hidden.new_empty(0) if weight is None else dw_partial.sum(0).to(weight.dtype)
    grad_center = dc_partial.sum(0) if center_is_vector else hidden.new_empty(0, dtype=torch.float32)
    return grad_h, grad_weight, grad_center, grad_residual
