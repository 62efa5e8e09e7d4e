"""``--mode=report``: the paper's tables from finished workdirs, mean ± std over seeds.

Each workdir holds ``config.json`` (its ``method_name`` labels the row) and
``report/results.json`` (written at the end of training). Workdirs with the same
method name are seeds of one row.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Sequence

from kpn_jax import reporting

NOT_METRICS = ("checkpoint", "majority_accuracy")


def expand_workdirs(patterns: Sequence[str]) -> list[Path]:
    """Workdir paths from names or glob patterns, in the given order, without duplicates."""
    found: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser()))) or [pattern]
        for match in matches:
            path = Path(match)
            if path not in found:
                found.append(path)
    return found


def load_run(workdir: Path, split: str) -> tuple[str, int, dict]:
    """``(method name, seed, evaluate() dict of split)`` of one finished workdir.

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
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    return config.get("method_name") or workdir.name, int(config.get("seed", 0)), results[split]


def collect(workdirs: Sequence[Path], split: str = "test") -> dict[str, list[dict]]:
    """Method name -> the evaluate() dicts of its seeds, in first-seen order."""
    rows: dict[str, list[dict]] = {}
    unfinished = []
    for workdir in workdirs:
        if not (Path(workdir) / "report" / "results.json").exists():
            unfinished.append(str(workdir))  # a sweep still running: tabulate what is done
            continue
        method, _, result = load_run(Path(workdir), split)
        # Bookkeeping beside the metrics (which checkpoint, chance levels) is not averaged.
        result = {k: v for k, v in result.items() if k not in NOT_METRICS}
        rows.setdefault(method, []).append(result)
    if unfinished:
        print(f"skipped {len(unfinished)} unfinished workdir(s): {', '.join(unfinished)}", flush=True)
    if not rows:
        raise FileNotFoundError(f"none of the {len(workdirs)} workdirs has finished "
                                "(no report/results.json)")
    return rows


def write_experiment_report(workdirs: Sequence[str], output_dir: str, split: str = "test",
                            title: str | None = None) -> Path:
    """Writes ``table.md``, ``table.csv`` and ``bars_{metric}.png`` for ``workdirs``; returns table.md."""
    runs = collect(expand_workdirs(workdirs), split)
    rows = {method: (reporting.aggregate_seeds(results) if len(results) > 1 else results[0])
            for method, results in runs.items()}
    out = Path(output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    seeds = ", ".join(f"{method}: {len(results)}" for method, results in runs.items())
    caption = title or f"{split} split, mean ± std over seeds"
    markdown = reporting.results_table_markdown(rows, title=caption)
    markdown += f"\nSeeds per row: {seeds}.\n"
    (out / "table.md").write_text(markdown)
    (out / "table.csv").write_text(reporting.results_table_csv(rows))
    for metric in reporting.TABLE_METRICS:
        reporting.plot_results_bars(rows, out / f"bars_{metric}.png", metric=metric,
                                    title=f"{caption}: {reporting.METRIC_TITLES[metric]}")
    print(markdown, flush=True)
    return out / "table.md"
