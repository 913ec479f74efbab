# odise-label-studio: the Label Studio ML backend serving ODISE.
#   GPU (default):  docker build -t odise-ls .
#   CPU only:       docker build --build-arg VARIANT=cpu -t odise-ls:cpu .
# Weights live in the /data/weights volume, fine-tuned model versions in /data/models.
ARG VARIANT=cuda

FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 AS base-cuda
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124

FROM ubuntu:22.04 AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# A stage name chosen by the build arg, not an image: nothing to tag.
# hadolint ignore=DL3006
FROM base-${VARIANT}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Versions float with the Ubuntu release so rebuilds pick up security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv \
    && pip install --index-url "$TORCH_INDEX_URL" "torch==2.14.1" "torchvision==0.29.1"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY odise_core ./odise_core
COPY backend ./backend
COPY label_config ./label_config
COPY docker/entrypoint.sh /usr/local/bin/odise-entrypoint
RUN pip install . && chmod 0755 /usr/local/bin/odise-entrypoint

RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin odise \
    && mkdir -p /data/weights /data/models \
    && chown -R odise:odise /data

ENV HOST=0.0.0.0 \
    PORT=9090 \
    PRESET=odise-label-coco \
    DEVICE=auto \
    ODISE_WEIGHTS_DIR=/data/weights \
    MODEL_DIR=/data/models \
    HF_HOME=/data/weights/huggingface \
    TORCH_HOME=/data/weights/torch

VOLUME ["/data/weights", "/data/models"]
USER 1000:1000
EXPOSE 9090

# /health answers while the model loads (minutes on first start); unhealthy when loading failed.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["/bin/sh", "-c", "curl -fsS http://127.0.0.1:${PORT}/health | python3 -c 'import json,sys; sys.exit(json.load(sys.stdin).get(\"model_state\") == \"failed\")'"]

ENTRYPOINT ["odise-entrypoint"]
CMD ["serve"]
