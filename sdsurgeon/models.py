"""Built-in reference architectures for examples, benchmarks and tests: CIFAR ResNets (He et al. 2016)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convs; a downsampling block uses the parameter-free 'option A' shortcut (slice + zero-pad)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes - in_planes
        self.stride = stride

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.stride != 1 or self.pad:
            half = self.pad // 2
            x = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, half, self.pad - half))
        return F.relu(out + x)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images: three stages of n blocks (16, 32, 64 channels)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"depth must be 6n+2 (20, 32, 56, 110, 1202, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, planes = [], width
        for stage, out_planes in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(planes, out_planes, stride))
                planes = out_planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def cifar_resnet(depth: int = 20, num_classes: int = 10, width: int = 16) -> CifarResNet:
    """Factory for ``--arch sdsurgeon.models:cifar_resnet --arch-kwargs '{"depth": 110}'``."""
    return CifarResNet(depth, num_classes, width)
