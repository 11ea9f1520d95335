"""Ranges of every int8 activation tensor of a LiteRT graph, chosen by measurement on held-out images.

`tflite-int8-all` quantizes what the torch simulation does not model (LayerNorm's decomposition into
MEAN, SQUARED_DIFFERENCE, RSQRT, SUB, MUL and ADD, GELU, the residual adds), so its ranges cannot be
chosen on the torch side (`converters.prepare`). Here the float flatbuffer itself is observed
(`observe`): every tensor the calibrator ranged gets a value sample per statistics image, a
`converters.act_quant.RangeEstimator` turns the samples into ranges (`ranged`), and the backend builds
one artifact per estimator and keeps the one with the best SQNR on the held-out calibration images.

Why: with absolute min/max, a few flat image patches (per-pixel variance near 0) stretch the range of
the stem LayerNorm's squared differences and inverse standard deviations, so every other pixel is
normalised on a coarse grid. Simulated in NumPy on synthetic ConvNeXt-T (64 statistics images, 32
held out), the stem LayerNorm's int8 output measures 15.3 dB with min/max ranges, 23.2 dB with the
99.99th percentiles and 25.5 dB with the 99.9th.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from converters.act_quant import Observation, RangeEstimator


def observe(model: bytes, images: Iterable[np.ndarray], names: Iterable[str], per_image: int = 2048,
            seed: int = 0) -> dict[str, Observation]:
    """Run the float flatbuffer ``model`` on ``images`` (each its input tensor as fed, e.g. float32 NHWC
    ``[1, 224, 224, 3]``) and observe every tensor named in ``names`` (min, max, a value sample)."""
    from ai_edge_litert.interpreter import Interpreter

    wanted = set(names)
    with warnings.catch_warnings():  # reading every intermediate tensor is what the option is for
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors.*")
        interp = Interpreter(model_content=model, experimental_preserve_all_tensors=True,
                             num_threads=max(1, torch.get_num_threads()))
    interp.allocate_tensors()
    index = {d["name"]: d["index"] for d in interp.get_tensor_details() if d["name"] in wanted}
    missing = wanted - set(index)
    if missing:
        raise KeyError(f"{len(missing)} tensors to observe are not in the flatbuffer, e.g. {sorted(missing)[:3]}")
    feed = interp.get_input_details()[0]["index"]
    obs = {name: Observation() for name in index}
    g = torch.Generator().manual_seed(seed)
    seen = 0
    for x in images:
        interp.set_tensor(feed, np.asarray(x, dtype=np.float32))
        interp.invoke()
        for name, i in index.items():
            obs[name].add(torch.from_numpy(np.array(interp.get_tensor(i), dtype=np.float32)), per_image, g)
        seen += 1
    if seen == 0:
        raise ValueError("tensor observation got no calibration images")
    return obs


def ranged(qsvs: Mapping[str, dict[str, Any]], obs: Mapping[str, Observation],
           estimator: RangeEstimator) -> dict[str, dict[str, Any]]:
    """``qsvs`` (ai-edge-quantizer's per-tensor calibration values) with every observed tensor's min and
    max replaced by ``estimator``'s range of its observation; the others unchanged."""
    out = dict(qsvs)
    for name, o in obs.items():
        out[name] = with_range(qsvs[name], *estimator.range(o))
    return out


def with_range(qsv: Mapping[str, Any], lo: float, hi: float) -> dict[str, Any]:
    """One tensor's calibration values with min and max set to ``lo`` and ``hi`` (same shapes)."""
    return {**qsv, "min": np.full_like(np.asarray(qsv["min"], dtype=np.float32), lo),
            "max": np.full_like(np.asarray(qsv["max"], dtype=np.float32), hi)}
