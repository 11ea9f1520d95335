"""Core ML emulator, op level: each kernel against torch or hand-written NumPy on small inputs.

Programs are built with coremltools' MIL builder and run through the emulator's graph builder
directly (no conversion), except where the milproto round trip itself is under test (sub-byte
constants, errors), which saves a real ``.mlpackage``.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
torch = pytest.importorskip("torch")
F = torch.nn.functional

from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from edge_convnext.coreml_emulator import CoreMLEmulator, UnsupportedOpError, supported_ops  # noqa: E402
from edge_convnext.coreml_emulator.conv import conv_pads  # noqa: E402
from edge_convnext.coreml_emulator.numeric import round_to_float16  # noqa: E402
from edge_convnext.coreml_emulator.program import build_graph  # noqa: E402
from edge_convnext.errors import ArtifactError, RuntimeUnavailable  # noqa: E402

pytestmark = pytest.mark.convert

IOS16, IOS17, IOS18 = ct.target.iOS16, ct.target.iOS17, ct.target.iOS18


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (rng(seed).standard_normal(shape) * scale).astype(np.float32)


def run(build, inputs: dict[str, np.ndarray], *, opset=IOS17, dtype=types.fp32, precision="auto"):
    """Build ``build(*vars)`` as a MIL program over ``inputs`` and run it in the emulator."""
    specs = [mb.TensorSpec(shape=v.shape, dtype=dtype) for v in inputs.values()]
    prog = mb.program(input_specs=specs, opset_version=opset)(build)
    # mb.program names inputs after the function's parameters
    names = list(prog.functions["main"].inputs)
    graph, _ = build_graph(prog, precision)
    out = graph.run(dict(zip(names, inputs.values())))
    values = [out[n] for n in graph.outputs]
    return values[0] if len(values) == 1 else values


def t(a: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(a))


# ---- conv ---------------------------------------------------------------------------------------

CONV_CASES = [
    # (x shape, C_out, kernel, strides, dilations, groups, pad_type, pad)
    ((1, 3, 16, 16), 8, (4, 4), (4, 4), (1, 1), 1, "valid", None),  # ConvNeXt stem
    ((2, 6, 9, 7), 4, (2, 2), (2, 2), (1, 1), 1, "valid", None),  # downsampling, odd spatial (drops a row)
    ((1, 5, 9, 11), 5, (7, 7), (1, 1), (1, 1), 5, "custom", (3, 3, 3, 3)),  # ConvNeXt depthwise 7x7
    ((1, 4, 8, 9), 8, (3, 3), (1, 1), (1, 1), 4, "custom", (1, 1, 1, 1)),  # depthwise, multiplier 2
    ((1, 4, 11, 10), 4, (5, 3), (2, 3), (1, 1), 4, "custom", (2, 1, 0, 2)),  # depthwise, strided, asymmetric pad
    ((1, 4, 13, 12), 4, (3, 3), (1, 1), (2, 3), 4, "custom", (2, 2, 3, 3)),  # depthwise, dilated
    ((1, 6, 10, 10), 9, (3, 3), (1, 1), (1, 1), 3, "valid", None),  # grouped
    ((1, 3, 11, 9), 5, (3, 3), (2, 2), (1, 1), 1, "same", None),
    ((1, 3, 11, 9), 5, (4, 2), (1, 1), (1, 1), 1, "same", None),  # even kernel: odd total pad
    ((1, 3, 11, 9), 5, (4, 2), (3, 2), (1, 1), 1, "same_lower", None),
    ((1, 3, 10, 10), 5, (3, 3), (1, 1), (2, 2), 1, "same", None),
    ((1, 4, 10, 9), 4, (4, 4), (2, 1), (1, 1), 4, "same_lower", None),  # depthwise through same_lower
    ((1, 3, 9, 9), 4, (1, 1), (2, 2), (1, 1), 1, "valid", None),  # strided 1x1
    ((1, 3, 8, 8), 4, (3, 3), (3, 3), (1, 1), 1, "custom", (0, 2, 1, 0)),
]


def torch_conv(x, w, b, strides, dilations, groups, pads):
    xp = F.pad(t(x), [v for p in reversed(pads) for v in p])
    return F.conv2d(xp, t(w), t(b), stride=strides, dilation=dilations, groups=groups).numpy()


def conv_id(c) -> str:
    return f"{c[6]}-k{c[2]}-s{c[3]}-d{c[4]}-g{c[5]}-{c[0][2:]}"


@pytest.mark.parametrize("case", CONV_CASES, ids=conv_id)
def test_conv2d_matches_torch(case) -> None:
    shape, c_out, kernel, strides, dilations, groups, pad_type, pad = case
    x = randn(*shape, seed=1)
    w = randn(c_out, shape[1] // groups, *kernel, seed=2, scale=0.3)
    b = randn(c_out, seed=3)

    def build(x):
        kw = dict(weight=w, bias=b, strides=list(strides), dilations=list(dilations), groups=groups, pad_type=pad_type)
        if pad is not None:
            kw["pad"] = list(pad)
        return mb.conv(x=x, **kw)

    got = run(build, {"x": x})
    # independent padding arithmetic: total = max(0, (ceil(n/s)-1)*s + (k-1)*d + 1 - n)
    if pad_type == "custom":
        pads = [(pad[0], pad[1]), (pad[2], pad[3])]
    elif pad_type == "valid":
        pads = [(0, 0), (0, 0)]
    else:
        pads = []
        for n, k, s, d in zip(shape[2:], kernel, strides, dilations):
            total = max(0, (math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n)
            lo, hi = total // 2, total - total // 2
            pads.append((lo, hi) if pad_type == "same" else (hi, lo))
    want = torch_conv(x, w, b, strides, dilations, groups, pads)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_conv_same_padding_agrees_with_torch_padding_same() -> None:
    """torch's padding="same" puts the odd extra row/column at the end, as MIL "same" does."""
    x, w = randn(1, 2, 9, 8, seed=4), randn(3, 2, 4, 2, seed=5)
    got = run(lambda x: mb.conv(x=x, weight=w, pad_type="same", dilations=[2, 1]), {"x": x})
    want = F.conv2d(t(x), t(w), padding="same", dilation=(2, 1)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert conv_pads("same", None, (9,), (4,), (1,), (1,)) == [(1, 2)]
    assert conv_pads("same_lower", None, (9,), (4,), (1,), (1,)) == [(2, 1)]


def test_conv1d_and_conv3d_match_torch() -> None:
    x1, w1 = randn(2, 3, 17, seed=6), randn(4, 3, 5, seed=7)
    got = run(lambda x: mb.conv(x=x, weight=w1, strides=[2], pad_type="custom", pad=[2, 1]), {"x": x1})
    want = F.conv1d(F.pad(t(x1), [2, 1]), t(w1), stride=2).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    x3, w3 = randn(1, 4, 5, 6, 7, seed=8), randn(6, 2, 3, 2, 3, seed=9)
    got = run(lambda x: mb.conv(x=x, weight=w3, groups=2, pad_type="valid", dilations=[1, 2, 1]), {"x": x3})
    want = F.conv3d(t(x3), t(w3), groups=2, dilation=(1, 2, 1)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---- linear algebra ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 8), (1, 3, 4, 8)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_torch(shape, with_bias) -> None:
    x, w, b = randn(*shape, seed=10), randn(6, 8, seed=11), randn(6, seed=12)
    got = run(lambda x: mb.linear(x=x, weight=w, bias=b) if with_bias else mb.linear(x=x, weight=w), {"x": x})
    want = F.linear(t(x), t(w), t(b) if with_bias else None).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "xs,ys,tx,ty",
    [
        ((3, 4), (4, 5), False, False),
        ((2, 3, 4), (5, 4), False, True),
        ((2, 4, 3), (2, 4, 5), True, False),
        ((1, 3, 4), (2, 4, 2), False, False),  # batch broadcast
    ],
)
def test_matmul_matches_torch(xs, ys, tx, ty) -> None:
    x, y = randn(*xs, seed=13), randn(*ys, seed=14)
    got = run(lambda x, y: mb.matmul(x=x, y=y, transpose_x=tx, transpose_y=ty), {"x": x, "y": y})
    tx_, ty_ = t(x), t(y)
    want = torch.matmul(tx_.transpose(-1, -2) if tx else tx_, ty_.transpose(-1, -2) if ty else ty_).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---- normalization, activations, reductions --------------------------------------------------------


