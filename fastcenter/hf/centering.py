"""Vector centering in a transformers model: the placements, how each follows the module it centres, how its
statistics are saved, loaded and initialised, and the two cases that are refused.

A placement is a `fastcenter.nn.VectorCentering` child named `fastcenter_bias` (the centre it subtracts is a
bias, and the name keeps a learnable centre out of Trainer's weight decay, as Trainer keeps every parameter whose
name contains "bias"). "embeddings" and "values" centre a module's output through a forward hook; "mlp" centres
inside the patched MLP's forward.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn import CENTERING_MODES, VectorCentering
from .families import backbone

# Where `center=` can put a VectorCentering:
#   "embeddings"  the token embeddings (embed_tokens' output), before the first layer
#   "values"      each attention's value projection (v_proj's output, [B, T, kv_heads * head_dim])
#   "mlp"         each MLP's hidden activation, between the gated product and down_proj
CENTER_PLACEMENTS = ("embeddings", "values", "mlp")

# The centering mode `patch` uses unless told otherwise: the one place to change it. "simple" subtracts the
# batch's own mean in training and the running mean in eval. Why this mode: the centering study's results,
# bench/results/centering/cpu-dim256/results.md and bench/results/centering/pilot-modes/README.md.
DEFAULT_CENTERING_MODE = "simple"

CHILD = "fastcenter_bias"
# The config attribute that records the centering, so that save_pretrained writes it to config.json and a
# later load can tell a centred checkpoint from a plain one.
CONFIG_KEY = "fastcenter_centering"


def normalize_center(center) -> tuple[str, ...]:
    """`center` as a tuple of placements: None or () for none, one name, or an iterable of names."""
    if center is None:
        return ()
    if isinstance(center, str):
        center = (center,)
    try:
        center = tuple(center)
    except TypeError:
        raise TypeError(
            f"center must be a placement name or a tuple of them (from {CENTER_PLACEMENTS}), got {center!r}"
        ) from None
    if not all(isinstance(p, str) for p in center):
        raise TypeError(f"center must hold placement names (from {CENTER_PLACEMENTS}), got {center!r}")
    unknown = [p for p in center if p not in CENTER_PLACEMENTS]
    if unknown:
        raise ValueError(f"center placements must be among {CENTER_PLACEMENTS}, got {unknown}")
    return tuple(dict.fromkeys(center))


def normalize_mode(center: tuple[str, ...], centering_mode) -> str | None:
    """The mode for these placements: DEFAULT_CENTERING_MODE when not given; a mode without placements is an error."""
    if centering_mode is None:
        return DEFAULT_CENTERING_MODE if center else None
    if centering_mode not in CENTERING_MODES:
        raise ValueError(f"centering_mode must be one of {CENTERING_MODES}, got {centering_mode!r}")
    if not center:
        raise ValueError(
            f"centering_mode={centering_mode!r} without center=...: name the placements to centre "
            f"(from {CENTER_PLACEMENTS})"
        )
    return centering_mode


class Slot:
    """A hooked placement: the module in `parent.<name>` carries the centering. When that attribute comes to hold
    another module (PEFT wrapping it in a LoRA layer or unwrapping it at merge_and_unload,
    resize_token_embeddings building a new embedding), the centering moves to it with its statistics:
    the placement centres whatever computes that output."""

    def __init__(self, parent: nn.Module, name: str):
        self.parent, self.name = parent, name
        self.carrier = getattr(parent, name)


def _innermost(module: nn.Module) -> nn.Module:
    """The layer under PEFT's wrappers (each keeps the wrapped layer as `base_layer`)."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def _targets(base, family, placements):
    """(placement, slot or None, module to carry, dim, a weight on the target device, input scale or None) for each
    new placement."""
    inner = backbone(base)
    for placement in placements:
        if placement == "embeddings":
            slot = Slot(inner, "embed_tokens")
            layer = _innermost(slot.carrier)
            # Gemma scales the embeddings by sqrt(hidden_size): inside the embedding (transformers 5, and Gemma 3's
            # scaled embedding), or after it in the backbone's forward (transformers 4's Gemma 2). There, the
            # centering is told the scale, so that it centres what the first layer sees in every version (and its
            # statistics mean the same).
            scale = base.config.hidden_size**0.5 if family.embed_scale and not hasattr(layer, "embed_scale") else None
            yield placement, slot, slot.carrier, layer.embedding_dim, layer.weight, scale
        elif placement == "values":
            for attention in [m for m in base.modules() if isinstance(m, family.cls("Attention"))]:
                slot = Slot(attention, "v_proj")
                layer = _innermost(slot.carrier)
                yield placement, slot, slot.carrier, layer.out_features, layer.weight, None
        else:
            for mlp in [m for m in base.modules() if isinstance(m, family.cls("MLP"))]:
                yield placement, None, mlp, mlp.down_proj.in_features, mlp.down_proj.weight, None


