"""ImageNet (ILSVRC-2012) read straight from its JPEG files, which are too many to convert to HDF5.

Expected layout, the usual prepared one (the validation images sorted into class folders):

    ROOT/train/<wnid>/*.JPEG
    ROOT/val/<wnid>/*.JPEG

`python download.py --dataset ImageNet --imagenet_dir ROOT` checks the tree and writes
`image_tree.json` = {"root", "class_names", "num_train", "num_test"} where the registry looks for
the dataset (`write_tree_file`). Each run lists the files again (`read_tree`) and refuses a tree
whose classes or counts have changed since. Class i is the i-th train folder in sorted order and
its name is the wnid; files are `.jpeg` or `.jpg` in any case, listed in sorted order.
"""
import dataclasses
import json
import os

import numpy as np

from datasets import hdf5_format, registry
from util import UsageError, log, write_json

IMAGE_EXTENSIONS = (".jpeg", ".jpg")
TRAIN_FOLDER, VAL_FOLDER = "train", "val"
LAYOUT = ("expected ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/*.JPEG, the validation images "
          "sorted into class folders")
RERUN = "re-run: " + registry.REGISTRY["ImageNet"].create_command


@dataclasses.dataclass
class ImageTree(hdf5_format.SplitSizes):
    """A dataset of image files: paths (numpy object arrays of str) and int32 labels per split."""
    train_files: np.ndarray
    train_labels: np.ndarray
    test_files: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    class_names: list
    image_size: int

    @property
    def image_shape(self):
        return (self.image_size, self.image_size, 3)


def write_tree_file(path, root):
    """Checks the tree under `root` and writes what `read_tree` needs to find it again to `path`."""
    root = os.path.abspath(root)
    class_names, (train_files, _), (test_files, _) = _list_tree(root)
    write_json(path, {"root": root, "class_names": class_names,
                      "num_train": len(train_files), "num_test": len(test_files)})
    log.info("%s: %d classes, %d train and %d val images; wrote %s", root, len(class_names),
             len(train_files), len(test_files), path)


def read_tree(path, image_size):
    """The ImageTree that `path` (written by `write_tree_file`) points to, for `image_size` px
    inputs. Refuses a tree that has moved or whose classes or counts have changed."""
    try:
        with open(path) as f:
            recorded = json.load(f)
        root = recorded["root"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"cannot read {path} — {RERUN}") from None
    if not os.path.isdir(root):
        raise UsageError(f"the ImageNet tree {root} named in {path} is gone — {RERUN}")
    class_names, train, test = _list_tree(root)
    tree = ImageTree(*train, *test, len(class_names), class_names, image_size)
    found = (tree.class_names, tree.num_train, tree.num_test)
    if found != (recorded.get("class_names"), recorded.get("num_train"), recorded.get("num_test")):
        raise UsageError(f"{root} now holds {tree.num_classes} classes, {tree.num_train} train and "
                         f"{tree.num_test} val images, not what {path} recorded — {RERUN}")
    return tree


def _list_tree(root):
    """Returns the class names and the (paths, labels) of the train and val images under `root`;
    raises a UsageError when the layout is not the expected one."""
    class_names = _class_folders(root, TRAIN_FOLDER)
    labels = {wnid: label for label, wnid in enumerate(class_names)}
    val_classes = _class_folders(root, VAL_FOLDER)
    strangers = [wnid for wnid in val_classes if wnid not in labels]
    if strangers:
        raise UsageError(f"{os.path.join(root, VAL_FOLDER, strangers[0])} is not a class of "
                         f"{os.path.join(root, TRAIN_FOLDER)} — name every val folder after a "
                         "train folder (its wnid)")
    return (class_names, _list_split(root, TRAIN_FOLDER, class_names, labels),
            _list_split(root, VAL_FOLDER, val_classes, labels))


def _class_folders(root, split):
    """The sorted names of the folders in ROOT/<split>."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise UsageError(f"{root} has no {split}/ folder — {LAYOUT}")
    with os.scandir(folder) as entries:
        names = sorted(entry.name for entry in entries if entry.is_dir())
    if not names:
        raise UsageError(f"{folder} holds no class folders — {LAYOUT}")
    return names


def _list_split(root, split, wnids, labels):
    """Paths (sorted) and labels of the images in ROOT/<split>/<wnid>/ for each of `wnids`."""
    files, file_labels = [], []
    for wnid in wnids:
        folder = os.path.join(root, split, wnid)
        names = _image_names(folder)
        if not names:
            raise UsageError(f"{folder} holds no .JPEG files — put the class's images there or "
                             "remove the folder")
        files.extend(os.path.join(folder, name) for name in names)
        file_labels.extend([labels[wnid]] * len(names))
    return np.array(files, dtype=object), np.array(file_labels, dtype=np.int32)


def _image_names(folder):
    """Sorted names of the JPEG files in `folder`; os.scandir reads the file types along with the
    names, so 1.28 M files are listed without a stat call each."""
    with os.scandir(folder) as entries:
        return sorted(entry.name for entry in entries
                      if entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file())
