"""Exact rewrites of the export model, applied before any backend sees it.

Each pass takes the `converters.model.ExportClassifier` and returns a rewritten copy (the input is
never modified) that computes the same function up to float32 rounding; a test proves each one equal
within 1e-4 on the logits. They are backend-neutral, so TFLite, ExecuTorch and Core ML builders share
them through `apply` (recipe option ``rewrites``):

* ``fold_layer_scale``: each block's layer scale ``gamma * pwconv2(h)`` becomes ``pwconv2'(h)`` with
  ``W' = diag(gamma) W`` and ``b' = gamma * b``. It removes a broadcast ``mul`` per block, whose
  constant the XNNPACK and litert-torch quantizers quantize per tensor.
* ``tile_depthwise``: each block's 7x7 depthwise conv becomes the sum of 5x5 depthwise convs on
  shifted windows of the padded input (the kernel zero-extended to 10x10 and cut into 2x2 tiles of
  5x5). XNNPACK has fast depthwise microkernels for 3, 4, 9 and 25 taps but not 49: a 7x7
  (49-tap) depthwise conv falls back to a slow path in LiteRT (measured 4.6 ms against 0.25 ms for
  5x5 on 96 channels at 56x56), so four 25-tap convs and three adds beat one 49-tap conv.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEPTHWISE_TILE = 5


class TiledDepthwise(nn.Module):
    """A ``k x k`` depthwise conv (stride 1, symmetric padding ``p``) as a sum of ``t x t`` depthwise convs.

    float32 ``[N, C, H, W]`` -> ``[N, C, H, W]``. The kernel is zero-extended to ``n t x n t`` with
    ``n = ceil(k / t)``; tile (i, j) convolves (no padding) the window of the padded input that
    starts at row ``i t``, column ``j t``. The sum over tiles is the original convolution.
    """

    def __init__(self, conv: nn.Conv2d, tile: int) -> None:
        super().__init__()
        k, p = conv.kernel_size[0], conv.padding[0]
        c = conv.in_channels
        if not (conv.groups == c == conv.out_channels and conv.kernel_size == (k, k) and conv.stride == (1, 1)
                and conv.padding == (p, p) and conv.dilation == (1, 1) and 2 * p == k - 1):
            raise ValueError(f"only stride-1 'same' square depthwise convs can be tiled, got {conv}")
        n = math.ceil(k / tile)
        self.tile, self.pad, self.extra = tile, p, n * tile - k
        kernel = torch.zeros(c, 1, n * tile, n * tile, dtype=conv.weight.dtype)
        kernel[:, :, :k, :k] = conv.weight.detach()
        self.offsets: list[tuple[int, int]] = []
        pieces = []
        for i in range(n):
            for j in range(n):
                piece = nn.Conv2d(c, c, tile, groups=c, bias=(i == j == 0 and conv.bias is not None))
                with torch.no_grad():
                    piece.weight.copy_(kernel[:, :, i * tile:(i + 1) * tile, j * tile:(j + 1) * tile])
                    if piece.bias is not None:
                        piece.bias.copy_(conv.bias.detach())
                pieces.append(piece)
                self.offsets.append((i * tile, j * tile))
        self.pieces = nn.ModuleList(pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        p, e, t = self.pad, self.extra, self.tile
        xp = F.pad(x, (p, p + e, p, p + e))
        out = None
        for (a, b), piece in zip(self.offsets, self.pieces):
            y = piece(xp[:, :, a:a + h + t - 1, b:b + w + t - 1])
            out = y if out is None else out + y
        return out


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [layer for stage in model.stages for layer in stage.layers]


@torch.no_grad()
def fold_layer_scale(model: nn.Module) -> tuple[nn.Module, int]:
    """(copy of ``model`` with every block's layer scale folded into its ``pwconv2``, blocks changed)."""
    model = copy.deepcopy(model)
    n = 0
    for block in _blocks(model):
        gamma = getattr(block, "layer_scale_parameter", None)
        if gamma is None:
            continue
        g = gamma.detach().to(torch.float64)
        lin = block.pwconv2
        lin.weight.copy_((lin.weight.to(torch.float64) * g[:, None]).to(lin.weight.dtype))
        if lin.bias is not None:
            lin.bias.copy_((lin.bias.to(torch.float64) * g).to(lin.bias.dtype))
        block.layer_scale_parameter = None
        n += 1
    return model, n


def tile_depthwise(model: nn.Module, tile: int = DEPTHWISE_TILE) -> tuple[nn.Module, int]:
    """(copy of ``model`` with every block's depthwise conv larger than ``tile`` tiled, convs changed)."""
    model = copy.deepcopy(model)
    n = 0
    for block in _blocks(model):
        conv = block.dwconv
        if isinstance(conv, nn.Conv2d) and conv.kernel_size[0] > tile:
            block.dwconv = TiledDepthwise(conv, tile)
            n += 1
    return model, n


PASSES: dict[str, Callable[[nn.Module], tuple[nn.Module, int]]] = {
    "fold_layer_scale": fold_layer_scale,
    "tile_depthwise": tile_depthwise,
}


def apply(model: nn.Module, names: Sequence[str]) -> tuple[nn.Module, dict[str, int]]:
    """Run the named passes in order -> (rewritten copy, {pass: modules changed}) for the manifest."""
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise ValueError(f"unknown rewrite(s) {unknown}; known: {sorted(PASSES)}")
    counts: dict[str, int] = {}
    for name in names:
        model, counts[name] = PASSES[name](model)
    return model.eval(), counts
