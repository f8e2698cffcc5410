"""Regenerate the hostile store corpus in ``tests/corpus/manifests/`` and ``tests/corpus/archive/``.

Run ``python tests/corpus/make_hostile_corpus.py`` from the repository root.  The output is
deterministic and built from the documented formats (docs/FORMAT.md and the frame layout in
``hydra_cas/codec.py``), not from library code, so the corpus also pins the formats down:
``tests/test_hostile.py`` checks that the committed files equal :func:`build_manifests` and
:func:`build_archive`, and that each one is refused.

``manifests/``
    ``manifest_*.json`` replace a store's ``manifest.json``; ``journal_*.jsonl`` replace its
    ``journal.jsonl`` (the test also deletes ``manifest.json`` to force a replay, and separately
    appends every line after the first to a real store's journal).  Every file breaks one rule
    and must be refused with ``ManifestError``.

``archive/``
    Replacement files for the recipes and tensor blobs of the small archived model described by
    :data:`BASE_TENSORS` (versions ``1.0`` and ``2.0``, ``2.0``'s parent being ``1.0``).  A case
    is one or more files named ``<case>.<target>``, where ``target`` is ``recipe-v1``,
    ``recipe-v2`` or ``blob-<tensor><version>``.  Loading the damaged version must raise
    ``IntegrityError`` without allocating or running away.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ARCHIVE_DIR",
    "BASE_TENSORS",
    "MANIFEST_DIR",
    "ArchiveCase",
    "base_payload",
    "build_archive",
    "build_manifests",
    "main",
    "tensor_ids",
]

HERE = Path(__file__).resolve().parent
MANIFEST_DIR = HERE / "manifests"
ARCHIVE_DIR = HERE / "archive"

# --------------------------------------------------------------------------------------------
# manifests and journals

FAKE_OID = "ab" * 32
FAKE_B3 = "cd" * 32
OTHER_OID = "ef" * 32
TIME = "2026-01-02T03:04:05.000006Z"


def _entry(**changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "oid": FAKE_OID,
        "blake3": FAKE_B3,
        "size": 96,
        "tensors": 1,
        "parameters": 4,
        "dtypes": ["F32"],
        "created": TIME,
        "metadata": {},
        "tier": "hot",
        "parent": None,
        "status": "ok",
    }
    entry.update(changes)
    return entry


def _manifest(models: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format_version": 1,
        "journal_seq": 1,
        "models": models if models is not None else {"m": {"versions": {"1.0": _entry()}, "aliases": {}}},
    }
    doc.update(top)
    return doc


def _one(entry: dict[str, Any] | None = None, aliases: dict[str, Any] | None = None,
         version: str = "1.0", name: str = "m") -> dict[str, Any]:
    return {name: {"versions": {version: entry or _entry()}, "aliases": aliases or {}}}


def _json(doc: Any) -> bytes:
    return json.dumps(doc, indent=1, ensure_ascii=False).encode("utf-8") + b"\n"


def _put(seq: int, version: str = "1.0", name: str = "m", **entry_changes: Any) -> dict[str, Any]:
    return {"seq": seq, "time": TIME, "op": "put", "name": name, "version": version,
            "entry": _entry(**entry_changes)}


def _line(record: Any) -> bytes:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def _journal(*records: Any) -> bytes:
    """A first, valid record (put m:1.0) followed by ``records`` (dicts or raw lines)."""
    out = [_line(_put(1))]
    for record in records:
        out.append(record if isinstance(record, bytes) else _line(record))
    return b"".join(out)


def build_manifests() -> dict[str, tuple[bytes, str, str]]:
    """name -> (content, rule broken, regex the ManifestError message must match)."""
    files: dict[str, tuple[bytes, str, str]] = {}

    def manifest(name: str, doc: Any, why: str, expect: str) -> None:
        files[f"manifest_{name}.json"] = (doc if isinstance(doc, bytes) else _json(doc), why, expect)

    def journal(name: str, content: bytes, why: str, expect: str) -> None:
        files[f"journal_{name}.jsonl"] = (content, why, expect)

    # --- manifest.json: digests and counts
    manifest("blake3_63_hex", _manifest(_one(_entry(blake3=FAKE_B3[:63]))),
             "blake3 digest one hex digit short", r"blake3")
    manifest("blake3_65_hex", _manifest(_one(_entry(blake3=FAKE_B3 + "0"))),
             "blake3 digest one hex digit long", r"blake3")
    manifest("blake3_uppercase", _manifest(_one(_entry(blake3=FAKE_B3.upper()))),
             "blake3 digest in upper case", r"blake3")
    manifest("oid_nul", _manifest(_one(_entry(oid=FAKE_OID[:40] + "\x00" + FAKE_OID[41:]))),
             "oid with a NUL in the middle", r"oid")
    manifest("oid_windows_path", _manifest(_one(_entry(oid="..\\..\\..\\windows\\system32\\" + "a" * 40))),
             "oid that is a Windows path", r"oid")
    manifest("tensors_negative", _manifest(_one(_entry(tensors=-1))), "negative tensor count", r"'tensors'")
    manifest("parameters_negative", _manifest(_one(_entry(parameters=-5))),
             "negative parameter count", r"'parameters'")
    manifest("tensors_bool", _manifest(_one(_entry(tensors=True))), "tensor count is true", r"'tensors'")
    manifest("parameters_bool", _manifest(_one(_entry(parameters=False))),
             "parameter count is false", r"'parameters'")
    manifest("journal_seq_bool", _manifest(journal_seq=True), "journal_seq is true", r"journal_seq")
    manifest("journal_seq_negative", _manifest(journal_seq=-1), "journal_seq is negative", r"journal_seq")
    manifest("size_float_exponent", _manifest(_one(_entry(size=1e3))), "size written as 1000.0", r"'size'")
    manifest("size_5000_digits", _json(_manifest(_one(_entry(size=0)))).replace(
        b'"size": 0', b'"size": ' + b"9" * 5000),
        "a 5000-digit size (beyond Python's int parsing limit)", r"JSON")
    # --- manifest.json: other fields of the wrong type
    manifest("dtypes_nested_list", _manifest(_one(_entry(dtypes=[["F32"]]))),
             "dtypes holds a list instead of a dtype name", r"dtypes")
    manifest("dtypes_object", _manifest(_one(_entry(dtypes=[{"F32": 1}]))),
             "dtypes holds an object instead of a dtype name", r"dtypes")
    manifest("dtypes_null", _manifest(_one(_entry(dtypes=None))), "dtypes is null", r"dtypes")
    manifest("created_number", _manifest(_one(_entry(created=1767322245))), "created is a number", r"created")
    manifest("created_garbage", _manifest(_one(_entry(created="yesterday at noonZ"))),
             "created is not a date", r"created")
    manifest("metadata_string", _manifest(_one(_entry(metadata="{}"))), "metadata is a string", r"metadata")
    manifest("tier_null", _manifest(_one(_entry(tier=None))), "tier is null", r"tier")
    manifest("status_bool", _manifest(_one(_entry(status=True))), "status is true", r"status")
    manifest("parent_list", _manifest(_one(_entry(parent=["1.0"]))), "parent is a list", r"parent")
    manifest("parent_number", _manifest(_one(_entry(parent=1.0))), "parent is a number", r"parent")
    manifest("entry_is_list", _manifest({"m": {"versions": {"1.0": [FAKE_OID]}, "aliases": {}}}),
             "version record is a list", r"JSON object")
    manifest("entry_is_oid_string", _manifest({"m": {"versions": {"1.0": FAKE_OID}, "aliases": {}}}),
             "version record is a bare oid", r"JSON object")
    # --- manifest.json: models, versions and aliases
    manifest("model_extra_field", _manifest({"m": {"versions": {"1.0": _entry()}, "aliases": {},
                                                   "path": "/etc"}}),
             "model has a 'path' field besides versions and aliases", r"exactly 'versions' and 'aliases'")
    manifest("model_missing_aliases", _manifest({"m": {"versions": {"1.0": _entry()}}}),
             "model lacks 'aliases'", r"exactly 'versions' and 'aliases'")
    manifest("model_is_list", _manifest({"m": [_entry()]}), "model is a list", r"exactly 'versions'")
    manifest("versions_is_list", _manifest({"m": {"versions": [_entry()], "aliases": {}}}),
             "versions is a list", r"must be objects")
    manifest("model_name_newline", _manifest(_one(name="m\n")), "model name ends with a newline",
             r"bad model name")
    manifest("model_name_cyrillic", _manifest(_one(name="m\u043edel")),
             "model name with a Cyrillic look-alike letter", r"bad model name")
    manifest("model_name_empty", _manifest(_one(name="")), "empty model name", r"bad model name")
    manifest("model_name_129_chars", _manifest(_one(name="a" * 129)), "model name of 129 characters",
             r"bad model name")
    manifest("model_name_absolute", _manifest(_one(name="/etc/passwd")), "model name is an absolute path",
             r"bad model name")
    manifest("model_name_colon", _manifest(_one(name="m:1.0")), "model name with a colon",
             r"bad model name")
    manifest("version_key_spaces", _manifest(_one(version=" 1.0 ")), "version key padded with spaces",
             r"normalised form")
    manifest("version_key_local_upper", _manifest(_one(version="1.0+ABC")),
             "local version segment not lower-cased", r"normalised form")
    manifest("version_key_epoch_zero", _manifest(_one(version="0!1.0")),
             "explicit zero epoch (normalises away)", r"normalised form")
    manifest("version_key_word", _manifest(_one(version="latest")), "version key 'latest'",
             r"PEP 440")
    manifest("version_key_10000_chars", _manifest(_one(version="1" + ".0" * 5000)),
             "version key of 10,001 characters", r"not a version string")
    manifest("alias_target_list", _manifest(_one(aliases={"prod": ["1.0"]})),
             "alias target is a list", r"prod")
    manifest("alias_target_object", _manifest(_one(aliases={"prod": {"version": "1.0"}})),
             "alias target is an object", r"prod")
    manifest("alias_target_number", _manifest(_one(aliases={"prod": 1.0})),
             "alias target is a number", r"prod")
    manifest("alias_reads_as_version", _manifest(_one(aliases={"v2": "1.0"})),
             "alias name that parses as a version", r"version")
    manifest("alias_newline", _manifest(_one(aliases={"prod\n": "1.0"})),
             "alias name ending with a newline", r"invalid alias")
    manifest("alias_nul", _manifest(_one(aliases={"pr\x00od": "1.0"})), "alias name with a NUL",
             r"invalid alias")
    manifest("alias_65_chars", _manifest(_one(aliases={"a" * 65: "1.0"})), "alias name of 65 characters",
             r"invalid alias")
    manifest("alias_to_equal_version", _manifest(_one(aliases={"prod": "1.0.0"})),
             "alias names 1.0.0 while the key is 1.0 (equal under PEP 440, not the same key)",
             r"not a version of the model")
    manifest("not_utf8", b'{"format_version": 1, "journal_seq": 0, "models": {"\xff": {}}}',
             "invalid UTF-8 in a key", r"JSON")
    manifest("nan_size", _json(_manifest(_one(_entry(size=0)))).replace(b'"size": 0', b'"size": NaN'),
             "size is NaN (not JSON)", r"'size'|JSON")

    # --- journal.jsonl (each breaks line 2 unless said otherwise)
    journal("oid_traversal", _journal(_put(2, "2.0", oid="../../../../../etc/passwd")),
            "put record whose oid climbs out of the store", r"oid")
    journal("oid_absolute", _journal(_put(2, "2.0", oid="/etc/passwd")),
            "put record whose oid is an absolute path", r"oid")
    journal("oid_nul", _journal(_put(2, "2.0", oid=OTHER_OID[:63] + "\x00")),
            "put record whose oid ends with NUL", r"oid")
    journal("oid_uppercase", _journal(_put(2, "2.0", oid=OTHER_OID.upper())),
            "put record whose oid is upper-case hex", r"oid")
    journal("blake3_short", _journal(_put(2, "2.0", blake3=FAKE_B3[:10])),
            "put record with a 10-digit blake3", r"blake3")
    journal("size_negative", _journal(_put(2, "2.0", size=-1)), "put record with a negative size",
            r"'size'")
    journal("size_bool", _journal(_put(2, "2.0", size=True)), "put record whose size is true", r"'size'")
    journal("entry_extra_field", _journal(_put(2, "2.0", path="/etc/passwd")),
            "put record whose entry has an unknown field", r"unknown \['path'\]")
    journal("entry_missing", _journal({k: v for k, v in _put(2, "2.0").items() if k != "entry"}),
            "put record without its entry", r"exactly the fields")
    journal("record_extra_field", _journal({**_put(2, "2.0"), "path": "/tmp/x"}),
            "record with an unknown top-level field", r"exactly the fields")
    journal("seq_gap", _journal(_put(3, "2.0")), "seq jumps from 1 to 3", r"seq 3; expected 2")
    journal("seq_duplicate", _journal(_put(1, "2.0")), "seq 1 appears twice", r"seq 1; expected 2")
    journal("seq_zero_first", _line(_put(0)), "the first record has seq 0", r"positive integer")
    journal("seq_bool", _journal({**_put(2, "2.0"), "seq": True}), "seq is true", r"positive integer")
    journal("seq_string", _journal({**_put(2, "2.0"), "seq": "2"}), "seq is a string", r"positive integer")
    journal("seq_float", _journal({**_put(2, "2.0"), "seq": 2.0}), "seq is 2.0", r"positive integer")
    journal("line_array", _journal(b'[2, "put", "m", "2.0"]\n'), "a line that is a JSON array",
            r"must be a JSON object")
    journal("line_null", _journal(b"null\n"), "a line that is null", r"must be a JSON object")
    journal("line_string", _journal(b'"put m 2.0"\n'), "a line that is a JSON string",
            r"must be a JSON object")
    journal("line_empty", _journal(b"\n", _put(2, "2.0")), "an empty line between records",
            r"not valid JSON")
    journal("line_two_records", _journal(_line(_put(2, "2.0"))[:-1] + _line(_put(3, "3.0"))),
            "two records on one line", r"not valid JSON")
    journal("line_invalid_utf8", _journal(_line(_put(2, "2.0")).replace(b'"m"', b'"\xff"')),
            "invalid UTF-8 in a record", r"not valid JSON")
    journal("line_deeply_nested", _journal(b"[" * 50_000 + b"]" * 50_000 + b"\n"),
            "a line nested 50,000 levels deep", r"not valid JSON")
    journal("unknown_op", _journal({"seq": 2, "time": TIME, "op": "chmod", "name": "m", "version": "1.0"}),
            "unknown op", r"unknown journal op")
    journal("op_null", _journal({"seq": 2, "time": TIME, "op": None, "name": "m"}), "op is null",
            r"unknown journal op")
    journal("time_missing_z", _journal({**_put(2, "2.0"), "time": TIME[:-1]}),
            "record time without the Z suffix", r"'time'")
    journal("name_traversal", _journal(_put(2, "2.0", name="../../etc")), "model name climbs out",
            r"invalid model name")
    journal("name_newline", _journal(_put(2, "2.0", name="m\n")), "model name ends with a newline",
            r"invalid model name")
    journal("name_not_string", _journal({**_put(2, "2.0"), "name": ["m"]}), "model name is a list",
            r"model name must be a str")
    journal("version_not_normalised", _journal(_put(2, "2.0.0-rc.1")), "version key not normalised",
            r"normalised form")
    journal("version_traversal", _journal(_put(2, "../1.0")), "version key is a path", r"PEP 440")
    journal("oid_change", _journal(_put(2, "1.0", oid=OTHER_OID)),
            "put changes the oid of an existing version", r"changes the oid")
    journal("alias_to_missing", _journal({"seq": 2, "time": TIME, "op": "alias", "name": "m",
                                           "alias": "prod", "version": "9.0"}),
            "alias to a version that does not exist", r"missing m:9\.0")
    journal("alias_invalid_name", _journal({"seq": 2, "time": TIME, "op": "alias", "name": "m",
                                             "alias": "../prod", "version": "1.0"}),
            "alias name that is a path", r"invalid alias")
    journal("alias_latest", _journal({"seq": 2, "time": TIME, "op": "alias", "name": "m",
                                       "alias": "latest", "version": "1.0"}),
            "alias named latest", r"reserved")
    journal("drop_missing", _journal({"seq": 2, "time": TIME, "op": "drop", "name": "m", "version": "9.0"}),
            "drop of a version that does not exist", r"absent")
    return files


# --------------------------------------------------------------------------------------------
# archive


def _base_arrays() -> dict[str, dict[str, np.ndarray]]:
    w1 = np.arange(256, dtype=np.float32) / np.float32(7)
    w2 = w1.copy()
    w2[::16] += np.float32(1)
    b = np.arange(16, dtype=np.uint8)
    z = (np.arange(16384, dtype=np.float32) % 251).astype(np.float32)
    return {"1.0": {"w": w1, "b": b, "z": z}, "2.0": {"w": w2, "b": b, "z": z}}


#: The archived model the archive corpus damages: ``m:1.0`` and ``m:2.0`` (parent ``1.0``).
BASE_TENSORS = _base_arrays()
_ITEMSIZE = {"F32": 4, "U8": 1, "F16": 2}
_DTYPE = {np.dtype(np.float32): "F32", np.dtype(np.uint8): "U8"}


def base_payload(version: str) -> tuple[bytes, bytes]:
    """(header bytes, payload) of ``m:<version>``, laid out as docs/FORMAT.md prescribes."""
    arrays = BASE_TENSORS[version]
    order = sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
    entries: dict[str, Any] = {}
    offset = 0
    for name in order:
        a = arrays[name]
        entries[name] = {"dtype": _DTYPE[a.dtype], "shape": list(a.shape),
                         "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-(8 + len(text)) % 8)
    header = struct.pack("<Q", len(text)) + text
    return header, header + b"".join(arrays[n].astype(arrays[n].dtype.newbyteorder("<")).tobytes()
                                     for n in order)


def tensor_ids() -> dict[str, str]:
    """``<tensor><version digit>`` (``w1``, ``w2``, ``b1``, ``z1``...) -> tid."""
    out = {}
    for version, arrays in BASE_TENSORS.items():
        for name, a in arrays.items():
            out[f"{name}{version[0]}"] = hashlib.sha256(a.tobytes()).hexdigest()
    return out


def _frame(method: int, raw_len: int, streams: list[bytes], *, layout: tuple[int, ...] = (0, 0, 0, 0, 0),
           crc_fix: int = 0) -> bytes:
    """A codec frame per the layout in hydra_cas/codec.py's docstring, with its CRC-32."""
    lay, chunk_log2, base, width, ebits = layout
    table = b"".join(struct.pack("<Q", len(s)) for s in streams)
    head = struct.pack("<4sBBBBHBB", b"HYCZ", 1, method, lay, chunk_log2, base, width, ebits)
    tail = struct.pack("<QQ", raw_len, len(streams))
    crc = zlib.crc32(head + b"\0\0\0\0" + tail + table)
    if method == 0:
        crc = zlib.crc32(streams[0], crc)
    return head + struct.pack("<I", (crc ^ crc_fix) & 0xFFFFFFFF) + tail + table + b"".join(streams)


