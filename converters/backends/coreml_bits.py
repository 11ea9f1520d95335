"""Mixed-precision weight storage for ``coreml-p4``: measure each layer, then spend a byte budget.

Core ML stores a conv/linear weight as a palette (``constexpr_lut_to_dense``: 2^n fp16 entries and
n-bit indices, one palette per tensor or per group of output channels), as int8 with a per-channel
scale (``constexpr_affine_dequantize``) or as dense fp16. This module decides, per layer, which one,
on the torch side, in three steps:

1. **Rounding** (`round_layer`): every candidate storage of a layer is computed as the float weights
   it will hold. Palettes are weighted 1-D k-means (each weight weighted by its input's energy, the
   diagonal of ``H = E[x x^T]``), rounded to fp16 (the program stores fp16 entries), and the weights
   are assigned to palette entries by GPTQ (`converters.weight_quant.gptq_with`: each rounding error
   is pushed onto the columns not yet rounded), then the bias absorbs the mean output shift. int8
   takes the shared GPTQ rounding of `converters.weight_quant` (min/max grid, so coremltools stores
   it as is). ``H`` and the input means come from the first calibration images (the statistics).
2. **Sensitivity** (`measure_sensitivity`): each candidate of each layer is swapped into the float
   model alone, and the squared error of the centered log-probabilities on *held-out* calibration
   images (never the statistics images, never evaluation images) is recorded. Only the part of the
   network after the layer is recomputed.
3. **Allocation** (`allocate`): the candidates that minimise the summed error under the byte budget
   (a multiple-choice knapsack, solved exactly by dynamic programming over 4 KB steps). Errors of
   different layers add up nearly independently, which the build checks by measuring the allocated
   model on the same held-out images (predicted vs measured SQNR in the manifest).

The palettized weights then hold at most 2^n distinct fp16 values per palette, so coremltools'
``mode="unique"`` palettization stores exactly them (tests read the stored weights back).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from converters.weight_quant import (
    LayerStats,
    clipped_scale,
    gptq_factor,
    gptq_with,
    minmax_scale,
    round_to_grid,
    weight_rows,
)
from edge_convnext.metrics import center

BLOB_OVERHEAD = 128  # bytes per tensor in weight.bin: 64-byte aligned blob plus its header
_DP_BINS = 16384  # byte resolution of the knapsack: budget / bins (about 1 KB at 16 MB)


@dataclass(frozen=True)
class Storage:
    """One way to store a layer's weight: ``kind`` ``"lut"`` (``nbits``, ``group_size`` output
    channels per palette, 0 = one palette per tensor), ``"int8"`` or ``"fp16"``."""

    kind: str
    nbits: int = 16
    group_size: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("lut", "int8", "fp16"):
            raise ValueError(f"unknown weight storage {self.kind!r}; choose lut, int8 or fp16")
        if self.kind == "lut" and self.nbits not in (1, 2, 3, 4, 6, 8):
            raise ValueError(f"Core ML palettes have 1, 2, 3, 4, 6 or 8 bits, not {self.nbits}")

    @classmethod
    def parse(cls, text: str, group_size: int = 16) -> Storage:
        """``"lut4"`` (per tensor), ``"lut4g"`` (grouped, ``group_size`` channels), ``"int8"``, ``"fp16"``."""
        if text in ("int8", "fp16"):
            return cls(text, 8 if text == "int8" else 16)
        if text.startswith("lut"):
            grouped = text.endswith("g")
            return cls("lut", int(text[3:-1] if grouped else text[3:]), group_size if grouped else 0)
        raise ValueError(f"unknown weight storage {text!r}; e.g. lut3, lut4, lut4g, lut6, int8, fp16")

    @property
    def name(self) -> str:
        if self.kind != "lut":
            return self.kind
        return f"lut{self.nbits}" + ("g" if self.group_size else "")

    @property
    def grouped(self) -> bool:
        return self.kind == "lut" and self.group_size > 0

    @property
    def target(self) -> str:
        """The oldest deployment target that stores it: iOS16's ``constexpr_lut_to_dense`` takes one
        palette of 2, 4, 16, 64 or 256 entries; grouped palettes and 3-bit ones need iOS18."""
        return "iOS18" if self.grouped or (self.kind == "lut" and self.nbits == 3) else "iOS16"

    def groups(self, out_channels: int) -> int:
        """Palettes of a tensor with ``out_channels`` rows (a group size that does not divide the
        channels falls back to their gcd, e.g. 8 for the 1000-class head)."""
        return out_channels // math.gcd(out_channels, self.group_size) if self.grouped else 1

    def nbytes(self, shape: Sequence[int]) -> int:
        """Bytes this storage takes in the package for a weight of ``shape`` (output channels first)."""
        n, rows = math.prod(shape), int(shape[0])
        if self.kind == "fp16":
            return 2 * n + BLOB_OVERHEAD
        if self.kind == "int8":  # int8 data, fp16 scale and int8 zero point per channel
            return n + 3 * rows + 3 * BLOB_OVERHEAD
        return math.ceil(n * self.nbits / 8) + self.groups(rows) * (2 ** self.nbits) * 2 + 2 * BLOB_OVERHEAD


@dataclass
class Rounded:
    """A layer's weight as one `Storage` holds it: ``weight`` float32 in the layer's weight shape,
    ``bias_shift`` float32 ``[out]`` to subtract from the bias (bias correction; zeros when off)."""

    storage: Storage
    weight: torch.Tensor
    bias_shift: torch.Tensor
    output_sqnr_db: float  # w^T H w / e^T H e on the statistics images


def _row_groups(shape_grc: tuple[int, int, int], storage: Storage, out_channels: int) -> torch.Tensor:
    """Palette index of each row of a ``[G, R, K]`` weight (output channel ``g * R + r``): long ``[G, R]``."""
    g, r, _ = shape_grc
    channel = torch.arange(g * r).reshape(g, r)
    return channel // (out_channels // storage.groups(out_channels))


def fit_palettes(w: torch.Tensor, importance: torch.Tensor, groups: torch.Tensor, nbits: int,
                 iters: int = 100) -> torch.Tensor:
    """Weighted 1-D k-means palettes, rounded to fp16: float64 ``[P, 2^nbits]``, sorted.

    ``w`` ``[G, R, K]``; ``importance`` ``[G, K]`` (the energy of each weight's input, so the palette
    spends its entries where errors cost output); ``groups`` long ``[G, R]``, palette of each row.
    Lloyd iterations on sorted values: a cluster is a contiguous run, so its weighted sum is a
    difference of prefix sums and one iteration costs a search per entry, not a pass over the weights.
    """
    size = 2 ** nbits
    v = w.to(torch.float64)
    wt = importance.to(torch.float64)[:, None, :].expand_as(v).clamp_min(1e-12)
    n_pal = int(groups.max()) + 1
    pal = groups[..., None].expand_as(v).reshape(-1)
    order = torch.argsort(pal, stable=True)
    vals, wts = v.reshape(-1)[order].reshape(n_pal, -1), wt.reshape(-1)[order].reshape(n_pal, -1)
    vals, idx = vals.sort(dim=1)
    wts = torch.gather(wts, 1, idx)
    zero = torch.zeros(n_pal, 1, dtype=torch.float64)
    cw = torch.cat([zero, wts.cumsum(1)], 1)  # [P, n + 1] prefix sums
    cwv = torch.cat([zero, (wts * vals).cumsum(1)], 1)
    n = vals.shape[1]
    # start at weighted quantiles
    qs = ((torch.arange(size, dtype=torch.float64) + 0.5) / size * cw[:, -1:]).contiguous()
    c = torch.gather(vals, 1, torch.searchsorted(cw[:, 1:].contiguous(), qs).clamp_max(n - 1))
    for _ in range(iters):
        c = c.sort(dim=1).values
        cut = torch.searchsorted(vals, ((c[:, 1:] + c[:, :-1]) / 2).contiguous())  # first index of clusters 1..
        edges = torch.cat([torch.zeros(n_pal, 1, dtype=torch.long), cut, torch.full((n_pal, 1), n)], 1)
        num = torch.gather(cwv, 1, edges[:, 1:]) - torch.gather(cwv, 1, edges[:, :-1])
        den = torch.gather(cw, 1, edges[:, 1:]) - torch.gather(cw, 1, edges[:, :-1])
        new = torch.where(den > 0, num / den.clamp_min(1e-300), c)
        done = torch.equal(new, c)  # converged: no entry moved
        c = new
        if done:
            break
    # fp16 entries: the program stores the palette in fp16, so the torch model holds the same values
    return c.to(torch.float16).to(torch.float64).sort(dim=1).values


def nearest(col: torch.Tensor, rows_palette: torch.Tensor) -> torch.Tensor:
    """Each value of ``col`` ``[G, R]`` rounded to the nearest entry of its row's sorted palette ``[G, R, P]``."""
    mids = (rows_palette[..., 1:] + rows_palette[..., :-1]) / 2
    i = torch.searchsorted(mids.contiguous(), col[..., None].contiguous())
    return torch.gather(rows_palette, -1, i)[..., 0]


