"""Normalization layers and the conv / fc / residual helpers the models are built from.

Group Normalization (Wu & He, ECCV 2018) splits the C channels of each example into G groups and
normalizes every group by its own mean and variance, so no statistic crosses the batch dimension:

    y = gamma * (x - mean_g) / sqrt(var_g + epsilon) + beta

Layer norm is the case G = 1 and instance norm the case G = C; both are `GroupNorm`. Batch norm is
Keras's `BatchNormalization` (`synchronized=True` for multi-device statistics).
Everything here is channels-last. No flags, no I/O.

Fast paths (GroupNorm's compiled kernels, Conv2D's patches product) give the same numbers as the
plain TensorFlow ops; set the environment variable GN_FAST_OPS=0 to use the plain ops instead.
"""
import functools
import os

import keras
import numpy as np
import tensorflow as tf

NORM_TYPES = ("batch", "sync_batch", "group", "layer", "instance", "none")


def fast_ops_enabled():
    """False when the environment sets GN_FAST_OPS to 0 / false / no / off."""
    return os.environ.get("GN_FAST_OPS", "1").strip().lower() not in ("0", "false", "no", "off")


@keras.saving.register_keras_serializable(package="gn")
class GroupNorm(keras.layers.Layer):
    """Group Normalization over the last (channel) axis of an input of any rank >= 2.

    Args:
        groups: number of channel groups G; the channel count C must be a multiple of G.
        epsilon: added to the group variance before the square root.
        center: learn a per-channel offset beta (initialized to 0).
        scale: learn a per-channel scale gamma (initialized to 1).

    Statistics and the normalization are computed in float32 whatever the input dtype, so
    float16 / bfloat16 activations of size ~1e3 do not overflow when squared; the output has the
    input's dtype. The mean and variance are folded with gamma and beta into one scale and one
    offset per (example, channel), so normalizing is a single multiply-add over the activations:
    `y = x * scale + offset`. The grouped view is a reshape of the channels-last tensor, never a
    transpose. The batch dimension may be None.

    Speed: the forward pass and a closed-form backward pass are each one XLA-compiled function
    (see `_group_norm_forward`; tiny tensors skip XLA), while the rest of the model keeps
    TensorFlow's own kernels. GN_FAST_OPS=0 selects the plain ops (`_group_norm_plain`) and
    TensorFlow's autodiff.
    """

    def __init__(self, groups=32, epsilon=1e-5, center=True, scale=True, **kwargs):
        super().__init__(**kwargs)
        if groups < 1:
            raise ValueError(f"GroupNorm: groups must be >= 1, got {groups}")
        self.groups = groups
        self.epsilon = epsilon
        self.center = center
        self.scale = scale

    def build(self, input_shape):
        if len(input_shape) < 2:
            raise ValueError(f"GroupNorm needs an input of rank >= 2, got shape {input_shape}")
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"GroupNorm needs a known channel count, got shape {input_shape}")
        if channels % self.groups:
            raise ValueError(
                f"GroupNorm: C={channels} channels are not divisible by G={self.groups} groups; "
                f"choose a number of groups that divides {channels}"
            )
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="ones",
                                     trainable=True) if self.scale else None
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros",
                                    trainable=True) if self.center else None
        self._compiled_kernels = tuple(_compiled(kernel) for kernel in _KERNELS)

    def call(self, inputs):
        channels = inputs.shape[-1]
        gamma = tf.ones([channels]) if self.gamma is None else tf.cast(self.gamma, tf.float32)
        beta = tf.zeros([channels]) if self.beta is None else tf.cast(self.beta, tf.float32)
        if not fast_ops_enabled():
            return _group_norm_plain(inputs, gamma, beta, self.groups, self.epsilon)
        size = inputs.shape.num_elements()
        compiled = size is None or size >= XLA_MIN_ELEMENTS
        kernels = self._compiled_kernels if compiled else _KERNELS
        return _group_norm_fast(inputs, gamma, beta, self.groups, self.epsilon, kernels)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "groups": self.groups, "epsilon": self.epsilon,
                "center": self.center, "scale": self.scale}


