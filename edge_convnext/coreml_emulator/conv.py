"""MIL ``conv``: N-d convolution in float32, laid out NC[D]HW like the MIL op.

Two paths, chosen by shape, both plain float32 sums of products:

* depthwise 2-d (``groups == C_in``, any channel multiplier): shifted-slice accumulation in
  channels-last layout, one multiply-add per kernel tap (ConvNeXt's 7x7 convs; no 49x im2col);
* everything else: im2col with a zero-copy ``sliding_window_view`` and one BLAS ``tensordot``
  per group (the 4x4/stride-4 stem and 2x2/stride-2 downsampling convs, 1x1 convs).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from edge_convnext.coreml_emulator.numeric import f32, ints

PAD_TYPES = ("valid", "custom", "same", "same_lower")


def conv_pads(
    pad_type: str,
    pad: Any,
    in_sizes: tuple[int, ...],
    kernel: tuple[int, ...],
    strides: tuple[int, ...],
    dilations: tuple[int, ...],
) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim, as the MIL spec defines ``pad_type``.

    ``same`` puts the odd extra row/column after (bottom/right, like TF and torch's
    ``padding="same"``); ``same_lower`` puts it before.
    """
    n = len(in_sizes)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        p = ints(pad) if pad is not None else (0,) * (2 * n)
        if len(p) != 2 * n:
            raise ValueError(f"conv: custom pad needs {2 * n} values, got {list(p)}")
        return [(p[2 * i], p[2 * i + 1]) for i in range(n)]
    if pad_type in ("same", "same_lower"):
        pads = []
        for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
            eff = (k - 1) * d + 1
            total = max(0, (math.ceil(size / s) - 1) * s + eff - size)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if pad_type == "same" else (big, small))
        return pads
    raise ValueError(f"conv: unknown pad_type {pad_type!r} (expected one of {PAD_TYPES})")


def conv(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    strides: Any = None,
    pad_type: str = "valid",
    pad: Any = None,
    dilations: Any = None,
    groups: Any = 1,
) -> np.ndarray:
    """x [N, C_in, *d_in], weight [C_out, C_in/groups, *K], bias [C_out] -> [N, C_out, *d_out]."""
    x = np.asarray(x)
    w = f32(weight)
    nsp = x.ndim - 2
    if nsp < 1 or w.ndim != nsp + 2:
        raise ValueError(f"conv: x rank {x.ndim} and weight rank {w.ndim} do not match")
    strides_t = ints(strides) if strides is not None else (1,) * nsp
    dil_t = ints(dilations) if dilations is not None else (1,) * nsp
    g = int(np.asarray(groups))
    c_in, c_out, kernel = x.shape[1], w.shape[0], tuple(w.shape[2:])
    if c_in % g or c_out % g or w.shape[1] * g != c_in:
        raise ValueError(f"conv: C_in={c_in}, C_out={c_out}, weight {w.shape} and groups={g} disagree")

    pads = conv_pads(str(pad_type), pad, tuple(x.shape[2:]), kernel, strides_t, dil_t)
    out_sizes = tuple(
        (size + lo + hi - ((k - 1) * d + 1)) // s + 1
        for size, (lo, hi), k, s, d in zip(x.shape[2:], pads, kernel, strides_t, dil_t)
    )
    if any(o <= 0 for o in out_sizes):
        raise ValueError(f"conv: kernel {kernel} does not fit input {x.shape[2:]} padded by {pads}")
    b = None if bias is None else f32(bias)
    if g == c_in and w.shape[1] == 1 and nsp == 2:
        return _depthwise2d(x, w, b, pads, strides_t, dil_t, out_sizes)
    xp = f32(x)
    if any(p != (0, 0) for p in pads):
        xp = np.pad(xp, [(0, 0), (0, 0), *pads])
    return _im2col_conv(xp, w, b, g, strides_t, dil_t, out_sizes)


def _depthwise2d(
    x: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray | None,
    pads: list[tuple[int, int]],
    strides: tuple[int, ...],
    dilations: tuple[int, ...],
    out_sizes: tuple[int, ...],
) -> np.ndarray:
    """Channels-last internally: the per-tap multiply-add then runs over contiguous channel rows
    (2-4x faster than NCHW rows for 14x14 and 7x7 maps), and ConvNeXt's activations already are
    NHWC in memory. Returns an NCHW view of NHWC memory."""
    n, c_in, h, wd = x.shape
    c_out, kh, kw = w.shape[0], w.shape[2], w.shape[3]
    (pt, pb), (pl, pr) = pads
    xp = np.zeros((n, h + pt + pb, wd + pl + pr, c_in), np.float32)
    xp[:, pt : pt + h, pl : pl + wd, :] = x.transpose(0, 2, 3, 1)  # upcasts float16 on the way
    if c_out != c_in:  # channel multiplier m: output channel o reads input channel o // m
        xp = np.repeat(xp, c_out // c_in, axis=3)
    (sh, sw), (dh, dw), (ho, wo) = strides, dilations, out_sizes
    taps = np.ascontiguousarray(w[:, 0].transpose(1, 2, 0))  # [kh, kw, C_out]
    acc = np.empty((n, ho, wo, c_out), np.float32)
    tmp = np.empty_like(acc)
    for i in range(kh):
        for j in range(kw):
            window = xp[:, i * dh : i * dh + (ho - 1) * sh + 1 : sh, j * dw : j * dw + (wo - 1) * sw + 1 : sw, :]
            if i == 0 and j == 0:
                np.multiply(window, taps[0, 0], out=acc)
            else:
                np.multiply(window, taps[i, j], out=tmp)
                acc += tmp
    if bias is not None:
        acc += bias
    return acc.transpose(0, 3, 1, 2)


def _im2col_conv(
    xp: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray | None,
    groups: int,
    strides: tuple[int, ...],
    dilations: tuple[int, ...],
    out_sizes: tuple[int, ...],
) -> np.ndarray:
    nsp = xp.ndim - 2
    kernel = w.shape[2:]
    span = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations))
    # [N, C, *d_out_full, *span] view, then subsample: stride on the output axes, dilation on the window axes.
    win = sliding_window_view(xp, span, axis=tuple(range(2, 2 + nsp)))
    steps = (*(slice(None, None, s) for s in strides), *(slice(None, None, d) for d in dilations))
    win = win[(slice(None), slice(None), *steps)]
    win = win[(slice(None), slice(None), *(slice(0, o) for o in out_sizes))]
    c_in_g, c_out_g = w.shape[1], w.shape[0] // groups
    x_axes = [1, *range(2 + nsp, 2 + 2 * nsp)]
    w_axes = [1, *range(2, 2 + nsp)]
    parts = [  # each [N, *d_out, C_out/groups]
        np.tensordot(
            win[:, gi * c_in_g : (gi + 1) * c_in_g], w[gi * c_out_g : (gi + 1) * c_out_g], axes=(x_axes, w_axes)
        )
        for gi in range(groups)
    ]
    out = parts[0] if groups == 1 else np.concatenate(parts, axis=-1)
    if bias is not None:
        out += bias
    return np.moveaxis(out, -1, 1)  # NCHW view of channels-last memory
