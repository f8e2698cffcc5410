"""Tests for hydra_cas.gc: what is marked, what is swept, and gc beside live savers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("hydra_cas") is None:  # the package is used from the checkout
    sys.path.insert(0, str(REPO_ROOT))

from hydra_cas import (  # noqa: E402
    HydraError,
    StorageError,
    Store,
    fsio,
)
from hydra_cas.gc import GcPlan, execute, make_plan  # noqa: E402

HOUR = 3600.0


# ---------------------------------------------------------------------- helpers


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store", durable=False)


def tensors(seed: int, n: int = 32) -> dict[str, np.ndarray]:
    return {"w": np.random.default_rng(seed).standard_normal(n).astype(np.float32)}


def age(path: os.PathLike[str] | str, seconds: float) -> None:
    """Make ``path`` look ``seconds`` old."""
    when = time.time() - seconds
    os.utime(path, (when, when))


def age_all_objects(store: Store, seconds: float = 2 * HOUR) -> None:
    for _, path in store.layout.iter_objects():
        age(path, seconds)


def oid_of(store: Store, name: str, version: str) -> str:
    return store.info(name, version).oid


def dead_pid() -> int:
    """The pid of a process that has exited (not reused this quickly in practice)."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def leftover(directory: Path, name: str, seconds: float) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_bytes(b"x" * 10)
    age(path, seconds)
    return path


# ---------------------------------------------------------------------- marking and sweeping


def test_frees_exactly_the_unreferenced_old_objects(store: Store) -> None:
    for i in range(4):
        store.save("m", f"1.{i}", tensors(i))
    gone, young = oid_of(store, "m", "1.0"), oid_of(store, "m", "1.1")
    size_gone = store.info("m", "1.0").size
    store.delete("m", "1.0")
    store.delete("m", "1.1")
    age_all_objects(store)
    age(store.objects.path(young), 10)  # unreferenced, but inside the grace period

    plan = store.gc(grace_period=HOUR)

    assert plan.executed and not plan.dry_run
    assert plan.deleted == (gone,)
    assert [o.oid for o in plan.kept_young] == [young]
    assert plan.freed_bytes == size_gone == plan.bytes_to_free
    assert not store.objects.path(gone).exists()
    assert store.objects.path(young).exists()
    for version in ("1.2", "1.3"):
        store.load("m", version, verify="full")
    assert store.gc(grace_period=HOUR).deleted == ()


def test_dry_run_frees_nothing(store: Store) -> None:
    store.save("m", "1.0", tensors(0))
    store.save("m", "1.1", tensors(1))
    oid = oid_of(store, "m", "1.0")
    store.delete("m", "1.0")
    age_all_objects(store)
    before = sorted(oid for oid, _ in store.layout.iter_objects())

    plan = store.gc(dry_run=True)

    assert plan.dry_run and not plan.executed
    assert [o.oid for o in plan.delete] == [oid]
    assert plan.bytes_to_free > 0 and plan.freed_bytes == 0 and plan.deleted == ()
    assert sorted(oid for oid, _ in store.layout.iter_objects()) == before
    assert "would delete 1 objects" in plan.render()


def test_aliases_and_shared_objects_keep_their_objects(store: Store) -> None:
    store.save("m", "1.0", tensors(0))
    store.save("m", "2.0", tensors(1))
    store.set_alias("m", "champion", "1.0")
    store.save("other", "1.0", tensors(2))
    store.save("other", "1.1", tensors(2))  # same bytes: one object, two refs
    store.delete("other", "1.0")
    age_all_objects(store)

    plan = store.gc(grace_period=0)

    assert plan.deleted == ()
    store.load("m", "champion", verify="full")
    store.load("other", "1.1", verify="full")


def test_deleted_versions_objects_are_freed(store: Store) -> None:
    store.save("m", "1.0", tensors(0))
    store.set_alias("m", "prod", "1.0")
    store.save("m", "1.1", tensors(1))
    oid = oid_of(store, "m", "1.0")
    store.delete("m", "1.0", force=True)  # removes the alias too
    plan = store.gc(grace_period=0)
    assert plan.deleted == (oid,)
    assert not store.objects.path(oid).exists()


