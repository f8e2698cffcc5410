"""Crash consistency: SIGKILL a writer at random moments and audit the store after each kill.

The campaign itself lives in ``tools/crash_harness.py`` (run it by hand for
the full report); these tests run it, bounded by default and at full length
when slow tests are selected.  After every kill the harness demands that fsck
finds nothing but leftovers, that a journal ahead of the manifest is rolled
forward by the next write, that every ref loads bit for bit with
``verify="full"``, and that every operation the child reported committed is in
effect (the one in flight may have happened, but only as a whole).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tools" / "crash_harness.py"


def _load_harness() -> Any:
    if "crash_harness" in sys.modules:
        return sys.modules["crash_harness"]
    spec = importlib.util.spec_from_file_location("crash_harness", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["crash_harness"] = module
    spec.loader.exec_module(module)
    return module


harness = _load_harness()


def _save_report(summary: dict[str, Any], name: str) -> None:
    target = os.environ.get("HYDRA_RELIABILITY_REPORT")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        (Path(target) / name).write_text(json.dumps(summary, indent=2))


def _assert_campaign(summary: dict[str, Any], kills: int) -> None:
    assert summary["lost"] == 0, summary
    assert summary["phantom"] == 0, summary
    assert not summary["problems"], "\n".join(summary["problems"])
    assert summary["ok"], summary
    assert summary["kills"] >= kills
    assert summary["refs_verified_bitexact"] > 0
    assert sum(summary["committed_ops_verified"].values()) > 0


def test_bounded_crash_campaign(tmp_path: Path) -> None:
    """25 kills on one store (about 15 s)."""
    campaign = harness.Campaign(tmp_path / "store", seed=11)
    summary = campaign.run(25)
    _save_report(summary, "crash-25.json")
    _assert_campaign(summary, 25)


def test_crash_campaign_without_fsync(tmp_path: Path) -> None:
    """Store(durable=False) gives up safety against power loss, not against a killed process."""
    campaign = harness.Campaign(tmp_path / "store", seed=12, durable=False)
    summary = campaign.run(10)
    _save_report(summary, "crash-10-nondurable.json")
    _assert_campaign(summary, 10)


@pytest.mark.slow
def test_full_crash_campaign(tmp_path: Path) -> None:
    """The 200-kill campaign, through the command line as a user runs it (a few minutes)."""
    proc = subprocess.run(
        [sys.executable, str(HARNESS), "--kills", "200", "--seed", "3", "--json", "--quiet",
         "--store", str(tmp_path / "store")],
        capture_output=True, text=True, timeout=900, check=False,
    )
    summary = json.loads(proc.stdout)
    _save_report(summary, "crash-200.json")
    _assert_campaign(summary, 200)
    assert proc.returncode == 0
    # Every kind of operation was killed in flight at least once.
    missing = [op for op in harness.OP_KINDS if not summary["kills_by_op"].get(op)]
    assert not missing, f"no kill landed in {missing}: {summary['kills_by_op']}"


def test_log_parser_ignores_a_torn_last_line(tmp_path: Path) -> None:
    """Only complete COMMITTED lines count; the one BEGIN without its COMMITTED is in flight."""
    log = tmp_path / "log"
    begin = json.dumps({"op": "gc", "i": 0})
    done = json.dumps({"op": "gc", "i": 0, "oids": ["-"]})
    second = json.dumps({"op": "delete", "ref": "m:1.0.0", "i": 1})
    log.write_text(f"READY\nBEGIN 0 {begin}\nCOMMITTED gc - - {done}\nBEGIN 1 {second}\nCOMMITTED dele")
    view = harness._parse_log(log)
    assert [op["op"] for op in view.committed] == ["gc"]
    assert view.inflight is not None and view.inflight["op"] == "delete"


def test_state_model_applies_operations() -> None:
    state = harness.StoreState()
    items = [{"name": "m", "version": "1.1.0"}, {"name": "m", "version": "1.2.0"}]
    state.apply({"op": "save_many", "items": items})
    state.apply({"op": "set_alias", "name": "m", "alias": "prod", "version": "1.1.0"})
    state.apply({"op": "archive", "ref": "m:1.2.0"})
    assert state.refs == {"m:1.1.0": "hot", "m:1.2.0": "archive"}
    state.apply({"op": "delete", "ref": "m:1.1.0"})
    assert state.refs == {"m:1.2.0": "archive"} and state.aliases == {}


def test_payloads_are_deterministic() -> None:
    a = harness.tensors_for("alpha", "1.3.0")
    b = harness.tensors_for("alpha", "1.3.0")
    assert harness.check_tensors("alpha", "1.3.0", b) is None
    assert set(a) == set(b)
    other = harness.tensors_for("alpha", "1.4.0")
    assert harness.check_tensors("alpha", "1.3.0", other) is not None
    # org/gamma has three distinct payloads: object-level dedup between versions.
    assert harness.check_tensors("org/gamma", "1.1.0", harness.tensors_for("org/gamma", "1.4.0")) is None