@pytest.mark.parametrize("axes", [[-1], [1], [2, 3], [1, 2, 3], [0, 2]])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_over_axes(axes, affine) -> None:
    x = randn(2, 5, 3, 4, seed=15, scale=3.0) + 1.5
    norm = [x.shape[a] for a in sorted(a % 4 for a in axes)]
    gamma, beta = randn(*norm, seed=16), randn(*norm, seed=17)

    def build(x):
        kw = dict(gamma=gamma, beta=beta) if affine else {}
        return mb.layer_norm(x=x, axes=axes, epsilon=1e-5, **kw)

    got = run(build, {"x": x})
    # torch normalizes trailing dims: move the normalized axes to the end, then back
    pos = sorted(a % 4 for a in axes)
    rest = [i for i in range(4) if i not in pos]
    perm = rest + pos
    xt = t(x).permute(*perm)
    want = F.layer_norm(xt, norm, t(gamma) if affine else None, t(beta) if affine else None, eps=1e-5)
    want = want.permute(*np.argsort(perm).tolist()).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("mode", ["EXACT", "TANH_APPROXIMATION", "SIGMOID_APPROXIMATION"])
def test_gelu_modes(mode) -> None:
    x = np.concatenate([np.linspace(-12, 12, 2001, dtype=np.float32), randn(500, seed=18, scale=3)])
    got = run(lambda x: mb.gelu(x=x, mode=mode), {"x": x})
    xt = t(x).double()
    if mode == "EXACT":
        want = F.gelu(xt)
    elif mode == "TANH_APPROXIMATION":
        want = F.gelu(xt, approximate="tanh")
    else:
        want = xt * torch.sigmoid(1.702 * xt)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=2e-6)


