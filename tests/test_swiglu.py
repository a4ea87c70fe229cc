"""swiglu and geglu (the gated activations): the Triton kernels against float64 F.silu(gate) * up and
F.gelu(gate, approximate=...) * up, forward and gradients, both input forms; and the CPU implementation
(`cpu_swiglu`, `cpu_geglu` of fastcenter/ops/swiglu.py) against the float64 reference."""

import functools
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from helpers import assert_close, check_against_float64

from fastcenter import ops, reference

swiglu_ops = importlib.import_module("fastcenter.ops.swiglu")  # the module: `fastcenter.ops.swiglu` is the op

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _random(shape, dtype, scale=1.0):
    return (scale * torch.randn(shape, device=DEVICE)).to(dtype)


def _gelu_tanh_by_hand(x):
    """Gemma's GELU written out (transformers' `gelu_python_tanh`), independent of F.gelu's implementation."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _gelu_by_hand(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


# name -> (the op under test, the float64 activation it must equal)
GATED = {
    "swiglu": (ops.swiglu, F.silu),
    "geglu_tanh": (functools.partial(ops.geglu, approximate="tanh"), _gelu_tanh_by_hand),
    "geglu": (ops.geglu, _gelu_by_hand),
}


def _truth(gate, up, activation=F.silu):
    """float64 activation(gate) * up; with up None, gate is the packed [..., 2H] tensor."""
    if up is None:
        gate, up = gate[..., : gate.shape[-1] // 2], gate[..., gate.shape[-1] // 2 :]
    return activation(gate) * up


def _check(gate, up, grad_out, dtype, name="swiglu"):
    """Fused output and gradients (wrt the tensors as given, views included) against float64 autograd."""
    op, activation = GATED[name]
    leaves = [t.detach().requires_grad_(True) for t in (gate, up) if t is not None]
    out = op(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out)

    leaves64 = [t.detach().double().requires_grad_(True) for t in (gate, up) if t is not None]
    truth = _truth(leaves64[0], leaves64[1] if up is not None else None, activation)
    true_grads = torch.autograd.grad(truth, leaves64, grad_out.double())

    assert out.dtype == dtype and out.shape == truth.shape
    assert_close(out, truth, dtype, msg="output differs")
    for arg, g, t, leaf in zip(("gate", "up"), grads, true_grads, leaves):
        assert g.dtype == dtype and g.shape == leaf.shape, arg
        assert_close(g, t, dtype, msg=f"grad of {arg} differs")


# Leading shapes incl. 3-D, none (1-D) and one row; H = 1, H not a power of two, H split into column blocks
# (1536: blocks of 512; 1100: blocks of 1024 with a ragged last one).
SHAPES = [(37, 96), (2, 5, 40), (3, 1, 1000), (7,), (1, 1), (2, 1536), (3, 1100)]


@pytest.mark.parametrize("name", GATED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["gate_up", "packed"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_activation_matches_float64(dtype, packed, shape, name):
    *lead, H = shape
    grad_out = _random(shape, dtype)
    if packed:
        _check(_random((*lead, 2 * H), dtype, 2.0), None, grad_out, dtype, name)
    else:
        _check(_random(shape, dtype, 2.0), _random(shape, dtype), grad_out, dtype, name)


@pytest.mark.parametrize("name", GATED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's exp(100) -> inf, as intended
def test_large_gates_saturate_without_nan(dtype, name):
    """Gates far out on both sides (the sigmoid or erf saturates; exp under- or overflows) give finite, exact
    outputs and gradients."""
    gate = torch.tensor([[-100.0, -30.0, -5.0, -1e-3, 0.0, 1e-4, 5.0, 30.0, 100.0]], device=DEVICE).to(dtype)
    up = _random(gate.shape, dtype)
    grad_out = _random(gate.shape, dtype)
    _check(gate, up, grad_out, dtype, name)


def test_geglu_tanh_is_gemmas_activation():
    """The tanh GeGLU equals transformers' gelu_pytorch_tanh (F.gelu(approximate="tanh")) times up, in float32,
    and differs from the exact GELU's (so the two activations are not silently the same kernel)."""
    gate, up = _random((5, 33), torch.float32, 3.0), _random((5, 33), torch.float32)
    tanh = ops.geglu(gate, up, approximate="tanh")
    assert_close(tanh, F.gelu(gate.double(), approximate="tanh") * up.double(), torch.float32)
    assert (tanh - ops.geglu(gate, up)).abs().max() > 1e-4


