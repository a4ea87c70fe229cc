"""Every op under every use of autograd: the right answer (the float64 reference's) or a clear error.

* inputs that require grad in every combination;
* double backward (create_graph=True): a gradient penalty, differentiated w.r.t. the inputs and the
  grad_output; and the reported case, a penalty on a parameter's gradient through a loss;
* torch.func: grad, vjp, jvp, vmap, and per-sample gradients (vmap of grad); forward-mode AD (dual tensors);
* torch.compile(fullgraph=True) of a function using every op, forward and backward;
* the ordinary backward still runs the kernels (the eager path is only for create_graph=True);
* gradient accumulation into leaves: every input's gradient is a tensor of its own (no two share storage);
* the CPU implementation in float64: gradcheck and gradgradcheck, inputs never modified, no host synchronisation.

The bug that motivated this file: linear_cross_entropy finishes its gradients in the forward and its backward
only scaled them by grad_output, so under create_graph=True the gradient had no graph to the inputs: a gradient
penalty through the loss silently lost its second-order term.
"""

import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from helpers import TOLERANCES, assert_close
from op_cases import BACKENDS, OPS, Op, select_backend, values
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastcenter import ops, reference

norm_ops, rope_ops, swiglu_ops, ce_ops = (
    importlib.import_module(f"fastcenter.ops.{family}") for family in ("norm", "rope", "swiglu", "cross_entropy")
)

# Second-order quantities go through one more float32 reduction than first-order ones.
SECOND_ORDER_SCALE = 10.0


def _inputs(op: Op, device, requires=None):
    """{name: tensor} for `op` on `device`; the differentiable ones named in `requires` (default all) require grad."""
    requires = op.differentiable if requires is None else requires
    tensors = {a.name: values(op, a, device) for a in op.args}
    for name in requires:
        tensors[name].requires_grad_()
    return tensors


def _as_float64(tensors: dict) -> dict:
    return {
        name: (t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t)
        for name, t in tensors.items()
    }


def _grads_outs(outputs, device):
    """Random grad_outputs (never all ones), float64."""
    return [torch.randn(o.shape, device=device, dtype=torch.float64) for o in outputs]


def _close(actual, expected, what, scale=1.0):
    """assert_close in float32 tolerances; a None gradient (unused) stands for zeros, on either side."""
    if expected is None and actual is None:
        return
    if actual is None:
        actual = torch.zeros_like(expected)  # a missing gradient must then be zero in the truth too
    if expected is None:
        expected = torch.zeros_like(actual, dtype=torch.float64)
    assert_close(actual, expected, torch.float32, scale=scale, msg=what)


def _scale(name: str, t) -> float:
    """Vectors (weight, centre, bias) and the vocabulary matrix sum over many rows: longer float32 sums."""
    return 4.0 if (t is not None and t.dim() == 1) or name == "linear_weight" else 1.0


# ---------------------------------------------------------------------------------------------------------
# Inputs requiring grad in every combination.
# ---------------------------------------------------------------------------------------------------------


def _subsets(op: Op):
    names = op.differentiable
    return [list(c) for r in range(len(names) + 1) for c in itertools.combinations(names, r)]


