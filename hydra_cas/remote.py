"""Moving versions between stores: push, pull, and a local store as a verified cache of a remote one.

``push(store, remote, refs)`` copies versions from ``store`` to ``remote``;
``pull(store, remote, refs)`` copies them from ``remote`` into ``store``.
Either store may be a local directory or ``s3://bucket/prefix``.

- Only objects the destination lacks are sent (one HEAD or stat per object
  decides), so pushing versions that share payloads, or pushing again, sends
  each payload at most once.
- Every byte is verified on arrival: into S3 the upload is hashed on the way
  and becomes visible only if its SHA-256 equals the oid (a multipart upload
  is completed only then); into a local store the temp file is hashed while it
  is written and renamed into place only if it matches.
- Version records keep their metadata, ``created`` and ``parent``; they
  arrive in the hot tier (an archived source version is rebuilt and sent
  whole) with status ``ok``.  A version the destination already holds with
  the same oid is left alone, one it holds with other bytes is a conflict and
  nothing is copied.  Aliases whose target is copied (or already there) are
  set to the same version.
- All refs land in one commit at the end, after every object they need is in
  place.  An interrupted push leaves complete objects and no refs; running it
  again sends only the objects still missing (each object is created
  atomically, so none is ever half there) and commits.
  NOTE: a large object interrupted mid-upload is sent again from its start.

:func:`load_cached` loads a version of a remote store through a local one:
the first load pulls it (verified), later loads read the local copy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from packaging.version import Version

from hydra_cas import fsio
from hydra_cas.errors import IntegrityError, NotFoundError, StorageError, VersionExistsError
from hydra_cas.progress import progress_bar
from hydra_cas.refs import check_name, resolve_version

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping

    import numpy as np

    from hydra_cas.store import Store

__all__ = ["TransferResult", "load_cached", "pull", "push"]

logger = logging.getLogger(__name__)

_ATTEMPTS = 3
_CHUNK = 16 * 1024 * 1024


@dataclass(slots=True)
class TransferResult:
    """What a push or pull did."""

    source: str
    destination: str
    copied: list[str] = field(default_factory=list)
    """``name:version`` refs committed in the destination."""
    present: list[str] = field(default_factory=list)
    """Refs the destination already held with the same bytes."""
    skipped_broken: list[str] = field(default_factory=list)
    """Refs marked broken in the source (their bytes are lost there): not copied."""
    aliases: list[str] = field(default_factory=list)
    objects_sent: int = 0
    bytes_sent: int = 0
    objects_present: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "copied": self.copied,
            "present": self.present,
            "skipped_broken": self.skipped_broken,
            "aliases": self.aliases,
            "objects_sent": self.objects_sent,
            "bytes_sent": self.bytes_sent,
            "objects_present": self.objects_present,
            "seconds": round(self.seconds, 3),
        }

    def render(self) -> str:
        from hydra_cas.gc import human_bytes

        lines = [
            f"{self.source} -> {self.destination}: {len(self.copied)} version(s) copied, "
            f"{len(self.present)} already there; sent {self.objects_sent} object(s), "
            f"{human_bytes(self.bytes_sent)} ({self.objects_present} already there) in {self.seconds:.2f} s"
        ]
        lines += [f"  copied {ref}" for ref in self.copied]
        lines += [f"  alias {a}" for a in self.aliases]
        lines += [f"  skipped {ref}: marked broken in the source" for ref in self.skipped_broken]
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class _Item:
    name: str
    key: str
    entry: Mapping[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.key}"


class _Vanished(Exception):
    """Internal: objects disappeared (a concurrent gc) between their transfer and the commit."""

    def __init__(self, oids: set[str]) -> None:
        super().__init__(oids)
        self.oids = oids


def _same_version(versions: Mapping[str, Any], key: str) -> str | None:
    """The existing key equal to ``key`` under PEP 440 (``1.0`` == ``1.0.0``)."""
    if key in versions:
        return key
    wanted = Version(key)
    return next((v for v in versions if Version(v) == wanted), None)


def _select(doc: Mapping[str, Any], refs: Iterable[str] | None, where: str) -> list[_Item]:
    """The versions ``refs`` name (``NAME`` for all of a model, ``NAME:VERSION``; none: everything)."""
    models = doc["models"]
    chosen: dict[tuple[str, str], _Item] = {}
    wanted = list(refs or [])
    if not wanted:
        wanted = sorted(models)
    for ref in wanted:
        name, sep, version = ref.rpartition(":")
        if not sep:
            name, version = ref, ""
        name = check_name(name)
        model = models.get(name)
        if model is None:
            raise NotFoundError(f"no model named {name!r} in {where}")
        keys = sorted(model["versions"], key=Version) if not version else [
            resolve_version(name, version, model["versions"], model["aliases"])
        ]
        for key in keys:
            chosen[(name, key)] = _Item(name, key, model["versions"][key])
    return list(chosen.values())


def _chunks_of(src: Store, item: _Item) -> Iterator[bytes | bytearray]:
    """The payload of ``item`` in ``src``, streamed (archived versions are rebuilt)."""
    from hydra_cas.s3 import S3ObjectStore

    entry = item.entry
    if entry["tier"] == "archive":
        recipe = src.archive_tier.read_recipe(entry["oid"])
        yield from src.archive_tier.iter_payload(recipe, verify_tensors=False)
        return
    if isinstance(src.objects, S3ObjectStore):
        yield from src.objects.iter_chunks(entry["oid"], entry["size"])
        return
    path = src.objects.path(entry["oid"])
    try:
        with open(path, "rb") as f:
            while data := f.read(_CHUNK):
                yield data
    except FileNotFoundError:
        raise IntegrityError(
            f"object {entry['oid']} of {item.ref} is missing from {src.root}; run `hydra-cas fsck` there",
            ref=item.ref, oid=entry["oid"],
        ) from None


def _send(src: Store, dst: Store, item: _Item) -> bool:
    """Copy one payload into ``dst`` as its object, verified; True if it was created."""
    from hydra_cas.s3 import S3ObjectStore

    oid, size = item.entry["oid"], item.entry["size"]
    try:
        if isinstance(dst.objects, S3ObjectStore):
            if item.entry["tier"] == "hot" and not isinstance(src.objects, S3ObjectStore):
                return dst.objects.upload_file(oid, src.objects.path(oid), size)
            return dst.objects.upload(oid, _chunks_of(src, item), size)
        written = dst.objects.write_temp(_chunks_of(src, item))
        if written.oid != oid or written.size != size:
            fsio.discard(written.tmp or "")
            raise IntegrityError(
                f"{item.ref} arrived as {written.size} bytes hashing to {written.oid}, not {oid}; nothing "
                f"was stored (the copy in {src.root} is corrupt: run `hydra-cas fsck` there)",
                ref=item.ref, oid=oid, expected=oid, actual=written.oid,
            )
        return dst.objects.publish(written)
    except FileNotFoundError:
        raise IntegrityError(
            f"object {oid} of {item.ref} is missing from {src.root}; run `hydra-cas fsck` there",
            ref=item.ref, oid=oid,
        ) from None
    except IntegrityError as exc:
        if exc.ref is None:
            raise IntegrityError(f"copying {item.ref}: {exc}", ref=item.ref, oid=oid,
                                 expected=exc.expected, actual=exc.actual) from None
        raise


def _release(store: Store, intent: str) -> None:
    drop = getattr(store, "_drop_intent", None)
    if drop is not None:
        drop(intent)
    else:  # a Store without the hook: intents are files
        fsio.discard(intent)


def push(
    store: Store, remote: Store, refs: Iterable[str] | None = None, *, progress: bool = False
) -> TransferResult:
    """Copy versions of ``store`` (all, or those ``refs`` name) and their aliases to ``remote``."""
    return _transfer(store, remote, refs, progress)


def pull(
    store: Store, remote: Store, refs: Iterable[str] | None = None, *, progress: bool = False
) -> TransferResult:
    """Copy versions of ``remote`` (all, or those ``refs`` name) and their aliases into ``store``."""
    return _transfer(remote, store, refs, progress)


def _transfer(src: Store, dst: Store, refs: Iterable[str] | None, progress: bool) -> TransferResult:
    started = time.perf_counter()
    result = TransferResult(str(src.root), str(dst.root))
    src_doc = src.manifest.read()
    items = _select(src_doc, refs, str(src.root))
    result.skipped_broken = [i.ref for i in items if i.entry["status"] != "ok"]
    items = [i for i in items if i.entry["status"] == "ok"]
    todo = _check_conflicts(items, dst.manifest.read(), str(dst.root), result)
    by_oid: dict[str, _Item] = {}
    for item in todo:
        by_oid.setdefault(item.entry["oid"], item)
    intents: list[str] = []
    try:
        for oid in sorted(by_oid):
            intents.append(dst._add_intent(oid, None))
        missing = set(by_oid)
        for _ in range(_ATTEMPTS):
            _send_missing(src, dst, [by_oid[o] for o in sorted(missing)], result, progress)
            try:
                _commit(src_doc, dst, items, todo, result)
                break
            except _Vanished as exc:
                logger.warning("%d object(s) vanished from %s before the commit (concurrent gc); "
                               "sending again", len(exc.oids), dst.root)
                missing = exc.oids
        else:
            raise StorageError(f"could not commit to {dst.root}: a concurrent gc kept removing the objects "
                               "sent; retry")
    finally:
        for intent in intents:
            _release(dst, intent)
    result.seconds = time.perf_counter() - started
    logger.info("%s -> %s: %d versions copied, %d objects (%d bytes) sent", result.source, result.destination,
                len(result.copied), result.objects_sent, result.bytes_sent)
    return result


def _check_conflicts(
    items: list[_Item], dst_doc: Mapping[str, Any], where: str, result: TransferResult
) -> list[_Item]:
    """The items to copy; raise VersionExistsError (copying nothing) if any is held with other bytes."""
    todo: list[_Item] = []
    conflicts: list[str] = []
    for item in items:
        model = dst_doc["models"].get(item.name)
        existing = _same_version(model["versions"], item.key) if model else None
        if existing is None:
            todo.append(item)
            continue
        entry = model["versions"][existing]
        if entry["oid"] != item.entry["oid"]:
            conflicts.append(f"{item.ref} (object {item.entry['oid'][:12]} here, {entry['oid'][:12]} there)")
        elif entry["status"] != "ok":
            todo.append(item)  # the destination lost these bytes: send them again and mark it ok
        else:
            result.present.append(item.ref)
    if conflicts:
        raise VersionExistsError(
            f"{len(conflicts)} version(s) already exist in {where} with other weights: "
            f"{'; '.join(conflicts[:10])}{' ...' if len(conflicts) > 10 else ''}; versions are immutable, so "
            "nothing was copied: delete them there, or copy other versions"
        )
    return todo


def _send_missing(src: Store, dst: Store, items: list[_Item], result: TransferResult, progress: bool) -> None:
    need = []
    for item in items:
        if dst.objects.size_of(item.entry["oid"]) == item.entry["size"]:
            result.objects_present += 1
        else:
            need.append(item)
    with progress_bar(sum(i.entry["size"] for i in need), f"to {dst.root}", enabled=progress) as bar:
        for item in need:
            if _send(src, dst, item):
                result.objects_sent += 1
                result.bytes_sent += item.entry["size"]
            else:
                result.objects_present += 1
            bar.update(item.entry["size"])
            logger.debug("sent %s (%d bytes) to %s", item.entry["oid"], item.entry["size"], dst.root)


def _commit(
    src_doc: Mapping[str, Any], dst: Store, items: list[_Item], todo: list[_Item], result: TransferResult
) -> None:
    copied: list[str] = []
    aliased: list[str] = []

    def plan(doc: dict[str, Any]) -> list[dict[str, Any]]:
        copied.clear()
        aliased.clear()
        records: list[dict[str, Any]] = []
        vanished: set[str] = set()
        landed: dict[str, set[str]] = {}
        for item in todo:
            model = doc["models"].get(item.name)
            existing = _same_version(model["versions"], item.key) if model else None
            if existing is not None:
                entry = model["versions"][existing]
                if entry["oid"] != item.entry["oid"]:
                    raise VersionExistsError(
                        f"{item.ref} was created in {dst.root} with other weights while copying; nothing was "
                        "committed"
                    )
                if entry["status"] == "ok":
                    continue
            if dst.objects.size_of(item.entry["oid"]) != item.entry["size"]:
                vanished.add(item.entry["oid"])
                continue
            key = existing or item.key
            records.append({"op": "put", "name": item.name, "version": key,
                            "entry": {**item.entry, "tier": "hot", "status": "ok"}})
            landed.setdefault(item.name, set()).add(key)
            copied.append(f"{item.name}:{key}")
        if vanished:
            raise _Vanished(vanished)
        records += _alias_records(src_doc, doc, items, landed, aliased)
        return records

    dst.manifest.commit(plan)
    result.copied = copied
    result.aliases = aliased


def _alias_records(
    src_doc: Mapping[str, Any], doc: Mapping[str, Any], items: list[_Item], landed: dict[str, set[str]],
    aliased: list[str],
) -> list[dict[str, Any]]:
    """Alias records pointing the destination's aliases where the source's point, for copied versions."""
    records = []
    selected = {(i.name, i.key) for i in items}
    for name in sorted({i.name for i in items}):
        model = doc["models"].get(name)
        there = set(model["versions"]) if model else set()
        current = model["aliases"] if model else {}
        for alias, target in sorted(src_doc["models"][name]["aliases"].items()):
            if (name, target) not in selected:
                continue
            key = _same_version({v: None for v in there | landed.get(name, set())}, target)
            if key is None or current.get(alias) == key:
                continue
            records.append({"op": "alias", "name": name, "alias": alias, "version": key})
            aliased.append(f"{name}:{alias} -> {key}")
    return records


def load_cached(
    cache: Store,
    remote: Store,
    name: str,
    version: str = "latest",
    *,
    verify: str = "fast",
    mmap: bool = False,
) -> dict[str, np.ndarray]:
    """Load ``name:version`` of ``remote`` through the local store ``cache``.

    ``version`` (``latest``, an alias or a specifier) is resolved in the
    remote, then pulled into the cache unless it is already there, verified
    on arrival, and loaded from the cache with ``verify``.  The cache never
    serves other bytes than the remote's: an exact version is immutable, and a
    cached copy with another oid is refused (VersionExistsError).
    """
    key = remote.resolve(name, version)
    try:
        have = cache.info(name, key)
    except NotFoundError:
        have = None
    if have is None or have.status != "ok":
        pull(cache, remote, [f"{name}:{key}"])
    elif have.oid != remote.info(name, key).oid:
        raise VersionExistsError(
            f"{name}:{key} in the cache {cache.root} holds other weights than in {remote.root}; delete it "
            "from the cache"
        )
    return cache.load(name, key, verify=verify, mmap=mmap)
