"""Tests for the normalization layers and model-building helpers in ops.py.

GroupNorm is checked against a plain NumPy reference (forward and analytic backward), against
keras.layers.GroupNormalization, for batch independence, under float16 / bfloat16 policies, and
for serialization. ops.Conv2D is checked against Keras's Conv2D: with weight_std against a kernel
standardized in NumPy, and on small maps (its patches path) with gradients, in float32 and bfloat16;
its oneDNN gradients on large convolutions against TensorFlow's.
"""
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import ops
from kernels import conv as conv_kernels
from kernels import group_norm as gn_compute
from kernels import policy as kernel_policy

EPS = 1e-5


# ----------------------------------------------------------------------------------------------
# NumPy reference (float64)
# ----------------------------------------------------------------------------------------------

def _grouped(a, groups):
    """[N, ..., C] -> [N, M, G, C/G] where M is the product of the dims between N and C."""
    n, c = a.shape[0], a.shape[-1]
    return a.reshape(n, -1, groups, c // groups)


def np_group_norm(x, gamma, beta, groups, eps=EPS):
    """Forward pass: returns (y, xhat, rstd), xhat and rstd in the grouped layout."""
    x = np.asarray(x, np.float64)
    xg = _grouped(x, groups)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (xg - mean) * rstd
    c = x.shape[-1]
    gamma_g = np.asarray(gamma, np.float64).reshape(groups, c // groups)
    beta_g = np.asarray(beta, np.float64).reshape(groups, c // groups)
    y = xhat * gamma_g + beta_g
    return y.reshape(x.shape), xhat, rstd


def np_group_norm_backward(x, gamma, dy, groups, eps=EPS):
    """Analytic GN backward for upstream gradient dy: returns (dx, dgamma, dbeta).

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * gamma, means over a group.
    A group of one element has xhat = 0 and g - mean(g) = 0, so its dx is 0, as it should be.
    """
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    c = x.shape[-1]
    _, xhat, rstd = np_group_norm(x, np.ones(c), np.zeros(c), groups, eps)
    dyg = _grouped(dy, groups)
    gamma_g = np.asarray(gamma, np.float64).reshape(groups, c // groups)
    g = dyg * gamma_g
    dx = rstd * (g - g.mean(axis=(1, 3), keepdims=True)
                 - xhat * (g * xhat).mean(axis=(1, 3), keepdims=True))
    dgamma = (dyg * xhat).sum(axis=(0, 1)).reshape(c)
    dbeta = dyg.sum(axis=(0, 1)).reshape(c)
    return dx.reshape(x.shape), dgamma, dbeta


def _random_input(rng, shape, loc=2.0, scale=3.0):
    """Input with non-zero mean and non-unit scale, plus a per-channel offset."""
    c = shape[-1]
    x = scale * rng.standard_normal(shape) + loc + rng.uniform(-1.0, 1.0, size=c)
    return x.astype(np.float32)


def _random_affine(rng, c):
    gamma = rng.uniform(0.5, 1.5, size=c) * rng.choice([-1.0, 1.0], size=c)
    beta = rng.uniform(-1.0, 1.0, size=c)
    return gamma.astype(np.float32), beta.astype(np.float32)


def _make_gn(groups, shape, gamma, beta, **kwargs):
    layer = ops.GroupNorm(groups=groups, epsilon=EPS, **kwargs)
    layer.build(tuple(shape))
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    return layer


# ----------------------------------------------------------------------------------------------
# Self-check of the reference: the analytic backward equals central finite differences of the
# forward, so a wrong reference cannot make a wrong layer pass.
# ----------------------------------------------------------------------------------------------

def test_reference_backward_matches_finite_differences():
    rng = np.random.default_rng(0)
    shape, groups = (2, 3, 4), 2
    x = rng.standard_normal(shape) * 2 + 1
    gamma = rng.uniform(0.5, 1.5, size=4)
    beta = rng.uniform(-1, 1, size=4)
    dy = rng.standard_normal(shape)
    dx, dgamma, dbeta = np_group_norm_backward(x, gamma, dy, groups)

    def loss(x_, gamma_, beta_):
        return float((np_group_norm(x_, gamma_, beta_, groups)[0] * dy).sum())

    h = 1e-6
    args = [x, gamma, beta]
    for i, grad in enumerate((dx, dgamma, dbeta)):
        num = np.zeros_like(args[i])
        for idx in np.ndindex(args[i].shape):
            plus, minus = list(args), list(args)
            plus[i], minus[i] = args[i].copy(), args[i].copy()
            plus[i][idx] += h
            minus[i][idx] -= h
            num[idx] = (loss(*plus) - loss(*minus)) / (2 * h)
        np.testing.assert_allclose(grad, num, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# GroupNorm forward and gradients vs the NumPy reference
# ----------------------------------------------------------------------------------------------

GN_CASES = [
    pytest.param((2, 7, 7, 64), 32, id="nhwc64_g32"),
    pytest.param((1, 1, 1, 32), 32, id="one_element_groups"),
    pytest.param((3, 5, 5, 12), 4, id="nhwc12_g4"),
    pytest.param((4, 64), 8, id="rank2"),
    pytest.param((2, 4, 4, 4, 16), 4, id="rank5"),
    pytest.param((2, 5, 5, 8), 1, id="layer_norm_g1"),
    pytest.param((2, 5, 5, 8), 8, id="instance_norm_gC"),
]


@pytest.mark.parametrize("shape,groups", GN_CASES)
def test_group_norm_forward_and_gradients_match_numpy(shape, groups):
    rng = np.random.default_rng([groups, *shape])
    c = shape[-1]
    x = _random_input(rng, shape)
    gamma, beta = _random_affine(rng, c)
    dy = rng.standard_normal(shape).astype(np.float32)
    layer = _make_gn(groups, shape, gamma, beta)

    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt)
        loss = tf.reduce_sum(y * dy)
    dx, dgamma, dbeta = tape.gradient(loss, [xt, layer.gamma, layer.beta])

    y_ref, _, _ = np_group_norm(x, gamma, beta, groups)
    dx_ref, dgamma_ref, dbeta_ref = np_group_norm_backward(x, gamma, dy, groups)

    assert y.dtype == tf.float32 and tuple(y.shape) == shape
    assert np.max(np.abs(y.numpy() - y_ref)) <= 1e-4
    assert np.max(np.abs(dx.numpy() - dx_ref)) <= 1e-4
    assert np.max(np.abs(dgamma.numpy() - dgamma_ref)) <= 1e-4
    assert np.max(np.abs(dbeta.numpy() - dbeta_ref)) <= 1e-4

    if shape == (1, 1, 1, 32):
        # One element per group: variance 0, the output is beta and dx vanishes. The layer folds
        # the statistics into y = x * s + (beta - mean * s) with s = gamma / sqrt(eps) ~ 300, so
        # float32 rounding of x * s (~1e3) limits this to ~1e-4, not to float32 epsilon.
        np.testing.assert_allclose(y.numpy().reshape(-1), beta, rtol=0, atol=1e-4)
        assert np.max(np.abs(dx.numpy())) <= 1e-4
    else:
        # The normalization really happened: per-group statistics of (y - beta) / gamma are 0 / 1.
        xhat = _grouped((y.numpy() - beta) / gamma, groups)
        np.testing.assert_allclose(xhat.mean(axis=(1, 3)), 0.0, atol=1e-4)
        np.testing.assert_allclose(xhat.var(axis=(1, 3)), 1.0, atol=1e-3)


def test_group_norm_without_center_and_scale():
    rng = np.random.default_rng(1)
    shape = (2, 4, 4, 8)
    x = _random_input(rng, shape)
    layer = ops.GroupNorm(groups=2, epsilon=EPS, center=False, scale=False)
    y = layer(x).numpy()
    assert layer.trainable_weights == []
    y_ref, _, _ = np_group_norm(x, np.ones(8), np.zeros(8), 2)
    assert np.max(np.abs(y - y_ref)) <= 1e-4


# ----------------------------------------------------------------------------------------------
# Agreement with keras.layers.GroupNormalization
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,groups", [((2, 6, 6, 16), 4), ((3, 32), 8), ((2, 5, 5, 8), 1)])
def test_group_norm_matches_keras_group_normalization(shape, groups):
    rng = np.random.default_rng(2)
    x = _random_input(rng, shape)
    gamma, beta = _random_affine(rng, shape[-1])
    ours = _make_gn(groups, shape, gamma, beta)
    theirs = keras.layers.GroupNormalization(groups=groups, epsilon=EPS)
    theirs.build(shape)
    theirs.set_weights([gamma, beta])
    np.testing.assert_allclose(ours(x).numpy(), theirs(x).numpy(), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Batch independence
# ----------------------------------------------------------------------------------------------

def test_group_norm_is_batch_independent_and_batch_norm_is_not():
    rng = np.random.default_rng(3)
    shape = (8, 6, 6, 16)
    # Examples with different means and scales, so batch statistics differ from one example's.
    x = (_random_input(rng, shape)
         * rng.uniform(0.5, 3.0, size=(8, 1, 1, 1))
         + rng.uniform(-5, 5, size=(8, 1, 1, 1))).astype(np.float32)
    gamma, beta = _random_affine(rng, 16)

    gn = _make_gn(4, shape, gamma, beta)
    alone = gn(x[:1]).numpy()
    in_batch = gn(x).numpy()[:1]
    np.testing.assert_allclose(alone, in_batch, rtol=0, atol=1e-6)

    bn = keras.layers.BatchNormalization(epsilon=EPS)
    bn.build(shape)
    bn.gamma.assign(gamma)
    bn.beta.assign(beta)
    bn_alone = bn(x[:1], training=True).numpy()
    bn_in_batch = bn(x, training=True).numpy()[:1]
    assert not np.allclose(bn_alone, bn_in_batch, rtol=0, atol=1e-6)
    assert np.max(np.abs(bn_alone - bn_in_batch)) > 0.1


# ----------------------------------------------------------------------------------------------
# Low precision
# ----------------------------------------------------------------------------------------------

# Tolerances: outputs are gamma * xhat + beta with |gamma| <= 1.5, |beta| <= 1, |xhat| <~ 4, so
# |y| < ~8. float16 has an 11-bit significand: rounding the output costs at most 2**-11 * 8 ~ 4e-3,
# and the float16-rounded gamma (autocast of the variable) another ~8 * 2**-11 ~ 4e-3 -> 1e-2.
# bfloat16 has an 8-bit significand: 2**-8 * 8 ~ 3e-2 for the output rounding plus the same again
# for a bfloat16-rounded gamma in the worst case; the bulk of |y| is < 4 so 5e-2 holds, and a
# relative term covers the tail.
LOW_PRECISION = [
    pytest.param("mixed_float16", tf.float16, np.float16, 1e-2, 0.0, id="float16"),
    pytest.param("mixed_bfloat16", tf.bfloat16, None, 5e-2, 1e-2, id="bfloat16"),
]


@pytest.mark.parametrize("policy,tf_dtype,np_dtype,atol,rtol", LOW_PRECISION)
def test_group_norm_low_precision(policy, tf_dtype, np_dtype, atol, rtol):
    rng = np.random.default_rng(4)
    shape, groups = (2, 8, 8, 32), 8
    x32 = (1e3 * rng.standard_normal(shape) + 500).astype(np.float32)
    x_low = tf.cast(tf.constant(x32), tf_dtype)
    x_low_as32 = tf.cast(x_low, tf.float32).numpy()  # the same values the low-precision layer sees
    gamma, beta = _random_affine(rng, 32)

    if np_dtype is not None:
        # The naive float16 computation overflows: squares of ~1e3 exceed float16's max (65504).
        with np.errstate(over="ignore"):
            naive = np.sum(np.square(x_low.numpy()), dtype=np.float16)
        assert np.isinf(naive)
    else:
        # bfloat16 has float32's range but only 8 significand bits: summing the squares in it
        # loses the variance entirely against the float32 result.
        sq = tf.square(x_low)
        naive = tf.reduce_sum(sq).numpy().astype(np.float64)
        exact = np.sum(x_low_as32.astype(np.float64) ** 2)
        assert abs(naive - exact) / exact > 1e-3

    low = _make_gn(groups, shape, gamma, beta, dtype=policy)
    assert low.compute_dtype == tf_dtype.name
    assert low.gamma.dtype == "float32" and low.beta.dtype == "float32"
    y_low = low(x_low)
    assert y_low.dtype == tf_dtype
    y_low = tf.cast(y_low, tf.float32).numpy()
    assert np.all(np.isfinite(y_low))

    ref32 = _make_gn(groups, shape, gamma, beta)(x_low_as32).numpy()
    y_np, _, _ = np_group_norm(x_low_as32, gamma, beta, groups)
    assert np.max(np.abs(ref32 - y_np)) <= 1e-4
    np.testing.assert_allclose(y_low, ref32, rtol=rtol, atol=atol)


def test_mixed_float16_layer_casts_float32_inputs():
    rng = np.random.default_rng(5)
    x = (1e3 * rng.standard_normal((2, 4, 4, 8)) + 500).astype(np.float32)
    layer = ops.GroupNorm(groups=2, dtype="mixed_float16")
    y = layer(x)
    assert y.dtype == tf.float16
    assert np.all(np.isfinite(y.numpy()))


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

def test_channels_not_divisible_by_groups_raises_naming_c_and_g():
    layer = ops.GroupNorm(groups=5)
    with pytest.raises(ValueError) as info:
        layer(np.zeros((2, 4, 4, 12), np.float32))
    message = str(info.value)
    assert re.search(r"\b12\b", message), message
    assert re.search(r"\b5\b", message), message


@pytest.mark.parametrize("groups", [0, -2])  # -1 is instance norm
def test_non_positive_groups_raise(groups):
    with pytest.raises(ValueError):
        ops.GroupNorm(groups=groups)


# ----------------------------------------------------------------------------------------------
# norm_layer
# ----------------------------------------------------------------------------------------------

def test_norm_types_constant():
    assert set(ops.NORM_TYPES) == {"batch", "sync_batch", "group", "layer", "instance", "none",
                                   "batch_renorm", "frn", "evonorm_s0", "evonorm_b0"}


# The small-batch family's layers: tests/test_norm_family.py.
@pytest.mark.parametrize("norm_type", ["batch", "sync_batch", "group", "layer", "instance", "none"])
def test_norm_layer_returns_expected_layer(norm_type):
    channels, groups = 16, 4
    layer = ops.norm_layer(norm_type, channels, groups=groups, name=f"n_{norm_type}")
    assert layer.name == f"n_{norm_type}"
    x = _random_input(np.random.default_rng(6), (2, 3, 3, channels))
    if norm_type in ("batch", "sync_batch"):
        assert isinstance(layer, keras.layers.BatchNormalization)
        assert layer.synchronized is (norm_type == "sync_batch")
    elif norm_type == "none":
        assert not isinstance(layer, (ops.GroupNorm, keras.layers.BatchNormalization))
        np.testing.assert_array_equal(np.asarray(layer(x)), x)
    else:
        assert isinstance(layer, ops.GroupNorm)
        expected = {"group": groups, "layer": 1, "instance": channels}[norm_type]
        assert layer.groups == expected
        y_ref, _, _ = np_group_norm(x, np.ones(channels), np.zeros(channels), expected,
                                    layer.epsilon)
        assert np.max(np.abs(layer(x).numpy() - y_ref)) <= 1e-4


def test_norm_layer_unknown_type_names_choices():
    with pytest.raises(ValueError) as info:
        ops.norm_layer("weird", 16)
    message = str(info.value)
    assert "weird" in message
    for choice in ops.NORM_TYPES:
        assert choice in message


def test_norm_applies_layer_sized_for_input():
    x = keras.Input(shape=(4, 4, 12))
    y = ops.norm(x, "instance", name="inst")
    model = keras.Model(x, y)
    assert model.get_layer("inst").groups == 12


# ----------------------------------------------------------------------------------------------
# Serialization
# ----------------------------------------------------------------------------------------------

def _small_model():
    inputs = keras.Input(shape=(8, 8, 3))
    x = ops.Conv2D(16, 3, weight_std=True, use_bias=False, ws_epsilon=1e-4, name="wsconv")(inputs)
    x = ops.GroupNorm(groups=4, epsilon=1e-3, name="gn")(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5, name="head")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(7)
    gamma, beta = _random_affine(rng, 16)
    model.get_layer("gn").gamma.assign(gamma)
    model.get_layer("gn").beta.assign(beta)
    return model


def _check_restored(model, restored, x):
    gn = restored.get_layer("gn")
    assert isinstance(gn, ops.GroupNorm)
    assert gn.groups == 4 and gn.epsilon == 1e-3
    ws = restored.get_layer("wsconv")
    assert isinstance(ws, ops.Conv2D) and ws.weight_std and ws.ws_epsilon == 1e-4
    np.testing.assert_array_equal(restored(x).numpy(), model(x).numpy())


def test_model_survives_get_config_from_config():
    model = _small_model()
    x = _random_input(np.random.default_rng(8), (3, 8, 8, 3))
    restored = keras.Model.from_config(model.get_config())
    restored.set_weights(model.get_weights())
    _check_restored(model, restored, x)


def test_model_survives_keras_save_load(tmp_path):
    model = _small_model()
    x = _random_input(np.random.default_rng(9), (3, 8, 8, 3))
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    _check_restored(model, restored, x)


# ----------------------------------------------------------------------------------------------
# Unknown batch dimension
# ----------------------------------------------------------------------------------------------

def test_functional_model_with_none_batch():
    inputs = keras.Input(shape=(8, 8, 64))
    assert inputs.shape[0] is None
    gn = ops.GroupNorm(groups=32, epsilon=EPS, name="gn")
    model = keras.Model(inputs, gn(inputs))
    rng = np.random.default_rng(10)
    gamma, beta = _random_affine(rng, 64)
    gn.gamma.assign(gamma)
    gn.beta.assign(beta)

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 64], tf.float32)])
    def serve(x):
        return model(x)

    for batch in (1, 5):
        x = _random_input(rng, (batch, 8, 8, 64))
        y_ref, _, _ = np_group_norm(x, gamma, beta, 32)
        y_eager = model(x).numpy()
        y_graph = serve(tf.constant(x)).numpy()
        assert y_eager.shape == y_graph.shape == (batch, 8, 8, 64)
        assert np.max(np.abs(y_eager - y_ref)) <= 1e-4
        assert np.max(np.abs(y_graph - y_ref)) <= 1e-4
    assert serve.get_concrete_function().structured_outputs.shape.as_list() == [None, 8, 8, 64]


# ----------------------------------------------------------------------------------------------
# Conv2D: weight standardization and the patches path for small maps
# ----------------------------------------------------------------------------------------------

def _np_standardize(kernel, eps):
    kernel = kernel.astype(np.float64)
    mean = kernel.mean(axis=(0, 1, 2), keepdims=True)
    var = ((kernel - mean) ** 2).mean(axis=(0, 1, 2), keepdims=True)
    return ((kernel - mean) / np.sqrt(var + eps)).astype(np.float32)


@pytest.mark.parametrize("strides", [1, 2])
def test_ws_conv2d_equals_conv2d_with_standardized_kernel(strides):
    rng = np.random.default_rng(11)
    x = _random_input(rng, (2, 9, 9, 6), loc=0.5, scale=1.0)
    # A kernel far from standardized: non-zero per-filter means and scales.
    kernel = (rng.standard_normal((3, 3, 6, 8)) * rng.uniform(0.05, 2.0, size=8)
              + rng.uniform(-1.0, 1.0, size=8)).astype(np.float32)

    ws = ops.Conv2D(8, 3, strides=strides, weight_std=True, use_bias=False)
    ws.build(x.shape)
    ws.kernel.assign(kernel)
    plain = keras.layers.Conv2D(8, 3, strides=strides, padding="same", use_bias=False)
    plain.build(x.shape)
    plain.kernel.assign(_np_standardize(kernel, ws.ws_epsilon))

    y_ws = ws(x).numpy()
    np.testing.assert_allclose(y_ws, plain(x).numpy(), rtol=1e-5, atol=1e-4)
    # The stored kernel is the raw one; standardization happens in the forward pass only.
    np.testing.assert_array_equal(ws.kernel.numpy(), kernel)
    plain.kernel.assign(kernel)
    assert not np.allclose(y_ws, plain(x).numpy(), atol=1e-2)


@pytest.mark.parametrize("size, kernel_size, strides, channels", [
    (4, 4, 2, 5), (3, 4, 2, 5), (2, 3, 1, 5), (3, 3, 2, 5), (2, (3, 2), (1, 2), 5),  # within kernel
    (8, 3, 1, 128), (7, 4, 2, 128), (5, 3, 2, 130), (8, 1, 1, 128),  # <= 8x8, >= 128 channels
])
def test_conv2d_on_small_maps_equals_keras_conv2d_with_gradients(size, kernel_size, strides,
                                                                channels):
    """Small maps take the patches @ kernel path (both ways of its backward product: the last case
    has more patch rows than columns); it must give Keras's 'same'-padded convolution and its
    gradients."""
    rng = np.random.default_rng(13)
    x = tf.constant(_random_input(rng, (3, size, size, channels), loc=0.3, scale=1.0))
    ours = ops.Conv2D(7, kernel_size, strides=strides, use_bias=True)
    ours.build(x.shape)
    assert _conv_kernel(ours, x) == "patches"
    plain = keras.layers.Conv2D(7, kernel_size, strides=strides, padding="same", use_bias=True)
    plain.build(x.shape)
    plain.set_weights([rng.standard_normal(ours.kernel.shape).astype(np.float32),
                       rng.standard_normal(7).astype(np.float32)])
    ours.set_weights(plain.get_weights())
    dy = tf.constant(rng.standard_normal(plain(x).shape).astype(np.float32))
    results = []
    for layer in (ours, plain):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * dy)
        results.append([y] + tape.gradient(loss, [x, layer.kernel, layer.bias]))
    for got, want in zip(*results):
        assert got.shape == want.shape
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# conv_norm_act and residual_block
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_type", ["group", "batch"])
@pytest.mark.parametrize("weight_std", [False, True])
def test_conv_norm_act_shapes_and_layers(norm_type, weight_std):
    inputs = keras.Input(shape=(8, 8, 16))
    y = ops.conv_norm_act(inputs, 32, norm_type, groups=8, weight_std=weight_std, strides=2,
                          name="u")
    model = keras.Model(inputs, y)
    assert tuple(y.shape) == (None, 4, 4, 32)
    conv = model.get_layer("u_conv")
    assert isinstance(conv, ops.Conv2D) and conv.weight_std == weight_std
    assert conv.use_bias is False
    assert tuple(conv.kernel.shape) == (3, 3, 16, 32)
    norm_cls = ops.GroupNorm if norm_type == "group" else keras.layers.BatchNormalization
    assert isinstance(model.get_layer("u_norm"), norm_cls)
    out = model(np.random.default_rng(12).standard_normal((2, 8, 8, 16)).astype(np.float32))
    assert out.shape == (2, 4, 4, 32)
    assert np.all(out.numpy() >= 0)  # relu


