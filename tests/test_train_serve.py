"""No train/serve skew: grading kneeKL224 PNG crops with predict gives exactly what
evaluating the dataset built from the same files gives (left knees, inverted grey levels,
resizing, mirrored test-time evaluation, the weights' moving average)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

KNEE_KL224 = Path(__file__).resolve().parents[2] / "shared" / "data" / "kneeKL224"
# Validation crops: left and right knees, and crops whose grey levels are inverted.
VALIDATION = ["val/0/9625187L.png", "val/0/9775753R.png", "val/2/9558684L.png",
              "val/2/9579255R.png", "val/0/9006140L.png", "val/0/9006140R.png"]


@pytest.mark.skipif(not KNEE_KL224.is_dir(), reason="needs ../shared/data/kneeKL224")
def test_predict_on_png_crops_equals_evaluate_on_their_built_dataset(tmp_path):
    from configs import kneekl224
    from data_prep.knee_kl224 import __main__ as build_cli
    from kpn_jax import evaluate, input_pipeline, parallel, predict, train

    manual = tmp_path / "kneeKL224"
    train_files = sorted((KNEE_KL224 / "train" / "1").glob("*.png"))[:8]
    for source in [*train_files, *(KNEE_KL224 / name for name in VALIDATION)]:
        target = manual / source.relative_to(KNEE_KL224)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    data_dir = tmp_path / "data"
    built = build_cli.build(build_cli.parse_args([f"--manual_dir={manual}",
                                                  f"--data_dir={data_dir}", "--image_size=64",
                                                  "--landmarks=none"]))

    config = kneekl224.get_config()
    config.data_dir = str(data_dir)
    config.dataset = built["dataset"]
    config.model.width = 4
    config.batch_size = 4
    config.eval_batch_size = 4
    config.max_steps = 2
    config.ema_decay = 0.5
    workdir = tmp_path / "workdir"
    train.train_and_evaluate(config, str(workdir))

    # Evaluate: the built validation split through the evaluation step.
    handle = input_pipeline.open_dataset(config)
    source = handle.split("validation")
    model, variables, _ = predict.restore_variables(config, workdir, 64, handle.keypoint_schema)
    eval_step = evaluate.make_eval_step(model, ("kl",), hflip=config.eval_hflip)
    checker = input_pipeline.make_example_checker(64, 16, False)
    evaluated = evaluate.predict_split(eval_step, variables, source, checker,
                                       parallel.make_mesh(), 4)
    ids = [i.decode() if isinstance(i, bytes) else str(i)
           for i in input_pipeline.read_field(source, "image_id")]
    by_id = {image_id: (evaluated["pred"][k, 0], evaluated["probabilities"][k, :5])
             for k, image_id in enumerate(ids)}
    assert sorted(by_id) == sorted(Path(name).stem for name in VALIDATION)

    # Predict: the PNG files as a user has them, sides from their names.
    results = predict.predict_files(config, str(workdir), [str(manual / "val" / "*" / "*.png")],
                                    None, output_dir=str(tmp_path / "predictions"))
    assert len(results) == len(VALIDATION)
    for result in results:
        stem = Path(result["image"]).stem
        grade, probabilities = by_id[stem]
        assert result["side"] == stem[-1] and result["side_from"] == "file name"
        assert result["grades"]["kl"]["grade"] == grade, stem
        np.testing.assert_allclose(result["grades"]["kl"]["probabilities"], probabilities,
                                   atol=2e-5, err_msg=stem)
    assert sum(r["polarity_inverted"] for r in results) == 4   # the four inverted crops


@pytest.mark.skipif(not KNEE_KL224.is_dir(), reason="needs ../shared/data/kneeKL224")
def test_shipped_model_grades_png_crops_as_it_evaluates_their_built_dataset(tmp_path):
    from data_prep.knee_kl224 import __main__ as build_cli
    from kpn_jax import cli, evaluate, input_pipeline, model_folder, parallel, predict

    manual = tmp_path / "kneeKL224"
    for source in [*sorted((KNEE_KL224 / "train" / "1").glob("*.png"))[:4],
                   *(KNEE_KL224 / name for name in VALIDATION)]:
        target = manual / source.relative_to(KNEE_KL224)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    data_dir = tmp_path / "data"
    built = build_cli.build(build_cli.parse_args([f"--manual_dir={manual}",
                                                  f"--data_dir={data_dir}",
                                                  "--landmarks=none"]))  # 224 px, as trained

    # Evaluate: the shipped model on the built validation split.
    folder = model_folder.SHIPPED_GRADER
    config = model_folder.read_config(folder)
    config.data_dir = str(data_dir)
    config.dataset = built["dataset"]
    handle = input_pipeline.open_dataset(config)
    source = handle.split("validation")
    model, variables, _ = predict.restore_variables(config, folder, 224, handle.keypoint_schema)
    eval_step = evaluate.make_eval_step(model, ("kl",), hflip=config.eval_hflip)
    evaluated = evaluate.predict_split(eval_step, variables, source,
                                       input_pipeline.make_example_checker(224, 16, False),
                                       parallel.make_mesh(), 8)
    ids = [i.decode() if isinstance(i, bytes) else str(i)
           for i in input_pipeline.read_field(source, "image_id")]
    by_id = dict(zip(ids, evaluated["probabilities"][:, :5]))

    # Predict: the PNG files through the console script, keypoints from the shipped detector.
    out = tmp_path / "predictions"
    assert cli.run(["predict", str(manual / "val" / "*" / "*.png"), "--output", str(out)]) == 0
    for name in VALIDATION:
        stem = Path(name).stem
        result = json.loads((out / f"{stem}.json").read_text())
        np.testing.assert_allclose(result["grades"]["kl"]["probabilities"], by_id[stem],
                                   atol=2e-5, err_msg=stem)
        assert result["grades"]["kl"]["grade"] == int(np.argmax(by_id[stem]))
        assert result["keypoints"]["source"] == "detected"


from tests.test_manifest import inline, radiographs, write_manifest  # noqa: E402,F401


def _train_tiny_and_evaluate(data_dir: Path, dataset: str, workdir: Path):
    """A tiny global-pooling model of all seven grades trained for one step on a built
    manifest dataset, and every knee of every split through the evaluation step:
    ``(config, {image_id: (pred [7], probabilities [29])})``."""
    from configs import default
    from kpn_jax import evaluate, input_pipeline, parallel, predict, train

    config = default.get_config()
    config.data_dir = str(data_dir)
    config.dataset = dataset
    config.model.update(dict(depth=18, width=4, pooling="global"))
    config.coherence.enabled = False
    config.batch_size = 2
    config.eval_batch_size = 2
    config.max_steps = 1
    train.train_and_evaluate(config, str(workdir))

    handle = input_pipeline.open_dataset(config)
    model, variables, _ = predict.restore_variables(config, workdir, handle.image_size,
                                                    handle.keypoint_schema)
    eval_step = evaluate.make_eval_step(model, tuple(config.tasks), hflip=config.eval_hflip)
    checker = input_pipeline.make_example_checker(handle.image_size, 16, False)
    evaluated = {}
    for source in handle.sources.values():
        out = evaluate.predict_split(eval_step, variables, source, checker, parallel.make_mesh(), 2)
        for k, image_id in enumerate(input_pipeline.read_field(source, "image_id")):
            evaluated[str(image_id)] = (out["pred"][k], out["probabilities"][k])
    return config, evaluated


def test_predict_on_raw_films_equals_evaluate_on_their_manifest_build(tmp_path, radiographs):
    """A hospital's files as they come: a bilateral 16-bit DICOM film with BoneFinder .pts
    files in mm (the right knee's found on the mirrored film, `_f.pts`), a 16-bit PNG and an
    8-bit PNG with keypoint files, and a JPEG without keypoints (graded whole). Predict on
    the files gives exactly what evaluating the manifest's build of the same files gives."""
    from data_prep.manifest import __main__ as manifest_cli
    from kpn_jax import predict

    knees = [  # image, keypoint file for predict, side, split
        ("bilateral.dcm", "bilateral.pts", "L", "train"),
        ("bilateral.dcm", "bilateral_f.pts", "R", "val"),
        ("deep.png", "deep.csv", "L", "val"),
        ("grey.png", "grey.csv", "L", "test"),
        ("plain.jpg", "", "R", "test"),
    ]
    np.savetxt(tmp_path / "deep.csv", radiographs["deep_points"], delimiter=",")
    np.savetxt(tmp_path / "grey.csv", radiographs["grey_points"], delimiter=",")
    rows = []
    for k, (image, points, side, split) in enumerate(knees):
        row = dict(image=image, subject_id=f"p{k}", side=side, kl=str(k % 5), split=split)
        if points.endswith(".pts"):
            row["pts"] = points
        elif points:
            row["keypoints"] = inline(np.loadtxt(tmp_path / points, delimiter=","))
        rows.append(row)
    write_manifest(tmp_path / "manifest.csv", rows)
    built = manifest_cli.build(manifest_cli.parse_args([
        f"--manifest={tmp_path / 'manifest.csv'}", f"--data_dir={tmp_path / 'tfds'}",
        "--image_size=48", "--roi_mm=40", "--strict"]))

    workdir = tmp_path / "workdir"
    config, evaluated = _train_tiny_and_evaluate(tmp_path / "tfds", built["dataset"], workdir)
    assert sorted(evaluated) == ["bilateral-L", "bilateral-R", "deep-L", "grey-L", "plain-R"]

    results = predict.predict_files(
        config, str(workdir), [str(tmp_path / image) for image, *_ in knees],
        [str(tmp_path / points) if points else "" for _, points, *_ in knees],
        sides=[side for _, _, side, _ in knees], output_dir=str(tmp_path / "predictions"))
    assert len(results) == len(knees)
    for (image, points, side, _), result in zip(knees, results):
        pred, probabilities = evaluated[f"{Path(image).stem}-{side}"]
        assert result["keypoints"]["source"] == ("file" if points else "none")
        assert [g["grade"] for g in result["grades"].values()] == list(pred), image
        np.testing.assert_allclose(np.concatenate([g["probabilities"]
                                                   for g in result["grades"].values()]),
                                   probabilities, atol=2e-5, err_msg=f"{image} {side}")


def test_predict_finds_both_knees_of_unread_films_as_the_build_found_them(tmp_path):
    """The synthetic hospital (data_prep.manifest.example_films): films of both knees,
    graded ones with .pts files in mm and unread ones found by the shipped detector at
    build time. Predict on the unread films, given only the detector (no sides, no keypoint
    files), grades both knees of each exactly as evaluating the built unlabelled knees; on
    the graded films with their .pts files, as evaluating their splits."""
    from data_prep.manifest import __main__ as manifest_cli
    from data_prep.manifest import example_films, list_films
    from kpn_jax import model_folder, predict

    hospital = tmp_path / "hospital"
    example_films.write_hospital(hospital, graded=12, unread=2, knee_px=96)
    assert list_films.main([f"--films={hospital / 'unread'}", f"--out={hospital / 'all.csv'}",
                            f"--append_to={hospital / 'knees.csv'}"]) == 0
    detector = str(model_folder.SHIPPED_DETECTOR)
    built = manifest_cli.build(manifest_cli.parse_args([
        f"--manifest={hospital / 'all.csv'}", f"--data_dir={tmp_path / 'tfds'}",
        "--image_size=48", "--keypoints=detector", f"--landmark_workdir={detector}",
        "--strict"]))
    assert built["keypoints_detected"] == {"unlabeled": 4}

    workdir = tmp_path / "workdir"
    config, evaluated = _train_tiny_and_evaluate(tmp_path / "tfds", built["dataset"], workdir)
    assert len(evaluated) == 24 + 4

    unread = sorted((hospital / "unread").iterdir())
    results = predict.predict_files(config, str(workdir), [str(p) for p in unread], None,
                                    output_dir=str(tmp_path / "p1"), landmark_workdir=detector)
    assert [(Path(r["image"]).stem, r["side"]) for r in results] == [
        (p.stem, side) for p in unread for side in ("R", "L")]
    graded = sorted((hospital / "films").iterdir())[:2]
    results += predict.predict_files(
        config, str(workdir), [str(p) for p in graded for _ in "RL"],
        [str(hospital / "keypoints" / f"{p.stem}_{side}.pts") for p in graded for side in "RL"],
        sides=["R", "L"] * len(graded), output_dir=str(tmp_path / "p2"))
    for result in results:
        path = Path(result["image"])
        knee_id = f"{path.parent.name}/{path.stem}-{result['side']}"
        probabilities = np.concatenate([g["probabilities"] for g in result["grades"].values()])
        np.testing.assert_allclose(probabilities, evaluated[knee_id][1], atol=2e-5,
                                   err_msg=knee_id)
    assert {r["keypoints"]["source"] for r in results} == {"detected on the film", "file"}
    assert sorted(q.name for q in (tmp_path / "p1").glob("*.json")) == sorted(
        f"{p.stem}-{side}.json" for p in unread for side in "RL")

    # The page: an unread film's upload gives both knees, graded as predict grades them.
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from kpn_jax import serve

    grader = predict.load_grader(config, workdir, detector)
    with TestClient(serve.make_app(grader)) as client:
        answer = client.post("/api/grade", files=[("files", (unread[0].name,
                                                             unread[0].read_bytes(),
                                                             "application/dicom"))]).json()
    assert [(r["side"], r["side_from"]) for r in answer["results"]] == [
        ("R", "bilateral film, right knee"), ("L", "bilateral film, left knee")]
    for shown, predicted in zip(answer["results"], results[:2]):
        assert shown["grades"] == predicted["grades"]
