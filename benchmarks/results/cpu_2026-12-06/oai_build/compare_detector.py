"""Detector (the builder's search) vs the BoneFinder points, in film pixels, on every knee of a tree."""
import sys
import numpy as np
from data_prep.oai import builder, tree
from kpn_jax import image_io, landmarks_predict
root, workdir = sys.argv[1], sys.argv[2]
detector = landmarks_predict.load_detector(workdir)
options = builder.OaiOptions(keypoints="detector_all", detector_digest="x")
jobs, _ = builder.plan_oai(root, options)
truth_jobs, _ = builder.plan_oai(root, builder.OaiOptions())
truth = {j.image_id: j.keypoints for js in truth_jobs.values() for j in js}
errors, centres = [], []
for job in (j for js in jobs.values() for j in js):
    film = image_io.read_dicom(job.dicom_path, job.member)
    image = image_io.to_uint8(film.pixels, builder.radiograph_window(film, options))
    points, shift = builder.detect_keypoints(job, image, detector, options)
    spacing = job.spacing_mm[1]
    errors.append(np.linalg.norm(points - truth[job.image_id], axis=-1) * spacing)
    centres.append(np.linalg.norm(points.mean(0) - truth[job.image_id].mean(0)) * spacing)
errors = np.concatenate(errors)
print(f"{len(centres)} knees: point error mean {errors.mean():.2f} mm, median {np.median(errors):.2f}, "
      f"95th percentile {np.percentile(errors, 95):.2f}, max {errors.max():.2f}; joint centre error "
      f"mean {np.mean(centres):.2f} mm, max {np.max(centres):.2f}")
