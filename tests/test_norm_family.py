"""The small-batch normalizers beside GN and BN: ops.BatchRenorm, FilterResponseNorm (+ TLU),
EvoNormS0 and EvoNormB0.

Each layer against a float64 NumPy reference written from its paper's formula (outputs, and
gradients against central differences of that reference, in training and in inference); moving
statistics over several calls and over ghost batches; batch renorm against Keras's renorm with
fixed clipping and, with r_max = 1 and d_max = 0, against BatchNorm bit for bit; its clipping
schedule; the fast kernels (kernels/norm_family.cc) against the plain references in float32,
bfloat16 and float16, and where each runs; serialization, mixed precision and export of standard
ops; where the model builders put
the norms that carry their own nonlinearity; and the trainer end to end: the four norm types
train, a batch-renorm run continued from a checkpoint equals one trained straight through, and
bad flags get one line. Tensors are tiny.
"""
import json
import os
import subprocess
import sys
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

import choices
import model as model_lib
import ops
import trainer
import updates
from kernels import policy as kernel_policy
from test_train_eval import TINY, checkpoint_values, cli_error, ctrl_c_after_step, train

FAMILY = ("batch_renorm", "frn", "evonorm_s0", "evonorm_b0")
# Trainer flags of the runs below: 20 updates of 16 examples, each accumulated from two batches
# of 8 (after test_train_eval's TINY, which they override).
TWENTY = ["--max_training_step", "20", "--batch_size", "8", "--max_batch_size", "16",
          "--log_step", "10", "--test_sample_step", "10", "--write_summary_step", "10",
          "--ckpt_save_step", "10"]
SHAPE = (4, 3, 3, 6)  # N, H, W, C
MOMENTUM, EPSILON = 0.9, 1e-5


def _input(shape=SHAPE, seed=0, loc=0.5, scale=2.0):
    """Activations with a mean and a spread of their own per channel, float64 values that
    float32 holds exactly (the layers see what the references see)."""
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    x = (rng.standard_normal(shape) * scale * rng.uniform(0.5, 1.5, channels)
         + loc * rng.uniform(-1, 1, channels))
    return x.astype(np.float32).astype(np.float64)


def _channels(seed, low, high, channels=SHAPE[-1]):
    return np.random.default_rng(seed).uniform(low, high, channels)


# Float64 references, from the papers' formulas -------------------------------------------------

def np_frn(x, gamma, beta, tau=None, epsilon=1e-6, eps_l=None):
    """FRN (+ TLU): max(gamma x / sqrt(nu2 + epsilon) + beta, tau), nu2 the mean of x^2 over
    an example's positions; a learned eps_l adds |eps_l| to epsilon."""
    nu2 = np.mean(x ** 2, axis=(1, 2), keepdims=True)
    epsilon = epsilon + (0.0 if eps_l is None else np.abs(eps_l))
    y = gamma * x / np.sqrt(nu2 + epsilon) + beta
    return y if tau is None else np.maximum(y, tau)


