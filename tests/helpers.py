"""Shared test utilities: per-dtype tolerances, comparisons against a float64 truth, a synthetic corpus, train.py
as a module."""

import importlib.util
import pathlib

import torch

# Tolerances for comparing an op's output (in `dtype`) with a float64 truth computed from the same inputs.
# float32: accumulation-order noise only. bf16/fp16: one rounding of the output (bf16 has 8 mantissa bits).
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def assert_close(actual, expected, dtype=None, scale: float = 1.0, msg: str = ""):
    """actual (any dtype) vs expected (float64 truth), with the tolerance of `dtype` (default: actual's dtype).

    `scale` widens both tolerances for quantities that sum many rounded terms (e.g. weight gradients).
    """
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(
        actual.double(),
        expected.double(),
        rtol=tol["rtol"] * scale,
        atol=tol["atol"] * scale,
        msg=lambda default: f"{msg}\n{default}" if msg else default,
    )


def leaves(tensors, dtype=None):
    """Fresh leaves (requiring grad where floating) of the given tensors, optionally cast; None stays None."""
    out = []
    for t in tensors:
        if t is None or not t.is_floating_point():
            out.append(t)
        else:
            out.append((t if dtype is None else t.to(dtype)).detach().clone().requires_grad_())
    return out


def check_against_float64(ours, truth, inputs, dtype, scale=1.0, loss_float32=False):
    """ours(*inputs in dtype) against truth(*the same values in float64): outputs, and the gradient of every
    floating input for grad_outputs that are not all ones. Outputs keep the input's dtype (losses: float32 when
    `loss_float32`); each gradient has its argument's dtype and shape."""
    xs = leaves(inputs, dtype)
    xs64 = leaves([None if t is None else (t.double() if t.is_floating_point() else t) for t in xs])
    out, out64 = ours(*xs), truth(*xs64)
    out, out64 = (out if isinstance(out, tuple) else (out,)), (out64 if isinstance(out64, tuple) else (out64,))
    for o, o64 in zip(out, out64):
        if loss_float32:
            assert o.dtype == torch.float32, "losses are float32 whatever the input dtype"
        else:
            assert o.dtype == dtype, "outputs keep the input's dtype"
        assert_close(o, o64, dtype, msg="output")
    grads_out = [torch.randn(o.shape, dtype=torch.float64, device=o.device) for o in out64]
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


def write_synthetic_corpus(out_dir, *, train_tokens: int = 60_000, val_tokens: int = 12_000, seed: int = 0):
    """train.bin / val.bin of GPT-2 token ids with structure a model can learn, made without a tokenizer.

    A "language" of 400 words, each a fixed run of 1-4 ids drawn from 3,000 ids spread over the whole GPT-2
    range, chained by a sparse random bigram table (each word has 4 possible successors) and ended now and
    then by the end-of-text id 50256: there is a unigram distribution to learn first, then context. The same
    seed gives the same files.
    """

    import numpy as np

    from fastcenter import data

    rng = np.random.default_rng(seed)
    ids = rng.choice(50256, size=3000, replace=False)
    words = [ids[rng.integers(0, 3000, size=rng.integers(1, 5))] for _ in range(400)]
    successors = rng.integers(0, 400, size=(400, 4))

    def stream(n: int) -> np.ndarray:
        out, word = [], int(rng.integers(0, 400))
        while len(out) < n:
            out.extend(words[word].tolist())
            if rng.random() < 0.02:
                out.append(data.EOT_TOKEN)
            word = int(successors[word, rng.integers(0, 4)])
        return np.array(out[:n], dtype=np.uint16)

    out_dir = pathlib.Path(out_dir)
    data.write_tokens(out_dir / "train.bin", stream(train_tokens))
    data.write_tokens(out_dir / "val.bin", stream(val_tokens))
    return out_dir


def train_script():
    """The repository's train.py loaded as a module, so that a test runs its cli() in this process (no start-up of a
    fresh interpreter, torch and torch.optim's compiler stack: seconds a run)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "train.py"
    spec = importlib.util.spec_from_file_location("fastcenter_train_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
