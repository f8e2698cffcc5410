"""The guided demo behind ``hydra-cas demo``: save, version, dedupe, verify, load.

It writes through the public API only and reports through the ``say`` callback
(the CLI passes ``print``), so the library itself never prints.  Weights come
from fixed seeds: running the demo twice finds everything already stored.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import numpy as np

from hydra_cas.errors import IntegrityError
from hydra_cas.store import Store

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["run_demo"]


def _weights(seed: int, width: int = 256) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "encoder.weight": rng.standard_normal((width, width), dtype=np.float32),
        "encoder.bias": rng.standard_normal(width, dtype=np.float32),
        "head.weight": rng.standard_normal((10, width), dtype=np.float32),
        "head.bias": np.zeros(10, dtype=np.float32),
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def run_demo(root: str | os.PathLike[str], say: Callable[[str], None]) -> int:
    """Run the demo against the store at ``root``; return a process exit status."""
    store = Store(root)
    say(f"hydra_cas demo, store: {store.root}")
    say("")

    say("1. Saving versions of two models")
    plan = [
        ("alpha-regressor", "1.0.0", 1, None),
        ("alpha-regressor", "1.1.0", 2, "1.0.0"),
        ("alpha-regressor", "2.0.0-rc.1", 3, "1.1.0"),
        ("genesis-vectorizer", "1.0.0", 4, None),
    ]
    for name, version, seed, parent in plan:
        result = store.save(
            name, version, _weights(seed), metadata={"seed": seed, "demo": True}, parent=parent
        )
        state = (
            "already stored"
            if result.unchanged
            else ("deduplicated" if result.deduplicated else "new object")
        )
        say(f"   saved {result.ref:<28} {_mib(result.size):>10}  sha256 {result.oid[:12]}  ({state})")
    say("")

    say("2. Resolving versions")
    say(
        f"   alpha-regressor:latest    -> {store.resolve('alpha-regressor')}  "
        "(pre-release 2.0.0rc1 is skipped)"
    )
    say(f"   alpha-regressor:>=1.0,<1.1 -> {store.resolve('alpha-regressor', '>=1.0,<1.1')}")
    store.set_alias("alpha-regressor", "champion", "1.0.0")
    say(f"   alpha-regressor:champion  -> {store.resolve('alpha-regressor', 'champion')}  (an alias)")
    say("")

    say("3. Deduplication: the same weights under another name")
    before = store.du()["total"]
    result = store.save("alpha-regressor-copy", "1.0.0", _weights(1), metadata={"note": "a copy"})
    after = store.du()["total"]
    say(
        f"   saved {result.ref}: deduplicated={result.deduplicated}, "
        f"new bytes on disk: {after['on_disk_bytes'] - before['on_disk_bytes']}"
    )
    say(
        f"   logical {_mib(after['logical_bytes'])}, stored {_mib(after['stored_bytes'])}, "
        f"saved by dedup {_mib(after['dedup_saved_bytes'])}"
    )
    say("")

    say("4. Loading in parallel, verified (BLAKE3)")
    requests = [(name, "latest") for name in store.models()]
    start = time.perf_counter()
    results = store.load_many(requests)
    elapsed = time.perf_counter() - start
    for key, outcome in results.items():
        tensors = outcome.unwrap()
        say(
            f"   {key:<32} -> {outcome.version:<8} {len(tensors)} tensors, "
            f"{sum(t.nbytes for t in tensors.values()):,} bytes"
        )
    say(f"   {len(results)} models in {elapsed * 1000:.1f} ms")
    say("")

    say("5. Catching corruption")
    victim = store.save("demo-canary", "1.0.0", _weights(99, width=64))
    path = store.path("demo-canary", "1.0.0")
    _flip_last_byte(path)
    say(f"   flipped one bit of object {victim.oid[:12]}... on disk")
    caught = False
    try:
        store.load("demo-canary", "1.0.0")
    except IntegrityError as exc:
        caught = True
        say(
            f"   load refused: checksum mismatch (expected blake3 {str(exc.expected)[:12]}..., "
            f"got {str(exc.actual)[:12]}...)"
        )
    _flip_last_byte(path)  # put the byte back: the demo leaves a healthy store
    store.load("demo-canary", "1.0.0", verify="full")
    say(f"   restored the byte; {victim.ref} verifies again with SHA-256")
    say("")

    total = store.du()["total"]
    say(
        f"Done: {len(store.list())} versions of {len(store.models())} models, "
        f"{_mib(total['on_disk_bytes'])} on disk. Try `hydra-cas --store {root} ls`."
    )
    return 0 if caught else 1


def _flip_last_byte(path: os.PathLike[str]) -> None:
    # Objects are read-only by design; the demo lifts that for one moment only.
    os.chmod(path, 0o644)
    try:
        with open(path, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            byte = f.read(1)[0]
            f.seek(-1, os.SEEK_END)
            f.write(bytes([byte ^ 0x01]))
    finally:
        os.chmod(path, 0o444)
