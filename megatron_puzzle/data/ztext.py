"""Reader for SWORD zText Bible modules (the World English Bible in `sword-text-web`).

A zText module holds one testament per file triple:

- `ot.bzs` / `nt.bzs`: block index, 12-byte little-endian entries
  (offset into `.bzz`, compressed size, uncompressed size);
- `ot.bzz` / `nt.bzz`: the blocks, each zlib-compressed on its own;
- `ot.bzv` / `nt.bzv`: verse index, 10-byte little-endian entries
  (block number, offset inside the uncompressed block, size), one per key of the
  module's versification, in canonical order (module/testament/book/chapter
  headings included).

Entry sizes are 16-bit: a longer entry (the module stores all of Greek Daniel in one
heading entry) has its size wrapped modulo 65536. The reader restores the true size
when the next entry of the block starts exactly a multiple of 65536 bytes later.

The raw entries are OSIS XML fragments; `megatron_puzzle.data.osis` turns them
into plain text. This reader does not need the SWORD library.
"""

from __future__ import annotations

import bisect
import struct
import zlib
from pathlib import Path
from typing import Iterator

TESTAMENTS = ("ot", "nt")
_BLOCK_ENTRY = struct.Struct("<III")
_VERSE_ENTRY = struct.Struct("<IIH")
_SIZE_WRAP = 1 << 16


class ZTextError(ValueError):
    """A zText module that is missing files or is malformed."""


def is_ztext_module(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / f"{t}.bzs").exists() for t in TESTAMENTS)


def _read_index(path: Path, entry: struct.Struct) -> list[tuple[int, ...]]:
    raw = path.read_bytes()
    if len(raw) % entry.size:
        raise ZTextError(f"{path}: size {len(raw)} is not a multiple of the {entry.size}-byte entry size; file is corrupt")
    return [entry.unpack_from(raw, i) for i in range(0, len(raw), entry.size)]


def _entry_bounds(blocks: list[tuple[int, ...]], verses: list[tuple[int, ...]]) -> dict[int, list[int]]:
    """Per block, the sorted distinct places where an entry starts, plus the block's end."""
    starts: dict[int, set[int]] = {}
    for block, offset, size in verses:
        if size:
            starts.setdefault(block, set()).add(offset)
    return {b: sorted(offs | {blocks[b][2]}) for b, offs in starts.items() if b < len(blocks)}


def _true_size(bounds: list[int], offset: int, size: int) -> int:
    nxt = bounds[bisect.bisect_right(bounds, offset)] if bounds[-1] > offset else None
    if nxt is not None:
        gap = nxt - (offset + size)
        if gap > 0 and gap % _SIZE_WRAP == 0:
            return size + gap
    return size


def iter_testament(module_dir: str | Path, testament: str) -> Iterator[str]:
    """Yield the raw (markup) text of every non-empty entry of one testament, in index order.

    Entries that point at the same bytes as the previous one (linked verses) are
    yielded once.
    """
    module_dir = Path(module_dir)
    files = {ext: module_dir / f"{testament}.{ext}" for ext in ("bzs", "bzv", "bzz")}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise ZTextError(f"zText module {module_dir} lacks {', '.join(missing)}")
    blocks = _read_index(files["bzs"], _BLOCK_ENTRY)
    verses = _read_index(files["bzv"], _VERSE_ENTRY)
    ends = _entry_bounds(blocks, verses)
    with open(files["bzz"], "rb") as bzz:
        cached_block, cached_text = -1, b""  # entries are mostly sequential: keep the last block
        previous = None
        for block, offset, size in verses:
            if size == 0 or (block, offset, size) == previous:
                continue
            previous = (block, offset, size)
            if block >= len(blocks):
                raise ZTextError(f"{files['bzv']}: entry points at block {block}, index has {len(blocks)}")
            size = _true_size(ends[block], offset, size)
            if block != cached_block:
                start, csize, usize = blocks[block]
                bzz.seek(start)
                try:
                    cached_text = zlib.decompress(bzz.read(csize))
                except zlib.error as e:
                    raise ZTextError(
                        f"{files['bzz']}: block {block} is not zlib data ({e}); only CompressType=ZIP modules are supported"
                    ) from e
                if len(cached_text) != usize:
                    raise ZTextError(f"{files['bzz']}: block {block} inflates to {len(cached_text)} bytes, index says {usize}")
                cached_block = block
            if offset + size > len(cached_text):
                raise ZTextError(f"{files['bzv']}: entry ({block}, {offset}, {size}) runs past its block")
            yield cached_text[offset : offset + size].decode("utf-8", errors="replace")


def iter_entries(module_dir: str | Path) -> Iterator[str]:
    """All entries of a module: Old Testament (with deuterocanon, if present) then New Testament."""
    module_dir = Path(module_dir)
    if not is_ztext_module(module_dir):
        raise ZTextError(f"{module_dir} is not a zText module (no ot.bzs or nt.bzs)")
    for testament in TESTAMENTS:
        if (module_dir / f"{testament}.bzs").exists():
            yield from iter_testament(module_dir, testament)
