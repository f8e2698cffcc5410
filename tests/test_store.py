"""Store: bit-exact round trips for every dtype, determinism and dedup,
immutability, corruption detection and load_many."""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import pickle
import stat
from pathlib import Path

import blake3
import numpy as np
import pytest
from safetensors import safe_open

from hydra_cas import (
    HydraError,
    IntegrityError,
    LoadResult,
    NotFoundError,
    SaveResult,
    Store,
    VersionExistsError,
)

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - depends on the environment
    ml_dtypes = None

needs_ml_dtypes = pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes is not installed")

# --------------------------------------------------------------------------- sample data

NUMPY_DTYPES = [
    "bool",
    "uint8",
    "int8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
]
ML_DTYPES = [
    "bfloat16",
    "float8_e5m2",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
]
ST_NAMES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "uint16": "U16",
    "int32": "I32",
    "uint32": "U32",
    "int64": "I64",
    "uint64": "U64",
    "float16": "F16",
    "float32": "F32",
    "float64": "F64",
    "complex64": "C64",
    "bfloat16": "BF16",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "float8_e8m0fnu": "F8_E8M0",
}
ALL_DTYPES = [pytest.param(d, id=d) for d in NUMPY_DTYPES] + [
    pytest.param(d, id=d, marks=needs_ml_dtypes) for d in ML_DTYPES
]
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

# Bit patterns for IEEE floats: +0, -0, +inf, -inf, quiet NaN, signalling NaN with
# a payload, negative NaN with a payload, smallest subnormal, largest finite.
_FLOAT_SPECIALS = {
    2: [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFE37, 0x0001, 0x7BFF],
    4: [
        0x00000000,
        0x80000000,
        0x7F800000,
        0xFF800000,
        0x7FC00000,
        0x7F800001,
        0xFFC12345,
        0x00000001,
        0x7F7FFFFF,
    ],
    8: [
        0x0,
        0x8000000000000000,
        0x7FF0000000000000,
        0xFFF0000000000000,
        0x7FF8000000000000,
        0x7FF0000000000001,
        0xFFF8DEADBEEF0001,
        0x1,
        0x7FEFFFFFFFFFFFFF,
    ],
}


def np_dtype(name: str) -> np.dtype:
    if name in ML_DTYPES:
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def sample(name: str, rows: int = 6, cols: int = 6, seed: int = 0) -> np.ndarray:
    """A (rows, cols) little-endian array of ``name`` holding awkward values."""
    rng = np.random.default_rng(seed)
    dtype = np_dtype(name)
    n = rows * cols
    if name == "bool":
        flat = rng.integers(0, 2, n).astype(bool)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        flat = rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
        flat[:3] = [info.min, info.max, 0]
    elif name in ("float16", "float32", "float64"):
        bits = rng.integers(
            0, np.iinfo(_UINT[dtype.itemsize]).max, n, dtype=_UINT[dtype.itemsize], endpoint=True
        )
        specials = _FLOAT_SPECIALS[dtype.itemsize]
        bits[: len(specials)] = specials
        flat = bits.view(dtype)
    elif name == "complex64":
        bits = rng.integers(0, 2**32 - 1, 2 * n, dtype=np.uint32, endpoint=True)
        specials = _FLOAT_SPECIALS[4]
        bits[: len(specials)] = specials
        bits[len(specials) : 2 * len(specials)] = specials[::-1]
        flat = bits.view(np.complex64)
    elif name == "bfloat16":
        bits = rng.integers(0, 2**16 - 1, n, dtype=np.uint16, endpoint=True)
        bits[:6] = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7F81, 0xFFC5]  # 0, -0, inf, -inf, NaN payloads
        flat = bits.view(dtype)
    else:  # float8: every one of the 256 bit patterns is a value (or a NaN) somewhere
        bits = np.resize(np.arange(256, dtype=np.uint8), n)
        rng.shuffle(bits)
        flat = bits.view(dtype)
    return flat.reshape(rows, cols)


def big_endian(array: np.ndarray) -> np.ndarray:
    """The same values in big-endian byte order (bits moved, never converted)."""
    return array.byteswap().view(array.dtype.newbyteorder(">"))


