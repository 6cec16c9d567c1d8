"""Classify image files with a trained run or an export.

    python predict.py --checkpoint train_dir/<run> shirt.png boot.jpg
    python predict.py --model exports/fashion_gn photos/ --top_k 3 --json

Reads PNG, JPEG, BMP and GIF files (a GIF's first frame); a folder means every such file under it.
Each image becomes what the network takes: gray or RGB as the network's channels (RGB to gray by
ITU-R 601 luma, an alpha channel dropped), and the run's evaluation crop. For a run on images
stored at the network's size (MNIST, CIFAR, ...) an image of another size has its shorter side
resized to the network's size and its centre cropped; for a run on files streamed at their own
sizes (ImageNet) every image's shorter side becomes the size / 0.875 (256 px for 224) before the
central crop, as in evaluation. The network sees what it was trained on: a Fashion-MNIST network
knows light garments on a black background.

Prints the top-k classes with their probabilities per image, or with --json one object:
{"model": ..., "predictions": [{"file": ..., "top_k": [{"class", "index", "probability"}]}]}.
"""
import argparse
import sys

import util


def parse_args(argv=None):
    parser = util.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files, or folders whose images (searched recursively) are all "
                             "classified")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint",
                        help="a run directory (its latest checkpoint) or a checkpoint prefix")
    source.add_argument("--model",
                        help="a directory export.py wrote, or its saved_model/, model.tflite or "
                             "model.keras")
    parser.add_argument("--top_k", type=int, default=3,
                        help="how many classes to list per image (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("--batch_size", type=int, default=64,
                        help="images read and classified at a time (default: %(default)s)")
    util.add_verbose_flag(parser)
    return parser.parse_args(argv)


util.check_flags_then_import_tensorflow(__name__, parse_args)

import json
import os

import imageio.v3 as iio
import numpy as np
import tensorflow as tf
from tqdm import tqdm

import export
import runs
from util import UsageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def check_flags(args):
    if args.top_k < 1:
        raise UsageError(f"--top_k must be at least 1, got {args.top_k}")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be positive, got {args.batch_size}")


