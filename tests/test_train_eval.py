"""trainer.py and evaler.py end to end on the bundled sample: run directory, TensorBoard scalars,
checkpoints that continue the full state, evaluation, and the one-line errors."""
import contextlib
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import evaler
import export
import input_ops
import train_flags
import runs
import trainer
import updates
import util
from conftest import MOMENTUM_SGD, assert_trained_alike
from datasets import hdf5_format, registry
from test_data import write_per_id

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny run: 6 updates of 32 examples, each accumulated from two batches of 16.
TINY = ["--max_training_step", "6", "--batch_size", "16", "--max_batch_size", "32",
        "--log_step", "2", "--test_sample_step", "3", "--write_summary_step", "2",
        "--ckpt_save_step", "3"]


def train(tmp_path, *flags):
    """Runs trainer.main with the tiny schedule; returns the new run directory."""
    train_dir = tmp_path / "train_dir"
    before = set(glob.glob(str(train_dir / "*")))
    trainer.main([*TINY, "--train_dir", str(train_dir), *flags])
    (run_dir,) = set(glob.glob(str(train_dir / "*"))) - before
    return run_dir


def cli_error(main, argv, capsys):
    """Runs a CLI the way `python script.py` does; returns its one-line error message."""
    with pytest.raises(SystemExit) as exit_info:
        util.run_cli(lambda: main(argv))
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: ")
    return last_line


def wait_for_text(process, path, text, timeout=300):
    """Waits until the file `path`, written by the running `process`, holds `text`."""
    deadline = time.time() + timeout
    while not (os.path.exists(path) and text in open(path).read()):
        assert process.poll() is None and time.time() < deadline, \
            open(path).read() if os.path.exists(path) else f"{path} was not written"
        time.sleep(0.2)


def read_events(directory):
    """{tag: {step: value}} from the TensorBoard event files in `directory`."""
    values = {}
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                tensor = tf.make_ndarray(value.tensor)
                values.setdefault(value.tag, {})[event.step] = tensor
    return values


def checkpoint_values(prefix):
    """The model's variables and the optimizer's state in a checkpoint. The trainable weights are
    stored under the optimizer's path (optimizer/_trainable_variables/<i>), the moving statistics
    of BN under the model's."""
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith(("model/", "optimizer/"))}


@contextlib.contextmanager
def ctrl_c_after_step(stop_step, monkeypatch):
    """Within the block, the trainer is interrupted (as by Ctrl-C) once it reaches `stop_step`."""
    original_step = updates.Updater.train_step

    def interrupted(self):
        result = original_step(self)
        if self.step == stop_step:
            raise KeyboardInterrupt
        return result

    with monkeypatch.context() as patch:
        patch.setattr(updates.Updater, "train_step", interrupted)
        yield


@pytest.fixture(scope="module")
def batch_norm_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("bn"), "--norm_type", "batch")


def test_run_directory_config_and_checkpoints(batch_norm_run):
    name = os.path.basename(batch_norm_run)
    assert name.startswith("default-sample_lr_0.001_bs_16_norm_type_batch-")
    with open(os.path.join(batch_norm_run, "config.json")) as f:
        config = json.load(f)
    assert config["norm_type"] == "batch" and config["model"] == "conv"
    assert config["accumulation_steps"] == 2 and config["augment"] is False
    assert tf.train.latest_checkpoint(batch_norm_run).endswith("model-6")
    assert os.path.exists(os.path.join(batch_norm_run, "model-3.index"))
    values = checkpoint_values(tf.train.latest_checkpoint(batch_norm_run))
    assert any("moving_mean" in name for name in values), "BN moving statistics are saved"


def test_tensorboard_scalars(batch_norm_run):
    train_events = read_events(os.path.join(batch_norm_run, "train"))
    for tag in ("loss", "update_loss", "accuracy", "learning_rate", "images_per_sec"):
        assert sorted(train_events[tag]) == [2, 4, 6], tag
    # Every 2 steps, as the console's lines: TensorBoard's loss and accuracy are theirs.
    with open(os.path.join(batch_norm_run, runs.PROGRESS_FILE)) as f:
        logged = {record["step"]: record for record in map(json.loads, f)}
    for step in (2, 4, 6):
        assert train_events["loss"][step] == pytest.approx(logged[step]["loss"], rel=1e-6)
        assert train_events["accuracy"][step] == pytest.approx(logged[step]["accuracy"],
                                                               rel=1e-6)
    assert train_events["update_loss"][2] != pytest.approx(train_events["loss"][2])
    assert all(0 <= v <= 1 for v in train_events["accuracy"].values())
    assert train_events["learning_rate"][2] > train_events["learning_rate"][6] > 0  # cosine decay
    assert train_events["input_images"][0].shape[0] >= 2  # encoded images
    test_events = read_events(os.path.join(batch_norm_run, "test"))
    assert sorted(test_events["loss"]) == sorted(test_events["accuracy"]) == [3, 6]


