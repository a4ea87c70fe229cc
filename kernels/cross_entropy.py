"""Softmax cross-entropy over a vocabulary, and the chunked linear (LM-head) cross-entropy built on it.

Per row of logits l[0:V] with target t (all math in float32):

    z      = softcap * tanh(l / softcap)          (or z = l); padded lanes (>= V) are masked AFTER the cap
    lse    = logsumexp(z)                         online over vocabulary blocks: running max and rescaled sum
    loss   = (1 - ls) * (lse - z[t]) + ls * (lse - mean(z)) + z_loss * lse**2
    dz[j]  = p[j] * (1 + 2 * z_loss * lse) - ls / V - (1 - ls) * [j == t],      p = exp(z - lse)
    dl[j]  = dz[j] * (1 - (z[j] / softcap)**2)    (softcap only: tanh' = 1 - tanh**2)

A row whose target is ignore_index has loss 0 and gradient 0. A target outside [0, V) that is not ignore_index
gives loss NaN and a NaN gradient row (which then poisons the weight gradient too: never a finite wrong
number; the eager reference, through torch.where, leaves that row's gradient at 0 instead).

One kernel, `_cross_entropy_kernel`, does both halves with constexpr flags: COMPUTE_STATS runs pass 1 over the
row (lse, loss), WRITE_GRAD runs pass 2 (reads the row again, writes dl scaled by a per-row or scalar factor;
without COMPUTE_STATS it reads a saved lse). The row is 50257 wide at the default shape, far too wide for
registers, so both passes loop over BLOCK_V-wide blocks. Each program walks rows with a stride of the grid
size, and the grid is kept to a couple of programs per SM, so the rows in flight (~264 x 100 KB at the default
shape on an H100) fit in L2 and the second pass re-reads the row from L2, not HBM.

cross_entropy(logits, target): forward = pass 1 only (loss, lse; the logits are saved, nothing N x V is
allocated); backward = pass 2 only with grad_output (and 1/n_valid for "mean") folded into the per-row scale,
into a new gradient buffer. Three passes over N x V in total, one rounding of the gradient.

linear_cross_entropy(x, W, b, target): rows in chunks of C tokens; per chunk

    logits_c = x_c @ W.T (+ b)       cuBLAS (torch.mm/addmm, out= a reused [C, V] buffer in the compute dtype)
    kernel: pass 1 + pass 2          the gradient overwrites the logits in place (the buffer is ours)
    dx_c     = dlogits_c @ W         cuBLAS, written straight into grad_input[rows] (input dtype)
    dW      += dlogits_c.T @ x_c     into ONE float32 accumulator [V, D], in place (_add_matmul), db likewise

so the gradients are finished during the forward (3 GEMMs in all) and the backward only multiplies them by
the scalar grad_output. For "mean" the kernel folds 1/n_valid (counted on the device: no sync) into the
gradient. For reduction="none" the grad_output is per token and dW cannot be post-scaled: the forward runs
GEMM 1 + pass 1 only and saves lse [N]; the backward recomputes logits_c and runs pass 2 with the per-token
grad_output folded in, then the two gradient GEMMs (4 GEMMs in all, still no N x V tensor).

Precision: GEMMs run in the input's dtype (under autocast the caller has cast the input, as F.linear would).
A float32 linear_weight with a bf16/fp16 input (master weights) is cast once per call inside the op, and its
gradient comes straight from the float32 accumulator (no bf16 round trip). Losses are float32. The bf16/fp16
dW products are added into the float32 accumulator in place, never through a float32 temporary: by cuBLAS
(torch.addmm(..., out_dtype=torch.float32, out=acc)) where torch takes that, else by `_add_matmul_kernel`, a
Triton GEMM that adds its float32 tile into the accumulator (see `_fp32_accumulation`); on CPU the
low-precision GEMMs are done in float32 and rounded once (slow, but the CPU path is for tests).

Memory beyond inputs and gradients: the chunk buffer C x V_pad (V_pad = V rounded up to 64, so every row
is 128-byte aligned for cuBLAS and the kernel), the float32 dW accumulator when the weight is not float32
(V x D x 4), and the compute-dtype copy of W when it is float32 (V x D x 2).

Chunk size (`default_chunk_size`). Every chunk, whatever its size, reads W twice (GEMMs 1 and 2) and reads and
writes the float32 accumulator (GEMM 3): 154 MB at the default shape, as much as 1.5 passes over the chunk's
logits. C is CHUNK_BYTES of logits (1024 rows at V = 50257 in bf16) or an eighth of the rows (MAX_CHUNKS),
whichever is more: at most 8 chunks, so that overhead stays a bounded share of the work at any batch, while
the buffer stays at most 1/8 of the full logits and grows only with the batch, as the activations beside it
do (16 x 512 tokens: 1024 rows, 103 MB, what keeps the step under its 1 GB; 64 x 512: 4096 rows, 412 MB).

Expected cost at the default shape, a model written before any measurement (N = 8192, D = 256, V = 50257, bf16, H100 at
~3.3 TB/s and ~800 TFLOP/s; L = N * V * 2 B = 823 MB = one pass over all chunk logits = 0.25 ms; one GEMM
= 2 N D V = 0.21 TFLOP = 0.26 ms of compute; each GEMM has arithmetic intensity ~D = 256 FLOP/B, at the
ridge, so each costs about max(compute, bytes)):

    C = 1024 (default, 8 chunks)              bytes moved                    time at peak
    GEMM 1  logits                            L + 8 x W (26 MB)              0.31 ms
    kernel  read + write (2nd read in L2)     2 L                            0.50 ms
    GEMM 2  dx                                L + 8 x W                      0.31 ms
    GEMM 3  dW (+ float32 acc read/write)     L + 15 x 51 MB                 0.49 ms
    backward scale of dW, dx                  ~80 MB                         0.03 ms
    total                                                                    ~1.64 ms

i.e. about the 1.6 ms target only at full bandwidth; expect ~1.9 ms at a realistic 85%. C = 2048 would be
~1.45 ms at peak (fewer W re-reads and accumulator passes) but +103 MB of buffer; C = 512 ~2.0 ms. Memory
at C = 1024: 103 MB buffer + 51 MB float32 accumulator (bf16 weight) = ~155 MB, or 103 + 26 MB (bf16 copy)
with float32 master weights: above the 100 MB target. The 5 passes over the logits (~1.25 ms at peak) are
the floor of this cuBLAS + row-kernel design; meeting both targets would take a fused GEMM whose epilogue
does the softmax (logits never leave SRAM). Risks to check on the GPU: the kernel's second pass missing L2
(+0.25 ms), the dx GEMM (M = C, N = 256, K = 50257) needing split-K from cuBLAS, and the speed of the Triton
dW GEMM where torch refuses cuBLAS's in-place float32 output (bench.step_cost counts its bytes, not its speed).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._device import cdiv, max_registers, multiprocessor_count, next_power_of_2

# Widest vocabulary block a program handles at once, and the programs launched per SM (kept small so the
# rows in flight stay in L2 between the two passes). Tunables for the GPU benchmark.
MAX_BLOCK_V = 8192
PROGRAMS_PER_SM = 2
NUM_WARPS = 16
# Default chunk: as many rows as fit in this many bytes of logits (a power of two, at least 128 rows), or
# 1/MAX_CHUNKS of the rows when that is more (see the module docstring).
CHUNK_BYTES = 128 * 2**20
MAX_CHUNKS = 8
# Chunk rows are padded to a multiple of this many elements (128-byte rows in bf16): cuBLAS gets aligned rows,
# and the row kernel reads and writes whole rows padding included, so that its masks are constant over 16-byte
# vectors (a mask at V = 50257 is not) and its loads and stores are vectorised.
ROW_ALIGN = 64


@triton.jit
def _tanh(y):
    """tanh in float32 from exp (the interpreter has no libdevice); the odd series keeps it exact near 0."""
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    a2 = a * a
    t = tl.where(a < 0.1, a * (1.0 - a2 * (1.0 / 3.0 - a2 * (2.0 / 15.0))), t)
    return tl.where(y < 0, -t, t)


@triton.jit(do_not_specialize=["n_rows"])
def _cross_entropy_kernel(
    LOGITS, GRAD, TARGET, LOSS, LSE, GRAD_SCALE,
    n_rows, n_cols, row_width, stride_logits, stride_grad, stride_grad_scale,
    ignore_index, label_smoothing, z_loss, softcap,
    COMPUTE_STATS: tl.constexpr, WRITE_GRAD: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    block_cols = tl.arange(0, BLOCK_V)
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row64 = tl.cast(row, tl.int64)  # row * stride passes 2**31 for large chunks
        logits_row = LOGITS + row64 * stride_logits
        target = tl.load(TARGET + row)
        ignored = target == ignore_index
        in_range = (target >= 0) & (target < n_cols)

        if COMPUTE_STATS:
            # Pass 1: online logsumexp over vocabulary blocks (and the sum of z for label smoothing).
            running_max = float("-inf")
            running_sum = 0.0
            z_sum = 0.0
            for start in range(0, n_cols, BLOCK_V):
                cols = start + block_cols
                mask = cols < n_cols
                z = tl.load(logits_row + cols, mask=cols < row_width, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    z = softcap * _tanh(z / softcap)
                if HAS_SMOOTHING:
                    z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
                z = tl.where(mask, z, float("-inf"))  # after the cap: capped padding would be -softcap, not -inf
                new_max = tl.maximum(running_max, tl.max(z, axis=0))
                running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
                running_max = new_max
            lse = running_max + tl.log(running_sum)

            z_target = tl.load(logits_row + target, mask=in_range, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z_target = softcap * _tanh(z_target / softcap)
            loss = lse - (1.0 - label_smoothing) * z_target + z_loss * lse * lse
            if HAS_SMOOTHING:
                loss -= label_smoothing * (z_sum / n_cols)
            loss = tl.where(in_range, loss, float("nan"))
            loss = tl.where(ignored, 0.0, loss)
            tl.store(LOSS + row, loss)
            tl.store(LSE + row, lse)
        else:
            lse = tl.load(LSE + row)

        if WRITE_GRAD:
            # Pass 2: the gradient of the (scaled) loss w.r.t. the logits, block by block.
            scale = tl.load(GRAD_SCALE + row * stride_grad_scale).to(tl.float32)
            scale = tl.where(in_range, scale, float("nan"))
            scale = tl.where(ignored, 0.0, scale)
            p_coef = 1.0 + 2.0 * z_loss * lse  # d(z_loss * lse**2)/dz = 2 z_loss lse p
            smooth = label_smoothing / n_cols
            grad_row = GRAD + row64 * stride_grad
            for start in range(0, n_cols, BLOCK_V):
                cols = start + block_cols
                wide = cols < row_width
                z = tl.load(logits_row + cols, mask=wide, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    tanh_z = _tanh(z / softcap)
                    z = softcap * tanh_z
                g = tl.exp(z - lse) * p_coef - smooth
                g -= tl.where(cols == target, 1.0 - label_smoothing, 0.0)
                if HAS_SOFTCAP:
                    g *= 1.0 - tanh_z * tanh_z
                g = tl.where(cols < n_cols, g * scale, 0.0)  # the row's padding gets zeros, never garbage
                tl.store(grad_row + cols, g.to(GRAD.dtype.element_ty), mask=wide)


@triton.jit(do_not_specialize=["K"])
def _add_matmul_kernel(
    ACC, A, B,
    M, N, K, a_width,
    stride_acc, stride_ak, stride_am, stride_bk, stride_bn,
    FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """ACC [M, N] (float32) += A^T @ B, or = when FIRST; A [K, M], B [K, N] in bf16/fp16 (any strides).

    The weight gradient's accumulation, dW [V, D] += dlogits_c^T [V, C] @ x_c [C, D], where cuBLAS cannot add a
    low-precision product into a float32 matrix in place: one [BLOCK_M, BLOCK_N] tile of ACC per program (axis 0
    walks N, so the programs sharing a block of A run side by side and read it from L2), its K-sum in float32
    registers, then one read-add-write of the tile. A's rows may be read up to a_width >= M (a padded chunk row:
    its loads are then whole 16-byte vectors); the rows of ACC beyond M are computed and never stored.
    """
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask, col_mask = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k64 = ks.to(tl.int64)[:, None]  # K x stride passes 2**31 for large chunks
        k_mask = (ks < K)[:, None]
        a_mask = k_mask & (rows < a_width)[None, :]
        a = tl.load(A + k64 * stride_ak + rows[None, :] * stride_am, mask=a_mask, other=0.0)
        b = tl.load(B + k64 * stride_bk + cols[None, :] * stride_bn, mask=k_mask & col_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc)
    tile = ACC + rows.to(tl.int64)[:, None] * stride_acc + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    if not FIRST:
        acc += tl.load(tile, mask=mask, other=0.0)
    tl.store(tile, acc, mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Launchers.
# ---------------------------------------------------------------------------------------------------------


def _max_programs(device: torch.device) -> int:
    """PROGRAMS_PER_SM per SM; 4 under the CPU interpreter (it runs programs one after another: few programs,
    long row loops)."""
    return PROGRAMS_PER_SM * multiprocessor_count(device) if device.type != "cpu" else 4


def _launch_rows(
    logits,
    grad,
    target,
    loss,
    lse,
    grad_scale,
    *,
    compute_stats,
    write_grad,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    row_width=None,
):
    """Run `_cross_entropy_kernel` over the rows of `logits` [R, V] (unit column stride, any row stride).

    target [R] int64. compute_stats: write loss [R] and lse [R] (float32); else read lse. write_grad: write
    the gradient into `grad` [R, V] (may be `logits` itself), times grad_scale ([R] or a 0-dim tensor).
    row_width (>= V, default V): how many columns of every row of logits and grad may be read and written (the
    padded rows of a buffer of ours; the padding gets zeros), see ROW_ALIGN.
    """
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    block_v = min(MAX_BLOCK_V, next_power_of_2(n_cols))
    num_warps = max(1, min(NUM_WARPS, block_v // 512))  # 16 lanes per thread at the widest block
    n_programs = min(n_rows, _max_programs(logits.device))
    scale_stride = 0 if grad_scale is None or grad_scale.dim() == 0 else grad_scale.stride(0)
    _cross_entropy_kernel[(n_programs,)](
        logits, grad, target, loss, lse, grad_scale,
        n_rows, n_cols, n_cols if row_width is None else row_width,
        logits.stride(0), 0 if grad is None else grad.stride(0), scale_stride,
        ignore_index, label_smoothing, z_loss, 1.0 if softcap is None else softcap,
        COMPUTE_STATS=compute_stats, WRITE_GRAD=write_grad,
        HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=label_smoothing > 0.0, BLOCK_V=block_v,
        num_warps=num_warps, maxnreg=max_registers(num_warps, PROGRAMS_PER_SM),  # two resident programs per SM
    )  # fmt: skip


def _mean_scale(target, ignore_index: int, reduction: str) -> torch.Tensor:
    """0-dim float32 factor of the summed loss: 1 / max(n_valid, 1) for "mean" (counted on device), else 1."""
    if reduction == "mean":
        n_valid = (target != ignore_index).sum()
        return 1.0 / n_valid.clamp(min=1).to(torch.float32)
    return torch.ones((), dtype=torch.float32, device=target.device)


def _reduce(loss_rows, scale, reduction: str):
    return loss_rows if reduction == "none" else loss_rows.sum() * scale


def cross_entropy_forward(logits, target, *, reduction, ignore_index, label_smoothing, z_loss, softcap):
    """logits [N, V] (unit column stride), target [N] int64. Returns (loss float32, lse [N] float32)."""
    n_rows = logits.shape[0]
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss_rows)
    _launch_rows(
        logits,
        None,
        target,
        loss_rows,
        lse,
        None,
        compute_stats=True,
        write_grad=False,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
    )
    return _reduce(loss_rows, _mean_scale(target, ignore_index, reduction), reduction), lse


def cross_entropy_backward(
    grad_loss, logits, target, lse, *, reduction, ignore_index, label_smoothing, z_loss, softcap
):
    """Gradient of the loss w.r.t. logits [N, V], in the logits' dtype (a new buffer)."""
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    grad_scale = _per_row_scale(grad_loss, target, ignore_index, reduction)
    _launch_rows(
        logits,
        grad_logits,
        target,
        None,
        lse,
        grad_scale,
        compute_stats=False,
        write_grad=True,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
    )
    return grad_logits


