"""How long the OAI builder takes per 1,000 knees, on a fake release with full-size films.

Writes (once, reused afterwards) an OAI-like tree: ``--films`` bilateral films of
``--film_size`` 16-bit pixels, each with two synthetic knees (the 320 px ROIs of
``data_prep.synthetic_knee`` scaled to 140 mm) at 00m and 12m (``<visit>m/contents.csv``,
``<release>/<ID>/<date>/<series>/001`` DICOMs, BoneFinder ``.pts`` in KNEEL's layout,
``kxr_sq_bu??.txt`` readings with barcodes, all 7 grades), then times
``python -m data_prep.oai`` on it (the files route: plan, decode, ROI, write; with
``--landmark_workdir`` also the whole build with ``--keypoints=detector_all``), and the
detector search alone: :func:`kpn_jax.landmarks_predict.locate_knee` (3 passes) per knee
with that detector, or one of ``configs/landmarks.py``'s architecture with random weights
(the cost does not depend on them).

    python benchmarks/oai_build.py --films=100 --num_workers=0,2 --landmark_workdir=DIR
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any, Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/oai_build.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

VISITS = (("00m", "0.C.2", "00"), ("12m", "1.C.2", "01"))


def paste_knee(film: np.ndarray, knee: dict, center_xy, roi_px: int) -> np.ndarray:
    """Pastes a synthetic knee (its ROI scaled to ``roi_px`` pixels) into ``film`` at
    ``center_xy``; returns its kneel16 points in film pixels."""
    from PIL import Image

    size = knee["image"].shape[0]
    scale = roi_px / size
    roi = np.asarray(Image.fromarray(knee["image"]).resize((roi_px, roi_px), Image.BILINEAR),
                     np.float32) * 16.0
    left = int(round(center_xy[0] - roi_px / 2))
    top = int(round(center_xy[1] - roi_px / 2))
    film[top:top + roi_px, left:left + roi_px] = roi
    return (knee["keypoints"] + 0.5) * scale - 0.5 + np.asarray([left, top], np.float32)


def write_tree(root: pathlib.Path, films: int, size: tuple[int, int], spacing: float,
               roi_mm: float = 140.0) -> int:
    """The fake release (module docstring): each film holds the two synthetic knees of one
    subject (data_prep.synthetic_knee, 320 px ROIs scaled to ``roi_mm``) on noise; returns
    the number of knees."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from data_prep.synthetic_knee import generator
    from kpn_jax import pts

    rng = np.random.default_rng(0)
    height, width = size
    roi_px = int(round(roi_mm / spacing))
    rows = {visit: [] for visit, _, _ in VISITS}
    readings = {code: [] for _, _, code in VISITS}
    for i in range(films):
        visit, release, code = VISITS[i % len(VISITS)]
        subject_index = i // len(VISITS)
        subject = str(9000001 + subject_index)
        date, series = f"200{4 + i % len(VISITS)}0901", f"{10000000 + i}"
        folder = f"{release}/{subject}/{date}/{series}"
        film = rng.normal(400, 60, size=(height, width)).astype(np.float32)
        points = {}
        for side, index, x in (("R", 2 * subject_index, 0.27), ("L", 2 * subject_index + 1, 0.73)):
            knee = generator.generate_knee(i % len(VISITS), index, 320)
            center = (width * x + rng.uniform(-60, 60), height / 2 + rng.uniform(-60, 60))
            points[side] = (paste_knee(film, knee, center, roi_px), knee["grades"])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "CR", height, width, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.ImagerPixelSpacing = [spacing, spacing]
        ds.AccessionNumber = f"0166{i:08d}"
        ds.PixelData = np.clip(film, 0, 4095).astype("<u2").tobytes()
        path = root / visit / folder / "001"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        landmarks = root / "landmarks_oai" / code / release / "x" / subject / date / series
        landmarks.mkdir(parents=True, exist_ok=True)
        for side, name in (("L", "001.pts"), ("R", "001_f.pts")):
            kneel16 = points[side][0].copy()
            if side == "R":  # BoneFinder found the right knee on the mirrored film
                kneel16[:, 0] = width - 1 - kneel16[:, 0]
            shape = rng.uniform(0, 50, size=(74, 2))
            shape[list(pts.BONEFINDER_TO_KNEEL16)] = kneel16
            pts.write_pts(landmarks / name, shape * spacing)
        rows[visit].append([folder, subject, date, f"0166{i:08d}", "OAI^XRAY^KNEE",
                            "Bilateral PA Fixed Flexion Knee"])
        for side, side_code in (("R", "1: Right"), ("L", "2: Left")):
            grades = [int(g) for g in points[side][1]]
            readings[code].append([subject, side_code, "15", f"0166{i:08d}"] + grades)
    for visit, visit_rows in rows.items():
        with open(root / visit / "contents.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["Folder", "ParticipantID", "StudyDate", "Barcode", "StudyDescription",
                             "SeriesDescription"])
            writer.writerows(visit_rows)
    for code, code_rows in readings.items():
        with open(root / f"kxr_sq_bu{code}.txt", "w", newline="") as f:
            writer = csv.writer(f, delimiter="|")
            writer.writerow(["ID", "SIDE", "READPRJ", f"V{code}BARCDBU"]
                            + [f"V{code}{c}" for c in ("XRKL", "XRJSL", "XRJSM", "XROSFL",
                                                       "XROSFM", "XROSTL", "XROSTM")])
            writer.writerows(code_rows)
    (root / "complete").write_text(json.dumps({"films": films, "size": list(size)}))
    return 2 * films


