"""OAI semi-quantitative knee X-ray readings (KL and OARSI grades), in every published form.

Forms read here, all into one long table (one row per knee reading):

- ``kxr_sq_bu{vv}.sas7bdat`` (the OAI "X-ray assessments - SAS" download): wide, one file
  per visit, upper-case columns ``ID, SIDE, READPRJ, V{vv}XRKL, V{vv}XRJSL, V{vv}XRJSM,
  V{vv}XROSFL, V{vv}XROSFM, V{vv}XROSTL, V{vv}XROSTM``; ``SIDE`` 1 = right, 2 = left.
- ``kxr_sq_bu{vv}.txt`` (the same tables as "ASCII"): ``|``-separated, same columns;
  values may carry their label (``"1: Right"``, ``"3: 3"``).
- the NIMH Data Archive structure ``oai_kxrsemiquant01.txt``: tab-separated, a second
  header line of descriptions, lower-case columns, all visits in one file with a
  ``visit`` column (``V00``...), ``src_subject_id`` = the OAI ID (``subjectkey`` is the NDA
  GUID), and ``xrkl, xrjsl, xrjsm, xrosfl, xrosfm, xrostl, xrostm`` without the visit
  prefix.

Documented choices (each an option of the builder; docs/DATASETS.md):
- Visits are the two-digit OAI codes: 00 baseline, 01 = 12 months, 03 = 24, 05 = 36,
  06 = 48, 08 = 72, 10 = 96 (the visits with knee readings); the image folders map
  to them by months (:data:`MONTHS_TO_VISIT`).
- A grade with a fraction is rounded half to even (``np.round``, as published code
  does: KneeOARSIGrading, CLIMATv2), or floored (``fractions='floor'``); no codebook
  meaning of fractions was found. ``.5`` (a fraction written without its 0) is a
  number. A value outside the task's range, or text that is not a number nor an OAI
  missing code (``.``, ``.: Missing Form``, ``.A: Not Expected``), is not graded. All
  three are counted.
- READPRJ 42 is recoded to 37, as the OAI's description of kXR_SQ_BU asks, and a
  labelled project (``15: ...``) is read as its number.
- Several reading projects may grade the same knee at the same visit. ONE reading wins
  and its grades are used together (never mixed across readers: their coherence is
  what the model learns). By default the project order ``readprj_priority`` (15, then
  37) decides, and completeness only breaks ties, so the label source does not change
  from knee to knee; ``choice='complete'`` puts the reading with the most grades
  first.
- Each reading keeps the barcode of the film it graded (``V{vv}BARCDBU`` / the NDA's
  ``barcode``), which the builder matches to the film's.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from kpn_jax import grades as grades_lib

logger = logging.getLogger(__name__)

# Task -> the OAI variable suffix (V{vv}XRKL, ... or xrkl, ... in the NDA form).
VARIABLES: dict[str, str] = {
    "kl": "XRKL",
    "jsn_lateral": "XRJSL",
    "jsn_medial": "XRJSM",
    "ost_femur_lateral": "XROSFL",
    "ost_femur_medial": "XROSFM",
    "ost_tibia_lateral": "XROSTL",
    "ost_tibia_medial": "XROSTM",
}
MONTHS_TO_VISIT: dict[int, str] = {0: "00", 12: "01", 18: "02", 24: "03", 30: "04", 36: "05",
                                   48: "06", 60: "07", 72: "08", 84: "09", 96: "10", 108: "11"}
DEFAULT_READPRJ_PRIORITY: tuple[str, ...] = ("15", "37")
RECODED_READPRJ = {"42": "37"}  # "participants coded READPRJ=42 are in fact in Project 37"
FRACTIONS = ("round", "floor")
CHOICES = ("priority", "complete")
KEY_COLUMNS = ("subject_id", "visit", "side")
COLUMNS = ("subject_id", "visit", "side", "readprj", "barcode") + grades_lib.TASKS + ("source",)
# Preference among copies of one table in several forms (the same kxr_sq_bu?? as SAS and ASCII).
FORM_PREFERENCE = (".sas7bdat", ".txt", ".xpt")

_NUMBER = re.compile(r"^\s*(-?(?:\d+(?:\.\d*)?|\.\d+))")
_MISSING_CODE = re.compile(r"^\s*\.")  # '.', '.: Missing Form/...', '.A: Not Expected'
_WIDE_BARCODE = "V{visit}BARCDBU"
_WIDE_KL = re.compile(r"^V(\d\d)XRKL$")


class ReadingsError(ValueError):
    """A readings file cannot be used; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Reading:
    """The reading chosen for one knee at one visit."""

    grades: np.ndarray   # int32 [7], -1 = not graded
    readprj: str
    source: str          # 'file:row'
    barcode: str         # digits of the graded film's barcode; '' when the file has none


