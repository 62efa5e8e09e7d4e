"""Partially graded data end to end: a KL-only manifest dataset trains the heads it has."""

import csv

import numpy as np
import pytest
from PIL import Image

from kpn_jax import train

pytestmark = pytest.mark.slow  # end-to-end training on a built dataset


@pytest.fixture(scope="module")
def kl_only_dataset(tmp_path_factory):
    """A manifest dataset of 24 synthetic knees with KL grades only and inline keypoints."""
    from data_prep.manifest import __main__ as manifest_cli
    from data_prep.synthetic_knee import generator

    root = tmp_path_factory.mktemp("manifest")
    rows = []
    for index in range(24):
        knee = generator.generate_knee(seed=3, index=index, image_size=64)
        path = root / f"knee{index}.png"
        Image.fromarray(knee["image"]).save(path)
        rows.append({"image": path.name, "subject_id": knee["subject_id"], "side": knee["side"],
                     "kl": int(knee["grades"][0]),
                     "keypoints": " ".join(f"{v:.3f}" for v in np.ravel(knee["keypoints"])),
                     "split": "train" if index < 16 else "validation"})
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    data_dir = root / "tfds"
    summary = manifest_cli.build(manifest_cli.parse_args(
        [f"--manifest={manifest}", f"--data_dir={data_dir}", "--image_size=64", "--roi_px=64",
         "--config_name=klonly"]))
    return str(data_dir), summary["dataset"]


def kl_config(data_dir, dataset, **changes):
    from tests.test_train import tiny_config

    config = tiny_config(data_dir, max_steps=2, dataset=dataset, **changes)
    config.coherence.enabled = False
    return config


def test_kl_only_data_trains_all_heads_without_nan(kl_only_dataset, tmp_path):
    data_dir, dataset = kl_only_dataset
    results = train.train_and_evaluate(kl_config(data_dir, dataset), str(tmp_path / "w"))
    validation = results["validation"]
    assert validation["kl"]["count"] == 8
    assert 0.0 <= validation["kl"]["accuracy"] <= 1.0
    for task in ("jsn_lateral", "ost_tibia_medial"):
        assert validation[task]["count"] == 0


def test_coherence_learning_refuses_data_without_full_grades(kl_only_dataset, tmp_path):
    data_dir, dataset = kl_only_dataset
    config = kl_config(data_dir, dataset)
    config.coherence.enabled = True
    with pytest.raises(ValueError, match="fully graded"):
        train.train_and_evaluate(config, str(tmp_path / "w"))
