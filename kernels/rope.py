"""Rotary position embedding (RoPE) of queries and keys together, forward and backward, in one launch.

Each head vector x of length Dh is cut into Dh/2 pairs (x1, x2); pair i at position t turns by the angle
theta(t, i) = t * base**(-2i / Dh), whose cos and sin come from the float32 tables cos[t, i], sin[t, i]:

    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin

Pairing: half-split (x[i], x[i + Dh/2]) by default (GPT-NeoX / Llama-HF), or interleaved (x[2i], x[2i + 1])
(GPT-J / the original Llama). A rotation is orthogonal, so its backward is the rotation by the negative angle
(sin -> -sin) applied to the output gradient: the same kernel with INVERSE set. Math is in float32.

The inputs are [B, T, H, Dh] tensors addressed through all four strides, so strided views of a packed qkv
projection (`qkv.view(B, T, 3, H, Dh)[:, :, 0]`) are read in place. The outputs are new contiguous tensors.

Grid: axis 0 walks blocks of BLOCK_T tokens (B * T flattened, split back into (b, t) per token, which is
what lets any batch/time strides work); axis 1 walks blocks of BLOCK_H heads, first those of q, then those of
k (Hq and Hk may differ, as in grouped-query attention). A program loads the cos/sin rows of its tokens once
and reuses them for all its heads.

Block sizes (chosen in `_block_shape`, for bandwidth: this kernel reads and writes every element once and does
three flops per element, so it is memory bound):

* BLOCK_HALF = next power of two >= Dh/2, so a program always holds whole heads (no loop over Dh).
* A tile holds about 4096 elements of q or k (8 KiB in bf16): BLOCK_H takes as many heads as fit, capped
  at the smaller head count, so that with grouped-query attention the k programs are not mostly masked;
  BLOCK_T fills the rest of the tile with tokens. At the default shape (8192 tokens, 4 + 4 heads of 64) that is
  16 tokens x 4 heads per program and 2 x 512 programs, several per SM of an H100; for q and k of 65536
  tokens x 32 heads of 128 it is one token x 32 heads per program and 2 x 65536 programs.
* num_warps = tile / 512, at most 8 (16 for very wide heads): 16 elements per thread, i.e. each thread moves
  one 16-byte vector per half-head in bf16 (when Dh/2 is a multiple of 8 and the head stride keeps rows
  aligned), and 8 KiB (bf16) to 16 KiB (fp32) of loads per program in flight, which with several resident
  programs per SM is enough outstanding traffic to cover DRAM latency.

In the interleaved pairing a head is loaded as one contiguous row and split into even and odd lanes in
registers (reshape + split), rather than by two stride-2 loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import cdiv, next_power_of_2


@triton.jit
def _rotate_heads(
    X, OUT, cos, sin, token_offsets, out_token_offsets, token_mask,
    first_head, n_heads, half_dim, stride_h, stride_d,
    INTERLEAVED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """Rotate heads [first_head, first_head + BLOCK_H) of BLOCK_T tokens of one tensor (q or k) into OUT.

    token_offsets: [BLOCK_T] int64 element offsets of each token in X (b * stride_b + t * stride_t);
    out_token_offsets: the same in the contiguous OUT; cos, sin: [BLOCK_T, 1, BLOCK_HALF] float32.
    """
    heads = first_head + tl.arange(0, BLOCK_H)
    head_mask = heads < n_heads
    x_base = X + token_offsets[:, None, None] + (heads.to(tl.int64) * stride_h)[None, :, None]
    out_base = OUT + out_token_offsets[:, None, None] + (heads.to(tl.int64) * 2 * half_dim)[None, :, None]
    row_mask = token_mask[:, None, None] & head_mask[None, :, None]

    if INTERLEAVED:  # pairs (2i, 2i + 1): one contiguous load, split into even and odd lanes
        cols = tl.arange(0, 2 * BLOCK_HALF)
        mask = row_mask & (cols < 2 * half_dim)[None, None, :]
        x = tl.load(x_base + cols[None, None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, [BLOCK_T, BLOCK_H, BLOCK_HALF, 2]))
    else:  # pairs (i, i + Dh/2): two contiguous half-rows
        pairs = tl.arange(0, BLOCK_HALF)
        mask = row_mask & (pairs < half_dim)[None, None, :]
        x1 = tl.load(x_base + pairs[None, None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_base + (pairs + half_dim)[None, None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)

    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin

    if INTERLEAVED:
        y = tl.reshape(tl.join(y1, y2), [BLOCK_T, BLOCK_H, 2 * BLOCK_HALF])
        tl.store(out_base + cols[None, None, :], y.to(OUT.dtype.element_ty), mask=mask)
    else:
        tl.store(out_base + pairs[None, None, :], y1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(out_base + (pairs + half_dim)[None, None, :], y2.to(OUT.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_tokens", "seq_len"])
def _rope_kernel(
    Q, K, Q_OUT, K_OUT, COS, SIN,
    n_tokens, seq_len, n_q_heads, n_k_heads, half_dim, n_q_head_blocks,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_cos_t, stride_cos_i, stride_sin_t, stride_sin_i,
    INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head_block = tl.program_id(1)
    token_mask = tokens < n_tokens
    tokens = tokens.to(tl.int64)  # offsets in int64: B * T * H * Dh may pass 2**31
    b = tokens // seq_len
    t = tokens % seq_len

    # The angles of these tokens, shared by every head of q and k in this program.
    pairs = tl.arange(0, BLOCK_HALF)
    table_mask = token_mask[:, None] & (pairs < half_dim)[None, :]
    cos = tl.load(COS + t[:, None] * stride_cos_t + pairs[None, :] * stride_cos_i, mask=table_mask, other=0.0)
    sin = tl.load(SIN + t[:, None] * stride_sin_t + pairs[None, :] * stride_sin_i, mask=table_mask, other=0.0)
    cos = cos.to(tl.float32)[:, None, :]
    sin = sin.to(tl.float32)[:, None, :]
    if INVERSE:  # the backward: rotate by -theta
        sin = -sin

    if head_block < n_q_head_blocks:
        _rotate_heads(
            Q, Q_OUT, cos, sin, b * stride_qb + t * stride_qt, tokens * (n_q_heads * 2 * half_dim), token_mask,
            head_block * BLOCK_H, n_q_heads, half_dim, stride_qh, stride_qd,
            INTERLEAVED, BLOCK_T, BLOCK_H, BLOCK_HALF,
        )  # fmt: skip
    else:
        _rotate_heads(
            K, K_OUT, cos, sin, b * stride_kb + t * stride_kt, tokens * (n_k_heads * 2 * half_dim), token_mask,
            (head_block - n_q_head_blocks) * BLOCK_H, n_k_heads, half_dim, stride_kh, stride_kd,
            INTERLEAVED, BLOCK_T, BLOCK_H, BLOCK_HALF,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Launcher: pick the block shape, allocate the outputs, launch once for q and k.
# ---------------------------------------------------------------------------------------------------------

TILE_ELEMENTS = 4096  # elements of q or k per program (see the module docstring)


def _block_shape(n_tokens: int, n_q_heads: int, n_k_heads: int, half_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_H, BLOCK_HALF, num_warps) for tiles of whole heads, about TILE_ELEMENTS in size."""
    block_half = next_power_of_2(half_dim)
    head_elements = 2 * block_half
    heads_that_fit = max(1, TILE_ELEMENTS // head_elements)
    block_h = min(next_power_of_2(min(n_q_heads, n_k_heads)), heads_that_fit)
    block_t = max(1, min(TILE_ELEMENTS // (block_h * head_elements), next_power_of_2(n_tokens)))
    num_warps = max(1, min(16 if head_elements > TILE_ELEMENTS else 8, block_t * block_h * head_elements // 512))
    return block_t, block_h, block_half, num_warps


def rope_rotate(q, k, cos, sin, interleaved: bool, inverse: bool):
    """Rotate q [B, T, Hq, Dh] and k [B, T, Hk, Dh] (any strides) by the angles in cos/sin [>= T, Dh/2].

    `inverse` rotates by the negative angle (the backward). Returns new contiguous (q_out, k_out) in the
    input dtypes. Arguments are checked by `fastcenter.ops.rope`.
    """
    B, T, n_q_heads, head_dim = q.shape
    n_k_heads = k.shape[2]
    half_dim = head_dim // 2
    n_tokens = B * T
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)

    block_t, block_h, block_half, num_warps = _block_shape(n_tokens, n_q_heads, n_k_heads, half_dim)
    n_q_head_blocks = cdiv(n_q_heads, block_h)
    grid = (cdiv(n_tokens, block_t), n_q_head_blocks + cdiv(n_k_heads, block_h))
    _rope_kernel[grid](
        q, k, q_out, k_out, cos, sin,
        n_tokens, T, n_q_heads, n_k_heads, half_dim, n_q_head_blocks,
        *q.stride(), *k.stride(), *cos.stride(), *sin.stride(),
        INTERLEAVED=interleaved, INVERSE=inverse,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=num_warps,
    )  # fmt: skip
    return q_out, k_out
