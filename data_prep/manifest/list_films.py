"""Lists a folder of DICOM films as unlabelled manifest rows: a hospital's unread films as
coherence learning's unlabelled pool, without writing a manifest by hand.

  python -m data_prep.manifest.list_films --films=/data/unread --out=knees_and_films.csv \
      --append_to=knees.csv
  python -m data_prep.manifest --manifest=knees_and_films.csv --data_dir=DIR \
      --keypoints=detector --landmark_workdir=kpn_jax/shipped/kneel16_detector

Each DICOM under ``--films`` (any depth, any suffix) becomes one row per knee it shows:
``subject_id`` from its PatientID, ``side`` from its ImageLaterality (``B``: two rows, R and
L), ``split`` = unlabeled, no grades and no keypoints (the manifest builder's
``--keypoints=detector`` finds each knee). Films without a PatientID or an
ImageLaterality, and files that are not DICOM images, are listed and left out: a knee's
person and side are never guessed. With ``--append_to`` the rows follow that manifest's
(which is copied unchanged), so that one CSV, which the user can read and edit, holds
every row the build will use; the builder then keeps unread films of people graded in
validation or test out of the pool, as for any unlabelled row.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from kpn_jax import image_io

PATH_COLUMNS = ("image", "pts")  # the manifest's columns that name files


def film_rows(films_dir: Path, relative_to: Path) -> tuple[list[dict], list[str]]:
    """``(rows, problems)``: a manifest row per knee of each DICOM under ``films_dir``
    (sorted paths), image paths relative to ``relative_to`` where possible."""
    rows, problems = [], []
    for path in sorted(p for p in films_dir.rglob("*") if p.is_file()):
        if not image_io.is_dicom(path):
            problems.append(f"{path}: not a DICOM image (side and person unknown)")
            continue
        try:
            header = image_io.read_dicom_header(path)
        except image_io.ImageReadError as error:
            problems.append(str(error))
            continue
        if not header.patient_id:
            problems.append(f"{path}: no PatientID (the person is needed to keep the splits "
                            "apart)")
            continue
        sides = {"R": ["R"], "L": ["L"], "B": ["R", "L"]}.get(header.laterality)
        if sides is None:
            problems.append(f"{path}: no ImageLaterality (R, L or B), side unknown")
            continue
        try:
            image = os.path.relpath(path, relative_to)
        except ValueError:  # another drive
            image = str(path)
        rows += [{"image": image, "subject_id": header.patient_id, "side": side,
                  "split": "unlabeled"} for side in sides]
    return rows, problems


def write_rows(out: Path, rows: list[dict], append_to: Path | None = None) -> int:
    """Writes ``append_to``'s rows (unchanged) and then ``rows`` to ``out``; returns the
    number of rows written. Relative file paths of ``append_to`` are rewritten relative to
    ``out``'s folder when the two CSVs are in different folders."""
    header, existing = ["image", "subject_id", "side", "split"], []
    if append_to is not None:
        with append_to.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or []) + [c for c in header
                                                      if c not in (reader.fieldnames or [])]
            existing = list(reader)
        if append_to.resolve().parent != out.resolve().parent:
            for row in existing:  # relative paths start at the CSV's folder
                for column in PATH_COLUMNS:
                    value = row.get(column) or ""
                    if value.strip() and not os.path.isabs(value.strip()):
                        row[column] = os.path.relpath(append_to.resolve().parent / value.strip(),
                                                      out.resolve().parent)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, header, restval="")
        writer.writeheader()
        writer.writerows(existing + rows)
    return len(existing) + len(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.manifest.list_films",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--films", required=True, help="folder of DICOM films (any depth)")
    parser.add_argument("--out", required=True, help="the CSV to write")
    parser.add_argument("--append_to", default=None,
                        help="a manifest whose rows come first (copied unchanged)")
    args = parser.parse_args(argv)
    films, out = Path(args.films).expanduser(), Path(args.out).expanduser()
    append_to = Path(args.append_to).expanduser() if args.append_to else None
    if not films.is_dir():
        print(f"error: --films={films} is not a folder", file=sys.stderr)
        return 1
    if append_to is not None and not append_to.is_file():
        print(f"error: --append_to={append_to} does not exist", file=sys.stderr)
        return 1
    if append_to is not None and out.resolve() == append_to.resolve():
        print("error: --out must differ from --append_to (the manifest is kept as it is)",
              file=sys.stderr)
        return 1
    rows, problems = film_rows(films, out.resolve().parent)
    total = write_rows(out, rows, append_to)
    films_listed = len({row["image"] for row in rows})
    print(f"{len(rows)} unlabelled knee rows from {films_listed} films "
          f"({len(rows) - films_listed} show both knees) -> {out} ({total} rows in all)")
    if problems:
        print(f"{len(problems)} file(s) left out:", *problems, sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
