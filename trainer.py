"""Train a classifier with group or batch normalization at any batch size.

    python trainer.py                                     # GN on the bundled Fashion-MNIST sample
    python trainer.py --norm_type batch --batch_size 2    # BN at batch 2
    python trainer.py --checkpoint train_dir/<run>        # continue a run into a new directory
    python trainer.py --run_dir runs/a                    # train in runs/a; run it again to continue
    python trainer.py --devices 2 --norm_type sync_batch  # 2 replicas on 2 logical CPU devices

Each step is one optimizer update over `max_batch_size` examples. `batch_size` is the examples
per replica (per BN statistic); one forward pass over all replicas sees batch_size x replicas of
them, and the gradients of max_batch_size / (batch_size x replicas) passes are summed before the
update, so a small batch changes the normalization statistics but not the number of examples per
update, the learning rate or the number of examples seen (the 2018 repo's adjustment; turn it off
with --no_accumulate). The loop is written out rather than `model.fit` so a checkpoint
can hold the input pipeline's position next to the model, optimizer and step.
"""
import sys

import util

util.quiet_tensorflow(sys.argv[1:])  # before anything imports TensorFlow

import math
import os
import shutil
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

import distribution
import input_ops
import model as model_lib
import ops
import runs
import schedules
import train_flags
from kernels import optimizers
from util import TERMINATED_STATUS, UsageError, log

# Flags that define the network and the optimizer's state: a checkpoint only continues with the
# same values.
STATE_FLAGS = ("model", "norm_type", "groups", "channels_per_group", "weight_std", "optimizer")
# Flags that define the random streams (input, dropout): their saved positions are used only when
# these (and the number of workers) are unchanged.
DATA_FLAGS = ("dataset", "batch_size", "seed", "augment")


def check_setup(config, strategy):
    """One-line errors for flags that cannot work on these replicas."""
    if config.jit_compile and config.norm_type == "sync_batch" and \
            strategy.num_replicas_in_sync > 1:
        raise UsageError("--jit_compile cannot compile sync_batch's all-reduce of the "
                         "statistics within a replica's pass — drop --jit_compile, or use "
                         "--norm_type batch or group")


