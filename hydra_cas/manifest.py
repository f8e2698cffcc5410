"""manifest.json and journal.jsonl: the refs of a store, and their history.

Every ref change is a *record* (``put``, ``drop``, ``alias``, ``unalias``).  A
commit appends its records to the journal and fsyncs it, applies them to the
manifest and replaces ``manifest.json`` atomically, all under the store lock.
Replaying the journal onto an empty manifest gives the manifest back, so a lost
or corrupt ``manifest.json`` can be rebuilt exactly, and a writer that died
between the two steps is rolled forward by the next one.

In memory a manifest is a plain dict, validated once when read.  Version
records are never mutated once built: changes copy the model they touch, so a
reader thread holding an older manifest never sees it change under it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from packaging.version import InvalidVersion, Version

from hydra_cas import fsio
from hydra_cas.dtypes import ITEMSIZE
from hydra_cas.errors import InvalidMetadataError, ManifestError, StorageError
from hydra_cas.layout import check_oid
from hydra_cas.lock import StoreLock
from hydra_cas.refs import check_alias, check_name

if TYPE_CHECKING:
    from hydra_cas.layout import Layout

__all__ = [
    "FORMAT_VERSION",
    "TIERS",
    "STATUSES",
    "MAX_METADATA_BYTES",
    "utc_now",
    "empty_manifest",
    "validate_manifest",
    "validate_entry",
    "validate_record",
    "apply_record",
    "replay",
    "Journal",
    "ManifestStore",
    "metadata_json",
    "dumps_manifest",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
TIERS = ("hot", "archive")
STATUSES = ("ok", "broken")
MAX_METADATA_BYTES = 1024 * 1024
_ENTRY_FIELDS = frozenset(
    {
        "oid",
        "blake3",
        "size",
        "tensors",
        "parameters",
        "dtypes",
        "created",
        "metadata",
        "tier",
        "parent",
        "status",
    }
)
_OPS = {
    "put": frozenset({"seq", "time", "op", "name", "version", "entry"}),
    "drop": frozenset({"seq", "time", "op", "name", "version"}),
    "alias": frozenset({"seq", "time", "op", "name", "alias", "version"}),
    "unalias": frozenset({"seq", "time", "op", "name", "alias"}),
}

Models = dict[str, dict[str, dict[str, Any]]]


def utc_now() -> str:
    """The current UTC time as ISO 8601 with microseconds and a ``Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def empty_manifest() -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "journal_seq": 0, "models": {}}


# --------------------------------------------------------------------------- validation


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _check_version_key(version: object, where: str) -> str:
    if not isinstance(version, str) or len(version) > 64:
        raise ManifestError(f"{where}: version key {str(version)[:80]!r} is not a version string")
    try:
        canonical = str(Version(version))
    except InvalidVersion:
        raise ManifestError(f"{where}: {version!r} is not a PEP 440 version") from None
    if canonical != version:
        raise ManifestError(f"{where}: version {version!r} is not in normalised form {canonical!r}")
    return version


def _check_created(value: object, where: str, field: str = "created") -> None:
    if not isinstance(value, str) or not value.endswith("Z"):
        raise ManifestError(f"{where}: {field!r} must be an ISO 8601 UTC time ending in 'Z'")
    try:
        datetime.fromisoformat(value[:-1])
    except ValueError:
        raise ManifestError(f"{where}: {field!r} {value[:40]!r} is not ISO 8601") from None


def validate_entry(entry: object, where: str) -> dict[str, Any]:
    """Check one version record against the format; return it unchanged."""
    if not isinstance(entry, dict):
        raise ManifestError(f"{where}: a version record must be a JSON object")
    keys = entry.keys()
    if keys != _ENTRY_FIELDS:
        missing = sorted(_ENTRY_FIELDS - keys)
        extra = sorted(keys - _ENTRY_FIELDS)
        raise ManifestError(f"{where}: version record has missing fields {missing} / unknown {extra}")
    check_oid(entry["oid"], f"{where}: oid")
    check_oid(entry["blake3"], f"{where}: blake3 digest")
    for field in ("size", "tensors", "parameters"):
        if not _is_count(entry[field]):
            raise ManifestError(f"{where}: {field!r} must be a non-negative integer")
    dtypes = entry["dtypes"]
    if not isinstance(dtypes, list) or any(not isinstance(d, str) or d not in ITEMSIZE for d in dtypes):
        raise ManifestError(f"{where}: 'dtypes' must be a list of safetensors dtype names")
    _check_created(entry["created"], where)
    if not isinstance(entry["metadata"], dict):
        raise ManifestError(f"{where}: 'metadata' must be a JSON object")
    if entry["tier"] not in TIERS:
        raise ManifestError(f"{where}: 'tier' must be one of {TIERS}")
    if entry["status"] not in STATUSES:
        raise ManifestError(f"{where}: 'status' must be one of {STATUSES}")
    if entry["parent"] is not None:
        _check_version_key(entry["parent"], f"{where}: parent")
    return entry


