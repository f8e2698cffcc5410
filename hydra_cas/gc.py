"""Garbage collection: delete the objects, recipes and tensor blobs nothing needs.

gc runs in two steps.  *Plan* marks what the store still needs, lists what
else is on disk and sorts it into what is old enough to go and what is still
inside the grace period.  *Execute* then deletes, in batches, each batch under
the store lock with the marks taken again, because writers commit under the
same lock after checking that the files they reference still exist
(``Store._commit_puts`` for objects, ``Store._set_tier`` for archived forms): a
file is either seen by the writer's check or by gc's re-check, never missed by
both.  A dry run stops after the plan.

What is live:

* An **object** is live when a version whose tier is ``hot`` names its oid, or
  a version marked broken (its object may be what heals it), or a journal
  record the manifest has not caught up with, or a live intent.  An oid named
  only by archived versions (status ``ok``) has its bytes in the archive; a hot
  copy of it is one ``Store.archive`` could not drop (a crash between commit and
  drop, or a hot version of the same bytes deleted since).  gc deletes such a
  copy once it is old enough, but only after rebuilding the archived form and
  checking its SHA-256 against the oid during the plan, and finding the recipe
  and every blob it needs still present under the lock: a copy is never the
  last good one.
* A **recipe** under ``archive/`` is live when a version whose tier is
  ``archive`` names its oid (whatever its status), or a pending journal record
  puts such a version.
* A **tensor blob** is live when a live recipe names it, or, transitively, a
  live delta blob has it as its base, even if the version that base came from
  was deleted.  If a recipe or blob that an archived version (status ``ok``)
  needs is missing or unreadable, gc cannot prove anything under ``archive/``
  dead and skips that sweep with a warning (``fsck`` reports the damage and
  ``fsck --repair`` marks the versions broken, after which gc runs again).
  Damage below versions already marked broken is known and does not stop it.

A writer about to reference an existing recipe or blob again refreshes the
modification time of it and of every delta base under it (``Archive.refresh``,
``Archive.put_tensor``), so the grace period protects it, and the re-check
under the lock looks at each file's age again.  Recipes go before blobs, and
deltas before their bases, so a file that survives a partial sweep never lacks
what it needs.

NOTE: archive writes have no intents; the grace period is their only shield.
With a grace period of 0 (``--prune-now``) gc may remove the recipe and blobs
an archive has just written before its commit re-checks them, so that archive
retries or fails with an error, and a load that looked a version up just
before a restore may find its archived form gone.  No committed data is lost
either way, but on a busy store keep the grace period above the longest archive.

Temp files under ``tmp/`` and intents under ``intents/`` are leftovers once they
are older than the grace period and the process that wrote them (its pid is in
the file name) no longer runs on this host.  For the same reason an intent of a
running process protects its oid at any age, even with a grace period of 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hydra_cas import fsio
from hydra_cas.archive import MAX_DELTA_DEPTH
from hydra_cas.errors import HydraError, IntegrityError
from hydra_cas.progress import progress_bar

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from pathlib import Path

    from hydra_cas.archive import Archive
    from hydra_cas.layout import Layout
    from hydra_cas.store import Store

__all__ = [
    "DEFAULT_GRACE_PERIOD",
    "GcObject",
    "GcPlan",
    "Leftover",
    "archive_roots",
    "collect",
    "execute",
    "find_leftovers",
    "human_bytes",
    "human_duration",
    "live_archive",
    "live_oids",
    "make_plan",
    "object_marks",
    "pending_oids",
    "pending_puts",
    "referenced_oids",
    "remove_leftovers",
]

logger = logging.getLogger(__name__)

DEFAULT_GRACE_PERIOD = 3600.0
# A batch of deletions holds the store lock for at most this long (or this many
# files), so writers waiting for the lock stall briefly, not for a whole sweep.
_BATCH_SECONDS = 0.2
_BATCH_OBJECTS = 5000
# Names written by fsio.create_temp start with "<pid>-<16 hex>"; intents are
# "<oid>.<pid>-<16 hex>".  The pid tells whether the writer may still be running.
_TOKEN_RE = re.compile(r"(\d+)-[0-9a-f]{16}")
_INTENT_RE = re.compile(r"([0-9a-f]{64})\.(\d+)-[0-9a-f]{16}")
_RENDER_LIMIT = 20


@dataclass(frozen=True, slots=True)
class GcObject:
    """An unreferenced file: its id (oid, or tid for a tensor blob), size in bytes and age in seconds."""

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

    ``delete`` lists the objects planned for deletion (``archived_copies`` names
    those among them that are hot copies of archived versions); after execution
    ``deleted`` names those actually removed and ``spared`` those the re-check
    under the lock kept (referenced or refreshed meanwhile, or already gone).
    The ``*_recipes`` and ``*_blobs`` fields say the same of the archive tier;
    ``kept_young_blobs`` also holds old blobs kept because a younger recipe or
    delta needs them.  ``archive_skipped`` says why the archive was not swept.
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
    archived_copies: tuple[str, ...] = ()
    recipes_scanned: int = 0
    blobs_scanned: int = 0
    live_recipes: int = 0
    live_blobs: int = 0
    delete_recipes: tuple[GcObject, ...] = ()
    delete_blobs: tuple[GcObject, ...] = ()
    kept_young_recipes: tuple[GcObject, ...] = ()
    kept_young_blobs: tuple[GcObject, ...] = ()
    archive_skipped: str | None = None
    live_recipe_ids: frozenset[str] = dataclasses.field(default=frozenset(), repr=False, compare=False)
    """The live recipes and tids the plan found, the starting point of the re-check (not reported)."""
    live_tids: frozenset[str] = dataclasses.field(default=frozenset(), repr=False, compare=False)
    executed: bool = False
    deleted: tuple[str, ...] = ()
    spared: tuple[str, ...] = ()
    deleted_recipes: tuple[str, ...] = ()
    deleted_blobs: tuple[str, ...] = ()
    spared_archive: tuple[str, ...] = ()
    freed_bytes: int = 0
    freed_archive_bytes: int = 0
    files_removed: int = 0
    seconds: float = 0.0

    @property
    def bytes_to_free(self) -> int:
        """Bytes the planned object deletions free (archive and temp files not counted)."""
        return sum(o.size for o in self.delete)

    @property
    def archive_bytes_to_free(self) -> int:
        """Bytes the planned recipe and blob deletions free."""
        return sum(o.size for o in (*self.delete_recipes, *self.delete_blobs))

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
            "archived_copies": list(self.archived_copies),
            "kept_young": [o.to_dict() for o in self.kept_young],
            "stale_temp": [f.to_dict() for f in self.stale_temp],
            "stale_intents": [f.to_dict() for f in self.stale_intents],
            "deleted": list(self.deleted),
            "spared": list(self.spared),
            "freed_bytes": self.freed_bytes,
            "archive": {
                "skipped": self.archive_skipped,
                "recipes_scanned": self.recipes_scanned,
                "blobs_scanned": self.blobs_scanned,
                "live_recipes": self.live_recipes,
                "live_blobs": self.live_blobs,
                "bytes_to_free": self.archive_bytes_to_free,
                "delete_recipes": [o.to_dict() for o in self.delete_recipes],
                "delete_blobs": [o.to_dict() for o in self.delete_blobs],
                "kept_young_recipes": [o.to_dict() for o in self.kept_young_recipes],
                "kept_young_blobs": [o.to_dict() for o in self.kept_young_blobs],
                "deleted_recipes": list(self.deleted_recipes),
                "deleted_blobs": list(self.deleted_blobs),
                "spared": list(self.spared_archive),
                "freed_bytes": self.freed_archive_bytes,
            },
            "files_removed": self.files_removed,
            "seconds": round(self.seconds, 3),
        }

    def render(self, *, verbose: bool = False) -> str:
        """A report for humans; lists at most 20 files of each kind unless ``verbose``."""
        mode = "dry run" if self.dry_run else ("done" if self.executed else "plan")
        unreferenced = len(self.delete) + len(self.kept_young)
        lines = [
            f"gc of {self.root} ({mode}; grace period {human_duration(self.grace_period)})",
            f"  scanned {self.objects_scanned} objects: {self.live} live oids marked, "
            f"{unreferenced} unreferenced",
        ]
        verb = "would delete" if not self.executed else "planned to delete"
        n_copies = len(self.archived_copies)
        copies = f" ({n_copies} hot copies of archived versions)" if n_copies else ""
        lines.append(f"  {verb} {len(self.delete)} objects, {human_bytes(self.bytes_to_free)}{copies}")
        lines.extend(_listing(self.delete, verbose))
        if self.kept_young:
            lines.append(
                f"  kept {len(self.kept_young)} unreferenced objects younger than the grace period "
                f"({human_bytes(self.young_bytes)})"
            )
            lines.extend(_listing(self.kept_young, verbose))
        lines.extend(self._render_archive(verb, verbose))
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
            if self.deleted_recipes or self.deleted_blobs:
                lines.append(
                    f"  deleted {len(self.deleted_recipes)} recipes and {len(self.deleted_blobs)} "
                    f"tensor blobs, freed {human_bytes(self.freed_archive_bytes)}"
                )
            spared = len(self.spared) + len(self.spared_archive)
            if spared:
                lines.append(
                    f"  spared {spared} files the re-check under the lock found referenced, "
                    "refreshed by a writer, or already gone"
                )
        elif self.dry_run and (self.delete or self.delete_recipes or self.delete_blobs
                               or self.stale_temp or self.stale_intents):
            lines.append("  nothing was deleted; run without --dry-run to delete")
        return "\n".join(lines)

    def _render_archive(self, verb: str, verbose: bool) -> list[str]:
        if self.archive_skipped is not None:
            return [f"  archive/ not swept: {self.archive_skipped}"]
        if not (self.recipes_scanned or self.blobs_scanned):
            return []
        lines = [
            f"  archive: scanned {self.recipes_scanned} recipes and {self.blobs_scanned} tensor blobs "
            f"({self.live_recipes} and {self.live_blobs} live)",
            f"  {verb} {len(self.delete_recipes)} recipes and {len(self.delete_blobs)} tensor blobs, "
            f"{human_bytes(self.archive_bytes_to_free)}",
        ]
        if verbose:
            lines.extend(_listing(self.delete_recipes, verbose))
            lines.extend(_listing(self.delete_blobs, verbose))
        young = (*self.kept_young_recipes, *self.kept_young_blobs)
        if young:
            lines.append(
                f"  kept {len(young)} unreferenced archive files inside the grace period "
                f"({human_bytes(sum(o.size for o in young))})"
            )
        return lines


# ---------------------------------------------------------------------- marking objects


def referenced_oids(models: Mapping[str, Any]) -> set[str]:
    """Every oid a version record names, whatever its tier or status."""
    return {entry["oid"] for model in models.values() for entry in model["versions"].values()}


def object_marks(models: Mapping[str, Any]) -> tuple[set[str], dict[str, int]]:
    """(oids whose object is needed, {oid: size} of those named only by archived versions).

    An object is needed by a hot version and by a version marked broken,
    whatever its tier: fsck can heal a broken version from its object.  An oid
    only archived versions (status ``ok``) name has its bytes in the archive.
    """
    needed: set[str] = set()
    archived: dict[str, int] = {}
    for model in models.values():
        for entry in model["versions"].values():
            if entry["tier"] == "archive" and entry["status"] == "ok":
                archived[entry["oid"]] = entry["size"]
            else:
                needed.add(entry["oid"])
    for oid in needed:
        archived.pop(oid, None)
    return needed, archived


def pending_puts(store: Store, journal_seq: int) -> list[dict[str, Any]]:
    """Put records past ``journal_seq`` (a writer died before the manifest).

    The next writer rolls such records forward, so what they name is live.
    """
    journal = store.manifest.journal
    if journal.last_seq() <= journal_seq:
        return []
    records, _ = journal.read()
    return [r for r in records[journal_seq:] if r["op"] == "put"]


def pending_oids(store: Store, journal_seq: int) -> set[str]:
    """Oids put by journal records past ``journal_seq``, whatever their tier."""
    return {r["entry"]["oid"] for r in pending_puts(store, journal_seq)}


def live_oids(store: Store, doc: Mapping[str, Any], grace_period: float, now: float) -> set[str]:
    """The oids whose objects gc must keep: needed by ``doc``, pending journal puts, live intents.

    Oids only archived versions name are not included (see :func:`object_marks`).
    """
    live = object_marks(doc["models"])[0]
    live |= pending_oids(store, doc["journal_seq"])
    live |= _scan_intents(store.layout, grace_period, now)[0]
    return live


def _archived_form_rebuilds(archive: Archive, oid: str, size: int) -> bool:
    """Whether the archived form of ``oid`` rebuilds to exactly its bytes (read in full)."""
    sha = hashlib.sha256()
    total = 0
    try:
        recipe = archive.read_recipe(oid)
        for chunk in archive.iter_payload(recipe, verify_tensors=False):
            sha.update(chunk)
            total += len(chunk)
    except IntegrityError as exc:
        logger.warning("gc: keeping the hot copy of archived object %s: its archived form does not "
                       "rebuild (%s); run `hydra-cas fsck --repair`", oid, exc)
        return False
    if total != size or sha.hexdigest() != oid:
        logger.warning("gc: keeping the hot copy of archived object %s: its archived form rebuilds to "
                       "other bytes; run `hydra-cas fsck --repair`", oid)
        return False
    return True


def _archived_form_present(archive: Archive, oid: str) -> bool:
    """Under the lock: the recipe of ``oid`` and every blob it needs exist.

    Their contents were checked during the plan, and these files are never modified.
    """
    if not archive.has_recipe(oid):
        return False
    _, problems = archive.live_tensors({oid})
    return not problems


# ---------------------------------------------------------------------- marking the archive


def archive_roots(
    models: Mapping[str, Any], pending: Iterable[Mapping[str, Any]] = ()
) -> tuple[set[str], set[str]]:
    """(recipes that must be whole, recipes of versions already marked broken).

    The first set holds the oid of every archived version still marked ``ok``
    and of every pending put of an archived version.
    """
    whole: set[str] = set()
    broken: set[str] = set()
    entries = [e for m in models.values() for e in m["versions"].values()]
    entries += [r["entry"] for r in pending]
    for entry in entries:
        if entry["tier"] != "archive":
            continue
        (whole if entry["status"] == "ok" else broken).add(entry["oid"])
    return whole, broken - whole


def live_archive(
    archive: Archive, whole: set[str], broken: set[str]
) -> tuple[set[str], set[str], list[str]]:
    """(live recipes, live tids, problems that make a sweep unsafe).

    Damage under ``whole`` recipes is a problem.  Under ``broken`` ones it is
    already recorded in the manifest: a missing recipe or blob there has
    nothing left to protect, but a recipe that is present and unreadable hides
    which blobs it needs, so it is a problem too.
    """
    tids, problems = archive.live_tensors(whole)
    readable: set[str] = set()
    for oid in broken:
        if not archive.has_recipe(oid):
            continue
        try:
            archive.read_recipe(oid)
        except IntegrityError as exc:
            problems.append(str(exc))
            continue
        readable.add(oid)
    more, _ = archive.live_tensors(readable)  # missing or damaged blobs here are known losses
    return whole | readable, tids | more, problems


def _chain_of(archive: Archive, tid: str) -> list[str]:
    """The bases under blob ``tid`` that can be read (not ``tid`` itself)."""
    chain: list[str] = []
    for _ in range(MAX_DELTA_DEPTH):
        try:
            base = archive.blob_header(tid).base
        except IntegrityError:
            break
        if base is None:
            break
        chain.append(base)
        tid = base
    return chain


# ---------------------------------------------------------------------- leftovers


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


def _aged(ident: str, path: Path, now: float) -> GcObject | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return GcObject(ident, st.st_size, now - st.st_mtime)


def _plan_objects(
    store: Store, doc: Mapping[str, Any], grace_period: float, now: float
) -> tuple[int, set[str], list[GcObject], list[GcObject], list[str]]:
    """(objects scanned, live oids, to delete, kept young, hot copies of archived versions to delete)."""
    live = live_oids(store, doc, grace_period, now)
    _, archived = object_marks(doc["models"])
    delete: list[GcObject] = []
    young: list[GcObject] = []
    copies: list[str] = []
    scanned = 0
    for oid, path in store.layout.iter_objects():
        scanned += 1
        if oid in live:
            continue
        item = _aged(oid, path, now)
        if item is None:
            continue
        if item.age < grace_period:
            young.append(item)
            continue
        if oid in archived:
            # Read the whole archived form now, outside the lock; the re-check
            # under the lock only needs its files to be still there.
            if not _archived_form_rebuilds(store.archive_tier, oid, archived[oid]):
                continue
            copies.append(oid)
        delete.append(item)
    return scanned, live, delete, young, copies


@dataclass(slots=True)
class _ArchivePlan:
    recipes_scanned: int = 0
    blobs_scanned: int = 0
    live_recipes: int = 0
    live_blobs: int = 0
    delete_recipes: list[GcObject] = dataclasses.field(default_factory=list)
    delete_blobs: list[GcObject] = dataclasses.field(default_factory=list)
    young_recipes: list[GcObject] = dataclasses.field(default_factory=list)
    young_blobs: list[GcObject] = dataclasses.field(default_factory=list)
    skipped: str | None = None
    recipes: frozenset[str] = frozenset()
    tids: frozenset[str] = frozenset()


def _plan_archive(store: Store, doc: Mapping[str, Any], grace_period: float, now: float) -> _ArchivePlan:
    archive = store.archive_tier
    out = _ArchivePlan()
    recipes = {ident: path for ident, path in archive.iter_files("recipes")}
    blobs = {ident: path for ident, path in archive.iter_files("tensors")}
    out.recipes_scanned, out.blobs_scanned = len(recipes), len(blobs)
    whole, broken = archive_roots(doc["models"], pending_puts(store, doc["journal_seq"]))
    live_r, live_t, problems = live_archive(archive, whole, broken)
    out.live_recipes, out.live_blobs = len(live_r), len(live_t)
    out.recipes, out.tids = frozenset(live_r | whole | broken), frozenset(live_t)
    if problems:
        out.skipped = (f"{len(problems)} problem(s) with data archived versions need, e.g. {problems[0]}; "
                       "run `hydra-cas fsck`")
        logger.warning("gc: not sweeping archive/: %s", out.skipped)
        return out
    dead_recipes = [item for r, path in recipes.items() if r not in live_r
                    if (item := _aged(r, path, now)) is not None]
    dead_blobs = {t: item for t, path in blobs.items() if t not in live_t
                  if (item := _aged(t, path, now)) is not None}
    # A young recipe or delta belongs to an archive in flight (or just reused
    # one): whatever it needs stays, however old.
    held: set[str] = set()
    young_recipe_ids = {o.oid for o in dead_recipes if o.age < grace_period}
    held |= archive.live_tensors(young_recipe_ids)[0]
    for tid, item in dead_blobs.items():
        if item.age < grace_period:
            held.update(_chain_of(archive, tid))
    for item in dead_recipes:
        (out.young_recipes if item.age < grace_period else out.delete_recipes).append(item)
    depth: dict[str, int] = {}
    for tid, item in dead_blobs.items():
        if item.age < grace_period or tid in held:
            out.young_blobs.append(item)
            continue
        try:
            depth[tid] = archive.blob_header(tid).depth
        except IntegrityError:
            depth[tid] = MAX_DELTA_DEPTH + 1  # unreadable: no blob can rely on it as a base
        out.delete_blobs.append(item)
    out.delete_recipes.sort(key=lambda o: o.oid)
    # Deltas before their bases: a blob left by an interrupted sweep keeps its chain.
    out.delete_blobs.sort(key=lambda o: (-depth[o.oid], o.oid))
    out.young_recipes.sort(key=lambda o: o.oid)
    out.young_blobs.sort(key=lambda o: o.oid)
    return out


def make_plan(store: Store, grace_period: float = DEFAULT_GRACE_PERIOD, *, dry_run: bool = False) -> GcPlan:
    """Mark and list, deleting nothing."""
    if not grace_period >= 0:  # also refuses NaN
        raise HydraError(f"grace_period must be a number of seconds >= 0, got {grace_period!r}")
    now = time.time()
    doc = store.manifest.read()
    scanned, live, delete, young, copies = _plan_objects(store, doc, grace_period, now)
    arch = _plan_archive(store, doc, grace_period, now)
    if (delete or arch.delete_recipes or arch.delete_blobs) and not _refs_known(store.layout):
        raise HydraError(
            f"{store.root} has {scanned} objects and {arch.recipes_scanned} archived recipes but neither "
            "manifest.json nor journal.jsonl; refusing to delete what may be the only copy of unlisted "
            "weights. Restore the manifest or journal from a backup, or remove objects/ and archive/ by "
            "hand if the store is unused"
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
        archived_copies=tuple(sorted(copies)),
        recipes_scanned=arch.recipes_scanned,
        blobs_scanned=arch.blobs_scanned,
        live_recipes=arch.live_recipes,
        live_blobs=arch.live_blobs,
        delete_recipes=tuple(arch.delete_recipes),
        delete_blobs=tuple(arch.delete_blobs),
        kept_young_recipes=tuple(arch.young_recipes),
        kept_young_blobs=tuple(arch.young_blobs),
        archive_skipped=arch.skipped,
        live_recipe_ids=arch.recipes,
        live_tids=arch.tids,
    )


# ---------------------------------------------------------------------- executing


class _ArchiveUnsafe(Exception):
    """Internal: the re-check under the lock found live archive data damaged; stop sweeping archive/."""


class _Marks:
    """The live sets, recomputed under the lock; the parts drawn from the manifest only when it changed."""

    def __init__(self, store: Store, plan: GcPlan) -> None:
        self.store = store
        self.grace_period = plan.grace_period
        self._doc: Mapping[str, Any] | None = None
        self._needed: set[str] = set()
        self._archived: dict[str, int] = {}
        self._present: dict[str, bool] = {}
        # Archive marks start from the plan's and only grow: a recipe that stops
        # being live meanwhile is merely kept until the next gc, and only new
        # roots need their blobs walked (under the lock).
        self._recipes: set[str] = set(plan.live_recipe_ids)
        self._tids: set[str] = set(plan.live_tids)
        self._archive_doc: Mapping[str, Any] | None = None

    def _read(self) -> Mapping[str, Any]:
        if not _refs_known(self.store.layout):
            raise HydraError(
                f"manifest.json and journal.jsonl of {self.store.root} disappeared during gc; "
                "stopped deleting. Restore them from a backup and run `hydra-cas fsck`"
            )
        return self.store.manifest.read()  # cached by file identity: cheap when unchanged

    def objects(self, now: float) -> Callable[[str], bool]:
        doc = self._read()
        if doc is not self._doc:
            self._doc = doc
            self._needed, self._archived = object_marks(doc["models"])
            self._present = {}
        extra = pending_oids(self.store, doc["journal_seq"])
        extra |= _scan_intents(self.store.layout, self.grace_period, now)[0]
        needed, archived, present = self._needed, self._archived, self._present
        archive = self.store.archive_tier

        def is_live(oid: str) -> bool:
            # Not one merged set: copying every ref per batch was most of a batch's cost.
            if oid in needed or oid in extra:
                return True
            if oid not in archived:
                return False
            if oid not in present:
                # An oid archived since the plan was not rebuilt by it, but
                # Store.archive rebuilt and checked it before committing.
                present[oid] = _archived_form_present(archive, oid)
            return not present[oid]

        return is_live

    def archive(self) -> Callable[[str], bool]:
        """Whether a recipe oid or blob tid is live; raises _ArchiveUnsafe when that cannot be known."""
        doc = self._read()
        pending = pending_puts(self.store, doc["journal_seq"])
        if doc is not self._archive_doc or pending:
            whole, broken = archive_roots(doc["models"], pending)
            new_whole, new_broken = whole - self._recipes, broken - self._recipes
            if new_whole or new_broken:
                recipes, tids, problems = live_archive(self.store.archive_tier, new_whole, new_broken)
                if problems:
                    raise _ArchiveUnsafe(problems[0])
                self._recipes |= recipes | new_whole | new_broken
                self._tids |= tids
            self._archive_doc = doc
        recipes, tids = self._recipes, self._tids
        return lambda ident: ident in recipes or ident in tids


def _unlink_if_old(path: Path, now: float, grace_period: float, what: str, ident: str) -> int | None:
    """Under the lock: delete ``path`` unless it was refreshed within the grace period; its size, or None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if now - st.st_mtime < grace_period:
        # A writer reused it (and refreshed its mtime) and has not committed yet.
        logger.debug("gc: %s %s was refreshed %.1f s ago; kept", what, ident, now - st.st_mtime)
        return None
    if not fsio.unlink(path):
        return None
    logger.debug("gc: deleted %s %s (%d bytes)", what, ident, st.st_size)
    return st.st_size


