"""The DALI CPU training pipeline's resize and flip, and the normalisation done where training runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines import IMAGENET_MEAN, IMAGENET_STD, normalize
from data_pipelines import dali
from tests import photos

needs_dali = pytest.mark.skipif(not dali.dali_available(), reason="NVIDIA DALI is not installed")


def _photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """The shared photo-like image (smooth colour fields, texture and noise) as HWC pixels, like a photo's crop."""
    return np.array(photos.photo(rng, w, h))


def _resize(crops: list[np.ndarray], flips: list[int], size: int, threads: int = 2) -> list[torch.Tensor]:
    """The loader's resize of HWC uint8 crops, as it gets them from DALI."""
    batch = dali.resize_and_flip([torch.from_numpy(c) for c in crops], [bool(f) for f in flips], size=size,
                                 num_threads=threads)
    return list(batch)


@pytest.mark.parametrize("shape", [(300, 280), (433, 380), (150, 120), (700, 520)])
def test_crop_resize_matches_pillows_bilinear_filter(shape):
    """Downscales below and above 2x and an upscale, against Pillow's antialiased bilinear
    resize (what torchvision's RandomResizedCrop runs on PIL images). Measured: mean difference
    0.002-0.04 levels, never more than 1; without antialiasing it would be 2-4, up to 36."""
    crop = _photo(np.random.default_rng(sum(shape)), *shape)
    (ours,) = _resize([crop], [0], 224)
    assert ours.dtype == torch.uint8 and ours.shape == (3, 224, 224) and ours.is_contiguous()
    want = torch.from_numpy(np.array(Image.fromarray(crop).resize((224, 224), Image.BILINEAR))).permute(2, 0, 1)
    diff = (ours.int() - want.int()).abs().float()
    assert diff.mean() < 0.1 and diff.max() <= 1, f"mean {diff.mean():.2f}, max {diff.max():.0f} levels"


def test_flip_mirrors_exactly_and_only_the_flagged_samples():
    rng = np.random.default_rng(1)
    crops = [_photo(rng, 200 + 13 * i, 260 - 7 * i) for i in range(7)]  # samples over 2 threads
    plain = _resize(crops, [0] * 7, 64)
    mixed = _resize(crops, [1, 0, 1, 1, 0, 0, 1], 64)
    for i, (p, m) in enumerate(zip(plain, mixed)):
        expected = p.flip(-1) if i in (0, 2, 3, 6) else p
        assert torch.equal(m, expected), f"sample {i}"


@needs_dali
def test_cpu_train_loader_hands_over_uint8_crops_flipped_half_the_time(tmp_path):
    """An image whose red rises from left to right keeps that order in every random crop unless
    flipped: each output must be monotonic one way or the other, and both ways must occur."""
    h, w = 120, 160
    ramp = np.zeros((h, w, 3), np.uint8)
    ramp[..., 0] = np.linspace(0, 255, w).astype(np.uint8)
    ramp[..., 1] = 90
    path = tmp_path / "ramp.JPEG"
    Image.fromarray(ramp).save(path, quality=95)
    options = dali.PipelineOptions(image_size=48, device="cpu", num_threads=2, output_device=None)
    loader = dali.DALILoader([str(path)] * 32, [0] * 32, train=True, batch_size=32, seed=3, options=options)
    ((batch, _),) = list(loader)
    assert batch.dtype == torch.uint8 and batch.shape == (32, 3, 48, 48)
    red = batch[:, 0].float().mean(dim=1)  # [N, W]: the red profile of each crop
    slope = red[:, -4:].mean(1) - red[:, :4].mean(1)
    assert (slope.abs() > 10).all(), "a crop lost the ramp"
    flipped = int((slope < 0).sum())
    assert 6 <= flipped <= 26, f"{flipped} of 32 crops mirrored"


def test_normalize_is_imagenet_mean_std_in_the_requested_dtype():
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    want = (x.float() / 255 - mean) / std
    got = normalize(x)
    assert got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    half = normalize(x, torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), want, rtol=0, atol=2e-2)


def test_normalize_names_what_it_got():
    with pytest.raises(ValueError, match=r"uint8 images of shape \[N, 3, H, W\], got torch.float32"):
        normalize(torch.zeros(1, 3, 4, 4))


@needs_dali
def test_loader_without_output_device_hands_over_the_pixels_it_would_normalise(tmp_path):
    rng = np.random.default_rng(2)
    files = []
    for i in range(6):
        files.append(str(photos.write_jpeg(tmp_path / f"{i}.JPEG", rng, 48, 40, quality=90)))
    kwargs = dict(image_size=32, val_resize=36, device="cpu", num_threads=1)
    raw = [x for x, _ in dali.DALILoader(files, [0] * 6, train=False, batch_size=3,
                                         options=dali.PipelineOptions(output_device=None, **kwargs))]
    normed = [x for x, _ in dali.DALILoader(files, [0] * 6, train=False, batch_size=3,
                                            options=dali.PipelineOptions(**kwargs))]
    assert all(x.dtype == torch.uint8 and x.shape == (3, 3, 32, 32) for x in raw)
    assert all(torch.equal(normalize(r), n) for r, n in zip(raw, normed))
