"""Core ML emulator: run the ML program inside an ``.mlpackage`` with NumPy, on Linux.

``MLModel.predict`` only runs on macOS. `CoreMLEmulator` reads the program with coremltools
(imported lazily, when a package is loaded; importing this package costs NumPy only) and executes
it op by op with NumPy kernels (`ops.OPS`, keyed by MIL op type). The emulator never imports torch
(coremltools' own import does pull it in when it is installed).

Precision model
---------------
* ``precision="auto"`` emulates the program's declared types. In an fp16 program
  (``compute_precision=FLOAT16``) every op's inputs and outputs are float16: each op result is
  rounded to float16 (round-to-nearest-even, subnormals kept, overflow to inf) before the next op
  reads it. The values are held in float32 arrays (`numeric.round_to_float16`): the same numbers,
  without NumPy's float16 conversions (scalar code, and ~100x slower on subnormal results).
* Inside one op the arithmetic is float32, rounded once at the end. conv, linear and matmul
  accumulate in float32 because NumPy has no float16 BLAS (float16 sums would be orders of
  magnitude slower). For add/sub/mul/real_div this equals native float16 arithmetic exactly; for
  sums (conv, linear, matmul, layer_norm, reduce_mean) and transcendentals (GELU's erf) it models a
  device that accumulates wider than float16. Whether a given Apple GPU / Neural Engine kernel does
  is not documented, so residual differences to a device are expected at the float16-ulp level.
* Programs with fp32 I/O around fp16 compute carry ``cast`` ops at the boundary; they run like any
  other op (the input is rounded to float16 by the cast, the output widened back).
* ``precision="fp32"`` runs the same program (same, possibly compressed, weights) with every
  tensor in float32; the difference to ``"auto"`` is the float16 rounding alone.
* Weight-compression ``constexpr_*`` ops are decompressed once at load (float32, then rounded to
  their declared dtype; bit-identical to coremltools' own decompression) and cached. Activation
  ``quantize`` follows the MIL spec, ``clip(round_half_even(x / scale) + zero_point)``.

Image inputs and classifiers
----------------------------
* An image feature (``ct.ImageType``) is fed as a NCHW array of 8-bit pixel values (integers
  0..255; anything else is refused), channels in the spec's color order. Its ``scale`` and ``bias``
  are not in the spec: the converter writes them into the program as ``mul``/``add`` ops after the
  input, which the emulator runs like any other op (in float32 before an fp16 program's cast).
* A classifier (``ct.ClassifierConfig``) ends in a ``classify`` op: its label output is returned
  as a 0-d string array, its probabilities (a ``{label: probability}`` dictionary in Core ML) as a
  float32 vector in the order of `CoreMLEmulator.class_labels`. ``classify`` passes the
  probabilities through unchanged (it adds no softmax).

Usage::

    emu = CoreMLEmulator("artifacts/coreml-fp16.mlpackage")
    out = emu.predict({"image": pixels})  # pixels: float32 [1, 3, 224, 224], integers 0..255
    out["classLabel"], out["probabilities"]  # the top label; float32 [1000] in emu.class_labels order

`CoreMLEmulator.blas_threads` (default 1) caps NumPy's BLAS threads while predicting; see there.
Benchmark: ``python -m edge_convnext.coreml_emulator.bench PATH.mlpackage``.
"""

from edge_convnext.coreml_emulator.emulator import CoreMLEmulator
from edge_convnext.coreml_emulator.ops import UnsupportedOpError, supported_ops

__all__ = ["CoreMLEmulator", "UnsupportedOpError", "supported_ops"]
