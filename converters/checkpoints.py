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
from collections.abc import Callable, Mapping
from typing import Any

from edge_convnext.errors import WeightsError

StateDict = dict[str, Any]

_BLOCK_PARTS_OFFICIAL = {"dwconv": "dwconv", "norm": "layernorm", "pwconv1": "pwconv1", "pwconv2": "pwconv2"}
_BLOCK_PARTS_TIMM = {"conv_dw": "dwconv", "norm": "layernorm", "mlp.fc1": "pwconv1", "mlp.fc2": "pwconv2"}
_BLOCK_PARTS_TV = {"0": "dwconv", "2": "layernorm", "3": "pwconv1", "5": "pwconv2"}
_ENC = "convnext.encoder.stages"


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


def _map_official(k: str) -> str | None:
    if m := re.fullmatch(r"downsample_layers\.0\.0\.(weight|bias)", k):
        return f"convnext.embeddings.patch_embeddings.{m[1]}"
    if m := re.fullmatch(r"downsample_layers\.0\.1\.(weight|bias)", k):
        return f"convnext.embeddings.layernorm.{m[1]}"
    if m := re.fullmatch(r"downsample_layers\.(\d+)\.([01])\.(weight|bias)", k):
        return f"{_ENC}.{m[1]}.downsampling_layer.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"stages\.(\d+)\.(\d+)\.gamma", k):
        return f"{_ENC}.{m[1]}.layers.{m[2]}.layer_scale_parameter"
    if m := re.fullmatch(r"stages\.(\d+)\.(\d+)\.(dwconv|norm|pwconv1|pwconv2)\.(weight|bias)", k):
        return f"{_ENC}.{m[1]}.layers.{m[2]}.{_BLOCK_PARTS_OFFICIAL[m[3]]}.{m[4]}"
    if m := re.fullmatch(r"norm\.(weight|bias)", k):
        return f"convnext.layernorm.{m[1]}"
    if m := re.fullmatch(r"head\.(weight|bias)", k):
        return f"classifier.{m[1]}"
    return None


def _map_timm(k: str) -> str | None:
    if m := re.fullmatch(r"stem\.0\.(weight|bias)", k):
        return f"convnext.embeddings.patch_embeddings.{m[1]}"
    if m := re.fullmatch(r"stem\.1\.(weight|bias)", k):
        return f"convnext.embeddings.layernorm.{m[1]}"
    if m := re.fullmatch(r"stages\.(\d+)\.downsample\.([01])\.(weight|bias)", k):
        return f"{_ENC}.{m[1]}.downsampling_layer.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.gamma", k):
        return f"{_ENC}.{m[1]}.layers.{m[2]}.layer_scale_parameter"
    if m := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(conv_dw|norm|mlp\.fc1|mlp\.fc2)\.(weight|bias)", k):
        return f"{_ENC}.{m[1]}.layers.{m[2]}.{_BLOCK_PARTS_TIMM[m[3]]}.{m[4]}"
    if m := re.fullmatch(r"head\.norm\.(weight|bias)", k):
        return f"convnext.layernorm.{m[1]}"
    if m := re.fullmatch(r"head\.fc\.(weight|bias)", k):
        return f"classifier.{m[1]}"
    return None


def _map_torchvision(k: str) -> str | None:
    # features: [stem, stage0, down1, stage1, down2, stage2, down3, stage3]
    if m := re.fullmatch(r"features\.0\.0\.(weight|bias)", k):
        return f"convnext.embeddings.patch_embeddings.{m[1]}"
    if m := re.fullmatch(r"features\.0\.1\.(weight|bias)", k):
        return f"convnext.embeddings.layernorm.{m[1]}"
    if m := re.fullmatch(r"features\.(\d+)\.([01])\.(weight|bias)", k):
        f = int(m[1])
        if f % 2 == 0:
            return f"{_ENC}.{f // 2}.downsampling_layer.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"features\.(\d+)\.(\d+)\.layer_scale", k):
        f = int(m[1])
        if f % 2 == 1:
            return f"{_ENC}.{f // 2}.layers.{m[2]}.layer_scale_parameter"
    if m := re.fullmatch(r"features\.(\d+)\.(\d+)\.block\.([0235])\.(weight|bias)", k):
        f = int(m[1])
        if f % 2 == 1:
            return f"{_ENC}.{f // 2}.layers.{m[2]}.{_BLOCK_PARTS_TV[m[3]]}.{m[4]}"
    if m := re.fullmatch(r"classifier\.0\.(weight|bias)", k):
        return f"convnext.layernorm.{m[1]}"
    if m := re.fullmatch(r"classifier\.2\.(weight|bias)", k):
        return f"classifier.{m[1]}"
    return None


_MAPPERS: dict[str, Callable[[str], str | None]] = {
    "hf": lambda k: k,
    "official": _map_official,
    "timm": _map_timm,
    "torchvision": _map_torchvision,
}


def to_hf(sd: Mapping[str, Any], fmt: str) -> StateDict:
    """Rename a state dict of format ``fmt`` to transformers' keys; unknown keys raise `WeightsError`."""
    mapper = _MAPPERS[fmt]
    out: StateDict = {}
    unknown = []
    for k, v in sd.items():
        if fmt == "timm" and k.startswith("head.") and k.endswith("num_batches_tracked"):
            continue
        new = mapper(k)
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
