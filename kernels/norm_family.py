"""The small-batch normalizers' fast path: FilterResponseNorm, EvoNormS0 and EvoNormB0 as one C++
op per direction (kernels/norm_family.cc: the forward pass and a closed-form backward pass), and
BatchRenorm's corrections r and d as one op reading the batch once. ops.py's layers hold the
reference each computes (TensorFlow ops, differentiated by autodiff) and take these where
kernels/policy.py says; gamma, beta and the other weights arrive here as float32, the input in
one of `DTYPES`, and outputs leave in the input's dtype.

The library is built on first use like GroupNorm's (kernels/__init__.py: the same compiler, flags
and build folder), as build/norm_family-<hash>.so; where it cannot be built or loaded, `library()`
logs one warning and returns None, and the layers run their references.
"""
import functools
import os

import tensorflow as tf

import kernels
from kernels import group_norm

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "norm_family.cc")
DTYPES = (tf.float32, tf.bfloat16, tf.float16)


@functools.cache
def library():
    """The loaded op library, built if needed (kernels.load_library); None, after one warning,
    when it cannot be built or loaded."""
    return kernels.load_library(SOURCE, "norm_family", "FilterResponseNorm, EvoNorm and "
                                "BatchRenorm's corrections run their TensorFlow ops")


def as_kernel_input(inputs):
    """The input a kernel takes: as it arrives in one of DTYPES, else cast to float32 (as the
    references cast every input)."""
    return inputs if inputs.dtype in DTYPES else tf.cast(inputs, tf.float32)


def _to_input_shape(values, inputs):
    return tf.reshape(values, tf.shape(inputs))


def filter_response_norm(inputs, gamma, beta, tau, epsilon, tlu):
    """FRN (+ TLU where `tlu`) of channels-last `inputs`; `epsilon` a float32 scalar tensor (it
    may carry a learned part's gradient), `tau` ignored without the TLU."""
    ops = library()

    @tf.custom_gradient
    def frn(x, gamma, beta, tau, epsilon):
        y, rstd = ops.gn_filter_response_norm(x, gamma, beta, tau, epsilon, tlu=tlu)

        def gradient(d_outputs):
            return ops.gn_filter_response_norm_grad(d_outputs, x, gamma, beta, tau, rstd, tlu=tlu)
        return y, gradient
    outputs = frn(group_norm._positions_by_channels(inputs), gamma, beta, tau, epsilon)
    return _to_input_shape(outputs, inputs)


def evonorm_s0(inputs, gamma, beta, v, groups, epsilon):
    """EvoNorm-S0 of channels-last `inputs` in `groups` groups."""
    ops = library()

    @tf.custom_gradient
    def s0(x, gamma, beta, v):
        y, mean, rstd = ops.gn_evo_norm_s0(x, gamma, beta, v, groups=groups, epsilon=epsilon)

        def gradient(d_outputs):
            return ops.gn_evo_norm_s0_grad(d_outputs, x, gamma, v, mean, rstd, groups=groups)
        return y, gradient
    return _to_input_shape(s0(group_norm._positions_by_channels(inputs), gamma, beta, v), inputs)


def evonorm_b0(inputs, gamma, beta, v, moving_variance, epsilon, ghosts):
    """(outputs, batch variances [ghosts, C]) of EvoNorm-B0 on channels-last `inputs`: in
    training (`ghosts` >= 1) var_B of each ghost batch, with its gradient; in inference
    (`ghosts` 0) the moving variance, and the variances returned are it. No gradient flows
    through the returned variances (they move the moving variance)."""
    ops = library()

    @tf.custom_gradient
    def b0(x, gamma, beta, v):
        y, mean, instance_std, batch_mean, batch_std, batch_variance = ops.gn_evo_norm_b0(
            x, gamma, beta, v, moving_variance, ghosts=ghosts, epsilon=epsilon)

        def gradient(d_outputs, unused_variance_gradient):
            return ops.gn_evo_norm_b0_grad(d_outputs, x, gamma, v, mean, instance_std,
                                           batch_mean, batch_std, ghosts=ghosts)
        return (y, tf.stop_gradient(batch_variance)), gradient
    outputs, variances = b0(group_norm._positions_by_channels(inputs), gamma, beta, v)
    return _to_input_shape(outputs, inputs), variances


def renorm_corrections(inputs, moving_mean, moving_variance, r_max, d_max, epsilon):
    """(r, d), [C] each, of BatchRenorm on one batch of channels-last `inputs`, without gradient."""
    r, d = library().gn_renorm_corrections(group_norm._positions_by_channels(inputs), moving_mean,
                                           moving_variance, r_max, d_max, epsilon=epsilon)
    return tf.stop_gradient(r), tf.stop_gradient(d)


tf.no_gradient("GnRenormCorrections")


def _no_second_order(op, *output_gradients):
    """Second-order gradients are not written for these kernels; GN_CPP_KERNELS=0 gives the
    references, which TensorFlow differentiates twice."""
    raise NotImplementedError(
        f"second-order gradients through {op.type} (FilterResponseNorm, EvoNorm's C++ kernels) "
        "are not implemented; set GN_CPP_KERNELS=0 to run the TensorFlow ops, which support them")


for _op_type in ("GnFilterResponseNormGrad", "GnEvoNormS0Grad", "GnEvoNormB0Grad"):
    tf.RegisterGradient(_op_type)(_no_second_order)
