"""Tests of kpn_jax.reporting: tables parse back to the input numbers; files get written."""

import csv
import io
import json
import math
import statistics

import numpy as np
import pytest
from PIL import Image

from kpn_jax import reporting
from kpn_jax.grades import NUM_CLASSES, TASKS

COLUMN_KEYS = TASKS + ("oarsi_average",)
HEADER = ["Metric", "Method", "KL", "JSN L", "JSN M", "O FL", "O FM", "O TL", "O TM", "Average"]


def _result(seed: int, tasks=TASKS) -> dict:
    """An evaluate()-shaped dict with distinct, arbitrary numbers per task and metric."""
    rng = np.random.default_rng(seed)
    out = {}
    for t, task in enumerate(tasks):
        c = NUM_CLASSES[task]
        out[task] = {
            "accuracy": float(rng.uniform(0.5, 0.95)),
            "rmse": float(rng.uniform(0.2, 0.9)),
            "kappa": float(rng.uniform(0.6, 0.95)),
            "balanced_accuracy": float(rng.uniform(0.4, 0.9)),
            "count": int(100 + t),
            "confusion_matrix": rng.integers(0, 30, size=(c, c)).tolist(),
        }
    out["oarsi_average"] = {m: float(rng.uniform(0.3, 0.9))
                            for m in ("accuracy", "rmse", "kappa", "balanced_accuracy")}
    return out