def _energy(e: torch.Tensor, h: torch.Tensor) -> float:
    """``sum_r e_r^T H e_r`` over a ``[G, R, K]`` weight error (float32: it only ranks candidates)."""
    e32 = e.to(torch.float32)
    return float(((e32 @ h.to(torch.float32)) * e32).sum())


def round_layer(m: nn.Module, h: torch.Tensor, mean: torch.Tensor, storage: Storage, damp: float = 0.01,
                bias_correction: bool = True, clip_grid: int = 64,
                factor: tuple[torch.Tensor, torch.Tensor] | None = None, signal: float | None = None) -> Rounded:
    """The weight of conv/linear ``m`` as ``storage`` holds it, rounded against its input moments.

    ``h`` float64 ``[G, K, K]`` and ``mean`` ``[G, K]`` (`LayerStats.finish` of the layer's inputs);
    ``factor`` (`gptq_factor` of ``h``) and ``signal`` (``w^T H w``) when one layer is rounded
    several ways, so they are computed once.
    """
    w = weight_rows(m)
    if factor is None and storage.kind != "fp16":
        factor = gptq_factor(h, damp)
    if storage.kind == "fp16":
        q = w.to(torch.float16).to(torch.float32)
    elif storage.kind == "int8":  # the shared int8 rounding: clipping by output error, GPTQ, min/max grid
        scale = clipped_scale(w, h.to(w.dtype), clip_grid).to(torch.float64)
        q = gptq_with(w, None, lambda col: round_to_grid(col, scale[..., 0]), damp, factor=factor)
        q = round_to_grid(q, minmax_scale(q))
    else:
        groups = _row_groups(tuple(w.shape), storage, m.weight.shape[0])
        palettes = fit_palettes(w, torch.diagonal(h, dim1=-2, dim2=-1), groups, storage.nbits)
        rows_palette = palettes[groups]  # [G, R, P]
        q = gptq_with(w, None, lambda col: nearest(col, rows_palette), damp, factor=factor)
    e = q.to(torch.float64) - w.to(torch.float64)
    shift = torch.einsum("grk,gk->gr", e, mean).reshape(-1).to(torch.float32) if bias_correction \
        else torch.zeros(m.weight.shape[0])
    sig = _energy(w, h) if signal is None else signal
    noise = _energy(e, h)
    db_ = 10 * math.log10(sig / noise) if noise > 0 else float("inf")
    return Rounded(storage, q.reshape(m.weight.shape).to(torch.float32), shift, round(db_, 2))


