"""The ``hydra-cas`` command line, run the way users run it: as a separate process.

Each command runs through ``python -m hydra_cas`` with stdout and stderr
captured apart, so the tests see exit codes, what lands on which stream, and any
traceback exactly as a shell would.  Stores are built through the CLI itself
where the command is under test, and through the library where they are only
the setting (a subprocess costs about a quarter of a second).  A few breadth
checks call ``cli.main`` in-process; those restore the logging state main()
changes, because other test modules watch the ``hydra_cas`` loggers.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hydra_cas import Store, __version__, cli

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS = REPO_ROOT / "tests" / "corpus" / "safetensors"
BAD_FILES = sorted(CORPUS.glob("bad_*.safetensors"))

# The fields `ls --json` and `show --json` give for every version (docs/FORMAT.md's
# version record plus where it sits in its model).
VERSION_FIELDS = {
    "name", "version", "oid", "blake3", "size", "tensors", "parameters", "dtypes", "created",
    "metadata", "tier", "parent", "status", "aliases", "latest",
}
SUBCOMMANDS = ["save", "export", "ls", "show", "rm", "alias", "du", "gc", "fsck", "archive", "restore",
               "demo"]


# ---------------------------------------------------------------------------- running the CLI


def cli_env(store: Path | str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.pop("HYDRA_STORE", None)
    if store is not None:
        env["HYDRA_STORE"] = str(store)
    return env


def run(cwd: Path, *args: str | os.PathLike[str], env_store: Path | str | None = None,
        stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    """``hydra-cas ARGS`` in ``cwd``; HYDRA_STORE is set only when ``env_store`` is given."""
    return subprocess.run(
        [sys.executable, "-m", "hydra_cas", *map(str, args)],
        cwd=cwd, env=cli_env(env_store), stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    """Assert success with a silent stderr (no logs, no progress bar); return stdout."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.stderr == "", f"a successful command wrote to stderr:\n{proc.stderr}"
    return proc.stdout


def refused(proc: subprocess.CompletedProcess[str], code: int | None = None) -> str:
    """Assert a clean refusal: non-zero exit, one ``hydra-cas:`` line on stderr, nothing else."""
    assert proc.returncode != 0, f"expected a failure, got exit 0\nstdout:\n{proc.stdout}"
    if code is not None:
        assert proc.returncode == code, f"exit {proc.returncode}, expected {code}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr + (proc.stdout or "")
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert lines[0].startswith("hydra-cas:"), lines[0]
    assert not proc.stdout, f"a refused command wrote to stdout:\n{proc.stdout}"
    return lines[0]


def as_json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------------- fixtures and helpers


def tensors_for(seed: int, width: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layer.weight": rng.standard_normal((width, width)).astype(np.float32),
        "layer.bias": rng.standard_normal(width).astype(np.float32),
        "step": np.array([seed], dtype=np.int64),
    }


def write_st(path: Path, seed: int, width: int = 8) -> Path:
    save_file(tensors_for(seed, width), str(path))
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def object_path(store: Path, oid: str) -> Path:
    return store / "objects" / "sha256" / oid[:2] / oid[2:]


def flip_last_byte(path: Path) -> None:
    os.chmod(path, 0o644)  # objects are read-only by design
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Three different safetensors files written by safetensors itself."""
    return {k: write_st(tmp_path / f"{k}.safetensors", seed) for k, seed in (("a", 1), ("b", 2), ("c", 3))}


@pytest.fixture
def populated(tmp_path: Path, files: dict[str, Path]) -> Path:
    """A store with m:1.0 (a), m:1.1 (b, parent 1.0) and other:2.0 (a again), built by the library."""
    root = tmp_path / "store"
    store = Store(root)
    store.import_file(files["a"], "m", "1.0", metadata={"stage": "base"})
    store.import_file(files["b"], "m", "1.1", parent="1.0")
    store.import_file(files["a"], "other", "2.0")
    return root


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store for the read-only refusal cases: m:1.0 and a file to save."""
    base = tmp_path_factory.mktemp("shared")
    write_st(base / "a.safetensors", 1)
    Store(base / "store").import_file(base / "a.safetensors", "m", "1.0")
    return base


