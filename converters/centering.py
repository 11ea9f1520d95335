"""Centering a layer's input for symmetric activation quantization: an exact rewrite that depends on data.

A symmetric int8 grid (zero point 0, the scheme Core ML's W8A8 and the Neural Engine's int8-int8 path
take) spends half its steps on negative values. After GELU, ConvNeXt's ``pwconv2`` inputs lie in
``[-0.17, hi]``: a symmetric grid over ``[-hi, hi]`` has twice the step an asymmetric one would. Shifting
the input by the midpoint ``c`` of its range and adding ``W c`` to the layer's bias computes the same
function, ``W x + b = W (x - c) + (b + W c)``, while the quantizer in front of the layer sees a range
centred on zero and takes the asymmetric grid's step.

The shift is a `Shift` appended to the producer of the layer's input (the block's ``act``), so every
conv/linear keeps its torch name. ``c`` is a Python float: a traced graph carries it as a literal of
the ``sub``, which quantizers leave alone (a tensor constant would get its own quantizer).

Measured on synthetic ConvNeXt-T, the Core ML W8A8 scheme simulated on 64 held-out calibration images:
symmetric min/max ranges 29.1 dB, symmetric percentile 99.999 ranges 31.0 dB, the same with the
``pwconv2`` inputs centred 32.4 dB (asymmetric ranges: 32.6 dB).

A layer's output can be centred the other way (`center_outputs`): ``c`` taken off its bias, so it writes
``y - c`` and its output quantizer sees a centred range, and a `Restore` of ``c`` put in front of the
consumer that needs ``y`` (GELU, for ``pwconv1``). That is what makes the GELU floor
(`converters.act_quant.floor_gelu_inputs`) pay on a symmetric grid: a pre-GELU range floored to about
[-2.9, 6] and centred takes the step of an asymmetric grid over it. Simulated as above, percentile 99.999
with the ``pwconv2`` inputs centred: 32.41 dB; the pre-GELU ranges floored at a quarter step and centred
32.86 dB (floored, not centred: 32.40; floored at a half step 32.78, a whole step 32.48).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

# Layers whose input can be centred, as (layer suffix, the sibling module that produces the input).
_PRODUCERS = {"pwconv2": "act"}
# Layers whose output can be centred, as (layer suffix, the sibling module that reads the output).
_CONSUMERS = {"pwconv1": "act"}


class _Constant(nn.Module):
    """A module holding a Python float ``c``: a traced graph carries it as a literal, not a tensor constant."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = float(c)

    def extra_repr(self) -> str:
        return f"c={self.c:.6g}"


class Shift(_Constant):
    """``x - c`` for a constant ``c`` (any shape and layout in, the same out): centres a layer's input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.c


class Restore(_Constant):
    """``x + c`` for a constant ``c`` (any shape and layout in, the same out): gives a centred output its ``c``
    back in front of the consumer that needs the real values (`center_outputs`).

    Traced as an ``add`` of a float literal whatever the sign of ``c``, where a `Shift` is a ``sub``: the
    Core ML quantizer keeps the rounding before a `Restore` and drops the one before a `Shift`
    (`converters.backends.coreml_compress._unquantize`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c


def centerable(name: str) -> bool:
    """Whether layer ``name``'s input has a producer a `Shift` can follow."""
    return name.rsplit(".", 1)[-1] in _PRODUCERS


def midpoints(ranges: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """Each layer's centre: the midpoint of its input range ``(lo, hi)``."""
    return {name: (lo + hi) / 2 for name, (lo, hi) in ranges.items()}


@torch.no_grad()
def center_inputs(model: nn.Module, centers: Mapping[str, float]) -> nn.Module:
    """A copy of ``model`` in which each named layer's input is shifted by ``-c`` and its bias is ``b + W c``.

    ``model`` is not modified. `ValueError` for a layer whose input has no known producer or that has
    no bias to carry ``W c``.
    """
    return centred(model, inputs=centers)


@torch.no_grad()
def center_outputs(model: nn.Module, centers: Mapping[str, float]) -> nn.Module:
    """A copy of ``model`` in which each named layer writes ``y - c`` (``c`` taken off its bias) and its
    consumer reads ``y`` again through a `Restore` of ``c`` in front of it.

    ``model`` is not modified. `ValueError` for a layer whose output has no known consumer or that has no
    bias to carry ``-c``.
    """
    return centred(model, outputs=centers)


@torch.no_grad()
def centred(model: nn.Module, inputs: Mapping[str, float] | None = None,
            outputs: Mapping[str, float] | None = None) -> nn.Module:
    """A copy of ``model`` with ``inputs``' layers' inputs (`center_inputs`) and ``outputs``' layers' outputs
    (`center_outputs`) centred (layer name -> c); ``model`` itself when both are empty."""
    if not inputs and not outputs:
        return model
    out = copy.deepcopy(model)
    for layer, block, producer, c in _sites(out, inputs or {}, _PRODUCERS, "input", "producer to shift", "W c"):
        setattr(block, producer, nn.Sequential(getattr(block, producer), Shift(c)))
        # W c: the weight summed over everything but the output channel (Linear [out, in], 1x1 conv [out, in, 1, 1]).
        layer.bias.add_(layer.weight.to(torch.float64).flatten(1).sum(1).mul(c).to(layer.bias.dtype))
    for layer, block, consumer, c in _sites(out, outputs or {}, _CONSUMERS, "output",
                                            "consumer to shift back in front of", "-c"):
        setattr(block, consumer, nn.Sequential(Restore(c), getattr(block, consumer)))
        layer.bias.sub_(c)
    return out


def _sites(model: nn.Module, centers: Mapping[str, float], siblings: Mapping[str, str], what: str, sibling: str,
           carried: str) -> list[tuple[nn.Module, nn.Module, str, float]]:
    """(layer, its parent block, the sibling module's attribute, c) for each layer named in ``centers``, all checked
    before any is edited: a known ``siblings`` suffix and a bias to carry the shift."""
    modules = dict(model.named_modules())
    sites = []
    for name, c in centers.items():
        parent, _, leaf = name.rpartition(".")
        if leaf not in siblings or name not in modules:
            raise ValueError(f"cannot centre the {what} of {name!r}: only {sorted(siblings)} layers' {what}s have a "
                             f"{sibling}")
        layer = modules[name]
        if getattr(layer, "bias", None) is None:
            raise ValueError(f"cannot centre the {what} of {name!r}: it has no bias to carry {carried}")
        sites.append((layer, modules[parent] if parent else model, siblings[leaf], float(c)))
    return sites


def recentred(model: torch.nn.Module, choice: Mapping[str, Any]) -> torch.nn.Module:
    """``model`` with the centring a range choice recorded (``centered_inputs``, ``centered_outputs``: layer ->
    c) applied; ``model`` itself when there is none."""
    return centred(model, inputs=(choice.get("centered_inputs") or {}).get("centers"),
                   outputs=(choice.get("centered_outputs") or {}).get("centers"))
