"""Every architecture builds and runs; ImageNet ResNets equal torchvision's; plain means no shortcut."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from trainer.recipe.models import (ARCHS, BlurConv2d, BlurMaxPool2d, CifarBlock, PlainBasicBlock, PlainBottleneck,
                            build_model)

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


# --- BlurPool (model.blurpool) ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet50", "resnet18", "plain18", "resnet20"])
def test_blurpool_keeps_shapes_parameters_and_state_dict_keys_and_changes_the_output(arch):
    torch.manual_seed(0)
    size = 32 if ARCHS[arch].family == "cifar" else 64
    plain = build_model(arch, num_classes=7).eval()
    blurred = build_model(arch, num_classes=7, blurpool=True).eval()
    assert sum(p.numel() for p in blurred.parameters()) == sum(p.numel() for p in plain.parameters())
    assert list(blurred.state_dict()) == list(plain.state_dict())  # the filters are not persistent
    blurred.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        a, b = plain(x), blurred(x)
    assert b.shape == a.shape == (2, 7) and torch.isfinite(b).all()
    assert not torch.allclose(a, b, atol=1e-3)
    # Every strided conv with >= 16 input channels is blurred (FFCV's and Composer's rule), not the RGB stem.
    strided = [m for m in blurred.modules() if isinstance(m, nn.Conv2d) and max(m.stride) > 1]
    assert strided and all(isinstance(m, BlurConv2d) == (m.in_channels >= 16) for m in strided)
    pools = [m for m in blurred.modules() if isinstance(m, BlurMaxPool2d)]
    assert len(pools) == (1 if ARCHS[arch].family == "imagenet" else 0)


def test_a_strided_conv_sees_a_binomially_blurred_input():
    """FFCV's BlurPoolConv2d: conv(depthwise [1, 2, 1] x [1, 2, 1] / 16 filter, stride 1, zero padding)."""
    torch.manual_seed(0)
    conv = build_model("resnet18", num_classes=5, blurpool=True).layer2[0].conv1  # 64 -> 128, stride 2
    assert isinstance(conv, BlurConv2d) and conv.stride == (2, 2)
    x = torch.randn(2, 64, 16, 16)
    taps = torch.tensor([1.0, 2.0, 1.0])
    kernel = (taps[:, None] * taps[None, :] / 16).expand(64, 1, 3, 3)
    blurred = F.conv2d(x, kernel, padding=1, groups=64)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), F.conv2d(blurred, conv.weight, stride=2, padding=1))
    # The highest frequency (a checkerboard), which a stride-2 conv would alias, is flattened away.
    board = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2.0 - 1).expand(1, 64, 16, 16)
    assert conv.blur(board)[..., 1:-1, 1:-1].abs().max() < 1e-6


def test_blur_max_pool_is_a_stride_1_max_then_a_strided_blur():
    pool = build_model("resnet18", num_classes=5, blurpool=True).maxpool
    assert isinstance(pool, BlurMaxPool2d)
    x = torch.randn(2, 4, 15, 15)
    taps = torch.tensor([1.0, 2.0, 1.0])
    kernel = (taps[:, None] * taps[None, :] / 16).expand(4, 1, 3, 3)
    expected = F.conv2d(F.max_pool2d(x, 3, stride=1, padding=1), kernel, stride=2, padding=1, groups=4)
    torch.testing.assert_close(pool(x), expected)
    assert pool(x).shape == nn.MaxPool2d(3, 2, 1)(x).shape


def test_export_of_a_blurpool_net_rebuilds_it_and_names_no_torchvision_builder():
    from trainer.artifacts.export import build_network, checkpoint_metadata

    ckpt = {"hyper_parameters": {"config": {"model": {"arch": "resnet18", "blurpool": True},
                                            "data": {"val_resize": 36, "image_size": 32}},
                                 "classes": ["a", "b"], "num_classes": 2}}
    meta = checkpoint_metadata(ckpt, source="x.ckpt")
    assert meta["blurpool"] is True and meta["torchvision_builder"] is None
    net = build_network(meta, build_model("resnet18", 2, blurpool=True).state_dict())
    assert isinstance(net.layer2[0].conv1, BlurConv2d)
    ckpt["hyper_parameters"]["config"]["model"].pop("blurpool")  # a checkpoint from before the key
    assert checkpoint_metadata(ckpt, source="x.ckpt")["torchvision_builder"] == "torchvision.models.resnet18"
