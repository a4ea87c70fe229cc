"""fastcenter.cpu, the CPU implementation of every op, against the float64 reference (forward and all gradients).

The truth is `fastcenter.reference` evaluated in float64 on the same (already rounded) input values, with a
grad_output that is not all ones. On top of values: float64 gradcheck / gradgradcheck of every op (the analytic
backwards exactly, and second order through create_graph=True), inputs never modified, the [N, V] logits never
formed by linear_cross_entropy (every tensor the op creates is recorded), torch.compile(fullgraph=True), and the
dispatch (CPU tensors without the interpreter take this module). Strided and expanded views of every argument
are in tests/test_layouts.py, which runs this backend too.
"""

import pytest
import torch
from helpers import TOLERANCES, assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastcenter import cpu, ops, reference

DTYPES = [torch.float32, torch.bfloat16]


def _leaves(tensors, dtype=None):
    """Fresh leaves (requires_grad where floating) of the given tensors, optionally cast."""
    out = []
    for t in tensors:
        if t is None or not t.is_floating_point():
            out.append(t)
        else:
            out.append((t if dtype is None else t.to(dtype)).detach().clone().requires_grad_())
    return out


def _check(ours, truth, inputs, dtype, scale=1.0, loss_float32=False):
    """ours(*inputs in dtype) against truth(*the same values in float64): outputs and every input's gradient."""
    xs = _leaves(inputs, dtype)
    xs64 = _leaves([None if t is None else (t.double() if t.is_floating_point() else t) for t in xs])
    out, out64 = ours(*xs), truth(*xs64)
    out, out64 = (out if isinstance(out, tuple) else (out,)), (out64 if isinstance(out64, tuple) else (out64,))
    for o, o64 in zip(out, out64):
        if loss_float32:
            assert o.dtype == torch.float32, "losses are float32 whatever the input dtype"
        else:
            assert o.dtype == dtype, "outputs keep the input's dtype"
        assert_close(o, o64, dtype, msg="output")
    grads_out = [torch.randn(o.shape, dtype=torch.float64) for o in out64]
    wrt = [(x, x64) for x, x64 in zip(xs, xs64) if x is not None and x.requires_grad]
    grads = torch.autograd.grad(out, [x for x, _ in wrt], [g.to(o.dtype) for g, o in zip(grads_out, out)])
    grads64 = torch.autograd.grad(out64, [x64 for _, x64 in wrt], grads_out)
    rows = max(o.numel() for o in out)
    for (x, _), g, g64 in zip(wrt, grads, grads64):
        assert g.dtype == x.dtype and g.shape == x.shape, "a gradient has its argument's dtype and shape"
        # A vector argument (a weight, a bias) or one broadcast over rows (a [1, 1, D] centre) gets a gradient
        # summed over rows: in bf16 a sum of rounded terms that may nearly cancel, so 4x one rounding's tolerance.
        summed = x.dim() == 1 or x.numel() < rows
        assert_close(g, g64, dtype, scale=scale * (4.0 if summed else 1.0), msg=f"gradient of {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------------------
# Norms, RoPE, SwiGLU
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalized", [1, 2])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm(dtype, normalized, with_weight):
    x = torch.randn(3, 5, 7, 24) * 3
    shape = tuple(x.shape[-normalized:])
    w = torch.randn(shape) if with_weight else None
    _check(lambda x, w: cpu.rms_norm(x, shape, w, 1e-5), lambda x, w: reference.rms_norm(x, shape, w, 1e-5),
           [x, w], dtype)  # fmt: skip


CENTERS = {
    "none": None,
    "vector": lambda x: torch.randn(x.shape[-1]),
    "per_token": lambda x: torch.randn(x.shape),
    "per_position": lambda x: torch.randn(x.shape[1], x.shape[2]),  # [T, D], broadcast over the batch
    "keepdim": lambda x: torch.randn(1, 1, x.shape[-1]),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("center", list(CENTERS))
@pytest.mark.parametrize("with_residual", [True, False])
def test_center_rms_norm(dtype, center, with_residual):
    x = torch.randn(2, 9, 40)
    c = None if CENTERS[center] is None else CENTERS[center](x)
    r = torch.randn(x.shape) if with_residual else None
    w = torch.rand(40) + 0.5

    def ours(x, w, c, r):
        return cpu.center_rms_norm(x, w, center=c, residual=r, eps=1e-6)

    def truth(x, w, c, r):
        return reference.center_rms_norm(x, w, center=c, residual=r, eps=1e-6)

    _check(ours, truth, [x, w, c, r], dtype)


@pytest.mark.parametrize("which", ["normed", "hidden"])
def test_center_rms_norm_with_one_output_used(which):
    """An output that does not reach the loss gives no gradient (None), not a missing term or an error."""
    x, r, w = _leaves([torch.randn(4, 16), torch.randn(4, 16), torch.randn(16)])
    x64, r64, w64 = _leaves([x.double(), r.double(), w.double()])
    pick = 0 if which == "normed" else 1
    out = cpu.center_rms_norm(x, w, residual=r)[pick]
    out64 = reference.center_rms_norm(x64, w64, residual=r64)[pick]
    g = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, [x, r, w], g.float(), allow_unused=True)
    grads64 = torch.autograd.grad(out64, [x64, r64, w64], g, allow_unused=True)
    for got, want in zip(grads, grads64):
        if want is None:
            assert got is None or not got.any()
        else:
            assert_close(got, want, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_on_views_of_a_packed_projection(dtype, interleaved):
    """q and k are strided views of one qkv tensor, with fewer key heads; the tables are longer than T."""
    B, T, Hq, Hk, Dh = 2, 7, 3, 1, 10
    qkv = torch.randn(B, T, (Hq + 2 * Hk) * Dh)
    cos, sin = reference.rope_cache(T + 5, Dh)

    def split(qkv):
        q, k, _ = qkv.split([Hq * Dh, Hk * Dh, Hk * Dh], dim=-1)
        return q.view(B, T, Hq, Dh), k.view(B, T, Hk, Dh)

    _check(lambda t: cpu.rope(*split(t), cos, sin, interleaved=interleaved),
           lambda t: reference.rope(*split(t), cos, sin, interleaved=interleaved), [qkv], dtype)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [True, False])
def test_swiglu(dtype, packed):
    gate = torch.randn(3, 5, 22) * 3
    if packed:
        _check(cpu.swiglu, reference.swiglu, [gate], dtype)
    else:
        _check(cpu.swiglu, reference.swiglu, [gate, torch.randn(gate.shape)], dtype)


# ---------------------------------------------------------------------------------------------------------
# Cross-entropy
# ---------------------------------------------------------------------------------------------------------

OPTIONS = {
    "plain": dict(),
    "ignore+smoothing": dict(ignore_index=3, label_smoothing=0.1),
    "zloss+softcap": dict(z_loss=1e-2, softcap=4.0),
    "everything": dict(ignore_index=-1, label_smoothing=0.2, z_loss=1e-3, softcap=6.0),
}


def _targets(shape, vocab, ignore_index=-100, n_ignored=2):
    target = torch.randint(0, vocab, shape)
    flat = target.view(-1)
    flat[torch.randperm(flat.numel())[:n_ignored]] = ignore_index
    return target


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_cross_entropy(dtype, reduction, options):
    o = dict(OPTIONS[options], reduction=reduction)
    logits = torch.randn(13, 101) * 4
    target = _targets((13,), 101, o.get("ignore_index", -100))
    _check(lambda z: cpu.cross_entropy(z, target, **o), lambda z: reference.cross_entropy(z, target, **o), [logits],
           dtype, loss_float32=True)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_linear_cross_entropy(dtype, reduction, options):
    """[B, T, D] input, a bias, ragged chunks (chunk_size 4 over 2 x 9 rows), every option and reduction."""
    o = dict(OPTIONS[options], reduction=reduction)
    x, w, b = torch.randn(2, 9, 24), torch.randn(67, 24) * 0.3, torch.randn(67)
    target = _targets((2, 9), 67, o.get("ignore_index", -100))

    def ours(x, w, b):
        return cpu.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=4, **o)

    def truth(x, w, b):
        return reference.linear_cross_entropy(x, w, target, linear_bias=b, **o)

    _check(ours, truth, [x, w, b], dtype, scale=2.0, loss_float32=True)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_at_the_gpt2_vocabulary(reduction):
    """V = 50257 (the seed's vocabulary) with the default chunking; a few rows keep it fast."""
    x, w = torch.randn(6, 16), torch.randn(50257, 16) * 0.5
    target = torch.tensor([0, 50256, 17, -100, 31337, 50256])
    _check(lambda x, w: cpu.linear_cross_entropy(x, w, target, reduction=reduction, z_loss=1e-4),
           lambda x, w: reference.linear_cross_entropy(x, w, target, reduction=reduction, z_loss=1e-4),
           [x, w], torch.float32, scale=2.0, loss_float32=True)  # fmt: skip