@dataclass(slots=True)
class _Tally:
    """What one sweep did so far; kept when a later batch stops it."""

    deleted: list[str] = dataclasses.field(default_factory=list)
    spared: list[str] = dataclasses.field(default_factory=list)
    freed: int = 0


def _sweep(
    store: Store,
    todo: tuple[GcObject, ...],
    judge: Callable[[float], Callable[[str], int | None]],
    bar: Any,
) -> _Tally:
    """Delete ``todo`` in batches, each under the lock with ``judge(now)`` taken again."""
    tally = _Tally()
    _sweep_into(store, todo, judge, bar, tally)
    return tally


def _sweep_into(
    store: Store,
    todo: tuple[GcObject, ...],
    judge: Callable[[float], Callable[[str], int | None]],
    bar: Any,
    tally: _Tally,
) -> None:
    i = 0
    while i < len(todo):
        with store.manifest.lock():
            now = time.time()
            delete_one = judge(now)
            deadline = time.monotonic() + _BATCH_SECONDS
            stop = min(len(todo), i + _BATCH_OBJECTS)
            first = i
            while i < stop and (i == first or time.monotonic() < deadline):
                ident = todo[i].oid
                i += 1
                size = delete_one(ident)
                if size is None:
                    tally.spared.append(ident)
                else:
                    tally.deleted.append(ident)
                    tally.freed += size
            done = i - first
        bar.update(done)


