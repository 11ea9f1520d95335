"""Activation quantization on the torch side: observations, range estimators as data, and a simulator.

The backends quantize activations by the ranges their calibrators see (absolute min/max for
ai-edge-quantizer). Which range to use is a choice, and choices are made by measurement on held-out
calibration images (`converters.calibrate`). This module provides the pieces, all on the float torch
export model and keyed by torch layer names (`converters.quant_plan`):

* `observe`: per quantization point (a layer's input or output), the min, max and a value sample
  over calibration images;
* `RangeEstimator`: ``minmax``, ``percentile`` (the ``q`` and ``1 - q`` quantiles) or ``mse`` (the
  clipping of the min/max range that minimises the fake-quantization MSE of the sample), as data;
* `simulate`: fake quantization of a scheme on the torch model (context manager), so a candidate is
  measured in seconds without building an artifact:

  - ``static``: per-tensor asymmetric int8 at every quantized layer's input and output, with
    given ranges (LiteRT static int8 with the ``compute`` scope: QUANTIZE before each conv/FC and
    int8 outputs dequantized after);
  - ``dynamic``: per-row asymmetric int8 of every quantized layer's input, computed on the fly, float
    output (LiteRT dynamic-range int8; the classifier of the static recipes);
  - ``static`` and ``symmetric``: the same points on a grid with zero point 0 (Core ML W8A8), where
    a range ``[lo, hi]`` is quantized over ``[-max(|lo|, |hi|), max(|lo|, |hi|)]``.

  Measured on synthetic ConvNeXt-T against the built ``.tflite``: static simulation 26.08 dB, the
  artifact 26.0 dB SQNR (same plan, weights and min/max ranges).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import nn

from converters.hooked import run_hooked

QMIN, QMAX = -128, 127


class Point(NamedTuple):
    """A quantization point: the input or the output of a conv/linear layer, by torch module name."""

    layer: str
    where: Literal["input", "output"]

    def __str__(self) -> str:
        return f"{self.layer}:{self.where}"


@dataclass
class Observation:
    """What calibration saw at one point: min, max, and up to ``per_image`` values per image."""

    lo: float = math.inf
    hi: float = -math.inf
    samples: list[torch.Tensor] = field(default_factory=list)

    def add(self, t: torch.Tensor, per_image: int, g: torch.Generator) -> None:
        flat = t.detach().reshape(-1).to(torch.float32)
        self.lo, self.hi = min(self.lo, float(flat.min())), max(self.hi, float(flat.max()))
        if flat.numel() > per_image:
            flat = flat[torch.randint(0, flat.numel(), (per_image,), generator=g)]
        self.samples.append(flat.clone())

    def values(self) -> torch.Tensor:
        return torch.cat(self.samples)


@dataclass(frozen=True)
class RangeEstimator:
    """How a per-tensor range is derived from an `Observation`: data, so the choice can be recorded."""

    kind: Literal["minmax", "percentile", "mse"]
    q: float = 0.0  # percentile: the upper quantile kept (the lower one is 1 - q)

    @property
    def name(self) -> str:
        return f"percentile {100 * self.q:g}" if self.kind == "percentile" else self.kind

    def range(self, obs: Observation) -> tuple[float, float]:
        """(lo, hi) of the quantization range, always containing 0."""
        if self.kind == "minmax":
            lo, hi = obs.lo, obs.hi
        elif self.kind == "percentile":
            v = obs.values().to(torch.float64)
            lo, hi = float(torch.quantile(v, 1 - self.q)), float(torch.quantile(v, self.q))
        elif self.kind == "mse":
            lo, hi = _mse_range(obs)
        else:
            raise ValueError(f"unknown range estimator {self.kind!r}")
        return min(lo, 0.0), max(hi, 0.0)


ESTIMATORS: dict[str, RangeEstimator] = {
    "minmax": RangeEstimator("minmax"),
    "percentile 99.999": RangeEstimator("percentile", 0.99999),
    "percentile 99.99": RangeEstimator("percentile", 0.9999),
    "percentile 99.9": RangeEstimator("percentile", 0.999),
    "percentile 99.5": RangeEstimator("percentile", 0.995),
    "percentile 99": RangeEstimator("percentile", 0.99),
    "mse": RangeEstimator("mse"),
}


def _mse_range(obs: Observation, steps: int = 41) -> tuple[float, float]:
    """The min/max range scaled by ``c`` in [0.2, 1] that minimises the int8 fake-quantization MSE."""
    v = obs.values()
    best = (math.inf, obs.lo, obs.hi)
    for c in np.linspace(0.2, 1.0, steps):
        lo, hi = obs.lo * c, obs.hi * c
        err = float(((fake_quant(v, lo, hi) - v) ** 2).mean())
        if err < best[0]:
            best = (err, lo, hi)
    return best[1], best[2]


# A layer whose output goes through GELU into the input of a sibling layer (ConvNeXt's blocks):
# layer suffix -> (the GELU module's suffix, the consumer's suffix).
GELU_PAIRS = {"pwconv1": ("act", "pwconv2")}
_GELU_MIN_X = -0.7517916  # GELU's minimum (-0.16997): below it |GELU(x)| falls towards 0 as x falls


def gelu(x: float) -> float:
    """The exact (erf) GELU of a float, as ``transformers``' ``GELUActivation`` computes it."""
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


