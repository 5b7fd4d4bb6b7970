"""Distillation losses: pure functions of tensors, no model code.

Every loss returns one value per example with ``reduction="none"`` (a tensor
of shape ``[batch]``) and their mean with ``reduction="mean"`` (the default).
Per-example values are what a curriculum ranks examples by (difficulty by
student loss) and what the trainer reports.

Shapes:

* classification: ``logits`` ``[batch, classes]``; hard ``targets``
  ``[batch]`` (class indices); teacher distribution ``[batch, classes]``
  (probabilities, each row summing to 1).
* causal LM: ``logits`` ``[batch, positions, vocab]`` already aligned with
  ``targets`` ``[batch, positions]``: the logits at position t predict
  ``targets[:, t]`` (the caller shifts by one, ``logits[:, :-1]`` against
  ``input_ids[:, 1:]``). Positions whose target is ``ignore_index`` (the
  prompt, padding) take no part in the loss.

Distillation follows Hinton et al. (2015): teacher and student distributions
are both softened by the temperature T, the loss is KL(teacher || student),
and it is multiplied by T² so that its gradients keep the same scale as the
hard-label loss whatever T is (the gradient of the softened KL shrinks as
1/T²).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "Reduction",
    "hard_label_loss",
    "mixed_loss",
    "sequence_logprobs",
    "soft_label_loss",
    "token_cross_entropy",
    "top_k_logprob_loss",
]

IGNORE_INDEX = -100
"""Target value of a position that takes no part in a token loss (as in torch and transformers)."""

Reduction = Literal["mean", "none"]

# Probabilities are clamped to this before their logarithm: a teacher that gives
# a class probability 0 must not produce -inf (and NaN gradients) in the loss.
_TINY = 1e-12


def _reduce(per_example: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "none":
        return per_example
    if reduction == "mean":
        return per_example.mean()
    raise ValueError(f"reduction must be 'mean' or 'none' (received {reduction!r})")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (received {temperature})")


def _kl(teacher_log: Tensor, student_log: Tensor, valid: Tensor | None = None) -> Tensor:
    """KL(p || q) summed over the last dimension, from log-probabilities.

    Entries where ``valid`` is False (or where p is 0) contribute nothing; they
    may hold -inf without producing NaN.
    """
    keep = teacher_log > float("-inf")
    if valid is not None:
        keep = keep & valid
    # Replace the left-out entries before any arithmetic: 0 · -inf would be NaN,
    # in the forward pass or in the gradients.
    zero = torch.zeros_like(teacher_log)
    teacher_log = torch.where(keep, teacher_log, zero)
    student_log = torch.where(keep, student_log, zero)
    terms = teacher_log.exp() * (teacher_log - student_log)
    return torch.where(keep, terms, zero).sum(dim=-1)


# --------------------------------------------------------------------------- classification


def hard_label_loss(logits: Tensor, targets: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Cross-entropy of class ``logits`` ``[batch, classes]`` against class indices ``[batch]``."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits [batch, classes] and targets [batch], received "
            f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    return _reduce(F.cross_entropy(logits.float(), targets, reduction="none"), reduction)


def soft_label_loss(
    logits: Tensor,
    teacher_probs: Tensor,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """T² · KL(teacher_T || student_T) from the teacher's class probabilities.

    ``teacher_probs`` are the teacher's probabilities at temperature 1 (what a
    classification head or an API reports); softening them by T is
    ``softmax(log p / T)``, the same as dividing the teacher's logits by T.
    The student's ``logits`` ``[batch, classes]`` are divided by T. Identical
    distributions give 0 whatever T is.
    """
    _check_temperature(temperature)
    if logits.shape != teacher_probs.shape or logits.dim() != 2:
        raise ValueError(
            f"expected logits and teacher_probs of the same shape [batch, classes], received "
            f"{tuple(logits.shape)} and {tuple(teacher_probs.shape)}"
        )
    teacher_log = torch.log_softmax(
        torch.log(teacher_probs.float().clamp_min(_TINY)) / temperature, dim=-1
    )
    student_log = torch.log_softmax(logits.float() / temperature, dim=-1)
    per_example = _kl(teacher_log, student_log) * temperature**2
    return _reduce(per_example, reduction)


def mixed_loss(hard: Tensor, soft: Tensor, alpha: float) -> Tensor:
    """``alpha · hard + (1 - alpha) · soft`` (element-wise: works per example or on means).

    ``alpha`` is the weight of the hard-label loss: 1 is direct fine-tuning on
    the teacher's labels, 0 is pure distribution matching.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (received {alpha})")
    if hard.shape != soft.shape:
        raise ValueError(
            f"hard and soft losses must have the same shape, received "
            f"{tuple(hard.shape)} and {tuple(soft.shape)}"
        )
    return alpha * hard + (1.0 - alpha) * soft