def variants(name: str) -> dict[str, np.ndarray]:
    """Contiguous, non-contiguous, empty, 0-d and (where it exists) big-endian tensors."""
    base = sample(name, 6, 6, seed=1)
    out = {
        "contiguous": base,
        "transposed": base.T,
        "strided": base[::2, 1::3],
        "reversed": base[::-1],
        "column": base[:, 2],
        "empty": base[:0],
        "empty_middle": np.empty((2, 0, 3), dtype=base.dtype),
        "scalar": base.reshape(-1)[5:6].reshape(()).copy(),
        "three_d": sample(name, 4, 6, seed=2).reshape(2, 3, 4),
    }
    if base.dtype.itemsize > 1 and name not in ML_DTYPES:
        out["big_endian"] = big_endian(base)
        out["big_endian_transposed"] = big_endian(base).T
        out["big_endian_scalar"] = big_endian(out["scalar"].reshape(1)).reshape(())
        assert out["big_endian"].dtype.byteorder == ">"
    return out


def reaches_mmap(array: np.ndarray) -> bool:
    """True if following .base (and memoryview .obj) from ``array`` reaches an mmap.mmap."""
    obj: object = array
    for _ in range(64):
        if isinstance(obj, mmap.mmap):
            return True
        if isinstance(obj, memoryview):
            obj = obj.obj
        elif isinstance(obj, np.ndarray):
            obj = obj.base
        else:
            return False
    return False


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("mmap_mode", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("verify", ["fast", "full", "none"])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_round_trip_is_bit_exact(store, assert_bitexact, dtype, verify, mmap_mode):
    tensors = variants(dtype)
    originals = {k: v.copy() for k, v in tensors.items()}
    result = store.save("m", "1.0.0", tensors)
    assert isinstance(result, SaveResult)

    loaded = store.load("m", "1.0.0", verify=verify, mmap=mmap_mode)

    assert set(loaded) == set(tensors)
    for key, expected in tensors.items():
        actual = loaded[key]
        assert_bitexact(expected, actual, key)
        # stored little-endian, loaded as the little-endian dtype of the same name
        assert actual.dtype.byteorder in ("<", "=", "|"), (key, actual.dtype)
        if mmap_mode:
            assert actual.flags.writeable is False, key
            if actual.size:
                assert reaches_mmap(actual), f"{key} is not a view of a memory map"
        else:
            assert actual.flags.writeable is True, key
            assert not reaches_mmap(actual), key
    # saving must not have modified the caller's arrays
    for key in tensors:
        assert_bitexact(originals[key], tensors[key], f"caller's {key}")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_manifest_records_dtype_and_counts(store, dtype):
    tensors = variants(dtype)
    store.save("m", "1.0", tensors)
    info = store.info("m", "1.0")
    assert info.dtypes == (ST_NAMES[dtype],)
    assert info.tensors == len(tensors)
    assert info.parameters == sum(int(a.size) for a in tensors.values())
    assert info.size == store.path("m", "1.0").stat().st_size


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8 : 8 + n])


@pytest.mark.parametrize(
    "dtype",
    [pytest.param(d, id=d) for d in NUMPY_DTYPES]
    + [pytest.param("bfloat16", id="bfloat16", marks=needs_ml_dtypes)],
)
def test_payload_opens_with_safetensors_numpy(store, assert_bitexact, dtype):
    tensors = variants(dtype)
    store.save("m", "1.0", tensors, metadata={"note": "kept out of the payload"})
    path = store.path("m", "1.0")
    with safe_open(str(path), "np") as f:
        assert set(f.keys()) == set(tensors)
        for key in f.keys():
            assert_bitexact(tensors[key], f.get_tensor(key), key)
        assert not f.metadata()


