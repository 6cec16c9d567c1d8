"""Measures speed on this machine and prints ratios (absolute times vary between machines), after
a first line naming the CPU and its vector instruction sets.

    python benchmarks/bench.py                     # every section, a table each
    python benchmarks/bench.py --quick --json      # fewer repeats; machine-readable
    python benchmarks/bench.py --sections norm step
    GN_FAST_OPS=0 python benchmarks/bench.py       # the same with the plain ops
    GN_CPP_KERNELS=0 python benchmarks/bench.py    # GroupNorm's TensorFlow-op kernels, not C++
    GN_ONEDNN_CONV=0 python benchmarks/bench.py    # TensorFlow's own convolution gradients

Sections:
  norm     normalization layers, forward + backward, over keras BatchNormalization (which in Keras
           3 is tf.nn.moments + tf.nn.batch_normalization, not a fused kernel) on three shapes, in
           float32 and bfloat16; beside it TensorFlow's fused kernel as tf.keras 2 called it
           (FusedBatchNormV3 updating the moving averages itself), ops.BatchNorm on that kernel
           (GN_CPP_KERNELS=0) and ops.BatchNorm as --norm_type batch trains with (the kernels
           kernels/policy.py picks); and the small-batch family (batch_renorm, frn, evonorm_s0,
           evonorm_b0), the slowest of them over GN
  step     one training step (forward, backward, the trainer's fused Adam) of each model with
           BN and GN at batch 2 and 32: ms, images/s, GN / BN, and step / forward-only; where
           torch is importable, the same step of `conv` and `resnet20` rebuilt in PyTorch
           (benchmarks/torch_step.py, in its own process right after ours) and our time /
           PyTorch's
  ghost    trainer.py's update of 64 examples on the sample at batch 2 and 1, conv and resnet20
           with BN and GN: one pass of all 64 (--pass_size max; BN over ghost batches) over
           one pass per batch, one after another (the default); and the floor no normalization
           kernel can go below: the same net with --norm_type none in one pass
  input    the tf.data pipeline from an HDF5 file: images/s, and the fraction of a training step
           spent waiting for input
  convert  writing 70,000 28x28 images (Fashion-MNIST's size) into the HDF5 format
  scale    trainer.py's own update of 32 examples on the sample, conv and resnet20 with GN and
           BN: 2 logical devices x 16 over 1 x 32, mixed_bfloat16 over float32, --jit_compile
           over the plain graph (the process splits its CPU into 2 logical devices first; the
           other sections run on the first, as without the split)
  memory   trainer.py processes (resnet20, 2 updates) on the bundled sample and on a generated
           file of Tiny ImageNet's size (100,000 + 10,000 images of 64x64x3): peak RSS, and the
           seconds from the end of the HDF5 read to the first update

Every candidate of a comparison is timed in the same process, interleaved in several rounds:
times are the median round, ratios the median over rounds of the two candidates' times in a
round.
"""
import argparse
import gc
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import util  # noqa: E402

util.quiet_tensorflow(sys.argv[1:])  # before anything imports TensorFlow

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import distribution  # noqa: E402
import input_ops  # noqa: E402
import model as model_lib  # noqa: E402
import ops  # noqa: E402
import train_flags  # noqa: E402
import updates  # noqa: E402
from datasets import hdf5_format  # noqa: E402
from kernels import cpu, optimizers, policy  # noqa: E402

