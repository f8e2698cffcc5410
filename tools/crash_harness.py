"""Crash campaign: SIGKILL a busy hydra_cas writer again and again, and audit the store each time.

A child process (this file with ``--child``) runs an endless random mix of
save, save_many, delete, set_alias, remove_alias, gc (grace period 0, so it
really deletes), archive and restore on one store.  Before each operation it
appends ``BEGIN <i> <json>`` to a log file; once the operation has returned it
appends ``COMMITTED <op> <refs> <oids> <json>`` and fsyncs the log.  Only what
reached the log as COMMITTED counts as committed.

The parent kills the child with SIGKILL, either after a random delay taken from
a random operation's start (some of them zero or a few microseconds, so kills
land inside writes, fsyncs and renames), or by telling the child to kill itself
just before its Nth file operation of one kind (``--crash-at rename:7``), which
reaches every step of every operation.  After each kill it audits the store:

a. ``fsck(repair=False)`` finds nothing but leftovers (temp files, intents,
   orphans, a torn journal tail).  A journal ahead of the manifest is allowed
   only if the next write rolls it forward, which the parent then checks by
   making that write itself.
b. Every ref of the manifest loads with ``verify="full"`` and equals, bit for
   bit, the tensors the child generated for that ``name:version`` (they derive
   from a seed computed from the name and version).
c. Every committed operation is in effect: saves present unless a later
   committed delete removed them, deletes absent, aliases as last set, tiers as
   last archived or restored.  The one operation in flight at the kill may have
   happened or not, but as a whole: a save_many shows all of its versions or
   none.  Nothing appears that the child never began.

Then the next child starts on the same store.  Run ``python tools/crash_harness.py
--kills 200 --seed 1`` (``--json`` for a machine-readable summary).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import mmap
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from hydra_cas import Store, fsio  # noqa: E402
from hydra_cas.archive import BlobHeader  # noqa: E402
from hydra_cas.errors import HydraError  # noqa: E402
from hydra_cas.manifest import replay  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from hydra_cas.fsck import FsckReport

__all__ = [
    "ALLOWED_AFTER_CRASH",
    "FSIO_KINDS",
    "LEFTOVER_KINDS",
    "OP_KINDS",
    "Campaign",
    "StoreState",
    "TensorMaker",
    "archive_problems",
    "bitexact_problems",
    "check_tensors",
    "fsck_problems",
    "roll_forward",
    "state_of",
    "tensors_for",
]

logger = logging.getLogger("crash_harness")

MODELS = ("alpha", "beta", "org/gamma")
ALIASES = ("champion", "prod", "canary")
OP_KINDS = ("save", "save_many", "delete", "set_alias", "remove_alias", "gc", "archive", "restore")
FSIO_KINDS = ("open", "write", "fsync", "rename", "mkdir", "unlink", "chmod", "fsync_dir")
MAX_VERSION = 14  # versions 1.1.0 .. 1.14.0 per model; deleted ones get saved again
MAX_LIVE = 9  # per model; above it the child prefers deletes
# Unreferenced files, in the hot tier or the archive: gc's job, never damage.
LEFTOVER_KINDS = frozenset({"orphan", "archive-orphan"})
# Leftovers a killed writer may leave; everything else fsck reports is damage.
ALLOWED_AFTER_CRASH = LEFTOVER_KINDS | {"stale-temp", "stale-intent", "journal-torn", "journal-ahead"}
_OP_WEIGHTS = {
    "save": 24, "save_many": 10, "delete": 16, "set_alias": 12, "remove_alias": 6,
    "gc": 10, "archive": 12, "restore": 10,
}
# Point kills pick N in 1..this for the Nth call of a kind (rarer kinds get smaller ranges).
_POINT_RANGE = {"write": 60, "open": 30, "fsync": 30, "rename": 30, "fsync_dir": 40,
                "chmod": 15, "unlink": 10, "mkdir": 3}
# The probe file the child updates before each file operation: (count, kind index).
_PROBE = struct.Struct("<QB")


# ---------------------------------------------------------------------- deterministic payloads


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _minor(version: str) -> int:
    return int(version.split(".")[1])


def tensors_for(name: str, version: str) -> dict[str, np.ndarray]:
    """The tensors of ``name:version``: a pure function of the two strings.

    Every version of a model has the same tensor names, dtypes and shapes, and
    differs from the model's base weights in about 1% of the values, so the
    archive tier finds XOR deltas worth keeping.  ``proj.weight`` changes only
    every second version and ``norm.bias`` never (tensor-level dedup), and the
    versions of ``org/gamma`` come in three distinct payloads only (object-level
    dedup: deleting one version must not hurt another with the same oid).
    """
    model_rng = np.random.default_rng(_seed(name))
    rows = int(model_rng.integers(250, 2500))  # 0.25 .. 2.5 MB of float32
    base = model_rng.standard_normal((rows, 256)).astype(np.float32)
    minor = _minor(version) % 3 if name == "org/gamma" else _minor(version)
    content = f"{name}#{minor}" if name == "org/gamma" else f"{name}:{version}"
    rng = np.random.default_rng(_seed(content))
    embed = base.copy()
    flat = embed.reshape(-1)
    picks = rng.integers(0, flat.size, flat.size // 100)
    flat[picks] += rng.standard_normal(picks.size).astype(np.float32) * np.float32(0.01)
    proj_rng = np.random.default_rng(_seed(f"{name}/proj/{minor // 2}"))
    out = {
        "embed.weight": embed,
        "proj.weight": proj_rng.standard_normal((128, 256)).astype(np.float16),
        "norm.bias": model_rng.standard_normal(256),
        "steps": np.array([minor], dtype=np.int64),
    }
    if name == "beta":
        out["empty"] = np.zeros((0, 4), dtype=np.float32)  # a zero-size tensor (no blob)
    return out


def _tensor_digest(array: np.ndarray) -> tuple[str, tuple[int, ...], str]:
    data = np.ascontiguousarray(array)
    if data.dtype.byteorder == ">":
        data = data.byteswap().view(data.dtype.newbyteorder("<"))
    return data.dtype.name, tuple(data.shape), hashlib.sha256(data.tobytes()).hexdigest()


TensorMaker = Callable[[str, str], dict[str, np.ndarray]]
_expected_cache: dict[tuple[int, str], dict[str, tuple[str, tuple[int, ...], str]]] = {}


def _expected(make: TensorMaker, name: str, version: str) -> dict[str, tuple[str, tuple[int, ...], str]]:
    key = (id(make), f"{name}:{version}")
    found = _expected_cache.get(key)
    if found is None:
        found = {k: _tensor_digest(v) for k, v in make(name, version).items()}
        _expected_cache[key] = found
    return found


def check_tensors(
    name: str, version: str, loaded: Mapping[str, np.ndarray], make: TensorMaker = tensors_for
) -> str | None:
    """None if ``loaded`` is bit for bit what ``make(name, version)`` gives, else what differs.

    ``make`` must be a module-level function (its results are cached by identity).
    """
    want = _expected(make, name, version)
    if set(loaded) != set(want):
        return f"{name}:{version}: tensor names {sorted(loaded)} != {sorted(want)}"
    for key, (dtype, shape, digest) in want.items():
        got = _tensor_digest(loaded[key])
        if got != (dtype, shape, digest):
            return f"{name}:{version}: tensor {key!r} is {got[:2]}, other bytes; expected {(dtype, shape)}"
    return None


# ---------------------------------------------------------------------- what a store holds


@dataclass(slots=True)
class StoreState:
    """The refs of a store as the harness models them."""

    refs: dict[str, str] = field(default_factory=dict)  # "name:version" -> tier
    aliases: dict[str, str] = field(default_factory=dict)  # "name@alias" -> version

    def copy(self) -> StoreState:
        return StoreState(dict(self.refs), dict(self.aliases))

    def versions(self, name: str) -> list[str]:
        return sorted((r.split(":", 1)[1] for r in self.refs if r.split(":", 1)[0] == name), key=_minor)

    def apply(self, op: Mapping[str, Any]) -> None:
        """Apply one operation as the child logged it."""
        kind = op["op"]
        if kind in ("save", "save_many"):
            for item in op["items"]:
                self.refs.setdefault(f"{item['name']}:{item['version']}", "hot")
        elif kind == "delete":
            self.refs.pop(op["ref"], None)
            name, version = op["ref"].split(":", 1)
            for key in [k for k, v in self.aliases.items() if k.split("@")[0] == name and v == version]:
                del self.aliases[key]
        elif kind == "set_alias":
            self.aliases[f"{op['name']}@{op['alias']}"] = op["version"]
        elif kind == "remove_alias":
            self.aliases.pop(f"{op['name']}@{op['alias']}", None)
        elif kind in ("archive", "restore"):
            if op["ref"] in self.refs:
                self.refs[op["ref"]] = "archive" if kind == "archive" else "hot"

    def diff(self, other: StoreState) -> list[str]:
        out = []
        for ref in sorted(set(self.refs) | set(other.refs)):
            if self.refs.get(ref) != other.refs.get(ref):
                out.append(f"{ref}: {self.refs.get(ref)} vs {other.refs.get(ref)}")
        for key in sorted(set(self.aliases) | set(other.aliases)):
            if self.aliases.get(key) != other.aliases.get(key):
                out.append(f"{key}: {self.aliases.get(key)} vs {other.aliases.get(key)}")
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoreState) and self.refs == other.refs and self.aliases == other.aliases


def state_of(doc: Mapping[str, Any]) -> StoreState:
    state = StoreState()
    for name, model in doc["models"].items():
        for version, entry in model["versions"].items():
            state.refs[f"{name}:{version}"] = entry["tier"]
        for alias, version in model["aliases"].items():
            state.aliases[f"{name}@{alias}"] = version
    return state


# ---------------------------------------------------------------------- audits shared with the tests


def fsck_problems(report: FsckReport, allowed: Iterable[str] = ALLOWED_AFTER_CRASH) -> list[str]:
    """Findings of an fsck that are not in ``allowed`` (info findings other than orphans count too)."""
    ok = set(allowed)
    return [f"{f.kind}: {f.message}" for f in report.findings if f.kind not in ok]


def roll_forward(store: Store) -> int:
    """Make one write (a commit of no records) and return how many journal records it rolled forward.

    Raises AssertionError if afterwards the manifest does not reflect the whole
    journal or differs from replaying it.
    """
    journal = store.manifest.journal
    before = store.manifest.read()["journal_seq"]
    store.manifest.commit(lambda doc: [])
    doc = store.manifest.read()
    records, _ = journal.read()
    assert doc["journal_seq"] == len(records) == journal.last_seq(), (
        f"after a write the manifest reflects record {doc['journal_seq']}, the journal has {len(records)}"
    )
    assert replay(records) == doc["models"], "replaying the journal does not give the rolled-forward manifest"
    return doc["journal_seq"] - before


def bitexact_problems(
    store: Store, doc: Mapping[str, Any] | None = None, make: TensorMaker = tensors_for
) -> tuple[int, list[str]]:
    """Load every ref with verify="full" and compare with ``make``; (refs loaded, problems)."""
    doc = doc if doc is not None else store.manifest.read()
    problems = []
    count = 0
    for name, model in sorted(doc["models"].items()):
        for version in sorted(model["versions"]):
            try:
                loaded = store.load(name, version, verify="full")
            except HydraError as exc:
                problems.append(f"{name}:{version} does not load: {type(exc).__name__}: {exc}")
                continue
            count += 1
            wrong = check_tensors(name, version, loaded, make)
            if wrong:
                problems.append(wrong)
    return count, problems


def archive_problems(store: Store, seen: set[str] | None = None) -> list[str]:
    """Check every archive file not in ``seen`` (then add it): nothing half-written sits at a final path.

    A tensor blob must decode to bytes whose SHA-256 is its name; a recipe must
    parse, and rebuild to its oid whenever all of its blobs are there (a crashed
    archive may leave blobs without a recipe, never a recipe without blobs).
    """
    seen = set() if seen is None else seen
    tier = store.archive_tier
    problems = []
    for tid, path in sorted(tier.iter_files("tensors")):
        if str(path) in seen:
            continue
        try:
            with open(path, "rb") as f:
                header = BlobHeader.unpack(f.read(64), tid)
            tier.tensor_bytes(tid, header.raw_size, header.dtype, verify=True)
        except (HydraError, OSError) as exc:
            problems.append(f"tensor blob {tid}: {exc}")
            continue
        seen.add(str(path))
    for oid, path in sorted(tier.iter_files("recipes")):
        if str(path) in seen:
            continue
        try:
            recipe = tier.read_recipe(oid)
            sha = hashlib.sha256()
            for chunk in tier.iter_payload(recipe):
                sha.update(chunk)
            if sha.hexdigest() != oid:
                problems.append(f"recipe {oid} rebuilds to {sha.hexdigest()}")
                continue
        except (HydraError, OSError) as exc:
            problems.append(f"recipe {oid}: {exc}")
            continue
        seen.add(str(path))
    return problems


# ---------------------------------------------------------------------- the child


class _Probe:
    """Counts file operations, records the latest one in a shared file, and may kill us before one."""

    def __init__(self, path: str, crash_at: tuple[str, int] | None) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(fd, mmap.PAGESIZE)
        self._map = mmap.mmap(fd, mmap.PAGESIZE)
        os.close(fd)
        self._crash_at = crash_at
        self.counts: Counter[str] = Counter()
        self.total = 0

    def __call__(self, op: str, path: str) -> None:
        self.total += 1
        self.counts[op] += 1
        kind = FSIO_KINDS.index(op) + 1 if op in FSIO_KINDS else 0
        self._map[: _PROBE.size] = _PROBE.pack(self.total, kind)
        if self._crash_at is not None and self._crash_at == (op, self.counts[op]):
            os.kill(os.getpid(), signal.SIGKILL)


def _read_probe(path: Path) -> tuple[int, str | None]:
    try:
        data = path.read_bytes()[: _PROBE.size]
    except FileNotFoundError:
        return 0, None
    if len(data) < _PROBE.size:
        return 0, None
    total, kind = _PROBE.unpack(data)
    return total, (FSIO_KINDS[kind - 1] if 1 <= kind <= len(FSIO_KINDS) else None)


class _Child:
    def __init__(self, store: Store, log_path: str, rng: random.Random) -> None:
        self.store = store
        self.rng = rng
        self.log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.state = state_of(store.manifest.read())

    def emit(self, line: str, *, sync: bool) -> None:
        os.write(self.log, (line + "\n").encode())
        if sync:
            os.fsync(self.log)

    def choose(self) -> dict[str, Any]:
        st, rng = self.state, self.rng
        hot = sorted(r for r, t in st.refs.items() if t == "hot")
        archived = sorted(r for r, t in st.refs.items() if t == "archive")
        weights = dict(_OP_WEIGHTS)
        if not st.refs:
            weights.update(delete=0, set_alias=0, archive=0, restore=0)
        if not hot:
            weights["archive"] = 0
        if not archived:
            weights["restore"] = 0
        if not st.aliases:
            weights["remove_alias"] = 0
        if any(len(st.versions(m)) >= MAX_LIVE for m in MODELS):
            weights["delete"] *= 4
        kinds = [k for k in OP_KINDS if weights[k] > 0]
        kind = rng.choices(kinds, [weights[k] for k in kinds])[0]
        if kind in ("save", "save_many"):
            items = self._new_items(1 if kind == "save" else rng.randint(2, 3))
            if not items:
                return {"op": "gc"}
            return {"op": kind, "items": items}
        if kind == "delete":
            return {"op": "delete", "ref": rng.choice(sorted(st.refs))}
        if kind == "set_alias":
            name, version = rng.choice(sorted(st.refs)).split(":", 1)
            return {"op": "set_alias", "name": name, "alias": rng.choice(ALIASES), "version": version}
        if kind == "remove_alias":
            name, alias = rng.choice(sorted(st.aliases)).split("@", 1)
            return {"op": "remove_alias", "name": name, "alias": alias}
        if kind == "archive":
            return {"op": "archive", "ref": rng.choice(hot)}
        if kind == "restore":
            return {"op": "restore", "ref": rng.choice(archived)}
        return {"op": "gc"}

    def _new_items(self, count: int) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        taken = set(self.state.refs)
        for _ in range(count):
            name = self.rng.choice(MODELS)
            free = [n for n in range(1, MAX_VERSION + 1) if f"{name}:1.{n}.0" not in taken]
            if not free:
                continue
            version = f"1.{self.rng.choice(free)}.0"
            taken.add(f"{name}:{version}")
            older = [v for v in self.state.versions(name) if _minor(v) < _minor(version)]
            older += [i["version"] for i in items
                      if i["name"] == name and _minor(i["version"]) < _minor(version)]
            parent = self.rng.choice(older) if older and self.rng.random() < 0.6 else None
            items.append({"name": name, "version": version, "parent": parent})
        return items

    def perform(self, op: dict[str, Any]) -> tuple[list[str], list[str]]:
        """Run ``op``; return (refs, oids) for the COMMITTED line."""
        store, kind = self.store, op["op"]
        if kind == "save":
            (item,) = op["items"]
            r = store.save(item["name"], item["version"], tensors_for(item["name"], item["version"]),
                           metadata={"by": "crash-harness"}, parent=item["parent"])
            return [r.ref], [r.oid]
        if kind == "save_many":
            results = store.save_many(
                (i["name"], i["version"], tensors_for(i["name"], i["version"]), None, i["parent"])
                for i in op["items"]
            )
            return [r.ref for r in results], [r.oid for r in results]
        if kind == "delete":
            name, version = op["ref"].split(":", 1)
            store.delete(name, version, force=True)
            return [op["ref"]], ["-"]
        if kind == "set_alias":
            store.set_alias(op["name"], op["alias"], op["version"])
            return [f"{op['name']}:{op['version']}"], ["-"]
        if kind == "remove_alias":
            store.remove_alias(op["name"], op["alias"])
            return [f"{op['name']}@{op['alias']}"], ["-"]
        if kind in ("archive", "restore"):
            name, version = op["ref"].split(":", 1)
            result = (store.archive if kind == "archive" else store.restore)(name, version)
            return [op["ref"]], [result.oid]
        plan = store.gc(grace_period=0)
        op["deleted"] = len(plan.deleted)
        return ["-"], ["-"]

    def run(self, max_ops: int) -> None:
        self.emit("READY", sync=True)
        for i in range(max_ops):
            op = self.choose()
            op["i"] = i
            self.emit(f"BEGIN {i} {json.dumps(op, sort_keys=True)}", sync=False)
            refs, oids = self.perform(op)
            op["oids"] = oids
            self.state.apply(op)
            body = json.dumps(op, sort_keys=True)
            self.emit(f"COMMITTED {op['op']} {','.join(refs)} {','.join(oids)} {body}", sync=True)


def child_main(args: argparse.Namespace) -> int:
    crash_at = None
    if args.crash_at:
        kind, _, n = args.crash_at.partition(":")
        crash_at = (kind, int(n))
    store = Store(args.store, durable=not args.no_durable)
    child = _Child(store, args.log, random.Random(args.seed))
    probe = _Probe(args.probe, crash_at)
    try:
        with fsio.inject_faults(probe):
            child.run(args.max_ops)
    except BaseException:
        traceback.print_exc()
        os.write(child.log, b"ERROR see stderr\n")
        return 3
    return 0


# ---------------------------------------------------------------------- the parent


@dataclass(slots=True)
class _LogView:
    committed: list[dict[str, Any]]
    inflight: dict[str, Any] | None
    begun: int
    ready: bool
    error: bool


def _parse_log(path: Path) -> _LogView:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _LogView([], None, 0, False, False)
    lines = data.split(b"\n")
    lines.pop()  # a torn last line (or the empty string after the final newline) is not a record
    committed: list[dict[str, Any]] = []
    begun: dict[int, dict[str, Any]] = {}
    done: set[int] = set()
    ready = error = False
    for raw in lines:
        line = raw.decode()
        if line == "READY":
            ready = True
        elif line.startswith("ERROR"):
            error = True
        elif line.startswith("BEGIN "):
            _, i, body = line.split(" ", 2)
            begun[int(i)] = json.loads(body)
        elif line.startswith("COMMITTED "):
            body = line.split(" ", 4)[4]
            op = json.loads(body)
            committed.append(op)
            done.add(op["i"])
    open_ops = [begun[i] for i in sorted(begun) if i not in done]
    if len(open_ops) > 1:
        raise AssertionError(f"log shows {len(open_ops)} operations in flight at once")
    return _LogView(committed, open_ops[0] if open_ops else None, len(begun), ready, error)


def _begun_kinds(path: Path) -> tuple[list[str], bool]:
    """The kinds of the operations the child has begun so far, and whether it reported an error."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], False
    kinds = []
    for line in data.split(b"\n")[:-1]:
        if line.startswith(b"BEGIN "):
            at = line.find(b'"op": "')
            kinds.append(line[at + 7 : line.find(b'"', at + 7)].decode())
    return kinds, b"\nERROR" in data


