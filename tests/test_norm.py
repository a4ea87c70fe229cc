"""rms_norm and center_rms_norm against a float64 truth, forward and gradients: the Triton kernels (through
`fastcenter.ops`), then the CPU implementation (`cpu_rms_norm`, `cpu_center_rms_norm` of fastcenter/ops/norm.py)."""

import importlib
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from helpers import assert_close, check_against_float64, leaves

from fastcenter import ops, reference

norm_ops = importlib.import_module("fastcenter.ops.norm")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _truth(fn, tensors, grads_out):
    """Run `fn` on float64 copies of `tensors`; return (outputs, grads wrt each tensor that is not None)."""
    copies = [None if t is None else t.detach().double().requires_grad_(True) for t in tensors]
    outs = fn(*copies)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o * g.double()).sum() for o, g in zip(outs, grads_out) if g is not None)
    present = [c for c in copies if c is not None]
    return outs, torch.autograd.grad(loss, present)


def _fused(fn, tensors, grads_out):
    leaves = [None if t is None else _leaf(t) for t in tensors]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.float() * g.float()).sum() for o, g in zip(outs, grads_out) if g is not None)
    present = [c for c in leaves if c is not None]
    return outs, torch.autograd.grad(loss, present)


def _check_against_truth(fn, tensors, grads_out, dtype):
    # The gradient reaching the op arrives in the output's dtype: round it so the truth sees the same values.
    grads_out = tuple(None if g is None else g.to(dtype) for g in grads_out)
    outs, grads = _fused(fn, tensors, grads_out)
    true_outs, true_grads = _truth(fn, tensors, grads_out)
    for name, o, t in zip(("normed", "hidden"), outs, true_outs):
        assert o.dtype == dtype, f"{name} has dtype {o.dtype}, expected {dtype}"
        assert_close(o, t, dtype, msg=f"{name} differs")
    present = [t for t in tensors if t is not None]
    for i, (g, t, src) in enumerate(zip(grads, true_grads, present)):
        assert g.dtype == src.dtype, f"gradient {i} has dtype {g.dtype}, expected {src.dtype}"
        # A weight or [D]-centre gradient sums over every row: allow for the longer sum of rounded terms.
        scale = 4.0 if g.dim() == 1 else 1.0
        assert_close(g, t, dtype, scale=scale, msg=f"gradient {i} differs")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(4, 7, 96), (37, 200), (1, 1, 256), (2, 3, 1000)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("center_kind", ["none", "vector", "per_token"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["no_residual", "residual"])
def test_center_rms_norm_matches_float64(dtype, shape, center_kind, with_residual):
    D = shape[-1]
    x = torch.randn(shape, device=DEVICE).to(dtype)
    residual = torch.randn(shape, device=DEVICE).to(dtype) if with_residual else None
    weight = (1.0 + 0.3 * torch.randn(D, device=DEVICE)).to(dtype)
    center = {
        "none": None,
        "vector": 0.5 * torch.randn(D, device=DEVICE).to(dtype),
        "per_token": 0.5 * torch.randn(shape, device=DEVICE).to(dtype),
    }[center_kind]
    grads_out = (torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE))

    def fn(x, w, c, r):
        return (ops if x.dtype != torch.float64 else reference).center_rms_norm(x, w, center=c, residual=r, eps=1e-6)

    _check_against_truth(fn, [x, weight, center, residual], grads_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [1, 33, 768, 8192])
