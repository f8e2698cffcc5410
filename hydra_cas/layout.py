"""Where things live inside a store directory.

Only validated hex digests and fixed names ever become path components here;
:func:`oid_to_path` refuses anything else, so a tampered manifest cannot point
a load or a gc outside the store.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hydra_cas.errors import ManifestError

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["Layout", "check_oid", "is_oid", "iter_fanout"]

_HEX64 = re.compile(r"[0-9a-f]{64}")


def is_oid(value: object) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def check_oid(value: object, what: str = "oid") -> str:
    if not is_oid(value):
        raise ManifestError(
            f"{what} {str(value)[:80]!r} is not 64 lowercase hex characters; "
            "the manifest or journal has been tampered with or is corrupt"
        )
    return value  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Layout:
    """The fixed paths of one store rooted at ``root``."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def journal(self) -> Path:
        return self.root / "journal.jsonl"

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def objects(self) -> Path:
        return self.root / "objects" / "sha256"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def intents(self) -> Path:
        return self.root / "intents"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def archive(self) -> Path:
        return self.root / "archive"

    def oid_to_path(self, oid: str) -> Path:
        check_oid(oid)
        return self.objects / oid[:2] / oid[2:]

    def path_to_oid(self, path: str | os.PathLike[str]) -> str | None:
        """The oid an object path stands for, or None if it is not an object path."""
        p = Path(path)
        oid = p.parent.name + p.name
        return oid if is_oid(oid) and len(p.parent.name) == 2 else None

    def iter_objects(self) -> Iterator[tuple[str, Path]]:
        """Yield (oid, path) for every object file, in no particular order."""
        return iter_fanout(self.objects)


def iter_fanout(top: Path) -> Iterator[tuple[str, Path]]:
    """(digest, path) of every file under ``top/<2 hex>/<62 hex>``: objects, blobs, recipes."""
    try:
        fans = list(os.scandir(top))
    except FileNotFoundError:
        return
    for fan in fans:
        if len(fan.name) != 2 or not fan.is_dir(follow_symlinks=False):
            continue
        with os.scandir(fan.path) as entries:
            for entry in entries:
                ident = fan.name + entry.name
                if is_oid(ident) and entry.is_file(follow_symlinks=False):
                    yield ident, Path(entry.path)
