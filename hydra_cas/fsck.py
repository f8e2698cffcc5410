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
3. Files in ``objects/`` that are not objects, temp files and intents left by
   saves that died, and what sits in ``quarantine/``.  A temp file or intent is
   a leftover when it is over an hour old *and* the pid in its name is not a
   running process here: age alone would flag a long save of a huge model, and
   the pid alone means nothing on a store shared by several hosts.

Severity: ``error`` (refs or bytes at risk) and ``warning`` (leftovers to clean
up) make the exit status 1; ``info`` does not: unreferenced objects (gc's job)
and versions already marked broken, which keep failing to load until saved again
or deleted, but which fsck has nothing more to do about.

``repair=True`` mends what it can, never deleting user data: corrupt objects go
to ``quarantine/`` and their versions are marked ``status: "broken"`` through a
journal ``put``; the manifest is rebuilt from the journal (or the journal
re-based on the manifest) with the damaged file kept in ``quarantine/``; stale
leftovers are removed.  The checks then run again and the exit status reflects
what remains.

Bytes come back when a user saves them again: ``ObjectStore.publish`` replaces
an object of the wrong size with the fresh, verified bytes, and republishes a
quarantined (absent) one; a later ``fsck --repair`` then finds the versions
marked broken intact and marks them ``ok`` again.  NOTE: ``publish`` compares
sizes only, so a corrupt object of the right size that fsck has not yet
quarantined is reused by a new save; and re-saving the same bytes under a
version marked broken is a no-op (``Store.save`` sees the same oid), so that
version heals only through another version's save or a delete and save.

Hashing runs in a thread pool across objects (one SHA-256 cannot be split):
hashlib releases the GIL, and on the 2-core machines we measured, threads
verified as many bytes per second as a process pool did, without its start-up
cost or the need to send anything to other processes.
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
from hydra_cas.errors import HydraError, ManifestError, StorageError
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
    from collections.abc import Iterable, Mapping

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


def _check_refs(store: Store, p: _Pass) -> None:
    """Manifest and journal: readable, valid, and telling the same story."""
    layout = store.layout
    manifest_path, journal_path = str(layout.manifest), str(layout.journal)
    problem = None
    try:
        with open(manifest_path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        p.manifest_state = "missing"
    except OSError as exc:
        problem = f"cannot be read ({exc.strerror})"
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
    try:
        read, p.torn = store.manifest.journal.read()
    except (ManifestError, StorageError) as exc:
        journal_problem = str(exc)
    else:
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
            # NOTE: the archived form of a version (tier "archive") is not checked yet.
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
                  "damaged; `--repair` moves it to quarantine/ and marks its versions broken",
                  path=obj.path, oid=oid, refs=tuple(r.label for r in refs))
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
                  path=f.path, oid=f.oid, refs=tuple(r.label for r in refs))
        elif digest != f.oid:
            p.corrupt[f.oid] = (OBJECT_HASH, f)
            p.add(OBJECT_HASH, ERROR,
                  f"object {f.oid} hashes to {digest}: its bytes are corrupt; `--repair` moves it to "
                  "quarantine/" + (" and marks its versions broken" if refs else ""),
                  path=f.path, oid=f.oid, refs=tuple(r.label for r in refs))
        else:
            p.intact[f.oid] = f


def _note_broken_refs(p: _Pass, objects: dict[str, _ObjectFile], by_oid: dict[str, list[_Ref]]) -> None:
    """Versions already marked broken whose object is present (missing ones were reported)."""
    for oid, refs in by_oid.items():
        broken = [r.label for r in refs if r.entry["status"] != "ok"]
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
        _check_refs(store, q)
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


def _put_status(ref: _Ref, status: str) -> dict[str, Any]:
    return {"op": "put", "name": ref.name, "version": ref.version, "entry": {**ref.entry, "status": status}}


def _same_file(obj: _ObjectFile) -> bool | None:
    """Whether ``obj.path`` is still the file fsck checked (None: it is gone).

    Inode and size, not mtime: a save that reuses an object refreshes its mtime.
    """
    try:
        st = os.lstat(obj.path)
    except FileNotFoundError:
        return None
    return st.st_ino == obj.ino and st.st_size == obj.size


def _repair_objects(store: Store, p: _Pass, fixed: set[tuple[str, str]]) -> None:
    """Quarantine corrupt objects and mark (or un-mark) versions broken, in one commit."""
    done: set[tuple[str, str]] = set()

    def plan(doc: dict[str, Any]) -> list[dict[str, Any]]:
        # Runs under the store lock with the freshest manifest: the moves happen
        # here so that no save can commit a ref to an object between our check
        # of the refs and the move.
        done.clear()
        by_oid = _refs_by_oid(doc["models"])
        records: list[dict[str, Any]] = []
        for oid, (kind, obj) in sorted(p.corrupt.items()):
            same = _same_file(obj)
            if same is False:
                continue  # a save replaced it with fresh bytes; the re-check hashes them
            if same:
                _quarantine(store, obj.path, oid)
            done.add((kind, oid))
            records += [_put_status(r, "broken") for r in by_oid.get(oid, ()) if r.entry["status"] == "ok"]
        for oid in sorted(p.missing):
            if os.path.lexists(store.layout.oid_to_path(oid)):
                continue  # saved again meanwhile
            done.add((OBJECT_MISSING, oid))
            hot = [r for r in by_oid.get(oid, ()) if r.entry["tier"] == "hot" and r.entry["status"] == "ok"]
            records += [_put_status(r, "broken") for r in hot]
        for oid, obj in sorted(p.intact.items()):
            broken = [r for r in by_oid.get(oid, ()) if r.entry["status"] != "ok"]
            if broken and _same_file(obj):
                done.add((BROKEN_REF_INTACT, oid))
                records += [_put_status(r, "ok") for r in broken]
        return records

    if p.corrupt or p.missing or any(f.kind == BROKEN_REF_INTACT for f in p.findings):
        store.manifest.commit(plan)
        fixed.update(done)
        for f in p.findings:
            if _is_fixed(f, done) and f.refs:
                logger.warning("fsck: %s: marked %s", f.kind, ", ".join(f.refs))


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

    ``sample`` (0 < PCT <= 100) hashes that share of the objects, chosen at
    random; sizes and existence are always checked for all.  ``workers`` hash
    in parallel (default: the usable cores).  ``mode`` is ``"threads"`` (the
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
