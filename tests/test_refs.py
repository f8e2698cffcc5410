"""Version resolution (latest, exact, specifiers), aliases and delete."""

from __future__ import annotations

import numpy as np
import pytest

from hydra_cas import (
    HydraError,
    InvalidNameError,
    InvalidVersionError,
    NotFoundError,
)
from hydra_cas.refs import canonical_version, check_alias, latest_of, split_ref


def _t(i: int) -> dict[str, np.ndarray]:
    return {"w": np.full(3, float(i), dtype=np.float32)}


def _fill(store, name: str, versions: list[str]) -> None:
    for i, v in enumerate(versions):
        store.save(name, v, _t(i))


# --------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("1.0.0", "1.0.0"),
        ("1.0", "1.0"),
        ("v1.2.3", "1.2.3"),
        ("1.0.0-rc.1", "1.0.0rc1"),
        ("1.0.0-alpha.1", "1.0.0a1"),
        ("2.1.0RC1", "2.1.0rc1"),
        ("1.0.post2", "1.0.post2"),
        ("1.0.dev3", "1.0.dev3"),
        ("01.002.0003", "1.2.3"),
        ("1!2.0", "1!2.0"),
    ],
)
def test_canonical_version(given, canonical):
    assert canonical_version(given) == canonical


@pytest.mark.parametrize(
    ("versions", "latest"),
    [
        (["1.9.0", "1.10.0", "1.2.0"], "1.10.0"),
        (["1.0.0", "2.0.0rc1", "2.0.0b1"], "1.0.0"),
        (["1.0.0a1", "1.0.0rc1", "1.0.0b2"], "1.0.0rc1"),
        (["0.9", "1.0.dev1"], "0.9"),
        (["1.0", "1.0.post1"], "1.0.post1"),
        (["1.0.0"], "1.0.0"),
        ([], None),
    ],
)
def test_latest_of(versions, latest):
    assert latest_of(versions) == latest


def test_split_ref():
    assert split_ref("m:1.0") == ("m", "1.0")
    assert split_ref("org/m") == ("org/m", "latest")
    with pytest.raises(InvalidVersionError):
        split_ref("m:")
    with pytest.raises(InvalidNameError):
        split_ref("../m:1.0")


# --------------------------------------------------------------------------- latest


def test_latest_uses_pep440_order_not_string_order(store):
    _fill(store, "m", ["1.9.0", "1.10.0", "1.2.0", "0.99.0"])
    assert store.resolve("m") == "1.10.0"
    assert store.resolve("m", "latest") == "1.10.0"
    np.testing.assert_array_equal(store.load("m")["w"], _t(1)["w"])
    assert store.info("m").is_latest is True
    assert [v.version for v in store.list("m")] == ["0.99.0", "1.2.0", "1.9.0", "1.10.0"]
    assert [v.is_latest for v in store.list("m")] == [False, False, False, True]


def test_prereleases_only_when_nothing_else_exists(store):
    _fill(store, "m", ["2.0.0rc1", "1.0.0b1"])
    assert store.resolve("m") == "2.0.0rc1"
    store.save("m", "0.5.0", _t(9))
    assert store.resolve("m") == "0.5.0"
    store.save("m", "3.0.0.dev1", _t(8))
    assert store.resolve("m") == "0.5.0"
    store.save("m", "2.0.0", _t(7))
    assert store.resolve("m") == "2.0.0"


def test_semver_input_is_normalised(store):
    result = store.save("m", "1.0.0-rc.1", _t(1))
    assert result.version == "1.0.0rc1"
    assert store.resolve("m", "1.0.0-rc.1") == "1.0.0rc1"
    assert store.resolve("m", "1.0.0rc1") == "1.0.0rc1"
    assert [v.version for v in store.list()] == ["1.0.0rc1"]


# --------------------------------------------------------------------------- exact and equivalent


@pytest.mark.parametrize("stored", ["1.0", "1.0.0"])
@pytest.mark.parametrize("asked", ["1.0", "1.0.0", "1", "1.0.0.0", "v1.0"])
def test_equivalent_spellings_resolve(store, stored, asked):
    store.save("m", stored, _t(1))
    store.save("m", "1.0.1", _t(2))
    assert store.resolve("m", asked) == stored
    np.testing.assert_array_equal(store.load("m", asked)["w"], _t(1)["w"])


