"""Grade new radiographs with a trained workdir: JSON grades + an overlay picture per image.

Each file becomes a knee exactly as the training data's build made its knees
(:mod:`kpn_jax.framing`, recorded with the dataset): the same window; a crop of the same
size in mm around the joint where the build cropped around keypoints (keypoints from a
file: a CSV of ``x,y`` rows in the image's pixels, or a kneel16/BoneFinder ``.pts``, in mm
where the image has a pixel spacing, ``*_f.pts`` mirrored back), else the whole image
padded to a square (kneeKL224 and the synthetic knees are such crops); grey levels
inverted where the build fixed inverted crops; a left knee mirrored to the right-knee
orientation (side from ``--sides``, a DICOM's ImageLaterality or a kneeKL224-style file
name ``<id>L.png``, else right, with a printed note); the training size. Keypoints not
given come from a trained landmark detector where the model pools at them.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from kpn_jax import checkpointing, image_io
from kpn_jax import framing as framing_lib
from kpn_jax import gmm as gmm_lib
from kpn_jax import grades as grades_lib
from kpn_jax import kernels as kernels_lib
from kpn_jax import keypoints as kp_lib
from kpn_jax import model_folder, parallel, workdir_config


def read_keypoint_file(path: str | Path, schema: kp_lib.KeypointSchema,
                       spacing_mm: tuple[float, float] | None = None,
                       image_width: int | None = None) -> np.ndarray:
    """``[N, 2]`` pixels of the image as stored, from a CSV (``x,y`` per row in pixels,
    optional header) or a ``.pts`` file read as the manifest builder reads it: in mm when
    the image has a pixel spacing (``spacing_mm``), and mirrored back when named
    ``*_f.pts`` (found on the mirrored image, so ``image_width`` is needed).

    Raises:
      ValueError: naming the file (unreadable, wrong count, NaN/inf values).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"keypoint file {path} does not exist")
    if path.suffix.lower() == ".pts":
        from kpn_jax import pts

        points = pts.read_knee_pts(path, spacing_mm, image_width=image_width)
    else:
        rows = []
        with path.open(newline="") as f:
            for number, row in enumerate(csv.reader(f), start=1):
                cells = [c.strip() for c in row if c.strip()]
                if not cells:
                    continue
                try:
                    rows.append([float(c) for c in cells[-2:]])
                except ValueError:
                    if number == 1:  # a header line
                        continue
                    raise ValueError(f"{path}: row {number} is not two numbers: {row}") from None
        points = np.asarray(rows, np.float32)
    return kp_lib.validate_keypoints(points, schema, name=f"keypoints in {path}")


def restore_variables(config, workdir: Path, image_size: int, schema_name: str,
                       which: str | None = None):
    """``(model, variables, checkpoint)``: the weights of a model folder
    (:mod:`kpn_jax.model_folder`), or of a workdir's ``which`` checkpoint ('best' or
    'latest'; ``None`` = best, else latest); ``checkpoint`` says which (``{'which', 'step'}``)."""
    from kpn_jax import train

    model = train.create_model(config, schema_name)
    schema = kp_lib.get_schema(schema_name)
    if model_folder.is_model_folder(workdir):
        variables, checkpoint = train.exported_variables(config, model, Path(workdir), image_size,
                                                         schema.num_points)
        return model, variables, checkpoint
    mesh = parallel.make_mesh(jax.devices()[:1])
    tx = train.make_optimizer(config, 1)
    state = train.abstract_state(config, model, tx, image_size, schema.num_points, mesh)
    checkpoints = checkpointing.Checkpointer(workdir)
    if which is None:
        which = "best" if checkpoints.best_step() is not None else "latest"
    state = checkpoints.restore(state, which=which)
    checkpoints.close()
    from kpn_jax import trainer

    variables = trainer.eval_variables(state)
    return model, variables, {"which": which, "step": int(jax.device_get(state.step))}


