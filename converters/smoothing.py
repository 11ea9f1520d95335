"""SmoothQuant-style migration of LayerNorm output ranges into the next layer's weights (exact).

In ConvNeXt every LayerNorm feeds one layer: each block's ``layernorm`` feeds ``pwconv1``, each
downsampling ``LayerNorm`` its 2x2 conv, the final ``norm`` the classifier. Per channel ``c`` the
LayerNorm computes ``y_c = g_c * n_c + b_c`` and the next layer multiplies channel ``c`` by its weight
column ``W[:, c]``. With a scale ``s_c > 0``::

    g'_c = g_c / s_c,  b'_c = b_c / s_c,  W'[:, c] = W[:, c] * s_c   =>   W' y' = W y

so the function is unchanged (a test checks float equality), while the per-tensor activation
quantizer sees ``y / s`` and the per-output-channel weight quantizer sees ``W s``. SmoothQuant (Xiao et
al. 2023) picks ``s_c = max|y_c|^a / max|W[:, c]|^(1-a)``: ``a = 0`` leaves the activations alone, ``a = 1``
flattens their channel ranges completely and pushes all of it into the weights. The migration
strength ``a`` is chosen per recipe by measurement on held-out calibration images
(`converters.calibrate`), never on evaluation images.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from converters.hooked import run_hooked


@dataclass(frozen=True)
class NormPair:
    """A LayerNorm (affine over channels) and the conv/linear layer that reads only its output."""

    norm: str
    layer: str


def norm_pairs(model: nn.Module) -> list[NormPair]:
    """Every (LayerNorm, next layer) pair of a ConvNeXt export model, in network order.

    The model's LayerNorms are ``stages.i.downsampling_layer.0`` (before conv ``...downsampling_layer.1``),
    ``stages.i.layers.j.layernorm`` (before ``...pwconv1``) and ``norm`` (before ``classifier``); the stem's
    LayerNorm feeds a depthwise conv and the residual stream, which cannot absorb a scale.
    """
    pairs = []
    for i, stage in enumerate(model.stages):
        if len(stage.downsampling_layer) == 2:
            pairs.append(NormPair(f"stages.{i}.downsampling_layer.0", f"stages.{i}.downsampling_layer.1"))
        for j, _ in enumerate(stage.layers):
            pairs.append(NormPair(f"stages.{i}.layers.{j}.layernorm", f"stages.{i}.layers.{j}.pwconv1"))
    pairs.append(NormPair("norm", "classifier"))
    return pairs


def _channels_absmax(t: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """max |x| per input channel of ``layer``'s input ``t`` (NCHW for a conv, channels last for a linear)."""
    if isinstance(layer, nn.Conv2d):
        return t.abs().amax(dim=(0, 2, 3))
    return t.abs().reshape(-1, t.shape[-1]).amax(0)


def _weight_absmax(layer: nn.Module) -> torch.Tensor:
    """max |W[:, c]| per input channel ``c``."""
    w = layer.weight.detach()
    return w.abs().amax(dim=(0, 2, 3)) if w.dim() == 4 else w.abs().amax(0)


@torch.no_grad()
def scale_input_channels(layer: nn.Module, s: torch.Tensor) -> None:
    """``W[:, c] *= s[c]`` in place for a conv (``[out, in, kh, kw]``) or linear (``[out, in]``); ``s``: ``[in]``."""
    shape = (1, -1, 1, 1) if layer.weight.dim() == 4 else (1, -1)
    layer.weight.copy_((layer.weight.to(torch.float64) * s.to(torch.float64).view(shape)).to(layer.weight.dtype))


@torch.no_grad()
def activation_absmax(model: nn.Module, pairs: list[NormPair], images: Iterable[np.ndarray]) -> dict[str, torch.Tensor]:
    """Per pair, ``max|y_c|`` of the LayerNorm output over ``images`` (float32 ``[1, 3, H, W]`` in [0, 1])."""
    modules = dict(model.named_modules())
    amax: dict[str, torch.Tensor] = {}

    def hook(name: str):  # noqa: ANN202
        def f(mod: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
            m = _channels_absmax(inp[0], mod)
            amax[name] = m if name not in amax else torch.maximum(amax[name], m)
        return f

    run_hooked(model, images, [modules[p.layer].register_forward_pre_hook(hook(p.layer)) for p in pairs], "smoothing")
    return amax


@torch.no_grad()
def smooth(model: nn.Module, amax: dict[str, torch.Tensor], alpha: float,
           pairs: list[NormPair] | None = None, skip: Iterable[str] = ()) -> tuple[nn.Module, int]:
    """(copy of ``model`` with every pair migrated at strength ``alpha``, pairs changed).

    ``amax``: `activation_absmax` of the same model. Pairs whose layer is in ``skip`` (layers kept
    float: nothing to gain) are left alone. ``alpha == 0`` returns an unchanged copy.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"migration strength must be in [0, 1], got {alpha}")
    model = copy.deepcopy(model)
    if alpha == 0.0:
        return model, 0
    modules = dict(model.named_modules())
    skip = set(skip)
    n = 0
    for p in pairs if pairs is not None else norm_pairs(model):
        if p.layer in skip:
            continue
        norm, layer = modules[p.norm], modules[p.layer]
        if norm.weight is None or norm.bias is None:
            raise ValueError(f"{p.norm} has no affine to migrate (the fold_norm_affine rewrite moved it into "
                             f"{p.layer}); give the recipe the smoothing option or that rewrite, not both")
        a = amax[p.layer].to(torch.float64).clamp_min(1e-5)
        wmax = _weight_absmax(layer).to(torch.float64).clamp_min(1e-5)
        s = (a ** alpha / wmax ** (1.0 - alpha)).clamp(1e-4, 1e4)
        norm.weight.copy_((norm.weight.to(torch.float64) / s).to(norm.weight.dtype))
        norm.bias.copy_((norm.bias.to(torch.float64) / s).to(norm.bias.dtype))
        scale_input_channels(layer, s)
        n += 1
    return model.eval(), n
