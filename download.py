"""Downloads, verifies and converts datasets into <data_dir>/<name>/data.hdf5.

    python download.py --dataset MNIST Fashion SVHN CIFAR10 CIFAR100 TinyImageNet
    python download.py --dataset Fashion --source /usr/share/datasets/fashion-mnist
    python download.py --dataset ImageNet --imagenet_dir /data/ILSVRC2012
    python download.py --from_folder my_images --name Flowers

Every raw file is checked against its published checksum before it is used. A dataset whose
data.hdf5 already records those checksums is skipped. The Fashion-MNIST files of the second
command come offline from Debian's package: apt-get install dataset-fashion-mnist.
"""
import argparse
import contextlib
import os
import time

from datasets import converters, fetch, hdf5_format, image_tree, registry
import util
from util import UsageError, log

CONVERTERS = {
    "MNIST": converters.convert_mnist,
    "Fashion": converters.convert_fashion,
    "SVHN": converters.convert_svhn,
    "CIFAR10": converters.convert_cifar10,
    "CIFAR100": converters.convert_cifar100,
    "TinyImageNet": converters.convert_tinyimagenet,
}
DOWNLOADABLE = (*CONVERTERS, "ImageNet")
# Folders where a Debian package installs a dataset's raw files (for --source): the package.
DEBIAN_SOURCES = {"/usr/share/datasets/fashion-mnist": "dataset-fashion-mnist"}


def parse_args(argv=None):
    parser = util.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--dataset", "--datasets", dest="datasets", nargs="+", metavar="NAME",
                        help=f"datasets to prepare: {', '.join(DOWNLOADABLE)}")
    parser.add_argument("--data_dir", default=registry.DEFAULT_DATA_DIR,
                        help="folder that holds one subfolder per dataset")
    parser.add_argument("--source", metavar="DIR",
                        help="take the raw files from DIR instead of downloading them (still "
                             "verified)")
    parser.add_argument("--no_verify", action="store_true",
                        help="use raw files whose checksum differs from the published one (only "
                             "for files you made or trust)")
    parser.add_argument("--force", action="store_true",
                        help="convert again even when data.hdf5 is up to date")
    parser.add_argument("--svhn_extra", action="store_true",
                        help="SVHN: add the 531,131 'extra' images to the train split")
    parser.add_argument("--cifar100_labels", choices=("fine", "coarse"), default="fine",
                        help="CIFAR100: the 100 fine classes or the 20 coarse superclasses")
    parser.add_argument("--imagenet_dir", metavar="DIR",
                        help="ImageNet: an ILSVRC-2012 folder with train/<wnid>/*.JPEG and "
                             "val/<wnid>/*.JPEG; it is streamed, not converted")
    parser.add_argument("--from_folder", metavar="DIR",
                        help="convert an image-folder tree DIR/train/<class>/*, DIR/test/<class>/* "
                             "(png, jpg, ...) into <data_dir>/NAME/data.hdf5; needs --name")
    parser.add_argument("--name", help="dataset name for --from_folder (then --dataset NAME)")
    args = parser.parse_args(argv)
    if bool(args.from_folder) == bool(args.datasets):
        parser.error("pass either --dataset NAME ... or --from_folder DIR --name NAME")
    if args.from_folder and not args.name:
        parser.error("--from_folder needs --name NAME, the name you will train with")
    return args


def specs_for(names):
    """Registry entries for `names`; UsageError for a name download.py cannot prepare."""
    specs = []
    for name in names:
        spec = registry.find(name)
        if spec is None or spec.name not in DOWNLOADABLE:
            raise UsageError(f"unknown dataset '{name}': choose from {', '.join(DOWNLOADABLE)} "
                             "(or convert your own with --from_folder DIR --name NAME)")
        specs.append(spec)
    return specs


def wanted_files(spec, args):
    """The raw files of `spec`, with the optional ones the flags ask for."""
    return [f for f in spec.raw_files if f.option is None or getattr(args, f.option)]


def options_of(spec, args):
    """Converter options that change the data, recorded in data.hdf5 beside the checksums."""
    return {"labels": args.cifar100_labels} if spec.name == "CIFAR100" else {}