def export_grader(config, workdir: str | Path, out_dir: str | Path) -> Path:
    """``--mode=export``: the workdir's best (else latest) evaluation weights, whole config,
    data facts and GMM as a model folder (:func:`kpn_jax.model_folder.write`)."""
    workdir = Path(workdir).expanduser().resolve()
    info = workdir_config.data_info(workdir)
    if not info:
        raise FileNotFoundError(f"{workdir / workdir_config.DATA_INFO} not found: is {workdir} a "
                                "trained workdir?")
    # From the dataset's build where it is readable (the truth, also for a dataset derived
    # from another), else as the workdir recorded it; a model folder without it would
    # grade files unlike training.
    preprocessing = build_preprocessing(info, config.data_dir)
    if preprocessing is None:
        if "preprocessing" not in info:
            raise FileNotFoundError(f"{workdir / workdir_config.DATA_INFO} does not say how its "
                                    f"dataset prepared images, and the dataset's build is not "
                                    "here to tell: export where the training data is")
        preprocessing = info["preprocessing"]
    info = {**info, "preprocessing": preprocessing}
    _, variables, checkpoint = restore_variables(config, workdir, int(info["image_size"]),
                                                 info["keypoint_schema"])
    description = {"method_name": config.method_name, "dataset": info.get("dataset")}
    results = workdir / "report" / "results.json"
    if results.exists():  # what the workdir's own evaluation measured, for the model card
        measured = json.loads(results.read_text())
        description["metrics"] = {split: {task: {k: measured[split][task].get(k)
                                                 for k in ("accuracy", "balanced_accuracy",
                                                           "rmse", "kappa", "count")}
                                          for task in config.tasks if task in measured[split]}
                                  for split in measured if isinstance(measured[split], dict)}
    extra = {"gmm.npz": workdir / "gmm.npz"} if (workdir / "gmm.npz").exists() else {}
    return model_folder.write(out_dir, kind="grader", config=config.to_dict(), data_info=info,
                              variables=jax.device_get(variables), checkpoint=checkpoint,
                              extra_files=extra, description=description)


