"""trainer.artifacts.inference.forward_images: the model's rows per file, in order, on each backend
and across two processes (each image once)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.evalsets import CROP, model_file, wnid_tree, wnids
from trainer.artifacts.inference import forward_images
from trainer.artifacts.pretrained import load_pretrained
from trainer.artifacts.predict import predict_files

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    path = model_file(root / "model.pt", wnids(5))
    files = wnid_tree(root / "images", wnids(3), per_class=3)  # 9 files, three sizes
    return path, [str(f) for f in files]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny batches: one thread is fastest, and the test machine's cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_logits_are_the_models_on_its_own_preprocessing_in_file_order(setup):
    path, files = setup
    pretrained = load_pretrained(path)
    order = files[::-1]  # not the folder order
    logits = forward_images(pretrained, order, batch_size=4, workers=0)
    assert logits.shape == (9, 5) and logits.dtype == torch.float32
    # Independent: predict's probabilities (model(preprocess(image)), one batch).
    expected = predict_files(pretrained, order, topk=5, batch_size=64)
    for row, result in zip(logits.softmax(1), expected):
        for top in result["topk"]:
            assert row[top["index"]].item() == pytest.approx(top["prob"], abs=1e-5)
    assert len({tuple(r.tolist()) for r in logits}) == 9  # every image its own row


def test_features_are_what_the_classifier_takes(setup):
    path, files = setup
    pretrained = load_pretrained(path)
    features = forward_images(pretrained, files, output="features", batch_size=4, workers=0)
    logits = forward_images(pretrained, files, batch_size=4, workers=0)
    assert features.shape == (9, 512)
    fc = pretrained.model.fc
    torch.testing.assert_close(features @ fc.weight.T + fc.bias, logits, atol=1e-4, rtol=1e-4)


def test_an_unreadable_image_is_named(setup, tmp_path):
    path, files = setup
    bad = tmp_path / "broken.JPEG"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(RuntimeError, match="broken.JPEG"):
        forward_images(load_pretrained(path), [files[0], str(bad)], workers=0)
    with pytest.raises(ValueError, match="output='probs'"):
        forward_images(load_pretrained(path), files, output="probs")


def test_no_resize_is_a_centre_crop_of_the_image_as_it_is(setup, tmp_path):
    path, _ = setup
    files = [str(f) for f in wnid_tree(tmp_path, wnids(1), per_class=2, size=(CROP + 8, CROP + 8))]
    pretrained = load_pretrained(path)
    got = forward_images(pretrained, files, resize=0, workers=0)
    from torchvision.transforms import functional as F
    from data_pipelines.sources import load_rgb

    prep = pretrained.meta["preprocessing"]
    x = torch.stack([F.normalize(F.to_tensor(F.center_crop(load_rgb(f), [CROP])), prep["mean"], prep["std"])
                     for f in files])
    torch.testing.assert_close(got, pretrained.model(x).detach(), atol=1e-5, rtol=1e-5)


def test_dali_cpu_gives_the_same_predictions(setup):
    from tests.conftest import skip_without_dali

    skip_without_dali()
    path, files = setup
    pretrained = load_pretrained(path)
    tv = forward_images(pretrained, files, batch_size=4, workers=0)
    dali = forward_images(pretrained, files, batch_size=4, backend="dali_cpu", workers=1)
    assert dali.shape == tv.shape
    # Different decoders and resamplers: close, not equal.
    assert (dali.argmax(1) == tv.argmax(1)).float().mean() >= 0.75
    assert (dali - tv).abs().mean() < 0.1 * tv.abs().mean()


RANK_SCRIPT = """
import json, sys, torch
from trainer.artifacts.inference import forward_images
from trainer.artifacts.pretrained import load_pretrained
model, files, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
pretrained = load_pretrained(model)
rows = forward_images(pretrained, files, batch_size=2, workers=0)
one = forward_images(pretrained, files[:1], batch_size=2, workers=0)  # rank 1 has no image
torch.save((rows, one), out)
import torch.distributed as dist
dist.barrier(); dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_processes_each_return_every_row_once(setup, tmp_path):
    path, files = setup
    files = files[:7]  # odd: the ranks' shares differ in size
    single = forward_images(load_pretrained(path), files, batch_size=2, workers=0)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "GROUP_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "test",
               "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(path), json.dumps(files),
                                       str(tmp_path / f"rank{rank}.pt")], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    for rank in range(2):
        rows, one = torch.load(tmp_path / f"rank{rank}.pt")
        assert rows.shape == single.shape
        torch.testing.assert_close(rows, single, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(one, single[:1], atol=1e-5, rtol=1e-5)
