"""Replicas of torchvision's and timm's models with the same module and parameter names.

torchvision and timm cannot be imported beside every torch build (torchvision's wheels
are compiled against one torch), so the zoo carries faithful copies of the architectures
it tests the grouping and the estimator on. Each copy keeps the original's module tree,
registration order, parameter names and forward computation; only the sizes are
arguments, so the tests run tiny configurations and the benchmark the real sizes.

* :func:`resnet18` -- ``torchvision.models.resnet18``: ``conv1``, ``bn1``, ``layer1..4``
  of two ``BasicBlock`` each (``conv1``, ``bn1``, ``conv2``, ``bn2``, ``downsample``),
  ``fc``. timm's ``resnet18`` has the same parameter names.
* :class:`VisionTransformer` -- ``timm.models.vision_transformer.VisionTransformer``:
  ``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N`` (``norm1``,
  ``attn.qkv``, ``attn.proj`` through ``F.scaled_dot_product_attention``, ``norm2``,
  ``mlp.fc1``, ``mlp.fc2``), ``norm``, ``head``.
* :class:`ResNetV2` -- ``timm.models.resnetv2.ResNetV2`` (pre-activation, BatchNorm):
  ``stem.conv``, ``stages.N.blocks.M`` (``downsample.conv``, ``norm1``, ``conv1``, ...),
  ``norm``, ``head.fc`` (a 1x1 convolution): timm's stages of blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BasicBlock", "ResNet", "ResNetV2", "VisionTransformer", "resnet18"]


# -- torchvision ResNet -------------------------------------------------------------------
class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: conv3x3-bn-relu-conv3x3-bn plus the shortcut."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ``ResNet`` with ``BasicBlock`` (``layers`` blocks per stage)."""

    def __init__(
        self, layers: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 1000, width: int = 64
    ) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, width: int = 64) -> ResNet:
    """``torchvision.models.resnet18(num_classes=...)`` (``width=64``: the real sizes)."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes, width=width)


# -- timm VisionTransformer ---------------------------------------------------------------
class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1, self.drop_path1 = nn.Identity(), nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2, self.drop_path2 = nn.Identity(), nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    """timm's ``VisionTransformer`` (class token, learned positions, token pooling)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            torch.randn(1, self.patch_embed.num_patches + 1, embed_dim) * 0.02
        )
        self.pos_drop = nn.Dropout(0.0)
        self.norm_pre = nn.Identity()
        self.blocks = nn.Sequential(*(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.Identity()
        self.head_drop = nn.Dropout(0.0)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(self.norm_pre(self.pos_drop(x))))
        return self.head(self.head_drop(self.fc_norm(x[:, 0])))


# -- timm ResNetV2 (stages of blocks) ---------------------------------------------------------
class DownsampleConv(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
        self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class PreActBasic(nn.Module):
    """timm's ``PreActBasic``: norm-act-conv3x3-norm-act-conv3x3 plus the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.downsample = DownsampleConv(cin, cout, stride) if stride != 1 or cin != cout else None
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.drop_path = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x_pre = F.relu(self.norm1(x))
        shortcut = x if self.downsample is None else self.downsample(x_pre)
        x = self.conv1(x_pre)
        x = self.conv2(F.relu(self.norm2(x)))
        return self.drop_path(x) + shortcut


class ResNetStage(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(PreActBasic(cin if i == 0 else cout, cout, stride if i == 0 else 1)
              for i in range(depth))
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class ClassifierHead(nn.Module):
    """timm's ``ClassifierHead`` with ``use_conv=True``: pooling, then a 1x1 convolution."""

    def __init__(self, cin: int, num_classes: int) -> None:
        super().__init__()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(cin, num_classes, 1, bias=True)
        self.flatten = nn.Flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.flatten(self.fc(self.global_pool(x)))


class Stem(nn.Module):
    def __init__(self, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, cout, 7, stride=2, padding=3, bias=False)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.conv(x))


class ResNetV2(nn.Module):
    """timm's ``ResNetV2`` (``resnetv2_18``-like: pre-activation basic blocks)."""

    def __init__(
        self, layers: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 1000, width: int = 64
    ) -> None:
        super().__init__()
        self.stem = Stem(width)
        chans = [width * 2**i for i in range(len(layers))]
        cin = width
        stages = []
        for i, (depth, cout) in enumerate(zip(layers, chans, strict=True)):
            stages.append(ResNetStage(cin, cout, 1 if i == 0 else 2, depth))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(cin)
        self.head = ClassifierHead(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.norm(self.stages(self.stem(x)))))
