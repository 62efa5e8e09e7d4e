"""The page of --mode=serve: its handlers (Starlette's TestClient) on a tiny trained model of
all seven grades, and the page itself in headless Debian Chromium.

The browser test needs /usr/bin/chromium and /usr/bin/chromedriver (Debian's chromium and
chromium-driver; .ci/run installs them) and selenium (the webtest extra)."""

import csv
import importlib.util
import io
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("multipart")

REPO = Path(__file__).resolve().parents[1]
KNEE_KL224 = REPO.parent / "shared" / "data" / "kneeKL224"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_serve_page",
                                                  REPO / "benchmarks" / "serve_page.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny global-pooling model of all seven grades with its GMM, trained for two steps
    on synthetic knees and evaluated (report/predictions_<split>.csv)."""
    from configs import default
    from data_prep import synthetic_knee
    from kpn_jax import train

    root = tmp_path_factory.mktemp("serve")
    config = default.get_config()
    config.data_dir = str(root / "data")
    config.synthetic.update(dict(image_size=64, num_train=48, num_validation=24, num_test=8,
                                 num_unlabeled=16))
    config.model.update(dict(depth=18, width=4, pooling="global"))
    config.batch_size = 8
    config.unlabeled_batch_size = 8
    config.eval_batch_size = 8
    config.max_steps = 2
    config.coherence.gmm_repeats = 20
    synthetic_knee.build_for_config(config)
    workdir = root / "workdir"
    train.train_and_evaluate(config, str(workdir))
    return config, workdir


@pytest.fixture(scope="module")
def grader(trained):
    from kpn_jax import predict

    config, workdir = trained
    return predict.load_grader(config, workdir)


@pytest.fixture(scope="module")
def knee_png(trained, tmp_path_factory):
    """Two validation knees of the synthetic set written as PNG files."""
    from PIL import Image

    from kpn_jax import input_pipeline

    config, _ = trained
    source = input_pipeline.open_dataset(config).split("validation")
    folder = tmp_path_factory.mktemp("uploads")
    paths = []
    for index in (0, 1):
        path = folder / f"knee{index}.png"
        Image.fromarray(np.asarray(source[index]["image"])[..., 0]).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def client(trained, grader):
    from starlette.testclient import TestClient

    from kpn_jax import input_pipeline, serve

    config, workdir = trained
    app = serve.make_app(grader, workdir / "report", input_pipeline.open_dataset(config),
                         serve.Limits(max_files=3, max_file_mb=0.5, max_request_mb=1.0))
    with TestClient(app) as test_client:
        yield test_client


def _upload(path: Path):
    return ("files", (path.name, path.read_bytes(), "image/png"))


def _expected(grader, path: Path, side: str = "R") -> dict:
    """What predict's own path gives for a file."""
    from kpn_jax import predict

    knee = predict.prepare_knee(grader.preparation, path, side)
    return predict.grade_prepared(grader, [knee])[0]


def test_evaluation_writes_every_knee_of_each_split(trained):
    from kpn_jax import input_pipeline

    config, workdir = trained
    handle = input_pipeline.open_dataset(config)
    for split in ("validation", "test"):
        rows = list(csv.DictReader((workdir / "report" / f"predictions_{split}.csv").open()))
        source = handle.split(split)
        assert len(rows) == len(source)
        true = input_pipeline.read_field(source, "grades")
        assert [int(r["kl_true"]) for r in rows] == true[:, 0].tolist()
        assert [r["image_id"] for r in rows] == list(input_pipeline.read_field(source, "image_id"))
        for row in rows:  # each task's probabilities sum to one; the prediction is their argmax
            p = np.array([float(row[f"jsn_medial_p{g}"]) for g in range(4)])
            assert abs(p.sum() - 1) < 1e-3 and int(row["jsn_medial_pred"]) == int(np.argmax(p))
        assert all(np.isfinite(float(r["coherence_log_prob"])) for r in rows)