def test_linear_cross_entropy_with_float32_master_weights_under_a_bf16_input():
    """The usual mixed case: bf16 activations, float32 weight; the weight's gradient comes back in float32."""
    x, w = _leaves([torch.randn(10, 32).bfloat16(), torch.randn(45, 32) * 0.2])
    target = torch.randint(0, 45, (10,))
    loss = cpu.linear_cross_entropy(x, w, target, chunk_size=3)
    grad_x, grad_w = torch.autograd.grad(loss, [x, w])
    assert loss.dtype == grad_w.dtype == torch.float32 and grad_x.dtype == torch.bfloat16
    x64, w64 = _leaves([x.double(), w.double()])
    truth = reference.linear_cross_entropy(x64, w64, target)
    assert_close(loss, truth, torch.float32)
    for got, want in zip((grad_x, grad_w), torch.autograd.grad(truth, [x64, w64])):
        assert_close(got, want, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the op computes in float32 under autocast as well
        assert_close(cpu.linear_cross_entropy(x, w, target), truth, torch.float32)


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_gradients(op, reduction):
    x, w = _leaves([torch.randn(5, 8), torch.randn(11, 8)])
    target = torch.full((5,), -100)
    if op == "cross_entropy":
        loss, wrt = cpu.cross_entropy(x @ w.T, target, reduction=reduction), [x, w]
    else:
        loss, wrt = cpu.linear_cross_entropy(x, w, target, reduction=reduction, chunk_size=2), [x, w]
    assert not loss.isnan().any() and not loss.any()
    grads = torch.autograd.grad(loss.sum(), wrt)
    assert all(not g.isnan().any() and not g.any() for g in grads)


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_a_target_out_of_range_makes_the_loss_nan(op):
    """As the reference: that token's loss is NaN (so is the mean), the gradients of the others stay right."""
    x, w = torch.randn(6, 8), torch.randn(11, 8)
    target = torch.tensor([1, 2, 11, 4, -100, 0])  # 11 is outside [0, 11)
    per_token = (cpu.cross_entropy(x @ w.T, target, reduction="none") if op == "cross_entropy"
                 else cpu.linear_cross_entropy(x, w, target, reduction="none"))  # fmt: skip
    assert per_token[2].isnan() and per_token[[0, 1, 3, 4, 5]].isfinite().all() and per_token[4] == 0
    mean = (cpu.linear_cross_entropy(x, w, target) if op == "linear_cross_entropy"
            else cpu.cross_entropy(x @ w.T, target))  # fmt: skip
    assert mean.isnan()
    xs, xs64 = _leaves([x, w]), _leaves([x.double(), w.double()])
    if op == "linear_cross_entropy":
        ours, truth = (cpu.linear_cross_entropy(*xs, target, reduction="sum"),
                       reference.linear_cross_entropy(*xs64, target, reduction="sum"))  # fmt: skip
    else:
        ours, truth = (cpu.cross_entropy(xs[0] @ xs[1].T, target, reduction="sum"),
                       reference.cross_entropy(xs64[0] @ xs64[1].T, target, reduction="sum"))  # fmt: skip
    for got, want in zip(torch.autograd.grad(ours, xs), torch.autograd.grad(truth, xs64)):
        assert_close(got, want, torch.float32, scale=2.0)


def test_linear_cross_entropy_is_the_same_for_every_chunking():
    x, w, target = torch.randn(23, 16), torch.randn(40, 16), torch.randint(0, 40, (23,))
    losses = []
    for chunk_size in (1, 5, 23, None, 1000):
        xs = _leaves([x, w])
        loss = cpu.linear_cross_entropy(*xs, target, chunk_size=chunk_size, label_smoothing=0.1)
        losses.append((loss.detach(), *torch.autograd.grad(loss, xs)))
    for other in losses[1:]:
        for a, b in zip(losses[0], other):
            torch.testing.assert_close(a, b, **TOLERANCES[torch.float32])


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_never_forms_the_logits(reduction):
    """Every tensor created in the forward and backward holds at most chunk_size x V elements (or W's V x D)."""
    N, D, V, chunk = 300, 4, 997, 16
    x, w = _leaves([torch.randn(N, D), torch.randn(V, D)])
    target = torch.randint(0, V, (N,))
    with _LargestTensor() as seen:
        loss = cpu.linear_cross_entropy(x, w, target, reduction=reduction, chunk_size=chunk, softcap=5.0)
        torch.autograd.grad(loss.sum() if reduction == "none" else loss, [x, w])
    assert seen.largest <= chunk * V < N * V


# ---------------------------------------------------------------------------------------------------------
# Autograd beyond one backward, inputs left alone, torch.compile, dispatch
# ---------------------------------------------------------------------------------------------------------


def _double(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


GRADCHECK_CASES = {
    "rms_norm": (lambda x, w: cpu.rms_norm(x, (6,), w, 1e-6), lambda: [_double(3, 6), _double(6)]),
    "center_rms_norm": (
        lambda x, w, c, r: cpu.center_rms_norm(x, w, center=c, residual=r),
        lambda: [_double(2, 3, 6), _double(6), _double(6), _double(2, 3, 6)],
    ),
    "center_rms_norm_no_residual": (lambda x, w: cpu.center_rms_norm(x, w), lambda: [_double(3, 6), _double(6)]),
    "rope": (
        lambda q, k: cpu.rope(q, k, *[t.double() for t in reference.rope_cache(5, 4)], interleaved=True),
        lambda: [_double(2, 3, 2, 4), _double(2, 3, 1, 4)],
    ),
    "swiglu": (cpu.swiglu, lambda: [_double(3, 8)]),
    "swiglu_two_inputs": (cpu.swiglu, lambda: [_double(3, 4), _double(3, 4)]),
    "cross_entropy": (
        lambda z: cpu.cross_entropy(z, torch.tensor([0, 4, -100, 2]), label_smoothing=0.1, z_loss=0.01, softcap=3.0),
        lambda: [_double(4, 5)],
    ),
    "linear_cross_entropy": (
        lambda x, w, b: cpu.linear_cross_entropy(x, w, torch.tensor([0, 4, -100, 2]), linear_bias=b, chunk_size=3,
                                                 label_smoothing=0.1, z_loss=0.01, softcap=3.0),  # fmt: skip
        lambda: [_double(4, 3), _double(5, 3), _double(5)],
    ),
    "linear_cross_entropy_none": (
        lambda x, w: cpu.linear_cross_entropy(x, w, torch.tensor([0, 4, -100, 2]), reduction="none", chunk_size=3),
        lambda: [_double(4, 3), _double(5, 3)],
    ),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck_and_gradgradcheck_in_float64(case):
    """The analytic backwards exactly (finite differences in float64), and second order: a backward under
    create_graph=True gives the right second-order terms, never a silently missing one."""
    fn, make = GRADCHECK_CASES[case]
    inputs = make()
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_inputs_are_never_modified(case):
    fn, make = GRADCHECK_CASES[case]
    inputs = [t.float().detach().requires_grad_() for t in make()]
    before = [(t.detach().clone(), t._version) for t in inputs]
    out = fn(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    torch.autograd.grad(out, inputs, [torch.randn_like(o) for o in out], allow_unused=True)
    for t, (values, version) in zip(inputs, before):
        assert t._version == version and torch.equal(t.detach(), values)


class _OpsCalled(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_no_host_synchronisation(case):
    """No value is read back to Python in forward or backward (.item(), bool(), int() on a tensor all dispatch
    to aten._local_scalar_dense): the chunk loops depend on shapes only."""
    fn, make = GRADCHECK_CASES[case]
    inputs = [t.float().detach().requires_grad_() for t in make()]
    with _OpsCalled() as seen:
        out = fn(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(out, inputs, [torch.ones_like(o) for o in out], allow_unused=True)
    assert "mm" in seen.names or "mul" in seen.names  # the mode did see the op's work
    assert "_local_scalar_dense" not in seen.names


def test_model_compiles_with_fullgraph_and_matches_eager(monkeypatch):
    """torch.compile(fullgraph=True) traces a GPT whose ops all run this module (the Python chunk loops unroll)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from fastcenter.model import GPT, GPTConfig

    torch._dynamo.reset()
    model = GPT(GPTConfig(vocab_size=61, dim=16, n_layers=1, n_heads=2, max_seq_len=8, fused=True, center="all"))
    model.eval()  # centering statistics frozen, so both calls see the same model
    idx = torch.randint(0, 61, (2, 9))
    assert ops.backend(model.tok_emb.weight) == "cpu"

    def loss_and_grads(m):
        loss = m(idx[:, :-1], idx[:, 1:])
        return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))

    eager = loss_and_grads(model)
    compiled = loss_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    for a, b in zip(tree_leaves(eager), tree_leaves(compiled)):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float32])


def test_cpu_tensors_without_the_interpreter_run_this_module(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("FASTCENTER_BACKEND", raising=False)
    calls = []
    real = cpu.linear_cross_entropy
    monkeypatch.setattr(cpu, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w, target = torch.randn(4, 8), torch.randn(9, 8), torch.randint(0, 9, (4,))
    loss = ops.linear_cross_entropy(x, w, target)
    assert calls and ops.backend(x) == "cpu"
    assert_close(loss, reference.linear_cross_entropy(x.double(), w.double(), target), torch.float32)
    with ops.using("reference"):
        ops.linear_cross_entropy(x, w, target)
    assert len(calls) == 1, "using('reference') bypasses the CPU implementation"


def test_class_weights_are_refused():
    with pytest.raises(NotImplementedError, match="weight"):
        cpu.linear_cross_entropy(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1]), weight=torch.ones(4))
    with pytest.raises(NotImplementedError, match="weight"):
        cpu.cross_entropy(torch.randn(2, 4), torch.tensor([0, 1]), torch.ones(4))
