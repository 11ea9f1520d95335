"""Small pieces with no runtime: metrics, manifests, atomic writes, recipes, the CLI without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edge_convnext.errors import ManifestError
from edge_convnext.fileio import atomic_path, sha256_path, write_text_atomic
from edge_convnext.contract import INPUT_CONTRACTS, OUTPUT_CONTRACTS
from edge_convnext.manifest import Manifest, manifest_path, read_manifest, write_manifest
from edge_convnext.metrics import accuracy, compare, sqnr_db, topk
from edge_convnext.recipes import RECIPES, UnknownRecipeError, select_recipes


def test_metrics_against_hand_computed_values():
    ref = np.array([[3.0, 1.0, 0.0, -1.0, -2.0, -3.0], [0.0, 2.0, 1.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    act = ref + np.array([[0, 0, 0, 0, 0, 0.5], [0, -1.5, 0, 0, 0, 0]], dtype=np.float32)
    f = compare(ref, act)
    # Fidelity is over logits centered per image: row 1's error [0,0,0,0,0,.5] becomes .5 - .5/6 at class 5.
    cr, ca = ref - ref.mean(1, keepdims=True), act - act.mean(1, keepdims=True)
    assert f.max_abs == pytest.approx(1.5 - 1.5 / 6)
    assert f.sqnr_db == pytest.approx(10 * np.log10(np.sum(cr**2) / np.sum((cr - ca) ** 2)))
    assert f.top1_agreement == 0.5  # row 2's top-1 moves from class 1 to class 2
    p = np.exp(ref[0]) / np.exp(ref[0]).sum()
    q = np.exp(act[0]) / np.exp(act[0]).sum()
    p2 = np.exp(ref[1]) / np.exp(ref[1]).sum()
    q2 = np.exp(act[1]) / np.exp(act[1]).sum()
    assert f.kl == pytest.approx((np.sum(p * np.log(p / q)) + np.sum(p2 * np.log(p2 / q2))) / 2, rel=1e-6)
    assert compare(ref, ref).sqnr_db == float("inf") and sqnr_db(ref, ref * 0) == 0.0
    assert topk(ref, 3).tolist() == [[0, 1, 2], [1, 2, 0]]
    assert accuracy(ref, np.array([0, 2])) == (0.5, 1.0)


def test_fidelity_ignores_per_image_offsets_and_reads_probabilities_as_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 5, (4, 1000)).astype(np.float32)
    shifted = logits + rng.normal(0, 50, (4, 1)).astype(np.float32)
    assert compare(logits, shifted).sqnr_db > 100
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p = (p / p.sum(1, keepdims=True)).astype(np.float32)
    log_p = OUTPUT_CONTRACTS["probabilities"].log_scores(p)
    f = compare(logits, log_p)
    assert f.max_abs < 1e-4 and f.sqnr_db > 90 and f.top1_agreement == 1.0
    # Uncentered log-probabilities would count the per-image offset (logsumexp) as signal.
    assert sqnr_db(logits, log_p) < f.sqnr_db - 60
    # A probability that underflowed to 0 is floored, never -inf.
    assert np.isfinite(OUTPUT_CONTRACTS["probabilities"].log_scores(np.zeros((1, 1000), np.float32))).all()


def _manifest() -> Manifest:
    return Manifest(recipe="tflite-fp32", format="tflite", precision="fp32", file="tflite-fp32.tflite",
                    input=INPUT_CONTRACTS["rgb-nhwc-unit"].spec("image"),
                    output=OUTPUT_CONTRACTS["probabilities"].spec("probabilities"), preprocessing={"crop_size": 224},
                    weights={"source": "random:0", "synthetic": True, "sha256": "0" * 64},
                    labels={"file": "labels.txt", "count": 1000}, toolchain={"python": "3"}, created="now")


def test_manifest_round_trip_and_errors(tmp_path):
    m = _manifest()
    path = manifest_path(tmp_path / "tflite-fp32.tflite")
    assert path.name == "tflite-fp32.json"
    assert manifest_path(tmp_path / "coreml-fp16.mlpackage").name == "coreml-fp16.json"
    write_manifest(path, m)
    back = read_manifest(path)
    assert back.to_dict() == m.to_dict() and back.synthetic_weights
    assert "sha256" not in m.embedded_dict() and "parity" not in m.embedded_dict()
    path.write_text("{not json")
    with pytest.raises(ManifestError, match=r"tflite-fp32\.json: manifest is not valid JSON"):
        read_manifest(path)
    d = m.to_dict()
    del d["weights"]
    path.write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="lacks weights"):
        read_manifest(path)
    with pytest.raises(ManifestError, match="no manifest beside the artifact"):
        read_manifest(tmp_path / "none.json")


def test_atomic_writes_leave_nothing_half_written(tmp_path):
    target = tmp_path / "out.bin"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    pkg = tmp_path / "m.mlpackage"
    for content in ("v1", "v2"):  # a directory artifact is replaced whole
        with atomic_path(pkg) as tmp:
            tmp.mkdir()
            (tmp / "weights.bin").write_text(content)
    assert (pkg / "weights.bin").read_text() == "v2" and len(list(tmp_path.iterdir())) == 2
    assert len(sha256_path(pkg)) == 64


def test_recipe_table_and_selection():
    names = [r.name for r in RECIPES]
    assert len(names) == len(set(names))
    assert [r.name for r in select_recipes("tflite")] == [n for n in names if n.startswith("tflite-")]
    assert len(select_recipes("all")) == len(RECIPES)
    with pytest.raises(UnknownRecipeError, match="valid recipes: coreml-fp32"):
        select_recipes("coreml-fp33")
    assert all(r.parity_max_abs == 1e-3 for r in RECIPES if r.precision == "fp32")


def test_info_and_recipes_run_without_torch():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any import of torch now fails\n"
        "from edge_convnext.cli import main\n"
        "assert main(['info']) == 0\n"
        "assert main(['recipes']) == 0\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "runtimes (run artifacts):" in r.stdout and "tflite-int8" in r.stdout
    assert "torch                not installed" in r.stdout
