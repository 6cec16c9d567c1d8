"""Export a training run's network for use outside this repo.

    python export.py --checkpoint train_dir/<run> --output exports/fashion_gn
    python export.py --checkpoint train_dir/<run> --output exports/fashion_gn --format tflite

<output>/ holds, for the formats asked for (default: all three):

    saved_model/   a SavedModel. Its signature serving_default takes uint8 images [N, H, W, C] of
                   the run's image size and returns `probabilities` [N, classes] (float32) and
                   `classes` [N] (int32); its signature class_names returns the class names.
                   Standard TensorFlow ops only: it loads with tf.saved_model.load wherever
                   TensorFlow runs, without this repo.
    model.tflite   serving_default converted by TensorFlow Lite's converter (the same inputs and
                   outputs), for LiteRT's interpreter (pip install ai-edge-litert) or TensorFlow's
                   tf.lite.Interpreter, which reads it too.
    model.keras    the Keras network itself (float32 images in [0, 1] -> logits), to fine-tune or
                   build on; keras.saving.load_model opens it where this repo is importable (its
                   layers are the repo's).
    labels.txt     the class names, one per line, in class order.
    export.json    what was exported: checkpoint, step, image shape, class names, the share of
                   an image's shorter side the run's evaluation crop keeps, files.

GroupNorm, Conv2D and LeakyReLU are traced with plain TensorFlow ops (ops.plain_ops()); BN uses its
moving statistics. Before anything is written, every format is checked against the checkpoint's
network on random images: the same top-1 class, probabilities within 1e-5 (1e-4 for TFLite).
"""
import argparse

import util

FORMATS = ("saved_model", "tflite", "keras")


def parse_args(argv=None):
    parser = util.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="a run directory (its latest checkpoint) or a checkpoint prefix")
    parser.add_argument("--output", required=True,
                        help="the directory to create for the export (must not exist)")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS),
                        help="what to write (default: all of them)")
    util.add_verbose_flag(parser)
    return parser.parse_args(argv)


util.check_flags_then_import_tensorflow(__name__, parse_args)

import contextlib
import json
import os
import warnings

import keras
import numpy as np
import tensorflow as tf

import input_ops
import ops
import runs
from util import UsageError, log

TOLERANCE = {"saved_model": 1e-5, "tflite": 1e-4, "keras": 1e-5}
CHECK_IMAGES = 8
# What predict.py reads from export.json.
EXPORT_KEYS = ("files", "image_shape", "num_classes", "class_names", "central_fraction")


def check_output(path):
    if os.path.exists(path):
        raise UsageError(f"--output {path} already exists — pass a new directory, or remove it")
    util.check_writable_directory(path, "--output")


def serving_function(model):
    """uint8 images -> {probabilities, classes}: the run's scaling, the network in inference mode
    (BN's moving statistics, no dropout), a float32 softmax."""
    def serve(images):
        logits = model(input_ops.scale_images(images), training=False)
        probabilities = tf.nn.softmax(tf.cast(logits, tf.float32))
        return {"probabilities": probabilities,
                "classes": tf.argmax(probabilities, axis=-1, output_type=tf.int32)}
    return serve


def write_saved_model(model, shape, path):
    """The SavedModel with signatures serving_default and class_names, traced with plain
    TensorFlow ops."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    images = tf.TensorSpec([None, *shape.image_shape], tf.uint8, name="images")
    with ops.plain_ops():
        archive.add_endpoint("serving_default", serving_function(model), input_signature=[images])
        names = tf.constant(shape.class_names)
        archive.add_endpoint("class_names", lambda: {"class_names": names}, input_signature=[])
        archive.write_out(path, verbose=False)


def write_tflite(saved_model, path):
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model,
                                                         signature_keys=["serving_default"])
    with open(path, "wb") as f:
        f.write(converter.convert())


# Reading an export back, as a user would -------------------------------------------------------

def saved_model_probabilities(path):
    """uint8 images -> probabilities, by the SavedModel at `path`."""
    serve = tf.saved_model.load(path).signatures["serving_default"]
    return lambda images: serve(images=tf.constant(images))["probabilities"].numpy()


def tflite_interpreter(path):
    """An interpreter of the TFLite file at `path`: LiteRT's, which TensorFlow recommends, when
    the ai-edge-litert package is installed, else TensorFlow's tf.lite.Interpreter (deprecated
    in its favour, its warning hidden), which reads the same files."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"\s*Warning: tf.lite.Interpreter is deprecated")
            return tf.lite.Interpreter(model_path=path)
    return Interpreter(model_path=path)


def tflite_probabilities(path):
    """uint8 images -> probabilities, by the TFLite file at `path` (see `tflite_interpreter`). The
    interpreter's INFO line on creating the CPU delegate is held back unless --verbose."""
    interpreter = tflite_interpreter(path)
    input_index = interpreter.get_input_details()[0]["index"]

    def probabilities(images):
        if tuple(interpreter.get_input_details()[0]["shape"]) != images.shape:
            interpreter.resize_tensor_input(input_index, images.shape)
        with quiet_unless_verbose():
            return interpreter.get_signature_runner("serving_default")(images=images)[
                "probabilities"]
    return probabilities