def prepare(spec, args):
    """Verifies and converts one dataset, unless its data.hdf5 is already up to date."""
    folder = registry.data_folder(spec, args.data_dir)
    out = os.path.join(folder, registry.DATA_FILE)
    files = wanted_files(spec, args)
    options = options_of(spec, args)
    up_to_date = {**fetch.expected_provenance(files), **options}
    if not args.force and hdf5_format.has_provenance(out, up_to_date):
        log.info("%s: %s is up to date (same raw files and options); skipping — pass --force to "
                 "convert again", spec.name, out)
        return
    util.check_writable_directory(args.data_dir, "--data_dir")
    start = time.time()
    paths, provenance = fetch.obtain(files, spec.mirrors, raw_folder(spec, args.data_dir),
                                     args.source, verify=not args.no_verify)
    splits, class_names = CONVERTERS[spec.name](paths, args)
    write(out, splits, class_names, {**provenance, **options})
    log.info("%s: wrote %s (%d train, %d test images of %s) in %.1f s", spec.name, out,
             len(splits["train"][1]), len(splits["test"][1]),
             "x".join(map(str, splits["train"][0].shape[1:])), time.time() - start)


def raw_folder(spec, data_dir):
    """Where downloaded raw files are kept, so that the next run need not fetch them again."""
    return os.path.join(registry.data_folder(spec, data_dir), "raw")


def write(out, splits, class_names, provenance):
    try:
        hdf5_format.write_dataset(out, splits, class_names, provenance)
    except OSError as error:
        raise fetch.disk_error(error, out) from None


def prepare_imagenet(spec, args):
    root = args.imagenet_dir or args.source
    if not root:
        raise UsageError("ImageNet is not downloaded: pass --imagenet_dir DIR, an ILSVRC-2012 "
                         "folder with train/<wnid>/*.JPEG and val/<wnid>/*.JPEG")
    util.check_writable_directory(args.data_dir, "--data_dir")
    image_tree.write_tree_file(os.path.join(registry.data_folder(spec, args.data_dir),
                                            spec.data_file), root)


def convert_folder(args):
    if registry.find(args.name):
        raise UsageError(f"--name {args.name} is a registered dataset; choose another name")
    util.check_writable_directory(args.data_dir, "--data_dir")
    out = os.path.join(args.data_dir, args.name, registry.DATA_FILE)
    splits, class_names = converters.convert_folder(args.from_folder)
    write(out, splits, class_names, {"source_folder": os.path.abspath(args.from_folder)})
    log.info("wrote %s: %d train, %d test images of %s, %d classes — train with --dataset %s",
             out, len(splits["train"][1]), len(splits["test"][1]),
             "x".join(map(str, splits["train"][0].shape[1:])), len(class_names), args.name)


def check_source(source):
    """A one-line error when --source is not a folder; for the folder a Debian package installs,
    it names the package."""
    if os.path.isdir(source):
        return
    package = DEBIAN_SOURCES.get(os.path.abspath(source))
    if package:
        raise UsageError(f"--source {source} is not a folder — install Debian's package that "
                         f"puts the files there: apt-get install {package} (with sudo if you are "
                         "not root), or drop --source to download them")
    raise UsageError(f"--source {source} is not a folder — pass the folder that holds the raw "
                     "files, or drop --source to download them")


@contextlib.contextmanager
def no_new_empty_folders(folder):
    """If the block fails, removes the folders on the way to `folder` that did not exist before
    it and are empty after it (an empty <data_dir>/<name>/raw/ of a failed download); raw files
    that were downloaded and verified stay, for the next run."""
    missing = []  # deepest first
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    try:
        yield
    except BaseException:
        for path in missing:
            with contextlib.suppress(OSError):  # not made, or not empty
                os.rmdir(path)
        raise


def main(argv=None):
    args = parse_args(argv)
    util.setup_logging()
    if args.source:
        check_source(args.source)
    if args.from_folder:
        with no_new_empty_folders(os.path.join(args.data_dir, args.name)):
            convert_folder(args)
        return
    for spec in specs_for(args.datasets):
        with no_new_empty_folders(raw_folder(spec, args.data_dir)):
            if spec.streamed:
                prepare_imagenet(spec, args)
            else:
                prepare(spec, args)


if __name__ == "__main__":
    util.run_cli(main)
