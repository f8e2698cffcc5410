"""Tests for hydra_cas.fsck: each kind of damage is found, and repair leaves a store that passes."""

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

import hydra_cas.fsck as fsck_module  # noqa: E402
from hydra_cas import HydraError, IntegrityError, Store  # noqa: E402
from hydra_cas.fsck import FsckReport, check  # noqa: E402
from hydra_cas.manifest import replay  # noqa: E402

HOUR = 3600.0


# ---------------------------------------------------------------------- helpers


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A store with four versions of ``m`` (1.3 shares 1.0's bytes) and an alias."""
    s = Store(tmp_path / "store", durable=False)
    for i in range(3):
        s.save("m", f"1.{i}", tensors(i))
    s.save("m", "1.3", tensors(0))
    s.set_alias("m", "champion", "1.1")
    return s


def tensors(seed: int, n: int = 64) -> dict[str, np.ndarray]:
    return {"w": np.random.default_rng(seed).standard_normal(n).astype(np.float32)}


def damage(path: Path, how: str) -> None:
    if how == "missing":
        path.unlink()
        return
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[-1] ^= 0x01
    elif how == "truncate":
        del data[-4:]
    path.write_bytes(bytes(data))


def kinds(report: FsckReport, *, remaining: bool = False) -> dict[str, int]:
    counts: dict[str, int] = {}
    for f in report.remaining if remaining else report.findings:
        counts[f.kind] = counts.get(f.kind, 0) + 1
    return counts


def only(report: FsckReport, kind: str) -> Any:
    found = [f for f in report.findings if f.kind == kind]
    assert len(found) == 1, report.render()
    return found[0]


def age(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def assert_loads_intact(store: Store, versions: list[str]) -> None:
    for version in versions:
        store.load("m", version, verify="full")


def journal_models(store: Store) -> Any:
    records, _ = store.manifest.journal.read()
    return replay(records)


# ---------------------------------------------------------------------- clean stores


def test_clean_store_passes(store: Store) -> None:
    report = store.fsck()
    assert report.ok and report.exit_code == 0
    assert report.findings == () and report.remaining == ()
    assert report.refs_checked == 4 and report.objects_checked == 3
    assert report.objects_hashed == 3 and report.bytes_hashed == sum(
        p.stat().st_size for _, p in store.layout.iter_objects()
    )
    data = json.loads(json.dumps(report.to_dict()))
    assert data["exit_code"] == 0 and data["findings"] == []
    assert "clean" in report.render()


def test_empty_and_fresh_stores_pass(tmp_path: Path) -> None:
    assert Store(tmp_path / "fresh").fsck().exit_code == 0


# ---------------------------------------------------------------------- objects


@pytest.mark.parametrize(("how", "kind"), [("flip", "object-hash"), ("truncate", "object-size"),
                                            ("missing", "object-missing")])
def test_finds_damaged_objects_with_every_ref_they_affect(store: Store, how: str, kind: str) -> None:
    path = store.path("m", "1.0")
    damage(path, how)
    report = store.fsck()
    assert report.exit_code == 1 and not report.ok
    finding = only(report, kind)
    assert finding.severity == "error"
    assert finding.oid == store.info("m", "1.0").oid
    assert finding.refs == ("m:1.0", "m:1.3")
    assert not finding.repaired
    assert "--repair" in report.render()


def test_a_flipped_bit_of_the_right_size_is_found_by_rehashing(store: Store) -> None:
    path = store.path("m", "1.2")
    size = path.stat().st_size
    damage(path, "flip")
    assert path.stat().st_size == size
    assert kinds(store.fsck()) == {"object-hash": 1}


def test_orphans_are_reported_but_do_not_fail(store: Store) -> None:
    oid = store.info("m", "1.2").oid
    store.delete("m", "1.2")
    report = store.fsck()
    assert report.exit_code == 0
    finding = only(report, "orphan")
    assert finding.severity == "info" and finding.oid == oid and "gc" in finding.message


def test_a_corrupt_orphan_is_an_error_and_is_quarantined(store: Store) -> None:
    path = store.path("m", "1.2")
    store.delete("m", "1.2")
    damage(path, "flip")
    assert only(store.fsck(), "object-hash").refs == ()
    report = store.fsck(repair=True)
    assert report.exit_code == 0
    assert not path.exists()


def test_stray_files_in_objects(store: Store) -> None:
    fan = store.layout.objects / "ab"
    fan.mkdir(exist_ok=True)
    stray = fan / "not-an-object"
    stray.write_bytes(b"junk")
    report = store.fsck()
    assert report.exit_code == 1 and only(report, "stray-file").path == str(stray)
    repaired = store.fsck(repair=True)
    assert repaired.exit_code == 0 and only(repaired, "stray-file").repaired
    assert not stray.exists()
    assert any(p.name.startswith("stray.") for p in store.layout.quarantine.iterdir())


# ---------------------------------------------------------------------- leftovers


def test_stale_temp_files_and_intents(store: Store) -> None:
    pid = dead_pid()
    store.layout.tmp.mkdir(exist_ok=True)
    store.layout.intents.mkdir(exist_ok=True)
    temp = store.layout.tmp / f"{pid}-{'a' * 16}.tmp"
    intent = store.layout.intents / f"{store.info('m', '1.0').oid}.{pid}-{'b' * 16}"
    live_temp = store.layout.tmp / f"{os.getpid()}-{'c' * 16}.tmp"
    young_temp = store.layout.tmp / f"{pid}-{'d' * 16}.tmp"
    for path in (temp, intent, live_temp, young_temp):
        path.write_bytes(b"partial")
        age(path, 2 * HOUR)
    age(young_temp, 60)

    report = store.fsck()
    assert report.exit_code == 1
    assert only(report, "stale-temp").path == str(temp)
    assert only(report, "stale-intent").path == str(intent)

    repaired = store.fsck(repair=True)
    assert repaired.exit_code == 0 and repaired.repaired == 2
    assert not temp.exists() and not intent.exists()
    assert live_temp.exists() and young_temp.exists()


# ---------------------------------------------------------------------- manifest and journal


def test_unreadable_manifest_is_rebuilt_from_the_journal(store: Store) -> None:
    before = store.manifest.read()["models"]
    store.layout.manifest.write_bytes(b'{"format_version": 1, "models": ')
    report = store.fsck()
    assert report.exit_code == 1
    assert only(report, "manifest-unreadable").severity == "error"
    assert report.objects_hashed == 3  # the journal still told which objects to check

    repaired = store.fsck(repair=True)
    assert repaired.exit_code == 0, repaired.render()
    assert only(repaired, "manifest-unreadable").repaired
    assert Store(store.root).manifest.read()["models"] == before
    assert_loads_intact(store, ["1.0", "1.1", "1.2", "1.3", "champion"])
    kept = [p.name for p in store.layout.quarantine.iterdir()]
    assert any(name.startswith("manifest.json.") for name in kept)


def test_wrong_format_version_is_unreadable(store: Store) -> None:
    doc = json.loads(store.layout.manifest.read_bytes())
    doc["format_version"] = 99
    store.layout.manifest.write_text(json.dumps(doc))
    assert "format_version" in only(store.fsck(), "manifest-unreadable").message


def test_missing_manifest_is_rebuilt(store: Store) -> None:
    store.layout.manifest.unlink()
    report = store.fsck()
    assert kinds(report) == {"manifest-missing": 1}
    assert store.fsck(repair=True).exit_code == 0
    assert store.layout.manifest.exists()
    assert_loads_intact(store, ["1.0", "1.1"])


def test_manifest_and_journal_both_unusable(store: Store) -> None:
    store.layout.manifest.write_bytes(b"garbage")
    store.layout.journal.write_bytes(b"more garbage\n")
    report = store.fsck(repair=True)
    assert report.exit_code == 1
    remaining = {f.kind for f in report.remaining}
    assert {"manifest-unreadable", "journal-unreadable"} <= remaining
    assert "backup" in only(report, "manifest-unreadable").message
    assert store.layout.manifest.read_bytes() == b"garbage"  # nothing destroyed


def test_journal_ahead_of_the_manifest_is_rolled_forward(store: Store) -> None:
    manifest_then = store.layout.manifest.read_bytes()
    store.save("m", "2.0", tensors(7))
    store.layout.manifest.write_bytes(manifest_then)  # died between the journal and the manifest
    report = store.fsck()
    finding = only(report, "journal-ahead")
    assert report.exit_code == 1 and finding.refs == ("m:2.0",)
    assert not any(f.kind == "orphan" for f in report.findings)  # the pending put marks its object

    repaired = store.fsck(repair=True)
    assert repaired.exit_code == 0 and only(repaired, "journal-ahead").repaired
    assert store.resolve("m", "latest") == "2.0"
    store.load("m", "2.0", verify="full")


def test_journal_manifest_disagreement_is_reconciled(store: Store) -> None:
    doc = json.loads(store.layout.manifest.read_bytes())
    del doc["models"]["m"]["versions"]["1.2"]  # a hand edit that bypassed the journal
    doc["models"]["m"]["aliases"]["prod"] = "1.0"
    store.layout.manifest.write_text(json.dumps(doc))
    report = store.fsck()
    finding = only(report, "journal-mismatch")
    assert finding.refs == ("m:1.2",) and "m@prod" in finding.message

    repaired = store.fsck(repair=True)
    assert repaired.exit_code == 0, repaired.render()
    assert journal_models(store) == store.manifest.read()["models"]
    store.save("m", "3.0", tensors(9))  # writers work again
    assert store.fsck().exit_code == 0


def test_truncated_journal_is_rebased_on_the_manifest(store: Store) -> None:
    lines = store.layout.journal.read_bytes().splitlines(keepends=True)
    store.layout.journal.write_bytes(b"".join(lines[:2]))
    assert kinds(store.fsck()) == {"journal-behind": 1}
    with pytest.raises(HydraError, match="fsck"):
        store.save("m", "4.0", tensors(4))
    assert store.fsck(repair=True).exit_code == 0
    assert journal_models(store) == store.manifest.read()["models"]
    store.save("m", "4.0", tensors(4))


def test_corrupt_journal_is_rewritten_and_kept(store: Store) -> None:
    lines = store.layout.journal.read_bytes().splitlines(keepends=True)
    lines[1] = b'{"seq": 2, "op": "bogus"}\n'
    store.layout.journal.write_bytes(b"".join(lines))
    assert only(store.fsck(), "journal-unreadable").severity == "error"
    assert store.fsck(repair=True).exit_code == 0
    assert journal_models(store) == store.manifest.read()["models"]
    assert any(p.name.startswith("journal.jsonl.") for p in store.layout.quarantine.iterdir())
    store.save("m", "5.0", tensors(5))
    assert store.fsck().exit_code == 0


def test_torn_last_journal_line_is_a_warning_and_is_cut(store: Store) -> None:
    with open(store.layout.journal, "ab") as f:
        f.write(b'{"seq": 99, "op": "pu')
    report = store.fsck()
    assert only(report, "journal-torn").severity == "warning" and report.exit_code == 1
    assert store.fsck(repair=True).exit_code == 0
    assert store.layout.journal.read_bytes().endswith(b"\n")


# ---------------------------------------------------------------------- repair of objects


def test_repair_quarantines_corrupt_objects_and_marks_refs_broken(store: Store) -> None:
    store.save("n", "1.0", tensors(10))
    flipped, truncated, missing = (store.info("m", v).oid for v in ("1.0", "1.1", "1.2"))
    damage(store.path("m", "1.0"), "flip")
    damage(store.path("m", "1.1"), "truncate")
    damage(store.path("m", "1.2"), "missing")

    report = store.fsck(repair=True)

    assert report.exit_code == 0, report.render()
    assert {f.kind for f in report.findings if f.repaired} == {"object-hash", "object-size", "object-missing"}
    broken = {f.oid: f.refs for f in report.remaining if f.kind == "broken-ref"}
    assert broken == {flipped: ("m:1.0", "m:1.3"), truncated: ("m:1.1",), missing: ("m:1.2",)}
    assert all(f.severity == "info" for f in report.remaining)
    # Corrupt bytes are kept, never deleted.
    kept = sorted(p.name.split(".")[0] for p in store.layout.quarantine.iterdir())
    assert kept == sorted([flipped, truncated])
    # Every damaged version is marked broken through the journal; the rest load fully verified.
    for version in ("1.0", "1.1", "1.2", "1.3"):
        assert store.info("m", version).status == "broken"
        with pytest.raises(IntegrityError, match="broken"):
            store.load("m", version)
    store.load("n", "1.0", verify="full")
    records = store.manifest.journal.read()[0]
    puts = [r for r in records if r["op"] == "put" and r["entry"]["status"] == "broken"]
    assert sorted(f"{r['name']}:{r['version']}" for r in puts) == ["m:1.0", "m:1.1", "m:1.2", "m:1.3"]
    # A second run has nothing left to do and still lists the broken refs.
    again = store.fsck(repair=True)
    assert again.exit_code == 0 and again.repaired == 0
    assert {f.kind for f in again.findings} == {"broken-ref", "quarantine"}


def test_a_broken_version_whose_bytes_come_back_is_marked_ok_again(store: Store) -> None:
    damage(store.path("m", "1.2"), "missing")
    store.fsck(repair=True)
    store.save("other", "1.0", tensors(2))  # the same bytes, published afresh
    report = store.fsck()
    assert only(report, "broken-ref-intact").refs == ("m:1.2",) and report.exit_code == 0
    store.fsck(repair=True)
    store.load("m", "1.2", verify="full")


# ---------------------------------------------------------------------- sampling and parallelism


def test_sample_hashes_a_share_but_checks_every_size(tmp_path: Path) -> None:
    s = Store(tmp_path / "store", durable=False)
    for i in range(10):
        s.save("m", f"1.{i}", tensors(i))
    report = s.fsck(sample=30)
    assert report.objects_hashed == 3 and report.objects_checked == 10 and report.exit_code == 0
    damage(s.path("m", "1.4"), "truncate")
    damage(s.path("m", "1.5"), "missing")
    sampled = s.fsck(sample=10)
    assert {"object-size", "object-missing"} <= set(kinds(sampled))
    assert "10% sample" in sampled.render()


@pytest.mark.parametrize("sample", [0, -5, 100.5, "50", True, float("nan")])
def test_bad_sample(store: Store, sample: Any) -> None:
    with pytest.raises(HydraError, match="sample"):
        store.fsck(sample=sample)


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_pools_find_the_same_damage(store: Store, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsck_module, "_POOL_MIN_BYTES", 0)  # use a pool even for tiny stores
    damage(store.path("m", "1.2"), "flip")
    report = check(store, workers=2, mode=mode)
    assert report.hash_mode == mode
    assert kinds(report) == {"object-hash": 1} and report.objects_hashed == 3


def test_progress_and_logging(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="hydra_cas.fsck"):
        report = store.fsck(progress=True)
    assert report.exit_code == 0
    assert any("fsck of" in r.getMessage() for r in caplog.records)


def test_objects_without_any_refs_file_fail_instead_of_looking_orphaned(store: Store) -> None:
    store.layout.manifest.unlink()
    store.layout.journal.unlink()
    report = store.fsck(repair=True)
    assert report.exit_code == 1
    assert "backup" in only(report, "manifest-missing").message
    assert not any(f.kind == "orphan" for f in report.findings)
    assert len(list(store.layout.iter_objects())) == 3


# ---------------------------------------------------------------------- the archive tier


@pytest.fixture
def archived(tmp_path: Path) -> Store:
    """Ten archived versions of ``m``, one independent tensor each (plain blobs, no deltas)."""
    s = Store(tmp_path / "archived", durable=False)
    for i in range(10):
        s.save("m", f"1.{i}", tensors(100 + i, 256))
        s.archive("m", f"1.{i}")
    return s


def blob_path(store: Store, version: str) -> Path:
    recipe = store.archive_tier.read_recipe(store.info("m", version).oid)
    tid = next(t.tid for t in recipe.tensors if t.tid is not None)
    assert tid is not None
    return store.archive_tier.tensor_path(tid)


def test_archived_versions_are_checked_and_a_sample_decodes_a_share(archived: Store) -> None:
    full = archived.fsck()
    assert full.exit_code == 0 and full.findings == ()
    assert (full.archived_checked, full.blobs_checked, full.blobs_verified) == (10, 10, 10)
    assert full.archive_bytes == 10 * 256 * 4
    assert "checked 10 archived versions and 10 tensor blobs" in full.render()
    data = json.loads(json.dumps(full.to_dict()))
    assert data["blobs_verified"] == 10
    sampled = archived.fsck(sample=30)
    assert sampled.blobs_verified == 3 and sampled.blobs_checked == 10
    # Presence is checked for all, whatever the sample.
    damage(blob_path(archived, "1.4"), "missing")
    assert only(archived.fsck(sample=10), "archive-blob-missing").refs == ("m:1.4",)


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_pools_find_the_same_archive_damage(
    archived: Store, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fsck_module, "_POOL_MIN_BYTES", 0)
    damage(blob_path(archived, "1.7"), "flip")
    report = check(archived, workers=2, mode=mode)
    assert kinds(report) == {"archive-blob-corrupt": 1}
    assert only(report, "archive-blob-corrupt").refs == ("m:1.7",)


@pytest.mark.parametrize("how", ["missing", "truncate"])
def test_a_missing_or_truncated_recipe_is_an_error_and_repair_marks_the_version_broken(
    archived: Store, how: str,
) -> None:
    oid = archived.info("m", "1.2").oid
    damage(archived.archive_tier.recipe_path(oid), how)
    kind = "archive-recipe-missing" if how == "missing" else "archive-recipe-corrupt"
    finding = only(archived.fsck(), kind)
    assert finding.severity == "error" and finding.refs == ("m:1.2",) and finding.oid == oid
    report = archived.fsck(repair=True)
    assert report.exit_code == 0 and archived.info("m", "1.2").status == "broken"
    assert [f.severity for f in report.remaining if f.oid == oid] == ["info"]


def test_a_recipe_that_disagrees_with_the_manifest_size_is_corrupt(archived: Store) -> None:
    entry = archived.manifest.read()["models"]["m"]["versions"]["1.3"]
    archived.manifest.commit(lambda doc: [{"op": "put", "name": "m", "version": "1.3",
                                           "entry": {**entry, "size": entry["size"] + 8}}])
    assert "manifest records" in only(archived.fsck(), "archive-recipe-corrupt").message


def test_unneeded_archive_data_is_info_but_a_corrupt_unneeded_blob_is_an_error(archived: Store) -> None:
    archived.restore("m", "1.0")
    archived.restore("m", "1.1")
    report = archived.fsck()
    assert report.exit_code == 0
    assert "2 recipes and 2 tensor blobs" in only(report, "archive-orphan").message
    path = blob_path(archived, "1.1")
    damage(path, "flip")  # a later archive of the same tensor would reuse it
    finding = only(archived.fsck(), "archive-blob-corrupt")
    assert finding.severity == "error" and finding.refs == ()
    assert archived.fsck(repair=True).exit_code == 0 and not path.exists()
    archived.archive("m", "1.1")  # written afresh
    archived.load("m", "1.1", verify="full")


def test_an_archived_version_marked_broken_whose_archive_verifies_is_marked_ok_again(archived: Store) -> None:
    entry = archived.manifest.read()["models"]["m"]["versions"]["1.5"]
    archived.manifest.commit(lambda doc: [{"op": "put", "name": "m", "version": "1.5",
                                           "entry": {**entry, "status": "broken"}}])
    report = archived.fsck()
    assert only(report, "broken-ref-intact").refs == ("m:1.5",) and report.exit_code == 0
    archived.fsck(repair=True)
    assert archived.info("m", "1.5").status == "ok"
    archived.load("m", "1.5", verify="full")


def test_a_corrupt_hot_copy_of_an_archived_version_does_not_break_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = Store(tmp_path / "s", durable=False)
    s.save("m", "1.0", tensors(1))
    oid = s.info("m", "1.0").oid
    with monkeypatch.context() as m:
        m.setattr(Store, "_drop_hot_copy", lambda self, oid: None)
        s.archive("m", "1.0")
    damage(s.objects.path(oid), "flip")
    finding = only(s.fsck(), "object-hash")
    assert finding.refs == ()  # the archived version has its own bytes
    report = s.fsck(repair=True)
    assert report.exit_code == 0 and not s.objects.path(oid).exists()
    assert (s.info("m", "1.0").status, s.info("m", "1.0").tier) == ("ok", "archive")
    s.load("m", "1.0", verify="full")


def test_an_unneeded_delta_whose_base_was_collected_is_not_damage(tmp_path: Path) -> None:
    """gc may take an unneeded base before fsck reads the delta on it; put_tensor rewrites such a delta."""
    s = Store(tmp_path / "s", durable=False)
    base = tensors(3, 4096)["w"]
    s.save("m", "1.0", {"w": base})
    s.save("m", "1.1", {"w": base + np.float32(1e-6)})
    s.archive("m", "1.0")
    s.archive("m", "1.1")
    s.restore("m", "1.0")
    s.restore("m", "1.1")
    base_tid = next(t.tid for t in s.archive_tier.read_recipe(s.info("m", "1.0").oid).tensors)
    delta_tid = next(t.tid for t in s.archive_tier.read_recipe(s.info("m", "1.1").oid).tensors)
    assert base_tid is not None and delta_tid is not None
    assert s.archive_tier.blob_header(delta_tid).base == base_tid
    s.archive_tier.tensor_path(base_tid).unlink()
    report = s.fsck()
    assert report.exit_code == 0 and set(kinds(report)) == {"archive-orphan"}, report.render()
    s.archive("m", "1.1")  # the broken delta is written afresh, as a plain blob
    assert s.archive_tier.blob_header(delta_tid).base is None
    s.load("m", "1.1", verify="full")
    assert s.fsck().exit_code == 0
