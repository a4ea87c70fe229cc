"""fastcenter.hf: patched vs unpatched transformers causal LMs, on tiny random models built offline (see
hf_models.py): the same loss and gradients for every family, and the guard rails around the head and the patch.

The patched model runs the real kernels (interpreted on the CPU under TRITON_INTERPRET=1, see conftest.py), or
the reference where a test says so. Centering: test_hf_centering.py; trainers: test_hf_trainers.py; FSDP2 and
DDP: test_hf_distributed.py.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hf_models import (
    FAMILIES,
    FP32,
    GATED_OP,
    LAYERS,
    NORMS_PER_LAYER,
    SEQ,
    VOCAB,
    assert_same_training,
    count_op_calls,
    loss_and_grads,
    make_batch,
    pair,
    tiny_config,
    tiny_model,
    transformers,
)
from torch import nn
from transformers import AutoModelForCausalLM

from fastcenter import hf, ops

# aot_eager: Dynamo's graph capture (where graph breaks would show) plus AOTAutograd's trace of the backward
# through the custom ops' fake implementations; no Inductor build, which would cost minutes on 2 cores.
COMPILE_BACKEND = "aot_eager"  # float32 accumulation-order noise (losses and gradients of O(0.01-1))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny matmuls: one thread is as fast and unaffected by the other core's load."""


@pytest.fixture
def op_calls(monkeypatch):
    return count_op_calls(monkeypatch)


# ---------------------------------------------------------------------------------------------------------
# Same loss and gradients: every family, tied and untied, kernels and reference, with num_items_in_batch.
# ---------------------------------------------------------------------------------------------------------


# kernels: the Triton kernels (interpreted here); cpu: fastcenter's CPU implementation, what a CPU-only user runs;
# reference: fastcenter.reference. The CPU implementation is tested against the reference op by op
# (the cpu_* tests of tests/test_norm.py, test_rope.py, test_swiglu.py and test_cross_entropy.py), so here it
# runs once per family.
BACKENDS = [("kernels", False), ("kernels", True), ("reference", False), ("reference", True), ("cpu", False)]


@pytest.mark.parametrize("backend, tied", BACKENDS, ids=[f"{b}-{'tied' if t else 'untied'}" for b, t in BACKENDS])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_same_loss_and_gradients(model_type, tied, backend, op_calls, monkeypatch):
    reference, patched = pair(model_type, tied=tied)
    ids, labels = make_batch()
    if backend == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # read by ops.backend() at each call
    forced = "reference" if backend == "reference" else None
    with ops.using(forced):
        assert ops.backend(ids.float()) == {"kernels": "triton"}.get(backend, backend)

    out = assert_same_training(reference, patched, forced, input_ids=ids, labels=labels)
    assert out.logits is None  # training with labels: the logits were never formed
    assert op_calls["rms_norm"] == LAYERS * NORMS_PER_LAYER.get(model_type, 2) + 1
    assert op_calls["rope"] == LAYERS and op_calls["linear_cross_entropy"] == 1
    # A mixture of experts' sparse layers call swiglu per expert (transformers 4) or once (transformers 5's
    # grouped experts); its last layer is a dense MLP here. Gemma's MLPs are GeGLU.
    gated, other = ("geglu", "swiglu") if GATED_OP.get(model_type) == "geglu" else ("swiglu", "geglu")
    assert op_calls[gated] == LAYERS if model_type != "qwen3_moe" else op_calls[gated] >= LAYERS
    assert op_calls[other] == 0

    # num_items_in_batch (the Trainer's token count over all accumulated micro-batches): sum / count; a mixture
    # of experts adds its router's load-balancing loss when asked for the router logits.
    num_items = torch.tensor(int((labels[:, 1:] != -100).sum()) + 7)
    extra = dict(output_router_logits=True) if model_type == "qwen3_moe" else {}
    out = assert_same_training(
        reference, patched, forced, input_ids=ids, labels=labels, num_items_in_batch=num_items, **extra
    )
    if extra:
        assert out.aux_loss is not None and out.router_logits is not None