@dataclass(slots=True)
class Campaign:
    """Kill a writer ``kills`` times on one store and audit the store after each kill."""

    root: Path
    seed: int
    point_fraction: float = 0.3
    progress: bool = False
    durable: bool = True
    rng: random.Random = field(init=False)
    work: Path = field(init=False)
    model: StoreState = field(default_factory=StoreState)
    archive_seen: set[str] = field(default_factory=set)
    kills_by_op: Counter[str] = field(default_factory=Counter)
    kills_by_mode: Counter[str] = field(default_factory=Counter)
    kill_points: Counter[str] = field(default_factory=Counter)
    committed: Counter[str] = field(default_factory=Counter)
    inflight_applied: Counter[str] = field(default_factory=Counter)
    findings_seen: Counter[str] = field(default_factory=Counter)
    refs_verified: int = 0
    roll_forwards: int = 0
    rolled_records: int = 0
    lost: int = 0
    phantom: int = 0
    rounds: int = 0
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.root.mkdir(parents=True, exist_ok=True)
        self.work = self.root.parent / f"{self.root.name}.harness"
        self.work.mkdir(exist_ok=True)
        Store(self.root)
        self.model = state_of(Store(self.root).manifest.read())

    # -- one round

    def _child_cmd(self, log: Path, probe: Path, seed: int, crash_at: str | None) -> list[str]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--store", str(self.root),
               "--log", str(log), "--probe", str(probe), "--seed", str(seed)]
        if crash_at:
            cmd += ["--crash-at", crash_at]
        if not self.durable:
            cmd.append("--no-durable")
        return cmd

    def _kill_delay(self) -> float:
        pick = self.rng.random()
        if pick < 0.2:
            return 0.0
        if pick < 0.5:
            return self.rng.uniform(0, 0.002)
        if pick < 0.8:
            return self.rng.uniform(0, 0.015)
        return self.rng.uniform(0, 0.08)

    def round(self) -> None:
        n = self.rounds
        self.rounds += 1
        log, probe, err = (self.work / f"round-{n}.{ext}" for ext in ("log", "probe", "err"))
        mode = "point" if self.rng.random() < self.point_fraction else "timer"
        crash_at = None
        if mode == "point":
            kind = self.rng.choice(FSIO_KINDS)
            crash_at = f"{kind}:{self.rng.randint(1, _POINT_RANGE.get(kind, 40))}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                         os.environ.get("PYTHONPATH")]))}
        with open(err, "wb") as err_file:
            proc = subprocess.Popen(self._child_cmd(log, probe, self.rng.getrandbits(32), crash_at),
                                    stdout=subprocess.DEVNULL, stderr=err_file, env=env)
        try:
            if mode == "timer":
                self._kill_later(proc, log, self.rng.choice(OP_KINDS))
            else:
                try:
                    proc.wait(timeout=3)
                except subprocess.TimeoutExpired:  # the child never reached that file operation
                    mode = "timer"
                    proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
        view = _parse_log(log)
        if proc.returncode != -signal.SIGKILL or view.error:
            self.problems.append(
                f"round {n}: child exited with status {proc.returncode}, not by SIGKILL:\n"
                + err.read_text(errors="replace")[-3000:]
            )
            return
        self.kills_by_mode[mode] += 1
        op_kind = view.inflight["op"] if view.inflight else ("startup" if not view.ready else "between-ops")
        self.kills_by_op[op_kind] += 1
        _, fsio_kind = _read_probe(probe)
        if view.inflight:
            self.kill_points[f"{op_kind}/{fsio_kind or 'before-any-file-op'}"] += 1
        self.audit(n, view)
        for path in (log, probe, err):
            path.unlink(missing_ok=True)
        if self.progress and self.rounds % 10 == 0:
            print(self.progress_line(), file=sys.stderr, flush=True)

    def _kill_later(self, proc: subprocess.Popen[bytes], log: Path, target: str) -> None:
        """SIGKILL ``proc`` a random delay after it begins an operation of kind ``target``.

        The first operation of that kind after a random number of others is
        the aim; a child that does not get to one within 30 operations is
        killed in whatever it is doing then.
        """
        skip = self.rng.randint(0, 3)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            kinds, error = _begun_kinds(log)
            if error or len(kinds) >= 30 or (len(kinds) > skip and kinds[-1] == target):
                break
            time.sleep(0.0003)
        delay = self._kill_delay()
        if delay:
            end = time.perf_counter() + delay
            while time.perf_counter() < end:  # spin: sleep() would round tiny delays up
                pass
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)

    # -- the audit

    def audit(self, n: int, view: _LogView) -> None:
        store = Store(self.root, create=False)
        report = store.fsck()
        for f in report.findings:
            self.findings_seen[f.kind] += 1
        bad = fsck_problems(report)
        self.problems += [f"round {n}: fsck after the kill: {b}" for b in bad]
        if any(f.kind == "journal-ahead" for f in report.findings):
            try:
                self.rolled_records += roll_forward(store)
                self.roll_forwards += 1
            except (AssertionError, HydraError) as exc:
                self.problems.append(f"round {n}: the next write did not roll the journal forward: {exc}")
                return
            again = store.fsck()
            self.problems += [f"round {n}: fsck after roll-forward: {b}" for b in
                              fsck_problems(again, ALLOWED_AFTER_CRASH - {"journal-ahead"})]
        try:
            doc = store.manifest.read()
        except HydraError as exc:
            self.problems.append(f"round {n}: manifest unreadable after the kill: {exc}")
            return
        actual = state_of(doc)
        self._check_effects(n, view, actual, doc)
        loaded, wrong = bitexact_problems(store, doc)
        self.refs_verified += loaded
        self.problems += [f"round {n}: {w}" for w in wrong]
        self.problems += [f"round {n}: {p}" for p in archive_problems(store, self.archive_seen)]
        self.model = actual

    def _check_effects(self, n: int, view: _LogView, actual: StoreState, doc: Mapping[str, Any]) -> None:
        expected = self.model.copy()
        for op in view.committed:
            expected.apply(op)
            self.committed[op["op"]] += 1
            if op["op"] in ("save", "save_many"):
                self._check_oids(n, op, doc)
        if actual == expected:
            return
        alternative = None
        if view.inflight is not None:
            alternative = expected.copy()
            alternative.apply(view.inflight)
            if actual == alternative:
                self.inflight_applied[view.inflight["op"]] += 1
                return
        # Neither "in flight did not happen" nor "it happened as a whole": classify each difference.
        differences = []
        for table in ("refs", "aliases"):
            want, got = getattr(expected, table), getattr(actual, table)
            alt = getattr(alternative, table) if alternative is not None else {}
            for key in sorted(set(want) | set(got)):
                fits_alternative = alternative is not None and alt.get(key) == got.get(key)
                if want.get(key) == got.get(key) or fits_alternative:
                    continue
                differences.append(f"{key}: expected {want.get(key)}, found {got.get(key)}")
                if want.get(key) is None and alt.get(key) is None:
                    self.phantom += 1
                else:
                    self.lost += 1
        partial = not differences  # each key fits one outcome, but not all keys the same one
        self.problems.append(
            f"round {n}: the store does not match the committed operations"
            + (" (the in-flight operation was applied in part)" if partial else "")
            + f"; in flight: {view.inflight}; differences: {differences or expected.diff(actual)}"
        )
        if partial:
            self.lost += 1

    def _check_oids(self, n: int, op: Mapping[str, Any], doc: Mapping[str, Any]) -> None:
        """A committed save's ref, while it exists, names the oid the save returned."""
        for item, oid in zip(op["items"], op["oids"], strict=True):
            model = doc["models"].get(item["name"])
            entry = model["versions"].get(item["version"]) if model else None
            if entry is not None and entry["oid"] != oid:
                self.problems.append(f"round {n}: {item['name']}:{item['version']} names {entry['oid']}, "
                                     f"the committed save returned {oid}")

    # -- the whole campaign

    def finish(self) -> None:
        """After the last kill: gc everything stale away and demand a spotless store."""
        store = Store(self.root, create=False)
        store.gc(grace_period=0)
        report = store.fsck()
        self.problems += [f"final: {b}" for b in fsck_problems(report, LEFTOVER_KINDS)]
        leftovers = [p.name for d in ("tmp", "intents") for p in (self.root / d).iterdir()]
        if leftovers:
            self.problems.append(f"final: gc left {len(leftovers)} temp files/intents: {leftovers[:5]}")
        loaded, wrong = bitexact_problems(store)
        self.refs_verified += loaded
        self.problems += [f"final: {w}" for w in wrong]
        self.problems += [f"final: {p}" for p in archive_problems(store, set())]

    def run(self, kills: int) -> dict[str, Any]:
        started = time.perf_counter()
        attempts = 0
        while sum(self.kills_by_mode.values()) < kills and attempts < kills * 2:
            attempts += 1
            self.round()
            if len(self.problems) > 20:
                break
        self.finish()
        summary = self.summary()
        summary["seconds"] = round(time.perf_counter() - started, 1)
        return summary

    def summary(self) -> dict[str, Any]:
        return {
            "ok": not self.problems and self.lost == 0 and self.phantom == 0,
            "seed": self.seed,
            "durable": self.durable,
            "kills": sum(self.kills_by_mode.values()),
            "kills_by_mode": dict(self.kills_by_mode),
            "kills_by_op": dict(sorted(self.kills_by_op.items())),
            "kill_points": dict(sorted(self.kill_points.items())),
            "committed_ops_verified": dict(sorted(self.committed.items())),
            "inflight_ops_found_applied": dict(sorted(self.inflight_applied.items())),
            "refs_verified_bitexact": self.refs_verified,
            "journal_roll_forwards": self.roll_forwards,
            "journal_records_rolled_forward": self.rolled_records,
            "fsck_findings_after_kills": dict(sorted(self.findings_seen.items())),
            "lost": self.lost,
            "phantom": self.phantom,
            "problems": self.problems[:20],
        }

    def progress_line(self) -> str:
        kills = sum(self.kills_by_mode.values())
        per_op = " ".join(f"{k}={v}" for k, v in sorted(self.kills_by_op.items()))
        return (f"[{kills} kills] {per_op} | committed verified {sum(self.committed.values())}, "
                f"refs loaded {self.refs_verified}, roll-forwards {self.roll_forwards}, "
                f"lost {self.lost}, problems {len(self.problems)}")


