"""fastcenter.hf's vector centering in transformers models: what each placement computes, and that it survives
what users do next: a refused second patch, save_pretrained and from_pretrained, PEFT in either order, meta-device
construction, module replacement, argument slips and Trainer's weight decay. Tiny random models (hf_models.py).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from hf_models import (
    ATTENTION,
    FP32,
    HEAD_DIM,
    HIDDEN,
    INTERMEDIATE,
    KV_HEADS,
    VOCAB,
    assert_unchanged,
    fingerprint,
    make_batch,
    tiny_model,
    transformers,
)
from transformers import AutoModelForCausalLM

from fastcenter import hf
from fastcenter.nn import VectorCentering


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny matmuls: one thread is as fast and unaffected by the other core's load."""


def _centering_modules(model) -> dict[str, VectorCentering]:
    return {name: m for name, m in model.named_modules() if isinstance(m, VectorCentering)}


def _causal_centered(x: torch.Tensor, prior: float = 8.0) -> torch.Tensor:
    """x [B, T, D] minus its causal prefix mean with a zero running mean, in float64 (VectorCentering's spec)."""
    x = x.double()
    count = torch.arange(1, x.shape[1] + 1, dtype=torch.float64)[:, None] + prior
    return x - x.cumsum(1) / count


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gemma3_text"])
def test_centering_placements_compute_the_causal_centre(model_type):
    """Each placement centres what it should, in float64: the embeddings (Gemma's scaled by sqrt(hidden_size), what
    the first layer sees, in every transformers version: transformers 4 scales Gemma 2's after the embedding
    module), the values, and the gated MLP's hidden activation (Gemma's GeGLU). The running means are the batch
    means of what was centred: for Gemma, of the scaled embeddings."""
    gemma = model_type.startswith("gemma")
    model = hf.patch(tiny_model(model_type), center=hf.CENTER_PLACEMENTS, centering_mode="causal")
    layer = model.model.layers[0]
    modules = {
        "embeddings": (model.model.embed_tokens.fastcenter_bias, HIDDEN),
        "values": (layer.self_attn.v_proj.fastcenter_bias, KV_HEADS * HEAD_DIM),
        "mlp": (layer.mlp.fastcenter_bias, INTERMEDIATE),
    }
    for name, (centering, dim) in modules.items():
        assert isinstance(centering, VectorCentering), name
        assert (centering.dim, centering.mode) == (dim, "causal"), name

    seen = {}

    def layer_input(module, args, kwargs):
        seen["layer_input"] = args[0] if args else kwargs["hidden_states"]

    layer.register_forward_pre_hook(layer_input, with_kwargs=True)
    v_proj = layer.self_attn.v_proj
    v_proj.register_forward_hook(lambda m, args, out: seen.update(v_in=args[0], v_out=out))
    layer.mlp.register_forward_pre_hook(lambda m, args: seen.update(mlp_in=args[0]))
    layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.update(down_in=args[0]))
    ids, labels = make_batch()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()

    embeddings = model.model.embed_tokens.weight[ids].double() * (HIDDEN**0.5 if gemma else 1.0)
    torch.testing.assert_close(seen["layer_input"].double(), _causal_centered(embeddings), **FP32)
    running_mean = modules["embeddings"][0].running_mean.double()
    torch.testing.assert_close(running_mean, embeddings.detach().mean((0, 1)), **FP32)
    values = F.linear(seen["v_in"].double(), v_proj.weight.double())
    torch.testing.assert_close(seen["v_out"].double(), _causal_centered(values), **FP32)
    mlp = layer.mlp
    x = seen["mlp_in"].double()
    act = (lambda g: F.gelu(g, approximate="tanh")) if gemma else F.silu
    hidden = act(F.linear(x, mlp.gate_proj.weight.double())) * F.linear(x, mlp.up_proj.weight.double())
    torch.testing.assert_close(seen["down_in"].double(), _causal_centered(hidden), **FP32)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_default_centering_subtracts_the_batch_mean_in_training_and_the_running_mean_in_eval():
    model = hf.patch(tiny_model("mistral"), center=("embeddings",)).train()
    centering = model.model.embed_tokens.fastcenter_bias
    assert hf.DEFAULT_CENTERING_MODE == centering.mode == "simple"
    seen = []
    model.model.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    ids, labels = make_batch()
    model(input_ids=ids, labels=labels).loss.backward()
    embeddings = model.model.embed_tokens.weight.detach()[ids].double()
    batch_mean = embeddings.mean(dim=(0, 1))
    torch.testing.assert_close(seen[0].double(), embeddings - batch_mean, **FP32)
    torch.testing.assert_close(centering.running_mean.double(), batch_mean, **FP32)  # the first update is exact
    model.eval()
    with torch.no_grad():
        model(input_ids=ids[:1])
    torch.testing.assert_close(seen[1].double(), embeddings[:1] - batch_mean, **FP32)
    assert centering.num_updates.item() == 1  # eval does not update