def test_rms_norm_matches_float64_and_torch(dtype, D):
    rows = 3 if D == 8192 else 19
    x = (2.0 * torch.randn(rows, D, device=DEVICE)).to(dtype)
    weight = torch.randn(D, device=DEVICE).to(dtype)
    grad_out = torch.randn(rows, D, device=DEVICE)

    eps = torch.finfo(dtype).eps  # the default for `dtype`; a float64 truth must not pick float64's

    def fn(x, w):
        return (ops if x.dtype != torch.float64 else reference).rms_norm(x, (D,), w, eps)

    if D == 1:
        # One feature: y = w * x / sqrt(x**2 + eps) ~ w * sign(x), whose true gradient (~eps / |x|**3) is far below
        # the rounding of the cancellation rstd * (g - n * mean(g * n)) in any float32 implementation.
        # Check the values only.
        assert_close(fn(x, weight), fn(x.double(), weight.double()), dtype)
    else:
        _check_against_truth(fn, [x, weight], (grad_out,), dtype)
    # The fused op is a drop-in for torch's own: compare with F.rms_norm evaluated in float64 too.
    expected = F.rms_norm(x.double(), (D,), weight.double(), eps=torch.finfo(dtype).eps)
    assert_close(ops.rms_norm(x, (D,), weight), expected, dtype)


def _gemma_rms_norm(x, weight, eps):
    """transformers' Gemma2RMSNorm / Gemma3RMSNorm forward, written out: normalise in float32, multiply by
    (1 + weight) in float32, then cast to the input's dtype (float64 stays float64: the truth)."""
    math_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(math_dtype)
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + weight.to(math_dtype))).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [33, 768])
def test_offset_rms_norm_is_gemmas(dtype, D):
    """weight_offset=1.0 computes Gemma's RMSNorm, x * rsqrt(mean(x**2) + eps) * (1 + weight): against the float64
    truth (forward, and the gradients of input and weight), and against Gemma's own float32 computation in the
    input's dtype to within one rounding of that dtype. Gemma's weights sit near 0 (initialised to zeros)."""
    x = (2.0 * torch.randn(19, D, device=DEVICE)).to(dtype)
    weight = (0.3 * torch.randn(D, device=DEVICE)).to(dtype)
    grad_out = torch.randn(19, D, device=DEVICE)

    def fn(x, w):
        if x.dtype == torch.float64:
            return _gemma_rms_norm(x, w, 1e-6)
        return ops.rms_norm(x, (D,), w, 1e-6, weight_offset=1.0)

    _check_against_truth(fn, [x, weight], (grad_out,), dtype)
    out = ops.rms_norm(x, (D,), weight, 1e-6, weight_offset=1.0)
    assert_close(out, _gemma_rms_norm(x, weight, 1e-6), dtype)
    # and not the plain norm: the offset is applied
    assert (out.float() - ops.rms_norm(x, (D,), weight, 1e-6).float()).abs().max() > 0.1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("center_kind", ["vector", "per_token"])
def test_offset_center_rms_norm_matches_float64(dtype, center_kind):
    shape = (4, 7, 96)
    x, residual = torch.randn(shape, device=DEVICE).to(dtype), torch.randn(shape, device=DEVICE).to(dtype)
    weight = (0.3 * torch.randn(96, device=DEVICE)).to(dtype)
    center = 0.5 * torch.randn(96 if center_kind == "vector" else shape, device=DEVICE).to(dtype)
    grads_out = (torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE))

    def fn(x, w, c, r):
        module = ops if x.dtype != torch.float64 else reference
        return module.center_rms_norm(x, w, center=c, residual=r, eps=1e-6, weight_offset=1.0)

    _check_against_truth(fn, [x, weight, center, residual], grads_out, dtype)


def test_rms_norm_without_weight_and_default_eps():
    x = torch.randn(5, 3, 40, device=DEVICE)
    grad_out = torch.randn_like(x)
    _check_against_truth(
        lambda x: (
            ops.rms_norm(x, 40)
            if x.dtype != torch.float64
            else F.rms_norm(x, (40,), eps=torch.finfo(torch.float32).eps)
        ),
        [x],
        (grad_out,),
        torch.float32,
    )


def test_rms_norm_over_several_dims_falls_back_to_reference():
    x = torch.randn(4, 6, 10, device=DEVICE)
    w = torch.randn(6, 10, device=DEVICE)
    expected = F.rms_norm(x.double(), (6, 10), w.double(), eps=1e-5)
    assert_close(ops.rms_norm(x, (6, 10), w, eps=1e-5), expected, torch.float32)


