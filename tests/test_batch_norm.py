"""ops.BatchNorm, Keras's BatchNormalization computed by GroupNorm's C++ kernels in training and
by TensorFlow's fused kernel: against Keras's layer with the same weights (outputs, gradients,
moving statistics; training and inference; float32 and the mixed policies; down to one value per
channel; both training kernels), second-order gradients, the calls that keep Keras's computation,
the variables and configuration, a checkpoint of a repo model written with Keras's layer, and the
replicas of a MirroredStrategy.

Tensors are tiny; nothing trains beyond a few calls.
"""
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import model as model_lib
import ops
from kernels import policy as kernel_policy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOMENTUM, EPSILON = 0.9, 1e-5
FUSED, FUSED_GRADIENT = "FusedBatchNormV3", "FusedBatchNormGradV3"


def _layers(shape, seed=0, axis=-1, **kwargs):
    """Keras's layer and ours, built for `shape` with the same random weights: gamma, beta and
    moving statistics away from their initial values."""
    channels = shape[axis]
    rng = np.random.default_rng(seed)
    values = {"gamma": rng.uniform(0.5, 1.5, channels), "beta": rng.uniform(-1, 1, channels),
              "moving_mean": rng.normal(0, 0.5, channels),
              "moving_variance": rng.uniform(0.5, 2.0, channels)}
    layers = (keras.layers.BatchNormalization(momentum=MOMENTUM, epsilon=EPSILON, axis=axis,
                                              **kwargs),
              ops.BatchNorm(momentum=MOMENTUM, epsilon=EPSILON, axis=axis, **kwargs))
    for layer in layers:
        layer.build(shape)
        for weight in layer.weights:
            if weight.name in values:
                weight.assign(values[weight.name].astype(weight.dtype))
    return layers


def _input(shape, seed=1):
    """Activations with a mean and scale of their own per channel."""
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3, channels) + rng.uniform(-2, 2, channels)
    return tf.constant(x.astype(np.float32))