def _validate_model(name: object, model: object) -> None:
    try:
        check_name(name)
    except Exception as exc:
        raise ManifestError(f"manifest: bad model name: {exc}") from None
    if not isinstance(model, dict) or model.keys() != {"versions", "aliases"}:
        raise ManifestError(f"manifest: model {name!r} must have exactly 'versions' and 'aliases'")
    versions, aliases = model["versions"], model["aliases"]
    if not isinstance(versions, dict) or not isinstance(aliases, dict):
        raise ManifestError(f"manifest: model {name!r}: versions and aliases must be objects")
    for version, entry in versions.items():
        where = f"manifest: {name}:{str(version)[:64]}"
        _check_version_key(version, where)
        validate_entry(entry, where)
    for alias, target in aliases.items():
        try:
            check_alias(alias)
        except Exception as exc:
            raise ManifestError(f"manifest: model {name!r}: {exc}") from None
        if not isinstance(target, str) or target not in versions:
            raise ManifestError(
                f"manifest: alias {name}@{alias} points at {str(target)[:40]!r}, "
                "which is not a version of the model"
            )


def validate_manifest(doc: object) -> dict[str, Any]:
    """Check a parsed manifest against the format; return it unchanged."""
    if not isinstance(doc, dict):
        raise ManifestError("manifest.json must hold a JSON object")
    version = doc.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ManifestError(
            f"manifest.json has format_version {str(version)[:20]!r}; this hydra_cas reads "
            f"format {FORMAT_VERSION}: upgrade hydra_cas, or check the file was not replaced"
        )
    if doc.keys() != {"format_version", "journal_seq", "models"}:
        raise ManifestError("manifest.json must have exactly format_version, journal_seq, models")
    if not _is_count(doc["journal_seq"]):
        raise ManifestError("manifest.json: journal_seq must be a non-negative integer")
    models = doc["models"]
    if not isinstance(models, dict):
        raise ManifestError("manifest.json: 'models' must be an object")
    for name, model in models.items():
        _validate_model(name, model)
    return doc


def validate_record(record: object, where: str) -> dict[str, Any]:
    """Check one journal record; return it unchanged."""
    if not isinstance(record, dict):
        raise ManifestError(f"{where}: a journal record must be a JSON object")
    op = record.get("op")
    fields = _OPS.get(op) if isinstance(op, str) else None
    if fields is None:
        raise ManifestError(f"{where}: unknown journal op {str(op)[:20]!r}")
    if record.keys() != fields:
        raise ManifestError(f"{where}: {op} record must have exactly the fields {sorted(fields)}")
    if not _is_count(record["seq"]) or record["seq"] == 0:
        raise ManifestError(f"{where}: 'seq' must be a positive integer")
    _check_created(record["time"], where, "time")
    try:
        check_name(record["name"])
        if "alias" in record:
            check_alias(record["alias"])
    except Exception as exc:
        raise ManifestError(f"{where}: {exc}") from None
    if "version" in record:
        _check_version_key(record["version"], where)
    if op == "put":
        validate_entry(record["entry"], where)
    return record


# --------------------------------------------------------------------------- applying