def np_group_std(x, groups, epsilon):
    """sqrt(variance over each group's channels and positions + epsilon), per example, for each
    element of x."""
    n, c = x.shape[0], x.shape[-1]
    grouped = x.reshape(n, -1, groups, c // groups)
    std = np.sqrt(grouped.var(axis=(1, 3), keepdims=True) + epsilon)
    return np.broadcast_to(std, grouped.shape).reshape(x.shape)


def np_evonorm_s0(x, gamma, beta, v, groups, epsilon=EPSILON):
    return x / (1 + np.exp(-v * x)) / np_group_std(x, groups, epsilon) * gamma + beta


def np_evonorm_b0(x, gamma, beta, v, batch_variance=None, epsilon=EPSILON):
    """EvoNorm-B0; var_B over the batch and positions unless `batch_variance` (the moving one in
    inference) is given."""
    if batch_variance is None:
        batch_variance = x.var(axis=(0, 1, 2))
    instance_std = np.sqrt(x.var(axis=(1, 2), keepdims=True) + epsilon)
    return x / np.maximum(np.sqrt(batch_variance + epsilon), v * x + instance_std) * gamma + beta


def np_renorm_corrections(x, moving_mean, moving_variance, r_max, d_max, epsilon=EPSILON):
    """(r, d, unclipped r, unclipped d) of a training batch against the moving statistics."""
    sigma = np.sqrt(moving_variance + epsilon)
    r = np.sqrt(x.var(axis=(0, 1, 2)) + epsilon) / sigma
    d = (x.mean(axis=(0, 1, 2)) - moving_mean) / sigma
    return np.clip(r, 1 / r_max, r_max), np.clip(d, -d_max, d_max), r, d


def np_batch_renorm(x, gamma, beta, r, d, epsilon=EPSILON):
    """gamma (x_hat r + d) + beta, x_hat normalized by the batch's statistics; r and d given
    (constants to the gradient)."""
    mean, variance = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    return gamma * ((x - mean) / np.sqrt(variance + epsilon) * r + d) + beta


def np_batch_norm_inference(x, gamma, beta, moving_mean, moving_variance, epsilon=EPSILON):
    return gamma * (x - moving_mean) / np.sqrt(moving_variance + epsilon) + beta


def numeric_gradients(reference, arrays, upstream, step=1e-6):
    """Central differences of sum(upstream * reference(**arrays)) with respect to each array."""
    gradients = {}
    for name, array in arrays.items():
        gradient = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            values = []
            for sign in (1, -1):
                moved = array.copy()
                moved[index] += sign * step
                values.append(np.sum(upstream * reference(**{**arrays, name: moved})))
            gradient[index] = (values[0] - values[1]) / (2 * step)
        gradients[name] = gradient
    return gradients


def _assert_close(got, expected, relative, name):
    """Equal up to `relative` times the largest magnitude of `expected`."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert got.shape == expected.shape, name
    np.testing.assert_allclose(got, expected, rtol=0, atol=relative * np.abs(expected).max(),
                               err_msg=name)


def _set_weights(layer, shape, values):
    """Builds `layer` for `shape` (unless it is built) and assigns the weights named in
    `values`."""
    if not layer.built:
        layer.build(shape)
    for weight in layer.weights:
        if weight.name in values:
            weight.assign(np.asarray(values[weight.name], weight.dtype))
    return layer


def _forward_backward(layer, x, training, upstream, names):
    """The layer's output, and the gradients of sum(upstream * output) with respect to the input
    and the weights `names`, as float64 arrays."""
    x = tf.constant(x, tf.float32)
    weights = {w.name: w for w in layer.trainable_weights}
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.constant(upstream, tf.float32))
    gradients = tape.gradient(loss, [x] + [weights[name] for name in names])
    return np.asarray(y, np.float64), dict(zip(["x", *names], (np.asarray(g, np.float64)
                                                                for g in gradients)))


# Each layer against its reference ----------------------------------------------------------------

# Renorm's moving statistics against a batch of _input(): r beyond both bounds, and d beyond
# both, in some channels, within them in others.
RENORM_MOVING = {"moving_mean": np.array([0.0, 3.0, -20.0, 1.0, 0.0, 15.0]),
                 "moving_variance": np.array([0.01, 0.5, 1.0, 2.0, 60.0, 1.0])}


def _case(name, x):
    """(layer, training, {weight: value}, reference(x, **trainable weights) -> y) of one case of
    `test_layer_matches_its_float64_reference`."""
    gamma, beta = _channels(1, 0.5, 1.5) * np.array([1, -1] * 3), _channels(2, -1, 1)
    affine = {"gamma": gamma, "beta": beta}
    v = _channels(3, 0.3, 1.5)
    if name.startswith("frn"):
        tau = _channels(4, -0.5, 0.5)
        if name == "frn":
            return (ops.FilterResponseNorm(), None, {**affine, "tau": tau},
                    lambda x, gamma, beta, tau: np_frn(x, gamma, beta, tau))
        if name == "frn without tlu":
            return (ops.FilterResponseNorm(tlu=False), None, affine, np_frn)
        return (ops.FilterResponseNorm(learned_epsilon=0.3), None,
                {**affine, "tau": tau, "eps_l": np.array(-0.3)},
                lambda x, gamma, beta, tau, eps_l: np_frn(x, gamma, beta, tau, eps_l=eps_l))
    if name.startswith("evonorm_s0"):
        # A large epsilon in one case of each: where it is added shows.
        groups, epsilon = (2, EPSILON) if name == "evonorm_s0" else (3, 0.3)
        layer = (ops.EvoNormS0(groups=2, epsilon=epsilon) if name == "evonorm_s0" else
                 ops.EvoNormS0(channels_per_group=2, epsilon=epsilon))
        return (layer, None, {**affine, "v": v}, lambda x, gamma, beta, v: np_evonorm_s0(
            x, gamma, beta, v, groups, epsilon))
    if name.startswith("evonorm_b0"):
        moving_variance = _channels(5, 0.5, 8.0)
        training = name == "evonorm_b0 training"
        epsilon = 0.3 if training else EPSILON
        return (ops.EvoNormB0(epsilon=epsilon), training,
                {**affine, "v": v, "moving_variance": moving_variance},
                lambda x, gamma, beta, v: np_evonorm_b0(
                    x, gamma, beta, v, None if training else moving_variance, epsilon))
    if name == "batch_renorm training":
        r, d, _, _ = np_renorm_corrections(x, **RENORM_MOVING, r_max=3.0, d_max=5.0)
        return (ops.BatchRenorm(momentum=MOMENTUM, epsilon=EPSILON), True,
                {**affine, **RENORM_MOVING},
                lambda x, gamma, beta: np_batch_renorm(x, gamma, beta, r, d))
    return (ops.BatchRenorm(momentum=MOMENTUM, epsilon=EPSILON), False,
            {**affine, **RENORM_MOVING},
            lambda x, gamma, beta: np_batch_norm_inference(x, gamma, beta, **RENORM_MOVING))


CASES = ["frn", "frn without tlu", "frn learned epsilon", "evonorm_s0",
         "evonorm_s0 channels_per_group", "evonorm_b0 training", "evonorm_b0 inference",
         "batch_renorm training", "batch_renorm inference"]


@pytest.mark.parametrize("case", CASES)
def test_layer_matches_its_float64_reference(case):
    """Output and the gradients of the input and of every trainable weight, to 1e-5 of the
    largest value; the reference's gradients are central differences of the reference."""
    x = _input()
    layer, training, values, reference = _case(case, x)
    _set_weights(layer, x.shape, values)
    names = [w.name for w in layer.trainable_weights]
    upstream = _input(seed=7, loc=0.0, scale=1.0)
    y, gradients = _forward_backward(layer, x, training, upstream, names)
    arrays = {"x": x, **{name: np.asarray(values[name], np.float64) for name in names}}
    _assert_close(y, reference(**arrays), 1e-5, "output")
    expected = numeric_gradients(reference, arrays, upstream)
    for name in arrays:
        _assert_close(gradients[name], expected[name], 1e-5, f"{name} gradient")


def _assert_clipping_both_ways(x, moving_mean, moving_variance):
    """r and d of batch `x` pass both bounds (3 and 5) in some channels and stay within them in
    others: a test on this batch tests the clipping."""
    _, _, r, d = np_renorm_corrections(x, moving_mean, moving_variance, r_max=3.0, d_max=5.0)
    assert (r > 3).any() and (r < 1 / 3).any() and ((r > 1 / 3) & (r < 3)).any()
    assert (d > 5).any() and (d < -5).any() and (np.abs(d) < 5).any()


def test_the_renorm_case_clips_both_ways():
    _assert_clipping_both_ways(_input(), **RENORM_MOVING)


def test_moving_statistics_after_several_calls():
    """Three training calls: each output against the reference with the moving statistics as
    they stood, and the moving statistics after each (momentum 0.9, biased variances)."""
    renorm = _set_weights(ops.BatchRenorm(momentum=MOMENTUM, epsilon=EPSILON), SHAPE,
                          RENORM_MOVING)
    evonorm = _set_weights(ops.EvoNormB0(momentum=MOMENTUM, epsilon=EPSILON), SHAPE,
                           {"v": _channels(3, 0.3, 1.5)})
    mean, variance = RENORM_MOVING["moving_mean"], RENORM_MOVING["moving_variance"]
    evonorm_variance = np.ones(SHAPE[-1])
    ones, zeros = np.ones(SHAPE[-1]), np.zeros(SHAPE[-1])
    for call in range(3):
        x = _input(seed=10 + call, loc=2.0)
        r, d, _, _ = np_renorm_corrections(x, mean, variance, 3.0, 5.0)
        _assert_close(renorm(x.astype(np.float32), training=True),
                      np_batch_renorm(x, ones, zeros, r, d), 1e-5, f"renorm output {call}")
        _assert_close(evonorm(x.astype(np.float32), training=True),
                      np_evonorm_b0(x, ones, zeros, evonorm.v.numpy()), 1e-5,
                      f"evonorm output {call}")
        mean = MOMENTUM * mean + (1 - MOMENTUM) * x.mean(axis=(0, 1, 2))
        variance = MOMENTUM * variance + (1 - MOMENTUM) * x.var(axis=(0, 1, 2))
        evonorm_variance = MOMENTUM * evonorm_variance + (1 - MOMENTUM) * x.var(axis=(0, 1, 2))
        _assert_close(renorm.moving_mean, mean, 1e-6, f"moving mean {call}")
        _assert_close(renorm.moving_variance, variance, 1e-6, f"moving variance {call}")
        _assert_close(evonorm.moving_variance, evonorm_variance, 1e-6, f"B0 variance {call}")
    before = renorm.moving_mean.numpy(), evonorm.moving_variance.numpy()
    renorm(x.astype(np.float32), training=False)
    evonorm(x.astype(np.float32), training=False)
    np.testing.assert_array_equal(renorm.moving_mean.numpy(), before[0])
    np.testing.assert_array_equal(evonorm.moving_variance.numpy(), before[1])


# Batch renorm against Keras and BN ---------------------------------------------------------------

def test_batch_renorm_with_fixed_clipping_matches_keras_renorm():
    """Keras 3.15's renorm computes r and d from its own averages, renorm_mean and
    renorm_stddev (an average of standard deviations, with renorm_momentum), and keeps a
    moving_stddev from which it derives moving_variance; ours takes them from moving_mean and
    sqrt(moving_variance + epsilon). Set before each call to what ours uses, Keras's layer must
    give the same outputs and gradients, on batches that clip r and d both ways, and the same
    moving mean after the call (its renorm_mean too, with renorm_momentum = momentum). Its
    moving variance is not compared: it differs by design."""
    clipping = {"rmax": 3.0, "rmin": 1 / 3.0, "dmax": 5.0}
    theirs = keras.layers.BatchNormalization(momentum=MOMENTUM, epsilon=EPSILON, renorm=True,
                                             renorm_clipping=clipping, renorm_momentum=MOMENTUM)
    ours = ops.BatchRenorm(momentum=MOMENTUM, epsilon=EPSILON, r_max=3.0, d_max=5.0)
    affine = {"gamma": _channels(1, 0.5, 1.5), "beta": _channels(2, -1, 1)}
    for layer in (theirs, ours):
        _set_weights(layer, SHAPE, {**affine, **RENORM_MOVING})
    upstream = _input(seed=7, loc=0.0, scale=1.0)
    for call in range(3):
        for layer in (theirs, ours):  # far from each batch again: the clipping bites
            _set_weights(layer, SHAPE, RENORM_MOVING)
        theirs.renorm_mean.assign(ours.moving_mean)
        theirs.renorm_stddev.assign(tf.sqrt(ours.moving_variance + EPSILON))
        x = _input(seed=20 + call)
        _assert_clipping_both_ways(x, **RENORM_MOVING)
        expected = _forward_backward(theirs, x, True, upstream, ["gamma", "beta"])
        got = _forward_backward(ours, x, True, upstream, ["gamma", "beta"])
        _assert_close(got[0], expected[0], 1e-6, f"output {call}")
        for name in expected[1]:
            _assert_close(got[1][name], expected[1][name], 1e-5, f"{name} gradient {call}")
        for theirs_mean in (theirs.moving_mean, theirs.renorm_mean):
            _assert_close(ours.moving_mean, theirs_mean, 1e-6, f"moving mean {call}")


@pytest.fixture(params=["cpp", "fused", "plain"])
def training_kernel(request, kernel_switches):
    """BN's training kernels: GroupNorm's C++ kernels, the fused kernel, plain ops."""
    if request.param == "fused":
        kernel_switches(cpp_kernels=False)
    elif request.param == "plain":
        kernel_switches(fast_ops=False)
    elif not kernel_policy.cpp_kernels_available():
        pytest.skip("the C++ kernels cannot be built here (see tests/test_kernels.py)")
    return request.param


def test_batch_renorm_at_r_max_1_and_d_max_0_is_batch_norm(training_kernel):
    """Three training calls far from the moving statistics: outputs, gradients and moving
    statistics equal BatchNorm's bit for bit on its kernels (r and d fold into the kernel's
    scale and offset as 1 and 0); with plain ops, where BN takes Keras's computation, to float32
    rounding."""
    values = {"gamma": _channels(1, 0.5, 1.5), "beta": _channels(2, -1, 1), **RENORM_MOVING}
    batch_norm = _set_weights(ops.BatchNorm(momentum=MOMENTUM, epsilon=EPSILON), SHAPE, values)
    renorm = _set_weights(ops.BatchRenorm(momentum=MOMENTUM, epsilon=EPSILON, r_max=1.0,
                                          d_max=0.0), SHAPE, values)
    upstream = _input(seed=7, loc=0.0, scale=1.0)
    for call in range(3):
        x = _input(seed=30 + call, loc=3.0)
        expected = _forward_backward(batch_norm, x, True, upstream, ["gamma", "beta"])
        got = _forward_backward(renorm, x, True, upstream, ["gamma", "beta"])
        pairs = [("output", got[0], expected[0]),
                 *((f"{name} gradient", got[1][name], expected[1][name]) for name in got[1]),
                 *((name, getattr(renorm, name), getattr(batch_norm, name))
                   for name in RENORM_MOVING)]
        for name, g, e in pairs:
            if training_kernel == "plain":
                _assert_close(g, e, 1e-6, f"{name}, call {call}")
            else:
                np.testing.assert_array_equal(g, e, err_msg=f"{name}, call {call}")


def test_renorm_clipping_follows_the_schedule():
    """The paper's 5k / 25k / 40k over 80k updates, scaled to the run; (r_max, d_max) at chosen
    updates of a 400-update run: 1 and 0 up to update 25, then linear to d_max 5 at 125 and r_max
    3 at 200."""
    assert ops.paper_renorm_relax(80_000) == (5_000, 25_000, 40_000)
    relax = ops.paper_renorm_relax(400)
    assert relax == (25, 125, 200)
    expected = {0: (1, 0), 25: (1, 0), 75: (1 + 2 * 50 / 175, 2.5), 125: (1 + 2 * 100 / 175, 5),
                200: (3, 5), 399: (3, 5)}
    for updates_made, (r_max, d_max) in expected.items():
        got = ops.renorm_clipping(tf.constant(updates_made, tf.int64), 3.0, 5.0, relax)
        np.testing.assert_allclose([float(v) for v in got], [r_max, d_max], rtol=1e-6,
                                   err_msg=str(updates_made))
    assert [float(v) for v in ops.renorm_clipping(None, 3.0, 5.0)] == [3.0, 5.0]


def test_batch_renorm_reads_the_optimizer_update_count():
    """Relaxed over updates, a layer is BN before `start` and the fixed-clipping layer after the
    end, read from the update count `follow_updates` points it at; without one, it refuses to
    train."""
    x = keras.Input(SHAPE[1:])
    relaxed = ops.BatchRenorm(momentum=MOMENTUM, epsilon=EPSILON, relax=(2, 4, 6))
    net = keras.Model(x, relaxed(x))
    with pytest.raises(ValueError, match=r"relaxes its clipping over updates 2-6 and needs the "
                                         r"update count: call ops.follow_updates"):
        net(_input(), training=True)
    optimizer = keras.optimizers.SGD()
    ops.follow_updates(net, optimizer.iterations)
    # The update count is not a weight of the model.
    assert [id(w) for w in net.weights] == [id(w) for w in relaxed.weights]
    for updates_made, r_max, d_max in ((2, 1.0, 0.0), (6, 3.0, 5.0)):
        optimizer.iterations.assign(updates_made)
        fixed = ops.BatchRenorm(momentum=MOMENTUM, epsilon=EPSILON, r_max=r_max, d_max=d_max)
        for layer in (relaxed, fixed):
            _set_weights(layer, SHAPE, RENORM_MOVING)
        x = _input(seed=40).astype(np.float32)
        np.testing.assert_array_equal(relaxed(x, training=True), fixed(x, training=True))


@pytest.mark.parametrize("norm_type", ["batch_renorm", "evonorm_b0"])
def test_ghost_batches_compute_what_separate_calls_compute(norm_type):
    """A call over 3 ghost batches of 2 against 3 calls of 2 examples: outputs, input gradients,
    weight gradients (summed) and moving statistics. Batch renorm corrects each ghost batch
    against the moving statistics as the ghost batches before it left them."""
    values = {"gamma": _channels(1, 0.5, 1.5), "beta": _channels(2, -1, 1),
              "v": _channels(3, 0.3, 1.5), **RENORM_MOVING}
    ghosted, separate = (_set_weights(ops.norm_layer(norm_type, SHAPE[-1], nonlinear=norm_type
                                                     == "evonorm_b0", ghost_batch_size=ghost),
                                      (6, *SHAPE[1:]), values) for ghost in (2, None))
    names = [w.name for w in ghosted.trainable_weights]
    x, upstream = _input((6, *SHAPE[1:]), seed=50, loc=3.0), _input((6, *SHAPE[1:]), seed=51)
    y, gradients = _forward_backward(ghosted, x, True, upstream, names)
    slices = [_forward_backward(separate, x[i:i + 2], True, upstream[i:i + 2], names)
              for i in range(0, 6, 2)]
    _assert_close(y, np.concatenate([s[0] for s in slices]), 1e-5, "output")
    _assert_close(gradients["x"], np.concatenate([s[1]["x"] for s in slices]), 1e-5, "x")
    for name in names:
        _assert_close(gradients[name], sum(s[1][name] for s in slices), 1e-5, name)
    for weight, expected in zip(ghosted.non_trainable_weights, separate.non_trainable_weights):
        _assert_close(weight, expected, 1e-6, weight.name)


# The fast kernels against the references ---------------------------------------------------------

# Layers of every form on shapes that split into work units in each way the kernels have (lines of
# several narrow rows with a short last one, blocks of channels, a rank-2 input), with the weights
# of `_fast_case_weights`: {name: (layer(dtype policy), input shape, training)}.
FAST_CASES = {
    "frn": (lambda dtype: ops.FilterResponseNorm(dtype=dtype), (3, 5, 7, 16), True),
    "frn without tlu, rank 2": (lambda dtype: ops.FilterResponseNorm(tlu=False, dtype=dtype),
                                (8, 40), True),
    "frn learned epsilon": (lambda dtype: ops.FilterResponseNorm(
        learned_epsilon=0.3, dtype=dtype), (2, 8, 8, 256), True),
    "evonorm_s0": (lambda dtype: ops.EvoNormS0(groups=4, epsilon=EPSILON, dtype=dtype),
                   (3, 5, 7, 16), True),
    "evonorm_s0 blocks": (lambda dtype: ops.EvoNormS0(channels_per_group=2, epsilon=0.3,
                                                      dtype=dtype), (2, 8, 8, 256), True),
    "evonorm_b0 training": (lambda dtype: ops.EvoNormB0(momentum=MOMENTUM, epsilon=EPSILON,
                                                        dtype=dtype), (3, 5, 7, 16), True),
    "evonorm_b0 ghost batches": (lambda dtype: ops.EvoNormB0(
        momentum=MOMENTUM, epsilon=0.3, ghost_batch_size=2, dtype=dtype), (4, 6, 6, 256), True),
    "evonorm_b0 inference": (lambda dtype: ops.EvoNormB0(epsilon=EPSILON, dtype=dtype),
                             (2, 8, 8, 256), False),
    "batch_renorm": (lambda dtype: ops.BatchRenorm(momentum=MOMENTUM, epsilon=EPSILON,
                                                   dtype=dtype), SHAPE, True),
}
# The fast kernels' outputs and gradients against the references': to float32 rounding (1e-5 of
# the largest value: both sum hundreds of float32 terms, in different orders), and in float16 and
# bfloat16, where both round float32 values that agree that closely, to one step of the narrow
# type (its relative spacing).
FLOAT32_ROUNDING = 1e-5
SPACING = {"float32": 0.0, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}


@pytest.fixture
def fast_kernels():
    """Skips where the family's C++ kernels cannot run (no compiler: see tests/test_kernels.py)."""
    if kernel_policy.norm_family_kernel(kernel_policy.current()) != "cpp":
        pytest.skip("the small-batch family's C++ kernels cannot run here")


def _fast_case_weights(layer, shape):
    """Weights away from their initial values: gamma of both signs, the moving statistics of
    RENORM_MOVING (whose clipping test_the_renorm_case_clips_both_ways checks), a negative eps_l
    (its absolute value counts)."""
    channels = shape[-1]
    values = {"gamma": _channels(1, 0.5, 1.5, channels) * np.resize([1, -1], channels),
              "beta": _channels(2, -1, 1, channels), "v": _channels(3, 0.3, 1.5, channels),
              "tau": _channels(4, -0.5, 0.5, channels), "eps_l": np.array(-0.3),
              "moving_variance": _channels(5, 0.5, 8.0, channels)}
    if isinstance(layer, ops.BatchRenorm):
        values.update(RENORM_MOVING)
    return _set_weights(layer, shape, values)


def _run_both_kernels(make, shape, training, dtype):
    """[(output, {input and weight gradients}, [moving statistics after the call])] of the layer
    built with the fast kernels and with the plain ones, on the same input in the policy's
    compute dtype, as float64 arrays."""
    policy = "float32" if dtype == "float32" else f"mixed_{dtype}"
    x = tf.cast(_input(shape, seed=80), dtype)
    upstream = tf.constant(_input(shape, seed=81, loc=0.0, scale=1.0), tf.float32)
    results = []
    for fast in (True, False):
        with kernel_policy.using(fast_ops=fast):
            layer = _fast_case_weights(make(policy), shape)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
        assert y.dtype == dtype
        weights = layer.trainable_weights
        gradients = tape.gradient(loss, [x, *weights])
        names = ["x", *(w.name for w in weights)]
        as_float64 = lambda t: np.asarray(tf.cast(t, tf.float64))  # noqa: E731
        results.append((as_float64(y), {n: as_float64(g) for n, g in zip(names, gradients)},
                        [as_float64(w) for w in layer.non_trainable_weights]))
    return results


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("case", FAST_CASES)
def test_fast_kernels_compute_the_reference(case, dtype, fast_kernels):
    """Outputs, the gradients of the input and of every weight, and the moving statistics."""
    make, shape, training = FAST_CASES[case]
    (y, gradients, moving), (y_ref, gradients_ref, moving_ref) = _run_both_kernels(
        make, shape, training, dtype)

    def assert_rounding(got, expected, spacing, name):
        tolerance = FLOAT32_ROUNDING * np.abs(expected).max() + spacing * np.abs(expected)
        assert got.shape == expected.shape, name
        assert np.all(np.abs(got - expected) <= tolerance), (
            f"{name}: largest difference {np.abs(got - expected).max():.3g}")
    assert_rounding(y, y_ref, SPACING[dtype], "output")
    assert_rounding(gradients["x"], gradients_ref["x"], SPACING[dtype], "input gradient")
    for name in gradients_ref:
        if name != "x":  # float32 sums of the same narrow values
            assert_rounding(gradients[name], gradients_ref[name], 0.0, f"{name} gradient")
    for got, expected in zip(moving, moving_ref):
        assert_rounding(got, expected, 0.0, "moving statistic")


def test_the_fast_cases_take_both_sides_of_each_max(fast_kernels):
    """The TLU keeps some values and floors others, and EvoNorm-B0 divides some values by the
    batch's deviation and others by v x + the instance's, so both sides of each max and of its
    gradient are compared."""
    x = _input((3, 5, 7, 16), seed=80)
    frn = _fast_case_weights(ops.FilterResponseNorm(), x.shape)
    z = np_frn(x, frn.gamma.numpy(), frn.beta.numpy())
    assert (z >= frn.tau.numpy()).mean() not in (0.0, 1.0)
    b0 = _fast_case_weights(ops.EvoNormB0(epsilon=EPSILON), x.shape)
    instance_std = np.sqrt(x.var(axis=(1, 2), keepdims=True) + EPSILON)
    batch_std = np.sqrt(x.var(axis=(0, 1, 2)) + EPSILON)
    assert (batch_std >= b0.v.numpy() * x + instance_std).mean() not in (0.0, 1.0)


def _op_types(layer, x, training):
    """The op types of a traced forward and backward pass of `layer`."""
    @tf.function
    def forward_backward(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training)
        return tape.gradient(y, [x, *layer.trainable_weights])
    graph = forward_backward.get_concrete_function(x).graph
    types = {op.type for op in graph.get_operations()}
    for function in graph.as_graph_def().library.function:  # the custom gradients' bodies
        types.update(node.op for node in function.node_def)
    return types


@pytest.mark.parametrize("case, kernel_ops", [
    ("frn", {"GnFilterResponseNorm", "GnFilterResponseNormGrad"}),
    ("evonorm_s0", {"GnEvoNormS0", "GnEvoNormS0Grad"}),
    ("evonorm_b0 training", {"GnEvoNormB0", "GnEvoNormB0Grad"}),
    ("evonorm_b0 inference", {"GnEvoNormB0", "GnEvoNormB0Grad"}),
    ("batch_renorm", {"GnRenormCorrections"}),
])
def test_the_kernel_chosen_is_the_kernel_that_runs(case, kernel_ops, fast_kernels,
                                                   kernel_switches):
    """The fast layer runs the family's C++ ops forward and back; inside plain_ops() (export),
    inside a function XLA compiles whole, and with the C++ kernels or all fast paths switched
    off, it runs none of them."""
    make, shape, training = FAST_CASES[case]
    x = tf.constant(_input(shape, seed=80), tf.float32)
    assert kernel_ops <= _op_types(make("float32"), x, training)
    with ops.plain_ops():
        assert not any(t.startswith("Gn") for t in _op_types(make("float32"), x, training))
    for switches in ({"cpp_kernels": False}, {"fast_ops": False}):
        with kernel_policy.using(**switches):
            layer = make("float32")
        assert not any(t.startswith("Gn") and t not in ("GnGroupNorm", "GnGroupNormGrad")
                       for t in _op_types(layer, x, training)), switches
    layer = _fast_case_weights(make("float32"), shape)
    compiled = tf.function(lambda x: layer(x, training=False), jit_compile=True)
    _assert_close(compiled(x), layer(x, training=False), 1e-5, "XLA-compiled")


def test_no_second_order_gradients_through_the_kernels(fast_kernels):
    layer = _fast_case_weights(ops.EvoNormS0(groups=4, epsilon=EPSILON), (3, 5, 7, 16))
    x = tf.constant(_input((3, 5, 7, 16)), tf.float32)
    with pytest.raises(NotImplementedError, match="second-order gradients through GnEvoNormS0"):
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                y = layer(x)
            penalty = tf.reduce_sum(inner.gradient(y, x) ** 2)
        outer.gradient(penalty, x)


# Keras conventions: arguments, serialization, mixed precision, export ----------------------------

def _family_layers():
    """One of each layer with arguments away from their defaults."""
    return [ops.BatchRenorm(momentum=0.8, epsilon=1e-4, r_max=2.0, d_max=1.0, relax=(1, 2, 3),
                            ghost_batch_size=2, name="renorm"),
            ops.FilterResponseNorm(epsilon=1e-5, learned_epsilon=1e-3,
                                   gamma_regularizer=keras.regularizers.L2(0.1),
                                   beta_constraint=keras.constraints.NonNeg(),
                                   tau_initializer=keras.initializers.Constant(-0.5), name="frn"),
            ops.EvoNormS0(channels_per_group=3, epsilon=1e-4,
                          v_initializer=keras.initializers.Constant(0.5), name="s0"),
            ops.EvoNormB0(momentum=0.8, epsilon=1e-4, ghost_batch_size=2,
                          moving_variance_initializer=keras.initializers.Constant(2.0),
                          beta_initializer=keras.initializers.Constant(0.25), name="b0"),
            ops.FilterResponseNorm(tlu=False, name="frn_alone"),
            ops.EvoNormS0(groups=-1, nonlinearity=False, name="s0_affine")]


def _family_model():
    """The layers of `_family_layers` one after another, their weights random."""
    inputs = keras.Input(SHAPE[1:])
    x = inputs
    for layer in _family_layers():
        x = layer(x)
    model = keras.Model(inputs, x)
    rng = np.random.default_rng(60)
    for weight in model.weights:
        weight.assign(rng.uniform(0.5, 1.5, weight.shape).astype(weight.dtype))
    return model


def test_arguments_take_effect():
    layers = {layer.name: layer for layer in _family_layers()}
    for layer in layers.values():
        layer.build(SHAPE)
    np.testing.assert_array_equal(layers["frn"].tau, -0.5)
    np.testing.assert_array_equal(layers["frn"].eps_l, np.float32(1e-3))
    np.testing.assert_array_equal(layers["s0"].v, 0.5)
    assert layers["s0"].groups == 2 and layers["s0_affine"].groups == SHAPE[-1]
    np.testing.assert_array_equal(layers["b0"].moving_variance, 2.0)
    np.testing.assert_array_equal(layers["b0"].beta, 0.25)
    assert [w.name for w in layers["frn_alone"].weights] == ["gamma", "beta"]
    assert [w.name for w in layers["s0_affine"].weights] == ["gamma", "beta"]
    frn = layers["frn"]
    frn.gamma.assign(np.full(SHAPE[-1], 2.0, np.float32))
    frn(_input().astype(np.float32))
    np.testing.assert_allclose([float(loss) for loss in frn.losses], [0.1 * 4 * SHAPE[-1]])
    frn.beta.assign(np.full(SHAPE[-1], -1.0, np.float32))
    keras.optimizers.SGD(0.0).apply([tf.zeros(SHAPE[-1])], [frn.beta])
    np.testing.assert_array_equal(frn.beta, 0.0)  # the constraint applies after an update


def test_config_and_keras_file_round_trip(tmp_path):
    model = _family_model()
    for layer in model.layers[1:]:
        restored = type(layer).from_config(layer.get_config())
        assert restored.get_config() == layer.get_config(), layer.name
    model.save(tmp_path / "family.keras")
    restored = keras.models.load_model(tmp_path / "family.keras")
    for layer, twin in zip(model.layers[1:], restored.layers[1:]):
        assert type(twin) is type(layer) and twin.get_config() == layer.get_config(), layer.name
    x = _input().astype(np.float32)
    np.testing.assert_array_equal(restored(x, training=False), model(x, training=False))
    assert [float(v) for v in restored.losses] == [float(v) for v in model.losses]


@pytest.mark.parametrize("norm_type", FAMILY)
def test_mixed_bfloat16_keeps_float32_statistics(norm_type):
    """Under mixed_bfloat16 the weights and statistics are float32 and the output bfloat16,
    within bfloat16's rounding (2^-8) of the float64 reference. A float32 input of ~100 with a
    spread of ~1 reaches FRN's and EvoNorm's statistics unrounded (bfloat16's spacing there is
    0.5); batch renorm rounds it to bfloat16 first, as Keras's BN does, and is compared on the
    rounded input."""
    policy = "mixed_bfloat16"
    layer = {"batch_renorm": lambda: ops.BatchRenorm(momentum=MOMENTUM, epsilon=EPSILON,
                                                     dtype=policy),
             "frn": lambda: ops.FilterResponseNorm(dtype=policy),
             "evonorm_s0": lambda: ops.EvoNormS0(groups=2, epsilon=EPSILON, dtype=policy),
             "evonorm_b0": lambda: ops.EvoNormB0(epsilon=EPSILON, dtype=policy)}[norm_type]()
    x = _input(loc=100.0, scale=1.0).astype(np.float32)
    y = layer(x, training=True)
    assert y.dtype == tf.bfloat16
    assert all(w.dtype == "float32" for w in layer.weights)
    ones, zeros = np.ones(SHAPE[-1]), np.zeros(SHAPE[-1])
    x64 = x.astype(np.float64)
    if norm_type == "batch_renorm":
        x64 = tf.cast(tf.cast(x, tf.bfloat16), tf.float64).numpy()
        r, d, _, _ = np_renorm_corrections(x64, 0.0, 1.0, 3.0, 5.0)
        expected = np_batch_renorm(x64, ones, zeros, r, d)
        _assert_close(layer.moving_mean, 0.1 * x64.mean(axis=(0, 1, 2)), 1e-6, "moving mean")
    else:
        expected = {"frn": lambda: np_frn(x64, ones, zeros, zeros),
                    "evonorm_s0": lambda: np_evonorm_s0(x64, ones, zeros, ones, 2, EPSILON),
                    "evonorm_b0": lambda: np_evonorm_b0(x64, ones, zeros, ones)}[norm_type]()
    _assert_close(tf.cast(y, tf.float64), expected, 2 ** -7, "output")


FRESH_PROCESS = """
import importlib.util, sys
import numpy as np
import tensorflow as tf
assert importlib.util.find_spec("ops") is None
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
np.save(sys.argv[3], serve(x=tf.constant(np.load(sys.argv[2])))["output_0"].numpy())
"""


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_export_saved_model_without_the_repo_and_tflite(tmp_path):
    """The model of every layer, in inference, traced inside plain_ops() as export.py does:
    the SavedModel gives its outputs in a process that cannot import this repo, and TFLite
    converts it and gives them too."""
    model = _family_model()
    archive = keras.export.ExportArchive()
    archive.track(model)
    with ops.plain_ops():
        archive.add_endpoint("serving_default", lambda x: model(x, training=False),
                             input_signature=[tf.TensorSpec([None, *SHAPE[1:]], tf.float32,
                                                            name="x")])
        archive.write_out(str(tmp_path / "saved_model"), verbose=False)
    x = _input(seed=70).astype(np.float32)
    expected = model(x, training=False).numpy()
    np.save(tmp_path / "x.npy", x)
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = subprocess.run([sys.executable, "-I", "-c", FRESH_PROCESS,
                              str(tmp_path / "saved_model"), str(tmp_path / "x.npy"),
                              str(tmp_path / "y.npy")], cwd=tmp_path, env=environment,
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    _assert_close(np.load(tmp_path / "y.npy"), expected, 1e-5, "SavedModel")
    converter = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "saved_model"))
    interpreter = tf.lite.Interpreter(model_content=converter.convert())
    runner = interpreter.get_signature_runner("serving_default")
    _assert_close(next(iter(runner(x=x).values())), expected, 1e-4, "TFLite")