def test_conv_norm_act_without_norm_uses_bias_and_no_activation():
    inputs = keras.Input(shape=(8, 8, 16))
    y = ops.conv_norm_act(inputs, 8, "none", groups=8, weight_std=False, activation=None,
                          name="u")
    model = keras.Model(inputs, y)
    assert model.get_layer("u_conv").use_bias is True
    assert all(layer.name != "u_act" for layer in model.layers)


@pytest.mark.parametrize("norm_type", ["group", "batch"])
@pytest.mark.parametrize(
    "in_channels,filters,strides,expect_projection,out_hw",
    [
        (16, 16, 1, False, 8),
        (16, 16, 2, True, 4),
        (16, 32, 1, True, 8),
        (16, 32, 2, True, 4),
    ],
)
def test_residual_block_shapes(norm_type, in_channels, filters, strides, expect_projection,
                               out_hw):
    inputs = keras.Input(shape=(8, 8, in_channels))
    y = ops.residual_block(inputs, filters, norm_type, groups=8, strides=strides, name="blk")
    model = keras.Model(inputs, y)
    assert tuple(y.shape) == (None, out_hw, out_hw, filters)
    names = {layer.name for layer in model.layers}
    assert ("blk_shortcut_conv" in names) is expect_projection
    if expect_projection:
        sc = model.get_layer("blk_shortcut_conv")
        assert tuple(sc.kernel.shape) == (1, 1, in_channels, filters)
        assert sc.strides == (strides, strides)
    assert tuple(model.get_layer("blk_a_conv").kernel.shape) == (3, 3, in_channels, filters)
    assert model.get_layer("blk_a_conv").strides == (strides, strides)
    assert tuple(model.get_layer("blk_b_conv").kernel.shape) == (3, 3, filters, filters)
    norm_cls = ops.GroupNorm if norm_type == "group" else keras.layers.BatchNormalization
    assert isinstance(model.get_layer("blk_a_norm"), norm_cls)
    out = model(np.random.default_rng(13).standard_normal((2, 8, 8, in_channels))
                .astype(np.float32)).numpy()
    assert out.shape == (2, out_hw, out_hw, filters)
    assert np.all(out >= 0)