def test_per_row_position_ids():
    """Rows with their own positions (left padding, packed sequences): one rope table row per (row, position)."""
    reference, patched = pair("llama")
    ids, labels = make_batch(3)
    offsets = torch.tensor([[0], [5], [40]])
    position_ids = torch.arange(SEQ).expand(3, SEQ) + offsets
    assert_same_training(reference, patched, input_ids=ids, labels=labels, position_ids=position_ids)


def test_shift_labels_ignore_index_and_logits_to_keep():
    reference, patched = pair("qwen3")
    ids, labels = make_batch()
    shifted = F.pad(labels, (0, 1), value=-1)[:, 1:].clone()
    shifted[shifted == -100] = -1
    shifted[0, 2] = -1
    assert_same_training(reference, patched, input_ids=ids, labels=labels, shift_labels=shifted, ignore_index=-1)
    # logits_to_keep: the loss covers only the last k positions (labels given for those)
    k = 6
    assert_same_training(reference, patched, input_ids=ids, labels=labels[:, -k:], logits_to_keep=k)


def test_logits_only_when_asked():
    reference, patched = pair("mistral")
    ids, labels = make_batch()
    with torch.no_grad():
        ref = reference(input_ids=ids, labels=labels)
        assert patched(input_ids=ids, labels=labels).logits is None
        asked = patched(input_ids=ids, labels=labels, return_logits=True)
        torch.testing.assert_close(asked.logits, ref.logits, **FP32)
        torch.testing.assert_close(asked.loss, ref.loss, **FP32)
        no_labels = patched(input_ids=ids)
        torch.testing.assert_close(no_labels.logits, ref.logits, **FP32)
        reference.eval(), patched.eval()  # eval (Trainer.evaluate, metrics) gets the logits as usual
        evaluated = patched(input_ids=ids, labels=labels)
        torch.testing.assert_close(evaluated.logits, reference(input_ids=ids, labels=labels).logits, **FP32)


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe"])
def test_tuple_output_keeps_transformers_positions(model_type):
    """return_dict=False: transformers' tuple holds its non-None fields in order, (loss, logits, cache, ...), or
    (loss, aux_loss, logits, cache, router_logits) for a mixture of experts. Without logits, their place holds
    None, so no later field (the cache) moves into it."""
    reference, patched = pair(model_type)
    ids, labels = make_batch()
    inputs = dict(input_ids=ids, labels=labels, return_dict=False, use_cache=True)
    if model_type == "qwen3_moe":
        inputs["output_router_logits"] = True
    with torch.no_grad():
        expected, got = reference(**inputs), patched(**inputs)
    assert isinstance(got, tuple) and len(got) == len(expected)
    for index, (want, have) in enumerate(zip(expected, got)):
        if torch.is_tensor(want) and want.dim() == 3 and want.shape[-1] == VOCAB:  # the logits
            assert have is None, index
        elif torch.is_tensor(want):
            torch.testing.assert_close(have, want, **FP32)
        elif isinstance(want, tuple):  # the router logits per layer
            torch.testing.assert_close(have, want, **FP32)
        else:  # the cache
            assert type(have) is type(want) and have.get_seq_length() == want.get_seq_length() == SEQ, index


