"""fastcenter in a Hugging Face transformers causal LM, in one line:

    from fastcenter.hf import patch
    model = patch(AutoModelForCausalLM.from_pretrained(name))            # or patch(model, center=("embeddings",))

`patch(model)` swaps fastcenter's ops into an instantiated Llama, Mistral, Qwen2 or Qwen3 causal LM in place and
returns it; `patch_model_type("llama")` does the same to every model of that type built afterwards
(`from_pretrained`, `from_config`, or the class itself). transformers is an optional extra (`pip install
"fastcenter[hf]"`); this module imports it only when a function here is called.

What is swapped, and how. transformers marks its replaceable layers for its kernel hub: the `<Family>RMSNorm`
class is the hub's "RMSNorm" layer and `apply_rotary_pos_emb` its "rotary_pos_emb" function. The hub itself needs
the separate `kernels` package and kernels published as hub repositories, so fastcenter does by hand what
`kernels.kernelize` does with those same two names, and replaces a forward only where no hook exists:

    rms_norm   every <Family>RMSNorm module (the final norm, the two per layer, Qwen3's q/k norms) becomes a
               subclass whose forward is `ops.rms_norm` (same eps, same output dtype). Parameters, state-dict
               keys and the class name do not change; the repr shows "fastcenter".
    rope       the family's `apply_rotary_pos_emb` gets a dispatcher. It calls `ops.rope` inside a patched
               attention module and the original function everywhere else, so other models of the same family
               in the process are unaffected. The patched attention module is a subclass whose forward only
               opens that scope around the original forward. transformers' own cos/sin tables are used
               ([B, T, Dh], halves duplicated, in the model dtype, after any rope scaling), so scaled RoPE
               variants and per-row `position_ids` are honoured (see `_fastcenter_rope`).
    swiglu     the MLP (`down(act(gate(x)) * up(x))`, which has no kernel-hub name) becomes
               `down(ops.swiglu(gate(x), up(x)))`, only where `config.hidden_act` is SiLU.
    loss       the causal LM's forward: with `labels`, in training, `ops.linear_cross_entropy` runs on the last
               hidden state, so the [N, V] logits are never formed and `logits` is None. This is the one place
               where nothing but a new forward can keep the logits from being materialized.
    center     `fastcenter.nn.VectorCentering` at the placements in CENTER_PLACEMENTS (see `patch`).

Nothing else in the model's code runs differently: attention, masks, caches, gradient checkpointing and
`generate` are transformers' own. The logits are formed as before in eval mode (Trainer.evaluate and metrics
use them), without labels (generation), and when asked for with `return_logits=True`.

Limits, each either handled or refused with a message saying why:

- lm_head: the fused loss needs `x @ W.T + b`. A plain nn.Linear gives that; a PEFT LoRA layer on it (plain
  LoRA, no dropout in effect) gives W + scaling * B @ A, through which A and B get their gradients. Anything
  else (modules_to_save copies, DoRA, LoRA dropout, quantized layers, forward hooks as FSDP and DeepSpeed
  install) falls back to the model's own forward, with a warning: the logits are formed, the gradients are
  right. No wrapper is ever silently bypassed.
- Causal centering averages each position's prefix, pad positions included: with right padding (the usual for
  training) real tokens never see a pad, but in a left-padded batch the first real tokens' centre includes the
  pads. The running mean that every mode keeps averages all positions, pads included. Causal centering cannot
  continue from a key/value cache (the step sees only the new tokens), so a cached step raises: generate with
  `use_cache=False`.
- center=("values" or "mlp") with gradient checkpointing raises: the recomputation would update the running
  mean a second time and centre with the updated one. "embeddings" is outside the checkpointed layers.
- Cast the model (`.to(torch.bfloat16)`) before patching with `center=`, so that the centering statistics
  stay float32 (a later cast makes them bf16, as it does BatchNorm's; they still update, at bf16 precision).
- Patch after `resize_token_embeddings` (it builds a new embedding module, without the centering hook), and
  patch the PEFT model rather than its base before `get_peft_model` if the values are centred (a hook on the
  base v_proj would centre the base projection without the LoRA update).
- With every label ignored, transformers' mean is 0/0 = NaN; linear_cross_entropy returns 0 (no gradient).
- Patched modules are instances of classes made at run time: `torch.save(model)` (pickling the module
  objects) is not supported; `state_dict()` and `save_pretrained` are, with the unpatched model's keys (plus
  `fastcenter_centering` buffers where centering was added). `copy.deepcopy(model)` gives a patched copy.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .nn import CENTERING_MODES, VectorCentering

# The model types `patch` accepts, mapped to the class-name prefix transformers uses in their modeling modules.
SUPPORTED_MODEL_TYPES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}

# The oldest transformers release the tests cover (.ci/run checks it beside the newest).
MIN_TRANSFORMERS_VERSION = "4.57"

# Where `center=` can put a VectorCentering:
#   "embeddings"  the token embeddings (embed_tokens' output), before the first layer
#   "values"      each attention's value projection (v_proj's output, [B, T, kv_heads * head_dim])
#   "mlp"         each MLP's hidden activation, between the gated product and down_proj
CENTER_PLACEMENTS = ("embeddings", "values", "mlp")

# The centering mode `patch` uses unless told otherwise: the one place to change it.
# "simple", the mode the centering study found well-behaved (bench/results/centering/cpu-dim256): in training it
# subtracts the batch's own mean, so the gradient sees the centering and the mean entering each centring stays
# bounded; in eval it subtracts the running mean (generation with a key/value cache works). "adaptive" (a stale,
# detached running mean) let the means run away, and in the modes pilot (bench/results/centering/pilot-modes) so
# did "momentum", and "causal" in the deeper blocks (its prior is a detached running mean). The price: in
# training a position's centre averages the whole batch, later tokens included -- BatchNorm's leak, which the
# study measures and which eval mode does not have. centering_mode="causal" is the leak-free choice.
DEFAULT_CENTERING_MODE = "simple"

_SILU_ACTIVATIONS = ("silu", "swish")


# ---------------------------------------------------------------------------------------------------------
# Families: where a model type's classes and its rotary function live.
# ---------------------------------------------------------------------------------------------------------


def _require_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            'fastcenter.hf needs transformers: pip install "fastcenter[hf]" (or pip install transformers)'
        ) from exc
    return transformers


def _supported() -> str:
    return ", ".join(SUPPORTED_MODEL_TYPES)


@dataclasses.dataclass(frozen=True)
class _Family:
    model_type: str
    prefix: str

    @property
    def modeling(self):
        _require_transformers()
        return importlib.import_module(f"transformers.models.{self.model_type}.modeling_{self.model_type}")

    def cls(self, suffix: str) -> type:
        """The family's class `<Prefix><suffix>` (e.g. LlamaRMSNorm) as transformers defines it."""
        return getattr(self.modeling, self.prefix + suffix)


