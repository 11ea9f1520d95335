"""Core ML emulator, end to end: ConvNeXt programs as the converters really produce them.

A tiny HF ConvNeXt (depths 1,1,2,1, dims 16..128) with every block active (layer scale 0.3..1,
re-drawn weights) is traced and converted in fp32 and fp16, compressed with coremltools' weight
compression, and quantized W8A8 through ``coremltools.optimize.torch``; the emulator runs each.
The full-size ConvNeXt-T checks (speed, fidelity) are marked ``full``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
nn = torch.nn
F = torch.nn.functional

from edge_convnext.coreml_emulator import CoreMLEmulator  # noqa: E402
from edge_convnext.coreml_emulator.ops import OPS  # noqa: E402
from edge_convnext.coreml_emulator.program import load_package  # noqa: E402
from edge_convnext.errors import ArtifactError  # noqa: E402

pytestmark = pytest.mark.convert


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    err = float(np.sum((ref.astype(np.float64) - got) ** 2))
    return float("inf") if err == 0 else 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / err)


def activate_blocks(model: nn.Module, seed: int = 0) -> None:
    """HF init sets layer scale to 1e-6, which hides every block: make all of them count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 0.7 + 0.3)
            elif p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p[0].numel()) ** 0.5)
            elif "bias" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            else:
                p.copy_(torch.rand(p.shape, generator=g) * 0.4 + 0.8)


class Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def hf_convnext(depths, dims, seed: int = 0) -> nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(depths=list(depths), hidden_sizes=list(dims), num_labels=1000)
    model = ConvNextForImageClassification(cfg).eval()
    activate_blocks(model, seed)
    return Logits(model).eval()


