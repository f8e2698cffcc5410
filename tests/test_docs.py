"""README.md and .ci/run must agree: CI runs exactly the test command the README gives."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_readme_opens_with_two_commands() -> None:
    commands = _readme_commands()
    assert len(commands) >= 2
    install_demo, run_tests = commands[0], commands[1]
    assert "hydra-cas demo" in install_demo
    assert "pytest" in run_tests


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci


def test_format_doc_states_a_version() -> None:
    from hydra_cas.manifest import FORMAT_VERSION

    text = (ROOT / "docs" / "FORMAT.md").read_text()
    assert f"Format version: **{FORMAT_VERSION}**" in text
    for word in ("MUST", "MAY", "objects/sha256", "manifest.json", "journal.jsonl"):
        assert word in text
