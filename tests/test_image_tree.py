"""ImageNet streamed from its JPEG files: the image_tree.json pointer, the tf.data pipelines over
the files, and trainer.py / evaler.py end to end, on a tiny ILSVRC-style tree written to a
temporary folder."""
import glob
import json
import os
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import tensorflow as tf

import download
import evaler
import input_ops
import trainer
from datasets import image_tree
from test_data import assert_same_batches, take
from util import UsageError

# Made in this order so that listing by creation order would not give the sorted class indices.
WNIDS = ("n01443537", "n01440764", "n01484850")
COLORS = {wnid: label for label, wnid in enumerate(sorted(WNIDS))}  # the bright channel of a class
SIZES = ((40, 56), (64, 48))


def colored(size, channel):
    """A uniform image whose `channel` is bright and the others dark."""
    image = np.full((*size, 3), 30, np.uint8)
    image[..., channel] = 220
    return image


def write_tree(root, train_per_class=3, val_per_class=2):
    """ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/*.JPEG, each image colored by its class, plus
    the files real trees hold: a grayscale and a CMYK JPEG, a PNG under a .JPEG name, a .jpg, a
    stray non-image file."""
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for wnid in WNIDS:
            folder = os.path.join(root, split, wnid)
            os.makedirs(folder)
            for i in range(count):
                iio.imwrite(os.path.join(folder, f"{wnid}_{i}.JPEG"),
                            colored(SIZES[i % 2], COLORS[wnid]), extension=".jpeg", quality=95)
    train = os.path.join(root, "train")
    iio.imwrite(os.path.join(train, WNIDS[0], "gray.JPEG"), np.full((48, 40), 90, np.uint8),
                extension=".jpeg")
    cmyk = np.zeros((40, 56, 4), np.uint8)
    cmyk[..., 1:3] = 200  # red once decoded: the color of its class
    iio.imwrite(os.path.join(train, WNIDS[1], "cmyk.jpeg"), cmyk, extension=".jpeg", mode="CMYK")
    iio.imwrite(os.path.join(train, WNIDS[2], "png.JPEG"), colored((40, 40), COLORS[WNIDS[2]]),
                extension=".png")
    iio.imwrite(os.path.join(train, WNIDS[2], "small.jpg"), colored((40, 40), COLORS[WNIDS[2]]),
                extension=".jpeg")
    with open(os.path.join(train, WNIDS[2], "README.txt"), "w") as f:
        f.write("not an image\n")
    return root


@pytest.fixture(scope="module")
def tree_root(tmp_path_factory):
    return write_tree(str(tmp_path_factory.mktemp("ilsvrc")))


@pytest.fixture(scope="module")
def tree(tree_root, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "image_tree.json")
    image_tree.write_tree_file(path, tree_root)
    return image_tree.read_tree(path, image_size=32)


# The tree file ----------------------------------------------------------------------------------

def test_write_and_read_tree(tree_root, tmp_path):
    path = str(tmp_path / "imagenet" / "image_tree.json")
    image_tree.write_tree_file(path, tree_root)
    with open(path) as f:
        recorded = json.load(f)
    assert recorded == {"root": tree_root, "class_names": sorted(WNIDS), "num_train": 13,
                        "num_test": 6}
    assert os.listdir(tmp_path / "imagenet") == ["image_tree.json"]

    tree = image_tree.read_tree(path, image_size=224)
    assert (tree.num_train, tree.num_test, tree.num_classes) == (13, 6, 3)
    assert tree.class_names == sorted(WNIDS) and tree.image_shape == (224, 224, 3)
    assert list(tree.train_files) == sorted(tree.train_files)
    assert not any(name.endswith(".txt") for name in tree.train_files)
    for files, labels in ((tree.train_files, tree.train_labels),
                          (tree.test_files, tree.test_labels)):
        assert labels.dtype == np.int32
        assert [tree.class_names.index(f.split(os.sep)[-2]) for f in files] == labels.tolist()
    assert tree.test_labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_imagenet_is_found_by_the_registry(tree_root, tmp_path):
    with pytest.raises(UsageError, match="run: python download.py --dataset ImageNet "
                                         "--imagenet_dir DIR"):
        input_ops.load("ImageNet", str(tmp_path))
    image_tree.write_tree_file(str(tmp_path / "imagenet" / "image_tree.json"), tree_root)
    spec, data = input_ops.load("imagenet", str(tmp_path))
    assert spec.name == "ImageNet" and isinstance(data, image_tree.ImageTree)
    assert data.image_shape == (224, 224, 3)


