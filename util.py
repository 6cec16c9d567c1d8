"""Small helpers shared by the command-line scripts: errors, logging, run directories, files."""
import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time


VERBOSE_FLAG = "--verbose"


def quiet_tensorflow(argv):
    """Imports TensorFlow with its C++ log lines hidden (TF_CPP_MIN_LOG_LEVEL 3), unless `argv`
    holds --verbose (level 0) or the environment sets a level of its own.

    While it is imported, TensorFlow prints INFO lines whatever the level (the CUDA stub's
    "Could not find cuda drivers", twice), so its stderr is held back during the import and shown
    only if the import fails or the level lets INFO lines through. The CLIs call this with
    sys.argv once their flags are checked (`check_flags_then_import_tensorflow`), before any
    module imports TensorFlow."""
    if VERBOSE_FLAG in argv:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    level = os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if level.strip() in ("", "0") or "tensorflow" in sys.modules:
        return
    with stderr_held_back():
        import tensorflow  # noqa: F401


def check_flags_then_import_tensorflow(module_name, parse_args):
    """A CLI's start: when `module_name` is "__main__" (the script being run), parses and checks
    its flags with `parse_args()` before TensorFlow is imported, which takes seconds, so that
    --help and a mistyped flag answer at once (`parse_args` must not import TensorFlow; main()
    parses the flags again, in no time); then imports TensorFlow quietly (`quiet_tensorflow`)."""
    if module_name == "__main__":
        run_cli(parse_args)
    quiet_tensorflow(sys.argv[1:])


@contextlib.contextmanager
def stderr_held_back():
    """Within the block, file descriptor 2 (C++ libraries' stderr too) goes to a temporary file,
    which is copied to the real stderr if the block raises."""
    sys.stderr.flush()
    real_stderr = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(real_stderr, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(real_stderr, 2)
            os.close(real_stderr)


def add_verbose_flag(parser, also=""):
    """The --verbose flag that `quiet_tensorflow` reads, so that --help lists it; `also` adds
    what else it shows in this CLI."""
    parser.add_argument(VERBOSE_FLAG, action="store_true",
                        help="also print TensorFlow's own log lines, hidden by default (as they "
                             "are when the environment sets TF_CPP_MIN_LOG_LEVEL)" + also)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, its errors one line with exit status 2 like the CLIs' other errors."""

    def error(self, message):
        self.exit(2, f"error: {message} — see python {self.prog} --help\n")


class UsageError(Exception):
    """A problem the user can fix; the CLIs print its message as one line and exit non-zero."""


def run_cli(main):
    """Runs `main()`, turning a UsageError into one line on stderr and exit status 2."""
    try:
        main()
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


# Exit status after SIGTERM, as a shell reports a process it ended: 128 + 15.
TERMINATED_STATUS = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler preempting the job), raised where the program finds it recorded (see
    `sigterm_recorded`) as Ctrl-C raises KeyboardInterrupt, so that the same handlers save
    before exiting."""


@contextlib.contextmanager
def sigterm_recorded():
    """Within the block, SIGTERM does not stop the program: it sets the threading.Event this
    yields, which the program checks where it can stop cleanly (the trainer between updates, on
    every worker of a cluster after the same one; study.py between looks at its trainers)."""
    received = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.set())
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_precise_bn_flag(num_batches):
    """evaler.py's and study.py's --precise_bn: a number of batches, or 0 for off."""
    if num_batches < 0:
        raise UsageError(f"--precise_bn must be 0 (off) or a number of batches, got "
                         f"{num_batches}")


log = logging.getLogger("gn")


def setup_logging():
    """Timestamped INFO lines from this project only (TensorFlow's own INFO lines stay quiet)."""
    if not log.handlers:  # once per process, however often a CLI's main() runs
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


@contextlib.contextmanager
def atomic_path(path, directory=False):
    """Yields a temporary name beside `path` (a new empty directory when `directory`, for a
    `path` that must not exist); renames it to `path` only if the block succeeds, else removes
    it, so an interrupted write never leaves a file or folder that looks complete."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    names = dict(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    if directory:
        tmp = tempfile.mkdtemp(**names)
    else:
        fd, tmp = tempfile.mkstemp(**names)
        os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, (0o777 if directory else 0o666) & ~_current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.remove(tmp)


def check_writable_directory(path, flag):
    """A one-line error, before any work, when the directory a CLI will write into is a file, lies
    inside a file, or is somewhere no file can be created (permissions, a read-only disk)."""
    wanted = os.path.abspath(path)
    existing = wanted
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == wanted else f"is inside {existing}, which is a file"
        raise UsageError(f"{flag} {path} {where} — pass a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UsageError(f"{flag} {path} is not writable: {existing} refuses new files "
                         f"({error.strerror}) — pass a directory you can write to") from None


def _current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_json(path, obj):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")


def new_run_dir(config):
    """`<train_dir>/<prefix>-<dataset>_lr_<lr>_bs_<bs>_norm_type_<norm>-<timestamp>`, as in the
    2018 repo, with `_2`, `_3`, ... appended when a run of the same second already has it."""
    name = (f"{config.prefix}-{config.dataset}_lr_{config.learning_rate}_bs_{config.batch_size}"
            f"_norm_type_{config.norm_type}-{time.strftime('%Y%m%d-%H%M%S')}")
    path, copy = os.path.join(config.train_dir, name), 1
    while os.path.exists(path):
        copy += 1
        path = os.path.join(config.train_dir, f"{name}_{copy}")
    return path


def first_line(error):
    """An exception's message cut to its first line, for a one-line error."""
    return str(error).strip().splitlines()[0]
