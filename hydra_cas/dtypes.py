"""The safetensors dtype table and its mapping to numpy (and, lazily, torch).

The format layer works on dtype *strings* ("F32", "BF16", ...) and raw bytes, so
payloads whose dtype numpy lacks (bfloat16, float8) can be stored, archived and
verified without any numpy dtype for them.  Only building arrays needs one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from hydra_cas.errors import InvalidTensorError

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "ITEMSIZE",
    "FLOAT_DTYPES",
    "numpy_dtype_for",
    "dtype_name_for",
    "nbytes_for",
]

#: Bytes per element for every safetensors dtype hydra_cas accepts.  Sub-byte
#: dtypes (F4, F6_*) are refused: their sizes are not whole bytes per element.
ITEMSIZE: Mapping[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}

#: Floating-point dtypes: (exponent bits, mantissa bits) of one value.
FLOAT_DTYPES: Mapping[str, tuple[int, int]] = {
    "F64": (11, 52),
    "F32": (8, 23),
    "F16": (5, 10),
    "BF16": (8, 7),
    "F8_E5M2": (5, 2),
    "F8_E4M3": (4, 3),
    "F8_E4M3FNUZ": (4, 3),
    "F8_E5M2FNUZ": (5, 2),
}

# numpy's own dtypes, by numpy dtype name.
_NUMPY_NAMES: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "uint16": "U16",
    "float16": "F16",
    "int32": "I32",
    "uint32": "U32",
    "float32": "F32",
    "int64": "I64",
    "uint64": "U64",
    "float64": "F64",
    "complex64": "C64",
    # ml_dtypes registers these names with numpy when it is installed.
    "bfloat16": "BF16",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "float8_e8m0fnu": "F8_E8M0",
}
_FROM_SAFETENSORS = {v: k for k, v in _NUMPY_NAMES.items()}

_TORCH_NAMES: dict[str, str] = {
    "torch.bool": "BOOL",
    "torch.uint8": "U8",
    "torch.int8": "I8",
    "torch.int16": "I16",
    "torch.uint16": "U16",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.int32": "I32",
    "torch.uint32": "U32",
    "torch.float32": "F32",
    "torch.int64": "I64",
    "torch.uint64": "U64",
    "torch.float64": "F64",
    "torch.complex64": "C64",
    "torch.float8_e5m2": "F8_E5M2",
    "torch.float8_e4m3fn": "F8_E4M3",
    "torch.float8_e4m3fnuz": "F8_E4M3FNUZ",
    "torch.float8_e5m2fnuz": "F8_E5M2FNUZ",
    "torch.float8_e8m0fnu": "F8_E8M0",
}


def dtype_name_for(dtype: Any) -> str:
    """The safetensors dtype string for a numpy or torch dtype.

    Raises InvalidTensorError naming the dtype when safetensors cannot hold it.
    """
    if isinstance(dtype, np.dtype):
        name = _NUMPY_NAMES.get(dtype.name)
        if name is None or dtype.hasobject:
            raise InvalidTensorError(
                f"dtype {dtype} cannot be stored in safetensors; convert the array to a "
                f"numeric dtype such as float32 first (supported: {', '.join(sorted(ITEMSIZE))})"
            )
        return name
    name = _TORCH_NAMES.get(str(dtype))
    if name is None:
        raise InvalidTensorError(f"dtype {dtype} cannot be stored in safetensors")
    return name


def numpy_dtype_for(dtype_name: str) -> np.dtype:
    """The little-endian numpy dtype that views a safetensors dtype's bytes.

    BF16 and F8 need the ``ml_dtypes`` package, which registers those dtypes
    with numpy; without it the error says so.
    """
    np_name = _FROM_SAFETENSORS.get(dtype_name)
    if np_name is None:
        raise InvalidTensorError(f"unknown safetensors dtype {dtype_name!r}")
    try:
        return np.dtype(np_name).newbyteorder("<")
    except TypeError:
        pass
    try:
        import ml_dtypes  # noqa: F401  (registers bfloat16/float8 with numpy)
    except ImportError:
        raise InvalidTensorError(
            f"dtype {dtype_name} has no numpy equivalent; `pip install ml_dtypes` to load it "
            "as numpy arrays, or use Store.path() with safetensors' torch loader"
        ) from None
    return np.dtype(np_name).newbyteorder("<")


def nbytes_for(dtype_name: str, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes a tensor of this dtype and shape occupies."""
    count = 1
    for dim in shape:
        count *= dim
    return count * ITEMSIZE[dtype_name]
