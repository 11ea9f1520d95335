"""convert -> eval -> gate -> reports -> classify, end to end on the tiny architecture.

Broken artifacts (normalization left out, one block perturbed) must fail the gate; faithful ones pass.
Bad inputs (changed sha256, truncated artifact, unreadable image, wrong input shape) give clear errors.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from converters.backends import get_builder  # noqa: E402
from converters.build import ConvertOptions, convert  # noqa: E402
from converters.model import export_model  # noqa: E402
from edge_convnext.cli import main  # noqa: E402
from edge_convnext.evaluate import EvalOptions, evaluate_paths  # noqa: E402
from edge_convnext.gate import GATE_SCHEMA, check_gate, load_gate  # noqa: E402
from edge_convnext.manifest import manifest_path, read_manifest, stamp, write_manifest  # noqa: E402
from edge_convnext.preprocessing import Preprocessing  # noqa: E402
from edge_convnext.recipes import ArtifactFormat  # noqa: E402

pytestmark = pytest.mark.convert
WEIGHTS = "random:0:convnext-test"
REF_IMAGES = 60


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("artifacts")
    report = convert(ConvertOptions(weights=WEIGHTS, recipes="tflite-fp32,executorch-xnnpack-fp32", out=out,
                                    reference_images=REF_IMAGES, parity_images=4, calibration_images=8),
                     echo=lambda s: None)
    assert report.ok, [o.error for o in report.outcomes]
    return out


@pytest.fixture(scope="module")
def gate_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gate") / "gate.json"
    fp32 = {"min_top1_agreement": 0.99, "min_sqnr_db": 60.0, "max_top1_drop": 0.01}
    path.write_text(json.dumps({"schema": GATE_SCHEMA, "min_images": 50,
                                "baseline_tolerance": {"top1_agreement": 0.01, "sqnr_db": 1.0},
                                "recipes": {"tflite-fp32": fp32, "executorch-xnnpack-fp32": fp32}}))
    return path


def test_convert_writes_artifacts_manifests_labels_reference(built):
    names = sorted(p.name for p in built.iterdir())
    assert names == ["executorch-xnnpack-fp32.json", "executorch-xnnpack-fp32.pte", "labels.txt", "reference.npz",
                     "tflite-fp32.json", "tflite-fp32.tflite"]  # nothing half-written or temporary left behind
    m = read_manifest(built / "tflite-fp32.json")
    assert m.weights["synthetic"] is True and m.weights["source"] == WEIGHTS
    assert m.parity["status"] == "measured" and m.parity["passed"] and m.parity["max_abs"] <= 1e-3
    assert (m.input.contract, m.input.shape, m.input.range) == ("rgb-nhwc-unit", (1, 224, 224, 3), (0.0, 1.0))
    assert (m.output.contract, m.output.shape) == ("probabilities", (1, 1000))
    et = read_manifest(built / "executorch-xnnpack-fp32.json")
    assert (et.input.contract, et.input.layout, et.output.contract) == ("rgb-nchw-unit", "NCHW", "probabilities")
    assert m.labels["count"] == 1000 and len(m.sha256) == 64 and m.size_bytes > 0
    assert m.toolchain["litert-torch"] and m.preprocessing["resize_shortest_edge"] == 256


def test_eval_faithful_artifacts_pass_the_gate(built, gate_file, tmp_path):
    run = evaluate_paths([built], EvalOptions())
    assert [r.recipe for r in run.results] == ["tflite-fp32", "executorch-xnnpack-fp32"]
    assert run.synthetic
    for r in run.results:
        assert r.status == "ok", r.reason
        assert r.images == REF_IMAGES and r.failed == 0
        assert r.fidelity.top1_agreement == 1.0 and r.fidelity.sqnr_db > 80
        assert r.fidelity.max_abs < 1e-3 and r.top1 == r.reference_top1
    assert check_gate(run, load_gate(gate_file)).passed


def _dir_with_reference(built: Path, out: Path) -> Path:
    """A new artifacts directory holding the built run's labels and stored reference, no artifacts."""
    out.mkdir()
    for f in ("labels.txt", "reference.npz"):
        shutil.copy(built / f, out / f)
    return out