# The model builders ------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_type", choices.NORMS_WITH_ACTIVATION)
def test_norms_with_their_own_nonlinearity_take_the_activations_place(norm_type):
    """resnet20: every norm followed by a ReLU is the norm's nonlinear form with no ReLU layer;
    the second unit of a block and the projection shortcuts have the linear form; the ReLU
    after each addition stays. conv: the norm's nonlinear form replaces leaky ReLU + norm."""
    net = model_lib.build_model("resnet20", (28, 28, 1), 10, norm_type, groups=8)
    layers = {layer.name: layer for layer in net.layers}
    norms = {name: layer for name, layer in layers.items() if name.endswith("_norm")}
    assert len(norms) == 21
    for name, layer in norms.items():
        linear = name.endswith(("_b_norm", "_shortcut_norm"))
        nonlinear = layer.tlu if norm_type == "frn" else layer.nonlinearity
        assert nonlinear is not linear, name
        assert name.replace("_norm", "_act") not in layers
    assert sum(name.endswith("_out") for name in layers) == 9
    conv = model_lib.build_model("conv", (28, 28, 1), 10, norm_type, groups=8)
    names = [layer.name for layer in conv.layers]
    for i in range(4):
        assert f"conv{i}_act" not in names
        assert names.index(f"conv{i}") + 1 == names.index(f"conv{i}_norm")