UNARY = {
    "relu": (lambda x: mb.relu(x=x), torch.relu),
    "sigmoid": (lambda x: mb.sigmoid(x=x), torch.sigmoid),
    "silu": (lambda x: mb.silu(x=x), F.silu),
    "tanh": (lambda x: mb.tanh(x=x), torch.tanh),
    "exp": (lambda x: mb.exp(x=x), torch.exp),
    "erf": (lambda x: mb.erf(x=x), torch.erf),
    "sqrt": (lambda x: mb.sqrt(x=mb.add(x=x, y=6.0)), lambda x: torch.sqrt(x + 6.0)),
    "rsqrt": (lambda x: mb.rsqrt(x=mb.add(x=x, y=6.0), epsilon=1e-3), lambda x: torch.rsqrt(x + 6.0 + 1e-3)),
}


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_ops(name) -> None:
    build, ref = UNARY[name]
    x = np.concatenate([np.linspace(-5, 5, 101, dtype=np.float32), randn(64, seed=19, scale=2)])
    got = run(build, {"x": x})
    np.testing.assert_allclose(got, ref(t(x).double()).numpy(), rtol=2e-6, atol=1e-6)


BINARY = {
    "add": (mb.add, np.add),
    "sub": (mb.sub, np.subtract),
    "mul": (mb.mul, np.multiply),
    "real_div": (mb.real_div, np.divide),
    "maximum": (mb.maximum, np.maximum),
    "minimum": (mb.minimum, np.minimum),
    "pow": (mb.pow, np.power),
}


