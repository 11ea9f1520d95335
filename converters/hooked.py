"""Run a torch model over calibration images with forward hooks that collect statistics.

One loop for every statistics pass (activation observers, LayerNorm output maxima, weight-rounding
moments): the hooks are removed whatever happens, and an empty image stream is an error, never a
silently empty statistic.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


@torch.no_grad()
def run_hooked(model: nn.Module, images: Iterable[np.ndarray], handles: Iterable[RemovableHandle], what: str) -> int:
    """Run ``model`` on each of ``images`` (float32 ``[1, 3, H, W]`` in [0, 1]) while the already
    registered hooks ``handles`` collect; remove them afterwards. Returns the number of images run.

    Raises ``ValueError`` naming ``what`` when ``images`` is empty."""
    seen = 0
    try:
        for x in images:
            model(torch.from_numpy(np.asarray(x, dtype=np.float32)))
            seen += 1
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError(f"{what} got no calibration images")
    return seen
