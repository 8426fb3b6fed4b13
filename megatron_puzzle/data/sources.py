"""Text sources: each yields plain-text documents, in a fixed order.

`load_corpus(source)` accepts
- "web": the World English Bible from the `sword-text-web` Debian package, one
  document per chapter (falls back to the shipped sample, with a warning, when the
  package is missing);
- "sample": the World English Bible excerpt shipped in this package;
- "fortunes": the `fortunes` Debian package, one document per quotation;
- a path: a SWORD zText module directory, a .jsonl file (one JSON object per line
  with a "text" field), a plain-text file (documents separated by blank lines), or a
  directory of such .txt/.jsonl files (read in sorted order, recursively).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Iterator

from megatron_puzzle.data import osis, ztext

log = logging.getLogger(__name__)

WEB_MODULE_DIR = Path("/usr/share/sword/modules/texts/ztext/engWEB2015eb")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
WEB_INSTALL_HINT = "apt-get install -y sword-text-web"
NAMED_SOURCES = ("web", "sample", "fortunes")
TEXT_SUFFIXES = (".txt", ".jsonl")

_BLANK_LINES = re.compile(r"\n\s*\n")
_SPACE = re.compile(r"[ \t\r\f\v]+")
_FORTUNE_SEP = re.compile(r"^%\s*$", re.MULTILINE)
_OVERSTRIKE = re.compile(r"[^\x08]\x08")  # old terminals bold/underline: "c\bc", "__\b\bab"


def default_sample_path() -> Path:
    """The World English Bible excerpt shipped with the package (plain text, public domain)."""
    return Path(__file__).resolve().parent / "sample" / "web_sample.txt"


def web_module_dir() -> Path | None:
    """The installed WEB zText module, or None. `SWORD_PATH` (a SWORD library root) is searched first."""
    candidates = []
    if os.environ.get("SWORD_PATH"):
        candidates.append(Path(os.environ["SWORD_PATH"]) / "modules/texts/ztext/engWEB2015eb")
    candidates.append(WEB_MODULE_DIR)
    for path in candidates:
        if ztext.is_ztext_module(path):
            return path
    return None


def _normalise(text: str) -> str:
    lines = (_SPACE.sub(" ", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def read_web(module_dir: str | Path) -> Iterator[str]:
    """One plain-text document per chapter of a zText Bible module, in canonical order."""
    yield from osis.chapters(ztext.iter_entries(module_dir))


def read_plain_text(path: str | Path) -> Iterator[str]:
    """Documents of a plain-text file: blocks separated by blank lines."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    for block in _BLANK_LINES.split(text):
        doc = _normalise(block)
        if doc:
            yield doc


def read_jsonl(path: str | Path) -> Iterator[str]:
    """Documents of a JSONL file: the "text" field of each line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from e
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{path}:{lineno}: expected an object with a string "text" field')
            doc = record["text"].strip()
            if doc:
                yield doc


def read_fortunes(directory: str | Path = FORTUNES_DIR) -> Iterator[str]:
    """One document per quotation of every fortune file (files without an extension), sorted by name."""
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.is_symlink() and not p.suffix)
    if not files:
        raise FileNotFoundError(f"no fortune files in {directory}; install them with: apt-get install -y fortunes")
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        while "\x08" in text:  # peel one overstrike layer per pass
            text, n = _OVERSTRIKE.subn("", text)
            if n == 0:
                text = text.replace("\x08", "")
        for quote in _FORTUNE_SEP.split(text):
            doc = _normalise(quote)
            if doc:
                yield doc


def _read_path(path: Path) -> Iterator[str]:
    if ztext.is_ztext_module(path):
        yield from read_web(path)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"corpus directory {path} holds no .txt or .jsonl files")
        for file in files:
            yield from _read_path(file)
    elif path.suffix == ".jsonl":
        yield from read_jsonl(path)
    else:
        yield from read_plain_text(path)


def describe_source(source: str | Path) -> str:
    """What `load_corpus(source)` will actually read, for logs and meta.json."""
    if source == "web":
        module = web_module_dir()
        return f"web:{module}" if module else f"sample:{default_sample_path()}"
    if source == "sample":
        return f"sample:{default_sample_path()}"
    if source == "fortunes":
        return f"fortunes:{FORTUNES_DIR}"
    return str(Path(source).resolve())


def load_corpus(source: str | Path = "web") -> Iterator[str]:
    """Yield the documents of a corpus (see the module docstring for accepted sources).

    Raises FileNotFoundError (naming the fix) for a path that does not exist.
    """
    if source == "web":
        module = web_module_dir()
        if module is None:
            log.warning(
                "World English Bible module not found at %s; using the shipped sample %s (~150 KB). "
                "For the full text (~5 MB) run: %s",
                WEB_MODULE_DIR,
                default_sample_path(),
                WEB_INSTALL_HINT,
            )
            return read_plain_text(default_sample_path())
        return read_web(module)
    if source == "sample":
        return read_plain_text(default_sample_path())
    if source == "fortunes":
        if not FORTUNES_DIR.is_dir():
            raise FileNotFoundError(f"{FORTUNES_DIR} not found; install it with: apt-get install -y fortunes")
        return read_fortunes(FORTUNES_DIR)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"corpus {path} does not exist; pass --source web, sample, fortunes, or a path to a "
            ".txt/.jsonl file, a directory of them, or a SWORD zText module"
        )
    return _read_path(path)
