#!/usr/bin/env python3
"""Push to S3 against a plain boto3 upload, and the bytes dedup saves, on a loopback S3 server.

Usage::

    python tools/s3_bench.py [--quick] [--json]

A moto server (``moto[server]``) runs on 127.0.0.1, in a child process, for the
duration; nothing leaves the machine and dummy credentials are used.

- ``s3_push_vs_boto3``: throughput of ``hydra_cas.remote.push`` of one version
  (a local store to a fresh prefix: HEAD, verified multipart upload, intent,
  journal segment and manifest swap) over ``boto3``'s ``upload_file`` of the
  same object file to the same server with its default transfer settings.
  Higher is better; 1.0 means push costs nothing over a bare upload.  Each
  repeat runs both, alternating which goes first; the median ratio is reported.
- ``s3_dedup_push_bytes_ratio``: request bytes sent to the server (every
  request's Content-Length: payloads, intents, journal, manifest) while pushing
  10 versions that share 3 distinct payloads, over the 10 versions' total
  size.  Lower is better; 0.3 is what sending each payload once would cost.
  A second push of the same versions is reported beside it.

``bench_s3(quick)`` returns the same figures as a dict for tools/bench.py.
Progress goes to stderr; with ``--json`` stdout carries exactly one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("hydra_cas") is None:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

MiB = 1 << 20


def log(message: str) -> None:
    print(f"[s3-bench] {message}", file=sys.stderr, flush=True)


def _summary(samples: list[float], target: float | None, higher_is_better: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "median": round(statistics.median(samples), 3),
        "min": round(min(samples), 3),
        "max": round(max(samples), 3),
        "n": len(samples),
        "target": target,
    }
    if target is not None:
        out["met"] = out["median"] >= target if higher_is_better else out["median"] <= target
        out["goal"] = ">=" if higher_is_better else "<="
    return out


_SERVER_SCRIPT = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the parent closes it
server.stop()
"""


class _Server:
    """A moto S3 server on loopback, in a process of its own, with dummy credentials in the environment.

    Its own process: in this one it would share the GIL with the client and
    the measurement would mostly be of that contention.
    """

    def __enter__(self) -> _Server:
        self._saved = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "HYDRA_S3_"))}
        for key in self._saved:
            del os.environ[key]
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull,
                          AWS_SHARED_CREDENTIALS_FILE=os.devnull)
        self.process = subprocess.Popen([sys.executable, "-c", _SERVER_SCRIPT], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        port = int(self.process.stdout.readline())
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        for key in [k for k in os.environ if k.startswith(("AWS_", "HYDRA_S3_"))]:
            del os.environ[key]
        os.environ.update(self._saved)

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.url)


def _count_request_bytes(client: Any) -> list[int]:
    """A one-element counter of the Content-Length of every request ``client`` sends."""
    sent = [0]

    def count(request: Any, **_: Any) -> None:
        sent[0] += int(request.headers.get("Content-Length") or 0)

    client.meta.events.register("before-send.s3", count)
    return sent