SECTIONS = ("norm", "step", "ghost", "input", "convert", "scale", "memory")
NORM_SHAPES = [(32, 32, 32, 64), (8, 56, 56, 256), (2, 16, 16, 512)]
GROUPS = 32
MODELS = {"conv": (32, 3, 32), "resnet20": (32, 3, 8), "resnet": (64, 3, 32)}  # size, C, GN G
STEP_BATCHES = (2, 32)
# Instances of each (model, norm) in the step section: 4 for the two target models, 2 for the
# large resnet, whose instances cost memory and minutes.
STEP_INSTANCES = {"conv": 4, "resnet20": 4, "resnet": 2}
TARGETS = {  # key: (what is measured, the largest value that meets the target)
    "gn_over_bn_layer": ("GN / BN layer, [32,32,32,64]", 0.8),
    "gn_over_keras_gn_layer": ("GN / keras GN layer, [8,56,56,256]", 0.4),
    "gn_over_fused_bn_layer": ("GN / fused BN layer as tf.keras 2 ran it, float32, worst of the "
                               "three shapes", 0.9),
    "our_bn_over_fused_bn_layer": ("our BN / fused BN layer as tf.keras 2 ran it, float32, worst "
                                   "of the three shapes", 1.0),
    "family_over_gn_layer": ("slowest of the small-batch family / GN layer, float32, worst of "
                             "the three shapes", 1.5),
    "gn_over_bn_step": ("train step GN / BN, conv and resnet20, batch 2 and 32 (worst)", 1.0),
    "step_over_forward": ("train step / forward-only, conv, batch 32", 6.0),
    "step_over_torch": ("train step / PyTorch's, conv and resnet20, BN and GN, batch 2 and 32 "
                        "(worst)", 1.0),
    "one_pass_at_batch_2": ("update of 64 at batch 2, --pass_size max / one pass per batch, "
                            "conv and resnet20, BN and GN (worst)", 0.35),
    "one_pass_at_batch_1": ("update of 64 at batch 1, --pass_size max / one pass per batch, "
                            "conv and resnet20, BN and GN (worst)", 0.2),
    "input_wait": ("input wait fraction, 32x32x3 crop+flip", 0.05),
    "peak_memory": ("peak RSS / (1.5 x data + footprint), Tiny-ImageNet-sized file", 1.0),
    "seconds_to_first_update": ("seconds from the HDF5 read to the first update, "
                                "Tiny-ImageNet-sized file", 5.0),
}
TORCH_STEP = os.path.join(REPO, "benchmarks", "torch_step.py")
TORCH_MODELS = ("conv", "resnet20")


def time_rounds(candidates, rounds, seconds_per_round):
    """{name: [seconds per call in each round]}. The rounds are interleaved, in a new random order
    each time, so that slow spells of the machine and the cache left by the previous candidate hit
    every candidate alike."""
    for fn in candidates.values():
        _seconds(fn, 1)  # trace and compile
    repeats = {name: max(1, round(seconds_per_round / _seconds(fn, 1)))
               for name, fn in candidates.items()}
    times = {name: [] for name in candidates}
    order = list(candidates)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            times[name].append(_seconds(candidates[name], repeats[name]))
    return times


def median(times):
    """{name: its median round's seconds per call}."""
    return {name: float(np.median(rounds)) for name, rounds in times.items()}


def ratio(times, numerators, denominators):
    """The median over rounds of the numerators' summed time / the denominators' summed time in
    the same round: pairing them within a round cancels the machine's slow spells, which a ratio
    of best rounds does not."""
    def summed(names):
        return np.sum([times[name] for name in names], axis=0)
    return float(np.median(summed(numerators) / summed(denominators)))


def release_previous():
    """Frees what earlier comparisons built (models, traced functions), so that each comparison
    starts from a similar memory state instead of a heap grown by the ones before."""
    keras.backend.clear_session()
    gc.collect()


def _seconds(fn, repeats):
    """Seconds per call of `repeats` calls, waiting for the last result."""
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    tf.nest.map_structure(lambda t: t.numpy(), result)
    return (time.perf_counter() - start) / repeats


# Normalization layers ---------------------------------------------------------------------------

