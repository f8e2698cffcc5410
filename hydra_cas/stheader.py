"""Parse and strictly validate the header of a safetensors file from an untrusted source.

A safetensors file is an 8-byte little-endian header length ``N``, then ``N`` bytes of UTF-8
JSON (an object, possibly padded at the end with ASCII spaces), then the data section.  Every
top-level key except ``__metadata__`` names a tensor and maps to
``{"dtype": ..., "shape": [...], "data_offsets": [begin, end]}``, offsets being relative to the
start of the data section.

Everything here treats the bytes as hostile: the header length is checked against the file
size and :data:`MAX_HEADER_BYTES` before anything is allocated, and the JSON is held to the
rules the reference implementation (the Rust ``safetensors`` crate behind ``safe_open``)
enforces, plus a few stricter ones listed in :func:`parse_header`.  Anything accepted here can
therefore be opened by ``safe_open``.  Every refusal is an
:class:`~hydra_cas.errors.InvalidSafetensorsError` whose message says what is wrong.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hydra_cas.dtypes import ITEMSIZE, nbytes_for
from hydra_cas.errors import InvalidSafetensorsError

if TYPE_CHECKING:
    import mmap
    from typing import BinaryIO

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_RANK",
    "MAX_TENSOR_NAME_CHARS",
    "Header",
    "TensorInfo",
    "parse_header",
    "read_header",
    "validate_file",
]

logger = logging.getLogger(__name__)

#: Largest header (the ``N`` bytes of JSON) accepted by default.  This is the limit the
#: reference implementation hard-codes (100,000,000 bytes, not 100 MiB): a file with a larger
#: header cannot be opened by ``safe_open`` whatever we decide, so accepting it would only
#: defer the failure.  Callers may pass a different ``max_header_bytes``.
MAX_HEADER_BYTES: int = 100_000_000

#: Longest tensor name accepted, in characters (not bytes).  Real checkpoints use names of a
#: few dozen characters; the cap keeps a hostile header from smuggling megabyte-long keys
#: into manifests, logs and error messages.
MAX_TENSOR_NAME_CHARS: int = 1024

#: Most dimensions a tensor shape may have.  Real tensors rarely exceed rank 8.
MAX_RANK: int = 64

_LEN_PREFIX = 8
_READ_CHUNK = 16 * 1024 * 1024
_U64_MAX = 2**64 - 1
# A value above 2**64 - 1 has at least 20 digits; refusing longer digit strings before int()
# sees them avoids quadratic-time conversion and Python's 4300-digit ValueError.
_MAX_INT_DIGITS = 20
_TENSOR_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_METADATA_KEY = "__metadata__"
# Dtypes safetensors defines whose elements are not whole bytes.  hydra_cas cannot address
# them per element, so they are refused with a specific message rather than "unknown".
_SUB_BYTE_DTYPES = frozenset({"F4", "F6_E2M3", "F6_E3M2"})
_JSON_WHITESPACE = " \t\r\n"


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor entry of a validated header.

    ``begin`` and ``end`` are byte offsets relative to the start of the data section.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes the tensor occupies in the data section."""
        return self.end - self.begin


@dataclass(frozen=True, slots=True)
class Header:
    """A validated safetensors header and the layout of the file it came from."""

    header_len: int
    data_start: int
    data_len: int
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str] | None

    def by_name(self) -> dict[str, TensorInfo]:
        """The tensors keyed by name (a fresh dict on each call)."""
        return {t.name: t for t in self.tensors}

    @property
    def parameter_count(self) -> int:
        """Total number of elements over all tensors."""
        return sum(math.prod(t.shape) for t in self.tensors)

    @property
    def dtypes(self) -> list[str]:
        """The distinct dtypes used, sorted."""
        return sorted({t.dtype for t in self.tensors})


def read_header(f: BinaryIO, file_size: int, *, max_header_bytes: int = MAX_HEADER_BYTES) -> Header:
    """Read and validate the header of the safetensors file open as ``f``.

    ``f`` may be positioned anywhere: it is seeked to offset 0 and at most ``8 + N`` bytes are
    read, so the data section is never touched.  On success ``f`` is left at ``data_start``.
    ``file_size`` is the size of the whole file; the header must describe a data section of
    exactly ``file_size - 8 - N`` bytes.  See :func:`parse_header` for the rules enforced.
    """
    _check_file_size(file_size)
    f.seek(0)
    prefix = _read_exact(f, _LEN_PREFIX, 0)
    header_len = _header_len(prefix, file_size, max_header_bytes)
    text = _decode_utf8(_read_exact(f, header_len, _LEN_PREFIX))
    return _parse_text(header_len, text, file_size)


