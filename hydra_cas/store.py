"""``Store``: the public API of a hydra_cas store on a local disk."""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import stat
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3
import numpy as np
from packaging.version import Version

from hydra_cas import fsio
from hydra_cas.archive import Archive, ArchiveStats, load_parent_recipe
from hydra_cas.dtypes import numpy_dtype_for
from hydra_cas.errors import (
    HydraError,
    IntegrityError,
    InvalidArgumentError,
    InvalidNameError,
    InvalidSafetensorsError,
    InvalidVersionError,
    NotFoundError,
    RefInUseError,
    StorageError,
    VersionExistsError,
)
from hydra_cas.layout import Layout
from hydra_cas.manifest import ManifestStore, metadata_json, utc_now
from hydra_cas.objects import VERIFY_MODES, ObjectStore, Written, digest_stream
from hydra_cas.payload import build_header, iter_data, prepare, tensor_summary
from hydra_cas.records import ArchiveResult, LoadResult, SaveResult, VersionInfo
from hydra_cas.refs import canonical_version, check_alias, check_name, latest_of, resolve_version, shown
from hydra_cas.stheader import parse_header

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from hydra_cas.fsck import FsckReport
    from hydra_cas.gc import GcPlan
    from hydra_cas.stheader import Header

__all__ = ["Store", "DEFAULT_STORE"]

logger = logging.getLogger(__name__)

DEFAULT_STORE = "./hydra_models"
_COMMIT_ATTEMPTS = 3


class _ObjectVanished(Exception):
    """Internal: a concurrent gc removed the object between publish and commit."""


@dataclass(slots=True)
class _Pending:
    """One version of a save batch, validated, not yet written."""

    name: str
    key: str
    chunks: Callable[[], Iterable[memoryview | bytes]]
    summary: dict[str, Any]
    meta: dict[str, Any]
    parent: str | None
    parent_key: str | None = None


_ITEM_FIELDS = ("name", "version", "tensors", "metadata", "parent")


def _item_tuple(item: Any) -> tuple[Any, ...]:
    try:
        fields = tuple(item)
    except TypeError:
        fields = ()
    if not 3 <= len(fields) <= len(_ITEM_FIELDS):
        raise InvalidArgumentError(
            "save_many items are (name, version, tensors[, metadata[, parent]]) or dicts with those keys"
        )
    return fields


def _tensor_chunks(header: bytes, sources: list[Any]) -> Iterator[memoryview | bytes]:
    return itertools.chain((header,), iter_data(sources))


def _find_version(versions: Mapping[str, Any], key: str) -> str | None:
    """The existing version key equal to ``key`` under PEP 440 (``1.0`` == ``1.0.0``)."""
    if key in versions:
        return key
    wanted = Version(key)
    for existing in versions:
        if Version(existing) == wanted:
            return existing
    return None


