"""Normalization layers and the conv / fc / residual helpers the models are built from.

Group Normalization (Wu & He, ECCV 2018) splits the C channels of each example into G groups and
normalizes every group by its own mean and variance, so no statistic crosses the batch dimension:

    y = gamma * (x - mean_g) / sqrt(var_g + epsilon) + beta

Layer norm is the case G = 1 and instance norm the case G = C; both are `GroupNorm`. Batch norm is
`BatchNorm`: Keras's `BatchNormalization` (`synchronized=True` for multi-device statistics),
computed by TensorFlow's fused kernel, or in training GroupNorm's C++ kernels, where they apply.
`GroupNorm` takes the arguments of `keras.layers.GroupNormalization`, and
`from_keras_group_norm` converts a model built with that layer (docs/keras_layer.md).

The small-batch normalizers GN is compared with (docs/norm_family.md): `BatchRenorm` (BN
corrected towards its moving statistics, Ioffe 2017), `FilterResponseNorm` with its TLU (Singh &
Krishnan 2020), `EvoNormS0` and `EvoNormB0` (Liu et al. 2020). The last three carry their own
nonlinearity and take the place of a norm and its activation (`carries_activation`).
Conv2D is channels-last. No flags, no I/O.

Fast paths (GroupNorm's C++ or compiled kernels, BatchNorm's fused kernel, the small-batch
family's C++ kernels, Conv2D's patches product and oneDNN gradients) give the same numbers as the
plain TensorFlow ops. Which one a layer runs is decided by kernels/policy.py, from the switches in
force when the layer is constructed (GN_FAST_OPS=0, GN_CPP_KERNELS=0, GN_ONEDNN_CONV=0 in the
environment, or `policy.using(...)`); `plain_ops()` makes everything traced inside it plain.
"""
import functools
import numbers

import keras
import numpy as np
import tensorflow as tf

from choices import (DEFAULT_GROUPS, NORM_TYPES, NORMS_WITH_ACTIVATION,  # the flags' names
                     RENORM_RELAX)
from kernels import conv as conv_kernels
from kernels import group_norm as gn_compute
from kernels import norm_family as family_compute
from kernels import policy
from kernels.policy import plain_ops  # noqa: F401  (ops.plain_ops: the layers' export switch)


@keras.saving.register_keras_serializable(package="gn")
class GroupNorm(keras.layers.Layer):
    """Group Normalization, a drop-in for `keras.layers.GroupNormalization` with faster kernels.

    Args:
        groups: number of channel groups G (default 32); the channel count C must be a multiple
            of G. -1 means one group per channel (instance norm).
        channels_per_group: instead of `groups`, the channels of each group (the paper's Table 3,
            lower half): G = C / channels_per_group, so layers of different widths get different
            group counts. Pass one of `groups` and `channels_per_group`, not both.
        axis: the channel axis (any but the batch axis, 0). The fast kernels serve the last axis;
            any other axis takes the plain TensorFlow ops.
        epsilon: added to the group variance before the square root (Keras's default, 1e-3;
            this repo's models pass 1e-5 through `norm_layer`).
        center: learn a per-channel offset beta.
        scale: learn a per-channel scale gamma.
        beta_initializer, gamma_initializer: initializers of beta (zeros) and gamma (ones).
        beta_regularizer, gamma_regularizer: optional regularizers of beta and gamma.
        beta_constraint, gamma_constraint: optional constraints on beta and gamma.
        **kwargs: the base layer's arguments (`name`, `dtype`, ...).

    A mask on the input passes through to the output unchanged; as in Keras's layer, the
    statistics include the masked positions.

    Precision: the statistics and the normalization are computed in float32 from the input as it
    arrives, before any cast to the compute dtype: the layer turns Keras's input autocast off,
    so under a mixed_float16 policy a float32 input above float16's range (65504) is normalized,
    not turned into inf, and float16 / bfloat16 activations of size ~1e3 do not overflow when
    squared. Gamma and beta are float32 variables read as float32, also inside a float16
    autocast scope. The output has the policy's compute dtype. The mean and variance are folded
    with gamma and beta into one scale and one offset per (example, channel), so normalizing is
    a single multiply-add over the activations: `y = x * scale + offset`. The grouped view is a
    reshape, never a transpose, whatever the axis. The batch dimension may be None.

    Speed: for channels last, the forward pass and a closed-form backward pass are one C++ op
    each on CPU (kernels/group_norm.cc, compiled on first use). Where those cannot run (no
    compiler, a GPU, float64, a function XLA compiles whole) they are TensorFlow-op kernels,
    XLA-compiled from 128K elements (kernels/group_norm.py). GN_FAST_OPS=0 and `plain_ops()`
    select the plain ops (`kernels.group_norm.plain`) and TensorFlow's autodiff.
    """

    def __init__(self, groups=None, axis=-1, epsilon=1e-3, center=True, scale=True,
                 beta_initializer="zeros", gamma_initializer="ones", beta_regularizer=None,
                 gamma_regularizer=None, beta_constraint=None, gamma_constraint=None,
                 channels_per_group=None, **kwargs):
        super().__init__(**kwargs)
        groups, channels_per_group = _checked_grouping("GroupNorm", groups, channels_per_group)
        if not _is_integer(axis):
            raise ValueError(f"GroupNorm: axis must be one integer, got axis={axis!r}")
        self.groups = groups  # known once built when channels_per_group is given
        self.channels_per_group = channels_per_group
        self.axis = int(axis)
        self.epsilon = epsilon
        self.center = center
        self.scale = scale
        _set_affine_arguments(self, beta_initializer, gamma_initializer, beta_regularizer,
                              gamma_regularizer, beta_constraint, gamma_constraint)
        self.supports_masking = True
        self.autocast = False  # the statistics see the input as it arrives; `call` casts after
        self._switches = policy.current()

    def build(self, input_shape):
        rank = len(input_shape)
        if rank < 2:
            raise ValueError(f"GroupNorm needs an input of rank >= 2, got shape {input_shape}")
        if not -rank <= self.axis < rank or self.axis % rank == 0:
            raise ValueError(f"GroupNorm: axis={self.axis} is not a channel axis of an input of "
                             f"shape {input_shape} (the batch axis 0 is not one)")
        channels = input_shape[self.axis]
        if channels is None:
            raise ValueError(f"GroupNorm needs a known channel count on axis {self.axis}, got "
                             f"shape {input_shape}")
        self.groups = _group_count("GroupNorm", self.groups, self.channels_per_group, channels)
        self._channels_last = self.axis % rank == rank - 1
        # Created in this order under these names, which checkpoints refer to.
        self.gamma = _affine_weight(self, "gamma", channels, self.gamma_initializer,
                                    self.gamma_regularizer,
                                    self.gamma_constraint) if self.scale else None
        self.beta = _affine_weight(self, "beta", channels, self.beta_initializer,
                                   self.beta_regularizer,
                                   self.beta_constraint) if self.center else None
        self._compiled_kernels = gn_compute.compiled_kernels()

    def call(self, inputs):
        inputs = _statistics_input(inputs, self.compute_dtype)
        channels = inputs.shape[self.axis]
        gamma = tf.ones([channels]) if self.gamma is None else tf.cast(self.gamma, tf.float32)
        beta = tf.zeros([channels]) if self.beta is None else tf.cast(self.beta, tf.float32)
        kernel = policy.group_norm_kernel(policy.at_call(self._switches), inputs,
                                          self._channels_last)
        if kernel == "plain":
            outputs = gn_compute.plain(inputs, gamma, beta, self.groups, self.epsilon, self.axis)
        else:
            kernel_pair = {"cpp": gn_compute.CPP_KERNELS, "tf_ops": gn_compute.TF_KERNELS,
                           "tf_ops_xla": self._compiled_kernels}[kernel]
            outputs = gn_compute.fast(inputs, gamma, beta, self.groups, self.epsilon, kernel_pair)
        if outputs.dtype != self.compute_dtype:
            outputs = tf.cast(outputs, self.compute_dtype)
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        """Keras's GroupNormalization's keys, and channels_per_group where it sizes the groups."""
        config = {**super().get_config(), "groups": self.groups, "axis": self.axis,
                  "epsilon": self.epsilon, "center": self.center, "scale": self.scale,
                  **_affine_config(self)}
        if self.channels_per_group is not None:
            config.update(groups=None, channels_per_group=self.channels_per_group)
        return config