def random_detector(input_size: int = 0):
    """A detector of configs/landmarks.py's architecture with random weights."""
    import jax

    from configs import landmarks as landmarks_config
    from kpn_jax import landmarks_predict, landmarks_train

    config = landmarks_config.get_config()
    input_size = input_size or config.model.input_size
    model = landmarks_train.create_model(config, 16)
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, input_size, input_size, 1),
                                                           np.float32), train=False)
    return landmarks_predict.Detector(
        model=model, variables=variables, input_size=input_size,
        image_size=config.synthetic.image_size, keypoint_schema="kneel16", workdir="random",
        _predict=landmarks_train.make_predict_fn(model, input_size))


def time_detection(root: pathlib.Path, detector, knees: int, roi_mm: float) -> dict[str, Any]:
    """Seconds per knee of the detector route's search (3 passes), on the tree's films."""
    from data_prep.oai import builder as builder_lib
    from kpn_jax import image_io, landmarks_predict

    paths = sorted(root.glob("00m/0.C.2/*/*/*/001"))[: max(1, knees // 2)]
    film = image_io.read_dicom(paths[0])
    window = image_io.window_limits(film.pixels)
    spacing = film.spacing_mm[1]
    landmarks_predict.locate_knee(detector, image_io.to_uint8(film.pixels, window), "R",
                                  roi_mm / spacing, (film.pixels.shape[1] / 4,
                                                     film.pixels.shape[0] / 2))  # compiles
    seconds, count = 0.0, 0
    for path in paths:
        film = image_io.read_dicom(path)   # the files route decodes it too: not counted
        start = time.perf_counter()
        image = image_io.to_uint8(film.pixels, builder_lib.image_io.window_limits(film.pixels))
        for side, x in (("R", 0.25), ("L", 0.75)):
            landmarks_predict.locate_knee(detector, image, side, roi_mm / spacing,
                                          (image.shape[1] * x, image.shape[0] / 2))
            count += 1
        seconds += time.perf_counter() - start
    return {"knees": count, "seconds": round(seconds, 2),
            "seconds_per_1000_knees": round(1000 * seconds / count, 1),
            "note": "the film to uint8 + 3 detector passes per knee, one thread"}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", default=str(REPO_ROOT / "workdirs" / "bench_oai"))
    parser.add_argument("--films", type=int, default=100)
    parser.add_argument("--film_size", default="2048,2560", help="rows,columns")
    parser.add_argument("--spacing", type=float, default=0.14, help="mm per pixel")
    parser.add_argument("--num_workers", default="0,2", help="comma list of decoding threads")
    parser.add_argument("--detector_knees", type=int, default=40)
    parser.add_argument("--landmark_workdir", default="")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)

    from data_prep.oai import __main__ as cli

    tree = pathlib.Path(args.tree)
    size = tuple(int(v) for v in args.film_size.split(","))
    marker = tree / "complete"
    if not marker.exists() or json.loads(marker.read_text()) != {"films": args.films,
                                                                  "size": list(size)}:
        shutil.rmtree(tree, ignore_errors=True)
        write_tree(tree, args.films, size, args.spacing)
    knees = 2 * args.films
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  {os.cpu_count()} CPUs, "
          f"load {[round(x, 2) for x in os.getloadavg()]}; {args.films} films of {size} px "
          f"(16 bit), {knees} knees", flush=True)
    results = []
    routes = [("files", [])]
    if args.landmark_workdir:  # the whole build with the detector placing every knee's points
        routes.append(("detector_all", ["--keypoints=detector_all",
                                        f"--landmark_workdir={args.landmark_workdir}"]))
    for route, route_args in routes:
        for workers in (int(w) for w in args.num_workers.split(",") if w):
            with tempfile.TemporaryDirectory() as data_dir:
                start = time.perf_counter()
                summary = cli.build(cli.parse_args([f"--manual_dir={tree}",
                                                    f"--data_dir={data_dir}",
                                                    f"--num_workers={workers}", *route_args]))
                seconds = time.perf_counter() - start
            written = sum(summary["written"].values())
            results.append({"route": route, "num_workers": workers, "knees_written": written,
                            "keypoints_source": summary["keypoints_source"],
                            "seconds": round(seconds, 1),
                            "seconds_per_1000_knees": round(1000 * seconds / max(written, 1), 1)})
            print(f"{route} route, {workers} decoding threads: {written} knees in {seconds:.1f} s "
                  f"= {1000 * seconds / max(written, 1):.0f} s per 1,000 knees", flush=True)
    if args.detector_knees:
        from kpn_jax import landmarks_predict

        detector = (landmarks_predict.load_detector(args.landmark_workdir)
                    if args.landmark_workdir else random_detector())
        detection = time_detection(tree, detector, args.detector_knees, 140.0)
        detection["detector"] = args.landmark_workdir or "configs/landmarks.py, random weights"
        results.append({"route": "detector search", **detection})
        print(f"detector search: {detection['seconds_per_1000_knees']:.0f} s per 1,000 knees "
              f"more (window, 3 passes of {detection['detector']})")
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "host_cpus": os.cpu_count(), "settings": vars(args), "results": results}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