@dataclasses.dataclass
class ReadingsReport:
    """What was odd in the readings; goes into the build summary."""

    files: list[str] = dataclasses.field(default_factory=list)
    files_ignored: list[str] = dataclasses.field(default_factory=list)
    rows_read: int = 0
    fractional_grades: int = 0
    out_of_range_grades: int = 0
    unparsable_grades: int = 0
    readprj_recoded: int = 0
    bad_side_rows: int = 0
    ungraded_rows: int = 0
    duplicate_readings: int = 0
    winners_by_readprj: collections.Counter = dataclasses.field(
        default_factory=collections.Counter)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["winners_by_readprj"] = dict(sorted(self.winners_by_readprj.items()))
        return out


def normalise_id(value) -> str:
    """OAI IDs and project codes as text: ``9000099.0`` (a SAS number) -> ``'9000099'``."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    text = str(value).strip()
    match = re.fullmatch(r"(-?\d+)\.0*", text)
    return match.group(1) if match else text


def normalise_readprj(value, report: "ReadingsReport | None" = None) -> str:
    """A READPRJ as its project number text: ``15.0``/``'15: Central'`` -> ``'15'``, and
    42 recoded to 37 (counted in ``report``)."""
    text = normalise_id(value).split(":")[0].strip()
    text = normalise_id(text)
    if text in RECODED_READPRJ:
        if report is not None:
            report.readprj_recoded += 1
        return RECODED_READPRJ[text]
    return text


def normalise_barcode(value) -> str:
    """A barcode's digits (``'016600000001'``; a SAS float ``16600000001.0`` loses its 0)."""
    return re.sub(r"\D", "", normalise_id(value))


def barcode_key(barcode: str) -> str:
    """The part of a barcode that identifies the film: its last 7 digits (prefixes and
    leading zeros differ between tables; pain-disparities matches this way)."""
    digits = re.sub(r"\D", "", barcode or "")
    return digits[-7:] if len(digits) >= 7 else ""


def parse_side(value) -> str | None:
    """``1``/``'1: Right'``/``'right'``/``'R'`` -> ``'R'``; 2/left/L -> ``'L'``; else None."""
    text = normalise_id(value).lower()
    number = _NUMBER.match(text)
    if number:
        return {1.0: "R", 2.0: "L"}.get(float(number.group(1)))
    text = text.strip()
    if text in ("r", "right"):
        return "R"
    if text in ("l", "left"):
        return "L"
    return None


def parse_grades(values: pd.Series, num_classes: int, report: ReadingsReport,
                 fractions: str = "round") -> np.ndarray:
    """One grade column -> int32 ``[rows]``, -1 = not graded (see the module's choices)."""
    if fractions not in FRACTIONS:
        raise ValueError(f"fractions must be one of {FRACTIONS}, got {fractions!r}")
    numbers = []
    for value in values:
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if value is None or (isinstance(value, float) and np.isnan(value)):
            numbers.append(np.nan)
            continue
        match = _NUMBER.match(str(value))
        if match is None and str(value).strip() and not _MISSING_CODE.match(str(value)):
            report.unparsable_grades += 1
        numbers.append(float(match.group(1)) if match else np.nan)
    numbers = np.asarray(numbers, dtype=np.float64)
    present = np.isfinite(numbers)
    whole = np.where(present, numbers, 0.0)
    whole = np.round(whole) if fractions == "round" else np.floor(whole)
    report.fractional_grades += int(np.sum(present & (whole != numbers)))
    out_of_range = present & ((whole < 0) | (whole >= num_classes))
    report.out_of_range_grades += int(np.sum(out_of_range))
    return np.where(present & ~out_of_range, whole, grades_lib.MISSING).astype(np.int32)


def _read_table(path: Path) -> pd.DataFrame:
    """The raw table of any readings file, every value as read (strings for text files)."""
    name = path.name.lower()
    try:
        if name.endswith(".sas7bdat"):
            return pd.read_sas(path, format="sas7bdat", encoding="latin-1")
        if name.endswith((".xpt", ".xport")):
            return pd.read_sas(path, format="xport", encoding="latin-1")
        with open(path, encoding="latin-1") as f:
            first_line = f.readline()
        separator = max(("\t", "|", ","), key=first_line.count)
        return pd.read_csv(path, sep=separator, dtype=str, keep_default_na=False,
                           na_values=[""], encoding="latin-1")
    except (OSError, ValueError, UnicodeError) as e:
        raise ReadingsError(f"{path}: cannot read readings table ({e})") from e


