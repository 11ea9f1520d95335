"""Load ConvNeXt weights from any source a user has, or deterministic synthetic weights.

Sources (``--weights``):
  * an HF hub id, ``facebook/convnext-tiny-224`` (the default) or ``org/name@revision``, read through
    the local HF cache or the hub when reachable;
  * an HF model directory: ``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``
    (+ ``preprocessor_config.json``);
  * a single checkpoint file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``) in transformers, official
    facebookresearch (``convnext_tiny_1k_224_ema.pth``), timm (``convnext_tiny.fb_in1k``) or
    torchvision (``features.*``) naming, detected from its keys;
  * ``random[:SEED[:ARCH]]``: synthetic weights (see `converters.synthetic`), never ImageNet-trained.

Nothing arbitrary is unpickled: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import ConvNextConfig, ConvNextForImageClassification

from converters import checkpoints
from converters.synthetic import ARCHS, synthetic_model, tensors_sha256
from edge_convnext.errors import WeightsError, first_line
from edge_convnext.fileio import sha256_path
from edge_convnext.labels import labels_from_id2label
from edge_convnext.preprocessing import (
    CONVNEXT_HF,
    CONVNEXT_TIMM_OFFICIAL,
    TORCHVISION_IMAGENET1K_V1,
    Preprocessing,
)

log = logging.getLogger(__name__)

DEFAULT_HUB_ID = "facebook/convnext-tiny-224"
DEFAULT_SYNTHETIC = "random:0"
_CHECKPOINT_SUFFIXES = {".safetensors", ".pth", ".pt", ".bin", ".ckpt"}
# Each format's own preprocessing and final-LayerNorm epsilon (HF configs carry their own).
_FORMAT_DEFAULTS: dict[str, tuple[Preprocessing, float]] = {
    "hf": (CONVNEXT_HF, 1e-12),
    "official": (CONVNEXT_TIMM_OFFICIAL, 1e-6),
    "timm": (CONVNEXT_TIMM_OFFICIAL, 1e-6),
    "torchvision": (TORCHVISION_IMAGENET1K_V1, 1e-6),
}
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(@[\w.-]+)?")
_HUB_FILES = ["config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin"]


@dataclass(frozen=True)
class WeightsIdentity:
    """Which weights an artifact was built from; recorded in every manifest and report."""

    source: str
    format: str
    sha256: str
    synthetic: bool
    description: str
    architecture: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedWeights:
    model: ConvNextForImageClassification  # eval mode, float32
    identity: WeightsIdentity
    preprocessing: Preprocessing
    labels: list[str] | None  # from the checkpoint's config, when it has real class names
    warnings: list[str] = field(default_factory=list)


def load_weights(spec: str | None = None, preprocessing: Preprocessing | None = None) -> LoadedWeights:
    """Load ``spec`` (see module doc). ``None`` means the default hub weights, falling back to
    ``random:0`` with a loud warning when they cannot be had; an explicit ``spec`` that fails raises
    `WeightsError`. ``preprocessing`` overrides what the weights carry."""
    if spec is None:
        try:
            loaded = _load_spec(DEFAULT_HUB_ID)
        except WeightsError as e:
            msg = (
                f"default weights {DEFAULT_HUB_ID} are not available here ({e}). FALLING BACK TO SYNTHETIC "
                f"WEIGHTS {DEFAULT_SYNTHETIC}: artifacts are real conversions, but any ImageNet accuracy "
                "measured on them is meaningless. Pass --weights to use real weights."
            )
            log.warning(msg)
            loaded = _load_spec(DEFAULT_SYNTHETIC)
            loaded.warnings.append(msg)
    else:
        loaded = _load_spec(spec)
    if preprocessing is not None:
        loaded.preprocessing = preprocessing
    return loaded


def _load_spec(spec: str) -> LoadedWeights:
    if m := re.fullmatch(r"random(?::(\d+))?(?::([\w-]+))?", spec):
        return _synthetic(int(m[1] or 0), m[2] or "convnext-tiny")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_hf_dir(path, source=spec)
    if path.is_file():
        return _load_file(path)
    looks_like_path = spec.startswith((".", "/", "~")) or path.suffix in _CHECKPOINT_SUFFIXES
    if not looks_like_path and _HUB_ID.fullmatch(spec):
        return _load_hub(spec)
    raise WeightsError(
        f"{spec}: no such checkpoint file or directory (and not an HF hub id org/name or random[:SEED])"
    )


def _synthetic(seed: int, arch: str) -> LoadedWeights:
    if arch not in ARCHS:
        raise WeightsError(f"unknown synthetic architecture {arch!r}; choose one of {sorted(ARCHS)}")
    model = synthetic_model(seed, arch)
    ident = WeightsIdentity(
        source=f"random:{seed}" + ("" if arch == "convnext-tiny" else f":{arch}"),
        format="synthetic",
        sha256=tensors_sha256(model),
        synthetic=True,
        description=f"SYNTHETIC {arch} weights (seed {seed}), not ImageNet-trained: label accuracy is meaningless",
        architecture=ARCHS[arch] | {"num_labels": 1000},
    )
    return LoadedWeights(model, ident, CONVNEXT_HF, None)


def _load_hub(spec: str) -> LoadedWeights:
    repo_id, _, revision = spec.partition("@")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id, revision=revision or None, allow_patterns=_HUB_FILES)
    except Exception as e:  # network, auth, not-found and cache misses all mean "not available here"
        raise WeightsError(f"cannot get {spec} from the HF hub or its local cache: {first_line(e)}") from e
    return _load_hf_dir(Path(local), source=spec)


def _load_hf_dir(d: Path, source: str) -> LoadedWeights:
    cfg_file = d / "config.json"
    weights = next((d / n for n in ("model.safetensors", "pytorch_model.bin") if (d / n).is_file()), None)
    if not cfg_file.is_file() or weights is None:
        found = sorted(p.name for p in d.iterdir())[:8]
        raise WeightsError(
            f"{d}: an HF model directory needs config.json and model.safetensors (or pytorch_model.bin); "
            f"found {found}"
        )
    try:
        config = ConvNextConfig.from_pretrained(d)
    except Exception as e:
        raise WeightsError(f"{cfg_file}: not a readable ConvNeXt config ({e})") from e
    if config.model_type != "convnext":
        raise WeightsError(f"{cfg_file}: model_type is {config.model_type!r}, not 'convnext'")
    sd = checkpoints.unwrap(_read_state_dict(weights))
    fmt = checkpoints.detect_format(sd)
    hf_sd = checkpoints.to_hf(sd, fmt)
    model = _build(config, hf_sd, weights)
    pre_file = d / "preprocessor_config.json"
    warnings = []
    if pre_file.is_file():
        pre = Preprocessing.from_hf_config_file(pre_file)
    else:
        pre = CONVNEXT_HF
        warnings.append(f"{d}: no preprocessor_config.json; using {pre.source}")
    ident = _identity(source, fmt, weights, model, "HF model directory" if source == str(d) else f"HF hub {source}")
    return LoadedWeights(model, ident, pre, labels_from_id2label(config.id2label), warnings)


def _load_file(path: Path) -> LoadedWeights:
    sd = checkpoints.unwrap(_read_state_dict(path))
    fmt = checkpoints.detect_format(sd)
    hf_sd = checkpoints.to_hf(sd, fmt)
    pre, eps = _FORMAT_DEFAULTS[fmt]
    config = ConvNextConfig(layer_norm_eps=eps, **checkpoints.infer_config_kwargs(hf_sd))
    model = _build(config, hf_sd, path)
    ident = _identity(str(path), fmt, path, model, f"{fmt} checkpoint {path.name}")
    return LoadedWeights(model, ident, pre, None)


def _read_state_dict(path: Path) -> Any:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise WeightsError(f"{path}: no such checkpoint file") from e
    except Exception as e:
        text = first_line(e)
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise WeightsError(
                f"{path}: holds Python objects beyond tensors, which are not unpickled for safety ({text}). "
                "Save just the state dict (torch.save(model.state_dict(), ...)) or convert it to safetensors"
            ) from e
        raise WeightsError(f"{path}: corrupted or truncated checkpoint ({text}); download it again") from e


def _build(config: ConvNextConfig, hf_sd: dict[str, Any], source: Path) -> ConvNextForImageClassification:
    model = ConvNextForImageClassification(config)
    checkpoints.check_keys(hf_sd, model.state_dict(), str(source))
    model.load_state_dict({k: v.to(torch.float32) for k, v in hf_sd.items()}, strict=True)
    return model.eval()


def _identity(source: str, fmt: str, file: Path, model: torch.nn.Module, what: str) -> WeightsIdentity:
    cfg = model.config
    arch = {"depths": list(cfg.depths), "hidden_sizes": list(cfg.hidden_sizes), "num_labels": cfg.num_labels}
    return WeightsIdentity(source, fmt, sha256_path(file), False, what, arch)
