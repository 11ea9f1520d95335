"""Calibration images for quantized recipes: real images from the calibration split only."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np

from edge_convnext.dataset import Sample
from edge_convnext.errors import ImageError
from edge_convnext.preprocessing import Preprocessing, preprocess_file

log = logging.getLogger(__name__)

DEFAULT_CALIBRATION_IMAGES = 128


class CalibrationStream:
    """``stream(n)`` yields float32 ``[1, 3, 224, 224]`` in [0, 1] for the first ``n`` readable images
    (all of them when there are fewer).

    The split's order is fixed (sorted file names), so every build calibrates on the same images.
    Decoded images are cached: several recipes calibrate on the same set in one run.
    """

    def __init__(self, samples: Sequence[Sample], p: Preprocessing) -> None:
        self.samples = list(samples)
        self.p = p
        self._cache: dict[str, np.ndarray] = {}
        self.used_ids: list[str] = []

    def __call__(self, n: int) -> Iterator[np.ndarray]:
        if n > len(self.samples):  # a small user directory: use all of it (manifests record the count used)
            log.warning("asked for %d calibration images; using all %d there are", n, len(self.samples))
            n = len(self.samples)
        given = 0
        self.used_ids = []
        for s in self.samples:
            if given >= n:
                break
            if s.image_id not in self._cache:
                try:
                    self._cache[s.image_id] = preprocess_file(s.path, self.p)[None]
                except ImageError as e:
                    log.warning("skipping calibration image: %s", e)
                    continue
            self.used_ids.append(s.image_id)
            given += 1
            yield self._cache[s.image_id]
