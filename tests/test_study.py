"""study.py end to end on the bundled sample: a small grid of real trainer processes, its table and
figures, resuming (also after kill -9), failures, the flag rules and --print_commands."""
import csv
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import imageio.v3 as iio
import numpy as np
import pytest
import tensorflow as tf

import study
import study_report
import util
from test_train_eval import wait_for_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each cell: 4 updates of 16 examples, two batches of 8 when the batch is 8.
TINY = ["--max_training_step", "4", "--max_batch_size", "16", "--log_step", "2",
        "--test_sample_step", "2", "--write_summary_step", "2", "--ckpt_save_step", "2"]


def run_study(study_dir, *flags):
    """study.main as `python study.py` runs it; returns the exit status."""
    try:
        util.run_cli(lambda: study.main(["--study_dir", str(study_dir), *flags]))
    except SystemExit as exit_info:
        return exit_info.code
    return 0


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def run_state(study_dir):
    """{file: modification time} of everything under runs/ and logs/: what training changes."""
    paths = glob.glob(os.path.join(study_dir, "runs", "**"), recursive=True)
    paths += glob.glob(os.path.join(study_dir, "logs", "*"))
    return {p: os.path.getmtime(p) for p in paths if os.path.isfile(p)}


def final_weights(run_dir):
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(run_dir))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith("model/")}


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    """BN and GN at batch 8 and 16, seed 0, BN also evaluated with precise BN."""
    study_dir = tmp_path_factory.mktemp("study") / "grid"
    status = run_study(study_dir, "--norm_types", "batch", "group", "--batch_sizes", "8", "16",
                       "--precise_bn", "3", "--jobs", "2", *TINY)
    assert status == 0
    return study_dir


def test_grid_writes_runs_table_and_figures(small_study):
    names = sorted(os.listdir(small_study / "runs"))
    assert names == ["batch-bs16-seed0", "batch-bs8-seed0", "group-bs16-seed0", "group-bs8-seed0"]
    rows = read_csv(small_study / "results.csv")
    assert len(rows) == 4
    for row in rows:
        assert row["step"] == "4" and 0 <= float(row["test_accuracy"]) <= 1
        assert float(row["seconds"]) > 0 and os.path.isdir(row["run_dir"])
        assert (row["precise_bn_test_accuracy"] != "") == (row["norm_type"] == "batch")
        with open(os.path.join(row["run_dir"], "train_eval.json")) as f:
            train_eval = json.load(f)
        assert train_eval["split"] == "train" and train_eval["step"] == 4
        assert sum(map(sum, train_eval["confusion_matrix"])) == 5000  # the sample's train split
        assert float(row["train_accuracy"]) == pytest.approx(train_eval["accuracy"])
        assert float(row["train_loss"]) == pytest.approx(train_eval["loss"])
    # Each run is an ordinary trainer run: config.json, checkpoints, events, result.json.
    run = small_study / "runs" / "batch-bs8-seed0"
    for name in ("config.json", "result.json", "precise_bn.json", "model-4.index", "train"):
        assert os.path.exists(run / name), name


def test_table_holds_the_means_of_the_csv(small_study):
    rows = read_csv(small_study / "results.csv")
    table = (small_study / "results.md").read_text()
    lines = {line.split("|")[1].strip(): line for line in table.splitlines()
             if line.startswith("| ")}
    assert "| | batch 8 | batch 16 |" in table
    for name, norm_type, column in (("BN", "batch", "test_accuracy"),
                                    ("GN", "group", "test_accuracy"),
                                    ("BN (precise)", "batch", "precise_bn_test_accuracy"),
                                    ("BN, training error", "batch", "train_accuracy"),
                                    ("GN, training error", "group", "train_accuracy")):
        cells = [c.strip() for c in lines[name].split("|")[2:-1]]
        for batch_size, text in zip(("8", "16"), cells):
            (accuracy,) = [float(r[column]) for r in rows
                           if r["norm_type"] == norm_type and r["batch_size"] == batch_size]
            assert float(text) == pytest.approx(100 * (1 - accuracy), abs=0.05), (name, batch_size)
    difference = [c.strip() for c in lines["BN − GN"].split("|")[2:-1]]
    bn = [c.strip() for c in lines["BN"].split("|")[2:-1]]
    gn = [c.strip() for c in lines["GN"].split("|")[2:-1]]
    for d, b, g in zip(difference, bn, gn):
        assert float(d) == pytest.approx(float(b) - float(g), abs=0.11)
    # Each seed's own numbers, to two decimals.
    for row in rows:
        name = {"batch": "BN", "group": "GN"}[row["norm_type"]]
        cells = [c.strip() for c in lines[f"{name}, batch {row['batch_size']}, seed 0"]
                 .split("|")[2:-1]]
        precise = row["precise_bn_test_accuracy"]
        assert cells == [f"{100 * (1 - float(accuracy)):.2f}" if accuracy else ""
                         for accuracy in (row["test_accuracy"], precise, row["train_accuracy"])]