def draw_overlay(image: np.ndarray, keypoints: np.ndarray | None, schema: kp_lib.KeypointSchema,
                 prediction: dict, path: Path, title: str) -> None:
    """The ROI with its keypoints (by compartment) and the predicted grades beside it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.5, 4.6), dpi=110)
    FigureCanvasAgg(figure)
    ax = figure.add_axes([0.01, 0.02, 0.52, 0.9])
    ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    if keypoints is not None:
        colours = {"FL": "tab:orange", "FM": "tab:red", "TL": "tab:cyan", "TM": "tab:blue"}
        for compartment, idx in schema.compartments.items():
            pts = keypoints[list(idx)]
            ax.plot(pts[:, 0], pts[:, 1], "o-", ms=3, lw=1, color=colours[compartment],
                    label=compartment)
        ax.legend(loc="lower left", fontsize=7, framealpha=0.6)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    text = figure.add_axes([0.56, 0.02, 0.43, 0.9])
    text.set_axis_off()
    lines = ["grade  (probability)"]
    for task, entry in prediction["grades"].items():
        lines.append(f"{grades_lib.PAPER_NAMES[task]:<6} {entry['grade']}  ({max(entry['probabilities']):.2f})")
        if len(prediction["grades"]) == 1:  # room for every grade's probability
            lines += [f"  p({grade}) = {p:.2f}" for grade, p in enumerate(entry["probabilities"])]
    if prediction.get("coherence_log_prob") is not None:
        # The score needs its meaning beside it: a bare log-density reads like a probability.
        lines.append(f"\ncoherence log p: {prediction['coherence_log_prob']:.1f}\n"
                     "  (GMM log-density of the predicted\n"
                     "  grades: how usual this grade\n"
                     "  combination is among expert-\n"
                     "  graded knees; lower = rarer)")
    lines.append(f"keypoints: {prediction['keypoints']['source']}")
    text.text(0.0, 0.95, "\n".join(lines), va="top", family="monospace", fontsize=10)
    figure.savefig(path, format="png")


NEEDS_KEYPOINTS = ("keypoint pooling needs keypoints: pass --keypoints (one CSV/.pts per "
                   "image) or --landmark_workdir (a trained landmark detector)")


@dataclasses.dataclass(frozen=True)
class Preparation:
    """How the training data's build turned files into knees: its framing (crop, window,
    size: :class:`kpn_jax.framing.KneeFraming`), the keypoint schema and whether crops
    with inverted grey levels were flipped back."""

    framing: framing_lib.KneeFraming
    schema: kp_lib.KeypointSchema
    fix_polarity: bool

    @property
    def image_size(self) -> int:
        return self.framing.image_size


def build_preprocessing(info: dict, data_dir: str = "") -> dict | None:
    """What the training dataset's build summary says it did to each file (the truth,
    also for datasets derived from another), or None when the build is not readable here
    (a model folder, a moved dataset)."""
    from kpn_jax import datasets

    data_dir = info.get("data_dir") or os.path.expanduser(data_dir)
    try:
        summary = datasets.dataset_dir(data_dir, info["dataset"]) / "build_summary.json"
    except (FileNotFoundError, KeyError, TypeError):
        return None
    return datasets.preprocessing(data_dir, info["dataset"]) if summary.exists() else None


def read_preparation(config, workdir: str | Path) -> Preparation:
    """The :class:`Preparation` of a trained workdir or model folder, its config checked:
    from the training dataset's build when it is readable here, else as ``data_info.json``
    recorded it (files framed whole when it records no framing).

    Raises:
      FileNotFoundError / ValueError: not a trained workdir, a config that does not match it.
    """
    from kpn_jax import train

    train.validate_config(config)
    workdir = Path(workdir).expanduser().resolve()
    info = workdir_config.data_info(workdir)
    if not info:
        raise FileNotFoundError(f"{workdir / workdir_config.DATA_INFO} not found: is {workdir} a "
                                f"trained workdir?")
    if (workdir / "config.json").exists():
        checkpointing.check_config_compatible(json.loads((workdir / "config.json").read_text()),
                                              config)
    preprocessing = (None if model_folder.is_model_folder(workdir)
                     else build_preprocessing(info, config.get("data_dir", "")))
    if preprocessing is None:
        preprocessing = info.get("preprocessing", {})
    image_size = int(info["image_size"])
    framing = framing_lib.KneeFraming.from_dict({**preprocessing.get("framing", {}),
                                                 "image_size": image_size})
    return Preparation(framing, kp_lib.get_schema(info["keypoint_schema"]),
                       bool(preprocessing.get("fix_polarity", False)))


@dataclasses.dataclass
class Grader:
    """A trained grader loaded once and ready to grade many knees (``--mode=predict``, the
    page of :mod:`kpn_jax.serve`): the model, its evaluation weights, how the training data
    prepared its images, its GMM and, where keypoints must be found, a landmark detector.

    ``eval_step`` is compiled once per batch shape; :func:`grade_prepared` pads every batch
    to ``batch_size`` so that a server compiles it once.
    """

    config: Any
    workdir: Path
    preparation: Preparation
    model: Any
    variables: Any
    checkpoint: dict
    eval_step: Any
    gmm: Any = None
    detector: Any = None
    batch_size: int = 8

    @property
    def image_size(self) -> int:
        return self.preparation.image_size

    @property
    def schema(self) -> kp_lib.KeypointSchema:
        return self.preparation.schema

    @property
    def needs_keypoints(self) -> bool:
        return self.config.model.pooling == "keypoints"

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t for t in grades_lib.TASKS if t in self.config.tasks)


def load_grader(config, workdir: str | Path, landmark_workdir: str | None = None,
                batch_size: int = 8, detector=None,
                preparation: Preparation | None = None) -> Grader:
    """Loads a trained workdir or model folder and a landmark detector: ``detector`` (loaded)
    or the one of ``landmark_workdir``; ``preparation``: its :func:`read_preparation`, when
    the caller has read it already.

    Raises:
      FileNotFoundError / ValueError: not a trained workdir, a config that does not match it.
    """
    from kpn_jax import evaluate as eval_lib
    from kpn_jax import train

    preparation = preparation or read_preparation(config, workdir)
    workdir = Path(workdir).expanduser().resolve()
    model, variables, checkpoint = restore_variables(config, workdir, preparation.image_size,
                                                     preparation.schema.name)
    gmm = gmm_lib.load(workdir / "gmm.npz") if (workdir / "gmm.npz").exists() else None
    eval_step = eval_lib.make_eval_step(model, tuple(config.tasks), train.DTYPES[config.dtype],
                                        kernels_lib.for_config(config).compiler_options,
                                        hflip=config.eval_hflip)
    if detector is None and landmark_workdir:
        from kpn_jax import landmarks_predict

        detector = landmarks_predict.load_detector(landmark_workdir)
    return Grader(config=config, workdir=workdir, preparation=preparation, model=model,
                  variables=variables, checkpoint=checkpoint, eval_step=eval_step, gmm=gmm,
                  detector=detector, batch_size=batch_size)


@dataclasses.dataclass
class PreparedKnee:
    """One knee as the model sees it: uint8 ``[S, S]`` in right-knee orientation, its
    keypoints ``[N, 2]`` in those pixels (or None) and where they came from."""

    image: np.ndarray
    keypoints: np.ndarray | None
    keypoint_source: str
    polarity_inverted: bool


def prepare_knee(preparation: Preparation, path: str | Path, side: str,
                 keypoint_file: str | Path | None = None, detector=None,
                 knees_on_film: int = 1) -> PreparedKnee:
    """Reads one radiograph file and turns it into a knee exactly as the training data's
    build did (:func:`kpn_jax.framing.frame_knee`: grey levels, crop around the keypoints
    of ``keypoint_file`` where the build cropped, mirroring, size). Where the build cut
    knees out of films and no keypoint file is given, a ``detector`` finds the knee on the
    film (:func:`kpn_jax.framing.locate_knee`, as the manifest builder's
    ``--keypoints=detector`` does; ``knees_on_film`` = 2 searches the film's half of
    ``side``).

    Raises:
      ValueError / OSError: naming the file (unreadable, a bilateral film without the
        keypoints to cut a knee out of it, bad keypoints).
    """
    radiograph = image_io.read_image(path)  # ImageReadError names the file
    framing = preparation.framing
    keypoints, source = None, "none"
    if keypoint_file:
        in_mm = framing.pts_in_mm(radiograph)
        keypoints = read_keypoint_file(keypoint_file, preparation.schema,
                                       radiograph.spacing_mm if in_mm else None,
                                       image_width=radiograph.shape[1])
        kp_lib.validate_keypoints(keypoints, preparation.schema, name=f"keypoints of {path}",
                                  image_shape=radiograph.shape)
        source = "file"
    if keypoints is None and detector is not None and framing.roi_pixels(radiograph) > 0:
        keypoints, _ = framing_lib.locate_knee(radiograph, side, framing, detector,
                                               knees_on_film)
        source = "detected on the film"
    if not framing.crops(radiograph, keypoints):
        check_one_knee(path, radiograph)  # the whole film becomes the knee
    inverted = preparation.fix_polarity and image_io.centre_minus_border(radiograph.pixels) < 0
    if inverted:  # as the training data's build did (kneeKL224's 8-bit crops)
        radiograph = dataclasses.replace(radiograph, pixels=255.0 - radiograph.pixels)
    image, points = framing_lib.frame_knee(radiograph, keypoints, side, framing)
    return PreparedKnee(image, points, source, bool(inverted))


def _padded_batches(arrays: np.ndarray, size: int):
    """``[M, ...]`` -> ``(batch [size, ...], count)`` chunks, the last one padded with
    copies of its first row, so that every call has one shape (one compilation)."""
    for start in range(0, len(arrays), size):
        chunk = arrays[start:start + size]
        pad = np.repeat(chunk[:1], size - len(chunk), axis=0)
        yield np.concatenate([chunk, pad]), len(chunk)


_gmm_log_prob = jax.jit(gmm_lib.log_prob)


def grade_prepared(grader: Grader, knees: list[PreparedKnee]) -> list[dict]:
    """Grades prepared knees: keypoints from the detector where the model pools at them
    (or, with a detector, for the overlay) and none were given; then each knee's
    ``{'grades': {task: {'grade', 'probabilities'}}, 'coherence_log_prob', 'keypoints':
    {'source', 'schema', 'roi_pixels'}}``. The knees' missing keypoints are filled in.

    Raises:
      ValueError: a keypoint-pooling model without keypoints or a detector.
    """
    missing = [i for i, knee in enumerate(knees) if knee.keypoints is None]
    if missing and (grader.needs_keypoints or grader.detector is not None):
        if grader.detector is None:
            raise ValueError(NEEDS_KEYPOINTS)
        from kpn_jax import landmarks_predict

        images = np.stack([knees[i].image[..., None] for i in missing])
        detected = np.concatenate([
            landmarks_predict.detect(grader.detector, batch, batch_size=grader.batch_size)[:count]
            for batch, count in _padded_batches(images, grader.batch_size)])
        for i, points in zip(missing, detected):
            knees[i].keypoints, knees[i].keypoint_source = points, "detected"
    num_points = grader.schema.num_points
    images = np.stack([knee.image[..., None] for knee in knees])
    keypoints = np.stack([knee.keypoints if knee.keypoints is not None
                          else np.zeros((num_points, 2), np.float32)
                          for knee in knees]).astype(np.float32)
    preds, probs, batch_log_probs = [], [], []
    for (image_batch, count), (keypoint_batch, _) in zip(
            _padded_batches(images, grader.batch_size),
            _padded_batches(keypoints, grader.batch_size)):
        pred, prob = grader.eval_step(grader.variables,
                                      {"image": image_batch, "keypoints": keypoint_batch})
        # On the padded batch too: one program whatever the number of knees, so that a
        # knee's log-density does not depend on what else was graded with it.
        log_prob = None if grader.gmm is None else _gmm_log_prob(grader.gmm, prob)
        pred, prob, log_prob = jax.device_get((pred, prob, log_prob))
        preds.append(np.asarray(pred)[:count])
        probs.append(np.asarray(prob)[:count])
        batch_log_probs.append(None if log_prob is None else np.asarray(log_prob)[:count])
    pred, probabilities = np.concatenate(preds), np.concatenate(probs)
    log_probs = (np.concatenate(batch_log_probs) if grader.gmm is not None
                 else [None] * len(knees))
    offsets = grades_lib.one_hot_offsets()
    results = []
    for i, knee in enumerate(knees):
        grades = {}
        for t, task in enumerate(grades_lib.TASKS):
            if task in grader.tasks:
                start, stop = offsets[t]
                grades[task] = {"grade": int(pred[i, t]),
                                "probabilities": [round(float(p), 5)
                                                  for p in probabilities[i, start:stop]]}
        results.append({
            "grades": grades,
            "coherence_log_prob": None if log_probs[i] is None else float(log_probs[i]),
            "keypoints": {"source": knee.keypoint_source, "schema": grader.schema.name,
                          "roi_pixels": None if knee.keypoints is None
                          else np.round(knee.keypoints, 2).tolist()},
        })
    return results


def predict_files(config, workdir: str, images: Sequence[str], keypoint_files: Sequence[str] | None,
                  sides: Sequence[str] | None = None, output_dir: str | None = None,
                  landmark_workdir: str | None = None, id_salt: bytes | None = None) -> list[dict]:
    """``--mode=predict``: grades ``images``; writes ``<stem>.json`` and ``<stem>.png`` per image.

    Images are named as given (relative paths stay relative); with ``id_salt`` every
    output (JSON, CSV, file names, printed lines) names an image by its salted pseudonym
    (:mod:`kpn_jax.identifiers`) instead of its path.

    Raises:
      ValueError / FileNotFoundError: naming the file or flag at fault.
    """
    if not images:
        raise ValueError("--images is empty: give image files, folders or glob patterns")
    images = expand_image_paths(images)
    if keypoint_files and len(keypoint_files) != len(images):
        raise ValueError(f"--keypoints has {len(keypoint_files)} files for {len(images)} images")
    if sides and len(sides) != len(images):
        raise ValueError(f"--sides has {len(sides)} values for {len(images)} images")
    preparation = read_preparation(config, workdir)
    detector = None
    if landmark_workdir:
        from kpn_jax import landmarks_predict

        detector = landmarks_predict.load_detector(landmark_workdir)
    sides, side_sources = knee_sides(images, sides)
    keypoint_files = list(keypoint_files) if keypoint_files else [""] * len(images)
    # A film of both knees without --sides: both knees, where a detector can find them.
    knees = []  # (path, side, where the side came from, keypoint file)
    for path, side, source, keypoint_file in zip(images, sides, side_sources, keypoint_files):
        if source == BILATERAL_WITHOUT_SIDE and detector is not None and not keypoint_file:
            knees += [(path, knee_side, knee_source, "")
                      for knee_side, knee_source in sides_in_file(path)]
        else:
            knees.append((path, side, source, keypoint_file))
    assumed = [path for path, _, source, _ in knees if source == "assumed"]
    if assumed:
        print(f"side unknown for {len(assumed)} image(s) (first: "
              f"{_image_name(assumed[0], id_salt)}): taken as right "
              f"knees; give --sides=R,L,... or name files like kneeKL224's (<id>L.png)",
              flush=True)
    listed = collections.Counter(path for path, *_ in knees)

    prepared, readable, skipped = [], [], []
    for i, (path, side, source, keypoint_file) in enumerate(knees):
        try:
            if source == BILATERAL_WITHOUT_SIDE:
                raise ValueError(f"{path} is a bilateral film (ImageLaterality B): give each "
                                 "knee's side with --sides and its keypoints with --keypoints, "
                                 "listing the film once per knee, or a landmark detector "
                                 "(--landmark_workdir) to find both knees")
            on_film = 2 if source.startswith("bilateral") or listed[path] > 1 else 1
            prepared.append(prepare_knee(preparation, path, side, keypoint_file or None,
                                         detector, on_film))
        except (ValueError, OSError) as error:
            # One unreadable image is reported and skipped; the others are still graded.
            reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            name = _image_name(path, id_salt)
            reason = reason.replace(str(path), name)
            if (name, reason) not in skipped:  # a film listed once per knee: said once
                skipped.append((name, reason))
                print(f"skipped {name}: {reason}", flush=True)
            continue
        readable.append(i)
    if not readable:
        raise ValueError(skipped[0][1] if len(skipped) == 1 else
                         f"none of the {len(listed)} images could be graded; the first: "
                         f"{skipped[0][0]}: {skipped[0][1]}")
    images = [knees[i][0] for i in readable]
    sides = [knees[i][1] for i in readable]
    side_sources = [knees[i][2] for i in readable]
    if (config.model.pooling == "keypoints" and not landmark_workdir
            and any(knee.keypoints is None for knee in prepared)):
        raise ValueError(NEEDS_KEYPOINTS)
    grader = load_grader(config, workdir, detector=detector, preparation=preparation)
    workdir = grader.workdir
    graded = grade_prepared(grader, prepared)

    default_out = (Path("predictions").resolve() if model_folder.is_model_folder(workdir)
                   else workdir / "predictions")  # a model folder may be read-only
    out_dir = Path(output_dir).expanduser() if output_dir else default_out
    out_dir.mkdir(parents=True, exist_ok=True)
    # Output names: the file's stem; with its side where a film gives two knees; numbered
    # where names still repeat.
    stem_counts = collections.Counter(Path(p).stem for p in images)
    output_stems = [Path(p).stem + (f"-{side}" if stem_counts[Path(p).stem] > 1 else "")
                    for p, side in zip(images, sides)]
    if len(set(output_stems)) < len(output_stems):
        output_stems = [f"{i:03d}_{Path(p).stem}" for i, p in enumerate(images)]
    results = []
    for i, path in enumerate(images):
        result = {
            "image": _image_name(path, id_salt), "side": sides[i], "side_from": side_sources[i],
            "polarity_inverted": prepared[i].polarity_inverted, **graded[i],
            "roi_size": grader.image_size, "checkpoint": grader.checkpoint,
            "workdir": str(workdir),
        }
        stem = output_stems[i] if id_salt is None else _image_name(path, id_salt)
        (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
        draw_overlay(prepared[i].image, prepared[i].keypoints, grader.schema, result,
                     out_dir / f"{stem}.png", f"{Path(result['image']).name} ({sides[i]})")
        results.append(result)
        summary = " ".join(f"{grades_lib.PAPER_NAMES[t]} {g['grade']}"
                           for t, g in result["grades"].items())
        print(f"{result['image']}: {summary}  -> {out_dir / (stem + '.json')}", flush=True)
    write_summary_csv(out_dir / "predictions.csv", results, skipped)
    if skipped:
        print(f"{len(skipped)} of {len(images) + len(skipped)} images skipped; listed in "
              f"{out_dir / 'predictions.csv'}", flush=True)
    return results


def _image_name(path: str | Path, id_salt: bytes | None) -> str:
    """How outputs name an image: the path as given, or its salted pseudonym."""
    from kpn_jax import identifiers

    return str(path) if id_salt is None else identifiers.pseudonym(str(path), id_salt)


# kneeKL224's file names: the OAI subject id and the side letter (9001695L.png).
_SIDE_IN_NAME = re.compile(r"^\d+(?P<side>[LR])$")


# A film showing both knees, its knee's side not given: never guessed.
BILATERAL_WITHOUT_SIDE = "bilateral film"


def sides_in_file(path: str | Path, name: str | None = None) -> list[tuple[str, str]]:
    """The knees a file shows, ``[(side, where it came from)]``: a DICOM's ImageLaterality
    (both knees of a film marked 'B'), else a kneeKL224-style file name ending in the side
    letter (``name``, default the path's), else one right knee ('assumed')."""
    laterality = dicom_laterality(path)
    if laterality in ("R", "L"):
        return [(laterality, "DICOM ImageLaterality")]
    if laterality == "B":
        return [("R", "bilateral film, right knee"), ("L", "bilateral film, left knee")]
    match = _SIDE_IN_NAME.match(Path(name or path).stem)
    return [(match.group("side"), "file name")] if match else [("R", "assumed")]


def knee_sides(images: Sequence[str], sides: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """Each image's side and where it came from: ``--sides`` ('flag'), else
    :func:`sides_in_file` (:data:`BILATERAL_WITHOUT_SIDE` for a film of both knees).

    Raises:
      ValueError: a side other than R or L.
    """
    if sides:
        bad = [s for s in sides if s not in ("R", "L")]
        if bad:
            raise ValueError(f"--sides: expected R or L for each image, got {bad[0]!r}")
        return list(sides), ["flag"] * len(images)
    found = [sides_in_file(path) for path in images]
    return ([knees[0][0] for knees in found],
            [knees[0][1] if len(knees) == 1 else BILATERAL_WITHOUT_SIDE for knees in found])


def dicom_laterality(path: str | Path) -> str:
    """A DICOM's ImageLaterality ('R', 'L', 'B'), '' for other files or when it has none."""
    if not image_io.is_dicom(path):
        return ""
    try:
        return image_io.read_dicom_header(path).laterality
    except image_io.ImageReadError:
        return ""  # read_image reports the file when it is graded


def check_one_knee(path: str | Path, radiograph: image_io.Radiograph) -> None:
    """Refuses a film that shows both knees where it would be graded whole, as one knee
    (no keypoints to cut a knee out, or a model trained on whole images).

    Raises:
      ValueError: naming the file, for a DICOM whose ImageLaterality is 'B' (both).
    """
    if dicom_laterality(path) == "B":
        height, width = radiograph.shape
        raise ValueError(f"{path} is a bilateral film (ImageLaterality B, {width}x{height} px) "
                         "and would be graded whole as one knee: give each knee's keypoints "
                         "(--keypoints, with --sides) to a model trained on knees cut out of "
                         "films, or cut the knees out first")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom", "")


def expand_image_paths(entries: Sequence[str]) -> list[str]:
    """Files as given; every image file of a folder (sorted; DICOMs may have no suffix);
    the matches of a glob pattern (sorted).

    Raises:
      FileNotFoundError: an entry that names nothing, or a folder or pattern without images.
    """
    import glob

    paths = []
    for entry in entries:
        expanded = Path(entry).expanduser()
        if expanded.is_dir():
            found = sorted(str(p) for p in expanded.iterdir()
                           if p.is_file() and not p.name.startswith(".")
                           and p.suffix.lower() in IMAGE_SUFFIXES)
        elif any(c in entry for c in "*?["):
            found = sorted(p for p in glob.glob(str(expanded)) if Path(p).is_file())
        else:
            found = [str(expanded)] if expanded.exists() else []
            if not found:
                raise FileNotFoundError(f"--images: {entry} does not exist")
        if not found:
            raise FileNotFoundError(f"--images: no image files in {entry}")
        paths += found
    return paths


def write_summary_csv(path: Path, results: list[dict], skipped: list[tuple[str, str]]) -> None:
    """One row per image: its grades and their probabilities (``kl_p0`` ... ``kl_p4``),
    or why it was skipped."""
    tasks = [t for t in grades_lib.TASKS if any(t in r["grades"] for r in results)]
    probability_columns = [(t, g) for t in tasks for g in range(grades_lib.NUM_CLASSES[t])]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "side", *tasks, *(f"{t}_p{g}" for t, g in probability_columns),
                         "keypoints", "error"])
        for r in results:
            writer.writerow([r["image"], r["side"], *(r["grades"][t]["grade"] for t in tasks),
                             *(r["grades"][t]["probabilities"][g] for t, g in probability_columns),
                             r["keypoints"]["source"], ""])
        for image, reason in skipped:
            writer.writerow([image, "", *([""] * (len(tasks) + len(probability_columns))), "",
                             reason])
