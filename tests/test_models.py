"""Every architecture builds and runs; ImageNet ResNets equal torchvision's; plain means no shortcut."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from trainer.models import ARCHS, CifarBlock, PlainBasicBlock, PlainBottleneck, build_model

IMAGENET_DEPTHS = (18, 34, 50, 101, 152)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_builds_with_right_shape_and_no_nan(arch):
    torch.manual_seed(0)
    size = 32 if ARCHS[arch].family == "cifar" else 64
    model = build_model(arch, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("depth", IMAGENET_DEPTHS)
def test_imagenet_resnets_equal_torchvision(depth):
    ours = build_model(f"resnet{depth}", num_classes=1000)
    ref = getattr(torchvision.models, f"resnet{depth}")(num_classes=1000)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert list(ours_sd) == list(ref_sd)
    assert all(ours_sd[k].shape == ref_sd[k].shape for k in ref_sd)
    ref.load_state_dict(ours_sd, strict=True)


def test_resnet50_has_the_published_parameter_count():
    assert sum(p.numel() for p in build_model("resnet50", 1000).parameters()) == 25_557_032


@pytest.mark.parametrize("depth", IMAGENET_DEPTHS)
def test_plain_twins_have_no_projection_shortcuts(depth):
    plain = build_model(f"plain{depth}", num_classes=10)
    blocks = [m for m in plain.modules() if isinstance(m, (PlainBasicBlock, PlainBottleneck))]
    assert len(blocks) == sum(ARCHS[f"plain{depth}"].layers)
    assert all(b.downsample is None for b in blocks)
    residual = build_model(f"resnet{depth}", num_classes=10)
    assert sum(isinstance(m, nn.Sequential) and m is not None for m in
               (getattr(b, "downsample", None) for b in residual.modules())) > 0


def _zero_branch(block: nn.Module) -> None:
    """Zero the last BatchNorm of the residual branch: the branch then outputs 0."""
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    nn.init.zeros_(last_bn.weight)
    nn.init.zeros_(last_bn.bias)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet20"])
def test_residual_block_with_zeroed_branch_returns_relu_of_input(arch):
    model = build_model(arch, num_classes=10).eval()
    stage = model.layer1
    block = stage[1]  # an identity block: same shape in and out
    _zero_branch(block)
    channels = block.conv1.in_channels
    x = torch.randn(2, channels, 8, 8)
    with torch.no_grad():
        assert torch.allclose(block(x), torch.relu(x))


@pytest.mark.parametrize("arch", ["plain18", "plain50", "plain20"])
def test_plain_block_with_zeroed_branch_does_not(arch):
    model = build_model(arch, num_classes=10).eval()
    block = model.layer1[1]
    _zero_branch(block)
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    with torch.no_grad():
        out = block(x)
    assert torch.count_nonzero(out) == 0  # relu(0 + nothing): the input is not carried through
    assert not torch.allclose(out, torch.relu(x))


def test_cifar_resnet20_matches_the_paper():
    model = build_model("resnet20", num_classes=10)
    # He et al. 2015, Table 6: ResNet-20 has 0.27M parameters; option A shortcuts add none.
    assert 0.26e6 < sum(p.numel() for p in model.parameters()) < 0.28e6
    assert sum(isinstance(m, CifarBlock) for m in model.modules()) == 9
    assert sum(p.numel() for p in build_model("plain20", 10).parameters()) == sum(p.numel() for p in model.parameters())


def test_zero_init_residual_zeroes_the_last_bn_of_every_block():
    for arch, attr in (("resnet50", "bn3"), ("resnet18", "bn2"), ("resnet20", "bn2")):
        model = build_model(arch, num_classes=10, zero_init_residual=True)
        blocks = [m for m in model.modules() if hasattr(m, attr) and hasattr(m, "conv2")]
        assert blocks and all(torch.count_nonzero(getattr(b, attr).weight) == 0 for b in blocks)


def test_zero_init_residual_is_refused_for_plain_nets():
    with pytest.raises(ValueError, match="plain18"):
        build_model("plain18", num_classes=10, zero_init_residual=True)


def test_channels_last_weights_and_same_output():
    torch.manual_seed(0)
    a = build_model("resnet18", num_classes=5).eval()
    b = build_model("resnet18", num_classes=5, channels_last=True).eval()
    b.load_state_dict(a.state_dict())
    assert b.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x.contiguous(memory_format=torch.channels_last)), atol=1e-4)


def test_unknown_arch_names_the_choices():
    with pytest.raises(ValueError, match="resnet50"):
        build_model("resnet51", num_classes=10)