def convert(traced, shape, path: Path, precision, target, io_dtype=None, **kw) -> Path:
    tensor_kw = {} if io_dtype is None else {"dtype": io_dtype}
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(name="pixel_values", shape=shape, **tensor_kw)],
        outputs=[ct.TensorType(name="logits", **tensor_kw)],
        convert_to="mlprogram",
        compute_precision=precision,
        minimum_deployment_target=target,
        **kw,
    )
    mlmodel.save(str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny ConvNeXt, its torch logits and three conversions of it."""
    root = tmp_path_factory.mktemp("tiny_convnext")
    model = hf_convnext((1, 1, 2, 1), (16, 32, 64, 128))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        y = model(x).numpy()
    packages = {
        "fp32": convert(traced, x.shape, root / "fp32.mlpackage", ct.precision.FLOAT32, ct.target.iOS17),
        "fp16": convert(traced, x.shape, root / "fp16.mlpackage", ct.precision.FLOAT16, ct.target.iOS17),
        # fp32 I/O around an fp16 program: boundary cast ops
        "fp16_ios18": convert(
            traced,
            x.shape,
            root / "fp16_ios18.mlpackage",
            ct.precision.FLOAT16,
            ct.target.iOS18,
            io_dtype=np.float32,
        ),
    }
    return {"x": x.numpy(), "y": y, "packages": packages, "root": root}


def test_fp32_program_matches_torch(tiny) -> None:
    emu = CoreMLEmulator(tiny["packages"]["fp32"])
    assert emu.input_shapes == {"pixel_values": (2, 3, 64, 64)}
    assert {"conv", "layer_norm", "linear", "gelu", "transpose"} <= set(emu.ops_used)
    got = emu.predict({"pixel_values": tiny["x"]})["logits"]
    assert got.dtype == np.float32 and got.shape == tiny["y"].shape
    assert np.abs(got - tiny["y"]).max() <= 1e-4


@pytest.mark.parametrize("name", ["fp16", "fp16_ios18"])
def test_fp16_program_emulates_float16(tiny, name) -> None:
    path = tiny["packages"][name]
    emu = CoreMLEmulator(path)
    wide = CoreMLEmulator(path, precision="fp32")
    if name == "fp16_ios18":
        assert emu.ops_used["cast"] == 2  # fp32 in, fp16 inside, fp32 out
    # every intermediate of the emulated program is float16
    float_dtypes = {dt for step in emu._graph.steps for dt in step.out_dtypes if dt is not None and dt.kind == "f"}
    if name == "fp16":
        assert float_dtypes == {np.dtype(np.float16)}
    else:
        assert np.dtype(np.float16) in float_dtypes
    assert {dt for s in wide._graph.steps for dt in s.out_dtypes if dt is not None} == {np.dtype(np.float32)}

    feeds = {"pixel_values": tiny["x"]}
    y16, y32 = emu.predict(feeds)["logits"], wide.predict(feeds)["logits"]
    ref = tiny["y"]
    s16, s32 = sqnr_db(ref, y16), sqnr_db(ref, y32)
    print(
        f"\n{name}: SQNR vs torch: fp16 emulation {s16:.1f} dB, same program in fp32 {s32:.1f} dB, "
        f"fp16 vs fp32 emulation max abs {np.abs(y16 - y32).max():.2e}"
    )
    assert np.abs(y16 - y32).max() > 1e-3  # the float16 rounding is really there ...
    assert s16 < s32  # ... and it costs accuracy
    assert s16 > 45.0  # while staying close to torch
    assert (y16.argmax(-1) == ref.argmax(-1)).all()


def constexpr_ops(path: Path):
    _, prog = load_package(path)
    return [op for op in prog.functions["main"].operations if op.op_type.startswith("constexpr_")]


# name: (base package, compression, config options, constexpr op it produces, min SQNR vs torch)
COMPRESSIONS = {
    "w8_ios17": ("fp16", "quantize", dict(mode="linear_symmetric"), "constexpr_affine_dequantize", 30),
    "w8asym_ios18": ("fp16_ios18", "quantize", dict(mode="linear"), "constexpr_blockwise_shift_scale", 30),
    "w4block_ios18": (
        "fp16_ios18",
        "quantize",
        dict(mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=8),
        "constexpr_blockwise_shift_scale",
        8,
    ),
    "p4_ios17": ("fp16", "palettize", dict(nbits=4, mode="kmeans"), "constexpr_lut_to_dense", 8),
    # uniform: grouped k-means takes ~40 s here; the grouped LUT layout is the same
    "p4group_ios18": (
        "fp16_ios18",
        "palettize",
        dict(nbits=4, mode="uniform", granularity="per_grouped_channel", group_size=8),
        "constexpr_lut_to_dense",
        8,
    ),
}


@pytest.mark.parametrize("name", sorted(COMPRESSIONS))
def test_weight_compressed_programs(tiny, name) -> None:
    import coremltools.optimize.coreml as cto

    base, kind, options, op_type, min_sqnr = COMPRESSIONS[name]
    src = ct.models.MLModel(str(tiny["packages"][base]), skip_model_load=True)
    if kind == "quantize":
        config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(weight_threshold=0, **options))
        compressed = cto.linear_quantize_weights(src, config)
    else:
        config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(weight_threshold=0, **options))
        compressed = cto.palettize_weights(src, config)
    path = tiny["root"] / f"{name}.mlpackage"
    compressed.save(str(path))

    # decompression equals coremltools' own reference implementation, op by op, bit for bit once
    # rounded to the op's declared dtype (as the graph builder does)
    ops = [op for op in constexpr_ops(path) if op.op_type == op_type]
    assert ops
    for op in ops:
        want = op.materialized_val_inference()
        got = OPS[op_type](**{k: v.val for k, v in op.inputs.items()})
        np.testing.assert_array_equal(got.astype(want.dtype), want, err_msg=op.name)

    emu = CoreMLEmulator(path)
    assert emu.ops_used[op_type] == len(ops)
    got = emu.predict({"pixel_values": tiny["x"]})["logits"]
    s = sqnr_db(tiny["y"], got)
    print(f"\n{name}: SQNR vs float torch {s:.1f} dB")
    assert s > min_sqnr


# ---- W8A8 through coremltools.optimize.torch ------------------------------------------------------


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) * 0.7 + 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class FxConvNeXt(nn.Module):
    """ConvNeXt structure that torch.fx can trace (HF's has data-dependent checks)."""

    def __init__(self, depths=(1, 1, 1, 1), dims=(8, 16, 32, 32), classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6)]
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            if i:
                layers += [LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dim, 2, 2)]
            layers += [Block(dim) for _ in range(depth)]
        self.features = nn.Sequential(*layers)
        self.norm, self.head = nn.LayerNorm(dims[-1], eps=1e-6), nn.Linear(dims[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(x).mean((2, 3))))


