"""Site data path: read DICOM, preprocess, join labels, group and split by patient."""

from client.dicom.cohort import Cohort, load_cohort, split_patients
from client.dicom.errors import DicomReadError, SiteDataError
from client.dicom.preprocess import Preprocessing
from client.dicom.reader import read_pixels

__all__ = [
    "Cohort",
    "DicomReadError",
    "Preprocessing",
    "SiteDataError",
    "load_cohort",
    "read_pixels",
    "split_patients",
]
