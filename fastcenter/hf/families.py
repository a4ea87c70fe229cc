"""The model families fastcenter.hf patches: one row each, saying where the family differs from Llama.

Every family follows Llama's layout in transformers' modeling code: `<Prefix>ForCausalLM` around `<Prefix>Model`,
`<Prefix>RMSNorm`, `<Prefix>Attention` calling the module-level `apply_rotary_pos_emb`, `<Prefix>MLP`. A row
names only what differs, and `patch` reads nothing else about a family.
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
    # `(weight * normed).to(input dtype)` (OLMo 2).
    norm_output: str = "promote"

    @property
    def modeling(self):
        require_transformers()
        return importlib.import_module(f"transformers.models.{self.model_type}.modeling_{self.model_type}")

    def cls(self, suffix: str, default=dataclasses.MISSING) -> type:
        """The family's class `<Prefix><suffix>` (e.g. LlamaRMSNorm) as transformers defines it."""
        if default is dataclasses.MISSING:
            return getattr(self.modeling, self.prefix + suffix)
        return getattr(self.modeling, self.prefix + suffix, default)

    @property
    def placements(self) -> tuple[str, ...]:
        """The centering placements this family has (see CENTER_PLACEMENTS)."""
        return ("embeddings",) + (("values",) if self.values else ()) + (() if self.experts else ("mlp",))


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
    )
}

# The model types `patch` accepts, mapped to the class-name prefix transformers uses in their modeling modules.
SUPPORTED_MODEL_TYPES = {name: family.prefix for name, family in FAMILIES.items()}


def family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"fastcenter.hf supports the model types {', '.join(FAMILIES)}; got model_type={model_type!r}")
    return FAMILIES[model_type]


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
