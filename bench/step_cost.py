"""The GPU cost of one training step, counted on a machine without a GPU.

    python -m bench.step_cost                      # the default model, fused and eager paths; table + JSON
    python -m bench.step_cost --paths fused --json /tmp/after.json
    python -m bench.step_cost --micro-batch 64      # the same global batch (16 x 4) in one micro-step of 64
    python -m bench.step_cost --measured gpu.json  # the prediction beside a GPU measurement

It runs the training core's own step (`fastcenter.training.Trainer.train_step`: forward with targets, loss,
backward, per micro-step; then gradient clipping and fused AdamW) on tensors that have shapes, strides and dtypes
but no data, and writes down every kernel a CUDA run of that step would launch, with the bytes it moves and
the FLOPs it does. From those it derives a floor per micro-step on an H100 SXM and an H200: each kernel costs
max(bytes / bandwidth, FLOPs / tensor-core rate), and the floor is their sum. A floor, not a prediction: no
launch latency, no host time, every kernel at full bandwidth or full tensor-core rate. Two counts of launches:

    host ops   what a TorchDispatchMode at the top of the dispatcher sees launch work: aten ops that launch at
               least one kernel, plus each call of a fastcenter custom op (one op however many kernels it
               launches inside); what the host pays per op (dispatch, autograd) and what a CUDA graph removes
    kernels    device launches: Triton kernels, cuBLAS GEMMs, the kernels inside every aten op and inside
               every custom op (e.g. the LM head's chunk GEMMs, casts and row kernels)

How the step is run without a GPU (the emulation):

- The step runs under `FakeTensorMode` on "cpu" fake tensors: no memory, no arithmetic. Autograd, the autocast
  casts and the gradient accumulation happen as in a real run. A CPU-only torch cannot run autograd on fake
  CUDA tensors (its engine needs a CUDA device guard and an accelerator), which is why the top level is "cpu".
- Autocast is CPU autocast in bfloat16. For the ops this step uses (linear, SDPA) CPU and CUDA autocast cast
  alike; every op on CUDA autocast's float32 list (softmax, logsumexp, pow, sum, ...) that meets a bf16/fp16
  input under autocast is listed in the JSON as `autocast_divergences` (CUDA would upcast it, CPU does not):
  a non-empty list means the count no longer describes CUDA autocast there. Autocast caches its casts of
  the float32 weights for one autocast region, which the trainer opens once per optimizer step: they are made,
  and counted, in the first micro-step only.
- Inside a fastcenter custom op (`fastcenter::*`) the op's real Python implementation runs on fake *CUDA*
  copies of its arguments, so every device-dependent choice in kernels/ is CUDA's: the launch plan a launcher
  picks for an H100/H200 (132 SMs, from a stand-in `torch.cuda.get_device_properties`), the cuBLAS paths of the
  LM head, the fp32-accumulation mode the installed torch supports (the probe in kernels/cross_entropy.py; see
  `--accumulation` for torch versions that lack it). On a CPU-only torch this needs a CUDA device guard,
  which does not exist there: a no-op one (the meta device's) is put in its slot while the step runs.
- Triton launches are recorded, not run (`JITFunction.run` / the interpreter's `run` are replaced): kernel,
  grid, num_warps, and the tensor arguments.
- SDPA's backend choice is CUDA's for these inputs: FlashAttention-2 for bf16/fp16 with head dim <= 256 and
  a multiple of 8 and no mask, else the memory-efficient kernel. The CPU flash op the fake run then calls has
  the same output layouts as the CUDA one, and is costed as the CUDA kernels.
- The optimizer is AdamW(fused=True) as on CUDA; `clip_grad_norm_` takes its foreach path as on CUDA.
- Two optimizer steps run; the second is recorded (the first creates optimizer state and primes lazy probes).

The cost model, kernel by kernel (all sizes in bytes of the tensors' own dtypes):

- A tensor's bytes are those of the elements its view addresses (stride-0 dimensions count once).
- Triton kernels: which tensor arguments a kernel reads and which it writes is read from its source (the
  pointers reaching `tl.load` / `tl.store`, through helper jit functions, with the branches of constexpr
  `if`s taken as the launch's constexprs decide); each argument read is counted once and each argument
  written once. So a row kernel reads each tensor once: the cross-entropy kernel's second pass over a row
  is assumed to hit L2 (the kernel keeps few rows in flight for that; kernels/cross_entropy.py). FLOPs of
  Triton kernels are not counted: they are memory-bound row kernels.
- aten ops: one kernel each, reading every tensor argument once and writing every output once; an in-place
  or out= argument is written (and read when it is an input too, e.g. `add_`, or addmm's accumulator when
  beta != 0). Except the ops whose CUDA implementation launches several kernels, costed as it does (those
  below, `logsumexp`: nine, six passes over its input; `slice_backward`/`select_backward`: zeros, copy_;
  `scatter_add`: copy, scatter), and `gather`, which reads only the elements it gathers. An op not listed
  is taken for one kernel, which matters mostly for the eager path. Views, allocations (`empty*`), `detach` and other aliasing ops launch nothing and are not
  counted; nor are composite ops whose parts are counted. An op on empty tensors launches nothing.
- GEMMs (mm, addmm, bmm and their out=/out_dtype forms): one cuBLAS kernel, 2*M*N*K FLOPs, each operand read
  from HBM once and the output written once (tiles re-read from L2, no split-K workspace).
- Flash attention: forward one kernel (reads q, k, v; writes out and the float32 logsumexp); backward three
  (FlashAttention-2 as PyTorch runs it: a dO.O row-dot that also clears the float32 dq accumulator, the main
  kernel that reads q, k, v, dO and writes dk, dv, dq accumulated once in float32, and the dq conversion).
  FLOPs: 4*B*H*T*T*Dh forward for the full score matrix, times the causal share T(T+1)/2 / T^2; backward 2.5x.
- Embedding: forward is one gather (the rows it reads, not the table), plus a copy when the indices are a
  non-contiguous view (as the training windows' slices are). Backward (PyTorch's CUDA sort-based path for
  more than 3072 indices): a [V, D] float32 memset, the gradient rows read once and ~1.1x written as partial
  sums; 21 kernels (the memset; 18 small ones for the index copy, arange, a 64-bit CUB radix sort and the
  segment bookkeeping; two reduction passes). The kernel count of CUB's sort is an estimate.
- Multi-tensor ops (`_foreach_*`, fused AdamW): launches as PyTorch's multi_tensor_apply chunks them (65536
  elements a block, 320 blocks or 110/64/48/36/30 tensors per launch for 1-5 tensor lists), `_foreach_norm`
  one more; fused AdamW reads the gradients and reads and writes params and both moments.
- Not counted: host-to-device copies of the batch (DMA, not kernels) and host syncs (`.item()`: listed as
  `host_syncs` when any happens inside the step).

Kernel classes: inside a custom op, its family (norms, rope, swiglu, LM head + CE); otherwise the region of
the model the op belongs to, found by wrapping the public ops (`fastcenter.ops.*`, `F.linear`,
`F.scaled_dot_product_attention`, `F.embedding`) during the forward and mapping the autograd nodes each
region created to the backward: matmuls (the linears' GEMMs), casts (autocast's casts around the linears,
their backward, and dtype conversions outside every region), attention, embedding (incl. summing the tied
weight's two gradients), norms/rope/swiglu/LM head + CE (for the eager path, its ops of the same math, casts
included), grad accumulation (AccumulateGrad's adds), elementwise/other; per optimizer step: clip, optimizer,
other (the trainer's bookkeeping).

The headline "micro-step" is the last micro-step of an optimizer step: with accumulation it adds its
gradients to the held ones (the trainer's one multi-tensor add), which the first micro-step does not; the first
makes the weight casts, which the others reuse (its numbers are in the JSON as `first_micro_step`). As micro-steps
can differ in size (`--micro-batch`), the JSON also holds the optimizer step per 8,192 tokens
(`per_8192_tokens`), and what train.py --cuda-graph would launch from the host (`graphed`: the ops outside
`Trainer.accumulate_gradients`, one graph launch, and the copies of the loss and gradient norm out of it; the
kernels are the same). Once GPU results exist, `beside_measurement(prediction, measured)` (or `--measured FILE`)
prints the model's numbers beside measured ones.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import ctypes
import dataclasses
import functools
import importlib
import inspect
import json
import os
import pathlib
import pkgutil
import sys
import textwrap
import time
import unittest.mock
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from fastcenter import ops, training
from fastcenter.config import TrainConfig
from fastcenter.environment import collect as collect_environment
from fastcenter.model import GPT, GPTConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "bench" / "results" / "step_cost" / "default-model.json"


# ---------------------------------------------------------------------------------------------------------
# The GPUs the floor is given for.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    name: str
    flops: float  # dense bf16 tensor-core FLOP/s
    bandwidth: float  # HBM bytes/s
    multiprocessors: int

    def seconds(self, nbytes: float, flops: float) -> float:
        return max(nbytes / self.bandwidth, flops / self.flops)


GPUS = {
    "H100": GPU("H100 SXM", 989e12, 3.35e12, 132),
    "H200": GPU("H200", 989e12, 4.8e12, 132),
}


# ---------------------------------------------------------------------------------------------------------
# What is recorded.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Kernel:
    """One device kernel launch (or `count` identical ones)."""

    name: str
    klass: str
    op: str  # the host op it belongs to (an aten op or a fastcenter custom op)
    read: int
    written: int
    flops: int = 0
    count: int = 1
    detail: str = ""  # grid and num_warps of a Triton launch, or how an aten op was costed

    @property
    def bytes(self) -> int:
        return self.read + self.written


@dataclass
class HostOp:
    """One op as a TorchDispatchMode at the top sees it, with the kernels it launches."""

    name: str
    klass: str
    phase: str  # "forward" / "backward" of micro-step `micro`, or "clip" / "optimizer" / "other"
    micro: int
    kernels: list = field(default_factory=list)
    captured: bool = False  # inside what train.py --cuda-graph captures (Trainer.accumulate_gradients)


FAMILIES = {  # custom op name prefix -> kernel class
    "fastcenter::norm": "norms",
    "fastcenter::rope": "rope",
    "fastcenter::swiglu": "swiglu",
    "fastcenter::linear_cross_entropy": "LM head + CE",
    "fastcenter::cross_entropy": "LM head + CE",
}
REGIONS = {  # public function -> kernel class of what it does (fused or eager)
    "rms_norm": "norms",
    "center_rms_norm": "norms",
    "rope": "rope",
    "swiglu": "swiglu",
    "linear_cross_entropy": "LM head + CE",
    "cross_entropy": "LM head + CE",
}
CLASS_ORDER = (
    "LM head + CE",
    "attention",
    "matmuls",
    "norms",
    "rope",
    "swiglu",
    "casts",
    "embedding",
    "grad accumulation",
    "elementwise/other",
    "clip",
    "optimizer",
    "other",
)

# Ops that CUDA autocast runs in float32 (its "fp32" and "fp32 set_opt_dtype" lists) and CPU autocast does not.
CUDA_FP32_AUTOCAST = set(
    (
        "acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow softplus "
        "layer_norm native_layer_norm group_norm norm nuclear_norm frobenius_norm cosine_similarity nll_loss "
        "nll_loss2d mse_loss l1_loss smooth_l1_loss huber_loss kl_div binary_cross_entropy_with_logits dist "
        "pdist cdist renorm logsumexp prod softmax _softmax log_softmax _log_softmax cumprod cumsum "
        "linalg_vector_norm linalg_matrix_norm sum"
    ).split()
)
NO_KERNEL = set(
    (
        "aten::empty aten::empty_strided aten::empty_like aten::new_empty aten::new_empty_strided "
        "aten::detach aten::alias aten::lift_fresh aten::_local_scalar_dense aten::set_ aten::resize_ "
        "aten::_has_compatible_shallow_copy_type"
    ).split()
)
ATTENTION_FORWARD = (
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
)
ATTENTION_BACKWARD = tuple(name + "_backward" for name in ATTENTION_FORWARD)
MATMULS = {"aten::mm": "mm", "aten::addmm": "addmm", "aten::bmm": "bmm", "aten::baddbmm": "addmm"}


# ---------------------------------------------------------------------------------------------------------
# Bytes and FLOPs.
# ---------------------------------------------------------------------------------------------------------


def view_bytes(t: torch.Tensor) -> int:
    """Bytes of the elements a view addresses: stride-0 (expanded) dimensions count once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0 or size == 0:
            n *= size
    return n * t.element_size()


