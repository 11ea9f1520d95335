"""Ranges of every int8 activation tensor of a LiteRT graph, chosen by measurement on held-out images.

`tflite-int8-all` quantizes what the torch simulation does not model (LayerNorm's decomposition into
MEAN, SQUARED_DIFFERENCE, RSQRT, SUB, MUL and ADD, GELU, the residual adds), so its ranges cannot be
chosen on the torch side (`converters.prepare`). Here the float flatbuffer itself is observed
(`observe`): every tensor the calibrator ranged gets a value sample per statistics image, and a
`converters.act_quant.RangeEstimator` turns the samples into ranges. The backend builds one artifact
per estimator and keeps the one with the best SQNR on the held-out calibration images; then, option
``per_group``, it chooses an estimator per role (`tensor_groups`: the op that writes a tensor and the
modules it came from) by coordinate descent (`choose_per_group`), each candidate built and measured.
`with_choice` writes a choice into ai-edge-quantizer's calibration values.

Why: with absolute min/max, a few flat image patches (per-pixel variance near 0) stretch the range of
the stem LayerNorm's squared differences and inverse standard deviations, so every other pixel is
normalised on a coarse grid. Simulated in NumPy on synthetic ConvNeXt-T (64 statistics images, 32
held out), the stem LayerNorm's int8 output measures 15.3 dB with min/max ranges, 23.2 dB with the
99.99th percentiles and 25.5 dB with the 99.9th. One estimator for all 537 tensors is a compromise:
per role, on the built artifact, 21.85 -> 22.74 dB on 64 held-out images (22.3 dB on the evaluation images).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from converters.act_quant import Observation
from converters.backends import tflite_flatbuffer as fb


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


def with_range(qsv: Mapping[str, Any], lo: float, hi: float) -> dict[str, Any]:
    """One tensor's calibration values with min and max set to ``lo`` and ``hi`` (same shapes)."""
    return {**qsv, "min": np.full_like(np.asarray(qsv["min"], dtype=np.float32), lo),
            "max": np.full_like(np.asarray(qsv["max"], dtype=np.float32), hi)}


def tensor_groups(model: bytes, names: Iterable[str]) -> dict[str, list[str]]:
    """The tensors ``names`` of the flatbuffer ``model`` grouped by role: the op type that writes them and
    the chain of torch module classes that op came from, e.g. ``"RSQRT in ExportClassifier/ConvNextLayerNorm"``
    (the stem's LayerNorm), ``"RSQRT in ExportClassifier/ConvNextStage/ConvNextLayer/ConvNextLayerNorm"`` (the
    blocks') or ``"ADD in ExportClassifier/ConvNextStage/ConvNextLayer/SplitDepthwise"``; graph inputs are
    ``"INPUT"``, tensors no op writes ``"CONSTANT"``. Groups are in the order of their first tensor in the flatbuffer.

    litert-torch names each tensor after the module calls that made it, one ``<module path>.<Class>_<attribute>``
    per call (``.../ConvNextStage_0/.../ConvNextLayer_0/....ConvNextLayerNorm_layernorm;5``); the classes
    every chain starts with are left out of the names while each chain keeps one (at full size the head's
    ops sit directly in ``ExportClassifier``, so it stays).
    """
    wanted = set(names)
    roles = [(name, op, () if op in ("INPUT", "CONSTANT") else _classes(name))  # (tensor, op, module classes)
             for name, op in fb.tensor_writers(model).items() if name in wanted]
    chains = [c for _, _, c in roles if c]
    common = 0
    while chains and all(len(c) > common + 1 and c[common] == chains[0][common] for c in chains):
        common += 1
    groups: dict[str, list[str]] = {}
    for name, op, chain in roles:
        key = f"{op} in {'/'.join(chain[common:])}" if chain else op
        groups.setdefault(key, []).append(name)
    return groups


def _classes(tensor_name: str) -> tuple[str, ...]:
    """The module classes in a litert-torch tensor name's scope path, outermost first."""
    out = []
    for part in tensor_name.split(";")[0].split("/"):
        leaf = part.rsplit(".", 1)[-1]
        cls = re.match(r"[A-Za-z][A-Za-z0-9]*(?=_)", leaf)
        if cls:
            out.append(cls.group(0))
    return tuple(out)


def with_choice(qsvs: Mapping[str, dict[str, Any]], groups: Mapping[str, Sequence[str]],
                ranges: Mapping[str, Mapping[str, tuple[float, float]]], choice: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """``qsvs`` with each group's tensors ranged by the estimator ``choice`` names for the group.

    ``ranges``: estimator name -> tensor name -> (lo, hi)."""
    out = dict(qsvs)
    for group, estimator in choice.items():
        for name in groups[group]:
            out[name] = with_range(qsvs[name], *ranges[estimator][name])
    return out


@dataclass(frozen=True)
class GroupSearch:
    """The result of `choose_per_group`: an estimator per group, the measured score, and the moves that
    improved it (group, estimator, score after) in the order taken."""

    choice: dict[str, str]
    score: float
    start_score: float
    measured: int
    moves: list[tuple[str, str, float]]


def choose_per_group(groups: Sequence[str], estimators: Sequence[str], start: str, start_score: float,
                     score: Callable[[dict[str, str]], float | None], passes: int = 2, min_gain: float = 0.05,
                     log: Callable[[str], None] = lambda s: None) -> GroupSearch:
    """Coordinate descent over the groups: from every group at ``start`` (measured: ``start_score``), try
    each other estimator for one group at a time (the others held) and keep it when ``score`` (higher is
    better; here the held-out SQNR of the built artifact) gains more than ``min_gain``; ``passes`` sweeps
    over all groups, fewer when a sweep changes nothing.

    ``score`` returns None for a candidate that builds an artifact measured before (it cannot gain: e.g.
    ops whose output shares its input's quantization, or a choice already rejected).
    """
    choice = dict.fromkeys(groups, start)
    best = first = start_score
    measured, moves = 0, []
    for sweep in range(passes):
        changed = False
        for i, group in enumerate(groups, 1):
            before = choice[group]
            for est in estimators:
                if est == choice[group]:
                    continue
                got = score({**choice, group: est})
                if got is None:
                    continue
                measured += 1
                if got > best + min_gain:
                    best, choice[group], changed = got, est, True
                    moves.append((group, est, got))
            # One line per group: the search runs for minutes at full size.
            kept = "kept" if choice[group] == before else "now"
            log(f"  pass {sweep + 1}, group {i}/{len(groups)}: {group}: {kept} {choice[group]} ({best:.2f}, "
                f"{measured} builds measured)")
        if not changed:
            break
        log(f"  pass {sweep + 1}: {best:.2f} after {measured} builds measured")
    return GroupSearch(choice, best, first, measured, moves)
