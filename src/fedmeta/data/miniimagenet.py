"""mini-ImageNet: 100 classes x 600 RGB images of 84x84, with Ravi & Larochelle's class split.

The split CSVs list ``filename,label``; each class's JPEGs sit in ``jpeg84_q75/<wnid>.zip``. The
60,000 images are decoded once (about a minute on 2 cores) into a uint8 array of 1.3 GB that is
cached and reloaded in about a second afterwards.
"""

from __future__ import annotations

import csv
import io
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fedmeta.data.files import DataError, cached_array, expected_checksums, resolve_root, verified
from fedmeta.data.pool import ClassPool

SPLITS = ("train", "val", "test")
SIZE = 84
PER_CLASS = 600


@dataclass(frozen=True)
class MiniImageNet:
    images: Tensor  # uint8 [100, 600, 84, 84, 3]; classes in train, val, test order
    names: tuple[str, ...]  # wnids
    splits: dict[str, Tensor]  # split -> class indices

    def pool(self, classes: Tensor) -> ClassPool:
        """The pool of ``classes``: a view of the one array when they are a run of consecutive
        classes, as every split is (indexing would copy the split: 2.6 GiB peak instead of 1.3)."""
        first = int(classes[0]) if len(classes) else 0
        consecutive = torch.equal(classes, torch.arange(first, first + len(classes)))
        images = self.images[first : first + len(classes)] if consecutive else self.images[classes]
        return ClassPool.from_class_major(images, [self.names[i] for i in classes.tolist()])


def load_miniimagenet(root: str | None = None) -> MiniImageNet:
    base = resolve_root(root)
    listing = {split: _read_split(verified(base, f"mini-imagenet/ravi-split/{split}.csv")) for split in SPLITS}
    wnids = [w for split in SPLITS for w in listing[split]]
    zips = [f"mini-imagenet/jpeg84_q75/{w}.zip" for w in wnids]
    paths = [verified(base, z) for z in zips]
    files = [name for split in SPLITS for names in listing[split].values() for name in names]
    key = [expected_checksums().get(z, z) for z in zips] + [f"rgb{SIZE}", str(len(files))]
    images = cached_array(key, lambda: _decode(paths, [listing[s][w] for s in SPLITS for w in listing[s]]), "miniimagenet")
    splits, start = {}, 0
    for split in SPLITS:
        splits[split] = torch.arange(start, start + len(listing[split]))
        start += len(listing[split])
    return MiniImageNet(torch.from_numpy(images), tuple(wnids), splits)


def _read_split(path: Path) -> dict[str, list[str]]:
    """wnid -> its file names, in file order."""
    classes: dict[str, list[str]] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != ["filename", "label"]:
            raise DataError(f"{path}: expected the header 'filename,label', got {reader.fieldnames}")
        for row in reader:
            classes.setdefault(row["label"], []).append(row["filename"])
    for wnid, names in classes.items():
        if len(names) != PER_CLASS:
            raise DataError(f"{path}: class {wnid} lists {len(names)} images, expected {PER_CLASS}")
    return classes


def _decode(paths: list[Path], names: list[list[str]]) -> np.ndarray:
    out = np.empty((len(paths), PER_CLASS, SIZE, SIZE, 3), dtype=np.uint8)

    def decode_class(c: int) -> None:
        with zipfile.ZipFile(paths[c]) as zf:
            for k, name in enumerate(names[c]):
                with Image.open(io.BytesIO(zf.read(name))) as img:
                    if img.size != (SIZE, SIZE):
                        raise DataError(f"{paths[c]}:{name} is {img.size}, expected {SIZE}x{SIZE}")
                    out[c, k] = np.asarray(img.convert("RGB"))

    # PIL releases the GIL while decoding, so threads use every core.
    with ThreadPoolExecutor() as pool:
        list(pool.map(decode_class, range(len(paths))))
    return out
