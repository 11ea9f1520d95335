"""Exact rewrites of the export model, applied before any backend sees it.

Each pass takes the `converters.model.ExportClassifier` and returns a rewritten copy (the input is
never modified) that computes the same function up to float32 rounding; a test proves each one equal
within 1e-4 on the logits. They are backend-neutral, so TFLite, ExecuTorch and Core ML builders share
them through `apply` (recipe option ``rewrites``):

* ``fold_layer_scale``: each block's layer scale ``gamma * pwconv2(h)`` becomes ``pwconv2'(h)`` with
  ``W' = diag(gamma) W`` and ``b' = gamma * b``. It removes a broadcast ``mul`` per block, whose
  constant the XNNPACK and litert-torch quantizers quantize per tensor.
* ``split_depthwise``: each block's 7x7 depthwise conv becomes three depthwise convs centred on the
  same pixel, summed: the central 5x5 (25 taps), the top and bottom kernel rows (a 2x7 kernel with
  row dilation 6, 14 taps) and the outer columns of the middle rows (a 5x2 kernel with column
  dilation 6, 10 taps). 49 taps in all, each kernel exactly once, "same" padding (no PAD or SLICE
  op). XNNPACK runs depthwise kernels of up to 25 taps on fast unipass microkernels and a 49-tap one
  on a slow path: measured here in LiteRT (96 channels, 56x56, 2 threads) 3.7-3.9 ms for the 7x7
  against 0.96 ms for the three pieces and their two adds; on full ConvNeXt-T fp32, 67-69 ms -> 43-46
  ms. Three is the fewest: two kernels of at most 25 taps whose offset sets are products of (dilated)
  centred ranges cannot cover a 7x7.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn


class SplitDepthwise(nn.Module):
    """A ``k x k`` "same" depthwise conv (odd ``k >= 5``, stride 1) as three centred depthwise convs.

    float32 ``[N, C, H, W]`` -> ``[N, C, H, W]``. ``centre``: the inner ``(k-2) x (k-2)`` kernel
    (with the bias); ``rows``: kernel rows 0 and k-1 as a ``2 x k`` kernel, row dilation ``k-1``;
    ``cols``: columns 0 and k-1 of the inner rows as a ``(k-2) x 2`` kernel, column dilation ``k-1``.
    Every piece pads symmetrically by its own half extent, so each output pixel sees the same input
    pixels as the original kernel; the sum is the original convolution up to float rounding.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        k, p = conv.kernel_size[0], conv.padding[0]
        c = conv.in_channels
        if not (conv.groups == c == conv.out_channels and conv.kernel_size == (k, k) and conv.stride == (1, 1)
                and conv.padding == (p, p) and conv.dilation == (1, 1) and 2 * p == k - 1 and k >= 5):
            raise ValueError(f"only stride-1 'same' square depthwise convs of odd size >= 5 can be split, got {conv}")
        w = conv.weight.detach()
        r = k - 1  # the dilation that puts a 2-tap axis on kernel offsets -p and +p
        self.centre = nn.Conv2d(c, c, k - 2, padding=p - 1, groups=c, bias=conv.bias is not None)
        self.rows = nn.Conv2d(c, c, (2, k), padding=(p, p), dilation=(r, 1), groups=c, bias=False)
        self.cols = nn.Conv2d(c, c, (k - 2, 2), padding=(p - 1, p), dilation=(1, r), groups=c, bias=False)
        with torch.no_grad():
            self.centre.weight.copy_(w[:, :, 1:-1, 1:-1])
            if conv.bias is not None:
                self.centre.bias.copy_(conv.bias.detach())
            self.rows.weight.copy_(w[:, :, [0, k - 1], :])
            self.cols.weight.copy_(w[:, :, 1:-1][:, :, :, [0, k - 1]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.centre(x) + self.rows(x) + self.cols(x)


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


def split_depthwise(model: nn.Module) -> tuple[nn.Module, int]:
    """(copy of ``model`` with every block's 7x7 depthwise conv split (`SplitDepthwise`), convs changed)."""
    model = copy.deepcopy(model)
    n = 0
    for block in _blocks(model):
        conv = block.dwconv
        if isinstance(conv, nn.Conv2d) and conv.kernel_size[0] * conv.kernel_size[1] > 25:
            block.dwconv = SplitDepthwise(conv)
            n += 1
    return model, n


PASSES: dict[str, Callable[[nn.Module], tuple[nn.Module, int]]] = {
    "fold_layer_scale": fold_layer_scale,
    "split_depthwise": split_depthwise,
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
