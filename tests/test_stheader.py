"""Tests for hydra_cas.stheader: the hostile corpus, memory bounds, and differential fuzzing
against the reference parser (``safetensors.safe_open``)."""

from __future__ import annotations

import importlib.util
import io
import json
import mmap
import re
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save

from hydra_cas.dtypes import ITEMSIZE, nbytes_for
from hydra_cas.errors import InvalidSafetensorsError
from hydra_cas.stheader import (
    MAX_HEADER_BYTES,
    MAX_RANK,
    MAX_TENSOR_NAME_CHARS,
    Header,
    TensorInfo,
    parse_header,
    read_header,
    validate_file,
)

CORPUS_SCRIPT = Path(__file__).resolve().parent / "corpus" / "make_corpus.py"


def _load_corpus_module() -> Any:
    # tests/ is not a package; load the generator by path so its table is the single source.
    spec = importlib.util.spec_from_file_location("_hydra_make_corpus", CORPUS_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_corpus = _load_corpus_module()
CORPUS_DIR: Path = make_corpus.CORPUS_DIR
BAD_FILES = sorted(p.name for p in CORPUS_DIR.glob("bad_*.safetensors"))
OK_FILES = sorted(p.name for p in CORPUS_DIR.glob("ok_*.safetensors"))

# Why each hostile file must be refused: a fragment of the expected message, so a file that
# fails early for an unintended reason (e.g. a generator typo) is caught.
EXPECTED_REASON = {
    "bad_bool_dim.safetensors": r"dimension 0 is True",
    "bad_deeply_nested.safetensors": r"nested too deeply|__metadata__ must be",
    "bad_dtype_not_string.safetensors": r"dtype must be a string",
    "bad_duplicate_field.safetensors": r"repeats the key 'dtype'",
    "bad_duplicate_metadata.safetensors": r"repeats the key '__metadata__'",
    "bad_duplicate_tensor_names.safetensors": r"repeats the key 'w'",
    "bad_eight_bytes.safetensors": r"header length 2 exceeds the 0 bytes",
    "bad_empty_header_with_data.safetensors": r"6 trailing bytes",
    "bad_empty_name.safetensors": r"empty name",
    "bad_entry_not_object.safetensors": r"entry must be an object",
    "bad_extra_key.safetensors": r"unexpected key\(s\) 'stride'",
    "bad_float_dim.safetensors": r"dimension 0 is 2\.0",
    "bad_header_len_beyond_file.safetensors": r"header length 1000 exceeds",
    "bad_hole_at_start.safetensors": r"unused bytes at data offsets \[0, 4\)",
    "bad_hole_between_tensors.safetensors": r"unused bytes at data offsets \[4, 8\)",
    "bad_huge_claimed_header.safetensors": r"header length 500000000 exceeds",
    "bad_huge_integer.safetensors": r"400-digit integer",
    "bad_invalid_json.safetensors": r"not valid JSON",
    "bad_invalid_utf8.safetensors": r"not valid UTF-8",
    "bad_json_array_top.safetensors": r"JSON array",
    "bad_leading_whitespace.safetensors": r"whitespace before",
    "bad_long_name.safetensors": r"1025 characters",
    "bad_metadata_non_str_value.safetensors": r"metadata values must be strings",
    "bad_metadata_not_object.safetensors": r"__metadata__ must be a JSON object",
    "bad_metadata_null.safetensors": r"__metadata__ must be a JSON object",
    "bad_missing_data_offsets.safetensors": r"is missing data_offsets",
    "bad_nan_constant.safetensors": r"NaN",
    "bad_negative_dim.safetensors": r"dimension 0 is -1",
    "bad_negative_zero_dim.safetensors": r"dimension 0 is -0",
    "bad_newline_padding.safetensors": r"only ASCII spaces",
    "bad_nul_in_name.safetensors": r"NUL",
    "bad_nul_padding.safetensors": r"only ASCII spaces",
    "bad_offsets_out_of_bounds.safetensors": r"run past the end",
    "bad_offsets_reversed.safetensors": r"0 <= begin <= end",
    "bad_offsets_three_values.safetensors": r"must be \[begin, end\]",
    "bad_overlapping_offsets.safetensors": r"'b' .* overlaps tensor 'a'",
    "bad_rank_too_large.safetensors": r"65 dimensions",
    "bad_second_object.safetensors": r"only ASCII spaces",
    "bad_shape_not_list.safetensors": r"shape must be a list",
    "bad_shape_overflow.safetensors": r"overflows 64 bits",
    "bad_size_mismatch.safetensors": r"span 4 bytes but a F32 tensor of shape \[2\] needs 8",
    "bad_subbyte_f4.safetensors": r"sub-byte dtype F4",
    "bad_surrogate_name.safetensors": r"surrogate",
    "bad_three_bytes.safetensors": r"file is 3 bytes",
    "bad_trailing_data.safetensors": r"4 trailing bytes",
    "bad_unknown_dtype.safetensors": r"unknown dtype 'Q4_K'.*BF16",
    "bad_zero_header_len.safetensors": r"header length is 0",
    "bad_zero_size_inside_tensor.safetensors": r"'z' at bytes \[2, 2\) overlaps tensor 'a'",
}

# Rules where we are deliberately stricter than safe_open.  When safe_open accepts bytes that
# we refuse, the refusal must come from one of these; any other disagreement is a bug.
STRICTER_THAN_SAFE_OPEN = re.compile(
    "|".join(
        [
            r"empty name",
            r"NUL character",
            r"characters; at most",
            r"dimensions; at most",
            r"unexpected key\(s\)",
            r"repeats the key",
            r"got NoneType",  # "__metadata__": null
            r"sub-byte dtype",
            r"whitespace before the JSON object",
            r"only ASCII spaces may pad",
        ]
    )
)


def _safe_open_view(path: Path) -> tuple[list[tuple[str, str, list[int]]], dict[str, str] | None]:
    with safe_open(str(path), "np") as f:
        tensors = sorted(
            (name, f.get_slice(name).get_dtype(), list(f.get_slice(name).get_shape()))
            for name in f.keys()
        )
        return tensors, f.metadata()


def _our_view(header: Header) -> tuple[list[tuple[str, str, list[int]]], dict[str, str] | None]:
    tensors = sorted((t.name, t.dtype, list(t.shape)) for t in header.tensors)
    return tensors, header.metadata


def _frame(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _entry(dtype: str, shape: list[Any], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _file(obj: Any, data: bytes = b"") -> bytes:
    return _frame(json.dumps(obj).encode(), data)


# ---------------------------------------------------------------------------------------------
# Corpus


def test_corpus_is_current() -> None:
    """The committed files are exactly what the generator produces."""
    built = make_corpus.build()
    on_disk = {p.name for p in CORPUS_DIR.glob("*.safetensors")}
    assert on_disk == set(built), "run python tests/corpus/make_corpus.py"
    for name, (content, _) in built.items():
        assert (CORPUS_DIR / name).read_bytes() == content, name
    readme = (CORPUS_DIR / "README.md").read_text(encoding="utf-8")
    assert readme == make_corpus._readme(built)
    assert set(EXPECTED_REASON) == set(BAD_FILES)
    assert len(OK_FILES) >= 4


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_corpus_file_is_refused(name: str) -> None:
    path = CORPUS_DIR / name
    blob = path.read_bytes()
    assert len(blob) < 4096  # even the "huge" files only claim a large size
    reason = EXPECTED_REASON[name]
    with pytest.raises(InvalidSafetensorsError, match=reason) as info:
        validate_file(path)
    assert str(info.value).startswith(str(path))
    with pytest.raises(InvalidSafetensorsError, match=reason):
        parse_header(blob, len(blob))
    with pytest.raises(InvalidSafetensorsError, match=reason):
        read_header(io.BytesIO(blob), len(blob))


@pytest.mark.parametrize("name", OK_FILES)
def test_ok_corpus_file_parses_and_agrees_with_safe_open(name: str) -> None:
    path = CORPUS_DIR / name
    blob = path.read_bytes()
    header = validate_file(path)
    assert parse_header(blob, len(blob)) == header
    assert read_header(io.BytesIO(blob), len(blob)) == header
    assert header.data_start == 8 + header.header_len
    assert header.data_len == len(blob) - header.data_start
    assert sum(t.nbytes for t in header.tensors) == header.data_len
    assert list(header.tensors) == sorted(header.tensors, key=lambda t: (t.begin, t.end))
    assert _our_view(header) == _safe_open_view(path)


def test_numpy_saved_file_details() -> None:
    header = validate_file(CORPUS_DIR / "ok_numpy_save.safetensors")
    tensors = header.by_name()
    assert tensors["embed.weight"].dtype == "F32"
    assert tensors["embed.weight"].shape == (3, 4)
    assert tensors["embed.weight"].nbytes == 48
    assert tensors["layer.0.scale"].shape == ()
    assert tensors["layer.0.empty"].nbytes == 0
    assert header.parameter_count == 12 + 4 + 3 + 5 + 1 + 0
    assert header.dtypes == ["BOOL", "F16", "F32", "F64", "I64", "I8"]
    assert header.metadata == {"format": "np"}


# ---------------------------------------------------------------------------------------------
# Reading discipline and memory


class _RecordingReader(io.RawIOBase):
    """A file that records how far it was read and returns at most ``step`` bytes per call."""

    def __init__(self, data: bytes, step: int | None = None) -> None:
        self._buf = io.BytesIO(data)
        self._step = step
        self.furthest = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._buf.seek(offset, whence)

    def tell(self) -> int:
        return self._buf.tell()

    def read(self, size: int = -1) -> bytes:
        assert size is not None and size >= 0, "read_header must never read to EOF"
        if self._step is not None:
            size = min(size, self._step)
        chunk = self._buf.read(size)
        self.furthest = max(self.furthest, self._buf.tell())
        return chunk


@pytest.mark.parametrize("step", [None, 1, 7])
def test_read_header_never_touches_the_data_section(step: int | None) -> None:
    blob = (CORPUS_DIR / "ok_numpy_save.safetensors").read_bytes()
    reader = _RecordingReader(blob, step)
    reader.seek(0, io.SEEK_END)  # read_header must seek back to 0 itself
    header = read_header(reader, len(blob))  # type: ignore[arg-type]
    assert reader.furthest == header.data_start
    assert reader.tell() == header.data_start


def test_read_header_refuses_a_file_shorter_than_claimed() -> None:
    blob = (CORPUS_DIR / "ok_numpy_save.safetensors").read_bytes()
    header = parse_header(blob, len(blob))
    short = blob[: header.data_start - 5]
    with pytest.raises(InvalidSafetensorsError, match="truncated"):
        read_header(io.BytesIO(short), len(blob))
    with pytest.raises(InvalidSafetensorsError, match=r"only .* bytes given"):
        parse_header(short, len(blob))
    with pytest.raises(InvalidSafetensorsError, match="only 5 bytes given"):
        parse_header(blob[:5], len(blob))


def _peak_bytes(fn: Any) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(InvalidSafetensorsError):
            fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_huge_claimed_header_allocates_nothing() -> None:
    path = CORPUS_DIR / "bad_huge_claimed_header.safetensors"
    assert _peak_bytes(lambda: validate_file(path)) < 1024 * 1024


def test_huge_header_refused_by_limit_before_reading() -> None:
    # The caller believes the file is 1 GB, so only max_header_bytes stands in the way.
    claim = struct.pack("<Q", 500_000_000) + b"{}"
    fake_size = 1_000_000_000
    assert _peak_bytes(lambda: parse_header(claim, fake_size)) < 1024 * 1024
    assert _peak_bytes(lambda: read_header(io.BytesIO(claim), fake_size)) < 1024 * 1024
    with pytest.raises(InvalidSafetensorsError, match="exceeds the limit of 100000000 bytes"):
        parse_header(claim, fake_size)
    over = struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}"
    with pytest.raises(InvalidSafetensorsError, match="limit"):
        parse_header(over, fake_size)


def test_lying_file_size_with_raised_limit_stays_bounded(tmp_path: Path) -> None:
    # Even when the caller raises the limit and overstates the size, a short real file
    # must not make read_header allocate the claimed header length.
    path = tmp_path / "liar.safetensors"
    path.write_bytes(struct.pack("<Q", 500_000_000) + b"{}")
    with path.open("rb") as f:
        peak = _peak_bytes(lambda: read_header(f, 1_000_000_000, max_header_bytes=10**9))
    assert peak < 64 * 1024 * 1024


def test_max_header_bytes_parameter() -> None:
    blob = (CORPUS_DIR / "ok_numpy_save.safetensors").read_bytes()
    n = parse_header(blob, len(blob)).header_len
    assert parse_header(blob, len(blob), max_header_bytes=n).header_len == n
    with pytest.raises(InvalidSafetensorsError, match=f"limit of {n - 1} bytes"):
        parse_header(blob, len(blob), max_header_bytes=n - 1)
    with pytest.raises(InvalidSafetensorsError, match="limit"):
        validate_file(CORPUS_DIR / "ok_numpy_save.safetensors", max_header_bytes=16)


def test_mmap_and_memoryview_inputs(tmp_path: Path) -> None:
    path = CORPUS_DIR / "ok_numpy_save.safetensors"
    expected = validate_file(path)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        assert parse_header(mm, len(mm)) == expected
        view = memoryview(mm)
        try:
            assert parse_header(view, len(mm)) == expected
        finally:
            view.release()
    blob = path.read_bytes()
    assert parse_header(memoryview(blob)[: expected.data_start], len(blob)) == expected


@pytest.mark.parametrize(
    "name",
    [
        "bad_invalid_utf8.safetensors",
        "bad_invalid_json.safetensors",
        "bad_trailing_data.safetensors",
    ],
)
def test_refusal_does_not_pin_an_mmap(name: str) -> None:
    # A live memoryview in the traceback would make mmap.close() raise BufferError.
    with (CORPUS_DIR / name).open("rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        with pytest.raises(InvalidSafetensorsError) as info:
            parse_header(mm, len(mm))
        mm.close()
    assert info.value.__context__ is None


def test_bad_file_size_argument_is_a_programming_error() -> None:
    with pytest.raises(ValueError) as info:
        parse_header(b"", -1)
    assert not isinstance(info.value, InvalidSafetensorsError)


# ---------------------------------------------------------------------------------------------
# Specific rules


@pytest.mark.parametrize("depth", [10_000, 200_000])
@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_deep_nesting_is_refused_cleanly(depth: int, opener: bytes) -> None:
    closer = b"]" if opener == b"[" else b"}"
    blob = _frame(b'{"__metadata__":' + opener * depth + closer * depth + b"}")
    with pytest.raises(InvalidSafetensorsError):
        parse_header(blob, len(blob))


def test_enormous_integer_is_refused_cleanly() -> None:
    # More digits than int() will convert (Python's 4300-digit limit raises ValueError).
    blob = _frame(b'{"w":{"dtype":"U8","shape":[0,' + b"7" * 5000 + b'],"data_offsets":[0,0]}}')
    with pytest.raises(InvalidSafetensorsError, match="5000-digit"):
        parse_header(blob, len(blob))


@pytest.mark.parametrize(
    ("dtype", "shape", "accepted"),
    [
        ("U8", [0, 2**40, 2**40], True),  # running product stays 0
        ("U8", [2**40, 2**40, 0], False),  # 2**80 overflows before the 0 is reached
        ("U8", [0, 2**64 - 1], True),
        ("U8", [0, 2**64], False),
        ("F64", [0, 2**61], True),
        ("U8", [1] * MAX_RANK, None),  # size 1, needs one data byte
    ],
)
def test_shape_limits_match_safe_open(
    tmp_path: Path, dtype: str, shape: list[int], accepted: bool | None
) -> None:
    size = 1 if accepted is None else 0
    blob = _file({"w": _entry(dtype, shape, 0, size)}, bytes(size))
    path = tmp_path / "t.safetensors"
    path.write_bytes(blob)
    try:
        _safe_open_view(path)
        st_ok = True
    except Exception:
        st_ok = False
    try:
        parse_header(blob, len(blob))
        ours = True
    except InvalidSafetensorsError:
        ours = False
    assert ours == st_ok
    if accepted is not None:
        assert ours == accepted


def test_name_limits() -> None:
    ok_name = "n" * MAX_TENSOR_NAME_CHARS
    blob = _file({ok_name: _entry("U8", [0], 0, 0), "é😀": _entry("U8", [0], 0, 0)})
    header = parse_header(blob, len(blob))
    assert {t.name for t in header.tensors} == {ok_name, "é😀"}


def test_value_types() -> None:
    info = TensorInfo(name="w", dtype="F32", shape=(2, 3), begin=8, end=32)
    assert info.nbytes == 24
    with pytest.raises(AttributeError):
        info.begin = 0  # type: ignore[misc]
    blob = _file({"b": _entry("F32", [2, 3], 8, 32), "a": _entry("I64", [1], 0, 8)}, bytes(32))
    header = parse_header(blob, len(blob))
    assert [t.name for t in header.tensors] == ["a", "b"]
    assert header.by_name()["b"] == TensorInfo("b", "F32", (2, 3), 8, 32)
    assert header.parameter_count == 7
    assert header.dtypes == ["F32", "I64"]
    assert header.metadata is None


# ---------------------------------------------------------------------------------------------
# Fuzzing against safe_open


def _check_against_safe_open(blob: bytes, path: Path) -> bool:
    """Parse ``blob``; on success safe_open must agree, on refusal it must be of a kind
    safe_open also refuses unless it is one of our documented stricter rules.  Returns
    whether we accepted."""
    try:
        header = parse_header(blob, len(blob))
    except InvalidSafetensorsError as exc:
        ours: InvalidSafetensorsError | None = exc
    else:
        ours = None
    path.write_bytes(blob)
    try:
        theirs = _safe_open_view(path)
    except Exception:
        theirs = None
    if ours is None:
        assert theirs is not None, "we accepted a header that safe_open refuses"
        assert _our_view(header) == theirs
        return True
    if theirs is not None:
        assert STRICTER_THAN_SAFE_OPEN.search(str(ours)), (
            f"safe_open accepts but we refuse for an undocumented reason: {ours}"
        )
    return False


FUZZ_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "f.safetensors"


@FUZZ_SETTINGS
@given(data=st.binary(max_size=200))
def test_fuzz_random_bytes(data: bytes) -> None:
    try:
        parse_header(data, len(data))
    except InvalidSafetensorsError:
        pass


@FUZZ_SETTINGS
@given(body=st.binary(min_size=1, max_size=200), data=st.binary(max_size=16))
def test_fuzz_random_header_bytes(scratch: Path, body: bytes, data: bytes) -> None:
    _check_against_safe_open(_frame(body, data), scratch)


_SEED = _file(
    {
        "__metadata__": {"k": "v"},
        "a": _entry("F16", [2, 2], 0, 8),
        "b": _entry("U8", [3], 8, 11),
        "z": _entry("I32", [0], 11, 11),
    },
    bytes(11),
)
_SEED_HEADER_LEN = struct.unpack("<Q", _SEED[:8])[0]
_JSONISH = b'{}[],:"0123456789-.eE \\tnul\x00\xffabzFUI_'


@FUZZ_SETTINGS
@given(
    edits=st.lists(
        st.tuples(
            st.integers(0, _SEED_HEADER_LEN - 1),
            st.sampled_from(["replace", "insert", "delete"]),
            st.sampled_from(list(_JSONISH)),
        ),
        min_size=1,
        max_size=4,
    ),
    data_delta=st.integers(-2, 2),
)
def test_fuzz_mutated_valid_header(
    scratch: Path, edits: list[tuple[int, str, int]], data_delta: int
) -> None:
    body = bytearray(_SEED[8 : 8 + _SEED_HEADER_LEN])
    for pos, op, byte in edits:
        pos = min(pos, len(body) - 1)
        if op == "replace":
            body[pos] = byte
        elif op == "insert":
            body.insert(pos, byte)
        elif len(body) > 1:
            del body[pos]
    data = bytes(max(0, 11 + data_delta))
    # Mutate both with a consistent length prefix (reaches the JSON rules) and with the
    # original one (exercises framing against a changed body).
    _check_against_safe_open(_frame(bytes(body), data), scratch)
    raw = _SEED[:8] + bytes(body) + data
    try:
        parse_header(raw, len(raw))
    except InvalidSafetensorsError:
        pass


_NAMES = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], max_codepoint=0x1F600),
    min_size=0,
    max_size=6,
).filter(lambda s: s != "__metadata__")
_DIMS = st.one_of(
    st.integers(0, 3),
    st.sampled_from([-1, 2**64, 2**40, 2.0, True, None, "2"]),
)


