"""Model folders (kpn_jax.model_folder) and the shipped models: weights read back exactly,
a damaged or foreign file is an error naming it, the shipped files are small, verified and fit
the models their configs describe, and the kpn-jax console script grades without a workdir."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from kpn_jax import cli, model_folder

SHIPPED = (model_folder.SHIPPED_GRADER, model_folder.SHIPPED_DETECTOR)


def _tiny_grader(width: int = 4):
    from configs import default
    from kpn_jax import train

    config = default.get_config()
    config.tasks = ("kl",)
    config.coherence.enabled = False
    config.model.update(dict(pooling="global", depth=18, width=width))
    model = train.create_model(config, "kneel16")
    return config, model, train.init_variables(model, 32, 16, 0)


def _write(folder: Path, width: int = 4):
    config, model, variables = _tiny_grader(width)
    model_folder.write(folder, kind="grader", config=config.to_dict(),
                       data_info={"dataset": "synthetic_knee/x", "image_size": 32,
                                  "keypoint_schema": "kneel16", "data_dir": "/home/me/data"},
                       variables=variables, checkpoint={"which": "best", "step": 7})
    return config, model, variables


def test_weights_read_back_exactly_and_the_folder_carries_no_local_path(tmp_path):
    config, model, variables = _write(tmp_path / "m")
    template = jax.eval_shape(lambda: variables)
    restored = model_folder.read_variables(tmp_path / "m", template)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(variables),
                                 jax.tree_util.tree_leaves_with_path(restored)):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))
    assert "data_dir" not in json.loads((tmp_path / "m" / "data_info.json").read_text())
    assert json.loads((tmp_path / "m" / "config.json").read_text())["data_dir"] == (
        "~/tensorflow_datasets")
    loaded = model_folder.read_config(tmp_path / "m")
    assert loaded.tasks == ("kl",) and loaded.model.width == 4   # tuples back as tuples
    manifest = model_folder.read_manifest(tmp_path / "m", kind="grader")
    assert manifest["checkpoint"] == {"which": "best", "step": 7}
    assert sorted(manifest["sha256"]) == ["config.json", "data_info.json", "variables.msgpack"]
    assert not (tmp_path / "m.tmp").exists()


def test_damaged_missing_foreign_or_misfitting_files_are_errors_naming_them(tmp_path):
    _write(tmp_path / "m")
    weights = tmp_path / "m" / model_folder.VARIABLES
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(model_folder.ModelFolderError, match=r"variables\.msgpack.*SHA-256"):
        model_folder.read_variables(tmp_path / "m")

    _write(tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(model_folder.ModelFolderError, match=r"config\.json is missing"):
        model_folder.read_config(tmp_path / "m")

    _write(tmp_path / "m")
    with pytest.raises(model_folder.ModelFolderError, match="not a 'landmarks' model"):
        model_folder.read_manifest(tmp_path / "m", kind="landmarks")
    _, _, wider = _tiny_grader(width=8)
    with pytest.raises(model_folder.ModelFolderError, match="does not fit the model"):
        model_folder.read_variables(tmp_path / "m", jax.eval_shape(lambda: wider))
    with pytest.raises(model_folder.ModelFolderError, match="not a model folder"):
        model_folder.read_manifest(tmp_path)


@pytest.mark.parametrize("folder", SHIPPED, ids=lambda p: p.name)
def test_shipped_models_are_small_verified_and_fit_their_configs(folder):
    manifest = model_folder.read_manifest(folder)   # every checksum verified
    total = sum((folder / name).stat().st_size for name in manifest["sha256"])
    assert total <= 10 * 2**20, f"{folder}: {total / 2**20:.1f} MB"
    if manifest["kind"] == "grader":
        from kpn_jax import train

        config = model_folder.read_config(folder)
        info = json.loads((folder / "data_info.json").read_text())
        model = train.create_model(config, info["keypoint_schema"])
        train.exported_variables(config, model, folder, info["image_size"], 16)
        assert info["dataset"].startswith("knee_kl224/") and config.tasks == ("kl",)
    else:
        from kpn_jax import landmarks_predict

        detector = landmarks_predict.load_detector(folder)
        assert detector.keypoint_schema == "kneel16"
        assert detector.checkpoint["model_folder"] == str(folder)
    assert (model_folder.SHIPPED_DIR / "MODEL_CARD.md").is_file()


def test_console_script_grades_a_folder_with_the_shipped_models(tmp_path, capsys):
    knees = tmp_path / "knees"
    knees.mkdir()
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:224, 0:224]
    for name in ("1234567L.png", "1234567R.png"):
        # a bright band (bone) around a dark gap (joint space), with noise
        image = 60 + 140 * (np.abs(y - 112) > 10) + rng.normal(0, 8, (224, 224))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(knees / name)
    (knees / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", str(knees), "--output", str(out)])
    assert exit_info.value.code == 0
    rows = (out / "predictions.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:8] == ["image", "side", "kl", "kl_p0", "kl_p1", "kl_p2", "kl_p3", "kl_p4"]
    by_name = {Path(r.split(",")[0]).name: r.split(",") for r in rows[1:]}
    assert by_name["1234567L.png"][1] == "L" and by_name["1234567R.png"][1] == "R"
    for name in ("1234567L.png", "1234567R.png"):
        probabilities = [float(v) for v in by_name[name][3:8]]
        assert abs(sum(probabilities) - 1) < 1e-3
        assert int(by_name[name][2]) == int(np.argmax(probabilities))
        assert by_name[name][header.index("keypoints")] == "detected"
        result = json.loads((out / f"{Path(name).stem}.json").read_text())
        assert np.asarray(result["keypoints"]["roi_pixels"]).shape == (16, 2)
        assert (out / f"{Path(name).stem}.png").is_file()
    assert by_name["broken.png"][-1]                      # the reason it was skipped

    # With a salt, no output names a file: pseudonyms in the CSV, the JSON and file names.
    (tmp_path / "salt.bin").write_bytes(bytes(range(32)))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", str(knees), "--output", str(tmp_path / "salted"), "--detector",
                  "none", "--id_salt_file", str(tmp_path / "salt.bin")])
    assert exit_info.value.code == 0
    from kpn_jax import identifiers

    salt = (tmp_path / "salt.bin").read_bytes()
    names = {identifiers.pseudonym(str(knees / n), salt)
             for n in ("1234567L.png", "1234567R.png", "broken.png")}
    written = sorted((tmp_path / "salted").iterdir())
    assert {p.stem for p in written} - {"predictions"} == names - {
        identifiers.pseudonym(str(knees / "broken.png"), salt)}
    for path in written:
        text = path.read_text(errors="replace") if path.suffix != ".png" else ""
        assert "1234567" not in text and "broken" not in text and "knees" not in text, path
    assert "1234567" not in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", str(tmp_path / "missing.png")])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error:") and "missing.png" in error


def test_a_film_of_both_knees_is_refused_once_for_a_model_of_knee_crops(tmp_path, capsys):
    """The shipped grader learnt on knee crops: a bilateral film listed once per knee is
    refused, and said once, not once per knee."""
    from tests.dicom_files import write_dicom

    write_dicom(tmp_path / "both.dcm", np.full((64, 128), 1000, np.uint16), laterality="B")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", str(tmp_path / "both.dcm"), str(tmp_path / "both.dcm"),
                  "--sides", "R,L", "--detector", "none", "--output", str(tmp_path / "out")])
    assert exit_info.value.code != 0
    captured = capsys.readouterr()
    said = captured.out + captured.err
    assert said.count("skipped ") == 1, said
    assert "bilateral film" in said and "none of the 2 images" not in said
