#!/usr/bin/env python3
"""Performance benchmarks for hydra_cas, reported as ratios against a baseline.

Usage::

    python tools/bench.py [--quick] [--json] [--only NAME,...] [--list] [--tmpdir DIR]

The machine this runs on is usually shared and noisy, so every headline figure
is a *ratio* between hydra_cas and a reference way of doing the same job,
measured side by side in the same process, repeated several times (the order of
the two alternates between repeats), and reported as the median with the min
and max.  Absolute GB/s figures are reported beside the ratios for context,
together with the machine's own hashing speed measured in the same run.

Adding a benchmark: write a function taking ``quick: bool`` and returning a dict
of metrics (plain JSON values; use :func:`summary` for a list of samples and
:func:`ratio_metric` for a headline ratio with its target), and decorate it
with ``@bench("name")``.  Scratch files go under :func:`scratch`, which is
removed when the run ends.  ``tools/codec_bench.py``'s ``bench_codec(quick)``
is picked up automatically when that file exists.

Each benchmark runs in a fresh interpreter (``--in-process`` to debug), so
that memory left behind by one cannot flatter or hurt the next.  The
hydra_cas measured is the importable one, else this checkout's: to compare
another tree, run with ``PYTHONPATH=/path/to/other/tree``.

Progress and diagnostics go to stderr; with ``--json`` stdout carries exactly
one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("hydra_cas") is None:
    sys.path.insert(0, str(ROOT))

import blake3  # noqa: E402
import numpy as np  # noqa: E402

import hydra_cas  # noqa: E402
from hydra_cas.store import Store  # noqa: E402

MiB = 1 << 20

BenchFn = Callable[[bool], dict[str, Any]]
BENCHES: dict[str, BenchFn] = {}

_scratch_root: Path | None = None
_SCRATCH_ENV = "HYDRA_BENCH_SCRATCH"


# ---------------------------------------------------------------------- plumbing


def bench(name: str) -> Callable[[BenchFn], BenchFn]:
    """Register ``fn`` under ``name``; benchmarks run in registration order."""

    def register(fn: BenchFn) -> BenchFn:
        if name in BENCHES:
            raise ValueError(f"benchmark {name!r} registered twice")
        BENCHES[name] = fn
        return fn

    return register


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def scratch(prefix: str) -> Path:
    """A fresh directory under this run's temp root (removed at the end of the run)."""
    assert _scratch_root is not None, "scratch() is only available while benchmarks run"
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=_scratch_root))


def summary(samples: list[float], digits: int = 3) -> dict[str, Any]:
    """Median, min and max of a list of samples."""
    return {
        "median": round(statistics.median(samples), digits),
        "min": round(min(samples), digits),
        "max": round(max(samples), digits),
        "n": len(samples),
    }


def ratio_metric(samples: list[float], target: float | None, higher_is_better: bool = True) -> dict[str, Any]:
    """A headline figure: its summary, the target and whether the median meets it."""
    result = summary(samples)
    result["target"] = target
    if target is not None:
        result["met"] = result["median"] >= target if higher_is_better else result["median"] <= target
        result["goal"] = ">=" if higher_is_better else "<="
    return result


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def settle() -> None:
    """Flush dirty pages left by the previous run so it does not tax the next one."""
    gc.collect()
    os.sync()


def rmtree(path: Path) -> None:
    # Objects are mode 0444, but their directories are writable: unlinking works.
    shutil.rmtree(path, ignore_errors=True)


def make_model(total_bytes: int, seed: int, tensors: int = 12) -> dict[str, np.ndarray]:
    """``tensors`` float32 arrays of uneven sizes adding up to about ``total_bytes``.

    Random bits with one exponent bit cleared: every value is a finite float
    and nothing compresses or repeats.
    """
    rng = np.random.default_rng(seed)
    cols = 1024
    rows_total = max(tensors, total_bytes // (4 * cols))
    weights = np.linspace(1.0, 3.0, tensors)
    rows = np.maximum(1, (weights / weights.sum() * rows_total).astype(int))
    rows[-1] += rows_total - rows.sum()
    model = {}
    for i, r in enumerate(rows):
        bits = rng.integers(0, 2**32, size=(int(r), cols), dtype=np.uint32)
        bits &= np.uint32(0xBFFFFFFF)
        model[f"layers.{i:02d}.weight"] = bits.view(np.float32)
    return model


def mutate(model: dict[str, np.ndarray], stamp: int) -> None:
    """Make ``model`` a new payload (a new oid) without regenerating it."""
    for array in model.values():
        array.reshape(-1)[:2] = np.float32(stamp)


def model_bytes(model: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in model.values())


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):
            return hashlib.file_digest(f, "sha256").hexdigest()
        sha = hashlib.sha256()
        while chunk := f.read(8 * MiB):
            sha.update(chunk)
        return sha.hexdigest()