def test_identity_residual_block_adds_input():
    """With the second unit's norm zeroed (gamma = beta = 0) the block is relu(x)."""
    inputs = keras.Input(shape=(6, 6, 16))
    y = ops.residual_block(inputs, 16, "group", groups=4, name="blk")
    model = keras.Model(inputs, y)
    norm_b = model.get_layer("blk_b_norm")
    norm_b.gamma.assign(np.zeros(16, np.float32))
    norm_b.beta.assign(np.zeros(16, np.float32))
    x = np.random.default_rng(14).standard_normal((2, 6, 6, 16)).astype(np.float32)
    np.testing.assert_allclose(model(x).numpy(), np.maximum(x, 0), atol=1e-6)


def test_conv2d_refuses_padding_other_than_same():
    with pytest.raises(ValueError, match="pads 'same' only"):
        ops.Conv2D(4, 3, padding="valid")


# Fast paths against the plain ops -----------------------------------------------------------------

def _values_and_gradients(layer, x, dy):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
    return [t.numpy().astype(np.float32) for t in
            [tf.cast(y, tf.float32), *tape.gradient(loss, [x, *layer.trainable_variables])]]


def _conv_kernel(layer, x):
    """The policy's choice for the built ops.Conv2D `layer` on `x`."""
    return kernel_policy.conv_kernel(kernel_policy.current(), x.shape, layer.kernel.shape,
                                     layer.strides, (x.dtype, layer.kernel.dtype))


