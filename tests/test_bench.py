"""``edge-convnext bench``: every row in its own process, with fidelity, and the peers on the same weights.

No timing is asserted (speed goals are met in printed benchmarks, not in tests): these tests check that
each row is measured, isolated and reported with its accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("litert_torch")
pytest.importorskip("onnxruntime")

from conftest import convert_tiny  # noqa: E402
from edge_convnext.bench import BenchOptions, bench, ratios, table  # noqa: E402
from edge_convnext.cli import main  # noqa: E402

pytestmark = pytest.mark.convert


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return convert_tiny(tmp_path_factory.mktemp("bench"), "tflite-fp32,tflite-int8",
                        reference_images=16, parity_images=4, calibration_images=8)


def test_peers_and_artifacts_side_by_side_with_fidelity(built):
    rows = bench([built], BenchOptions(runs=3, warmup=1, threads=1, fidelity_images=8, peers=True))
    by = {r.name: r for r in rows}
    assert list(by) == ["onnxruntime-fp32", "pytorch-eager-fp32", "tflite-fp32", "tflite-int8"]
    assert all(r.status == "ok" for r in rows), [r.status for r in rows]
    for r in rows:
        assert r.median_ms > 0 and r.p90_ms >= r.median_ms and r.load_s >= 0 and r.fidelity["images"] == 8
    # Same weights and float32: the peers and the fp32 artifact match the stored reference.
    for name in ("onnxruntime-fp32", "pytorch-eager-fp32", "tflite-fp32"):
        assert by[name].fidelity["sqnr_db"] > 80 and by[name].fidelity["top1_agreement"] == 1.0, by[name]
    assert by["tflite-int8"].fidelity["sqnr_db"] < 60  # quantized: its loss is reported next to its speed
    rel = ratios(rows)
    assert rel[0] == 1.0 and all(v is not None and v > 0 for v in rel)
    # Each row ran in its own process: the LiteRT worker never loaded torch, the eager one did.
    assert by["tflite-fp32"].peak_rss_mb < by["pytorch-eager-fp32"].peak_rss_mb - 100
    assert "vs ORT fp32" in table(rows, 1)


def test_light_bench_ratios_to_the_format_fp32_and_writes_reports(built, tmp_path, capsys):
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    assert main(["bench", str(built), "--runs", "2", "--warmup", "0", "--threads", "1", "--fidelity-images", "4",
                 "--json", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "vs format fp32" in text and "tflite-int8" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["tflite-fp32", "tflite-int8"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_broken_artifact_is_a_row_with_its_error(built, tmp_path):
    broken = tmp_path / "tflite-fp32.tflite"
    broken.write_bytes((built / "tflite-fp32.tflite").read_bytes()[:1000])
    (tmp_path / "tflite-fp32.json").write_text((built / "tflite-fp32.json").read_text())
    (tmp_path / "reference.npz").write_bytes((built / "reference.npz").read_bytes())
    (row,) = bench([broken], BenchOptions(runs=1, warmup=0, threads=1, fidelity_images=2))
    assert row.status.startswith("error") and "tflite-fp32.tflite" in row.status
