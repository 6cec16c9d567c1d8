"""Faults a run must survive or report in one line: divergence (a non-finite loss, gradient or
weight) and learning rates that cannot work."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import trainer
from test_train_eval import checkpoint_values, cli_error

TINY = ["--model", "conv", "--groups", "8", "--batch_size", "16", "--max_batch_size", "16",
        "--log_step", "1", "--test_sample_step", "100", "--write_summary_step", "100"]


@pytest.mark.parametrize("rate", ["-1", "0", "nan", "inf"])
def test_learning_rate_must_be_finite_and_positive(rate, tmp_path, capsys):
    error = cli_error(trainer.main, [*TINY, "--learning_rate", rate,
                                     "--train_dir", str(tmp_path)], capsys)
    assert f"--learning_rate must be a positive number, got {float(rate)}" in error
    assert os.listdir(tmp_path) == []


def test_divergence_stops_at_its_step_and_names_the_last_finite_checkpoint(tmp_path, capsys):
    """SGD at learning rate 1e9 overflows within a few updates: the run stops there with one
    line, its checkpoints hold finite weights only, and it writes no result.json."""
    run_dir = tmp_path / "run"
    error = cli_error(trainer.main, [*TINY, "--optimizer", "momentum", "--learning_rate", "1e9",
                                     "--max_training_step", "50", "--ckpt_save_step", "1",
                                     "--run_dir", str(run_dir)], capsys)
    assert error.startswith("error: training diverged at step ") or \
        error.startswith("error: the weights are not finite at step ")
    step = int(error.split(" at step ")[1].split()[0])
    assert step < 50
    latest = tf.train.latest_checkpoint(str(run_dir))
    assert latest == str(run_dir / f"model-{step - 1}") and f"{latest}, holds finite" in error
    for name, value in checkpoint_values(latest).items():
        assert np.isfinite(value).all(), name
    assert not os.path.exists(run_dir / "result.json")


def test_divergence_before_any_checkpoint_says_so(tmp_path, capsys):
    error = cli_error(trainer.main, [*TINY, "--optimizer", "momentum", "--learning_rate", "1e9",
                                     "--max_training_step", "50", "--ckpt_save_step", "1000",
                                     "--run_dir", str(tmp_path / "run")], capsys)
    assert error.endswith("no checkpoint was saved; lower --learning_rate and start again")