def test_progress_file_has_a_record_per_training_line(batch_norm_run):
    """progress.jsonl, what study.py follows: one JSON object per logged step."""
    with open(os.path.join(batch_norm_run, runs.PROGRESS_FILE)) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [2, 4, 6]
    for record in records:
        assert record["loss"] > 0 and 0 <= record["accuracy"] <= 1 and record["seconds"] > 0
    assert runs.last_progress(batch_norm_run) == records[-1]


def test_last_progress_skips_a_line_being_written(tmp_path):
    assert runs.last_progress(tmp_path) is None
    runs.append_progress(tmp_path, step=10, loss=1.0)
    runs.append_progress(tmp_path, step=20, loss=0.5)
    with open(tmp_path / runs.PROGRESS_FILE, "a") as f:
        f.write('{"step": 30, "lo')
    assert runs.last_progress(tmp_path) == {"step": 20, "loss": 0.5}


def test_evaler_json_on_run_directory(batch_norm_run, capsys):
    evaler.main(["--checkpoint", batch_norm_run, "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 6
    confusion = np.array(result["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == 1000
    assert result["accuracy"] == pytest.approx(np.trace(confusion) / 1000)
    assert len(result["per_class_accuracy"]) == 10 and "Ankle boot" in result["per_class_accuracy"]
    assert result["accuracy"] > 0.2  # six updates already beat chance (0.1)


def test_evaler_split_train_is_the_training_error_in_inference_mode(batch_norm_run, capsys):
    """--split train: every training example once, as the network in inference mode classifies
    it, the same counts a direct prediction over the training images gives."""
    evaler.main(["--checkpoint", batch_norm_run, "--split", "train", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "train"
    confusion = np.array(result["confusion_matrix"])
    _, data = input_ops.load("sample", "./datasets")
    assert confusion.sum() == data.num_train == 5000
    assert confusion.sum(axis=1).tolist() == np.bincount(data.train_labels, minlength=10).tolist()
    config = runs.read_run_config(runs.latest_checkpoint(batch_norm_run))
    model = runs.restore_model(runs.latest_checkpoint(batch_norm_run), config, data)
    images = data.train_images.astype(np.float32) / 255.0
    predicted = np.argmax(model.predict(images, batch_size=500, verbose=0), axis=-1)
    # Batches of another size may round a near tie the other way: a few examples at most.
    assert result["accuracy"] == pytest.approx(np.mean(predicted == data.train_labels), abs=1e-3)


def test_evaler_text_report(batch_norm_run, capsys):
    evaler.main(["--checkpoint", os.path.join(batch_norm_run, "model-3")])
    out = capsys.readouterr().out
    assert "(step 3)" in out and "top-1 accuracy" in out
    assert "per-class accuracy" in out and "confusion matrix" in out and "Trouser" in out


def test_evaler_all_writes_tensorboard(batch_norm_run, capsys):
    evaler.main(["--checkpoint", batch_norm_run, "--all", "--json"])
    results = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [r["step"] for r in results] == [3, 6]
    events = read_events(os.path.join(batch_norm_run, "eval"))
    assert sorted(events["accuracy"]) == [3, 6]
    assert float(events["accuracy"][6]) == pytest.approx(results[1]["accuracy"])


def test_ctrl_c_saves_and_continuing_equals_training_straight_through(tmp_path, monkeypatch):
    """6 steps in one go == 3 steps, Ctrl-C, then 3 more from the checkpoint: model (with BN
    moving statistics), optimizer, step and input position all come back."""
    straight = train(tmp_path / "straight", "--norm_type", "batch")
    with ctrl_c_after_step(3, monkeypatch), pytest.raises(SystemExit) as exit_info:
        train(tmp_path / "split", "--norm_type", "batch")
    assert exit_info.value.code == 130
    (first,) = glob.glob(str(tmp_path / "split" / "train_dir" / "*"))
    assert tf.train.latest_checkpoint(first).endswith("model-3")
    second = train(tmp_path / "split", "--norm_type", "batch", "--checkpoint", first)
    assert tf.train.latest_checkpoint(second).endswith("model-6")
    expected = checkpoint_values(tf.train.latest_checkpoint(straight))
    got = checkpoint_values(tf.train.latest_checkpoint(second))
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_checkpoint_of_another_model_is_refused(batch_norm_run, tmp_path, capsys):
    error = cli_error(trainer.main, [*TINY, "--checkpoint", batch_norm_run, "--norm_type",
                                     "group", "--train_dir", str(tmp_path)], capsys)
    assert error == (f"error: checkpoint {batch_norm_run}/model-6 was trained with --norm_type "
                     "batch, not --norm_type group — drop --norm_type to continue with the "
                     "run's own, or start a new run")


def test_checkpoint_of_another_optimizer_is_refused(batch_norm_run, tmp_path, capsys):
    error = cli_error(trainer.main, [*TINY, "--checkpoint", batch_norm_run, "--norm_type",
                                     "batch", "--optimizer", "momentum",
                                     "--train_dir", str(tmp_path)], capsys)
    assert "was trained with --optimizer adam, not --optimizer momentum" in error


def test_checkpoint_that_does_not_fit_its_config_is_refused(batch_norm_run, tmp_path, capsys):
    """A run directory whose config.json names another network: the restore itself fails."""
    fake_run = tmp_path / "run"
    shutil.copytree(batch_norm_run, fake_run)
    with open(fake_run / "config.json") as f:
        config = json.load(f)
    config["model"] = "resnet20"
    config["groups"] = 8
    util.write_json(str(fake_run / "config.json"), config)
    argv = [*TINY, "--checkpoint", str(fake_run), "--model", "resnet20", "--groups", "8",
            "--norm_type", "batch", "--train_dir", str(tmp_path / "out")]
    for main, args in ((trainer.main, argv), (evaler.main, ["--checkpoint", str(fake_run)])):
        error = cli_error(main, args, capsys)
        assert "does not fit the network its run's config.json describes" in error
        assert "written by another version of model.py" in error
    assert not os.path.exists(tmp_path / "out")
    # The failed restore's objects, deleted at exit, would warn about every value they missed.
    result = run_script("evaler.py", "--checkpoint", str(fake_run))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_evaler_missing_checkpoint(capsys):
    error = cli_error(evaler.main, ["--checkpoint", "/nonexistent"], capsys)
    assert "checkpoint /nonexistent does not exist" in error


def run_script(*argv, **environment):
    """`python <argv>` in the repository with TensorFlow's log level left to the script."""
    env = {name: value for name, value in os.environ.items() if name != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**env, **environment})


def test_error_is_one_line_without_traceback():
    """TensorFlow's start-up lines included: the one line is all there is."""
    result = run_script("trainer.py", "--dataset", "NoSuchSet")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: unknown dataset 'NoSuchSet': choose one of {', '.join(registry.REGISTRY)} or "
        "put your own data.hdf5 under ./datasets/NoSuchSet/"]


def test_console_shows_only_our_lines_and_verbose_shows_tensorflows(tmp_path):
    """A training run prints timestamped lines only; --verbose brings TensorFlow's back. With
    oneDNN on, the conv net's biased convolutions and LeakyReLU trip no grappler rewrite."""
    flags = ["trainer.py", *TINY, "--max_training_step", "1", "--train_dir", str(tmp_path)]
    quiet = run_script(*flags)
    assert quiet.returncode == 0, quiet.stderr
    lines = (quiet.stdout + quiet.stderr).strip().splitlines()
    assert lines and all(re.match(r"\d\d:\d\d:\d\d ", line) for line in lines), lines
    verbose = run_script(*flags, "--verbose", TF_ENABLE_ONEDNN_OPTS="1")
    assert verbose.returncode == 0, verbose.stderr
    assert "oneDNN custom operations are on" in verbose.stderr
    assert "remapper failed" not in verbose.stderr
    kernel_lines = [line for line in verbose.stderr.splitlines() if " kernels: GroupNorm " in line]
    assert len(kernel_lines) == 1 and "kernels:" not in quiet.stderr


def test_group_norm_accumulated_small_batches_equal_one_large_batch(kink_free_network):
    """GN ignores the batch, so 4 accumulated batches of 2 make the same updates as one batch of
    8 (no dropout; the input stream yields the same 8 examples in both cases), to the rounding
    of sums taken in another order: in a network without kinks, by momentum SGD (conftest.py's
    `without_kinks` says why)."""
    _, data = input_ops.load("sample", "./datasets")
    weights, losses = {}, {}
    for batch_size in (8, 2):
        config = train_flags.parse_args(["--batch_size", str(batch_size), "--max_batch_size", "8",
                                         "--dropout", "0", "--max_training_step", "3",
                                         *MOMENTUM_SGD])
        config.model, config.augment = "conv", False
        tf.keras.utils.set_random_seed(0)
        run = updates.Updater(config, data)
        start = [v.numpy() for v in run.model.trainable_variables]
        losses[batch_size] = [float(run.train_step()[0]) for _ in range(3)]
        assert run.step == 3
        weights[batch_size] = [v.numpy() for v in run.model.trainable_variables]
    np.testing.assert_allclose(losses[2], losses[8], rtol=1e-5)
    assert_trained_alike(weights[2], weights[8], start)


@pytest.mark.parametrize("flag", ["--no_accumulate", "--no_adjust_learning_rate"])
def test_no_accumulate_and_its_2018_name_make_one_update_per_batch(flag):
    config = train_flags.parse_args(["--batch_size", "8", "--max_batch_size", "64", flag])
    assert config.no_accumulate and updates.passes_per_update(config, 1, config.batch_size) == 1


@pytest.mark.parametrize("layout", ["splits", "per_id_2018"])
def test_own_dataset_trains_by_name(layout, tmp_path, capsys):
    """Any <data_dir>/NAME/data.hdf5, in either layout, trains as --dataset NAME."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 12, 12, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 40)
    folder = tmp_path / "data" / "mine"
    if layout == "splits":
        hdf5_format.write_dataset(str(folder / "data.hdf5"),
                                  {"train": (images[:30], labels[:30]),
                                   "test": (images[30:], labels[30:])}, ["a", "b", "c"], {})
    else:
        write_per_id(str(folder), images / 255.0, labels, 3, [f"id{i}" for i in range(40)])
    run_dir = train(tmp_path, "--dataset", "mine", "--data_dir", str(tmp_path / "data"),
                    "--batch_size", "4", "--max_batch_size", "4", "--groups", "8")
    evaler.main(["--checkpoint", run_dir, "--json"])
    result = json.loads(capsys.readouterr().out)
    # 30 / 10 as written; the per-id file splits 90% / 10% of its 40 ids.
    assert np.array(result["confusion_matrix"]).sum() == (10 if layout == "splits" else 4)


def test_continuing_takes_the_flags_the_command_line_leaves_out_from_the_run(batch_norm_run,
                                                                            tmp_path):
    """A BN run continued with only --checkpoint and a longer --max_training_step: the network,
    batching and optimizer are the run's, said in one line."""
    result = run_script("trainer.py", "--checkpoint", batch_norm_run, "--max_training_step", "8",
                        "--train_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert ("continuing with the run's own --model conv --norm_type batch --no-augment "
            "--batch_size 16 --max_batch_size 32\n" in result.stderr)
    assert "done: step 8" in result.stderr
    (run_dir,) = glob.glob(str(tmp_path / "*"))
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    assert (config["norm_type"], config["batch_size"], config["max_batch_size"]) == \
        ("batch", 16, 32)


def test_checkpoint_continues_with_other_accumulation(batch_norm_run, tmp_path):
    """The optimizer state does not depend on how an update's examples are split into passes."""
    run_dir = train(tmp_path, "--checkpoint", batch_norm_run, "--norm_type", "batch",
                    "--batch_size", "8", "--max_training_step", "8")
    with open(os.path.join(run_dir, "result.json")) as f:
        result = json.load(f)
    assert result["step"] == 8 and result["config"]["accumulation_steps"] == 4


def run_of_format(batch_norm_run, tmp_path, version):
    """A copy of `batch_norm_run` whose config.json says format `version` (None: says none, as
    before there was one)."""
    run_dir = str(tmp_path / f"format_{version}")
    shutil.copytree(batch_norm_run, run_dir)
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    assert config.pop("format_version") == runs.FORMAT_VERSION
    if version is not None:
        config["format_version"] = version
    util.write_json(os.path.join(run_dir, "config.json"), config)
    return run_dir


@pytest.mark.parametrize("version, written_by", [
    (None, "an earlier version of this repo — train a new run"),
    (runs.FORMAT_VERSION + 1, "a newer version of this repo — update it")])
def test_a_run_of_another_format_is_refused_by_every_reader(batch_norm_run, tmp_path, capsys,
                                                            version, written_by):
    run_dir = run_of_format(batch_norm_run, tmp_path, version)
    expected = (f"error: run {run_dir} has format version {version or 0} in its config.json, "
                f"not {runs.FORMAT_VERSION}: it was written by {written_by}")
    continued = cli_error(trainer.main, [*TINY, "--checkpoint", run_dir, "--norm_type", "batch",
                                         "--train_dir", str(tmp_path)], capsys)
    evaluated = cli_error(evaler.main, ["--checkpoint", run_dir], capsys)
    exported = cli_error(export.main, ["--checkpoint", run_dir, "--output",
                                       str(tmp_path / "export")], capsys)
    assert all(line.startswith(expected) for line in (continued, evaluated, exported))
    assert not os.path.exists(tmp_path / "export")


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(util.time, "strftime", lambda _: "20260101-000000")
    config = train_flags.parse_args(["--train_dir", str(tmp_path)])
    first = util.new_run_dir(config)
    assert first == str(tmp_path / "default-sample_lr_0.001_bs_64_norm_type_group-20260101-000000")
    os.makedirs(first)
    second = util.new_run_dir(config)
    assert second == first + "_2"


def test_result_json_is_written_at_the_end(batch_norm_run, capsys):
    """result.json holds the evaluation evaler.py prints, the times and the resolved flags."""
    with open(os.path.join(batch_norm_run, "result.json")) as f:
        result = json.load(f)
    evaler.main(["--checkpoint", batch_norm_run, "--json"])
    evaluated = json.loads(capsys.readouterr().out)
    for key in ("checkpoint", "step", "accuracy", "per_class_accuracy", "confusion_matrix"):
        assert result[key] == evaluated[key], key
    assert result["loss"] == pytest.approx(evaluated["loss"], rel=1e-5)
    assert result["step"] == 6 and result["seconds"] > 0
    assert result["images_per_sec"] == pytest.approx(6 * 32 / result["seconds"], rel=0.01)
    assert result["seconds_to_first_update"] > 0
    assert result["config"]["norm_type"] == "batch" and result["config"]["model"] == "conv"


def test_run_dir_continues_where_it_stopped(tmp_path, monkeypatch):
    """--run_dir: the same command after an interruption continues from the run's latest
    checkpoint, in place, to the weights of a run never interrupted; the result.json of an
    earlier end is removed when training starts again."""
    straight = train(tmp_path / "straight", "--norm_type", "batch")
    run_dir = str(tmp_path / "run")
    argv = [*TINY, "--norm_type", "batch", "--run_dir", run_dir]
    with ctrl_c_after_step(3, monkeypatch), pytest.raises(SystemExit):
        trainer.main(argv)
    assert not os.path.exists(os.path.join(run_dir, "result.json"))
    trainer.main(argv)
    expected = checkpoint_values(tf.train.latest_checkpoint(straight))
    got = checkpoint_values(tf.train.latest_checkpoint(run_dir))
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    with open(os.path.join(run_dir, "result.json")) as f:
        assert json.load(f)["step"] == 6
    trainer.main([*argv, "--max_training_step", "8"])
    with open(os.path.join(run_dir, "result.json")) as f:
        assert json.load(f)["step"] == 8


def test_run_dir_with_checkpoints_and_checkpoint_is_refused(batch_norm_run, capsys):
    error = cli_error(trainer.main, [*TINY, "--norm_type", "batch", "--run_dir", batch_norm_run,
                                     "--checkpoint", batch_norm_run], capsys)
    assert "holds checkpoints already — drop --checkpoint to continue it" in error
