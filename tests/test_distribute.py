"""Several replicas and workers on one CPU: logical devices (--devices) under MirroredStrategy,
MultiWorkerMirroredStrategy over two local processes, SIGTERM, mixed precision, and the errors.

A process holds one MirroredStrategy at most (a second one's collectives fail), so every
multi-replica run is a `trainer.py` process of its own; the one-replica references run in this
process. The runs whose numbers are compared train a network without kinks by momentum SGD
(conftest.py's `without_kinks` says why), in every process."""
import json
import os
import signal
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import evaler
import input_ops
import train_flags
import trainer
import updates
from conftest import (MOMENTUM_SGD, assert_trained_alike, without_kinks,
                      without_kinks_command)
from kernels import policy as kernel_policy
from test_train_eval import REPO, checkpoint_values, cli_error, wait_for_text

# 3 updates of 8 examples on the sample, no dropout or augmentation: the runs below differ only
# in how the 8 examples of an update are spread over replicas.
SMALL = ["--model", "conv", "--groups", "8", "--dropout", "0", "--no-augment",
         "--max_batch_size", "8", "--max_training_step", "3", "--log_step", "1",
         "--test_sample_step", "100", "--write_summary_step", "100"]
# trainer.py as the runs compared are trained: the network without kinks.
KINK_FREE_TRAINER = without_kinks_command("trainer")


def start_trainer(run_dir, *flags, env=None, log_path=None,
                  command=(sys.executable, "trainer.py")):
    """A trainer.py process (run by `command`) training in `run_dir`, its output in `log_path`
    (<run_dir>.log)."""
    log_path = log_path or f"{run_dir}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [*command, *SMALL, "--run_dir", str(run_dir), *flags], cwd=REPO,
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    process.log_path = log_path
    return process


def finish(process, timeout=300):
    """Waits for a trainer process; returns its output, which a failure shows."""
    status = process.wait(timeout)
    with open(process.log_path) as f:
        output = f.read()
    assert status == 0, output[-3000:]
    return output


def final_weights(run_dir):
    return checkpoint_values(tf.train.latest_checkpoint(str(run_dir)))


def assert_same_weights(got, expected, start):
    assert got.keys() == expected.keys() and len(got) > 20
    assert_trained_alike(got, expected, start)


@pytest.fixture(scope="module")
def one_replica(tmp_path_factory):
    """{norm_type: run directory} of 1 replica x 8 examples, trained in this process."""
    root = tmp_path_factory.mktemp("one_replica")
    runs = {}
    for norm_type in ("group", "batch"):
        runs[norm_type] = root / norm_type
        with without_kinks():
            trainer.main([*SMALL, *MOMENTUM_SGD, "--norm_type", norm_type, "--batch_size", "8",
                          "--run_dir", str(runs[norm_type])])
    return runs


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
    """{norm_type: the values a checkpoint of the runs above holds before their first update}."""
    root = tmp_path_factory.mktemp("initial")
    _, data = input_ops.load("sample", "./datasets")
    values = {}
    for norm_type in ("group", "batch"):
        config = train_flags.parse_args([*SMALL, *MOMENTUM_SGD, "--norm_type", norm_type,
                                         "--batch_size", "8"])
        with without_kinks():
            run = updates.Updater(config, data)
        state = tf.train.Checkpoint(model=run.model, optimizer=run.optimizer)
        values[norm_type] = checkpoint_values(state.write(str(root / norm_type)))
    return values


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    """{norm_type: run directory} of 2 logical devices x 4 examples, checkpoints at every step."""
    root = tmp_path_factory.mktemp("two_replicas")
    runs = {norm: root / norm for norm in ("group", "sync_batch", "batch")}
    processes = [start_trainer(run_dir, *MOMENTUM_SGD, "--devices", "2", "--strategy", "mirrored",
                               "--norm_type", norm, "--batch_size", "4", "--ckpt_save_step", "1",
                               command=KINK_FREE_TRAINER)
                 for norm, run_dir in runs.items()]
    for process in processes:
        finish(process)
    return runs


def test_group_norm_updates_do_not_depend_on_the_replicas(one_replica, two_replicas, initial):
    assert_same_weights(final_weights(two_replicas["group"]), final_weights(one_replica["group"]),
                        initial["group"])


def test_sync_batch_over_two_replicas_is_batch_norm_over_their_examples(one_replica,
                                                                       two_replicas, initial):
    assert_same_weights(final_weights(two_replicas["sync_batch"]),
                        final_weights(one_replica["batch"]), initial["batch"])


def test_batch_norm_statistics_stay_per_replica(one_replica, two_replicas):
    got, expected = final_weights(two_replicas["batch"]), final_weights(one_replica["batch"])
    largest = max(np.abs(got[name] - expected[name]).max() for name in expected)
    assert largest > 1e-3


def test_config_records_the_replicas_and_the_log_states_the_batches(two_replicas):
    with open(two_replicas["group"] / "config.json") as f:
        config = json.load(f)
    assert (config["replicas"], config["workers"], config["strategy_class"]) == \
        (2, 1, "MirroredStrategy")
    log = open(f"{two_replicas['group']}.log").read()
    assert "2 replicas x 4 examples, 1 pass per update = 8 examples per update" in log