def _long_from_wide(table: pd.DataFrame, source: str) -> list[pd.DataFrame]:
    """The OAI wide form (``V{vv}XRKL``...) -> one long frame per visit found."""
    columns = {c.upper(): c for c in table.columns}
    visits = sorted({m.group(1) for c in columns if (m := _WIDE_KL.match(c))})
    for required in ("ID", "SIDE"):
        if required not in columns:
            raise ReadingsError(f"{source}: column {required} missing "
                                f"(has {sorted(columns)[:12]}...)")
    frames = []
    for visit in visits:
        barcode = columns.get(_WIDE_BARCODE.format(visit=visit))
        frame = pd.DataFrame({
            "subject_id": table[columns["ID"]],
            "visit": visit,
            "side": table[columns["SIDE"]],
            "readprj": table[columns["READPRJ"]] if "READPRJ" in columns else "",
            "barcode": table[barcode] if barcode is not None else "",
        })
        for task, suffix in VARIABLES.items():
            column = columns.get(f"V{visit}{suffix}")
            frame[task] = table[column] if column is not None else np.nan
        frames.append(frame)
    return frames


def _long_from_nda(table: pd.DataFrame, source: str) -> pd.DataFrame:
    """The NDA form (``visit``, ``xrkl``... lower case) -> one long frame."""
    columns = {c.lower(): c for c in table.columns}
    subject = next((columns[c] for c in ("src_subject_id", "id") if c in columns), None)
    if subject is None and "subjectkey" in columns:
        raise ReadingsError(f"{source}: has only subjectkey (the NDA GUID), which never matches "
                            "the images' ParticipantID; use a copy with src_subject_id")
    if subject is None or "side" not in columns:
        raise ReadingsError(f"{source}: needs columns src_subject_id (or id) and side")
    visit = table[columns["visit"]].map(lambda v: re.sub(r"^[Vv]", "", normalise_id(v)).zfill(2))
    frame = pd.DataFrame({
        "subject_id": table[subject],
        "visit": visit,
        "side": table[columns["side"]],
        "readprj": table[columns["readprj"]] if "readprj" in columns else "",
        "barcode": table[columns["barcode"]] if "barcode" in columns else "",
    })
    for task, suffix in VARIABLES.items():
        column = columns.get(suffix.lower())
        frame[task] = table[column] if column is not None else np.nan
    return frame


def read_readings(path: str | os.PathLike, report: ReadingsReport | None = None,
                  fractions: str = "round") -> pd.DataFrame:
    """Reads one readings file (any form above) into the long table.

    Returns:
      DataFrame with :data:`COLUMNS`: ``subject_id`` (OAI ID text), ``visit`` ('00'..),
      ``side`` ('R'/'L'), ``readprj`` (text, 42 recoded to 37), ``barcode`` (digits or
      ''), one int32 column per task (-1 = not graded) and ``source`` ('file:row').
      Rows without any grade are dropped.

    Raises:
      ReadingsError: naming the file when it has neither form's columns.
    """
    path = Path(path)
    report = report if report is not None else ReadingsReport()
    table = _read_table(path)
    upper = {str(c).upper() for c in table.columns}
    if any(_WIDE_KL.match(c) for c in upper):
        frames = _long_from_wide(table, str(path))
    elif "VISIT" in upper and "XRKL" in upper:
        frames = [_long_from_nda(table, str(path))]
    else:
        raise ReadingsError(f"{path}: not an OAI readings table: no V<vv>XRKL column (SAS/ASCII "
                            f"form) and no visit + xrkl columns (NDA form)")
    report.files.append(str(path))
    out = []
    for frame in frames:
        frame = frame.reset_index(drop=True)
        # Row numbers as a spreadsheet shows them (header = row 1).
        frame["source"] = [f"{path.name}:row {i + 2}" for i in range(len(frame))]
        sides = frame["side"].map(parse_side)
        if len(frame) and pd.isna(sides.iloc[0]) and isinstance(frame["side"].iloc[0], str) \
                and not _NUMBER.match(frame["side"].iloc[0]):
            # The NDA form's second line holds the columns' descriptions, not data.
            frame, sides = frame.iloc[1:], sides.iloc[1:]
        report.rows_read += len(frame)
        bad = sides.isna()
        if bad.any():
            report.bad_side_rows += int(bad.sum())
            logger.warning("%s: %d rows with an unreadable SIDE skipped (first: %s)", path,
                           int(bad.sum()), frame["source"][bad].iloc[0])
        frame = frame[~bad].copy()
        frame["side"] = sides[~bad]
        frame["subject_id"] = frame["subject_id"].map(normalise_id)
        frame["readprj"] = frame["readprj"].map(lambda v: normalise_readprj(v, report))
        frame["barcode"] = frame["barcode"].map(normalise_barcode)
        for task in grades_lib.TASKS:
            frame[task] = parse_grades(frame[task], grades_lib.NUM_CLASSES[task], report,
                                       fractions)
        graded = (frame[list(grades_lib.TASKS)] != grades_lib.MISSING).any(axis=1)
        report.ungraded_rows += int((~graded).sum())
        out.append(frame[graded])
    result = pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=list(COLUMNS))
    return result[list(COLUMNS)]