def apply_rounded(model: nn.Module, chosen: dict[str, Rounded]) -> nn.Module:
    """A copy of ``model`` with each named layer's weight (and bias correction) from ``chosen``."""
    model = copy.deepcopy(model).eval()
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, r in chosen.items():
            _set(mods[name], r)
    return model


def _set(m: nn.Module, r: Rounded) -> None:
    m.weight.copy_(r.weight)
    if bool(r.bias_shift.any()):
        if m.bias is None:
            m.bias = nn.Parameter(-r.bias_shift.clone())
        else:
            m.bias.sub_(r.bias_shift)


# ---- sensitivity: one layer at a time, end to end ------------------------------------------------


class SegmentRunner:
    """Runs `converters.model.ExportClassifier` from any block on, from cached float inputs.

    Segments in order: stem (patch embedding + LayerNorm), then per stage its downsampling layer and
    each block, then the head. Quantizing a layer only changes its segment and the ones after it.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor) -> None:
        self.model = model
        segs: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = [
            ("embeddings", lambda x: model.embeddings.layernorm(model.embeddings.patch_embeddings(x)))]
        for i, stage in enumerate(model.stages):
            segs.append((f"stages.{i}.downsampling_layer", lambda x, mods=stage.downsampling_layer: _chain(mods, x)))
            for j, layer in enumerate(stage.layers):
                segs.append((f"stages.{i}.layers.{j}", layer))
        segs.append(("head", self._head))
        self.segments = segs
        self.inputs: list[torch.Tensor] = []
        with torch.no_grad():
            x = images
            for _, fn in segs:
                self.inputs.append(x)
                x = fn(x)
        self.reference = center(np.log(np.maximum(x.numpy().astype(np.float64), 1e-45)))

    def _head(self, h: torch.Tensor) -> torch.Tensor:  # ExportClassifier.forward after the stages
        m = self.model
        logits = m.classifier(m.norm(h.mean(dim=(-2, -1))))
        return torch.softmax(logits, dim=-1)

    def segment_of(self, layer: str) -> int:
        for i, (prefix, _) in enumerate(self.segments):
            if layer == prefix or layer.startswith(prefix + ".") or (prefix == "embeddings"
                                                                     and layer.startswith("embeddings")):
                return i
        return len(self.segments) - 1  # classifier / final norm

    def log_probs(self, start: int = 0) -> np.ndarray:
        """Centered log-probabilities float64 ``[N, 1000]`` with the model's current weights."""
        with torch.no_grad():
            x = self.inputs[start]
            for _, fn in self.segments[start:]:
                x = fn(x)
        return center(np.log(np.maximum(x.numpy().astype(np.float64), 1e-45)))

    def noise(self, start: int = 0) -> float:
        """Mean squared error of the centered log-probabilities against the float model's."""
        return float(np.mean((self.log_probs(start) - self.reference) ** 2))

    @property
    def signal(self) -> float:
        return float(np.mean(self.reference ** 2))


