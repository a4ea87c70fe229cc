"""The causal LM's forward with labels, without logits: `ops.linear_cross_entropy` on the last hidden state.

This is the one place where nothing but a new forward can keep the [N, V] logits from being formed. It follows
transformers' ForCausalLM forward step by step (the backbone call with every other argument, `logits_to_keep`,
the label shift, the mean or `num_items_in_batch` reduction, a mixture of experts' load-balancing term) and
returns the same output class with `logits=None`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .families import backbone
from .layers import FusedLossHead


class Bound:
    """`fn(model, *args)` as an instance attribute of `model` (its `forward` or `_init_weights`).

    A small callable class rather than a bound method so that copy.deepcopy(model) rebinds it to the copy
    (through the memo) and inspect.signature sees the wrapped method's parameters (Trainer looks for **kwargs
    there to decide whether to pass num_items_in_batch; generate looks for logits_to_keep)."""

    def __init__(self, model, fn, wrapped):
        self.__self__, self.fn, self.wrapped = model, fn, wrapped
        functools.update_wrapper(self, wrapped, updated=())

    def __call__(self, *args, **kwargs):
        return self.fn(self.__self__, self.wrapped, *args, **kwargs)

    @property
    def __func__(self):
        return self.fn


def new_state(model, family) -> dict:
    """What the patched forward needs, read once (torch.compile cannot trace dataclasses.fields or a failed
    import inside the forward)."""
    from transformers import modeling_outputs

    output_class = (
        modeling_outputs.MoeCausalLMOutputWithPast if family.experts else modeling_outputs.CausalLMOutputWithPast
    )
    original = model.forward  # bound: the class's forward, or an instance wrapper installed before us
    parameters = [
        name
        for name, p in inspect.signature(original).parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    return {
        "forward": original,
        "parameters": parameters,
        "slice_logits_to_keep": _slice_logits_to_keep(),
        "output_class": output_class,
        "output_order": tuple(f.name for f in dataclasses.fields(output_class)),
        "output_fields": frozenset(f.name for f in dataclasses.fields(output_class)) - {"loss", "logits", "aux_loss"},
        "load_balancing_loss": family.modeling.load_balancing_loss_func if family.experts else None,
        "linear_cross_entropy": False,
        "eval_logits": True,
        "center": (),
        "centering_mode": None,
        "slots": [],
    }


def _slice_logits_to_keep_4x(hidden: Tensor, logits_to_keep) -> Tensor:
    """transformers 4.x's slicing: an int keeps the last ones (0: all), a tensor indexes positions."""
    index = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return hidden[:, index, :]