def choose_readings(readings: pd.DataFrame,
                    readprj_priority: Sequence[str] = DEFAULT_READPRJ_PRIORITY,
                    report: ReadingsReport | None = None, choice: str = "priority") -> pd.DataFrame:
    """One reading per (subject_id, visit, side), by the rule in the module docstring."""
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
    report = report if report is not None else ReadingsReport()
    if readings.empty:
        return readings.copy()
    priority = {normalise_readprj(p): i for i, p in enumerate(readprj_priority)}
    ranked = readings.copy()
    ranked["_graded"] = -(ranked[list(grades_lib.TASKS)] != grades_lib.MISSING).sum(axis=1)
    ranked["_priority"] = ranked["readprj"].map(lambda p: priority.get(p, len(priority)))
    ranked["_number"] = pd.to_numeric(ranked["readprj"], errors="coerce").fillna(np.inf)
    order = (["_priority", "_graded"] if choice == "priority" else ["_graded", "_priority"])
    ranked = ranked.sort_values(order + ["_number", "source"], kind="stable")
    chosen = ranked.drop_duplicates(list(KEY_COLUMNS), keep="first")
    report.duplicate_readings += len(ranked) - len(chosen)
    report.winners_by_readprj.update(chosen["readprj"].tolist())
    return chosen.drop(columns=["_graded", "_priority", "_number"]).reset_index(drop=True)


def is_readings_file(name: str) -> bool:
    """File names of the readings in their published forms."""
    name = name.lower()
    return bool(re.fullmatch(r"kxr_sq_bu\d\d\.(sas7bdat|txt|xpt)", name)
                or re.fullmatch(r".*kxrsemiquant\d*\.txt", name))


def find_readings_files(root: str | os.PathLike) -> list[Path]:
    """Readings files anywhere under ``root``, sorted."""
    found = []
    for directory, _, files in os.walk(root):
        found += [Path(directory) / f for f in files if is_readings_file(f)]
    return sorted(found)


def one_form_per_table(paths: Iterable[str | os.PathLike],
                       report: ReadingsReport | None = None) -> list[Path]:
    """``paths`` with one copy per table: ``kxr_sq_bu00.sas7bdat`` and ``kxr_sq_bu00.txt``
    hold the same readings, so only the first form of :data:`FORM_PREFERENCE` is kept (the
    others are listed in ``report.files_ignored``)."""
    by_table: dict[str, list[Path]] = collections.defaultdict(list)
    for path in map(Path, paths):
        by_table[path.stem.lower()].append(path)
    kept = []
    for table, copies in sorted(by_table.items()):
        copies.sort(key=lambda p: (FORM_PREFERENCE.index(p.suffix.lower())
                                   if p.suffix.lower() in FORM_PREFERENCE else len(FORM_PREFERENCE),
                                   str(p)))
        kept.append(copies[0])
        for other in copies[1:]:
            logger.info("%s: another copy of %s; reading %s only", other, table, copies[0])
            if report is not None:
                report.files_ignored.append(f"{other} (same table as {copies[0].name})")
    return kept


def load_readings(paths: Iterable[str | os.PathLike],
                  readprj_priority: Sequence[str] = DEFAULT_READPRJ_PRIORITY,
                  report: ReadingsReport | None = None, choice: str = "priority",
                  fractions: str = "round") -> dict[tuple[str, str, str], Reading]:
    """Reads readings files (one form per table) and keeps one reading per knee and visit.

    Returns:
      ``{(subject_id, visit, side): Reading}``.
    """
    report = report if report is not None else ReadingsReport()
    frames = [read_readings(p, report, fractions) for p in one_form_per_table(paths, report)]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return {}
    chosen = choose_readings(pd.concat(frames, ignore_index=True), readprj_priority, report,
                             choice)
    grades = chosen[list(grades_lib.TASKS)].to_numpy(np.int32)
    return {(s, v, side): Reading(grades=g, readprj=r, source=src, barcode=b)
            for s, v, side, r, src, b, g in zip(
                chosen["subject_id"], chosen["visit"], chosen["side"], chosen["readprj"],
                chosen["source"], chosen["barcode"], grades)}
