"""fastcenter in a Hugging Face transformers causal LM, in one line:

    from fastcenter.hf import patch
    model = patch(AutoModelForCausalLM.from_pretrained(name))            # or patch(model, center=("embeddings",))

`patch(model)` swaps fastcenter's ops into an instantiated causal LM of a family in SUPPORTED_MODEL_TYPES in place
and returns it; `patch_model_type("llama")` does the same to every model of that type built afterwards
(`from_pretrained`, `from_config`, or the class itself), before its weights load. transformers is an optional
extra (`pip install "fastcenter[hf]"`); this package imports it only when a function here is called.

What is swapped (the layers in `layers.py`, the loss in `loss.py`, the centering in `centering.py`, one row per
family in `families.py`). transformers marks its replaceable layers for its kernel hub: the `<Family>RMSNorm`
class is the hub's "RMSNorm" layer and `apply_rotary_pos_emb` its "rotary_pos_emb" function. The hub needs the
separate `kernels` package and kernels published as hub repositories, so fastcenter does by hand what
`kernels.kernelize` does with those names, and replaces a forward only where no hook exists: the MLP (or a mixture
of experts' gate), the head's call, and the causal LM's forward with labels, the one place where nothing but a
new forward keeps the [N, V] logits from being formed. Attention, masks, caches, gradient checkpointing and
`generate` stay transformers' own; parameter names and state-dict keys do not change (centering adds its own).

A refused patch changes nothing: every check runs before the first change. Patching only adds: a second call
with the same arguments changes nothing, and a flag set to False leaves that part as it is.

The README's "Hugging Face transformers" section lists what is supported per family and per feature, and the
limits; each limit is either handled or refused with a message saying why.
"""

from __future__ import annotations

import functools
import warnings

from torch import nn

from . import centering, families, layers, loss
from .centering import CENTER_PLACEMENTS, DEFAULT_CENTERING_MODE
from .families import SUPPORTED_MODEL_TYPES

# The oldest transformers release the tests cover (.ci/run checks it beside the newest).
MIN_TRANSFORMERS_VERSION = "4.57"


def patch(
    model,
    *,
    rms_norm: bool = True,
    rope: bool = True,
    swiglu: bool = True,
    linear_cross_entropy: bool = True,
    center=(),
    centering_mode: str | None = None,
    eval_logits: bool | None = None,
):
    """Swap fastcenter's ops (and, with `center`, vector centering) into a transformers causal LM in place.

    model: a causal LM of a type in SUPPORTED_MODEL_TYPES (or a PEFT model around one: its base model is
        patched). Returns `model`.
    rms_norm, rope, swiglu, linear_cross_entropy: which ops to swap in (see `layers.py` and `loss.py`); `swiglu`
        is the gated MLP's activation, through `ops.swiglu` (SiLU) or `ops.geglu` (GELU, as Gemma's).
    center: placements from CENTER_PLACEMENTS ("embeddings", "values", "mlp"; None or () for none) that get a
        `fastcenter.nn.VectorCentering(dim, centering_mode)`, on the model's device, float32 statistics.
    centering_mode: one of fastcenter.nn.CENTERING_MODES, only with `center`; default DEFAULT_CENTERING_MODE.
    eval_logits: in eval mode a forward with labels forms the logits (True, the default: transformers'
        behaviour, what Trainer.evaluate's compute_metrics reads) or computes the fused loss only (False:
        Trainer.evaluate without compute_metrics, i.e. prediction_loss_only, and loss-only evaluation loops).
        `return_logits=` in a call overrides it; None keeps what an earlier patch set.

    Errors (each before anything changes): TypeError for a model that is not a module or a malformed `center`;
    ValueError for a model type other than the supported ones (naming them), a model that is not a causal LM,
    an unknown placement or mode, a placement the family does not have, a mode other than the one the model is
    centred in, and a model whose config records centering that from_pretrained dropped.
    """
    return _patch(
        model,
        dict(rms_norm=rms_norm, rope=rope, swiglu=swiglu, linear_cross_entropy=linear_cross_entropy),
        centering.normalize_center(center),
        centering_mode,
        eval_logits,
        before_loading=False,
    )


