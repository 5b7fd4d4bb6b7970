"""The distillation losses (pure functions) against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from distilld.retrain.losses import (
    IGNORE_INDEX,
    hard_label_loss,
    mixed_loss,
    sequence_logprobs,
    soft_label_loss,
    token_cross_entropy,
    top_k_logprob_loss,
)


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def _soften(p: list[float], t: float) -> list[float]:
    powered = [a ** (1 / t) for a in p]
    return [a / sum(powered) for a in powered]


# --------------------------------------------------------------------------- hard labels


def test_hard_label_loss_is_cross_entropy() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    targets = torch.tensor([0, 0])
    per_example = hard_label_loss(logits, targets, reduction="none")
    # Uniform over two classes: ln 2. Odds 3:1 for the target: -ln(3/4).
    assert per_example.tolist() == pytest.approx([math.log(2), -math.log(0.75)])
    assert hard_label_loss(logits, targets).item() == pytest.approx(
        (math.log(2) - math.log(0.75)) / 2
    )


def test_hard_label_loss_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="batch"):
        hard_label_loss(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


# --------------------------------------------------------------------------- soft labels


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_identical_distributions_give_zero_kl(temperature: float) -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.05, 0.05, 0.9]])
    logits = torch.log(probs) + 3.0  # a constant shift changes nothing
    loss = soft_label_loss(logits, probs, temperature, reduction="none")
    # float32 rounding, multiplied by T²
    assert loss.tolist() == pytest.approx([0.0, 0.0], abs=1e-5)


def test_two_class_kl_matches_hand_computation() -> None:
    teacher = [0.8, 0.2]
    # Student logits 0, 0: probabilities 0.5, 0.5.
    expected = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)  # 0.19274...
    loss = soft_label_loss(torch.zeros(1, 2), torch.tensor([teacher]), temperature=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.192745, rel=1e-5)


def test_temperature_softens_both_sides_and_scales_by_t_squared() -> None:
    teacher = [0.9, 0.1]
    student_probs = [0.6, 0.4]
    t = 2.0
    expected = t**2 * _kl(_soften(teacher, t), _soften(student_probs, t))
    loss = soft_label_loss(
        torch.log(torch.tensor([student_probs])), torch.tensor([teacher]), temperature=t
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Without the T² factor the softened KL would be much smaller than the raw one.
    assert _kl(_soften(teacher, t), _soften(student_probs, t)) < _kl(teacher, student_probs) / 2


def test_teacher_zero_probability_is_finite() -> None:
    loss = soft_label_loss(torch.zeros(1, 3), torch.tensor([[1.0, 0.0, 0.0]]), temperature=1.0)
    assert loss.item() == pytest.approx(math.log(3), rel=1e-5)  # KL(one-hot || uniform)


def test_soft_label_gradient_points_towards_the_teacher() -> None:
    logits = torch.zeros(1, 2, requires_grad=True)
    soft_label_loss(logits, torch.tensor([[0.9, 0.1]]), temperature=2.0).backward()
    assert logits.grad is not None
    assert logits.grad[0, 0] < 0 < logits.grad[0, 1]  # descending raises class 0


def test_soft_label_loss_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="temperature"):
        soft_label_loss(torch.zeros(1, 2), torch.tensor([[0.5, 0.5]]), temperature=0)
    with pytest.raises(ValueError, match="same shape"):
        soft_label_loss(torch.zeros(1, 2), torch.tensor([[0.2, 0.3, 0.5]]))
    with pytest.raises(ValueError, match="reduction"):
        soft_label_loss(torch.zeros(1, 2), torch.tensor([[0.5, 0.5]]), reduction="sum")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- mixing


def test_mixed_loss_weights_hard_by_alpha() -> None:
    hard = torch.tensor([1.0, 2.0])
    soft = torch.tensor([3.0, 6.0])
    assert mixed_loss(hard, soft, 0.25).tolist() == pytest.approx([2.5, 5.0])
    assert mixed_loss(hard, soft, 1.0).tolist() == [1.0, 2.0]
    assert mixed_loss(hard, soft, 0.0).tolist() == [3.0, 6.0]
    with pytest.raises(ValueError, match="alpha"):
        mixed_loss(hard, soft, 1.5)


def test_mixed_loss_gradient_reaches_both_terms() -> None:
    logits = torch.tensor([[0.3, -0.2]], requires_grad=True)
    hard = hard_label_loss(logits, torch.tensor([1]), reduction="none")
    soft = soft_label_loss(logits, torch.tensor([[0.6, 0.4]]), 2.0, reduction="none")
    mixed_loss(hard, soft, 0.5).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


# --------------------------------------------------------------------------- causal LM


def test_token_cross_entropy_averages_each_examples_answer_tokens() -> None:
    # Vocabulary of 4; uniform logits everywhere: every token costs ln 4.
    logits = torch.zeros(2, 3, 4)
    logits[1, 2, 3] = math.log(3.0)  # example 1, last position: token 3 has odds 3:3
    targets = torch.tensor(
        [
            [IGNORE_INDEX, 1, 2],  # prompt position masked; two answer tokens
            [IGNORE_INDEX, IGNORE_INDEX, 3],  # one answer token, p = 3/6
        ]
    )
    per_example = token_cross_entropy(logits, targets, reduction="none")
    assert per_example.tolist() == pytest.approx([math.log(4), math.log(2)])


def test_token_cross_entropy_of_an_example_without_targets_is_zero() -> None:
    targets = torch.full((1, 3), IGNORE_INDEX)
    assert token_cross_entropy(torch.randn(1, 3, 5), targets, reduction="none").tolist() == [0.0]


def test_sequence_logprobs_sums_the_answer_tokens() -> None:
    logits = torch.zeros(1, 3, 4)
    targets = torch.tensor([[IGNORE_INDEX, 0, 1]])
    assert sequence_logprobs(logits, targets).item() == pytest.approx(2 * math.log(0.25))


def test_top_k_identical_teacher_gives_zero() -> None:
    logits = torch.randn(1, 2, 10)
    ids = torch.tensor([[[3, 7, 1], [0, 2, 9]]])
    teacher = torch.log_softmax(logits, dim=-1).gather(-1, ids)
    loss = top_k_logprob_loss(logits, ids, teacher, temperature=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    # Renormalisation over the top-k: a constant shift of the teacher's
    # log-probabilities (its mass outside the top-k) changes nothing.
    loss = top_k_logprob_loss(logits, ids, teacher - 1.5, temperature=3.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)


def test_top_k_matches_hand_computation_on_two_tokens() -> None:
    # Student: uniform over a vocabulary of 5, so 1/2 each after renormalising
    # over the teacher's two tokens. Teacher: log-probs of 0.6 and 0.2 -> 0.75 / 0.25.
    logits = torch.zeros(1, 1, 5)
    ids = torch.tensor([[[4, 1]]])
    teacher = torch.log(torch.tensor([[[0.6, 0.2]]]))
    loss = top_k_logprob_loss(logits, ids, teacher, temperature=1.0)
    assert loss.item() == pytest.approx(_kl([0.75, 0.25], [0.5, 0.5]), rel=1e-5)
    t = 2.0
    loss = top_k_logprob_loss(logits, ids, teacher, temperature=t)
    assert loss.item() == pytest.approx(t**2 * _kl(_soften([0.75, 0.25], t), [0.5, 0.5]), rel=1e-5)


def test_top_k_masks_missing_entries_and_positions() -> None:
    logits = torch.zeros(2, 3, 5)
    # Example 0: position 0 unknown (prompt), position 1 has one known token of
    # two (-1 is missing), position 2 two tokens. Example 1: nothing known.
    ids = torch.tensor(
        [
            [[-1, -1], [2, -1], [0, 1]],
            [[-1, -1], [-1, -1], [-1, -1]],
        ]
    )
    teacher = torch.log(torch.tensor([[[1.0, 1.0], [0.5, 1.0], [0.6, 0.2]], [[1.0, 1.0]] * 3]))
    per_example = top_k_logprob_loss(logits, ids, teacher, reduction="none")
    # Position 1: one token renormalises to 1 on both sides -> 0. Position 2: as above.
    expected = (0.0 + _kl([0.75, 0.25], [0.5, 0.5])) / 2
    assert per_example.tolist() == pytest.approx([expected, 0.0], abs=1e-6)


def test_top_k_gradients_are_finite_and_only_on_known_tokens() -> None:
    logits = torch.zeros(1, 2, 6, requires_grad=True)
    ids = torch.tensor([[[1, 4, -1], [-1, -1, -1]]])
    teacher = torch.log(torch.tensor([[[0.9, 0.05, 1.0], [1.0, 1.0, 1.0]]]))
    top_k_logprob_loss(logits, ids, teacher, temperature=2.0).backward()
    grad = logits.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert grad[0, 0, 1] < 0 < grad[0, 0, 4]  # towards the teacher's favourite
    others = [0, 2, 3, 5]
    assert grad[0, 0, others].abs().sum() == 0
    assert grad[0, 1].abs().sum() == 0  # an unknown position
