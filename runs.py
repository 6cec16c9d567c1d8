"""A run directory and its model: its checkpoints (found, checked, the newest readable one), its
config.json, its progress file (through which study.py follows a training run); the model
restored from a checkpoint, evaluated on the test set, reported in one JSON shape, and BN's
population statistics re-estimated (precise BN).

trainer.py (its result.json), evaler.py, study.py (through evaler.py), export.py and predict.py
share these, so a run is restored and measured one way everywhere.
"""
import json
import os
import shutil
import tempfile
import types

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

import input_ops
import model as model_lib
import train_flags
import util
from util import UsageError


# Checkpoints and config.json ---------------------------------------------------------------------

def resolve_checkpoint(path):
    """The checkpoint prefix for `path`: a checkpoint prefix, which must be readable, or a run
    directory, whose `latest_checkpoint` is taken."""
    if os.path.isdir(path):
        latest = latest_checkpoint(path)
        if latest is None:
            raise UsageError(f"no checkpoint in {path} — pass a run directory that holds "
                             "model-<step>.index files, or a checkpoint prefix")
        return latest
    if os.path.exists(path + ".index"):
        problem = unreadable(path)
        if problem:
            raise UsageError(f"checkpoint {path} cannot be read ({problem}) — pass another "
                             "checkpoint of the run, or its run directory")
        return path
    raise UsageError(f"checkpoint {path} does not exist — pass a run directory under train_dir/ "
                     "or a checkpoint prefix such as train_dir/<run>/model-1000")


def run_checkpoints(run_dir):
    """The checkpoint prefixes of a run directory, oldest first."""
    state = tf.train.get_checkpoint_state(run_dir) if os.path.isdir(run_dir) else None
    return list(state.all_model_checkpoint_paths) if state else []


def latest_checkpoint(run_dir):
    """The checkpoint a run continues from, and what `--checkpoint <run>` means everywhere: the
    newest readable one in `run_dir` (newer ones that cannot be read are skipped with a
    warning), or None when it holds none; a one-line error when none of them can be read."""
    prefixes = run_checkpoints(run_dir)
    if not prefixes:
        return None
    for prefix in reversed(prefixes):
        problem = unreadable(prefix)
        if not problem:
            return prefix
        util.log.warning("warning: skipping checkpoint %s, which cannot be read (%s)", prefix,
                         problem)
    raise UsageError(f"none of the {len(prefixes)} checkpoints in {run_dir} can be read — "
                     "start a new run")


def unreadable(prefix):
    """Why checkpoint `prefix` cannot be read (the first line of the error), or None. A truncated
    or damaged data file shows only when its values are read, so every value is read (the input
    pipeline's state, a variant, cannot be read outside a restore and is skipped)."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        for name, dtype in reader.get_variable_to_dtype_map().items():
            if dtype != tf.variant:
                reader.get_tensor(name)
    except (tf.errors.OpError, ValueError, IndexError) as error:
        return util.first_line(error)
    return None


def checkpoint_step(prefix):
    """The training step in a checkpoint name written by the trainer (`.../model-<step>`)."""
    return int(prefix.rsplit("-", 1)[1])


# The layout of a run directory's config.json and checkpoints. A run of another format is refused
# in one line rather than read by guesswork.
FORMAT_VERSION = 1


def read_run_config(checkpoint_prefix):
    """The config.json of the run that wrote `checkpoint_prefix`, which must be of this
    repo's FORMAT_VERSION."""
    run_dir = os.path.dirname(checkpoint_prefix)
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise UsageError(f"{path} is missing — the checkpoint must sit in the run directory "
                         "trainer.py wrote it to")
    with open(path) as f:
        config = json.load(f)
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        newer = (version or 0) > FORMAT_VERSION
        written_by = ("a newer version of this repo — update it" if newer else "an earlier "
                      "version of this repo — train a new run, or use that version to evaluate "
                      "or export it")
        raise UsageError(f"run {run_dir or '.'} has format version {version or 0} in its "
                         f"config.json, not {FORMAT_VERSION}: it was written by {written_by}")
    return config