@needs_ml_dtypes
@pytest.mark.parametrize("dtype", [d for d in ML_DTYPES if d.startswith("float8")])
def test_float8_payload_opens_with_safetensors_torch(store, dtype):
    torch = pytest.importorskip("torch")
    tensors = {"contiguous": sample(dtype, 16, 16), "transposed": sample(dtype, 4, 8).T}
    store.save("m", "1.0", tensors)
    with safe_open(str(store.path("m", "1.0")), "pt") as f:
        assert set(f.keys()) == set(tensors)
        for key in f.keys():
            t = f.get_tensor(key)
            assert tuple(t.shape) == tensors[key].shape
            raw = t.contiguous().view(torch.uint8).numpy().tobytes()
            assert raw == np.ascontiguousarray(tensors[key]).tobytes(), key


def test_payload_layout_follows_the_format(store):
    tensors = {
        "b_f32": np.arange(3, dtype=np.float32),
        "a_f32": np.arange(5, dtype=np.float32),
        "z_u8": np.arange(7, dtype=np.uint8),
        "m_f64": np.arange(2, dtype=np.float64),
        "c_i16": np.arange(3, dtype=np.int16),
        "e_bool": np.ones(0, dtype=bool),
    }
    store.save("m", "1.0", tensors)
    path = store.path("m", "1.0")
    raw = path.read_bytes()
    n, header = _header(path)
    assert (8 + n) % 8 == 0
    text = raw[8 : 8 + n].decode("utf-8")
    assert text == text.rstrip(" ") + " " * (len(text) - len(text.rstrip(" ")))
    assert ": " not in text and ", " not in text, "header must carry no insignificant whitespace"
    assert "__metadata__" not in header
    itemsize = {"F64": 8, "F32": 4, "I16": 2, "U8": 1, "BOOL": 1}
    expected_order = sorted(header, key=lambda k: (-itemsize[header[k]["dtype"]], k))
    assert list(header) == expected_order == ["m_f64", "a_f32", "b_f32", "c_i16", "e_bool", "z_u8"]
    offset = 0
    for key in header:
        begin, end = header[key]["data_offsets"]
        assert begin == offset
        offset = end
    assert 8 + n + offset == len(raw)


def test_big_endian_is_stored_little_endian(store):
    values = np.array([1.5, -2.25, 3.0e10], dtype=">f8")
    store.save("m", "1.0", {"x": values})
    raw = store.path("m", "1.0").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert raw[8 + n :] == values.astype("<f8").tobytes()
    loaded = store.load("m", "1.0")["x"]
    assert loaded.dtype == np.dtype("<f8")
    assert loaded.tolist() == [1.5, -2.25, 3.0e10]


def test_object_file_is_readonly_and_named_by_sha256(store, make_tensors):
    result = store.save("m", "1.0", make_tensors(1))
    path = store.path("m", "1.0")
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == result.oid
    assert path == store.root / "objects" / "sha256" / result.oid[:2] / result.oid[2:]
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    info = store.info("m", "1.0")
    assert info.oid == result.oid
    assert info.blake3 == blake3.blake3(data).hexdigest()
    assert info.size == len(data) == result.size


def test_loaded_arrays_are_independent_of_the_store(store, make_tensors, assert_tensors_equal):
    tensors = make_tensors(3)
    store.save("m", "1.0", tensors)
    first = store.load("m", "1.0")
    for array in first.values():
        array[...] = 0
    assert_tensors_equal(tensors, store.load("m", "1.0"))
    assert_tensors_equal(tensors, store.load("m", "1.0", mmap=True))


def test_empty_model_round_trips(store):
    result = store.save("m", "1.0", {})
    assert store.load("m", "1.0") == {}
    assert store.load("m", "1.0", mmap=True, verify="full") == {}
    with safe_open(str(store.path("m", "1.0")), "np") as f:
        assert list(f.keys()) == []
    assert result.size % 8 == 0


def test_bad_verify_mode_is_refused(store, make_tensors):
    store.save("m", "1.0", make_tensors(1))
    with pytest.raises(HydraError, match="verify"):
        store.load("m", "1.0", verify="sometimes")


# --------------------------------------------------------------------------- determinism and dedup


