"""NumPy implementations of MIL ops, in `OPS` keyed by MIL op type.

Each kernel takes the op's MIL parameters as keyword arguments (constants already as NumPy values,
optional parameters defaulting as in the MIL spec), computes in float32 for floating inputs and
returns one array or a tuple of them. Rounding to the op's declared output dtype (float16 in an
fp16 program) is the executor's job, so every kernel serves both precisions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from edge_convnext.coreml_emulator import constexpr
from edge_convnext.coreml_emulator.conv import conv
from edge_convnext.coreml_emulator.numeric import MIL_TO_NUMPY, along_axis, erf, f32, ints, normalize_axes
from edge_convnext.errors import RuntimeUnavailable

OpFn = Callable[..., Any]

OPS: dict[str, OpFn] = {}


class UnsupportedOpError(RuntimeUnavailable):
    """The program uses a MIL op (or an op parameter) the emulator does not implement."""

    def __init__(self, op_type: str, op_name: str, source: str, detail: str = "") -> None:
        what = detail or "is not implemented by the Core ML emulator"
        super().__init__(
            f"{source}: MIL op type '{op_type}' (op '{op_name}') {what}. "
            f"Supported op types: {', '.join(sorted(supported_ops()))}. "
            "Run this model with Core ML on macOS, or add the op to edge_convnext/coreml_emulator/ops.py."
        )
        self.op_type = op_type
        self.op_name = op_name


# Ops whose outputs are input values rearranged or selected, never new numbers: when the output
# dtype equals the inputs' the executor skips re-rounding them.
VALUE_PRESERVING = frozenset(
    {"transpose", "reshape", "squeeze", "expand_dims", "concat", "relu", "maximum", "minimum", "reduce_max"}
)


def supported_ops() -> frozenset[str]:
    """MIL op types the emulator can run (``const`` included)."""
    return frozenset(OPS) | {"const"}


def register(*names: str) -> Callable[[OpFn], OpFn]:
    def deco(fn: OpFn) -> OpFn:
        for name in names or (fn.__name__,):
            OPS[name] = fn
        return fn

    return deco


def _num(a: Any) -> np.ndarray:
    """Operand for arithmetic: floats in float32, integers and bools as they are."""
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype.kind == "f" and a.dtype != np.float32 else a


# ---- elementwise binary (NumPy broadcasting is MIL broadcasting) --------------------------------


@register()
def add(x: Any, y: Any) -> np.ndarray:
    return np.add(_num(x), _num(y))


@register()
def sub(x: Any, y: Any) -> np.ndarray:
    return np.subtract(_num(x), _num(y))


@register()
def mul(x: Any, y: Any) -> np.ndarray:
    return np.multiply(_num(x), _num(y))


@register()
def real_div(x: Any, y: Any) -> np.ndarray:
    return np.divide(f32(x), f32(y))


@register()
def maximum(x: Any, y: Any) -> np.ndarray:
    return np.maximum(_num(x), _num(y))


@register()
def minimum(x: Any, y: Any) -> np.ndarray:
    return np.minimum(_num(x), _num(y))


@register()
def pow(x: Any, y: Any) -> np.ndarray:  # noqa: A001 - the MIL op name
    return np.power(f32(x), f32(y))


# ---- activations and unary math -------------------------------------------------------------------


@register()
def relu(x: Any) -> np.ndarray:
    return np.maximum(_num(x), 0)


@register()
def sigmoid(x: Any) -> np.ndarray:
    # exp(-x) overflowing to inf for x << 0 gives the right limit 0, relative accuracy kept.
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-f32(x)))


@register()
def silu(x: Any) -> np.ndarray:
    x = f32(x)
    return x * sigmoid(x)


@register()
def tanh(x: Any) -> np.ndarray:
    return np.tanh(f32(x))


@register()
def exp(x: Any) -> np.ndarray:
    return np.exp(f32(x))


@register()
def sqrt(x: Any) -> np.ndarray:
    return np.sqrt(f32(x))


@register()
def rsqrt(x: Any, epsilon: Any = 1e-12) -> np.ndarray:
    return 1.0 / np.sqrt(f32(x) + np.float32(epsilon))


@register("erf")
def erf_op(x: Any) -> np.ndarray:
    return erf(x)


_SQRT_HALF = np.float32(1 / math.sqrt(2))
_TANH_C = np.float32(math.sqrt(2 / math.pi))


@register()
def gelu(x: Any, mode: str = "EXACT") -> np.ndarray:
    """EXACT 0.5x(1+erf(x/sqrt2)), TANH_APPROXIMATION, SIGMOID_APPROXIMATION x*sigmoid(1.702x)."""
    x = f32(x)
    mode = str(mode)
    if mode == "EXACT":
        out = erf(x * _SQRT_HALF)
        out += 1.0
        out *= x
        out *= 0.5
        return out
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(_TANH_C * (x + np.float32(0.044715) * x * x * x)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * sigmoid(np.float32(1.702) * x)
    raise ValueError(f"gelu: unknown mode {mode!r}")


@register()
def softmax(x: Any, axis: Any = -1) -> np.ndarray:
    x = f32(x)
    e = np.exp(x - x.max(axis=int(axis), keepdims=True))
    return e / e.sum(axis=int(axis), keepdims=True)


# ---- linear algebra -------------------------------------------------------------------------------


@register()
def linear(x: Any, weight: Any, bias: Any = None) -> np.ndarray:
    """x [*, D_in] @ weight[D_out, D_in].T + bias [D_out]; BLAS on one 2-d matrix."""
    x, w = f32(x), f32(weight)
    lead = x.shape[:-1]
    out = (x.reshape(-1, x.shape[-1]) @ w.T).reshape(*lead, w.shape[0])
    if bias is not None:
        out += f32(bias)
    return out


@register()
def matmul(x: Any, y: Any, transpose_x: Any = False, transpose_y: Any = False) -> np.ndarray:
    x, y = f32(x), f32(y)
    if bool(transpose_x) and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if bool(transpose_y) and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    if y.ndim == 2 and x.ndim > 2:  # one GEMM instead of a loop over the batch dims
        return (x.reshape(-1, x.shape[-1]) @ y).reshape(*x.shape[:-1], y.shape[-1])
    return np.matmul(x, y)


# ---- normalization and reductions -----------------------------------------------------------------


@register()
def layer_norm(x: Any, axes: Any = None, gamma: Any = None, beta: Any = None, epsilon: Any = 1e-5) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * gamma + beta over ``axes`` (biased variance)."""
    x = f32(x)
    ax = normalize_axes(range(x.ndim) if axes is None else axes, x.ndim)
    norm_shape = [x.shape[i] if i in ax else 1 for i in range(x.ndim)]
    xc = x - x.mean(axis=ax, keepdims=True)
    var = np.mean(np.square(xc), axis=ax, keepdims=True)
    out = xc * (1.0 / np.sqrt(var + np.float32(epsilon)))
    if gamma is not None:
        out *= f32(gamma).reshape(norm_shape)
    if beta is not None:
        out += f32(beta).reshape(norm_shape)
    return out


