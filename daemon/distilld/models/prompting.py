"""One prompting pipeline: how a task's input and answer become a student's tokens.

Training (:mod:`distilld.retrain.training`), in-process serving
(:mod:`distilld.serving.local`) and the vLLM backend (:mod:`distilld.serving.vllm`)
all go through these functions, so a student is trained on exactly the ids it
is later served with (``tests/models/test_prompting.py`` pins that, token for
token).

* Sequence-classification students: the text alone, cut to ``max_tokens`` on
  the policy's truncation side by the tokenizer (special tokens included), padded
  on the tokenizer's own side.
* Causal-LM students: the input text is cut to ``max_tokens`` tokens (the
  text, never the template), put into the prompt template at ``{input}``,
  rendered through the tokenizer's chat template when it has one (one user
  message, generation prompt added), then tokenised; a chat template writes its
  own special tokens. An answer is its tokens followed by the end-of-sequence
  token. Batches are left-padded so that every row ends at the last position.

Only tokenizer calls here; torch is imported by the padding functions alone,
so the vLLM backend (which renders messages) does not load it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from distilld.policy.common import INPUT_PLACEHOLDER

if TYPE_CHECKING:
    from torch import Tensor

T = TypeVar("T")

__all__ = [
    "CausalPrompts",
    "answer_text",
    "chat_messages",
    "classifier_inputs",
    "keep_tokens",
    "left_pad",
    "position_ids",
    "render_prompt",
]


def keep_tokens(tokens: Sequence[T], limit: int, truncation_side: str) -> list[T]:
    """At most ``limit`` tokens: the first ones for ``right`` truncation (the end is
    cut), the last ones for ``left`` (the start is cut)."""
    if len(tokens) <= limit:
        return list(tokens)
    return list(tokens[:limit] if truncation_side == "right" else tokens[-limit:])


def render_prompt(template: str, text: str) -> str:
    """The prompt template with ``text`` at ``{input}`` (plain replacement: JSON
    braces in the template stay as written)."""
    return template.replace(INPUT_PLACEHOLDER, text)


def chat_messages(prompt: str) -> list[dict[str, str]]:
    """The chat a rendered prompt is sent as: one user message."""
    return [{"role": "user", "content": prompt}]


def answer_text(output: str | dict[str, Any]) -> str:
    """The text of an answer a causal-LM student learns: the label, or the JSON object."""
    return output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)


def classifier_inputs(
    tokenizer: Any, texts: Sequence[str], max_tokens: int, truncation_side: str
) -> Any:
    """A sequence-classification batch: ``input_ids``, ``attention_mask`` (and the
    tokenizer's other inputs) as tensors, each text cut to ``max_tokens`` tokens."""
    tokenizer.truncation_side = truncation_side
    return tokenizer(
        list(texts),
        padding=True,
        truncation=True,
        max_length=max_tokens,
        return_tensors="pt",
    )


class CausalPrompts:
    """Prompt and answer ids of a causal-LM student, from its tokenizer and template."""

    def __init__(self, tokenizer: Any, template: str) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        eos = tokenizer.eos_token_id
        self.eos: int | None = eos if isinstance(eos, int) else None
        """None when the tokenizer has no end-of-sequence token (the caller refuses it)."""
        pad = tokenizer.pad_token_id
        # Padding positions are masked out of attention and loss: any id will do.
        self.pad: int | None = pad if isinstance(pad, int) else self.eos

    def truncate(self, texts: Sequence[str], max_tokens: int, truncation_side: str) -> list[str]:
        """Each text cut to ``max_tokens`` tokens (decoded back to text; the template
        is added afterwards and never cut)."""
        ids_per_text: list[list[int]] = self.tokenizer(
            list(texts), add_special_tokens=False
        ).input_ids
        out: list[str] = []
        for text, ids in zip(texts, ids_per_text, strict=True):
            if len(ids) <= max_tokens:
                out.append(text)
            else:
                out.append(self.tokenizer.decode(keep_tokens(ids, max_tokens, truncation_side)))
        return out

    def render(self, text: str) -> str:
        """The full prompt text for one (already cut) input."""
        rendered = render_prompt(self.template, text)
        if not self.chat:
            return rendered
        return str(
            self.tokenizer.apply_chat_template(
                chat_messages(rendered), tokenize=False, add_generation_prompt=True
            )
        )

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of rendered prompts (a chat template already wrote its special tokens)."""
        ids: list[list[int]] = self.tokenizer(
            list(prompts), add_special_tokens=not self.chat
        ).input_ids
        return ids

    def prompt_ids(
        self, texts: Sequence[str], max_tokens: int, truncation_side: str
    ) -> list[list[int]]:
        """The prompt ids of each input: cut, rendered, tokenised."""
        return self.encode(
            [self.render(t) for t in self.truncate(texts, max_tokens, truncation_side)]
        )

    def template_tokens(self) -> int:
        """How many tokens the rendered template takes around an empty input."""
        return len(self.encode([self.render("")])[0])

    def answer_ids(self, answer: str) -> list[int]:
        """The answer's tokens followed by the end-of-sequence token."""
        assert self.eos is not None  # the caller refuses a tokenizer without one
        ids: list[int] = self.tokenizer(answer, add_special_tokens=False).input_ids
        return [*ids, self.eos]


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    """``rows`` left-padded with ``pad`` to the longest: (input_ids, attention_mask)."""
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted from each row's first real token (left padding gets position 0)."""
    return (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