@pytest.fixture
def main_in_process(capsys: pytest.CaptureFixture[str]):
    """``call(*argv) -> (exit, stdout, stderr)`` through ``cli.main``, logging state restored."""
    log = logging.getLogger("hydra_cas")
    saved = (list(log.handlers), log.level, log.propagate)

    def call(*argv: str | os.PathLike[str]) -> tuple[int, str, str]:
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    yield call
    log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]


# ---------------------------------------------------------------------------- demo


def test_demo_on_the_default_store_twice_then_fsck(tmp_path: Path) -> None:
    story = ok(run(tmp_path, "demo"))  # no --store, no HYDRA_STORE: ./hydra_models
    assert (tmp_path / "hydra_models" / "manifest.json").is_file()
    assert "latest" in story and "->" in story  # latest resolution
    assert "deduplicated=True" in story and "new bytes on disk: 0" in story
    assert "parallel" in story.lower()
    assert "checksum mismatch" in story and "refused" in story  # the flipped bit was caught
    assert "new object" in story

    again = ok(run(tmp_path, "demo"))
    assert "new object" not in again
    assert again.count("already stored") >= 4
    report = ok(run(tmp_path, "fsck"))
    assert "clean" in report
    listing = as_json(run(tmp_path, "ls", "--json"))
    assert {v["name"] for v in listing} >= {"alpha-regressor", "genesis-vectorizer"}


# ---------------------------------------------------------------------------- save


def test_save_safetensors_keeps_its_bytes_meta_and_parent(tmp_path: Path, files: dict[str, Path]) -> None:
    store = tmp_path / "store"
    saved = as_json(run(tmp_path, "--store", store, "save", files["a"], "m:1.0", "--json",
                        "--meta", "lr=0.01", "--meta", "epochs=3", "--meta", 'tags=["x", 2]',
                        "--meta", "final=true", "--meta", "note=plain text", "--meta", "empty="))
    assert saved["oid"] == sha256_of(files["a"])
    assert saved["size"] == files["a"].stat().st_size
    assert (saved["name"], saved["version"]) == ("m", "1.0")
    assert saved["deduplicated"] is False and saved["unchanged"] is False
    assert object_path(store, saved["oid"]).read_bytes() == files["a"].read_bytes()

    line = ok(run(tmp_path, "--store", store, "save", files["b"], "m:1.1", "--parent", "1.0"))
    assert "m:1.1" in line and sha256_of(files["b"]) in line

    first = as_json(run(tmp_path, "--store", store, "show", "m:1.0", "--json"))
    assert first["metadata"] == {"lr": 0.01, "epochs": 3, "tags": ["x", 2], "final": True,
                                 "note": "plain text", "empty": ""}
    second = as_json(run(tmp_path, "--store", store, "show", "m", "--json"))
    assert (second["version"], second["parent"], second["latest"]) == ("1.1", "1.0", True)

    # The same bytes again under the same version: a no-op, said so.
    again = as_json(run(tmp_path, "--store", store, "save", files["a"], "m:1.0", "--json"))
    assert again["unchanged"] is True and again["oid"] == saved["oid"]


def test_saving_other_bytes_under_an_existing_version_is_refused(
    tmp_path: Path, populated: Path, files: dict[str, Path], snapshot
) -> None:
    before = snapshot(populated)
    message = refused(run(tmp_path, "--store", populated, "save", files["c"], "m:1.0"), code=4)
    assert "m:1.0" in message and "exists" in message
    assert snapshot(populated) == before