def test_dict_order_does_not_change_the_oid(store_factory, make_tensors):
    tensors = make_tensors(7, n=5)
    tensors["bias"] = np.arange(3, dtype=np.int64)
    tensors["mask"] = np.array([True, False])
    keys = list(tensors)
    orders = [keys, keys[::-1], sorted(keys), sorted(keys, key=lambda k: hash(k) % 97)]
    oids = set()
    for i, order in enumerate(orders):
        s = store_factory(f"s{i}")
        oids.add(s.save("m", "1.0", {k: tensors[k] for k in order}).oid)
    assert len(oids) == 1


def test_memory_layout_and_byte_order_do_not_change_the_oid(store_factory):
    values = np.arange(24, dtype=np.float32).reshape(4, 6) * 0.5
    layouts = {
        "c": values,
        "fortran": np.asfortranarray(values),
        "big_endian": values.astype(">f4"),
        "sliced": np.repeat(values, 2, axis=1)[:, ::2],
    }
    oids = {name: store_factory(name).save("m", "1", {"w": arr}).oid for name, arr in layouts.items()}
    assert len(set(oids.values())) == 1, oids


def test_different_values_give_different_oids(store, make_tensors):
    a = store.save("m", "1.0", make_tensors(1)).oid
    b = store.save("m", "2.0", make_tensors(2)).oid
    c = store.save("m", "3.0", {k: v.astype(np.float64) for k, v in make_tensors(1).items()}).oid
    d = store.save("m", "4.0", {k.upper(): v for k, v in make_tensors(1).items()}).oid
    assert len({a, b, c, d}) == 4


def test_negative_zero_is_not_positive_zero(store):
    """Content addressing is by bytes: -0.0 == 0.0 numerically but is another payload."""
    pos = store.save("m", "1.0", {"x": np.zeros(3, np.float32)}).oid
    neg = store.save("m", "2.0", {"x": -np.zeros(3, np.float32)}).oid
    assert pos != neg
    assert np.signbit(store.load("m", "2.0")["x"]).all()


def test_resaving_mmap_loaded_arrays_deduplicates(store, make_tensors, objects_of):
    first = store.save("m", "1.0", make_tensors(4))
    loaded = store.load("m", "1.0", mmap=True)
    assert not any(a.flags.writeable for a in loaded.values())
    again = store.save("copy", "1.0", loaded)
    transposed = store.save("copy", "2.0", {k: v.T for k, v in loaded.items()})
    assert again.oid == first.oid and again.deduplicated
    assert transposed.oid != first.oid
    assert len(objects_of(store)) == 2


def test_dedup_across_names_and_versions(store, make_tensors, objects_of):
    tensors = make_tensors(11)
    first = store.save("alpha", "1.0.0", tensors)
    assert first.deduplicated is False and first.unchanged is False
    second = store.save("beta", "2.0.0", dict(reversed(list(tensors.items()))))
    third = store.save("alpha", "1.1.0", {k: v.copy() for k, v in tensors.items()})
    for r in (second, third):
        assert r.deduplicated is True
        assert r.unchanged is False
        assert r.oid == first.oid
    assert len(objects_of(store)) == 1
    assert [v.ref for v in store.list()] == ["alpha:1.0.0", "alpha:1.1.0", "beta:2.0.0"]
    assert not list((store.root / "tmp").iterdir())
    assert not list((store.root / "intents").iterdir())


def test_metadata_lives_in_the_manifest_not_the_payload(store, make_tensors, objects_of, read_manifest):
    tensors = make_tensors(5)
    a = store.save("m", "1.0", tensors, metadata={"description": "first-marker-XYZ", "lr": 0.1})
    b = store.save("m", "2.0", tensors, metadata={"description": "second-marker-QRS", "tags": ["a", "b"]})
    c = store.save("m", "3.0", tensors)
    assert a.oid == b.oid == c.oid
    assert len(objects_of(store)) == 1
    payload = store.path("m", "1.0").read_bytes()
    assert b"marker" not in payload and b"__metadata__" not in payload
    assert store.info("m", "1.0").metadata == {"description": "first-marker-XYZ", "lr": 0.1}
    assert store.info("m", "2.0").metadata == {"description": "second-marker-QRS", "tags": ["a", "b"]}
    assert store.info("m", "3.0").metadata == {}
    doc = read_manifest(store)
    assert doc["models"]["m"]["versions"]["1.0"]["metadata"]["description"] == "first-marker-XYZ"


