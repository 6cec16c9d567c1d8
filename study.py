"""The batch-size study: normalization types x batch sizes x seeds (x GN group sizes), one
trainer.py run per cell, collated into a table and figures.

    python study.py                                  # sample, conv, BN and GN at batch 1-64, seed 0
    python study.py --seeds 0 1 2                    # the same study with two more seeds
    python study.py --dataset Fashion --model resnet20 --groups 8 --batch_sizes 2 4 8 16 32 \\
        --max_training_step 1000 --jobs 2
    python study.py --protocol paper --epochs 3 --dataset Fashion --model resnet20 --groups 8 \\
        --optimizer momentum --lr_schedule step --weight_decay 1e-4 --zero_init_residual
    python study.py --pass_size max --jobs 2         # the default study, each update in one pass
    python study.py --norm_types group --batch_sizes 32 --group_counts 1 2 4 8 16 ...
    python study.py --print_commands                 # trainer commands of unfinished cells
    python study.py --report                         # collate what exists, train nothing

Protocols: `fixed_update` (the default) makes every cell's updates the same --max_batch_size
examples, accumulated over batches: only the normalization changes. `paper` is the GN paper's: a
cell of batch N averages --devices_per_update x N examples per update (its 8 GPUs), at
--learning_rate x (update size) / --reference_batch, for the same --epochs at every N.

Every flag not listed below is a trainer.py flag (`python trainer.py --help`) and goes to every
run unchanged. Running the same command again skips finished runs and continues interrupted ones
from their latest checkpoint; more norm types, batch sizes or seeds extend the grid. The study
directory holds study.json (its trainer flags and grid), runs/<cell>/ (ordinary run directories),
logs/<cell>.log, and results.csv, results.md, accuracy_vs_batch.png, curves.png.
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

from tqdm import tqdm

import choices
import study_report
import train_flags
import util
from util import TERMINATED_STATUS, UsageError

REPO = os.path.dirname(os.path.abspath(__file__))
DEFAULT_GRID = {"norm_types": ["batch", "group"], "batch_sizes": [1, 2, 4, 8, 16, 32, 64],
                "seeds": [0], "group_counts": [], "channels_per_group_list": []}
# A norm type of the grid may carry "+ws": the cell also passes --weight_std (GN + WS).
WEIGHT_STD_SUFFIX = "+ws"
# Norm types whose groups the grid's --group_counts and --channels_per_group_list set.
GROUPED_NORMS = ("group", "group" + WEIGHT_STD_SUFFIX)
PROTOCOLS = ("fixed_update", "paper")
# The paper's protocol: 8 GPUs, learning rate 0.1 for 256 examples per update.
PAPER_DEFAULTS = {"devices_per_update": 8, "reference_batch": 256}
# Trainer flags the paper's protocol derives for each cell, and what sets them instead.
PAPER_MANAGED_FLAGS = {"--max_batch_size": "--devices_per_update",
                       "--max_training_step": "--epochs", "--warmup_steps": "--warmup_epochs",
                       **dict.fromkeys(("--no_accumulate", "--no_adjust_learning_rate"),
                                       "nothing (an update is devices_per_update x batch "
                                       "examples)")}
GROUP_FLAGS = ("--groups", "--channels_per_group")
# Trainer settings recorded under an earlier name in study.json.
RENAMED_SETTINGS = {"no_adjust_learning_rate": "no_accumulate"}
# Trainer flags the study sets itself for each cell, and what to pass instead.
STUDY_MANAGED_FLAGS = {"--norm_type": "--norm_types", "--batch_size": "--batch_sizes",
                       "--seed": "--seeds", "--run_dir": "--study_dir",
                       "--train_dir": "--study_dir", "--prefix": "--study_dir",
                       "--checkpoint": "nothing (interrupted runs continue by themselves)"}
BATCH_NORMS = ("batch", "sync_batch")


def parse_args(argv=None):
    parser = util.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False, usage="python study.py [study flags] [trainer.py flags]")
    grid = parser.add_argument_group("the grid (default: batch group / 1 2 4 8 16 32 64 / 0; "
                                     "in an existing --study_dir, its grid)")
    grid.add_argument("--norm_types", nargs="+", metavar="NORM",
                      help=f"--norm_type values: {', '.join(choices.NORM_TYPES)}; NORM+ws adds "
                           "--weight_std (group+ws: GN + WS)")
    grid.add_argument("--batch_sizes", nargs="+", type=int, metavar="B",
                      help="--batch_size values (examples per normalization statistic)")
    grid.add_argument("--seeds", nargs="+", type=int, metavar="S", help="--seed values")
    grid.add_argument("--group_counts", nargs="+", type=int, metavar="G",
                      help="--groups values of the GN cells (the paper's Table 3)")
    grid.add_argument("--channels_per_group_list", nargs="+", type=int, metavar="C",
                      help="--channels_per_group values of the GN cells, beside --group_counts")
    protocol = parser.add_argument_group(
        "the protocol (default: fixed_update; in an existing --study_dir, its own)")
    protocol.add_argument("--protocol", choices=PROTOCOLS, default=None,
                          help="fixed_update: every cell's updates are --max_batch_size examples; "
                               "paper: devices_per_update x batch examples, the learning rate "
                               "scaled with them, the same --epochs in every cell")
    protocol.add_argument("--epochs", type=float, default=None,
                          help="paper: passes over the training set of every cell; its updates "
                               "are epochs x training examples / update size, rounded up")
    protocol.add_argument("--warmup_epochs", type=float, default=None, metavar="W",
                          help="paper: a linear warm-up of the learning rate over the first W "
                               "epochs of every cell (--warmup_steps of W x training examples / "
                               "update size, rounded up), so that it covers the same examples "
                               "at every batch size (default: none)")
    protocol.add_argument("--devices_per_update", type=int, default=None, metavar="D",
                          help="paper: the batches per update, the paper's GPUs (default: "
                               f"{PAPER_DEFAULTS['devices_per_update']}); accumulated over "
                               "passes, or split over --devices replicas")
    protocol.add_argument("--reference_batch", type=int, default=None, metavar="R",
                          help="paper: the update size at which the learning rate is "
                               "--learning_rate; an update of U examples takes --learning_rate "
                               f"x U / R (default: {PAPER_DEFAULTS['reference_batch']})")
    study = parser.add_argument_group("the study")
    study.add_argument("--study_dir", default=None,
                       help="where runs, logs, tables and figures go (default: "
                            "studies/<dataset>, or studies/<dataset>_<model> with --model)")
    study.add_argument("--jobs", type=int, default=1,
                       help="trainer processes at once; the CPU cores are shared between them "
                            "(default: %(default)s)")
    study.add_argument("--precise_bn", type=int, default=200, metavar="K",
                       help="also evaluate every BN run with precise statistics from K training "
                            "batches (evaler.py --precise_bn; 0: off; default: %(default)s)")
    study.add_argument("--train_error", action=argparse.BooleanOptionalAction, default=True,
                       help="also evaluate every finished run on the full training set in "
                            "inference mode (evaler.py --split train): its training error, "
                            "beside the test error in the tables (default: on)")
    mode = study.add_mutually_exclusive_group()
    mode.add_argument("--print_commands", action="store_true",
                      help="print the trainer command of every unfinished cell, one per line "
                           "(for a scheduler), and train nothing")
    mode.add_argument("--report", action="store_true",
                      help="train nothing: evaluate finished runs (training error, precise BN) "
                           "where missing, and collate whatever exists")
    util.add_verbose_flag(study)
    args, trainer_flags = parser.parse_known_args(argv)
    args.trainer_flags = trainer_flags
    return args


# The study directory ----------------------------------------------------------------------------

def check_trainer_flags(trainer_flags):
    """({flag destination: value} of the trainer settings `trainer_flags` change from
    trainer.py's defaults, every setting); one-line errors for flags trainer.py does not know or
    the study sets itself."""
    for name in flag_names(trainer_flags):
        if name in STUDY_MANAGED_FLAGS:
            raise UsageError(f"{name} is set by the study for each run — pass "
                             f"{STUDY_MANAGED_FLAGS[name]} instead")
    parser = train_flags.build_parser(allow_abbrev=False, exit_on_error=False)
    try:
        config, unknown = parser.parse_known_args(trainer_flags)
    except argparse.ArgumentError as error:
        raise UsageError(f"trainer flag {error} — see python trainer.py --help") from None
    if unknown:
        raise UsageError(f"{unknown[0]} is neither a study.py nor a trainer.py flag — see "
                         "python study.py --help and python trainer.py --help")
    defaults, config = vars(parser.parse_args([])), vars(config)
    for settings in (defaults, config):
        train_flags.resolve_groups(settings)
    return {name: value for name, value in config.items() if value != defaults[name]}, config


def flag_names(trainer_flags):
    """The flag names among trainer flags as given (`--name value` or `--name=value`)."""
    return [token.split("=", 1)[0] for token in trainer_flags if token.startswith("--")]


def default_study_dir(trainer_config):
    """studies/<dataset>[_<model>][_pass_<pass size>]: a study with ghost batches computes its
    cells otherwise, so it gets a directory of its own."""
    name = trainer_config.get("dataset", "sample")
    for flag, prefix in (("model", ""), ("pass_size", "pass_")):
        if flag in trainer_config:
            name += f"_{prefix}{trainer_config[flag]}"
    return os.path.join("studies", name)


@dataclasses.dataclass
class Study:
    """What study.json records, and where it lives."""
    study_dir: str
    trainer_flags: list  # as given; passed to every run
    trainer_config: dict  # the settings they change from trainer.py's defaults
    protocol: dict  # {"name": one of PROTOCOLS, and the paper's epochs, devices_per_update, ...}
    norm_types: list
    batch_sizes: list
    seeds: list
    group_counts: list
    channels_per_group_list: list

    RECORDED = ("trainer_flags", "trainer_config", "protocol", *DEFAULT_GRID)

    @functools.cached_property
    def settings(self):
        """Every trainer setting of the study's cells but the grid's and the protocol's."""
        return check_trainer_flags(self.trainer_flags)[1]

    def cells(self):
        return [Cell(norm_type, batch_size, seed, self.study_dir, grouping)
                for norm_type in self.norm_types for grouping in self.groupings(norm_type)
                for batch_size in self.batch_sizes for seed in self.seeds]

    def groupings(self, norm_type):
        """The group sizes of `norm_type`'s cells: ("G", count) and ("C", channels per group)
        pairs, or [None] (the trainer flags' own)."""
        if norm_type not in GROUPED_NORMS:
            return [None]
        return ([("G", g) for g in self.group_counts] +
                [("C", c) for c in self.channels_per_group_list]) or [None]

    def save(self):
        util.write_json(os.path.join(self.study_dir, "study.json"),
                        {name: getattr(self, name) for name in self.RECORDED})


def open_study(args):
    """The study in --study_dir, made or extended by `args`: a new one gets the trainer flags,
    protocol and grid of `args`; an existing one keeps its trainer flags and protocol (others are
    refused) and its grid grows by the values given."""
    trainer_config, _ = check_trainer_flags(args.trainer_flags)
    study_dir = args.study_dir or default_study_dir(trainer_config)
    util.check_writable_directory(study_dir, "--study_dir")
    path = os.path.join(study_dir, "study.json")
    protocol = protocol_of(args)
    if os.path.isfile(path):
        record = {"protocol": {"name": "fixed_update"}, **read_json(path)}
        record["trainer_config"] = {RENAMED_SETTINGS.get(name, name): value
                                    for name, value in record["trainer_config"].items()}
        if args.trainer_flags and trainer_config != record["trainer_config"]:
            made_with = shlex.join(record["trainer_flags"]) or "none"
            raise UsageError(f"{study_dir} was run with other trainer flags ({made_with}) — "
                             "pass those, or another --study_dir")
        if protocol and protocol != record["protocol"]:
            raise UsageError(f"{study_dir} was run with {protocol_text(record['protocol'])}, not "
                             f"{protocol_text(protocol)} — pass those, or another --study_dir")
    elif args.report:
        raise UsageError(f"{study_dir} holds no study (no study.json) — run the study first, "
                         "or pass the --study_dir it was run in")
    else:
        record = {"trainer_flags": args.trainer_flags, "trainer_config": trainer_config,
                  "protocol": protocol or {"name": "fixed_update"}}
    for axis, default in DEFAULT_GRID.items():
        recorded = record.get(axis, [])
        given = getattr(args, axis) or ([] if recorded else default)
        record[axis] = extend_axis(recorded, given, numeric=axis != "norm_types")
    study = Study(study_dir, **{name: record[name] for name in Study.RECORDED})
    check_grid(study)
    check_protocol(study)
    return study


def protocol_of(args):
    """The protocol `args` ask for ({"name": ..., and the paper's settings}), or None when they
    name none; one-line errors for the paper's settings without the paper's protocol."""
    paper_flags = {"epochs": args.epochs, "warmup_epochs": args.warmup_epochs,
                   "devices_per_update": args.devices_per_update,
                   "reference_batch": args.reference_batch}
    given = [name for name, value in paper_flags.items() if value is not None]
    if args.protocol != "paper":
        if given:
            raise UsageError(f"--{given[0]} sets the paper's protocol — add --protocol paper, or "
                             f"drop --{given[0]}")
        return args.protocol and {"name": args.protocol}
    if args.epochs is None:
        raise UsageError("--protocol paper trains every cell for the same epochs — pass "
                         "--epochs E")
    protocol = {"name": "paper", **PAPER_DEFAULTS,
                **{name: value for name, value in paper_flags.items() if value is not None}}
    for name, value in protocol.items():
        if name != "name" and not value > 0:
            raise UsageError(f"--{name} must be positive, got {value}")
    if protocol.get("warmup_epochs", 0) > protocol["epochs"]:
        raise UsageError(f"--warmup_epochs {args.warmup_epochs:g} is longer than --epochs "
                         f"{args.epochs:g} — pass a shorter warm-up")
    return protocol


def protocol_text(protocol):
    """E.g. '--protocol paper --epochs 3 --devices_per_update 8 --reference_batch 256'."""
    settings = [("protocol", protocol["name"])] + [
        (name, protocol[name]) for name in ("epochs", "warmup_epochs", *PAPER_DEFAULTS)
        if name in protocol]
    return " ".join(f"--{name} {value:g}" if not isinstance(value, str) else f"--{name} {value}"
                    for name, value in settings)


def extend_axis(values, more, numeric):
    """`values` and the new ones of `more`: numbers in numeric order, norm types in the order
    they were first given."""
    merged = values + [value for value in dict.fromkeys(more) if value not in values]
    return sorted(merged) if numeric else merged


def check_grid(study):
    for norm_type in study.norm_types:
        if norm_type.removesuffix(WEIGHT_STD_SUFFIX) not in choices.NORM_TYPES:
            raise UsageError(f"--norm_types: unknown {norm_type!r}; choose from "
                             f"{', '.join(choices.NORM_TYPES)}, each with or without "
                             f"{WEIGHT_STD_SUFFIX}")
    for axis in ("batch_sizes", "group_counts", "channels_per_group_list"):
        values = getattr(study, axis)
        if values and min(values) <= 0:
            raise UsageError(f"--{axis} must be positive, got {min(values)}")
    if not 0 <= min(study.seeds) <= max(study.seeds) <= train_flags.MAX_SEED:
        raise UsageError(f"--seeds must be between 0 and {train_flags.MAX_SEED}, got "
                         f"{' '.join(map(str, study.seeds))}")
    grouped = study.group_counts or study.channels_per_group_list
    given = [name for name in flag_names(study.trainer_flags) if name in GROUP_FLAGS]
    if grouped and given:
        raise UsageError(f"{given[0]} and --group_counts / --channels_per_group_list both set the "
                         "GN cells' groups — pass the grid's values only")


def check_protocol(study):
    """The paper's protocol sets the update size and the step count of each cell itself."""
    if study.protocol["name"] != "paper":
        return
    for name in flag_names(study.trainer_flags):
        if name in PAPER_MANAGED_FLAGS:
            raise UsageError(f"{name} is derived for each cell under --protocol paper — pass "
                             f"{PAPER_MANAGED_FLAGS[name]} instead")


def protocol_settings(study, batch_size, num_train):
    """The trainer settings a cell of `batch_size` takes from the study's protocol:
    {max_batch_size, learning_rate, max_training_step[, warmup_steps]} under the paper's, {}
    otherwise."""
    protocol = study.protocol
    if protocol["name"] != "paper":
        return {}
    settings = study.settings
    base_rate = (settings["learning_rate"] or
                 train_flags.DEFAULT_LEARNING_RATE[settings["optimizer"]])
    update = protocol["devices_per_update"] * batch_size
    derived = {"max_batch_size": update,
               "learning_rate": base_rate * update / protocol["reference_batch"],
               "max_training_step": math.ceil(protocol["epochs"] * num_train / update)}
    if "warmup_epochs" in protocol:
        derived["warmup_steps"] = math.ceil(protocol["warmup_epochs"] * num_train / update)
    return derived


# Cells ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Cell:
    norm_type: str  # a --norm_type, or one with WEIGHT_STD_SUFFIX
    batch_size: int
    seed: int
    study_dir: str
    grouping: tuple = None  # ("G", groups) or ("C", channels per group); None: the study's

    @property
    def name(self):
        groups = f"{self.grouping[0]}{self.grouping[1]}-" if self.grouping else ""
        return f"{self.norm_type}-{groups}bs{self.batch_size}-seed{self.seed}"

    @property
    def base_norm_type(self):
        """The cell's --norm_type."""
        return self.norm_type.removesuffix(WEIGHT_STD_SUFFIX)

    @property
    def weight_std(self):
        """Whether the cell also passes --weight_std."""
        return self.norm_type.endswith(WEIGHT_STD_SUFFIX)

    @property
    def flags(self):
        """The trainer flags that make this cell: its norm type, groups, batch size and seed."""
        flags = ["--norm_type", self.base_norm_type] + (["--weight_std"] if self.weight_std else [])
        if self.grouping:
            flags += [{"G": "--groups", "C": "--channels_per_group"}[self.grouping[0]],
                      str(self.grouping[1])]
        return flags + ["--batch_size", str(self.batch_size), "--seed", str(self.seed)]

    @property
    def run_dir(self):
        return os.path.join(self.study_dir, "runs", self.name)

    @property
    def log_path(self):
        return os.path.join(self.study_dir, "logs", self.name + ".log")

    @property
    def result_path(self):
        return os.path.join(self.run_dir, "result.json")

    @property
    def precise_bn_path(self):
        return os.path.join(self.run_dir, "precise_bn.json")

    @property
    def train_eval_path(self):
        return os.path.join(self.run_dir, "train_eval.json")

    def finished(self):
        return os.path.exists(self.result_path)

    def result(self):
        """The run's result.json (the trainer writes it when the run ends)."""
        return read_json(self.result_path)

    def precise_bn_result(self):
        """The run's precise_bn.json, or None before its precise-BN evaluation."""
        return read_json_if_there(self.precise_bn_path)

    def train_eval_result(self):
        """The run's train_eval.json (its training error), or None before it was measured."""
        return read_json_if_there(self.train_eval_path)

    def steps_done(self):
        """The step of the cell's latest checkpoint (0 before its first)."""
        import runs

        latest = runs.latest_checkpoint(self.run_dir)
        return runs.checkpoint_step(latest) if latest else 0


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_json_if_there(path):
    return read_json(path) if os.path.exists(path) else None


def plan(study, cells):
    """{cell name: (its trainer command, its updates)} for `cells`."""
    paper = study.protocol["name"] == "paper"
    num_train = training_examples(study.settings) if paper else None
    planned = {}
    for cell in cells:
        protocol = protocol_settings(study, cell.batch_size, num_train)
        steps = protocol.get("max_training_step", study.settings["max_training_step"])
        planned[cell.name] = (trainer_command(study, cell, protocol), steps)
    return planned


def training_examples(settings):
    """The size of the training set of the study's dataset (the paper's protocol counts epochs
    over it)."""
    import input_ops

    _, data = input_ops.load(settings["dataset"], settings["data_dir"])
    return data.num_train


def trainer_command(study, cell, protocol):
    """`protocol`: the cell's protocol_settings."""
    derived = [token for name, value in protocol.items() for token in (f"--{name}", repr(value))]
    return [sys.executable, os.path.join(REPO, "trainer.py"), *study.trainer_flags, *cell.flags,
            *derived, "--run_dir", cell.run_dir]


def evaler_command(cell, *flags):
    """evaler.py on the cell's latest checkpoint with `flags`, printing JSON."""
    return [sys.executable, os.path.join(REPO, "evaler.py"), "--checkpoint", cell.run_dir,
            *flags, "--json"]


# Running processes ------------------------------------------------------------------------------

def thread_environment(jobs):
    """The environment of each of `jobs` processes at once: TensorFlow's thread pools sized so
    that together they use the cores once, and GPU memory taken as needed (a user's own
    settings are kept)."""
    environment = dict(os.environ)
    if jobs > 1:
        threads = str(max(1, (os.cpu_count() or 1) // jobs))
        for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
            environment.setdefault(name, threads)
        # On a GPU, TensorFlow would otherwise take all its memory for the first process.
        environment.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    return environment


def logged_step(run_dir, default):
    """The step of the last training line a trainer wrote to its run's progress file."""
    import runs

    progress = runs.last_progress(run_dir)
    return progress["step"] if progress else default


def last_error_line(log_path):
    """The line of a failed process's log that says why: its `error:` line, else the last one."""
    with open(log_path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    for says_why in (lambda line: line.startswith("error:"), lambda line: "Error" in line):
        reasons = [line for line in lines if says_why(line)]
        if reasons:
            return reasons[-1]
    return lines[-1] if lines else "no output"


def train_cells(planned, pending, jobs, sigterm):
    """Runs the trainer of every pending cell (`planned`: plan's), `jobs` at a time; one line
    per finished or failed run and a bar over the updates still to make. Returns the failed
    cells. On SIGTERM (`sigterm`, the threading.Event the signal sets) the running trainers are
    sent it too, so that they save and stop rather than train on with no study to watch them."""
    environment = thread_environment(jobs)
    queue, running, failed = list(pending), {}, []
    steps = {cell.name: planned[cell.name][1] for cell in pending}
    progress = {cell.name: min(cell.steps_done(), steps[cell.name]) for cell in pending}
    bar = tqdm(total=sum(steps.values()) - sum(progress.values()), unit="update",
               desc="study", dynamic_ncols=True, disable=None)
    try:
        while queue or running:
            if sigterm.is_set():
                for _, process, _ in running.values():
                    process.send_signal(signal.SIGTERM)
                raise util.Terminated()
            while queue and len(running) < jobs:
                cell = queue.pop(0)
                running[cell.name] = (cell, start(planned[cell.name][0], cell.log_path,
                                                  environment), time.time())
            time.sleep(0.5)
            for name, (cell, process, started) in list(running.items()):
                done = min(logged_step(cell.run_dir, progress[name]), steps[name])
                bar.update(max(0, done - progress[name]))
                progress[name] = max(progress[name], done)
                if process.poll() is None:
                    continue
                del running[name]
                if process.returncode == 0 and cell.finished():
                    bar.update(steps[name] - progress[name])
                    say(finished_line(cell, time.time() - started))
                else:
                    failed.append(cell)
                    say(f"FAILED {cell.name}: {last_error_line(cell.log_path)} "
                        f"(log: {cell.log_path})")
    except KeyboardInterrupt:
        # The trainers got the same Ctrl-C (or SIGTERM) and save a checkpoint; wait for them.
        for _, process, _ in running.values():
            process.wait()
        raise
    finally:
        bar.close()
    return failed


def say(line):
    """A line on stderr, above the progress bar."""
    tqdm.write(line, file=sys.stderr)


def start(command, log_path, environment):
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log_file:
        log_file.write(f"$ {shlex.join(command)}\n")
        log_file.flush()
        return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=environment, cwd=os.getcwd())


def finished_line(cell, wall_seconds):
    result = cell.result()
    return (f"{cell.name}: test accuracy {100 * result['accuracy']:.2f}% at step "
            f"{result['step']} ({wall_seconds / 60:.1f} min)")


def evaluations(study, num_batches, train_error):
    """(cell, what, evaler.py command, output path) of every evaluation a finished run lacks: its
    training error (`train_error`: evaler.py --split train, into train_eval.json) and, for BN
    runs, its test error with precise statistics from `num_batches` training batches (0: none;
    evaler.py --precise_bn, into precise_bn.json)."""
    todo = []
    for cell in (cell for cell in study.cells() if cell.finished()):
        if train_error and cell.train_eval_result() is None:
            todo.append((cell, "training error", evaler_command(cell, "--split", "train"),
                         cell.train_eval_path))
        if (num_batches and cell.norm_type in BATCH_NORMS
                and (cell.precise_bn_result() or {}).get("precise_bn") != num_batches):
            todo.append((cell, "precise BN", evaler_command(cell, "--precise_bn",
                                                            str(num_batches)),
                         cell.precise_bn_path))
    return todo


def evaluate_finished_runs(todo, sigterm):
    """Runs `todo` (evaluations'), writing each JSON report where it belongs, and stops between
    runs on SIGTERM. Returns the cells whose evaluation failed."""
    failed = []
    for cell, what, command, path in tqdm(todo, desc="evaluating", unit="run", disable=None):
        if sigterm.is_set():
            raise util.Terminated()
        result = subprocess.run(command, capture_output=True, text=True,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            failed.append(cell)
            lines = result.stderr.strip().splitlines() or ["no output"]
            say(f"FAILED {what} of {cell.name}: {lines[-1]}")
            continue
        util.write_json(path, json.loads(result.stdout))
    return failed


def main(argv=None):
    args = parse_args(argv)
    if args.jobs <= 0:
        raise UsageError(f"--jobs must be positive, got {args.jobs}")
    util.check_precise_bn_flag(args.precise_bn)
    study = open_study(args)  # every flag checked, before TensorFlow is imported (seconds)
    util.quiet_tensorflow(sys.argv[1:] if argv is None else argv)  # before runs imports it
    study.save()
    pending = [cell for cell in study.cells() if not cell.finished()]
    planned = plan(study, pending)
    if args.print_commands:
        for cell in pending:
            print(shlex.join(planned[cell.name][0]))
        return
    failed = []
    try:
        with util.sigterm_recorded() as sigterm:
            if not args.report:
                say(f"{study.study_dir}: {len(study.cells())} runs, {len(pending)} to train "
                    f"({args.jobs} at a time)")
                failed = train_cells(planned, pending, args.jobs, sigterm)
            failed += evaluate_finished_runs(
                evaluations(study, args.precise_bn, args.train_error), sigterm)
    except util.Terminated:
        say("terminated: run the same command again to continue")
        raise SystemExit(TERMINATED_STATUS)
    except KeyboardInterrupt:
        say("interrupted: run the same command again to continue")
        raise SystemExit(130)
    written = study_report.write_report(study)
    say(f"wrote {', '.join(map(os.path.basename, written))} to {study.study_dir}" if written
        else "no finished run to report yet")
    if failed:
        say(f"{len(failed)} failed: {', '.join(cell.name for cell in failed)}")
        raise SystemExit(1)


if __name__ == "__main__":
    util.run_cli(main)
