"""The model: size, fused == eager, loss == logits, causality and batch independence of every centering
placement and mode, the attention facts behind the placements, the architecture options (nanoGPT's) against a
plain float64 formulation, the default model's losses as they were, sampling and the sample CLI.

Small configs (dim 32-48, 2 layers, odd vocabularies, ragged T) keep the interpreted kernels affordable on CPU.
"""

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, ON_GPU
from helpers import train_script

from fastcenter import checkpoint, data, reference
from fastcenter import model as model_module
from fastcenter.model import GPT, NANOGPT, PLACEMENTS, GPTConfig, parse_placements
from fastcenter.nn import CENTERING_MODES, VectorCentering

# The architectures the leak tests hold for: the default model's, and nanoGPT's (LayerNorm with biases, GELU MLP,
# learned positions: the model's options).
ARCHS = {"default": {}, "nanogpt": NANOGPT}


def small_config(**overrides) -> GPTConfig:
    fields = dict(vocab_size=97, dim=48, n_layers=2, n_heads=2, max_seq_len=33)
    fields.update(overrides)
    return GPTConfig(**fields)


def tokens(config: GPTConfig, B: int, T: int) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (B, T), device=DEVICE)


def randomize_centering(model: GPT, scale: float = 0.02) -> None:
    """Give every centering module non-trivial statistics (and learnable centres), as after some training."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, VectorCentering):
                m.running_mean.normal_(0.0, scale)
                m.num_updates.fill_(7)
                if m.center is not None:
                    m.center.normal_(0.0, scale)


def train_a_few_steps(model: GPT, steps: int = 3, B: int = 4, T: int = 16) -> None:
    """A few real optimizer steps in training mode: running means and learnable centres become non-zero."""
    model.train()
    opt = torch.optim.AdamW(model.optim_groups(0.1), lr=1e-2)
    for _ in range(steps):
        idx = tokens(model.config, B, T + 1)
        loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


# ---------------------------------------------------------------------------------------------------------------
# Config and size
# ---------------------------------------------------------------------------------------------------------------


def test_the_residual_placement_is_its_inner_and_final_parts():
    def centred_blocks(center):
        model = GPT(GPTConfig(vocab_size=50, dim=16, n_layers=3, n_heads=2, max_seq_len=8, center=center))
        return [b.residual_center is not None for b in model.blocks]

    assert centred_blocks("residual") == [True, True, True]
    assert centred_blocks("residual_inner") == [True, True, False]
    assert centred_blocks("residual_final") == [False, False, True]
    assert GPTConfig(center="residual_inner,residual_final").center == ("residual",)  # both are the whole
    assert GPTConfig(center=["residual", "residual_final"]).center == ("residual",)
    assert GPTConfig(center="residual_final,v").center == ("residual_final", "v")


def test_default_model_has_exactly_17062400_parameters():
    config = GPTConfig()
    model = GPT(config)
    assert model.num_params() == 17_062_400
    # Counted independently: every unique tensor once (the embedding is the output head: no second matrix).
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert sum(unique.values()) == 17_062_400
    assert not any(p is model.tok_emb.weight for n, p in model.named_parameters() if not n.startswith("tok_emb"))
    assert model.num_params(non_embedding=True) == 17_062_400 - data.GPT2_VOCAB_SIZE * 256
    # Training FLOPs per token: 6 x (every weight of a matmul, the head once) + the attention term.
    matmul_weights = 17_062_400 - (2 * 4 + 1) * 256  # all but the norm gains
    assert model.flops_per_token(512) == 6 * matmul_weights + 12 * 4 * 256 * 512


def test_config_validation_and_json_round_trip():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(dim=250, n_heads=4)
    with pytest.raises(ValueError, match="even"):
        GPTConfig(dim=36, n_heads=4)  # head dim 9
    with pytest.raises(ValueError, match="placement"):
        GPTConfig(center=("qk", "keys"))
    with pytest.raises(ValueError, match="centering_mode"):
        GPTConfig(centering_mode="batchnorm")
    with pytest.raises(ValueError, match="n_layers"):
        GPTConfig(n_layers=0)
    assert GPTConfig(center="v,qk").center == ("qk", "v")
    assert GPTConfig(center=["residual", "mlp", "mlp"]).center == ("mlp", "residual")
    assert GPTConfig(center="qk+v").center == parse_placements(("v", "qk"))
    assert GPTConfig(center="all").center == tuple(sorted(PLACEMENTS))
    assert GPTConfig(center="").center == ()
    config = GPTConfig(dim=64, center="residual,embeddings", centering_mode="causal", fused=True)
    restored = GPTConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    with pytest.raises(ValueError, match="unknown"):
        GPTConfig.from_dict({**config.to_dict(), "lr": 1e-3})
    assert GPTConfig.from_dict({**config.to_dict(), "lr": 1e-3}, strict=False) == config


def test_bad_inputs_raise_clear_errors():
    config = small_config(max_seq_len=8)
    model = GPT(config).to(DEVICE)
    idx = tokens(config, 2, 8)
    with pytest.raises(TypeError, match="idx"):
        model(idx.float())
    with pytest.raises(TypeError, match="idx"):
        model(idx.int())
    with pytest.raises(ValueError, match="idx"):
        model(idx[0])
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(config, 2, 9))
    with pytest.raises(ValueError, match="targets"):
        model(idx, idx[:, :-1])
    with pytest.raises(TypeError, match="config"):
        GPT(config.to_dict())


def test_optim_groups_decay_matrices_only():
    model = GPT(small_config(center="all", centering_mode="learnable"))
    decay, no_decay = model.optim_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert id(model.tok_emb.weight) in decayed and len(decay["params"]) == len(decayed)  # the tied matrix, once
    centres = [m.center for m in model.modules() if isinstance(m, VectorCentering)]
    assert len(centres) == 2 * 5 + 1 and not any(id(c) in decayed for c in centres)  # q k v res mlp, emb
    grouped = decay["params"] + no_decay["params"]
    assert len({id(p) for p in grouped}) == len(grouped) == len(list(model.parameters()))


# ---------------------------------------------------------------------------------------------------------------
# Fused path == eager path, and loss == cross-entropy of the logits
# ---------------------------------------------------------------------------------------------------------------


# Fused vs eager in float32. Interpreted kernels (CPU) do float32 math: accumulation-order noise only. On a GPU
# the loss kernel may run its float32 matmuls in TF32 (10-bit mantissa), so agreement is looser there.
PATH_TOL = dict(rtol=2e-3, atol=2e-3) if ON_GPU else dict(rtol=1e-5, atol=1e-5)
GRAD_RTOL = 2e-2 if ON_GPU else 1e-4


@pytest.mark.parametrize(
    "center,mode",
    [
        ((), "adaptive"),
        (("embeddings",), "simple"),
        (("qk", "v"), "causal"),
        (("qk", "v"), "learnable"),
        (("residual",), "causal"),
        (("residual",), "simple"),
        (("mlp",), "momentum"),
        (("embeddings", "mlp", "residual"), "learnable"),
    ],
)
def test_fused_and_eager_paths_agree(center, mode):
    eager = GPT(small_config(center=center, centering_mode=mode, fused=False)).to(DEVICE)
    randomize_centering(eager)
    fused = GPT(small_config(center=center, centering_mode=mode, fused=True)).to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    idx, targets = tokens(eager.config, 3, 11), tokens(eager.config, 3, 11)

    losses = {}
    for name, model in (("eager", eager), ("fused", fused)):
        model.train()
        losses[name] = model(idx, targets)
        losses[name].backward()
    assert losses["fused"].dtype == losses["eager"].dtype == torch.float32
    torch.testing.assert_close(losses["fused"], losses["eager"], **PATH_TOL)
    eager_params = dict(eager.named_parameters())
    for name, p in fused.named_parameters():
        expected = eager_params[name].grad
        assert p.grad is not None and expected is not None, name
        scale = expected.abs().max().item()
        torch.testing.assert_close(p.grad, expected, rtol=GRAD_RTOL, atol=GRAD_RTOL * 0.1 * scale + 1e-9, msg=name)
    # The centering statistics were updated identically in training mode.
    eager_buffers = dict(eager.named_buffers())
    for name, b in fused.named_buffers():
        torch.testing.assert_close(b, eager_buffers[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(not ON_GPU, reason="bf16 autocast of the fused path needs the compiled kernels (GPU)")
def test_fused_and_eager_paths_agree_under_bf16_autocast():
    eager = GPT(small_config(center="all", centering_mode="causal", dim=64, vocab_size=1000)).to(DEVICE)
    randomize_centering(eager)
    fused = GPT(small_config(center="all", centering_mode="causal", dim=64, vocab_size=1000, fused=True)).to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    idx, targets = tokens(eager.config, 4, 33), tokens(eager.config, 4, 33)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_e, loss_f = eager(idx, targets), fused(idx, targets)
    loss_e.backward()
    loss_f.backward()
    assert loss_f.dtype == torch.float32
    torch.testing.assert_close(loss_f, loss_e, rtol=2e-2, atol=2e-2)
    grads_e = dict(eager.named_parameters())
    for name, p in fused.named_parameters():
        g, ge = p.grad.float(), grads_e[name].grad.float()
        cosine = F.cosine_similarity(g.flatten(), ge.flatten(), dim=0)
        assert cosine > 0.99, (name, cosine.item())


@pytest.mark.parametrize("fused", [False, True])
def test_loss_equals_cross_entropy_of_logits(fused):
    model = GPT(small_config(vocab_size=211, center="residual,v", centering_mode="adaptive", fused=fused)).to(DEVICE)
    randomize_centering(model)
    model.eval()
    idx, targets = tokens(model.config, 2, 17), tokens(model.config, 2, 17)
    logits = model(idx)
    assert logits.shape == (2, 17, 211)
    loss = model(idx, targets)
    expected = F.cross_entropy(logits.double().view(-1, 211), targets.view(-1))
    torch.testing.assert_close(loss.double(), expected, **PATH_TOL)


def test_training_reduces_loss_on_a_fixed_batch():
    """The model learns: a few steps on one batch must lower its loss (catches detached or mis-tied weights)."""
    model = GPT(small_config(center="all", centering_mode="adaptive")).to(DEVICE)
    idx = tokens(model.config, 4, 17)
    opt = torch.optim.AdamW(model.optim_groups(0.0), lr=3e-3)
    first = None
    for _ in range(15):
        loss = model(idx[:, :-1], idx[:, 1:])
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.3


# ---------------------------------------------------------------------------------------------------------------
# No leaks: causality and batch independence
# ---------------------------------------------------------------------------------------------------------------

LEAK_TOL = dict(rtol=1e-5, atol=1e-6)


def leak_probe(model: GPT, idx: torch.Tensor, t: int):
    """Logits for idx, for idx with tokens after position t of sequence 0 changed, and for idx with sequence 1
    changed. With training-mode models, each forward starts from the same state (buffers update per forward)."""
    V = model.config.vocab_size
    future = idx.clone()
    future[0, t + 1 :] = (future[0, t + 1 :] + 1 + torch.randint_like(future[0, t + 1 :], V - 1)) % V
    other = idx.clone()
    other[1] = (other[1] + 1 + torch.randint_like(other[1], V - 1)) % V
    state = copy.deepcopy(model.state_dict())
    outs = []
    for x in (idx, future, other):
        model.load_state_dict(state)
        with torch.no_grad():
            outs.append(model(x).float())
    return outs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", CENTERING_MODES)
@pytest.mark.parametrize("placement", PLACEMENTS + ("all",))
def test_eval_mode_never_leaks_future_tokens_or_other_sequences(placement, mode, arch):
    model = GPT(small_config(dim=32, center=placement, centering_mode=mode, **ARCHS[arch])).to(DEVICE)
    train_a_few_steps(model)
    if mode != "learnable":
        assert all(m.running_mean.abs().sum() > 0 for m in model.modules() if isinstance(m, VectorCentering))
    model.eval()
    idx, t = tokens(model.config, 3, 12), 5
    base, future, other = leak_probe(model, idx, t)
    torch.testing.assert_close(future[0, : t + 1], base[0, : t + 1], **LEAK_TOL)
    assert not torch.allclose(future[0, t + 1 :], base[0, t + 1 :])  # the probe did change something
    torch.testing.assert_close(other[[0, 2]], base[[0, 2]], **LEAK_TOL)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["simple", "causal"])
def test_fused_path_in_eval_mode_never_leaks(mode, arch):
    model = GPT(small_config(dim=32, center="all", centering_mode=mode, fused=True, **ARCHS[arch])).to(DEVICE)
    train_a_few_steps(model, steps=2)
    model.eval()
    idx, t = tokens(model.config, 3, 12), 6
    base, future, other = leak_probe(model, idx, t)
    torch.testing.assert_close(future[0, : t + 1], base[0, : t + 1], **LEAK_TOL)
    torch.testing.assert_close(other[[0, 2]], base[[0, 2]], **LEAK_TOL)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["adaptive", "learnable", "causal"])
def test_training_mode_is_causal_and_batch_independent_for_non_leaking_modes(mode, arch):
    model = GPT(small_config(dim=32, center="all", centering_mode=mode, **ARCHS[arch])).to(DEVICE)
    train_a_few_steps(model)
    model.train()
    idx, t = tokens(model.config, 3, 12), 4
    base, future, other = leak_probe(model, idx, t)
    torch.testing.assert_close(future[0, : t + 1], base[0, : t + 1], **LEAK_TOL)
    torch.testing.assert_close(other[[0, 2]], base[[0, 2]], **LEAK_TOL)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_training_mode_simple_centering_does_leak(placement, arch):
    """The positive control: batch-mean centering in training mode mixes sequences and positions."""
    model = GPT(small_config(dim=32, center=placement, centering_mode="simple", **ARCHS[arch])).to(DEVICE)
    train_a_few_steps(model)
    model.train()
    idx, t = tokens(model.config, 3, 12), 5
    base, future, other = leak_probe(model, idx, t)
    assert not torch.allclose(other[[0, 2]], base[[0, 2]], **LEAK_TOL)
    assert not torch.allclose(future[0, : t + 1], base[0, : t + 1], **LEAK_TOL)


# ---------------------------------------------------------------------------------------------------------------
# The attention facts behind the qk / v placements, at the model level
# ---------------------------------------------------------------------------------------------------------------


def test_shifting_keys_after_rope_changes_nothing_but_before_rope_it_does(monkeypatch):
    config = small_config(dim=48, n_heads=3, vocab_size=101)
    model = GPT(config).to(DEVICE).eval()
    idx = tokens(config, 2, 13)
    with torch.no_grad():
        base = model(idx)
    # A large shift, the same vector for every key (per head: one vector per head and feature).
    shift = torch.randn(config.n_heads, config.head_dim, device=DEVICE)
    rope = reference.rope

    def shift_after(q, k, cos, sin, **kw):
        q, k = rope(q, k, cos, sin, **kw)
        return q, k - shift

    def shift_before(q, k, cos, sin, **kw):
        return rope(q, k - shift, cos, sin, **kw)

    monkeypatch.setattr(reference, "rope", shift_after)
    with torch.no_grad():
        after = model(idx)
    monkeypatch.setattr(reference, "rope", shift_before)
    with torch.no_grad():
        before = model(idx)
    torch.testing.assert_close(after, base, rtol=1e-4, atol=1e-5)
    # Before RoPE the shift is rotated differently at each position: attention (hence the logits) changes.
    # Position 0 attends only to itself, so its output is unchanged either way; later positions must move.
    assert (before[:, 1:] - base[:, 1:]).abs().max() > 1e-3


def test_value_centering_shifts_every_attention_output_by_the_centre():
    config = small_config(dim=48, n_heads=3, vocab_size=101)
    plain = GPT(config).to(DEVICE).eval()
    centred = GPT(small_config(dim=48, n_heads=3, vocab_size=101, center="v", centering_mode="learnable"))
    centred = centred.to(DEVICE).eval()
    centred.load_state_dict(plain.state_dict(), strict=False)  # same weights; the centres are extra
    block = centred.blocks[0].attn
    with torch.no_grad():
        block.v_center.center.normal_(0.0, 1.0)  # one vector per head and feature, constant over positions
    captured = {}

    def capture(name):
        return lambda module, args: captured.__setitem__(name, args[0].detach().clone())

    plain.blocks[0].attn.proj.register_forward_pre_hook(capture("plain"))
    block.proj.register_forward_pre_hook(capture("centred"))
    idx = tokens(config, 2, 13)
    with torch.no_grad():
        plain(idx)
        centred(idx)
    # Attention weights sum to one, so subtracting c from every value subtracts c from every output.
    expected = captured["plain"] - block.v_center.center
    torch.testing.assert_close(captured["centred"], expected, rtol=1e-5, atol=1e-5)
    assert (captured["centred"] - captured["plain"]).abs().max() > 0.1


def test_qk_centering_happens_before_rope(monkeypatch):
    """With learnable centres c_q, c_k the model equals the plain model whose RoPE input is (q - c_q, k - c_k)."""
    config = small_config(dim=48, n_heads=3, vocab_size=101)
    plain = GPT(config).to(DEVICE).eval()
    centred = GPT(small_config(dim=48, n_heads=3, vocab_size=101, center="qk", centering_mode="learnable"))
    centred = centred.to(DEVICE).eval()
    centred.load_state_dict(plain.state_dict(), strict=False)
    randomize_centering(centred, scale=1.0)
    centres = iter([(b.attn.q_center.center, b.attn.k_center.center) for b in centred.blocks])
    idx = tokens(config, 2, 13)
    with torch.no_grad():
        expected_logits = centred(idx)
    rope = reference.rope

    def centre_then_rotate(q, k, cos, sin, **kw):
        c_q, c_k = next(centres)
        return rope(q - c_q.view(q.shape[-2:]), k - c_k.view(k.shape[-2:]), cos, sin, **kw)

    monkeypatch.setattr(reference, "rope", centre_then_rotate)
    with torch.no_grad():
        logits = plain(idx)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_simple_centering_zeroes_the_batch_mean_exactly_where_placed(placement, monkeypatch):
    """In training mode `simple` subtracts the batch mean, so what reaches the next op has mean 0 over (B, T):
    the stream entering the first block (embeddings) or every later norm (residual, the final norm included),
    the RoPE inputs (qk), the attention values (v), the down projection's input (mlp)."""
    config = small_config(dim=32, n_layers=3, center=placement, centering_mode="simple")
    model = GPT(config).to(DEVICE).train()
    seen = []
    norm, rope, sdpa = reference.center_rms_norm, reference.rope, F.scaled_dot_product_attention

    def record_norm(x, weight, *, center=None, residual=None, **options):
        normed, hidden = norm(x, weight, center=center, residual=residual, **options)
        if center is not None:
            seen.append(hidden.flatten(0, -2))
        return normed, hidden

    def record_rope(q, k, cos, sin, **kw):
        if placement == "qk":
            seen.extend((q.flatten(0, 1).flatten(1), k.flatten(0, 1).flatten(1)))
        return rope(q, k, cos, sin, **kw)

    def record_sdpa(q, k, v, **kw):
        if placement == "v":
            seen.append(v.transpose(1, 2).flatten(0, 1).flatten(1))  # [B, H, T, Dh] -> [B*T, H*Dh]
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(reference, "center_rms_norm", record_norm)
    monkeypatch.setattr(reference, "rope", record_rope)
    monkeypatch.setattr(F, "scaled_dot_product_attention", record_sdpa)
    if placement == "mlp":
        for block in model.blocks:
            block.mlp.down.register_forward_pre_hook(lambda m, args: seen.append(args[0].flatten(0, -2)))
    model(tokens(config, 3, 10), tokens(config, 3, 10))
    expected_count = {"embeddings": 1, "qk": 2 * 3, "v": 3, "residual": 3, "mlp": 3}[placement]
    assert len(seen) == expected_count
    for x in seen:
        mean, typical = x.float().mean(0), x.float().abs().mean()
        assert mean.abs().max() < 1e-5 * typical + 1e-7, (placement, mean.abs().max().item(), typical.item())