def gbps(nbytes: int, seconds: list[float]) -> dict[str, Any]:
    return summary([nbytes / s / 1e9 for s in seconds])


# ---------------------------------------------------------------------- benchmarks


@bench("machine")
def bench_machine(quick: bool) -> dict[str, Any]:
    """Hashing speed of this machine right now: the context for every other figure."""
    size = (256 if quick else 512) * MiB
    data = np.random.default_rng(0).integers(0, 256, size=size, dtype=np.uint8)
    repeats = 3
    sha, b3_one, b3_all = [], [], []
    view = data.data
    for _ in range(repeats):
        sha.append(timed(lambda: hashlib.sha256(view).digest())[0])
        b3_one.append(timed(lambda: blake3.blake3(view).digest())[0])
        b3_all.append(timed(lambda: blake3.blake3(view, max_threads=blake3.blake3.AUTO).digest())[0])
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "sha256_one_thread_gbps": gbps(size, sha),
        "blake3_one_thread_gbps": gbps(size, b3_one),
        "blake3_all_threads_gbps": gbps(size, b3_all),
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load],
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blake3": getattr(blake3, "__version__", "?"),
    }


class _Ballast:
    """Page-cache memory to hand back to the kernel just before a timed run.

    Some VMs (this project's among them) return free memory to their host about
    two seconds after it is freed; the next use of such memory costs host
    faults, and writing a file into it measured 0.3-0.6 GB/s against 4+ GB/s
    into memory freed a moment before.  Page-cache pages come in large folios,
    which only large free blocks can serve, so the ballast is a file: written
    before a run and deleted just before the clock starts, it leaves the run
    warm blocks, as on a machine without that feature, whatever the previous
    run left behind.
    """

    def __init__(self, directory: Path, nbytes: int) -> None:
        self.path = directory / "ballast"
        self.nbytes = nbytes

    def fill(self) -> None:
        zeros = bytes(16 * MiB)
        with open(self.path, "wb", buffering=0) as f:
            for _ in range(0, self.nbytes, len(zeros)):
                f.write(zeros)

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