def _tensors(value) -> list:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


def _unique(tensors) -> list:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _schema_io(func, args, kwargs, out) -> tuple[list, list]:
    """(tensors read, tensors written) by an aten op, from its schema (see the module docstring)."""
    schema = func._schema
    reads, writes = [], []
    for i, arg in enumerate(schema.arguments):
        if not arg.kwarg_only and i < len(args):
            value = args[i]
        else:
            value = kwargs.get(arg.name)
        tensors = _tensors(value)
        mutated = arg.alias_info is not None and arg.alias_info.is_write
        if arg.name == "self" and schema.name in MATMULS and kwargs.get("beta", 1) == 0:
            continue  # beta = 0: the accumulator is not read
        if schema.name in ("aten::_fused_adamw_", "aten::_fused_adam_") and arg.name == "grads":
            mutated = False  # written only to unscale with a grad scaler, which is absent here
        if mutated:
            writes += tensors
            if not arg.is_out:
                reads += tensors
        else:
            reads += tensors
    outs = out if isinstance(out, (tuple, list)) else (out,)
    for ret, value in zip(schema.returns, outs):
        if ret.alias_info is None:
            writes += _tensors(value)
    return _unique(reads), _unique(writes)


def _only_aliases(func, args, kwargs, out) -> bool:
    """True when the op mutates nothing and every output shares storage with an input."""
    from torch.multiprocessing.reductions import StorageWeakRef

    if any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments):
        return False
    outs = _tensors(out)
    inputs = {StorageWeakRef(t.untyped_storage()) for t in _tensors((args, kwargs))}
    return bool(outs) and all(StorageWeakRef(t.untyped_storage()) in inputs for t in outs)


def _matmul_flops(func, args) -> int:
    kind = MATMULS[func._schema.name]
    a, b = (args[1], args[2]) if kind == "addmm" else (args[0], args[1])
    batch = a.shape[0] if a.dim() == 3 else 1
    m, k = a.shape[-2:]
    return 2 * batch * m * k * b.shape[-1]


