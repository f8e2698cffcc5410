"""Bad input: each is refused with the specific HydraError leaf (which is also
the matching built-in exception) before anything is written to the store."""

from __future__ import annotations

import numpy as np
import pytest

from hydra_cas import (
    HydraError,
    InvalidMetadataError,
    InvalidNameError,
    InvalidTensorError,
    InvalidVersionError,
    NotFoundError,
    StorageError,
    Store,
)

GOOD = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}


class _Opaque:
    pass


def _cycle() -> dict:
    d: dict = {}
    d["self"] = d
    return d


BAD_NAMES = [
    ("../x", "dotdot"),
    ("/abs", "absolute"),
    ("a/b/c", "two-slashes"),
    ("", "empty"),
    (".hidden", "hidden"),
    ("a\x00b", "nul"),
    ("a\nb", "newline"),
    ("a\tb", "tab"),
    ("a\x1bb", "escape"),
    ("a" * 10_000, "10k-chars"),
    ("a" * 129, "129-chars"),
    ("a b", "space"),
    ("a/", "trailing-slash"),
    ("org/../x", "inner-dotdot"),
    ("a..b", "double-dot"),
    ("-rf", "leading-dash"),
    ("m:1.0", "colon"),
    ("C:\\x", "windows"),
    (5, "int"),
    (None, "none"),
    (b"model", "bytes"),
    (["m"], "list"),
]

BAD_VERSIONS = [
    ("abc", "word"),
    ("", "empty"),
    ("1." + "0." * 40 + "0", "over-64-chars"),
    ("1.0.0" + ".0" * 30, "dotted-over-64"),
    (None, "none"),
    (1.0, "float"),
    (1, "int"),
    ("1.0 beta", "trailing-junk"),
    ("1.0\x00", "nul"),
    ("latest", "latest"),
    (">=1.0", "specifier"),
    ("../1.0", "path"),
]

BAD_TENSORS = [
    ([np.zeros(2)], "list-not-dict"),
    (None, "none"),
    (np.zeros(3), "bare-array"),
    ("weights", "string"),
    ({"a": np.array([object(), 1], dtype=object)}, "object-array"),
    ({"a": [1.0, 2.0]}, "python-list"),
    ({"a": 1.0}, "python-float"),
    ({"a": 3}, "python-int"),
    ({"a": np.float32(1.0)}, "numpy-scalar"),
    ({"a": np.int64(1)}, "numpy-int-scalar"),
    ({1: np.zeros(2)}, "int-key"),
    ({b"a": np.zeros(2)}, "bytes-key"),
    ({"__metadata__": np.zeros(2)}, "metadata-key"),
    ({"": np.zeros(2)}, "empty-key"),
    ({"a\x00b": np.zeros(2)}, "nul-in-key"),
    ({"k" * 1025: np.zeros(2)}, "key-over-1024-chars"),
    ({"a": np.array(["x", "y"])}, "unicode-array"),
    ({"a": np.zeros(2, dtype=np.complex128)}, "complex128"),
    ({"a": np.zeros(2, dtype="datetime64[s]")}, "datetime64"),
    ({"a": np.zeros(2, dtype="i4,f4")}, "structured"),
    ({"ok": np.zeros(2), "bad": [1]}, "one-bad-among-good"),
]
if hasattr(np, "float128") and np.dtype(np.longdouble).itemsize > 8:
    BAD_TENSORS.append(({"a": np.zeros(2, dtype=np.longdouble)}, "longdouble"))

BAD_METADATA = [
    ({"a": {1, 2}}, "set"),
    ({"a": _Opaque()}, "object"),
    ({"a": float("nan")}, "nan"),
    ({"a": float("inf")}, "inf"),
    ({"a": np.float32(1.0)}, "numpy-scalar"),
    ({1: "x"}, "int-key"),
    ({"a": {2: "x"}}, "nested-int-key"),
    ({None: "x"}, "none-key"),
    ({(1, 2): "x"}, "tuple-key"),
    ({"a": "x" * (1 << 20)}, "over-1MiB"),
    (["a"], "list"),
    ("description", "string"),
    (_cycle(), "cycle"),
    ({"a": b"bytes"}, "bytes-value"),
]


