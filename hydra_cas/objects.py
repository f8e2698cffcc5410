"""The hot tier: payloads stored whole, one read-only file per oid.

Writing streams a payload into a unique temp file while SHA-256 (in a thread
of its own; hashlib releases the GIL) and BLAKE3 (in the calling thread,
beside the write) digest it, so the bytes are read from memory once and never
re-read from disk.  SHA-256, at about 1.5-2 GB/s on one core, is the slowest
stage, so everything else is arranged to hide behind it: when the store is
durable, writeback of each written batch is started at once and awaited by a
helper thread, so the disk works while SHA-256 is still running and the final
fsync finds almost nothing left to flush; each batch on disk is then dropped
from the page cache (``ObjectStore.drop_behind``).

Reading fills a fresh buffer in chunks with a few reader threads (faulting in
new memory and copying into it is most of the cost, and parallelises) while
the calling thread hashes each chunk, in order, as soon as it has arrived.
Beside other reads (``load_many``) each thread reads and hashes its own object
on its own instead.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import hashlib
import itertools
import logging
import mmap
import os
import queue
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import blake3
import numpy as np

from hydra_cas import fsio
from hydra_cas.errors import IntegrityError, StorageError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from pathlib import Path

    from hydra_cas.layout import Layout

__all__ = ["VERIFY_MODES", "ObjectStore", "Written", "digest_stream", "hash_file"]

logger = logging.getLogger(__name__)

VERIFY_MODES = ("fast", "full", "none")
_INLINE_BYTES = 1 << 20  # below this, threads cost more than they save
# Small read chunks keep the read/hash pipeline full: its start and end, where
# only one stage runs, cost one chunk each (measured on 64 MiB objects: 8 MiB
# chunks load ~1.15x faster than 32 MiB ones; no difference on 1 GiB).
_READ_CHUNK = 8 * 1024 * 1024
# How many chunks the SHA-256 thread may lag behind the writer.  Chunks are
# views of the caller's arrays (free to hold) or converted slabs of
# payload.CHUNK_BYTES, so a save holds at most _HASH_LAG + 2 slabs: 64 MiB.
_HASH_LAG = 2
# Writeback is started per batch of at least this many bytes, and the writer
# may run this many batches ahead of the disk.
_WRITEBACK_BYTES = 16 * 1024 * 1024
_WRITEBACK_LAG = 2
_HASH_FILE_CHUNK = 8 * 1024 * 1024
_reads_lock = threading.Lock()
_active_reads = 0
_readers: ThreadPoolExecutor | None = None


@dataclass(frozen=True, slots=True)
class Written:
    """A payload streamed to a temp file (or only hashed, when ``tmp`` is None)."""

    tmp: str | None
    oid: str
    blake3: str
    size: int


class _Feeder:
    """Feed chunks, in order, to ``update`` in a thread of its own.

    The queue is bounded, so the producer never gets more than ``lag`` chunks
    ahead, and it holds a reference to every chunk until it is consumed, so a
    temporary chunk cannot be freed or reused early.  A dedicated thread keeps
    the order strict and cannot be starved by unrelated work on a shared pool.
    """

    def __init__(self, update: Callable[[Any], object], lag: int, name: str = "hydra-hash") -> None:
        self._update = update
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=lag)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            chunk = self._queue.get()
            if chunk is None:
                return
            if self._error is None:
                try:
                    self._update(chunk)
                except BaseException as exc:  # re-raised in the producer by put() or close()
                    self._error = exc
            del chunk

    def put(self, chunk: Any) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)

    def close(self) -> None:
        """Wait until every chunk is consumed; re-raise the consumer's error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error


# sync_file_range(2) flags, from <fcntl.h>.
_SFR_WAIT_BEFORE = 1
_SFR_WRITE = 2
_SFR_WAIT_AFTER = 4
_UNSUPPORTED = {errno_mod.ENOSYS, errno_mod.EINVAL, errno_mod.ESPIPE, errno_mod.EOPNOTSUPP, errno_mod.ENOTSUP}
_sync_file_range: Any = None
_sync_file_range_loaded = False