def _group_norm_plain(inputs, gamma, beta, groups, epsilon):
    """GN written directly in TensorFlow ops, differentiated by autodiff: the reference."""
    group_shape = [groups, inputs.shape[-1] // groups]
    # [N, everything between batch and channels, G, C/G]: a free reshape of channels-last data.
    grouped = tf.reshape(tf.cast(inputs, tf.float32), [tf.shape(inputs)[0], -1, *group_shape])
    mean, variance = tf.nn.moments(grouped, axes=[1, 3], keepdims=True)
    scale = tf.math.rsqrt(variance + epsilon) * tf.reshape(gamma, group_shape)
    offset = tf.reshape(beta, group_shape) - mean * scale
    outputs = grouped * scale + offset
    return tf.cast(tf.reshape(outputs, tf.shape(inputs)), inputs.dtype)


def _group_norm_fast(inputs, gamma, beta, groups, epsilon, kernels):
    """GN with a closed-form backward pass (float32 gamma and beta); `kernels` are the forward
    and backward functions, XLA-compiled or not."""
    forward, backward = kernels

    @tf.custom_gradient
    def group_norm(x, gamma, beta):
        outputs, mean, rstd = forward(x, gamma, beta, groups, epsilon)

        def gradient(d_outputs):
            return backward(d_outputs, x, gamma, mean, rstd, groups)
        return outputs, gradient
    return group_norm(inputs, gamma, beta)


# The kernels view the input as [N, S, C] (S = everything between batch and channels) and reduce
# over S per channel first: reductions along the contiguous channel axis, which run far faster
# than reducing [N, S, G, C/G] over S and C/G at once. Per-channel sums [N, 1, C] become group
# means [N, 1, G] and group values go back to every channel of the group by tiny matrix products,
# one op each, which keeps the op count (what small tensors pay for) low.

def _group_matrices(channels, groups):
    """([C, G] averaging each group's channels, [G, C] copying a group's value to its channels)."""
    to_channels = np.kron(np.eye(groups, dtype=np.float32), np.ones(channels // groups, np.float32))
    return tf.constant(to_channels.T / (channels // groups)), tf.constant(to_channels)


def _as_positions_by_channels(tensor):
    """[N, ..., C] -> float32 [N, S, C]."""
    positions = tensor.shape[1:-1].num_elements()
    shape = [-1, positions, tensor.shape[-1]] if positions is not None else \
        [tf.shape(tensor)[0], -1, tensor.shape[-1]]
    return tf.reshape(tf.cast(tensor, tf.float32), shape)


def _group_norm_forward(inputs, gamma, beta, groups, epsilon):
    """Returns (outputs in the input dtype, mean and 1 / std, each [N, 1, C]). Two passes over the
    input for the statistics (the mean, then the centered variance, which unlike E[x^2] - E[x]^2
    keeps its precision when the mean is large) and one multiply-add to normalize."""
    to_groups, to_channels = _group_matrices(inputs.shape[-1], groups)
    x = _as_positions_by_channels(inputs)
    mean = tf.reduce_mean(x, axis=1, keepdims=True) @ to_groups @ to_channels
    variance = tf.reduce_mean(tf.square(x - mean), axis=1, keepdims=True) @ to_groups @ to_channels
    rstd = tf.math.rsqrt(variance + epsilon)
    scale = rstd * gamma
    outputs = x * scale + (beta - mean * scale)
    return tf.cast(tf.reshape(outputs, tf.shape(inputs)), inputs.dtype), mean, rstd


def _group_norm_backward(d_outputs, inputs, gamma, mean, rstd, groups):
    """Gradients (inputs, gamma, beta) in closed form. With x_hat = (x - mean) * rstd, g = gamma,
    dy the output gradient and <.> the mean over a group's positions and channels:

        dx = rstd * (g * dy - <g * dy> - x_hat * <g * dy * x_hat>)

    which is dy * a + x * b + c with a, b, c per (example, channel). One pass reading dy and x
    gathers the per-channel sums of dy and dy * x that all of them need, one more writes dx."""
    to_groups, to_channels = _group_matrices(inputs.shape[-1], groups)
    x = _as_positions_by_channels(inputs)
    dy = _as_positions_by_channels(d_outputs)
    positions = x.shape[1] or tf.cast(tf.shape(x)[1], tf.float32)
    sum_dy = tf.reduce_sum(dy, axis=1, keepdims=True)
    sum_dy_x_hat = rstd * (tf.reduce_sum(dy * x, axis=1, keepdims=True) - mean * sum_dy)
    mean_g_dy = (gamma * sum_dy) @ to_groups @ to_channels / positions
    mean_g_dy_x_hat = (gamma * sum_dy_x_hat) @ to_groups @ to_channels / positions
    a = rstd * gamma
    b = -rstd * rstd * mean_g_dy_x_hat
    c = rstd * (mean * rstd * mean_g_dy_x_hat - mean_g_dy)
    d_inputs = dy * a + x * b + c
    return (tf.cast(tf.reshape(d_inputs, tf.shape(inputs)), inputs.dtype),
            tf.reduce_sum(sum_dy_x_hat, axis=[0, 1]), tf.reduce_sum(sum_dy, axis=[0, 1]))


# Launching an XLA computation costs about 0.1 ms on a CPU: it pays off from about 64K elements
# (a [2, 32, 32, 16] tensor runs faster as ordinary TensorFlow ops, a [32, 8, 8, 64] one compiled).
XLA_MIN_ELEMENTS = 1 << 16
_KERNELS = (_group_norm_forward, _group_norm_backward)


def _compiled(kernel):
    """`kernel` compiled by XLA, one per layer so that each traces only its own input shapes (one
    per batch size). TensorFlow counts traces per code object and warns after five, which a net
    with five GN layers of different shapes would reach sharing one function; a partial has no
    code object of its own, so each layer's traces are counted apart."""
    return tf.function(functools.partial(kernel), jit_compile=True, autograph=False)


@keras.saving.register_keras_serializable(package="gn")
class Conv2D(keras.layers.Conv2D):
    """Keras's Conv2D with 'same' padding, optional Weight Standardization, and a faster path for
    maps no larger than the kernel.

    Args:
        weight_std: standardize each output filter of the kernel to zero mean and unit variance
            before the convolution (Qiao et al. 2019). Paired with GroupNorm it matches BN at
            large batch while keeping GN's independence of the batch size.
        ws_epsilon: added to the filter variance before the square root.

    TensorFlow's CPU kernel for the input gradient of a convolution is very slow when the input
    map is not larger than the kernel (the 4x4 maps entering the 2018 net's last 4x4 conv: 0.4 s
    of a 0.55 s training step at batch 64). On such maps this layer gathers the kernel-sized
    patches with strided slices and multiplies them by the kernel instead: the same numbers, and
    gradients made of slices and one matrix product.
    """

    def __init__(self, filters, kernel_size, strides=1, weight_std=False, ws_epsilon=1e-5,
                 **kwargs):
        if kwargs.setdefault("padding", "same") != "same":
            raise ValueError(f"ops.Conv2D pads 'same' only, got padding={kwargs['padding']!r}")
        super().__init__(filters, kernel_size, strides=strides, **kwargs)
        self.weight_std = weight_std
        self.ws_epsilon = ws_epsilon

    def convolution_op(self, inputs, kernel):
        if self.weight_std:
            mean, variance = tf.nn.moments(kernel, axes=[0, 1, 2], keepdims=True)
            kernel = (kernel - mean) * tf.math.rsqrt(variance + self.ws_epsilon)
        if fast_ops_enabled() and self._map_within_kernel(inputs):
            return self._patches_times_kernel(inputs, kernel)
        return super().convolution_op(inputs, kernel)

    def _map_within_kernel(self, inputs):
        """Whether `inputs` is a known-size channels-last map no larger than the (plain,
        undilated, ungrouped) kernel."""
        if (self.data_format != "channels_last" or self.groups != 1
                or tuple(self.dilation_rate) != (1, 1)):
            return False
        height, width = inputs.shape[1:3]
        kernel_height, kernel_width = self.kernel_size
        return bool(height and width and height * width <= kernel_height * kernel_width)

    def _patches_times_kernel(self, inputs, kernel):
        """The 'same'-padded convolution as [N, H', W', kh*kw*C] patches @ [kh*kw*C, filters]."""
        pads, out_sizes = [[0, 0]], []
        for size, k, s in zip(inputs.shape[1:3], self.kernel_size, self.strides):
            out_size = -(-size // s)
            total = max((out_size - 1) * s + k - size, 0)
            pads.append([total // 2, total - total // 2])
            out_sizes.append(out_size)
        padded = tf.pad(inputs, pads + [[0, 0]])
        (out_h, out_w), (s_h, s_w) = out_sizes, self.strides
        patches = tf.concat([
            padded[:, i:i + s_h * (out_h - 1) + 1:s_h, j:j + s_w * (out_w - 1) + 1:s_w, :]
            for i in range(self.kernel_size[0]) for j in range(self.kernel_size[1])
        ], axis=-1)
        return tf.tensordot(patches, tf.reshape(kernel, [-1, self.filters]), axes=1)

    def get_config(self):
        return {**super().get_config(), "weight_std": self.weight_std,
                "ws_epsilon": self.ws_epsilon}


def norm_layer(norm_type, channels, groups=32, name=None):
    """The layer for a `--norm_type` value, for an input with `channels` channels."""
    if norm_type in ("batch", "sync_batch"):
        return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name,
                                               synchronized=norm_type == "sync_batch")
    if norm_type == "group":
        return GroupNorm(groups=groups, name=name)
    if norm_type == "layer":
        return GroupNorm(groups=1, name=name)
    if norm_type == "instance":
        return GroupNorm(groups=channels, name=name)
    if norm_type == "none":
        return keras.layers.Identity(name=name)
    raise ValueError(f"unknown norm_type {norm_type!r}; choose one of {', '.join(NORM_TYPES)}")


def norm(x, norm_type, groups=32, name=None):
    """Applies `norm_layer(norm_type, ...)` sized for `x`."""
    return norm_layer(norm_type, x.shape[-1], groups, name=name)(x)


def conv2d(x, filters, kernel_size=3, strides=1, weight_std=False, use_bias=False, name=None):
    """A 'same'-padded 2-D convolution, weight-standardized when `weight_std` is set."""
    return Conv2D(filters, kernel_size, strides=strides, weight_std=weight_std, use_bias=use_bias,
                  kernel_initializer="he_normal", name=name)(x)


def fc(x, units, activation=None, name=None):
    """A fully connected layer."""
    return keras.layers.Dense(units, activation=activation, name=name)(x)


def conv_norm_act(x, filters, norm_type, groups, weight_std, kernel_size=3, strides=1,
                  activation="relu", name=None):
    """conv -> norm -> activation, the unit of the residual nets."""
    x = conv2d(x, filters, kernel_size, strides, weight_std, use_bias=norm_type == "none",
               name=f"{name}_conv")
    x = norm(x, norm_type, groups, name=f"{name}_norm")
    return keras.layers.Activation(activation, name=f"{name}_act")(x) if activation else x


def residual_block(x, filters, norm_type, groups=32, weight_std=False, strides=1, name=None):
    """The basic residual block of He et al. 2016: two 3x3 conv-norm units and a shortcut that is
    the identity, or a 1x1 conv + norm where the shape changes."""
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = conv_norm_act(x, filters, norm_type, groups, weight_std, kernel_size=1,
                                 strides=strides, activation=None, name=f"{name}_shortcut")
    y = conv_norm_act(x, filters, norm_type, groups, weight_std, strides=strides,
                      name=f"{name}_a")
    y = conv_norm_act(y, filters, norm_type, groups, weight_std, activation=None,
                      name=f"{name}_b")
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.Activation("relu", name=f"{name}_out")(y)
