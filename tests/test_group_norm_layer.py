"""ops.GroupNorm as a drop-in for keras.layers.GroupNormalization: every constructor argument,
masking, serialization, mixed precision, agreement with Keras's layer, the conversion of a model
built with Keras's layer, and the checkpoint names of this repo's models.

Numbers are checked against a float64 NumPy reference that moves the channel axis last, or
against Keras's own layer. Tensors are tiny; nothing trains.
"""
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.backend import AutocastScope

import ops
from kernels import group_norm as gn_compute


def np_group_norm(x, groups, epsilon, gamma=None, beta=None, axis=-1):
    """Float64 GN of `x` with channels on `axis`: the channels moved last, each example's
    [positions, G, C/G] normalized over positions and C/G, and moved back."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    channels = x.shape[-1]
    grouped = x.reshape(x.shape[0], -1, groups, channels // groups)
    mean = grouped.mean(axis=(1, 3), keepdims=True)
    variance = grouped.var(axis=(1, 3), keepdims=True)
    y = ((grouped - mean) / np.sqrt(variance + epsilon)).reshape(x.shape)
    y = y * (1.0 if gamma is None else gamma) + (0.0 if beta is None else beta)
    return np.moveaxis(y, -1, axis)


def _input(shape, seed=0, loc=2.0, scale=3.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape) + loc).astype(np.float32)


def _affine(channels, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.5, 1.5, channels).astype(np.float32),
            rng.uniform(-1.0, 1.0, channels).astype(np.float32))


def _with_weights(layer, shape, gamma, beta):
    layer.build(shape)
    layer.set_weights([gamma, beta])
    return layer


# Defaults and validation --------------------------------------------------------------------------

def test_defaults_and_config_keys_are_keras_ones():
    ours = ops.GroupNorm().get_config()
    theirs = keras.layers.GroupNormalization().get_config()
    for config in (ours, theirs):
        del config["name"]
    assert ours == theirs


@pytest.mark.parametrize("groups", [0, -2, 1.5, "32", True])
def test_invalid_groups_are_refused(groups):
    with pytest.raises(ValueError, match="groups must be a positive integer, or -1"):
        ops.GroupNorm(groups=groups)


@pytest.mark.parametrize("axis", [0, 3, -4])
def test_axes_that_are_not_channel_axes_are_refused(axis):
    with pytest.raises(ValueError, match=f"axis={axis} is not a channel axis"):
        ops.GroupNorm(groups=1, axis=axis)(np.zeros((2, 3, 4), np.float32))


def test_groups_more_than_channels_names_c_and_g():
    with pytest.raises(ValueError, match="C=4 channels are not divisible by G=8 groups"):
        ops.GroupNorm(groups=8)(np.zeros((2, 3, 4), np.float32))


# Each argument has its effect ---------------------------------------------------------------------

@pytest.mark.parametrize("groups", [1, 2, 6])
def test_groups_and_epsilon_against_numpy(groups):
    x = _input((2, 3, 5, 6))
    for epsilon in (1e-3, 1.0):
        y = ops.GroupNorm(groups=groups, epsilon=epsilon)(x)
        np.testing.assert_allclose(y, np_group_norm(x, groups, epsilon), atol=2e-5)


def test_groups_minus_one_is_one_group_per_channel():
    x = _input((2, 4, 6))
    layer = ops.GroupNorm(groups=-1)
    y = layer(x)
    assert layer.groups == 6
    np.testing.assert_allclose(y, ops.GroupNorm(groups=6)(x), rtol=0, atol=1e-6)
    np.testing.assert_allclose(y, np_group_norm(x, 6, 1e-3), atol=2e-5)


def _values_and_gradients(layer, x, dy, gamma, beta):
    _with_weights(layer, x.shape, gamma, beta)
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * dy)
    return [y.numpy(), *(g.numpy() for g in tape.gradient(loss, [x, layer.gamma, layer.beta]))]


@pytest.mark.parametrize("shape,axis", [((2, 8, 3, 5), 1), ((2, 3, 8, 5), -2), ((3, 8), 1)])
def test_channels_on_another_axis_equal_moving_them_last(shape, axis):
    """Values and gradients (x, gamma, beta) of GN over `axis` equal those of a channels-last GN
    of the input with that axis moved last."""
    x, dy = _input(shape), _input(shape, seed=2)
    gamma, beta = _affine(8)
    y, dx, d_gamma, d_beta = _values_and_gradients(ops.GroupNorm(groups=4, axis=axis), x, dy,
                                                   gamma, beta)
    want = _values_and_gradients(ops.GroupNorm(groups=4), np.moveaxis(x, axis, -1),
                                 np.moveaxis(dy, axis, -1), gamma, beta)
    for got, expected in zip([np.moveaxis(y, axis, -1), np.moveaxis(dx, axis, -1), d_gamma,
                              d_beta], want):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(y, np_group_norm(x, 4, 1e-3, gamma, beta, axis), atol=2e-5)


def test_channels_first_with_unknown_positions_in_a_function():
    layer = ops.GroupNorm(groups=2, axis=1)
    traced = tf.function(layer, input_signature=[tf.TensorSpec([None, 4, None, None])])
    for shape in ((1, 4, 3, 2), (2, 4, 5, 5)):
        x = _input(shape)
        np.testing.assert_allclose(traced(x), np_group_norm(x, 2, 1e-3, axis=1), atol=2e-5)


@pytest.mark.parametrize("center,scale", [(False, True), (True, False), (False, False)])
def test_center_and_scale_false_create_no_weight(center, scale):
    x = _input((2, 3, 4))
    layer = ops.GroupNorm(groups=2, center=center, scale=scale, beta_initializer="ones",
                          gamma_initializer=keras.initializers.Constant(3.0))
    y = layer(x)
    assert [w.name for w in layer.weights] == ["gamma"] * scale + ["beta"] * center
    assert (layer.gamma is None) is not scale and (layer.beta is None) is not center
    want = np_group_norm(x, 2, 1e-3, gamma=3.0 if scale else None, beta=1.0 if center else None)
    np.testing.assert_allclose(y, want, atol=1e-4)


def test_initializers_set_the_initial_values():
    layer = ops.GroupNorm(groups=2, gamma_initializer=keras.initializers.Constant(2.5),
                          beta_initializer=keras.initializers.RandomUniform(-3.0, -2.0, seed=1))
    layer.build((2, 4))
    np.testing.assert_array_equal(layer.gamma.numpy(), np.full(4, 2.5, np.float32))
    beta = layer.beta.numpy()
    assert np.all((beta >= -3.0) & (beta < -2.0)) and len(set(beta)) == 4


def test_regularizers_add_their_losses():
    layer = ops.GroupNorm(groups=2, gamma_regularizer=keras.regularizers.L2(0.01),
                          beta_regularizer=keras.regularizers.L1(0.1))
    gamma, beta = _affine(4)
    _with_weights(layer, (2, 4), gamma, beta)
    losses = sorted(float(loss) for loss in layer.losses)
    want = sorted([0.01 * np.sum(gamma.astype(np.float64) ** 2),
                   0.1 * np.sum(np.abs(beta.astype(np.float64)))])
    np.testing.assert_allclose(losses, want, rtol=1e-6)
    unregularized = ops.GroupNorm(groups=2)
    unregularized.build((2, 4))
    assert unregularized.losses == []


def test_constraints_apply_after_an_optimizer_update():
    layer = ops.GroupNorm(groups=2, gamma_constraint=keras.constraints.NonNeg(),
                          beta_constraint=keras.constraints.UnitNorm(axis=0))
    gamma = np.array([0.2, 0.5, 2.0, 3.0], np.float32)
    beta = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
    _with_weights(layer, (2, 4), gamma, beta)
    gradient = np.array([1.0, -1.0, 1.0, 1.0], np.float32)
    keras.optimizers.SGD(learning_rate=1.0).apply_gradients(
        [(tf.constant(gradient), layer.gamma), (tf.constant(gradient), layer.beta)])
    np.testing.assert_allclose(layer.gamma.numpy(), [0.0, 1.5, 1.0, 2.0], atol=1e-6)
    stepped = beta - gradient
    np.testing.assert_allclose(layer.beta.numpy(), stepped / np.linalg.norm(stepped), atol=1e-6)


# Masking ------------------------------------------------------------------------------------------

def test_a_mask_passes_through_and_masked_positions_count_as_in_keras():
    """As in Keras's layer: the output carries the input's mask; masked positions are normalized
    with the others and count in the statistics."""
    x = _input((2, 5, 4))
    x[0, 3:] = 0.0
    x[1, 1] = 0.0
    inputs = keras.Input((5, 4))
    masked = keras.layers.Masking(0.0)(inputs)
    outputs = [ops.GroupNorm(groups=2)(masked), keras.layers.GroupNormalization(groups=2)(masked)]
    for output in outputs:
        np.testing.assert_array_equal(output._keras_mask.shape, (None, 5))
    y = keras.layers.Masking(0.0)(tf.constant(x))
    ours, theirs = ops.GroupNorm(groups=2)(y), keras.layers.GroupNormalization(groups=2)(y)
    np.testing.assert_array_equal(ours._keras_mask, np.any(x != 0, axis=-1))
    np.testing.assert_allclose(ours, np_group_norm(x, 2, 1e-3), atol=2e-5)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


# Serialization ------------------------------------------------------------------------------------

def _every_argument():
    return dict(groups=2, axis=1, epsilon=0.5, center=True, scale=True,
                beta_initializer=keras.initializers.Constant(0.25),
                gamma_initializer=keras.initializers.Constant(1.5),
                beta_regularizer=keras.regularizers.L1(0.1),
                gamma_regularizer=keras.regularizers.L2(0.01),
                beta_constraint=keras.constraints.MaxNorm(3.0),
                gamma_constraint=keras.constraints.NonNeg(), name="gn")


def test_get_config_from_config_round_trip():
    layer = ops.GroupNorm(**_every_argument())
    x = _input((2, 4, 3))
    y = layer(x)
    restored = ops.GroupNorm.from_config(layer.get_config())
    assert restored.get_config() == layer.get_config()
    np.testing.assert_array_equal(restored(x), y)
    assert [float(loss) for loss in restored.losses] == [float(loss) for loss in layer.losses]
    assert isinstance(restored.gamma_constraint, keras.constraints.NonNeg)
    np.testing.assert_allclose(y, np_group_norm(x, 2, 0.5, 1.5, 0.25, axis=1), atol=1e-5)


def test_keras_file_round_trip(tmp_path):
    inputs = keras.Input((4, 3))
    model = keras.Model(inputs, ops.GroupNorm(**_every_argument())(inputs))
    gamma, beta = _affine(4)
    model.get_layer("gn").set_weights([gamma, beta])
    model.save(tmp_path / "gn.keras")
    restored = keras.models.load_model(tmp_path / "gn.keras")
    layer = restored.get_layer("gn")
    assert isinstance(layer, ops.GroupNorm)
    assert layer.get_config() == model.get_layer("gn").get_config()
    x = _input((2, 4, 3))
    np.testing.assert_array_equal(restored(x), model(x))
    np.testing.assert_allclose(restored(x), np_group_norm(x, 2, 0.5, gamma, beta, axis=1),
                               atol=1e-5)


# Mixed precision ----------------------------------------------------------------------------------

@pytest.mark.parametrize("policy,dtype,atol", [("mixed_float16", "float16", 5e-3),
                                               ("mixed_bfloat16", "bfloat16", 2e-2)])
def test_mixed_policy_normalizes_float32_inputs_before_casting(policy, dtype, atol):
    """Float32 inputs of ~1e5 with a spread of ~1: cast to float16 first they would be inf (max
    65504), cast to bfloat16 they would lose the spread (spacing 512 there)."""
    x = _input((2, 4, 8), loc=1e5, scale=1.0)
    layer = ops.GroupNorm(groups=2, dtype=policy)
    y = layer(x)
    assert y.dtype == dtype and layer.gamma.dtype == layer.beta.dtype == "float32"
    np.testing.assert_allclose(tf.cast(y, tf.float32), np_group_norm(x, 2, 1e-3), atol=atol * 4)
    inputs = keras.Input((4, 8))
    assert ops.GroupNorm(groups=2, dtype=policy)(inputs).dtype == dtype


def test_narrower_inputs_are_cast_up_to_the_compute_dtype():
    x = _input((2, 3, 4))
    y = ops.GroupNorm(groups=2)(tf.cast(x, tf.float16))
    assert y.dtype == tf.float32
    x16 = tf.cast(tf.cast(x, tf.float16), tf.float32).numpy()
    np.testing.assert_allclose(y, np_group_norm(x16, 2, 1e-3), atol=2e-5)


def test_weights_are_float32_inside_a_float16_autocast_scope():
    """Keras casts autocast variables read inside a float16 scope; gamma and beta stay float32,
    so a gamma above float16's range is neither stored nor applied as inf."""
    layer = ops.GroupNorm(groups=2)
    layer.build((2, 3, 4))
    x = _input((2, 3, 4))
    with AutocastScope("float16"):
        layer.gamma.assign(np.full(4, 7e4, np.float32))
        assert layer.gamma.value.dtype == "float32"
        np.testing.assert_array_equal(layer.gamma.value, np.full(4, 7e4, np.float32))
        y = layer(x)
    assert y.dtype == tf.float32
    np.testing.assert_allclose(y, np_group_norm(x, 2, 1e-3, gamma=7e4), rtol=1e-4, atol=1.0)