@pytest.fixture
def populated(store):
    store.save("m", "1.0", GOOD, metadata={"ok": True})
    store.set_alias("m", "prod", "1.0")
    return store


def _refused(populated, snapshot, call, leaf: type[HydraError], builtin: type[BaseException]):
    before = snapshot(populated.root)
    with pytest.raises(leaf) as excinfo:
        call()
    assert isinstance(excinfo.value, HydraError)
    assert isinstance(excinfo.value, builtin)
    assert type(excinfo.value) is leaf
    assert str(excinfo.value)
    assert snapshot(populated.root) == before, "a refused call changed the store"
    return excinfo.value


@pytest.mark.parametrize("name", [pytest.param(n, id=i) for n, i in BAD_NAMES])
def test_bad_names_on_save(populated, snapshot, name):
    _refused(populated, snapshot, lambda: populated.save(name, "2.0", GOOD), InvalidNameError, ValueError)


@pytest.mark.parametrize("name", [pytest.param(n, id=i) for n, i in BAD_NAMES])
def test_bad_names_on_other_calls(populated, snapshot, name):
    calls = {
        "load": lambda: populated.load(name, "1.0"),
        "load_mmap": lambda: populated.load(name, "1.0", mmap=True),
        "resolve": lambda: populated.resolve(name, "1.0"),
        "info": lambda: populated.info(name, "1.0"),
        "list": lambda: populated.list(name),
        "delete": lambda: populated.delete(name, "1.0", force=True),
        "set_alias": lambda: populated.set_alias(name, "prod", "1.0"),
        "remove_alias": lambda: populated.remove_alias(name, "prod"),
        "path": lambda: populated.path(name, "1.0"),
    }
    if name is None:
        del calls["list"]  # list(None) means "every model"
    for op, call in calls.items():
        try:
            _refused(populated, snapshot, call, InvalidNameError, ValueError)
        except (Exception, pytest.fail.Exception) as exc:  # name the operation in the failure
            raise AssertionError(f"{op}({name!r:.40}): {exc!r}") from exc


def test_long_message_is_shortened(populated, snapshot):
    err = _refused(
        populated, snapshot, lambda: populated.save("a" * 10_000, "2.0", GOOD), InvalidNameError, ValueError
    )
    assert len(str(err)) < 500


@pytest.mark.parametrize("version", [pytest.param(v, id=i) for v, i in BAD_VERSIONS])
@pytest.mark.parametrize("model", ["m", "fresh"])
def test_bad_versions(populated, snapshot, version, model):
    _refused(
        populated, snapshot, lambda: populated.save(model, version, GOOD), InvalidVersionError, ValueError
    )


@pytest.mark.parametrize("tensors", [pytest.param(t, id=i) for t, i in BAD_TENSORS])
def test_bad_tensors(populated, snapshot, tensors):
    _refused(populated, snapshot, lambda: populated.save("m", "2.0", tensors), InvalidTensorError, TypeError)


@pytest.mark.parametrize("metadata", [pytest.param(m, id=i) for m, i in BAD_METADATA])
def test_bad_metadata(populated, snapshot, metadata):
    _refused(
        populated,
        snapshot,
        lambda: populated.save("m", "2.0", GOOD, metadata=metadata),
        InvalidMetadataError,
        ValueError,
    )


@pytest.mark.parametrize(
    ("model", "parent"),
    [("m", "9.9"), ("m", ">=5"), ("m", "nosuchalias"), ("fresh", "1.0"), ("fresh", "latest")],
)
def test_parent_that_does_not_exist(populated, snapshot, model, parent):
    _refused(
        populated,
        snapshot,
        lambda: populated.save(model, "2.0", GOOD, parent=parent),
        NotFoundError,
        KeyError,
    )


@pytest.mark.parametrize("parent", [1, 1.0, ["1.0"]])
def test_parent_of_wrong_type(populated, snapshot, parent):
    _refused(
        populated,
        snapshot,
        lambda: populated.save("m", "2.0", GOOD, parent=parent),
        InvalidVersionError,
        ValueError,
    )