def measure_sensitivity(model: nn.Module, runner: SegmentRunner, candidates: dict[str, dict[str, Rounded]],
                        log: Callable[[str], None] = lambda s: None) -> dict[str, dict[str, float]]:
    """layer -> storage name -> end-to-end noise (mean squared centered log-prob error) with that
    layer alone stored that way. ``runner`` must wrap ``model`` (it is modified and restored)."""
    mods = dict(model.named_modules())
    out: dict[str, dict[str, float]] = {}
    for i, (name, options) in enumerate(candidates.items()):
        m = mods[name]
        w0 = m.weight.detach().clone()
        b0 = None if m.bias is None else m.bias.detach().clone()
        start = runner.segment_of(name)
        out[name] = {}
        for sname, r in options.items():
            with torch.no_grad():
                _set(m, r)
            out[name][sname] = runner.noise(start)
            with torch.no_grad():
                m.weight.copy_(w0)
                if b0 is not None:
                    m.bias.copy_(b0)
        if (i + 1) % 10 == 0 or i + 1 == len(candidates):
            log(f"sensitivity: {i + 1}/{len(candidates)} layers")
    return out


def _chain(mods: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:  # as ConvNextStage runs its downsampling
    for m in mods:
        x = m(x)
    return x


# ---- allocation under a byte budget --------------------------------------------------------------


@dataclass
class Allocation:
    choice: dict[str, str]  # layer -> storage name
    weight_bytes: int  # estimated bytes of the conv/linear weights
    predicted_noise: float  # summed per-layer noise
    budget_bytes: int
    log: list[str] = field(default_factory=list)


def allocate(noise: dict[str, dict[str, float]], nbytes: dict[str, dict[str, int]], budget: int) -> Allocation:
    """The storage per layer minimising the summed noise with summed bytes <= ``budget``.

    Exact multiple-choice knapsack by dynamic programming over ``budget / _DP_BINS``-byte steps
    (bytes rounded up, so the true total never exceeds the budget). Raises ValueError when even the
    cheapest storage of every layer does not fit.
    """
    layers = list(noise)
    step = max(1, budget // _DP_BINS)
    steps = budget // step
    cheapest = sum(min(nbytes[n].values()) for n in layers)
    if cheapest > budget:
        raise ValueError(f"the cheapest storage of every layer takes {cheapest} bytes, over the budget of {budget}")
    inf = float("inf")
    best = np.full(steps + 1, inf)
    best[0] = 0.0
    picks: list[np.ndarray] = []
    for n in layers:
        opts = list(noise[n])
        new = np.full(steps + 1, inf)
        pick = np.full(steps + 1, -1, dtype=np.int64)
        for k, o in enumerate(opts):
            c = -(-nbytes[n][o] // step)
            if c > steps:
                continue
            cand = np.full(steps + 1, inf)
            cand[c:] = best[: steps + 1 - c] + noise[n][o]
            better = cand < new
            new[better], pick[better] = cand[better], k
        best = new
        picks.append(pick)
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):  # only from rounding every layer up by a step
        raise ValueError(f"no storage choice fits {budget} bytes at {step}-byte resolution")
    choice: dict[str, str] = {}
    for n, pick in zip(reversed(layers), reversed(picks)):
        o = list(noise[n])[int(pick[end])]
        choice[n] = o
        end -= -(-nbytes[n][o] // step)
    choice = {n: choice[n] for n in layers}
    total = sum(nbytes[n][choice[n]] for n in layers)
    return Allocation(choice, total, float(sum(noise[n][choice[n]] for n in layers)), budget)


def db(signal: float, noise: float) -> float:
    return round(10 * math.log10(signal / noise), 2) if noise > 0 else float("inf")


def layer_stats(stats: dict[str, LayerStats]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: s.finish() for n, s in stats.items()}


def summary(choice: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Storage name -> {layers, parameters} for the manifest."""
    out: dict[str, dict[str, int]] = {}
    for n, s in choice.items():
        r = out.setdefault(s, {"layers": 0, "parameters": 0})
        r["layers"] += 1
        r["parameters"] += math.prod(shapes[n])
    return out


# ---- the whole choice --------------------------------------------------------------------------


@dataclass
class StorageChoice:
    """What `choose_storage` decided: ``model`` (a copy with every layer's weight as stored, biases
    corrected), ``storage`` per torch layer name, and ``report`` for the manifest."""

    model: nn.Module
    storage: dict[str, Storage]
    report: dict[str, Any]


def prune_dominated(options: dict[str, Rounded], shape: tuple[int, ...]) -> tuple[dict[str, Rounded], list[str]]:
    """Drop candidates that cost more bytes than another yet have no better output SQNR on the
    layer's own inputs: the end-to-end error of one layer grows with its output error, so such a
    candidate cannot be chosen, and measuring it end to end would only cost time."""
    kept: dict[str, Rounded] = {}
    dropped: list[str] = []
    best = -float("inf")
    for name, r in sorted(options.items(), key=lambda kv: kv[1].storage.nbytes(shape)):
        if r.output_sqnr_db > best:
            kept[name], best = r, r.output_sqnr_db
        else:
            dropped.append(name)
    return kept, dropped


def choose_storage(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    candidates: Sequence[Storage],
    float_layers: Sequence[str],
    stats: dict[str, LayerStats],
    held_out: torch.Tensor,
    budget: int,
    min_ios18_gain_db: float = 0.5,
    log: Callable[[str], None] = lambda s: None,
) -> StorageChoice:
    """Round every layer every candidate way, measure each alone on ``held_out`` images, allocate
    ``budget`` bytes of conv/linear weights, and measure the allocated model on the same images.

    ``model`` maps float32 ``[N, 3, 224, 224]`` RGB in [0, 1] to probabilities (`ExportClassifier`);
    ``stats`` holds every non-float layer's input moments (statistics images, not ``held_out``);
    ``float_layers`` stay fp16 whatever they cost. Grouped and 3-bit palettes need iOS18
    (`Storage.target`), so when the allocation picks any, it is kept only if it beats the
    allocation without them by ``min_ios18_gain_db`` of predicted SQNR.
    """
    floats = set(float_layers)
    shapes = {n: tuple(m.weight.shape) for n, m in layers}
    rounded: dict[str, dict[str, Rounded]] = {}
    pruned: dict[str, list[str]] = {}
    fp16 = Storage("fp16")
    with torch.no_grad():
        for i, (name, m) in enumerate(layers):
            if name in floats:
                rounded[name] = {"fp16": round_layer(m, *_no_stats(m), fp16, bias_correction=False)}
            else:
                h, mean = stats[name].finish()
                factor, signal = gptq_factor(h, 0.01), _energy(weight_rows(m), h)
                opts = {s.name: round_layer(m, h, mean, s, factor=factor, signal=signal) for s in candidates}
                stats[name] = LayerStats()  # free the moments as we go (ConvNeXt-T's: 0.5 GB)
                rounded[name], pruned[name] = prune_dominated(opts, shapes[name])
            if (i + 1) % 10 == 0 or i + 1 == len(layers):
                log(f"rounded {i + 1}/{len(layers)} layers ({len(candidates)} candidates each)")
    runner = SegmentRunner(copy.deepcopy(model).eval(), held_out)
    noise = measure_sensitivity(runner.model, runner, rounded, log)
    nbytes = {n: {o: r.storage.nbytes(shapes[n]) for o, r in opts.items()} for n, opts in rounded.items()}

    alloc = allocate(noise, nbytes, budget)
    ios18_report: dict[str, Any] | None = None
    if any(rounded[n][o].storage.target != "iOS16" for n, o in alloc.choice.items()):
        older = {n: {o: v for o, v in opts.items() if rounded[n][o].storage.target == "iOS16"}
                 for n, opts in noise.items()}
        alt = allocate(older, nbytes, budget)
        gain = db(runner.signal, alloc.predicted_noise) - db(runner.signal, alt.predicted_noise)
        ios18_report = {"predicted_gain_db": round(gain, 2), "min_gain_db": min_ios18_gain_db,
                        "kept": gain >= min_ios18_gain_db,
                        "iOS16_allocation_predicted_sqnr_db": db(runner.signal, alt.predicted_noise)}
        if gain < min_ios18_gain_db:
            alloc = alt
    chosen = {n: rounded[n][o] for n, o in alloc.choice.items()}
    out_model = apply_rounded(model, chosen)
    trial = SegmentRunner(out_model, held_out)
    measured_noise = float(np.mean((trial.reference - runner.reference) ** 2))
    agree = float(np.mean(trial.reference.argmax(1) == runner.reference.argmax(1)))
    per_layer = {
        n: {"storage": alloc.choice[n], "bytes": nbytes[n][alloc.choice[n]],
            "output_sqnr_db": chosen[n].output_sqnr_db,
            "forced": "float layer (plan)" if n in floats else None,
            "alone_end_to_end_sqnr_db": {o: db(runner.signal, v) for o, v in noise[n].items()},
            "pruned": pruned.get(n, [])}
        for n in alloc.choice}
    for v in per_layer.values():
        if v["forced"] is None:
            del v["forced"]
    report = {
        "budget_bytes": budget,
        "weight_bytes": alloc.weight_bytes,
        "storages": summary(alloc.choice, shapes),
        "predicted_sqnr_db": db(runner.signal, alloc.predicted_noise),
        "measured_sqnr_db": db(runner.signal, measured_noise),
        "measured_top1_agreement": round(agree, 4),
        "held_out_images": int(held_out.shape[0]),
        "iOS18_storages": ios18_report,
        "per_layer": per_layer,
    }
    log(f"allocation: {report['storages']}, predicted {report['predicted_sqnr_db']} dB, measured "
        f"{report['measured_sqnr_db']} dB on {held_out.shape[0]} held-out images")
    return StorageChoice(out_model, {n: r.storage for n, r in chosen.items()}, report)


def _no_stats(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity moments for a layer that only gets cast to fp16 (its rounding reads no statistics)."""
    g, _, k = weight_rows(m).shape
    return torch.eye(k, dtype=torch.float64).expand(g, k, k), torch.zeros(g, k, dtype=torch.float64)
