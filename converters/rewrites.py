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
* ``fold_norm_affine``: each LayerNorm that feeds one conv or linear (`converters.smoothing.norm_pairs`:
  every block's ``layernorm`` -> ``pwconv1``, the downsampling LayerNorms -> their 2x2 stride-2 convs,
  the final ``norm`` -> the classifier) loses its affine ``g * n + b``, which the next layer takes as
  ``W' = W diag(g)`` (per input channel) and ``b' = b_next + W b`` (summed over the kernel taps for the
  unpadded 2x2 conv, where every output sees ``b`` at every tap). In an all-int8 graph
  (`tflite-int8-all`) it removes the LayerNorm's last MUL and ADD and with them two requantizations per
  LayerNorm. It leaves no LayerNorm affine for `converters.smoothing` to migrate (the next layer's input
  is then the normalized ``n`` whatever the strength). The stem's LayerNorm also feeds the residual
  stream and keeps its affine.
* ``fold_norm_mean`` (after ``fold_norm_affine``): each of those affine-free LayerNorms keeps only its
  scaling, ``x * rsqrt(var(x) + eps)`` (`ScaleNorm`), and the next layer's weights are centred over its
  input channels (``W' = W - mean_c W[:, c]``), so ``W' (x r) = W (x - mu) r``: the mean the output keeps
  is what ``W'`` ignores. In the all-int8 graph LiteRT's LayerNorm (MEAN, SQUARED_DIFFERENCE, MEAN, ADD,
  RSQRT, MUL, SUB, MUL, ADD) becomes MEAN, SUB, MUL, MEAN, ADD, RSQRT, MUL: the normalized output is
  written once instead of twice (``x * r``, then ``+ (-mu * r)``), each write a per-tensor requantization.
* ``channels_first``: every block computes in NCHW from end to end: ``pwconv1``/``pwconv2`` become 1x1
  convs (same names, same weights) and every LayerNorm over channels (each block's, the stem's and
  the downsampling ones) becomes `ChannelLayerNorm`, whose channel means are 1-output 1x1 convs. The
  transformers block permutes NCHW -> NHWC -> NCHW around its LayerNorm and linears; XNNPACK keeps
  convs NHWC internally, so ExecuTorch's graph then runs ~6 Transposes per block (measured with ETDump:
  3.2 ms of a 45 ms fp32 run, 2.1 ms of 18 ms int8). An all-conv block lets XNNPACK keep the whole
  network NHWC. litert-torch moves layouts itself and does not need it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from converters.smoothing import NormPair


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


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of float32 NCHW ``[N, C, H, W]``, with XNNPACK-delegable ops only.

    ``mu = conv1x1(x, 1/C)``, ``d = x - mu``, ``var = conv1x1(d*d, 1/C)``, ``d * rsqrt(var + eps) * w + b``
    (two-pass variance, as the reference LayerNorm). XNNPACK averages only the innermost two dims of a
    4-D tensor, so the channel means are 1-output 1x1 convolutions.
    """

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        (c,) = norm.normalized_shape
        self.eps = float(norm.eps)
        # Stored as [1, C, 1, 1]: indexing a [C] parameter in forward leaves unsqueeze ops that the
        # static-int8 export keeps outside the XNNPACK partition (18 of them in the tiny model).
        self.weight = None if norm.weight is None else nn.Parameter(norm.weight.detach().clone().reshape(1, c, 1, 1))
        self.bias = None if norm.bias is None else nn.Parameter(norm.bias.detach().clone().reshape(1, c, 1, 1))
        self.register_buffer("mean_kernel", torch.full((1, c, 1, 1), 1.0 / c), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x - F.conv2d(x, self.mean_kernel)
        var = F.conv2d(d * d, self.mean_kernel)
        y = d * torch.rsqrt(var + self.eps)
        y = y if self.weight is None else y * self.weight  # None after `fold_norm_affine`
        return y if self.bias is None else y + self.bias


class ScaleNorm(nn.Module):
    """A LayerNorm without its mean subtraction and affine: ``x * rsqrt(var(x) + eps)`` over channels.

    float32 ``[N, H, W, C]`` or ``[N, C]`` (channels last), or ``[N, C, H, W]`` for a ``channels_first``
    `ConvNextLayerNorm`, -> the same shape. Exact only in front of a layer whose weights sum to 0 over
    its input channels (`fold_norm_mean`), which then ignores the per-pixel mean the output keeps.
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.eps = float(norm.eps)
        self.channels_first = getattr(norm, "data_format", "channels_last") == "channels_first"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            x = x.permute(0, 2, 3, 1)
        d = x - x.mean(-1, keepdim=True)
        y = x * torch.rsqrt((d * d).mean(-1, keepdim=True) + self.eps)  # the two-pass variance, as LayerNorm's
        return y.permute(0, 3, 1, 2) if self.channels_first else y