def gelu_floor(limit: float) -> float:
    """The ``x <= -0.75`` at which ``|GELU(x)| = limit``: clamping GELU's input there moves its output by less
    than ``limit`` for any input below (``-0.75`` itself when ``limit`` exceeds GELU's depth, 0.17)."""
    if limit >= -gelu(_GELU_MIN_X):
        return _GELU_MIN_X
    lo, hi = -40.0, _GELU_MIN_X  # |GELU| rises from ~0 at lo to 0.17 at hi: bisection
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if -gelu(mid) < limit else (lo, mid)
    return hi


def gelu_producers(model: nn.Module, layers: Iterable[str]) -> dict[str, str]:
    """{layer: consumer} for each of ``layers`` whose output reaches ``consumer``'s input through a GELU
    module only (`GELU_PAIRS`)."""
    modules = dict(model.named_modules())
    out = {}
    for name in layers:
        parent, _, leaf = name.rpartition(".")
        if leaf not in GELU_PAIRS:
            continue
        act, consumer = (f"{parent}.{s}" if parent else s for s in GELU_PAIRS[leaf])
        if "GELU" in type(modules.get(act)).__name__ and consumer in modules:
            out[name] = consumer
    return out


def floor_gelu_inputs(ranges: Mapping[Point, tuple[float, float]], pairs: Mapping[str, str], fraction: float
                      ) -> tuple[dict[Point, tuple[float, float]], dict[str, float]]:
    """(``ranges`` with the low end of each GELU input raised, the floors by layer).

    A GELU input's range (the output of a `gelu_producers` layer) is symmetric around 0, but GELU maps
    everything below about -3 to within a few thousandths of 0: an int8 grid spends a third of its steps
    there. Each range's low end is raised to `gelu_floor` of ``fraction`` times the step of the grid
    GELU's output is quantized on (the consumer's input range), so the clamp moves GELU's output by less
    than that fraction of a step, while every value GELU passes on gets a finer grid. A symmetric grid's
    step is set by ``max(|lo|, |hi|)``, so there the floor pays only with the range centred too
    (`converters.centering.center_outputs`, which `converters.prepare` adds for symmetric schemes).
    """
    out, floors = dict(ranges), {}
    for layer, consumer in pairs.items():
        lo, hi = ranges[Point(layer, "output")]
        step, _ = qparams(*ranges[Point(consumer, "input")])  # the grid GELU's output is quantized on
        floor = gelu_floor(fraction * step)
        if floor > lo:
            out[Point(layer, "output")] = (floor, hi)
            floors[layer] = round(floor, 4)
    return out, floors


class RangeUnion(dict[str, tuple[float, float]]):
    """Ranges wanted per observer or quantizer (by module target) when a backend sets chosen ranges: one
    shared by several points (e.g. a tensor that is one layer's output and the next one's input) takes the
    union of theirs."""

    def want(self, target: str, rng: tuple[float, float]) -> None:
        lo, hi = self.get(target, rng)
        self[target] = (min(lo, rng[0]), max(hi, rng[1]))


def qparams(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero point) of asymmetric int8 for the range [lo, hi] (widened to contain 0), as TFLite computes them."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-12) / (QMAX - QMIN)
    zero_point = int(np.clip(round(QMIN - lo / scale), QMIN, QMAX))
    return scale, zero_point


def fake_quant(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``t`` quantized to asymmetric per-tensor int8 over [lo, hi] and dequantized (float32, same shape).

    torch's fused kernel (one pass; rounds ties to even where TFLite rounds them away from zero, which
    changes nothing measurable).
    """
    scale, zp = qparams(lo, hi)
    return torch.fake_quantize_per_tensor_affine(t, scale, zp, QMIN, QMAX)


def fake_quant_symmetric(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``t`` quantized to symmetric per-tensor 8 bits for the range [lo, hi] and dequantized (float32, same shape).

    torch's symmetric ``quint8`` (coremltools' activation scheme): zero point 128 of [0, 255], scale
    ``max(|lo|, |hi|) / 127.5``; the same grid as int8 with zero point 0.
    """
    scale = max(abs(lo), abs(hi), 1e-12) / ((QMAX - QMIN) / 2)
    return torch.fake_quantize_per_tensor_affine(t, scale, 0, QMIN, QMAX)


