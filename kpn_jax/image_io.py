"""Reading radiographs into float arrays: PNG, JPEG, 16-bit PNG, TIFF and DICOM.

Every reader returns a :class:`Radiograph` whose ``pixels`` are float32 ``[H, W]`` with
"brighter = more attenuating" (bone bright), whatever the source's photometric
convention: DICOM ``MONOCHROME1`` images are inverted here, so no caller has to know.
Windowing (float -> uint8) is a separate step (:func:`window_limits`, :func:`to_uint8`)
because builders choose the window on the whole radiograph and apply it to the ROI.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
from PIL import Image

from kpn_jax import roi as roi_lib

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# KNEEL's global contrast normalisation of OAI radiographs (process_xray): clip the
# histogram to its 5th..99th percentiles. Also our default for whole radiographs.
DEFAULT_PERCENTILES = (5.0, 99.0)


class ImageReadError(ValueError):
    """A file could not be read as an image; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Radiograph:
    """One grey-level image as floats.

    Attributes:
      pixels: float32 ``[H, W]``, bone bright (MONOCHROME1 already inverted).
      spacing_mm: ``(row, column)`` millimetres per pixel, or None when the file does
        not say (PNG/JPEG, or a DICOM without a spacing tag).
      window: ``(low, high)`` display window in the units of ``pixels`` from the file
        (DICOM WindowCenter/WindowWidth), or None.
      path: where it was read from.
      bit_depth: bits per grey value in the file (8 for PNG/JPEG, 16 for a 16-bit PNG,
        BitsStored for DICOM).
    """

    pixels: np.ndarray
    spacing_mm: tuple[float, float] | None
    window: tuple[float, float] | None
    path: str
    bit_depth: int = 8

    @property
    def shape(self) -> tuple[int, int]:
        return self.pixels.shape


def is_dicom(path: str | os.PathLike) -> bool:
    """True for a DICOM suffix, or a Part-10 file (``DICM`` at byte 128, as OAI's
    suffix-less ``001`` files are)."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix.lower() in RASTER_SUFFIXES:
        return False
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_image(path: str | os.PathLike) -> Radiograph:
    """Reads a DICOM or raster file (chosen by :func:`is_dicom`).

    Raises:
      ImageReadError: naming ``path``, when it is missing, truncated or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    return read_dicom(path) if is_dicom(path) else read_raster(path)


