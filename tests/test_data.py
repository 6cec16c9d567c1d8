"""Data layer: HDF5 format (both layouts), IDX reader, bundled sample builder, registry, pipelines.

Every file here is written in its real on-disk format to a temporary folder and read back with
the production readers.
"""
import dataclasses
import gzip
import hashlib
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import tensorflow as tf

import input_ops
from datasets import hdf5_format, idx, make_sample, registry
from raw_formats import write_idx
from util import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_data(num_train=12, num_test=10, size=8, channels=3, num_classes=5, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_train + num_test, size, size, channels), dtype=np.uint8)
    labels = rng.integers(0, num_classes, num_train + num_test).astype(np.int32)
    return hdf5_format.ImageData(images[:num_train], labels[:num_train], images[num_train:],
                                 labels[num_train:], num_classes,
                                 [f"c{i}" for i in range(num_classes)])


def write_per_id(folder, images, labels, num_classes, ids):
    """Writes the 2018 layout: one group per id with `image` and one-hot `label`, plus id.txt."""
    os.makedirs(folder, exist_ok=True)
    with h5py.File(os.path.join(folder, "data.hdf5"), "w") as f:
        for id_, image, label in zip(ids, images, labels):
            f.create_group(id_)
            f[id_]["image"] = image
            f[id_]["label"] = np.eye(num_classes)[label]
    with open(os.path.join(folder, "id.txt"), "w") as f:
        f.write("".join(id_ + "\n" for id_ in ids))


# HDF5 format ------------------------------------------------------------------------------------

def test_write_read_round_trip(tmp_path):
    data = random_data()
    path = str(tmp_path / "data.hdf5")
    splits = {"train": (data.train_images, data.train_labels),
              "test": (data.test_images, data.test_labels)}
    hdf5_format.write_dataset(path, splits, data.class_names, {"sha256:raw.bin": "ab" * 32})

    back = hdf5_format.read_dataset(path, None)
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(back, name), getattr(data, name))
    assert back.train_images.dtype == np.uint8 and back.train_labels.dtype == np.int32
    assert (back.num_classes, back.class_names) == (5, data.class_names)
    with h5py.File(path) as f:
        assert sorted(f) == ["test", "train"]
        assert f["train/labels"].dtype == np.int64
        for dataset in (f["train/images"], f["train/labels"]):
            assert dataset.chunks is not None
            assert dataset.compression == "gzip"
        assert f.attrs["sha256:raw.bin"] == "ab" * 32
    assert os.listdir(tmp_path) == ["data.hdf5"]


def test_per_id_layout_registry_split(tmp_path, monkeypatch):
    mnist = dataclasses.replace(registry.REGISTRY["MNIST"], num_train=8)
    monkeypatch.setitem(registry.REGISTRY, "MNIST", mnist)
    rng = np.random.default_rng(1)
    images = rng.random((11, 6, 6, 1)).astype(np.float32)
    labels = rng.integers(0, 10, 11)
    ids = [f"id{i}" for i in (3, 0, 10, 7, 1, 9, 2, 8, 4, 6, 5)]
    write_per_id(tmp_path / "mnist", images, labels, 10, ids)

    spec, data = input_ops.load("MNIST", str(tmp_path))
    assert spec is mnist
    expected = np.rint(images * 255).astype(np.uint8)
    np.testing.assert_array_equal(data.train_images, expected[:8])
    np.testing.assert_array_equal(data.test_images, expected[8:])
    np.testing.assert_array_equal(data.train_labels, labels[:8])
    np.testing.assert_array_equal(data.test_labels, labels[8:])
    assert data.num_classes == 10 and data.class_names == [str(i) for i in range(10)]


def test_per_id_layout_user_dataset_split(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (25, 5, 5), dtype=np.uint8)  # grayscale without channel axis
    labels = rng.integers(0, 3, 25)
    write_per_id(tmp_path / "mine", images, labels, 3, [f"x{24 - i}" for i in range(25)])

    spec, data = input_ops.load("mine", str(tmp_path))
    assert spec is None
    assert (len(data.train_labels), len(data.test_labels)) == (22, 3)  # floor(0.9 * 25) = 22
    np.testing.assert_array_equal(data.train_images[..., 0], images[:22])
    np.testing.assert_array_equal(data.test_labels, labels[22:])
    assert data.train_images.shape == (22, 5, 5, 1) and data.num_classes == 3


def test_per_id_layout_without_id_txt(tmp_path):
    write_per_id(tmp_path, np.zeros((4, 2, 2, 1), np.uint8), [0, 1, 0, 1], 2, list("abcd"))
    os.remove(tmp_path / "id.txt")
    with pytest.raises(UsageError, match="id.txt is missing"):
        hdf5_format.read_dataset(str(tmp_path / "data.hdf5"), None)


