"""Shared fixtures and helpers for the hydra_cas test-suite.

Helpers that several test files need are exposed as fixtures returning plain
functions (``make_tensors``, ``snapshot``, ``corrupt``...), so no test module has
to import this file by name.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import stat
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# The package is not installed into the venv; make the checkout importable for
# the tests and for the processes they spawn (spawn children inherit sys.path).
if importlib.util.find_spec("hydra_cas") is None:  # pragma: no cover - depends on the venv
    sys.path.insert(0, str(REPO_ROOT))

from hydra_cas import Store  # noqa: E402

# --------------------------------------------------------------------------- tensors


def make_tensors_impl(
    seed: int,
    n: int = 3,
    shape: tuple[int, ...] = (4, 8),
    dtype: Any = np.float32,
) -> dict[str, np.ndarray]:
    """``n`` small deterministic tensors whose values depend on ``seed``."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for i in range(n):
        values = rng.standard_normal(shape) * (i + 1) + seed
        out[f"layer{i}.weight"] = values.astype(dtype)
    return out


@pytest.fixture
def make_tensors() -> Callable[..., dict[str, np.ndarray]]:
    return make_tensors_impl


# --------------------------------------------------------------------------- stores


@pytest.fixture
def store_factory(tmp_path: Path) -> Callable[..., Store]:
    """``store_factory(name="store", **kwargs)`` opens ``Store(tmp_path / name)``."""

    def factory(name: str = "store", **kwargs: Any) -> Store:
        return Store(tmp_path / name, **kwargs)

    return factory


@pytest.fixture
def store(store_factory: Callable[..., Store]) -> Store:
    return store_factory()


# --------------------------------------------------------------------------- file-system helpers


def snapshot_impl(root: Path | str) -> dict[str, tuple[str, Any]]:
    """Every entry under ``root``: kind plus (for files) mode and content digest.

    Two snapshots compare equal iff no file or directory was created, removed,
    rewritten or re-permissioned.  Modification times of files are included so a
    rewrite with identical bytes is also seen.
    """
    root = Path(root)
    result: dict[str, tuple[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = Path(dirpath, d)
            result[str(p.relative_to(root))] = ("dir", stat.S_IMODE(p.lstat().st_mode))
        for f in filenames:
            p = Path(dirpath, f)
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            result[str(p.relative_to(root))] = (
                "file",
                (stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, digest),
            )
    return result


@pytest.fixture
def snapshot() -> Callable[[Path | str], dict[str, tuple[str, Any]]]:
    return snapshot_impl


def object_files(store: Store) -> list[Path]:
    """Every regular file under ``objects/``."""
    base = store.root / "objects"
    return sorted(p for p in base.rglob("*") if p.is_file())


@pytest.fixture
def objects_of() -> Callable[[Store], list[Path]]:
    return object_files


def _writable(path: Path) -> None:
    os.chmod(path, stat.S_IMODE(path.stat().st_mode) | stat.S_IWUSR)


def data_start(path: Path) -> int:
    """Offset of a safetensors file's data section."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    return 8 + n


def corrupt_impl(path: Path, how: str, offset: int | None = None) -> None:
    """Damage an object in place: ``flip`` one bit, ``truncate`` it, or ``delete`` it.

    ``flip`` defaults to the last byte of the file (inside the data section for
    any payload with at least one non-empty tensor).
    """
    path = Path(path)
    if how == "delete":
        path.unlink()
        return
    _writable(path)
    data = bytearray(path.read_bytes())
    if how == "flip":
        pos = len(data) - 1 if offset is None else offset
        data[pos] ^= 0x01
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(bytes(data[: max(0, len(data) - 5)]))
    else:  # pragma: no cover - test bug
        raise ValueError(how)


@pytest.fixture
def corrupt() -> Callable[..., None]:
    return corrupt_impl


def journal_records(store: Store) -> list[dict[str, Any]]:
    path = store.root / "journal.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_bytes().split(b"\n") if line]


@pytest.fixture
def read_journal() -> Callable[[Store], list[dict[str, Any]]]:
    return journal_records


def manifest_doc(store: Store) -> dict[str, Any]:
    return json.loads((store.root / "manifest.json").read_bytes())


@pytest.fixture
def read_manifest() -> Callable[[Store], dict[str, Any]]:
    return manifest_doc


# --------------------------------------------------------------------------- array comparison


def little_endian_bytes(array: np.ndarray) -> bytes:
    """The array's values as C-order little-endian bytes, by pure bit moves (NaN payloads kept)."""
    a = np.ascontiguousarray(array)
    order = a.dtype.byteorder
    if order == ">" or (order == "=" and sys.byteorder == "big"):
        a = a.byteswap().view(a.dtype.newbyteorder("<"))
    return a.tobytes()


def assert_bitexact_impl(expected: np.ndarray, actual: np.ndarray, label: str = "") -> None:
    assert isinstance(actual, np.ndarray), f"{label}: got {type(actual).__name__}"
    assert actual.shape == expected.shape, f"{label}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype.name == expected.dtype.name, f"{label}: dtype {actual.dtype} != {expected.dtype}"
    assert little_endian_bytes(actual) == little_endian_bytes(expected), f"{label}: bytes differ"


@pytest.fixture
def assert_bitexact() -> Callable[..., None]:
    return assert_bitexact_impl


def assert_tensors_equal_impl(expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray]) -> None:
    assert set(actual) == set(expected)
    for key in expected:
        assert_bitexact_impl(expected[key], actual[key], key)


@pytest.fixture
def assert_tensors_equal() -> Callable[..., None]:
    return assert_tensors_equal_impl