def _load_sync_file_range() -> Any:
    """libc's sync_file_range (Linux only), or None where it does not exist."""
    global _sync_file_range, _sync_file_range_loaded
    if not _sync_file_range_loaded:
        fn = None
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                # Integers only: (int fd, off64_t offset, off64_t nbytes, unsigned int flags) -> int.
                fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
                fn.restype = ctypes.c_int
            except (OSError, AttributeError):
                fn = None
        _sync_file_range, _sync_file_range_loaded = fn, True
    return _sync_file_range


class _Writeback:
    """Push a file's freshly written pages to disk while the rest is produced.

    After every ``_WRITEBACK_BYTES`` written, the writer starts writeback of
    that batch (sync_file_range with WRITE does not wait for the disk) and a
    helper thread waits for it to complete, so the disk, the writer and the
    SHA-256 thread all work at once.  The writer gets at most
    ``_WRITEBACK_LAG`` batches ahead of the disk, which bounds dirty memory, and
    the fsync that publishes the file has almost nothing left to do.  This is
    only a head start: durability still comes from that fsync.  An I/O error
    seen here is raised (it would otherwise be consumed here and not reported
    again by a later fsync on another descriptor).

    With ``drop=True`` each batch, once on disk, is also dropped from the page
    cache, so the next batches reuse the same memory instead of claiming fresh
    pages (the slowest part of writing on a VM whose free memory is handed back
    to the host) and a large save does not push other files out of the cache.
    """

    def __init__(self, fd: int, path: str, *, drop: bool = False) -> None:
        self._fd = fd
        self._path = path
        self._drop = drop and hasattr(os, "posix_fadvise")
        self._call = _load_sync_file_range()
        self._waiter: _Feeder | None = None
        try:
            start = os.lseek(fd, 0, os.SEEK_CUR)
        except OSError:
            self._call = None
            start = 0
        self._started = self._written = start

    def wrote(self, n: int) -> None:
        self._written += n
        if self._call is None or self._written - self._started < _WRITEBACK_BYTES:
            return
        batch = (self._started, self._written - self._started)
        self._sync(*batch, _SFR_WRITE)
        if self._waiter is None:
            self._waiter = _Feeder(self._settle, _WRITEBACK_LAG, "hydra-writeback")
        self._waiter.put(batch)
        self._started = self._written

    def close(self) -> None:
        """Wait for the helper thread (before ``fd`` is closed); re-raise its error."""
        if self._waiter is not None:
            self._waiter.close()

    def _settle(self, batch: tuple[int, int]) -> None:
        # Runs in the helper thread; ctypes releases the GIL during the call.
        offset, length = batch
        self._sync(offset, length, _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER)
        if self._drop and self._call is not None:
            try:
                os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)
            except OSError:
                self._drop = False

    def _sync(self, offset: int, length: int, flags: int) -> None:
        call = self._call
        if call is None:
            return
        if call(self._fd, offset, length, flags) == 0:
            return
        err = ctypes.get_errno()
        if err in _UNSUPPORTED:
            logger.debug("sync_file_range unsupported for %s (errno %d); fsync will do", self._path, err)
            self._call = None
            return
        if err == errno_mod.EINTR:
            return  # only a head start; fsync will finish the job
        raise StorageError(
            f"writing {self._path} to disk failed: {os.strerror(err)}",
            errno=err,
            path=self._path,
        )


def digest_stream(
    chunks: Iterable[memoryview | bytes | bytearray],
    fd: int | None = None,
    path: str = "",
    *,
    writeback: bool = False,
) -> tuple[str, str, int]:
    """SHA-256, BLAKE3 and length of ``chunks``, writing them to ``fd`` if given.

    ``writeback=True`` starts writing the data to disk as it goes (see
    ``_Writeback``): use it when the caller will fsync ``fd`` afterwards.
    """
    flusher = _Writeback(fd, path) if writeback and fd is not None else None
    return _digest(chunks, fd, path, flusher)


