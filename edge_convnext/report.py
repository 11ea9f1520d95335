"""Reports for people and machines: a plain table, Markdown, JSON, JUnit XML, and a PNG chart.

The chart (agreement with the float reference against artifact size, one point per recipe) is drawn
with Pillow, so a Raspberry Pi can make it too.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_convnext.evaluate import ArtifactResult, EvalRun
from edge_convnext.fileio import atomic_path, write_json_atomic, write_text_atomic
from edge_convnext.gate import GateResult, baseline_dict

SYNTHETIC_BANNER = (
    "SYNTHETIC WEIGHTS ({source}): not ImageNet-trained, so top-1/top-5 against the labels are meaningless "
    "(chance level). Agreement, SQNR, cosine and KL against the float reference are the meaningful numbers."
)
_COLUMNS = ("recipe", "runtime", "MB", "images", "top-1", "top-5", "agree@1", "overlap@5", "SQNR dB", "cosine",
            "KL", "max abs", "ms/img", "img/s")
_RATE_NOTE = ("ms/img: time inside the runtime per image; img/s: images evaluated per second of the image loop "
              "(decoding and preprocessing overlapped with inference)")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _row(r: ArtifactResult) -> list[str]:
    mb = f"{r.size_bytes / 1e6:.1f}" if r.size_bytes else "-"
    if r.status != "ok" or r.fidelity is None:
        return [r.recipe, r.runner or "-", mb, "-", r.status.upper(), "", "", "", "", "", "", "", "", ""]
    f = r.fidelity
    images = f"{r.images}" + (f" ({r.failed} failed)" if r.failed else "") + ("*" if r.stopped_by_budget else "")
    sqnr = "inf" if math.isinf(f.sqnr_db) else f"{f.sqnr_db:.1f}"
    ms = "-" if r.seconds_per_image is None else f"{1000 * r.seconds_per_image:.1f}"
    rate = "-" if r.images_per_second is None else f"{r.images_per_second:.1f}"
    return [r.recipe, r.runner or "-", mb, images, _pct(r.top1), _pct(r.top5), _pct(f.top1_agreement),
            _pct(f.top5_overlap), sqnr, f"{f.cosine:.5f}", f"{f.kl:.2e}", f"{f.max_abs:.2e}", ms, rate]


def _header(run: EvalRun) -> list[str]:
    w = run.weights
    lines = [f"weights: {w.get('source')} ({w.get('description', '')}), sha256 {str(w.get('sha256', ''))[:16]}",
             f"data: {run.data}; {run.requested_images} evaluation images; reference: {run.reference}"]
    if run.synthetic:
        lines.insert(0, "!! " + SYNTHETIC_BANNER.format(source=w.get("source")))
    return lines


def _plain_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def _md_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _gate_rows(g: GateResult) -> list[list[str]]:
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.4g}"

    return [[c.recipe, c.metric, num(c.actual), num(c.limit), "ok" if c.passed else "FAIL", c.note] for c in g.checks]


_GATE_HEADER = ("recipe", "check", "actual", "limit", "result", "note")


def text_report(run: EvalRun, gate: GateResult | None) -> str:
    parts = _header(run) + ["", _plain_table([_row(r) for r in run.results], _COLUMNS), _RATE_NOTE]
    for r in run.results:
        if r.status != "ok":
            parts.append(f"{r.recipe}: {r.status}: {r.reason}")
    if any(r.stopped_by_budget for r in run.results):
        parts.append("* stopped by --budget: measured on the first images only")
    if gate is not None:
        failures = gate.failures
        parts += ["", f"gate: {'PASSED' if gate.passed else f'FAILED ({len(failures)} check(s))'}"]
        if failures:
            parts.append(_plain_table(_gate_rows(GateResult(failures)), _GATE_HEADER))
        parts += [f"  note: {n}" for n in gate.notes]
    return "\n".join(parts)


def markdown_report(run: EvalRun, gate: GateResult | None) -> str:
    parts = ["# edge-convnext evaluation", ""] + [f"- {h}" for h in _header(run)]
    parts += ["", _md_table([_row(r) for r in run.results], _COLUMNS), "", f"- {_RATE_NOTE}"]
    parts += [f"- `{r.recipe}`: {r.status}: {r.reason}" for r in run.results if r.status != "ok"]
    if any(r.stopped_by_budget for r in run.results):
        parts.append("- \\* stopped by `--budget`: measured on the first images only")
    if gate is not None:
        parts += ["", f"## Gate: {'passed' if gate.passed else 'FAILED'}", "", _md_table(_gate_rows(gate), _GATE_HEADER)]
        parts += [f"- {n}" for n in gate.notes]
    return "\n".join(parts) + "\n"


def json_report(run: EvalRun, gate: GateResult | None) -> dict[str, Any]:
    return {
        "weights": run.weights, "synthetic_weights": run.synthetic, "data": run.data, "reference": run.reference,
        "images": run.requested_images, "shards": run.shards, "results": [r.to_dict() for r in run.results],
        "gate": None if gate is None else {"passed": gate.passed, "notes": gate.notes,
                                           "checks": [c.__dict__ for c in gate.checks]},
    }


def junit_report(run: EvalRun, gate: GateResult | None) -> str:
    suite = ET.Element("testsuite", name="edge-convnext eval", tests=str(len(run.results)))
    n_fail = n_skip = 0
    for r in run.results:
        case = ET.SubElement(suite, "testcase", classname="edge_convnext.eval", name=r.recipe,
                             time=f"{r.wall_seconds:.3f}")
        failed = [c for c in (gate.failures if gate else []) if c.recipe == r.recipe]
        if r.status == "error":
            ET.SubElement(case, "error", message=str(r.reason))
            n_fail += 1
        elif failed:
            msg = "; ".join(f"{c.metric} {c.actual} vs limit {c.limit} {c.note}".strip() for c in failed)
            ET.SubElement(case, "failure", message=msg)
            n_fail += 1
        elif r.status != "ok":
            ET.SubElement(case, "skipped", message=f"{r.status}: {r.reason}")
            n_skip += 1
    suite.set("failures", str(n_fail))
    suite.set("skipped", str(n_skip))
    return ET.tostring(suite, encoding="unicode")


def write_reports(run: EvalRun, gate: GateResult | None, json_path: Path | None = None,
                  junit_path: Path | None = None, markdown_path: Path | None = None, plot_path: Path | None = None,
                  baseline_out: Path | None = None) -> str:
    """Write the requested files and return the plain-text report."""
    if json_path:
        write_json_atomic(json_path, json_report(run, gate))
    if junit_path:
        write_text_atomic(junit_path, junit_report(run, gate))
    if markdown_path:
        write_text_atomic(markdown_path, markdown_report(run, gate))
    if plot_path:
        plot(run, plot_path)
    if baseline_out:
        write_json_atomic(baseline_out, baseline_dict(run))
    return text_report(run, gate)


def load_run(path: Path) -> EvalRun:
    """An `EvalRun` back from ``eval --json`` output (to re-draw reports without re-running)."""
    from edge_convnext.metrics import Fidelity

    d = json.loads(Path(path).read_text())
    results = []
    for r in d["results"]:
        r = dict(r)
        r["fidelity"] = Fidelity(**r["fidelity"]) if r.get("fidelity") else None
        results.append(ArtifactResult(**r))
    return EvalRun(results, d["weights"], d["synthetic_weights"], d["data"], d["reference"], d["images"],
                   d.get("shards", {}))


def convert_summary(outcomes: Sequence[Any], weights: dict[str, Any]) -> str:
    """The table ``convert`` prints at the end: size, build time and parity per recipe."""
    rows = []
    for o in outcomes:
        m = o.manifest
        p = (m.parity if m else None) or {}
        if p.get("status") == "measured":
            parity = (f"max|d| {p['max_abs']:.2e}, SQNR {p['sqnr_db']:.1f} dB, agree {100 * p['top1_agreement']:.0f}% "
                      f"({p['images']} img, {p['runner']})")
        else:
            parity = p.get("status", "-")
        rows.append([o.recipe.name, "ok" if o.ok else "FAILED", f"{m.size_bytes / 1e6:.1f}" if m else "-",
                     f"{o.seconds:.1f}", parity if o.ok else str(o.error)[:120]])
    head = f"weights: {weights.get('source')}" + ("  [SYNTHETIC: not ImageNet-trained]" if weights.get("synthetic") else "")
    return head + "\n" + _plain_table(rows, ("recipe", "status", "MB", "build s", "parity vs float reference"))


# --- the chart -----------------------------------------------------------------------------------------

_COLORS = {"coreml": (52, 120, 246), "tflite": (242, 133, 0), "executorch": (46, 160, 67),
           "onnxruntime": (120, 120, 120), "pytorch": (200, 60, 60)}


@dataclass(frozen=True)
class Point:
    """One labelled point of a `scatter_png` plot; ``mark_y`` adds an open square at (x, mark_y)."""

    label: str
    x: float
    y: float
    group: str
    mark_y: float | None = None


def plot(run: EvalRun, path: Path) -> None:
    """PNG: top-1 agreement with the float reference (and label top-1 for real weights) against size."""
    pts = [Point(r.recipe + (" (emulated)" if r.emulated else ""), r.size_bytes / 1e6,
                 100 * r.fidelity.top1_agreement, r.format,  # type: ignore[union-attr]
                 100 * r.top1 if not run.synthetic and r.top1 is not None else None)
           for r in run.results if r.status == "ok" and r.fidelity and r.size_bytes]
    sub = f"weights: {run.weights.get('source')}  |  {run.requested_images} ImageNet-val images"
    if run.synthetic:
        sub += "  |  SYNTHETIC WEIGHTS: label accuracy meaningless"
    scatter_png(pts, path, "Top-1 agreement with the float reference vs artifact size", sub,
                "artifact size (MB, log scale)", alert=run.synthetic,
                note=None if run.synthetic else "open square: label top-1")


def scatter_png(pts: Sequence[Point], path: Path, title: str, subtitle: str, xlabel: str, alert: bool = False,
                note: str | None = None) -> None:
    """Top-1 agreement (%, y) against a log-scale x, one colour per group, labels kept apart; PNG, atomic."""
    from PIL import Image, ImageDraw, ImageFont

    W, H, L, R, T, B = 1100, 720, 90, 260, 120, 70
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = _font(ImageFont, 15)
    small = _font(ImageFont, 13)
    d.text((L, 20), title, fill="black", font=_font(ImageFont, 20))
    d.text((L, 46), subtitle, fill=(160, 0, 0) if alert else (60, 60, 60), font=small)
    if not pts:
        d.text((L, H // 2), "no artifact could be measured", fill="black", font=font)
        _save_png(img, path)
        return
    xs = [p.x for p in pts]
    xlo, xhi = math.log10(min(xs) / 1.3), math.log10(max(xs) * 1.3)
    ylo = min(90.0, math.floor(min(p.y for p in pts) / 5) * 5)
    yhi = 100.5
    px = lambda v: L + (math.log10(v) - xlo) / (xhi - xlo) * (W - L - R)  # noqa: E731
    py = lambda v: T + (yhi - v) / (yhi - ylo) * (H - T - B)  # noqa: E731
    d.rectangle([L, T, W - R, H - B], outline=(120, 120, 120))
    for tick in _ticks(ylo, 100.0):
        y = py(tick)
        d.line([L, y, W - R, y], fill=(230, 230, 230))
        d.text((L - 50, y - 8), f"{tick:.0f}%", fill="black", font=small)
    for tick in (1, 1.5, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200, 300, 500, 1000, 2000, 5000):
        if xlo <= math.log10(tick) <= xhi:
            x = px(tick)
            d.line([x, T, x, H - B], fill=(230, 230, 230))
            d.text((x - 10, H - B + 6), f"{tick:g}", fill="black", font=small)
    d.text(((L + W - R) // 2 - 80, H - 35), xlabel, fill="black", font=font)
    d.text((10, T - 22), "top-1 agreement", fill="black", font=font)
    placed: list[tuple[float, float, float, float]] = []
    groups = list(dict.fromkeys(p.group for p in pts))
    for p in sorted(pts, key=lambda q: (-q.y, q.x)):
        x, y = px(p.x), py(p.y)
        color = _COLORS.get(p.group, (100, 100, 100))
        d.ellipse([x - 6, y - 6, x + 6, y + 6], fill=color, outline="black")
        width = d.textlength(p.label, font=small)
        lx = x + 9 if x + 9 + width <= W - R - 4 else x - 9 - width  # keep labels inside the plot
        d.text(_free_spot(d, placed, p.label, small, lx, y - 8), p.label, fill=(30, 30, 30), font=small)
        if p.mark_y is not None:
            yy = py(p.mark_y)
            d.rectangle([x - 4, yy - 4, x + 4, yy + 4], outline=color)
    ly = T
    for group in sorted(groups, key=lambda g: (g not in _COLORS, g)):
        d.ellipse([W - R + 20, ly + 4, W - R + 32, ly + 16], fill=_COLORS.get(group, (100, 100, 100)), outline="black")
        d.text((W - R + 40, ly), group, fill="black", font=font)
        ly += 26
    if note:
        d.text((W - R + 20, ly + 6), note, fill="black", font=small)
    _save_png(img, path)


def _free_spot(d: Any, placed: list[tuple[float, float, float, float]], text: str, font: Any, x: float,
               y: float) -> tuple[float, float]:
    """A position near (x, y) where ``text`` overlaps no label drawn before; records its box."""
    l, t, r, b = d.textbbox((0, 0), text, font=font)
    for dy in (0, 16, -16, 32, -32, 48, -48, 64, -64, 80, -80):
        box = (x, y + dy, x + r - l, y + dy + b - t)
        if not any(box[0] < p[2] and p[0] < box[2] and box[1] < p[3] and p[1] < box[3] for p in placed):
            placed.append(box)
            return x, y + dy
    placed.append((x, y, x + r - l, y + b - t))
    return x, y


def _ticks(lo: float, hi: float) -> list[float]:
    step = 1.0 if hi - lo <= 10 else 5.0 if hi - lo <= 40 else 10.0
    v = math.ceil(lo / step) * step
    out = []
    while v <= hi + 1e-9:
        out.append(v)
        v += step
    return out


def _font(image_font: Any, size: int) -> Any:
    try:
        return image_font.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font without sizes
        return image_font.load_default()


def _save_png(img: Any, path: Path) -> None:
    with atomic_path(Path(path)) as tmp:
        img.save(tmp, format="PNG")
