"""Runs a family of paper experiments one after another, then tabulates them.

  python benchmarks/sweep.py --table=ablation --seeds=0,1,2 --root=workdirs/ablation \
      --common=setting=cpu,arch=resnet18

Finished runs (``report/results.json`` with a test split) are skipped; an
interrupted run resumes from its checkpoint, so the same command can be run
again until the table is complete. Ends with ``run.py --mode=report`` over the
family's workdirs, written to ``ROOT/report/``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The rows of each of the paper's tables, as configs/paper.py arguments.
TABLES = {
    "baselines": ["arch=resnet18,kpn=0,cl=0", "arch=resnet34,kpn=0,cl=0", "arch=resnet50,kpn=0,cl=0",
                  "arch=resnet50,kpn=1,cl=1"],
    "ablation": ["kpn=0,cl=0", "kpn=1,cl=0", "kpn=0,cl=1", "kpn=1,cl=1"],
    "labels": ["kpn=0,cl=0,labeled=0.2", "kpn=1,cl=1,labeled=0.2", "kpn=0,cl=0,labeled=0.4",
               "kpn=1,cl=1,labeled=0.4", "kpn=0,cl=0,labeled=1.0", "kpn=1,cl=1,labeled=1.0"],
    "tau": ["kpn=0,cl=0"] + [f"kpn=1,cl=1,tau={t}" for t in (0.25, 0.5, 0.75, 1.0, 1.5)],
    "aux": ["kpn=0,cl=0", "kpn=0,cl=0,aux=1", "kpn=1,cl=1", "kpn=1,cl=1,aux=1"],
    # Table 4 scaled toward the paper (configs/paper.py setting=regime, with init=).
    "regime": ["kpn=0,cl=0", "kpn=1,cl=0,labeled=0.2", "kpn=1,cl=0,labeled=0.4", "kpn=1,cl=0",
               "kpn=1,cl=1,labeled=0.2", "kpn=1,cl=1,labeled=0.4", "kpn=1,cl=1"],
}


def slug(arguments: str) -> str:
    return arguments.replace(",", "_").replace("=", "-")


def is_finished(workdir: Path) -> bool:
    results = workdir / "report" / "results.json"
    return results.exists() and "test" in json.loads(results.read_text())


def merge_arguments(common: str, row: str, seed: int) -> str:
    """Row arguments override the common ones; the seed comes last."""
    merged = {}
    for item in filter(None, f"{common},{row}".split(",")):
        key, _, value = item.partition("=")
        merged[key] = value
    merged["seed"] = str(seed)
    return ",".join(f"{k}={v}" for k, v in merged.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--table", choices=sorted(TABLES), help="one of the paper's tables")
    parser.add_argument("--rows", default="", help="';'-separated configs/paper.py arguments "
                        "(instead of --table)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--root", required=True, help="folder for the workdirs and the report")
    parser.add_argument("--common", default="", help="arguments added to every row, e.g. setting=cpu")
    parser.add_argument("--overrides", default="", help="extra run.py flags for every run, "
                        "e.g. '--config.num_epochs=5'")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    rows = TABLES[args.table] if args.table else [r for r in args.rows.split(";") if r.strip()]
    if not rows:
        parser.error("give --table or --rows")
    root = Path(args.root)
    workdirs = []
    for row in rows:
        for seed in (int(s) for s in args.seeds.split(",")):
            arguments = merge_arguments(args.common, row, seed)
            workdir = root / f"{slug(row)}_seed{seed}"
            workdirs.append(workdir)
            if is_finished(workdir):
                print(f"[done] {workdir}", flush=True)
                continue
            command = [sys.executable, str(REPO / "run.py"),
                       f"--config={REPO / 'configs' / 'paper.py'}:{arguments}",
                       f"--workdir={workdir}", *args.overrides.split()]
            print(f"[run] {' '.join(command)}", flush=True)
            if args.dry_run:
                continue
            start = time.time()
            result = subprocess.run(command, cwd=REPO)
            if result.returncode:
                print(f"[failed] {workdir} (exit {result.returncode}); rerun this command to resume",
                      flush=True)
                return result.returncode
            print(f"[finished] {workdir} in {time.time() - start:.0f} s", flush=True)
    if args.dry_run:
        return 0
    report = [sys.executable, str(REPO / "run.py"), "--mode=report", f"--output={root / 'report'}",
              "--workdirs=" + ",".join(str(w) for w in workdirs)]
    return subprocess.run(report, cwd=REPO).returncode


if __name__ == "__main__":
    sys.exit(main())