def execute(store: Store, plan: GcPlan, *, progress: bool = False) -> GcPlan:
    """Carry out ``plan``; return it with what was deleted and spared filled in."""
    started = time.perf_counter()
    marks = _Marks(store, plan)
    grace = plan.grace_period
    archive = store.archive_tier
    total = len(plan.delete) + len(plan.delete_recipes) + len(plan.delete_blobs)
    bar = progress_bar(total, "gc", enabled=progress and bool(total), unit="file")

    def objects_judge(now: float) -> Callable[[str], int | None]:
        is_live = marks.objects(now)

        def delete_one(oid: str) -> int | None:
            # NOTE: emptied fan-out directories are left in place.  A saver creates the
            # fan-out (fsio.makedirs) and then renames its object into it without the
            # lock, so removing a directory here could make that rename fail.  At most
            # 256 empty directories remain, which costs nothing.
            if is_live(oid):
                logger.debug("gc: %s is referenced again; kept", oid)
                return None
            return _unlink_if_old(store.layout.oid_to_path(oid), now, grace, "object", oid)

        return delete_one

    def archive_judge(
        what: str, path_of: Callable[[str], Path]
    ) -> Callable[[float], Callable[[str], int | None]]:
        def judge(now: float) -> Callable[[str], int | None]:
            is_live = marks.archive()

            def delete_one(ident: str) -> int | None:
                if is_live(ident):
                    logger.debug("gc: %s %s is needed again; kept", what, ident)
                    return None
                return _unlink_if_old(path_of(ident), now, grace, what, ident)

            return delete_one

        return judge

    recipes, blobs = _Tally(), _Tally()
    skipped = plan.archive_skipped
    try:
        objects = _sweep(store, plan.delete, objects_judge, bar)
        try:
            # Recipes first: a recipe never outlives the blobs it names.
            judge = archive_judge("recipe", archive.recipe_path)
            _sweep_into(store, plan.delete_recipes, judge, bar, recipes)
            judge = archive_judge("tensor blob", archive.tensor_path)
            _sweep_into(store, plan.delete_blobs, judge, bar, blobs)
        except _ArchiveUnsafe as exc:
            skipped = (f"stopped: data an archived version needs became unreadable ({exc}); "
                       "run `hydra-cas fsck`")
            logger.warning("gc: %s", skipped)
    finally:
        bar.close()
    deleted, spared, freed = objects.deleted, objects.spared, objects.freed
    spared_a, freed_a = recipes.spared + blobs.spared, recipes.freed + blobs.freed
    deleted_r, deleted_b = recipes.deleted, blobs.deleted
    removed = len(remove_leftovers((*plan.stale_temp, *plan.stale_intents), plan.grace_period))
    result = dataclasses.replace(
        plan,
        executed=True,
        deleted=tuple(deleted),
        spared=tuple(spared),
        deleted_recipes=tuple(deleted_r),
        deleted_blobs=tuple(deleted_b),
        spared_archive=tuple(spared_a),
        freed_bytes=freed,
        freed_archive_bytes=freed_a,
        archive_skipped=skipped,
        files_removed=removed,
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "gc of %s: deleted %d objects (%d bytes), %d recipes and %d tensor blobs (%d bytes), spared %d, "
        "removed %d leftover files in %.2f s",
        store.root, len(deleted), freed, len(deleted_r), len(deleted_b), freed_a,
        len(spared) + len(spared_a), removed, result.seconds,
    )
    return result


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
        "%d recipes and %d tensor blobs to delete (%d bytes), %d stale temp files, %d stale intents",
        store.root, plan.objects_scanned, len(plan.delete), plan.bytes_to_free, len(plan.kept_young),
        len(plan.delete_recipes), len(plan.delete_blobs), plan.archive_bytes_to_free,
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


def _listing(objects: tuple[GcObject, ...] | list[GcObject], verbose: bool) -> list[str]:
    shown = objects if verbose else objects[:_RENDER_LIMIT]
    lines = [f"    {o.oid}  {human_bytes(o.size):>10}  {human_duration(o.age)} old" for o in shown]
    if len(objects) > len(shown):
        lines.append(f"    ... and {len(objects) - len(shown)} more")
    return lines
