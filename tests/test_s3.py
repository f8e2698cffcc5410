"""The store on S3: every command against a real S3 API (moto's server) on loopback.

One moto server runs for the session on 127.0.0.1; each test gets a fresh
bucket.  Stub clients stand in for servers that answer 409 or ignore
conditional headers.  Credentials are dummies set for the session only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")
from botocore.exceptions import ClientError  # noqa: E402

import hydra_cas  # noqa: E402
from hydra_cas import Store  # noqa: E402
from hydra_cas.errors import (  # noqa: E402
    HydraError,
    IntegrityError,
    LockTimeoutError,
    NotFoundError,
    RefInUseError,
    StorageError,
    VersionExistsError,
)

_SECRET = "hydraS3cr3tNeverLogged"
_PACKAGE_ROOT = str(Path(hydra_cas.__file__).resolve().parent.parent)


class _Serialised:
    """WSGI middleware: one request at a time.

    moto checks a conditional header and then stores the object in two steps,
    so two threads of its server can both pass the check; S3 itself decides
    atomically.  Serialising requests gives the tests S3's guarantee.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with self.lock:
            return list(self.app(environ, start_response))


@pytest.fixture(scope="session")
def s3_endpoint() -> Any:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    server._server.app = _Serialised(server._server.app)
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("AWS_") or name.startswith("HYDRA_S3_"):
                mp.delenv(name)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", _SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        mp.setenv("HYDRA_S3_ENDPOINT_URL", url)
        yield url
    server.stop()


@pytest.fixture
def s3(s3_endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"hydra-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def url(bucket: str) -> str:
    return f"s3://{bucket}/team/models"


def _tensors(seed: int, n: int = 256) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((n,)).astype(np.float32), "b": np.arange(8, dtype=np.int64) + seed}


def _keys(s3: Any, bucket: str, prefix: str = "") -> list[str]:
    out: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [item["Key"] for item in page.get("Contents", [])]
    return out


def _object_key(oid: str) -> str:
    return f"team/models/objects/sha256/{oid[:2]}/{oid[2:]}"


