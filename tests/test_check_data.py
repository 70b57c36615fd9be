"""check-data: the odd-but-valid images of ImageNet pass (and DALI decodes them to RGB), broken
ones are reported with their path and a reason."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data_pipelines import check
from data_pipelines.dali import DALILoader, PipelineOptions, dali_available
from tests import photos

W, H = 64, 48


def _photo() -> Image.Image:
    """The shared photo-like image (JPEG behaves as on real photos), the same one every call."""
    return photos.photo(0, W, H)


def _write_valid(folder) -> dict[str, str]:
    """The valid oddities real ImageNet holds, each named .JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    made = {
        "rgb": lambda p: photos.write_jpeg(p, 0, W, H, quality=90),
        "cmyk": lambda p: photos.write_jpeg(p, 0, W, H, quality=90, mode="CMYK"),
        "gray": lambda p: photos.write_jpeg(p, 0, W, H, quality=90, mode="L"),
        "png": lambda p: _photo().save(p, "PNG"),  # like n02105855_2933.JPEG
        "progressive": lambda p: photos.write_jpeg(p, 0, W, H, quality=90, progressive=True),
        "exif_rotated": lambda p: photos.write_jpeg(p, 0, W, H, quality=90, exif=exif),
    }
    paths = {}
    for name, save in made.items():
        path = folder / f"{name}.JPEG"
        save(path)
        paths[name] = str(path)
    return paths


def _write_broken(folder) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = photos.write_jpeg(folder / "_source.jpg.tmp", 0, W, H, quality=90)
    data = jpeg.read_bytes()
    jpeg.unlink()
    paths = {
        "truncated": folder / "truncated.JPEG",
        "empty": folder / "empty.JPEG",
        "text": folder / "text.JPEG",
    }
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["empty"].write_bytes(b"")
    paths["text"].write_text("<html>404 Not Found</html>\n")
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture
def tree(tmp_path):
    """ROOT/train/{a,b}, ROOT/val/a: valid oddities in train/a, plain JPEGs elsewhere."""
    root = tmp_path / "imagenet"
    valid = _write_valid(root / "train" / "a")
    for split, cls in (("train", "b"), ("val", "a")):
        (root / split / cls).mkdir(parents=True)
        photos.write_jpeg(root / split / cls / "plain.JPEG", 0, W, H, quality=90)
    return root, valid


def test_valid_oddities_are_clean(tree):
    _, valid = tree
    assert check.check_files(list(valid.values()), num_workers=0) == []


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_valid_oddities_decode_to_rgb_in_dali(tree):
    _, valid = tree
    files = list(valid.values())
    loader = DALILoader(
        files, list(range(len(files))), train=False, batch_size=len(files),
        options=PipelineOptions(image_size=32, val_resize=40, device="cpu", num_threads=1),
    )
    (images, labels), = list(loader)
    assert images.shape == (len(files), 3, 32, 32)
    assert labels.tolist() == list(range(len(files)))
    # a grayscale image becomes three equal channels
    gray = images[list(valid).index("gray")]
    assert np.allclose(gray[0] * 0.229 + 0.485, gray[1] * 0.224 + 0.456, atol=0.02)


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_dali_applies_exif_orientation(tree):
    from nvidia.dali import fn, pipeline_def, types

    _, valid = tree

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        data, _ = fn.readers.file(files=[valid["exif_rotated"]])
        return fn.decoders.image(data, device="cpu", output_type=types.RGB)

    pipe = decode()
    pipe.build()
    (out,) = pipe.run()
    assert out.as_array().shape == (1, W, H, 3)  # stored W x H, rotated to H x W


@pytest.mark.slow
def test_broken_files_are_reported_with_path_and_reason(tree):
    root, valid = tree
    broken = _write_broken(root / "train" / "b")
    files = list(valid.values()) + list(broken.values())
    report = check.check_files(files, num_workers=2)  # through the worker pool
    assert [path for path, _ in report] == list(broken.values())  # input order, only the broken
    reasons = dict(report)
    assert "truncated" in reasons[broken["truncated"]]
    assert "empty" in reasons[broken["empty"]]
    assert "not an image" in reasons[broken["text"]]


def test_gif_named_jpeg_is_reported_because_dali_cannot_decode_it(tmp_path):
    if not check.dali_decoder_available():
        pytest.skip("nvImageCodec (DALI's decoder) is not installed")
    path = tmp_path / "animation.JPEG"
    _photo().save(path, "GIF")  # Pillow reads it; DALI would stop the run on it
    (report,) = check.check_files([str(path)], num_workers=0)
    assert report[0] == str(path) and "DALI" in report[1]


def test_main_exit_codes_and_report(tree, capsys):
    root, _ = tree
    assert check.main(root, num_workers=0) == 0
    assert "all 8 images decode" in capsys.readouterr().err

    broken = _write_broken(root / "val" / "a")
    assert check.check_tree(root, num_workers=0) == check.check_files(sorted(broken.values()), 0)
    assert check.main(root, num_workers=0) == 1
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 3
    for path in broken.values():
        assert any(line.startswith(f"{path}: ") and len(line) > len(path) + 3 for line in lines)
    assert "3 of 11 images are bad" in err


def test_main_reports_a_tree_that_is_not_imagenet_layout(tmp_path, capsys):
    assert check.main(tmp_path, num_workers=0) == 2
    assert "train" in capsys.readouterr().err
