"""The student backend of each task, built from its policy and the version to serve
(the registry's live version, else the policy's student): a model in this process, a
vLLM server (external, or started and watched by the daemon), the teacher standing in,
or nothing yet. Each comes with the slot the retraining manager switches versions in."""

from __future__ import annotations

import functools
import secrets
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from distilld.adoption import served_model
from distilld.log import get_logger
from distilld.logfiles import LogRotation
from distilld.policy.model import Architecture, Policy, VllmPolicy
from distilld.preflight import check_vllm_student, external_student, vllm_student_api_key
from distilld.registry import ModelRegistry
from distilld.retrain.task import ModelSlot
from distilld.serving.base import StudentBackend
from distilld.serving.local import load_local_student
from distilld.serving.swap import (
    LocalSlot,
    NoStudentYet,
    SwappableStudent,
    TeacherAsStudent,
    VllmSlot,
)
from distilld.serving.vllm import VllmStudent, VllmTarget
from distilld.serving.vllm_deployment import VllmDeployment
from distilld.serving.vllm_server import ManagedVllmServer, VllmServerConfig
from distilld.settings import Settings
from distilld.teacher.base import Teacher
from distilld.vocabulary import TaskKind


@dataclass
class Students:
    """What serves each task: the backends the loops call, and the slots the
    retraining manager switches (one per task)."""

    backends: dict[str, StudentBackend]
    slots: dict[str, ModelSlot]
    vllm: dict[str, VllmDeployment]


def load_students(
    policies: dict[str, Policy],
    settings: Settings,
    stack: ExitStack,
    stop: threading.Event,
    registries: dict[str, ModelRegistry],
    teachers: dict[str, Teacher],
) -> Students:
    """One backend per task, closed by ``stack``. vLLM tasks also get a deployment
    (version switches; managed servers started and watched)."""
    log = get_logger("app")
    students = Students(backends={}, slots={}, vllm={})
    for task, policy in sorted(policies.items()):
        # An external vLLM server serves its own files: nothing to find here.
        served = (
            None
            if external_student(policy)
            else served_model(policy, settings, registries.get(task))
        )
        if policy.student.backend == "vllm":
            deployment = vllm_deployment(policy, settings, stack, stop, served)
            students.vllm[task] = deployment
            students.backends[task] = deployment.student
            students.slots[task] = VllmSlot(deployment)
        else:
            initial: StudentBackend
            if served is not None:
                initial = load_local_student(policy, served[0], model_version=served[1])
            else:
                teacher = teachers.get(task)
                cold = policy.retraining.cold_start if policy.retraining else None
                if cold is not None and cold.serve == "teacher" and teacher is not None:
                    initial = TeacherAsStudent(teacher)
                else:
                    initial = NoStudentYet(task)
                log.info(
                    "student.cold_start",
                    task=task,
                    serving=initial.model_version,
                    note="no student yet: the first one is trained from retraining.base_model",
                )
            swappable = SwappableStudent(initial)
            stack.callback(swappable.close)
            students.backends[task] = swappable
            students.slots[task] = LocalSlot(swappable, functools.partial(load_version, policy))
        log.info(
            "student.loaded",
            task=task,
            backend=policy.student.backend,
            architecture=policy.student.architecture.value,
            model_version=students.backends[task].model_version,
        )
    return students


def load_version(policy: Policy, model_dir: Path, version: str) -> StudentBackend:
    return load_local_student(policy, model_dir, model_version=version)


def vllm_deployment(
    policy: Policy,
    settings: Settings,
    stack: ExitStack,
    stop: threading.Event,
    served: tuple[Path, str] | None,
) -> VllmDeployment:
    """The vLLM student of a task: an external server, or one the daemon starts and watches
    on ``served`` (the model directory and its version)."""
    options = policy.student.vllm or VllmPolicy()
    server: ManagedVllmServer | None = None
    check_vllm_student(policy, settings.vllm_python, cold_start=served is None)
    # A managed server without a configured key gets one of its own: no other
    # process on the machine may load adapters into it or query it.
    api_key = vllm_student_api_key(policy, settings.secrets_dir)
    if options.base_url:
        base_url = options.base_url.rstrip("/")
        name = options.served_model_name or policy.student.model
        assert name is not None  # check_vllm_student refuses an external server without one
        version = name
    else:
        assert settings.vllm_python is not None and served is not None  # checked above
        model_dir, version = served
        name = options.served_model_name or model_dir.name
        log_dir = settings.state_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        server = ManagedVllmServer(
            VllmServerConfig(
                python=settings.vllm_python,
                model_dir=model_dir,
                served_model_name=name,
                log_path=log_dir / f"vllm-{policy.task}.log",
                max_model_len=options.max_model_len,
                enforce_eager=options.enforce_eager,
                dtype=options.dtype,
                ready_timeout_s=options.start_timeout_s,
                log_rotation=log_rotation(settings),
                api_key=api_key or secrets.token_urlsafe(32),
            )
        )
        api_key = server.config.api_key
        stack.enter_context(server)
        base_url = server.base_url
    if policy.student.architecture is Architecture.sequence_classification:
        kind = "classify"
    else:
        kind = "choice" if policy.kind is TaskKind.classification else "json"
    target = VllmTarget(
        base_url=base_url,
        model=name,
        kind=kind,
        labels=tuple(policy.labels or ()),
        schema=policy.output_schema,
        prompt=policy.prompt,
        max_new_tokens=policy.student.max_new_tokens,
        max_input_tokens=policy.student.max_input_tokens,
        truncation_side=policy.student.truncation_side,
        top_logprobs=options.top_logprobs,
        concurrency=options.concurrency,
        timeout_s=options.timeout_s,
    )
    deployment = VllmDeployment(
        policy.task, VllmStudent(target, model_version=version, api_key=api_key), server
    )
    stack.callback(deployment.close)
    if server is not None:
        watchdog = threading.Thread(
            target=deployment.watch,
            args=(stop,),
            name=f"vllm-watchdog-{policy.task}",
            daemon=True,
        )
        watchdog.start()
    return deployment


def log_rotation(settings: Settings) -> LogRotation:
    """How the logs of the child processes (vLLM, Tansu) are capped."""
    return LogRotation(max_bytes=settings.log_max_bytes, backups=settings.log_backups)
