"""Deterministic synthetic ConvNeXt weights in which every block matters.

No ImageNet-trained weights can be had offline, so tests and the offline default use these. HF's
default init sets every layer scale to 1e-6: the 18 blocks then change the logits by ~1e-5 and a
converter bug inside any block would go unseen. Here each block's layer scale is drawn from
[0.3, 0.8], the layers are scaled so activations neither vanish nor explode, and the classifier is
shaped so logits depend on the image and spread like a trained model's.

Random deep nets map every input to nearly the same pooled feature (a few directions dominate), so a
random head predicts the same handful of classes for every photo and "top-1 agreement" would be
trivially high. The head is therefore fitted to deterministic probe images (multi-scale smooth noise,
not ImageNet): the probe features' top principal directions are projected out of the classifier,
the bias centers the probe logits, and the scale sets their spread. The test suite proves that
zeroing any single block's contribution changes the logits clearly.

These numbers mean nothing about ImageNet: every manifest and report built on them says so.
"""

from __future__ import annotations

import copy
import hashlib
import math

import torch
import torch.nn.functional as F
from transformers import ConvNextConfig, ConvNextForImageClassification

# Architectures the synthetic weights can take. ``convnext-test`` keeps the fast test tier fast.
ARCHS: dict[str, dict[str, list[int]]] = {
    "convnext-tiny": {"depths": [3, 3, 9, 3], "hidden_sizes": [96, 192, 384, 768]},
    "convnext-test": {"depths": [1, 1, 2, 1], "hidden_sizes": [16, 32, 64, 128]},
}
PROBE_LOGIT_STD = 1.5  # on probes; real photos vary more along the kept directions (logit std ~4-6)
PROBES = 16
PROJECTED_DIRECTIONS = 8


def synthetic_config(arch: str) -> ConvNextConfig:
    if arch not in ARCHS:
        raise ValueError(f"unknown synthetic architecture {arch!r}; choose one of {sorted(ARCHS)}")
    return ConvNextConfig(num_labels=1000, layer_norm_eps=1e-6, **ARCHS[arch])


@torch.no_grad()
def synthetic_model(seed: int = 0, arch: str = "convnext-tiny") -> ConvNextForImageClassification:
    """A ConvNeXt with deterministic weights (same seed, same tensors, on any machine)."""
    model = ConvNextForImageClassification(synthetic_config(arch)).eval()
    g = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_(torch.randn(t.shape, generator=g) * std + mean)

    for name, p in model.named_parameters():
        if name.endswith("layer_scale_parameter"):
            p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.3)
        elif p.ndim == 1 and ("layernorm" in name or "downsampling_layer.0" in name):
            # LayerNorm affine: near identity, with per-channel variety so the affine path is tested.
            normal(p, 0.1, 1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            normal(p, 0.02)
        else:
            fan_in = p[0].numel()
            # Kaiming-style for GELU-fed layers keeps the residual stream's variance of order one.
            normal(p, math.sqrt(2.0 / fan_in))
    _fit_head(model, g)
    return model


@torch.no_grad()
def _fit_head(model: ConvNextForImageClassification, g: torch.Generator) -> None:
    """Fit the classifier to the probe features (see module doc), bit-reproducibly on any CPU.

    The probe forward pass runs in float64 and its features are rounded to a coarse grid before the
    fit, whose results are rounded again (`_on_grid`): float32 interpolation, convolutions and SVDs differ in
    their last bits between thread counts and CPUs (two build hosts gave ``random:0`` two sha256
    identities, and one host another one at 1 thread than at 2), and the weights' identity must not
    depend on the machine.
    """
    feats: list[torch.Tensor] = []
    model64 = copy.deepcopy(model).to(torch.float64)
    hook = model64.convnext.layernorm.register_forward_hook(lambda _m, _i, out: feats.append(out))
    try:
        model64.convnext(pixel_values=(_probe_images(g) - 0.45) / 0.225)
    finally:
        hook.remove()
    # [PROBES, C] pooled, LayerNorm-ed features. Rounded to a coarse grid: the deep float64 forward
    # pass differs between CPUs and thread counts by ~1e-10 relative, far below this grid's steps.
    f = _on_grid(feats[0], bits=12).to(torch.float64)
    _, _, vh = torch.linalg.svd(f, full_matrices=False)
    v = vh[:PROJECTED_DIRECTIONS].T  # the projection below does not depend on the vectors' signs
    w = torch.randn(model.classifier.weight.shape, generator=g).to(torch.float64)
    w -= (w @ v) @ v.T
    w *= PROBE_LOGIT_STD / (f @ w.T).std()
    model.classifier.weight.copy_(_on_grid(w))
    model.classifier.bias.copy_(_on_grid(-(f.mean(0) @ w.T)))


def _on_grid(t: torch.Tensor, bits: int = 16) -> torch.Tensor:
    """float64 ``t`` rounded to multiples of ``2**(e - bits)``, ``e`` the exponent of ``max|t|``, as float32.

    Differences of order 1e-12 between machines then round to the same float32 values.
    """
    step = 2.0 ** (math.floor(math.log2(float(t.abs().max()))) - bits)
    return (torch.round(t / step) * step).to(torch.float32)


def _probe_images(g: torch.Generator) -> torch.Tensor:
    """float64 ``[PROBES, 3, 224, 224]`` in [0, 1]: sums of bilinearly upsampled noise at 5 scales.

    Upsampled in float64: float32 interpolation rounds differently with the thread count.
    """
    out = torch.zeros(PROBES, 3, 224, 224, dtype=torch.float64)
    for s in (4, 8, 16, 32, 64):
        noise = torch.rand(PROBES, 3, s, s, generator=g).to(torch.float64)
        out += F.interpolate(noise, size=224, mode="bilinear") / 5
    return out.clamp_(0, 1)


def tensors_sha256(model: torch.nn.Module) -> str:
    """Identity of a model's weights: sha256 over names, shapes and float32 bytes, in key order."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
