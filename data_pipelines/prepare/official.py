"""The official ILSVRC-2012 archives: the train tar (member tars ``nXXXXXXXX.tar`` of flat images)
and the val tar (flat ``ILSVRC2012_val_%08d.JPEG``), read in place: an image is a byte range of the
archive file (a member of a member tar is a contiguous range of the outer file), found from the tar
headers alone; the devkit (``data/meta.mat``, the val ground truth); their published MD5s."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

from .common import VAL_NAME, WNID, ArgumentError, Devkit, Entry, Gathered, SourceError, image_name

MD5 = {"train": "1d675b47d978889d74fa0da5fadfb00e", "val": "29b22e2961454d5413ddabcf34fc5622",
       "devkit": "fa75699e90414af021442c21a62c3abf"}
OFFICIAL_NAMES = {"train": "ILSVRC2012_img_train.tar", "val": "ILSVRC2012_img_val.tar",
                  "devkit": "ILSVRC2012_devkit_t12.tar.gz"}


def _members(tar: tarfile.TarFile, base: int, size: int, where: str, read_at) -> list[tarfile.TarInfo]:
    """The file members of ``tar`` (``size`` bytes at ``base`` of the archive), each checked to lie
    inside it, and the end-of-archive blocks checked to follow: a cut archive names its member."""
    members, last = [], None
    try:
        for member in tar:
            last = member
            if member.offset_data + member.size > size:
                raise SourceError(f"{where}: member {member.name} is cut short ({member.size} bytes announced, "
                                  f"{max(0, size - member.offset_data)} present): the archive is truncated; "
                                  f"download it again")
            if member.isfile():
                members.append(member)
    except tarfile.TarError as err:
        after = f"after member {last.name}" if last else "at its start"
        raise SourceError(f"{where}: unreadable {after} ({err}): the archive is truncated or damaged; "
                          f"download it again") from err
    end = read_at(base + tar.offset, min(1024, max(0, size - tar.offset)))
    if len(end) < 1024 or any(end):
        after = f"after member {last.name}" if last else "at its start"
        raise SourceError(f"{where}: ends {after} without tar's end-of-archive blocks: the archive is truncated; "
                          f"download it again")
    return members


def read_train_tar(path: Path, into: Gathered) -> None:
    """Entries of the official train archive: each member tar ``<wnid>.tar`` of flat images."""
    st = path.stat()
    with open(path, "rb") as f:
        def read_at(offset: int, n: int) -> bytes:
            return os.pread(f.fileno(), n, offset)

        with tarfile.open(fileobj=f, mode="r:") as outer:
            for member in _members(outer, 0, st.st_size, str(path), read_at):
                wnid = member.name[: -len(".tar")] if member.name.endswith(".tar") else ""
                if not WNID.match(Path(wnid).name) or "/" in wnid:
                    raise SourceError(f"{path}: member {member.name!r} is not a member tar nXXXXXXXX.tar: a train "
                                      f"archive holds only its classes' tars")
                where = f"{path}:{member.name}"
                with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
                    for image in _members(inner, member.offset_data, member.size, where, read_at):
                        name = Path(image.name).name
                        if not image_name(name) or name != image.name:
                            raise SourceError(f"{where}: member {image.name!r} is not a flat image file "
                                              f"({wnid}_NNNN.JPEG)")
                        into.train.append(Entry(wnid, name, str(path), member.offset_data + image.offset_data,
                                                image.size, st.st_mtime_ns, f"{where}/{name}"))


def read_val_tar(path: Path, into: Gathered) -> None:
    """Entries of the official val archive, keyed by the number in each name (labels come later)."""
    st = path.stat()
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in _members(tar, 0, st.st_size, str(path), lambda o, n: os.pread(f.fileno(), n, o)):
            match = VAL_NAME.match(member.name)
            if not match:
                raise SourceError(f"{path}: member {member.name!r} is not a val image ILSVRC2012_val_NNNNNNNN.JPEG "
                                  f"(a train name in the val archive?)")
            into.val_numbered.append((int(match.group(1)), Entry("", member.name, str(path), member.offset_data,
                                                                member.size, st.st_mtime_ns, f"{path}:{member.name}")))
    into.val_tars.append(str(path))


def read_devkit(path: Path) -> Devkit:
    """meta.mat's leaf classes (ID -> WNID, words) and the val ground truth, from the devkit tar.gz."""
    import scipy.io

    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                for want in ("data/meta.mat", "data/ILSVRC2012_validation_ground_truth.txt"):
                    if member.isfile() and member.name.endswith(want):
                        found[want] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise SourceError(f"{path}: unreadable devkit ({err}): the archive is truncated or damaged") from err
    for want in ("data/meta.mat", "data/ILSVRC2012_validation_ground_truth.txt"):
        if want not in found:
            raise SourceError(f"{path} has no {want}: is this ILSVRC2012_devkit_t12.tar.gz?")
    synsets = scipy.io.loadmat(io.BytesIO(found["data/meta.mat"]), squeeze_me=True)["synsets"]
    fields = synsets.dtype.names or ()
    for need in ("ILSVRC2012_ID", "WNID", "words", "num_children"):
        if need not in fields:
            raise SourceError(f"{path}: data/meta.mat's synsets have no field {need} (fields: {', '.join(fields)})")
    wnid_of_id, names = {}, {}
    for row in synsets.reshape(-1):
        if int(row["num_children"]) == 0:  # the 1,000 classes are the leaves
            wnid = str(row["WNID"])
            wnid_of_id[int(row["ILSVRC2012_ID"])] = wnid
            names[wnid] = str(row["words"])
    return Devkit(str(path), wnid_of_id, names, found["data/ILSVRC2012_validation_ground_truth.txt"].decode().splitlines(),
                  f"{path}:data/ILSVRC2012_validation_ground_truth.txt")


