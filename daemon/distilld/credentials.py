"""Secrets the daemon holds: reading API keys, keeping them out of text, out of children.

* :func:`read_api_key`: an HTTP client's API key, from the environment variable
  or the file a policy names (the file already confined by
  :func:`distilld.modelpaths.resolve_secret_file`). Errors name the variable or
  the file, never the content.
* :class:`Redactor`: masks a key in text that may leave the process (error
  messages, log lines). :meth:`Redactor.excerpt` masks first and cuts after, so
  a key that straddles the cut never leaves its prefix behind.
* :func:`child_environment`: the environment a child process (the managed
  vLLM server, the embedded broker) receives: an allow-list of the variables
  such a process needs, never the daemon's secrets (admin token, SASL
  password, API keys).

Imports nothing of the daemon but its errors and the bounding helper.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from distilld.echo import clip
from distilld.errors import ConfigError
from distilld.modelpaths import resolve_secret_file

#: Where error bodies and echoed answers are cut (characters, after masking).
EXCERPT_CHARS = 200

#: Variables a child process receives by exact name.
CHILD_ENV_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "TEMP",
        "TMP",
        "LD_LIBRARY_PATH",
        "LD_PRELOAD",  # vLLM-cpu's recommended tcmalloc / Intel OpenMP preload
        "DO_NOT_TRACK",
    }
)
#: Variables a child process receives by prefix: locale, vLLM, Hugging Face,
#: threading and math libraries, accelerators, the Python runtime, Rust (Tansu).
CHILD_ENV_PREFIXES = (
    "LC_",
    "XDG_",
    "VLLM_",
    "HF_",
    "TRANSFORMERS_",
    "TOKENIZERS_",
    "OMP_",
    "KMP_",
    "MKL_",
    "OPENBLAS_",
    "ONEDNN_",
    "DNNL_",
    "CUDA_",
    "NVIDIA_",
    "NCCL_",
    "TORCH",
    "PYTORCH_",
    "TRITON_",
    "PYTHON",
    "RUST_",
)
#: Words (between underscores) that mark a variable as a secret: never passed
#: on, whatever its prefix (HF_TOKEN, the daemon's own VLLM_API_KEY, ...). A
#: child that needs a secret gets it explicitly (``extra``).
SECRET_WORDS = frozenset(
    {"TOKEN", "KEY", "APIKEY", "PASSWORD", "PASSWD", "PASS", "SECRET", "CREDENTIALS", "AUTH"}
)


def is_secret_name(name: str) -> bool:
    """True when one of the words of a variable's name says it holds a secret
    (``HF_TOKEN`` does, ``TOKENIZERS_PARALLELISM`` does not)."""
    return any(word in SECRET_WORDS for word in name.upper().split("_"))


def child_environment(
    environ: Mapping[str, str], extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a child process: the allowed variables of ``environ``
    (by name or prefix, minus any whose name says it is a secret), then ``extra``
    (what the daemon sets for that child on purpose, secrets included)."""
    env = {
        name: value
        for name, value in environ.items()
        if (name in CHILD_ENV_NAMES or name.startswith(CHILD_ENV_PREFIXES))
        and not is_secret_name(name)
    }
    env.update(extra or {})
    return env


class Redactor:
    """Masks one secret in text that may leave the process (errors, logs)."""

    MASK = "[redacted]"

    def __init__(self, secret: str | None) -> None:
        self._secret = secret or None

    def __call__(self, text: str) -> str:
        return text.replace(self._secret, self.MASK) if self._secret else text

    def excerpt(self, text: str, limit: int = EXCERPT_CHARS) -> str:
        """``text`` masked, then cut to ``limit`` characters (``...`` marks a cut).

        In that order: cutting first can leave the start of a key that straddles
        the cut, which no longer matches the whole key and so is not masked."""
        return excerpt(self(text), limit)

    def __repr__(self) -> str:
        return f"Redactor({self.MASK})"


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` cut to ``limit`` characters (``...`` marks a cut; the daemon's one
    bounding helper, :func:`distilld.echo.clip`). Mask secrets first
    (:meth:`Redactor.excerpt`)."""
    return clip(text, limit)


def read_api_key(
    *,
    env: str | None,
    file: Path | None,
    environ: Mapping[str, str],
    field: str,
) -> str | None:
    """The API key in the variable ``env`` or the file ``file`` (trailing newline
    dropped), None when neither is named. ``field`` is the policy section the two
    come from (``teacher``, ``student.vllm``) for the error messages, which never
    show the key."""
    if env is not None:
        key = environ.get(env)
        if not key:
            raise ConfigError(
                f"the API key variable {env} is not set or empty ({field}.api_key_env); "
                f"export {env} in the daemon's environment, or remove {field}.api_key_env "
                "for an endpoint without authentication"
            )
        return key
    if file is None:
        return None
    try:
        key = file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read the API key file {file} ({field}.api_key_file: "
            f"{type(exc).__name__}); it must name a file the daemon's user can read"
        ) from None
    if not key:
        raise ConfigError(f"the API key file {file} ({field}.api_key_file) is empty")
    return key


def policy_api_key(
    *,
    env: str | None,
    file: str | None,
    secrets_dir: Path | None,
    field: str,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """A policy section's API key (``field``: ``teacher``, ``student.vllm``): its
    ``api_key_env`` variable in ``environ`` (default the process environment) or its
    ``api_key_file``, which must lie in ``secrets_dir`` (DISTILLD_SECRETS_DIR;
    relative names resolve under it); None when the section names neither."""
    key_file = (
        None
        if file is None
        else resolve_secret_file(file, secrets_dir, field=f"{field}.api_key_file")
    )
    return read_api_key(
        env=env,
        file=key_file,
        environ=os.environ if environ is None else environ,
        field=field,
    )