# Agreement with keras.layers.GroupNormalization and model conversion ------------------------------

@pytest.mark.parametrize("kwargs,shape", [
    (dict(groups=4), (2, 3, 3, 8)),
    (dict(groups=-1, axis=1), (2, 6, 5)),
    (dict(groups=1, center=False), (3, 8)),
    (dict(groups=2, axis=2, scale=False, epsilon=0.1), (2, 3, 4, 5)),
])
def test_outputs_equal_keras_group_normalization(kwargs, shape):
    ours, theirs = ops.GroupNorm(**kwargs), keras.layers.GroupNormalization(**kwargs)
    x = _input(shape)
    theirs.build(shape)
    ours.build(shape)
    weights = [np.random.default_rng(3).uniform(-2, 2, w.shape).astype(np.float32)
               for w in theirs.weights]
    theirs.set_weights(weights)
    ours.set_weights(weights)
    np.testing.assert_allclose(ours(x), theirs(x), rtol=0, atol=1e-5)


def _keras_gn_model():
    inner = keras.Sequential([keras.layers.Dense(8), keras.layers.GroupNormalization(groups=2)],
                             name="inner")
    inputs = keras.Input((6, 5))
    x = keras.layers.GroupNormalization(groups=3, axis=1)(inputs)
    x = inner(x)
    x = keras.layers.BatchNormalization()(x)
    outputs = keras.layers.GroupNormalization(groups=-1, epsilon=1e-5, center=False)(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(4)
    model.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(np.float32)
                       for w in model.weights])
    return model