def read_raster(path: str | os.PathLike) -> Radiograph:
    """PNG (8- or 16-bit), JPEG, TIFF or BMP -> :class:`Radiograph` (no spacing).

    Colour images are converted to grey (ITU-R 601 luma, PIL's ``convert('L')``).
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
                pixels = np.asarray(img)
                bit_depth = {"L": 8, "I": 32, "F": 32}.get(img.mode, 16)
            elif img.mode in ("LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "1"):
                pixels = np.asarray(img.convert("L"))
                bit_depth = 8
            else:
                raise ImageReadError(f"{path}: unsupported image mode {img.mode!r}")
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bad/truncated files
        raise ImageReadError(f"{path}: cannot read image ({e})") from e
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim != 2 or min(pixels.shape) == 0:
        raise ImageReadError(f"{path}: expected a 2-D grey image, got shape {pixels.shape}")
    return Radiograph(pixels=pixels, spacing_mm=None, window=None, path=str(path),
                      bit_depth=bit_depth)


def dicom_pixel_spacing(ds) -> tuple[float, float] | None:
    """``(row, column)`` mm per pixel from ImagerPixelSpacing, else PixelSpacing.

    ImagerPixelSpacing (at the detector) comes first because that is what KNEEL read
    for the OAI radiographs whose BoneFinder points we convert; for projection
    radiographs without a calibration object the two tags agree anyway.
    """
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        value = ds.get(keyword)
        if value is None:
            continue
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            value = [value]  # one number (DSfloat) or a backslash-free string
        try:
            values = [float(v) for v in value]
        except (TypeError, ValueError):
            continue
        if len(values) == 1:
            values = values * 2
        if len(values) >= 2 and values[0] > 0 and values[1] > 0:
            return float(values[0]), float(values[1])
    return None


def _first_float(value) -> float | None:
    """First number of a (possibly multi-valued) DICOM value, or None."""
    if value is None:
        return None
    if hasattr(value, "__iter__") and not isinstance(value, (str, bytes)):
        value = list(value)
        if not value:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclasses.dataclass(frozen=True)
class DicomHeader:
    """What a DICOM says about its image without decoding the pixels."""

    rows: int
    columns: int
    spacing_mm: tuple[float, float] | None
    path: str
    accession_number: str = ""   # OAI: the film's barcode
    laterality: str = ""         # ImageLaterality (else Laterality): 'R', 'L', 'B' or ''
    patient_id: str = ""         # PatientID


def _dicom_file(path: Path, member: str | None):
    """``path`` itself, or the bytes of ``member`` of the tar archive ``path`` (the NIMH Data
    Archive ships each OAI series as a ``.tar.gz``)."""
    if member is None:
        return path
    import io
    import tarfile

    with tarfile.open(path) as archive:
        extracted = archive.extractfile(member)
        if extracted is None:
            raise KeyError(f"{member} is not a file in the archive")
        return io.BytesIO(extracted.read())


def dicom_name(path: str | os.PathLike, member: str | None = None) -> str:
    """How messages name a DICOM: its path, or ``archive:member``."""
    return f"{path}:{member}" if member else str(path)


def read_dicom_header(path: str | os.PathLike, member: str | None = None) -> DicomHeader:
    """Reads a DICOM's header only (cheap; used to plan a build before decoding pixels).

    Args:
      member: the DICOM's name inside ``path`` when ``path`` is a tar archive.

    Raises:
      ImageReadError: naming ``path`` when it is not a DICOM image.
    """
    import pydicom

    name = dicom_name(path, member)
    try:
        ds = pydicom.dcmread(_dicom_file(Path(path), member), stop_before_pixels=True)
        rows, columns = int(ds.Rows), int(ds.Columns)
    except Exception as e:  # pydicom raises many types for damaged files; all mean "unreadable"
        raise ImageReadError(f"{name}: cannot read DICOM header ({type(e).__name__}: {e})") from e
    if rows <= 0 or columns <= 0:
        raise ImageReadError(f"{name}: DICOM says the image is {rows}x{columns}")
    return DicomHeader(rows=rows, columns=columns, spacing_mm=dicom_pixel_spacing(ds),
                       path=name, accession_number=str(ds.get("AccessionNumber", "")).strip(),
                       laterality=str(ds.get("ImageLaterality", "") or ds.get("Laterality", "")
                                      ).strip().upper(),
                       patient_id=str(ds.get("PatientID", "") or "").strip())


def read_dicom(path: str | os.PathLike, member: str | None = None) -> Radiograph:
    """One-frame grey DICOM -> :class:`Radiograph`.

    Applies the modality LUT (RescaleSlope/Intercept) and, when the file has one, its VOI
    LUT sequence (the first; the window is then the LUT's output range), inverts MONOCHROME1 images as
    ``min + max - x`` (so values stay in the image's own range) and maps the file's
    WindowCenter/WindowWidth through the same inversion.

    Args:
      member: the DICOM's name inside ``path`` when ``path`` is a tar archive.

    Raises:
      ImageReadError: naming ``path`` for non-DICOM, truncated or multi-frame files.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut

    archive, path = Path(path), dicom_name(path, member)
    try:
        ds = pydicom.dcmread(_dicom_file(archive, member))
        raw = ds.pixel_array
        pixels = np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
    except Exception as e:  # pydicom raises many types for damaged files; all mean "unreadable"
        raise ImageReadError(f"{path}: cannot read DICOM ({type(e).__name__}: {e})") from e
    if pixels.ndim != 2 or min(pixels.shape) == 0:
        raise ImageReadError(f"{path}: expected one grey frame, got pixel array shape "
                             f"{pixels.shape}")
    if not np.all(np.isfinite(pixels)):
        raise ImageReadError(f"{path}: pixel data has NaN or inf values")
    center = _first_float(ds.get("WindowCenter"))
    width = _first_float(ds.get("WindowWidth"))
    window = (center - width / 2.0, center + width / 2.0) if center is not None and width else None
    if ds.get("VOILUTSequence"):
        # The file's own display curve (often non-linear) wins over a linear window: the
        # pixels become its output and the window its output range.
        from pydicom.pixels import apply_voi_lut

        try:
            # A LUT is indexed by whole stored values (after the modality LUT).
            pixels = np.asarray(apply_voi_lut(np.rint(pixels).astype(np.int32), ds, index=0,
                                              prefer_lut=True), np.float32)
            output_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        except Exception as e:  # a malformed LUT: unreadable, not silently ignored
            raise ImageReadError(f"{path}: cannot apply its VOI LUT sequence "
                                 f"({type(e).__name__}: {e})") from e
        window = (0.0, float(2 ** output_bits - 1))
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "MONOCHROME1":
        pivot = float(pixels.min()) + float(pixels.max())
        pixels = pivot - pixels
        if window is not None:
            window = (pivot - window[1], pivot - window[0])
    elif photometric != "MONOCHROME2":
        raise ImageReadError(f"{path}: PhotometricInterpretation {photometric!r} is not a grey "
                             "radiograph (MONOCHROME1/2)")
    return Radiograph(pixels=pixels, spacing_mm=dicom_pixel_spacing(ds), window=window,
                      path=str(path), bit_depth=int(ds.get("BitsStored", 16)))


def window_limits(pixels: np.ndarray, percentiles=DEFAULT_PERCENTILES) -> tuple[float, float]:
    """``(low, high)`` = the given percentiles of ``pixels``; ``high > low`` always."""
    low, high = (float(v) for v in np.percentile(np.asarray(pixels, np.float32), percentiles))
    return low, max(high, low + 1.0)


def to_uint8(pixels: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Linear window ``[low, high] -> [0, 255]``, clipped, as uint8 ``[H, W]``."""
    return roi_lib.to_uint8(pixels, low=window[0], high=window[1])


def centre_minus_border(image: np.ndarray, border_fraction: float = 0.125) -> float:
    """Mean of the central half minus mean of the outer frame.

    On a knee crop the joint (bright bone) fills the centre and soft tissue the
    border, so the value is positive; an image with inverted grey levels gives a
    negative value. On the kneeKL224 crops this splits the set cleanly (checked by eye
    on the images nearest to zero).

    Args:
      image: ``[H, W]`` or ``[H, W, 1]``.
      border_fraction: width of the frame as a fraction of each side.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:
        image = image[..., 0]
    height, width = image.shape
    centre = image[height // 4: height - height // 4, width // 4: width - width // 4]
    by, bx = max(1, int(height * border_fraction)), max(1, int(width * border_fraction))
    frame = np.ones(image.shape, dtype=bool)
    frame[by:height - by, bx:width - bx] = False
    return float(centre.mean() - image[frame].mean())


def resize_whole(image: np.ndarray, keypoints: np.ndarray | None, out_size: int,
                 fill: float = 0.0):
    """The whole image, padded to a square around its centre and resized to ``out_size``.

    Used when an image is already a knee ROI. An image of the right size comes back
    unchanged (no resampling).

    Returns:
      ``(image float32 [out_size, out_size], keypoints [N, 2] or None)``.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:
        image = image[..., 0]
    height, width = image.shape
    if height == width == out_size:
        return image, None if keypoints is None else np.asarray(keypoints, np.float32)
    center = ((width - 1) / 2.0, (height - 1) / 2.0)
    return roi_lib.crop_and_resize(image, keypoints, center, float(max(height, width)), out_size,
                                   fill=fill)