def _forward_backward(layer, x, training, upstream):
    """The layer's output and the gradients of sum(upstream * output) with respect to the
    input, gamma and beta."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
    return [y, *tape.gradient(loss, [x, layer.gamma, layer.beta])]


def _assert_close(got, expected, relative, name):
    """Equal up to `relative` times the largest magnitude of `expected`: the rounding of sums and
    of their terms scales with the largest term, not with each element."""
    got, expected = (np.asarray(tf.cast(t, tf.float64)) for t in (got, expected))
    assert got.dtype == expected.dtype
    np.testing.assert_allclose(got, expected, rtol=0, atol=relative * np.abs(expected).max(),
                               err_msg=name)


def _rounding_scales(x, gamma, variance, upstream):
    """Per channel, the scales of the float32 rounding that separates Keras's computation from
    the fused kernel's, for the output and for the input gradient.

    Keras's layer forms x * inv - mean * inv (inv = gamma / sqrt(variance + epsilon)) and its
    input gradient through the gradients of the moments: each rounds x - mean to float32 ulps of
    |x|, a relative error of xhat of ~k ulps, where k = max |x| / sqrt(variance + epsilon) says
    how many standard deviations the values lie from 0 (thousands at one value per channel,
    where the variance is 0). The output's terms are gamma * xhat, the input gradient's
    gamma * inv * upstream."""
    x, gamma, variance = (np.asarray(tf.cast(t, tf.float64)) for t in (x, gamma, variance))
    std = np.sqrt(variance + EPSILON)
    k = np.maximum(np.abs(x).max(axis=(0, 1, 2)) / std, 1.0)
    return k * np.abs(gamma), k * np.abs(gamma) / std * np.abs(np.asarray(upstream)).max()


def _assert_within(got, expected, atol, name):
    """|got - expected| <= atol elementwise, atol a number or one per channel."""
    got, expected = (np.asarray(tf.cast(t, tf.float64)) for t in (got, expected))
    excess = np.abs(got - expected) - atol
    worst = np.unravel_index(excess.argmax(), excess.shape)
    assert excess.max() <= 0, (f"{name}: {got[worst]} vs {expected[worst]} at {worst}, "
                               f"{excess.max():.3g} beyond the tolerance")


# Agreement with Keras's layer -------------------------------------------------------------------

# The rounding of a low-precision output or input gradient, relative to the largest value: 1 ulp
# is 2**-8 (bfloat16) / 2**-11 (float16) of the value, so 2 ulps of the largest. Gamma's and
# beta's gradients and the statistics are float32 sums of the same rounded values in both layers.
ROUNDING = {"float32": 0.0, "mixed_bfloat16": 2 ** -7, "mixed_float16": 2 ** -10}
# One value per channel (batch 1, 1x1), two, four, 18 and 100.
SHAPES = [(1, 1, 1, 8), (2, 1, 1, 8), (1, 2, 2, 8), (2, 3, 3, 8), (4, 5, 5, 16)]


@pytest.fixture(params=["group_norm_cpp", "fused"])
def training_kernel(request, kernel_switches):
    """Runs a test with BN's training normalization on GroupNorm's C++ kernels, then on the
    fused kernel (the C++ kernels switched off)."""
    if request.param == "fused":
        kernel_switches(cpp_kernels=False)
    elif not kernel_policy.cpp_kernels_available():
        pytest.skip("the C++ kernels cannot be built here (see tests/test_kernels.py)")
    return request.param


@pytest.mark.parametrize("policy", ROUNDING)
@pytest.mark.parametrize("shape", SHAPES)
def test_training_matches_keras(shape, policy, training_kernel):
    """Three training calls: outputs, gradients and the moving statistics after each. Outputs and
    input gradients to 1e-6 of `_rounding_scales` (~16 float32 ulps), gamma's and beta's
    gradients to 1e-5 of their largest value (float32 sums of up to 100 terms), the statistics
    to 1e-6."""
    theirs, ours = _layers(shape, dtype=policy)
    upstream, rounding = _input(shape, seed=2), ROUNDING[policy]
    for step in range(3):
        x = _input(shape, seed=10 + step)
        batch_variance = tf.math.reduce_variance(
            tf.cast(tf.cast(x, ours.compute_dtype), tf.float64), axis=[0, 1, 2])
        expected = _forward_backward(theirs, x, True, upstream)
        got = _forward_backward(ours, x, True, upstream)
        assert got[0].dtype == expected[0].dtype == ours.compute_dtype
        scales = _rounding_scales(x, theirs.gamma, batch_variance, upstream)
        for name, g, e, scale in zip(["output", "input gradient"], got, expected, scales):
            atol = 1e-6 * scale + rounding * np.abs(np.asarray(tf.cast(e, tf.float32))).max()
            _assert_within(g, e, atol, f"{name}, step {step}")
        _assert_close(got[2], expected[2], 1e-5, f"gamma gradient, {step}")
        _assert_close(got[3], expected[3], 1e-5, f"beta gradient, {step}")
        for name in ("moving_mean", "moving_variance"):
            _assert_close(getattr(ours, name), getattr(theirs, name), 1e-6, f"{name}, {step}")


def _input_gradient_penalty_gradient(layer, x):
    """d/dx of sum((d/dx sum(y^3))^2) in training: needs the gradient of BN's backward pass."""
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) ** 3)
        penalty = tf.reduce_sum(inner.gradient(loss, x) ** 2)
    return outer.gradient(penalty, x).numpy()


def test_second_order_gradients(training_kernel):
    """The fused kernel gives Keras's second-order gradients; GroupNorm's C++ kernels refuse them
    with a message that says how to get them."""
    theirs, ours = _layers((2, 3, 3, 8))
    x = _input((2, 3, 3, 8))
    if training_kernel == "group_norm_cpp":
        with pytest.raises(NotImplementedError, match="set GN_CPP_KERNELS=0"):
            _input_gradient_penalty_gradient(ours, x)
        return
    expected = _input_gradient_penalty_gradient(theirs, x)
    _assert_close(_input_gradient_penalty_gradient(ours, x), expected, 1e-4, "second order")


