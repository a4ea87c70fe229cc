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