# ---------------------------------------------------------------------------------------------------------------
# The default model as it was, and the architecture options
# ---------------------------------------------------------------------------------------------------------------

# Losses of a tiny default-shaped model (below), recorded from the code before the architecture options existed:
# three AdamW steps in training mode, then one eval-mode loss, on the CPU in float32, TRITON_INTERPRET=1 (the
# fused path through the interpreted kernels), torch 2.13. (center, mode) -> path -> the four losses as float.hex.
DEFAULT_MODEL_LOSSES = {
    ((), "adaptive"): {
        "reference": ["0x1.264fda0000000p+2", "0x1.fe537a0000000p+1", "0x1.f4d0560000000p+1", "0x1.a468b80000000p+1"],
        "fused": ["0x1.264fda0000000p+2", "0x1.fe537a0000000p+1", "0x1.f4d0560000000p+1", "0x1.a468b80000000p+1"],
    },
    ("all", "simple"): {
        "reference": ["0x1.264df20000000p+2", "0x1.fc9e8e0000000p+1", "0x1.f6ce420000000p+1", "0x1.b897940000000p+1"],
        "fused": ["0x1.264df40000000p+2", "0x1.fc9e8e0000000p+1", "0x1.f6ce420000000p+1", "0x1.b897900000000p+1"],
    },
}