def _blob(frame: bytes, raw_size: int, dtype: str, *, kind: int = 0, depth: int = 0, base: str | None = None,
          magic: bytes = b"HCT1", reserved: int = 0, dtype_field: bytes | None = None) -> bytes:
    """A tensor blob: the 64-byte header of docs/FORMAT.md, then ``frame``."""
    base_raw = bytes.fromhex(base) if base else bytes(32)
    field = dtype_field if dtype_field is not None else dtype.encode("ascii")
    return struct.pack("<4sBBHQ32s16s", magic, kind, depth, reserved, raw_size, base_raw, field) + frame


def _zstd_rle(content_size: int | None, blocks: int, block: int = 128 * 1024, *,
              checksum: bool = True) -> bytes:
    """A hand-made zstd frame (RFC 8878) of ``blocks`` RLE blocks of ``block`` zero bytes."""
    descriptor = (0xC0 if content_size is not None else 0) | (0x04 if checksum else 0)
    out = struct.pack("<I", 0xFD2FB528) + bytes([descriptor, (17 - 10) << 3])  # 128 KiB window
    if content_size is not None:
        out += struct.pack("<Q", content_size)
    for i in range(blocks):
        last = 1 if i == blocks - 1 else 0
        out += (last | (1 << 1) | (block << 3)).to_bytes(3, "little") + b"\0"
    return out + (b"\0\0\0\0" if checksum else b"")