@pytest.fixture
def environment_switches(monkeypatch):
    """`environment_switches(GN_FAST_OPS="0")` sets the variables and reads the kernel switches
    anew, as a process started with them would; the process's own are read again after."""
    def read(**variables):
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        kernel_policy.from_environment.cache_clear()
        return kernel_policy.from_environment()
    yield read
    monkeypatch.undo()
    kernel_policy.from_environment.cache_clear()


def _assert_fast_path_equals_plain(layer, x, dy, rtol):
    """The layer's outputs and gradients with the fast paths on and in plain_ops() agree to
    `rtol` of each one's largest value."""
    fast = _values_and_gradients(layer, x, dy)
    with ops.plain_ops():
        plain = _values_and_gradients(layer, x, dy)
    for got, want in zip(fast, plain):
        scale = np.max(np.abs(want))
        assert np.max(np.abs(got - want)) <= rtol * scale


FAST_CASES = [
    pytest.param((4, 7, 5, 64), 32, "float32", 1e-5, id="float32"),
    pytest.param((4, 32, 32, 32), 8, "float32", 1e-5, id="xla_compiled"),
    pytest.param((3, 6, 64), 8, "float32", 1e-5, id="rank3"),
    pytest.param((2, 9, 9, 32), 32, "float32", 1e-5, id="instance"),
    pytest.param((1, 3, 3, 600), 30, "float32", 1e-5, id="uneven_channel_blocks"),
    pytest.param((4, 7, 5, 64), 32, "mixed_bfloat16", 1e-2, id="bfloat16"),
    pytest.param((4, 7, 5, 64), 32, "mixed_float16", 2e-3, id="float16"),
]


