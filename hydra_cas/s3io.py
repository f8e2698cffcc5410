"""S3 plumbing: bucket URLs, the boto3 client, conditional writes and streamed transfers.

Every request hydra_cas sends to S3-compatible storage goes through
:class:`Bucket`.  It turns the few outcomes the store cares about into plain
return values (a missing key is ``None``, a lost conditional write is ``None``
or ``False``) and every other failure into a :class:`~hydra_cas.errors.HydraError`
with a hint, so the layers above never see botocore's exceptions.

Correctness without a lock server rests on two conditional writes that S3
(since 2024), MinIO, Cloudflare R2 and recent Ceph RGW honour: ``If-None-Match: *``
creates a key only if it is absent, ``If-Match: <ETag>`` replaces it only if it
is unchanged.  A server that silently ignores them would let two writers
overwrite each other, so before the first write the bucket is *probed* (a key is
created twice with ``If-None-Match: *``; the second must fail with 412) and,
where the probe fails, every write is refused with
:class:`ConditionalWritesError` unless the caller promised a single writer.

Credentials come from boto3's standard chain (environment, shared config and
credentials files, SSO, instance roles) and are never read or logged here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

from hydra_cas.errors import HydraError, IntegrityError, NotFoundError, StorageError

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

__all__ = [
    "ENDPOINT_ENV",
    "SINGLE_WRITER_ENV",
    "Bucket",
    "ConditionalWritesError",
    "Fetched",
    "Listed",
    "Upload",
    "backoff",
    "make_client",
    "parse_url",
]

logger = logging.getLogger(__name__)

ENDPOINT_ENV = "HYDRA_S3_ENDPOINT_URL"
SINGLE_WRITER_ENV = "HYDRA_S3_SINGLE_WRITER"
MiB = 1 << 20
# S3's own limits: parts of at least 5 MiB (but the last), at most 10,000 parts.
_MIN_PART = 5 * MiB
_MAX_PARTS = 10_000
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_CONFLICT_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "OperationAborted"})
_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchUpload"})
NOT_MODIFIED: Any = object()
# Probe verdicts per client and bucket, so a process that opens many stores
# through one client probes each bucket once.
_PROBED: weakref.WeakKeyDictionary[Any, dict[str, bool]] = weakref.WeakKeyDictionary()
_PROBED_LOCK = threading.Lock()


class ConditionalWritesError(HydraError, RuntimeError):
    """The server ignores conditional writes; concurrent writers could lose each other's updates."""


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of ``s3://bucket[/prefix]``; the prefix has no leading or trailing ``/``."""
    if not url.startswith("s3://"):
        raise HydraError(f"{url!r} is not an S3 URL; write s3://bucket/prefix")
    bucket, _, prefix = url[5:].partition("/")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise HydraError(
            f"{url!r}: {bucket!r} is not a valid bucket name (3-63 lowercase letters, digits, '.' or '-')"
        )
    prefix = prefix.strip("/")
    parts = prefix.split("/") if prefix else []
    if any(p in ("", ".", "..") for p in parts):
        raise HydraError(f"{url!r}: the prefix may not contain empty, '.' or '..' segments")
    return bucket, prefix


def make_client(endpoint_url: str | None = None, *, max_pool: int = 16) -> Any:
    """A boto3 S3 client configured by the standard AWS chain.

    ``endpoint_url`` (else ``$HYDRA_S3_ENDPOINT_URL``) points at an
    S3-compatible server; without either, boto3 itself honours
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` and the shared config.
    """
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise HydraError(f"S3 stores need boto3: `pip install 'hydra_cas[s3]'` ({exc})") from None
    endpoint = endpoint_url or os.environ.get(ENDPOINT_ENV) or None
    config = Config(
        max_pool_connections=max_pool,
        retries={"mode": "standard", "max_attempts": 5},
        connect_timeout=10,
        read_timeout=120,
    )
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint, config=config)