def test_non_contiguous_inputs_and_weightless_norm():
    base = torch.randn(6, 10, 2 * 72, device=DEVICE)
    x = base[..., ::2]  # last-dim stride 2: one explicit copy inside
    residual = torch.randn(10, 6, 72, device=DEVICE).transpose(0, 1)  # rows not collapsible
    center = torch.randn(6, 10, 72, device=DEVICE)[:, ::1, :]
    grads_out = (torch.randn(6, 10, 72, device=DEVICE), torch.randn(6, 10, 72, device=DEVICE))

    def fn(x, c, r):
        mod = ops if x.dtype != torch.float64 else reference
        return mod.center_rms_norm(x, None, center=c, residual=r)

    _check_against_truth(fn, [x, center, residual], grads_out, torch.float32)


def test_mixed_dtypes_residual_stream_fp32_branch_bf16():
    """Under autocast the residual stream is float32 and branch outputs bf16: both are read as float32."""
    x = torch.randn(3, 5, 64, device=DEVICE)
    residual = torch.randn(3, 5, 64, device=DEVICE).to(torch.bfloat16)
    weight = torch.randn(64, device=DEVICE)
    center = torch.randn(64, device=DEVICE).to(torch.bfloat16)
    grads_out = (torch.randn(3, 5, 64, device=DEVICE), torch.randn(3, 5, 64, device=DEVICE))

    def fn(x, w, c, r):
        mod = ops if x.dtype != torch.float64 else reference
        return mod.center_rms_norm(x, w, center=c, residual=r)

    outs, grads = _fused(fn, [x, weight, center, residual], grads_out)
    true_outs, true_grads = _truth(fn, [x, weight, center, residual], grads_out)
    assert outs[0].dtype == torch.float32 and outs[1].dtype == torch.float32
    for o, t in zip(outs, true_outs):
        assert_close(o, t, torch.float32)
    assert grads[2].dtype == torch.bfloat16 and grads[3].dtype == torch.bfloat16
    assert_close(grads[0], true_grads[0], torch.float32)
    assert_close(grads[1], true_grads[1], torch.float32, scale=4.0)
    assert_close(grads[2], true_grads[2], torch.bfloat16, scale=4.0)
    assert_close(grads[3], true_grads[3], torch.bfloat16)


