"""Times normalization on this machine and prints ratios (lower is faster).

    python benchmarks/norm_speed.py            # layer forward+backward, then a conv-net step
    python benchmarks/norm_speed.py --quick    # fewer repeats

Layer: ops.GroupNorm against keras.layers.GroupNormalization, against the transposing formulation
of the 2018 TF1 repo (NHWC -> NCHW, normalize, back; written out here as the reference), and against
Keras's BatchNormalization, each as one forward + backward pass inside tf.function.
Model: one training step (forward, backward, Adam) of the 2018 conv net with BN and with GN.
"""
import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import model as model_lib  # noqa: E402
import ops  # noqa: E402

LAYER_SHAPES = [(64, 14, 14, 64), (64, 16, 16, 128), (32, 32, 32, 64), (8, 56, 56, 256)]
GROUPS = 32


def transposed_group_norm(x, gamma, beta, groups=GROUPS, epsilon=1e-5):
    """GN as the 2018 repo computed it: transpose to NCHW, normalize the groups, transpose back."""
    _, height, width, channels = x.shape
    grouped = tf.reshape(tf.transpose(x, [0, 3, 1, 2]),
                         [-1, groups, channels // groups, height, width])
    mean, variance = tf.nn.moments(grouped, [2, 3, 4], keepdims=True)
    normalized = tf.reshape((grouped - mean) / tf.sqrt(variance + epsilon),
                            [-1, channels, height, width])
    normalized = normalized * tf.reshape(gamma, [1, channels, 1, 1]) \
        + tf.reshape(beta, [1, channels, 1, 1])
    return tf.transpose(normalized, [0, 2, 3, 1])


class Transposed2018(keras.layers.Layer):
    def build(self, input_shape):
        self.gamma = self.add_weight(shape=input_shape[-1:], initializer="ones")
        self.beta = self.add_weight(shape=input_shape[-1:], initializer="zeros")

    def call(self, x):
        return transposed_group_norm(x, self.gamma, self.beta)


def layer_candidates():
    return {
        "ops.GroupNorm": lambda: ops.GroupNorm(GROUPS),
        "keras GroupNormalization": lambda: keras.layers.GroupNormalization(GROUPS,
                                                                            epsilon=1e-5),
        "2018 transposed GN": Transposed2018,
        "keras BatchNormalization": lambda: keras.layers.BatchNormalization(),
    }


def best_seconds(fn, repeats):
    """The fastest of three timings of `repeats` calls, after a warm-up call."""
    fn()
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            result = fn()
        tf.nest.map_structure(lambda t: t.numpy(), result)
        timings.append((time.perf_counter() - start) / repeats)
    return min(timings)


def time_layer(make_layer, shape, repeats):
    layer = make_layer()
    x = tf.random.normal(shape) * 3 + 1
    layer.build(shape)

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(layer(x, training=True)))
        return tape.gradient(loss, [x, *layer.trainable_variables])

    return best_seconds(forward_backward, repeats)


def time_train_step(norm_type, batch_size, repeats):
    net = model_lib.build_model("conv", (32, 32, 3), 10, norm_type)
    optimizer = keras.optimizers.Adam(1e-3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    images = tf.random.uniform((batch_size, 32, 32, 3))
    labels = tf.zeros((batch_size,), tf.int32)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, net(images, training=True))
        gradients = tape.gradient(loss, net.trainable_variables)
        optimizer.apply_gradients(zip(gradients, net.trainable_variables))
        return loss

    return best_seconds(train_step, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, noisier numbers")
    args = parser.parse_args()
    repeats = 3 if args.quick else 10

    print(f"layer forward+backward, ms (ratio to ops.GroupNorm), G={GROUPS}:")
    for shape in LAYER_SHAPES:
        times = {name: time_layer(make, shape, repeats)
                 for name, make in layer_candidates().items()}
        ours = times["ops.GroupNorm"]
        cells = ", ".join(f"{name} {1000 * t:.1f} ({t / ours:.2f}x)" for name, t in times.items())
        print(f"  {shape}: {cells}")

    print("conv-net training step on 32x32x3, ms (GN / BN):")
    for batch_size in (2, 64):
        batch, group = (time_train_step(norm, batch_size, repeats) for norm in ("batch", "group"))
        print(f"  batch {batch_size}: BN {1000 * batch:.1f}, GN {1000 * group:.1f} "
              f"({group / batch:.2f}x)")


if __name__ == "__main__":
    main()
