"""Quantisation as the weight battery sees it: the null of a quantised matrix, and any model passed
through a GGUF quantisation type.

A quantised matrix is not a float matrix: with Q4_1, every block of 32 weights in a row keeps a
scale, a minimum and 16 levels, so exact zeros, small values and the tails are set by the format as
much as by training. Beside each statistic of a quantised tensor the battery therefore reports the
same statistic of a Gaussian matrix of the tensor's shape and RMS passed through the same
quantisation (`quantized_null`), next to the float Gaussian null. `QuantizedSource` passes every
matrix of a float model through a quantisation type on reading, so that a float model's battery and
its quantised battery can be compared statistic by statistic (how far the storage alone moves them).
"""
from __future__ import annotations

import numpy as np

from terrain.errors import TerrainError

FLOAT_TYPES = ("F32", "F64")


def qtype(name: str):
    """The gguf package's GGMLQuantizationType called name (Q4_1, Q8_0, F16, ...)."""
    try:
        from gguf import GGMLQuantizationType
    except ImportError:
        raise TerrainError("quantisation needs the gguf package (pip install gguf, part of requirements.txt)") from None
    try:
        return GGMLQuantizationType[name]
    except KeyError:
        raise TerrainError(f"{name!r:.20} is not a GGUF quantisation type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16, "
                           f"BF16, ...)") from None


def block_size(name: str) -> int:
    from gguf import GGML_QUANT_SIZES
    return GGML_QUANT_SIZES[qtype(name)][0]


def quantize_like(W: np.ndarray, name: str) -> np.ndarray | None:
    """W (..., n) passed through quantisation type `name` and back, as float32; None when the gguf
    package cannot quantise to that type or the row length is not a multiple of its block."""
    from gguf.quants import QuantError, dequantize, quantize
    t = qtype(name)
    if name in FLOAT_TYPES:
        return np.asarray(W, np.float32)
    W = np.asarray(W, np.float32)
    if W.shape[-1] % block_size(name):
        return None
    try:
        return np.asarray(dequantize(quantize(W, t), t), np.float32).reshape(W.shape)
    except (QuantError, NotImplementedError, ValueError):
        return None


def quantized_nulls(W: np.ndarray, name: str, rng: np.random.Generator, n: int,
                    with_gaussians: bool = False):
    """n Gaussian matrices of W's shape and RMS, each passed through quantisation type `name`
    (with_gaussians: also the Gaussians themselves, so that what the quantisation does to a null is
    measured on the same draws: (quantised, gaussians))."""
    import math
    rms = math.sqrt(float(np.mean(np.asarray(W, np.float64) ** 2)))
    out, src = [], []
    for _ in range(n):
        g = (rng.standard_normal(W.shape) * rms).astype(np.float32)
        q = quantize_like(g, name)
        if q is None:
            return (None, None) if with_gaussians else None
        out.append(q)
        src.append(g)
    return (out, src) if with_gaussians else out


class QuantizedSource:
    """A weight reader whose matrices are passed through a quantisation type on reading (vectors:
    norm scales, biases, stay float, as llama.cpp's converters keep them). dtypes says which."""

    def __init__(self, source, name: str):
        qtype(name)
        self.source, self.name = source, name
        self.entries = source.entries
        b = block_size(name)
        self.dtypes = {n: (name if len(s) == 2 and s[-1] % b == 0 else "F32") for n, s in self.entries.items()}

    def integer_names(self) -> set[str]:
        return getattr(self.source, "integer_names", set)()

    def read(self, n: str) -> np.ndarray:
        return self._q(n, self.source.read(n))

    def read_rows(self, n: str, a: int, b: int) -> np.ndarray:
        return self._q(n, self.source.read_rows(n, a, b))

    def _q(self, n: str, W: np.ndarray) -> np.ndarray:
        if self.dtypes[n] == "F32":
            return W
        q = quantize_like(W, self.name)
        if q is None:
            raise TerrainError(f"the gguf package cannot quantise {n} ({list(W.shape)}) to {self.name}")
        return q