def _per_row_scale(grad_loss, target, ignore_index: int, reduction: str):
    """grad_output as the kernel's per-row factor: [N] for "none", else a 0-dim tensor (1/n for "mean")."""
    grad_loss = grad_loss.to(torch.float32)
    if reduction == "none":
        return grad_loss.reshape(-1)
    return grad_loss.reshape(()) * _mean_scale(target, ignore_index, reduction)


# ---------------------------------------------------------------------------------------------------------
# The chunked linear cross-entropy: cuBLAS GEMMs around the row kernel.
# ---------------------------------------------------------------------------------------------------------


FP32_ACCUMULATION_MODES = ("native", "cublas_inplace", "triton", "upcast")


@functools.lru_cache(maxsize=None)
def _fp32_accumulation(device: torch.device, dtype: torch.dtype) -> str:
    """How to add a `dtype` matrix product into a float32 buffer here, in place and without float32 temporaries
    (probed once per device and dtype, on the first call; a refusal is a host-side error):

    "native"          float32 operands: addmm_ in place.
    "cublas_inplace"  cuBLAS writes the bf16/fp16 product straight into the float32 buffer, in place:
                      torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc), where torch has it.
    "triton"          `_add_matmul_kernel`: the same in a Triton GEMM, for a torch that refuses the above.
    "upcast"          float32 copies of the operands (the CPU, where the interpreter would be slower).
    """
    if dtype == torch.float32:
        return "native"
    if device.type != "cuda":
        return "upcast"
    a = torch.ones(2, 2, device=device, dtype=dtype)
    acc = torch.ones(2, 2, device=device, dtype=torch.float32)
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return "cublas_inplace"
    except (RuntimeError, TypeError, NotImplementedError):
        return "triton"


