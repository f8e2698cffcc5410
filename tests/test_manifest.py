"""manifest.json and journal.jsonl: structure, replay, torn lines, roll-forward,
and refusal of tampered files."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hydra_cas import ManifestError, NotFoundError, Store

ENTRY_FIELDS = {
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
TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


def _t(i: int, n: int = 4) -> dict[str, np.ndarray]:
    return {"w": np.full(n, float(i), dtype=np.float32), "step": np.array(i, dtype=np.int64)}


def independent_replay(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The journal semantics of docs/FORMAT.md, written from the table, not the library."""
    models: dict[str, Any] = {}
    for r in records:
        model = models.setdefault(r["name"], {"versions": {}, "aliases": {}})
        if r["op"] == "put":
            model["versions"][r["version"]] = r["entry"]
        elif r["op"] == "drop":
            del model["versions"][r["version"]]
            for alias in [a for a, v in model["aliases"].items() if v == r["version"]]:
                del model["aliases"][alias]
        elif r["op"] == "alias":
            assert r["version"] in model["versions"]
            model["aliases"][r["alias"]] = r["version"]
        elif r["op"] == "unalias":
            del model["aliases"][r["alias"]]
        else:  # pragma: no cover
            raise AssertionError(r)
        if not model["versions"]:
            del models[r["name"]]
    return models


def _history(store: Store) -> None:
    store.save("m", "1.0.0", _t(1), metadata={"step": 1})
    store.save("m", "2.0.0", _t(2))
    store.save("org/n", "0.1.0", _t(3))
    store.set_alias("m", "prod", "1.0.0")
    store.set_alias("m", "prod", "2.0.0")  # move
    store.set_alias("m", "champion", "1.0.0")
    store.remove_alias("m", "champion")
    store.delete("org/n", "0.1.0")
    store.delete("m", "2.0.0", force=True)  # takes prod with it
    store.save("m", "3.0.0", _t(1))  # dedup with 1.0.0
    store.set_alias("m", "stable", "3.0.0")


# --------------------------------------------------------------------------- structure and replay


def test_manifest_structure(store, read_manifest, read_journal):
    _history(store)
    doc = read_manifest(store)
    assert set(doc) == {"format_version", "journal_seq", "models"}
    assert doc["format_version"] == 1
    assert doc["journal_seq"] == read_journal(store)[-1]["seq"]
    assert set(doc["models"]) == {"m"}
    m = doc["models"]["m"]
    assert set(m) == {"versions", "aliases"}
    assert set(m["versions"]) == {"1.0.0", "3.0.0"}
    assert m["aliases"] == {"stable": "3.0.0"}
    for version, entry in m["versions"].items():
        assert set(entry) == ENTRY_FIELDS, version
        path = store.path("m", version)
        data = path.read_bytes()
        assert entry["oid"] == hashlib.sha256(data).hexdigest()
        assert re.fullmatch(r"[0-9a-f]{64}", entry["blake3"])
        assert entry["size"] == len(data)
        assert entry["tensors"] == 2
        assert entry["parameters"] == 5
        assert entry["dtypes"] == sorted(entry["dtypes"]) == ["F32", "I64"]
        assert TIME_RE.match(entry["created"]), entry["created"]
        assert entry["tier"] == "hot" and entry["status"] == "ok" and entry["parent"] is None
    assert m["versions"]["1.0.0"]["metadata"] == {"step": 1}
    assert m["versions"]["1.0.0"]["oid"] == m["versions"]["3.0.0"]["oid"]


def test_journal_replay_equals_manifest(store, read_manifest, read_journal):
    _history(store)
    records = read_journal(store)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert [r["op"] for r in records] == [
        "put",
        "put",
        "put",
        "alias",
        "alias",
        "alias",
        "unalias",
        "drop",
        "drop",
        "put",
        "alias",
    ]
    for r in records:
        assert TIME_RE.match(r["time"])
    assert independent_replay(records) == read_manifest(store)["models"]
    raw = (store.root / "journal.jsonl").read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == len(records)


def test_noops_add_no_journal_records(store, make_tensors, read_journal):
    store.save("m", "1.0", make_tensors(1))
    store.set_alias("m", "prod", "1.0")
    n = len(read_journal(store))
    store.save("m", "1.0", make_tensors(1))
    store.set_alias("m", "prod", "1.0")
    assert len(read_journal(store)) == n


