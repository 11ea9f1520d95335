"""The export model as each recipe's backend receives it, prepared in one place for every backend.

For a recipe, in order (each step from its recipe options, each cached per run so recipes that ask for
the same share one result):

1. exact rewrites (``rewrites``, `converters.rewrites`);
2. the float-layer plan (``float_layers``, `converters.quant_plan`);
3. LayerNorm range migration (``smoothing``: the candidate strengths, `converters.smoothing`), its
   strength chosen on held-out calibration images with the recipe's activation scheme simulated
   (`converters.act_quant`) and min/max-rounded weights as a quick stand-in for the final rounding;
4. int8 weight rounding of the layers the plan quantizes (``weight_rounding``, `converters.weight_quant`);
5. activation ranges for static schemes (``activation_ranges``: the candidate estimators), chosen on
   the held-out images with the rounded weights; the backend stores them (LiteRT: its calibration
   values, by tensor). For symmetric schemes, the inputs of the layers ``center_inputs`` names are
   centred on their range's midpoint (`converters.centering`), within each candidate's measurement.
   With ``gelu_floor``, each estimator is also measured with the GELU inputs' ranges floored
   (`converters.act_quant.floor_gelu_inputs`); on a symmetric grid the floored ranges are also centred
   (`converters.centering.center_outputs`), or the floor would not change the grid's step.

Statistics come from the first calibration images, choices are measured on the last ones
(`converters.calibrate.HeldOut`); the backends calibrate on the statistics images only. Every choice
is recorded with its candidates' numbers and both image lists.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from converters import rewrites
from converters.centering import centerable, centred, midpoints, recentred
from converters.act_quant import (ESTIMATORS, Observation, Point, Scheme, floor_gelu_inputs, gelu_producers, observe,
                                  simulated, static_points)
from converters.calibrate import Choice, HeldOut, choose
from converters.calibration import CalibrationStream
from converters.quant_plan import QuantPlan
from converters.smoothing import activation_absmax, norm_pairs, smooth
from converters.weight_quant import WeightQuantConfig, prepare_weights
from edge_convnext.errors import EdgeConvNextError
from edge_convnext.recipes import ArtifactFormat, Recipe

# The activation scheme each quantized (format, precision) runs, as the torch simulation models it:
# (scheme, layers quantized dynamically whatever the scheme). LiteRT's static recipes make the
# classifier dynamic-range (`converters.backends.tflite`); ExecuTorch's and Core ML's quantize it statically.
SCHEMES: dict[tuple[ArtifactFormat, str], Scheme] = {
    (ArtifactFormat.TFLITE, "int8"): Scheme("static", ("classifier",)),
    (ArtifactFormat.TFLITE, "dynamic-int8"): Scheme("dynamic"),
    (ArtifactFormat.EXECUTORCH, "int8"): Scheme("static"),
    (ArtifactFormat.EXECUTORCH, "dynamic-int8"): Scheme("dynamic"),
    (ArtifactFormat.COREML, "w8a8"): Scheme("static", symmetric=True),
}


# Precisions whose activations are float (or int16, whose error the weights dominate): simulated by the
# rounded weights alone.
WEIGHT_ONLY = ("w8", "w8a16")


@dataclass
class PreparedModel:
    """What a backend receives: the model (float32 ``[1, 3, 224, 224]`` in [0, 1] -> probabilities), the
    plan, and the ranges chosen for its static activations (``{Point: (lo, hi)}``, or None)."""

    model: torch.nn.Module
    rewrites: dict[str, int]
    plan: QuantPlan
    float_model: torch.nn.Module | None = None  # ``model`` before weight rounding (after rewrites, migration, centring)
    weight_rounding: dict[str, Any] | None = None
    smoothing: dict[str, Any] | None = None
    activation_ranges: dict[Point, tuple[float, float]] | None = None
    ranges_choice: dict[str, Any] | None = None
    records: dict[str, Any] = field(default_factory=dict)

    def lowering_records(self) -> dict[str, Any]:
        """The manifest's ``lowering`` entries for what happened before the backend."""
        out: dict[str, Any] = {}
        if self.rewrites:
            out["rewrites"] = self.rewrites
        if self.plan.float_layers:
            out["float_layers"] = self.plan.to_dict()
        if self.smoothing is not None:
            out["smoothing"] = self.smoothing
        if self.weight_rounding is not None:
            out["weight_rounding"] = self.weight_rounding
        if self.ranges_choice is not None:
            out["activation_ranges"] = self.ranges_choice
        return out


