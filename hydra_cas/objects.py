"""The hot tier: payloads stored whole, one read-only file per oid.

Writing streams a payload into a unique temp file while SHA-256 (in a worker
thread; hashlib releases the GIL) and BLAKE3 (in the calling thread, beside the
write) digest it, so the bytes are read from memory once and never re-read from
disk.  Reading fills one buffer with ``readinto`` while a worker thread hashes
the part already read.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import blake3
import numpy as np

from hydra_cas import fsio
from hydra_cas.errors import IntegrityError, StorageError

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from hydra_cas.layout import Layout

__all__ = ["Written", "ObjectStore", "hash_file", "digest_stream", "VERIFY_MODES"]

logger = logging.getLogger(__name__)

VERIFY_MODES = ("fast", "full", "none")
_INLINE_BYTES = 1 << 20  # below this, threads cost more than they save
_READ_CHUNK = 32 * 1024 * 1024
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="hydra-hash")
        return _pool


@dataclass(frozen=True, slots=True)
class Written:
    """A payload streamed to a temp file (or only hashed, when ``tmp`` is None)."""

    tmp: str | None
    oid: str
    blake3: str
    size: int


def digest_stream(chunks: Iterable[memoryview | bytes], fd: int | None = None, path: str = "") -> tuple[str, str, int]:
    """SHA-256, BLAKE3 and length of ``chunks``, writing them to ``fd`` if given."""
    sha = hashlib.sha256()
    b3 = blake3.blake3()
    size = 0
    pending: Future[None] | None = None
    pool = _executor()
    try:
        for chunk in chunks:
            n = len(chunk)
            size += n
            if pending is not None:
                pending.result()
                pending = None
            if n >= _INLINE_BYTES:
                pending = pool.submit(sha.update, chunk)
            else:
                sha.update(chunk)
            b3.update(chunk)
            if fd is not None:
                fsio.write_all(fd, chunk, path)
            # The chunk may be a temporary (a converted slab): wait for the
            # hash before the next chunk replaces it, keeping memory bounded.
        if pending is not None:
            pending.result()
            pending = None
    finally:
        if pending is not None:
            pending.result()
    return sha.hexdigest(), b3.hexdigest(), size


def hash_file(path: str | os.PathLike[str], *, sha256: bool = True, blake: bool = True) -> tuple[str | None, str | None, int]:
    """Hash a file's bytes (streamed); either digest may be skipped."""
    sha = hashlib.sha256() if sha256 else None
    b3 = blake3.blake3(max_threads=blake3.blake3.AUTO) if blake else None
    size = 0
    buf = bytearray(8 * 1024 * 1024)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            size += n
            part = view[:n]
            if sha is not None:
                sha.update(part)
            if b3 is not None:
                b3.update(part)
    return (sha.hexdigest() if sha else None, b3.hexdigest() if b3 else None, size)


class ObjectStore:
    """Create, find and read objects under ``objects/sha256``."""

    def __init__(self, layout: Layout, *, durable: bool = True) -> None:
        self.layout = layout
        self.durable = durable

    def path(self, oid: str) -> Path:
        return self.layout.oid_to_path(oid)

    def size_of(self, oid: str) -> int | None:
        try:
            return os.stat(self.path(oid)).st_size
        except FileNotFoundError:
            return None

    # -- writing

    def write_temp(self, chunks: Iterable[memoryview | bytes]) -> Written:
        """Stream chunks into a new temp file, hashing them on the way."""
        fsio.makedirs(self.layout.tmp)
        fd, tmp = fsio.create_temp(self.layout.tmp)
        try:
            try:
                oid, b3, size = digest_stream(chunks, fd, tmp)
            finally:
                os.close(fd)
        except BaseException:
            fsio.discard(tmp)
            raise
        return Written(tmp, oid, b3, size)

    def publish(self, written: Written) -> bool:
        """Move a temp file into place as its object; False if it already existed.

        An existing object of the right size is kept (and its mtime refreshed so
        a concurrent gc's grace period protects it); one of the wrong size is a
        damaged copy and is replaced by the fresh, verified bytes.
        """
        assert written.tmp is not None
        final = self.path(written.oid)
        existing = self.size_of(written.oid)
        if existing == written.size:
            fsio.discard(written.tmp)
            self.touch(written.oid)
            return False
        if existing is not None:
            logger.warning("object %s has %d bytes, expected %d: replacing it", written.oid, existing, written.size)
        fd = os.open(written.tmp, os.O_RDONLY)
        try:
            if self.durable:
                fsio.fsync(fd, written.tmp)
        finally:
            os.close(fd)
        fsio.chmod(written.tmp, 0o444)
        created = fsio.makedirs(final.parent)
        fsio.replace(written.tmp, str(final))
        if self.durable:
            fsio.fsync_dir(final.parent)
            if created:
                fsio.fsync_dir(final.parent.parent)
        logger.debug("published object %s (%d bytes)", written.oid, written.size)
        return True

    def touch(self, oid: str) -> None:
        try:
            os.utime(self.path(oid))
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.debug("could not refresh mtime of %s: %s", oid, exc)

    # -- reading

    def read_into_buffer(self, oid: str, expected_size: int, verify: str) -> tuple[np.ndarray, str | None]:
        """Read a whole object into a fresh uint8 array; return it and its digest.

        The digest is BLAKE3 for ``verify="fast"``, SHA-256 for ``"full"`` and
        None for ``"none"``; hashing overlaps the read of the next chunk.
        """
        path = self.path(oid)
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StorageError(f"cannot open object {oid}: {exc.strerror}", errno=exc.errno, path=str(path)) from exc
        with f:
            size = os.fstat(f.fileno()).st_size
            if size != expected_size:
                raise IntegrityError(
                    f"object {oid} has {size} bytes, the manifest records {expected_size}: "
                    "it is truncated or damaged",
                    oid=oid,
                    expected=str(expected_size),
                    actual=str(size),
                )
            buf = np.empty(size, dtype=np.uint8)
            view = memoryview(buf)
            hasher = _hasher(verify, size)
            pool = _executor()
            pending: Future[None] | None = None
            pos = 0
            try:
                while pos < size:
                    n = f.readinto(view[pos : pos + _READ_CHUNK])
                    if not n:
                        raise IntegrityError(f"object {oid} shrank while being read", oid=oid)
                    if hasher is not None:
                        if pending is not None:
                            pending.result()
                        pending = pool.submit(hasher.update, view[pos : pos + n])
                    pos += n
            finally:
                if pending is not None:
                    pending.result()
        return buf, (hasher.hexdigest() if hasher is not None else None)

    def map(self, oid: str, expected_size: int, verify: str) -> tuple[mmap.mmap | None, str | None]:
        """Memory-map an object read-only; hash the mapping if asked."""
        path = self.path(oid)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != expected_size:
                raise IntegrityError(
                    f"object {oid} has {size} bytes, the manifest records {expected_size}: "
                    "it is truncated or damaged",
                    oid=oid,
                    expected=str(expected_size),
                    actual=str(size),
                )
            if size == 0:
                return None, _hasher(verify, 0).hexdigest() if verify != "none" else None  # type: ignore[union-attr]
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        hasher = _hasher(verify, size)
        if hasher is not None:
            hasher.update(mapped)
        return mapped, (hasher.hexdigest() if hasher is not None else None)


def _hasher(verify: str, size: int):  # noqa: ANN202 - hashlib and blake3 share no base type
    if verify == "none":
        return None
    if verify == "full":
        return hashlib.sha256()
    if size >= 64 * 1024 * 1024:
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    return blake3.blake3()
