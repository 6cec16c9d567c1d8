"""trainer.py's flags: the parser, the defaults it resolves, and the checks that need no model.

study.py reads them to check the trainer flags it passes on, and bench.py to build the trainer's
update, without importing a command-line script.
"""
import argparse
import math

import choices
import util
from datasets import registry
from util import UsageError

DESCRIPTION = "Train a classifier with group or batch normalization at any batch size."
DEFAULT_LEARNING_RATE = {"adam": 1e-3, "momentum": 0.1}
# What a continued run takes from the run it continues unless the command line passes it: the
# network, the data and how it is batched, the optimizer and its schedule, the precision.
RUN_FLAGS = ("model", "norm_type", "groups", "channels_per_group", "weight_std", "dropout",
             "zero_init_residual", "dataset", "data_dir", "augment", "seed", "batch_size",
             "max_batch_size", "pass_size", "no_accumulate", "optimizer", "learning_rate",
             "lr_schedule", "warmup_steps", "weight_decay", "precision")
# Flags that size GN's groups together: passing one passes both.
GROUP_SIZE_FLAGS = ("groups", "channels_per_group")
MAX_SEED = 2**32 - 1  # the largest seed numpy and keras.utils.set_random_seed take


def build_parser(**options):
    """The trainer's flags; `options` go to util.ArgumentParser (study.py checks the flags
    it passes on with a strict parser)."""
    parser = util.ArgumentParser(description=DESCRIPTION, **options)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=registry.DEFAULT_DATASET,
                      help="sample (default: the bundled Fashion-MNIST subset), MNIST, Fashion, "
                           "SVHN, CIFAR10, CIFAR100, TinyImageNet, ImageNet, or any NAME with "
                           "<data_dir>/NAME/data.hdf5")
    data.add_argument("--data_dir", default=registry.DEFAULT_DATA_DIR,
                      help="where datasets live (default: %(default)s)")
    data.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                      help="random crop + horizontal flip (default: on for CIFAR10, CIFAR100, "
                           "TinyImageNet and ImageNet, off for digits and clothes)")
    net = parser.add_argument_group("model")
    net.add_argument("--model", choices=choices.MODELS, default=None,
                     help="network (default: conv for images up to 32 px, resnet above)")
    start, d_max_at, r_max_at = (f"{100 * fraction:g}%%" for fraction in choices.RENORM_RELAX)
    net.add_argument("--norm_type", choices=choices.NORM_TYPES, default="group",
                     help=f"normalization after each conv (default: %(default)s). batch_renorm "
                          f"(Batch Renormalization) is plain BN for the first {start} of the "
                          f"--max_training_step updates, then its clipping relaxes linearly to "
                          f"d_max 5 at {d_max_at} and r_max 3 at {r_max_at} (the paper's 5k, 25k "
                          f"and 40k updates over a run of 80k). "
                          f"{', '.join(choices.NORMS_WITH_ACTIVATION)} carry their "
                          "own nonlinearity (FRN + TLU, EvoNorm-S0, -B0) and take the place of "
                          "the norm and its activation (docs/norm_family.md)")
    net.add_argument("--groups", type=int, default=None,
                     help=f"GN's and evonorm_s0's groups G; must divide every normalized "
                          f"layer's channels (default: {choices.DEFAULT_GROUPS})")
    net.add_argument("--channels_per_group", type=int, default=None, metavar="C",
                     help="instead of --groups: C channels in every GN (or evonorm_s0) group, "
                          "so a layer of width W has W / C groups (the paper's Table 3, lower "
                          "half)")
    net.add_argument("--weight_std", action="store_true",
                     help="weight-standardized convs (Qiao et al. 2019)")
    net.add_argument("--dropout", type=float, default=0.2,
                     help="dropout rate of the conv and resnet models (default: %(default)s)")
    net.add_argument("--zero_init_residual", action="store_true",
                     help="start the scale (gamma) of each residual block's last norm at 0, so "
                          "that every block starts as its shortcut (the paper's recipe; resnet "
                          "and resnet20)")
    learn = parser.add_argument_group("learning")
    learn.add_argument("--batch_size", type=int, default=64,
                       help="examples per replica, i.e. per BN statistic (default: %(default)s)")
    learn.add_argument("--max_batch_size", type=int, default=64,
                       help="examples per update: the gradients of max_batch_size / (batch_size "
                            "x replicas) passes are accumulated (default: %(default)s)")
    learn.add_argument("--pass_size", type=pass_size_value, default=None, metavar="P",
                       help="examples of one forward-backward pass per replica: a multiple of "
                            "--batch_size that divides the update's share of a replica, or max "
                            "(all of it). BN (and batch_renorm, evonorm_b0) normalizes each "
                            "--batch_size of them by their own statistics (ghost batches), so "
                            "one pass of P computes what P / batch_size passes do, in less time "
                            "(default: --batch_size)")
    learn.add_argument("--no_accumulate", "--no_adjust_learning_rate", action="store_true",
                       help="one update per pass (batch_size x replicas examples) instead, "
                            "no accumulation (--no_adjust_learning_rate: the 2018 repo's name)")
    learn.add_argument("--optimizer", choices=sorted(DEFAULT_LEARNING_RATE), default="adam",
                       help="adam, or SGD with momentum 0.9 (default: %(default)s)")
    learn.add_argument("--learning_rate", type=float, default=None,
                       help="peak learning rate (default: 1e-3 for adam, 0.1 for momentum)")
    learn.add_argument("--lr_schedule", choices=choices.SCHEDULES, default="cosine",
                       help="cosine: decayed to 0 over max_training_step; step: divided by 10 at "
                            "30%%, 60%% and 90%% of max_training_step (the paper's epochs 30, 60 "
                            "and 90 of 100) (default: %(default)s)")
    learn.add_argument("--warmup_steps", type=int, default=0, metavar="K",
                       help="multiply the learning rate of update k (1, 2, ...) by k / K for "
                            "the first K updates, a linear warm-up from 0 (Goyal et al. 2017; "
                            "default: %(default)s, none)")
    learn.add_argument("--weight_decay", type=float, default=0.0, metavar="W",
                       help="L2 weight decay on every trainable weight, gamma and beta "
                            "included (the paper: 1e-4): W x weight is added to each gradient, "
                            "as an L2 term W/2 |w|^2 in the loss would, before clipping, with "
                            "either optimizer (with adam this is Adam with L2, not AdamW's "
                            "decoupled decay: one meaning for both optimizers, the paper's with "
                            "SGD; the printed loss leaves the term out) (default: %(default)s)")
    learn.add_argument("--max_training_step", type=int, default=400,
                       help="optimizer updates to train for (default: %(default)s)")
    learn.add_argument("--seed", type=int, default=0,
                       help="seed of initialization, shuffling, augmentation and dropout "
                            "(default: %(default)s)")
    devices = add_device_flags(parser)
    devices.add_argument("--precision", choices=choices.PRECISIONS, default="float32",
                         help="Keras dtype policy: mixed_* compute in bfloat16 / float16 with "
                              "float32 variables, statistics and logits; mixed_float16 scales "
                              "the loss (default: %(default)s)")
    devices.add_argument("--jit_compile", action="store_true",
                         help="compile each replica's forward and backward pass with XLA "
                              "(meant for GPUs; on 2 CPU cores it made conv slower, resnet20 "
                              "faster)")
    logs = parser.add_argument_group("logging and checkpoints")
    logs.add_argument("--prefix", default="default",
                      help="first part of the run directory name (default: %(default)s)")
    logs.add_argument("--train_dir", default="./train_dir",
                      help="where run directories are made (default: %(default)s)")
    logs.add_argument("--checkpoint", default=None,
                      help="continue from this checkpoint prefix, or a run directory's latest; "
                           "the network, data, batching, optimizer and schedule flags not "
                           "passed are the run's own")
    logs.add_argument("--run_dir", default=None,
                      help="train in this directory instead of a new one under --train_dir; if "
                           "it holds checkpoints, continue from its latest, so the same command "
                           "run again continues (or completes) an interrupted run")
    logs.add_argument("--log_step", type=int, default=10,
                      help="print a training line every this many steps (default: %(default)s)")
    logs.add_argument("--test_sample_step", type=int, default=10,
                      help="evaluate one test batch every this many steps (default: %(default)s)")
    logs.add_argument("--write_summary_step", type=int, default=10,
                      help="write TensorBoard scalars every this many steps "
                           "(default: %(default)s)")
    logs.add_argument("--ckpt_save_step", type=int, default=1000,
                      help="save a checkpoint every this many steps, and always at the end "
                           "(default: %(default)s)")
    util.add_verbose_flag(logs, also=", and the kernels each op runs (kernels/policy.py)")
    return parser


