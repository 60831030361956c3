"""Site data path: read DICOM, preprocess, join labels, group and split by patient."""

from client.dicom.cohort import Cohort, load_cohort, read_labels, split_patients
from client.dicom.errors import CorruptFileError, DicomReadError, NotAnImageError, SiteDataError, UnsupportedImageError
from client.dicom.preprocess import Preprocessing
from client.dicom.reader import read_pixels

__all__ = [
    "Cohort",
    "CorruptFileError",
    "NotAnImageError",
    "UnsupportedImageError",
    "DicomReadError",
    "Preprocessing",
    "SiteDataError",
    "load_cohort",
    "read_labels",
    "read_pixels",
    "split_patients",
]