class ChannelsFirstBlock(nn.Module):
    """A ConvNeXt block computing in NCHW throughout (float32 ``[N, C, H, W]`` -> same), submodule names kept.

    ``x + gamma * pwconv2(act(pwconv1(layernorm(dwconv(x)))))`` with 1x1-conv ``pwconv1``/``pwconv2``.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.dwconv = block.dwconv
        self.layernorm = ChannelLayerNorm(block.layernorm)
        self.pwconv1 = _as_conv1x1(block.pwconv1)
        self.act = block.act
        self.pwconv2 = _as_conv1x1(block.pwconv2)
        gamma = block.layer_scale_parameter
        self.layer_scale_parameter = None if gamma is None else nn.Parameter(gamma.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pwconv2(self.act(self.pwconv1(self.layernorm(self.dwconv(x)))))
        if self.layer_scale_parameter is not None:
            h = self.layer_scale_parameter[None, :, None, None] * h
        return x + h


def _as_conv1x1(linear: nn.Linear) -> nn.Conv2d:
    conv = nn.Conv2d(linear.in_features, linear.out_features, 1, bias=linear.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.detach()[:, :, None, None])
        if linear.bias is not None:
            conv.bias.copy_(linear.bias.detach())
    return conv


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
        g_rows = g.view(-1, *([1] * (lin.weight.dim() - 1)))  # a Linear's [out, in] or a 1x1 conv's [out, in, 1, 1]
        lin.weight.copy_((lin.weight.to(torch.float64) * g_rows).to(lin.weight.dtype))
        if lin.bias is not None:
            lin.bias.copy_((lin.bias.to(torch.float64) * g).to(lin.bias.dtype))
        block.layer_scale_parameter = None
        n += 1
    return model, n


@torch.no_grad()
def fold_norm_affine(model: nn.Module) -> tuple[nn.Module, int]:
    """(copy of ``model`` with each paired LayerNorm's affine folded into its next layer, LayerNorms changed)."""
    from converters.smoothing import norm_pairs, scale_input_channels  # the migration's pairs and scaling

    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    n = 0
    for pair in norm_pairs(model):
        norm, layer = modules[pair.norm], modules[pair.layer]
        if norm.weight is None and norm.bias is None:
            continue
        _require_dense(pair, layer, f"cannot take {pair.norm}'s affine exactly")
        if norm.bias is not None:  # first, with the unscaled W
            w = layer.weight.detach().to(torch.float64)
            b = norm.bias.detach().to(torch.float64)
            extra = torch.einsum("oihw,i->o", w, b) if w.dim() == 4 else w @ b  # [out]
            if layer.bias is None:
                layer.bias = nn.Parameter(extra.to(layer.weight.dtype))
            else:
                layer.bias.copy_((layer.bias.to(torch.float64) + extra).to(layer.bias.dtype))
        if norm.weight is not None:
            scale_input_channels(layer, norm.weight.detach())
        norm.weight, norm.bias, norm.elementwise_affine = None, None, False
        n += 1
    return model, n


def _require_dense(pair: NormPair, layer: nn.Module, why: str) -> None:
    """Refuse a padded or grouped conv after a LayerNorm: a fold into it is not exact (``why``: what fails)."""
    if isinstance(layer, nn.Conv2d) and (layer.padding != (0, 0) or layer.groups != 1):
        raise ValueError(f"{pair.layer}: a padded or grouped conv {why}")


@torch.no_grad()
def fold_norm_mean(model: nn.Module) -> tuple[nn.Module, int]:
    """(copy of ``model`` with each paired affine-free LayerNorm a `ScaleNorm`, its next layer's weights
    centred over input channels, LayerNorms changed).

    ``W (x - mu) r = W' x r`` with ``W' = W - mean_c W[:, c]`` (per output and kernel tap of the unpadded
    conv), since ``W' 1 = 0``. Needs `fold_norm_affine` first: an affine between the two breaks it.
    """
    from converters.smoothing import norm_pairs

    model = copy.deepcopy(model)
    n = 0
    for pair in norm_pairs(model):
        norm, layer = model.get_submodule(pair.norm), model.get_submodule(pair.layer)
        if not isinstance(norm, nn.LayerNorm):  # a ScaleNorm already, or channels_first's ChannelLayerNorm
            raise ValueError(f"{pair.norm} is a {type(norm).__name__}; fold_norm_mean takes the model's own "
                             "LayerNorms, once, before any layout pass")
        if norm.weight is not None or norm.bias is not None:
            raise ValueError(f"{pair.norm} still has its affine; run fold_norm_affine before fold_norm_mean")
        _require_dense(pair, layer, f"sees padding zeros, not {pair.norm}'s output")
        w = layer.weight.to(torch.float64)
        layer.weight.copy_((w - w.mean(dim=1, keepdim=True)).to(layer.weight.dtype))
        model.set_submodule(pair.norm, ScaleNorm(norm))
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


def channels_first(model: nn.Module) -> tuple[nn.Module, int]:
    """(copy of ``model`` with NCHW blocks and channel LayerNorms (see module doc), modules changed)."""
    scale_norms = [name for name, m in model.named_modules() if isinstance(m, ScaleNorm)]
    if scale_norms:
        raise ValueError(f"channels_first has no channel form of fold_norm_mean's ScaleNorm ({scale_norms[0]}); "
                         "give a recipe one of the two")
    model = copy.deepcopy(model)
    n = 0
    for stage in model.stages:
        for i, block in enumerate(stage.layers):
            stage.layers[i] = ChannelsFirstBlock(block)
            n += 1
        if len(stage.downsampling_layer) == 2:
            stage.downsampling_layer[0] = ChannelLayerNorm(stage.downsampling_layer[0])
            n += 1
    model.embeddings.layernorm = ChannelLayerNorm(model.embeddings.layernorm)
    return model, n + 1


# Passes that only change how the graph lays tensors out: no weight value and no layer name changes.
LAYOUT_PASSES = frozenset({"channels_first"})


def split_layout(passes: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(weight passes, layout passes) of ``passes``, each in the given order. Layout passes change no
    weight and no layer name, so they run after every choice and rounding (`converters.prepare`)."""
    return (tuple(p for p in passes if p not in LAYOUT_PASSES), tuple(p for p in passes if p in LAYOUT_PASSES))

PASSES: dict[str, Callable[[nn.Module], tuple[nn.Module, int]]] = {
    "fold_layer_scale": fold_layer_scale,
    "split_depthwise": split_depthwise,
    "fold_norm_affine": fold_norm_affine,
    "fold_norm_mean": fold_norm_mean,
    "channels_first": channels_first,
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