def test_one_value_per_channel_leaves_a_moving_variance_of_momentum_times_the_old():
    """At batch 1 on a 1x1 map the batch variance is 0 (Bessel's correction would divide by
    n - 1 = 0): the moving variance only decays."""
    _, ours = _layers((1, 1, 1, 8))
    before = ours.moving_variance.numpy()
    ours(_input((1, 1, 1, 8)), training=True)
    np.testing.assert_allclose(ours.moving_variance.numpy(), MOMENTUM * before, rtol=1e-6)


@pytest.mark.parametrize("policy", ROUNDING)
@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (4, 5, 5, 16)])
def test_inference_matches_keras_and_leaves_the_statistics(shape, policy):
    theirs, ours = _layers(shape, dtype=policy)
    x, upstream = _input(shape), _input(shape, seed=2)
    statistics = [ours.moving_mean.numpy(), ours.moving_variance.numpy()]
    expected = _forward_backward(theirs, x, False, upstream)
    got = _forward_backward(ours, x, False, upstream)
    tolerance = max(ROUNDING[policy], 1e-5)
    assert got[0].dtype == expected[0].dtype == ours.compute_dtype
    for name, g, e in zip(["output", "input gradient", "gamma gradient", "beta gradient"],
                          got, expected):
        _assert_close(g, e, tolerance, name)
    np.testing.assert_array_equal(ours.moving_mean.numpy(), statistics[0])
    np.testing.assert_array_equal(ours.moving_variance.numpy(), statistics[1])


def test_a_frozen_layer_normalizes_by_its_moving_statistics_in_training():
    """As in Keras's layer, trainable=False means inference mode and no update."""
    theirs, ours = _layers((4, 3, 3, 8))
    statistics = ours.moving_mean.numpy()
    theirs.trainable = ours.trainable = False
    x = _input((4, 3, 3, 8))
    _assert_close(ours(x, training=True), theirs(x, training=True), 1e-6, "output")
    _assert_close(ours(x, training=True), ours(x, training=False), 0, "output")
    np.testing.assert_array_equal(ours.moving_mean.numpy(), statistics)


@pytest.mark.parametrize("scale,center", [(False, True), (True, False), (False, False)])
def test_without_gamma_or_beta_matches_keras(scale, center):
    theirs, ours = _layers((4, 3, 3, 8), scale=scale, center=center)
    x = _input((4, 3, 3, 8))
    for training in (True, False):
        _assert_close(ours(x, training=training), theirs(x, training=training), 1e-6,
                      f"output, training={training}")
    _assert_close(ours.moving_variance, theirs.moving_variance, 1e-6, "moving variance")


# Where the fast kernels run, and where Keras's computation does ---------------------------------

def _op_types(layer, x, training, **call_arguments):
    """The op types of a traced function computing the layer's output and input gradient."""
    @tf.function
    def forward_backward(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training, **call_arguments)
        return y, tape.gradient(y, x)
    return {op.type for op in forward_backward.get_concrete_function(x).graph.get_operations()}


GROUP_NORM_CPP = {"GnGroupNorm", "GnGroupNormGrad"}


@pytest.mark.parametrize("policy", ROUNDING)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("axis", [-1, 3])
def test_fast_kernels_compute_channels_last_4d(axis, training, policy, training_kernel):
    """Training normalizes on GroupNorm's C++ kernels, or with GN_CPP_KERNELS=0 on the fused
    kernel; inference on the fused kernel."""
    _, ours = _layers((2, 3, 3, 8), axis=axis, dtype=policy)
    types = _op_types(ours, _input((2, 3, 3, 8)), training)
    if training and training_kernel == "group_norm_cpp":
        assert GROUP_NORM_CPP <= types and FUSED not in types
    else:
        assert {FUSED, FUSED_GRADIENT} <= types and not GROUP_NORM_CPP & types
    assert "Rsqrt" not in types  # no tf.nn.batch_normalization, Keras's computation