def remove_val(root):
    shutil.rmtree(os.path.join(root, "val"))


def empty_a_train_class(root):
    for path in glob.glob(os.path.join(root, "train", WNIDS[2], "*.*[gG]")):
        os.remove(path)  # README.txt stays: it is no image


def add_a_val_class(root):
    os.makedirs(os.path.join(root, "val", "n09999999"))


def flatten_val(root):
    for folder in glob.glob(os.path.join(root, "val", "*")):
        for path in glob.glob(os.path.join(folder, "*")):
            shutil.move(path, os.path.join(root, "val"))
        os.rmdir(folder)


@pytest.mark.parametrize("damage, message", [
    (remove_val, r"has no val/ folder — expected ROOT/train/<wnid>/\*.JPEG and "
                 r"ROOT/val/<wnid>/\*.JPEG, the validation images sorted into class folders"),
    (empty_a_train_class, r"train/n01484850 holds no .JPEG files — put the class's images there "
                          "or remove the folder"),
    (add_a_val_class, "val/n09999999 is not a class of .*train — name every val folder after a "
                      "train folder"),
    (flatten_val, "val holds no class folders — expected ROOT/train"),
])
def test_write_refuses_another_layout(damage, message, tmp_path):
    root = write_tree(str(tmp_path / "tree"), train_per_class=1, val_per_class=1)
    damage(root)
    with pytest.raises(UsageError, match=message):
        image_tree.write_tree_file(str(tmp_path / "image_tree.json"), root)
    assert not os.path.exists(tmp_path / "image_tree.json")


def test_read_refuses_a_moved_or_changed_tree(tmp_path):
    root = write_tree(str(tmp_path / "tree"), train_per_class=1, val_per_class=1)
    path = str(tmp_path / "image_tree.json")
    image_tree.write_tree_file(path, root)
    extra = os.path.join(root, "val", WNIDS[0], "extra.JPEG")
    iio.imwrite(extra, colored((40, 40), 0), extension=".jpeg")
    with pytest.raises(UsageError, match=r"holds 3 classes, 7 train and 4 val images, not what "
                                         r".* recorded — re-run: python download.py"):
        image_tree.read_tree(path, 224)
    os.remove(extra)
    shutil.move(root, str(tmp_path / "moved"))
    with pytest.raises(UsageError, match=r"tree .*tree named in .* is gone — re-run: python "
                                         r"download.py --dataset ImageNet --imagenet_dir DIR"):
        image_tree.read_tree(path, 224)


# Pipelines --------------------------------------------------------------------------------------

def assert_colors_match_labels(images, labels):
    """Each class's images are bright in the channel of its label (the grayscale one aside)."""
    for image, label in zip(images, labels):
        color = image.mean(axis=(0, 1))
        assert np.ptp(color) < 0.05 or np.argmax(color) == label


@pytest.mark.parametrize("augment", [False, True])
def test_train_dataset_batches(tree, augment):
    dataset = input_ops.train_dataset(tree, 4, seed=1, augment=augment)
    assert dataset.element_spec[0].shape == (4, 32, 32, 3)
    batches = take(dataset, 8)  # 32 examples: over two epochs of 13
    for images, labels in batches:
        assert images.dtype == np.float32 and labels.dtype == np.int32
        assert images.min() >= 0.0 and images.max() <= 1.0
        assert_colors_match_labels(images, labels)
    assert_same_batches(batches, take(input_ops.train_dataset(tree, 4, 1, augment), 8))
    other = take(input_ops.train_dataset(tree, 4, seed=2, augment=augment), 8)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(batches, other))


