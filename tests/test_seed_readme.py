"""The prototype README's snippets run unchanged against hydra_cas.

The snippets are read from the prototype's README at test time (only the
import line is rewritten to ``from hydra_cas import ModelPersistenceManager``),
so the test breaks if either the README or the compatibility layer drifts.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hydra_cas import ModelPersistenceManager

_HERE = Path(__file__).resolve()
_CANDIDATES = [
    os.environ.get("HYDRA_SEED_README", ""),
    str(_HERE.parents[2] / "shared" / "seeds" / "000_b00ed57fd2190cd2.txt"),
    "/work/shared/seeds/000_b00ed57fd2190cd2.txt",
]
OLD_IMPORT = "from hydra_persistence import ModelPersistenceManager"
NEW_IMPORT = "from hydra_cas import ModelPersistenceManager"


def _readme_text() -> str:
    for candidate in _CANDIDATES:
        if candidate and Path(candidate).is_file():
            return Path(candidate).read_text(encoding="utf-8")
    pytest.skip("the prototype README is not available (set HYDRA_SEED_README)")


def _snippet(text: str, heading: str) -> str:
    """The first ```python block after the markdown heading ``heading``."""
    match = re.search(rf"^#+\s*{re.escape(heading)}\s*$", text, flags=re.MULTILINE)
    assert match, f"heading {heading!r} not found in the README"
    block = re.search(r"```python\n(.*?)```", text[match.end() :], flags=re.DOTALL)
    assert block, f"no python block under {heading!r}"
    return block.group(1)


@pytest.fixture
def snippets() -> dict[str, str]:
    text = _readme_text()
    out = {
        key: _snippet(text, heading)
        for key, heading in {
            "quick": "Quick Start",
            "parallel": "Parallel Model Loading",
            "versions": "Version Management",
            "integrity": "Data Integrity",
        }.items()
    }
    assert OLD_IMPORT in out["quick"]
    out["quick"] = out["quick"].replace(OLD_IMPORT, NEW_IMPORT)
    for key, code in out.items():
        assert "hydra_persistence" not in code, key
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(code: str, namespace: dict[str, Any]) -> dict[str, Any]:
    exec(compile(code, "<README snippet>", "exec"), namespace)
    return namespace


def _versions_namespace(workdir: Path) -> dict[str, Any]:
    rng = np.random.default_rng(42)
    return {
        "manager": ModelPersistenceManager(base_storage_path="./my_ai_models"),
        "model_v1": {"weights": rng.random((8, 4)), "bias": rng.random(4)},
        "model_v1_1": {"weights": rng.random((8, 4)), "bias": rng.random(4)},
        "model_v2": {
            "weights": rng.random((16, 4)),
            "bias": rng.random(4),
            "scale": np.float64(2.0) * np.ones(1),
        },
    }


def test_quick_start(snippets, workdir, capsys):
    ns = _run(snippets["quick"], {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "Model loaded successfully!" in out
    assert "'weights'" in out and "'bias'" in out
    assert "  - my-cool-model:1.0.0" in out
    assert isinstance(ns["manager"], ModelPersistenceManager)
    loaded = ns["loaded_model"]
    for key in ("weights", "bias"):
        np.testing.assert_array_equal(loaded[key], ns["my_model_weights"][key])
    assert loaded["weights"].shape == (128, 256)
    store_dir = workdir / "my_ai_models"
    assert (store_dir / "manifest.json").is_file()
    assert ns["manager"].store.info("my-cool-model", "1.0.0").metadata == {
        "description": "My first model version."
    }
    assert [row[:2] for row in ns["manager"].list_models()] == [("my-cool-model", "1.0.0")]


def test_parallel_model_loading(snippets, workdir, capsys):
    manager = ModelPersistenceManager(base_storage_path="./my_ai_models")
    a = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}
    b = {"emb": np.ones((5, 2), dtype=np.float64), "ids": np.arange(5, dtype=np.int64)}
    assert manager.save_model("model-a", "1.0.0", a)
    assert manager.save_model("model-b", "2.1.0", b)
    ns = _run(snippets["parallel"], {"manager": manager})
    loaded = ns["loaded_models"]
    assert set(loaded) == {"model-a:1.0.0", "model-b:2.1.0"}
    np.testing.assert_array_equal(loaded["model-a:1.0.0"]["w"], a["w"])
    np.testing.assert_array_equal(loaded["model-b:2.1.0"]["ids"], b["ids"])
    out = capsys.readouterr().out
    assert "Loaded model-a:1.0.0 with keys: ['w']" in out
    assert "Loaded model-b:2.1.0 with keys:" in out


def test_parallel_model_loading_leaves_out_failures(snippets, workdir):
    manager = ModelPersistenceManager(base_storage_path="./my_ai_models")
    assert manager.save_model("model-a", "1.0.0", {"w": np.ones(3)})  # model-b is missing
    ns = _run(snippets["parallel"], {"manager": manager})
    assert set(ns["loaded_models"]) == {"model-a:1.0.0"}


def test_version_management(snippets, workdir):
    ns = _versions_namespace(workdir)
    _run(snippets["versions"], ns)
    latest = ns["latest"]
    assert set(latest) == set(ns["model_v2"])
    for key in latest:
        np.testing.assert_array_equal(latest[key], ns["model_v2"][key])
    versions = [row[1] for row in ns["manager"].list_models() if row[0] == "my-model"]
    assert versions == ["1.0.0", "1.1.0", "2.0.0"]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_data_integrity(snippets, workdir, caplog, corrupt, damage):
    ns = _versions_namespace(workdir)
    _run(snippets["versions"], ns)
    manager = ns["manager"]
    corrupt(manager.store.path("my-model", "1.0.0"), damage)
    caplog.clear()
    ns.pop("loaded_model", None)
    with caplog.at_level(logging.DEBUG):
        _run(snippets["integrity"], ns)
    assert "loaded_model" in ns and ns["loaded_model"] is None
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert critical, "no CRITICAL record for a corrupt model"
    assert any("checksum mismatch" in m.lower() and "my-model:1.0.0" in m for m in critical), critical
    # the other versions are still fine
    np.testing.assert_array_equal(manager.load_model("my-model", "2.0.0")["bias"], ns["model_v2"]["bias"])


def test_facade_failures_return_falsy(workdir, caplog):
    manager = ModelPersistenceManager(base_storage_path="./my_ai_models")
    assert manager.load_model("nope") is None
    assert manager.save_model("../evil", "1.0.0", {"w": np.ones(2)}) is False
    assert manager.save_model("ok", "1.0.0", {"w": np.ones(2)}) is True
    assert manager.save_model("ok", "1.0.0", {"w": np.zeros(2)}) is False  # immutable
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("../evil" in m for m in errors)
    assert not (workdir / "evil").exists()
