"""The one place that reads and writes data.hdf5.

Written layout: groups `train` and `test`, each with `images` (uint8 [N, H, W, C]; grayscale has
C = 1) and `labels` (int64 [N]), chunked and gzip-compressed; file attributes `num_classes`,
`class_names`, and the provenance: `<algorithm>:<raw file>` = hex digest for every raw file the
data was built from, plus any converter option that changes the data (e.g. `labels` = coarse).

Also read (never written): the 2018 per-id layout, one top-level group per id holding `image`
(H x W x C, uint8 or float; floats in [0, 1] are multiplied by 255 and rounded) and a one-hot
`label`, with `id.txt` beside data.hdf5 listing the ids one per line. Split rule for that layout:
ids are taken in id.txt order; for a registry dataset the first `num_train` ids (the size of its
official train set, e.g. 50,000 for CIFAR10) are train and the rest test; for your own dataset the
first 90% (rounded down) are train and the rest test. Class names are "0" .. "n-1".
"""
import dataclasses
import io
import os

import h5py
import numpy as np
from tqdm import tqdm

from util import UsageError, atomic_path

SPLITS = ("train", "test")
ID_FILE = "id.txt"
_CHUNK_BYTES = 1 << 20
# Level 1 writes Fashion-MNIST's 60,000 train images in 0.8 s, level 9 in 16 s for a 4 % smaller file.
_COMPRESSION = dict(compression="gzip", compression_opts=1)
_SCALE_SAMPLE = 100


class SplitSizes:
    """num_train and num_test of a dataset class with train_labels and test_labels."""

    @property
    def num_train(self):
        return len(self.train_labels)

    @property
    def num_test(self):
        return len(self.test_labels)


@dataclasses.dataclass
class ImageData(SplitSizes):
    """A dataset in memory: uint8 images [N, H, W, C] and int32 labels [N] per split."""
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    class_names: list

    @property
    def image_shape(self):
        return self.train_images.shape[1:]


def write_dataset(path, splits, class_names, provenance):
    """Writes `splits` ({"train": (images, labels), "test": ...}) to `path` atomically.

    `provenance` ({attribute: value}) says what the data was built from; see the module docstring.
    The file is built in memory and written with one plain write, so a full disk raises an
    OSError there instead of failing inside HDF5, which cannot recover from it.
    """
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        for name in SPLITS:
            _write_split(f.create_group(name), *splits[name])
        f.attrs["num_classes"] = len(class_names)
        f.attrs["class_names"] = list(class_names)
        f.attrs.update(provenance)
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(buffer.getbuffer())


