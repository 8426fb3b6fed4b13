"""Regenerate the shipped World English Bible sample from the installed Debian module.

    python -m megatron_puzzle.data.make_sample [--module DIR] [--out FILE]

The sample is every `SAMPLE_STRIDE`-th chapter document (preface first), so it spans
the whole text; documents are separated by blank lines, which is how plain-text
corpora are read back.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_puzzle.data.sources import WEB_INSTALL_HINT, default_sample_path, read_web, web_module_dir
from megatron_puzzle.utils.io import atomic_write_text

SAMPLE_STRIDE = 33  # ~43 chapters, ~160 KB


def sample_documents(module_dir: str | Path, stride: int = SAMPLE_STRIDE) -> list[str]:
    return list(read_web(module_dir))[::stride]


def render(documents: list[str]) -> str:
    return "\n\n".join(documents) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", type=Path, default=None, help="zText module directory (default: installed WEB)")
    parser.add_argument("--out", type=Path, default=default_sample_path())
    args = parser.parse_args(argv)
    module = args.module or web_module_dir()
    if module is None:
        parser.error(f"World English Bible module not installed; run: {WEB_INSTALL_HINT}")
    docs = sample_documents(module)
    atomic_write_text(args.out, render(docs))
    print(f"wrote {len(docs)} documents to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