@pytest.fixture(params=["cpp", "tensorflow_ops"])
def gn_kernels(request, monkeypatch, kernel_switches):
    """Runs a test with GroupNorm's C++ kernels, then with its TensorFlow-op kernels (the
    fallback where the C++ ones cannot run); fails if another kernel set is used."""
    if request.param == "cpp":
        if not kernel_policy.cpp_kernels_available():
            pytest.skip("the C++ kernels cannot be built here (see tests/test_kernels.py)")
    else:
        kernel_switches(cpp_kernels=False)
    group_norm_fast = gn_compute.fast

    def checked(inputs, gamma, beta, groups, epsilon, kernels):
        assert (kernels is gn_compute.CPP_KERNELS) == (request.param == "cpp")
        return group_norm_fast(inputs, gamma, beta, groups, epsilon, kernels)
    monkeypatch.setattr(gn_compute, "fast", checked)
    return request.param


@pytest.mark.parametrize("shape,groups,policy,rtol", FAST_CASES)
def test_fast_group_norm_equals_plain_path(shape, groups, policy, rtol, gn_kernels):
    """Outputs and the gradients of x, gamma and beta, relative to their largest value (bfloat16,
    float16: both paths compute in float32 and round the output to 8 / 11 significand bits)."""
    rng = np.random.default_rng(7)
    x = _random_input(rng, shape) + 50.0  # a large mean: the variance must keep its precision
    gamma, beta = _random_affine(rng, shape[-1])
    dy = rng.standard_normal(shape).astype(np.float32)
    layer = _make_gn(groups, shape, gamma, beta, dtype=policy)
    _assert_fast_path_equals_plain(layer, x, dy, rtol)