@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 3, 3, 8)])
def test_fused_kernel_trains_on_one_value_per_channel_and_large_tensors(shape, monkeypatch):
    """One value per channel, and more values than the policy's batch_norm_cpp_max_values (here
    lowered below the second shape's 144)."""
    if not kernel_policy.cpp_kernels_available():
        pytest.skip("the C++ kernels cannot be built here (see tests/test_kernels.py)")
    monkeypatch.setitem(kernel_policy.THRESHOLDS, "batch_norm_cpp_max_values", 100)
    _, ours = _layers(shape)
    types = _op_types(ours, _input(shape), True)
    assert FUSED in types and not GROUP_NORM_CPP & types


FALLBACKS = {  # name: (layer arguments, input shape, call arguments)
    "rank 2": ({}, (6, 8), {}),
    "rank 3": ({}, (2, 5, 8), {}),
    "axis 1": ({"axis": 1}, (2, 8, 3, 3), {}),
    "synchronized": ({"synchronized": True}, (2, 3, 3, 8), {}),
    "renorm": ({"renorm": True}, (2, 3, 3, 8), {}),
    "float64": ({"dtype": "float64"}, (2, 3, 3, 8), {}),
    "mask": ({}, (2, 3, 3, 8), {"mask": tf.constant(np.arange(18).reshape(2, 3, 3) % 4 > 0)}),
}


@pytest.mark.parametrize("case", FALLBACKS)
def test_other_calls_take_keras_computation(case):
    arguments, shape, call_arguments = FALLBACKS[case]
    theirs, ours = _layers(shape, **arguments)
    x = tf.cast(_input(shape), ours.compute_dtype)
    types = _op_types(ours, x, True, **call_arguments)
    assert "Rsqrt" in types and FUSED not in types and FUSED_GRADIENT not in types
    for training in (True, False):
        np.testing.assert_array_equal(ours(x, training=training, **call_arguments),
                                      theirs(x, training=training, **call_arguments))
    np.testing.assert_array_equal(ours.moving_variance.numpy(), theirs.moving_variance.numpy())


def test_plain_ops_and_the_switch_take_keras_computation(kernel_switches):
    _, ours = _layers((2, 3, 3, 8))
    x = _input((2, 3, 3, 8))
    fast = {FUSED, *GROUP_NORM_CPP}
    with ops.plain_ops():
        assert not fast & _op_types(ours, x, True)
        assert not fast & _op_types(ours, x, False)
    assert fast & _op_types(ours, x, True)
    kernel_switches(fast_ops=False)
    _, built_without_fast_ops = _layers((2, 3, 3, 8))
    assert not fast & _op_types(built_without_fast_ops, x, True)
    assert fast & _op_types(ours, x, True)  # a layer keeps the switches it was built with


def test_in_a_function_xla_compiles_whole_matches_keras():
    """As trainer.py --jit_compile runs it: XLA compiles the fused kernel and its gradient."""
    theirs, ours = _layers((4, 3, 3, 8))
    x, upstream = _input((4, 3, 3, 8)), _input((4, 3, 3, 8), seed=2)
    compiled = tf.function(_forward_backward, jit_compile=True)
    expected = _forward_backward(theirs, x, True, upstream)
    for name, g, e in zip(["output", "input gradient", "gamma gradient", "beta gradient"],
                          compiled(ours, x, True, upstream), expected):
        _assert_close(g, e, 1e-5, name)
    _assert_close(ours.moving_variance, theirs.moving_variance, 1e-6, "moving variance")


# Variables, configuration, checkpoints ----------------------------------------------------------

@pytest.mark.parametrize("policy", ROUNDING)
def test_variables_are_keras_ones(policy):
    theirs, ours = _layers((2, 3, 3, 8), dtype=policy)
    assert ([(w.name, w.dtype, w.shape, w.trainable) for w in ours.weights]
            == [(w.name, w.dtype, w.shape, w.trainable) for w in theirs.weights]
            == [(name, "float32", (8,), trainable) for name, trainable in
                [("gamma", True), ("beta", True), ("moving_mean", False),
                 ("moving_variance", False)]])


