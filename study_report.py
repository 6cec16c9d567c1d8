"""Collates a study's runs (study.py) into results.csv, results.md, accuracy_vs_batch.png and
curves.png.

A finished run is read from its result.json (and precise_bn.json for BN runs); the training
curves come from its TensorBoard event files, read with TensorBoard's own event reader.
"""
import csv
import io
import os

import numpy as np

import util

NAMES = {"batch": "BN", "sync_batch": "sync BN", "group": "GN", "layer": "LN",
         "instance": "IN", "none": "no norm"}
PRECISE = " (precise)"
CSV_COLUMNS = ("norm_type", "batch_size", "seed", "step", "test_accuracy", "test_loss",
               "precise_bn_test_accuracy", "seconds", "images_per_sec", "run_dir")


def write_report(study):
    """Writes the four files into the study directory; returns their paths (none without a
    finished run)."""
    rows = [read_row(cell) for cell in study.cells() if cell.finished()]
    if not rows:
        return []
    paths = [os.path.join(study.study_dir, name) for name in
             ("results.csv", "results.md", "accuracy_vs_batch.png", "curves.png")]
    write_text(paths[0], csv_text(rows))
    config = rows[0]["config"]  # the same in every run but for the grid's flags
    write_text(paths[1], markdown(rows, config))
    import plots  # matplotlib, only when there is something to draw

    plots.accuracy_vs_batch(paths[2], summarize(rows), config)
    plots.training_curves(paths[3], {(row["norm_type"], row["batch_size"], row["seed"]):
                                     read_curves(row["run_dir"]) for row in rows}, config, NAMES)
    return paths


def read_row(cell):
    result, precise = cell.result(), cell.precise_bn_result()
    return {"norm_type": cell.norm_type, "batch_size": cell.batch_size, "seed": cell.seed,
            "step": result["step"], "test_accuracy": result["accuracy"],
            "test_loss": result["loss"],
            "precise_bn_test_accuracy": precise and precise["accuracy"],
            "seconds": result["seconds"], "images_per_sec": result["images_per_sec"],
            "run_dir": cell.run_dir, "config": result["config"]}


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

def summarize(rows):
    """{line name: {batch size: (mean test error %, standard deviation over seeds, seeds)}}, with
    a line "<norm> (precise)" for BN runs evaluated with precise statistics."""
    errors = {}
    for row in rows:
        name = NAMES.get(row["norm_type"], row["norm_type"])
        errors.setdefault(name, {}).setdefault(row["batch_size"], []).append(
            100 * (1 - row["test_accuracy"]))
        if row["precise_bn_test_accuracy"] is not None:
            errors.setdefault(name + PRECISE, {}).setdefault(row["batch_size"], []).append(
                100 * (1 - row["precise_bn_test_accuracy"]))
    return {name: {batch: (np.mean(values), np.std(values, ddof=1) if len(values) > 1 else 0.0,
                           len(values))
                   for batch, values in sorted(by_batch.items())}
            for name, by_batch in errors.items()}


def markdown(rows, config):
    summary = summarize(rows)
    batch_sizes = sorted({row["batch_size"] for row in rows})
    seeds = sorted({row["seed"] for row in rows})
    lines = [f"# Batch-size study: test error (%) of {config['model']} on {config['dataset']}",
             "",
             protocol(config, seeds),
             "",
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
    lines += ["", "Per run: results.csv. Figures: accuracy_vs_batch.png, curves.png.", ""]
    return "\n".join(lines)


def protocol(config, seeds):
    """One paragraph on how every cell was trained and measured."""
    if config["no_adjust_learning_rate"]:
        updates = (f"{config['max_training_step']} updates of one batch each "
                   "(--no_adjust_learning_rate: smaller batches see fewer examples)")
    else:
        updates = (f"{config['max_training_step']} updates of {config['max_batch_size']} "
                   "examples each; a batch is the examples per normalization statistic, and "
                   "the gradients of max_batch_size / batch batches are accumulated per update, "
                   "so every cell sees the same examples per update and in all")
    # model.py's resnet20 has no dropout layer, whatever --dropout says.
    dropout = "no dropout" if config["model"] == "resnet20" else f"dropout {config['dropout']}"
    return (f"{updates}. {config['optimizer']}, learning rate {config['learning_rate']} "
            f"cosine-decayed to 0, {dropout}, augmentation "
            f"{'on' if config['augment'] else 'off'}, GN with {config['groups']} groups. "
            f"Test error on the full test set; {seeds_text(seeds)}.")


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
    """{"train_loss": (steps, values), "test_accuracy": (steps, values)} of a run. A run continued
    after an interruption may have logged some steps twice; the later value is kept."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    curves = {}
    for split, tag in (("train", "loss"), ("test", "accuracy")):
        reader = event_accumulator.EventAccumulator(
            os.path.join(run_dir, split), size_guidance={event_accumulator.TENSORS: 0})
        reader.Reload()
        by_step = {}
        if tag in reader.Tags()["tensors"]:
            for event in sorted(reader.Tensors(tag), key=lambda e: e.wall_time):
                by_step[event.step] = float(tensor_util.make_ndarray(event.tensor_proto))
        steps = sorted(by_step)
        curves[f"{split}_{tag}"] = (np.array(steps), np.array([by_step[s] for s in steps]))
    return curves