@pytest.mark.parametrize("policy,rtol", [("float32", 1e-5), ("mixed_bfloat16", 3e-2)])
def test_fast_conv2d_equals_plain_path(policy, rtol):
    """The patches path of a small map against TensorFlow's convolution: outputs and the
    gradients of x, kernel and bias, relative to their largest value. In bfloat16 the two paths
    round at different points; against a float32 convolution each is within 1.4 % of the largest
    value (8 seeds), so they may differ from each other by up to about 3 %."""
    rng = np.random.default_rng(8)
    x = _random_input(rng, (3, 4, 4, 128))
    layer = ops.Conv2D(16, 3, strides=2, use_bias=True, dtype=policy)
    layer.build(x.shape)
    layer.kernel.assign(0.05 * rng.standard_normal(layer.kernel.shape).astype(np.float32))
    layer.bias.assign(rng.standard_normal(16).astype(np.float32))
    assert _conv_kernel(layer, tf.constant(x)) == "patches"
    dy = rng.standard_normal((3, 2, 2, 16)).astype(np.float32)
    _assert_fast_path_equals_plain(layer, x, dy, rtol)


def test_gn_fast_ops_0_switches_the_fast_paths_off(monkeypatch, environment_switches):
    """Layers built after the process read GN_FAST_OPS=0 take the plain ops; one built before
    keeps its own switches."""
    def refuse(*args):
        raise AssertionError("fast path used")
    monkeypatch.setattr(gn_compute, "fast", refuse)
    monkeypatch.setattr(ops.Conv2D, "_patches_times_kernel", refuse)
    fast_layer = ops.GroupNorm(4)
    x = tf.random.normal([2, 4, 4, 8])
    for value in ("0", "false", "off"):
        assert not environment_switches(GN_FAST_OPS=value).fast_ops
        layer, conv = ops.GroupNorm(4), ops.Conv2D(8, 4, strides=2)
        assert layer(x).shape == x.shape and conv(x).shape == (2, 2, 2, 8)
    with pytest.raises(AssertionError, match="fast path used"):
        fast_layer(x)


