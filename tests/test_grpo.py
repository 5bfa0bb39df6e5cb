import math

import pytest
import torch

import grpo
from grpo import (completion_mask, frac_equal_groups, group_advantages, grpo_loss, objective, token_loss,
                  token_weights)


def test_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    a = group_advantages(r, 4)
    std = (4 * 0.25 / 3) ** 0.5  # unbiased std of [1, 0, 0, 1]
    assert a[:4].tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 1
                                          + [-0.5 / (std + 1e-4), 0.5 / (std + 1e-4)])
    assert a[4:].tolist() == [0.0] * 4  # constant group: zeros, not NaN
    assert group_advantages(r, 4, scale="none").tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]


def test_advantages_errors():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="advantage scale"):
        group_advantages(torch.zeros(4), 2, scale="batch")


def test_frac_equal_groups():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    assert frac_equal_groups(r, 2) == pytest.approx(2 / 3)


def test_completion_mask_includes_first_eos_only():
    ids = torch.tensor([[5, 6, 9, 0, 0], [5, 9, 9, 9, 9], [5, 6, 7, 8, 5], [8, 5, 5, 5, 5]])
    m = completion_mask(ids, [9, 8])
    assert m.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]]


def slow_loss(logp, old, ref, adv, mask, eps, eps_high, beta, loss_type, max_new):
    """Per-token loop straight from METHOD.md section 5."""
    N, T = logp.shape
    per_seq, total, count = [], 0.0, 0
    for i in range(N):
        seq_sum, seq_n = 0.0, 0
        for t in range(T):
            if mask[i, t] == 0:
                continue
            rho = torch.exp(logp[i, t] - old[i, t])
            a = adv[i]
            surrogate = -torch.min(rho * a, torch.clamp(rho, 1 - eps, 1 + eps_high) * a)
            d = ref[i, t] - logp[i, t]
            token = surrogate + beta * (torch.exp(d) - d - 1)
            seq_sum, seq_n = seq_sum + token, seq_n + 1
        per_seq.append(seq_sum / seq_n)
        total, count = total + seq_sum, count + seq_n
    if loss_type == "grpo":
        return sum(per_seq) / N
    if loss_type == "bnpo":
        return total / count
    return total / (N * max_new)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_loss_matches_per_token_loop(loss_type):
    g = torch.Generator().manual_seed(0)
    N, T = 6, 5
    logp = -torch.rand(N, T, generator=g) * 3
    old = logp + 0.4 * torch.randn(N, T, generator=g)  # ratios well outside [0.8, 1.3]
    ref = logp + 0.3 * torch.randn(N, T, generator=g)
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0, 0.0, 1.5])
    mask = torch.ones(N, T)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    args = dict(eps=0.2, eps_high=0.3, beta=0.04, loss_type=loss_type, max_new_tokens=8)
    loss, stats = grpo_loss(logp, old, ref, adv, mask, **args)
    expected = slow_loss(logp, old, ref, adv, mask, 0.2, 0.3, 0.04, loss_type, 8)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert 0 < stats["clip_frac"] < 1 and stats["kl"] > 0


def test_on_policy_loss_value_and_gradient_flow_only_through_logp():
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]])).requires_grad_()
    ref = torch.log(torch.tensor([[0.25, 0.25], [0.5, 0.5]])).requires_grad_()
    adv = torch.tensor([1.0, -1.0], requires_grad=True)
    mask = torch.ones(2, 2)
    loss, stats = grpo_loss(logp, None, ref, adv, mask, beta=0.1)
    # rho = 1: surrogate -A per token; k3 at token (0,0): d = ln 0.5 -> 0.5 - ln 0.5 - 1
    k3 = 0.5 - torch.log(torch.tensor(0.5)).item() - 1
    assert loss.item() == pytest.approx(((-1 + 0.1 * k3 / 2) + 1) / 2, abs=1e-6)
    assert stats["ratio"] == pytest.approx(1.0) and stats["clip_frac"] == 0.0
    loss.backward()
    assert ref.grad is None and adv.grad is None
    # d/dlogp of -rho*A is -A per token, divided by tokens per sequence and sequences
    assert logp.grad[1].tolist() == pytest.approx([0.25, 0.25])


