"""The batch-size study's figures, drawn with matplotlib's Agg backend (no display needed).

Each takes the study's lines by the names they show ("BN", "GN, G=8", ...) and a title that
names the model, dataset and protocol."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)
import numpy as np  # noqa: E402

import util  # noqa: E402

DPI = 100
# Exponential smoothing of the noisy per-step curves, as TensorBoard's slider does.
SMOOTHING = 0.6


def accuracy_vs_batch(path, summary, title):
    """Test error against batch size (log2 axis), one line per normalization, error bars over
    seeds. `summary` is {line name: {batch size: (mean, std, seeds)}}."""
    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=DPI)
    batch_sizes = sorted({b for by_batch in summary.values() for b in by_batch})
    for name, by_batch in summary.items():
        batches = sorted(by_batch)
        means, stds = (np.array([by_batch[b][i] for b in batches]) for i in (0, 1))
        axis.errorbar(batches, means, yerr=stds, marker="o", capsize=3, label=name,
                      linestyle="--" if "precise" in name else "-")
    axis.set_xscale("log", base=2)
    axis.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    axis.minorticks_off()
    axis.set_xlabel("batch size (examples per normalization statistic)")
    axis.set_ylabel("test error (%)")
    axis.set_title(title, fontsize="medium")
    axis.grid(alpha=0.3)
    axis.legend()
    save(figure, path)


def training_curves(path, curves, title, seeds):
    """Training loss (top) and one-batch test accuracy (bottom) against step, one column per
    normalization, one line per batch size, averaged over the `seeds` seeds. `curves` is {(line
    name, batch size, seed): {"train_loss": (steps, values), "test_accuracy": ..., ...}}."""
    norm_types = list(dict.fromkeys(key[0] for key in curves))
    batch_sizes = sorted({key[1] for key in curves})
    colors = dict(zip(batch_sizes, plt.cm.viridis(np.linspace(0, 0.9, len(batch_sizes)))))
    figure, axes = plt.subplots(2, len(norm_types), figsize=(max(7, 4.5 * len(norm_types) + 1), 7),
                                dpi=DPI, sharex=True, sharey="row", squeeze=False)
    for column, norm_type in enumerate(norm_types):
        for row, (metric, label) in enumerate((("train_loss", "training loss"),
                                               ("test_accuracy", "test accuracy (one batch)"))):
            axis = axes[row, column]
            for batch_size in batch_sizes:
                runs = [run[metric] for key, run in curves.items()
                        if key[:2] == (norm_type, batch_size)]
                steps, values = mean_over_runs(runs)
                if len(steps):
                    axis.plot(steps, smooth(values), color=colors[batch_size],
                              label=f"batch {batch_size}")
            axis.grid(alpha=0.3)
            if column == 0:
                axis.set_ylabel(label)
            if row == 1:
                axis.set_xlabel("step (update)")
        axes[0, column].set_title(norm_type)
    if axes[0, -1].get_legend_handles_labels()[0]:  # runs too short to log a step draw none
        axes[0, -1].legend(fontsize="small")
    figure.suptitle(f"{title}\n{smoothing_text(seeds)}", fontsize="medium")
    save(figure, path)


def error_curves(path, curves, title, seeds):
    """The paper's Figure 4: training error (top) and one-batch test error (bottom) against step,
    one column per batch size, one line per normalization, averaged over the `seeds` seeds.
    `curves` as for training_curves."""
    lines = list(dict.fromkeys(key[0] for key in curves))
    batch_sizes = sorted({key[1] for key in curves})
    figure, axes = plt.subplots(2, len(batch_sizes), figsize=(max(7, 4 * len(batch_sizes) + 1), 7),
                                dpi=DPI, sharey="row", squeeze=False)
    for column, batch_size in enumerate(batch_sizes):
        for row, (metric, label) in enumerate((("train_accuracy", "training error (%)"),
                                               ("test_accuracy", "test error (%, one batch)"))):
            axis = axes[row, column]
            for line in lines:
                steps, values = mean_over_runs([run[metric] for key, run in curves.items()
                                                if key[:2] == (line, batch_size)])
                if len(steps):
                    axis.plot(steps, smooth(100 * (1 - values)), label=line)
            axis.grid(alpha=0.3)
            if column == 0:
                axis.set_ylabel(label)
            if row == 1:
                axis.set_xlabel("step (update)")
        axes[0, column].set_title(f"batch {batch_size}")
    if axes[0, -1].get_legend_handles_labels()[0]:
        axes[0, -1].legend(fontsize="small")
    figure.suptitle(f"{title}\n{smoothing_text(seeds)}", fontsize="medium")
    save(figure, path)


def error_vs_groups(path, by_groups, title):
    """The paper's Table 3 as a figure: test error against the number of groups G (left) and the
    channels per group C (right, where the grid has them), log2 axes, one line per batch size
    and norm. `by_groups` is study_report.group_summary's."""
    kinds = [kind for kind in ("G", "C") if any(key[0] == kind for key in by_groups)]
    figure, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.5), dpi=DPI,
                                sharey=True, squeeze=False)
    for axis, kind in zip(axes[0], kinds):
        values = set()
        for (key_kind, batch_size, line), by_value in by_groups.items():
            if key_kind != kind:
                continue
            xs = sorted(by_value)
            values.update(xs)
            means, stds = (np.array([by_value[x][i] for x in xs]) for i in (0, 1))
            axis.errorbar(xs, means, yerr=stds, marker="o", capsize=3,
                          label=f"{line}, batch {batch_size}")
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted(values), [str(v) for v in sorted(values)])
        axis.minorticks_off()
        axis.set_xlabel({"G": "groups G (1 = LN)", "C": "channels per group C (1 = IN)"}[kind])
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    axes[0, 0].set_ylabel("test error (%)")
    figure.suptitle(title, fontsize="medium")
    save(figure, path)


def smoothing_text(seeds):
    return (f"curves smoothed ({SMOOTHING})" +
            (f", mean over {seeds} seeds" if seeds > 1 else ", one seed"))


def mean_over_runs(runs):
    """The mean of several (steps, values) curves at the steps they all have."""
    if not runs:
        return np.array([]), np.array([])
    common = sorted(set.intersection(*(set(steps.tolist()) for steps, _ in runs)))
    values = [dict(zip(steps.tolist(), values)) for steps, values in runs]
    return np.array(common), np.array([np.mean([v[s] for v in values]) for s in common])


def smooth(values):
    smoothed, last = [], values[0] if len(values) else 0.0
    for value in values:
        last = SMOOTHING * last + (1 - SMOOTHING) * value
        smoothed.append(last)
    return np.array(smoothed)


def save(figure, path):
    """Saves to a temporary name and renames, like every other file a run leaves."""
    figure.tight_layout()
    with util.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
