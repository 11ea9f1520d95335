"""Run on the target device (Raspberry Pi with the light install, a Mac for Core ML) against artifacts.

    python -m pytest device_tests --artifacts DIR [--data DIR] [--gate FILE] [--limit N] [--threads N]
                                  [--parity HOST_OUTPUTS.npz [--parity-report DIR]]

DIR holds what ``edge-convnext convert`` wrote: artifacts, their ``.json`` manifests, ``labels.txt`` and
``reference.npz``. No torch is needed: the stored reference replaces the float model.

Parity mode (``--parity``, what ``device_tests/emulate-pi`` uses): the statistical gate needs its minimum
image count, which emulation (4-18 s per image) cannot afford. Instead each artifact's outputs here are
compared with the build host's outputs of the same artifact on the same images, within the per-precision
bounds of ``edge_convnext/gates/arm-parity.json``; the gate test is skipped with that reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_convnext.evaluate import find_artifacts


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("edge-convnext device tests")
    g.addoption("--artifacts", default=os.environ.get("EDGE_CONVNEXT_ARTIFACTS", "artifacts"),
                help="directory written by `edge-convnext convert` (default: ./artifacts)")
    g.addoption("--data", default=None, help="ImageNet val data directory (default: ../shared/data)")
    g.addoption("--gate", default=None, help="gate thresholds file (default: the packaged one)")
    g.addoption("--gate-other-weights", action="store_true",
                help="check a gate measured on other weights than the artifacts' (refused by default)")
    g.addoption("--limit", type=int, default=200, help="evaluation images per artifact (default 200)")
    g.addoption("--threads", type=int, default=None, help="runtime threads")
    g.addoption("--parity", type=Path, default=None,
                help="host outputs (.npz from emulate-pi): check parity against them instead of the gate")
    g.addoption("--parity-report", type=Path, default=None, help="write one parity JSON per artifact here")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "artifact" in metafunc.fixturenames:
        root = Path(metafunc.config.getoption("--artifacts"))
        if not root.is_dir():
            raise pytest.UsageError(f"--artifacts {root}: no such directory; run `edge-convnext convert` first")
        arts = find_artifacts([root])
        metafunc.parametrize("artifact", arts, ids=[a.name for a in arts])


@pytest.fixture(scope="session")
def artifacts_dir(pytestconfig: pytest.Config) -> Path:
    return Path(pytestconfig.getoption("--artifacts"))