class _Proxy:
    """A boto3 client with some calls replaced."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _IgnoresConditions(_Proxy):
    """A server that drops If-None-Match / If-Match: writes always succeed."""

    def put_object(self, **kwargs: Any) -> Any:
        kwargs.pop("IfNoneMatch", None)
        kwargs.pop("IfMatch", None)
        return self._real.put_object(**kwargs)

    def complete_multipart_upload(self, **kwargs: Any) -> Any:
        kwargs.pop("IfNoneMatch", None)
        kwargs.pop("IfMatch", None)
        return self._real.complete_multipart_upload(**kwargs)


class _Refuses(_Proxy):
    """Answer ``status``/``code`` to the next ``times`` puts whose key contains ``part``."""

    def __init__(self, real: Any, part: str, times: int, status: int, code: str) -> None:
        super().__init__(real)
        self.part, self.left, self.status, self.code = part, times, status, code
        self.refused = 0

    def put_object(self, **kwargs: Any) -> Any:
        if self.part in kwargs["Key"] and self.left > 0:
            self.left -= 1
            self.refused += 1
            raise ClientError({"Error": {"Code": self.code, "Message": "stub"},
                               "ResponseMetadata": {"HTTPStatusCode": self.status}}, "PutObject")
        return self._real.put_object(**kwargs)


# ---------------------------------------------------------------------- the API on S3


def test_save_load_list_info_on_s3(url: str, s3: Any, bucket: str) -> None:
    store = Store(url)
    assert type(store).__name__ == "S3Store" and isinstance(store, Store)
    first = store.save("org/model", "1.0.0", _tensors(1), metadata={"lr": 0.1})
    second = store.save("org/model", "1.1.0", _tensors(2), parent="1.0.0")
    assert not first.deduplicated and second.ref == "org/model:1.1.0"
    for verify in ("fast", "full", "none"):
        got = store.load("org/model", "1.0.0", verify=verify)
        assert np.array_equal(got["w"], _tensors(1)["w"]) and np.array_equal(got["b"], _tensors(1)["b"])
    mapped = store.load("org/model", mmap=True)
    assert np.array_equal(mapped["w"], _tensors(2)["w"]) and not mapped["w"].flags.writeable
    many = store.load_many(["org/model:1.0.0", ("org/model", "latest"), "org/model:9.9"])
    assert many["org/model:1.0.0"].ok and many["org/model:latest"].version == "1.1.0"
    assert not many["org/model:9.9"].ok
    info = store.info("org/model")
    assert (info.version, info.parent, info.is_latest) == ("1.1.0", "1.0.0", True)
    assert store.info("org/model", "1.0.0").metadata == {"lr": 0.1}
    assert [v.version for v in store.list()] == ["1.0.0", "1.1.0"]
    assert {t["name"] for t in store.tensors("org/model")} == {"w", "b"}
    assert store.models() == ["org/model"]
    # The same store from another process's point of view: a fresh instance.
    again = Store(url, create=False)
    assert np.array_equal(again.load("org/model", "1.1.0", verify="full")["w"], _tensors(2)["w"])
    with pytest.raises(HydraError, match="no local file"):
        store.path("org/model")
    assert store.conditional_writes is True
    from hydra_cas.backend import ObjectBackend, RefBackend

    assert isinstance(store.objects, ObjectBackend) and isinstance(store.manifest, RefBackend)
    leftovers = [k for k in _keys(s3, bucket) if "/intents/" in k or "/probe/" in k]
    assert not [k for k in leftovers if "/probe/" in k]
    if "_drop_intent" in vars(Store):  # Store releases intents through the hook S3Store overrides
        assert not leftovers


def test_dedup_second_save_sends_no_object(url: str) -> None:
    store = Store(url)
    store.save("a", "1.0", _tensors(7))
    sent = (store.bucket.objects_sent, store.bucket.bytes_sent)
    again = store.save("b", "1.0", _tensors(7))
    same = store.save("a", "1.0", _tensors(7))
    assert again.deduplicated and same.unchanged
    assert (store.bucket.objects_sent, store.bucket.bytes_sent) == sent
    store.save_many([("c", "1.0", _tensors(20)), ("c", "1.1", _tensors(21)), ("d", "1.0", _tensors(7))])
    last = store.bucket.get(f"journal/{store.manifest.read()['journal_seq'] - 2:012d}.jsonl")
    assert last is not None and len(last.data.splitlines()) == 3  # one commit, one segment
    assert store.bucket.objects_sent == sent[0] + 2
    with pytest.raises(VersionExistsError):
        store.save("a", "1.0", _tensors(8))


def test_multipart_payload_roundtrip_and_export(url: str, s3: Any, bucket: str, tmp_path: Path) -> None:
    store = Store(url, part_size=5 * 1024 * 1024, multipart_threshold=5 * 1024 * 1024, workers=3)
    big = {"w": np.random.default_rng(3).standard_normal(3 * 1024 * 1024).astype(np.float32)}  # 12 MiB
    result = store.save("big", "1.0", big)
    head = s3.head_object(Bucket=bucket, Key=_object_key(result.oid))
    assert head["ContentLength"] == result.size and "-" in head["ETag"]  # multipart ETag
    assert np.array_equal(store.load("big", "1.0", verify="full")["w"], big["w"])
    target = store.export("big", "1.0", tmp_path / "big.safetensors")
    assert hashlib.sha256(target.read_bytes()).hexdigest() == result.oid
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_delete_alias_du(url: str) -> None:
    store = Store(url)
    store.save("m", "1.0", _tensors(1))
    store.save("m", "2.0", _tensors(2))
    store.save("copy", "1.0", _tensors(1))
    assert store.set_alias("m", "prod", "1.0") == "1.0"
    assert store.resolve("m", "prod") == "1.0"
    with pytest.raises(RefInUseError):
        store.delete("m", "1.0")
    usage = store.du()
    assert usage["total"]["logical_bytes"] == 3 * usage["models"][1]["logical_bytes"] // 2
    assert usage["total"]["dedup_saved_bytes"] > 0 and usage["total"]["unreferenced_bytes"] == 0
    store.remove_alias("m", "prod")
    assert store.delete("m", "1.0") == "1.0"
    assert [v.ref for v in store.list()] == ["copy:1.0", "m:2.0"]
    with pytest.raises(NotFoundError, match="did you mean"):
        store.load("mm")


def test_gc_deletes_garbage_spares_live_young_and_intents(
    url: str, s3: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(url)
    keep = store.save("m", "1.0", _tensors(1))
    gone = store.save("m", "2.0", _tensors(2))
    guarded = store.save("m", "3.0", _tensors(3))
    store.delete("m", "2.0")
    store.delete("m", "3.0")
    assert store.du()["total"]["unreferenced_bytes"] == gone.size + guarded.size
    dry = store.gc(grace_period=3600, dry_run=True)
    assert {o.oid for o in dry.kept_young} == {gone.oid, guarded.oid} and not dry.delete
    # Another process's save in flight announces it will reference this object.
    s3.put_object(Bucket=bucket, Key=f"team/models/intents/{guarded.oid}.4242-00112233aabbccdd", Body=b"")
    plan = store.gc(grace_period=0)
    assert plan.deleted == (gone.oid,) and plan.executed and "deleted 1 objects" in plan.render()
    present = set(_keys(s3, bucket, "team/models/objects/"))
    assert _object_key(keep.oid) in present and _object_key(guarded.oid) in present
    assert _object_key(gone.oid) not in present
    assert not _keys(s3, bucket, "team/models/locks/")  # the lease is released
    monkeypatch.setattr("hydra_cas.s3_gc.INTENT_TTL", 0.0)  # that save has died long ago
    swept = store.gc(grace_period=0)
    assert swept.deleted == (guarded.oid,) and [i.oid for i in swept.stale_intents] == [guarded.oid]
    assert not _keys(s3, bucket, "team/models/intents/")
    assert np.array_equal(store.load("m", "1.0", verify="full")["w"], _tensors(1)["w"])


def _fake_lease(s3: Any, bucket: str, phase: str, ttl: float) -> None:
    """The lease key a gc (that may have died) leaves behind."""
    body = {"owner": "someone", "host": "elsewhere", "pid": 1, "phase": phase, "ttl": ttl, "since": "-"}
    s3.put_object(Bucket=bucket, Key="team/models/locks/gc-lease", Body=json.dumps(body).encode())


def test_gc_lease_excludes_a_second_gc_until_it_expires(url: str, s3: Any, bucket: str) -> None:
    store = Store(url, lock_timeout=0.3)
    store.save("m", "1.0", _tensors(1))
    _fake_lease(s3, bucket, "marking", ttl=3.0)
    with pytest.raises(LockTimeoutError, match="another gc holds"):
        store.gc(grace_period=0)
    time.sleep(4.1)  # not refreshed for longer than its TTL (judged on the server's clock)
    assert store.gc(grace_period=0).executed
    assert not _keys(s3, bucket, "team/models/locks/")


def test_a_save_waits_while_gc_deletes(url: str, s3: Any, bucket: str) -> None:
    store = Store(url)
    store.save("m", "1.0", _tensors(1))
    _fake_lease(s3, bucket, "deleting", ttl=60.0)
    threading.Timer(0.6, lambda: s3.delete_object(Bucket=bucket, Key="team/models/locks/gc-lease")).start()
    started = time.monotonic()
    store.save("m", "2.0", _tensors(2))  # its object check waits for the deletion batch to end
    assert time.monotonic() - started >= 0.5
    assert [v.version for v in store.list()] == ["1.0", "2.0"]


def test_gc_stops_when_its_lease_is_lost(
    url: str, s3: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hydra_cas import s3_gc

    store = Store(url)
    orphan = store.save("m", "1.0", _tensors(1))
    store.delete("m", "1.0")
    real_plan = s3_gc.make_plan

    def plan_then_steal(*args: Any, **kwargs: Any) -> Any:
        plan = real_plan(*args, **kwargs)
        s3.put_object(Bucket=bucket, Key="team/models/locks/gc-lease", Body=b'{"stolen": true}')
        return plan

    monkeypatch.setattr(s3_gc, "make_plan", plan_then_steal)
    with pytest.raises(s3_gc.LeaseLostError, match="lost its lease"):
        store.gc(grace_period=0)
    assert _object_key(orphan.oid) in _keys(s3, bucket)


def test_archive_and_restore_on_s3(url: str) -> None:
    store = Store(url)
    store.save("m", "1.0", _tensors(1))
    store.save("m", "1.1", _tensors(1) | {"extra": np.zeros(16, np.float32)}, parent="1.0")
    result = store.archive("m", "1.0")
    assert not result.already and store.info("m", "1.0").tier == "archive"
    assert store.archive("m", "1.1").stats.reused >= 1  # tensor-level dedup across versions
    for verify in ("fast", "full"):
        assert np.array_equal(store.load("m", "1.0", verify=verify)["w"], _tensors(1)["w"])
    assert store.du()["tiers"]["archive"]["versions"] == 2
    assert store.restore("m", "1.0").ref == "m:1.0" and store.info("m", "1.0").tier == "hot"
    assert np.array_equal(store.load("m", "1.0", verify="full")["b"], _tensors(1)["b"])
    assert store.fsck().ok


def test_corrupt_object_caught_on_load_and_by_fsck(url: str, s3: Any, bucket: str) -> None:
    store = Store(url)
    bad = store.save("m", "1.0", _tensors(1))
    store.save("m", "2.0", _tensors(2))
    assert store.fsck().ok
    key = _object_key(bad.oid)
    data = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[-1] ^= 0xFF  # same size, one flipped byte
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    for verify in ("fast", "full"):
        with pytest.raises(IntegrityError, match="checksum mismatch"):
            store.load("m", "1.0", verify=verify)
    report = store.fsck()
    assert not report.ok and report.exit_code == 1
    (finding,) = [f for f in report.findings if f.kind == "object-hash"]
    assert finding.oid == bad.oid and finding.refs == ("m:1.0",)
    repaired = store.fsck(repair=True)
    assert repaired.ok and repaired.repaired >= 1
    assert store.info("m", "1.0").status == "broken"
    assert any(k.startswith("team/models/quarantine/") for k in _keys(s3, bucket))
    with pytest.raises(IntegrityError, match="broken"):
        store.load("m", "1.0")
    store.save("m", "1.0", _tensors(1))  # saving the lost bytes again heals it
    assert store.info("m", "1.0").status == "ok" and store.fsck().ok
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(data[:100]))  # truncated
    with pytest.raises(IntegrityError, match="bytes"):
        store.load("m", "1.0")
    assert any(f.kind == "object-size" for f in store.fsck().findings)


def test_writer_stopping_between_segment_and_manifest_is_rolled_forward(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hydra_cas.s3 import S3ManifestStore

    store = Store(url)
    store.save("m", "1.0", _tensors(1))

    def crash(self: Any, *args: Any) -> Any:
        raise KeyboardInterrupt  # the process dies after its segment, before the manifest

    monkeypatch.setattr(S3ManifestStore, "_swap", crash)
    with pytest.raises(KeyboardInterrupt):
        store.save("m", "2.0", _tensors(2))
    monkeypatch.undo()
    fresh = Store(url)
    assert [v.version for v in fresh.list()] == ["1.0"]  # readers see the manifest as it was
    report = fresh.fsck()
    assert [f.kind for f in report.findings if f.severity == "error"] == ["journal-ahead"]
    fresh.save("n", "1.0", _tensors(3))  # the next writer rolls the segment forward first
    assert [v.ref for v in fresh.list()] == ["m:1.0", "m:2.0", "n:1.0"]
    assert fresh.fsck().ok


def test_several_processes_save_into_one_bucket(url: str, s3: Any, bucket: str, s3_endpoint: str) -> None:
    script = (
        "import sys, numpy as np\n"
        "from hydra_cas import Store\n"
        "store, i = Store(sys.argv[1]), int(sys.argv[2])\n"
        "for v in range(4):\n"
        "    store.save(f'p{i}', f'1.{v}', {'w': np.full(64, i * 100 + v, np.float32)})\n"
        "    store.save('shared', f'{i}.{v}', {'w': np.full(64, 1000 + i * 100 + v, np.float32)})\n"
        "    store.set_alias('shared', 'newest', f'{i}.{v}')\n"
    )
    env = {**os.environ, "PYTHONPATH": _PACKAGE_ROOT}
    procs = [subprocess.Popen([sys.executable, "-c", script, url, str(i)], env=env, stderr=subprocess.PIPE)
             for i in range(4)]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    store = Store(url)
    refs = {v.ref for v in store.list()}
    assert refs == {f"p{i}:1.{v}" for i in range(4) for v in range(4)} | {
        f"shared:{i}.{v}" for i in range(4) for v in range(4)
    }
    for i in range(4):
        assert store.load("shared", f"{i}.3", verify="full")["w"][0] == 1000 + i * 100 + 3
    seqs = []
    for key in sorted(_keys(s3, bucket, "team/models/journal/")):
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        seqs += [json.loads(line)["seq"] for line in body.splitlines()]
    assert seqs == list(range(1, len(seqs) + 1))  # unique, gap-free
    assert store.manifest.read()["journal_seq"] == len(seqs) == 48
    assert store.fsck().ok


def test_conflicts_409_and_412_are_retried_and_bounded(url: str, s3_endpoint: str) -> None:
    real = boto3.client("s3", endpoint_url=s3_endpoint)
    flaky = _Refuses(real, "/journal/", 2, 409, "ConditionalRequestConflict")
    store = Store(url, client=flaky)
    store.save("m", "1.0", _tensors(1))
    assert flaky.refused == 2 and store.info("m", "1.0").oid
    swapped = _Refuses(real, "manifest.json", 1, 412, "PreconditionFailed")
    store = Store(url, client=swapped)
    store.save("m", "2.0", _tensors(2))
    assert swapped.refused == 1 and Store(url).manifest.read()["journal_seq"] == 2
    stuck = _Refuses(real, "/journal/", 10**6, 412, "PreconditionFailed")
    store = Store(url, client=stuck, commit_attempts=3)
    with pytest.raises(StorageError, match="3 attempts"):
        store.save("m", "3.0", _tensors(3))
    assert stuck.refused == 3
    assert [v.version for v in Store(url).list()] == ["1.0", "2.0"]


def test_server_ignoring_conditional_writes_is_refused(url: str, s3_endpoint: str) -> None:
    from hydra_cas.s3io import ConditionalWritesError

    sloppy = _IgnoresConditions(boto3.client("s3", endpoint_url=s3_endpoint))
    store = Store(url, client=sloppy)
    assert store.list() == []  # reads need no probe
    with pytest.raises(ConditionalWritesError, match="ignores conditional writes"):
        store.save("m", "1.0", _tensors(1))
    assert store.conditional_writes is False
    assert not Store(url).list()  # nothing was written
    trusted = Store(url, client=sloppy, single_writer=True)
    trusted.save("m", "1.0", _tensors(1))
    assert np.array_equal(Store(url).load("m", "1.0")["w"], _tensors(1)["w"])


def test_server_rejecting_conditional_headers_is_refused(url: str, s3_endpoint: str) -> None:
    from hydra_cas.s3io import ConditionalWritesError

    rejecting = _Refuses(boto3.client("s3", endpoint_url=s3_endpoint), "/probe/", 1, 501, "NotImplemented")
    store = Store(url, client=rejecting)
    with pytest.raises(ConditionalWritesError, match="single_writer=True"):
        store.save("m", "1.0", _tensors(1))


def test_open_errors_are_clear(s3_endpoint: str, url: str) -> None:
    with pytest.raises(NotFoundError, match="bucket 'no-such-bucket-here' does not exist"):
        Store("s3://no-such-bucket-here/x")
    with pytest.raises(NotFoundError, match="no store at"):
        Store(url, create=False)
    with pytest.raises(HydraError, match="not a valid bucket name"):
        Store("s3://A_B/x")
    with pytest.raises(HydraError, match="segments"):
        Store("s3://abc/x/../y")


def test_credentials_are_never_logged(url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        store = Store(url)
        store.save("m", "1.0", _tensors(1))
        store.load("m", "1.0")
        store.gc(grace_period=0)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("hydra_cas"))
    assert text and _SECRET not in text


# ---------------------------------------------------------------------- moving between stores


def test_push_and_pull_between_local_and_s3(url: str, tmp_path: Path) -> None:
    from hydra_cas.backend import ObjectBackend, RefBackend
    from hydra_cas.remote import pull, push

    local = Store(tmp_path / "local")
    assert isinstance(local.objects, ObjectBackend) and isinstance(local.manifest, RefBackend)
    local.save("m", "1.0", _tensors(1), metadata={"note": "first"})
    local.save("m", "1.1", _tensors(2), parent="1.0")
    local.save("twin", "1.0", _tensors(1))
    local.set_alias("m", "prod", "1.1")
    remote = Store(url)
    result = push(local, remote)
    assert sorted(result.copied) == ["m:1.0", "m:1.1", "twin:1.0"]
    assert result.objects_sent == 2 and result.aliases == ["m:prod -> 1.1"]
    info = remote.info("m", "prod")
    assert (info.version, info.parent) == ("1.1", "1.0")
    assert remote.info("m", "1.0").metadata == {"note": "first"}
    assert remote.info("m", "1.0").created == local.info("m", "1.0").created
    again = push(local, remote)
    assert again.objects_sent == 0 and not again.copied and len(again.present) == 3
    cache = Store(tmp_path / "cache")
    pulled = pull(cache, remote, ["m:prod"])
    assert pulled.copied == ["m:1.1"] and pulled.aliases == ["m:prod -> 1.1"]
    assert np.array_equal(cache.load("m", "prod", verify="full")["w"], _tensors(2)["w"])
    other = Store(tmp_path / "other")
    other.save("m", "1.0", _tensors(9))
    with pytest.raises(VersionExistsError, match="nothing was copied"):
        pull(other, remote, ["m"])
    assert [v.version for v in other.list()] == ["1.0"]


def test_interrupted_push_resumes_sending_only_what_is_missing(
    url: str, tmp_path: Path, s3: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hydra_cas import remote as remote_mod

    local = Store(tmp_path / "local")
    for i in range(4):
        local.save("m", f"1.{i}", _tensors(10 + i))
    target = Store(url, part_size=5 * 1024 * 1024, multipart_threshold=5 * 1024 * 1024)
    real_send = remote_mod._send
    calls = []

    def flaky_send(src: Store, dst: Store, item: Any) -> bool:
        calls.append(item.ref)
        if len(calls) == 3:
            raise ConnectionError("network went away")
        return real_send(src, dst, item)

    monkeypatch.setattr(remote_mod, "_send", flaky_send)
    with pytest.raises(ConnectionError):
        remote_mod.push(local, target)
    assert target.list() == [] and len(_keys(s3, bucket, "team/models/objects/")) == 2
    monkeypatch.setattr(remote_mod, "_send", real_send)
    resumed = remote_mod.push(local, target)
    assert (resumed.objects_sent, resumed.objects_present) == (2, 2)
    assert [v.version for v in target.list()] == ["1.0", "1.1", "1.2", "1.3"]
    assert target.fsck().ok


def test_push_refuses_a_corrupt_source_and_pull_verifies(
    url: str, tmp_path: Path, s3: Any, bucket: str
) -> None:
    from hydra_cas.remote import load_cached, pull, push

    local = Store(tmp_path / "local")
    saved = local.save("m", "1.0", _tensors(1))
    path = local.objects.path(saved.oid)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    remote = Store(url)
    with pytest.raises(IntegrityError, match="nothing was stored"):
        push(local, remote)
    assert not _keys(s3, bucket, "team/models/objects/") and remote.list() == []
    remote.save("m", "2.0", _tensors(2))
    key = _object_key(remote.info("m", "2.0").oid)
    good = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=key, Body=good[:-1] + bytes([good[-1] ^ 1]))
    cache = Store(tmp_path / "cache")
    with pytest.raises(IntegrityError):
        pull(cache, remote, ["m:2.0"])
    assert cache.list() == []
    s3.put_object(Bucket=bucket, Key=key, Body=good)
    assert np.array_equal(load_cached(cache, remote, "m", "2.0", verify="full")["w"], _tensors(2)["w"])
    s3.delete_object(Bucket=bucket, Key=key)  # later loads come from the cache
    assert np.array_equal(load_cached(cache, remote, "m", "latest")["w"], _tensors(2)["w"])


# ---------------------------------------------------------------------- the command line


def test_cli_commands_on_s3(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hydra_cas.cli import cmd_pull, cmd_push, main

    seed = Store(tmp_path / "seed")
    seed.save("m", "1.0", _tensors(1))
    source = tmp_path / "m.safetensors"
    seed.export("m", "1.0", source)

    def run(*argv: str) -> tuple[int, str]:
        code = main(["--store", url, *argv])
        return code, capsys.readouterr().out

    assert run("save", str(source), "m:1.0", "--meta", "k=1")[0] == 0
    assert run("save", str(source), "m:1.1")[0] == 0
    code, out = run("ls")
    assert code == 0 and "m" in out
    assert "F32" in run("show", "m:1.0")[1]
    assert run("alias", "m", "prod", "1.0")[0] == 0
    assert "TOTAL" in run("du")[1]
    assert run("fsck")[0] == 0
    assert run("archive", "m:1.1")[0] == 0
    assert run("export", "m:1.1", str(tmp_path / "out.safetensors"))[0] == 0
    assert (tmp_path / "out.safetensors").read_bytes() == source.read_bytes()
    assert run("rm", "m:1.1")[0] == 0
    code, out = run("gc", "--json")
    assert code == 0 and json.loads(out)["executed"]
    assert main(["--store", url, "show", "nope:1.0"]) == 3
    local = Store(tmp_path / "local")
    args = argparse.Namespace(remote=url, refs=["m"], json=True)
    assert cmd_pull(args, local) == 0 and json.loads(capsys.readouterr().out)["copied"] == ["m:1.0"]
    local.save("n", "1.0", _tensors(5))
    assert cmd_push(argparse.Namespace(remote=url, refs=["n"], json=False), local) == 0
    assert "1 version(s) copied" in capsys.readouterr().out
    env = {**os.environ, "PYTHONPATH": _PACKAGE_ROOT}
    proc = subprocess.run([sys.executable, "-m", "hydra_cas", "--store", url, "ls", "--json"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert {v["name"] for v in json.loads(proc.stdout)} == {"m", "n"}


def test_cli_push_and_pull_subcommands(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hydra_cas.cli import build_parser, main

    local = tmp_path / "local"
    build_parser().parse_args(["--store", str(local), "push", url])  # push/pull are registered
    Store(local).save("m", "1.0", _tensors(1))
    assert main(["--store", str(local), "push", url, "m:1.0"]) == 0
    assert "1 version(s) copied" in capsys.readouterr().out
    fresh = tmp_path / "fresh"  # pull creates the local store
    assert main(["--store", str(fresh), "pull", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["copied"] == ["m:1.0"]
    assert np.array_equal(Store(fresh).load("m", "1.0", verify="full")["w"], _tensors(1)["w"])
