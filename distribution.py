"""Devices, tf.distribute strategies, precision: where and in what dtype a run computes.

    --strategy auto          mirrored over all GPUs when there are several, or over the --devices
                             logical CPUs; else TensorFlow's default (one device)
    --strategy default       one device
    --strategy mirrored      every local device (GPUs, else the --devices logical CPUs)
    --strategy multi_worker  MultiWorkerMirroredStrategy over the workers TF_CONFIG describes

A *replica* computes one model copy on its own batch; gradients are summed over replicas. A
*worker* is one process; it feeds its local replicas from its own input pipeline (`InputShare`).
Device set-up must come before TensorFlow touches a device, so `make_strategy` is the first
TensorFlow call of a CLI.
"""
import dataclasses
import json
import os

import keras
import tensorflow as tf

from choices import PRECISIONS, STRATEGIES  # the names the flags choose from
from util import UsageError


def make_strategy(name, devices=1):
    """The tf.distribute strategy of `--strategy name --devices devices`."""
    if devices < 1:
        raise UsageError(f"--devices must be at least 1, got {devices}")
    if name == "multi_worker":
        _check_tf_config(os.environ.get("TF_CONFIG"))
    gpus = tf.config.list_physical_devices("GPU")
    if devices > 1:
        if gpus:
            raise UsageError(f"--devices {devices} splits the CPU, but this machine has "
                             f"{len(gpus)} GPU(s) — drop --devices to replicate over the GPUs")
        if name == "default":
            raise UsageError(f"--devices {devices} with --strategy default uses one of them — "
                             "pass --strategy mirrored (or auto)")
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(devices)])
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored" or (name == "auto" and (len(gpus) > 1 or devices > 1)):
        local = [d.name for d in tf.config.list_logical_devices("GPU" if gpus else "CPU")]
        return tf.distribute.MirroredStrategy(local)
    return tf.distribute.get_strategy()


def _check_tf_config(text):
    if not text:
        raise UsageError("--strategy multi_worker needs TF_CONFIG (the cluster and this "
                         "worker's task) in the environment — set it, or use --strategy mirrored "
                         "on one machine")
    try:
        tf_config = json.loads(text)
        tf_config["cluster"], tf_config["task"]["type"], tf_config["task"]["index"]
    except (ValueError, KeyError, TypeError):
        raise UsageError('TF_CONFIG must be JSON like {"cluster": {"worker": ["host:port", ...]}, '
                         '"task": {"type": "worker", "index": 0}}') from None


@dataclasses.dataclass(frozen=True)
class InputShare:
    """This worker's share of every forward pass over all replicas: of the `replicas` batches of
    a pass (in order, one per replica), the `local_replicas` consecutive ones starting at
    `worker_index * local_replicas`. With the same seed the examples of a pass are then the same
    whatever the number of replicas and workers."""
    workers: int
    worker_index: int
    local_replicas: int

    @property
    def replicas(self):
        return self.workers * self.local_replicas


def _local_devices(strategy):
    if isinstance(strategy, (tf.distribute.MirroredStrategy,
                             tf.distribute.MultiWorkerMirroredStrategy)):
        return strategy.extended.worker_devices
    return ("the default device",)


def input_share(strategy):
    local_replicas = len(_local_devices(strategy))
    workers = strategy.num_replicas_in_sync // local_replicas
    return InputShare(workers, _worker_index(strategy) if workers > 1 else 0, local_replicas)


def _worker_index(strategy):
    """The index of this worker among the workers, a chief (if the cluster names one) first:
    the order of MultiWorkerMirroredStrategy's replicas."""
    resolver = strategy.cluster_resolver
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    if resolver.task_type == "chief":
        return 0
    return resolver.task_id + (1 if has_chief else 0)


def is_chief(strategy):
    """Whether this process writes the run directory: always, except on the workers of a
    multi-worker cluster other than its chief (or worker 0 where it names no chief)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return True
    return _worker_index(strategy) == 0


def strategy_name(strategy):
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "MultiWorkerMirroredStrategy"  # whose class is named CollectiveAllReduceStrategy
    return type(strategy).__name__.lstrip("_")


def describe(strategy):
    """E.g. 'MirroredStrategy, 2 replicas (here: CPU:0, CPU:1)'."""
    devices = [device.rsplit("device:", 1)[-1] for device in _local_devices(strategy)]
    replicas = strategy.num_replicas_in_sync
    return (f"{strategy_name(strategy)}, {replicas} replica"
            f"{'s' if replicas > 1 else ''} (here: {', '.join(devices)})")


def set_precision(name):
    """Keras's global dtype policy: variables stay float32, layers compute in `name`'s dtype."""
    keras.mixed_precision.set_dtype_policy(name)
