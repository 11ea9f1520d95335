"""Checkpoint formats: detect a ConvNeXt state dict's naming scheme and map it to transformers' keys.

Pure functions over ``{key: tensor}`` dicts, in the manner of timm's ``checkpoint_filter_fn``. No
timm or torchvision import: their key names are mapped explicitly here.

Formats:
  * ``hf``          transformers ``ConvNextForImageClassification`` (``convnext.*``, ``classifier.*``)
  * ``official``    facebookresearch/ConvNeXt (``downsample_layers.*``, ``stages.i.j.*``, ``head.*``)
  * ``timm``        timm ``convnext_tiny.fb_in1k`` (``stem.*``, ``stages.i.blocks.j.*``, ``head.fc.*``)
  * ``torchvision`` torchvision ``convnext_tiny`` (``features.*``, ``classifier.*``)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from edge_convnext.errors import WeightsError

StateDict = dict[str, Any]

_ENC = "convnext.encoder.stages"
_EMB = "convnext.embeddings"

# (pattern, replacement) rules per format, tried in order; the first that matches renames the key.
# Keys no rule matches are reported; the renamed dict is then checked against the model's own keys.
_RULES: dict[str, list[tuple[str, str]]] = {
    "official": [
        (r"^downsample_layers\.0\.0\.", f"{_EMB}.patch_embeddings."),
        (r"^downsample_layers\.0\.1\.", f"{_EMB}.layernorm."),
        (r"^downsample_layers\.(\d+)\.([01])\.", rf"{_ENC}.\1.downsampling_layer.\2."),
        (r"^stages\.(\d+)\.(\d+)\.gamma$", rf"{_ENC}.\1.layers.\2.layer_scale_parameter"),
        (r"^stages\.(\d+)\.(\d+)\.norm\.", rf"{_ENC}.\1.layers.\2.layernorm."),
        (r"^stages\.(\d+)\.(\d+)\.(dwconv|pwconv1|pwconv2)\.", rf"{_ENC}.\1.layers.\2.\3."),
        (r"^norm\.", "convnext.layernorm."),
        (r"^head\.", "classifier."),
    ],
    "timm": [
        (r"^stem\.0\.", f"{_EMB}.patch_embeddings."),
        (r"^stem\.1\.", f"{_EMB}.layernorm."),
        (r"^stages\.(\d+)\.downsample\.([01])\.", rf"{_ENC}.\1.downsampling_layer.\2."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.gamma$", rf"{_ENC}.\1.layers.\2.layer_scale_parameter"),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", rf"{_ENC}.\1.layers.\2.dwconv."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.norm\.", rf"{_ENC}.\1.layers.\2.layernorm."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc([12])\.", rf"{_ENC}.\1.layers.\2.pwconv\3."),
        (r"^head\.norm\.", "convnext.layernorm."),
        (r"^head\.fc\.", "classifier."),
    ],
    # torchvision's features: [stem, stage 0, downsample 1, stage 1, downsample 2, stage 2, downsample 3, stage 3]
    # and each block is Sequential(dwconv 0, permute 1, norm 2, fc1 3, gelu 4, fc2 5, permute 6).
    "torchvision": [
        (r"^features\.0\.0\.", f"{_EMB}.patch_embeddings."),
        (r"^features\.0\.1\.", f"{_EMB}.layernorm."),
        *[(rf"^features\.{2 * i}\.([01])\.", rf"{_ENC}.{i}.downsampling_layer.\1.") for i in (1, 2, 3)],
        *[
            rule
            for i in range(4)
            for rule in (
                (rf"^features\.{2 * i + 1}\.(\d+)\.layer_scale$", rf"{_ENC}.{i}.layers.\1.layer_scale_parameter"),
                (rf"^features\.{2 * i + 1}\.(\d+)\.block\.0\.", rf"{_ENC}.{i}.layers.\1.dwconv."),
                (rf"^features\.{2 * i + 1}\.(\d+)\.block\.2\.", rf"{_ENC}.{i}.layers.\1.layernorm."),
                (rf"^features\.{2 * i + 1}\.(\d+)\.block\.3\.", rf"{_ENC}.{i}.layers.\1.pwconv1."),
                (rf"^features\.{2 * i + 1}\.(\d+)\.block\.5\.", rf"{_ENC}.{i}.layers.\1.pwconv2."),
            )
        ],
        (r"^classifier\.0\.", "convnext.layernorm."),
        (r"^classifier\.2\.", "classifier."),
    ],
}


def detect_format(sd: Mapping[str, Any]) -> str:
    keys = set(sd)
    if any(k.startswith("convnext.") for k in keys):
        return "hf"
    if "downsample_layers.0.0.weight" in keys:
        return "official"
    if "stem.0.weight" in keys and any(k.startswith("stages.0.blocks.") for k in keys):
        return "timm"
    if "features.0.0.weight" in keys:
        return "torchvision"
    sample = sorted(keys)[:6]
    raise WeightsError(
        f"not a ConvNeXt checkpoint this tool knows (keys start {sample}); expected transformers "
        "(convnext.*), official (downsample_layers.*), timm (stem.*, stages.*.blocks.*) or torchvision (features.*)"
    )


def unwrap(obj: Any) -> StateDict:
    """The state dict inside a training checkpoint (``{"model": ...}``, ``{"state_dict": ...}``, ...)."""
    if isinstance(obj, Mapping):
        for key in ("model_ema", "model", "state_dict", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
                if any(hasattr(v, "shape") for v in inner.values()):
                    return _strip_module_prefix(dict(inner))
        if obj and any(hasattr(v, "shape") for v in obj.values()):
            return _strip_module_prefix(dict(obj))
    raise WeightsError("checkpoint holds no state dict (no tensors under 'model', 'state_dict' or the top level)")


def _strip_module_prefix(sd: StateDict) -> StateDict:
    # DataParallel/DDP checkpoints prefix every key with "module."
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _rename(key: str, fmt: str) -> str | None:
    if fmt == "hf":
        return key
    for pattern, repl in _RULES[fmt]:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return None


def to_hf(sd: Mapping[str, Any], fmt: str) -> StateDict:
    """Rename a state dict of format ``fmt`` to transformers' keys; unknown keys raise `WeightsError`."""
    out: StateDict = {}
    unknown = []
    for k, v in sd.items():
        new = _rename(k, fmt)
        if new is None:
            unknown.append(k)
            continue
        if new.endswith("layer_scale_parameter"):
            v = v.reshape(-1)  # torchvision stores layer scale as [C, 1, 1]
        out[new] = v
    if unknown:
        raise WeightsError(f"{len(unknown)} key(s) of a {fmt} checkpoint have no ConvNeXt meaning: {_few(unknown)}")
    return out


