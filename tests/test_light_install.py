"""The device-side path in a virtual environment holding only the light extra (what a Raspberry Pi gets).

Builds full-size ConvNeXt-T ``tflite-fp32`` with the converter stack here, then creates a fresh venv with
``pip install '.[litert]' pytest`` (NumPy, Pillow, ai-edge-litert: no torch) and runs there: ``info``,
``eval``, ``classify`` and the ``device_tests`` suite against those artifacts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from edge_convnext.dataset import locate_data_dir

pytestmark = [pytest.mark.full, pytest.mark.convert]


@pytest.fixture(scope="module")
def full_artifacts(tmp_path_factory) -> Path:
    from converters.build import ConvertOptions, convert

    out = tmp_path_factory.mktemp("full-artifacts")
    report = convert(ConvertOptions(weights="random:0", recipes="tflite-fp32", out=out, reference_images=120,
                                    parity_images=8), echo=print)
    assert report.ok, [o.error for o in report.outcomes]
    m = report.outcomes[0].manifest
    assert 100e6 < m.size_bytes < 130e6  # full ConvNeXt-T in fp32 (28.6 M parameters)
    return out


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("light") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", f"{REPO}[litert]", "pytest"], check=True)
    return venv


def _run(venv: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["EDGE_CONVNEXT_DATA"] = str(locate_data_dir())
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=cwd or REPO.parent, env=env, text=True,
                          capture_output=True, timeout=900)


def test_light_venv_has_no_torch_and_info_works(light_venv):
    r = _run(light_venv, "python", "-c", "import torch")
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    r = _run(light_venv, "edge-convnext", "info")
    assert r.returncode == 0, r.stderr
    assert "tflite       yes" in r.stdout and "torch                not installed" in r.stdout
    assert "converters (build artifacts):\n  coreml       no" in r.stdout


def test_eval_and_classify_in_the_light_venv(light_venv, full_artifacts):
    art = full_artifacts / "tflite-fp32.tflite"
    r = _run(light_venv, "edge-convnext", "eval", str(full_artifacts), "--limit", "120", "--gate")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SYNTHETIC WEIGHTS" in r.stdout and "gate: PASSED" in r.stdout
    sample = locate_data_dir() / "samples" / "n02123045_tabby.JPEG"
    r = _run(light_venv, "edge-convnext", "classify", str(art), str(sample))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("%") == 5


def test_device_tests_pass_in_the_light_venv(light_venv, full_artifacts):
    r = _run(light_venv, "python", "-m", "pytest", str(REPO / "device_tests"), "-p", "no:cacheprovider",
             "--artifacts", str(full_artifacts), "--limit", "120", "-q", cwd=REPO / "device_tests")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "3 passed" in r.stdout


_API_SCRIPT = r"""
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
from edge_convnext import Classifier
from edge_convnext.errors import ArtifactError, ImageError, ManifestError

art, photo, bad_photo, bad_art = (Path(a) for a in sys.argv[1:5])
clf = Classifier(art)
by_path = clf.classify(photo)
rgb = np.asarray(Image.open(photo).convert("RGB"))
frame = clf.classify(rgb[:, :, ::-1], channel_order="BGR")  # Picamera2 RGB888 is BGR in memory
errors = {}
for name, call in [("photo", lambda: clf.classify(bad_photo)), ("artifact", lambda: Classifier(bad_art))]:
    try:
        call()
    except (ImageError, ArtifactError, ManifestError) as e:
        errors[name] = [type(e).__name__, str(e)]
print(json.dumps({"path": by_path.to_dict(), "frame": frame.to_dict(), "errors": errors,
                  "torch": "torch" in sys.modules}))
"""


def test_classifier_api_and_classify_json_in_the_light_venv(light_venv, full_artifacts, tmp_path):
    import json
    import shutil

    art = full_artifacts / "tflite-fp32.tflite"
    photo = locate_data_dir() / "samples" / "n02123045_tabby.JPEG"
    bad_photo = tmp_path / "cut.jpg"
    bad_photo.write_bytes(photo.read_bytes()[:1500])
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("tflite-fp32.json", "labels.txt"):
        shutil.copy(full_artifacts / name, broken / name)
    (broken / "tflite-fp32.tflite").write_bytes(art.read_bytes()[:4096])  # truncated: sha256 no longer matches
    script = tmp_path / "api.py"
    script.write_text(_API_SCRIPT)
    r = _run(light_venv, "python", str(script), str(art), str(photo), str(bad_photo),
             str(broken / "tflite-fp32.tflite"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert not out["torch"] and len(out["path"]["top"]) == 5
    assert out["frame"]["top"] == out["path"]["top"]  # the BGR frame, reordered, is the same photo
    assert out["errors"]["photo"][0] == "ImageError" and "cut.jpg" in out["errors"]["photo"][1]
    assert out["errors"]["artifact"][0] == "ManifestError" and "tflite-fp32.tflite" in out["errors"]["artifact"][1]
    r = _run(light_venv, "edge-convnext", "classify", "--json", str(art), str(photo), str(bad_photo))
    assert r.returncode == 1  # one unreadable photo: reported in the JSON, the other still classified
    preds = json.loads(r.stdout)
    assert preds[0]["top"] == out["path"]["top"] and "cut.jpg" in preds[1]["error"]
