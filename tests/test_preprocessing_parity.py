"""DALI's validation preprocessing agrees with torchvision's on the same JPEGs.

Measured here (224 crop of 256 resize, photo-like 500x375 JPEGs of tests/photos.py with a
sharp-edged shape pasted in): mean |difference| 0.010-0.012 in normalised units (about 0.6 of a grey
level) where the image is resized, once both crop at the same offset; a crop one pixel off differs
by 0.17-0.26. When the resized side minus the crop is odd, the two centre crops sit one pixel
apart: torchvision rounds the x.5 offset half-to-even (down here), DALI up. Both are centre crops;
the test pins that too.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import transforms as T

pytest.importorskip("nvidia.dali")

from data_pipelines.dali import DALILoader, PipelineOptions  # noqa: E402
from data_pipelines.sample import render  # noqa: E402
from data_pipelines.torchvision_loader import IMAGENET_MEAN, IMAGENET_STD, load_rgb  # noqa: E402
from tests.photos import photo  # noqa: E402

MEAN_ABS_TOLERANCE = 0.015  # normalised units; measured 0.010-0.012


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    rng = np.random.default_rng(0)
    out = []
    for i, (w, h) in enumerate([(500, 375), (375, 500), (384, 256), (640, 480)]):
        im = photo(rng, w, h)
        im.paste(render("circle", "red", (200, 150), rng), (50, 60))  # and sharp edges
        path = tmp_path_factory.mktemp("photos") / f"p{i}.JPEG"
        im.save(path, quality=92)
        out.append(str(path))
    return out


def test_dali_val_matches_torchvision_resize_and_centre_crop(photos):
    loader = DALILoader(photos, [0] * len(photos), train=False, batch_size=len(photos),
                        options=PipelineOptions(image_size=224, val_resize=256, device="cpu", num_threads=1))
    dali = next(iter(loader))[0]
    normalise = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for k, path in enumerate(photos):
        resized = normalise(T.Resize(256)(load_rgb(path)))
        h, w = resized.shape[1:]
        # DALI's offset: the x.5 case rounded up; torchvision's CenterCrop rounds it half-to-even.
        top, left = int(np.floor((h - 224) / 2 + 0.5)), int(np.floor((w - 224) / 2 + 0.5))
        same_offset = resized[:, top:top + 224, left:left + 224]
        assert (dali[k] - same_offset).abs().mean() < MEAN_ABS_TOLERANCE, path
        tv = T.CenterCrop(224)(resized)
        assert (tv.shape == dali[k].shape)
        if (h - 224) % 2 == 0 and (w - 224) % 2 == 0:  # no x.5 offset: the crops coincide
            assert (dali[k] - tv).abs().mean() < MEAN_ABS_TOLERANCE, path
        assert torch.isfinite(dali[k]).all()