def _family(model_type: str) -> _Family:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"fastcenter.hf supports the model types {_supported()}; got model_type={model_type!r}")
    return _Family(model_type, SUPPORTED_MODEL_TYPES[model_type])


def _family_of(model: nn.Module) -> _Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"fastcenter.hf supports the model types {_supported()}; got {type(model).__name__} with "
            f"model_type={model_type!r}"
        )
    family = _family(model_type)
    causal_lm = family.cls("ForCausalLM")
    if not isinstance(model, causal_lm):
        raise ValueError(
            f"patch takes a causal LM ({causal_lm.__name__}, e.g. from AutoModelForCausalLM), "
            f"got {type(model).__name__}"
        )
    return family


# ---------------------------------------------------------------------------------------------------------
# Swapped classes: a subclass per original class, created once, with the original's name (class-name lookups
# in transformers, accelerate and PEFT keep working) and a marker of what it replaced.
# ---------------------------------------------------------------------------------------------------------

_SUBCLASSES: dict[tuple[type, type], type] = {}


def _patched_class(original: type, mixin: type) -> type:
    key = (original, mixin)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(original.__name__, (mixin, original), {"_fastcenter_original": original})
    return _SUBCLASSES[key]


def _swap_class(module: nn.Module, original: type, mixin: type) -> None:
    """Make `module` (exactly an `original`) an instance of the patched subclass; patched modules stay as they are."""
    if type(module) is original:
        module.__class__ = _patched_class(original, mixin)