def test_conv2d_keeps_tensorflows_convolution_where_a_gpu_is_visible(monkeypatch):
    """The patches path was tuned on a CPU; on a GPU cuDNN's convolution is likely the faster."""
    patches = []
    original = ops.Conv2D._patches_times_kernel
    monkeypatch.setattr(ops.Conv2D, "_patches_times_kernel",
                        lambda self, *args: patches.append(1) or original(self, *args))
    conv, x = ops.Conv2D(8, 4, strides=2), tf.random.normal([2, 4, 4, 8])
    expected = conv(x)
    assert patches == [1]
    logical = tf.config.list_logical_devices
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: (
        [tf.config.LogicalDevice("/device:GPU:0", "GPU")] if kind == "GPU" else logical(kind)))
    np.testing.assert_allclose(conv(x), expected, rtol=1e-5, atol=1e-5)
    assert patches == [1]
    assert not kernel_policy.cpp_kernels_available()


def _traced_values_and_gradients(layer, x, dy):
    """Outputs and the gradients of x, kernel and bias from a traced function, where Conv2D's
    oneDNN gradients run, and the set of op types in its graph."""
    def values_and_gradients(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        return [y, *tape.gradient(y, [x, *layer.trainable_variables], output_gradients=dy)]
    function = tf.function(values_and_gradients)
    values = [t.numpy() for t in function(x)]
    graph = function.get_concrete_function(x).graph
    return values, {op.type for op in graph.get_operations()}


ONEDNN_CASES = [  # (input shape, filters, kernel size, strides, weight_std)
    pytest.param((32, 32, 32, 16), 16, 3, 1, False, id="resnet20_stage0"),
    pytest.param((32, 16, 16, 32), 64, 3, 2, False, id="strided"),
    pytest.param((32, 16, 16, 64), 128, 4, 2, False, id="conv_net_even_kernel"),
    pytest.param((32, 16, 16, 32), 32, 3, 1, True, id="weight_std"),
]


@pytest.mark.parametrize("shape,filters,kernel_size,strides,weight_std", ONEDNN_CASES)
def test_conv2d_onednn_gradients_equal_the_plain_path(shape, filters, kernel_size, strides,
                                                      weight_std):
    """Large float32 convolutions take both gradients from TensorFlow's oneDNN ops: the same
    outputs and gradients of x, kernel and bias as TensorFlow's gradients (GN_FAST_OPS=0), to
    float32 rounding relative to each one's largest value."""
    if not conv_kernels.onednn_gradients_work():
        pytest.skip("this TensorFlow has no usable oneDNN convolution gradients")
    rng = np.random.default_rng(21)
    x = tf.constant(_random_input(rng, shape))
    layer = ops.Conv2D(filters, kernel_size, strides=strides, weight_std=weight_std,
                       use_bias=True)
    layer.build(x.shape)
    layer.bias.assign(rng.standard_normal(filters).astype(np.float32))
    out_size = -(-shape[1] // strides)
    dy = tf.constant(rng.standard_normal((shape[0], out_size, out_size, filters)), tf.float32)
    fast, fast_ops = _traced_values_and_gradients(layer, x, dy)
    assert set(conv_kernels.BACKPROP_OPS) <= fast_ops
    with ops.plain_ops():
        plain, plain_ops = _traced_values_and_gradients(layer, x, dy)
    assert not set(conv_kernels.BACKPROP_OPS) & plain_ops
    for got, want in zip(fast, plain):
        assert np.max(np.abs(got - want)) <= 2e-5 * np.max(np.abs(want))


@pytest.fixture
def resnet20_conv():
    """(layer, x, dy) of a batch-32 ResNet-20 3x3 conv, whose gradients run on oneDNN; skips
    where they cannot."""
    if not conv_kernels.onednn_gradients_work():
        pytest.skip("this TensorFlow has no usable oneDNN convolution gradients")
    x = tf.constant(_random_input(np.random.default_rng(23), (32, 32, 32, 16)))
    return ops.Conv2D(16, 3), x, tf.random.stateless_normal([32, 32, 32, 16], [5, 6])


def test_conv2d_onednn_gradients_are_bit_identical_call_after_call(resnet20_conv):
    """Resuming a run from a checkpoint gives the uninterrupted run's numbers only if every
    gradient is reproducible."""
    layer, x, dy = resnet20_conv
    first, op_types = _traced_values_and_gradients(layer, x, dy)
    assert set(conv_kernels.BACKPROP_OPS) <= op_types
    for _ in range(3):
        for got, want in zip(_traced_values_and_gradients(layer, x, dy)[0], first):
            np.testing.assert_array_equal(got, want)


def test_conv2d_onednn_gradients_only_where_they_pay_off():
    """Batch 32 of a ResNet-20 3x3 conv: yes; batch 2, a 3-channel input, an unknown batch, a
    bfloat16 input: no."""
    if not conv_kernels.onednn_gradients_work():
        pytest.skip("this TensorFlow has no usable oneDNN convolution gradients")

    def chosen(input_shape, kernel_shape, strides, dtypes=(tf.float32, tf.float32)):
        return kernel_policy.conv_kernel(kernel_policy.current(), tf.TensorShape(input_shape),
                                         kernel_shape, strides, dtypes)
    assert chosen((32, 32, 32, 16), (3, 3, 16, 16), (1, 1)) == "onednn"
    assert chosen((2, 32, 32, 16), (3, 3, 16, 16), (1, 1)) == "tensorflow"
    assert chosen((32, 32, 32, 3), (3, 3, 3, 64), (1, 1)) == "tensorflow"
    assert chosen((None, 32, 32, 16), (3, 3, 16, 16), (1, 1)) == "tensorflow"
    assert chosen((32, 16, 16, 64), (4, 4, 64, 128), (2, 2)) == "onednn"
    assert chosen((32, 32, 32, 16), (3, 3, 16, 16), (1, 1), (tf.bfloat16,) * 2) == "tensorflow"


@pytest.mark.parametrize("variable", ["GN_ONEDNN_CONV", "TF_ENABLE_ONEDNN_OPTS"])
def test_switching_off_the_onednn_gradients(variable, environment_switches):
    assert not environment_switches(**{variable: "0"}).onednn_conv
    x = tf.random.normal([32, 32, 32, 16])
    layer = ops.Conv2D(16, 3)
    _, op_types = _traced_values_and_gradients(layer, x, tf.ones([32, 32, 32, 16]))
    assert "Conv2DBackpropInput" in op_types
    assert not set(conv_kernels.BACKPROP_OPS) & op_types


def test_conv2d_onednn_gradients_in_eager_and_xla_compiled_gradients(resnet20_conv):
    """Where the oneDNN ops cannot run (a gradient taken eagerly, a function XLA compiles
    whole), the layer gives TensorFlow's gradients, the same numbers."""
    layer, x, dy = resnet20_conv
    traced, _ = _traced_values_and_gradients(layer, x, dy)

    def input_gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        return tape.gradient(y, x, output_gradients=dy)
    for other in (input_gradient(x), tf.function(input_gradient, jit_compile=True)(x)):
        np.testing.assert_allclose(other.numpy(), traced[1], rtol=1e-4, atol=1e-4)


def test_onednn_gradients_unusable_where_the_ops_are_missing(monkeypatch):
    monkeypatch.setattr(conv_kernels, "BACKPROP_OPS", ("_NoSuchOp", "_NorThisOne"))
    assert conv_kernels.onednn_gradients_work.__wrapped__() is False


def _second_order_gradient(layer, x):
    """d/dx of sum((d/dx sum(y^3))^2): needs the gradient of GN's backward pass."""
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            loss = tf.reduce_sum(layer(x) ** 3)
        penalty = tf.reduce_sum(inner.gradient(loss, x) ** 2)
    return outer.gradient(penalty, x).numpy()


def test_second_order_gradients(gn_kernels):
    """The TensorFlow-op kernels give the plain path's second-order gradients; the C++ kernels
    refuse them with a message that says how to get them."""
    layer = ops.GroupNorm(4)
    x = tf.constant(_random_input(np.random.default_rng(15), (2, 4, 4, 8)))
    if gn_kernels == "cpp":
        with pytest.raises(NotImplementedError, match="set GN_CPP_KERNELS=0"):
            _second_order_gradient(layer, x)
        return
    fast = _second_order_gradient(layer, x)
    with ops.plain_ops():
        plain = _second_order_gradient(layer, x)
    assert np.max(np.abs(fast - plain)) <= 1e-5 * np.max(np.abs(plain))


def test_group_norm_inside_a_function_that_xla_compiles_whole():
    """`jit_compile=True` around the layer cannot hold the C++ ops: it gets the TensorFlow-op
    kernels, with the plain path's values and input gradients."""
    layer = ops.GroupNorm(4)
    x = tf.constant(_random_input(np.random.default_rng(16), (2, 4, 4, 8)))
    dy = tf.random.stateless_normal(x.shape, [1, 2])

    def values_and_gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        return y, tape.gradient(y, x, output_gradients=dy)
    compiled = tf.function(values_and_gradient, jit_compile=True)(x)
    for got, want in zip(compiled, values_and_gradient(x)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_fast_group_norm_in_a_function_with_unknown_batch(gn_kernels):
    layer = ops.GroupNorm(4, epsilon=EPS)
    traced = tf.function(lambda x: layer(x), input_signature=[tf.TensorSpec([None, 6, 6, 8])])
    for batch in (1, 3):
        x = tf.random.normal([batch, 6, 6, 8]) * 2 + 1
        y, _, _ = np_group_norm(x.numpy(), np.ones(8, np.float32), np.zeros(8, np.float32), 4)
        np.testing.assert_allclose(traced(x).numpy(), y, atol=1e-4)


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_leaky_relu_equals_keras_with_gradients(dtype):
    """The gradient read from the output is the one Keras reads from the input, zeros included."""
    x = tf.constant(np.concatenate([np.linspace(-3, 3, 61), [0.0, -0.0]]), dtype)
    ours, theirs = (layer(0.2, dtype=dtype.name) for layer in (ops.LeakyReLU,
                                                              keras.layers.LeakyReLU))
    upstream = tf.cast(tf.range(1, 64), dtype)
    results = []
    for layer in (ours, theirs):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        results.append((y, tape.gradient(y, x, output_gradients=upstream)))
    (y, dx), (expected_y, expected_dx) = results
    assert y.dtype == dx.dtype == dtype
    np.testing.assert_array_equal(tf.cast(y, tf.float32), tf.cast(expected_y, tf.float32))
    np.testing.assert_array_equal(tf.cast(dx, tf.float32), tf.cast(expected_dx, tf.float32))
