"""Raw dataset files -> ({"train": (images, labels), "test": ...}, class names).

Images come out as uint8 [N, H, W, C] with rows top to bottom, columns left to right and channels
in RGB order, whatever the raw layout: IDX is already [N, H, W]; SVHN's MATLAB arrays are
[H, W, C, N]; a CIFAR row is 3 planes (R, G, B) of 32 x 32 in row-major order; JPEG and PNG
files are decoded by imageio.
"""
import concurrent.futures
import os

import imageio.v3 as iio
import numpy as np
import scipy.io
from tqdm import tqdm

from datasets import archives, idx, registry
from util import UsageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


# MNIST and Fashion-MNIST --------------------------------------------------------------------------

def convert_idx(paths, class_names):
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = idx.read_idx(paths[f"{prefix}-images-idx3-ubyte.gz"])
        labels = idx.read_idx(paths[f"{prefix}-labels-idx1-ubyte.gz"])
        _check_counts(prefix, images, labels)
        splits[split] = (images[..., None], labels)
    return splits, list(class_names)


def convert_mnist(paths, options):
    return convert_idx(paths, [str(digit) for digit in range(10)])


def convert_fashion(paths, options):
    return convert_idx(paths, registry.FASHION_CLASS_NAMES)


def _check_counts(what, images, labels):
    if len(images) != len(labels):
        raise UsageError(f"{what}: {len(images)} images but {len(labels)} labels; fetch the raw "
                         "files again")


# SVHN -------------------------------------------------------------------------------------------

def convert_svhn(paths, options):
    """The cropped-digit .mat files; label 10 means the digit 0. `--svhn_extra` appends the
    531,131 extra images to train."""
    train_files = ["train_32x32.mat"] + (["extra_32x32.mat"] if options.svhn_extra else [])
    parts = [_read_svhn(paths[name]) for name in train_files]
    train = tuple(np.concatenate(arrays) for arrays in zip(*parts))
    return {"train": train, "test": _read_svhn(paths["test_32x32.mat"])}, \
        [str(digit) for digit in range(10)]


def _read_svhn(path):
    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except (ValueError, OSError, TypeError) as error:
        raise UsageError(f"cannot read {path} as a MATLAB file ({error}); fetch it again") from None
    if "X" not in mat or "y" not in mat or mat["X"].ndim != 4:
        raise UsageError(f"{path} lacks the X [32, 32, 3, N] and y arrays of SVHN; fetch it again")
    images = np.ascontiguousarray(mat["X"].transpose(3, 0, 1, 2), dtype=np.uint8)
    labels = mat["y"].ravel().astype(np.int64) % 10
    _check_counts(path, images, labels)
    return images, labels


# CIFAR ------------------------------------------------------------------------------------------