class Store:
    """A versioned, content-addressed store of model weights in one directory.

    ``Store(path)`` opens the store at ``path``, creating it if needed (pass
    ``create=False`` to refuse).  ``durable=False`` skips fsync: several times
    faster saves, at the price of losing the latest commits if the machine (not
    just the process) crashes.  See docs/FORMAT.md for the layout.
    """

    def __new__(cls, root: str | os.PathLike[str] = DEFAULT_STORE, *args: Any, **kwargs: Any) -> Store:
        # Store("s3://bucket/prefix") opens the same store on S3-compatible storage.
        text = os.fspath(root)
        if cls is Store and text.startswith("s3://"):
            try:
                from hydra_cas.s3 import S3Store
            except ImportError as exc:
                raise HydraError(
                    f"store {text!r} needs the S3 backend: `pip install 'hydra_cas[s3]'` ({exc})"
                ) from None
            return super().__new__(S3Store)
        return super().__new__(cls)

    def __init__(
        self,
        root: str | os.PathLike[str] = DEFAULT_STORE,
        *,
        create: bool = True,
        durable: bool = True,
        lock_timeout: float = 60.0,
    ) -> None:
        text = os.fspath(root)
        if "://" in text:
            raise HydraError(
                f"store {text!r}: only local directories and s3://bucket/prefix URLs are supported"
            )
        self.root = Path(text).absolute()
        self.durable = durable
        self.layout = Layout(self.root)
        if not self.root.is_dir():
            if self.root.exists():
                raise StorageError(
                    f"store path {self.root} exists and is not a directory", path=str(self.root)
                )
            if not create:
                raise NotFoundError(
                    f"no store at {self.root}; save a model first or pass --store/HYDRA_STORE"
                )
            fsio.makedirs(self.root)
        for sub in (self.layout.objects, self.layout.tmp, self.layout.intents):
            if not sub.is_dir():
                if not create:
                    break
                fsio.makedirs(sub)
        self.objects = ObjectStore(self.layout, durable=durable)
        self.archive_tier = Archive(self.layout, durable=durable)
        self.manifest = ManifestStore(self.layout, durable=durable, lock_timeout=lock_timeout)

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # ------------------------------------------------------------------ saving

    def save(
        self,
        name: str,
        version: str,
        tensors: Mapping[str, Any],
        metadata: Mapping[str, Any] | None = None,
        parent: str | None = None,
    ) -> SaveResult:
        """Save ``tensors`` as ``name:version``; return what was done.

        Raises VersionExistsError if ``name:version`` already holds other bytes
        (saving the same bytes again is a no-op), and InvalidNameError,
        InvalidVersionError, InvalidTensorError or InvalidMetadataError for bad
        input, before anything is written.
        """
        name = check_name(name)
        key = canonical_version(version)
        meta = metadata_json(metadata)
        sources = prepare(tensors)
        header = build_header(sources)
        summary = tensor_summary(sources)

        return self._save_stream(
            name, key, functools.partial(_tensor_chunks, header, sources), summary, meta, parent
        )

    def import_file(
        self,
        path: str | os.PathLike[str],
        name: str,
        version: str,
        metadata: Mapping[str, Any] | None = None,
        parent: str | None = None,
        *,
        progress: bool = False,
    ) -> SaveResult:
        """Store a ``.safetensors`` file byte for byte (its oid is the file's SHA-256).

        The header is validated before anything is written and the file is
        streamed, never loaded whole.  ``.npz`` archives are loaded (without
        pickle) and saved as tensors.
        """
        from hydra_cas.stheader import validate_file

        name = check_name(name)
        key = canonical_version(version)
        meta = metadata_json(metadata)
        source = Path(path)
        if source.suffix == ".npz":
            return self.save(name, key, _read_npz(source), meta, parent)
        try:
            if not stat.S_ISREG(os.stat(source).st_mode):
                # A FIFO or device would block or never end: only regular files are payloads.
                raise InvalidSafetensorsError(f"{source} is not a regular file; give a .safetensors file")
            info = validate_file(source)
        except OSError as exc:
            raise StorageError(
                f"cannot read {source}: {exc.strerror or exc}", errno=exc.errno, path=str(source)
            ) from None
        summary = {
            "tensors": len(info.tensors),
            "parameters": info.parameter_count,
            "dtypes": info.dtypes,
        }
        expected = info.data_start + info.data_len

        def chunks() -> Iterator[bytes]:
            return _read_chunks(source, expected, progress=progress, desc=f"import {source.name}")

        return self._save_stream(name, key, chunks, summary, meta, parent)

    def save_many(self, items: Iterable[Mapping[str, Any] | tuple[Any, ...]]) -> list[SaveResult]:
        """Save several versions in one manifest transaction: all of them or none.

        Each item is ``(name, version, tensors[, metadata[, parent]])`` or a dict
        with those keys.  Much faster than separate saves for many small
        versions, because the manifest is rewritten once.  A parent may be an
        earlier item of the same batch.
        """
        pending: list[_Pending] = []
        try:
            items = list(items)
        except TypeError:
            raise InvalidArgumentError(
                f"save_many takes an iterable of items, got {type(items).__name__}"
            ) from None
        for item in items:
            fields = (
                dict(item)
                if isinstance(item, Mapping)
                else dict(zip(_ITEM_FIELDS, _item_tuple(item), strict=False))
            )
            name = check_name(fields.get("name"))
            key = canonical_version(fields.get("version"))
            meta = metadata_json(fields.get("metadata"))
            sources = prepare(fields.get("tensors"))
            header = build_header(sources)
            pending.append(
                _Pending(
                    name,
                    key,
                    functools.partial(_tensor_chunks, header, sources),
                    tensor_summary(sources),
                    meta,
                    fields.get("parent"),
                )
            )
        return self._save_batch(pending)

    def _save_stream(
        self,
        name: str,
        key: str,
        chunks: Callable[[], Iterable[memoryview | bytes]],
        summary: dict[str, Any],
        meta: dict[str, Any],
        parent: str | None,
    ) -> SaveResult:
        return self._save_batch([_Pending(name, key, chunks, summary, meta, parent)])[0]

    def _save_batch(self, pending: list[_Pending]) -> list[SaveResult]:
        doc = self.manifest.read()
        seen: set[tuple[str, str]] = set()
        for p in pending:
            if (p.name, p.key) in seen:
                raise VersionExistsError(f"{p.name}:{p.key} appears twice in one batch")
            seen.add((p.name, p.key))
            p.parent_key = self._resolve_parent(p.name, doc["models"].get(p.name), p.parent, seen)
        results: dict[int, SaveResult] = {}
        to_write: list[int] = []
        for i, p in enumerate(pending):
            model = doc["models"].get(p.name)
            existing = _find_version(model["versions"], p.key) if model else None
            if existing is None:
                to_write.append(i)
                continue
            # Decide immutability by hashing alone: a refused save writes nothing.
            entry = model["versions"][existing]
            if entry["status"] == "broken":
                # Saving the lost bytes again is how a user heals a broken version.
                to_write.append(i)
                continue
            oid, _, size = digest_stream(p.chunks())
            results[i] = self._same_or_conflict(p.name, existing, entry, oid, size)
        if not to_write:
            return [results[i] for i in range(len(pending))]

        for _ in range(_COMMIT_ATTEMPTS):
            intents: list[str] = []
            written: dict[int, tuple[Written, bool]] = {}
            try:
                for i in to_write:
                    w = self.objects.write_temp(pending[i].chunks())
                    intents.append(self._add_intent(w.oid, w.tmp))
                    written[i] = (w, self._publish(w))
                results.update(self._commit_puts(pending, written))
            except _ObjectVanished:
                logger.warning(
                    "an object vanished before its ref was committed (concurrent gc); writing again"
                )
                continue
            finally:
                for intent in intents:
                    self._drop_intent(intent)
            for i in to_write:
                r = results[i]
                logger.info(
                    "saved %s as %s (%d bytes%s)",
                    r.ref,
                    r.oid,
                    r.size,
                    ", deduplicated" if r.deduplicated else "",
                )
            return [results[i] for i in range(len(pending))]
        raise StorageError(
            f"could not commit {len(to_write)} version(s): their objects were removed {_COMMIT_ATTEMPTS} "
            "times in a row by a concurrent gc; retry"
        )

    def _commit_puts(
        self, pending: list[_Pending], written: dict[int, tuple[Written, bool]]
    ) -> dict[int, SaveResult]:
        now = utc_now()
        outcome: dict[int, SaveResult] = {}

        def plan(doc: dict[str, Any]) -> list[dict[str, Any]]:
            outcome.clear()
            records = []
            for i, (w, created) in written.items():
                p = pending[i]
                model = doc["models"].get(p.name)
                versions = model["versions"] if model else {}
                same = _find_version(versions, p.key)
                healing = (
                    same is not None
                    and versions[same]["status"] == "broken"
                    and versions[same]["oid"] == w.oid
                )
                if same is not None and not healing:
                    outcome[i] = self._same_or_conflict(p.name, same, versions[same], w.oid, w.size)
                    continue
                # gc deletes only under this lock, so an object seen here stays.
                if self.objects.size_of(w.oid) != w.size:
                    raise _ObjectVanished
                if healing:
                    assert same is not None
                    outcome[i] = SaveResult(p.name, same, w.oid, w.size, deduplicated=not created)
                    records.append(
                        {
                            "op": "put",
                            "name": p.name,
                            "version": same,
                            "entry": {**versions[same], "status": "ok"},
                        }
                    )
                    continue
                entry = {
                    "oid": w.oid,
                    "blake3": w.blake3,
                    "size": w.size,
                    **p.summary,
                    "created": now,
                    "metadata": p.meta,
                    "tier": "hot",
                    "parent": p.parent_key,
                    "status": "ok",
                }
                outcome[i] = SaveResult(p.name, p.key, w.oid, w.size, deduplicated=not created)
                records.append({"op": "put", "name": p.name, "version": p.key, "entry": entry})
            return records

        self.manifest.commit(plan)
        return outcome

    def _resolve_parent(
        self, name: str, model: dict[str, Any] | None, parent: str | None, batch: set[tuple[str, str]]
    ) -> str | None:
        if parent is None:
            return None
        if not isinstance(parent, str):
            raise InvalidVersionError(f"parent must be a version string, got {type(parent).__name__}")
        try:
            if (name, canonical_version(parent)) in batch:
                return canonical_version(parent)
        except InvalidVersionError:
            pass  # not a plain version: an alias, 'latest' or a specifier
        if model is None:
            raise NotFoundError(f"parent {name}:{parent} not found: model {name!r} has no versions yet")
        return resolve_version(name, parent, model["versions"], model["aliases"])

    def _same_or_conflict(
        self, name: str, key: str, entry: dict[str, Any], oid: str, size: int
    ) -> SaveResult:
        if entry["oid"] != oid:
            raise VersionExistsError(
                f"{name}:{key} already exists with different weights (object {entry['oid'][:12]}); "
                "versions are immutable: save under a new version, or delete this one first"
            )
        logger.info("%s:%s already holds these bytes; nothing to do", name, key)
        return SaveResult(name, key, oid, size, deduplicated=True, unchanged=True)

    def _add_intent(self, oid: str, tmp: str | None) -> str:
        """Announce that a save is about to reference ``oid`` (gc keeps it).

        On failure the caller's temp file is removed too: gc never touches a
        live process's temp files, so a leak here would last as long as the
        process, and disk-full is exactly when saves fail.
        """
        path = None
        try:
            fsio.makedirs(self.layout.intents)
            fd, path = fsio.create_temp(self.layout.intents, "")
            os.close(fd)
            final = os.path.join(self.layout.intents, f"{oid}.{os.path.basename(path)}")
            fsio.replace(path, final)
        except BaseException:
            if path is not None:
                fsio.discard(path)
            if tmp is not None:
                fsio.discard(tmp)
            raise
        return final

    def _drop_intent(self, intent: str) -> None:
        """Remove an intent made by :meth:`_add_intent` (a backend without files overrides both)."""
        fsio.discard(intent)

    def _publish(self, written: Written) -> bool:
        """ObjectStore.publish, removing the temp file if publishing fails."""
        try:
            return self.objects.publish(written)
        except BaseException:
            if written.tmp is not None:
                fsio.discard(written.tmp)
            raise

    # ------------------------------------------------------------------ resolving

    def _lookup(
        self, name: str, version: str, doc: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        name = check_name(name)
        doc = doc if doc is not None else self.manifest.read()
        model = doc["models"].get(name)
        if model is None:
            raise NotFoundError(f"no model named {name!r} in {self.root}{_suggest(name, doc['models'])}")
        key = resolve_version(name, version, model["versions"], model["aliases"])
        return key, model["versions"][key]

    def resolve(self, name: str, version: str = "latest") -> str:
        """The concrete version ``version`` (``latest``, a specifier or alias) means now."""
        return self._lookup(name, version)[0]

    def info(self, name: str, version: str = "latest") -> VersionInfo:
        doc = self.manifest.read()
        key, entry = self._lookup(name, version, doc)
        model = doc["models"][name]
        aliases = tuple(sorted(a for a, v in model["aliases"].items() if v == key))
        return VersionInfo.from_entry(name, key, entry, aliases, latest_of(model["versions"]) == key)

    def list(self, name: str | None = None) -> list[VersionInfo]:
        """Every version (of one model, if ``name`` is given), by name then version."""
        doc = self.manifest.read()
        models = doc["models"]
        if name is not None:
            check_name(name)
            if name not in models:
                raise NotFoundError(f"no model named {name!r} in {self.root}{_suggest(name, models)}")
            names = [name]
        else:
            names = sorted(models)
        result = []
        for model_name in names:
            model = models[model_name]
            by_version: dict[str, list[str]] = {}
            for alias, target in model["aliases"].items():
                by_version.setdefault(target, []).append(alias)
            ordered = sorted(model["versions"], key=Version)
            latest = latest_of(ordered)
            for key in ordered:
                result.append(
                    VersionInfo.from_entry(
                        model_name,
                        key,
                        model["versions"][key],
                        tuple(sorted(by_version.get(key, ()))),
                        key == latest,
                    )
                )
        return result

    def models(self) -> list[str]:
        return sorted(self.manifest.read()["models"])

    def path(self, name: str, version: str = "latest") -> Path:
        """The object file of a hot version: a plain safetensors file, read-only."""
        key, entry = self._lookup(name, version)
        if entry["tier"] != "hot":
            raise HydraError(
                f"{name}:{key} is archived and has no single file; `hydra-cas restore {name}:{key}` "
                "first, or use load()/export()"
            )
        return self.objects.path(entry["oid"])

    def tensors(self, name: str, version: str = "latest") -> list[dict[str, Any]]:
        """Name, dtype and shape of each tensor of a version, read from its header only."""
        from hydra_cas.stheader import validate_file

        key, entry = self._lookup(name, version)
        if entry["tier"] == "archive":
            recipe = self.archive_tier.read_recipe(entry["oid"])
            return [
                {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
                for t in parse_header(recipe.header, recipe.size).tensors
            ]
        try:
            header = validate_file(self.objects.path(entry["oid"]))
        except FileNotFoundError:
            raise self._integrity(
                f"object {entry['oid']} of {name}:{key} is missing; run `hydra-cas fsck`",
                f"{name}:{key}",
                entry["oid"],
            ) from None
        return [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in header.tensors]

    def du(self) -> dict[str, Any]:
        """Disk usage: logical bytes (every version counted), stored bytes, dedup savings.

        Per model, ``stored`` counts each distinct object of that model once; the
        totals count each object once across the whole store, and ``on_disk``
        also counts unreferenced objects that gc has not removed yet.
        """
        doc = self.manifest.read()
        per_model = []
        all_oids: dict[str, int] = {}
        logical_total = 0
        for name in sorted(doc["models"]):
            versions = doc["models"][name]["versions"]
            oids = {e["oid"]: e["size"] for e in versions.values()}
            logical = sum(e["size"] for e in versions.values())
            stored = sum(oids.values())
            per_model.append(
                {
                    "name": name,
                    "versions": len(versions),
                    "logical_bytes": logical,
                    "stored_bytes": stored,
                    "dedup_saved_bytes": logical - stored,
                }
            )
            all_oids.update(oids)
            logical_total += logical
        on_disk = 0
        orphans = 0
        for oid, path in self.layout.iter_objects():
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            on_disk += size
            if oid not in all_oids:
                orphans += size
        stored_total = sum(all_oids.values())
        hot_oids = {
            e["oid"] for m in doc["models"].values() for e in m["versions"].values() if e["tier"] == "hot"
        }
        archived = {
            e["oid"]: e["size"]
            for m in doc["models"].values()
            for e in m["versions"].values()
            if e["tier"] == "archive"
        }
        archive = self.archive_tier.usage(set(archived))
        archived_logical = sum(
            e["size"]
            for m in doc["models"].values()
            for e in m["versions"].values()
            if e["tier"] == "archive"
        )
        hot_stored = sum(all_oids[o] for o in hot_oids)
        return {
            "models": per_model,
            "total": {
                "logical_bytes": logical_total,
                "stored_bytes": hot_stored + archive["stored_bytes"],
                "dedup_saved_bytes": logical_total - stored_total,
                "on_disk_bytes": on_disk + archive["stored_bytes"],
                "unreferenced_bytes": orphans,
            },
            "tiers": {
                "hot": {
                    "versions": sum(
                        1
                        for m in doc["models"].values()
                        for e in m["versions"].values()
                        if e["tier"] == "hot"
                    ),
                    "stored_bytes": hot_stored,
                },
                "archive": {
                    "versions": sum(
                        1
                        for m in doc["models"].values()
                        for e in m["versions"].values()
                        if e["tier"] == "archive"
                    ),
                    "logical_bytes": archived_logical,
                    **archive,
                    "tensor_dedup_saved_bytes": sum(archived.values()) - archive["unique_tensor_bytes"],
                },
            },
        }

    # ------------------------------------------------------------------ loading

    def load(
        self, name: str, version: str = "latest", verify: str = "fast", mmap: bool = False
    ) -> dict[str, np.ndarray]:
        """Load ``name:version`` as a dict of numpy arrays.

        ``verify``: ``"fast"`` checks the BLAKE3 digest, ``"full"`` the SHA-256
        (the oid), ``"none"`` nothing.  ``mmap=True`` returns read-only arrays
        that view a memory map of the object, without copying.
        """
        if verify not in VERIFY_MODES:
            raise InvalidArgumentError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
        key, entry = self._lookup(name, version)
        ref = f"{name}:{key}"
        if entry["status"] != "ok":
            raise IntegrityError(
                f"{ref} is marked broken (object {entry['oid']} failed fsck and was quarantined); "
                "save it again or delete it",
                ref=ref,
                oid=entry["oid"],
            )
        if entry["tier"] == "archive":
            return self._load_archived(ref, entry, verify)
        oid = entry["oid"]
        mapped = None
        try:
            if mmap:
                mapped, digest = self.objects.map(oid, entry["size"], verify)
            else:
                buf, digest = self.objects.read_into_buffer(oid, entry["size"], verify)
        except FileNotFoundError:
            # A concurrent archive may have moved the bytes between our lookup and the open.
            _, now_entry = self._lookup(name, key)
            if now_entry["tier"] == "archive" and now_entry["oid"] == oid:
                return self._load_archived(ref, now_entry, verify)
            raise self._integrity(
                f"object {oid} of {ref} is missing from {self.layout.objects}; run `hydra-cas fsck`",
                ref,
                oid,
            ) from None
        except IntegrityError as exc:
            # The size check fires before any hashing: report it as the checksum
            # failure it is, with the digest that could not be matched.
            expected = entry["blake3"] if verify == "fast" else oid
            raise self._integrity(
                f"checksum mismatch for {ref}: {exc} (run `hydra-cas fsck --repair`)",
                ref,
                oid,
                expected,
                f"{exc.actual} bytes",
            ) from None
        try:
            self._check_digest(ref, entry, verify, digest)
        except IntegrityError:
            if mapped is not None:
                mapped.close()
            raise
        if mmap:
            return _arrays_from(mapped, entry["size"], writable=False)
        return _arrays_from(buf, entry["size"], writable=True)

    def _load_archived(self, ref: str, entry: dict[str, Any], verify: str) -> dict[str, np.ndarray]:
        """Rebuild an archived payload in memory (no temp file) and verify it as asked."""
        oid, size = entry["oid"], entry["size"]
        try:
            recipe = self.archive_tier.read_recipe(oid)
            if recipe.size != size:
                raise IntegrityError(
                    f"archive recipe {oid} rebuilds {recipe.size} bytes, the manifest records {size}"
                )
            buf = np.empty(size, dtype=np.uint8)
            hasher = _new_hasher(verify)
            pos = 0
            for chunk in self.archive_tier.iter_payload(recipe, verify_tensors=False):
                n = len(chunk)
                buf[pos : pos + n] = np.frombuffer(chunk, dtype=np.uint8)
                if hasher is not None:
                    hasher.update(chunk)
                pos += n
        except IntegrityError as exc:
            # A concurrent restore (and gc) may have moved the bytes back to the hot tier.
            name, _, key = ref.rpartition(":")
            try:
                _, now = self._lookup(name, key)
            except NotFoundError:
                raise
            if now["tier"] == "hot" and now["oid"] == oid:
                return self.load(name, key, verify)
            raise self._integrity(f"{ref}: {exc}", ref, oid, exc.expected, exc.actual) from None
        self._check_digest(ref, entry, verify, hasher.hexdigest() if hasher is not None else None)
        return _arrays_from(buf, size, writable=True)

    def _integrity(
        self, message: str, ref: str, oid: str, expected: str | None = None, actual: str | None = None
    ) -> IntegrityError:
        logger.critical("%s", message)
        return IntegrityError(message, ref=ref, oid=oid, expected=expected, actual=actual)

    def _check_digest(self, ref: str, entry: dict[str, Any], verify: str, digest: str | None) -> None:
        if verify == "none":
            return
        expected = entry["blake3"] if verify == "fast" else entry["oid"]
        if digest != expected:
            algo = "BLAKE3" if verify == "fast" else "SHA-256"
            raise self._integrity(
                f"checksum mismatch for {ref}: object {entry['oid']} has {algo} {digest}, "
                f"expected {expected}; the stored file is corrupt (run `hydra-cas fsck --repair`)",
                ref,
                entry["oid"],
                expected,
                digest,
            )

    def load_many(
        self,
        requests: Iterable[tuple[str, str] | str],
        max_workers: int | None = None,
        verify: str = "fast",
        mmap: bool = False,
    ) -> dict[str, LoadResult]:
        """Load several models in parallel; one result per request, keyed ``name:version``.

        A failed request has its error in its result and does not stop the
        others; check ``result.ok`` or call ``result.unwrap()``.
        """
        keyed: dict[str, tuple[str, str]] = {}
        for request in requests:
            if isinstance(request, str):
                name, _, version = request.rpartition(":")
                if not name:
                    name, version = request, "latest"
            else:
                try:
                    name, version = request
                except (TypeError, ValueError):
                    raise InvalidArgumentError(
                        f"load_many requests are 'name:version' strings or (name, version) pairs, "
                        f"got {type(request).__name__}"
                    ) from None
            keyed[f"{name}:{version}"] = (name, version)
        if not keyed:
            return {}
        workers = max_workers or min(len(keyed), 2 * (os.cpu_count() or 2))

        def one(item: tuple[str, tuple[str, str]]) -> LoadResult:
            label, (name, version) = item
            try:
                resolved = self.resolve(name, version)
                return LoadResult(label, resolved, self.load(name, resolved, verify, mmap))
            except HydraError as exc:
                logger.error("loading %s failed: %s", label, exc)
                return LoadResult(label, error=exc)
            except Exception as exc:  # a bug or an unexpected OS failure: report, do not hide
                logger.exception("loading %s failed unexpectedly", label)
                wrapped = HydraError(f"loading {label} failed: {type(exc).__name__}: {exc}")
                wrapped.__cause__ = exc
                return LoadResult(label, error=wrapped)

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hydra-load") as pool:
            return {r.request: r for r in pool.map(one, keyed.items())}

    # ------------------------------------------------------------------ changing refs

    def delete(self, name: str, version: str, *, force: bool = False) -> str:
        """Remove the ref ``name:version`` (the object is left for gc); return the version.

        Refuses when aliases point at the version, unless ``force`` (which
        removes those aliases too).
        """
        name = check_name(name)
        removed: dict[str, str] = {}

        def plan(doc: dict[str, Any]) -> list[dict[str, Any]]:
            key, _ = self._lookup(name, version, doc)
            aliases = sorted(a for a, v in doc["models"][name]["aliases"].items() if v == key)
            if aliases and not force:
                raise RefInUseError(
                    f"{name}:{key} is the target of alias(es) {', '.join(aliases)}; remove them "
                    "first or delete with force=True (--force)"
                )
            removed["version"] = key
            return [{"op": "drop", "name": name, "version": key}]

        self.manifest.commit(plan)
        logger.info("deleted %s:%s", name, removed["version"])
        return removed["version"]

    def set_alias(self, name: str, alias: str, version: str) -> str:
        """Point ``alias`` at ``version`` (resolved now); return the version."""
        name = check_name(name)
        alias = check_alias(alias)
        target: dict[str, str] = {}

        def plan(doc: dict[str, Any]) -> list[dict[str, Any]]:
            key, _ = self._lookup(name, version, doc)
            target["version"] = key
            if doc["models"][name]["aliases"].get(alias) == key:
                return []
            return [{"op": "alias", "name": name, "alias": alias, "version": key}]

        self.manifest.commit(plan)
        return target["version"]

    def remove_alias(self, name: str, alias: str) -> None:
        name = check_name(name)
        if not isinstance(alias, str):
            raise InvalidNameError(f"alias must be a str, got {type(alias).__name__}")

        def plan(doc: dict[str, Any]) -> list[dict[str, Any]]:
            model = doc["models"].get(name)
            if model is None or alias not in model["aliases"]:
                raise NotFoundError(f"model {name!r} has no alias {shown(alias)}")
            return [{"op": "unalias", "name": name, "alias": alias}]

        self.manifest.commit(plan)

    # ------------------------------------------------------------------ archival tier

    def archive(self, name: str, version: str) -> ArchiveResult:
        """Move ``name:version`` to the archival tier; its oid stays the same.

        Tensors are stored once each (shared across archived versions),
        compressed, and where it pays as XOR deltas against the parent
        version's tensors.  The archived form is rebuilt and checked against the
        SHA-256 before the hot copy is removed.
        """
        for attempt in range(_COMMIT_ATTEMPTS):
            doc = self.manifest.read()
            key, entry = self._lookup(name, version, doc)
            ref, oid = f"{name}:{key}", entry["oid"]
            if entry["tier"] == "archive":
                return ArchiveResult(ref, oid, entry["size"], already=True)
            if entry["status"] != "ok":
                raise IntegrityError(f"{ref} is marked broken; it cannot be archived", ref=ref, oid=oid)
            stats = ArchiveStats()
            # The same bytes may be archived already (another version, or this one
            # before a restore).  refresh() touches that form so gc's grace period
            # protects it; an incomplete one, or a retry after a concurrent gc
            # removed part of it, is written again (existing blobs are reused).
            if attempt or not self.archive_tier.refresh(oid):
                stats = self._write_archive(ref, doc, name, key, entry)
            self._verify_archived(ref, oid, entry["size"])
            try:
                self._set_tier(name, key, oid, "hot", "archive")
            except _ObjectVanished:
                logger.warning("archive data of %s vanished before commit; archiving again", ref)
                continue
            self._drop_hot_copy(oid)
            logger.info(
                "archived %s: %d tensors, %d reused, %d deltas",
                ref,
                stats.tensors,
                stats.reused,
                stats.deltas,
            )
            return ArchiveResult(ref, oid, entry["size"], stats=stats)
        raise StorageError(
            f"could not archive {name}:{version}: a concurrent gc kept removing its data; retry"
        )

    def _write_archive(
        self, ref: str, doc: dict[str, Any], name: str, key: str, entry: dict[str, Any]
    ) -> ArchiveStats:
        oid, size = entry["oid"], entry["size"]
        try:
            buf, digest = self.objects.read_into_buffer(oid, size, "full")
        except FileNotFoundError:
            # Deleted (and collected) since we looked it up? Then it is simply gone.
            self._lookup(name, key)
            raise self._integrity(
                f"object {oid} of {ref} is missing; run `hydra-cas fsck`", ref, oid
            ) from None
        if digest != oid:
            raise self._integrity(
                f"checksum mismatch for {ref}: object {oid} hashes to {digest}; not archiving corrupt bytes "
                "(run `hydra-cas fsck --repair`)",
                ref,
                oid,
                oid,
                digest,
            )
        header = parse_header(buf.data, size)
        parent = load_parent_recipe(self.archive_tier, _parent_entry(doc["models"][name], key, entry))
        return self.archive_tier.archive_payload(oid, memoryview(buf), header, parent)

    def _verify_archived(self, ref: str, oid: str, size: int) -> None:
        """Rebuild the archived payload and check its SHA-256: a codec bug must never destroy data."""
        sha = hashlib.sha256()
        total = 0
        try:
            recipe = self.archive_tier.read_recipe(oid)
            for chunk in self.archive_tier.iter_payload(recipe, verify_tensors=False):
                sha.update(chunk)
                total += len(chunk)
        except IntegrityError as exc:
            raise self._integrity(f"archived form of {ref} does not rebuild: {exc}", ref, oid) from None
        if total != size or sha.hexdigest() != oid:
            raise self._integrity(
                f"archived form of {ref} rebuilds to other bytes (sha256 {sha.hexdigest()}, {total} bytes); "
                "the hot copy is kept",
                ref,
                oid,
                oid,
                sha.hexdigest(),
            )

    def _set_tier(self, name: str, key: str, oid: str, old: str, new: str) -> None:
        def plan(doc: dict[str, Any]) -> list[dict[str, Any]]:
            model = doc["models"].get(name)
            entry = model["versions"].get(key) if model else None
            if entry is None or entry["oid"] != oid:
                raise NotFoundError(f"{name}:{key} was deleted or replaced while it was being moved")
            if entry["tier"] != old:
                return []
            # Under the lock gc cannot delete; check the bytes the new tier needs are all there.
            if new == "archive":
                _, problems = self.archive_tier.live_tensors({oid})
                if problems or not self.archive_tier.has_recipe(oid):
                    raise _ObjectVanished
            elif self.objects.size_of(oid) != entry["size"]:
                raise _ObjectVanished
            return [{"op": "put", "name": name, "version": key, "entry": {**entry, "tier": new}}]

        self.manifest.commit(plan)

    def _drop_hot_copy(self, oid: str) -> None:
        """Remove a hot object once no hot version uses it (under the lock, like gc)."""
        with self.manifest.lock():
            doc = self.manifest.read()
            for model in doc["models"].values():
                for entry in model["versions"].values():
                    if entry["oid"] == oid and entry["tier"] == "hot":
                        return
            fsio.unlink(self.objects.path(oid))

    def _checked_recipe(self, entry: dict[str, Any]) -> Any:
        """An archived entry's recipe, refused when it would rebuild another size."""
        recipe = self.archive_tier.read_recipe(entry["oid"])
        if recipe.size != entry["size"]:
            raise IntegrityError(
                f"archive recipe {entry['oid']} rebuilds {recipe.size} bytes, the manifest records "
                f"{entry['size']}", oid=entry["oid"],
            )
        return recipe

    def restore(self, name: str, version: str) -> ArchiveResult:
        """Bring an archived version back to the hot tier as its exact object file."""
        for _ in range(_COMMIT_ATTEMPTS):
            key, entry = self._lookup(name, version)
            ref, oid = f"{name}:{key}", entry["oid"]
            if entry["tier"] == "hot":
                return ArchiveResult(ref, oid, entry["size"], already=True)
            try:
                recipe = self._checked_recipe(entry)
                written = self.objects.write_temp(
                    self.archive_tier.iter_payload(recipe, verify_tensors=False)
                )
            except IntegrityError as exc:
                raise self._integrity(f"{ref}: {exc}", ref, oid) from None
            if written.oid != oid or written.size != entry["size"]:
                fsio.discard(written.tmp or "")
                raise self._integrity(
                    f"archived form of {ref} rebuilds to sha256 {written.oid}, expected {oid}",
                    ref,
                    oid,
                    oid,
                    written.oid,
                )
            intent = self._add_intent(oid, written.tmp)
            try:
                self._publish(written)
                self._set_tier(name, key, oid, "archive", "hot")
            except _ObjectVanished:
                continue
            finally:
                self._drop_intent(intent)
            logger.info("restored %s to the hot tier", ref)
            return ArchiveResult(ref, oid, entry["size"])
        raise StorageError(f"could not restore {name}:{version}: a concurrent gc kept removing it; retry")

    def archive_candidates(
        self,
        name: str | None = None,
        version: str | None = None,
        *,
        keep_latest: int | None = None,
        older_than_days: float | None = None,
    ) -> list[tuple[str, str]]:
        """Hot versions a bulk archive would move, oldest first within each model.

        ``keep_latest=N`` keeps each model's newest N versions hot;
        ``older_than_days`` only takes versions created that long ago.  Versions
        an alias points at stay hot unless named exactly.
        """
        doc = self.manifest.read()
        if name is not None and version is not None:
            key, entry = self._lookup(name, version, doc)
            return [(name, key)] if entry["tier"] == "hot" else []
        if keep_latest is None and older_than_days is None:
            raise HydraError("choose what to archive: NAME:VERSION, --keep-latest N or --older-than DAYS")
        if older_than_days is not None and not (older_than_days >= 0 and older_than_days != float("inf")):
            raise InvalidArgumentError("--older-than takes a number of days, 0 or more")
        if keep_latest is not None and keep_latest < 0:
            raise HydraError("--keep-latest takes a number of versions, 0 or more")
        names = [check_name(name)] if name is not None else sorted(doc["models"])
        cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
        chosen = []
        for model_name in names:
            model = doc["models"].get(model_name)
            if model is None:
                raise NotFoundError(f"no model named {model_name!r} in {self.root}")
            ordered = sorted(model["versions"], key=Version)
            # max(0, ...): with fewer versions than keep_latest a negative start
            # would slice from the end and keep too few.
            keep = set(ordered[max(0, len(ordered) - keep_latest) :]) if keep_latest else set()
            aliased = set(model["aliases"].values())
            for key in ordered:
                entry = model["versions"][key]
                if key in keep or key in aliased or entry["tier"] != "hot" or entry["status"] != "ok":
                    continue
                if cutoff is not None and _created_epoch(entry["created"]) > cutoff:
                    continue
                chosen.append((model_name, key))
        return chosen

    # ------------------------------------------------------------------ maintenance

    def gc(
        self,
        *,
        grace_period: float = 3600.0,
        dry_run: bool = False,
        progress: bool = False,
    ) -> GcPlan:
        """Delete objects no ref, alias or in-flight save needs; see hydra_cas.gc."""
        from hydra_cas.gc import collect

        return collect(self, grace_period=grace_period, dry_run=dry_run, progress=progress)

    def fsck(
        self,
        *,
        repair: bool = False,
        sample: float | None = None,
        workers: int | None = None,
        progress: bool = False,
    ) -> FsckReport:
        """Check (and with ``repair=True`` mend) the store; see hydra_cas.fsck."""
        from hydra_cas.fsck import check

        return check(self, repair=repair, sample=sample, workers=workers, progress=progress)

    # ------------------------------------------------------------------ export

    def export(
        self,
        name: str,
        version: str,
        dest: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        progress: bool = False,
    ) -> Path:
        """Write the payload of ``name:version`` to ``dest``, byte-identical, verified.

        The bytes are re-hashed with SHA-256 on the way and the file appears
        only once it is complete and matches.
        """
        key, entry = self._lookup(name, version)
        ref = f"{name}:{key}"
        target = Path(dest).absolute()
        if target.exists() and not overwrite:
            raise HydraError(f"{target} already exists; choose another path or pass overwrite=True")
        if entry["tier"] == "archive":
            try:
                recipe = self._checked_recipe(entry)
            except IntegrityError as exc:
                raise self._integrity(f"{ref}: {exc}", ref, entry["oid"]) from None
            chunks: Iterable[bytes | bytearray | memoryview] = self.archive_tier.iter_payload(
                recipe, verify_tensors=False
            )
        else:
            source = self.objects.path(entry["oid"])
            try:
                actual = source.stat().st_size
            except FileNotFoundError:
                raise self._integrity(
                    f"object {entry['oid']} of {ref} is missing; run `hydra-cas fsck`", ref, entry["oid"]
                ) from None
            if actual != entry["size"]:
                raise self._integrity(
                    f"checksum mismatch for {ref}: object {entry['oid']} has {actual} bytes, the manifest "
                    f"records {entry['size']} (run `hydra-cas fsck --repair`)",
                    ref, entry["oid"], entry["oid"], f"{actual} bytes",
                )
            chunks = _read_chunks(source, entry["size"], progress=progress, desc=f"export {ref}")
        fd, tmp = fsio.create_temp(target.parent, ".hydra-export")
        try:
            try:
                oid, _, size = digest_stream(chunks, fd, tmp)
                if self.durable:
                    fsio.fsync(fd, tmp)
            finally:
                os.close(fd)
            if oid != entry["oid"] or size != entry["size"]:
                raise self._integrity(
                    f"checksum mismatch exporting {ref}: object {entry['oid']} hashes to {oid}; "
                    "the stored file is corrupt (run `hydra-cas fsck --repair`)",
                    ref,
                    entry["oid"],
                    entry["oid"],
                    oid,
                )
            os.chmod(tmp, 0o644)
            fsio.replace(tmp, str(target))
        except BaseException:
            fsio.discard(tmp)
            raise
        return target


# ---------------------------------------------------------------------- helpers


def _parent_entry(model: dict[str, Any], key: str, entry: dict[str, Any]) -> dict[str, Any] | None:
    """The version a delta is taken against: the recorded parent, else the previous version."""
    versions = model["versions"]
    if entry["parent"] is not None:
        return versions.get(entry["parent"])
    current = Version(key)
    older = [v for v in versions if Version(v) < current]
    return versions[max(older, key=Version)] if older else None


def _created_epoch(created: str) -> float:
    from datetime import datetime, timezone

    return datetime.fromisoformat(created[:-1]).replace(tzinfo=timezone.utc).timestamp()


def _new_hasher(verify: str) -> Any:
    if verify == "none":
        return None
    return hashlib.sha256() if verify == "full" else blake3.blake3()


def _suggest(name: str, models: Mapping[str, Any]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(models), n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _arrays_from(buffer: Any, size: int, *, writable: bool) -> dict[str, np.ndarray]:
    """Arrays viewing the tensors of a payload held in ``buffer`` (no copies)."""
    if buffer is None:
        from hydra_cas.errors import InvalidSafetensorsError

        raise InvalidSafetensorsError("an empty object is not a safetensors payload")
    header: Header = parse_header(
        memoryview(buffer) if not isinstance(buffer, np.ndarray) else buffer.data, size
    )
    result: dict[str, np.ndarray] = {}
    for tensor in header.tensors:
        dtype = numpy_dtype_for(tensor.dtype)
        start = header.data_start + tensor.begin
        count = (tensor.end - tensor.begin) // dtype.itemsize
        if count == 0:
            array = np.empty(tensor.shape, dtype=dtype)
            array.flags.writeable = writable
        else:
            array = np.frombuffer(buffer, dtype=dtype, count=count, offset=start).reshape(tensor.shape)
        result[tensor.name] = array
    return result


def _read_chunks(
    path: Path, expected: int, chunk: int = 16 * 1024 * 1024, *, progress: bool = False, desc: str = ""
) -> Iterator[bytes]:
    """Stream a file; raise if its size is not ``expected`` (it changed under us)."""
    from hydra_cas.progress import progress_bar

    total = 0
    try:
        with open(path, "rb") as f, progress_bar(expected, desc, enabled=progress) as bar:
            while True:
                data = f.read(chunk)
                if not data:
                    break
                total += len(data)
                bar.update(len(data))
                yield data
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}", errno=exc.errno, path=str(path)) from exc
    if total != expected:
        raise HydraError(f"{path} changed size while being read ({total} bytes, expected {expected})")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    from hydra_cas.errors import InvalidSafetensorsError

    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as exc:
        raise InvalidSafetensorsError(f"cannot read {path} as .npz: {exc}") from None
