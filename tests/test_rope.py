"""rope and rope_cache: the Triton kernel against an independent float64 complex-number truth, forward and
gradients; and the CPU implementation (`cpu_rope` of fastcenter/ops/rope.py) against the float64 reference.

The truth views each pair as a complex number x1 + i x2 and multiplies it by exp(i theta), theta = t * base**(-2i/Dh)
formed in float64 from log(base) (not from rope_cache), so neither the tables nor the kernel's formula is trusted.
"""

import importlib
import math

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close, check_against_float64

from fastcenter import ops, reference

rope_ops = importlib.import_module("fastcenter.ops.rope")  # the module: `fastcenter.ops.rope` is the op

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _angles(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """float64 [len(positions), Dh/2] angles t * base**(-2i/Dh), written as exp(-(2i/Dh) log base)."""
    i = torch.arange(head_dim // 2, dtype=torch.float64, device=positions.device)
    return positions.double()[:, None] * torch.exp(-(2.0 * i / head_dim) * math.log(base))


def _rope_truth(x: torch.Tensor, theta: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate float64 x [B, T, H, Dh] by theta [T, Dh/2] as complex multiplication (differentiable)."""
    half = x.shape[-1] // 2
    if interleaved:
        z = torch.complex(x[..., 0::2], x[..., 1::2])
    else:
        z = torch.complex(x[..., :half], x[..., half:])
    z = z * torch.polar(torch.ones_like(theta), theta)[None, :, None, :]
    if interleaved:
        return torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    return torch.cat((z.real, z.imag), dim=-1)


def _truth_with_grads(q, k, theta, interleaved, grad_q_out, grad_k_out):
    q64 = q.detach().double().requires_grad_(True)
    k64 = k.detach().double().requires_grad_(True)
    q_out, k_out = _rope_truth(q64, theta, interleaved), _rope_truth(k64, theta, interleaved)
    loss = (q_out * grad_q_out.double()).sum() + (k_out * grad_k_out.double()).sum()
    return (q_out, k_out), torch.autograd.grad(loss, (q64, k64))


def _fused_with_grads(q, k, cos, sin, interleaved, grad_q_out, grad_k_out):
    q, k = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    q_out, k_out = ops.rope(q, k, cos, sin, interleaved=interleaved)
    grads = torch.autograd.grad((q_out, k_out), (q, k), (grad_q_out, grad_k_out))
    return (q_out, k_out), grads


def _random(shape, dtype):
    return torch.randn(shape, device=DEVICE).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# rope_cache
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len, head_dim, base", [(300, 64, 10000.0), (17, 6, 10000.0), (40, 40, 500000.0)])
def test_rope_cache_matches_float64(seq_len, head_dim, base):
    cos, sin = ops.rope_cache(seq_len, head_dim, base=base, device=DEVICE)
    theta = _angles(torch.arange(seq_len, device=DEVICE), head_dim, base)
    assert cos.dtype == torch.float32 and sin.dtype == torch.float32
    assert cos.shape == (seq_len, head_dim // 2) and sin.shape == (seq_len, head_dim // 2)
    assert_close(cos, theta.cos(), torch.float32)
    assert_close(sin, theta.sin(), torch.float32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seq_len=0, head_dim=8), "seq_len must be a positive int"),
        (dict(seq_len=4, head_dim=7), "head_dim must be a positive even int"),
        (dict(seq_len=4, head_dim=8, base=1.0), "base must be a float > 1"),
    ],
)
def test_rope_cache_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ops.rope_cache(**kwargs)


# ---------------------------------------------------------------------------------------------------------
# rope: values and gradients
# ---------------------------------------------------------------------------------------------------------

# (B, T, Hq, Hk, Dh): the default model's head dim, an odd T, T = 1, grouped-query heads, Dh/2 not a power of two.
SHAPES = [(2, 7, 3, 2, 64), (2, 1, 2, 2, 64), (3, 13, 5, 1, 40), (1, 9, 2, 4, 6)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_T{}_Hq{}_Hk{}_Dh{}".format(*s))
def test_rope_matches_complex_float64(dtype, interleaved, shape):
    B, T, Hq, Hk, Dh = shape
    q, k = _random((B, T, Hq, Dh), dtype), _random((B, T, Hk, Dh), dtype)
    cos, sin = ops.rope_cache(T + 5, Dh, device=DEVICE)  # longer tables than T: the first T rows are used
    grad_q_out, grad_k_out = _random(q.shape, dtype), _random(k.shape, dtype)

    outs, grads = _fused_with_grads(q, k, cos, sin, interleaved, grad_q_out, grad_k_out)
    true_outs, true_grads = _truth_with_grads(
        q, k, _angles(torch.arange(T, device=DEVICE), Dh), interleaved, grad_q_out, grad_k_out
    )
    for name, out, truth, src in zip(("q_out", "k_out"), outs, true_outs, (q, k)):
        assert out.dtype == dtype and out.shape == src.shape and out.is_contiguous(), name
        assert_close(out, truth, dtype, msg=f"{name} differs")
    for name, grad, truth in zip(("grad q", "grad k"), grads, true_grads):
        assert grad.dtype == dtype, name
        assert_close(grad, truth, dtype, msg=f"{name} differs")


# Packed storage [shape] for each layout, and the q, k views into it that attention code would produce.
PACKED_SHAPES = {
    "qkv_mha": lambda B, T, Hq, Hk, Dh: (B, T, 3 * Hq * Dh),  # split as view(B, T, 3, H, Dh)
    "qkv_gqa": lambda B, T, Hq, Hk, Dh: (B, T, (Hq + 2 * Hk) * Dh),  # [q | k | v], Hk < Hq heads of k and v
    "heads_first": lambda B, T, Hq, Hk, Dh: (B, Hq + Hk, T, Dh),  # [B, H, T, Dh] seen as [B, T, H, Dh]
    "last_dim_strided": lambda B, T, Hq, Hk, Dh: (B, T, Hq + Hk, 2 * Dh),  # head dim with stride 2
}


def _packed_views(kind, packed, B, T, Hq, Hk, Dh):
    if kind == "qkv_mha":
        qkv = packed.view(B, T, 3, Hq, Dh)
        return qkv[:, :, 0], qkv[:, :, 1]
    if kind == "qkv_gqa":
        return packed[..., : Hq * Dh].view(B, T, Hq, Dh), packed[..., Hq * Dh : (Hq + Hk) * Dh].view(B, T, Hk, Dh)
    if kind == "heads_first":
        return packed[:, :Hq].transpose(1, 2), packed[:, Hq:].transpose(1, 2)
    return packed[:, :, :Hq, ::2], packed[:, :, Hq:, 1::2]


@pytest.mark.parametrize("kind", ["qkv_mha", "qkv_gqa", "heads_first", "last_dim_strided"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
def test_rope_on_strided_views_of_a_packed_projection(kind, interleaved):
    dtype = torch.bfloat16 if kind == "qkv_mha" else torch.float32
    B, T, Hq, Hk, Dh = (2, 5, 3, 3 if kind == "qkv_mha" else 1, 8)
    packed = _random(PACKED_SHAPES[kind](B, T, Hq, Hk, Dh), dtype).requires_grad_(True)
    q, k = _packed_views(kind, packed, B, T, Hq, Hk, Dh)
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = ops.rope_cache(T, Dh, device=DEVICE)
    grad_q_out, grad_k_out = _random(q.shape, dtype), _random(k.shape, dtype)

    q_out, k_out = ops.rope(q, k, cos, sin, interleaved=interleaved)
    (grad_packed,) = torch.autograd.grad((q_out, k_out), (packed,), (grad_q_out, grad_k_out))

    theta = _angles(torch.arange(T, device=DEVICE), Dh)
    (true_q, true_k), (true_gq, true_gk) = _truth_with_grads(q, k, theta, interleaved, grad_q_out, grad_k_out)
    assert_close(q_out, true_q, dtype)
    assert_close(k_out, true_k, dtype)
    # The gradient reaches the packed tensor through the views, and is zero where neither q nor k reads.
    expected = torch.zeros_like(packed, dtype=torch.float64)
    q_slot, k_slot = _packed_views(kind, expected, B, T, Hq, Hk, Dh)
    q_slot.copy_(true_gq)
    k_slot.copy_(true_gk)
    assert_close(grad_packed, expected, dtype)


def test_strided_views_reach_the_kernel_uncopied(monkeypatch):
    if ops.backend(torch.empty(0, device=DEVICE)) != "triton":
        pytest.skip("the kernels do not run here")
    from fastcenter.kernels import rope as rope_kernels

    seen = []
    launcher = rope_kernels.rope_rotate

    def spy(q, k, *args):
        seen.append((q.data_ptr(), q.stride(), k.data_ptr(), k.stride()))
        return launcher(q, k, *args)

    monkeypatch.setattr(rope_kernels, "rope_rotate", spy)
    qkv = _random((2, 3, 3 * 2 * 8), torch.float32).view(2, 3, 3, 2, 8)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    cos, sin = ops.rope_cache(3, 8, device=DEVICE)
    ops.rope(q, k, cos, sin)
    assert seen == [(q.data_ptr(), q.stride(), k.data_ptr(), k.stride())]


def test_tables_sliced_to_a_later_start_position():
    """cos[start:] / sin[start:] rotate positions start, start + 1, ... (a table view with a storage offset)."""
    B, T, H, Dh, start = 2, 6, 2, 40, 11
    q, k = _random((B, T, H, Dh), torch.float32), _random((B, T, H, Dh), torch.float32)
    cos, sin = ops.rope_cache(start + T + 3, Dh, device=DEVICE)
    q_out, k_out = ops.rope(q, k, cos[start:], sin[start:])
    theta = _angles(torch.arange(start, start + T, device=DEVICE), Dh)
    assert_close(q_out, _rope_truth(q.double(), theta, False), torch.float32)
    assert_close(k_out, _rope_truth(k.double(), theta, False), torch.float32)


def test_rope_is_an_orthogonal_map_and_inputs_are_not_modified():
    q, k = _random((2, 5, 3, 16), torch.float32), _random((2, 5, 1, 16), torch.float32)
    before = (q.clone(), k.clone())
    cos, sin = ops.rope_cache(5, 16, device=DEVICE)
    cos_before, sin_before = cos.clone(), sin.clone()
    q_leaf, k_leaf = q.requires_grad_(True), k.requires_grad_(True)
    q_out, k_out = ops.rope(q_leaf, k_leaf, cos, sin, interleaved=True)
    (q_out * torch.randn_like(q_out)).sum().add((k_out * torch.randn_like(k_out)).sum()).backward()
    assert torch.equal(q.detach(), before[0]) and torch.equal(k.detach(), before[1])
    assert torch.equal(cos, cos_before) and torch.equal(sin, sin_before)
    # Rotations keep every pair's length: norms per head are unchanged.
    assert_close(q_out.norm(dim=-1), before[0].double().norm(dim=-1), torch.float32)


def test_backward_saves_only_the_tables_and_is_differentiable_again():
    B, T, H, Dh = 1, 4, 2, 6
    q = _random((B, T, H, Dh), torch.float32).requires_grad_(True)
    k = _random((B, T, 1, Dh), torch.float32).requires_grad_(True)
    cos, sin = ops.rope_cache(T, Dh, device=DEVICE)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q_out, k_out = ops.rope(q, k, cos, sin)
    if ops.backend(q) == "triton":
        assert len(saved) == 2 and all(s.data_ptr() in (cos.data_ptr(), sin.data_ptr()) for s in saved)
    # Double backward: grad_q = R(-theta) g is linear in g, so d<grad_q, w>/dg = R(theta) w.
    g = _random(q.shape, torch.float32).requires_grad_(True)
    (grad_q,) = torch.autograd.grad(q_out, q, g, create_graph=True)
    w = _random(q.shape, torch.float32)
    (grad_g,) = torch.autograd.grad(grad_q, g, w)
    theta = _angles(torch.arange(T, device=DEVICE), Dh)
    assert_close(grad_q, _rope_truth(g.detach().double(), -theta, False), torch.float32)
    assert_close(grad_g, _rope_truth(w.double(), theta, False), torch.float32)


def test_only_one_output_used():
    q, k = _random((1, 3, 2, 8), torch.float32), _random((1, 3, 2, 8), torch.float32)
    q.requires_grad_(True)
    k.requires_grad_(True)
    cos, sin = ops.rope_cache(3, 8, device=DEVICE)
    _, k_out = ops.rope(q, k, cos, sin)
    g = _random(k.shape, torch.float32)
    (k_out * g).sum().backward()
    assert_close(k.grad, _rope_truth(g.double(), -_angles(torch.arange(3, device=DEVICE), 8), False), torch.float32)
    assert q.grad is None or not q.grad.any()


# ---------------------------------------------------------------------------------------------------------
# rope: bad input, torch.compile, the reference backend
# ---------------------------------------------------------------------------------------------------------


# name -> (call on q [2, 3, 4, 8], k [2, 3, 2, 8], cos, sin [3, 4], expected error, message)
BAD_ROPE_CALLS = {
    "q_not_tensor": (lambda q, k, c, s: ops.rope(q.tolist(), k, c, s), TypeError, "q must be a torch.Tensor"),
    "q_int": (lambda q, k, c, s: ops.rope(q.long(), k, c, s), TypeError, "q must be float32"),
    "q_3d": (lambda q, k, c, s: ops.rope(q[0], k, c, s), ValueError, r"q must have shape \[B, T, H, Dh\]"),
    "k_dtype": (lambda q, k, c, s: ops.rope(q, k.half(), c, s), TypeError, "k must have q's dtype"),
    "k_length": (lambda q, k, c, s: ops.rope(q, k[:, :2], c, s), ValueError, "k must match q"),
    "k_head_dim": (lambda q, k, c, s: ops.rope(q, k[..., :6], c, s), ValueError, "k must match q"),
    "odd_head_dim": (lambda q, k, c, s: ops.rope(q[..., :7], k[..., :7], c, s), ValueError, "positive even"),
    "cos_dtype": (lambda q, k, c, s: ops.rope(q, k, c.half(), s), TypeError, "cos must be float32"),
    "sin_not_tensor": (lambda q, k, c, s: ops.rope(q, k, c, 0.5), TypeError, "sin must be a torch.Tensor"),
    "cos_too_short": (lambda q, k, c, s: ops.rope(q, k, c[:2], s), ValueError, r"cos must have shape \[T_cache >= 3"),
    "sin_width": (lambda q, k, c, s: ops.rope(q, k, c, torch.zeros(3, 8)), ValueError, "sin must have shape"),
    "cos_1d": (lambda q, k, c, s: ops.rope(q, k, c[0], s), ValueError, "cos must have shape"),
    "interleaved": (lambda q, k, c, s: ops.rope(q, k, c, s, interleaved=1), TypeError, "interleaved must be a bool"),
    "devices": (lambda q, k, c, s: ops.rope(q, k.to("meta"), c, s), ValueError, "one device"),
    "cos_requires_grad": (
        lambda q, k, c, s: ops.rope(q, k, c.requires_grad_(True), s),
        ValueError,
        "cos requires grad, but rope gives no gradient",
    ),
}


@pytest.mark.parametrize("name", BAD_ROPE_CALLS)
def test_rope_rejects_bad_input(name):
    call, error, message = BAD_ROPE_CALLS[name]
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 2, 8)
    cos, sin = ops.rope_cache(3, 8)
    with pytest.raises(error, match=message):
        call(q, k, cos, sin)


def test_tables_that_require_grad_are_fine_without_grad_mode():
    q, k = _random((1, 2, 1, 4), torch.float32), _random((1, 2, 1, 4), torch.float32)
    cos, sin = ops.rope_cache(2, 4, device=DEVICE)
    with torch.no_grad():
        q_out, _ = ops.rope(q, k, cos.requires_grad_(True), sin.requires_grad_(True))
    assert_close(q_out, _rope_truth(q.double(), _angles(torch.arange(2, device=DEVICE), 4), False), torch.float32)


def test_rope_compiles_fullgraph_and_matches_eager():
    B, T, H, Dh = 2, 5, 2, 8

    def attention_inputs(x, w_qkv, cos, sin):
        qkv = (x @ w_qkv).view(B, T, 3, H, Dh)
        q, k = ops.rope(qkv[:, :, 0], qkv[:, :, 1], cos, sin)
        return (q * k).sum(-1)

    x = _random((B, T, 16), torch.float32).requires_grad_(True)
    w = _random((16, 3 * H * Dh), torch.float32).requires_grad_(True)
    cos, sin = ops.rope_cache(T, Dh, device=DEVICE)
    grad_out = _random((B, T, H), torch.float32)
    compiled = torch.compile(attention_inputs, fullgraph=True, backend="aot_eager")

    out_c = compiled(x, w, cos, sin)
    grads_c = torch.autograd.grad(out_c, (x, w), grad_out)
    out_e = attention_inputs(x, w, cos, sin)
    grads_e = torch.autograd.grad(out_e, (x, w), grad_out)
    assert_close(out_c, out_e.double(), torch.float32)
    for gc, ge in zip(grads_c, grads_e):
        assert_close(gc, ge.double(), torch.float32)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
def test_reference_backend_gives_the_same_answer(monkeypatch, interleaved):
    B, T, Hq, Hk, Dh = 2, 3, 2, 1, 40
    q, k = _random((B, T, Hq, Dh), torch.bfloat16), _random((B, T, Hk, Dh), torch.bfloat16)
    cos, sin = ops.rope_cache(T, Dh, device=DEVICE)
    grads_out = (_random(q.shape, torch.bfloat16), _random(k.shape, torch.bfloat16))
    outs, grads = _fused_with_grads(q, k, cos, sin, interleaved, *grads_out)

    monkeypatch.setenv("FASTCENTER_BACKEND", "reference")
    from fastcenter.kernels import rope as rope_kernels

    def must_not_run(*args):
        raise AssertionError("the kernel ran under FASTCENTER_BACKEND=reference")

    monkeypatch.setattr(rope_kernels, "rope_rotate", must_not_run)
    ref_outs, ref_grads = _fused_with_grads(q, k, cos, sin, interleaved, *grads_out)
    for a, b in zip(outs + grads, ref_outs + ref_grads):
        # Both round a float32 result to bf16 once; allow one bf16 rounding of difference.
        assert_close(a, b.double(), torch.bfloat16)
    expected = reference.rope(q.double(), k.double(), cos, sin, interleaved=interleaved)
    assert_close(ref_outs[0], expected[0], torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_cpu_rope_on_views_of_a_packed_projection(dtype, interleaved):
    """The CPU implementation: q and k are strided views of one qkv tensor, with fewer key heads; the tables
    are longer than T."""
    B, T, Hq, Hk, Dh = 2, 7, 3, 1, 10
    qkv = torch.randn(B, T, (Hq + 2 * Hk) * Dh)
    cos, sin = reference.rope_cache(T + 5, Dh)

    def split(qkv):
        q, k, _ = qkv.split([Hq * Dh, Hk * Dh, Hk * Dh], dim=-1)
        return q.view(B, T, Hq, Dh), k.view(B, T, Hk, Dh)

    check_against_float64(
        lambda t: rope_ops.cpu_rope(*split(t), cos, sin, interleaved=interleaved),
        lambda t: reference.rope(*split(t), cos, sin, interleaved=interleaved),
        [qkv],
        dtype,
    )
