"""Keras's Adam and momentum SGD, each variable updated by one of TensorFlow's fused training ops.

Keras 3 writes an optimizer's update of each variable as a dozen separate TensorFlow ops, and
recomputes the update's scalars (the learning rate's cast, the powers of beta) for every variable:
about 45 ops per variable for Adam, 2,900 for ResNet-20's 65 variables, which take seconds to
trace and optimize before a run's first update (docs/performance.md, "Memory and start-up").
TensorFlow's ResourceApplyAdam and ResourceApplyKerasMomentum (the ops tf.keras 2 ran) do each
variable's update in one op, and `apply` computes the scalars once per update: about 10 ops per
variable, and the update itself faster too (docs/performance.md has the numbers).

Everything else is Keras's: the variables and their checkpoint names, the learning-rate schedule,
gradient clipping, loss scaling and tf.distribute's per-device updates. Momentum SGD gives Keras's
numbers bit for bit. Adam differs from Keras's in the last bits of float32: TensorFlow's kernel
forms 1 - beta in float32 where Keras forms it in Python's float64.

The fused updates read a few of Keras's private attributes (`KERAS_INTERNALS`, the slots of each
variable). A Keras release without them gets Keras's own update step, after one warning line.
"""
import types

import keras
import tensorflow as tf

import kernels


class FusedUpdates:
    """The scalars of one update (`update_scalars`, given a dtype and the update's learning rate),
    computed on the first variable of each dtype and shared by the rest; and the check, when the
    optimizer is built, that Keras still has the attributes the fused updates read."""

    KERAS_INTERNALS = ("_get_variable_index",)

    def build(self, variables):
        super().build(variables)
        missing = [name for name in self.KERAS_INTERNALS if not hasattr(self, name)]
        self.fused = not missing
        if missing:
            kernels.log.warning("%s takes Keras's own update step, not TensorFlow's fused op: this "
                                "Keras has no %s", type(self).__name__, ", ".join(missing))

    def apply(self, grads, trainable_variables=None):
        # A namespace rather than a dict: Keras tracks a dict set on an optimizer, and its
        # checkpoints would hold a node for it.
        self._update = types.SimpleNamespace(scalars={})
        return super().apply(grads, trainable_variables)

    def scalars(self, dtype, learning_rate):
        by_dtype = self._update.scalars
        if dtype not in by_dtype:
            by_dtype[dtype] = self.update_scalars(dtype, learning_rate)
        return by_dtype[dtype]


class Adam(FusedUpdates, keras.optimizers.Adam):
    """keras.optimizers.Adam (without amsgrad) on ResourceApplyAdam."""

    KERAS_INTERNALS = ("_get_variable_index", "_momentums", "_velocities")

    def __init__(self, learning_rate, global_clipnorm=None):
        super().__init__(learning_rate, global_clipnorm=global_clipnorm)

    def update_scalars(self, dtype, learning_rate):
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        return dict(lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2,
                    beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step),
                    epsilon=tf.cast(self.epsilon, dtype))

    def update_step(self, gradient, variable, learning_rate):
        if not self.fused:
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[index].value.handle,
            v=self._velocities[index].value.handle, grad=tf.cast(gradient, variable.dtype),
            **self.scalars(variable.dtype, learning_rate))


class MomentumSGD(FusedUpdates, keras.optimizers.SGD):
    """keras.optimizers.SGD with (non-Nesterov) momentum on ResourceApplyKerasMomentum."""

    KERAS_INTERNALS = ("_get_variable_index", "momentums")

    def __init__(self, learning_rate, momentum, global_clipnorm=None):
        if not momentum > 0:
            raise ValueError(f"momentum must be positive, not {momentum}; use keras.optimizers.SGD "
                             "for plain SGD")
        super().__init__(learning_rate, momentum=momentum, global_clipnorm=global_clipnorm)

    def update_scalars(self, dtype, learning_rate):
        return dict(lr=tf.cast(learning_rate, dtype), momentum=tf.cast(self.momentum, dtype))

    def update_step(self, gradient, variable, learning_rate):
        if not self.fused:
            return super().update_step(gradient, variable, learning_rate)
        accumulator = self.momentums[self._get_variable_index(variable)].value
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=variable.handle, accum=accumulator.handle, grad=tf.cast(gradient, variable.dtype),
            use_nesterov=False, **self.scalars(variable.dtype, learning_rate))
