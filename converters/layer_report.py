"""``edge-convnext layers ARTIFACT``: where a quantized artifact loses against the float model, layer by layer.

For every conv/linear layer of the artifact, in network order and named by torch module name (the
names of `converters.quant_plan`, the same in every format and across rewrites), on a few calibration
images (never evaluation images; preferably ones that set no statistic of the artifact):

* **output SQNR**: the layer's output in the artifact against the same layer's output in the float
  model (``10 log10(|ref|^2 / |ref - out|^2)`` over every element and image): the error accumulated
  up to that depth;
* **own SQNR**: the same, with only this layer quantized (the float model's input to the layer): the
  error the layer adds by itself;
* **alone**: the end-to-end fidelity (`edge_convnext.metrics.compare`, SQNR of centered
  log-probabilities, and top-1 agreement) of the float model with only this layer quantized as the
  artifact quantizes it, and that error's share of the artifact's own (noise energy ratio).

The float model is rebuilt from the manifest (`rebuild_float_model`): the weights from
``weights.source`` (sha256 checked), `converters.model.export_model`, the recorded rewrites and, if
recorded, the LayerNorm migration, recomputed on its recorded images with its recorded strength. It is
float-equal to the plain export model, and its layer inputs are scaled exactly as the artifact's.
How each format's numbers are obtained is in `converters.layer_artifacts` and in every report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from converters import rewrites
from converters.centering import recentred
from converters.layer_artifacts import LayerSource, open_layers
from converters.model import export_model
from converters.quant_plan import QuantPlan, quantizable_layers
from converters.smoothing import activation_absmax, norm_pairs, smooth
from edge_convnext.contract import OUTPUT_CONTRACTS
from edge_convnext.dataset import Sample, image_directory, load_subset
from edge_convnext.errors import EdgeConvNextError, ImageError, ManifestError, WeightsError
from edge_convnext.manifest import Manifest, manifest_path, read_manifest, verify_artifact
from edge_convnext.metrics import Fidelity, center, compare, sqnr_db
from edge_convnext.preprocessing import Preprocessing, preprocess_file
from edge_convnext.recipes import FLOAT_PRECISIONS

SCHEMA = "edge-convnext/layers/v1"
DEFAULT_IMAGES = 8
_LOG_P = OUTPUT_CONTRACTS["probabilities"].log_scores


@dataclass
class FloatModel:
    """The float export model an artifact is compared with, and the plan its manifest records."""

    model: nn.Module
    plan: QuantPlan
    record: dict[str, Any]


def rebuild_float_model(manifest: Manifest, samples: Sequence[Sample], source: str = "manifest") -> FloatModel:
    """The manifest's weights -> export model -> recorded rewrites -> recorded LayerNorm migration and input
    centring (if any).

    ``samples``: the calibration images the migration's recorded ``fit_ids`` are looked up in.
    `WeightsError` when the weights' sha256 differs from the manifest's.
    """
    from converters.weights import load_weights

    weights = manifest.weights
    pre = Preprocessing.from_dict(manifest.preprocessing)
    loaded = load_weights(str(weights["source"]), pre)
    if loaded.identity.sha256 != weights.get("sha256"):
        raise WeightsError(f"{source}: built from weights {weights['source']} with sha256 {str(weights.get('sha256'))[:16]}, "
                           f"but they load here with sha256 {loaded.identity.sha256[:16]}; the float model cannot be "
                           "rebuilt. Give the same weights (or rebuild the artifact)")
    low = manifest.lowering
    model = export_model(loaded.model, pre)
    passes = list(low.get("rewrites") or {})
    # As `converters.prepare` does: layout passes (same weights, same layer names) run after the migration.
    weight_passes, layout = rewrites.split_layout(passes)
    model, counts = rewrites.apply(model, weight_passes)
    floats = [f["name"] for f in (low.get("float_layers") or {}).get("float_layers", [])]
    plan = QuantPlan(tuple(n for n, _ in quantizable_layers(model)), tuple(floats),
                     {f["name"]: f.get("reason", "recipe") for f in (low.get("float_layers") or {}).get("float_layers", [])})
    record: dict[str, Any] = {"weights": weights["source"], "weights_sha256": weights.get("sha256"),
                              "rewrites": passes, "float_layers": list(plan.float_layers)}
    sm = low.get("smoothing")
    if sm:
        by_id = {s.image_id: s for s in samples}
        missing = [i for i in sm.get("fit_ids", []) if i not in by_id]
        if missing or not sm.get("fit_ids"):
            raise ManifestError(f"{source}: the LayerNorm migration was fitted on images {missing[:3] or 'not recorded'} "
                                "that are not in the calibration images here; pass the --data the artifact was built with")
        images = [preprocess_file(by_id[i].path, pre)[None] for i in sm["fit_ids"]]
        pairs = norm_pairs(model)
        amax = activation_absmax(model, pairs, images)
        model, changed = smooth(model, amax, float(sm["alpha"]), pairs, skip=plan.float_layers)
        if "pairs_migrated" in sm and changed != sm["pairs_migrated"]:
            raise ManifestError(f"{source}: the migration changed {changed} LayerNorm/layer pairs here, the build "
                                f"recorded {sm['pairs_migrated']}")
        record["smoothing"] = {"alpha": float(sm["alpha"]), "pairs": changed, "fit_images": len(images),
                               "how": "channel maxima recomputed on the recorded fit_ids, recorded strength"}
    ranges = low.get("activation_ranges") or {}
    # The layers' inputs and outputs as the artifact's layers read and write them (`converters.centering`).
    model = recentred(model, ranges)
    for key in ("centered_inputs", "centered_outputs"):
        if (ranges.get(key) or {}).get("centers"):
            record[key] = len(ranges[key]["centers"])
    if layout:
        model = rewrites.apply(model, layout)[0]
    return FloatModel(model.eval(), plan, record)


def used_image_ids(manifest: Manifest) -> set[str]:
    """Every image id the build recorded for a statistic or a choice (calibration, rounding, migration, ranges)."""
    low = manifest.lowering
    ids = set((manifest.calibration or {}).get("image_ids") or [])
    ids |= set((low.get("weight_rounding") or {}).get("image_ids") or [])
    for key in ("smoothing", "activation_ranges"):
        rec = low.get(key) or {}
        ids |= set(rec.get("fit_ids") or []) | set(rec.get("held_out_ids") or [])
    for key in ("weight_compression", "activation_quantization"):  # Core ML p4 and w8a8 choices
        rec = low.get(key) or {}
        ids |= set(rec.get("statistics_image_ids") or []) | set(rec.get("held_out_image_ids") or [])
    graph = (low.get("quantization") or {}).get("graph_ranges") or {}  # LiteRT int8-all's range choice
    ids |= set(graph.get("held_out_image_ids") or [])
    return ids


def calibration_samples(manifest: Manifest, data: Path | None) -> tuple[list[Sample], str]:
    """The calibration images the artifact's build drew from (its user directory, or the data's split)."""
    cal = manifest.calibration or {}
    if cal.get("set") == "user":
        return image_directory(Path(cal["dir"])), f"the build's own calibration directory {cal['dir']}"
    return load_subset(data).split("calibration"), "the data's calibration split"


def choose_images(manifest: Manifest, samples: Sequence[Sample], n: int) -> tuple[list[str], np.ndarray, str]:
    """(ids, float32 ``[n, 3, 224, 224]`` in [0, 1], note): the first ``n`` readable calibration images that
    set no statistic and made no choice of the artifact; the ones that did only when there are too few."""
    if n < 1:
        raise EdgeConvNextError(f"--images must be at least 1, got {n}")
    used = used_image_ids(manifest)
    pre = Preprocessing.from_dict(manifest.preprocessing)
    ordered = [s for s in samples if s.image_id not in used] + [s for s in samples if s.image_id in used]
    ids, xs = [], []
    for s in ordered:
        if len(ids) == n:
            break
        try:
            xs.append(preprocess_file(s.path, pre))
        except ImageError:
            continue
        ids.append(s.image_id)
    if not ids:
        raise EdgeConvNextError("no readable calibration image for the per-layer report")
    reused = sum(1 for i in ids if i in used)
    note = ("calibration images that set no statistic and made no choice of this artifact" if not reused else
            f"calibration images; {reused} of them also set statistics or choices of this artifact (too few others)")
    return ids, np.stack(xs).astype(np.float32), note


@dataclass
class LayerRow:
    """One conv/linear layer of the report (SQNRs in dB; None where two tensors are identical)."""

    index: int  # position among all conv/linear layers, in network order
    name: str
    quantized: bool
    storage: str
    stored: dict[str, Any]
    output_sqnr_db: float | None
    own_sqnr_db: float | None = None
    alone: Fidelity | None = None
    noise_share: float | None = None  # alone's error energy / the artifact's
    float_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"index": self.index, "name": self.name, "storage": self.storage, "stored": self.stored,
                             "output_sqnr_db": _num(self.output_sqnr_db)}
        if self.quantized:
            d |= {"own_sqnr_db": _num(self.own_sqnr_db),
                  "alone": None if self.alone is None else {"sqnr_db": _num(self.alone.sqnr_db),
                                                            "top1_agreement": self.alone.top1_agreement,
                                                            "max_abs": round(self.alone.max_abs, 5),
                                                            "noise_share": _num(self.noise_share, 4)}}
        else:
            d["reason"] = self.float_reason
        return d


def _num(v: float | None, digits: int = 2) -> float | None:
    return None if v is None or math.isinf(v) or math.isnan(v) else round(float(v), digits)


def _db(v: float | None) -> float | None:
    return None if v is None or math.isinf(v) else v


@dataclass
class LayerReport:
    artifact: str
    manifest: Manifest
    images: dict[str, Any]
    float_model: dict[str, Any]
    how: dict[str, str]
    end_to_end: dict[str, Any]
    rows: list[LayerRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def quantized(self) -> list[LayerRow]:
        return [r for r in self.rows if r.quantized]

    @property
    def float_rows(self) -> list[LayerRow]:
        return [r for r in self.rows if not r.quantized]

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {"schema": SCHEMA, "artifact": self.artifact, "recipe": m.recipe, "format": m.format,
                "precision": m.precision, "sha256": m.sha256, "weights": m.weights, "images": self.images,
                "float_model": self.float_model, "how": self.how, "end_to_end": self.end_to_end,
                "layers": [r.to_dict() for r in self.quantized],
                "float_layers": [r.to_dict() for r in self.float_rows],
                "notes": self.notes, "seconds": round(self.seconds, 1)}

    def worst(self, k: int = 5) -> list[LayerRow]:
        """The ``k`` quantized layers whose quantization alone costs most (lowest alone SQNR)."""
        rows = [r for r in self.quantized if r.alone is not None]
        return sorted(rows, key=lambda r: r.alone.sqnr_db)[:k]  # type: ignore[union-attr]

    def text(self, all_layers: bool = False) -> str:
        """The table (quantized layers; ``all_layers``: float ones too), the end-to-end lines and how."""
        m, e = self.manifest, self.end_to_end
        lines = [f"{self.artifact}: {m.recipe} ({m.format}, {m.precision}); {len(self.quantized)} of {len(self.rows)} "
                 f"conv/linear layers quantized; {self.images['count']} {self.images['note']}",
                 f"artifact ({e['artifact']['runtime']}): SQNR {_fmt(e['artifact']['sqnr_db'])} dB, top-1 agreement "
                 f"{100 * e['artifact']['top1_agreement']:.0f}%; every quantized layer at once, nothing else "
                 f"quantized: {_fmt(e['all_layers_alone']['sqnr_db'])} dB"]
        if "intermediates_vs_artifact" in e:
            lines.append(f"intermediates from: {e['intermediates']['runtime']}, {_fmt(e['intermediates']['sqnr_db'])} dB "
                         f"against float; against the artifact's own run: {e['intermediates_vs_artifact']}")
        head = ("#", "layer", "stored (weights, input, output)", "output dB", "own dB", "alone dB", "share", "agree@1")
        rows = [r for r in self.rows if all_layers or r.quantized]
        body = []
        for r in rows:
            if r.quantized and r.alone is not None:
                body.append((str(r.index), r.name, r.storage, _fmt(r.output_sqnr_db), _fmt(r.own_sqnr_db),
                             _fmt(r.alone.sqnr_db), f"{100 * (r.noise_share or 0):.1f}%",
                             f"{100 * r.alone.top1_agreement:.0f}%"))
            else:
                body.append((str(r.index), r.name, f"{r.storage} (float)", _fmt(r.output_sqnr_db), "", "", "", ""))
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        fmt = lambda cells: "  ".join(str(c).ljust(w) if i in (1, 2) else str(c).rjust(w)  # noqa: E731
                                      for i, (c, w) in enumerate(zip(cells, widths)))
        lines += ["", fmt(head), *map(fmt, body)]
        if not all_layers and self.float_rows:
            fl = [r.output_sqnr_db for r in self.float_rows if r.output_sqnr_db is not None]
            lines.append(f"({len(self.float_rows)} float layers not listed"
                         + (f"; their output SQNR {min(fl):.1f} to {max(fl):.1f} dB" if fl else "")
                         + "; --all-layers lists them)")
        worst = self.worst()
        if worst:
            lines += ["", "costliest alone: " + ", ".join(f"{r.name} {_fmt(r.alone.sqnr_db)} dB "  # type: ignore[union-attr]
                                                        f"({100 * (r.noise_share or 0):.0f}%)" for r in worst)]
        lines += ["", "columns: output = the layer's output in the artifact vs the float model's (error accumulated to "
                  "that depth); own = its output with only this layer quantized; alone = end-to-end SQNR of centered "
                  "log-probabilities with only this layer quantized; share = that error's energy as a share of the "
                  "artifact's; agree@1 = top-1 agreement with the float model then"]
        lines += [f"{k}: {v}" for k, v in self.how.items()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def markdown(self) -> str:
        m, e = self.manifest, self.end_to_end
        out = [f"### `edge-convnext layers` {m.recipe}", "",
               f"{len(self.quantized)} of {len(self.rows)} conv/linear layers quantized; {self.images['count']} "
               f"{self.images['note']}. Artifact: SQNR {_fmt(e['artifact']['sqnr_db'])} dB, top-1 agreement "
               f"{100 * e['artifact']['top1_agreement']:.0f}% ({e['artifact']['runtime']}); all quantized layers at once, "
               f"nothing else quantized: {_fmt(e['all_layers_alone']['sqnr_db'])} dB.", "",
               "| # | layer | stored | output dB | own dB | alone dB | share | agree@1 |", "|---|---|---|---|---|---|---|---|"]
        for r in self.quantized:
            a = r.alone
            out.append(f"| {r.index} | `{r.name}` | {r.storage} | {_fmt(r.output_sqnr_db)} | {_fmt(r.own_sqnr_db)} | "
                       f"{_fmt(a.sqnr_db) if a else ''} | {100 * (r.noise_share or 0):.1f}% | "
                       f"{100 * a.top1_agreement:.0f}% |" if a else "")
        out += [""] + [f"- {k}: {v}" for k, v in self.how.items()] + [f"- note: {n}" for n in self.notes]
        return "\n".join(out) + "\n"


def _fmt(v: float | None) -> str:
    return "inf" if v is None or math.isinf(v) else f"{v:.1f}"


def _share(ref: np.ndarray, got: np.ndarray, artifact: np.ndarray) -> float | None:
    """Error energy of ``got`` over the artifact's, both against ``ref`` (centered log-probabilities)."""
    c = center(ref)
    den = float(np.sum((c - center(artifact)) ** 2))
    return float(np.sum((c - center(got)) ** 2)) / den if den > 0 else None