# --------------------------------------------------------------------------- causal LM


def _check_tokens(logits: Tensor, targets: Tensor) -> None:
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [batch, positions, vocab] and targets [batch, positions], "
            f"received {tuple(logits.shape)} and {tuple(targets.shape)}"
        )


def _per_example_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` holds, per example (0 if none)."""
    weights = mask.to(values.dtype)
    total = (values * weights).sum(dim=-1)
    return total / weights.sum(dim=-1).clamp_min(1.0)


def token_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: Reduction = "mean",
) -> Tensor:
    """Hard-label loss of a causal LM: mean cross-entropy over each example's target tokens.

    Each example counts once, whatever the length of its answer (a per-token
    mean over the batch would weight long answers more). An example with no
    target token has loss 0.
    """
    _check_tokens(logits, targets)
    mask = targets != ignore_index
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    token_loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), safe.reshape(-1), reduction="none"
    ).reshape(targets.shape)
    return _reduce(_per_example_mean(token_loss, mask), reduction)


def sequence_logprobs(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Sum of the log-probabilities of each example's target tokens, shape ``[batch]``.

    Scoring every label of a classification task as a continuation of the
    prompt gives one score per label; those scores, as logits, give the
    student's label distribution (:func:`soft_label_loss` takes them).
    """
    _check_tokens(logits, targets)
    mask = targets != ignore_index
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    picked = log_probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, torch.zeros_like(picked)).sum(dim=-1)


def top_k_logprob_loss(
    logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """T² · KL(teacher || student) on the teacher's top-k tokens at each answer position.

    ``teacher_ids`` ``[batch, positions, k]`` are token ids in the student's
    vocabulary and ``teacher_logprobs`` the teacher's log-probabilities of
    them. An entry whose id is negative is missing (fewer than k tokens known
    there); a position with no entry (the prompt, padding, an answer token the
    teacher reported nothing for) takes no part. At each position both the
    teacher's and the student's probabilities are renormalised over the known
    top-k tokens only (the rest of the vocabulary is unknown on the teacher's
    side), softened by T, and compared with KL; each example's loss is the
    mean over its positions (0 if it has none).
    """
    _check_temperature(temperature)
    if (
        logits.dim() != 3
        or teacher_ids.dim() != 3
        or teacher_ids.shape != teacher_logprobs.shape
        or teacher_ids.shape[:2] != logits.shape[:2]
    ):
        raise ValueError(
            f"expected logits [batch, positions, vocab] and teacher_ids / teacher_logprobs "
            f"[batch, positions, k], received {tuple(logits.shape)}, "
            f"{tuple(teacher_ids.shape)} and {tuple(teacher_logprobs.shape)}"
        )
    known = teacher_ids >= 0
    minus_inf = torch.tensor(float("-inf"), device=logits.device)
    student = logits.float().gather(-1, teacher_ids.clamp_min(0))
    student = torch.where(known, student / temperature, minus_inf)
    teacher = torch.where(known, teacher_logprobs.float() / temperature, minus_inf)
    positions = known.any(dim=-1)
    # A position with no known token would renormalise over nothing (NaN): give
    # it a harmless dummy row, then leave it out of the mean.
    student = torch.where(positions.unsqueeze(-1), student, torch.zeros_like(student))
    teacher = torch.where(positions.unsqueeze(-1), teacher, torch.zeros_like(teacher))
    student_log = torch.log_softmax(student, dim=-1)
    teacher_log = torch.log_softmax(teacher, dim=-1)
    per_position = _kl(teacher_log, student_log, known) * temperature**2
    return _reduce(_per_example_mean(per_position, positions), reduction)
