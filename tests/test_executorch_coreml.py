"""Core ML-delegated ExecuTorch programs off Apple: extraction of the embedded model and its emulation.

The tiny ConvNeXt is built once as ``executorch-coreml-fp16`` and ``coreml-fp16`` (``built``); the
tests extract the .pte's delegate, run it emulated, compare it with the same model's Core ML recipe and
with the portable softmax kernel, and break the payload in several ways. ``full`` builds full-size
ConvNeXt-T; ``macos`` compares the emulation with ExecuTorch's real Core ML backend.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("executorch")
pytest.importorskip("coremltools")

from converters.backends import get_builder  # noqa: E402
from converters.context import BuildContext  # noqa: E402
from converters.model import export_model  # noqa: E402
from edge_convnext.cli import main as cli_main  # noqa: E402
from edge_convnext.coreml_emulator import CoreMLEmulator  # noqa: E402
from edge_convnext.errors import ArtifactError, EdgeConvNextError, RuntimeUnavailable  # noqa: E402
from edge_convnext.labels import unique_labels  # noqa: E402
from edge_convnext.metrics import LOG_FLOOR, center, compare  # noqa: E402
from edge_convnext.preprocessing import preprocess_file  # noqa: E402
from edge_convnext.recipes import get_recipe  # noqa: E402
from edge_convnext.runners import executorch as et_runner  # noqa: E402
from edge_convnext.runners import executorch_coreml as etc  # noqa: E402
from edge_convnext.runners import open_runner  # noqa: E402

pytestmark = pytest.mark.convert

PTE = "executorch-coreml-fp16"
# fp16 compute on the tiny model (logits std ~7): measured 53 dB against the float model on these images.
MIN_SQNR_DB = 40.0


def _has_real_coreml_backend() -> bool:
    from executorch.runtime import Runtime

    return bool(Runtime.get().backend_registry.is_available(etc.COREML_BACKEND))


def _context(name: str, weights, calibration, subset, workdir: Path) -> BuildContext:
    """A build context for ``name`` on ``weights``; the example input is the first evaluation image."""
    example = preprocess_file(subset.split("evaluation")[0].path, weights.preprocessing)[None]
    return BuildContext(
        recipe=get_recipe(name), model=export_model(weights.model, weights.preprocessing),
        example_input=torch.from_numpy(example), calibration_images=calibration,
        calibration_count=0,
        labels=unique_labels(subset.class_names, subset.wnids) if subset.class_names else [f"class {i}" for i in range(1000)],
        embedded_manifest={"recipe": name}, workdir=workdir, log=lambda msg: None,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory, subset, tiny_weights, tiny_calibration) -> dict[str, Path]:
    """The tiny model as ``executorch-coreml-fp16`` (.pte) and ``coreml-fp16`` (.mlpackage)."""
    root = tmp_path_factory.mktemp("etc")
    out = {}
    for name in (PTE, "coreml-fp16"):
        recipe = get_recipe(name)
        path = root / recipe.filename
        get_builder(recipe.format)(_context(name, tiny_weights, tiny_calibration, subset, root / f"work-{name}"), path)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def images(subset, tiny_weights) -> tuple[np.ndarray, np.ndarray]:
    """Eight evaluation images, float32 [8, 3, 224, 224] in [0, 1], and the float model's logits."""
    x = np.stack([preprocess_file(s.path, tiny_weights.preprocessing) for s in subset.split("evaluation")[:8]])
    with torch.no_grad():
        return x, export_model(tiny_weights.model, tiny_weights.preprocessing, probabilities=False)(torch.from_numpy(x)).numpy()


def _payload_span(pte: Path) -> tuple[int, int]:
    """Where the delegate payload sits in the file (found by content, to damage it in place)."""
    payload = etc.read_program(pte).payload
    start = pte.read_bytes().find(payload)
    assert start > 0
    return start, len(payload)