def _model(total_bytes: int, seed: int, tensors: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    each = total_bytes // tensors // 4
    return {f"layer{i}.weight": rng.standard_normal(each, dtype=np.float32) for i in range(tensors)}


def _clear(client: Any, bucket: str, prefix: str) -> None:
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [{"Key": item["Key"]} for item in page.get("Contents", [])]
    for i in range(0, len(keys), 1000):
        client.delete_objects(Bucket=bucket, Delete={"Objects": keys[i : i + 1000], "Quiet": True})


def _push_vs_boto3(server: _Server, scratch: Path, quick: bool) -> dict[str, Any]:
    from boto3.s3.transfer import TransferConfig

    from hydra_cas import Store
    from hydra_cas.remote import push

    size = (64 if quick else 256) * MiB
    repeats = 3 if quick else 5
    local = Store(scratch / "push-src", durable=False)
    saved = local.save("bench/model", "1.0", _model(size, 1))
    path = str(local.objects.path(saved.oid))
    client = server.client()
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    plain = TransferConfig()  # boto3's defaults: 8 MiB parts, 10 threads
    ratios, push_rates, boto_rates = [], [], []
    for r in range(repeats):
        timings: dict[str, float] = {}
        order = ("boto3", "push") if r % 2 == 0 else ("push", "boto3")
        for which in order:
            prefix = f"{which}-{r}"
            if which == "boto3":
                t0 = time.perf_counter()
                client.upload_file(path, bucket, f"{prefix}/object", Config=plain)
                timings[which] = time.perf_counter() - t0
            else:
                remote = Store(f"s3://{bucket}/{prefix}", client=client)
                t0 = time.perf_counter()
                result = push(local, remote)
                timings[which] = time.perf_counter() - t0
                assert result.objects_sent == 1, result
                remote.close()
            _clear(client, bucket, prefix)
        ratios.append(timings["boto3"] / timings["push"])
        push_rates.append(saved.size / timings["push"] / MiB)
        boto_rates.append(saved.size / timings["boto3"] / MiB)
        log(f"push {push_rates[-1]:.0f} MiB/s, boto3 upload_file {boto_rates[-1]:.0f} MiB/s, "
            f"ratio {ratios[-1]:.2f}")
    return {
        "s3_push_vs_boto3": _summary(ratios, 0.8, higher_is_better=True),
        "push_MiBps": _summary(push_rates, None, True),
        "boto3_upload_MiBps": _summary(boto_rates, None, True),
        "payload_bytes": saved.size,
    }


def _dedup_push(server: _Server, scratch: Path, quick: bool) -> dict[str, Any]:
    from hydra_cas import Store
    from hydra_cas.remote import push

    size = (4 if quick else 16) * MiB
    payloads = [_model(size, seed) for seed in (11, 12, 13)]
    pattern = [0, 1, 0, 2, 1, 0, 2, 0, 1, 2]  # 10 versions, 3 distinct payloads
    local = Store(scratch / "dedup-src", durable=False)
    total = 0
    for i, which in enumerate(pattern):
        total += local.save("bench/dedup", f"1.{i}", payloads[which]).size
    client = server.client()
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    sent = _count_request_bytes(client)
    remote = Store(f"s3://{bucket}/dedup", client=client)
    first = push(local, remote)
    first_bytes = sent[0]
    again = push(local, remote)
    second_bytes = sent[0] - first_bytes
    remote.close()
    ratio = first_bytes / total
    log(f"dedup push: {first.objects_sent} objects, {first_bytes} request bytes for {total} logical "
        f"bytes (ratio {ratio:.3f}); second push {second_bytes} bytes")
    return {
        "s3_dedup_push_bytes_ratio": _summary([ratio], 0.35, higher_is_better=False),
        "versions": len(pattern),
        "distinct_payloads": len(payloads),
        "logical_bytes": total,
        "request_bytes_sent": first_bytes,
        "payload_bytes_sent": first.bytes_sent,
        "objects_sent": first.objects_sent,
        "second_push_request_bytes": second_bytes,
        "second_push_objects_sent": again.objects_sent,
    }


def bench_s3(quick: bool) -> dict[str, Any]:
    """Both S3 figures (see the module docstring) as one dict of metrics."""
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        return {"skipped": f"needs boto3 and moto[server] (pip install 'hydra_cas[test]'): {exc}"}
    scratch = Path(tempfile.mkdtemp(prefix="hydra-s3-bench-"))
    try:
        with _Server() as server:
            push_figures = _push_vs_boto3(server, scratch, quick)
            dedup_figures = _dedup_push(server, scratch, quick)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "s3_push_vs_boto3": push_figures.pop("s3_push_vs_boto3"),
        "s3_dedup_push_bytes_ratio": dedup_figures.pop("s3_dedup_push_bytes_ratio"),
        "push": push_figures,
        "dedup": dedup_figures,
        "note": "moto S3 server on loopback; push ratio = boto3 upload_file seconds / push seconds",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller payloads, fewer repeats")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args(argv)
    result = bench_s3(args.quick)
    if args.json:
        print(json.dumps(result))
        return 0
    for name in ("s3_push_vs_boto3", "s3_dedup_push_bytes_ratio"):
        stat = result.get(name)
        if isinstance(stat, dict):
            print(f"{name}: {stat['median']:g} [{stat['min']:g}..{stat['max']:g}] "
                  f"(target {stat['goal']} {stat['target']:g}: {'met' if stat['met'] else 'NOT met'})")
    if "skipped" in result:
        print(result["skipped"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