def test_unreadable_and_unknown_layout(tmp_path):
    garbage = tmp_path / "garbage.hdf5"
    garbage.write_bytes(b"not hdf5")
    with pytest.raises(UsageError, match="cannot read .* as HDF5.*python download.py"):
        hdf5_format.read_dataset(str(garbage), registry.REGISTRY["CIFAR10"])
    other = tmp_path / "other.hdf5"
    with h5py.File(other, "w") as f:
        f["something"] = np.zeros(3)
    with pytest.raises(UsageError, match="neither train/test groups nor the 2018 per-id layout"):
        hdf5_format.read_dataset(str(other), None)


def test_labels_outside_the_classes_are_refused(tmp_path):
    data = random_data(num_classes=3)
    shifted = np.arange(len(data.train_labels)) % 3 + 1  # 1..3: one past the last class
    path = str(tmp_path / "data.hdf5")
    hdf5_format.write_dataset(path, {"train": (data.train_images, shifted),
                                     "test": (data.test_images, data.test_labels)},
                              ["a", "b", "c"], {})
    with pytest.raises(UsageError, match="labels run from 1 to 3 but num_classes is 3"):
        hdf5_format.read_dataset(path, None)


# IDX --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress):
    array = np.arange(2 * 3 * 4, dtype=np.int32).reshape(2, 3, 4) - 7
    write_idx(tmp_path / "a.idx", array, compress)
    back = idx.read_idx(str(tmp_path / "a.idx"))
    np.testing.assert_array_equal(back, array)
    assert back.dtype == np.int32


def test_idx_corrupt_files(tmp_path):
    (tmp_path / "magic.gz").write_bytes(gzip.compress(b"\x01\x02\x08\x01" + bytes(8)))
    with pytest.raises(UsageError, match="not an IDX file"):
        idx.read_idx(str(tmp_path / "magic.gz"))
    write_idx(tmp_path / "short", np.zeros((4, 3), np.uint8), compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-2])
    with pytest.raises(UsageError, match="truncated or corrupt"):
        idx.read_idx(str(tmp_path / "short"))
    (tmp_path / "broken.gz").write_bytes(gzip.compress(b"\0\0\x08\x01" + bytes(20))[:-6])
    with pytest.raises(UsageError, match="broken gzip data"):
        idx.read_idx(str(tmp_path / "broken.gz"))


# Bundled sample builder -------------------------------------------------------------------------

def write_fake_fashion(folder, per_class):
    rng = np.random.default_rng(3)
    for split, count in per_class.items():
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), count))
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)


def test_make_sample_is_balanced(tmp_path):
    write_fake_fashion(tmp_path, {"train": 4, "t10k": 3})
    out = str(tmp_path / "out" / "data.hdf5")
    make_sample.main(["--source", str(tmp_path), "--out", out,
                      "--train_per_class", "3", "--test_per_class", "2"])
    data = hdf5_format.read_dataset(out, None)
    assert np.bincount(data.train_labels).tolist() == [3] * 10
    assert np.bincount(data.test_labels).tolist() == [2] * 10
    assert data.class_names == list(registry.FASHION_CLASS_NAMES)
    with h5py.File(out) as f:
        raw = tmp_path / "t10k-labels-idx1-ubyte.gz"
        assert f.attrs["sha256:t10k-labels-idx1-ubyte.gz"] == hashlib.sha256(raw.read_bytes()).hexdigest()


def test_make_sample_errors(tmp_path):
    with pytest.raises(UsageError, match="raw files not found .* apt-get install dataset-fashion-mnist"):
        make_sample.main(["--source", str(tmp_path / "none")])
    write_fake_fashion(tmp_path, {"train": 2, "t10k": 2})
    with pytest.raises(UsageError, match="fewer than the 5 asked for"):
        make_sample.main(["--source", str(tmp_path), "--out", str(tmp_path / "o.hdf5"),
                          "--train_per_class", "5"])


def test_make_sample_runs_as_script():
    result = subprocess.run([sys.executable, "datasets/make_sample.py", "--help"], cwd=REPO,
                            capture_output=True, text=True, check=True)
    assert "--train_per_class" in result.stdout


# Registry ---------------------------------------------------------------------------------------

def test_locate_errors(tmp_path):
    with pytest.raises(UsageError) as error:
        registry.locate("Nope", str(tmp_path))
    assert "unknown dataset 'Nope': choose one of sample, MNIST, Fashion, SVHN" in str(error.value)
    assert os.path.join(str(tmp_path), "Nope") in str(error.value)
    with pytest.raises(UsageError) as error:
        registry.locate("CIFAR10", "./datasets")
    assert str(error.value) == ("dataset CIFAR10 not found under ./datasets/cifar10 — "
                                "run: python download.py --dataset CIFAR10")


def test_locate_ignores_case_of_registry_names(tmp_path):
    spec, path = registry.locate("sample", str(tmp_path))
    assert registry.locate("SAMPLE", str(tmp_path)) == (spec, path)
    assert path == os.path.join(REPO, "datasets", "sample", "data.hdf5")


# Pipelines --------------------------------------------------------------------------------------

def take(dataset, count):
    return [(x.numpy(), y.numpy()) for x, y in dataset.take(count)]


def assert_same_batches(a, b):
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