def _digest(
    chunks: Iterable[memoryview | bytes | bytearray], fd: int | None, path: str, flusher: _Writeback | None
) -> tuple[str, str, int]:
    sha = hashlib.sha256()
    b3 = blake3.blake3()
    size = 0
    feeder: _Feeder | None = None
    try:
        for chunk in chunks:
            n = len(chunk)
            size += n
            # SHA-256 is the slowest stage: from the first large chunk on, it
            # runs in its own thread, up to _HASH_LAG chunks behind, in order.
            if feeder is None and n >= _INLINE_BYTES:
                feeder = _Feeder(sha.update, _HASH_LAG)
            if feeder is not None:
                feeder.put(chunk)
            else:
                sha.update(chunk)
            b3.update(chunk)
            if fd is not None:
                fsio.write_all(fd, chunk, path)
                if flusher is not None:
                    flusher.wrote(n)
            del chunk  # the feeder holds it as long as it needs it
    finally:
        try:
            if flusher is not None:
                flusher.close()
        finally:
            if feeder is not None:
                feeder.close()
    return sha.hexdigest(), b3.hexdigest(), size


def hash_file(
    path: str | os.PathLike[str], *, sha256: bool = True, blake: bool = True
) -> tuple[str | None, str | None, int]:
    """Hash a file's bytes (streamed); either digest may be skipped.

    With both digests, SHA-256 runs in a second thread, so the pair costs
    about as much as SHA-256 alone.
    """
    sha = hashlib.sha256() if sha256 else None
    # BLAKE3 gets every core only when it does not have to share them with SHA-256.
    b3 = (blake3.blake3() if sha256 else blake3.blake3(max_threads=blake3.blake3.AUTO)) if blake else None
    size = 0
    lag = 2
    with open(path, "rb", buffering=0) as f:
        _advise_sequential(f.fileno())
        both = sha is not None and b3 is not None and os.fstat(f.fileno()).st_size >= _INLINE_BYTES
        # Reused buffers (fresh ones would be page-faulted in for every chunk).
        # The feeder holds at most ``lag`` chunks queued plus one in hand, so a
        # ring of lag + 2 never refills a buffer that is still being hashed.
        ring = [bytearray(_HASH_FILE_CHUNK) for _ in range(lag + 2 if both else 1)]
        feeder = _Feeder(sha.update, lag) if both and sha is not None else None
        try:
            for turn in itertools.count():
                buf = ring[turn % len(ring)]
                n = f.readinto(buf)
                if not n:
                    break
                size += n
                part = memoryview(buf)[:n]
                if feeder is not None:
                    feeder.put(part)
                elif sha is not None:
                    sha.update(part)
                if b3 is not None:
                    b3.update(part)
                del part
        finally:
            if feeder is not None:
                feeder.close()
    return (sha.hexdigest() if sha else None, b3.hexdigest() if b3 else None, size)