def test_packed_gradient_is_one_tensor_of_the_packed_shape():
    x = _random((2, 3, 2 * 24), torch.bfloat16).requires_grad_(True)
    out = ops.swiglu(x)
    assert out.shape == (2, 3, 24)
    (grad_x,) = torch.autograd.grad(out, x, _random(out.shape, torch.bfloat16))
    assert grad_x.shape == x.shape and grad_x.dtype == torch.bfloat16


def _strided_inputs(kind, dtype):
    """(gate, up-or-None, description) for layouts that are not plain contiguous tensors."""
    if kind == "packed_row_strided":  # the packed projection is a slice of a wider tensor: row stride > 2H
        return _random((3, 4, 2 * 40 + 7), dtype)[..., : 2 * 40], None
    if kind == "halves_of_packed":  # gate and up passed separately as the two halves of one projection
        x = _random((3, 4, 2 * 40), dtype)
        return x[..., :40], x[..., 40:]
    if kind == "rows_strided_differently":  # gate and up rows with different strides
        return _random((6, 40 + 9), dtype)[:, :40], _random((6, 40), dtype)
    if kind == "leading_transposed":  # rows that do not collapse: one explicit copy
        return _random((5, 3, 40), dtype).transpose(0, 1), _random((3, 5, 40), dtype)
    if kind == "last_dim_strided":  # a last dim with stride 2: one explicit copy
        return _random((3, 2 * 40), dtype)[:, ::2], _random((3, 2 * 40), dtype)[:, 1::2]
    raise AssertionError(kind)


@pytest.mark.parametrize("name", GATED)
@pytest.mark.parametrize(
    "kind",
    ["packed_row_strided", "halves_of_packed", "rows_strided_differently", "leading_transposed", "last_dim_strided"],
)
def test_non_contiguous_inputs(kind, name):
    dtype = torch.float32
    gate, up = _strided_inputs(kind, dtype)
    assert not gate.is_contiguous()
    width = gate.shape[-1] if up is not None else gate.shape[-1] // 2
    grad_out = _random((*gate.shape[:-1], width), dtype)
    _check(gate, up, grad_out, dtype, name)


def test_non_contiguous_output_gradient():
    gate, up = _random((6, 40), torch.float32), _random((6, 40), torch.float32)
    gate.requires_grad_(True)
    g = _random((40, 6), torch.float32)
    out = ops.swiglu(gate, up)
    (out.t() * g).sum().backward()  # the gradient of `out` arrives as a transposed view
    gate64 = gate.detach().double().requires_grad_(True)
    (F.silu(gate64) * up.double()).t().mul(g.double()).sum().backward()
    assert_close(gate.grad, gate64.grad, torch.float32)


def test_gradient_through_a_packed_projection():
    """The model's MLP: packed [gate | up] projection, swiglu, down projection; gradients of both weights."""
    x = _random((2, 3, 16), torch.float32)
    w_in = _random((16, 2 * 24), torch.float32, 0.3).requires_grad_(True)
    w_out = _random((24, 16), torch.float32, 0.3).requires_grad_(True)
    grad_out = _random((2, 3, 16), torch.float32)
    out = ops.swiglu(x @ w_in) @ w_out
    grads = torch.autograd.grad(out, (w_in, w_out), grad_out)

    w64 = [w.detach().double().requires_grad_(True) for w in (w_in, w_out)]
    out64 = _truth(x.double() @ w64[0], None) @ w64[1]
    true_grads = torch.autograd.grad(out64, w64, grad_out.double())
    assert_close(out, out64, torch.float32)
    for g, t in zip(grads, true_grads):
        assert_close(g, t, torch.float32, scale=4.0)


@pytest.mark.parametrize("name", GATED)
def test_inputs_unmodified_and_only_inputs_saved(name):
    gate, up = _random((4, 3, 24), torch.float16), _random((4, 3, 24), torch.float16)
    before = (gate.clone(), up.clone())
    gate.requires_grad_(True)
    up.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = GATED[name][0](gate, up)
    out.backward(_random(out.shape, torch.float16))
    assert torch.equal(gate.detach(), before[0]) and torch.equal(up.detach(), before[1])
    if ops.backend(gate) == "triton":  # the backward recomputes the activation: nothing but the inputs is kept
        assert len(saved) == 2
        assert {t.data_ptr() for t in saved} == {gate.data_ptr(), up.data_ptr()}


