"""Collates a study's runs (study.py) into results.csv, results.md, accuracy_vs_batch.png,
curves.png, error_curves.png and, for a grid of GN group sizes, error_vs_groups.png.

A finished run is read from its result.json, its train_eval.json (the training error, in
inference mode over the full training set) and, for BN runs, precise_bn.json; the training curves
come from its TensorBoard event files, read with TensorBoard's own event reader.
"""
import csv
import io
import os

import numpy as np

import train_flags
import util

NAMES = {"batch": "BN", "sync_batch": "sync BN", "group": "GN", "layer": "LN",
         "instance": "IN", "none": "no norm", "batch_renorm": "BRN", "frn": "FRN",
         "evonorm_s0": "EvoNorm-S0", "evonorm_b0": "EvoNorm-B0"}
PRECISE = " (precise)"
TRAINING = ", training error"
CSV_COLUMNS = ("norm_type", "groups", "channels_per_group", "batch_size", "seed", "step",
               "examples_per_update", "learning_rate", "test_accuracy", "test_loss",
               "precise_bn_test_accuracy", "train_accuracy", "train_loss", "seconds",
               "images_per_sec", "run_dir")


def write_report(study):
    """Writes the files into the study directory; returns their paths (none without a finished
    run)."""
    rows = [read_row(cell) for cell in study.cells() if cell.finished()]
    if not rows:
        return []
    names = ["results.csv", "results.md", "accuracy_vs_batch.png", "curves.png",
             "error_curves.png"]
    grouped = any(row["grouping"] for row in rows)
    paths = [os.path.join(study.study_dir, name)
             for name in names + (["error_vs_groups.png"] if grouped else [])]
    write_text(paths[0], csv_text(rows))
    config = rows[0]["config"]  # the same in every run but for the grid's and protocol's flags
    summary = summarize(rows)
    write_text(paths[1], markdown(rows, summary, config, study.protocol))
    import plots  # matplotlib, only when there is something to draw

    title = f"{config['model']} on {config['dataset']}, {protocol_title(study.protocol, config)}"
    plots.accuracy_vs_batch(paths[2], summary, title)
    curves = {(row["line"], row["batch_size"], row["seed"]): read_curves(row["run_dir"])
              for row in rows}
    seeds = len({row["seed"] for row in rows})
    plots.training_curves(paths[3], curves, title, seeds)
    plots.error_curves(paths[4], curves, title, seeds)
    if grouped:
        plots.error_vs_groups(paths[5], group_summary(rows), title)
    return paths


def read_row(cell):
    result, precise, train = cell.result(), cell.precise_bn_result(), cell.train_eval_result()
    config = result["config"]
    return {"norm_type": cell.norm_type, "grouping": cell.grouping,
            "norm": norm_name(cell), "line": line_name(cell),
            "groups": config["groups"], "channels_per_group": config.get("channels_per_group"),
            "batch_size": cell.batch_size, "seed": cell.seed, "step": result["step"],
            "examples_per_update": examples_per_update(config),
            "learning_rate": config["learning_rate"],
            "test_accuracy": result["accuracy"], "test_loss": result["loss"],
            "precise_bn_test_accuracy": precise and precise["accuracy"],
            "train_accuracy": train and train["accuracy"], "train_loss": train and train["loss"],
            "seconds": result["seconds"], "images_per_sec": result["images_per_sec"],
            "run_dir": cell.run_dir, "config": config}


def examples_per_update(config):
    """accumulation_steps passes of each replica's pass size."""
    return (config["accumulation_steps"] * train_flags.run_examples_per_pass(config)
            * config["replicas"])


def norm_name(cell):
    """A cell's normalization as tables and figures name it: 'BN', 'GN', 'GN+WS'."""
    return NAMES.get(cell.base_norm_type, cell.base_norm_type) + ("+WS" if cell.weight_std else "")


def line_name(cell):
    """A cell's line in tables and figures: its norm_name, with its groups where the grid sets
    them ('GN, G=8', 'GN, C=16')."""
    grouping = cell.grouping
    return f"{norm_name(cell)}, {grouping[0]}={grouping[1]}" if grouping else norm_name(cell)


def write_text(path, text):
    with util.atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def csv_text(rows):
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


# The table --------------------------------------------------------------------------------------

def errors_by(rows, key, measures):
    """{line name + suffix: {key(row): [error %, ...]}} for each (suffix, accuracy column) of
    `measures`, from the rows that have that column."""
    errors = {}
    for row in rows:
        for suffix, column in measures:
            if row[column] is not None:
                errors.setdefault(row["line"] + suffix, {}).setdefault(key(row), []).append(
                    100 * (1 - row[column]))
    return errors


# The test error of each line, and "<line> (precise)" for BN runs evaluated with precise BN.
TEST_ERRORS = (("", "test_accuracy"), (PRECISE, "precise_bn_test_accuracy"))
TRAINING_ERRORS = ((TRAINING, "train_accuracy"),)


