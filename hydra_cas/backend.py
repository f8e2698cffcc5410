"""The two small interfaces a :class:`~hydra_cas.store.Store` does its I/O through.

A store is the same code over two backends: a local folder
(:class:`~hydra_cas.objects.ObjectStore` and :class:`~hydra_cas.manifest.ManifestStore`)
and S3-compatible object storage (:class:`~hydra_cas.s3.S3ObjectStore` and
:class:`~hydra_cas.s3.S3ManifestStore`).  These protocols name what ``Store``
relies on; each backend documents how it keeps the promises below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    import numpy as np

    from hydra_cas.objects import Written

__all__ = ["ObjectBackend", "RefBackend"]


@runtime_checkable
class ObjectBackend(Protocol):
    """Content-addressed payloads, each written once under its SHA-256 (the oid)."""

    durable: bool

    def size_of(self, oid: str) -> int | None:
        """The stored object's size, or None if absent.  Called inside a commit
        plan, a ``not None`` answer must stay true until the plan's commit lands."""

    def write_temp(self, chunks: Iterable[memoryview | bytes | bytearray]) -> Written:
        """Stage a payload privately, hashing it (SHA-256 and BLAKE3) on the way."""

    def publish(self, written: Written) -> bool:
        """Make a staged payload visible as its object, atomically; False if it already was."""

    def touch(self, oid: str) -> None:
        """Tell gc an existing object is about to be referenced again (may do nothing)."""

    def read_into_buffer(self, oid: str, expected_size: int, verify: str) -> tuple[np.ndarray, str | None]:
        """The whole object in a fresh array, and its digest for ``verify``.

        FileNotFoundError when absent; IntegrityError when not ``expected_size`` bytes."""

    def map(self, oid: str, expected_size: int, verify: str) -> tuple[Any, str | None]:
        """A read-only buffer of the object (a memory map), and its digest for ``verify``."""


@runtime_checkable
class RefBackend(Protocol):
    """The manifest and its journal: every ref, changed only by journaled commits."""

    def read(self) -> dict[str, Any]:
        """The current manifest, validated (never mutated by the caller)."""

    def commit(self, plan: Callable[[dict[str, Any]], list[dict[str, Any]]]) -> dict[str, Any]:
        """Apply the records ``plan(freshest manifest)`` returns, atomically and durably.

        ``plan`` may run more than once (optimistic backends re-plan after
        losing a race) and may raise to abort; no record it returned is
        applied unless all are.  Returns the manifest after the commit."""
