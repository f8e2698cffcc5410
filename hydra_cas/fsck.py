"""fsck: check a store against docs/FORMAT.md and, when asked, repair it.

The checks, in order:

1. ``manifest.json`` parses and validates, ``journal.jsonl`` parses with an
   unbroken ``seq``, and replaying the journal gives the manifest's models
   (records past the manifest's ``journal_seq`` are a crash to roll forward).
2. Every object a hot version names exists, has the recorded size and, re-hashed
   with SHA-256, the recorded oid.  Names and sizes are never trusted: a file of
   the right size with flipped bits is found only by hashing it.  Unreferenced
   objects are hashed too, because a later save of the same bytes would reuse a
   corrupt one of the right size.
3. Every archived version (tier ``archive``): its recipe exists, parses against
   the header it carries and records the manifest's size; every tensor blob it
   needs, delta bases included, exists with a readable header.  Each of those
   blobs is then decoded and re-hashed against its tid (once, however many
   versions share it; bases before the deltas on them), and the whole payload
   is rebuilt and hashed against the oid.  A damaged blob is reported with
   every version that needs it, directly or through a delta chain.  Recipes and
   blobs no archived version needs are one info finding (gc's job), but those
   blobs are decoded too, because a later archive reuses a blob by its name.
4. Files in ``objects/`` that are not objects, temp files and intents left by
   saves that died, and what sits in ``quarantine/``.  A temp file or intent is
   a leftover when it is over an hour old *and* the pid in its name is not a
   running process here: age alone would flag a long save of a huge model, and
   the pid alone means nothing on a store shared by several hosts.

Severity: ``error`` (refs or bytes at risk) and ``warning`` (leftovers to clean
up) make the exit status 1; ``info`` does not: unreferenced objects (gc's job)
and versions already marked broken, which keep failing to load until saved again
or deleted, but which fsck has nothing more to do about.

``repair=True`` mends what it can, never deleting user data: corrupt objects go
to ``quarantine/`` and their hot versions are marked ``status: "broken"`` through a
journal ``put``; damaged recipes and blobs go to ``quarantine/`` too, and the
archived versions needing them are marked broken, or, when a hot copy of their
object is still there and verifies, put back on the hot tier (``tier: "hot"``)
instead; the manifest is rebuilt from the journal (or the journal
re-based on the manifest) with the damaged file kept in ``quarantine/``; stale
leftovers are removed.  The checks then run again and the exit status reflects
what remains.

Bytes come back when a user saves them again: ``ObjectStore.publish`` replaces
an object of the wrong size with the fresh, verified bytes, and republishes a
quarantined (absent) one; a later ``fsck --repair`` then finds the versions
marked broken intact and marks them ``ok`` again (saving the lost bytes under
the broken version itself heals it at once).  An archived version marked broken
whose archived form verifies again is marked ``ok`` the same way.  NOTE:
``publish`` compares sizes only, so a corrupt object of the right size that
fsck has not yet quarantined is reused by a new save; likewise
``Archive.put_tensor`` reuses a blob by its name, which is why unneeded blobs
are decoded too.

Hashing runs in a thread pool across objects (one SHA-256 cannot be split):
hashlib releases the GIL, and on the 2-core machines we measured, threads
verified as many bytes per second as a process pool did, without its start-up
cost or the need to send anything to other processes.  Blobs are decoded in
the same kind of thread pool (numpy and zstd release the GIL too), one level of
delta depth at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from hydra_cas import fsio
from hydra_cas.archive import MAX_DELTA_DEPTH
from hydra_cas.errors import HydraError, IntegrityError, ManifestError, StorageError
from hydra_cas.gc import (
    DEFAULT_GRACE_PERIOD,
    find_leftovers,
    human_bytes,
    human_duration,
    remove_leftovers,
)
from hydra_cas.layout import is_oid
from hydra_cas.manifest import FORMAT_VERSION, replay, utc_now, validate_manifest
from hydra_cas.progress import progress_bar

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from pathlib import Path

    from hydra_cas.archive import Archive, BlobHeader, Recipe
    from hydra_cas.gc import Leftover
    from hydra_cas.manifest import Models
    from hydra_cas.store import Store

__all__ = [
    "ERROR",
    "INFO",
    "WARNING",
    "Finding",
    "FsckReport",
    "check",
    "sha256_file",
]

logger = logging.getLogger(__name__)

ERROR = "error"
WARNING = "warning"
INFO = "info"
_SEVERITY_ORDER = {ERROR: 0, WARNING: 1, INFO: 2}

# Finding kinds.
MANIFEST_MISSING = "manifest-missing"
MANIFEST_UNREADABLE = "manifest-unreadable"
JOURNAL_UNREADABLE = "journal-unreadable"
JOURNAL_TORN = "journal-torn"
JOURNAL_AHEAD = "journal-ahead"
JOURNAL_BEHIND = "journal-behind"
JOURNAL_MISMATCH = "journal-mismatch"
OBJECT_MISSING = "object-missing"
OBJECT_SIZE = "object-size"
OBJECT_HASH = "object-hash"
OBJECT_UNREADABLE = "object-unreadable"
BROKEN_REF = "broken-ref"
BROKEN_REF_INTACT = "broken-ref-intact"
ORPHAN = "orphan"
STRAY_FILE = "stray-file"
STALE_TEMP = "stale-temp"
STALE_INTENT = "stale-intent"
QUARANTINE = "quarantine"
ARCHIVE_RECIPE_MISSING = "archive-recipe-missing"
ARCHIVE_RECIPE_CORRUPT = "archive-recipe-corrupt"
ARCHIVE_BLOB_MISSING = "archive-blob-missing"
ARCHIVE_BLOB_CORRUPT = "archive-blob-corrupt"
ARCHIVE_ORPHAN = "archive-orphan"

_REFS_KINDS = frozenset(
    {MANIFEST_MISSING, MANIFEST_UNREADABLE, JOURNAL_UNREADABLE, JOURNAL_TORN, JOURNAL_AHEAD,
     JOURNAL_BEHIND, JOURNAL_MISMATCH}
)
_CHUNK = 4 * 1024 * 1024
# Below this many bytes to hash, a pool costs more than it saves.
_POOL_MIN_BYTES = 16 * 1024 * 1024
_RENDER_PER_KIND = 10
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem (or fact worth knowing) found by fsck."""

    kind: str
    severity: str
    message: str
    path: str | None = None
    oid: str | None = None
    refs: tuple[str, ...] = ()
    """Every ``name:version`` the problem affects."""
    repaired: bool = False

    @property
    def subject(self) -> str:
        return self.oid or self.path or ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "severity": self.severity,
            "message": self.message,
            "path": self.path,
            "oid": self.oid,
            "refs": list(self.refs),
            "repaired": self.repaired,
        }