def test_no_temp_files_after_commits(store):
    _history(store)
    assert list((store.root / "tmp").iterdir()) == []
    assert list((store.root / "intents").iterdir()) == []
    assert sorted(p.name for p in store.root.iterdir() if p.is_file()) == [
        "journal.jsonl",
        "lock",
        "manifest.json",
    ]


# --------------------------------------------------------------------------- torn journal line


TORN = b'{"seq": 999, "time": "2026-01-01T00:00:00.000000Z", "op": "put", "na'


def test_torn_last_line_is_ignored_and_truncated_on_next_write(store_factory, read_manifest, read_journal):
    s = store_factory()
    _history(s)
    journal = s.root / "journal.jsonl"
    good = journal.read_bytes()
    n = len(read_journal(s))
    with open(journal, "ab") as f:
        f.write(TORN)

    reader = store_factory()
    assert [v.ref for v in reader.list()] == ["m:1.0.0", "m:3.0.0"]
    assert reader.resolve("m", "stable") == "3.0.0"

    s.save("m", "4.0.0", _t(4))
    raw = journal.read_bytes()
    assert raw.startswith(good)
    assert TORN not in raw
    tail = raw[len(good) :]
    assert tail.count(b"\n") == 1 and json.loads(tail)["seq"] == n + 1
    assert raw.endswith(b"\n")
    records = [json.loads(line) for line in raw.splitlines()]
    assert [r["seq"] for r in records] == list(range(1, n + 2))
    assert records[-1]["version"] == "4.0.0"
    assert read_manifest(s)["journal_seq"] == n + 1
    assert independent_replay(records) == read_manifest(s)["models"]


def test_torn_line_ignored_when_manifest_is_missing(store_factory, read_journal):
    s = store_factory()
    _history(s)
    (s.root / "manifest.json").unlink()
    with open(s.root / "journal.jsonl", "ab") as f:
        f.write(TORN)
    reader = store_factory()
    assert [v.ref for v in reader.list()] == ["m:1.0.0", "m:3.0.0"]
    reader.save("m", "5.0", _t(5))
    records = read_journal(reader)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))


# --------------------------------------------------------------------------- journal ahead of the manifest


def _append(store: Store, record: dict[str, Any]) -> None:
    with open(store.root / "journal.jsonl", "ab") as f:
        f.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")


def test_hand_appended_records_are_rolled_forward(store_factory, read_manifest, read_journal):
    s = store_factory()
    s.save("m", "1.0", _t(1))
    s.save("m", "2.0", _t(2))
    records = read_journal(s)
    entry = copy.deepcopy(records[0]["entry"])
    entry["metadata"] = {"by": "hand"}
    seq = records[-1]["seq"]
    time = records[-1]["time"]
    _append(s, {"seq": seq + 1, "time": time, "op": "put", "name": "m", "version": "9.0", "entry": entry})
    _append(s, {"seq": seq + 2, "time": time, "op": "alias", "name": "m", "alias": "prod", "version": "9.0"})
    _append(s, {"seq": seq + 3, "time": time, "op": "drop", "name": "m", "version": "2.0"})
    assert read_manifest(s)["journal_seq"] == seq

    writer = store_factory()
    writer.save("other", "1.0", _t(7))

    doc = read_manifest(writer)
    assert doc["journal_seq"] == seq + 4
    assert set(doc["models"]["m"]["versions"]) == {"1.0", "9.0"}
    assert doc["models"]["m"]["aliases"] == {"prod": "9.0"}
    assert "other" in doc["models"]
    fresh = store_factory()
    assert fresh.info("m", "prod").metadata == {"by": "hand"}
    np.testing.assert_array_equal(fresh.load("m", "9.0", verify="full")["w"], _t(1)["w"])
    all_records = read_journal(fresh)
    assert [r["seq"] for r in all_records] == list(range(1, seq + 5))
    assert independent_replay(all_records) == doc["models"]