class _FastRMSNorm:
    """<Family>RMSNorm with fastcenter's fused rms_norm; output dtype as transformers' (weight * normed)."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        out = ops.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.variance_epsilon)
        # transformers returns weight * normed.to(input dtype): the promoted dtype (float32 for a bf16 input
        # with a float32 weight, as Qwen3's q/k norms see under autocast).
        dtype = torch.promote_types(hidden_states.dtype, self.weight.dtype)
        return out if out.dtype == dtype else out.to(dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fastcenter"


class _FastMLP:
    """The gated MLP with fastcenter's swiglu (when the activation is SiLU) and optional hidden centering."""

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if getattr(self, "fastcenter_swiglu", False):
            hidden = ops.swiglu(gate, up)
        else:
            hidden = self.act_fn(gate) * up
        centering = getattr(self, "fastcenter_centering", None)
        if centering is not None:
            hidden = centering(hidden)
        return self.down_proj(hidden)

    def extra_repr(self) -> str:
        parts = ["fastcenter"] + (["swiglu"] if getattr(self, "fastcenter_swiglu", False) else [])
        return " ".join(parts)


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


class _FastAttention:
    """The family's attention, unchanged, run inside the scope where its rotary function is fastcenter's.

    Gradient checkpointing recomputes a layer by calling it again, so the recomputation takes the same path."""

    def forward(self, *args, **kwargs):
        with _fastcenter_rope_on():
            return super().forward(*args, **kwargs)

    def extra_repr(self) -> str:
        return "fastcenter rope"


def _fastcenter_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """transformers' apply_rotary_pos_emb(q, k, cos, sin) computed by `ops.rope`.

    q, k: [B, H, T, Dh] (unsqueeze_dim=1, transformers' layout) or [B, T, H, Dh] (unsqueeze_dim=2); cos, sin:
    [B or 1, T, Dh] with the two halves equal (every rotary module of these families concatenates the
    frequencies with themselves), in any float dtype. fastcenter's tables are [positions, Dh/2] in float32: the
    first half, upcast (transformers' rounded values, so the angles are exactly the ones it would use).

    One table row per position serves the whole batch when cos has batch 1 (position_ids of shape [1, T], the
    default). With per-row position_ids (left padding, packed sequences) the batch is folded into the position
    axis: q viewed as [1, B*T, H, Dh] and the tables as [B*T, Dh/2], one row per (sequence, position). Both are
    views of the projections' outputs (no copy of q or k); the result is a new contiguous [B, T, H, Dh] tensor
    returned in transformers' layout as a transposed view, in q's dtype.
    """
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    B, T, _, head_dim = q.shape
    half = head_dim // 2
    if cos.dim() == 2:  # [T, Dh]: one table for the batch
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    cos_half, sin_half = cos[..., :half].float(), sin[..., :half].float()
    if cos_half.shape[0] == 1:
        q_out, k_out = ops.rope(q, k, cos_half[0], sin_half[0])
    else:
        q_out, k_out = ops.rope(
            q.reshape(1, B * T, *q.shape[2:]),
            k.reshape(1, B * T, *k.shape[2:]),
            cos_half.reshape(B * T, half),
            sin_half.reshape(B * T, half),
        )
        q_out, k_out = q_out.view(q.shape), k_out.view(k.shape)
    if unsqueeze_dim == 1:
        q_out, k_out = q_out.transpose(1, 2), k_out.transpose(1, 2)
    return q_out, k_out


def _rope_applies(q, k, cos, sin, args, kwargs) -> bool:
    """Whether `_fastcenter_rope` computes this call exactly: the layouts and tables described there."""
    if args or set(kwargs) - {"unsqueeze_dim", "position_ids"}:
        return False
    unsqueeze_dim = kwargs.get("unsqueeze_dim", 1)
    if unsqueeze_dim not in (1, 2) or q.dim() != 4 or k.dim() != 4 or cos.shape != sin.shape:
        return False
    head_dim = q.shape[-1]
    seq_dim = 2 if unsqueeze_dim == 1 else 1
    return (
        cos.dim() in (2, 3)
        and cos.shape[-1] == head_dim == k.shape[-1]
        and head_dim % 2 == 0
        and cos.shape[-2] == q.shape[seq_dim] == k.shape[seq_dim]
        and (cos.dim() == 2 or cos.shape[0] in (1, q.shape[0]))
        and q.dtype == k.dtype
    )


