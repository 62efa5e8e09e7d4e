"""Writes test DICOMs with pydicom: one 16-bit (12 bits stored) grey frame."""

import numpy as np


def write_dicom(path, pixels, photometric="MONOCHROME2", spacing_tag="ImagerPixelSpacing",
                spacing=0.5, window=None, accession=None, modality="DX", voi_lut=None,
                laterality=None, patient_id=None):
    """``pixels`` uint16 ``[H, W]`` as stored (no inversion here) to ``path``; ``voi_lut``:
    uint16 ``[4096]`` output per stored value (a VOI LUT sequence item, 12-bit output);
    ``laterality``: ImageLaterality ('R', 'L' or 'B'); ``patient_id``: PatientID."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    setattr(ds, spacing_tag, [spacing, spacing])
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut is not None:
        item = Dataset()
        item.LUTDescriptor = [len(voi_lut), 0, 12]
        item.LUTData = np.asarray(voi_lut, "<u2").tobytes()
        ds.VOILUTSequence = [item]
    if laterality is not None:
        ds.ImageLaterality = laterality
    if patient_id is not None:
        ds.PatientID = patient_id
    if accession is not None:
        ds.AccessionNumber = accession
    ds.PixelData = np.asarray(pixels, np.uint16).astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