@dataclass(frozen=True, slots=True)
class FsckReport:
    """The outcome of :func:`check`.

    ``findings`` is what the (first) check found, each flagged ``repaired`` when
    repair fixed it; ``remaining`` is what the final check found (after repair,
    the re-check; otherwise the same as ``findings``).  ``ok`` and ``exit_code``
    judge ``remaining``.
    """

    root: str
    findings: tuple[Finding, ...]
    remaining: tuple[Finding, ...]
    repair: bool
    sample: float | None
    refs_checked: int
    objects_checked: int
    objects_hashed: int
    bytes_hashed: int
    seconds: float
    workers: int
    hash_mode: str
    archived_checked: int = 0
    """Archived versions whose recipe and blobs were looked at."""
    blobs_checked: int = 0
    """Tensor blobs whose presence and header were checked."""
    blobs_verified: int = 0
    """Tensor blobs decoded and re-hashed (all of them, or those of a sample)."""
    archive_bytes: int = 0
    """Raw tensor bytes those decodes produced."""

    @property
    def ok(self) -> bool:
        return not any(f.severity != INFO for f in self.remaining)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    @property
    def counts(self) -> dict[str, int]:
        """Findings per kind (of ``findings``)."""
        counts: dict[str, int] = {}
        for f in self.findings:
            counts[f.kind] = counts.get(f.kind, 0) + 1
        return counts

    @property
    def repaired(self) -> int:
        return sum(f.repaired for f in self.findings)

    @property
    def throughput(self) -> float:
        """Bytes verified per second of the whole run."""
        return self.bytes_hashed / self.seconds if self.seconds > 0 else 0.0

    def _parallelism(self) -> str:
        return "one thread" if self.hash_mode == "inline" else f"{self.workers} {self.hash_mode}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "root": self.root,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "repair": self.repair,
            "sample": self.sample,
            "counts": self.counts,
            "findings": [f.to_dict() for f in self.findings],
            "refs_checked": self.refs_checked,
            "objects_checked": self.objects_checked,
            "objects_hashed": self.objects_hashed,
            "bytes_hashed": self.bytes_hashed,
            "seconds": round(self.seconds, 3),
            "workers": self.workers,
            "hash_mode": self.hash_mode,
            "archived_checked": self.archived_checked,
            "blobs_checked": self.blobs_checked,
            "blobs_verified": self.blobs_verified,
            "archive_bytes": self.archive_bytes,
        }
        if self.repair:
            out["remaining"] = [f.to_dict() for f in self.remaining]
            out["repaired"] = self.repaired
        return out

    def render(self, *, verbose: bool = False) -> str:
        """A report for humans; at most 10 findings of each kind unless ``verbose``."""
        problems = [f for f in self.remaining if f.severity != INFO]
        head = "clean" if not problems else f"{len(problems)} problem(s) remain"
        if self.repair:
            head += f" after repairing {self.repaired}"
        sampled = f", {self.sample:g}% sample" if self.sample is not None else ""
        lines = [
            f"fsck of {self.root}: {head}",
            f"  checked {self.refs_checked} refs and {self.objects_checked} objects; hashed "
            f"{self.objects_hashed} objects ({human_bytes(self.bytes_hashed)}{sampled}) in "
            f"{self.seconds:.2f} s ({human_bytes(self.throughput)}/s, {self._parallelism()})",
        ]
        if self.archived_checked or self.blobs_checked:
            lines.append(
                f"  checked {self.archived_checked} archived versions and {self.blobs_checked} tensor blobs; "
                f"decoded {self.blobs_verified} blobs ({human_bytes(self.archive_bytes)})"
            )
        shown = list(self.findings)
        if self.repair:
            # Show what the first check found, then anything new the re-check found.
            seen = {(f.kind, f.subject) for f in self.findings}
            shown += [f for f in self.remaining if (f.kind, f.subject) not in seen]
        lines.extend(_render_findings(shown, verbose))
        if problems and not self.repair:
            lines.append("  run `hydra-cas fsck --repair` to quarantine corrupt objects and clean up")
        return "\n".join(lines)


def _render_findings(findings: list[Finding], verbose: bool) -> list[str]:
    lines: list[str] = []
    per_kind: dict[str, int] = {}
    for f in findings:
        n = per_kind[f.kind] = per_kind.get(f.kind, 0) + 1
        if n > _RENDER_PER_KIND and not verbose:
            continue
        mark = " [repaired]" if f.repaired else ""
        lines.append(f"  {f.severity.upper():7} {f.kind}: {f.message}{mark}")
        if f.refs:
            refs = ", ".join(f.refs[:20]) + (f", ... ({len(f.refs)} in all)" if len(f.refs) > 20 else "")
            lines.append(f"          affects {refs}")
    for kind, n in per_kind.items():
        if n > _RENDER_PER_KIND and not verbose:
            lines.append(f"  ... and {n - _RENDER_PER_KIND} more {kind} findings (see --json)")
    return lines


# ---------------------------------------------------------------------- hashing

_local = threading.local()


def sha256_file(path: str) -> tuple[str | None, int, str | None]:
    """(SHA-256 hex, bytes read, None) of a file, streamed; or (None, 0, reason) on failure.

    Takes and returns only strings and ints so it can run in another process.
    """
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = bytearray(_CHUNK)  # reused: fresh buffers cost page faults
    view = memoryview(buf)
    sha = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                sha.update(view[:n])
                size += n
    except FileNotFoundError:
        return None, 0, "missing"
    except OSError as exc:
        return None, 0, exc.strerror or str(exc)
    return sha.hexdigest(), size, None


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _hash_files(
    files: list[_ObjectFile], workers: int, mode: str, progress: bool
) -> tuple[dict[str, tuple[str | None, int, str | None]], str]:
    """Hash ``files`` (largest first, for an even spread); results by path, and the mode used."""
    total = sum(f.size for f in files)
    if workers <= 1 or len(files) <= 1 or total < _POOL_MIN_BYTES:
        mode = "inline"
    ordered = sorted(files, key=lambda f: f.size, reverse=True)
    results: dict[str, tuple[str | None, int, str | None]] = {}
    bar = progress_bar(total, "fsck", enabled=progress and bool(files), unit="B")
    try:
        if mode == "inline":
            for f in ordered:
                results[f.path] = sha256_file(f.path)
                bar.update(f.size)
            return results, "inline"
        pool: Executor
        if mode == "processes":
            import multiprocessing

            # spawn, not fork: the parent may run threads (ours, the caller's).
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        else:
            pool = ThreadPoolExecutor(workers, thread_name_prefix="hydra-fsck")
        with pool:
            futures = {pool.submit(sha256_file, f.path): f for f in ordered}
            for future in as_completed(futures):
                f = futures[future]
                results[f.path] = future.result()
                bar.update(f.size)
        return results, mode
    finally:
        bar.close()


# ---------------------------------------------------------------------- one pass of checks


