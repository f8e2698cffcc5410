"""Lossless, float-aware compression of one tensor's raw little-endian bytes.

:func:`encode` turns a tensor's bytes plus its safetensors dtype string into a
self-describing *frame*; :func:`decode` turns a frame back into exactly those bytes.
Only the dtype string is used, never a numpy dtype for the elements, so BF16 and
F8 payloads need no ``ml_dtypes``.  :func:`xor_bytes` makes deltas against a
parent tensor; XOR deltas of slowly changing weights compress much better.

:func:`encode` keeps the smallest of three methods:

``raw`` (0)
    The bytes as they are.
``zstd`` (1)
    One zstd frame of the bytes as they are.  Tried in full when there is no
    split, below 64 KiB, or when a 64 KiB sample predicts it beats ``split``.
``split`` (2)
    The elements, in chunks, cut into byte *streams* that compress well on their
    own, each its own zstd frame.  For floats, sign, exponent and mantissa bits
    are pulled apart (see *Split layouts*).  One-byte dtypes (BOOL, U8, I8, F8_*)
    have no split.

Streams are first coded by zstd with matching all but disabled, which makes zstd
huffman-code each 128 KiB block of literals (matches cost more than they save on
exponent planes); a stream that this packs below half its size is also tried
with ordinary zstd at ``level``, for runs and repeats.

Frame layout
------------
All integers are little-endian.  A frame is a 32-byte header, a table of stream
lengths, then the streams back to back::

    offset  size  field
    0       4     magic b"HYCZ"
    4       1     format version: 1
    5       1     method: 0 raw, 1 zstd, 2 split
    6       1     split layout: 1 byte planes, 2 float heads; else 0
    7       1     split chunk_log2: a chunk is 2**chunk_log2 elements (10..20); else 0
    8       2     split layout 2: exponent base; else 0
    10      1     split: item width W in bytes; else 0
    11      1     split layout 2: exponent bits E; else 0
    12      4     CRC-32 (as zlib.crc32) of bytes 0..11, four zero bytes, and bytes
                  16 .. 32+8*N-1; for raw frames continued over the payload
    16      8     raw length: byte count of the decoded tensor
    24      8     stream count N
    32      8*N   byte length of each stream, in order
    32+8*N  ...   the streams; their lengths sum to exactly the rest of the frame

``raw`` and ``zstd`` frames have N = 1: the payload, or one zstd frame of it.
Every non-empty stream of a ``zstd`` or ``split`` frame is exactly one zstd frame
that records its content size and has zstd's content checksum; an empty stream
(length 0) holds no bytes.  A stream that does not compress is still a zstd frame,
whose blocks zstd then stores raw (about 3 bytes of overhead per 128 KiB).

For ``split``, with ``n = raw length // W`` elements, ``C = ceil(n / 2**chunk_log2)``
chunks and ``S`` streams per chunk, ``N = C*S + 1``: chunk 0's S streams, chunk 1's,
..., then a *tail* stream holding the last ``raw length % W`` bytes as they are
(compressed like any stream; empty when there are none).

Split layouts
-------------
In a chunk of ``m`` elements, ``byte[j]`` is byte ``j`` of every element, in order
(``m`` bytes).  Layout 1 (I16, U16, I32, U32, I64, U64) has ``S = W`` streams:
``byte[0]``, ..., ``byte[W-1]``.

Layout 2 (F16, BF16, F32, F64; C64 as pairs of F32, so W = 4) reworks each
element's *head*, its top 16 bits (the little-endian uint16 at byte ``W-2``):
sign ``s`` (bit 15), exponent ``e`` (the next E bits) and the head's ``15-E``
mantissa bits, of which the ``T`` highest are ``t`` and the ``L`` lowest are ``l``.
Its ``S = W + 1`` streams are ``A, B, byte[0], ..., byte[W-3], ESC``::

    dtype          E   T  L   A (one byte per element)   B
    F16            5   3  7   code << 3 | t              m bytes:  s << 7 | l
    BF16 F32 C64   8   3  4   code << 3 | t              ceil(m/8) sign bytes,
                                                         then ceil(m/2) nibble bytes
    F64           11   4  0   code << 4 | t              ceil(m/8) sign bytes

Sign bytes hold element ``i``'s sign in bit ``i % 8`` of byte ``i // 8``.  Nibble
byte ``j`` holds ``l`` of element ``j`` in its low half and ``l`` of element
``j + ceil(m/2)`` (if any) in its high half.  Unused bits are zero.

``code = e - base`` for exponents ``base <= e < base + X``, with ``X = 2**(8-T) - 1``
(31, or 15 for F64) and ``base + X < 2**E``.  Any other exponent is an *escape*:
its code is ``X`` and ``e`` itself is appended to the chunk's ESC stream, in
element order, one byte each (E <= 8) or a uint16 each (F64).  The encoder picks
``base`` to cover the most exponents.  Keeping the top mantissa bits beside the
exponent lets one huffman code capture how they depend on each other.

Decoding is bounded: the header CRC, every length, and each zstd frame's header
(its content size must be exactly what the layout implies, its checksum present)
are checked before anything is decompressed; each decompression gets that size as
its limit, and besides the result only one chunk's worth of scratch is allocated.
Anything inconsistent raises :class:`~hydra_cas.errors.IntegrityError`.
"""

