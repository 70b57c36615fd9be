"""imagenet-trainer pack: the shards hold every image's original bytes and label in the planned
order, DALI reads them through their indices, bad files stop the pack (or are skipped and
listed), and a killed pack resumes, keeping the shards it had finished."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from data_pipelines import layout, pack as packing
from data_pipelines.shards import FORMAT, INDEX_VERSION, MANIFEST, SPLITS, VERSION, read_manifest
from tests import photos
from tests.conftest import REPO, run_cli, skip_without_dali

SHARD = "64KB"  # about 15 of the tree's images a shard: several shards per split
LONG_STEM = "a long.name " * 10  # a key over ustar's 100 bytes, with dots and spaces to replace


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """160 train and 40 val small photos in 4 classes, plus a long, spaced, dotted name and a PNG
    named .JPEG (packed as is)."""
    root = tmp_path_factory.mktemp("pack_tree")
    photos.write_tree(root, "train", classes=4, num_images=160, sizes=(64, 48))
    photos.write_tree(root, "val", classes=4, num_images=40, sizes=(64, 48), seed=1)
    photos.write_jpeg(root / "train" / "n00000001" / f"{LONG_STEM}.JPEG", 7, 64, 48)
    photos.photo(8, 40, 30).save(root / "train" / "n00000002" / "really_a_png.JPEG", "PNG")
    return root


@pytest.fixture(scope="module")
def packed(tree, tmp_path_factory) -> Path:
    """The tree packed in this process, one worker: the reference the other tests compare to."""
    out = tmp_path_factory.mktemp("packed") / "out"
    result = packing.pack(tree, out, shard_size=SHARD, workers=1, seed=0)
    assert result.ok and result.kept == 0 and result.written == sum(result.shards.values())
    return out


def _members(tar: Path) -> list[tuple[str, int, bytes]]:
    """(name, offset of the data, data) of every member, read with Python's tarfile."""
    with tarfile.open(tar) as t:
        return [(m.name, m.offset_data, t.extractfile(m).read()) for m in t.getmembers()]