def from_keras_group_norm(model):
    """A clone of a functional or Sequential `model` in which every
    `keras.layers.GroupNormalization` (not a subclass, whose behaviour may differ) is a
    `GroupNorm` with the same arguments and weights, so the same outputs; the other layers are
    cloned as they are, nested models too, and every weight is copied over."""
    def clone_layer(layer):
        cls = GroupNorm if type(layer) is keras.layers.GroupNormalization else type(layer)
        return cls.from_config(layer.get_config())
    clone = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    clone.set_weights(model.get_weights())
    return clone


# The Keras arguments of a norm's scale gamma and offset beta, by the module that reads each kind.
AFFINE_ARGUMENT_KINDS = {"initializer": keras.initializers, "regularizer": keras.regularizers,
                         "constraint": keras.constraints}


def _set_affine_arguments(layer, beta_initializer, gamma_initializer, beta_regularizer,
                          gamma_regularizer, beta_constraint, gamma_constraint):
    """Sets `layer`'s beta_/gamma_ initializer, regularizer and constraint from Keras's
    identifiers (names, configs or objects)."""
    given = locals()
    for name, module in AFFINE_ARGUMENT_KINDS.items():
        for weight in ("beta", "gamma"):
            setattr(layer, f"{weight}_{name}", module.get(given[f"{weight}_{name}"]))


def _affine_config(layer):
    """The get_config entries of `layer`'s beta_/gamma_ arguments (_set_affine_arguments')."""
    return {f"{weight}_{name}": keras.saving.serialize_keras_object(
                getattr(layer, f"{weight}_{name}"))
            for name in AFFINE_ARGUMENT_KINDS for weight in ("beta", "gamma")}


