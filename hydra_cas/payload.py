"""Turning a dict of tensors into a deterministic safetensors payload, streamed.

The payload is never assembled in memory: the header is built from the tensors'
dtypes and shapes, then each tensor's bytes are handed out as zero-copy views in
bounded chunks (a non-contiguous or big-endian tensor is converted one slab at a
time), so saving a model needs only a chunk of extra memory.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hydra_cas.dtypes import ITEMSIZE, dtype_name_for
from hydra_cas.errors import InvalidTensorError

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "TensorSource",
    "prepare",
    "build_header",
    "iter_data",
    "tensor_summary",
    "CHUNK_BYTES",
    "MAX_TENSOR_NAME",
]

CHUNK_BYTES = 16 * 1024 * 1024
MAX_TENSOR_NAME = 1024
_LITTLE = sys.byteorder == "little"


@dataclass(frozen=True, slots=True)
class TensorSource:
    """One tensor ready to be written: its safetensors dtype, shape and bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    array: np.ndarray  # bytes in C order; may still need a byte swap or a copy

    @property
    def nbytes(self) -> int:
        return int(self.array.size) * ITEMSIZE[self.dtype]


def _shown(name: object) -> str:
    text = repr(name)
    return text if len(text) <= 60 else text[:57] + "..."


def _from_torch(name: str, tensor: Any) -> TensorSource:
    dtype = dtype_name_for(tensor.dtype)
    shape = tuple(int(d) for d in tensor.shape)
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        raw = np.empty(0, dtype=np.uint8)
    else:
        import torch  # already imported by the caller, since they passed a tensor

        raw = flat.view(torch.uint8).numpy()
    if not _LITTLE and ITEMSIZE[dtype] > 1:
        raw = raw.reshape(-1, ITEMSIZE[dtype])[:, ::-1].reshape(-1)
    return TensorSource(name, dtype, shape, raw)


def _pairs(tensors: Any) -> list[tuple[Any, Any]]:
    """``tensors.items()`` as (name, value) pairs, refusing look-alikes that break the contract."""
    try:
        pairs = [(name, value) for name, value in tensors.items()]
    except (TypeError, ValueError) as exc:
        raise InvalidTensorError(
            f"tensors must be a dict of name -> array; its items() did not give (name, value) pairs ({exc})"
        ) from None
    return pairs


def prepare(tensors: object) -> list[TensorSource]:
    """Validate ``tensors`` and order them as the payload lays them out.

    Accepts a mapping of str to numpy arrays (or torch tensors, detected without
    importing torch).  Raises InvalidTensorError naming the offending key.
    """
    if not hasattr(tensors, "items"):
        raise InvalidTensorError(f"tensors must be a dict of name -> array, got {type(tensors).__name__}")
    sources: list[TensorSource] = []
    seen: set[str] = set()
    for name, value in _pairs(tensors):
        if not isinstance(name, str):
            raise InvalidTensorError(f"tensor names must be str, got {type(name).__name__} {_shown(name)}")
        if not name or len(name) > MAX_TENSOR_NAME or "\x00" in name or name == "__metadata__":
            raise InvalidTensorError(
                f"invalid tensor name {_shown(name)}: use 1 to {MAX_TENSOR_NAME} characters, "
                "no NUL, and not '__metadata__'"
            )
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidTensorError(
                f"tensor name {_shown(name)} is not valid UTF-8 (a lone surrogate)"
            ) from None
        if name in seen:
            # A dict cannot repeat a key, but a Mapping look-alike can; two tensors of one
            # name would make a payload that no reader accepts.
            raise InvalidTensorError(f"tensor name {_shown(name)} appears twice")
        seen.add(name)
        module = type(value).__module__
        if module.startswith("torch") and hasattr(value, "detach"):
            sources.append(_from_torch(name, value))
            continue
        if not isinstance(value, np.ndarray):
            hint = (
                "wrap it with np.asarray(...)"
                if isinstance(value, (list, tuple, int, float, np.generic))
                else "convert it to a numpy array"
            )
            raise InvalidTensorError(
                f"tensor {_shown(name)} is a {type(value).__name__}, not an array; {hint}"
            )
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise InvalidTensorError(
                f"tensor {_shown(name)} has dtype object; only numeric and bool arrays can be stored"
            )
        try:
            dtype = dtype_name_for(array.dtype)
        except InvalidTensorError as exc:
            raise InvalidTensorError(f"tensor {_shown(name)}: {exc}") from None
        sources.append(TensorSource(name, dtype, tuple(int(d) for d in array.shape), array))
    # Largest items first keeps every tensor aligned to its item size in the file,
    # so loads can view the bytes in place; names break ties for determinism.
    sources.sort(key=lambda s: (-ITEMSIZE[s.dtype], s.name))
    return sources


def build_header(sources: list[TensorSource]) -> bytes:
    """The 8-byte length, the JSON header and its space padding."""
    entries: dict[str, Any] = {}
    offset = 0
    for source in sources:
        end = offset + source.nbytes
        entries[source.name] = {
            "dtype": source.dtype,
            "shape": list(source.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return len(text).to_bytes(8, "little") + text


def _needs_swap(array: np.ndarray) -> bool:
    order = array.dtype.byteorder
    return order == ">" or (order == "=" and not _LITTLE)


def iter_data(sources: list[TensorSource], chunk_bytes: int = CHUNK_BYTES) -> Iterator[memoryview]:
    """Yield the data section in order, as byte views of at most ``chunk_bytes``."""
    for source in sources:
        array = source.array
        if array.size == 0:
            continue
        if array.ndim == 0:
            array = array.reshape(1)
        if array.flags.c_contiguous and not _needs_swap(array):
            flat = memoryview(array.reshape(-1).view(np.uint8))
            for start in range(0, len(flat), chunk_bytes):
                yield flat[start : start + chunk_bytes]
            continue
        # Convert a slab of leading-axis rows at a time: bounded extra memory.
        target = array.dtype.newbyteorder("<")
        row_bytes = max(1, array[0].size * array.itemsize)
        rows = max(1, chunk_bytes // row_bytes)
        for start in range(0, array.shape[0], rows):
            slab = np.ascontiguousarray(array[start : start + rows], dtype=target)
            yield memoryview(slab.reshape(-1).view(np.uint8))


def tensor_summary(sources: list[TensorSource]) -> dict[str, Any]:
    """Counts recorded in the manifest for a payload."""
    return {
        "tensors": len(sources),
        "parameters": sum(int(s.array.size) for s in sources),
        "dtypes": sorted({s.dtype for s in sources}),
    }
