"""How long the OAI builder takes per 1,000 knees, on a fake release with full-size films.

Writes (once, reused afterwards) an OAI-like tree: ``--films`` bilateral films of
``--film_size`` 16-bit pixels (``<visit>m/contents.csv``, ``<release>/<ID>/<date>/<series>/001``
DICOMs, BoneFinder ``.pts`` in KNEEL's layout, ``kxr_sq_bu??.txt`` readings), then times
``python -m data_prep.oai`` on it (the files route: plan, decode, ROI, write), and the
detector route's extra cost: :func:`kpn_jax.landmarks_predict.locate_knee` (3 passes) per
knee with a detector of ``configs/landmarks.py``'s architecture (random weights: the cost
does not depend on them; pass ``--landmark_workdir`` to time a trained one).

    python benchmarks/oai_build.py --films=100 --num_workers=0,2
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


def knee_points(side: str, width: int, height: int, spacing: float) -> np.ndarray:
    """kneel16 pixels of a knee about 80 mm wide, the right knee on the image left."""
    mm = 1.0 / spacing
    center_x = width * (0.27 if side == "R" else 0.73)
    femur = np.stack([center_x + np.linspace(-36, 36, 7) * mm,
                      height / 2 - (6 - 3 * np.abs(np.linspace(-1, 1, 7))) * mm], -1)
    tibia = np.stack([center_x + np.linspace(-40, 40, 9) * mm, np.full(9, height / 2 + 6 * mm)],
                     -1)
    points = np.concatenate([femur, tibia])
    if side == "L":  # lateral (index 0) is on the image right for a left knee
        points[:7] = points[:7][::-1]
        points[7:] = points[7:][::-1]
    return points


def write_tree(root: pathlib.Path, films: int, size: tuple[int, int], spacing: float) -> int:
    """The fake release; returns the number of knees."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from kpn_jax import pts

    rng = np.random.default_rng(0)
    height, width = size
    yy, xx = np.mgrid[:height, :width]
    base = (1200 + 300 * np.exp(-((xx - width / 2) ** 2) / (2 * (width / 4) ** 2))).astype(np.float32)
    rows = {visit: [] for visit, _, _ in VISITS}
    readings = {code: [] for _, _, code in VISITS}
    for i in range(films):
        visit, release, code = VISITS[i % len(VISITS)]
        subject = str(9000001 + i // len(VISITS))
        date, series = f"200{4 + i % len(VISITS)}0901", f"{10000000 + i}"
        folder = f"{release}/{subject}/{date}/{series}"
        image = base + rng.normal(0, 40, size=(height, width)).astype(np.float32)
        for side in ("R", "L"):
            for x, y in knee_points(side, width, height, spacing):
                image[(xx - x) ** 2 + (yy - y) ** 2 <= 100] = 3500
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
        ds.PixelData = np.clip(image, 0, 4095).astype("<u2").tobytes()
        path = root / visit / folder / "001"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        landmarks = root / "landmarks_oai" / code / release / "x" / subject / date / series
        landmarks.mkdir(parents=True, exist_ok=True)
        for side, name in (("L", "001.pts"), ("R", "001_f.pts")):
            points = knee_points(side, width, height, spacing)
            if side == "R":  # BoneFinder found the right knee on the mirrored film
                points[:, 0] = width - 1 - points[:, 0]
            shape = rng.uniform(0, 50, size=(74, 2))
            shape[list(pts.BONEFINDER_TO_KNEEL16)] = points
            pts.write_pts(landmarks / name, shape * spacing)
        rows[visit].append([folder, subject, date, f"0166{i:08d}", "OAI^XRAY^KNEE",
                            "Bilateral PA Fixed Flexion Knee"])
        for side, side_code in (("R", "1: Right"), ("L", "2: Left")):
            grades = [int(g) for g in rng.integers(0, 4, size=7)]
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
    (root / "complete").write_text(json.dumps({"films": films, "size": size}))
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
    for workers in (int(w) for w in args.num_workers.split(",") if w):
        with tempfile.TemporaryDirectory() as data_dir:
            start = time.perf_counter()
            summary = cli.build(cli.parse_args([f"--manual_dir={tree}", f"--data_dir={data_dir}",
                                                f"--num_workers={workers}"]))
            seconds = time.perf_counter() - start
        written = sum(summary["written"].values())
        results.append({"route": "files", "num_workers": workers, "knees_written": written,
                        "seconds": round(seconds, 1),
                        "seconds_per_1000_knees": round(1000 * seconds / max(written, 1), 1)})
        print(f"files route, {workers} decoding threads: {written} knees in {seconds:.1f} s = "
              f"{1000 * seconds / max(written, 1):.0f} s per 1,000 knees", flush=True)
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