def _is_integer(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _checked_grouping(owner, groups, channels_per_group):
    """(groups, channels_per_group) as a grouped layer (GroupNorm, EvoNormS0) keeps them: one of
    the two, checked, `groups` defaulting to DEFAULT_GROUPS; `owner` names the layer in errors."""
    if groups is not None and channels_per_group is not None:
        raise ValueError(f"{owner}: pass groups or channels_per_group, not both (got "
                         f"groups={groups!r}, channels_per_group={channels_per_group!r})")
    if channels_per_group is None:
        groups = DEFAULT_GROUPS if groups is None else groups
        if not _is_integer(groups) or (groups < 1 and groups != -1):
            raise ValueError(f"{owner}: groups must be a positive integer, or -1 for one "
                             f"group per channel, got groups={groups!r}")
        return int(groups), None
    if not _is_integer(channels_per_group) or channels_per_group < 1:
        raise ValueError(f"{owner}: channels_per_group must be a positive integer, got "
                         f"channels_per_group={channels_per_group!r}")
    return None, int(channels_per_group)


def _group_count(owner, groups, channels_per_group, channels):
    """The number of groups G of `channels` channels, from `_checked_grouping`'s pair; an error
    that names C and G (or the channels per group) where they do not divide."""
    if channels_per_group is not None:
        if channels % channels_per_group:
            raise ValueError(
                f"{owner}: C={channels} channels do not split into groups of "
                f"channels_per_group={channels_per_group}; choose a number of channels "
                f"per group that divides {channels}")
        return channels // channels_per_group
    groups = channels if groups == -1 else groups
    if channels % groups:
        raise ValueError(
            f"{owner}: C={channels} channels are not divisible by G={groups} groups; "
            f"choose a number of groups that divides {channels}")
    return groups


def _affine_weight(layer, name, channels, initializer, regularizer=None, constraint=None):
    """A per-channel weight of `layer` (gamma, beta, ...), read in float32 also where a mixed
    policy computes in float16 (autocast=False)."""
    return layer.add_weight(name=name, shape=(channels,), initializer=initializer,
                            regularizer=regularizer, constraint=constraint, trainable=True,
                            autocast=False)


def _statistics_input(inputs, compute_dtype):
    """The input the statistics are computed from: as it arrives when it is a float at least as
    wide as the compute dtype (a float32 input to a float16 layer keeps values above 65504);
    a narrower float is cast up to the compute dtype, as Keras's autocast would, and an integer
    to float32."""
    if not inputs.dtype.is_floating:
        return tf.cast(inputs, tf.float32)
    if inputs.dtype.size < tf.as_dtype(compute_dtype).size:
        return tf.cast(inputs, compute_dtype)
    return inputs


@keras.saving.register_keras_serializable(package="gn")
class BatchNorm(keras.layers.BatchNormalization):
    """Keras's `BatchNormalization`, computed by fused kernels where they apply.

    Keras 3 normalizes with `tf.nn.moments` and `tf.nn.batch_normalization`, several passes over
    the activations forward and more backward; TensorFlow's fused kernel (FusedBatchNormV3 and
    its registered gradient, FusedBatchNormGradV3) does the statistics and the normalization in
    one op each way, in less time than Keras's computation (docs/performance.md has the
    measurements). In training, most tensors normalize on GroupNorm's C++ kernels instead,
    which are faster still there (`_batch_norm_on_group_norm_kernel`; kernels/policy.py says
    where). The arguments, the variables (gamma, beta, moving_mean, moving_variance: the same
    names, order and dtypes, so checkpoints written with Keras's layer restore), the
    configuration and the semantics are Keras's: in
    training (`training=True` and the layer trainable) the batch statistics normalize and
    `moving = moving * momentum + batch_stat * (1 - momentum)` with the biased batch variance;
    otherwise the moving statistics normalize. Each replica of a distribution strategy uses its
    own batch, as Keras's layer does without `synchronized`.

    The fused kernel serves 4-D channels-last inputs (axis -1 or 3) of float32, bfloat16 or
    float16, without a mask. Everything else takes Keras's own computation: other ranks and
    axes, `synchronized=True` (its statistics need Keras's all-reduce over replicas), a mask,
    `renorm`, and any call inside `plain_ops()` or with GN_FAST_OPS=0.

    Precision: as in Keras's layer, the statistics and the normalization are float32 whatever
    the input dtype (the kernel takes bfloat16 / float16 activations with float32 parameters and
    statistics), the variables are float32 under mixed policies, and the output has the
    compute dtype.

    Args (beyond Keras's):
        ghost_batch_size: in training, normalize each consecutive slice of this many examples
            of the batch by its own statistics ("ghost batches", Hoffer et al. 2017), as if the
            slices had been separate calls: one pass over 8 ghost batches of 2 computes what 8
            passes of 2 examples compute. The moving statistics end as those 8 calls would
            leave them (their exponential averages in closed form). None: the whole batch.
    """

    def __init__(self, *args, ghost_batch_size=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.ghost_batch_size = ghost_batch_size
        self._switches = policy.current()

    def get_config(self):
        """Keras's configuration, with ghost_batch_size only when it is set."""
        config = super().get_config()
        if self.ghost_batch_size:
            config["ghost_batch_size"] = self.ghost_batch_size
        return config

    def call(self, inputs, training=None, mask=None):
        learning = bool(training and self.trainable)
        ghosts = _ghost_batches(inputs, learning, self.ghost_batch_size)
        if ghosts > 1:
            return self._call_on_ghost_batches(inputs, ghosts, mask)
        kernel = policy.batch_norm_kernel(policy.at_call(self._switches), inputs, learning,
                                          plain_layer=self._keras_only(inputs, mask))
        if kernel == "keras":
            return super().call(inputs, training=training, mask=mask)
        scale, offset = self._scale_and_offset(inputs.shape[-1])
        if learning:
            normalize = BATCH_NORM_TRAINING_KERNELS[kernel]
            outputs, mean, variance = normalize(inputs, scale, offset, self.epsilon)
            _update_moving_averages(self.momentum, (self.moving_mean, mean[None]),
                                    (self.moving_variance, variance[None]))
        else:
            outputs = _fused_batch_norm_inference(
                inputs, scale, offset, tf.cast(self.moving_mean, tf.float32),
                tf.cast(self.moving_variance, tf.float32), self.epsilon)
        return tf.cast(outputs, self.compute_dtype)

    def _keras_only(self, inputs, mask):
        """Whether only Keras's computation serves this call (see the class docstring)."""
        return (self.synchronized or self.renorm or mask is not None or inputs.shape.rank != 4
                or self.axis not in (-1, 3))

    def _call_on_ghost_batches(self, inputs, ghosts, mask):
        """Training over `ghosts` ghost batches, each one example of GN with one group per
        channel: on GroupNorm's kernels, or as plain ops (kernels/policy.py)."""
        if mask is not None or self.synchronized or self.renorm or \
                self.axis not in (-1, inputs.shape.rank - 1):
            raise ValueError("ghost batches need a channels-last input without a mask, "
                             "synchronized or renorm")
        scale, offset = self._scale_and_offset(inputs.shape[-1])
        kernel = policy.ghost_batch_norm_kernel(policy.at_call(self._switches), inputs)
        normalize = (_plain_batch_norm_over_ghost_batches if kernel == "plain" else
                     functools.partial(_batch_norm_over_ghost_batches,
                                       kernel_pair=GHOST_BATCH_KERNELS[kernel]))
        outputs, means, variances = normalize(inputs, scale, offset, self.epsilon, ghosts)
        _update_moving_averages(self.momentum, (self.moving_mean, means),
                                (self.moving_variance, variances))
        return tf.cast(outputs, self.compute_dtype)

    def _scale_and_offset(self, channels):
        """gamma and beta as float32, or the ones and zeros the kernel needs in their place when
        `scale` or `center` is off."""
        scale = tf.ones([channels]) if self.gamma is None else tf.cast(self.gamma, tf.float32)
        offset = tf.zeros([channels]) if self.beta is None else tf.cast(self.beta, tf.float32)
        return scale, offset


def _ghost_batches(inputs, learning, ghost_batch_size):
    """How many ghost batches a call normalizes separately: 1 unless training with a
    ghost_batch_size that the batch exceeds."""
    batch = inputs.shape[0]
    if not (learning and ghost_batch_size and batch):
        return 1
    if batch % ghost_batch_size:
        raise ValueError(f"a batch of {batch} examples does not split into ghost batches of "
                         f"{ghost_batch_size}")
    return batch // ghost_batch_size


def _update_moving_averages(momentum, *pairs):
    """Moves each (moving variable, one call's batch statistics [ghosts, C]) pair as that many
    calls would, one per ghost batch, by Keras's convention: moving = moving * momentum +
    statistic * (1 - momentum)."""
    for variable, statistics in pairs:
        moving = tf.cast(variable, tf.float32)
        if statistics.shape[0] == 1:
            variable.assign(moving * momentum + statistics[0] * (1.0 - momentum))
        else:
            variable.assign(_moving_average_after(moving, statistics, momentum))


def _batch_norm_on_group_norm_kernel(x, scale, offset, epsilon):
    """(output, batch mean, biased batch variance) of batch norm in training, computed as GN on
    the C++ kernels: the whole batch is one ghost batch (`_batch_norm_over_ghost_batches`). The
    backward pass is GN's closed form, BN's own."""
    outputs, mean, variance = _batch_norm_over_ghost_batches(x, scale, offset, epsilon, 1,
                                                             gn_compute.CPP_KERNELS)
    return outputs, mean[0], variance[0]


def _batch_norm_over_ghost_batches(x, scale, offset, epsilon, ghosts, kernel_pair):
    """(output, mean [ghosts, C], biased variance [ghosts, C]) of batch norm in training over
    `ghosts` consecutive equal slices of the batch, each normalized by its own statistics: GN of
    `ghosts` examples of (batch / ghosts) x positions, one group per channel, which is what BN
    does to each. The variance comes back from 1 / sqrt(variance + epsilon), to float32
    rounding."""
    channels = x.shape[-1]
    outputs, mean, rstd = gn_compute.fast_with_statistics(
        tf.reshape(x, [ghosts, -1, channels]), scale, offset, channels, epsilon, kernel_pair)
    variance = tf.maximum(tf.reshape(1.0 / tf.square(rstd), [ghosts, channels]) - epsilon, 0.0)
    return tf.reshape(outputs, tf.shape(x)), tf.reshape(mean, [ghosts, channels]), variance


def _plain_batch_norm_over_ghost_batches(x, scale, offset, epsilon, ghosts):
    """`_batch_norm_over_ghost_batches` in plain TensorFlow ops, differentiated by autodiff."""
    channels = x.shape[-1]
    grouped = tf.reshape(tf.cast(x, tf.float32), [ghosts, -1, channels])
    mean, variance = tf.nn.moments(grouped, axes=[1], keepdims=True)
    outputs = tf.nn.batch_normalization(grouped, mean, variance, offset, scale, epsilon)
    return (tf.reshape(outputs, tf.shape(x)), tf.reshape(mean, [ghosts, channels]),
            tf.reshape(variance, [ghosts, channels]))


GHOST_BATCH_KERNELS = {"cpp": gn_compute.CPP_KERNELS, "tf_ops": gn_compute.TF_KERNELS}


def _moving_average_after(moving, statistics, momentum):
    """The exponential moving average after one update per row of `statistics`, in order:
    m_k = momentum^k m_0 + (1 - momentum) sum_j momentum^(k - j) s_j (j = 1..k)."""
    ghosts = statistics.shape[0]
    weights = tf.constant([momentum ** (ghosts - j) for j in range(1, ghosts + 1)], tf.float32)
    return momentum ** ghosts * moving + (1.0 - momentum) * tf.tensordot(weights, statistics, 1)


def _fused_batch_norm_training(x, scale, offset, epsilon):
    """(output, batch mean, biased batch variance) of the fused kernel normalizing the
    channels-last 4-D `x` by its own statistics.

    The kernel returns the variance with Bessel's correction (the sum of squares over n - 1),
    while Keras's moving variance averages the biased one (over n, from `tf.nn.moments`), so it
    is scaled by (n - 1) / n. For n = 1 the biased variance is 0; multiply_no_nan keeps it 0
    also where a kernel divides by n - 1 = 0."""
    channels = x.shape[-1]
    outputs, mean, variance = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=scale, offset=offset, mean=tf.zeros([channels]),
        variance=tf.ones([channels]), epsilon=epsilon, exponential_avg_factor=1.0,
        data_format="NHWC", is_training=True)[:3]
    n = tf.cast(tf.reduce_prod(tf.shape(x, out_type=tf.int64)[:-1]), tf.float32)
    return outputs, mean, tf.math.multiply_no_nan(variance, (n - 1.0) / n)


BATCH_NORM_TRAINING_KERNELS = {"cpp": _batch_norm_on_group_norm_kernel,
                               "fused": _fused_batch_norm_training}


def _fused_batch_norm_inference(x, scale, offset, mean, variance, epsilon):
    """The fused kernel normalizing the channels-last 4-D `x` by the given statistics."""
    return tf.raw_ops.FusedBatchNormV3(
        x=x, scale=scale, offset=offset, mean=mean, variance=variance, epsilon=epsilon,
        data_format="NHWC", is_training=False)[0]


# Keras's BatchNormalization arguments that BatchRenorm does not take (nor keep in its config):
# its own renorm, and statistics synchronized over replicas.
KERAS_ONLY_ARGUMENTS = ("renorm", "renorm_clipping", "renorm_momentum", "synchronized")


@keras.saving.register_keras_serializable(package="gn")
class BatchRenorm(BatchNorm):
    """Batch Renormalization (Ioffe, NeurIPS 2017): batch norm whose training output is corrected
    towards what the moving statistics give, so that training and inference compute nearly the
    same function of each example, also at small batches.

    In training, with x_hat the input normalized by its batch mean mu_B and standard deviation
    sigma_B = sqrt(var_B + epsilon), mu the moving mean and sigma = sqrt(moving_variance +
    epsilon):

        y = gamma * (x_hat * r + d) + beta
        r = clip(sigma_B / sigma, 1 / r_max, r_max),   d = clip((mu_B - mu) / sigma, -d_max, d_max)

    r and d are constants to the gradient (stop_gradient), as in the paper. With r_max = 1 and
    d_max = 0 this is batch norm. In inference the moving statistics normalize, as in BN.

    The variables (gamma, beta, moving_mean, moving_variance), the momentum convention
    (moving = moving * momentum + statistic * (1 - momentum), the biased batch variance) and
    `ghost_batch_size` are BatchNorm's: the paper's Algorithm 1 averages sigma instead, and
    Keras's `BatchNormalization(renorm=True)` takes r and d from separate averages
    (renorm_mean, and renorm_stddev of the standard deviations, with renorm_momentum). Averaging
    the variance makes the layer BN itself at r_max = 1, d_max = 0, moving statistics included.
    Over ghost batches each one is corrected against the moving statistics as they stand after
    the ghost batches before it, as separate calls would be.

    Args (beyond BatchNorm's; Keras's renorm arguments and `synchronized` are refused):
        r_max, d_max: the clipping bounds, reached at the end of `relax` (the paper: 3 and 5).
        relax: None to clip at r_max and d_max from the first call (Keras's fixed
            renorm_clipping), or (start, d_max_at, r_max_at) in optimizer updates: r_max is 1
            and d_max 0 (plain BN) for the first `start` updates, then they grow linearly to
            d_max at update d_max_at and to r_max at r_max_at (the paper: 5k, 25k, 40k;
            `renorm_clipping`). The update count is read when training from `update_count`,
            a function that `follow_updates` sets to read the optimizer's iterations.

    In training the corrections are folded into BN's scale and offset (gamma * r and gamma * d +
    beta), so the normalization runs on BatchNorm's training kernels (kernels/policy.py), and r
    and d come from one C++ op that reads the batch once (kernels/norm_family.py) where those
    kernels are BatchNorm's fast ones; over ghost batches, each with its own r and d, it is plain
    TensorFlow ops.
    """

    def __init__(self, *args, r_max=3.0, d_max=5.0, relax=None, **kwargs):
        refused = [name for name in KERAS_ONLY_ARGUMENTS if name in kwargs]
        if refused:
            raise ValueError(f"BatchRenorm takes r_max, d_max and relax, not {', '.join(refused)}")
        super().__init__(*args, **kwargs)
        if not (r_max >= 1 and d_max >= 0):
            raise ValueError(f"BatchRenorm: r_max must be >= 1 and d_max >= 0, got r_max={r_max}, "
                             f"d_max={d_max}")
        if relax is not None and not (len(relax) == 3 and 0 <= relax[0] < min(relax[1:])):
            raise ValueError(f"BatchRenorm: relax must be (start, d_max_at, r_max_at) with 0 <= "
                             f"start < d_max_at, r_max_at, got relax={relax!r}")
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.relax = None if relax is None else tuple(float(step) for step in relax)
        self.update_count = None

    def get_config(self):
        config = {**super().get_config(), "r_max": self.r_max, "d_max": self.d_max,
                  "relax": None if self.relax is None else list(self.relax)}
        for name in KERAS_ONLY_ARGUMENTS:
            del config[name]
        return config

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable):
            return super().call(inputs, training=training, mask=mask)
        if mask is not None or self.axis not in (-1, inputs.shape.rank - 1):
            raise ValueError("BatchRenorm trains on channels-last inputs without a mask")
        ghosts = _ghost_batches(inputs, True, self.ghost_batch_size)
        channels = inputs.shape[-1]
        switches = policy.at_call(self._switches)
        kernel = policy.batch_norm_kernel(switches, inputs, True,
                                          plain_layer=ghosts > 1 or self._keras_only(inputs, mask))
        r_max, d_max = renorm_clipping(self._updates_made(), self.r_max, self.d_max, self.relax)
        gamma, beta = self._scale_and_offset(channels)
        if kernel != "keras" and policy.norm_family_kernel(switches) == "cpp":
            r, d = family_compute.renorm_corrections(
                family_compute.as_kernel_input(inputs), tf.cast(self.moving_mean, tf.float32),
                tf.cast(self.moving_variance, tf.float32), r_max, d_max, self.epsilon)
        else:
            batches = tf.reshape(tf.cast(inputs, tf.float32), [ghosts, -1, channels])
            means, variances = tf.nn.moments(batches, axes=[1])
            r, d = self._corrections(means, variances, r_max, d_max)  # [ghosts, C]
            if kernel != "keras":  # one batch
                r, d = r[0], d[0]
        scale, offset = gamma * r, gamma * d + beta
        if kernel == "keras":
            outputs = tf.reshape(tf.nn.batch_normalization(
                batches, means[:, None], variances[:, None], offset[:, None], scale[:, None],
                self.epsilon), tf.shape(inputs))
        else:
            normalize = BATCH_NORM_TRAINING_KERNELS[kernel]
            outputs, mean, variance = normalize(inputs, scale, offset, self.epsilon)
            means, variances = mean[None], variance[None]
        _update_moving_averages(self.momentum, (self.moving_mean, means),
                                (self.moving_variance, variances))
        return tf.cast(outputs, self.compute_dtype)

    def _corrections(self, means, variances, r_max, d_max):
        """(r, d), [ghosts, C]: each ghost batch's statistics against the moving statistics
        before it, clipped by the bounds in force (`renorm_clipping`), without gradient."""
        moving_means = _moving_averages_before(tf.cast(self.moving_mean, tf.float32), means,
                                               self.momentum)
        moving_variances = _moving_averages_before(tf.cast(self.moving_variance, tf.float32),
                                                   variances, self.momentum)
        sigma = tf.sqrt(moving_variances + self.epsilon)
        r = tf.clip_by_value(tf.sqrt(variances + self.epsilon) / sigma, 1.0 / r_max, r_max)
        d = tf.clip_by_value((means - moving_means) / sigma, -d_max, d_max)
        return tf.stop_gradient(r), tf.stop_gradient(d)

    def _updates_made(self):
        """The optimizer's update count where the clipping relaxes over updates, else None."""
        if self.relax is None:
            return None
        if self.update_count is None:
            raise ValueError(f"BatchRenorm {self.name} relaxes its clipping over updates "
                             f"{self.relax[0]:g}-{max(self.relax[1:]):g} and needs the update "
                             "count: call ops.follow_updates(model, optimizer.iterations) first")
        return self.update_count()