def statistics(values):
    """(mean, standard deviation over seeds, seeds) of the test errors of one cell."""
    return np.mean(values), np.std(values, ddof=1) if len(values) > 1 else 0.0, len(values)


def summarize(rows, measures=TEST_ERRORS):
    """{line name: {batch size: (mean error %, standard deviation over seeds, seeds)}} of the
    errors `measures` names (errors_by's; by default the test errors)."""
    return {name: {batch: statistics(values) for batch, values in sorted(by_batch.items())}
            for name, by_batch in errors_by(rows, lambda row: row["batch_size"],
                                            measures).items()}


def group_summary(rows):
    """{("G" or "C", batch size, norm): {groups or channels per group: (mean, std, seeds)}} of
    the cells that set their GN groups."""
    summary = {}
    for row in rows:
        if row["grouping"]:
            kind, value = row["grouping"]
            key = (kind, row["batch_size"], row["norm"])
            summary.setdefault(key, {}).setdefault(value, []).append(
                100 * (1 - row["test_accuracy"]))
    return {key: {value: statistics(errors) for value, errors in sorted(by_value.items())}
            for key, by_value in sorted(summary.items())}


def markdown(rows, summary, config, protocol):
    batch_sizes = sorted({row["batch_size"] for row in rows})
    seeds = sorted({row["seed"] for row in rows})
    lines = [f"# Batch-size study: test error (%) of {config['model']} on {config['dataset']}",
             "", protocol_paragraph(protocol, rows, config, seeds), "",
             "| | " + " | ".join(f"batch {b}" for b in batch_sizes) + " |",
             "|---|" + "---|" * len(batch_sizes)]
    for name, by_batch in summary.items():
        lines.append(f"| {name} | " + " | ".join(cell_text(by_batch.get(b))
                                                 for b in batch_sizes) + " |")
    for first, second in (("BN", "GN"), ("BN" + PRECISE, "GN")):
        if first in summary and second in summary:
            lines.append(f"| {first} − {second} | " + " | ".join(
                difference_text(summary[first].get(b), summary[second].get(b))
                for b in batch_sizes) + " |")
    for name, by_batch in summarize(rows, TRAINING_ERRORS).items():
        lines.append(f"| {name} | " + " | ".join(cell_text(by_batch.get(b))
                                                 for b in batch_sizes) + " |")
    lines += groups_tables(group_summary(rows))
    lines += runs_table(rows)
    figures = ["accuracy_vs_batch.png", "curves.png", "error_curves.png"]
    if any(row["grouping"] for row in rows):
        figures.append("error_vs_groups.png")
    lines += ["", f"Per run: results.csv. Figures: {', '.join(figures)}.", ""]
    return "\n".join(lines)


def runs_table(rows):
    """Every run's own numbers, the seeds the table above averages."""
    lines = ["", "Each run (error in %; training error in inference mode over the full training "
             "set):", "", "| run | test error | precise BN test error | training error |",
             "|---|---|---|---|"]
    for row in sorted(rows, key=lambda row: (row["line"], row["batch_size"], row["seed"])):
        errors = [row["test_accuracy"], row["precise_bn_test_accuracy"], row["train_accuracy"]]
        lines.append(f"| {row['line']}, batch {row['batch_size']}, seed {row['seed']} | "
                     + " | ".join("" if accuracy is None else f"{100 * (1 - accuracy):.2f}"
                                  for accuracy in errors) + " |")
    return lines


def groups_tables(by_groups):
    """The paper's Table 3 layout: test error against the number of groups G (and against the
    channels per group C), one row per batch size and norm."""
    lines = []
    for kind, heading in (("G", "groups G"), ("C", "channels per group C")):
        keys = [key for key in by_groups if key[0] == kind]
        if not keys:
            continue
        values = sorted({value for key in keys for value in by_groups[key]})
        lines += ["", f"Test error (%) against the {heading}:", "",
                  "| | " + " | ".join(f"{kind}={value}" for value in values) + " |",
                  "|---|" + "---|" * len(values)]
        for key in keys:
            lines.append(f"| {key[2]}, batch {key[1]} | " + " | ".join(
                cell_text(by_groups[key].get(value)) for value in values) + " |")
    return lines


def protocol_paragraph(protocol, rows, config, seeds):
    """One paragraph on how every cell was trained and measured."""
    if protocol["name"] == "paper":
        updates = paper_updates(protocol, rows)
    elif config.get("no_accumulate", config.get("no_adjust_learning_rate")):  # its 2018 name
        updates = (f"{config['max_training_step']} updates of one batch each "
                   "(--no_accumulate: smaller batches see fewer examples)")
    else:
        updates = (f"The fixed-update protocol: {config['max_training_step']} updates of "
                   f"{config['max_batch_size']} examples each; a batch is the examples per "
                   "normalization statistic, and the gradients of max_batch_size / batch "
                   "batches are accumulated per update, so every cell sees the same examples "
                   "per update and in all")
    if config.get("pass_size"):
        size = config["pass_size"]
        examples = "its whole share of an update" if size == "max" else f"{size} examples"
        updates += (f"; a replica computes {examples} in one pass (--pass_size {size}), BN "
                    "taking its statistics over each batch within it (ghost batches)")
    # model.py's resnet20 has no dropout layer, whatever --dropout says.
    dropout = "no dropout" if config["model"] == "resnet20" else f"dropout {config['dropout']}"
    rate = "" if protocol["name"] == "paper" else f" {config['learning_rate']}"
    return (f"{updates}. {config['optimizer']}, learning rate{rate} "
            f"{schedule_text(config, protocol)}, "
            f"{recipe_text(config)}, {dropout}, augmentation "
            f"{'on' if config['augment'] else 'off'}, {groups_text(rows, config)}. "
            f"Test error on the full test set; {seeds_text(seeds)}.")


