"""Inference with a trained kneel16 landmark detector: load it, find keypoints, write files.

:func:`load_detector` / :func:`detect` turn uint8 images ``[B, H, W, 1]`` of any size
(right-knee orientation) into keypoints ``[B, 16, 2]`` in those images' pixels;
:func:`predict_landmark_files` is ``--mode=predict`` for a landmark workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from kpn_jax import checkpointing, parallel, trainer
from kpn_jax import keypoints as kp_lib
from kpn_jax.landmarks_train import (DATA_INFO, DTYPES, TASK, create_model, create_state,
                                     make_optimizer, make_predict_fn)
from kpn_jax.models import landmarks as lm



@dataclasses.dataclass
class Detector:
    """A trained detector ready to run: model, variables and the size it expects.

    ``image_size`` is the stored size of its training images; inputs of another size are
    resized (each axis on its own), so a detector expects a knee ROI framed like its
    training crops.
    """

    model: lm.LandmarkNet
    variables: dict
    input_size: int
    image_size: int
    keypoint_schema: str
    workdir: str = ""
    checkpoint: dict = dataclasses.field(default_factory=dict)
    _predict: Any = dataclasses.field(default=None, repr=False)

    def __call__(self, images, batch_size: int = 32) -> np.ndarray:
        return detect(self, images, batch_size=batch_size)


def load_detector(workdir: str | os.PathLike, which: str = "auto") -> Detector:
    """Loads a trained detector from its workdir (``config.json``, ``data_info.json``,
    checkpoints) or from a model folder (:mod:`kpn_jax.model_folder`, e.g. the shipped
    :data:`kpn_jax.model_folder.SHIPPED_DETECTOR`).

    Args:
      which: ``'best'``, ``'latest'`` or ``'auto'`` (best when there is one); a model folder
        holds one set of weights.

    Raises:
      FileNotFoundError: no detector there.
      ValueError: the workdir holds another kind of run; a damaged model folder.
    """
    from kpn_jax import model_folder

    workdir = Path(workdir).expanduser().resolve()
    exported = model_folder.is_model_folder(workdir)
    if exported:
        manifest = model_folder.read_manifest(workdir, kind="landmarks")
    for name in ("config.json", DATA_INFO):
        if not (workdir / name).exists():
            raise FileNotFoundError(f"{workdir} is not a landmark-detector workdir ({name} "
                                    "missing); train one with configs/landmarks.py")
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    if config.get("task") != TASK:
        raise ValueError(f"{workdir} holds a {config.get('task', 'grading')!r} run, not a "
                         "landmark detector")
    info = json.loads((workdir / DATA_INFO).read_text())
    schema = kp_lib.get_schema(info["keypoint_schema"])
    model = create_model(config, schema.num_points)
    input_size = int(info["input_size"])
    if exported:
        template = jax.eval_shape(lambda: model.init(
            jax.random.PRNGKey(0), np.zeros((1, input_size, input_size, 1), np.float32),
            train=False))
        variables = model_folder.read_variables(workdir, template)
        checkpoint = {**manifest.get("checkpoint", {}), "model_folder": str(workdir)}
    else:
        mesh = parallel.make_mesh(jax.local_devices()[:1])
        state = create_state(config, model, make_optimizer(config), input_size, mesh)
        checkpoints = checkpointing.Checkpointer(workdir, keep=config.get("keep_checkpoints", 2))
        try:
            if which == "auto":
                which = "best" if checkpoints.best_step() is not None else "latest"
            state = checkpoints.restore(state, which=which)
        finally:
            checkpoints.close()
        variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
        checkpoint = {"which": which, "step": int(jax.device_get(state.step))}
    return Detector(model=model, variables=variables, input_size=input_size,
                    image_size=int(info["image_size"]), keypoint_schema=schema.name,
                    workdir=str(workdir), checkpoint=checkpoint,
                    _predict=make_predict_fn(model, input_size, DTYPES[config.dtype]))


def export_detector(workdir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """``--mode=export`` of a detector workdir: its best (else latest) weights, config and
    data facts as a model folder, with the dev/validation errors its report measured."""
    from kpn_jax import model_folder

    workdir = Path(workdir).expanduser().resolve()
    detector = load_detector(workdir)
    description = {"dataset": "kneel16 keypoints"}
    for report in sorted((workdir / "report").glob("landmarks_*_*.json")):
        measured = json.loads(report.read_text())
        description[report.stem] = {k: measured.get(k) for k in
                                    ("mean", "median", "within_2px", "within_3px", "within_5px",
                                     "images") if k in measured}
    return model_folder.write(
        out_dir, kind="landmarks", config=json.loads((workdir / "config.json").read_text()),
        data_info=json.loads((workdir / DATA_INFO).read_text()),
        variables=detector.variables, checkpoint=detector.checkpoint, description=description)


def detect(workdir_or_detector, images, batch_size: int = 32) -> np.ndarray:
    """Finds the keypoints of knee ROIs.

    Args:
      workdir_or_detector: a detector workdir (path) or a :class:`Detector`
        (load once with :func:`load_detector` when calling many times).
      images: uint8 ``[B, H, W, 1]`` (or ``[B, H, W]``), right-knee orientation
        (lateral on the image left), framed like the detector's training crops.
      batch_size: images per forward pass (the last one is padded, so one compilation).

    Returns:
      float32 ``[B, N, 2]`` ``(x, y)`` in pixels of ``images``.
    """
    detector = (workdir_or_detector if isinstance(workdir_or_detector, Detector)
                else load_detector(workdir_or_detector))
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] != 1:
        raise ValueError(f"images: expected uint8 [B, H, W, 1], got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images: expected uint8, got {images.dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    predict = detector._predict or make_predict_fn(detector.model, detector.input_size)
    count = images.shape[0]
    size = min(batch_size, max(count, 1))
    out = []
    for start in range(0, count, size):
        chunk = images[start:start + size]
        padded = np.concatenate([chunk, np.repeat(chunk[:1], size - len(chunk), axis=0)])
        out.append(np.asarray(predict(detector.variables, padded))[: len(chunk)])
    num_points = kp_lib.get_schema(detector.keypoint_schema).num_points
    return (np.concatenate(out).astype(np.float32) if out
            else np.zeros((0, num_points, 2), np.float32))


# ----------------------------------------------------------------------------- files


def radiograph_to_uint8(radiograph) -> np.ndarray:
    """A :class:`kpn_jax.image_io.Radiograph` -> uint8 ``[H, W]``.

    An 8-bit file keeps its grey values; deeper ones go through the file's window (DICOM)
    or robust percentiles.
    """
    from kpn_jax import image_io

    pixels = np.asarray(radiograph.pixels, np.float32)
    if radiograph.bit_depth <= 8 and pixels.min() >= 0 and pixels.max() <= 255:
        return np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    window = radiograph.window or image_io.window_limits(pixels)
    return image_io.to_uint8(pixels, window)


def detect_in_roi(detector: Detector, image: np.ndarray, side: str = "R") -> np.ndarray:
    """Keypoints of one knee ROI as stored in a file, in that image's pixels.

    Args:
      detector: a loaded :class:`Detector`.
      image: uint8 ``[H, W]`` (or ``[H, W, 1]``), a knee ROI framed like the detector's
        training crops (the joint in the middle, the knee filling the width), any size.
      side: ``'R'`` or ``'L'``: a left knee is mirrored before detection (the detector
        works in right-knee orientation) and its points mirrored back.

    Returns:
      float32 ``[N, 2]`` ``(x, y)`` pixels of ``image`` in kneel16 order (lateral first).
    """
    from kpn_jax import image_io, roi as roi_lib

    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"image: expected uint8 [H, W], got {image.dtype} {image.shape}")
    height, width = image.shape
    oriented, _ = roi_lib.to_right_orientation(image, None, side)
    square, _ = image_io.resize_whole(oriented, None, detector.image_size)
    square = np.clip(np.round(square), 0, 255).astype(np.uint8)
    points = detect(detector, square[None, ..., None])[0]
    # Undo resize_whole: a square of side max(H, W) centred on the image, scaled to S.
    points = roi_lib.roi_to_source(points, ((width - 1) / 2.0, (height - 1) / 2.0),
                                   float(max(height, width)), detector.image_size)
    if side == "L":
        points = kp_lib.flip_horizontal(points, width)
    return points.astype(np.float32)


def locate_knee(detector: Detector, image: np.ndarray, side: str, roi_size: float, start_xy,
                passes: int = 3) -> tuple[np.ndarray, float]:
    """Keypoints of one knee of a whole radiograph, with no keypoints to start from.

    The detector sees a ``roi_size``-pixel square around ``start_xy`` (e.g. the middle of
    the film's half that holds the knee), then squares re-centred on the joint centre of
    its previous answer; the answer of a good detection no longer moves.

    Args:
      detector: a loaded :class:`Detector` (trained on ROIs of about ``roi_size`` pixels).
      image: uint8 ``[H, W]``, the radiograph as is (a left knee is mirrored here).
      side: ``'R'`` or ``'L'``, the knee to find.
      roi_size: side of the square the detector sees, in radiograph pixels.
      start_xy: ``(x, y)`` where to look first, radiograph pixels.
      passes: detector passes (at least 2).

    Returns:
      ``(keypoints float32 [N, 2] in radiograph pixels, shift)``: ``shift`` is the mean
      distance in pixels the points moved in the last pass (large = not converged, a
      detection not to trust).
    """
    from kpn_jax import roi as roi_lib

    image = np.asarray(image)
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"image: expected uint8 [H, W], got {image.dtype} {image.shape}")
    if passes < 2:
        raise ValueError(f"passes must be >= 2, got {passes}")
    width = image.shape[1]
    oriented, _ = roi_lib.to_right_orientation(image, None, side)
    center = np.asarray(start_xy, np.float64)
    if side == "L":
        center[0] = width - 1 - center[0]
    points, shift = None, float("inf")
    for _ in range(passes):
        roi, _ = roi_lib.crop_and_resize(oriented, None, center, roi_size, detector.image_size)
        found = detect(detector, np.clip(np.round(roi), 0, 255).astype(np.uint8)[None, ..., None])
        moved = roi_lib.roi_to_source(found[0], center, roi_size, detector.image_size)
        if points is not None:
            shift = float(np.mean(np.linalg.norm(moved - points, axis=-1)))
        points = moved
        center = roi_lib.joint_center(points).astype(np.float64)
    if side == "L":
        points = kp_lib.flip_horizontal(points, width)
    return points.astype(np.float32), shift


def write_overlay(path: Path, image: np.ndarray, keypoints: np.ndarray, schema, title: str) -> Path:
    """The image with its keypoints drawn (bones joined)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height, width = image.shape[:2]
    figure = Figure(figsize=(6, 6 * height / width), dpi=100)
    FigureCanvasAgg(figure)
    axis = figure.add_axes((0, 0, 1, 1))
    axis.imshow(image, cmap="gray", vmin=0, vmax=255)
    for bone in schema.bones.values():
        axis.plot(keypoints[list(bone), 0], keypoints[list(bone), 1], "-", color="red",
                  linewidth=1.0)
    axis.plot(keypoints[:, 0], keypoints[:, 1], ".", color="yellow", markersize=4)
    axis.text(4, 12, title, color="yellow", fontsize=8)
    axis.set_axis_off()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def predict_landmark_files(workdir, images: Sequence[str], sides: Sequence[str] | None = None,
                           output_dir: str | None = None,
                           detector: Detector | None = None) -> list[dict]:
    """``--mode=predict`` with a landmark config: keypoints of knee ROI files.

    Writes ``<output_dir>/<stem>.landmarks.json`` and ``<stem>.landmarks.png`` per image
    (default ``output_dir``: ``workdir/predictions``) and returns the JSON dicts:
    ``image``, ``side``, ``keypoint_schema``, ``point_names``, ``keypoints`` ``[[x, y]] * N``
    (pixels of the file), ``keypoints_source`` (``'detected'``) and ``detector``.

    Raises:
      ValueError: when ``sides`` does not give one 'L'/'R' per image.
    """
    from kpn_jax import image_io

    if not images:
        raise ValueError("--images: give at least one image file")
    sides = list(sides) if sides else ["R"] * len(images)
    if len(sides) != len(images) or any(s not in ("L", "R") for s in sides):
        raise ValueError(f"--sides: expected one of 'L'/'R' per image ({len(images)}), got {sides}")
    detector = detector or load_detector(workdir)
    schema = kp_lib.get_schema(detector.keypoint_schema)
    out_dir = Path(output_dir or Path(workdir) / "predictions").expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for path, side in zip(images, sides):
        image = radiograph_to_uint8(image_io.read_image(path))
        points = detect_in_roi(detector, image, side)
        record = {"image": str(path), "side": side, "keypoint_schema": schema.name,
                  "point_names": list(schema.point_names),
                  "keypoints": np.round(points, 3).tolist(),
                  "keypoints_source": "detected",
                  "detector": {"workdir": detector.workdir, **detector.checkpoint}}
        stem = Path(path).stem
        (out_dir / f"{stem}.landmarks.json").write_text(json.dumps(record, indent=1))
        write_overlay(out_dir / f"{stem}.landmarks.png", image, points, schema,
                      f"{stem} ({side}): detected keypoints")
        results.append(record)
        trainer.print_once(f"{path}: {schema.num_points} keypoints detected -> {out_dir / (stem + '.landmarks.json')}")
    return results
