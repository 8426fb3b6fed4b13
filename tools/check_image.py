#!/usr/bin/env python3
"""Helpers the Dockerfile runs while building the image (standard library only).

    check_image.py constraints CONSTRAINT_FILE REQUIREMENTS_FILE > NEW_CONSTRAINT_FILE
        NGC PyTorch images (25.03 and later) pin every Python package they ship through
        PIP_CONSTRAINT=/etc/pip/constraint.txt; some pins contradict this project's requirements
        (megatron-core 0.16.1 needs packaging>=24.2). Writes the constraint file without the pins of
        the packages REQUIREMENTS_FILE names, keeping every other pin, so that installing the project
        cannot replace the image's torch, Transformer Engine or their dependencies.

    check_image.py versions
        Fails (exit 1, one line per problem) unless Python, megatron-core, Transformer Engine and
        packaging are versions that megatron-core 0.16.1 is tested with.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# Pins never dropped, even if a requirement names them: the image's CUDA stack.
KEEP = re.compile(r"^(torch|torchvision|torchaudio|triton|pytorch-triton|transformer-engine.*|apex|nvidia-.*)$")
# What megatron-core 0.16.1 declares or tests (its dev extra: transformer-engine >= 2.9, < 2.12).
PYTHON_MIN = (3, 10)
TE_RANGE = ((2, 9), (2, 12))
PACKAGING_MIN = (24, 2)
MEGATRON_CORE = "0.16.1"


def canonical(name: str) -> str:
    """PEP 503 name: lowercase, runs of -_. as one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str | None:
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
        return None
    m = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
    return canonical(m.group(0)) if m else None


def constraints(constraint_file: str, requirements_file: str) -> str:
    names = {n for n in map(requirement_name, Path(requirements_file).read_text().splitlines()) if n}
    path = Path(constraint_file)
    if not path.exists():  # images before 25.03 have no constraint file
        return ""
    kept = []
    for line in path.read_text().splitlines():
        name = requirement_name(line)
        if name and name in names and not KEEP.match(name):
            kept.append(f"# dropped for this project's requirements: {line.strip()}")
        else:
            kept.append(line)
    return "\n".join(kept) + "\n"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


def versions() -> list[str]:
    import importlib.metadata as md

    def dist(*names: str) -> str | None:
        for n in names:
            try:
                return md.version(n)
            except md.PackageNotFoundError:
                pass
        return None

    problems = []
    if sys.version_info[:2] < PYTHON_MIN:
        problems.append(f"Python {sys.version.split()[0]} < {'.'.join(map(str, PYTHON_MIN))}")
    te = dist("transformer_engine", "transformer-engine", "transformer_engine_torch")
    if te is None:
        problems.append("Transformer Engine is not installed (the base must be an NGC PyTorch image)")
    elif not TE_RANGE[0] <= _version(te) < TE_RANGE[1]:
        problems.append(f"Transformer Engine {te} is outside the range megatron-core {MEGATRON_CORE} is tested with "
                        f"(>= {'.'.join(map(str, TE_RANGE[0]))}, < {'.'.join(map(str, TE_RANGE[1]))}): pick another base tag")
    mc = dist("megatron-core", "megatron_core")
    if mc != MEGATRON_CORE:
        problems.append(f"megatron-core is {mc}, not {MEGATRON_CORE}")
    pk = dist("packaging")
    if pk is None or _version(pk) < PACKAGING_MIN:
        problems.append(f"packaging {pk} < {'.'.join(map(str, PACKAGING_MIN))} (megatron-core needs it): "
                        "the constraint file still pins it")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "constraints":
        sys.stdout.write(constraints(argv[1], argv[2]))
        return 0
    if argv == ["versions"]:
        problems = versions()
        for p in problems:
            print(f"image check: {p}", file=sys.stderr)
        if not problems:
            print("image check: Python, Transformer Engine, megatron-core and packaging versions fit")
        return 1 if problems else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