def _parse_markdown(text: str) -> tuple[list[str], dict]:
    """-> (header, {(metric title, method): [cells]}), the metric carried down its block."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip().strip("|").split(" | ")] for line in lines]
    header, rows, metric = split[0], {}, None
    assert all(cell.startswith("---") for cell in split[1])
    for cells in split[2:]:
        metric = cells[0] or metric
        rows[(metric, cells[1])] = cells[2:]
    return header, rows


def test_markdown_table_puts_every_number_in_its_place():
    rows = {"ResNet-50": _result(0), "KPN no ost": _result(1, tasks=TASKS[:3])}
    text = reporting.results_table_markdown(rows, title="Table 2")
    assert text.startswith("**Table 2**")
    header, parsed = _parse_markdown(text)
    assert header == HEADER
    assert list(parsed) == [(m, method) for m in ("Accuracy", "RMSE", "Kappa") for method in rows]
    for (title, method), cells in parsed.items():
        metric = {"Accuracy": "accuracy", "RMSE": "rmse", "Kappa": "kappa"}[title]
        assert len(cells) == 8
        for key, cell in zip(COLUMN_KEYS, cells):
            entry = rows[method].get(key)
            if entry is None:
                assert cell == "-", (method, key)
            else:
                assert cell == f"{entry[metric]:.3f}", (method, key, metric)
    # The osteophyte columns of the second method are the missing ones.
    assert parsed[("RMSE", "KPN no ost")][3:7] == ["-"] * 4


def test_markdown_escapes_pipes_and_shows_nan():
    result = _result(2)
    result["kl"]["kappa"] = math.nan
    text = reporting.results_table_markdown({"a|b": result})
    assert "a\\|b" in text
    kappa_line = [line for line in text.splitlines() if line.startswith("| Kappa")][0]
    assert kappa_line.split(" | ")[2] == "nan"


def test_aggregate_seeds_mean_std_and_pooled_confusion():
    seeds = [_result(s) for s in (10, 11, 12)]
    aggregated = reporting.aggregate_seeds(seeds)
    for key in COLUMN_KEYS:
        for metric in ("accuracy", "rmse", "kappa"):
            values = [s[key][metric] for s in seeds]
            mean, std = aggregated[key][metric]
            assert mean == pytest.approx(statistics.fmean(values), abs=1e-12)
            assert std == pytest.approx(statistics.stdev(values), abs=1e-12)
        assert aggregated[key]["num_seeds"] == 3
    expected_kl = sum(np.asarray(s["kl"]["confusion_matrix"]) for s in seeds)
    np.testing.assert_array_equal(aggregated["kl"]["confusion_matrix"], expected_kl)

    text = reporting.results_table_markdown({"KPN + CL": aggregated})
    _, parsed = _parse_markdown(text)
    mean, std = aggregated["jsn_medial"]["kappa"]
    assert parsed[("Kappa", "KPN + CL")][2] == f"{mean:.3f} ± {std:.3f}"
    assert reporting.format_value((0.7123, 0.0041)) == "0.712 ± 0.004"
    # One seed has no spread: the mean alone, not a made-up ± 0.
    single = reporting.aggregate_seeds([seeds[0]])
    assert math.isnan(single["kl"]["accuracy"][1])
    _, parsed = _parse_markdown(reporting.results_table_markdown({"one": single}))
    assert parsed[("Accuracy", "one")][0] == f"{seeds[0]['kl']['accuracy']:.3f}"


def test_pairs_from_json_round_trip_render_the_same():
    aggregated = reporting.aggregate_seeds([_result(3), _result(4)])
    reloaded = json.loads(json.dumps(reporting.to_jsonable(aggregated)))
    assert (reporting.results_table_markdown({"m": aggregated})
            == reporting.results_table_markdown({"m": reloaded}))


def test_csv_parses_back_to_full_precision():
    rows = {"ResNet-50": _result(5), "KPN, CL": reporting.aggregate_seeds([_result(6), _result(7)]),
            "partial": _result(8, tasks=("kl",))}
    reader = list(csv.DictReader(io.StringIO(reporting.results_table_csv(rows))))
    assert len(reader) == 3 * 3
    assert reader[0].keys() >= {"method", "metric", *COLUMN_KEYS, *(f"{k}_std" for k in COLUMN_KEYS)}
    by_key = {(r["method"], r["metric"]): r for r in reader}
    for method, result in rows.items():
        for metric in ("accuracy", "rmse", "kappa"):
            record = by_key[(method, metric)]
            for key in COLUMN_KEYS:
                value = result.get(key, {}).get(metric)
                if value is None:
                    assert record[key] == "" and record[f"{key}_std"] == ""
                elif isinstance(value, tuple):
                    assert float(record[key]) == value[0] and float(record[f"{key}_std"]) == value[1]
                else:
                    assert float(record[key]) == value and record[f"{key}_std"] == ""
    plain = list(csv.reader(io.StringIO(reporting.results_table_csv({"x": _result(9)}))))
    assert plain[0] == ["method", "metric", *COLUMN_KEYS]  # no std columns without pairs


def _check_png(path, min_size=(600, 300)):
    assert path.exists() and path.stat().st_size > 10_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 5  # something is drawn, not a blank canvas


def _records():
    records = []
    for step in range(0, 400, 20):
        records.append({"step": step, "epoch": step / 100, "train/loss": 2.0 / (1 + step / 100),
                        "train/cls": 1.5 / (1 + step / 100), "train/gmm": 0.3 if step >= 100 else 0.0,
                        "train/log_prob": 10.0 + step / 40, "train/lr": 1e-4 if step < 200 else 5e-5,
                        "train/images_per_sec": 250.0})
        if step % 100 == 0 and step:
            records.append({"step": step, "validation/kl/accuracy": 0.5 + step / 2000,
                            "validation/oarsi_average/accuracy": 0.6 + step / 3000,
                            "validation/kl/kappa": 0.7, "validation/kl/rmse": 0.8})
    return records


@pytest.mark.slow
def test_plots_write_png(tmp_path):
    _check_png(reporting.plot_confusion_matrices(_result(0), tmp_path / "cm.png", title="test"))
    rows = {"ResNet-50": _result(1), "KPN+CL": reporting.aggregate_seeds([_result(2), _result(3)]),
            "partial": _result(4, tasks=TASKS[:3])}
    _check_png(reporting.plot_results_bars(rows, tmp_path / "bars.png"))
    _check_png(reporting.plot_results_bars(rows, tmp_path / "sub" / "rmse.png", metric="rmse"))
    _check_png(reporting.plot_learning_curves(_records(), tmp_path / "curves.png"))
    # A result missing some tasks still plots (those panels say so).
    _check_png(reporting.plot_confusion_matrices(_result(5, tasks=("kl",)), tmp_path / "cm_kl.png"))


def test_learning_curves_from_jsonl_with_partial_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps(r) for r in _records()]
    path.write_text("\n".join(lines) + '\n{"step": 400, "train/lo')  # the trainer mid-write
    assert len(reporting.load_records(path)) == len(lines)
    _check_png(reporting.plot_learning_curves(path, tmp_path / "curves.png"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match="line 2"):
        reporting.load_records(broken)
    with pytest.raises(ValueError, match="step"):
        reporting.load_records([{"train/loss": 1.0}])


def test_metric_series_sorts_and_keeps_last_per_step():
    records = [{"step": 20, "train/loss": 3.0}, {"step": 10, "train/loss": 5.0},
               {"step": 20, "train/loss": 2.0}, {"step": 30, "validation/kl/accuracy": 0.5},
               {"step": 40, "train/loss": float("nan")}]
    steps, values = reporting.metric_series(records, "train/loss")
    np.testing.assert_array_equal(steps, [10, 20])
    np.testing.assert_array_equal(values, [5.0, 2.0])


@pytest.mark.slow
def test_write_report_writes_all_files_and_merges_splits(tmp_path):
    report_dir = tmp_path / "report"
    validation, test = _result(20), _result(21)
    validation["kl"]["kappa"] = math.nan
    written = reporting.write_report(report_dir, "validation", validation, metrics_records=_records(),
                                     method_name="kpn-jax")
    assert set(written) == {"results.json", "results.md", "confusion_matrices_validation.png",
                            "learning_curves.png"}
    _check_png(report_dir / "confusion_matrices_validation.png")
    _check_png(report_dir / "learning_curves.png")

    reporting.write_report(report_dir, "test", test, method_name="kpn-jax")
    saved = json.loads((report_dir / "results.json").read_text())
    assert list(saved) == ["validation", "test"]
    for split, result in (("validation", validation), ("test", test)):
        for key in COLUMN_KEYS:
            for metric in ("accuracy", "rmse", "kappa"):
                expected = result[key][metric]
                assert saved[split][key][metric] == (None if math.isnan(expected) else expected)
        assert saved[split]["kl"]["confusion_matrix"] == result["kl"]["confusion_matrix"]
        assert saved[split]["kl"]["count"] == result["kl"]["count"]
    _check_png(report_dir / "confusion_matrices_test.png")

    markdown = (report_dir / "results.md").read_text()
    assert "## Split: validation" in markdown and "## Split: test" in markdown
    assert "learning_curves.png" in markdown
    test_section = markdown.split("## Split: test")[1]
    _, parsed = _parse_markdown(test_section)
    assert parsed[("Accuracy", "kpn-jax")][0] == f"{test['kl']['accuracy']:.3f}"
    assert parsed[("Accuracy", "kpn-jax")][7] == f"{test['oarsi_average']['accuracy']:.3f}"

    # Re-evaluating a split replaces it and keeps the other.
    reporting.write_report(report_dir, "validation", test)
    saved = json.loads((report_dir / "results.json").read_text())
    assert saved["validation"]["kl"]["accuracy"] == test["kl"]["accuracy"]
    assert saved["test"]["kl"]["accuracy"] == test["kl"]["accuracy"]
    assert not list(report_dir.glob(".*.tmp"))


@pytest.mark.parametrize("call, field", [
    (lambda d: reporting.write_report(d, "../x", _result(0)), "split"),
    (lambda d: reporting.write_report(d, "test", {"foo": 1}), "evaluate_dict"),
    (lambda d: reporting.results_table_markdown({}), "rows"),
    (lambda d: reporting.results_table_markdown({"m": [1, 2]}), "rows\\['m'\\]"),
    (lambda d: reporting.aggregate_seeds([]), "aggregate_seeds"),
])
def test_bad_inputs_raise(tmp_path, call, field):
    with pytest.raises(ValueError, match=field):
        call(tmp_path)


def test_bad_confusion_matrix_raises(tmp_path):
    result = _result(0)
    result["jsn_lateral"]["confusion_matrix"] = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    with pytest.raises(ValueError, match="jsn_lateral"):
        reporting.plot_confusion_matrices(result, tmp_path / "cm.png")
