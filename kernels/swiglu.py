"""Gated activations, forward and backward, over [N, H] rows: y = act(g) * u, the activation a constexpr.

    "silu"       act(g) = g * sigmoid(g)                                       (SwiGLU)
    "gelu_tanh"  act(g) = g/2 * (1 + tanh(k * (g + a * g**3)))                 (GeGLU as in Gemma)
    "gelu"       act(g) = g/2 * (1 + erf(g / sqrt(2))) = g * Phi(g)            (GeGLU, exact GELU)

with k = sqrt(2 / pi) and a = 0.044715. The first two are g * s with s = sigmoid(z): z = g for silu, and
z = 2k * (g + a * g**3) for gelu_tanh, since (1 + tanh(x)) / 2 = sigmoid(2x) (no tanh, and no cancellation near
zero). Forward and backward, all math in float32:

    y  = act(g) * u
    dg = dy * u * act'(g)     act'(g) = s * (1 + g * (1 - s) * dz/dg)    dz/dg = 1, or 2k * (1 + 3a * g**2)
                              act'(g) = Phi(g) + g * exp(-g**2 / 2) / sqrt(2 * pi)                 (gelu)
    du = dy * act(g)

One pair of kernels serves every activation: the family is named after its first member, as the norm family's
kernels serve rms_norm and center_rms_norm. The backward recomputes act(g) and act'(g) from the saved inputs g
and u; nothing else is saved. The gate and up halves are two row-strided views, so the packed form -- one
[N, 2H] projection [g | u] -- is the same kernel with the up pointer H columns to the right of the gate pointer,
and its gradient is one [N, 2H] tensor whose two halves the backward kernel writes directly (no concatenation
afterwards). Rows may have any stride; columns have unit stride (the caller makes one copy where they do not).

Block sizes (chosen in `_block_shape`, for bandwidth: per element the forward moves 3 values and the backward
5, against 10 to 25 flops, so both are memory bound whatever the activation):

* Tiles of [BLOCK_M rows, BLOCK_N columns], about 4096 elements (8 KiB per stream in bf16). BLOCK_N covers
  the whole row up to 1024 columns; wider rows are split into column blocks of 1024 (or of 512/256/128 when
  one of those divides H exactly, so that the last block is not mostly masked). BLOCK_M fills the rest.
  At the default shape (8192 x 1024) that is 4 rows per program and 2048 programs; at 65536 x 4096 it is
  4 rows x 1024 columns and 65536 programs: many programs per SM of an H100 in both cases.
* num_warps = tile / 512, at most 8: 16 elements per thread, two 16-byte vectors per stream in bf16, and
  16-24 KiB of loads per program in flight, which with several resident programs per SM is enough outstanding
  traffic to cover DRAM latency.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import cdiv, max_registers, next_power_of_2

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")


@triton.jit
def _activation(g, ACTIVATION: tl.constexpr):
    """(act(g), act'(g)) in float32 (see the module docstring); the forward's unused act' is compiled away."""
    if ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865475))  # Phi(g) = (1 + erf(g / sqrt(2))) / 2
        act = g * cdf
        grad = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327  # 1 / sqrt(2 pi)
    else:
        if ACTIVATION == "gelu_tanh":
            two_k = 1.5957691216057308  # 2 * sqrt(2 / pi)
            s = tl.sigmoid(two_k * (g + 0.044715 * g * g * g))
            grad = s * (1.0 + g * (1.0 - s) * (two_k * (1.0 + 0.134145 * g * g)))  # 0.134145 = 3 * 0.044715
        else:  # silu
            s = tl.sigmoid(g)
            grad = s * (1.0 + g * (1.0 - s))
        act = g * s
    return act, grad


