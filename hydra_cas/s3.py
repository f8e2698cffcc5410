"""``S3Store``: the same store on S3-compatible object storage (AWS S3, MinIO, R2, Ceph RGW).

``Store("s3://bucket/prefix")`` returns an :class:`S3Store`.  It is a
:class:`~hydra_cas.store.Store` whose three backends are swapped for ones
that speak S3 (see :mod:`hydra_cas.backend` for the interface):

- :class:`S3ObjectStore`: objects at ``objects/sha256/<2>/<62>``, created with
  ``If-None-Match: *`` (a 412 means the bytes are already there: dedup).  A save
  streams its payload to a local spool file while hashing it, because the key
  is the SHA-256 and is known only at the end; the upload then sends that file.
- :class:`S3ManifestStore`: ``manifest.json`` replaced by compare-and-swap on
  its ETag, and a journal of *segments*, one object per commit, each created
  with ``If-None-Match: *`` under the ``seq`` of its first record.  Winning
  that create is the commit point, exactly as appending to ``journal.jsonl``
  under the lock is on disk; the manifest then only catches up.
- :class:`S3Archive`: the archival tier's recipes and tensor blobs as keys.

There is no lock server.  Savers announce the oids they are about to
reference with intent keys, and gc holds a lease key while it deletes; see
:mod:`hydra_cas.s3_gc` for the protocol and docs/FORMAT.md ("S3 layout").

Configuration: ``endpoint_url`` (else ``$HYDRA_S3_ENDPOINT_URL``, else boto3's
own ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``) for S3-compatible servers;
region and credentials from the standard AWS chain.  ``single_writer=True``
(or ``HYDRA_S3_SINGLE_WRITER=1``) allows writes to a server that ignores
conditional writes, on the caller's promise that no other process writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3
import numpy as np

from hydra_cas import codec, fsio
from hydra_cas.archive import (
    _MAX_RECIPE_BYTES,
    BLOB_HEADER_SIZE,
    KIND_XOR,
    Archive,
    BlobHeader,
    Recipe,
    _max_frame,
)
from hydra_cas.errors import (
    HydraError,
    IntegrityError,
    ManifestError,
    NotFoundError,
    StorageError,
)
from hydra_cas.layout import check_oid, is_oid
from hydra_cas.manifest import (
    FORMAT_VERSION,
    apply_record,
    dumps_manifest,
    empty_manifest,
    replay,
    utc_now,
    validate_manifest,
    validate_record,
)
from hydra_cas.objects import Written, digest_stream
from hydra_cas.s3io import NOT_MODIFIED, SINGLE_WRITER_ENV, Bucket, backoff, make_client, parse_url
from hydra_cas.store import Store

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from hydra_cas.fsck import FsckReport
    from hydra_cas.gc import GcPlan
    from hydra_cas.s3_gc import SaveGuard
    from hydra_cas.s3io import Listed

__all__ = [
    "S3Archive",
    "S3Layout",
    "S3ManifestStore",
    "S3ObjectStore",
    "S3Path",
    "S3Store",
    "object_rel",
    "segment_rel",
]

logger = logging.getLogger(__name__)

MANIFEST_REL = "manifest.json"
JOURNAL_DIR = "journal/"
OBJECTS_DIR = "objects/sha256/"
INTENTS_DIR = "intents/"
QUARANTINE_DIR = "quarantine/"
LEASE_REL = "locks/gc-lease"
TENSORS_DIR = "archive/tensors/sha256/"
RECIPES_DIR = "archive/recipes/sha256/"
_SEGMENT_DIGITS = 12
_COMMIT_ATTEMPTS = 16
_FILE_CHUNK = 8 * 1024 * 1024


def object_rel(oid: str) -> str:
    check_oid(oid)
    return f"{OBJECTS_DIR}{oid[:2]}/{oid[2:]}"


def oid_of(rel: str) -> str | None:
    """The oid an object key stands for, or None for anything else under objects/."""
    if not rel.startswith(OBJECTS_DIR):
        return None
    fan, _, rest = rel[len(OBJECTS_DIR):].partition("/")
    oid = fan + rest
    return oid if len(fan) == 2 and is_oid(oid) else None


def segment_rel(seq: int) -> str:
    return f"{JOURNAL_DIR}{seq:0{_SEGMENT_DIGITS}d}.jsonl"


def segment_seq(rel: str) -> int | None:
    name = rel[len(JOURNAL_DIR):] if rel.startswith(JOURNAL_DIR) else ""
    stem, dot, ext = name.partition(".")
    if dot and ext == "jsonl" and len(stem) == _SEGMENT_DIGITS and stem.isdigit():
        return int(stem)
    return None


# ---------------------------------------------------------------------- keys as paths


@dataclass(frozen=True, slots=True)
class _Stat:
    st_size: int
    st_mtime: float


class S3Path:
    """A key standing in for a ``pathlib.Path`` where Store and Archive only ask about a file.

    It answers ``is_file``, ``exists`` and ``stat`` (size and modification
    time) and prints as its URL.  It deliberately has no ``__fspath__``, so it
    can never be opened as a local file by mistake.
    """

    __slots__ = ("_listed", "bucket", "rel")

    def __init__(self, bucket: Bucket, rel: str, listed: Listed | None = None) -> None:
        self.bucket = bucket
        self.rel = rel
        self._listed = listed

    def __str__(self) -> str:
        return self.bucket.url(self.rel)

    def __repr__(self) -> str:
        return f"S3Path({str(self)!r})"

    @property
    def name(self) -> str:
        return self.rel.rsplit("/", 1)[-1]

    def stat(self) -> _Stat:
        listed = self._listed or self.bucket.head(self.rel)
        if listed is None:
            raise FileNotFoundError(str(self))
        return _Stat(listed.size, listed.modified)

    def is_file(self) -> bool:
        return self.bucket.head(self.rel) is not None

    exists = is_file


class S3Layout:
    """Where things live under a store's prefix (the S3 counterpart of :class:`~hydra_cas.layout.Layout`)."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket

    @property
    def root(self) -> str:
        return self.bucket.url()

    @property
    def manifest(self) -> str:
        return self.bucket.url(MANIFEST_REL)

    @property
    def objects(self) -> str:
        return self.bucket.url(OBJECTS_DIR.rstrip("/"))

    @property
    def intents(self) -> str:
        return self.bucket.url(INTENTS_DIR.rstrip("/"))

    @property
    def quarantine(self) -> str:
        return self.bucket.url(QUARANTINE_DIR.rstrip("/"))

    def oid_to_path(self, oid: str) -> S3Path:
        return S3Path(self.bucket, object_rel(oid))

    def iter_objects(self) -> Iterator[tuple[str, S3Path]]:
        """(oid, path) of every object, from one listing (no request per object)."""
        listed, _ = self.bucket.listing(OBJECTS_DIR)
        for item in listed:
            oid = oid_of(item.rel)
            if oid is not None:
                yield oid, S3Path(self.bucket, item.rel, item)


