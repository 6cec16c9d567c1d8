"""A TensorFlow or Keras release without the private pieces the fast paths use makes the repo
slower, never broken: each piece is taken away here as a release would (an import that fails, a
Keras attribute gone), and training still runs, with one warning line, to the reference's
numbers: those of a network without kinks, trained by momentum SGD, to float32 rounding
(conftest.py's `without_kinks` says why)."""
import logging
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import input_ops
import kernels
import train_flags
import updates
from conftest import MOMENTUM_SGD, assert_trained_alike
from kernels import conv as conv_kernels
from kernels import policy as kernel_policy
from kernels import optimizers

SAMPLE = input_ops.load("sample", "./datasets")[1]


def weights_after(count, *extra):
    """The conv net's weights before and after `count` updates of 32 examples (batches of 16)
    on the sample, no dropout: the same examples whatever the kernels."""
    config = train_flags.parse_args(["--batch_size", "16", "--max_batch_size", "32",
                                     "--dropout", "0", "--max_training_step", "10", *extra])
    config.model, config.augment = "conv", False
    tf.keras.utils.set_random_seed(0)
    run = updates.Updater(config, SAMPLE)
    before = [v.numpy() for v in run.model.weights]
    for _ in range(count):
        run.train_step()
    return before, [v.numpy() for v in run.model.weights]


def remove_module(monkeypatch, package, name):
    """`from <package> import <name>` fails from here on, as in a release that moved it."""
    monkeypatch.setitem(sys.modules, f"{package}.{name}", None)
    monkeypatch.delattr(sys.modules[package], name)


def our_warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == "gn" and r.levelno == logging.WARNING]


@pytest.fixture
def fresh_checks():
    """The once-per-process checks run again in the test, and again after it."""
    checks = (kernel_policy._xla_context_test, conv_kernels.onednn_gradients_work)
    for check in checks:
        check.cache_clear()
    yield
    for check in checks:
        check.cache_clear()


@pytest.mark.parametrize("norm_type", ["group", "batch"])
def test_without_the_xla_context_test_norms_run_their_tensorflow_op_kernels(
        norm_type, monkeypatch, fresh_checks, kink_free_network, caplog):
    start, reference = weights_after(3, "--norm_type", norm_type, *MOMENTUM_SGD)
    kernel_policy._xla_context_test.cache_clear()
    remove_module(monkeypatch, "tensorflow.python.ops", "control_flow_util")
    monkeypatch.setattr(kernels, "group_norm_library", lambda: pytest.fail("C++ kernels ran"))
    with caplog.at_level(logging.WARNING, logger="gn"):
        _, got = weights_after(3, "--norm_type", norm_type, *MOMENTUM_SGD)
    assert kernel_policy.in_xla_function()
    warnings = our_warnings(caplog)
    assert len(warnings) == 1 and "cannot tell an XLA-compiled function apart" in warnings[0]
    assert_trained_alike(got, reference, start)


def test_without_the_op_registry_convolutions_take_tensorflows_gradients(
        monkeypatch, fresh_checks, kink_free_network, caplog):
    assert conv_kernels.onednn_gradients_work(), "this machine runs the oneDNN gradients"
    start, reference = weights_after(3, *MOMENTUM_SGD)
    conv_kernels.onednn_gradients_work.cache_clear()
    remove_module(monkeypatch, "tensorflow.python.framework", "op_def_registry")
    monkeypatch.setattr(conv_kernels, "_onednn_gradients",
                        lambda *args: pytest.fail("oneDNN gradients ran"))
    with caplog.at_level(logging.WARNING, logger="gn"):
        _, got = weights_after(3, *MOMENTUM_SGD)
        assert not conv_kernels.onednn_gradients_work()
    warnings = our_warnings(caplog)
    assert warnings == ["Conv2D takes TensorFlow's own gradients, not the oneDNN kernels: this "
                        "TensorFlow has no op registry to look them up in"]
    assert_trained_alike(got, reference, start)


@pytest.mark.parametrize("ours, keras_class", [
    (optimizers.Adam, keras.optimizers.Adam),
    (optimizers.MomentumSGD, keras.optimizers.SGD),
])
def test_without_keras_internals_the_optimizers_take_keras_update(ours, keras_class, monkeypatch,
                                                                  caplog):
    """With an attribute the fused update reads gone, the update is Keras's own, bit for bit."""
    monkeypatch.setattr(ours, "KERAS_INTERNALS", (*ours.KERAS_INTERNALS, "_gone_in_a_release"))
    options = {"momentum": 0.9} if ours is optimizers.MomentumSGD else {}
    results = []
    for optimizer in (ours(1e-2, global_clipnorm=20.0, **options),
                      keras_class(1e-2, global_clipnorm=20.0, **options)):
        variables = [keras.Variable(np.linspace(-1, 1, 12, dtype="float32").reshape(3, 4))]
        with caplog.at_level(logging.WARNING, logger="gn"):
            optimizer.build(variables)
        update = tf.function(lambda g: optimizer.apply_gradients(zip([g], variables)))
        for step in range(5):
            update(tf.fill([3, 4], 0.1 * (step + 1)))
        results.append(variables[0].numpy())
    np.testing.assert_array_equal(results[0], results[1])
    warnings = our_warnings(caplog)
    assert warnings == [f"{ours.__name__} takes Keras's own update step, not TensorFlow's fused "
                        "op: this Keras has no _gone_in_a_release"]