# --------------------------------------------------------------------------- immutability


def _state(store: Store) -> dict[str, bytes | list[str]]:
    root = store.root
    return {
        "manifest": (root / "manifest.json").read_bytes(),
        "journal": (root / "journal.jsonl").read_bytes(),
        "objects": sorted(str(p.relative_to(root)) for p in (root / "objects").rglob("*")),
        "tmp": sorted(p.name for p in (root / "tmp").iterdir()),
        "intents": sorted(p.name for p in (root / "intents").iterdir()),
    }


@pytest.mark.parametrize("again", ["1.0.0", "1.0", "1"])
def test_same_bytes_again_is_a_noop(store, make_tensors, snapshot, again):
    tensors = make_tensors(1)
    first = store.save("m", "1.0.0", tensors, metadata={"k": 1})
    before = snapshot(store.root)
    result = store.save("m", again, {k: tensors[k] for k in reversed(list(tensors))}, metadata={"k": 2})
    assert result.unchanged is True
    assert result.deduplicated is True
    assert result.oid == first.oid
    assert result.version == "1.0.0"
    assert snapshot(store.root) == before
    assert store.info("m", "1.0.0").metadata == {"k": 1}


@pytest.mark.parametrize("again", ["1.0.0", "1.0", "1.0.0.0"])
def test_different_bytes_raise_and_write_nothing(store, make_tensors, snapshot, assert_tensors_equal, again):
    original = make_tensors(1)
    store.save("m", "1.0.0", original)
    store.save("other", "1.0.0", make_tensors(9))
    before_state = _state(store)
    before = snapshot(store.root)
    with pytest.raises(VersionExistsError) as excinfo:
        store.save("m", again, make_tensors(2))
    assert isinstance(excinfo.value, ValueError)
    assert isinstance(excinfo.value, HydraError)
    assert "m:1.0.0" in str(excinfo.value)
    assert _state(store) == before_state
    assert snapshot(store.root) == before
    assert_tensors_equal(original, store.load("m", "1.0.0", verify="full"))


def test_version_is_free_again_after_delete(store, make_tensors, assert_tensors_equal):
    store.save("m", "1.0", make_tensors(1))
    store.delete("m", "1.0")
    store.save("m", "1.0", make_tensors(2))
    assert_tensors_equal(make_tensors(2), store.load("m", "1.0"))


# --------------------------------------------------------------------------- corruption


@pytest.fixture
def saved(store):
    tensors = {"w": np.arange(64, dtype=np.float32) + 0.5, "b": np.arange(8, dtype=np.int64)}
    result = store.save("m", "1.0", tensors)
    store.save("m", "2.0", {"w": np.zeros(4, dtype=np.float32)})
    return store, tensors, result


def _critical(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.CRITICAL]


