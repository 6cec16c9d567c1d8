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
IMAGE_TREE_FILE = "image_tree.json"

FASHION_CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                       "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


@dataclasses.dataclass(frozen=True)
class RawFile:
    """One file of a dataset as its authors publish it.

    Attributes:
        name: the published file name.
        checksum: "<algorithm>:<hex digest>" as published (sha256 or md5).
        gzip_payload: the checksum covers the decompressed content, because mirrors recompress
            the `.gz` container (Debian's Fashion-MNIST files differ byte-wise from Zalando's
            while the IDX payload is identical).
        option: the download.py flag that asks for this file; None when it is always needed.
    """
    name: str
    checksum: str
    gzip_payload: bool = False
    option: str | None = None

    @property
    def algorithm(self):
        return self.checksum.split(":")[0]

    @property
    def digest(self):
        return self.checksum.split(":")[1]

    @property
    def provenance_key(self):
        """The data.hdf5 attribute that records the digest: "<algorithm>:<name of what the
        checksum covers>", the file or its decompressed payload."""
        covered = self.name.removesuffix(".gz") if self.gzip_payload else self.name
        return f"{self.algorithm}:{covered}"


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
        mirrors: base URLs the raw files are downloaded from, tried in order.
        raw_files: the raw files with their published checksums.
        data_file: the file download.py writes: data.hdf5, or for a dataset streamed from an
            image tree (ImageNet) the JSON that points to the tree.
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
    mirrors: tuple = ()
    raw_files: tuple = ()
    data_file: str = DATA_FILE

    @property
    def streamed(self):
        return self.data_file == IMAGE_TREE_FILE


def _download(name):
    return f"python download.py --dataset {name}"


SAMPLE_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample")

def _idx_files(payload_sha256):
    """The four gzip-compressed IDX files of MNIST and Fashion-MNIST, checked by payload."""
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    return tuple(RawFile(name, f"sha256:{digest}", gzip_payload=True)
                 for name, digest in zip(names, payload_sha256))


MNIST_FILES = _idx_files((
    "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"))
FASHION_FILES = _idx_files((
    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"))
SVHN_FILES = (
    RawFile("train_32x32.mat", "md5:e26dedcc434d2e4c54c9b2d4a06d8373"),
    RawFile("test_32x32.mat", "md5:eb5a983be6a315427106f1b164d9cef3"),
    RawFile("extra_32x32.mat", "md5:a93ce644f1a588dc4d68dda5feec44a7", option="svhn_extra"),
)
CIFAR10_FILES = (
    RawFile("cifar-10-python.tar.gz",
            "sha256:6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"),)
CIFAR100_FILES = (
    RawFile("cifar-100-python.tar.gz",
            "sha256:85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"),)
TINY_IMAGENET_FILES = (RawFile("tiny-imagenet-200.zip", "md5:90528d7ca1a48142e341f4ef8d21d0de"),)

REGISTRY = {spec.name: spec for spec in [
    DatasetSpec("sample", "sample", 28, 1, 10, 5_000, False, "python datasets/make_sample.py",
                root=SAMPLE_ROOT),
    DatasetSpec("MNIST", "mnist", 28, 1, 10, 60_000, False, _download("MNIST"),
                mirrors=("https://storage.googleapis.com/cvdf-datasets/mnist/",
                         "https://ossci-datasets.s3.amazonaws.com/mnist/"),
                raw_files=MNIST_FILES),
    DatasetSpec("Fashion", "fashion", 28, 1, 10, 60_000, False, _download("Fashion"),
                mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
                raw_files=FASHION_FILES),
    DatasetSpec("SVHN", "svhn", 32, 3, 10, 73_257, False, _download("SVHN"),
                mirrors=("http://ufldl.stanford.edu/housenumbers/",), raw_files=SVHN_FILES),
    DatasetSpec("CIFAR10", "cifar10", 32, 3, 10, 50_000, True, _download("CIFAR10"),
                mirrors=("https://www.cs.toronto.edu/~kriz/",), raw_files=CIFAR10_FILES),
    DatasetSpec("CIFAR100", "cifar100", 32, 3, 100, 50_000, True, _download("CIFAR100"),
                mirrors=("https://www.cs.toronto.edu/~kriz/",), raw_files=CIFAR100_FILES),
    DatasetSpec("TinyImageNet", "tinyimagenet", 64, 3, 200, 100_000, True,
                _download("TinyImageNet"), mirrors=("http://cs231n.stanford.edu/",),
                raw_files=TINY_IMAGENET_FILES),
    DatasetSpec("ImageNet", "imagenet", 224, 3, 1000, 1_281_167, True,
                "python download.py --dataset ImageNet --imagenet_dir DIR",
                data_file=IMAGE_TREE_FILE),
]}


def find(name):
    """The registry entry called `name`, ignoring case (so `cifar10` is CIFAR10, not a user
    dataset that happens to share its folder), or None."""
    return next((spec for spec in REGISTRY.values() if spec.name.lower() == name.lower()), None)


def data_folder(spec, data_dir):
    return spec.root or os.path.join(data_dir, spec.subdir)


def locate(name, data_dir):
    """Returns (spec, path of its data file) for `--dataset name`; spec is None for a user's
    dataset.

    Raises UsageError when the name is unknown, a registry dataset has not been created yet, or
    `data_dir` is a file.
    """
    if os.path.isfile(data_dir):
        raise UsageError(f"--data_dir {data_dir} is a file — pass the directory download.py "
                         "writes datasets into")
    spec = find(name)
    if spec is None:
        path = os.path.join(data_dir, name, DATA_FILE)
        if os.path.isfile(path):
            return None, path
        raise UsageError(f"unknown dataset '{name}': choose one of {', '.join(REGISTRY)} "
                         f"or put your own {DATA_FILE} under {os.path.join(data_dir, name)}/")
    folder = data_folder(spec, data_dir)
    path = os.path.join(folder, spec.data_file)
    if not os.path.isfile(path):
        raise UsageError(f"dataset {spec.name} not found under {folder} — run: {spec.create_command}")
    return spec, path