def test_figures_decode_at_their_size(small_study):
    for name, (width, height) in (("accuracy_vs_batch.png", (700, 450)),
                                  ("curves.png", (1000, 700))):
        image = iio.imread(small_study / name)
        assert image.shape[:2] == (height, width), name
        assert image.std() > 10, f"{name} is not blank"


def test_rerun_trains_nothing(small_study, capsys):
    before = run_state(small_study)
    assert run_study(small_study, "--precise_bn", "3", *TINY) == 0
    assert run_state(small_study) == before
    assert "4 runs, 0 to train" in capsys.readouterr().err


def test_more_seeds_extend_the_grid(small_study, tmp_path, capsys):
    """--print_commands lists only the new cells, with the study's trainer flags."""
    shutil.copytree(small_study, tmp_path / "copy")
    assert run_study(tmp_path / "copy", "--seeds", "1", "--print_commands") == 0
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == 4
    assert all("--seed 1" in c and "--max_training_step 4" in c for c in commands)
    assert all(re.search(r"--run_dir \S+/runs/(batch|group)-bs(8|16)-seed1$", c)
               for c in commands)


def test_killed_cell_continues_to_the_weights_of_an_uninterrupted_run(tmp_path):
    """kill -9 of study.py and its trainer after a checkpoint; the same command then continues
    the cell from that checkpoint to the same final weights as a run never interrupted."""
    flags = ["--norm_types", "batch", "--batch_sizes", "8", "--precise_bn", "0",
             "--no-train_error", "--max_training_step", "20", "--max_batch_size", "16",
             "--ckpt_save_step", "5"]
    run_dir = tmp_path / "killed" / "runs" / "batch-bs8-seed0"
    process = subprocess.Popen([sys.executable, "study.py", "--study_dir",
                                str(tmp_path / "killed"), *flags], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 180
    while not os.path.exists(run_dir / "checkpoint") and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not os.path.exists(run_dir / "result.json"), "killed before the end"
    interrupted_at = study.Cell("batch", 8, 0, str(tmp_path / "killed")).steps_done()
    assert 5 <= interrupted_at < 20

    assert run_study(tmp_path / "killed", *flags) == 0
    assert run_study(tmp_path / "straight", *flags) == 0
    log = (tmp_path / "killed" / "logs" / "batch-bs8-seed0.log").read_text()
    assert f"continuing from {run_dir}/model-{interrupted_at} at step {interrupted_at}" in log
    expected = final_weights(tmp_path / "straight" / "runs" / "batch-bs8-seed0")
    got = final_weights(run_dir)
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_sigterm_stops_the_trainers_too_and_the_same_command_continues(tmp_path):
    """SIGTERM to study.py alone (a scheduler stopping it): its running trainer is sent SIGTERM
    too and saves, rather than training on with no study to watch it; the study exits 143 once
    the trainer has, and the same command continues the cell from that checkpoint."""
    flags = ["--norm_types", "group", "--batch_sizes", "8", "--precise_bn", "0",
             "--no-train_error", "--max_training_step", "60", "--max_batch_size", "16",
             "--log_step", "1"]
    study_dir = tmp_path / "study"
    log = study_dir / "logs" / "group-bs8-seed0.log"
    process = subprocess.Popen([sys.executable, "study.py", "--study_dir", str(study_dir),
                                *flags], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    wait_for_text(process, log, "[train step", timeout=180)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == util.TERMINATED_STATUS, stderr
    assert "terminated: run the same command again to continue" in stderr
    step = int(log.read_text().split("terminated at step ")[1].split()[0])
    assert 1 <= step < 60
    assert run_study(study_dir, *flags) == 0
    assert f"model-{step} at step {step}" in log.read_text()
    assert study.Cell("group", 8, 0, str(study_dir)).finished()


def test_failed_cells_are_reported_and_the_others_finish(tmp_path, capsys):
    """--groups 48 does not divide the conv net's 64 channels: the GN cell fails, BN trains."""
    study_dir = tmp_path / "partial"
    status = run_study(study_dir, "--norm_types", "batch", "group", "--batch_sizes", "16",
                       "--precise_bn", "0", "--no-train_error", "--groups", "48", *TINY)
    assert status == 1
    err = capsys.readouterr().err
    assert re.search(r"FAILED group-bs16-seed0: error: .*C=64 channels are not divisible by "
                     r"G=48 groups", err)
    assert "batch-bs16-seed0: test accuracy" in err
    assert "1 failed: group-bs16-seed0" in err

    # --report collates what exists, the BN run only, measuring its training error then.
    os.remove(study_dir / "results.csv")
    assert run_study(study_dir, "--report", "--precise_bn", "0") == 0
    rows = read_csv(study_dir / "results.csv")
    assert [(r["norm_type"], r["batch_size"]) for r in rows] == [("batch", "16")]
    assert 0 < float(rows[0]["train_accuracy"]) <= 1
    assert "| GN |" not in (study_dir / "results.md").read_text()


def test_other_trainer_flags_in_an_existing_study_are_refused(tmp_path, capsys):
    assert run_study(tmp_path, "--print_commands", "--learning_rate", "0.01") == 0
    capsys.readouterr()
    assert run_study(tmp_path, "--print_commands", "--learning_rate", "0.02") == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith("was run with other trainer flags (--learning_rate 0.01) — pass "
                          "those, or another --study_dir")
    # Without trainer flags the study's own are used.
    assert run_study(tmp_path, "--print_commands") == 0
    assert "--learning_rate 0.01" in capsys.readouterr().out


def test_help_runs_as_a_script():
    result = subprocess.run([sys.executable, "study.py", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for flag in ("--norm_types", "--batch_sizes", "--seeds", "--jobs", "--print_commands",
                 "--report", "--precise_bn", "trainer.py flag"):
        assert flag in result.stdout


# The paper's protocol and the groups axes -------------------------------------------------------

def cell_config(study_dir, name):
    with open(os.path.join(study_dir, "runs", name, "config.json")) as f:
        return json.load(f)


def test_paper_protocol_derives_each_cells_update_rate_and_steps(tmp_path):
    """Under --protocol paper a cell of batch N averages D x N examples per update at
    --learning_rate x D N / R, for the same epochs: on the sample's 5,000 training images, 0.02
    epochs are 7 updates of 16 at batch 8 and 4 of 32 at batch 16. GN cells by groups and by
    channels per group get their own runs, rows, columns and figure."""
    study_dir = tmp_path / "paper"
    status = run_study(study_dir, "--protocol", "paper", "--epochs", "0.02",
                       "--devices_per_update", "2", "--reference_batch", "64",
                       "--norm_types", "group", "--batch_sizes", "8", "16",
                       "--group_counts", "8", "--channels_per_group_list", "16",
                       "--precise_bn", "0", "--no-train_error", "--jobs", "2",
                       "--learning_rate", "0.002",
                       "--log_step", "2", "--test_sample_step", "2", "--write_summary_step", "2")
    assert status == 0
    expected = {8: (16, 0.002 * 16 / 64, 7), 16: (32, 0.002 * 32 / 64, 4)}
    for grouping, (groups, per_group) in (("G8", (8, None)), ("C16", (None, 16))):
        for batch_size, (update, rate, steps) in expected.items():
            config = cell_config(study_dir, f"group-{grouping}-bs{batch_size}-seed0")
            assert (config["max_batch_size"], config["learning_rate"],
                    config["max_training_step"]) == (update, rate, steps)
            assert config["accumulation_steps"] == 2 and config["batch_size"] == batch_size
            assert (config["groups"], config["channels_per_group"]) == (groups, per_group)
    rows = read_csv(study_dir / "results.csv")
    assert sorted((r["groups"], r["channels_per_group"], r["batch_size"], r["step"],
                   r["examples_per_update"]) for r in rows) == [
        ("", "16", "16", "4", "32"), ("", "16", "8", "7", "16"),
        ("8", "", "16", "4", "32"), ("8", "", "8", "7", "16")]
    table = (study_dir / "results.md").read_text()
    assert "The paper's protocol: an update averages the gradients of 2 x batch examples" in table
    assert "batch 8: 16 examples, rate 0.0005, 7 updates" in table
    assert "| GN, G=8 |" in table and "| GN, C=16 |" in table
    assert "| | G=8 |" in table and "| | C=16 |" in table
    for name in ("error_curves.png", "error_vs_groups.png"):
        assert iio.imread(study_dir / name).std() > 10, name


def test_paper_protocol_on_one_device_says_an_update_is_one_batch():
    rows = [{"batch_size": 32, "examples_per_update": 32, "learning_rate": 0.0125,
             "config": {"max_training_step": 3750}}]
    protocol = {"name": "paper", "epochs": 2, "devices_per_update": 1, "reference_batch": 256}
    assert study_report.epochs_text({"epochs": 1}) == "1 epoch"
    assert study_report.paper_updates(protocol, rows) == (
        "The paper's protocol on one device: an update is one batch, the learning rate is 0.1 x "
        "update / 256, and every cell trains 2 epochs (batch 32: 32 examples, rate 0.0125, 3750 "
        "updates)")


def test_paper_protocol_commands_carry_the_derived_flags(tmp_path, capsys):
    assert run_study(tmp_path, "--protocol", "paper", "--epochs", "1", "--norm_types", "batch",
                     "group+ws", "--batch_sizes", "2", "--print_commands") == 0
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == 2
    # 1 epoch of 5,000 in updates of 8 x 2: 313 updates at 1e-3 x 16 / 256.
    assert all("--max_batch_size 16 --learning_rate 6.25e-05 --max_training_step 313" in c
               for c in commands)
    assert "--norm_type group --weight_std --batch_size 2" in commands[1]
    assert commands[1].endswith("/runs/group+ws-bs2-seed0")


def test_paper_protocol_warms_up_over_the_same_epochs_at_every_batch(tmp_path, capsys):
    """--warmup_epochs W: W epochs of updates at every batch size (0.5 of 5,000 examples: 157
    updates of 16 at batch 2, 20 of 128 at batch 16), named in the table's schedule."""
    assert run_study(tmp_path, "--protocol", "paper", "--epochs", "1", "--warmup_epochs", "0.5",
                     "--norm_types", "group", "--batch_sizes", "2", "16",
                     "--print_commands") == 0
    commands = capsys.readouterr().out.strip().splitlines()
    assert "--max_training_step 313 --warmup_steps 157 " in commands[0]
    assert "--max_training_step 40 --warmup_steps 20 " in commands[1]
    protocol = study.read_json(tmp_path / "study.json")["protocol"]
    assert study_report.schedule_text({"lr_schedule": "cosine", "warmup_steps": 157},
                                      protocol) == (
        "cosine-decayed to 0 after a linear warm-up over the first 0.5 epochs")


@pytest.mark.parametrize("flags, says", [
    (["--epochs", "2"], "--epochs sets the paper's protocol — add --protocol paper"),
    (["--protocol", "paper"], "--protocol paper trains every cell for the same epochs — pass "
                              "--epochs E"),
    (["--protocol", "paper", "--epochs", "2", "--max_training_step", "9"],
     "--max_training_step is derived for each cell under --protocol paper — pass --epochs"),
    (["--protocol", "paper", "--epochs", "0"], "--epochs must be positive"),
    (["--warmup_epochs", "1"], "--warmup_epochs sets the paper's protocol"),
    (["--protocol", "paper", "--epochs", "2", "--warmup_steps", "9"],
     "--warmup_steps is derived for each cell under --protocol paper — pass --warmup_epochs"),
    (["--protocol", "paper", "--epochs", "2", "--warmup_epochs", "3"],
     "--warmup_epochs 3 is longer than --epochs 2 — pass a shorter warm-up"),
    (["--group_counts", "4", "--groups", "8"], "--groups and --group_counts / "
                                               "--channels_per_group_list both set"),
    (["--norm_types", "group+xx"], "--norm_types: unknown 'group+xx'"),
    (["--channels_per_group_list", "0"], "--channels_per_group_list must be positive"),
])
def test_bad_protocol_and_group_flags_are_refused(flags, says, tmp_path, capsys):
    assert run_study(tmp_path / "study", *flags, "--print_commands") == 2
    assert says in capsys.readouterr().err


def test_another_protocol_in_an_existing_study_is_refused(tmp_path, capsys):
    assert run_study(tmp_path, "--print_commands") == 0
    assert run_study(tmp_path, "--protocol", "paper", "--epochs", "2", "--print_commands") == 2
    assert ("was run with --protocol fixed_update, not --protocol paper --epochs 2 "
            "--devices_per_update 8 --reference_batch 256") in capsys.readouterr().err
