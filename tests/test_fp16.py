"""The manifest's ``lowering["fp16"]`` entry (`converters.backends.fp16`), and the LiteRT switch it documents.

This machine has no fp16 arithmetic (x86): nothing here measures fp16 speed. XNNPACK's forced fp16 mode
runs here in its x86 emulation (fp32 arithmetic rounded to fp16), which shows that the documented call
switches the artifact to fp16 numerics, not how fast it would be.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")

from converters.backends.fp16 import MEASURED_HERE, XNNPACK_FLAG_FORCE_FP16, fp16_entry  # noqa: E402
from edge_convnext.profiling.tflite import invoke_overhead_model  # noqa: E402
from edge_convnext.recipes import RECIPES, get_recipe  # noqa: E402


def _with_metadata(tmp_path: Path, value: str | None) -> Path:
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    model = fbu.convert_bytearray_to_object(bytearray(invoke_overhead_model()))
    if value is not None:
        buf = schema.BufferT()
        buf.data = np.frombuffer(value.encode(), np.uint8)
        model.buffers.append(buf)
        entry = schema.MetadataT()
        entry.name, entry.buffer = b"reduced_precision_support", len(model.buffers) - 1
        model.metadata = [entry]
    path = tmp_path / f"m-{value}.tflite"
    path.write_bytes(bytes(fbu.convert_object_to_bytearray(model)))
    return path


def test_every_recipe_says_how_and_that_it_was_not_measured_here(tmp_path):
    plain = _with_metadata(tmp_path, None)
    for r in RECIPES:
        e = fp16_entry(r, plain)
        assert e["runs_fp16"] in {"always", "no", "when the app asks for it", "on fp16 hardware by itself"}, r.name
        assert e["measured_here"] == MEASURED_HERE and "x86" in MEASURED_HERE
    assert fp16_entry(get_recipe("coreml-fp16"), plain)["runs_fp16"] == "always"
    assert fp16_entry(get_recipe("coreml-fp32"), plain)["runs_fp16"] == "no"
    assert fp16_entry(get_recipe("executorch-coreml-fp16"), plain)["runs_fp16"] == "always"
    et = fp16_entry(get_recipe("executorch-xnnpack-fp32"), plain)
    assert et["runs_fp16"] == "no" and "torch.float16" in et["how"]
    assert fp16_entry(get_recipe("tflite-int8"), plain)["runs_fp16"] == "no"
    lite = fp16_entry(get_recipe("tflite-fp32"), plain)
    assert lite["runs_fp16"] == "when the app asks for it" and "Raspberry Pi 5" in lite["hardware"]
    assert "TFLITE_XNNPACK_DELEGATE_FLAG_FORCE_FP16" in lite["how"]["LiteRT / TFLite C API"]
    assert lite["model_metadata"] == {"reduced_precision_support": None}


def test_tflite_entry_reads_the_models_reduced_precision_metadata(tmp_path):
    r = get_recipe("tflite-fp16")
    assert fp16_entry(r, _with_metadata(tmp_path, "fp16accfp16"))["runs_fp16"] == "on fp16 hardware by itself"
    # fp32 accumulation does not make XNNPACK choose fp16 (xnnpack_delegate.cc needs fp16 inference and accumulation)
    e = fp16_entry(r, _with_metadata(tmp_path, "fp16accfp32"))
    assert e["runs_fp16"] == "when the app asks for it" and e["model_metadata"]["reduced_precision_support"] == "fp16accfp32"


@pytest.mark.convert
def test_the_documented_litert_switch_turns_a_tiny_artifact_to_fp16_numerics(tmp_path):
    pytest.importorskip("litert_torch")
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.options import CpuOptions, Options

    from conftest import convert_tiny
    from edge_convnext.manifest import read_manifest

    out = convert_tiny(tmp_path / "a", "tflite-fp32", reference_images=4, parity_images=2)
    assert read_manifest(out / "tflite-fp32.json").lowering["fp16"]["runs_fp16"] == "when the app asks for it"
    x = np.random.default_rng(0).uniform(0, 1, (1, 224, 224, 3)).astype(np.float32)

    def run(flags: int | None) -> np.ndarray:
        m = CompiledModel.from_file(str(out / "tflite-fp32.tflite"),
                                    options=Options(cpu_options=CpuOptions(num_threads=1, xnnpack_flags=flags)))
        ins, outs = m.create_input_buffers(0), m.create_output_buffers(0)
        ins[0].write(x)
        m.run_by_index(0, ins, outs)
        return np.asarray(outs[0].read(1000, np.float32))

    fp32, fp16 = run(None), run(XNNPACK_FLAG_FORCE_FP16)
    assert not np.array_equal(fp32, fp16)  # the flag changed the arithmetic
    assert fp32.argmax() == fp16.argmax() and np.abs(fp32 - fp16).max() < 0.05
    assert (fp16 == 0).sum() > (fp32 == 0).sum()  # fp16's range: small probabilities underflow to 0