def test_continuing_on_two_devices_is_exact(two_replicas, tmp_path):
    resumed = tmp_path / "resumed"
    finish(start_trainer(resumed, "--devices", "2", "--norm_type", "sync_batch",
                         "--batch_size", "4", "--checkpoint",
                         str(two_replicas["sync_batch"] / "model-1"), command=KINK_FREE_TRAINER))
    got, expected = final_weights(resumed), final_weights(two_replicas["sync_batch"])
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_evaler_restores_a_mirrored_checkpoint_on_one_device(two_replicas, kink_free_network,
                                                            capsys):
    evaler.main(["--checkpoint", str(two_replicas["sync_batch"]), "--json"])
    evaluated = json.loads(capsys.readouterr().out)
    with open(two_replicas["sync_batch"] / "result.json") as f:
        result = json.load(f)
    assert evaluated["step"] == 3
    assert evaluated["accuracy"] == result["accuracy"]


def test_evaler_splits_batches_over_two_devices(two_replicas):
    """Batches of 99 (the last of 10) split unevenly over 2 replicas; the gathered results are
    those of one device."""
    output = subprocess.run(
        [*without_kinks_command("evaler"), "--checkpoint", str(two_replicas["sync_batch"]),
         "--devices", "2", "--batch_size", "99", "--json"], cwd=REPO, capture_output=True,
        text=True, timeout=300)
    assert output.returncode == 0, output.stderr[-3000:]
    evaluated = json.loads(output.stdout)
    with open(two_replicas["sync_batch"] / "result.json") as f:
        result = json.load(f)
    assert np.sum(evaluated["confusion_matrix"]) == 1000
    assert evaluated["confusion_matrix"] == result["confusion_matrix"]
    assert evaluated["loss"] == pytest.approx(result["loss"], rel=1e-5)


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_workers(tmp_path, *flags, command=(sys.executable, "trainer.py")):
    """Two trainer.py processes (run by `command`) of MultiWorkerMirroredStrategy training one
    run in <tmp_path>/run, each with 4 examples of every update; their temporary files go to
    <tmp_path>/tmp, their output to <tmp_path>/worker<index>.log."""
    workers = [f"localhost:{port}" for port in free_ports(2)]
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        processes.append(start_trainer(
            tmp_path / "run", "--strategy", "multi_worker", "--norm_type", "group",
            "--batch_size", "4", *flags,
            env={"TF_CONFIG": json.dumps(tf_config), "TMPDIR": str(scratch)},
            log_path=tmp_path / f"worker{index}.log", command=command))
    return processes


def test_two_workers_train_as_one_replica_of_their_batch(one_replica, initial, tmp_path):
    """Two processes of MultiWorkerMirroredStrategy, each with 4 examples of every update: GN
    ends where one replica with all 8 does; only the chief writes the run directory."""
    run_dir = tmp_path / "run"
    outputs = [finish(process)
               for process in start_workers(tmp_path, *MOMENTUM_SGD, command=KINK_FREE_TRAINER)]
    assert_same_weights(final_weights(run_dir), final_weights(one_replica["group"]),
                        initial["group"])
    chief_done, worker_done = (output[output.index("done:"):].splitlines()[0]
                               for output in outputs)
    assert chief_done == worker_done  # the same weights give the same test loss and accuracy
    assert "(written by the chief)" in outputs[1]
    assert os.listdir(tmp_path / "tmp") == []  # the other worker removed its temporary checkpoints
    assert os.path.exists(run_dir / "result.json")


def test_sigterm_to_one_worker_stops_every_worker_at_the_same_step(tmp_path):
    """A scheduler preempting one worker of a cluster (SIGTERM to the non-chief): both workers
    end the next update, save it and exit 143, and the same two commands continue from there."""
    processes = start_workers(tmp_path, "--max_training_step", "1000")
    for process in processes:
        wait_for_text(process, process.log_path, "[train step")
    processes[1].send_signal(signal.SIGTERM)
    assert [process.wait(120) for process in processes] == [trainer.TERMINATED_STATUS] * 2
    outputs = [open(process.log_path).read() for process in processes]
    steps = {int(output.split("terminated at step ")[1].split()[0]) for output in outputs}
    assert len(steps) == 1, outputs
    step = steps.pop()
    assert "another worker was sent SIGTERM" in outputs[0]
    assert tf.train.latest_checkpoint(str(tmp_path / "run")).endswith(f"model-{step}")
    continued = [finish(process)
                 for process in start_workers(tmp_path, "--max_training_step", str(step + 2))]
    for output in continued:
        assert f"model-{step} at step {step}" in output and f"done: step {step + 2}" in output


