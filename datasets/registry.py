"""The datasets the project knows, and where each one's data.hdf5 lives.

A name that is not in the registry still works when `<data_dir>/<name>/data.hdf5` exists: it is the
user's own dataset, and everything about it is read from the file.
"""
import dataclasses
import os

from util import UsageError

DEFAULT_DATA_DIR = "./datasets"
DEFAULT_DATASET = "sample"
DATA_FILE = "data.hdf5"

FASHION_CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                       "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the code needs to know about a dataset before opening its file.

    Attributes:
        name: the `--dataset` value.
        subdir: folder under the data directory that holds data.hdf5.
        image_size: height and width in pixels.
        channels: 1 for grayscale, 3 for color.
        num_classes: number of labels.
        num_train: size of the official train set; splits files in the 2018 per-id layout.
        augment: whether training uses random crop and horizontal flip by default (not for digits
            or clothes, whose orientation carries meaning).
        create_command: the command that creates the data file.
        root: a fixed folder used instead of `<data_dir>/<subdir>` (the bundled sample).
    """
    name: str
    subdir: str
    image_size: int
    channels: int
    num_classes: int
    num_train: int
    augment: bool
    create_command: str
    root: str | None = None


def _download(name):
    return f"python download.py --dataset {name}"


SAMPLE_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample")

REGISTRY = {spec.name: spec for spec in [
    DatasetSpec("sample", "sample", 28, 1, 10, 5_000, False, "python datasets/make_sample.py",
                root=SAMPLE_ROOT),
    DatasetSpec("MNIST", "mnist", 28, 1, 10, 60_000, False, _download("MNIST")),
    DatasetSpec("Fashion", "fashion", 28, 1, 10, 60_000, False, _download("Fashion")),
    DatasetSpec("SVHN", "svhn", 32, 3, 10, 73_257, False, _download("SVHN")),
    DatasetSpec("CIFAR10", "cifar10", 32, 3, 10, 50_000, True, _download("CIFAR10")),
    DatasetSpec("TinyImageNet", "tinyimagenet", 64, 3, 200, 100_000, True,
                _download("TinyImageNet")),
    DatasetSpec("ImageNet", "imagenet", 224, 3, 1000, 1_281_167, True, _download("ImageNet")),
]}


def find(name):
    """The registry entry called `name`, ignoring case (so `cifar10` is CIFAR10, not a user
    dataset that happens to share its folder), or None."""
    return next((spec for spec in REGISTRY.values() if spec.name.lower() == name.lower()), None)


def data_folder(spec, data_dir):
    return spec.root or os.path.join(data_dir, spec.subdir)


def locate(name, data_dir):
    """Returns (spec, path of data.hdf5) for `--dataset name`; spec is None for a user's dataset.

    Raises UsageError when the name is unknown or a registry dataset has not been created yet.
    """
    spec = find(name)
    if spec is None:
        path = os.path.join(data_dir, name, DATA_FILE)
        if os.path.isfile(path):
            return None, path
        raise UsageError(f"unknown dataset '{name}': choose one of {', '.join(REGISTRY)} "
                         f"or put your own {DATA_FILE} under {os.path.join(data_dir, name)}/")
    folder = data_folder(spec, data_dir)
    path = os.path.join(folder, DATA_FILE)
    if not os.path.isfile(path):
        raise UsageError(f"dataset {spec.name} not found under {folder} — run: {spec.create_command}")
    return spec, path