# <run>/progress.jsonl: one JSON object per training line the trainer logs, made for machines.
PROGRESS_FILE = "progress.jsonl"


def append_progress(run_dir, **record):
    """Appends `record` (step, loss, accuracy, seconds, ...) as one line of the run's progress
    file."""
    with open(os.path.join(run_dir, PROGRESS_FILE), "a") as f:
        f.write(json.dumps(record) + "\n")


def last_progress(run_dir):
    """The newest whole record of the run's progress file, or None before the first (a line
    still being written is not whole)."""
    path = os.path.join(run_dir, PROGRESS_FILE)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 4096))
        lines = f.read().decode(errors="replace").split("\n")
    for line in reversed(lines[:-1]):  # the text after the last newline is not whole yet
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue  # the first line of the tail may be cut
    return None


# Writing a run ------------------------------------------------------------------------------------

SUMMARY_SPLITS = ("train", "test")
RESULT_FILE = "result.json"


class RunWriter:
    """The run directory a training run writes: config.json, the `model-<step>` checkpoints of its
    training `state` (a tf.train.Checkpoint), the TensorBoard summaries of train/ and test/, the
    progress file, and result.json when it ends.

    Opening it writes config.json and removes a result.json from an earlier end of the run, which
    no longer holds. Only the chief writes the run directory: the other workers of a cluster save
    their checkpoints (every worker takes part in saving) to a temporary directory and write no
    summaries."""

    def __init__(self, run_dir, config, state, chief):
        self.run_dir = run_dir
        self.chief = chief
        self.made_run_dir = chief and not os.path.exists(run_dir)
        if not chief:
            directory = tempfile.mkdtemp(prefix="gn-worker-checkpoints-")
            self.writers = {split: tf.summary.create_noop_writer() for split in SUMMARY_SPLITS}
        else:
            directory = run_dir
            util.write_json(os.path.join(run_dir, "config.json"), vars(config))
            stale_result = os.path.join(run_dir, RESULT_FILE)
            if os.path.exists(stale_result):
                os.remove(stale_result)
            self.writers = {split: tf.summary.create_file_writer(os.path.join(run_dir, split))
                            for split in SUMMARY_SPLITS}
        self.manager = tf.train.CheckpointManager(state, directory, max_to_keep=None,
                                                  checkpoint_name="model")

    @property
    def latest_checkpoint(self):
        """The newest checkpoint this run directory holds, None before the first."""
        return self.manager.latest_checkpoint

    def save(self, step):
        """Writes the training state as checkpoint `model-<step>`; returns its prefix."""
        return self.manager.save(checkpoint_number=step)

    def flush(self):
        for writer in self.writers.values():
            writer.flush()

    def write_scalars(self, split, step, **scalars):
        with self.writers[split].as_default(step=step):
            for name, value in scalars.items():
                tf.summary.scalar(name, value)

    def write_images(self, name, images, step):
        with self.writers["train"].as_default(step=step):
            tf.summary.image(name, images, max_outputs=len(images))

    def append_progress(self, **record):
        """One training line of the progress file (the chief's only)."""
        if self.chief:
            append_progress(self.run_dir, **record)

    def write_result(self, result):
        util.write_json(os.path.join(self.run_dir, RESULT_FILE), result)

    def close(self, finished):
        """Closes the summary writers and removes a non-chief worker's temporary checkpoints. A
        run that did not finish, in a run directory this process made, that holds no checkpoint
        (it failed before it saved one) leaves no directory behind: there is nothing in it to
        continue or evaluate."""
        for writer in self.writers.values():
            writer.close()
        if not self.chief:
            shutil.rmtree(self.manager.directory, ignore_errors=True)
        elif not finished and self.made_run_dir and self.latest_checkpoint is None:
            shutil.rmtree(self.run_dir, ignore_errors=True)


# Continuing a run -------------------------------------------------------------------------------

# Flags that define the network and the optimizer's state: a checkpoint only continues with the
# same values.
STATE_FLAGS = ("model", "norm_type", "groups", "channels_per_group", "weight_std", "optimizer")
# Flags that define the random streams (input, dropout): their saved positions are used only when
# these (and the number of workers) are unchanged.
DATA_FLAGS = ("dataset", "batch_size", "seed", "augment")


