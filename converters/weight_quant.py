"""Torch-side int8 weight rounding that every backend's quantizer then stores exactly.

The backends quantize weights by min/max: per output channel, symmetric, ``scale = max|w| / 127``
(ai-edge-quantizer, the XNNPACK PT2E quantizer and coremltools' ``linear_symmetric`` all do). Rounding
each weight to its nearest step that way is the least accurate choice: it spends the grid on the one
largest weight and ignores how the layer's inputs weigh each error. `prepare_weights` instead chooses,
per layer, on calibration images:

* **the clipping** of each output channel (``scale = c * max|w| / 127`` with ``c`` searched to minimise
  the output error ``e^T H e``, ``H = E[x x^T]`` over the layer's calibration inputs), and
* **the rounding** (GPTQ, Frantar et al. 2022: columns are rounded in order and each rounding error is
  pushed onto the not-yet-rounded columns through ``H^-1``), then
* **bias correction**: ``b -= (W_q - W) E[x]``, so the rounding error does not shift the output mean.

The result is a float model whose weights already lie on such grids, with one weight per channel
at +-127 steps, so the backend's own min/max rule finds the same scale and re-rounds nothing (a
final min/max re-rounding inside `prepare_weights` makes that exact even where GPTQ left no weight
at the clip). Tests read the stored int8 weights back from each format and compare.

Layers are ``nn.Conv2d`` (dense or depthwise) and ``nn.Linear`` modules, named as in the torch model
(``stages.2.layers.4.pwconv1``), so the names are the same in every format and across rewrites.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from converters.hooked import run_hooked
from converters.quant_plan import quantizable_layers

QMAX = 127  # symmetric int8 weights: [-127, 127]
METHODS = ("minmax", "mse", "gptq")


@dataclass(frozen=True)
class WeightQuantConfig:
    """How `prepare_weights` rounds: ``method`` one of `METHODS`; ``images`` calibration images for the
    layer statistics; ``skip`` module names left as they are (layers a backend keeps in float)."""

    method: str = "gptq"
    bias_correction: bool = True
    images: int = 16
    skip: tuple[str, ...] = ()
    clip_grid: int = 64  # clipping ratios tried in [0.5, 1]
    damp: float = 0.01  # GPTQ: diagonal damping, fraction of mean(diag H)

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip", tuple(self.skip))  # hashable: build.py caches rounded models by config
        if self.method not in METHODS:
            raise ValueError(f"unknown weight rounding {self.method!r}; choose one of {METHODS}")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "bias_correction": self.bias_correction, "images": self.images,
                "skip": list(self.skip), "clip_grid": self.clip_grid, "damp": self.damp}


@dataclass
class LayerStats:
    """Second moments of one layer's inputs, as the rows its weight matrix multiplies.

    ``h`` float64 ``[G, K, K]`` (``G`` = channels for a depthwise conv, else 1), ``mean`` ``[G, K]``.
    """

    h: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    rows: int = 0

    def add(self, r: torch.Tensor) -> None:
        # float32 products per image (fast), accumulated in float64 across images
        h, m = (r.transpose(1, 2) @ r).to(torch.float64), r.sum(1, dtype=torch.float64)
        self.h = h if self.h is None else self.h + h
        self.mean = m if self.mean is None else self.mean + m
        self.rows += r.shape[1]

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.h is not None and self.mean is not None and self.rows
        return self.h / self.rows, self.mean / self.rows


@dataclass
class WeightQuantReport:
    config: WeightQuantConfig
    layers: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> {"sqnr_db", "clip"}
    image_ids: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        sq = [v["output_sqnr_db"] for v in self.layers.values() if "output_sqnr_db" in v]
        return {**self.config.to_dict(), "layers": len(self.layers), "image_ids": self.image_ids,
                "seconds": round(self.seconds, 1),
                "layer_output_sqnr_db": {"min": round(min(sq), 2), "median": round(float(np.median(sq)), 2)}
                if sq else None,
                "per_layer": self.layers}


def quantizable(model: nn.Module, skip: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """(name, module) of every conv and linear layer, in network order, minus ``skip``."""
    return [(n, m) for n, m in quantizable_layers(model) if n not in set(skip)]


def weight_rows(m: nn.Module) -> torch.Tensor:
    """A layer's weight as ``[G, R, K]``: one group per depthwise channel, else ``[1, out, in*k*k]``."""
    w = m.weight.detach()
    if isinstance(m, nn.Conv2d) and m.groups > 1:
        if m.groups != m.in_channels or m.out_channels != m.in_channels:
            raise ValueError(f"grouped conv {m} is neither dense nor depthwise")
        return w.reshape(w.shape[0], 1, -1)
    return w.reshape(1, w.shape[0], -1)