def pass_size_value(text):
    """--pass_size: a positive number of examples, or max."""
    if text == "max":
        return text
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a positive number of examples nor "
                                         "max")
    return int(text)


def examples_per_pass(pass_size, batch_size, max_batch_size, replicas):
    """A replica's examples per forward-backward pass: --pass_size, where max is the replica's
    share of an update, and by default --batch_size."""
    if pass_size is None:
        return batch_size
    return max(max_batch_size // replicas, batch_size) if pass_size == "max" else pass_size


def run_examples_per_pass(run_config):
    """A replica's examples per pass in a run's config.json: as recorded (how --pass_size
    resolved), or as the flags ask for in a run from before it was recorded."""
    return run_config.get("examples_per_pass") or examples_per_pass(
        run_config.get("pass_size"), run_config["batch_size"], run_config["max_batch_size"],
        run_config["replicas"])


def add_device_flags(parser):
    """--strategy and --devices, shared by trainer.py and evaler.py; returns their group."""
    group = parser.add_argument_group("devices")
    group.add_argument("--strategy", choices=choices.STRATEGIES, default="auto",
                       help="tf.distribute strategy: auto (mirrored over several GPUs or "
                            "--devices, else default), default (one device), mirrored (all "
                            "local devices), multi_worker (the workers of TF_CONFIG) "
                            "(default: %(default)s)")
    group.add_argument("--devices", type=int, default=1,
                       help="split the CPU into this many logical devices, to run and test "
                            "several replicas on a machine without GPUs (default: %(default)s)")
    return group


def parse_args(argv=None):
    config = build_parser().parse_args(argv)
    if config.learning_rate is None:
        config.learning_rate = DEFAULT_LEARNING_RATE[config.optimizer]
    resolve_groups(vars(config))
    return config


def given_flags(argv=None):
    """The names of the flags `argv` (default: the command line) passes, by their settings'
    names (--no_adjust_learning_rate gives no_accumulate)."""
    parser = build_parser()
    not_given = object()  # a default no flag can give (argparse would parse a string default)
    parser.set_defaults(**dict.fromkeys(vars(parser.parse_args([])), not_given))
    given = {name for name, value in vars(parser.parse_args(argv)).items()
             if value is not not_given}
    return given | set(GROUP_SIZE_FLAGS) if given & set(GROUP_SIZE_FLAGS) else given


def take_run_flags(config, given, run_config):
    """Continuing a run: each of RUN_FLAGS that the command line did not pass (`given`, as
    `given_flags` says) takes its value in `run_config`, the run's config.json. Returns those
    that changed, {name: value}."""
    taken = {name: run_config[name] for name in RUN_FLAGS
             if name not in given and getattr(config, name) != run_config[name]}
    for name, value in taken.items():
        setattr(config, name, value)
    return taken


def resolve_groups(settings):
    """--groups, unless --channels_per_group sizes the groups instead (then None); both given is
    a one-line error. `settings`: the parsed flags as a dict, changed in place."""
    if settings["channels_per_group"] is None:
        if settings["groups"] is None:
            settings["groups"] = choices.DEFAULT_GROUPS
    elif settings["groups"] is not None:
        raise UsageError(f"--groups {settings['groups']} and --channels_per_group "
                         f"{settings['channels_per_group']} both size GN's groups — pass one of "
                         "them")


def check_flags(config, data):
    """One-line errors for flag values that cannot work with this dataset."""
    num_train = data.num_train
    if not 0 < config.batch_size <= num_train:
        raise UsageError(f"--batch_size {config.batch_size} must be between 1 and the "
                         f"{num_train} training examples of {config.dataset}")
    for flag in ("max_batch_size", "max_training_step", "log_step", "test_sample_step",
                 "write_summary_step", "ckpt_save_step", "groups", "channels_per_group"):
        if getattr(config, flag) is not None and getattr(config, flag) <= 0:
            raise UsageError(f"--{flag} must be positive, got {getattr(config, flag)}")
    if not 0 <= config.warmup_steps <= config.max_training_step:
        raise UsageError(f"--warmup_steps must be between 0 and --max_training_step "
                         f"{config.max_training_step}, got {config.warmup_steps}")
    if not (math.isfinite(config.weight_decay) and config.weight_decay >= 0):
        raise UsageError(f"--weight_decay must be a number >= 0, got {config.weight_decay}")
    if not 0 <= config.seed <= MAX_SEED:
        raise UsageError(f"--seed must be between 0 and {MAX_SEED}, got {config.seed}")
    if not 0 <= config.dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1), got {config.dropout}")
    if not (math.isfinite(config.learning_rate) and config.learning_rate > 0):
        raise UsageError(f"--learning_rate must be a positive number, got "
                         f"{config.learning_rate}")


def check_devices(config, replicas):
    """One-line errors for flags that cannot work on this many replicas."""
    if config.jit_compile and config.norm_type == "sync_batch" and replicas > 1:
        raise UsageError("--jit_compile cannot compile sync_batch's all-reduce of the "
                         "statistics within a replica's pass — drop --jit_compile, or use "
                         "--norm_type batch or group")


def check_zero_init(config):
    """--zero_init_residual needs residual blocks and a norm whose scale can start at 0."""
    if not config.zero_init_residual:
        return
    if config.model not in choices.RESIDUAL_MODELS:
        raise UsageError(f"--zero_init_residual starts each residual block's last norm at 0, and "
                         f"--model {config.model} has no residual blocks — use --model "
                         f"{' or '.join(choices.RESIDUAL_MODELS)}, or drop the flag")
    if config.norm_type == "none":
        raise UsageError("--zero_init_residual starts the scale of a norm at 0, and --norm_type "
                         "none has none — pick a --norm_type, or drop the flag")
