"""Reading a pack (tar shards): the sample-order contract of the folder path, kept in terms of
shards, and every backend reading exactly the bytes, labels, decode, crops and augmentation that
it reads from the same images as files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipelines import layout, shards
from tests.conftest import skip_without_dali


def _split(counts, root="/nowhere") -> shards.ShardSplit:
    """A split of shards holding ``counts`` images (no files: the order needs counts only)."""
    root = Path(root)
    return shards.ShardSplit(root, "train", ["a"], [
        shards.Shard(root / f"train-{i:06d}.tar", root / f"train-{i:06d}.idx", n, 0, "") for i, n in enumerate(counts)
    ])


COUNTS = [10, 10, 10, 7, 10, 3, 9, 10]  # 69 images in 8 shards, the last ones short as a pack's are


def test_each_rank_gets_equal_full_batches_of_distinct_images_from_its_own_shards():
    split, world, batch = _split(COUNTS), 3, 4
    steps = len(split) // (world * batch)
    ranks = [shards.train_ids(split, epoch=2, seed=7, shard_id=r, num_shards=world, batch_size=batch)
             for r in range(world)]
    assert [len(ids) for ids in ranks] == [steps * batch] * world
    everything = np.concatenate(ranks)
    assert len(set(everything.tolist())) == len(everything)  # no image on two ranks, or twice
    assert len(split) - len(everything) < world * batch  # fewer than one global batch left over
    stream = shards.shard_stream(split, epoch=2, seed=7)
    assert sorted(stream.tolist()) == list(range(len(split)))
    for r, ids in enumerate(ranks):  # a contiguous span of the epoch's shard stream
        assert ids.tolist() == stream[r * steps * batch : (r + 1) * steps * batch].tolist()
        shard_of, _ = split.locate(ids)
        runs = np.flatnonzero(np.diff(shard_of)) + 1
        assert len(runs) + 1 == len(set(shard_of.tolist())), "a rank reads each of its shards in one go"


def test_the_order_is_seeded_per_epoch_and_shuffles_within_each_shard():
    split = _split(COUNTS)
    a = shards.shard_stream(split, epoch=0, seed=1)
    assert a.tolist() == shards.shard_stream(split, epoch=0, seed=1).tolist()
    assert a.tolist() != shards.shard_stream(split, epoch=1, seed=1).tolist()
    assert a.tolist() != shards.shard_stream(split, epoch=0, seed=2).tolist()
    shard_of, position = split.locate(a)
    for shard in (0, 1, 2, 4, 7):  # the 10-image shards: each read in its own, non-trivial order
        inside = position[shard_of == shard]
        assert sorted(inside.tolist()) == list(range(10)) and inside.tolist() != sorted(inside.tolist())
    # Over epochs the shard order changes too: shard 0 does not always come first.
    firsts = {int(split.locate(shards.shard_stream(split, epoch=e, seed=1)[:1])[0][0]) for e in range(8)}
    assert len(firsts) > 1


def test_a_resumed_epoch_feeds_exactly_the_batches_not_fed():
    split = _split(COUNTS)
    kw = dict(epoch=3, seed=5, shard_id=1, num_shards=2, batch_size=4)
    full = shards.train_ids(split, **kw)
    for step in range(len(full) // 4 + 1):
        assert shards.train_ids(split, start_step=step, **kw).tolist() == full[step * 4 :].tolist()


def test_validation_reads_every_image_once_across_ranks():
    split = _split(COUNTS)
    for world in (1, 2, 3, 5, 8, 13):
        parts = [shards.val_ids(split, shard_id=r, num_shards=world) for r in range(world)]
        assert np.concatenate(parts).tolist() == list(range(len(split)))


def test_repeated_augmentation_feeds_each_chosen_image_repeats_times_over_the_ranks():
    # The copies' placement on ranks, the same for folders: tests/test_sharding.py.
    split = _split(COUNTS)
    ranks = [shards.train_ids(split, epoch=0, seed=1, shard_id=r, num_shards=2, batch_size=6, repeats=3)
             for r in range(2)]
    assert [len(ids) for ids in ranks] == [(len(split) // 12) * 6] * 2
    values, counts = np.unique(np.concatenate(ranks), return_counts=True)
    assert set(counts.tolist()) == {3} and len(values) == 2 * len(ranks[0]) // 3


def test_too_few_images_for_one_batch_per_rank_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one batch per rank"):
        shards.train_ids(_split([3, 2]), epoch=0, seed=0, shard_id=0, num_shards=4, batch_size=2)


# -- a real pack --------------------------------------------------------------------------------
def _source_file(tree: Path, split: shards.ShardSplit, sample: int) -> Path:
    """The tree's file that ``sample`` of ``split`` was packed from (its key is class/stem)."""
    shard, position = (int(v[0]) for v in split.locate(np.array([sample])))
    key = split.index_lines(shard)[position].split()[3].rsplit(".", 1)[0]
    (match,) = (tree / split.name).glob(key + ".*")
    return match


