"""Table 4's rows in the regime (benchmarks/regime.sh): mean ± std over seeds, paired
differences (same seed) with their spread, wall time, and the GMM log-density of the test
predictions.

    python benchmarks/results/cpu_2026-12-06/regime/summarize.py [ROOT [SPLIT [POOL_ROOT]]]

ROOT defaults to workdirs/regime, SPLIT to test, POOL_ROOT (the pool variant's sweep) to
ROOT's sibling regime_pool.
"""

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(sys.argv[1] if len(sys.argv) > 1 else "workdirs/regime")
ROWS = {"global, 100 %": "kpn-0_cl-0", "KPN, 20 %": "kpn-1_cl-0_labeled-0.2",
        "KPN, 40 %": "kpn-1_cl-0_labeled-0.4", "KPN, 100 %": "kpn-1_cl-0",
        "KPN + CL, 20 %": "kpn-1_cl-1_labeled-0.2", "KPN + CL, 40 %": "kpn-1_cl-1_labeled-0.4",
        "KPN + CL, 100 %": "kpn-1_cl-1"}
PAIRS = [("KPN + CL, 20 %", "KPN, 20 %"), ("KPN + CL, 40 %", "KPN, 40 %"),
         ("KPN + CL, 100 %", "KPN, 100 %"), ("KPN + CL, 20 %", "global, 100 %"),
         ("KPN + CL, 40 %", "global, 100 %"), ("KPN, 100 %", "global, 100 %")]
SEEDS = (0, 1, 2)
SPLIT = sys.argv[2] if len(sys.argv) > 2 else "test"
POOL_ROOT = Path(sys.argv[3]) if len(sys.argv) > 3 else ROOT.parent / "regime_pool"
# The variant: the unlabelled pool without the 6,000 ungraded images (5,000, not 11,000).
ROWS["KPN + CL, 20 %, pool: training split only"] = str(
    (POOL_ROOT / "kpn-1_cl-1_labeled-0.2_pool-train").resolve())
PAIRS += [("KPN + CL, 20 %, pool: training split only", "KPN, 20 %"),
          ("KPN + CL, 20 %", "KPN + CL, 20 %, pool: training split only")]


def metrics(run: Path) -> dict | None:
    path = run / "report" / "results.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())[SPLIT]
    return {"KL acc": result["kl"]["accuracy"], "KL RMSE": result["kl"]["rmse"],
            "KL kappa": result["kl"]["kappa"],
            "OARSI acc": result["oarsi_average"]["accuracy"],
            "OARSI RMSE": result["oarsi_average"]["rmse"],
            "log p(pred)": float(result.get("coherence_log_prob", float("nan")))}


def wall_minutes(run: Path) -> float:
    """From the run's config.json to its report (an interrupted run: from its last start)."""
    return ((run / "report" / "results.json").stat().st_mtime
            - (run / "config.json").stat().st_mtime) / 60


table = {row: {seed: metrics(ROOT / f"{prefix}_seed{seed}") for seed in SEEDS}
         for row, prefix in ROWS.items()}
keys = ["KL acc", "OARSI acc", "KL RMSE", "OARSI RMSE", "KL kappa", "log p(pred)"]
print(f"{SPLIT} split, mean ± std over seeds {SEEDS}\n")
print("| row | n | " + " | ".join(keys) + " |")
print("| --- | ---: | " + " | ".join("---:" for _ in keys) + " |")
for row, seeds in table.items():
    done = [m for m in seeds.values() if m]
    cells = []
    for k in keys:
        values = [m[k] for m in done]
        if not values or not np.all(np.isfinite(values)):  # no GMM in a run without CL
            cells.append("-")
            continue
        spread = np.std(values, ddof=1) if len(values) > 1 else 0.0
        cells.append(f"{np.mean(values):.3f} ± {spread:.3f}")
    print(f"| {row} | {len(done)} | " + " | ".join(cells) + " |")
print("\nPaired differences (same seed), mean ± std [per seed]\n")
print("| difference | " + " | ".join(keys[:5]) + " |")
print("| --- | " + " | ".join("---:" for _ in keys[:5]) + " |")
for a, b in PAIRS:
    seeds = [s for s in SEEDS if table[a][s] and table[b][s]]
    if not seeds:
        continue
    cells = []
    for k in keys[:5]:
        d = np.array([table[a][s][k] - table[b][s][k] for s in seeds])
        cells.append(f"{d.mean():+.3f} ± {d.std(ddof=1) if len(d) > 1 else 0:.3f} "
                     f"[{', '.join(f'{x:+.3f}' for x in d)}]")
    print(f"| {a} − {b} | " + " | ".join(cells) + " |")
print("\nWall time per run (min, training loop as logged):")
for row, prefix in ROWS.items():
    times = [wall_minutes(ROOT / f"{prefix}_seed{s}") for s in SEEDS
             if (ROOT / f"{prefix}_seed{s}" / "report" / "results.json").exists()]
    print(f"  {row}: " + ", ".join(f"{t:.1f}" for t in times))