class KerasTwoFusedBatchNorm(keras.layers.Layer):
    """Batch norm in training as tf.keras 2's BatchNormalization computed it (fused=True): one
    FusedBatchNormV3 that also updates the moving mean and variance (`exponential_avg_factor`),
    the moving averages then assigned, with no other op. The baseline a tf.keras 2 user had."""

    def __init__(self, momentum=0.99, epsilon=1e-3, **kwargs):
        super().__init__(**kwargs)
        self.momentum, self.epsilon = momentum, epsilon

    def build(self, input_shape):
        channels = input_shape[-1]
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="ones",
                                     autocast=False)
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros",
                                    autocast=False)
        self.moving_mean = self.add_weight(name="moving_mean", shape=(channels,),
                                           initializer="zeros", trainable=False, autocast=False)
        self.moving_variance = self.add_weight(name="moving_variance", shape=(channels,),
                                               initializer="ones", trainable=False,
                                               autocast=False)

    def call(self, inputs):
        outputs, mean, variance = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=self.gamma, offset=self.beta, mean=self.moving_mean,
            variance=self.moving_variance, epsilon=self.epsilon,
            exponential_avg_factor=1.0 - self.momentum, data_format="NHWC", is_training=True)[:3]
        self.moving_mean.assign(mean)
        self.moving_variance.assign(variance)
        return outputs


# The small-batch family, as the models build them (their nonlinearity on); the norm section
# times each against GN.
FAMILY = {
    "batch_renorm": lambda dtype: ops.BatchRenorm(epsilon=1e-5, dtype=dtype),
    "frn": lambda dtype: ops.FilterResponseNorm(dtype=dtype),
    "evonorm_s0": lambda dtype: ops.EvoNormS0(GROUPS, epsilon=1e-5, dtype=dtype),
    "evonorm_b0": lambda dtype: ops.EvoNormB0(epsilon=1e-5, dtype=dtype),
}


def norm_layers(channels, dtype_policy):
    """The layers the norm section compares, each built with the kernels it names."""
    with policy.using(cpp_kernels=False):
        our_fused_batch_norm = ops.BatchNorm(epsilon=1e-5, dtype=dtype_policy)
    return {
        "batch (keras)": keras.layers.BatchNormalization(epsilon=1e-5, dtype=dtype_policy),
        "batch (tf.keras 2)": KerasTwoFusedBatchNorm(epsilon=1e-5, dtype=dtype_policy),
        "batch (ours, fused)": our_fused_batch_norm,
        "batch (ours)": ops.BatchNorm(epsilon=1e-5, dtype=dtype_policy),
        "group (ours)": ops.GroupNorm(GROUPS, epsilon=1e-5, dtype=dtype_policy),
        "group (keras)": keras.layers.GroupNormalization(GROUPS, epsilon=1e-5,
                                                         dtype=dtype_policy),
        "layer (ours)": ops.GroupNorm(1, epsilon=1e-5, dtype=dtype_policy),
        "instance (ours)": ops.GroupNorm(channels, epsilon=1e-5, dtype=dtype_policy),
        **{name: layer(dtype_policy) for name, layer in FAMILY.items()},
    }


def forward_backward(layer, x, dy):
    """A function running the layer forward and back (gradients of x and of its weights)."""
    layer.build(x.shape)

    @tf.function
    def run():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, [x, *layer.trainable_variables], output_gradients=dy)
    return run


def bench_norm(rounds, seconds):
    rows = []
    for dtype, dtype_policy in (("float32", "float32"), ("bfloat16", "mixed_bfloat16")):
        for shape in NORM_SHAPES:
            release_previous()
            x = tf.cast(tf.random.normal(shape) * 3 + 1, dtype)
            dy = tf.cast(tf.random.normal(shape), dtype)
            candidates = {name: forward_backward(layer, x, dy)
                          for name, layer in norm_layers(shape[-1], dtype_policy).items()}
            times = time_rounds(candidates, rounds, seconds)
            rows.append({"dtype": dtype, "shape": list(shape),
                         "ms": {name: 1000 * t for name, t in median(times).items()},
                         "over_bn": {name: ratio(times, [name], ["batch (keras)"])
                                     for name in times},
                         "gn_over_bn": ratio(times, ["group (ours)"], ["batch (keras)"]),
                         "gn_over_fused_bn": ratio(times, ["group (ours)"],
                                                   ["batch (tf.keras 2)"]),
                         "gn_over_our_bn": ratio(times, ["group (ours)"], ["batch (ours)"]),
                         "our_bn_over_fused_bn": ratio(times, ["batch (ours)"],
                                                       ["batch (tf.keras 2)"]),
                         "gn_over_keras_gn": ratio(times, ["group (ours)"], ["group (keras)"]),
                         "family_over_gn": max(ratio(times, [name], ["group (ours)"])
                                               for name in FAMILY)})
    return rows


