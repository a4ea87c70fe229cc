"""Triton kernels of fastcenter, one file per op family; installed as `fastcenter.kernels`.

They import only torch and triton. `fastcenter.ops` wraps them as custom ops with autograd; call those.
"""