def test_same_store_object_rolls_forward_too(store, read_manifest, read_journal):
    """The writer that cached the manifest must not commit on top of a stale copy."""
    store.save("m", "1.0", _t(1))
    store.list()  # warm any cache
    records = read_journal(store)
    _append(store, {**records[0], "seq": 2, "version": "1.5"})
    store.save("m", "2.0", _t(2))
    assert set(read_manifest(store)["models"]["m"]["versions"]) == {"1.0", "1.5", "2.0"}
    assert [v.version for v in store.list("m")] == ["1.0", "1.5", "2.0"]


def test_restored_older_manifest_is_rolled_forward(store_factory, read_manifest, read_journal):
    s = store_factory()
    s.save("m", "1.0", _t(1))
    old = (s.root / "manifest.json").read_bytes()
    s.save("m", "2.0", _t(2))
    s.set_alias("m", "prod", "2.0")
    s.save("n", "1.0", _t(3))
    current = read_manifest(s)["models"]

    staged = s.root / "restore.json"
    staged.write_bytes(old)
    os.replace(staged, s.root / "manifest.json")  # an "older backup" put back

    s.save("n", "2.0", _t(4))
    doc = read_manifest(s)
    assert doc["journal_seq"] == 5
    expected = copy.deepcopy(current)
    assert set(doc["models"]["n"]["versions"]) == {"1.0", "2.0"}
    del doc["models"]["n"]["versions"]["2.0"]
    assert doc["models"] == expected
    assert independent_replay(read_journal(s)) == read_manifest(s)["models"]


def test_journal_behind_manifest_is_refused(store, read_manifest):
    store.save("m", "1.0", _t(1))
    store.save("m", "2.0", _t(2))
    journal = store.root / "journal.jsonl"
    first_line = journal.read_bytes().split(b"\n")[0] + b"\n"
    journal.write_bytes(first_line)
    manifest_before = (store.root / "manifest.json").read_bytes()
    with pytest.raises(ManifestError) as excinfo:
        store.set_alias("m", "prod", "1.0")
    assert "journal" in str(excinfo.value)
    assert (store.root / "manifest.json").read_bytes() == manifest_before
    assert journal.read_bytes() == first_line


# --------------------------------------------------------------------------- missing manifest


def test_missing_manifest_reads_the_journal(store_factory, read_manifest, read_journal):
    s = store_factory()
    _history(s)
    expected = read_manifest(s)
    (s.root / "manifest.json").unlink()

    reader = store_factory()
    assert [v.ref for v in reader.list()] == ["m:1.0.0", "m:3.0.0"]
    assert reader.resolve("m", "stable") == "3.0.0"
    assert reader.info("m", "1.0.0").metadata == {"step": 1}
    np.testing.assert_array_equal(reader.load("m", "stable", verify="full")["w"], _t(1)["w"])
    assert not (s.root / "manifest.json").exists(), "a read must not write"

    reader.save("m", "4.0.0", _t(4))
    doc = read_manifest(reader)
    assert doc["journal_seq"] == expected["journal_seq"] + 1
    del doc["models"]["m"]["versions"]["4.0.0"]
    assert doc["models"] == expected["models"]


def test_no_manifest_and_no_journal_is_an_empty_store(store):
    assert store.models() == []
    assert store.list() == []
    with pytest.raises(NotFoundError):
        store.load("m")


# --------------------------------------------------------------------------- tampered manifest