@pytest.mark.parametrize(
    "center_shape", [(1, 1, 48), (5, 48), (3, 5, 1)], ids=["leading_ones", "per_position", "per_token_scalar"]
)
def test_broadcast_centres(center_shape):
    x = torch.randn(3, 5, 48, device=DEVICE)
    center = torch.randn(center_shape, device=DEVICE)
    weight = torch.randn(48, device=DEVICE)
    grads_out = (torch.randn_like(x), torch.randn_like(x))

    def fn(x, w, c):
        return (ops if x.dtype != torch.float64 else reference).center_rms_norm(x, w, center=c)

    _check_against_truth(fn, [x, weight, center], grads_out, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("center_kind", ["none", "vector", "per_token"])
def test_out_dtype_normed_in_the_consumers_dtype(out_dtype, center_kind, backend, monkeypatch):
    """out_dtype: `normed` is written in it (as autocast's linear wants it), `hidden` stays in the input's dtype.
    The float32 stream and branch: normed within one rounding to out_dtype of the float64 truth, hidden and every
    gradient (the incoming gradient of normed arrives in out_dtype, the truth sees the same values) in float32's."""
    from op_cases import select_backend

    device = select_backend(backend, monkeypatch)
    shape = (4, 7, 96)
    x = torch.randn(shape, device=device)
    residual = torch.randn(shape, device=device).to(torch.bfloat16)
    weight = 1.0 + 0.3 * torch.randn(96, device=device)
    center = {"none": None, "vector": torch.randn(96, device=device), "per_token": torch.randn(shape, device=device)}
    grads_out = (torch.randn(shape, device=device).to(out_dtype), torch.randn(shape, device=device))
    tensors = [x, weight, center[center_kind], residual]

    def fn(x, w, c, r):
        if x.dtype == torch.float64:
            return reference.center_rms_norm(x, w, center=c, residual=r)
        return ops.center_rms_norm(x, w, center=c, residual=r, out_dtype=out_dtype)

    (normed, hidden), grads = _fused(fn, tensors, grads_out)
    (true_normed, true_hidden), true_grads = _truth(fn, tensors, grads_out)
    assert normed.dtype == out_dtype and hidden.dtype == torch.float32
    assert_close(normed, true_normed, out_dtype, msg="normed")
    assert_close(hidden, true_hidden, torch.float32, msg="hidden")
    present = [t for t in tensors if t is not None]
    for i, (g, t, src) in enumerate(zip(grads, true_grads, present)):
        assert g.dtype == src.dtype
        assert_close(g, t, torch.float32 if src.dtype == torch.float32 else src.dtype, scale=4.0, msg=f"grad {i}")

    def plain(x, w):
        if x.dtype == torch.float64:
            return reference.rms_norm(x, (96,), w, 1e-6)
        return ops.rms_norm(x, (96,), w, 1e-6, out_dtype=out_dtype)

    (y,), grads = _fused(plain, [x, weight], grads_out[:1])
    (true_y,), true_grads = _truth(plain, [x, weight], grads_out[:1])
    assert y.dtype == out_dtype
    assert_close(y, true_y, out_dtype, msg="rms_norm output")
    for g, t in zip(grads, true_grads):
        assert_close(g, t, torch.float32, scale=4.0, msg="rms_norm gradient")


def test_rms_norm_module_emits_autocast_dtype_only_when_asked():
    """nn.RMSNorm(autocast_output=True), as the model's norms are built: under autocast `normed` comes out in
    autocast's dtype (no cast kernel before the next linear) and `hidden` keeps the stream's float32; outside
    autocast, or without the option, nothing changes."""
    from fastcenter.nn import RMSNorm

    x, r = torch.randn(2, 3, 32, device=DEVICE), torch.randn(2, 3, 32, device=DEVICE)
    feeds_linear, plain = RMSNorm(32, autocast_output=True).to(DEVICE), RMSNorm(32).to(DEVICE)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        normed, hidden = feeds_linear.add_and_norm(x, residual=r)
        assert (normed.dtype, hidden.dtype, feeds_linear(x).dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)
        assert plain.add_and_norm(x, residual=r)[0].dtype == torch.float32 and plain(x).dtype == torch.float32
        expected = reference.center_rms_norm(x.double(), feeds_linear.weight.double(), residual=r.double())[0]
        assert_close(normed, expected, torch.bfloat16)
    assert feeds_linear.add_and_norm(x, residual=r)[0].dtype == torch.float32


def test_centering_over_features_then_rms_norm_is_layer_norm_without_bias():
    x = 3.0 + torch.randn(4, 9, 80, device=DEVICE)
    weight = torch.randn(80, device=DEVICE)
    normed, hidden = ops.center_rms_norm(x, weight, center=x.mean(-1, keepdim=True), eps=1e-5)
    expected = F.layer_norm(x.double(), (80,), weight.double(), None, eps=1e-5)
    assert_close(normed, expected, torch.float32)
    assert_close(hidden.mean(-1), torch.zeros(4, 9, dtype=torch.float64), torch.float32)


def test_inputs_are_not_modified():
    x, r, c = (torch.randn(4, 32, device=DEVICE) for _ in range(3))
    w = torch.randn(32, device=DEVICE)
    before = [t.clone() for t in (x, r, c, w)]
    leaves = [t.requires_grad_(True) for t in (x, r, c, w)]
    normed, hidden = ops.center_rms_norm(leaves[0], leaves[3], center=leaves[2], residual=leaves[1])
    (normed * torch.randn_like(normed)).sum().backward()
    for t, b in zip((x, r, c, w), before):
        assert torch.equal(t.detach(), b)


def test_hidden_is_input_when_nothing_is_added():
    x = torch.randn(3, 16, device=DEVICE)
    normed, hidden = ops.center_rms_norm(x, None)
    assert hidden is x


def test_only_hidden_used_in_loss():
    """The backward must work when `normed` gets no gradient at all."""
    x, r = torch.randn(4, 24, device=DEVICE, requires_grad=True), torch.randn(4, 24, device=DEVICE)
    g = torch.randn(4, 24, device=DEVICE)
    _, hidden = ops.center_rms_norm(x, torch.ones(24, device=DEVICE), residual=r)
    (hidden * g).sum().backward()
    assert_close(x.grad, g.double(), torch.float32)


def test_wider_rows_than_the_kernel_holds_use_the_reference():
    D = ops.MAX_FUSED_NORM_DIM + 3
    x = torch.randn(2, D, device=DEVICE)
    expected = reference.rms_norm(x.double(), (D,), None, 1e-6)
    assert_close(ops.rms_norm(x, (D,), None, 1e-6), expected, torch.float32)


def test_compiled_fullgraph_matches_eager():
    def block(x, r, w1, w2, c):
        n, h = ops.center_rms_norm(x, w1, center=c, residual=r)
        return ops.rms_norm(n * 2.0 + h, (x.shape[-1],), w2).sum(-1)

    args = [
        torch.randn(2, 6, 40, device=DEVICE),
        torch.randn(2, 6, 40, device=DEVICE),
        torch.randn(40, device=DEVICE),
        torch.randn(40, device=DEVICE),
        torch.randn(40, device=DEVICE),
    ]
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    eager_args = [_leaf(a) for a in args]
    comp_args = [_leaf(a) for a in args]
    g = torch.randn(2, 6, device=DEVICE)
    eager_out, comp_out = block(*eager_args), compiled(*comp_args)
    assert_close(comp_out, eager_out.double(), torch.float32)
    (eager_out * g).sum().backward()
    (comp_out * g).sum().backward()
    for a, b in zip(comp_args, eager_args):
        assert_close(a.grad, b.grad.double(), torch.float32)


def test_forced_reference_backend_gives_the_same_answer(monkeypatch):
    x, r, w = torch.randn(3, 50, device=DEVICE), torch.randn(3, 50, device=DEVICE), torch.randn(50, device=DEVICE)
    fused = ops.center_rms_norm(x, w, residual=r)
    assert ops.backend(x) == "triton"
    monkeypatch.setenv("FASTCENTER_BACKEND", "reference")
    assert ops.backend(x) == "reference"
    forced = ops.center_rms_norm(x, w, residual=r)
    for a, b in zip(fused, forced):
        assert_close(a, b.double(), torch.float32)


def test_dispatch_rules(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("FASTCENTER_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops.backend(cpu) == "cpu"  # a CPU tensor and no interpreter: the kernels cannot run
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.backend(cpu) == "triton"
    assert ops.backend(None, cpu) == "triton"
    with ops.using("reference"):
        assert ops.backend(cpu) == "reference"
        with ops.using(None):  # an inner scope that forces nothing keeps the outer choice
            assert ops.backend(cpu) == "reference"
    assert ops.backend(cpu) == "triton"
    monkeypatch.setenv("FASTCENTER_BACKEND", "reference")
    assert ops.backend(cpu) == "reference"
    for unset in ("", "auto", " AUTO "):  # the default, spelled out or left empty
        monkeypatch.setenv("FASTCENTER_BACKEND", unset)
        assert ops.backend(cpu) == "triton"


@pytest.mark.parametrize(
    "variable, value", [("FASTCENTER_BACKEND", "refernce"), ("FASTCENTER_BACKEND", "cpu"), ("FASTCENTER_CHECKS", "yes")]
)
def test_an_unknown_environment_value_is_an_error_naming_the_variable(variable, value, monkeypatch):
    """Never silently ignored: check_environment() (what a program calls first) and every op raise ValueError
    naming the variable, the value and the values it takes."""
    monkeypatch.setenv(variable, value)
    words = f"{variable}='{value}' is not one of"
    with pytest.raises(ValueError, match=words):
        ops.check_environment()
    with pytest.raises(ValueError, match=words):
        ops.rms_norm(torch.randn(2, 8, device=DEVICE), 8)
    with pytest.raises(ValueError, match=words):
        ops.cross_entropy(torch.randn(2, 8, device=DEVICE), torch.tensor([1, 2], device=DEVICE))
    monkeypatch.setenv(variable, "reference" if variable == "FASTCENTER_BACKEND" else "1")
    ops.check_environment()


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda x, w: ops.center_rms_norm(x.long(), w), TypeError, "input"),
        (lambda x, w: ops.center_rms_norm(x, w[:-1]), ValueError, "weight"),
        (lambda x, w: ops.center_rms_norm(x, w.long()), TypeError, "weight"),
        (lambda x, w: ops.center_rms_norm(x, w, residual=x[:, :-1]), ValueError, "residual"),
        (lambda x, w: ops.center_rms_norm(x, w, center=torch.zeros(3)), ValueError, "center"),
        (lambda x, w: ops.center_rms_norm(x, w, center=torch.zeros(2, 4, 16)), ValueError, "center"),
        (lambda x, w: ops.center_rms_norm(x, w, eps=-1.0), ValueError, "eps"),
        (lambda x, w: ops.center_rms_norm(x, w.to("meta")), ValueError, "device"),
        (lambda x, w: ops.center_rms_norm("x", w), TypeError, "input"),
        (lambda x, w: ops.rms_norm(x, (15,), None), ValueError, "normalized_shape"),
        (lambda x, w: ops.rms_norm(x, "16", None), TypeError, "normalized_shape"),
        (lambda x, w: ops.rms_norm(x, (16,), w[:3]), ValueError, "weight"),
        (lambda x, w: ops.rms_norm(x, (16,), w, out_dtype=torch.int32), TypeError, "out_dtype"),
        (lambda x, w: ops.center_rms_norm(x, w, out_dtype="bf16"), TypeError, "out_dtype"),
        (lambda x, w: ops.rms_norm(x, (16,), None, weight_offset=1.0), ValueError, "weight_offset.*needs a weight"),
        (lambda x, w: ops.rms_norm(x, (16,), w, weight_offset="1"), ValueError, "weight_offset"),
        (lambda x, w: ops.center_rms_norm(x, w, weight_offset=float("nan")), ValueError, "weight_offset"),
    ],
)
def test_bad_input_is_refused_by_name(call, exc, words):
    x, w = torch.randn(4, 16, device=DEVICE), torch.randn(16, device=DEVICE)
    with pytest.raises(exc, match=words):
        call(x, w)