def _install_rope_dispatch(family: _Family) -> None:
    modeling = family.modeling
    current = modeling.apply_rotary_pos_emb
    if getattr(current, "_fastcenter_original", None) is not None:
        return
    original = current

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if _ROPE_SCOPE.active and _rope_applies(q, k, cos, sin, args, kwargs):
            return _fastcenter_rope(q, k, cos, sin, kwargs.get("unsqueeze_dim", 1))
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._fastcenter_original = original
    apply_rotary_pos_emb.__doc__ = (
        f"fastcenter's rope inside patched attention modules, else {family.prefix}'s original apply_rotary_pos_emb"
    )
    modeling.apply_rotary_pos_emb = apply_rotary_pos_emb


# ---------------------------------------------------------------------------------------------------------
# Centering placements.
# ---------------------------------------------------------------------------------------------------------


def _center_output_hook(module: nn.Module, args, output: Tensor) -> Tensor:
    """Forward hook: the module's output minus its centre (the VectorCentering is the module's child, so the
    hook holds no reference of its own and deep copies of the model stay consistent)."""
    return module.fastcenter_centering(output)


def _new_centering(dim: int, mode: str, like: Tensor) -> VectorCentering:
    return VectorCentering(dim, mode).to(device=like.device)


def _attach_centering(module: nn.Module, dim: int, mode: str, like: Tensor, *, hook: bool) -> bool:
    """Give `module` a VectorCentering child (and, with `hook`, a forward hook applying it to its output).
    An existing one is kept with its statistics; a different mode is refused. Returns whether one was added."""
    existing = getattr(module, "fastcenter_centering", None)
    if existing is not None:
        if existing.mode != mode:
            raise ValueError(
                f"this model is already centred in mode {existing.mode!r} here; patching again with "
                f"centering_mode={mode!r} would discard its running statistics (reload the model to change modes)"
            )
        return False
    module.fastcenter_centering = _new_centering(dim, mode, like)
    if hook:
        module.register_forward_hook(_center_output_hook)
    return True


# ---------------------------------------------------------------------------------------------------------
# The loss: the causal LM's forward, with labels, without logits.
# ---------------------------------------------------------------------------------------------------------


def _is_plain_linear(module) -> bool:
    """An nn.Linear whose call computes exactly x @ W.T + b: nn.Linear's own forward, no instance forward
    (accelerate's device hooks set one), no forward hooks (FSDP and DeepSpeed gather parameters in them)."""
    return (
        isinstance(module, nn.Linear)
        and type(module).forward is nn.Linear.forward
        and "forward" not in module.__dict__
        and not module._forward_hooks
        and not module._forward_pre_hooks
    )


def _lora_linear(head) -> tuple[Tensor, Tensor | None] | None:
    """(weight, bias) of a PEFT LoRA-wrapped linear as one matrix, W + sum_a scaling_a * B_a @ A_a, where that
    is exactly what its forward computes (plain LoRA, no dropout in effect, no DoRA or other variant, unmerged
    or merged); None otherwise. Gradients reach A and B through the sum."""
    cls = type(head)
    if not (cls.__module__.startswith("peft.tuners.lora") and cls.__name__ == "Linear"):
        return None  # quantized and other LoRA layers compute something else
    needed = ("base_layer", "lora_A", "lora_B", "lora_dropout", "scaling", "active_adapters", "merged")
    if not all(hasattr(head, name) for name in needed) or "forward" in head.__dict__:
        return None
    if head._forward_hooks or head._forward_pre_hooks or getattr(head, "fan_in_fan_out", False):
        return None
    base = head.base_layer
    if not _is_plain_linear(base):
        return None
    disabled = getattr(head, "disable_adapters", False)
    if disabled or head.merged:
        return (base.weight, base.bias) if not (disabled and head.merged) else None
    weight = base.weight
    variants = getattr(head, "lora_variant", {}) or {}
    use_dora = getattr(head, "use_dora", {}) or {}
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        lora_a, lora_b, dropout = head.lora_A[name], head.lora_B[name], head.lora_dropout[name]
        if name in variants or use_dora.get(name, False):
            return None
        plain = _is_plain_linear(lora_a) and _is_plain_linear(lora_b)
        if not plain or lora_a.bias is not None or lora_b.bias is not None:
            return None
        no_dropout = isinstance(dropout, nn.Identity) or (
            isinstance(dropout, nn.Dropout) and (dropout.p == 0 or not dropout.training)
        )
        if not no_dropout:
            return None
        weight = weight + head.scaling[name] * (lora_b.weight @ lora_a.weight)
    return weight, base.bias