def test_exact_version_and_missing_version(store):
    _fill(store, "m", ["1.0.0", "1.1.0", "2.0.0"])
    assert store.resolve("m", "1.1.0") == "1.1.0"
    with pytest.raises(NotFoundError) as excinfo:
        store.load("m", "1.2.0")
    assert isinstance(excinfo.value, KeyError)
    assert "2.0.0" in str(excinfo.value)  # lists what exists


def test_missing_model_suggests_close_names(store):
    store.save("resnet-50", "1.0", _t(1))
    with pytest.raises(NotFoundError) as excinfo:
        store.load("resnet-5O", "1.0")
    assert "resnet-50" in str(excinfo.value)


def test_unknown_word_is_not_found(store):
    store.save("m", "1.0", _t(1))
    with pytest.raises(NotFoundError):
        store.resolve("m", "production")


# --------------------------------------------------------------------------- specifiers


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (">=1.0,<2", "1.10.0"),
        (">=1.0, <2", "1.10.0"),
        ("<1.9", "1.2.0"),
        ("~=1.2", "1.10.0"),
        ("==1.9.*", "1.9.0"),
        ("==2.0.0", "2.0.0"),
        ("!=2.0.0", "1.10.0"),
        (">2.0.0", "3.0.0rc1"),  # only a pre-release matches: it is used
    ],
)
def test_specifiers(store, spec, expected):
    _fill(store, "m", ["1.2.0", "1.9.0", "1.10.0", "2.0.0", "3.0.0rc1"])
    assert store.resolve("m", spec) == expected


def test_specifier_matching_nothing(store):
    _fill(store, "m", ["1.0", "2.0"])
    with pytest.raises(NotFoundError):
        store.resolve("m", ">=3")


@pytest.mark.parametrize("spec", [">>1", "=<1.0,", ">=1.0,<x"])
def test_invalid_specifier(store, spec):
    store.save("m", "1.0", _t(1))
    with pytest.raises(InvalidVersionError) as excinfo:
        store.resolve("m", spec)
    assert isinstance(excinfo.value, ValueError)


# --------------------------------------------------------------------------- aliases


def test_alias_set_move_remove(store, read_manifest):
    _fill(store, "m", ["1.0.0", "1.1.0", "2.0.0"])
    assert store.set_alias("m", "champion", "1.1") == "1.1.0"
    assert store.resolve("m", "champion") == "1.1.0"
    np.testing.assert_array_equal(store.load("m", "champion")["w"], _t(1)["w"])
    assert store.info("m", "1.1.0").aliases == ("champion",)
    assert read_manifest(store)["models"]["m"]["aliases"] == {"champion": "1.1.0"}

    assert store.set_alias("m", "champion", "latest") == "2.0.0"
    assert store.resolve("m", "champion") == "2.0.0"
    assert store.info("m", "1.1.0").aliases == ()
    # an alias is pinned to a version, not re-evaluated
    store.save("m", "3.0.0", _t(3))
    assert store.resolve("m", "champion") == "2.0.0"

    store.set_alias("m", "prod", "champion")
    assert store.info("m", "2.0.0").aliases == ("champion", "prod")

    store.remove_alias("m", "champion")
    with pytest.raises(NotFoundError):
        store.resolve("m", "champion")
    assert store.resolve("m", "prod") == "2.0.0"
    with pytest.raises(NotFoundError):
        store.remove_alias("m", "champion")


def test_aliases_are_per_model(store):
    store.save("m", "1.0", _t(1))
    store.save("n", "2.0", _t(2))
    store.set_alias("m", "prod", "1.0")
    store.set_alias("n", "prod", "2.0")
    assert store.resolve("m", "prod") == "1.0"
    assert store.resolve("n", "prod") == "2.0"


def test_setting_same_alias_again_writes_nothing(store, snapshot):
    store.save("m", "1.0", _t(1))
    store.set_alias("m", "prod", "1.0")
    before = snapshot(store.root)
    assert store.set_alias("m", "prod", "1.0") == "1.0"
    assert snapshot(store.root) == before