def _matmul_into(out, a, b, bias=None) -> None:
    """out = a @ b (+ bias), accumulated in float32 and rounded once to out's dtype (cuBLAS does this for
    bf16/fp16 by itself; on the CPU the low-precision product is formed in float32 here)."""
    if a.dtype != torch.float32 and a.device.type != "cuda":
        product = torch.mm(a.float(), b.float())
        if bias is not None:
            product += bias.float()
        out.copy_(product)
    elif bias is None:
        torch.mm(a, b, out=out)
    else:
        torch.addmm(bias, a, b, out=out)


def _add_matmul(acc, a, b, *, first: bool, a_width=None) -> None:
    """acc (float32) += a @ b, or = a @ b when `first`; accumulation in float32 whatever a and b are.
    a_width: see add_matmul_triton."""
    mode = _fp32_accumulation(a.device, a.dtype)
    beta = 0.0 if first else 1.0  # beta = 0 ignores acc's (uninitialised) contents
    if mode == "native":
        acc.addmm_(a, b, beta=beta)
    elif mode == "cublas_inplace":
        torch.addmm(acc, a, b, out_dtype=torch.float32, beta=beta, out=acc)
    elif mode == "triton":
        add_matmul_triton(acc, a, b, first=first, a_width=a_width)
    else:
        acc.addmm_(a.float(), b.float(), beta=beta)


