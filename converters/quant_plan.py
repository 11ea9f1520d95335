"""Which conv and linear layers a recipe quantizes, by torch module name: one plan every backend reads.

A recipe's ``float_layers`` option (``fnmatch`` patterns over the export model's module names, after its
rewrites) and, with ``convert --min-sqnr``, the layers the accuracy search keeps in float are resolved
here into a `QuantPlan`. The weight rounding skips its float layers, and each backend maps the names onto
its own graph: TFLite op scopes (`converters.backends.tflite_flatbuffer.layer_tensor_names`), PT2E
``set_module_name`` (ExecuTorch), coremltools ``module_name_configs`` (Core ML). Names such as
``stages.2.layers.4.pwconv1`` therefore mean the same layer in every format, in the manifest and in
``edge-convnext layers``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from edge_convnext.errors import EdgeConvNextError


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every ``nn.Conv2d`` and ``nn.Linear`` in ``model``, in network order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@dataclass(frozen=True)
class QuantPlan:
    """The quantizable layers of one export model (network order) and the ones that stay float.

    ``reasons`` says why each float layer is float: ``"recipe"`` (the recipe's ``float_layers``) or
    ``"accuracy target"`` (chosen by `converters.accuracy_target`).
    """

    layers: tuple[str, ...]
    float_layers: tuple[str, ...] = ()
    reasons: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.float_layers) - set(self.layers))
        if unknown:
            raise EdgeConvNextError(f"float layers {unknown} are not conv/linear layers of the model")
        ordered = tuple(n for n in self.layers if n in set(self.float_layers))  # network order, no repeats
        object.__setattr__(self, "float_layers", ordered)
        object.__setattr__(self, "reasons", MappingProxyType(dict(self.reasons)))

    @classmethod
    def for_model(cls, model: nn.Module, patterns: Iterable[str] = (), reason: str = "recipe") -> QuantPlan:
        """Resolve ``patterns`` against ``model``'s layer names; a pattern that matches nothing is an error."""
        layers = tuple(n for n, _ in quantizable_layers(model))
        chosen: list[str] = []
        for p in patterns:
            hits = fnmatch.filter(layers, p)
            if not hits:
                raise EdgeConvNextError(f"float_layers pattern {p!r} matches no conv/linear layer of the model "
                                        f"(names look like {layers[1]!r})")
            chosen += hits
        return cls(layers, tuple(chosen), dict.fromkeys(chosen, reason))

    def with_float(self, names: Iterable[str], reason: str) -> QuantPlan:
        """This plan with ``names`` kept in float too."""
        names = [n for n in names if n not in set(self.float_layers)]
        return QuantPlan(self.layers, self.float_layers + tuple(names), {**self.reasons, **dict.fromkeys(names, reason)})

    @property
    def quantized(self) -> tuple[str, ...]:
        floats = set(self.float_layers)
        return tuple(n for n in self.layers if n not in floats)

    def is_float(self, name: str) -> bool:
        return name in set(self.float_layers)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": len(self.layers), "quantized": len(self.quantized),
                "float_layers": [{"name": n, "reason": self.reasons.get(n, "recipe")} for n in self.float_layers]}
