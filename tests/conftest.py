"""Shared fixtures. Fast tests use the tiny ``convnext-test`` architecture with synthetic weights.

Data comes from ../shared/data beside the repository (never copied into it); the directory can be
overridden with EDGE_CONVNEXT_DATA.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from edge_convnext.dataset import ImageNetSubset, load_subset

REPO = Path(__file__).resolve().parents[1]
HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.fixture(scope="session")
def subset() -> ImageNetSubset:
    return load_subset()


@pytest.fixture(scope="session")
def samples_dir(subset: ImageNetSubset) -> Path:
    return subset.root / "samples"


def convert_tiny(out: Path, recipes: str, **options) -> Path:
    """``convert`` the tiny synthetic ConvNeXt into ``out`` (a few images per stage, no echo); all must build."""
    from converters.build import ConvertOptions, convert

    report = convert(ConvertOptions(weights="random:0:convnext-test", recipes=recipes, out=out, **options),
                     echo=lambda s: None)
    assert report.ok, [o.error for o in report.outcomes]
    return out


if HAS_TORCH:

    @pytest.fixture(scope="session")
    def tiny_weights():
        """Synthetic ConvNeXt with depths 1,1,2,1 and dims 16..128 (seconds to convert)."""
        from converters.weights import load_weights

        return load_weights("random:0:convnext-test")

    @pytest.fixture(scope="session")
    def tiny_calibration(subset, tiny_weights):
        from converters.calibration import CalibrationStream

        return CalibrationStream(subset.split("calibration"), tiny_weights.preprocessing)

    @pytest.fixture
    def make_context(tmp_path, subset, tiny_weights, tiny_calibration):
        """``make_context(recipe_name, weights=None, calibration_count=16)`` -> BuildContext."""
        import torch

        from converters.context import BuildContext
        from edge_convnext.labels import unique_labels
        from converters.model import export_model
        from edge_convnext.recipes import get_recipe

        def make(recipe_name: str, weights=None, calibration_count: int = 16) -> BuildContext:
            w = weights or tiny_weights
            example = torch.from_numpy(next(iter(tiny_calibration(1))))
            return BuildContext(
                recipe=get_recipe(recipe_name),
                model=export_model(w.model, w.preprocessing),
                example_input=example,
                calibration_images=tiny_calibration,
                calibration_count=calibration_count,
                labels=unique_labels(subset.class_names, subset.wnids) if subset.class_names
                else [f"class {i}" for i in range(1000)],
                embedded_manifest={"recipe": recipe_name, "weights": w.identity.to_dict()},
                workdir=tmp_path / "work",
                log=lambda msg: None,
            )

        return make