def test_w8a8_program_from_optimize_torch(tmp_path: Path) -> None:
    from coremltools.optimize.torch.quantization import (
        LinearQuantizer,
        LinearQuantizerConfig,
        ModuleLinearQuantizerConfig,
    )

    torch.manual_seed(0)
    model = FxConvNeXt().eval()
    gen = torch.Generator().manual_seed(2)
    example = torch.randn(1, 3, 32, 32, generator=gen)
    config = LinearQuantizerConfig(
        global_config=ModuleLinearQuantizerConfig(quantization_scheme="symmetric", milestones=[0, 1000, 1000, 0])
    )
    quantizer = LinearQuantizer(model, config)
    prepared = quantizer.prepare(example_inputs=(example,), inplace=False)
    quantizer.step()
    with torch.no_grad():
        for _ in range(4):  # calibration: observers see several batches, not one tensor
            prepared(torch.randn(4, 3, 32, 32, generator=gen))
    final = quantizer.finalize(inplace=False).eval()
    x = torch.randn(1, 3, 32, 32, generator=gen)
    with torch.no_grad():
        want = final(x).numpy()
        traced = torch.jit.trace(final, example)
    path = convert(traced, x.shape, tmp_path / "w8a8.mlpackage", ct.precision.FLOAT32, ct.target.iOS17)

    emu = CoreMLEmulator(path)
    assert emu.ops_used["quantize"] > 10 and emu.ops_used["dequantize"] > 10
    assert emu.ops_used["constexpr_affine_dequantize"] > 0
    got = emu.predict({"pixel_values": x.numpy()})["logits"]
    print(f"\nW8A8 (fp32 program) vs torch fake-quant: max abs {np.abs(got - want).max():.2e}")
    assert np.abs(got - want).max() <= 1e-4


def test_classifier_program(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FxConvNeXt(classes=5).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        traced, logits = torch.jit.trace(model, x), model(x).numpy()[0]
    labels = ["ant", "bee", "cat", "dog", "eel"]
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(name="image", shape=x.shape)],
        classifier_config=ct.ClassifierConfig(labels),
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT32,
        minimum_deployment_target=ct.target.iOS17,
    )
    mlmodel.save(str(tmp_path / "cls.mlpackage"))
    emu = CoreMLEmulator(tmp_path / "cls.mlpackage")
    assert emu.ops_used["classify"] == 1
    out = emu.predict({"image": x.numpy()})
    label_name, probs_name = emu.output_names
    assert str(out[label_name]) == labels[int(np.argmax(logits))]
    np.testing.assert_allclose(out[probs_name], logits, atol=1e-4)


def test_flexible_batch_program(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FxConvNeXt(classes=5).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        traced, want = torch.jit.trace(model, x[:1]), model(x).numpy()
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(name="x", shape=(ct.RangeDim(1, 4, 1), 3, 32, 32))],
        outputs=[ct.TensorType(name="logits")],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT32,
        minimum_deployment_target=ct.target.iOS17,
    )
    mlmodel.save(str(tmp_path / "flex.mlpackage"))
    emu = CoreMLEmulator(tmp_path / "flex.mlpackage")
    assert emu.input_shapes == {"x": (1, 3, 32, 32)}  # the spec's default shape
    got = emu.predict({"x": x.numpy()})["logits"]
    np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(ArtifactError, match=r"\(1..4, 3, 32, 32\)"):
        emu.predict({"x": np.zeros((5, 3, 32, 32), np.float32)})


# ---- full-size ConvNeXt-T (slow tier) ---------------------------------------------------------------


@pytest.mark.full
def test_full_convnext_tiny_speed_and_fidelity(tmp_path: Path) -> None:
    model = hf_convnext((3, 3, 9, 3), (96, 192, 384, 768))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        traced, ref = torch.jit.trace(model, x), model(x).numpy()
    for precision, name in [(ct.precision.FLOAT16, "fp16"), (ct.precision.FLOAT32, "fp32")]:
        path = convert(traced, x.shape, tmp_path / f"convnext_t_{name}.mlpackage", precision, ct.target.iOS17)
        emu = CoreMLEmulator(path)
        feeds = {"pixel_values": x.numpy()}
        got = emu.predict(feeds)["logits"]
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            emu.predict(feeds)
            times.append(time.perf_counter() - t0)
        s = sqnr_db(ref, got)
        print(
            f"\nConvNeXt-T {name}: {min(times) * 1e3:.0f} ms/image (best of 3), SQNR vs torch {s:.1f} dB, "
            f"max abs {np.abs(got - ref).max():.2e}"
        )
        assert min(times) <= 1.0
        assert s > (40.0 if name == "fp16" else 80.0)