def _index(path: Path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    assert lines[0] == f"{INDEX_VERSION} {len(lines) - 1}"
    return [line.split() for line in lines[1:]]


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*-*.tar")}


def test_pack_holds_every_image_bytes_and_label_in_the_planned_order(tree, packed):
    train, val = layout.scan_dataset(tree)
    manifest = json.loads((packed / MANIFEST).read_text())
    assert manifest["format"] == FORMAT and manifest["version"] == VERSION
    assert manifest["classes"] == train.classes == [f"n{c:08d}" for c in range(4)]
    assert manifest["source_root"] == str(tree.resolve())
    assert (manifest["seed"], manifest["shard_size"], manifest["skipped"]) == (0, 64000, [])
    assert read_manifest(packed).classes == train.classes

    source = {name: {packing.sample_key(f): (f, label) for f, label in zip(split.files, split.labels)}
              for name, split in (("train", train), ("val", val))}  # key -> (file, label): keys are per split
    assert f"n00000001/{LONG_STEM.replace(' ', '_').replace('.', '_')}" in source["train"]

    expected_keys = {
        "train": [packing.sample_key(train.files[i]) for i in np.random.default_rng(0).permutation(len(train))],
        "val": [packing.sample_key(f) for f in val.files],
    }
    for name in SPLITS:
        entry = manifest["splits"][name]
        assert entry["images"] == len(expected_keys[name]) == sum(s["images"] for s in entry["shards"])
        assert len(entry["shards"]) >= 3
        keys = []
        for number, shard in enumerate(entry["shards"]):
            tar, idx = packed / shard["tar"], packed / shard["index"]
            assert (shard["tar"], shard["index"]) == (f"{name}-{number:06d}.tar", f"{name}-{number:06d}.idx")
            data = tar.read_bytes()
            assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
            assert len(data) <= 64000 or shard["images"] == 1
            members = _members(tar)
            lines = _index(idx)
            assert len(lines) == shard["images"] and len(members) == 2 * len(lines)
            labels = set()
            for line, (jpg, cls) in zip(lines, zip(members[::2], members[1::2])):
                key = jpg[0][: -len(".jpg")]
                file, label = source[name][key]
                # the member holds the file's own bytes; the .cls its class index in ASCII
                assert (jpg[0], cls[0]) == (f"{key}.jpg", f"{key}.cls")
                assert jpg[2] == Path(file).read_bytes() and cls[2] == str(label).encode()
                # the index line points at each member's data
                assert line == ["jpg", str(jpg[1]), str(len(jpg[2])), jpg[0], "cls", str(cls[1]), str(len(cls[2])), cls[0]]
                assert data[jpg[1]: jpg[1] + len(jpg[2])] == jpg[2]
                keys.append(key)
                labels.add(label)
            if name == "train":
                assert len(labels) > 1, f"{tar.name} holds one class only: the train images were not mixed"
        assert keys == expected_keys[name]


def test_index_equals_dali_wds2idx_for_ustar_names(packed):
    """DALI's own index generator agrees (it reads offsets with GNU tar, which it gets wrong for
    names over 100 bytes; those shards are checked with tarfile above)."""
    from wds2idx import IndexCreator

    compared = 0
    for tar in sorted(packed.glob("*.tar")):
        if any(len(name.encode()) > 100 for name, _, _ in _members(tar)):
            continue
        theirs = tar.with_suffix(".wds2idx")
        with IndexCreator(str(tar), str(theirs), verbose=False) as creator:
            creator.create_index()
        assert theirs.read_text() == tar.with_suffix(".idx").read_text(), tar.name
        theirs.unlink()
        compared += 1
    assert compared >= 10


def test_dali_webdataset_reader_reads_every_sample(tree, packed):
    skip_without_dali()
    from nvidia.dali import fn, pipeline_def

    manifest = read_manifest(packed)
    shards = manifest.shards()
    expected = []
    for shard in shards:
        members = _members(shard.tar)
        expected += [(j[2], c[2]) for j, c in zip(members[::2], members[1::2])]

    @pipeline_def(batch_size=16, num_threads=1, device_id=None)
    def reader():
        jpg, cls = fn.readers.webdataset(paths=[str(s.tar) for s in shards], index_paths=[str(s.index) for s in shards],
                                         ext=["jpg", "cls"], random_shuffle=False, name="Reader")
        return jpg, cls

    pipe = reader()
    pipe.build()
    assert pipe.epoch_size("Reader") == len(expected)
    got = []
    while len(got) < len(expected):
        jpgs, classes = pipe.run()
        got += [(np.array(j).tobytes(), np.array(c).tobytes()) for j, c in zip(jpgs, classes)]
    assert got[: len(expected)] == expected


def test_bad_files_stop_the_pack_or_are_skipped_with_skip_bad(tmp_path, capsys):
    root = tmp_path / "root"
    photos.write_tree(root, "train", classes=2, num_images=8, sizes=(48, 32))
    photos.write_tree(root, "val", classes=2, num_images=4, sizes=(48, 32), seed=1)
    good = (root / "train" / "n00000000" / "img_0000000.JPEG").read_bytes()
    bad = {
        "truncated": root / "train" / "n00000000" / "truncated.JPEG",
        "empty": root / "train" / "n00000001" / "empty.JPEG",
        "text": root / "val" / "n00000001" / "text.JPEG",
    }
    bad["truncated"].write_bytes(good[: len(good) // 2])
    bad["empty"].write_bytes(b"")
    bad["text"].write_text("<html>404 Not Found</html>\n")

    out = tmp_path / "out"
    assert packing.main(root, out, shard_size="4KB", workers=1) == 1
    captured = capsys.readouterr()
    for path in bad.values():
        assert f"{path}: " in captured.out
    assert "3 of 15 images are bad" in captured.err and "--skip-bad" in captured.err
    assert not out.exists()  # not a shard, not a manifest, not the folder

    assert packing.main(root, out, shard_size="4KB", workers=1, skip_bad=True) == 0
    captured = capsys.readouterr()
    assert all(f"{path}: " in captured.out for path in bad.values())
    manifest = read_manifest(out)
    skipped = {s["path"]: s["reason"] for s in manifest.data["skipped"]}
    assert set(skipped) == {str(p) for p in bad.values()}
    assert "empty" in skipped[str(bad["empty"])] and "not an image" in skipped[str(bad["text"])]
    assert (len(manifest.train), len(manifest.val)) == (8, 4)
    assert len(manifest.train.shards) > 1  # 4KB: an image or two a shard


def _pack_cmd(root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "trainer", "pack", str(root), str(out), "--shard-size", SHARD, "--workers", "1"]


def test_killed_pack_resumes_keeping_finished_shards(tree, packed, tmp_path, capsys):
    out, paused = tmp_path / "out", tmp_path / "paused"
    # The writer stops after its first shard and says so in `paused`: killed there, not at a time.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", packing.PAUSE_ENV: str(paused)}
    proc = subprocess.Popen(_pack_cmd(tree, out), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600  # a guard against a pack that never gets there, not a measure
        while not (paused.exists() and paused.read_text().endswith("\n")):  # a whole line: the shard's name
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no shard finished in 600 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    finished = sorted(p.stem for p in (out / packing.STATE).glob("*.json"))
    total = len(list(packed.glob("*.tar")))
    assert finished == paused.read_text().split() == ["train-000000"] and total > 1
    assert not (out / MANIFEST).exists()
    before = _stats(out)
    assert set(before) >= {f"{name}.tar" for name in finished}

    assert packing.main(tree, out, shard_size=SHARD, workers=1) == 0
    err = capsys.readouterr().err
    assert f"kept {len(finished)} finished shard(s)" in err and f"wrote {total - len(finished)}" in err
    after = _stats(out)
    assert all(after[f"{name}.tar"] == before[f"{name}.tar"] for name in finished)  # not rewritten
    assert _files(out) == _files(packed)  # byte-identical to the uninterrupted pack, no temporary left
    read_manifest(out)


def test_rerun_rewrites_only_a_corrupt_shard_and_follows_new_arguments(tree, packed, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(packed, out)
    corrupt = out / "train-000002.tar"
    data = bytearray(corrupt.read_bytes())
    data[5000] ^= 0xFF  # same size, one byte flipped
    corrupt.write_bytes(bytes(data))
    (out / MANIFEST).unlink()
    before = _stats(out)
    total = len(before)

    assert packing.main(tree, out, shard_size=SHARD, workers=1) == 0
    assert f"kept {total - 1} finished shard(s)" in capsys.readouterr().err
    after = _stats(out)
    assert [n for n in before if after[n] != before[n]] == [corrupt.name]
    assert _files(out) == _files(packed)

    # Another seed: val's shards are the same plan and kept, train's are rewritten.
    result = packing.pack(tree, out, shard_size=SHARD, workers=1, seed=1)
    assert result.kept == result.shards["val"] and result.written == result.shards["train"]
    assert read_manifest(out).data["seed"] == 1
    # Bigger shards: fewer of them, and the old ones beyond the plan are gone.
    result = packing.pack(tree, out, shard_size="1MB", workers=1)
    assert result.shards == {"train": 1, "val": 1}
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        MANIFEST, "train-000000.idx", "train-000000.tar", "val-000000.idx", "val-000000.tar"]
    assert sorted(p.name for p in (out / packing.STATE).iterdir()) == ["lock", "train-000000.json", "val-000000.json"]


@pytest.mark.slow
def test_worker_processes_write_the_same_bytes(tree, packed, tmp_path):
    out = tmp_path / "out"
    result = packing.pack(tree, out, shard_size=SHARD, workers=2)
    assert result.ok and _files(out) == _files(packed)


def test_key_collision_names_both_files(tmp_path, capsys):
    root = tmp_path / "root"
    photos.write_tree(root, "val", classes=1, num_images=1, sizes=(32, 32))
    a = photos.write_jpeg(root / "train" / "n00000000" / "a.b.JPEG", 0, 32, 32)
    b = photos.write_jpeg(root / "train" / "n00000000" / "a_b.jpg", 1, 32, 32)
    assert packing.main(root, tmp_path / "out", workers=1) == 2
    err = capsys.readouterr().err
    assert str(a) in err and str(b) in err and "n00000000/a_b" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value, size", [("512MB", 512_000_000), ("1GB", 10**9), ("64KB", 64_000), ("64kb", 64_000),
                                         ("1MiB", 1 << 20), ("1.5GiB", 3 << 29), ("4096", 4096), (4096, 4096)])
def test_shard_size_values(value, size):
    assert packing.parse_size(value) == size


@pytest.mark.parametrize("value", ["lots", "12XB", "", "-5", "0", "MB", "1.2.3GB"])
def test_bad_shard_size_exits_2_naming_it(value, tree, tmp_path, capsys):
    from trainer import cli

    assert cli.main(["pack", str(tree), str(tmp_path / "out"), "--shard-size", value]) == 2
    assert f"pack: --shard-size={value!r}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["train", "val/n00000000/shards"])
def test_out_inside_the_tree_exits_2(where, tree, capsys):
    out = tree / where
    assert packing.main(tree, out, workers=1) == 2
    assert f"pack: OUT={out} is inside" in capsys.readouterr().err
    assert not list(out.glob("*.tar")) and not (out / MANIFEST).exists()


def test_not_a_tree_exits_2(tmp_path, capsys):
    assert packing.main(tmp_path / "nowhere", tmp_path / "out", workers=1) == 2
    assert f"pack: ROOT={tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


def test_cli_verb_is_wired(capsys):
    from trainer import cli

    assert list(cli.VERBS).index("pack") == list(cli.VERBS).index("check-data") + 1
    with pytest.raises(SystemExit) as stop:
        cli.main(["pack", "--help"])
    assert stop.value.code == 0
    help_text = capsys.readouterr().out
    assert all(opt in help_text for opt in ("ROOT", "OUT", "--shard-size", "--workers", "--skip-bad", "--seed"))


def test_out_equal_to_the_tree_exits_2(tree, capsys):
    """ROOT/manifest.json would make every reader take the tree for a pack."""
    assert packing.main(tree, tree, workers=1) == 2
    assert f"pack: OUT={tree} is ROOT itself" in capsys.readouterr().err
    assert not (tree / MANIFEST).exists() and not list(tree.glob("*.tar"))


def test_a_resumed_pack_decodes_only_the_images_of_shards_still_to_write(tree, tmp_path, monkeypatch):
    """The check is most of a pack's time: images of shards an earlier pack of the same plan
    finished were decoded then and are not decoded again (their shards' sha256 is still checked)."""
    out = tmp_path / "out"
    assert packing.pack(tree, out, shard_size="64KB", workers=0).ok
    decoded: list[list[str]] = []
    real = packing.check.check_files
    monkeypatch.setattr(packing.check, "check_files", lambda files, *a, **k: decoded.append(list(files)) or real(files, *a, **k))
    again = packing.pack(tree, out, shard_size="64KB", workers=0)
    assert again.ok and again.written == 0 and decoded == [[]]
    manifest = read_manifest(out)
    (out / ".pack" / "train-000001.json").unlink()  # as if killed before that shard's record
    victim = manifest.train.shards[1]
    keys = {line.split()[3] for line in victim.index.read_text().splitlines()[1:]}
    again = packing.pack(tree, out, shard_size="64KB", workers=0)
    assert again.ok and again.written == 1
    assert sorted(packing.sample_key(f) + ".jpg" for f in decoded[-1]) == sorted(keys)
    # A changed file is decoded again: its size and mtime are in the plan's digest.
    changed = Path(decoded[-1][0])
    before = changed.stat()
    os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    try:
        again = packing.pack(tree, out, shard_size="64KB", workers=0)
        assert again.ok and str(changed) in decoded[-1]
    finally:  # the tree is the module's
        os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.slow
def test_a_resumed_pack_with_a_relative_root_decodes_nothing_again_and_says_so(tmp_path):
    """`pack data/sample out` run again from the same folder: the records hold each file's absolute
    path, so the plan must too, or every image is decoded again under a log saying it was not. Only
    a decode can see a file changed in place with its size and mtime kept (the digest's premise):
    a pack that decodes it stops with exit 1, one that trusts its records keeps every shard."""
    root = tmp_path / "data" / "sample"
    photos.write_tree(root, "train", classes=2, num_images=12, sizes=(48, 32))
    victim = photos.write_tree(root, "val", classes=2, num_images=4, sizes=(48, 32), seed=1)[1]
    args = ["pack", "data/sample", "out", "--shard-size", "8KB", "--workers", "1"]
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    shards = len(list((tmp_path / "out").glob("*.tar")))

    before = victim.stat()
    victim.write_bytes(b"\0" * before.st_size)  # no longer a JPEG, to a decoder only
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    again = run_cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "decoding 0 of the 16 images" in again.stderr
    assert "16 of the 16 images are in shards an earlier pack" in again.stderr
    assert f"kept {shards} finished shard(s) of an earlier run (verified), wrote 0" in again.stderr
    assert "decoding 16 of the 16 images" in first.stderr