def test_cispo_weights_log_pi_by_the_clipped_ratio_hand_computed():
    """CISPO (METHOD.md 5.7) on a 2 x 3 example, beta 0: ratios 1.5, 1, 0.5 in each row, clipped to
    [0.8, 1.28]: weights 1.28, 1, 0.8, constants; l = -w A log pi, so d l / d log pi = -w A for
    every token, the clipped ones included (the clipped surrogate gives those 0)."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.0, -2.0]], requires_grad=True)
    ratio = torch.tensor([[1.5, 1.0, 0.5], [1.5, 1.0, 0.5]])
    old, adv = logp.detach() - ratio.log(), torch.tensor([1.0, -2.0])
    per_token = token_loss(logp, old, None, adv[:, None], eps=0.2, eps_high=0.28, beta=0.0, loss_type="cispo")
    assert per_token.tolist() == [pytest.approx([1.28, 2.0, 0.4]), pytest.approx([-0.768, -2.0, -3.2])]
    per_token.sum().backward()
    assert logp.grad.tolist() == [pytest.approx([-1.28, -1.0, -0.8]), pytest.approx([2.56, 2.0, 1.6])]
    clipped = token_loss(logp, old, None, adv[:, None], eps=0.2, eps_high=0.28, beta=0.0)  # GRPO's surrogate
    grad, = torch.autograd.grad(clipped.sum(), logp)
    assert grad[0, 0] == 0 and grad[1, 2] == 0  # where CISPO keeps the gradient, the clip drops it
    loss, _ = grpo_loss(logp, old, None, adv, torch.ones(2, 3), eps=0.2, eps_high=0.28, beta=0.0, loss_type="cispo")
    assert loss.item() == pytest.approx((1.28 + 2 + 0.4 - 0.768 - 2 - 3.2) / 6)  # the token mean


def test_gspo_clips_the_sequence_ratio_hand_computed():
    """GSPO (METHOD.md 5.9) on a 2 x 3 example, beta 0, eps 0.2 / 0.28. Row 0: log-ratios 0.3, 0, 0.3,
    s_0 = exp(0.2) = 1.2214, inside the clip, A = 1: l = -s_0 on every token. Row 1: log-ratios 0.6
    each, s_1 = exp(0.6) = 1.8221 > 1.28: with A = 1 the clipped branch, l = -1.28 and no gradient;
    with A = -1 the unclipped one, l = 1.8221. Sequence-mean weights 1 / (2 * 3): the gradient of a
    token of row i is -w A_i s_i (the whole-tensor loss: through s_i = exp(mean), d s_i = s_i / 3)."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.0, -2.0]], requires_grad=True)
    old = logp.detach() - torch.tensor([[0.3, 0.0, 0.3], [0.6, 0.6, 0.6]])
    mask, s0, s1 = torch.ones(2, 3), math.exp(0.2), math.exp(0.6)
    assert grpo.sequence_ratio(logp, old, mask).tolist() == pytest.approx([s0, s1])
    for A1, row1, grad1 in ((1.0, -1.28, 0.0), (-1.0, s1, s1 / 6)):
        adv = torch.tensor([1.0, A1])
        loss, stats = grpo_loss(logp, old, None, adv, mask, eps=0.2, eps_high=0.28, beta=0.0, ratio="sequence")
        assert loss.item() == pytest.approx((3 * -s0 + 3 * row1) / 6)
        whole, = torch.autograd.grad(loss, logp)
        assert whole.tolist() == [pytest.approx([-s0 / 6] * 3), pytest.approx([grad1] * 3)]
        assert stats["clip_frac"] == pytest.approx(0.5 if A1 > 0 else 0.0) and stats["ratio"] == pytest.approx((s0 + s1) / 2)
        f = objective(old, None, adv, token_weights(mask, "grpo"), mask, grpo.sequence_ratio(logp, old, mask).detach(),
                      eps=0.2, eps_high=0.28, beta=0.0)
        scored = logp.detach().flatten().requires_grad_()
        value = f(scored[:4], 0, 4).sum() + f(scored[4:], 4, 6).sum()  # in two chunks, across the rows
        chunked, = torch.autograd.grad(value, scored)
        assert value.item() == pytest.approx(loss.item()) and torch.allclose(chunked, whole.flatten())


