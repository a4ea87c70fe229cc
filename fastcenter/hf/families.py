"""The model families fastcenter.hf patches: one row each, saying where the family differs from Llama.

Every family follows Llama's layout in transformers' modeling code: `<Prefix>ForCausalLM` around its decoder stack
in `.model`, `<Prefix>RMSNorm`, `<Prefix>Attention` calling the module-level `apply_rotary_pos_emb`, `<Prefix>MLP`.
A row names only what differs, and `patch` reads nothing else about a family.
"""

from __future__ import annotations

import dataclasses
import importlib

from torch import nn


def require_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            'fastcenter.hf needs transformers: pip install "fastcenter[hf]" (or pip install transformers)'
        ) from exc
    return transformers


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    prefix: str
    # The MLP's input projection: "gated" (gate_proj and up_proj) or "packed" (one gate_up_proj, [gate | up]).
    mlp: str = "gated"
    # Whether each attention has its own v_proj to centre ("values"); Phi-3 packs q, k and v in one projection.
    values: bool = True
    # Mixture of experts: the sparse blocks' experts are `<Prefix>Experts` (transformers 5: 3-D weights, the gate
    # through `_apply_gate`) or `<Prefix>MLP` modules (transformers 4), and the loss adds the router's load-balancing
    # term. Their hidden activation is not a placement: each expert sees only the tokens routed to it.
    experts: bool = False
    # RMSNorm's output dtype: "promote" for `weight * normed.to(input dtype)` (Llama), "input" for
    # `(weight * normed).to(input dtype)` (OLMo 2, Gemma).
    norm_output: str = "promote"
    # RMSNorm multiplies by (weight + norm_offset): 1.0 for Gemma's (1 + weight), its weights initialised to 0.
    norm_offset: float = 0.0
    # The config attribute naming the MLP's activation (a key of transformers' ACT2FN): Gemma's is "hidden_activation".
    activation_config: str = "hidden_act"
    # The model multiplies the token embeddings by sqrt(hidden_size) (Gemma): the embeddings placement centres
    # the scaled embeddings, what the first layer sees (see centering.py).
    embed_scale: bool = False
    # The folder of the modeling code under transformers.models, when it is not the model type (Gemma 3's text
    # model, "gemma3_text", is in gemma3).
    module: str = ""

    @property
    def modeling(self):
        require_transformers()
        module = self.module or self.model_type
        return importlib.import_module(f"transformers.models.{module}.modeling_{module}")

    def cls(self, suffix: str, default=dataclasses.MISSING) -> type:
        """The family's class `<Prefix><suffix>` (e.g. LlamaRMSNorm) as transformers defines it."""
        if default is dataclasses.MISSING:
            return getattr(self.modeling, self.prefix + suffix)
        return getattr(self.modeling, self.prefix + suffix, default)

    @property
    def placements(self) -> tuple[str, ...]:
        """The centering placements this family has (see CENTER_PLACEMENTS)."""
        return ("embeddings",) + (("values",) if self.values else ()) + (() if self.experts else ("mlp",))


# Gemma 2 and 3: RMSNorm with (1 + weight) in float32 cast after the product, GeGLU (gelu_pytorch_tanh), the token
# embeddings scaled by sqrt(hidden_size); also a final-logit softcap (which the fused loss reads from the config).
_GEMMA = dict(norm_output="input", norm_offset=1.0, activation_config="hidden_activation", embed_scale=True)

FAMILIES = {
    family.model_type: family
    for family in (
        Family("llama", "Llama"),
        Family("mistral", "Mistral"),
        Family("qwen2", "Qwen2"),
        Family("qwen3", "Qwen3"),
        Family("phi3", "Phi3", mlp="packed", values=False),
        Family("olmo2", "Olmo2", norm_output="input"),
        Family("qwen3_moe", "Qwen3Moe", experts=True),
        Family("gemma2", "Gemma2", **_GEMMA),
        Family("gemma3_text", "Gemma3", module="gemma3", **_GEMMA),  # Gemma 3's text-only causal LM
    )
}

# The model types `patch` accepts, mapped to the class-name prefix transformers uses in their modeling modules.
SUPPORTED_MODEL_TYPES = {name: family.prefix for name, family in FAMILIES.items()}


def family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"fastcenter.hf supports the model types {', '.join(FAMILIES)}; got model_type={model_type!r}")
    return FAMILIES[model_type]


def backbone(model: nn.Module) -> nn.Module:
    """The causal LM's decoder stack: `.model` in every family (transformers 4's Gemma 3 names another attribute
    in its base_model_prefix)."""
    return model.model


def family_of(model: nn.Module) -> Family:
    """The family of a causal LM; a clear error for any other model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"fastcenter.hf supports the model types {', '.join(FAMILIES)}; got {type(model).__name__} with "
            f"model_type={model_type!r}"
        )
    found = FAMILIES[model_type]
    causal_lm = found.cls("ForCausalLM")
    if not isinstance(model, causal_lm):
        raise ValueError(
            f"patch takes a causal LM ({causal_lm.__name__}, e.g. from AutoModelForCausalLM), "
            f"got {type(model).__name__}"
        )
    return found