def _entry(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["models"]["m"]["versions"]["1.0"]


def _set(field: str, value: Any):
    def mutate(doc: dict[str, Any]) -> None:
        _entry(doc)[field] = value

    return mutate


def _drop(field: str):
    def mutate(doc: dict[str, Any]) -> None:
        del _entry(doc)[field]

    return mutate


def _top(key: str, value: Any):
    def mutate(doc: dict[str, Any]) -> None:
        if value is _MISSING:
            del doc[key]
        else:
            doc[key] = value

    return mutate


_MISSING = object()

# (mutation or raw bytes, words the error message must contain)
TAMPERED: dict[str, tuple[Any, tuple[str, ...]]] = {
    "oid-traversal": (_set("oid", "../../etc/passwd"), ("oid", "../../etc/passwd")),
    "oid-absolute": (_set("oid", "/etc/passwd"), ("oid",)),
    "oid-uppercase": (lambda d: _entry(d).__setitem__("oid", _entry(d)["oid"].upper()), ("oid",)),
    "oid-short": (lambda d: _entry(d).__setitem__("oid", _entry(d)["oid"][:63]), ("oid",)),
    "oid-int": (_set("oid", 12345), ("oid",)),
    "blake3-traversal": (_set("blake3", "../" * 21 + "x"), ("blake3",)),
    "size-string": (_set("size", "104"), ("size",)),
    "size-negative": (_set("size", -1), ("size",)),
    "size-float": (_set("size", 104.0), ("size",)),
    "size-bool": (_set("size", True), ("size",)),
    "tensors-null": (_set("tensors", None), ("tensors",)),
    "dtypes-string": (_set("dtypes", "F32"), ("dtypes",)),
    "dtypes-unknown": (_set("dtypes", ["F128"]), ("dtypes",)),
    "metadata-list": (_set("metadata", ["a"]), ("metadata",)),
    "tier-path": (_set("tier", "../hot"), ("tier",)),
    "status-unknown": (_set("status", "fine"), ("status",)),
    "created-no-z": (_set("created", "2026-01-01T00:00:00"), ("created",)),
    "parent-not-version": (_set("parent", "../1.0"), ("parent",)),
    "missing-oid": (_drop("oid"), ("missing", "oid")),
    "missing-blake3": (_drop("blake3"), ("missing", "blake3")),
    "extra-field": (_set("path", "/etc/passwd"), ("path",)),
    "format-version-2": (_top("format_version", 2), ("format_version",)),
    "format-version-string": (_top("format_version", "1"), ("format_version",)),
    "format-version-missing": (_top("format_version", _MISSING), ("format_version",)),
    "journal-seq-string": (_top("journal_seq", "1"), ("journal_seq",)),
    "models-list": (_top("models", []), ("models",)),
    "extra-top-key": (_top("objects_dir", "/etc"), ("format_version", "journal_seq", "models")),
    "model-name-traversal": (
        lambda d: d["models"].__setitem__("../evil", d["models"]["m"]),
        ("name", "../evil"),
    ),
    "version-not-normalised": (
        lambda d: d["models"]["m"]["versions"].__setitem__("2.0.0-rc.1", _entry(d)),
        ("2.0.0-rc.1",),
    ),
    "alias-to-missing": (lambda d: d["models"]["m"]["aliases"].__setitem__("prod", "9.0"), ("prod", "9.0")),
    "alias-latest": (lambda d: d["models"]["m"]["aliases"].__setitem__("latest", "1.0"), ("latest",)),
    "not-json": (b"{this is not json", ("JSON",)),
    "empty-file": (b"", ("JSON",)),
    "truncated-json": (None, ("JSON",)),
    "json-array": (b"[]", ("object",)),
    "json-null": (b"null", ("object",)),
    "binary-garbage": (bytes(range(256)), ("JSON",)),
    "deeply-nested": (b"[" * 100_000 + b"]" * 100_000, ("JSON",)),
}


@pytest.fixture
def tamper_env(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.bin"
    victim.write_bytes(b"precious bytes that no store may touch\n")
    store = Store(tmp_path / "store")
    store.save("m", "1.0", {"w": np.arange(4, dtype=np.float32)})
    store.set_alias("m", "prod", "1.0")
    return store, outside, victim


def _write_tampered(store: Store, mutation: Any) -> None:
    path = store.root / "manifest.json"
    if mutation is None:  # truncated
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
        return
    if isinstance(mutation, bytes):
        path.write_bytes(mutation)
        return
    doc = json.loads(path.read_bytes())
    mutation(doc)
    path.write_text(json.dumps(doc, indent=1))


def _calls(store: Store, tmp_path: Path):
    return {
        "load": lambda: store.load("m", "1.0"),
        "load-mmap": lambda: store.load("m", "1.0", mmap=True, verify="none"),
        "load_many": lambda: store.load_many([("m", "1.0")])["m:1.0"].unwrap(),
        "list": lambda: store.list(),
        "models": lambda: store.models(),
        "info": lambda: store.info("m", "1.0"),
        "path": lambda: store.path("m", "1.0"),
        "export": lambda: store.export("m", "1.0", tmp_path / "exported.safetensors"),
        "save-other": lambda: store.save("other", "1.0", {"x": np.ones(2)}),
        "save-same": lambda: store.save("m", "2.0", {"x": np.ones(2)}),
        "delete": lambda: store.delete("m", "1.0", force=True),
        "set_alias": lambda: store.set_alias("m", "canary", "1.0"),
        "remove_alias": lambda: store.remove_alias("m", "prod"),
    }


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_manifest_is_refused(tamper_env, snapshot, tmp_path, case):
    store, outside, victim = tamper_env
    mutation, words = TAMPERED[case]
    _write_tampered(store, mutation)
    manifest_bytes = (store.root / "manifest.json").read_bytes()
    journal_bytes = (store.root / "journal.jsonl").read_bytes()
    outside_before = snapshot(outside)
    objects_before = snapshot(store.root / "objects")

    for op, call in _calls(Store(store.root), tmp_path).items():
        with pytest.raises(ManifestError) as excinfo:
            call()
        message = str(excinfo.value)
        assert isinstance(excinfo.value, ValueError)
        for word in words:
            assert word in message, f"{op}: {word!r} not in {message!r}"
        assert len(message) < 600, f"{op}: message is not concise: {len(message)} chars"

    assert (store.root / "manifest.json").read_bytes() == manifest_bytes
    assert (store.root / "journal.jsonl").read_bytes() == journal_bytes
    assert snapshot(outside) == outside_before
    assert snapshot(store.root / "objects") == objects_before
    assert victim.exists()
    assert not (tmp_path / "exported.safetensors").exists()


def test_oid_aimed_at_a_file_outside_is_never_read_or_removed(tamper_env, snapshot, tmp_path):
    """An oid crafted so that objects/sha256/<oid[:2]>/<oid[2:]> would land on the victim."""
    store, outside, victim = tamper_env
    os.chmod(victim, 0o644)
    aimed = ".." + str(victim)  # Path(".../sha256") / ".." / "/abs/victim" == "/abs/victim"
    assert store.root / "objects" / "sha256" / aimed[:2] / aimed[2:] == victim
    _write_tampered(store, _set("oid", aimed))
    before = snapshot(outside)
    atime_before = victim.stat().st_atime_ns
    fresh = Store(store.root)
    for call in _calls(fresh, tmp_path).values():
        with pytest.raises(ManifestError):
            call()
    if hasattr(fresh, "gc"):
        try:
            import hydra_cas.gc  # noqa: F401
        except ImportError:
            pass
        else:
            with pytest.raises(ManifestError):
                fresh.gc(grace_period=0)
    assert snapshot(outside) == before
    assert victim.stat().st_atime_ns == atime_before


def test_tampered_journal_without_manifest_is_refused(tamper_env, snapshot):
    store, outside, _ = tamper_env
    journal = store.root / "journal.jsonl"
    records = [json.loads(line) for line in journal.read_bytes().splitlines()]
    records[0]["entry"]["oid"] = "../../../outside/victim.bin"
    journal.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records))
    (store.root / "manifest.json").unlink()
    before = snapshot(outside)
    fresh = Store(store.root)
    for call in (
        lambda: fresh.load("m", "1.0"),
        fresh.list,
        lambda: fresh.save("x", "1.0", {"a": np.ones(1)}),
    ):
        with pytest.raises(ManifestError):
            call()
    assert snapshot(outside) == before
    assert not (store.root / "manifest.json").exists()


@pytest.mark.parametrize(
    "line",
    [
        b"not json\n",
        b'{"seq": 1}\n',
        b'{"seq": 2, "time": "2026-01-01T00:00:00Z", "op": "explode", "name": "m"}\n',
    ],
    ids=["garbage", "no-op-field", "unknown-op"],
)
def test_corrupt_journal_line_is_a_manifest_error_when_replayed(store_factory, line):
    s = store_factory()
    s.save("m", "1.0", _t(1))
    (s.root / "manifest.json").unlink()
    with open(s.root / "journal.jsonl", "ab") as f:
        f.write(line)
    with pytest.raises(ManifestError):
        store_factory().list()


def test_manifest_survives_backup_copy(store_factory, tmp_path):
    """A store directory copied elsewhere (cp -r backup) is a working store."""
    s = store_factory()
    _history(s)
    backup = tmp_path / "backup"
    shutil.copytree(s.root, backup)
    other = Store(backup)
    assert [v.ref for v in other.list()] == [v.ref for v in s.list()]
    np.testing.assert_array_equal(other.load("m", "stable", verify="full")["w"], _t(1)["w"])
