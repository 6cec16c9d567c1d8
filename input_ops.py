"""tf.data pipelines over a dataset held in memory (see datasets/hdf5_format.py for the file).

Every pipeline yields (images float32 [B, H, W, C] in [0, 1], labels int32 [B]). The training
streams are deterministic for a given seed and can be saved and restored mid-stream with
`tf.train.Checkpoint(iterator=iterator)`: the shuffle uses a seeded op and the augmentation draws its
randomness from a seeded `tf.data.Dataset.random` stream fed to stateless ops, so all random state
lives in the iterator.
"""
import tensorflow as tf

from datasets import hdf5_format, registry

PAD = 4
AUTOTUNE = tf.data.AUTOTUNE


def load(name, data_dir):
    """Returns (registry spec or None for a user's dataset, ImageData) for `--dataset name`."""
    spec, path = registry.locate(name, data_dir)
    return spec, hdf5_format.read_dataset(path, spec)


def train_dataset(data, batch_size, seed, augment):
    """Endless shuffled train batches; `augment` adds a random crop after 4 px padding and a random
    horizontal flip."""
    return _shuffled_batches(data.train_images, data.train_labels, batch_size, seed, augment)


def test_sample_dataset(data, batch_size, seed):
    """Endless shuffled test batches, for a quick test estimate every few training steps."""
    return _shuffled_batches(data.test_images, data.test_labels, batch_size, seed, augment=False)


def eval_dataset(data, batch_size):
    """The test split exactly once, in order; the last batch may be smaller."""
    gather = _gatherer(data.test_images, data.test_labels)
    batches = tf.data.Dataset.range(len(data.test_labels)).batch(batch_size)
    batches = batches.map(gather, num_parallel_calls=AUTOTUNE, deterministic=True)
    return batches.map(_to_float, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)


def _shuffled_batches(images, labels, batch_size, seed, augment):
    """Shuffles indices rather than images, so the shuffle buffer (saved in checkpoints) stays small."""
    num_examples = len(labels)
    indices = (tf.data.Dataset.range(num_examples)
               .shuffle(num_examples, seed=seed, reshuffle_each_iteration=True)
               .repeat()
               .batch(batch_size, drop_remainder=True))
    batches = indices.map(_gatherer(images, labels), num_parallel_calls=AUTOTUNE,
                          deterministic=True)
    if augment:
        seeds = tf.data.Dataset.random(seed=seed).batch(2)
        batches = tf.data.Dataset.zip(batches, seeds).map(
            _augment, num_parallel_calls=AUTOTUNE, deterministic=True)
    return batches.map(_to_float, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)


def _gatherer(images, labels):
    images = tf.constant(images)
    labels = tf.constant(labels, dtype=tf.int32)

    def gather(indices):
        return tf.gather(images, indices), tf.gather(labels, indices)
    return gather


def _augment(batch, seed):
    """Random crop of each image padded by PAD px, and random horizontal flip, with one stateless
    draw per batch so the result depends only on the seed."""
    images, labels = batch
    size, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
    padded = tf.pad(images, [[0, 0], [PAD, PAD], [PAD, PAD], [0, 0]])
    draws = tf.random.stateless_uniform([size, 3], seed)
    offsets = tf.cast(draws[:, :2] * (2 * PAD + 1), tf.int32)
    rows = offsets[:, :1] + tf.range(height)
    cols = offsets[:, 1:] + tf.range(width)
    cropped = tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)
    flip = draws[:, 2] < 0.5
    return tf.where(flip[:, None, None, None], tf.reverse(cropped, axis=[2]), cropped), labels


def _to_float(images, labels):
    return tf.cast(images, tf.float32) / 255.0, labels