def test_causal_centering_sees_no_future_token():
    model = hf.patch(tiny_model("qwen3"), center=hf.CENTER_PLACEMENTS, centering_mode="causal").eval()
    ids, _ = make_batch()
    changed = ids.clone()
    changed[:, 6:] = torch.randint(0, VOCAB, changed[:, 6:].shape)
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)
    assert not torch.equal(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("model_type", ["phi3", "olmo2", "qwen3_moe"])
def test_every_placement_of_the_new_families_is_what_flows_on(model_type):
    """Each placement the family has (Phi-3's packed MLP, OLMo 2's, the mixture of experts' values and its dense
    MLP): what the next module receives is the centering's output, which in training (mode "simple") has zero
    mean over the batch; and the loss and gradients stay finite."""
    model = hf.patch(tiny_model(model_type), center=hf.families.family(model_type).placements)
    seen, received = {}, {}
    for name, module in _centering_modules(model).items():
        module.register_forward_hook(lambda m, args, out, name=name: seen.update({name: out}))
    layer = model.model.layers[-1]
    model.model.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: received.update(embeddings=args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True,
    )
    if hasattr(layer.mlp, "down_proj"):
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: received.update(mlp=args[0]))
    if hasattr(layer.self_attn, "v_proj"):
        layer.self_attn.v_proj.register_forward_hook(lambda m, args, out: received.update(values=out))
    ids, labels = make_batch()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    last = len(model.model.layers) - 1
    names = {
        "embeddings": "model.embed_tokens.fastcenter_bias",
        "mlp": f"model.layers.{last}.mlp.fastcenter_bias",
        "values": f"model.layers.{last}.self_attn.v_proj.fastcenter_bias",
    }
    for placement, name in names.items():
        if placement not in hf.families.family(model_type).placements:
            assert name not in seen
            continue
        assert torch.equal(received[placement], seen[name]), placement
        mean = seen[name].double().mean(dim=(0, 1))
        assert mean.abs().max() < 1e-5 * seen[name].abs().max(), placement
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# A refused patch changes nothing.
# ---------------------------------------------------------------------------------------------------------