@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_ops_broadcast(name) -> None:
    build, ref = BINARY[name]
    x = np.abs(randn(2, 1, 4, seed=20)) + 0.5
    y = randn(3, 1, seed=21) + (2.0 if name in ("real_div",) else 0.0)
    got = run(lambda x, y: build(x=x, y=y), {"x": x, "y": y})
    want = ref(x.astype(np.float64), y.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
    # a constant operand (ConvNeXt's layer scale) on the left
    c = randn(4, seed=22)
    got = run(lambda x: build(x=c, y=x), {"x": x})
    np.testing.assert_allclose(got, ref(c.astype(np.float64), x), rtol=2e-6, atol=1e-6)


def test_softmax_axis() -> None:
    x = randn(2, 3, 5, seed=23, scale=4)

    def softmax_over(axis: int):
        return lambda x: mb.softmax(x=x, axis=axis)

    for axis in (-1, 1):
        got = run(softmax_over(axis), {"x": x})
        np.testing.assert_allclose(got, torch.softmax(t(x), dim=axis).numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("op,ref", [(mb.reduce_mean, np.mean), (mb.reduce_sum, np.sum), (mb.reduce_max, np.max)])
@pytest.mark.parametrize("axes,keep", [([2, 3], False), ([1], True), ([-1], False), (None, False)])
def test_reductions(op, ref, axes, keep) -> None:
    x = randn(2, 3, 4, 5, seed=24)

    def build(x):
        return op(x=x, axes=axes, keep_dims=keep) if axes is not None else op(x=x, keep_dims=keep)

    got = run(build, {"x": x})
    want = ref(x.astype(np.float64), axis=None if axes is None else tuple(axes), keepdims=keep)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---- shape ops and cast ---------------------------------------------------------------------------


def test_shape_ops() -> None:
    x = randn(2, 3, 4, seed=25)
    np.testing.assert_array_equal(run(lambda x: mb.transpose(x=x, perm=[2, 0, 1]), {"x": x}), x.transpose(2, 0, 1))
    np.testing.assert_array_equal(run(lambda x: mb.reshape(x=x, shape=[4, -1]), {"x": x}), x.reshape(4, 6))
    # iOS17: a 0 copies the input dim at the same position counted from the right
    np.testing.assert_array_equal(run(lambda x: mb.reshape(x=x, shape=[0, -1]), {"x": x}), x.reshape(3, 8))
    np.testing.assert_array_equal(run(lambda x: mb.reshape(x=x, shape=[0, 0, -1]), {"x": x}), x)
    np.testing.assert_array_equal(run(lambda x: mb.reshape(x=x, shape=[1, 0, -1, 0]), {"x": x}), x.reshape(1, 2, 3, 4))
    y = randn(1, 3, 1, 2, seed=26)
    assert run(lambda x: mb.squeeze(x=x), {"x": y}).shape == (3, 2)
    assert run(lambda x: mb.squeeze(x=x, axes=[-2]), {"x": y}).shape == (1, 3, 2)
    assert run(lambda x: mb.expand_dims(x=x, axes=[0, -1]), {"x": x}).shape == (1, 2, 3, 4, 1)
    z = randn(2, 3, 4, seed=27) + 10
    got = run(lambda x, z: mb.concat(values=[x, z], axis=1), {"x": x, "z": z})
    np.testing.assert_array_equal(got, np.concatenate([x, z], axis=1))
    got = run(lambda x, z: mb.concat(values=[x, z], axis=1, interleave=True), {"x": x, "z": z})
    np.testing.assert_array_equal(got, np.stack([x, z], axis=2).reshape(2, 6, 4))


def test_cast_rounds_and_truncates() -> None:
    x = np.array([0.1, 1 / 3, 65519.0, 70000.0, -2.7, 2.7, 1e-8], np.float32)
    got = run(lambda x: mb.cast(x=mb.cast(x=x, dtype="fp16"), dtype="fp32"), {"x": x})
    np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))  # incl. 70000 -> inf
    got = run(lambda x: mb.cast(x=x, dtype="int32"), {"x": x[4:6]})
    np.testing.assert_array_equal(got, np.array([-2, 2], np.int32))
    # precision="fp32" keeps the value in float32 through the cast to fp16
    got = run(lambda x: mb.cast(x=mb.cast(x=x, dtype="fp16"), dtype="fp32"), {"x": x}, precision="fp32")
    np.testing.assert_array_equal(got, x)


def test_fp16_program_rounds_every_op_output() -> None:
    """An fp16 program rounds each intermediate: (x * 3) / 3 shows the float16 step in between."""
    x = randn(1000, seed=28)
    build = lambda x: mb.real_div(x=mb.mul(x=x, y=np.float16(3.0)), y=np.float16(3.0))  # noqa: E731
    auto = run(build, {"x": x.astype(np.float16)}, dtype=types.fp16)
    x16 = x.astype(np.float16).astype(np.float32)
    want = ((x16 * 3).astype(np.float16).astype(np.float32) / 3).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(auto, want)  # float16 values (held in a float32 array)
    assert not np.array_equal(auto, x16)
    wide = run(build, {"x": x.astype(np.float16)}, dtype=types.fp16, precision="fp32")
    np.testing.assert_allclose(wide, x16, rtol=1e-6)


def test_fp16_chain_rounds_after_each_op() -> None:
    """conv -> gelu -> layer_norm in an fp16 program equals float64 math rounded to float16 after
    every op, to within one float16 ulp (the kernels accumulate in float32, not float64)."""
    x = randn(1, 4, 6, 6, seed=61, scale=2)
    w, b = randn(4, 1, 3, 3, seed=62, scale=0.5), randn(4, seed=63)
    g, beta = randn(4, seed=64), randn(4, seed=65)
    h = lambda a: np.asarray(a, np.float64).astype(np.float16).astype(np.float64)  # noqa: E731

    def build(x):
        y = mb.conv(x=x, weight=w.astype(np.float16), bias=b.astype(np.float16), groups=4, pad_type="same")
        y = mb.gelu(x=y, mode="EXACT")
        return mb.layer_norm(
            x=y, axes=[1], gamma=g.astype(np.float16), beta=beta.astype(np.float16), epsilon=np.float16(1e-5)
        )

    got = run(build, {"x": x.astype(np.float16)}, dtype=types.fp16)
    y = F.conv2d(t(h(x)), t(h(w)), t(h(b)), padding=1, groups=4).numpy()
    y = h(F.gelu(t(h(y))).numpy())
    mean = y.mean(axis=1, keepdims=True)
    y = (y - mean) / np.sqrt(((y - mean) ** 2).mean(axis=1, keepdims=True) + h(1e-5))
    want = h(y * h(g).reshape(1, 4, 1, 1) + h(beta).reshape(1, 4, 1, 1))
    ulp = np.spacing(want.astype(np.float16)).astype(np.float64)
    assert (np.abs(got - want) <= ulp).all()
    assert np.mean(got == want) > 0.9
    wide = run(build, {"x": x.astype(np.float16)}, dtype=types.fp16, precision="fp32")
    assert np.abs(wide - got).max() > 0  # the roundings are what differs


