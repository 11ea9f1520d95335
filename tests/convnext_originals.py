"""Independent re-implementations of ConvNeXt as three other codebases write it, for loader tests.

Each class reproduces the module hierarchy (hence the state-dict key names) and the forward pass of:
  * facebookresearch/ConvNeXt ``models/convnext.py`` (``downsample_layers``, ``stages.i.j``, ``head``);
  * timm ``convnext.py`` (``stem``, ``stages.i.downsample``, ``stages.i.blocks.j.mlp.fc1``, ``head.fc``);
  * torchvision ``convnext.py`` (``features``, ``block.0..5``, ``layer_scale [C,1,1]``, ``classifier``).

A checkpoint saved from one of these and loaded by ``converters.weights`` into transformers must give
the same logits as this module's own forward: a wrong key mapping cannot cancel itself out.
Written from the architectures' published structure, not imported (timm/torchvision cannot be
installed next to this torch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEPTHS, DIMS = (3, 3, 9, 3), (96, 192, 384, 768)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of NCHW input (timm/torchvision style: permute, F.layer_norm, permute)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class OfficialLayerNorm(nn.Module):
    """facebookresearch's LayerNorm: ``channels_first`` computes the statistics by hand."""

    def __init__(self, dim: int, eps: float = 1e-6, data_format: str = "channels_last") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps, self.data_format, self.dim = eps, data_format, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.data_format == "channels_last":
            return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class OfficialBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = OfficialLayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class OfficialConvNeXt(nn.Module):
    def __init__(self, depths=DEPTHS, dims=DIMS, num_classes: int = 1000) -> None:
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), OfficialLayerNorm(dims[0], data_format="channels_first"))]
            + [nn.Sequential(OfficialLayerNorm(dims[i - 1], data_format="channels_first"),
                             nn.Conv2d(dims[i - 1], dims[i], 2, 2)) for i in range(1, 4)]
        )
        self.stages = nn.ModuleList([nn.Sequential(*[OfficialBlock(dims[i]) for _ in range(depths[i])]) for i in range(4)])
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.head(self.norm(x.mean([-2, -1])))


class TimmMlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimmBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TimmMlp(dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.mlp(self.norm(y)).mul(self.gamma)
        return x + y.permute(0, 3, 1, 2)


class TimmStage(nn.Module):
    def __init__(self, cin: int, cout: int, depth: int, first: bool) -> None:
        super().__init__()
        self.downsample = nn.Identity() if first else nn.Sequential(LayerNorm2d(cin, eps=1e-6), nn.Conv2d(cin, cout, 2, 2))
        self.blocks = nn.Sequential(*[TimmBlock(cout) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class TimmHead(nn.Module):
    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x.mean([-2, -1])))


class TimmConvNeXt(nn.Module):
    def __init__(self, depths=DEPTHS, dims=DIMS, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
        self.stages = nn.Sequential(
            *[TimmStage(dims[max(i - 1, 0)], dims[i], depths[i], first=i == 0) for i in range(4)]
        )
        self.head = TimmHead(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


class Permute(nn.Module):
    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class TvCNBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1))
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute([0, 2, 3, 1]), nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), Permute([0, 3, 1, 2]),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * self.block(x)


class TorchvisionConvNeXt(nn.Module):
    def __init__(self, depths=DEPTHS, dims=DIMS, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))]
        for i in range(4):
            layers.append(nn.Sequential(*[TvCNBlock(dims[i]) for _ in range(depths[i])]))
            if i < 3:
                layers.append(nn.Sequential(LayerNorm2d(dims[i], eps=1e-6), nn.Conv2d(dims[i], dims[i + 1], 2, 2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


ORIGINALS = {"official": OfficialConvNeXt, "timm": TimmConvNeXt, "torchvision": TorchvisionConvNeXt}


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Weights where every block and every LayerNorm affine matters (layer scales 0.3..0.8)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("gamma", "layer_scale")):
            p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.3)
        elif p.ndim == 1 and name.endswith("weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        elif p.ndim == 1:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
    return model.eval()
