"""run.py on bad input: one line naming the problem, a non-zero exit, no traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # run.py in subprocesses

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert lines, result.stderr[-2000:]
    for needle in needles:
        assert any(needle in line for line in lines), (needle, lines)


@pytest.fixture
def fake_workdir(tmp_path):
    """A workdir as training leaves it, enough for the checks that run before any model loads."""
    workdir = tmp_path / "workdir"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "data_info.json").write_text(json.dumps(
        {"dataset": "oai/x", "image_size": 64, "keypoint_schema": "kneel16"}))
    (workdir / "config.json").write_text(json.dumps({"dataset": "oai/x",
                                                     "model": {"depth": 34, "pooling": "keypoints"},
                                                     "tasks": ["kl"],
                                                     "coherence": {"enabled": False}}))
    return workdir


def test_unsupported_storage_urls_are_refused_before_anything_is_written(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cases = {"--config.data_dir=s3://bucket/tfds": "s3:// is not supported",
             "--workdir=http://host/run": "http:// is not supported",
             # gs:// is for training and evaluation; predict reads local files
             "--mode=predict --workdir=gs://bucket/run --images=x.png":
                 "gs:// is supported by --mode=train, evaluate and fit_gmm"}
    for flags, message in cases.items():
        args = [f"--config={REPO / 'configs' / 'demo.py'}", f"--workdir={tmp_path / 'w'}",
                *flags.split()]
        result = run_cli(*args, cwd=cwd)
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert not list(cwd.iterdir()) and not (tmp_path / "w").exists()


def test_config_typo(tmp_path):
    result = run_cli("--config=configs/demo.py", f"--workdir={tmp_path}", "--config.batch_sise=4")
    assert result.returncode != 0
    assert "batch_sise" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_dataset_directory(tmp_path):
    result = run_cli("--config=configs/demo.py", f"--workdir={tmp_path / 'w'}",
                     "--config.dataset=knee_kl224/default", f"--config.data_dir={tmp_path / 'nope'}")
    assert_one_line_error(result, "nope")


def test_missing_built_dataset(tmp_path):
    result = run_cli("--config=configs/demo.py", f"--workdir={tmp_path / 'w'}",
                     "--config.dataset=knee_kl224/default", f"--config.data_dir={tmp_path}")
    assert_one_line_error(result, "knee_kl224/default")


def test_checkpoint_of_another_architecture(fake_workdir):
    # evaluate takes the model from the workdir; an explicit override cannot change it.
    result = run_cli("--config=configs/demo.py", f"--workdir={fake_workdir}", "--mode=evaluate",
                     "--config.model.depth=50")
    assert_one_line_error(result, "model.depth")


def _demo_predict_args(workdir, *extra):
    # The fake workdir says depth 34 and tasks (kl,); match it so the config check passes.
    return ("--config=configs/demo.py", f"--workdir={workdir}", "--mode=predict",
            "--config.model.depth=34", "--config.tasks=('kl',)", "--config.coherence.enabled=False",
            *extra)


def test_predict_corrupt_image(fake_workdir, tmp_path):
    image = tmp_path / "broken.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    keypoints = tmp_path / "k.csv"
    np.savetxt(keypoints, np.full((16, 2), 30.0), delimiter=",")
    result = run_cli(*_demo_predict_args(fake_workdir, f"--images={image}", f"--keypoints={keypoints}"))
    assert_one_line_error(result, "broken.png")


def test_predict_nan_keypoints(fake_workdir, tmp_path):
    from PIL import Image

    image = tmp_path / "knee.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(image)
    points = np.full((16, 2), 30.0)
    points[5, 1] = np.nan
    keypoints = tmp_path / "nan_points.csv"
    np.savetxt(keypoints, points, delimiter=",")
    result = run_cli(*_demo_predict_args(fake_workdir, f"--images={image}", f"--keypoints={keypoints}"))
    assert_one_line_error(result, "nan_points.csv", "not finite")
