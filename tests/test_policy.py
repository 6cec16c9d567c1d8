"""kernels/policy.py: the switches read once per process, the choice each layer makes from them
and from the thresholds table, and that the kernel chosen is the kernel that runs."""
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import ops
from kernels import conv as conv_kernels
from kernels import policy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _describe_in_a_process(**environment):
    """policy.describe() in a new process started with `environment`."""
    result = subprocess.run(
        [sys.executable, "-c", "from kernels import policy; print(policy.describe())"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **environment})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_environment_sets_the_process_switches():
    assert _describe_in_a_process(GN_FAST_OPS="0") == \
        "kernels: plain TensorFlow ops everywhere (GN_FAST_OPS=0)"
    without_cpp = _describe_in_a_process(GN_CPP_KERNELS="off", GN_ONEDNN_CONV="0")
    assert "GroupNorm TensorFlow-op kernels" in without_cpp and "BatchNorm fused" in without_cpp
    assert "TensorFlow's gradients" in without_cpp
    if policy.cpp_kernels_available():
        assert "GroupNorm C++" in _describe_in_a_process()


def test_the_environment_is_read_once(monkeypatch):
    """A variable set after the first question changes nothing: traced functions cannot depend
    on when they were traced."""
    before = policy.from_environment()
    monkeypatch.setenv("GN_FAST_OPS", "0" if before.fast_ops else "1")
    assert policy.from_environment() is before and policy.current() == before


def test_using_nests_and_restores():
    outer = policy.current()
    with policy.using(cpp_kernels=False):
        assert not policy.current().cpp_kernels and policy.current().fast_ops
        with policy.using(fast_ops=False):
            assert policy.current() == policy.Switches(False, False, outer.onednn_conv)
        assert policy.current().fast_ops
    assert policy.current() == outer


def _op_types(layer, x):
    """The op types of a traced forward and backward pass of `layer` in training."""
    @tf.function
    def forward_backward(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, x)
    types = set()
    for op in forward_backward.get_concrete_function(x).graph.get_operations():
        types.add(op.type)
        if "PartitionedCall" in op.type and op.node_def.attr["_XlaMustCompile"].b:
            types.add("XLA function")
    return types


# What each choice puts in the graph: ops that must be there, ops that must not.
SIGNATURES = {
    "cpp": ({"GnGroupNormGrad"}, {"FusedBatchNormV3", "XLA function"}),
    "tf_ops_xla": ({"XLA function"}, {"GnGroupNorm", "Mean"}),  # the reductions compiled
    "tf_ops": ({"Mean", "Rsqrt"}, {"GnGroupNorm"}),
    "plain": ({"Mean", "SquaredDifference"}, {"GnGroupNorm"}),
    "fused": ({"FusedBatchNormGradV3"}, {"GnGroupNorm"}),
    "keras": ({"Rsqrt"}, {"FusedBatchNormV3", "GnGroupNorm"}),
}


@pytest.mark.parametrize("changes", [{}, {"cpp_kernels": False}, {"fast_ops": False}],
                         ids=["default", "no_cpp", "plain"])
@pytest.mark.parametrize("shape", [(2, 4, 4, 16), (4, 32, 32, 32)], ids=["small", "large"])
@pytest.mark.parametrize("norm_type", ["group", "batch"])
def test_the_kernel_chosen_is_the_kernel_that_runs(norm_type, shape, changes):
    with policy.using(**changes):
        layer = ops.norm_layer(norm_type, shape[-1], groups=4)
        switches = policy.current()
    x = tf.random.normal(shape)
    choose = policy.group_norm_kernel if norm_type == "group" else (
        lambda switches, x: policy.batch_norm_kernel(switches, x, training=True))
    chosen = choose(switches, x)
    if changes == {} and policy.cpp_kernels_available():
        assert chosen == "cpp"
    must, must_not = SIGNATURES[chosen]
    types = _op_types(layer, x)
    assert must <= types and not must_not & types, (chosen, sorted(types))


def test_the_thresholds_table_moves_the_choices(monkeypatch):
    """GroupNorm's TensorFlow-op kernels compile from group_norm_xla_min_values values;
    Conv2D's oneDNN gradients start at onednn_conv_min_multiply_adds."""
    no_cpp = policy.Switches(cpp_kernels=False)
    x = tf.zeros([2, 4, 4, 16])  # 512 values
    assert policy.group_norm_kernel(no_cpp, x) == "tf_ops"
    monkeypatch.setitem(policy.THRESHOLDS, "group_norm_xla_min_values", 512)
    assert policy.group_norm_kernel(no_cpp, x) == "tf_ops_xla"
    if not conv_kernels.onednn_gradients_work():
        return
    shape, kernel = tf.TensorShape([2, 16, 16, 16]), (3, 3, 16, 16)  # 1.2M multiply-adds
    float32 = (tf.float32, tf.float32)
    assert policy.conv_kernel(policy.Switches(), shape, kernel, (1, 1), float32) == "tensorflow"
    monkeypatch.setitem(policy.THRESHOLDS, "onednn_conv_min_multiply_adds", 2**20)
    assert policy.conv_kernel(policy.Switches(), shape, kernel, (1, 1), float32) == "onednn"
    assert policy.conv_kernel(policy.Switches(onednn_conv=False), shape, kernel, (1, 1),
                              float32) == "tensorflow"


def test_leaky_relu_follows_the_switches():
    x = tf.constant(np.linspace(-2, 2, 16, dtype=np.float32))
    with policy.using(fast_ops=False):
        plain = ops.LeakyReLU(0.2)
    fast = ops.LeakyReLU(0.2)
    for layer, reads_input in ((plain, True), (fast, False)):
        @tf.function
        def gradient(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x)
            return tape.gradient(y, x)
        graph = gradient.get_concrete_function(x).graph
        (grad_op,) = [op for op in graph.get_operations() if op.type == "LeakyReluGrad"]
        assert (grad_op.inputs[1].op.type != "LeakyRelu") == reads_input
        np.testing.assert_allclose(gradient(x), np.where(x.numpy() > 0, 1.0, 0.2))