def test_a_knee_grades_the_same_alone_and_beside_others(grader, knee_png):
    """Every number of a knee's answer, the coherence log-density included, is independent
    of the other knees of its request (a page upload or a dropped file)."""
    from kpn_jax import predict

    knees = [predict.prepare_knee(grader.preparation, path, "R") for path in knee_png]
    alone = predict.grade_prepared(grader, knees[:1])[0]
    beside = predict.grade_prepared(grader, [predict.prepare_knee(grader.preparation,
                                                                  knee_png[0], "R"), *knees[1:]])
    assert np.isfinite(alone["coherence_log_prob"])
    assert beside[0] == alone


def test_grading_an_upload_gives_what_predict_gives(client, grader, knee_png):
    answer = client.post("/api/grade", files=[_upload(p) for p in knee_png],
                         data={"side": "L"}).json()
    assert answer["errors"] == []
    assert [r["file"] for r in answer["results"]] == [p.name for p in knee_png]
    for result, path in zip(answer["results"], knee_png):
        expected = _expected(grader, path, "L")
        assert result["side"] == "L" and result["side_from"] == "chosen in the page"
        assert result["grades"] == expected["grades"]
        assert result["coherence_log_prob"] == pytest.approx(expected["coherence_log_prob"])
        assert isinstance(result["coherence_low"], bool)
        assert result["overlay"].startswith("data:image/png;base64,")
    info = client.get("/api/model").json()
    from kpn_jax import grades

    assert info["tasks"] == list(grades.TASKS) and len(info["tasks"]) == 7
    assert info["coherence"] and info["coherence_threshold"] is not None
    assert sorted(info["splits"]) == ["test", "validation"]


def test_coherence_flag_is_the_fifth_percentile_of_validation_predictions(trained, knee_png):
    from kpn_jax import serve

    _, workdir = trained
    splits = serve.read_evaluated_splits(workdir / "report")
    threshold, text = serve.coherence_threshold(splits)
    values = [float(r["coherence_log_prob"]) for r in
              csv.DictReader((workdir / "report" / "predictions_validation.csv").open())]
    assert threshold == pytest.approx(np.percentile(values, 5))
    assert f"{len(values)} validation knees" in text


def test_a_bad_file_gets_its_message_and_the_others_are_graded(client, knee_png):
    answer = client.post("/api/grade", files=[("files", ("notes.png", b"not an image", "image/png")),
                                              _upload(knee_png[0])]).json()
    assert [r["file"] for r in answer["results"]] == [knee_png[0].name]
    assert len(answer["errors"]) == 1 and answer["errors"][0]["file"] == "notes.png"
    assert "notes.png" in answer["errors"][0]["error"]
    assert "upload_" not in answer["errors"][0]["error"]  # the server's own name stays inside


def test_uploads_are_refused_beyond_the_limits(client, knee_png):
    too_many = client.post("/api/grade", files=[_upload(knee_png[0])] * 4)
    assert too_many.status_code == 400 and "could not be read" in too_many.json()["error"]
    big = client.post("/api/grade", files=[("files", ("big.png", b"\0" * 600_000, "image/png"))])
    assert big.status_code == 413 and "big.png" in big.json()["error"]
    whole = client.post("/api/grade", files=[("files", (f"{k}.png", b"\0" * 400_000, "image/png"))
                                             for k in range(3)])
    assert whole.status_code == 413 and "in all" in whole.json()["error"]
    assert client.post("/api/grade", data={"side": "auto"}).status_code == 400
    wrong_side = client.post("/api/grade", files=[_upload(knee_png[0])], data={"side": "X"})
    assert wrong_side.status_code == 400
    # ... and the server keeps serving.
    assert client.post("/api/grade", files=[_upload(knee_png[0])]).status_code == 200


