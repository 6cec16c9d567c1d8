"""--pass_size: a pass of several --batch_size batches computes what as many passes compute, BN
normalizing each batch by its own statistics (ghost batches)."""
import glob
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import input_ops
import study
import study_report
import train_flags
import updates
from conftest import MOMENTUM_SGD, assert_trained_alike
from test_train_eval import checkpoint_values, cli_error, ctrl_c_after_step
import trainer

SAMPLE = input_ops.load("sample", "./datasets")[1]


def trained(count, *flags):
    """The conv net's variables (weights and BN's moving statistics) before and after `count`
    updates on the sample, no dropout, no augmentation: the same examples whatever the pass
    size."""
    config = train_flags.parse_args(["--dropout", "0", "--max_training_step", "10", *flags])
    config.model, config.augment = "conv", False
    run = updates.Updater(config, SAMPLE)
    before = {v.path: v.numpy() for v in run.model.weights}
    for _ in range(count):
        run.train_step()
    return run, before, {v.path: v.numpy() for v in run.model.weights}


def test_batch_norm_over_ghost_batches_trains_as_separate_passes(kink_free_network):
    """A network without kinks, trained by momentum SGD: the two compute the same sums in
    another order (conftest.py's `without_kinks` says why that takes both)."""
    flags = ["--norm_type", "batch", "--batch_size", "2", "--max_batch_size", "16",
             *MOMENTUM_SGD]
    sequential_run, start, sequential = trained(3, *flags)
    ghosted_run, _, ghosted = trained(3, *flags, "--pass_size", "16")
    assert (sequential_run.passes, ghosted_run.passes) == (8, 1)
    assert "16 examples (ghost batches of 2), 1 pass per update" in ghosted_run.describe_batches()
    assert_trained_alike(ghosted, sequential, start)


