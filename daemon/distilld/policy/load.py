"""Reading policy files: YAML in, :class:`Policy` out, or one clear error.

Operators write these files by hand, so every problem becomes one line that
names the file, the field path and what was expected, for example::

    policies/reviews.yaml: student.batch.max_size: expected a number greater
    than or equal to 1 (received -1)

The path is the one the operator writes: the ``teacher`` section is a union
told apart by ``backend``, and pydantic's own path (``teacher.openai.prompt``)
is shown as ``teacher.prompt``. A check that spans the fields of a section
(``monitors.accuracy``: min_samples above the window) is reported at the
section.

pydantic's own messages and tracebacks never reach the operator. A directory
of policies is checked as a whole: the problems of every file are reported
together, so one run shows everything to fix.
"""

from __future__ import annotations

import types
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from distilld.errors import PolicyError
from distilld.policy.model import NAME_PATTERN, TOPIC_PATTERN, Policy, PolicyFieldError

POLICY_SUFFIXES = (".yaml", ".yml")
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
RECEIVED_MAX_CHARS = 80

# The patterns of model.py in words: a regular expression is not an
# explanation an operator can act on.
_PATTERN_WORDS = {
    TOPIC_PATTERN: (
        "a Kafka topic name: 1 to 249 characters among letters, digits, '.', '_' and '-', "
        "and not '.' or '..'"
    ),
    NAME_PATTERN: (
        "a name of 1 to 63 characters among lowercase letters, digits, '-' and '_', "
        "starting with a letter or a digit"
    ),
}


# --------------------------------------------------------------------------- YAML


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key repeated in one mapping is an error.

    Plain YAML keeps the last of two equal keys; in a hand-edited policy that
    silently drops a setting the operator believes is active.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"found the key {key!r} twice",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(f"policy file {path} not found", [f"{path}: file not found"]) from None
    except IsADirectoryError:
        raise PolicyError(
            f"policy file {path} is a directory", [f"{path}: is a directory, not a file"]
        ) from None
    except UnicodeDecodeError as exc:
        raise PolicyError(
            f"policy file {path} is not UTF-8 text",
            [f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})"],
        ) from None
    except OSError as exc:
        raise PolicyError(
            f"cannot read policy file {path}", [f"{path}: cannot read ({exc.strerror})"]
        ) from None


def _yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        # PyYAML counts from 0; editors count from 1.
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        return f"{path}: invalid YAML at {where}: {exc.problem}"
    return f"{path}: invalid YAML: {exc}"


def _parse_mapping(path: Path, text: str) -> dict[str, Any]:
    """The top-level mapping of a policy file, or a PolicyError."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise PolicyError(
            f"policy file {path} is not valid YAML", [_yaml_problem(path, exc)]
        ) from None
    if data is None:
        raise PolicyError(
            f"policy file {path} is empty",
            [f"{path}: the file is empty; expected a mapping with task, kind, traffic, student"],
        )
    if not isinstance(data, dict):
        raise PolicyError(
            f"policy file {path} is not a mapping",
            [
                f"{path}: expected a mapping (key: value lines) at the top level "
                f"(received a {_yaml_type_name(data)})"
            ],
        )
    return data


def _yaml_type_name(value: Any) -> str:
    names = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}
    return names.get(type(value), type(value).__name__)


# --------------------------------------------------------------- pydantic errors


def _reserved_sections() -> list[str]:
    """Fields declared as ``None``: sections a later version of distilld fills."""
    return [name for name, field in Policy.model_fields.items() if field.annotation is type(None)]


@dataclass(frozen=True)
class _Union:
    """A union of section models told apart by the value of one field."""

    discriminator: str
    members: dict[str, type[BaseModel]]  # tag value -> model

    def tags(self) -> str:
        *head, last = [repr(tag) for tag in self.members]
        return f"{', '.join(head)} or {last}" if head else last


def _section_type(annotation: Any) -> type[BaseModel] | _Union | None:
    """The section model, or the discriminated union of models, of a field's annotation."""
    discriminator: str | None = None
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation, *metadata = get_args(annotation)
            for meta in metadata:
                if isinstance(meta, FieldInfo) and isinstance(meta.discriminator, str):
                    discriminator = meta.discriminator
            continue
        if origin in (Union, types.UnionType):
            args = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(args) == 1:  # X | None
                annotation = args[0]
                continue
            if discriminator is None:
                return None
            members: dict[str, type[BaseModel]] = {}
            for arg in args:
                if not (isinstance(arg, type) and issubclass(arg, BaseModel)):
                    return None
                tag_annotation = arg.model_fields[discriminator].annotation
                if get_origin(tag_annotation) is Literal:
                    members.update({str(tag): arg for tag in get_args(tag_annotation)})
            return _Union(discriminator, members)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
        return None