def test_a_killed_worker_is_one_line_on_the_other(tmp_path):
    """kill -9 of one worker fails the next all-reduce of the other, which says in one line
    (no traceback, exit status 2) how to continue from the last checkpoint."""
    processes = start_workers(tmp_path, "--max_training_step", "1000", "--ckpt_save_step", "2")
    wait_for_text(processes[0], processes[0].log_path, "saved checkpoint")
    processes[1].kill()
    assert processes[0].wait(120) == 2
    output = open(processes[0].log_path).read()
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output, output[-3000:]
    assert "lost contact with another worker in update" in errors[0]
    assert f"start every worker again with --run_dir {tmp_path / 'run'} to continue from" \
        in errors[0]


def test_sigterm_saves_the_current_step_and_the_run_continues(tmp_path):
    """A preempted trainer (SIGTERM) saves a checkpoint of the step it reached and exits 143;
    the same command continues from there."""
    run_dir = tmp_path / "run"
    flags = ["--norm_type", "group", "--batch_size", "8", "--max_training_step", "1000"]
    process = start_trainer(run_dir, *flags)
    wait_for_text(process, process.log_path, "[train step")
    process.send_signal(signal.SIGTERM)
    assert process.wait(120) == trainer.TERMINATED_STATUS
    output = open(process.log_path).read()
    step = int(output.split("terminated at step ")[1].split()[0])
    assert step >= 1 and tf.train.latest_checkpoint(str(run_dir)).endswith(f"model-{step}")
    output = finish(start_trainer(run_dir, *flags[:-1], str(step + 2)))
    assert f"continuing from {run_dir}/model-{step} at step {step}" in output
    assert f"done: step {step + 2}" in output


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_learns_with_float32_variables(precision, tmp_path):
    try:
        trainer.main(["--precision", precision, "--model", "conv", "--groups", "8",
                      "--batch_size", "32", "--max_batch_size", "32", "--max_training_step",
                      "12", "--log_step", "4", "--run_dir", str(tmp_path / "run")])
        assert keras.mixed_precision.global_policy().compute_dtype == precision.split("_")[1]
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    with open(tmp_path / "run" / "result.json") as f:
        result = json.load(f)
    assert np.isfinite(result["loss"]) and result["accuracy"] > 0.4  # chance: 0.1
    weights = final_weights(tmp_path / "run")
    model_variables = [value for name, value in weights.items()
                       if name.startswith(("model/", "optimizer/_trainable_variables/"))]
    assert len(model_variables) > 20
    assert {value.dtype for value in model_variables} == {np.dtype(np.float32)}


@pytest.mark.parametrize("argv, env, message", [
    (["--strategy", "multi_worker"], {}, "--strategy multi_worker needs TF_CONFIG"),
    (["--strategy", "multi_worker"], {"TF_CONFIG": "{\"cluster\": 1}"}, "TF_CONFIG must be JSON"),
    (["--devices", "0"], {}, "--devices must be at least 1, got 0"),
    (["--devices", "2", "--strategy", "default"], {}, "pass --strategy mirrored (or auto)"),
    (["--batch_size", "3", "--max_batch_size", "8"], {},
     "--batch_size 3 does not fit updates of --max_batch_size 8, which is not a multiple of the "
     "3 examples of one pass (1 replica(s) x --batch_size 3) — pass a --batch_size of 1, 2, 4, "
     "8, or a --max_batch_size that is a multiple of 3"),
    (["--batch_size", "3"], {}, "pass a --batch_size of 1, 2, 4, 8, 16, 32, 64, or a "
                                "--max_batch_size that is a multiple of 3"),
])
def test_setups_that_cannot_work_are_one_line_errors(argv, env, message, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if "TF_CONFIG" not in env:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    assert message in cli_error(trainer.main, argv, capsys)


def test_devices_are_refused_where_there_are_gpus(monkeypatch, capsys):
    physical = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: (
        [tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")] if kind == "GPU"
        else physical(kind)))
    error = cli_error(trainer.main, ["--devices", "2"], capsys)
    assert "this machine has 1 GPU(s) — drop --devices" in error


def test_jit_compile_trains_like_the_plain_graph(monkeypatch, kink_free_network):
    """--jit_compile: each replica's pass compiled by XLA (GN on its TensorFlow-op kernels) gives
    the plain graph's losses to float32 rounding."""
    _, data = input_ops.load("sample", "./datasets")
    in_xla = []
    original = kernel_policy.in_xla_function
    monkeypatch.setattr(kernel_policy, "in_xla_function",
                        lambda: in_xla.append(original()) or in_xla[-1])
    losses = {}
    for jit_compile in (False, True):
        config = train_flags.parse_args([*SMALL, *MOMENTUM_SGD, "--batch_size", "4"]
                                        + (["--jit_compile"] if jit_compile else []))
        config.augment = False
        keras.utils.set_random_seed(0)
        run = updates.Updater(config, data)
        losses[jit_compile] = [float(run.train_step()[0]) for _ in range(3)]
        assert any(in_xla) == jit_compile  # GN saw an XLA-compiled function only with the flag
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)


def test_jit_compile_cannot_hold_sync_batch_norm_over_replicas():
    result = subprocess.run([sys.executable, "trainer.py", "--devices", "2", "--jit_compile",
                             "--norm_type", "sync_batch"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: --jit_compile cannot compile sync_batch's all-reduce")
