"""A sequence-classification student (encoder + head) learning the task's labels.

The hard loss is cross-entropy against the teacher's label, the soft loss KL
to the teacher's class probabilities. Inputs are tokenised by
:func:`distilld.models.prompting.classifier_inputs`, as serving tokenises them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distilld.models.prompting import classifier_inputs
from distilld.retrain import losses
from distilld.retrain.methods import TrainingConfig
from distilld.retrain.training.examples import (
    SOFT_LABELS,
    SOFT_NONE,
    TrainingExample,
    label_distribution,
)
from distilld.retrain.training.loop import count_parameters, mix
from distilld.serving.local import quiet_transformers


class ClassifierTask:
    """A sequence-classification student (encoder + head) for the task's labels."""

    adapter = False

    def __init__(
        self,
        base: Path,
        examples: Sequence[TrainingExample],
        config: TrainingConfig,
        labels: list[str],
        truncation_side: str,
    ) -> None:
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        quiet_transformers()
        self._config = config
        # A base that already has a head for this label set (a previous student)
        # keeps it, in its own label order; any other head is replaced.
        base_config = AutoConfig.from_pretrained(str(base), local_files_only=True)
        existing = [str(v) for _, v in sorted(base_config.id2label.items())]
        has_head = any(
            a.endswith("ForSequenceClassification") for a in base_config.architectures or []
        )
        order = existing if has_head and sorted(existing) == sorted(labels) else labels
        self.model: Any = AutoModelForSequenceClassification.from_pretrained(
            str(base),
            num_labels=len(order),
            id2label=dict(enumerate(order)),
            label2id={label: i for i, label in enumerate(order)},
            problem_type="single_label_classification",
            ignore_mismatched_sizes=True,
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            dtype=torch.float32,
        )
        self._tokenizer: Any = AutoTokenizer.from_pretrained(
            str(base), local_files_only=True, trust_remote_code=False
        )
        self._truncation_side = truncation_side
        index = {label: i for i, label in enumerate(order)}
        self._texts = [e.text for e in examples]
        self._targets = torch.tensor([index[str(e.output)] for e in examples])
        self.confidences = [e.confidence for e in examples]
        soft_wanted = config.distill is not None
        rows = [label_distribution(e, order) if soft_wanted else None for e in examples]
        self._has_soft = torch.tensor([r is not None for r in rows])
        self._teacher = torch.tensor(
            [r if r is not None else [1.0 / len(order)] * len(order) for r in rows]
        )
        self.soft_kinds = [SOFT_LABELS if r is not None else SOFT_NONE for r in rows]

    @property
    def size(self) -> int:
        return len(self._texts)

    @property
    def trainable_parameters(self) -> int:
        return count_parameters(self.model)

    def inputs(self, indices: list[int]) -> Any:
        """The model inputs of these examples (tensors), as serving builds them."""
        return classifier_inputs(
            self._tokenizer,
            [self._texts[i] for i in indices],
            self._config.max_tokens,
            self._truncation_side,
        )

    def losses(self, indices: list[int]) -> Tensor:
        logits = self.model(**self.inputs(indices)).logits
        hard = losses.hard_label_loss(logits, self._targets[indices], reduction="none")
        distill = self._config.distill
        if distill is None:
            return hard
        soft = losses.soft_label_loss(
            logits, self._teacher[indices], distill.temperature, reduction="none"
        )
        return mix(self._config, hard, soft, self._has_soft[indices])

    def save(self, dest: Path) -> None:
        self.model.save_pretrained(str(dest))
        self._tokenizer.save_pretrained(str(dest))
