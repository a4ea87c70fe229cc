"""The study's own centering code, attached to a model from outside: the mechanism probe and the leak control.

The probe. `recording(model)` wraps `center_for` on every centering module *instance* (the one method through
which both the model and the module's `forward` reach the centre), so that each call also leaves what the
centering did to that batch; leaving the context removes the wrappers. The library's
`fastcenter.nn.VectorCentering` carries no measurement of its own. Per module, as floats (L2 norms of D-vectors):

    stream_rms     sqrt(mean over tokens of |s_t|^2), s = x (+ residual): the size of one activation
    mean_before    |mean over tokens of s|: the common component centering is meant to remove
    mean_after     |mean over tokens of (s - centre)|: what is left of it after centering
    running_mean   |running_mean| as this forward read it (before its own update); absent for a module that
                   keeps no running statistics

The leak control. `NaiveCentering` is the centering a quick implementation would write: subtract the mean over
the whole batch and sequence, in training *and in evaluation*, with no running statistics. In training it is
exactly `simple` mode (same centre, same gradient; `simple` only adds a running mean that training never reads),
so a naive run trains the very weights of the simple run of its seed. In evaluation a token's output then depends
on later tokens and on the other sequences of the batch: the validation loss it reports is not a language
model's loss, and any "gain" it shows over the baseline is the leak's. `use_naive_centering(model)` swaps it in
for every `VectorCentering` of a model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..nn import VectorCentering
from ..training import preserved


class NaiveCentering(nn.Module):
    """x - mean_{B,T}(x) in training and in evaluation alike, the gradient through the mean; no state."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def center_for(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """The mean over all leading dims of x (+ residual), in float32, keeping the graph."""
        dims = tuple(range(x.dim() - 1))
        mean = x.float().mean(dims)
        if residual is not None:
            mean = mean + residual.float().mean(dims)
        return mean

    def forward(self, x: Tensor) -> Tensor:
        return (x.float() - self.center_for(x)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}"


CENTERING_MODULES = (VectorCentering, NaiveCentering)


def centering_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{qualified name: module} of every centering module of `model`, in `named_modules` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CENTERING_MODULES)}


def use_naive_centering(model: nn.Module) -> nn.Module:
    """Replace every VectorCentering of `model` by a NaiveCentering of the same width (in place); returns it."""
    for name, module in list(model.named_modules()):
        if isinstance(module, VectorCentering):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, NaiveCentering(module.dim))
    return model


@torch.no_grad()
def centering_stats(x: Tensor, residual: Tensor | None, center: Tensor, running_mean: Tensor | None) -> dict:
    """What one centering did to one batch, as 0-dim float32 tensors (see the module docstring)."""
    s = x.float() if residual is None else x.float() + residual.float()
    dims = tuple(range(s.dim() - 1))
    stats = {
        "stream_rms": s.pow(2).sum(-1).mean().sqrt(),
        "mean_before": s.mean(dims).norm(),
        "mean_after": (s - center.float()).mean(dims).norm(),
    }
    if running_mean is not None:
        stats["running_mean"] = running_mean.float().norm()
    return stats


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[dict]:
    """Within the context, every centering call of `model` stores its `centering_stats` in the yielded dict
    (module name -> stats of its latest call)."""
    stats: dict[str, dict] = {}
    modules = centering_modules(model)

    def wrap(name: str, module: nn.Module):
        center_for = module.center_for  # the bound method of the class

        def recorded(x: Tensor, residual: Tensor | None = None) -> Tensor:
            running = getattr(module, "running_mean", None)
            running = None if running is None else running.clone()  # the value this call reads, before its update
            center = center_for(x, residual)
            stats[name] = centering_stats(x, residual, center, running)
            return center

        return recorded

    for name, module in modules.items():
        module.center_for = wrap(name, module)  # an instance attribute shadows the method
    try:
        yield stats
    finally:
        for module in modules.values():
            del module.center_for


@torch.no_grad()
def measure_mechanisms(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, dict[str, float]]:
    """Per centering module, what it does to one batch in training mode (the view training has), the model left
    exactly as it was (buffers and mode restored)."""
    modules = centering_modules(model)
    if not modules:
        return {}
    with preserved(model, training=True) as reset, recording(model) as stats:
        reset()
        model(x, y)
    return {name: {key: float(v) for key, v in stats[name].items()} for name in modules if name in stats}