def test_other_tiers_and_broken_versions_still_mark_their_object(store: Store) -> None:
    store.save("m", "1.0", tensors(0))
    oid = oid_of(store, "m", "1.0")
    entry = store.manifest.read()["models"]["m"]["versions"]["1.0"]
    store.manifest.commit(
        lambda doc: [{"op": "put", "name": "m", "version": "1.0",
                      "entry": {**entry, "tier": "archive", "status": "broken"}}]
    )
    age_all_objects(store)
    assert store.gc(grace_period=0).deleted == ()
    assert store.objects.path(oid).exists()


def test_intents_protect_objects(store: Store) -> None:
    store.save("m", "1.0", tensors(0))
    store.save("m", "1.1", tensors(1))
    store.save("m", "1.2", tensors(2))
    live_oid, young_oid, stale_oid = (oid_of(store, "m", v) for v in ("1.0", "1.1", "1.2"))
    for v in ("1.0", "1.1", "1.2"):
        store.delete("m", v)
    age_all_objects(store)
    intents = store.layout.intents
    dead = dead_pid()
    # Our own pid: a save in flight, protected at any age and any grace period.
    leftover(intents, f"{live_oid}.{os.getpid()}-{'a' * 16}", 5 * HOUR)
    # A dead writer, but recent: protected by the grace period.
    leftover(intents, f"{young_oid}.{dead}-{'b' * 16}", 60)
    # A dead writer, long ago: a stale leftover.
    stale = leftover(intents, f"{stale_oid}.{dead}-{'c' * 16}", 2 * HOUR)

    plan = store.gc(grace_period=HOUR)

    assert plan.deleted == (stale_oid,)
    assert [f.path for f in plan.stale_intents] == [str(stale)]
    assert not stale.exists()
    assert store.objects.path(live_oid).exists() and store.objects.path(young_oid).exists()
    # grace 0: only the running writer's intent still protects.
    plan = store.gc(grace_period=0)
    assert plan.deleted == (young_oid,)
    assert store.objects.path(live_oid).exists()


def test_stale_temp_files_are_removed(store: Store) -> None:
    store.save("m", "1.0", tensors(0))
    tmp = store.layout.tmp
    dead = dead_pid()
    old_dead = leftover(tmp, f"{dead}-{'1' * 16}.tmp", 2 * HOUR)
    old_live = leftover(tmp, f"{os.getpid()}-{'2' * 16}.tmp", 2 * HOUR)
    young_dead = leftover(tmp, f"{dead}-{'3' * 16}.manifest", 60)
    foreign_old = leftover(tmp, "something-else", 2 * HOUR)

    dry = store.gc(dry_run=True)
    assert sorted(f.path for f in dry.stale_temp) == sorted([str(old_dead), str(foreign_old)])
    assert old_dead.exists()

    plan = store.gc()

    assert plan.files_removed == 2
    assert not old_dead.exists() and not foreign_old.exists()
    assert old_live.exists() and young_dead.exists()


def test_pending_journal_records_are_marked(store: Store) -> None:
    """A put in the journal that the manifest lacks (a crash between them) keeps its object."""
    store.save("m", "1.0", tensors(0))
    manifest_then = store.layout.manifest.read_bytes()
    store.save("m", "1.1", tensors(1))
    pending = oid_of(store, "m", "1.1")
    store.layout.manifest.write_bytes(manifest_then)  # the writer "died" before the manifest
    age_all_objects(store)
    assert store.gc(grace_period=0).deleted == ()
    assert store.objects.path(pending).exists()


def test_recheck_under_the_lock_spares_an_object_referenced_after_the_plan(store: Store) -> None:
    store.save("m", "1.0", tensors(0))
    oid = oid_of(store, "m", "1.0")
    store.delete("m", "1.0")
    age_all_objects(store)
    plan = make_plan(store, grace_period=0)
    assert [o.oid for o in plan.delete] == [oid]
    store.save("m", "2.0", tensors(0))  # same bytes, referenced again

    done = execute(store, plan)

    assert done.deleted == () and done.spared == (oid,)
    store.load("m", "2.0", verify="full")


def test_recheck_spares_an_object_refreshed_by_a_save(store: Store) -> None:
    store.save("m", "1.0", tensors(0))
    oid = oid_of(store, "m", "1.0")
    store.delete("m", "1.0")
    age_all_objects(store)
    plan = make_plan(store, grace_period=HOUR)
    store.objects.touch(oid)  # what publish does when a save reuses the object
    assert execute(store, plan).spared == (oid,)
    assert store.objects.path(oid).exists()


