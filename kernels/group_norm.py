"""GroupNorm's compute: the plain TensorFlow-op reference (channels on any axis) and, for
channels last, the fast path, a closed-form backward pass over kernels that are the C++ ops of
group_norm.cc or TensorFlow ops (XLA-compiled for large sizes). ops.GroupNorm is the layer and
picks the kernels; gamma and beta arrive here as float32 and outputs leave in the input's dtype.
"""
import functools

import tensorflow as tf

import kernels


def plain(inputs, gamma, beta, groups, epsilon, axis=-1):
    """GN written directly in TensorFlow ops, differentiated by autodiff: the reference, and the
    path for channels on an axis other than the last. The input is viewed as [N, A, G, C/G], A
    being the positions between batch and channels, and where channels are not last as
    [N, A, G, C/G, B], B the positions after them: a free reshape either way."""
    axis %= inputs.shape.rank
    channels = inputs.shape[axis]
    affine_shape = group_shape = [groups, channels // groups]
    if axis < inputs.shape.rank - 1:
        affine_shape = [*affine_shape, 1]
        group_shape = [*group_shape, _positions_after(inputs, axis)]
    grouped = tf.reshape(tf.cast(inputs, tf.float32), [tf.shape(inputs)[0], -1, *group_shape])
    reduced = [1, *range(3, grouped.shape.rank)]
    mean, variance = tf.nn.moments(grouped, axes=reduced, keepdims=True)
    scale = tf.math.rsqrt(variance + epsilon) * tf.reshape(gamma, affine_shape)
    offset = tf.reshape(beta, affine_shape) - mean * scale
    outputs = grouped * scale + offset
    return tf.cast(tf.reshape(outputs, tf.shape(inputs)), inputs.dtype)


def _positions_after(inputs, axis):
    """The number of positions after `axis`: a Python int where the shape is known."""
    positions = inputs.shape[axis + 1:].num_elements()
    return positions if positions is not None else tf.reduce_prod(tf.shape(inputs)[axis + 1:])


def fast(inputs, gamma, beta, groups, epsilon, kernel_pair):
    """GN with a closed-form backward pass; `kernel_pair` is (forward, backward): `TF_KERNELS`,
    their XLA-compiled `compiled_kernels()` or `CPP_KERNELS`."""
    return fast_with_statistics(inputs, gamma, beta, groups, epsilon, kernel_pair)[0]


def fast_with_statistics(inputs, gamma, beta, groups, epsilon, kernel_pair):
    """(outputs, mean, 1 / sqrt(variance + epsilon)) of `fast`: the statistics of each group
    (`CPP_KERNELS`: [N, G]; the others: [N, 1, C]), for moving averages; no gradient flows
    through them."""
    forward_kernel, backward_kernel = kernel_pair

    @tf.custom_gradient
    def group_norm(x, gamma, beta):
        outputs, mean, rstd = forward_kernel(x, gamma, beta, groups, epsilon)

        def gradient(d_outputs, *unused_statistics_gradients):
            return backward_kernel(d_outputs, x, gamma, mean, rstd, groups)
        return (outputs, tf.stop_gradient(mean), tf.stop_gradient(rstd)), gradient
    return group_norm(inputs, gamma, beta)


# The kernels view the input as [N, S, C] (S = everything between batch and channels) and reduce
# over S per channel first: reductions along the contiguous channel axis, which run far faster
# than reducing [N, S, G, C/G] over S and C/G at once. Per-channel values [N, 1, C] then become
# group means by a reshape to [N, G, C/G], a small reduction and a broadcast back to the channels,
# which costs less than a matrix product with a group matrix, both as TensorFlow ops and in XLA.

def _group_mean(per_channel, groups):
    """[N, 1, C] -> [N, 1, C]: every channel gets the mean of its group's values."""
    channels = per_channel.shape[-1]
    grouped = tf.reshape(per_channel, [-1, groups, channels // groups])
    means = tf.reduce_mean(grouped, axis=2, keepdims=True)
    return tf.reshape(tf.broadcast_to(means, tf.shape(grouped)), [-1, 1, channels])


def _positions_by_channels(tensor):
    """[N, ..., C] -> [N, S, C]."""
    positions = tensor.shape[1:-1].num_elements()
    shape = [-1, positions, tensor.shape[-1]] if positions is not None else \
        [tf.shape(tensor)[0], -1, tensor.shape[-1]]
    return tf.reshape(tensor, shape)


def _as_positions_by_channels(tensor):
    """[N, ..., C] -> float32 [N, S, C]."""
    return tf.cast(_positions_by_channels(tensor), tf.float32)


def forward(inputs, gamma, beta, groups, epsilon):
    """Returns (outputs in the input dtype, mean and 1 / std, each [N, 1, C]). Two passes over the
    input for the statistics (the mean, then the centered variance, which unlike E[x^2] - E[x]^2
    keeps its precision when the mean is large) and one multiply-add to normalize."""
    x = _as_positions_by_channels(inputs)
    mean = _group_mean(tf.reduce_mean(x, axis=1, keepdims=True), groups)
    variance = _group_mean(tf.reduce_mean(tf.square(x - mean), axis=1, keepdims=True), groups)
    rstd = tf.math.rsqrt(variance + epsilon)
    scale = rstd * gamma
    outputs = x * scale + (beta - mean * scale)
    return tf.cast(tf.reshape(outputs, tf.shape(inputs)), inputs.dtype), mean, rstd


def backward(d_outputs, inputs, gamma, mean, rstd, groups):
    """Gradients (inputs, gamma, beta) in closed form. With x_hat = (x - mean) * rstd, g = gamma,
    dy the output gradient and <.> the mean over a group's positions and channels:

        dx = rstd * (g * dy - <g * dy> - x_hat * <g * dy * x_hat>)

    which is dy * a + x * b + c with a, b, c per (example, channel). One pass reading dy and x
    gathers the per-channel sums of dy and dy * x that all of them need, one more writes dx."""
    x = _as_positions_by_channels(inputs)
    dy = _as_positions_by_channels(d_outputs)
    positions = x.shape[1] or tf.cast(tf.shape(x)[1], tf.float32)
    sum_dy = tf.reduce_sum(dy, axis=1, keepdims=True)
    sum_dy_x_hat = rstd * (tf.reduce_sum(dy * x, axis=1, keepdims=True) - mean * sum_dy)
    mean_g_dy = _group_mean(gamma * sum_dy, groups) / positions
    mean_g_dy_x_hat = _group_mean(gamma * sum_dy_x_hat, groups) / positions
    a = rstd * gamma
    b = -rstd * rstd * mean_g_dy_x_hat
    c = rstd * (mean * rstd * mean_g_dy_x_hat - mean_g_dy)
    d_inputs = dy * a + x * b + c
    return (tf.cast(tf.reshape(d_inputs, tf.shape(inputs)), inputs.dtype),
            tf.reduce_sum(sum_dy_x_hat, axis=[0, 1]), tf.reduce_sum(sum_dy, axis=[0, 1]))


TF_KERNELS = (forward, backward)


def compiled_kernels():
    """`TF_KERNELS` compiled by XLA, a pair per layer so that each traces only its own input
    shapes (one per batch size). TensorFlow counts traces per code object and warns after five,
    which a net with five GN layers of different shapes would reach sharing one function; a
    partial has no code object of its own, so each layer's traces are counted apart."""
    return tuple(tf.function(functools.partial(kernel), jit_compile=True, autograph=False)
                 for kernel in TF_KERNELS)


# The same two kernels as C++ ops (kernels/group_norm.cc): one op per direction instead of about
# twenty, which matters most at small sizes (a batch-2 step), where launching an op costs more
# than its arithmetic. Their statistics are [N, G] rather than [N, 1, C].
CPP_KERNEL_DTYPES = (tf.float32, tf.bfloat16, tf.float16)


def _cpp_forward(inputs, gamma, beta, groups, epsilon):
    outputs, mean, rstd = kernels.group_norm_library().gn_group_norm(
        _positions_by_channels(inputs), gamma, beta, groups=groups, epsilon=epsilon)
    return tf.reshape(outputs, tf.shape(inputs)), mean, rstd


def _cpp_backward(d_outputs, inputs, gamma, mean, rstd, groups):
    d_inputs, d_gamma, d_beta = kernels.group_norm_library().gn_group_norm_grad(
        _positions_by_channels(d_outputs), _positions_by_channels(inputs), gamma, mean, rstd,
        groups=groups)
    return tf.reshape(d_inputs, tf.shape(inputs)), d_gamma, d_beta


CPP_KERNELS = (_cpp_forward, _cpp_backward)


@tf.RegisterGradient("GnGroupNormGrad")
def _cpp_backward_gradient(op, *output_gradients):
    """Second-order gradients (a gradient penalty, Hessian-vector products) are not written for
    the C++ kernels; the TensorFlow-op kernels differentiate their backward pass by autodiff."""
    raise NotImplementedError(
        "second-order gradients through GroupNorm's C++ kernels (GroupNorm, and BatchNorm in "
        "training) are not implemented; set GN_CPP_KERNELS=0 to use the TensorFlow-op kernels "
        "and the fused BN kernel, which support them")