def _multi_tensor_launches(numels: list[int], depth: int) -> int:
    """Launches of PyTorch's multi_tensor_apply (aten/src/ATen/native/cuda/MultiTensorApply.cuh) over tensors of
    these sizes: blocks of 65536 elements, a launch when 320 blocks or the depth's tensor limit are full."""
    max_tensors = (110, 64, 48, 36, 30)[min(depth, 5) - 1]
    launches = blocks = tensors = 0
    for n in numels:
        chunks = -(-n // 65536)
        if chunks == 0:
            continue
        tensors += 1
        for c in range(chunks):
            blocks += 1
            last_chunk = c == chunks - 1
            if blocks == 320 or (last_chunk and tensors == max_tensors):
                launches += 1
                blocks = 0
                tensors = 0 if last_chunk else 1
    return launches + (1 if blocks else 0)


def _bound(func, args, kwargs) -> dict:
    """An op's arguments by their schema names."""
    names = [a.name for a in func._schema.arguments]
    return dict(zip(names, args)) | kwargs


def _attention_flops(q: torch.Tensor, causal: bool) -> int:
    """Forward FLOPs of attention on q [B, H, T, Dh] (QK^T and PV), causal: the T(T+1)/2 pairs computed."""
    b, h, t, d = q.shape
    full = 4 * b * h * t * t * d
    return full * (t + 1) // (2 * t) if causal else full


def aten_kernels(func, args, kwargs, out, klass: str) -> list[Kernel]:
    """The kernels a CUDA run of this aten op launches (see the module docstring), or [] for none."""
    name = func._schema.name
    overload = str(func)
    if func.is_view or name in NO_KERNEL or name.startswith(("prim::", "profiler::")):
        return []
    if name in ATTENTION_FORWARD:
        a = _bound(func, args, kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        written = sum(view_bytes(t) for t in _tensors(out)[:2])  # out, logsumexp
        flops = _attention_flops(q, a.get("is_causal", False))
        return [Kernel("flash_fwd", klass, overload, sum(map(view_bytes, (q, k, v))), written, flops)]
    if name in ATTENTION_BACKWARD:
        a = _bound(func, args, kwargs)
        q, k, v, o, lse = a["query"], a["key"], a["value"], a["out"], a["logsumexp"]
        grad_out = a.get("grad_out", a.get("grad_out_"))
        dq_accum, rowdot = q.numel() * 4, lse.numel() * 4  # float32 dq accumulator, float32 dO.O per row
        qkv_do = sum(map(view_bytes, (q, k, v, grad_out, lse)))
        flops = int(2.5 * _attention_flops(q, a.get("is_causal", False)))
        dq, dk, dv = _tensors(out)[:3]
        dk_dv = view_bytes(dk) + view_bytes(dv)
        return [
            Kernel("flash_bwd_dot_do_o", klass, overload, view_bytes(o) + view_bytes(grad_out), rowdot + dq_accum),
            Kernel("flash_bwd_dq_dk_dv", klass, overload, qkv_do + rowdot + dq_accum, dk_dv + dq_accum, flops),
            Kernel("flash_bwd_convert_dq", klass, overload, dq_accum, view_bytes(dq)),
        ]
    if name == "aten::embedding":
        weight, indices = args[:2]
        rows = indices.numel() * weight.shape[1] * weight.element_size()
        gather = Kernel("index_select", klass, overload, view_bytes(indices) + rows, rows)
        if indices.is_contiguous():
            return [gather]
        copy = Kernel("copy (indices.reshape)", klass, overload, view_bytes(indices), indices.numel() * 8)
        return [copy, gather]
    if name == "aten::embedding_dense_backward":
        grad, indices = args[:2]
        n, weight_rows = indices.numel(), args[2]
        table = weight_rows * grad.shape[-1] * 4  # float32 [V, D], zeroed
        rows = n * grad.shape[-1] * grad.element_size()
        index_bytes = n * 8 * 12  # copies, sort passes and segment bookkeeping over [N] int64 arrays (small)
        return [
            Kernel("memset grad_weight", klass, overload, 0, table),
            Kernel("sort + segment kernels (18)", klass, overload, index_bytes, index_bytes, count=18),
            Kernel("compute_grad_weight", klass, overload, rows + index_bytes // 12, int(1.1 * n * grad.shape[-1] * 4)),
            Kernel("sum_and_scatter", klass, overload, int(1.1 * n * grad.shape[-1] * 4), n * grad.shape[-1] * 4),
        ]
    if name == "aten::logsumexp":  # CUDA: amax, |max| == inf -> 0, exp(x - max), sum, log, + max
        x, small = view_bytes(args[0]), view_bytes(out)
        return [
            Kernel("amax", klass, overload, x, small),
            Kernel("abs, eq, masked_fill_ on the maxima", klass, overload, small, small, count=3),
            Kernel("sub (x - max)", klass, overload, x + small, x),
            Kernel("exp", klass, overload, x, x),
            Kernel("sum", klass, overload, x, small),
            Kernel("log_, add_", klass, overload, small, small, count=2),
        ]
    if name == "aten::gather":  # reads the elements it gathers, not the whole table
        index = args[2]
        return [Kernel(overload, klass, overload, view_bytes(index) + view_bytes(out), view_bytes(out))]
    if name == "aten::scatter_add":  # CUDA: out = self.clone(), then the scatter of src at index
        self_, index, src = args[0], args[2], args[3]
        return [
            Kernel("copy_ (self)", klass, overload, view_bytes(self_), view_bytes(out)),
            Kernel("scatter_add_", klass, overload, view_bytes(index) + 2 * view_bytes(src), view_bytes(src)),
        ]
    if name in ("aten::slice_backward", "aten::select_backward"):  # CUDA: zeros of the input's size, copy_
        grad = args[0]
        return [
            Kernel("zeros", klass, overload, 0, view_bytes(out)),
            Kernel("copy_", klass, overload, view_bytes(grad), view_bytes(grad)),
        ]
    if _only_aliases(func, args, kwargs, out):
        return []  # a view under another name (e.g. _unsafe_view): no copy
    reads, writes = _schema_io(func, args, kwargs, out)
    read, written = sum(map(view_bytes, reads)), sum(map(view_bytes, writes))
    if name.startswith(("aten::_foreach_", "aten::_fused_adam")):
        lists = [v for v in list(args) + list(kwargs.values()) if isinstance(v, (list, tuple)) and _tensors(v)]
        numels = [t.numel() for t in _tensors(lists[0])] if lists else []
        depth = 4 if name.startswith("aten::_fused_adam") else max(1, len(lists) - (1 if "_" == name[-1] else 0))
        launches = _multi_tensor_launches(numels, depth) + (1 if name == "aten::_foreach_norm" else 0)
        if launches == 0:
            return []
        return [
            Kernel(overload, klass, overload, read, written, count=launches, detail=f"multi_tensor_apply x{launches}")
        ]
    if read + written == 0:
        return []  # empty tensors: nothing to launch
    flops = _matmul_flops(func, args) if name in MATMULS else 0
    return [Kernel(overload, klass, overload, read, written, flops)]


# ---------------------------------------------------------------------------------------------------------
# Triton kernels: which arguments a kernel reads and writes, from its source.
# ---------------------------------------------------------------------------------------------------------


class _Tensor:
    """Stands for a tensor argument while evaluating a constexpr condition (`X is None` is False)."""


_UNDECIDED = object()


def _evaluate(node: ast.expr, env: dict):
    """The value of a kernel expression from the launch's arguments alone, or _UNDECIDED (it depends on
    anything else: program ids, loaded values, loop variables)."""
    try:
        return eval(compile(ast.Expression(node), "<kernel>", "eval"), {"__builtins__": {}}, dict(env))
    except Exception:  # noqa: BLE001 -- any failure means the launch alone does not decide it
        return _UNDECIDED


@functools.lru_cache(maxsize=None)
def _parsed(pyfn) -> ast.FunctionDef:
    return ast.parse(textwrap.dedent(inspect.getsource(pyfn))).body[0]


class _Access:
    """Walks a kernel body tracking which pointer parameters flow into each expression ("taint"), and collects
    the parameters that reach tl.load (read) and tl.store / tl.atomic_* (written)."""

    def __init__(self, pyfn, env: dict, taint: dict, reads: set, writes: set, depth: int = 0):
        self.pyfn, self.env, self.taint, self.reads, self.writes, self.depth = pyfn, env, taint, reads, writes, depth

    def run(self, fdef: ast.FunctionDef) -> None:
        for _ in range(2):  # twice: loop-carried pointers reach their uses
            self.block(fdef.body)

    def block(self, statements) -> None:
        for s in statements:
            self.statement(s)

    def statement(self, s) -> None:
        if isinstance(s, ast.Assign):
            value = self.expr(s.value)
            for target in s.targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        self.taint[name.id] = set(value)
        elif isinstance(s, (ast.AugAssign, ast.AnnAssign)) and s.value is not None:
            value = self.expr(s.value)
            if isinstance(s.target, ast.Name):
                self.taint[s.target.id] = self.taint.get(s.target.id, set()) | value
        elif isinstance(s, ast.If):
            decided = self.constant(s.test)
            if decided is None:
                self.expr(s.test)
                self.block(s.body)
                self.block(s.orelse)
            else:
                self.block(s.body if decided else s.orelse)
        elif isinstance(s, (ast.For, ast.While)):
            self.expr(s.iter if isinstance(s, ast.For) else s.test)
            for _ in range(2):
                self.block(s.body)
            self.block(s.orelse)
        elif isinstance(s, ast.With):
            self.block(s.body)
        elif isinstance(s, (ast.Expr, ast.Return)) and s.value is not None:
            self.expr(s.value)

    def constant(self, test) -> Optional[bool]:
        """The value of a condition the launch's constexprs and scalars decide, else None."""
        value = _evaluate(test, self.env)
        return None if value is _UNDECIDED else bool(value)

    def expr(self, node) -> set:
        if node is None:
            return set()
        if isinstance(node, ast.Name):
            return set(self.taint.get(node.id, set()))
        if isinstance(node, ast.IfExp):
            decided = self.constant(node.test)
            if decided is not None:
                return self.expr(node.body if decided else node.orelse)
        if isinstance(node, ast.Call):
            return self.call(node)
        out = set()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                out |= self.expr(child)
        return out

    def call(self, node: ast.Call) -> set:
        func = node.func
        attr = func.attr if isinstance(func, ast.Attribute) else None
        pointer = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "pointer"), None)
        if attr in ("load", "store") or (attr or "").startswith("atomic_"):
            target = self.expr(pointer)
            for a in node.args[1:]:
                self.expr(a)
            for k in node.keywords:
                if k.arg != "pointer":
                    self.expr(k.value)
            if attr != "store":
                self.reads |= target
            if attr != "load":
                self.writes |= target
            return set()  # a loaded value is data, not a pointer
        args = [self.expr(a) for a in node.args]
        kwargs = {k.arg: self.expr(k.value) for k in node.keywords}
        callee = self.pyfn.__globals__.get(func.id) if isinstance(func, ast.Name) else None
        if callee is not None and hasattr(callee, "fn") and self.depth < 8:  # a helper @triton.jit function
            fdef = _parsed(callee.fn)
            params = [a.arg for a in fdef.args.args]
            taint = dict(zip(params, args)) | kwargs
            env = {}  # the helper's constexprs (and scalars) that this launch decides
            for p, a in list(zip(params, node.args)) + [(k.arg, k.value) for k in node.keywords]:
                if (value := _evaluate(a, self.env)) is not _UNDECIDED:
                    env[p] = value
            _Access(callee.fn, env, taint, self.reads, self.writes, self.depth + 1).run(fdef)
        out = set().union(*args, *kwargs.values()) if (args or kwargs) else set()
        if isinstance(func, ast.Attribute):
            out |= self.expr(func.value)
        return out


def triton_kernel(jit_fn, args, kwargs, grid, klass: str, op: str) -> Kernel:
    pyfn = jit_fn.fn
    params = list(inspect.signature(pyfn).parameters)
    bound = dict(zip(params, args)) | {k: v for k, v in kwargs.items() if k in params}
    options = {k: v for k, v in kwargs.items() if k not in params}
    env = {k: (_Tensor() if isinstance(v, torch.Tensor) else v) for k, v in bound.items()}
    taint = {k: {k} for k, v in bound.items() if isinstance(v, torch.Tensor)}
    reads, writes = set(), set()
    _Access(pyfn, env, taint, reads, writes).run(_parsed(pyfn))
    tensors = {k: v for k, v in bound.items() if isinstance(v, torch.Tensor)}
    grid = grid(bound) if callable(grid) else grid
    detail = f"grid {tuple(grid)}, num_warps {options.get('num_warps', 4)}"
    return Kernel(
        pyfn.__name__,
        klass,
        op,
        sum(view_bytes(t) for k, t in tensors.items() if k in reads),
        sum(view_bytes(t) for k, t in tensors.items() if k in writes),
        detail=detail,
    )


# ---------------------------------------------------------------------------------------------------------
# Recording a step.
# ---------------------------------------------------------------------------------------------------------


class Recorder(TorchDispatchMode):
    """Sees every op below autograd and autocast; costs it; runs fastcenter custom ops for real on fake CUDA."""

    def __init__(self):
        super().__init__()
        self.host_ops: list[HostOp] = []
        self.phase, self.micro = "other", 0
        self.region: Optional[str] = None  # the forward region being run (see `_regions`)
        self.node_regions: dict[int, str] = {}  # autograd sequence number -> region, for the backward
        self.inside: Optional[HostOp] = None  # the custom op whose implementation is running
        self.autocast_divergences: Counter = Counter()
        self.syncs = 0
        self.excluded = Counter()  # ops seen that launch nothing (views, allocations, ...)
        self.fp32_accumulation = None
        self.captured = False  # recording inside Trainer.accumulate_gradients
        self.loading = False  # recording inside Trainer._load_batch (the batch's copy to the device)

    def reset(self) -> None:
        """Forget what was recorded (after the warm-up step)."""
        self.host_ops.clear()
        self.excluded.clear()
        self.autocast_divergences.clear()
        self.syncs = 0

    # -- classification ------------------------------------------------------------------------------------

    def klass(self, name: str) -> str:
        if self.phase in ("clip", "optimizer"):
            return self.phase
        node = torch._C._current_autograd_node()
        region = self.region
        if node is not None:
            region = self.node_regions.get(node._sequence_nr()) or (
                "grad accumulation" if "AccumulateGrad" in node.name() else None
            )
        if name == "aten::_to_copy" and region in (None, "matmuls"):
            return "casts"  # autocast's casts around the linears (and their backward), and any stray one
        if name == "aten::_foreach_add_" and node is None and self.phase == "backward":
            return "grad accumulation"  # the trainer's one multi-tensor add of a micro-step's gradients
        if region == "matmuls" and name not in MATMULS:
            return "elementwise/other"
        return region or "elementwise/other"

    # -- the dispatch mode ---------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if func is torch.ops.aten._fused_sdp_choice.default:
            return _sdp_choice(*args, **kwargs)
        if name.startswith("fastcenter::"):
            return self.custom_op(func, args, kwargs)
        if name.startswith(("prim::", "profiler::")):
            return func(*args, **kwargs)
        if self.inside is not None and func.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd):
            with self:  # below autograd a composite op reaches us whole: count its parts instead
                return func.decompose(*args, **kwargs)
        out = func(*args, **kwargs)
        if name == "aten::_local_scalar_dense":
            self.syncs += 1
        if self.loading:  # the batch's host-to-device copy: a DMA from pinned host memory, no kernel
            self.excluded[f"{func} (host-to-device copy of the batch)"] += 1
            return out
        if self.inside is not None:
            kernels = aten_kernels(func, args, kwargs, out, self.inside.klass)
            for k in kernels:
                k.op = self.inside.name
            self.inside.kernels += kernels
            return out
        if self.phase.startswith("forward") and torch.is_autocast_enabled("cpu"):
            base = name.split("::")[-1].rstrip("_")
            low = any(t.dtype in (torch.bfloat16, torch.float16) for t in _tensors((args, kwargs)))
            if base in CUDA_FP32_AUTOCAST and low:
                self.autocast_divergences[str(func)] += 1
        klass = self.klass(name)
        kernels = aten_kernels(func, args, kwargs, out, klass)
        if kernels:
            self.host_ops.append(HostOp(str(func), klass, self.phase, self.micro, kernels, self.captured))
        else:
            self.excluded[str(func)] += 1
        return out

    def custom_op(self, func, args, kwargs):
        """Run a fastcenter custom op's implementation on fake CUDA copies of its arguments (recording what it
        launches), and hand back fake CPU tensors of the same layout."""
        name = func._schema.name
        opdef = torch._library.custom_ops.OPDEFS[name]
        klass = next((c for prefix, c in FAMILIES.items() if name.startswith(prefix)), "fused other")
        host = HostOp(name, klass, self.phase, self.micro, captured=self.captured)
        outer, self.inside = self.inside, host
        try:
            cuda_args, cuda_kwargs = tree_map(_to_device("cuda:0"), (args, kwargs))
            with self:
                out = opdef._init_fn(*cuda_args, **cuda_kwargs)
        finally:
            self.inside = outer
        if outer is not None:  # a custom op called inside another: its kernels are the outer op's
            outer.kernels += host.kernels
        else:
            self.host_ops.append(host)
        return tree_map(_to_device("cpu"), out)

    # -- Triton ---------------------------------------------------------------------------------------------

    def triton_launch(self, jit_fn, args, kwargs, grid) -> None:
        if self.inside is None:
            raise RuntimeError(f"Triton kernel {jit_fn.fn.__name__} launched outside a fastcenter custom op")
        self.inside.kernels.append(triton_kernel(jit_fn, args, kwargs, grid, self.inside.klass, self.inside.name))


