"""tf.data pipelines over a dataset held in memory (datasets/hdf5_format.py) or streamed from JPEG
files (datasets/image_tree.py: ImageNet).

Every pipeline yields (images float32 [B, H, W, C] in [0, 1], labels int32 [B]). The training
streams are deterministic for a given seed and can be saved and restored mid-stream with
`tf.train.Checkpoint(iterator=iterator)`: the example order comes from seeded ops (a shuffle of
indices for data in memory, a stateless permutation per epoch for streamed files) and the
augmentation draws its randomness from a seeded `tf.data.Dataset.random` stream fed to stateless
ops, so all random state lives in the iterator.
"""
import functools

import numpy as np
import tensorflow as tf

from datasets import hdf5_format, image_tree, registry

PAD = 4
AUTOTUNE = tf.data.AUTOTUNE
# The training crop of streamed images (Inception-style): a box of 8-100% of the image's area with
# an aspect ratio of 3/4 to 4/3.
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3 / 4, 4 / 3)
# Their evaluation crop: the central image_size square after resizing the shorter side to
# image_size / CENTRAL_FRACTION (256 px for 224).
CENTRAL_FRACTION = 0.875


def load(name, data_dir):
    """Returns (registry spec or None for a user's dataset, data) for `--dataset name`: an
    ImageTree for a dataset streamed from files, else ImageData."""
    spec, path = registry.locate(name, data_dir)
    if spec is not None and spec.streamed:
        return spec, image_tree.read_tree(path, spec.image_size)
    return spec, hdf5_format.read_dataset(path, spec)


def central_fraction(data):
    """The share of an image's shorter side that the evaluation crop keeps: CENTRAL_FRACTION for
    files streamed at their own sizes, 1 for images stored at the network's size."""
    return CENTRAL_FRACTION if isinstance(data, image_tree.ImageTree) else 1.0


def train_dataset(data, batch_size, seed, augment, share=None):
    """Endless shuffled train batches. `augment` adds a random horizontal flip and a random crop:
    after 4 px padding for images in memory, a random-resized crop for streamed files (which
    otherwise get the evaluation crop). `share` (a distribution.InputShare) keeps only this
    worker's batches when several workers train together; each worker reads and decodes its
    own examples only."""
    if isinstance(data, image_tree.ImageTree):
        return _streamed_batches(data.train_files, data.train_labels, data.image_size,
                                 batch_size, seed, augment, share)
    return _shuffled_batches(data.train_images, data.train_labels, batch_size, seed, augment,
                             share)


def test_sample_dataset(data, batch_size, seed):
    """Endless shuffled test batches, for a quick test estimate every few training steps."""
    if isinstance(data, image_tree.ImageTree):
        return _streamed_batches(data.test_files, data.test_labels, data.image_size, batch_size,
                                 seed, augment=False)
    return _shuffled_batches(data.test_images, data.test_labels, batch_size, seed, augment=False)


def eval_dataset(data, batch_size, split="test"):
    """The `split` ("test" or "train") exactly once, in order, as evaluation sees it (no
    augmentation; ImageNet's central crops); the last batch may be smaller."""
    labels = getattr(data, f"{split}_labels")
    indices = tf.data.Dataset.range(len(labels))
    if isinstance(data, image_tree.ImageTree):
        examples = indices.map(_file_gatherer(getattr(data, f"{split}_files"), labels))
        batches = _central_crops(examples, data.image_size).batch(batch_size)
    else:
        gather = _gatherer(getattr(data, f"{split}_images"), labels)
        batches = indices.batch(batch_size).map(gather, num_parallel_calls=AUTOTUNE,
                                                deterministic=True)
    return _float_batches(batches)


# Images in memory -------------------------------------------------------------------------------

def _shuffled_batches(images, labels, batch_size, seed, augment, share=None):
    """Shuffles indices rather than images, so the shuffle buffer (saved in checkpoints) stays small."""
    num_examples = len(labels)
    indices = (tf.data.Dataset.range(num_examples)
               .shuffle(num_examples, seed=seed, reshuffle_each_iteration=True)
               .repeat()
               .batch(batch_size, drop_remainder=True))
    batches = _worker_share(indices, share).map(_gatherer(images, labels),
                                                num_parallel_calls=AUTOTUNE, deterministic=True)
    if augment:
        batches = tf.data.Dataset.zip(batches, _worker_share(_seeds(seed), share)).map(
            _augment, num_parallel_calls=AUTOTUNE, deterministic=True)
    return _float_batches(batches)


def _worker_share(stream, share, elements_per_batch=1):
    """This worker's part of `stream` (`elements_per_batch` elements per batch): of the
    `share.replicas` consecutive batches of every pass, its `share.local_replicas` ones. Index and
    seed streams are shared out alike, so an example keeps its augmentation draw whatever the
    number of workers. One worker: `stream` itself, so its checkpoints keep their layout."""
    if share is None or share.workers == 1:
        return stream
    group = elements_per_batch * share.local_replicas
    return stream.batch(group).shard(share.workers, share.worker_index).unbatch()


def _gatherer(images, labels):
    """Batches of a split held in memory, gathered from the numpy arrays it was read into. The
    images stay there: a tf.constant of them would be a copy (two, measured, while it is made),
    and every dataset built on it held another one."""
    images, labels = np.asarray(images), np.asarray(labels)

    def gather_arrays(indices):
        return images[indices], labels[indices].astype(np.int32, copy=False)

    def gather(indices):
        batch_images, batch_labels = tf.numpy_function(
            gather_arrays, [indices], [tf.as_dtype(images.dtype), tf.int32], stateful=False)
        return (tf.ensure_shape(batch_images, indices.shape.concatenate(images.shape[1:])),
                tf.ensure_shape(batch_labels, indices.shape))
    return gather


