"""Tiny random transformers causal LMs and the comparisons the fastcenter.hf tests share (tests/test_hf*.py).

Every comparison runs the same model twice from the same weights: transformers' own (the truth) and a deep copy
patched by fastcenter.hf. Weights are drawn larger than transformers' init, so that losses sit well away from
log(V) and every gradient is far from zero: a comparison at float32 tolerance then means something.

transformers is optional (the `[hf]` extra): without it every module importing this one is skipped. Nothing here
touches the network: models are built from configs.
"""

import copy
import os
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
import torch

from fastcenter import hf, ops

transformers = pytest.importorskip(
    "transformers",
    minversion=hf.MIN_TRANSFORMERS_VERSION,
    reason='transformers is not installed: fastcenter.hf is the optional "[hf]" extra (pip install -e ".[dev,hf]")',
)
from transformers import AutoConfig, AutoModelForCausalLM

FAMILIES = tuple(hf.SUPPORTED_MODEL_TYPES)
VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 1000, 64, 96, 2, 4, 2, 16
BATCH, SEQ = 2, 11
FP32 = dict(rtol=2e-5, atol=2e-5)

# What differs per family in a tiny config: Phi-3's default pad id lies beyond this vocabulary, and its rotary
# embedding covers half of each head here (partial_rotary_factor, as Phi-4-mini's 0.75); the mixture of experts
# gets 4 experts of which each token takes 2, and a dense MLP in its last layer (mlp_only_layers). Gemma: a sliding
# layer (window shorter than the sequence) then a global one, queries scaled by the head dim as in its releases;
# Gemma 2's attention and final-logit softcaps small enough to bite at this scale (Gemma 3 has neither).
_GEMMA = dict(query_pre_attn_scalar=HEAD_DIM, sliding_window=6, layer_types=["sliding_attention", "full_attention"])
FAMILY_CONFIG = {
    "phi3": dict(pad_token_id=0, eos_token_id=2, partial_rotary_factor=0.5),
    "olmo2": dict(pad_token_id=0, eos_token_id=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, mlp_only_layers=[LAYERS - 1]),
    "gemma2": dict(_GEMMA, attn_logit_softcapping=4.0, final_logit_softcapping=3.0),
    "gemma3_text": _GEMMA,
}
# Gemma 2's attention softcap needs transformers' eager attention (it refuses sdpa).
ATTENTION = {"gemma2": "eager"}
# RMSNorm modules per layer: Qwen3 (and its MoE) normalises q and k per head, OLMo 2 q and k over all heads and
# both sublayers' outputs; Gemma 2 both sublayers' inputs and outputs, Gemma 3 also q and k per head.
NORMS_PER_LAYER = {"qwen3": 4, "qwen3_moe": 4, "olmo2": 4, "gemma2": 4, "gemma3_text": 6}
# The gated op of each family's MLP (GeGLU: Gemma's gelu_pytorch_tanh)
GATED_OP = {"gemma2": "geglu", "gemma3_text": "geglu"}


def tiny_config(model_type: str, *, tied: bool = False, **overrides):
    options = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        rms_norm_eps=1e-5,
    )
    options.update(FAMILY_CONFIG.get(model_type, {}))
    options.update(overrides)
    return AutoConfig.for_model(model_type, **options)


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Weights larger than transformers' init (std 0.02 gives losses of ~log V and vanishing gradients)."""
    norm_offset = hf.families.family(model.config.model_type).norm_offset  # Gemma's norms multiply by 1 + weight
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 - norm_offset + 0.3 * torch.randn_like(param))
            elif param.dim() == 1:  # Qwen2's q/k/v biases
                param.copy_(0.1 * torch.randn_like(param))
            elif "embed_tokens" in name:
                param.copy_(0.5 * torch.randn_like(param))
            else:  # matrices [out, in] and the experts' [experts, out, in]
                param.copy_(torch.randn_like(param) * param.shape[-1] ** -0.5)
    return model


def tiny_model(model_type: str = "llama", *, tied: bool = False, **overrides):
    config = tiny_config(model_type, tied=tied, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION.get(model_type, "sdpa"))
    randomize(model.float())
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return model.train()


def pair(model_type: str = "llama", *, tied: bool = False, **patch_options):
    """(unpatched, patched) models with identical weights."""
    reference = tiny_model(model_type, tied=tied)
    return reference, hf.patch(copy.deepcopy(reference), **patch_options)


def make_batch(batch: int = BATCH, seq: int = SEQ):
    """input_ids and labels; a different number of ignored labels per row (as padding would give)."""
    ids = torch.randint(0, VOCAB, (batch, seq))
    labels = ids.clone()
    for row in range(batch):
        labels[row, seq - 1 - 2 * row :] = -100
    return ids, labels


def loss_and_grads(model, backend=None, **inputs):
    model.zero_grad(set_to_none=True)
    with ops.using(backend):
        out = model(**inputs)
        out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return out, grads


def assert_same_training(reference, patched, backend=None, tol=FP32, **inputs):
    """Loss and every parameter gradient of the patched model equal the unpatched model's."""
    ref_out, ref_grads = loss_and_grads(reference, **inputs)
    out, grads = loss_and_grads(patched, backend, **inputs)
    torch.testing.assert_close(out.loss, ref_out.loss, **tol)
    assert grads.keys() == ref_grads.keys()
    for name, expected in ref_grads.items():
        assert expected is not None and grads[name] is not None, f"{name} got no gradient"
        torch.testing.assert_close(grads[name], expected, **tol, msg=lambda m: f"gradient of {name}: {m}")
    return out


def count_op_calls(monkeypatch) -> Counter:
    """How often each fastcenter op is called from now on (fastcenter.hf calls them through the `ops` module)."""
    calls = Counter()
    for name in ("rms_norm", "rope", "swiglu", "geglu", "linear_cross_entropy"):
        original = getattr(ops, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(ops, name, counted)
    return calls


def fingerprint(model: torch.nn.Module) -> dict:
    """Everything a patch could change on a model: each module's class, hooks, children, parameters and buffers
    (names and values), instance attributes, the forward, and the config's fastcenter record."""
    modules = {}
    for name, module in model.named_modules():
        modules[name] = (
            type(module),
            tuple(module._forward_hooks.values()),
            tuple(module._forward_pre_hooks.values()),
            tuple(module._modules),
            tuple(sorted(k for k in module.__dict__ if not k.startswith("_"))),
            module.__dict__.get("forward"),
            module.__dict__.get("_init_weights"),
            _snapshot(module.__dict__.get("_fastcenter_hf")),
        )
    tensors = {name: t.detach().clone() for name, t in model.state_dict().items()}
    return {"modules": modules, "tensors": tensors, "config": getattr(model.config, "fastcenter_centering", None)}


def _snapshot(state: dict | None):
    return None if state is None else {k: tuple(v) if isinstance(v, list) else v for k, v in state.items()}


def assert_unchanged(before: dict, model: torch.nn.Module) -> None:
    after = fingerprint(model)
    assert after["modules"].keys() == before["modules"].keys()
    for name, entry in before["modules"].items():
        assert after["modules"][name] == entry, f"module {name!r} changed"
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, tensor in before["tensors"].items():
        assert torch.equal(after["tensors"][name], tensor), name
    assert after["config"] == before["config"]
