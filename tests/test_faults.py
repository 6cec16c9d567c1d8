"""Faults a run must survive or report in one line: divergence (a non-finite loss, gradient or
weight) and learning rates that cannot work."""
import json
import logging
import os

import numpy as np
import pytest
import tensorflow as tf

import evaler
import trainer
import util
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


def truncate(prefix):
    data = f"{prefix}.data-00000-of-00001"
    with open(data, "rb") as f:
        kept = f.read()[:100_000]
    with open(data, "wb") as f:
        f.write(kept)


@pytest.fixture
def run_with_broken_latest(tmp_path):
    """A 6-update run with checkpoints at 3 and 6; model-6's data file is then cut short.
    Returns (run directory, the model-6 values it held)."""
    run_dir = tmp_path / "run"
    trainer.main([*TINY, "--max_training_step", "6", "--ckpt_save_step", "3",
                  "--run_dir", str(run_dir)])
    intact = checkpoint_values(str(run_dir / "model-6"))
    truncate(str(run_dir / "model-6"))
    return run_dir, intact


def test_run_dir_falls_back_to_the_newest_readable_checkpoint(run_with_broken_latest,
                                                             monkeypatch):
    """Continuing in place skips the cut-short model-6 with a warning, continues from model-3
    and ends with the weights model-6 held."""
    run_dir, intact = run_with_broken_latest
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    monkeypatch.setattr(util.log, "handlers", [handler])
    trainer.main([*TINY, "--max_training_step", "6", "--ckpt_save_step", "3",
                  "--run_dir", str(run_dir)])
    assert any(f"skipping checkpoint {run_dir}/model-6, which cannot be read" in line
               for line in lines)
    assert f"continuing from {run_dir}/model-3 at step 3" in lines
    for name, value in checkpoint_values(str(run_dir / "model-6")).items():
        np.testing.assert_array_equal(value, intact[name], err_msg=name)


def test_broken_checkpoint_is_a_one_line_error_and_evaler_all_skips_it(run_with_broken_latest,
                                                                      tmp_path, capsys):
    run_dir, _ = run_with_broken_latest
    broken = str(run_dir / "model-6")
    message = f"checkpoint {broken} cannot be read (Read less bytes than requested)"
    assert message in cli_error(trainer.main, [*TINY, "--checkpoint", broken,
                                               "--train_dir", str(tmp_path / "new")], capsys)
    assert not os.path.exists(tmp_path / "new")
    assert message in cli_error(evaler.main, ["--checkpoint", broken], capsys)
    evaler.main(["--checkpoint", str(run_dir), "--all", "--json"])
    output = capsys.readouterr()
    assert [result["step"] for result in json.loads(output.out)["checkpoints"]] == [3]
    assert f"not evaluating {broken}, which cannot be read" in output.err