def plan(base, family, state: dict, center: tuple[str, ...], mode: str | None, *, before_loading: bool):
    """The centering to add, or the reason to refuse (a ValueError), before anything changes."""
    if not center:
        return []
    missing = [p for p in center if p not in family.placements]
    if missing:
        raise ValueError(
            f"fastcenter.hf: {family.model_type} has the centering placements {family.placements}, not {missing}"
            + ("" if family.values else " (its attention packs q, k and v in one projection)")
            + ("" if not family.experts else " (each expert sees only the tokens routed to it)")
        )
    if state["center"] and state["centering_mode"] != mode:
        raise ValueError(
            f"this model is already centred in mode {state['centering_mode']!r}; patching again with "
            f"centering_mode={mode!r} would discard its running statistics (reload the model to change modes)"
        )
    record = getattr(base.config, CONFIG_KEY, None)
    if record:
        saved = (tuple(record["center"]), record["centering_mode"])
        call = f"patch_model_type({family.model_type!r}, center={saved[0]}, centering_mode={saved[1]!r})"
        if before_loading and (set(saved[0]) != set(center) or saved[1] != mode):
            raise ValueError(
                f"this checkpoint was saved centred with center={saved[0]}, centering_mode={saved[1]!r}; "
                f"loading it with center={center}, centering_mode={mode!r} would drop or zero statistics. "
                f"Call {call} before from_pretrained"
            )
        if not before_loading and not set(saved[0]) <= set(state["center"]):
            raise ValueError(
                f"this model's config records centering (center={saved[0]}, centering_mode={saved[1]!r}) that "
                "the model does not have: from_pretrained dropped the saved statistics as unexpected keys. Call "
                f"{call} before from_pretrained to load them"
            )
    new = [p for p in center if p not in state["center"]]
    targets = list(_targets(base, family, new))
    for _, _, carrier, *_ in targets:
        existing = getattr(carrier, CHILD, None)
        if existing is not None and existing.mode != mode:
            raise ValueError(f"this model is already centred in mode {existing.mode!r} at {type(carrier).__name__}")
    return targets


def apply(base, state: dict, center: tuple[str, ...], mode: str | None, targets) -> None:
    if not center:
        return
    for _, slot, carrier, dim, like, scale in targets:
        if getattr(carrier, CHILD, None) is None:
            setattr(carrier, CHILD, VectorCentering(dim, mode).to(device=like.device))
            if slot is not None:
                carrier.register_forward_hook(_center_output_hook)
        if scale is not None:
            getattr(carrier, CHILD).fastcenter_input_scale = scale
        if slot is not None:
            state["slots"].append(slot)
    state["center"] = tuple(dict.fromkeys(state["center"] + center))
    state["centering_mode"] = mode
    setattr(base.config, CONFIG_KEY, {"center": list(state["center"]), "centering_mode": mode})
    inner = backbone(base)
    if "_fastcenter_hf" not in inner.__dict__:
        inner._fastcenter_hf = state
        inner.register_forward_pre_hook(_backbone_pre_hook, with_kwargs=True)


def _center_output_hook(module: nn.Module, args, output):
    """Forward hook: the module's output minus its centre (the VectorCentering is the module's child, so the
    hook holds no reference of its own and deep copies of the model stay consistent).

    With an input scale s (embeddings that the backbone scales after this module, see `_targets`): the centre of
    s * output, divided by s, which the backbone then scales back: s * output - centre, as where the embedding
    module scales itself. s is rounded to the output's dtype, as transformers rounds it."""
    centering = getattr(module, CHILD)
    scale = centering.__dict__.get("fastcenter_input_scale")
    if scale is None:
        return centering(output)
    scale = torch.tensor(scale, dtype=output.dtype)
    return centering(output * scale) / scale


def _follow(slot: Slot) -> None:
    current = getattr(slot.parent, slot.name)
    if current is slot.carrier:
        return
    old = slot.carrier
    centering = getattr(old, CHILD)
    delattr(old, CHILD)
    for key, hook in list(old._forward_hooks.items()):
        if hook is _center_output_hook:
            del old._forward_hooks[key]
    if getattr(current, CHILD, None) is None:
        setattr(current, CHILD, centering)
        current.register_forward_hook(_center_output_hook)
    slot.carrier = current


def _is_checkpointing(backbone: nn.Module) -> bool:
    """transformers' gradient checkpointing (a `gradient_checkpointing` flag on the layers) or torch's
    checkpoint wrappers (as accelerate's FSDP activation checkpointing applies)."""
    return any(
        getattr(m, "gradient_checkpointing", False) is True or hasattr(m, "_checkpoint_wrapped_module")
        for m in backbone.modules()
    )


def _backbone_pre_hook(backbone: nn.Module, args, kwargs) -> None:
    """Before every forward of the backbone (whoever calls it: the causal LM, TRL's fused head): the centering
    follows replaced modules, and the two cases where it would silently compute something else are refused."""
    state = backbone._fastcenter_hf
    for slot in state["slots"]:
        _follow(slot)
    inner = [p for p in state["center"] if p != "embeddings"]
    if inner and backbone.training and torch.is_grad_enabled() and _is_checkpointing(backbone):
        raise NotImplementedError(
            f"fastcenter.hf: center={tuple(inner)} with gradient checkpointing: recomputing a layer would run its "
            "centering again, updating the running mean twice and recomputing the centre from the updated one. "
            "Disable gradient checkpointing, or centre only the embeddings (outside the checkpointed layers)."
        )
    if state["centering_mode"] == "causal":
        cache = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5 renamed it "cache"
        cached = cache.get_seq_length() if hasattr(cache, "get_seq_length") else (len(cache) if cache else 0)
        if cached:
            raise NotImplementedError(
                "fastcenter.hf: causal centering subtracts the mean of each position's whole prefix, which a "
                "step that sees only new tokens after a key/value cache cannot form. Generate with "
                "use_cache=False, or centre in a mode without position dependence."
            )


def init_weights(model, original, module: nn.Module) -> None:
    """The model's `_init_weights` (transformers calls it for every module whose weights a checkpoint did not
    provide, and from `init_weights()`), extended to the centering: its `reset_parameters()`, unless
    transformers marks a tensor of it as loaded from a checkpoint."""
    original(module)
    if isinstance(module, VectorCentering):
        if not any(getattr(t, "_is_hf_initialized", False) for t in (*module.parameters(), *module.buffers())):
            module.reset_parameters()
