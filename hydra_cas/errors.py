"""Exceptions raised by hydra_cas.

Every error the library raises on purpose derives from :class:`HydraError`, so a
caller can catch "anything hydra_cas refused" in one clause.  Each leaf also
subclasses the built-in exception that fits it best (``KeyError`` for a missing
model, ``ValueError`` for malformed input, ``OSError`` for storage failures), so
code written against the built-ins keeps working.
"""

from __future__ import annotations

__all__ = [
    "HydraError",
    "NotFoundError",
    "VersionExistsError",
    "IntegrityError",
    "InvalidNameError",
    "InvalidVersionError",
    "InvalidTensorError",
    "InvalidMetadataError",
    "InvalidSafetensorsError",
    "InvalidArgumentError",
    "RefInUseError",
    "ManifestError",
    "LockTimeoutError",
    "StorageError",
]


class HydraError(Exception):
    """Root of every error raised by hydra_cas."""

    #: Process exit status the CLI uses for this kind of error.
    exit_code = 2

    def __str__(self) -> str:
        # KeyError's own __str__ wraps the message in quotes; undo that so every
        # HydraError reads the same whatever built-in it also derives from.
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class NotFoundError(HydraError, KeyError):
    """A model, version, alias or object does not exist."""

    exit_code = 3


class VersionExistsError(HydraError, ValueError):
    """A ``name:version`` already holds different bytes; versions are immutable."""

    exit_code = 4


class IntegrityError(HydraError, ValueError):
    """Stored bytes do not match their recorded digest, or a ref is marked broken."""

    exit_code = 5

    def __init__(
        self,
        message: str,
        *,
        ref: str | None = None,
        oid: str | None = None,
        expected: str | None = None,
        actual: str | None = None,
    ) -> None:
        super().__init__(message)
        self.ref = ref
        self.oid = oid
        self.expected = expected
        self.actual = actual

    def __reduce__(self):  # keep the attributes across pickling (process pools)
        return (
            _rebuild_integrity_error,
            (self.args[0], self.ref, self.oid, self.expected, self.actual),
        )


def _rebuild_integrity_error(
    message: str, ref: str | None, oid: str | None, expected: str | None, actual: str | None
) -> IntegrityError:
    return IntegrityError(message, ref=ref, oid=oid, expected=expected, actual=actual)


class InvalidNameError(HydraError, ValueError):
    """A model name or alias does not match the documented safe pattern."""


class InvalidVersionError(HydraError, ValueError):
    """A version string is not a valid PEP 440 / semantic version or specifier."""


class InvalidTensorError(HydraError, TypeError):
    """A value given as a tensor cannot be stored (wrong type, dtype or key)."""


class InvalidMetadataError(HydraError, ValueError):
    """User metadata is not a JSON object with string keys, or is too large."""


class InvalidSafetensorsError(HydraError, ValueError):
    """A file claimed to be safetensors is malformed or hostile."""


class InvalidArgumentError(HydraError, ValueError):
    """An option has a value outside its documented set (e.g. ``verify="bogus"``)."""


class RefInUseError(HydraError, ValueError):
    """A version cannot be removed because aliases still point at it."""

    exit_code = 4


class ManifestError(HydraError, ValueError):
    """``manifest.json`` or the journal is unreadable or violates the format."""


class LockTimeoutError(HydraError, TimeoutError):
    """The store lock could not be taken in time."""


class StorageError(HydraError, OSError):
    """A file-system operation failed (disk full, permission denied, I/O error)."""

    def __init__(self, message: str, *, errno: int | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.path = path
        self.filename = path

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self):
        return (_rebuild_storage_error, (self.args[0], self.errno, self.path))


def _rebuild_storage_error(message: str, errno: int | None, path: str | None) -> StorageError:
    return StorageError(message, errno=errno, path=path)
