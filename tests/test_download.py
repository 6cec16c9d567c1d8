"""download.py: every converter on generated raw files, verification, safety, errors, real data.

The raw files are written in their published formats by tests/raw_formats.py and read by the
real converters; only checksums of generated files differ from the published ones, so most tests
pass --no_verify or register the generated files' checksums in place of the published ones.
"""
import dataclasses
import functools
import gzip
import hashlib
import http.server
import os
import pickle
import subprocess
import sys
import tarfile
import threading
import zipfile

import h5py
import imageio.v3 as iio
import numpy as np
import pytest

import download
import raw_formats
from datasets import hdf5_format, registry
from util import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def convert(tmp_path, name, *flags, verify=False):
    """Runs download.py on the raw files in tmp_path/raw; returns the data read back."""
    argv = ["--dataset", name, "--source", str(tmp_path / "raw"),
            "--data_dir", str(tmp_path / "data"), *flags]
    download.main(argv + ([] if verify else ["--no_verify"]))
    spec = registry.find(name)
    return hdf5_format.read_dataset(data_file(tmp_path, name), spec)


def data_file(tmp_path, name):
    return str(tmp_path / "data" / registry.find(name).subdir / "data.hdf5")


def attrs(path):
    with h5py.File(path) as f:
        return {key: value for key, value in f.attrs.items()}


def register_generated_checksums(monkeypatch, name, folder):
    """Makes the registry expect the checksums of the generated files in `folder`."""
    spec = registry.REGISTRY[name]
    raw_files = tuple(dataclasses.replace(f, checksum=f"{f.algorithm}:{digest_of(folder, f)}")
                      for f in spec.raw_files)
    monkeypatch.setitem(registry.REGISTRY, name, dataclasses.replace(spec, raw_files=raw_files))


def digest_of(folder, raw_file):
    path = os.path.join(folder, raw_file.name)
    if not os.path.exists(path):
        return raw_file.digest
    with (gzip.open if raw_file.gzip_payload else open)(path, "rb") as f:
        return hashlib.new(raw_file.algorithm, f.read()).hexdigest()


# Converters on generated raw files --------------------------------------------------------------

@pytest.mark.parametrize("name", ["MNIST", "Fashion"])
def test_idx_datasets(tmp_path, name):
    raw = raw_formats.write_mnist_like(tmp_path / "raw")
    data = convert(tmp_path, name)
    np.testing.assert_array_equal(data.train_images[..., 0], raw["train"][0])
    np.testing.assert_array_equal(data.test_labels, raw["t10k"][1])
    np.testing.assert_array_equal(data.train_images[0], raw_formats.pattern(28, 28, 1))
    assert data.train_images.shape == (12, 28, 28, 1) and data.train_images.dtype == np.uint8
    assert data.num_classes == 10
    expected_names = registry.FASHION_CLASS_NAMES if name == "Fashion" else map(str, range(10))
    assert data.class_names == list(expected_names)
    payload = gzip.decompress((tmp_path / "raw" / "train-images-idx3-ubyte.gz").read_bytes())
    assert attrs(data_file(tmp_path, name))["sha256:train-images-idx3-ubyte"] == \
        hashlib.sha256(payload).hexdigest()


def test_svhn_maps_label_10_to_0_and_keeps_orientation(tmp_path, monkeypatch):
    raw = raw_formats.write_svhn(tmp_path / "raw")
    register_generated_checksums(monkeypatch, "SVHN", tmp_path / "raw")
    data = convert(tmp_path, "SVHN", verify=True)
    np.testing.assert_array_equal(data.train_images, raw["train"][0])
    np.testing.assert_array_equal(data.train_images[0], raw_formats.pattern(32, 32, 3))
    np.testing.assert_array_equal(data.test_labels, raw["test"][1])
    assert 0 in data.test_labels and data.test_labels.max() == 9
    assert (data.num_train, data.num_test, data.num_classes) == (12, 8, 10)

    with_extra = convert(tmp_path, "SVHN", "--svhn_extra", verify=True)
    np.testing.assert_array_equal(with_extra.train_images[12:], raw["extra"][0])
    assert with_extra.num_train == 17
    assert "md5:extra_32x32.mat" in attrs(data_file(tmp_path, "SVHN"))
    assert convert(tmp_path, "SVHN", verify=True).num_train == 12  # not taken as up to date