def backoff(attempt: int, base: float = 0.02, cap: float = 1.0) -> None:
    """Sleep a random time up to ``base * 2**attempt`` (at most ``cap``): full jitter."""
    time.sleep(random.uniform(0, min(cap, base * (2 ** min(attempt, 16)))))


@dataclass(frozen=True, slots=True)
class Listed:
    """A key as a listing or HEAD reports it (``rel`` is relative to the store prefix)."""

    rel: str
    size: int
    etag: str
    modified: float  # seconds since the epoch, server clock


@dataclass(frozen=True, slots=True)
class Fetched:
    """The bytes of a GET and what the server said about them."""

    data: bytes
    etag: str
    modified: float
    total: int  # the whole object's size (differs from len(data) for a range)
    server_now: float


@dataclass(frozen=True, slots=True)
class Upload:
    """An unfinished multipart upload."""

    rel: str
    upload_id: str
    initiated: float


def _status(exc: BaseException) -> tuple[int | None, str]:
    response = getattr(exc, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = str(response.get("Error", {}).get("Code", ""))
    return status, code


def _is_conflict(exc: BaseException) -> bool:
    status, code = _status(exc)
    return status in (409, 412) or code in _CONFLICT_CODES


def _is_missing(exc: BaseException) -> bool:
    status, code = _status(exc)
    return code != "NoSuchBucket" and (status == 404 or code in _MISSING_CODES)


def _server_time(response: dict[str, Any]) -> float:
    header = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if header:
        try:
            return parsedate_to_datetime(header).timestamp()
        except (TypeError, ValueError):
            pass
    return time.time()


def _etag(value: Any) -> str:
    return str(value or "")


class Bucket:
    """One store's view of a bucket: keys under ``prefix``, conditional writes, transfers.

    ``workers`` threads move the parts of large objects in parallel, in pieces
    of ``part_size`` bytes; objects up to ``multipart_threshold`` bytes go in one
    request.  ``bytes_sent`` and ``objects_sent`` count the payloads this bucket
    created (a dedup hit sends nothing and counts nothing).
    """

    def __init__(
        self,
        client: Any,
        name: str,
        prefix: str,
        *,
        single_writer: bool = False,
        workers: int = 10,
        part_size: int = 8 * MiB,
        multipart_threshold: int = 16 * MiB,
    ) -> None:
        if part_size < _MIN_PART:
            raise HydraError(f"part_size must be at least {_MIN_PART} bytes (S3's minimum), got {part_size}")
        self.client = client
        self.name = name
        self.prefix = prefix
        self.single_writer = single_writer
        self.workers = max(1, workers)
        self.part_size = part_size
        self.multipart_threshold = max(multipart_threshold, part_size)
        self.bytes_sent = 0
        self.objects_sent = 0
        self._stats_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._conditional: bool | None = None
        self._probe_lock = threading.Lock()

    # -- names

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def rel(self, key: str) -> str:
        return key[len(self.prefix) + 1 :] if self.prefix else key

    def rel_of_url(self, url: str) -> str:
        """The relative key of a URL made by :meth:`url`."""
        return self.rel(url[len(f"s3://{self.name}/"):])

    def url(self, rel: str = "") -> str:
        path = self.key(rel) if rel else self.prefix
        return f"s3://{self.name}/{path}" if path else f"s3://{self.name}"

    # -- errors

    def _fail(self, exc: BaseException, what: str) -> HydraError:
        """A HydraError, with a hint, for a request that failed for good."""
        status, code = _status(exc)
        where = self.url()
        if code == "NoSuchBucket":
            return self._no_bucket()
        if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(
                f"{what}: access denied by the server ({code or status}); check the credentials and "
                "permissions in your AWS configuration (AWS_PROFILE, AWS_ACCESS_KEY_ID, ...)",
                path=where,
            )
        name = type(exc).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            return StorageError(
                f"{what}: no AWS credentials found; configure them the standard way (AWS_PROFILE, "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws/credentials or an instance role)",
                path=where,
            )
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                    "ReadTimeoutError"):
            return StorageError(
                f"{what}: cannot reach the S3 endpoint ({exc}); check the network and "
                f"{ENDPOINT_ENV} / AWS_ENDPOINT_URL",
                path=where,
            )
        message = getattr(exc, "response", {}).get("Error", {}).get("Message", exc)
        detail = f"{code or status or name}: {message}"
        return StorageError(f"{what} failed ({detail})", path=where)

    def _no_bucket(self) -> NotFoundError:
        return NotFoundError(
            f"bucket {self.name!r} does not exist (for {self.url()}); create it first (e.g. `aws s3 mb "
            f"s3://{self.name}`) or check the URL and the endpoint"
        )

    @staticmethod
    def _client_errors() -> tuple[type[BaseException], ...]:
        from botocore.exceptions import BotoCoreError, ClientError

        return (ClientError, BotoCoreError)

    # -- conditional-write gate

    @property
    def conditional_writes(self) -> bool | None:
        """Whether the server honours conditional writes (None: not probed yet, or unknown)."""
        return self._conditional

    def require_conditional(self) -> None:
        """Probe once; refuse writes when the server ignores conditional headers.

        Called before every write.  A refused probe (read-only credentials)
        leaves the answer unknown and lets the write itself report the error.
        """
        if self._conditional is None:
            with self._probe_lock:
                if self._conditional is None:
                    self._conditional = self._cached_probe()
        if self._conditional is False and not self.single_writer:
            raise ConditionalWritesError(
                f"the server behind {self.url()} ignores conditional writes (If-None-Match / If-Match), "
                "so concurrent writers could silently lose each other's updates; writes are refused. "
                "Upgrade the server (S3, MinIO, R2 and Ceph RGW support them), or, if you are sure only "
                f"one process writes to this store, open it with single_writer=True (CLI: "
                f"{SINGLE_WRITER_ENV}=1)"
            )

    def _cached_probe(self) -> bool | None:
        with _PROBED_LOCK:
            try:
                known = _PROBED.get(self.client, {}).get(self.name)
            except TypeError:  # a client that cannot be weakly referenced
                known = None
        if known is not None:
            return known
        verdict = self._probe()
        if verdict is not None:
            with _PROBED_LOCK:
                try:
                    _PROBED.setdefault(self.client, {})[self.name] = verdict
                except TypeError:
                    pass
        return verdict

    def _probe(self) -> bool | None:
        from hydra_cas.fsio import unique_token

        rel = f"probe/{unique_token()}"
        key = self.key(rel)
        errors = self._client_errors()
        try:
            try:
                self.client.put_object(Bucket=self.name, Key=key, Body=b"probe", IfNoneMatch="*")
            except errors as exc:
                status, code = _status(exc)
                if status in (400, 501) or code in ("NotImplemented", "InvalidArgument"):
                    logger.warning("%s rejects If-None-Match (%s); conditional writes unsupported",
                                   self.url(), code or status)
                    return False
                logger.debug("conditional-write probe of %s could not write (%s); result unknown",
                             self.url(), code or status)
                return None
            verdicts = []
            for condition in ({"IfNoneMatch": "*"}, {"IfMatch": '"0123456789abcdef0123456789abcdef"'}):
                try:
                    self.client.put_object(Bucket=self.name, Key=key, Body=b"probe", **condition)
                    verdicts.append(False)
                except errors as exc:
                    verdicts.append(_is_conflict(exc))
            ok = all(verdicts)
            if not ok:
                logger.warning("%s ignores conditional writes (probe key %s was overwritten)",
                               self.url(), rel)
            return ok
        finally:
            try:
                self.client.delete_object(Bucket=self.name, Key=key)
            except errors:
                logger.debug("could not delete probe key %s", rel)

    # -- small requests

    def head(self, rel: str) -> Listed | None:
        try:
            r = self.client.head_object(Bucket=self.name, Key=self.key(rel))
        except self._client_errors() as exc:
            if _is_missing(exc):
                return None
            raise self._fail(exc, f"reading {self.url(rel)}") from exc
        return Listed(rel, int(r["ContentLength"]), _etag(r.get("ETag")), r["LastModified"].timestamp())

    def get(
        self,
        rel: str,
        *,
        if_none_match: str | None = None,
        first: int | None = None,
        limit: int | None = None,
    ) -> Fetched | None:
        """The key's bytes (the first ``first`` bytes only, if given), or None if it is absent.

        With ``if_none_match`` an unchanged key returns :data:`NOT_MODIFIED`.
        ``limit`` refuses (IntegrityError) a key larger than that many bytes.
        """
        kwargs: dict[str, Any] = {}
        if if_none_match:
            kwargs["IfNoneMatch"] = if_none_match
        if first is not None:
            kwargs["Range"] = f"bytes=0-{max(first, 1) - 1}"
        try:
            r = self.client.get_object(Bucket=self.name, Key=self.key(rel), **kwargs)
        except self._client_errors() as exc:
            status, code = _status(exc)
            if status == 304 or code in ("304", "NotModified"):
                return NOT_MODIFIED
            if _is_missing(exc):
                return None
            if code == "InvalidRange":  # a range of an empty key
                return Fetched(b"", "", time.time(), 0, time.time())
            raise self._fail(exc, f"reading {self.url(rel)}") from exc
        total = _total_size(r)
        if limit is not None and total > limit:
            r["Body"].close()
            raise IntegrityError(f"{self.url(rel)} is {total} bytes, more than the {limit} expected")
        try:
            data = r["Body"].read()
        except self._client_errors() as exc:
            raise self._fail(exc, f"reading {self.url(rel)}") from exc
        return Fetched(data, _etag(r.get("ETag")), r["LastModified"].timestamp(), total, _server_time(r))

    def put_new(self, rel: str, body: bytes) -> str | None:
        """Create ``rel`` only if absent; its ETag, or None if it already existed."""
        return self._put(rel, body, {"IfNoneMatch": "*"})

    def put_replace(self, rel: str, body: bytes, etag: str) -> str | None:
        """Replace ``rel`` only if its ETag is still ``etag``; the new ETag, or None if it changed or went."""
        return self._put(rel, body, {"IfMatch": etag})

    def put(self, rel: str, body: bytes) -> str:
        """Write ``rel`` unconditionally (only for keys no other writer uses)."""
        etag = self._put(rel, body, {})
        assert etag is not None
        return etag

    def _put(self, rel: str, body: bytes, condition: dict[str, str]) -> str | None:
        self.require_conditional()
        for attempt in range(6):
            try:
                r = self.client.put_object(Bucket=self.name, Key=self.key(rel), Body=body, **condition)
                return _etag(r.get("ETag"))
            except self._client_errors() as exc:
                status, _ = _status(exc)
                if status == 409 and attempt < 5:
                    # Another conditional write to this key is in flight: wait, then ask again.
                    backoff(attempt)
                    continue
                if _is_conflict(exc) or (_is_missing(exc) and "IfMatch" in condition):
                    return None
                raise self._fail(exc, f"writing {self.url(rel)}") from exc
        return None  # unreachable: the loop returns or raises

    def delete(self, rel: str) -> None:
        try:
            self.client.delete_object(Bucket=self.name, Key=self.key(rel))
        except self._client_errors() as exc:
            if _is_missing(exc):
                return
            raise self._fail(exc, f"deleting {self.url(rel)}") from exc

    def delete_if(self, rel: str, etag: str) -> bool:
        """Delete ``rel`` if its ETag is still ``etag``; False if it changed.

        Servers without conditional deletes get a HEAD and a plain delete.
        """
        try:
            self.client.delete_object(Bucket=self.name, Key=self.key(rel), IfMatch=etag)
            return True
        except self._client_errors() as exc:
            if _is_missing(exc):
                return True
            if _is_conflict(exc):
                return False
            status, _ = _status(exc)
            if status not in (400, 501):
                raise self._fail(exc, f"deleting {self.url(rel)}") from exc
        current = self.head(rel)
        if current is not None and current.etag != etag:
            return False
        self.delete(rel)
        return True

    def delete_many(self, rels: list[str]) -> list[str]:
        """Delete up to 1000 keys in one request; the ones the server reports deleted."""
        if not rels:
            return []
        try:
            r = self.client.delete_objects(
                Bucket=self.name,
                Delete={"Objects": [{"Key": self.key(rel)} for rel in rels], "Quiet": False},
            )
        except self._client_errors() as exc:
            raise self._fail(exc, f"deleting {len(rels)} keys under {self.url()}") from exc
        for err in r.get("Errors", []):
            logger.warning("could not delete %s: %s", err.get("Key"), err.get("Message"))
        return [self.rel(d["Key"]) for d in r.get("Deleted", [])]

    def copy(self, src_rel: str, dst_rel: str) -> None:
        """Server-side copy (multipart for large keys)."""
        try:
            self.client.copy({"Bucket": self.name, "Key": self.key(src_rel)}, self.name, self.key(dst_rel))
        except self._client_errors() as exc:
            raise self._fail(exc, f"copying {self.url(src_rel)} to {self.url(dst_rel)}") from exc

    def listing(self, rel_prefix: str) -> tuple[list[Listed], float]:
        """Every key under ``rel_prefix``, and the server's clock at the first page."""
        out: list[Listed] = []
        now: float | None = None
        kwargs: dict[str, Any] = {"Bucket": self.name, "Prefix": self.key(rel_prefix)}
        try:
            while True:
                r = self.client.list_objects_v2(**kwargs)
                if now is None:
                    now = _server_time(r)
                for item in r.get("Contents", []):
                    out.append(Listed(self.rel(item["Key"]), int(item["Size"]), _etag(item.get("ETag")),
                                      item["LastModified"].timestamp()))
                if not r.get("IsTruncated"):
                    break
                kwargs["ContinuationToken"] = r["NextContinuationToken"]
        except self._client_errors() as exc:
            raise self._fail(exc, f"listing {self.url(rel_prefix)}") from exc
        return out, now if now is not None else time.time()

    def uploads(self, rel_prefix: str) -> list[Upload]:
        """Unfinished multipart uploads under ``rel_prefix``."""
        out: list[Upload] = []
        kwargs: dict[str, Any] = {"Bucket": self.name, "Prefix": self.key(rel_prefix)}
        try:
            while True:
                r = self.client.list_multipart_uploads(**kwargs)
                for item in r.get("Uploads", []):
                    out.append(Upload(self.rel(item["Key"]), item["UploadId"], item["Initiated"].timestamp()))
                if not r.get("IsTruncated"):
                    break
                kwargs["KeyMarker"] = r.get("NextKeyMarker")
                kwargs["UploadIdMarker"] = r.get("NextUploadIdMarker")
        except self._client_errors() as exc:
            raise self._fail(exc, f"listing uploads under {self.url(rel_prefix)}") from exc
        return out

    def abort(self, rel: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.name, Key=self.key(rel), UploadId=upload_id)
        except self._client_errors() as exc:
            if not _is_missing(exc):
                logger.warning("could not abort upload %s of %s: %s", upload_id, self.url(rel), exc)

    def exists(self) -> None:
        """Raise NotFoundError (with a fix) when the bucket does not exist."""
        try:
            self.client.head_bucket(Bucket=self.name)
        except self._client_errors() as exc:
            status, code = _status(exc)
            if status == 404 or code in ("NoSuchBucket", "404"):
                raise self._no_bucket() from None
            raise self._fail(exc, f"opening {self.url()}") from exc

    # -- transfers

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="hydra-s3")
            return self._pool

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def _count(self, nbytes: int, objects: int = 0) -> None:
        with self._stats_lock:
            self.bytes_sent += nbytes
            self.objects_sent += objects

    def part_size_for(self, size: int) -> int:
        """Parts big enough that ``size`` bytes fit in S3's 10,000 parts."""
        need = -(-size // (_MAX_PARTS - 1))
        return max(self.part_size, -(-need // MiB) * MiB)

    def upload(
        self,
        rel: str,
        chunks: Iterable[bytes | bytearray | memoryview],
        *,
        size: int,
        sha256: str | None = None,
        replace_etag: str | None = None,
    ) -> bool:
        """Create ``rel`` from ``chunks`` (``size`` bytes) unless it exists; True if this call created it.

        With ``sha256`` the bytes are hashed on the way and the key becomes
        visible only if they match: a single PUT is hashed before it is sent,
        a multipart upload is completed only after its last part is hashed.
        ``replace_etag`` replaces a damaged key of that ETag instead.
        """
        self.require_conditional()
        condition = {"IfMatch": replace_etag} if replace_etag else {"IfNoneMatch": "*"}
        if size <= self.multipart_threshold:
            data = b"".join(chunks)
            _check_received(self.url(rel), data, size, sha256)
            created = self._put(rel, data, condition) is not None
            if created:
                self._count(len(data), 1)
            return created
        return self._multipart(rel, chunks, size, sha256, condition)

    def _multipart(
        self,
        rel: str,
        chunks: Iterable[bytes | bytearray | memoryview],
        size: int,
        sha256: str | None,
        condition: dict[str, str],
    ) -> bool:
        key = self.key(rel)
        errors = self._client_errors()
        try:
            upload_id = self.client.create_multipart_upload(Bucket=self.name, Key=key)["UploadId"]
        except errors as exc:
            raise self._fail(exc, f"starting an upload of {self.url(rel)}") from exc
        pool = self._executor()
        hasher = hashlib.sha256() if sha256 else None
        inflight: deque[Future[dict[str, Any]]] = deque()
        parts: list[dict[str, Any]] = []
        sent = 0
        done = False
        try:
            for number, part in enumerate(_split(chunks, self.part_size_for(size)), 1):
                sent += len(part)
                if sent > size:
                    raise IntegrityError(f"upload of {self.url(rel)}: more than the expected {size} bytes")
                if hasher is not None:
                    hasher.update(part)
                inflight.append(pool.submit(self._upload_part, key, upload_id, number, part))
                while len(inflight) > self.workers:
                    parts.append(inflight.popleft().result())
            while inflight:
                parts.append(inflight.popleft().result())
            _check_digest(self.url(rel), sent, size, hasher.hexdigest() if hasher else None, sha256)
            try:
                self.client.complete_multipart_upload(
                    Bucket=self.name, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts},
                    **condition,
                )
            except errors as exc:
                if _is_conflict(exc) or (_is_missing(exc) and "IfMatch" in condition):
                    logger.debug("upload of %s: already there (%s)", rel, _status(exc)[1])
                    return False
                raise self._fail(exc, f"completing the upload of {self.url(rel)}") from exc
            done = True
            self._count(sent, 1)
            return True
        finally:
            if not done:
                # No part may still be on its way once the upload is aborted.
                for future in inflight:
                    future.cancel()
                futures_wait(inflight)
                self.abort(rel, upload_id)

    def _upload_part(self, key: str, upload_id: str, number: int, data: bytes | bytearray) -> dict[str, Any]:
        try:
            r = self.client.upload_part(
                Bucket=self.name, Key=key, UploadId=upload_id, PartNumber=number, Body=data
            )
        except self._client_errors() as exc:
            raise self._fail(exc, f"uploading part {number} of s3://{self.name}/{key}") from exc
        return {"ETag": r["ETag"], "PartNumber": number}

    def iter_ranges(self, rel: str, size: int) -> Iterator[bytes]:
        """The bytes of ``rel`` in order, fetched ``workers`` ranges at a time.

        Raises FileNotFoundError if the key is absent and IntegrityError if it
        does not hold exactly ``size`` bytes or is replaced while being read.
        """
        step = self.part_size
        first = self._get_range(rel, 0, min(size, step), None)
        if first.total != size:
            raise IntegrityError(
                f"object {self.url(rel)} has {first.total} bytes, the manifest records {size}: "
                "it is truncated or damaged",
                expected=str(size),
                actual=str(first.total),
            )
        yield first.data
        offsets = range(len(first.data), size, step)
        if not offsets:
            return
        pool = self._executor()
        pending: deque[Future[Fetched]] = deque()
        todo = iter(offsets)
        try:
            def fetch(offset: int) -> Future[Fetched]:
                return pool.submit(self._get_range, rel, offset, min(step, size - offset), first.etag)

            for offset in todo:
                pending.append(fetch(offset))
                if len(pending) >= self.workers:
                    break
            while pending:
                chunk = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(fetch(nxt))
                yield chunk.data
        finally:
            for future in pending:
                future.cancel()

    def _get_range(self, rel: str, offset: int, length: int, etag: str | None) -> Fetched:
        kwargs: dict[str, Any] = {}
        if length > 0:
            kwargs["Range"] = f"bytes={offset}-{offset + length - 1}"
        if etag:
            kwargs["IfMatch"] = etag
        try:
            r = self.client.get_object(Bucket=self.name, Key=self.key(rel), **kwargs)
            data = r["Body"].read()
        except self._client_errors() as exc:
            if _is_missing(exc):
                raise FileNotFoundError(self.url(rel)) from None
            if _status(exc)[1] == "InvalidRange":
                return Fetched(b"", "", 0.0, 0, 0.0)
            if etag and _is_conflict(exc):
                raise IntegrityError(f"{self.url(rel)} was replaced while being read; retry") from None
            raise self._fail(exc, f"reading {self.url(rel)}") from exc
        if len(data) != length and length > 0 and offset > 0:
            raise IntegrityError(f"{self.url(rel)}: short read at offset {offset}")
        return Fetched(data, _etag(r.get("ETag")), r["LastModified"].timestamp(), _total_size(r), 0.0)


def _total_size(response: dict[str, Any]) -> int:
    content_range = response.get("ContentRange")
    if content_range and "/" in content_range:
        return int(content_range.rsplit("/", 1)[1])
    return int(response.get("ContentLength", 0))


def _split(chunks: Iterable[bytes | bytearray | memoryview], part_size: int) -> Iterator[bytes | bytearray]:
    """Re-cut ``chunks`` into parts of exactly ``part_size`` bytes (the last may be shorter)."""
    buf = bytearray()
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        if not buf and len(view) == part_size:
            yield bytes(view) if not isinstance(chunk, (bytes, bytearray)) else chunk
            continue
        while view:
            take = min(part_size - len(buf), len(view))
            buf += view[:take]
            view = view[take:]
            if len(buf) == part_size:
                yield buf
                buf = bytearray()
    if buf:
        yield buf


def _check_received(where: str, data: bytes, size: int, sha256: str | None) -> None:
    digest = hashlib.sha256(data).hexdigest() if sha256 else None
    _check_digest(where, len(data), size, digest, sha256)


def _check_digest(where: str, got_size: int, size: int, digest: str | None, sha256: str | None) -> None:
    if got_size != size:
        raise IntegrityError(f"upload of {where}: got {got_size} bytes, expected {size}",
                             expected=str(size), actual=str(got_size))
    if sha256 is not None and digest != sha256:
        raise IntegrityError(
            f"upload of {where}: the bytes hash to {digest}, not {sha256}; nothing was stored "
            "(the source is corrupt: run `hydra-cas fsck` on it)",
            oid=sha256, expected=sha256, actual=digest,
        )