def add_matmul_triton(acc, a, b, *, first: bool, a_width=None) -> None:
    """acc [M, N] float32 (unit column stride) += a [M, K] @ b [K, N] (or =), through `_add_matmul_kernel`.

    a_width (>= M, default M): how many rows of `a` may be read (a transposed chunk buffer: its padded rows)."""
    (m, k), n = a.shape, b.shape[1]
    if m == 0 or n == 0:
        return
    block_n = max(16, min(256, next_power_of_2(n)))
    block_m = max(16, min(128, 16384 // block_n))  # a 16 K-element float32 tile: 64 registers a thread at 8 warps
    a_t = a.t()  # the kernel reads A^T: [K, M]
    _add_matmul_kernel[(cdiv(n, block_n), cdiv(m, block_m))](
        acc, a_t, b,
        m, n, k, m if a_width is None else a_width,
        acc.stride(0), a_t.stride(0), a_t.stride(1), b.stride(0), b.stride(1),
        FIRST=first, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64, num_warps=8,
    )  # fmt: skip


def default_chunk_size(n_rows: int, vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk: the power of two whose logits fill about CHUNK_BYTES (1024 at the default shape, bf16),
    or an eighth of the rows (MAX_CHUNKS) when that is more (4096 for 64 x 512 tokens); see the module docstring."""
    padded = -(-vocab // ROW_ALIGN) * ROW_ALIGN
    rows = max(1, CHUNK_BYTES // (padded * torch.finfo(dtype).bits // 8))
    rows = max(128, 1 << (rows.bit_length() - 1), -(-n_rows // MAX_CHUNKS))
    return min(rows, max(n_rows, 1))


def _chunk_buffer(rows: int, vocab: int, dtype, device):
    """A reusable [rows, vocab] logits buffer whose rows start ROW_ALIGN-aligned (row stride padded)."""
    padded = -(-vocab // ROW_ALIGN) * ROW_ALIGN
    return torch.empty(rows, padded, dtype=dtype, device=device)[:, :vocab]


def _chunked_pass(
    x,
    weight,
    bias,
    target,
    *,
    lse,
    loss_rows,
    grad_scale,
    compute_stats,
    write_grad,
    need_grad_input,
    need_grad_weight,
    need_grad_bias,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    chunk_size,
):
    """The chunk loop shared by forward and backward. Returns (grad_input, float32 dW, float32 db) or empties.

    Per chunk: logits = x_c @ W.T (+ b) into the buffer; the row kernel (pass 1 and/or pass 2, the gradient
    in place); then dx_c = dlogits @ W into grad_input and dW, db accumulated in float32.
    """
    n_rows, dim = x.shape
    vocab = weight.shape[0]
    device, dtype = x.device, x.dtype
    w = weight.to(dtype)  # no copy when the dtypes agree; one cast per call for float32 master weights
    b = None if bias is None else bias.to(dtype)
    float32 = dict(dtype=torch.float32, device=device)  # each output its own tensor: custom ops forbid aliases
    grad_input = x.new_empty((n_rows, dim) if need_grad_input else 0)
    grad_weight = torch.empty((vocab, dim) if need_grad_weight else 0, **float32)
    grad_bias = torch.zeros(vocab if need_grad_bias else 0, **float32)

    if chunk_size is None:
        chunk_size = default_chunk_size(n_rows, vocab, dtype)
    chunk_size = min(chunk_size, n_rows)
    buffer = _chunk_buffer(chunk_size, vocab, dtype, device)
    for start in range(0, n_rows, chunk_size):
        end = min(start + chunk_size, n_rows)
        x_c = x[start:end]
        logits = buffer[: end - start]
        _matmul_into(logits, x_c, w.t(), b)
        _launch_rows(
            logits,
            logits if write_grad else None,
            target[start:end],
            loss_rows[start:end] if compute_stats else None,
            lse[start:end],
            grad_scale if grad_scale is None or grad_scale.dim() == 0 else grad_scale[start:end],
            compute_stats=compute_stats,
            write_grad=write_grad,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            row_width=buffer.stride(0),
        )
        if not write_grad:
            continue
        grad_logits = logits  # overwritten in place by pass 2
        if need_grad_input:
            _matmul_into(grad_input[start:end], grad_logits, w)
        if need_grad_weight:
            _add_matmul(grad_weight, grad_logits.t(), x_c, first=start == 0, a_width=buffer.stride(0))
        if need_grad_bias:
            grad_bias += grad_logits.sum(0, dtype=torch.float32)
    return grad_input, grad_weight, grad_bias


def linear_cross_entropy_forward(
    x,
    weight,
    bias,
    target,
    *,
    reduction,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    chunk_size,
    need_grad_input,
    need_grad_weight,
    need_grad_bias,
):
    """x [N, D] (unit column stride), weight [V, D], bias [V] or None, target [N] int64.

    Returns (loss float32: 0-dim or [N] for "none", lse [N] float32, grad_input [N, D] in x's dtype,
    float32 grad_weight [V, D], float32 grad_bias [V]). For "mean"/"sum" the gradients that are asked for are
    the finished gradients for grad_output = 1; for "none" (or when none is asked for) they are empty and
    `linear_cross_entropy_backward` recomputes them from lse.
    """
    n_rows = x.shape[0]
    grads_now = reduction != "none" and (need_grad_input or need_grad_weight or need_grad_bias)
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    lse = torch.empty_like(loss_rows)
    scale = _mean_scale(target, ignore_index, reduction)
    grad_input, grad_weight, grad_bias = _chunked_pass(
        x,
        weight,
        bias,
        target,
        lse=lse,
        loss_rows=loss_rows,
        grad_scale=scale,
        compute_stats=True,
        write_grad=grads_now,
        need_grad_input=grads_now and need_grad_input,
        need_grad_weight=grads_now and need_grad_weight,
        need_grad_bias=grads_now and need_grad_bias,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        chunk_size=chunk_size,
    )
    return _reduce(loss_rows, scale, reduction), lse, grad_input, grad_weight, grad_bias


def linear_cross_entropy_backward(
    grad_loss,
    x,
    weight,
    bias,
    target,
    lse,
    *,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    chunk_size,
    need_grad_input,
    need_grad_weight,
    need_grad_bias,
):
    """Gradients for reduction="none" (per-token grad_loss [N]): recompute each chunk's logits, then pass 2.

    Returns (grad_input in x's dtype, grad_weight in weight's dtype, grad_bias in bias's dtype), empty where
    not asked for.
    """
    grad_input, grad_weight, grad_bias = _chunked_pass(
        x,
        weight,
        bias,
        target,
        lse=lse,
        loss_rows=None,
        grad_scale=grad_loss.to(torch.float32).reshape(-1),
        compute_stats=False,
        write_grad=True,
        need_grad_input=need_grad_input,
        need_grad_weight=need_grad_weight,
        need_grad_bias=need_grad_bias,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        chunk_size=chunk_size,
    )
    grad_weight = grad_weight.to(weight.dtype)  # empty when not asked for: the cast is free
    if bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_input, grad_weight, grad_bias