@pytest.mark.parametrize("mmap_mode", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("verify", ["fast", "full"])
@pytest.mark.parametrize("how", ["flip", "flip_header", "truncate", "delete"])
def test_corruption_is_detected(saved, corrupt, caplog, how, verify, mmap_mode):
    store, _, result = saved
    path = store.path("m", "1.0")
    info = store.info("m", "1.0")
    if how == "flip_header":
        corrupt(path, "flip", offset=12)
    else:
        corrupt(path, how)
    caplog.clear()
    with pytest.raises(IntegrityError) as excinfo:
        store.load("m", "1.0", verify=verify, mmap=mmap_mode)
    err = excinfo.value
    assert isinstance(err, ValueError)
    assert err.ref == "m:1.0"
    assert err.oid == result.oid
    assert "m:1.0" in str(err) and result.oid in str(err)
    if how.startswith("flip"):
        expected = info.blake3 if verify == "fast" else info.oid
        assert err.expected == expected
        assert err.actual is not None and len(err.actual) == 64 and err.actual != expected
        assert err.actual in str(err) and expected in str(err)
    if how == "truncate":
        assert err.expected is not None and err.actual is not None and err.expected != err.actual
    records = _critical(caplog)
    assert records, "no CRITICAL log record for a corrupt object"
    assert all("m:1.0" in r.getMessage() and result.oid in r.getMessage() for r in records)
    # the other version of the model is untouched and still loads
    assert store.load("m", "2.0", verify=verify, mmap=mmap_mode)["w"].tolist() == [0.0] * 4


@pytest.mark.parametrize("mmap_mode", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("verify", ["fast", "full"])
@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
def test_corrupt_load_is_reported_once(saved, corrupt, caplog, how, verify, mmap_mode):
    """One failed load is one incident: one CRITICAL record, and a message that
    names the ref once (not "m:1.0: checksum mismatch for m:1.0: ...")."""
    store, _, _ = saved
    corrupt(store.path("m", "1.0"), how)
    caplog.clear()
    with pytest.raises(IntegrityError) as excinfo:
        store.load("m", "1.0", verify=verify, mmap=mmap_mode)
    records = _critical(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert str(excinfo.value).count("m:1.0") == 1, str(excinfo.value)


@pytest.mark.parametrize("mmap_mode", [False, True], ids=["read", "mmap"])
def test_verify_none_returns_flipped_data(saved, corrupt, mmap_mode):
    store, tensors, _ = saved
    corrupt(store.path("m", "1.0"), "flip")  # the last byte of the data section
    loaded = store.load("m", "1.0", verify="none", mmap=mmap_mode)
    raw = {k: np.ascontiguousarray(v).tobytes() for k, v in tensors.items()}
    got = {k: loaded[k].tobytes() for k in loaded}
    differing = [k for k in raw if raw[k] != got[k]]
    assert len(differing) == 1
    a, b = raw[differing[0]], got[differing[0]]
    assert sum(x != y for x, y in zip(a, b, strict=True)) == 1


@pytest.mark.parametrize("mmap_mode", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_verify_none_still_refuses_truncated_or_missing(saved, corrupt, caplog, how, mmap_mode):
    store, _, result = saved
    corrupt(store.path("m", "1.0"), how)
    with pytest.raises(IntegrityError) as excinfo:
        store.load("m", "1.0", verify="none", mmap=mmap_mode)
    assert excinfo.value.ref == "m:1.0"
    assert excinfo.value.oid == result.oid
    assert len(_critical(caplog)) == 1


def test_integrity_error_survives_pickling(saved, corrupt):
    store, _, result = saved
    corrupt(store.path("m", "1.0"), "flip")
    with pytest.raises(IntegrityError) as excinfo:
        store.load("m", "1.0", verify="full")
    clone = pickle.loads(pickle.dumps(excinfo.value))
    assert type(clone) is IntegrityError
    assert (clone.ref, clone.oid, clone.expected, clone.actual) == (
        "m:1.0",
        result.oid,
        excinfo.value.expected,
        excinfo.value.actual,
    )
    assert str(clone) == str(excinfo.value)


def test_export_of_corrupt_object_refuses(saved, corrupt, tmp_path):
    store, _, _ = saved
    corrupt(store.path("m", "1.0"), "flip")
    dest = tmp_path / "out.safetensors"
    with pytest.raises(IntegrityError):
        store.export("m", "1.0", dest)
    assert not dest.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hydra-export")]


# --------------------------------------------------------------------------- load_many


@pytest.fixture
def many(store, make_tensors, corrupt):
    contents = {
        ("a", "1.0.0"): make_tensors(1),
        ("a", "2.0.0"): make_tensors(2),
        ("b", "2.1.0"): make_tensors(3, dtype=np.float64),
        ("c", "1.0.0"): make_tensors(4, n=1),
        ("org/d", "0.1.0"): {"x": np.arange(5, dtype=np.int16)},
    }
    for (name, version), tensors in contents.items():
        store.save(name, version, tensors)
    corrupt(store.path("c", "1.0.0"), "flip")
    return store, contents


def test_load_many_isolates_failures(many, assert_tensors_equal):
    store, contents = many
    requests = [
        ("a", "1.0.0"),
        ("b", "latest"),
        "a:2.0",
        ("a", "9.9.9"),
        ("c", "1.0.0"),
        ("nope", "1.0"),
        "org/d",
    ]
    results = store.load_many(requests)
    assert set(results) == {"a:1.0.0", "b:latest", "a:2.0", "a:9.9.9", "c:1.0.0", "nope:1.0", "org/d:latest"}
    for label, r in results.items():
        assert isinstance(r, LoadResult)
        assert r.request == label
    ok = {k for k, r in results.items() if r.ok}
    assert ok == {"a:1.0.0", "b:latest", "a:2.0", "org/d:latest"}
    assert results["b:latest"].version == "2.1.0"
    assert results["a:2.0"].version == "2.0.0"
    assert_tensors_equal(contents[("a", "1.0.0")], results["a:1.0.0"].unwrap())
    assert_tensors_equal(contents[("b", "2.1.0")], results["b:latest"].unwrap())
    assert_tensors_equal(contents[("a", "2.0.0")], results["a:2.0"].unwrap())
    assert_tensors_equal(contents[("org/d", "0.1.0")], results["org/d:latest"].unwrap())
    assert isinstance(results["a:9.9.9"].error, NotFoundError)
    assert isinstance(results["nope:1.0"].error, NotFoundError)
    assert isinstance(results["c:1.0.0"].error, IntegrityError)
    assert results["c:1.0.0"].tensors is None
    with pytest.raises(IntegrityError):
        results["c:1.0.0"].unwrap()
    with pytest.raises(NotFoundError):
        results["a:9.9.9"].unwrap()


@pytest.mark.parametrize("mmap_mode", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("workers", [1, 3, 16])
def test_load_many_equals_sequential(many, assert_tensors_equal, workers, mmap_mode):
    store, contents = many
    requests = [(n, v) for (n, v) in contents if n != "c"] * 3
    parallel = store.load_many(requests, max_workers=workers, verify="full", mmap=mmap_mode)
    assert set(parallel) == {f"{n}:{v}" for n, v in requests}
    for name, version in requests:
        sequential = store.load(name, version, verify="full")
        assert_tensors_equal(sequential, parallel[f"{name}:{version}"].unwrap())


def test_load_many_of_nothing(store):
    assert store.load_many([]) == {}


# --------------------------------------------------------------------------- streaming


def test_payload_bytes_do_not_depend_on_chunk_size():
    from hydra_cas.payload import build_header, iter_data, prepare

    sources = prepare(
        {
            "a": np.arange(35, dtype=">i4").reshape(5, 7).T,
            "b": np.arange(12, dtype=np.float64)[::3],
            "c": big_endian(sample("float16", 3, 5)),
            "d": np.array(7, dtype=">u8"),
            "e": np.zeros((0, 2), np.float32),
        }
    )
    reference = b"".join(bytes(c) for c in iter_data(sources))
    assert len(reference) == sum(s.nbytes for s in sources)
    for chunk in (1, 2, 3, 7, 8, 13, 64, 1 << 20):
        chunks = [bytes(c) for c in iter_data(sources, chunk_bytes=chunk)]
        assert b"".join(chunks) == reference, chunk
    header = build_header(sources)
    assert len(header) % 8 == 0


def test_multi_chunk_payload_round_trips(store):
    """~36 MB, non-contiguous and big-endian: several 16 MiB slabs on save and
    more than one 32 MiB read chunk on load, with threaded hashing."""
    big = np.arange(3000 * 3000, dtype=">f4").reshape(3000, 3000).T
    tensors = {"x": big, "y": np.arange(10, dtype=np.int8)}
    result = store.save("big", "1.0", tensors)
    path = store.path("big", "1.0")
    assert result.size == path.stat().st_size > 32 * 1024 * 1024
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest() if hasattr(hashlib, "file_digest") else None
    if digest is not None:
        assert digest == result.oid
    for verify in ("fast", "full"):
        for mmap_mode in (False, True):
            loaded = store.load("big", "1.0", verify=verify, mmap=mmap_mode)
            np.testing.assert_array_equal(loaded["x"], big)
            np.testing.assert_array_equal(loaded["y"], tensors["y"])
