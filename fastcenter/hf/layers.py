"""The swapped layers: a subclass per original class, made once, with the original's name (class-name lookups in
transformers, accelerate and PEFT keep working) and a marker of what it replaced. Each forward computes what the
original computes, through fastcenter's ops.

    RMSNorm     `ops.rms_norm` (same eps; Gemma's (1 + weight) as weight_offset; the output dtype as the family's)
    attention   the original forward, inside the scope where the family's `apply_rotary_pos_emb` is `ops.rope`
    MLP         `down(ops.swiglu(gate, up))`, or `ops.swiglu(gate_up)` on a packed projection; `ops.geglu` for the
                GELU activations (Gemma's gelu_pytorch_tanh)
    experts     transformers 5's mixture-of-experts `_apply_gate` (the packed [gate | up] of each routed token)
    lm_head     `nn.Linear` that, called with `fastcenter_loss=`, returns that loss of its input instead of the
                logits: the loss is computed inside the head's own call, so hooks that gather a sharded weight
                (FSDP2's `fully_shard`) run around it
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops

# transformers' activation names (ACT2FN keys) that fastcenter's gated ops compute: (op in `ops`, its keywords)
GATED_ACTIVATIONS = {
    "silu": ("swiglu", {}),
    "swish": ("swiglu", {}),
    "gelu": ("geglu", {"approximate": "none"}),
    "gelu_pytorch_tanh": ("geglu", {"approximate": "tanh"}),
}

_SUBCLASSES: dict[tuple[type, type], type] = {}


def patched_class(original: type, mixin: type, **attributes) -> type:
    key = (original, mixin)
    if key not in _SUBCLASSES:
        namespace = {"_fastcenter_original": original, **attributes}
        _SUBCLASSES[key] = type(original.__name__, (mixin, original), namespace)
    return _SUBCLASSES[key]


def swap_class(module: nn.Module, original: type, mixin: type, **attributes) -> bool:
    """Make `module` (exactly an `original`) an instance of the patched subclass; others stay as they are."""
    if type(module) is not original:
        return False
    module.__class__ = patched_class(original, mixin, **attributes)
    return True


def gated_activation(config, family) -> tuple[str, dict] | None:
    """(op name, keywords) computing the family's MLP activation times up, or None if no op of ours does."""
    return GATED_ACTIVATIONS.get(getattr(config, family.activation_config, None))


class FastRMSNorm:
    """<Family>RMSNorm with fastcenter's fused rms_norm."""

    _fastcenter_norm_output = "promote"
    _fastcenter_weight_offset = 0.0

    def forward(self, hidden_states: Tensor) -> Tensor:
        eps = getattr(self, "variance_epsilon", None)
        eps = self.eps if eps is None else eps  # Gemma's name for it
        out = ops.rms_norm(
            hidden_states, (hidden_states.shape[-1],), self.weight, eps, weight_offset=self._fastcenter_weight_offset
        )
        if self._fastcenter_norm_output == "input":  # OLMo 2, Gemma: (weight * normed).to(input dtype)
            return out
        # Llama: weight * normed.to(input dtype), the promoted dtype (float32 for a bf16 input with a float32
        # weight, as Qwen3's q/k norms see under autocast).
        dtype = torch.promote_types(hidden_states.dtype, self.weight.dtype)
        return out if out.dtype == dtype else out.to(dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fastcenter"


class FastMLP:
    """The gated MLP with fastcenter's gated op for its activation (`fastcenter_glu`: an entry of
    GATED_ACTIVATIONS, set by `patch`; None keeps the MLP's own) and optional hidden centering."""

    fastcenter_glu = None

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "gate_up_proj"):  # packed: [gate | up], which the fused ops take as it is
            gate_up = self.gate_up_proj(x)
            gate, up = (gate_up, None) if self.fastcenter_glu else gate_up.chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        hidden = _gated(self, gate, up)
        centering = getattr(self, "fastcenter_bias", None)
        if centering is not None:
            hidden = centering(hidden)
        return self.down_proj(hidden)

    def extra_repr(self) -> str:
        return "fastcenter" + (f" {self.fastcenter_glu[0]}" if self.fastcenter_glu else "")


def _gated(mlp, gate: Tensor, up: Tensor | None) -> Tensor:
    """act(gate) * up through the op in `mlp.fastcenter_glu` (up None: gate is the packed [gate | up]), or by the
    MLP's own activation."""
    if mlp.fastcenter_glu:
        name, keywords = mlp.fastcenter_glu
        return getattr(ops, name)(gate, up, **keywords)
    act = mlp.act_fn if hasattr(mlp, "act_fn") else mlp.activation_fn  # Phi-3 names it activation_fn
    return act(gate) * up


class FastExperts:
    """transformers 5's experts module: the gate of every routed token through `ops.swiglu`. transformers' grouped
    and batched expert implementations call `_apply_gate` on the packed [gate | up] projection; its eager loop
    keeps its own activation."""

    def _apply_gate(self, gate_up: Tensor) -> Tensor:
        return ops.swiglu(gate_up)

    def extra_repr(self) -> str:
        return "fastcenter swiglu"


# ---------------------------------------------------------------------------------------------------------
# RoPE: a dispatcher in place of the family's apply_rotary_pos_emb, active only inside patched attention.
# ---------------------------------------------------------------------------------------------------------


class _RopeScope:
    active = False


_ROPE_SCOPE = _RopeScope()


class _fastcenter_rope_on:
    """Plain-class context manager (as `ops.using`): torch.compile(fullgraph=True) traces it inside a forward."""

    def __enter__(self):
        self.previous = _ROPE_SCOPE.active
        _ROPE_SCOPE.active = True
        return self

    def __exit__(self, *exc):
        _ROPE_SCOPE.active = self.previous
        return False