def test_an_upload_named_like_a_path_is_written_only_where_the_server_chooses(client, knee_png,
                                                                               tmp_path):
    target = tmp_path / "planted.png"
    name = f"../../../../../../..{target}"
    answer = client.post("/api/grade", files=[("files", (name, knee_png[0].read_bytes(),
                                                         "image/png"))]).json()
    assert answer["results"][0]["file"] == "planted.png"  # shown by its base name only
    assert not target.exists()


def test_side_comes_from_a_kneekl224_style_name_else_right(client, knee_png):
    answer = client.post("/api/grade", files=[
        ("files", ("9001695L.png", knee_png[0].read_bytes(), "image/png")),
        ("files", ("scan.png", knee_png[0].read_bytes(), "image/png"))]).json()
    sides = {r["file"]: (r["side"], r["side_from"]) for r in answer["results"]}
    assert sides == {"9001695L.png": ("L", "file name"), "scan.png": ("R", "assumed")}


def test_browse_matrices_cells_and_pictures_match_the_predictions_file(client, trained):
    from kpn_jax import metrics

    _, workdir = trained
    rows = list(csv.DictReader((workdir / "report" / "predictions_validation.csv").open()))
    summary = client.get("/api/split/validation").json()
    true = [int(r["kl_true"]) for r in rows]
    pred = [int(r["kl_pred"]) for r in rows]
    assert summary["tasks"]["kl"]["confusion"] == metrics.confusion_matrix(true, pred, 5).tolist()
    assert summary["tasks"]["kl"]["metrics"]["kappa"] == pytest.approx(
        metrics.quadratic_kappa(true, pred, 5), nan_ok=True)
    t, p = true[0], pred[0]
    knees = client.get(f"/api/split/validation/cell?task=kl&true={t}&pred={p}").json()["knees"]
    assert len(knees) == sum(1 for a, b in zip(true, pred) if (a, b) == (t, p))
    confidences = [k["confidence"] for k in knees]
    assert confidences == sorted(confidences, reverse=True)
    picture = client.get(f"/api/split/validation/knee/{knees[0]['index']}.png")
    assert picture.status_code == 200 and picture.content.startswith(b"\x89PNG")
    assert client.get("/api/split/nosuch").status_code == 404
    assert client.get(f"/api/split/validation/knee/{len(rows)}.png").status_code == 404
    assert client.get("/api/split/validation/cell?task=kl&true=x&pred=0").status_code == 400


def test_the_page_asks_nothing_of_other_servers(client):
    page, script = client.get("/"), client.get("/page.js")
    assert page.status_code == script.status_code == 200
    for text in (page.text, script.text):
        assert "http://" not in text and "https://" not in text
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    assert "script-src 'self' 'unsafe-inline'" not in policy  # no inline script runs


@pytest.mark.skipif(KNEE_KL224.is_dir() is False, reason="needs ../shared/data/kneeKL224")
def test_shipped_grader_grades_an_upload_as_predict_does(tmp_path):
    from starlette.testclient import TestClient

    from kpn_jax import model_folder, predict, serve

    config = model_folder.read_config(model_folder.SHIPPED_GRADER)
    grader = predict.load_grader(config, model_folder.SHIPPED_GRADER,
                                 str(model_folder.SHIPPED_DETECTOR))
    knee = KNEE_KL224 / "val" / "2" / "9558684L.png"
    with TestClient(serve.make_app(grader)) as test_client:
        answer = test_client.post("/api/grade", files=[_upload(knee)]).json()
    predicted = predict.predict_files(config, str(model_folder.SHIPPED_GRADER), [str(knee)], None,
                                      output_dir=str(tmp_path / "out"),
                                      landmark_workdir=str(model_folder.SHIPPED_DETECTOR))[0]
    result = answer["results"][0]
    assert (result["side"], result["side_from"]) == ("L", "file name")
    assert result["grades"] == predicted["grades"]
    assert result["keypoints"]["source"] == "detected"
    assert result["keypoints"]["roi_pixels"] == predicted["keypoints"]["roi_pixels"]