@bench("save_vs_naive")
def bench_save(quick: bool) -> dict[str, Any]:
    """Store.save against save_file + re-read + SHA-256 (the prototype's way)."""
    from safetensors.numpy import save_file

    size = (256 if quick else 1024) * MiB
    model = make_model(size, seed=1)
    nbytes = model_bytes(model)
    root = scratch("save")
    # save_file first copies every tensor to bytes, then fills the page cache:
    # the run must find twice the model's size of warm memory.
    ballast = _Ballast(scratch("ballast"), 2 * nbytes + 256 * MiB)
    stamp = 0

    def naive(durable: bool) -> None:
        path = root / f"naive-{stamp}.safetensors"
        save_file(model, str(path))
        if durable:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sha256_file(path)

    def store_save(durable: bool) -> None:
        Store(root / f"store-{stamp}", durable=durable).save("bench/model", f"1.{stamp}", model)

    def sha256_only() -> None:
        sha = hashlib.sha256()
        for array in model.values():
            sha.update(array.reshape(-1).view(np.uint8).data)

    def one_run(variant: str, memory: str) -> float:
        nonlocal stamp
        stamp += 1
        mutate(model, stamp)  # a new payload every run: no dedup short-cut
        settle()
        if memory == "warm":
            ballast.fill()
            ballast.release()
        else:
            time.sleep(3.0)  # nothing freed lately: this VM's free memory is cold
        start = time.perf_counter()
        if variant.startswith("naive"):
            naive(variant == "naive_fsync")
        elif variant == "sha256_only":
            sha256_only()
        else:
            store_save(variant == "durable")
        seconds = time.perf_counter() - start
        for entry in root.iterdir():
            rmtree(entry) if entry.is_dir() else entry.unlink()
        return seconds

    # Warm up imports, thread pools and lazy initialisation once, untimed.
    mutate(model, -1)
    store_save(True)
    variants = ["naive", "durable", "nondurable", "sha256_only"] + ([] if quick else ["naive_fsync"])
    plans = {"warm": 3 if quick else 5, "cold": 0 if quick else 3}
    times: dict[str, dict[str, list[float]]] = {}
    for memory, repeats in plans.items():
        runs = times[memory] = {v: [] for v in variants}
        for rep in range(repeats):
            order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
            for variant in order:
                runs[variant].append(one_run(variant, memory))
            log(f"save_vs_naive ({memory} memory): repeat {rep + 1}/{repeats} done")
    ballast.release()
    settle()

    def per_rep(memory: str, a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(times[memory][a], times[memory][b], strict=True)]

    warm = times["warm"]
    result: dict[str, Any] = {
        "ratio": ratio_metric(per_rep("warm", "naive", "durable"), 1.6),
        # Store.save must SHA-256 every byte (the oid) on one core, so it cannot
        # beat naive by more than naive's time over that of SHA-256 alone.
        "ratio_ceiling_sha256_bound": summary(per_rep("warm", "naive", "sha256_only")),
        "save_vs_naive_nondurable": ratio_metric(per_rep("warm", "naive", "nondurable"), None),
        "store_durable_gbps": gbps(nbytes, warm["durable"]),
        "store_nondurable_gbps": gbps(nbytes, warm["nondurable"]),
        "naive_gbps": gbps(nbytes, warm["naive"]),
        "sha256_only_gbps": gbps(nbytes, warm["sha256_only"]),
    }
    if "naive_fsync" in variants:
        result.update({
            "durable_vs_naive_fsync": ratio_metric(per_rep("warm", "naive_fsync", "durable"), None),
            "naive_fsync_gbps": gbps(nbytes, warm["naive_fsync"]),
        })
    if times["cold"]["naive"]:
        cold = times["cold"]
        result.update({
            "cold_memory_ratio": ratio_metric(per_rep("cold", "naive", "durable"), None),
            "cold_memory_nondurable_ratio": ratio_metric(per_rep("cold", "naive", "nondurable"), None),
            "cold_memory_store_durable_gbps": gbps(nbytes, cold["durable"]),
            "cold_memory_store_nondurable_gbps": gbps(nbytes, cold["nondurable"]),
            "cold_memory_naive_gbps": gbps(nbytes, cold["naive"]),
            "cold_memory_naive_fsync_gbps": gbps(nbytes, cold["naive_fsync"]),
        })
    result.update({
        "model_bytes": nbytes,
        "tensors": len(model),
        "note": "naive = safetensors.numpy.save_file then re-read + sha256, NO fsync (its pages are "
        "left dirty in the page cache); naive_fsync adds one fsync before the re-read. Store.save "
        "durable fsyncs the object, its directory, the journal and the manifest. Every run saves a "
        "new payload; dirty pages are flushed (os.sync) between runs, untimed. Headline figures: "
        "page-cache memory freed just before each run (warm; see _Ballast). cold_memory_*: nothing "
        "freed in the 3 s before each run, so this VM has handed its free memory back to the host. "
        "--quick skips those and naive_fsync. "
        "ratio_ceiling_sha256_bound = naive time / time to SHA-256 the model on one core, the most "
        "Store.save can gain since it must compute that digest (the oid).",
    })
    return result


def _saved_model(size: int, seed: int, name: str = "bench/model") -> tuple[Store, dict[str, np.ndarray]]:
    store = Store(scratch("load"), durable=False)
    model = make_model(size, seed)
    store.save(name, "1.0", model)
    return store, model


def _warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 * MiB)
        while f.readinto(buf):
            pass


@bench("load_fast_vs_safetensors")
def bench_load_fast(quick: bool) -> dict[str, Any]:
    """Store.load(verify="fast") against safetensors.numpy.load_file, warm page cache."""
    return _load_vs_safetensors(quick, mmap=False, verify="fast", target=1.3)


@bench("load_mmap_vs_safetensors")
def bench_load_mmap(quick: bool) -> dict[str, Any]:
    """Store.load(verify="none", mmap=True) against load_file, warm page cache."""
    return _load_vs_safetensors(quick, mmap=True, verify="none", target=5.0)


