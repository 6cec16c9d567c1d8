"""The paper's recipe in trainer.py: zero-init residual gamma, the step schedule and warm-up,
weight decay as an L2 term, GN sized by channels per group, and their one-line errors."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import input_ops
import train_flags
import model as model_lib
import ops
import schedules
import trainer
import updates
from test_train_eval import cli_error, train

SAMPLE = input_ops.load("sample", "./datasets")[1]


# --zero_init_residual ---------------------------------------------------------------------------

@pytest.mark.parametrize("norm_type", ["batch", "group"])
def test_zero_init_starts_the_last_norm_of_each_residual_block_at_zero(norm_type):
    net = model_lib.build_model("resnet20", (28, 28, 1), 10, norm_type, groups=8,
                                zero_init_residual=True)
    gammas = {layer.name: layer.gamma.numpy() for layer in net.layers
              if isinstance(layer, (ops.GroupNorm, keras.layers.BatchNormalization))}
    last = [name for name in gammas if name.endswith("_b_norm")]
    assert len(last) == 9  # one per block of resnet20
    for name, gamma in gammas.items():
        np.testing.assert_array_equal(gamma, 0.0 if name in last else 1.0, err_msg=name)


def test_without_zero_init_every_gamma_starts_at_one():
    net = model_lib.build_model("resnet20", (28, 28, 1), 10, "group", groups=8)
    for layer in net.layers:
        if isinstance(layer, ops.GroupNorm):
            np.testing.assert_array_equal(layer.gamma.numpy(), 1.0, err_msg=layer.name)


@pytest.mark.parametrize("flags, says", [
    (["--zero_init_residual"], "--model conv has no residual blocks"),
    (["--zero_init_residual", "--model", "resnet20", "--norm_type", "none"],
     "--norm_type none has none"),
])
def test_zero_init_without_residual_norms_is_refused(flags, says, tmp_path, capsys):
    error = cli_error(trainer.main, [*flags, "--train_dir", str(tmp_path)], capsys)
    assert says in error
    assert not list(tmp_path.iterdir()), "nothing is left behind"


# --lr_schedule step, --warmup_steps -------------------------------------------------------------

def rates(schedule, steps):
    return [float(schedule(step)) for step in steps]


def test_step_schedule_divides_by_ten_at_30_60_and_90_percent():
    schedule = schedules.build("step", 0.1, 100)
    np.testing.assert_allclose(rates(schedule, [0, 29, 30, 59, 60, 89, 90, 99]),
                               [0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4], rtol=1e-6)
    # 703 updates (3 epochs of 60,000 examples in updates of 256): boundaries 211, 422, 633.
    schedule = schedules.build("step", 0.4, 703)
    np.testing.assert_allclose(rates(schedule, [210, 211, 421, 422, 632, 633]),
                               [0.4, 0.04, 0.04, 0.004, 0.004, 4e-4], rtol=1e-6)


def test_warmup_ramps_linearly_to_the_schedule():
    cosine = schedules.build("cosine", 0.1, 100)
    warm = schedules.build("cosine", 0.1, 100, warmup_steps=4)
    np.testing.assert_allclose(rates(warm, range(4)),
                               [r * k / 4 for r, k in zip(rates(cosine, range(4)), (1, 2, 3, 4))],
                               rtol=1e-6)
    np.testing.assert_allclose(rates(warm, [4, 50, 99]), rates(cosine, [4, 50, 99]), rtol=1e-6)
    step = schedules.build("step", 0.1, 100, warmup_steps=10)
    np.testing.assert_allclose(rates(step, [0, 9, 10, 30]), [0.01, 0.1, 0.1, 0.01], rtol=1e-6)


def test_schedules_survive_keras_serialization():
    schedule = schedules.build("step", 0.1, 100, warmup_steps=10)
    copy = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert rates(copy, [0, 9, 30, 95]) == rates(schedule, [0, 9, 30, 95])


def test_trainer_logs_the_step_schedule_and_warmup(tmp_path):
    """The learning rate TensorBoard shows for each update of a real run."""
    from test_train_eval import read_events

    run_dir = train(tmp_path, "--lr_schedule", "step", "--warmup_steps", "2",
                    "--learning_rate", "0.01", "--max_training_step", "10",
                    "--write_summary_step", "1")
    logged = read_events(f"{run_dir}/train")["learning_rate"]
    # Update k (1-based) runs at the schedule's rate of step k - 1.
    expected = {1: 0.005, 2: 0.01, 3: 0.01, 4: 1e-3, 6: 1e-3, 7: 1e-4, 9: 1e-4, 10: 1e-5}
    for step, rate in expected.items():
        assert logged[step] == pytest.approx(rate, rel=1e-6), step


@pytest.mark.parametrize("flags, says", [
    (["--warmup_steps", "7"], "--warmup_steps must be between 0 and --max_training_step 6"),
    (["--weight_decay=-1e-4"], "--weight_decay must be a number >= 0"),
    (["--weight_decay", "nan"], "--weight_decay must be a number >= 0"),
    (["--lr_schedule", "linear"], "invalid choice: 'linear'"),
])
def test_bad_schedule_and_decay_flags_are_refused(flags, says, tmp_path, capsys):
    from test_train_eval import TINY

    error = cli_error(trainer.main, [*TINY, *flags, "--train_dir", str(tmp_path)], capsys)
    assert says in error


# --weight_decay ---------------------------------------------------------------------------------

def first_update(*extra):
    """(weights before, weights after) one update of the conv net on the sample: batch 16, no
    dropout, the same examples whatever the `extra` flags."""
    config = train_flags.parse_args(["--batch_size", "16", "--max_batch_size", "16",
                                     "--dropout", "0", "--max_training_step", "10", *extra])
    config.model, config.augment = "conv", False
    tf.keras.utils.set_random_seed(0)
    run = updates.Updater(config, SAMPLE)
    before = [v.numpy() for v in run.model.trainable_variables]
    run.train_step()
    return before, [v.numpy() for v in run.model.trainable_variables]


def test_weight_decay_adds_its_l2_gradient_to_a_momentum_update():
    """Momentum SGD's first update is w - lr (g + W w): with the decay it moves every weight,
    gamma and beta included, by a further -lr W w."""
    rate, decay = 0.05, 0.01
    flags = ["--optimizer", "momentum", "--learning_rate", str(rate)]
    before, plain = first_update(*flags)
    _, decayed = first_update(*flags, "--weight_decay", str(decay))
    assert len(before) == 24  # 4 convs, 4 GN, 4 dense: kernel and bias, or gamma and beta
    for w, p, d in zip(before, plain, decayed):
        np.testing.assert_allclose(d - p, -rate * decay * w, rtol=1e-3, atol=1e-8)


def test_weight_decay_with_adam_is_l2_in_the_gradient_not_decoupled():
    """Adam's first update is -lr g' / (|g'| + eps / sqrt(1 - beta_2)) per weight (Keras's and
    TensorFlow's bias-corrected form), g' = g + W w the gradient with the L2 term, clipped to
    global norm 20 as a whole (AdamW would instead subtract lr W w after the plain update). g is
    read off a momentum update of the same examples."""
    rate, decay = 1e-3, 0.5
    before, momentum = first_update("--optimizer", "momentum", "--learning_rate", "1.0")
    _, adam = first_update("--learning_rate", str(rate), "--weight_decay", str(decay))
    # Momentum's first update is w - 1.0 x g (its g is below the clipping norm: the test above).
    gradients = [(w - m) + decay * w for w, m in zip(before, momentum)]
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in gradients))
    assert norm > 20  # the L2 term takes the gradient over the clipping norm: clipping is tested
    for w, g, a in zip(before, gradients, adam):
        clipped = g * 20 / norm
        expected = w - rate * clipped / (np.abs(clipped) + 1e-7 / np.sqrt(1 - 0.999))
        np.testing.assert_allclose(a, expected, rtol=1e-4, atol=2e-7)


# --channels_per_group ---------------------------------------------------------------------------

def test_channels_per_group_sizes_each_layers_groups():
    net = model_lib.build_model("resnet20", (28, 28, 1), 10, "group", channels_per_group=4)
    groups = {layer.input.shape[-1]: layer.groups for layer in net.layers
              if isinstance(layer, ops.GroupNorm)}
    assert groups == {16: 4, 32: 8, 64: 16}


def test_group_norm_by_channels_per_group_equals_the_same_groups():
    x = tf.random.stateless_normal([2, 5, 5, 24], seed=[1, 2])
    by_width = ops.GroupNorm(channels_per_group=6)
    by_count = ops.GroupNorm(groups=4)
    np.testing.assert_array_equal(by_width(x).numpy(), by_count(x).numpy())
    assert by_width.groups == 4
    config = by_width.get_config()
    assert config["groups"] is None and config["channels_per_group"] == 6
    copy = ops.GroupNorm.from_config(config)
    np.testing.assert_array_equal(copy(x).numpy(), by_count(x).numpy())


@pytest.mark.parametrize("arguments, says", [
    (dict(groups=4, channels_per_group=4), "pass groups or channels_per_group, not both"),
    (dict(channels_per_group=0), "channels_per_group must be a positive integer"),
])
def test_group_norm_refuses_bad_channels_per_group(arguments, says):
    with pytest.raises(ValueError, match=says):
        ops.GroupNorm(**arguments)


def test_channels_per_group_that_does_not_divide_is_refused():
    with pytest.raises(ValueError, match="C=24 channels do not split into groups of "
                                         "channels_per_group=5"):
        ops.GroupNorm(channels_per_group=5)(tf.zeros([1, 2, 2, 24]))


@pytest.mark.parametrize("flags, says", [
    (["--groups", "4", "--channels_per_group", "4"],
     "--groups 4 and --channels_per_group 4 both size GN's groups — pass one of them"),
    (["--channels_per_group", "48"], "pass it as --channels_per_group"),
    (["--channels_per_group", "0"], "--channels_per_group must be positive"),
])
def test_bad_channels_per_group_flags_are_refused(flags, says, tmp_path, capsys):
    error = cli_error(trainer.main, [*flags, "--train_dir", str(tmp_path)], capsys)
    assert says in error


def test_a_run_by_channels_per_group_records_it_and_evaluates(tmp_path, capsys):
    """config.json records the flag (groups: null), and evaler.py rebuilds the same network."""
    import json

    import evaler

    run_dir = train(tmp_path, "--channels_per_group", "16")
    config = json.load(open(f"{run_dir}/config.json"))
    assert config["channels_per_group"] == 16 and config["groups"] is None
    evaler.main(["--checkpoint", run_dir, "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 6 and 0 <= result["accuracy"] <= 1