@pytest.mark.parametrize("path", ["reference", "fused"])
@pytest.mark.parametrize("center, mode", DEFAULT_MODEL_LOSSES)
def test_the_default_model_gives_the_losses_it_gave(center, mode, path):
    """New options leave the default model as it was: same init, same arithmetic, same losses -- bit for bit where
    the run is the recorded one (CPU, interpreted kernels, torch 2.13); elsewhere other kernels round otherwise,
    so within a few float32 roundings."""
    torch.manual_seed(1234)
    fields = dict(vocab_size=97, dim=48, n_layers=2, n_heads=2, max_seq_len=16, center=center, centering_mode=mode)
    config = GPTConfig(**fields, fused=path == "fused")
    model = GPT(config)
    g = torch.Generator().manual_seed(5)
    idx, targets = torch.randint(0, 97, (3, 13), generator=g), torch.randint(0, 97, (3, 13), generator=g)
    opt = torch.optim.AdamW(model.optim_groups(0.1), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(idx, targets)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        losses.append(model(idx, targets).item())
    expected = [float.fromhex(h) for h in DEFAULT_MODEL_LOSSES[(center, mode)][path]]
    recorded_run = os.environ.get("TRITON_INTERPRET") == "1" and torch.__version__.startswith("2.13")
    if recorded_run:
        assert [x.hex() for x in losses] == [x.hex() for x in expected]
    else:
        assert losses == pytest.approx(expected, rel=2e-6)


def plain_gpt(p: dict, idx: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    """The logits of the model, without centering, written out in plain tensor math from the parameters `p`
    (name -> tensor, float64 here): every option from its formula, nothing of fastcenter's."""
    B, T = idx.shape
    H, Dh = config.n_heads, config.head_dim

    def norm(prefix, x):
        w, b = p[prefix + ".weight"], p.get(prefix + ".bias")
        if config.norm == "layernorm":
            mu = x.mean(-1, keepdim=True)
            y = (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + config.norm_eps) * w
            return y if b is None else y + b
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + config.norm_eps) * w

    def linear(prefix, x):
        y = x @ p[prefix + ".weight"].T
        return y if p.get(prefix + ".bias") is None else y + p[prefix + ".bias"]

    def rotate(t):  # half-split pairs (i, i + Dh/2), angles t * base^(-2i/Dh)
        inv = config.rope_base ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
        angle = torch.outer(torch.arange(T, dtype=torch.float64), inv)[:, None, :]  # [T, 1, Dh/2]
        t1, t2 = t[..., : Dh // 2], t[..., Dh // 2 :]
        return torch.cat((t1 * angle.cos() - t2 * angle.sin(), t2 * angle.cos() + t1 * angle.sin()), dim=-1)

    x = p["tok_emb.weight"][idx]
    if config.positions == "learned":
        x = x + p["pos_emb.weight"][:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(config.n_layers):
        pre = f"blocks.{i}."
        q, k, v = (
            t.reshape(B, T, H, Dh) for t in linear(pre + "attn.qkv", norm(pre + "attn_norm", x)).split(config.dim, -1)
        )
        if config.positions == "rope":
            q, k = rotate(q), rotate(k)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(Dh)
        weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        x = x + linear(pre + "attn.proj", torch.einsum("bhts,bshd->bthd", weights, v).reshape(B, T, -1))
        h = norm(pre + "mlp_norm", x)
        if config.mlp == "gelu":  # exact GELU: u * Phi(u)
            u = linear(pre + "mlp.up", h)
            a = 0.5 * u * (1.0 + torch.erf(u / math.sqrt(2.0)))
        else:
            gate, up = linear(pre + "mlp.gate_up", h).chunk(2, dim=-1)
            a = gate * torch.sigmoid(gate) * up
        x = x + linear(pre + "mlp.down", a)
    return norm("norm", x) @ p["tok_emb.weight"].T


OPTIONS = {
    "layernorm": dict(norm="layernorm"),
    "gelu": dict(mlp="gelu"),
    "learned": dict(positions="learned"),
    "bias": dict(bias=True),
    "nanogpt": NANOGPT,
    "nanogpt-no-bias": {**NANOGPT, "bias": False},
}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("option", OPTIONS)
def test_each_architecture_option_is_its_formula(option, fused):
    """The model with each option (alone, and all of nanoGPT's) against `plain_gpt` in float64: logits, loss and
    the gradient of every parameter, from weights perturbed off their init (biases and gains not 0 and 1)."""
    config = small_config(fused=fused, **OPTIONS[option])
    model = GPT(config).to(DEVICE)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    names = dict(model.named_parameters())
    assert ("pos_emb.weight" in names) == (config.positions == "learned")
    assert any(n.endswith(".bias") for n in names) == config.bias
    assert ("blocks.0.mlp.up.weight" in names) == (config.mlp == "gelu")
    idx, targets = tokens(config, 3, 11), tokens(config, 3, 11)
    p64 = {n: t.detach().double().requires_grad_() for n, t in names.items()}
    logits64 = plain_gpt(p64, idx, config)
    loss64 = F.cross_entropy(logits64.flatten(0, 1), targets.flatten())
    loss64.backward()
    with torch.no_grad():
        torch.testing.assert_close(model(idx).double(), logits64, rtol=1e-5, atol=1e-5)
    loss = model(idx, targets)
    loss.backward()
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    for name, p in names.items():
        expected = p64[name].grad
        torch.testing.assert_close(
            p.grad.double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item(), msg=name
        )


@pytest.mark.parametrize(
    "center, mode", [("embeddings", "simple"), ("qk,v", "causal"), ("residual,mlp", "learnable"), ("all", "momentum")]
)
def test_fused_and_eager_paths_agree_on_nanogpts_architecture(center, mode):
    """Where the options run eager PyTorch, the fused path still fuses what it can (the centre into the next norm's
    residual add is LayerNorm's own add_and_norm here): both paths give one loss, gradients and statistics."""
    eager = GPT(small_config(center=center, centering_mode=mode, fused=False, **NANOGPT)).to(DEVICE)
    randomize_centering(eager)
    fused = GPT(small_config(center=center, centering_mode=mode, fused=True, **NANOGPT)).to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    idx, targets = tokens(eager.config, 3, 11), tokens(eager.config, 3, 11)
    losses = {}
    for name, model in (("eager", eager), ("fused", fused)):
        losses[name] = model.train()(idx, targets)
        losses[name].backward()
    torch.testing.assert_close(losses["fused"], losses["eager"], **PATH_TOL)
    eager_params = dict(eager.named_parameters())
    for name, p in fused.named_parameters():
        expected = eager_params[name].grad
        torch.testing.assert_close(
            p.grad, expected, rtol=GRAD_RTOL, atol=GRAD_RTOL * 0.1 * expected.abs().max().item() + 1e-9, msg=name
        )
    eager_buffers = dict(eager.named_buffers())
    for name, b in fused.named_buffers():
        torch.testing.assert_close(b, eager_buffers[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_simple_centering_zeroes_the_batch_mean_where_placed_in_nanogpts_architecture(placement, monkeypatch):
    """As for the default model: embeddings centre the stream entering the first block (token + position
    embedding), residual every later norm's input, qk the attention's q and k right after the projection (no
    RoPE), v its values, mlp the GELU output."""
    config = small_config(dim=32, n_layers=3, center=placement, centering_mode="simple", **NANOGPT)
    model = GPT(config).to(DEVICE).train()
    seen = []
    add_and_norm, sdpa = model_module.LayerNorm.add_and_norm, F.scaled_dot_product_attention

    def record_norm(self, x, *, residual=None, center=None):
        normed, hidden = add_and_norm(self, x, residual=residual, center=center)
        if center is not None:
            seen.append(hidden.flatten(0, -2))
        return normed, hidden

    def record_sdpa(q, k, v, **kw):
        wanted = {"qk": (q, k), "v": (v,)}.get(placement, ())
        seen.extend(t.transpose(1, 2).flatten(0, 1).flatten(1) for t in wanted)  # [B, H, T, Dh] -> [B*T, H*Dh]
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(model_module.LayerNorm, "add_and_norm", record_norm)
    monkeypatch.setattr(F, "scaled_dot_product_attention", record_sdpa)
    if placement == "mlp":
        for block in model.blocks:
            block.mlp.down.register_forward_pre_hook(lambda m, args: seen.append(args[0].flatten(0, -2)))
    model(tokens(config, 3, 10), tokens(config, 3, 10))
    assert len(seen) == {"embeddings": 1, "qk": 2 * 3, "v": 3, "residual": 3, "mlp": 3}[placement]
    for x in seen:
        mean, typical = x.float().mean(0), x.float().abs().mean()
        assert mean.abs().max() < 1e-5 * typical + 1e-7, (placement, mean.abs().max().item(), typical.item())


def test_without_rope_a_key_centre_changes_nothing_and_a_query_centre_does():
    """With learned positions nothing rotates the keys: one vector subtracted from every key shifts each query's
    scores by a constant (softmax ignores it), so of the qk placement only the query centring acts."""
    model = GPT(small_config(center="qk", centering_mode="learnable", **NANOGPT)).to(DEVICE).eval()
    idx = tokens(model.config, 2, 13)
    with torch.no_grad():
        base = model(idx)
        for block in model.blocks:
            block.attn.k_center.center.normal_(0.0, 1.0)
        keys_shifted = model(idx)
        for block in model.blocks:
            block.attn.q_center.center.normal_(0.0, 1.0)
        queries_shifted = model(idx)
    torch.testing.assert_close(keys_shifted, base, rtol=1e-4, atol=1e-5)
    assert (queries_shifted[:, 1:] - base[:, 1:]).abs().max() > 1e-3  # position 0 attends to itself only


def test_nanogpts_architecture_at_384_wide_has_30044544_parameters():
    """The claims' width with nanoGPT's 384-wide shape (6 layers, 6 heads, block 256) and GPT-2's vocabulary,
    counted by hand: the tied token embedding, the position embedding, per layer two LayerNorms (gain and bias),
    qkv, out, up and down with their biases, and the final LayerNorm."""
    V, D, L, T = data.GPT2_VOCAB_SIZE, 384, 6, 256
    model = GPT(GPTConfig(**NANOGPT, vocab_size=V, dim=D, n_layers=L, n_heads=6, max_seq_len=T))
    per_layer = 2 * 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + (D * 4 * D + 4 * D) + (4 * D * D + D)
    expected = V * D + T * D + L * per_layer + 2 * D
    assert expected == 30_044_544 and model.num_params() == expected
    assert model.num_params(non_embedding=True) == expected - V * D - T * D


def test_architecture_options_are_checked_and_old_checkpoints_load_as_the_default_model(tmp_path):
    for field, bad in (("norm", "batchnorm"), ("mlp", "relu"), ("positions", "alibi"), ("bias", 1)):
        with pytest.raises(ValueError, match=field):
            GPTConfig(**{field: bad})
    with pytest.raises(ValueError, match="even"):
        GPTConfig(dim=36, n_heads=4)  # RoPE needs an even head size; learned positions do not
    assert GPTConfig(dim=36, n_heads=4, positions="learned").head_dim == 9
    config = GPTConfig(**NANOGPT, dim=48, n_heads=3, center="all")
    assert GPTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    # A checkpoint written before the options existed holds no such fields: it is the default model.
    model = GPT(small_config(center="residual"))
    path = tmp_path / "ckpt.pt"
    _write_train_style_checkpoint(path, model)
    state = torch.load(path, weights_only=True)
    for name in ("norm", "mlp", "positions", "bias"):
        del state["config"]["model"][name]
    torch.save(state, path)
    loaded = checkpoint.load_model(path)
    assert loaded.config == model.config and (loaded.config.norm, loaded.config.positions) == ("rmsnorm", "rope")
    idx = tokens(model.config, 2, 9).cpu()
    torch.testing.assert_close(loaded(idx), model.eval()(idx), rtol=0, atol=0)


def test_learned_positions_generate_within_their_table():
    config = small_config(max_seq_len=16, center="embeddings", centering_mode="causal", **NANOGPT)
    model = GPT(config).to(DEVICE)
    out = model.generate(tokens(config, 2, 10), 20, temperature=0.0)  # 30 > max_seq_len: the context is cropped
    assert out.shape == (2, 30)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(config, 2, 17))


# ---------------------------------------------------------------------------------------------------------------
# torch.compile, generation and the sample CLI
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused, arch", [(False, "default"), (True, "default"), (True, "nanogpt")])
def test_compiles_with_fullgraph(fused, arch):
    torch._dynamo.reset()
    config = small_config(dim=32, center="residual,qk", centering_mode="causal", fused=fused, **ARCHS[arch])
    model = GPT(config).to(DEVICE)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    idx, targets = tokens(model.config, 2, 9), tokens(model.config, 2, 9)
    loss = compiled(idx, targets)
    loss.backward()
    expected = eager(idx, targets)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    grads = dict(eager.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_generate_shapes_ids_cropping_and_greedy():
    config = small_config(max_seq_len=16, center="all", centering_mode="causal")
    model = GPT(config).to(DEVICE)
    train_a_few_steps(model, T=15)
    model.train()
    idx = tokens(config, 2, 10)
    out = model.generate(idx, 20, temperature=0.9, top_k=5)  # 30 > max_seq_len: the context is cropped
    assert out.shape == (2, 30) and out.dtype == torch.long
    assert torch.equal(out[:, :10], idx)
    assert ((out >= 0) & (out < config.vocab_size)).all()
    assert model.training  # mode restored
    greedy = model.generate(idx, 1, temperature=0.0)
    model.eval()
    with torch.no_grad():
        assert torch.equal(greedy[:, -1], model(idx)[:, -1].argmax(-1))
    with pytest.raises(ValueError, match="top_k"):
        model.generate(idx, 1, top_k=0)


def _write_train_style_checkpoint(path, model: GPT) -> None:
    """A checkpoint in train.py's format (fastcenter.train/1), holding what sample.py reads plus some of the rest."""
    state = {
        "format": "fastcenter.train/1",
        "model": model.state_dict(),
        "optimizer": {},
        "step": 3,
        "config": {"model": model.config.to_dict(), "train": {"seq_len": 8, "lr": 1e-3}},
        "val_loss": None,
    }
    torch.save(state, path)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    # GPT-2's full vocabulary (the prompt's ids must exist), everything else tiny.
    config = GPTConfig(dim=16, n_layers=1, n_heads=2, max_seq_len=32, center="residual", centering_mode="adaptive")
    model = GPT(config)
    train_a_few_steps(model.to(DEVICE), steps=1, B=2, T=8)
    path = tmp_path / "ckpt.pt"
    _write_train_style_checkpoint(path, model.cpu())
    return path, model


def test_sample_loads_checkpoint_and_is_reproducible(tiny_checkpoint, capsys, gpt2_encoding):
    from fastcenter import sample

    path, model = tiny_checkpoint
    loaded = sample.load_model(str(path), "cpu")
    assert loaded.config == model.config and not loaded.training
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    args = ["--ckpt", str(path), "--prompt", "To be, or not", "--max-new-tokens", "6", "--seed", "3", "--device", "cpu"]
    assert sample.main(args) == 0
    first = capsys.readouterr().out
    assert sample.main(args) == 0
    assert capsys.readouterr().out == first
    assert first.startswith("To be, or not") and len(first) > len("To be, or not")
    torch.save({"model": model.state_dict()}, path.parent / "no_config.pt")
    assert sample.main(["--ckpt", str(path.parent / "no_config.pt"), "--device", "cpu"]) != 0
    assert "config" in capsys.readouterr().err


def test_sample_cli_on_a_checkpoint_from_train_py(tmp_path, gpt2_encoding, capsys, monkeypatch):
    """End to end: train.py trains two steps and checkpoints (its cli(), in this process); `python -m
    fastcenter.sample`, as a user runs it, continues a prompt."""
    from fastcenter import sample

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for split, n in (("train", 3000), ("val", 1000)):
        ids = torch.randint(0, data.GPT2_VOCAB_SIZE, (n,), dtype=torch.int32)
        ids.numpy().astype("<u2").tofile(data_dir / f"{split}.bin")
    monkeypatch.setenv("FASTCENTER_BACKEND", "reference")
    flags = "--max-iters 2 --batch-size 2 --grad-accum-steps 1 --seq-len 16 --max-seq-len 16 --dim 16 --n-layers 1"
    flags += (
        " --n-heads 2 --eval-iters 1 --eval-interval 2 --warmup-iters 1 --center residual,v --centering-mode causal"
    )
    argv = ["--data", str(data_dir), "--out-dir", str(tmp_path / "run"), "--device", "cpu", *flags.split()]
    assert train_script().cli(argv) == 0, capsys.readouterr()
    ckpt = tmp_path / "run" / "ckpt.pt"
    command = [sys.executable, "-m", "fastcenter.sample", "--ckpt", str(ckpt), "--prompt", "Hello"]
    command += ["--max-new-tokens", "4", "--top-k", "10", "--device", "cpu"]
    sampled = subprocess.run(command, capture_output=True, text=True, timeout=120)  # FASTCENTER_BACKEND as set
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("Hello") and len(sampled.stdout.strip()) > len("Hello")
    capsys.readouterr()
    assert sample.main(["--ckpt", str(tmp_path / "missing.pt"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


def test_sampling_a_checkpoint_with_nan_weights_is_one_line(tiny_checkpoint, capsys):
    from fastcenter import sample

    path, _ = tiny_checkpoint
    state = torch.load(path, weights_only=True)
    state["model"]["norm.weight"][3] = float("nan")
    torch.save(state, path)
    assert sample.main(["--ckpt", str(path), "--prompt", "To be", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "norm.weight holds NaN or inf" in err


def test_sampling_a_model_whose_vocabulary_outgrows_its_mapping(tmp_path, capsys, gpt2_encoding, monkeypatch):
    # Trained with --vocab-size 64 on a corpus whose mapping holds 10 ids: ids 10..63 have no text.
    from fastcenter import sample

    mapping = sorted(set(gpt2_encoding.encode(" the cat sat on a mat and a dog ran")))[:9] + [data.EOT_TOKEN]
    model = GPT(GPTConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, max_seq_len=64))
    path = tmp_path / "ckpt.pt"
    _write_train_style_checkpoint(path, model)
    state = torch.load(path, weights_only=True)
    state["token_ids"] = mapping
    torch.save(state, path)
    args = ["--ckpt", str(path), "--max-new-tokens", "40", "--temperature", "2", "--device", "cpu", "--seed", "1"]
    assert sample.main(args) == 0, capsys.readouterr().err
    # Which ids come out is up to the weights: make them ids beyond the mapping, between ids within it.
    sampled = [len(mapping) - 1, 63, 2, 10, 40, 1]
    monkeypatch.setattr(GPT, "generate", lambda self, idx, n, **kw: torch.tensor([idx[0].tolist() + sampled]))
    [text] = sample.sample(model, "", token_ids=mapping)
    expected = [data.EOT_TOKEN] + [mapping[i] for i in sampled if i < len(mapping)]  # the prompt, then the rest
    assert text == gpt2_encoding.decode(expected)