@triton.jit(do_not_specialize=["n_rows"])
def _swiglu_fwd_kernel(
    GATE, UP, OUT,
    n_rows, n_cols, stride_gate, stride_up, stride_out,
    ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]  # row offsets in int64: N * 2H may pass 2**31

    g = tl.load(GATE + rows64 * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + rows64 * stride_up + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    act, _ = _activation(g, ACTIVATION)
    tl.store(OUT + rows64 * stride_out + cols[None, :], (act * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def _swiglu_bwd_kernel(
    DY, GATE, UP, DGATE, DUP,
    n_rows, n_cols, stride_dy, stride_gate, stride_up, stride_dgate, stride_dup,
    ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]

    dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + rows64 * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + rows64 * stride_up + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    act, act_grad = _activation(g, ACTIVATION)  # recomputed, not saved
    # (this order of the products needs the fewest registers; `python -m bench.compile` shows the count)
    dg = act_grad * u * dy
    du = act * dy
    tl.store(DGATE + rows64 * stride_dgate + cols[None, :], dg.to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + rows64 * stride_dup + cols[None, :], du.to(DUP.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Launchers: split the packed form into its two halves, pick the block shape, allocate, launch.
# ---------------------------------------------------------------------------------------------------------

TILE_ELEMENTS = 4096  # elements per program (see the module docstring)
MAX_BLOCK_N = 1024


def _block_shape(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for tiles of about TILE_ELEMENTS elements."""
    if n_cols <= MAX_BLOCK_N:
        block_n = next_power_of_2(n_cols)
    else:  # prefer a column block that divides the row exactly: no mostly-masked last block
        block_n = next((b for b in (1024, 512, 256, 128) if n_cols % b == 0), MAX_BLOCK_N)
    block_m = max(1, min(TILE_ELEMENTS // block_n, next_power_of_2(n_rows)))
    num_warps = max(1, min(8, block_m * block_n // 512))
    return block_m, block_n, num_warps


def _halves(gate, up):
    """(gate, up) as [N, H] views: with up None, the two halves of the packed [N, 2H] `gate`."""
    if up is not None:
        return gate, up
    width = gate.shape[1] // 2
    return gate[:, :width], gate[:, width:]


def swiglu_forward(gate, up, activation: str = "silu"):
    """gate, up: [N, H] with unit column stride; with up None, gate is the packed [N, 2H]. Returns y [N, H].

    activation: one of ACTIVATIONS."""
    gate, up = _halves(gate, up)
    n_rows, n_cols = gate.shape
    out = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    block_m, block_n, num_warps = _block_shape(n_rows, n_cols)
    grid = (cdiv(n_rows, block_m), cdiv(n_cols, block_n))
    _swiglu_fwd_kernel[grid](
        gate, up, out,
        n_rows, n_cols, gate.stride(0), up.stride(0), out.stride(0),
        ACTIVATION=activation, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip
    return out


def swiglu_backward(grad_out, gate, up, activation: str = "silu"):
    """Returns (grad of gate, grad of up), each [N, H]; for the packed form (grad [N, 2H], empty tensor)."""
    packed = up is None
    gate, up = _halves(gate, up)
    n_rows, n_cols = gate.shape
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    if packed:  # one [N, 2H] gradient; the kernel writes its two halves
        grad_packed = torch.empty((n_rows, 2 * n_cols), dtype=gate.dtype, device=gate.device)
        grad_gate, grad_up = grad_packed[:, :n_cols], grad_packed[:, n_cols:]
    else:
        grad_gate = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
        grad_up = torch.empty((n_rows, n_cols), dtype=up.dtype, device=up.device)
    block_m, block_n, num_warps = _block_shape(n_rows, n_cols)
    maxnreg = None
    if n_cols % block_n:
        # Masked columns cost each element its own predicate and address, and ptxas, aiming at the occupancy it
        # sees fit, spilled on sm_80-sm_89 (`python -m bench.compile`): half the rows per program (8 elements a
        # thread) and a register ceiling of three resident programs per SM (see _device.max_registers).
        block_m = max(1, block_m // 2)
        maxnreg = max_registers(num_warps, 3)
    grid = (cdiv(n_rows, block_m), cdiv(n_cols, block_n))
    _swiglu_bwd_kernel[grid](
        grad_out, gate, up, grad_gate, grad_up,
        n_rows, n_cols, grad_out.stride(0), gate.stride(0), up.stride(0), grad_gate.stride(0), grad_up.stride(0),
        ACTIVATION=activation, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, maxnreg=maxnreg,
    )  # fmt: skip
    if packed:
        return grad_packed, grad_packed.new_empty(0)
    return grad_gate, grad_up
