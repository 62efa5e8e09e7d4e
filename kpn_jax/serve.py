"""A local page to grade radiographs with a trained model and browse an evaluated split.

``python run.py --mode=serve --workdir=W`` (or ``kpn-jax serve``) starts it; without a
workdir it serves the shipped kneeKL224 KL grader. Two views, one page, no requests
beyond this server (no CDN, fonts or analytics):

* **Grade**: upload radiographs (PNG, JPEG, 16-bit PNG, DICOM; several at once). Each is
  prepared as ``--mode=predict`` prepares it (:func:`kpn_jax.predict.prepare_knee`) and
  graded; the page shows the overlay, each grade's probabilities and, for a model of all
  seven grades with a GMM, the coherence of the predicted grade vector, flagged when it
  is below the 5th percentile of this model's predictions on its validation knees. The
  results download as CSV.
* **Browse**: for each split that ``--mode=evaluate`` (or training's final evaluation)
  wrote ``report/predictions_<split>.csv`` for, each task's confusion matrix and metrics;
  a cell lists its knees with their overlays (from the built dataset when it is readable).

Safety: the server binds to 127.0.0.1 unless told otherwise; uploads are limited in count
and size (:class:`Limits`), read into memory and written, under names of the server's own
choosing, into a private temporary folder that is removed after grading; a file that
cannot be graded gets its message in the page.

Needs the ``web`` extra (``pip install "kpn-jax[web]"``: Starlette, uvicorn,
python-multipart).
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import tempfile
import threading
from pathlib import Path

import numpy as np

from kpn_jax import evaluate as eval_lib
from kpn_jax import grades as grades_lib
from kpn_jax import metrics as metrics_lib
from kpn_jax import predict

PAGE = Path(__file__).with_name("serve_page.html")
PAGE_SCRIPT = Path(__file__).with_name("serve_page.js")
# Suffixes an upload keeps in its temporary name (readers sniff DICOMs by content anyway).
UPLOAD_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom"}
# Coherence below this percentile of the model's validation predictions is flagged.
COHERENCE_FLAG_PERCENTILE = 5.0
SECURITY_HEADERS = {
    # Everything the page needs comes from this server; images are data: URLs.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "style-src 'self' 'unsafe-inline'; script-src 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class MissingExtra(ValueError):
    """An optional dependency group is not installed (the message says which)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one grading request may carry."""

    max_files: int = 16
    max_file_mb: float = 64.0
    max_request_mb: float = 256.0

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 2**20)

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)


# ----------------------------------------------------------------------------- grading


def overlay_data_url(knee: predict.PreparedKnee, schema, result: dict, title: str) -> str:
    """The overlay picture of :func:`kpn_jax.predict.draw_overlay` as a PNG data URL."""
    buffer = io.BytesIO()
    predict.draw_overlay(knee.image, knee.keypoints, schema, result, buffer, title)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def upload_sides(path: Path, filename: str, requested: str) -> list[tuple[str, str]]:
    """``[(side, where it came from)]`` of an uploaded file's knees: the page's choice
    ('R'/'L'), else :func:`kpn_jax.predict.sides_in_file` on the file and its original name
    (both knees of a film marked bilateral)."""
    if requested in ("R", "L"):
        return [(requested, "chosen in the page")]
    return predict.sides_in_file(path, filename)


def grade_uploads(grader: predict.Grader, uploads: list[tuple[str, bytes]], side: str = "auto",
                  coherence_threshold: float | None = None) -> dict:
    """Grades uploaded files ``[(original file name, bytes)]``.

    Each file is written under a name of the server's choosing (``upload_<k><suffix>``)
    into a private temporary folder (mode 0700), removed when grading ends; the original
    name is only shown. Returns ``{'results': [...], 'errors': [{'file', 'error'}]}``;
    each result holds ``file``, ``side``, ``side_from``, ``grades``, ``coherence_log_prob``,
    ``coherence_low`` and ``overlay`` (a PNG data URL).
    """
    results, errors, prepared, kept = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="kpn_jax_upload_") as folder:
        for k, (filename, content) in enumerate(uploads):
            suffix = Path(filename).suffix.lower()
            path = Path(folder) / f"upload_{k}{suffix if suffix in UPLOAD_SUFFIXES else ''}"
            path.write_bytes(content)
            try:
                knees = upload_sides(path, filename, side)
                ready = [predict.prepare_knee(grader.preparation, path, knee_side,
                                              detector=grader.detector, knees_on_film=len(knees))
                         for knee_side, _ in knees]
            except (ValueError, OSError) as error:
                message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
                errors.append({"file": filename, "error": message.replace(str(path), filename)})
                continue
            prepared += ready
            kept += [(filename, knee_side, side_from) for knee_side, side_from in knees]
    if not prepared:
        return {"results": results, "errors": errors}
    graded = predict.grade_prepared(grader, prepared)
    for knee, (filename, knee_side, side_from), result in zip(prepared, kept, graded):
        log_prob = result["coherence_log_prob"]
        entry = {"file": filename, "side": knee_side, "side_from": side_from,
                 "polarity_inverted": knee.polarity_inverted, **result,
                 "coherence_low": (None if log_prob is None or coherence_threshold is None
                                   else bool(log_prob < coherence_threshold))}
        entry["overlay"] = overlay_data_url(knee, grader.schema, entry,
                                            f"{filename} ({knee_side})")
        results.append(entry)
    return {"results": results, "errors": errors}


# ----------------------------------------------------------------------------- browsing


@dataclasses.dataclass
class EvaluatedSplit:
    """One split's per-knee predictions (``report/predictions_<split>.csv``)."""

    name: str
    rows: list[dict]
    tasks: tuple[str, ...]

    @classmethod
    def read(cls, path: Path, split: str) -> "EvaluatedSplit":
        with Path(path).open(newline="") as f:
            rows = list(csv.DictReader(f))
        header = rows[0].keys() if rows else []
        tasks = tuple(t for t in grades_lib.TASKS if f"{t}_true" in header)
        return cls(split, rows, tasks)

    def graded(self, task: str) -> list[dict]:
        return [r for r in self.rows if int(r[f"{task}_true"]) >= 0]

    def true_and_predicted(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        """int ``[M]`` true and predicted grades of the knees graded for ``task``."""
        rows = self.graded(task)
        return (np.asarray([int(r[f"{task}_true"]) for r in rows], np.int64),
                np.asarray([int(r[f"{task}_pred"]) for r in rows], np.int64))

    def confusion(self, task: str) -> list[list[int]]:
        """``[true][pred]`` counts over the knees graded for ``task``."""
        return metrics_lib.confusion_matrix(*self.true_and_predicted(task),
                                            grades_lib.NUM_CLASSES[task]).tolist()

    def metrics(self, task: str) -> dict:
        true, pred = self.true_and_predicted(task)
        if not len(true):
            return {"count": 0}
        size = grades_lib.NUM_CLASSES[task]
        return {"count": len(true), "accuracy": metrics_lib.accuracy(true, pred),
                "balanced_accuracy": metrics_lib.balanced_accuracy(true, pred, size),
                "rmse": metrics_lib.rmse(true, pred),
                "kappa": metrics_lib.quadratic_kappa(true, pred, size)}

    def cell(self, task: str, true: int, pred: int) -> list[dict]:
        """The knees with grade ``true`` predicted as ``pred``, most confident first."""
        out = []
        for row in self.graded(task):
            if int(row[f"{task}_true"]) == true and int(row[f"{task}_pred"]) == pred:
                confidence = float(row[f"{task}_p{pred}"])
                out.append({"index": int(row["index"]), "image_id": row["image_id"],
                            "true": true, "pred": pred, "confidence": round(confidence, 4)})
        return sorted(out, key=lambda r: -r["confidence"])

    def coherence(self) -> np.ndarray | None:
        if not self.rows or "coherence_log_prob" not in self.rows[0]:
            return None
        return np.asarray([float(r["coherence_log_prob"]) for r in self.rows])


def read_evaluated_splits(report_dir: Path) -> dict[str, EvaluatedSplit]:
    """``{split: EvaluatedSplit}`` for every ``predictions_<split>.csv`` in ``report_dir``."""
    found = {}
    for path in sorted(Path(report_dir).glob(eval_lib.PREDICTIONS_CSV.format(split="*"))):
        split = path.stem[len("predictions_"):]
        found[split] = EvaluatedSplit.read(path, split)
    return found


def coherence_threshold(splits: dict[str, EvaluatedSplit]) -> tuple[float | None, str]:
    """The flagging threshold and what it is: the 5th percentile of the coherence of the
    model's validation predictions (``None`` without them)."""
    validation = splits.get("validation")
    values = validation.coherence() if validation else None
    if values is None or not len(values):
        return None, "no evaluated validation split with coherence to compare with"
    threshold = float(np.percentile(values, COHERENCE_FLAG_PERCENTILE))
    return threshold, (f"below {threshold:.1f}, the {COHERENCE_FLAG_PERCENTILE:g}th percentile "
                       f"of this model's predictions on {len(values)} validation knees")


def split_overlay(grader: predict.Grader, source, split: EvaluatedSplit, index: int) -> bytes:
    """PNG of knee ``index`` of a built split: its stored image and keypoints with the
    predicted and true grades."""
    example = source[index]
    row = split.rows[index]
    image = np.asarray(example["image"])[..., 0]
    keypoints = np.asarray(example["keypoints"], np.float32) if "keypoints" in example else None
    valid = np.asarray(example.get("keypoints_valid", True), bool)
    if keypoints is not None and not (np.all(valid) and np.all(np.isfinite(keypoints))):
        keypoints = None  # a knee stored without keypoints (e.g. most of kneeKL224)
    prediction = {"grades": {}, "keypoints": {"source": "dataset" if keypoints is not None
                                              else "none stored"},
                  "coherence_log_prob": (float(row["coherence_log_prob"])
                                         if "coherence_log_prob" in row else None)}
    for task in split.tasks:
        probabilities = [float(row[f"{task}_p{g}"]) for g in range(grades_lib.NUM_CLASSES[task])]
        prediction["grades"][task] = {"grade": int(row[f"{task}_pred"]),
                                      "probabilities": probabilities}
    truth = ", ".join(f"{grades_lib.PAPER_NAMES[t]} {row[f'{t}_true']}" for t in split.tasks
                      if int(row[f"{t}_true"]) >= 0)
    buffer = io.BytesIO()
    predict.draw_overlay(image, keypoints, grader.schema, prediction, buffer,
                         f"{row['image_id'] or index} (true: {truth or 'not graded'})")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- the app


def make_app(grader: predict.Grader, report_dir: Path | None = None, dataset=None,
             limits: Limits = Limits()):
    """The Starlette app.

    Args:
      grader: a loaded :class:`kpn_jax.predict.Grader`.
      report_dir: a workdir's ``report/`` with ``predictions_<split>.csv`` files to browse.
      dataset: the built dataset (:class:`kpn_jax.input_pipeline.DatasetHandle`) those
        splits came from, for the knees' pictures; ``None``: lists without pictures.
      limits: upload limits.
    """
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    splits = read_evaluated_splits(report_dir) if report_dir else {}
    threshold, threshold_text = coherence_threshold(splits)
    lock = threading.Lock()  # one grading at a time: the model and its compiled step are shared

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=SECURITY_HEADERS)

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(), headers=SECURITY_HEADERS)

    async def page_script(request: Request) -> Response:
        return Response(PAGE_SCRIPT.read_text(), media_type="text/javascript",
                        headers=SECURITY_HEADERS)

    async def model_info(request: Request) -> JSONResponse:
        return JSONResponse({
            "workdir": grader.workdir.name, "tasks": list(grader.tasks),
            "task_names": {t: grades_lib.PAPER_NAMES[t] for t in grader.tasks},
            "pooling": grader.config.model.pooling, "image_size": grader.image_size,
            "checkpoint": {k: v for k, v in grader.checkpoint.items() if k != "model_folder"},
            "coherence": grader.gmm is not None, "coherence_threshold": threshold,
            "coherence_threshold_text": threshold_text,
            "splits": sorted(splits), "limits": dataclasses.asdict(limits),
        }, headers=SECURITY_HEADERS)

    async def grade(request: Request) -> JSONResponse:
        length = request.headers.get("content-length")
        if length is None:
            return error(411, "an upload needs a Content-Length")
        if not length.isdigit() or int(length) > limits.max_request_bytes:
            return error(413, f"the upload is larger than {limits.max_request_mb:g} MB in all")
        try:
            form = await request.form(max_files=limits.max_files, max_fields=8)
        except Exception as exc:  # the multipart parser's own limits and malformed bodies
            return error(400, f"the upload could not be read: {exc}")
        files = [item for item in form.getlist("files") if hasattr(item, "read")]
        side = str(form.get("side", "auto"))
        if not files:
            return error(400, "no files: choose or drop radiograph files")
        if side not in ("auto", "R", "L"):
            return error(400, f"side must be auto, R or L, not {side!r}")
        uploads = []
        for item in files:
            content = await item.read()
            if len(content) > limits.max_file_bytes:
                return error(413, f"{item.filename}: larger than {limits.max_file_mb:g} MB")
            uploads.append((Path(item.filename or "upload").name, content))
        await form.close()

        def run() -> dict:
            with lock:
                return grade_uploads(grader, uploads, side, threshold)

        return JSONResponse(await run_in_threadpool(run), headers=SECURITY_HEADERS)

    def evaluated(request: Request) -> EvaluatedSplit | None:
        return splits.get(request.path_params["split"])

    async def split_summary(request: Request) -> JSONResponse:
        split = evaluated(request)
        if split is None:
            return error(404, f"no evaluated split {request.path_params['split']!r}")
        return JSONResponse({
            "split": split.name, "count": len(split.rows), "pictures": dataset is not None,
            "tasks": {task: {"name": grades_lib.PAPER_NAMES[task], "metrics": split.metrics(task),
                             "confusion": split.confusion(task)} for task in split.tasks},
        }, headers=SECURITY_HEADERS)

    async def split_cell(request: Request) -> JSONResponse:
        split = evaluated(request)
        task = request.query_params.get("task", "")
        if split is None or task not in split.tasks:
            return error(404, "no such split or task")
        try:
            true, pred = int(request.query_params["true"]), int(request.query_params["pred"])
        except (KeyError, ValueError):
            return error(400, "true and pred must be grades")
        return JSONResponse({"knees": split.cell(task, true, pred)}, headers=SECURITY_HEADERS)

    async def split_knee(request: Request) -> Response:
        split = evaluated(request)
        index = request.path_params["index"]
        if split is None or not 0 <= index < len(split.rows):
            return error(404, "no such knee")
        if dataset is None:
            return error(404, "the built dataset is not readable here: no pictures")
        source = dataset.split(split.name)

        def run() -> bytes:
            with lock:
                return split_overlay(grader, source, split, index)

        return Response(await run_in_threadpool(run), media_type="image/png",
                        headers=SECURITY_HEADERS)

    return Starlette(routes=[
        Route("/", page),
        Route("/page.js", page_script),
        Route("/api/model", model_info),
        Route("/api/grade", grade, methods=["POST"]),
        Route("/api/split/{split}", split_summary),
        Route("/api/split/{split}/cell", split_cell),
        Route("/api/split/{split}/knee/{index:int}.png", split_knee),
    ])