def _file_gatherer(files, labels):
    """(path, label) of an example streamed from files."""
    files = tf.constant(files)
    labels = tf.constant(labels, dtype=tf.int32)

    def gather(index):
        return tf.gather(files, index), tf.gather(labels, index)
    return gather


def _seeds(seed):
    """An endless stream of seeds for stateless random ops, itself seeded by `seed`."""
    return tf.data.Dataset.random(seed=seed).batch(2)


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


def _float_batches(batches):
    """uint8 batches scaled to float32 in [0, 1], prefetched."""
    return batches.map(_to_float, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)


def _to_float(images, labels):
    return scale_images(images), labels


def scale_images(images):
    """uint8 pixels as the networks take them: float32 in [0, 1]."""
    return tf.cast(images, tf.float32) / 255.0


# Images streamed from files ---------------------------------------------------------------------

def _streamed_batches(files, labels, image_size, batch_size, seed, augment, share=None):
    """Reads and crops one file per example, in parallel but in a fixed order.

    Symbolic checkpointing makes a checkpoint hold the positions of the index and seed streams,
    not the decoded images waiting in the pipeline's buffers (38 MB per float batch of 64 at
    224 px); restoring decodes those again.
    """
    indices = _worker_share(_permuted_indices(len(labels), seed), share, batch_size)
    examples = indices.map(_file_gatherer(files, labels))
    if augment:
        random_crop = functools.partial(_random_crop, image_size=image_size)
        seeds = _worker_share(_seeds(seed), share, batch_size)
        examples = tf.data.Dataset.zip(examples, seeds).map(
            random_crop, num_parallel_calls=AUTOTUNE, deterministic=True)
    else:
        examples = _central_crops(examples, image_size)
    options = tf.data.Options()
    options.experimental_symbolic_checkpoint = True
    return _float_batches(examples.batch(batch_size, drop_remainder=True)).with_options(options)


def _permuted_indices(num_examples, seed):
    """Endless example indices, a new permutation every epoch, each index computed from its
    position alone. A shuffle buffer is saved whole in every checkpoint: for ImageNet's 1.28 M
    indices that is 250 MB, which took 20-60 s to write and over a minute to read back on 2 CPU
    cores; this stream's state is one counter."""
    def index(position):
        epoch_seed = tf.stack([tf.constant(seed, tf.int64), position // num_examples])
        return tf.random.experimental.index_shuffle(position % num_examples, epoch_seed,
                                                    max_index=num_examples - 1)
    return tf.data.Dataset.counter().map(index)


def _random_crop(example, seed, image_size):
    """The training crop: a random box of the image (CROP_AREA_RANGE, CROP_ASPECT_RANGE) resized
    to image_size x image_size, flipped left-right half the time."""
    path, label = example
    box_seed, flip_seed = tf.unstack(tf.random.split(seed))
    box = _decode_random_box(tf.io.read_file(path), box_seed)
    image = tf.image.resize(box, [image_size, image_size])
    return _to_uint8(tf.image.stateless_random_flip_left_right(image, flip_seed)), label


def _decode_random_box(contents, seed):
    """Decodes only the pixels of a random box of a JPEG; other formats are decoded whole and then
    cropped (ILSVRC-2012 train holds a PNG under a .JPEG name)."""
    def window(shape):
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape, bounding_boxes=tf.zeros([1, 0, 4]), seed=seed, min_object_covered=0.0,
            aspect_ratio_range=CROP_ASPECT_RANGE, area_range=CROP_AREA_RANGE,
            use_image_if_no_bounding_boxes=True)
        return tf.stack([begin[0], begin[1], size[0], size[1]])

    def jpeg():
        return tf.io.decode_and_crop_jpeg(contents, window(tf.io.extract_jpeg_shape(contents)),
                                          channels=3)

    def other_format():
        image = _decode(contents)
        top, left, height, width = tf.unstack(window(tf.shape(image)))
        return image[top:top + height, left:left + width]
    return tf.cond(tf.io.is_jpeg(contents), jpeg, other_format)


def _central_crops(examples, image_size):
    """(path, label) examples -> (evaluation crop, label), decoded in parallel, in order."""
    central_crop = functools.partial(_central_crop, image_size=image_size)
    return examples.map(central_crop, num_parallel_calls=AUTOTUNE, deterministic=True)


def _central_crop(path, label, image_size):
    """The evaluation crop: the shorter side resized to image_size / CENTRAL_FRACTION, then the
    central image_size x image_size square."""
    image = _decode(tf.io.read_file(path))
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = image_size / CENTRAL_FRACTION / tf.reduce_min(shape)
    resized_shape = tf.cast(tf.round(shape * scale), tf.int32)
    resized = tf.image.resize(image, resized_shape)
    top, left = tf.unstack((resized_shape - image_size) // 2)
    crop = resized[top:top + image_size, left:left + image_size]
    return _to_uint8(tf.ensure_shape(crop, [image_size, image_size, 3])), label


def _decode(contents):
    """RGB whatever the file holds (grayscale and CMYK JPEGs included)."""
    return tf.io.decode_image(contents, channels=3, expand_animations=False)


def _to_uint8(image):
    """Back to uint8 after resizing, so streamed batches are as small as those from memory and
    scaled by the same _to_float."""
    return tf.saturate_cast(tf.round(image), tf.uint8)
