"""Tests for kernels/: building GroupNorm's C++ kernels, the fallback when they cannot be built, and
the ops' checks of their inputs. Their numbers are checked against the plain ops and NumPy in
test_ops.py."""
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import kernels
import ops
from kernels import cpu
from kernels import policy as kernel_policy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def test_the_library_name_follows_the_cpus_instruction_sets(monkeypatch):
    """A build folder shared by machines of two CPU kinds never hands one the other's build."""
    name = kernels.library_path()
    this = cpu.this_cpu()
    monkeypatch.setattr(cpu, "this_cpu", lambda: cpu.Cpu(this.model, this.flags ^ {"avx512f"}))
    assert kernels.library_path() != name


@needs_compiler
def test_a_compiler_that_refuses_the_native_flags_builds_the_portable_library(tmp_path,
                                                                             monkeypatch):
    """A compiler without some of NATIVE_FLAGS (GCC before 12 lacks -mno-avx512fp16) still builds
    the kernels, for any x86-64."""
    calls = tmp_path / "calls"
    wrapper = tmp_path / "cxx"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {calls}\ncase "$*" in *-march=native*) '
                       f'echo "error: unrecognized option" >&2; exit 1;; esac\n'
                       f'exec {shutil.which(kernels.compiler())} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CXX", str(wrapper))
    path = tmp_path / "build" / "group_norm-test.so"
    kernels.build(str(path))
    assert path.read_bytes()[:4] == b"\x7fELF"
    native, portable = calls.read_text().splitlines()
    assert all(flag in native.split() for flag in kernels.NATIVE_FLAGS)
    assert not any(flag in portable.split() for flag in kernels.NATIVE_FLAGS)


PORTABLE_OUTPUTS = """
import sys
import numpy as np
import tensorflow as tf
import kernels
from kernels import group_norm as gn_compute
kernels.library_path = lambda *source_and_stem: sys.argv[1]
x, dy = (tf.constant(a) for a in np.load(sys.argv[2]).values())
with tf.GradientTape() as tape:
    tape.watch(x)
    y = gn_compute.fast(x, tf.ones([64]), tf.zeros([64]), 8, 1e-5, gn_compute.CPP_KERNELS)
np.savez(sys.argv[3], y=y.numpy(), dx=tape.gradient(y, x, output_gradients=dy).numpy())
"""


@needs_compiler
def test_the_native_build_computes_the_portable_builds_numbers_bit_for_bit(tmp_path):
    """The library this process runs (built for its CPU) and one built for any x86-64 give the
    same outputs and gradients to the last bit, so the vector width never moves a result. The
    portable one runs in a process of its own: a process registers the ops from one library."""
    from kernels import group_norm as gn_compute

    portable = tmp_path / "portable.so"
    result = subprocess.run(kernels._compile_command(str(portable), native=False),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    rng = np.random.default_rng(0)
    x, dy = (rng.standard_normal((3, 13, 11, 64)).astype(np.float32) * 2 + 1 for _ in range(2))
    np.savez(tmp_path / "inputs.npz", x=x, dy=dy)
    result = subprocess.run([sys.executable, "-c", PORTABLE_OUTPUTS, str(portable),
                             str(tmp_path / "inputs.npz"), str(tmp_path / "outputs.npz")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    theirs = np.load(tmp_path / "outputs.npz")
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = gn_compute.fast(x, tf.ones([64]), tf.zeros([64]), 8, 1e-5, gn_compute.CPP_KERNELS)
    np.testing.assert_array_equal(y.numpy(), theirs["y"])
    np.testing.assert_array_equal(tape.gradient(y, x, output_gradients=tf.constant(dy)).numpy(),
                                  theirs["dx"])


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