def print_norm(rows):
    names = list(rows[0]["ms"])
    print("Normalization layer, forward + backward: ms (ratio to keras BatchNormalization)")
    print(f"  {'dtype':9}{'shape':18}" + "".join(f"{name:>22}" for name in names)
          + f"{'GN/fused BN':>13}{'GN/our BN':>11}{'GN/keras GN':>13}{'family/GN':>11}")
    for row in rows:
        cells = "".join(f"{f'{ms:.2f} ({over_bn:.2f}x)':>22}"
                        for ms, over_bn in zip(row["ms"].values(), row["over_bn"].values()))
        print(f"  {row['dtype']:9}{str(row['shape']):18}{cells}{row['gn_over_fused_bn']:>12.2f}x"
              f"{row['gn_over_our_bn']:>10.2f}x{row['gn_over_keras_gn']:>12.2f}x"
              f"{row['family_over_gn']:>10.2f}x")


# Training steps ---------------------------------------------------------------------------------

def train_step_function(net):
    """One update of `net` (forward, backward, the trainer's Adam) on the (images, labels) it is
    given."""
    optimizer = optimizers.Adam(1e-3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step(images, labels):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, net(images, training=True))
        gradients = tape.gradient(loss, net.trainable_variables)
        optimizer.apply_gradients(zip(gradients, net.trainable_variables))
        return loss
    return train_step


def step_functions(model_name, norm_type, batch_size):
    """(train step, forward-only) functions on a fixed random batch."""
    size, channels, groups = MODELS[model_name]
    net = model_lib.build_model(model_name, (size, size, channels), 10, norm_type,
                                groups=groups)
    images = tf.random.uniform((batch_size, size, size, channels))
    labels = tf.zeros((batch_size,), tf.int32)
    train_step = train_step_function(net)
    forward = tf.function(lambda: net(images, training=True), autograph=False)
    return (lambda: train_step(images, labels)), forward


def bench_step(models, rounds, seconds):
    """Each model and norm is built STEP_INSTANCES times and their times summed: identical
    instances of a model differ by up to 7 % in step time within one process, more
    than GN and BN differ in a conv-dominated step."""
    rows = []
    for model_name in models:
        instances = STEP_INSTANCES[model_name]
        for batch_size in STEP_BATCHES:
            release_previous()
            candidates = {}
            for norm_type in ("batch", "group"):
                for instance in range(instances):
                    step, forward = step_functions(model_name, norm_type, batch_size)
                    candidates[(norm_type, "step", instance)] = step
                    candidates[(norm_type, "forward", instance)] = forward
            times = time_rounds(candidates, rounds, seconds)
            typical = median(times)

            def keys(norm_type, kind):
                return [(norm_type, kind, instance) for instance in range(instances)]
            for norm_type in ("batch", "group"):
                step_s = float(np.mean([typical[key] for key in keys(norm_type, "step")]))
                row = {"model": model_name, "batch": batch_size, "norm": norm_type,
                       "step_ms": 1000 * step_s, "images_per_s": batch_size / step_s,
                       "step_over_forward": ratio(times, keys(norm_type, "step"),
                                                  keys(norm_type, "forward")),
                       "gn_over_bn": ratio(times, keys("group", "step"), keys("batch", "step"))}
                if model_name in TORCH_MODELS and torch_importable():
                    row["torch_ms"] = torch_step_ms(model_name, norm_type, batch_size, rounds,
                                                    seconds)
                    row["over_torch"] = row["step_ms"] / row["torch_ms"]
                rows.append(row)
    return rows


def torch_importable():
    return importlib.util.find_spec("torch") is not None