def keras_probabilities(path):
    """uint8 images -> probabilities, by the network in the .keras file at `path`."""
    network = keras.saving.load_model(path)
    return lambda images: tf.nn.softmax(tf.cast(
        network(input_ops.scale_images(images), training=False), tf.float32)).numpy()


READERS = {"saved_model": saved_model_probabilities, "tflite": tflite_probabilities,
           "keras": keras_probabilities}


def open_export(path):
    """(uint8 images -> probabilities, `runs.network_shape`) of an export: the directory
    export.py wrote (its SavedModel is read, or else its first other format) or one of the files
    in it."""
    folder = path if os.path.isfile(os.path.join(path, "export.json")) else \
        os.path.dirname(os.path.abspath(path))
    if not os.path.exists(path) or not os.path.isfile(os.path.join(folder, "export.json")):
        raise UsageError(f"--model {path} is not an export — pass a directory export.py wrote "
                         "(it holds export.json), or its saved_model/, model.tflite or "
                         "model.keras")
    with open(os.path.join(folder, "export.json")) as f:
        info = json.load(f)
    missing = [key for key in EXPORT_KEYS if key not in info]
    if missing:
        raise UsageError(f"--model {path}: its export.json lacks {', '.join(missing)} — export "
                         "the run again")
    files = {name: os.path.join(folder, info["files"][name])
             for name in FORMATS if name in info["files"]}
    files = {name: file for name, file in files.items() if os.path.exists(file)}
    if not files:
        raise UsageError(f"--model {path}: none of the files its export.json lists is there — "
                         "export the run again")
    named = [name for name, file in files.items() if os.path.samefile(file, path)]
    name = (named or list(files))[0]
    return READERS[name](files[name]), runs.network_shape(info)


def quiet_unless_verbose():
    """Holds back C++ libraries' stderr lines unless TensorFlow's logs were asked for."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "").strip() in ("", "0"):
        return contextlib.nullcontext()
    return util.stderr_held_back()


def check_against_checkpoint(model, shape, files):
    """Each written format on CHECK_IMAGES random images against the checkpoint's network (with
    its fast kernels): the same top-1 class, probabilities within TOLERANCE. Returns the largest
    difference per format."""
    images = np.random.default_rng(0).integers(0, 256, (CHECK_IMAGES, *shape.image_shape),
                                               dtype=np.uint8)
    expected = serving_function(model)(tf.constant(images))["probabilities"].numpy()
    differences = {}
    for name, path in files.items():
        probabilities = READERS[name](path)(images)
        differences[name] = float(np.abs(probabilities - expected).max())
        same_classes = np.array_equal(probabilities.argmax(-1), expected.argmax(-1))
        if not same_classes or differences[name] > TOLERANCE[name]:
            raise RuntimeError(f"the {name} export disagrees with the checkpoint (largest "
                               f"probability difference {differences[name]:.2e}, the same top-1 "
                               f"class: {same_classes}); nothing was written")
    return differences


def export(model, shape, formats, folder):
    """Writes `formats` into `folder`; returns {format: path}."""
    saved_model = os.path.join(folder, "saved_model")
    files = {"saved_model": saved_model, "tflite": os.path.join(folder, "model.tflite"),
             "keras": os.path.join(folder, "model.keras")}
    if "saved_model" in formats or "tflite" in formats:
        write_saved_model(model, shape, saved_model)
        log.info("wrote the SavedModel")
    if "tflite" in formats:
        write_tflite(saved_model, files["tflite"])
        log.info("converted it to TFLite")
    if "keras" in formats:
        model.save(files["keras"])
        log.info("wrote the Keras file")
    if "tflite" in formats and "saved_model" not in formats:  # written only to convert
        tf.io.gfile.rmtree(saved_model)
    with open(os.path.join(folder, "labels.txt"), "w") as f:
        f.writelines(name + "\n" for name in shape.class_names)
    return {name: files[name] for name in formats}


def main(argv=None):
    args = parse_args(argv)
    util.setup_logging()
    check_output(args.output)
    prefix, config, shape, model = runs.restore_run(args.checkpoint)
    formats = [name for name in FORMATS if name in args.format]
    with util.atomic_path(args.output, directory=True) as folder:
        files = export(model, shape, formats, folder)
        differences = check_against_checkpoint(model, shape, files)
        util.write_json(os.path.join(folder, "export.json"), {
            "checkpoint": prefix, "step": runs.checkpoint_step(prefix), "model": config["model"],
            "norm_type": config["norm_type"], "dataset": config["dataset"],
            "image_shape": list(shape.image_shape), "num_classes": shape.num_classes,
            "class_names": shape.class_names, "central_fraction": shape.central_fraction,
            "files": {name: os.path.relpath(path, folder) for name, path in files.items()},
            "largest_probability_difference": differences})
    for name, path in files.items():
        print(f"{name:12s} {os.path.join(args.output, os.path.relpath(path, folder))}  "
              f"(largest probability difference from the checkpoint {differences[name]:.1e})")


if __name__ == "__main__":
    util.run_cli(main)