def test_extract_writes_the_embedded_mlpackage(built, tmp_path, capsys):
    out = tmp_path / "embedded.mlpackage"
    assert cli_main(["extract", str(built[PTE]), str(out)]) == 0
    assert "embedded.mlpackage" in capsys.readouterr().out
    assert (out / "Manifest.json").is_file() and (out / "Data" / "com.apple.CoreML" / "model.mlmodel").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary left behind"
    emu = CoreMLEmulator(out)
    assert emu.input_shapes == {"x": (1, 3, 224, 224)}  # the delegate's own feature names, not the manifest's
    assert len(emu.output_names) == 1
    # Written atomically over an existing package; refused for a path that is not a package.
    stale = out / "stale.txt"
    stale.write_text("old")
    etc.extract(built[PTE], out)
    assert not stale.exists() and (out / "Manifest.json").is_file()
    with pytest.raises(EdgeConvNextError, match=r"must be a \.mlpackage"):
        etc.extract(built[PTE], tmp_path / "model.bin")
    with pytest.raises(EdgeConvNextError, match=r"model\.tflite: not an ExecuTorch program"):
        etc.extract(tmp_path / "model.tflite", tmp_path / "other.mlpackage")


def test_extract_refuses_a_pte_without_core_ml(tmp_path):
    # A portable program (no delegate at all) built in seconds.
    class Soft(torch.nn.Module):
        def forward(self, x):
            return torch.softmax(x, dim=-1)

    from executorch.exir import to_edge

    pte = tmp_path / "plain.pte"
    pte.write_bytes(to_edge(torch.export.export(Soft(), (torch.randn(1, 8),))).to_executorch().buffer)
    with pytest.raises(ArtifactError, match=r"plain\.pte: forward has 0 CoreMLBackend delegates"):
        etc.extract(pte, tmp_path / "x.mlpackage")
    assert not (tmp_path / "x.mlpackage").exists()


def test_open_runner_emulates_the_core_ml_program(built, images):
    if _has_real_coreml_backend():
        pytest.skip("this ExecuTorch runtime has the Core ML backend: open_runner runs it for real")
    x, ref = images
    runner = open_runner(built[PTE])
    assert (runner.name, runner.emulated) == ("executorch-coreml-emulated", True)
    got = runner.run(x)
    assert got.shape == (8, 1000) and got.dtype == np.float32
    fid = compare(ref, got)
    assert fid.sqnr_db >= MIN_SQNR_DB and fid.top1_agreement == 1.0, fid
    # The delegate alone is the extracted model in the emulator; the runner adds only the float32 softmax.
    delegate = CoreMLEmulator(etc.extract(built[PTE], Path(runner.artifact).with_name("check.mlpackage")))
    logits = np.concatenate([delegate.predict({"x": x[i : i + 1]})[delegate.output_names[0]] for i in range(len(x))])
    shifted = logits - logits.max(1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    # Probabilities below 1e-30 are floored by the output contract (edge_convnext.metrics.LOG_FLOOR).
    assert np.abs(got - np.maximum(log_softmax, LOG_FLOOR)).max() < 1e-4
    assert not np.allclose(center(logits), center(ref), atol=1e-6)  # fp16 compute really is emulated
    # The real runtime path still says why it cannot run here.
    with pytest.raises(RuntimeUnavailable, match=r"Apple devices only") as e:
        et_runner.open(built[PTE], emulate=False)
    assert str(built[PTE]) in str(e.value)


def test_fidelity_matches_the_core_ml_recipe(built, images):
    # Same network, same fp16 Core ML program, two packagings: the .pte's delegate and the .mlpackage
    # (which rounds its image input to 8-bit pixels). Their fidelity must agree within 3 dB.
    x, ref = images
    pte = compare(ref, open_runner(built[PTE]).run(x))
    mlpackage = compare(ref, open_runner(built["coreml-fp16"]).run(x))
    assert abs(pte.sqnr_db - mlpackage.sqnr_db) <= 3.0, (pte, mlpackage)


def test_softmax_matches_the_portable_kernel():
    # Every kernel the runner applies outside the delegate is checked against ExecuTorch's own.
    from executorch.exir import to_edge
    from executorch.runtime import Runtime

    class Soft(torch.nn.Module):
        def forward(self, x):
            return torch.ops.aten._softmax.default(x, -1, False)

    x = (torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)) * 20).contiguous()
    buffer = to_edge(torch.export.export(Soft(), (x,))).to_executorch().buffer
    (want,) = Runtime.get().load_program(buffer).load_method("forward").execute([x])
    got = etc._KERNELS[("aten::_softmax", "out")].fn([x.numpy(), -1, False])
    np.testing.assert_allclose(got, want.numpy(), rtol=2e-6, atol=1e-12)


