"""cross_entropy and the chunked linear_cross_entropy against a float64 truth (forward and all gradients): the
Triton kernels (through `fastcenter.ops`), then the CPU implementation (`cpu_cross_entropy`,
`cpu_linear_cross_entropy` of fastcenter/ops/cross_entropy.py), then what every backend does with out-of-range
targets and empty dimensions.

The truth is `fastcenter.reference` evaluated in float64 on the same (already rounded) input values. Shapes are
small but awkward for the interpreter: vocabularies that are not powers of two, ragged last chunks, several
vocabulary blocks per row (MAX_BLOCK_V is shrunk where V is small), GPT-2's vocabulary where it matters.
"""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import DEVICE
from helpers import TOLERANCES, assert_close, check_against_float64, leaves
from op_cases import BACKENDS, select_backend

from fastcenter import ops, reference
from fastcenter.data import GPT2_VOCAB_SIZE
from fastcenter.kernels import cross_entropy as ce

ce_ops = importlib.import_module("fastcenter.ops.cross_entropy")  # the module: `fastcenter.ops.cross_entropy` is the op

OPTION_SETS = {
    "plain": dict(),
    "ignore+smoothing": dict(ignore_index=-1, label_smoothing=0.1),
    "zloss+softcap": dict(z_loss=1e-3, softcap=3.0),
    "everything": dict(ignore_index=7, label_smoothing=0.2, z_loss=1e-2, softcap=5.0),
}


@pytest.fixture
def small_blocks(monkeypatch):
    """Vocabulary blocks of 64 lanes, so small vocabularies still take several blocks (online logsumexp)."""
    monkeypatch.setattr(ce, "MAX_BLOCK_V", 64)


def _targets(shape, vocab, ignore_index=-100, n_ignored=2, device=DEVICE):
    """Random class ids of `shape` (an int: one dim) with `n_ignored` of them set to ignore_index."""
    target = torch.randint(0, vocab, (shape,) if isinstance(shape, int) else shape, device=device)
    flat = target.view(-1)
    flat[torch.randperm(flat.numel(), device=device)[:n_ignored]] = ignore_index
    return target


def _grad_output(loss):
    """Not all ones: a random scalar, or a non-uniform per-token tensor for reduction='none'."""
    if loss.dim() == 0:
        return torch.rand((), device=loss.device) + 0.5
    return torch.randn(loss.shape, device=loss.device)


def _loss_and_grads(fn, tensors, grad_output=None, **options):
    """fn(*tensors, **options) and the gradients of (loss * grad_output).sum() w.r.t. every tensor given."""
    leaves = [t.detach().requires_grad_() for t in tensors]
    loss = fn(*leaves, **options)
    if grad_output is None:
        grad_output = _grad_output(loss)
    grads = torch.autograd.grad(loss, leaves, grad_output.to(loss.dtype))
    return loss.detach(), grads, grad_output


def _lce_ours(x, w, b, target, **options):
    def fn(x, w, *rest):
        return ops.linear_cross_entropy(x, w, target, linear_bias=rest[0] if rest else None, **options)

    return fn, [t for t in (x, w, b) if t is not None]


def _lce_truth(x, w, b, target, grad_output, **options):
    options = {k: v for k, v in options.items() if k != "chunk_size"}

    def fn(x, w, *rest):
        return reference.linear_cross_entropy(x, w, target, linear_bias=rest[0] if rest else None, **options)

    tensors = [t.double() for t in (x, w, b) if t is not None]
    return _loss_and_grads(fn, tensors, grad_output.double())[:2]


def _check_lce(x, w, b, target, dtype=torch.float32, scale=1.0, relative=False, **options):
    """Our loss and gradients (input, weight, bias) against the float64 reference, grad_output != 1."""
    fn, tensors = _lce_ours(x, w, b, target, **options)
    loss, grads, g = _loss_and_grads(fn, tensors)
    assert loss.dtype == torch.float32
    assert loss.shape == (target.shape if options.get("reduction") == "none" else ())
    truth_loss, truth_grads = _lce_truth(x, w, b, target, g, **options)
    _compare(loss, truth_loss, torch.float32 if dtype == torch.float32 else dtype, scale, relative, "loss")
    for name, ours, truth, leaf in zip(("input", "weight", "bias"), grads, truth_grads, tensors):
        assert ours.dtype == leaf.dtype and ours.shape == leaf.shape, name
        _compare(ours, truth, dtype, scale, relative, f"grad of {name}")


def _compare(actual, expected, dtype, scale, relative, what):
    """assert_close with dtype tolerances; `relative` measures errors against the largest expected value."""
    if relative:
        norm = expected.abs().max().clamp(min=1e-6)
        actual, expected = actual.double() / norm, expected / norm
    assert_close(actual, expected, dtype, scale=scale, msg=what)


