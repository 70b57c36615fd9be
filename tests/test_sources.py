"""The data-source protocol (data_pipelines/sources.py): a folder tree's split and the same split
packed are two implementations of one interface, the same samples behind it, so that the loaders
read either without asking which."""
from __future__ import annotations

import numpy as np
import pytest

from data_pipelines import layout, shards
from data_pipelines.sources import FolderSource, PackSource, Source, as_source


@pytest.fixture
def pairs(tiny_root, tiny_pack) -> dict[str, tuple[FolderSource, PackSource]]:
    """Each split of tiny_root as a FolderSource and, packed (tiny_pack), as a PackSource."""
    trees, manifest = layout.scan_dataset(tiny_root), shards.read_manifest(tiny_pack)
    return {name: (FolderSource.of(tree), PackSource(manifest.splits[name]))
            for name, tree in zip(("train", "val"), trees)}


def _keys(source: Source, ids) -> list[str]:
    return sorted(source.key(int(i)) for i in ids)


def test_a_tree_and_its_pack_hold_the_same_samples_with_the_same_labels(pairs):
    for folder, pack in pairs.values():
        assert isinstance(folder, Source) and isinstance(pack, Source)
        assert len(folder) == len(pack) and folder.classes == pack.classes
        labels = {folder.key(i): folder.label(i) for i in range(len(folder))}
        assert len(labels) == len(folder)  # the key names one sample
        assert {pack.key(i): pack.label(i) for i in range(len(pack))} == labels
        where = {folder.key(i): i for i in range(len(folder))}
        for i in (0, len(pack) - 1):  # torchvision's read: the same pixels and label
            (image, label), (same, same_label) = pack.load(i), folder.load(where[pack.key(i)])
            assert label == same_label == labels[pack.key(i)]
            assert np.array_equal(np.asarray(image), np.asarray(same))


@pytest.mark.parametrize("world,batch", [(1, 8), (2, 4), (4, 2), (3, 2)])
def test_every_epoch_the_ranks_of_either_source_feed_the_same_samples(pairs, world, batch):
    """Each source has its own order (a pack's is shard-wise), but over the ranks an epoch feeds
    every sample once when the split is a whole number of global batches (tiny_root's 64 train
    images; 3 ranks of 2 leave 4 out), and validation slices hold every sample once, whatever the
    world size."""
    folder, pack = pairs["train"]
    for epoch in (0, 1):
        fed = {}
        for source in (folder, pack):
            ranks = [source.train_ids(epoch=epoch, seed=1, shard_id=r, num_shards=world, batch_size=batch)
                     for r in range(world)]
            assert {len(ids) for ids in ranks} == {len(source) // (world * batch) * batch}
            fed[source] = _keys(source, np.concatenate(ranks))
            assert len(set(fed[source])) == len(fed[source])  # no sample twice in an epoch
        if len(folder) % (world * batch) == 0:
            assert fed[folder] == fed[pack] == _keys(folder, range(len(folder)))
    for folder, pack in pairs.values():
        for source in (folder, pack):
            ids = np.concatenate([source.val_ids(shard_id=r, num_shards=world) for r in range(world)])
            assert _keys(source, ids) == _keys(folder, range(len(folder)))


def test_describe_names_the_file_or_the_shard_member(pairs):
    folder, pack = pairs["val"]
    assert [folder.describe(i) for i in range(len(folder))] == folder.files
    tar = pack.split.shards[0].tar
    assert pack.describe(1) == f"{tar}: {pack.key(1)}.jpg (image 1 of its index)"
    last = pack.split.shards[-1]
    assert pack.describe(len(pack) - 1) == f"{last.tar}: {pack.key(len(pack) - 1)}.jpg (image {last.images - 1} of its index)"


def test_the_loaders_take_a_source_or_files_with_labels_but_not_a_bare_split(pairs, tiny_pack):
    folder, pack = pairs["train"]
    assert as_source(pack) is pack and as_source(folder) is folder
    made = as_source(folder.files, folder.labels)
    assert isinstance(made, FolderSource) and made.files == folder.files
    with pytest.raises(TypeError, match="not a Source"):
        as_source(shards.read_manifest(tiny_pack).train)
    with pytest.raises(TypeError, match="has its own"):
        as_source(pack, [0] * len(pack))