class ArchiveCase:
    """One damaged archive: replacement files, the version it breaks, the expected message."""

    def __init__(self, why: str, version: str, expect: str, files: dict[str, bytes]) -> None:
        self.why = why
        self.version = version
        self.expect = expect
        self.files = files


def _recipe_doc(version: str) -> dict[str, Any]:
    header, payload = base_payload(version)
    oid = hashlib.sha256(payload).hexdigest()
    ids = tensor_ids()
    arrays = BASE_TENSORS[version]
    order = sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
    tensors = []
    pos = len(header)
    for name in order:
        n = arrays[name].nbytes
        tensors.append([ids[f"{name}{version[0]}"], pos, pos + n])
        pos += n
    return {"format_version": 1, "oid": oid, "size": len(payload),
            "header": base64.b64encode(header).decode("ascii"), "tensors": tensors}


def _recipe(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def build_archive() -> dict[str, ArchiveCase]:
    ids = tensor_ids()
    arrays = BASE_TENSORS
    w1, w2, b1 = (arrays["1.0"]["w"].tobytes(), arrays["2.0"]["w"].tobytes(), arrays["1.0"]["b"].tobytes())
    z_size = arrays["1.0"]["z"].nbytes
    cases: dict[str, ArchiveCase] = {}

    def recipe(case: str, version: str, why: str, expect: str, mutate: Any) -> None:
        doc = _recipe_doc(version)
        content = mutate(doc)
        target = f"recipe-v{version[0]}"
        cases[case] = ArchiveCase(why, version, expect,
                                  {target: content if isinstance(content, bytes) else _recipe(doc)})

    def setter(key: str, value: Any) -> Any:
        return lambda doc: doc.__setitem__(key, value)

    def header_of(obj: Any, size: int) -> Any:
        text = json.dumps(obj, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % 8)
        raw = struct.pack("<Q", len(text)) + text

        def mutate(doc: dict[str, Any]) -> None:
            doc["header"] = base64.b64encode(raw).decode()
            doc["size"] = len(raw) + size
            doc["tensors"] = [[ids["w1"], len(raw), len(raw) + size]]
        return mutate

    # --- recipes
    recipe("recipe_not_json", "1.0", "recipe is not JSON", r"not valid JSON", lambda d: b"\x00recipe")
    recipe("recipe_json_array", "1.0", "recipe is a JSON array", r"recipe fields",
           lambda d: _recipe(list(d.values())))
    recipe("recipe_extra_field", "1.0", "recipe has an extra 'path' field", r"recipe fields",
           setter("path", "/etc/passwd"))
    recipe("recipe_format_version_2", "1.0", "recipe format_version 2", r"format_version",
           setter("format_version", 2))
    recipe("recipe_other_oid", "1.0", "recipe names another payload", r"another payload",
           setter("oid", OTHER_OID))
    recipe("recipe_size_bool", "1.0", "recipe size is true", r"bad size", setter("size", True))
    recipe("recipe_size_tiny", "1.0", "recipe size below the 8-byte prefix", r"bad size", setter("size", 7))
    recipe("recipe_size_one_short", "1.0", "recipe size one byte short of the payload",
           r"stored header is invalid", lambda d: d.__setitem__("size", d["size"] - 1))
    recipe("recipe_header_not_base64", "1.0", "header holds characters outside base64",
           r"not base64", setter("header", "not*base64!"))
    recipe("recipe_header_with_newlines", "1.0", "header base64 wrapped with newlines",
           r"not base64", lambda d: d.__setitem__("header", d["header"][:20] + "\n" + d["header"][20:]))
    recipe("recipe_header_number", "1.0", "header is a number", r"not base64", setter("header", 12345))
    recipe("recipe_header_not_ascii", "1.0", "header holds non-ASCII text", r"not base64",
           setter("header", "\u00e9t\u00e9"))
    recipe("recipe_header_garbage", "1.0", "header decodes to bytes that are not safetensors",
           r"stored header is invalid", setter("header", base64.b64encode(b"\xff" * 24).decode()))
    recipe("recipe_header_trailing", "1.0", "header has 8 extra bytes after the padding",
           r"trailing bytes|offsets disagree|stored header is invalid",
           lambda d: d.__setitem__("header",
                                   base64.b64encode(base64.b64decode(d["header"]) + bytes(8)).decode()))
    recipe("recipe_header_other_tensors", "1.0", "header lists one tensor, the recipe three",
           r"does not match its header", lambda d: (header_of({"w": {"dtype": "F32", "shape": [256],
                                                                      "data_offsets": [0, 1024]}}, 1024)(d),
                                                     d["tensors"].append(d["tensors"][0])))
    recipe("recipe_tensors_object", "1.0", "tensors is an object", r"does not match its header",
           lambda d: d.__setitem__("tensors", {"w": d["tensors"][0]}))
    recipe("recipe_offsets_shifted", "1.0", "a tensor's begin and end both shifted by one",
           r"offsets disagree", lambda d: d["tensors"][0].__setitem__(slice(1, 3),
                                                                        [d["tensors"][0][1] + 1,
                                                                         d["tensors"][0][2] + 1]))
    recipe("recipe_offsets_float", "1.0", "offsets written as floats (equal in value)",
           r"non-integer offsets", lambda d: d["tensors"][0].__setitem__(1, float(d["tensors"][0][1])))
    recipe("recipe_offsets_bool", "1.0", "a zero offset written as false",
           r"non-integer offsets|offsets disagree",
           lambda d: d["tensors"][0].__setitem__(1, False))
    recipe("recipe_entry_two_values", "1.0", "a tensor entry without its end offset",
           r"malformed tensor entry", lambda d: d["tensors"][0].pop())
    recipe("recipe_entry_string", "1.0", "a tensor entry that is a string", r"malformed tensor entry",
           lambda d: d["tensors"].__setitem__(0, "w"))
    recipe("recipe_tid_not_hex", "1.0", "a tid of 64 non-hex characters", r"bad tensor id",
           lambda d: d["tensors"][0].__setitem__(0, "zz" * 32))
    recipe("recipe_tid_uppercase", "1.0", "a tid in upper-case hex", r"bad tensor id",
           lambda d: d["tensors"][0].__setitem__(0, d["tensors"][0][0].upper()))
    recipe("recipe_tid_traversal", "1.0", "a tid that climbs out of the store", r"bad tensor id",
           lambda d: d["tensors"][0].__setitem__(0, "../../../../../../../../etc/passwd"))
    recipe("recipe_tid_null", "1.0", "a non-empty tensor with a null tid", r"bad tensor id",
           lambda d: d["tensors"][0].__setitem__(0, None))
    recipe("recipe_tid_missing_blob", "1.0", "a tid with no blob in the archive", r"missing from the archive",
           lambda d: d["tensors"][0].__setitem__(0, OTHER_OID))
    recipe("recipe_tids_swapped", "1.0", "the tids of two tensors of different sizes swapped",
           r"holds \d+ bytes of \w+, expected",
           lambda d: d["tensors"].__setitem__(slice(0, 2), [[d["tensors"][1][0], *d["tensors"][0][1:]],
                                                           [d["tensors"][0][0], *d["tensors"][1][1:]]]))
    recipe("recipe_claims_terabyte", "1.0", "the header claims a 1 TiB tensor made of an existing blob",
           r"rebuilds \d+ bytes, the manifest records",
           header_of({"w": {"dtype": "U8", "shape": [1 << 40], "data_offsets": [0, 1 << 40]}}, 1 << 40))

    # --- blobs (each replaces the blob of one tensor)
    def blob(case: str, version: str, target: str, why: str, expect: str, content: bytes,
             extra: dict[str, bytes] | None = None) -> None:
        cases[case] = ArchiveCase(why, version, expect, {f"blob-{target}": content, **(extra or {})})

    plain_w1 = _frame(0, len(w1), [w1])
    blob("blob_empty", "1.0", "w1", "empty blob file", r"truncated", b"")
    blob("blob_short_header", "1.0", "w1", "blob of 10 bytes", r"truncated", b"HCT1" + bytes(6))
    blob("blob_bad_magic", "1.0", "w1", "magic HCT2", r"bad header",
         _blob(plain_w1, len(w1), "F32", magic=b"HCT2"))
    blob("blob_reserved_set", "1.0", "w1", "reserved field is not zero", r"bad header",
         _blob(plain_w1, len(w1), "F32", reserved=1))
    blob("blob_unknown_kind", "1.0", "w1", "kind 7", r"bad header", _blob(plain_w1, len(w1), "F32", kind=7))
    blob("blob_plain_with_depth", "1.0", "w1", "plain blob with depth 3", r"plain blob must have depth 0",
         _blob(plain_w1, len(w1), "F32", depth=3))
    blob("blob_plain_with_base", "1.0", "w1", "plain blob naming a base", r"plain blob must have depth 0",
         _blob(plain_w1, len(w1), "F32", base=ids["w2"]))
    blob("blob_raw_size_plus_one", "1.0", "w1", "raw size one more than the recipe's range",
         r"holds 1025 bytes of F32, expected 1024", _blob(plain_w1, len(w1) + 1, "F32"))
    blob("blob_raw_size_huge", "1.0", "w1", "raw size 2**63", r"holds \d+ bytes of F32, expected 1024",
         _blob(plain_w1, 1 << 63, "F32"))
    blob("blob_dtype_garbage", "1.0", "w1", "dtype field of non-ASCII bytes", r"unknown dtype",
         _blob(plain_w1, len(w1), "F32", dtype_field=b"\xff\xfeF32"))
    blob("blob_dtype_unknown", "1.0", "w1", "dtype field F128", r"unknown dtype",
         _blob(plain_w1, len(w1), "F128"))
    blob("blob_frame_for_other_dtype", "1.0", "z1", "an I32 blob holding a split frame laid out for F32",
         r"not made for dtype I32",
         _blob(_frame(2, z_size, [b""] * 6, layout=(2, 17, 100, 4, 8)), z_size, "I32"))
    blob("blob_frame_crc", "1.0", "w1", "codec frame with a wrong CRC", r"CRC",
         _blob(_frame(0, len(w1), [w1], crc_fix=1), len(w1), "F32"))
    blob("blob_frame_truncated", "1.0", "w1", "codec frame cut 100 bytes short", r"stream lengths|CRC",
         _blob(plain_w1[:-100], len(w1), "F32"))
    blob("blob_frame_raw_len_lies", "1.0", "w1", "frame claims 1000 raw bytes inside a 1024-byte blob",
         r"claims 1000 raw bytes", _blob(_frame(0, 1000, [w1[:1000]]), len(w1), "F32"))
    blob("blob_oversized", "1.0", "w1", "blob 5000 bytes larger than any encoding of its tensor",
         r"larger than any encoding", _blob(plain_w1 + bytes(5000), len(w1), "F32"))
    blob("blob_depth_9", "2.0", "w2", "delta of depth 9 (limit 8)", r"depth 9 is out of range",
         _blob(_frame(0, len(w2), [bytes(len(w2))]), len(w2), "F32", kind=1, depth=9, base=ids["w1"]))
    blob("blob_self_delta", "1.0", "w1", "delta whose base is itself", r"do not descend by one",
         _blob(_frame(0, len(w1), [bytes(len(w1))]), len(w1), "F32", kind=1, depth=1, base=ids["w1"]))
    xor = bytes(a ^ c for a, c in zip(w1, w2, strict=True))
    blob("blob_delta_cycle", "2.0", "w2", "w2 -> w1 -> w2 with forged depths 2 and 1",
         r"do not descend by one",
         _blob(_frame(0, len(w2), [xor]), len(w2), "F32", kind=1, depth=2, base=ids["w1"]),
         {"blob-w1": _blob(_frame(0, len(w1), [xor]), len(w1), "F32", kind=1, depth=1, base=ids["w2"])})
    blob("blob_delta_depth_skips", "2.0", "w2", "delta of depth 3 whose base is plain (depth 0)",
         r"do not descend by one",
         _blob(_frame(0, len(w2), [xor]), len(w2), "F32", kind=1, depth=3, base=ids["w1"]),
         {"blob-w1": _blob(plain_w1, len(w1), "F32")})
    blob("blob_delta_missing_base", "2.0", "w2", "delta whose base blob does not exist",
         r"missing from the archive",
         _blob(_frame(0, len(w2), [xor]), len(w2), "F32", kind=1, depth=1, base=OTHER_OID))
    blob("blob_delta_base_other_dtype", "2.0", "w2", "delta (F32) whose base blob says F16",
         r"holds 1024 bytes of F16, expected 1024 of F32",
         _blob(_frame(0, len(w2), [xor]), len(w2), "F32", kind=1, depth=1, base=ids["w1"]),
         {"blob-w1": _blob(plain_w1, len(w1), "F16")})
    blob("blob_delta_base_other_size", "2.0", "w2", "delta whose base is a tensor of another size",
         r"holds 16 bytes of U8, expected 1024 of F32",
         _blob(_frame(0, len(w2), [xor]), len(w2), "F32", kind=1, depth=1, base=ids["b1"]))
    blob("blob_other_tensor", "1.0", "b1", "a well-formed blob of other bytes of the same size",
         r"checksum mismatch|SHA-256|BLAKE3",
         _blob(_frame(0, len(b1), [bytes(reversed(b1))]), len(b1), "U8"))
    blob("blob_zstd_bomb", "1.0", "z1", "zstd frame claiming the right size but expanding to 1 GiB",
         r"corrupt zstd data|decompressed",
         _blob(_frame(1, z_size, [_zstd_rle(z_size, 8192)]), z_size, "F32"))
    blob("blob_zstd_claims_terabyte", "1.0", "z1", "zstd frame whose content size is 1 TiB",
         r"claims 1099511627776 bytes", _blob(_frame(1, z_size, [_zstd_rle(1 << 40, 4)]), z_size, "F32"))
    blob("blob_zstd_no_size", "1.0", "z1", "zstd frame that does not record its content size",
         r"does not record its content size",
         _blob(_frame(1, z_size, [_zstd_rle(None, 8192)]), z_size, "F32"))
    blob("blob_zstd_no_checksum", "1.0", "z1", "zstd frame without a content checksum",
         r"no content checksum", _blob(_frame(1, z_size, [_zstd_rle(z_size, 1, z_size, checksum=False)]),
                                       z_size, "F32"))
    blob("blob_zstd_garbage", "1.0", "z1", "zstd stream of zeros", r"not a zstd frame",
         _blob(_frame(1, z_size, [bytes(64)]), z_size, "F32"))
    blob("blob_split_bomb", "1.0", "z1", "split frame whose first stream expands to 1 GiB",
         r"zstd frame claims|corrupt zstd",
         _blob(_frame(2, z_size, [_zstd_rle(1 << 30, 8192)] + [b""] * 5, layout=(2, 17, 100, 4, 8)),
               z_size, "F32"))
    return cases


# --------------------------------------------------------------------------------------------
# writing


def _readme(title: str, intro: list[str], rows: list[tuple[str, str]]) -> str:
    lines = [f"# {title}", "", *intro, "", "| file | what it breaks |", "| --- | --- |"]
    lines += [f"| `{name}` | {why} |" for name, why in sorted(rows)]
    return "\n".join(lines) + "\n"


def archive_files() -> dict[str, bytes]:
    """Every archive corpus file name -> content."""
    out = {}
    for case, spec in build_archive().items():
        for target, content in spec.files.items():
            out[f"{case}.{target}"] = content
    return out


def readmes() -> dict[Path, str]:
    manifests = build_manifests()
    archive = build_archive()
    rows = []
    for case, spec in archive.items():
        for target in spec.files:
            rows.append((f"{case}.{target}", f"m:{spec.version}: {spec.why}"))
    return {
        MANIFEST_DIR / "README.md": _readme(
            "Hostile manifests and journals",
            ["Generated by `python tests/corpus/make_hostile_corpus.py` (do not edit by hand).",
             "`manifest_*.json` replace `manifest.json`; `journal_*.jsonl` replace `journal.jsonl`",
             "(replayed with the manifest deleted).  Each must be refused with `ManifestError`",
             "and nothing may be written."],
            [(name, why) for name, (_, why, _) in manifests.items()]),
        ARCHIVE_DIR / "README.md": _readme(
            "Hostile archive recipes and tensor blobs",
            ["Generated by `python tests/corpus/make_hostile_corpus.py` (do not edit by hand).",
             "Each `<case>.<target>` replaces the recipe (`recipe-v1`, `recipe-v2`) or the tensor",
             "blob (`blob-w1` = tensor `w` of `m:1.0`, ...) of the archived model in",
             "`make_hostile_corpus.BASE_TENSORS`.  Loading the damaged version must raise",
             "`IntegrityError`, in bounded memory and time, and write nothing."],
            rows),
    }


def main() -> int:
    manifests = {name: content for name, (content, _, _) in build_manifests().items()}
    for directory, files in ((MANIFEST_DIR, manifests), (ARCHIVE_DIR, archive_files())):
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.iterdir():
            if stale.name != "README.md" and stale.name not in files:
                stale.unlink()
        for name, content in files.items():
            (directory / name).write_bytes(content)
    for path, text in readmes().items():
        path.write_text(text, encoding="utf-8")
    sys.stdout.write(f"wrote {len(manifests)} manifest/journal files to {MANIFEST_DIR}\n")
    sys.stdout.write(f"wrote {len(archive_files())} archive files to {ARCHIVE_DIR}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