@pytest.mark.parametrize("center_kind", ["none", "vector", "per_token"])
@pytest.mark.parametrize(
    "with_weight, weight_offset", [(True, 0.0), (True, 1.0), (False, 0.0)], ids=["weight", "offset", "no_weight"]
)
def test_wide_rows_split_backward(center_kind, with_weight, weight_offset, monkeypatch):
    """Rows wider than the single-pass backward holds are split into column blocks after a per-row dot pass.

    The thresholds are shrunk so that a small, ragged row (200 = 6 blocks of 32 + 8) takes that path here.
    """
    from fastcenter.kernels import norm as norm_kernels

    monkeypatch.setattr(norm_kernels, "WIDEST_SINGLE_PASS", 64)
    monkeypatch.setattr(norm_kernels, "WIDE_ROW_BLOCK", 32)
    shape = (3, 7, 200)
    x, residual = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    weight = (1.0 + 0.3 * torch.randn(200, device=DEVICE)) if with_weight else None
    center = {"none": None, "vector": torch.randn(200, device=DEVICE), "per_token": torch.randn(shape, device=DEVICE)}
    grads_out = (torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE))

    def fn(x, w, c, r):
        module = ops if x.dtype != torch.float64 else reference
        return module.center_rms_norm(x, w, center=c, residual=r, weight_offset=weight_offset)

    _check_against_truth(fn, [x, weight, center[center_kind], residual], grads_out, torch.float32)