from __future__ import annotations

import logging
import struct
import threading
import zlib
from dataclasses import dataclass
from typing import Final

import numpy as np
import zstandard

from hydra_cas.dtypes import FLOAT_DTYPES, ITEMSIZE
from hydra_cas.errors import IntegrityError, InvalidTensorError

__all__ = [
    "DEFAULT_LEVEL",
    "MAGIC",
    "METHODS",
    "decode",
    "encode",
    "encoded_info",
    "xor_bytes",
]

logger = logging.getLogger(__name__)

BytesLike = bytes | bytearray | memoryview

#: Magic bytes that open every frame.
MAGIC: Final = b"HYCZ"
#: Format version written and accepted.
FORMAT_VERSION: Final = 1
#: zstd level for the matching (LZ) attempts and for the ``zstd`` method.
DEFAULT_LEVEL: Final = 3
#: Method names by method id.
METHODS: Final = ("raw", "zstd", "split")

_RAW, _ZSTD, _SPLIT = 0, 1, 2
_LAYOUT_BYTES, _LAYOUT_FLOAT = 1, 2

_HEADER: Final = struct.Struct("<4sBBBBHBBIQQ")
_HEADER_SIZE: Final = _HEADER.size  # 32
_CRC_FIELD, _CRC_OFFSET = 8, 12  # index in the header tuple, byte offset in the frame
_LEN: Final = 8

#: Elements per split chunk (2**_CHUNK_LOG2): small enough for a chunk's work to stay
#: in cache, large enough to amortise per-call costs and per-frame huffman tables.
_CHUNK_LOG2: Final = 17
_MIN_CHUNK_LOG2, _MAX_CHUNK_LOG2 = 10, 20

#: Elements sampled to choose the exponent base.
_BASE_SAMPLE: Final = 16384
#: Below this many input bytes every method is tried in full.
_TRY_ALL_BELOW: Final = 1 << 16
#: Bytes per slice, and slice count, of the sample that predicts plain zstd.
_SAMPLE_SLICE: Final = 1 << 14
_SAMPLE_SLICES: Final = 4
#: A stream is also tried with zstd's matcher when huffman alone reaches this ratio.
_LZ_TRY_RATIO: Final = 0.5
#: Streams this short are always tried both ways.
_LZ_TRY_BELOW: Final = 4096


@dataclass(frozen=True)
class _Layout:
    """How one dtype is split.

    For floats the 16-bit *head* of an element is sign, ``exp_bits`` exponent bits and
    ``15 - exp_bits`` mantissa bits; ``top`` of those mantissa bits go to plane A beside
    the exponent code, the other ``low`` bits and the sign to plane B.
    """

    ident: int
    width: int
    exp_bits: int = 0
    top: int = 0

    @property
    def streams(self) -> int:
        """Streams per chunk."""
        return self.width + 1 if self.ident == _LAYOUT_FLOAT else self.width

    @property
    def low(self) -> int:
        """Mantissa bits of the head that go to plane B."""
        return 15 - self.exp_bits - self.top

    def b_size(self, m: int) -> int:
        """Bytes of plane B for a chunk of ``m`` elements."""
        if self.low == 7:
            return m
        return (m + 7) // 8 + (m + 1) // 2 * (self.low == 4)

    @property
    def esc_code(self) -> int:
        """The largest exponent code, which marks an escape."""
        return (1 << (8 - self.top)) - 1


