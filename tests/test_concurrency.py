"""Concurrent writers: four processes (spawned, and plain subprocesses) each
saving 25 versions into one store at once, plus threads within one process."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import hydra_cas
from hydra_cas import Store

WORKERS = 4
PER_WORKER = 25
# Where the hydra_cas under test lives, so subprocesses import the same copy.
PACKAGE_PARENT = Path(hydra_cas.__file__).resolve().parent.parent


def tensors_for(worker: int, index: int, shared: bool) -> dict[str, np.ndarray]:
    """Deterministic tensors; with ``shared`` every worker writes the same 25 payloads."""
    seed = index if shared else worker * 1000 + index
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((16, 8)).astype(np.float32),
        "b": np.full(8, seed, dtype=np.int64),
    }


def ref_for(kind: str, worker: int, index: int) -> tuple[str, str]:
    if kind == "same-name":  # one model, the workers' versions interleave
        return "shared-model", f"{index}.{worker}.0"
    return f"model-{worker}", f"1.{index}.0"  # distinct names (and "dedup": same bytes)


def spawn_worker(root: str, kind: str, worker: int, barrier) -> None:
    """Runs in a spawned child: wait for all peers, then save PER_WORKER versions."""
    store = Store(root)
    barrier.wait(timeout=60)
    for index in range(PER_WORKER):
        name, version = ref_for(kind, worker, index)
        store.save(name, version, tensors_for(worker, index, kind == "dedup"), metadata={"worker": worker})


def _check_store(root: Path, kind: str) -> None:
    store = Store(root, create=False)
    expected = {ref_for(kind, w, i): (w, i) for w in range(WORKERS) for i in range(PER_WORKER)}
    listed = {(v.name, v.version): v for v in store.list()}
    assert set(listed) == set(expected)
    for (name, version), (w, i) in expected.items():
        loaded = store.load(name, version, verify="full")
        want = tensors_for(w, i, kind == "dedup")
        assert set(loaded) == set(want)
        for key in want:
            np.testing.assert_array_equal(loaded[key], want[key])
        assert listed[(name, version)].metadata == {"worker": w}

    lines = (root / "journal.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"", "journal must end with a newline"
    records = [json.loads(line) for line in lines[:-1]]
    assert len(records) == WORKERS * PER_WORKER
    assert [r["seq"] for r in records] == list(range(1, WORKERS * PER_WORKER + 1))
    assert all(r["op"] == "put" for r in records)
    assert {(r["name"], r["version"]) for r in records} == set(expected)
    manifest = json.loads((root / "manifest.json").read_bytes())
    assert manifest["journal_seq"] == WORKERS * PER_WORKER

    objects = [p for p in (root / "objects").rglob("*") if p.is_file()]
    assert len(objects) == (PER_WORKER if kind == "dedup" else WORKERS * PER_WORKER)
    assert list((root / "tmp").iterdir()) == [], "temp files left behind"
    assert list((root / "intents").iterdir()) == [], "intents left behind"


def race_worker(root: str, worker: int, same_bytes: bool, barrier, queue) -> None:
    """Runs in a spawned child: every worker saves "race:1.0" at the same moment."""
    from hydra_cas import VersionExistsError

    store = Store(root)
    tensors = tensors_for(0 if same_bytes else worker, 0, False)
    barrier.wait(timeout=60)
    try:
        result = store.save("race", "1.0", tensors)
    except VersionExistsError:
        queue.put((worker, "conflict", None))
    else:
        queue.put((worker, "unchanged" if result.unchanged else "saved", result.oid))


@pytest.mark.parametrize("same_bytes", [False, True], ids=["different-bytes", "same-bytes"])
def test_racing_saves_of_one_version(tmp_path, same_bytes):
    root = tmp_path / "store"
    Store(root)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=race_worker, args=(str(root), w, same_bytes, barrier, queue))
        for w in range(WORKERS)
    ]
    for p in procs:
        p.start()
    outcomes = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * WORKERS
    kinds = sorted(kind for _, kind, _ in outcomes)
    if same_bytes:
        assert kinds == ["saved"] + ["unchanged"] * (WORKERS - 1)
    else:
        assert kinds == ["conflict"] * (WORKERS - 1) + ["saved"]
    ((winner, _, oid),) = [o for o in outcomes if o[1] == "saved"]
    store = Store(root)
    assert store.info("race", "1.0").oid == oid
    loaded = store.load("race", "1.0", verify="full")
    np.testing.assert_array_equal(loaded["w"], tensors_for(0 if same_bytes else winner, 0, False)["w"])
    records = [json.loads(line) for line in (root / "journal.jsonl").read_bytes().splitlines()]
    assert [(r["seq"], r["op"]) for r in records] == [(1, "put")]
    assert list((root / "tmp").iterdir()) == []
    assert list((root / "intents").iterdir()) == []


@pytest.mark.parametrize("kind", ["distinct-names", "same-name", "dedup"])
def test_four_spawned_processes_save_concurrently(tmp_path, kind):
    root = tmp_path / "store"
    Store(root)  # created up front; the workers also open it concurrently
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    procs = [ctx.Process(target=spawn_worker, args=(str(root), kind, w, barrier)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)
    finally:
        for p in procs:
            if p.is_alive():  # pragma: no cover - only on a hang
                p.kill()
                p.join()
    assert [p.exitcode for p in procs] == [0] * WORKERS
    _check_store(root, kind)


_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    sys.path.insert(0, {repo!r})
    from test_concurrency import PER_WORKER, ref_for, tensors_for
    from hydra_cas import Store

    root, kind, worker, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    store = Store(root)
    deadline = time.monotonic() + 60
    while not go.exists():
        if time.monotonic() > deadline:
            sys.exit("never got the go signal")
        time.sleep(0.002)
    for index in range(PER_WORKER):
        name, version = ref_for(kind, worker, index)
        store.save(name, version, tensors_for(worker, index, kind == "dedup"), metadata={{"worker": worker}})
    """
)