def image_files(arguments):
    """The files named, folders expanded to the image files under them (sorted), in order."""
    files = []
    for argument in arguments:
        if os.path.isdir(argument):
            found = sorted(os.path.join(folder, name)
                           for folder, _, names in os.walk(argument) for name in names
                           if name.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise UsageError(f"no PNG, JPEG, BMP or GIF file under {argument} — pass image "
                                 "files or a folder that holds some")
            files += found
        elif os.path.isfile(argument):
            files.append(argument)
        else:
            raise UsageError(f"{argument} does not exist — pass image files or folders")
    return files


def load_classifier(args):
    """(uint8 images -> probabilities, `runs.network_shape`, what was loaded)."""
    if args.model:
        return (*export.open_export(args.model), args.model)
    prefix, _, shape, model = runs.restore_run(args.checkpoint)
    serve = tf.function(export.serving_function(model), reduce_retracing=True)
    return lambda images: serve(tf.constant(images))["probabilities"].numpy(), shape, prefix


def read_image(path):
    """A file's pixels as uint8 [H, W, channels], or a one-line error."""
    try:
        image = iio.imread(path, index=0)
    except Exception:  # imageio's OSError when no plugin knows the contents, or a decoder's own
        raise UsageError(f"{path} cannot be read as an image (not a PNG, JPEG, BMP or GIF file, "
                         "or a damaged one) — pass image files") from None
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise UsageError(f"{path} holds {image.dtype} pixels of shape {image.shape}; pass 8- or "
                         "16-bit gray, RGB or RGBA images")
    return image if image.ndim == 3 else image[..., np.newaxis]


def to_channels(image, channels):
    """[H, W, 1 / 3 / 4] -> [H, W, channels]; returns (image, whether it was converted)."""
    image = image[..., :3] if image.shape[-1] == 4 else image  # drop alpha
    image = image[..., :1] if image.shape[-1] == 2 else image  # gray + alpha
    if image.shape[-1] == channels:
        return image, False
    if channels == 3:
        return np.repeat(image, 3, axis=-1), True
    gray = tf.image.rgb_to_grayscale(tf.cast(image, tf.float32))
    return tf.saturate_cast(tf.round(gray), tf.uint8).numpy(), True


def to_size(image, size, central_fraction=1.0):
    """The run's evaluation crop: resized (with antialiasing) so that `size` covers
    `central_fraction` of its shorter side, then the centre cropped; returns (image, whether it
    was resized). An image of the network's size is taken as it is where the fraction is 1."""
    height, width = image.shape[:2]
    if (height, width) == tuple(size) and central_fraction == 1:
        return image, False
    scale = max(size[0] / height, size[1] / width) / central_fraction
    resized_shape = (max(size[0], round(height * scale)), max(size[1], round(width * scale)))
    resized = tf.image.resize(image, resized_shape, antialias=True)
    top, left = (resized_shape[0] - size[0]) // 2, (resized_shape[1] - size[1]) // 2
    crop = resized[top:top + size[0], left:left + size[1]]
    return tf.saturate_cast(tf.round(crop), tf.uint8).numpy(), True


def prepare_image(path, shape):
    """(the image at `path` as the network of `shape` (`runs.network_shape`) takes it, uint8
    [H, W, C]; whether its channels were converted; whether it was resized)."""
    height, width, channels = shape.image_shape
    image, converted = to_channels(read_image(path), channels)
    image, resized = to_size(image, (height, width), shape.central_fraction)
    return image, converted, resized


def classify(files, probabilities, shape, batch_size):
    """The probabilities [N, classes] for `files`, read and classified `batch_size` at a time (so
    that a folder of any size fits in memory), saying once on stderr how many images were
    converted or resized."""
    outputs, converted, resized = [], 0, 0
    with tqdm(total=len(files), desc="classifying", leave=False, disable=None) as progress:
        for start in range(0, len(files), batch_size):
            images, batch_converted, batch_resized = zip(
                *(prepare_image(path, shape) for path in files[start:start + batch_size]))
            outputs.append(probabilities(np.stack(images)))
            converted += sum(batch_converted)
            resized += sum(batch_resized)
            progress.update(len(images))
    height, width, channels = shape.image_shape
    if converted:
        print(f"note: {converted} of {len(files)} images converted to "
              f"{'RGB' if channels == 3 else 'grayscale'}, as the network takes", file=sys.stderr)
    if resized:
        print(f"note: {resized} of {len(files)} images resized to {height}x{width} (shorter "
              "side, then the centre)", file=sys.stderr)
    return np.concatenate(outputs)


def top_classes(probabilities, class_names, k):
    """[{"class", "index", "probability"}] for the k most probable classes, most probable first."""
    best = np.argsort(-probabilities, kind="stable")[:k]
    return [{"class": class_names[i], "index": int(i), "probability": float(probabilities[i])}
            for i in best]


def main(argv=None):
    args = parse_args(argv)
    check_flags(args)
    files = image_files(args.images)
    probabilities, shape, source = load_classifier(args)
    if args.top_k > shape.num_classes:
        raise UsageError(f"--top_k {args.top_k} exceeds the {shape.num_classes} classes the "
                         "network tells apart")
    results = [{"file": path, "top_k": top_classes(p, shape.class_names, args.top_k)}
               for path, p in zip(files, classify(files, probabilities, shape, args.batch_size))]
    if args.json:
        print(json.dumps({"model": source, "predictions": results}))
        return
    width = max(len(path) for path in files)
    for result in results:
        print(f"{result['file']:<{width}}  " + "  ".join(
            f"{top['class']} {100 * top['probability']:.1f}%" for top in result["top_k"]))


if __name__ == "__main__":
    util.run_cli(main)
