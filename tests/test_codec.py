"""Tests for hydra_cas.codec: bit-exact round trips, method choice, hostile frames."""

from __future__ import annotations

import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from hydra_cas import codec
from hydra_cas.codec import decode, encode, encoded_info, xor_bytes
from hydra_cas.dtypes import FLOAT_DTYPES, ITEMSIZE
from hydra_cas.errors import IntegrityError, InvalidTensorError

DTYPES = sorted(ITEMSIZE)
RNG = np.random.default_rng(20240601)


def roundtrip(data: bytes, dtype: str, **kwargs: int) -> bytes:
    frame = encode(data, dtype, **kwargs)
    out = decode(frame, dtype, len(data))
    assert isinstance(out, bytearray)
    assert bytes(out) == data, (dtype, len(data), encoded_info(frame))
    return frame


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 1024 elements, so small inputs span several chunks."""
    monkeypatch.setattr(codec, "_CHUNK_LOG2", 10)


def f32_bits(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype="<f4").view("<u4")


def realistic(dtype: str, count: int) -> bytes:
    """Normal-distributed weights (plus a few outliers) in the given float dtype."""
    values = RNG.standard_normal(count) * 0.03
    values[:: max(1, count // 7)] *= 1e-9  # far-away exponents: escapes
    if dtype == "F64":
        return values.astype("<f8").tobytes()
    if dtype == "F32":
        return values.astype("<f4").tobytes()
    if dtype == "F16":
        return values.astype("<f2").tobytes()
    if dtype == "BF16":
        return (f32_bits(values) >> 16).astype("<u2").tobytes()
    if dtype == "C64":
        return (values + 1j * values[::-1]).astype("<c8").tobytes()
    # F8 variants: any byte is a value; use a skewed distribution like real ones
    return np.clip(np.abs(RNG.standard_normal(count) * 20), 0, 255).astype(np.uint8).tobytes()


def specials(dtype: str) -> bytes:
    """NaNs with payloads, infinities, signed zeros, denormals and extremes."""
    if dtype in ("F32", "C64"):
        bits = [
            0x7FC00000,
            0xFFC00001,
            0x7F800001,
            0x7F800000,
            0xFF800000,
            0,
            0x80000000,
            1,
            0x807FFFFF,
            0x7F7FFFFF,
            0xFF7FFFFF,
            0x00800000,
            0x3F800000,
        ]
        return np.array(bits * 3, "<u4").tobytes()[: len(bits) * 4 * 2]
    if dtype == "F64":
        bits = [
            0x7FF8000000000000,
            0xFFF0000000000001,
            0x7FF0000000000000,
            0xFFF0000000000000,
            0,
            1 << 63,
            1,
            0x800FFFFFFFFFFFFF,
            0x7FEFFFFFFFFFFFFF,
            0x3FF0000000000000,
        ]
        return np.array(bits, "<u8").tobytes()
    if dtype in ("F16", "BF16"):
        bits = [
            0x7E00,
            0xFE01,
            0x7C00,
            0xFC00,
            0x7F80,
            0xFF80,
            0x7FC1,
            0,
            0x8000,
            1,
            0x83FF,
            0x7BFF,
            0xFBFF,
            0x3C00,
            0x3F80,
        ]
        return np.array(bits, "<u2").tobytes()
    return bytes(range(256))


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [0, 1, 2, 3, 7, 8, 9, 100, 4099])
def test_roundtrip_random_bytes(dtype: str, size: int) -> None:
    roundtrip(RNG.integers(0, 256, size, dtype=np.uint8).tobytes(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_realistic_and_special_values(dtype: str, small_chunks: None) -> None:
    width = ITEMSIZE[dtype]
    data = realistic(dtype, 5000 // width)
    frame = roundtrip(data, dtype)
    if dtype in FLOAT_DTYPES and width > 1:
        assert encoded_info(frame)[0] == "split"
        assert len(frame) < 0.95 * len(data)
    roundtrip(specials(dtype), dtype)
    roundtrip(specials(dtype) + data, dtype)
    roundtrip(data + b"\x01\x02\x03"[: max(0, width - 1)], dtype)  # ragged tail


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16", "F64", "C64", "I32", "I64", "U16"])
def test_roundtrip_many_chunks_and_every_exponent(dtype: str, small_chunks: None) -> None:
    width = ITEMSIZE[dtype]
    count = 5000
    # every bit pattern of the top 16 bits, so every exponent and every escape
    heads = np.arange(count, dtype=np.uint32) * 13 % 65536
    words = RNG.integers(0, 256, (count, width), dtype=np.uint8)
    words[:, -2] = heads & 0xFF
    words[:, -1] = heads >> 8
    roundtrip(words.tobytes(), dtype)
    roundtrip(realistic(dtype, 3 * 1024 * 8 // width), dtype)


def test_roundtrip_big_tensor() -> None:
    """Results over 4 MiB span many chunks and an odd element count."""
    data = realistic("F32", (5 << 20) // 4 + 3)  # several chunks, odd element count
    roundtrip(data + b"\x01\x02", "F32")
    roundtrip(realistic("BF16", (5 << 20) // 2), "BF16")


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_and_scalar(dtype: str) -> None:
    frame = roundtrip(b"", dtype)
    assert len(frame) <= 48
    assert encoded_info(frame) == ("raw", 0)
    width = ITEMSIZE[dtype]
    roundtrip(b"\x3f" * width, dtype)
    roundtrip(b"\x00" * width, dtype)


@pytest.mark.parametrize("level", [1, 3, 9, 19])
def test_levels(level: int) -> None:
    data = realistic("F32", 3000) + bytes(4000)
    roundtrip(data, "F32", level=level)
    roundtrip(data, "U8", level=level)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        encode(b"abcd", "F32", level=0)
    with pytest.raises(ValueError):
        encode(b"abcd", "F32", level=23)
    with pytest.raises(InvalidTensorError):
        encode(b"abcd", "F31")
    with pytest.raises(InvalidTensorError):
        decode(encode(b"abcd", "F32"), "F31", 4)
    with pytest.raises(ValueError):
        decode(encode(b"abcd", "F32"), "F32", -1)


def test_input_kinds() -> None:
    data = realistic("F32", 1000)
    as_bytearray = bytearray(data)
    frame = encode(data, "F32")
    assert encode(as_bytearray, "F32") == frame
    assert encode(memoryview(data), "F32") == frame
    assert encode(np.frombuffer(data, "<f4").data, "F32") == frame
    odd = b"x" + data  # unaligned view
    assert encode(memoryview(odd)[1:], "F32") == frame
    assert bytes(decode(memoryview(frame), "F32", len(data))) == data
    assert bytes(decode(bytearray(frame), "F32", len(data))) == data


# --------------------------------------------------------------------------- method choice


def test_random_bytes_are_stored_raw() -> None:
    data = RNG.integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    for dtype in ("U8", "F32", "BF16", "I64"):
        frame = roundtrip(data, dtype)
        assert encoded_info(frame) == ("raw", len(data))
        assert len(frame) == len(data) + 40


def test_zeros_compress() -> None:
    for dtype in DTYPES:
        data = bytes(ITEMSIZE[dtype] * 10_000)
        frame = roundtrip(data, dtype)
        method, size = encoded_info(frame)
        assert method in ("zstd", "split") and size == len(data)
        assert len(frame) < 400


def test_float_weights_use_split_and_beat_plain_zstd() -> None:
    for dtype in ("F32", "BF16", "F16"):
        data = realistic(dtype, 100_000)
        frame = roundtrip(data, dtype)
        assert encoded_info(frame)[0] == "split"
        assert len(frame) < len(zstandard.ZstdCompressor(level=3).compress(data))


# --------------------------------------------------------------------------- xor


def test_xor_bytes() -> None:
    a = RNG.integers(0, 256, 1001, dtype=np.uint8)
    b = RNG.integers(0, 256, 1001, dtype=np.uint8)
    out = xor_bytes(a.tobytes(), bytearray(b.tobytes()))
    assert isinstance(out, bytearray)
    assert bytes(out) == (a ^ b).tobytes()
    assert xor_bytes(memoryview(out), b.tobytes()) == bytearray(a.tobytes())
    assert xor_bytes(b"", b"") == bytearray()
    with pytest.raises(InvalidTensorError):
        xor_bytes(b"abc", b"ab")


def test_xor_delta_compresses_better() -> None:
    old = (RNG.standard_normal(50_000) * 0.05).astype("<f4")
    new = (old + RNG.standard_normal(old.size).astype("<f4") * np.abs(old) * 1e-3).astype("<f4")
    delta = xor_bytes(new.tobytes(), old.tobytes())
    frame = roundtrip(bytes(delta), "F32")
    assert len(frame) < 0.7 * len(encode(new.tobytes(), "F32"))
    assert bytes(xor_bytes(decode(frame, "F32", len(delta)), old.tobytes())) == new.tobytes()


# --------------------------------------------------------------------------- properties


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=3000), dtype=st.sampled_from(DTYPES))
def test_property_roundtrip(data: bytes, dtype: str) -> None:
    frame = roundtrip(data, dtype)
    assert encoded_info(frame)[1] == len(data)
    assert len(frame) <= len(data) + 40


@settings(max_examples=60, deadline=None)
@given(
    words=st.lists(st.integers(0, 2**32 - 1), max_size=600),
    dtype=st.sampled_from(["F32", "BF16", "F16", "F64", "C64", "I32"]),
)
def test_property_roundtrip_words(words: list[int], dtype: str) -> None:
    data = np.array(words, "<u4").tobytes()
    data = data[: len(data) // ITEMSIZE[dtype] * ITEMSIZE[dtype]]
    roundtrip(data, dtype)


# --------------------------------------------------------------------------- hostile frames


def split_frame() -> tuple[bytes, bytes]:
    data = realistic("F32", 3000)
    frame = encode(data, "F32")
    assert encoded_info(frame)[0] == "split"
    return data, frame


def stream_spans(frame: bytes) -> list[tuple[int, int]]:
    count = struct.unpack_from("<Q", frame, 24)[0]
    lengths = struct.unpack_from(f"<{count}Q", frame, 32)
    offset = 32 + 8 * count
    spans = []
    for length in lengths:
        spans.append((offset, length))
        offset += length
    return spans


def reseal(frame: bytes | bytearray) -> bytes:
    """Recompute the header CRC, as a deliberate forger (not a bit flip) would."""
    frame = bytearray(frame)
    count = struct.unpack_from("<Q", frame, 24)[0]
    end = 32 + 8 * count
    crc = zlib.crc32(frame[16:end], zlib.crc32(bytes(frame[:12]) + b"\0\0\0\0"))
    if frame[5] == 0:  # raw: the payload is covered too
        crc = zlib.crc32(frame[end:], crc)
    struct.pack_into("<I", frame, 12, crc)
    return bytes(frame)


def build(method: int, size: int, streams: list[bytes], header_extra: bytes = bytes(8)) -> bytes:
    header = b"HYCZ" + bytes([1, method]) + header_extra[:6] + b"\0\0\0\0"
    header += struct.pack("<QQ", size, len(streams))
    table = struct.pack(f"<{len(streams)}Q", *map(len, streams))
    return reseal(header + table + b"".join(streams))


def test_every_flipped_byte_is_detected() -> None:
    data, frame = split_frame()
    for pos in range(len(frame)):
        broken = bytearray(frame)
        broken[pos] ^= 0x10
        try:
            out = decode(broken, "F32", len(data))
        except IntegrityError:
            continue
        # a few bits zstd ignores (e.g. the window size of a single-segment frame)
        # may flip harmlessly; what must never happen is wrong data
        assert bytes(out) == data, f"flip at {pos} gave wrong data"


def test_flipped_byte_in_each_stream() -> None:
    data, frame = split_frame()
    for offset, length in stream_spans(frame):
        if not length:
            continue
        for pos in (offset + length // 2, offset + length - 1):
            broken = bytearray(frame)
            broken[pos] ^= 0xFF
            with pytest.raises(IntegrityError):
                decode(broken, "F32", len(data))


def test_raw_frame_flip_detected() -> None:
    data = RNG.integers(0, 256, 1000, dtype=np.uint8).tobytes()
    frame = bytearray(encode(data, "U8"))
    assert encoded_info(frame)[0] == "raw"
    frame[500] ^= 1
    with pytest.raises(IntegrityError):
        decode(frame, "U8", len(data))


def test_truncated_and_extended_frames() -> None:
    data, frame = split_frame()
    for cut in (0, 1, 16, 31, 32, 40, len(frame) // 2, len(frame) - 1):
        with pytest.raises(IntegrityError):
            decode(frame[:cut], "F32", len(data))
    with pytest.raises(IntegrityError):
        decode(frame + b"\0", "F32", len(data))
    with pytest.raises(IntegrityError):
        encoded_info(frame[:20])


def test_wrong_size_or_dtype() -> None:
    data, frame = split_frame()
    for size in (0, len(data) - 1, len(data) + 1, len(data) * 2):
        with pytest.raises(IntegrityError):
            decode(frame, "F32", size)
    for dtype in ("BF16", "F16", "I32", "U8", "F64"):
        with pytest.raises(IntegrityError):
            decode(frame, dtype, len(data))


def test_bad_header_fields() -> None:
    data, frame = split_frame()
    for offset, value in (
        (0, ord("X")),
        (4, 2),
        (5, 7),
        (6, 9),
        (7, 30),
        (7, 3),
        (10, 8),
        (11, 11),
        (8, 250),
    ):
        broken = bytearray(frame)
        broken[offset] = value
        with pytest.raises(IntegrityError):
            decode(reseal(broken), "F32", len(data))
        with pytest.raises(IntegrityError):
            decode(broken, "F32", len(data))  # and the CRC alone catches it too


def test_lying_stream_lengths() -> None:
    data, frame = split_frame()
    spans = stream_spans(frame)
    count = len(spans)
    lengths = [length for _, length in spans]
    for i in range(count - 1):
        for shift in (1, -1, 7):
            moved = lengths.copy()
            moved[i] += shift
            moved[i + 1] -= shift
            if min(moved) < 0:
                continue
            broken = bytearray(frame)
            struct.pack_into(f"<{count}Q", broken, 32, *moved)
            with pytest.raises(IntegrityError):
                decode(reseal(broken), "F32", len(data))
    broken = bytearray(frame)
    struct.pack_into("<Q", broken, 24, 2**40)  # absurd stream count
    with pytest.raises(IntegrityError):
        decode(reseal(broken), "F32", len(data))


def rle_bomb(claimed: int | None, blocks: int, checksum: bool = True) -> bytes:
    """A hand-made zstd frame of ``blocks`` RLE blocks of 128 KiB zeros each."""
    descriptor = (0 if claimed is None else 0xC0) | (0x04 if checksum else 0)
    frame = struct.pack("<IB", 0xFD2FB528, descriptor) + bytes([0x38])  # 128 KiB window
    if claimed is not None:
        frame += struct.pack("<Q", claimed)
    for i in range(blocks):
        header = (1 if i == blocks - 1 else 0) | (1 << 1) | ((128 * 1024) << 3)
        frame += header.to_bytes(3, "little") + b"\0"
    return frame + (b"\0\0\0\0" if checksum else b"")


@pytest.mark.parametrize(
    "stream",
    [
        rle_bomb(2**40, 4),  # claims a terabyte
        rle_bomb(None, 8192),  # no content size, a gigabyte of zeros
        rle_bomb(1000, 8192),  # claims the right size but expands to a gigabyte
        rle_bomb(1000, 1, checksum=False),
        zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1000)),
        zstandard.ZstdCompressor(write_checksum=False).compress(bytes(1000)),
        zstandard.ZstdCompressor(write_checksum=True).compress(bytes(999)),
        zstandard.ZstdCompressor(write_checksum=True).compress(bytes(1000)) * 2,
        b"\x28\xb5\x2f\xfd" + bytes(20),
        bytes(40),
    ],
)
def test_zstd_bombs_and_lies_are_refused_cheaply(stream: bytes) -> None:
    frame = build(1, 1000, [stream])
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError):
            decode(frame, "U8", 1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_bomb_inside_split_frame() -> None:
    data, frame = split_frame()
    spans = stream_spans(frame)
    offset, length = spans[0]  # chunk 0, plane A
    bomb = rle_bomb(2**40, 2)
    forged = bytearray(frame[:offset]) + bomb + frame[offset + length :]
    struct.pack_into("<Q", forged, 32, len(bomb))
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError):
            decode(reseal(forged), "F32", len(data))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(data) + (1 << 20)


def test_escape_count_mismatch() -> None:
    data = realistic("F32", 3000)  # has escapes
    frame = encode(data, "F32")
    spans = stream_spans(frame)
    esc_offset, esc_length = spans[4]
    assert esc_length > 0
    forged = bytearray(frame[:esc_offset]) + frame[esc_offset + esc_length :]
    struct.pack_into("<Q", forged, 32 + 8 * 4, 0)
    with pytest.raises(IntegrityError, match="escape"):
        decode(reseal(forged), "F32", len(data))


def test_valid_hand_built_frames() -> None:
    payload = b"hello world" * 10
    assert bytes(decode(build(0, len(payload), [payload]), "U8", len(payload))) == payload
    stream = zstandard.ZstdCompressor(write_checksum=True).compress(payload)
    assert bytes(decode(build(1, len(payload), [stream]), "U8", len(payload))) == payload
    assert encoded_info(build(1, len(payload), [stream])) == ("zstd", len(payload))