def test_round_to_float16_is_bit_exact() -> None:
    """Every float16 value and its float32 neighbours up to past the rounding midpoints, plus
    random bit patterns (NaN, inf, subnormals, overflow), against NumPy's own conversion."""
    grid = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    offsets = np.array([-4097, -4096, -4095, -1, 0, 1, 4095, 4096, 4097], np.int64)
    near = (grid.view(np.uint32).astype(np.int64)[:, None] + offsets).clip(0, 2**32 - 1).astype(np.uint32)
    randoms = rng(60).integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    special = np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.996, 65520, 2**-24, 2**-25, 3 * 2**-26], np.float32
    )
    for x in (near.reshape(-1).view(np.float32), randoms.view(np.float32), special):
        with np.errstate(all="ignore"):
            want = x.astype(np.float16).astype(np.float32)
        got = round_to_float16(x)
        same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
        assert same.all(), x[~same][:5]


# ---- activation quantization (iOS17) ----------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,zp,axis",
    [("int8", None, None), ("int8", 3, None), ("uint8", 128, None), ("int8", "vec", 1), ("uint8", "vec", -1)],
)
def test_quantize_dequantize_match_torch(dtype, zp, axis) -> None:
    x = randn(2, 4, 3, 5, seed=29, scale=2)
    x[0, 0, 0, :2] = [100.0, -100.0]  # clipping
    n = x.shape[axis] if axis is not None else 1
    scale = np.float32(0.1) if axis is None else (0.05 + 0.1 * rng(30).random(n)).astype(np.float32)
    npdt = np.int8 if dtype == "int8" else np.uint8
    if zp == "vec":
        zpv = rng(31).integers(-5, 5, n) + (128 if dtype == "uint8" else 0)
        zero = zpv.astype(npdt)
    else:
        zero = None if zp is None else npdt(zp)

    def build(x):
        kw = {} if axis is None else dict(axis=axis)
        if zero is not None:
            kw["zero_point"] = zero
        q = mb.quantize(input=x, scale=scale, output_dtype=dtype, **kw)
        return q, mb.dequantize(input=q, scale=scale, **kw)

    q, dq = run(build, {"x": x})
    qdt = torch.qint8 if dtype == "int8" else torch.quint8
    zt = 0 if zero is None else zero
    if axis is None:
        tq = torch.quantize_per_tensor(t(x), float(scale), int(zt), qdt)
    else:
        zeros = torch.from_numpy(np.asarray(zt, np.int64))
        tq = torch.quantize_per_channel(t(x), t(scale.astype(np.float64)), zeros, axis % 4, qdt)
    assert q.dtype == npdt
    np.testing.assert_array_equal(q, tq.int_repr().numpy())
    np.testing.assert_allclose(dq, tq.dequantize().numpy(), rtol=1e-6, atol=1e-6)


def test_quantize_ties_round_half_even_before_zero_point() -> None:
    """MIL spec: clip(round(x / scale) + zero_point); torch rounds after adding the zero point."""
    x = np.array([0.25, 0.35, -0.25, 0.15], np.float32)  # / 0.1 -> 2.5, 3.5, -2.5, 1.5 in float32
    q = run(lambda x: mb.quantize(input=x, scale=np.float32(0.1), zero_point=np.int8(3), output_dtype="int8"), {"x": x})
    np.testing.assert_array_equal(q, np.array([2, 4, -2, 2]) + 3)