def renorm_clipping(updates, r_max, d_max, relax=None):
    """(r_max, d_max) in force after `updates` optimizer updates, float32 tensors: the bounds
    themselves without `relax`; with relax = (start, d_max_at, r_max_at), 1 and 0 up to update
    `start`, then linear in the updates to d_max at d_max_at and to r_max at r_max_at, and
    constant after (BatchRenorm)."""
    if relax is None:
        return tf.constant(r_max, tf.float32), tf.constant(d_max, tf.float32)
    start, d_max_at, r_max_at = relax
    updates = tf.cast(updates, tf.float32)

    def progress(end):
        return tf.clip_by_value((updates - start) / (end - start), 0.0, 1.0)

    return 1.0 + (r_max - 1.0) * progress(r_max_at), d_max * progress(d_max_at)


def paper_renorm_relax(max_training_step):
    """BatchRenorm's `relax` for a run of `max_training_step` updates: the paper's 5k, 25k and 40k
    updates as fractions of the run (choices.RENORM_RELAX)."""
    return tuple(fraction * max_training_step for fraction in RENORM_RELAX)


def follow_updates(model, iterations):
    """Makes every BatchRenorm layer of `model` (functional or Sequential) read the update count
    of its clipping schedule from `iterations`, the optimizer's: a checkpoint holds it, so a
    run continued from one relaxes its clipping as a run trained straight through."""
    for layer in model.layers:
        if isinstance(layer, BatchRenorm):
            layer.update_count = lambda: iterations