@pytest.mark.parametrize("numpy1", [True, False], ids=["numpy1-pickles", "numpy2-pickles"])
def test_cifar10_keeps_rows_columns_and_channels(tmp_path, numpy1):
    raw = raw_formats.write_cifar10(tmp_path / "raw", numpy1=numpy1)
    with tarfile.open(tmp_path / "raw" / "cifar-10-python.tar.gz") as tar:
        batch = tar.extractfile("cifar-10-batches-py/data_batch_1").read()
    assert (b"cnumpy.core.multiarray\n_reconstruct" in batch) == numpy1
    data = convert(tmp_path, "CIFAR10")
    np.testing.assert_array_equal(data.train_images[0], raw_formats.pattern(32, 32, 3))
    np.testing.assert_array_equal(data.train_images, raw["train"][0])
    np.testing.assert_array_equal(data.test_labels, raw["test"][1])
    assert (data.num_train, data.num_test) == (20, 6)
    assert data.class_names == [f"class{i}" for i in range(10)]


def test_cifar100_fine_and_coarse_labels(tmp_path):
    images, fine, coarse = raw_formats.write_cifar100(tmp_path / "raw")
    data = convert(tmp_path, "CIFAR100")
    np.testing.assert_array_equal(data.train_images, images)
    np.testing.assert_array_equal(data.train_labels, fine[:10])
    assert data.num_classes == 100 and data.class_names[7] == "fine7"
    assert attrs(data_file(tmp_path, "CIFAR100"))["labels"] == "fine"

    coarse_data = convert(tmp_path, "CIFAR100", "--cifar100_labels", "coarse")
    np.testing.assert_array_equal(coarse_data.train_labels, coarse[:10])
    assert coarse_data.num_classes == 20 and coarse_data.class_names[3] == "coarse3"
    assert attrs(data_file(tmp_path, "CIFAR100"))["labels"] == "coarse"


def test_tinyimagenet_labels_names_gray_and_orientation(tmp_path):
    raw_formats.write_tinyimagenet(tmp_path / "raw")
    data = convert(tmp_path, "TinyImageNet")
    assert data.train_images.shape == (9, 64, 64, 3) and data.test_images.shape == (4, 64, 64, 3)
    assert data.class_names == ["goldfish", "shark", "tench"]  # sorted wnids n01, n02, n03
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert data.test_labels.tolist() == [0, 1, 2, 0]
    for image in (data.train_images[0], data.test_images[0]):  # `blocks`, through JPEG
        assert_same_quadrants(image, raw_formats.blocks(64, 64))
    gray = data.train_images[7]  # n03_1 was stored with one channel
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])


def assert_same_quadrants(image, expected):
    """Each quadrant's mean colour within a few levels: JPEG blurs only the edges between them."""
    def quadrant_means(x):
        half = x.shape[0] // 2
        halves = (slice(0, half), slice(half, None))
        return [x[rows, cols].reshape(-1, 3).mean(axis=0) for rows in halves for cols in halves]
    np.testing.assert_allclose(quadrant_means(image), quadrant_means(expected), atol=12)


# Image-folder trees -----------------------------------------------------------------------------

