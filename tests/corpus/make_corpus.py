"""Regenerate the safetensors corpus in ``tests/corpus/safetensors/``.

Run ``python tests/corpus/make_corpus.py`` from the repository root.  Output is deterministic,
so re-running it on an unchanged script leaves the folder unchanged; the test suite checks the
committed files against :func:`build`.

Files named ``bad_*`` break exactly one rule of the format (each is refused by
``hydra_cas.stheader``); files named ``ok_*`` are valid.  Every file is tiny: the large ones
only *claim* a large size.  ``README.md`` in the folder is written from the same table.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np

__all__ = ["CORPUS_DIR", "build", "main"]

CORPUS_DIR = Path(__file__).resolve().parent / "safetensors"


def _frame(header: bytes, data: bytes = b"", *, claimed_len: int | None = None) -> bytes:
    """Length prefix + header bytes + data; ``claimed_len`` overrides the prefix."""
    n = len(header) if claimed_len is None else claimed_len
    return struct.pack("<Q", n) + header + data


def _header(obj: object) -> bytes:
    # Compact separators and insertion order keep the bytes stable across Python versions.
    return json.dumps(obj, separators=(",", ":")).encode()


def _entry(dtype: str, shape: list, begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _file(obj: object, data: bytes = b"") -> bytes:
    return _frame(_header(obj), data)


def _raw(header: bytes, data: bytes = b"") -> bytes:
    return _frame(header, data)


def _numpy_saved() -> bytes:
    from safetensors.numpy import save

    arrays: dict[str, np.ndarray] = {
        "embed.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "embed.bias": np.arange(4, dtype=np.float16),
        "layer.0.mask": np.array([True, False, True]),
        "layer.0.index": np.arange(5, dtype=np.int64),
        "layer.0.scale": np.array(0.5, dtype=np.float64),
        "layer.0.empty": np.zeros((0, 7), dtype=np.int8),
    }
    # One metadata key only: safetensors writes metadata in hash-map order, which changes
    # from process to process, and the corpus must be byte-for-byte reproducible.
    return save(arrays, metadata={"format": "np"})


def _deep_nesting(depth: int) -> bytes:
    return b'{"__metadata__":' + b"[" * depth + b"]" * depth + b"}"


def build() -> dict[str, tuple[bytes, str]]:
    """Every corpus file: name -> (content, the rule it breaks or why it is valid)."""
    u8 = _entry("U8", [4], 0, 4)
    files: dict[str, tuple[bytes, str]] = {
        # --- framing -----------------------------------------------------------------------
        "bad_three_bytes.safetensors": (
            b"\x02\x00\x00",
            "file shorter than the 8-byte header length prefix",
        ),
        "bad_eight_bytes.safetensors": (
            struct.pack("<Q", 2),
            "only the length prefix: header length 2 exceeds the 0 bytes that follow",
        ),
        "bad_zero_header_len.safetensors": (
            _frame(b"{}", claimed_len=0),
            "header length is 0",
        ),
        "bad_header_len_beyond_file.safetensors": (
            _frame(b"{}", claimed_len=1000),
            "header length 1000 exceeds the bytes left in the file",
        ),
        "bad_huge_claimed_header.safetensors": (
            _frame(b"{}", claimed_len=500_000_000),
            "header claims 500,000,000 bytes in a 10-byte file (must be refused before allocating)",
        ),
        # --- encoding and JSON syntax ------------------------------------------------------
        "bad_invalid_utf8.safetensors": (
            _raw(b'{"w\xff":' + _header(_entry("U8", [0], 0, 0)) + b"}"),
            "header is not valid UTF-8 (0xff byte inside a tensor name)",
        ),
        "bad_invalid_json.safetensors": (
            _raw(b'{"w":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},}'),
            "header is not valid JSON (trailing comma)",
        ),
        "bad_json_array_top.safetensors": (
            _raw(b"[]"),
            "header JSON is an array, not an object",
        ),
        "bad_leading_whitespace.safetensors": (
            _raw(b" {}"),
            "whitespace before the JSON object (headers start with '{')",
        ),
        "bad_deeply_nested.safetensors": (
            _raw(_deep_nesting(1900)),
            "JSON nested 1900 levels deep (parser recursion attack)",
        ),
        "bad_nul_padding.safetensors": (
            _raw(b"{}\x00\x00\x00\x00\x00\x00"),
            "header padded with NUL bytes; only ASCII spaces may pad",
        ),
        "bad_newline_padding.safetensors": (
            _raw(b"{}\n"),
            "header padded with a newline; only ASCII spaces may pad",
        ),
        "bad_second_object.safetensors": (
            _raw(b"{}  {}"),
            "a second JSON value after the header object",
        ),
        "bad_nan_constant.safetensors": (
            _raw(b'{"__metadata__":{"lr":NaN}}'),
            "NaN is not JSON",
        ),
        "bad_huge_integer.safetensors": (
            _raw(b'{"w":{"dtype":"U8","shape":[' + b"9" * 400 + b'],"data_offsets":[0,0]}}'),
            "400-digit integer in a shape (above 2**64-1)",
        ),
        # --- keys and names ------------------------------------------------------------------
        "bad_duplicate_tensor_names.safetensors": (
            _raw(
                b'{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
                b'"w":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}',
                bytes(8),
            ),
            "the same tensor name appears twice",
        ),
        "bad_duplicate_field.safetensors": (
            _raw(b'{"w":{"dtype":"U8","dtype":"I8","shape":[0],"data_offsets":[0,0]}}'),
            "a tensor entry repeats the dtype field",
        ),
        "bad_duplicate_metadata.safetensors": (
            _raw(b'{"__metadata__":{"a":"1"},"__metadata__":{"a":"2"}}'),
            "__metadata__ appears twice",
        ),
        "bad_nul_in_name.safetensors": (
            _file({"a\x00b": _entry("U8", [0], 0, 0)}),
            "tensor name contains NUL",
        ),
        "bad_empty_name.safetensors": (
            _file({"": _entry("U8", [0], 0, 0)}),
            "tensor name is the empty string",
        ),
        "bad_long_name.safetensors": (
            _file({"n" * 1025: _entry("U8", [0], 0, 0)}),
            "tensor name of 1025 characters (limit 1024)",
        ),
        "bad_surrogate_name.safetensors": (
            _raw(b'{"\\ud800":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'),
            "tensor name holds an unpaired UTF-16 surrogate escape",
        ),
        "bad_metadata_non_str_value.safetensors": (
            _file({"__metadata__": {"epochs": 3}}),
            "__metadata__ value is a number, not a string",
        ),
        "bad_metadata_not_object.safetensors": (
            _file({"__metadata__": ["a", "b"]}),
            "__metadata__ is an array, not an object",
        ),
        "bad_metadata_null.safetensors": (
            _file({"__metadata__": None}),
            "__metadata__ is null (must be an object when present)",
        ),
        # --- tensor entries ------------------------------------------------------------------
        "bad_entry_not_object.safetensors": (
            _file({"w": [0, 4]}),
            "tensor entry is an array, not an object",
        ),
        "bad_missing_data_offsets.safetensors": (
            _file({"w": {"dtype": "U8", "shape": [0]}}),
            "tensor entry lacks data_offsets",
        ),
        "bad_extra_key.safetensors": (
            _file({"w": {**_entry("U8", [0], 0, 0), "stride": [1]}}),
            "tensor entry has an extra key",
        ),
        "bad_unknown_dtype.safetensors": (
            _file({"w": _entry("Q4_K", [4], 0, 4)}, bytes(4)),
            "dtype Q4_K is not a safetensors dtype",
        ),
        "bad_dtype_not_string.safetensors": (
            _file({"w": _entry(4, [4], 0, 4)}, bytes(4)),  # type: ignore[arg-type]
            "dtype is a number",
        ),
        "bad_subbyte_f4.safetensors": (
            _file({"w": _entry("F4", [4], 0, 2)}, bytes(2)),
            "sub-byte dtype F4 (valid safetensors, unsupported by hydra_cas)",
        ),
        "bad_negative_dim.safetensors": (
            _file({"w": _entry("U8", [-1], 0, 0)}),
            "negative dimension",
        ),
        "bad_negative_zero_dim.safetensors": (
            _raw(b'{"w":{"dtype":"U8","shape":[-0],"data_offsets":[0,0]}}'),
            "dimension written as -0 (a float to strict parsers)",
        ),
        "bad_float_dim.safetensors": (
            _file({"w": _entry("U8", [2.0], 0, 2)}, bytes(2)),
            "dimension is a float",
        ),
        "bad_bool_dim.safetensors": (
            _file({"w": _entry("U8", [True], 0, 1)}, bytes(1)),
            "dimension is a bool",
        ),
        "bad_shape_not_list.safetensors": (
            _file({"w": _entry("U8", 4, 0, 4)}, bytes(4)),  # type: ignore[arg-type]
            "shape is a number, not a list",
        ),
        "bad_rank_too_large.safetensors": (
            _file({"w": _entry("U8", [1] * 65, 0, 1)}, bytes(1)),
            "65 dimensions (limit 64)",
        ),
        "bad_shape_overflow.safetensors": (
            _file({"w": _entry("U8", [2**40, 2**40, 0], 0, 0)}),
            "element count overflows 64 bits before the trailing 0 dimension",
        ),
        "bad_offsets_three_values.safetensors": (
            _file({"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4, 4]}}, bytes(4)),
            "data_offsets has three values",
        ),
        "bad_offsets_reversed.safetensors": (
            _file({"w": _entry("U8", [0], 4, 0)}, bytes(4)),
            "data_offsets end before begin",
        ),
        "bad_offsets_out_of_bounds.safetensors": (
            _file({"w": _entry("U8", [8], 0, 8)}, bytes(4)),
            "data_offsets run past the end of the data section",
        ),
        "bad_size_mismatch.safetensors": (
            _file({"w": _entry("F32", [2], 0, 4)}, bytes(4)),
            "data_offsets span 4 bytes but F32 [2] needs 8",
        ),
        # --- layout of the data section -----------------------------------------------------
        "bad_overlapping_offsets.safetensors": (
            _file({"a": _entry("U8", [8], 0, 8), "b": _entry("U8", [8], 4, 12)}, bytes(12)),
            "two tensors share bytes",
        ),
        "bad_zero_size_inside_tensor.safetensors": (
            _file({"a": u8, "z": _entry("U8", [0], 2, 2)}, bytes(4)),
            "zero-size tensor placed inside another tensor",
        ),
        "bad_hole_between_tensors.safetensors": (
            _file({"a": u8, "b": _entry("U8", [4], 8, 12)}, bytes(12)),
            "4 unused bytes between two tensors",
        ),
        "bad_hole_at_start.safetensors": (
            _file({"a": _entry("U8", [4], 4, 8)}, bytes(8)),
            "first tensor does not start at offset 0",
        ),
        "bad_trailing_data.safetensors": (
            _file({"a": u8}, bytes(8)),
            "4 bytes after the last tensor",
        ),
        "bad_empty_header_with_data.safetensors": (
            _file({}, b"hidden"),
            "no tensors but a non-empty data section",
        ),
        # --- valid files ---------------------------------------------------------------------
        "ok_empty.safetensors": (
            _file({}),
            "valid: empty tensor dict and no data",
        ),
        "ok_metadata_only.safetensors": (
            _file({"__metadata__": {"format": "pt", "note": "no tensors"}}),
            "valid: metadata and no tensors",
        ),
        "ok_zero_size_tensor.safetensors": (
            _file({"empty": _entry("F32", [3, 0], 0, 0)}),
            "valid: one zero-size tensor",
        ),
        "ok_zero_size_among_tensors.safetensors": (
            _file(
                {
                    "b": _entry("U8", [4], 4, 8),
                    "end": _entry("I32", [0], 8, 8),
                    "a": u8,
                    "mid": _entry("F16", [0, 2], 4, 4),
                },
                bytes(range(8)),
            ),
            "valid: zero-size tensors at a boundary and at the end, entries out of order",
        ),
        "ok_scalar.safetensors": (
            _file({"s": _entry("F64", [], 0, 8)}, struct.pack("<d", 1.5)),
            "valid: scalar tensor with shape []",
        ),
        "ok_space_padded.safetensors": (
            _raw(_header({"w": _entry("BF16", [2, 2], 0, 8)}) + b" " * 13, bytes(8)),
            "valid: header padded with spaces",
        ),
        "ok_numpy_save.safetensors": (
            _numpy_saved(),
            "valid: written by safetensors.numpy.save with metadata",
        ),
    }
    return files


def _readme(files: dict[str, tuple[bytes, str]]) -> str:
    lines = [
        "# safetensors corpus",
        "",
        "Generated by `python tests/corpus/make_corpus.py` (do not edit by hand).",
        "`bad_*` files must be refused with `InvalidSafetensorsError`; `ok_*` files must parse.",
        "",
        "| file | rule broken / why valid |",
        "| --- | --- |",
    ]
    lines += [f"| `{name}` | {why} |" for name, (_, why) in sorted(files.items())]
    return "\n".join(lines) + "\n"


def main() -> int:
    files = build()
    CORPUS_DIR.mkdir(parents=True, exist_ok=True)
    # Drop corpus files the table no longer lists, so renames do not leave stale cases.
    for stale in CORPUS_DIR.glob("*.safetensors"):
        if stale.name not in files:
            stale.unlink()
    for name, (content, _) in files.items():
        (CORPUS_DIR / name).write_bytes(content)
    (CORPUS_DIR / "README.md").write_text(_readme(files), encoding="utf-8")
    sys.stdout.write(f"wrote {len(files)} files to {CORPUS_DIR}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