def _reduce(fn: Callable[..., np.ndarray], x: Any, axes: Any, keep_dims: Any) -> np.ndarray:
    x = _num(x)
    ax = tuple(range(x.ndim)) if axes is None else normalize_axes(axes, x.ndim)
    return fn(x, axis=ax, keepdims=bool(keep_dims))


@register()
def reduce_mean(x: Any, axes: Any = None, keep_dims: Any = False) -> np.ndarray:
    return _reduce(np.mean, f32(x), axes, keep_dims)


@register()
def reduce_sum(x: Any, axes: Any = None, keep_dims: Any = False) -> np.ndarray:
    return _reduce(np.sum, x, axes, keep_dims)


@register()
def reduce_max(x: Any, axes: Any = None, keep_dims: Any = False) -> np.ndarray:
    return _reduce(np.max, x, axes, keep_dims)


# ---- shape ops (views where NumPy allows) ---------------------------------------------------------


@register()
def transpose(x: Any, perm: Any) -> np.ndarray:
    return np.transpose(np.asarray(x), ints(perm))


@register()
def reshape(x: Any, shape: Any) -> np.ndarray:
    """``0`` copies the matching input dim counted from the right (iOS17 rule; 1 when out of range)."""
    x = np.asarray(x)
    target = list(ints(shape))
    for i, s in enumerate(target):
        if s == 0:
            j = x.ndim - (len(target) - i)
            target[i] = x.shape[j] if j >= 0 else 1
    return x.reshape(target)


