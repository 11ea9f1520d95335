"""Weight decompression: the ``constexpr_*`` ops of iOS16 and iOS18.

Their inputs are all constants, so the graph builder folds them once at load time; the
decompressed weights are cached as constants and never recomputed per prediction. Each function
returns float32 (or the LUT's own dtype); the builder rounds to the op's declared output dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_convnext.coreml_emulator.numeric import MIL_TO_NUMPY, along_axis, f32, ints


def constexpr_affine_dequantize(
    quantized_data: np.ndarray, zero_point: np.ndarray, scale: np.ndarray, axis: Any
) -> np.ndarray:
    """iOS16: ``scale * (quantized_data - zero_point)``, scale/zero point scalar or per ``axis``."""
    q = np.asarray(quantized_data)
    ax = int(np.asarray(axis))
    zp = f32(along_axis(zero_point, q.ndim, ax))
    sc = f32(along_axis(scale, q.ndim, ax))
    return (q.astype(np.float32) - zp) * sc


def _expand_blocks(param: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Broadcast a per-block parameter ``[s0, s1, ...]`` to ``shape`` (block i covers shape[i] // s_i)."""
    p = np.asarray(param)
    if p.ndim != len(shape) or any(d % s for d, s in zip(shape, p.shape)):
        raise ValueError(f"block parameter of shape {p.shape} does not tile data of shape {shape}")
    inter = [v for s, d in zip(p.shape, shape) for v in (s, d // s)]
    p = p.reshape([v for s in p.shape for v in (s, 1)])
    return np.broadcast_to(p, inter).reshape(shape)


def constexpr_blockwise_shift_scale(
    data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None = None
) -> np.ndarray:
    """iOS18: ``scale * (data - offset)`` with one scale/offset per block (block = data / scale shape)."""
    d = np.asarray(data)
    out = d.astype(np.float32)
    if offset is not None:
        out -= f32(_expand_blocks(offset, d.shape))
    out *= f32(_expand_blocks(scale, d.shape))
    return out


def _unpack_lsb_first(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Indices packed LSB-first into bytes (iOS16 layout) -> one uint8 per index."""
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")
    if bits.size < nbits * count:
        raise ValueError(f"LUT indices hold {bits.size} bits, {nbits * count} needed")
    per_index = bits[: nbits * count].reshape(count, nbits)
    weights = (1 << np.arange(nbits, dtype=np.uint16)).astype(np.uint16)
    return (per_index * weights).sum(axis=1, dtype=np.uint16).astype(np.uint8)


def constexpr_lut_to_dense(
    indices: np.ndarray, lut: np.ndarray, shape: Any = None, vector_axis: Any = None
) -> np.ndarray:
    """Palettized weights: ``lut[indices]``.

    * iOS16 layout: ``lut`` [2^nbits], ``indices`` bytes with nbits per entry packed LSB-first,
      ``shape`` the output shape.
    * iOS18 layout: ``indices`` [*S] (one entry per element, unpacked by the loader), ``lut``
      [*G, 2^nbits, V] with G_i dividing S_i: element e uses the table of its group
      ``e_i // (S_i / G_i)``; with V > 1 each index expands to V values along ``vector_axis``.
    """
    lut = np.asarray(lut)
    if shape is not None:  # iOS16
        out_shape = ints(shape)
        if lut.ndim != 1:
            raise ValueError(f"iOS16 LUT must be a vector, got shape {lut.shape}")
        nbits = int(round(np.log2(lut.shape[0])))
        idx = _unpack_lsb_first(indices, nbits, int(np.prod(out_shape)))
        return lut[idx].reshape(out_shape)

    idx = np.asarray(indices)
    k = idx.ndim
    if lut.ndim != k + 2:
        raise ValueError(f"iOS18 LUT of shape {lut.shape} needs rank {k + 2} for indices of rank {k}")
    groups, n_pal, vec = lut.shape[:k], lut.shape[k], lut.shape[k + 1]
    flat_lut = lut.reshape(-1, n_pal, vec)
    # Group id of every element: row-major index into the group grid [*G].
    gid = np.zeros(idx.shape, np.int64)
    for i, (s, gsz) in enumerate(zip(idx.shape, groups)):
        if s % gsz:
            raise ValueError(f"LUT groups {groups} do not tile indices of shape {idx.shape}")
        coord = (np.arange(s) // (s // gsz)).reshape([-1 if j == i else 1 for j in range(k)])
        gid = gid * gsz + coord
    vals = flat_lut[gid, idx.astype(np.int64)]  # [*S, V]
    if vec == 1:
        return vals[..., 0]
    if vector_axis is None:
        raise ValueError("iOS18 LUT with vector size > 1 needs vector_axis")
    ax = int(np.asarray(vector_axis)) % k
    vec_shape = list(idx.shape)
    vec_shape[ax] *= vec
    return np.moveaxis(vals, -1, ax + 1).reshape(vec_shape)


def constexpr_cast(source_val: np.ndarray, output_dtype: Any) -> np.ndarray:
    return np.asarray(source_val).astype(MIL_TO_NUMPY[str(output_dtype)])
