"""A 2-D convolution whose gradients run on TensorFlow's oneDNN backward kernels.

TensorFlow's x86 builds carry oneDNN kernels for both gradients of Conv2D, registered as
_MklNativeConv2DBackpropInput and _MklNativeConv2DBackpropFilter, but its oneDNN graph rewrite is
on by default only on CPUs with AVX-512 and newer. Elsewhere (an AVX2 CPU) the gradients run on
TensorFlow's own kernels, which cut the work into many small matrix products: on the large
convolutions of a batch-32 step they take longer than the oneDNN kernels (docs/performance.md has
the table), while on small ones (batch 2) the oneDNN kernels' fixed cost per call makes them the
slower. TF_ENABLE_ONEDNN_OPTS=1 would move every op of the graph, whatever its size; `conv2d`
is tf.nn.conv2d with the oneDNN gradients, and kernels/policy.py picks it for the convolutions
where it pays.

The two ops are TensorFlow internals, so `onednn_gradients_work()` checks once per process that
they exist and give TensorFlow's numbers (one warning line when a TensorFlow that has them gives
other numbers, or lacks the private registry they are looked up in); where they do not, the
policy keeps TensorFlow's gradients.
"""
import functools

import numpy as np
import tensorflow as tf

import kernels

AttrValue = tf.compat.v1.AttrValue  # the protocol buffer of an op's attribute

BACKPROP_OPS = ("_MklNativeConv2DBackpropInput", "_MklNativeConv2DBackpropFilter")


def conv2d(inputs, kernel, strides):
    """tf.nn.conv2d(inputs, kernel, strides, 'SAME') for float32 NHWC tensors, differentiated by
    the oneDNN kernels (TensorFlow's own where the gradient runs eagerly)."""
    stride_attr = [1, *strides, 1]

    @tf.custom_gradient
    def convolution(x, w):
        def gradient(d_outputs):
            gradients = _tensorflow_gradients if tf.executing_eagerly() else _onednn_gradients
            return gradients(x, w, d_outputs, stride_attr)
        return tf.nn.conv2d(x, w, strides, "SAME"), gradient
    # A variable read here, not inside, keeps the kernel an input of the custom gradient.
    return convolution(inputs, tf.convert_to_tensor(kernel))


def _tensorflow_gradients(x, w, d_outputs, stride_attr):
    return (tf.raw_ops.Conv2DBackpropInput(input_sizes=tf.shape(x), filter=w,
                                           out_backprop=d_outputs, strides=stride_attr,
                                           padding="SAME"),
            tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=tf.shape(w),
                                            out_backprop=d_outputs, strides=stride_attr,
                                            padding="SAME"))


def _onednn_gradients(x, w, d_outputs, stride_attr):
    return (_backprop_op(BACKPROP_OPS[0], [tf.shape(x), w, d_outputs], stride_attr),
            _backprop_op(BACKPROP_OPS[1], [x, tf.shape(w), d_outputs], stride_attr))


def _backprop_op(op_type, inputs, stride_attr):
    """One of BACKPROP_OPS in the graph being built. They are picked by the kernel label their
    registration carries, as TensorFlow's own rewrite picks them."""
    attrs = {"T": AttrValue(type=inputs[-1].dtype.as_datatype_enum),
             "strides": _ints(stride_attr), "dilations": _ints([1, 1, 1, 1]),
             "explicit_paddings": _ints([]), "padding": AttrValue(s=b"SAME"),
             "data_format": AttrValue(s=b"NHWC"), "use_cudnn_on_gpu": AttrValue(b=False),
             "_kernel": AttrValue(s=b"MklNameChangeOp")}
    graph = tf.compat.v1.get_default_graph()
    name = op_type.lstrip("_")  # node names may not start with an underscore
    return graph.create_op(op_type, inputs, [inputs[-1].dtype], name=name, attrs=attrs).outputs[0]


def _ints(values):
    return AttrValue(list=AttrValue.ListValue(i=values))


@functools.cache
def onednn_gradients_work():
    """Whether this TensorFlow has the oneDNN gradient ops and they give its own gradients'
    numbers; checked once per process."""
    registered = _registered_ops()
    if registered is None:
        return _fall_back("this TensorFlow has no op registry to look them up in")
    if not all(op_type in registered for op_type in BACKPROP_OPS):
        return False  # a build without oneDNN (not x86): nothing to warn about
    with tf.init_scope():  # eagerly, also when first asked while a model is being traced
        return _same_gradients_as_tensorflow() or _fall_back(
            "they did not give TensorFlow's gradients on a test convolution")


def _registered_ops():
    """The names of the ops this TensorFlow registers, from its private registry; None where a
    release has moved it."""
    try:
        from tensorflow.python.framework import op_def_registry
        return {op_type for op_type in BACKPROP_OPS if op_def_registry.get(op_type) is not None}
    except (ImportError, AttributeError):
        return None


def _fall_back(reason):
    kernels.log.warning("Conv2D takes TensorFlow's own gradients, not the oneDNN kernels: %s",
                        reason)
    return False


def _same_gradients_as_tensorflow():
    """Both gradients of a small strided convolution from the oneDNN ops and from TensorFlow's."""
    rng = np.random.default_rng(0)
    x, w, d_outputs = (tf.constant(rng.normal(size=shape), tf.float32)
                       for shape in ((2, 5, 5, 3), (3, 3, 3, 4), (2, 3, 3, 4)))
    stride_attr = [1, 2, 2, 1]
    try:
        ours = tf.function(lambda: _onednn_gradients(x, w, d_outputs, stride_attr),
                           autograph=False)()
    except (tf.errors.OpError, ValueError, TypeError):
        return False
    theirs = _tensorflow_gradients(x, w, d_outputs, stride_attr)
    return all(np.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(ours, theirs))
