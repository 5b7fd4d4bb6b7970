"""A causal-LM student (full fine-tuning or LoRA) learning the teacher's answers.

The prompt template is rendered and tokenised by
:class:`distilld.models.prompting.CausalPrompts`, exactly as serving renders
it, and the model learns the teacher's answer (the label, or the JSON object)
followed by the end-of-sequence token. The loss covers the answer tokens only,
never the prompt. Distribution matching uses the teacher's top-k token
log-probabilities at each answer token when the example carries them
(:attr:`TrainingExample.top_logprobs`), else, for a classification task, the
teacher's label distribution against the student's distribution over the
label set (each label scored as the whole answer, as serving scores it). An
extraction or generation example without top-k log-probabilities is trained
on the hard answer alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distilld.errors import TrainingError
from distilld.models.prompting import CausalPrompts, answer_text, left_pad, position_ids
from distilld.retrain import losses
from distilld.retrain.methods import SoftTargets, TrainingConfig
from distilld.retrain.training.examples import (
    SOFT_LABELS,
    SOFT_NONE,
    SOFT_TOP_K,
    TrainingExample,
    label_distribution,
)
from distilld.retrain.training.loop import count_parameters, mix
from distilld.serving.local import quiet_transformers


@dataclass
class CausalSequence:
    """One causal-LM example, tokenized."""

    prompt: list[int]
    answer: list[int]  # ends with the end-of-sequence token
    target: int  # index of the answer in the label set, or -1
    top_k: list[list[tuple[int, float]]] | None  # per answer token (eos included if reported)
    teacher_labels: list[float] | None  # label distribution, when that is the soft target
    soft: str


class CausalExamples:
    """The examples of a causal-LM run, tokenised (no model needed).

    Raises TrainingError when the tokenizer has no end-of-sequence token.
    """

    def __init__(
        self,
        tokenizer: Any,
        where: Path | str,
        examples: Sequence[TrainingExample],
        config: TrainingConfig,
        labels: list[str] | None,
        prompt: str,
        truncation_side: str,
    ) -> None:
        self.prompts = CausalPrompts(tokenizer, prompt)
        if self.prompts.eos is None:
            raise TrainingError(
                f"the tokenizer in {where} has no end-of-sequence token; a causal-LM student "
                "needs one to end its answers"
            )
        self.pad: int = self.prompts.pad if self.prompts.pad is not None else self.prompts.eos
        self._tokenizer = tokenizer
        self._config = config
        self._truncation_side = truncation_side
        self._vocab: dict[str, int] = dict(tokenizer.get_vocab())
        self._token_ids: dict[str, int | None] = {}
        self.labels = labels
        self.label_ids = (
            [self.prompts.answer_ids(label) for label in labels] if labels is not None else []
        )
        self.items = [self._prepare(e) for e in examples]

    def _token_id(self, token: str) -> int | None:
        """The student's id for a token reported by the teacher (its text), if it has one."""
        if token not in self._token_ids:
            found = self._vocab.get(token)
            if found is None:
                ids = self._tokenizer(token, add_special_tokens=False).input_ids
                found = ids[0] if len(ids) == 1 else None
            self._token_ids[token] = found
        return self._token_ids[token]

    def _top_k(
        self, example: TrainingExample, answer: list[int]
    ) -> list[list[tuple[int, float]]] | None:
        """The teacher's top-k per answer token, in student ids; None unless they line up.

        The teacher reports one mapping per generated token; it lines up with the
        student's answer when it has as many entries as the answer's tokens, with
        or without the end-of-sequence token.
        """
        reported = example.top_logprobs
        if not reported or len(reported) not in (len(answer) - 1, len(answer)):
            return None
        rows: list[list[tuple[int, float]]] = []
        for position in reported:
            row: dict[int, float] = {}
            for token, logprob in position.items():
                token_id = self._token_id(token)
                if token_id is not None and math.isfinite(logprob):
                    row.setdefault(token_id, float(logprob))
            rows.append(sorted(row.items()))
        return rows if any(rows) else None

    def _prepare(self, example: TrainingExample) -> CausalSequence:
        text = answer_text(example.output)
        answer = self.prompts.answer_ids(text)
        target = self.labels.index(text) if self.labels is not None else -1
        top_k: list[list[tuple[int, float]]] | None = None
        teacher_labels: list[float] | None = None
        distill = self._config.distill
        if distill is not None:
            wanted = distill.soft_targets
            if wanted in (SoftTargets.auto, SoftTargets.top_k_tokens):
                top_k = self._top_k(example, answer)
            by_labels = wanted in (SoftTargets.auto, SoftTargets.label_distribution)
            if top_k is None and by_labels and self.labels is not None:
                teacher_labels = label_distribution(example, self.labels)
        soft = SOFT_TOP_K if top_k else SOFT_LABELS if teacher_labels else SOFT_NONE
        [prompt] = self.prompts.prompt_ids(
            [example.text], self._config.max_tokens, self._truncation_side
        )
        return CausalSequence(
            prompt=prompt,
            answer=answer,
            target=target,
            top_k=top_k,
            teacher_labels=teacher_labels,
            soft=soft,
        )


