# distilld container image (first version; the container issue hardens it:
# multi-stage build, healthcheck, volumes and an image verified with buildah).
#
# The daemon only: Kafka and (later) vLLM run as their own services.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    DISTILLD_POLICIES_DIR=/etc/distilld/policies \
    DISTILLD_MODELS_DIR=/var/lib/distilld/models \
    DISTILLD_STATE_DIR=/var/lib/distilld/state

WORKDIR /opt/distilld
COPY pyproject.toml README.md ./
COPY daemon ./daemon
# torch first and pinned (TORCH_PIP_ARGS can point pip at a CPU-only wheel
# source) so that the transformers dependency does not pull another build.
ARG TORCH_PIP_ARGS=""
RUN pip install --no-cache-dir torch==2.13.0 $TORCH_PIP_ARGS \
 && pip install --no-cache-dir . \
 && useradd --system --uid 10001 distilld
COPY policies /etc/distilld/policies

USER distilld
ENTRYPOINT ["distilld"]
CMD ["run"]