def _render(summary: Mapping[str, Any]) -> str:
    lines = [
        f"crash campaign{'' if summary['durable'] else ' (durable=False)'}: "
        f"{'OK' if summary['ok'] else 'FAILED'} - {summary['kills']} kills "
        f"({', '.join(f'{k} {v}' for k, v in summary['kills_by_mode'].items())}) in {summary['seconds']} s, "
        f"seed {summary['seed']}",
        "  kills by operation in flight: " + ", ".join(f"{k} {v}" for k, v in summary["kills_by_op"].items()),
        "  last file operation begun at the kill: "
        + ", ".join(f"{k} {v}" for k, v in _by_fsio_kind(summary["kill_points"]).items()),
        "  committed operations verified: "
        + ", ".join(f"{k} {v}" for k, v in summary["committed_ops_verified"].items()),
        "  in-flight operations found applied after the kill: "
        + (", ".join(f"{k} {v}" for k, v in summary["inflight_ops_found_applied"].items()) or "none"),
        f"  refs loaded bit-exact (verify=full): {summary['refs_verified_bitexact']}; journal roll-forwards: "
        f"{summary['journal_roll_forwards']} ({summary['journal_records_rolled_forward']} records)",
        "  fsck findings after kills: "
        + (", ".join(f"{k} {v}" for k, v in summary["fsck_findings_after_kills"].items()) or "none"),
        f"  lost: {summary['lost']}, phantom: {summary['phantom']}",
    ]
    lines += [f"  PROBLEM: {p}" for p in summary["problems"]]
    return "\n".join(lines)


def _by_fsio_kind(points: Mapping[str, int]) -> dict[str, int]:
    totals: Counter[str] = Counter()
    for key, count in points.items():
        totals[key.split("/", 1)[1]] += count
    return dict(totals.most_common())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--store", help="store directory (default: a fresh temp dir, removed afterwards)")
    parser.add_argument("--point-fraction", type=float, default=0.3,
                        help="share of kills the child makes itself just before a chosen file operation")
    parser.add_argument("--no-durable", action="store_true",
                        help="the child opens Store(durable=False): no fsync; a kill must still lose nothing")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--log", help=argparse.SUPPRESS)
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--crash-at", help=argparse.SUPPRESS)
    parser.add_argument("--max-ops", type=int, default=100_000, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    with contextlib.ExitStack() as stack:
        if args.store:
            root = Path(args.store).absolute()
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hydra-crash-"))) / "store"
        campaign = Campaign(root, args.seed, point_fraction=args.point_fraction, progress=not args.quiet,
                            durable=not args.no_durable)
        summary = campaign.run(args.kills)
    print(json.dumps(summary, indent=2) if args.json else _render(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