def _to_device(device: str):
    def convert(t):
        if not isinstance(t, torch.Tensor):
            return t
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)

    return convert


def _sdp_choice(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """CUDA's SDPA backend for these inputs (see the module docstring): flash, else memory-efficient."""
    from torch.nn.attention import SDPBackend

    head_dim = query.shape[-1]
    flash = query.dtype in (torch.bfloat16, torch.float16) and head_dim % 8 == 0 and head_dim <= 256
    backend = SDPBackend.FLASH_ATTENTION if flash and attn_mask is None else SDPBackend.EFFICIENT_ATTENTION
    return int(backend.value)


@contextlib.contextmanager
def _cuda_device_guard():
    """Fake CUDA tensors on a CPU-only torch need a CUDA device guard, which such a build lacks (torch's own
    `_ensureCUDADeviceGuardSet` only helps CUDA builds without a GPU): the no-op guard of the meta device is
    put in CUDA's slot of c10's registry while the step runs, and the slot emptied again afterwards."""
    if torch.cuda._is_compiled():
        yield
        return
    names = ("libc10.so", "libc10.dylib", "c10.dll")
    lib = next((p for n in names if (p := pathlib.Path(torch.__file__).parent / "lib" / n).exists()), None)
    if lib is None:
        raise RuntimeError("bench.step_cost: cannot find torch's c10 library to emulate a CUDA device")
    registry = ctypes.cast(
        ctypes.CDLL(str(lib))._ZN3c104impl26device_guard_impl_registryE, ctypes.POINTER(ctypes.c_void_p)
    )
    cuda, meta = int(torch._C._autograd.DeviceType.CUDA), int(torch._C._autograd.DeviceType.Meta)
    before = registry[cuda]
    registry[cuda] = registry[meta]
    try:
        yield
    finally:
        registry[cuda] = before


class _DeviceProperties:
    def __init__(self, gpu: GPU):
        self.name, self.multi_processor_count, self.major, self.minor = gpu.name, gpu.multiprocessors, 9, 0


@contextlib.contextmanager
def _regions(recorder: Recorder):
    """Tag the ops of each public op (and of F.linear, SDPA, embedding) with its kernel class, in the forward
    directly and in the backward through the autograd nodes the forward created (see the module docstring)."""

    def wrap(fn, region):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if recorder.region is not None or not recorder.phase.startswith("forward"):
                return fn(*args, **kwargs)
            recorder.region = region
            try:
                out = fn(*args, **kwargs)
            finally:
                recorder.region = None
            # The region's autograd nodes: from its outputs back to its inputs (or to the parameters).
            seen = {t.grad_fn._sequence_nr() for t in _tensors((args, kwargs)) if t.grad_fn is not None}
            todo = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None]
            while todo:
                node = todo.pop()
                if node is None or "AccumulateGrad" in node.name() or node._sequence_nr() in seen:
                    continue
                seen.add(node._sequence_nr())
                recorder.node_regions.setdefault(node._sequence_nr(), region)
                todo += [n for n, _ in node.next_functions]
            return out

        return wrapper

    patches = [
        unittest.mock.patch.object(ops, name, wrap(getattr(ops, name), region)) for name, region in REGIONS.items()
    ]
    for name, region in (
        ("linear", "matmuls"),
        ("scaled_dot_product_attention", "attention"),
        ("embedding", "embedding"),
    ):
        patches.append(unittest.mock.patch.object(F, name, wrap(getattr(F, name), region)))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