# ---- weight decompression -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "axis,qdt,zp_kind", [(0, np.int8, "vec"), (1, np.uint8, "vec"), (0, np.int8, "scalar"), (-1, np.int8, "float")]
)
def test_constexpr_affine_dequantize(axis, qdt, zp_kind) -> None:
    q = rng(32).integers(-100 if qdt == np.int8 else 0, 100, (4, 3, 2)).astype(qdt)
    n = q.shape[axis]
    scale = (0.01 + rng(33).random(n) * 0.1).astype(np.float32)
    if zp_kind == "vec":
        zp = rng(34).integers(0, 9, n).astype(qdt)
    elif zp_kind == "scalar":
        zp = qdt(2)
    else:
        zp = (rng(35).random(n) * 4).astype(np.float32)
    x = randn(4, 3, 2, seed=36)

    def build(x):
        w = mb.constexpr_affine_dequantize(quantized_data=q, zero_point=zp, scale=scale, axis=axis)
        return mb.add(x=x, y=w)

    got = run(build, {"x": x}, opset=IOS16)
    shape = [1, 1, 1]
    shape[axis] = -1
    zpb = np.asarray(zp, np.float64).reshape(shape) if np.ndim(zp) else float(zp)
    want = x + (q.astype(np.float64) - zpb) * scale.reshape(shape)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("with_offset", [True, False])
@pytest.mark.parametrize("int4", [False, True])
def test_constexpr_blockwise_shift_scale(with_offset, int4) -> None:
    data = rng(37).integers(-8, 8, (4, 6)).astype(np.int8)
    scale = (0.05 + rng(38).random((2, 3))).astype(np.float32)  # blocks of 2x2
    offset = rng(39).integers(-3, 3, (2, 3)).astype(np.int8)
    x = randn(4, 6, seed=40)
    dt = types.np_int4_dtype if int4 else np.int8

    def build(x):
        kw = dict(offset=offset.astype(dt)) if with_offset else {}
        w = mb.constexpr_blockwise_shift_scale(data=data.astype(dt), scale=scale, **kw)
        return mb.add(x=x, y=w)

    got = run(build, {"x": x}, opset=IOS18)
    rep = lambda a: np.repeat(np.repeat(a, 2, axis=0), 2, axis=1).astype(np.float64)  # noqa: E731
    want = x + rep(scale) * (data - (rep(offset) if with_offset else 0))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def pack_lsb_first(idx: np.ndarray, nbits: int) -> np.ndarray:
    """Hand-written iOS16 packing: element i occupies bits [i*nbits, (i+1)*nbits), LSB first."""
    bits = [(int(v) >> b) & 1 for v in idx.reshape(-1) for b in range(nbits)]
    bits += [0] * (-len(bits) % 8)
    return np.array([sum(bits[i + b] << b for b in range(8)) for i in range(0, len(bits), 8)], np.uint8)


@pytest.mark.parametrize("nbits", [1, 2, 4, 6, 8])
def test_constexpr_lut_to_dense_ios16(nbits) -> None:
    shape = (5, 3, 3)  # 45 entries: not a multiple of 8 bits for most nbits
    idx = rng(41).integers(0, 2**nbits, shape)
    lut = randn(2**nbits, seed=42)
    x = randn(*shape, seed=43)

    def build(x):
        w = mb.constexpr_lut_to_dense(indices=pack_lsb_first(idx, nbits), lut=lut, shape=np.array(shape, np.uint32))
        return mb.add(x=x, y=w)

    got = run(build, {"x": x}, opset=IOS16)
    np.testing.assert_allclose(got, x + lut[idx], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "groups,vec,vector_axis",
    [((1, 1, 1), 1, None), ((4, 1, 1), 1, None), ((2, 3, 1), 1, None), ((1, 1, 1), 2, 0), ((2, 1, 1), 3, 2)],
)
def test_constexpr_lut_to_dense_ios18_grouped_and_vector(groups, vec, vector_axis) -> None:
    nbits = 4
    ishape = (4, 3, 2)
    idx = rng(44).integers(0, 2**nbits, ishape).astype(np.uint8)
    lut = randn(*groups, 2**nbits, vec, seed=45)
    out_shape = list(ishape)
    if vec > 1:
        out_shape[vector_axis] *= vec
    x = randn(*out_shape, seed=46)

    def build(x):
        kw = dict(vector_axis=vector_axis) if vector_axis is not None else {}
        w = mb.constexpr_lut_to_dense(indices=idx.astype(types.np_uint4_dtype), lut=lut, **kw)
        return mb.add(x=x, y=w)

    got = run(build, {"x": x}, opset=IOS18)
    want = np.zeros(out_shape, np.float64)
    block = [s // g for s, g in zip(ishape, groups)]
    for i, j, k in np.ndindex(*ishape):
        table = lut[i // block[0], j // block[1], k // block[2]]
        vals = table[idx[i, j, k]]  # [vec]
        for v in range(vec):
            pos = [i, j, k]
            if vec > 1:
                pos[vector_axis] = pos[vector_axis] * vec + v
            want[tuple(pos)] = vals[v]
    np.testing.assert_allclose(got, x + want, rtol=1e-6, atol=1e-6)


# ---- packages: round trip, unsupported ops, broken artifacts -----------------------------------------


def save(prog, path: Path, **kw) -> Path:
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=IOS17, **kw)
    model.save(str(path))
    return path


def test_saved_package_round_trip_and_input_contract(tmp_path: Path) -> None:
    w, b = randn(4, 3, 3, 3, seed=47), randn(4, seed=48)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, 8, 8))], opset_version=IOS17)
    def prog(x):
        return mb.relu(x=mb.conv(x=x, weight=w, bias=b, pad_type="same"), name="y")

    path = save(prog, tmp_path / "m.mlpackage", compute_precision=ct.precision.FLOAT32)
    emu = CoreMLEmulator(path)
    assert emu.input_names == ["x"] and emu.output_names == ["y"]
    assert emu.input_shapes == {"x": (1, 3, 8, 8)}
    assert emu.ops_used["conv"] == 1 and emu.ops_used["relu"] == 1
    x = randn(1, 3, 8, 8, seed=49)
    y = emu.predict({"x": x})["y"]
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, F.relu(F.conv2d(t(x), t(w), t(b), padding="same")).numpy(), atol=1e-5)
    with pytest.raises(ArtifactError, match="shape"):
        emu.predict({"x": x[:, :, :4]})
    with pytest.raises(ArtifactError, match="missing"):
        emu.predict({"pixel_values": x})
    with pytest.raises(ValueError):
        CoreMLEmulator(path, precision="fp8")  # type: ignore[arg-type]