def input_rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as the rows its `weight_rows` multiply: ``[G, L, K]``."""
    if isinstance(m, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    u = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)  # [N, C*k*k, L]
    if m.groups == 1:
        return u.transpose(1, 2).reshape(1, -1, u.shape[1])
    k = m.kernel_size[0] * m.kernel_size[1]
    return u.reshape(x.shape[0], m.in_channels, k, -1).permute(1, 0, 3, 2).reshape(m.in_channels, -1, k)


def round_to_grid(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``w`` rounded to ``scale * [-127, 127]`` (``scale`` broadcast over the last axis)."""
    return torch.clamp(torch.round(w / scale), -QMAX, QMAX) * scale


def minmax_scale(w: torch.Tensor) -> torch.Tensor:
    """Per-row ``max|w| / 127``, ``[G, R, 1]``: the backends' own rule."""
    return w.abs().amax(-1, keepdim=True).clamp_min(1e-12) / QMAX


def clipped_scale(w: torch.Tensor, h: torch.Tensor | None, grid: int) -> torch.Tensor:
    """Per-row scale ``c * max|w| / 127``, ``c`` in [0.5, 1] minimising ``e^T H e`` (``e = q(w) - w``)."""
    top = minmax_scale(w)
    best_err, best = None, top
    for c in torch.linspace(0.5, 1.0, grid, dtype=w.dtype):
        s = top * c
        e = round_to_grid(w, s) - w
        err = (e * e).sum(-1) if h is None else torch.einsum("grk,gkl,grl->gr", e, h, e)
        if best_err is None:
            best_err, best = err, s
        else:
            better = (err < best_err)[..., None]
            best_err, best = torch.minimum(err, best_err), torch.where(better, s, best)
    return best


def gptq(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, damp: float, block: int = 128) -> torch.Tensor:
    """GPTQ rounding of ``w`` ``[G, R, K]`` on the grid ``scale`` ``[G, R, 1]``, input moments ``h`` ``[G, K, K]``."""
    scale = scale.to(torch.float64)
    return gptq_with(w, h, lambda col: round_to_grid(col, scale[..., 0]), damp, block)