# ---------------------------------------------------------------------- objects


def _hasher(verify: str, size: int) -> Any:  # hashlib, blake3: no common type
    if verify == "none":
        return None
    if verify == "full":
        return hashlib.sha256()
    return blake3.blake3(max_threads=blake3.blake3.AUTO) if size >= 64 * 1024 * 1024 else blake3.blake3()


def _file_chunks(path: str, chunk: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while data := f.read(chunk):
            yield data


class S3ObjectStore:
    """Objects as keys; the S3 implementation of :class:`hydra_cas.backend.ObjectBackend`."""

    def __init__(self, bucket: Bucket, guard: SaveGuard, spool_dir: str) -> None:
        self.bucket = bucket
        self.guard = guard
        self.spool_dir = spool_dir
        self.durable = True  # an acknowledged PUT is durable; there is nothing to fsync
        self.drop_behind = False

    def path(self, oid: str) -> Path:
        raise HydraError(
            f"object {oid} lives in {self.bucket.url()} and has no local file; use Store.load(), "
            "Store.export() (`hydra-cas export`) or pull it into a local store"
        )

    def url(self, oid: str) -> str:
        return self.bucket.url(object_rel(oid))

    def head(self, oid: str) -> Listed | None:
        return self.bucket.head(object_rel(oid))

    def size_of(self, oid: str) -> int | None:
        """The object's size, or None if it is absent.

        Inside a commit plan this first waits out any gc deletion in progress
        (see :class:`~hydra_cas.s3_gc.SaveGuard`), so an object seen here is not
        deleted before the ref to it is committed.
        """
        self.guard.before_object_check()
        listed = self.head(oid)
        return listed.size if listed is not None else None

    # -- writing

    def write_temp(self, chunks: Iterable[memoryview | bytes | bytearray]) -> Written:
        """Spool the payload to a local temp file, hashing it; its key is known only at the end."""
        fsio.makedirs(self.spool_dir)
        fd, tmp = fsio.create_temp(self.spool_dir)
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
        """Upload a spooled payload as its object; False if it was already there.

        An existing object of the right size is kept without sending a byte; one
        of the wrong size is a damaged copy and is replaced (``If-Match`` on its
        ETag, so a concurrent repair is not overwritten).
        """
        assert written.tmp is not None
        try:
            existing = self.head(written.oid)
            if existing is not None and existing.size == written.size:
                logger.debug("object %s already in %s; nothing sent", written.oid, self.bucket.url())
                return False
            if existing is not None:
                logger.warning("object %s has %d bytes, expected %d: replacing it",
                               written.oid, existing.size, written.size)
            created = self.bucket.upload(
                object_rel(written.oid),
                _file_chunks(written.tmp, self.bucket.part_size_for(written.size)),
                size=written.size,
                replace_etag=existing.etag if existing is not None else None,
            )
        finally:
            fsio.discard(written.tmp)
        if created:
            logger.debug("published object %s (%d bytes) to %s", written.oid, written.size, self.bucket.url())
        return created

    def upload(self, oid: str, chunks: Iterable[bytes | bytearray | memoryview], size: int) -> bool:
        """Create the object from ``chunks``, verifying SHA-256 == ``oid`` before it becomes visible."""
        existing = self.head(oid)
        if existing is not None and existing.size == size:
            return False
        return self.bucket.upload(
            object_rel(oid), chunks, size=size, sha256=oid,
            replace_etag=existing.etag if existing is not None else None,
        )

    def upload_file(self, oid: str, path: str | os.PathLike[str], size: int) -> bool:
        return self.upload(oid, _file_chunks(os.fspath(path), self.bucket.part_size_for(size)), size)

    def touch(self, oid: str) -> None:
        """Nothing to do: on S3 an intent key, not the object's age, protects a reused object."""

    # -- reading

    def iter_chunks(self, oid: str, size: int) -> Iterator[bytes]:
        """The object's bytes in order (FileNotFoundError if absent, IntegrityError on a size mismatch)."""
        return self.bucket.iter_ranges(object_rel(oid), size)

    def read_into_buffer(self, oid: str, expected_size: int, verify: str) -> tuple[np.ndarray, str | None]:
        """Download a whole object into a fresh uint8 array, hashing it on the way."""
        buf = np.empty(expected_size, dtype=np.uint8)
        hasher = _hasher(verify, expected_size)
        pos = 0
        for data in self.iter_chunks(oid, expected_size):
            n = len(data)
            buf[pos : pos + n] = np.frombuffer(data, dtype=np.uint8)
            if hasher is not None:
                hasher.update(data)
            pos += n
        return buf, (hasher.hexdigest() if hasher is not None else None)

    def map(self, oid: str, expected_size: int, verify: str) -> tuple[mmap.mmap | None, str | None]:
        """Download into a spool file, unlinked at once, and map it read-only.

        The pages belong to the page cache, not the process, and the arrays
        viewing them are read-only as with a local store.
        """
        hasher = _hasher(verify, expected_size)
        fsio.makedirs(self.spool_dir)
        fd, tmp = fsio.create_temp(self.spool_dir)
        try:
            for data in self.iter_chunks(oid, expected_size):
                fsio.write_all(fd, data, tmp)
                if hasher is not None:
                    hasher.update(data)
            mapped = None
            if expected_size:
                with open(tmp, "rb") as f:  # the spool fd is write-only
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
            fsio.discard(tmp)
        return mapped, (hasher.hexdigest() if hasher is not None else None)


# ---------------------------------------------------------------------- manifest and journal


def dumps_segment(records: list[dict[str, Any]]) -> bytes:
    return "".join(
        json.dumps(r, separators=(",", ":"), ensure_ascii=False, allow_nan=False) + "\n" for r in records
    ).encode()


def parse_segment(data: bytes, seq: int) -> list[dict[str, Any]]:
    """The validated records of the segment that starts at ``seq``."""
    where = f"journal segment {seq}"
    if not data.endswith(b"\n"):
        raise ManifestError(f"{where} is truncated; run `hydra-cas fsck`")
    records = []
    for n, line in enumerate(data[:-1].split(b"\n")):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            raise ManifestError(f"{where}, line {n + 1}, is not valid JSON; run `hydra-cas fsck`") from None
        validate_record(record, f"{where}, line {n + 1}")
        if record["seq"] != seq + n:
            raise ManifestError(f"{where}, line {n + 1}, has seq {record['seq']}; expected {seq + n}")
        records.append(record)
    return records


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise ManifestError(f"{where} is not valid JSON; run `hydra-cas fsck --repair`") from None
    try:
        return validate_manifest(doc)
    except ManifestError as exc:
        raise ManifestError(f"{exc}; run `hydra-cas fsck` for details") from None


class S3ManifestStore:
    """``manifest.json`` and the journal segments; the S3 implementation of ``RefBackend``.

    A commit reads the manifest (and its ETag), rolls it forward over any
    segments a writer left behind, asks ``plan`` for records, creates the next
    segment with ``If-None-Match: *`` and replaces the manifest with
    ``If-Match``.  Losing the segment race (412 or 409) means another writer
    committed first: read again and re-plan, with jittered backoff, at most
    ``attempts`` times.  Once the segment exists the change is committed; a lost
    manifest swap only means someone else must have moved it, usually by
    rolling our segment forward already.
    """

    def __init__(self, bucket: Bucket, guard: SaveGuard, *, attempts: int = _COMMIT_ATTEMPTS) -> None:
        self.bucket = bucket
        self.guard = guard
        self.attempts = attempts
        self._cache: tuple[str, dict[str, Any]] | None = None
        self._cache_lock = threading.Lock()

    # -- reading

    def read(self) -> dict[str, Any]:
        """The current manifest, validated.  Do not mutate the result."""
        return self.fetch()[0]

    def fetch(self) -> tuple[dict[str, Any], str | None]:
        """(manifest, its ETag); the ETag is None when only the journal exists.

        An unchanged manifest costs one conditional GET answered 304.
        """
        with self._cache_lock:
            cached = self._cache
        got = self.bucket.get(MANIFEST_REL, if_none_match=cached[0] if cached else None)
        if got is NOT_MODIFIED and cached is not None:
            return cached[1], cached[0]
        if got is None or got is NOT_MODIFIED:
            return self._from_journal_only(), None
        doc = parse_manifest(got.data, self.bucket.url(MANIFEST_REL))
        with self._cache_lock:
            self._cache = (got.etag, doc)
        return doc, got.etag

    def exists(self) -> bool:
        """Whether a store lives here (a manifest or a first journal segment)."""
        return any(self.bucket.get(rel, first=1) is not None for rel in (MANIFEST_REL, segment_rel(1)))

    def read_segment(self, seq: int) -> list[dict[str, Any]] | None:
        got = self.bucket.get(segment_rel(seq))
        return None if got is None else parse_segment(got.data, seq)

    def pending(self, journal_seq: int) -> list[dict[str, Any]]:
        """The records of every segment past ``journal_seq`` (a writer stopped before the manifest)."""
        out: list[dict[str, Any]] = []
        seq = journal_seq + 1
        while (records := self.read_segment(seq)) is not None:
            out += records
            seq = records[-1]["seq"] + 1
        return out

    def _from_journal_only(self) -> dict[str, Any]:
        records = self.pending(0)
        if records:
            logger.warning(
                "%s is missing but the journal has %d records; using the journal "
                "(the next write, or `hydra-cas fsck --repair`, writes the manifest)",
                self.bucket.url(MANIFEST_REL), len(records),
            )
        doc = empty_manifest()
        doc["models"] = replay(records)
        doc["journal_seq"] = len(records)
        return doc

    def _rolled(self, doc: dict[str, Any]) -> dict[str, Any]:
        missing = self.pending(doc["journal_seq"])
        if not missing:
            return doc
        logger.info("rolling the manifest forward over %d journal records another writer left", len(missing))
        return {"format_version": FORMAT_VERSION, "journal_seq": missing[-1]["seq"],
                "models": replay(missing, doc["models"])}

    # -- writing

    def commit(self, plan: Callable[[dict[str, Any]], list[dict[str, Any]]]) -> dict[str, Any]:
        """Apply the records ``plan(manifest)`` returns; see the class docstring.

        ``plan`` sees the freshest manifest and may be called more than once
        (once per lost race); it may raise to abort.  Returns the manifest
        after the commit.
        """
        for attempt in range(self.attempts):
            fetched, etag = self.fetch()
            # Without a manifest, fetch() has just replayed every segment there is.
            doc = self._rolled(fetched) if etag is not None else fetched
            self.guard.begin_plan()
            try:
                records = plan(doc)
            finally:
                self.guard.end_plan()
            if not records:
                if doc is not fetched or (etag is None and doc["journal_seq"]):
                    self._swap(doc, etag, doc["journal_seq"])
                return doc
            first = doc["journal_seq"] + 1
            now = utc_now()
            stamped = [{"seq": first + i, "time": now, **r} for i, r in enumerate(records)]
            models = dict(doc["models"])
            owned: set[str] = set()
            for record in stamped:
                apply_record(models, record, owned)
            if self.bucket.put_new(segment_rel(first), dumps_segment(stamped)) is None:
                logger.debug("journal seq %d taken by another writer (attempt %d); re-planning",
                             first, attempt + 1)
                backoff(attempt)
                continue
            new_doc = {"format_version": FORMAT_VERSION, "journal_seq": stamped[-1]["seq"], "models": models}
            return self._swap(new_doc, etag, stamped[-1]["seq"])
        raise StorageError(
            f"could not commit to {self.bucket.url()}: {self.attempts} attempts in a row lost the race "
            "to other writers; nothing was changed, retry (or write less often from more processes)",
            path=self.bucket.url(),
        )

    def _swap(self, doc: dict[str, Any], etag: str | None, last: int) -> dict[str, Any]:
        """Make manifest.json reflect the journal up to ``last`` (compare-and-swap on ``etag``)."""
        body = (dumps_manifest(doc) + "\n").encode()
        for attempt in range(self.attempts):
            new_etag = (
                self.bucket.put_replace(MANIFEST_REL, body, etag) if etag is not None
                else self.bucket.put_new(MANIFEST_REL, body)
            )
            if new_etag is not None:
                with self._cache_lock:
                    self._cache = (new_etag, doc)
                return doc
            current, etag = self.fetch()
            if current["journal_seq"] >= last:
                return doc  # another writer rolled our records forward already
            doc = self._rolled(current)
            body = (dumps_manifest(doc) + "\n").encode()
            backoff(attempt)
        logger.warning(
            "journal records up to %d are committed but %s could not be updated after %d attempts; "
            "the next write (or `hydra-cas fsck --repair`) rolls them forward",
            last, self.bucket.url(MANIFEST_REL), self.attempts,
        )
        return doc

    def roll_forward(self) -> dict[str, Any]:
        """Bring manifest.json up to the end of the journal (repair); return it."""
        fetched, etag = self.fetch()
        doc = self._rolled(fetched)
        if doc is not fetched or (etag is None and doc["journal_seq"] > 0):
            return self._swap(doc, etag, doc["journal_seq"])
        return doc

    def rewrite(self, doc: dict[str, Any]) -> None:
        """Replace manifest.json with ``doc`` unconditionally (repair only)."""
        validate_manifest(doc)
        self.bucket.require_conditional()
        current = self.bucket.head(MANIFEST_REL)
        body = (dumps_manifest(doc) + "\n").encode()
        etag = (self.bucket.put_replace(MANIFEST_REL, body, current.etag) if current
                else self.bucket.put_new(MANIFEST_REL, body))
        if etag is None:
            raise StorageError(f"{self.bucket.url(MANIFEST_REL)} changed during repair; run fsck again")
        with self._cache_lock:
            self._cache = (etag, doc)


# ---------------------------------------------------------------------- archive tier


class S3Archive(Archive):
    """The archival tier with recipes and tensor blobs as keys.

    Only the I/O differs from :class:`~hydra_cas.archive.Archive`: paths are
    :class:`S3Path` keys, writes are ``If-None-Match: *`` creates, reads are
    (ranged) GETs bounded by the same limits, and "touching" a file only checks
    it exists (S3 cannot refresh a key's age; gc does not sweep the archive on
    S3, see :mod:`hydra_cas.s3_gc`).
    NOTE: the four readers below repeat the base class's steps around a GET,
    because the base opens files directly.  With a ``_read(path, limit)`` hook
    in archive.py they reduce to that one override.
    """

    def __init__(self, bucket: Bucket) -> None:  # no super().__init__: it builds local paths
        self.bucket = bucket
        self.layout = None
        self.durable = True
        self.tensors_dir = bucket.url(TENSORS_DIR.rstrip("/"))
        self.recipes_dir = bucket.url(RECIPES_DIR.rstrip("/"))

    def tensor_path(self, tid: str) -> S3Path:  # type: ignore[override]
        check_oid(tid, "tensor id")
        return S3Path(self.bucket, f"{TENSORS_DIR}{tid[:2]}/{tid[2:]}")

    def recipe_path(self, oid: str) -> S3Path:  # type: ignore[override]
        check_oid(oid)
        return S3Path(self.bucket, f"{RECIPES_DIR}{oid[:2]}/{oid[2:]}")

    def iter_files(self, which: str) -> Iterator[tuple[str, S3Path]]:  # type: ignore[override]
        top = TENSORS_DIR if which == "tensors" else RECIPES_DIR
        listed, _ = self.bucket.listing(top)
        for item in listed:
            fan, _, rest = item.rel[len(top):].partition("/")
            if len(fan) == 2 and is_oid(fan + rest):
                yield fan + rest, S3Path(self.bucket, item.rel, item)

    def _read(self, path: S3Path, limit: int) -> bytes:
        """At most ``limit + 1`` bytes of ``path`` (more: too large); FileNotFoundError if absent."""
        got = self.bucket.get(path.rel, first=limit + 1)
        if got is None:
            raise FileNotFoundError(str(path))
        return got.data

    def _publish(self, final: S3Path, data: bytes | bytearray | memoryview, *parts: bytes) -> None:  # type: ignore[override]
        if self.bucket.put_new(final.rel, b"".join((bytes(data), *parts))) is None:
            logger.debug("%s already exists; kept", final)

    def _touch(self, path: S3Path) -> bool:  # type: ignore[override]
        return path.is_file()

    def write_recipe(self, recipe: Recipe) -> None:
        path = self.recipe_path(recipe.oid)
        data = recipe.to_json()
        current = self.bucket.head(path.rel)
        if current is None:
            self._publish(path, data)
            return
        try:
            same = self._read(path, len(data)) == data
        except FileNotFoundError:
            same = False
        if not same:
            # A damaged recipe is replaced, never reused (as on disk).
            logger.warning("archive recipe %s is damaged; replacing it", recipe.oid)
            if self.bucket.put_replace(path.rel, data, current.etag) is None:
                raise StorageError(f"{path} changed while being replaced; archive again", path=str(path))

    def blob_header(self, tid: str) -> BlobHeader:
        try:
            data = self._read(self.tensor_path(tid), BLOB_HEADER_SIZE - 1)
        except FileNotFoundError:
            raise IntegrityError(f"tensor blob {tid} is missing from the archive; run `hydra-cas fsck`",
                                 oid=tid) from None
        return BlobHeader.unpack(data, tid)

    def tensor_bytes(
        self, tid: str, size: int, dtype: str, *, verify: bool = True, _depth: int | None = None
    ) -> bytearray:
        limit = BLOB_HEADER_SIZE + _max_frame(size)
        try:
            data = self._read(self.tensor_path(tid), limit)
        except FileNotFoundError:
            raise IntegrityError(f"tensor blob {tid} is missing from the archive; run `hydra-cas fsck`",
                                 oid=tid) from None
        if len(data) > limit:
            raise IntegrityError(f"tensor blob {tid} is larger than any encoding of {size} bytes", oid=tid)
        header = BlobHeader.unpack(data, tid)
        # As in the base class: decode as the blob's own dtype (a tid names bytes),
        # and along a delta chain the dtypes must agree.
        if header.raw_size != size or (_depth is not None and header.dtype != dtype):
            raise IntegrityError(
                f"tensor blob {tid} holds {header.raw_size} bytes of {header.dtype}, "
                f"expected {size} of {dtype}", oid=tid,
            )
        if _depth is not None and header.depth != _depth:
            raise IntegrityError(f"tensor blob {tid}: delta chain depths do not descend by one", oid=tid)
        raw = codec.decode(memoryview(data)[BLOB_HEADER_SIZE:], header.dtype, size)
        if header.kind == KIND_XOR:
            assert header.base is not None
            base = self.tensor_bytes(header.base, size, header.dtype, verify=False, _depth=header.depth - 1)
            raw = codec.xor_bytes(raw, base)
        if verify and hashlib.sha256(raw).hexdigest() != tid:
            raise IntegrityError(f"tensor blob {tid} decodes to bytes with another SHA-256", oid=tid)
        return raw

    def read_recipe(self, oid: str) -> Recipe:
        try:
            raw = self._read(self.recipe_path(oid), _MAX_RECIPE_BYTES)
        except FileNotFoundError:
            raise IntegrityError(f"archive recipe for object {oid} is missing; run `hydra-cas fsck`",
                                 oid=oid) from None
        if len(raw) > _MAX_RECIPE_BYTES:
            raise IntegrityError(f"archive recipe {oid} is implausibly large", oid=oid)
        return Recipe.from_json(raw, oid)


# ---------------------------------------------------------------------- the store


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


class S3Store(Store):
    """A hydra_cas store under ``s3://bucket/prefix``: the same API as a local :class:`Store`.

    ``endpoint_url`` selects an S3-compatible server (else
    ``$HYDRA_S3_ENDPOINT_URL`` or boto3's ``AWS_ENDPOINT_URL``); ``client``
    passes a ready boto3 S3 client instead.  ``workers`` threads move the parts
    of large objects (``part_size`` bytes each, above ``multipart_threshold``).
    Saves spool their payload under ``spool_dir`` (default: the system temp
    directory).  ``single_writer`` allows writes to a server that ignores
    conditional writes (see :mod:`hydra_cas.s3io`).  ``durable`` is accepted
    for symmetry: an acknowledged PUT is already durable.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        create: bool = True,
        durable: bool = True,
        lock_timeout: float = 60.0,
        endpoint_url: str | None = None,
        client: Any = None,
        single_writer: bool | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        workers: int = 10,
        part_size: int = 8 * 1024 * 1024,
        multipart_threshold: int = 16 * 1024 * 1024,
        commit_attempts: int = _COMMIT_ATTEMPTS,
    ) -> None:
        from hydra_cas.s3_gc import SaveGuard

        name, prefix = parse_url(os.fspath(root))
        if single_writer is None:
            single_writer = _truthy(os.environ.get(SINGLE_WRITER_ENV))
        self.bucket = Bucket(
            client if client is not None else make_client(endpoint_url, max_pool=max(16, 2 * workers)),
            name, prefix, single_writer=single_writer, workers=workers, part_size=part_size,
            multipart_threshold=multipart_threshold,
        )
        self.root = self.bucket.url()  # type: ignore[assignment]
        self.durable = durable
        self.lock_timeout = lock_timeout
        self.layout = S3Layout(self.bucket)  # type: ignore[assignment]
        self.guard = SaveGuard(self.bucket, lock_timeout)
        # NOTE: spool files of a save that was killed stay behind (they are in the
        # system temp directory, which the OS cleans); nothing sweeps them here.
        spool = os.fspath(spool_dir) if spool_dir is not None else None
        spool = spool or os.path.join(tempfile.gettempdir(), f"hydra-s3-spool-{os.getuid()}")
        self.objects = S3ObjectStore(self.bucket, self.guard, spool)  # type: ignore[assignment]
        self.manifest = S3ManifestStore(self.bucket, self.guard, attempts=commit_attempts)  # type: ignore[assignment]
        self.archive_tier = S3Archive(self.bucket)
        if create:
            self.bucket.exists()
        elif not self.manifest.exists():
            raise NotFoundError(
                f"no store at {self.root}; save a model first, or check the URL and the endpoint "
                "(--store / HYDRA_STORE, HYDRA_S3_ENDPOINT_URL)"
            )

    def __repr__(self) -> str:
        return f"S3Store({self.root!r})"

    @property
    def conditional_writes(self) -> bool | None:
        """Whether the server honours conditional writes (probed before the first write; None: not yet)."""
        return self.bucket.conditional_writes

    def close(self) -> None:
        """Stop the transfer threads (the store stays usable; they restart on demand)."""
        self.bucket.close()

    # -- intents: keys instead of files

    def _add_intent(self, oid: str, tmp: str | None) -> str:
        try:
            return self.guard.announce(oid)
        except BaseException:
            if tmp is not None:
                fsio.discard(tmp)
            raise

    def _drop_intent(self, intent: str) -> None:
        self.guard.release(intent)

    # Store drops its intents right after these two commits; doing it here too
    # keeps intents from lingering (protecting their oids from gc for an hour)
    # when Store discards them as files.  Releasing twice is a no-op.
    def _commit_puts(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super()._commit_puts(*args, **kwargs)
        finally:
            self.guard.release_all()

    def _set_tier(self, *args: Any, **kwargs: Any) -> None:
        try:
            super()._set_tier(*args, **kwargs)
        finally:
            self.guard.release_all()

    # -- what has no local file

    def path(self, name: str, version: str = "latest") -> Path:
        key, _ = self._lookup(name, version)
        raise HydraError(
            f"{name}:{key} lives in {self.root} and has no local file; use load(), export() "
            "(`hydra-cas export`), or pull it into a local store first (`hydra-cas pull`)"
        )

    def tensors(self, name: str, version: str = "latest") -> list[dict[str, Any]]:
        key, entry = self._lookup(name, version)
        if entry["tier"] == "archive":
            return super().tensors(name, key)
        from hydra_cas.stheader import parse_header

        oid, size = entry["oid"], entry["size"]
        rel = object_rel(oid)
        head = self.bucket.get(rel, first=8)
        if head is None:
            raise self._integrity(f"object {oid} of {name}:{key} is missing; run `hydra-cas fsck`",
                                  f"{name}:{key}", oid)
        if head.total != size or len(head.data) < 8:
            raise self._integrity(f"object {oid} of {name}:{key} has {head.total} bytes, the manifest "
                                  f"records {size}; run `hydra-cas fsck`", f"{name}:{key}", oid)
        length = int.from_bytes(head.data[:8], "little")
        got = self.bucket.get(rel, first=min(size, 8 + length))
        data = got.data if got is not None else b""
        header = parse_header(data, size)
        return [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in header.tensors]

    def export(
        self,
        name: str,
        version: str,
        dest: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        progress: bool = False,
    ) -> Path:
        """Download ``name:version`` to ``dest``, byte-identical and verified (SHA-256)."""
        from hydra_cas.progress import progress_bar

        key, entry = self._lookup(name, version)
        ref, oid = f"{name}:{key}", entry["oid"]
        target = Path(dest).absolute()
        if target.exists() and not overwrite:
            raise HydraError(f"{target} already exists; choose another path or pass overwrite=True")
        chunks: Iterable[bytes | bytearray]
        if entry["tier"] == "archive":
            chunks = self.archive_tier.iter_payload(self.archive_tier.read_recipe(oid), verify_tensors=False)
        else:
            chunks = self.objects.iter_chunks(oid, entry["size"])
        fd, tmp = fsio.create_temp(target.parent, ".hydra-export")
        try:
            try:
                with progress_bar(entry["size"], f"export {ref}", enabled=progress) as bar:
                    digest, _, size = digest_stream(_counted(chunks, bar), fd, tmp)
                if self.durable:
                    fsio.fsync(fd, tmp)
            except FileNotFoundError:
                raise self._integrity(
                    f"object {oid} of {ref} is missing; run `hydra-cas fsck`", ref, oid
                ) from None
            finally:
                os.close(fd)
            if digest != oid or size != entry["size"]:
                raise self._integrity(
                    f"checksum mismatch exporting {ref}: object {oid} hashes to {digest}; the stored copy is "
                    "corrupt (run `hydra-cas fsck --repair`)", ref, oid, oid, digest,
                )
            os.chmod(tmp, 0o644)
            fsio.replace(tmp, str(target))
        except BaseException:
            fsio.discard(tmp)
            raise
        return target

    # -- maintenance without a lock: see hydra_cas.s3_gc and hydra_cas.s3_fsck

    def _drop_hot_copy(self, oid: str) -> None:
        from hydra_cas.s3_gc import drop_hot_copy

        drop_hot_copy(self, oid)

    def gc(self, *, grace_period: float = 3600.0, dry_run: bool = False, progress: bool = False) -> GcPlan:
        """Delete objects no ref, alias or in-flight save needs, under a gc lease; see hydra_cas.s3_gc."""
        from hydra_cas.s3_gc import collect

        return collect(self, grace_period=grace_period, dry_run=dry_run, progress=progress)

    def fsck(
        self,
        *,
        repair: bool = False,
        sample: float | None = None,
        workers: int | None = None,
        progress: bool = False,
    ) -> FsckReport:
        """Re-hash every object by streaming it; see hydra_cas.s3_fsck."""
        from hydra_cas.s3_fsck import check

        return check(self, repair=repair, sample=sample, workers=workers, progress=progress)


def _counted(chunks: Iterable[bytes | bytearray], bar: Any) -> Iterator[bytes | bytearray]:
    for chunk in chunks:
        bar.update(len(chunk))
        yield chunk