def test_group_norm_ignores_the_split():
    """GN at batch 1 with --pass_size max makes one pass of the whole update, as batch 64 does."""
    common = ["--norm_type", "group", "--max_batch_size", "64", "--groups", "8"]
    _, _, whole = trained(2, *common, "--batch_size", "64")
    run, _, ghosted = trained(2, *common, "--batch_size", "1", "--pass_size", "max")
    assert run.passes == 1 and run.pass_size == 64
    for name, value in whole.items():
        np.testing.assert_allclose(ghosted[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


def test_largest_fitting_pass_is_whole_batches_dividing_the_share():
    # a budget of 20 examples: 16 is the largest multiple of 2 dividing 64 within it
    assert updates.largest_fitting_pass(64, 2, 1000, 20_000) == 16
    assert updates.largest_fitting_pass(64, 2, 1000, 64_000) == 64
    assert updates.largest_fitting_pass(48, 3, 1000, 47_000) == 24
    assert updates.largest_fitting_pass(64, 2, 1000, 10) == 2  # not even one batch: one batch


def test_activation_estimate_counts_each_layer_output_twice():
    inputs = keras.Input((4, 4, 1))
    x = keras.layers.Conv2D(2, 3, padding="same")(inputs)  # 32 values
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(x))  # 32, then 3
    model = keras.Model(inputs, outputs)
    assert updates.activation_bytes_per_example(model) == 2 * 4 * (16 + 32 + 32 + 3)


def max_pass_run(monkeypatch, examples_that_fit, *flags):
    """An Updater for --pass_size max at batch 2, updates of 64, on a machine whose free memory
    holds `examples_that_fit` examples in PASS_MEMORY_SHARE of it (None: a device that does not
    say)."""
    config = train_flags.parse_args(["--model", "conv", "--batch_size", "2", "--max_batch_size",
                                     "64", "--pass_size", "max", *flags])
    model = updates.build_model(config, SAMPLE, 64)
    per_example = updates.activation_bytes_per_example(model)
    free = examples_that_fit and examples_that_fit * per_example / updates.PASS_MEMORY_SHARE
    monkeypatch.setattr(updates, "free_memory_bytes", lambda: free)
    return updates.Updater(config, SAMPLE)


def test_pass_size_max_takes_what_fits_in_the_free_memory(monkeypatch):
    bounded = max_pass_run(monkeypatch, 20)
    assert (bounded.pass_size, bounded.passes) == (16, 4)
    per_example = updates.activation_bytes_per_example(bounded.model)
    free = 20 * per_example / updates.PASS_MEMORY_SHARE
    assert bounded.describe_batches().endswith(
        "(--pass_size max: 16 of the replica's 64 examples, what fits in 50% of the "
        f"{updates.memory_text(free)} free (~{updates.memory_text(per_example)} of activations "
        "an example, by estimate))")
    whole = max_pass_run(monkeypatch, 64)
    assert (whole.pass_size, whole.passes) == (64, 1)
    assert "(--pass_size max: the whole update, ~" in whole.describe_batches()
    unknown = max_pass_run(monkeypatch, None)
    assert (unknown.pass_size, unknown.passes) == (64, 1)
    assert "unbounded, as TensorFlow does not tell this device's free memory" in \
        unknown.describe_batches()


def run_dir_of(train_dir, *flags):
    """trainer.main with `flags`, writing its run into `train_dir`; the run directory."""
    trainer.main([*flags, "--train_dir", str(train_dir)])
    (run_dir,) = glob.glob(str(train_dir / "*"))
    return run_dir


def test_continuing_a_run_keeps_the_pass_size_max_resolved_to(tmp_path, monkeypatch):
    """4 updates straight == 2, Ctrl-C, then 2 more from the checkpoint on a machine with more
    memory: the continued run keeps passes of 16 (and its input stream of them)."""
    flags = ["--model", "conv", "--norm_type", "batch", "--batch_size", "2",
             "--max_batch_size", "64", "--pass_size", "max", "--max_training_step", "4"]
    model = updates.build_model(train_flags.parse_args(flags), SAMPLE, 64)
    fitting_16 = 16 * updates.activation_bytes_per_example(model) / updates.PASS_MEMORY_SHARE
    monkeypatch.setattr(updates, "free_memory_bytes", lambda: fitting_16)
    straight = run_dir_of(tmp_path / "straight", *flags)
    with ctrl_c_after_step(2, monkeypatch), pytest.raises(SystemExit):
        run_dir_of(tmp_path / "first", *flags)
    (first,) = glob.glob(str(tmp_path / "first" / "*"))
    monkeypatch.setattr(updates, "free_memory_bytes", lambda: 1000 * fitting_16)
    second = run_dir_of(tmp_path / "second", "--checkpoint", first, "--max_training_step", "4")
    with open(os.path.join(second, "config.json")) as f:
        config = json.load(f)
    assert (config["examples_per_pass"], config["accumulation_steps"]) == (16, 4)
    expected = checkpoint_values(tf.train.latest_checkpoint(straight))
    got = checkpoint_values(tf.train.latest_checkpoint(second))
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "4", "--pass_size", "6"],
     "--pass_size 6 is not a multiple of --batch_size 4 — pass a multiple of it, or leave "
     "--pass_size out"),
    (["--batch_size", "4", "--pass_size", "8", "--norm_type", "sync_batch"],
     "--norm_type sync_batch takes its statistics over the replicas' batches and has no ghost "
     "batches — leave --pass_size out, or use --norm_type batch"),
    (["--batch_size", "4", "--pass_size", "max", "--no_accumulate"],
     "--no_accumulate makes every update one batch of --batch_size, which leaves nothing to pass "
     "at once — leave --pass_size out, or drop --no_accumulate"),
    (["--batch_size", "4", "--max_batch_size", "64", "--pass_size", "24"],
     "--pass_size 24 does not divide updates of --max_batch_size 64 over 1 replica(s) — pass a "
     "--pass_size that does, or max, or leave it out"),
    (["--batch_size", "4", "--max_batch_size", "64", "--pass_size", "128"],
     "--pass_size 128 does not divide updates of --max_batch_size 64 over 1 replica(s) — pass a "
     "--pass_size that does, or max, or leave it out"),
])
def test_bad_pass_sizes_are_one_line_errors(flags, message, tmp_path, capsys):
    error = cli_error(trainer.main, [*flags, "--train_dir", str(tmp_path)], capsys)
    assert error == f"error: {message}"


def test_pass_size_is_a_number_or_max(capsys):
    with pytest.raises(SystemExit):
        train_flags.parse_args(["--pass_size", "all"])
    assert "'all' is neither a positive number of examples nor max" in capsys.readouterr().err


def test_a_study_with_ghost_batches_gets_its_own_directory_and_says_so():
    config, _ = study.check_trainer_flags(["--pass_size", "max", "--model", "conv"])
    assert study.default_study_dir(config) == os.path.join("studies", "sample_conv_pass_max")
    settings = {"max_training_step": 100, "max_batch_size": 64, "pass_size": "max"}
    assert study_report.protocol_title({"name": "fixed_update"}, settings) == \
        "fixed update (100 x 64 examples), ghost batches, one pass per update"
    assert study_report.protocol_title({"name": "fixed_update"}, {**settings, "pass_size": 16}) \
        .endswith(", ghost batches, passes of 16")