def _moving_averages_before(moving, statistics, momentum):
    """[ghosts, C]: the moving average as it stands before each row of `statistics` moves it in
    turn (`_moving_average_after` the rows before)."""
    return tf.stack([moving] + [_moving_average_after(moving, statistics[:k], momentum)
                                for k in range(1, statistics.shape[0])])


class _AffineNorm(keras.layers.Layer):
    """What FilterResponseNorm, EvoNormS0 and EvoNormB0 share: channels last (the statistics run
    over the axes between the batch and the channels); a per-channel scale gamma and offset beta
    with Keras's initializer, regularizer and constraint arguments; the statistics and the
    arithmetic in float32 from the input as it arrives (no autocast: a float32 input to a
    mixed_bfloat16 layer is not rounded first), float32 weights, the output in the compute
    dtype. A subclass adds its weights in `_add_weights`, computes its reference in `_compute`
    (TensorFlow ops on the float32 input, differentiated by autodiff) and the same numbers, to
    float32 rounding, in `_compute_fast` (C++ kernels, kernels/norm_family.py), which runs where
    kernels/policy.py says (`norm_family_kernel`) on the input as it arrives, and returns the
    output in the input's dtype."""

    def __init__(self, epsilon, beta_initializer="zeros", gamma_initializer="ones",
                 beta_regularizer=None, gamma_regularizer=None, beta_constraint=None,
                 gamma_constraint=None, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon
        _set_affine_arguments(self, beta_initializer, gamma_initializer, beta_regularizer,
                              gamma_regularizer, beta_constraint, gamma_constraint)
        self.autocast = False
        self._switches = policy.current()

    def build(self, input_shape):
        if len(input_shape) < 2 or input_shape[-1] is None:
            raise ValueError(f"{type(self).__name__} needs a channels-last input of rank >= 2 "
                             f"with a known channel count, got shape {input_shape}")
        channels = input_shape[-1]
        self.gamma = _affine_weight(self, "gamma", channels, self.gamma_initializer,
                                    self.gamma_regularizer, self.gamma_constraint)
        self.beta = _affine_weight(self, "beta", channels, self.beta_initializer,
                                   self.beta_regularizer, self.beta_constraint)
        self._add_weights(channels)

    def call(self, inputs, training=None):
        gamma, beta = tf.cast(self.gamma, tf.float32), tf.cast(self.beta, tf.float32)
        learning = bool(training and self.trainable)
        if policy.norm_family_kernel(policy.at_call(self._switches)) == "cpp":
            outputs = self._compute_fast(family_compute.as_kernel_input(inputs), gamma, beta,
                                         learning)
        else:
            outputs = self._compute(tf.cast(inputs, tf.float32), gamma, beta, learning)
        return tf.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon, **_affine_config(self)}


def _positions(x):
    """The axes of an example's positions in channels-last `x` (none for a rank-2 input)."""
    return list(range(1, x.shape.rank - 1))