def test_config_round_trip():
    layer = ops.BatchNorm(axis=3, momentum=0.8, epsilon=1e-4, center=False,
                          gamma_initializer="zeros", synchronized=True, name="bn")
    config = layer.get_config()
    assert config == keras.layers.BatchNormalization.from_config(config).get_config()
    assert ops.BatchNorm.from_config(config).get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is ops.BatchNorm and restored.get_config() == config


@pytest.mark.parametrize("norm_type", ["batch", "sync_batch"])
def test_norm_layer_gives_batch_norm(norm_type):
    layer = ops.norm_layer(norm_type, 16, name="n")
    assert type(layer) is ops.BatchNorm and isinstance(layer, keras.layers.BatchNormalization)
    assert (layer.momentum, layer.epsilon, layer.name) == (MOMENTUM, EPSILON, "n")
    assert layer.synchronized is (norm_type == "sync_batch")


def test_checkpoint_written_with_keras_layer_restores(tmp_path, monkeypatch):
    """A repo model whose BN layers were Keras's: its checkpoint restores into the model of
    ops.BatchNorm layers, every value and the outputs the same."""
    with monkeypatch.context() as patch:
        patch.setattr(ops, "BatchNorm", keras.layers.BatchNormalization)
        old = model_lib.build_model("conv", (28, 28, 1), 10, "batch", dropout=0.0)
    new = model_lib.build_model("conv", (28, 28, 1), 10, "batch", dropout=0.0)
    norms = [layer for layer in new.layers if layer.name.endswith("_norm")]
    assert len(norms) == 4 and all(type(layer) is ops.BatchNorm for layer in norms)
    assert not any(type(layer) is ops.BatchNorm for layer in old.layers)
    images = tf.random.stateless_uniform((8, 28, 28, 1), seed=(1, 2))
    for _ in range(2):
        old(images, training=True)  # moving statistics away from their initial values
    prefix = tf.train.Checkpoint(model=old).save(str(tmp_path / "model"))
    tf.train.Checkpoint(model=new).restore(prefix).assert_existing_objects_matched()
    assert [w.path for w in new.weights] == [w.path for w in old.weights]
    for got, expected in zip(new.weights, old.weights):
        np.testing.assert_array_equal(got.numpy(), expected.numpy(), err_msg=got.path)
    for training in (False, True):
        _assert_close(new(images, training=training), old(images, training=training), 1e-5,
                      f"logits, training={training}")


# Replicas ---------------------------------------------------------------------------------------

REPLICAS = """
import numpy as np, keras, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import ops
from kernels import policy as kernel_policy
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
x = np.random.default_rng(0).standard_normal((8, 3, 3, 4)).astype(np.float32)
x[4:] = 3 * x[4:] + 2  # the second replica's examples have other statistics
with strategy.scope():
    layers = [keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5),
              ops.BatchNorm(momentum=0.9, epsilon=1e-5)]
batches = iter(strategy.experimental_distribute_dataset(
    tf.data.Dataset.from_tensor_slices(x).batch(8)))
per_replica = next(batches)

@tf.function
def step(x):
    return strategy.run(lambda x: [layer(x, training=True) for layer in layers], args=(x,))

for _ in range(2):
    theirs, ours = (strategy.experimental_local_results(y) for y in step(per_replica))
for replica, (got, expected) in enumerate(zip(ours, theirs)):
    one = keras.layers.BatchNormalization(epsilon=1e-5)(x[4 * replica:4 * replica + 4],
                                                         training=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(got, one, atol=1e-5)
for name in ("moving_mean", "moving_variance"):
    np.testing.assert_allclose(*(getattr(layer, name).numpy() for layer in layers), rtol=1e-5)
print("ok")
"""