def fake_quant_rows(t: torch.Tensor, dims: int = 1) -> torch.Tensor:
    """Dynamic-range int8 of ``t``: asymmetric, one range per row over the last ``dims`` dims, each
    row's own [min, max] widened to include 0 (LiteRT's and XNNPACK's qd8 run-time quantization)."""
    shape = t.shape
    rows = t.reshape(*shape[: t.dim() - dims], -1)
    lo = rows.amin(-1, keepdim=True).clamp(max=0.0)
    hi = rows.amax(-1, keepdim=True).clamp(min=0.0)
    scale = (hi - lo).clamp_min(1e-12) / (QMAX - QMIN)
    zp = torch.clamp(torch.round(QMIN - lo / scale), QMIN, QMAX)
    return ((torch.clamp(torch.round(rows / scale) + zp, QMIN, QMAX) - zp) * scale).reshape(shape)


def _dynamic(t: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return fake_quant_rows(t.movedim(1, -1)).movedim(-1, 1)
    return fake_quant_rows(t)


@torch.no_grad()
def observe(model: nn.Module, points: Iterable[Point], images: Iterable[np.ndarray],
            per_image: int = 4096, seed: int = 0) -> dict[Point, Observation]:
    """Run float ``images`` (``[1, 3, H, W]`` float32 in [0, 1] each) and observe every point."""
    modules = dict(model.named_modules())
    obs: dict[Point, Observation] = {}
    g = torch.Generator().manual_seed(seed)
    handles = []
    for p in points:
        obs[p] = Observation()
        m = modules[p.layer]
        if p.where == "input":
            handles.append(m.register_forward_pre_hook(lambda mod, inp, o=obs[p]: o.add(inp[0], per_image, g)))
        else:
            handles.append(m.register_forward_hook(lambda mod, inp, out, o=obs[p]: o.add(out, per_image, g)))
    run_hooked(model, images, handles, "activation observation")
    return obs


def static_points(layers: Iterable[str]) -> list[Point]:
    """The points a static scheme quantizes: every listed layer's input and output."""
    return [Point(n, w) for n in layers for w in ("input", "output")]


@contextlib.contextmanager
def simulate(model: nn.Module, scheme: Literal["static", "dynamic"], layers: Iterable[str],
             ranges: Mapping[Point, tuple[float, float]] | None = None,
             dynamic_layers: Iterable[str] = (), symmetric: bool = False) -> Iterator[nn.Module]:
    """Fake-quantize ``layers``' activations of ``model`` in place while the context is open.

    ``static``: each layer's input and output with ``ranges`` (per point; on symmetric grids if
    ``symmetric``); ``dynamic``: each layer's input per row. ``dynamic_layers`` are dynamic in either
    scheme (the static recipes' classifier).
    Weights are not touched: pass a model whose weights are already rounded to the int8 grid.
    """
    modules = dict(model.named_modules())
    handles = []
    dyn = set(dynamic_layers)
    fq = fake_quant_symmetric if symmetric else fake_quant
    try:
        for name in layers:
            m = modules[name]
            if scheme == "dynamic" or name in dyn:
                handles.append(m.register_forward_pre_hook(lambda mod, inp: (_dynamic(inp[0], mod), *inp[1:])))
                continue
            if ranges is None:
                raise ValueError("a static simulation needs ranges")
            lo, hi = ranges[Point(name, "input")]
            handles.append(m.register_forward_pre_hook(
                lambda mod, inp, lo=lo, hi=hi: (fq(inp[0], lo, hi), *inp[1:])))
            lo, hi = ranges[Point(name, "output")]
            handles.append(m.register_forward_hook(lambda mod, inp, out, lo=lo, hi=hi: fq(out, lo, hi)))
        yield model
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class Scheme:
    """How a recipe quantizes activations, as simulated here: ``kind`` ``"static"``, ``"dynamic"`` or
    ``"weights"`` (weight-only: nothing to simulate); ``dynamic_layers`` are dynamic whatever the kind
    (LiteRT's static recipes keep the classifier dynamic-range); ``symmetric``: static grids with zero
    point 0 (Core ML W8A8)."""

    kind: Literal["static", "dynamic", "weights"]
    dynamic_layers: tuple[str, ...] = ()
    symmetric: bool = False


def simulated(model: nn.Module, layers: Iterable[str], scheme: Scheme,
              ranges: Mapping[Point, tuple[float, float]] | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable running ``model`` (weights as given) with ``layers``' activations fake-quantized by ``scheme``."""
    if scheme.kind == "weights":
        return model
    layers = list(layers)

    def run(x: torch.Tensor) -> torch.Tensor:
        with simulate(model, scheme.kind, layers, ranges, dynamic_layers=scheme.dynamic_layers,  # type: ignore[arg-type]
                      symmetric=scheme.symmetric):
            return model(x)

    return run