def _rebuild_with(built: Path, tmp: Path, model: torch.nn.Module, name: str, make_context) -> Path:
    """A tflite-fp32 artifact built from ``model``, with a manifest otherwise copied from the good one."""
    out = _dir_with_reference(built, tmp / "broken")
    ctx = make_context("tflite-fp32")
    ctx.model = model
    get_builder(ArtifactFormat.TFLITE)(ctx, out / "tflite-fp32.tflite")
    m = read_manifest(built / "tflite-fp32.json")
    m.notes = [name]
    write_manifest(out / "tflite-fp32.json", stamp(out / "tflite-fp32.tflite", m))
    return out


@pytest.mark.parametrize("breakage", ["normalization left out", "one block perturbed"])
def test_broken_artifacts_fail_the_gate(built, gate_file, tmp_path, tiny_weights, make_context, breakage):
    if breakage == "normalization left out":
        model = export_model(tiny_weights.model, Preprocessing(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    else:
        model = export_model(tiny_weights.model, tiny_weights.preprocessing)
        with torch.no_grad():
            w = model.stages[2].layers[1].pwconv2.weight
            w.add_(0.5 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    out = _rebuild_with(built, tmp_path, model, breakage, make_context)
    run = evaluate_paths([out], EvalOptions())
    verdict = check_gate(run, load_gate(gate_file))
    assert not verdict.passed
    assert {c.metric for c in verdict.failures} >= {"top1_agreement", "sqnr_db"}
    assert main(["eval", str(out), "--gate", str(gate_file)]) == 2


def test_reports_json_markdown_junit_png(built, gate_file, tmp_path, capsys):
    files = {k: tmp_path / f"report.{k}" for k in ("json", "md", "xml", "png")}
    rc = main(["eval", str(built), "--gate", str(gate_file), "--json", str(files["json"]),
               "--markdown", str(files["md"]), "--junit", str(files["xml"]), "--plot", str(files["png"]),
               "--write-baseline", str(tmp_path / "baseline.json")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "SYNTHETIC WEIGHTS" in text and "gate: PASSED" in text and "tflite-fp32" in text
    data = json.loads(files["json"].read_text())
    assert data["synthetic_weights"] and data["gate"]["passed"] and len(data["results"]) == 2
    assert "| recipe |" in files["md"].read_text()
    suite = ET.parse(files["xml"]).getroot()
    assert suite.get("tests") == "2" and suite.get("failures") == "0"
    from PIL import Image

    with Image.open(files["png"]) as im:
        assert im.size == (1100, 720)
    # the baseline just written is met by the same artifacts
    assert main(["eval", str(built), "--gate", str(gate_file), "--baseline", str(tmp_path / "baseline.json")]) == 0
    # a gate derived from this measured report: fp32 gets the fixed tight bounds, and the run meets it
    assert main(["gate-init", str(files["json"]), "--out", str(tmp_path / "derived.json"), "--min-images", "50"]) == 0
    derived = load_gate(tmp_path / "derived.json")
    assert derived.recipes["tflite-fp32"]["min_top1_agreement"] == 0.995
    assert derived.recipes["tflite-fp32"]["measured"]["images"] == REF_IMAGES
    assert main(["eval", str(built), "--gate", str(tmp_path / "derived.json")]) == 0


def test_sha_mismatch_refused_unless_no_verify(built, tmp_path):
    out = tmp_path / "a"
    shutil.copytree(built, out)
    with open(out / "tflite-fp32.tflite", "ab") as fh:
        fh.write(b"\0")
    run = evaluate_paths([out / "tflite-fp32.tflite"], EvalOptions(limit=5))
    assert run.results[0].status == "error" and "does not match its manifest" in run.results[0].reason
    assert "--no-verify" in run.results[0].reason
    run = evaluate_paths([out / "tflite-fp32.tflite"], EvalOptions(limit=5, verify=False))
    assert run.results[0].status == "ok"


def test_budget_stops_early_and_says_so(built, capsys):
    run = evaluate_paths([built / "tflite-fp32.tflite"], EvalOptions(budget_s=0.0))
    r = run.results[0]
    assert r.status == "ok" and r.stopped_by_budget and r.images == 8  # one batch, then the budget is spent
    assert main(["eval", str(built / "tflite-fp32.tflite"), "--budget", "0"]) == 0
    assert "stopped by --budget" in capsys.readouterr().out


def test_truncated_artifact_names_the_file(built, tmp_path):
    out = tmp_path / "a"
    shutil.copytree(built, out)
    for name in ("tflite-fp32.tflite", "executorch-xnnpack-fp32.pte"):
        data = (out / name).read_bytes()
        (out / name).write_bytes(data[: len(data) // 2])
    run = evaluate_paths([out], EvalOptions(limit=5, verify=False))
    for r in run.results:
        assert r.status == "error" and Path(r.path).name in r.reason, r.reason


def test_unreadable_image_is_counted_and_the_run_goes_on(built, subset, tmp_path):
    data = tmp_path / "val"
    data.mkdir()
    ref_ids = [s.image_id for s in subset.split("evaluation")[:REF_IMAGES]]
    for s in subset.samples:
        if s.image_id in ref_ids:
            (data / s.image_id).symlink_to(s.path)
    broken = ref_ids[3]
    (data / broken).unlink()
    (data / broken).write_bytes(b"\xff\xd8\xff\xe0 truncated")
    gt = subset.root / "imagenet_val" / "ILSVRC2012_val_ground_truth_50000.txt"
    run = evaluate_paths([built / "tflite-fp32.tflite"], EvalOptions(data=data, ground_truth=gt))
    r = run.results[0]
    assert r.status == "ok" and r.failed == 1 and r.failed_ids == [broken] and r.images == REF_IMAGES - 1


@pytest.mark.parametrize("artifact", ["tflite-fp32.tflite", "executorch-xnnpack-fp32.pte"])
def test_overlapped_decoding_gives_the_sequential_results_bit_for_bit(built, subset, tmp_path, artifact):
    from edge_convnext.dataset import Sample
    from edge_convnext.shards import ArtifactJob, Shard, ShardSettings, run_shard

    samples = list(subset.split("evaluation")[:37])  # not a multiple of the batch: a short last batch
    broken = tmp_path / "broken.JPEG"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    samples[9] = Sample("broken.JPEG", broken, 0)
    m = read_manifest(manifest_path(built / artifact))
    job = ArtifactJob(str(built / artifact), m.recipe, m.format, m.precision, m.sha256, m.size_bytes)
    settings = ShardSettings(Preprocessing().to_dict(), threads=2)
    runs = {n: run_shard(Shard(job, 0, tuple(samples)), settings, decode_threads=n) for n in (0, 1, 3)}
    inline = runs[0]
    assert inline.status == "ok" and inline.failed_ids == ["broken.JPEG"] and len(inline.ids) == 36
    for n, r in runs.items():  # a bad image is counted as failed, and every logit is the inline run's
        assert r.status == "ok" and r.ids == inline.ids and r.failed_ids == inline.failed_ids, n
        assert np.array_equal(r.logits, inline.logits), n
        assert r.loop_seconds > 0


def test_eval_reports_images_per_second(built, capsys):
    assert main(["eval", str(built / "tflite-fp32.tflite"), "--limit", "16", "--decode-threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "img/s" in out and "images evaluated per second of the image loop" in out
    run = evaluate_paths([built / "tflite-fp32.tflite"], EvalOptions(limit=16, decode_threads=0))
    r = run.results[0]
    assert r.images == 16 and r.images_per_second > 0 and r.to_dict()["images_per_second"] == r.images_per_second


def test_wrong_input_shape_is_refused(built, tmp_path, tiny_weights):
    litert_torch = pytest.importorskip("litert_torch")
    out = _dir_with_reference(built, tmp_path / "small")
    model = export_model(tiny_weights.model, tiny_weights.preprocessing)
    nhwc = litert_torch.to_channel_last_io(model, args=[0])
    litert_torch.convert(nhwc, (torch.rand(1, 112, 112, 3),)).export(str(out / "tflite-fp32.tflite"))
    m = read_manifest(built / "tflite-fp32.json")
    write_manifest(out / "tflite-fp32.json", stamp(out / "tflite-fp32.tflite", m))
    r = evaluate_paths([out], EvalOptions(limit=3)).results[0]
    assert r.status == "error" and "[1, 112, 112, 3]" in r.reason and "[1, 224, 224, 3]" in r.reason, r.reason


def test_classify_prints_top5_names(built, samples_dir, capsys):
    rc = main(["classify", str(built / "tflite-fp32.tflite"), str(samples_dir / "n02123045_tabby.JPEG"),
               str(samples_dir / "missing.jpg"), "--json"])
    assert rc == 1  # one image could not be read: reported, and the other still classified
    out = json.loads(capsys.readouterr().out)
    assert len(out[0]["top"]) == 5 and out[1]["error"] and "missing.jpg" in out[1]["error"]
    probs = [t["probability"] for t in out[0]["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    labels = (built / "labels.txt").read_text().splitlines()
    assert all(labels[t["index"]] == t["label"] for t in out[0]["top"])


def test_tflite_eval_path_does_not_import_torch(built):
    code = (
        "import sys\n"
        "from edge_convnext.cli import main\n"
        f"rc = main(['eval', {str(built / 'tflite-fp32.tflite')!r}, '--limit', '5'])\n"
        "assert rc == 0, rc\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_rerun_rebuilds_cleanly_and_reuses_the_reference(built, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(built, out)
    before = (out / "reference.npz").stat().st_mtime_ns
    report = convert(ConvertOptions(weights=WEIGHTS, recipes="tflite-fp32", out=out, reference_images=REF_IMAGES,
                                    parity_images=2), echo=lambda s: None)
    assert report.ok
    assert (out / "reference.npz").stat().st_mtime_ns == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    m = read_manifest(manifest_path(out / "tflite-fp32.tflite"))
    assert m.parity["passed"] and m.created >= read_manifest(built / "tflite-fp32.json").created


def test_fp32_parity_bound_refuses_a_wrong_build(tmp_path, monkeypatch):
    import converters.build as build

    def broken_export(model, p):
        return export_model(model, Preprocessing(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))

    monkeypatch.setattr(build, "export_model", broken_export)
    report = convert(ConvertOptions(weights=WEIGHTS, recipes="tflite-fp32", out=tmp_path, reference_images=8,
                                    parity_images=4), echo=lambda s: None)
    assert not report.ok and "exceeds the bound" in report.outcomes[0].error
    assert not (tmp_path / "tflite-fp32.tflite").exists() and not (tmp_path / "tflite-fp32.json").exists()


def test_unknown_recipe_lists_valid_ones(capsys):
    assert main(["convert", "--recipes", "tflite-fp31"]) == 1
    err = capsys.readouterr().err
    assert "unknown recipe 'tflite-fp31'" in err and "tflite-fp32" in err


def test_stored_reference_matches_transformers(built, tiny_weights, subset):
    from converters.model import ReferenceClassifier
    from edge_convnext.preprocessing import preprocess_file
    from edge_convnext.reference import load_reference

    ref = load_reference(built / "reference.npz")
    by_id = {s.image_id: s for s in subset.samples}
    x = torch.from_numpy(np.stack([preprocess_file(by_id[i].path) for i in ref.image_ids[:4]]))
    with torch.no_grad():
        want = ReferenceClassifier(tiny_weights.model, tiny_weights.preprocessing)(x).numpy()
    assert np.abs(ref.logits[:4] - want).max() < 1e-5
    assert ref.meta["synthetic"] and ref.meta["weights_sha256"] == tiny_weights.identity.sha256


def test_classifier_api_takes_paths_pil_images_and_camera_frames(built, samples_dir):
    from PIL import Image

    from edge_convnext import Classifier

    clf = Classifier(built / "tflite-fp32.tflite", top=3)
    photo = samples_dir / "n02123045_tabby.JPEG"
    by_path = clf.classify(photo)
    assert len(by_path.top) == 3 and by_path.error is None
    labels = (built / "labels.txt").read_text().splitlines()
    assert all(labels[i] == name for i, name, _ in by_path.top)
    rgb = np.asarray(Image.open(photo).convert("RGB"))
    assert clf.classify(Image.fromarray(rgb)).top == by_path.top
    # Picamera2 "RGB888" frames are BGR in memory, "XRGB8888" BGRX: both give the photo's classes.
    assert clf.classify(rgb[:, :, ::-1], channel_order="BGR").top == by_path.top
    bgrx = np.concatenate([rgb[:, :, ::-1], np.full_like(rgb[:, :, :1], 255)], axis=2)
    assert clf.classify(bgrx, channel_order="BGRX").top == by_path.top
    # The same frame read with the wrong order is a different image: the order is not ignored.
    assert clf.classify(rgb[:, :, ::-1], channel_order="RGB").top != by_path.top
    with pytest.raises(ValueError, match="channel_order"):
        clf.classify(rgb)
    with pytest.raises(ValueError, match="uint8"):
        clf.classify(rgb.astype(np.float32), channel_order="RGB")


def test_classifier_raises_typed_errors_naming_the_file(built, samples_dir, tmp_path):
    from edge_convnext import Classifier
    from edge_convnext.errors import ArtifactError, ImageError, ManifestError

    clf = Classifier(built / "tflite-fp32.tflite")
    bad = tmp_path / "cut.jpg"
    bad.write_bytes((samples_dir / "n02123045_tabby.JPEG").read_bytes()[:2000])
    with pytest.raises(ImageError, match="cut.jpg"):
        clf.classify(bad)
    out = tmp_path / "a"
    shutil.copytree(built, out)
    art = out / "tflite-fp32.tflite"
    with open(art, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ManifestError, match="tflite-fp32.tflite"):
        Classifier(art)
    art.write_bytes(art.read_bytes()[: art.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="tflite-fp32.tflite"):
        Classifier(art, verify=False)


def test_parity_mode_compares_device_outputs_with_the_stored_host_outputs(built, tmp_path):
    from edge_convnext.parity import (HostOutputs, compare_outputs, load_bounds, load_outputs, parity_image_ids,
                                      run_artifact, save_outputs)
    from edge_convnext.errors import ManifestError

    art = built / "tflite-fp32.tflite"
    ids = parity_image_ids(built, 3)
    host = run_artifact(art, ids)
    save_outputs(tmp_path / "host.npz", HostOutputs(ids, {art.name: host}, "x86_64"))
    stored = load_outputs(tmp_path / "host.npz")
    assert stored.image_ids == ids and stored.machine == "x86_64"
    same = compare_outputs(art, stored, run_artifact(art, ids), load_bounds())
    assert same.passed and same.images == 3 and same.precision == "fp32" and same.max_abs < 1e-5
    # A device that computes something else (here: one logit off by 0.01) fails the fp32 bound.
    off = host.copy()
    off[0, 7] += 0.01
    worse = compare_outputs(art, stored, off, load_bounds())
    assert not worse.passed and worse.max_abs > worse.bound_max_abs
    with pytest.raises(ManifestError, match="no entry for"):
        compare_outputs(built / "executorch-xnnpack-fp32.pte", stored, host, load_bounds())


def test_quantized_parity_bounds_are_relative_to_the_artifacts_own_error(built, tmp_path):
    """With ``max_excess_db`` the SQNR bound is the host's own SQNR against the float reference on the
    same images (minus the excess): a device may differ from the host as much as the host differs from
    float, no more. Both sides' fidelity against float is reported."""
    from edge_convnext.errors import ManifestError
    from edge_convnext.metrics import center
    from edge_convnext.parity import HostOutputs, compare_outputs, parity_image_ids, run_artifact
    from edge_convnext.reference import load_reference

    art = built / "tflite-fp32.tflite"
    ids = parity_image_ids(built, 3)
    ref = load_reference(built / "reference.npz")
    floats = ref.logits[ref.rows(ids)]
    host = run_artifact(art, ids)
    stored = HostOutputs(ids, {art.name: host}, "x86_64")
    noise = np.random.default_rng(0).normal(size=host.shape)
    h = center(host)
    noise *= np.sqrt(np.sum(h**2) / np.sum(center(noise) ** 2) / 1e6)  # 60 dB from the host's outputs
    device = (h + center(noise)).astype(np.float32)

    def bounds(excess: float) -> dict:
        return {"fp32": {"min_sqnr_db": 10.0, "max_abs": 100.0, "max_excess_db": excess}}

    strict = compare_outputs(art, stored, device, bounds(0.0), floats)
    assert strict.host_vs_float_sqnr_db > 90 and strict.bound_min_sqnr_db == strict.host_vs_float_sqnr_db
    assert strict.sqnr_db == pytest.approx(60.0, abs=0.5) and not strict.passed
    assert strict.device_vs_float_sqnr_db == pytest.approx(60.0, abs=0.5)
    loose = compare_outputs(art, stored, device, bounds(strict.host_vs_float_sqnr_db - 50.0), floats)
    assert loose.bound_min_sqnr_db == pytest.approx(50.0) and loose.passed and "host vs float" in loose.bound_rule
    with pytest.raises(ManifestError, match="give the reference"):
        compare_outputs(art, stored, device, bounds(0.0))
