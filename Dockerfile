# cpt: continued masked-LM pretraining of Chinese BERTs as one batch job (README.md).
#   make image                      docker build --build-arg VERSION=... -t cpt:VERSION .
#   make docker-run CORPUS=... BASE=... OUT=...
#
# Base image: torch==2.13.0 from PyPI is built for CUDA 13.0; its wheel depends on cuda-toolkit==13.0.3
# and the nvidia-*-cu13 wheels, which carry every CUDA user-space library it loads (cuDNN, NCCL,
# cuBLAS ...). So the image needs no CUDA toolkit of its own, only the host driver (>= 580 for CUDA
# 13; Turing or newer GPUs) that the NVIDIA container runtime mounts in. The `base` flavour of
# nvidia/cuda at the same CUDA version is the smallest image that still tells the runtime what it
# needs (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES, NVIDIA_REQUIRE_CUDA: a clear error on a
# too-old driver) and ships cuda-compat; `runtime`/`cudnn` flavours would duplicate gigabytes the
# wheels already bring. Ubuntu 24.04's python3 (3.12) runs cpt.
# Pinned by tag. To pin by digest as well, look it up with
#   docker buildx imagetools inspect nvidia/cuda:13.0.3-base-ubuntu24.04
# and build with --build-arg BASE_IMAGE=nvidia/cuda:13.0.3-base-ubuntu24.04@sha256:<digest>.
# Any Debian or Ubuntu image with python3 >= 3.10 works as BASE_IMAGE (CI builds from a Debian base
# made with debootstrap, with TORCH_SOURCE=wheels; .ci/image).
ARG BASE_IMAGE=nvidia/cuda:13.0.3-base-ubuntu24.04

# ---- build: a venv with the pinned dependencies, then cpt itself ---------------------------------
FROM ${BASE_IMAGE} AS build
ARG DEBIAN_FRONTEND=noninteractive
# Extra CA certificates (docker/ca-certificates/*.crt; none by default) for a build behind a
# TLS-intercepting proxy. pip trusts the system bundle they join (PIP_CERT), not its own copy.
COPY docker/ca-certificates/ /usr/local/share/ca-certificates/
# Versions come with the pinned base image's release; every Python package is pinned in
# requirements.txt.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && update-ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
WORKDIR /src
# Where torch comes from. pypi (default): requirements.txt's pin from PyPI, the CUDA 13 build.
# wheels: the torch wheel put in docker/wheels/ first (CI: the host's CPU wheel, built for the base
# image's Python), which the pin then accepts (2.13.0+cpu is a 2.13.0).
ARG TORCH_SOURCE=pypi
COPY docker/wheels/ /tmp/wheels/
# Dependency layer: rebuilt only when requirements.txt changes (the one place with the pins).
COPY requirements.txt ./
# hadolint ignore=DL3013
RUN case "$TORCH_SOURCE" in \
        pypi) ;; \
        wheels) pip install --no-cache-dir /tmp/wheels/torch-*.whl ;; \
        *) echo "TORCH_SOURCE=$TORCH_SOURCE: use pypi or wheels" >&2; exit 1 ;; \
    esac \
    && pip install --no-cache-dir -r requirements.txt \
    && rm -rf /tmp/wheels
# Source layer.
COPY pyproject.toml README.md NOTICE ./
COPY cpt ./cpt
RUN pip install --no-cache-dir --no-deps .

# ---- final: the venv on the same base, without python3-venv, pip's build leftovers or the source ---
FROM ${BASE_IMAGE}
ARG BASE_IMAGE
ARG DEBIAN_FRONTEND=noninteractive
ARG VERSION=dev
ARG REVISION=unknown
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 cpt \
    && useradd --uid 10001 --gid cpt --create-home --shell /usr/sbin/nologin cpt \
    && install -d -o cpt -g cpt /data/corpus /models/base /output
COPY --from=build /opt/venv /opt/venv
# Executable in git; the classic builder (no BuildKit) has no COPY --chmod.
COPY entrypoint.sh /usr/local/bin/entrypoint.sh

# Nothing is downloaded at run time: the base model and corpus are mounted. Caches and temp files go
# to /tmp, the one writable path when Kubernetes mounts the root filesystem read-only (k8s/job.yaml).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    CUDA_CACHE_PATH=/tmp/.cache/nv \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    CPT_CORPUS=/data/corpus \
    CPT_BASE_MODEL=/models/base \
    CPT_OUTPUT=/output

# Smoke test in the final stage: the venv works with this stage's Python and libraries. Whatever it
# cached goes, so /tmp stays writable for any uid.
RUN python -c "import torch, transformers, cpt.cli" \
    && cpt --help >/dev/null \
    && rm -rf /tmp/.cache

LABEL org.opencontainers.image.title="cpt" \
      org.opencontainers.image.description="Continued masked-LM pretraining of Chinese BERT-family models, as one batch job" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# Mount points: /data/corpus (read-only), /models/base (read-only), /output (read-write). No VOLUME
# instruction: it would put an anonymous volume on a forgotten /output mount and lose the results
# with the container; the entrypoint names the missing mount instead.
USER 10001:10001
WORKDIR /home/cpt
ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]