def test_refuses_to_delete_without_manifest_or_journal(store: Store) -> None:
    store.save("m", "1.0", tensors(0))
    age_all_objects(store)
    store.layout.manifest.unlink()
    store.layout.journal.unlink()
    with pytest.raises(HydraError, match=r"neither manifest\.json nor journal\.jsonl"):
        store.gc(grace_period=0)
    assert len(list(store.layout.iter_objects())) == 1


def test_unreadable_manifest_stops_gc(store: Store) -> None:
    store.save("m", "1.0", tensors(0))
    store.layout.manifest.write_text("{not json")
    with pytest.raises(HydraError, match="fsck"):
        store.gc(grace_period=0)
    assert len(list(store.layout.iter_objects())) == 1


@pytest.mark.parametrize("grace", [-1.0, float("nan")])
def test_bad_grace_period(store: Store, grace: float) -> None:
    with pytest.raises(HydraError, match="grace_period"):
        store.gc(grace_period=grace)


def test_a_failed_unlink_stops_gc_and_releases_the_lock(store: Store) -> None:
    for i in range(3):
        store.save("m", f"1.{i}", tensors(i))
        store.delete("m", f"1.{i}")
    age_all_objects(store)

    def hook(op: str, path: str) -> None:
        if op == "unlink" and "objects" in path:
            raise OSError(5, "Input/output error")

    with fsio.inject_faults(hook), pytest.raises(StorageError, match="I/O error"):
        store.gc(grace_period=0)
    store.save("m", "2.0", tensors(9))  # the lock was released
    assert len(store.gc(grace_period=0).deleted) == 3


def test_plan_to_dict_and_render(store: Store) -> None:
    store.save("m", "1.0", tensors(0))
    store.save("m", "1.1", tensors(1))
    store.delete("m", "1.0")
    age_all_objects(store)
    plan = store.gc()
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["executed"] is True and data["freed_bytes"] == plan.freed_bytes > 0
    assert data["deleted"] == list(plan.deleted)
    assert isinstance(plan, GcPlan)
    text = plan.render()
    assert "deleted 1 objects" in text and "grace period 1 h" in text