@pytest.mark.parametrize("norm_type", FAMILY)
def test_zero_init_residual_starts_each_blocks_last_norm_at_zero(norm_type):
    net = model_lib.build_model("resnet20", (28, 28, 1), 10, norm_type, groups=8,
                                zero_init_residual=True)
    gammas = {layer.name: layer.gamma.numpy() for layer in net.layers
              if layer.name.endswith("_norm")}
    for name, gamma in gammas.items():
        np.testing.assert_array_equal(gamma, 0.0 if name.endswith("_b_norm") else 1.0,
                                      err_msg=name)


@pytest.mark.parametrize("norm_type, layer_type, epsilon", [
    ("batch_renorm", ops.BatchRenorm, EPSILON), ("frn", ops.FilterResponseNorm, 1e-6),
    ("evonorm_s0", ops.EvoNormS0, EPSILON), ("evonorm_b0", ops.EvoNormB0, EPSILON)])
def test_norm_layer_gives_the_family_with_the_repos_arguments(norm_type, layer_type, epsilon):
    """BN's momentum and epsilon for the layers with moving statistics, the paper's epsilon for
    FRN, GN's groups for EvoNorm-S0, and the linear form unless asked for the nonlinear one."""
    layer = ops.norm_layer(norm_type, 16, groups=4, name="n")
    assert type(layer) is layer_type and layer.name == "n" and layer.epsilon == epsilon
    assert getattr(layer, "momentum", MOMENTUM) == MOMENTUM
    if norm_type in choices.NORMS_WITH_ACTIVATION:
        nonlinear = ops.norm_layer(norm_type, 16, groups=4, nonlinear=True)
        assert [getattr(n, "tlu", getattr(n, "nonlinearity", None)) for n in (layer, nonlinear)] \
            == [False, True]
    if norm_type == "evonorm_s0":
        assert layer.groups == 4
        assert ops.norm_layer(norm_type, 16, channels_per_group=8).channels_per_group == 8