def _advise_sequential(fd: int) -> None:
    """Ask for a larger readahead (helps cold reads; a no-op for cached ones)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass


@contextmanager
def _reading() -> Iterator[bool]:
    """Count reads in flight; yield True when this is the only one."""
    global _active_reads
    with _reads_lock:
        _active_reads += 1
        alone = _active_reads == 1
    try:
        yield alone
    finally:
        with _reads_lock:
            _active_reads -= 1


class ObjectStore:
    """Create, find and read objects under ``objects/sha256``."""

    def __init__(self, layout: Layout, *, durable: bool = True) -> None:
        self.layout = layout
        self.durable = durable
        #: Durable writes drop each written-back batch from the page cache (see
        #: ``_Writeback``).  Set to False to keep a new object cached, e.g. when
        #: it is loaded again right after being saved.
        self.drop_behind = durable

    def path(self, oid: str) -> Path:
        return self.layout.oid_to_path(oid)

    def size_of(self, oid: str) -> int | None:
        try:
            return os.stat(self.path(oid)).st_size
        except FileNotFoundError:
            return None

    # -- writing

    def write_temp(self, chunks: Iterable[memoryview | bytes | bytearray]) -> Written:
        """Stream chunks into a new temp file, hashing them on the way."""
        fsio.makedirs(self.layout.tmp)
        fd, tmp = fsio.create_temp(self.layout.tmp)
        try:
            try:
                flusher = _Writeback(fd, tmp, drop=self.drop_behind) if self.durable else None
                oid, b3, size = _digest(chunks, fd, tmp, flusher)
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
            logger.warning(
                "object %s has %d bytes, expected %d: replacing it", written.oid, existing, written.size
            )
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
            raise StorageError(
                f"cannot open object {oid}: {exc.strerror}", errno=exc.errno, path=str(path)
            ) from exc
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
            buf = _fresh_buffer(size)
            view = buf.data
            fd = f.fileno()
            _advise_sequential(fd)
            with _reading() as alone:
                # BLAKE3's own helper threads pay only when cores are left over
                # beside the readers; on two cores they would take turns with them.
                hasher = _hasher(verify, size, all_cores=alone and (os.cpu_count() or 1) > 2)
                if alone and size > _READ_CHUNK and hasattr(os, "preadv"):
                    _read_parallel(fd, view, hasher, oid)
                else:
                    # Beside other loads (load_many) each thread reads and hashes
                    # its own object: the loads already keep every core busy.
                    _read_serial(f, view, hasher, oid)
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


def _fresh_buffer(size: int) -> np.ndarray:
    """A new writable uint8 array of ``size`` bytes, freed when its last view goes.

    Large buffers are anonymous mappings, which the system backs with the page
    size of its own choosing, rather than numpy's allocations, which ask for
    2 MiB pages: on a VM that hands free memory back to its host, those come
    from cold memory the host must fault in again (this project's 2-core VM
    loaded 1 GiB at 1.1 GB/s, 0.7-3.2, with them and at 2.4 GB/s, 1.8-2.5, with
    ordinary pages).  Dropping the arrays unmaps the memory.
    """
    if size < _INLINE_BYTES:
        return np.empty(size, dtype=np.uint8)
    return np.frombuffer(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), dtype=np.uint8)


def _read_pool() -> ThreadPoolExecutor:
    global _readers
    with _reads_lock:
        if _readers is None:
            workers = max(2, min(8, os.cpu_count() or 2))
            _readers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hydra-read")
        return _readers


def _fill(fd: int, view: memoryview, offset: int, oid: str) -> None:
    """Read ``len(view)`` bytes at ``offset`` into ``view`` (a reader thread's task)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if not n:
            raise IntegrityError(f"object {oid} shrank while being read", oid=oid)
        done += n


def _read_parallel(fd: int, view: memoryview, hasher: Any, oid: str) -> None:
    """Fill ``view`` from ``fd`` with the reader threads; hash it here, in order.

    Most of a load's time goes to faulting in the fresh buffer and copying
    into it, which several threads can do at once; hashing follows behind, a
    chunk as soon as it has arrived.
    """
    pool = _read_pool()
    size = len(view)
    offsets = range(0, size, _READ_CHUNK)
    tasks = [pool.submit(_fill, fd, view[o : o + _READ_CHUNK], o, oid) for o in offsets]
    try:
        for offset, task in zip(offsets, tasks, strict=True):
            task.result()
            if hasher is not None:
                hasher.update(view[offset : offset + _READ_CHUNK])
    finally:
        # On an error, no task may still be writing into the buffer (or
        # reading ``fd``) once the caller moves on.
        for task in tasks:
            task.cancel()
        futures_wait(tasks)


def _read_serial(f: Any, view: memoryview, hasher: Any, oid: str) -> None:
    pos = 0
    size = len(view)
    while pos < size:
        n = f.readinto(view[pos : pos + _READ_CHUNK])
        if not n:
            raise IntegrityError(f"object {oid} shrank while being read", oid=oid)
        if hasher is not None:
            hasher.update(view[pos : pos + n])
        pos += n


def _hasher(verify: str, size: int, *, all_cores: bool = True) -> Any:  # hashlib, blake3: no common type
    """The hasher for ``verify``; a large BLAKE3 one uses every core if allowed."""
    if verify == "none":
        return None
    if verify == "full":
        return hashlib.sha256()
    if all_cores and size >= 64 * 1024 * 1024:
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    return blake3.blake3()