def test_ops_outside_the_delegate_are_named(built, monkeypatch):
    monkeypatch.setattr(etc, "_KERNELS", {})
    with pytest.raises(RuntimeUnavailable, match=r"coreml-fp16\.pte: cannot run: ops \['aten::_softmax\.out'\] outside"):
        et_runner.open(built[PTE], emulate=True)


@pytest.mark.parametrize("damage", ["truncated-file", "zeroed-payload", "flipped-metadata", "flipped-model",
                                    "truncated-payload"])
def test_corrupted_payload_names_the_file(built, tmp_path, damage):
    data = bytearray(built[PTE].read_bytes())
    start, size = _payload_span(built[PTE])
    bad = tmp_path / "broken.pte"
    if damage == "truncated-file":
        data = data[: start + size // 2]
    elif damage == "zeroed-payload":
        data[start : start + size] = bytes(size)
    elif damage == "flipped-metadata":  # the payload opens with the delegate's metadata.json
        data[start : start + 16] = bytes(b ^ 0xFF for b in data[start : start + 16])
    elif damage == "flipped-model":  # the model.mlmodel protobuf inside the package, found by its content
        spec = (etc.extract(built[PTE], tmp_path / "good.mlpackage") / "Data" / "com.apple.CoreML" / "model.mlmodel")
        model = spec.read_bytes()
        at = bytes(data).find(model)
        assert start <= at < start + size
        at += len(model) // 2  # into the program's operations
        data[at : at + 64] = bytes(b ^ 0xA5 for b in data[at : at + 64])
    bad.write_bytes(bytes(data))
    if damage == "truncated-payload":  # the unflattener itself on half a payload
        with pytest.raises(ArtifactError, match=r"coreml-fp16\.pte: the CoreMLBackend payload is corrupted"):
            etc.unpack(built[PTE], etc.read_program(built[PTE]).payload[: size // 2], tmp_path / "u")
        return
    with pytest.raises(ArtifactError, match=r"broken\.pte"):
        open_runner(bad)
    with pytest.raises(ArtifactError, match=r"broken\.pte"):
        etc.extract(bad, tmp_path / "out.mlpackage")
    assert not (tmp_path / "out.mlpackage").exists()


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="ExecuTorch's Core ML backend runs only on macOS/iOS")
def test_emulation_matches_executorch_core_ml_on_macos(built, images):
    if not _has_real_coreml_backend():
        pytest.skip("this ExecuTorch build has no Core ML backend (install an Apple build of executorch)")
    x, _ = images
    real = et_runner.open(built[PTE], emulate=False)
    assert real.backends == (etc.COREML_BACKEND,)
    fid = compare(real.run(x), et_runner.open(built[PTE], emulate=True).run(x))
    # Same fp16 program: the two may differ by float16 rounding inside the kernels, far less than fp16 vs float.
    assert fid.top1_agreement >= 0.75 and fid.sqnr_db > 35.0, fid


@pytest.mark.full
def test_full_size_executorch_coreml_fp16(tmp_path, subset):
    from converters.weights import load_weights

    w = load_weights("random:0")
    calibration = lambda n: iter(())  # noqa: E731 - fp16: no calibration
    ctx = _context(PTE, w, calibration, subset, tmp_path / "work")
    x = np.stack([preprocess_file(s.path, w.preprocessing) for s in subset.split("evaluation")[:4]])
    path = tmp_path / ctx.recipe.filename
    result = get_builder(ctx.recipe.format)(ctx, path)
    assert result.lowering["ops_outside_delegate"] == {"aten._softmax.default": 1}
    with torch.no_grad():
        ref = export_model(w.model, w.preprocessing, probabilities=False)(torch.from_numpy(x)).numpy()
    runner = open_runner(path)
    fid = compare(ref, runner.run(x))
    # coreml-fp16 measures 51 dB on the evaluation images (README); the same program inside the .pte must too.
    assert fid.sqnr_db >= 45.0 and fid.top1_agreement == 1.0, fid
    assert json.loads(et_runner.read_embedded(path)["manifest"]) == {"recipe": PTE}
