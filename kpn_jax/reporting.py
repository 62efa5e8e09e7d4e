"""Evaluation results as a researcher reads them: tables, JSON and plots.

Results come from :func:`kpn_jax.metrics.evaluate`::

    {task: {"accuracy", "rmse", "kappa", "balanced_accuracy", "count",
            "confusion_matrix" ([C][C] nested list, rows = true grade)},
     "oarsi_average": {"accuracy", "rmse", "kappa", "balanced_accuracy"}}

for the tasks of :data:`kpn_jax.grades.TASKS`. Across seeds,
:func:`aggregate_seeds` turns every scalar into a ``(mean, std)`` pair; the
table functions accept either form.

Metric record keys (JSON lines, ``workdir/metrics.jsonl``, one dict per line,
each with ``"step"``; a record may hold any subset of the other keys)::

    step                     int, optimizer steps done (required in every record)
    epoch                    float, epochs done
    train/loss               total loss lambda_cls * L_cls + lambda_gmm * L_gmm
    train/cls                prevalence-weighted cross entropy, summed over the tasks
    train/gmm                incoherence loss softplus(-tau g(P)) / tau
    train/log_prob           mean GMM log-density g(P) of the predictions
    train/lr                 learning rate
    train/images_per_sec     training throughput
    {split}/{task}/{metric}  evaluation, split in {validation, test},
                             task in grades.TASKS, metric in {accuracy, rmse,
                             kappa, balanced_accuracy, count}
    {split}/oarsi_average/{metric}  the mean over the 6 OARSI tasks

:func:`plot_learning_curves` reads exactly these keys. When a step appears
twice for a key (a resumed run), the later record wins.

Plots use matplotlib's object API (``Figure`` + Agg canvas): no pyplot state,
no display needed.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kpn_jax import storage, workdir_config
from kpn_jax.grades import NUM_CLASSES, PAPER_NAMES, TASKS

# Table columns in the paper's Table 2 order: the 7 tasks, then the OARSI mean.
AVERAGE = "oarsi_average"
COLUMNS: tuple[str, ...] = TASKS + (AVERAGE,)
COLUMN_TITLES: dict[str, str] = {**PAPER_NAMES, AVERAGE: "Average"}
TABLE_METRICS: tuple[str, ...] = ("accuracy", "rmse", "kappa")
METRIC_TITLES: dict[str, str] = {
    "accuracy": "Accuracy",
    "rmse": "RMSE",
    "kappa": "Kappa",
    "balanced_accuracy": "Balanced accuracy",
    "count": "Count",
}
TRAIN_LOSS_KEYS: tuple[str, ...] = ("train/loss", "train/cls", "train/gmm")
EVAL_SPLITS: tuple[str, ...] = ("validation", "test")
_SPLIT_ORDER = {"train": 0, "validation": 1, "test": 2}


# ----------------------------------------------------------------------------- values


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _as_pair(value: Any) -> tuple[float, float] | None:
    """``(mean, std)`` for a pair (tuple, list or ``{'mean', 'std'}``), else None."""
    if isinstance(value, Mapping) and set(value) >= {"mean", "std"}:
        value = (value["mean"], value["std"])
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            v is None or _is_number(v) for v in value):
        mean, std = value
        return (math.nan if mean is None else float(mean), math.nan if std is None else float(std))
    return None


def cell_value(result: Mapping, column: str, metric: str) -> float | tuple[float, float] | None:
    """The number (or ``(mean, std)``) of ``metric`` for ``column`` in one result; None if absent."""
    entry = result.get(column)
    if not isinstance(entry, Mapping) or metric not in entry or entry[metric] is None:
        return None
    value = entry[metric]
    pair = _as_pair(value)
    if pair is not None:
        return pair
    if _is_number(value):
        return float(value)
    raise ValueError(f"results: {column}/{metric} must be a number or a (mean, std) pair, "
                     f"got {value!r}")


def format_value(value: float | tuple[float, float] | None, decimals: int = 3) -> str:
    """``0.712``, ``0.712 ± 0.004`` for a pair, ``-`` when absent.

    A pair whose std is NaN (one seed) prints as its mean alone: there is no
    spread to show.
    """
    if value is None:
        return "-"
    if isinstance(value, tuple):
        mean, std = value
        if math.isnan(std):
            return f"{mean:.{decimals}f}"
        return f"{mean:.{decimals}f} ± {std:.{decimals}f}"
    return f"{value:.{decimals}f}"


def _check_rows(rows: Mapping[str, Mapping]) -> None:
    if not isinstance(rows, Mapping) or not rows:
        raise ValueError("rows: expected a non-empty dict of method name -> evaluate() result")
    for method, result in rows.items():
        if not isinstance(result, Mapping):
            raise ValueError(f"rows[{method!r}]: expected an evaluate() dict, got {type(result).__name__}")


def aggregate_seeds(results: Sequence[Mapping]) -> dict:
    """Mean and standard deviation over seeds of ``evaluate()`` dicts.

    Args:
      results: one ``evaluate()`` dict per seed (same tasks, same split).

    Returns:
      The same structure where every scalar metric is ``(mean, std)``, the
      std being the sample standard deviation (ddof=1; NaN for one seed).
      Confusion matrices are summed over the seeds (pooled counts). Each task
      also gets ``num_seeds``: how many of the results held it.
    """
    if not results:
        raise ValueError("aggregate_seeds: results is empty")
    for i, result in enumerate(results):
        if not isinstance(result, Mapping):
            raise ValueError(f"aggregate_seeds: results[{i}] is not an evaluate() dict")
    keys = list(dict.fromkeys(k for result in results for k, v in result.items() if isinstance(v, Mapping)))
    aggregated: dict = {}
    for key in keys:
        entries = [result[key] for result in results if isinstance(result.get(key), Mapping)]
        metrics = list(dict.fromkeys(m for entry in entries for m in entry))
        out: dict = {}
        for metric in metrics:
            values = [entry[metric] for entry in entries if metric in entry and entry[metric] is not None]
            if not values:
                continue
            if metric == "confusion_matrix":
                shapes = {np.shape(v) for v in values}
                if len(shapes) != 1:
                    raise ValueError(f"aggregate_seeds: {key}/confusion_matrix shapes differ: {shapes}")
                out[metric] = np.sum([np.asarray(v, np.int64) for v in values], axis=0).tolist()
            elif all(_is_number(v) for v in values):
                array = np.asarray(values, np.float64)
                std = float(np.std(array, ddof=1)) if len(array) > 1 else math.nan
                out[metric] = (float(np.mean(array)), std)
            else:
                raise ValueError(f"aggregate_seeds: {key}/{metric} is not a number in every result")
        out["num_seeds"] = len(entries)
        aggregated[key] = out
    return aggregated


# ----------------------------------------------------------------------------- tables


def _escape_markdown(text: str) -> str:
    return str(text).replace("|", "\\|")


def results_table_markdown(rows: Mapping[str, Mapping], title: str | None = None,
                           metrics: Sequence[str] = TABLE_METRICS, decimals: int = 3) -> str:
    """The paper's Table 2 as a Markdown table.

    One block of rows per metric (Accuracy, RMSE, Kappa), one row per method,
    columns KL, JSN L, JSN M, O FL, O FM, O TL, O TM, Average (of the six
    OARSI grades). Missing values print as ``-``; ``(mean, std)`` values as
    ``0.712 ± 0.004``.

    Args:
      rows: method name -> ``evaluate()`` dict (or :func:`aggregate_seeds` output).
      title: optional bold caption above the table.
      metrics: which metrics, in block order.
      decimals: digits after the point.

    Returns:
      Markdown text ending in a newline.
    """
    _check_rows(rows)
    header = ["Metric", "Method"] + [COLUMN_TITLES[c] for c in COLUMNS]
    lines = []
    if title:
        lines += [f"**{title}**", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| --- | --- | " + " | ".join("---:" for _ in COLUMNS) + " |")
    for metric in metrics:
        for i, (method, result) in enumerate(rows.items()):
            # The metric's name labels its block once, as in the paper.
            label = METRIC_TITLES.get(metric, metric) if i == 0 else ""
            cells = [format_value(cell_value(result, c, metric), decimals) for c in COLUMNS]
            lines.append("| " + " | ".join([label, _escape_markdown(method)] + cells) + " |")
    return "\n".join(lines) + "\n"


def results_table_csv(rows: Mapping[str, Mapping], metrics: Sequence[str] = TABLE_METRICS,
                      workdirs: Mapping[str, Sequence[str]] | None = None) -> str:
    """The numbers of :func:`results_table_markdown`, machine-readable, full precision.

    One row per (method, metric); columns ``method, metric`` then the task
    keys of :data:`COLUMNS` (``kl ... oarsi_average``). When any value is a
    ``(mean, std)`` pair, ``{column}_std`` columns follow. Missing values are
    empty cells. With ``workdirs`` (method -> its runs' workdirs), a last column
    ``workdirs`` lists them, separated by ``;``.
    """
    _check_rows(rows)
    values = {(method, metric): [cell_value(result, c, metric) for c in COLUMNS]
              for method, result in rows.items() for metric in metrics}
    with_std = any(isinstance(v, tuple) for row in values.values() for v in row)
    header = ["method", "metric", *COLUMNS] + ([f"{c}_std" for c in COLUMNS] if with_std else [])
    header += ["workdirs"] if workdirs is not None else []
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for (method, metric), row in values.items():
        means = ["" if v is None else repr(v[0] if isinstance(v, tuple) else v) for v in row]
        stds = []
        if with_std:
            stds = [repr(v[1]) if isinstance(v, tuple) else "" for v in row]
        tail = [";".join(workdirs.get(method, []))] if workdirs is not None else []
        writer.writerow([method, metric, *means, *stds, *tail])
    return buffer.getvalue()


# ----------------------------------------------------------------------------- plots


def _save(figure: Figure, path) -> Path:
    path = storage.path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    encoded = io.BytesIO()  # matplotlib writes local files only; gs:// takes the bytes
    figure.savefig(encoded, dpi=110, format="png")
    storage.write_atomic(path, encoded.getvalue())
    return path


def _draw_confusion(ax, matrix: np.ndarray, task: str, entry: Mapping) -> None:
    counts = matrix.astype(np.int64)
    row_totals = counts.sum(axis=1, keepdims=True)
    # Row-normalised colour: the share of each true grade predicted as each
    # grade, so rare grades are as visible as common ones.
    fractions = np.divide(counts, row_totals, out=np.zeros(counts.shape, np.float64),
                          where=row_totals > 0)
    ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    size = counts.shape[0]
    for i in range(size):
        for j in range(size):
            share = f"\n{100 * fractions[i, j]:.0f}%" if counts[i, j] else ""
            ax.text(j, i, f"{counts[i, j]}{share}", ha="center", va="center", fontsize=8,
                    color="white" if fractions[i, j] > 0.55 else "black")
    ax.set_xticks(range(size), [str(g) for g in range(size)])
    ax.set_yticks(range(size), [f"{g} (n={row_totals[g, 0]})" for g in range(size)], fontsize=8)
    ax.set_xlabel("predicted grade")
    ax.set_ylabel("true grade")
    summary = []
    for metric, short in (("accuracy", "acc"), ("kappa", "κ"), ("rmse", "RMSE")):
        value = cell_value({task: entry}, task, metric)
        if value is not None:
            summary.append(f"{short} {format_value(value)}")
    ax.set_title(f"{PAPER_NAMES.get(task, task)}\n" + ", ".join(summary), fontsize=10)


def plot_confusion_matrices(evaluate_dict: Mapping, path, title: str | None = None) -> Path:
    """One PNG with a confusion matrix per task (7 panels) and a summary panel.

    Cells show counts and the row share; colour is the row-normalised share.

    Args:
      evaluate_dict: an ``evaluate()`` dict (``confusion_matrix``: rows = true grade).
      path: the PNG to write.
      title: optional figure title.

    Returns:
      ``path`` as a ``Path``.
    """
    if not isinstance(evaluate_dict, Mapping):
        raise ValueError("evaluate_dict: expected an evaluate() dict")
    figure = Figure(figsize=(17, 8.6), layout="constrained")
    axes = figure.subplots(2, 4)
    for ax, task in zip(axes.flat, TASKS):
        entry = evaluate_dict.get(task)
        matrix = entry.get("confusion_matrix") if isinstance(entry, Mapping) else None
        if matrix is None:
            ax.set_title(PAPER_NAMES[task])
            ax.text(0.5, 0.5, "not evaluated", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        matrix = np.asarray(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"evaluate_dict[{task!r}]['confusion_matrix']: expected [C][C], "
                             f"got shape {matrix.shape}")
        if matrix.shape[0] != NUM_CLASSES[task]:
            raise ValueError(f"evaluate_dict[{task!r}]['confusion_matrix']: expected "
                             f"{NUM_CLASSES[task]} classes, got {matrix.shape[0]}")
        _draw_confusion(ax, matrix, task, entry)
    summary_ax = axes.flat[7]
    summary_ax.set_axis_off()
    lines = ["OARSI average (6 grades)"]
    for metric in ("accuracy", "rmse", "kappa", "balanced_accuracy"):
        value = cell_value(evaluate_dict, AVERAGE, metric)
        lines.append(f"  {METRIC_TITLES[metric]}: {format_value(value)}")
    counts = [cell_value(evaluate_dict, t, "count") for t in TASKS]
    counts = [c[0] if isinstance(c, tuple) else c for c in counts if c is not None]
    if counts:
        lines += ["", f"graded knees per task: {int(min(counts))}–{int(max(counts))}"]
    lines += ["", "colour: share of the true grade's row", "cell: count and row share"]
    summary_ax.text(0.02, 0.95, "\n".join(lines), va="top", ha="left", fontsize=11,
                    family="monospace", transform=summary_ax.transAxes)
    if title:
        figure.suptitle(title, fontsize=13)
    return _save(figure, path)


def load_records(records_or_path) -> list[dict]:
    """Metric records from a JSON-lines file or an iterable of dicts.

    A malformed line raises ``ValueError`` with its number, except the last
    line, which a trainer may be writing right now and is then skipped.
    """
    if isinstance(records_or_path, (str, os.PathLike)):
        lines = storage.path(records_or_path).read_text().splitlines()
        numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
        records = []
        for position, (number, line) in enumerate(numbered):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                if position == len(numbered) - 1:
                    break
                raise ValueError(f"{records_or_path}: line {number} is not JSON: {error}") from error
    else:
        records = list(records_or_path)
    for i, record in enumerate(records):
        if not isinstance(record, Mapping) or "step" not in record:
            raise ValueError(f"metrics records: record {i} has no 'step' key: {record!r}")
    return records


def metric_series(records: Iterable[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of ``key``, sorted by step, the last record winning per step."""
    by_step: dict[int, float] = {}
    for record in records:
        value = record.get(key)
        if _is_number(value) and math.isfinite(float(value)):
            by_step[int(record["step"])] = float(value)
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def _eval_splits(records: Sequence[Mapping]) -> list[str]:
    """Splits with evaluation keys ``{split}/{task}/{metric}`` (not ``train``)."""
    pattern = re.compile(rf"^([^/]+)/(?:{'|'.join(COLUMNS)})/[^/]+$")
    splits = {m.group(1) for record in records for key in record
              if (m := pattern.match(key)) and m.group(1) != "train"}
    return sorted(splits, key=lambda s: (_SPLIT_ORDER.get(s, 9), s))


def _no_data(ax, message: str = "no records") -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", color="0.5", transform=ax.transAxes)


def plot_learning_curves(metrics_jsonl_path_or_records, path, title: str | None = None) -> Path:
    """Training losses and evaluation metrics against the step, one PNG.

    Panels: training losses (``train/loss``, ``train/cls``, ``train/gmm``),
    mean GMM log-density ``train/log_prob``, learning rate (with throughput),
    then accuracy, RMSE and kappa of KL and the OARSI average for every
    evaluated split (validation solid, test dashed). Key names: see the module
    docstring.

    Args:
      metrics_jsonl_path_or_records: path of ``metrics.jsonl`` or a list of dicts.
      path: the PNG to write.
      title: optional figure title.
    """
    records = load_records(metrics_jsonl_path_or_records)
    figure = Figure(figsize=(16, 8.5), layout="constrained")
    axes = figure.subplots(2, 3)

    ax = axes[0, 0]
    plotted = False
    for key, colour in zip(TRAIN_LOSS_KEYS, ("black", "C0", "C3")):
        steps, values = metric_series(records, key)
        if len(steps):
            ax.plot(steps, values, color=colour, lw=1.4 if key == "train/loss" else 1.1,
                    marker="." if len(steps) < 30 else None, label=key)
            plotted = True
    ax.set_title("Training losses")
    if plotted:
        ax.legend(fontsize=9)
    else:
        _no_data(ax)

    ax = axes[0, 1]
    steps, values = metric_series(records, "train/log_prob")
    ax.set_title("Coherence: mean GMM log-density g(P)")
    if len(steps):
        ax.plot(steps, values, color="C2", marker="." if len(steps) < 30 else None)
    else:
        _no_data(ax)

    ax = axes[0, 2]
    ax.set_title("Learning rate and throughput")
    steps, values = metric_series(records, "train/lr")
    if len(steps):
        ax.plot(steps, values, color="C4", label="train/lr")
        # Log scale only when the schedule spans decades (warm-up, cosine to 0);
        # the paper's two halvings read better on a linear axis.
        if np.all(values > 0) and values.max() / values.min() > 20:
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.set_ylabel("learning rate", color="C4")
    speed_steps, speed = metric_series(records, "train/images_per_sec")
    if len(speed_steps):
        twin = ax.twinx()
        twin.plot(speed_steps, speed, color="0.5", ls=":", label="images/s")
        twin.set_ylabel("images / s", color="0.5")
        twin.set_ylim(bottom=0)
    if not len(steps) and not len(speed_steps):
        _no_data(ax)

    splits = _eval_splits(records)
    styles = {"validation": "-", "test": "--"}
    markers = {"validation": "o", "test": "s"}
    for ax, metric in zip(axes[1], ("accuracy", "rmse", "kappa")):
        ax.set_title(f"Evaluation {METRIC_TITLES[metric]}" + (" (lower is better)" if metric == "rmse" else ""))
        plotted = False
        for split in splits:
            for column, colour in ((TASKS[0], "C0"), (AVERAGE, "C1")):
                steps, values = metric_series(records, f"{split}/{column}/{metric}")
                if len(steps):
                    ax.plot(steps, values, color=colour, ls=styles.get(split, "-."),
                            marker=markers.get(split, "^"), ms=3 if split == "validation" else 6,
                            label=f"{split} {COLUMN_TITLES[column]}")
                    plotted = True
        if plotted:
            ax.legend(fontsize=9)
        else:
            _no_data(ax, "no evaluation records")

    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        figure.suptitle(title, fontsize=13)
    return _save(figure, path)


def plot_results_bars(table_rows: Mapping[str, Mapping], path, metric: str = "accuracy",
                      title: str | None = None) -> Path:
    """Grouped bars: one group per task (and the OARSI average), one bar per method.

    ``(mean, std)`` values get std error bars; missing values leave a gap.

    Args:
      table_rows: method name -> ``evaluate()`` or :func:`aggregate_seeds` dict.
      path: the PNG to write.
      metric: which metric to plot.
      title: optional title (default: the metric's name).
    """
    _check_rows(table_rows)
    methods = list(table_rows)
    figure = Figure(figsize=(min(16.0, 8.0 + 1.2 * len(methods)), 5.0), layout="constrained")
    ax = figure.subplots()
    width = 0.8 / len(methods)
    positions = np.arange(len(COLUMNS))
    top = 0.0
    for m, method in enumerate(methods):
        values = [cell_value(table_rows[method], c, metric) for c in COLUMNS]
        means = np.array([math.nan if v is None else (v[0] if isinstance(v, tuple) else v) for v in values])
        stds = np.array([v[1] if isinstance(v, tuple) else math.nan for v in values])
        has_std = np.isfinite(stds)
        upper = means + np.where(has_std, stds, 0.0)
        offset = (m - (len(methods) - 1) / 2) * width
        bars = ax.bar(positions + offset, np.nan_to_num(means), width * 0.92, label=method,
                      yerr=np.where(has_std, stds, 0.0) if has_std.any() else None, capsize=3,
                      color=f"C{m % 10}")
        for bar, mean, label_y in zip(bars, means, upper):
            if not np.isfinite(mean):
                bar.set_visible(False)  # a missing value is a gap, not a zero
            elif len(methods) <= 4:
                ax.annotate(f"{mean:.3f}", (bar.get_x() + bar.get_width() / 2, label_y),
                            xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                            fontsize=7, rotation=90 if len(methods) > 2 else 0)
        if np.isfinite(upper).any():
            top = max(top, float(np.nanmax(upper)))
    ax.set_xticks(positions, [COLUMN_TITLES[c] for c in COLUMNS])
    ax.axvline(len(TASKS) - 0.5, color="0.6", lw=0.8, ls=":")  # the average is not a task
    ax.set_ylabel(METRIC_TITLES.get(metric, metric) + (" (lower is better)" if metric == "rmse" else ""))
    ax.set_ylim(0, top * 1.18 if top > 0 else 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=min(len(methods), 4),
              frameon=False)
    figure.suptitle(title or f"{METRIC_TITLES.get(metric, metric)} per grade", fontsize=12)
    return _save(figure, path)


# ----------------------------------------------------------------------------- report folder


def to_jsonable(value: Any) -> Any:
    """numpy and tuples -> plain JSON types; NaN/inf -> None (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [to_jsonable(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _split_counts_line(result: Mapping) -> str:
    counts = []
    for task in TASKS:
        value = cell_value(result, task, "count")
        if value is not None:
            counts.append(f"{PAPER_NAMES[task]} {int(value[0] if isinstance(value, tuple) else value)}")
    return ("Graded knees: " + ", ".join(counts) + ".") if counts else ""


def _results_markdown(results: Mapping[str, Mapping], method_name: str, has_curves: bool) -> str:
    lines = [f"# Results: {method_name}", "",
             "Accuracy, RMSE of the predicted grade and quadratic-weighted Cohen's kappa per grade "
             "(the paper's Table 2 layout); Average = mean of the six OARSI grades.", ""]
    for split in sorted(results, key=lambda s: (_SPLIT_ORDER.get(s, 9), s)):
        lines += [f"## Split: {split}", ""]
        counts = _split_counts_line(results[split])
        if counts:
            lines += [counts, ""]
        lines += [results_table_markdown({method_name: results[split]}).rstrip("\n"), "",
                  f"![confusion matrices, {split}](confusion_matrices_{split}.png)", ""]
    if has_curves:
        lines += ["## Learning curves", "", "![learning curves](learning_curves.png)", ""]
    return "\n".join(lines)


def write_report(report_dir, split: str, evaluate_dict: Mapping, metrics_records=None,
                 method_name: str = "kpn-jax") -> dict[str, Path]:
    """Writes the ``report/`` folder of a training workdir for one evaluated split.

    Files:
      results.json: ``{split: evaluate_dict, ...}``, merged with the splits
        already there (this split replaced); NaN stored as null.
      results.md: a paper-format table per split in results.json.
      confusion_matrices_{split}.png.
      learning_curves.png: when ``metrics_records`` (path or list) is given
        and not empty.

    Returns:
      name -> path of every file written.
    """
    if not isinstance(split, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", split):
        raise ValueError(f"split: expected a plain name like 'validation' or 'test', got {split!r}")
    if not isinstance(evaluate_dict, Mapping) or not any(
            isinstance(evaluate_dict.get(c), Mapping) for c in COLUMNS):
        raise ValueError(f"evaluate_dict: expected an evaluate() dict with task entries {COLUMNS}")
    report_dir = storage.path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    json_path = report_dir / "results.json"
    merged: dict = {}
    if json_path.exists():
        try:
            merged = json.loads(json_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{json_path}: existing results are not valid JSON ({error}); "
                             "move it away to start a fresh report") from error
        if not isinstance(merged, dict):
            raise ValueError(f"{json_path}: expected a JSON object of split -> results")
    merged[split] = to_jsonable(evaluate_dict)
    storage.write_atomic(json_path, json.dumps(merged, indent=2) + "\n")
    written["results.json"] = json_path

    records = None if metrics_records is None else load_records(metrics_records)
    curves_path = report_dir / "learning_curves.png"
    if records:
        written["learning_curves.png"] = plot_learning_curves(records, curves_path,
                                                              title=f"{method_name}: learning curves")
    has_curves = bool(records) or curves_path.exists()

    confusion_name = f"confusion_matrices_{split}.png"
    written[confusion_name] = plot_confusion_matrices(
        evaluate_dict, report_dir / confusion_name, title=f"{method_name}: {split} split")

    markdown_path = report_dir / "results.md"
    storage.write_atomic(markdown_path, _results_markdown(merged, method_name, has_curves))
    written["results.md"] = markdown_path
    return written


# ----------------------------------------------------------------------------- across workdirs
# ``--mode=report``: the paper's tables from finished workdirs, mean ± std over seeds. Each
# workdir holds ``config.json`` and ``report/results.json``; workdirs whose configs are equal
# but for the seed (and the settings below) are seeds of one row, one experiment.

NOT_METRICS = ("checkpoint", "majority_accuracy")

# Config fields that do not make another experiment: the seed, where files are, how fast a
# run goes and how often it logs or keeps checkpoints.
NOT_EXPERIMENT_FIELDS = ("seed", "data_dir", "data_cache_dir", "num_data_threads", "num_data_workers",
                         "keep_checkpoints", "eval_batch_size", "log_every_steps",
                         "checkpoint_every_steps", "model.kernels", "eval_split")


def expand_workdirs(patterns: Sequence[str]) -> list[Path]:
    """Workdir paths from names or glob patterns, in the given order, without duplicates.

    Raises:
      FileNotFoundError: a pattern that matches nothing, or a name that does not exist.
    """
    found: list[Path] = []
    for pattern in patterns:
        expanded = str(Path(pattern).expanduser())
        if any(c in pattern for c in "*?["):
            # Folders only: logs or tables beside the workdirs are not runs.
            matches = sorted(m for m in glob.glob(expanded) if Path(m).is_dir())
            if not matches:
                raise FileNotFoundError(f"no workdir matches {pattern}")
        elif Path(expanded).is_dir():
            matches = [expanded]
        else:
            raise FileNotFoundError(f"workdir {pattern} does not exist"
                                    + (" (a file, not a folder)" if Path(expanded).exists()
                                       else ""))
        for match in matches:
            path = Path(match)
            if path not in found:
                found.append(path)
    return found


def experiment_fields(config: Mapping) -> dict:
    """A saved config's fields that define its experiment (flattened, ``'model.depth'``):
    everything but :data:`NOT_EXPERIMENT_FIELDS`; ``experiment`` (configs/paper.py's
    family arguments) without its ``seed=``."""
    fields = {k: v for k, v in workdir_config.flatten(config).items()
              if k not in NOT_EXPERIMENT_FIELDS}
    if isinstance(fields.get("experiment"), str):
        fields["experiment"] = ",".join(part for part in fields["experiment"].split(",")
                                        if not part.startswith("seed="))
    return fields


def load_run(workdir: Path, split: str) -> tuple[dict, int, dict]:
    """``(saved config, seed, evaluate() dict of split)`` of one finished workdir.

    Raises:
      FileNotFoundError / ValueError: naming the workdir and what is missing.
    """
    results_path = workdir / "report" / "results.json"
    config_path = workdir / "config.json"
    if not results_path.exists():
        raise FileNotFoundError(f"{results_path} not found: has the run in {workdir} finished?")
    results = json.loads(results_path.read_text())
    if split not in results:
        raise ValueError(f"{results_path} has no {split!r} split (it has {sorted(results)})")
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: without it the run's experiment "
                                f"is unknown")
    config = json.loads(config_path.read_text())
    return config, int(config.get("seed", 0)), results[split]


def _value_text(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(_value_text(v) for v in value) + ")"
    return f"{value:g}" if isinstance(value, float) else str(value)


def row_names(experiments: Sequence[dict]) -> list[str]:
    """One name per experiment (its :func:`experiment_fields`): its ``method_name``, and
    where other experiments share that name, what differs from them (``'kpn-jax
    (coherence.enabled=False)'``)."""
    methods = [str(fields.get("method_name") or "run") for fields in experiments]
    names = []
    for i, fields in enumerate(experiments):
        peers = [experiments[j] for j, m in enumerate(methods) if m == methods[i]]
        if len(peers) == 1:
            names.append(methods[i])
            continue
        keys = sorted({k for peer in peers for k in set(peer) | set(fields)})
        differing = [k for k in keys if len({_value_text(peer.get(k, "-")) for peer in peers}) > 1]
        shown = [f"{k}={_value_text(fields.get(k, '-'))}" for k in differing]
        names.append(f"{methods[i]} ({', '.join(shown[:4])}{', ...' if len(shown) > 4 else ''})")
    return names


def collect(workdirs: Sequence[Path], split: str = "test") -> dict[str, list[tuple[Path, dict]]]:
    """Row name -> ``(workdir, evaluate() dict)`` of each of its seeds, rows in first-seen order.

    Raises:
      ValueError: two workdirs of one experiment with the same seed (one run counted twice).
      FileNotFoundError: none has finished.
    """
    groups: dict[tuple, list[tuple[Path, int, dict]]] = {}
    fields_of: dict[tuple, dict] = {}
    unfinished = []
    for workdir in workdirs:
        workdir = Path(workdir)
        if not (workdir / "report" / "results.json").exists():
            unfinished.append(str(workdir))  # a sweep still running: tabulate what is done
            continue
        config, seed, result = load_run(workdir, split)
        fields = experiment_fields(config)
        key = tuple(sorted((k, _value_text(v)) for k, v in fields.items()))
        for other, other_seed, _ in groups.get(key, []):
            if other_seed == seed:
                raise ValueError(f"{other} and {workdir} are the same experiment with the same "
                                 f"seed {seed}: one run would count twice in its row; leave one "
                                 f"out of --workdirs")
        # Bookkeeping beside the metrics (which checkpoint, chance levels) is not averaged.
        result = {k: v for k, v in result.items() if k not in NOT_METRICS}
        groups.setdefault(key, []).append((workdir, seed, result))
        fields_of[key] = fields
    if unfinished:
        print(f"skipped {len(unfinished)} unfinished workdir(s): {', '.join(unfinished)}", flush=True)
    if not groups:
        raise FileNotFoundError(f"none of the {len(workdirs)} workdirs has finished "
                                "(no report/results.json)")
    names = row_names([fields_of[key] for key in groups])
    return {name: [(workdir, result) for workdir, _, result in runs]
            for name, runs in zip(names, groups.values())}


def write_experiment_report(workdirs: Sequence[str], output_dir: str, split: str = "test",
                            title: str | None = None) -> Path:
    """Writes ``table.md``, ``table.csv`` and ``bars_{metric}.png`` for ``workdirs``; returns table.md."""
    runs = collect(expand_workdirs(workdirs), split)
    rows = {name: (aggregate_seeds([r for _, r in seeds]) if len(seeds) > 1 else seeds[0][1])
            for name, seeds in runs.items()}
    row_workdirs = {name: [str(w) for w, _ in seeds] for name, seeds in runs.items()}
    out = Path(output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    caption = title or f"{split} split, mean ± std over seeds"
    markdown = results_table_markdown(rows, title=caption)
    markdown += "\nWorkdirs of each row (its seeds):\n\n" + "".join(
        f"- {_escape_markdown(name)} ({len(dirs)}): {', '.join(dirs)}\n"
        for name, dirs in row_workdirs.items())
    (out / "table.md").write_text(markdown)
    (out / "table.csv").write_text(results_table_csv(rows, workdirs=row_workdirs))
    for metric in TABLE_METRICS:
        plot_results_bars(rows, out / f"bars_{metric}.png", metric=metric,
                                    title=f"{caption}: {METRIC_TITLES[metric]}")
    print(markdown, flush=True)
    return out / "table.md"
