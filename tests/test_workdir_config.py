"""A workdir knows what it was trained on: evaluate and predict use its config and data, and
another dataset is refused (or reported apart); report rows are one experiment each."""

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kpn_jax import reporting, workdir_config

REPO = Path(__file__).resolve().parents[1]


def _default_config():
    from configs import default

    return default.get_config()


def _write_workdir(path: Path, config_dict: dict, info: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config_dict))
    if info is not None:
        (path / "data_info.json").write_text(json.dumps(info))
    return path


# ----------------------------------------------------------------------------- the saved config


def test_load_restores_the_saved_config_with_tuples_and_the_recorded_data_dir(tmp_path):
    saved = json.loads(_default_config().to_json_best_effort())
    saved["synthetic"]["image_size"] = 64
    saved["data_dir"] = "relative/data"           # relative to where training ran
    saved["lr_decay_epochs"] = [3, 5]
    saved["model"].pop("kernels")                 # a field added after this config was saved
    workdir = _write_workdir(tmp_path / "w", saved,
                             {"dataset": "synthetic_knee/x", "image_size": 64,
                              "keypoint_schema": "kneel16", "data_dir": "/abs/data"})
    config = workdir_config.load(workdir, _default_config())
    assert config.synthetic.image_size == 64
    assert config.lr_decay_epochs == (3, 5)
    assert config.tasks == _default_config().tasks and isinstance(config.tasks, tuple)
    assert config.data_dir == "/abs/data"
    assert config.model.kernels == "auto"         # the default fills what the file lacks
    with pytest.raises(FileNotFoundError, match="trained workdir"):
        workdir_config.load(tmp_path / "empty", _default_config())


def test_a_config_file_gives_only_its_explicit_overrides(tmp_path):
    saved = _default_config()
    saved.synthetic.image_size = 64
    given = _default_config()
    given.synthetic.image_size = 128              # the file's value: not used
    given.eval_split = "validation"               # an explicit override: used
    given.log_every_steps = 7                     # a run setting: not worth a note
    config, ignored = workdir_config.with_overrides(saved, given, {"eval_split": "validation"})
    assert config.synthetic.image_size == 64 and config.eval_split == "validation"
    assert ignored == ["synthetic.image_size: 64 in the workdir, 128 in the file"]


def test_check_dataset_refuses_other_data_unless_allowed(tmp_path):
    workdir = _write_workdir(tmp_path / "w", {}, {"dataset": "synthetic_knee/px64",
                                                  "image_size": 64, "keypoint_schema": "kneel16"})
    assert workdir_config.check_dataset(workdir, "synthetic_knee/px64", 64, "kneel16",
                                        "keypoints", False) is None
    assert workdir_config.check_dataset(workdir, "synthetic_knee/px64", None, None,
                                        "keypoints", False) is None
    with pytest.raises(workdir_config.OtherDataError,
                       match=r"trained on other data: dataset 'synthetic_knee/px128' \(trained "
                             r"on 'synthetic_knee/px64'\); image size 128.*--allow_other_data"):
        workdir_config.check_dataset(workdir, "synthetic_knee/px128", 128, "kneel16",
                                     "keypoints", False)
    assert workdir_config.check_dataset(workdir, "synthetic_knee/px128", 128, "kneel16",
                                        "keypoints", True) == "synthetic_knee/px128"
    with pytest.raises(workdir_config.OtherDataError, match="schema it was trained with"):
        workdir_config.check_dataset(workdir, "synthetic_knee/px64", 64, "other", "keypoints",
                                     True)
    assert workdir_config.check_dataset(workdir, "synthetic_knee/px64", 64, "other", "global",
                                        True) == "synthetic_knee/px64"


# ----------------------------------------------------------------------------- report rows


def _finished_run(path: Path, accuracy: float, **fields) -> Path:
    config = json.loads(_default_config().to_json_best_effort())
    for dotted, value in fields.items():
        target = config
        *parents, last = dotted.split(".")
        for part in parents:
            target = target[part]
        target[last] = value
    workdir = _write_workdir(path, config)
    result = {task: {"accuracy": accuracy, "rmse": 1.0, "kappa": 0.5, "count": 10}
              for task in ("kl", "jsn_lateral")}
    (workdir / "report").mkdir()
    (workdir / "report" / "results.json").write_text(json.dumps({"test": result}))
    return workdir


def test_a_row_is_one_experiment_named_by_what_differs(tmp_path, capsys):
    _finished_run(tmp_path / "cl_s0", 0.6, seed=0)
    _finished_run(tmp_path / "cl_s1", 0.7, seed=1, data_dir="elsewhere", log_every_steps=3)
    _finished_run(tmp_path / "nocl_s0", 0.2, **{"seed": 0, "coherence.enabled": False})
    (tmp_path / "cl_s0.log").write_text("a log beside the workdirs is not a run")
    table = reporting.write_experiment_report([str(tmp_path / "*")], str(tmp_path / "out"))
    markdown = table.read_text()
    with_cl = "kpn-jax (coherence.enabled=True)"
    without = "kpn-jax (coherence.enabled=False)"
    assert f"| Accuracy | {with_cl} | 0.650 ± 0.071 |" in markdown
    assert f"|  | {without} | 0.200 |" in markdown
    assert f"- {with_cl} (2): {tmp_path / 'cl_s0'}, {tmp_path / 'cl_s1'}" in markdown
    assert f"- {without} (1): {tmp_path / 'nocl_s0'}" in markdown
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "table.csv").read_text())))
    workdirs = {row["method"]: row["workdirs"] for row in rows if row["metric"] == "accuracy"}
    assert workdirs == {with_cl: f"{tmp_path / 'cl_s0'};{tmp_path / 'cl_s1'}",
                        without: str(tmp_path / "nocl_s0")}