# ---------------------------------------------------------------------------------------------------------
# linear_cross_entropy: every option against float64.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
def test_linear_cross_entropy_matches_float64(reduction, option_set, small_blocks):
    options = OPTION_SETS[option_set]
    n, dim, vocab = 37, 24, 300  # 37 rows in chunks of 8: ragged last chunk; 300 = 4 full blocks + a ragged one
    x = torch.randn(n, dim, device=DEVICE)
    w = torch.randn(vocab, dim, device=DEVICE) * 0.5
    b = torch.randn(vocab, device=DEVICE)
    target = _targets(n, vocab, options.get("ignore_index", -100))
    _check_lce(x, w, b, target, reduction=reduction, chunk_size=8, **options)


def test_linear_cross_entropy_3d_input_without_bias(small_blocks):
    batch, seq, dim, vocab = 3, 5, 20, 130
    x = torch.randn(batch, seq, dim, device=DEVICE)
    w = torch.randn(vocab, dim, device=DEVICE)
    target = torch.randint(0, vocab, (batch, seq), device=DEVICE)
    target[1, 2] = -100
    for reduction in ("mean", "none"):
        _check_lce(x, w, None, target, reduction=reduction, chunk_size=4, label_smoothing=0.05)


def test_linear_cross_entropy_seq_len_one_and_strided_input(small_blocks):
    """T = 1, and an input that is a non-contiguous view (every other feature of a wider tensor)."""
    dim, vocab = 12, 100
    x = torch.randn(4, 1, 2 * dim, device=DEVICE)[..., ::2]
    w = torch.randn(vocab, dim, device=DEVICE)
    target = torch.randint(0, vocab, (4, 1), device=DEVICE)
    _check_lce(x, w, None, target, reduction="sum", z_loss=1e-3)