def test_widest_fused_row():
    """D = MAX_FUSED_NORM_DIM: the forward holds the row whole, the backward takes the split path."""
    D = ops.MAX_FUSED_NORM_DIM
    x, weight = torch.randn(2, D, device=DEVICE), 1.0 + 0.3 * torch.randn(D, device=DEVICE)
    grad_out = torch.randn(2, D, device=DEVICE)

    def fn(x, w):
        return (ops if x.dtype != torch.float64 else reference).rms_norm(x, (D,), w, 1e-6)

    _check_against_truth(fn, [x, weight], (grad_out,), torch.float32)


# ---------------------------------------------------------------------------------------------------------
# The CPU implementation, in float32 and bfloat16.
# ---------------------------------------------------------------------------------------------------------

CPU_DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("normalized", [1, 2])
@pytest.mark.parametrize(
    "with_weight, weight_offset", [(True, 0.0), (True, 1.0), (False, 0.0)], ids=["weight", "offset", "no_weight"]
)
def test_cpu_rms_norm(dtype, normalized, with_weight, weight_offset):
    x = torch.randn(3, 5, 7, 24) * 3
    shape = tuple(x.shape[-normalized:])
    w = torch.randn(shape) if with_weight else None
    check_against_float64(
        lambda x, w: norm_ops.cpu_rms_norm(x, shape, w, 1e-5, weight_offset=weight_offset),
        lambda x, w: reference.rms_norm(x, shape, w, 1e-5, weight_offset=weight_offset),
        [x, w],
        dtype,
    )
    if weight_offset:  # the reference itself against Gemma's formula, written out
        x64, w64 = x.double(), w[-1].double()
        expected = _gemma_rms_norm(x64, w64, 1e-5)
        assert_close(reference.rms_norm(x64, shape[-1:], w64, 1e-5, weight_offset=1.0), expected, torch.float32)