@contextlib.contextmanager
def _emulated_cuda(recorder: Recorder, gpu: GPU, accumulation: Optional[str]):
    """Everything the step needs to run as on `gpu` (see the module docstring)."""
    kernels = importlib.import_module("fastcenter.kernels")
    for module in pkgutil.iter_modules(kernels.__path__):  # import them before TRITON_INTERPRET changes
        importlib.import_module(f"fastcenter.kernels.{module.name}")
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def run(self, *args, grid, warmup=False, **kwargs):
        recorder.triton_launch(self, args, kwargs, grid)

    from fastcenter.kernels import _device
    from fastcenter.kernels import cross_entropy as ce_kernels

    clip_grad = importlib.import_module("torch.nn.utils.clip_grad")
    with contextlib.ExitStack() as stack:
        stack.enter_context(_cuda_device_guard())
        stack.enter_context(unittest.mock.patch.object(JITFunction, "run", run))
        stack.enter_context(unittest.mock.patch.object(InterpretedFunction, "run", run))
        stack.enter_context(
            unittest.mock.patch("torch.cuda.get_device_properties", lambda *a, **k: _DeviceProperties(gpu))
        )
        stack.enter_context(unittest.mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}))  # ops.backend(): "triton"
        stack.enter_context(unittest.mock.patch.object(clip_grad, "_has_foreach_support", lambda *a, **k: True))
        stack.enter_context(unittest.mock.patch.object(clip_grad, "_device_has_foreach_support", lambda *a, **k: True))
        probe = getattr(ce_kernels, "_fp32_accumulation", None)
        if probe is not None:

            def accumulation_mode(device, dtype):
                recorder.fp32_accumulation = accumulation or probe(device, dtype)
                return recorder.fp32_accumulation

            stack.enter_context(unittest.mock.patch.object(ce_kernels, "_fp32_accumulation", accumulation_mode))
        elif accumulation is not None:
            raise ValueError("--accumulation: kernels/cross_entropy.py no longer has _fp32_accumulation to force")
        clip = torch.nn.utils.clip_grad_norm_

        def clip_phase(*args, **kwargs):
            recorder.phase = "clip"
            return clip(*args, **kwargs)

        stack.enter_context(unittest.mock.patch.object(torch.nn.utils, "clip_grad_norm_", clip_phase))
        # Answers cached from fake tensors must not outlive the step (nor earlier ones leak into it).
        for cached in (getattr(_device, "_cuda_multiprocessors", None), probe):
            if hasattr(cached, "cache_clear"):
                stack.callback(cached.cache_clear)
                cached.cache_clear()
        yield