def test_from_keras_group_norm_keeps_weights_and_outputs():
    model = _keras_gn_model()
    converted = ops.from_keras_group_norm(model)

    def group_norms(net):
        return [layer for layer in net._flatten_layers()
                if isinstance(layer, (ops.GroupNorm, keras.layers.GroupNormalization))]
    assert [type(layer) for layer in group_norms(converted)] == [ops.GroupNorm] * 3
    for theirs, ours in zip(group_norms(model), group_norms(converted)):
        assert ours.get_config() == theirs.get_config()
    for ours, theirs in zip(converted.weights, model.weights):
        np.testing.assert_array_equal(ours, theirs)
    x = _input((3, 6, 5))
    for training in (False, True):
        np.testing.assert_allclose(converted(x, training=training), model(x, training=training),
                                   rtol=0, atol=1e-5)


# Checkpoints of this repo's models ---------------------------------------------------------------

def test_checkpoint_variable_names_are_unchanged(tmp_path):
    """The names a checkpoint of GN layers made by `norm_layer` holds, as written before
    GroupNorm took Keras's arguments: old checkpoints keep loading."""
    inputs = keras.Input((4, 4, 3))
    x = ops.conv_norm_act(inputs, 8, "group", groups=4, weight_std=False, name="a")
    x = ops.norm(x, "layer", name="ln")
    model = keras.Model(inputs, ops.norm(x, "instance", name="in"))
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    value = "/.ATTRIBUTES/VARIABLE_VALUE"
    assert [name for name, _ in tf.train.list_variables(path)] == [
        "_CHECKPOINTABLE_OBJECT_GRAPH", "model/_operations/1/_kernel" + value,
        *(f"model/_operations/{layer}/{weight}{value}" for layer in (2, 4, 5)
          for weight in ("beta", "gamma"))]
    assert [w.path for w in model.weights] == [
        "a_conv/kernel", "a_norm/gamma", "a_norm/beta", "ln/gamma", "ln/beta", "in/gamma",
        "in/beta"]
    assert all(model.get_layer(name).epsilon == 1e-5 for name in ("a_norm", "ln", "in"))


# The fast paths serve channels last ---------------------------------------------------------------

@pytest.mark.parametrize("axis,fast", [(-1, True), (3, True), (1, False)])
def test_only_channels_last_takes_the_fast_kernels(axis, fast, monkeypatch):
    paths = []

    def recorded(name):
        original = getattr(gn_compute, name)

        def record(*args):
            paths.append(name)
            return original(*args)
        return record
    for name in ("fast", "plain"):
        monkeypatch.setattr(gn_compute, name, recorded(name))
    ops.GroupNorm(groups=2, axis=axis)(_input((2, 4, 4, 4)))
    assert paths == ["fast" if fast else "plain"]