class CausalTask:
    """A causal-LM student (full fine-tuning or LoRA) learning the teacher's answers."""

    def __init__(
        self,
        base: Path,
        examples: Sequence[TrainingExample],
        config: TrainingConfig,
        labels: list[str] | None,
        prompt: str,
        truncation_side: str,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quiet_transformers()
        self._config = config
        self._tokenizer: Any = AutoTokenizer.from_pretrained(
            str(base), local_files_only=True, trust_remote_code=False
        )
        self._examples = CausalExamples(
            self._tokenizer, base, examples, config, labels, prompt, truncation_side
        )
        self._items = self._examples.items
        self._label_ids = self._examples.label_ids
        self.confidences = [e.confidence for e in examples]
        self.soft_kinds = [item.soft for item in self._items]

        model: Any = AutoModelForCausalLM.from_pretrained(
            str(base),
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            # Trained in float32: CPU kernels and optimiser updates need it (a
            # small update to a bfloat16 weight is often rounded away).
            dtype=torch.float32,
        )
        # A merged adapter is saved as a plain checkpoint.
        self.adapter = config.lora is not None and not config.lora.merge
        if config.lora is not None:
            from peft import LoraConfig, get_peft_model

            lora = config.lora
            target: str | list[str] = (
                lora.target_modules
                if isinstance(lora.target_modules, str)
                else list(lora.target_modules)
            )
            model = get_peft_model(
                model,
                LoraConfig(
                    r=lora.rank,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=target,
                    bias="none",
                    task_type="CAUSAL_LM",
                ),
            )
        self.model = model

    @property
    def size(self) -> int:
        return len(self._items)

    @property
    def trainable_parameters(self) -> int:
        return count_parameters(self.model)

    # ---- losses

    def losses(self, indices: list[int]) -> Tensor:
        items = [self._items[i] for i in indices]
        result = torch.zeros(len(items))
        by_labels = [k for k, item in enumerate(items) if item.teacher_labels is not None]
        others = [k for k, item in enumerate(items) if item.teacher_labels is None]
        if others:
            result = result.index_put(
                (torch.tensor(others),), self._answer_losses([items[k] for k in others])
            )
        if by_labels:
            result = result.index_put(
                (torch.tensor(by_labels),), self._label_losses([items[k] for k in by_labels])
            )
        return result

    def _forward(self, rows: list[tuple[list[int], list[int]]]) -> tuple[Tensor, Tensor]:
        """Logits over the answer positions of (prompt, answer) rows, and their targets.

        Rows are left-padded so that every answer ends at the last position;
        only the last ``longest answer + 1`` positions' logits are computed
        (``logits_to_keep``), which saves the vocabulary-sized logits of every
        prompt position. Returns logits ``[rows, A, vocab]`` aligned with
        targets ``[rows, A]`` (A: the longest answer), IGNORE_INDEX outside each
        row's answer.
        """
        longest = max(len(a) for _, a in rows)
        input_ids, mask = left_pad([prompt + answer for prompt, answer in rows], self._examples.pad)
        targets = torch.full((len(rows), longest), losses.IGNORE_INDEX, dtype=torch.long)
        for r, (_, answer) in enumerate(rows):
            targets[r, longest - len(answer) :] = torch.tensor(answer)
        output = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids(mask),
            use_cache=False,
            logits_to_keep=longest + 1,
        )
        # Position t predicts token t + 1: drop the last position's logits.
        return output.logits[:, :-1, :], targets

    def _answer_losses(self, items: list[CausalSequence]) -> Tensor:
        """Hard loss on each answer, mixed with the top-k loss where the teacher gave it."""
        logits, targets = self._forward([(item.prompt, item.answer) for item in items])
        hard = losses.token_cross_entropy(logits, targets, reduction="none")
        distill = self._config.distill
        if distill is None or not any(item.top_k for item in items):
            return hard
        longest = targets.shape[1]
        k = max(len(row) for item in items if item.top_k for row in item.top_k)
        ids = torch.full((len(items), longest, k), -1, dtype=torch.long)
        logprobs = torch.zeros((len(items), longest, k))
        for r, item in enumerate(items):
            if not item.top_k:
                continue
            offset = longest - len(item.answer)
            for j, row in enumerate(item.top_k):
                for m, (token_id, logprob) in enumerate(row):
                    ids[r, offset + j, m] = token_id
                    logprobs[r, offset + j, m] = logprob
        soft = losses.top_k_logprob_loss(
            logits, ids, logprobs, distill.temperature, reduction="none"
        )
        has_soft = torch.tensor([bool(item.top_k) for item in items])
        return mix(self._config, hard, soft, has_soft)

    def _label_losses(self, items: list[CausalSequence]) -> Tensor:
        """Hard loss on the teacher's label, mixed with KL over the label set.

        Every label is scored as the whole answer after each prompt (one row per
        example and label, in one forward pass); the summed log-probabilities
        are the student's logits over the label set, as serving computes them.
        """
        distill = self._config.distill
        assert distill is not None  # label targets are only prepared when distilling
        count = len(self._label_ids)
        rows = [(item.prompt, answer) for item in items for answer in self._label_ids]
        logits, targets = self._forward(rows)
        scores = losses.sequence_logprobs(logits, targets).reshape(len(items), count)
        picked = torch.tensor([r * count + item.target for r, item in enumerate(items)])
        hard = losses.token_cross_entropy(logits[picked], targets[picked], reduction="none")
        teacher = torch.tensor([item.teacher_labels for item in items])
        soft = losses.soft_label_loss(scores, teacher, distill.temperature, reduction="none")
        return losses.mixed_loss(hard, soft, distill.alpha)

    # ---- saving

    def save(self, dest: Path) -> None:
        model = self.model
        lora = self._config.lora
        if lora is not None and lora.merge:
            model = model.merge_and_unload()
        # Saved in float32 (as trained): rounding to bfloat16 would undo part of
        # the fine-tuning. An adapter alone is a few MB anyway.
        model.save_pretrained(str(dest))
        self._tokenizer.save_pretrained(str(dest))
