"""Model names, versions, aliases, and how a requested version resolves.

Names never become paths (objects are named by digests), but they are still held
to a narrow pattern so that they read well in a shell, in JSON and in logs, and
so that ``name:version`` splits unambiguously.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from hydra_cas.errors import InvalidNameError, InvalidVersionError, NotFoundError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = [
    "MAX_NAME_LEN",
    "MAX_VERSION_LEN",
    "LATEST",
    "check_name",
    "check_alias",
    "canonical_version",
    "split_ref",
    "resolve_version",
    "latest_of",
]

MAX_NAME_LEN = 128
MAX_VERSION_LEN = 64
LATEST = "latest"

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_NAME_RE = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})?")
_ALIAS_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_SPECIFIER_CHARS = frozenset("<>=!~,")


def shown(value: str, limit: int = 60) -> str:
    """``repr`` of a caller's string, cut to ``limit``: safe to put in a message or a log."""
    return _shown(value, limit)


def _shown(value: str, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_name(name: object) -> str:
    """Return ``name`` if it is a valid model name, else raise InvalidNameError."""
    if not isinstance(name, str):
        raise InvalidNameError(f"model name must be a str, got {type(name).__name__}")
    if len(name) > MAX_NAME_LEN:
        raise InvalidNameError(f"model name is {len(name)} characters long; the limit is {MAX_NAME_LEN}")
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidNameError(
            f"invalid model name {_shown(name)}: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, optionally 'org/model'; no '..', spaces, "
            "control characters or other '/'"
        )
    return name


def check_alias(alias: object) -> str:
    """Return ``alias`` if it is a valid alias, else raise InvalidNameError."""
    if not isinstance(alias, str):
        raise InvalidNameError(f"alias must be a str, got {type(alias).__name__}")
    if not _ALIAS_RE.fullmatch(alias):
        raise InvalidNameError(
            f"invalid alias {_shown(alias)}: start with a letter, then up to 63 letters, digits, '_' or '-'"
        )
    if alias == LATEST:
        raise InvalidNameError("'latest' is reserved: it always means the highest version")
    if _parse_version(alias) is not None:
        raise InvalidNameError(f"alias {alias!r} reads as a version number; pick a word such as 'champion'")
    return alias


def _parse_version(text: str) -> Version | None:
    if len(text) > MAX_VERSION_LEN:
        return None
    try:
        return Version(text)
    except (InvalidVersion, ValueError):  # ValueError: Python's limit on digits in an int
        return None


def canonical_version(version: object) -> str:
    """Normalise a PEP 440 or semantic version string; raise InvalidVersionError."""
    if not isinstance(version, str):
        raise InvalidVersionError(f"version must be a str such as '1.0.0', got {type(version).__name__}")
    if len(version) > MAX_VERSION_LEN:
        raise InvalidVersionError(
            f"version is {len(version)} characters long; the limit is {MAX_VERSION_LEN}"
        )
    parsed = _parse_version(version)
    if parsed is None:
        raise InvalidVersionError(
            f"invalid version {_shown(version)}: use a PEP 440 or semantic version "
            "such as '1.0.0', '2.1.0rc1' or '1.0.0-alpha.1'"
        )
    return str(parsed)


def split_ref(ref: str, *, default_version: str | None = LATEST) -> tuple[str, str]:
    """Split ``name[:version]``; the version defaults to ``default_version``."""
    name, sep, version = ref.rpartition(":")
    if not sep:
        if default_version is None:
            raise InvalidVersionError(f"{_shown(ref)} has no version; write NAME:VERSION")
        return check_name(ref), default_version
    if not version:
        raise InvalidVersionError(f"{_shown(ref)} has an empty version after ':'")
    return check_name(name), version


def latest_of(versions: Iterable[str]) -> str | None:
    """The highest release; pre-releases count only when no release exists."""
    parsed = [(Version(v), v) for v in versions]
    if not parsed:
        return None
    releases = [p for p in parsed if not p[0].is_prerelease]
    return max(releases or parsed)[1]


def resolve_version(name: str, requested: str, versions: Iterable[str], aliases: Mapping[str, str]) -> str:
    """Turn ``latest``, an exact version, a specifier or an alias into a version key.

    ``versions`` are the model's existing version keys (canonical form).
    """
    existing = list(versions)
    if not isinstance(requested, str):
        raise InvalidVersionError(f"version must be a str, got {type(requested).__name__}")
    if requested == LATEST:
        found = latest_of(existing)
        if found is None:
            raise NotFoundError(f"model {name!r} has no versions")
        return found
    if requested in aliases:
        return aliases[requested]
    if len(requested) > 200 and any(ch in _SPECIFIER_CHARS for ch in requested):
        raise InvalidVersionError(f"version specifier {_shown(requested)} is longer than 200 characters")
    if len(requested) > 200:  # longer than any version or alias we accept
        raise NotFoundError(f"{name}:{_shown(requested)} not found: no version, alias or range is that long")
    # An exact version first: "1!2.0" has an epoch, not a specifier's "!=".
    parsed = _parse_version(requested)
    if parsed is None and any(ch in _SPECIFIER_CHARS for ch in requested):
        return _resolve_specifier(name, requested, existing)
    if parsed is None:
        raise NotFoundError(
            f"{name}:{_shown(requested)} not found: it is neither a version, a specifier "
            f"nor an alias of {name!r} (aliases: {', '.join(sorted(aliases)) or 'none'})"
        )
    for version in existing:
        if Version(version) == parsed:
            return version
    raise NotFoundError(f"{name}:{_shown(requested)} not found; available versions: {_listing(existing)}")


def _resolve_specifier(name: str, requested: str, existing: list[str]) -> str:
    if len(requested) > 200:
        raise InvalidVersionError("version specifier is longer than 200 characters")
    try:
        spec = SpecifierSet(requested)
    except InvalidSpecifier:
        raise InvalidVersionError(
            f"invalid version specifier {_shown(requested)}; write e.g. '>=1.0,<2'"
        ) from None
    matches = list(spec.filter(existing))
    if not matches:
        matches = list(spec.filter(existing, prereleases=True))
    if not matches:
        raise NotFoundError(f"no version of {name!r} matches {requested!r}; available: {_listing(existing)}")
    return max(matches, key=Version)


def _listing(versions: list[str]) -> str:
    if not versions:
        return "none"
    ordered = sorted(versions, key=Version)
    shown = ", ".join(ordered[-10:])
    return shown if len(ordered) <= 10 else f"... {shown}"