def checkpoint_to_continue(config):
    """The checkpoint a training run of `config` starts from: the latest in --run_dir when that
    directory holds some (the run continues in place), else --checkpoint's, else None."""
    latest = config.run_dir and latest_checkpoint(config.run_dir)
    if latest and config.checkpoint:
        raise UsageError(f"--run_dir {config.run_dir} holds checkpoints already — drop "
                         "--checkpoint to continue it, or pass a new --run_dir")
    return latest or (config.checkpoint and resolve_checkpoint(config.checkpoint))


def check_can_continue(config, prefix, source_config):
    """A checkpoint continues only with the same network and optimizer state: the same model
    flags and optimizer, and loss scaling on or off as before (mixed_float16 wraps the
    optimizer). The batch size, the number of replicas and the accumulation may change: the
    optimizer state does not depend on them. (A flag not passed is the run's own already:
    train_flags.take_run_flags.)"""
    changed = [f for f in STATE_FLAGS if source_config[f] != getattr(config, f)]
    if (source_config["precision"] == "mixed_float16") != (config.precision == "mixed_float16"):
        changed.append("precision")
    if changed:
        theirs = " ".join(f"--{f} {source_config[f]}" for f in changed)
        ours = " ".join(f"--{f} {getattr(config, f)}" for f in changed)
        raise UsageError(f"checkpoint {prefix} was trained with {theirs}, not {ours} — drop "
                         f"{' '.join('--' + f for f in changed)} to continue with the run's own, "
                         "or start a new run")


def same_streams(config, workers, pass_size, source_config):
    """Whether a run continues its checkpoint's random streams (input position, dropout seeds):
    only with the same data flags, number of workers and examples per pass (the input stream's
    batches)."""
    return (all(source_config[f] == getattr(config, f) for f in DATA_FLAGS)
            and source_config["workers"] == workers
            and train_flags.run_examples_per_pass(source_config) == pass_size)


# The model of a run -------------------------------------------------------------------------------

def restore_run(checkpoint):
    """(checkpoint prefix, config.json, what the network takes, the network with its weights)
    for `--checkpoint` (a run directory or a checkpoint prefix), from the run's config.json
    alone."""
    prefix = resolve_checkpoint(checkpoint)
    config = read_run_config(prefix)
    shape = network_shape(config)
    return prefix, config, shape, restore_model(prefix, config, shape)


def network_shape(config):
    """What the network of a run's config.json (or of an export's export.json) takes and tells
    apart, a namespace: image_shape, num_classes, class_names, and the central_fraction of an
    image's shorter side that its evaluation crop keeps."""
    return types.SimpleNamespace(image_shape=tuple(config["image_shape"]),
                                 num_classes=config["num_classes"],
                                 class_names=list(config["class_names"]),
                                 central_fraction=config["central_fraction"])


def restore_model(prefix, config, data, strategy=None):
    """The network of a run's `config` (its config.json) for `data` (the dataset, or what
    `network_shape` says) with the weights of checkpoint `prefix`, its variables mirrored on the
    replicas of `strategy` (default: one device)."""
    with (strategy or tf.distribute.get_strategy()).scope():
        model = model_lib.build_model(config["model"], data.image_shape, data.num_classes,
                                      config["norm_type"], config["groups"],
                                      config["weight_std"], config["dropout"],
                                      config["channels_per_group"])
    restore_weights(model, prefix)
    return model


RESTORE_ERRORS = (AssertionError, ValueError, tf.errors.OpError)


def restore_weights(model, prefix):
    """Restores the weights of `model`, built from the config.json of the run that wrote
    checkpoint `prefix`. When they do not fit, the network those flags build has changed since
    (the `conv` net pooled its last map before it flattened it): a one-line error."""
    try:
        tf.train.Checkpoint(model=model).restore(prefix).expect_partial() \
            .assert_existing_objects_matched()
    except RESTORE_ERRORS as error:
        quiet_failed_restore()
        raise UsageError(f"checkpoint {prefix} does not fit the network its run's config.json "
                         f"describes ({util.first_line(error)}) — it was written by another version "
                         "of model.py; evaluate it with that version, or train a new run") from None


