"""Each artifact: intact, loadable here, faithful on the shared preprocessing, and within its gate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_convnext.cli import DEFAULT_GATE
from edge_convnext.contract import input_contract, output_contract
from edge_convnext.dataset import load_subset
from edge_convnext.errors import RuntimeUnavailable
from edge_convnext.evaluate import EvalOptions, evaluate_paths
from edge_convnext.gate import check_gate, load_gate
from edge_convnext.labels import read_labels
from edge_convnext.fileio import write_json_atomic
from edge_convnext.metrics import center
from edge_convnext.manifest import manifest_path, read_manifest, verify_artifact
from edge_convnext.parity import compare_outputs, load_bounds, load_outputs, run_artifact
from edge_convnext.preprocessing import Preprocessing, preprocess_file
from edge_convnext.recipes import get_recipe
from edge_convnext.reference import REFERENCE_FILE, load_reference
from edge_convnext.runners import open_runner


def _runner_or_skip(artifact: Path, threads: int | None):
    m = read_manifest(manifest_path(artifact))
    try:
        return m, open_runner(artifact, m, threads=threads)
    except RuntimeUnavailable as e:
        pytest.skip(f"not runnable on this device: {e}")


def test_manifest_sha256_and_labels(artifact: Path) -> None:
    m = read_manifest(manifest_path(artifact))
    verify_artifact(artifact, m)
    labels = read_labels(artifact.parent / m.labels["file"])
    assert len(labels) == m.labels["count"] == m.output.shape[-1]
    # Each format's own contract (NHWC for TFLite, an image feature for Core ML, NCHW for ExecuTorch),
    # one this harness knows.
    assert input_contract(artifact, m.input).shape == tuple(m.input.shape)
    assert output_contract(artifact, m.output).probabilities


def test_runs_the_stored_reference_images(artifact: Path, artifacts_dir: Path, pytestconfig) -> None:
    """The shared preprocessing + this runtime give finite logits; fp32 artifacts match the reference tightly."""
    m, runner = _runner_or_skip(artifact, pytestconfig.getoption("--threads"))
    ref = load_reference(artifacts_dir / REFERENCE_FILE)
    subset = load_subset(pytestconfig.getoption("--data"))
    by_id = {s.image_id: s for s in subset.samples}
    ids = ref.image_ids[: min(4, pytestconfig.getoption("--limit"))]  # emulation: --limit 3 costs 3 images
    x = np.stack([preprocess_file(by_id[i].path, Preprocessing.from_dict(m.preprocessing)) for i in ids])
    got = runner.run(x)
    assert got.shape == (len(ids), m.output.shape[-1]) and got.dtype == np.float32
    assert np.isfinite(got).all()
    bound = get_recipe(m.recipe).parity_max_abs
    if bound is not None:
        # Logits up to a per-image constant (probability artifacts give log p): compared centered.
        err = float(np.abs(center(got) - center(ref.logits[ref.rows(ids)])).max())
        assert err <= bound, f"{artifact.name}: max abs logit error {err:.3g} > {bound:g} on this device"


def test_matches_host_outputs(artifact: Path, artifacts_dir: Path, pytestconfig) -> None:
    """Parity mode: this device's outputs against the build host's, same artifact, same images."""
    host_file = pytestconfig.getoption("--parity")
    if host_file is None:
        pytest.skip("parity mode off (give --parity HOST_OUTPUTS.npz, as device_tests/emulate-pi does)")
    _runner_or_skip(artifact, pytestconfig.getoption("--threads"))
    host = load_outputs(host_file)
    device = run_artifact(artifact, host.image_ids, pytestconfig.getoption("--data"),
                          pytestconfig.getoption("--threads"))
    ref = load_reference(artifacts_dir / REFERENCE_FILE)
    result = compare_outputs(artifact, host, device, load_bounds(), ref.logits[ref.rows(host.image_ids)])
    report_dir = pytestconfig.getoption("--parity-report")
    if report_dir is not None:
        write_json_atomic(Path(report_dir) / f"{artifact.name}.json", result.to_dict())
    assert result.passed, (
        f"{artifact.name} on {result.device_machine} vs {result.host_machine}, {result.images} images: "
        f"max abs {result.max_abs:.3g} (bound {result.bound_max_abs:g}), SQNR {result.sqnr_db:.1f} dB "
        f"(bound >= {result.bound_min_sqnr_db:.1f}: {result.bound_rule}) on centered log-probabilities")


def test_meets_its_gate(artifact: Path, artifacts_dir: Path, pytestconfig) -> None:
    if pytestconfig.getoption("--parity") is not None:
        pytest.skip("parity mode: the statistical gate needs its minimum image count, more than emulation "
                    "affords; checked instead by test_matches_host_outputs (the gate runs on a real device)")
    _runner_or_skip(artifact, pytestconfig.getoption("--threads"))
    opts = EvalOptions(data=pytestconfig.getoption("--data"), limit=pytestconfig.getoption("--limit"),
                       threads=pytestconfig.getoption("--threads"))
    run = evaluate_paths([artifact], opts)
    result = run.results[0]
    assert result.status == "ok", result.reason
    gate_file = pytestconfig.getoption("--gate") or DEFAULT_GATE
    gate = load_gate(Path(gate_file))
    assert result.recipe in gate.recipes, f"{gate_file} has no thresholds for {result.recipe}"
    verdict = check_gate(run, gate, other_weights=pytestconfig.getoption("--gate-other-weights"))
    failures = [f"{c.metric}: {c.actual} (limit {c.limit}) {c.note}" for c in verdict.failures]
    assert not failures, f"{artifact.name} misses its gate: " + "; ".join(failures)
