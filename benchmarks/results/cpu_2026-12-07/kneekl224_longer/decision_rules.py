"""How the KL grade is read off a run's validation probabilities: the most probable grade
(what kpn-jax predicts), the median of the predicted distribution, the rounded expected
grade, and thresholds on the expected grade fitted for kappa or accuracy on one half of
the validation knees and applied to the other (2-fold, both ways; nothing is fitted on the
knees it is scored on).

  python decision_rules.py WORKDIR [WORKDIR ...]   # several: their probabilities averaged

Reads WORKDIR/report/predictions_validation.csv; prints one JSON line per rule.
"""

import csv
import json
import sys

import numpy as np
from sklearn.metrics import cohen_kappa_score

GRADES = np.arange(5)


def read(workdir: str) -> tuple[np.ndarray, np.ndarray]:
    """``(true grades [N], probabilities [N, 5])`` of a workdir's validation predictions."""
    with open(f"{workdir}/report/predictions_validation.csv") as f:
        rows = list(csv.DictReader(f))
    return (np.array([int(r["kl_true"]) for r in rows]),
            np.array([[float(r[f"kl_p{g}"]) for g in GRADES] for r in rows]))


def metrics(true: np.ndarray, predicted: np.ndarray) -> dict:
    return {"accuracy": round(float((predicted == true).mean()), 3),
            "kappa": round(float(cohen_kappa_score(true, predicted, weights="quadratic")), 3),
            "rmse": round(float(np.sqrt(((predicted - true) ** 2).mean())), 3)}


def fit_thresholds(expected: np.ndarray, true: np.ndarray, score) -> np.ndarray:
    """Four cut points on the expected grade, each moved in turn to maximise ``score``."""
    cuts = np.array([0.5, 1.5, 2.5, 3.5])
    for _ in range(3):
        for k in range(4):
            candidates = np.linspace(cuts[k] - 0.5, cuts[k] + 0.5, 41)
            scores = [score(true, np.searchsorted(np.sort(np.r_[cuts[:k], c, cuts[k + 1:]]),
                                                  expected)) for c in candidates]
            cuts[k] = candidates[int(np.argmax(scores))]
            cuts = np.sort(cuts)
    return cuts


def main(workdirs: list[str]) -> None:
    read_all = [read(w) for w in workdirs]
    true = read_all[0][0]
    assert all((t == true).all() for t, _ in read_all), "the workdirs graded other knees"
    probabilities = np.mean([p for _, p in read_all], axis=0)
    expected = probabilities @ GRADES
    rules = {"most probable grade": probabilities.argmax(1),
             "median grade": (probabilities.cumsum(1) < 0.5).sum(1),
             "rounded expected grade": np.clip(np.rint(expected), 0, 4).astype(int)}
    halves = np.array_split(np.random.default_rng(0).permutation(len(true)), 2)
    for name, score in (("kappa", lambda t, q: cohen_kappa_score(t, q, weights="quadratic")),
                        ("accuracy", lambda t, q: (q == t).mean())):
        predicted = np.zeros_like(true)
        for fit, apply in ((0, 1), (1, 0)):
            cuts = fit_thresholds(expected[halves[fit]], true[halves[fit]], score)
            predicted[halves[apply]] = np.searchsorted(cuts, expected[halves[apply]])
        rules[f"expected-grade thresholds fitted for {name} (2-fold)"] = predicted
    for name, predicted in rules.items():
        print(json.dumps({"workdirs": workdirs, "rule": name, **metrics(true, predicted)}))


if __name__ == "__main__":
    main(sys.argv[1:])