# (model type, first patch, second patch that must be refused, the error)
REFUSALS = {
    "other_mode": (
        "llama",
        dict(center=("values",)),
        dict(center=("embeddings", "values"), centering_mode="causal"),
        (ValueError, "already centred"),
    ),
    "ops_then_other_mode": (
        "llama",
        dict(rms_norm=False, rope=False, swiglu=False, linear_cross_entropy=False, center=("embeddings",)),
        dict(center=("mlp",), centering_mode="causal"),
        (ValueError, "already centred"),
    ),
    "unknown_placement": ("qwen2", None, dict(center=("embeddings", "residual")), (ValueError, "center placements")),
    "malformed_center": ("qwen2", None, dict(center=[("embeddings",)]), (TypeError, "center must")),
    "mode_without_center": ("qwen2", None, dict(centering_mode="causal"), (ValueError, "without center")),
    "phi3_values": ("phi3", None, dict(center=("embeddings", "values")), (ValueError, "packs q, k and v")),
    "experts_mlp": (
        "qwen3_moe",
        dict(center=("embeddings",)),
        dict(center=("values", "mlp")),
        (ValueError, "routed to it"),
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_refused_patch_changes_nothing(case):
    """Every refusal comes before the first change: modules, hooks, classes, state, statistics and config are
    as they were (before the fix, a refused second patch had already swapped layers and attached centering that
    the KV-cache and checkpointing guards did not know of)."""
    model_type, first, second, (error, message) = REFUSALS[case]
    model = tiny_model(model_type)
    if first is not None:
        hf.patch(model, **first)
        model(input_ids=make_batch()[0])  # statistics that a second patch must keep
    before = fingerprint(model)
    with pytest.raises(error, match=message):
        hf.patch(model, **second)
    assert_unchanged(before, model)
    if case == "other_mode":  # the symptom: cached generation must still equal uncached
        model.eval()
        prompt, settings = torch.randint(0, VOCAB, (2, 5)), dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
        cached, uncached = (model.generate(prompt, use_cache=c, **settings) for c in (True, False))
        torch.testing.assert_close(cached, uncached, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Save and load.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_type, center",
    [("llama", hf.CENTER_PLACEMENTS), ("olmo2", ("embeddings",)), ("gemma2", ("embeddings", "mlp"))],
)
def test_centering_statistics_survive_save_and_load(model_type, center, tmp_path):
    """A centred model saved with save_pretrained loads back through patch_model_type(<type>, center=...)
    before from_pretrained with its statistics: identical eval outputs. The other order (plain from_pretrained,
    then patch) would start the statistics at zero, so it is refused with the call to make instead."""
    centred = hf.patch(tiny_model(model_type), center=center, centering_mode="momentum")
    for _ in range(2):
        centred(input_ids=make_batch()[0])  # nonzero running means
    centred.eval().save_pretrained(tmp_path)
    ids, _ = make_batch()
    with torch.no_grad():
        expected = centred(input_ids=ids).logits
    try:
        hf.patch_model_type(model_type, center=center, centering_mode="momentum")
        attention = ATTENTION.get(model_type, "sdpa")
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=attention).eval()
        with pytest.raises(ValueError, match="saved centred"):
            hf.patch_model_type(model_type, center=("embeddings",), centering_mode="causal")
            AutoModelForCausalLM.from_pretrained(tmp_path)
    finally:
        hf.unpatch_model_type(model_type)
    for name, module in _centering_modules(centred).items():
        assert module.num_updates.item() == 2
        torch.testing.assert_close(_centering_modules(loaded)[name].running_mean, module.running_mean, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)

    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # drops the statistics as unexpected keys
    with pytest.raises(ValueError, match="patch_model_type"):
        hf.patch(plain, center=center, centering_mode="momentum")


def test_patch_model_type_centres_a_plain_checkpoint_from_zero(tmp_path):
    """A checkpoint without statistics (a pretrained model to fine-tune centred): they start at zero, never at
    uninitialised memory, and the weights load as saved."""
    reference = tiny_model("qwen3")
    reference.save_pretrained(tmp_path)
    try:
        hf.patch_model_type("qwen3", center=hf.CENTER_PLACEMENTS, centering_mode="learnable")
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    finally:
        hf.unpatch_model_type("qwen3")
    modules = _centering_modules(loaded)
    assert len(modules) == 1 + 2 * 2  # embeddings, and values and mlp in each of the 2 layers
    for module in modules.values():
        assert not module.running_mean.any() and module.num_updates.item() == 0 and not module.center.any()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_meta_device_then_to_empty_initialises_the_statistics():
    """A model built on the meta device (as for FSDP), patched, materialised with to_empty (uninitialised
    memory, made visible here as NaN) and initialised with transformers' init_weights(): the centering
    statistics and the learnable centre are zero, like every other weight initialised."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_model("llama").config)
    hf.patch(model, center=hf.CENTER_PLACEMENTS, centering_mode="learnable")
    model.to_empty(device="cpu")
    for module in _centering_modules(model).values():
        for tensor in (module.running_mean, module.center.data):
            tensor.fill_(float("nan"))
        module.num_updates.fill_(-(2**40))
    model.init_weights()
    for name, module in _centering_modules(model).items():
        assert not module.running_mean.any() and module.num_updates.item() == 0 and not module.center.any(), name


# ---------------------------------------------------------------------------------------------------------
# PEFT in either order, and replaced modules.
# ---------------------------------------------------------------------------------------------------------


def _centred_outputs(model):
    """Hooks recording the centred embeddings (the first layer's input) and the first layer's values."""
    seen = {}
    inner = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    layer = inner.layers[0]
    layer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(embeddings=args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True,
    )
    layer.self_attn.register_forward_pre_hook(lambda m, args, kwargs: seen.clear() or None, with_kwargs=True)

    def values(module, args, output):
        seen["values"] = output

    return seen, layer.self_attn, values


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft reads transformers' old name
def test_centering_with_lora_on_the_centred_modules_in_either_order():
    """LoRA on embed_tokens and v_proj, patched before or after get_peft_model: the centering applies to the
    LoRA layer's whole output (base + adapter), so in training (mode "simple") the centred embeddings and
    values have zero mean over the batch, and both orders compute the same loss and gradients. merge_and_unload
    moves the centering back onto the merged layer with its statistics."""
    peft = pytest.importorskip("peft")
    base = tiny_model("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"], init_lora_weights=False)
    center = ("embeddings", "values")
    torch.manual_seed(1)
    lora_first = hf.patch(peft.get_peft_model(copy.deepcopy(base), config), center=center)
    torch.manual_seed(1)
    patch_first = peft.get_peft_model(hf.patch(copy.deepcopy(base), center=center), config)
    ids, labels = make_batch()
    results = []
    for model in (lora_first, patch_first):
        means = {}
        inner = model.get_base_model().model
        inner.layers[0].register_forward_pre_hook(
            lambda m, args, kwargs: means.update(embeddings=(args[0] if args else kwargs["hidden_states"])),
            with_kwargs=True,
        )
        model(input_ids=ids, labels=labels)  # the first forward, after which the modules are where they stay
        v_proj = inner.layers[0].self_attn.v_proj
        v_proj.register_forward_hook(lambda m, args, out: means.update(values=out))
        model.zero_grad()
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        for name, x in means.items():
            mean = x.double().mean(dim=(0, 1))
            assert mean.abs().max() < 1e-5 * x.abs().max(), f"{name} are not centred: mean {mean.abs().max():.2e}"
        results.append((out.loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, **FP32)
    assert grads_a.keys() == grads_b.keys() and any("lora" in n for n in grads_a)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, **FP32, msg=lambda m: f"{name}: {m}")

    patch_first.eval()
    with torch.no_grad():
        before = patch_first(input_ids=ids).logits
        merged = patch_first.merge_and_unload()
        after = merged(input_ids=ids).logits
    assert type(merged.model.embed_tokens) is torch.nn.Embedding
    assert merged.model.embed_tokens.fastcenter_bias.num_updates.item() == 2
    torch.testing.assert_close(after, before, **FP32)


def test_centering_follows_resize_token_embeddings():
    """resize_token_embeddings builds a new embedding module: the centering moves to it with its statistics."""
    model = hf.patch(tiny_model("mistral"), center=("embeddings",))
    model(input_ids=make_batch()[0])
    running_mean = model.model.embed_tokens.fastcenter_bias.running_mean.clone()
    model.resize_token_embeddings(VOCAB + 8)
    seen = []
    model.model.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[VOCAB + 3, 5]]))
    embed = model.model.embed_tokens
    torch.testing.assert_close(embed.fastcenter_bias.running_mean, running_mean, rtol=0, atol=0)
    torch.testing.assert_close(seen[0][0], embed.weight[[VOCAB + 3, 5]] - running_mean, **FP32)


# ---------------------------------------------------------------------------------------------------------
# Argument slips and weight decay.
# ---------------------------------------------------------------------------------------------------------


def test_argument_slips_get_clear_errors():
    model = tiny_model("llama")
    assert hf.patch(copy.deepcopy(model), center=None).config.to_dict().get("fastcenter_centering") is None
    for call in (hf.patch, hf.patch_model_type):
        target = copy.deepcopy(model) if call is hf.patch else "llama"
        with pytest.raises(ValueError, match="centering_mode='causal' without center"):
            call(target, centering_mode="causal")
        with pytest.raises(TypeError, match="center must"):
            call(target, center=3)
        with pytest.raises(ValueError, match="centering_mode must be one of"):
            call(target, center="mlp", centering_mode="median")
    assert "_fastcenter_hf" not in AutoModelForCausalLM.from_config(model.config).__dict__


def test_learnable_centre_gets_no_weight_decay(tmp_path):
    """Trainer decays every parameter whose name does not contain "bias" or a norm's name; the centering
    module's name keeps the learnable centre out, as the centering's contract says."""
    model = hf.patch(tiny_model("llama"), center=hf.CENTER_PLACEMENTS, centering_mode="learnable")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), weight_decay=0.1, report_to="none", use_cpu=True)
    trainer = transformers.Trainer(model=model, args=args)
    decayed = set(trainer.get_decay_parameter_names(model))
    centres = [name for name, _ in model.named_parameters() if name.endswith("fastcenter_bias.center")]
    assert len(centres) == 5 and not decayed & set(centres)
    assert "model.layers.0.mlp.down_proj.weight" in decayed
    groups = trainer.create_optimizer().param_groups
    centre_params = {id(p) for n, p in model.named_parameters() if n in centres}
    assert all(g["weight_decay"] == 0.0 for g in groups if centre_params & {id(p) for p in g["params"]})
