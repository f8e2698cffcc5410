"""The archive tier: bit-exact round trips, tensor dedup, deltas, damage, crashes, and gc beside it."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO_ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("hydra_cas") is None:  # the package is used from the checkout
    sys.path.insert(0, str(REPO_ROOT))

from hydra_cas import IntegrityError, Store, codec  # noqa: E402
from hydra_cas.archive import (  # noqa: E402
    BLOB_HEADER_SIZE,
    KIND_PLAIN,
    KIND_XOR,
    MAX_DELTA_DEPTH,
    BlobHeader,
)
from hydra_cas.gc import execute, make_plan  # noqa: E402

try:
    import ml_dtypes  # noqa: F401  (registers bfloat16 and float8 with numpy)

    ML_DTYPES = ["bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                 "float8_e8m0fnu"]
except ImportError:  # pragma: no cover - depends on the environment
    ML_DTYPES = []

NUMPY_DTYPES = ["bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                "float16", "float32", "float64", "complex64"]
DTYPES = NUMPY_DTYPES + ML_DTYPES
HOUR = 3600.0


# ---------------------------------------------------------------------- helpers


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store", durable=False)


def random_array(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Any bit pattern of ``dtype`` (NaN payloads included); bools are 0 or 1."""
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if dt == np.dtype(bool):
        return rng.integers(0, 2, size=shape).astype(bool)
    raw = rng.integers(0, 256, size=count * dt.itemsize, dtype=np.uint8)
    return raw.view(dt).reshape(shape)


def weights(rng: np.random.Generator, n: int = 4096) -> np.ndarray:
    return rng.standard_normal(n).astype(np.float32)


def le_bytes(array: np.ndarray) -> bytes:
    a = np.ascontiguousarray(array)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and sys.byteorder == "big"):
        a = a.byteswap().view(a.dtype.newbyteorder("<"))
    return a.tobytes()


