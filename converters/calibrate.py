"""Quantization choices made by measurement on held-out calibration images, never on evaluation images.

The calibration images a build may use are split in two (`HeldOut.split`): the first ``fit`` images
set statistics (activation ranges, LayerNorm channel maxima, weight-rounding moments), the last
``held`` images, which set nothing, measure each candidate against the float model. A choice is the
candidate with the best SQNR of centered log-probabilities there (`edge_convnext.metrics.compare`, the
metric `eval` reports), and the manifest records every candidate's numbers with both image lists.

`choose` is generic: a candidate is a name and a function that returns a torch model (or any
callable) to measure. The recipes use it for the migration strength (`converters.smoothing`), the
activation range estimator (`converters.act_quant`) and, with an accuracy target, float layers
(`converters.accuracy_target`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edge_convnext.contract import OUTPUT_CONTRACTS
from edge_convnext.errors import EdgeConvNextError
from edge_convnext.metrics import Fidelity, compare

# Fewer held-out images than this and nothing is chosen: recipes keep their defaults (and say so).
MIN_HELD_OUT = 8
DEFAULT_HELD_OUT = 64


@dataclass(frozen=True)
class HeldOut:
    """Calibration images split into ``fit`` (statistics) and ``held`` (measurement), disjoint.

    Images are float32 ``[1, 3, 224, 224]`` in [0, 1]; ``reference`` holds the float model's
    log-probabilities on ``held``, float64 ``[len(held), classes]``.
    """

    fit: list[np.ndarray]
    fit_ids: list[str]
    held: list[np.ndarray]
    held_ids: list[str]
    reference: np.ndarray

    @classmethod
    def split(cls, images: Sequence[np.ndarray], ids: Sequence[str], float_model: torch.nn.Module,
              fit: int, held: int = DEFAULT_HELD_OUT) -> HeldOut:
        """The first ``fit`` images for statistics, the last ``held`` for measurement.

        With fewer images than ``fit + held`` (a small ``--calibration DIR``), a third of them (at
        least `MIN_HELD_OUT`) are held out and the rest fit; an `EdgeConvNextError` says when there are
        too few to hold any out.
        """
        n = len(images)
        if n != len(ids):
            raise ValueError("images and ids differ in length")
        if n < fit + held:
            held = max(MIN_HELD_OUT, n // 3)
            fit = n - held
        if fit < 1 or held < MIN_HELD_OUT:
            raise EdgeConvNextError(f"{n} calibration images cannot be split into images that set statistics "
                                    f"and at least {MIN_HELD_OUT} held out to choose on; pass more")
        held_imgs, held_ids = list(images[n - held:]), list(ids[n - held:])
        return cls(list(images[:fit]), list(ids[:fit]), held_imgs, held_ids, log_probabilities(float_model, held_imgs))

    def first(self, k: int) -> HeldOut:
        """The same split with only the first ``k`` held-out images (quicker measurements)."""
        return HeldOut(self.fit, self.fit_ids, self.held[:k], self.held_ids[:k], self.reference[:k])

    def to_dict(self) -> dict[str, Any]:
        return {"fit_images": len(self.fit_ids), "held_out_images": len(self.held_ids),
                "fit_ids": self.fit_ids, "held_out_ids": self.held_ids}


@torch.no_grad()
def log_probabilities(model: Callable[[torch.Tensor], torch.Tensor], images: Iterable[np.ndarray]) -> np.ndarray:
    """float64 ``[N, classes]`` log-probabilities of a probability-output model on ``images``."""
    out = [model(torch.from_numpy(np.asarray(x, dtype=np.float32))).detach().numpy() for x in images]
    return OUTPUT_CONTRACTS["probabilities"].log_scores(np.concatenate(out))


def measure(model: Callable[[torch.Tensor], torch.Tensor], data: HeldOut) -> Fidelity:
    """Fidelity of ``model`` (probabilities out) against the float model on the held-out images."""
    return compare(data.reference, log_probabilities(model, data.held))


@dataclass(frozen=True)
class Choice:
    """The chosen candidate and every candidate's held-out fidelity (for the manifest)."""

    chosen: str
    measured: Mapping[str, Fidelity]

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen,
                "candidates": {k: {"sqnr_db": round(f.sqnr_db, 2), "top1_agreement": round(f.top1_agreement, 4)}
                               for k, f in self.measured.items()}}


def choose(candidates: Mapping[str, Callable[[], Callable[[torch.Tensor], torch.Tensor]]], data: HeldOut,
           log: Callable[[str], None] = lambda s: None) -> Choice:
    """Measure every candidate on ``data.held``; the best SQNR wins (ties: the first listed)."""
    measured: dict[str, Fidelity] = {}
    for name, make in candidates.items():
        measured[name] = measure(make(), data)
        log(f"  {name}: {measured[name].sqnr_db:.2f} dB, top-1 agreement {100 * measured[name].top1_agreement:.1f}% "
            f"on {len(data.held)} held-out calibration images")
    best = max(measured, key=lambda k: measured[k].sqnr_db)
    return Choice(best, measured)