def _head_linear(model) -> tuple[Tensor, Tensor | None] | None:
    head = model.lm_head
    if _is_plain_linear(head):
        return head.weight, head.bias
    return _lora_linear(head)


def _slice_logits_to_keep_4x(hidden: Tensor, logits_to_keep) -> Tensor:
    """transformers 4.x's slicing: an int keeps the last ones (0: all), a tensor indexes positions."""
    index = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return hidden[:, index, :]


def _slice_logits_to_keep():
    """The positions whose logits the unpatched forward forms: transformers' own helper where it has one.
    (Resolved at patch time: torch.compile cannot trace the ImportError of a failed import.)"""
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        return _slice_logits_to_keep_4x
    return slice_logits_to_keep


def _causal_lm_forward(self, *args, **kwargs):
    """The patched causal LM forward (bound to the model instance by `patch`).

    Checks the centering's limits, then: with `labels` in training (or `return_logits=False`) and a plain or
    LoRA linear lm_head, the loss is `ops.linear_cross_entropy` on the last hidden state and `logits` is None;
    in every other case the original forward runs (so eval, generation and `return_logits=True` are
    transformers' own). `return_logits` is the one argument the original does not have.
    """
    state = self._fastcenter_hf
    named = dict(zip(state["parameters"], args))
    for key, value in kwargs.items():
        if key in named:
            raise TypeError(f"forward() got multiple values for argument {key!r}")
        named[key] = value
    return_logits = named.pop("return_logits", None)
    _check_centering_limits(self, state, named)

    labels = named.get("labels")
    if return_logits is None:
        return_logits = not self.training
    if labels is None or return_logits or not state["linear_cross_entropy"]:
        return state["forward"](**named)
    head = _head_linear(self)
    if head is None:
        if not state.get("warned_head"):
            state["warned_head"] = True
            warnings.warn(
                f"fastcenter.hf: lm_head is a {type(self.lm_head).__module__}.{type(self.lm_head).__qualname__}, "
                "not a plain linear map (or a plain LoRA on one) that linear_cross_entropy can differentiate "
                "through: the logits are formed and its own forward computes the loss (correct gradients, no "
                "memory saving)",
                stacklevel=2,
            )
        return state["forward"](**named)
    return _fused_loss_forward(self, named, *head)


def _fused_loss_forward(self, named: dict, weight: Tensor, bias: Tensor | None):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return_dict = named.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    labels = named.pop("labels")
    logits_to_keep = named.pop("logits_to_keep", 0)
    # As transformers' forward: every other argument, loss keywords included, goes to the base model.
    outputs = getattr(self, self.base_model_prefix)(**named)
    hidden = self._fastcenter_hf["slice_logits_to_keep"](outputs.last_hidden_state, logits_to_keep)

    # transformers' ForCausalLMLoss: labels shifted left by one (padded with ignore_index) unless shift_labels
    # is given; mean over non-ignored targets, or sum / num_items_in_batch when the Trainer passes it (so
    # gradient accumulation weighs every token equally).
    ignore_index = named.get("ignore_index", -100)
    shift_labels = named.get("shift_labels")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.reshape(-1).to(hidden.device)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    num_items = named.get("num_items_in_batch")
    reduction = "mean" if num_items is None else "sum"
    loss = ops.linear_cross_entropy(
        hidden, weight, target, linear_bias=bias, reduction=reduction, ignore_index=ignore_index
    )
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)

    fields = self._fastcenter_hf["output_fields"]
    rest = {key: value for key, value in outputs.items() if key in fields and key not in ("loss", "logits")}
    output = CausalLMOutputWithPast(loss=loss, logits=None, **rest)
    return output if return_dict else output.to_tuple()


