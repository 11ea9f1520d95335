"""An accuracy target (``convert --min-sqnr DB``, ``--min-agreement FRACTION``): the fewest, most sensitive
layers stay float until the artifact meets it on held-out calibration images.

1. The recipe's artifact is built as usual and run on the held-out calibration images
   (`converters.calibrate.HeldOut`); if it meets the target, nothing changes. "Meets" is judged on a
   lower confidence bound, not on the held-out number itself (`estimate`): the evaluation images are
   other images, and 64 held-out ones measure an SQNR only to a few tenths of a dB (a build that met
   36 dB at 36.07 on held-out images measured 35.99 on the 1000 evaluation images).
2. Otherwise every quantized layer is ranked by its sensitivity: the end-to-end SQNR of the float model
   with that layer alone quantized as the recipe quantizes it (its rounded weights, and its activations
   simulated by the recipe's scheme, `converters.act_quant`). The lower that SQNR, the more the layer
   costs.
3. The smallest number ``k`` of top-ranked layers whose float versions make the *simulated* model meet
   the target is found by doubling and bisection; the artifact is rebuilt with them float (the other
   layers keep their rounded weights and ranges) and measured for real; while the real artifact misses,
   ``k`` grows.

Float here means what the format allows in place of int8: float32 (LiteRT, ExecuTorch) or fp16
(Core ML's programs). The manifest records the target, the layers it kept float, the held-out numbers
before and after, and what they cost in bytes and in measured latency.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from converters.act_quant import Scheme, simulated
from converters.calibrate import HeldOut, log_probabilities, measure
from converters.quant_plan import QuantPlan
from edge_convnext.errors import EdgeConvNextError
from edge_convnext.metrics import Fidelity, center, compare

REASON = "accuracy target"
RANK_IMAGES = 16  # held-out images per sensitivity simulation (59 layers at full size)
DEFAULT_CONFIDENCE = 0.9
BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class Estimate:
    """A held-out measurement and its one-sided lower confidence bounds (bootstrap over the images)."""

    fidelity: Fidelity
    sqnr_low_db: float
    agreement_low: float

    def to_dict(self) -> dict[str, Any]:
        f = self.fidelity
        return {"images": f.images, "sqnr_db": round(f.sqnr_db, 2), "top1_agreement": round(f.top1_agreement, 4),
                "sqnr_low_db": round(self.sqnr_low_db, 2), "top1_agreement_low": round(self.agreement_low, 4)}


def estimate(reference: np.ndarray, actual: np.ndarray, confidence: float) -> Estimate:
    """Fidelity of ``actual`` against ``reference`` (log-probabilities ``[N, classes]``) with the lower
    ``confidence`` bounds of its SQNR and top-1 agreement: percentiles of a seeded bootstrap over images.

    The SQNR is a ratio of sums over images (`edge_convnext.metrics.sqnr_db`), so each resample sums the
    per-image signal and error energies of the images it draws.
    """
    fid = compare(reference, actual)
    ref, act = center(reference), center(actual)
    signal = np.sum(ref**2, axis=1)
    error = np.sum((ref - act) ** 2, axis=1)
    agree = (np.argmax(ref, axis=1) == np.argmax(act, axis=1)).astype(np.float64)
    idx = np.random.default_rng(0).integers(0, len(ref), size=(BOOTSTRAP_SAMPLES, len(ref)))
    with np.errstate(divide="ignore"):
        sqnr = 10.0 * np.log10(signal[idx].sum(axis=1) / error[idx].sum(axis=1))
    q = 1.0 - confidence
    return Estimate(fid, float(np.quantile(sqnr, q)), float(np.quantile(agree[idx].mean(axis=1), q)))


@dataclass(frozen=True)
class AccuracyTarget:
    """What the artifact must reach (either bound may be None), judged on the lower ``confidence`` bound
    of its held-out calibration measurement (`estimate`)."""

    min_sqnr_db: float | None = None
    min_agreement: float | None = None
    confidence: float = DEFAULT_CONFIDENCE

    def __post_init__(self) -> None:
        if self.min_sqnr_db is None and self.min_agreement is None:
            raise ValueError("an accuracy target needs --min-sqnr or --min-agreement")
        if self.min_agreement is not None and not 0.0 < self.min_agreement <= 1.0:
            raise ValueError(f"--min-agreement is a fraction in (0, 1], got {self.min_agreement}")
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"--target-confidence is in [0.5, 1), got {self.confidence}")

    def met(self, e: Estimate) -> bool:
        return ((self.min_sqnr_db is None or e.sqnr_low_db >= self.min_sqnr_db)
                and (self.min_agreement is None or e.agreement_low >= self.min_agreement))

    def to_dict(self) -> dict[str, Any]:
        return {"min_sqnr_db": self.min_sqnr_db, "min_agreement": self.min_agreement,
                "confidence": self.confidence,
                "measured_on": "held-out calibration images (never evaluation images); met when the lower "
                               f"{self.confidence:.0%} bootstrap bound reaches the target"}


def with_float_layers(rounded: nn.Module, float_model: nn.Module, names: Sequence[str]) -> nn.Module:
    """A copy of ``rounded`` whose ``names`` layers have ``float_model``'s weights and biases back."""
    out = copy.deepcopy(rounded)
    mods, floats = dict(out.named_modules()), dict(float_model.named_modules())
    with torch.no_grad():
        for n in names:
            mods[n].weight.copy_(floats[n].weight)
            if floats[n].bias is not None:
                if mods[n].bias is None:
                    mods[n].bias = nn.Parameter(floats[n].bias.detach().clone())
                else:
                    mods[n].bias.copy_(floats[n].bias)
    return out


