"""Shared test utilities: per-dtype tolerances and a comparison against a float64 truth."""

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
        actual.double(), expected.double(), rtol=tol["rtol"] * scale, atol=tol["atol"] * scale,
        msg=lambda default: f"{msg}\n{default}" if msg else default,
    )


def write_synthetic_corpus(out_dir, *, train_tokens: int = 60_000, val_tokens: int = 12_000, seed: int = 0):
    """train.bin / val.bin of GPT-2 token ids with structure a model can learn, made without a tokenizer.

    A "language" of 400 words, each a fixed run of 1-4 ids drawn from 3,000 ids spread over the whole GPT-2
    range, chained by a sparse random bigram table (each word has 4 possible successors) and ended now and
    then by the end-of-text id 50256: there is a unigram distribution to learn first, then context. The same
    seed gives the same files.
    """
    import pathlib

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