@torch.no_grad()
def _run(model: nn.Module, x: torch.Tensor, hooks: dict[str, Callable[..., Any]]) -> np.ndarray:
    """``model``'s log-probabilities on ``x`` with forward hooks on named modules (removed afterwards)."""
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(h) for n, h in hooks.items()]
    try:
        return _LOG_P(model(x).numpy())
    finally:
        for h in handles:
            h.remove()


def layer_report(artifact: Path, images: int = DEFAULT_IMAGES, data: Path | None = None, threads: int | None = None,
                 verify: bool = True, echo: Callable[[str], None] = lambda s: None) -> LayerReport:
    """Measure ``artifact`` layer by layer (see module doc). `EdgeConvNextError` subclasses name the file."""
    t0 = time.perf_counter()
    artifact = Path(artifact)
    if not artifact.exists():
        raise EdgeConvNextError(f"{artifact}: no such artifact; build it with `edge-convnext convert`")
    manifest = read_manifest(manifest_path(artifact))
    if verify:
        verify_artifact(artifact, manifest)
    if manifest.precision in FLOAT_PRECISIONS:
        raise NothingQuantized(f"{artifact}: {manifest.recipe} is a float recipe ({manifest.precision}); nothing in it "
                               "is quantized, so there is no per-layer quantization error to report")
    if threads:
        torch.set_num_threads(threads)
    samples, where = calibration_samples(manifest, data)
    echo(f"rebuilding the float model ({manifest.weights['source']}, rewrites "
         f"{list(manifest.lowering.get('rewrites') or {}) or 'none'}"
         f"{', LayerNorm migration' if manifest.lowering.get('smoothing') else ''})")
    fm = rebuild_float_model(manifest, samples, str(manifest_path(artifact)))
    ids, xs, note = choose_images(manifest, samples, images)
    x = torch.from_numpy(xs)
    model = fm.model
    layers = [n for n, _ in quantizable_layers(model)]
    modules = dict(quantizable_layers(model))
    echo(f"reading {artifact.name} layer by layer")
    source: LayerSource = open_layers(artifact, manifest, model, threads)
    quantized = [n for n in layers if source.layers[n].quantized]
    if not quantized:
        raise NothingQuantized(f"{artifact}: no conv/linear layer of {manifest.recipe} is stored quantized")

    echo(f"float model on {len(ids)} images")
    ref_out: dict[str, torch.Tensor] = {}
    ref = _run(model, x, {n: (lambda mod, i, o, n=n: ref_out.__setitem__(n, o.detach().clone())) for n in layers})

    echo(f"the artifact's layer outputs ({source.runtime})")
    inter, raw = source.outputs(xs, layers)
    art_out = {n: source.to_torch(n, raw[n], tuple(ref_out[n].shape)) for n in layers}
    from edge_convnext.runners import open_runner

    runner = open_runner(artifact, manifest, threads=threads)
    art = runner.run(xs)
    fid_art, fid_inter = compare(ref, art), compare(ref, inter)
    end: dict[str, Any] = {"artifact": {"runtime": runner.name, **_fid(fid_art)},
                           "intermediates": {"runtime": source.runtime, **_fid(fid_inter)}}
    diff = float(np.max(np.abs(center(inter) - center(art))))
    end["intermediates_vs_artifact"] = ("identical (max |d| 0)" if diff == 0 else
                                        f"SQNR {_fmt(compare(art, inter).sqnr_db)} dB, max |d| {diff:.3g} "
                                        "(centered log-probabilities)")

    rows: list[LayerRow] = []
    plan_floats = set(fm.plan.float_layers)
    notes: list[str] = []
    for i, n in enumerate(layers):
        st = source.layers[n]
        reason = None
        if not st.quantized:
            reason = f"float_layers ({fm.plan.reasons.get(n, 'recipe')})" if n in plan_floats else \
                "stored in float by the recipe"
        elif n in plan_floats:
            notes.append(f"{n} is a float layer in the manifest but stored quantized in the artifact")
        rows.append(LayerRow(i, n, st.quantized, st.storage, st.to_dict(),
                             _db(sqnr_db(ref_out[n].numpy(), art_out[n])), float_reason=reason))

    by_name = {r.name: r for r in rows}
    for k, n in enumerate(quantized, 1):
        echo(f"alone {k}/{len(quantized)}: {n}")
        got: dict[str, torch.Tensor] = {}

        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor, n: str = n) -> torch.Tensor:
            y = source.alone(n, mod, inp[0]).reshape(out.shape).to(out.dtype)
            got[n] = y
            return y

        lp = _run(model, x, {n: hook})
        r = by_name[n]
        r.alone = compare(ref, lp)
        r.own_sqnr_db = _db(sqnr_db(ref_out[n].numpy(), got[n].numpy()))
        r.noise_share = _share(ref, lp, art)
    echo("every quantized layer at once")
    every = _run(model, x, {n: (lambda mod, inp, out, n=n: source.alone(n, mod, inp[0]).reshape(out.shape))
                            for n in quantized})
    end["all_layers_alone"] = {**_fid(compare(ref, every)), "noise_share": _num(_share(ref, every, art), 4),
                               "what": "the float model with every quantized conv/linear layer quantized as in 'alone' "
                                       "and nothing else (the rest of the gap to the artifact: other quantized ops, "
                                       "compute precision, kernels)"}
    how = {"float model": ("weights from the manifest (sha256 checked), export model, rewrites "
                           f"{fm.record['rewrites'] or 'none'}"
                           + (f", LayerNorm migration alpha {fm.record['smoothing']['alpha']:g} recomputed on its "
                              f"{fm.record['smoothing']['fit_images']} recorded fit images" if "smoothing" in fm.record else "")),
           "images": f"{len(ids)} images from {where}: {note}",
           "output": source.how_outputs, "alone": source.how_alone,
           "artifact": f"the artifact run as `eval` runs it ({runner.name})"}
    if source.runtime != runner.name:
        how["check"] = ("the intermediates' own end-to-end output against the artifact's run: "
                        f"{end['intermediates_vs_artifact']}")
    return LayerReport(str(artifact), manifest, {"count": len(ids), "ids": ids, "from": where, "note": note},
                       fm.record, how, end, rows, notes, time.perf_counter() - t0)