def test_replicas_use_their_own_batch_and_update_as_keras_does():
    """Two replicas of a MirroredStrategy (its own process: logical devices are set before
    TensorFlow starts): each normalizes by its own examples' statistics, and the moving
    statistics after `strategy.run` are those of Keras's layer."""
    process = subprocess.run([sys.executable, "-c", REPLICAS], cwd=REPO, capture_output=True,
                             text=True, timeout=300,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert process.returncode == 0 and process.stdout.strip() == "ok", process.stderr[-3000:]


# Ghost batches ------------------------------------------------------------------------------------

def _ghost_and_separate(shape, ghost_batch_size, seed=0):
    """A BN layer over ghost batches of `ghost_batch_size` and one without, with the same
    weights and moving statistics (non-trivial ones, so their averaging shows)."""
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    layers = []
    for ghost in (ghost_batch_size, None):
        layer = ops.BatchNorm(momentum=0.9, epsilon=1e-5, ghost_batch_size=ghost)
        layer.build(shape)
        layers.append(layer)
    for values in zip(*(layer.weights for layer in layers)):
        initial = rng.uniform(0.5, 1.5, channels).astype(np.float32)
        for variable in values:
            variable.assign(initial)
    return layers


@pytest.mark.parametrize("kernel", ["cpp", "tf_ops", "plain"])
def test_ghost_batches_compute_what_separate_calls_compute(kernel, kernel_switches):
    """One call over 4 ghost batches of 2 == 4 calls of 2 examples, one after another: the
    outputs, the input and parameter gradients, and the moving statistics they leave."""
    if kernel == "cpp" and not kernel_policy.cpp_kernels_available():
        pytest.skip("the C++ kernels cannot be built here (see tests/test_kernels.py)")
    kernel_switches(**{"cpp": {}, "tf_ops": {"cpp_kernels": False},
                       "plain": {"fast_ops": False}}[kernel])
    shape = (8, 5, 5, 16)
    ghosted, separate = _ghost_and_separate(shape, 2)
    assert kernel_policy.ghost_batch_norm_kernel(ghosted._switches, _input(shape)) == kernel
    x = _input(shape)
    upstream = _input(shape, seed=2)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        outputs = ghosted(x, training=True)
        loss = tf.reduce_sum(outputs * upstream)
    got_gradients = tape.gradient(loss, [x, ghosted.gamma, ghosted.beta])
    expected_outputs, expected_gradients = [], [0.0, 0.0, 0.0]
    for start in range(0, shape[0], 2):
        piece = x[start:start + 2]
        with tf.GradientTape() as tape:
            tape.watch(piece)
            output = separate(piece, training=True)
            loss = tf.reduce_sum(output * upstream[start:start + 2])
        gradient = tape.gradient(loss, [piece, separate.gamma, separate.beta])
        expected_outputs.append(output)
        expected_gradients[0] = gradient[0] if start == 0 else tf.concat(
            [expected_gradients[0], gradient[0]], 0)
        expected_gradients[1] += gradient[1]
        expected_gradients[2] += gradient[2]
    np.testing.assert_allclose(outputs, tf.concat(expected_outputs, 0), rtol=1e-5, atol=1e-5)
    for got, expected in zip(got_gradients, expected_gradients):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    for got, expected in ((ghosted.moving_mean, separate.moving_mean),
                          (ghosted.moving_variance, separate.moving_variance)):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)


def test_ghost_batches_leave_inference_and_whole_batches_alone():
    """In inference the moving statistics normalize, whatever the ghost batch size; a batch no
    larger than it is one ghost batch; and the configuration round-trips."""
    shape = (4, 3, 3, 8)
    ghosted, separate = _ghost_and_separate(shape, 4)
    x = _input(shape)
    np.testing.assert_array_equal(ghosted(x, training=False), separate(x, training=False))
    np.testing.assert_allclose(ghosted(x, training=True), separate(x, training=True), atol=1e-6)
    config = ghosted.get_config()
    assert config["ghost_batch_size"] == 4
    assert ops.BatchNorm.from_config(config).ghost_batch_size == 4
    assert "ghost_batch_size" not in separate.get_config()
    with pytest.raises(ValueError, match="does not split into ghost batches of 3"):
        ops.BatchNorm(ghost_batch_size=3)(x, training=True)
