"""The names the flags choose from: norm types, networks, learning-rate schedules, strategies and
precisions, with GN's default group count.

This module imports no TensorFlow, so every CLI checks its flags (and answers --help) before it
imports TensorFlow, which takes seconds: a mistyped flag answers at once. The modules that
implement the names (ops.py, model.py, schedules.py, distribution.py) take them from here.
"""
NORM_TYPES = ("batch", "sync_batch", "group", "layer", "instance", "none")
DEFAULT_GROUPS = 32  # the paper's G
MODELS = ("conv", "resnet", "resnet20")
RESIDUAL_MODELS = ("resnet", "resnet20")
SCHEDULES = ("cosine", "step")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
