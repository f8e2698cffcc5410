"""Small value types returned by the public API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from hydra_cas.archive import ArchiveStats
    from hydra_cas.errors import HydraError

__all__ = ["SaveResult", "VersionInfo", "LoadResult", "ArchiveResult"]


@dataclass(frozen=True, slots=True)
class SaveResult:
    """What :meth:`Store.save` did."""

    name: str
    version: str
    oid: str
    size: int
    deduplicated: bool
    """True when no new object was written: the payload was already stored."""
    unchanged: bool = False
    """True when this exact ``name:version`` already held these bytes (a no-op)."""

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """One version's manifest record, with its name, version and aliases."""

    name: str
    version: str
    oid: str
    blake3: str
    size: int
    tensors: int
    parameters: int
    dtypes: tuple[str, ...]
    created: str
    metadata: dict[str, Any]
    tier: str
    parent: str | None
    status: str
    aliases: tuple[str, ...] = ()
    is_latest: bool = False

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @classmethod
    def from_entry(
        cls,
        name: str,
        version: str,
        entry: dict[str, Any],
        aliases: tuple[str, ...] = (),
        is_latest: bool = False,
    ) -> VersionInfo:
        return cls(
            name=name,
            version=version,
            oid=entry["oid"],
            blake3=entry["blake3"],
            size=entry["size"],
            tensors=entry["tensors"],
            parameters=entry["parameters"],
            dtypes=tuple(entry["dtypes"]),
            created=entry["created"],
            metadata=entry["metadata"],
            tier=entry["tier"],
            parent=entry["parent"],
            status=entry["status"],
            aliases=aliases,
            is_latest=is_latest,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "oid": self.oid,
            "blake3": self.blake3,
            "size": self.size,
            "tensors": self.tensors,
            "parameters": self.parameters,
            "dtypes": list(self.dtypes),
            "created": self.created,
            "metadata": self.metadata,
            "tier": self.tier,
            "parent": self.parent,
            "status": self.status,
            "aliases": list(self.aliases),
            "latest": self.is_latest,
        }


@dataclass(frozen=True, slots=True)
class LoadResult:
    """The outcome of one request in :meth:`Store.load_many`."""

    request: str
    version: str | None = None
    tensors: dict[str, np.ndarray] | None = None
    error: HydraError | None = field(default=None)

    @property
    def ok(self) -> bool:
        return self.error is None

    def unwrap(self) -> dict[str, np.ndarray]:
        """The tensors, or raise the error this request failed with."""
        if self.error is not None:
            raise self.error
        assert self.tensors is not None
        return self.tensors


@dataclass(frozen=True, slots=True)
class ArchiveResult:
    """What :meth:`Store.archive` or :meth:`Store.restore` did."""

    ref: str
    oid: str
    size: int
    already: bool = False
    """True when the version was already in the requested tier."""
    stats: ArchiveStats | None = None