def warm_up(grader: predict.Grader) -> None:
    """Compiles the grading (and detection) steps and draws one overlay, so that the first
    upload is as fast as the others."""
    size = grader.image_size
    blank = predict.PreparedKnee(np.full((size, size), 128, np.uint8),
                                 None if grader.detector is not None or not grader.needs_keypoints
                                 else np.full((grader.schema.num_points, 2), size / 2, np.float32),
                                 "none", False)
    result = predict.grade_prepared(grader, [blank])[0]
    overlay_data_url(blank, grader.schema, result, "warm-up")


def serve(config, workdir: str, landmark_workdir: str | None = None, host: str = "127.0.0.1",
          port: int = 8000, limits: Limits = Limits()) -> None:
    """``--mode=serve``: loads the model, compiles it and serves the page until Ctrl-C.

    Raises:
      MissingExtra: the ``web`` extra is not installed.
      ValueError: a keypoint-pooling model without a landmark detector.
    """
    try:
        import uvicorn
    except ImportError as exc:
        raise MissingExtra('serving the page needs the web extra: pip install "kpn-jax[web]" '
                           '(or pip install -e ".[web]" in the repository)') from exc
    grader = predict.load_grader(config, workdir, landmark_workdir)
    if grader.needs_keypoints and grader.detector is None:
        raise ValueError(f"{grader.workdir} pools at keypoints: serve it with a landmark "
                         "detector (--landmark_workdir=a detector workdir or model folder)")
    report_dir = grader.workdir / "report"
    dataset = None
    if any(report_dir.glob(eval_lib.PREDICTIONS_CSV.format(split="*"))):
        from kpn_jax import input_pipeline

        try:
            dataset = input_pipeline.open_dataset(config)
        except (OSError, ValueError, KeyError) as exc:
            print(f"note: browsing without pictures: the built dataset is not readable ({exc})",
                  flush=True)
    warm_up(grader)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host}: anyone who can reach this machine can grade "
              "images with it and browse its evaluated splits", flush=True)
    print(f"serving {grader.workdir} on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(make_app(grader, report_dir, dataset, limits), host=host, port=port,
                log_level="warning")