REQUIRES_GRAD_CASES = [
    pytest.param(name, subset, id=f"{name}-{'+'.join(subset) or 'nothing'}")
    for name in (
        "rms_norm",
        "rms_norm_offset",
        "center_rms_norm",
        "center_rms_norm_offset",
        "center_rms_norm_per_token_center",
        "rope",
        "swiglu",
        "swiglu_packed",
        "geglu",
        "geglu_packed",
        "cross_entropy",
        "linear_cross_entropy",
        "linear_cross_entropy_none",
    )
    for subset in _subsets(OPS[name])
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op_name, requires", REQUIRES_GRAD_CASES)
def test_any_combination_of_inputs_requiring_grad(op_name, requires, backend, monkeypatch):
    op = OPS[op_name]
    device = select_backend(backend, monkeypatch)
    tensors = _inputs(op, device, requires)
    tensors64 = _as_float64(tensors)
    outputs = op.call(ops, **tensors)
    truths = op.call(reference, **tensors64)
    for i, (o, t) in enumerate(zip(outputs, truths)):
        _close(o, t, f"output {i}")
        # An output that depends on a tensor requiring grad must carry a graph (else its gradient is lost).
        assert o.requires_grad or not t.requires_grad, f"output {i} lost its graph with {requires} requiring grad"
    if not requires:
        return
    used = [i for i, t in enumerate(truths) if t.requires_grad]
    grads_out = _grads_outs(truths, device)
    grads = torch.autograd.grad(
        [outputs[i] for i in used], [tensors[n] for n in requires], [grads_out[i].float() for i in used]
    )
    true_grads = torch.autograd.grad(
        [truths[i] for i in used], [tensors64[n] for n in requires], [grads_out[i] for i in used]
    )
    for name, g, t in zip(requires, grads, true_grads):
        _close(g, t, f"gradient of {name}", _scale(name, t))


# ---------------------------------------------------------------------------------------------------------
# Double backward.
# ---------------------------------------------------------------------------------------------------------


def _penalty_grads(module, op: Op, tensors: dict, grads_out, directions):
    """First-order grads (create_graph=True) of sum(outputs * grads_out), then the gradient of the penalty
    sum(first * directions) w.r.t. the inputs and the grads_out: every second-order term of the op."""
    names = op.differentiable
    outputs = op.call(module, **tensors)
    first = torch.autograd.grad(outputs, [tensors[n] for n in names], grads_out, create_graph=True)
    penalty = sum((f * d).sum() for f, d in zip(first, directions))
    second = torch.autograd.grad(penalty, [tensors[n] for n in names] + list(grads_out), allow_unused=True)
    return first, second


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op_name", list(OPS))
def test_double_backward_matches_float64(op_name, backend, monkeypatch):
    op = OPS[op_name]
    device = select_backend(backend, monkeypatch)
    tensors = _inputs(op, device)
    tensors64 = _as_float64(tensors)
    truths = op.call(reference, **tensors64)
    grads_out64 = [g.requires_grad_() for g in _grads_outs(truths, device)]
    grads_out = [g.detach().float().requires_grad_() for g in grads_out64]
    directions64 = [torch.randn_like(tensors64[n]) for n in op.differentiable]

    first, second = _penalty_grads(ops, op, tensors, grads_out, [d.float() for d in directions64])
    true_first, true_second = _penalty_grads(reference, op, tensors64, grads_out64, directions64)
    names = op.differentiable + [f"grad_output {i}" for i in range(len(grads_out))]
    for name, g, t in zip(op.differentiable, first, true_first):
        _close(g, t, f"first-order gradient of {name}", _scale(name, t))
    for name, g, t in zip(names, second, true_second):
        _close(g, t, f"second-order gradient w.r.t. {name}", SECOND_ORDER_SCALE * _scale(name, t))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradient_penalty_through_linear_cross_entropy(reduction, backend, monkeypatch):
    """The reported case: penalise the gradient of a parameter *before* the loss (a mixing matrix M feeding the
    hidden states), so the penalty's gradient needs the loss's second derivative w.r.t. its input."""
    device = select_backend(backend, monkeypatch)
    n, dim, vocab = 9, 12, 40
    h = torch.randn(n, dim, device=device)
    target = torch.randint(0, vocab, (n,), device=device)
    target[2] = -100
    scale = torch.rand(n, device=device) + 0.5  # a per-token grad_output for "none"

    def penalty_grads(module, M, W):
        x = torch.tanh(h.to(M.dtype) @ M)
        loss = module.linear_cross_entropy(x, W, target, reduction=reduction, chunk_size=4, label_smoothing=0.1)
        if reduction == "none":
            loss = (loss * scale.to(loss.dtype)).sum()
        (grad_M,) = torch.autograd.grad(loss, M, create_graph=True)
        (grad_M**2).sum().backward()  # as a training loop would: a missing term leaves no error, only a wrong .grad
        return M.grad, W.grad

    M = (torch.randn(dim, dim, device=device) / dim**0.5).requires_grad_()
    W = (torch.randn(vocab, dim, device=device) * 0.5).requires_grad_()
    ours = penalty_grads(ops, M, W)
    truth = penalty_grads(reference, M.detach().double().requires_grad_(), W.detach().double().requires_grad_())
    for name, g, t in zip(("M", "W"), ours, truth):
        _close(g, t, f"gradient of the penalty w.r.t. {name}", SECOND_ORDER_SCALE)


# ---------------------------------------------------------------------------------------------------------
# torch.func and forward-mode AD.
# ---------------------------------------------------------------------------------------------------------


def _scalar_fn(module, op: Op, tensors: dict, grads_out):
    """f(*differentiable tensors) = sum(outputs * grads_out), the others fixed."""
    names = op.differentiable

    def f(*xs):
        outputs = op.call(module, **{**tensors, **dict(zip(names, xs))})
        return sum((o * g.to(o.dtype)).sum() for o, g in zip(outputs, grads_out))

    return f


def _detached(tensors: dict) -> dict:
    return {name: t.detach() for name, t in tensors.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", ["grad", "vjp", "jvp", "forward_ad"])
@pytest.mark.parametrize("op_name", list(OPS))
def test_func_transforms_match_float64(op_name, transform, backend, monkeypatch):
    op = OPS[op_name]
    device = select_backend(backend, monkeypatch)
    tensors = _detached(_inputs(op, device))
    tensors64 = _as_float64(tensors)
    names = op.differentiable
    primals, primals64 = [tensors[n] for n in names], [tensors64[n] for n in names]
    grads_out = _grads_outs(op.call(reference, **tensors64), device)

    if transform in ("grad", "vjp"):
        argnums = tuple(range(len(names)))
        if transform == "grad":
            ours = torch.func.grad(_scalar_fn(ops, op, tensors, grads_out), argnums=argnums)(*primals)
        else:

            def outputs_of(*xs):
                return op.call(ops, **{**tensors, **dict(zip(names, xs))})

            _, vjp_fn = torch.func.vjp(outputs_of, *primals)
            ours = vjp_fn(tuple(g.float() for g in grads_out))
        truth = torch.func.grad(_scalar_fn(reference, op, tensors64, grads_out), argnums=argnums)(*primals64)
        for name, g, t in zip(names, ours, truth):
            _close(g, t, f"{transform} gradient of {name}", _scale(name, t))
        return

    tangents64 = [torch.randn_like(p) for p in primals64]
    f64 = _scalar_fn(reference, op, tensors64, grads_out)
    _, truth = torch.func.jvp(f64, tuple(primals64), tuple(tangents64))
    f = _scalar_fn(ops, op, tensors, grads_out)
    if transform == "jvp":
        _, ours = torch.func.jvp(f, tuple(primals), tuple(t.float() for t in tangents64))
    else:  # forward-mode AD with dual tensors, outside torch.func
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t.float()) for p, t in zip(primals, tangents64)]
            ours = fwAD.unpack_dual(f(*duals)).tangent
        assert ours is not None, "forward-mode AD silently dropped the tangent"
    _close(ours, truth, f"{transform} directional derivative", 4.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op_name", list(OPS))
def test_vmap_and_per_sample_gradients(op_name, backend, monkeypatch):
    """vmap over a new leading dim of the first argument; and vmap(grad) per-sample gradients of it."""
    op = OPS[op_name]
    device = select_backend(backend, monkeypatch)
    first = op.args[0].name
    samples = [_detached(_inputs(op, device)) for _ in range(2)]
    tensors = samples[0]
    batch = torch.stack([s[first] for s in samples])
    grads_out = _grads_outs(op.call(reference, **_as_float64(tensors)), device)

    def outputs_of(x):
        return op.call(ops, **{**tensors, first: x})

    def scalar_of(x):
        return sum((o * g.to(o.dtype)).sum() for o, g in zip(outputs_of(x), grads_out))

    batched = torch.func.vmap(outputs_of)(batch)
    per_sample_grads = torch.func.vmap(torch.func.grad(scalar_of))(batch)
    for i, sample in enumerate(samples):
        inputs64 = _as_float64({**tensors, first: sample[first]})
        x64 = inputs64[first].requires_grad_()
        truths = op.call(reference, **inputs64)
        for j, (o, t) in enumerate(zip(batched, truths)):
            _close(o[i], t, f"vmap output {j}, sample {i}")
        used = [j for j, t in enumerate(truths) if t.requires_grad]  # outputs that depend on the first argument
        (true_grad,) = torch.autograd.grad([truths[j] for j in used], x64, [grads_out[j] for j in used])
        _close(per_sample_grads[i], true_grad, f"per-sample gradient {i}", _scale(first, true_grad))


# ---------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True), and the ordinary backward staying on the kernels.
# ---------------------------------------------------------------------------------------------------------


def _every_op(x, w, r, qk, packed, head, target):
    """A small model-shaped function calling every public op once."""
    B, T, Dm = x.shape
    normed, hidden = ops.center_rms_norm(x, w, residual=r, center=w * 0.1)
    normed = ops.rms_norm(normed + hidden, (Dm,), w, weight_offset=1.0)
    cos, sin = ops.rope_cache(T, 8, device=x.device)
    q, k = ops.rope(qk[..., :2, :], qk[..., 2:, :], cos, sin)
    a = ops.swiglu(packed) + ops.geglu(packed, approximate="tanh")
    logits = normed.reshape(B * T, Dm) @ head.T
    ce = ops.cross_entropy(logits, target.reshape(-1), label_smoothing=0.1)
    lce = ops.linear_cross_entropy(normed, head, target, chunk_size=4, z_loss=1e-3)
    return ce + lce + (q * k.sum(-2, keepdim=True)).mean() + a.pow(2).mean()


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_compile_fullgraph_of_every_op_matches_eager(backend, monkeypatch):
    device = select_backend(backend, monkeypatch)
    B, T, Dm, V = 2, 5, 24, 40
    args = [
        torch.randn(B, T, Dm, device=device),
        1.0 + 0.3 * torch.randn(Dm, device=device),
        torch.randn(B, T, Dm, device=device),
        torch.randn(B, T, 4, 8, device=device),
        torch.randn(B, T, 2 * 12, device=device),
        0.3 * torch.randn(V, Dm, device=device),
    ]
    target = torch.randint(0, V, (B, T), device=device)
    eager_args = [a.clone().requires_grad_() for a in args]
    compiled_args = [a.clone().requires_grad_() for a in args]
    torch._dynamo.reset()
    compiled = torch.compile(_every_op, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    eager_loss = _every_op(*eager_args, target)
    compiled_loss = compiled(*compiled_args, target)
    _close(compiled_loss, eager_loss.double(), "compiled loss")
    g = torch.rand((), device=device) + 0.5
    eager_grads = torch.autograd.grad(eager_loss, eager_args, g)
    compiled_grads = torch.autograd.grad(compiled_loss, compiled_args, g)
    for i, (c, e) in enumerate(zip(compiled_grads, eager_grads)):
        _close(c, e.double(), f"compiled gradient {i}")


def test_cpu_outputs_are_fresh_tensors_under_compile():
    """The CPU implementations' forwards return their outputs through `as_output`: while torch.compile traces, a
    fresh tensor, never an in-place op's result or a `.to` that changes nothing. torch 2.11's Dynamo drops an
    autograd.Function's backward when an output is such an alias (zero gradients: the test above fails there
    without it); torch 2.13's does not, so this checks the mechanism itself."""
    from fastcenter.ops._dispatch import as_output

    def f(x):
        y = x * 2.0
        return as_output(y.mul_(3.0), x.dtype), y

    x = torch.randn(4)
    out, y = f(x)
    assert out.data_ptr() == y.data_ptr(), "eager: no copy"
    torch._dynamo.reset()
    out, y = torch.compile(f, fullgraph=True, backend="eager")(x)
    assert out.data_ptr() != y.data_ptr(), "under torch.compile the output must be a fresh tensor"
    torch.testing.assert_close(out, 6.0 * x)


class _PassThrough(TorchDispatchMode):
    """A dispatch mode that changes nothing but records the fastcenter custom ops it sees."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastcenter":
            self.seen.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op_name", list(OPS))
def test_triton_ops_through_the_dispatcher_and_eager_agree(op_name, monkeypatch):
    """The Triton implementation's two ways in (`_dispatch.TritonOp`): plain eager calls run the implementation
    under an autograd.Function; under a TorchDispatchMode (what FakeTensorMode, make_fx and op recorders are)
    they go through the registered custom ops and their registered autograd. Same kernels: identical outputs
    and gradients, and each way is the one taken."""
    from fastcenter.ops import _dispatch

    op = OPS[op_name]
    device = select_backend("triton", monkeypatch)
    tensors = _inputs(op, device)
    grads_out = [g.float() for g in _grads_outs(op.call(reference, **_as_float64(tensors)), device)]
    names = op.differentiable

    def run():
        outputs = op.call(ops, **tensors)
        return outputs, torch.autograd.grad(outputs, [tensors[n] for n in names], grads_out)

    mode = _PassThrough()
    with mode:
        assert _dispatch.traced(tensors[names[0]])
        through_dispatcher = run()
    assert mode.seen, "under a dispatch mode the custom ops are called"
    custom_op_calls = []
    custom_op_call = torch._library.custom_ops.CustomOpDef.__call__
    monkeypatch.setattr(
        torch._library.custom_ops.CustomOpDef,
        "__call__",
        lambda self, *a, **k: custom_op_calls.append(self) or custom_op_call(self, *a, **k),
    )
    assert not _dispatch.traced(tensors[names[0]])
    eager = run()
    assert not custom_op_calls, "plain eager calls skip the dispatcher"
    for a, b in zip(tree_leaves(through_dispatcher), tree_leaves(eager)):
        assert torch.equal(a, b)


class _FastcenterOps(TorchDispatchMode):
    """Records the fastcenter custom ops called."""

    def __init__(self):
        super().__init__()
        self.called = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastcenter":
            self.called.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "op_name, backward_op",
    [
        ("center_rms_norm", "norm_bwd"),
        ("center_rms_norm_offset", "norm_bwd"),
        ("swiglu_packed", "swiglu_bwd"),
        ("geglu", "swiglu_bwd"),
        ("cross_entropy", "cross_entropy_bwd"),
        ("linear_cross_entropy_none", "linear_cross_entropy_bwd"),
        ("rope", "rope_rotate"),
    ],
)
def test_ordinary_backward_runs_the_kernels(op_name, backward_op, monkeypatch):
    """create_graph=False must not take the (slow, memory-hungry) differentiable path."""
    op = OPS[op_name]
    device = select_backend("triton", monkeypatch)
    tensors = _inputs(op, device)
    outputs = op.call(ops, **tensors)
    mode = _FastcenterOps()
    with mode:
        torch.autograd.grad(outputs, [tensors[n] for n in op.differentiable], [torch.randn_like(o) for o in outputs])
    assert backward_op in mode.called, f"{op_name}'s backward called {mode.called}"


def test_linear_cross_entropy_tied_weight_double_backward():
    """Tied embedding: the weight enters twice (embedding and head); second order through both uses."""
    vocab, dim, n = 30, 8, 7
    emb = (torch.randn(vocab, dim, device=DEVICE) * 0.5).requires_grad_()
    tokens = torch.randint(0, vocab, (n,), device=DEVICE)
    target = torch.randint(0, vocab, (n,), device=DEVICE)

    def penalty_grad(module, emb):
        x = torch.tanh(F.embedding(tokens, emb))
        (g,) = torch.autograd.grad(module.linear_cross_entropy(x, emb, target), emb, create_graph=True)
        return torch.autograd.grad((g**2).sum(), emb)[0]

    _close(
        penalty_grad(ops, emb),
        penalty_grad(reference, emb.detach().double().requires_grad_()),
        "penalty grad",
        SECOND_ORDER_SCALE,
    )


# ---------------------------------------------------------------------------------------------------------
# Gradient accumulation into leaves: each input's gradient owns its storage.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op_name", list(OPS))
def test_accumulated_gradients_of_leaves_own_their_storage(op_name, backend, monkeypatch):
    """Two backward passes into leaf inputs (micro-batches accumulating .grad) give twice one pass's gradient,
    computed independently; no two inputs' .grad share storage; an in-place edit of one leaves the others alone.

    The bug that motivated this: center_rms_norm's Triton backward handed one tensor to both input and residual.
    Autograd steals a gradient into a leaf's .grad when no other tensor object refers to it; the op's internal
    reshape made two views of that tensor, each stolen by one leaf (pytorch/pytorch#34082), so the second pass
    added into shared storage and counted twice."""
    op = OPS[op_name]
    device = select_backend(backend, monkeypatch)
    tensors = _inputs(op, device)
    names = op.differentiable
    grads_out = [g.float() for g in _grads_outs(op.call(reference, **_as_float64(tensors)), device)]
    fresh = {n: (t.detach().clone().requires_grad_() if n in names else t) for n, t in tensors.items()}
    once = torch.autograd.grad(op.call(ops, **fresh), [fresh[n] for n in names], grads_out)
    for _ in range(2):
        torch.autograd.backward(op.call(ops, **tensors), grads_out)
    grads = [tensors[n].grad for n in names]
    for name, grad, single in zip(names, grads, once):
        torch.testing.assert_close(grad, 2 * single, **TOLERANCES[torch.float32], msg=f"accumulated grad of {name}")
    storages = [g.untyped_storage().data_ptr() for g in grads]
    assert len(set(storages)) == len(storages), f"{names}: gradients that share storage"
    for i, name in enumerate(names):
        before = [g.clone() for g in grads]
        grads[i].add_(1.0)
        for j, other in enumerate(names):
            if j != i:
                assert torch.equal(grads[j], before[j]), f"editing {name}.grad changed {other}.grad"


def test_a_residual_that_is_a_view_of_a_leaf_gets_a_gradient_of_its_own(monkeypatch):
    """center_rms_norm on the Triton and CPU implementations: input and residual are views of leaves (as a model's
    reshaped activations are), the case where autograd cannot tell two views of one gradient apart."""
    for backend in ("triton", "cpu"):
        device = select_backend(backend, monkeypatch)
        x, r = (torch.randn(6, 40, device=device, requires_grad=True) for _ in range(2))
        weight = torch.randn(40, device=device)
        for _ in range(2):
            normed, hidden = ops.center_rms_norm(x.view(2, 3, 40), weight, residual=r.view(2, 3, 40))
            (normed.sum() + hidden.sum()).backward()
        assert x.grad.untyped_storage().data_ptr() != r.grad.untyped_storage().data_ptr(), backend
        torch.testing.assert_close(x.grad, r.grad, msg=backend)


# ---------------------------------------------------------------------------------------------------------
# The CPU implementation in float64: exact backwards, inputs left alone, no host synchronisation.
# ---------------------------------------------------------------------------------------------------------


def _double(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


CPU_CASES = {
    "rms_norm": (lambda x, w: norm_ops.cpu_rms_norm(x, (6,), w, 1e-6), lambda: [_double(3, 6), _double(6)]),
    "center_rms_norm": (
        lambda x, w, c, r: norm_ops.cpu_center_rms_norm(x, w, center=c, residual=r),
        lambda: [_double(2, 3, 6), _double(6), _double(6), _double(2, 3, 6)],
    ),
    "center_rms_norm_offset": (
        lambda x, w, c, r: norm_ops.cpu_center_rms_norm(x, w, center=c, residual=r, weight_offset=1.0),
        lambda: [_double(2, 3, 6), _double(6), _double(6), _double(2, 3, 6)],
    ),
    "rms_norm_offset": (
        lambda x, w: norm_ops.cpu_rms_norm(x, (6,), w, 1e-6, weight_offset=1.0),
        lambda: [_double(3, 6), _double(6)],
    ),
    "center_rms_norm_no_residual": (
        lambda x, w: norm_ops.cpu_center_rms_norm(x, w),
        lambda: [_double(3, 6), _double(6)],
    ),
    "rope": (
        lambda q, k: rope_ops.cpu_rope(q, k, *[t.double() for t in reference.rope_cache(5, 4)], interleaved=True),
        lambda: [_double(2, 3, 2, 4), _double(2, 3, 1, 4)],
    ),
    "swiglu": (swiglu_ops.cpu_swiglu, lambda: [_double(3, 8)]),
    "swiglu_two_inputs": (swiglu_ops.cpu_swiglu, lambda: [_double(3, 4), _double(3, 4)]),
    "geglu_tanh": (lambda x: swiglu_ops.cpu_geglu(x, approximate="tanh"), lambda: [_double(3, 8)]),
    "geglu_two_inputs": (swiglu_ops.cpu_geglu, lambda: [_double(3, 4), _double(3, 4)]),
    "cross_entropy": (
        lambda z: ce_ops.cpu_cross_entropy(
            z, torch.tensor([0, 4, -100, 2]), label_smoothing=0.1, z_loss=0.01, softcap=3.0
        ),
        lambda: [_double(4, 5)],
    ),
    "linear_cross_entropy": (
        lambda x, w, b: ce_ops.cpu_linear_cross_entropy(
            x,
            w,
            torch.tensor([0, 4, -100, 2]),
            linear_bias=b,
            chunk_size=3,
            label_smoothing=0.1,
            z_loss=0.01,
            softcap=3.0,
        ),
        lambda: [_double(4, 3), _double(5, 3), _double(5)],
    ),
    "linear_cross_entropy_none": (
        lambda x, w: ce_ops.cpu_linear_cross_entropy(
            x, w, torch.tensor([0, 4, -100, 2]), reduction="none", chunk_size=3
        ),
        lambda: [_double(4, 3), _double(5, 3)],
    ),
}


@pytest.mark.parametrize("case", list(CPU_CASES))
def test_cpu_gradcheck_and_gradgradcheck_in_float64(case):
    """The analytic backwards exactly (finite differences in float64), and second order: a backward under
    create_graph=True gives the right second-order terms, never a silently missing one."""
    fn, make = CPU_CASES[case]
    inputs = make()
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("case", list(CPU_CASES))
def test_cpu_inputs_are_never_modified(case):
    fn, make = CPU_CASES[case]
    inputs = [t.float().detach().requires_grad_() for t in make()]
    before = [(t.detach().clone(), t._version) for t in inputs]
    out = fn(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    torch.autograd.grad(out, inputs, [torch.randn_like(o) for o in out], allow_unused=True)
    for t, (saved, version) in zip(inputs, before):
        assert t._version == version and torch.equal(t.detach(), saved)


class _OpsCalled(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", list(CPU_CASES))
def test_cpu_no_host_synchronisation(case):
    """No value is read back to Python in forward or backward (.item(), bool(), int() on a tensor all dispatch
    to aten._local_scalar_dense): the chunk loops depend on shapes only."""
    fn, make = CPU_CASES[case]
    inputs = [t.float().detach().requires_grad_() for t in make()]
    with _OpsCalled() as seen:
        out = fn(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(out, inputs, [torch.ones_like(o) for o in out], allow_unused=True)
    assert "mm" in seen.names or "mul" in seen.names  # the mode did see the op's work
    assert "_local_scalar_dense" not in seen.names


def test_model_on_the_cpu_implementation_compiles_with_fullgraph_and_matches_eager(monkeypatch):
    """torch.compile(fullgraph=True) traces a GPT whose ops all run the CPU implementation (the Python chunk
    loops unroll)."""
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