class Preparation:
    """Prepares recipes' models for one `convert` run, caching every shared step (see module doc)."""

    def __init__(self, model: torch.nn.Module, calibration: CalibrationStream, calibration_count: int,
                 log: Callable[[str], None] = lambda s: None) -> None:
        self.model = model
        self.calibration = calibration
        self.calibration_count = calibration_count
        self.log = log
        self._rewritten: dict[tuple[str, ...], tuple[torch.nn.Module, dict[str, int]]] = {}
        self._smoothed: dict[tuple[Any, ...], tuple[torch.nn.Module, dict[str, Any]]] = {}
        self._rounded: dict[tuple[Any, ...], tuple[torch.nn.Module, dict[str, Any]]] = {}
        self._ranges: dict[tuple[Any, ...], tuple[dict[Point, tuple[float, float]], dict[str, Any]]] = {}
        self._held_out: HeldOut | None = None

    # -- the held-out split ----------------------------------------------------------------------

    def held_out(self) -> HeldOut:
        """The run's calibration images, split once into statistics and held-out images."""
        if self._held_out is None:
            n = self.calibration_count + 64
            images = list(self.calibration(n))
            ids = list(self.calibration.used_ids)
            self._held_out = HeldOut.split(images, ids, self.model, fit=self.calibration_count)
            self.log(f"choices on {len(self._held_out.held)} held-out calibration images; statistics from "
                     f"the first {len(self._held_out.fit)}")
        return self._held_out

    @property
    def statistics_images(self) -> int:
        """How many calibration images (from the first) a backend may calibrate on: never held-out ones."""
        return len(self._held_out.fit) if self._held_out is not None else self.calibration_count

    # -- the pipeline ----------------------------------------------------------------------------

    @staticmethod
    def scheme(recipe: Recipe) -> Scheme | None:
        """How ``recipe`` quantizes, as the torch simulation models it; None when it is not modelled (LiteRT's
        ``all`` scope quantizes LayerNorm and GELU too; Core ML palettizes inside the converted program)."""
        if recipe.options.get("int8_scope") == "all" and recipe.format is ArtifactFormat.TFLITE:
            return None
        found = SCHEMES.get((recipe.format, recipe.precision))
        if found is not None:
            return found
        if recipe.options.get("weight_rounding") is not None and recipe.precision in WEIGHT_ONLY:
            return Scheme("weights")
        return None

    @staticmethod
    def makes_choices(recipe: Recipe) -> bool:
        """Whether ``recipe`` chooses anything on held-out calibration images (here, or in its backend:
        option ``backend_choices`` names what the backend chooses on the run's `held_out` split)."""
        return bool(recipe.options.get("smoothing") or recipe.options.get("activation_ranges")
                    or recipe.options.get("backend_choices"))

    def prepare(self, recipe: Recipe) -> PreparedModel:
        # Layout rewrites (`rewrites.LAYOUT_PASSES`) change no weight and no layer name: they run last, so
        # recipes that differ only in layout share every choice and the weight rounding.
        requested = tuple(recipe.options.get("rewrites", ()))
        passes, layout = rewrites.split_layout(requested)
        if passes not in self._rewritten:
            self._rewritten[passes] = rewrites.apply(self.model, passes)
        model, counts = self._rewritten[passes]
        plan = QuantPlan.for_model(model, recipe.options.get("float_layers", ()))
        prepared = PreparedModel(model, dict(counts), plan)

        scheme = self.scheme(recipe)
        if scheme is not None:  # dynamic layers that are float do not change the simulation: one cache key
            scheme = dataclasses.replace(scheme, dynamic_layers=tuple(n for n in scheme.dynamic_layers if n in plan.quantized))
        smoothing = recipe.options.get("smoothing", {})
        alphas = tuple(smoothing.get("alphas", ()))
        if alphas:
            if scheme is None:
                raise EdgeConvNextError(f"{recipe.name}: smoothing needs a simulated activation scheme; "
                                        f"{recipe.format.key} {recipe.precision} has none")
            prepared.model, prepared.smoothing = self._smooth(model, passes, plan, scheme, alphas)

        prepared.float_model = prepared.model
        rounding = recipe.options.get("weight_rounding")
        if rounding is not None:
            cfg = WeightQuantConfig(**{**dict(rounding), "skip": tuple(rounding.get("skip", ())) + plan.float_layers})
            key = (passes, _alpha(prepared.smoothing), cfg)
            if key not in self._rounded:
                self.log(f"int8 weight rounding ({cfg.method}, bias correction {cfg.bias_correction}) on "
                         f"{cfg.images} calibration images")
                # Never on held-out images: at most the statistics images once the run is split.
                n = cfg.images if self._held_out is None else min(cfg.images, len(self._held_out.fit))
                q, rep = prepare_weights(prepared.model, self.calibration(n), cfg, self.log)
                rep.image_ids = list(self.calibration.used_ids)  # calibration images, never evaluation ones
                self._rounded[key] = (q, rep.to_dict())
            prepared.model, prepared.weight_rounding = self._rounded[key]

        estimators = tuple(recipe.options.get("activation_ranges", {}).get("estimators", ()))
        floor = recipe.options.get("activation_ranges", {}).get("gelu_floor")
        center = _centered(recipe, plan, scheme)
        if estimators:
            if scheme is None or scheme.kind != "static":
                raise EdgeConvNextError(f"{recipe.name}: activation range estimators apply to static schemes only")
            if floor is not None and not 0 < float(floor) <= 1:
                raise EdgeConvNextError(f"{recipe.name}: gelu_floor is a fraction of a quantization step in (0, 1]; got {floor!r}")
            key = (passes, _alpha(prepared.smoothing), rounding and WeightQuantConfig(**dict(rounding)),
                   plan.float_layers, scheme, estimators, center, floor)
            if key not in self._ranges:
                self._ranges[key] = self._choose_ranges(prepared.model, plan, scheme, estimators, center, floor)
            prepared.activation_ranges, prepared.ranges_choice, prepared.model = self._ranges[key]
            # The same function and structure: layers made float again take their float weights and biases.
            prepared.float_model = recentred(prepared.float_model, prepared.ranges_choice)
        elif center:
            raise EdgeConvNextError(f"{recipe.name}: center_inputs needs activation range estimators (the centres are "
                                    "the chosen ranges' midpoints)")
        elif floor is not None:
            raise EdgeConvNextError(f"{recipe.name}: gelu_floor needs activation range estimators (each is measured "
                                    "with and without the floor)")

        if layout:
            prepared.model, done = rewrites.apply(prepared.model, layout)
            prepared.float_model = rewrites.apply(prepared.float_model, layout)[0]
            prepared.rewrites.update(done)
        return prepared

    def simulation_ranges(self, prepared: PreparedModel, scheme: Scheme) -> dict[Point, tuple[float, float]] | None:
        """The static ranges the artifact uses: the recipe's chosen ones, else min/max on the statistics
        images (what the backends' calibrators compute); None for other schemes."""
        if scheme.kind != "static":
            return None
        if prepared.activation_ranges is not None:
            return prepared.activation_ranges
        static = [n for n in prepared.plan.quantized if n not in scheme.dynamic_layers]
        obs = observe(prepared.model, static_points(static), self.held_out().fit)
        return _ranges(obs, ESTIMATORS["minmax"])

    # -- steps -----------------------------------------------------------------------------------

    def _smooth(self, model: torch.nn.Module, passes: tuple[str, ...], plan: QuantPlan,
                scheme: Scheme, alphas: tuple[float, ...]) -> tuple[torch.nn.Module, dict[str, Any]]:
        key = (passes, plan.float_layers, scheme, alphas)
        if key in self._smoothed:
            return self._smoothed[key]
        data = self.held_out()
        pairs = norm_pairs(model)
        amax = activation_absmax(model, pairs, data.fit)
        self.log(f"choosing the LayerNorm migration strength among {list(alphas)} ({scheme.kind} activations simulated, "
                 "min/max-rounded weights)")
        models = {a: smooth(model, amax, a, pairs, skip=plan.float_layers) for a in alphas}
        quick = WeightQuantConfig(method="minmax", bias_correction=False, skip=plan.float_layers)

        def candidate(a: float) -> Callable[[], Callable[[torch.Tensor], torch.Tensor]]:
            def make() -> Callable[[torch.Tensor], torch.Tensor]:
                rounded, _ = prepare_weights(models[a][0], [], quick)
                return _simulated(rounded, plan, scheme, data, observe_on=data.fit[:32])
            return make

        choice = choose({_alpha_name(a): candidate(a) for a in alphas}, data, self.log)
        alpha = next(a for a in alphas if _alpha_name(a) == choice.chosen)
        smoothed, changed = models[alpha]
        record = {"alpha": alpha, "pairs_migrated": changed, "measured_with": f"{scheme.kind} activations simulated, "
                  "min/max-rounded weights", **choice.to_dict(), **data.to_dict()}
        self.log(f"LayerNorm migration strength {alpha} ({changed} LayerNorm/layer pairs)")
        self._smoothed[key] = (smoothed, record)
        return self._smoothed[key]

    def _choose_ranges(self, model: torch.nn.Module, plan: QuantPlan, scheme: Scheme, names: tuple[str, ...],
                       center: tuple[str, ...] = (), gelu_floor: float | None = None
                       ) -> tuple[dict[Point, tuple[float, float]], dict[str, Any], torch.nn.Module]:
        """(ranges, record, model): the chosen estimator's ranges for the model returned (``model`` itself, or
        with ``center``'s inputs centred on those ranges' midpoints, its ranges shifted to match).

        ``gelu_floor``: each estimator is a candidate twice, as it is and with its GELU inputs' ranges
        floored at that fraction of a step (`floor_gelu_inputs`); for a symmetric ``scheme`` the floored
        ranges are centred too (`center_outputs` of their layers)."""
        data = self.held_out()
        unknown = [n for n in names if n not in ESTIMATORS]
        if unknown:
            raise EdgeConvNextError(f"unknown activation range estimator(s) {unknown}; known: {list(ESTIMATORS)}")
        static = [n for n in plan.quantized if n not in scheme.dynamic_layers]
        self.log(f"observing {2 * len(static)} activation points on {len(data.fit)} calibration images")
        obs = observe(model, static_points(static), data.fit)
        ranges = {n: _ranges(obs, ESTIMATORS[n]) for n in names}
        floors: dict[str, dict[str, float]] = {}
        if gelu_floor is not None:
            pairs = gelu_producers(model, static)
            for n in names:
                ranges[_floored(n)], floors[_floored(n)] = floor_gelu_inputs(ranges[n], pairs, gelu_floor)
        # A symmetric grid's step is set by the larger end of a range: a floor pays only centred.
        outputs = {n: tuple(floors[n]) if scheme.symmetric and n in floors else () for n in ranges}
        centred = {n: _centre(model, r, center, outputs[n]) for n, r in ranges.items()}
        centred_outputs = max(map(len, outputs.values()), default=0)
        self.log(f"choosing the activation range estimator among {list(ranges)}"
                 + (f" ({len(center)} layer inputs centred)" if center else "")
                 + (f" (the floored candidates' {centred_outputs} GELU inputs centred)" if centred_outputs else ""))
        choice = choose({n: (lambda n=n: _simulated(centred[n][0], plan, scheme, data, centred[n][1])) for n in ranges},
                        data, self.log)
        record = {"estimator": choice.chosen, "points": len(ranges[choice.chosen]), **choice.to_dict(), **data.to_dict()}
        if choice.chosen in floors:
            record["gelu_floor"] = {"fraction_of_step": gelu_floor, "floors": floors[choice.chosen],
                                    "how": "the low end of each GELU input's range raised to where |GELU(x)| is that "
                                           "fraction of the step of GELU's output grid (converters.act_quant.floor_gelu_inputs)"}
        chosen_model, chosen_ranges, centers, out_centers = centred[choice.chosen]
        if centers:
            record["centered_inputs"] = {"centers": centers, "symmetric": scheme.symmetric,
                                         "how": "input shifted by -c after its producer, W c added to the bias "
                                                "(converters.centering); c: the midpoint of the chosen range"}
        if out_centers:
            record["centered_outputs"] = {"centers": out_centers, "symmetric": scheme.symmetric,
                                          "how": "c taken off the layer's bias, its consumer (GELU) reads the output "
                                                 "shifted back by +c (converters.centering.center_outputs); c: the "
                                                 "midpoint of the chosen (floored) range"}
        self.log(f"activation ranges: {choice.chosen}")
        return chosen_ranges, record, chosen_model


