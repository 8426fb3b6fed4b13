"""Config sections (YAML mappings) into dataclasses, refusing keys the dataclass does not have."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def from_section(cls: type[T], d: dict[str, Any] | None, section: str) -> T:
    """`cls(**d)`, after a ValueError naming any unknown key of `section` and the known ones
    (a typo in a config must not fall back silently to a default)."""
    d = dict(d or {})
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {section} option(s) {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)