def _patch(model, ops_flags: dict, center: tuple, centering_mode, eval_logits, *, before_loading: bool):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}")
    transformers = families.require_transformers()
    base = model
    if not isinstance(model, transformers.PreTrainedModel) and hasattr(model, "get_base_model"):  # PEFT
        base = model.get_base_model()
    family = families.family_of(base)
    mode = centering.normalize_mode(center, centering_mode)
    state = base.__dict__.get("_fastcenter_hf") or loss.new_state(base, family)
    targets = centering.plan(base, family, state, center, mode, before_loading=before_loading)

    # Nothing has changed so far; from here on nothing raises.
    if "_fastcenter_hf" not in base.__dict__:
        base._fastcenter_hf = state
        base.forward = loss.Bound(base, loss.causal_lm_forward, state["forward"])
        # transformers initialises each PreTrainedModel's submodules with that model's own _init_weights
        for module in base.modules():
            if isinstance(module, transformers.PreTrainedModel):
                module._init_weights = loss.Bound(module, centering.init_weights, module._init_weights)
    if ops_flags["rms_norm"]:
        norm_cls = family.cls("RMSNorm")
        for module in base.modules():
            layers.swap_class(
                module,
                norm_cls,
                layers.FastRMSNorm,
                _fastcenter_norm_output=family.norm_output,
                _fastcenter_weight_offset=family.norm_offset,
            )
    if ops_flags["rope"]:
        layers.install_rope_dispatch(family.modeling, family.prefix)
        for module in base.modules():
            layers.swap_class(module, family.cls("Attention"), layers.FastAttention)
    glu = layers.gated_activation(base.config, family)
    swiglu = ops_flags["swiglu"] and glu is not None
    if swiglu or "mlp" in center:
        for mlp in base.modules():
            layers.swap_class(mlp, family.cls("MLP"), layers.FastMLP)
            if swiglu and isinstance(mlp, layers.FastMLP):
                mlp.fastcenter_glu = glu
    if swiglu and family.experts and glu[0] == "swiglu":  # FastExperts computes silu(gate) * up
        experts_cls = family.cls("Experts", None)  # transformers 5; in 4.x the experts are MLP modules
        for module in base.modules():
            layers.swap_class(module, experts_cls, layers.FastExperts)
    if ops_flags["linear_cross_entropy"]:
        state["linear_cross_entropy"] = True
        layers.swap_class(base.lm_head, nn.Linear, layers.FusedLossHead)
    if eval_logits is not None:
        state["eval_logits"] = eval_logits
    centering.apply(base, state, center, mode, targets)
    if ops_flags["swiglu"] and glu is None:
        name = family.activation_config
        warnings.warn(
            f"fastcenter.hf: {name}={getattr(base.config, name, None)!r} is none of the activations fastcenter's gated "
            f"ops compute ({', '.join(layers.GATED_ACTIVATIONS)}), so the MLPs keep their activation",
            stacklevel=3,
        )
    return model


def patch_model_type(
    model_type: str,
    *,
    rms_norm: bool = True,
    rope: bool = True,
    swiglu: bool = True,
    linear_cross_entropy: bool = True,
    center=(),
    centering_mode: str | None = None,
    eval_logits: bool | None = None,
) -> None:
    """Patch every causal LM of `model_type` constructed from now on (from_pretrained, from_config, or the class
    itself): its `__init__` ends with `patch(self, ...)`, before any weights are loaded (the swaps keep every
    parameter name, so loading is unaffected). Calling it again replaces the options; `unpatch_model_type`
    undoes it for models built later.

    With `center`, the centering modules exist before the weights load, so a checkpoint saved centred (by
    save_pretrained of a centred model) loads its statistics, and a plain checkpoint starts them at zero
    (transformers reports them as newly initialised). A checkpoint saved centred must be loaded with the same
    `center` and `centering_mode` (its config.json records them): anything else is refused, as from_pretrained
    would otherwise drop or zero statistics.
    """
    center = centering.normalize_center(center)
    centering.normalize_mode(center, centering_mode)  # argument errors now, not at the first model built
    cls = families.family(model_type).cls("ForCausalLM")
    options = dict(rms_norm=rms_norm, rope=rope, swiglu=swiglu, linear_cross_entropy=linear_cross_entropy)
    original_init = cls.__dict__["__init__"]
    original_init = getattr(original_init, "_fastcenter_original", original_init)

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if type(self) is cls:  # not a user subclass that may build its own head
            _patch(self, options, center, centering_mode, eval_logits, before_loading=True)

    __init__._fastcenter_original = original_init
    cls.__init__ = __init__


def unpatch_model_type(model_type: str) -> None:
    """Undo `patch_model_type`: models of this type built from now on are transformers' own again (models
    already built keep their patch)."""
    cls = families.family(model_type).cls("ForCausalLM")
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
    "MIN_TRANSFORMERS_VERSION",
]
