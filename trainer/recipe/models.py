"""ResNets and their plain twins, built by name.

ImageNet models (``resnet18`` ... ``resnet152``) are torchvision's own ``ResNet`` class, so
state_dict keys and parameter counts equal torchvision's and exported weights load into
``torchvision.models.resnet50(...)`` unchanged. A *plain* twin (``plain18`` ...) is the same
network with every shortcut removed, identity and projection alike (He et al. 2015, section 3.4):
the comparison the degradation study needs.

CIFAR-style models (``resnet20/32/44/56/110`` and ``plain*``) follow He et al. 2015 section 4.2:
a 3x3 stem of 16 channels, three stages of 16/32/64 channels with n = (depth - 2) / 6 basic
blocks each, global average pooling and a linear classifier; shortcuts are parameter-free
(option A: subsample and zero-pad the channels), as in the paper.

``blurpool=True`` adds antialiased downsampling (Zhang 2019) as FFCV and Composer apply it to
ResNet-50: see ``apply_blurpool``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import BlurPool2d
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet


@dataclass(frozen=True)
class Arch:
    """One architecture: its family, block type and blocks per stage."""

    family: str  # "imagenet" or "cifar"
    residual: bool
    layers: tuple[int, ...]
    bottleneck: bool = False


_IMAGENET_LAYERS = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
}
_CIFAR_DEPTHS = (20, 32, 44, 56, 110)

ARCHS: dict[str, Arch] = {}
for _depth, (_layers, _bottleneck) in _IMAGENET_LAYERS.items():
    ARCHS[f"resnet{_depth}"] = Arch("imagenet", True, _layers, _bottleneck)
    ARCHS[f"plain{_depth}"] = Arch("imagenet", False, _layers, _bottleneck)
for _depth in _CIFAR_DEPTHS:
    _n = (_depth - 2) // 6
    ARCHS[f"resnet{_depth}"] = Arch("cifar", True, (_n, _n, _n))
    ARCHS[f"plain{_depth}"] = Arch("cifar", False, (_n, _n, _n))


# --- plain twins of torchvision's blocks: the same layers, no shortcut --------------------------


class PlainBasicBlock(BasicBlock):
    """torchvision's BasicBlock without its shortcut: relu(bn2(conv2(relu(bn1(conv1(x))))))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)))


class PlainBottleneck(Bottleneck):
    """torchvision's Bottleneck without its shortcut."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)))


def _imagenet_model(arch: Arch, num_classes: int, zero_init_residual: bool) -> ResNet:
    if arch.residual:
        block = Bottleneck if arch.bottleneck else BasicBlock
    else:
        block = PlainBottleneck if arch.bottleneck else PlainBasicBlock
    model = ResNet(block, list(arch.layers), num_classes=num_classes, zero_init_residual=zero_init_residual)
    if not arch.residual:
        # torchvision builds a 1x1 projection wherever shape changes; a plain net has none.
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
            for blk in stage:
                blk.downsample = None
    return model


# --- CIFAR-style networks (He et al. 2015, section 4.2) -------------------------------------


class CifarBlock(nn.Module):
    """Two 3x3 convs; with ``residual`` the input is added back (option A shortcut)."""

    def __init__(self, in_planes: int, planes: int, stride: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            # Zero-pad the new channels: the paper's parameter-free option A.
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    def __init__(self, layers: tuple[int, ...], residual: bool, num_classes: int, zero_init_residual: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for i, (n, planes) in enumerate(zip(layers, (16, 32, 64))):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(CifarBlock(in_planes, planes, stride, residual))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, CifarBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


# --- antialiased downsampling (BlurPool) --------------------------------------------------------


class BlurConv2d(nn.Conv2d):
    """A strided conv that sees its input blurred first: a depthwise 3x3 binomial filter
    ([1, 2, 1] x [1, 2, 1] / 16), stride 1, zero padding, as FFCV's ``BlurPoolConv2d`` and
    Composer's ``BlurConv2d(blur_first=True)``.

    A subclass rather than a wrapper, so the state_dict keys stay the conv's own (``conv2.weight``);
    the filter (timm's ``BlurPool2d``) is a non-persistent buffer, so it adds none.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.blur = BlurPool2d(self.in_channels, filt_size=3, stride=1, pad_mode="constant",
                               device=self.weight.device, dtype=self.weight.dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "BlurConv2d":
        """The same conv, sharing its parameters, with the blur in front."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        new.weight = conv.weight
        new.bias = conv.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.blur(x))


class BlurMaxPool2d(nn.Module):
    """Max-pooling with stride 1, then a blur with the pool's stride: Zhang's MaxBlurPool, as
    Composer's ``BlurMaxPool2d``. The output shape equals the strided max-pool's."""

    def __init__(self, pool: nn.MaxPool2d) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(pool.kernel_size, stride=1, padding=pool.padding, dilation=pool.dilation,
                                 ceil_mode=pool.ceil_mode)
        self.blur = BlurPool2d(None, filt_size=3, stride=pool.stride, pad_mode="constant")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blur(self.pool(x))


def apply_blurpool(model: nn.Module, min_channels: int = 16) -> nn.Module:
    """``model`` with antialiased downsampling, in place, as Composer's ``apply_blurpool``: every
    strided ``Conv2d`` with at least ``min_channels`` input channels (not the RGB stem) becomes a
    ``BlurConv2d``, and every strided ``MaxPool2d`` a ``BlurMaxPool2d``.

    FFCV replaces the same convs (its rule: stride > 1 and in_channels >= 16). Nothing learnable is
    added: the parameter count and the state_dict keys are unchanged.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is nn.Conv2d and max(child.stride) > 1  # noqa: E721 (not a BlurConv2d again)
                    and child.in_channels >= min_channels):
                setattr(parent, name, BlurConv2d.from_conv(child))
            elif type(child) is nn.MaxPool2d and child.stride not in (1, (1, 1)):  # noqa: E721
                setattr(parent, name, BlurMaxPool2d(child))
    return model


# --- the one place names map to builders ------------------------------------------------------


def build_model(arch: str, num_classes: int, zero_init_residual: bool = False, channels_last: bool = False,
                blurpool: bool = False) -> nn.Module:
    """The network called ``arch`` (see ``ARCHS``) with a ``num_classes``-way classifier; with
    ``blurpool``, antialiased downsampling (``apply_blurpool``)."""
    if arch not in ARCHS:
        raise ValueError(f"model.arch={arch!r} is unknown; choose one of: {', '.join(ARCHS)}")
    if num_classes < 1:
        raise ValueError(f"model.num_classes={num_classes} must be at least 1")
    spec = ARCHS[arch]
    if zero_init_residual and not spec.residual:
        # Zeroing the last BN of every block would make a plain net output a constant.
        raise ValueError(f"model.zero_init_residual=true needs a residual net, not {arch}; set it to false")
    if spec.family == "imagenet":
        model: nn.Module = _imagenet_model(spec, num_classes, zero_init_residual)
    else:
        model = CifarResNet(spec.layers, spec.residual, num_classes, zero_init_residual)
    if blurpool:
        model = apply_blurpool(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