# name -> (call, expected error, message)
BAD_SWIGLU_CALLS = {
    "gate_not_tensor": (lambda: ops.swiglu([1.0, 2.0]), TypeError, "gate must be a torch.Tensor"),
    "gate_int": (lambda: ops.swiglu(torch.ones(3, 4, dtype=torch.int32)), TypeError, "gate must be float32"),
    "gate_0d": (lambda: ops.swiglu(torch.tensor(1.0)), ValueError, "gate must have at least 1"),
    "packed_odd": (lambda: ops.swiglu(torch.randn(3, 5)), ValueError, r"packed \[\.\.\., 2H\]"),
    "up_int": (lambda: ops.swiglu(torch.randn(3, 4), torch.ones(3, 4, dtype=torch.long)), TypeError, "up must be"),
    "up_shape": (lambda: ops.swiglu(torch.randn(3, 4), torch.randn(3, 5)), ValueError, "up must have gate's shape"),
    "up_broadcast": (lambda: ops.swiglu(torch.randn(3, 4), torch.randn(4)), ValueError, "up must have gate's shape"),
    "up_dtype": (lambda: ops.swiglu(torch.randn(3, 4), torch.randn(3, 4).half()), TypeError, "gate's dtype"),
    "devices": (lambda: ops.swiglu(torch.randn(3, 4), torch.randn(3, 4, device="meta")), ValueError, "one device"),
    "geglu_up_shape": (lambda: ops.geglu(torch.randn(3, 4), torch.randn(3, 5)), ValueError, "up must have gate's"),
    "geglu_packed_odd": (lambda: ops.geglu(torch.randn(3, 5), approximate="tanh"), ValueError, r"packed \[\.\.\."),
    "geglu_approximate": (lambda: ops.geglu(torch.randn(3, 4), approximate="erf"), ValueError, "approximate must be"),
}


@pytest.mark.parametrize("name", BAD_SWIGLU_CALLS)
def test_gated_activations_reject_bad_input(name):
    call, error, message = BAD_SWIGLU_CALLS[name]
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("name", GATED)
@pytest.mark.parametrize("packed", [False, True], ids=["gate_up", "packed"])
def test_compiles_fullgraph_and_matches_eager(packed, name):
    op = GATED[name][0]

    def mlp(x, w_in, w_out):
        h = x @ w_in
        return (op(h) if packed else op(h[..., :24], h[..., 24:])) @ w_out

    x = _random((2, 3, 16), torch.float32).requires_grad_(True)
    w_in = _random((16, 48), torch.float32, 0.3).requires_grad_(True)
    w_out = _random((24, 16), torch.float32, 0.3).requires_grad_(True)
    grad_out = _random((2, 3, 16), torch.float32)
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")

    out_c = compiled(x, w_in, w_out)
    grads_c = torch.autograd.grad(out_c, (x, w_in, w_out), grad_out)
    out_e = mlp(x, w_in, w_out)
    grads_e = torch.autograd.grad(out_e, (x, w_in, w_out), grad_out)
    assert_close(out_c, out_e.double(), torch.float32)
    for gc, ge in zip(grads_c, grads_e):
        assert_close(gc, ge.double(), torch.float32)


@pytest.mark.parametrize("name", GATED)
@pytest.mark.parametrize("packed", [False, True], ids=["gate_up", "packed"])
def test_reference_backend_gives_the_same_answer(monkeypatch, packed, name):
    dtype = torch.bfloat16
    gate = _random((3, 2, 2 * 20 if packed else 20), dtype, 2.0)
    up = None if packed else _random((3, 2, 20), dtype)
    grad_out = _random((3, 2, 20), dtype)

    def run():
        leaves = [t.detach().requires_grad_(True) for t in (gate, up) if t is not None]
        out = GATED[name][0](*leaves)
        return (out, *torch.autograd.grad(out, leaves, grad_out))

    fused = run()
    monkeypatch.setenv("FASTCENTER_BACKEND", "reference")
    from fastcenter.kernels import swiglu as swiglu_kernels

    def must_not_run(*args):
        raise AssertionError("a kernel ran under FASTCENTER_BACKEND=reference")

    monkeypatch.setattr(swiglu_kernels, "swiglu_forward", must_not_run)
    monkeypatch.setattr(swiglu_kernels, "swiglu_backward", must_not_run)
    for a, b in zip(fused, run()):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert_close(a, b.double(), dtype)


CPU_GATED = {
    "swiglu": (swiglu_ops.cpu_swiglu, reference.swiglu),
    "geglu_tanh": (
        functools.partial(swiglu_ops.cpu_geglu, approximate="tanh"),
        functools.partial(reference.geglu, approximate="tanh"),
    ),
    "geglu": (swiglu_ops.cpu_geglu, reference.geglu),
}


@pytest.mark.parametrize("name", CPU_GATED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [True, False])
def test_cpu_implementation(dtype, packed, name):
    gate = torch.randn(3, 5, 22) * 3
    inputs = [gate] if packed else [gate, torch.randn(gate.shape)]
    check_against_float64(*CPU_GATED[name], inputs, dtype)
