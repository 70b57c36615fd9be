"""Training augmentation: the training crop (random-resized, or the CIFAR pad-and-crop),
automatic augmentation and random erasing where the backend decodes (DALI on the CPU here,
torchvision v2), MixUp/CutMix on the batch, repeated augmentation in the shared sample order, and
the grid of sample images written at the start of a fit."""
from __future__ import annotations

import glob
import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import nn

from data_pipelines import IMAGENET_MEAN, IMAGENET_STD, augment
from data_pipelines.datamodule import ImageNetDataModule
from data_pipelines.sharding import EpochSampler, steps_per_epoch, train_indices
from data_pipelines.specs import AugSpec, DataSpec
from trainer.callbacks import SampleGrid
from trainer.config import ConfigError, load_config
from trainer.recipe.mixing import BatchMixing, build_mixing
from trainer.recipe.models import build_model
from trainer.module import Classifier
from trainer.recipe.specs import MixSpec, OptimSpec
from tests import photos
from tests.conftest import CPU_FIT, run_cli, skip_without_dali

# -- config -----------------------------------------------------------------------------------


def test_aug_keys_compose_with_everything_off_by_default():
    cfg = load_config(["data.root=/x"])
    assert dict(cfg.aug) == {"auto_augment": "none", "random_erasing": 0.0, "mixup_alpha": 0.0,
                             "cutmix_alpha": 0.0, "repeated_augment": 1, "crop": "rrc", "crop_padding": 4}
    on = load_config(["data.root=/x", "aug.auto_augment=rand_augment", "aug.random_erasing=0.25",
                      "aug.mixup_alpha=0.2", "aug.cutmix_alpha=1.0", "aug.repeated_augment=4",
                      "aug.crop=pad_crop", "aug.crop_padding=8"])
    assert dict(on.aug) == {"auto_augment": "rand_augment", "random_erasing": 0.25, "mixup_alpha": 0.2,
                            "cutmix_alpha": 1.0, "repeated_augment": 4, "crop": "pad_crop", "crop_padding": 8}
    assert load_config(["data.root=/x", "aug.auto_augment=trivial_wide"]).aug.auto_augment == "trivial_wide"


@pytest.mark.parametrize("override,key", [
    ("aug.auto_augment=autoaugment", "aug.auto_augment"),
    ("aug.random_erasing=1.5", "aug.random_erasing"),
    ("aug.random_erasing=-0.1", "aug.random_erasing"),
    ("aug.mixup_alpha=-1", "aug.mixup_alpha"),
    ("aug.cutmix_alpha=-0.5", "aug.cutmix_alpha"),
    ("aug.repeated_augment=0", "aug.repeated_augment"),
    ("aug.repeated_augment=two", "aug.repeated_augment"),
    ("aug.cutmix=1.0", "aug.cutmix"),
    ("aug.crop=center", "aug.crop"),
    ("aug.crop=random_resized", "aug.crop"),
    ("aug.crop_padding=-1", "aug.crop_padding"),
    ("aug.crop_padding=two", "aug.crop_padding"),
])
def test_bad_aug_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(["data.root=/x", override])


@pytest.mark.slow
def test_a_bad_aug_value_exits_2_at_start(tiny_root, tmp_path):
    proc = run_cli("fit", *CPU_FIT, f"data.root={tiny_root}", f"run.dir={tmp_path}/run", "aug.auto_augment=random",
                   timeout=120)
    assert proc.returncode == 2 and "aug.auto_augment='random'" in proc.stderr, proc.stderr[-2000:]


# -- automatic augmentation where the backend decodes ---------------------------------------------