def test_save_npz_then_export_round_trips(tmp_path: Path) -> None:
    arrays = {"w": np.arange(12, dtype=np.float64).reshape(3, 4), "ids": np.array([3, 1, 2], dtype=np.int32)}
    np.savez(tmp_path / "weights.npz", **arrays)
    store = tmp_path / "store"
    saved = as_json(run(tmp_path, "--store", store, "save", "weights.npz", "np-model:0.1", "--json"))
    record = as_json(run(tmp_path, "--store", store, "show", "np-model:0.1", "--json"))
    assert record["oid"] == saved["oid"]
    assert (record["tensors"], record["parameters"], record["dtypes"]) == (2, 15, ["F64", "I32"])
    assert {t["name"]: t["shape"] for t in record["tensor_list"]} == {"w": [3, 4], "ids": [3]}

    ok(run(tmp_path, "--store", store, "export", "np-model", "out.safetensors"))
    assert sha256_of(tmp_path / "out.safetensors") == saved["oid"]
    loaded = load_file(str(tmp_path / "out.safetensors"))
    assert set(loaded) == set(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(loaded[key], value)
        assert loaded[key].dtype == value.dtype


@pytest.mark.parametrize("bad", ["bad_huge_claimed_header", "bad_nul_padding"])
def test_hostile_safetensors_is_refused_and_writes_nothing(
    tmp_path: Path, populated: Path, snapshot, bad: str
) -> None:
    before = snapshot(populated)
    proc = run(tmp_path, "--store", populated, "save", CORPUS / f"{bad}.safetensors", "m:9")
    message = refused(proc, code=2)
    assert f"{bad}.safetensors" in message
    assert snapshot(populated) == before


def test_every_corpus_file_is_refused_in_one_line(populated: Path, snapshot, main_in_process) -> None:
    assert len(BAD_FILES) > 20
    before = snapshot(populated)
    for path in BAD_FILES:
        code, out, err = main_in_process("--store", populated, "save", path, "m:9")
        assert code == 2, (path.name, err)
        assert out == "", path.name
        assert len(err.splitlines()) == 1 and err.startswith("hydra-cas: error: "), (path.name, err)
    assert snapshot(populated) == before


def test_bad_input_files_leave_no_store_behind(tmp_path: Path) -> None:
    store = tmp_path / "fresh"
    message = refused(run(tmp_path, "--store", store, "save", "missing.safetensors", "m:1"), code=2)
    assert "missing.safetensors" in message
    (tmp_path / "adir").mkdir()
    assert "not a regular file" in refused(run(tmp_path, "--store", store, "save", "adir", "m:1"))
    refused(run(tmp_path, "--store", store, "save", CORPUS / "bad_trailing_data.safetensors", "m:1"), code=2)
    assert not store.exists()


# ---------------------------------------------------------------------------- export


def test_export_is_byte_identical_and_asks_before_overwriting(
    tmp_path: Path, populated: Path, files: dict[str, Path]
) -> None:
    line = ok(run(tmp_path, "--store", populated, "export", "m:1.0", "out.safetensors"))
    assert "m:1.0" in line
    out = tmp_path / "out.safetensors"
    assert out.read_bytes() == files["a"].read_bytes()

    message = refused(run(tmp_path, "--store", populated, "export", "m", "out.safetensors"), code=2)
    assert "--force" in message and "exists" in message
    assert out.read_bytes() == files["a"].read_bytes()

    line = ok(run(tmp_path, "--store", populated, "export", "m", "out.safetensors", "--force"))
    assert "m:1.1" in line  # NAME alone means latest
    assert out.read_bytes() == files["b"].read_bytes()
    assert "directory" in refused(run(tmp_path, "--store", populated, "export", "m", "."), code=2)
    refused(run(tmp_path, "--store", populated, "export", "m", "no/such/dir/x.safetensors"), code=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(
        [*(f.name for f in files.values()), "out.safetensors"]
    )  # no temp file left next to the target


# ---------------------------------------------------------------------------- ls, show, du


def test_ls_show_du_human_and_json(tmp_path: Path, populated: Path, files: dict[str, Path]) -> None:
    ok(run(tmp_path, "--store", populated, "alias", "m", "champion", "1.0"))
    listing = ok(run(tmp_path, "--store", populated, "ls"))
    header, *rows = listing.splitlines()
    assert header.split()[:3] == ["NAME", "VERSIONS", "LATEST"]
    assert [r.split()[:3] for r in rows] == [["m", "2", "1.1"], ["other", "1", "2.0"]]
    assert "champion->1.0" in rows[0]

    versions = as_json(run(tmp_path, "--store", populated, "ls", "--json"))
    assert [(v["name"], v["version"]) for v in versions] == [("m", "1.0"), ("m", "1.1"), ("other", "2.0")]
    for v in versions:
        assert VERSION_FIELDS <= set(v)
    assert versions[0]["oid"] == versions[2]["oid"] == sha256_of(files["a"])
    assert versions[0]["aliases"] == ["champion"] and versions[1]["latest"] is True

    one = ok(run(tmp_path, "--store", populated, "ls", "m")).splitlines()
    assert one[0].split()[:2] == ["VERSION", "OID"] and len(one) == 3
    assert one[2].startswith("1.1 (latest)") and "champion" in one[1]
    in_json = as_json(run(tmp_path, "--store", populated, "ls", "m", "--json"))
    assert [v["version"] for v in in_json] == ["1.0", "1.1"]

    shown = ok(run(tmp_path, "--store", populated, "show", "m:champion"))
    assert shown.startswith("m:1.0\n") and sha256_of(files["a"]) in shown
    assert '"stage": "base"' in shown
    for tensor in ("layer.weight", "layer.bias", "step"):
        assert tensor in shown
    record = as_json(run(tmp_path, "--store", populated, "show", "m:1.0", "--json"))
    assert VERSION_FIELDS | {"tensor_list"} <= set(record)
    assert {t["name"]: (t["dtype"], t["shape"]) for t in record["tensor_list"]} == {
        "layer.weight": ("F32", [8, 8]), "layer.bias": ("F32", [8]), "step": ("I64", [1])}

    usage = as_json(run(tmp_path, "--store", populated, "du", "--json"))
    assert set(usage) >= {"models", "total", "tiers"}
    size_a, size_b = files["a"].stat().st_size, files["b"].stat().st_size
    assert usage["total"]["logical_bytes"] == 2 * size_a + size_b
    assert usage["total"]["stored_bytes"] == size_a + size_b
    assert usage["total"]["dedup_saved_bytes"] == size_a  # other:2.0 shares m:1.0's object
    assert [m["name"] for m in usage["models"]] == ["m", "other"]
    human = ok(run(tmp_path, "--store", populated, "du"))
    assert human.splitlines()[0].split()[:2] == ["NAME", "VERSIONS"]
    assert any(line.startswith("TOTAL") for line in human.splitlines())


def test_reading_a_missing_store_fails_and_creates_nothing(tmp_path: Path, main_in_process) -> None:
    missing = tmp_path / "nowhere"
    message = refused(run(tmp_path, "--store", missing, "ls"), code=3)
    assert "no store" in message and str(missing) in message
    for argv in (["du"], ["fsck"], ["fsck", "--repair"], ["gc", "--prune-now", "--force"], ["show", "m"],
                 ["rm", "m:1"], ["alias", "m", "champion", "1"], ["archive", "--keep-latest", "1"],
                 ["restore", "m:1"], ["export", "m", tmp_path / "x.safetensors"]):
        code, out, err = main_in_process("--store", missing, *argv)
        assert (code, out) == (3, ""), argv
        assert len(err.splitlines()) == 1 and "no store" in err, argv
    assert not missing.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_directory_that_is_not_a_store_is_refused(
    tmp_path: Path, files: dict[str, Path], main_in_process
) -> None:
    # gc removes old files from <store>/tmp: `--store ~` must not get that far.
    home = tmp_path / "home"
    (home / "tmp").mkdir(parents=True)
    precious = home / "tmp" / "notes.txt"
    precious.write_text("keep me")
    os.utime(precious, (1_000_000_000, 1_000_000_000))
    message = refused(run(tmp_path, "--store", home, "gc", "--prune-now", "--force"), code=2)
    assert "no hydra_cas store" in message and str(home) in message
    for argv in (["fsck", "--repair"], ["save", files["a"], "m:1"], ["demo"]):
        code, out, err = main_in_process("--store", home, *argv)
        assert (code, out) == (2, "") and "no hydra_cas store" in err, argv
    assert precious.read_text() == "keep me"
    assert sorted(p.name for p in home.iterdir()) == ["tmp"]
    # An empty directory is a fine place for a new store.
    (tmp_path / "empty").mkdir()
    assert "no models" in ok(run(tmp_path, "--store", tmp_path / "empty", "ls"))
    ok(run(tmp_path, "--store", tmp_path / "empty", "save", files["a"], "m:1"))


# ---------------------------------------------------------------------------- rm and aliases


def test_rm_and_aliases(tmp_path: Path, populated: Path, main_in_process) -> None:
    store = Store(populated, create=False)

    def aliases() -> dict[str, tuple[str, ...]]:
        return {v.ref: v.aliases for v in store.list()}

    line = ok(run(tmp_path, "--store", populated, "alias", "m", "champion", "1.0"))
    assert "champion" in line and "1.0" in line
    assert as_json(run(tmp_path, "--store", populated, "show", "m:champion", "--json"))["version"] == "1.0"

    message = refused(run(tmp_path, "--store", populated, "rm", "m:1.0"), code=4)
    assert "champion" in message
    assert aliases()["m:1.0"] == ("champion",)
    assert "exact version" in refused(run(tmp_path, "--store", populated, "rm", "m:latest"), code=2)

    out = ok(run(tmp_path, "--store", populated, "rm", "m:1.0", "--force"))
    assert "m:1.0" in out and "champion" in out
    assert aliases() == {"m:1.1": (), "other:2.0": ()}
    refused(run(tmp_path, "--store", populated, "show", "m:champion"), code=3)

    # The rest of the alias life cycle, in-process.
    assert main_in_process("--store", populated, "alias", "m", "prod", "1.1")[0] == 0
    code, out, _ = main_in_process("--store", populated, "show", "m:prod")
    assert code == 0 and out.startswith("m:1.1")
    code, _, err = main_in_process("--store", populated, "rm", "m:prod")
    assert code == 2 and "exact version" in err and "m:1.1" in err
    assert main_in_process("--store", populated, "alias", "--rm", "m", "prod")[0] == 0
    assert aliases()["m:1.1"] == ()
    assert main_in_process("--store", populated, "alias", "--rm", "m", "prod")[0] == 3
    assert main_in_process("--store", populated, "alias", "m", "prod")[0] == 2  # no VERSION
    assert main_in_process("--store", populated, "rm", "other:2.0") == (
        0, "removed other:2.0 (its bytes are freed by `hydra-cas gc` once nothing else uses them)\n", "")
    assert [v.ref for v in store.list()] == ["m:1.1"]


# ---------------------------------------------------------------------------- gc


def test_gc_dry_run_prune_now_and_json(tmp_path: Path, populated: Path, files: dict[str, Path]) -> None:
    oid_b = sha256_of(files["b"])
    obj = object_path(populated, oid_b)
    ok(run(tmp_path, "--store", populated, "rm", "m:1.1"))
    assert obj.exists()

    dry = ok(run(tmp_path, "--store", populated, "gc", "--dry-run", "--grace", "0"))
    assert "dry run" in dry and oid_b in dry
    assert obj.exists()

    plan = as_json(run(tmp_path, "--store", populated, "gc", "--json"))  # default grace: too young
    assert plan["deleted"] == [] and [o["oid"] for o in plan["kept_young"]] == [oid_b]
    assert obj.exists()

    assert "--force" in refused(run(tmp_path, "--store", populated, "gc", "--prune-now"), code=2)
    assert obj.exists()

    done = as_json(run(tmp_path, "--store", populated, "gc", "--prune-now", "--force", "--json"))
    assert done["deleted"] == [oid_b] and done["freed_bytes"] == files["b"].stat().st_size
    assert not obj.exists()
    assert object_path(populated, sha256_of(files["a"])).exists()
    assert "clean" in ok(run(tmp_path, "--store", populated, "fsck"))


# ---------------------------------------------------------------------------- fsck


def test_fsck_finds_a_flipped_byte_and_repair_quarantines_it(
    tmp_path: Path, populated: Path, files: dict[str, Path]
) -> None:
    clean = run(tmp_path, "--store", populated, "fsck")
    assert "clean" in ok(clean)

    oid_a = sha256_of(files["a"])
    flip_last_byte(object_path(populated, oid_a))
    found = run(tmp_path, "--store", populated, "fsck")
    assert found.returncode == 1 and found.stderr == ""
    assert oid_a in found.stdout and "m:1.0" in found.stdout and "other:2.0" in found.stdout

    report = run(tmp_path, "--store", populated, "fsck", "--json")
    assert report.returncode == 1
    doc = as_json(report)
    assert (doc["ok"], doc["exit_code"]) == (False, 1)
    [finding] = [f for f in doc["findings"] if f["severity"] == "error"]
    assert finding["oid"] == oid_a and sorted(finding["refs"]) == ["m:1.0", "other:2.0"]

    repaired = run(tmp_path, "--store", populated, "fsck", "--repair")
    # Documented: the exit status reflects what remains; a quarantined object and
    # its versions marked broken are reported as info only.
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "[repaired]" in repaired.stdout and "quarantine" in repaired.stdout
    assert "Traceback" not in repaired.stderr
    assert all(line.startswith("hydra-cas:") for line in repaired.stderr.splitlines())  # diagnostics only
    assert list((populated / "quarantine").iterdir())

    assert ok(run(tmp_path, "--store", populated, "fsck"))
    assert Store(populated, create=False).info("m", "1.0").status == "broken"
    refused(run(tmp_path, "--store", populated, "export", "m:1.0", "x.safetensors"), code=5)
    ok(run(tmp_path, "--store", populated, "export", "m:1.1", "y.safetensors"))
    assert (tmp_path / "y.safetensors").read_bytes() == files["b"].read_bytes()


def test_fsck_repair_rebuilds_a_garbage_manifest_from_the_journal(tmp_path: Path, populated: Path) -> None:
    Store(populated).set_alias("m", "champion", "1.1")
    before = as_json(run(tmp_path, "--store", populated, "ls", "--json"))
    (populated / "manifest.json").write_bytes(b"{ not json at all \x00")

    assert "fsck" in refused(run(tmp_path, "--store", populated, "ls"), code=2)
    found = run(tmp_path, "--store", populated, "fsck", "--json")
    assert found.returncode == 1 and found.stderr == ""
    assert [f["kind"] for f in as_json(found)["findings"]] == ["manifest-unreadable"]

    repaired = run(tmp_path, "--store", populated, "fsck", "--repair")
    assert repaired.returncode == 0 and "[repaired]" in repaired.stdout
    assert "Traceback" not in repaired.stderr
    assert any(p.name.startswith("manifest.json") for p in (populated / "quarantine").iterdir())
    assert as_json(run(tmp_path, "--store", populated, "ls", "--json")) == before
    ok(run(tmp_path, "--store", populated, "fsck"))


def test_fsck_sample_and_workers(populated: Path, main_in_process) -> None:
    code, out, err = main_in_process("--store", populated, "fsck", "--sample", "50", "--workers", "1",
                                     "--json")
    assert (code, err) == (0, "")
    assert json.loads(out)["sample"] == 50


# ---------------------------------------------------------------------------- archive tier


def test_archive_restore_and_export_of_an_archived_version(
    tmp_path: Path, files: dict[str, Path], snapshot
) -> None:
    store = tmp_path / "store"
    lib = Store(store)
    lib.import_file(files["a"], "m", "1.0")
    lib.import_file(files["b"], "m", "1.1", parent="1.0")
    lib.import_file(files["c"], "m", "1.2")

    def tiers() -> dict[str, str]:
        return {v.version: v.tier for v in lib.list("m")}

    before = snapshot(store)
    dry = ok(run(tmp_path, "--store", store, "archive", "--keep-latest", "1", "--dry-run"))
    assert dry.splitlines() == ["would archive m:1.0", "would archive m:1.1"]
    planned = as_json(run(tmp_path, "--store", store, "archive", "--keep-latest", "1", "--dry-run", "--json"))
    assert planned == {"would_archive": ["m:1.0", "m:1.1"]}
    assert snapshot(store) == before

    assert "archived m:1.0" in ok(run(tmp_path, "--store", store, "archive", "m:1.0"))
    assert tiers() == {"1.0": "archive", "1.1": "hot", "1.2": "hot"}
    assert not object_path(store, sha256_of(files["a"])).exists()

    bulk = as_json(run(tmp_path, "--store", store, "archive", "--keep-latest", "1", "--json"))
    assert [a["ref"] for a in bulk["archived"]] == ["m:1.1"]
    assert tiers() == {"1.0": "archive", "1.1": "archive", "1.2": "hot"}

    ok(run(tmp_path, "--store", store, "export", "m:1.0", "back.safetensors"))
    assert (tmp_path / "back.safetensors").read_bytes() == files["a"].read_bytes()
    shown = ok(run(tmp_path, "--store", store, "show", "m:1.1"))
    assert "archive" in shown and "layer.weight" in shown

    assert "now in the hot tier" in ok(run(tmp_path, "--store", store, "restore", "m:1.0"))
    assert "already in the hot tier" in ok(run(tmp_path, "--store", store, "restore", "m:1.0"))
    assert object_path(store, sha256_of(files["a"])).read_bytes() == files["a"].read_bytes()
    assert tiers() == {"1.0": "hot", "1.1": "archive", "1.2": "hot"}
    assert "clean" in ok(run(tmp_path, "--store", store, "fsck"))


# ---------------------------------------------------------------------------- user errors


USER_ERRORS = [
    (["save", "a.safetensors", "../x:1"], 2),
    (["save", "a.safetensors", "m:not-a-version"], 2),
    (["show", "nosuch"], 3),
    (["show", "m:9.9"], 3),
    (["export", "nosuch", "out.safetensors"], 3),
    (["alias", "m", "1.0", "1.0"], 2),
    (["archive"], 2),
]
MORE_USER_ERRORS = [
    (["save", "a.safetensors", "m"], 2),
    (["save", "a.safetensors", "m:1", "--meta", "novalue"], 2),
    (["save", "a.safetensors", "m:1", "--meta", "x=NaN"], 2),
    (["save", "a.safetensors", "m:2", "--parent", "7.7"], 3),
    (["save", "a.safetensors", "org/../x:1"], 2),
    (["save", "a.safetensors", "m:" + "1" * 80], 2),
    (["show", "../x"], 2),
    (["show", "m:>=5"], 3),
    (["show", "m:"], 2),
    (["ls", "nosuch"], 3),
    (["ls", "bad name"], 2),
    (["alias", "m", "latest", "1.0"], 2),
    (["alias", "m", "champion", "9"], 3),
    (["rm", "m"], 2),
    (["rm", "m:9"], 3),
    (["restore", "m:9"], 3),
    (["archive", "m:", "--keep-latest", "1"], 2),
    (["archive", "--older-than", "nan"], 2),
    (["archive", "--keep-latest", "-1"], 2),
    (["fsck", "--sample", "101"], 2),
    (["fsck", "--sample", "0"], 2),
    (["fsck", "--workers", "0"], 2),
    (["gc", "--prune-now"], 2),
]


@pytest.mark.parametrize(("argv", "code"), USER_ERRORS, ids=[" ".join(a) for a, _ in USER_ERRORS])
def test_user_errors_are_one_line_without_traceback(
    shared_store: Path, snapshot, argv: list[str], code: int
) -> None:
    store = shared_store / "store"
    before = snapshot(store)
    refused(run(shared_store, "--store", store, *argv), code=code)
    assert snapshot(store) == before


def test_more_user_errors_in_process(shared_store: Path, snapshot, main_in_process, monkeypatch) -> None:
    monkeypatch.chdir(shared_store)
    store = shared_store / "store"
    before = snapshot(store)
    for argv, want in MORE_USER_ERRORS:
        code, out, err = main_in_process("--store", store, *argv)
        assert (code, out) == (want, ""), (argv, err)
        assert len(err.splitlines()) == 1 and err.startswith("hydra-cas: error: "), (argv, err)
    assert snapshot(store) == before


@pytest.mark.parametrize("argv", [["ls", "--bogus"], ["gc", "--grace", "soon"], ["frobnicate"]])
def test_usage_errors_are_argparse_style(shared_store: Path, argv: list[str]) -> None:
    proc = run(shared_store, "--store", shared_store / "store", *argv)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("usage: hydra-cas")
    assert proc.stderr.splitlines()[-1].startswith("hydra-cas")


# ---------------------------------------------------------------------------- logging and progress


def test_verbose_shows_log_lines_and_quiet_shows_none(tmp_path: Path, files: dict[str, Path]) -> None:
    store = tmp_path / "store"
    Store(store).import_file(files["a"], "m", "1")
    loud = run(tmp_path, "-v", "--store", store, "save", files["b"], "m:2")
    assert loud.returncode == 0 and "Traceback" not in loud.stderr
    assert any(line.startswith("hydra-cas: INFO:") and "m:2" in line for line in loud.stderr.splitlines())
    after = run(tmp_path, "--store", store, "save", files["c"], "m:3", "--verbose")  # after the command too
    assert after.returncode == 0 and "hydra-cas: INFO:" in after.stderr


def test_an_integrity_error_is_reported_once(tmp_path: Path, populated: Path, files: dict[str, Path]) -> None:
    flip_last_byte(object_path(populated, sha256_of(files["b"])))
    message = refused(run(tmp_path, "--store", populated, "export", "m:1.1", "x.safetensors"), code=5)
    assert "checksum mismatch" in message
    assert not (tmp_path / "x.safetensors").exists()
    loud = run(tmp_path, "-v", "--store", populated, "export", "m:1.1", "x.safetensors")
    assert loud.returncode == 5 and "CRITICAL" in loud.stderr  # -v shows the library's own log line


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    big = write_st(tmp_path / "big.safetensors", 7, width=768)  # about 2.3 MB
    store = tmp_path / "store"
    # Every ok() in this file checks stderr is empty; here the payload is big enough
    # that each of these commands would have drawn a bar on a terminal.
    for argv in (["save", big, "big:1"], ["fsck"], ["archive", "big:1"],
                 ["export", "big:1", "again.safetensors"]):
        ok(run(tmp_path, "--store", store, *argv))
    assert (tmp_path / "again.safetensors").read_bytes() == big.read_bytes()


def test_progress_bar_appears_on_a_terminal(tmp_path: Path) -> None:
    """The control for the test above: the same export on a tty does draw a bar."""
    big = write_st(tmp_path / "big.safetensors", 7, width=256)
    Store(tmp_path / "store").import_file(big, "big", "1")
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "hydra_cas", "--store", "store", "export", "big:1", "out.safetensors"],
            cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=follower, timeout=120,
        )
    finally:
        os.close(follower)
    drawn = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO once the terminal is drained
            break
        if not chunk:
            break
        drawn += chunk
    os.close(leader)
    assert proc.returncode == 0
    assert b"export big:1" in drawn and b"%" in drawn