class FastAttention:
    """The family's attention, unchanged, run inside the scope where its rotary function is fastcenter's.

    Gradient checkpointing recomputes a layer by calling it again, so the recomputation takes the same path."""

    def forward(self, *args, **kwargs):
        with _fastcenter_rope_on():
            return super().forward(*args, **kwargs)

    def extra_repr(self) -> str:
        return "fastcenter rope"


def fastcenter_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """transformers' apply_rotary_pos_emb(q, k, cos, sin) computed by `ops.rope`.

    q, k: [B, H, T, Dh] (unsqueeze_dim=1, transformers' layout) or [B, T, H, Dh] (unsqueeze_dim=2); cos, sin:
    [B or 1, T, R] with the two halves equal (every rotary module of these families concatenates the
    frequencies with themselves), in any float dtype. R = Dh, or R < Dh for a partial rotary embedding (Phi-3's
    partial_rotary_factor): the first R features rotate, the rest pass through. fastcenter's tables are
    [positions, R/2] in float32: the first half, upcast (transformers' rounded values, so the angles are exactly
    the ones it would use).

    One table row per position serves the whole batch when cos has batch 1 (position_ids of shape [1, T], the
    default). With per-row position_ids (left padding, packed sequences) the batch is folded into the position
    axis: q viewed as [1, B*T, H, Dh] and the tables as [B*T, R/2], one row per (sequence, position). Both are
    views of the projections' outputs (no copy of q or k); the result is a new [B, T, H, Dh] tensor returned in
    transformers' layout as a transposed view, in q's dtype.
    """
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    B, T, _, head_dim = q.shape
    rotary = cos.shape[-1]
    if cos.dim() == 2:  # [T, R]: one table for the batch
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    cos_half, sin_half = cos[..., : rotary // 2].float(), sin[..., : rotary // 2].float()
    q_rot, k_rot = q[..., :rotary], k[..., :rotary]
    if cos_half.shape[0] == 1:
        q_out, k_out = ops.rope(q_rot, k_rot, cos_half[0], sin_half[0])
    else:
        q_out, k_out = ops.rope(
            q_rot.reshape(1, B * T, *q_rot.shape[2:]),
            k_rot.reshape(1, B * T, *k_rot.shape[2:]),
            cos_half.reshape(B * T, rotary // 2),
            sin_half.reshape(B * T, rotary // 2),
        )
        q_out, k_out = q_out.view(q_rot.shape), k_out.view(k_rot.shape)
    if rotary < head_dim:
        q_out = torch.cat([q_out, q[..., rotary:]], dim=-1)
        k_out = torch.cat([k_out, k[..., rotary:]], dim=-1)
    if unsqueeze_dim == 1:
        q_out, k_out = q_out.transpose(1, 2), k_out.transpose(1, 2)
    return q_out, k_out


def _rope_applies(q, k, cos, sin, args, kwargs) -> bool:
    """Whether `fastcenter_rope` computes this call exactly: the layouts and tables described there."""
    if args or set(kwargs) - {"unsqueeze_dim", "position_ids"}:
        return False
    unsqueeze_dim = kwargs.get("unsqueeze_dim", 1)
    if unsqueeze_dim not in (1, 2) or q.dim() != 4 or k.dim() != 4 or cos.shape != sin.shape:
        return False
    head_dim, rotary = q.shape[-1], cos.shape[-1]
    seq_dim = 2 if unsqueeze_dim == 1 else 1
    return (
        cos.dim() in (2, 3)
        and k.shape[-1] == head_dim
        and rotary <= head_dim
        and rotary % 2 == 0
        and cos.shape[-2] == q.shape[seq_dim] == k.shape[seq_dim]
        and (cos.dim() == 2 or cos.shape[0] in (1, q.shape[0]))
        and q.dtype == k.dtype
    )


def install_rope_dispatch(modeling, prefix: str) -> None:
    """Give the family's modeling module a dispatching `apply_rotary_pos_emb` (once): `ops.rope` inside a patched
    attention module, the original everywhere else (other models of the family in the process are unaffected)."""
    current = modeling.apply_rotary_pos_emb
    if getattr(current, "_fastcenter_original", None) is not None:
        return
    original = current

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if _ROPE_SCOPE.active and _rope_applies(q, k, cos, sin, args, kwargs):
            return fastcenter_rope(q, k, cos, sin, kwargs.get("unsqueeze_dim", 1))
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._fastcenter_original = original
    apply_rotary_pos_emb.__doc__ = (
        f"fastcenter's rope inside patched attention modules, else {prefix}'s original apply_rotary_pos_emb"
    )
    modeling.apply_rotary_pos_emb = apply_rotary_pos_emb


# ---------------------------------------------------------------------------------------------------------
# The head: the fused loss computed inside the head module's own call.
# ---------------------------------------------------------------------------------------------------------


class FusedLossHead:
    """nn.Linear whose call with `fastcenter_loss=f` returns `f(input, weight, bias)` instead of the logits.

    Calling the module (rather than reading `lm_head.weight` from outside) runs its hooks: FSDP2 gathers a
    sharded weight in its pre-forward hook and again before the backward, so the fused loss sees the full weight
    wherever the logits would have."""

    def forward(self, input: Tensor, fastcenter_loss=None) -> Tensor:
        if fastcenter_loss is None:
            return nn.functional.linear(input, self.weight, self.bias)
        return fastcenter_loss(input, self.weight, self.bias)