def gptq_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of the damped ``H^-1`` ``[G, K, K]``, dead inputs bool ``[G, K]``): what
    GPTQ reads of ``h``; computed once when one layer is rounded several ways."""
    h = h.clone().to(torch.float64)
    k = h.shape[-1]
    eye = torch.eye(k, dtype=h.dtype)
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    dead = diag == 0  # an input that is always 0: its column does not matter
    h = h + dead[..., None] * eye
    h = h + damp * diag.mean(-1)[:, None, None] * eye
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True), dead


def gptq_with(w: torch.Tensor, h: torch.Tensor | None, round_column: Callable[[torch.Tensor], torch.Tensor],
              damp: float, block: int = 128,
              factor: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """GPTQ with any per-element rounding: ``round_column`` maps one float64 column ``[G, R]`` to its
    representable values (a uniform grid in `gptq`, a palette in Core ML's LUT rounding).
    ``factor``: `gptq_factor` of ``h`` (then ``h`` may be None)."""
    if factor is None:
        assert h is not None
        factor = gptq_factor(h, damp)
    u, dead = factor
    w = w.clone().to(torch.float64)
    g, _, k = w.shape
    w = w.masked_fill(dead[:, None, :], 0.0)
    q = torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, u1 = w[:, :, i1:i2].clone(), torch.zeros_like(w[:, :, i1:i2]), u[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, :, i]
            qc = round_column(col)
            q[:, :, i1 + i] = qc
            e = (col - qc) / u1[:, i, i][:, None]
            w1[:, :, i:] -= e[:, :, None] * u1[:, i, i:][:, None, :]
            err1[:, :, i] = e
        w[:, :, i2:] -= err1 @ u[:, i1:i2, i2:]
    return q.to(torch.float32)


def collect_stats(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], images: Iterable[np.ndarray],
                  what: str = "weight rounding") -> dict[str, LayerStats]:
    """Run float ``images`` (``[1, 3, H, W]`` float32 in [0, 1] each) and gather every layer's input moments.

    ``what`` names the caller in the error raised when ``images`` is empty."""
    stats = {n: LayerStats() for n, _ in layers}
    run_hooked(model, images, [m.register_forward_pre_hook(lambda mod, inp, n=n: stats[n].add(input_rows(mod, inp[0])))
                               for n, m in layers], what)
    return stats


@torch.no_grad()
def prepare_weights(model: nn.Module, images: Iterable[np.ndarray], cfg: WeightQuantConfig,
                    log: Callable[[str], None] = lambda s: None) -> tuple[nn.Module, WeightQuantReport]:
    """(copy of ``model`` with int8-grid conv/linear weights, report). ``model`` is not modified."""
    t0 = time.perf_counter()
    model = copy.deepcopy(model).eval()
    layers = quantizable(model, cfg.skip)
    report = WeightQuantReport(cfg)
    stats: dict[str, LayerStats] = {}
    if cfg.method != "minmax" or cfg.bias_correction:
        stats = collect_stats(model, layers, images)
    for i, (name, m) in enumerate(layers):
        w = weight_rows(m)
        h, mean = stats[name].finish() if name in stats else (None, None)
        if cfg.method == "minmax":
            q = round_to_grid(w, minmax_scale(w))
        else:
            scale = clipped_scale(w, None if h is None else h.to(w.dtype), cfg.clip_grid)
            q = round_to_grid(w, scale) if cfg.method == "mse" else gptq(w, h, scale, cfg.damp)
        q = round_to_grid(q, minmax_scale(q))  # exactly what a min/max quantizer will store
        e = (q - w).to(torch.float64)
        if cfg.bias_correction and mean is not None:
            shift = torch.einsum("grk,gk->gr", e, mean).reshape(-1).to(torch.float32)
            if m.bias is None:
                m.bias = nn.Parameter(-shift)
            else:
                m.bias.sub_(shift)
        report.layers[name] = _layer_record(w, e, h)
        m.weight.copy_(q.reshape(m.weight.shape))
        if (i + 1) % 10 == 0 or i + 1 == len(layers):
            log(f"int8 weight rounding ({cfg.method}): {i + 1}/{len(layers)} layers")
    report.seconds = time.perf_counter() - t0
    return model, report


def _layer_record(w: torch.Tensor, e: torch.Tensor, h: torch.Tensor | None) -> dict[str, float]:
    """Weight SQNR and, with input moments, the output SQNR ``w^T H w / e^T H e`` of one layer."""
    w64 = w.to(torch.float64)
    out = {"weight_sqnr_db": _db(float((w64 * w64).sum()), float((e * e).sum()))}
    if h is not None:
        sig = float(torch.einsum("grk,gkl,grl->", w64, h, w64))
        noise = float(torch.einsum("grk,gkl,grl->", e, h, e))
        out["output_sqnr_db"] = _db(sig, noise)
    return out


def _db(signal: float, noise: float) -> float:
    return round(10 * math.log10(signal / noise), 2) if noise > 0 else float("inf")