@dataclass
class StepSpec:
    """What to count: the model, the batch, the path, the GPU whose launch plan is used."""

    model: GPTConfig
    batch_size: int = 16
    grad_accum_steps: int = 4
    gpu: str = "H100"
    accumulation: Optional[str] = None  # force kernels/cross_entropy.py's fp32-accumulation mode (None: probe)
    micro_batch: Optional[int] = None  # train.py's --micro-batch (None: batch_size)


@contextlib.contextmanager
def _recording(recorder: Recorder, gpu: str = "H100", accumulation: Optional[str] = None):
    """Fake tensors, the CUDA emulation and the regions around `recorder` (see the module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with _emulated_cuda(recorder, GPUS[gpu], accumulation), _regions(recorder):
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield


def record(fn, *, gpu: str = "H100") -> Recorder:
    """Record what `fn()` launches, as forward work (tensors it makes are fake "cpu" tensors standing for CUDA
    ones). For small hand-checked cases; `record_step` records a training step."""
    recorder = Recorder()
    with _recording(recorder, gpu), recorder:
        recorder.phase = "forward"
        fn()
    return recorder


def record_step(spec: StepSpec) -> Recorder:
    """Run two optimizer steps of the training core on fake tensors; return the recording of the second (with
    the split the trainer ran: `micro_batch`, `micro_steps`)."""
    recorder = Recorder()
    cfg = TrainConfig(
        dtype="bfloat16",
        batch_size=spec.batch_size,
        grad_accum_steps=spec.grad_accum_steps,
        micro_batch=spec.micro_batch or spec.batch_size,
        seq_len=spec.model.max_seq_len,
        compile=False,
    )
    tokens = (np.arange(4 * spec.model.max_seq_len + 4) % spec.model.vocab_size).astype(np.uint16)
    with _recording(recorder, spec.gpu, spec.accumulation):
        model = GPT(spec.model)
        model.to = lambda *a, **k: model  # the fake parameters already are where they run
        # AdamW(fused=True) as on CUDA (the trainer picks fused only for a CUDA device).
        model.configure_optimizer = functools.partial(_fused_optimizer, model)
        trainer = training.Trainer(model, cfg, train_tokens=tokens, val_tokens=tokens, device=torch.device("cpu"))
        _phase_hooks(recorder, model, trainer.optimizer)
        _mark_regions(recorder, trainer)
        with recorder:
            trainer.train_step()
            recorder.reset()
            trainer.train_step()
    recorder.micro_batch, recorder.micro_steps = trainer.micro_batch, trainer.micro_steps
    return recorder


def _mark_regions(recorder: Recorder, trainer) -> None:
    """Flag the ops of `Trainer.accumulate_gradients` (what train.py --cuda-graph replays as one graph) and of
    `Trainer._load_batch` (the batch's copy to the device)."""

    def flagged(method, flag: str):
        def run(*args):
            setattr(recorder, flag, True)
            try:
                return method(*args)
            finally:
                setattr(recorder, flag, False)

        return run

    trainer.accumulate_gradients = flagged(trainer.accumulate_gradients, "captured")
    trainer._load_batch = flagged(trainer._load_batch, "loading")


def _fused_optimizer(model, *args, **kwargs):
    return GPT.configure_optimizer(model, *args, **{**kwargs, "device_type": "cuda"})


def _phase_hooks(recorder: Recorder, model, optimizer) -> None:
    """forward i / backward i per micro-step, clip, optimizer, other: from module and optimizer hooks."""

    def forward_pre(module, args):
        if recorder.phase in ("other", "clip", "optimizer"):
            recorder.micro = 0
        elif recorder.phase.startswith("backward"):
            recorder.micro += 1
        recorder.phase = "forward"

    def forward_post(module, args, out):
        recorder.phase = "backward"

    def set_phase(phase):
        def hook(*args, **kwargs):
            recorder.phase = phase

        return hook

    model.register_forward_pre_hook(forward_pre)
    model.register_forward_hook(forward_post)
    optimizer.register_step_pre_hook(set_phase("optimizer"))
    optimizer.register_step_post_hook(set_phase("other"))


# ---------------------------------------------------------------------------------------------------------
# Summaries.
# ---------------------------------------------------------------------------------------------------------


def _totals(host_ops: list[HostOp]) -> dict:
    kernels = [k for h in host_ops for k in h.kernels]
    read = sum(k.read * k.count for k in kernels)
    written = sum(k.written * k.count for k in kernels)
    flops = sum(k.flops * k.count for k in kernels)
    return {
        "host_ops": len(host_ops),
        "kernels": sum(k.count for k in kernels),
        "bytes_read": read,
        "bytes_written": written,
        "bytes": read + written,
        "flops": flops,
        "floor_ms": {
            g: round(sum(gpu.seconds(k.bytes, k.flops) * k.count for k in kernels) * 1e3, 4) for g, gpu in GPUS.items()
        },
    }


def _by_class(host_ops: list[HostOp]) -> dict:
    classes = defaultdict(list)
    for h in host_ops:
        for k in h.kernels:
            classes[k.klass].append(k)
    host = Counter(h.klass for h in host_ops)
    out = {}
    for c in sorted(classes, key=lambda c: CLASS_ORDER.index(c) if c in CLASS_ORDER else len(CLASS_ORDER)):
        ks = classes[c]
        out[c] = {
            "host_ops": host.get(c, 0),
            "kernels": sum(k.count for k in ks),
            "bytes": sum(k.bytes * k.count for k in ks),
            "flops": sum(k.flops * k.count for k in ks),
            "floor_ms": {
                g: round(sum(gpu.seconds(k.bytes, k.flops) * k.count for k in ks) * 1e3, 4) for g, gpu in GPUS.items()
            },
        }
    return out


def _kernel_table(host_ops: list[HostOp]) -> list[dict]:
    """Every kernel of these ops, identical ones merged (the blocks repeat), in order of first launch."""
    rows: dict[tuple, dict] = {}
    for h in host_ops:
        for k in h.kernels:
            key = (h.phase, k.klass, k.op, k.name, k.read, k.written, k.flops, k.detail)
            row = rows.setdefault(
                key,
                {
                    "phase": h.phase,
                    "class": k.klass,
                    "op": k.op,
                    "kernel": k.name,
                    "count": 0,
                    "read": k.read,
                    "written": k.written,
                    "flops": k.flops,
                    "detail": k.detail,
                    "H100_us": round(GPUS["H100"].seconds(k.bytes, k.flops) * 1e6, 3),
                },
            )
            row["count"] += k.count
    return list(rows.values())


PER_TOKENS = 8192  # the default micro-batch's tokens (16 x 512): the unit of the per-token view


def summarize(recorder: Recorder, spec: StepSpec) -> dict:
    ops_ = recorder.host_ops
    n = recorder.micro_steps
    micro = lambda i: [h for h in ops_ if h.phase in ("forward", "backward") and h.micro == i]  # noqa: E731
    last, first = micro(n - 1), micro(0)
    per_phase = {p: [h for h in ops_ if h.phase == p] for p in ("clip", "optimizer", "other")}
    step = _totals(ops_)
    tokens = recorder.micro_batch * spec.model.max_seq_len
    scale = PER_TOKENS / (tokens * n)
    outside = sum(not h.captured for h in ops_)
    copies_out = 1 + any(h.phase == "clip" for h in ops_)  # the loss and the gradient norm, out of the graph
    return {
        "micro_step": {
            **_totals(last),
            "forward": _totals([h for h in last if h.phase == "forward"]),
            "backward": _totals([h for h in last if h.phase == "backward"]),
            "by_class": _by_class(last),
            "host_op_names": dict(Counter(h.name for h in last).most_common()),
        },
        "first_micro_step": {**_totals(first), "by_class": _by_class(first)},
        **{p: {**_totals(hs), "by_class": _by_class(hs)} for p, hs in per_phase.items()},
        "optimizer_step": {
            **step,
            "tokens": tokens * n,
            "floor_tokens_per_s": {g: round(tokens * n / (ms / 1e3)) for g, ms in step["floor_ms"].items()},
        },
        f"per_{PER_TOKENS}_tokens": {
            "host_ops": round(step["host_ops"] * scale, 1),
            "kernels": round(step["kernels"] * scale, 1),
            "bytes": round(step["bytes"] * scale),
            "floor_ms": {g: round(ms * scale, 4) for g, ms in step["floor_ms"].items()},
        },
        # train.py --cuda-graph: the same kernels; the host launches what is outside the graph, the graph once,
        # and the copies of its outputs.
        "graphed": {
            "host_ops_per_optimizer_step": outside + 1 + copies_out,
            "captured_host_ops": len(ops_) - outside,
            "captured_kernels": sum(k.count for h in ops_ if h.captured for k in h.kernels),
        },
        "excluded_ops_per_step": dict(recorder.excluded.most_common()),
        "autocast_divergences": dict(recorder.autocast_divergences),
        "host_syncs": recorder.syncs,
        "fp32_accumulation": recorder.fp32_accumulation,
        "kernels": _kernel_table(last + per_phase["clip"] + per_phase["optimizer"] + per_phase["other"]),
    }


def predict(
    model: Optional[GPTConfig] = None,
    *,
    paths=("fused", "eager"),
    batch_size: int = 16,
    grad_accum_steps: int = 4,
    accumulation: Optional[str] = None,
    micro_batch: Optional[int] = None,
) -> dict:
    """The whole prediction (what the JSON holds) for the model (default: the default model) on each path."""
    model, env = model or GPTConfig(), collect_environment()
    result = {
        "tool": "bench.step_cost",
        "commit": env["git"]["commit"],
        "git": env["git"],  # the commit, whether the tree differed from it, the source hash
        "versions": {name: env[name] for name in ("torch", "triton", "python")},
        "gpus": {k: dataclasses.asdict(g) for k, g in GPUS.items()},
        "step": {
            "model": model.to_dict() | {"fused": None},
            "batch_size": batch_size,
            "grad_accum_steps": grad_accum_steps,
            "micro_batch": micro_batch or batch_size,
            "micro_steps": batch_size * grad_accum_steps // (micro_batch or batch_size),
            "tokens_per_micro_step": (micro_batch or batch_size) * model.max_seq_len,
            "autocast": "bfloat16",
            "master_weights": "float32",
            "optimizer": "AdamW(fused=True)",
        },
        "paths": {},
    }
    for path in paths:
        spec = StepSpec(
            dataclasses.replace(model, fused=path == "fused"),
            batch_size,
            grad_accum_steps,
            accumulation=accumulation,
            micro_batch=micro_batch,
        )
        t0 = time.perf_counter()
        recorder = record_step(spec)
        result["paths"][path] = summarize(recorder, spec) | {"seconds_to_count": round(time.perf_counter() - t0, 1)}
    return result


# ---------------------------------------------------------------------------------------------------------
# Printing, and the prediction beside a measurement.
# ---------------------------------------------------------------------------------------------------------


def dumps(result: dict) -> str:
    """The prediction as JSON, one kernel row per line (so that a diff of two runs reads kernel by kernel)."""
    rows = {}
    slim = json.loads(json.dumps(result))
    for path, r in slim["paths"].items():
        rows[path] = r.pop("kernels")
        r["kernels"] = f"@kernels:{path}@"
    text = json.dumps(slim, indent=1)
    for path, kernel_rows in rows.items():
        body = ",\n".join("  " + json.dumps(row) for row in kernel_rows)
        text = text.replace(f'"@kernels:{path}@"', "[\n" + body + "\n  ]")
    return text + "\n"


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f}"


