"""Gate logic on constructed results (no artifacts needed): thresholds, not-runnable, baselines."""

from __future__ import annotations

import json
import math

import pytest

from edge_convnext.errors import ManifestError
from edge_convnext.evaluate import ArtifactResult, EvalRun
from edge_convnext.gate import GATE_SCHEMA, Gate, baseline_dict, check_gate, gate_from_report, load_gate
from edge_convnext.metrics import Fidelity


def _result(recipe: str, agree: float, sqnr: float, images: int = 200, status: str = "ok") -> ArtifactResult:
    fid = Fidelity(images, 0.5, sqnr, 0.99, 0.01, agree, 0.9) if status == "ok" else None
    return ArtifactResult(recipe=recipe, path=f"{recipe}.x", format="tflite", precision="int8", status=status,
                          reason=None if status == "ok" else "runs on Apple devices only", images=images,
                          top1=0.10, reference_top1=0.11, fidelity=fid, seconds_per_image=0.05)


def _run(*results: ArtifactResult, sha: str = "abc") -> EvalRun:
    return EvalRun(list(results), {"source": "random:0", "sha256": sha}, True, "data", "ref.npz", 200)


GATE = Gate({"q": {"min_top1_agreement": 0.8, "min_sqnr_db": 20.0, "max_top1_drop": 0.02},
             "apple": {"required": False, "reason": "Apple only"}, "must": {"min_sqnr_db": 1.0}},
            min_images=100, baseline_tolerance={"top1_agreement": 0.01, "sqnr_db": 1.0})


def test_thresholds_pass_and_fail():
    assert check_gate(_run(_result("q", 0.85, 22.0)), GATE).passed
    verdict = check_gate(_run(_result("q", 0.75, 19.0)), GATE)
    assert {c.metric for c in verdict.failures} == {"top1_agreement", "sqnr_db"}
    assert not check_gate(_run(_result("q", 0.85, 22.0, images=50)), GATE).passed  # too few images


def test_not_runnable_fails_unless_not_required_and_ungated_is_noted():
    verdict = check_gate(_run(_result("apple", 0, 0, status="not runnable here")), GATE)
    assert verdict.passed and "not required" in verdict.checks[0].note
    assert not check_gate(_run(_result("must", 0, 0, status="not runnable here")), GATE).passed
    verdict = check_gate(_run(_result("other", 0.9, 30.0)), GATE)
    assert verdict.passed and "not gated" in verdict.notes[0]


def test_baseline_regressions(tmp_path):
    good = _run(_result("q", 0.90, 25.0))
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(baseline_dict(good)))
    assert check_gate(good, GATE, baseline=path).passed
    worse = check_gate(_run(_result("q", 0.87, 23.5)), GATE, baseline=path)
    assert {c.metric for c in worse.failures} == {"top1_agreement vs baseline", "sqnr_db vs baseline"}
    other = check_gate(_run(_result("q", 0.87, 23.5), sha="zzz"), GATE, baseline=path)
    assert other.passed and "other weights" in other.notes[0]
    missing = check_gate(good, GATE, baseline=tmp_path / "none.json")
    assert "no baseline yet" in missing.notes[0]


def test_gate_from_report_policy():
    report = {"weights": {"source": "random:0"}, "synthetic_weights": True, "results": [
        {"recipe": "a-fp32", "precision": "fp32", "status": "ok", "images": 1000, "top1": 0.1, "reference_top1": 0.1,
         "seconds_per_image": 0.07, "fidelity": {"top1_agreement": 1.0, "sqnr_db": 115.0}},
        {"recipe": "a-int8", "precision": "int8", "status": "ok", "images": 1000, "top1": 0.1, "reference_top1": 0.1,
         "seconds_per_image": 0.05, "fidelity": {"top1_agreement": 0.85, "sqnr_db": 22.0}},
        {"recipe": "slow", "precision": "w8a16", "status": "ok", "images": 130, "top1": 0.1, "reference_top1": 0.1,
         "seconds_per_image": 2.3, "fidelity": {"top1_agreement": 0.85, "sqnr_db": 24.0}},
        {"recipe": "apple", "precision": "fp16", "status": "not runnable here", "reason": "x.pte: Apple only; more"},
    ]}
    g = gate_from_report(report)
    r = g["recipes"]
    assert r["a-fp32"]["min_top1_agreement"] == 0.995 and r["a-fp32"]["min_sqnr_db"] == 80.0
    margin = 3 * math.sqrt(0.85 * 0.15 / 100)
    assert r["a-int8"]["min_top1_agreement"] == round(0.85 - margin, 3) and r["a-int8"]["min_sqnr_db"] == 19.0
    assert r["slow"]["min_images"] == int(0.5 * 120 / 2.3)
    assert r["apple"] == {"required": False, "reason": "x.pte: Apple only"}
    assert g["schema"] == GATE_SCHEMA and "policy" in g


def test_bad_gate_files(tmp_path):
    bad = tmp_path / "g.json"
    bad.write_text("{}")
    with pytest.raises(ManifestError, match="not a gate file"):
        load_gate(bad)
    bad.write_text(json.dumps({"schema": GATE_SCHEMA, "recipes": {"q": {"min_sqnr": 3}}}))
    with pytest.raises(ManifestError, match=r"unknown threshold\(s\) \['min_sqnr'\]"):
        load_gate(bad)


def test_gate_for_other_weights_fails_unless_asked():
    gate = Gate(GATE.recipes, min_images=100, source="g.json", weights={"source": "random:0", "sha256": "abc"})
    assert check_gate(_run(_result("q", 0.85, 22.0), sha="abc"), gate).passed
    other = check_gate(_run(_result("q", 0.85, 22.0), sha="real"), gate)
    assert [c.metric for c in other.failures] == ["weights"]
    assert "measured on weights random:0" in other.failures[0].note and "gate-init" in other.failures[0].note
    anyway = check_gate(_run(_result("q", 0.85, 22.0), sha="real"), gate, other_weights=True)
    assert anyway.passed and "checked anyway" in anyway.checks[0].note
    # a v1 gate file names only the source: compared by source
    v1 = Gate(GATE.recipes, min_images=100, weights={"source": "random:0"})
    assert check_gate(_run(_result("q", 0.85, 22.0), sha="x"), v1).passed


def test_packaged_gate_names_its_weights():
    from edge_convnext.cli import DEFAULT_GATE
    g = load_gate(DEFAULT_GATE)
    assert g.weights.get("source") and len(g.weights.get("sha256") or "") == 64
