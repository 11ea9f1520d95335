"""Recipes: the named ways to build an artifact, as data in one table.

Artifact file names come from recipe names (``<recipe>.<ext>``). This module is pure data (no
torch): the harness, the CLI's ``recipes`` listing and the gate read it on a device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any

from edge_convnext.errors import EdgeConvNextError


class UnknownRecipeError(EdgeConvNextError, KeyError):
    """A recipe name that is not in the table; the message lists the valid ones."""

    def __str__(self) -> str:
        return str(self.args[0])


class ArtifactFormat(Enum):
    """An artifact format: file extension, runtime, and the input/output contracts its artifacts follow.

    The contracts are ids in `edge_convnext.contract` and are chosen for each format's standard app
    consumer: NHWC float for MediaPipe's ImageClassifier, an image feature with a classifier head for
    Vision, NCHW float for ExecuTorch (no standard consumer; the demo apps feed NCHW float).
    """

    COREML = ("coreml", ".mlpackage", "Core ML", "rgb-image", "classifier")
    TFLITE = ("tflite", ".tflite", "LiteRT", "rgb-nhwc-unit", "probabilities")
    EXECUTORCH = ("executorch", ".pte", "ExecuTorch", "rgb-nchw-unit", "probabilities")

    def __init__(self, key: str, ext: str, runtime: str, input_contract: str, output_contract: str) -> None:
        self.key = key
        self.ext = ext
        self.runtime = runtime
        self.input_contract = input_contract
        self.output_contract = output_contract

    @classmethod
    def from_path(cls, path: str) -> ArtifactFormat:
        for f in cls:
            if str(path).rstrip("/").endswith(f.ext):
                return f
        raise ValueError(f"{path}: unknown artifact type; expected one of {[f.ext for f in cls]}")


FLOAT_PRECISIONS = frozenset({"fp32", "fp16"})


@dataclass(frozen=True)
class Recipe:
    """One way to build an artifact.

    ``options`` are the backend's knobs; ``parity_max_abs`` is the build-time bound on the max abs
    logit error against the float reference (float recipes only); ``runs_on`` says where its runtime
    exists when that is narrower than "anywhere the runtime installs".
    """

    name: str
    format: ArtifactFormat
    precision: str
    description: str
    calibrated: bool = False
    parity_max_abs: float | None = None
    runs_on: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @property
    def filename(self) -> str:
        return f"{self.name}{self.format.ext}"

    @property
    def quantized(self) -> bool:
        return self.precision not in FLOAT_PRECISIONS


_C, _T, _E = ArtifactFormat.COREML, ArtifactFormat.TFLITE, ArtifactFormat.EXECUTORCH
# int8-weight recipes: fold the layer scale (litert-torch would fold it into pwconv2 after the
# rounding), then GPTQ-round the weights with bias correction on calibration images (see
# converters.weight_quant); each backend's min/max quantizer stores those weights as they are.
# Measured on synthetic ConvNeXt-T, weight-only int8 on 64 held-out calibration images: min/max
# rounding 25.2 dB, with bias correction 31.0, MSE clipping + bias correction 31.4, GPTQ 36.1.
_INT8_WEIGHTS: dict[str, Any] = {"rewrites": ("fold_layer_scale",),
                                 "weight_rounding": {"method": "gptq", "bias_correction": True, "images": 16}}
_STEM = "embeddings.patch_embeddings"
# XNNPACK (LiteRT and ExecuTorch) runs depthwise convs of at most 25 taps on fast microkernels and the
# 7x7 (49 taps) on a slow path: `split_depthwise` makes each one three centred pieces (converters.rewrites).
# Measured on synthetic ConvNeXt-T, LiteRT fp32, 2 threads: 67-69 ms -> 43-46 ms.
_SPLIT = ("split_depthwise",)
# The depthwise pieces stay float in the int8 recipes (converters.quant_plan): 0.3 M weights, 2.4 % of
# the MACs. XNNPACK's int8 depthwise path was the slow one (LiteRT static int8: 200 ms with int8 7x7
# depthwise, 10.4 ms with float split depthwise), and float keeps their activations unquantized.
_DW_FLOAT = ("stages.*.dwconv.*",)
# Also float in the int8-activation recipes (float16-stored in LiteRT): the stem, the three downsampling
# convs and the classifier, 4.3 % of the MACs. Their activations cost most per layer: in the fake-quant
# simulation of static int8 (synthetic ConvNeXt-T, 64 held-out calibration images), the stem and
# downsampling activations alone cost 3.6 dB, the classifier's 1.1-1.7 dB; keeping the five float took
# the simulated static int8 from 27.3 to 30.7 dB (27.6 -> 31.5 dB with the LayerNorm migration at 0.5).
# Measured on the random:0 weights before their head fit was made machine-independent.
_EDGE_FLOAT = (_STEM, "stages.*.downsampling_layer.1", "classifier")
# Chosen per build on held-out calibration images (converters.prepare): the LayerNorm migration strength
# and, for LiteRT's static activations, the range estimator.
_MIGRATION = {"smoothing": {"alphas": (0.0, 0.25, 0.5, 0.75)}}
_RANGES = {"activation_ranges": {"estimators": ("minmax", "percentile 99.999", "percentile 99.99", "mse")}}
# Each estimator also measured with the pre-GELU ranges' low end raised to where |GELU| is a quarter of its
# output grid's step (converters.act_quant.floor_gelu_inputs); on symmetric grids (Core ML) the floored ranges
# are centred too (converters.centering.center_outputs). Simulated on 64 held-out calibration images,
# percentile 99.999: static int8 32.70 dB as it is, floored at a half step 32.86, a quarter 33.03, at
# x = -2 / -2.5 / -3 / -3.5 / -4: 30.29 / 32.49 / 32.99 / 32.90 / 32.87 dB; Core ML's symmetric W8A8 32.41,
# floored at a quarter / half / whole step and centred 32.86 / 32.78 / 32.48 (floored only: 32.40).
_RANGES_FLOORED = {"activation_ranges": {**_RANGES["activation_ranges"], "gelu_floor": 0.25}}
_INT8_ACT = {**_INT8_WEIGHTS, **_MIGRATION, "rewrites": ("fold_layer_scale", *_SPLIT),
             "float_layers": _DW_FLOAT + _EDGE_FLOAT}
# ExecuTorch: NCHW blocks end to end (converters.rewrites.channels_first), so XNNPACK keeps the graph NHWC.
_ET = {"delegate": "xnnpack", "ln_rewrite": True}
_ET_REWRITES = ("fold_layer_scale", *_SPLIT, "channels_first")
_FP32_BOUND = 1e-3  # max abs logit error of an fp32 artifact against the float reference

RECIPES: tuple[Recipe, ...] = (
    Recipe("coreml-fp32", _C, "fp32", "ML program, fp32 compute", parity_max_abs=_FP32_BOUND,
           options={"compute_precision": "fp32"}),
    Recipe("coreml-fp16", _C, "fp16", "ML program, fp16 compute (the Neural Engine default)",
           options={"compute_precision": "fp16"}),
    # The stem stays fp16 (float_layers: neither rounded nor compressed; see converters.backends.coreml).
    Recipe("coreml-w8", _C, "w8", "fp16 program, 8-bit per-channel linear weight quantization",
           options={"compute_precision": "fp16", "weights": "int8-per-channel", **_INT8_WEIGHTS,
                    "float_layers": (_STEM,)}),
    # Per-layer storage (2/3/4/6-bit palettes, int8, fp16) chosen by measurement under 16,000,000 bytes
    # (converters.backends.coreml_bits); at most 4.5 bits per weight on average for smaller models.
    Recipe("coreml-p4", _C, "p4", "fp16 program, mixed 2-8 bit palettized and int8 weights chosen per layer "
           "by measured sensitivity, within 16 MB",
           options={"compute_precision": "fp16", "weights": "palettize-mixed", "lut_granularity": "auto",
                    "lut_group_size": 16, "lut_min_gain_db": 0.5, "budget_bytes": 16_000_000,
                    "budget_bits_per_weight": 4.5, "statistics_images": 16, "held_out_images": 32,
                    "backend_choices": ("storage",)}),
    Recipe("coreml-w8a8", _C, "w8a8", "8-bit weights and activations, calibrated (torch-side quantizer)",
           calibrated=True, options={"compute_precision": "fp16", "weights": "int8", "activations": "int8",
                                     **_INT8_WEIGHTS, **_MIGRATION, **_RANGES_FLOORED, "rewrites": ("fold_layer_scale",),
                                     # Symmetric activations: the GELU outputs are centred (converters.centering),
                                     # and so are the floored GELU inputs.
                                     "center_inputs": ("stages.*.pwconv2",),
                                     "float_layers": ("stages.*.dwconv", *_EDGE_FLOAT),
                                     "activation_scope": "no_residual_add",
                                     "backend_choices": ("activation_observer",)}),
    Recipe("tflite-fp32", _T, "fp32", "float32", parity_max_abs=_FP32_BOUND, options={"rewrites": _SPLIT}),
    Recipe("tflite-fp16", _T, "fp16", "float16 weights, float32 compute", options={"rewrites": _SPLIT}),
    Recipe("tflite-dynamic-int8", _T, "dynamic-int8", "dynamic-range int8: int8 weights, activations quantized on the fly",
           options=_INT8_ACT),
    Recipe("tflite-int8", _T, "int8", "static int8 weights and activations, calibrated; float input/output",
           calibrated=True, options={**_INT8_ACT, **_RANGES_FLOORED, "int8_scope": "compute"}),
    # Split depthwise here too, in int8: 8x faster in LiteRT (411 -> 51 ms in one loaded run; the int8 7x7 is
    # XNNPACK's slow path) at the same fidelity (parity 17.2 -> 17.0 dB, 16 images 17.3 -> 17.1 dB).
    # The LayerNorm affines go into the next layers (`fold_norm_affine`): two int8 ops fewer per LayerNorm.
    # Measured on 64 held-out calibration images, every tensor at percentile 99.99 (synthetic ConvNeXt-T):
    # the migration at 0.75 (chosen by the static compute-scope simulation; it had taken the evaluation
    # images from 17.6 to 18.7 dB) 21.82 dB, its bias folded 22.36, the whole affine folded 22.65. With the
    # affine folded there is nothing left to migrate: the next layer reads the normalized values.
    Recipe("tflite-int8-all", _T, "int8", "static int8 including LayerNorm, GELU and residual adds "
           "(for integer-only accelerators), calibrated", calibrated=True,
           # fold_norm_mean: the LayerNorms before a layer write their normalized output once, not twice
           # (converters.rewrites); held out at percentile 99.99 for every tensor: 22.65 -> 23.06 dB.
           options={"int8_scope": "all", **_INT8_WEIGHTS,
                    "rewrites": ("fold_layer_scale", *_SPLIT, "fold_norm_affine", "fold_norm_mean"),
                    # Every int8 tensor's range (LayerNorm pieces, GELU, adds too), by the estimator that
                    # builds the best artifact on held-out images (converters.backends.tflite_ranges):
                    # 18.7 -> 21.4 dB, 77.0 -> 82.4 % on the 1000 evaluation images, same speed; then an
                    # estimator per op role (the stem LayerNorm's squared differences and inverse standard
                    # deviations want far tighter ranges than the rest), one sweep, on 64 held-out images.
                    "graph_ranges": {**_RANGES["activation_ranges"], "held_out_images": 64,
                                     "per_group": {"estimators": ("minmax", "percentile 99.999", "percentile 99.99",
                                                                  "percentile 99.9", "percentile 99.5",
                                                                  "percentile 99", "mse"),
                                                   "passes": 1}},
                    "backend_choices": ("graph_ranges",)}),
    Recipe("tflite-w8a16", _T, "w8a16", "int8 weights, int16 activations, calibrated", calibrated=True,
           options=_INT8_WEIGHTS),
    Recipe("executorch-xnnpack-fp32", _E, "fp32", "XNNPACK delegate, float32", parity_max_abs=_FP32_BOUND,
           options={**_ET, "rewrites": (*_SPLIT, "channels_first")}),
    Recipe("executorch-xnnpack-int8", _E, "int8", "PT2E static per-channel int8, calibrated, XNNPACK delegate",
           calibrated=True, options={**_ET, **_INT8_ACT, **_RANGES_FLOORED, "rewrites": _ET_REWRITES,
                                       "int8_scope": "compute"}),
    # Without channels_first: ExecuTorch 1.5.1 lowers dynamically quantized linears to XNNPACK but fails on
    # dynamically quantized convs, 1x1 ones included ("Invalid size of per channel quantization scales").
    Recipe("executorch-xnnpack-dynamic-int8", _E, "dynamic-int8", "PT2E dynamic int8 (XNNPACK qd8): int8 weights, "
           "activations quantized per row at run time", options={**_ET, **_INT8_ACT}),
    Recipe("executorch-portable-fp32", _E, "fp32", "no delegate (portable kernels)", parity_max_abs=_FP32_BOUND),
    Recipe("executorch-coreml-fp16", _E, "fp16", "Core ML delegate, fp16 (runs on Apple; emulated elsewhere)",
           runs_on="Apple devices (ExecuTorch built with the Core ML backend); elsewhere the Core ML emulator",
           options={"delegate": "coreml"}),
)

_BY_NAME: dict[str, Recipe] = {r.name: r for r in RECIPES}


def get_recipe(name: str) -> Recipe:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnknownRecipeError(f"unknown recipe {name!r}; valid recipes: {', '.join(_BY_NAME)}") from None


def select_recipes(spec: str | Iterable[str]) -> list[Recipe]:
    """``"all"``, a format key (``"tflite"``), or comma-separated names -> recipes in table order."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise UnknownRecipeError(f"no recipe given; valid recipes: all, {', '.join(_BY_NAME)}")
    chosen: set[str] = set()
    for n in names:
        if n == "all":
            chosen.update(_BY_NAME)
        elif n in {f.key for f in ArtifactFormat}:
            chosen.update(r.name for r in RECIPES if r.format.key == n)
        else:
            chosen.add(get_recipe(n).name)
    return [r for r in RECIPES if r.name in chosen]