def table(result: dict) -> str:
    """A markdown table per path: the micro-step by class, then the per-optimizer-step parts."""
    lines = []
    step = result["step"]
    for path, r in result["paths"].items():
        m = r["micro_step"]
        lines += [
            f"{path} path, one micro-step of {step['micro_batch']} x {step['model']['max_seq_len']} tokens "
            f"(the last of {step['micro_steps']}):",
            "",
            "| class | host ops | kernels | MB | H100 floor ms | share | H200 floor ms |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        total_ms = m["floor_ms"]["H100"]
        for c, v in m["by_class"].items():
            share = v["floor_ms"]["H100"] / total_ms if total_ms else 0.0
            lines.append(
                f"| {c} | {v['host_ops']} | {v['kernels']} | {_mb(v['bytes'])} | {v['floor_ms']['H100']:.3f} "
                f"| {share:.0%} | {v['floor_ms']['H200']:.3f} |"
            )
        lines.append(
            f"| **micro-step** | **{m['host_ops']}** | **{m['kernels']}** | **{_mb(m['bytes'])}** "
            f"| **{m['floor_ms']['H100']:.3f}** | | **{m['floor_ms']['H200']:.3f}** |"
        )
        for part in ("clip", "optimizer", "other"):
            v = r[part]
            lines.append(
                f"| {part} (per optimizer step) | {v['host_ops']} | {v['kernels']} | {_mb(v['bytes'])} "
                f"| {v['floor_ms']['H100']:.3f} | | {v['floor_ms']['H200']:.3f} |"
            )
        s, t = r["optimizer_step"], r[f"per_{PER_TOKENS}_tokens"]
        lines += [
            f"| **optimizer step** ({s['tokens']:,} tokens) | {s['host_ops']} | {s['kernels']} | {_mb(s['bytes'])} "
            f"| {s['floor_ms']['H100']:.3f} | | {s['floor_ms']['H200']:.3f} |",
            f"| per {PER_TOKENS:,} tokens | {t['host_ops']:g} | {t['kernels']:g} | {_mb(t['bytes'])} "
            f"| {t['floor_ms']['H100']:.3f} | | {t['floor_ms']['H200']:.3f} |",
            "",
            f"as a CUDA graph (train.py --cuda-graph): {r['graphed']['host_ops_per_optimizer_step']} host ops per "
            f"optimizer step instead of {s['host_ops']} (the graph replays {r['graphed']['captured_host_ops']} ops' "
            f"{r['graphed']['captured_kernels']} kernels).",
            "",
            f"floor throughput: {s['floor_tokens_per_s']['H100'] / 1e6:.2f}M tokens/s on an H100, "
            f"{s['floor_tokens_per_s']['H200'] / 1e6:.2f}M on an H200; first micro-step "
            f"{r['first_micro_step']['host_ops']} host ops / {r['first_micro_step']['kernels']} kernels; "
            f"LM head fp32 accumulation: {r['fp32_accumulation'] or 'n/a'}; "
            f"autocast divergences: {len(r['autocast_divergences'])}; "
            f"host syncs: {r['host_syncs']}",
            "",
        ]
    return "\n".join(lines)


MEASURED_KEYS = {  # measured key -> (what, where in a path's prediction)
    "micro_step_ms": ("micro-step time, ms", lambda r, g: r["micro_step"]["floor_ms"][g]),
    "optimizer_step_ms": ("optimizer step time, ms", lambda r, g: r["optimizer_step"]["floor_ms"][g]),
    "tokens_per_sec": ("tokens/s", lambda r, g: r["optimizer_step"]["floor_tokens_per_s"][g]),
    "kernels_per_micro_step": ("kernel launches per micro-step", lambda r, g: r["micro_step"]["kernels"]),
    "host_ops_per_micro_step": ("host ops per micro-step", lambda r, g: r["micro_step"]["host_ops"]),
}


def beside_measurement(prediction: dict, measured: dict) -> str:
    """The model's numbers beside a GPU measurement, as a markdown table.

    `measured`: {"device": "NVIDIA H200 ...", "<path>": {<any of MEASURED_KEYS>: value, ...}}, e.g. what the
    first-contact report measured for train.py --fused ("fused") and eager ("eager"). The floor is the H200's
    when the device name says H200, else the H100's. A measured time above the floor is expected: the floor
    has no launch latency, host time or imperfect bandwidth; measured / floor is the efficiency.
    """
    gpu = "H200" if "H200" in str(measured.get("device", "")) else "H100"
    lines = [
        f"step-cost model ({gpu} floor, commit {prediction.get('commit')}) beside the measurement on "
        f"{measured.get('device', 'an unnamed device')}:",
        "",
        "| path | quantity | model | measured | measured / model |",
        "|---|---|---:|---:|---:|",
    ]
    for path, values in measured.items():
        if path not in prediction["paths"] or not isinstance(values, dict):
            continue
        for key, value in values.items():
            if key not in MEASURED_KEYS or value is None:
                continue
            what, get = MEASURED_KEYS[key]
            model = get(prediction["paths"][path], gpu)
            ratio = value / model if model else float("nan")
            lines.append(f"| {path} | {what} | {model:,.3f} | {value:,.3f} | {ratio:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    defaults = GPTConfig()
    parser = argparse.ArgumentParser(prog="python -m bench.step_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", default="fused,eager", help="comma-separated: fused, eager (default both)")
    parser.add_argument(
        "--json", help=f"write the prediction here (default for the default step: {DEFAULT_JSON.relative_to(ROOT)})"
    )
    parser.add_argument("--no-json", action="store_true", help="write no JSON")
    parser.add_argument(
        "--measured", help="a JSON of GPU measurements to print the prediction beside (see beside_measurement)"
    )
    parser.add_argument(
        "--accumulation",
        choices=("fused", "temp", "upcast"),
        help="force the LM head's fp32 weight-gradient accumulation mode (kernels/cross_entropy.py) "
        "instead of what this torch supports: 'temp' is torch without out_dtype addmm into fp32",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--grad-accum-steps", type=int, default=4)
    parser.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="sequences per micro-step, as train.py's --micro-batch (default: --batch-size); the optimizer step "
        "stays --batch-size x --grad-accum-steps sequences",
    )
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    parser.add_argument("--mlp-hidden", type=int, default=None)
    parser.add_argument("--center", default="", help="centering placements, as train.py's --center")
    args = parser.parse_args(argv)
    paths = tuple(p.strip() for p in args.paths.split(",") if p.strip())
    try:
        if not paths or set(paths) - {"fused", "eager"}:
            raise ValueError(f"--paths must name fused and/or eager, got {args.paths!r}")
        if args.batch_size < 1 or args.grad_accum_steps < 1:
            raise ValueError("--batch-size and --grad-accum-steps must be positive")
        sequences = args.batch_size * args.grad_accum_steps
        if args.micro_batch is not None and (args.micro_batch < 1 or sequences % args.micro_batch):
            raise ValueError(f"--micro-batch must be a positive divisor of the {sequences} sequences of a step")
        model = GPTConfig(
            vocab_size=args.vocab_size,
            dim=args.dim,
            n_layers=args.n_layers,
            n_heads=args.n_heads,
            max_seq_len=args.max_seq_len,
            mlp_hidden=args.mlp_hidden,
            center=args.center,
        )
        measured = json.loads(pathlib.Path(args.measured).read_text()) if args.measured else None
    except (ValueError, OSError) as e:
        print(f"bench.step_cost: {e}", file=sys.stderr)
        return 2
    result = predict(
        model,
        paths=paths,
        batch_size=args.batch_size,
        grad_accum_steps=args.grad_accum_steps,
        accumulation=args.accumulation,
        micro_batch=args.micro_batch,
    )
    print(table(result))
    if measured is not None:
        print(beside_measurement(result, measured))
    is_default = (
        model == GPTConfig()
        and (args.batch_size, args.grad_accum_steps) == (16, 4)
        and args.micro_batch in (None, 16)
        and not args.accumulation
    )
    out = args.json or (DEFAULT_JSON if is_default and paths == ("fused", "eager") else None)
    if out and not args.no_json:
        out = pathlib.Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(dumps(result))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