def torch_step_ms(model_name, norm_type, batch_size, rounds, seconds):
    """PyTorch's median ms per step of the same net, timed in a process of its own: in ours,
    two frameworks' thread pools would compete for the 2 cores."""
    result = subprocess.run(
        [sys.executable, TORCH_STEP, "--model", model_name, "--norm_type", norm_type,
         "--batch_size", str(batch_size), "--rounds", str(rounds), "--seconds", str(seconds)],
        capture_output=True, text=True, check=True)
    return json.loads(result.stdout)["step_ms"]


def print_step(rows):
    print("Training step (forward, backward, Adam) on a fixed batch")
    print(f"  {'model':10}{'batch':>6}{'norm':>7}{'ms/step':>10}{'images/s':>10}"
          f"{'step/fwd':>10}{'GN/BN':>8}{'PyTorch ms':>12}{'ours/PyTorch':>14}")
    for row in rows:
        torch_cells = (f"{row['torch_ms']:>12.1f}{row['over_torch']:>14.2f}"
                       if "torch_ms" in row else "")
        print(f"  {row['model']:10}{row['batch']:>6}{row['norm']:>7}{row['step_ms']:>10.1f}"
              f"{row['images_per_s']:>10.0f}{row['step_over_forward']:>10.2f}"
              f"{row['gn_over_bn']:>8.2f}{torch_cells}")


# Input pipeline ---------------------------------------------------------------------------------

def write_random_dataset(folder, name, count, shape):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
    labels = rng.integers(0, 10, count)
    hdf5_format.write_dataset(os.path.join(folder, name, "data.hdf5"),
                              {"train": (images, labels), "test": (images[:100], labels[:100])},
                              [str(i) for i in range(10)], {})


def images_per_second(dataset, batches):
    iterator = iter(dataset)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        images, _ = next(iterator)
    return batches * int(images.shape[0]) / (time.perf_counter() - start)


def wait_fraction(data, rounds, seconds):
    """1 - (step time on a fixed batch) / (step time fed by the pipeline), for the conv net with
    GN at batch 64 and crop + flip: the share of a step spent waiting for input."""
    step = train_step_function(model_lib.build_model("conv", data.image_shape, 10, "group"))
    iterator = iter(input_ops.train_dataset(data, 64, seed=0, augment=True))
    fixed = next(iterator)
    times = time_rounds({"fixed": lambda: step(*fixed), "fed": lambda: step(*next(iterator))},
                        rounds, seconds)
    return max(0.0, 1 - ratio(times, ["fixed"], ["fed"]))


def bench_input(batches, rounds, seconds):
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, shape in (("gray28", (28, 28, 1)), ("color32", (32, 32, 3))):
            write_random_dataset(folder, name, 20_000, shape)
            _, data = input_ops.load(name, folder)
            for augment in (False, True):
                rate = images_per_second(input_ops.train_dataset(data, 64, 0, augment), batches)
                rows.append({"images": "x".join(map(str, shape)), "augment": augment,
                             "images_per_s": rate})
        rows[-1]["wait_fraction"] = wait_fraction(data, rounds, seconds)
    return rows


def print_input(rows):
    print("Input pipeline from HDF5, batch 64")
    for row in rows:
        line = (f"  {row['images']:9} {'crop+flip' if row['augment'] else 'plain':10}"
                f"{row['images_per_s']:>10.0f} images/s")
        if "wait_fraction" in row:
            line += f", {100 * row['wait_fraction']:.1f}% of a conv-net GN step waiting"
        print(line)


# Conversion -------------------------------------------------------------------------------------

def bench_convert():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (70_000, 28, 28, 1), dtype=np.uint8)
    images[:, :4] = 0  # blank borders like the real digits and clothes
    labels = rng.integers(0, 10, 70_000)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        hdf5_format.write_dataset(os.path.join(folder, "data.hdf5"),
                                  {"train": (images[:60_000], labels[:60_000]),
                                   "test": (images[60_000:], labels[60_000:])},
                                  [str(i) for i in range(10)], {})
        return {"seconds": time.perf_counter() - start, "images": 70_000}


# Ghost batches ---------------------------------------------------------------------------------

GHOST_BATCHES = (2, 1)


