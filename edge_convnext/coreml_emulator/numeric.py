"""Numeric helpers shared by the op kernels: dtypes, float32 upcasting, erf.

Every kernel computes in float32 (never in NumPy's float16 arithmetic, which is both slow and not
what we want to model); the executor then rounds each op's outputs to the dtype the program
declares for them. See the package docstring for the precision model.

float16 tensors are held as float32 arrays whose values are exactly representable in float16
(`round_to_float16`): the same numbers as a float16 array, without NumPy's float16 conversions,
which are scalar code and ~100x slower still when results are subnormal (GELU's negative tail,
small layer scales).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

Precision = Literal["auto", "fp32"]

# MIL dtype names (coremltools `types.builtin_to_string`) -> NumPy dtype of a runtime tensor.
# Sub-byte integer types only occur in constants; the milproto loader already unpacks them into
# one (u)int8 per element, so they map to the 8-bit type.
MIL_TO_NUMPY: dict[str, type[np.generic]] = {
    "fp16": np.float16,
    "fp32": np.float32,
    "fp64": np.float64,
    "bool": np.bool_,
    "int4": np.int8,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "uint1": np.uint8,
    "uint2": np.uint8,
    "uint3": np.uint8,
    "uint4": np.uint8,
    "uint6": np.uint8,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
}


def runtime_dtype(mil_dtype: str | None, precision: Precision) -> np.dtype | None:
    """The dtype a runtime value of MIL type ``mil_dtype`` is rounded to (float16 values are held
    in float32 arrays, see `round_to_float16`).

    ``None`` for values that are not numeric tensors (strings, dicts): they are left untouched.
    With ``precision="fp32"`` every fp16 tensor is kept in float32 instead.
    """
    if mil_dtype is None or mil_dtype not in MIL_TO_NUMPY:
        return None
    if mil_dtype == "fp16" and precision == "fp32":
        return np.dtype(np.float32)
    return np.dtype(MIL_TO_NUMPY[mil_dtype])


_F16_MIN_NORMAL = np.uint32(113 << 23)  # 2**-14 as float32 bits
_F16_OVERFLOW = np.uint32(0x477FF000)  # 65520: rounds to 2**16, past float16's max 65504
_F32_INF = np.uint32(0x7F800000)
_F32_QNAN = np.uint32(0x7FC00000)


def round_to_float16(x: Any) -> np.ndarray:
    """Round to the nearest float16 value (ties to even, overflow to inf), returned as float32.

    Bit-identical to ``x.astype(np.float16).astype(np.float32)`` (NaN stays NaN) but vectorized:
    normal results round the float32 mantissa to 10 bits with integer ops; subnormal results
    (|x| < 2**-14) come from ``(|x| + 0.5) - 0.5``, whose float32 spacing is float16's 2**-24.
    """
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    mag = bits & np.uint32(0x7FFFFFFF)
    out = mag >> np.uint32(13)
    out &= np.uint32(1)  # lowest kept mantissa bit: ties go to even
    out += np.uint32(0xFFF)
    out += mag
    out &= np.uint32(0xFFFFE000)
    with np.errstate(invalid="ignore"):
        sub = mag.view(np.float32) + np.float32(0.5)
    sub -= np.float32(0.5)
    np.copyto(out, sub.view(np.uint32), where=mag < _F16_MIN_NORMAL)
    if mag.max(initial=0) >= _F16_OVERFLOW:
        np.copyto(out, _F32_INF, where=mag >= _F16_OVERFLOW)
        np.copyto(out, _F32_QNAN, where=mag > _F32_INF)
    out |= bits & np.uint32(0x80000000)
    return out.view(np.float32).reshape(x.shape)


def f32(a: Any) -> np.ndarray:
    """``a`` as a float32 array (no copy when it already is one)."""
    return np.asarray(a, dtype=np.float32)


def ints(a: Any) -> tuple[int, ...]:
    """A MIL int vector (or scalar) parameter as a tuple of Python ints."""
    return tuple(int(v) for v in np.asarray(a).reshape(-1))


def along_axis(param: Any, rank: int, axis: int) -> np.ndarray:
    """A scalar, or a vector for dim ``axis``, shaped to broadcast against a rank-``rank`` tensor."""
    p = np.asarray(param)
    if p.ndim == 0 or p.ndim == rank:
        return p
    shape = [1] * rank
    shape[axis % rank] = -1
    return p.reshape(shape)


def normalize_axes(axes: Any, rank: int) -> tuple[int, ...]:
    return tuple(sorted(int(a) % rank for a in np.asarray(axes).reshape(-1)))


# Abramowitz & Stegun 7.1.26: |error| <= 1.5e-7 on erf, i.e. at float32 resolution.
_ERF_P = np.float32(0.3275911)
_ERF_A = tuple(np.float32(c) for c in (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592))


def erfc_abs(x: np.ndarray) -> np.ndarray:
    """``erfc(|x|)`` in float32 (a new array), computed without the cancellation of ``1 - erf``."""
    # In place throughout: on big activations the temporaries, not the flops, cost the time.
    ax = np.abs(f32(x))
    t = ax * _ERF_P
    t += 1.0
    np.reciprocal(t, out=t)
    poly = t * _ERF_A[0]
    for c in _ERF_A[1:]:
        poly += c
        poly *= t
    np.square(ax, out=ax)
    np.negative(ax, out=ax)
    np.exp(ax, out=ax)
    poly *= ax
    return poly


def erf(x: np.ndarray) -> np.ndarray:
    """Vectorised float32 erf (NumPy has none; SciPy is not a dependency)."""
    x = f32(x)
    out = erfc_abs(x)
    np.subtract(1.0, out, out=out)
    # copysign, not np.where: a data-dependent select is ~30x slower on random signs.
    return np.copysign(out, x, out=out)
