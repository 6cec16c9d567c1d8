"""--pass_size: a pass of several --batch_size batches computes what as many passes compute, BN
normalizing each batch by its own statistics (ghost batches)."""
import os

import numpy as np
import pytest

import input_ops
import study
import study_report
import train_flags
import updates
from test_train_eval import cli_error
import trainer

SAMPLE = input_ops.load("sample", "./datasets")[1]


def trained(count, *flags):
    """The conv net's variables (weights and BN's moving statistics) after `count` updates on
    the sample, no dropout, no augmentation: the same examples whatever the pass size."""
    config = train_flags.parse_args(["--dropout", "0", "--max_training_step", "10", *flags])
    config.model, config.augment = "conv", False
    run = updates.Updater(config, SAMPLE)
    for _ in range(count):
        run.train_step()
    return run, {v.path: v.numpy() for v in run.model.weights}


def test_batch_norm_over_ghost_batches_trains_as_separate_passes():
    """Momentum SGD, whose update is linear in the gradient: Adam's first updates are about
    lr x sign(gradient), which turns float32 rounding in a near-zero gradient into a full step."""
    flags = ["--norm_type", "batch", "--batch_size", "2", "--max_batch_size", "16",
             "--optimizer", "momentum", "--learning_rate", "0.01"]
    sequential_run, sequential = trained(3, *flags)
    ghosted_run, ghosted = trained(3, *flags, "--pass_size", "16")
    assert (sequential_run.passes, ghosted_run.passes) == (8, 1)
    assert "16 examples (ghost batches of 2), 1 pass per update" in ghosted_run.describe_batches()
    assert sequential.keys() == ghosted.keys()
    for name, value in sequential.items():
        moving = "moving" in name
        np.testing.assert_allclose(ghosted[name], value, rtol=1e-6 if moving else 1e-5,
                                   atol=1e-6 if moving else 1e-6, err_msg=name)


def test_group_norm_ignores_the_split():
    """GN at batch 1 with --pass_size max makes one pass of the whole update, as batch 64 does."""
    common = ["--norm_type", "group", "--max_batch_size", "64", "--groups", "8"]
    _, whole = trained(2, *common, "--batch_size", "64")
    run, ghosted = trained(2, *common, "--batch_size", "1", "--pass_size", "max")
    assert run.passes == 1 and run.pass_size == 64
    for name, value in whole.items():
        np.testing.assert_allclose(ghosted[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


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
