"""In-process student backends on transformers (a laptop, CI, or a small deployment).

Two architectures, picked from ``policy.student.architecture``:

* :class:`SequenceClassificationStudent`: an encoder with a classification head
  (for example all-MiniLM-L6-v2 + head). One forward pass per batch.
* :class:`CausalLMStudent`: a small chat/instruct model driven by the policy's
  prompt. Classification scores every label as a continuation of the prompt
  (so the answer is always in the label set); extraction and generation decode
  greedily under a JSON-Schema constraint (lm-format-enforcer) and validate the
  result with jsonschema.

Inputs and prompts are tokenised by :mod:`distilld.models.prompting`, the same
code training uses, so a student is served exactly the ids it was trained on.

Models load from a local directory only, from safetensors only (pickle
weights can run code when loaded), and never with remote code. The weights are
upcast to float32: CPU kernels for bfloat16 are slower on most machines
(measured: SmolLM2 generation about 1.8x slower in bfloat16 on an AVX2 CPU).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, assert_never

import jsonschema
import torch

from distilld.errors import BackendError, ModelLoadError
from distilld.models.prompting import CausalPrompts, classifier_inputs, left_pad, position_ids
from distilld.policy.model import Architecture, Policy
from distilld.serving.base import Prediction, StudentBackend, validated_json
from distilld.vocabulary import TaskKind

# Prompts scored in one forward pass. Bounds memory when a large batch of long
# prompts meets a large label set (the cache is copied once per label).
_PROMPTS_PER_PASS = 16


def load_local_student(policy: Policy, model_dir: Path, model_version: str) -> StudentBackend:
    """Load the student that ``policy`` describes from ``model_dir``.

    Raises ModelLoadError when the directory does not hold a usable model for
    this policy (missing safetensors, label set mismatch, broken files).
    """
    architecture = policy.student.architecture
    if architecture is Architecture.sequence_classification:
        return SequenceClassificationStudent(policy, model_dir, model_version)
    if architecture is Architecture.causal_lm:
        return CausalLMStudent(policy, model_dir, model_version)
    assert_never(architecture)


# --------------------------------------------------------------------------- loading


def _require_safetensors(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ModelLoadError(
            f"student model directory {model_dir} does not exist or is not a directory; "
            "set student.model in the policy to a directory with config.json, "
            "*.safetensors and tokenizer files"
        )
    if not any(model_dir.glob("*.safetensors")):
        found = sorted(p.name for p in model_dir.iterdir())
        raise ModelLoadError(
            f"no *.safetensors weights in {model_dir} (found: {found}); distilld only loads "
            "safetensors because pickle weights (pytorch_model.bin) can run code when loaded. "
            "Convert the checkpoint with `model.save_pretrained(dir)` in a trusted environment"
        )


def _load(what: str, model_dir: Path, load: Callable[[], Any]) -> Any:
    """Run a transformers loader and turn whatever it raises into ModelLoadError."""
    try:
        return load()
    # transformers and torch raise many unrelated types here (OSError,
    # ValueError, KeyError, RuntimeError, safetensors errors...); the caller
    # needs one error that names the directory.
    except Exception as exc:
        raise ModelLoadError(
            f"could not load the {what} from {model_dir}: {type(exc).__name__}: {exc}. "
            "Check that the directory holds a complete transformers checkpoint "
            "(config.json, *.safetensors, tokenizer files) saved with a transformers "
            "version this daemon supports"
        ) from exc


def _load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return _load(
        "tokenizer",
        model_dir,
        lambda: AutoTokenizer.from_pretrained(
            str(model_dir), local_files_only=True, trust_remote_code=False
        ),
    )


def quiet_transformers() -> None:
    """No progress bars or load reports on stdout/stderr: the daemon's output is its
    JSON event log. Load problems still surface, as ModelLoadError."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def _load_model(auto_class: Any, model_dir: Path) -> Any:
    quiet_transformers()

    def load() -> Any:
        model = auto_class.from_pretrained(
            str(model_dir),
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            dtype=torch.float32,
        )
        return model.eval()

    return _load("model", model_dir, load)