def _centered(recipe: Recipe, plan: QuantPlan, scheme: Scheme | None) -> tuple[str, ...]:
    """The quantized layers whose inputs ``recipe`` centres (option ``center_inputs``: fnmatch patterns)."""
    patterns = tuple(recipe.options.get("center_inputs", ()))
    if not patterns:
        return ()
    if scheme is None or not scheme.symmetric:
        raise EdgeConvNextError(f"{recipe.name}: center_inputs is for symmetric activation schemes only")
    names = tuple(n for n in plan.quantized if any(fnmatch.fnmatchcase(n, p) for p in patterns))
    bad = [n for n in names if not centerable(n)]
    if not names or bad:
        raise EdgeConvNextError(f"{recipe.name}: center_inputs {list(patterns)} must match quantized layers whose input "
                                f"can be shifted; got {bad or 'none'}")
    return names


def _centre(model: torch.nn.Module, ranges: dict[Point, tuple[float, float]], inputs: tuple[str, ...],
            outputs: tuple[str, ...] = ()
            ) -> tuple[torch.nn.Module, dict[Point, tuple[float, float]], dict[str, float], dict[str, float]]:
    """``model`` with ``inputs``' inputs and ``outputs``' outputs centred on their ranges' midpoints, the ranges
    shifted to match -> (model, ranges, input centres, output centres)."""
    centers = midpoints({n: ranges[Point(n, "input")] for n in inputs})
    out_centers = midpoints({n: ranges[Point(n, "output")] for n in outputs})
    by_point = {**{Point(n, "input"): c for n, c in centers.items()},
                **{Point(n, "output"): c for n, c in out_centers.items()}}
    shifted = {p: (lo - by_point.get(p, 0.0), hi - by_point.get(p, 0.0)) for p, (lo, hi) in ranges.items()}
    return centred(model, centers, out_centers), shifted, centers, out_centers


def _floored(estimator: str) -> str:
    return f"{estimator}, GELU floor"


def _ranges(obs: dict[Point, Observation], estimator: Any) -> dict[Point, tuple[float, float]]:
    return {p: estimator.range(o) for p, o in obs.items()}


def _simulated(model: torch.nn.Module, plan: QuantPlan, scheme: Scheme, data: HeldOut,
               ranges: dict[Point, tuple[float, float]] | None = None,
               observe_on: list[Any] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` with ``scheme``'s activations fake-quantized while called. A static scheme given no
    ranges takes min/max ranges observed on ``observe_on`` (statistics images, never held-out ones)."""
    if scheme.kind == "static" and ranges is None:
        static = [n for n in plan.quantized if n not in scheme.dynamic_layers]
        ranges = _ranges(observe(model, static_points(static), observe_on or data.fit), ESTIMATORS["minmax"])
    return simulated(model, plan.quantized, scheme, ranges)


def _alpha(smoothing: dict[str, Any] | None) -> float | None:
    return None if smoothing is None else float(smoothing["alpha"])


def _alpha_name(a: float) -> str:
    return f"alpha {a:g}"