def _load_vs_safetensors(quick: bool, *, mmap: bool, verify: str, target: float) -> dict[str, Any]:
    from safetensors.numpy import load_file

    size = (256 if quick else 1024) * MiB
    repeats = 7
    store, model = _saved_model(size, seed=2)
    nbytes = os.path.getsize(store.path("bench/model"))
    expected = {k: v.copy() for k, v in list(model.items())[:1]}
    del model
    path = str(store.path("bench/model"))
    _warm(Path(path))
    ref_t: list[float] = []
    our_t: list[float] = []
    touch_t: list[float] = []

    def ours() -> dict[str, np.ndarray]:
        return store.load("bench/model", verify=verify, mmap=mmap)

    def theirs() -> dict[str, np.ndarray]:
        return load_file(path)

    for fn in (ours, theirs):  # warm-up, and a correctness check
        out = fn()
        for key, value in expected.items():
            assert np.array_equal(out[key], value), f"{fn.__name__} returned wrong bytes for {key}"
        del out
    gc.collect()
    for rep in range(repeats):
        pair = [(theirs, ref_t), (ours, our_t)]
        for fn, sink in pair if rep % 2 == 0 else reversed(pair):
            seconds, out = timed(fn)
            sink.append(seconds)
            if mmap and fn is ours:
                # Context only: the mapped arrays are lazy; time touching every page.
                start = time.perf_counter()
                for array in out.values():
                    int(array.reshape(-1).view(np.uint8)[::4096].sum())
                touch_t.append(seconds + time.perf_counter() - start)
            del out
            gc.collect()
    result = {
        "ratio": ratio_metric([r / o for r, o in zip(ref_t, our_t, strict=True)], target),
        "store_gbps": gbps(nbytes, our_t),
        "safetensors_load_file_gbps": gbps(nbytes, ref_t),
        "payload_bytes": nbytes,
    }
    if mmap:
        touched = [r / t for r, t in zip(ref_t, touch_t, strict=True)]
        result["mmap_plus_touch_every_page_ratio"] = summary(touched)
        result["note"] = "mmap arrays are lazy views of the page cache: the headline ratio is the time to " \
            "get usable arrays; mmap_plus_touch_every_page_ratio adds reading one byte per 4 KiB page."
    else:
        result["note"] = "warm page cache; the time includes reading the whole object into private memory " \
            "and checking its BLAKE3, while load_file copies every tensor out of an mmap (no check)."
    rmtree(store.root)
    return result


@bench("parallel_vs_sequential")
def bench_parallel(quick: bool) -> dict[str, Any]:
    """Store.load_many of 8 models against loading them one by one (verify="fast")."""
    count = 8
    each = (16 if quick else 64) * MiB
    repeats = 5
    store = Store(scratch("many"), durable=False)
    names = []
    for i in range(count):
        name = f"bench/m{i}"
        store.save(name, "1.0", make_model(each, seed=100 + i, tensors=6))
        names.append(name)
        _warm(store.path(name))
    total = sum(os.path.getsize(store.path(n)) for n in names)

    def sequential() -> None:
        for n in names:
            store.load(n, verify="fast")

    def parallel() -> None:
        results = store.load_many(names, verify="fast")
        bad = [r for r in results.values() if not r.ok]
        assert not bad, f"load_many failed: {bad[0].error}"

    sequential()
    parallel()
    seq_t: list[float] = []
    par_t: list[float] = []
    for rep in range(repeats):
        pair = [(sequential, seq_t), (parallel, par_t)]
        for fn, sink in pair if rep % 2 == 0 else reversed(pair):
            sink.append(timed(fn)[0])
            gc.collect()
    rmtree(store.root)
    return {
        "ratio": ratio_metric([s / p for s, p in zip(seq_t, par_t, strict=True)], 1.3),
        "parallel_gbps": gbps(total, par_t),
        "sequential_gbps": gbps(total, seq_t),
        "models": count,
        "bytes_each": each,
        "note": "warm page cache; both sides verify BLAKE3 and copy into private memory.",
    }