@register()
def squeeze(x: Any, axes: Any = None) -> np.ndarray:
    x = np.asarray(x)
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=normalize_axes(axes, x.ndim))


@register()
def expand_dims(x: Any, axes: Any) -> np.ndarray:
    x = np.asarray(x)
    rank = x.ndim + len(ints(axes))
    return np.expand_dims(x, axis=normalize_axes(axes, rank))


@register()
def concat(values: tuple[Any, ...], axis: Any, interleave: Any = False) -> np.ndarray:
    arrs = [_num(v) for v in values]
    ax = int(axis)
    if not bool(interleave):
        return np.concatenate(arrs, axis=ax)
    ax %= arrs[0].ndim
    stacked = np.stack(arrs, axis=ax + 1)  # [..., d, k, ...] -> rows taken alternately
    shape = list(arrs[0].shape)
    shape[ax] *= len(arrs)
    return stacked.reshape(shape)


# ---- dtype conversion and activation quantization (iOS17) -----------------------------------------


@register()
def cast(x: Any, dtype: Any) -> np.ndarray:
    """Identity here: the executor converts every result to its declared dtype, which for ``cast``
    is ``dtype`` (float -> int truncates toward zero, as coremltools' constant folding does). With
    ``precision="fp32"`` a cast to fp16 therefore stays float32, like every other fp16 tensor."""
    if str(dtype) not in MIL_TO_NUMPY:
        raise ValueError(f"cast: unsupported dtype {dtype!r}")
    return np.asarray(x)


_INT_RANGE = {"int8": (-128, 127), "uint8": (0, 255)}


@register()
def quantize(
    input: Any,  # noqa: A002 - the MIL parameter name
    scale: Any,
    output_dtype: Any,
    zero_point: Any = None,
    axis: Any = None,
) -> np.ndarray:
    """``clip(round_half_even(input / scale) + zero_point)`` per tensor, or per channel on ``axis``."""
    x = f32(input)
    name = str(output_dtype)
    if name not in _INT_RANGE:
        raise ValueError(f"quantize: output_dtype must be int8 or uint8, got {name!r}")
    ax = None if axis is None else int(np.asarray(axis))
    q = np.rint(x / f32(along_axis(scale, x.ndim, ax or 0)))
    if zero_point is not None:
        q += f32(along_axis(zero_point, x.ndim, ax or 0))
    lo, hi = _INT_RANGE[name]
    return np.clip(q, lo, hi).astype(MIL_TO_NUMPY[name])


@register()
def dequantize(input: Any, scale: Any, zero_point: Any = None, axis: Any = None) -> np.ndarray:  # noqa: A002
    """``scale * (input - zero_point)``, per tensor or per channel on ``axis``."""
    q = np.asarray(input).astype(np.float32)
    ax = 0 if axis is None else int(np.asarray(axis))
    if zero_point is not None:
        q -= f32(along_axis(zero_point, q.ndim, ax))
    return q * f32(along_axis(scale, q.ndim, ax))


# ---- classifier head (ClassifierConfig) -----------------------------------------------------------


@register()
def classify(probabilities: Any, classes: Any) -> tuple[np.ndarray, np.ndarray]:
    """(top class label, probabilities in class order). Core ML returns the latter as a dict."""
    p = f32(probabilities).reshape(-1)
    labels = list(classes)
    if len(labels) != p.size:
        raise ValueError(f"classify: {p.size} probabilities for {len(labels)} classes")
    return np.asarray(labels[int(np.argmax(p))]), p


# ---- weight decompression, folded to constants at load time ---------------------------------------

OPS["constexpr_affine_dequantize"] = constexpr.constexpr_affine_dequantize
OPS["constexpr_blockwise_shift_scale"] = constexpr.constexpr_blockwise_shift_scale
OPS["constexpr_lut_to_dense"] = constexpr.constexpr_lut_to_dense
OPS["constexpr_cast"] = constexpr.constexpr_cast
OPS["conv"] = conv
