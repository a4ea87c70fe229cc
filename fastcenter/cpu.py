"""The CPU implementation of every op in `fastcenter.ops`: eager PyTorch, built for speed and bounded memory.

`fastcenter.ops` runs these for CPU tensors (see ops/_dispatch.py). They compute the same functions as
`fastcenter.reference`, which stays the readable specification.

(For now every function is the reference's; the chunked CPU implementations replace them one by one.)
"""

from __future__ import annotations

from .reference import center_rms_norm, cross_entropy, linear_cross_entropy, rms_norm, rope, swiglu

__all__ = ["rms_norm", "center_rms_norm", "rope", "swiglu", "cross_entropy", "linear_cross_entropy"]
