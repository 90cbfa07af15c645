"""Image folders as input (distill/imagefolder.py): classes, splits, the content-keyed cache, and
each bad input refused with the file and the rule named."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill.data import NORMALISATION, load_dataset
from distill.imagefolder import FolderOptions, ImageFolderError, folder_arrays, load_image_folder

CLASSES = ("cat", "dog", "eel")


def _png(path: Path, value: int, mode: str = "L", size: tuple[int, int] = (8, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, value // 2)
    Image.new(mode, size, color).save(path)


def _folder(root: Path, classes=CLASSES, per_class: int = 3, test: bool = True) -> Path:
    for i, c in enumerate(classes):
        for j in range(per_class):
            _png(root / "train" / c / f"{j}.png", 10 * i + j)
        if test:
            _png(root / "test" / c / "0.png", 100 + i)
    return root


def _tar(folder: Path, archive: Path, arcname: str = "pets") -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return archive


def test_a_folder_gives_sorted_classes_both_splits_and_its_pixels(tmp_path):
    ds = load_image_folder(_folder(tmp_path / "pets"), cache_dir=tmp_path / "cache", show_progress=False)
    assert (len(ds.train), len(ds.test), ds.info.num_classes, ds.info.image_shape) == (9, 3, 3, (1, 6, 8))
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and ds.test.labels.tolist() == [0, 1, 2]
    raw = np.load(folder_arrays(tmp_path / "pets", cache_dir=tmp_path / "cache", show_progress=False))
    assert raw["x_train"][4].max() == raw["x_train"][4].min() == 11  # dog/1.png: grey level 10 * 1 + 1
    assert list(raw["classes"]) == list(CLASSES)


def test_an_archive_reads_like_its_folder_and_the_cache_is_reused(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "pets")
    archive = _tar(folder, tmp_path / "pets.tar.gz")
    cache = tmp_path / "cache"
    from_dir = np.load(folder_arrays(folder, cache_dir=cache, show_progress=False))
    path = folder_arrays(archive, cache_dir=cache, show_progress=False)
    from_tar = np.load(path)
    assert all(np.array_equal(from_dir[k], from_tar[k]) for k in ("x_train", "y_train", "x_test", "y_test"))

    monkeypatch.setattr("distill.imagefolder.convert", lambda *a, **k: pytest.fail("decoded again"))
    assert folder_arrays(archive, cache_dir=cache, show_progress=False) == path  # the cached file, not a decode
    assert len(list(cache.glob("*.npz"))) == 2  # one per source: the keys are the contents


def test_the_cache_key_follows_the_content(tmp_path):
    folder = _folder(tmp_path / "pets")
    first = folder_arrays(folder, cache_dir=tmp_path / "cache", show_progress=False)
    _png(folder / "train" / "cat" / "0.png", 200)
    second = folder_arrays(folder, cache_dir=tmp_path / "cache", show_progress=False)
    assert first != second and np.load(second)["x_train"][0].max() == 200


def test_declared_classes_fix_the_labels_of_a_node_that_lacks_some(tmp_path):
    folder = _folder(tmp_path / "node", classes=("dog", "eel"), test=False)
    ds = load_image_folder(folder, options=FolderOptions(classes=CLASSES), cache_dir=tmp_path / "c",
                           show_progress=False)
    assert ds.info.num_classes == 3 and sorted(set(ds.train.labels.tolist())) == [1, 2]
    assert len(ds.test) == 0  # no test/ folder: an empty test split


def test_a_known_dataset_by_its_file_name_gets_its_published_normalisation(tmp_path):
    folder = _folder(tmp_path / "x", per_class=1)
    archive = _tar(folder, tmp_path / "mnist70k.tar.gz")
    ds = load_image_folder(archive, cache_dir=tmp_path / "c", show_progress=False)
    assert (ds.info.mean, ds.info.std) == NORMALISATION["mnist"]


def test_load_dataset_takes_an_image_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("distill.data.default_cache_dir", lambda: tmp_path / "cache")
    ds = load_dataset(str(_folder(tmp_path / "pets")))
    assert len(ds.train) == 9 and any((tmp_path / "cache").glob("pets-*.npz"))


def test_mixed_modes_and_sizes_are_refused_unless_converted(tmp_path):
    folder = _folder(tmp_path / "pets")
    _png(folder / "train" / "dog" / "9.png", 50, mode="RGB")
    with pytest.raises(ImageFolderError, match=r"dog/9\.png: mode RGB .* set mode= and size="):
        folder_arrays(folder, cache_dir=tmp_path / "c", show_progress=False)
    _png(folder / "train" / "dog" / "9.png", 50, size=(5, 5))
    with pytest.raises(ImageFolderError, match=r"dog/9\.png: mode L shape \(5, 5\)"):
        folder_arrays(folder, cache_dir=tmp_path / "c", show_progress=False)
    assert not list((tmp_path / "c").glob("*")) if (tmp_path / "c").exists() else True  # nothing half-written
    _png(folder / "train" / "dog" / "9.png", 50, mode="RGB", size=(5, 5))
    raw = np.load(folder_arrays(folder, FolderOptions(mode="RGB", size=(6, 8)), cache_dir=tmp_path / "c",
                                show_progress=False))
    assert raw["x_train"].shape == (10, 6, 8, 3) and raw["x_test"].shape == (3, 6, 8, 3)


@pytest.mark.parametrize("damage, rule", [
    (lambda f: (f / "train" / "eel" / "bad.png").write_bytes(b"not an image"), r"eel/bad\.png: not a readable image"),
    (lambda f: _png(f / "test" / "fox" / "0.png", 1), r"test has classes \['fox'\] which the train split lacks"),
    (lambda f: _png(f / "valid" / "cat" / "0.png", 1), r"\['valid'\] beside train/ and test/"),
])
def test_each_bad_input_names_the_file_and_the_rule(tmp_path, damage, rule):
    folder = _folder(tmp_path / "pets")
    damage(folder)
    with pytest.raises(ImageFolderError, match=rule):
        folder_arrays(folder, cache_dir=tmp_path / "c", show_progress=False)
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


def test_no_classes_and_one_class_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageFolderError, match="no class folders"):
        folder_arrays(tmp_path / "empty", cache_dir=tmp_path / "c", show_progress=False)
    with pytest.raises(ImageFolderError, match="one class only"):
        folder_arrays(_folder(tmp_path / "one", classes=("cat",)), cache_dir=tmp_path / "c", show_progress=False)


def _hostile_tar(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        image = io.BytesIO()
        Image.new("L", (4, 4), 7).save(image, format="PNG")
        for c in ("a", "b"):
            info = tarfile.TarInfo(f"train/{c}/0.png")
            info.size = len(image.getvalue())
            tar.addfile(info, io.BytesIO(image.getvalue()))
        tar.addfile(member, io.BytesIO(data) if data else None)
    return path


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "dotdot", "absolute"])
def test_an_archive_with_links_or_paths_outside_is_refused(tmp_path, kind):
    names = {"dotdot": "train/a/../../../evil.png", "absolute": "/tmp/evil.png"}
    member = tarfile.TarInfo(names.get(kind, "train/a/x.png"))
    if kind in ("symlink", "hardlink"):
        member.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
        member.linkname = "/etc/passwd"
    else:
        member.size = 3
    archive = _hostile_tar(tmp_path / "bad.tar.gz", member, b"abc" if member.size else b"")
    with pytest.raises(ImageFolderError, match="link or a device|points outside"):
        folder_arrays(archive, cache_dir=tmp_path / "c", show_progress=False)
    assert not (tmp_path / "evil.png").exists() and not Path("/tmp/evil.png").exists()


def test_an_archive_over_the_size_bound_is_refused(tmp_path, monkeypatch):
    archive = _tar(_folder(tmp_path / "pets"), tmp_path / "pets.tar.gz")
    monkeypatch.setattr("distill.imagefolder.MAX_BYTES", 100)
    with pytest.raises(ImageFolderError, match="more than 100 bytes"):
        folder_arrays(archive, cache_dir=tmp_path / "c", show_progress=False)


def test_a_supernode_reads_its_own_image_folder_with_the_federations_class_list(tmp_path, monkeypatch):
    """data-path may be an image folder; data-classes fixes the labels even where the node lacks a class."""
    from client.task import load_partition
    from distill.task import DistillTask

    monkeypatch.setattr("distill.data.default_cache_dir", lambda: tmp_path / "cache")
    archive = _tar(_folder(tmp_path / "site", classes=("dog", "eel")), tmp_path / "site.tar.gz")
    node = {"data-path": str(archive), "data-classes": ",".join(CLASSES)}
    train, held_out = load_partition(DistillTask(), node)
    assert train.info.num_classes == 3 and sorted(set(train.labels.tolist())) == [1, 2] and len(held_out) == 2
    with pytest.raises(ValueError, match="num-classes 4"):
        load_partition(DistillTask(), {**node, "data-mean": "0.5", "data-std": "0.25", "num-classes": 4})


def test_a_partition_node_loads_an_image_folder_only_when_it_names_it(tmp_path):
    from client.task import dataset_refusal
    from distill.task import DistillTask

    folder = str(_folder(tmp_path / "pets"))
    task = DistillTask(dataset=folder)
    assert dataset_refusal(task, {"partition-id": 0, "num-partitions": 2}) is not None
    assert dataset_refusal(task, {"partition-id": 0, "num-partitions": 2, "dataset": folder + "/"}) is None
    assert dataset_refusal(DistillTask(dataset=str(tmp_path / "other.tar.gz")), {"dataset": folder}) is not None
