"""fsck for a store on S3: the checks of :mod:`hydra_cas.fsck`, made of requests instead of files.

1. ``manifest.json`` parses and validates; every journal segment parses, the
   segments follow each other without a gap, and replaying them gives the
   manifest (segments past its ``journal_seq`` are a writer that stopped
   between its segment and the manifest: ``--repair`` rolls them forward).
2. Every object is re-hashed with SHA-256 by streaming it (ranged GETs in
   parallel, ``workers`` objects at a time); a referenced object that is
   missing, of the wrong size or hashing to another oid is an error, naming
   every version it breaks.  Unreferenced objects are hashed too (a later save
   of the same bytes would reuse them).
3. Each archived payload is rebuilt from its recipe and blobs and hashed.
4. Intents older than an hour, unfinished multipart uploads older than a day,
   stray keys under ``objects/`` and what sits in ``quarantine/``.

``repair=True`` copies corrupt objects to ``quarantine/<oid>.<UTC time>`` and
deletes them (only if their ETag is still the one hashed), marks the versions
that lost their bytes ``broken`` and those whose bytes came back ``ok`` in one
commit, rolls the manifest forward or rebuilds an unreadable one from the
journal (keeping the damaged copy in quarantine), and removes stale intents
and uploads.  NOTE: a journal that disagrees with the manifest, or ends before
it, is reported but not rewritten on S3; restore it from a bucket version or
backup.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from hydra_cas.errors import HydraError, IntegrityError, ManifestError
from hydra_cas.fsck import (
    ARCHIVE_BLOB_CORRUPT,
    ARCHIVE_RECIPE_MISSING,
    BROKEN_REF,
    BROKEN_REF_INTACT,
    ERROR,
    INFO,
    JOURNAL_AHEAD,
    JOURNAL_BEHIND,
    JOURNAL_MISMATCH,
    JOURNAL_UNREADABLE,
    MANIFEST_MISSING,
    MANIFEST_UNREADABLE,
    OBJECT_HASH,
    OBJECT_MISSING,
    OBJECT_SIZE,
    OBJECT_UNREADABLE,
    ORPHAN,
    QUARANTINE,
    STALE_INTENT,
    STALE_TEMP,
    STRAY_FILE,
    WARNING,
    Finding,
    FsckReport,
    _Ref,
)
from hydra_cas.gc import DEFAULT_GRACE_PERIOD, human_bytes, human_duration
from hydra_cas.manifest import FORMAT_VERSION, replay
from hydra_cas.progress import progress_bar
from hydra_cas.s3 import (
    INTENTS_DIR,
    JOURNAL_DIR,
    MANIFEST_REL,
    OBJECTS_DIR,
    QUARANTINE_DIR,
    object_rel,
    oid_of,
    parse_manifest,
    parse_segment,
    segment_seq,
)
from hydra_cas.s3_gc import INTENT_TTL, UPLOAD_TTL, intent_oid
from hydra_cas.s3io import Upload

if TYPE_CHECKING:
    from collections.abc import Iterable

    from hydra_cas.manifest import Models
    from hydra_cas.s3 import S3Store
    from hydra_cas.s3io import Listed

__all__ = ["check"]

logger = logging.getLogger(__name__)

_SEVERITY_ORDER = {ERROR: 0, WARNING: 1, INFO: 2}
_DEFAULT_WORKERS = 4  # objects hashed at once; each streams its ranges in parallel too


@dataclass(slots=True)
class _Pass:
    findings: list[Finding] = field(default_factory=list)
    doc: dict[str, Any] | None = None
    models: Models | None = None
    manifest_state: str = "ok"
    journal_ahead: bool = False
    corrupt: dict[str, str] = field(default_factory=dict)  # oid -> ETag of the bytes that failed
    missing: set[str] = field(default_factory=set)
    intact: set[str] = field(default_factory=set)
    archive_bad: set[str] = field(default_factory=set)
    stale_intents: list[str] = field(default_factory=list)  # rels
    stale_uploads: list[Upload] = field(default_factory=list)
    refs_checked: int = 0
    objects_checked: int = 0
    objects_hashed: int = 0
    bytes_hashed: int = 0
    archived_checked: int = 0

    def add(self, kind: str, severity: str, message: str, **where: Any) -> None:
        self.findings.append(Finding(kind, severity, message, **where))


def _refs_by_oid(models: Models) -> dict[str, list[_Ref]]:
    by_oid: dict[str, list[_Ref]] = {}
    for name in sorted(models):
        for version, entry in sorted(models[name]["versions"].items()):
            by_oid.setdefault(entry["oid"], []).append(_Ref(name, version, entry))
    return by_oid


# ---------------------------------------------------------------------- checks


def _check_refs(store: S3Store, p: _Pass) -> None:
    bucket = store.bucket
    manifest_url = bucket.url(MANIFEST_REL)
    got = bucket.get(MANIFEST_REL)
    if got is None:
        p.manifest_state = "missing"
    else:
        try:
            p.doc = parse_manifest(got.data, manifest_url)
        except ManifestError as exc:
            p.manifest_state = "unreadable"
            p.add(MANIFEST_UNREADABLE, ERROR,
                  f"{exc}; `hydra-cas fsck --repair` rebuilds it from the journal and keeps the damaged "
                  "copy in quarantine/", path=manifest_url)
    records: list[dict[str, Any]] | None = []
    listed, _ = bucket.listing(JOURNAL_DIR)
    expected = 1
    for item in sorted(listed, key=lambda i: i.rel):
        seq = segment_seq(item.rel)
        if seq is None:
            url = bucket.url(item.rel)
            p.add(STRAY_FILE, WARNING, f"{url} is not a journal segment", path=url)
            continue
        if records is None:
            continue
        problem = None
        if seq != expected:
            problem = f"segment {seq} follows record {expected - 1} (a gap or an overlap)"
        else:
            seg = bucket.get(item.rel)
            try:
                if seg is None:
                    raise ManifestError(f"journal segment {seq} vanished while being read")
                records += parse_segment(seg.data, seq)
                expected = records[-1]["seq"] + 1
            except ManifestError as exc:
                problem = str(exc)
        if problem is not None:
            p.add(JOURNAL_UNREADABLE, ERROR,
                  f"the journal is unusable: {problem}; restore it from a bucket version or a backup",
                  path=bucket.url(item.rel))
            records = None
    if p.doc is None:
        if records and p.manifest_state == "missing":
            p.add(MANIFEST_MISSING, ERROR,
                  f"manifest.json is missing but the journal has {len(records)} records; `hydra-cas fsck "
                  "--repair` (or the next write) writes it from the journal", path=manifest_url)
        p.models = replay(records) if records is not None else None
        return
    doc = p.doc
    p.models = doc["models"]
    if records is None:
        return
    seq, last = doc["journal_seq"], len(records)
    if last < seq:
        p.add(JOURNAL_BEHIND, ERROR,
              f"manifest.json reflects journal record {seq} but the journal ends at {last}; writes fail "
              "until the journal is restored from a bucket version or a backup", path=bucket.url(JOURNAL_DIR))
        return
    try:
        matches = replay(records[:seq]) == doc["models"]
    except ManifestError:
        matches = False
    if not matches:
        p.add(JOURNAL_MISMATCH, ERROR,
              f"replaying the journal's first {seq} records does not give manifest.json; restore the journal "
              "from a bucket version or a backup", path=bucket.url(JOURNAL_DIR))
    if last > seq:
        p.journal_ahead = True
        try:
            p.models = replay(records[seq:], doc["models"])
        except ManifestError:
            pass
        pending = sorted({f"{r['name']}:{r['version']}" for r in records[seq:] if "version" in r})
        p.add(JOURNAL_AHEAD, ERROR,
              f"journal records {seq + 1}..{last} are not in manifest.json (a writer stopped between its "
              "segment and the manifest); `hydra-cas fsck --repair` (or the next write) rolls them forward",
              path=bucket.url(JOURNAL_DIR), refs=tuple(pending))


def _sha256_of(store: S3Store, obj: Listed) -> tuple[str | None, int, str | None]:
    """(digest, bytes read, problem) of one object, streamed."""
    sha = hashlib.sha256()
    n = 0
    try:
        for chunk in store.bucket.iter_ranges(obj.rel, obj.size):
            sha.update(chunk)
            n += len(chunk)
    except FileNotFoundError:
        return None, n, "missing"
    except IntegrityError as exc:
        return None, n, f"changed while being read: {exc}"
    except HydraError as exc:
        return None, n, str(exc)
    return sha.hexdigest(), n, None


def _check_objects(store: S3Store, p: _Pass, sample: float | None, workers: int, progress: bool) -> None:
    bucket = store.bucket
    listed, now = bucket.listing(OBJECTS_DIR)
    objects: dict[str, Listed] = {}
    for item in listed:
        oid = oid_of(item.rel)
        if oid is None:
            p.add(STRAY_FILE, WARNING,
                  f"{bucket.url(item.rel)} is not an object (objects/sha256 holds <2 hex>/<62 hex> keys)",
                  path=bucket.url(item.rel))
        else:
            objects[oid] = item
    p.objects_checked = len(objects)
    by_oid = _refs_by_oid(p.models) if p.models is not None else {}
    p.refs_checked = sum(len(refs) for refs in by_oid.values())
    to_hash: list[Listed] = []
    for oid, refs in by_oid.items():
        hot = [r for r in refs if r.entry["tier"] == "hot"]
        obj = objects.get(oid)
        if not hot:
            continue
        if obj is None:
            _report_missing(store, p, oid, hot)
        elif {r.entry["size"] for r in hot} != {obj.size}:
            p.corrupt[oid] = obj.etag
            p.add(OBJECT_SIZE, ERROR,
                  f"object {oid} has {obj.size} bytes, the manifest records {hot[0].entry['size']}: "
                  "truncated or damaged; `--repair` moves it to quarantine/ and marks its versions broken",
                  path=bucket.url(obj.rel), oid=oid, refs=tuple(r.label for r in hot))
        else:
            to_hash.append(obj)
    if p.models is not None:
        for oid, obj in objects.items():
            if oid in by_oid:
                continue
            age = human_duration(max(0.0, now - obj.modified))
            p.add(ORPHAN, INFO,
                  f"object {oid} ({human_bytes(obj.size)}, {age} old) is not referenced; `hydra-cas gc` "
                  "deletes it once it is older than the grace period",
                  path=bucket.url(obj.rel), oid=oid)
            to_hash.append(obj)
    if sample is not None and sample < 100 and to_hash:
        to_hash = random.sample(to_hash, max(1, math.ceil(len(to_hash) * sample / 100)))
    results = []
    total = sum(o.size for o in to_hash)
    with progress_bar(total, "fsck", enabled=progress and bool(to_hash), unit="B") as bar, \
            ThreadPoolExecutor(max(1, workers), thread_name_prefix="hydra-s3-fsck") as pool:
        for obj, outcome in zip(to_hash, pool.map(lambda o: _sha256_of(store, o), to_hash), strict=True):
            results.append((obj, outcome))
            bar.update(obj.size)
    for obj, (digest, n, problem) in results:
        oid = oid_of(obj.rel)
        assert oid is not None
        refs = [r for r in by_oid.get(oid, []) if r.entry["tier"] == "hot"]
        p.objects_hashed += 1
        p.bytes_hashed += n
        if problem == "missing":
            if refs:
                _report_missing(store, p, oid, refs)
        elif problem is not None:
            p.add(OBJECT_UNREADABLE, ERROR, f"object {oid} cannot be read ({problem}); run fsck again",
                  path=bucket.url(obj.rel), oid=oid, refs=tuple(r.label for r in refs))
        elif digest != oid:
            p.corrupt[oid] = obj.etag
            p.add(OBJECT_HASH, ERROR,
                  f"object {oid} hashes to {digest}: its bytes are corrupt; `--repair` moves it to "
                  "quarantine/" + (" and marks its versions broken" if refs else ""),
                  path=bucket.url(obj.rel), oid=oid, refs=tuple(r.label for r in refs))
        else:
            p.intact.add(oid)
            broken = [r.label for r in refs if r.entry["status"] != "ok"]
            if broken:
                p.add(BROKEN_REF_INTACT, INFO,
                      f"marked broken, but object {oid} is present and verifies; `--repair` marks them ok "
                      "again",
                      oid=oid, refs=tuple(broken))


def _report_missing(store: S3Store, p: _Pass, oid: str, hot: list[_Ref]) -> None:
    labels = tuple(r.label for r in hot)
    if all(r.entry["status"] != "ok" for r in hot):
        p.add(BROKEN_REF, INFO, f"marked broken: object {oid} is missing; loads fail until the version is "
              "saved again or deleted", oid=oid, refs=labels)
        return
    if oid in p.missing:
        return
    p.missing.add(oid)
    p.add(OBJECT_MISSING, ERROR, f"object {oid} is missing; `--repair` marks its versions broken",
          path=store.bucket.url(object_rel(oid)), oid=oid, refs=labels)


def _check_archive(store: S3Store, p: _Pass, sample: float | None) -> None:
    """Rebuild each archived payload from its recipe and blobs and check its SHA-256."""
    if p.models is None:
        return
    by_oid = {oid: [r for r in refs if r.entry["tier"] == "archive"]
              for oid, refs in _refs_by_oid(p.models).items()}
    by_oid = {oid: refs for oid, refs in by_oid.items() if refs}
    oids = sorted(by_oid)
    if sample is not None and sample < 100 and oids:
        oids = random.sample(oids, max(1, math.ceil(len(oids) * sample / 100)))
    archive = store.archive_tier
    for oid in oids:
        refs = by_oid[oid]
        p.archived_checked += len(refs)
        size = refs[0].entry["size"]
        sha = hashlib.sha256()
        total = 0
        kind, problem = ARCHIVE_BLOB_CORRUPT, None
        try:
            recipe = archive.read_recipe(oid)
        except IntegrityError as exc:
            kind = ARCHIVE_RECIPE_MISSING if "missing" in str(exc) else ARCHIVE_BLOB_CORRUPT
            problem = str(exc)
        else:
            try:
                for chunk in archive.iter_payload(recipe):
                    sha.update(chunk)
                    total += len(chunk)
                if total != size or sha.hexdigest() != oid:
                    problem = f"the archived form of {oid} rebuilds to other bytes"
            except IntegrityError as exc:
                problem = str(exc)
        if problem is None:
            continue
        labels = tuple(r.label for r in refs)
        if all(r.entry["status"] != "ok" for r in refs):
            p.add(BROKEN_REF, INFO, f"marked broken: {problem}", oid=oid, refs=labels)
            continue
        p.archive_bad.add(oid)
        p.add(kind, ERROR, f"{problem}; `--repair` marks its versions broken", oid=oid, refs=labels)


def _check_files(store: S3Store, p: _Pass) -> None:
    bucket = store.bucket
    listed, now = bucket.listing(INTENTS_DIR)
    keep_for = max(DEFAULT_GRACE_PERIOD, INTENT_TTL)
    for item in listed:
        age = now - item.modified
        if age >= keep_for:
            p.stale_intents.append(item.rel)
            p.add(STALE_INTENT, WARNING,
                  f"intent {bucket.url(item.rel)} ({human_duration(age)} old) was left by a save that died; "
                  "`--repair` or `hydra-cas gc` removes it",
                  path=bucket.url(item.rel), oid=intent_oid(item.rel))
    for upload in bucket.uploads(OBJECTS_DIR):
        age = now - upload.initiated
        if age >= UPLOAD_TTL:
            p.stale_uploads.append(upload)
            where = f"{bucket.url(upload.rel)}?uploadId={upload.upload_id}"
            p.add(STALE_TEMP, WARNING,
                  f"unfinished upload {where} ({human_duration(age)} old) was left by a save that died; "
                  "`--repair` or `hydra-cas gc` aborts it (a bucket lifecycle rule can too)", path=where)
    quarantined, _ = bucket.listing(QUARANTINE_DIR)
    if quarantined:
        p.add(QUARANTINE, INFO,
              f"quarantine/ holds {len(quarantined)} key(s) "
              f"({human_bytes(sum(q.size for q in quarantined))}) set aside by fsck --repair; inspect and "
              "delete them when no longer needed",
              path=bucket.url(QUARANTINE_DIR.rstrip("/")))


def _run(store: S3Store, sample: float | None, workers: int, progress: bool) -> _Pass:
    p = _Pass()
    _check_refs(store, p)
    _check_objects(store, p, sample, workers, progress)
    _check_archive(store, p, sample)
    _check_files(store, p)
    return p


# ---------------------------------------------------------------------- repair


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def _repair_refs(store: S3Store, p: _Pass, fixed: set[tuple[str, str]]) -> None:
    bucket = store.bucket
    manifest_url = bucket.url(MANIFEST_REL)
    if p.manifest_state == "unreadable" and p.models is not None:
        bucket.copy(MANIFEST_REL, f"{QUARANTINE_DIR}manifest.json.{_stamp()}")
        records = store.manifest.pending(0)
        store.manifest.rewrite({"format_version": FORMAT_VERSION, "journal_seq": len(records),
                                "models": replay(records)})
        fixed.add((MANIFEST_UNREADABLE, manifest_url))
        logger.warning("fsck: rebuilt %s from %d journal records", manifest_url, len(records))
    elif p.journal_ahead or p.manifest_state == "missing":
        store.manifest.roll_forward()
        fixed.update({(JOURNAL_AHEAD, bucket.url(JOURNAL_DIR)), (MANIFEST_MISSING, manifest_url)})


def _put_status(ref: _Ref, status: str) -> dict[str, Any]:
    return {"op": "put", "name": ref.name, "version": ref.version, "entry": {**ref.entry, "status": status}}


def _repair_objects(store: S3Store, p: _Pass, fixed: set[tuple[str, str]]) -> None:
    """Quarantine corrupt objects, then mark versions broken (or ok again) in one commit."""
    bucket = store.bucket
    quarantined: set[str] = set()
    for oid, etag in sorted(p.corrupt.items()):
        current = store.objects.head(oid)
        if current is None or current.etag != etag:
            continue  # replaced by a save meanwhile; the re-check hashes the new bytes
        bucket.copy(object_rel(oid), f"{QUARANTINE_DIR}{oid}.{_stamp()}")
        if bucket.delete_if(object_rel(oid), etag):
            quarantined.add(oid)
            logger.warning("fsck: moved corrupt object %s to %s", oid, bucket.url(QUARANTINE_DIR))
    done: set[tuple[str, str]] = set()

    def plan(doc: dict[str, Any]) -> list[dict[str, Any]]:
        done.clear()
        by_oid = _refs_by_oid(doc["models"])
        records: list[dict[str, Any]] = []
        for oid in sorted(quarantined | p.missing):
            if oid in p.missing and store.objects.head(oid) is not None:
                continue  # saved again meanwhile
            done.update({(OBJECT_HASH, oid), (OBJECT_SIZE, oid), (OBJECT_MISSING, oid)})
            records += [_put_status(r, "broken") for r in by_oid.get(oid, ())
                        if r.entry["tier"] == "hot" and r.entry["status"] == "ok"]
        for oid in sorted(p.archive_bad):
            done.update({(ARCHIVE_BLOB_CORRUPT, oid), (ARCHIVE_RECIPE_MISSING, oid)})
            records += [_put_status(r, "broken") for r in by_oid.get(oid, ())
                        if r.entry["tier"] == "archive" and r.entry["status"] == "ok"]
        for oid in sorted(p.intact):
            healed = [r for r in by_oid.get(oid, ())
                      if r.entry["tier"] == "hot" and r.entry["status"] != "ok"]
            if healed:
                done.add((BROKEN_REF_INTACT, oid))
                records += [_put_status(r, "ok") for r in healed]
        return records

    if quarantined or p.missing or p.archive_bad or p.intact:
        store.manifest.commit(plan)
        fixed.update(done)


def _repair_files(store: S3Store, p: _Pass, fixed: set[tuple[str, str]]) -> None:
    bucket = store.bucket
    listed, now = bucket.listing(INTENTS_DIR)
    still = {i.rel for i in listed if now - i.modified >= max(DEFAULT_GRACE_PERIOD, INTENT_TTL)}
    for rel in bucket.delete_many([rel for rel in p.stale_intents if rel in still]):
        fixed.add((STALE_INTENT, bucket.url(rel)))
    for upload in p.stale_uploads:
        bucket.abort(upload.rel, upload.upload_id)
        fixed.add((STALE_TEMP, f"{bucket.url(upload.rel)}?uploadId={upload.upload_id}"))


# ---------------------------------------------------------------------- entry point


def check(
    store: S3Store,
    *,
    repair: bool = False,
    sample: float | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> FsckReport:
    """Check an S3 store; with ``repair=True`` mend it and check again (see the module docstring)."""
    number = isinstance(sample, (int, float)) and not isinstance(sample, bool)
    if sample is not None and not (number and 0 < sample <= 100):
        raise HydraError(f"sample must be a percentage in (0, 100], got {sample!r}")
    if workers is None:
        workers = _DEFAULT_WORKERS
    elif isinstance(workers, bool) or not (isinstance(workers, int) and workers >= 1):
        raise HydraError(f"workers must be a positive integer, got {workers!r}")
    started = time.perf_counter()
    first = _run(store, sample, workers, progress)
    final, findings = first, first.findings
    hashed, hashed_bytes = first.objects_hashed, first.bytes_hashed
    if repair:
        fixed: set[tuple[str, str]] = set()
        _repair_refs(store, first, fixed)
        current = _run(store, sample, workers, progress) if fixed else first
        _repair_objects(store, current, fixed)
        _repair_files(store, current, fixed)
        findings = [dataclasses.replace(f, repaired=True) if _is_fixed(f, fixed) else f
                    for f in first.findings]
        final = _run(store, sample, workers, progress)
        hashed += final.objects_hashed
        hashed_bytes += final.bytes_hashed
    report = FsckReport(
        root=store.root,
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
        hash_mode="threads",
        archived_checked=first.archived_checked,
    )
    logger.info("fsck of %s: %d findings, %d remaining problems, %d objects (%d bytes) hashed in %.2f s",
                store.root, len(report.findings), sum(f.severity != INFO for f in report.remaining),
                report.objects_hashed, report.bytes_hashed, report.seconds)
    return report


def _is_fixed(finding: Finding, fixed: set[tuple[str, str]]) -> bool:
    return any((finding.kind, key) in fixed for key in (finding.oid, finding.path) if key is not None)


def _ordered(findings: Iterable[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (_SEVERITY_ORDER[f.severity], f.kind, f.subject))