@pytest.mark.parametrize(
    "model_type, dtype, backend",
    # The interpreter cannot run tl.dot on bf16 (triton#11584): bf16 through the reference, fp16 through the kernels.
    [("qwen3", torch.bfloat16, "reference"), ("qwen3", torch.float16, None), ("gemma2", torch.float16, None)],
    ids=["bf16-reference", "fp16-kernels", "gemma2-fp16-kernels"],
)
def test_autocast(model_type, dtype, backend):
    """Under autocast the two models round differently (transformers rounds the logits and their gradient to
    the autocast dtype, the fused loss keeps float32 accumulators), so each is held against the float32 truth:
    the patched model must be at least about as accurate as the unpatched one, parameter by parameter. Qwen3:
    its q/k norms see a half-precision input with a float32 weight. Gemma 2: (1 + weight) norms, GeGLU and both
    softcaps in half precision."""
    reference, patched = pair(model_type, tied=True)
    ids, labels = make_batch()
    truth, true_grads = loss_and_grads(copy.deepcopy(reference), input_ids=ids, labels=labels)
    with torch.autocast("cpu", dtype=dtype):
        ref_out, ref_grads = loss_and_grads(reference, input_ids=ids, labels=labels)
        out, grads = loss_and_grads(patched, backend, input_ids=ids, labels=labels)
    assert out.loss.dtype == ref_out.loss.dtype == torch.float32
    # Both errors are rounding noise of the autocast dtype, so the bound allows a factor 2 and one rounding
    # (the spec's per-dtype tolerance); a wrong computation would be off by far more.
    rounding = 1.6e-2 if dtype == torch.bfloat16 else 2e-3
    assert abs(out.loss - truth.loss) <= 2 * abs(ref_out.loss - truth.loss) + rounding * truth.loss
    for name, true in true_grads.items():
        ref_error = float((ref_grads[name] - true).norm() / true.norm())
        error = float((grads[name] - true).norm() / true.norm())
        assert error <= 2 * ref_error + rounding, f"{name}: relative error {error:.2e} (unpatched {ref_error:.2e})"


# ---------------------------------------------------------------------------------------------------------
# Guard rails: wrapped heads, unsupported models, patching twice, other models untouched.
# ---------------------------------------------------------------------------------------------------------


