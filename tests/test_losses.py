"""Losses and advantages against hand-computed numbers."""

import math

import pytest
import torch

from learners.losses import group_advantages, k3_kl, policy_loss, token_logprobs


def test_group_advantages_two_groups_of_three():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    # group 1: mean 2, std sqrt(2/3); group 2: mean 2, std sqrt(8)
    s1, s2 = math.sqrt(2 / 3), math.sqrt(8)
    expected = torch.tensor([-1 / s1, 0.0, 1 / s1, -2 / s2, -2 / s2, 4 / s2])
    torch.testing.assert_close(group_advantages(rewards, 3), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(group_advantages(rewards, 3, std_norm=False),
                               torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]))


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(5), 3)


def test_token_logprobs_shifted_and_float32():
    logits = torch.tensor([[[math.log(0.5), math.log(0.25), math.log(0.25)],
                            [5.0, 5.0, 5.0],
                            [9.0, -9.0, 0.0]]])  # last position predicts nothing
    ids = torch.tensor([[2, 0, 1]])
    expected = torch.tensor([[0.0, math.log(0.5), math.log(1 / 3)]])
    torch.testing.assert_close(token_logprobs(logits, ids), expected)
    out = token_logprobs(logits.to(torch.bfloat16), ids)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=0)


def test_k3_kl_values():
    lp = torch.tensor([math.log(0.5), math.log(0.5), -1.3])
    ref = torch.tensor([math.log(0.25), math.log(1.0), -1.3])
    expected = torch.tensor([0.5 + math.log(2) - 1, 2 - math.log(2) - 1, 0.0])
    torch.testing.assert_close(k3_kl(lp, ref), expected)


# ratio, advantage -> per-token loss (clip low 0.2 -> 0.8, clip high 0.3 -> 1.3)
CASES = [(1.5, 1.0, -1.3, True),    # above 1 + high with A > 0: clipped
         (0.5, 1.0, -0.5, False),   # below 1 - low with A > 0: unclipped (pessimistic min)
         (0.5, -1.0, 0.8, True),    # below 1 - low with A < 0: clipped
         (1.5, -1.0, 1.5, False),   # above 1 + high with A < 0: unclipped
         (1.1, 2.0, -2.2, False)]   # inside the range


def _case_tensors():
    lp = torch.tensor([[math.log(r) for r, *_ in CASES]], requires_grad=True)
    adv = torch.tensor([[a for _, a, *_ in CASES]])
    return lp, torch.zeros_like(adv), adv, torch.ones_like(adv)


def test_clipped_surrogate_hand_computed():
    lp, old, adv, mask = _case_tensors()
    loss, m = policy_loss(lp, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.3)
    assert loss.item() == pytest.approx(sum(c[2] for c in CASES) / 5, abs=1e-6)  # -0.34
    assert m["pg_loss"] == pytest.approx(-0.34, abs=1e-6)
    assert m["clip_frac"] == pytest.approx(0.4)
    assert m["ratio_mean"] == pytest.approx(1.02, abs=1e-6)
    assert m["ratio_max"] == pytest.approx(1.5, abs=1e-6)
    assert m["kl"] == 0.0
    loss.backward()
    # d(-ratio * A)/d lp = -ratio * A where unclipped, 0 where clipped; / 5 tokens
    expected = torch.tensor([[0.0 if clipped else -r * a / 5 for r, a, _, clipped in CASES]])
    torch.testing.assert_close(lp.grad, expected)


def test_global_normaliser_and_kl_term():
    lp, old, adv, mask = _case_tensors()
    loss, _ = policy_loss(lp, old, adv, mask, 0.2, 0.3, num_tokens_global=10)
    assert loss.item() == pytest.approx(-0.17, abs=1e-6)
    ref = lp.detach() + math.log(0.5)  # k3 = 0.5 + ln 2 - 1 on every token
    k3 = 0.5 + math.log(2) - 1
    loss, m = policy_loss(lp, old, adv, mask, 0.2, 0.3, kl_coef=0.1, ref_logprobs=ref)
    assert loss.item() == pytest.approx(-0.34 + 0.1 * k3, abs=1e-6)
    assert m["kl"] == pytest.approx(k3, abs=1e-6)


def test_token_mean_vs_seq_mean_on_ragged_mask():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    lp = torch.zeros(2, 3)
    # Behaviour logprobs outside the mask may be anything, even -inf: must not poison the loss.
    old = torch.tensor([[0.0, 0.0, 0.0], [0.0, -math.inf, -math.inf]])
    tok, _ = policy_loss(lp, old, adv, mask, 0.2, 0.2, loss_agg="token_mean")
    seq, _ = policy_loss(lp, old, adv, mask, 0.2, 0.2, loss_agg="seq_mean")
    assert tok.item() == pytest.approx(-(1 + 2 + 3 + 4) / 4)
    assert seq.item() == pytest.approx(-(2 + 4) / 2)
    seq_global, _ = policy_loss(lp, old, adv, mask, 0.2, 0.2, loss_agg="seq_mean", num_rows_global=4)
    assert seq_global.item() == pytest.approx(-6 / 4)
    with pytest.raises(ValueError, match="loss_agg"):
        policy_loss(lp, old, adv, mask, 0.2, 0.2, loss_agg="sum")


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean"])
def test_rank_shards_with_global_normaliser_sum_to_full_batch_gradient(loss_agg):
    """What the learner ranks do: loss on a shard / global count * world_size; DeepSpeed then
    averages the ranks' gradients. That must equal the gradient of the whole-batch loss."""
    g = torch.Generator().manual_seed(0)
    lp = (torch.randn(5, 7, generator=g) * 0.3).requires_grad_()
    old = torch.randn(5, 7, generator=g) * 0.3
    adv = torch.randn(5, 7, generator=g)
    mask = (torch.rand(5, 7, generator=g) > 0.4).float()
    full, _ = policy_loss(lp, old, adv, mask, 0.2, 0.28, loss_agg)
    (full_grad,) = torch.autograd.grad(full, lp)

    world, shards = 2, [slice(0, 3), slice(3, 5)]
    summed = torch.zeros_like(lp)
    for rows in shards:
        loss, _ = policy_loss(lp[rows], old[rows], adv[rows], mask[rows], 0.2, 0.28, loss_agg,
                              num_tokens_global=float(mask.sum()), num_rows_global=5)
        (grad,) = torch.autograd.grad(loss * world, lp)
        summed += grad
    torch.testing.assert_close(summed / world, full_grad, atol=1e-7, rtol=1e-6)
