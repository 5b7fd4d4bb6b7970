"""One place that turns a policy's ``teacher`` section into a :class:`Teacher`.

The daemon calls :func:`make_teacher` once per task when it starts. A policy
without a teacher gets ``None``: no request is sampled for comparison, the
accuracy monitor has no data (insufficient data, never a verdict), and drift
monitoring runs as usual.

Building a teacher checks what can be checked without calling it: the model
directory of an in-process teacher (resolved under the models directory and
loaded), the API key variable of an HTTP teacher. It never contacts an HTTP
teacher: an endpoint that is down at start is the same transient outage as
one that goes down later, handled by the teacher's circuit breaker.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from distilld.modelpaths import resolve_model_dir
from distilld.policy.model import Policy
from distilld.teacher.base import Teacher
from distilld.teacher.config import OpenAITeacherConfig
from distilld.teacher.local import LocalTeacher
from distilld.teacher.openai import OpenAITeacher


def make_teacher(
    policy: Policy,
    models_dir: Path,
    *,
    environ: Mapping[str, str] | None = None,
    secrets_dir: Path | None = None,
) -> Teacher | None:
    """The teacher of ``policy``, or None when the policy has no ``teacher`` section.

    ``models_dir`` is ``DISTILLD_MODELS_DIR``: a transformers teacher's relative
    ``teacher.model`` is resolved under it and refused (ConfigError) if it
    escapes it or does not exist; loading failures are ModelLoadError. An
    openai teacher reads its API key from ``environ`` (default: the process
    environment); a variable that is named but unset is a ConfigError, and so is an
    ``api_key_file`` outside ``secrets_dir`` (``DISTILLD_SECRETS_DIR``; None: no key
    file allowed). The caller owns the teacher and must ``close()`` it.
    """
    config = policy.teacher
    if config is None:
        return None
    if isinstance(config, OpenAITeacherConfig):
        return OpenAITeacher(config, policy, environ=environ, secrets_dir=secrets_dir)
    # The other member of the union: TransformersTeacherConfig.
    model_dir = resolve_model_dir(models_dir, config.model, field="teacher.model")
    return LocalTeacher(config, policy, model_dir)