class SavedCopy(nn.Module):
    """A head wrapper of PEFT's modules_to_save kind: the forward uses a trainable copy, while `.weight` still
    reads the frozen original, which is what a loss reading `lm_head.weight` would silently train nothing of."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.original_module = linear.requires_grad_(False)
        self.modules_to_save = nn.ModuleDict({"default": copy.deepcopy(linear).requires_grad_(True)})

    @property
    def weight(self):
        return self.original_module.weight

    def forward(self, x):
        return self.modules_to_save["default"](x)


def _double(module, args, output):
    return 2 * output


@pytest.mark.parametrize("wrap", ["saved_copy", "hooked_linear"])
def test_wrapped_head_falls_back_with_correct_gradients(wrap):
    reference, patched = pair("llama")
    for model in (reference, patched):
        if wrap == "saved_copy":
            model.lm_head = SavedCopy(model.lm_head)
        else:
            model.lm_head.register_forward_hook(_double)
    ids, labels = make_batch()
    with pytest.warns(UserWarning, match="lm_head"):
        assert_same_training(reference, patched, input_ids=ids, labels=labels)
    if wrap == "saved_copy":
        assert patched.lm_head.modules_to_save["default"].weight.grad.abs().max() > 0


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft reads transformers' old name
def test_peft_lora_head():
    """LoRA on lm_head: the adapters get their gradients (the fused loss on W + s * B @ A), whichever order
    PEFT and patch are applied in; with dropout in effect the logits are formed instead, with a warning."""
    peft = pytest.importorskip("peft")
    base = tiny_model("llama")
    for dropout in (0.0, 0.1):
        config = peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "lm_head"], init_lora_weights=False
        )
        for order in ("peft_then_patch", "patch_then_peft"):
            torch.manual_seed(1)
            reference = peft.get_peft_model(copy.deepcopy(base), config)
            torch.manual_seed(1)
            if order == "peft_then_patch":
                patched = hf.patch(peft.get_peft_model(copy.deepcopy(base), config))
            else:
                patched = peft.get_peft_model(hf.patch(copy.deepcopy(base)), config)
            ids, labels = make_batch()
            torch.manual_seed(2)
            ref_out, ref_grads = loss_and_grads(reference, input_ids=ids, labels=labels)
            torch.manual_seed(2)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out, grads = loss_and_grads(patched, input_ids=ids, labels=labels)
            fell_back = any("lm_head" in str(w.message) for w in caught)
            assert fell_back == (dropout > 0), (dropout, order, [str(w.message) for w in caught])
            assert (out.logits is None) == (dropout == 0)
            torch.testing.assert_close(out.loss, ref_out.loss, **FP32)
            head_adapters = [name for name in ref_grads if "lm_head" in name]
            assert len(head_adapters) == 2
            for name, expected in ref_grads.items():
                assert grads[name] is not None and grads[name].abs().max() > 0, f"{name} got no gradient"
                torch.testing.assert_close(grads[name], expected, **FP32, msg=lambda m: f"{name}: {m}")


def test_unsupported_models_get_a_clear_error():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(ValueError, match="llama, mistral, qwen2, qwen3.*model_type='gpt2'"):
        hf.patch(gpt2)
    with pytest.raises(ValueError, match="causal LM"):
        hf.patch(transformers.LlamaModel(tiny_config("llama")))
    with pytest.raises(ValueError, match="llama, mistral, qwen2, qwen3"):
        hf.patch_model_type("gpt2")
    with pytest.raises(ValueError, match="center placements"):
        hf.patch(tiny_model(), center=("residual",))
    with pytest.raises(ValueError, match="centering_mode"):
        hf.patch(tiny_model(), center=("embeddings",), centering_mode="median")


def test_patching_twice_is_harmless():
    reference = tiny_model("qwen2")
    once = hf.patch(copy.deepcopy(reference), center=("embeddings",))
    twice = hf.patch(hf.patch(copy.deepcopy(reference), center=("embeddings",)), center=("embeddings",))
    assert len(twice.model.embed_tokens._forward_hooks) == 1
    ids, labels = make_batch()
    assert_same_training(once, twice, input_ids=ids, labels=labels)
    counted = twice.model.embed_tokens.fastcenter_bias.num_updates.item()
    hf.patch(twice, center=("embeddings",))  # statistics are kept
    assert twice.model.embed_tokens.fastcenter_bias.num_updates.item() == counted == 1
    with pytest.raises(ValueError, match="already centred"):
        hf.patch(twice, center=("embeddings",), centering_mode="causal")


def test_other_models_of_the_family_are_untouched(op_calls):
    reference, patched = pair("llama")
    ids, labels = make_batch()
    before = copy.deepcopy(reference)
    out = reference(input_ids=ids, labels=labels)
    assert sum(op_calls.values()) == 0  # the rope dispatcher is installed, but only patched attention uses it
    torch.testing.assert_close(out.logits, before(input_ids=ids, labels=labels).logits, rtol=0, atol=0)
    copied = copy.deepcopy(patched)  # a deep copy of a patched model is patched, and runs on its own weights
    with torch.no_grad():
        copied.lm_head.weight.mul_(2)
    assert copied(input_ids=ids, labels=labels).loss.item() != patched(input_ids=ids, labels=labels).loss.item()
    assert patched.state_dict().keys() == reference.state_dict().keys()


def test_patch_model_type_before_loading(tmp_path):
    reference = tiny_model("qwen2")
    reference.save_pretrained(tmp_path)
    try:
        hf.patch_model_type("qwen2")
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").train()
        built = AutoModelForCausalLM.from_config(tiny_config("qwen2"))
    finally:
        hf.unpatch_model_type("qwen2")
    plain = AutoModelForCausalLM.from_config(tiny_config("qwen2"))
    for model in (loaded, built):
        assert "_fastcenter_hf" in model.__dict__ and "fastcenter" in repr(model.model.norm)
    assert "_fastcenter_hf" not in plain.__dict__ and "fastcenter" not in repr(plain)
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    ids, labels = make_batch()
    assert_same_training(reference, loaded, input_ids=ids, labels=labels)


def test_generation():
    """Greedy generation with the key/value cache (rope at the cached positions) matches transformers'; causal
    centering refuses the cache with a clear error and generates without it."""
    reference, patched = pair("llama")
    reference.eval(), patched.eval()
    prompt = torch.randint(0, VOCAB, (2, 5))
    settings = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    expected = reference.generate(prompt, **settings)
    torch.testing.assert_close(patched.generate(prompt, **settings), expected, rtol=0, atol=0)
    centred = hf.patch(copy.deepcopy(reference), center=("embeddings",), centering_mode="causal").eval()
    with pytest.raises(NotImplementedError, match="use_cache=False"):
        centred.generate(prompt, **settings)
    assert centred.generate(prompt, use_cache=False, **settings).shape == expected.shape
    simple = hf.patch(copy.deepcopy(reference).train(), center=("embeddings",))  # the default mode
    simple(input_ids=torch.randint(0, VOCAB, (2, 7)))  # one training forward: a nonzero running mean
    simple.eval()
    cached, uncached = (simple.generate(prompt, use_cache=c, **settings) for c in (True, False))
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_gemma_generation_and_eval_logits(model_type):
    """Gemma in eval: greedy generation with the key/value cache past the sliding window (rope at the cached
    positions of both layer kinds; Gemma 2's softcaps) gives transformers' tokens, and a forward with labels gives
    its (softcapped) logits and loss."""
    reference, patched = pair(model_type)
    reference.eval(), patched.eval()
    prompt = torch.randint(0, VOCAB, (2, 5))
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = reference.generate(prompt, **settings)
    torch.testing.assert_close(patched.generate(prompt, **settings), expected, rtol=0, atol=0)
    ids, labels = make_batch()
    with torch.no_grad():
        want, got = reference(input_ids=ids, labels=labels), patched(input_ids=ids, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, **FP32)
    torch.testing.assert_close(got.loss, want.loss, **FP32)


def test_gradient_checkpointing(op_calls):
    """Checkpointed layers recompute through the same fastcenter path (rope runs again in the recomputation);
    centering inside the layers is refused."""
    _, patched = pair("llama", center=("embeddings",))
    checkpointed = copy.deepcopy(patched)
    if hasattr(checkpointed, "activation_checkpointing_enable"):  # transformers 5 renamed it
        checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, labels = make_batch()
    expected, expected_grads = loss_and_grads(patched, input_ids=ids, labels=labels)
    assert op_calls["rope"] == LAYERS
    out, grads = loss_and_grads(checkpointed, input_ids=ids, labels=labels)
    assert op_calls["rope"] == 3 * LAYERS  # forward, then the recomputation in the backward
    torch.testing.assert_close(out.loss, expected.loss, **FP32)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, **FP32, msg=lambda m: f"{name}: {m}")
    hf.patch(checkpointed, center=("values",))
    with pytest.raises(NotImplementedError, match="gradient checkpointing"):
        checkpointed(input_ids=ids, labels=labels)


# ---------------------------------------------------------------------------------------------------------
# Trainer with gradient accumulation, and torch.compile.
# ---------------------------------------------------------------------------------------------------------


def test_compile_fullgraph():
    """The patched model (centering included) traces with fullgraph=True where the unpatched one does, and
    computes the same loss and gradients as in eager mode. (The unpatched model is traced only if the patched
    one fails, to tell a fastcenter failure from a transformers one: tracing costs seconds here.)"""
    reference, patched = pair("llama", center=("embeddings",))
    ids, labels = make_batch()
    eager_out, eager_grads = loss_and_grads(copy.deepcopy(patched), input_ids=ids, labels=labels)
    torch._dynamo.reset()
    try:
        out = torch.compile(patched, fullgraph=True, backend=COMPILE_BACKEND)(input_ids=ids, labels=labels)
        out.loss.backward()
    except Exception:
        torch._dynamo.reset()
        try:
            torch.compile(reference, fullgraph=True, backend=COMPILE_BACKEND)(input_ids=ids, labels=labels)
        except Exception as exc:
            pytest.skip(f"the unpatched model does not trace with fullgraph=True here either: {exc!r:.300}")
        raise
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out.loss, eager_out.loss, **FP32)
    for name, param in patched.named_parameters():
        torch.testing.assert_close(param.grad, eager_grads[name], **FP32, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["kernels", "cpu"])
def test_out_of_range_label(backend, monkeypatch):
    """A label outside [0, V) that is not ignore_index (transformers raises an IndexError): the fused loss is NaN,
    never a finite wrong number (fastcenter.ops' contract), and FASTCENTER_CHECKS=1 turns it into a ValueError."""
    _, patched = pair("qwen2")
    ids, labels = make_batch()
    labels[0, 3] = VOCAB + 5
    if backend == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    with torch.no_grad():
        assert torch.isnan(patched(input_ids=ids, labels=labels).loss)
        monkeypatch.setenv("FASTCENTER_CHECKS", "1")
        with pytest.raises(ValueError, match="target"):
            patched(input_ids=ids, labels=labels)
