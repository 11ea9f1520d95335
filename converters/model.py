"""The float reference and the export model: ConvNeXt taking RGB in [0, 1] and returning logits.

`ReferenceClassifier` is what the model card uses, transformers' ``ConvNextForImageClassification``,
fed ``(x - mean) / std``: the float PyTorch reference every artifact is compared against.

`export_model` is the graph every converter exports: the same transformers modules, called stage by
stage (no HF output wrappers in the traced graph), with the mean/std normalization folded into the
stem convolution and a softmax at the end: every artifact returns class probabilities, because the
app consumers (MediaPipe, Vision, the old Task Library with its score threshold 0) show scores as
they are (`edge_convnext.contract`, output contract "probabilities"). Folding is exact algebra because the stem is a 4x4/stride-4 conv without padding:
``W * ((x - m) / s) + b == (W / s) * x + (b - sum(W * m / s))``. A test proves both equal.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import ConvNextForImageClassification

from edge_convnext.preprocessing import Preprocessing


class ReferenceClassifier(nn.Module):
    """float32 ``[N, 3, H, W]`` RGB in [0, 1] -> float32 ``[N, num_labels]`` logits (transformers' forward)."""

    def __init__(self, model: ConvNextForImageClassification, p: Preprocessing) -> None:
        super().__init__()
        self.model = model.eval()
        self.register_buffer("mean", torch.tensor(p.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(p.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=(x - self.mean) / self.std).logits


class ExportClassifier(nn.Module):
    """float32 ``[N, 3, 224, 224]`` RGB in [0, 1] -> float32 ``[N, 1000]`` probabilities, normalization folded.

    ``probabilities=False`` ends at the logits (for tools that want to see the classifier's raw output).
    """

    def __init__(self, model: ConvNextForImageClassification, p: Preprocessing, probabilities: bool = True) -> None:
        super().__init__()
        self.probabilities = probabilities
        model = copy.deepcopy(model).eval()
        self.embeddings = model.convnext.embeddings
        self.stages = model.convnext.encoder.stages
        self.norm = model.convnext.layernorm
        self.classifier = model.classifier
        _fold_normalization(self.embeddings.patch_embeddings, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embeddings.layernorm(self.embeddings.patch_embeddings(x))
        for stage in self.stages:
            h = stage(h)
        logits = self.classifier(self.norm(h.mean(dim=(-2, -1))))
        # float32 softmax: converters keep it float32 even in fp16 programs, so small probabilities
        # do not underflow to 0.
        return torch.softmax(logits, dim=-1) if self.probabilities else logits


@torch.no_grad()
def _fold_normalization(conv: nn.Conv2d, p: Preprocessing) -> None:
    if conv.padding not in ((0, 0), 0, "valid"):
        raise ValueError("normalization can only be folded into an unpadded stem conv")
    mean = torch.tensor(p.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(p.std, dtype=torch.float64).view(1, 3, 1, 1)
    w = conv.weight.to(torch.float64)
    b = conv.bias.to(torch.float64) if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    new_w = w / std
    new_b = b - (w * mean / std).sum(dim=(1, 2, 3))
    conv.weight.copy_(new_w.to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_b.to(conv.weight.dtype))
    else:
        conv.bias.copy_(new_b.to(conv.bias.dtype))


def export_model(model: ConvNextForImageClassification, p: Preprocessing, probabilities: bool = True) -> ExportClassifier:
    return ExportClassifier(model, p, probabilities).eval()