def test_progress_bar_is_optional(store: Store, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    store.save("m", "1.0", tensors(0))
    store.delete("m", "1.0")
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    assert len(store.gc(grace_period=0, progress=True).deleted) == 1
    assert capsys.readouterr().out == ""


def test_logs_a_summary(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    store.save("m", "1.0", tensors(0))
    store.delete("m", "1.0")
    with caplog.at_level("DEBUG", logger="hydra_cas.gc"):
        store.gc(grace_period=0)
    messages = [r.getMessage() for r in caplog.records if r.name == "hydra_cas.gc"]
    assert any(m.startswith("gc: deleted ") for m in messages)
    assert any("deleted 1 objects" in m for m in messages)


# ---------------------------------------------------------------------- gc beside live savers

SAVER = """
import sys
import numpy as np
from hydra_cas import Store

root, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = Store(root, durable=False)
rng = np.random.default_rng(abs(hash(name)) % 1000)
shared = {"w": np.arange(64, dtype=np.float32)}  # the same bytes in every saver: dedup races
for i in range(count):
    fresh = {"w": rng.standard_normal(128).astype(np.float32)}
    store.save(name, f"1.{i}", shared if i % 3 == 0 else fresh)
    if i % 4 == 1:
        store.delete(name, f"1.{i - 1}")  # garbage for gc, including the shared object
print("saved", count)
"""


def test_gc_beside_concurrent_saver_processes_loses_nothing(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = Store(root, durable=False)
    store.save("seed", "1.0", tensors(0))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    savers = [
        subprocess.Popen(
            [sys.executable, "-c", SAVER, str(root), f"saver{k}", "100"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for k in range(2)
    ]
    runs = deleted = 0
    while any(p.poll() is None for p in savers) or runs < 3:
        deleted += len(store.gc(grace_period=0).deleted)
        runs += 1
    for p in savers:
        out, err = p.communicate()
        assert p.returncode == 0, err
        assert "saved 100" in out

    expected = {f"1.{i}" for i in range(100)} - {f"1.{i - 1}" for i in range(100) if i % 4 == 1}
    for k in range(2):
        assert {v.version for v in store.list(f"saver{k}")} == expected
    for info in store.list():
        store.load(info.name, info.version, verify="full")
    assert runs >= 3 and deleted > 0
    assert store.fsck().exit_code == 0


# ---------------------------------------------------------------------- the archive tier


def archive_files(store: Store) -> set[str]:
    return {f"{which}/{ident}" for which in ("recipes", "tensors")
            for ident, _ in store.archive_tier.iter_files(which)}


def test_an_archived_version_without_its_recipe_keeps_its_hot_copy(store: Store) -> None:
    """Only a verified archived form lets gc drop the hot copy; a missing one keeps it."""
    store.save("m", "1.0", tensors(0))
    oid = oid_of(store, "m", "1.0")
    entry = store.manifest.read()["models"]["m"]["versions"]["1.0"]
    store.manifest.commit(
        lambda doc: [{"op": "put", "name": "m", "version": "1.0", "entry": {**entry, "tier": "archive"}}]
    )
    age_all_objects(store)
    plan = store.gc(grace_period=0)
    assert plan.deleted == () and store.objects.path(oid).exists()
    # ...and the missing recipe of a version marked ok stops the archive sweep.
    assert plan.archive_skipped is not None


def test_a_hot_version_sharing_bytes_with_an_archived_one_keeps_the_object(store: Store) -> None:
    store.save("m", "1.0", tensors(0))
    store.save("m", "1.1", tensors(0))  # same bytes, one object
    oid = oid_of(store, "m", "1.0")
    store.archive("m", "1.0")
    assert store.objects.path(oid).exists()  # 1.1 is hot
    age_all_objects(store)
    assert store.gc(grace_period=0).deleted == ()
    store.delete("m", "1.1")  # now only an archived version names it
    plan = store.gc(grace_period=0)
    assert plan.deleted == (oid,) and plan.archived_copies == (oid,)
    store.load("m", "1.0", verify="full")


def test_plan_without_archive_reports_an_empty_archive_section(store: Store) -> None:
    store.save("m", "1.0", tensors(0))
    plan = store.gc()
    data = plan.to_dict()["archive"]
    assert data["recipes_scanned"] == 0 and data["delete_blobs"] == [] and data["skipped"] is None
    assert "archive:" not in plan.render() and "tensor blobs" not in plan.render()


ARCHIVER = """
import sys
from hydra_cas import Store

store = Store(sys.argv[1], durable=False)
versions = [v.version for v in store.list("m")]
print("ready", flush=True)
sys.stdin.readline()  # start together with gc
for v in versions:
    store.archive("m", v)
for v in versions[::3]:
    store.restore("m", v)
print("archived", len(versions))
"""


@pytest.mark.slow
def test_gc_beside_an_archiver_reusing_old_archive_data_loses_nothing(tmp_path: Path) -> None:
    """Re-archiving reuses dead, old recipes and blobs (delta chains too) while gc sweeps them."""
    root = tmp_path / "store"
    store = Store(root, durable=False)
    rng = np.random.default_rng(1)
    w = rng.standard_normal(2048).astype(np.float32)
    expected = {}
    for i in range(60):
        w = (w + rng.standard_normal(2048).astype(np.float32) * np.float32(1e-4)).astype(np.float32)
        expected[f"1.{i}"] = {"w": w, "c": np.full(8, i // 3, np.float32)}
    store.save_many(("m", version, values) for version, values in expected.items())
    for version in expected:
        store.archive("m", version)
    for version in expected:
        store.restore("m", version)  # every recipe and blob is now dead...
    when = time.time() - 2 * HOUR
    for path in (root / "archive").rglob("*"):
        if path.is_file():
            os.utime(path, (when, when))  # ...and old enough to be swept

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    archiver = subprocess.Popen([sys.executable, "-c", ARCHIVER, str(root)], env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert archiver.stdin is not None and archiver.stdout is not None
    assert archiver.stdout.readline().startswith("ready")
    archiver.stdin.write("go\n")
    archiver.stdin.flush()
    runs = 0
    while archiver.poll() is None or runs < 3:
        store.gc(grace_period=HOUR)
        runs += 1
    out, err = archiver.communicate()
    assert archiver.returncode == 0, err
    assert "archived 60" in out

    for version, values in expected.items():
        loaded = store.load("m", version, verify="full")
        assert {k: v.tobytes() for k, v in loaded.items()} == {k: v.tobytes() for k, v in values.items()}
    report = store.fsck()
    assert report.exit_code == 0, report.render()
    store.gc(grace_period=0)
    for version in expected:
        store.load("m", version, verify="full")
    assert store.fsck().exit_code == 0