def apply_record(models: Models, record: dict[str, Any], owned: set[str] | None = None) -> None:
    """Apply one validated record to ``models`` (copying the model it touches).

    ``owned`` names models already copied by this caller, which are then
    changed in place: a replay or a batch copies each model once, not once per
    record.  Raises ManifestError when the record does not fit the state (a
    drop of a missing version, an alias to a missing version, an oid change).
    """
    op, name = record["op"], record["name"]
    old = models.get(name)
    if owned is not None and name in owned and old is not None:
        model = old
    else:
        model = {
            "versions": dict(old["versions"]) if old else {},
            "aliases": dict(old["aliases"]) if old else {},
        }
        if owned is not None:
            owned.add(name)
    versions, aliases = model["versions"], model["aliases"]
    seq = record.get("seq", "?")
    if op == "put":
        previous = versions.get(record["version"])
        if previous is not None and previous["oid"] != record["entry"]["oid"]:
            raise ManifestError(
                f"journal record {seq} changes the oid of {name}:{record['version']}; versions are immutable"
            )
        versions[record["version"]] = record["entry"]
    elif op == "drop":
        if versions.pop(record["version"], None) is None:
            raise ManifestError(f"journal record {seq} drops {name}:{record['version']}, which is absent")
        for alias in [a for a, v in aliases.items() if v == record["version"]]:
            del aliases[alias]
    elif op == "alias":
        if record["version"] not in versions:
            raise ManifestError(
                f"journal record {seq} points alias {record['alias']} at missing {name}:{record['version']}"
            )
        aliases[record["alias"]] = record["version"]
    else:  # unalias
        aliases.pop(record["alias"], None)
    if versions:
        models[name] = model
    else:
        models.pop(name, None)


def replay(records: list[dict[str, Any]], models: Models | None = None) -> Models:
    """Apply ``records`` in order onto ``models`` (or an empty manifest)."""
    result: Models = dict(models) if models else {}
    owned: set[str] = set()
    for record in records:
        apply_record(result, record, owned)
    return result


# --------------------------------------------------------------------------- journal