@dataclass(frozen=True)
class _Location:
    """Where a pydantic error is, as the operator reads it.

    ``path`` is pydantic's location without the tags of discriminated unions;
    ``model`` is the section model the location ends at (None: a plain field,
    a list item, a dict entry); ``chosen_by`` says which union tag chose
    ``model`` ("backend openai").
    """

    path: tuple[int | str, ...]
    model: type[BaseModel] | None
    chosen_by: str | None = None
    union: _Union | None = None  # set when the location ends at a union field


def _locate(loc: Sequence[int | str]) -> _Location:
    path: list[int | str] = []
    model: type[BaseModel] | None = Policy
    chosen_by: str | None = None
    union: _Union | None = None
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        path.append(part)
        chosen_by, union = None, None
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            model = None
            continue
        section = _section_type(model.model_fields[part].annotation)
        if isinstance(section, _Union):
            # pydantic puts the member's tag after the field: teacher.openai.prompt
            candidate = parts[0] if parts else None
            if isinstance(candidate, str) and candidate in section.members:
                parts.pop(0)
                chosen_by = f"{section.discriminator} {candidate}"
                model = section.members[candidate]
            else:
                model, union = None, section
        else:
            model = section
    return _Location(tuple(path), model, chosen_by, union)


def _format_path(loc: Sequence[int | str]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path or "(top level)"


def _received(value: Any) -> str:
    text = repr(value)
    if len(text) > RECEIVED_MAX_CHARS:
        text = text[: RECEIVED_MAX_CHARS - 3] + "..."
    return f"(received {text})"


def _unknown_field(section: _Location) -> str:
    model = section.model
    if model is None:
        return "unknown field"
    reserved = set(_reserved_sections()) if model is Policy else set()
    allowed = [name for name in model.model_fields if name not in reserved]
    name = _format_path(section.path) if section.path else "a policy"
    if section.chosen_by is not None:
        name += f" ({section.chosen_by})"
    return f"unknown field; the fields of {name} are: {', '.join(allowed)}"


def _expected(error: ErrorDetails) -> str:
    """What the field should have been, in words, from one pydantic error."""
    kind = error["type"]
    ctx = error.get("ctx", {})
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern", ""))
        return "expected " + _PATTERN_WORDS.get(pattern, f"a string matching {pattern}")
    comparisons = {
        "greater_than": ("gt", "greater than"),
        "greater_than_equal": ("ge", "greater than or equal to"),
        "less_than": ("lt", "less than"),
        "less_than_equal": ("le", "less than or equal to"),
    }
    if kind in comparisons:
        key, words = comparisons[kind]
        return f"expected a number {words} {ctx.get(key)}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "expected a mapping (key: value lines)"
    if kind == "enum":
        return f"expected one of {ctx.get('expected')}"
    if kind == "literal_error":
        return f"expected {ctx.get('expected')}"
    message = error["msg"]
    for prefix, replacement in (("Input should be ", "expected "), ("String should ", "should ")):
        if message.startswith(prefix):
            return replacement + message[len(prefix) :]
    return message


def _problem(path: Path, error: ErrorDetails) -> str:
    """One operator-readable line for one pydantic error."""
    where = _locate(error["loc"])
    loc = list(where.path)
    kind = error["type"]
    if kind == "missing":
        return f"{path}: {_format_path(loc)}: required field is missing"
    if kind == "extra_forbidden":
        section = _locate(error["loc"][:-1])
        return f"{path}: {_format_path(loc)}: {_unknown_field(section)} {_received(error['input'])}"
    if kind in ("union_tag_not_found", "union_tag_invalid") and where.union is not None:
        union = where.union
        field = _format_path([*loc, union.discriminator])
        if kind == "union_tag_not_found":
            return (
                f"{path}: {field}: required field is missing; expected {union.tags()} "
                f"(it decides which other fields {_format_path(loc)} takes)"
            )
        tag = error["input"].get(union.discriminator) if isinstance(error["input"], dict) else None
        return f"{path}: {field}: expected {union.tags()} {_received(tag)}"
    if len(loc) >= 2 and loc[-1] == "[key]":
        # A mapping key that is not allowed: pydantic adds "[key]" after the key.
        key, loc = loc[-2], loc[:-2]
        return (
            f"{path}: {_format_path(loc)}: {_expected(error)} as a key (received the key {key!r})"
        )
    if kind == "value_error":
        cause = error.get("ctx", {}).get("error")
        message = str(cause) if cause is not None else error["msg"]
        if isinstance(cause, PolicyFieldError):
            # A cross-field check: pydantic locates it at the section, the
            # exception knows the field, and the input is the whole section.
            loc += cause.field.split(".")
            return f"{path}: {_format_path(loc)}: {message}"
        # A check of a whole section names the values it compared; the
        # section's content would only repeat them.
        if "received" not in message and where.model is None:
            message += " " + _received(error["input"])
        return f"{path}: {_format_path(loc)}: {message}"
    return f"{path}: {_format_path(loc)}: {_expected(error)} {_received(error['input'])}"


def _optional_sections() -> list[str]:
    """Top-level sections that may be left out entirely (teacher)."""
    sections = []
    for name, field in Policy.model_fields.items():
        nullable = type(None) in get_args(field.annotation)
        if nullable and _section_type(field.annotation) is not None:
            sections.append(name)
    return sections


def _validate(path: Path, data: dict[str, Any]) -> Policy:
    problems = []
    # Reserved sections are refused whatever their value: even an empty
    # `teacher:` tells us the operator expects a teacher to be used.
    for name in _reserved_sections():
        if name in data:
            problems.append(
                f"{path}: {name}: the {name} section is not supported by this version of "
                "distilld yet; remove it"
            )
    # An empty optional section (`teacher:` with nothing below) would silently
    # mean "no teacher": the operator more likely forgot to fill it in.
    for name in _optional_sections():
        if name in data and data[name] is None:
            problems.append(
                f"{path}: {name}: the {name} section is empty; fill it in (see `distilld "
                f"policy schema`) or remove the {name} key (received None)"
            )
    data = {
        key: value
        for key, value in data.items()
        if key not in _reserved_sections() and not (key in _optional_sections() and value is None)
    }
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        problems += [_problem(path, error) for error in exc.errors(include_url=False)]
    if problems:
        raise PolicyError(f"invalid policy file {path}", problems)
    return policy


# ------------------------------------------------------------------- public API


def load_policy(path: Path) -> Policy:
    """Read and validate one policy file.

    Raises :class:`PolicyError` whose ``problems`` name ``path`` and the field.
    """
    return _validate(path, _parse_mapping(path, _read_text(path)))


def _policy_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        reason = "is not a directory" if directory.exists() else "does not exist"
        raise PolicyError(
            f"policy directory {directory} {reason}", [f"{directory}: directory {reason}"]
        )
    files = sorted(p for p in directory.iterdir() if p.suffix in POLICY_SUFFIXES and p.is_file())
    if not files:
        raise PolicyError(
            f"no policy files in {directory}",
            [f"{directory}: no policy files (*.yaml, *.yml); distilld needs at least one task"],
        )
    return files


def _duplicate_tasks(loaded: list[tuple[Path, Policy]]) -> list[str]:
    problems = []
    first_file: dict[str, Path] = {}
    for path, policy in loaded:
        if policy.task in first_file:
            problems.append(
                f"{path}: task: the task name {policy.task!r} is already declared in "
                f"{first_file[policy.task]}; each task name must be unique"
            )
        else:
            first_file[policy.task] = path
    return problems


def _split_consumer_groups(loaded: list[tuple[Path, Policy]]) -> list[str]:
    # One consumer group reads each message of a topic once, and the daemon
    # routes it to its task. Two groups on one topic would each read every
    # request, so requests would be answered twice (or dropped as foreign).
    problems = []
    first: dict[str, tuple[Path, Policy]] = {}
    for path, policy in loaded:
        topic = policy.traffic.requests_topic
        if topic not in first:
            first[topic] = (path, policy)
            continue
        other_path, other = first[topic]
        if other.traffic.consumer_group != policy.traffic.consumer_group:
            problems.append(
                f"{path}: traffic.consumer_group: {policy.traffic.consumer_group!r} differs from "
                f"{other.traffic.consumer_group!r} in {other_path}, which reads the same "
                f"requests_topic {topic!r}; one consumer group reads a topic once and routes "
                "each request to its task, so policies sharing a requests topic must share "
                "the consumer group"
            )
    return problems


def load_policies(directory: Path) -> dict[str, Policy]:
    """Load every ``*.yaml`` / ``*.yml`` policy of ``directory``, keyed by task name.

    Files are read in name order. The problems of all files, and those
    between files (a task declared twice, a requests topic read by two
    consumer groups), are reported together in one :class:`PolicyError`.
    """
    problems: list[str] = []
    loaded: list[tuple[Path, Policy]] = []
    for path in _policy_files(directory):
        try:
            loaded.append((path, load_policy(path)))
        except PolicyError as exc:
            problems += exc.problems
    problems += _duplicate_tasks(loaded)
    problems += _split_consumer_groups(loaded)
    if problems:
        raise PolicyError(f"{len(problems)} problem(s) in the policies of {directory}", problems)
    return {policy.task: policy for _, policy in loaded}


def policy_json_schema() -> dict[str, Any]:
    """JSON Schema of a policy file, for completion and checks in editors."""
    schema = Policy.model_json_schema()
    return {"$schema": JSON_SCHEMA_DIALECT, **schema, "title": "distilld policy"}
