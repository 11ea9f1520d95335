"""What a backend receives to build one recipe, and what it returns."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from converters.act_quant import Point
from converters.calibrate import MIN_HELD_OUT, HeldOut
from converters.quant_plan import QuantPlan
from edge_convnext.contract import INPUT_CONTRACTS, OUTPUT_CONTRACTS
from edge_convnext.manifest import TensorSpec
from edge_convnext.recipes import Recipe


@dataclass
class BuildContext:
    """Inputs of one backend build.

    ``model`` maps float32 ``[1, 3, 224, 224]`` RGB in [0, 1] (NCHW) to float32 ``[1, 1000]`` class
    probabilities (softmax inside), with the mean/std normalization folded in. Each backend gives
    its artifact its format's contracts (`edge_convnext.contract`, `ArtifactFormat.input_contract`). ``calibration_images(n)`` yields up to ``n`` real
    images of the calibration split, each float32 ``[1, 3, 224, 224]`` in [0, 1]; never evaluation
    images, never random tensors.
    """

    recipe: Recipe
    model: torch.nn.Module
    example_input: torch.Tensor
    calibration_images: Callable[[int], Iterator[np.ndarray]]
    calibration_count: int
    labels: list[str]
    embedded_manifest: dict[str, Any]
    workdir: Path
    log: Callable[[str], None] = print
    # The float export model before the recipe's weight rounding (`converters.weight_quant`): what a
    # backend's own fidelity check compares against. None: ``model`` itself.
    float_model: torch.nn.Module | None = None
    # Which conv/linear layers stay float (`converters.quant_plan`); None: the recipe quantizes all it can.
    plan: QuantPlan | None = None
    # Ranges chosen on the torch side for static activations (`converters.prepare`), per quantization
    # point (torch layer input/output); None: the backend's own calibration ranges.
    activation_ranges: dict[Point, tuple[float, float]] | None = None
    # The run's calibration split (`converters.calibrate.HeldOut`) for backends that choose by measurement
    # (recipe option ``backend_choices``): statistics from ``fit``, choices measured on ``held``. None in a
    # context made by hand: such a backend splits ``calibration_images`` the same way itself.
    held_out: HeldOut | None = None

    @property
    def float_reference(self) -> torch.nn.Module:
        return self.float_model if self.float_model is not None else self.model

    def choice_split(self, n: int) -> HeldOut:
        """The run's split (``held_out``) with its first ``n`` held-out images, for a backend's choices; a
        context made by hand is split here the same way (statistics: the first ``calibration_count``)."""
        data = self.held_out
        if data is None:
            held = max(n, MIN_HELD_OUT)
            images = list(self.calibration_images(self.calibration_count + held))
            ids = list(getattr(self.calibration_images, "used_ids", []))
            if len(ids) != len(images):
                raise TypeError(f"{self.recipe.name}: choices are measured on held-out calibration images, so a "
                                "build context without held_out needs a calibration stream that records image ids")
            data = HeldOut.split(images, ids, self.float_reference.eval(), fit=self.calibration_count, held=held)
        return data.first(n)


@dataclass
class BuildResult:
    """What a backend reports about the artifact it wrote (``input``/``output``: its contracts' specs)."""

    input: TensorSpec
    output: TensorSpec
    lowering: dict[str, Any] = field(default_factory=dict)
    calibration_used: int = 0
    embedded: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def for_recipe(cls, recipe: Recipe, input_name: str = "image", output_name: str = "probabilities") -> BuildResult:
        """A result whose I/O specs are the recipe format's contracts."""
        fmt = recipe.format
        return cls(INPUT_CONTRACTS[fmt.input_contract].spec(input_name),
                   OUTPUT_CONTRACTS[fmt.output_contract].spec(output_name))


Builder = Callable[[BuildContext, Path], BuildResult]
