"""ggml's own quantizers (K-quants and others the gguf package cannot write), through the shared
library that llama-cpp-python ships. Optional: without llama-cpp-python, `available()` is False.

Only `ggml_quantize_chunk`, `ggml_row_size` and `ggml_quantize_requires_imatrix` are called;
the type numbers are the GGUF file format's, shared by ggml and the gguf package.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import gguf
import numpy as np

from ..errors import AbliterateError

# Types written without an importance matrix that ggml quantizes from float rows.
_SUPPORTED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")


@functools.cache
def _lib():
    try:
        import llama_cpp  # optional ([llama]): it compiles llama.cpp, so it is imported only when used
    except Exception:  # not installed, or its native library failed to load
        return None
    libdir = Path(llama_cpp.__file__).parent / "lib"
    for path in sorted(libdir.glob("libggml-base.*")) + sorted(libdir.glob("libggml.*")):
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        if not hasattr(lib, "ggml_quantize_chunk"):
            continue
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        return lib
    return None


def available() -> bool:
    return _lib() is not None


def can_quantize(qtype) -> bool:
    lib = _lib()
    return lib is not None and qtype.name in _SUPPORTED and not lib.ggml_quantize_requires_imatrix(int(qtype))


def quantize(values: np.ndarray, qtype) -> np.ndarray:
    """Rows of float32 `values` (..., n_per_row) quantized by ggml: uint8 (..., row bytes)."""

    if not can_quantize(qtype):
        raise AbliterateError(f"ggml cannot write {qtype.name} here (llama-cpp-python installed: {available()})")
    lib = _lib()
    src = np.ascontiguousarray(values, dtype=np.float32)
    n_per_row = src.shape[-1]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if n_per_row % block:
        raise AbliterateError(f"rows of {n_per_row} values cannot be {qtype.name} (blocks of {block})")
    nrows = src.size // n_per_row
    row_bytes = lib.ggml_row_size(int(qtype), n_per_row)
    dst = np.empty((nrows, row_bytes), dtype=np.uint8)
    written = lib.ggml_quantize_chunk(int(qtype), src.ctypes.data, dst.ctypes.data, 0, nrows, n_per_row, None)
    assert written == dst.nbytes, (written, dst.nbytes)
    return dst.reshape(*src.shape[:-1], row_bytes)