def _model_token_limit(tokenizer: Any, config: Any) -> int | None:
    """The most tokens the model accepts, from its config and its tokenizer (None: unknown)."""
    limits: list[int] = []
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    # Tokenizers without a limit report a huge sentinel (about 1e30).
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 1_000_000:
        limits.append(tokenizer_limit)
    return min(limits) if limits else None


def _check_texts(inputs: Sequence[str]) -> list[str]:
    texts = list(inputs)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise BackendError(
                f"input {index} of the batch is a {type(text).__name__}, expected str; "
                "the consumer must send non-text requests to the dead-letter topic"
            )
    return texts


# --------------------------------------------------------------------------- encoder + head


class SequenceClassificationStudent:
    """An encoder with a classification head whose labels are exactly the policy's label set."""

    def __init__(self, policy: Policy, model_dir: Path, model_version: str) -> None:
        if policy.kind is not TaskKind.classification or policy.labels is None:
            raise ModelLoadError(
                f"task {policy.task!r} is a {policy.kind.value} task; a sequence-classification "
                "student only serves classification tasks with a label set"
            )
        _require_safetensors(model_dir)
        from transformers import AutoModelForSequenceClassification

        self._version = model_version
        self._tokenizer: Any = _load_tokenizer(model_dir)
        self._model: Any = _load_model(AutoModelForSequenceClassification, model_dir)

        id2label = {int(i): str(name) for i, name in self._model.config.id2label.items()}
        if sorted(id2label.values()) != sorted(policy.labels):
            raise ModelLoadError(
                f"the model in {model_dir} predicts labels {sorted(id2label.values())} but "
                f"policy {policy.task!r} expects {sorted(policy.labels)}; point student.model "
                "at a model trained for this label set, or fix the policy's labels"
            )
        # Report probabilities in the policy's label order, whatever the head's order.
        self._labels = list(policy.labels)
        self._column = {name: index for index, name in id2label.items()}

        self._truncation_side = policy.student.truncation_side
        limit = _model_token_limit(self._tokenizer, self._model.config)
        wanted = policy.student.max_input_tokens
        # A policy may allow more tokens than the encoder has positions; cap so
        # that long inputs are truncated instead of failing the forward pass.
        self.max_input_tokens = wanted if limit is None else min(wanted, limit)

    @property
    def model_version(self) -> str:
        return self._version

    def predict(self, inputs: Sequence[str]) -> list[Prediction]:
        texts = _check_texts(inputs)
        if not texts:
            return []
        if self._model is None:
            raise BackendError(f"student {self._version!r} is closed; load it again to predict")
        try:
            with torch.inference_mode():
                logits = self._model(**self.inputs(texts)).logits
                rows: list[list[float]] = torch.softmax(logits.float(), dim=-1).tolist()
        except Exception as exc:
            raise BackendError(
                f"student {self._version!r} failed on a batch of {len(texts)} inputs: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return [self._prediction(row) for row in rows]

    def inputs(self, texts: Sequence[str]) -> Any:
        """The model inputs of a batch (tensors), as training builds them."""
        return classifier_inputs(
            self._tokenizer, texts, self.max_input_tokens, self._truncation_side
        )

    def _prediction(self, row: list[float]) -> Prediction:
        probabilities = {label: row[self._column[label]] for label in self._labels}
        best = max(self._labels, key=probabilities.__getitem__)
        return Prediction(output=best, confidence=probabilities[best], probabilities=probabilities)

    def close(self) -> None:
        self._model = None
        self._tokenizer = None
        gc.collect()


# --------------------------------------------------------------------------- causal LM


class CausalLMStudent:
    """A causal language model answering through the policy's prompt template.

    Classification: each label (followed by the end-of-sequence token, so that
    a label that is a prefix of another is not favoured) is scored as a
    continuation of the prompt; the sums of token log-probabilities are
    softmax-normalised over the label set.

    Extraction / generation: greedy decoding constrained to the policy's
    output_schema by lm-format-enforcer, then parsed and validated with
    jsonschema. An output that still fails (for example cut by max_new_tokens)
    comes back with ``error`` set, never as an exception. Confidence is
    exp(mean log-probability) of the generated tokens under the unconstrained
    model, like vLLM's default (raw) logprobs.
    """

    def __init__(self, policy: Policy, model_dir: Path, model_version: str) -> None:
        _require_safetensors(model_dir)
        from transformers import AutoModelForCausalLM

        self._policy = policy
        self._version = model_version
        self._tokenizer: Any = _load_tokenizer(model_dir)
        self._model: Any = _load_model(AutoModelForCausalLM, model_dir)

        assert policy.prompt is not None  # guaranteed by Policy's validator
        prompts = CausalPrompts(self._tokenizer, policy.prompt)
        self._prompts: CausalPrompts | None = prompts
        eos, pad = prompts.eos, prompts.pad
        if eos is None or pad is None:
            raise ModelLoadError(
                f"the tokenizer in {model_dir} has no end-of-sequence token (eos_token_id is "
                f"{self._tokenizer.eos_token_id!r}); a causal-LM student needs one to end answers"
            )
        self._eos: int = eos
        self._pad: int = pad

        self._label_ids: list[list[int]] = []
        self._schema: dict[str, Any] | None = None
        self._validator: jsonschema.Draft202012Validator | None = None
        self._token_table: Any = None
        if policy.kind is TaskKind.classification:
            assert policy.labels is not None  # guaranteed by Policy's validator
            self._label_ids = [prompts.answer_ids(label) for label in policy.labels]
            answer_budget = max(len(ids) for ids in self._label_ids)
        else:
            assert policy.output_schema is not None  # guaranteed by Policy's validator
            self._schema = policy.output_schema
            self._validator = jsonschema.Draft202012Validator(self._schema)
            self._token_table = _load(
                "JSON constraint tables", model_dir, self._token_table_for_lmfe
            )
            answer_budget = policy.student.max_new_tokens

        # Text budget: the policy's max_input_tokens, but never so much that
        # template + text + answer overflow the model's positions.
        template_tokens = _load("chat template", model_dir, prompts.template_tokens)
        limit = _model_token_limit(self._tokenizer, self._model.config)
        wanted = policy.student.max_input_tokens
        if limit is not None:
            room = limit - template_tokens - answer_budget
            if room < 1:
                raise ModelLoadError(
                    f"the model in {model_dir} accepts {limit} tokens, but the prompt template "
                    f"alone takes {template_tokens} and the answer up to {answer_budget}; "
                    "shorten the prompt or lower student.max_new_tokens"
                )
            wanted = min(wanted, room)
        self.max_input_tokens = wanted

    @property
    def model_version(self) -> str:
        return self._version

    def predict(self, inputs: Sequence[str]) -> list[Prediction]:
        texts = _check_texts(inputs)
        if not texts:
            return []
        if self._model is None:
            raise BackendError(f"student {self._version!r} is closed; load it again to predict")
        try:
            with torch.inference_mode():
                prompts = self.prompt_ids(texts)
                if self._label_ids:
                    return self._classify(prompts)
                return self._generate_json(prompts)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(
                f"student {self._version!r} failed on a batch of {len(texts)} inputs: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def close(self) -> None:
        self._model = None
        self._tokenizer = None
        self._prompts = None
        self._token_table = None
        gc.collect()

    # ---- prompts

    def prompt_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """The prompt ids of a batch (text cut to max_input_tokens, rendered, tokenised),
        as training builds them."""
        if self._prompts is None:
            raise BackendError(f"student {self._version!r} is closed; load it again to predict")
        return self._prompts.prompt_ids(
            texts, self.max_input_tokens, self._policy.student.truncation_side
        )

    # ---- scoring

    def _label_scores(self, prompts: list[list[int]]) -> list[list[float]]:
        """Sum of token log-probabilities of every label after every prompt.

        Each prompt runs once; its key/value cache is then copied once per
        label and only the labels' own tokens run on top of it. Scoring the
        prompt x label pairs as whole sequences would cost one prompt pass per
        label instead.
        """
        labels = self._label_ids
        count = len(labels)
        # Label k is fed without its last token: position t predicts token t + 1.
        # Every label ends with eos, so each feeds at least one token.
        width = max(len(ids) for ids in labels) - 1
        feed = torch.full((count, width), self._pad, dtype=torch.long)
        feed_mask = torch.zeros((count, width), dtype=torch.long)
        for k, ids in enumerate(labels):
            feed[k, : len(ids) - 1] = torch.tensor(ids[:-1], dtype=torch.long)
            feed_mask[k, : len(ids) - 1] = 1

        scores: list[list[float]] = []
        for start in range(0, len(prompts), _PROMPTS_PER_PASS):
            chunk = prompts[start : start + _PROMPTS_PER_PASS]
            input_ids, attention_mask = left_pad(chunk, self._pad)
            output = self._model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids(attention_mask),
                use_cache=True,
                logits_to_keep=1,
            )
            # The prompt's last position predicts every label's first token.
            first = torch.log_softmax(output.logits[:, -1, :].float(), dim=-1)
            cache = output.past_key_values
            cache.batch_repeat_interleave(count)  # row b becomes rows b*count .. b*count+count-1
            rows = len(chunk)
            # Labels are right-padded after the prompt: a real token never
            # attends to the padding that follows it (causal attention).
            tail_ids = feed.repeat(rows, 1)
            tail_mask = feed_mask.repeat(rows, 1)
            lengths = attention_mask.sum(dim=-1).repeat_interleave(count)
            tail_positions = lengths.unsqueeze(-1) + torch.arange(feed.shape[1])
            tail = self._model(
                input_ids=tail_ids,
                attention_mask=torch.cat(
                    [attention_mask.repeat_interleave(count, dim=0), tail_mask], dim=-1
                ),
                position_ids=tail_positions,
                past_key_values=cache,
                use_cache=True,
            )
            rest = torch.log_softmax(tail.logits.float(), dim=-1)
            for b in range(rows):
                row_scores: list[float] = []
                for k, ids in enumerate(labels):
                    targets = torch.tensor(ids[1:], dtype=torch.long).unsqueeze(-1)
                    predictors = rest[b * count + k, : len(ids) - 1]
                    later = float(predictors.gather(-1, targets).sum())
                    row_scores.append(float(first[b, ids[0]]) + later)
                scores.append(row_scores)
        return scores

    def _classify(self, prompts: list[list[int]]) -> list[Prediction]:
        labels = self._policy.labels
        assert labels is not None
        predictions: list[Prediction] = []
        for scores in self._label_scores(prompts):
            probs: list[float] = torch.softmax(torch.tensor(scores), dim=-1).tolist()
            probabilities = dict(zip(labels, probs, strict=True))
            best = max(labels, key=probabilities.__getitem__)
            predictions.append(
                Prediction(output=best, confidence=probabilities[best], probabilities=probabilities)
            )
        return predictions

    # ---- JSON generation

    def _token_table_for_lmfe(self) -> Any:
        """lm-format-enforcer's per-tokenizer table: each token's text and word-start flag.

        lm-format-enforcer 0.11's own transformers integration imports names
        that transformers 5 removed, so we build the table from its documented
        extension point (TokenEnforcerTokenizerData) ourselves.
        """
        from lmformatenforcer import TokenEnforcerTokenizerData

        tokenizer = self._tokenizer
        vocab_size = int(self._model.config.vocab_size)
        special = set(tokenizer.all_special_ids)
        regular = [i for i in range(min(vocab_size, len(tokenizer))) if i not in special]
        # A token's text depends on what precedes it (SentencePiece/BPE drop a
        # leading space at the start of a string): decode it after an anchor
        # token and cut the anchor's text off.
        anchor = tokenizer.encode("0", add_special_tokens=False)[-1]
        anchor_text = tokenizer.decode([anchor])
        alone = tokenizer.batch_decode([[i] for i in regular])
        after_anchor = tokenizer.batch_decode([[anchor, i] for i in regular])
        table = [
            (i, text[len(anchor_text) :], len(text) - len(anchor_text) > len(solo))
            for i, text, solo in zip(regular, after_anchor, alone, strict=True)
        ]

        def decode(ids: list[int]) -> str:
            # A cut multi-byte character decodes as U+FFFD; the enforcer must
            # not see it as generated text.
            return str(tokenizer.decode(ids)).rstrip("\ufffd")

        return TokenEnforcerTokenizerData(table, decode, self._eos, False, vocab_size)

    def _generate_json(self, prompts: list[list[int]]) -> list[Prediction]:
        """Greedy decoding under the JSON-Schema constraint, one forward pass per step.

        Our own loop rather than ``model.generate``: it needs the raw
        (unconstrained) log-probability of each chosen token for the
        confidence, and no sampling setting shipped with the model can leak in.
        """
        from lmformatenforcer import JsonSchemaParser, TokenEnforcer

        # One enforcer per batch: it caches a parser state per generated prefix.
        enforcer = TokenEnforcer(self._token_table, JsonSchemaParser(self._schema))
        eos = self._eos
        rows = len(prompts)
        # The enforcer sees each row without padding: prompt + generated tokens.
        sequences = [list(p) for p in prompts]
        generated: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        finished = [False] * rows
        stopped: list[str | None] = [None] * rows  # why the constraint gave up on a row

        step_ids, attention_mask = left_pad(prompts, self._pad)
        positions = position_ids(attention_mask)
        past: Any = None
        for _ in range(self._policy.student.max_new_tokens):
            output = self._model(
                input_ids=step_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                past_key_values=past,
                use_cache=True,
                logits_to_keep=1,
            )
            past = output.past_key_values
            raw = torch.log_softmax(output.logits[:, -1, :].float(), dim=-1)
            next_tokens: list[int] = []
            for row in range(rows):
                if finished[row]:
                    next_tokens.append(self._pad)  # computed but ignored
                    continue
                try:
                    allowed: list[int] = enforcer.get_allowed_tokens(sequences[row]).allowed_tokens
                # lm-format-enforcer raises on schema features it cannot
                # enforce; one row's problem must not fail the whole batch.
                except Exception as exc:
                    stopped[row] = f"{type(exc).__name__}: {exc}"
                    allowed = []
                # An empty list means the parser reached a dead end: stop the
                # row and let validation report the broken output.
                candidates = torch.tensor(allowed or [eos], dtype=torch.long)
                token = int(candidates[raw[row, candidates].argmax()])
                next_tokens.append(token)
                sequences[row].append(token)
                generated[row].append(token)
                logprobs[row].append(float(raw[row, token]))
                finished[row] = token == eos
            if all(finished):
                break
            step_ids = torch.tensor(next_tokens, dtype=torch.long).unsqueeze(-1)
            attention_mask = torch.cat(
                [attention_mask, torch.ones((rows, 1), dtype=torch.long)], dim=-1
            )
            positions = positions[:, -1:] + 1

        predictions = []
        for tokens, token_logprobs, reason in zip(generated, logprobs, stopped, strict=True):
            confidence = math.exp(sum(token_logprobs) / len(token_logprobs))
            text = str(self._tokenizer.decode(tokens, skip_special_tokens=True))
            prediction = self._validated(text, confidence)
            if prediction.error is not None and reason is not None:
                prediction = replace(
                    prediction,
                    error=f"{prediction.error}; the JSON constraint stopped early ({reason})",
                )
            predictions.append(prediction)
        return predictions

    def _validated(self, text: str, confidence: float) -> Prediction:
        assert self._validator is not None  # set for every JSON task
        return validated_json(text, confidence, self._validator)
