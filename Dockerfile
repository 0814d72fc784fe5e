# One image for every bitbench process: the API, the dispatcher and the Ray head and worker
# nodes (docker-compose.yml picks the command). Health checks live in docker-compose.yml.
#
#   docker build -t bitbench .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 -t bitbench .
#
# Layers go from least to most often changed: system packages, torch, the other dependencies
# (read from pyproject.toml), then bitbench's own source.
#
# python:3.11-slim, pinned to its Debian 12 (bookworm) variant: the plain tag follows Debian's
# newest release, and the apt package below is checked against bookworm.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Real Fashion-MNIST from Debian: IDX files in /usr/share/datasets/fashion-mnist, where the
# fashion_mnist loader looks when the data directory lacks them (about 30 MB). g++: torch.compile's
# C++ kernels on CPU workers (estimators/compiled.py: ReSTE's pseudo-gradient; without it, eager).
RUN apt-get update \
 && apt-get install -y --no-install-recommends dataset-fashion-mnist g++ \
 && rm -rf /var/lib/apt/lists/*

# The unprivileged user every process runs as (USER below). /data (data sets) and /tune (Ray
# Tune storage) are volume mount points; owning them here gives fresh named volumes this owner.
RUN useradd --create-home --uid 1000 --user-group bitbench \
 && mkdir -p /data /tune \
 && chown bitbench:bitbench /data /tune

# torch and torchvision must be installed together at the versions pinned in pyproject.toml
# (tests/test_compose.py checks they agree). PyPI's x86_64 wheels of torch 2.14.1 are CUDA
# builds; TORCH_INDEX_URL picks another build (a CUDA version or the CPU-only index).
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# The remaining dependencies, from pyproject.toml alone: editing the source keeps this layer.
WORKDIR /src
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY estimators ./estimators
COPY workers ./workers
COPY service ./service
COPY dashboard ./dashboard
RUN pip install --no-deps . && rm -rf /src/build
# a Ray worker node on a GPU host: CUDA MPS, then `ray start` (docker-compose.yml's ray-worker)
COPY scripts/gpu-node.sh /usr/local/bin/bitbench-gpu-node

USER bitbench
WORKDIR /home/bitbench
ENV BITBENCH_DATA_DIR=/data \
    BITBENCH_TUNE_DIR=/tune \
    RAY_USAGE_STATS_ENABLED=0

EXPOSE 8000
CMD ["uvicorn", "service.app:app", "--host", "0.0.0.0", "--port", "8000"]