def _is_checkpointing(model) -> bool:
    # transformers 5 renamed the property (the old name warns on every read)
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def _check_centering_limits(model, state: dict, named: dict) -> None:
    """Refuse, with the reason, the two cases where a centering placement would silently compute something else."""
    placements = state["center"]
    if not placements:
        return
    inner = [p for p in placements if p != "embeddings"]
    if inner and model.training and torch.is_grad_enabled() and _is_checkpointing(model):
        raise NotImplementedError(
            f"fastcenter.hf: center={tuple(inner)} with gradient checkpointing: recomputing a layer would run its "
            "centering again, updating the running mean twice and recomputing the centre from the updated one. "
            "Disable gradient checkpointing, or centre only the embeddings (outside the checkpointed layers)."
        )
    if state["centering_mode"] == "causal":
        cache = named.get("past_key_values")
        if cache is None:
            cache = named.get("cache")  # transformers 5's name
        cached = cache.get_seq_length() if hasattr(cache, "get_seq_length") else (len(cache) if cache else 0)
        if cached:
            raise NotImplementedError(
                "fastcenter.hf: causal centering subtracts the mean of each position's whole prefix, which a "
                "step that sees only new tokens after a key/value cache cannot form. Generate with "
                "use_cache=False, or centre in a mode without position dependence."
            )


# ---------------------------------------------------------------------------------------------------------
# The public functions.
# ---------------------------------------------------------------------------------------------------------


def patch(
    model,
    *,
    rms_norm: bool = True,
    rope: bool = True,
    swiglu: bool = True,
    linear_cross_entropy: bool = True,
    center=(),
    centering_mode: str = DEFAULT_CENTERING_MODE,
):
    """Swap fastcenter's ops (and, with `center`, vector centering) into a transformers causal LM in place.

    model: a LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM (or a PEFT model
        around one: its base model is patched). Returns `model`.
    rms_norm, rope, swiglu, linear_cross_entropy: which ops to swap in (see the module docstring).
    center: placements from CENTER_PLACEMENTS ("embeddings", "values", "mlp") that get a
        `fastcenter.nn.VectorCentering(dim, centering_mode)`, on the model's device, float32 statistics.
    centering_mode: one of fastcenter.nn.CENTERING_MODES; default DEFAULT_CENTERING_MODE.

    Patching only adds: a second call with the same arguments changes nothing (no second hook, centering
    statistics kept), and a flag set to False leaves that part as it is. Errors: ValueError for a model type
    other than the supported ones (naming them), a model that is not a causal LM, an unknown placement or mode.
    """
    base = model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}")
    transformers = _require_transformers()
    if not isinstance(model, transformers.PreTrainedModel) and hasattr(model, "get_base_model"):  # PEFT
        base = model.get_base_model()
    family = _family_of(base)
    center = (center,) if isinstance(center, str) else tuple(center)
    unknown = [p for p in center if p not in CENTER_PLACEMENTS]
    if unknown:
        raise ValueError(f"center placements must be among {CENTER_PLACEMENTS}, got {unknown}")
    if centering_mode not in CENTERING_MODES:
        raise ValueError(f"centering_mode must be one of {CENTERING_MODES}, got {centering_mode!r}")

    state = _install_forward(base)
    if rms_norm:
        norm_cls = family.cls("RMSNorm")
        for module in base.modules():
            _swap_class(module, norm_cls, _FastRMSNorm)
    if rope:
        _install_rope_dispatch(family)
        attention_cls = family.cls("Attention")
        for module in base.modules():
            _swap_class(module, attention_cls, _FastAttention)
    mlp_cls = family.cls("MLP")
    mlps = [m for m in base.modules() if isinstance(m, mlp_cls)]
    silu = getattr(base.config, "hidden_act", None) in _SILU_ACTIVATIONS
    if swiglu and not silu:
        warnings.warn(
            f"fastcenter.hf: hidden_act={base.config.hidden_act!r} is not SiLU, so the MLPs keep their activation "
            "(swiglu computes silu(gate) * up)",
            stacklevel=2,
        )
    if (swiglu and silu) or "mlp" in center:
        for mlp in mlps:
            _swap_class(mlp, mlp_cls, _FastMLP)
            if swiglu and silu:
                mlp.fastcenter_swiglu = True
    if linear_cross_entropy:
        state["linear_cross_entropy"] = True

    inner = getattr(base, base.base_model_prefix)
    if "embeddings" in center:
        embed = inner.embed_tokens
        _attach_centering(embed, embed.embedding_dim, centering_mode, embed.weight, hook=True)
    if "values" in center:
        for module in base.modules():
            if isinstance(module, family.cls("Attention")):
                v_proj = module.v_proj
                _attach_centering(v_proj, v_proj.out_features, centering_mode, v_proj.weight, hook=True)
    if "mlp" in center:
        for mlp in mlps:
            _attach_centering(mlp, mlp.down_proj.in_features, centering_mode, mlp.down_proj.weight, hook=False)
    if center:
        if state["center"] and state["centering_mode"] != centering_mode:
            raise ValueError(
                f"this model is already centred in mode {state['centering_mode']!r}; "
                f"reload it to use {centering_mode!r}"
            )
        state["center"] = tuple(dict.fromkeys(state["center"] + center))
        state["centering_mode"] = centering_mode
    return model


