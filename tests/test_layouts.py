"""Every tensor argument of every public op, in every memory layout, against the float64 reference.

One argument at a time takes a layout other than contiguous (strided, offset, padded rows, transposed, expanded
along the last or a leading dim), the others stay contiguous; then all of them at once; then the gradient
reaching the op (grad_output) in each layout. The op's outputs and the gradients of the tensors the views were
made from must equal `fastcenter.reference` evaluated in float64 on the same views, on each backend: "triton"
(the kernels, interpreted on the CPU), "cpu" and "reference".

The bug that motivated this file: the norm kernels read the weight as if its stride were 1, so a strided weight
gave wrong outputs and an expanded (stride-0) weight read past the end of its storage (errors ~1e38).
"""

from typing import Callable

import pytest
import torch
from helpers import assert_close
from op_cases import BACKENDS, OPS, Op, select_backend, values

from fastcenter import ops, reference


# ---------------------------------------------------------------------------------------------------------
# Layouts: each turns a contiguous tensor of values into (base, view), where `view` has the values' shape and
# the layout's strides, and `base` is the tensor it is a view of (the leaf whose gradient is checked). Expanded
# layouts repeat one slice of the values along the expanded dim.
# ---------------------------------------------------------------------------------------------------------


def _strided(t):  # every other element of a twice-as-wide last dim: last-dim stride 2
    base = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    base[..., ::2] = t
    return base, lambda b: b[..., ::2]


def _offset(t):  # a flat storage with 3 elements before the data: storage offset 3 (misaligned)
    base = torch.cat([torch.zeros(3, dtype=t.dtype, device=t.device), t.flatten()])
    return base, lambda b: b[3:].view(t.shape)


def _padded_rows(t):  # rows of a wider tensor, starting at column 2: row stride != width, misaligned start
    base = torch.zeros(*t.shape[:-1], t.shape[-1] + 5, dtype=t.dtype, device=t.device)
    base[..., 2 : 2 + t.shape[-1]] = t
    return base, lambda b: b[..., 2 : 2 + t.shape[-1]]


def _transposed(t):  # the last two dims stored swapped (column-major)
    return t.transpose(-1, -2).contiguous(), lambda b: b.transpose(-1, -2)


def _expanded_last(t):  # stride 0 along the last dim
    return t[..., :1].clone(), lambda b: b.expand(t.shape)


def _expanded_first(t):  # stride 0 along the first dim
    return t[:1].clone(), lambda b: b.expand(t.shape)


LAYOUTS: dict[str, Callable] = {
    "strided": _strided,
    "offset": _offset,
    "padded_rows": _padded_rows,
    "transposed": _transposed,
    "expanded_last": _expanded_last,
    "expanded_first": _expanded_first,
}
MATRIX_ONLY = {"padded_rows", "transposed", "expanded_first"}  # need at least two dims


def _in_layout(t, layout: str):
    base, view = LAYOUTS[layout](t)
    return view(base)


def layouts_for(shape) -> list[str]:
    return [name for name in LAYOUTS if len(shape) >= 2 or name not in MATRIX_ONLY]


def _run(op: Op, layouts: dict[str, str], backend: str, monkeypatch, grad_layout: str | None = None):
    """Compare op on views in the given layouts (arg name -> layout) with the float64 reference on the same views."""
    device = select_backend(backend, monkeypatch)
    views, views64, leaves, leaves64, repeats = {}, {}, [], [], []
    for arg in op.args:
        data = values(op, arg, device)
        layout = layouts.get(arg.name)
        base, view = (data, lambda b: b) if layout is None else LAYOUTS[layout](data)
        differentiable = arg.kind == "float"
        base64 = base.double() if base.is_floating_point() else base
        if differentiable:
            base, base64 = base.requires_grad_(), base64.requires_grad_()
            leaves.append(base)
            leaves64.append(base64)
            repeats.append(data.numel() / base.numel())  # > 1 for an expanded view: summed gradients
        views[arg.name], views64[arg.name] = view(base), view(base64)
        assert views[arg.name].shape == arg.shape
    assert ops.backend(*(t for t in views.values())) == backend

    outputs = op.call(ops, **views)
    truths = op.call(reference, **views64)
    grads_out = [torch.randn(o.shape, device=device, dtype=torch.float64) for o in truths]
    as_given = [g.to(o.dtype) for g, o in zip(grads_out, outputs)]
    if grad_layout is not None:  # the gradient reaching the op in this layout
        as_given = [_in_layout(g, grad_layout) for g in as_given]
        grads_out = [g.double() for g in as_given]
    grads = torch.autograd.grad(outputs, leaves, as_given)
    true_grads = torch.autograd.grad(truths, leaves64, grads_out)

    where = f"{op.name} on {backend}, layouts {layouts}, grad_output {grad_layout}"
    for i, (out, truth) in enumerate(zip(outputs, truths)):
        assert_close(out, truth, torch.float32, msg=f"output {i} of {where}")
    for name, grad, truth, repeat in zip(op.differentiable, grads, true_grads, repeats):
        # Vectors (weight, centre, bias) sum over rows, and the gradient of an expanded view's base sums over
        # the repeats (terms that may cancel): allow for the longer float32 sums.
        scale = (4.0 if grad.dim() == 1 or name == "linear_weight" else 1.0) * repeat
        assert_close(grad, truth, torch.float32, scale=scale, msg=f"gradient of {name} in {where}")


ONE_AT_A_TIME = [
    pytest.param(op.name, arg.name, layout, id=f"{op.name}-{arg.name}-{layout}")
    for op in OPS.values()
    for arg in op.args
    for layout in layouts_for(arg.shape)
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op_name, arg_name, layout", ONE_AT_A_TIME)
def test_one_argument_in_each_layout(op_name, arg_name, layout, backend, monkeypatch):
    _run(OPS[op_name], {arg_name: layout}, backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op_name", list(OPS))
def test_every_argument_in_an_unusual_layout_at_once(op_name, backend, monkeypatch):
    op = OPS[op_name]
    # A different layout per argument, cycling, so neighbours differ.
    layouts = {}
    for i, arg in enumerate(op.args):
        choices = layouts_for(arg.shape)
        layouts[arg.name] = choices[(i + 1) % len(choices)]
    _run(op, layouts, backend, monkeypatch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_layout", ["strided", "offset", "transposed", "expanded_last", "expanded_first"])
@pytest.mark.parametrize("op_name", [name for name in OPS if name not in ("linear_cross_entropy",)])
def test_grad_output_in_each_layout(op_name, grad_layout, backend, monkeypatch):
    op = OPS[op_name]
    if grad_layout in MATRIX_ONLY and op_name == "cross_entropy":  # a [N] per-token loss
        pytest.skip("the per-token loss is one-dimensional")
    _run(op, {}, backend, monkeypatch, grad_layout=grad_layout)