@dataclass(frozen=True, slots=True)
class _ObjectFile:
    oid: str
    path: str
    size: int
    ino: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class _Ref:
    name: str
    version: str
    entry: Mapping[str, Any]

    @property
    def label(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(slots=True)
class _Pass:
    """What one run of the checks saw; repair acts on it."""

    findings: list[Finding] = field(default_factory=list)
    manifest_state: str = "ok"  # "ok", "missing" or "unreadable"
    doc: dict[str, Any] | None = None
    records: list[dict[str, Any]] | None = None
    torn: bool = False
    models: Models | None = None
    corrupt: dict[str, tuple[str, _ObjectFile]] = field(default_factory=dict)  # oid -> (kind, file)
    missing: set[str] = field(default_factory=set)
    intact: dict[str, _ObjectFile] = field(default_factory=dict)
    stray: list[str] = field(default_factory=list)
    leftovers: list[Leftover] = field(default_factory=list)
    refs_checked: int = 0
    objects_checked: int = 0
    objects_hashed: int = 0
    bytes_hashed: int = 0
    hash_mode: str = "inline"
    # The archive tier: payload oid -> (kind, id) of each damage it suffers;
    # (kind, id) -> (quarantine label, file) of damaged recipes and blobs;
    # oids whose archived form rebuilt and verified; oids of archived versions
    # marked broken that repair may heal; and what the archive checks did.
    archive_bad: dict[str, set[tuple[str, str]]] = field(default_factory=dict)
    archive_quarantine: dict[tuple[str, str], tuple[str, _ObjectFile]] = field(default_factory=dict)
    archive_verified: set[str] = field(default_factory=set)
    archive_heal: set[str] = field(default_factory=set)
    archived_checked: int = 0
    blobs_checked: int = 0
    blobs_verified: int = 0
    archive_bytes: int = 0

    def add(self, kind: str, severity: str, message: str, **where: Any) -> None:
        self.findings.append(Finding(kind, severity, message, **where))


def _refs_by_oid(models: Models) -> dict[str, list[_Ref]]:
    by_oid: dict[str, list[_Ref]] = {}
    for name in sorted(models):
        versions = models[name]["versions"]
        for version in sorted(versions):
            entry = versions[version]
            by_oid.setdefault(entry["oid"], []).append(_Ref(name, version, entry))
    return by_oid


def _ref_diff(a: Models, b: Models) -> list[str]:
    """The ``name:version`` and ``name@alias`` keys on which two sets of models differ."""
    diff = []
    for name in sorted(set(a) | set(b)):
        ma = a.get(name, {"versions": {}, "aliases": {}})
        mb = b.get(name, {"versions": {}, "aliases": {}})
        for v in sorted(set(ma["versions"]) | set(mb["versions"])):
            if ma["versions"].get(v) != mb["versions"].get(v):
                diff.append(f"{name}:{v}")
        for alias in sorted(set(ma["aliases"]) | set(mb["aliases"])):
            if ma["aliases"].get(alias) != mb["aliases"].get(alias):
                diff.append(f"{name}@{alias}")
    return diff


def _read_refs_files(
    store: Store, manifest_path: str
) -> tuple[bytes, str | None, tuple[list[dict[str, Any]], bool] | Exception]:
    """The manifest's bytes (or why not) and the journal's records (or the error)."""
    raw, error = b"", None
    try:
        with open(manifest_path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        error = "missing"
    except OSError as exc:
        error = f"cannot be read ({exc.strerror})"
    journal: tuple[list[dict[str, Any]], bool] | Exception
    try:
        journal = store.manifest.journal.read()
    except (ManifestError, StorageError) as exc:
        journal = exc
    return raw, error, journal


def _check_refs(store: Store, p: _Pass, *, locked: bool = False) -> None:
    """Manifest and journal: readable, valid, and telling the same story.

    ``locked``: the caller already holds the store lock (flock is not re-entrant).
    """
    layout = store.layout
    manifest_path, journal_path = str(layout.manifest), str(layout.journal)
    problem = None
    # Read both files under the lock: a commit between the two reads would look
    # exactly like a crash between the journal and manifest writes.  A store we
    # cannot lock (read-only media) is read without it.
    lock = store.manifest.lock()
    held = False
    if not locked:
        try:
            lock.__enter__()
            held = True
        except HydraError as exc:
            logger.debug("fsck reads without the store lock: %s", exc)
    try:
        raw, raw_error, journal_read = _read_refs_files(store, manifest_path)
    finally:
        if held:
            lock.__exit__(None, None, None)
    if raw_error == "missing":
        p.manifest_state = "missing"
    elif raw_error is not None:
        problem = raw_error
    else:
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            problem = "is not valid JSON"
        else:
            try:
                p.doc = validate_manifest(doc)
            except ManifestError as exc:
                problem = f"is invalid: {exc}"
    if problem is not None:
        p.manifest_state = "unreadable"

    journal_problem = None
    before: Models = {}  # the journal replayed up to the manifest's journal_seq (or all of it)
    full: Models | None = None
    if isinstance(journal_read, Exception):
        journal_problem = str(journal_read)
    else:
        read, p.torn = journal_read
        # One replay serves both comparisons: replaying copies each touched model per record.
        cut = min(p.doc["journal_seq"], len(read)) if p.doc is not None else len(read)
        try:
            before = replay(read[:cut])
            full = replay(read[cut:], before)
            p.records = read
        except ManifestError as exc:
            journal_problem = f"its records do not replay: {exc}"
    if journal_problem is not None:
        fix = (
            "`hydra-cas fsck --repair` rewrites it from manifest.json and keeps the old one in quarantine/"
            if p.doc is not None
            else "restore journal.jsonl or manifest.json from a backup"
        )
        p.add(JOURNAL_UNREADABLE, ERROR, f"journal.jsonl is unusable: {journal_problem}; {fix}",
              path=journal_path)
    if p.torn:
        p.add(JOURNAL_TORN, WARNING,
              "journal.jsonl ends in a torn line left by a crash mid-append; readers ignore it and "
              "`--repair` (or the next write) cuts it off", path=journal_path)

    records = p.records
    if p.doc is None:
        if p.manifest_state == "unreadable":
            fix = (
                f"`hydra-cas fsck --repair` rebuilds it from the journal ({len(records)} records) and "
                "keeps the damaged file in quarantine/"
                if records is not None
                else "the journal cannot rebuild it either: restore manifest.json from a backup"
            )
            p.add(MANIFEST_UNREADABLE, ERROR, f"manifest.json {problem}; {fix}", path=manifest_path)
        elif records:
            p.add(MANIFEST_MISSING, ERROR,
                  f"manifest.json is missing but the journal has {len(records)} records; "
                  "`hydra-cas fsck --repair` rebuilds it from the journal", path=manifest_path)
        p.models = full if records is not None else None
        return

    doc = p.doc
    p.models = doc["models"]
    if records is None:
        return
    seq, last = doc["journal_seq"], len(records)
    if last < seq:
        p.add(JOURNAL_BEHIND, ERROR,
              f"manifest.json reflects journal record {seq} but the journal ends at {last} (truncated "
              "or replaced); writes fail until `hydra-cas fsck --repair` re-bases the journal on the "
              "manifest",
              path=journal_path)
        return
    if before != doc["models"]:
        diff = _ref_diff(before, doc["models"])
        p.add(JOURNAL_MISMATCH, ERROR,
              f"replaying the journal's first {seq} records does not give manifest.json ({len(diff)} "
              f"refs differ: {', '.join(diff[:10])}); `--repair` keeps the manifest (what loads have "
              "been using) and appends journal records to match it",
              path=journal_path, refs=tuple(d for d in diff if ":" in d))
    if last > seq:
        try:
            p.models = full if before == doc["models"] else replay(records[seq:], doc["models"])
            outcome = "`hydra-cas fsck --repair` (or the next write) rolls them forward"
        except ManifestError as exc:
            outcome = f"they do not apply to the manifest ({exc}); `--repair` re-bases the journal on it"
        pending = sorted({f"{r['name']}:{r['version']}" for r in records[seq:] if "version" in r})
        p.add(JOURNAL_AHEAD, ERROR,
              f"journal records {seq + 1}..{last} are not in manifest.json (a writer stopped between "
              f"the journal and the manifest); {outcome}", path=journal_path, refs=tuple(pending))


def _scan_objects(store: Store) -> tuple[dict[str, _ObjectFile], list[str]]:
    """Every object file, and every other entry under objects/sha256 (stray)."""
    objects: dict[str, _ObjectFile] = {}
    stray: list[str] = []
    try:
        fanouts = os.scandir(store.layout.objects)
    except FileNotFoundError:
        return objects, stray
    with fanouts:
        for fan in fanouts:
            if not (len(fan.name) == 2 and set(fan.name) <= _HEX and fan.is_dir(follow_symlinks=False)):
                stray.append(fan.path)
                continue
            with os.scandir(fan.path) as entries:
                for entry in entries:
                    oid = fan.name + entry.name
                    try:
                        if is_oid(oid) and entry.is_file(follow_symlinks=False):
                            st = entry.stat(follow_symlinks=False)
                            objects[oid] = _ObjectFile(oid, entry.path, st.st_size, st.st_ino, st.st_mtime_ns)
                        else:
                            stray.append(entry.path)
                    except FileNotFoundError:
                        continue  # gc removed it meanwhile
    return objects, stray


def _check_objects(
    store: Store, p: _Pass, sample: float | None, workers: int, mode: str, progress: bool,
    cache: dict[tuple[str, int, int, int], str],
) -> None:
    """Existence and size of every referenced object; SHA-256 of all (or a sample)."""
    objects, p.stray = _scan_objects(store)
    p.objects_checked = len(objects)
    if objects and p.manifest_state == "missing" and not p.records and p.models is not None:
        p.add(MANIFEST_MISSING, ERROR,
              f"objects/ holds {len(objects)} objects but manifest.json and the journal are missing or "
              "empty, so no version names them: restore manifest.json or journal.jsonl from a backup "
              "(gc refuses to run meanwhile); if the store is really unused, remove objects/ by hand",
              path=str(store.layout.manifest))
        p.models = None  # every object would look orphaned; judge none
    by_oid = _refs_by_oid(p.models) if p.models is not None else {}
    p.refs_checked = sum(len(refs) for refs in by_oid.values())
    to_hash = _check_presence(store, p, objects, by_oid)
    if p.models is not None:
        to_hash += _check_orphans(p, objects, by_oid)
    if sample is not None and sample < 100 and to_hash:
        to_hash = random.sample(to_hash, max(1, math.ceil(len(to_hash) * sample / 100)))
    _check_hashes(store, p, to_hash, by_oid, workers, mode, progress, cache)
    _note_broken_refs(p, objects, by_oid)


def _check_presence(
    store: Store, p: _Pass, objects: dict[str, _ObjectFile], by_oid: dict[str, list[_Ref]]
) -> list[_ObjectFile]:
    """Report missing and wrong-size referenced objects; return the rest, to hash."""
    to_hash = []
    for oid, refs in by_oid.items():
        obj = objects.get(oid)
        if obj is None:
            # Archived versions have no object by design; the archive pass checks them.
            hot = [r for r in refs if r.entry["tier"] == "hot"]
            if hot:
                _report_missing(p, store, oid, hot)
            continue
        sizes = {r.entry["size"] for r in refs}
        if sizes != {obj.size}:
            expected = "/".join(str(s) for s in sorted(sizes))
            p.corrupt[oid] = (OBJECT_SIZE, obj)
            p.add(OBJECT_SIZE, ERROR,
                  f"object {oid} has {obj.size} bytes, the manifest records {expected}: truncated or "
                  "damaged; `--repair` moves it to quarantine/ and marks its hot versions broken",
                  path=obj.path, oid=oid, refs=_hot_labels(refs))
            continue
        to_hash.append(obj)
    return to_hash


def _check_orphans(
    p: _Pass, objects: dict[str, _ObjectFile], by_oid: dict[str, list[_Ref]]
) -> list[_ObjectFile]:
    """Report unreferenced objects; return them, to hash (a save may reuse one)."""
    orphans = []
    now = time.time()
    for oid, obj in objects.items():
        if oid in by_oid:
            continue
        age = now - obj.mtime_ns / 1e9
        p.add(ORPHAN, INFO,
              f"object {oid} ({human_bytes(obj.size)}, {human_duration(age)} old) is not referenced; "
              "`hydra-cas gc` deletes it once it is older than the grace period",
              path=obj.path, oid=oid)
        orphans.append(obj)
    return orphans


def _check_hashes(
    store: Store, p: _Pass, chosen: list[_ObjectFile], by_oid: dict[str, list[_Ref]], workers: int,
    mode: str, progress: bool, cache: dict[tuple[str, int, int, int], str],
) -> None:
    """Re-hash ``chosen`` (unless this run already did, for the same file) and judge each."""
    todo = [f for f in chosen if (f.path, f.ino, f.size, f.mtime_ns) not in cache]
    results, p.hash_mode = _hash_files(todo, workers, mode, progress)
    for f in todo:
        digest, size, _ = results[f.path]
        p.objects_hashed += 1
        p.bytes_hashed += size
        if digest is not None:
            cache[(f.path, f.ino, f.size, f.mtime_ns)] = digest
    for f in chosen:
        refs = by_oid.get(f.oid, [])
        digest = cache.get((f.path, f.ino, f.size, f.mtime_ns))
        if digest is None:
            error = results[f.path][2]
            if error == "missing":
                hot = [r for r in refs if r.entry["tier"] == "hot"]
                if hot:
                    _report_missing(p, store, f.oid, hot)
                continue  # an orphan gc deleted meanwhile
            p.add(OBJECT_UNREADABLE, ERROR,
                  f"object {f.oid} cannot be read ({error}); check the disk and permissions, then "
                  "run fsck again",
                  path=f.path, oid=f.oid, refs=_hot_labels(refs))
        elif digest != f.oid:
            p.corrupt[f.oid] = (OBJECT_HASH, f)
            labels = _hot_labels(refs)
            p.add(OBJECT_HASH, ERROR,
                  f"object {f.oid} hashes to {digest}: its bytes are corrupt; `--repair` moves it to "
                  "quarantine/" + (" and marks its versions broken" if labels else ""),
                  path=f.path, oid=f.oid, refs=labels)
        else:
            p.intact[f.oid] = f


def _hot_labels(refs: Iterable[_Ref]) -> tuple[str, ...]:
    """The hot versions among ``refs``: those an object's damage affects.

    Archived versions have their own bytes, judged by :func:`_check_archive`.
    """
    return tuple(r.label for r in refs if r.entry["tier"] == "hot")


def _note_broken_refs(p: _Pass, objects: dict[str, _ObjectFile], by_oid: dict[str, list[_Ref]]) -> None:
    """Hot versions already marked broken whose object is present (missing ones were reported).

    Archived versions marked broken are judged by :func:`_check_archive`.
    """
    for oid, refs in by_oid.items():
        broken = [r.label for r in refs if r.entry["status"] != "ok" and r.entry["tier"] == "hot"]
        if not broken or oid in p.corrupt or oid in p.missing:
            continue
        if oid in p.intact:
            p.add(BROKEN_REF_INTACT, INFO,
                  f"marked broken, but object {oid} is present and verifies; `--repair` marks them ok again",
                  oid=oid, refs=tuple(broken))
        elif oid in objects:
            p.add(BROKEN_REF, INFO,
                  f"marked broken; object {oid} is present but was not verified in this sampled run",
                  oid=oid, refs=tuple(broken))


def _report_missing(p: _Pass, store: Store, oid: str, hot: list[_Ref]) -> None:
    unmarked = [r for r in hot if r.entry["status"] == "ok"]
    labels = tuple(r.label for r in hot)
    if not unmarked:
        p.add(BROKEN_REF, INFO,
              f"marked broken: object {oid} is missing (see quarantine/); loads fail until the "
              "version is saved again or deleted", oid=oid, refs=labels)
        return
    if oid in p.missing:
        return
    p.missing.add(oid)
    p.add(OBJECT_MISSING, ERROR,
          f"object {oid} is missing; `--repair` marks the {len(unmarked)} version(s) still marked "
          "ok as broken",
          path=str(store.layout.oid_to_path(oid)), oid=oid, refs=labels)


def _confirm_missing(store: Store, p: _Pass) -> None:
    """Drop missing-object findings that a concurrent delete and gc explain.

    fsck reads the refs once, without the lock; a version deleted since (and its
    object collected) is no loss.  Neither is an object saved again meanwhile.
    """
    if not p.missing or p.doc is None:
        return
    try:
        still = _refs_by_oid(store.manifest.read()["models"])
    except HydraError:
        return
    for oid in list(p.missing):
        wanted = any(r.entry["tier"] == "hot" and r.entry["status"] == "ok" for r in still.get(oid, ()))
        if not wanted or os.path.lexists(store.layout.oid_to_path(oid)):
            p.missing.discard(oid)
            p.findings = [f for f in p.findings if not (f.kind == OBJECT_MISSING and f.oid == oid)]


# ---------------------------------------------------------------------- the archive tier


@dataclass(slots=True)
class _Blob:
    """One tensor blob met while walking the archive, and what became of it."""

    tid: str
    path: str
    file: _ObjectFile | None = None
    header: BlobHeader | None = None
    status: str = "unchecked"  # "ok", "missing", "corrupt", "base-bad" (judged by its base) or "unchecked"
    reason: str = ""


def _walk_blobs(archive: Archive, roots: Iterable[str], blobs: dict[str, _Blob]) -> None:
    """Stat and read the header of every blob ``roots`` need, following delta bases (bounded by depth)."""
    stack = list(roots)
    while stack:
        tid = stack.pop()
        if tid in blobs:
            continue
        path = archive.tensor_path(tid)
        blob = blobs[tid] = _Blob(tid, str(path))
        try:
            st = os.stat(path)
        except FileNotFoundError:
            blob.status, blob.reason = "missing", "is missing"
            continue
        blob.file = _ObjectFile(tid, str(path), st.st_size, st.st_ino, st.st_mtime_ns)
        try:
            blob.header = archive.blob_header(tid)
        except IntegrityError as exc:
            if not os.path.lexists(path):
                blob.status, blob.reason = "missing", "is missing"
            else:
                blob.status, blob.reason = "corrupt", str(exc)
            continue
        if blob.header.base is not None:
            stack.append(blob.header.base)


def _chain(blobs: dict[str, _Blob], tid: str) -> list[str]:
    """``tid`` and the bases under it, as far as the walk could read them."""
    chain = [tid]
    for _ in range(MAX_DELTA_DEPTH):
        header = blobs[chain[-1]].header
        if header is None or header.base is None or header.base in chain:
            break
        chain.append(header.base)
    return chain


def _pool_map(fn: Callable[[Any], Any], items: list[Any], weight: int, workers: int) -> list[Any]:
    """``[fn(x) for x in items]``, in a thread pool when there is enough work.

    Decoding runs in numpy and zstd and hashing in hashlib, which release the GIL.
    """
    if workers <= 1 or len(items) <= 1 or weight < _POOL_MIN_BYTES:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers, thread_name_prefix="hydra-fsck") as pool:
        return list(pool.map(fn, items))


def _verify_blobs(
    archive: Archive, blobs: dict[str, _Blob], chosen: set[str], workers: int, bar: Any
) -> tuple[int, int]:
    """Decode and re-hash each chosen blob, bases before deltas; (blobs decoded, raw bytes).

    A delta is judged only once its base verified: when the base is bad, the
    delta is "base-bad", affected but not itself known to be damaged.
    """
    count = total = 0
    levels: dict[int, list[_Blob]] = {}
    for tid in chosen:
        blob = blobs[tid]
        if blob.status == "unchecked" and blob.header is not None:
            levels.setdefault(blob.header.depth, []).append(blob)

    def verify(blob: _Blob) -> tuple[str, str]:
        header = blob.header
        assert header is not None
        try:
            archive.tensor_bytes(blob.tid, header.raw_size, header.dtype, verify=True)
        except IntegrityError as exc:
            if not os.path.lexists(blob.path):
                return "missing", "is missing"
            if any(not os.path.lexists(blobs[b].path) for b in _chain(blobs, blob.tid)[1:]):
                # A base collected while we read (an unneeded chain, or a restore
                # and gc meanwhile): the delta is not known to be damaged.
                return "base-bad", "a delta base vanished while it was checked"
            return "corrupt", str(exc)
        return "ok", ""

    for depth in sorted(levels):
        todo = []
        for blob in levels[depth]:
            header = blob.header
            assert header is not None
            base = blobs.get(header.base) if header.base is not None else None
            if base is not None and base.status in ("missing", "corrupt", "base-bad"):
                blob.status, blob.reason = "base-bad", f"its delta base {base.tid} is damaged"
                continue
            todo.append(blob)
        weight = sum(b.header.raw_size for b in todo if b.header is not None)
        for blob, (status, reason) in zip(todo, _pool_map(verify, todo, weight, workers), strict=True):
            blob.status, blob.reason = status, reason
            size = blob.header.raw_size if blob.header is not None else 0
            count += 1
            total += size
            bar.update(size)
    return count, total


def _rebuild(archive: Archive, recipe: Recipe) -> tuple[str | None, int, str]:
    """(SHA-256, size, problem) of the payload a recipe rebuilds; the digest is None on failure."""
    sha = hashlib.sha256()
    size = 0
    try:
        for chunk in archive.iter_payload(recipe, verify_tensors=False):
            sha.update(chunk)
            size += len(chunk)
    except IntegrityError as exc:
        return None, size, str(exc)
    return sha.hexdigest(), size, ""


def _file_of(ident: str, path: Path) -> _ObjectFile | None:
    """What fsck saw of a file, to move it aside later only if it is still that file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return _ObjectFile(ident, str(path), st.st_size, st.st_ino, st.st_mtime_ns)


class _ArchiveCheck:
    """One pass over the archive tier; each damage is reported with the versions it breaks."""

    def __init__(self, store: Store, p: _Pass, models: Models) -> None:
        self.store = store
        self.archive = store.archive_tier
        self.p = p
        self.archived: dict[str, list[_Ref]] = {}
        for oid, refs in _refs_by_oid(models).items():
            on_tier = [r for r in refs if r.entry["tier"] == "archive"]
            if on_tier:
                self.archived[oid] = on_tier
        self.affected: dict[tuple[str, str], set[str]] = {}  # (kind, id) of a damage -> payload oids
        self.recipes: dict[str, Recipe] = {}
        self.blobs: dict[str, _Blob] = {}
        self.closure: dict[str, set[str]] = {}  # payload oid -> every tid it needs, bases included

    def damage(self, kind: str, ident: str, oids: Iterable[str], message: str, path: str,
               quarantine: _ObjectFile | None = None, label: str = "") -> None:
        p = self.p
        oids = sorted(set(oids))
        refs = sorted((r for oid in oids for r in self.archived.get(oid, ())),
                      key=lambda r: (r.name, r.version))
        if not refs and kind == ARCHIVE_BLOB_MISSING:
            return  # an unneeded blob collected by a concurrent gc
        unmarked = [r for r in refs if r.entry["status"] == "ok"]
        severity = ERROR if unmarked or not refs else INFO
        if refs and not unmarked:
            message = f"marked broken: {message}"
            if quarantine is not None:
                # Set aside even so: a damaged recipe left in place would hide
                # from gc which blobs it needs and stop the archive sweep.
                message += "; `--repair` moves it to quarantine/"
        elif quarantine is not None:
            message += "; `--repair` moves it to quarantine/" + (
                " and marks the versions needing it broken (or brings them back to the hot tier when "
                "their hot copy verifies)" if refs else "")
        else:
            message += ("; `--repair` marks the versions needing it broken (or brings them back to the "
                        "hot tier when their hot copy verifies)")
        p.add(kind, severity, message, path=path, oid=ident, refs=tuple(r.label for r in refs))
        key = (kind, ident)
        self.affected[key] = set(oids)
        if quarantine is not None:
            p.archive_quarantine[key] = (label, quarantine)
        if unmarked:
            for oid in oids:
                p.archive_bad.setdefault(oid, set()).add(key)

    def read_recipes(self) -> None:
        """Each recipe must exist, parse against its own header, and match the manifest's size."""
        for oid in sorted(self.archived):
            path = self.archive.recipe_path(oid)
            label = f"archive-recipe.{oid}"
            try:
                recipe = self.archive.read_recipe(oid)
            except IntegrityError as exc:
                seen = _file_of(oid, path)
                if seen is None:
                    self.damage(ARCHIVE_RECIPE_MISSING, oid, [oid],
                                f"archive recipe of object {oid} is missing", str(path))
                else:
                    self.damage(ARCHIVE_RECIPE_CORRUPT, oid, [oid],
                                f"archive recipe of object {oid} is damaged: {exc}", str(path), seen, label)
                continue
            sizes = {r.entry["size"] for r in self.archived[oid]}
            if sizes != {recipe.size}:
                recorded = "/".join(str(s) for s in sorted(sizes))
                self.damage(ARCHIVE_RECIPE_CORRUPT, oid, [oid],
                            f"archive recipe of object {oid} rebuilds {recipe.size} bytes, the manifest "
                            f"records {recorded}", str(path), _file_of(oid, path), label)
                continue
            self.recipes[oid] = recipe

    def walk(self) -> set[str]:
        """Every chain from the readable recipes, then from the blobs nothing needs; the latter's ids."""
        tids = (t.tid for r in self.recipes.values() for t in r.tensors if t.tid is not None)
        _walk_blobs(self.archive, tids, self.blobs)
        orphans = {tid for tid, _ in self.archive.iter_files("tensors")} - set(self.blobs)
        _walk_blobs(self.archive, orphans, self.blobs)
        self.p.blobs_checked = len(self.blobs)
        for oid, recipe in self.recipes.items():
            self.closure[oid] = {
                tid for t in recipe.tensors if t.tid is not None for tid in _chain(self.blobs, t.tid)
            }
        return orphans

    def judge_blobs(self) -> None:
        users: dict[str, set[str]] = {}
        for oid, tids in self.closure.items():
            for tid in tids:
                users.setdefault(tid, set()).add(oid)
        for tid, blob in sorted(self.blobs.items()):
            if blob.status == "missing":
                self.damage(ARCHIVE_BLOB_MISSING, tid, users.get(tid, ()), f"tensor blob {tid} is missing",
                            blob.path)
            elif blob.status == "corrupt":
                self.damage(ARCHIVE_BLOB_CORRUPT, tid, users.get(tid, ()),
                            f"tensor blob {tid} is damaged: {blob.reason}", blob.path, blob.file,
                            f"archive-blob.{tid}")

    def rebuild_payloads(self, chosen: list[str], workers: int) -> None:
        """Rebuild and hash the chosen payloads whose blobs all verified."""
        whole = [oid for oid in chosen if all(self.blobs[t].status == "ok" for t in self.closure[oid])]
        weight = sum(self.recipes[oid].size for oid in whole)
        rebuilt = _pool_map(lambda oid: _rebuild(self.archive, self.recipes[oid]), whole, weight, workers)
        for oid, (digest, size, problem) in zip(whole, rebuilt, strict=True):
            if digest == oid and size == self.recipes[oid].size:
                self.p.archive_verified.add(oid)
                continue
            path = self.archive.recipe_path(oid)
            seen = _file_of(oid, path)
            if seen is None:
                continue  # restored and collected meanwhile; _confirm_archive judges the refs again
            why = problem or f"rebuilds to {size} bytes with SHA-256 {digest}"
            self.damage(ARCHIVE_RECIPE_CORRUPT, oid, [oid],
                        f"archive recipe of object {oid} names blobs that verify, but the payload {why}",
                        str(path), seen, f"archive-recipe.{oid}")


def _check_archive(store: Store, p: _Pass, sample: float | None, workers: int, progress: bool) -> None:
    """Recipes and tensor blobs of every archived version: present, readable, decoding to their ids.

    Presence and headers are checked for every archived version; decoding and
    the rebuild of the whole payload for all of them, or a ``sample`` share.
    NOTE: decoding always runs in threads, even in ``mode="processes"``: a
    blob's chain would have to be read again in every process that needs it.
    """
    if p.models is None:
        return
    run = _ArchiveCheck(store, p, p.models)
    p.archived_checked = sum(len(refs) for refs in run.archived.values())
    run.read_recipes()
    orphans = run.walk()

    chosen, orphans_chosen = list(run.recipes), sorted(orphans)
    if sample is not None and sample < 100:
        chosen = _sampled(chosen, sample)
        orphans_chosen = _sampled(orphans_chosen, sample)
    to_verify = {tid for oid in chosen for tid in run.closure[oid]}
    to_verify |= {tid for t in orphans_chosen for tid in _chain(run.blobs, t)}
    headers = [h for h in (run.blobs[t].header for t in to_verify) if h is not None]
    bar = progress_bar(sum(h.raw_size for h in headers), "fsck archive",
                       enabled=progress and bool(to_verify), unit="B")
    try:
        p.blobs_verified, p.archive_bytes = _verify_blobs(run.archive, run.blobs, to_verify, workers, bar)
    finally:
        bar.close()
    run.judge_blobs()
    run.rebuild_payloads(chosen, workers)

    _note_archived_broken(store, p, run.archived, {oid for oids in run.affected.values() for oid in oids})
    _note_archive_orphans(store, p, set(run.archived), set(run.blobs) - orphans)
    _confirm_archive(store, p, run.affected)


def _sampled(items: list[str], percent: float) -> list[str]:
    return random.sample(items, math.ceil(len(items) * percent / 100)) if items else []


def _note_archived_broken(store: Store, p: _Pass, archived: dict[str, list[_Ref]], damaged: set[str]) -> None:
    """Archived versions marked broken: healable (archived form or hot copy verifies) or not.

    ``damaged`` holds the oids a damage finding already names.
    """
    for oid, refs in sorted(archived.items()):
        broken = tuple(r.label for r in refs if r.entry["status"] != "ok")
        if not broken:
            continue
        if oid in p.archive_verified:
            p.archive_heal.add(oid)
            p.add(BROKEN_REF_INTACT, INFO,
                  f"marked broken, but the archived form of object {oid} rebuilds and verifies; "
                  "`--repair` marks them ok again", oid=oid, refs=broken)
        elif _hot_copy_verifies(store, p, oid):
            p.archive_heal.add(oid)
            p.add(BROKEN_REF_INTACT, INFO,
                  f"marked broken, but a hot copy of object {oid} verifies; `--repair` brings them back "
                  "to the hot tier", oid=oid, refs=broken)
        elif oid not in damaged:
            p.add(BROKEN_REF, INFO,
                  f"marked broken; the archived form of object {oid} was not verified in this sampled run",
                  oid=oid, refs=broken)
    # Damaged archived forms whose hot copy survives: hash that copy (even
    # outside a sample) so repair can bring the versions back instead.
    for oid in sorted(p.archive_bad):
        _hot_copy_verifies(store, p, oid)


def _hot_copy_verifies(store: Store, p: _Pass, oid: str) -> bool:
    """Whether the object file of ``oid`` exists and hashes to it (recorded in ``p.intact``)."""
    if oid in p.intact:
        return True
    if oid in p.corrupt:
        return False
    path = str(store.layout.oid_to_path(oid))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    digest, size, _ = sha256_file(path)
    p.objects_hashed += 1
    p.bytes_hashed += size
    if digest != oid:
        return False
    p.intact[oid] = _ObjectFile(oid, path, st.st_size, st.st_ino, st.st_mtime_ns)
    return True


def _note_archive_orphans(store: Store, p: _Pass, archived: set[str], needed: set[str]) -> None:
    """One info finding for recipes and blobs no archived version needs (gc's job)."""
    count = {"recipes": 0, "tensors": 0}
    size = 0
    archive = store.archive_tier
    for which, live in (("recipes", archived), ("tensors", needed)):
        for ident, path in archive.iter_files(which):
            if ident in live:
                continue
            try:
                size += os.lstat(path).st_size
            except FileNotFoundError:
                continue
            count[which] += 1
    if count["recipes"] or count["tensors"]:
        p.add(ARCHIVE_ORPHAN, INFO,
              f"archive/ holds {count['recipes']} recipes and {count['tensors']} tensor blobs "
              f"({human_bytes(size)}) no archived version needs; `hydra-cas gc` deletes them once they "
              "are older than the grace period", path=str(store.layout.archive))


def _confirm_archive(store: Store, p: _Pass, affected: dict[tuple[str, str], set[str]]) -> None:
    """Drop archive damage that a concurrent restore (and gc) explains.

    fsck reads the refs once, without the lock; a version restored to the hot
    tier since no longer needs its archived form, which gc may have removed,
    and a file missing then may have been written again by a new archive.
    """
    if not affected or p.doc is None:
        return
    try:
        now = _refs_by_oid(store.manifest.read()["models"])
    except HydraError:
        return
    still = {oid for oid, refs in now.items() if any(r.entry["tier"] == "archive" for r in refs)}
    archive = store.archive_tier
    gone: set[tuple[str, str]] = set()
    for key, oids in affected.items():
        kind, ident = key
        if oids and not oids & still:
            gone.add(key)
        elif kind == ARCHIVE_RECIPE_MISSING and archive.has_recipe(ident):
            gone.add(key)  # archived again meanwhile
        elif kind == ARCHIVE_BLOB_MISSING and os.path.lexists(archive.tensor_path(ident)):
            gone.add(key)
    if not gone:
        return
    p.findings = [f for f in p.findings if (f.kind, f.oid or "") not in gone]
    for key in gone:
        p.archive_quarantine.pop(key, None)
    for oid in list(p.archive_bad):
        p.archive_bad[oid] -= gone
        if not p.archive_bad[oid]:
            del p.archive_bad[oid]


def _check_files(store: Store, p: _Pass) -> None:
    """Stray entries in objects/, leftovers of dead saves, and the quarantine."""
    for path in p.stray:
        p.add(STRAY_FILE, WARNING,
              f"{path} is not an object (objects/sha256 holds only <2 hex>/<62 hex> files); "
              "`--repair` moves it to quarantine/", path=path)
    temps, intents = find_leftovers(store.layout, DEFAULT_GRACE_PERIOD)
    p.leftovers = [*temps, *intents]
    for item in temps:
        p.add(STALE_TEMP, WARNING,
              f"temp file {item.path} ({human_bytes(item.size)}, {human_duration(item.age)} old) was left by "
              "a save that died; `--repair` or `hydra-cas gc` removes it", path=item.path)
    for item in intents:
        p.add(STALE_INTENT, WARNING,
              f"intent {item.path} ({human_duration(item.age)} old) was left by a save that died; "
              "`--repair` or `hydra-cas gc` removes it", path=item.path, oid=item.oid)
    count, size = 0, 0
    try:
        with os.scandir(store.layout.quarantine) as entries:
            for entry in entries:
                count += 1
                size += entry.stat(follow_symlinks=False).st_size
    except FileNotFoundError:
        pass
    if count:
        p.add(QUARANTINE, INFO,
              f"quarantine/ holds {count} file(s) ({human_bytes(size)}) set aside by fsck --repair; "
              "inspect them and delete them by hand when no longer needed",
              path=str(store.layout.quarantine))


def _run_checks(
    store: Store, sample: float | None, workers: int, mode: str, progress: bool,
    cache: dict[tuple[str, int, int, int], str],
) -> _Pass:
    p = _Pass()
    _check_refs(store, p)
    _check_objects(store, p, sample, workers, mode, progress, cache)
    _confirm_missing(store, p)
    _check_archive(store, p, sample, workers, progress)
    _check_files(store, p)
    return p


# ---------------------------------------------------------------------- repair


def _timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def _quarantine(store: Store, src: str, label: str) -> str:
    """Move ``src`` into quarantine/ under ``<label>.<UTC time>``; never overwrite."""
    directory = store.layout.quarantine
    fsio.makedirs(directory)
    base = os.path.join(directory, f"{label}.{_timestamp()}")
    dest, n = base, 1
    while os.path.lexists(dest):
        dest, n = f"{base}-{n}", n + 1
    fsio.replace(src, dest)
    if store.durable:
        fsio.fsync_dir(directory)
    logger.warning("fsck: moved %s to %s", src, dest)
    return dest


def _cut_torn_tail(path: str) -> None:
    """Drop a journal's incomplete last line (never committed: its writer crashed)."""
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end == len(data):
        return
    try:
        os.truncate(path, end)
    except OSError as exc:
        raise StorageError(
            f"cannot cut the torn last line of {path}: {exc.strerror}", errno=exc.errno, path=path
        ) from exc
    logger.warning("fsck: cut a torn last line (%d bytes) off %s", len(data) - end, path)


def _diff_records(have: Models, want: Models) -> list[dict[str, Any]]:
    """Journal records (without seq/time) that turn ``have`` into ``want``."""
    empty: dict[str, Any] = {"versions": {}, "aliases": {}}
    records: list[dict[str, Any]] = []
    for name in sorted(set(have) | set(want)):
        hv, wv = have.get(name, empty)["versions"], want.get(name, empty)["versions"]
        for v in sorted(hv):
            if v not in wv or wv[v]["oid"] != hv[v]["oid"]:
                records.append({"op": "drop", "name": name, "version": v})
        for v in sorted(wv):
            if v not in hv or hv[v] != wv[v]:
                records.append({"op": "put", "name": name, "version": v, "entry": wv[v]})
    state = replay(records, have)
    for name in sorted(set(state) | set(want)):
        ha, wa = state.get(name, empty)["aliases"], want.get(name, empty)["aliases"]
        for alias in sorted(ha):
            if alias not in wa:
                records.append({"op": "unalias", "name": name, "alias": alias})
        for alias in sorted(wa):
            if ha.get(alias) != wa[alias]:
                records.append({"op": "alias", "name": name, "alias": alias, "version": wa[alias]})
    if replay(records, have) != want:  # a bug here must not be written to the journal
        raise ManifestError("fsck could not compute journal records that reproduce manifest.json")
    return records


def _stamp(records: list[dict[str, Any]], after: int) -> list[dict[str, Any]]:
    now = utc_now()
    return [{"seq": after + i, "time": now, **r} for i, r in enumerate(records, 1)]


def _repair_refs(store: Store, fixed: set[tuple[str, str]]) -> None:
    """Under the lock: make manifest.json and journal.jsonl whole and consistent."""
    layout = store.layout
    manifest_path, journal_path = str(layout.manifest), str(layout.journal)
    with store.manifest.lock():
        q = _Pass()
        _check_refs(store, q, locked=True)
        kinds = {f.kind for f in q.findings}
        if not kinds & _REFS_KINDS:
            return
        journal = store.manifest.journal
        records = q.records
        if q.doc is None:
            if records is None:
                logger.error("fsck: manifest.json and journal.jsonl are both unusable; cannot rebuild")
                return
            if q.torn:
                _cut_torn_tail(journal_path)
                fixed.add((JOURNAL_TORN, journal_path))
            if q.manifest_state == "unreadable":
                _quarantine(store, manifest_path, "manifest.json")
            rebuilt = {"format_version": FORMAT_VERSION, "journal_seq": len(records),
                       "models": replay(records)}
            store.manifest.rewrite(rebuilt)
            fixed.update({(MANIFEST_UNREADABLE, manifest_path), (MANIFEST_MISSING, manifest_path)})
            logger.warning("fsck: rebuilt manifest.json from %d journal records", len(records))
            return

        doc = q.doc
        if records is None:
            # Re-base: a fresh journal that replays to the manifest; the old one is kept.
            if os.path.lexists(journal_path):
                _quarantine(store, journal_path, "journal.jsonl")
            stamped = _stamp(_diff_records({}, doc["models"]), 0)
            if stamped:
                journal.append(stamped)
            store.manifest.rewrite({**doc, "journal_seq": len(stamped)})
            fixed.update({(JOURNAL_UNREADABLE, journal_path), (JOURNAL_TORN, journal_path)})
            logger.warning("fsck: rewrote journal.jsonl from manifest.json (%d records)", len(stamped))
            return

        if q.torn:
            _cut_torn_tail(journal_path)
            fixed.add((JOURNAL_TORN, journal_path))
        seq, last = doc["journal_seq"], len(records)
        target = doc["models"]
        if last > seq:
            try:
                target = replay(records[seq:], doc["models"])
            except ManifestError:
                logger.warning("fsck: journal records past %d do not apply to the manifest; reverting", seq)
        have = replay(records)
        new_seq = last
        if have != target:
            stamped = _stamp(_diff_records(have, target), last)
            journal.append(stamped)
            new_seq = last + len(stamped)
            logger.warning("fsck: appended %d journal records to match manifest.json", len(stamped))
        if new_seq != seq or target is not doc["models"]:
            new_doc = {"format_version": FORMAT_VERSION, "journal_seq": new_seq, "models": target}
            store.manifest.rewrite(new_doc)
        fixed.update({(k, journal_path) for k in (JOURNAL_AHEAD, JOURNAL_BEHIND, JOURNAL_MISMATCH)})


def _same_file(obj: _ObjectFile) -> bool | None:
    """Whether ``obj.path`` is still the file fsck checked (None: it is gone).

    Inode and size, not mtime: a save that reuses an object refreshes its mtime.
    """
    try:
        st = os.lstat(obj.path)
    except FileNotFoundError:
        return None
    return st.st_ino == obj.ino and st.st_size == obj.size


class _Changes:
    """Version records one repair commit changes, each put once however many fixes touch it."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], tuple[_Ref, dict[str, Any]]] = {}

    def set(self, ref: _Ref, **fields: str) -> None:
        key = (ref.name, ref.version)
        _, entry = self._entries.setdefault(key, (ref, dict(ref.entry)))
        entry.update(fields)

    def records(self) -> list[dict[str, Any]]:
        return [
            {"op": "put", "name": ref.name, "version": ref.version, "entry": entry}
            for ref, entry in self._entries.values()
            if entry != ref.entry
        ]


def _repair_objects(store: Store, p: _Pass, fixed: set[tuple[str, str]]) -> None:
    """Quarantine corrupt objects and archive files and mark (or un-mark) versions broken, in one commit."""
    done: set[tuple[str, str]] = set()

    def plan(doc: dict[str, Any]) -> list[dict[str, Any]]:
        # Runs under the store lock with the freshest manifest: the moves happen
        # here so that no save can commit a ref to an object between our check
        # of the refs and the move.
        done.clear()
        by_oid = _refs_by_oid(doc["models"])
        changes = _Changes()
        for oid, (kind, obj) in sorted(p.corrupt.items()):
            same = _same_file(obj)
            if same is False:
                continue  # a save replaced it with fresh bytes; the re-check hashes them
            if same:
                _quarantine(store, obj.path, oid)
            done.add((kind, oid))
            for r in by_oid.get(oid, ()):
                if r.entry["tier"] == "hot" and r.entry["status"] == "ok":
                    changes.set(r, status="broken")
        for oid in sorted(p.missing):
            if os.path.lexists(store.layout.oid_to_path(oid)):
                continue  # saved again meanwhile
            done.add((OBJECT_MISSING, oid))
            for r in by_oid.get(oid, ()):
                if r.entry["tier"] == "hot" and r.entry["status"] == "ok":
                    changes.set(r, status="broken")
        for oid, obj in sorted(p.intact.items()):
            broken = [r for r in by_oid.get(oid, ())
                      if r.entry["status"] != "ok" and r.entry["tier"] == "hot"]
            if broken and _same_file(obj):
                done.add((BROKEN_REF_INTACT, oid))
                for r in broken:
                    changes.set(r, status="ok")
        _repair_archive(store, p, by_oid, changes, done)
        return changes.records()

    wanted = (p.corrupt or p.missing or p.archive_bad or p.archive_quarantine or p.archive_heal
              or any(f.kind == BROKEN_REF_INTACT for f in p.findings))
    if wanted:
        store.manifest.commit(plan)
        fixed.update(done)
        for f in p.findings:
            if _is_fixed(f, done) and f.refs:
                logger.warning("fsck: %s: marked %s", f.kind, ", ".join(f.refs))


def _repair_archive(
    store: Store, p: _Pass, by_oid: dict[str, list[_Ref]], changes: _Changes, done: set[tuple[str, str]]
) -> None:
    """Under the lock: quarantine damaged recipes and blobs; mark, heal or bring back archived versions."""
    for (kind, ident), (label, obj) in sorted(p.archive_quarantine.items()):
        same = _same_file(obj)
        if same is False:
            continue  # an archive replaced it with fresh bytes; the re-check decodes them
        if same:
            _quarantine(store, obj.path, label)
        done.add((kind, ident))

    def hot_copy_ok(oid: str) -> bool:
        obj = p.intact.get(oid)
        return obj is not None and bool(_same_file(obj))

    for oid, damage in sorted(p.archive_bad.items()):
        archived = [r for r in by_oid.get(oid, ()) if r.entry["tier"] == "archive"]
        # The hot copy verified, so it is a whole version by itself: bring the
        # versions back to the hot tier rather than lose them.
        restore = hot_copy_ok(oid)
        for r in archived:
            if restore:
                changes.set(r, tier="hot", status="ok")
            elif r.entry["status"] == "ok":
                changes.set(r, status="broken")
        done.update(damage)
    for oid in sorted(p.archive_heal):
        broken = [r for r in by_oid.get(oid, ())
                  if r.entry["tier"] == "archive" and r.entry["status"] != "ok"]
        if oid in p.archive_verified:
            for r in broken:
                changes.set(r, status="ok")
        elif hot_copy_ok(oid):
            for r in broken:
                changes.set(r, tier="hot", status="ok")
        else:
            continue
        done.add((BROKEN_REF_INTACT, oid))


def _repair_files(store: Store, p: _Pass, fixed: set[tuple[str, str]]) -> None:
    for path in p.stray:
        if os.path.lexists(path):
            name = "".join(c if c.isalnum() or c in "._-" else "_" for c in os.path.basename(path))[:80]
            _quarantine(store, path, f"stray.{name}")
        fixed.add((STRAY_FILE, path))
    for path in remove_leftovers(p.leftovers, DEFAULT_GRACE_PERIOD):
        fixed.update({(STALE_TEMP, path), (STALE_INTENT, path)})


# ---------------------------------------------------------------------- entry point


def check(
    store: Store,
    *,
    repair: bool = False,
    sample: float | None = None,
    workers: int | None = None,
    progress: bool = False,
    mode: str = "threads",
) -> FsckReport:
    """Check ``store``; with ``repair=True`` mend it and check again.

    ``sample`` (0 < PCT <= 100) hashes that share of the objects, and decodes
    that share of the archived versions (and of the unneeded blobs), chosen at
    random; sizes, existence and blob headers are always checked for all.
    ``workers`` hash and decode in parallel (default: the usable cores).
    ``mode`` is ``"threads"`` (the
    default: hashlib releases the GIL, and they were as fast as processes in our
    measurements, without start-up cost) or ``"processes"`` (spawned workers
    that receive only file paths; a script using it needs the usual
    ``if __name__ == "__main__":`` guard).
    """
    number = isinstance(sample, (int, float)) and not isinstance(sample, bool)
    if sample is not None and not (number and 0 < sample <= 100):
        raise HydraError(f"sample must be a percentage in (0, 100], got {sample!r}")
    if workers is None:
        workers = _default_workers()
    elif isinstance(workers, bool) or not (isinstance(workers, int) and workers >= 1):
        raise HydraError(f"workers must be a positive integer, got {workers!r}")
    if mode not in ("threads", "processes"):
        raise HydraError(f"mode must be 'threads' or 'processes', got {mode!r}")
    started = time.perf_counter()
    cache: dict[tuple[str, int, int, int], str] = {}
    first = _run_checks(store, sample, workers, mode, progress, cache)
    final, findings = first, first.findings
    hashed, hashed_bytes = first.objects_hashed, first.bytes_hashed
    if repair:
        fixed: set[tuple[str, str]] = set()
        _repair_refs(store, fixed)
        refs_ok = True
        try:
            store.manifest.read()
        except HydraError as exc:
            refs_ok = False
            logger.error("fsck: the refs are still unreadable (%s); objects were left untouched", exc)
        if refs_ok:
            if any(f.kind in _REFS_KINDS for f in first.findings):
                # The refs changed: judge the objects against the repaired ones.
                first_objects = _run_checks(store, sample, workers, mode, progress, cache)
                _repair_objects(store, first_objects, fixed)
                _repair_files(store, first_objects, fixed)
            else:
                _repair_objects(store, first, fixed)
                _repair_files(store, first, fixed)
        findings = [
            dataclasses.replace(f, repaired=True) if _is_fixed(f, fixed) else f for f in first.findings
        ]
        final = _run_checks(store, sample, workers, mode, progress, cache)
        hashed += final.objects_hashed
        hashed_bytes += final.bytes_hashed
    report = FsckReport(
        root=str(store.root),
        findings=tuple(_ordered(findings)),
        remaining=tuple(_ordered(final.findings)),
        repair=repair,
        sample=sample,
        refs_checked=first.refs_checked,
        objects_checked=first.objects_checked,
        objects_hashed=hashed,
        bytes_hashed=hashed_bytes,
        seconds=time.perf_counter() - started,
        workers=workers,
        hash_mode=first.hash_mode,
        archived_checked=first.archived_checked,
        blobs_checked=first.blobs_checked,
        blobs_verified=first.blobs_verified + (final.blobs_verified if repair else 0),
        archive_bytes=first.archive_bytes + (final.archive_bytes if repair else 0),
    )
    logger.info(
        "fsck of %s: %d findings, %d remaining problems, %d objects (%d bytes) hashed in %.2f s",
        store.root, len(report.findings), sum(f.severity != INFO for f in report.remaining),
        report.objects_hashed, report.bytes_hashed, report.seconds,
    )
    return report


def _is_fixed(finding: Finding, fixed: set[tuple[str, str]]) -> bool:
    """Repair records what it fixed as (kind, oid) for objects and (kind, path) for files."""
    return any((finding.kind, key) in fixed for key in (finding.oid, finding.path) if key is not None)


def _ordered(findings: Iterable[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (_SEVERITY_ORDER[f.severity], f.kind, f.subject))
