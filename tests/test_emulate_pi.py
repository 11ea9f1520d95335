"""The Raspberry Pi path on emulated aarch64: ``device_tests/emulate-pi`` on ``tflite-fp32`` and ``tflite-int8``.

Tiny architecture (``random:0:convnext-test``) so the emulated runs take seconds, not the 4-18 s per
image of full ConvNeXt-T; the full-size numbers are measured by hand (README "Raspberry Pi"). Where the
emulation cannot run (not root, no qemu-user-static or debootstrap, no network for a cold cache) the
test fails with emulate-pi's reason: `.ci/setup` installs the tools, so a skip would hide a broken CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, convert_tiny

pytestmark = [pytest.mark.emulation, pytest.mark.convert]
LIMIT = 2


@pytest.fixture(scope="module")
def tiny_tflite(tmp_path_factory) -> Path:
    return convert_tiny(tmp_path_factory.mktemp("pi-artifacts"), "tflite-fp32,tflite-int8",
                        reference_images=8, parity_images=4, calibration_images=8)


def test_emulate_pi_runs_info_classify_eval_and_device_tests_on_aarch64(tiny_tflite, tmp_path):
    work = tmp_path / "work"
    # Cortex-A76 (Pi 5): its dot-product int8 kernels are the ones that differ most from x86; the
    # tiny models make both CPUs cheap, so the Pi 4 (A72) runs too.
    r = subprocess.run([sys.executable, str(REPO / "device_tests" / "emulate-pi"), str(tiny_tflite),
                        "--limit", str(LIMIT), "--cpu", "both", "--work", str(work)],
                       text=True, capture_output=True, timeout=1500)
    if r.returncode == 3:
        pytest.fail(r.stderr.strip().splitlines()[-1])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert "aarch64" in r.stdout and "emulate-pi: PASSED" in r.stdout
    summary = json.loads((work / "summary.json").read_text())
    assert summary["ok"] and all(s["ok"] for s in summary["steps"])
    got = {(p["cpu"], p["artifact"]): p for p in summary["parity"]}
    assert set(got) == {(c, a) for c in ("cortex-a72", "cortex-a76") for a in ("tflite-fp32.tflite", "tflite-int8.tflite")}
    for p in got.values():
        assert p["device_machine"] == "aarch64" and p["host_machine"] == "x86_64" and p["images"] == LIMIT
        assert p["passed"], p
        assert p["host_vs_float_sqnr_db"] > 20 and p["device_vs_float_sqnr_db"] > 20
        if p["precision"] == "int8":  # the relative rule: no worse than the artifact's own error on x86
            assert p["bound_min_sqnr_db"] >= p["host_vs_float_sqnr_db"], p
    assert [s["cpu"] for s in summary["steps"] if s["name"] == "device_tests"] == ["cortex-a72", "cortex-a76"]