def passes_per_update(config, replicas):
    """Forward passes over all replicas per update: max_batch_size / (batch_size x replicas),
    or 1 when adjustment is off or one pass holds max_batch_size examples already."""
    per_pass = config.batch_size * replicas
    if config.no_accumulate or per_pass >= config.max_batch_size:
        return 1
    if config.max_batch_size % per_pass:
        fitting = [str(b) for b in range(1, config.max_batch_size // replicas + 1)
                   if config.max_batch_size % (b * replicas) == 0]
        raise UsageError(f"--batch_size {config.batch_size} does not fit updates of "
                         f"--max_batch_size {config.max_batch_size}, which is not a multiple of "
                         f"the {per_pass} examples of one pass ({replicas} replica(s) x "
                         f"--batch_size {config.batch_size}) — pass a --batch_size of "
                         f"{', '.join(fitting)}, or a --max_batch_size that is a multiple of "
                         f"{per_pass}")
    return config.max_batch_size // per_pass


def build_model(config, data):
    """The `--model` network for this dataset; a bad --groups or --channels_per_group becomes a
    one-line error."""
    input_shape = data.image_shape
    try:
        return model_lib.build_model(config.model, input_shape, data.num_classes,
                                     config.norm_type, config.groups, config.weight_std,
                                     config.dropout, config.channels_per_group,
                                     config.zero_init_residual)
    except ValueError as error:
        flag = "--groups" if config.channels_per_group is None else "--channels_per_group"
        raise UsageError(f"{error}, and pass it as {flag}") from None


def check_statistics(config, model, replicas):
    """Refuses a network with a normalization whose every statistic covers one value: its output
    is then beta whatever the input, and the layers before it cannot learn. Instance norm on a
    1x1 map does that (the `resnet` net's last stage below 64 px), and BN on one at batch 1."""
    for layer in model.layers:
        if isinstance(layer, ops.GroupNorm):
            values = layer.input.shape[-1] // layer.groups
            remedy = "--norm_type group with fewer groups"
        elif isinstance(layer, keras.layers.BatchNormalization):
            values = config.batch_size * (replicas if layer.synchronized else 1)
            remedy = "a --batch_size of 2 or more, --norm_type group"
        else:
            continue
        map_shape = layer.input.shape[1:-1]
        if values * math.prod(map_shape) == 1:
            raise UsageError(f"--norm_type {config.norm_type} normalizes each channel of "
                             f"{layer.name} (a {'x'.join(map(str, map_shape))} map) over a single "
                             "value, which makes it a constant that nothing before it can learn "
                             f"from — use {remedy}, larger images or another --model")


def build_optimizer(config):
    """Adam or SGD with momentum 0.9, gradients clipped to global norm 20 as in the 2018 repo, and
    the learning rate of --lr_schedule and --warmup_steps over max_training_step updates; with
    mixed_float16, wrapped in Keras's dynamic loss scaling. Both are Keras's, on TensorFlow's
    fused update ops (kernels/optimizers.py): their graph traces and optimizes in a fraction of
    the time."""
    schedule = schedules.build(config.lr_schedule, config.learning_rate,
                               config.max_training_step, config.warmup_steps)
    if config.optimizer == "momentum":
        optimizer = optimizers.MomentumSGD(schedule, momentum=0.9, global_clipnorm=20.0)
    else:
        optimizer = optimizers.Adam(schedule, global_clipnorm=20.0)
    if config.precision == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def dropout_seeds(model):
    """The random-seed states of the model's dropout layers: Keras counts them among
    `model.variables` but not among the weights a checkpoint of the model holds."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


class Trainer:
    """Holds the model, optimizer, input streams, checkpoint and summary writers of one run.

    Under a tf.distribute strategy the model and optimizer are mirrored on every replica. Each
    worker reads its share of every pass from one tf.data iterator of per-replica batches and
    hands them to its replicas; that iterator is checkpointed (tf.distribute's own distributed
    iterators cannot be), so continuing is exact on any number of devices."""

    def __init__(self, config, data, run_dir, strategy=None):
        self.config = config
        self.data = data
        self.run_dir = run_dir
        self.strategy = strategy or tf.distribute.get_strategy()
        self.share = distribution.input_share(self.strategy)
        self.chief = distribution.is_chief(self.strategy)
        self.examples_per_pass = config.batch_size * self.share.replicas
        self.passes = passes_per_update(config, self.share.replicas)
        with self.strategy.scope():
            self.model = build_model(config, data)
            check_statistics(config, self.model, self.share.replicas)
            self.optimizer = build_optimizer(config)
            self.optimizer.build(self.model.trainable_variables)
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.forward_backward = (tf.function(self.loss_and_gradients, jit_compile=True)
                                 if config.jit_compile else self.loss_and_gradients)
        self.train_iterator = iter(input_ops.train_dataset(data, config.batch_size, config.seed,
                                                           config.augment, self.share))
        eval_batch = max(config.batch_size, config.max_batch_size)
        self.test_iterator = iter(input_ops.test_sample_dataset(data, eval_batch, config.seed))
        self.eval_data = input_ops.eval_dataset(data, eval_batch)
        # Where the random streams stand: the input pipeline and the dropout seeds.
        self.streams = tf.train.Checkpoint(input=self.train_iterator,
                                           dropout_seeds=dropout_seeds(self.model))
        # Seconds spent training so far, over every process that worked on the run.
        self.clock = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        # 1 once this worker was sent SIGTERM; summed over the workers in every update (a local
        # variable, made outside the strategy's scope, and kept out of checkpoints).
        self.stop_requested = tf.Variable(0.0, trainable=False)
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                              streams=self.streams, train_seconds=self.clock)
        self.manager = self.writers = None  # made by open_run_dir, once the state is final
        self.made_run_dir = False  # whether open_run_dir created the run directory
        self.saved_step = None  # the step of the checkpoint this process saved or restored last
        self.started = None  # time.time() when this process began training
        self.first_update_done = None  # time.time() when this process's first update was made

    def open_run_dir(self):
        """Creates the run directory with config.json, the checkpoint manager and the summary
        writers; a result.json from an earlier end of the run no longer holds and is removed.
        Only the chief writes the run directory: the other workers of a cluster save their
        checkpoints (every worker takes part in saving) to a temporary directory and write no
        summaries."""
        self.made_run_dir = self.chief and not os.path.exists(self.run_dir)
        if not self.chief:
            directory = tempfile.mkdtemp(prefix="gn-worker-checkpoints-")
            self.writers = {split: tf.summary.create_noop_writer() for split in ("train", "test")}
        else:
            directory = self.run_dir
            util.write_json(os.path.join(self.run_dir, "config.json"), vars(self.config))
            stale_result = os.path.join(self.run_dir, "result.json")
            if os.path.exists(stale_result):
                os.remove(stale_result)
            self.writers = {split: tf.summary.create_file_writer(os.path.join(directory, split))
                            for split in ("train", "test")}
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=None,
                                                  checkpoint_name="model")

    def close_run_dir(self, finished):
        """Closes the summary writers and removes a non-chief worker's temporary checkpoints. A
        run that did not finish, in a run directory this process made, that holds no checkpoint
        (it failed before it saved one) leaves no directory behind: there is nothing in it to
        continue or evaluate."""
        for writer in self.writers.values():
            writer.close()
        if not self.chief:
            shutil.rmtree(self.manager.directory, ignore_errors=True)
        elif not finished and self.made_run_dir and self.manager.latest_checkpoint is None:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    @property
    def step(self):
        return int(self.optimizer.iterations.numpy())

    @property
    def seconds(self):
        """Seconds spent training, including those of the processes before this one."""
        return float(self.clock.numpy()) + time.time() - self.started

    def restore(self, prefix, source_config):
        """Continues from `prefix`; the random streams (input position, dropout seeds) are
        restored only when the data flags and the number of workers are the same as in the run
        that wrote it."""
        same_data = (all(source_config.get(f) == getattr(self.config, f) for f in DATA_FLAGS)
                     and source_config.get("workers", 1) == self.share.workers)
        state = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                    **({"streams": self.streams} if same_data else {}))
        try:
            state.restore(prefix).expect_partial().assert_existing_objects_matched()
        except runs.RESTORE_ERRORS as error:
            runs.restore_weights(self.model, prefix)  # the network's own error, if it is that
            runs.quiet_failed_restore()
            raise UsageError(f"checkpoint {prefix} does not match the training state of these "
                             f"flags ({util.first_line(error)}) — pass the flags it was trained "
                             "with") from None
        # Checkpoints written before the clock was saved have none: it then starts at 0.
        tf.train.Checkpoint(train_seconds=self.clock).restore(prefix).expect_partial()
        if not same_data:
            log.info("data flags differ from the checkpoint's run: the input stream restarts")
        self.saved_step = self.step
        log.info("continuing from %s at step %d", prefix, self.step)

    @tf.function
    def train_step(self):
        """One update: `passes` forward/backward passes over all replicas, whose gradients are
        summed over the replicas and the passes, then applied once. Returns the mean loss and
        accuracy over the update's examples, the gradients' global norm and whether some worker
        was sent SIGTERM (then every worker learns it in the same update)."""
        variables = self.model.trainable_variables
        gradients = [tf.zeros(v.shape, v.dtype) for v in variables]
        total_loss, total_correct, stopping = 0.0, 0.0, 0.0
        for _ in tf.range(self.passes):
            summed = self.strategy.run(self.replica_pass, args=(self.next_pass(),))
            # The same on every replica: keep the first's, a tensor the loop can carry.
            loss, correct, pass_gradients, stop_requests = tf.nest.map_structure(
                lambda value: self.strategy.experimental_local_results(value)[0], summed)
            gradients = [g + p for g, p in zip(gradients, pass_gradients)]
            total_loss += loss
            total_correct += correct
            stopping = tf.maximum(stopping, stop_requests)
        if self.passes > 1:
            gradients = [g / self.passes for g in gradients]
        if self.config.weight_decay:
            gradients = self.with_weight_decay(gradients, variables)
        self.optimizer.apply_gradients(zip(gradients, variables))
        return (total_loss / self.passes, total_correct / (self.passes * self.examples_per_pass),
                tf.linalg.global_norm(gradients), stopping > 0)

    def with_weight_decay(self, gradients, variables):
        """The gradients of the loss plus weight_decay / 2 x the sum of the squared weights: each
        gains weight_decay x its weight (scaled like the loss for mixed_float16)."""
        decay = self.config.weight_decay
        return [g + self.optimizer.scale_loss(decay * tf.convert_to_tensor(v))
                for g, v in zip(gradients, variables)]

    def next_pass(self):
        """The next pass's per-replica batches: this worker's replicas take the next
        `local_replicas` batches of the input stream, in order."""
        local = self.share.local_replicas
        batches = [next(self.train_iterator) for _ in range(local)]
        return self.strategy.experimental_distribute_values_from_function(
            lambda context: batches[context.replica_id_in_sync_group % local])

    def replica_pass(self, batch):
        """One replica's forward and backward pass over its batch, then the sums over all
        replicas (one all-reduce) of: its share of the pass's mean loss, the number of examples
        it classified right, the gradients of that share, and its worker's stop request."""
        loss, correct, gradients = self.forward_backward(*batch)
        # tf.identity places the read on the replica's device: MultiWorkerMirroredStrategy's
        # all-reduce takes its destinations from the values' devices, and the variable has none.
        stop_request = tf.identity(self.stop_requested)
        return tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, (loss, correct, gradients, stop_request))

    def loss_and_gradients(self, images, labels):
        """A replica's share of the pass's mean loss, its number of right answers and the
        gradients of that share (of the loss scaled for mixed_float16, which the optimizer
        unscales)."""
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            logits = tf.cast(self.model(images, training=True), tf.float32)
            per_example = keras.losses.sparse_categorical_crossentropy(labels, logits,
                                                                       from_logits=True)
            loss = tf.nn.compute_average_loss(per_example,
                                              global_batch_size=self.examples_per_pass)
            scaled_loss = self.optimizer.scale_loss(loss)  # the loss itself unless mixed_float16
        gradients = tape.gradient(scaled_loss, variables,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
        correct = tf.reduce_sum(tf.cast(tf.equal(
            tf.argmax(logits, axis=-1, output_type=tf.int32), labels), tf.float32))
        return loss, correct, gradients

    @tf.function
    def test_step(self):
        images, labels = next(self.test_iterator)
        logits = self.model(images, training=False)
        accuracy = tf.reduce_mean(tf.cast(tf.equal(
            tf.argmax(logits, axis=-1, output_type=tf.int32), labels), tf.float32))
        return self.loss_fn(labels, logits), accuracy

    def train(self, sigterm):
        """Trains to max_training_step; saves every ckpt_save_step, at the end, on Ctrl-C, and on
        SIGTERM (`sigterm`, the threading.Event the signal sets): on one worker at the end of the
        update it came in, in a cluster at the end of the next, where every worker stops."""
        config = self.config
        examples_per_step = self.passes * self.examples_per_pass
        self.started = time.time()
        self.write_input_images()
        window = []  # (loss, accuracy, seconds) since the last log line
        try:
            while self.step < config.max_training_step:
                if sigterm.is_set():
                    if self.share.workers == 1:
                        raise util.Terminated()
                    self.stop_requested.assign(1.0)
                learning_rate = float(self.optimizer.learning_rate)  # the rate of this update
                start = time.time()
                loss, accuracy, gradient_norm, stopping = self.update()
                if stopping:
                    if not sigterm.is_set():
                        log.info("another worker was sent SIGTERM: every worker stops here")
                    raise util.Terminated()
                self.first_update_done = self.first_update_done or time.time()
                window.append((loss, accuracy, time.time() - start))
                step = self.step
                self.check_finite(step, loss, gradient_norm)
                if step % config.write_summary_step == 0:
                    self.write_scalars("train", step, loss=loss, accuracy=accuracy,
                                       learning_rate=learning_rate,
                                       images_per_sec=examples_per_step / window[-1][2])
                if step % config.log_step == 0:
                    self.log_window(step, window, examples_per_step)
                    window = []
                if step % config.test_sample_step == 0:
                    test_loss, test_accuracy = (float(v) for v in self.test_step())
                    self.write_scalars("test", step, loss=test_loss, accuracy=test_accuracy)
                    log.info("[test  step %5d] loss %.4f accuracy %.2f%% (one batch)", step,
                             test_loss, 100 * test_accuracy)
                if step % config.ckpt_save_step == 0:
                    self.save()
        except KeyboardInterrupt as interrupt:
            how = "terminated" if isinstance(interrupt, util.Terminated) else "interrupted"
            log.info("%s at step %d", how, self.step)
            self.save()
            raise
        self.save()

    def update(self):
        """train_step's results as Python numbers. In a cluster, a worker that stops taking part
        (killed, crashed, unreachable) fails the update's all-reduce on the others: one line
        that says how to continue, instead of TensorFlow's traceback."""
        number = self.step + 1
        try:
            return [float(value) for value in self.train_step()]
        except (tf.errors.UnavailableError, tf.errors.CancelledError, tf.errors.AbortedError,
                tf.errors.DeadlineExceededError) as error:
            if self.share.workers == 1:
                raise
            # The chief's checkpoints, which every worker continues from.
            latest = runs.latest_checkpoint(self.run_dir)
            raise WorkerLost(
                f"lost contact with another worker in update {number} "
                f"({type(error).__name__}) — " + (
                    f"start every worker again with --run_dir {self.run_dir} to continue from "
                    f"{latest}" if latest else "no checkpoint was saved; start every worker "
                    "again")) from None

    def check_finite(self, step, loss, gradient_norm):
        """Stops a diverging run at the update whose loss or gradient norm is not finite. Under
        mixed_float16 an infinite gradient is the loss scaler's business (it skips that update)."""
        if self.config.precision == "mixed_float16":
            gradient_norm = 0.0
        if not (math.isfinite(loss) and math.isfinite(gradient_norm)):
            raise Diverged(f"training diverged at step {step} (loss {loss}, gradient norm "
                           f"{gradient_norm}) — {self.last_good_checkpoint()}")

    def last_good_checkpoint(self):
        """Where a diverged run can go back to, for its error line."""
        latest = self.manager.latest_checkpoint
        if latest is None:
            return "no checkpoint was saved; lower --learning_rate and start again"
        return (f"the last checkpoint, {latest}, holds finite weights; lower --learning_rate "
                "and continue from it with --checkpoint")

    def log_window(self, step, window, examples_per_step):
        """The training line of the updates since the last, on the console and (the chief's) in
        the run's progress file."""
        loss, accuracy, seconds = np.mean(window, axis=0)
        log.info("[train step %5d] loss %.4f accuracy %.2f%% (%.3f sec/pass, %.1f images/sec)",
                 step, loss, 100 * accuracy, seconds / self.passes,
                 examples_per_step / seconds)
        if self.chief:
            runs.append_progress(self.run_dir, step=step, loss=float(loss),
                                 accuracy=float(accuracy), seconds=round(self.seconds, 3))

    def write_scalars(self, split, step, **scalars):
        with self.writers[split].as_default(step=step):
            for name, value in scalars.items():
                tf.summary.scalar(name, value)

    def write_input_images(self):
        """A few training inputs, augmented as the model sees them."""
        stream = input_ops.train_dataset(self.data, 4, self.config.seed, self.config.augment)
        images, _ = next(iter(stream))
        with self.writers["train"].as_default(step=self.step):
            tf.summary.image("input_images", images, max_outputs=4)

    def save(self):
        """Saves the current state, unless this run directory holds it already (this process
        saved or restored this step; a newer checkpoint skipped as unreadable is overwritten);
        never non-finite weights (an update can overflow them while its loss and gradients were
        finite)."""
        if self.saved_step != self.step or self.manager.latest_checkpoint is None:
            if not all(np.isfinite(v.numpy()).all() for v in self.model.weights):
                raise Diverged(f"the weights are not finite at step {self.step} — "
                               f"{self.last_good_checkpoint()}")
            self.clock.assign(self.seconds)
            self.started = time.time()
            path = self.manager.save(checkpoint_number=self.step)
            self.saved_step = self.step
            if self.chief:
                log.info("saved checkpoint %s", path)
        for writer in self.writers.values():
            writer.flush()


class Diverged(UsageError):
    """A non-finite loss, gradient or weight: a one-line error like a bad flag, since the usual
    remedy is a lower --learning_rate."""


class WorkerLost(UsageError):
    """Another worker of the cluster stopped taking part in the updates: a one-line error."""


def check_can_continue(config, prefix, source_config):
    """A checkpoint continues only with the same network and optimizer state: the same model
    flags and optimizer, loss scaling on or off as before (mixed_float16 wraps the optimizer),
    and not from a run whose optimizer counted accumulated batches as steps. The batch size, the
    number of replicas and the accumulation may change: the optimizer state does not depend on
    them."""
    source_config = {"precision": "float32", **source_config}  # runs from before --precision
    changed = [f for f in STATE_FLAGS if source_config.get(f) != getattr(config, f)]
    if (source_config["precision"] == "mixed_float16") != (config.precision == "mixed_float16"):
        changed.append("precision")
    if changed:
        theirs = " ".join(f"--{f} {source_config.get(f)}" for f in changed)
        ours = " ".join(f"--{f} {getattr(config, f)}" for f in changed)
        raise UsageError(f"checkpoint {prefix} was trained with {theirs}, not {ours} — pass the "
                         "flags it was trained with")
    # config.json gained "replicas" when the trainer began to accumulate gradients itself;
    # before, Keras's accumulation counted every accumulated batch as an optimizer iteration.
    if "replicas" not in source_config and source_config.get("accumulation_steps", 1) > 1:
        raise UsageError(f"checkpoint {prefix} comes from a trainer that counted each of its "
                         f"{source_config['accumulation_steps']} accumulated batches as a step "
                         "and cannot be continued — evaluate it with evaler.py, or start a new "
                         "run")


def checkpoint_to_continue(config):
    """The checkpoint this run starts from: the latest in --run_dir when that directory holds
    some (the run continues in place), else --checkpoint's, else None."""
    latest = config.run_dir and runs.latest_checkpoint(config.run_dir)
    if latest and config.checkpoint:
        raise UsageError(f"--run_dir {config.run_dir} holds checkpoints already — drop "
                         "--checkpoint to continue it, or pass a new --run_dir")
    return latest or (config.checkpoint and runs.resolve_checkpoint(config.checkpoint))


def write_result(trainer, loss, accuracy, confusion, data_read):
    """<run>/result.json, written when a run ends: the evaluation of its last checkpoint in the
    shape `evaler.py --json` prints, the training time and throughput, the seconds this process
    took from the end of reading the data (time.time() `data_read`) to its first update (null if
    it made none), and the resolved flags."""
    config = trainer.config
    result = runs.report(trainer.manager.latest_checkpoint, loss, accuracy, confusion,
                         trainer.data.class_names)
    seconds = trainer.seconds
    examples = trainer.step * trainer.passes * trainer.examples_per_pass
    first_update = trainer.first_update_done and round(trainer.first_update_done - data_read, 3)
    result.update(seconds=round(seconds, 3), images_per_sec=round(examples / seconds, 2),
                  seconds_to_first_update=first_update, config=vars(config))
    util.write_json(os.path.join(trainer.run_dir, "result.json"), result)


def main(argv=None):
    config = train_flags.parse_args(argv)
    util.setup_logging()
    util.check_writable_directory(config.run_dir or config.train_dir,
                                  "--run_dir" if config.run_dir else "--train_dir")
    strategy = distribution.make_strategy(config.strategy, config.devices)
    distribution.set_precision(config.precision)
    check_setup(config, strategy)
    spec, data = input_ops.load(config.dataset, config.data_dir)
    data_read = time.time()
    train_flags.check_flags(config, data)
    image_size = data.image_shape[0]
    config.model = config.model or model_lib.default_model(image_size)
    train_flags.check_zero_init(config)
    config.augment = (spec is not None and spec.augment) if config.augment is None else config.augment
    source = None
    prefix = checkpoint_to_continue(config)
    if prefix:
        source = (prefix, runs.read_run_config(prefix))
        check_can_continue(config, *source)

    keras.utils.set_random_seed(config.seed)
    run_dir = config.run_dir or util.new_run_dir(config)
    trainer = Trainer(config, data, run_dir, strategy)
    if source:
        trainer.restore(*source)
        warn_if_statistics_change(config, trainer, source[1])
    record_setup(config, trainer)
    trainer.open_run_dir()
    log.info("run directory %s%s", run_dir, "" if trainer.chief else " (written by the chief)")
    log.info("%s on %s (%d train, %d test), %s norm, %d parameters", config.model,
             config.dataset, data.num_train, data.num_test, config.norm_type, config.parameters)
    log.info("%s; %s", distribution.describe(strategy), batch_semantics(trainer))
    finished = False
    try:
        with util.sigterm_recorded() as sigterm:
            trainer.train(sigterm)
        finished = True
    except util.Terminated:
        raise SystemExit(TERMINATED_STATUS)
    except KeyboardInterrupt:
        raise SystemExit(130)
    finally:
        trainer.close_run_dir(finished)
    loss, accuracy, confusion = runs.evaluate(trainer.model, trainer.eval_data, data.num_classes)
    if trainer.chief:
        write_result(trainer, loss, accuracy, confusion, data_read)
    log.info("done: step %d, test loss %.4f, test accuracy %.2f%% (%d examples)", trainer.step,
             loss, 100 * accuracy, data.num_test)


def batch_semantics(trainer):
    """E.g. '2 replicas x 4 examples, 2 passes per update = 16 examples per update'."""
    replicas, passes = trainer.share.replicas, trainer.passes
    return (f"{replicas} replica{'s' if replicas > 1 else ''} x {trainer.config.batch_size} "
            f"examples, {passes} pass{'es' if passes > 1 else ''} per update = "
            f"{passes * trainer.examples_per_pass} examples per update")


def record_setup(config, trainer):
    """What config.json records beyond the flags: how the run was laid out, its size, and what
    its network takes and tells apart (so that export.py and predict.py need no dataset)."""
    config.image_shape = list(trainer.data.image_shape)
    config.num_classes = trainer.data.num_classes
    config.class_names = list(trainer.data.class_names)
    config.central_fraction = input_ops.central_fraction(trainer.data)
    config.replicas = trainer.share.replicas
    config.workers = trainer.share.workers
    config.strategy_class = distribution.strategy_name(trainer.strategy)
    config.accumulation_steps = trainer.passes
    config.parameters = trainer.model.count_params()


def warn_if_statistics_change(config, trainer, source_config):
    """sync_batch normalizes over batch_size x replicas examples: continuing on another number of
    replicas changes what its statistics (and moving averages) see. The other norm types see
    batch_size examples per statistic whatever the replicas, and GN none of the batch."""
    before = source_config.get("batch_size", 0) * source_config.get("replicas", 1)
    now = config.batch_size * trainer.share.replicas
    if config.norm_type == "sync_batch" and before != now:
        log.warning("sync_batch statistics were over %d examples in the checkpoint's run and "
                    "are over %d now", before, now)


if __name__ == "__main__":
    util.run_cli(main)