@pytest.mark.parametrize("augment", [False, True])
def test_train_dataset_batches(augment):
    data = random_data(num_train=10)
    batches = take(input_ops.train_dataset(data, 4, seed=1, augment=augment), 6)
    for images, labels in batches:
        assert images.shape == (4, 8, 8, 3) and images.dtype == np.float32
        assert labels.shape == (4,) and labels.dtype == np.int32
        assert images.min() >= 0.0 and images.max() <= 1.0
    spec = input_ops.train_dataset(data, 4, seed=1, augment=augment).element_spec
    assert spec[0].shape == (4, 8, 8, 3)  # drop_remainder gives a static batch size
    assert_same_batches(batches, take(input_ops.train_dataset(data, 4, 1, augment), 6))
    other = take(input_ops.train_dataset(data, 4, seed=2, augment=augment), 6)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(batches, other))


def test_train_dataset_epochs_cover_every_example():
    data = random_data(num_train=12, num_classes=12)
    data.train_labels = np.arange(12, dtype=np.int32)
    labels = np.concatenate([y for _, y in take(input_ops.train_dataset(data, 4, 0, False), 6)])
    assert sorted(labels[:12]) == list(range(12)) and sorted(labels[12:]) == list(range(12))
    assert not np.array_equal(labels[:12], labels[12:])  # reshuffled each epoch


def test_augmentation_is_a_padded_crop_maybe_flipped():
    data = random_data(num_train=16, size=6, num_classes=16)
    data.train_labels = np.arange(16, dtype=np.int32)
    padded = np.pad(data.train_images, [(0, 0), (4, 4), (4, 4), (0, 0)]).astype(np.float32) / 255
    flips_seen = set()
    for images, labels in take(input_ops.train_dataset(data, 8, 0, augment=True), 4):
        for image, label in zip(images, labels):
            crops = {(dy, dx, flip): padded[label, dy:dy + 6, dx:dx + 6][:, ::-1 if flip else 1]
                     for dy in range(9) for dx in range(9) for flip in (False, True)}
            matches = [key for key, crop in crops.items() if np.array_equal(crop, image)]
            assert matches, f"example {label} is not a crop of its padded image"
            flips_seen.add(matches[0][2])
    assert flips_seen == {False, True}


def test_train_iterator_checkpoint_round_trip(tmp_path):
    dataset = input_ops.train_dataset(random_data(num_train=10), 3, seed=5, augment=True)
    iterator = iter(dataset)
    for _ in range(4):
        next(iterator)
    path = tf.train.Checkpoint(iterator=iterator).save(str(tmp_path / "ckpt"))
    expected = [tuple(t.numpy() for t in next(iterator)) for _ in range(5)]
    restored = iter(dataset)
    tf.train.Checkpoint(iterator=restored).restore(path).assert_consumed()
    assert_same_batches(expected, [tuple(t.numpy() for t in next(restored)) for _ in range(5)])


def test_eval_dataset_covers_test_split_once_in_order():
    data = random_data(num_test=10)
    batches = take(input_ops.eval_dataset(data, 4), 100)
    assert [len(y) for _, y in batches] == [4, 4, 2]
    images = np.concatenate([x for x, _ in batches])
    np.testing.assert_array_equal(images, data.test_images.astype(np.float32) / 255)
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), data.test_labels)


def test_test_sample_dataset_is_endless_shuffled_test_batches():
    data = random_data(num_test=10)
    batches = take(input_ops.test_sample_dataset(data, 4, seed=0), 5)
    assert len(batches) == 5 and all(x.shape == (4, 8, 8, 3) for x, _ in batches)
    test_set = {image.tobytes() for image in data.test_images}
    assert all((x * 255).round().astype(np.uint8)[0].tobytes() in test_set for x, _ in batches)


def resident_bytes():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) * 1024


def test_pipelines_hold_no_copy_of_the_images():
    """The train, test-sample and evaluation pipelines gather from the arrays read from disk;
    a copy of the 200 MB of images (tf.constant made two) would show in the resident memory."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50_000, 64, 64, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, 50_000).astype(np.int32)
    data = hdf5_format.ImageData(images, labels, images, labels, 10, list("0123456789"))
    before = resident_bytes()
    pipelines = [input_ops.train_dataset(data, 32, seed=0, augment=True),
                 input_ops.test_sample_dataset(data, 32, seed=0),
                 input_ops.eval_dataset(data, 32)]
    for pipeline in pipelines:
        next(iter(pipeline))
    assert resident_bytes() - before < images.nbytes / 4


# Bundled sample ---------------------------------------------------------------------------------

def test_bundled_sample():
    spec, path = registry.locate(registry.DEFAULT_DATASET, "./unused")
    assert os.path.getsize(path) <= 3_000_000
    data = hdf5_format.read_dataset(path, spec)
    assert data.train_images.shape == (5000, 28, 28, 1) and data.test_images.shape == (1000, 28, 28, 1)
    assert data.train_images.dtype == np.uint8
    assert np.bincount(data.train_labels).tolist() == [500] * 10
    assert np.bincount(data.test_labels).tolist() == [100] * 10
    assert (spec.image_size, spec.channels, spec.num_classes) == (28, 1, 10)