def test_linear_cross_entropy_gpt2_vocabulary():
    """GPT-2's V (not a power of two): the padded lanes of the last block are masked after the softcap."""
    n, dim, vocab = 5, 8, GPT2_VOCAB_SIZE
    x = torch.randn(n, dim, device=DEVICE)
    w = torch.randn(vocab, dim, device=DEVICE)
    b = torch.randn(vocab, device=DEVICE)
    target = torch.randint(0, vocab, (n,), device=DEVICE)
    target[0] = vocab - 1  # the last real lane, in the ragged last block
    # Each input-gradient element is a V-term float32 dot product: allow for that longer accumulation.
    _check_lce(
        x, w, b, target, scale=4.0, reduction="mean", chunk_size=2, label_smoothing=0.1, z_loss=1e-3, softcap=2.0
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_padding_of_the_chunk_rows_never_leaks(reduction, small_blocks, monkeypatch):
    """The row kernel reads and writes the chunk buffer's rows whole, their padding to ROW_ALIGN included (its
    loads and stores are then vectorised): padding that holds NaN (uninitialised memory may) changes nothing."""
    chunk_buffer = ce._chunk_buffer

    def nan_buffer(rows, vocab, dtype, device):
        buffer = chunk_buffer(rows, vocab, dtype, device)
        assert buffer.stride(0) > vocab  # 300 columns padded to 320: there is padding to poison
        return buffer.as_strided((rows, buffer.stride(0)), buffer.stride()).fill_(math.nan)[:, :vocab]

    monkeypatch.setattr(ce, "_chunk_buffer", nan_buffer)
    n, dim, vocab = 19, 16, 300
    x, w = torch.randn(n, dim, device=DEVICE), torch.randn(vocab, dim, device=DEVICE) * 0.5
    options = OPTION_SETS["everything"]
    target = _targets(n, vocab, options["ignore_index"])
    _check_lce(x, w, None, target, reduction=reduction, chunk_size=8, **options)


def test_linear_cross_entropy_none_with_broadcast_grad_output(small_blocks):
    """loss.sum().backward() hands the 'none' backward a stride-0 grad_output."""
    x = torch.randn(9, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(70, 16, device=DEVICE, requires_grad=True)
    target = _targets(9, 70)
    ops.linear_cross_entropy(x, w, target, reduction="none", chunk_size=4).sum().backward()
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    reference.linear_cross_entropy(xd, wd, target, reduction="sum").backward()
    assert_close(x.grad, xd.grad, torch.float32)
    assert_close(w.grad, wd.grad, torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_all_ignored(reduction):
    x = torch.randn(6, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(50, 8, device=DEVICE, requires_grad=True)
    b = torch.randn(50, device=DEVICE, requires_grad=True)
    target = torch.full((6,), -100, device=DEVICE)
    loss = ops.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction, chunk_size=4)
    loss.backward(torch.full_like(loss, 3.0))
    assert torch.equal(loss, torch.zeros_like(loss))
    for grad in (x.grad, w.grad, b.grad):
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_linear_cross_entropy_low_precision(dtype, small_blocks):
    """GEMMs and logits in the input dtype (rounded once, as F.linear); errors relative to the largest value."""
    n, dim, vocab = 21, 32, 200
    x = torch.randn(n, dim, device=DEVICE).to(dtype)
    w = (torch.randn(vocab, dim, device=DEVICE) * 0.3).to(dtype)
    b = torch.randn(vocab, device=DEVICE).to(dtype)
    target = _targets(n, vocab)
    for reduction in ("mean", "none"):
        _check_lce(
            x,
            w,
            b,
            target,
            dtype,
            scale=2.0,
            relative=True,
            reduction=reduction,
            chunk_size=8,
            label_smoothing=0.1,
            softcap=4.0,
        )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_float32_master_weights(reduction, small_blocks):
    """bf16 input + float32 weight and bias: GEMMs in bf16, gradients returned in float32 from the accumulator."""
    n, dim, vocab = 16, 24, 150
    x = torch.randn(n, dim, device=DEVICE).to(torch.bfloat16)
    w = torch.randn(vocab, dim, device=DEVICE) * 0.3
    b = torch.randn(vocab, device=DEVICE)
    target = _targets(n, vocab)
    fn, tensors = _lce_ours(x, w, b, target, reduction=reduction, chunk_size=8, z_loss=1e-3)
    loss, (grad_x, grad_w, grad_b), g = _loss_and_grads(fn, tensors)
    assert (grad_x.dtype, grad_w.dtype, grad_b.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    # The truth uses the weight as the GEMMs see it: rounded to bf16 once.
    truth_loss, truth_grads = _lce_truth(
        x, w.to(torch.bfloat16), b.to(torch.bfloat16), target, g, reduction=reduction, z_loss=1e-3
    )
    _compare(loss, truth_loss, torch.bfloat16, 1.0, True, "loss")
    for ours, truth in zip((grad_x, grad_w, grad_b), truth_grads):
        _compare(ours, truth, torch.bfloat16, 1.0, True, "gradient")


def test_linear_cross_entropy_autocast(small_blocks):
    """Under autocast the op computes like F.linear in the autocast dtype; float32 leaves get float32 grads."""
    device_type = torch.device(DEVICE).type
    low = torch.bfloat16 if device_type == "cpu" else torch.float16
    x = torch.randn(12, 16, device=DEVICE)
    w = torch.randn(90, 16, device=DEVICE) * 0.3
    target = _targets(12, 90)
    fn, tensors = _lce_ours(x, w, None, target, chunk_size=5)
    with torch.autocast(device_type, dtype=low):
        loss, (grad_x, grad_w), g = _loss_and_grads(fn, tensors)
    assert (loss.dtype, grad_x.dtype, grad_w.dtype) == (torch.float32, torch.float32, torch.float32)
    truth_loss, truth_grads = _lce_truth(x.to(low), w.to(low), None, target, g)
    _compare(loss, truth_loss, low, 1.0, True, "loss")
    for ours, truth in zip((grad_x, grad_w), truth_grads):
        _compare(ours, truth, low, 1.0, True, "gradient")


def test_linear_cross_entropy_gradient_accumulation_with_tied_weights():
    """One Parameter as embedding and as linear_weight, two micro-batches, two backwards: grads add up."""
    vocab, dim, n = 80, 16, 10
    embedding = torch.nn.Parameter(torch.randn(vocab, dim, device=DEVICE) * 0.5)
    mix = torch.nn.Parameter(torch.randn(dim, dim, device=DEVICE) / dim**0.5)
    embedding64 = embedding.detach().double().requires_grad_()
    mix64 = mix.detach().double().requires_grad_()
    for _ in range(2):
        tokens = torch.randint(0, vocab, (n,), device=DEVICE)
        target = _targets(n, vocab, n_ignored=1)
        hidden = torch.tanh(F.embedding(tokens, embedding) @ mix)
        ops.linear_cross_entropy(hidden, embedding, target, chunk_size=3).backward()
        hidden64 = torch.tanh(F.embedding(tokens, embedding64) @ mix64)
        reference.linear_cross_entropy(hidden64, embedding64, target).backward()
    assert_close(embedding.grad, embedding64.grad, torch.float32)
    assert_close(mix.grad, mix64.grad, torch.float32)


# Interpreted tl.dot on bf16 is wrong (triton#11584): the Triton GEMM is tested in fp16 and fp32 on the CPU.
GEMM_DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", GEMM_DTYPES, ids=str)
@pytest.mark.parametrize("first", [True, False], ids=["first", "accumulate"])
def test_add_matmul_kernel_adds_into_float32_in_place(dtype, first):
    """acc += a @ b (or = when first) by the Triton GEMM of the "triton" accumulation mode, with the operands as
    the LM head passes them: a = dlogits_c^T, a transposed view of padded rows; ragged M, N and K."""
    k, m, n = 37, 300, 24
    rows = torch.randn(k, 320, device=DEVICE).to(dtype)
    rows[:, m:] = math.nan  # whatever the padding holds
    rows = rows[:, :m]  # [C, V] in a row-padded buffer
    a, b = rows.t(), torch.randn(k, n, device=DEVICE).to(dtype)
    start = torch.randn(m, n, device=DEVICE)
    acc = torch.full_like(start, math.nan) if first else start.clone()
    ce.add_matmul_triton(acc, a, b, first=first, a_width=320)  # the padding may be read (it is never stored)
    expected = a.double() @ b.double() + (0 if first else start.double())
    assert_close(acc, expected, torch.float32, scale=10.0)  # a K-term float32 sum of exact products


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [d for d in GEMM_DTYPES if d != torch.float32], ids=str)
def test_linear_cross_entropy_with_the_triton_weight_gradient_accumulation(dtype, reduction, monkeypatch):
    """The whole op with its dW accumulated by the Triton GEMM (where torch refuses cuBLAS's in-place float32
    output): float32 master weights, low-precision input, against the float64 reference."""
    monkeypatch.setattr(ce, "_fp32_accumulation", lambda device, d: "native" if d == torch.float32 else "triton")
    n, dim, vocab = 21, 24, 150
    x = torch.randn(n, dim, device=DEVICE).to(dtype)
    w = torch.randn(vocab, dim, device=DEVICE) * 0.3
    target = _targets(n, vocab)
    fn, tensors = _lce_ours(x, w, None, target, reduction=reduction, chunk_size=8, label_smoothing=0.1)
    loss, (grad_x, grad_w), g = _loss_and_grads(fn, tensors)
    assert grad_w.dtype == torch.float32
    truth_loss, truth_grads = _lce_truth(x, w.to(dtype), None, target, g, reduction=reduction, label_smoothing=0.1)
    _compare(loss, truth_loss, dtype, 1.0, True, "loss")
    for ours, truth in zip((grad_x, grad_w), truth_grads):
        _compare(ours, truth, dtype, 1.0, True, "gradient")


def test_default_chunk_size():
    V = GPT2_VOCAB_SIZE
    assert ce.default_chunk_size(8192, V, torch.bfloat16) == 1024  # the default shape: 103 MB of bf16 logits
    assert ce.default_chunk_size(4096, V, torch.float32) == 512  # 128 MiB of float32 logits
    assert ce.default_chunk_size(100, V, torch.bfloat16) == 100
    # Larger batches: at most MAX_CHUNKS chunks (each re-reads W and the float32 dW accumulator).
    assert ce.default_chunk_size(8192, V, torch.float32) == 1024
    assert ce.default_chunk_size(64 * 512, V, torch.bfloat16) == 4096
    assert ce.default_chunk_size(10_000, V, torch.bfloat16) == 1250


# ---------------------------------------------------------------------------------------------------------
# The [N, V] logits never exist: the largest tensor created during forward + backward.
# ---------------------------------------------------------------------------------------------------------


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor (in bytes) any op returns, looking inside fastcenter's custom ops too.

    A dispatch mode sees a custom op as one call; to see the tensors its implementation creates, the op is
    redispatched to its backend kernel with the mode active again.
    """

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastcenter":
            first = next(t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
            below_python = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.Python)
            with self:
                out = func.redispatch(torch._C._dispatch_keys(first) & below_python, *args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_never_allocates_full_logits(reduction):
    n, dim, vocab, chunk = 128, 8, 3000, 8
    x = torch.randn(n, dim, device=DEVICE, requires_grad=True)
    w = torch.randn(vocab, dim, device=DEVICE, requires_grad=True)
    target = _targets(n, vocab)
    full_logits = n * vocab * 4

    def run(fn, **options):
        mode = LargestAllocation()
        with mode:
            fn(x, w, target, reduction=reduction, **options).sum().backward()
        return mode.largest

    ours = run(ops.linear_cross_entropy, chunk_size=chunk)
    assert ours >= chunk * vocab * 4  # the mode does see the chunk buffer
    assert ours <= full_logits / 8, f"largest tensor {ours} B vs full logits {full_logits} B"
    assert run(reference.linear_cross_entropy) >= full_logits  # and it would see the eager logits


# ---------------------------------------------------------------------------------------------------------
# cross_entropy on given logits.
# ---------------------------------------------------------------------------------------------------------


def _check_ce(logits, target, dtype, scale=1.0, relative=False, **options):
    loss, (grad,), g = _loss_and_grads(lambda z: ops.cross_entropy(z, target, **options), [logits])
    assert loss.dtype == torch.float32 and grad.dtype == logits.dtype
    truth_loss, (truth_grad,), _ = _loss_and_grads(
        lambda z: reference.cross_entropy(z, target, **options), [logits.double()], g.double()
    )
    _compare(loss, truth_loss, torch.float32 if dtype == torch.float32 else dtype, scale, relative, "loss")
    _compare(grad, truth_grad, dtype, scale, relative, "grad of logits")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
def test_cross_entropy_matches_float64(reduction, option_set, small_blocks):
    options = OPTION_SETS[option_set]
    logits = torch.randn(11, 190, device=DEVICE) * 4
    target = _targets(11, 190, options.get("ignore_index", -100))
    _check_ce(logits, target, torch.float32, reduction=reduction, **options)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cross_entropy_gpt2_vocabulary_low_precision(dtype):
    logits = (torch.randn(4, GPT2_VOCAB_SIZE, device=DEVICE) * 3).to(dtype)
    target = torch.tensor([0, GPT2_VOCAB_SIZE - 1, -100, 123], device=DEVICE)
    _check_ce(logits, target, dtype, relative=True, reduction="none", softcap=10.0, label_smoothing=0.1)


def test_cross_entropy_matches_torch(small_blocks):
    """Drop-in for F.cross_entropy on what both support, with strided logits (row stride != V)."""
    logits = torch.randn(13, 2 * 150, device=DEVICE)[:, :150]
    target = _targets(13, 150)
    for options in (dict(), dict(reduction="sum", label_smoothing=0.3), dict(reduction="none", ignore_index=5)):
        t = torch.where(target == -100, options.get("ignore_index", -100), target)
        g = torch.randn(13, device=DEVICE) if options.get("reduction") == "none" else torch.tensor(0.7, device=DEVICE)
        ours, (grad,), _ = _loss_and_grads(lambda z: ops.cross_entropy(z, t, **options), [logits], g)
        theirs, (torch_grad,), _ = _loss_and_grads(lambda z: F.cross_entropy(z, t, **options), [logits], g)
        assert_close(ours, theirs.double(), torch.float32)
        assert_close(grad, torch_grad.double(), torch.float32)


def test_cross_entropy_all_ignored():
    logits = torch.randn(5, 40, device=DEVICE, requires_grad=True)
    loss = ops.cross_entropy(logits, torch.full((5,), -100, device=DEVICE))
    loss.backward(torch.tensor(2.0, device=DEVICE))
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


# ---------------------------------------------------------------------------------------------------------
# Out-of-range targets, bad arguments, the reference backend, torch.compile.
# ---------------------------------------------------------------------------------------------------------


def _both_ops(vocab=30):
    x = torch.randn(6, 8, device=DEVICE)
    w = torch.randn(vocab, 8, device=DEVICE)
    return {
        "cross_entropy": lambda target, **kw: ops.cross_entropy(x @ w.T, target, **kw),
        "linear_cross_entropy": lambda target, **kw: ops.linear_cross_entropy(x, w, target, chunk_size=4, **kw),
    }


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
@pytest.mark.parametrize("bad_id", [30, -3])
def test_out_of_range_target_is_nan_or_raises_with_checks(op, bad_id, monkeypatch):
    fn = _both_ops(vocab=30)[op]
    target = torch.tensor([1, 2, bad_id, -100, 29, 0], device=DEVICE)
    per_token = fn(target, reduction="none")
    assert torch.isnan(per_token[2]) and torch.isfinite(per_token[[0, 1, 3, 4, 5]]).all()
    assert torch.isnan(fn(target)) and torch.isnan(fn(target, reduction="sum"))
    monkeypatch.setenv("FASTCENTER_CHECKS", "1")
    with pytest.raises(ValueError, match="outside"):
        fn(target)
    target[2] = -100
    assert torch.isfinite(fn(target))


def _bad_calls():
    x, w, t = torch.randn(4, 8), torch.randn(30, 8), torch.randint(0, 30, (4,))
    lce, ce_ = ops.linear_cross_entropy, ops.cross_entropy
    return [
        (TypeError, "target", lambda: lce(x, w, t.int())),
        (ValueError, "target", lambda: lce(x, w, t[:3])),
        (TypeError, "target", lambda: lce(x, w, [0, 1, 2, 3])),
        (ValueError, "input", lambda: lce(x[0], w, t)),
        (TypeError, "input", lambda: lce(x.long(), w, t)),
        (ValueError, "linear_weight", lambda: lce(x, w[:, :5], t)),
        (ValueError, "linear_bias", lambda: lce(x, w, t, linear_bias=torch.zeros(29))),
        (TypeError, "linear_weight", lambda: lce(x, w.half(), t)),
        (NotImplementedError, "class weights", lambda: lce(x, w, t, weight=torch.ones(30))),
        (ValueError, "reduction", lambda: lce(x, w, t, reduction="avg")),
        (TypeError, "ignore_index", lambda: lce(x, w, t, ignore_index=1.5)),
        (ValueError, "label_smoothing", lambda: lce(x, w, t, label_smoothing=1.5)),
        (ValueError, "z_loss", lambda: lce(x, w, t, z_loss=-1.0)),
        (ValueError, "softcap", lambda: lce(x, w, t, softcap=0.0)),
        (ValueError, "chunk_size", lambda: lce(x, w, t, chunk_size=0)),
        (ValueError, "one device", lambda: lce(x, w.to("meta"), t)),
        (ValueError, "input", lambda: ce_(torch.randn(2, 3, 4), t)),
        (ValueError, "target", lambda: ce_(x, t[:2])),
        (TypeError, "target", lambda: ce_(x, torch.zeros(4))),
        (NotImplementedError, "class weights", lambda: ce_(x, t, torch.ones(8))),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_arguments_raise_clear_errors(case):
    error, words, call = _bad_calls()[case]
    with pytest.raises(error, match=words):
        call()


def test_reference_backend_agrees(monkeypatch, small_blocks):
    x = torch.randn(10, 12, device=DEVICE)
    w = torch.randn(77, 12, device=DEVICE)
    target = _targets(10, 77)
    options = dict(reduction="none", label_smoothing=0.1, z_loss=1e-3, softcap=6.0)
    g = torch.randn(10, device=DEVICE)
    fused = _loss_and_grads(lambda a, b: ops.linear_cross_entropy(a, b, target, chunk_size=4, **options), [x, w], g)
    fused_ce = _loss_and_grads(lambda z: ops.cross_entropy(z, target, **options), [x @ w.T], g)
    monkeypatch.setenv("FASTCENTER_BACKEND", "reference")
    eager = _loss_and_grads(lambda a, b: ops.linear_cross_entropy(a, b, target, **options), [x, w], g)
    eager_ce = _loss_and_grads(lambda z: ops.cross_entropy(z, target, **options), [x @ w.T], g)
    for ours, theirs in ((fused, eager), (fused_ce, eager_ce)):
        assert_close(ours[0], theirs[0].double(), torch.float32)
        for a, b in zip(ours[1], theirs[1]):
            assert_close(a, b.double(), torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph_traces_both_ops(reduction):
    x = torch.randn(9, 16, device=DEVICE)
    w = torch.randn(60, 16, device=DEVICE)
    b = torch.randn(60, device=DEVICE)
    target = _targets(9, 60)
    options = dict(reduction=reduction, label_smoothing=0.1, softcap=5.0)

    def both(x, w, b):
        fused = ops.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=4, **options)
        plain = ops.cross_entropy(x @ w.T + b, target, **options)
        return fused + 2.0 * plain

    torch._dynamo.reset()
    compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
    g = _grad_output(both(x, w, b))
    eager_loss, eager_grads, _ = _loss_and_grads(both, [x, w, b], g)
    compiled_loss, compiled_grads, _ = _loss_and_grads(compiled, [x, w, b], g)
    assert_close(compiled_loss, eager_loss.double(), torch.float32)
    for a, e in zip(compiled_grads, eager_grads):
        assert_close(a, e.double(), torch.float32)


# ---------------------------------------------------------------------------------------------------------
# The CPU implementation, in float32 and bfloat16.
# ---------------------------------------------------------------------------------------------------------

CPU_DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
def test_cpu_cross_entropy(dtype, reduction, option_set):
    o = dict(OPTION_SETS[option_set], reduction=reduction)
    logits = torch.randn(13, 101) * 4
    target = _targets(13, 101, o.get("ignore_index", -100), device="cpu")
    check_against_float64(
        lambda z: ce_ops.cpu_cross_entropy(z, target, **o),
        lambda z: reference.cross_entropy(z, target, **o),
        [logits],
        dtype,
        loss_float32=True,
    )


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
def test_cpu_linear_cross_entropy(dtype, reduction, option_set):
    """[B, T, D] input, a bias, ragged chunks (chunk_size 4 over 2 x 9 rows), every option and reduction."""
    o = dict(OPTION_SETS[option_set], reduction=reduction)
    x, w, b = torch.randn(2, 9, 24), torch.randn(67, 24) * 0.3, torch.randn(67)
    target = _targets((2, 9), 67, o.get("ignore_index", -100), device="cpu")

    def ours(x, w, b):
        return ce_ops.cpu_linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=4, **o)

    def truth(x, w, b):
        return reference.linear_cross_entropy(x, w, target, linear_bias=b, **o)

    check_against_float64(ours, truth, [x, w, b], dtype, scale=2.0, loss_float32=True)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_linear_cross_entropy_at_the_gpt2_vocabulary(reduction):
    """GPT-2's V with the default chunking; a few rows keep it fast."""
    x, w = torch.randn(6, 16), torch.randn(GPT2_VOCAB_SIZE, 16) * 0.5
    target = torch.tensor([0, GPT2_VOCAB_SIZE - 1, 17, -100, 31337, GPT2_VOCAB_SIZE - 1])
    check_against_float64(
        lambda x, w: ce_ops.cpu_linear_cross_entropy(x, w, target, reduction=reduction, z_loss=1e-4),
        lambda x, w: reference.linear_cross_entropy(x, w, target, reduction=reduction, z_loss=1e-4),
        [x, w],
        torch.float32,
        scale=2.0,
        loss_float32=True,
    )


def test_cpu_linear_cross_entropy_with_float32_master_weights_under_a_bf16_input():
    """The usual mixed case: bf16 activations, float32 weight; the weight's gradient comes back in float32."""
    x, w = leaves([torch.randn(10, 32).bfloat16(), torch.randn(45, 32) * 0.2])
    target = torch.randint(0, 45, (10,))
    loss = ce_ops.cpu_linear_cross_entropy(x, w, target, chunk_size=3)
    grad_x, grad_w = torch.autograd.grad(loss, [x, w])
    assert loss.dtype == grad_w.dtype == torch.float32 and grad_x.dtype == torch.bfloat16
    x64, w64 = leaves([x.double(), w.double()])
    truth = reference.linear_cross_entropy(x64, w64, target)
    assert_close(loss, truth, torch.float32)
    for got, want in zip((grad_x, grad_w), torch.autograd.grad(truth, [x64, w64])):
        assert_close(got, want, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the op computes in float32 under autocast as well
        assert_close(ce_ops.cpu_linear_cross_entropy(x, w, target), truth, torch.float32)


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cpu_all_ignored_gives_zero_loss_and_zero_gradients(op, reduction):
    x, w = leaves([torch.randn(5, 8), torch.randn(11, 8)])
    target = torch.full((5,), -100)
    if op == "cross_entropy":
        loss = ce_ops.cpu_cross_entropy(x @ w.T, target, reduction=reduction)
    else:
        loss = ce_ops.cpu_linear_cross_entropy(x, w, target, reduction=reduction, chunk_size=2)
    assert not loss.isnan().any() and not loss.any()
    grads = torch.autograd.grad(loss.sum(), [x, w])
    assert all(not g.isnan().any() and not g.any() for g in grads)


def test_cpu_linear_cross_entropy_is_the_same_for_every_chunking():
    x, w, target = torch.randn(23, 16), torch.randn(40, 16), torch.randint(0, 40, (23,))
    losses = []
    for chunk_size in (1, 5, 23, None, 1000):
        xs = leaves([x, w])
        loss = ce_ops.cpu_linear_cross_entropy(*xs, target, chunk_size=chunk_size, label_smoothing=0.1)
        losses.append((loss.detach(), *torch.autograd.grad(loss, xs)))
    for other in losses[1:]:
        for a, b in zip(losses[0], other):
            torch.testing.assert_close(a, b, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_linear_cross_entropy_never_forms_the_logits(reduction):
    """Every tensor created in the forward and backward holds at most chunk_size x V elements (or W's V x D)."""
    N, D, V, chunk = 300, 4, 997, 16
    x, w = leaves([torch.randn(N, D), torch.randn(V, D)])
    target = torch.randint(0, V, (N,))
    with LargestAllocation() as seen:
        loss = ce_ops.cpu_linear_cross_entropy(x, w, target, reduction=reduction, chunk_size=chunk, softcap=5.0)
        torch.autograd.grad(loss.sum() if reduction == "none" else loss, [x, w])
    assert seen.largest <= chunk * V * 4 < N * V * 4


def test_cpu_tensors_without_the_interpreter_run_the_cpu_implementation(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("FASTCENTER_BACKEND", raising=False)
    calls = []
    real = ce_ops.cpu_linear_cross_entropy
    monkeypatch.setattr(ce_ops, "cpu_linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w, target = torch.randn(4, 8), torch.randn(9, 8), torch.randint(0, 9, (4,))
    loss = ops.linear_cross_entropy(x, w, target)
    assert calls and ops.backend(x) == "cpu"
    assert_close(loss, reference.linear_cross_entropy(x.double(), w.double(), target), torch.float32)
    with ops.using("reference"):
        ops.linear_cross_entropy(x, w, target)
    assert len(calls) == 1, "using('reference') bypasses the CPU implementation"


# ---------------------------------------------------------------------------------------------------------
# Every backend: class weights, out-of-range targets, empty dimensions.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_weights_are_refused_on_every_backend(backend, monkeypatch):
    device = select_backend(backend, monkeypatch)
    x, w, target = torch.randn(2, 3, device=device), torch.randn(4, 3, device=device), torch.tensor([0, 1])
    target = target.to(device)
    with pytest.raises(NotImplementedError, match="weight"):
        ops.linear_cross_entropy(x, w, target, weight=torch.ones(4, device=device))
    with pytest.raises(NotImplementedError, match="weight"):
        ops.cross_entropy(x @ w.T, target, torch.ones(4, device=device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_out_of_range_target_on_every_backend(op, reduction, backend, monkeypatch):
    """A target outside [0, V) that is not ignore_index: that token's loss is NaN on every backend, and so is a mean
    or sum over it. Its gradient row is NaN on the Triton and CPU implementations (and through the GEMM that NaN
    reaches every element of the weight's gradient: never a finite wrong number); the reference, through
    torch.where, gives that row a zero gradient. The other rows' gradients are right on every backend."""
    device = select_backend(backend, monkeypatch)
    vocab, bad, good = 11, 2, [0, 1, 3, 4, 5]
    target = torch.tensor([1, 2, vocab, 4, -100, 0], device=device)  # vocab is outside [0, vocab)
    x, w = torch.randn(6, 8, device=device), torch.randn(vocab, 8, device=device)

    def loss_and_grads(x, w):
        if op == "cross_entropy":
            logits = (x @ w.T).detach().requires_grad_()
            loss = (ops if x.dtype == torch.float32 else reference).cross_entropy(logits, target, reduction=reduction)
            wrt = [logits]
        else:
            x, w = leaves([x, w])
            module = ops if x.dtype == torch.float32 else reference
            loss = module.linear_cross_entropy(x, w, target, reduction=reduction, chunk_size=4)
            wrt = [x, w]
        g = torch.linspace(0.5, 1.5, loss.numel(), device=device, dtype=loss.dtype).view(loss.shape)
        return loss.detach(), torch.autograd.grad(loss, wrt, g)

    loss, grads = loss_and_grads(x, w)
    if reduction == "none":
        assert loss[bad].isnan() and loss[good].isfinite().all() and loss[4] == 0
    else:
        assert loss.isnan()
    rows = grads[0]  # of the logits, or of the input: one row per token
    _, truth = loss_and_grads(x.double(), w.double())  # the reference in float64: finite rows, zero at `bad`
    assert_close(rows[good], truth[0][good], torch.float32, scale=2.0)
    if backend == "reference":
        assert not rows[bad].any() and all(g.isfinite().all() for g in grads)
    else:
        assert rows[bad].isnan().all()
        if op == "linear_cross_entropy":
            assert grads[1].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("shape", [(2, 3, 0), (0, 5)], ids=["no_features", "no_tokens"])
def test_linear_cross_entropy_with_an_empty_dimension(shape, with_bias, reduction, backend, monkeypatch):
    """An input with no features ([..., 0]: every logit is the bias, or 0) or no tokens ([0, D]) gives the loss of
    F.linear + F.cross_entropy on every backend, and gradients of the input's and the weight's shapes."""
    device = select_backend(backend, monkeypatch)
    vocab, dim = 7, shape[-1]
    x, w = torch.randn(shape, device=device), torch.randn(vocab, dim, device=device)
    b = torch.randn(vocab, device=device) if with_bias else None
    target = _targets(shape[:-1], vocab, n_ignored=min(1, math.prod(shape[:-1])), device=device)
    xs, xs64 = leaves([x, w, b]), leaves([x.double(), w.double(), None if b is None else b.double()])
    loss = ops.linear_cross_entropy(xs[0], xs[1], target, linear_bias=xs[2], reduction=reduction)
    logits64 = F.linear(xs64[0], xs64[1], xs64[2]).reshape(-1, vocab)
    truth = F.cross_entropy(logits64, target.reshape(-1), reduction=reduction)
    if reduction == "mean" and target.numel() == 0:
        truth = logits64.sum()  # fastcenter's mean over no tokens is 0 (torch's is NaN)
    assert_close(loss, truth.reshape(loss.shape), torch.float32)
    g = torch.rand(loss.shape, device=device) + 0.5
    wrt = [t for t in xs if t is not None]
    grads = torch.autograd.grad(loss, wrt, g)
    true_grads = torch.autograd.grad(truth.reshape(loss.shape), [t for t in xs64 if t is not None], g.double())
    for got, want, leaf in zip(grads, true_grads, wrt):
        assert got.shape == leaf.shape
        assert_close(got, want, torch.float32)
