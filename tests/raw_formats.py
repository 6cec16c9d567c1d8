"""Writers of small files in the exact raw formats the datasets are published in.

Only the bytes are made up; the project's real converters read them. Every writer puts
`pattern(height, width, channels)` first, so a test can check that each converter keeps rows,
columns and channels where they belong.
"""
import gzip
import io
import os
import pickle
import tarfile
import zipfile

import imageio.v3 as iio
import numpy as np
import scipy.io


def pattern(height, width, channels):
    """An image no flip, transpose or channel swap leaves unchanged: the value rises 7 per row,
    3 per column and 60 per channel."""
    rows, cols, chans = np.meshgrid(np.arange(height), np.arange(width), np.arange(channels),
                                    indexing="ij")
    return ((rows * 7 + cols * 3 + chans * 60) % 256).astype(np.uint8)


def blocks(height, width):
    """An RGB image that survives JPEG: a bright red top-left quadrant, a green top-right one, a
    blue bottom-left one and black elsewhere."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:height // 2, :width // 2, 0] = 250
    image[:height // 2, width // 2:, 1] = 250
    image[height // 2:, :width // 2, 2] = 250
    return image


def images_with_pattern(count, height, width, channels, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, height, width, channels), dtype=np.uint8)
    images[0] = pattern(height, width, channels)
    return images


def labels_for(count, num_classes):
    return (np.arange(count) * 7 % num_classes).astype(np.uint8)


# IDX (MNIST, Fashion-MNIST) -------------------------------------------------------------------

def write_idx(path, array, compress=True, level=9):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(raw, compresslevel=level) if compress else raw)


def write_mnist_like(folder, num_train=12, num_test=8, level=9):
    """The four IDX files; returns the train and test (images, labels)."""
    os.makedirs(folder, exist_ok=True)
    splits = {}
    for prefix, count, seed in (("train", num_train, 0), ("t10k", num_test, 1)):
        images = images_with_pattern(count, 28, 28, 1, seed)[..., 0]
        labels = labels_for(count, 10)
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), images, level=level)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), labels, level=level)
        splits[prefix] = (images, labels)
    return splits


# SVHN (MATLAB v5, X is [32, 32, 3, N], y is [N, 1] with 10 for the digit 0) --------------------

def write_svhn(folder, counts=(("train", 12), ("test", 8), ("extra", 5))):
    os.makedirs(folder, exist_ok=True)
    splits = {}
    for split, count in counts:
        images = images_with_pattern(count, 32, 32, 3, seed=len(split))
        digits = labels_for(count, 10)
        stored = np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]
        scipy.io.savemat(os.path.join(folder, f"{split}_32x32.mat"),
                         {"X": images.transpose(1, 2, 3, 0), "y": stored})
        splits[split] = (images, digits)
    return splits


# CIFAR (tar.gz of Python 2 pickles, rows of 3072 = R, G, B planes of 32 x 32) ------------------

def cifar_rows(images):
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def pickled(obj, numpy1=False):
    """Byte-string keys and array data as in the published batches (Python 2 wrote them as
    strings; protocol 3 writes bytes without calling codecs); `numpy1` names the array globals as
    numpy 1 did."""
    data = pickle.dumps(obj, protocol=3)
    if numpy1:
        return data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    return data


def write_tar(path, members, mode="w:gz"):
    """members: {name: bytes}, or a tarfile.TarInfo-making callable for special entries."""
    with tarfile.open(path, mode) as tar:
        for name, content in members.items():
            if callable(content):
                tar.addfile(content(name))
                continue
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))


def write_cifar10(folder, per_batch=4, num_test=6, numpy1=True):
    os.makedirs(folder, exist_ok=True)
    images = images_with_pattern(5 * per_batch + num_test, 32, 32, 3)
    labels = labels_for(len(images), 10).astype(int).tolist()
    members = {}
    for i in range(5):
        part = slice(i * per_batch, (i + 1) * per_batch)
        members[f"cifar-10-batches-py/data_batch_{i + 1}"] = pickled(
            {b"batch_label": b"training batch", b"labels": labels[part],
             b"data": cifar_rows(images[part])}, numpy1)
    members["cifar-10-batches-py/test_batch"] = pickled(
        {b"labels": labels[5 * per_batch:], b"data": cifar_rows(images[5 * per_batch:])}, numpy1)
    members["cifar-10-batches-py/batches.meta"] = pickled(
        {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}, numpy1)
    write_tar(os.path.join(folder, "cifar-10-python.tar.gz"), members)
    split = 5 * per_batch
    return {"train": (images[:split], labels[:split]), "test": (images[split:], labels[split:])}


def write_cifar100(folder, num_train=10, num_test=6, numpy1=True):
    os.makedirs(folder, exist_ok=True)
    images = images_with_pattern(num_train + num_test, 32, 32, 3)
    fine = (np.arange(len(images)) * 13 % 100).tolist()
    coarse = [label // 5 for label in fine]
    members = {}
    for name, part in (("train", slice(0, num_train)), ("test", slice(num_train, None))):
        members[f"cifar-100-python/{name}"] = pickled(
            {b"fine_labels": fine[part], b"coarse_labels": coarse[part],
             b"data": cifar_rows(images[part])}, numpy1)
    members["cifar-100-python/meta"] = pickled(
        {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
         b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, numpy1)
    write_tar(os.path.join(folder, "cifar-100-python.tar.gz"), members)
    return images[:num_train], fine, coarse


# Tiny ImageNet (zip of JPEGs) ------------------------------------------------------------------

TINY_WNIDS = ("n02", "n01", "n03")  # not sorted on purpose: class index = sorted position


def write_tinyimagenet(folder, per_class=3, num_val=4):
    """Train image 0 of the first sorted wnid is `blocks`, and so is val image 0; one train image
    is grayscale, as some real ones are."""
    os.makedirs(folder, exist_ok=True)
    root = "tiny-imagenet-200/"
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(os.path.join(folder, "tiny-imagenet-200.zip"), "w") as archive:
        archive.writestr(root + "wnids.txt", "\n".join(TINY_WNIDS) + "\n")
        archive.writestr(root + "words.txt", "n01\tgoldfish, Carassius auratus\nn02\tshark\n"
                                             "n03\ttench, Tinca tinca\nn99\tunused\n")
        for wnid in TINY_WNIDS:
            archive.writestr(f"{root}train/{wnid}/{wnid}_boxes.txt", "")
            for i in range(per_class):
                image = blocks(64, 64) if (wnid, i) == ("n01", 0) else \
                    rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
                if (wnid, i) == ("n03", 1):
                    image = image[..., 0]
                archive.writestr(f"{root}train/{wnid}/images/{wnid}_{i}.JPEG",
                                 iio.imwrite("<bytes>", image, extension=".jpeg", quality=95))
        annotations = []
        for i in range(num_val):
            image = blocks(64, 64) if i == 0 else rng.integers(0, 256, (64, 64, 3), np.uint8)
            archive.writestr(f"{root}val/images/val_{i}.JPEG",
                             iio.imwrite("<bytes>", image, extension=".jpeg", quality=95))
            annotations.append(f"val_{i}.JPEG\t{sorted(TINY_WNIDS)[i % 3]}\t0\t0\t63\t63")
        archive.writestr(root + "val/val_annotations.txt", "\n".join(annotations) + "\n")
        archive.writestr(root + "test/images/test_0.JPEG",
                         iio.imwrite("<bytes>", blocks(64, 64), extension=".jpeg"))