def label_official_val(into: Gathered) -> None:
    """Each official val image's wnid: ground-truth line N is the ID of ILSVRC2012_val_N."""
    if not into.val_numbered:
        return
    kit = into.devkit
    if kit is None:
        raise ArgumentError(f"{into.val_tars[0]} holds no labels: pass also the devkit "
                            f"(ILSVRC2012_devkit_t12.tar.gz), whose ground truth labels it")
    lines = kit.ground_truth
    seen: dict[int, Entry] = {}
    for number, entry in into.val_numbered:
        if number in seen:
            raise SourceError(f"{entry.where} and {seen[number].where} are both val image number {number}")
        seen[number] = entry
        if not 1 <= number <= len(lines):
            raise SourceError(f"{entry.where}: val image number {number}, but {kit.truth_path} has {len(lines)} "
                              f"lines: archive and devkit do not match")
        text = lines[number - 1].strip()
        try:
            wnid = kit.wnid_of_id[int(text)]
        except (ValueError, KeyError):
            raise SourceError(f"{kit.truth_path}:{number}: {text!r} is not the ILSVRC2012_ID of one of meta.mat's "
                              f"{len(kit.wnid_of_id)} classes") from None
        into.val.append(Entry(wnid, entry.filename, entry.path, entry.offset, entry.size, entry.mtime_ns,
                              f"{entry.where} (ground truth line {number}: {wnid})"))
    missing = [n for n in range(1, len(lines) + 1) if n not in seen]
    if missing:
        raise SourceError(f"{kit.truth_path}:{missing[0]}: no val image ILSVRC2012_val_{missing[0]:08d}.JPEG in "
                          f"{', '.join(into.val_tars)} ({len(lines)} ground-truth lines, {len(seen)} images): every "
                          f"line needs its image; archive and devkit do not match")


def verify_md5(kinds: list[tuple[str, Path]], say) -> None:
    """The official archives among ``kinds`` against their published MD5s (a :class:`SourceError` on a mismatch)."""
    for kind, path in kinds:
        official = {"train_tar": "train", "val_tar": "val", "devkit": "devkit"}.get(kind)
        if official is None:
            continue
        say(f"computing the MD5 of {path} ({path.stat().st_size / 1e9:.1f} GB)")
        digest = hashlib.md5()
        with open(path, "rb") as f:
            while block := f.read(16 << 20):
                digest.update(block)
        if digest.hexdigest() != MD5[official]:
            raise SourceError(f"{path}: MD5 {digest.hexdigest()}, but the published {OFFICIAL_NAMES[official]}'s is "
                              f"{MD5[official]}: the download is damaged or another file; download it again")
