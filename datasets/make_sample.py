"""Builds the bundled sample: a class-balanced random subset of Fashion-MNIST.

    python datasets/make_sample.py            # writes datasets/sample/data.hdf5
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import util  # noqa: E402
from datasets import fetch, hdf5_format, idx, registry  # noqa: E402

RAW_FILES = {split: (f"{split}-images-idx3-ubyte.gz", f"{split}-labels-idx1-ubyte.gz")
             for split in ("train", "t10k")}
OUT_SPLITS = {"train": "train", "t10k": "test"}


def parse_args(argv):
    parser = util.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="/usr/share/datasets/fashion-mnist",
                        help="folder with the raw Fashion-MNIST .gz files (Debian package "
                             "dataset-fashion-mnist)")
    parser.add_argument("--out", default=os.path.join(registry.SAMPLE_ROOT, registry.DATA_FILE),
                        help="output file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset draw")
    parser.add_argument("--train_per_class", type=int, default=500,
                        help="train examples drawn per class")
    parser.add_argument("--test_per_class", type=int, default=100,
                        help="test examples drawn per class")
    return parser.parse_args(argv)


def balanced_subset(labels, per_class, rng):
    """Sorted indices of `per_class` examples of every class, drawn without replacement."""
    chosen = []
    for label in range(len(registry.FASHION_CLASS_NAMES)):
        candidates = np.flatnonzero(labels == label)
        if len(candidates) < per_class:
            raise util.UsageError(f"class {label} has {len(candidates)} examples, fewer than the "
                                  f"{per_class} asked for; lower --train_per_class/--test_per_class")
        chosen.append(rng.choice(candidates, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def main(argv=None):
    args = parse_args(argv)
    util.setup_logging()
    paths = {name: os.path.join(args.source, name) for pair in RAW_FILES.values() for name in pair}
    missing = [name for name, path in paths.items() if not os.path.isfile(path)]
    if missing:
        raise util.UsageError(f"Fashion-MNIST raw files not found in {args.source} (missing "
                              f"{', '.join(missing)}) — run: apt-get install dataset-fashion-mnist "
                              "(or pass --source)")
    rng = np.random.default_rng(args.seed)
    per_class = {"train": args.train_per_class, "t10k": args.test_per_class}
    splits = {}
    for split, (images_file, labels_file) in RAW_FILES.items():
        images = idx.read_idx(paths[images_file])
        labels = idx.read_idx(paths[labels_file])
        keep = balanced_subset(labels, per_class[split], rng)
        splits[OUT_SPLITS[split]] = (images[keep, :, :, None], labels[keep])
    provenance = {f"sha256:{name}": fetch.hex_digest(path) for name, path in paths.items()}
    hdf5_format.write_dataset(args.out, splits, registry.FASHION_CLASS_NAMES, provenance)
    util.log.info("wrote %s: %d train, %d test examples, %.2f MB", args.out,
                  len(splits["train"][1]), len(splits["test"][1]), os.path.getsize(args.out) / 1e6)


if __name__ == "__main__":
    util.run_cli(main)