@keras.saving.register_keras_serializable(package="gn")
class FilterResponseNorm(_AffineNorm):
    """Filter Response Normalization with its Thresholded Linear Unit (Singh & Krishnan, CVPR
    2020). Each channel of each example is divided by the root mean square of its values over
    the positions, without subtracting a mean, and the TLU replaces the ReLU after it:

        nu2 = mean over positions of x^2,   y = max(gamma * x / sqrt(nu2 + epsilon) + beta, tau)

    No statistic crosses the batch; a 1x1 map leaves about gamma * sign(x) + beta, which the
    paper's learned epsilon is for.

    Args:
        epsilon: added to nu2 (the paper: 1e-6).
        tlu: apply the TLU, whose threshold `tau` (one per channel) starts at `tau_initializer`
            (zeros); False is FRN alone, for a place no activation follows.
        learned_epsilon: None, or the initial value of a learned scalar eps_l, the layer then
            adding |eps_l| + epsilon to nu2 (the paper's option for maps of few positions).
        beta_*, gamma_*, **kwargs: as in `GroupNorm` (initializers, regularizers, constraints,
            `name`, `dtype`).
    """

    def __init__(self, epsilon=1e-6, tlu=True, learned_epsilon=None, tau_initializer="zeros",
                 **kwargs):
        super().__init__(epsilon, **kwargs)
        self.tlu = tlu
        self.learned_epsilon = learned_epsilon
        self.tau_initializer = keras.initializers.get(tau_initializer)

    def _add_weights(self, channels):
        self.tau = _affine_weight(self, "tau", channels, self.tau_initializer) if self.tlu \
            else None
        self.eps_l = None if self.learned_epsilon is None else self.add_weight(
            name="eps_l", shape=(), initializer=keras.initializers.Constant(self.learned_epsilon),
            trainable=True, autocast=False)

    def _epsilon(self):
        """epsilon, plus |eps_l| where it is learned."""
        if self.eps_l is None:
            return self.epsilon
        return self.epsilon + tf.abs(tf.cast(self.eps_l, tf.float32))

    def _compute(self, x, gamma, beta, learning):
        nu2 = tf.reduce_mean(tf.square(x), axis=_positions(x), keepdims=True)
        outputs = gamma * x * tf.math.rsqrt(nu2 + self._epsilon()) + beta
        return outputs if self.tau is None else tf.maximum(outputs, tf.cast(self.tau, tf.float32))

    def _compute_fast(self, x, gamma, beta, learning):
        tau = tf.zeros_like(gamma) if self.tau is None else tf.cast(self.tau, tf.float32)
        return family_compute.filter_response_norm(
            x, gamma, beta, tau, tf.cast(self._epsilon(), tf.float32), tlu=self.tau is not None)

    def get_config(self):
        return {**super().get_config(), "tlu": self.tlu, "learned_epsilon": self.learned_epsilon,
                "tau_initializer": keras.saving.serialize_keras_object(self.tau_initializer)}


@keras.saving.register_keras_serializable(package="gn")
class EvoNormS0(_AffineNorm):
    """EvoNorm-S0 (Liu et al., NeurIPS 2020), a normalization-activation layer that uses no
    batch statistic: a SiLU-like gate divided by the standard deviation of GN's groups,

        y = x * sigmoid(v * x) / group_std(x) * gamma + beta,

    group_std(x) = sqrt(variance over a group's channels and positions + epsilon), per example
    (biased). Weights gamma, beta and v (one per channel, v starting at `v_initializer`, ones).

    Args:
        groups, channels_per_group: GN's groups, as `GroupNorm` takes them.
        epsilon: added to the group variance (Keras's 1e-3; the repo's models pass 1e-5, the
            authors' value).
        nonlinearity: False gives the authors' form for a place no activation follows: the
            affine transform x * gamma + beta alone, without v.
        beta_*, gamma_*, **kwargs: as in `GroupNorm`.
    """

    def __init__(self, groups=None, epsilon=1e-3, nonlinearity=True, v_initializer="ones",
                 channels_per_group=None, **kwargs):
        super().__init__(epsilon, **kwargs)
        self.groups, self.channels_per_group = _checked_grouping("EvoNormS0", groups,
                                                                 channels_per_group)
        self.nonlinearity = nonlinearity
        self.v_initializer = keras.initializers.get(v_initializer)

    def _add_weights(self, channels):
        self.groups = _group_count("EvoNormS0", self.groups, self.channels_per_group, channels)
        self.v = _affine_weight(self, "v", channels, self.v_initializer) \
            if self.nonlinearity else None

    def _compute(self, x, gamma, beta, learning):
        if self.v is None:
            return x * gamma + beta
        gated = x * tf.sigmoid(tf.cast(self.v, tf.float32) * x)
        return gated / _group_std(x, self.groups, self.epsilon) * gamma + beta

    def _compute_fast(self, x, gamma, beta, learning):
        if self.v is None:
            return self._compute(tf.cast(x, tf.float32), gamma, beta, learning)
        return family_compute.evonorm_s0(x, gamma, beta, tf.cast(self.v, tf.float32),
                                         self.groups, self.epsilon)

    def get_config(self):
        config = {**super().get_config(), "groups": self.groups,
                  "nonlinearity": self.nonlinearity,
                  "v_initializer": keras.saving.serialize_keras_object(self.v_initializer)}
        if self.channels_per_group is not None:
            config.update(groups=None, channels_per_group=self.channels_per_group)
        return config


