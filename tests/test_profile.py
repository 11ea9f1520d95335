"""``bench --profile``: the .tflite op slicer, the ETDump reader, and the profiles they add up to.

No timing is asserted: the tests check that the pieces compute exactly what the ops compute in the whole
model, that every op is counted once, and that the groups add up to the totals they are reported against.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import HAS_TORCH, REPO, convert_tiny
from edge_convnext.profiling import NOT_PROFILED_COREML, OpTime, Profile, block_of, profile_artifact, render, scope_of
from edge_convnext.profiling.executorch import _profile

TFLITE = ("tflite-fp32", "tflite-fp16", "tflite-int8")


def test_scopes_and_blocks_from_litert_torch_tensor_names():
    name = "ChannelLastIOWrapper/ExportClassifier_wrapped/ConvNextStage_2/ConvNextLayer_4/Linear_pwconv1;2"
    assert scope_of(name) == "ConvNextStage_2/ConvNextLayer_4/Linear_pwconv1"
    assert block_of(scope_of(name)) == "ConvNextStage_2/ConvNextLayer_4"
    assert block_of("ConvNextStage_1/Conv2d_1") == "ConvNextStage_1/Conv2d_1"  # a downsampling layer
    assert block_of("ConvNextStage_1/ConvNextLayer_0/SplitDepthwise_dwconv/Conv2d_rows") == "ConvNextStage_1/ConvNextLayer_0"
    assert block_of(scope_of("ChannelLastIOWrapper/ExportClassifier_wrapped/Conv2d_patch_embeddings;1")) == \
        "Conv2d_patch_embeddings"
    for io in ("ChannelLastIOWrapper/ExportClassifier_wrapped", "serving_default_output_0_output"):
        assert block_of(scope_of(io)) == "(model input/output)"


def test_coreml_is_not_profiled_and_says_why(tmp_path):
    p = profile_artifact(tmp_path / "coreml-fp16.mlpackage", threads=1)
    assert p.status == NOT_PROFILED_COREML and not p.ops
    assert "says nothing about Apple hardware" in render(p)


def test_etdump_events_fold_into_kinds_without_the_warmup_run():
    # Two warmup runs (slow: first-run setup), then three timed runs; one delegate call holding three ops.
    events = [
        ("Fully Connected (NC, F32) GEMM #1", True, [50.0, 9.0, 2.0, 2.0, 2.2]),
        ("Fully Connected (NC, F32) GEMM #2", True, [40.0, 9.0, 1.0, 1.2, 1.0]),
        ("Transpose (ND, X32) #1", True, [5.0, 5.0, 0.5, 0.5, 0.5]),
        ("DELEGATE_CALL", False, [99.0, 30.0, 3.7, 3.9, 3.9]),
        ("native_call_mean.out", False, [1.0, 1.0, 0.1, 0.1, 0.1]),
        ("Method::execute", False, [100.0, 31.0, 3.8, 4.0, 4.0]),
    ]
    p = _profile(Path("m.pte"), events, threads=2, runs=3, warmup=2, whole_ms=3.5)
    kinds = {g.name: g for g in p.by_kind()}
    assert kinds["Fully Connected (NC, F32) GEMM"].ms == pytest.approx(3.0) and kinds["Fully Connected (NC, F32) GEMM"].count == 2
    assert kinds["Transpose (ND, X32)"].ms == pytest.approx(0.5)
    # per run: 3.7-3.5, 3.9-3.7, 3.9-3.7 -> median 0.2 ms of the delegate call outside its ops
    assert kinds["(delegate call, outside its ops)"].ms == pytest.approx(0.2)
    assert [o.name for o in p.ops if o.kind == "native_call_mean.out"] == ["native_call_mean.out #1"]
    assert p.total_ms == pytest.approx(3.0 + 0.5 + 0.2 + 0.1)
    assert p.extra["profiled_run_ms"] == pytest.approx(4.0)
    assert sum(g.share for g in p.by_kind()) == pytest.approx(1.0, abs=1e-3)
    assert p.by_layer() == []  # no module scope in ETDump events without an ETRecord
    assert Profile.from_dict(json.loads(json.dumps(p.to_dict()))).ops == p.ops


def test_render_shows_the_total_against_the_whole_run():
    ops = [OpTime("FULLY_CONNECTED", "FULLY_CONNECTED", 3.0, "ConvNextStage_0/ConvNextLayer_0/Linear_pwconv1", "f32", 1),
           OpTime("GELU", "GELU", 1.0, "ConvNextStage_0/ConvNextLayer_0/GELUActivation_act", "f32", 2)]
    text = render(Profile("m.tflite", "pieces", threads=2, runs=5, whole_ms=5.0, total_ms=4.0, ops=ops))
    assert "**4.0 ms** against the un-profiled whole-model median **5.0 ms**" in text and "(0.80x)" in text
    assert "| FULLY_CONNECTED | 3.00 | 75.0% | 1 |" in text
    assert "| ConvNextStage_0/ConvNextLayer_0 | 4.00 | 100.0% | 2 |" in text


# --- on built tiny artifacts -------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    pytest.importorskip("litert_torch")
    pytest.importorskip("executorch")
    return convert_tiny(tmp_path_factory.mktemp("profile"), ",".join(TFLITE) + ",executorch-xnnpack-fp32",
                        reference_images=8, parity_images=2, calibration_images=8)


def _reference_interpreter(content: bytes, keep_all: bool = False):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    # Reference (non-delegated) kernels: deterministic, so a piece must equal the whole model bit for bit.
    return Interpreter(model_content=content, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                       experimental_preserve_all_tensors=keep_all)


@pytest.mark.convert
@pytest.mark.skipif(not HAS_TORCH, reason="builds artifacts with the converter stack")
@pytest.mark.parametrize("recipe", TFLITE)
def test_each_piece_computes_its_op_exactly_as_in_the_whole_model(built, recipe):
    from edge_convnext.profiling.tflite import ModelSlicer

    data = (built / f"{recipe}.tflite").read_bytes()
    slicer = ModelSlicer(data, recipe)
    whole = _reference_interpreter(data, keep_all=True)
    whole.allocate_tensors()
    d = whole.get_input_details()[0]
    whole.set_tensor(d["index"], np.random.default_rng(1).uniform(0, 1, d["shape"]).astype(np.float32))
    whole.invoke()
    pieces = slicer.pieces()
    folded = set(slicer.folded_ops)
    # Every op is timed in exactly one piece of its own; constant ops only inside their consumers' pieces.
    assert sorted(p.index for p in pieces) == sorted(set(range(len(slicer.graph.operators))) - folded)
    if recipe == "tflite-fp16":
        assert folded and {slicer.op_names[i] for i in folded} == {"DEQUANTIZE"}  # fp16 weights -> float32
    for p in pieces:
        content = slicer.model_bytes(p)
        weights = sum(int(slicer._buffer_bytes(t).size) for j in p.ops for t in slicer.graph.operators[j].inputs
                      if t >= 0 and slicer._buffer_bytes(t) is not None)
        assert len(content) < weights + 16_384, (p.op, len(content), weights)  # only its own weights
        it = _reference_interpreter(content)
        it.allocate_tensors()
        for det, t in zip(it.get_input_details(), p.inputs):
            it.set_tensor(det["index"], whole.get_tensor(t))
        it.invoke()
        for det, t in zip(it.get_output_details(), p.outputs):
            assert np.array_equal(it.get_tensor(det["index"]), whole.get_tensor(t)), (recipe, p.index, p.op)


@pytest.mark.convert
@pytest.mark.skipif(not HAS_TORCH, reason="builds artifacts with the converter stack")
def test_tflite_profile_adds_up_and_needs_no_torch(built):
    code = ("import json, sys; from edge_convnext.profiling.tflite import profile_tflite; "
            f"p = profile_tflite({str(built / 'tflite-fp16.tflite')!r}, 1, runs=3, warmup=1); "
            "print(json.dumps({'torch': 'torch' in sys.modules, 'profile': p.to_dict()}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["torch"] is False  # the light install (a Raspberry Pi) can profile
    p = Profile.from_dict(got["profile"])
    assert p.status == "ok" and p.whole_ms > 0 and p.runtime == "litert"
    assert p.total_ms == pytest.approx(sum(o.ms for o in p.ops), abs=1e-3)
    for groups in (p.by_kind(), p.by_layer()):
        assert sum(g.ms for g in groups) == pytest.approx(p.total_ms, abs=1e-2)
        assert sum(g.count for g in groups) == len(p.ops) == p.extra["pieces"]
    assert p.extra["timed"] < p.extra["pieces"]  # identical ops timed once
    assert p.extra["folded_constant_ops"] > 0 and p.extra["not_delegated"] == []
    kinds = {g.name for g in p.by_kind()}
    assert {"FULLY_CONNECTED", "DEPTHWISE_CONV_2D", "CONV_2D"} <= kinds and "DEQUANTIZE" not in kinds
    layers = {g.name for g in p.by_layer()}
    assert {"ConvNextStage_0/ConvNextLayer_0", "ConvNextStage_1/Conv2d_1", "Conv2d_patch_embeddings"} <= layers


@pytest.mark.convert
@pytest.mark.skipif(not HAS_TORCH, reason="builds artifacts with the converter stack")
def test_bench_profile_reports_each_artifact(built, tmp_path, capsys):
    from edge_convnext.cli import main

    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    paths = [str(built / "tflite-int8.tflite"), str(built / "executorch-xnnpack-fp32.pte")]
    assert main(["bench", *paths, "--runs", "3", "--warmup", "1", "--threads", "1", "--fidelity-images", "2",
                 "--profile", "--json", str(out), "--markdown", str(md)]) == 0
    text = capsys.readouterr().out
    assert "### Profile: tflite-int8" in text and "### Profile: executorch-xnnpack-fp32" in text
    assert md.read_text().strip() == text.strip()
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    lite, et = (Profile.from_dict(rows[n]["profile"]) for n in ("tflite-int8", "executorch-xnnpack-fp32"))
    assert lite.status == et.status == "ok"
    assert {"QUANTIZE", "FULLY_CONNECTED"} <= {g.name for g in lite.by_kind()}
    kinds = {g.name for g in et.by_kind()}
    assert any(k.startswith("Fully Connected (NC, F32)") for k in kinds) and not any("#" in k for k in kinds)
    assert et.extra["profiled_run_ms"] > 0 and et.total_ms == pytest.approx(sum(o.ms for o in et.ops), abs=1e-3)