def infer_config_kwargs(hf_sd: Mapping[str, Any]) -> dict[str, Any]:
    """depths, hidden_sizes and num_labels of a ConvNeXt from its (transformers-keyed) weights."""
    try:
        n_stages = 1 + max(int(m[1]) for k in hf_sd if (m := re.match(rf"{_ENC}\.(\d+)\.", k)))
        depths = [
            1 + max(int(m[1]) for k in hf_sd if (m := re.match(rf"{_ENC}\.{i}\.layers\.(\d+)\.", k)))
            for i in range(n_stages)
        ]
        hidden = [int(hf_sd[f"{_ENC}.{i}.layers.0.dwconv.weight"].shape[0]) for i in range(n_stages)]
        num_labels = int(hf_sd["classifier.weight"].shape[0])
        patch = int(hf_sd["convnext.embeddings.patch_embeddings.weight"].shape[-1])
    except (ValueError, KeyError) as e:
        raise WeightsError(f"cannot infer the ConvNeXt architecture from the weights (missing {e})") from e
    return {"depths": depths, "hidden_sizes": hidden, "num_labels": num_labels, "patch_size": patch,
            "num_stages": n_stages}


def check_keys(hf_sd: Mapping[str, Any], expected: Mapping[str, Any], what: str) -> None:
    """Raise `WeightsError` naming missing, unexpected and wrongly shaped tensors."""
    missing = sorted(set(expected) - set(hf_sd))
    unexpected = sorted(set(hf_sd) - set(expected))
    shapes = [
        f"{k}: {tuple(hf_sd[k].shape)} != expected {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(hf_sd))
        if tuple(hf_sd[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_few(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_few(shapes)}")
    if problems:
        raise WeightsError(f"{what} does not match ConvNeXt: " + "; ".join(problems))


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")