def _group_std(x, groups, epsilon):
    """sqrt(variance over each group's channels and positions + epsilon), per example, shaped
    [N, 1, ..., 1, C] (each channel its group's)."""
    channels = x.shape[-1]
    batch = tf.shape(x)[0]
    grouped = tf.reshape(x, [batch, -1, groups, channels // groups])
    _, variance = tf.nn.moments(grouped, axes=[1, 3], keepdims=True)
    std = tf.broadcast_to(tf.sqrt(variance + epsilon), [batch, 1, groups, channels // groups])
    return tf.reshape(std, [batch] + [1] * (x.shape.rank - 2) + [channels])


@keras.saving.register_keras_serializable(package="gn")
class EvoNormB0(_AffineNorm):
    """EvoNorm-B0 (Liu et al., NeurIPS 2020), a normalization-activation layer with a batch
    statistic:

        y = x / max(sqrt(var_B + epsilon), v * x + instance_std(x)) * gamma + beta

    var_B is the variance over the batch and the positions, per channel, in training (with its
    gradient), and the moving variance in inference; instance_std(x) = sqrt(variance over an
    example's positions + epsilon) per channel. All variances are biased. The moving variance
    follows Keras's convention, moving = moving * momentum + var_B * (1 - momentum), in training
    (`training=True` and the layer trainable), as BatchNorm's does; so does `ghost_batch_size`.
    Weights gamma, beta, v (v starting at `v_initializer`, ones) and moving_variance.

    Args:
        momentum: of the moving variance (Keras's BN default, 0.99).
        epsilon: added to the variances (Keras's BN default, 1e-3; the repo's models pass 1e-5,
            the authors' value).
        nonlinearity: False gives the authors' form for a place no activation follows: the
            affine transform x * gamma + beta alone, without v or a moving variance.
        moving_variance_initializer: the moving variance's start (ones).
        ghost_batch_size: as BatchNorm's: in training, var_B of each consecutive slice of this
            many examples, the moving variance ending as separate calls would leave it.
        beta_*, gamma_*, **kwargs: as in `GroupNorm`.
    """

    def __init__(self, momentum=0.99, epsilon=1e-3, nonlinearity=True, v_initializer="ones",
                 moving_variance_initializer="ones", ghost_batch_size=None, **kwargs):
        super().__init__(epsilon, **kwargs)
        self.momentum = momentum
        self.nonlinearity = nonlinearity
        self.v_initializer = keras.initializers.get(v_initializer)
        self.moving_variance_initializer = keras.initializers.get(moving_variance_initializer)
        self.ghost_batch_size = ghost_batch_size

    def _add_weights(self, channels):
        self.v = self.moving_variance = None
        if self.nonlinearity:
            self.v = _affine_weight(self, "v", channels, self.v_initializer)
            self.moving_variance = self.add_weight(
                name="moving_variance", shape=(channels,),
                initializer=self.moving_variance_initializer, trainable=False, autocast=False)

    def _compute(self, x, gamma, beta, learning):
        if self.v is None:
            return x * gamma + beta
        channels, rank = x.shape[-1], x.shape.rank
        if learning:
            ghosts = _ghost_batches(x, True, self.ghost_batch_size)
            _, variances = tf.nn.moments(tf.reshape(x, [ghosts, -1, channels]), axes=[1])
            _update_moving_averages(self.momentum, (self.moving_variance, variances))
            batch_variance = tf.repeat(variances, x.shape[0] // ghosts, axis=0) \
                if ghosts > 1 else variances
        else:
            batch_variance = tf.cast(self.moving_variance, tf.float32)
        batch_variance = tf.reshape(batch_variance, [-1] + [1] * (rank - 2) + [channels])
        _, instance_variance = tf.nn.moments(x, axes=_positions(x), keepdims=True)
        right = tf.cast(self.v, tf.float32) * x + tf.sqrt(instance_variance + self.epsilon)
        return x / tf.maximum(tf.sqrt(batch_variance + self.epsilon), right) * gamma + beta

    def _compute_fast(self, x, gamma, beta, learning):
        if self.v is None:
            return self._compute(tf.cast(x, tf.float32), gamma, beta, learning)
        ghosts = _ghost_batches(x, True, self.ghost_batch_size) if learning else 0
        outputs, variances = family_compute.evonorm_b0(
            x, gamma, beta, tf.cast(self.v, tf.float32), tf.cast(self.moving_variance, tf.float32),
            self.epsilon, ghosts)
        if learning:
            _update_moving_averages(self.momentum, (self.moving_variance, variances))
        return outputs

    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        config = {**super().get_config(), "momentum": self.momentum,
                  "nonlinearity": self.nonlinearity,
                  "v_initializer": serialize(self.v_initializer),
                  "moving_variance_initializer": serialize(self.moving_variance_initializer)}
        if self.ghost_batch_size:
            config["ghost_batch_size"] = self.ghost_batch_size
        return config


@keras.saving.register_keras_serializable(package="gn")
class Conv2D(keras.layers.Conv2D):
    """Keras's Conv2D with 'same' padding, optional Weight Standardization, and faster paths for
    small maps and for large float32 convolutions.

    Args:
        weight_std: standardize each output filter of the kernel to zero mean and unit variance
            before the convolution (Qiao et al. 2019). Paired with GroupNorm it matches BN at
            large batch while keeping GN's independence of the batch size.
        ws_epsilon: added to the filter variance before the square root.

    TensorFlow's CPU kernel for a convolution's input gradient is slow on small maps with many
    channels, far slower than the forward pass. On maps no larger than the kernel, and on maps
    of at most 8x8 positions with 128 channels or more, this layer gathers the kernel-sized
    patches (one gather over the flattened map) and multiplies them by the kernel instead: the
    same numbers, forward and backward several times faster there (`_patches_matmul` says how
    the backward product is chosen). Large float32 convolutions (a batch-32 ResNet-20's 3x3
    convs) take their gradients from TensorFlow's oneDNN kernels, which TensorFlow leaves unused
    on CPUs without AVX-512 (kernels/conv.py). docs/performance.md has the measurements; where a
    GPU is visible the layer keeps TensorFlow's convolution (cuDNN).
    """

    def __init__(self, filters, kernel_size, strides=1, weight_std=False, ws_epsilon=1e-5,
                 **kwargs):
        if kwargs.setdefault("padding", "same") != "same":
            raise ValueError(f"ops.Conv2D pads 'same' only, got padding={kwargs['padding']!r}")
        super().__init__(filters, kernel_size, strides=strides, **kwargs)
        self.weight_std = weight_std
        self.ws_epsilon = ws_epsilon
        self._switches = policy.current()

    def convolution_op(self, inputs, kernel):
        if self.weight_std:
            mean, variance = tf.nn.moments(kernel, axes=[0, 1, 2], keepdims=True)
            kernel = (kernel - mean) * tf.math.rsqrt(variance + self.ws_epsilon)
        if self._plain_convolution():
            implementation = policy.conv_kernel(policy.at_call(self._switches), inputs.shape,
                                                kernel.shape, self.strides,
                                                (inputs.dtype, kernel.dtype))
            if implementation == "patches":
                return self._patches_times_kernel(inputs, kernel)
            if implementation == "onednn":
                return conv_kernels.conv2d(inputs, kernel, self.strides)
        return super().convolution_op(inputs, kernel)

    def _plain_convolution(self):
        """Channels last, undilated, ungrouped: what both fast paths handle."""
        return (self.data_format == "channels_last" and self.groups == 1
                and tuple(self.dilation_rate) == (1, 1))

    def _patches_times_kernel(self, inputs, kernel):
        """The 'same'-padded convolution as [N * H' * W', kh*kw*C] patches @ [kh*kw*C, filters].
        The patches are one gather from the flattened map with a zero row appended, whose index
        stands for every position in the padding."""
        height, width, channels = inputs.shape[1:]
        indices, out_height, out_width = _patch_indices(
            (height, width), self.kernel_size, self.strides)
        flat = tf.pad(tf.reshape(inputs, [-1, height * width, channels]), [[0, 0], [0, 1], [0, 0]])
        patch_size = self.kernel_size[0] * self.kernel_size[1] * channels
        patches = tf.reshape(tf.gather(flat, indices, axis=1), [-1, patch_size])
        outputs = _patches_matmul(patches, tf.reshape(kernel, [-1, self.filters]))
        return tf.reshape(outputs, [-1, out_height, out_width, self.filters])

    def get_config(self):
        return {**super().get_config(), "weight_std": self.weight_std,
                "ws_epsilon": self.ws_epsilon}


def _patch_indices(size, kernel_size, strides):
    """(indices, out_height, out_width) of a 'same'-padded convolution: for each output position
    and kernel offset (row-major), the flattened input position it reads, or H*W in the
    padding."""
    (height, width), (kernel_height, kernel_width) = size, kernel_size
    stride_h, stride_w = strides
    out_height, out_width = -(-height // stride_h), -(-width // stride_w)
    top = max((out_height - 1) * stride_h + kernel_height - height, 0) // 2
    left = max((out_width - 1) * stride_w + kernel_width - width, 0) // 2
    rows = (np.arange(out_height)[:, None, None, None] * stride_h - top
            + np.arange(kernel_height)[None, None, :, None])
    cols = (np.arange(out_width)[None, :, None, None] * stride_w - left
            + np.arange(kernel_width)[None, None, None, :])
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    indices = np.where(inside, rows * width + cols, height * width).reshape(-1)
    return indices.astype(np.int32), out_height, out_width


@tf.custom_gradient
def _patches_matmul(patches, kernel):
    """patches @ kernel, with the patches' gradient dy @ kernel^T computed as (kernel @ dy^T)^T
    when the patches have fewer rows than columns: on such wide, short results TensorFlow's CPU
    product is the slower for dy @ kernel^T (docs/performance.md)."""
    def gradient(d_outputs):
        rows, columns = patches.shape
        if rows is not None and rows < columns:
            d_patches = tf.transpose(kernel @ tf.transpose(d_outputs))
        else:
            d_patches = tf.matmul(d_outputs, kernel, transpose_b=True)
        return d_patches, tf.matmul(patches, d_outputs, transpose_a=True)
    return patches @ kernel, gradient


@keras.saving.register_keras_serializable(package="gn")
class LeakyReLU(keras.layers.LeakyReLU):
    """Keras's LeakyReLU with its gradient computed from its output instead of its input.

    With oneDNN (TensorFlow's default on CPUs with AVX-512), grappler's remapper fuses a biased
    convolution or dense layer and the LeakyReLU after it into one op, then finds the training
    graph's LeakyReluGrad still reading the bias add it removed; the rewrite fails ("remapper
    failed: ... fanout ... LeakyReluGrad exist for missing node ... BiasAdd") and the graph runs
    without any of the remapper's fusions. With a positive slope the output has the sign of the
    input, so the gradient can read the output, and the bias add keeps a single reader.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._switches = policy.current()

    def call(self, inputs):
        if policy.leaky_relu_kernel(policy.at_call(self._switches)) == "keras":
            return super().call(inputs)
        return _leaky_relu(inputs, self.negative_slope)


def _leaky_relu(inputs, negative_slope):
    @tf.custom_gradient
    def forward(x):
        y = tf.nn.leaky_relu(x, alpha=negative_slope)

        def backward(dy):
            return tf.raw_ops.LeakyReluGrad(gradients=dy, features=y, alpha=negative_slope)

        return y, backward

    return forward(inputs)


def norm_layer(norm_type, channels, groups=DEFAULT_GROUPS, name=None, channels_per_group=None,
               gamma_initializer="ones", ghost_batch_size=None, renorm_relax=None,
               nonlinear=False):
    """The layer for a `--norm_type` value, for an input with `channels` channels. GN and
    EvoNorm-S0 take `channels_per_group` instead of `groups` when it is given; BN, batch renorm
    and EvoNorm-B0 normalize ghost batches of `ghost_batch_size` examples in training when it is
    given (the other norms need no batch); batch renorm relaxes its clipping over the updates
    `renorm_relax` (BatchRenorm's `relax`). `nonlinear` asks a norm that carries its own
    nonlinearity (`carries_activation`) for its form that takes an activation's place; without
    it such a norm has its linear form, for a place no activation follows."""
    if nonlinear and not carries_activation(norm_type):
        raise ValueError(f"norm_type {norm_type} has no nonlinearity of its own")
    ghosts = {"ghost_batch_size": ghost_batch_size} if ghost_batch_size else {}
    batch_norm = dict(momentum=0.9, epsilon=1e-5, name=name, gamma_initializer=gamma_initializer,
                      **ghosts)
    if norm_type in ("batch", "sync_batch"):
        return BatchNorm(synchronized=norm_type == "sync_batch", **batch_norm)
    if norm_type == "batch_renorm":
        return BatchRenorm(relax=renorm_relax, **batch_norm)
    if norm_type == "evonorm_b0":
        return EvoNormB0(nonlinearity=nonlinear, **batch_norm)
    if norm_type == "evonorm_s0":
        return EvoNormS0(groups=None if channels_per_group else groups, epsilon=1e-5,
                         channels_per_group=channels_per_group, nonlinearity=nonlinear,
                         name=name, gamma_initializer=gamma_initializer)
    if norm_type == "frn":
        return FilterResponseNorm(tlu=nonlinear, name=name, gamma_initializer=gamma_initializer)
    group_counts = {"group": None if channels_per_group else groups, "layer": 1,
                    "instance": channels}
    if norm_type in group_counts:
        return GroupNorm(groups=group_counts[norm_type], epsilon=1e-5, name=name,
                         channels_per_group=channels_per_group if norm_type == "group" else None,
                         gamma_initializer=gamma_initializer)
    if norm_type == "none":
        return keras.layers.Identity(name=name)
    raise ValueError(f"unknown norm_type {norm_type!r}; choose one of {', '.join(NORM_TYPES)}")


def carries_activation(norm_type):
    """Whether `norm_type` carries its own nonlinearity (FRN + TLU, EvoNorm): a model that puts
    a norm and an activation together puts this norm, in its nonlinear form, in place of both
    (the papers' usage), and where no activation follows it, its linear form."""
    return norm_type in NORMS_WITH_ACTIVATION


def norm(x, norm_type, groups=DEFAULT_GROUPS, name=None, **options):
    """Applies `norm_layer(norm_type, ..., **options)` sized for `x`."""
    return norm_layer(norm_type, x.shape[-1], groups, name=name, **options)(x)


def conv2d(x, filters, kernel_size=3, strides=1, weight_std=False, use_bias=False, name=None):
    """A 'same'-padded 2-D convolution, weight-standardized when `weight_std` is set."""
    return Conv2D(filters, kernel_size, strides=strides, weight_std=weight_std, use_bias=use_bias,
                  kernel_initializer="he_normal", name=name)(x)


def fc(x, units, activation=None, name=None):
    """A fully connected layer."""
    return keras.layers.Dense(units, activation=activation, name=name)(x)


def conv_norm_act(x, filters, norm_type, groups, weight_std, kernel_size=3, strides=1,
                  activation="relu", name=None, channels_per_group=None, zero_gamma=False,
                  ghost_batch_size=None, renorm_relax=None):
    """conv -> norm -> activation, the unit of the residual nets; a norm that carries its own
    nonlinearity takes the activation's place (`carries_activation`). `zero_gamma` starts the
    norm's scale at 0 (with norm_type none, where there is no scale, it is refused)."""
    if zero_gamma and norm_type == "none":
        raise ValueError("zero_gamma needs a normalization layer, and norm_type is none")
    x = conv2d(x, filters, kernel_size, strides, weight_std, use_bias=norm_type == "none",
               name=f"{name}_conv")
    carried = bool(activation) and carries_activation(norm_type)
    x = norm(x, norm_type, groups, name=f"{name}_norm", channels_per_group=channels_per_group,
             gamma_initializer="zeros" if zero_gamma else "ones",
             ghost_batch_size=ghost_batch_size, renorm_relax=renorm_relax, nonlinear=carried)
    if activation and not carried:
        x = keras.layers.Activation(activation, name=f"{name}_act")(x)
    return x


def residual_block(x, filters, norm_type, groups=DEFAULT_GROUPS, weight_std=False, strides=1,
                   name=None, channels_per_group=None, zero_init=False, ghost_batch_size=None,
                   renorm_relax=None):
    """The basic residual block of He et al. 2016: two 3x3 conv-norm units and a shortcut that is
    the identity, or a 1x1 conv + norm where the shape changes, added and then ReLU. `zero_init`
    starts the scale of the second unit's norm at 0, so that the block begins as its shortcut
    (Goyal et al. 2017; the GN paper's recipe). The second unit's norm and the shortcut's have no
    activation after them (a norm that carries one has its linear form there); the ReLU after
    the addition follows no norm and stays whatever the norm type."""
    shortcut = x
    options = dict(norm_type=norm_type, groups=groups, weight_std=weight_std,
                   channels_per_group=channels_per_group, ghost_batch_size=ghost_batch_size,
                   renorm_relax=renorm_relax)
    if strides != 1 or x.shape[-1] != filters:
        shortcut = conv_norm_act(x, filters, kernel_size=1, strides=strides, activation=None,
                                 name=f"{name}_shortcut", **options)
    y = conv_norm_act(x, filters, strides=strides, name=f"{name}_a", **options)
    y = conv_norm_act(y, filters, activation=None, name=f"{name}_b", zero_gamma=zero_init,
                      **options)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.Activation("relu", name=f"{name}_out")(y)
