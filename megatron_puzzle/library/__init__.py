"""The block library on disk: every (layer, variant)'s weights and stats."""

from .store import Library, LibraryError, entry_dir, entry_name, expected_shapes, write_entry, write_non_block, write_space

__all__ = ["Library", "LibraryError", "entry_dir", "entry_name", "expected_shapes", "write_entry", "write_non_block",
           "write_space"]
