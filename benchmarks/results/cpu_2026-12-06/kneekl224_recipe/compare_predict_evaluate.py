"""Predict on the validation PNG files vs the evaluation path on the built validation split.

  python compare_predict_evaluate.py PREDICTIONS.csv PROBS.npz
(PREDICTIONS.csv from `kpn-jax predict "DIR/val/*/*.png"`, PROBS.npz from
validation_probabilities.py; the true grade is the PNG's folder name.)
"""

import csv
import sys
from pathlib import Path

import numpy as np

rows = list(csv.DictReader(open(sys.argv[1])))
saved = np.load(sys.argv[2])
evaluated = {str(i): (p, int(t)) for i, p, t in zip(saved["image_id"], saved["probabilities"],
                                                     saved["true"])}
predicted = {Path(r["image"]).stem: r for r in rows if not r["error"]}
assert sorted(predicted) == sorted(evaluated), "different image sets"
differ, max_diff, correct_p, correct_e = 0, 0.0, 0, 0
for image_id, (probs, true) in evaluated.items():
    row = predicted[image_id]
    folder_grade = int(Path(row["image"]).parent.name)
    assert folder_grade == true, image_id
    p = np.asarray([float(row[f"kl_p{g}"]) for g in range(5)])
    max_diff = max(max_diff, float(np.abs(p - probs).max()))
    differ += int(row["kl"]) != int(probs.argmax())
    correct_p += int(row["kl"]) == true
    correct_e += int(probs.argmax()) == true
n = len(evaluated)
print(f"{n} knees; predict accuracy {correct_p / n:.4f}, evaluate accuracy {correct_e / n:.4f}; "
      f"{differ} differing grades; largest probability difference {max_diff:.2e} "
      f"(predict rounds to 5 decimals)")