def write_folder_tree(root, gray_class=None, size=(6, 5)):
    """root/{train,test}/{cat,dog}/*.png; train/cat/0.png is `pattern`."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 2)):
        for name in ("dog", "cat"):
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(count):
                image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                if (split, name, i) == ("train", "cat", 0):
                    image = raw_formats.pattern(*size, 3)
                if name == gray_class:
                    image = image[..., 0]
                iio.imwrite(root / split / name / f"{i}.png", image)


def test_from_folder(tmp_path):
    write_folder_tree(tmp_path / "tree", gray_class="dog")
    download.main(["--from_folder", str(tmp_path / "tree"), "--name", "pets",
                   "--data_dir", str(tmp_path / "data")])
    data = hdf5_format.read_dataset(str(tmp_path / "data" / "pets" / "data.hdf5"), None)
    assert data.class_names == ["cat", "dog"]
    assert data.train_images.shape == (6, 6, 5, 3) and data.test_images.shape == (4, 6, 5, 3)
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(data.train_images[0], raw_formats.pattern(6, 5, 3))
    dog = data.train_images[3]  # a gray image among colour ones: repeated to 3 channels
    assert np.array_equal(dog[..., 0], dog[..., 2])


def test_from_folder_all_gray_stays_one_channel(tmp_path):
    root = tmp_path / "tree"
    for split in ("train", "test"):
        os.makedirs(root / split / "a")
        iio.imwrite(root / split / "a" / "0.png", raw_formats.pattern(4, 4, 1)[..., 0])
    download.main(["--from_folder", str(root), "--name", "gray", "--data_dir", str(tmp_path)])
    data = hdf5_format.read_dataset(str(tmp_path / "gray" / "data.hdf5"), None)
    assert data.image_shape == (4, 4, 1)


@pytest.mark.parametrize("damage, message", [
    ("unreadable", "cannot read image .*test/cat/1.png"),
    ("resized", r"is 7x6 pixels but .* is 5x6; resize the images to one size"),
    ("no_test", "test not found: --from_folder expects"),
    ("new_test_class", "has classes bird that train/ lacks"),
])
def test_from_folder_errors(tmp_path, damage, message):
    root = tmp_path / "tree"
    write_folder_tree(root)
    if damage == "unreadable":
        (root / "test" / "cat" / "1.png").write_bytes(b"not a png")
    elif damage == "resized":
        iio.imwrite(root / "train" / "dog" / "2.png", np.zeros((6, 7, 3), np.uint8))
    elif damage == "no_test":
        os.rename(root / "test", root / "elsewhere")
    else:
        os.makedirs(root / "test" / "bird")
    with pytest.raises(UsageError, match=message):
        download.main(["--from_folder", str(root), "--name", "x", "--data_dir", str(tmp_path)])
    assert not (tmp_path / "x").exists()


# Verification, skipping and redoing -------------------------------------------------------------

def test_verified_source_then_skip_then_redo(tmp_path, monkeypatch, caplog):
    raw_formats.write_mnist_like(tmp_path / "raw")
    register_generated_checksums(monkeypatch, "MNIST", tmp_path / "raw")
    convert(tmp_path, "MNIST", verify=True)
    out = data_file(tmp_path, "MNIST")
    first = os.stat(out).st_mtime_ns

    convert(tmp_path, "MNIST", verify=True)
    assert os.stat(out).st_mtime_ns == first
    assert "is up to date" in caplog.text

    with open(out, "r+b") as f:  # a half-written file is redone
        f.truncate(os.path.getsize(out) // 2)
    convert(tmp_path, "MNIST", verify=True)
    assert hdf5_format.read_dataset(out, None).num_train == 12


def test_recompressed_gzip_with_the_same_payload_verifies(tmp_path, monkeypatch):
    raw_formats.write_mnist_like(tmp_path / "published", level=9)
    register_generated_checksums(monkeypatch, "Fashion", tmp_path / "published")
    raw_formats.write_mnist_like(tmp_path / "raw", level=1)  # same IDX bytes, other container
    assert (tmp_path / "raw" / "train-images-idx3-ubyte.gz").read_bytes() != \
        (tmp_path / "published" / "train-images-idx3-ubyte.gz").read_bytes()
    assert convert(tmp_path, "Fashion", verify=True).num_train == 12


def test_checksum_mismatch_is_refused_and_nothing_written(tmp_path, monkeypatch):
    raw_formats.write_mnist_like(tmp_path / "raw")
    register_generated_checksums(monkeypatch, "MNIST", tmp_path / "raw")
    labels = tmp_path / "raw" / "t10k-labels-idx1-ubyte.gz"
    payload = bytearray(gzip.decompress(labels.read_bytes()))
    payload[-1] ^= 1
    labels.write_bytes(gzip.compress(bytes(payload)))
    with pytest.raises(UsageError, match=r"t10k-labels-idx1-ubyte.gz: sha256 of its decompressed "
                                         r"content is [0-9a-f]{64}, not the published"):
        convert(tmp_path, "MNIST", verify=True)
    assert not (tmp_path / "data").exists()


def test_published_checksums_refuse_generated_files(tmp_path):
    raw_formats.write_cifar10(tmp_path / "raw")
    with pytest.raises(UsageError, match="sha256 of its file is [0-9a-f]{64}, not the published "
                                         "6d958be0"):
        convert(tmp_path, "CIFAR10", verify=True)


def test_missing_source_file(tmp_path):
    os.makedirs(tmp_path / "raw")
    with pytest.raises(UsageError, match="train_32x32.mat not found in --source"):
        convert(tmp_path, "SVHN")
    assert not (tmp_path / "data").exists()


def test_missing_debian_folder_says_which_package_to_install(tmp_path):
    """Run as a command, with the folder Debian's dataset-fashion-mnist installs moved to a path
    that does not exist (on a machine with the package, the real one does)."""
    debian_dir = str(tmp_path / "usr" / "share" / "datasets" / "fashion-mnist")
    script = ("import sys, download, util; download.DEBIAN_SOURCES = "
              "{sys.argv[1]: 'dataset-fashion-mnist'}; util.run_cli(lambda: "
              "download.main(sys.argv[2:]))")
    result = subprocess.run([sys.executable, "-c", script, debian_dir, "--dataset", "Fashion",
                             "--source", debian_dir + "/", "--data_dir", str(tmp_path / "data")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --source {debian_dir}/ is not a folder — install Debian's package that puts the "
        "files there: apt-get install dataset-fashion-mnist (with sudo if you are not root), or "
        "drop --source to download them"]
    assert not (tmp_path / "data").exists()
    assert download.DEBIAN_SOURCES[FASHION_DIR] == "dataset-fashion-mnist"


# Downloads --------------------------------------------------------------------------------------

class _Server(http.server.SimpleHTTPRequestHandler):
    cut_short = False

    def log_message(self, *args):
        pass

    def copyfile(self, source, outputfile):
        data = source.read()
        outputfile.write(data[:len(data) // 2] if self.cut_short else data)


@pytest.fixture
def mirror(tmp_path):
    """An HTTP server on localhost serving tmp_path/published; yields its base URL."""
    os.makedirs(tmp_path / "published")
    handler = functools.partial(_Server, directory=str(tmp_path / "published"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    _Server.cut_short = False


def use_mirror(monkeypatch, name, url):
    spec = registry.REGISTRY[name]
    monkeypatch.setitem(registry.REGISTRY, name, dataclasses.replace(spec, mirrors=(url,)))


def test_download_verifies_caches_and_retries_an_interrupted_file(tmp_path, monkeypatch, mirror):
    raw_formats.write_cifar10(tmp_path / "published")
    register_generated_checksums(monkeypatch, "CIFAR10", tmp_path / "published")
    use_mirror(monkeypatch, "CIFAR10", mirror)
    argv = ["--dataset", "CIFAR10", "--data_dir", str(tmp_path / "data")]
    raw_dir = tmp_path / "data" / "cifar10" / "raw"

    _Server.cut_short = True
    with pytest.raises(UsageError, match=r"cannot download cifar-10-python.tar.gz from "
                                         r".*connection closed after .* — .* --source DIR"):
        download.main(argv)
    assert not (tmp_path / "data").exists()

    _Server.cut_short = False
    download.main(argv)
    assert os.listdir(raw_dir) == ["cifar-10-python.tar.gz"]
    assert hdf5_format.read_dataset(data_file(tmp_path, "CIFAR10"), None).num_train == 20


def test_corrupt_download_is_not_kept(tmp_path, monkeypatch, mirror):
    raw_formats.write_cifar10(tmp_path / "published")
    use_mirror(monkeypatch, "CIFAR10", mirror)  # published checksum: the generated file differs
    with pytest.raises(UsageError, match="the download of cifar-10-python.tar.gz: sha256"):
        download.main(["--dataset", "CIFAR10", "--data_dir", str(tmp_path / "data")])
    assert not (tmp_path / "data").exists()


def test_unreachable_host_says_to_use_source_and_leaves_nothing(tmp_path, monkeypatch):
    use_mirror(monkeypatch, "MNIST", "http://127.0.0.1:9/")
    (tmp_path / "data" / "fashion").mkdir(parents=True)  # folders made before stay
    with pytest.raises(UsageError, match=r"cannot download train-images-idx3-ubyte.gz from "
                                         r"http://127.0.0.1:9/.* pass its folder with --source"):
        download.main(["--dataset", "MNIST", "--data_dir", str(tmp_path / "data")])
    assert os.listdir(tmp_path / "data") == ["fashion"]


def test_failed_download_keeps_only_the_files_already_verified(tmp_path, monkeypatch, mirror):
    """The mirror lacks the second file: the first, complete and verified, stays in raw/ for the
    next run, which downloads the rest."""
    raw_formats.write_mnist_like(tmp_path / "published")
    register_generated_checksums(monkeypatch, "MNIST", tmp_path / "published")
    use_mirror(monkeypatch, "MNIST", mirror)
    labels = tmp_path / "published" / "train-labels-idx1-ubyte.gz"
    os.rename(labels, tmp_path / "elsewhere.gz")
    argv = ["--dataset", "MNIST", "--data_dir", str(tmp_path / "data")]
    with pytest.raises(UsageError, match="cannot download train-labels-idx1-ubyte.gz"):
        download.main(argv)
    assert os.listdir(tmp_path / "data") == ["mnist"]
    assert os.listdir(tmp_path / "data" / "mnist") == ["raw"]
    assert os.listdir(tmp_path / "data" / "mnist" / "raw") == ["train-images-idx3-ubyte.gz"]
    os.rename(tmp_path / "elsewhere.gz", labels)
    download.main(argv)
    assert hdf5_format.read_dataset(data_file(tmp_path, "MNIST"), None).num_train == 12


# Safety -----------------------------------------------------------------------------------------

def symlink_to(target):
    def info(name):
        entry = tarfile.TarInfo(name)
        entry.type, entry.linkname = tarfile.SYMTYPE, target
        return entry
    return info


@pytest.mark.parametrize("member, content, message", [
    ("cifar-10-batches-py/../../escaped", b"x", "member .*escaped points outside"),
    ("/tmp/absolute", b"x", "member /tmp/absolute is an absolute path"),
    ("cifar-10-batches-py/link", symlink_to("../../../etc/passwd"), "link .* points outside"),
    ("cifar-10-batches-py/abs_link", symlink_to("/etc/passwd"), "link .* is an absolute path"),
])
def test_tar_with_members_outside_is_refused(tmp_path, member, content, message):
    raw_formats.write_cifar10(tmp_path / "good")
    with tarfile.open(tmp_path / "good" / "cifar-10-python.tar.gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    os.makedirs(tmp_path / "raw")
    raw_formats.write_tar(tmp_path / "raw" / "cifar-10-python.tar.gz", {**members, member: content})
    with pytest.raises(UsageError, match=f"refusing .*cifar-10-python.tar.gz: {message}"):
        convert(tmp_path, "CIFAR10")
    assert not (tmp_path / "escaped").exists() and not os.path.exists("/tmp/absolute")


def test_zip_with_parent_member_is_refused(tmp_path):
    raw_formats.write_tinyimagenet(tmp_path / "raw")
    with zipfile.ZipFile(tmp_path / "raw" / "tiny-imagenet-200.zip", "a") as archive:
        archive.writestr("tiny-imagenet-200/../../evil.txt", "x")
    with pytest.raises(UsageError, match="refusing .*member tiny-imagenet-200/../../evil.txt "
                                         "points outside"):
        convert(tmp_path, "TinyImageNet")
    assert not (tmp_path / "evil.txt").exists()


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_calls_os_system_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    raw_formats.write_cifar10(tmp_path / "good")
    with tarfile.open(tmp_path / "good" / "cifar-10-python.tar.gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    members["cifar-10-batches-py/data_batch_1"] = pickle.dumps(
        {b"data": _RunsCode(marker), b"labels": [0]}, protocol=3)
    os.makedirs(tmp_path / "raw")
    raw_formats.write_tar(tmp_path / "raw" / "cifar-10-python.tar.gz", members)
    with pytest.raises(UsageError, match=r"refusing to unpickle .*data_batch_1: it references "
                                         r"(posix|os|nt)\.system"):
        convert(tmp_path, "CIFAR10")  # checksums waived: the unpickler alone must stop it
    assert not marker.exists()


# Command line -----------------------------------------------------------------------------------

def test_cli_one_line_error_and_datasets_alias(tmp_path):
    result = subprocess.run([sys.executable, "download.py", "--datasets", "MNIST", "NoSuchSet",
                             "--data_dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown dataset 'NoSuchSet': choose from MNIST, Fashion, SVHN, CIFAR10, CIFAR100, "
        "TinyImageNet, ImageNet (or convert your own with --from_folder DIR --name NAME)"]


def test_disk_full_leaves_no_half_file(tmp_path):
    """A file-size limit makes the write fail the way a full disk does."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        os.makedirs(tmp_path / "tree" / split / "a")
        for i in range(20):
            iio.imwrite(tmp_path / "tree" / split / "a" / f"{i}.png",
                        rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    script = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (40000, 40000)); "
              "sys.argv = ['download.py'] + sys.argv[1:]; runpy.run_path('download.py', "
              "run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", script, "--from_folder", str(tmp_path / "tree"),
                             "--name", "big", "--data_dir", str(tmp_path / "data")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: no space left while writing {tmp_path / 'data' / 'big' / 'data.hdf5'}")
    assert not (tmp_path / "data").exists()


