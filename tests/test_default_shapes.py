"""On a GPU: every op at the shapes it really runs at (the default model's training step, the benchmarks' large
shapes, the widest fused row), in bfloat16, compiled, against the float64 reference.

The other test files use small shapes, which the CPU interpreter can afford; they never reach the block shapes,
chunk sizes and split paths of real shapes (a 1024-row logits chunk over GPT-2's vocabulary in blocks of 8192, the
wide-row backward of the norm, 16-token x 4-head rope tiles). Interpreted, these shapes would take hours: the
file is skipped without CUDA. `python -m bench.first_contact` runs it on a GPU's first contact.
"""

import pytest
import torch
from conftest import ON_GPU
from helpers import assert_close

from fastcenter import ops, reference
from fastcenter.data import GPT2_VOCAB_SIZE

pytestmark = pytest.mark.skipif(not ON_GPU, reason="real shapes need a GPU (interpreted they would take hours)")

BF16 = torch.bfloat16
# The default model's training step (fastcenter.model.GPTConfig, train.py's defaults).
DEFAULT = dict(batch=16, seq=512, dim=256, heads=4, head_dim=64, hidden=1024, vocab=GPT2_VOCAB_SIZE)


def _relative_close(actual, expected, what, scale=2.0):
    """bf16 tolerances relative to the largest expected magnitude (values and gradients span decades)."""
    norm = expected.abs().max().clamp(min=1e-6)
    assert_close(actual.double() / norm, expected.double() / norm, BF16, scale=scale, msg=what)


def _check(fn_ours, fn_ref, tensors: list, grads_out: list):
    """fn(*tensors) forward and gradients (w.r.t. the floating tensors), ours vs float64."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in tensors]
    leaves64 = [t.detach().double().requires_grad_() if t.is_floating_point() else t for t in tensors]
    outs, truths = fn_ours(*leaves), fn_ref(*leaves64)
    outs, truths = (outs if isinstance(outs, tuple) else (outs,)), (truths if isinstance(truths, tuple) else (truths,))
    for i, (o, t) in enumerate(zip(outs, truths)):
        _relative_close(o, t, f"output {i}")
    diff = [i for i, t in enumerate(tensors) if t.is_floating_point()]
    grads = torch.autograd.grad(outs, [leaves[i] for i in diff], [g.to(o.dtype) for g, o in zip(grads_out, outs)])
    true_grads = torch.autograd.grad(truths, [leaves64[i] for i in diff], [g.double() for g in grads_out])
    for i, g, t in zip(diff, grads, true_grads):
        assert g.dtype == tensors[i].dtype, f"gradient {i} has dtype {g.dtype}, expected {tensors[i].dtype}"
        _relative_close(g, t, f"gradient of argument {i}", scale=4.0)


def _randn(*shape, dtype=BF16, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


def test_model_norms_fp32_stream_bf16_residual():
    """The model's center_rms_norm under autocast: float32 stream, bf16 branch output, float32 weight."""
    n, d = DEFAULT["batch"] * DEFAULT["seq"], DEFAULT["dim"]
    x, r, w, c = (
        _randn(n, d, dtype=torch.float32),
        _randn(n, d),
        1 + _randn(d, dtype=torch.float32, scale=0.1),
        _randn(d),
    )
    grads = [torch.randn(n, d, device="cuda"), torch.randn(n, d, device="cuda")]
    _check(
        lambda x, r, w, c: ops.center_rms_norm(x, w, residual=r, center=c),
        lambda x, r, w, c: reference.center_rms_norm(x, w, residual=r, center=c),
        [x, r, w, c],
        grads,
    )


@pytest.mark.parametrize("d", [4096, 8192, ops.MAX_FUSED_NORM_DIM])
def test_wide_norms_bf16(d):
    n = 65536 * 4096 // d // 8  # 32k x 4096 down to 2k x 16384: the wide-row backward split at 16384
    x, r, w = _randn(n, d), _randn(n, d), 1 + _randn(d, scale=0.1)
    grads = [torch.randn(n, d, device="cuda"), torch.randn(n, d, device="cuda")]
    _check(
        lambda x, r, w: ops.center_rms_norm(x, w, residual=r),
        lambda x, r, w: reference.center_rms_norm(x, w, residual=r),
        [x, r, w],
        grads,
    )


@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
def test_rope_default_views_of_packed_qkv(interleaved):
    b, t, h, dh = DEFAULT["batch"], DEFAULT["seq"], DEFAULT["heads"], DEFAULT["head_dim"]
    qkv = _randn(b, t, 3, h, dh)
    cos, sin = ops.rope_cache(t, dh, device="cuda")
    grads = [torch.randn(b, t, h, dh, device="cuda") for _ in range(2)]
    _check(
        lambda q, k: ops.rope(q, k, cos, sin, interleaved=interleaved),
        lambda q, k: reference.rope(q, k, cos.double(), sin.double(), interleaved=interleaved),
        [qkv[:, :, 0], qkv[:, :, 1]],
        grads,
    )


@pytest.mark.parametrize("n, hidden", [(8192, 1024), (65536, 4096)], ids=["default", "large"])
def test_swiglu_packed(n, hidden):
    packed = _randn(n, 2 * hidden, scale=2.0)
    _check(ops.swiglu, reference.swiglu, [packed], [torch.randn(n, hidden, device="cuda")])


def test_cross_entropy_default_logits():
    n, v = DEFAULT["batch"] * DEFAULT["seq"], DEFAULT["vocab"]
    logits, target = _randn(n, v, scale=3.0), torch.randint(0, v, (n,), device="cuda")
    target[::7] = -100
    options = dict(label_smoothing=0.1, softcap=30.0, z_loss=1e-4)
    _check(
        lambda z, t: ops.cross_entropy(z, t, **options),
        lambda z, t: reference.cross_entropy(z, t, **options),
        [logits, target],
        [torch.tensor(0.7, device="cuda")],
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_default_bf16_input_fp32_weight(reduction):
    """The model's loss: bf16 hidden states, the float32 tied embedding as the head, default chunking."""
    n, d, v = DEFAULT["batch"] * DEFAULT["seq"], DEFAULT["dim"], DEFAULT["vocab"]
    x, w, target = _randn(n, d), _randn(v, d, dtype=torch.float32, scale=0.02), torch.randint(0, v, (n,), device="cuda")
    target[::5] = -100
    g = torch.tensor(0.7, device="cuda") if reduction == "mean" else torch.randn(n, device="cuda")

    def truth(x, w, t):  # the GEMM sees the weight rounded to bf16 once, as the op does
        return reference.linear_cross_entropy(x, w.to(BF16).double(), t, reduction=reduction)

    _check(lambda x, w, t: ops.linear_cross_entropy(x, w, t, reduction=reduction), truth, [x, w, target], [g])