@st.composite
def _headers(draw: st.DrawFn) -> bytes:
    """Mostly-valid headers with occasional small corruptions of one field."""
    names = draw(st.lists(_NAMES, max_size=4, unique=True))
    corrupt = draw(st.booleans())
    obj: dict[str, Any] = {}
    if draw(st.booleans()):
        odd: list[Any] = [None, {"n": 1}] if corrupt else [{}, {"n": "1"}]
        obj["__metadata__"] = draw(
            st.one_of(st.dictionaries(_NAMES, _NAMES, max_size=2), st.sampled_from(odd))
        )
    offset = 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(ITEMSIZE) + (["F4", "XX", 3] if corrupt else [])))
        if corrupt:
            shape = draw(st.lists(_DIMS, max_size=3))
        else:
            shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = 2  # arbitrary when dtype or shape is corrupt
        if dtype in ITEMSIZE and all(type(d) is int and 0 <= d <= 3 for d in shape):
            size = nbytes_for(dtype, shape)  # type: ignore[arg-type]
        begin, end = offset, offset + size
        if corrupt and draw(st.integers(0, 4)) == 0:
            begin += draw(st.integers(-1, 1))
            end += draw(st.integers(-1, 1))
        obj[name] = _entry(dtype, shape, begin, end)  # type: ignore[arg-type]
        offset += size
    items = list(obj.items())
    order = draw(st.permutations(range(len(items))))
    body = json.dumps(dict(items[i] for i in order)).encode()
    body += b" " * draw(st.integers(0, 3))
    data_len = max(0, offset + (draw(st.integers(-1, 1)) if corrupt else 0))
    return _frame(body, bytes(data_len))


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(blob=_headers())
def test_fuzz_structured_headers_agree_with_safe_open(scratch: Path, blob: bytes) -> None:
    _check_against_safe_open(blob, scratch)


def test_structured_generator_reaches_acceptance(scratch: Path) -> None:
    # Guard against the differential test silently only exercising refusals.
    arrays: dict[str, np.ndarray] = {
        "x": np.ones((2, 3), np.float32),
        "y": np.arange(4, dtype=np.uint16),
    }
    assert _check_against_safe_open(save(arrays), scratch)
    assert _check_against_safe_open(_file({"w": _entry("U8", [0, 3], 0, 0)}), scratch)