BROWSER = Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()


@pytest.mark.slow
@pytest.mark.skipif(not BROWSER, reason="needs Debian's chromium and chromium-driver")
def test_page_in_headless_chromium(trained, grader, knee_png, tmp_path):
    """Starts run.py --mode=serve, uploads knees and a broken file in the page, reads the
    grades off the page and the CSV it offers, then opens a confusion-matrix cell."""
    pytest.importorskip("selenium")
    page = _load_benchmark()
    _, workdir = trained
    port = page.free_port()
    server = page.start_server(str(workdir), port, tmp_path / "server.log")
    driver = None
    try:
        driver = page.open_browser(str(tmp_path / "chromium"))
        page.open_page(driver, f"http://127.0.0.1:{port}/")
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        shown = page.grade_in_page(driver, [*knee_png, broken], side="R")
        for path in knee_png:
            expected = {t: g["grade"] for t, g in _expected(grader, path, "R")["grades"].items()}
            assert shown["knees"][path.name] == expected
        assert "broken.png" in shown["errors"]["broken.png"]
        assert "2 knee(s) graded" in shown["status"] and "1 file(s) not graded" in shown["status"]

        from selenium.webdriver.common.by import By

        # A file dropped on the page is graded too, and joins the results.
        assert "1 knee(s) graded" in page.drop_in_page(driver, knee_png[0])
        assert len(driver.find_elements(By.CSS_SELECTOR,
                                        f"#results .knee[data-file='{knee_png[0].name}']")) == 2
        href = driver.find_element(By.ID, "download").get_attribute("href")
        table = list(csv.reader(io.StringIO(urllib.parse.unquote(href.split(",", 1)[1]))))
        assert table[0][:3] == ["file", "side", "kl"]
        assert [row[0] for row in table[1:]] == [p.name for p in knee_png] + [knee_png[0].name]
        assert [int(row[2]) for row in table[1:3]] == [shown["knees"][p.name]["kl"]
                                                       for p in knee_png]
        assert table[3] == table[1]  # the dropped copy: the same grades

        rows = list(csv.DictReader((workdir / "report" / "predictions_validation.csv").open()))
        true, pred = int(rows[0]["kl_true"]), int(rows[0]["kl_pred"])
        listed = page.open_cell(driver, "kl", true, pred)
        in_cell = [int(r["index"]) for r in rows
                   if (int(r["kl_true"]), int(r["kl_pred"])) == (true, pred)]
        assert sorted(item["index"] for item in listed) == sorted(in_cell)
        assert all(item["picture_loaded"] for item in listed)
        assert page.requested_origins(driver) == {f"http://127.0.0.1:{port}"}
        assert server.poll() is None
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(30)


def test_dicom_uploads_take_their_side_from_image_laterality_and_a_bilateral_film_is_refused(
        client, grader, knee_png, tmp_path):
    from PIL import Image

    from tests.dicom_files import write_dicom

    pixels = (np.asarray(Image.open(knee_png[0]), np.uint16) * 16)  # 12 bits stored
    left, both = tmp_path / "left", tmp_path / "both.dcm"
    write_dicom(left, pixels, laterality="L")       # no suffix, as DICOM files often come
    write_dicom(both, np.tile(pixels, (1, 2)), laterality="B")
    answer = client.post("/api/grade", files=[
        ("files", ("left", left.read_bytes(), "application/dicom")),
        ("files", ("both.dcm", both.read_bytes(), "application/dicom"))]).json()
    assert [(r["file"], r["side"], r["side_from"]) for r in answer["results"]] == [
        ("left", "L", "DICOM ImageLaterality")]
    assert answer["results"][0]["grades"] == _expected(grader, left, "L")["grades"]
    assert [e["file"] for e in answer["errors"]] == ["both.dcm"]
    assert "bilateral" in answer["errors"][0]["error"]