def quiet_failed_restore():
    """A restore that fails half-way warns, when its objects are deleted (at exit), about every
    value it did not restore: dozens of lines after the one-line error. TensorFlow's Python
    warnings are silenced from then on."""
    tf.get_logger().setLevel("ERROR")


def evaluate(model, dataset, num_classes, strategy=None):
    """Mean cross-entropy, top-1 accuracy and confusion matrix [true, predicted] of `model` over
    every example of `dataset`, in inference mode. Under a `strategy` of several replicas each
    batch is split among them and their results gathered."""
    strategy = strategy or tf.distribute.get_strategy()
    total_loss, confusion = 0.0, np.zeros((num_classes, num_classes), np.int64)

    # One graph for all batches: run eagerly, the layers' Python costs more than their compute.
    @tf.function(reduce_retracing=True)
    def infer(images, labels):
        logits, labels = strategy.run(lambda x, y: (model(x, training=False), y),
                                      args=(images, labels))
        return strategy.gather(logits, axis=0), strategy.gather(labels, axis=0)

    batches = strategy.experimental_distribute_dataset(dataset)
    for images, labels in tqdm(batches, total=len(dataset), desc="evaluating", leave=False,
                               disable=None):
        logits, labels = infer(images, labels)
        total_loss += float(tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels, logits)))
        np.add.at(confusion, (labels.numpy(), np.argmax(logits, axis=-1)), 1)
    count = confusion.sum()
    return total_loss / count, np.trace(confusion) / count, confusion


def report(prefix, loss, accuracy, confusion, class_names):
    """The result of evaluating checkpoint `prefix`: what `evaler.py --json` prints and the core
    of the trainer's result.json."""
    per_class = np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
    return {"checkpoint": prefix, "step": checkpoint_step(prefix), "loss": float(loss),
            "accuracy": float(accuracy),
            "per_class_accuracy": dict(zip(class_names, per_class.round(4).tolist())),
            "confusion_matrix": confusion.tolist()}


# Precise BN -------------------------------------------------------------------------------------

def batch_norm_layers(model):
    return [layer for layer in model.layers
            if isinstance(layer, keras.layers.BatchNormalization)]


def precise_batch_norm(model, config, data, num_batches):
    """Replaces the moving mean and variance of every BN layer of `model` by population statistics
    over `num_batches` training batches of the run's batch size ("precise BN", Wu & Johnson 2021).

    The network runs as in training (batch statistics, dropout, the run's augmentation), so the
    estimate targets what the moving averages target, without their noise and lag. The population
    variance is the mean over batches of E[x^2] minus the square of the mean of E[x]: the mean of
    the per-batch variances plus the variance of the per-batch means. Returns the number of BN
    layers (0 leaves `model` as it was)."""
    layers = batch_norm_layers(model)
    if not layers:
        return 0
    probe = keras.Model(model.inputs, [layer.input for layer in layers])

    @tf.function
    def batch_moments(images):
        features = tf.nest.flatten(probe(images, training=True))  # a list also for one layer
        return [tf.nn.moments(tf.cast(x, tf.float32), axes=list(range(x.shape.rank - 1)))
                for x in features]

    batches = input_ops.train_dataset(data, config["batch_size"], config["seed"],
                                      config["augment"]).take(num_batches)
    means, variances = [[] for _ in layers], [[] for _ in layers]
    for images, _ in tqdm(batches, total=num_batches, desc="precise BN", leave=False,
                          disable=None):
        for i, (mean, variance) in enumerate(batch_moments(images)):
            means[i].append(mean.numpy().astype(np.float64))
            variances[i].append(variance.numpy().astype(np.float64))
    for layer, batch_means, batch_variances in zip(layers, means, variances):
        batch_means = np.array(batch_means)
        population_mean = batch_means.mean(axis=0)
        population_variance = (np.mean(batch_variances, axis=0)
                               + np.mean((batch_means - population_mean) ** 2, axis=0))
        layer.moving_mean.assign(population_mean.astype(np.float32))
        layer.moving_variance.assign(population_variance.astype(np.float32))
    return len(layers)