#: Exponent bits -> mantissa bits kept in plane A (leaving 7, 4 or 0 low bits for B).
_TOP_BITS: Final = {5: 3, 8: 3, 11: 4}


def _layout_for(dtype: str) -> _Layout | None:
    """The split layout of a dtype, or None when it has none (one-byte dtypes)."""
    if dtype not in ITEMSIZE:
        raise InvalidTensorError(
            f"unknown safetensors dtype {dtype!r}; expected one of {', '.join(sorted(ITEMSIZE))}"
        )
    width = ITEMSIZE[dtype]
    exp_bits = FLOAT_DTYPES.get("F32" if dtype == "C64" else dtype, (0, 0))[0]
    if dtype == "C64":  # pairs of F32
        width = 4
    if width == 1:
        return None
    if exp_bits in _TOP_BITS:
        return _Layout(_LAYOUT_FLOAT, width, exp_bits, _TOP_BITS[exp_bits])
    return _Layout(_LAYOUT_BYTES, width)


# --------------------------------------------------------------------------- zstd


_NOMATCH_PARAMS: Final = zstandard.ZstdCompressionParameters(
    # Literal-only coding: the tiny hash table and 7-byte minimum match mean zstd
    # finds (almost) no matches and huffman-codes each 128 KiB block on its own,
    # which is what low-entropy float planes need; LZ matches there cost more
    # than the literals they replace.
    window_log=17,
    hash_log=6,
    chain_log=6,
    search_log=1,
    min_match=7,
    target_length=0,
    strategy=zstandard.STRATEGY_FAST,
    write_content_size=1,
    write_checksum=1,
    write_dict_id=0,
)

_local = threading.local()


def _nomatch() -> zstandard.ZstdCompressor:
    """This thread's literal-only compressor (contexts are not thread-safe)."""
    comp = getattr(_local, "nomatch", None)
    if comp is None:
        comp = _local.nomatch = zstandard.ZstdCompressor(compression_params=_NOMATCH_PARAMS)
    return comp


def _lz(level: int) -> zstandard.ZstdCompressor:
    """This thread's ordinary zstd compressor for ``level``."""
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "lz", None)
    if cache is None:
        cache = _local.lz = {}
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(
            level=level, write_checksum=True, write_content_size=True, write_dict_id=False
        )
    return comp


def _dctx() -> zstandard.ZstdDecompressor:
    """This thread's decompressor."""
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def _pack(data: BytesLike | np.ndarray, level: int) -> bytes:
    """One zstd frame of ``data``: literal-only, or with matching when that is smaller."""
    buf = data.data if isinstance(data, np.ndarray) else data  # arrays here are contiguous
    size = buf.nbytes if isinstance(buf, memoryview) else len(buf)
    if size == 0:
        return b""
    best = _nomatch().compress(buf)
    if size <= _LZ_TRY_BELOW or len(best) < size * _LZ_TRY_RATIO:
        other = _lz(level).compress(buf)
        if len(other) < len(best):
            best = other
    return best


