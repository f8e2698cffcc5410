"""Concurrency stress: writers, readers, gc, archive/restore and fsck on one store at once.

Four worker processes save (single and batched), delete, set aliases and load
with ``verify="full"`` for a bounded time, each on a model of its own (so each
knows exactly which of its versions must exist) but loading everyone's.  Half
of the payloads are the same bytes across workers, so a worker's save often
reuses an object that another worker's delete has just made garbage.  Beside
them, separate processes run gc with a grace period of 0 in a loop, archive
and restore random versions, and run ``fsck(repair=False)``.

gc with grace 0 beside savers is safe only because a saver checks, under the
store lock, that its object still exists when it commits the ref (and writes
it again if not: ``Store._commit_puts``).  That is what this test leans on.

Afterwards: no committed ref is lost and none appears that was not committed,
aliases are as last set, every version loads bit for bit, fsck is clean apart
from orphans, and no process saw an exception it should not have.  A load of a
version another worker deleted meanwhile raises ``NotFoundError``, which is
legitimate and counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import multiprocessing
import os
import queue
import random
import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hydra_cas import IntegrityError, NotFoundError, Store
from hydra_cas.archive import Archive
from hydra_cas.manifest import Journal
from hydra_cas.objects import ObjectStore

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 4
DEFAULT_SECONDS = float(os.environ.get("HYDRA_STRESS_SECONDS", "10"))
MAX_MINOR = 30
ALIASES = ("champion", "prod")


def _load_harness() -> Any:
    if "crash_harness" in sys.modules:
        return sys.modules["crash_harness"]
    spec = importlib.util.spec_from_file_location("crash_harness", ROOT / "tools" / "crash_harness.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["crash_harness"] = module
    spec.loader.exec_module(module)
    return module


harness = _load_harness()


def stress_tensors(name: str, version: str) -> dict[str, np.ndarray]:
    """Deterministic tensors; versions with an even minor number are the same bytes in every model."""
    minor = int(version.split(".")[1])
    content = f"shared:{minor}" if minor % 2 == 0 else f"{name}:{version}"
    seed = int.from_bytes(hashlib.sha256(content.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    rows = 64 + minor * 16  # 64 KiB .. 550 KiB of float32
    return {
        "w": rng.standard_normal((rows, 256)).astype(np.float32),
        "h": rng.standard_normal((32, 64)).astype(np.float16),
        "step": np.array([minor], dtype=np.int64),
    }


# ---------------------------------------------------------------------- the processes


def _unexpected(out: dict[str, Any], op: str, exc: BaseException) -> None:
    """Record an exception no process should have seen (judged again by the parent: see KNOWN_RACES)."""
    out["unexpected"].append({"role": out["role"], "op": op, "type": type(exc).__name__,
                              "message": str(exc), "trace": traceback.format_exc(limit=8)})


def _check_load(store: Store, name: str, version: str, rng: random.Random) -> str | None:
    loaded = store.load(name, version, verify="full", mmap=rng.random() < 0.3)
    return harness.check_tensors(name, version, loaded, stress_tensors)


def worker(root: str, index: int, seed: int, seconds: float, barrier: Any, results: Any) -> None:
    """Save, delete, alias and load on model ``w<index>``; load anything."""
    rng = random.Random(seed)
    store = Store(root)
    name = f"w{index}"
    out: dict[str, Any] = {"role": f"worker-{index}", "ops": Counter(), "not_found": Counter(),
                           "unexpected": [], "log": []}
    try:
        live = {v.version for v in store.list(name)}
    except NotFoundError:
        live = set()
    aliases: dict[str, str] = {}
    barrier.wait(timeout=120)
    deadline = time.time() + seconds
    while time.time() < deadline:
        roll = rng.random()
        op = "load"
        try:
            free = [m for m in range(1, MAX_MINOR + 1) if f"1.{m}.0" not in live]
            if (roll < 0.30 or not live) and free:
                op = "save"
                version = f"1.{rng.choice(free)}.0"
                parent = rng.choice(sorted(live)) if live and rng.random() < 0.5 else None
                result = store.save(name, version, stress_tensors(name, version), parent=parent)
                live.add(version)
                out["log"].append(["save", version, result.oid])
                out["ops"]["save"] += 1
            elif roll < 0.38 and len(free) >= 3:
                op = "save_many"
                versions = [f"1.{m}.0" for m in rng.sample(free, min(3, len(free)))]
                saved = store.save_many((name, v, stress_tensors(name, v)) for v in versions)
                live.update(versions)
                out["log"] += [["save", r.version, r.oid] for r in saved]
                out["ops"]["save_many"] += 1
            elif roll < 0.55:
                op = "delete"
                version = rng.choice(sorted(live))
                store.delete(name, version, force=True)
                live.discard(version)
                aliases = {a: v for a, v in aliases.items() if v != version}
                out["log"].append(["delete", version, None])
                out["ops"]["delete"] += 1
            elif roll < 0.62:
                op = "set_alias"
                alias, version = rng.choice(ALIASES), rng.choice(sorted(live))
                store.set_alias(name, alias, version)
                aliases[alias] = version
                out["ops"]["set_alias"] += 1
            else:
                _load_any(store, name, live, rng, out)
        except Exception as exc:
            _unexpected(out, op, exc)
    out["live"] = sorted(live)
    out["aliases"] = aliases
    results.put(out)


def _load_any(store: Store, own: str, live: set[str], rng: random.Random, out: dict[str, Any]) -> None:
    if rng.random() < 0.4 and live:
        name, version = own, rng.choice(sorted(live))
    else:
        listed = store.list()
        if not listed:
            return
        pick = rng.choice(listed)
        name, version = pick.name, pick.version
    try:
        wrong = _check_load(store, name, version, rng)
    except NotFoundError:
        if name == own:
            raise  # our own committed version must be there
        out["not_found"]["load"] += 1  # another worker deleted it meanwhile
        return
    if wrong:
        out["unexpected"].append({"role": out["role"], "op": "load", "type": "WrongTensors",
                                  "message": wrong, "trace": ""})
    out["ops"]["load"] += 1


def collector(root: str, seed: int, seconds: float, barrier: Any, results: Any) -> None:
    """gc with a grace period of 0, over and over."""
    rng = random.Random(seed)
    store = Store(root)
    out: dict[str, Any] = {"role": "gc", "ops": Counter(), "not_found": Counter(), "unexpected": [],
                           "deleted": 0, "leftovers_removed": 0}
    barrier.wait(timeout=120)
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            plan = store.gc(grace_period=0)
            out["ops"]["gc"] += 1
            out["deleted"] += len(plan.deleted)
            out["leftovers_removed"] += plan.files_removed
        except Exception as exc:
            _unexpected(out, "gc", exc)
        time.sleep(rng.uniform(0, 0.03))
    results.put(out)


def archiver(root: str, seed: int, seconds: float, barrier: Any, results: Any) -> None:
    """Archive and restore random versions."""
    rng = random.Random(seed)
    store = Store(root)
    out: dict[str, Any] = {"role": "archiver", "ops": Counter(), "not_found": Counter(), "unexpected": []}
    barrier.wait(timeout=120)
    deadline = time.time() + seconds
    while time.time() < deadline:
        listed = store.list()
        hot = [v for v in listed if v.tier == "hot"]
        archived = [v for v in listed if v.tier == "archive"]
        restore = archived and (not hot or rng.random() < 0.4)
        pick = rng.choice(archived if restore else hot) if (hot or archived) else None
        if pick is None:
            time.sleep(0.01)
            continue
        kind = "restore" if restore else "archive"
        try:
            (store.restore if restore else store.archive)(pick.name, pick.version)
            out["ops"][kind] += 1
        except NotFoundError:
            out["not_found"][kind] += 1  # deleted meanwhile
        except Exception as exc:
            _unexpected(out, kind, exc)
    results.put(out)


def checker(root: str, seed: int, seconds: float, barrier: Any, results: Any) -> None:
    """fsck(repair=False) in a loop; anything but leftovers is an alarm."""
    store = Store(root)
    out: dict[str, Any] = {"role": "fsck", "ops": Counter(), "not_found": Counter(), "unexpected": [],
                           "alarms": Counter(), "alarm_examples": []}
    barrier.wait(timeout=120)
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            report = store.fsck()
            out["ops"]["fsck"] += 1
        except Exception as exc:
            _unexpected(out, "fsck", exc)
            continue
        for problem in harness.fsck_problems(report, harness.LEFTOVER_KINDS | {"stale-temp", "stale-intent"}):
            kind = problem.split(":", 1)[0]
            out["alarms"][kind] += 1
            if len(out["alarm_examples"]) < 5:
                out["alarm_examples"].append(problem)
    results.put(out)


# ---------------------------------------------------------------------- the test


def _populate(root: Path) -> None:
    store = Store(root)
    for index in range(WORKERS):
        name = f"w{index}"
        store.save_many((name, f"1.{m}.0", stress_tensors(name, f"1.{m}.0")) for m in (1, 2, 3))


def run_stress(root: Path, seconds: float, seed: int) -> dict[str, Any]:
    _populate(root)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS + 3)
    results = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(str(root), i, seed * 100 + i, seconds, barrier, results))
             for i in range(WORKERS)]
    procs += [ctx.Process(target=fn, args=(str(root), seed * 100 + 50 + j, seconds, barrier, results))
              for j, fn in enumerate((collector, archiver, checker))]
    for p in procs:
        p.start()
    # Each process starts its clock when all have passed the barrier.
    outs: list[dict[str, Any]] = []
    give_up = time.monotonic() + seconds + 240
    while len(outs) < len(procs) and time.monotonic() < give_up:
        try:
            outs.append(results.get(timeout=1))
        except queue.Empty:
            if sum(p.exitcode is not None for p in procs) > len(outs):
                time.sleep(1)  # a result may still be in the pipe; then stop waiting
                with contextlib.suppress(queue.Empty):
                    while True:
                        outs.append(results.get(timeout=0.5))
                break
    for p in procs:
        p.join(timeout=60)
    return {"outs": outs, "exitcodes": [p.exitcode for p in procs]}


def _verify(root: Path, outs: list[dict[str, Any]], tolerated: set[str]) -> tuple[list[str], Counter[str]]:
    """(problems, known-race signatures seen and tolerated)."""
    problems: list[str] = []
    known: Counter[str] = Counter()
    for out in outs:
        for record in out["unexpected"]:
            race = _known_race(record)
            if race is not None and race in tolerated:
                known[race] += 1
            else:
                problems.append(f"{record['role']}: {record['op']} raised {record['type']}: {record['trace']}"
                                f"{record['message'] if not record['trace'] else ''}")
        for kind, count in out.get("alarms", {}).items():
            if kind == "journal-ahead" and "fsck-journal-ahead" in tolerated:
                known["fsck-journal-ahead"] += count
            else:
                problems.append(f"fsck beside the writers reported {count} x {kind}: {out['alarm_examples']}")
    store = Store(root, create=False)
    doc = store.manifest.read()
    for out in (o for o in outs if o["role"].startswith("worker-")):
        name = f"w{out['role'].split('-')[1]}"
        model = doc["models"].get(name, {"versions": {}, "aliases": {}})
        actual, expected = set(model["versions"]), set(out["live"])
        problems += [f"{name}:{v} was committed and is lost" for v in sorted(expected - actual)]
        problems += [f"{name}:{v} is present but its delete was committed" for v in sorted(actual - expected)]
        if model["aliases"] != out["aliases"]:
            problems.append(f"{name}: aliases {model['aliases']} != last set {out['aliases']}")
        oids = {v: oid for op, v, oid in out["log"] if op == "save"}
        for version in expected & actual:
            if version in oids and model["versions"][version]["oid"] != oids[version]:
                problems.append(f"{name}:{version} names another oid than its save returned")
    # All processes are gone: gc (grace 0) may now clear every leftover.
    store.gc(grace_period=0)
    problems += [f"fsck: {p}" for p in harness.fsck_problems(store.fsck(), harness.LEFTOVER_KINDS)]
    leftovers = [p.name for d in ("tmp", "intents") for p in (root / d).iterdir()]
    if leftovers:
        problems.append(f"gc left {len(leftovers)} temp files/intents of finished processes")
    _, wrong = harness.bitexact_problems(store, make=stress_tensors)
    problems += wrong
    problems += harness.archive_problems(store)
    return problems, known


def _summary(outs: list[dict[str, Any]]) -> dict[str, Any]:
    ops: Counter[str] = Counter()
    not_found: Counter[str] = Counter()
    alarms: Counter[str] = Counter()
    for out in outs:
        ops.update(out["ops"])
        not_found.update(out["not_found"])
        alarms.update(out.get("alarms", {}))
    gc = next(o for o in outs if o["role"] == "gc")
    return {"ops": dict(ops), "total_ops": sum(ops.values()), "legit_not_found": dict(not_found),
            "gc_objects_deleted": gc["deleted"], "gc_leftovers_removed": gc["leftovers_removed"],
            "concurrent_fsck_alarms": dict(alarms),
            "unexpected_exceptions": sum(len(o["unexpected"]) for o in outs)}


def _run_and_check(tmp_path: Path, seconds: float, seed: int) -> dict[str, Any]:
    # A known race is tolerated only while its deterministic reproduction still shows it.
    tolerated = {race for race, reproduce in KNOWN_RACES.items() if reproduce(tmp_path / f"repro-{race}")}
    root = tmp_path / "store"
    run = run_stress(root, seconds, seed)
    assert run["exitcodes"] == [0] * len(run["exitcodes"]), run["exitcodes"]
    assert len(run["outs"]) == len(run["exitcodes"]), "a process sent no results"
    summary = _summary(run["outs"])
    problems, known = _verify(root, run["outs"], tolerated)
    summary["known_race_hits"] = dict(known)
    summary["unexplained_problems"] = len(problems)
    target = os.environ.get("HYDRA_RELIABILITY_REPORT")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        (Path(target) / f"stress-{int(seconds)}s-seed{seed}.json").write_text(json.dumps(summary, indent=2))
    assert not problems, f"{len(problems)} problems ({summary}):\n" + "\n".join(problems[:30])
    # The test proves something only if every kind of operation happened.
    for kind in ("save", "save_many", "delete", "load", "gc", "archive", "restore", "fsck"):
        assert summary["ops"].get(kind, 0) > 0, f"no {kind} ran: {summary}"
    return summary


def test_stress_writers_readers_gc_archive_fsck(tmp_path: Path) -> None:
    _run_and_check(tmp_path, DEFAULT_SECONDS, seed=1)


@pytest.mark.slow
def test_stress_long(tmp_path: Path) -> None:
    _run_and_check(tmp_path, 60.0, seed=2)


# ---------------------------------------------------------------------- races found by this test
#
# Each function below forces one interleaving the stress run hits by chance, by
# running the "other process" (a second Store on the same directory) at the
# racy moment, and returns True while the bug is there.  The xfail tests pin
# them; the stress run tolerates a race's signature only while it reproduces.


@contextlib.contextmanager
def _patched(owner: Any, attr: str, replacement: Any) -> Any:
    original = getattr(owner, attr)
    setattr(owner, attr, replacement)
    try:
        yield original
    finally:
        setattr(owner, attr, original)


def _small(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((64, 64)).astype(np.float32), "b": np.arange(4) + seed}


def reproduce_fsck_journal_ahead(tmp: Path) -> bool:
    """fsck reads manifest.json, a writer commits, fsck reads the journal: "journal-ahead"."""
    store = Store(tmp / "store")
    store.save("m", "1.0", _small(1))
    other = Store(tmp / "store")
    fired: list[bool] = []

    writers: list[threading.Thread] = []

    def read(self: Journal) -> Any:
        if not fired:
            fired.append(True)
            # A concurrent writer tries to commit between fsck's two reads; give it time to.
            writer = threading.Thread(target=other.save, args=("m", "2.0", _small(2)))
            writer.start()
            writers.append(writer)
            writer.join(timeout=0.5)
        return original(self)

    with _patched(Journal, "read", read) as original:
        report = store.fsck()
    for writer in writers:
        writer.join()
    assert "2.0" in [v.version for v in other.list("m")]
    return any(f.kind == "journal-ahead" for f in report.findings)


def reproduce_archive_vs_gc(tmp: Path) -> bool:
    """gc(grace_period=0) runs between an archive writing its recipe and checking that it rebuilds."""
    store = Store(tmp / "store")
    store.save("m", "1.0", _small(1))
    other = Store(tmp / "store")

    def write_recipe(self: Archive, recipe: Any) -> None:
        original(self, recipe)
        other.gc(grace_period=0)

    with _patched(Archive, "write_recipe", write_recipe) as original:
        try:
            store.archive("m", "1.0")
        except IntegrityError:
            return True
    return False


def reproduce_load_vs_restore_gc(tmp: Path) -> bool:
    """A load finds a version archived; before it reads the recipe, a restore commits and gc runs."""
    store = Store(tmp / "store")
    store.save("m", "1.0", _small(1))
    store.archive("m", "1.0")
    other = Store(tmp / "store")
    fired: list[bool] = []

    def read_recipe(self: Archive, oid: str) -> Any:
        if not fired and self is store.archive_tier:
            fired.append(True)
            other.restore("m", "1.0")
            other.gc(grace_period=0)
        return original(self, oid)

    with _patched(Archive, "read_recipe", read_recipe) as original:
        try:
            store.load("m", "1.0", verify="full")
        except IntegrityError:
            return True
    return False


def reproduce_archive_vs_delete_gc(tmp: Path) -> bool:
    """An archive looks the version up; before it reads the object, the version is deleted and gc runs."""
    store = Store(tmp / "store")
    store.save("m", "1.0", _small(1))
    store.save("m", "2.0", _small(2))
    other = Store(tmp / "store")
    fired: list[bool] = []

    def read_into_buffer(self: ObjectStore, oid: str, size: int, verify: str) -> Any:
        if not fired and self is store.objects:
            fired.append(True)
            other.delete("m", "1.0")
            other.gc(grace_period=0)
        return original(self, oid, size, verify)

    with _patched(ObjectStore, "read_into_buffer", read_into_buffer) as original:
        try:
            store.archive("m", "1.0")
        except IntegrityError:
            return True  # should be NotFoundError: the version was deleted, nothing is corrupt
        except NotFoundError:
            return False
    return False


KNOWN_RACES = {
    "fsck-journal-ahead": reproduce_fsck_journal_ahead,
    "archive-vs-gc": reproduce_archive_vs_gc,
    "load-vs-restore-gc": reproduce_load_vs_restore_gc,
    "archive-vs-delete-gc": reproduce_archive_vs_delete_gc,
}


def _known_race(record: dict[str, Any]) -> str | None:
    """Which known race an unexpected exception is the signature of, if any."""
    message, op = record["message"], record["op"]
    if record["type"] == "StorageError" and op == "archive" and "concurrent gc kept removing" in message:
        return "archive-vs-gc"  # the same race, met on every retry of the commit
    if record["type"] != "IntegrityError":
        return None
    if op == "archive" and "does not rebuild" in message and "missing" in message:
        return "archive-vs-gc"
    if op == "archive" and message.startswith("object ") and "is missing" in message:
        return "archive-vs-delete-gc"
    if op == "load" and "is missing" in message and ("archive recipe" in message or "tensor blob" in message):
        return "load-vs-restore-gc"
    return None


def test_fsck_beside_a_commit_reports_no_journal_ahead(tmp_path: Path) -> None:
    assert not reproduce_fsck_journal_ahead(tmp_path)


@pytest.mark.xfail(strict=True, reason=(
    "bug: Store.archive beside gc(grace_period=0): the recipe and blobs it has just written are "
    "unreferenced and not protected by an intent, gc deletes them, and _verify_archived raises "
    "IntegrityError ('does not rebuild ... missing') instead of writing them again; when gc strikes "
    "after the check instead, _set_tier's re-check fails three times and archive gives up with "
    "StorageError('a concurrent gc kept removing its data')"))
def test_archive_beside_gc_with_no_grace_succeeds(tmp_path: Path) -> None:
    assert not reproduce_archive_vs_gc(tmp_path)


def test_load_of_an_archived_version_survives_a_concurrent_restore(tmp_path: Path) -> None:
    assert not reproduce_load_vs_restore_gc(tmp_path)


def test_archive_of_a_version_deleted_meanwhile_is_not_found(tmp_path: Path) -> None:
    assert not reproduce_archive_vs_delete_gc(tmp_path)


# ---------------------------------------------------------------------- promises about concurrency


def test_a_save_whose_object_vanishes_before_commit_writes_it_again(tmp_path: Path) -> None:
    """Between a save's publish and its commit, another process removes the object: the save retries.

    Here the remover is an archive of another version with the same bytes, which drops the hot copy
    once no hot version names it (gc on another host sharing the store would do the same).
    """
    store = Store(tmp_path / "store")
    store.save("m", "1.0", _small(1))
    other = Store(tmp_path / "store")
    fired: list[bool] = []

    def publish(self: ObjectStore, written: Any) -> bool:
        created = original(self, written)
        if not fired and self is store.objects:
            fired.append(True)
            other.archive("m", "1.0")  # commits tier archive, then unlinks the hot copy
            assert not self.path(written.oid).exists()
        return created

    with _patched(ObjectStore, "publish", publish) as original:
        result = store.save("n", "1.0", _small(1))  # the same bytes as m:1.0
    assert fired and store.objects.path(result.oid).exists()
    assert harness.check_tensors("n", "1.0", store.load("n", "1.0", verify="full"), _small_by_ref) is None
    assert harness.fsck_problems(store.fsck(), harness.LEFTOVER_KINDS) == []


def _small_by_ref(name: str, version: str) -> dict[str, np.ndarray]:
    return _small(1)


def unlocked_writer(root: str, index: int, count: int, barrier: Any, results: Any) -> None:
    """Runs in a spawned child whose flock does nothing, as on some network file systems."""
    import fcntl

    fcntl.flock = lambda fd, op: None  # every "lock" succeeds at once for everyone
    store = Store(root)
    errors: Counter[str] = Counter()
    barrier.wait(timeout=120)
    saved = []
    for i in range(count):
        version = f"1.{i}.0"
        try:
            store.save(f"u{index}", version, stress_tensors(f"u{index}", version))
            saved.append(version)
        except Exception as exc:  # judged by the parent: only HydraErrors are acceptable
            errors[f"{type(exc).__module__}.{type(exc).__name__}"] += 1
    results.put({"index": index, "saved": saved, "errors": dict(errors)})


def test_without_flock_objects_and_manifest_are_never_torn(tmp_path: Path) -> None:
    """Where flock silently does nothing, concurrent writers may lose each other's ref updates,
    but every object and every manifest.json ever visible is whole: all files are written to a
    unique temp name and renamed.  (The journal is appended in place and may be damaged; fsck
    --repair re-bases it on the manifest.)  Recommendation: one writer per store there."""
    from hydra_cas.errors import HydraError
    from hydra_cas.manifest import validate_manifest

    root = tmp_path / "store"
    Store(root)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    results = ctx.Queue()
    procs = [ctx.Process(target=unlocked_writer, args=(str(root), i, 15, barrier, results))
             for i in range(WORKERS)]
    for p in procs:
        p.start()
    outs = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    bad = [e for o in outs for e in o["errors"] if not issubclass(_exception_class(e), HydraError)]
    assert not bad, f"writers without a lock failed with non-hydra errors: {outs}"
    doc = validate_manifest(json.loads((root / "manifest.json").read_bytes()))  # whole and valid
    store = Store(root, create=False)
    store.manifest.read()
    _, wrong = harness.bitexact_problems(store, doc, make=stress_tensors)
    assert not wrong  # every ref the manifest names is complete
    report = store.fsck()
    damaged = [f for f in report.findings if f.kind in ("object-hash", "object-size", "object-missing")]
    assert not damaged, damaged
    saved = sum(len(o["saved"]) for o in outs)
    present = sum(len(m["versions"]) for m in doc["models"].values())
    assert 0 < present <= saved  # lost updates are allowed, made-up ones are not


def _exception_class(qualified: str) -> type:
    module, _, name = qualified.rpartition(".")
    return getattr(sys.modules.get(module) or __import__(module, fromlist=[name]), name)


def test_readers_ignore_the_lock_and_writers_wait_for_it(tmp_path: Path) -> None:
    """A held store lock stops writers (they wait, then give up with LockTimeoutError), never readers."""
    from hydra_cas import LockTimeoutError

    Store(tmp_path / "store").save("m", "1.0", _small(1))
    holder = Store(tmp_path / "store")
    waiter = Store(tmp_path / "store", lock_timeout=0.3)
    with holder.manifest.lock():
        loaded = waiter.load("m", "1.0", verify="full")
        assert harness.check_tensors("m", "1.0", loaded, _small_by_ref) is None
        started = time.monotonic()
        with pytest.raises(LockTimeoutError):
            waiter.delete("m", "1.0")
        assert time.monotonic() - started >= 0.3
    waiter.delete("m", "1.0")  # free again