def assert_same(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> None:
    assert set(actual) == set(expected)
    for key, want in expected.items():
        got = actual[key]
        assert got.shape == want.shape, key
        assert got.dtype.name == want.dtype.name, key
        assert le_bytes(got) == le_bytes(want), key


def tid_of(array: np.ndarray) -> str:
    return hashlib.sha256(le_bytes(array)).hexdigest()


def recipe_tids(store: Store, name: str, version: str) -> dict[str, str]:
    recipe = store.archive_tier.read_recipe(store.info(name, version).oid)
    return {t.name: t.tid for t in recipe.tensors if t.tid is not None}


def blob_ids(store: Store) -> set[str]:
    return {tid for tid, _ in store.archive_tier.iter_files("tensors")}


def recipe_ids(store: Store) -> set[str]:
    return {oid for oid, _ in store.archive_tier.iter_files("recipes")}


def header_of(store: Store, tid: str) -> BlobHeader:
    return store.archive_tier.blob_header(tid)


def age_everything(store: Store, seconds: float = 2 * HOUR) -> None:
    when = time.time() - seconds
    for top in (store.root / "objects", store.root / "archive"):
        for path in top.rglob("*"):
            if path.is_file():
                os.utime(path, (when, when))


def rewrite(path: Path, data: bytes) -> None:
    os.chmod(path, 0o644)
    path.write_bytes(data)


def flip(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    rewrite(path, bytes(data))


def archive_all(store: Store) -> None:
    for info in store.list():
        store.archive(info.name, info.version)


# ---------------------------------------------------------------------- bit-exact round trips


def round_trip(store: Store, tmp_path: Path, name: str, tensors: dict[str, np.ndarray]) -> None:
    """save -> archive -> load (every verify mode, mmap) -> export -> restore -> load, all bit-exact."""
    saved = store.save(name, "1.0", tensors)
    hot = store.path(name, "1.0").read_bytes()
    assert hashlib.sha256(hot).hexdigest() == saved.oid

    result = store.archive(name, "1.0")
    assert not result.already and store.info(name, "1.0").tier == "archive"
    assert not store.objects.path(saved.oid).exists()
    for verify in ("fast", "full", "none"):
        assert_same(tensors, store.load(name, "1.0", verify=verify))
    assert_same(tensors, store.load(name, "1.0", mmap=True))
    exported = store.export(name, "1.0", tmp_path / f"{name.replace('/', '_')}.safetensors")
    data = exported.read_bytes()
    assert data == hot and hashlib.sha256(data).hexdigest() == saved.oid

    assert not store.restore(name, "1.0").already
    assert store.info(name, "1.0").tier == "hot"
    assert store.path(name, "1.0").read_bytes() == hot
    assert_same(tensors, store.load(name, "1.0", verify="full"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_bit_exact_for_every_dtype(store: Store, tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(len(dtype))
    big = random_array(rng, dtype, (6, 10))
    tensors = {
        "bits": random_array(rng, dtype, (3, 7)),
        "empty": random_array(rng, dtype, (0, 4)),
        "scalar": random_array(rng, dtype, ()),
        "strided": big[:, ::3],  # non-contiguous
        "transposed": big.T,
    }
    if dtype != "bool":
        # Smooth values take the codec's split path; random bits mostly do not.
        tensors["smooth"] = rng.standard_normal((64, 33)).astype(np.float32).astype(dtype)
    round_trip(store, tmp_path, "m", tensors)


def test_round_trip_of_big_endian_and_fortran_inputs(store: Store, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    tensors = {
        "be": weights(rng, 300).astype(">f4"),
        "fortran": np.asfortranarray(rng.standard_normal((17, 9))),
        "i16": rng.integers(-1000, 1000, size=(5, 5), dtype=np.int16).astype(">i2"),
    }
    round_trip(store, tmp_path, "org/model", tensors)


def test_archiving_twice_and_restoring_twice_are_no_ops(store: Store) -> None:
    store.save("m", "1.0", {"w": weights(np.random.default_rng(0))})
    store.archive("m", "1.0")
    assert store.archive("m", "1.0").already
    store.restore("m", "1.0")
    assert store.restore("m", "1.0").already


def test_tensors_of_different_dtypes_with_equal_bytes_share_a_blob(store: Store) -> None:
    """Zeros as F32 and as I32 have one tid; the blob keeps the first dtype and both load."""
    tensors = {"f": np.zeros(64, np.float32), "i": np.zeros(64, np.int32), "h": np.zeros((8, 16), np.float16),
               "b": np.zeros(256, np.uint8)}
    store.save("m", "1.0", tensors)
    store.archive("m", "1.0")
    assert len(blob_ids(store)) == 1
    assert_same(tensors, store.load("m", "1.0", verify="full"))
    assert store.fsck().exit_code == 0


# ---------------------------------------------------------------------- tensor-level dedup


def test_a_tensor_shared_by_many_versions_and_models_is_stored_once(store: Store) -> None:
    rng = np.random.default_rng(2)
    shared = weights(rng, 8192)
    for i in range(5):
        store.save("m", f"1.{i}", {"shared": shared, "own": np.full(16, i, np.float32)})
    for i in range(3):
        store.save("n", f"2.{i}", {"emb": shared, "head": np.full(16, 100 + i, np.float32)})
    archive_all(store)

    blobs = blob_ids(store)
    assert tid_of(shared) in blobs
    assert len(blobs) == 1 + 5 + 3  # the shared tensor once, plus each distinct small one
    assert all(recipe_tids(store, "m", f"1.{i}")["shared"] == tid_of(shared) for i in range(5))
    assert all(recipe_tids(store, "n", f"2.{i}")["emb"] == tid_of(shared) for i in range(3))
    tier = store.du()["tiers"]["archive"]
    assert tier["versions"] == 8 and tier["tensor_blobs"] == 9
    assert tier["tensor_dedup_saved_bytes"] >= 7 * shared.nbytes
    for i in range(5):
        store.load("m", f"1.{i}", verify="full")


# ---------------------------------------------------------------------- deltas


def drift(rng: np.random.Generator, base: np.ndarray, scale: float = 1e-4) -> np.ndarray:
    return (base + rng.standard_normal(base.shape).astype(np.float32) * np.float32(scale)).astype(np.float32)


def test_a_drifted_version_is_stored_as_a_smaller_delta(store: Store, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    parent = weights(rng, 16384)
    child = drift(rng, parent)
    store.save("m", "1.0", {"w": parent})
    store.save("m", "1.1", {"w": child})
    store.archive("m", "1.0")
    stats = store.archive("m", "1.1").stats
    assert stats is not None and stats.deltas == 1 and stats.plain == 0

    header = header_of(store, tid_of(child))
    assert header.kind == KIND_XOR and header.depth == 1 and header.base == tid_of(parent)
    assert header_of(store, tid_of(parent)).kind == KIND_PLAIN
    alone = Store(tmp_path / "alone", durable=False)
    alone.save("m", "1.1", {"w": child})
    alone.archive("m", "1.1")
    delta_size = store.archive_tier.tensor_path(tid_of(child)).stat().st_size
    plain_size = alone.archive_tier.tensor_path(tid_of(child)).stat().st_size
    assert delta_size < plain_size
    assert store.du()["tiers"]["archive"]["delta_saved_bytes"] > 0
    assert_same({"w": child}, store.load("m", "1.1", verify="full"))


def test_delta_chains_stop_at_the_depth_bound(store: Store) -> None:
    rng = np.random.default_rng(4)
    values = [weights(rng, 2048)]
    for _ in range(11):
        values.append(drift(rng, values[-1]))
    for i, w in enumerate(values):
        store.save("m", f"1.{i}", {"w": w})
        store.archive("m", f"1.{i}")

    depths = [header_of(store, tid_of(w)).depth for w in values]
    assert max(depths) == MAX_DELTA_DEPTH == 8
    # Links 0..8 form one chain; the next one is a keyframe that starts the next.
    assert depths == [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2]
    assert header_of(store, tid_of(values[9])).kind == KIND_PLAIN
    assert all(header_of(store, t).depth <= MAX_DELTA_DEPTH for t in blob_ids(store))
    for i, w in enumerate(values):
        assert_same({"w": w}, store.load("m", f"1.{i}", verify="full"))


def test_an_explicit_parent_is_the_delta_base(store: Store) -> None:
    rng = np.random.default_rng(5)
    base = weights(rng)
    store.save("m", "1.0", {"w": base})
    store.save("m", "1.5", {"w": weights(rng)})  # unrelated; the previous version by number
    child = drift(rng, base)
    store.save("m", "2.0", {"w": child}, parent="1.0")
    archive_all(store)
    header = header_of(store, tid_of(child))
    assert header.kind == KIND_XOR and header.base == tid_of(base)


def test_a_hot_parent_gives_no_delta(store: Store) -> None:
    rng = np.random.default_rng(6)
    base = weights(rng)
    store.save("m", "1.0", {"w": base})
    store.save("m", "1.1", {"w": drift(rng, base)})
    store.archive("m", "1.1")
    assert {header_of(store, t).kind for t in blob_ids(store)} == {KIND_PLAIN}


def test_a_delta_survives_the_deletion_of_its_parent_version(store: Store) -> None:
    rng = np.random.default_rng(7)
    parent = weights(rng)
    child = drift(rng, parent)
    store.save("m", "1.0", {"w": parent, "only_parent": weights(rng, 64)})
    store.save("m", "1.1", {"w": child})
    archive_all(store)
    parent_oid = store.info("m", "1.0").oid
    assert header_of(store, tid_of(child)).base == tid_of(parent)

    store.delete("m", "1.0")
    plan = store.gc(grace_period=0)

    assert tid_of(parent) in blob_ids(store)  # the base of a live delta
    assert parent_oid in plan.deleted_recipes and parent_oid not in recipe_ids(store)
    assert len(plan.deleted_blobs) == 1  # only the tensor nothing else needs
    assert_same({"w": child}, store.load("m", "1.1", verify="full"))
    assert store.fsck().exit_code == 0


# ---------------------------------------------------------------------- damage is caught


@pytest.fixture
def shared_store(store: Store) -> tuple[Store, np.ndarray]:
    """m:1.0 holds A, m:1.1 a delta on A, n:1.0 A itself (shared), m:2.0 something else."""
    rng = np.random.default_rng(8)
    a = weights(rng)
    store.save("m", "1.0", {"w": a})
    store.save("m", "1.1", {"w": drift(rng, a)})
    store.save("n", "1.0", {"x": a})
    store.save("m", "2.0", {"w": weights(rng)}, parent=None)
    return store, a


def test_a_flipped_blob_byte_fails_loads_and_fsck_names_every_affected_version(
    shared_store: tuple[Store, np.ndarray],
) -> None:
    store, a = shared_store
    for ref in ("m:1.0", "m:1.1", "n:1.0"):
        store.archive(*ref.split(":"))
    store.archive("m", "2.0")
    flip(store.archive_tier.tensor_path(tid_of(a)))

    for version in ("fast", "full"):
        with pytest.raises(IntegrityError):
            store.load("m", "1.0", verify=version)
        with pytest.raises(IntegrityError):
            store.load("m", "1.1", verify=version)  # through its delta chain
    report = store.fsck()
    assert report.exit_code == 1
    found = [f for f in report.findings if f.kind == "archive-blob-corrupt"]
    assert len(found) == 1 and found[0].oid == tid_of(a) and found[0].severity == "error"
    assert found[0].refs == ("m:1.0", "m:1.1", "n:1.0")
    assert "affects m:1.0, m:1.1, n:1.0" in report.render()


def test_repair_quarantines_a_corrupt_blob_and_marks_its_versions_broken(
    shared_store: tuple[Store, np.ndarray],
) -> None:
    store, a = shared_store
    archive_all(store)
    path = store.archive_tier.tensor_path(tid_of(a))
    flip(path)

    report = store.fsck(repair=True)

    assert report.exit_code == 0, report.render()
    assert [f.kind for f in report.findings if f.repaired] == ["archive-blob-corrupt"]
    assert not path.exists()
    assert [p.name.split(".")[1] for p in store.layout.quarantine.iterdir()] == [tid_of(a)]
    for ref in ("m:1.0", "m:1.1", "n:1.0"):
        info = store.info(*ref.split(":"))
        assert (info.status, info.tier) == ("broken", "archive")
        with pytest.raises(IntegrityError, match="broken"):
            store.load(*ref.split(":"))
    store.load("m", "2.0", verify="full")
    remaining = {f.kind: f.severity for f in report.remaining}
    assert remaining["archive-blob-missing"] == "info"
    # A broken version's damage is known: gc still sweeps the rest of archive/.
    assert store.gc(grace_period=0).archive_skipped is None
    assert store.fsck(repair=True).repaired == 0


def test_repair_brings_versions_back_to_the_hot_tier_when_their_hot_copy_verifies(
    shared_store: tuple[Store, np.ndarray], monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, a = shared_store
    with monkeypatch.context() as m:
        m.setattr(Store, "_drop_hot_copy", lambda self, oid: None)  # as if archive crashed before the drop
        store.archive("m", "1.0")
    store.archive("m", "1.1")
    store.archive("n", "1.0")
    flip(store.archive_tier.tensor_path(tid_of(a)))

    report = store.fsck(repair=True)

    assert report.exit_code == 0, report.render()
    info = store.info("m", "1.0")
    assert (info.tier, info.status) == ("hot", "ok")
    assert_same({"w": a}, store.load("m", "1.0", verify="full"))
    assert store.info("m", "1.1").status == "broken" and store.info("n", "1.0").status == "broken"


def test_a_damaged_recipe_is_caught_and_quarantined(store: Store) -> None:
    store.save("m", "1.0", {"w": weights(np.random.default_rng(9))})
    store.archive("m", "1.0")
    oid = store.info("m", "1.0").oid
    path = store.archive_tier.recipe_path(oid)
    rewrite(path, b'{"format_version": 1, "oid": ')

    with pytest.raises(IntegrityError, match="not valid JSON"):
        store.load("m", "1.0")
    finding = next(f for f in store.fsck().findings if f.kind == "archive-recipe-corrupt")
    assert finding.refs == ("m:1.0",) and finding.severity == "error"
    store.fsck(repair=True)
    assert not path.exists() and store.info("m", "1.0").status == "broken"


def recipe_doc(store: Store, oid: str) -> dict[str, Any]:
    return json.loads(store.archive_tier.recipe_path(oid).read_bytes())


@pytest.mark.parametrize("how", ["shifted", "float", "bool"])
def test_recipe_offsets_that_disagree_with_its_header_are_refused(store: Store, how: str) -> None:
    rng = np.random.default_rng(10)
    store.save("m", "1.0", {"a": weights(rng, 64), "b": weights(rng, 64)})
    store.archive("m", "1.0")
    oid = store.info("m", "1.0").oid
    doc = recipe_doc(store, oid)
    if how == "shifted":
        doc["tensors"][0][2] += 4
        doc["tensors"][1][1] += 4
    elif how == "float":
        doc["tensors"][0][1] = float(doc["tensors"][0][1])
    else:
        doc["tensors"][0][1] = True  # compares equal to 1, never a valid offset type
    rewrite(store.archive_tier.recipe_path(oid), json.dumps(doc).encode())
    with pytest.raises(IntegrityError):
        store.load("m", "1.0")
    assert any(f.kind == "archive-recipe-corrupt" for f in store.fsck().findings)


# ---------------------------------------------------------------------- crafted lengths


@pytest.fixture
def one_blob(store: Store) -> tuple[Store, str, Path, np.ndarray]:
    w = weights(np.random.default_rng(11), 1024)
    store.save("m", "1.0", {"w": w})
    store.archive("m", "1.0")
    tid = tid_of(w)
    return store, tid, store.archive_tier.tensor_path(tid), w


def load_bounded(store: Store, limit: int) -> None:
    """Load m:1.0 expecting IntegrityError, allocating at most ``limit`` bytes at once."""
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError):
            store.load("m", "1.0", verify="full")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, peak


def test_a_blob_claiming_another_raw_size_is_refused(one_blob: tuple[Store, str, Path, np.ndarray]) -> None:
    store, _, path, _ = one_blob
    data = path.read_bytes()
    header = BlobHeader.unpack(data, "x" * 64)
    lying = BlobHeader(header.kind, header.depth, 1 << 40, header.base, header.dtype).pack()
    rewrite(path, lying + data[BLOB_HEADER_SIZE:])
    load_bounded(store, 1 << 20)


def test_a_blob_larger_than_the_bound_is_refused_without_reading_it(
    one_blob: tuple[Store, str, Path, np.ndarray],
) -> None:
    store, _, path, _ = one_blob
    rewrite(path, path.read_bytes() + bytes(32 << 20))
    load_bounded(store, 1 << 20)


def test_a_codec_frame_with_a_lying_stream_length_is_refused(
    one_blob: tuple[Store, str, Path, np.ndarray],
) -> None:
    store, _, path, _ = one_blob
    data = bytearray(path.read_bytes())
    first_length = BLOB_HEADER_SIZE + 32  # the frame's stream table
    value = int.from_bytes(data[first_length : first_length + 8], "little")
    data[first_length : first_length + 8] = (value + (1 << 32)).to_bytes(8, "little")
    rewrite(path, bytes(data))
    load_bounded(store, 1 << 20)


@pytest.mark.parametrize("content_size", [True, False])
def test_a_decompression_bomb_inside_a_blob_is_refused(
    one_blob: tuple[Store, str, Path, np.ndarray], content_size: bool,
) -> None:
    store, _, path, w = one_blob
    bomb = zstandard.ZstdCompressor(level=19, write_checksum=True, write_content_size=content_size)
    stream = bomb.compress(bytes(64 << 20)) if content_size else _streamed(bomb, 64 << 20)
    frame = codec._frame(codec._ZSTD, w.nbytes, [stream])  # a well-formed frame around it
    header = BlobHeader(KIND_PLAIN, 0, w.nbytes, None, "F32").pack()
    rewrite(path, header + frame)
    load_bounded(store, 4 << 20)
    assert any(f.kind == "archive-blob-corrupt" for f in store.fsck().findings)


def _streamed(comp: zstandard.ZstdCompressor, size: int) -> bytes:
    """A zstd frame that does not record its content size."""
    obj = comp.compressobj()
    chunk = bytes(1 << 20)
    out = b"".join(obj.compress(chunk) for _ in range(size // len(chunk)))
    return out + obj.flush()


# ---------------------------------------------------------------------- refusing and surviving


def test_archiving_a_corrupt_hot_object_is_refused_and_leaves_it_alone(store: Store) -> None:
    store.save("m", "1.0", {"w": weights(np.random.default_rng(12))})
    oid = store.info("m", "1.0").oid
    path = store.objects.path(oid)
    flip(path)
    before = path.read_bytes()
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        store.archive("m", "1.0")
    assert path.read_bytes() == before
    assert store.info("m", "1.0").tier == "hot"
    assert recipe_ids(store) == set()


class Crash(Exception):
    pass


def versions_load(store: Store, expected: dict[str, dict[str, np.ndarray]]) -> None:
    for version, tensors in expected.items():
        assert_same(tensors, store.load("m", version, verify="full"))


@pytest.fixture
def two_versions(store: Store) -> tuple[Store, dict[str, dict[str, np.ndarray]]]:
    rng = np.random.default_rng(13)
    base = weights(rng)
    expected = {"1.0": {"w": base}, "1.1": {"w": drift(rng, base), "b": weights(rng, 32)}}
    for version, tensors in expected.items():
        store.save("m", version, tensors)
    return store, expected


def test_a_crash_before_the_archive_commit_keeps_the_version_hot(
    two_versions: tuple[Store, dict[str, dict[str, np.ndarray]]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, expected = two_versions
    with monkeypatch.context() as m:
        def crash(*args: Any) -> None:
            raise Crash

        m.setattr(Store, "_set_tier", crash)
        with pytest.raises(Crash):
            store.archive("m", "1.0")
    assert store.info("m", "1.0").tier == "hot" and blob_ids(store)
    versions_load(store, expected)
    plan = store.gc(grace_period=0)  # the blobs and recipe were never committed
    assert plan.deleted_recipes and plan.deleted_blobs and not blob_ids(store)
    versions_load(store, expected)
    archive_all(store)
    versions_load(store, expected)


def test_a_crash_before_the_hot_copy_is_dropped_leaves_a_copy_gc_frees(
    two_versions: tuple[Store, dict[str, dict[str, np.ndarray]]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, expected = two_versions
    oid = store.info("m", "1.0").oid
    with monkeypatch.context() as m:
        m.setattr(Store, "_drop_hot_copy", lambda self, oid: None)
        store.archive("m", "1.0")
    assert store.info("m", "1.0").tier == "archive" and store.objects.path(oid).exists()
    versions_load(store, expected)
    assert store.gc(grace_period=HOUR).deleted == ()  # young: kept
    assert store.fsck().exit_code == 0

    plan = store.gc(grace_period=0)

    assert plan.deleted == (oid,) and plan.archived_copies == (oid,)
    assert "hot copies of archived versions" in plan.render()
    versions_load(store, expected)


def test_gc_keeps_a_hot_copy_whose_archived_form_does_not_rebuild(
    two_versions: tuple[Store, dict[str, dict[str, np.ndarray]]], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, _ = two_versions
    oid = store.info("m", "1.0").oid
    with monkeypatch.context() as m:
        m.setattr(Store, "_drop_hot_copy", lambda self, oid: None)
        store.archive("m", "1.0")
    flip(store.archive_tier.tensor_path(recipe_tids(store, "m", "1.0")["w"]))
    with caplog.at_level("WARNING", logger="hydra_cas.gc"):
        plan = store.gc(grace_period=0)
    assert plan.deleted == () and store.objects.path(oid).exists()
    assert any("does not rebuild" in r.getMessage() for r in caplog.records)
    store.fsck(repair=True)  # the hot copy verifies: back to the hot tier
    assert store.info("m", "1.0").tier == "hot"
    store.load("m", "1.0", verify="full")


def test_a_restore_that_fails_after_publishing_leaves_the_version_archived(
    two_versions: tuple[Store, dict[str, dict[str, np.ndarray]]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, expected = two_versions
    archive_all(store)
    oid = store.info("m", "1.1").oid
    real = Store._set_tier

    def crash_on_restore(self: Store, name: str, key: str, oid: str, old: str, new: str) -> None:
        if new == "hot":
            raise Crash
        real(self, name, key, oid, old, new)

    with monkeypatch.context() as m:
        m.setattr(Store, "_set_tier", crash_on_restore)
        with pytest.raises(Crash):
            store.restore("m", "1.1")
    assert store.info("m", "1.1").tier == "archive" and store.objects.path(oid).exists()
    versions_load(store, expected)
    plan = store.gc(grace_period=0)
    assert plan.deleted == (oid,) and plan.deleted_recipes == () and plan.deleted_blobs == ()
    versions_load(store, expected)
    store.restore("m", "1.1")
    versions_load(store, expected)


# ---------------------------------------------------------------------- gc and the archive


def test_gc_frees_unneeded_archive_files_only_after_the_grace_period(store: Store) -> None:
    rng = np.random.default_rng(14)
    expected = {"1.0": {"w": weights(rng)}, "1.1": {"w": weights(rng)}}
    for version, tensors in expected.items():
        store.save("m", version, tensors)
    archive_all(store)
    live_blob = recipe_tids(store, "m", "1.1")["w"]
    store.restore("m", "1.0")  # its recipe and blob are now unneeded, but fresh
    dead_recipe, dead_blob = store.info("m", "1.0").oid, tid_of(expected["1.0"]["w"])

    young = store.gc(grace_period=HOUR)
    assert young.deleted_recipes == () and young.deleted_blobs == ()
    assert [o.oid for o in young.kept_young_recipes] == [dead_recipe]
    assert [o.oid for o in young.kept_young_blobs] == [dead_blob]

    age_everything(store)
    dry = store.gc(grace_period=HOUR, dry_run=True)
    assert [o.oid for o in dry.delete_recipes] == [dead_recipe]
    assert [o.oid for o in dry.delete_blobs] == [dead_blob]
    assert dry.deleted_blobs == () and dead_blob in blob_ids(store)
    assert "would delete 1 recipes and 1 tensor blobs" in dry.render()

    done = store.gc(grace_period=HOUR)
    assert done.deleted_recipes == (dead_recipe,) and done.deleted_blobs == (dead_blob,)
    assert done.freed_archive_bytes == dry.archive_bytes_to_free > 0
    assert blob_ids(store) == {live_blob} and recipe_ids(store) == {store.info("m", "1.1").oid}
    data = json.loads(json.dumps(done.to_dict()))
    assert data["archive"]["deleted_blobs"] == [dead_blob] and data["archive"]["skipped"] is None
    assert "deleted 1 recipes and 1 tensor blobs" in done.render()
    versions_load(store, expected)


def test_gc_never_frees_live_archive_data(shared_store: tuple[Store, np.ndarray]) -> None:
    store, _ = shared_store
    archive_all(store)
    before = (blob_ids(store), recipe_ids(store))
    age_everything(store)
    plan = store.gc(grace_period=0)
    assert plan.deleted_recipes == () and plan.deleted_blobs == ()
    assert (blob_ids(store), recipe_ids(store)) == before
    for info in store.list():
        store.load(info.name, info.version, verify="full")


def test_gc_skips_archive_sweep_when_live_data_is_missing(store: Store) -> None:
    rng = np.random.default_rng(15)
    store.save("m", "1.0", {"w": weights(rng)})
    store.save("m", "1.1", {"w": weights(rng)})
    archive_all(store)
    store.restore("m", "1.0")  # leaves an unneeded recipe and blob
    os.unlink(store.archive_tier.tensor_path(recipe_tids(store, "m", "1.1")["w"]))
    age_everything(store)

    plan = store.gc(grace_period=0)

    assert plan.archive_skipped is not None and "missing" in plan.archive_skipped
    assert plan.deleted_recipes == () and plan.deleted_blobs == ()
    assert len(recipe_ids(store)) == 2
    assert "archive/ not swept" in plan.render()


def test_the_recheck_under_the_lock_spares_a_blob_reused_after_the_plan(store: Store) -> None:
    rng = np.random.default_rng(16)
    w = weights(rng)
    store.save("m", "1.0", {"w": w})
    store.archive("m", "1.0")
    store.delete("m", "1.0")
    age_everything(store)
    plan = make_plan(store, grace_period=HOUR)
    assert [o.oid for o in plan.delete_blobs] == [tid_of(w)]

    store.save("n", "1.0", {"v": w})  # same tensor: archiving reuses (and refreshes) the blob
    assert store.archive("n", "1.0").stats.reused == 1  # type: ignore[union-attr]
    done = execute(store, plan)

    assert done.deleted_blobs == () and tid_of(w) in done.spared_archive
    assert_same({"v": w}, store.load("n", "1.0", verify="full"))


def test_gc_deletes_deltas_before_their_bases(store: Store) -> None:
    rng = np.random.default_rng(17)
    values = [weights(rng, 1024)]
    for _ in range(3):
        values.append(drift(rng, values[-1]))
    for i, w in enumerate(values):
        store.save("m", f"1.{i}", {"w": w})
        store.archive("m", f"1.{i}")
    for i in range(len(values)):
        store.delete("m", f"1.{i}")
    age_everything(store)
    plan = store.gc(grace_period=HOUR, dry_run=True)
    assert [o.oid for o in plan.delete_blobs] == [tid_of(w) for w in reversed(values)]


def test_restore_then_gc_frees_the_archived_form_once_old_enough(store: Store) -> None:
    w = weights(np.random.default_rng(18))
    store.save("m", "1.0", {"w": w})
    store.archive("m", "1.0")
    store.restore("m", "1.0")
    assert store.gc(grace_period=HOUR).deleted_blobs == ()
    age_everything(store)
    plan = store.gc(grace_period=HOUR)
    assert plan.deleted_blobs == (tid_of(w),) and plan.deleted == ()
    assert blob_ids(store) == set() and recipe_ids(store) == set()
    assert_same({"w": w}, store.load("m", "1.0", verify="full"))


# ---------------------------------------------------------------------- choosing what to archive


def set_created(store: Store, name: str, version: str, created: str) -> None:
    entry = store.manifest.read()["models"][name]["versions"][version]
    store.manifest.commit(lambda doc: [{"op": "put", "name": name, "version": version,
                                        "entry": {**entry, "created": created}}])


def test_archive_candidates(store: Store) -> None:
    for i in range(5):
        store.save("m", f"1.{i}", {"w": np.full(4, i, np.float32)})
    store.save("n", "1.0", {"w": np.full(4, 9, np.float32)})
    store.set_alias("m", "prod", "1.1")

    assert store.archive_candidates(keep_latest=2) == [("m", "1.0"), ("m", "1.2")]
    assert store.archive_candidates("m", keep_latest=0) == [("m", "1.0"), ("m", "1.2"), ("m", "1.3"),
                                                            ("m", "1.4")]
    assert store.archive_candidates(keep_latest=10) == []  # fewer versions than N: all kept
    # Named exactly, an aliased version is a candidate.
    assert store.archive_candidates("m", "1.1") == [("m", "1.1")]
    assert store.archive_candidates(older_than_days=1) == []
    set_created(store, "m", "1.3", "2020-01-01T00:00:00.000000Z")
    set_created(store, "m", "1.1", "2020-01-01T00:00:00.000000Z")
    assert store.archive_candidates(older_than_days=1) == [("m", "1.3")]
    store.archive("m", "1.0")
    assert ("m", "1.0") not in store.archive_candidates(keep_latest=0)


# ---------------------------------------------------------------------- property test

_NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._/-", min_size=1, max_size=12)
_SHAPES = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=st.dictionaries(_NAMES, st.tuples(st.sampled_from(DTYPES), _SHAPES), min_size=1, max_size=6),
    seed=st.integers(0, 2**32 - 1),
    zeros=st.booleans(),
)
def test_property_random_models_round_trip_through_the_archive(
    spec: dict[str, tuple[str, tuple[int, ...]]], seed: int, zeros: bool,
) -> None:
    rng = np.random.default_rng(seed)
    tensors = {
        name: (np.zeros(shape, dtype) if zeros else random_array(rng, dtype, shape))
        for name, (dtype, shape) in spec.items()
    }
    with tempfile.TemporaryDirectory() as tmp:
        round_trip(Store(Path(tmp) / "store", durable=False), Path(tmp), "m", tensors)


def test_gc_stops_sweeping_when_a_new_archived_version_turns_out_damaged(store: Store) -> None:
    rng = np.random.default_rng(19)
    old = weights(rng)
    store.save("m", "1.0", {"w": old})
    store.archive("m", "1.0")
    store.delete("m", "1.0")
    age_everything(store)
    plan = make_plan(store, grace_period=HOUR)
    assert [o.oid for o in plan.delete_blobs] == [tid_of(old)]
    fresh = weights(rng)
    store.save("m", "2.0", {"w": fresh})
    store.archive("m", "2.0")
    os.unlink(store.archive_tier.tensor_path(tid_of(fresh)))  # damage under a version gc has not seen

    done = execute(store, plan)

    assert done.archive_skipped is not None and done.archive_skipped.startswith("stopped")
    assert done.deleted_recipes == () and done.deleted_blobs == ()
    assert tid_of(old) in blob_ids(store)


def test_a_damaged_recipe_of_a_broken_version_stops_gc_until_fsck_sets_it_aside(store: Store) -> None:
    rng = np.random.default_rng(20)
    store.save("m", "1.0", {"w": weights(rng)})
    store.archive("m", "1.0")
    entry = store.manifest.read()["models"]["m"]["versions"]["1.0"]
    store.manifest.commit(lambda doc: [{"op": "put", "name": "m", "version": "1.0",
                                        "entry": {**entry, "status": "broken"}}])
    path = store.archive_tier.recipe_path(entry["oid"])
    rewrite(path, b"not json")
    assert store.gc(grace_period=0).archive_skipped is not None  # which blobs does it need?

    report = store.fsck(repair=True)

    assert report.exit_code == 0 and not path.exists()
    assert store.gc(grace_period=0).archive_skipped is None