class Journal:
    """The append-only ``journal.jsonl``."""

    _CHUNK = 64 * 1024

    def __init__(self, path: os.PathLike[str] | str, *, durable: bool = True) -> None:
        self.path = os.fspath(path)
        self.durable = durable

    def read(self) -> tuple[list[dict[str, Any]], bool]:
        """All complete records, validated; and whether a torn last line was seen."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return [], False
        except OSError as exc:
            raise StorageError(f"cannot read the journal {self.path}: {exc.strerror}") from exc
        torn = bool(data) and not data.endswith(b"\n")
        lines = data.split(b"\n")
        lines.pop()  # the empty string after the last newline, or the torn tail
        records: list[dict[str, Any]] = []
        for number, line in enumerate(lines, 1):
            where = f"journal line {number}"
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                raise ManifestError(f"{where} is not valid JSON; the journal is corrupt") from None
            validate_record(record, where)
            if record["seq"] != number:
                raise ManifestError(f"{where} has seq {record['seq']}; expected {number}")
            records.append(record)
        return records, torn

    def _tail(self, fd: int, size: int) -> tuple[int, int]:
        """(last complete seq, offset just past the last newline) of an open journal.

        Reads backwards chunk by chunk, searching only each new chunk for
        newlines, so a huge last line costs one pass, not one per chunk.
        """
        chunks: list[bytes] = []  # newest last; together they cover [end, size)
        end = size
        last_nl = -1  # absolute offset of the last newline
        while end > 0:
            start = max(0, end - self._CHUNK)
            try:
                chunk = os.pread(fd, end - start, start)
            except OSError as exc:
                raise fsio._fail("reading the journal", self.path, exc) from exc
            chunks.insert(0, chunk)
            end = start
            if last_nl < 0:
                pos = chunk.rfind(b"\n")
                if pos < 0:
                    continue
                last_nl = start + pos
                prev = chunk.rfind(b"\n", 0, pos)
            else:
                prev = chunk.rfind(b"\n")
            if prev < 0 and start > 0:
                continue
            line_start = start + prev + 1 if prev >= 0 else 0
            line = b"".join(chunks)[line_start - start : last_nl - start]
            try:
                seq = json.loads(line)["seq"]
            except (ValueError, KeyError, TypeError, RecursionError):
                raise ManifestError("the journal's last line is corrupt; run `hydra-cas fsck`") from None
            if not _is_count(seq):
                raise ManifestError("the journal's last record has no valid seq; run `hydra-cas fsck`")
            return seq, last_nl + 1
        return 0, 0

    def last_seq(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise fsio._fail("opening the journal", self.path, exc) from exc
        try:
            return self._tail(fd, os.fstat(fd).st_size)[0]
        finally:
            os.close(fd)

    def append(self, records: list[dict[str, Any]]) -> None:
        """Append records (their seqs already assigned) durably.  Caller holds the lock."""
        payload = "".join(
            json.dumps(r, separators=(",", ":"), ensure_ascii=False, allow_nan=False) + "\n" for r in records
        ).encode()
        try:
            fsio._check("open", self.path)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise fsio._fail("opening the journal", self.path, exc) from exc
        try:
            try:
                size = os.fstat(fd).st_size
                _, good_end = self._tail(fd, size)
                if good_end != size:
                    # A crash tore the last line; it was never committed.  Drop it.
                    logger.warning(
                        "journal %s: dropping a torn last line (%d bytes)", self.path, size - good_end
                    )
                    fsio._check("truncate", self.path)
                    os.ftruncate(fd, good_end)
                os.lseek(fd, good_end, os.SEEK_SET)
            except OSError as exc:
                raise fsio._fail("preparing the journal for append", self.path, exc) from exc
            try:
                fsio.write_all(fd, payload, self.path)
                if self.durable:
                    fsio.fsync(fd, self.path)
            except StorageError:
                # Leave no partial record behind: cut back to where we started.
                try:
                    os.ftruncate(fd, good_end)
                except OSError:
                    logger.error("journal %s: could not cut back a failed append", self.path)
                raise
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- the manifest file


class ManifestStore:
    """Reads ``manifest.json`` (cached by file identity) and commits changes to it."""

    def __init__(self, layout: Layout, *, durable: bool = True, lock_timeout: float = 60.0) -> None:
        self.layout = layout
        self.durable = durable
        self.lock_timeout = lock_timeout
        self.journal = Journal(layout.journal, durable=durable)
        self._cache: tuple[tuple[int, int, int], dict[str, Any]] | None = None
        self._cache_lock = threading.Lock()

    def lock(self) -> StoreLock:
        return StoreLock(self.layout.lock, self.lock_timeout)

    # -- reading

    def read(self) -> dict[str, Any]:
        """The current manifest, validated.  Do not mutate the result."""
        path = self.layout.manifest
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return self._from_journal_only()
        except OSError as exc:
            raise fsio._fail("reading", path, exc) from exc
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._cache_lock:
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
        doc = self._parse_file()
        with self._cache_lock:
            self._cache = (key, doc)
        return doc

    def _parse_file(self) -> dict[str, Any]:
        path = self.layout.manifest
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise StorageError(
                f"cannot read {path}: {exc.strerror}", errno=exc.errno, path=str(path)
            ) from exc
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            raise ManifestError(
                f"{path} is not valid JSON; run `hydra-cas fsck --repair` to rebuild it from the journal"
            ) from None
        try:
            return validate_manifest(doc)
        except ManifestError as exc:
            raise ManifestError(f"{exc}; run `hydra-cas fsck` for details") from None

    def _from_journal_only(self) -> dict[str, Any]:
        records, _ = self.journal.read()
        if records:
            logger.warning(
                "manifest.json is missing but the journal has %d records; using the journal "
                "(the next write, or `hydra-cas fsck --repair`, rewrites the manifest)",
                len(records),
            )
        doc = empty_manifest()
        doc["models"] = replay(records)
        doc["journal_seq"] = len(records)
        return doc

    # -- writing

    def commit(self, plan: Callable[[dict[str, Any]], list[dict[str, Any]]]) -> dict[str, Any]:
        """Apply the records ``plan(manifest)`` returns, durably, under the lock.

        ``plan`` sees the freshest manifest (rolled forward from the journal) and
        returns the records to add, without ``seq`` or ``time``; it may raise to
        abort.  Returns the manifest after the commit.
        """
        with self.lock():
            doc = self._locked_current()
            records = plan(doc)
            if not records:
                return doc
            seq = doc["journal_seq"]
            now = utc_now()
            stamped = []
            for record in records:
                seq += 1
                stamped.append({"seq": seq, "time": now, **record})
            models = dict(doc["models"])
            owned: set[str] = set()
            for record in stamped:
                apply_record(models, record, owned)
            self.journal.append(stamped)
            new_doc = {"format_version": FORMAT_VERSION, "journal_seq": seq, "models": models}
            self._write(new_doc)
            return new_doc

    def _locked_current(self) -> dict[str, Any]:
        """Under the lock: the manifest with any journal records it lacks applied."""
        doc = self.read()
        last = self.journal.last_seq()
        if last == doc["journal_seq"]:
            return doc
        if last < doc["journal_seq"]:
            raise ManifestError(
                f"manifest.json reflects journal record {doc['journal_seq']} but the journal "
                f"ends at {last}; the journal was truncated or replaced: run `hydra-cas fsck`"
            )
        records, _ = self.journal.read()
        missing = records[doc["journal_seq"] :]
        logger.warning("rolling manifest forward by %d journal records after a crash", len(missing))
        rolled = {
            "format_version": FORMAT_VERSION,
            "journal_seq": last,
            "models": replay(missing, doc["models"]),
        }
        self._write(rolled)
        return rolled

    def rewrite(self, doc: dict[str, Any]) -> None:
        """Replace manifest.json with ``doc`` (repair only).  Caller holds the lock."""
        validate_manifest(doc)
        self._write(doc)

    def _write(self, doc: dict[str, Any]) -> None:
        data = dumps_manifest(doc)
        fsio.makedirs(self.layout.tmp)
        fd, tmp = fsio.create_temp(self.layout.tmp, ".manifest")
        try:
            try:
                fsio.write_all(fd, (data + "\n").encode(), tmp)
                if self.durable:
                    fsio.fsync(fd, tmp)
            finally:
                os.close(fd)
            fsio.replace(tmp, str(self.layout.manifest))
        except BaseException:
            fsio.discard(tmp)
            raise
        if self.durable:
            fsio.fsync_dir(self.layout.root)
        # We hold the lock, so the file now on disk is the one just written:
        # cache it instead of parsing it back on the next read.
        try:
            st = os.stat(self.layout.manifest)
        except OSError:
            return
        with self._cache_lock:
            self._cache = ((st.st_ino, st.st_mtime_ns, st.st_size), doc)


def dumps_manifest(doc: dict[str, Any]) -> str:
    """Serialise a manifest: one line per version record, sorted, readable in an editor.

    ``json.dumps(indent=...)`` falls back to the pure-Python encoder and was
    four times slower on 10,000 versions; encoding each record compactly keeps
    the C encoder and still gives a diff-friendly file.
    """

    def enc(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, sort_keys=True)

    lines = [
        "{",
        f' "format_version": {enc(doc["format_version"])},',
        f' "journal_seq": {enc(doc["journal_seq"])},',
    ]
    models = doc["models"]
    if not models:
        lines.append(' "models": {}')
    else:
        lines.append(' "models": {')
        names = sorted(models)
        for i, name in enumerate(names):
            model = models[name]
            lines.append(f"  {enc(name)}: {{")
            lines.append(f'   "aliases": {enc(model["aliases"])},')
            versions = model["versions"]
            if not versions:
                lines.append('   "versions": {}')
            else:
                lines.append('   "versions": {')
                keys = sorted(versions)
                last = len(keys) - 1
                lines.extend(
                    f"    {enc(key)}: {enc(versions[key])}{',' if j < last else ''}"
                    for j, key in enumerate(keys)
                )
                lines.append("   }")
            lines.append("  }," if i < len(names) - 1 else "  }")
        lines.append(" }")
    lines.append("}")
    return "\n".join(lines)


def metadata_json(metadata: object) -> dict[str, Any]:
    """Validate user metadata: a JSON object with str keys, at most 1 MiB serialised."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidMetadataError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        text = json.dumps(metadata, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidMetadataError(
            f"metadata must be JSON-serialisable with str keys and finite numbers: {exc}; "
            "convert numpy values with .item() or .tolist()"
        ) from None
    except RecursionError:
        raise InvalidMetadataError("metadata is nested too deeply or contains a cycle") from None
    try:
        encoded = text.encode()
    except UnicodeEncodeError:
        raise InvalidMetadataError(
            "metadata contains a lone surrogate character, which is not valid UTF-8"
        ) from None
    if len(encoded) > MAX_METADATA_BYTES:
        raise InvalidMetadataError(
            f"metadata is {len(encoded)} bytes serialised; the limit is {MAX_METADATA_BYTES} "
            "(keep large artefacts in the model or a file, and a reference in metadata)"
        )
    if not _keys_are_str(metadata):
        raise InvalidMetadataError("metadata keys must be str (JSON would silently turn them into text)")
    return json.loads(text)


MAX_METADATA_DEPTH = 64


def _keys_are_str(value: object) -> bool:
    """True if every dict key is a str; refuses nesting deeper than MAX_METADATA_DEPTH.

    An explicit stack: json.dumps accepts nesting deeper than Python recursion
    (here, or in a reader's json.loads) comfortably allows.
    """
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_METADATA_DEPTH:
            raise InvalidMetadataError(
                f"metadata is nested more than {MAX_METADATA_DEPTH} levels deep; flatten it"
            )
        if isinstance(item, dict):
            if not all(isinstance(k, str) for k in item):
                return False
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)
    return True