@pytest.mark.parametrize("kind", ["same-name", "distinct-names"])
def test_four_subprocesses_save_concurrently(tmp_path, kind):
    root = tmp_path / "store"
    go = tmp_path / "go"
    script = _SCRIPT.format(tests=str(Path(__file__).resolve().parent), repo=str(PACKAGE_PARENT))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(root), kind, str(w), str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for w in range(WORKERS)
    ]
    time.sleep(0.05)
    go.touch()
    outputs = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=120)
            outputs.append((p.returncode, err.decode(errors="replace")[-2000:]))
    finally:
        for p in procs:
            if p.poll() is None:  # pragma: no cover - only on a hang
                p.kill()
                p.wait()
    assert [rc for rc, _ in outputs] == [0] * WORKERS, outputs
    _check_store(root, kind)


def test_threads_in_one_process_save_concurrently(tmp_path):
    """Two Store objects and eight threads on one directory; the lock must still serialise them."""
    root = tmp_path / "store"
    stores = [Store(root), Store(root)]
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(worker: int) -> None:
        try:
            start.wait(timeout=30)
            for index in range(10):
                stores[worker % 2].save("threaded", f"{worker}.{index}", tensors_for(worker, index, False))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    fresh = Store(root)
    versions = [v.version for v in fresh.list("threaded")]
    assert len(versions) == 80
    seqs = [json.loads(line)["seq"] for line in (root / "journal.jsonl").read_bytes().splitlines()]
    assert seqs == list(range(1, 81))
    for worker in (0, 7):
        np.testing.assert_array_equal(
            fresh.load("threaded", f"{worker}.9", verify="full")["w"], tensors_for(worker, 9, False)["w"]
        )


def test_concurrent_loads_while_saving(tmp_path):
    """Readers never see a half-written manifest or object while a writer commits."""
    root = tmp_path / "store"
    writer = Store(root)
    writer.save("m", "0.0", tensors_for(0, 0, False))
    stop = threading.Event()
    problems: list[BaseException] = []

    def read() -> None:
        reader = Store(root)
        while not stop.is_set():
            try:
                reader.load("m", "latest", verify="full")
                reader.list()
            except BaseException as exc:  # pragma: no cover - reported below
                problems.append(exc)
                return

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        for i in range(1, 40):
            writer.save("m", f"{i}.0", tensors_for(0, i, False))
    finally:
        stop.set()
        for t in readers:
            t.join(timeout=30)
    assert not problems, problems
    assert Store(root).resolve("m") == "39.0"
