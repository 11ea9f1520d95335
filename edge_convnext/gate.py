"""The CI gate: per-recipe thresholds from a data file, and regressions against a baseline file.

Gate file (JSON, ``edge_convnext/gates/default.json``)::

    {"schema": "edge-convnext/gate/v1", "min_images": 100,
     "baseline_tolerance": {"top1_agreement": 0.01, "sqnr_db": 1.0},
     "recipes": {"tflite-fp32": {"min_top1_agreement": 0.999, "min_sqnr_db": 80, "max_top1_drop": 0.002}, ...}}

A recipe may say ``"required": false`` (with a ``"reason"``) when its runtime cannot exist on CI hosts;
every other gated artifact that cannot run fails the gate. Artifacts whose recipe the file does not
name are reported as "not gated", never silently passed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_convnext.errors import ManifestError
from edge_convnext.evaluate import ArtifactResult, EvalRun

GATE_SCHEMA = "edge-convnext/gate/v1"
BASELINE_SCHEMA = "edge-convnext/baseline/v1"
_KNOWN_KEYS = {"min_images", "min_top1_agreement", "min_top5_overlap", "min_sqnr_db", "max_top1_drop", "max_kl",
               "required", "reason", "measured"}


@dataclass(frozen=True)
class Gate:
    recipes: dict[str, dict[str, Any]]
    min_images: int = 1
    baseline_tolerance: dict[str, float] = field(default_factory=dict)
    source: str = ""
    weights: dict[str, Any] = field(default_factory=dict)  # {"source", "sha256"} the thresholds were measured on


@dataclass
class Check:
    recipe: str
    metric: str
    actual: float | None
    limit: float | None
    passed: bool
    note: str = ""

    def __post_init__(self) -> None:  # NumPy scalars would break the JSON report
        self.passed = bool(self.passed)
        self.actual = None if self.actual is None else float(self.actual)
        self.limit = None if self.limit is None else float(self.limit)


@dataclass
class GateResult:
    checks: list[Check]
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]


def load_gate(path: Path) -> Gate:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: cannot read gate file ({e})") from e
    if d.get("schema") != GATE_SCHEMA or not isinstance(d.get("recipes"), dict):
        raise ManifestError(f"{path}: not a gate file (schema {GATE_SCHEMA!r} with a 'recipes' object)")
    for name, t in d["recipes"].items():
        unknown = set(t) - _KNOWN_KEYS
        if unknown:
            raise ManifestError(f"{path}: recipe {name}: unknown threshold(s) {sorted(unknown)}")
    weights = d.get("weights")
    weights = weights if isinstance(weights, dict) else {"source": weights}  # v1 files named the source only
    return Gate(d["recipes"], int(d.get("min_images", 1)), dict(d.get("baseline_tolerance", {})), str(path),
                weights)


def check_gate(run: EvalRun, gate: Gate, baseline: Path | None = None, other_weights: bool = False) -> GateResult:
    """Check ``run`` against ``gate``; a gate measured on other weights fails unless ``other_weights``.

    Thresholds are measured numbers: a floor derived on the synthetic weights says nothing about a
    user's real ones (it may sit far below what they need), so judging other weights by it is refused.
    """
    out = GateResult([])
    out.checks += _weights_check(run, gate, other_weights)
    base = _load_baseline(baseline, run, out) if baseline else {}
    for r in run.results:
        t = gate.recipes.get(r.recipe)
        if t is None:
            out.notes.append(f"{r.recipe}: not gated (no thresholds in {gate.source})")
            continue
        if r.status != "ok":
            required = t.get("required", True)
            note = f"{r.status}: {r.reason}" + ("" if required else f" (not required: {t.get('reason', '')})")
            out.checks.append(Check(r.recipe, "ran", None, None, not required, note))
            continue
        min_images = int(t.get("min_images", gate.min_images))
        out.checks.append(Check(r.recipe, "images", r.images, min_images, r.images >= min_images))
        out.checks += _thresholds(r, t)
        if r.recipe in base:
            out.checks += _regressions(r, base[r.recipe], gate.baseline_tolerance)
    return out


def _weights_check(run: EvalRun, gate: Gate, other_weights: bool) -> list[Check]:
    want, have = gate.weights.get("sha256"), run.weights.get("sha256")
    if want is None and gate.weights.get("source") is None:
        return []  # a hand-written gate that names no weights applies to any
    same = want == have if want is not None else gate.weights.get("source") == run.weights.get("source")
    if same:
        return []
    note = (f"the gate {gate.source} was measured on weights {gate.weights.get('source')} "
            f"(sha256 {str(want)[:12]}), these artifacts are from {run.weights.get('source')} "
            f"(sha256 {str(have)[:12]}); derive a gate for them with eval --json and gate-init")
    if other_weights:
        return [Check("(gate)", "weights", None, None, True, note + " (--gate-other-weights: checked anyway)")]
    return [Check("(gate)", "weights", None, None, False, note + ", or pass --gate-other-weights")]


def _thresholds(r: ArtifactResult, t: dict[str, Any]) -> list[Check]:
    f = r.fidelity
    assert f is not None
    checks = []
    if "min_top1_agreement" in t:
        checks.append(Check(r.recipe, "top1_agreement", f.top1_agreement, t["min_top1_agreement"],
                            f.top1_agreement >= t["min_top1_agreement"]))
    if "min_top5_overlap" in t:
        checks.append(Check(r.recipe, "top5_overlap", f.top5_overlap, t["min_top5_overlap"],
                            f.top5_overlap >= t["min_top5_overlap"]))
    if "min_sqnr_db" in t:
        checks.append(Check(r.recipe, "sqnr_db", f.sqnr_db, t["min_sqnr_db"], f.sqnr_db >= t["min_sqnr_db"]))
    if "max_kl" in t:
        checks.append(Check(r.recipe, "kl", f.kl, t["max_kl"], f.kl <= t["max_kl"]))
    if "max_top1_drop" in t and r.top1 is not None and r.reference_top1 is not None:
        drop = r.reference_top1 - r.top1
        checks.append(Check(r.recipe, "top1_drop", drop, t["max_top1_drop"], drop <= t["max_top1_drop"]))
    return checks


def _regressions(r: ArtifactResult, base: dict[str, float], tol: dict[str, float]) -> list[Check]:
    assert r.fidelity is not None
    checks = []
    for metric, tolerance in tol.items():
        if metric not in base:
            continue
        actual = getattr(r.fidelity, metric, None)
        if actual is None:
            continue
        limit = base[metric] - tolerance
        checks.append(Check(r.recipe, f"{metric} vs baseline", actual, limit, actual >= limit,
                            f"baseline {base[metric]:.4g}"))
    return checks


def _load_baseline(path: Path, run: EvalRun, out: GateResult) -> dict[str, dict[str, float]]:
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError:
        out.notes.append(f"{path}: no baseline yet; write one with --write-baseline")
        return {}
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: cannot read baseline ({e})") from e
    if d.get("schema") != BASELINE_SCHEMA:
        raise ManifestError(f"{path}: not a baseline file (schema {BASELINE_SCHEMA!r})")
    if d.get("weights_sha256") != run.weights.get("sha256"):
        out.notes.append(f"{path}: baseline is for other weights ({d.get('weights_source')}); regressions not checked")
        return {}
    return dict(d.get("recipes", {}))


GATE_POLICY = (
    "float32 recipes: top-1 agreement >= 0.995, SQNR >= 80 dB, top-1 drop <= 0.005 (conversion must be "
    "near exact). Other recipes: measured agreement minus max(0.02, 3 binomial sigmas at min_images), "
    "measured SQNR minus 3 dB, top-1 drop at most max(0.01, measured drop) plus the same agreement margin. "
    "min_images: 100, or what the slow runtimes reach in half of a 120 s --budget (at least 8)."
)
_FP32 = {"min_top1_agreement": 0.995, "min_sqnr_db": 80.0, "max_top1_drop": 0.005}


def gate_from_report(report: dict[str, Any], min_images: int = 100, budget_s: float = 120.0) -> dict[str, Any]:
    """Thresholds from a measured eval JSON report (``eval --json``), by `GATE_POLICY`."""
    recipes: dict[str, dict[str, Any]] = {}
    for r in report["results"]:
        if r["status"] == "not runnable here":
            recipes[r["recipe"]] = {"required": False, "reason": r["reason"].split(";")[0][:200]}
            continue
        if r["status"] != "ok":
            continue
        f = r["fidelity"]
        spi = r.get("seconds_per_image") or 0.0
        # Half the budget: a slower machine (or CI under load) must still reach min_images in time.
        n = min_images if spi * min_images <= 0.5 * budget_s else max(8, int(0.5 * budget_s / max(spi, 1e-9)))
        measured = {"images": r["images"], "top1_agreement": round(f["top1_agreement"], 4),
                    "sqnr_db": round(f["sqnr_db"], 2), "top1_drop": round(r["reference_top1"] - r["top1"], 4)}
        if r["precision"] == "fp32":
            t = dict(_FP32)
        else:
            p = f["top1_agreement"]
            margin = max(0.02, 3 * math.sqrt(max(p * (1 - p), 1e-4) / n))
            t = {"min_top1_agreement": round(max(0.0, p - margin), 3),
                 "min_sqnr_db": round(f["sqnr_db"] - 3.0, 1),
                 "max_top1_drop": round(max(0.01, measured["top1_drop"]) + margin, 3)}
        if n != min_images:
            t["min_images"] = n
        recipes[r["recipe"]] = t | {"measured": measured}
    w = report.get("weights", {})
    return {"schema": GATE_SCHEMA, "policy": GATE_POLICY, "weights": {"source": w.get("source"), "sha256": w.get("sha256")},
            "synthetic_weights": report.get("synthetic_weights"), "min_images": min_images,
            "baseline_tolerance": {"top1_agreement": 0.02, "sqnr_db": 1.0}, "recipes": recipes}


def baseline_dict(run: EvalRun) -> dict[str, Any]:
    """This run's numbers in baseline form (what --write-baseline saves)."""
    recipes = {
        r.recipe: {"top1_agreement": r.fidelity.top1_agreement, "top5_overlap": r.fidelity.top5_overlap,
                   "sqnr_db": r.fidelity.sqnr_db, "images": r.images}
        for r in run.results if r.status == "ok" and r.fidelity
    }
    return {"schema": BASELINE_SCHEMA, "weights_source": run.weights.get("source"),
            "weights_sha256": run.weights.get("sha256"), "data": run.data, "recipes": recipes}
