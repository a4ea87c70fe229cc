"""fastcenter: fused Triton kernels for small GPT training, and an honest study of vector centering.

    from fastcenter import ops          # rms_norm, center_rms_norm, rope, swiglu, linear_cross_entropy, ...
    from fastcenter.nn import RMSNorm, VectorCentering
    from fastcenter.model import GPT, GPTConfig
"""

__version__ = "0.1.0"