def rank_layers(float_model: nn.Module, rounded: nn.Module, plan: QuantPlan, scheme: Scheme,
                ranges: dict[Any, tuple[float, float]] | None, data: HeldOut,
                log: Callable[[str], None] = lambda s: None) -> list[tuple[str, float]]:
    """(layer, SQNR with that layer alone quantized), most sensitive (lowest SQNR) first.

    ``float_model``: the prepared model before weight rounding; ``rounded``: after it.
    """
    quick = data.first(RANK_IMAGES)
    out = []
    layers = plan.quantized
    for i, name in enumerate(layers, 1):
        alone = with_float_layers(rounded, float_model, [n for n in layers if n != name])
        out.append((name, measure(simulated(alone, [name], scheme, ranges), quick).sqnr_db))
        if i % 10 == 0 or i == len(layers):
            log(f"sensitivity: {i}/{len(layers)} layers simulated alone")
    return sorted(out, key=lambda kv: kv[1])


def smallest_k(ranked: Sequence[str], target: AccuracyTarget, meets: Callable[[int], bool], start: int = 1) -> int | None:
    """The smallest ``k >= start`` with ``meets(k)`` (assumed monotone), by doubling then bisection; None if
    even all of ``ranked`` float does not meet it."""
    n = len(ranked)
    lo, k = start - 1, start
    while k <= n and not meets(k):
        lo, k = k, k * 2
    if k > n:
        if lo >= n or not meets(n):
            return None
        k = n
    while k - lo > 1:  # meets(k), not meets(lo) (or lo below start)
        mid = (lo + k) // 2
        if meets(mid):
            k = mid
        else:
            lo = mid
    return k


def search(
    target: AccuracyTarget,
    plan: QuantPlan,
    float_model: nn.Module,
    rounded: nn.Module,
    scheme: Scheme,
    ranges: dict[Any, tuple[float, float]] | None,
    data: HeldOut,
    build_and_measure: Callable[[QuantPlan, nn.Module], tuple[Path, np.ndarray]],
    log: Callable[[str], None] = lambda s: None,
    max_builds: int = 6,
) -> tuple[QuantPlan, nn.Module, Path, dict[str, Any]]:
    """Run the target loop (module doc). ``build_and_measure(plan, model)`` builds an artifact from ``model``
    (layers float per ``plan``) at a fresh temporary path and returns it with its log-probabilities on
    ``data.held`` (``[N, classes]``).

    Returns the final plan, model, artifact path and the record for the manifest.
    """
    def judge(actual: np.ndarray) -> Estimate:
        return estimate(data.reference, actual, target.confidence)

    path, out = build_and_measure(plan, rounded)
    first = judge(out)
    record: dict[str, Any] = {**target.to_dict(), "before": first.to_dict(), "builds": 1}
    if target.met(first):
        log(f"accuracy target met without extra float layers ({_text(first)})")
        return plan, rounded, path, {**record, "met": True, "float_layers": [], "after": first.to_dict()}
    log(f"accuracy target missed ({_text(first)}): ranking {len(plan.quantized)} layers by sensitivity")
    ranked = rank_layers(float_model, rounded, plan, scheme, ranges, data, log)
    names = [n for n, _ in ranked]

    def model_for(k: int) -> nn.Module:
        return with_float_layers(rounded, float_model, names[:k])

    def sim_meets(k: int) -> bool:
        left = [n for n in plan.quantized if n not in set(names[:k])]
        e = judge(log_probabilities(simulated(model_for(k), left, scheme, ranges), data.held))
        log(f"  simulated with the {k} most sensitive layer(s) float: {_text(e)}")
        return target.met(e)

    # Every layer float is the float model, not a quantized recipe: at most all but one.
    most = len(names) - 1
    if most < 1:
        raise EdgeConvNextError(f"the accuracy target cannot be met: the recipe quantizes {len(names)} layer(s) only")
    k = min(smallest_k(names[:most], target, sim_meets) or most, most)
    builds = 1
    while True:
        new_plan = plan.with_float(names[:k], REASON)
        path, out = build_and_measure(new_plan, model_for(k))
        got = judge(out)
        builds += 1
        log(f"built with {k} more float layer(s): {_text(got)}")
        if target.met(got) or k >= most or builds >= max_builds:
            break
        k = min(most, max(k + 1, math.ceil(k * 1.5)))
    met = target.met(got)
    if not met:
        log(f"accuracy target NOT met with {k} of {len(names)} quantized layers float (at most {most}, "
            f"{max_builds} builds)")
    record.update({
        "met": met, "builds": builds, "after": got.to_dict(),
        "float_layers": names[:k],
        "sensitivity_alone_sqnr_db": {n: round(v, 2) for n, v in ranked},
        "ranked_on_images": min(RANK_IMAGES, len(data.held)),
    })
    return new_plan, model_for(k), path, record


def _text(e: Estimate) -> str:
    f = e.fidelity
    return (f"{f.sqnr_db:.2f} dB (lower bound {e.sqnr_low_db:.2f}), {100 * f.top1_agreement:.1f}% (lower bound "
            f"{100 * e.agreement_low:.1f}%) on {f.images} held-out images")


def check_supported(recipe_name: str, scheme: Scheme | None) -> Scheme:
    if scheme is None:
        raise EdgeConvNextError(f"{recipe_name}: the accuracy target needs a torch-side simulation of the recipe's "
                                "quantization to rank layers, and this recipe has none; build it without "
                                "--min-sqnr/--min-agreement")
    return scheme
