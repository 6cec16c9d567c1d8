"""Faults a run must survive or report in one line: divergence (a non-finite loss, gradient or
weight), broken checkpoints, and a table of bad inputs to every CLI. (The other faults: kill -9
of a real trainer in test_study.py, SIGTERM in test_distribute.py.)"""
import json
import logging
import os

import numpy as np
import pytest
import tensorflow as tf

import download
import evaler
import export
import predict
import study
import trainer
import util
from test_train_eval import REPO, checkpoint_values, cli_error

TINY = ["--model", "conv", "--groups", "8", "--batch_size", "16", "--max_batch_size", "16",
        "--log_step", "1", "--test_sample_step", "100", "--write_summary_step", "100"]


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
    """...and leaves no run directory behind: nothing in it could be continued."""
    error = cli_error(trainer.main, [*TINY, "--optimizer", "momentum", "--learning_rate", "1e9",
                                     "--max_training_step", "50", "--ckpt_save_step", "1000",
                                     "--run_dir", str(tmp_path / "run")], capsys)
    assert error.endswith("no checkpoint was saved; lower --learning_rate and start again")
    assert not os.path.exists(tmp_path / "run")


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


# Bad inputs -------------------------------------------------------------------------------------

CLIS = {"trainer": (trainer.main, "--train_dir", "train"), "evaler": (evaler.main, None, None),
        "download": (download.main, "--data_dir", "data"),
        "study": (study.main, "--study_dir", "study"),
        "export": (export.main, "--output", "export"), "predict": (predict.main, None, None)}
NOT_WRITABLE = "/proc/gn-tests"  # no file can be made in /proc, even by root