def _slice_logits_to_keep():
    """The positions whose logits the unpatched forward forms: transformers' own helper where it has one."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        return _slice_logits_to_keep_4x
    return slice_logits_to_keep


def causal_lm_forward(self, original, *args, **kwargs):
    """The patched causal LM forward (`model.forward`, through `Bound`).

    With `labels` in training (or, with `patch(eval_logits=False)`, in eval too, or `return_logits=False`) and a
    head the fused loss can compute through, the loss is `ops.linear_cross_entropy` on the last hidden state and
    `logits` is None; in every other case the original forward runs (eval, generation and `return_logits=True` are
    transformers' own). `return_logits` is the one argument the original does not have.
    """
    state = self._fastcenter_hf
    named = dict(zip(state["parameters"], args))
    for key, value in kwargs.items():
        if key in named:
            raise TypeError(f"forward() got multiple values for argument {key!r}")
        named[key] = value
    return_logits = named.pop("return_logits", None)
    if return_logits is None:
        return_logits = not self.training and state["eval_logits"]
    fused = named.get("labels") is not None and not return_logits and state["linear_cross_entropy"]
    # TRL's trainers add their own fused head behind `fused_lm_head=True`: theirs to compute.
    if not fused or named.get("fused_lm_head"):
        return original(**named)
    head = _head_call(self)
    if head is None:
        if not state.get("warned_head"):
            state["warned_head"] = True
            warnings.warn(
                f"fastcenter.hf: lm_head is a {type(self.lm_head).__module__}.{type(self.lm_head).__qualname__} "
                "that linear_cross_entropy cannot compute through (see fastcenter.hf's README section): the "
                "logits are formed and its own forward computes the loss (correct gradients, no memory saving)",
                stacklevel=2,
            )
        return original(**named)
    return _fused_loss_forward(self, named, head)


def _linear_cross_entropy(input, weight, bias, *, target, reduction, ignore_index, softcap):
    return ops.linear_cross_entropy(
        input, weight, target, linear_bias=bias, reduction=reduction, ignore_index=ignore_index, softcap=softcap
    )


def _fused_loss_forward(self, named: dict, head):
    return_dict = named.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    labels = named.pop("labels")
    logits_to_keep = named.pop("logits_to_keep", 0)
    state = self._fastcenter_hf
    experts = state["load_balancing_loss"] is not None  # a mixture of experts: the loss adds the router's term
    if experts:
        router = named.get("output_router_logits")
        named["output_router_logits"] = self.config.output_router_logits if router is None else router
    # As transformers' forward: every other argument, loss keywords included, goes to the base model.
    outputs = backbone(self)(**named)
    hidden = state["slice_logits_to_keep"](outputs.last_hidden_state, logits_to_keep)

    # transformers' ForCausalLMLoss: labels shifted left by one (padded with ignore_index) unless shift_labels
    # is given; mean over non-ignored targets, or sum / num_items_in_batch when the Trainer passes it (so
    # gradient accumulation weighs every token equally). Gemma's final-logit softcap, cap * tanh(logits / cap),
    # is the loss's own `softcap`.
    ignore_index = named.get("ignore_index", -100)
    shift_labels = named.get("shift_labels")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    num_items = named.get("num_items_in_batch")
    loss = head(
        hidden.reshape(-1, hidden.shape[-1]),
        functools.partial(
            _linear_cross_entropy,
            target=shift_labels.reshape(-1).to(hidden.device),
            reduction="mean" if num_items is None else "sum",
            ignore_index=ignore_index,
            softcap=getattr(self.config, "final_logit_softcapping", None),
        ),
    )
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)

    extra = {}
    if experts and named["output_router_logits"]:
        aux_loss = state["load_balancing_loss"](
            outputs.router_logits, self.num_experts, self.num_experts_per_tok, named.get("attention_mask")
        )
        loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
        extra["aux_loss"] = aux_loss
    rest = {key: value for key, value in outputs.items() if key in state["output_fields"]}
    output = state["output_class"](loss=loss, logits=None, **rest, **extra)
    if return_dict:
        return output
    # transformers' tuple holds the fields that are not None, in order: the logits' place stays, holding None
    # as `.logits` does, so that no later field moves into it.
    values = (getattr(output, key) for key in state["output_order"])
    return tuple(value for key, value in zip(state["output_order"], values) if value is not None or key == "logits")


# ---------------------------------------------------------------------------------------------------------
# Which heads the fused loss computes through.
# ---------------------------------------------------------------------------------------------------------


def _computes_linear(module) -> bool:
    """An nn.Linear whose call computes exactly x @ W.T + b: nn.Linear's own forward (or FusedLossHead's), no
    instance forward (accelerate's device hooks set one), no hooks (FSDP and DeepSpeed gather parameters in
    them)."""
    return (
        isinstance(module, nn.Linear)
        and type(module).forward in (nn.Linear.forward, FusedLossHead.forward)
        and "forward" not in module.__dict__
        and not module._forward_hooks
        and not module._forward_pre_hooks
    )


def _only_sharding_hooks(module) -> bool:
    """Whether every forward (post-)hook of `module` is FSDP2's: those accept a loss for an output (they reshard
    and arm the gather before the backward); any other would see a loss where it expects logits."""
    return all(
        (getattr(hook, "__module__", None) or "").startswith("torch.distributed.fsdp")
        for hook in module._forward_hooks.values()
    )


def _head_call(model):
    """How to compute the loss through the head: a function (hidden, loss) -> loss tensor, where `loss(input,
    weight, bias)` is the fused cross-entropy; None where the head computes something else."""
    head = model.lm_head
    if isinstance(head, FusedLossHead) and "forward" not in head.__dict__ and _only_sharding_hooks(head):
        return lambda hidden, loss: head(hidden, fastcenter_loss=loss)
    if _computes_linear(head):
        return lambda hidden, loss: loss(hidden, head.weight, head.bias)
    lora = _lora_linear(head)
    if lora is not None:
        return lambda hidden, loss: loss(hidden, *lora)
    return None


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
    if not _computes_linear(base):
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
        plain = _computes_linear(lora_a) and _computes_linear(lora_b)
        if not plain or lora_a.bias is not None or lora_b.bias is not None:
            return None
        no_dropout = isinstance(dropout, nn.Identity) or (
            isinstance(dropout, nn.Dropout) and (dropout.p == 0 or not dropout.training)
        )
        if not no_dropout:
            return None
        weight = weight + head.scaling[name] * (lora_b.weight @ lora_a.weight)
    return weight, base.bias