def bench_ghost(rounds, seconds):
    """Per model, norm and batch size: the update of 64 one pass per batch and in one pass; beside
    them the same net without normalization in one pass, the floor of the one-pass time (its
    convolutions, activations and optimizer), whatever the normalization's kernels."""
    tf.get_logger().setLevel("ERROR")  # not a warning for each trainer's own trace of train_step
    _, data = input_ops.load("sample", "./datasets")
    rows = []
    for model_name in ("conv", "resnet20"):
        for norm_type in ("batch", "group"):
            for batch_size in GHOST_BATCHES:
                release_previous()
                flags = ["--batch_size", str(batch_size), "--max_batch_size", "64"]
                one_pass = [*flags, "--pass_size", "max"]
                candidates = {
                    "per batch": trainer_update(model_name, norm_type, flags, None, data),
                    "one pass": trainer_update(model_name, norm_type, one_pass, None, data),
                    "no norm": trainer_update(model_name, "none", one_pass, None, data)}
                times = time_rounds(candidates, rounds, seconds)
                ms = {name: 1000 * t for name, t in median(times).items()}
                rows.append({"model": model_name, "norm": norm_type, "batch": batch_size,
                             "per_batch_ms": ms["per batch"], "one_pass_ms": ms["one pass"],
                             "no_norm_one_pass_ms": ms["no norm"],
                             "one_pass_over_per_batch": ratio(times, ["one pass"],
                                                              ["per batch"]),
                             "no_norm_over_per_batch": ratio(times, ["no norm"],
                                                             ["per batch"])})
    return rows


def print_ghost(rows):
    print("trainer.py's update of 64 examples: one pass per batch against one pass of all 64;\n"
          "floor: the same net without normalization in one pass, over one pass per batch")
    print(f"  {'model':10}{'norm':>7}{'batch':>7}{'per batch ms':>14}{'one pass ms':>13}"
          f"{'ratio':>8}{'no norm ms':>12}{'floor':>8}")
    for row in rows:
        print(f"  {row['model']:10}{row['norm']:>7}{row['batch']:>7}{row['per_batch_ms']:>14.1f}"
              f"{row['one_pass_ms']:>13.1f}{row['one_pass_over_per_batch']:>7.2f}x"
              f"{row['no_norm_one_pass_ms']:>12.1f}{row['no_norm_over_per_batch']:>7.2f}x")


# Devices, precision, XLA -----------------------------------------------------------------------

# name: (trainer flags, whether it runs on the 2-device strategy); "1 device" is the reference.
SCALE_SETUPS = {"1 device": (["--batch_size", "32"], False),
                "2 devices": (["--batch_size", "16"], True),
                "mixed_bfloat16": (["--batch_size", "32", "--precision", "mixed_bfloat16"], False),
                "jit_compile": (["--batch_size", "32", "--jit_compile"], False)}


def trainer_update(model_name, norm_type, flags, strategy, data):
    """updates.Updater's train_step (input, passes, all-reduce, update) on `data`."""
    config = train_flags.parse_args(["--model", model_name, "--norm_type", norm_type,
                                     "--groups", "8", "--max_batch_size", "32", *flags])
    config.augment = False
    distribution.set_precision(config.precision)
    try:
        run = updates.Updater(config, data, strategy)
    finally:
        distribution.set_precision("float32")
    return lambda: run.train_step()  # which holds the trainer (a traced method does not)


def bench_scale(two_devices, rounds, seconds):
    tf.get_logger().setLevel("ERROR")  # not a warning for each trainer's own trace of train_step
    _, data = input_ops.load("sample", "./datasets")
    rows = []
    for model_name in ("conv", "resnet20"):
        for norm_type in ("batch", "group"):
            release_previous()
            candidates = {name: trainer_update(model_name, norm_type, flags,
                                           two_devices if on_two else None, data)
                          for name, (flags, on_two) in SCALE_SETUPS.items()}
            times = time_rounds(candidates, rounds, seconds)
            row = {"model": model_name, "norm": norm_type,
                   "step_ms": 1000 * median(times)["1 device"]}
            row.update({name: ratio(times, [name], ["1 device"])
                        for name in SCALE_SETUPS if name != "1 device"})
            rows.append(row)
    return rows