# ---------------------------------------------------------------------------- help, version, environment


def test_version_and_help(tmp_path: Path) -> None:
    version = ok(run(tmp_path, "--version"))
    assert version.strip() == f"hydra-cas {__version__}"
    top = ok(run(tmp_path, "--help"))
    for sub in SUBCOMMANDS:
        assert sub in top
    assert ok(run(tmp_path, "save", "--help")).startswith("usage: hydra-cas save")
    assert list(tmp_path.iterdir()) == []  # help creates no store


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help_of_each_subcommand(sub: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([sub, "--help"])
    assert exit_info.value.code == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"usage: hydra-cas {sub}") and err == ""
    assert "--store" in out and "--verbose" in out


def test_hydra_store_environment_variable(tmp_path: Path, files: dict[str, Path]) -> None:
    env_store = tmp_path / "from-env"
    ok(run(tmp_path, "save", files["a"], "m:1", env_store=env_store))
    assert (env_store / "manifest.json").is_file()
    assert not (tmp_path / "hydra_models").exists()
    assert [v["name"] for v in as_json(run(tmp_path, "ls", "--json", env_store=env_store))] == ["m"]
    # --store wins over the variable.
    refused(run(tmp_path, "--store", tmp_path / "elsewhere", "ls", env_store=env_store), code=3)
    # A relative HYDRA_STORE is taken from the working directory.
    assert [v["name"] for v in as_json(run(tmp_path, "ls", "--json", env_store="from-env"))] == ["m"]


def test_closed_stdout_is_not_a_traceback(tmp_path: Path, populated: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = run(tmp_path, "--store", populated, "ls", "--json", stdout=write_end)
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