def test_distinct_method_names_stay_the_row_names(tmp_path):
    _finished_run(tmp_path / "a", 0.5, method_name="ResNet-18")
    _finished_run(tmp_path / "b", 0.6, method_name="ResNet-18 KPN", **{"model.pooling": "global"})
    runs = reporting.collect(reporting.expand_workdirs([str(tmp_path / "*")]))
    assert list(runs) == ["ResNet-18", "ResNet-18 KPN"]


def test_the_same_experiment_and_seed_twice_is_an_error(tmp_path):
    _finished_run(tmp_path / "run", 0.5, seed=0)
    _finished_run(tmp_path / "copy", 0.6, seed=0, num_data_workers=2)
    with pytest.raises(ValueError, match="same experiment with the same seed 0"):
        reporting.collect(reporting.expand_workdirs([str(tmp_path / "*")]))


def test_configs_paper_experiment_string_ignores_the_seed():
    from configs import paper

    fields = [reporting.experiment_fields(json.loads(
        paper.get_config(f"arch=resnet18,seed={seed}").to_json_best_effort())) for seed in (0, 1)]
    assert fields[0] == fields[1]


def test_an_empty_glob_and_a_missing_workdir_say_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no workdir matches .*/nothing/\*"):
        reporting.expand_workdirs([str(tmp_path / "nothing" / "*")])
    with pytest.raises(FileNotFoundError, match="workdir .*/gone does not exist"):
        reporting.expand_workdirs([str(tmp_path / "gone")])


# ----------------------------------------------------------------------------- end to end


def run_cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained_64px(tmp_path_factory):
    """A workdir trained on 64 px synthetic knees whose data lie outside the default place."""
    from tests.test_train import tiny_config
    from kpn_jax import train

    root = tmp_path_factory.mktemp("trained")
    config = tiny_config(str(root / "data"), max_steps=2)
    train.train_and_evaluate(config, str(root / "w"))
    return root / "w"


@pytest.mark.slow
def test_evaluate_with_another_config_file_uses_the_workdirs_data(trained_64px, tmp_path):
    """The demo config (128 px, default data_dir) on a 64 px workdir: evaluated on its own
    data, the report's test numbers as training wrote them, nothing built elsewhere."""
    before = json.loads((trained_64px / "report" / "results.json").read_text())["test"]
    result = run_cli(f"--config={REPO / 'configs' / 'demo.py'}", f"--workdir={trained_64px}",
                     "--mode=evaluate",
                     "--config.eval_split=test", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "synthetic.image_size: 64 in the workdir, 128 in the file" in result.stderr
    assert not (tmp_path / "workdirs").exists()   # demo.py's data_dir: nothing built there
    after = json.loads((trained_64px / "report" / "results.json").read_text())["test"]
    assert after["kl"]["count"] == before["kl"]["count"] == 16
    assert after["kl"]["accuracy"] == pytest.approx(before["kl"]["accuracy"])


@pytest.mark.slow
def test_evaluate_on_other_data_is_refused_then_reported_apart(trained_64px, tmp_path):
    other = ("--config.synthetic.num_test=8",)
    refused = run_cli(f"--workdir={trained_64px}", "--mode=evaluate", *other, cwd=tmp_path)
    assert refused.returncode == 1
    assert "Traceback" not in refused.stderr
    assert "trained on other data" in refused.stderr and "--allow_other_data" in refused.stderr
    data_dir = json.loads((trained_64px / "data_info.json").read_text())["data_dir"]
    assert not list(Path(data_dir, "synthetic_knee").glob("*te8*"))  # refused before building

    before = (trained_64px / "report" / "results.json").read_text()
    allowed = run_cli(f"--workdir={trained_64px}", "--mode=evaluate", "--allow_other_data",
                      *other, cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert (trained_64px / "report" / "results.json").read_text() == before
    [other_report] = list((trained_64px / "report" / "synthetic_knee").glob("*te8*/results.json"))
    assert json.loads(other_report.read_text())["test"]["kl"]["count"] == 8


@pytest.mark.slow
def test_usage_errors_are_one_line_and_help_names_what_images_takes(tmp_path):
    result = run_cli("--mode=train", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --config is required (e.g. --config=configs/demo.py) (every flag: python "
        "run.py --help)"]
    result = run_cli("--mode=evaluate", f"--workdir={tmp_path / 'none'}", cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "config.json does not exist" in result.stderr
    helped = run_cli("--help", cwd=tmp_path)
    text = " ".join((helped.stdout + helped.stderr).split())
    assert "folders (every image file in them) or glob patterns" in text


def test_a_synthetic_build_prints_no_download_wording_reprs_or_control_characters(tmp_path,
                                                                                   capfd):
    from data_prep import synthetic_knee

    synthetic_knee.build(str(tmp_path), image_size=32, num_train=4, num_validation=2,
                         num_test=2, num_unlabeled=2, seed=3)
    out, err = capfd.readouterr()
    printed = out + err
    assert "building synthetic_knee/px32_tr4_va2_te2_un2_seed3" in printed
    for unwanted in ("Downloading", "Unknown size", "Using custom data configuration", "\r",
                     "\x1b"):
        assert unwanted not in printed, (unwanted, printed[-2000:])
