"""OSIS markup (as stored in SWORD modules) to plain text, one document per chapter."""

from __future__ import annotations

import html
import re
from typing import Iterable, Iterator

# Footnotes and their cross references are apparatus, not running text: drop them whole.
# The module often omits the space after a note ("God<note>..</note>created"), so a note
# between a word and the next word becomes a space.
_NOTE = re.compile(r"<note\b[^>]*?(?:/>|>.*?</note\s*>)", re.DOTALL)
_GAP = "\x00"
_GAP_TO_SPACE = re.compile(rf"(?<=\S){_GAP}(?=[\w“‘\[(])")
# Tags that separate pieces of text (paragraphs, poetry lines, headings) become a space;
# inline tags (words with Strong's numbers, quotes, names) vanish so punctuation stays attached.
_BREAK_TAGS = "div|p|l|lg|lb|chapter|title|milestone|item|list|speaker|verse|table|row|cell|head"
_BREAK = re.compile(rf"<\s*/?\s*(?:{_BREAK_TAGS})\b[^>]*>")
_TAG = re.compile(r"<[^>]*(?:>|$)")  # an unterminated tag at the end is dropped too
_SPACE = re.compile(r"\s+")
# Document boundaries: the start of a book and the start of a chapter.
_BOOK_START = r"<div\b(?=[^>]*\btype=\"book\")[^>]*\bsID=[^>]*>"
_CHAPTER_START = r"<chapter\b[^>]*\bsID=[^>]*>"
_BOUNDARY = re.compile(rf"(?P<book>{_BOOK_START})|(?P<chapter>{_CHAPTER_START})")


def osis_to_text(fragment: str) -> str:
    """Strip markup from one OSIS fragment; normalise whitespace to single spaces."""
    text = _NOTE.sub(_GAP, fragment.replace(_GAP, ""))
    text = _BREAK.sub(" ", text)
    text = _TAG.sub("", text)
    text = _GAP_TO_SPACE.sub(" ", text).replace(_GAP, "")
    text = html.unescape(text)
    return _SPACE.sub(" ", text).strip()


def chapters(entries: Iterable[str]) -> Iterator[str]:
    """Group raw entries (in canonical order) into plain-text documents, one per chapter.

    A book's title and introduction open the document of its first chapter; text
    before the first book (the module preface) is a document of its own. Empty
    documents are skipped.
    """
    parts: list[str] = []
    has_chapter = False  # whether the open document already holds a chapter

    def flush() -> Iterator[str]:
        doc = " ".join(p for p in parts if p)
        parts.clear()
        if doc:
            yield doc

    for fragment in entries:
        pos = 0
        for m in _BOUNDARY.finditer(fragment):
            parts.append(osis_to_text(fragment[pos : m.start()]))
            pos = m.start()
            if m.group("book") or has_chapter:
                yield from flush()
                has_chapter = False
            if m.group("chapter"):
                has_chapter = True
        parts.append(osis_to_text(fragment[pos:]))
    yield from flush()
