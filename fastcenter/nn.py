"""Modules: `RMSNorm` and `VectorCentering`.

`VectorCentering` subtracts a centre vector from activations x: [B, T, D] (for q/k/v the [B, T, H * Dh] view,
so there is one statistic per head and feature). The five modes differ in what they subtract:

| mode        | training                                             | eval                  | gradient          |
|-------------|------------------------------------------------------|-----------------------|-------------------|
| simple      | x - mean_{B,T}(x)                                    | x - running_mean      | g - mean(g)       |
| adaptive    | x - running_mean (value before this update, detached)| same                  | identity          |
| momentum    | x - mu, mu = (1-a_k) running_mean + a_k mean_{B,T}(x)| x - running_mean      | via the batch part|
| learnable   | x - c, c a parameter (zeros at init)                 | same                  | grad_c = -sum(g)  |
| causal      | x_t - (sum_{s<=t} x_s + prior * running_mean) / (t + 1 + prior), per sequence   | via prefix sums   |

Buffers `running_mean` [D] (float32) and `num_updates` are persistent (they go into checkpoints). In training
mode, and only then, every forward updates them once with the batch mean of x, whatever the mode:

    running_mean <- (1 - a_k) * running_mean + a_k * mean_{B,T}(x),    a_k = max(1 / k, momentum)

at the k-th update: an exact average for the first 1/momentum updates, then an EMA, so the zero start leaves no
bias. (For `momentum` mode this *is* mu: the update and the subtracted vector coincide.) The update runs on the
device with no host sync. Under DDP, as with BatchNorm, each rank sees its own batch and buffers are broadcast
from rank 0.

`center_for(x, residual=None)` returns what would be subtracted (a [D] vector, or [B, T, D] for `causal`) and
performs the update, so a model can hand the centre to `fastcenter.ops.center_rms_norm` and fuse the
subtraction into the norm; `forward(x)` is `x - center_for(x)`. With `residual`, statistics are those of
x + residual (the residual stream before the fused add), without forming that sum for the mean-based modes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import ops
from .ops._dispatch import is_real

CENTERING_MODES = ("simple", "adaptive", "momentum", "learnable", "causal")


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned gain, through `fastcenter.ops`.

    `norm(x)` normalises x. `norm.add_and_norm(x, residual=r, center=c)` is the pre-norm transformer's step in
    one fused pass: it forms the new residual stream `hidden = x + r - c` and returns `(norm(hidden), hidden)`.

    `autocast_output=True` is for a norm whose output only feeds linear layers: under torch.autocast the norm
    writes its output in autocast's dtype (the dtype those layers would cast it to) instead of the input's, so no
    cast runs in a kernel of its own; `hidden`, the residual stream, keeps its dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, autocast_output: bool = False):
        super().__init__()
        self.dim, self.eps, self.autocast_output = dim, eps, autocast_output
        self.weight = nn.Parameter(torch.ones(dim))

    def _out_dtype(self, x: Tensor) -> torch.dtype | None:
        if self.autocast_output and torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return None

    def forward(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, (self.dim,), self.weight, self.eps, out_dtype=self._out_dtype(x))

    def add_and_norm(self, x: Tensor, *, residual: Tensor | None = None, center: Tensor | None = None):
        """(normed, hidden) of hidden = x (+ residual) (- center): the add and the centering fused into the norm."""
        return ops.center_rms_norm(
            x, self.weight, center=center, residual=residual, eps=self.eps, out_dtype=self._out_dtype(x)
        )

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}" + (", autocast_output=True" if self.autocast_output else "")


class VectorCentering(nn.Module):
    """Subtract a centre vector from x [..., D]; see the module docstring for the modes."""

    def __init__(self, dim: int, mode: str = "adaptive", momentum: float = 0.1, prior: float = 8.0):
        super().__init__()
        if mode not in CENTERING_MODES:
            raise ValueError(f"mode must be one of {CENTERING_MODES}, got {mode!r}")
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not is_real(momentum) or not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be a number in (0, 1], got {momentum!r}")
        if not is_real(prior) or not 0.0 <= prior < math.inf:
            raise ValueError(f"prior must be a finite number >= 0, got {prior!r}")
        self.dim, self.mode, self.momentum, self.prior = dim, mode, float(momentum), float(prior)
        self.register_buffer("running_mean", torch.zeros(dim, dtype=torch.float32))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # Zeros at init; the model keeps it out of weight decay (it is a 1-D parameter).
        self.center = nn.Parameter(torch.zeros(dim)) if mode == "learnable" else None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The state at construction: zero statistics (running_mean, num_updates) and a zero learnable centre."""
        self.running_mean.zero_()
        self.num_updates.zero_()
        if self.center is not None:
            self.center.zero_()

    def _batch_mean(self, x: Tensor, residual: Tensor | None) -> Tensor:
        """mean over all leading dims of (x + residual), in float32, keeping the graph."""
        dims = tuple(range(x.dim() - 1))
        mean = x.float().mean(dims)
        if residual is not None:
            mean = mean + residual.float().mean(dims)
        return mean

    @torch.no_grad()
    def _update(self, batch_mean: Tensor) -> None:
        self.num_updates += 1
        alpha = (1.0 / self.num_updates.float()).clamp(min=self.momentum)
        # In the buffer's dtype: float32 unless the whole module was cast (model.to(torch.bfloat16)).
        dtype = self.running_mean.dtype
        self.running_mean.lerp_(batch_mean.detach().to(dtype), alpha.to(dtype))

    def center_for(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """The vector (or, for causal, per-token tensor) to subtract from x (+ residual); updates buffers."""
        if x.dim() < 2:  # no tokens to average over: a mean over "the leading dims" would average the features
            raise ValueError(f"x must have shape [..., D] with at least one leading dim (tokens), got {tuple(x.shape)}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dim {self.dim}, got shape {tuple(x.shape)}")
        if residual is not None and residual.shape != x.shape:
            raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
        # An empty batch has no statistics (its mean is 0/0): centred as in eval, nothing updated.
        if not self.training or x.numel() == 0:
            return self._eval_center(x, residual)

        # Read running_mean before this forward's update (clone: the update below is in place).
        stale = self.running_mean.clone()
        needs_graph = self.mode in ("simple", "momentum")
        batch_mean = self._batch_mean(x, residual) if needs_graph else self._batch_mean(x.detach(), residual)
        if self.mode == "simple":
            center = batch_mean
        elif self.mode == "momentum":
            alpha = (1.0 / (self.num_updates.float() + 1.0)).clamp(min=self.momentum)
            center = (1.0 - alpha) * stale + alpha * batch_mean
        elif self.mode == "adaptive":
            center = stale
        elif self.mode == "learnable":
            center = self.center
        else:
            center = self._causal_center(x, residual, stale)
        self._update(batch_mean)
        return center

    def _eval_center(self, x: Tensor, residual: Tensor | None) -> Tensor:
        if self.mode == "learnable":
            return self.center
        if self.mode == "causal":
            return self._causal_center(x, residual, self.running_mean)
        return self.running_mean

    def _causal_center(self, x: Tensor, residual: Tensor | None, running_mean: Tensor) -> Tensor:
        """(sum_{s<=t} x_s + prior * running_mean) / (t + 1 + prior) along dim -2, in float32."""
        s = x.float() if residual is None else x.float() + residual.float()
        prefix = s.cumsum(dim=-2)
        T = x.shape[-2]
        count = torch.arange(1, T + 1, device=x.device, dtype=torch.float32) + self.prior
        return (prefix + self.prior * running_mean.detach()) / count[:, None]

    def forward(self, x: Tensor) -> Tensor:
        return (x.float() - self.center_for(x)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, mode={self.mode!r}, momentum={self.momentum}, prior={self.prior}"