def test_unsupported_op_names_type_and_op(tmp_path: Path) -> None:
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))], opset_version=IOS17)
    def prog(x):
        return mb.sin(x=mb.relu(x=x), name="wobble")

    path = save(prog, tmp_path / "sin.mlpackage")
    assert "sin" not in supported_ops()
    with pytest.raises(UnsupportedOpError, match=r"'sin' \(op 'wobble") as info:
        CoreMLEmulator(path)
    assert isinstance(info.value, RuntimeUnavailable)
    assert info.value.op_type == "sin" and str(path) in str(info.value)


def test_missing_and_corrupted_packages_raise_artifact_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mlpackage"
    with pytest.raises(ArtifactError, match="nope.mlpackage"):
        CoreMLEmulator(missing)
    not_a_dir = tmp_path / "file.mlpackage"
    not_a_dir.write_bytes(b"\0" * 10)
    with pytest.raises(ArtifactError, match="file.mlpackage"):
        CoreMLEmulator(not_a_dir)

    w = randn(64, 64, seed=50)  # big enough to live in weight.bin

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 64))], opset_version=IOS17)
    def prog(x):
        return mb.linear(x=x, weight=w)

    good = save(prog, tmp_path / "good.mlpackage")
    CoreMLEmulator(good)
    garbage = tmp_path / "garbage.mlpackage"
    garbage.mkdir()
    (garbage / "Manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="garbage.mlpackage"):
        CoreMLEmulator(garbage)
    weights = next(good.rglob("weight.bin"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated weight file
    with pytest.raises(ArtifactError, match="good.mlpackage"):
        CoreMLEmulator(good)
    model_file = next(good.rglob("model.mlmodel"))
    model_file.write_bytes(b"\x08\x01garbage" * 3)
    with pytest.raises(ArtifactError, match="good.mlpackage"):
        CoreMLEmulator(good)


def test_import_is_light() -> None:
    code = (
        "import sys, edge_convnext.coreml_emulator as e; "
        "assert 'torch' not in sys.modules and 'coremltools' not in sys.modules, sorted(sys.modules); "
        "assert {'conv', 'linear', 'quantize', 'constexpr_lut_to_dense'} <= e.supported_ops()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernels_never_import_torch() -> None:
    pkg = Path(__file__).resolve().parents[1] / "edge_convnext" / "coreml_emulator"
    for src in pkg.glob("*.py"):
        text = src.read_text()
        assert "import torch" not in text and "from torch" not in text, src


# ---- image inputs (ct.ImageType) and classifiers (ct.ClassifierConfig) ------------------------------


def image_program(path: Path, *, scale: float, bias: list[float], layout, precision, classes: list[str] | None = None):
    """A MIL program over an image input: ``softmax`` over a reduce when ``classes`` is given, else identity-ish."""
    shape = (1, 3, 4, 5)

    @mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=IOS17)
    def prog(x):
        if classes is None:
            return mb.mul(x=x, y=np.float32(1.0), name="y")
        return mb.softmax(x=mb.reshape(x=mb.reduce_mean(x=x, axes=[2, 3]), shape=[1, 3]), axis=-1, name="p")

    kw = {"classifier_config": ct.ClassifierConfig(classes)} if classes else {}
    return save(prog, path, inputs=[ct.ImageType(name="x", shape=shape, scale=scale, bias=bias, color_layout=layout)],
                compute_precision=precision, **kw)


@pytest.mark.parametrize("layout", [ct.colorlayout.RGB, ct.colorlayout.BGR])
@pytest.mark.parametrize("precision", [ct.precision.FLOAT32, ct.precision.FLOAT16])
def test_image_input_scale_and_bias_are_program_ops(tmp_path: Path, layout, precision) -> None:
    scale, bias = 2 / 255, [0.5, -0.25, 0.125]
    path = image_program(tmp_path / "img.mlpackage", scale=scale, bias=bias, layout=layout, precision=precision)
    emu = CoreMLEmulator(path)
    img = emu.spec.description.input[0].type.imageType
    assert emu.input_shapes == {"x": (1, 3, 4, 5)} and (img.width, img.height) == (5, 4)
    # The spec's imageType has no scale or bias: coremltools writes them into the program.
    assert "scale" not in str(img).lower() and "bias" not in str(img).lower()
    assert emu.ops_used["mul"] >= 1 and emu.ops_used["add"] >= 1
    pixels = rng(60).integers(0, 256, (1, 3, 4, 5)).astype(np.float32)
    want = pixels * np.float32(scale) + np.asarray(bias, np.float32).reshape(1, 3, 1, 1)
    got = emu.predict({"x": pixels})["y"]
    if precision == ct.precision.FLOAT32:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    else:  # rounded to float16 along the way (scale applied in fp32, then cast)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
        assert np.array_equal(got, round_to_float16(got))
    # Integer dtypes are pixels too.
    np.testing.assert_array_equal(emu.predict({"x": pixels.astype(np.uint8)})["y"], got)


def test_image_input_takes_8_bit_pixels_only(tmp_path: Path) -> None:
    path = image_program(tmp_path / "img.mlpackage", scale=1 / 255, bias=[0, 0, 0], layout=ct.colorlayout.RGB,
                         precision=ct.precision.FLOAT32)
    emu = CoreMLEmulator(path)
    ok = np.full((1, 3, 4, 5), 255.0, np.float32)
    np.testing.assert_allclose(emu.predict({"x": ok})["y"], 1.0, rtol=1e-6)
    for bad, what in [(ok / 255.0 * 0.5, "not integers"), (ok + 1, r"\[256, 256\]"), (ok - 256, r"\[-1, -1\]")]:
        with pytest.raises(ArtifactError, match=rf"image feature.*{what}"):
            emu.predict({"x": bad})


@pytest.mark.parametrize("precision", [ct.precision.FLOAT32, ct.precision.FLOAT16])
def test_classify_after_softmax_adds_no_softmax(tmp_path: Path, precision) -> None:
    classes = ["ant", "bee", "cat"]
    path = image_program(tmp_path / "cls.mlpackage", scale=1 / 255, bias=[0, 0, 0], layout=ct.colorlayout.RGB,
                         precision=precision, classes=classes)
    emu = CoreMLEmulator(path)
    assert emu.class_labels == classes and emu.ops_used["softmax"] == 1 and emu.ops_used["classify"] == 1
    spec = emu.spec.description
    assert spec.predictedFeatureName == "classLabel" and spec.predictedProbabilitiesName in emu.output_names
    pixels = rng(61).integers(0, 256, (1, 3, 4, 5)).astype(np.float32)
    out = emu.predict({"x": pixels})
    m = (pixels / 255).mean(axis=(2, 3)).reshape(3).astype(np.float64)
    want = np.exp(m) / np.exp(m).sum()
    p = out[spec.predictedProbabilitiesName]
    assert p.dtype == np.float32 and p.shape == (3,)
    np.testing.assert_allclose(p, want, atol=1e-6 if precision == ct.precision.FLOAT32 else 2e-3)
    assert abs(float(p.sum()) - 1.0) < (1e-6 if precision == ct.precision.FLOAT32 else 2e-3)
    assert str(out["classLabel"]) == classes[int(np.argmax(want))]