def print_scale(rows):
    print("trainer.py's update of 32 examples: time over 1 device x 32 in float32, plain graph")
    others = [name for name in SCALE_SETUPS if name != "1 device"]
    print(f"  {'model':10}{'norm':>7}{'ms/step':>10}" + "".join(f"{n:>16}" for n in others))
    for row in rows:
        print(f"  {row['model']:10}{row['norm']:>7}{row['step_ms']:>10.1f}"
              + "".join(f"{row[n]:>15.2f}x" for n in others))


# Memory -----------------------------------------------------------------------------------------

TINY_IMAGENET_SIZE = {"train": 100_000, "test": 10_000, "shape": (64, 64, 3), "classes": 200}
MEMORY_RUN = ["--model", "resnet20", "--groups", "8", "--batch_size", "32", "--max_batch_size",
              "32", "--max_training_step", "2"]


def write_tiny_imagenet_sized(folder, name):
    """A data.hdf5 of Tiny ImageNet's size: 100,000 train and 10,000 test uint8 images of 64x64x3
    (1.35 GB), random 8x8 blocks scaled up so that it compresses and writes in seconds. Returns
    the bytes of its images."""
    rng = np.random.default_rng(0)
    size = TINY_IMAGENET_SIZE
    splits = {}
    for split in ("train", "test"):
        blocks = rng.integers(0, 256, (size[split], 8, 8, 3), dtype=np.uint8)
        splits[split] = (blocks.repeat(8, axis=1).repeat(8, axis=2),
                         rng.integers(0, size["classes"], size[split]))
    hdf5_format.write_dataset(os.path.join(folder, name, "data.hdf5"), splits,
                              [str(i) for i in range(size["classes"])], {})
    return sum(images.nbytes for images, _ in splits.values())


def trainer_run(folder, dataset):
    """(peak RSS in bytes, result.json) of a `trainer.py` process making 2 updates of resnet20
    on `dataset`; its output goes to <folder>/<dataset>.log."""
    run_dir = os.path.join(folder, "run-" + dataset)
    command = [sys.executable, os.path.join(REPO, "trainer.py"), "--dataset", dataset,
               "--data_dir", folder, *MEMORY_RUN, "--run_dir", run_dir]
    log_path = os.path.join(folder, dataset + ".log")
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    if status:
        with open(log_path) as log:
            raise RuntimeError(f"{' '.join(command)} failed:\n{log.read()[-2000:]}")
    with open(os.path.join(run_dir, "result.json")) as f:
        return usage.ru_maxrss * 1024, json.load(f)


def bench_memory():
    """trainer.py on the bundled sample (the process's footprint) and on a Tiny-ImageNet-sized
    file: peak RSS against 1.5 x the uint8 data + that footprint, and the seconds from the end of
    the HDF5 read to the first update on both (the same network: the difference is the data's)."""
    with tempfile.TemporaryDirectory() as folder:
        footprint, sample_result = trainer_run(folder, "sample")
        data_bytes = write_tiny_imagenet_sized(folder, "tiny_imagenet_sized")
        peak, result = trainer_run(folder, "tiny_imagenet_sized")
    limit = 1.5 * data_bytes + footprint
    return {"data_bytes": data_bytes, "sample_peak_rss": footprint, "peak_rss": peak,
            "limit": limit, "peak_over_limit": peak / limit,
            "seconds_to_first_update": result["seconds_to_first_update"],
            "sample_seconds_to_first_update": sample_result["seconds_to_first_update"]}


def print_memory(row):
    gb = 1e9
    print(f"Memory of trainer.py (resnet20, 2 updates), {row['data_bytes'] / gb:.2f} GB of uint8 "
          "images (Tiny ImageNet's size)")
    print(f"  peak RSS {row['peak_rss'] / gb:.2f} GB; on the bundled sample "
          f"{row['sample_peak_rss'] / gb:.2f} GB; limit 1.5 x data + that = "
          f"{row['limit'] / gb:.2f} GB")
    print(f"  {row['seconds_to_first_update']:.1f} s from the end of the HDF5 read to the first "
          f"update; on the bundled sample {row['sample_seconds_to_first_update']:.1f} s")