@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """16 photo-like JPEGs of different sizes (the crops DALI decodes differ in size too)."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    return [str(photos.write_jpeg(root / f"{i}.JPEG", rng, 64 + 6 * i, 48 + 4 * i)) for i in range(16)]


def _dali_batch(files, **options):
    from data_pipelines.dali import DALILoader, PipelineOptions

    opts = PipelineOptions(image_size=32, device="cpu", num_threads=1, output_device=None, **options)
    loader = DALILoader(files, list(range(len(files))), train=True, batch_size=len(files), seed=5, options=opts)
    ((images, labels),) = list(loader)
    return images, labels


@pytest.mark.parametrize("policy", ["trivial_wide", "rand_augment"])
def test_dali_auto_augment_runs_in_the_cpu_pipeline_and_changes_the_images(jpegs, policy):
    """The same seed draws the same crops and flips (the augmentation's operators come after them
    in the graph); the policy then changes most images (an image may draw the identity)."""
    skip_without_dali()
    plain, labels = _dali_batch(jpegs)
    augmented, same_labels = _dali_batch(jpegs, auto_augment=policy)
    assert augmented.shape == plain.shape == (16, 3, 32, 32) and augmented.dtype == torch.uint8
    assert torch.equal(labels, same_labels)
    changed = [(a.int() - p.int()).abs().float().mean() > 1 for a, p in zip(augmented, plain)]
    assert sum(changed) >= 10, f"{sum(changed)} of 16 images changed"
    again, _ = _dali_batch(jpegs, auto_augment=policy)
    assert torch.equal(again, augmented)  # reproducible from the seed


@pytest.mark.parametrize("policy", ["trivial_wide", "rand_augment"])
def test_torchvision_v2_auto_augment_runs_and_changes_the_images(jpegs, policy):
    from data_pipelines.torchvision_loader import load_rgb, train_transform

    changed = 0
    for k, path in enumerate(jpegs):
        image = load_rgb(path)
        torch.manual_seed(k)
        plain = train_transform(32)(image)
        torch.manual_seed(k)  # the same crop and flip: they are drawn first
        augmented = train_transform(32, auto_augment=policy)(image)
        assert augmented.shape == plain.shape == (3, 32, 32) and augmented.dtype == torch.float32
        changed += bool((augmented - plain).abs().mean() > 0.01)
    assert changed >= 10, f"{changed} of 16 images changed"


def test_torchvision_loader_runs_the_augmentations_in_its_workers(jpegs):
    from data_pipelines.torchvision_loader import build_train_loader

    loader = build_train_loader(jpegs, list(range(16)), batch_size=8, image_size=32, num_workers=1, seed=0,
                                shard_id=0, num_shards=1, auto_augment="rand_augment", random_erasing=0.5)
    batches = list(loader)
    assert [tuple(images.shape) for images, _ in batches] == [(8, 3, 32, 32)] * 2
    assert sorted(torch.cat([labels for _, labels in batches]).tolist()) == list(range(16))


def test_bad_augmentation_options_fail_when_made():
    from data_pipelines.dali import PipelineOptions
    from data_pipelines.torchvision_loader import train_transform

    with pytest.raises(ValueError, match="auto_augment='autoaug'"):
        PipelineOptions(device="cpu", auto_augment="autoaug")
    with pytest.raises(ValueError, match="random_erasing=2"):
        PipelineOptions(device="cpu", random_erasing=2)
    with pytest.raises(ValueError, match="auto_augment='autoaug'"):
        train_transform(32, auto_augment="autoaug")
    with pytest.raises(ValueError, match="crop='center'"):
        PipelineOptions(device="cpu", crop="center")
    with pytest.raises(ValueError, match="crop_padding=-1"):
        PipelineOptions(device="cpu", crop="pad_crop", crop_padding=-1)
    with pytest.raises(ValueError, match="crop='center'"):
        train_transform(32, crop="center")
    with pytest.raises(ValueError, match="crop='center'"):
        ImageNetDataModule(DataSpec(root="/x", backend="torchvision", batch_size=4, image_size=32,
                                    val_resize=32, num_workers=0, seed=0), AugSpec(crop="center"), on_gpu=False)


# -- the training crop: random-resized, or the CIFAR pad-and-crop (He et al. 2015) -----------------

def test_pad_crop_padding_must_leave_image_in_the_crop():
    with pytest.raises(ConfigError, match=r"aug\.crop_padding=32 must be smaller than the training crop \(32 px\)"):
        load_config(["data.root=/x", "data.image_size=32", "aug.crop=pad_crop", "aug.crop_padding=32"])
    with pytest.raises(ConfigError, match=r"aug\.crop_padding=16 .* \(16 px\)"):  # progressive: its smallest crop
        load_config(["data.root=/x", "data.image_size=64", "data.val_resize=64", "aug.crop=pad_crop",
                     "aug.crop_padding=16", "data.progressive.start_size=16", "data.progressive.end_size=64",
                     "data.progressive.start_epoch=0", "data.progressive.end_epoch=2"])
    # rrc has no padding to check; pad_crop with 0 is the plain resize (and a flip)
    assert load_config(["data.root=/x", "data.image_size=32", "aug.crop_padding=32"]).aug.crop == "rrc"
    assert load_config(["data.root=/x", "aug.crop=pad_crop", "aug.crop_padding=0"]).aug.crop_padding == 0


def test_the_cifar_recipe_trains_with_the_papers_crop(tiny_root):
    """experiment=degradation_cifar: pad_crop with 4 px, handed by trainer.run to the DataModule."""
    from trainer.run import build_datamodule

    cfg = load_config(["experiment=degradation_cifar", f"data.root={tiny_root}", "data.backend=torchvision",
                       "trainer.accelerator=cpu"])
    assert (cfg.aug.crop, cfg.aug.crop_padding, cfg.data.image_size) == ("pad_crop", 4, 32)
    dm = build_datamodule(cfg)
    assert (dm.aug.crop, dm.aug.crop_padding) == ("pad_crop", 4)


# Image sizes (width, height) of the coded tree: 32x32 (the crop size: resized, nothing changes)
# and others, resized to 32x32 whatever their aspect.
CODED_SIZES = [(32, 32), (48, 40), (40, 56), (32, 32), (64, 36), (32, 32), (36, 48), (50, 50)]


@pytest.fixture(scope="module")
def coded_root(tmp_path_factory):
    """One photo-like PNG (lossless: every backend decodes the same pixels) per class, so that
    the label of a training image says which file it was cut from."""
    root = tmp_path_factory.mktemp("coded")
    for split in ("train", "val"):
        for i, (w, h) in enumerate(CODED_SIZES):
            folder = root / split / f"n{i:08d}"
            folder.mkdir(parents=True)
            photos.photo(100 + i, w, h).save(folder / "img.png")
    return root


def _resized(root, label: int, size: int = 32) -> np.ndarray:
    """Image ``label`` of the coded tree resized to ``size`` square (Pillow's antialiased
    bilinear, as torchvision's Resize): CHW float pixels 0-255."""
    from data_pipelines.torchvision_loader import load_rgb
    from torchvision.transforms import v2

    image = v2.Resize((size, size), antialias=True)(load_rgb(next((root / "train" / f"n{label:08d}").iterdir())))
    return np.asarray(image, np.float64).transpose(2, 0, 1)


def _pixels(normalised: torch.Tensor) -> np.ndarray:
    """A normalised CHW image back to 0-255 pixels (the value 0 stays 0, up to float rounding)."""
    mean, std = (torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return ((normalised.double() * std + mean) * 255).numpy()


def _translation(out: np.ndarray, ref: np.ndarray, padding: int, tol: float) -> tuple[bool, int, int] | None:
    """(flipped, dx, dy) with |dx|, |dy| <= ``padding`` such that ``out`` is ``ref`` (or its
    mirror) shifted: ``out[:, y, x] = ref[:, y + dy, x + dx]`` to within ``tol`` grey levels where
    that pixel exists, and exactly black (0) where it does not; None if there is none."""
    _, h, w = ref.shape
    for flipped in (False, True):
        src = ref[:, :, ::-1] if flipped else ref
        for dy in range(-padding, padding + 1):
            for dx in range(-padding, padding + 1):
                inside = np.zeros((h, w), bool)
                inside[max(0, -dy):min(h, h - dy), max(0, -dx):min(w, w - dx)] = True
                shifted = np.zeros_like(src)
                shifted[:, max(0, -dy):min(h, h - dy), max(0, -dx):min(w, w - dx)] = \
                    src[:, max(0, dy):min(h, h + dy), max(0, dx):min(w, w + dx)]
                if (np.abs(out - shifted)[:, inside].max() <= tol
                        and (inside.all() or np.abs(out[:, ~inside]).max() <= 1e-3)):
                    return flipped, dx, dy
    return None


def _train_batches(root, backend: str, epochs: int, **aug) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``epochs`` epochs of one batch (the 8 images) from the DataModule of ``backend``."""
    if backend.startswith("dali"):
        skip_without_dali()
    torch.manual_seed(0)  # torchvision's draws (in the main process here)
    dm = ImageNetDataModule(DataSpec(root=str(root), backend=backend, batch_size=8, image_size=32,
                                     val_resize=32, num_workers=0 if backend == "torchvision" else 1, seed=3,
                                     filelist_cache=False), AugSpec(**aug), on_gpu=False)
    loader = dm.train_dataloader()
    batches = []
    for epoch in range(epochs):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        batches += list(loader)
    return batches


# Largest difference, in grey levels, from Pillow's resize: the torchvision backend runs that very
# resize (float rounding only); DALI resamples itself (within 2 levels of Pillow on these images).
RESIZE_TOL = {"torchvision": 0.01, "dali_cpu": 2.01}


@pytest.mark.parametrize("backend", ["torchvision", "dali_cpu"])
def test_pad_crop_without_padding_is_the_whole_image_resized(coded_root, backend):
    """aug.crop=pad_crop, crop_padding=0: each training image is its whole file resized to 32x32
    (a 32x32 file exactly as it is), mirrored or not, with both flips drawn."""
    flips = []
    for images, labels in _train_batches(coded_root, backend, epochs=2, crop="pad_crop", crop_padding=0):
        assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
        for image, label in zip(images, labels.tolist()):
            ref = _resized(coded_root, label)
            found = _translation(_pixels(image), ref, padding=0,
                                 tol=0.01 if CODED_SIZES[label] == (32, 32) else RESIZE_TOL[backend])
            assert found is not None, f"image {label} is not its file resized to 32x32"
            flips.append(found[0])
    assert len(flips) == 16 and 0 < sum(flips) < 16


@pytest.mark.parametrize("backend", ["torchvision", "dali_cpu"])
def test_pad_crop_shifts_the_resized_image_by_at_most_the_padding_with_black_borders(coded_root, backend):
    """aug.crop=pad_crop, crop_padding=4 (He et al.'s CIFAR-10 augmentation): each training image
    is its file resized to 32x32, mirrored or not, and shifted by at most 4 px along each axis;
    the uncovered border is black (pixel 0, normalised as the rest). The shifts vary (borders
    appear), and the same images under aug.crop=rrc are mostly no such translation (rescaled crops)."""
    shifts = []
    for images, labels in _train_batches(coded_root, backend, epochs=3, crop="pad_crop", crop_padding=4):
        assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
        for image, label in zip(images, labels.tolist()):
            found = _translation(_pixels(image), _resized(coded_root, label), padding=4, tol=RESIZE_TOL[backend])
            assert found is not None, f"image {label} is not its resized file shifted by at most 4 px"
            shifts.append(found)
    assert len(shifts) == 24
    moved = [(dx, dy) for _, dx, dy in shifts if (dx, dy) != (0, 0)]
    assert len(moved) >= 18, shifts  # 80 of the 81 shifts move the image
    assert len({dx for _, dx, _ in shifts}) >= 4 and len({dy for _, _, dy in shifts}) >= 4, shifts
    assert 0 < sum(flipped for flipped, _, _ in shifts) < 24

    (images, labels), = _train_batches(coded_root, backend, epochs=1, crop="rrc")
    translations = [_translation(_pixels(image), _resized(coded_root, label), padding=4, tol=RESIZE_TOL[backend])
                    for image, label in zip(images, labels.tolist())]
    assert sum(t is not None for t in translations) <= 2, translations


def test_dali_pad_crop_with_auto_augment_runs_on_the_finished_crop(coded_root):
    """pad_crop and an automatic augmentation together on dali_cpu: 32x32 batches, reproducible."""
    first = _train_batches(coded_root, "dali_cpu", epochs=1, crop="pad_crop", auto_augment="trivial_wide")
    again = _train_batches(coded_root, "dali_cpu", epochs=1, crop="pad_crop", auto_augment="trivial_wide")
    assert first[0][0].shape == (8, 3, 32, 32)
    assert torch.equal(first[0][0], again[0][0]) and torch.equal(first[0][1], again[0][1])


# -- random erasing ---------------------------------------------------------------------------------

def _erased_box(image: torch.Tensor, value) -> tuple[int, int, int, int] | None:
    """The bounding box (top, left, h, w) of the pixels equal to ``value`` in every channel."""
    value = torch.as_tensor(value, dtype=image.dtype).view(-1, 1, 1)
    hit = (image == value).all(0)
    if not hit.any():
        return None
    rows, cols = hit.any(1).nonzero()[:, 0], hit.any(0).nonzero()[:, 0]
    top, left = int(rows[0]), int(cols[0])
    h, w = int(rows[-1]) - top + 1, int(cols[-1]) - left + 1
    assert hit[top:top + h, left:left + w].all(), "the erased area is not a rectangle"
    return top, left, h, w


def test_batch_erasing_erases_one_rectangle_per_chosen_image_with_the_mean_colour():
    rng = np.random.default_rng(0)
    boxes = augment.erase_boxes(rng, 64, 40, 48, p=0.5)
    chosen = boxes[:, 2] > 0
    assert 15 <= chosen.sum() <= 49  # about half of the images
    areas = boxes[chosen, 2] * boxes[chosen, 3] / (40 * 48)
    assert (areas > 0.01).all() and (areas < 0.4).all()  # torchvision's scale (0.02, 0.33), rounded
    floats = torch.randn(64, 3, 40, 48).contiguous(memory_format=torch.channels_last)
    pixels = torch.randint(1, 250, (64, 3, 40, 48), dtype=torch.uint8)
    before = floats.clone()
    augment.erase(floats, boxes)
    augment.erase(pixels, boxes)
    assert floats.is_contiguous(memory_format=torch.channels_last)  # in place, layout kept
    mean_pixel = [round(m * 255) for m in IMAGENET_MEAN]
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        if h == 0:
            assert torch.equal(floats[i], before[i])
            continue
        assert _erased_box(floats[i], 0.0) == (top, left, h, w)
        assert _erased_box(pixels[i], mean_pixel) == (top, left, h, w)
        outside = torch.ones(40, 48, dtype=torch.bool)
        outside[top:top + h, left:left + w] = False
        assert torch.equal(floats[i][:, outside], before[i][:, outside])
    assert not augment.erase_boxes(rng, 64, 40, 48, p=0.0).any()


def test_dali_loader_erases_its_normalised_batches(jpegs):
    skip_without_dali()
    from data_pipelines.dali import DALILoader, PipelineOptions

    opts = PipelineOptions(image_size=32, device="cpu", num_threads=1, random_erasing=1.0)
    loader = DALILoader(jpegs, [0] * 16, train=True, batch_size=16, seed=5, options=opts)
    ((images, _),) = list(loader)
    assert images.dtype == torch.float32
    boxes = [_erased_box(image, 0.0) for image in images]
    assert sum(box is not None for box in boxes) >= 14  # p=1: all but those no attempt fitted


def test_torchvision_random_erasing_erases(jpegs):
    from data_pipelines.torchvision_loader import load_rgb, train_transform

    boxes = [_erased_box(train_transform(32, random_erasing=1.0)(load_rgb(path)), 0.0) for path in jpegs]
    assert sum(box is not None for box in boxes) >= 14


# -- MixUp and CutMix ----------------------------------------------------------------------------

@pytest.mark.parametrize("mixup,cutmix", [(0.2, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixed_targets_are_soft_and_sum_to_one(mixup, cutmix):
    torch.manual_seed(0)
    mixing = BatchMixing(10, mixup_alpha=mixup, cutmix_alpha=cutmix)
    for _ in range(5):
        images, labels = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
        mixed, targets = mixing(images.clone(), labels)
        assert mixed.shape == images.shape and targets.shape == (8, 10) and targets.dtype == torch.float32
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
        # All of each target is on the image's own label and its neighbour's.
        own = targets[torch.arange(8), labels] + targets[torch.arange(8), labels.roll(1)]
        assert (own >= 1 - 1e-6).all()
    assert build_mixing(10) is None


class Spy(nn.Module):
    """Records what it is called with; passes it on to ``inner`` (when given)."""

    def __init__(self, inner: nn.Module | None = None) -> None:
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, *args):
        self.seen.append(args)
        return self.inner(*args) if self.inner is not None else None


def test_soft_targets_reach_the_loss_and_train_top1_counts_the_dominant_label():
    """MixUp on the batch in training_step: the loss gets the soft targets [N, C] as they are;
    train top-1 is measured against their argmax, the dominant label. The seed is one where some
    image's dominant label is its neighbour's (its own weight is below 1/2)."""
    images, labels = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    for seed in range(50):
        torch.manual_seed(seed)
        _, targets = BatchMixing(4, mixup_alpha=1.0)(images.clone(), labels)
        if (targets.argmax(1) != labels).any():
            break
    module = Classifier(build_model("resnet20", 4), num_classes=4, batch_size=8, optim=OptimSpec(lr=0.1, momentum=0.9),
                        mixing=MixSpec(mixup_alpha=1.0))
    module.criterion = Spy(module.criterion)
    module.train_top1 = Spy()
    module.log = lambda *args, **kwargs: None
    torch.manual_seed(seed)
    module.training_step((images, labels), 0)
    ((logits, loss_targets),) = module.criterion.seen
    torch.testing.assert_close(loss_targets, targets)
    torch.testing.assert_close(loss_targets.sum(1), torch.ones(8))
    ((top1_logits, top1_targets),) = module.train_top1.seen
    assert top1_logits is logits
    assert torch.equal(top1_targets, targets.argmax(1)) and not torch.equal(top1_targets, labels)


# -- repeated augmentation: the shared sample order ---------------------------------------------------

@pytest.mark.parametrize("repeats", [2, 3, 4])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [64, 67, 101])
def test_repeated_augment_feeds_each_chosen_image_count_times_in_equal_full_batches(n, world, repeats):
    batch = 4
    steps = steps_per_epoch(n, world, batch)
    epochs = []
    for epoch in range(2):
        shards = [train_indices(n, epoch=epoch, seed=7, shard_id=r, num_shards=world, batch_size=batch,
                                repeats=repeats) for r in range(world)]
        assert all(len(s) == steps * batch for s in shards)  # equal full batches: the epoch's length is kept
        flat = np.concatenate(shards)
        counts = np.bincount(flat, minlength=n)
        chosen = np.flatnonzero(counts)
        assert len(chosen) == -(-len(flat) // repeats)
        short = counts[chosen] != repeats  # at most the last image, when repeats does not divide the epoch
        assert short.sum() <= (len(flat) % repeats != 0)
        if len(flat) % repeats == 0:
            assert (counts[chosen] == repeats).all()
        for r in range(world):  # resuming mid-epoch skips exactly the fed batches
            rest = train_indices(n, epoch=epoch, seed=7, shard_id=r, num_shards=world, batch_size=batch,
                                 start_step=1, repeats=repeats)
            assert np.array_equal(rest, shards[r][batch:])
        epochs.append(flat)
    assert not np.array_equal(epochs[0], epochs[1])
    sampler = EpochSampler(n, seed=7, shard_id=0, num_shards=world, batch_size=batch, repeats=repeats)
    sampler.set_epoch(1)
    assert list(sampler) == train_indices(n, epoch=1, seed=7, shard_id=0, num_shards=world, batch_size=batch,
                                          repeats=repeats).tolist()


@pytest.mark.parametrize("backend", ["torchvision", "dali_cpu"])
def test_loaders_feed_repeated_images_with_different_augmentations(tmp_path, backend):
    """One image per class: the labels are the image ids. Each of the 8 chosen images comes twice
    per epoch, its two copies cropped differently."""
    if backend.startswith("dali"):
        skip_without_dali()
    root = tmp_path / "ids"
    for split in ("train", "val"):
        photos.write_tree(root, split, classes=16, per_class=1, sizes=(64, 48))
    dm = ImageNetDataModule(DataSpec(root=str(root), backend=backend, batch_size=8, image_size=32,
                                     val_resize=32, num_workers=1, seed=3, filelist_cache=False),
                            AugSpec(repeated_augment=2), on_gpu=False)
    images, labels = map(torch.cat, zip(*list(dm.train_dataloader())))
    counts = np.bincount(labels.numpy(), minlength=16)
    assert sorted(counts.tolist()) == [0] * 8 + [2] * 8
    for label in np.flatnonzero(counts):
        first, second = images[labels == label]
        assert not torch.equal(first, second)


# -- the grid of sample images -------------------------------------------------------------------

@pytest.mark.slow
def test_fit_writes_a_grid_of_32_augmented_training_images(tiny_root, tmp_path):
    """A 2-step fit (64 images, batch 32) with every augmentation on: RUN_DIR/samples.png has
    8 x 4 tiles of the 32 px crops (make_grid's 2 px padding), and W&B (offline here) got it."""
    skip_without_dali()
    run_dir = tmp_path / "run"
    proc = run_cli("fit", *CPU_FIT, f"data.root={tiny_root}", f"run.dir={run_dir}", "data.backend=dali_cpu",
                   "data.batch_size=32", "aug.auto_augment=trivial_wide", "aug.random_erasing=0.5",
                   "aug.mixup_alpha=0.2", "aug.cutmix_alpha=1.0", "aug.repeated_augment=2", "eval.tta_flip=true",
                   "logger.wandb.mode=offline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 2
    with Image.open(run_dir / "samples.png") as grid:
        assert grid.size == (8 * (32 + 2) + 2, 4 * (32 + 2) + 2)
    try:
        import wandb  # noqa: F401
    except ImportError:
        return
    assert glob.glob(str(run_dir / "wandb" / "*" / "files" / "media" / "images" / "samples_*.png"))


class Losses(pl.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seen.append((batch[1].tolist(), float(outputs["loss"])))


@pytest.mark.slow
def test_sample_grid_leaves_the_data_and_the_mixing_untouched(tiny_root, tmp_path):
    """With the grid and without it: the same batches and the same losses, so the same MixUp and
    CutMix draws (the grid redraws them under a fork of the RNG)."""
    runs = []
    for grid in (False, True):
        pl.seed_everything(0)
        dm = ImageNetDataModule(DataSpec(root=str(tiny_root), backend="torchvision", batch_size=16,
                                         image_size=32, val_resize=32, num_workers=0, seed=3, filelist_cache=False),
                                on_gpu=False)
        module = Classifier(build_model("resnet20", 4), num_classes=4, batch_size=16,
                            optim=OptimSpec(lr=0.1, momentum=0.9), mixing=MixSpec(mixup_alpha=0.4, cutmix_alpha=1.0))
        record = Losses()
        callbacks = [SampleGrid(tmp_path / "samples.png", count=8)] if grid else []
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, callbacks=[*callbacks, record], use_distributed_sampler=False,
                             num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path)
        trainer.fit(module, dm)
        runs.append(record.seen)
    assert runs[0] == runs[1]
    with Image.open(tmp_path / "samples.png") as grid:
        assert grid.size == (8 * (32 + 2) + 2, 32 + 4)

