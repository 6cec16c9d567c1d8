"""The names the flags choose from: norm types, networks, learning-rate schedules, strategies and
precisions, with GN's default group count and batch_renorm's schedule.

This module imports no TensorFlow, so every CLI checks its flags (and answers --help) before it
imports TensorFlow, which takes seconds: a mistyped flag answers at once. The modules that
implement the names (ops.py, model.py, schedules.py, distribution.py) take them from here.
"""
NORM_TYPES = ("batch", "sync_batch", "group", "layer", "instance", "none", "batch_renorm", "frn",
              "evonorm_s0", "evonorm_b0")
# Norms that carry their own nonlinearity (FRN + TLU, EvoNorm): where a model puts a norm and
# then an activation, these take the place of both (ops.carries_activation).
NORMS_WITH_ACTIVATION = ("frn", "evonorm_s0", "evonorm_b0")
# batch_renorm's clipping schedule as fractions of --max_training_step: plain BN until 5/80 of
# the updates, then d_max reaching 5 at 25/80 and r_max 3 at 40/80 -- the paper's 5k, 25k and
# 40k updates, taken over a run of 80k (docs/norm_family.md).
RENORM_RELAX = (5 / 80, 25 / 80, 40 / 80)
DEFAULT_GROUPS = 32  # the paper's G
MODELS = ("conv", "resnet", "resnet20")
RESIDUAL_MODELS = ("resnet", "resnet20")
SCHEDULES = ("cosine", "step")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
