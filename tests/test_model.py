"""model.py: every builder serves 28, 32 and 64 px inputs, is made of ops.py layers, and trains;
its activations' kink, and the kink-free networks that comparisons of training take."""
import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import input_ops
import model as model_lib
import ops
from conftest import assert_trained_alike, without_kinks

SHAPES = [(28, 28, 1), (32, 32, 3), (64, 64, 3)]


@pytest.mark.parametrize("name", model_lib.MODELS)
@pytest.mark.parametrize("input_shape", SHAPES)
def test_builders_give_logits_for_every_input_size(name, input_shape):
    groups = 8 if name == "resnet20" else 32
    net = model_lib.build_model(name, input_shape, 7, "group", groups)
    logits = net(np.random.default_rng(0).random((2, *input_shape), dtype=np.float32))
    assert logits.shape == (2, 7)
    assert np.all(np.isfinite(logits.numpy()))


@pytest.mark.parametrize("norm_type", ops.NORM_TYPES)
def test_norm_type_selects_the_normalization_layers(norm_type):
    net = model_lib.build_model("resnet20", (32, 32, 3), 10, norm_type, groups=8,
                                weight_std=True)
    norms = [layer for layer in net.layers if layer.name.endswith("_norm")]
    assert len(norms) == 1 + 9 * 2 + 2  # stem, two per block, two projection shortcuts
    expected = type(ops.norm_layer(norm_type, 16, groups=8))
    assert all(type(layer) is expected for layer in norms)
    convs = [layer for layer in net.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs and all(isinstance(c, ops.Conv2D) and c.weight_std for c in convs)


def test_conv_net_is_the_2018_layout():
    net = model_lib.build_model("conv", (32, 32, 3), 10, "batch", dropout=0.5)
    convs = [net.get_layer(f"conv{i}") for i in range(4)]
    assert [c.filters for c in convs] == [64, 128, 256, 512]
    assert all(c.kernel_size == (4, 4) and c.strides == (2, 2) for c in convs)
    assert [net.get_layer(f"fc{i}").units for i in range(3)] == [512, 128, 32]
    assert net.get_layer("conv0_dropout").rate == 0.5
    assert isinstance(net.get_layer("conv3_norm"), keras.layers.BatchNormalization)


def test_resnet20_has_twenty_weighted_layers():
    net = model_lib.build_model("resnet20", (32, 32, 3), 10, "group", groups=16)
    convs = [layer for layer in net.layers if isinstance(layer, keras.layers.Conv2D)]
    main_path = [c for c in convs if "shortcut" not in c.name]
    assert len(main_path) + 1 == 20  # 19 convs on the main path + the classifier
    assert net.layers[-1].units == 10


def test_groups_that_do_not_divide_the_channels_are_refused():
    with pytest.raises(ValueError, match="C=16 channels are not divisible by G=32"):
        model_lib.build_model("resnet20", (32, 32, 3), 10, "group", groups=32)


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="choose one of conv, resnet, resnet20"):
        model_lib.build_model("vgg", (32, 32, 3), 10, "group")


@pytest.mark.parametrize("seed", [0, 1])
def test_resnet20_learns_a_batch(seed):
    """The net can fit one fixed batch: 40 Adam steps cut the loss by more than 70%."""
    keras.utils.set_random_seed(seed)
    net = model_lib.build_model("resnet20", (16, 16, 3), 4, "group", groups=8)
    rng = np.random.default_rng(1)
    images = tf.constant(rng.random((8, 16, 16, 3), dtype=np.float32))
    labels = tf.constant(np.arange(8) % 4)
    optimizer = keras.optimizers.Adam(3e-3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, net(images, training=True))
        gradients = tape.gradient(loss, net.trainable_variables)
        optimizer.apply_gradients(zip(gradients, net.trainable_variables))
        return loss

    losses = [float(step()) for _ in range(40)]
    assert losses[-1] < 0.3 * losses[0], losses


def _one_sgd_step(net, images, labels, rate=0.01):
    """The network's trainable weights before and after one SGD step on the batch."""
    with tf.GradientTape() as tape:
        logits = net(images, training=True)
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True))
    gradients = tape.gradient(loss, net.trainable_variables)
    before = {w.path: w.numpy() for w in net.trainable_variables}
    return before, {w.path: before[w.path] - rate * g.numpy()
                    for w, g in zip(net.trainable_variables, gradients)}


@pytest.mark.parametrize("kinks", ["leaky_relu", "without_kinks"])
def test_rounding_at_the_kink_moves_the_weights_unless_there_is_none(kinks):
    """Why comparisons of training across computations take conftest.py's `without_kinks`: two
    runs of one SGD step whose inputs differ by float32 rounding (one pixel, 0 in one run and
    one ulp of 1.0 in the other). The sample's images have a black corner, and the conv biases
    start at 0, so conv0's pre-activations there are exactly 0, at LeakyReLU's kink; the pixel
    puts those of about half the channels (where the kernel's tap is positive) on the other
    side of it. With the kink, their gradient takes slope 1 instead of 0.2 and conv0's bias
    moves by far more than rounding explains; without it, the two runs agree to rounding."""
    data = input_ops.load("sample", "./datasets")[1]
    images = data.train_images[:8].astype(np.float32) / 255
    labels = data.train_labels[:8]
    assert not images[0, :3, :3].any()  # conv0's first 4x4 window (padded by 1) sees only 0
    nudged = images.copy()
    nudged[0, 0, 0] = np.finfo(np.float32).eps  # 2**-23
    with without_kinks() if kinks == "without_kinks" else contextlib.nullcontext():
        keras.utils.set_random_seed(0)
        net = model_lib.build_model("conv", images.shape[1:], 10, "group", dropout=0.0)
    start, expected = _one_sgd_step(net, images, labels)
    _, got = _one_sgd_step(net, nudged, labels)
    if kinks == "without_kinks":
        assert_trained_alike(got, expected, start)
        return
    bias = "conv0/bias"  # a jump of 0.8 x one position's gradient out of 8 x 14 x 14 positions
    jump = np.abs(got[bias] - expected[bias]).max() / np.abs(expected[bias] - start[bias]).max()
    assert jump > 1e-3, jump  # 6e-3 of its update; rounding gives ~1e-5
    with pytest.raises(AssertionError, match=bias):
        assert_trained_alike(got, expected, start)
