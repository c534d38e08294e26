"""The float64 reference against independent formulations, and the window step on hand-computed cases."""
import math

import pytest
import torch
import torch.nn.functional as F

from topd_kernels import Quantile
from topd_kernels import LossConfig
from topd_kernels.reference import window_kl_reference
from topd_kernels.window import discounted_window_sum, masked_quantile, window_step


def _kl_div_mean(student, teacher, mask, direction, temperature=1.0):
    """Mean per-token KL via torch.nn.functional.kl_div, over valid tokens."""
    log_ps = F.log_softmax(student.double() / temperature, -1)
    log_pt = F.log_softmax(teacher.double() / temperature, -1)
    if direction == "reverse_kl":  # KL(p_s || p_t): kl_div(input=log p_t, target=log p_s)
        per_token = F.kl_div(log_pt, log_ps, reduction="none", log_target=True).sum(-1)
    else:
        per_token = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
    return per_token[mask].mean()


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_window_one_is_kl_div(seed, divergence, temperature):
    student, teacher = torch.randn(3, 9, 50) * 2, torch.randn(3, 9, 50) * 2
    mask = torch.rand(3, 9) > 0.3
    loss = window_kl_reference(student, teacher, mask=mask, divergence=divergence, window=1,
                               temperature=temperature)
    expected = _kl_div_mean(student, teacher, mask, divergence, temperature)
    assert torch.allclose(loss, expected, rtol=1e-12, atol=1e-12)


def test_jsd_against_explicit_mixture(seed):
    student, teacher, beta = torch.randn(4, 30), torch.randn(4, 30), 0.3
    ps, pt = student.double().softmax(-1), teacher.double().softmax(-1)
    mix = (1 - beta) * ps + beta * pt
    expected = (beta * (pt * (pt / mix).log()).sum(-1) + (1 - beta) * (ps * (ps / mix).log()).sum(-1)).mean()
    loss = window_kl_reference(student, teacher, divergence="jsd", beta=beta, window=1)
    assert torch.allclose(loss, expected, rtol=1e-12)


def test_jsd_limits_are_the_kls(seed):
    """beta -> 1 gives KL(p_s||p_t) weighted by (1-beta); check the generalized-JSD convention near 0.5."""
    student, teacher = torch.randn(2, 40), torch.randn(2, 40)
    ps, pt = student.double().softmax(-1), teacher.double().softmax(-1)
    m = 0.5 * (ps + pt)
    js = 0.5 * ((pt * (pt / m).log()).sum(-1) + (ps * (ps / m).log()).sum(-1))
    loss = window_kl_reference(student, teacher, divergence="jsd", beta=0.5, window=1, reduction="none")
    assert torch.allclose(loss, js, rtol=1e-12)
    assert (loss <= math.log(2) + 1e-12).all()


def test_hand_computed_window_and_guidance():
    """One sequence of 4 tokens with known d: check w, flags, c against values worked out by hand."""
    d = torch.tensor([1.0, 0.0, 3.0, 2.0])
    mask = torch.tensor([True, True, False, True])
    seq_id = torch.zeros(4, dtype=torch.int64)
    cfg = LossConfig(window=2, gamma=0.5, loss_threshold=0.5, div_threshold=1.0, suppress_weight=0.25,
                       guidance_weight=2.0)
    step = window_step(d, mask, seq_id, cfg)
    # w_0 = (1 + .5*0)/(1 + .5) ; w_1 = (0 + .5*0*3)/(1 + 0) ; w_3 = 2 (window truncated at the end)
    assert torch.allclose(step.window_score, torch.tensor([1 / 1.5, 0.0, 0.0, 2.0]))
    assert step.high_loss.tolist() == [True, False, False, True]
    assert step.divergent.tolist() == [False, False, False, True]
    # c_0 = 0.25 (suppressed), c_1 = 1, c_2 = 0 (invalid), c_3 = 1 + 2 * 1 (own guidance, gamma^0)
    assert torch.allclose(step.weight, torch.tensor([0.25, 1.0, 0.0, 3.0]))


def test_windows_do_not_cross_sequences():
    x = torch.arange(1.0, 8.0)
    seq_id = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    got = discounted_window_sum(x, seq_id, window=5, gamma=0.5)
    want = torch.tensor([1 + 1 + 0.75, 2 + 1.5, 3, 4 + 2.5, 5, 6 + 3.5, 7])
    assert torch.allclose(got, want)


@pytest.mark.parametrize("window", [1, 2, 3, 5, 8, 13, 64])
def test_doubling_window_sum_matches_loop(seed, window):
    x = torch.randn(50, dtype=torch.float64)
    seq_id = torch.sort(torch.randint(0, 6, (50,))).values
    want = torch.zeros_like(x)
    for t in range(50):
        for j in range(window):
            if t + j < 50 and seq_id[t + j] == seq_id[t]:
                want[t] += 0.8 ** j * x[t + j]
    assert torch.allclose(discounted_window_sum(x, seq_id, window, 0.8), want, rtol=1e-12)


@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.73, 1.0])
def test_masked_quantile_matches_torch_quantile(seed, q):
    values, valid = torch.randn(41), torch.rand(41) > 0.3
    assert torch.allclose(masked_quantile(values, valid, q), torch.quantile(values[valid], q))


def test_reference_quantile_threshold_is_strict(seed):
    """With Quantile(1.0) on the loss nothing is high-loss: the maximum is not > itself."""
    student, teacher = torch.randn(2, 6, 20), torch.randn(2, 6, 20)
    _, stats = window_kl_reference(student, teacher, loss_threshold=Quantile(1.0), return_stats=True)
    assert not stats.high_loss.any() and not stats.divergent.any()


def test_reference_gradient_matches_finite_differences(seed):
    student = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 5) > 0.2
    # Fixed weights (float thresholds) keep the function smooth away from threshold crossings.
    def fn(s, t):
        return window_kl_reference(s, t, mask=mask, divergence="jsd", beta=0.3, window=2, gamma=0.9,
                                   guidance_weight=0.5, reduction="sum")
    assert torch.autograd.gradcheck(fn, (student, teacher))