def _fid(f: Fidelity) -> dict[str, Any]:
    return {"images": f.images, "sqnr_db": _num(f.sqnr_db), "top1_agreement": f.top1_agreement,
            "max_abs": round(f.max_abs, 5)}


class NothingQuantized(EdgeConvNextError):
    """The artifact has no quantized conv/linear layer (a float recipe): nothing to report."""


# --- the plot ---------------------------------------------------------------------------------------

_BLUE, _ORANGE, _GREY = (52, 120, 246), (242, 133, 0), (150, 150, 150)


def plot(report: LayerReport, path: Path) -> None:
    """PNG along the network's depth: output SQNR of every layer (hollow grey: float layers) and alone SQNR of
    every quantized layer, with the artifact's end-to-end SQNR as a dashed line; written atomically."""
    from PIL import Image, ImageDraw, ImageFont

    from edge_convnext.report import _font, _save_png

    rows = report.rows
    W, H, L, R, T, B = 1280, 720, 80, 60, 110, 120
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    small, font = _font(ImageFont, 13), _font(ImageFont, 15)
    m, e = report.manifest, report.end_to_end
    d.text((L, 16), f"{m.recipe}: per-layer error against the float model", fill="black", font=_font(ImageFont, 20))
    d.text((L, 44), f"{report.images['count']} calibration images; artifact {_fmt(e['artifact']['sqnr_db'])} dB "
           f"({e['artifact']['runtime']}); every quantized layer at once {_fmt(e['all_layers_alone']['sqnr_db'])} dB; "
           f"weights {m.weights.get('source')}", fill=(60, 60, 60), font=small)
    vals = [v for r in rows for v in (r.output_sqnr_db, r.alone.sqnr_db if r.alone else None)
            if v is not None and not math.isinf(v)] + [e["artifact"]["sqnr_db"] or 0]
    cap = 80.0  # above this the difference is noise-level: drawn at the top edge
    lo, hi = max(0.0, math.floor(min(vals) / 10) * 10), min(cap, math.ceil(max(vals) / 10) * 10 + 5)
    n = max(len(rows) - 1, 1)
    px = lambda i: L + i / n * (W - L - R)  # noqa: E731
    py = lambda v: T + (hi - min(max(v, lo), hi)) / (hi - lo) * (H - T - B)  # noqa: E731
    d.rectangle([L, T, W - R, H - B], outline=(120, 120, 120))
    for tick in range(int(lo), int(hi) + 1, 5 if hi - lo <= 40 else 10):
        y = py(tick)
        d.line([L, y, W - R, y], fill=(232, 232, 232))
        d.text((L - 40, y - 8), f"{tick}", fill="black", font=small)
    d.text((10, T - 26), "SQNR dB", fill="black", font=font)
    stage, free_x = None, 0.0
    for r in rows:  # stage boundaries and names under the axis
        s = r.name.split(".")[1] if r.name.startswith("stages.") else ("stem" if r.name.startswith("embeddings") else "head")
        if s != stage:
            x = px(r.index)
            d.line([x, T, x, H - B], fill=(200, 200, 200))
            label = f"stage {s}" if s.isdigit() else s
            width = d.textlength(label, font=small)
            lx = min(max(x + 3, free_x), W - R - width)
            d.text((lx, H - B + 6 + (14 if lx > x + 40 else 0)), label, fill=(60, 60, 60), font=small)
            free_x = lx + width + 6
            stage = s
    for r in rows:  # float layers: a grey tick under the plot
        if not r.quantized:
            x = px(r.index)
            d.line([x, H - B - 6, x, H - B], fill=_GREY, width=2)
    art = e["artifact"]["sqnr_db"]
    if art is not None:
        y = py(art)
        for x0 in range(L, W - R, 14):
            d.line([x0, y, min(x0 + 7, W - R), y], fill=(200, 40, 40), width=2)
    for key, color in (("output", _BLUE), ("alone", _ORANGE)):
        pts = []
        for r in rows:
            v = r.output_sqnr_db if key == "output" else (r.alone.sqnr_db if r.alone else None)
            if key == "alone" and not r.quantized:
                continue
            v = hi if v is None or math.isinf(v) else v
            pts.append((px(r.index), py(v), r.quantized))
        if len(pts) > 1:
            d.line([(p[0], p[1]) for p in pts], fill=color, width=2)
        for x, y, q in pts:
            if q:
                d.ellipse([x - 3.5, y - 3.5, x + 3.5, y + 3.5], fill=color)
            else:
                d.ellipse([x - 3.5, y - 3.5, x + 3.5, y + 3.5], outline=_GREY, fill="white")
    for k, r in enumerate(report.worst(3)):  # name the costliest layers
        x, y = px(r.index), py(r.alone.sqnr_db)  # type: ignore[union-attr]
        width = d.textlength(r.name, font=small)
        d.text((x + 6 if x + 6 + width < W - R else x - 6 - width, y + 4), r.name, fill=(120, 60, 0), font=small)
    ly = H - B + 30
    legend = [(_BLUE, "output SQNR: the layer's output in the artifact vs the float model (accumulated error)"),
              (_ORANGE, "alone: end-to-end SQNR with only this layer quantized as in the artifact"),
              ((200, 40, 40), "dashed: the artifact end to end"),
              (_GREY, "hollow / ticks: float layers (not quantized)")]
    for k, (color, label) in enumerate(legend):
        x = L + (k % 2) * 600
        y = ly + (k // 2) * 22
        d.rectangle([x, y + 3, x + 14, y + 13], fill=color)
        d.text((x + 20, y), label, fill="black", font=small)
    d.text((L, H - 24), "conv/linear layers in network order (torch module names); values above "
           f"{hi:.0f} dB drawn at the top", fill=(90, 90, 90), font=small)
    _save_png(img, path)