def _write_split(group, images, labels):
    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(f"need uint8 images [N, H, W, C] and labels [N], got images "
                         f"{images.dtype} {images.shape} and labels {labels.shape}")
    rows = max(1, min(len(images), _CHUNK_BYTES // int(np.prod(images.shape[1:]))))
    group.create_dataset("images", data=images, chunks=(rows, *images.shape[1:]), **_COMPRESSION)
    group.create_dataset("labels", data=labels, chunks=(rows,), **_COMPRESSION)


def has_provenance(path, provenance):
    """Whether `path` is a complete data file built from exactly `provenance`."""
    try:
        with h5py.File(path, "r") as f:
            complete = all(isinstance(f.get(name), h5py.Group) for name in SPLITS)
            recorded = {key: _text(value) for key, value in f.attrs.items()
                        if key not in ("num_classes", "class_names")}
    except OSError:
        return False
    return complete and recorded == provenance


def read_dataset(path, spec):
    """Reads data.hdf5 at `path` in either layout; `spec` is the registry entry or None."""
    try:
        f = h5py.File(path, "r")
    except OSError as error:
        raise UsageError(f"cannot read {path} as HDF5 ({error}); {_remedy(spec)}") from None
    with f:
        if all(isinstance(f.get(name), h5py.Group) for name in SPLITS):
            data = _read_splits(f, path, spec)
        elif _is_per_id(f):
            data = _read_per_id(f, path, spec)
        else:
            raise UsageError(f"{path} has neither train/test groups nor the 2018 per-id layout; "
                             f"{_remedy(spec)}")
    return _checked_labels(data, path, spec)


def _checked_labels(data, path, spec):
    """Refuses labels outside [0, num_classes), which would fail only deep inside training."""
    for labels in (data.train_labels, data.test_labels):
        if labels.size and not 0 <= labels.min() <= labels.max() < data.num_classes:
            raise UsageError(f"{path}: labels run from {labels.min()} to {labels.max()} but "
                             f"num_classes is {data.num_classes}; {_remedy(spec)}")
    return data


def _remedy(spec):
    if spec is None:
        return "rewrite it with train/test groups as datasets/hdf5_format.py describes"
    return f"re-create it: {spec.create_command}"


def _numbered(num_classes):
    return [str(i) for i in range(num_classes)]


def _read_splits(f, path, spec):
    arrays = {}
    for name in SPLITS:
        if not {"images", "labels"} <= f[name].keys():
            raise UsageError(f"{path}: group {name} lacks images or labels; {_remedy(spec)}")
        images = f[name]["images"][()]
        if images.dtype != np.uint8 or images.ndim != 4:
            raise UsageError(f"{path}: {name}/images is {images.dtype} {images.shape}, not uint8 "
                             f"[N, H, W, C]; {_remedy(spec)}")
        arrays[f"{name}_images"] = images
        arrays[f"{name}_labels"] = f[name]["labels"][()].astype(np.int32)
    if "num_classes" not in f.attrs:
        raise UsageError(f"{path} lacks the num_classes attribute; {_remedy(spec)}")
    num_classes = int(f.attrs["num_classes"])
    class_names = [_text(n) for n in f.attrs.get("class_names", [])] or _numbered(num_classes)
    return ImageData(**arrays, num_classes=num_classes, class_names=class_names)


def _text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def _is_per_id(f):
    first = next(iter(f), None)
    return (first is not None and isinstance(f[first], h5py.Group)
            and {"image", "label"} <= f[first].keys())


def _read_per_id(f, path, spec):
    ids = _read_ids(path)
    num_train = spec.num_train if spec else len(ids) * 9 // 10
    if not 0 < num_train < len(ids):
        raise UsageError(f"{path}: id.txt lists {len(ids)} ids, which leaves no "
                         f"{'test' if num_train else 'train'} examples when the first {num_train} "
                         "are train; list both train and test ids")
    images, labels, num_classes = _read_examples(f, path, ids)
    return ImageData(images[:num_train], labels[:num_train], images[num_train:],
                     labels[num_train:], num_classes, _numbered(num_classes))


def _read_ids(path):
    id_path = os.path.join(os.path.dirname(path), ID_FILE)
    if not os.path.isfile(id_path):
        raise UsageError(f"{path} uses the 2018 per-id layout but {id_path} is missing: "
                         "write the ids there, one per line, train ids first")
    with open(id_path) as f:
        ids = [line.strip() for line in f if line.strip()]
    if not ids:
        raise UsageError(f"{id_path} is empty: list the ids, one per line, train ids first")
    return ids


def _read_examples(f, path, ids):
    """Returns uint8 images [N, H, W, C], int32 labels [N] and the number of classes."""
    scale = _float_scale([_raw_example(f, path, id_)[0] for id_ in ids[:_SCALE_SAMPLE]])
    first_image, first_label = _raw_example(f, path, ids[0])
    images = np.empty((len(ids), *first_image.shape), np.uint8)
    labels = np.empty(len(ids), np.int32)
    for i, id_ in enumerate(tqdm(ids, desc=f"reading {path} (2018 per-id layout)", unit="id")):
        image, one_hot = _raw_example(f, path, id_)
        if image.shape != first_image.shape or one_hot.shape != first_label.shape:
            raise UsageError(f"{path}: id {id_} has image {image.shape} and label {one_hot.shape} "
                             f"but id {ids[0]} has {first_image.shape} and {first_label.shape}; "
                             "all examples must match")
        images[i] = np.clip(np.rint(image * scale), 0, 255)
        labels[i] = np.argmax(one_hot)
    return images, labels, first_label.size


def _raw_example(f, path, id_):
    """Returns the stored image as H x W x C and the one-hot label as a vector."""
    if id_ not in f or not {"image", "label"} <= f[id_].keys():
        raise UsageError(f"{path}: id '{id_}' from {ID_FILE} has no group with image and label; "
                         f"fix {ID_FILE} or the file")
    image = f[id_]["image"][()]
    return (image[..., None] if image.ndim == 2 else image), f[id_]["label"][()].ravel()


def _float_scale(images):
    """255 when the images are floats in [0, 1], else 1. Judged on the first few ids so a dark
    image in 0..255 floats is not mistaken for one in [0, 1]."""
    in_unit_range = all(np.issubdtype(image.dtype, np.floating) and image.max() <= 1.0
                        for image in images)
    return 255.0 if in_unit_range else 1.0