def test_good_parent_is_recorded(populated):
    populated.save("m", "2.0", {"w": np.ones(2)}, parent="prod")
    populated.save("m", "3.0", {"w": np.ones(3)}, parent="latest")
    assert populated.info("m", "2.0").parent == "1.0"
    assert populated.info("m", "3.0").parent == "2.0"
    assert populated.info("m", "1.0").parent is None


def test_refused_save_on_a_fresh_store_writes_nothing(store_factory, snapshot):
    s = store_factory()
    before = snapshot(s.root)
    for call in (
        lambda: s.save("../x", "1.0", GOOD),
        lambda: s.save("m", "abc", GOOD),
        lambda: s.save("m", "1.0", {"a": [1]}),
        lambda: s.save("m", "1.0", GOOD, metadata={"a": {1}}),
        lambda: s.save("m", "1.0", GOOD, parent="0.9"),
    ):
        with pytest.raises(HydraError):
            call()
    assert snapshot(s.root) == before
    assert not (s.root / "manifest.json").exists()
    assert not (s.root / "journal.jsonl").exists()


# --------------------------------------------------------------------------- edge cases that MUST work


@pytest.mark.parametrize(
    "tensors",
    [
        pytest.param({"e": np.zeros((0,), np.float32)}, id="zero-size"),
        pytest.param({"e": np.zeros((3, 0, 2), np.int64)}, id="zero-size-3d"),
        pytest.param({"s": np.array(2.5, np.float64)}, id="0-d"),
        pytest.param({"s": np.array(True)}, id="0-d-bool"),
        pytest.param(
            {"e": np.zeros((0, 4), np.float16), "s": np.array(-7, np.int8), "w": np.ones(3)}, id="mixed"
        ),
    ],
)
def test_zero_size_and_0d_arrays_work(store, assert_tensors_equal, tensors):
    store.save("m", "1.0", tensors)
    for mmap_mode in (False, True):
        for verify in ("fast", "full", "none"):
            assert_tensors_equal(tensors, store.load("m", "1.0", verify=verify, mmap=mmap_mode))


@pytest.mark.parametrize(
    "name", ["m", "M0", "a" * 128, "org/model", "Org_1/model-2.v3", "0", "a.b-c_d", "x" * 60 + "/" + "y" * 67]
)
def test_good_names(store, name):
    store.save(name, "1.0", GOOD)
    assert store.resolve(name) == "1.0"


def test_metadata_just_under_the_limit_works(store):
    payload = "x" * ((1 << 20) - 20)
    store.save("m", "1.0", GOOD, metadata={"p": payload})
    assert store.info("m", "1.0").metadata["p"] == payload


def test_metadata_is_copied_not_referenced(store):
    meta = {"tags": ["a"], "nested": {"k": 1}}
    store.save("m", "1.0", GOOD, metadata=meta)
    meta["tags"].append("b")
    meta["nested"]["k"] = 2
    assert store.info("m", "1.0").metadata == {"tags": ["a"], "nested": {"k": 1}}


def test_unicode_tensor_names_and_metadata(store, assert_tensors_equal):
    tensors = {"encodeur.poids": np.ones(2), "层": np.zeros(3, np.int8), "a\nb": np.ones(1, np.uint8)}
    store.save("m", "1.0", tensors, metadata={"desc": "modèle ✓"})
    assert_tensors_equal(tensors, store.load("m", "1.0"))
    assert store.info("m", "1.0").metadata == {"desc": "modèle ✓"}


def test_store_path_that_is_a_file(tmp_path):
    target = tmp_path / "afile"
    target.write_bytes(b"not a store")
    with pytest.raises(StorageError) as excinfo:
        Store(target)
    assert isinstance(excinfo.value, OSError)
    assert target.read_bytes() == b"not a store"


def test_missing_store_with_create_false(tmp_path):
    with pytest.raises(NotFoundError):
        Store(tmp_path / "absent", create=False)
    assert not (tmp_path / "absent").exists()


def test_remote_url_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HydraError):
        Store("s3://bucket/models")
    assert list(tmp_path.iterdir()) == []
