"""Tests for kernels/: building GroupNorm's C++ kernels, the fallback when they cannot be built, and
the ops' checks of their inputs. Their numbers are checked against the plain ops and NumPy in
test_ops.py."""
import logging
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

import kernels
import ops
from kernels import policy as kernel_policy

needs_compiler = pytest.mark.skipif(shutil.which(kernels.compiler()) is None,
                                    reason="no C++ compiler here")


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """An empty build folder and no library loaded yet in this process's cache."""
    monkeypatch.setattr(kernels, "BUILD_DIR", str(tmp_path / "build"))
    kernels.group_norm_library.cache_clear()
    yield tmp_path / "build"
    kernels.group_norm_library.cache_clear()


@needs_compiler
def test_kernels_build_into_the_named_library(tmp_path):
    """(Loading is checked by every test that runs the kernels: a process can register the ops
    from one library file only.)"""
    (tmp_path / "group_norm-earlier.so").write_bytes(b"a library of an earlier source")
    path = tmp_path / "group_norm-test.so"
    kernels.build(str(path))
    assert os.listdir(tmp_path) == [path.name]  # no temporary or earlier library left beside it
    assert path.read_bytes()[:4] == b"\x7fELF"


def test_the_library_name_follows_source_and_tensorflow_version(tmp_path, monkeypatch):
    name = kernels.library_path()
    assert os.path.dirname(name) == kernels.BUILD_DIR
    edited = tmp_path / "group_norm.cc"
    edited.write_text(open(kernels.SOURCE).read() + "// edited\n")
    monkeypatch.setattr(kernels, "SOURCE", str(edited))
    assert kernels.library_path() != name
    monkeypatch.undo()
    monkeypatch.setattr(tf, "__version__", tf.__version__ + ".other")
    assert kernels.library_path() != name


@pytest.mark.parametrize("compiler,reason", [
    ("no-such-compiler-gn", "no C++ compiler 'no-such-compiler-gn' found"),
    ("false", "no output"),  # a compiler that fails without a message
])
def test_without_a_working_compiler_group_norm_falls_back(compiler, reason, fresh_build,
                                                          monkeypatch):
    monkeypatch.setenv("CXX", compiler)
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    monkeypatch.setattr(kernels.log, "handlers", [handler])
    assert kernels.group_norm_library() is None
    assert len(warnings) == 1 and reason in warnings[0]
    assert not fresh_build.exists() or os.listdir(fresh_build) == []
    assert not kernel_policy.cpp_kernels_available()
    x = tf.random.normal([2, 4, 4, 8]) * 3 + 1
    y = ops.GroupNorm(4)(x).numpy().reshape(2, 16, 4, 2)
    np.testing.assert_allclose(y.mean(axis=(1, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(axis=(1, 3)), 1, atol=1e-3)


@needs_compiler
def test_kernels_refuse_mismatched_shapes():
    library = kernels.group_norm_library()
    assert library is not None
    with pytest.raises(tf.errors.InvalidArgumentError, match="x has no channels"):
        library.gn_group_norm(tf.zeros([2, 5, 0]), tf.ones([0]), tf.ones([0]), groups=1,
                              epsilon=1e-5)
    x, gamma = tf.zeros([2, 5, 12]), tf.ones([12])
    with pytest.raises(tf.errors.InvalidArgumentError, match="channels not divisible by groups"):
        library.gn_group_norm(x, gamma, gamma, groups=5, epsilon=1e-5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="gamma and beta must be"):
        library.gn_group_norm(x, tf.ones([6]), gamma, groups=4, epsilon=1e-5)
    _, mean, rstd = library.gn_group_norm(x, gamma, gamma, groups=4, epsilon=1e-5)
    assert mean.shape == rstd.shape == (2, 4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="dy and x shapes differ"):
        library.gn_group_norm_grad(tf.zeros([2, 4, 12]), x, gamma, mean, rstd, groups=4)


@needs_compiler
@pytest.mark.parametrize("mean", [50.0, 1e3, 1e4])
def test_one_pass_statistics_keep_the_precision_of_a_centred_variance(mean):
    """The C++ forward gathers both statistics in one pass over d = x - (the channel's first
    value). With a large mean, channels of different means and first values far from their
    channel's mean, its outputs are as close to a float64 reference as those of the TensorFlow-op
    kernels, which centre the data on the mean first (E[x^2] - E[x]^2 in float32 would lose every
    digit of the variance at a mean of 1e4)."""
    from kernels import group_norm as gn_compute

    rng = np.random.default_rng(0)
    x = mean + rng.uniform(-5, 5, (1, 1, 1, 32)) + rng.standard_normal((4, 9, 9, 32))
    x[:, 0, 0, :] += 8.0
    x = x.astype(np.float32)
    grouped = x.astype(np.float64).reshape(4, -1, 4, 8)
    expected = ((grouped - grouped.mean(axis=(1, 3), keepdims=True))
                / np.sqrt(grouped.var(axis=(1, 3), keepdims=True) + 1e-5)).reshape(x.shape)
    gamma, beta = np.ones(32, np.float32), np.zeros(32, np.float32)
    errors = {}
    for name, kernel_pair in (("cpp", gn_compute.CPP_KERNELS), ("tf", gn_compute.TF_KERNELS)):
        outputs = gn_compute.fast(tf.constant(x), gamma, beta, 4, 1e-5, kernel_pair)
        errors[name] = np.abs(outputs.numpy() - expected).max()
    assert errors["cpp"] <= 1.5 * errors["tf"], errors
