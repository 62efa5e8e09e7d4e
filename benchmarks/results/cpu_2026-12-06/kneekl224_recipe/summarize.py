"""Summarises kneeKL224 runs: the best checkpoint's validation metrics, the last three
evaluations' accuracy (stability), and the wall time from the run's config.json (written when
it starts or resumes) to its last metrics record (file modification times; for a resumed
run, the time since its last start, pauses while it was running included).

  python summarize.py WORKDIR [WORKDIR ...]
"""

import json
import sys
from pathlib import Path


def summarize(workdir: Path) -> dict:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "validation/kl/accuracy" in r]
    best = json.loads((workdir / "report" / "results.json").read_text())["validation"]["kl"]
    last3 = [round(r["validation/kl/accuracy"], 3) for r in evaluations[-3:]]
    return {"workdir": str(workdir), "best_step": json.loads(
                (workdir / "checkpoints" / "best.json").read_text())["step"],
            "accuracy": round(best["accuracy"], 3),
            "balanced_accuracy": round(best["balanced_accuracy"], 3),
            "rmse": round(best["rmse"], 3), "kappa": round(best["kappa"], 3),
            "last_three_accuracy": last3, "last_three_spread": round(max(last3) - min(last3), 3),
            "evaluations": [round(r["validation/kl/accuracy"], 3) for r in evaluations],
            "wall_minutes": round(((workdir / "metrics.jsonl").stat().st_mtime
                                   - (workdir / "config.json").stat().st_mtime) / 60, 1)}


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(json.dumps(summarize(Path(path))))