_RSS_CHILD = textwrap.dedent(
    """
    import json, os, resource, sys, tempfile, shutil
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[2])))
    from bench import make_model
    from hydra_cas.store import Store

    size = int(sys.argv[3])
    durable = sys.argv[4] == "1"
    layout = sys.argv[6]

    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return None

    root = tempfile.mkdtemp(dir=sys.argv[5])
    try:
        store = Store(root, durable=durable)
        store.save("warm/up", "1.0", make_model(4 << 20, seed=7))  # imports, pools, manifest
        model = make_model(size, seed=8)
        if layout == "fortran":  # not C-contiguous: saved by converting slabs
            model = {k: np.asfortranarray(v) for k, v in model.items()}
        elif layout == "sanity":  # the method must see an allocation of a tenth of the size
            model = {"x": np.zeros(1, np.float32)}
        nbytes = sum(a.nbytes for a in model.values())
        method = "proc_vmhwm_reset"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            method = "ru_maxrss"
        def maxrss():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

        before = status("VmRSS") if method != "ru_maxrss" else maxrss()
        if method == "proc_vmhwm_reset" and status("VmHWM") > before * 1.01 + (1 << 20):
            method = "ru_maxrss"  # the reset did not take
            before = maxrss()
        if layout == "sanity":
            keep = np.ones(size // 10, np.uint8)
            nbytes = size
        store.save("bench/model", "1.0", model)
        peak = status("VmHWM") if method == "proc_vmhwm_reset" else maxrss()
        out = {"extra": peak - before, "size": nbytes, "method": method, "before": before, "peak": peak}
        print(json.dumps(out))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    """
)


@bench("save_peak_rss_over_size")
def bench_save_rss(quick: bool) -> dict[str, Any]:
    """Peak extra resident memory of Store.save / model size, in a fresh process."""
    size = (256 if quick else 1024) * MiB
    repeats = 1 if quick else 3

    def measure(layout: str) -> dict[str, Any]:
        where = str(scratch("rss"))
        cmd = [sys.executable, "-c", _RSS_CHILD, _package_root(), __file__, str(size), "1", where, layout]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"RSS child failed: {proc.stderr.strip()[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    sanity = measure("sanity")
    if not 0.09 <= sanity["extra"] / sanity["size"] <= 0.2:
        raise RuntimeError(f"peak-RSS method {sanity['method']} missed a known allocation: {sanity}")
    runs = {layout: [measure(layout) for _ in range(repeats)] for layout in ("c", "fortran")}
    ratio = {k: [d["extra"] / d["size"] for d in v] for k, v in runs.items()}
    return {
        "ratio": ratio_metric(ratio["c"], 0.25, higher_is_better=False),
        "extra_mib": summary([d["extra"] / MiB for d in runs["c"]], 1),
        "non_contiguous_ratio": summary(ratio["fortran"]),
        "non_contiguous_extra_mib": summary([d["extra"] / MiB for d in runs["fortran"]], 1),
        "model_bytes": size,
        "method": runs["c"][0]["method"],
        "note": "fresh subprocess per run; the model is built first, then the peak-RSS mark is reset "
        "(/proc/self/clear_refs = 5; getrusage ru_maxrss if that fails) and extra = VmHWM after "
        "save - VmRSS before. Resident memory counts anonymous and mapped pages, not the page "
        "cache. A control run allocating size/10 checks the method sees allocations. "
        "non_contiguous: Fortran-order tensors, saved through converted slabs.",
    }


def _package_root() -> str:
    """The directory holding the hydra_cas being measured (for child processes)."""
    return str(Path(hydra_cas.__file__).resolve().parent.parent)


#: Benchmarks kept in sibling files: registered name -> (file, function(quick) -> dict).
_SIBLINGS = {
    "codec": ("codec_bench.py", "bench_codec"),
    "maintenance": ("bench_store.py", "bench_maintenance"),
    "archive": ("bench_store.py", "bench_archive"),
    "s3": ("s3_bench.py", "bench_s3"),
}


def _sibling_benches() -> None:
    """Register the benchmarks of tools/*_bench.py files that exist.

    Each is imported only when it runs; one that cannot be imported (an
    optional dependency missing) reports why instead of failing the whole run.
    """
    here = Path(__file__).resolve().parent
    for name, (filename, function) in _SIBLINGS.items():
        path = here / filename
        if not path.exists() or name in BENCHES:
            continue

        def run_sibling(quick: bool, path: Path = path, function: str = function) -> dict[str, Any]:
            try:
                spec = importlib.util.spec_from_file_location(f"hydra_{path.stem}", path)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                fn = getattr(module, function)
            except Exception as exc:
                log(f"tools/{path.name} not usable, skipping: {type(exc).__name__}: {exc}")
                return {"skipped": f"tools/{path.name} not usable: {type(exc).__name__}: {exc}"}
            return fn(quick)

        run_sibling.__doc__ = f"Figures from tools/{filename} ({function})."
        bench(name)(run_sibling)