# Report -----------------------------------------------------------------------------------------

def target_values(results):
    """{TARGETS key: the measured value} of each target whose section was run."""
    values = {}
    if "norm" in results:
        float32 = [row for row in results["norm"] if row["dtype"] == "float32"]
        values["gn_over_bn_layer"] = next(r["gn_over_bn"] for r in float32
                                          if r["shape"] == [32, 32, 32, 64])
        values["gn_over_keras_gn_layer"] = next(r["gn_over_keras_gn"] for r in float32
                                                if r["shape"] == [8, 56, 56, 256])
        values["gn_over_fused_bn_layer"] = max(r["gn_over_fused_bn"] for r in float32)
        values["our_bn_over_fused_bn_layer"] = max(r["our_bn_over_fused_bn"] for r in float32)
        values["family_over_gn_layer"] = max(r["family_over_gn"] for r in float32)
    if "step" in results:
        ratios = [r["gn_over_bn"] for r in results["step"] if r["model"] in ("conv", "resnet20")]
        conv32 = [r["step_over_forward"] for r in results["step"]
                  if (r["model"], r["batch"]) == ("conv", 32)]
        over_torch = [r["over_torch"] for r in results["step"] if "over_torch" in r]
        for key, measured in (("gn_over_bn_step", ratios), ("step_over_forward", conv32),
                              ("step_over_torch", over_torch)):
            if measured:
                values[key] = max(measured)
    for batch_size in GHOST_BATCHES:
        ratios = [row["one_pass_over_per_batch"] for row in results.get("ghost", [])
                  if row["batch"] == batch_size]
        if ratios:
            values[f"one_pass_at_batch_{batch_size}"] = max(ratios)
    if "input" in results:
        values["input_wait"] = results["input"][-1]["wait_fraction"]
    if "memory" in results:
        values["peak_memory"] = results["memory"]["peak_over_limit"]
        values["seconds_to_first_update"] = results["memory"]["seconds_to_first_update"]
    return values


def target_lines(values):
    """A line per measured target: what, the value, the limit and whether it is met."""
    lines = []
    for key, (name, limit) in TARGETS.items():
        if key in values:
            verdict = "met" if values[key] <= limit else "NOT met"
            lines.append(f"  {name}: {values[key]:.2f} (target <= {limit}) {verdict}")
    return lines


def parse_args(argv=None):
    parser = util.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                        help="models of the step section")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, noisier numbers")
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")
    util.add_verbose_flag(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rounds, seconds = (3, 0.1) if args.quick else (10, 0.2)
    # Logical devices must be made before TensorFlow first touches the CPU.
    two_devices = ("scale" in args.sections
                   and distribution.make_strategy("mirrored", devices=2))
    runners = {
        "norm": lambda: bench_norm(rounds, seconds),
        "step": lambda: bench_step(args.models, rounds, seconds),
        "ghost": lambda: bench_ghost(rounds, seconds),
        "input": lambda: bench_input(20 if args.quick else 100, rounds, seconds),
        "convert": bench_convert,
        "scale": lambda: bench_scale(two_devices, rounds, seconds),
        "memory": bench_memory,
    }
    printers = {"norm": print_norm, "step": print_step, "ghost": print_ghost,
                "input": print_input,
                "convert": lambda r: print(f"HDF5 conversion of {r['images']:,} 28x28 images: "
                                           f"{r['seconds']:.2f} s"),
                "scale": print_scale, "memory": print_memory}
    results = {"cpu": cpu.describe(), "kernels": policy.describe()}
    if not args.json:
        print(results["cpu"])
        print(results["kernels"])
    for section in args.sections:
        results[section] = runners[section]()
        if not args.json:
            printers[section](results[section])
    results["targets"] = target_values(results)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n".join(["Targets", *target_lines(results["targets"])]))


if __name__ == "__main__":
    main()
