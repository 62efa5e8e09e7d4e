"""Pictures and timings of the generator: the contact sheet and the speed measurement."""

from __future__ import annotations

import time

import numpy as np
from PIL import Image, ImageDraw

from kpn_jax import roi as roi_lib
from data_prep.synthetic_knee import generator as generator_lib
from kpn_jax import grades as grades_lib

FEMUR_COLOUR = (255, 60, 60)
TIBIA_COLOUR = (60, 220, 60)


def indices_by_kl(seed: int, per_grade: int, max_index: int = 100_000) -> list[list[int]]:
    """The first ``per_grade`` knee indices of each clean KL grade (0-4)."""
    rows: list[list[int]] = [[] for _ in range(grades_lib.NUM_CLASSES["kl"])]
    for index in range(max_index):
        kl = int(generator_lib.sample_grades(seed, index).grades_clean[0])
        if len(rows[kl]) < per_grade:
            rows[kl].append(index)
        if all(len(r) == per_grade for r in rows):
            return rows
    raise ValueError(f"fewer than {per_grade} knees of some KL grade among the first {max_index}")


def contact_sheet(seed: int = 0, image_size: int = 200, per_grade: int = 5,
                  draw_keypoints: bool = True, label_width: int = 56) -> Image.Image:
    """RGB sheet: one row per clean KL grade (0 at the top), knees in right orientation
    (as stored), kneel16 points drawn (femur red, tibia green), clean OARSI grades below."""
    rows = indices_by_kl(seed, per_grade)
    sheet = Image.new("RGB", (label_width + per_grade * image_size, len(rows) * image_size),
                      "black")
    draw = ImageDraw.Draw(sheet)
    radius = max(1.5, image_size / 110)
    for kl, indices in enumerate(rows):
        draw.text((6, kl * image_size + image_size // 2 - 6), f"KL {kl}", fill="white")
        for column, index in enumerate(indices):
            knee = generator_lib.generate_knee(seed, index, image_size)
            image, points = roi_lib.to_right_orientation(knee["image"], knee["keypoints"],
                                                         knee["side"])
            tile = Image.fromarray(image).convert("RGB")
            tile_draw = ImageDraw.Draw(tile)
            if draw_keypoints:
                for p, (x, y) in enumerate(points):
                    colour = FEMUR_COLOUR if p < 7 else TIBIA_COLOUR
                    tile_draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
            oarsi = " ".join(str(int(g)) for g in knee["grades_clean"][1:])
            tile_draw.text((3, image_size - 12), f"{knee['side']} JSN/OST {oarsi}", fill="yellow")
            sheet.paste(tile, (label_width + column * image_size, kl * image_size))
    return sheet


def measure_speed(seed: int = 0, image_size: int = generator_lib.DEFAULT_IMAGE_SIZE,
                  count: int = 300, warmup: int = 5) -> dict:
    """Times :func:`generator.generate_knee` in this process (one thread, one core).

    Returns:
      ``{'images_per_cpu_s', 'images_per_s', 'ms_per_image_median', 'ms_per_image_min',
      'count', 'image_size'}``: ``images_per_cpu_s`` is ``count`` over the CPU time this
      process used, the speed of one core even when other processes share it;
      ``images_per_s`` is ``count`` over the wall time (lower on a busy machine).
    """
    for index in range(warmup):
        generator_lib.generate_knee(seed, index, image_size)
    times = []
    start, start_cpu = time.perf_counter(), time.process_time()
    for index in range(count):
        t = time.perf_counter()
        generator_lib.generate_knee(seed, index, image_size)
        times.append(time.perf_counter() - t)
    total, total_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return {"images_per_cpu_s": count / total_cpu, "images_per_s": count / total,
            "ms_per_image_median": 1e3 * float(np.median(times)),
            "ms_per_image_min": 1e3 * float(np.min(times)), "count": count,
            "image_size": image_size}