# ---------------------------------------------------------------------- driver


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _run_one(name: str, quick: bool) -> dict[str, Any]:
    return BENCHES[name](quick)


def _run_isolated(name: str, quick: bool) -> dict[str, Any]:
    """Run one benchmark in a fresh interpreter, so that the allocator and
    thread pools left behind by one benchmark cannot speed up or slow down the
    next (glibc keeps freed heap memory around, and a warm heap makes any
    later allocation-heavy baseline look several times faster)."""
    assert _scratch_root is not None
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name] + (["--quick"] if quick else [])
    env = {**os.environ, _SCRATCH_ENV: str(_scratch_root)}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, timeout=3600)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark process exited with status {proc.returncode}")
    reply = json.loads(lines[-1])
    if "error" in reply:
        raise RuntimeError(reply["error"])
    return reply["result"]


def run(names: list[str], quick: bool, isolate: bool = True, tmpdir: str | None = None) -> dict[str, Any]:
    global _scratch_root
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    _scratch_root = Path(tempfile.mkdtemp(prefix="hydra-bench-", dir=tmpdir))
    started = time.perf_counter()
    load_before = _loadavg()
    try:
        for name in names:
            log(f"running {name}{' (quick)' if quick else ''}")
            t0 = time.perf_counter()
            try:
                results[name] = _run_isolated(name, quick) if isolate else _run_one(name, quick)
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
                log(f"{name} failed: {errors[name]}")
            log(f"{name}: {time.perf_counter() - t0:.1f} s")
    finally:
        shutil.rmtree(_scratch_root, ignore_errors=True)
        _scratch_root = None
    return {
        "hydra_cas": getattr(hydra_cas, "__version__", "?"),
        "hydra_cas_path": _package_root(),
        "quick": quick,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "loadavg_before_after": [load_before, _loadavg()],
        "results": results,
        "errors": errors,
    }


def _child(name: str, quick: bool) -> int:
    """Entry point of an isolated benchmark: one JSON line on stdout."""
    global _scratch_root
    _scratch_root = Path(os.environ[_SCRATCH_ENV])
    try:
        reply: dict[str, Any] = {"result": _run_one(name, quick)}
    except Exception as exc:
        log(f"{name} failed:\n{traceback.format_exc()}")
        reply = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(reply))
    return 0


def _fmt(stat: Any) -> str:
    if isinstance(stat, dict) and "median" in stat:
        return f"{stat['median']:g} [{stat['min']:g}..{stat['max']:g}]"
    return str(stat)


def render(report: dict[str, Any]) -> str:
    lines = [f"hydra_cas bench ({'quick' if report['quick'] else 'full'}, {report['elapsed_s']} s)"]
    rows = [("benchmark", "metric", "median [min..max]", "target", "ok")]
    for name, metrics in report["results"].items():
        if not isinstance(metrics, dict):
            rows.append((name, "", str(metrics), "", ""))
            continue
        for metric, stat in metrics.items():
            is_summary = isinstance(stat, dict) and "median" in stat
            if metric == "note" or (isinstance(stat, (dict, list)) and not is_summary):
                continue
            target = ok = ""
            if isinstance(stat, dict) and stat.get("target") is not None:
                target = f"{stat['goal']} {stat['target']:g}"
                ok = "yes" if stat["met"] else "NO"
            rows.append((name, metric, _fmt(stat), target, ok))
            name = ""
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    for name, metrics in report["results"].items():
        if isinstance(metrics, dict) and "note" in metrics:
            lines.append(f"* {name}: {metrics['note']}")
    for name, error in report["errors"].items():
        lines.append(f"! {name} failed: {error}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    # A plain `kill` should still remove the scratch directory (finally blocks).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    _sibling_benches()
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller models, fewer repeats (under a minute)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--only", help="comma-separated benchmark names (see --list)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--tmpdir", help="where the temporary stores go (default: the system temp dir)")
    parser.add_argument(
        "--in-process", action="store_true", help="run every benchmark in this process (for debugging)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child, args.quick)
    if args.list:
        for name, fn in BENCHES.items():
            doc = (fn.__doc__ or "").strip()
            print(f"{name:28} {doc.splitlines()[0] if doc else ''}")
        return 0
    names = list(BENCHES)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHES]
        if unknown:
            parser.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHES)}")
    report = run(names, args.quick, isolate=not args.in_process, tmpdir=args.tmpdir)
    if args.json:
        print(json.dumps(report))
    else:
        print(render(report))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