BAD_INPUTS = [
    ("trainer", "--dataset NoSuchSet", "unknown dataset 'NoSuchSet'"),
    ("trainer", "--dataset CIFAR10 --data_dir {tmp}/nothing",
     "run: python download.py --dataset CIFAR10"),
    ("trainer", "--data_dir {file}", "--data_dir {file} is a file"),
    ("trainer", "--norm_type foo", "argument --norm_type: invalid choice: 'foo'"),
    ("trainer", "--max_training_step ten", "argument --max_training_step: invalid int value"),
    ("trainer", "--groups 5", "C=64 channels are not divisible by G=5 groups"),
    ("trainer", "--model resnet20", "C=16 channels are not divisible by G=32 groups"),
    ("trainer", "--model resnet --norm_type instance",
     "--norm_type instance normalizes each channel of stage4_norm (a 1x1 map) over a single"),
    ("trainer", "--model resnet --norm_type batch --batch_size 1",
     "--norm_type batch normalizes each channel of stage4_norm (a 1x1 map) over a single value"),
    ("trainer", "--batch_size 0", "--batch_size 0 must be between 1 and the 5000 training"),
    ("trainer", "--batch_size 5001", "--batch_size 5001 must be between 1"),
    ("trainer", "--batch_size 32 --max_batch_size 48",
     "--batch_size 32 does not fit updates of --max_batch_size 48"),
    ("trainer", "--log_step 0", "--log_step must be positive, got 0"),
    ("trainer", "--dropout 1", "--dropout must be in [0, 1), got 1.0"),
    ("trainer", "--seed -1", "--seed must be between 0 and 4294967295, got -1"),
    ("trainer", "--learning_rate -1", "--learning_rate must be a positive number, got -1.0"),
    ("trainer", "--learning_rate 0", "--learning_rate must be a positive number, got 0.0"),
    ("trainer", "--learning_rate nan", "--learning_rate must be a positive number, got nan"),
    ("trainer", "--learning_rate inf", "--learning_rate must be a positive number, got inf"),
    ("trainer", "--devices 0", "--devices must be at least 1, got 0"),
    ("trainer", "--devices 2 --strategy default", "--devices 2 with --strategy default"),
    ("trainer", "--strategy multi_worker", "--strategy multi_worker needs TF_CONFIG"),
    ("trainer", "--checkpoint {tmp}/nothing/model-5", "checkpoint {tmp}/nothing/model-5 does "
                                                      "not exist"),
    ("trainer", "--checkpoint {empty}", "no checkpoint in {empty}"),
    ("trainer", "--train_dir {file}", "--train_dir {file} is a file — pass a directory"),
    ("trainer", "--train_dir {file}/runs", "--train_dir {file}/runs is inside {file}, which is a"),
    ("trainer", "--run_dir {file}", "--run_dir {file} is a file — pass a directory"),
    ("trainer", f"--train_dir {NOT_WRITABLE}", f"--train_dir {NOT_WRITABLE} is not writable"),
    ("evaler", "", "the following arguments are required: --checkpoint"),
    ("evaler", "--checkpoint {tmp}/nothing", "checkpoint {tmp}/nothing does not exist"),
    ("evaler", "--checkpoint {empty}", "no checkpoint in {empty}"),
    ("evaler", "--checkpoint {empty} --batch_size 0", "--batch_size must be positive, got 0"),
    ("evaler", "--checkpoint {empty} --precise_bn -1", "--precise_bn must be 0 (off) or a"),
    ("download", "", "pass either --dataset NAME ... or --from_folder DIR --name NAME"),
    ("download", "--dataset NoSuchSet", "unknown dataset 'NoSuchSet': choose from MNIST"),
    ("download", "--dataset sample", "unknown dataset 'sample'"),
    ("download", "--dataset ImageNet", "ImageNet is not downloaded: pass --imagenet_dir DIR"),
    ("download", "--dataset MNIST --source {tmp}/nothing",
     "--source {tmp}/nothing is not a folder"),
    ("download", "--dataset MNIST --source {empty}",
     "train-images-idx3-ubyte.gz not found in --source {empty}"),
    ("download", "--dataset MNIST --source {empty} --data_dir {file}",
     "--data_dir {file} is a file"),
    ("download", "--from_folder {empty}", "--from_folder needs --name NAME"),
    ("download", "--from_folder {empty} --name CIFAR10", "--name CIFAR10 is a registered"),
    ("download", "--from_folder {empty} --name Mine", "{empty}/train not found"),
    ("study", "--batch_size 4", "--batch_size is set by the study for each run — pass "
                                "--batch_sizes"),
    ("study", "--checkpoint x", "--checkpoint is set by the study"),
    ("study", "--no_such_flag 1", "--no_such_flag is neither a study.py nor a trainer.py flag"),
    ("study", "--norm batch", "--norm is neither a study.py nor a trainer.py flag"),
    ("study", "--model vgg", "trainer flag argument --model: invalid choice: 'vgg'"),
    ("study", "--norm_types batch bogus", "--norm_types: unknown 'bogus'"),
    ("study", "--batch_sizes 0", "--batch_sizes must be positive, got 0"),
    ("study", "--seeds 0 -1", "--seeds must be between 0 and 4294967295, got -1 0"),
    ("study", "--jobs 0", "--jobs must be positive, got 0"),
    ("study", "--precise_bn -1", "--precise_bn must be 0 (off) or a number of batches"),
    ("study", "--report", "holds no study (no study.json)"),
    ("study", "--study_dir {file}", "--study_dir {file} is a file — pass a directory"),
    ("export", "", "the following arguments are required: --checkpoint"),
    ("export", "--checkpoint {tmp}/nothing", "checkpoint {tmp}/nothing does not exist"),
    ("export", "--checkpoint {empty}", "no checkpoint in {empty}"),
    ("export", "--checkpoint {empty} --output {empty}", "--output {empty} already exists"),
    ("export", "--checkpoint {empty} --output {file}/x",
     "--output {file}/x is inside {file}, which is a file"),
    ("export", "--checkpoint {empty} --format onnx", "argument --format: invalid choice: 'onnx'"),
    ("predict", "--model {empty}", "the following arguments are required: IMAGE"),
    ("predict", "{file}", "one of the arguments --checkpoint --model is required"),
    ("predict", "--model {empty} {tmp}/nothing.png", "{tmp}/nothing.png does not exist"),
    ("predict", "--model {empty} {empty}", "no PNG, JPEG, BMP or GIF file under {empty}"),
    ("predict", "--model {empty} {file}", "--model {empty} is not an export"),
    ("predict", "--model {tmp}/nothing {file}", "--model {tmp}/nothing is not an export"),
    ("predict", "--checkpoint {empty} {file}", "no checkpoint in {empty}"),
    ("predict", "--model {empty} {file} --top_k 0", "--top_k must be at least 1, got 0"),
]


def files_under(root):
    return {os.path.join(folder, name)
            for folder, folders, files in os.walk(root) for name in folders + files}


@pytest.mark.parametrize("cli, flags, message", BAD_INPUTS,
                         ids=[f"{cli} {flags}" for cli, flags, _ in BAD_INPUTS])
def test_bad_input_is_one_error_line_and_leaves_nothing(cli, flags, message, tmp_path, capsys,
                                                       monkeypatch):
    """Exit status 2, exactly one line on stderr, `error: ...`, and no file made anywhere."""
    monkeypatch.delenv("TF_CONFIG", raising=False)
    (tmp_path / "file").write_text("")
    (tmp_path / "empty").mkdir()
    places = {"tmp": tmp_path, "file": tmp_path / "file", "empty": tmp_path / "empty"}
    argv = flags.format(**places).split()
    main, output_flag, output_name = CLIS[cli]
    if output_flag and not {output_flag, "--run_dir"} & set(argv):
        argv += [output_flag, str(tmp_path / output_name)]
    before = files_under(tmp_path), os.listdir(REPO)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        util.run_cli(lambda: main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert message.format(**places) in err[0]
    assert (files_under(tmp_path), os.listdir(REPO)) == before
