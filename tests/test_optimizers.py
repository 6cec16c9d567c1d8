"""kernels/optimizers.py: Keras's Adam and momentum SGD on TensorFlow's fused update ops give
Keras's numbers, keep Keras's checkpoints and make a much smaller graph."""
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from kernels import optimizers

SHAPES = [(3, 3, 16, 32), (32,), (1000,), (7, 130)]


def keras_and_fused(name):
    """(Keras's optimizer, ours) as trainer.py builds them: cosine decay, global clipnorm 20."""
    schedule = keras.optimizers.schedules.CosineDecay(1e-2, 50)
    if name == "adam":
        return (keras.optimizers.Adam(schedule, global_clipnorm=20.0),
                optimizers.Adam(schedule, global_clipnorm=20.0))
    return (keras.optimizers.SGD(schedule, momentum=0.9, global_clipnorm=20.0),
            optimizers.MomentumSGD(schedule, momentum=0.9, global_clipnorm=20.0))


def make_variables():
    rng = np.random.default_rng(0)
    return [keras.Variable(rng.standard_normal(shape).astype("float32")) for shape in SHAPES]


def traced_update(optimizer, variables):
    @tf.function
    def update(gradients):
        optimizer.apply_gradients(zip(gradients, variables))
    return update


def train(optimizer, updates=20):
    """The variables and the optimizer's own variables after `updates` traced updates on
    gradients large enough for the clipping to act."""
    variables = make_variables()
    optimizer.build(variables)
    update = traced_update(optimizer, variables)
    rng = np.random.default_rng(1)
    for _ in range(updates):
        update([tf.constant(10 * rng.standard_normal(shape).astype("float32"))
                for shape in SHAPES])
    return [v.numpy() for v in variables + list(optimizer.variables)]


def test_momentum_sgd_gives_keras_numbers_bit_for_bit():
    reference, fused = keras_and_fused("momentum")
    for ours, theirs in zip(train(fused), train(reference)):
        np.testing.assert_array_equal(ours, theirs)


def test_adam_gives_keras_numbers_to_float32_rounding():
    reference, fused = keras_and_fused("adam")
    start = make_variables()
    ours, theirs = train(fused), train(reference)
    for before, mine, keras_value in zip(start, ours, theirs):
        assert np.abs(mine - before.numpy()).max() > 0.05  # the updates moved the variables
        np.testing.assert_allclose(mine, keras_value, rtol=1e-5, atol=1e-6)
    for mine, keras_value in zip(ours[len(SHAPES):], theirs[len(SHAPES):]):  # m, v, iterations
        np.testing.assert_allclose(mine, keras_value, rtol=1e-5, atol=1e-7)


def update_ops(optimizer, count):
    """The ops of one traced update of `count` small variables."""
    variables = [keras.Variable(np.ones(5, np.float32)) for _ in range(count)]
    optimizer.build(variables)
    gradients = [tf.zeros(5) for _ in variables]
    return len(traced_update(optimizer, variables).get_concrete_function(gradients).graph
               .get_operations())


@pytest.mark.parametrize("name", ["adam", "momentum"])
def test_the_update_graph_is_a_fraction_of_keras(name):
    """What start-up time the optimizers save: the ops each variable adds to one traced update
    (Adam: about 10 against 44; momentum SGD: 9 against 16, clipping included)."""
    per_variable = [(update_ops(keras_and_fused(name)[i], 40)
                     - update_ops(keras_and_fused(name)[i], 4)) / 36 for i in (0, 1)]
    keras_ops, our_ops = per_variable
    assert our_ops < 2 / 3 * keras_ops, per_variable


def checkpoint_names(prefix):
    """The names of a checkpoint's objects, variables or not."""
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    reader = tf.train.load_checkpoint(prefix)
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    return {child.local_name for node in graph.nodes for child in node.children}


@pytest.mark.parametrize("name", ["adam", "momentum"])
def test_checkpoints_of_keras_optimizers_continue_exactly(name, tmp_path):
    """A run checkpointed with Keras's optimizer continues with ours from the same state, and
    ours, once it has updated, writes checkpoints of the same objects as Keras's."""
    reference, fused = keras_and_fused(name)
    variables = make_variables()
    reference.build(variables)
    gradients = [tf.ones(shape) for shape in SHAPES]
    traced_update(reference, variables)(gradients)
    prefix = tf.train.Checkpoint(optimizer=reference, variables=variables).save(
        str(tmp_path / "keras"))
    restored = make_variables()
    fused.build(restored)
    tf.train.Checkpoint(optimizer=fused, variables=restored).restore(
        prefix).assert_consumed()
    for mine, theirs in zip(fused.variables, reference.variables):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    traced_update(fused, restored)(gradients)
    ours_prefix = tf.train.Checkpoint(optimizer=fused, variables=restored).save(
        str(tmp_path / "ours"))
    assert checkpoint_names(ours_prefix) == checkpoint_names(prefix)


def test_momentum_sgd_refuses_no_momentum():
    with pytest.raises(ValueError, match="momentum must be positive, not 0"):
        optimizers.MomentumSGD(0.1, momentum=0)
