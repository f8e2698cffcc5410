#!/usr/bin/env python3
"""Coverage-guided fuzzing of hydra_cas's untrusted inputs with atheris (libFuzzer).

Not run in CI (tests/test_fuzz.py is the CI fuzzer).  Needs ``pip install atheris``.

    python tools/fuzz_atheris.py TARGET [CORPUS_DIR ...] [libFuzzer options]

TARGET is one of:

``import``    the bytes are a file given to ``Store.import_file``
``manifest``  the bytes replace ``manifest.json`` of a small store, then it is read
``journal``   the bytes replace ``journal.jsonl`` and ``manifest.json`` is deleted
``recipe``    the bytes replace the recipe of an archived version, which is then loaded
``blob``      the bytes replace one tensor blob of an archived version, which is then loaded

Any exception other than a HydraError (of the kind the input can cause), and any accepted
input that does not read back correctly, is reported by libFuzzer as a crash with the input
saved.  Good seeds: ``tests/corpus/safetensors`` for ``import``, ``tests/corpus/manifests``
for ``manifest`` and ``journal``, ``tests/corpus/archive`` for ``recipe`` and ``blob``.
Example: ``python tools/fuzz_atheris.py import tests/corpus/safetensors -max_total_time=600``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    import numpy as np

    from hydra_cas import HydraError, IntegrityError, InvalidSafetensorsError, Store

SCRATCH = Path(tempfile.mkdtemp(prefix="hydra-atheris-"))
TENSORS = {
    "1.0": {"w": (np.arange(120, dtype=np.float32) / 7).reshape(12, 10), "i": np.arange(9, dtype=np.int64),
            "e": np.zeros((0, 2), np.uint8)},
}
TENSORS["2.0"] = {**TENSORS["1.0"], "w": TENSORS["1.0"]["w"] + np.float32(1)}


def _le(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).tobytes()


def _template(archived: bool) -> Path:
    root = SCRATCH / ("archived" if archived else "plain")
    store = Store(root, durable=False)
    store.save("m", "1.0", TENSORS["1.0"], metadata={"k": [1, {"x": None}]})
    store.save("m", "2.0", TENSORS["2.0"], parent="1.0")
    store.set_alias("m", "prod", "1.0")
    if archived:
        store.archive("m", "1.0")
        store.archive("m", "2.0")
    return root


def _matches(loaded: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> bool:
    return set(loaded) == set(want) and all(
        loaded[k].shape == v.shape and _le(loaded[k]) == _le(v) for k, v in want.items()
    )


def _check_loaded(store: Store, version: str, *, refs_fuzzed: bool = False) -> None:
    """A verified load returns the right tensors; with fuzzed refs, those of *some* stored version.

    A mutated manifest or journal may legitimately point m:1.0 at m:2.0's object (e.g. a
    duplicated JSON key, last one wins), but a load that passed its digest check can never
    return bytes that are not a stored object.
    """
    try:
        loaded = store.load("m", version, verify="fast")
    except IntegrityError:
        return
    candidates = list(TENSORS.values()) if refs_fuzzed else [TENSORS[version]]
    if not any(_matches(loaded, want) for want in candidates):
        raise AssertionError(f"m:{version} loaded bytes that are no stored version's, without an error")


def target_import() -> Callable[[bytes], None]:
    from safetensors import safe_open

    source = SCRATCH / "input.safetensors"

    def one(data: bytes) -> None:
        root = SCRATCH / "import-store"
        shutil.rmtree(root, ignore_errors=True)
        source.write_bytes(data)
        store = Store(root, durable=False)
        try:
            store.import_file(source, "f", "1.0")
        except InvalidSafetensorsError:
            return
        if store.info("f", "1.0").oid != hashlib.sha256(data).hexdigest():
            raise AssertionError("imported oid is not the file's SHA-256")
        ours = store.load("f", "1.0", verify="full")
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + n])
        header.pop("__metadata__", None)
        with safe_open(str(source), "np") as f:
            if set(f.keys()) != set(ours):
                raise AssertionError("tensor names differ from safe_open's")
            for name in f.keys():
                begin, end = header[name]["data_offsets"]
                if _le(ours[name]) != data[8 + n + begin : 8 + n + end]:
                    raise AssertionError(f"tensor {name!r} bytes differ from the file's")

    return one


def _refs_reads(store: Store) -> None:
    for call in (store.list, store.models, lambda: store.info("m", "prod"),
                 lambda: _check_loaded(store, "1.0", refs_fuzzed=True),
                 lambda: _check_loaded(store, "2.0", refs_fuzzed=True)):
        try:
            call()
        except HydraError:
            pass


def target_manifest() -> Callable[[bytes], None]:
    root = _template(archived=False)
    original = (root / "manifest.json").read_bytes()

    def one(data: bytes) -> None:
        (root / "manifest.json").write_bytes(data)
        try:
            _refs_reads(Store(root, durable=False))
        finally:
            (root / "manifest.json").write_bytes(original)

    return one


def target_journal() -> Callable[[bytes], None]:
    root = _template(archived=False)
    journal = (root / "journal.jsonl").read_bytes()
    manifest = (root / "manifest.json").read_bytes()

    def one(data: bytes) -> None:
        (root / "journal.jsonl").write_bytes(data)
        (root / "manifest.json").unlink()
        try:
            _refs_reads(Store(root, durable=False))
        finally:
            (root / "journal.jsonl").write_bytes(journal)
            (root / "manifest.json").write_bytes(manifest)

    return one


def _archive_target(pick: Callable[[Store], Path]) -> Callable[[bytes], None]:
    root = _template(archived=True)
    store = Store(root, durable=False)
    path = pick(store)
    os.chmod(path, 0o644)
    original = path.read_bytes()

    def one(data: bytes) -> None:
        path.write_bytes(data)
        try:
            fresh = Store(root, durable=False)
            for version in ("1.0", "2.0"):
                _check_loaded(fresh, version)
                try:
                    fresh.load("m", version, verify="none")
                except IntegrityError:
                    pass
        finally:
            path.write_bytes(original)

    return one


def target_recipe() -> Callable[[bytes], None]:
    return _archive_target(lambda s: s.archive_tier.recipe_path(s.info("m", "2.0").oid))


def target_blob() -> Callable[[bytes], None]:
    tid = hashlib.sha256(_le(TENSORS["2.0"]["w"])).hexdigest()
    return _archive_target(lambda s: s.archive_tier.tensor_path(tid))


TARGETS: dict[str, Callable[[], Callable[[bytes], None]]] = {
    "import": target_import,
    "manifest": target_manifest,
    "journal": target_journal,
    "recipe": target_recipe,
    "blob": target_blob,
}


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.stderr.write(__doc__ or "")
        raise SystemExit(2)
    one = TARGETS[argv[1]]()

    def test_one_input(data: Any) -> None:
        one(bytes(data))

    atheris.Setup([argv[0], *argv[2:]], test_one_input)
    try:
        atheris.Fuzz()
    finally:
        shutil.rmtree(SCRATCH, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv)
