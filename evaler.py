"""Evaluate checkpoints of a training run on the full test set (or training set).

    python evaler.py --checkpoint train_dir/<run>              # the run's latest checkpoint
    python evaler.py --checkpoint train_dir/<run>/model-400    # one checkpoint
    python evaler.py --checkpoint train_dir/<run> --all        # a line per checkpoint, TensorBoard
    python evaler.py --checkpoint train_dir/<run> --precise_bn 200   # BN with precise statistics
    python evaler.py --checkpoint train_dir/<run> --devices 2        # batches split over 2 replicas
    python evaler.py --checkpoint train_dir/<run> --split train      # the training error

The network and dataset are read from the run's config.json, so no training flag is repeated.
One checkpoint gets its loss, top-1 accuracy, per-class accuracy and confusion matrix; --all prints
one line per checkpoint (step, loss, accuracy) at the end, and the per-class details of each with
--verbose or --json.
"""
import argparse
import sys

import train_flags
import util


def parse_args(argv=None):
    parser = util.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="a run directory (its latest checkpoint) or a checkpoint prefix")
    parser.add_argument("--all", action="store_true",
                        help="evaluate every checkpoint of the run, print a table of their "
                             "steps, losses and accuracies, and write the test metrics to "
                             "TensorBoard (<run>/eval) at their steps")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("--data_dir", default=None,
                        help="where the dataset lives (default: the run's --data_dir)")
    parser.add_argument("--split", choices=("test", "train"), default="test",
                        help="the split to evaluate, every example once in inference mode; "
                             "train: the training error, without augmentation (default: "
                             "%(default)s)")
    parser.add_argument("--batch_size", type=int, default=100,
                        help="examples per evaluation batch (default: %(default)s)")
    parser.add_argument("--precise_bn", type=int, default=0, metavar="K",
                        help="before evaluating, replace BN's moving statistics by population "
                             "statistics over K training batches of the run's --batch_size "
                             "(the checkpoint is not changed; no effect without BN layers)")
    train_flags.add_device_flags(parser)
    util.add_verbose_flag(parser, also=", and with --all each checkpoint's per-class accuracy "
                                       "and confusion matrix")
    return parser.parse_args(argv)


util.check_flags_then_import_tensorflow(__name__, parse_args)

import json
import os

import tensorflow as tf
from tqdm import tqdm

import distribution
import input_ops
import runs
from util import UsageError


def checkpoints_to_evaluate(path, every):
    """The checkpoint prefixes named by --checkpoint (and --all, which reports the unreadable
    ones on stderr and leaves them out), oldest first."""
    latest = runs.resolve_checkpoint(path)
    if not every:
        return [latest]
    readable = []
    for prefix in runs.run_checkpoints(os.path.dirname(latest)):
        problem = runs.unreadable(prefix)
        if problem:
            print(f"warning: not evaluating {prefix}, which cannot be read ({problem})",
                  file=sys.stderr)
        else:
            readable.append(prefix)
    return readable


def precise_bn_note(result):
    return (f" (BN: precise statistics over {result['precise_bn']} batches)"
            if result["precise_bn"] else "")


def print_report(result):
    print(f"{result['checkpoint']} (step {result['step']}): {result['split']} loss "
          f"{result['loss']:.4f}, top-1 accuracy {100 * result['accuracy']:.2f}%"
          f"{precise_bn_note(result)}")
    names = list(result["per_class_accuracy"])
    width = max(len(name) for name in names)
    print("per-class accuracy:")
    for name, accuracy in result["per_class_accuracy"].items():
        print(f"  {name:>{width}}  {100 * accuracy:6.2f}%")
    print("confusion matrix (rows: true class, columns: predicted class):")
    print("  " + " " * width + "".join(f"{i:>6d}" for i in range(len(names))))
    for i, (name, row) in enumerate(zip(names, result["confusion_matrix"])):
        print(f"  {name:>{width}}" + "".join(f"{count:>6d}" for count in row) + f"   ({i})")


def print_table(run_dir, results):
    """--all: one line per checkpoint, oldest first."""
    print(f"{run_dir}, every checkpoint on the full {results[-1]['split']} set"
          f"{precise_bn_note(results[-1])}:")
    width = max(len("step"), *(len(str(result["step"])) for result in results))
    print(f"  {'step':>{width}}  {'loss':>7}  {'top-1':>7}")
    for result in results:
        print(f"  {result['step']:>{width}}  {result['loss']:7.4f}  "
              f"{100 * result['accuracy']:6.2f}%")


def write_summaries(run_dir, results):
    """Test loss and accuracy at each checkpoint's step (`train_*` on the training set), tagged
    `*_precise_bn` when BN's statistics were recomputed."""
    writer = tf.summary.create_file_writer(os.path.join(run_dir, "eval"))
    with writer.as_default():
        for result in results:
            prefix = "train_" if result["split"] == "train" else ""
            suffix = "_precise_bn" if result["precise_bn"] else ""
            for metric in ("loss", "accuracy"):
                tf.summary.scalar(prefix + metric + suffix, result[metric], step=result["step"])
    writer.close()


def main(argv=None):
    args = parse_args(argv)
    strategy = distribution.make_strategy(args.strategy, args.devices)
    if args.batch_size <= 0:
        raise UsageError(f"--batch_size must be positive, got {args.batch_size}")
    util.check_precise_bn_flag(args.precise_bn)
    prefixes = checkpoints_to_evaluate(args.checkpoint, args.all)
    config = runs.read_run_config(prefixes[-1])
    _, data = input_ops.load(config["dataset"], args.data_dir or config["data_dir"])
    dataset = input_ops.eval_dataset(data, args.batch_size, args.split)
    results = []
    progress_bar = args.all and not args.verbose  # on a terminal; not between printed reports
    for prefix in tqdm(prefixes, desc="evaluating", unit="checkpoint", leave=False,
                       disable=None if progress_bar else True):
        model = runs.restore_model(prefix, config, data, strategy)
        precise = args.precise_bn and runs.precise_batch_norm(model, config, data,
                                                                args.precise_bn)
        results.append(runs.report(prefix,
                                   *runs.evaluate(model, dataset, data.num_classes, strategy),
                                   data.class_names))
        results[-1].update(split=args.split, precise_bn=args.precise_bn if precise else 0)
        if not args.json and (args.verbose or not args.all):
            print_report(results[-1])
    run_dir = os.path.dirname(prefixes[-1])
    if args.all and distribution.is_chief(strategy):  # one writer in a multi-worker cluster
        write_summaries(run_dir, results)
    if args.json:
        print(json.dumps(results[-1] if len(results) == 1 and not args.all
                         else {"checkpoints": results}))
    elif args.all:
        print_table(run_dir, results)


if __name__ == "__main__":
    util.run_cli(main)
