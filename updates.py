"""What training computes: the network, optimizer and input streams of a run, and one update.

An update averages the gradients of `passes` forward/backward passes over all replicas, each
replica's pass over `batch_size` examples (one BN statistic), and applies them once.
`trainer.py` drives updates (its loop, run directory and signals); tests and benchmarks make them
directly with `Updater(config, data).train_step()`.
"""
import math

import keras
import tensorflow as tf

import distribution
import input_ops
import model as model_lib
import ops
import schedules
import train_flags
from kernels import optimizers, policy
from util import UsageError


# --pass_size max fills at most this share of the memory free when a run starts.
PASS_MEMORY_SHARE = 0.5


def requested_pass_size(config, replicas):
    """The examples of one replica's forward-backward pass that the flags ask for: --pass_size
    (max: the replica's share of the update), by default --batch_size."""
    size = train_flags.examples_per_pass(config.pass_size, config.batch_size,
                                         config.max_batch_size, replicas)
    if size % config.batch_size:
        raise UsageError(f"--pass_size {config.pass_size} is not a multiple of --batch_size "
                         f"{config.batch_size} — pass a multiple of it, or leave --pass_size out")
    if size > config.batch_size and config.no_accumulate:
        raise UsageError("--no_accumulate makes every update one batch of --batch_size, which "
                         "leaves nothing to pass at once — leave --pass_size out, or drop "
                         "--no_accumulate")
    if size > config.batch_size and config.norm_type == "sync_batch":
        raise UsageError("--norm_type sync_batch takes its statistics over the replicas' batches "
                         "and has no ghost batches — leave --pass_size out, or use --norm_type "
                         "batch")
    return size


def pass_size(config, data, replicas):
    """(a replica's examples per pass, what bounded --pass_size max, or None). max takes the
    replica's share of the update, or the largest pass of whole batches dividing it that fits
    PASS_MEMORY_SHARE of the free memory; a continued run keeps the size it resolved to."""
    size = requested_pass_size(config, replicas)
    if config.pass_size != "max" or size == config.batch_size:
        return size, None
    kept = getattr(config, "examples_per_pass", None)  # from the continued run's config.json
    if kept and size % kept == 0 and kept % config.batch_size == 0:
        return kept, f"{kept} examples, as the run it continues resolved it"
    per_example = activation_bytes_per_example(build_model(config, data, size))
    free = free_memory_bytes()
    if free is None:
        return size, (f"the whole update, ~{memory_text(size * per_example)} of activations by "
                      "estimate; unbounded, as TensorFlow does not tell this device's free memory")
    fitting = largest_fitting_pass(size, config.batch_size, per_example,
                                   PASS_MEMORY_SHARE * free)
    share = f"{PASS_MEMORY_SHARE:.0%} of the {memory_text(free)} free"
    if fitting == size:
        return size, (f"the whole update, ~{memory_text(size * per_example)} of activations by "
                      f"estimate, within {share}")
    return fitting, (f"{fitting} of the replica's {size} examples, what fits in {share} "
                     f"(~{memory_text(per_example)} of activations an example, by estimate)")


def largest_fitting_pass(share, batch_size, bytes_per_example, budget):
    """The largest multiple of `batch_size` that divides `share` and whose examples take at most
    `budget` bytes; `batch_size` when none does."""
    return max((size for size in range(batch_size, share + 1, batch_size)
                if share % size == 0 and size * bytes_per_example <= budget), default=batch_size)


def activation_bytes_per_example(model):
    """An estimate of one example's memory in a forward-backward pass: every layer's output,
    which the backward pass keeps, and as much again for its gradient."""
    return 2 * sum(math.prod(layer.output.shape[1:]) * tf.as_dtype(layer.output.dtype).size
                   for layer in model.layers)


def free_memory_bytes():
    """The memory free for a pass: the CPU's available memory (Linux's MemAvailable), None on a
    GPU (TensorFlow does not tell its free memory) or where the system does not say."""
    if policy.gpu_visible():
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def memory_text(count):
    """`count` bytes as GiB, or MiB below one GiB."""
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def passes_per_update(config, replicas, size):
    """Forward passes over all replicas per update of passes of `size` examples a replica:
    max_batch_size / (size x replicas), or 1 when accumulation is off or one pass holds
    max_batch_size examples already."""
    per_pass = size * replicas
    if size > config.batch_size and config.max_batch_size % per_pass:
        raise UsageError(f"--pass_size {config.pass_size} does not divide updates of "
                         f"--max_batch_size {config.max_batch_size} over {replicas} replica(s) — "
                         "pass a --pass_size that does, or max, or leave it out")
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


