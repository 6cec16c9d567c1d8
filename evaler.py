"""Evaluate checkpoints of a training run on the full test set.

    python evaler.py --checkpoint train_dir/<run>              # the run's latest checkpoint
    python evaler.py --checkpoint train_dir/<run>/model-400    # one checkpoint
    python evaler.py --checkpoint train_dir/<run> --all        # every checkpoint, into TensorBoard

The network and dataset are read from the run's config.json, so no training flag is repeated.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up notices quiet

import argparse
import json

import numpy as np
import tensorflow as tf
from tqdm import tqdm

import input_ops
import model as model_lib
import util
from util import UsageError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="a run directory (its latest checkpoint) or a checkpoint prefix")
    parser.add_argument("--all", action="store_true",
                        help="evaluate every checkpoint of the run and write the test metrics "
                             "to TensorBoard (<run>/eval) at their steps")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("--data_dir", default=None,
                        help="where the dataset lives (default: the run's --data_dir)")
    parser.add_argument("--batch_size", type=int, default=100,
                        help="examples per evaluation batch (default: %(default)s)")
    return parser.parse_args(argv)


def evaluate(model, dataset, num_classes):
    """Mean cross-entropy, top-1 accuracy and confusion matrix [true, predicted] of `model` over
    every example of `dataset`, in inference mode."""
    total_loss, confusion = 0.0, np.zeros((num_classes, num_classes), np.int64)
    for images, labels in tqdm(dataset, desc="evaluating", leave=False, disable=None):
        logits = model(images, training=False)
        total_loss += float(tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels, logits)))
        np.add.at(confusion, (labels.numpy(), np.argmax(logits, axis=-1)), 1)
    count = confusion.sum()
    return total_loss / count, np.trace(confusion) / count, confusion


def checkpoints_to_evaluate(path, every):
    """The checkpoint prefixes named by --checkpoint (and --all), oldest first."""
    latest = util.resolve_checkpoint(path)
    if not every:
        return [latest]
    state = tf.train.get_checkpoint_state(os.path.dirname(latest))
    return list(state.all_model_checkpoint_paths)


def restore_model(prefix, config, data):
    model = model_lib.build_model(config["model"], data.image_shape, data.num_classes,
                                  config["norm_type"], config["groups"], config["weight_std"],
                                  config["dropout"])
    try:
        tf.train.Checkpoint(model=model).restore(prefix).expect_partial() \
            .assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as error:
        raise UsageError(f"checkpoint {prefix} does not match its run's config.json "
                         f"({str(error).strip().splitlines()[0]})") from None
    return model


def report(prefix, loss, accuracy, confusion, class_names):
    per_class = np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
    return {"checkpoint": prefix, "step": util.checkpoint_step(prefix), "loss": float(loss),
            "accuracy": float(accuracy),
            "per_class_accuracy": dict(zip(class_names, per_class.round(4).tolist())),
            "confusion_matrix": confusion.tolist()}


def print_report(result):
    print(f"{result['checkpoint']} (step {result['step']}): test loss {result['loss']:.4f}, "
          f"top-1 accuracy {100 * result['accuracy']:.2f}%")
    names = list(result["per_class_accuracy"])
    width = max(len(name) for name in names)
    print("per-class accuracy:")
    for name, accuracy in result["per_class_accuracy"].items():
        print(f"  {name:>{width}}  {100 * accuracy:6.2f}%")
    print("confusion matrix (rows: true class, columns: predicted class):")
    print("  " + " " * width + "".join(f"{i:>6d}" for i in range(len(names))))
    for i, (name, row) in enumerate(zip(names, result["confusion_matrix"])):
        print(f"  {name:>{width}}" + "".join(f"{count:>6d}" for count in row) + f"   ({i})")


def write_summaries(run_dir, results):
    writer = tf.summary.create_file_writer(os.path.join(run_dir, "eval"))
    with writer.as_default():
        for result in results:
            tf.summary.scalar("loss", result["loss"], step=result["step"])
            tf.summary.scalar("accuracy", result["accuracy"], step=result["step"])
    writer.close()


def main(argv=None):
    args = parse_args(argv)
    if args.batch_size <= 0:
        raise UsageError(f"--batch_size must be positive, got {args.batch_size}")
    prefixes = checkpoints_to_evaluate(args.checkpoint, args.all)
    config = util.read_run_config(prefixes[-1])
    _, data = input_ops.load(config["dataset"], args.data_dir or config["data_dir"])
    dataset = input_ops.eval_dataset(data, args.batch_size)
    results = []
    for prefix in prefixes:
        model = restore_model(prefix, config, data)
        results.append(report(prefix, *evaluate(model, dataset, data.num_classes),
                              data.class_names))
        if not args.json:
            print_report(results[-1])
    if args.all:
        write_summaries(os.path.dirname(prefixes[-1]), results)
    if args.json:
        print(json.dumps(results[-1] if len(results) == 1 and not args.all
                         else {"checkpoints": results}))


if __name__ == "__main__":
    util.run_cli(main)