def _unpack(stream: memoryview, expected: int, what: str, *, multiple: int = 0) -> bytes:
    """Decompress one stream holding exactly ``expected`` bytes.

    With ``multiple`` set, ``expected`` is only an upper bound and the content size
    must be a multiple of ``multiple``.  Raises IntegrityError on any mismatch.
    """
    if len(stream) == 0:
        if expected and not multiple:
            raise IntegrityError(f"{what}: stream is empty but should hold {expected} bytes")
        return b""
    try:
        params = zstandard.get_frame_parameters(stream)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{what}: not a zstd frame ({exc})") from None
    claimed = params.content_size
    if claimed >= 1 << 63:  # ZSTD_CONTENTSIZE_UNKNOWN / _ERROR
        raise IntegrityError(f"{what}: zstd frame does not record its content size")
    if multiple:
        if claimed > expected or claimed % multiple or claimed == 0:
            raise IntegrityError(
                f"{what}: zstd frame claims {claimed} bytes; at most {expected} "
                f"in whole {multiple}-byte entries allowed"
            )
        expected = claimed
    elif claimed != expected:
        raise IntegrityError(f"{what}: zstd frame claims {claimed} bytes, expected {expected}")
    if not params.has_checksum:
        raise IntegrityError(f"{what}: zstd frame has no content checksum")
    try:
        out = _dctx().decompress(stream, max_output_size=expected, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{what}: corrupt zstd data ({exc})") from None
    if len(out) != expected:
        raise IntegrityError(f"{what}: decompressed {len(out)} bytes, expected {expected}")
    return out


# --------------------------------------------------------------------------- helpers


def _byte_view(data: BytesLike) -> memoryview:
    """A flat, contiguous unsigned-byte view of any bytes-like object."""
    view = memoryview(data)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _as_u8(data: BytesLike) -> np.ndarray:
    """A uint8 array over any bytes-like object (no copy when it is contiguous)."""
    return np.frombuffer(_byte_view(data), np.uint8)


def xor_bytes(a: BytesLike, b: BytesLike) -> bytearray:
    """Bytewise XOR of two equally long buffers (deltas against a parent tensor)."""
    ua, ub = _as_u8(a), _as_u8(b)
    if ua.size != ub.size:
        raise InvalidTensorError(f"xor_bytes needs equal lengths, got {ua.size} and {ub.size}")
    out = bytearray(ua.size)
    if ua.size:
        np.bitwise_xor(ua, ub, out=np.frombuffer(out, np.uint8))
    return out


def _new_output(size: int) -> bytearray:
    """The buffer a decode fills; every byte of it is overwritten.

    NOTE: bytearray(size) zero-fills, so big results pay one page fault per
    4 KiB page before decoding writes them (about 19 ms for a 47 MB tensor).
    An uninitialised allocation would avoid that but could expose stale memory
    if a decode path ever left bytes unwritten; decoding into the caller's
    final buffer is the safe way to win that time back.
    """
    return bytearray(size)


# --------------------------------------------------------------------------- split


class _Scratch:
    """Per-chunk work arrays, reused so chunks neither allocate nor fault pages."""

    def __init__(self, chunk: int, planes: int) -> None:
        # ``planes`` byte planes are for the encoder's gathers; the decoder needs none
        self.a = np.empty(chunk, np.uint8)
        self.b = np.empty(chunk + 2, np.uint8)  # room to pad B to whole packed bytes
        self.h = np.empty(chunk, np.uint16)
        self.t = np.empty(chunk, np.uint16)
        self.u = np.empty(chunk, np.uint16)
        self.w = np.empty(chunk, np.uint32)
        self.packed = np.empty(chunk // 8 + chunk // 2 + 2, np.uint8)
        self.planes = [np.empty(chunk, np.uint8) for _ in range(planes)]


def _heads(u16: np.ndarray, width: int) -> np.ndarray:
    """The top 16 bits of every element, as a (strided) view of the uint16 words."""
    return u16[width // 2 - 1 :: width // 2]


def _choose_base(heads: np.ndarray, layout: _Layout) -> int:
    """The exponent ``base`` whose direct codes cover the most sampled exponents.

    Codes ``0 .. esc_code-1`` stand for exponents ``base ..``; the window never wraps
    (``base + esc_code < 2**E``), so decoding needs no masking.
    """
    step = max(1, heads.size // _BASE_SAMPLE)
    exps = (heads[::step] >> (15 - layout.exp_bits)) & ((1 << layout.exp_bits) - 1)
    counts = np.bincount(exps, minlength=1 << layout.exp_bits)
    cum = np.concatenate(([0], np.cumsum(counts)))
    span = layout.esc_code
    covered = cum[span:-1] - cum[: -span - 1]  # window [s, s + span - 1], s + span < 2**E
    return int(np.argmax(covered))


def _split_heads(
    h: np.ndarray, layout: _Layout, base: int, s: _Scratch
) -> tuple[np.ndarray, np.ndarray, bytes]:
    """Plane A, plane B and the escaped exponents of one chunk of heads."""
    m = h.size
    mh = 15 - layout.exp_bits
    top, low, esc_code = layout.top, layout.low, layout.esc_code
    emask = (1 << layout.exp_bits) - 1
    a, t = s.a[:m], s.t[:m]
    # A = code << top | top mantissa bits: the sign and high code bits fall off the byte.
    np.right_shift(h, low, out=t)
    np.subtract(t, (base << top) & 0xFFFF, out=a, casting="unsafe")
    np.right_shift(h, mh, out=t)
    np.subtract(t, base, out=t)
    np.bitwise_and(t, emask, out=t)  # the full code, (e - base) mod 2**E
    esc = b""
    if int(t.max()) >= esc_code:
        where = np.flatnonzero(t >= esc_code)
        exps = (t[where] + base) & emask
        esc = exps.astype(np.uint8 if layout.exp_bits <= 8 else "<u2").tobytes()
        a[where] |= esc_code << top
    return a, _plane_b(h, layout, s), esc


def _plane_b(h: np.ndarray, layout: _Layout, s: _Scratch) -> np.ndarray:
    """Plane B of a chunk of heads: signs and low mantissa bits (see the module doc)."""
    m = h.size
    low = layout.low
    t, u, b = s.t[:m], s.u[:m], s.b[:m]
    if low == 7:  # one byte each: sign << 7 | 7 low bits
        np.bitwise_and(h, 0x807F, out=t)
        np.right_shift(t, 8, out=u)
        np.bitwise_or(t, u, out=b, casting="unsafe")
        return b
    flags = b.view(np.bool_)
    np.greater_equal(h, 0x8000, out=flags)
    signs = np.packbits(flags, bitorder="little")
    if low == 0:
        return signs
    # low == 4: after the sign bytes, nibble bytes: byte j holds element j's low bits
    # in its low half and element j + half's in its high half
    half = (m + 1) // 2
    nib = s.b[:m]
    np.bitwise_and(h, 0xF, out=nib, casting="unsafe")
    plane = s.packed[: signs.size + half]
    plane[: signs.size] = signs
    high = plane[signs.size :]
    high[m - half :] = 0
    np.left_shift(nib[half:], 4, out=high[: m - half])
    np.bitwise_or(high, nib[:half], out=high)
    return plane


def _add_b(b: np.ndarray, layout: _Layout, h: np.ndarray, s: _Scratch) -> None:
    """OR the signs and low mantissa bits held in plane B into the heads ``h``."""
    m = h.size
    low = layout.low
    t = s.t[:m]
    if low == 7:
        # B * 0x101 puts the sign at bit 15 and keeps the low bits at the bottom
        np.multiply(b, 0x101, out=t, dtype=np.uint16)
        np.bitwise_and(t, 0x807F, out=t)
        np.bitwise_or(h, t, out=h)
        return
    nsign = (m + 7) // 8
    signs = np.unpackbits(b[:nsign], count=m, bitorder="little")
    np.left_shift(signs, 15, out=t, dtype=np.uint16)
    np.bitwise_or(h, t, out=h)
    if low == 4:
        half = (m + 1) // 2
        nibbles = b[nsign:]
        part = s.b[:half]
        np.bitwise_and(nibbles, 0xF, out=part)
        np.bitwise_or(h[:half], part, out=h[:half])
        np.right_shift(nibbles[: m - half], 4, out=part[: m - half])
        np.bitwise_or(h[half:], part[: m - half], out=h[half:])


def _join_heads(
    a: np.ndarray,
    b: np.ndarray,
    esc: np.ndarray,
    layout: _Layout,
    base: int,
    s: _Scratch,
    what: str,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Inverse of :func:`_split_heads`: the chunk's heads, in ``out`` or scratch space."""
    m = a.size
    mh = 15 - layout.exp_bits
    low, esc_code = layout.low, layout.esc_code
    h = s.h[:m] if out is None else out
    # A << low is code << mh | top bits << low; adding base << mh gives the exponent
    # field, and no carry reaches the sign because base + esc_code < 2**E.
    np.left_shift(a, low, out=h, dtype=np.uint16)
    np.add(h, base << mh, out=h)
    _add_b(b, layout, h, s)
    limit = esc_code << layout.top
    values = esc.view(np.uint8 if layout.exp_bits <= 8 else "<u2")
    if m and int(a.max()) >= limit:
        where = np.flatnonzero(a >= limit)
        if where.size != values.size:
            raise IntegrityError(f"{what}: {where.size} escapes used but {values.size} stored")
        keep = 0xFFFF ^ (((1 << layout.exp_bits) - 1) << mh)
        h[where] = (h[where] & keep) | (values.astype(np.uint16) << mh)
    elif values.size:
        raise IntegrityError(f"{what}: {values.size} escapes stored but none used")
    return h


def _encode_split(u8: np.ndarray, layout: _Layout, level: int) -> tuple[int, list[bytes]]:
    """The exponent base and the streams of a split frame."""
    width = layout.width
    n = u8.size // width
    body = u8[: n * width]
    chunk = 1 << _CHUNK_LOG2
    floats = layout.ident == _LAYOUT_FLOAT
    heads = _heads(body.view("<u2"), width) if floats else None
    words = body.view("<u4") if floats and width == 4 else None
    base = _choose_base(heads, layout) if heads is not None and n else 0
    scratch = _Scratch(min(chunk, max(n, 1)), width)
    planes = scratch.planes
    streams: list[bytes] = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        m = stop - start
        part = body[start * width : stop * width]
        if heads is None:
            for j in range(width):
                np.copyto(planes[j][:m], part[j::width])
                streams.append(_pack(planes[j][:m], level))
            continue
        if words is not None:  # F32: shifts of whole words beat strided byte gathers
            w = words[start:stop]
            h = scratch.h[:m]
            np.right_shift(w, 16, out=h, casting="unsafe")
            np.copyto(planes[0][:m], w, casting="unsafe")
            np.right_shift(w, 8, out=planes[1][:m], casting="unsafe")
        else:
            h = heads[start:stop]
            if width > 2:  # gather the strided heads once; the bit work then runs contiguous
                np.copyto(scratch.h[:m], h)
                h = scratch.h[:m]
            for j in range(width - 2):
                np.copyto(planes[j][:m], part[j::width])
        a, b, esc = _split_heads(h, layout, base, scratch)
        streams.append(_pack(a, level))
        streams.append(_pack(b, level))
        streams.extend(_pack(planes[j][:m], level) for j in range(width - 2))
        streams.append(_pack(esc, level))
    streams.append(_pack(u8[n * width :], level))
    return base, streams


def _decode_split(
    blob: memoryview,
    spans: list[tuple[int, int]],
    layout: _Layout,
    base: int,
    chunk_log2: int,
    size: int,
) -> bytearray:
    """Rebuild a tensor's bytes from a split frame's streams, given as (offset, length)."""
    width = layout.width
    n = size // width
    chunk = 1 << chunk_log2
    out = _new_output(size)  # every byte is written below: chunk by chunk, then the tail
    o8 = np.frombuffer(out, np.uint8)
    floats = layout.ident == _LAYOUT_FLOAT
    heads = _heads(o8[: n * width].view("<u2"), width) if floats else None
    words = o8[: n * width].view("<u4") if floats and width == 4 else None
    esc_width = 1 if layout.exp_bits <= 8 else 2
    scratch = _Scratch(min(chunk, max(n, 1)), 0)
    pos = 0

    def take(label: str, expected: int, multiple: int = 0) -> np.ndarray:
        nonlocal pos
        off, length = spans[pos]
        pos += 1
        raw = _unpack(blob[off : off + length], expected, label, multiple=multiple)
        return np.frombuffer(raw, np.uint8)

    for index, start in enumerate(range(0, n, chunk)):
        stop = min(n, start + chunk)
        m = stop - start
        part = o8[start * width : stop * width]
        what = f"split chunk {index}"
        if heads is None:
            for j in range(width):
                part[j::width] = take(f"{what} byte {j}", m)
            continue
        a = take(f"{what} plane A", m)
        b = take(f"{what} plane B", layout.b_size(m))
        lows = [take(f"{what} byte {j}", m) for j in range(width - 2)]
        esc = take(f"{what} escapes", m * esc_width, esc_width)
        if width == 2:  # the heads are the elements: build them in place
            _join_heads(a, b, esc, layout, base, scratch, what, heads[start:stop])
            continue
        h = _join_heads(a, b, esc, layout, base, scratch, what)
        if words is None:
            for j, low in enumerate(lows):
                part[j::width] = low
            heads[start:stop] = h
            continue
        # F32: build whole words in cache, then store them contiguously.
        t, w = scratch.t[:m], scratch.w[:m]
        np.left_shift(h, 16, out=w, dtype=np.uint32)
        np.left_shift(lows[1], 8, out=t, dtype=np.uint16)
        np.bitwise_or(t, lows[0], out=t)
        np.bitwise_or(w, t, out=words[start:stop])
    tail = size - n * width
    o8[n * width :] = take("tail", tail)
    return out


# --------------------------------------------------------------------------- frames


def _frame(
    method: int,
    size: int,
    streams: list[bytes],
    *,
    layout: _Layout | None = None,
    base: int = 0,
) -> bytes:
    """Header, stream table and streams, joined, with the header's CRC filled in."""
    fields = [
        MAGIC,
        FORMAT_VERSION,
        method,
        layout.ident if layout else 0,
        _CHUNK_LOG2 if layout else 0,
        base,
        layout.width if layout else 0,
        layout.exp_bits if layout else 0,
        0,
        size,
        len(streams),
    ]
    table = struct.pack(f"<{len(streams)}Q", *(len(s) for s in streams))
    crc = zlib.crc32(table, zlib.crc32(_HEADER.pack(*fields)))
    if method == _RAW:
        crc = zlib.crc32(streams[0], crc)
    fields[_CRC_FIELD] = crc
    return b"".join([_HEADER.pack(*fields), table, *streams])


def _frame_size(streams: list[bytes]) -> int:
    """Bytes of a frame holding these streams."""
    return _HEADER_SIZE + _LEN * len(streams) + sum(len(s) for s in streams)


def _sample(u8: np.ndarray, width: int) -> np.ndarray:
    """Evenly spaced, element-aligned slices of a large buffer, concatenated."""
    step = (u8.size - _SAMPLE_SLICE) // (_SAMPLE_SLICES - 1)
    starts = [(i * step) // width * width for i in range(_SAMPLE_SLICES)]
    return np.concatenate([u8[s : s + _SAMPLE_SLICE] for s in starts])


def encode(data: BytesLike, dtype: str, *, level: int = DEFAULT_LEVEL) -> bytes:
    """Compress one tensor's raw bytes into a self-describing frame.

    ``dtype`` is the safetensors dtype string; ``level`` the zstd level (1..22) of
    the matching attempts.  Whichever of raw, zstd and split is smallest wins.
    """
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 22:
        raise ValueError(f"zstd level must be an int in 1..22, got {level!r}")
    layout = _layout_for(dtype)
    u8 = _as_u8(data)
    size = u8.size
    method, streams = _RAW, []
    best = _HEADER_SIZE + _LEN + size
    base = 0
    if size:
        split_done = False
        if layout is not None and size >= layout.width:
            split_base, split = _encode_split(u8, layout, level)
            split_done = True
            if _frame_size(split) < best:
                method, streams, best, base = _SPLIT, split, _frame_size(split), split_base
        try_plain = not split_done or size < _TRY_ALL_BELOW
        if not try_plain:  # big tensor: predict plain zstd from a sample first
            sample = _sample(u8, layout.width if layout else 1)
            try_plain = len(_pack(sample, level)) * size < best * sample.size
        if try_plain:
            plain = [_pack(u8, level)]
            if _frame_size(plain) < best:
                method, streams, best = _ZSTD, plain, _frame_size(plain)
    logger.debug("encoded %d bytes of %s as %s into %d bytes", size, dtype, METHODS[method], best)
    if method == _RAW:
        return _frame(_RAW, size, [u8.tobytes()])
    if method == _ZSTD:
        return _frame(_ZSTD, size, streams)
    return _frame(_SPLIT, size, streams, layout=layout, base=base)


def _parse(blob: memoryview) -> tuple[tuple[int, ...], list[tuple[int, int]], int]:
    """Header fields, each stream's (offset, length), and the CRC of header and table.

    Checks magic, version, method and that the stream lengths fill the frame exactly.
    """
    if len(blob) < _HEADER_SIZE:
        raise IntegrityError(f"encoded tensor is {len(blob)} bytes, shorter than a header")
    fields = _HEADER.unpack_from(blob, 0)
    magic, version, method = fields[:3]
    count = fields[-1]
    if magic != MAGIC:
        raise IntegrityError(f"encoded tensor has bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise IntegrityError(f"encoded tensor has unsupported format version {version}")
    if method >= len(METHODS):
        raise IntegrityError(f"encoded tensor has unknown method id {method}")
    if count > (len(blob) - _HEADER_SIZE) // _LEN:
        raise IntegrityError(f"encoded tensor claims {count} streams, more than it can hold")
    lengths = struct.unpack_from(f"<{count}Q", blob, _HEADER_SIZE)
    offset = _HEADER_SIZE + _LEN * count
    if sum(lengths) != len(blob) - offset:
        raise IntegrityError(
            f"encoded tensor's stream lengths sum to {sum(lengths)} bytes but "
            f"{len(blob) - offset} bytes follow its header"
        )
    crc = zlib.crc32(blob[:_CRC_OFFSET])
    crc = zlib.crc32(blob[_CRC_OFFSET + 4 : offset], zlib.crc32(b"\0\0\0\0", crc))
    spans = []
    for length in lengths:
        spans.append((offset, length))
        offset += length
    return fields, spans, crc


def encoded_info(blob: BytesLike) -> tuple[str, int]:
    """The method name and raw size a frame claims.

    Checks the magic, version, method and stream lengths (raising IntegrityError);
    the checksums are left to :func:`decode`.
    """
    fields, _, _ = _parse(_byte_view(blob))
    return METHODS[fields[2]], fields[9]


def decode(blob: BytesLike, dtype: str, size: int) -> bytearray:
    """Decompress a frame made by :func:`encode` back into exactly ``size`` bytes.

    ``size`` is the raw byte count recorded outside the frame.  A frame that claims
    another size, or that is damaged in any way found, raises IntegrityError.
    """
    layout = _layout_for(dtype)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be a non-negative int, got {size!r}")
    view = _byte_view(blob)
    fields, spans, head_crc = _parse(view)
    _, _, method, lay_id, chunk_log2, base, width, exp_bits, crc, claimed, count = fields
    name = METHODS[method]
    if method == _RAW:
        if len(spans) == 1:
            head_crc = zlib.crc32(view[spans[0][0] :], head_crc)
        if crc != head_crc:
            raise IntegrityError("raw frame fails its CRC-32 check")
    elif crc != head_crc:
        raise IntegrityError(f"{name} frame's header fails its CRC-32 check")
    if claimed != size:
        raise IntegrityError(f"encoded tensor claims {claimed} raw bytes, expected {size}")
    if method != _SPLIT and (lay_id or chunk_log2 or base or width or exp_bits):
        raise IntegrityError(f"{name} frame has split parameters set")
    if method != _SPLIT and count != 1:
        raise IntegrityError(f"{name} frame must hold one stream, not {count}")
    if method == _RAW:
        off, length = spans[0]
        if length != size:
            raise IntegrityError(f"raw frame holds {length} bytes, expected {size}")
        return bytearray(view[off:])
    if method == _ZSTD:
        off, length = spans[0]
        return bytearray(_unpack(view[off : off + length], size, "zstd stream"))
    if layout is None or (lay_id, width, exp_bits) != (layout.ident, layout.width, layout.exp_bits):
        raise IntegrityError(
            f"split frame (layout {lay_id}, width {width}, {exp_bits} exponent bits) "
            f"was not made for dtype {dtype}"
        )
    if not _MIN_CHUNK_LOG2 <= chunk_log2 <= _MAX_CHUNK_LOG2:
        raise IntegrityError(f"split frame has chunk_log2 {chunk_log2}, outside 10..20")
    if layout.exp_bits and base + layout.esc_code >= 1 << exp_bits:
        raise IntegrityError(f"split frame's exponent base {base} is out of range")
    if not layout.exp_bits and base:
        raise IntegrityError("split frame sets an exponent base its layout does not use")
    n = size // width
    expected = -(-n // (1 << chunk_log2)) * layout.streams + 1
    if count != expected:
        raise IntegrityError(f"split frame holds {count} streams; its size implies {expected}")
    return _decode_split(view, spans, layout, base, chunk_log2, size)