def test_a_pack_holds_every_image_of_the_tree_with_its_label(tiny_pack, tiny_root):
    manifest = shards.read_manifest(tiny_pack)
    train, val = layout.scan_dataset(tiny_root)
    assert manifest.classes == train.classes
    assert len(manifest.train.shards) >= 4 and len(manifest.val.shards) >= 2
    for ours, theirs in ((manifest.train, train), (manifest.val, val)):
        files = [_source_file(tiny_root, ours, i) for i in range(len(ours))]
        assert sorted(map(str, files)) == sorted(theirs.files)
    # Validation keeps the folder order, so its sample ids are the tree's val indices.
    assert [str(_source_file(tiny_root, manifest.val, i)) for i in range(len(val))] == val.files


def test_dali_decodes_crops_and_augments_a_pack_exactly_as_the_same_files(tiny_pack, tiny_root):
    """The same sample ids through the webdataset reader and through the file reader, with the same
    seed: bit-identical crops, flips and labels (training, with an automatic augmentation) and
    identical validation batches."""
    skip_without_dali()
    from data_pipelines.dali import DALILoader, PipelineOptions
    from data_pipelines.sources import PackSource

    manifest = shards.read_manifest(tiny_pack)
    train, _ = layout.scan_dataset(tiny_root)
    label_of = dict(zip(train.files, train.labels))
    files = [str(_source_file(tiny_root, manifest.train, i)) for i in range(len(manifest.train))]
    options = PipelineOptions(image_size=32, device="cpu", num_threads=2, auto_augment="trivial_wide")
    from_shards = DALILoader(PackSource(manifest.train), train=True, batch_size=8, seed=4, options=options)
    from_files = DALILoader(files, [label_of[f] for f in files], train=True, batch_size=8, seed=4, options=options)
    ids = shards.train_ids(manifest.train, epoch=0, seed=4, shard_id=0, num_shards=1, batch_size=8)
    pipes = [loader.pipeline(ids) for loader in (from_shards, from_files)]
    for pipe in pipes:
        pipe.build()
    for _ in range(len(ids) // 8):
        (crops_a, flips_a, labels_a), (crops_b, flips_b, labels_b) = (pipe.run() for pipe in pipes)
        for i in range(8):
            assert np.array_equal(np.asarray(crops_a[i]), np.asarray(crops_b[i]))
        assert np.array_equal(np.asarray(flips_a.as_tensor()), np.asarray(flips_b.as_tensor()))
        assert shards.ascii_labels(torch.from_numpy(np.asarray(labels_a.as_tensor()))).tolist() == \
            np.asarray(labels_b.as_tensor()).reshape(-1).tolist()
    for pipe in pipes:
        pipe._shutdown()

    _, val = layout.scan_dataset(tiny_root)
    val_options = PipelineOptions(image_size=32, val_resize=36, device="cpu", num_threads=2)
    for rank in (0, 1):
        a = list(DALILoader(PackSource(manifest.val), train=False, batch_size=3, shard_id=rank, num_shards=2,
                            options=val_options))
        b = list(DALILoader(val.files, val.labels, train=False, batch_size=3, shard_id=rank, num_shards=2,
                            options=val_options))
        assert len(a) == len(b) == 4  # 10 images per rank: 3 + 3 + 3 + 1, no padding
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_the_dali_training_loader_feeds_the_shard_order_and_resumes_inside_it(tiny_pack):
    skip_without_dali()
    from data_pipelines.dali import DALILoader, PipelineOptions
    from data_pipelines.sources import PackSource

    manifest = shards.read_manifest(tiny_pack)
    options = PipelineOptions(image_size=32, device="cpu", num_threads=2, output_device=None)

    def labels(loader):
        return [y.tolist() for _, y in loader]

    def expected(rank, epoch, step=0):
        ids = shards.train_ids(manifest.train, epoch=epoch, seed=2, shard_id=rank, num_shards=2, batch_size=4,
                               start_step=step)
        return [[_label(manifest.train, i) for i in ids[k : k + 4]] for k in range(0, len(ids), 4)]

    for rank in (0, 1):
        loader = DALILoader(PackSource(manifest.train), train=True, batch_size=4, shard_id=rank, num_shards=2, seed=2,
                            options=options)
        assert labels(loader) == expected(rank, 0)
        assert labels(loader) == expected(rank, 1)  # the loader moved on to epoch 1 by itself
        loader.seek(1, 3)
        assert labels(loader) == expected(rank, 1, 3)


def _label(split: shards.ShardSplit, sample: int) -> int:
    shard, position = (int(v[0]) for v in split.locate(np.array([sample])))
    fields = split.index_lines(shard)[position].split()
    with open(split.shards[shard].tar, "rb") as tar:
        tar.seek(int(fields[5]))
        return int(tar.read(int(fields[6])))


def test_torchvision_reads_a_pack_exactly_as_the_same_files(tiny_pack, tiny_root):
    from data_pipelines.sources import PackSource
    from data_pipelines.torchvision_loader import build_train_loader, build_val_loader

    manifest = shards.read_manifest(tiny_pack)
    _, val = layout.scan_dataset(tiny_root)
    for rank in (0, 1):
        common = dict(batch_size=3, image_size=32, val_resize=36, num_workers=0, shard_id=rank, num_shards=2)
        a = list(build_val_loader(PackSource(manifest.val), **common))
        b = list(build_val_loader(val.files, val.labels, **common))
        assert len(a) == len(b) == 4
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    loader = build_train_loader(PackSource(manifest.train), batch_size=4, image_size=32, num_workers=2, seed=2,
                                shard_id=1, num_shards=2)
    ids = shards.train_ids(manifest.train, epoch=0, seed=2, shard_id=1, num_shards=2, batch_size=4)
    assert [y.tolist() for _, y in loader] == [[_label(manifest.train, i) for i in ids[k : k + 4]]
                                               for k in range(0, len(ids), 4)]


def test_a_damaged_pack_fails_at_start_with_what_to_do(tiny_pack, tmp_path):
    import shutil

    broken = tmp_path / "pack"
    shutil.copytree(tiny_pack, broken)
    manifest = shards.read_manifest(broken)
    victim = manifest.train.shards[1].tar
    victim.write_bytes(victim.read_bytes()[:-512])  # truncated copy
    with pytest.raises(shards.ShardError, match=f"{victim}.*truncated"):
        shards.read_manifest(broken)
    victim.unlink()
    with pytest.raises(shards.ShardError, match=f"{victim} is missing.*imagenet-trainer pack"):
        shards.read_manifest(broken)
    (broken / "manifest.json").write_text('{"format": "imagenet-trainer shards", "version": 99}')
    with pytest.raises(shards.ShardError, match="version 99"):
        shards.read_manifest(broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(shards.ShardError, match="imagenet-trainer pack"):
        shards.read_manifest(broken)


@pytest.mark.parametrize("text,match", [
    ("[1, 2]", "not an imagenet-trainer pack manifest"),
    ('{"format": "imagenet-trainer shards", "version": 1, "classes": ["a"], "splits": {"train": {"images": 1, '
     '"shards": [{"tar": "../x.tar", "index": "x.idx", "images": 1, "bytes": 1, "sha256": ""}]}, '
     '"val": {"images": 0, "shards": []}}}', "not a plain file name"),
    ('{"format": "imagenet-trainer shards", "version": 1, "classes": ["a"], "splits": {"train": {"images": 2, '
     '"shards": [{"tar": "x.tar", "index": "x.idx", "images": 1, "bytes": 1, "sha256": ""}, '
     '{"tar": "x.tar", "index": "y.idx", "images": 1, "bytes": 1, "sha256": ""}]}, '
     '"val": {"images": 0, "shards": []}}}', "x.tar more than once"),
])
def test_a_manifest_that_is_not_one_is_refused_by_name(tmp_path, text, match):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(shards.ShardError, match=match):
        shards.read_manifest(tmp_path)


def test_an_image_damaged_inside_a_shard_stops_every_backend_naming_the_shard(tiny_pack, tmp_path):
    """pack decodes every image first, so this is a shard damaged afterwards (same size, bytes
    zeroed): the error names the shard and says how to check or rebuild it, on DALI and torchvision."""
    import shutil

    from data_pipelines.sources import PackSource
    from data_pipelines.torchvision_loader import build_val_loader

    broken = tmp_path / "pack"
    shutil.copytree(tiny_pack, broken)
    split = shards.read_manifest(broken).val
    fields = split.index_lines(0)[1].split()  # the shard's second image
    with open(split.shards[0].tar, "r+b") as tar:
        tar.seek(int(fields[1]))
        tar.write(bytes(int(fields[2])))
    victim = str(split.shards[0].tar)
    with pytest.raises(RuntimeError, match=f"cannot decode image {victim} \\(image 1 of its index\\)"):
        list(build_val_loader(PackSource(split), batch_size=4, image_size=32, val_resize=36, num_workers=0,
                              shard_id=0, num_shards=1))
    skip_without_dali()
    from data_pipelines.dali import DALILoader, PipelineOptions

    loader = DALILoader(PackSource(split), train=False, batch_size=4,
                        options=PipelineOptions(image_size=32, val_resize=36, device="cpu", num_threads=1))
    with pytest.raises(RuntimeError) as stopped:
        list(loader)
    message = str(stopped.value)
    assert f"DALI could not decode 1 image(s) of the pack {broken}:\n  {victim}: {fields[3]} (image 1 of its index)" \
        in message
    assert "sha256" in message and "imagenet-trainer pack" in message


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def _held_index_folder(parent: Path):
    """A process holding a reader index folder made in ``parent`` by the real function: (the
    process, which holds it until its stdin closes, and the folder it made there), once made."""
    import subprocess
    import sys

    from tests.conftest import REPO

    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom data_pipelines import shards\n"
         "folder = shards.index_folder('train', parent=sys.argv[1])\nprint(folder.name, flush=True)\nsys.stdin.read()",
         str(parent)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert owner.stdout.readline().strip(), "the owner made no folder"  # the event: made and held
    (folder,) = parent.glob(f"{shards.INDEX_FOLDER_PREFIX}*")
    return owner, folder


def _rename_with_pid(folder: Path, pid: int) -> Path:
    """``folder`` as if made by process ``pid`` (another PID namespace's numbering)."""
    random = folder.name[len(shards.INDEX_FOLDER_PREFIX):].split("-", 1)[1]
    return folder.rename(folder.with_name(f"{shards.INDEX_FOLDER_PREFIX}{pid}-{random}"))


def test_a_reader_index_folder_held_by_a_live_process_survives_whatever_pid_its_name_carries(tmp_path):
    """Containers with their own PID namespaces share /tmp: a live rank's folder may carry a pid
    that is free here. The owner's lock, not the pid, says it is alive."""
    owner, folder = _held_index_folder(tmp_path)
    try:
        folder = _rename_with_pid(folder, _dead_pid())
        mine = shards.index_folder("train", parent=tmp_path)  # sweeps
        assert folder.is_dir(), "a live process's folder was removed"
        assert Path(mine.name).is_dir()
        mine.cleanup()
    finally:
        owner.stdin.close()
        owner.wait(timeout=60)


def test_a_reader_index_folder_of_a_killed_process_is_removed_whatever_pid_its_name_carries(tmp_path):
    """A rank killed by SIGKILL cannot remove its folder; the next loader's sweep does, even if the
    folder's pid is some live process's here (this one's)."""
    import os

    owner, folder = _held_index_folder(tmp_path)
    owner.kill()
    owner.wait(timeout=60)  # reaped: the kernel has closed its files, released its lock
    owner.stdin.close()
    folder = _rename_with_pid(folder, os.getpid())
    mine = shards.index_folder("train", parent=tmp_path)
    other = shards.index_folder("val", parent=tmp_path)  # a live folder (this process's) stays
    assert not folder.exists()
    assert Path(mine.name).is_dir() and Path(other.name).is_dir()
    mine.cleanup()
    assert not Path(mine.name).exists() and Path(other.name).is_dir()
    other.cleanup()
    assert list(tmp_path.iterdir()) == []  # nothing left behind, lock included


def test_reader_index_folders_without_a_lock_are_removed_only_when_long_untouched_and_their_pid_gone(tmp_path):
    """Folders of versions before the lock: their pid may be another namespace's live rank, so one
    is removed only if no process here has that pid and it has not changed for a week (a live
    rank rewrites its indices every epoch)."""
    import os
    import time

    old, young, alive = (tmp_path / f"{shards.INDEX_FOLDER_PREFIX}{pid}-train-{tag}"
                         for pid, tag in ((_dead_pid(), "old"), (_dead_pid(), "young"), (os.getpid(), "alive")))
    for folder in (old, young, alive):
        folder.mkdir()
        (folder / "000000-train-000000.idx").write_text("v1.2 0\n")
    week_ago = time.time() - 8 * 24 * 3600
    for folder in (old, alive):
        os.utime(folder, (week_ago, week_ago))
    mine = shards.index_folder("train", parent=tmp_path)
    assert not old.exists() and young.is_dir() and alive.is_dir()
    mine.cleanup()


@pytest.mark.slow
def test_check_data_on_a_pack_checks_every_shard_against_its_manifest(tiny_pack, tmp_path):
    import shutil

    from tests.conftest import run_cli

    broken = tmp_path / "pack"
    shutil.copytree(tiny_pack, broken)
    clean = run_cli("check-data", str(broken))
    assert clean.returncode == 0 and "shards match the manifest" in clean.stderr, clean.stderr[-2000:]
    victim = shards.read_manifest(broken).train.shards[2].tar
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF  # same size: only the sha256 can tell
    victim.write_bytes(bytes(data))
    damaged = run_cli("check-data", str(broken))
    assert damaged.returncode == 1, damaged.stderr[-2000:]
    assert damaged.stdout.splitlines() == [f"{victim}: sha256 " + damaged.stdout.split("sha256 ", 1)[1].strip()]
    assert "differs from the manifest's" in damaged.stdout and "1 of" in damaged.stderr
    victim.unlink()
    missing = run_cli("check-data", str(broken))
    assert missing.returncode == 1 and f"{victim} is missing" in missing.stderr