# Real data --------------------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.isdir(FASHION_DIR),
                    reason="needs Debian's dataset-fashion-mnist (apt-get install it)")
def test_real_fashion_mnist_from_debian(tmp_path):
    download.main(["--dataset", "Fashion", "--source", FASHION_DIR, "--data_dir", str(tmp_path)])
    data = hdf5_format.read_dataset(str(tmp_path / "fashion" / "data.hdf5"), None)
    assert (data.num_train, data.num_test) == (60_000, 10_000)
    assert np.bincount(data.train_labels).tolist() == [6_000] * 10
    assert np.bincount(data.test_labels).tolist() == [1_000] * 10
    assert abs(data.train_images.mean() / 255 - 0.2860) <= 0.0005


# Every dataset trains after its converter ran ---------------------------------------------------

WRITERS = {
    "MNIST": raw_formats.write_mnist_like,
    "Fashion": raw_formats.write_mnist_like,
    "SVHN": raw_formats.write_svhn,
    "CIFAR10": raw_formats.write_cifar10,
    "CIFAR100": raw_formats.write_cifar100,
    "TinyImageNet": raw_formats.write_tinyimagenet,
}


@pytest.mark.parametrize("name", WRITERS)
def test_every_dataset_trains_after_conversion(tmp_path, name):
    import trainer  # TensorFlow only for this test

    WRITERS[name](tmp_path / "raw")
    convert(tmp_path, name)
    # The default model at 64 px is the 2018 ImageNet ResNet: a minute for these 20 steps.
    model = ["--model", "conv"] if name == "TinyImageNet" else []
    trainer.main([*model, "--dataset", name, "--data_dir", str(tmp_path / "data"),
                  "--train_dir", str(tmp_path / "runs"), "--max_training_step", "20",
                  "--batch_size", "4", "--max_batch_size", "4", "--log_step", "10",
                  "--test_sample_step", "10", "--write_summary_step", "10",
                  "--ckpt_save_step", "20"])
    [run] = os.listdir(tmp_path / "runs")
    assert os.path.exists(tmp_path / "runs" / run / "model-20.index")
