# The WBC segmentation service: a venv with the service's runtime dependencies, the app package and
# the shipped weights on top of BASE_IMAGE; no torch, no training code, no tests.
#
#   GPU (default):  docker build -t wbc-segmenter .
#   CPU:            docker build -t wbc-segmenter:cpu \
#                     --build-arg BASE_IMAGE=python:3.12-slim-bookworm \
#                     --build-arg ONNXRUNTIME="onnxruntime==1.31.*" .
#
# onnxruntime-gpu 1.31 links the CUDA 13 libraries and loads cuDNN 9, which the default base provides.
# Any Debian or Ubuntu base with Python >= 3.11 works: python3 and python3-venv come from apt only where
# the base lacks them.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS base
SHELL ["/bin/sh", "-eu", "-c"]
# Versions are left to the base's distribution release, which BASE_IMAGE fixes: one Dockerfile serves
# Ubuntu 24.04 (CUDA), Debian slim (CPU) and Debian minbase (the local smoke test), whose version
# strings differ, and on Python images the step installs nothing at all.
# hadolint ignore=DL3008
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null || ! command -v useradd >/dev/null; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv passwd; \
        rm -rf /var/lib/apt/lists/*; \
    fi


FROM base AS builder
# The one onnxruntime distribution of the image: the CUDA build by default, plain `onnxruntime` for the
# CPU flavour. Pinned to the release whose CUDA major version matches the base.
ARG ONNXRUNTIME="onnxruntime-gpu==1.31.*"
# Build-time only (this stage is discarded): a CA bundle for pip behind a TLS-inspecting proxy, which the
# build mounts: `-v /etc/ssl/certs:/etc/ssl/certs:ro --build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt`.
ARG PIP_CERT=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_PROGRESS_BAR=off
RUN python3 -m venv /opt/venv
WORKDIR /src

# Dependencies first, from pyproject.toml alone, so that editing the app reuses this (large) layer.
# pyproject lists onnxruntime-gpu and onnxruntime under platform markers; the image takes ONNXRUNTIME.
COPY pyproject.toml ./
RUN /opt/venv/bin/python -c "import tomllib; \
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
print(*(d for d in deps if not d.startswith('onnxruntime')), sep=chr(10))" > requirements.txt; \
    /opt/venv/bin/pip install -r requirements.txt "${ONNXRUNTIME}"

# The app package alone: .dockerignore keeps model_training/ out of the context, so the wheel holds
# `app` only, and the launchers of the training commands that pyproject declares would be dead: removed.
COPY README.md ./
COPY app ./app
RUN /opt/venv/bin/pip install --no-deps . ; \
    find /opt/venv/bin -type f -exec grep -q model_training {} \; -delete; \
    /opt/venv/bin/python -c "import app, importlib.util as u; assert u.find_spec('torch') is None"


FROM base AS runtime
LABEL org.opencontainers.image.title="wbc-segmenter" \
      org.opencontainers.image.description="White blood cell segmentation (nucleus, cytoplasm) REST service" \
      org.opencontainers.image.licenses="GPL-3.0-or-later"
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin wbc
COPY --from=builder /opt/venv /opt/venv
WORKDIR /opt/wbc
COPY weights/ ./weights/

# Configured like a local run: WBC_* (app/config.py) for the service, WBC_HOST and WBC_PORT for the
# server's address; uvicorn also reads UVICORN_WORKERS, FORWARDED_ALLOW_IPS and its other UVICORN_*.
# Nothing is written at run time outside /tmp, so the root filesystem can be mounted read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    WBC_MODEL_PATH=/opt/wbc/weights/model.onnx \
    WBC_HOST=0.0.0.0 \
    WBC_PORT=8000

USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/health/ready' % os.environ['WBC_PORT'], timeout=4)"]
# `python -m app`: uvicorn with the connection limits of the settings (h11 with a header size limit and
# a header deadline, keep-alive timeout, connection limit: README "Configuration"); it drains requests
# in flight on SIGTERM. The app logs every request itself, so uvicorn's access log is off.
CMD ["python", "-m", "app"]
