"""Garbage collection on S3, without a lock: intents, a gc lease, and a grace period.

On disk, gc and savers meet under the store lock.  On S3 three keys replace it:

- An *intent* ``intents/<oid>.<token>``, created by a saver before it uploads
  (or decides to reuse) an object and deleted once its ref is committed.  An
  intent protects its oid for :data:`INTENT_TTL` seconds, whatever gc's grace
  period; a save that runs longer re-writes its intents before committing.
- The *gc lease* ``locks/gc-lease``, created with ``If-None-Match: *`` (one gc
  at a time), refreshed with ``If-Match`` every quarter of its TTL by a
  heartbeat thread, and taken over by another gc only once it has not been
  refreshed for a whole TTL (judged on the server's clock).  Its ``phase`` is
  ``"deleting"`` only while a batch is re-checked and deleted.
- The *grace period*: only objects whose LastModified is older than it are
  candidates, so a fresh upload is never collected before its ref can land.

Why no object is lost: a saver writes its intent, *then* waits until no
lease is in the deleting phase, *then* checks that its object exists (HEAD)
and commits.  gc sets the deleting phase, *then* lists intents, *then* reads
the manifest and the journal segments past it, and deletes only what none of
them names.  So either gc's listing sees the saver's intent and spares the
object, or the saver's check comes after gc's batch and finds the object
gone (and uploads it again).  An intent is deleted only after the journal
segment naming the object exists, and gc reads segments after intents.

If a refresh fails (the lease expired and was taken over, or the network
went away) gc stops before its next deletion and raises
:class:`LeaseLostError`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hydra_cas.errors import HydraError, LockTimeoutError
from hydra_cas.fsio import unique_token
from hydra_cas.gc import DEFAULT_GRACE_PERIOD, GcObject, GcPlan, Leftover, referenced_oids
from hydra_cas.layout import is_oid
from hydra_cas.manifest import utc_now
from hydra_cas.progress import progress_bar
from hydra_cas.s3 import INTENTS_DIR, LEASE_REL, OBJECTS_DIR, object_rel, oid_of
from hydra_cas.s3io import backoff

if TYPE_CHECKING:
    from collections.abc import Callable

    from hydra_cas.s3 import S3Store
    from hydra_cas.s3io import Bucket

__all__ = [
    "INTENT_TTL",
    "LEASE_TTL",
    "GcLease",
    "LeaseLostError",
    "SaveGuard",
    "collect",
    "drop_hot_copy",
    "intent_oid",
    "read_lease",
]

logger = logging.getLogger(__name__)

INTENT_TTL = 3600.0
LEASE_TTL = 60.0
UPLOAD_TTL = 86400.0  # unfinished multipart uploads younger than this may still be running
_BATCH_OBJECTS = 1000  # DeleteObjects takes at most 1000 keys


class LeaseLostError(HydraError, RuntimeError):
    """gc could not keep its lease, so it stopped deleting."""


# ---------------------------------------------------------------------- the lease


@dataclass(frozen=True, slots=True)
class LeaseState:
    etag: str
    owner: str
    holder: str
    phase: str
    expired: bool


def read_lease(bucket: Bucket) -> LeaseState | None:
    """The gc lease as the server sees it now, or None when there is none."""
    got = bucket.get(LEASE_REL)
    if got is None:
        return None
    try:
        body = json.loads(got.data)
        ttl = float(body["ttl"])
        owner, phase = str(body["owner"]), str(body["phase"])
        holder = f"host {body.get('host', '?')}, pid {body.get('pid', '?')}, since {body.get('since', '?')}"
    except (ValueError, KeyError, TypeError):
        # Unreadable: assume the worst (deleting) until it ages out.
        ttl, owner, phase, holder = LEASE_TTL, "?", "deleting", "unknown holder"
    expired = got.server_now - got.modified > ttl
    return LeaseState(got.etag, owner, holder, phase, expired)


class GcLease:
    """The single-gc lease; use as ``with GcLease(bucket).acquire(timeout) as lease:``."""

    def __init__(self, bucket: Bucket, ttl: float = LEASE_TTL) -> None:
        self.bucket = bucket
        self.ttl = ttl
        self.owner = unique_token()
        self.phase = "marking"
        self._etag: str | None = None
        self._renewed = 0.0
        self._lost: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self, phase: str) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "phase": phase, "ttl": self.ttl, "since": utc_now()}).encode()

    def acquire(self, timeout: float) -> GcLease:
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            etag = self.bucket.put_new(LEASE_REL, self._body("marking"))
            if etag is not None:
                break
            state = read_lease(self.bucket)
            if state is not None and state.expired:
                etag = self.bucket.put_replace(LEASE_REL, self._body("marking"), state.etag)
                if etag is not None:
                    logger.warning("took over the expired gc lease of %s (%s)",
                                   self.bucket.url(), state.holder)
                    break
            if state is not None and time.monotonic() > deadline:
                raise LockTimeoutError(
                    f"another gc holds {self.bucket.url(LEASE_REL)} ({state.holder}); wait for it to finish, "
                    f"or, if it died, for its lease to expire {self.ttl:g} s after its last refresh"
                )
            backoff(attempt, base=0.05, cap=2.0)
            attempt += 1
        self._etag = etag
        self._renewed = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name="hydra-gc-lease", daemon=True)
        self._thread.start()
        logger.debug("acquired the gc lease of %s", self.bucket.url())
        return self

    def __enter__(self) -> GcLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _put(self, phase: str) -> None:
        with self._lock:
            if self._lost is not None:
                raise self._lost_error()
            assert self._etag is not None
            try:
                etag = self.bucket.put_replace(LEASE_REL, self._body(phase), self._etag)
            except HydraError as exc:
                self._lost = f"refreshing it failed: {exc}"
                raise self._lost_error() from None
            if etag is None:
                self._lost = "it was taken over or removed (it had expired)"
                raise self._lost_error()
            self._etag = etag
            self._renewed = time.monotonic()
            self.phase = phase

    def _lost_error(self) -> LeaseLostError:
        return LeaseLostError(
            f"gc lost its lease on {self.bucket.url()}: {self._lost}; it stopped before deleting anything "
            "more (what it deleted was re-checked under the lease). Run gc again"
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self._put(self.phase)
            except LeaseLostError as exc:
                logger.error("%s", exc)
                return

    def set_phase(self, phase: str) -> None:
        """Refresh the lease with a new phase; raise LeaseLostError if it is no longer ours."""
        self._put(phase)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self._etag is not None and self._lost is None:
                if not self.bucket.delete_if(LEASE_REL, self._etag):
                    logger.warning("the gc lease of %s changed hands before release", self.bucket.url())
            self._etag = None


def wait_while_deleting(bucket: Bucket, timeout: float) -> None:
    """Return once no gc is in its deleting phase (an expired lease counts as none)."""
    deadline = time.monotonic() + max(timeout, LEASE_TTL * 1.5)
    attempt = 0
    while True:
        state = read_lease(bucket)
        if state is None or state.expired or state.phase != "deleting":
            return
        if time.monotonic() > deadline:
            raise LockTimeoutError(
                f"a gc of {bucket.url()} ({state.holder}) kept deleting for over {timeout:g} s; retry later"
            )
        backoff(attempt, base=0.05, cap=1.0)
        attempt += 1


# ---------------------------------------------------------------------- the saver's side


class SaveGuard:
    """A saver's intents, and the check that keeps its object checks clear of gc.

    Intents are per thread (a save runs in one thread).  The manifest store
    brackets each call of a commit plan with :meth:`begin_plan` /
    :meth:`end_plan`; the plan's first object check (``size_of``) then
    re-writes this thread's old intents and waits out a gc deletion batch.
    """

    def __init__(self, bucket: Bucket, lock_timeout: float) -> None:
        self.bucket = bucket
        self.lock_timeout = lock_timeout
        self._local = threading.local()

    def _mine(self) -> dict[str, tuple[str, float]]:
        mine = getattr(self._local, "intents", None)
        if mine is None:
            mine = self._local.intents = {}
        return mine

    def announce(self, oid: str) -> str:
        """Create an intent for ``oid``; return its URL (what :meth:`release` takes)."""
        rel = f"{INTENTS_DIR}{oid}.{unique_token()}"
        if self.bucket.put_new(rel, b"") is None:  # a random token cannot collide; be loud if it did
            raise HydraError(f"intent {self.bucket.url(rel)} already exists")
        url = self.bucket.url(rel)
        self._mine()[url] = (rel, time.monotonic())
        return url

    def release(self, url: str) -> None:
        """Delete an intent this thread announced (a no-op for one already released)."""
        entry = self._mine().pop(url, None)
        if entry is None:
            return
        try:
            self.bucket.delete(entry[0])
        except HydraError as exc:  # gc removes it after INTENT_TTL
            logger.warning("could not delete intent %s: %s", url, exc)

    def release_all(self) -> None:
        """Delete every intent this thread still holds."""
        for url in list(self._mine()):
            self.release(url)

    def begin_plan(self) -> None:
        self._local.checked = False

    def end_plan(self) -> None:
        self._local.checked = True

    def before_object_check(self) -> None:
        if getattr(self._local, "checked", True):
            return
        self._local.checked = True
        mine = self._mine()
        now = time.monotonic()
        for url, (rel, born) in list(mine.items()):
            if now - born > INTENT_TTL / 3:
                # Same key, new LastModified: gc's clock for it starts again.
                self.bucket.put(rel, b"")
                mine[url] = (rel, now)
        wait_while_deleting(self.bucket, self.lock_timeout)


# ---------------------------------------------------------------------- marking


def intent_oid(rel: str) -> str | None:
    name = rel[len(INTENTS_DIR):]
    oid = name.partition(".")[0]
    return oid if is_oid(oid) else None


def _scan_intents(bucket: Bucket, grace_period: float) -> tuple[set[str], list[Leftover]]:
    """(oids named by live intents, stale intents)."""
    listed, now = bucket.listing(INTENTS_DIR)
    live: set[str] = set()
    stale: list[Leftover] = []
    keep_for = max(grace_period, INTENT_TTL)
    for item in listed:
        oid = intent_oid(item.rel)
        age = now - item.modified
        if age < keep_for and oid is not None:
            live.add(oid)
        elif age >= keep_for:
            stale.append(Leftover("intent", bucket.url(item.rel), item.size, age, None, oid))
    return live, stale


def _marks(store: S3Store, grace_period: float) -> Callable[[str], bool]:
    """Is-live test from intents, then the manifest, then the segments past it (this order matters)."""
    intents, _ = _scan_intents(store.bucket, grace_period)
    doc = store.manifest.read()
    refs = referenced_oids(doc["models"])
    pending = {r["entry"]["oid"] for r in store.manifest.pending(doc["journal_seq"]) if r["op"] == "put"}
    return lambda oid: oid in refs or oid in intents or oid in pending


def make_plan(store: S3Store, grace_period: float, *, dry_run: bool = False) -> GcPlan:
    """Mark and list, deleting nothing."""
    bucket = store.bucket
    is_live = _marks(store, grace_period)
    _, stale_intents = _scan_intents(bucket, grace_period)
    listed, now = bucket.listing(OBJECTS_DIR)
    delete: list[GcObject] = []
    young: list[GcObject] = []
    live = 0
    for item in listed:
        oid = oid_of(item.rel)
        if oid is None:
            continue
        if is_live(oid):
            live += 1
            continue
        entry = GcObject(oid, item.size, max(0.0, now - item.modified))
        (young if entry.age < grace_period else delete).append(entry)
    if delete and not store.manifest.exists():
        raise HydraError(
            f"{store.root} has {len(listed)} objects but neither manifest.json nor a journal; refusing to "
            "delete what may be the only copy of unlisted weights. Restore the manifest from a backup, or "
            "delete objects/ by hand if the store is unused"
        )
    uploads = [u for u in bucket.uploads(OBJECTS_DIR) if now - u.initiated >= max(grace_period, UPLOAD_TTL)]
    stale_uploads = [Leftover("temp", f"{bucket.url(u.rel)}?uploadId={u.upload_id}", 0, now - u.initiated)
                     for u in uploads]
    delete.sort(key=lambda o: o.oid)
    young.sort(key=lambda o: o.oid)
    return GcPlan(
        root=store.root,
        grace_period=float(grace_period),
        dry_run=dry_run,
        objects_scanned=sum(1 for item in listed if oid_of(item.rel) is not None),
        live=live,
        delete=tuple(delete),
        kept_young=tuple(young),
        stale_temp=tuple(stale_uploads),
        stale_intents=tuple(stale_intents),
    )


# ---------------------------------------------------------------------- executing


def execute(store: S3Store, plan: GcPlan, lease: GcLease, *, progress: bool = False) -> GcPlan:
    """Delete ``plan``'s objects in batches, each re-checked in the lease's deleting phase."""
    started = time.perf_counter()
    bucket = store.bucket
    deleted: list[str] = []
    spared: list[str] = []
    freed = 0
    sizes = {o.oid: o.size for o in plan.delete}
    bar = progress_bar(len(plan.delete), "gc", enabled=progress and bool(plan.delete), unit="obj")
    try:
        for start in range(0, len(plan.delete), _BATCH_OBJECTS):
            batch = [o.oid for o in plan.delete[start : start + _BATCH_OBJECTS]]
            lease.set_phase("deleting")
            try:
                is_live = _marks(store, plan.grace_period)
                victims = [oid for oid in batch if not is_live(oid)]
                gone = {oid_of(rel) for rel in bucket.delete_many([object_rel(oid) for oid in victims])}
            finally:
                lease.set_phase("marking")
            for oid in batch:
                if oid in gone:
                    deleted.append(oid)
                    freed += sizes[oid]
                    logger.debug("gc: deleted %s", oid)
                else:
                    spared.append(oid)
            bar.update(len(batch))
    finally:
        bar.close()
    removed = _remove_leftovers(store, plan)
    result = dataclasses.replace(
        plan, executed=True, deleted=tuple(deleted), spared=tuple(spared), freed_bytes=freed,
        files_removed=removed, seconds=time.perf_counter() - started,
    )
    logger.info("gc of %s: deleted %d objects (%d bytes), spared %d, removed %d leftovers in %.2f s",
                store.root, len(deleted), freed, len(spared), removed, result.seconds)
    return result


def _remove_leftovers(store: S3Store, plan: GcPlan) -> int:
    """Delete intents still stale now, and abort the stale uploads of the plan."""
    bucket = store.bucket
    _, stale = _scan_intents(bucket, plan.grace_period)
    planned = {item.path for item in plan.stale_intents}
    rels = [bucket.rel_of_url(item.path) for item in stale if item.path in planned]
    removed = len(bucket.delete_many(rels)) if rels else 0
    for item in plan.stale_temp:
        url, _, upload_id = item.path.partition("?uploadId=")
        bucket.abort(bucket.rel_of_url(url), upload_id)
        removed += 1
    return removed


def collect(
    store: S3Store,
    *,
    grace_period: float = DEFAULT_GRACE_PERIOD,
    dry_run: bool = False,
    progress: bool = False,
) -> GcPlan:
    """Plan a gc of ``store`` and, unless ``dry_run``, execute it under the gc lease."""
    if not grace_period >= 0:  # also refuses NaN
        raise HydraError(f"grace_period must be a number of seconds >= 0, got {grace_period!r}")
    started = time.perf_counter()
    if dry_run:
        plan = make_plan(store, grace_period, dry_run=True)
        return dataclasses.replace(plan, seconds=time.perf_counter() - started)
    with GcLease(store.bucket).acquire(store.lock_timeout) as lease:
        plan = make_plan(store, grace_period)
        logger.info("gc plan for %s: %d objects scanned, %d to delete (%d bytes), %d too young",
                    store.root, plan.objects_scanned, len(plan.delete), plan.bytes_to_free,
                    len(plan.kept_young))
        result = execute(store, plan, lease, progress=progress)
    return dataclasses.replace(result, seconds=time.perf_counter() - started)


def drop_hot_copy(store: S3Store, oid: str) -> None:
    """Delete an archived version's hot object once no hot version or intent needs it.

    Runs as a one-object gc under the lease.  NOTE: when another gc holds the
    lease the copy is left in place, and gc keeps the oids of archived versions
    (as on disk), so it stays until a later archive of the same bytes.
    """
    try:
        lease = GcLease(store.bucket).acquire(min(store.lock_timeout, 10.0))
    except LockTimeoutError:
        logger.warning("left the hot copy of %s in place: a gc holds the lease", oid)
        return
    with lease:
        lease.set_phase("deleting")
        intents, _ = _scan_intents(store.bucket, 0.0)
        if oid in intents:
            return
        doc = store.manifest.read()
        entries = [e for m in doc["models"].values() for e in m["versions"].values()]
        entries += [r["entry"] for r in store.manifest.pending(doc["journal_seq"]) if r["op"] == "put"]
        if any(e["oid"] == oid and e["tier"] == "hot" for e in entries):
            return
        store.bucket.delete(object_rel(oid))
        logger.debug("removed the hot copy of archived object %s", oid)
