"""Garbage collection: delete the objects no ref, alias or in-flight save needs.

gc runs in two steps.  *Plan* marks every oid the store still needs (every
version record, whatever its tier or status, any journal record the manifest
has not caught up with, and every live intent), lists the unreferenced objects
and sorts them into those old enough to go and those still inside the grace
period.  *Execute* then deletes, in batches, each batch under the store lock
with the marks taken again, because savers commit their refs under the same
lock after checking that their object still exists (``Store._commit_put``): an
object is either seen by the saver's check or by gc's re-check, never missed by
both.  A dry run stops after the plan.

Temp files under ``tmp/`` and intents under ``intents/`` are leftovers once they
are older than the grace period and the process that wrote them (its pid is in
the file name) no longer runs on this host.  For the same reason an intent of a
running process protects its oid at any age, even with a grace period of 0.

NOTE: only the hot tier is swept.  Recipes and tensor blobs under ``archive/``
are never deleted yet; extending :func:`live_oids` with the recipes of archived
versions and ``Archive.live_tensors`` of those is the plan.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hydra_cas import fsio
from hydra_cas.errors import HydraError
from hydra_cas.progress import progress_bar

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    from hydra_cas.layout import Layout
    from hydra_cas.store import Store

__all__ = [
    "DEFAULT_GRACE_PERIOD",
    "GcObject",
    "GcPlan",
    "Leftover",
    "collect",
    "execute",
    "find_leftovers",
    "human_bytes",
    "human_duration",
    "live_oids",
    "make_plan",
    "pending_oids",
    "referenced_oids",
    "remove_leftovers",
]

logger = logging.getLogger(__name__)

DEFAULT_GRACE_PERIOD = 3600.0
# A batch of deletions holds the store lock for at most this long (or this many
# objects), so savers waiting for the lock stall briefly, not for a whole sweep.
_BATCH_SECONDS = 0.2
_BATCH_OBJECTS = 5000
# Names written by fsio.create_temp start with "<pid>-<16 hex>"; intents are
# "<oid>.<pid>-<16 hex>".  The pid tells whether the writer may still be running.
_TOKEN_RE = re.compile(r"(\d+)-[0-9a-f]{16}")
_INTENT_RE = re.compile(r"([0-9a-f]{64})\.(\d+)-[0-9a-f]{16}")
_RENDER_LIMIT = 20


@dataclass(frozen=True, slots=True)
class GcObject:
    """An unreferenced object: its oid, size in bytes and age in seconds."""

    oid: str
    size: int
    age: float

    def to_dict(self) -> dict[str, Any]:
        return {"oid": self.oid, "size": self.size, "age": round(self.age, 3)}


@dataclass(frozen=True, slots=True)
class Leftover:
    """A file under ``tmp/`` or ``intents/`` that no running save owns any more."""

    kind: str
    """``"temp"`` or ``"intent"``."""
    path: str
    size: int
    age: float
    pid: int | None = None
    oid: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": self.path,
            "size": self.size,
            "age": round(self.age, 3),
            "pid": self.pid,
            "oid": self.oid,
        }


@dataclass(frozen=True, slots=True)
class GcPlan:
    """What gc found and, once executed, what it did.

    ``delete`` lists the objects planned for deletion; after execution
    ``deleted`` names those actually removed and ``spared`` those the re-check
    under the lock kept (referenced or refreshed meanwhile, or already gone).
    """

    root: str
    grace_period: float
    dry_run: bool
    objects_scanned: int
    live: int
    delete: tuple[GcObject, ...]
    kept_young: tuple[GcObject, ...]
    stale_temp: tuple[Leftover, ...]
    stale_intents: tuple[Leftover, ...]
    executed: bool = False
    deleted: tuple[str, ...] = ()
    spared: tuple[str, ...] = ()
    freed_bytes: int = 0
    files_removed: int = 0
    seconds: float = 0.0

    @property
    def bytes_to_free(self) -> int:
        """Bytes the planned object deletions free (temp files not counted)."""
        return sum(o.size for o in self.delete)

    @property
    def young_bytes(self) -> int:
        return sum(o.size for o in self.kept_young)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "grace_period": self.grace_period,
            "dry_run": self.dry_run,
            "executed": self.executed,
            "objects_scanned": self.objects_scanned,
            "live": self.live,
            "bytes_to_free": self.bytes_to_free,
            "delete": [o.to_dict() for o in self.delete],
            "kept_young": [o.to_dict() for o in self.kept_young],
            "stale_temp": [f.to_dict() for f in self.stale_temp],
            "stale_intents": [f.to_dict() for f in self.stale_intents],
            "deleted": list(self.deleted),
            "spared": list(self.spared),
            "freed_bytes": self.freed_bytes,
            "files_removed": self.files_removed,
            "seconds": round(self.seconds, 3),
        }

    def render(self, *, verbose: bool = False) -> str:
        """A report for humans; lists at most 20 objects unless ``verbose``."""
        mode = "dry run" if self.dry_run else ("done" if self.executed else "plan")
        unreferenced = len(self.delete) + len(self.kept_young)
        lines = [
            f"gc of {self.root} ({mode}; grace period {human_duration(self.grace_period)})",
            f"  scanned {self.objects_scanned} objects: {self.live} live oids marked, "
            f"{unreferenced} unreferenced",
        ]
        verb = "would delete" if not self.executed else "planned to delete"
        lines.append(f"  {verb} {len(self.delete)} objects, {human_bytes(self.bytes_to_free)}")
        lines.extend(_listing(self.delete, verbose))
        if self.kept_young:
            lines.append(
                f"  kept {len(self.kept_young)} unreferenced objects younger than the grace period "
                f"({human_bytes(self.young_bytes)})"
            )
            lines.extend(_listing(self.kept_young, verbose))
        if self.stale_temp or self.stale_intents:
            lines.append(
                f"  stale leftovers: {len(self.stale_temp)} temp files "
                f"({human_bytes(sum(f.size for f in self.stale_temp))}), "
                f"{len(self.stale_intents)} intents"
            )
        if self.executed:
            lines.append(
                f"  deleted {len(self.deleted)} objects, freed {human_bytes(self.freed_bytes)}, "
                f"removed {self.files_removed} leftover files in {self.seconds:.2f} s"
            )
            if self.spared:
                lines.append(
                    f"  spared {len(self.spared)} objects the re-check under the lock found referenced, "
                    "refreshed by a save, or already gone"
                )
        elif self.dry_run and (self.delete or self.stale_temp or self.stale_intents):
            lines.append("  nothing was deleted; run without --dry-run to delete")
        return "\n".join(lines)


# ---------------------------------------------------------------------- marking


def referenced_oids(models: Mapping[str, Any]) -> set[str]:
    """Every oid a version record names, whatever its tier or status.

    An archived version's oid counts too: ``Store.archive`` removes the hot copy
    itself once no hot version needs it, and a copy left behind by a crash is
    kept, which is safe but frees nothing (NOTE: gc could free it once the
    archived form is verified; it does not yet).
    """
    return {entry["oid"] for model in models.values() for entry in model["versions"].values()}


def pending_oids(store: Store, journal_seq: int) -> set[str]:
    """Oids put by journal records past ``journal_seq`` (a writer died before the manifest).

    The next writer rolls such records forward, so their objects are live.
    """
    journal = store.manifest.journal
    if journal.last_seq() <= journal_seq:
        return set()
    records, _ = journal.read()
    return {r["entry"]["oid"] for r in records[journal_seq:] if r["op"] == "put"}


def live_oids(store: Store, doc: Mapping[str, Any], grace_period: float, now: float) -> set[str]:
    """The oids gc must keep: refs of ``doc``, pending journal puts, live intents."""
    live = referenced_oids(doc["models"])
    live |= pending_oids(store, doc["journal_seq"])
    live |= _scan_intents(store.layout, grace_period, now)[0]
    return live


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by another user
    except OSError:
        return True  # cannot tell: keep its files
    return True


def _owner(name: str) -> tuple[str | None, int | None]:
    """(oid, pid) encoded in an intents/ or tmp/ file name; either may be None."""
    m = _INTENT_RE.fullmatch(name)
    if m:
        return m.group(1), int(m.group(2))
    m = _TOKEN_RE.match(name)
    return None, (int(m.group(1)) if m else None)


def _is_stale(age: float, pid: int | None, grace_period: float) -> bool:
    # NOTE: the pid is only meaningful on the host that wrote the file; on a store
    # shared over NFS by several hosts the grace period alone protects a save in
    # flight on another host, so --prune-now (grace 0) is unsafe there.
    if age < grace_period:
        return False
    return pid is None or not _pid_alive(pid)


def _scan_dir(directory: os.PathLike[str] | str) -> Iterable[tuple[str, str, os.stat_result]]:
    try:
        entries = os.scandir(directory)
    except FileNotFoundError:
        return
    with entries:
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # its owner finished meanwhile
            yield entry.name, entry.path, st


def _scan_intents(layout: Layout, grace_period: float, now: float) -> tuple[set[str], list[Leftover]]:
    """(oids named by live intents, stale files in intents/)."""
    live: set[str] = set()
    stale: list[Leftover] = []
    for name, path, st in _scan_dir(layout.intents):
        oid, pid = _owner(name)
        age = now - st.st_mtime
        if not _is_stale(age, pid, grace_period):
            if oid is not None:
                live.add(oid)
            continue
        stale.append(Leftover("intent", path, st.st_size, age, pid, oid))
    return live, stale


def find_leftovers(
    layout: Layout, grace_period: float, now: float | None = None
) -> tuple[list[Leftover], list[Leftover]]:
    """(stale temp files, stale intents): older than the grace period, owner not running."""
    now = time.time() if now is None else now
    temps = []
    for name, path, st in _scan_dir(layout.tmp):
        _, pid = _owner(name)
        age = now - st.st_mtime
        if _is_stale(age, pid, grace_period):
            temps.append(Leftover("temp", path, st.st_size, age, pid))
    return temps, _scan_intents(layout, grace_period, now)[1]


# ---------------------------------------------------------------------- planning


def _refs_known(layout: Layout) -> bool:
    return layout.manifest.exists() or layout.journal.exists()


def make_plan(store: Store, grace_period: float = DEFAULT_GRACE_PERIOD, *, dry_run: bool = False) -> GcPlan:
    """Mark and list, deleting nothing."""
    if not grace_period >= 0:  # also refuses NaN
        raise HydraError(f"grace_period must be a number of seconds >= 0, got {grace_period!r}")
    now = time.time()
    doc = store.manifest.read()
    live = live_oids(store, doc, grace_period, now)
    delete: list[GcObject] = []
    young: list[GcObject] = []
    scanned = 0
    for oid, path in store.layout.iter_objects():
        scanned += 1
        if oid in live:
            continue
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        item = GcObject(oid, st.st_size, now - st.st_mtime)
        (young if item.age < grace_period else delete).append(item)
    if delete and not _refs_known(store.layout):
        raise HydraError(
            f"{store.root} has {scanned} objects but neither manifest.json nor journal.jsonl; "
            "refusing to delete what may be the only copy of unlisted weights. Restore the "
            "manifest or journal from a backup, or remove objects/ by hand if the store is unused"
        )
    temps, intents = find_leftovers(store.layout, grace_period, now)
    delete.sort(key=lambda o: o.oid)
    young.sort(key=lambda o: o.oid)
    return GcPlan(
        root=str(store.root),
        grace_period=float(grace_period),
        dry_run=dry_run,
        objects_scanned=scanned,
        live=len(live),
        delete=tuple(delete),
        kept_young=tuple(young),
        stale_temp=tuple(temps),
        stale_intents=tuple(intents),
    )


# ---------------------------------------------------------------------- executing


class _Marks:
    """The live set, recomputed under the lock; the ref part only when the manifest changed."""

    def __init__(self, store: Store, grace_period: float) -> None:
        self.store = store
        self.grace_period = grace_period
        self._doc: Mapping[str, Any] | None = None
        self._refs: set[str] = set()

    def current(self, now: float) -> Callable[[str], bool]:
        if not _refs_known(self.store.layout):
            raise HydraError(
                f"manifest.json and journal.jsonl of {self.store.root} disappeared during gc; "
                "stopped deleting. Restore them from a backup and run `hydra-cas fsck`"
            )
        doc = self.store.manifest.read()  # cached by file identity: cheap when unchanged
        if doc is not self._doc:
            self._doc = doc
            self._refs = referenced_oids(doc["models"])
        extra = pending_oids(self.store, doc["journal_seq"])
        extra |= _scan_intents(self.store.layout, self.grace_period, now)[0]
        refs = self._refs
        # Not one merged set: copying every ref per batch was most of a batch's cost.
        return lambda oid: oid in refs or oid in extra


def execute(store: Store, plan: GcPlan, *, progress: bool = False) -> GcPlan:
    """Carry out ``plan``; return it with what was deleted and spared filled in."""
    started = time.perf_counter()
    marks = _Marks(store, plan.grace_period)
    deleted: list[str] = []
    spared: list[str] = []
    freed = 0
    bar = progress_bar(len(plan.delete), "gc", enabled=progress and bool(plan.delete), unit="obj")
    todo = plan.delete
    i = 0
    try:
        while i < len(todo):
            with store.manifest.lock():
                now = time.time()
                is_live = marks.current(now)
                deadline = time.monotonic() + _BATCH_SECONDS
                stop = min(len(todo), i + _BATCH_OBJECTS)
                first = i
                while i < stop and (i == first or time.monotonic() < deadline):
                    oid = todo[i].oid
                    i += 1
                    size = _delete_one(store, oid, is_live, now, plan.grace_period)
                    if size is None:
                        spared.append(oid)
                    else:
                        deleted.append(oid)
                        freed += size
                done = i - first
            bar.update(done)
    finally:
        bar.close()
    removed = len(remove_leftovers((*plan.stale_temp, *plan.stale_intents), plan.grace_period))
    result = dataclasses.replace(
        plan,
        executed=True,
        deleted=tuple(deleted),
        spared=tuple(spared),
        freed_bytes=freed,
        files_removed=removed,
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "gc of %s: deleted %d objects (%d bytes), spared %d, removed %d leftover files in %.2f s",
        store.root, len(deleted), freed, len(spared), removed, result.seconds,
    )
    return result


def _delete_one(
    store: Store, oid: str, is_live: Callable[[str], bool], now: float, grace_period: float
) -> int | None:
    """Under the lock: delete one planned object if it is still garbage; its size, or None."""
    # NOTE: emptied fan-out directories are left in place.  A saver creates the
    # fan-out (fsio.makedirs) and then renames its object into it without the
    # lock, so removing a directory here could make that rename fail.  At most
    # 256 empty directories remain, which costs nothing.
    if is_live(oid):
        logger.debug("gc: %s is referenced again; kept", oid)
        return None
    path = store.layout.oid_to_path(oid)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if now - st.st_mtime < grace_period:
        # A save reused it (publish refreshes the mtime) and has not committed yet.
        logger.debug("gc: %s was refreshed %.1f s ago; kept", oid, now - st.st_mtime)
        return None
    if not fsio.unlink(path):
        return None
    logger.debug("gc: deleted %s (%d bytes)", oid, st.st_size)
    return st.st_size


def remove_leftovers(files: Iterable[Leftover], grace_period: float) -> list[str]:
    """Remove stale temp files and intents, each re-checked just before; the paths removed."""
    removed: list[str] = []
    now = time.time()
    for item in files:
        try:
            st = os.lstat(item.path)
        except FileNotFoundError:
            continue
        if not _is_stale(now - st.st_mtime, item.pid, grace_period):
            continue
        if fsio.unlink(item.path):
            removed.append(item.path)
            logger.debug("gc: removed stale %s file %s", item.kind, item.path)
    return removed


def collect(
    store: Store,
    *,
    grace_period: float = DEFAULT_GRACE_PERIOD,
    dry_run: bool = False,
    progress: bool = False,
) -> GcPlan:
    """Plan a gc of ``store`` and, unless ``dry_run``, execute it."""
    started = time.perf_counter()
    plan = make_plan(store, grace_period, dry_run=dry_run)
    logger.info(
        "gc plan for %s: %d objects scanned, %d to delete (%d bytes), %d too young, "
        "%d stale temp files, %d stale intents",
        store.root, plan.objects_scanned, len(plan.delete), plan.bytes_to_free, len(plan.kept_young),
        len(plan.stale_temp), len(plan.stale_intents),
    )
    if dry_run:
        return dataclasses.replace(plan, seconds=time.perf_counter() - started)
    result = execute(store, plan, progress=progress)
    return dataclasses.replace(result, seconds=time.perf_counter() - started)


# ---------------------------------------------------------------------- helpers


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # unreachable; keeps type checkers calm


def human_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{round(seconds / size, 1):g} {unit}"
    return f"{round(seconds, 1):g} s"


def _listing(objects: tuple[GcObject, ...], verbose: bool) -> list[str]:
    shown = objects if verbose else objects[:_RENDER_LIMIT]
    lines = [f"    {o.oid}  {human_bytes(o.size):>10}  {human_duration(o.age)} old" for o in shown]
    if len(objects) > len(shown):
        lines.append(f"    ... and {len(objects) - len(shown)} more")
    return lines