def test_norm_layer_refuses_a_nonlinearity_the_norm_lacks():
    with pytest.raises(ValueError, match="norm_type group has no nonlinearity of its own"):
        ops.norm_layer("group", 16, nonlinear=True)


@pytest.mark.parametrize("arguments, message", [
    ({"renorm": True}, "BatchRenorm takes r_max, d_max and relax, not renorm"),
    ({"synchronized": True}, "BatchRenorm takes r_max, d_max and relax, not synchronized"),
    ({"r_max": 0.5}, "r_max must be >= 1 and d_max >= 0"),
    ({"relax": (5, 5, 10)}, r"relax must be \(start, d_max_at, r_max_at\) with 0 <= start <"),
])
def test_batch_renorm_refuses_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        ops.BatchRenorm(**arguments)


def test_evonorm_s0_names_c_and_g():
    with pytest.raises(ValueError, match="EvoNormS0: C=6 channels are not divisible by G=4"):
        ops.EvoNormS0(groups=4)(_input().astype(np.float32))
    with pytest.raises(ValueError, match="EvoNormS0: pass groups or channels_per_group, not"):
        ops.EvoNormS0(groups=2, channels_per_group=2)


# The trainer -----------------------------------------------------------------------------------

def test_help_lists_the_family(capsys):
    with pytest.raises(SystemExit):
        trainer.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for norm_type in FAMILY:
        assert norm_type in text
    assert "plain BN for the first 6.25% of the --max_training_step updates" in text


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory):
    """{norm type: run directory} of 20 updates each on the sample (the conv net)."""
    return {norm_type: train(tmp_path_factory.mktemp(norm_type), *TWENTY, "--norm_type",
                             norm_type)
            for norm_type in FAMILY}