CPU_CENTERS = {
    "none": None,
    "vector": lambda x: torch.randn(x.shape[-1]),
    "per_token": lambda x: torch.randn(x.shape),
    "per_position": lambda x: torch.randn(x.shape[1], x.shape[2]),  # [T, D], broadcast over the batch
    "keepdim": lambda x: torch.randn(1, 1, x.shape[-1]),
}


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("center", list(CPU_CENTERS))
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
def test_cpu_center_rms_norm(dtype, center, with_residual, weight_offset):
    x = torch.randn(2, 9, 40)
    c = None if CPU_CENTERS[center] is None else CPU_CENTERS[center](x)
    r = torch.randn(x.shape) if with_residual else None
    w = torch.rand(40) + 0.5

    def ours(x, w, c, r):
        return norm_ops.cpu_center_rms_norm(x, w, center=c, residual=r, eps=1e-6, weight_offset=weight_offset)

    def truth(x, w, c, r):
        return reference.center_rms_norm(x, w, center=c, residual=r, eps=1e-6, weight_offset=weight_offset)

    check_against_float64(ours, truth, [x, w, c, r], dtype)


@pytest.mark.parametrize("which", ["normed", "hidden"])
def test_cpu_center_rms_norm_with_one_output_used(which):
    """An output that does not reach the loss gives no gradient (None), not a missing term or an error."""
    x, r, w = leaves([torch.randn(4, 16), torch.randn(4, 16), torch.randn(16)])
    x64, r64, w64 = leaves([x.double(), r.double(), w.double()])
    pick = 0 if which == "normed" else 1
    out = norm_ops.cpu_center_rms_norm(x, w, residual=r)[pick]
    out64 = reference.center_rms_norm(x64, w64, residual=r64)[pick]
    g = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, [x, r, w], g.float(), allow_unused=True)
    grads64 = torch.autograd.grad(out64, [x64, r64, w64], g, allow_unused=True)
    for got, want in zip(grads, grads64):
        if want is None:
            assert got is None or not got.any()
        else:
            assert_close(got, want, torch.float32)
