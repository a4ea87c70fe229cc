"""VectorCentering: each mode's training/eval behaviour, buffer updates and gradients, as README.md's "Vector
centering" table states them (fastcenter/nn.py holds the math), and the attention facts that decide where centering
can go."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from helpers import assert_close

from fastcenter import ops, reference
from fastcenter.nn import CENTERING_MODES, RMSNorm, VectorCentering

B, T, D = 3, 7, 12


def _x(scale=1.0, shift=2.0):
    return (shift + scale * torch.randn(B, T, D, device=DEVICE, dtype=torch.float64)).requires_grad_(True)


def _module(mode, **kw):
    return VectorCentering(D, mode, **kw).to(DEVICE)


def _expected_running_means(batch_means, momentum, rm=None, first_k=1):
    """running_mean after each update, alpha_k = max(1/k, momentum), computed independently in float64.

    `rm` is the value before update number `first_k` (zeros before the first)."""
    rm = torch.zeros(D, dtype=torch.float64, device=DEVICE) if rm is None else rm
    out = []
    for k, m in enumerate(batch_means, start=first_k):
        alpha = max(1.0 / k, momentum)
        rm = (1 - alpha) * rm + alpha * m
        out.append(rm)
    return out


@pytest.mark.parametrize("mode", CENTERING_MODES)
def test_buffers_update_once_per_training_forward_with_exact_average_then_ema(mode):
    vc = _module(mode, momentum=0.25)
    batches = [_x(shift=float(i)) for i in range(7)]
    expected = _expected_running_means([b.detach().mean((0, 1)) for b in batches], 0.25)
    for k, (xb, rm) in enumerate(zip(batches, expected), start=1):
        vc(xb)
        assert int(vc.num_updates) == k
        assert_close(vc.running_mean, rm, torch.float32)
    # The first 1/momentum = 4 updates are an exact average of the batch means (no bias from the zero start).
    assert_close(expected[3], torch.stack([b.detach().mean((0, 1)) for b in batches[:4]]).mean(0), torch.float32)
    vc.eval()
    frozen = vc.running_mean.clone()
    vc(_x())
    assert torch.equal(vc.running_mean, frozen) and int(vc.num_updates) == 7, "eval must not update buffers"


def test_buffers_are_persistent():
    sd = _module("adaptive").state_dict()
    assert "running_mean" in sd and "num_updates" in sd
    assert sd["running_mean"].dtype == torch.float32


def _warm(vc, n=3):
    for _ in range(n):
        vc(_x())
    return vc.running_mean.detach().double().clone()


def test_simple_mode():
    vc = _module("simple")
    rm0 = _warm(vc)
    x = _x()
    g = torch.randn(B, T, D, device=DEVICE, dtype=torch.float64)
    y = vc(x)
    assert_close(y, x.detach() - x.detach().mean((0, 1)), torch.float32)
    (y * g).sum().backward()
    assert_close(x.grad, g - g.mean((0, 1)), torch.float32)  # through the mean
    vc.eval()
    x2 = _x()
    assert_close(vc(x2), x2.detach() - _expected_running_means_after(rm0, [x.detach()], vc), torch.float32)


def _expected_running_means_after(rm, batches, vc):
    """The running mean after `vc` took `batches` (its last updates), starting from `rm`."""
    first_k = int(vc.num_updates) - len(batches) + 1
    return _expected_running_means([xb.mean((0, 1)) for xb in batches], vc.momentum, rm, first_k)[-1]


def test_adaptive_mode_uses_the_stale_running_mean_and_passes_gradients_unchanged():
    vc = _module("adaptive")
    rm_before = _warm(vc)
    x = _x()
    g = torch.randn(B, T, D, device=DEVICE, dtype=torch.float64)
    y = vc(x)
    assert_close(y, x.detach() - rm_before, torch.float32)  # the value before this forward's update
    (y * g).sum().backward()
    assert_close(x.grad, g, torch.float32)
    assert_close(vc.running_mean, _expected_running_means_after(rm_before, [x.detach()], vc), torch.float32)
    vc.eval()
    assert_close(vc(x), x.detach() - vc.running_mean.double(), torch.float32)


def test_momentum_mode():
    vc = _module("momentum", momentum=0.2)
    rm_before = _warm(vc, n=6)  # past 1/momentum updates: alpha = momentum
    x = _x()
    g = torch.randn(B, T, D, device=DEVICE, dtype=torch.float64)
    y = vc(x)
    alpha = 0.2
    mu = (1 - alpha) * rm_before + alpha * x.detach().mean((0, 1))
    assert_close(y, x.detach() - mu, torch.float32)
    assert_close(vc.running_mean, mu, torch.float32)  # running_mean <- mu
    (y * g).sum().backward()
    assert_close(x.grad, g - alpha * g.mean((0, 1)), torch.float32)  # through the batch part, scaled by alpha
    vc.eval()
    assert_close(vc(x), x.detach() - mu, torch.float32)


def test_learnable_mode():
    vc = _module("learnable")
    assert torch.equal(vc.center, torch.zeros(D, device=DEVICE))
    with torch.no_grad():
        vc.center.copy_(torch.randn(D))
    x = _x()
    g = torch.randn(B, T, D, device=DEVICE, dtype=torch.float64)
    y = vc(x)
    assert_close(y, x.detach() - vc.center.detach().double(), torch.float32)
    (y * g).sum().backward()
    assert_close(x.grad, g, torch.float32)
    assert_close(vc.center.grad, -g.sum((0, 1)), torch.float32)
    vc.eval()
    assert_close(vc(x), x.detach() - vc.center.detach().double(), torch.float32)


def _causal_truth(x, rm, prior):
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            out[b, t] = x[b, t] - (x[b, : t + 1].sum(0) + prior * rm) / (t + 1 + prior)
    return out


@pytest.mark.parametrize("training", [True, False])
def test_causal_mode_formula_and_gradient(training):
    vc = _module("causal", prior=3.0)
    rm = _warm(vc)
    vc.train(training)
    x = _x()
    g = torch.randn(B, T, D, device=DEVICE, dtype=torch.float64)
    y = vc(x)
    x64 = x.detach().clone().requires_grad_(True)
    truth = _causal_truth(x64, rm, 3.0)
    assert_close(y, truth.detach(), torch.float32)
    (y * g).sum().backward()
    (truth * g).sum().backward()
    assert_close(x.grad, x64.grad, torch.float32)  # through the prefix sums


@pytest.mark.parametrize("mode", CENTERING_MODES)
@pytest.mark.parametrize("training", [True, False])
def test_no_leak_from_later_tokens_or_other_sequences(mode, training):
    """Only `simple` (batch mean) and `momentum` (alpha * batch mean) in training see other tokens."""
    vc = _module(mode)
    _warm(vc)
    vc.train(training)
    x = _x().detach()
    t = 3
    later, other = x.clone(), x.clone()
    later[:, t + 1 :] += 5.0 * torch.randn_like(later[:, t + 1 :])
    other[1:] += 5.0 * torch.randn_like(other[1:])
    state = {k: v.clone() for k, v in vc.state_dict().items()}
    y = vc(x)
    vc.load_state_dict(state)
    y_later = vc(later)
    vc.load_state_dict(state)
    y_other = vc(other)
    leaks = training and mode in ("simple", "momentum")
    assert torch.allclose(y[:, : t + 1], y_later[:, : t + 1]) != leaks
    assert torch.allclose(y[0], y_other[0]) != leaks


@pytest.mark.parametrize("mode", CENTERING_MODES)
def test_center_for_with_residual_matches_centering_of_the_sum(mode):
    """The fused model path passes (stream, branch output) separately; statistics must be those of the sum."""
    a, b = VectorCentering(D, mode).to(DEVICE), VectorCentering(D, mode).to(DEVICE)
    for _ in range(2):
        x, r = _x().detach(), _x().detach()
        assert_close(a.center_for(x, residual=r), b.center_for(x + r).double(), torch.float32)
    assert_close(a.running_mean, b.running_mean.double(), torch.float32)


def test_fused_into_the_norm_equals_centering_then_norm():
    vc, vc2 = VectorCentering(D, "simple").to(DEVICE), VectorCentering(D, "simple").to(DEVICE)
    norm = RMSNorm(D).to(DEVICE)
    x = _x().detach().float().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(B, T, D, device=DEVICE)
    normed, _ = norm.add_and_norm(x, center=vc.center_for(x))
    (normed * g).sum().backward()
    expected = norm(vc2(x2))
    (expected * g).sum().backward()
    assert_close(normed, expected.double(), torch.float32)
    assert_close(x.grad, x2.grad.double(), torch.float32)


@pytest.mark.parametrize("mode", CENTERING_MODES)
def test_a_module_cast_to_bf16_trains_and_keeps_its_statistics_in_its_dtype(mode):
    # model.to(torch.bfloat16) casts the buffers too (as BatchNorm's): the update must follow their dtype.
    vc = VectorCentering(8, mode).to(torch.bfloat16).train()
    x = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    for _ in range(3):
        vc(x)
    assert vc.running_mean.dtype == torch.bfloat16 and int(vc.num_updates) == 3
    assert_close(vc.running_mean, x.double().mean((0, 1)), torch.bfloat16)  # the exact average of 3 equal batches


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        VectorCentering(D, "aggressive")
    with pytest.raises(ValueError, match="momentum"):
        VectorCentering(D, "adaptive", momentum=0.0)
    with pytest.raises(ValueError, match="last dim"):
        VectorCentering(D)(torch.randn(2, 3, D + 1))


# ---- Attention facts (fastcenter/model.py's docstring, its centering placements): why keys are centred before
# RoPE, and what value centering does.


def _attention(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)


def test_subtracting_one_vector_from_every_key_after_rope_leaves_attention_unchanged():
    Bq, Tq, H, Dh = 2, 9, 3, 8
    q, k, v = (torch.randn(Bq, Tq, H, Dh, device=DEVICE, dtype=torch.float64) for _ in range(3))
    cos, sin = ops.rope_cache(Tq, Dh, device=DEVICE)
    qr, kr = reference.rope(q, k, cos, sin)
    c = torch.randn(H, Dh, device=DEVICE, dtype=torch.float64)
    # q.(k - c) = q.k - q.c: the same shift for every key of a query, which softmax ignores.
    assert_close(_attention(qr, kr - c, v), _attention(qr, kr, v), torch.float32)
    # Before RoPE the same subtraction is rotated differently at each position, so it is not a no-op: hence
    # the `qk` placement centres keys before RoPE, where it actually changes something.
    q2, k2 = reference.rope(q, k - c, cos, sin)
    assert not torch.allclose(_attention(q2, k2, v), _attention(qr, kr, v))


def test_value_centering_shifts_every_attention_output_by_the_same_vector():
    Bq, Tq, H, Dh = 2, 6, 2, 5
    q, k, v = (torch.randn(Bq, Tq, H, Dh, device=DEVICE, dtype=torch.float64) for _ in range(3))
    mean_v = v.mean(dim=(0, 1))  # one vector per head and feature, constant over positions
    shifted = _attention(q, k, v - mean_v)
    # softmax weights sum to one: sum_s p_s (v_s - m) = sum_s p_s v_s - m (outputs are [B, H, T, Dh])
    assert_close(shifted, _attention(q, k, v) - mean_v[None, :, None, :], torch.float32)


# ---- Edge cases: inputs and arguments that would corrupt the statistics are refused, or leave them as they were.


def _buffers(vc):
    return {name: b.clone() for name, b in vc.named_buffers()}


@pytest.mark.parametrize("mode", CENTERING_MODES)
def test_an_input_without_a_token_dimension_is_refused_and_the_statistics_are_untouched(mode):
    # A [D] vector has no tokens to average over: mean over "all leading dims" would be a mean over its features.
    vc = _module(mode)
    _warm(vc)
    before = _buffers(vc)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., D\] with at least one leading dim"):
        vc(torch.randn(D, device=DEVICE))
    for name, value in _buffers(vc).items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("mode", CENTERING_MODES)
@pytest.mark.parametrize("shape", [(0, T, D), (B, 0, D)], ids=["no-sequences", "no-tokens"])
def test_an_empty_batch_leaves_the_statistics_as_they_were(mode, shape):
    # Its mean is 0/0: one empty batch used to make the running mean NaN for good.
    vc = _module(mode)
    _warm(vc)
    before = _buffers(vc)
    out = vc(torch.randn(shape, device=DEVICE))
    assert out.shape == shape
    for name, value in _buffers(vc).items():
        assert torch.equal(value, before[name]), name
    x = _x()
    vc(x)
    assert torch.isfinite(vc.running_mean).all() and int(vc.num_updates) == int(before["num_updates"]) + 1


def test_bad_arguments_are_refused_by_name():
    for kwargs, name in [
        (dict(prior=float("nan")), "prior"),
        (dict(prior=float("inf")), "prior"),
        (dict(prior=-1.0), "prior"),
        (dict(prior="8"), "prior"),
        (dict(momentum=float("nan")), "momentum"),
        (dict(momentum=True), "momentum"),
        (dict(momentum=1.5), "momentum"),
    ]:
        with pytest.raises((ValueError, TypeError), match=name):
            VectorCentering(D, "causal", **kwargs)
    with pytest.raises(ValueError, match="dim"):
        VectorCentering(True)
    vc = VectorCentering(D, "adaptive")
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        vc.center_for(torch.randn(B, T, D), residual=torch.randn(1, T, D))


@pytest.mark.parametrize("mode", CENTERING_MODES)
def test_reset_parameters_restores_the_state_at_construction(mode):
    vc = VectorCentering(D, mode).train()
    vc(torch.randn(B, T, D) + 3.0)
    if vc.center is not None:
        with torch.no_grad():
            vc.center.add_(1.0)
    assert vc.running_mean.any() and int(vc.num_updates) == 1
    vc.reset_parameters()
    fresh = VectorCentering(D, mode)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(vc.state_dict()[name], tensor), name
