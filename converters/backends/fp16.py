"""The manifest's ``lowering["fp16"]`` entry: how an artifact can run fp16 arithmetic, where, and the API to call.

fp16 arithmetic roughly doubles the float throughput of the CPUs that have it, but whether an artifact
gets it depends on its format: LiteRT's XNNPACK delegate switches a float32 model to fp16 when the app
asks (or the model's metadata allows it), ExecuTorch runs the dtype the program was exported in, and
Core ML runs the compute precision the program was converted with. Sources: the XNNPACK delegate's
README ("Floating-Point (IEEE FP16) Operators") and ``xnnpack_delegate.cc`` in TensorFlow/LiteRT,
MediaPipe's ``inference_calculator.proto``, ExecuTorch's XNNPACK node visitor, coremltools' "Typed
Execution". Nothing here is measured: see `MEASURED_HERE`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_convnext.recipes import ArtifactFormat, Recipe

MEASURED_HERE = ("not measured: the build machine is x86-64 without fp16 arithmetic; fp16 speed exists only on ARM "
                 "(ARMv8.2-A FP16) and Apple hardware")
FP16_CPUS = ("ARM CPUs with the ARMv8.2-A FP16 arithmetic extension: Raspberry Pi 5 (Cortex-A76); Android phones from "
             "Pixel 3, Galaxy S9 (Snapdragon) and Galaxy S10 (Exynos) on; iPhones and iPads with A11 or newer; Apple "
             "Silicon Macs. Not Raspberry Pi 4 (Cortex-A72, ARMv8.0), not x86")
# TfLiteXNNPackDelegateOptions.flags bit (tensorflow/lite/delegates/xnnpack/xnnpack_delegate.h).
XNNPACK_FLAG_FORCE_FP16 = 0x4
_REDUCED_PRECISION_KEY = "reduced_precision_support"  # model metadata XNNPACK reads; "fp16accfp16" enables fp16


def fp16_entry(recipe: Recipe, artifact: Path) -> dict[str, Any]:
    """``lowering["fp16"]`` for the artifact ``recipe`` built at ``artifact`` (see the module doc)."""
    float_compute = recipe.precision in ("fp32", "fp16")
    if recipe.format is ArtifactFormat.TFLITE:
        if not float_compute:
            return {"runs_fp16": "no", "why": f"{recipe.precision}: the convolutions and matmuls are integer; XNNPACK's "
                    "fp16 mode replaces float operators only", "measured_here": MEASURED_HERE}
        metadata = _tflite_metadata_value(artifact, _REDUCED_PRECISION_KEY)
        by_itself = metadata is not None and metadata.startswith("fp16") and metadata.endswith("accfp16")
        return {
            "runs_fp16": "on fp16 hardware by itself" if by_itself else "when the app asks for it",
            "hardware": FP16_CPUS,
            "model_metadata": {_REDUCED_PRECISION_KEY: metadata},
            "how": {
                "LiteRT / TFLite C API": "TfLiteXNNPackDelegateOptions o = TfLiteXNNPackDelegateOptionsDefault(); "
                                         f"o.flags |= TFLITE_XNNPACK_DELEGATE_FLAG_FORCE_FP16 (0x{XNNPACK_FLAG_FORCE_FP16:x}); "
                                         "TfLiteXNNPackDelegateCreate(&o), then ModifyGraphWithDelegate",
                "LiteRT CompiledModel (Python)": "CompiledModel.from_file(path, options=Options(cpu_options="
                                                 f"CpuOptions(xnnpack_flags={XNNPACK_FLAG_FORCE_FP16})))",
                "Android / iOS Interpreter (Java, Swift)": "no fp16 option for the CPU (setUseXNNPACK / isXNNPackEnabled "
                                                           "only; setAllowFp16PrecisionForFp32 is deprecated, for NNAPI): "
                                                           "create the XNNPACK delegate through the C API with the flag "
                                                           "and add it to the interpreter",
                "MediaPipe Tasks": "no switch: its CPU path creates the XNNPACK delegate with default flags, so fp16 "
                                   "happens only when the model metadata asks for it; its GPU delegate allows fp16 "
                                   "(Delegate.Gpu.allow_precision_loss defaults to true)",
                "model metadata": f"'{_REDUCED_PRECISION_KEY}': 'fp16accfp16' in the flatbuffer metadata makes XNNPACK "
                                  "choose fp16 by itself on fp16 hardware",
            },
            "caution": "forced fp16 fails rather than falling back when an operator has no fp16 kernel; small "
                       "probabilities of the softmax output underflow to 0 in fp16",
            "measured_here": MEASURED_HERE,
        }
    if recipe.format is ArtifactFormat.EXECUTORCH:
        if recipe.options.get("delegate") == "coreml":
            return {"runs_fp16": "always", "why": "the Core ML delegate's program was compiled with fp16 compute "
                    "precision", "hardware": "Apple Neural Engine, GPU and CPU", "measured_here": MEASURED_HERE}
        return {"runs_fp16": "no", "why": "ExecuTorch runs the dtype the program was exported in, and this program is "
                f"{'float32' if float_compute else recipe.precision}; the XNNPACK backend has no runtime switch",
                "how": "export the model and example input in torch.float16 and lower with XnnpackPartitioner: XNNPACK "
                       "then runs fp16 kernels (input and output become float16 tensors, a different app contract)",
                "hardware": FP16_CPUS, "measured_here": MEASURED_HERE}
    precision = str(recipe.options.get("compute_precision", "fp16"))
    if precision == "fp16":
        return {"runs_fp16": "always", "why": "ML program converted with compute_precision FLOAT16",
                "hardware": "Apple Neural Engine (fp16 only), GPU and CPU",
                "how": "MLModelConfiguration.computeUnits = .all (default) or .cpuAndNeuralEngine", "measured_here": MEASURED_HERE}
    return {"runs_fp16": "no", "why": "ML program converted with compute_precision FLOAT32: Core ML computes it in "
            "fp32 on the CPU and GPU, and the Neural Engine (fp16 only) does not take it",
            "how": "use the coreml-fp16 artifact (or convert with compute_precision=ct.precision.FLOAT16); "
                   "MLModelConfiguration.allowLowPrecisionAccumulationOnGPU = true lets the GPU accumulate in fp16",
            "hardware": "Apple Neural Engine, GPU and CPU", "measured_here": MEASURED_HERE}


def _tflite_metadata_value(artifact: Path, name: str) -> str | None:
    """The flatbuffer metadata entry ``name`` of a ``.tflite`` as text, or None when it has none."""
    from ai_edge_litert import schema_py_generated as schema

    data = Path(artifact).read_bytes()
    model = schema.Model.GetRootAs(data, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if (entry.Name() or b"").decode("utf-8", "replace") == name:
            buf = model.Buffers(entry.Buffer())
            raw = data[buf.Offset(): buf.Offset() + buf.Size()] if buf.Offset() > 1 else buf.DataAsNumpy().tobytes()
            return bytes(raw).rstrip(b"\0").decode("utf-8", "replace")
    return None