def test_permuted_indices_cover_every_example_each_epoch():
    positions = [int(i) for i in input_ops._permuted_indices(7, seed=3).take(21)]
    epochs = [positions[:7], positions[7:14], positions[14:]]
    assert all(sorted(epoch) == list(range(7)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3  # reshuffled each epoch


def one_image_tree(tree, path, image_size):
    """`tree` with the image at `path` as its only train and test example."""
    files, labels = np.array([path], dtype=object), np.zeros(1, np.int32)
    return image_tree.ImageTree(files, labels, files, labels, tree.num_classes, tree.class_names,
                                image_size)


def white_left(path, height, width, columns):
    """Writes a JPEG that is white left of `columns` and black from there on."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, :columns] = 255
    iio.imwrite(path, image, extension=".jpeg", quality=95)
    return path


def test_random_crops_move_and_flip(tree, tmp_path):
    tf.random.set_seed(0)  # Dataset.random's stream also depends on the global seed
    single = one_image_tree(tree, white_left(str(tmp_path / "half.JPEG"), 64, 64, 32), 16)
    images = np.concatenate([x for x, _ in take(input_ops.train_dataset(single, 1, 0, True), 100)])
    brightness = images.mean(axis=(1, 2, 3))
    assert brightness.min() < 0.1 and brightness.max() > 0.9  # some crops within one half
    left, right = images[:, :, :4].mean(axis=(1, 2, 3)), images[:, :, -4:].mean(axis=(1, 2, 3))
    assert (left > right + 0.5).any() and (right > left + 0.5).any()  # flipped and not


def test_train_iterator_checkpoint_round_trip(tree, tmp_path):
    dataset = input_ops.train_dataset(tree, 3, seed=5, augment=True)
    iterator = iter(dataset)
    for _ in range(4):
        next(iterator)
    path = tf.train.Checkpoint(iterator=iterator).save(str(tmp_path / "ckpt"))
    expected = [tuple(t.numpy() for t in next(iterator)) for _ in range(6)]  # into the next epoch
    restored = iter(dataset)
    tf.train.Checkpoint(iterator=restored).restore(path).assert_consumed()
    assert_same_batches(expected, [tuple(t.numpy() for t in next(restored)) for _ in range(6)])
    saved = sum(os.path.getsize(p) for p in glob.glob(path + "*"))
    assert saved < 3 * 32 * 32 * 3, "the stream's position is saved, not the images it buffers"


def test_eval_dataset_covers_val_once_in_order(tree):
    batches = take(input_ops.eval_dataset(tree, 4), 100)
    assert [len(y) for _, y in batches] == [4, 2]
    images = np.concatenate([x for x, _ in batches])
    labels = np.concatenate([y for _, y in batches])
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.float32
    np.testing.assert_array_equal(labels, tree.test_labels)
    assert_colors_match_labels(images, labels)


def test_eval_crop_keeps_the_central_square_in_place(tree, tmp_path):
    """A 48 x 64 image, white left of column 16: resized to 256 x 341 (shorter side 224 / 0.875),
    the edge is at column 85.3, and 58 columns are cut on the left, so it lands at 27.3."""
    single = one_image_tree(tree, white_left(str(tmp_path / "edge.JPEG"), 48, 64, 16), 224)
    ((image, _),) = take(input_ops.eval_dataset(single, 1), 1)
    assert image.shape == (1, 224, 224, 3)
    assert image[0, :, :24].min() > 0.9 and image[0, :, 31:].max() < 0.1


def test_test_sample_dataset_is_endless(tree):
    batches = take(input_ops.test_sample_dataset(tree, 4, seed=0), 5)
    assert len(batches) == 5 and all(x.shape == (4, 32, 32, 3) for x, _ in batches)
    for images, labels in batches:
        assert_colors_match_labels(images, labels)


# trainer.py and evaler.py -----------------------------------------------------------------------

def test_train_continue_and_evaluate_on_imagenet(tree_root, tmp_path, capsys):
    data_dir = tmp_path / "data"
    download.main(["--dataset", "ImageNet", "--imagenet_dir", tree_root,
                   "--data_dir", str(data_dir)])
    train_dir = tmp_path / "train_dir"
    flags = ["--dataset", "ImageNet", "--data_dir", str(data_dir), "--train_dir", str(train_dir),
             "--batch_size", "2", "--max_batch_size", "2", "--model", "conv", "--log_step", "1",
             "--test_sample_step", "2", "--write_summary_step", "1"]
    trainer.main([*flags, "--max_training_step", "3"])
    (run_dir,) = glob.glob(str(train_dir / "*"))
    assert os.path.basename(run_dir).startswith("default-ImageNet_lr_0.001_bs_2_norm_type_group")
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    assert config["augment"] is True  # ImageNet's default
    assert config["central_fraction"] == 0.875  # predict.py crops as evaluation does
    assert tf.train.latest_checkpoint(run_dir).endswith("model-3")

    trainer.main([*flags, "--max_training_step", "4", "--checkpoint", run_dir])
    (continued,) = set(glob.glob(str(train_dir / "*"))) - {run_dir}
    assert tf.train.latest_checkpoint(continued).endswith("model-4")

    evaler.main(["--checkpoint", continued, "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 4 and 0 <= result["accuracy"] <= 1
    assert np.array(result["confusion_matrix"]).sum() == 6
    assert list(result["per_class_accuracy"]) == sorted(WNIDS)