def build_model(config, data, examples_per_pass):
    """The `--model` network for this dataset, its BN normalizing ghost batches of --batch_size
    when a replica's pass holds more (`examples_per_pass`), its batch renorm relaxing its
    clipping over --max_training_step as the paper's over its run (ops.paper_renorm_relax); a
    bad --groups or --channels_per_group becomes a one-line error."""
    ghost_batch_size = config.batch_size if examples_per_pass > config.batch_size else None
    try:
        return model_lib.build_model(config.model, data.image_shape, data.num_classes,
                                     config.norm_type, config.groups, config.weight_std,
                                     config.dropout, config.channels_per_group,
                                     config.zero_init_residual, ghost_batch_size,
                                     ops.paper_renorm_relax(config.max_training_step))
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


class Updater:
    """The network and optimizer of a run (mirrored on every replica of `strategy`), its input
    streams, and the compute of one update (`train_step`) and of one test batch (`test_step`).
    Construction seeds Keras's random streams with --seed, so the same flags build the same
    weights.

    Each worker reads its share of every pass from one tf.data iterator of per-replica batches and
    hands them to its replicas; that iterator is part of `streams`, which a checkpoint holds
    (tf.distribute's own distributed iterators cannot be checkpointed), so continuing is exact on
    any number of devices."""

    def __init__(self, config, data, strategy=None):
        self.config = config
        self.data = data
        self.strategy = strategy or tf.distribute.get_strategy()
        self.share = distribution.input_share(self.strategy)
        # A replica's; sizing --pass_size max builds a network, so before the seeding.
        self.pass_size, self.pass_size_bound = pass_size(config, data, self.share.replicas)
        self.examples_per_pass = self.pass_size * self.share.replicas
        self.passes = passes_per_update(config, self.share.replicas, self.pass_size)
        keras.utils.set_random_seed(config.seed)
        with self.strategy.scope():
            self.model = build_model(config, data, self.pass_size)
            check_statistics(config, self.model, self.share.replicas)
            self.optimizer = build_optimizer(config)
            self.optimizer.build(self.model.trainable_variables)
        ops.follow_updates(self.model, self.optimizer.iterations)
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.forward_backward = (tf.function(self.loss_and_gradients, jit_compile=True)
                                 if config.jit_compile else self.loss_and_gradients)
        self.train_iterator = iter(input_ops.train_dataset(data, self.pass_size, config.seed,
                                                           config.augment, self.share))
        eval_batch = max(config.batch_size, config.max_batch_size)
        self.test_iterator = iter(input_ops.test_sample_dataset(data, eval_batch, config.seed))
        self.eval_data = input_ops.eval_dataset(data, eval_batch)
        # Where the random streams stand: the input pipeline and the dropout seeds.
        self.streams = tf.train.Checkpoint(input=self.train_iterator,
                                           dropout_seeds=dropout_seeds(self.model))
        # 1 once this worker was asked to stop; summed over the workers in every update (a local
        # variable, made outside the strategy's scope, and kept out of checkpoints).
        self.stop_requested = tf.Variable(0.0, trainable=False)

    @property
    def step(self):
        return int(self.optimizer.iterations.numpy())

    @property
    def examples_per_update(self):
        return self.passes * self.examples_per_pass

    def describe_batches(self):
        """E.g. '2 replicas x 4 examples, 2 passes per update = 16 examples per update'."""
        replicas, passes = self.share.replicas, self.passes
        ghosts = (f" (ghost batches of {self.config.batch_size})"
                  if self.pass_size > self.config.batch_size else "")
        bound = f" (--pass_size max: {self.pass_size_bound})" if self.pass_size_bound else ""
        return (f"{replicas} replica{'s' if replicas > 1 else ''} x {self.pass_size} "
                f"examples{ghosts}, {passes} pass{'es' if passes > 1 else ''} per update = "
                f"{self.examples_per_update} examples per update{bound}")

    @tf.function
    def train_step(self):
        """One update: `passes` forward/backward passes over all replicas, whose gradients are
        summed over the replicas and the passes, then applied once. Returns the mean loss and
        accuracy over the update's examples, the gradients' global norm and whether some worker
        asked to stop (then every worker learns it in the same update)."""
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
        return (total_loss / self.passes, total_correct / self.examples_per_update,
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
        """The loss and accuracy of the next batch of the test sample."""
        images, labels = next(self.test_iterator)
        logits = self.model(images, training=False)
        accuracy = tf.reduce_mean(tf.cast(tf.equal(
            tf.argmax(logits, axis=-1, output_type=tf.int32), labels), tf.float32))
        return self.loss_fn(labels, logits), accuracy