def paper_updates(protocol, rows):
    per_batch = {row["batch_size"]: (row["examples_per_update"], row["learning_rate"],
                                     row["config"]["max_training_step"]) for row in rows}
    cells = "; ".join(f"batch {batch}: {update} examples, rate {rate:g}, {steps} updates"
                      for batch, (update, rate, steps) in sorted(per_batch.items()))
    update, rate, _ = next(iter(per_batch.values()))
    base_rate = rate * protocol["reference_batch"] / update
    devices = protocol["devices_per_update"]
    update_text = ("The paper's protocol on one device: an update is one batch" if devices == 1
                   else f"The paper's protocol: an update averages the gradients of {devices} x "
                   f"batch examples (the paper's {devices} GPUs, each normalizing its own batch; "
                   "here accumulated over passes)")
    return (f"{update_text}, the learning rate is {base_rate:g} x update / "
            f"{protocol['reference_batch']}, and every cell trains {epochs_text(protocol)} "
            f"({cells})")


def schedule_text(config, protocol):
    schedule = {"cosine": "cosine-decayed to 0",
                "step": "divided by 10 at 30 %, 60 % and 90 % of the updates"}[
        config.get("lr_schedule", "cosine")]
    if "warmup_epochs" in protocol:
        warmup = protocol["warmup_epochs"]
        return schedule + f" after a linear warm-up over the first {warmup:g} epoch" + (
            "" if warmup == 1 else "s")
    warmup = config.get("warmup_steps", 0)
    return schedule + (f" after a linear warm-up of {warmup} updates" if warmup else "")


def recipe_text(config):
    decay = config.get("weight_decay", 0.0)
    return ", ".join([f"weight decay {decay:g} (L2, on every weight)" if decay
                      else "no weight decay",
                      "zero-init residual gamma" if config.get("zero_init_residual")
                      else "every gamma starts at 1"])


def groups_text(rows, config):
    if any(row["grouping"] for row in rows):
        return "GN's groups as in each row"
    if config.get("channels_per_group"):
        return f"GN with {config['channels_per_group']} channels per group"
    return f"GN with {config['groups']} groups"


def protocol_title(protocol, config):
    """The protocol in a figure title, and the ghost batches where a pass holds several."""
    size = config.get("pass_size")
    ghosts = "" if not size else (", ghost batches, one pass per update" if size == "max" else
                                  f", ghost batches, passes of {size}")
    if protocol["name"] == "paper":
        return (f"paper's protocol ({protocol['devices_per_update']} x batch per update, "
                f"{epochs_text(protocol)}){ghosts}")
    return (f"fixed update ({config['max_training_step']} x {config['max_batch_size']} "
            f"examples){ghosts}")


def epochs_text(protocol):
    return f"{protocol['epochs']:g} epoch{'' if protocol['epochs'] == 1 else 's'}"


def seeds_text(seeds):
    if len(seeds) == 1:
        return f"one run per cell (seed {seeds[0]})"
    return f"mean ± standard deviation over seeds {', '.join(map(str, seeds))}"


def cell_text(entry):
    if entry is None:
        return ""
    mean, std, count = entry
    return f"{mean:.1f} ± {std:.1f}" if count > 1 else f"{mean:.1f}"


def difference_text(first, second):
    if first is None or second is None:
        return ""
    return f"{first[0] - second[0]:+.1f}"


# Training curves from TensorBoard ---------------------------------------------------------------

def read_curves(run_dir):
    """{"train_loss", "train_accuracy", "test_accuracy": (steps, values)} of a run. A run
    continued after an interruption may have logged some steps twice; the later value is
    kept."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    curves = {}
    for split, tags in (("train", ("loss", "accuracy")), ("test", ("accuracy",))):
        reader = event_accumulator.EventAccumulator(
            os.path.join(run_dir, split), size_guidance={event_accumulator.TENSORS: 0})
        reader.Reload()
        for tag in tags:
            by_step = {}
            if tag in reader.Tags()["tensors"]:
                for event in sorted(reader.Tensors(tag), key=lambda e: e.wall_time):
                    by_step[event.step] = float(tensor_util.make_ndarray(event.tensor_proto))
            steps = sorted(by_step)
            curves[f"{split}_{tag}"] = (np.array(steps), np.array([by_step[s] for s in steps]))
    return curves
