"""The one dtype table: names, safetensors codes and numpy dtypes of checkpoint tensors.

Every reader and writer (safetensors, DCP, Orbax, ``load``'s ``dtype=``, ``convert``'s
``--dtype``, the server's ``--dtype``) looks dtypes up here.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

# name -> (safetensors code, numpy dtype). Names are numpy's (and torch's, without "torch.").
DTYPES: dict[str, tuple[str, np.dtype]] = {
    "float64": ("F64", np.dtype(np.float64)),
    "float32": ("F32", np.dtype(np.float32)),
    "float16": ("F16", np.dtype(np.float16)),
    "bfloat16": ("BF16", np.dtype(ml_dtypes.bfloat16)),
    "int64": ("I64", np.dtype(np.int64)),
    "int32": ("I32", np.dtype(np.int32)),
    "int16": ("I16", np.dtype(np.int16)),
    "int8": ("I8", np.dtype(np.int8)),
    "uint8": ("U8", np.dtype(np.uint8)),
    "bool": ("BOOL", np.dtype(np.bool_)),
}

# Parameter dtypes a model can be loaded / served in, and those ``convert`` writes.
PARAM_DTYPES = ("float32", "bfloat16", "float16")
CONVERT_DTYPES = ("bfloat16", "float32")

_BY_CODE = {code: dtype for code, dtype in DTYPES.values()}
_CODE_OF = {dtype: code for code, dtype in DTYPES.values()}


def from_code(code: str) -> np.dtype:
    """Safetensors code ('BF16', 'F32' ...) -> numpy dtype; KeyError if unknown."""
    return _BY_CODE[code]


def is_code(code: str) -> bool:
    return code in _BY_CODE


def code_of(dtype) -> str:
    """numpy dtype -> safetensors code."""
    return _CODE_OF[np.dtype(dtype)]


def code_of_name(name: str) -> str:
    """A dtype name ('float32', or torch's 'torch.bfloat16') -> safetensors code; the name itself
    when it is not in the table (so an error message can show it)."""
    name = name.removeprefix("torch.")
    return DTYPES[name][0] if name in DTYPES else name


def itemsize(code: str, default: int = 4) -> int:
    return _BY_CODE[code].itemsize if code in _BY_CODE else default


def param_dtype(dtype) -> np.dtype | None:
    """A parameter dtype from a name in PARAM_DTYPES or a numpy/jax dtype (None stays None)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in PARAM_DTYPES:
            raise ValueError(f"dtype {dtype!r} not supported; use one of {list(PARAM_DTYPES)}")
        return DTYPES[dtype][1]
    dtype = np.dtype(dtype)
    if dtype.name not in PARAM_DTYPES:
        raise ValueError(f"dtype {dtype.name!r} not supported; use one of {list(PARAM_DTYPES)}")
    return dtype
