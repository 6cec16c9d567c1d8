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

What an update computes is `updates.py`; the run directory it writes (config.json, checkpoints,
summaries, result.json) is `runs.RunWriter`; this file is the loop, its signals and the CLI.
"""
import train_flags
import util

util.check_flags_then_import_tensorflow(__name__, train_flags.parse_args)

import math
import time

import numpy as np
import tensorflow as tf

import distribution
import input_ops
import model as model_lib
import runs
import train_flags
import updates
from kernels import policy
from util import TERMINATED_STATUS, UsageError, log


class Diverged(UsageError):
    """A non-finite loss, gradient or weight: a one-line error like a bad flag, since the usual
    remedy is a lower --learning_rate."""


class WorkerLost(UsageError):
    """Another worker of the cluster stopped taking part in the updates: a one-line error."""


class Trainer:
    """One run being trained: its updates (`updates.Updater`), its run directory
    (`runs.RunWriter`) and the loop that logs, saves and stops.

    Construction continues from `source`, (checkpoint prefix, its run's config.json), when given,
    records the run's setup in `config` and opens the run directory: the trainer is then ready to
    `train`, and its run directory to close when training ends."""

    def __init__(self, config, data, run_dir, strategy=None, source=None):
        self.config = config
        self.updater = updates.Updater(config, data, strategy)
        self.chief = distribution.is_chief(self.updater.strategy)
        # Seconds spent training, over every process that worked on the run until this one.
        self.clock = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        self.state = tf.train.Checkpoint(model=self.updater.model,
                                         optimizer=self.updater.optimizer,
                                         streams=self.updater.streams, train_seconds=self.clock)
        self.saved_step = None  # the step of the checkpoint this process saved or restored last
        if source:
            self.restore(*source)
        record_setup(config, self.updater)
        self.run = runs.RunWriter(run_dir, config, self.state, self.chief)
        self.started = None  # time.time() when this process began training
        self.seconds_before = None  # the clock's seconds then
        self.first_update_done = None  # time.time() when this process's first update was made

    @property
    def step(self):
        return self.updater.step

    @property
    def seconds(self):
        """Seconds spent training, including those of the processes before this one."""
        return self.seconds_before + time.time() - self.started

    def restore(self, prefix, source_config):
        """Continues from checkpoint `prefix`; the random streams (input position, dropout seeds)
        are restored only when the data flags, the number of workers and the pass size are those
        of the run that wrote it."""
        updater = self.updater
        same_streams = runs.same_streams(self.config, updater.share.workers, updater.pass_size,
                                         source_config)
        state = self.state if same_streams else tf.train.Checkpoint(
            model=updater.model, optimizer=updater.optimizer, train_seconds=self.clock)
        try:
            state.restore(prefix).expect_partial().assert_existing_objects_matched()
        except runs.RESTORE_ERRORS as error:
            runs.restore_weights(updater.model, prefix)  # the network's own error, if it is that
            runs.quiet_failed_restore()
            raise UsageError(f"checkpoint {prefix} does not match the training state of these "
                             f"flags ({util.first_line(error)}) — pass the flags it was trained "
                             "with") from None
        if not same_streams:
            log.info("data flags differ from the checkpoint's run: the input stream restarts")
        warn_if_statistics_change(self.config, updater.share.replicas, source_config)
        self.saved_step = self.step
        log.info("continuing from %s at step %d", prefix, self.step)

    def train(self, sigterm):
        """Trains to max_training_step; saves every ckpt_save_step, at the end, on Ctrl-C, and on
        SIGTERM (`sigterm`, the threading.Event the signal sets): on one worker at the end of the
        update it came in, in a cluster at the end of the next, where every worker stops."""
        config = self.config
        self.started, self.seconds_before = time.time(), float(self.clock.numpy())
        self.write_input_images()
        # (loss, accuracy, seconds) of each update since the last log line, and since the last
        # TensorBoard point: both show means over their window under the same names.
        windows = {"log": [], "summary": []}
        try:
            while self.step < config.max_training_step:
                if sigterm.is_set():
                    if self.updater.share.workers == 1:
                        raise util.Terminated()
                    self.updater.stop_requested.assign(1.0)
                learning_rate = float(self.updater.optimizer.learning_rate)  # this update's
                start = time.time()
                loss, accuracy, gradient_norm, stopping = self.update()
                if stopping:
                    if not sigterm.is_set():
                        log.info("another worker was sent SIGTERM: every worker stops here")
                    raise util.Terminated()
                self.first_update_done = self.first_update_done or time.time()
                for window in windows.values():
                    window.append((loss, accuracy, time.time() - start))
                step = self.step
                self.check_finite(step, loss, gradient_norm)
                if step % config.write_summary_step == 0:
                    self.write_train_scalars(step, windows["summary"], loss, learning_rate)
                    windows["summary"] = []
                if step % config.log_step == 0:
                    self.log_window(step, windows["log"])
                    windows["log"] = []
                if step % config.test_sample_step == 0:
                    self.test_sample(step)
                if step % config.ckpt_save_step == 0:
                    self.save()
        except KeyboardInterrupt as interrupt:
            how = "terminated" if isinstance(interrupt, util.Terminated) else "interrupted"
            log.info("%s at step %d", how, self.step)
            self.save()
            raise
        self.save()

    def update(self):
        """The updater's train_step, its results as Python numbers. In a cluster, a worker that
        stops taking part (killed, crashed, unreachable) fails the update's all-reduce on the
        others: one line that says how to continue, instead of TensorFlow's traceback."""
        number = self.step + 1
        try:
            return [float(value) for value in self.updater.train_step()]
        except (tf.errors.UnavailableError, tf.errors.CancelledError, tf.errors.AbortedError,
                tf.errors.DeadlineExceededError) as error:
            if self.updater.share.workers == 1:
                raise
            # The chief's checkpoints, which every worker continues from.
            latest = runs.latest_checkpoint(self.run.run_dir)
            raise WorkerLost(
                f"lost contact with another worker in update {number} "
                f"({type(error).__name__}) — " + (
                    f"start every worker again with --run_dir {self.run.run_dir} to continue "
                    f"from {latest}" if latest else "no checkpoint was saved; start every worker "
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
        latest = self.run.latest_checkpoint
        if latest is None:
            return "no checkpoint was saved; lower --learning_rate and start again"
        return (f"the last checkpoint, {latest}, holds finite weights; lower --learning_rate "
                "and continue from it with --checkpoint")

    def log_window(self, step, window):
        """The training line of the updates since the last, on the console and in the run's
        progress file."""
        loss, accuracy, seconds = np.mean(window, axis=0)
        log.info("[train step %5d] loss %.4f accuracy %.2f%% (%.3f sec/pass, %.1f images/sec)",
                 step, loss, 100 * accuracy, seconds / self.updater.passes,
                 self.updater.examples_per_update / seconds)
        self.run.append_progress(step=step, loss=float(loss), accuracy=float(accuracy),
                                 seconds=round(self.seconds, 3))

    def write_train_scalars(self, step, window, update_loss, learning_rate):
        """TensorBoard's training scalars: loss and accuracy as on the console, means over the
        updates since the last point; update_loss, the last update's alone; the last update's
        learning rate; images per second over the window."""
        loss, accuracy, seconds = np.mean(window, axis=0)
        self.run.write_scalars("train", step, loss=loss, accuracy=accuracy,
                               update_loss=update_loss, learning_rate=learning_rate,
                               images_per_sec=self.updater.examples_per_update / seconds)

    def test_sample(self, step):
        """The loss and accuracy of one batch of the test set, logged and written."""
        test_loss, test_accuracy = (float(v) for v in self.updater.test_step())
        self.run.write_scalars("test", step, loss=test_loss, accuracy=test_accuracy)
        log.info("[test  step %5d] loss %.4f accuracy %.2f%% (one batch)", step, test_loss,
                 100 * test_accuracy)

    def write_input_images(self):
        """A few training inputs, augmented as the model sees them."""
        data, config = self.updater.data, self.config
        images, _ = next(iter(input_ops.train_dataset(data, 4, config.seed, config.augment)))
        self.run.write_images("input_images", images, self.step)

    def save(self):
        """Saves the current state, unless this run directory holds it already (this process
        saved or restored this step; a newer checkpoint skipped as unreadable is overwritten);
        never non-finite weights (an update can overflow them while its loss and gradients were
        finite)."""
        if self.saved_step != self.step or self.run.latest_checkpoint is None:
            if not all(np.isfinite(v.numpy()).all() for v in self.updater.model.weights):
                raise Diverged(f"the weights are not finite at step {self.step} — "
                               f"{self.last_good_checkpoint()}")
            self.clock.assign(self.seconds)
            path = self.run.save(self.step)
            self.saved_step = self.step
            if self.chief:
                log.info("saved checkpoint %s", path)
        self.run.flush()

    def write_result(self, loss, accuracy, confusion, data_read):
        """<run>/result.json, written when a run ends: the evaluation of its last checkpoint in
        the shape `evaler.py --json` prints, the training time and throughput, the seconds this
        process took from the end of reading the data (time.time() `data_read`) to its first
        update (null if it made none), and the resolved flags."""
        updater = self.updater
        result = runs.report(self.run.latest_checkpoint, loss, accuracy, confusion,
                             updater.data.class_names)
        seconds = self.seconds
        examples = self.step * updater.examples_per_update
        first_update = self.first_update_done and round(self.first_update_done - data_read, 3)
        result.update(seconds=round(seconds, 3), images_per_sec=round(examples / seconds, 2),
                      seconds_to_first_update=first_update, config=vars(self.config))
        self.run.write_result(result)


def record_setup(config, updater):
    """What config.json records beyond the flags: how the run was laid out, its size, and what
    its network takes and tells apart (so that export.py and predict.py need no dataset)."""
    data = updater.data
    config.image_shape = list(data.image_shape)
    config.num_classes = data.num_classes
    config.class_names = list(data.class_names)
    config.central_fraction = input_ops.central_fraction(data)
    config.replicas = updater.share.replicas
    config.workers = updater.share.workers
    config.strategy_class = distribution.strategy_name(updater.strategy)
    config.accumulation_steps = updater.passes
    config.examples_per_pass = updater.pass_size
    config.parameters = updater.model.count_params()
    config.format_version = runs.FORMAT_VERSION


def warn_if_statistics_change(config, replicas, source_config):
    """sync_batch normalizes over batch_size x replicas examples: continuing on another number of
    replicas changes what its statistics (and moving averages) see. The other norm types see
    batch_size examples per statistic whatever the replicas, and GN none of the batch."""
    before = source_config["batch_size"] * source_config["replicas"]
    now = config.batch_size * replicas
    if config.norm_type == "sync_batch" and before != now:
        log.warning("sync_batch statistics were over %d examples in the checkpoint's run and "
                    "are over %d now", before, now)


def run_to_continue(config, argv):
    """(checkpoint prefix, its run's config.json) when this run continues one, else None. The
    flags the command line did not pass take the run's own values (train_flags.RUN_FLAGS),
    named in one line."""
    prefix = runs.checkpoint_to_continue(config)
    if not prefix:
        return None
    run_config = runs.read_run_config(prefix)
    taken = train_flags.take_run_flags(config, train_flags.given_flags(argv), run_config)
    if config.pass_size == "max" == run_config.get("pass_size"):  # as the run resolved it
        config.examples_per_pass = run_config.get("examples_per_pass")
    if taken:
        log.info("continuing with the run's own %s", " ".join(
            (f"--{name}" if value else f"--no-{name}") if isinstance(value, bool)
            else f"--{name} {value}" for name, value in taken.items()))
    return prefix, run_config


def main(argv=None):
    config = train_flags.parse_args(argv)
    util.setup_logging()
    util.check_writable_directory(config.run_dir or config.train_dir,
                                  "--run_dir" if config.run_dir else "--train_dir")
    source = run_to_continue(config, argv)
    strategy = distribution.make_strategy(config.strategy, config.devices)
    distribution.set_precision(config.precision)
    train_flags.check_devices(config, strategy.num_replicas_in_sync)
    spec, data = input_ops.load(config.dataset, config.data_dir)
    data_read = time.time()
    train_flags.check_flags(config, data)
    config.model = config.model or model_lib.default_model(data.image_shape[0])
    train_flags.check_zero_init(config)
    config.augment = (spec is not None and spec.augment) if config.augment is None else config.augment
    if source:
        runs.check_can_continue(config, *source)

    run_dir = config.run_dir or util.new_run_dir(config)
    trainer = Trainer(config, data, run_dir, strategy, source)
    log.info("run directory %s%s", run_dir, "" if trainer.chief else " (written by the chief)")
    log.info("%s on %s (%d train, %d test), %s norm, %d parameters", config.model,
             config.dataset, data.num_train, data.num_test, config.norm_type, config.parameters)
    log.info("%s; %s", distribution.describe(strategy), trainer.updater.describe_batches())
    if config.verbose:
        log.info("%s", policy.describe())
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
        trainer.run.close(finished)
    updater = trainer.updater
    loss, accuracy, confusion = runs.evaluate(updater.model, updater.eval_data, data.num_classes)
    if trainer.chief:
        trainer.write_result(loss, accuracy, confusion, data_read)
    log.info("done: step %d, test loss %.4f, test accuracy %.2f%% (%d examples)", trainer.step,
             loss, 100 * accuracy, data.num_test)


if __name__ == "__main__":
    util.run_cli(main)