def _install_forward(model) -> dict:
    """Bind the patched forward to this instance once; returns its state (kept on the model, so copies of the
    model carry their own)."""
    state = model.__dict__.get("_fastcenter_hf")
    if state is not None:
        return state
    original = model.forward  # bound: the class's forward, or an instance wrapper installed before us
    parameters = [
        name
        for name, p in inspect.signature(original).parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    from transformers.modeling_outputs import CausalLMOutputWithPast

    state = {
        "forward": original,
        # (read here, not in the forward: torch.compile cannot trace dataclasses.fields of this class)
        "output_fields": frozenset(f.name for f in dataclasses.fields(CausalLMOutputWithPast)),
        "slice_logits_to_keep": _slice_logits_to_keep(),
        "parameters": parameters,
        "linear_cross_entropy": False,
        "center": (),
        "centering_mode": None,
    }
    model._fastcenter_hf = state
    model.forward = _BoundForward(model, original)
    return state


class _BoundForward:
    """`model.forward` after patching: calls `_causal_lm_forward(model, ...)` and shows the original's signature.

    A small callable class rather than a bound method so that copy.deepcopy(model) rebinds it to the copy
    (through the memo) and inspect.signature sees the original's parameters (Trainer looks for **kwargs there
    to decide whether to pass num_items_in_batch; generate looks for logits_to_keep)."""

    def __init__(self, model, original):
        self.__self__ = model
        self.__wrapped__ = original
        functools.update_wrapper(self, original, updated=())

    def __call__(self, *args, **kwargs):
        return _causal_lm_forward(self.__self__, *args, **kwargs)

    @property
    def __func__(self):
        return _causal_lm_forward


def patch_model_type(model_type: str, *, rms_norm: bool = True, rope: bool = True, swiglu: bool = True,
                     linear_cross_entropy: bool = True, center=()) -> None:
    """Patch every causal LM of `model_type` constructed from now on (from_pretrained, from_config, or the class
    itself): its `__init__` ends with `patch(self, ...)`, before any weights are loaded (the swaps keep every
    parameter name, so loading is unaffected). Calling it again replaces the options; `unpatch_model_type`
    undoes it for models built later.

    Centering is refused here: it adds running statistics that a pretrained checkpoint does not have, which
    `from_pretrained` would report missing and initialise by its own rules. Patch the loaded model instead:
    `patch(model, center=(...))`.
    """
    center = (center,) if isinstance(center, str) else tuple(center)
    if center:
        raise ValueError(
            "patch_model_type does not centre: centering adds running statistics that a checkpoint does not "
            "have. Load the model, then call patch(model, center=...)"
        )
    family = _family(model_type)
    cls = family.cls("ForCausalLM")
    options = dict(rms_norm=rms_norm, rope=rope, swiglu=swiglu, linear_cross_entropy=linear_cross_entropy)
    original_init = cls.__dict__["__init__"]
    original_init = getattr(original_init, "_fastcenter_original", original_init)

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if type(self) is cls:  # not a user subclass that may build its own head
            patch(self, **options)

    __init__._fastcenter_original = original_init
    cls.__init__ = __init__


def unpatch_model_type(model_type: str) -> None:
    """Undo `patch_model_type`: models of this type built from now on are transformers' own again (models
    already built keep their patch)."""
    cls = _family(model_type).cls("ForCausalLM")
    current = cls.__dict__["__init__"]
    original = getattr(current, "_fastcenter_original", None)
    if original is not None:
        cls.__init__ = original


__all__ = [
    "patch",
    "patch_model_type",
    "unpatch_model_type",
    "SUPPORTED_MODEL_TYPES",
    "CENTER_PLACEMENTS",
    "DEFAULT_CENTERING_MODE",
]
