"""The GRPO loss against a small example worked out by hand.

Two completions, epsilon = 0.2 (clip range [0.8, 1.2]):
  row 0: advantage +1, mask [1, 1, 0], ratios [1.0, 1.5, -]
         token losses -min(1, 1) = -1 and -min(1.5, 1.2) = -1.2 (clipped high)   sum -2.2
  row 1: advantage -2, mask [1, 1, 1], ratios [0.5, 1.0, 1.1]
         token losses -min(-1, -1.6) = 1.6 (clipped low), 2, -min(-2.2, -2.2) = 2.2   sum 5.8
Masked sum 3.6 over 5 tokens; 2 of the 5 tokens take the clipped term.
"""

import math

import pytest
import torch

from bv_blend.loss import grpo_loss, k3_kl

LOGPS = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.4, 0.55]], dtype=torch.float64))
RATIOS = torch.tensor([[1.0, 1.5, 1.0], [0.5, 1.0, 1.1]], dtype=torch.float64)
OLD = LOGPS - torch.log(RATIOS)
ADV = torch.tensor([1.0, -2.0], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


def loss(loss_type, **kwargs):
    args = dict(loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.2,
                max_completion_length=4)
    args.update(kwargs)
    return grpo_loss(LOGPS, OLD, ADV, MASK, **args)


@pytest.mark.parametrize("loss_type, expected", [
    ("grpo", (-2.2 / 2 + 5.8 / 3) / 2),  # mean of the per-sequence token means
    ("bnpo", 3.6 / 5),  # over the batch's tokens
    ("dr_grpo", 3.6 / (2 * 4)),  # over B * max_completion_length
    ("dapo", 3.6 / 5),  # without a step-wide count it is the batch's tokens
])
def test_loss_values_by_hand(loss_type, expected):
    out = loss(loss_type)
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.clip_ratio.item() == pytest.approx(2 / 5)
    assert out.kl is None


def test_dapo_divides_by_the_step_token_count():
    assert loss("dapo", num_items_in_batch=12.0).loss.item() == pytest.approx(3.6 / 12)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_a_micro_batch_mean_is_divided_by_the_micro_batch_count(loss_type):
    # Without a step-wide token count every aggregation is a mean over its own micro-batch.
    whole = loss(loss_type).loss.item()
    assert loss(loss_type, num_micro_batches=4).loss.item() == pytest.approx(whole / 4)


def test_dapo_with_the_step_token_count_is_not_divided_again():
    out = loss("dapo", num_items_in_batch=12.0, num_micro_batches=4)
    assert out.loss.item() == pytest.approx(3.6 / 12)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_accumulated_micro_batches_give_the_whole_batch(loss_type):
    # One row per micro-batch; dapo is given the step's 5 tokens. (bnpo is left out: it divides
    # by each micro-batch's own tokens, 2 and 3 here, as TRL defines it.)
    settings = dict(loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.2,
                    max_completion_length=4, num_items_in_batch=5.0)
    whole_logps = LOGPS.clone().requires_grad_(True)
    whole = grpo_loss(whole_logps, OLD, ADV, MASK, **settings).loss
    whole.backward()
    micro_logps = LOGPS.clone().requires_grad_(True)
    total = sum(grpo_loss(micro_logps[rows], OLD[rows], ADV[rows], MASK[rows],
                          num_micro_batches=2, **settings).loss
                for rows in (slice(0, 1), slice(1, 2)))
    total.backward()
    assert total.item() == pytest.approx(whole.item(), abs=1e-12)
    torch.testing.assert_close(micro_logps.grad, whole_logps.grad)


def test_asymmetric_clip_range():
    # epsilon_high 0.6: ratio 1.5 is no longer clipped, row 0 token 1 costs -1.5 instead of -1.2.
    out = loss("bnpo", epsilon_high=0.6)
    assert out.loss.item() == pytest.approx((3.6 - 0.3) / 5)
    assert out.clip_ratio.item() == pytest.approx(1 / 5)


def test_kl_term_by_hand():
    # The reference gives row 0, token 0 twice the policy's probability: d = log 2.
    ref = LOGPS.clone()
    ref[0, 0] += math.log(2)
    k3 = 2 - math.log(2) - 1
    out = loss("bnpo", beta=0.1, ref_logps=ref)
    assert out.kl.item() == pytest.approx(k3 / 5)
    assert out.loss.item() == pytest.approx((3.6 + 0.1 * k3) / 5)


def test_kl_needs_reference():
    with pytest.raises(ValueError, match="ref_logps"):
        loss("bnpo", beta=0.1)


def test_gradient_is_minus_advantage_where_unclipped():
    # d(-ratio * A)/d logp = -ratio * A on unclipped tokens; clipped and masked tokens give 0.
    logps = LOGPS.clone().requires_grad_(True)
    grpo_loss(logps, OLD, ADV, MASK, loss_type="bnpo", epsilon_low=0.2,
              epsilon_high=0.2).loss.backward()
    expected = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 2.0, 2.2]], dtype=torch.float64) / 5
    torch.testing.assert_close(logps.grad, expected)


def test_k3_is_non_negative_and_zero_at_equality():
    a = torch.randn(100, dtype=torch.float64)
    b = torch.randn(100, dtype=torch.float64)
    assert (k3_kl(a, b) >= 0).all()
    assert torch.equal(k3_kl(a, a), torch.zeros(100, dtype=torch.float64))


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="loss_type"):
        loss("ppo")