@pytest.mark.parametrize(("model", "target"), [("m", "9.0"), ("m", ">=5"), ("ghost", "1.0")])
def test_alias_to_missing_version_fails_and_writes_nothing(store, snapshot, model, target):
    store.save("m", "1.0", _t(1))
    before = snapshot(store.root)
    with pytest.raises(NotFoundError):
        store.set_alias(model, "prod", target)
    assert snapshot(store.root) == before


@pytest.mark.parametrize(
    "alias",
    [
        "latest",
        "1.0",
        "2",
        "v2",
        "V1.0",
        "1.0.0rc1",
        "",
        "9lives",
        "-x",
        "_x",
        "a b",
        "a.b",
        "a/b",
        "a" * 65,
        "é",
        5,
        None,
    ],
)
def test_bad_alias_names_are_refused(store, snapshot, alias):
    store.save("m", "1.0", _t(1))
    before = snapshot(store.root)
    with pytest.raises(InvalidNameError) as excinfo:
        store.set_alias("m", alias, "1.0")
    assert isinstance(excinfo.value, ValueError)
    assert snapshot(store.root) == before


@pytest.mark.parametrize("alias", ["champion", "prod", "Latest", "rc", "a" * 64, "x-1_y"])
def test_good_alias_names(store, alias):
    store.save("m", "1.0", _t(1))
    assert check_alias(alias) == alias
    store.set_alias("m", alias, "1.0")
    assert store.resolve("m", alias) == "1.0"


# --------------------------------------------------------------------------- delete


def test_delete_keeps_object_and_moves_latest_back(store, objects_of):
    _fill(store, "m", ["1.0.0", "2.0.0"])
    path = store.path("m", "2.0.0")
    assert store.resolve("m") == "2.0.0"
    assert store.delete("m", "2.0") == "2.0.0"
    assert store.resolve("m") == "1.0.0"
    np.testing.assert_array_equal(store.load("m")["w"], _t(0)["w"])
    with pytest.raises(NotFoundError):
        store.load("m", "2.0.0")
    assert path.exists(), "delete must leave the object for gc"
    assert len(objects_of(store)) == 2
    assert [v.ref for v in store.list()] == ["m:1.0.0"]


def test_delete_latest_keyword(store):
    _fill(store, "m", ["1.0", "2.0", "3.0rc1"])
    assert store.delete("m", "latest") == "2.0"
    assert store.resolve("m") == "1.0"


def test_delete_last_version_removes_the_model(store):
    store.save("m", "1.0", _t(1))
    store.save("keep", "1.0", _t(2))
    store.delete("m", "1.0")
    assert store.models() == ["keep"]
    with pytest.raises(NotFoundError):
        store.load("m")
    with pytest.raises(NotFoundError):
        store.list("m")


def test_delete_missing(store, snapshot):
    store.save("m", "1.0", _t(1))
    before = snapshot(store.root)
    with pytest.raises(NotFoundError):
        store.delete("m", "2.0")
    with pytest.raises(NotFoundError):
        store.delete("ghost", "1.0")
    assert snapshot(store.root) == before


def test_delete_of_aliased_version_needs_force(store, snapshot):
    _fill(store, "m", ["1.0", "2.0"])
    store.set_alias("m", "prod", "2.0")
    store.set_alias("m", "canary", "2.0")
    store.set_alias("m", "old", "1.0")
    before = snapshot(store.root)
    with pytest.raises(HydraError) as excinfo:
        store.delete("m", "2.0")
    assert "canary" in str(excinfo.value) and "prod" in str(excinfo.value)
    with pytest.raises(HydraError):
        store.delete("m", "prod")  # naming the alias does not get around it
    assert snapshot(store.root) == before
    assert store.resolve("m", "prod") == "2.0"

    assert store.delete("m", "2.0", force=True) == "2.0"
    for alias in ("prod", "canary"):
        with pytest.raises(NotFoundError):
            store.resolve("m", alias)
    assert store.resolve("m", "old") == "1.0"
    assert store.resolve("m") == "1.0"
