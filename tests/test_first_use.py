"""What a new user meets first: the example images predict.py is shown with, evaler.py --all's
summary table, and the same numbers from the same command."""
import json
import os
import re
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import tensorflow as tf

import evaler
import input_ops
import trainer
from datasets import registry
from test_train_eval import TINY, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "datasets", "examples")
EXAMPLE_FILES = sorted(name for name in os.listdir(EXAMPLES) if not name.endswith(".md"))


# datasets/examples/ -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample():
    return input_ops.load("sample", registry.DEFAULT_DATA_DIR)[1]


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_image_is_the_first_test_image_of_its_class(name, sample):
    """shirt.png is the sample's first Shirt test image, pixel for pixel; a JPEG within the few
    levels its compression (quality 95) costs."""
    class_name = os.path.splitext(name)[0].replace("_", " ").capitalize()
    first = np.flatnonzero(sample.test_labels == sample.class_names.index(class_name))[0]
    expected = sample.test_images[first, ..., 0]
    image = iio.imread(os.path.join(EXAMPLES, name))
    assert image.shape == expected.shape == (28, 28) and image.dtype == np.uint8
    if name.endswith(".png"):
        np.testing.assert_array_equal(image, expected)
    else:
        difference = np.abs(image.astype(int) - expected)
        assert difference.max() <= 10 and difference.mean() <= 1.5, (difference.max(),
                                                                     difference.mean())


def test_readme_names_example_files_that_exist():
    with open(os.path.join(REPO, "README.md")) as f:
        named = re.findall(r"datasets/examples/([\w.]+)", f.read())
    assert named and all(os.path.isfile(os.path.join(EXAMPLES, name)) for name in named), named


# evaler.py --all --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run with checkpoints at steps 3 and 6."""
    return train(tmp_path_factory.mktemp("run"))


def test_evaler_all_prints_one_table_at_the_end(run_dir, capsys):
    evaler.main(["--checkpoint", run_dir, "--all", "--json"])
    results = json.loads(capsys.readouterr().out)["checkpoints"]
    process = subprocess.run([sys.executable, "evaler.py", "--checkpoint", run_dir, "--all"],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr
    lines = process.stdout.splitlines()
    assert lines[:2] == [f"{run_dir}, every checkpoint on the full test set:",
                         "  step     loss    top-1"]
    assert len(lines) == 2 + len(results) == 4
    for line, result in zip(lines[2:], results):
        step, loss, accuracy = line.split()
        assert int(step) == result["step"]
        assert float(loss) == pytest.approx(result["loss"], abs=5e-5)
        assert float(accuracy.rstrip("%")) == pytest.approx(100 * result["accuracy"], abs=5e-3)


def test_evaler_all_verbose_adds_each_checkpoints_details(run_dir, capsys):
    evaler.main(["--checkpoint", run_dir, "--all", "--verbose"])
    out = capsys.readouterr().out
    assert out.count("per-class accuracy:") == out.count("confusion matrix") == 2
    assert out.index("(step 3)") < out.index("(step 6)") < out.index("every checkpoint on")
    assert out.splitlines()[-1].split()[0] == "6"


# The same command, the same numbers -------------------------------------------------------------

def test_the_same_training_twice_gives_bit_identical_checkpoints(tmp_path):
    """Two identical runs in one process: every variable of their last checkpoints (weights, GN
    parameters, optimizer slots, step, input position, dropout seeds) is equal, bit for bit, and
    so are their test results. Not compared: the measured training time, and the object graph,
    which names the second run's Python objects adam_1, seed_generator_4, ..."""
    prefixes = [str(tmp_path / name / "model-6") for name in ("first", "second")]
    for prefix in prefixes:
        trainer.main([*TINY, "--run_dir", os.path.dirname(prefix)])
    first, second = (checkpoint_entries(prefix) for prefix in prefixes)
    assert first.keys() == second.keys()
    compared = [name for name in first
                if not name.startswith(("train_seconds/", "_CHECKPOINTABLE_OBJECT_GRAPH"))]
    assert len(compared) == len(first) - 2
    assert any(name.startswith("optimizer/") for name in compared)
    assert any(name.startswith("streams/input/") for name in compared)
    for name in compared:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    first, second = (read_json(tmp_path / name / "result.json") for name in ("first", "second"))
    assert (first["loss"], first["accuracy"]) == (second["loss"], second["accuracy"])


def checkpoint_entries(prefix):
    """{name: value} of everything a checkpoint stores; the input iterator's state, a variant
    that the checkpoint reader cannot convert to NumPy, as its serialized bytes."""
    reader = tf.train.load_checkpoint(prefix)
    entries = {}
    for name, dtype in reader.get_variable_to_dtype_map().items():
        if dtype == tf.variant:
            [state] = tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=[name],
                                           shape_and_slices=[""], dtypes=[dtype])
            entries[name] = tf.io.serialize_tensor(state).numpy()
        else:
            entries[name] = reader.get_tensor(name)
    return entries


def read_json(path):
    with open(path) as f:
        return json.load(f)


# Flags before TensorFlow ------------------------------------------------------------------------

CLIS = ("trainer.py", "evaler.py", "export.py", "predict.py", "study.py", "download.py")


@pytest.fixture(scope="module")
def without_tensorflow(tmp_path_factory):
    """An environment in which importing TensorFlow fails loudly."""
    folder = tmp_path_factory.mktemp("no_tensorflow")
    os.makedirs(folder / "tensorflow")
    (folder / "tensorflow" / "__init__.py").write_text(
        "raise RuntimeError('TensorFlow was imported')\n")
    return {**os.environ, "PYTHONPATH": str(folder)}


@pytest.mark.parametrize("script", CLIS)
def test_a_mistyped_flag_and_help_answer_before_tensorflow_is_imported(script,
                                                                       without_tensorflow):
    """Each CLI checks its flags, and answers --help, without importing TensorFlow (which takes
    seconds): here importing it would fail."""
    typo = subprocess.run([sys.executable, script, "--bogus_flag"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env=without_tensorflow)
    assert typo.returncode == 2
    assert typo.stderr.startswith("error: ") and len(typo.stderr.splitlines()) == 1, typo.stderr
    assert "--bogus_flag" in typo.stderr or "required" in typo.stderr
    help_text = subprocess.run([sys.executable, script, "--help"], cwd=REPO,
                               capture_output=True, text=True, timeout=60,
                               env=without_tensorflow)
    assert help_text.returncode == 0 and "usage:" in help_text.stdout, help_text.stderr