def test_gspo_is_refused_with_cispo_in_one_line():
    from config import Config, check
    from files import RunError
    with pytest.raises(RunError, match="--ratio sequence with --loss-type cispo: CISPO weights each token"):
        check(Config(ratio="sequence", loss_type="cispo"))


def test_beta_zero_needs_no_reference_and_beta_positive_does():
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, stats = grpo_loss(logp, None, None, torch.tensor([1.0, -1.0]), torch.ones(2, 3), beta=0.0)
    assert loss.item() == pytest.approx(0.0) and stats["kl"] == 0.0
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, None, None, torch.ones(2), torch.ones(2, 3), beta=0.04)


def test_token_weights_hand_computed_and_their_errors():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0.0]])
    # grpo: 1 / (N |o_i|) = 1/9, 1/3, 1/6; bnpo: 1 / 6 tokens; dr_grpo: 1 / (N T_max) = 1 / 15
    assert token_weights(mask, "grpo")[:, 0].tolist() == pytest.approx([1 / 9, 1 / 3, 1 / 6])
    assert (token_weights(mask, "bnpo") == mask / 6).all()
    assert token_weights(mask, "dr_grpo", 5).sum().item() == pytest.approx(6 / 15)
    assert (token_weights(mask, "grpo")[mask == 0] == 0).all()
    with pytest.raises(ValueError, match="max_new_tokens"):
        token_weights(mask, "dr_grpo")
    with pytest.raises(ValueError, match="loss_type"):
        token_weights(mask, "sum")


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "cispo"])
def test_objective_in_chunks_gives_the_loss_and_its_gradient(loss_type):
    """The output layer's view of the loss (objective(logp, start, stop) on the scored tokens in
    chunks) adds up to grpo_loss, value and gradient."""
    g = torch.Generator().manual_seed(3)
    N, T = 4, 5
    logp = (-torch.rand(N, T, generator=g) * 3).requires_grad_()
    old, ref = logp.detach() + 0.4 * torch.randn(N, T, generator=g), logp.detach() + 0.3 * torch.randn(N, T, generator=g)
    adv, mask = torch.randn(N, generator=g), (torch.rand(N, T, generator=g) < 0.7).float()
    args = dict(eps=0.2, eps_high=0.3, beta=0.04)
    loss, _ = grpo_loss(logp, old, ref, adv, mask, loss_type=loss_type, max_new_tokens=6, **args)
    whole, = torch.autograd.grad(loss, logp)
    f = objective(old, ref, adv, token_weights(mask, loss_type, 6), mask, loss_type=loss_type, **args)
    scored = logp.detach()[mask.bool()].requires_grad_()
    parts = sum(f(scored[s:s + 3], s, s + 3).sum() for s in range(0, len(scored), 3))
    part_grad, = torch.autograd.grad(parts, scored)
    assert parts.item() == pytest.approx(loss.item(), abs=1e-6)
    assert torch.allclose(part_grad, whole[mask.bool()], atol=1e-7) and (whole[mask == 0] == 0).all()
    # pi_old = pi (the first update): the ratio is 1 and its gradient that of ratio * A
    on_policy = token_loss(logp, None, None, adv[:, None], beta=0.0)
    assert torch.allclose(on_policy, -adv[:, None].expand(N, T))


def test_draw_follows_the_distribution_and_never_picks_a_zero():
    from grpo import draw
    torch.manual_seed(0)
    p = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2])
    n = 20000
    counts = torch.bincount(draw(p.expand(n, 5)), minlength=5).double()
    assert counts[0] == 0 and counts[2] == 0
    sigma = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 4.5 * sigma + 1e-9).all()