@pytest.mark.parametrize("norm_type", FAMILY)
def test_each_norm_type_trains(norm_type, family_runs):
    run_dir = family_runs[norm_type]
    assert tf.train.latest_checkpoint(run_dir).endswith("model-20")
    with open(os.path.join(run_dir, "result.json")) as f:
        result = json.load(f)
    assert result["step"] == 20 and result["config"]["norm_type"] == norm_type
    assert result["accuracy"] > 0.2  # twenty updates beat chance (0.1)


def test_batch_renorm_run_continued_from_a_checkpoint_is_bit_exact(family_runs, tmp_path,
                                                                   monkeypatch):
    """Interrupted at update 5, while the clipping relaxes (updates 1.25 to 10 of 20), and
    continued in place: every weight, moving statistic and optimizer slot equals the straight
    run's bit for bit."""
    run_dir = str(tmp_path / "run")
    argv = [*TINY, *TWENTY, "--norm_type", "batch_renorm", "--run_dir", run_dir]
    with ctrl_c_after_step(5, monkeypatch), pytest.raises(SystemExit):
        trainer.main(argv)
    assert tf.train.latest_checkpoint(run_dir).endswith("model-5")
    trainer.main(argv)
    expected = checkpoint_values(tf.train.latest_checkpoint(family_runs["batch_renorm"]))
    got = checkpoint_values(tf.train.latest_checkpoint(run_dir))
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_ghost_batches_reach_batch_renorm_and_evonorm_b0():
    """--pass_size: the network's batch renorm and EvoNorm-B0 normalize ghost batches of
    --batch_size, as BN does."""
    config = types.SimpleNamespace(model="conv", batch_size=2, norm_type="", groups=8,
                                   weight_std=False, dropout=0.0, channels_per_group=None,
                                   zero_init_residual=False, max_training_step=400)
    data = types.SimpleNamespace(image_shape=(28, 28, 1), num_classes=10)
    for norm_type, layer_type in (("batch_renorm", ops.BatchRenorm),
                                  ("evonorm_b0", ops.EvoNormB0)):
        config.norm_type = norm_type
        net = updates.build_model(config, data, examples_per_pass=16)
        norms = [layer for layer in net.layers if isinstance(layer, layer_type)]
        assert len(norms) == 4 and all(layer.ghost_batch_size == 2 for layer in norms)
        if norm_type == "batch_renorm":
            assert all(layer.relax == (25, 125, 200) for layer in norms)


def test_evonorm_s0_with_groups_that_do_not_divide_is_one_line(tmp_path, capsys):
    error = cli_error(trainer.main, ["--norm_type", "evonorm_s0", "--model", "resnet20",
                                     "--groups", "32", "--train_dir", str(tmp_path)], capsys)
    assert error == ("error: EvoNormS0: C=16 channels are not divisible by G=32 groups; choose "
                     "a number of groups that divides 16, and pass it as --groups")
    assert not list(tmp_path.iterdir())