def parse_header(
    prefix: bytes | bytearray | memoryview | mmap.mmap,
    file_size: int,
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> Header:
    """Validate the header held in ``prefix``, the first ``8 + N`` (or more) bytes of a file.

    ``prefix`` may be the whole payload, an ``mmap`` or a memoryview over either; bytes after
    the header are not read.  ``file_size`` is the size of the whole file or payload.

    Rules, each refused with :class:`InvalidSafetensorsError`:

    * the file holds at least the 8-byte length prefix; ``0 < N <= file_size - 8`` and
      ``N <= max_header_bytes`` (checked before anything of size ``N`` is touched);
    * the header is UTF-8 JSON starting with ``{``; after the object only ASCII spaces may
      follow (safetensors pads with spaces); no key repeats in any object; the JSON may not be
      nested deeper than Python can parse, use NaN/Infinity, or hold integers above 2**64-1;
    * ``__metadata__``, when present, is an object mapping strings to strings;
    * every other key is a tensor name: a non-empty string of at most
      :data:`MAX_TENSOR_NAME_CHARS` characters without NUL or unpaired surrogates;
    * each tensor entry has exactly the keys ``dtype``, ``shape`` and ``data_offsets``;
      ``dtype`` is one of :data:`hydra_cas.dtypes.ITEMSIZE`; ``shape`` is a list of at most
      :data:`MAX_RANK` non-negative integers whose running product, and the size in bits,
      fit in 64 bits (as safetensors computes them); ``data_offsets`` is ``[begin, end]`` with
      ``0 <= begin <= end <= data_len`` and ``end - begin`` equal to the tensor's size;
    * sorted by offset, the tensors tile the data section exactly: no overlap, no hole, no
      trailing bytes.
    """
    _check_file_size(file_size)
    # Every view is released before returning or raising: a traceback that kept one alive
    # would pin the caller's buffer, and closing an mmap with a live export raises BufferError.
    with memoryview(prefix) as whole, whole.cast("B") as view:
        if len(view) < _LEN_PREFIX:
            raise InvalidSafetensorsError(
                f"only {len(view)} bytes given; a safetensors header starts with an 8-byte length"
            )
        header_len = _header_len(bytes(view[:_LEN_PREFIX]), file_size, max_header_bytes)
        if len(view) < _LEN_PREFIX + header_len:
            raise InvalidSafetensorsError(
                f"only {len(view)} bytes given but the header needs {_LEN_PREFIX + header_len}: "
                "pass at least the first 8 + N bytes of the file"
            )
        with view[_LEN_PREFIX : _LEN_PREFIX + header_len] as body:
            text = _decode_utf8(body)
    return _parse_text(header_len, text, file_size)


def validate_file(
    path: str | os.PathLike[str], *, max_header_bytes: int = MAX_HEADER_BYTES
) -> Header:
    """Open ``path``, validate its safetensors header and return it.

    Refusals are re-raised with the path prefixed to the message; I/O errors propagate
    unchanged.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            return read_header(f, size, max_header_bytes=max_header_bytes)
        except InvalidSafetensorsError as exc:
            raise InvalidSafetensorsError(f"{os.fspath(path)}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Framing


def _check_file_size(file_size: int) -> None:
    if type(file_size) is not int or file_size < 0:
        raise ValueError(f"file_size must be a non-negative int, got {file_size!r}")
    if file_size < _LEN_PREFIX:
        raise InvalidSafetensorsError(
            f"file is {file_size} bytes, shorter than the 8-byte header length that starts "
            "every safetensors file: it is empty, truncated or not safetensors"
        )


def _read_exact(f: BinaryIO, size: int, offset: int) -> bytes:
    # Loop because raw files, pipes and sockets may return fewer bytes than asked for; never
    # ask for more than is still missing, so nothing past the header is read.  Reads are
    # capped at _READ_CHUNK because read(n) allocates n bytes up front: if the file is shorter
    # than file_size claimed, memory use then follows the bytes actually present.
    chunks: list[bytes] = []
    missing = size
    while missing:
        chunk = f.read(min(missing, _READ_CHUNK))
        if not chunk:
            got = size - missing
            raise InvalidSafetensorsError(
                f"file ended at byte {offset + got} while reading the header (bytes "
                f"{offset}..{offset + size}): it is truncated or changed while being read"
            )
        chunks.append(chunk)
        missing -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _header_len(prefix: bytes | memoryview, file_size: int, max_header_bytes: int) -> int:
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len == 0:
        raise InvalidSafetensorsError(
            "header length is 0; a safetensors header holds at least '{}': the file is "
            "corrupt or not safetensors"
        )
    if header_len > file_size - _LEN_PREFIX:
        raise InvalidSafetensorsError(
            f"header length {header_len} exceeds the {file_size - _LEN_PREFIX} bytes that "
            f"follow it (file size {file_size}): the file is truncated or not safetensors"
        )
    if header_len > max_header_bytes:
        raise InvalidSafetensorsError(
            f"header length {header_len} exceeds the limit of {max_header_bytes} bytes; "
            "refusing to read it (raise max_header_bytes if the file is trusted)"
        )
    return header_len


# ---------------------------------------------------------------------------------------------
# JSON


def _parse_int(text: str) -> int | float:
    digits = text[1:] if text.startswith("-") else text
    if len(digits) > _MAX_INT_DIGITS:
        raise InvalidSafetensorsError(
            f"header holds a {len(digits)}-digit integer; no size or offset can exceed "
            "2**64-1: the header is corrupt or hostile"
        )
    if text == "-0":
        # The reference parser reads "-0" as the float -0.0 and so refuses it wherever an
        # integer is required; returning a float here makes us refuse it too.
        return -0.0
    return int(text)


def _parse_constant(text: str) -> Any:
    raise InvalidSafetensorsError(f"header JSON uses {text}, which is not valid JSON")


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise InvalidSafetensorsError(
                    f"header JSON repeats the key {_show(key)} within one object; tensor "
                    "names, entry fields and metadata keys must each appear once"
                )
            seen.add(key)
    return obj


_DECODER = json.JSONDecoder(
    object_pairs_hook=_object_pairs, parse_int=_parse_int, parse_constant=_parse_constant
)


def _decode_json(text: str) -> dict[str, Any]:
    if not text.startswith("{"):
        first = text.lstrip(_JSON_WHITESPACE)[:1]
        if first == "{":
            problem = "has whitespace before the JSON object"
        elif first == "[":
            problem = "is a JSON array, not an object mapping tensor names to entries"
        else:
            problem = f"does not start with a JSON object ('{{'), found {text[:1]!r}"
        raise InvalidSafetensorsError(f"header {problem}: the file is not valid safetensors")
    # Failures are turned into messages inside the handlers and raised outside them, so the
    # original exception (which holds the whole header text) is not kept as __context__.
    message: str | None = None
    try:
        obj, end = _DECODER.raw_decode(text)
    except json.JSONDecodeError as exc:
        message = f"header is not valid JSON: {exc.msg} at character {exc.pos}"
    except RecursionError:
        message = (
            "header JSON is nested too deeply to parse; a safetensors header is at most "
            "three levels deep: the file is corrupt or hostile"
        )
    except InvalidSafetensorsError:
        raise
    except ValueError as exc:  # defensive: any other conversion failure inside the decoder
        message = f"header is not valid JSON: {exc}"
    if message is not None:
        raise InvalidSafetensorsError(message)
    rest = text[end:]
    if rest.strip(" "):
        pos = end + len(rest) - len(rest.lstrip(" "))
        raise InvalidSafetensorsError(
            f"unexpected {text[pos : pos + 8]!r} at character {pos} of the header, after the JSON "
            "object; only ASCII spaces may pad a safetensors header"
        )
    if not isinstance(obj, dict):  # unreachable given the '{' check; kept as a guard
        raise InvalidSafetensorsError("header JSON is not an object")
    return obj


# ---------------------------------------------------------------------------------------------
# Entries


def _show(value: object, limit: int = 60) -> str:
    # Names come from the untrusted file and may be huge; keep messages readable.
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _has_surrogate(text: str) -> bool:
    # json accepts "\ud800" escapes and yields unpaired surrogates, which are not Unicode text
    # and which the reference parser refuses.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_metadata(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise InvalidSafetensorsError(
            f"__metadata__ must be a JSON object of string -> string, got {type(value).__name__}"
        )
    for key, item in value.items():
        if not isinstance(item, str):
            raise InvalidSafetensorsError(
                f"__metadata__[{_show(key)}] is {type(item).__name__} {_show(item)}; metadata "
                "values must be strings (encode numbers and structures as JSON text)"
            )
        if _has_surrogate(key) or _has_surrogate(item):
            raise InvalidSafetensorsError(
                f"__metadata__ entry {_show(key)} contains an unpaired UTF-16 surrogate escape"
            )
    return dict(value)


def _check_name(name: str) -> None:
    if not name:
        raise InvalidSafetensorsError("header has a tensor with an empty name")
    if len(name) > MAX_TENSOR_NAME_CHARS:
        raise InvalidSafetensorsError(
            f"tensor name {_show(name)} is {len(name)} characters; at most "
            f"{MAX_TENSOR_NAME_CHARS} are allowed"
        )
    if "\x00" in name:
        raise InvalidSafetensorsError(f"tensor name {_show(name)} contains a NUL character")
    if _has_surrogate(name):
        raise InvalidSafetensorsError(
            f"tensor name {_show(name)} contains an unpaired UTF-16 surrogate escape"
        )


def _check_dtype(name: str, dtype: Any) -> str:
    if not isinstance(dtype, str):
        raise InvalidSafetensorsError(
            f"tensor {_show(name)}: dtype must be a string, got {_show(dtype)}"
        )
    if dtype in ITEMSIZE:
        return dtype
    if dtype in _SUB_BYTE_DTYPES:
        raise InvalidSafetensorsError(
            f"tensor {_show(name)} has sub-byte dtype {dtype}, which hydra_cas does not "
            "support; convert it to a whole-byte dtype such as U8 or F8_E4M3"
        )
    raise InvalidSafetensorsError(
        f"tensor {_show(name)} has unknown dtype {_show(dtype)}; supported dtypes: "
        f"{', '.join(sorted(ITEMSIZE))}"
    )


def _check_shape(name: str, dtype: str, shape: Any) -> tuple[int, ...]:
    if type(shape) is not list:
        raise InvalidSafetensorsError(
            f"tensor {_show(name)}: shape must be a list of integers, got {_show(shape)}"
        )
    if len(shape) > MAX_RANK:
        raise InvalidSafetensorsError(
            f"tensor {_show(name)} has {len(shape)} dimensions; at most {MAX_RANK} are allowed"
        )
    count = 1
    for axis, dim in enumerate(shape):
        # type() rather than isinstance(): JSON true/false parse to bool, a subclass of int.
        if type(dim) is not int or dim < 0:
            raise InvalidSafetensorsError(
                f"tensor {_show(name)}: dimension {axis} is {_show(dim)}; shape entries must "
                "be non-negative integers"
            )
        if dim > _U64_MAX:
            raise InvalidSafetensorsError(
                f"tensor {_show(name)}: dimension {axis} is {dim}, above 2**64-1"
            )
        # The reference implementation multiplies left to right in 64 bits and refuses on
        # overflow, even when a later dimension is 0; do the same so both accept the same set.
        count *= dim
        if count > _U64_MAX:
            raise InvalidSafetensorsError(
                f"tensor {_show(name)}: the element count of shape {_show(shape)} overflows 64 bits"
            )
    if count * ITEMSIZE[dtype] * 8 > _U64_MAX:
        raise InvalidSafetensorsError(
            f"tensor {_show(name)}: the size in bits of a {dtype} tensor of shape "
            f"{_show(shape)} overflows 64 bits"
        )
    return tuple(shape)


def _check_tensor(name: str, entry: Any, data_len: int) -> TensorInfo:
    _check_name(name)
    if not isinstance(entry, dict):
        raise InvalidSafetensorsError(
            f"tensor {_show(name)}: entry must be an object with dtype, shape and "
            f"data_offsets, got {type(entry).__name__}"
        )
    keys = set(entry)
    if keys != _TENSOR_KEYS:
        missing = sorted(_TENSOR_KEYS - keys)
        extra = sorted(keys - _TENSOR_KEYS)
        parts = []
        if missing:
            parts.append(f"is missing {', '.join(missing)}")
        if extra:
            parts.append(f"has unexpected key(s) {', '.join(_show(k, 30) for k in extra[:5])}")
        raise InvalidSafetensorsError(
            f"tensor {_show(name)}: entry {' and '.join(parts)}; it must have exactly the keys "
            "dtype, shape and data_offsets"
        )
    dtype = _check_dtype(name, entry["dtype"])
    shape = _check_shape(name, dtype, entry["shape"])

    offsets = entry["data_offsets"]
    if type(offsets) is not list or len(offsets) != 2:
        raise InvalidSafetensorsError(
            f"tensor {_show(name)}: data_offsets must be [begin, end], got {_show(offsets)}"
        )
    begin, end = offsets
    if type(begin) is not int or type(end) is not int or begin < 0 or end < begin:
        raise InvalidSafetensorsError(
            f"tensor {_show(name)}: data_offsets {_show(offsets)} must be integers with "
            "0 <= begin <= end"
        )
    if end > data_len:
        raise InvalidSafetensorsError(
            f"tensor {_show(name)}: data_offsets [{begin}, {end}] run past the end of the "
            f"{data_len}-byte data section: the file is truncated or its header is corrupt"
        )
    expected = nbytes_for(dtype, shape)
    if end - begin != expected:
        raise InvalidSafetensorsError(
            f"tensor {_show(name)}: data_offsets [{begin}, {end}] span {end - begin} bytes "
            f"but a {dtype} tensor of shape {list(shape)} needs {expected}"
        )
    return TensorInfo(name=name, dtype=dtype, shape=shape, begin=begin, end=end)


def _check_layout(tensors: list[TensorInfo], data_len: int) -> None:
    # safetensors requires the sorted tensors to tile the data section: each starts where the
    # previous one ended, so there are no overlaps (aliasing), holes or trailing bytes (places
    # to hide data that a digest covers but no tensor explains).
    cursor = 0
    previous: TensorInfo | None = None
    for info in tensors:
        if info.begin < cursor:
            assert previous is not None
            raise InvalidSafetensorsError(
                f"tensor {_show(info.name)} at bytes [{info.begin}, {info.end}) overlaps tensor "
                f"{_show(previous.name)} at [{previous.begin}, {previous.end})"
            )
        if info.begin > cursor:
            raise InvalidSafetensorsError(
                f"{info.begin - cursor} unused bytes at data offsets [{cursor}, {info.begin}) "
                f"before tensor {_show(info.name)}; safetensors requires tensors to be packed "
                "without holes"
            )
        if info.end > info.begin:
            previous = info
        cursor = info.end
    if cursor != data_len:
        raise InvalidSafetensorsError(
            f"data section is {data_len} bytes but the tensors cover only {cursor}: "
            f"{data_len - cursor} trailing bytes belong to no tensor (data appended to the "
            "file, or tensors missing from the header)"
        )


def _decode_utf8(body: bytes | memoryview) -> str:
    try:
        return str(body, "utf-8")
    except UnicodeDecodeError as exc:
        # Build the message here but raise outside the handler: the decode error holds a copy
        # of the whole header, which would otherwise stay alive as our error's __context__.
        bad = bytes(exc.object[exc.start : exc.start + 1])
        message = (
            f"header is not valid UTF-8: byte {bad!r} at header offset {exc.start} "
            f"({exc.reason}); the file is corrupt or not safetensors"
        )
    raise InvalidSafetensorsError(message)


def _parse_text(header_len: int, text: str, file_size: int) -> Header:
    obj = _decode_json(text)

    data_start = _LEN_PREFIX + header_len
    data_len = file_size - data_start
    metadata: dict[str, str] | None = None
    tensors: list[TensorInfo] = []
    for key, value in obj.items():
        if key == _METADATA_KEY:
            metadata = _check_metadata(value)
        else:
            tensors.append(_check_tensor(key, value, data_len))
    tensors.sort(key=lambda t: (t.begin, t.end, t.name))
    _check_layout(tensors, data_len)

    header = Header(
        header_len=header_len,
        data_start=data_start,
        data_len=data_len,
        tensors=tuple(tensors),
        metadata=metadata,
    )
    logger.debug(
        "validated safetensors header: %d tensors, %d header bytes, %d data bytes",
        len(tensors),
        header_len,
        data_len,
    )
    return header
