"""Image folders as datasets: how users bring their own images.

A source is a directory, or a ``.tar.gz`` / ``.tgz`` / ``.tar`` archive of one, in the layout
``torchvision.datasets.ImageFolder`` reads: one subfolder per class, optionally under ``train/``
and ``test/`` (one enclosing folder, such as ``cifar10/``, is looked through). Without
``train/`` every image is training data and the test split is empty.

The first use decodes every image once, with progress, into a ``.npz`` in the cache, keyed by
content (an archive's sha256; a directory's file names and bytes) and by the options; later
uses read that file. It is written atomically: a failed conversion leaves nothing behind.

Classes are the declared ``classes`` when given (every node of a federation must agree on
labels, and a node's own folders may lack some), else the sorted folder names of the train
split. Archives are read in memory, never extracted: links, absolute paths, ``..`` and
archives over :data:`MAX_BYTES` are refused.

Bad input gets an error naming the file and the rule: no class folders, an unreadable image,
mixed image modes or sizes without ``mode`` / ``size``, one class only, a test class the train
split lacks.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

import numpy as np

from .npzfile import save_npz_atomic
from .progress import progress

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
MODES = ("L", "RGB")
MAX_BYTES = 8 * 2**30  # uncompressed bytes an archive may hold
SPLITS = ("train", "test")
FORMAT = 1  # of the cached arrays; part of the cache key

Entry = tuple[PurePosixPath, Callable[[], bytes]]  # path inside the source, its bytes on demand


class ImageFolderError(ValueError):
    """An image folder that breaks a rule; the message names the file and the rule."""


def is_image_folder(source: str | os.PathLike) -> bool:
    """Whether ``source`` names an image folder: a directory, or an archive of one."""
    text = str(source)
    return text.endswith(ARCHIVE_SUFFIXES) or Path(text).is_dir()


@dataclass(frozen=True)
class FolderOptions:
    """How images become arrays: the class list, and the mode / size every image is brought to
    (None: every image must already share one)."""

    classes: tuple[str, ...] | None = None
    mode: str | None = None
    size: tuple[int, int] | None = None  # (height, width)

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or None, got {self.mode!r}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise ValueError(f"size must be (height, width) >= 1, got {self.size!r}")
        if self.classes is not None and (len(set(self.classes)) != len(self.classes) or len(self.classes) < 2):
            raise ValueError(f"classes must name at least 2 distinct classes, got {list(self.classes)}")


def load_image_folder(source: str | os.PathLike, name: str | None = None, *,
                      options: FolderOptions = FolderOptions(),
                      stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
                      cache_dir: str | os.PathLike | None = None, show_progress: bool = True):
    """An image folder as a :class:`~distill.data.Dataset`, through the cached arrays.

    ``name`` (default: the source's name up to its first dot, e.g. ``cifar10-jpeg``) picks a known
    dataset's published normalisation; otherwise ``stats`` or the train split's own statistics.
    Labels follow the class list, so ``num_classes`` is its length.
    """
    from .data import load_npz, source_name  # local: data imports this module

    path = folder_arrays(source, options, cache_dir, show_progress)
    with np.load(path, allow_pickle=False) as f:
        classes = [str(c) for c in f["classes"]]
    return load_npz(path, name or source_name(source), stats=stats, num_classes=len(classes))


def folder_arrays(source: str | os.PathLike, options: FolderOptions = FolderOptions(),
                  cache_dir: str | os.PathLike | None = None, show_progress: bool = True) -> Path:
    """The cached ``.npz`` (``x_train, y_train, x_test, y_test``, uint8) of an image folder,
    converted on first use; its ``classes`` array lists the class names in label order."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"no such image folder or archive: {source}")
    key = json.dumps({"content": _content_key(source), "options": [options.classes, options.mode, options.size],
                      "format": FORMAT}, sort_keys=True)
    stem = source.name.split(".")[0] or "images"
    from .data import default_cache_dir  # local: data imports this module

    path = Path(cache_dir or default_cache_dir()) / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"
    if not path.is_file():
        save_npz_atomic(path, convert(source, options, show_progress))
    return path


def convert(source: Path, options: FolderOptions, show_progress: bool = True) -> dict[str, np.ndarray]:
    """Decode every image of ``source`` into uint8 arrays, by the rules of the module docstring."""
    entries = [(p, read) for p, read in _entries(source) if p.suffix.lower() in IMAGE_SUFFIXES]
    splits = _by_split(_strip_enclosing(entries), source)
    found = sorted({p.parts[0] for p, _ in splits["train"]})
    classes = list(options.classes) if options.classes is not None else found
    if not found and not classes:
        raise ImageFolderError(f"{source}: no class folders (want <class>/<image> or train/<class>/<image>)")
    if len(classes) < 2:
        raise ImageFolderError(f"{source}: one class only ({classes}); a dataset needs at least two")
    for split, items in splits.items():
        if stray := sorted({p.parts[0] for p, _ in items} - set(classes)):
            why = "not in the declared class list" if options.classes is not None else "which the train split lacks"
            raise ImageFolderError(f"{source}: {split} has classes {stray[:5]} {why} {classes[:10]}")
    if not splits["train"]:
        raise ImageFolderError(f"{source}: no training images under the class folders")
    label = {c: i for i, c in enumerate(classes)}
    out: dict[str, np.ndarray] = {"classes": np.array(classes)}
    first: list[tuple] = []  # the first image's (mode, shape), which every other must share
    for split, items in splits.items():  # train first: an empty test split takes its shape
        images = [_decode(read(), f"{source}/{p}", options, first)
                  for p, read in progress(items, f"decoding {split} images of {source.name}", show_progress)]
        out[f"x_{split}"] = np.stack(images) if images else np.zeros((0, *out["x_train"].shape[1:]), np.uint8)
        out[f"y_{split}"] = np.array([label[p.parts[0]] for p, _ in items], dtype=np.int64)
    return out


def _decode(data: bytes, name: str, options: FolderOptions, first: list[tuple]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = options.mode or img.mode
            img = img.convert(mode) if img.mode != mode else img
            if options.size is not None and img.size != options.size[::-1]:
                img = img.resize(options.size[::-1], Image.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageFolderError(f"{name}: not a readable image ({err})") from err
    if mode not in MODES:
        raise ImageFolderError(f"{name}: mode {mode!r} (grey levels L or RGB only); set mode='L' or 'RGB' to "
                               "convert every image")
    if not first:
        first.append((mode, array.shape))
    elif (mode, array.shape) != first[0]:
        raise ImageFolderError(f"{name}: mode {mode} shape {array.shape}, the first image had mode {first[0][0]} "
                               f"shape {first[0][1]}; set mode= and size= to convert every image to one")
    return array


def _by_split(entries: list[Entry], source: Path) -> dict[str, list[Entry]]:
    """``{"train": [...], "test": [...]}`` with the split folder removed from each path."""
    heads = {p.parts[0] for p, _ in entries if len(p.parts) > 1}
    if "train" in heads:
        if stray := sorted(heads - set(SPLITS)):
            raise ImageFolderError(f"{source}: {stray[:5]} beside train/ and test/; put class folders under them")
        return {s: [(PurePosixPath(*p.parts[1:]), r) for p, r in entries if p.parts[0] == s and len(p.parts) == 3]
                for s in SPLITS}
    return {"train": [(p, r) for p, r in entries if len(p.parts) == 2], "test": []}


def _strip_enclosing(entries: list[Entry]) -> list[Entry]:
    """Look through one enclosing folder (``cifar10/train/...``)."""
    heads = {p.parts[0] for p, _ in entries}
    if len(heads) == 1 and all(len(p.parts) > 2 for p, _ in entries):
        inner = {p.parts[1] for p, _ in entries}
        if "train" in inner or all(len(p.parts) == 3 for p, _ in entries):
            return [(PurePosixPath(*p.parts[1:]), r) for p, r in entries]
    return entries


def _entries(source: Path) -> Iterator[Entry]:
    if source.is_dir():
        yield from _dir_entries(source)
    elif str(source).endswith(ARCHIVE_SUFFIXES):
        yield from _archive_entries(source)
    else:
        raise ImageFolderError(f"{source}: not a directory or a {'/'.join(ARCHIVE_SUFFIXES)} archive")


def _dir_entries(root: Path) -> Iterator[Entry]:
    for path in sorted(p for p in root.rglob("*") if not p.is_dir()):
        if path.is_symlink():
            raise ImageFolderError(f"{path}: a link; an image folder holds plain files only")
        rel = PurePosixPath(path.relative_to(root).as_posix())
        if not any(part.startswith(".") for part in rel.parts):
            yield rel, path.read_bytes


def _archive_entries(archive: Path) -> Iterator[Entry]:
    """An archive's files, read in memory (never extracted), after every member is checked."""
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        total = 0
        for m in members:
            name = PurePosixPath(m.name)
            if m.issym() or m.islnk() or not (m.isfile() or m.isdir()):
                raise ImageFolderError(f"{archive}: member {m.name!r} is a link or a device; only files and folders")
            if name.is_absolute() or ".." in name.parts:
                raise ImageFolderError(f"{archive}: member {m.name!r} points outside the archive")
            total += m.size
            if total > MAX_BYTES:
                raise ImageFolderError(f"{archive}: more than {MAX_BYTES} bytes uncompressed")
        files = sorted((m for m in members if m.isfile()), key=lambda m: m.name)
        data = {m.name: tar.extractfile(m).read() for m in files}  # type: ignore[union-attr]
    for m in files:
        rel = PurePosixPath(*[p for p in PurePosixPath(m.name).parts if p != "."])
        if not any(part.startswith(".") for part in rel.parts):
            yield rel, (lambda b=data[m.name]: b)


def _content_key(source: Path) -> str:
    """An archive's sha256, or a hash of a directory's file names and contents."""
    h = hashlib.sha256()
    if source.is_dir():
        for rel, read in _dir_entries(source):
            h.update(f"{rel}\0".encode())
            h.update(hashlib.sha256(read()).digest())
        return "dir:" + h.hexdigest()
    with open(source, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return "file:" + h.hexdigest()