def convert_cifar10(paths, options):
    return _convert_cifar(paths["cifar-10-python.tar.gz"], "cifar-10-batches-py",
                          [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
                          "labels", "label_names")


def convert_cifar100(paths, options):
    """Fine labels (100 classes), or with `--cifar100_labels coarse` the 20 superclasses."""
    kind = options.cifar100_labels
    return _convert_cifar(paths["cifar-100-python.tar.gz"], "cifar-100-python", ["train"],
                          "test", "meta", f"{kind}_labels", f"{kind}_label_names")


def _convert_cifar(path, folder, train_batches, test_batch, meta, labels_key, names_key):
    with archives.open_tar(path) as tar:
        def read(name, *keys):
            member = f"{folder}/{name}"
            content = archives.load_pickle(archives.read_tar_member(tar, path, member),
                                           f"{path}:{member}")
            missing = [key for key in keys
                       if not isinstance(content, dict) or key.encode() not in content]
            if missing:
                raise UsageError(f"{path}:{member} lacks {', '.join(missing)}; it is not the "
                                 "published archive — fetch it again")
            return [content[key.encode()] for key in keys]

        def images_and_labels(names):
            parts = [_cifar_rows(path, *read(name, "data", labels_key)) for name in names]
            return tuple(np.concatenate(arrays) for arrays in zip(*parts))

        splits = {"train": images_and_labels(train_batches),
                  "test": images_and_labels([test_batch])}
        class_names = [name.decode() for name in read(meta, names_key)[0]]
    return splits, class_names


def _cifar_rows(path, rows, labels):
    """Rows of 3072 bytes, each 3 colour planes of 32 x 32 in row-major order, as [N, 32, 32, 3]."""
    rows = np.asarray(rows)
    if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != 3 * 32 * 32:
        raise UsageError(f"{path}: a batch holds {rows.dtype} {rows.shape}, not uint8 rows of "
                         "3072; fetch the archive again")
    images = np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels = np.asarray(labels, dtype=np.int64)
    _check_counts(path, images, labels)
    return images, labels


# Tiny ImageNet ----------------------------------------------------------------------------------

TINY_ROOT = "tiny-imagenet-200/"


def convert_tinyimagenet(paths, options):
    """train/<wnid>/images/*.JPEG, and val/images/*.JPEG labelled by val/val_annotations.txt
    (the official test split has no labels, so val is the test split). Class index = position
    of the wnid in sorted order; class name = the first name words.txt gives it."""
    path = paths["tiny-imagenet-200.zip"]
    with archives.open_zip(path) as archive:
        wnids = sorted(_zip_text(archive, path, "wnids.txt").split())
        label_of = {wnid: i for i, wnid in enumerate(wnids)}
        train = sorted((name, label_of[name.split("/")[2]]) for name in archive.namelist()
                       if _is_tiny_train_image(name, label_of))
        val = [(f"{TINY_ROOT}val/images/{fields[0]}", label_of[fields[1]])
               for fields in _tsv(_zip_text(archive, path, "val/val_annotations.txt"))]
        class_names = _first_words(_zip_text(archive, path, "words.txt"), wnids)
        splits = {split: _decode_labelled(files, f"decoding {split} images", archive.read,
                                          channels=3)
                  for split, files in (("train", train), ("test", val))}
    return splits, class_names


def _is_tiny_train_image(name, label_of):
    parts = name.split("/")
    return (len(parts) == 5 and parts[1] == "train" and parts[2] in label_of
            and parts[3] == "images" and _is_image(name))


def _zip_text(archive, path, name):
    try:
        return archive.read(TINY_ROOT + name).decode()
    except KeyError:
        raise UsageError(f"{path} lacks {TINY_ROOT}{name}; it is not the published archive — "
                         "fetch it again") from None


def _tsv(text):
    return [line.split("\t") for line in text.splitlines() if line.strip()]


def _first_words(text, wnids):
    first_word = {fields[0]: fields[1].split(",")[0].strip() for fields in _tsv(text)}
    return [first_word.get(wnid, wnid) for wnid in wnids]


# An image-folder tree ---------------------------------------------------------------------------

def convert_folder(root):
    """ROOT/train/<class>/<image> and ROOT/test/<class>/<image>; class index = position of the
    folder name in sorted order. Gray images become RGB when some image has colour."""
    classes = _class_folders(root, "train")
    label_of = {name: i for i, name in enumerate(classes)}
    splits = {}
    for split in ("train", "test"):
        folder = os.path.join(root, split)
        unknown = sorted(set(_class_folders(root, split)) - set(classes))
        if unknown:
            raise UsageError(f"{folder} has classes {', '.join(unknown)} that train/ lacks; "
                             "every test class needs train images")
        files = [(os.path.join(folder, name, file), label_of[name])
                 for name in _class_folders(root, split)
                 for file in sorted(os.listdir(os.path.join(folder, name))) if _is_image(file)]
        if not files:
            raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}/<class>/")
        splits[split] = _decode_labelled(files, f"decoding {folder}", _read_file)
    return _same_channels(splits), classes


def _class_folders(root, split):
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise UsageError(f"{folder} not found: --from_folder expects {root}/train/<class>/<image> "
                         f"and {root}/test/<class>/<image>")
    return sorted(name for name in os.listdir(folder) if os.path.isdir(os.path.join(folder, name)))


def _read_file(path):
    with open(path, "rb") as f:
        return f.read()


def _same_channels(splits):
    channels = max(images.shape[-1] for images, _ in splits.values())
    return {split: (np.repeat(images, channels // images.shape[-1], axis=-1), labels)
            for split, (images, labels) in splits.items()}


# Decoding ---------------------------------------------------------------------------------------

def _is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _decode_labelled(files, description, read, channels=None):
    """Decodes [(name, label)] in parallel threads (the image decoders release the GIL) into uint8
    [N, H, W, C] and int64 labels. `channels=3` makes every image RGB; otherwise gray images are
    1 channel, or 3 when some image in `files` has colour."""
    names = [name for name, _ in files]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        decoded = list(tqdm(pool.map(lambda name: _decode(name, read(name), channels), names),
                            total=len(names), desc=description, unit="image"))
    height, width = decoded[0].shape[:2]
    images = np.empty((len(decoded), height, width, max(i.shape[-1] for i in decoded)), np.uint8)
    for i, (name, image) in enumerate(zip(names, decoded)):
        if image.shape[:2] != (height, width):
            raise UsageError(f"{name} is {image.shape[1]}x{image.shape[0]} pixels but {names[0]} "
                             f"is {width}x{height}; resize the images to one size")
        images[i] = image
    return images, np.array([label for _, label in files], np.int64)


def _decode(name, data, channels):
    """One image as uint8 [H, W, C] with C 1 or 3 (alpha dropped)."""
    try:
        image = iio.imread(data, plugin="pillow", index=0,
                           mode="RGB" if channels == 3 else None)
    except Exception as error:  # imageio's plugins raise many kinds for a broken file
        raise UsageError(f"cannot read image {name} ({type(error).__name__}: {error}); fix or "
                         "remove it") from None
    if image.dtype != np.uint8:
        raise UsageError(f"image {name} has {image.dtype} pixels; only 8-bit images are read")
    if image.ndim == 2:
        return image[..., None]
    return image[..., :3] if image.shape[-1] >= 3 else image[..., :1]
