"""De-identification preflight against the DICOM PS3.15 Basic Application Level
Confidentiality Profile (Annex E, table E.1-1): which identifying attributes a file
still carries, whether pixels have burned-in text, and keyed fingerprints of the
identifying values (for the egress guard) -- never the values themselves.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from client.dicom import header
from client.dicom.reader import raw_bytes
from privacy.egress import fingerprint
from privacy.identifier_forms import header_forms

# Attributes of the basic profile that carry identifying values in practice: names, IDs,
# dates of birth, addresses, phone numbers, institution and staff, free-text comments.
# UIDs and acquisition dates/times are also in the profile but are structural; they are
# handled by hashing (UIDs) and not reported per file. Every DA/DT/TM value (study, series,
# acquisition, content dates and times...) is fingerprinted all the same, in the forms of
# ``privacy.identifier_forms`` (a date as YYYYMMDD, digit strings without leading zeros): those
# of the top-level dataset (sequence items, e.g. per-frame functional groups, repeat them and
# are left unparsed unless they hold a profile tag).
PHI_KEYWORDS = frozenset({
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName", "PatientBirthDate",
    "PatientBirthTime", "PatientAddress", "PatientTelephoneNumbers", "PatientTelecomInformation",
    "MedicalRecordLocator", "MilitaryRank", "BranchOfService", "EthnicGroup", "Occupation",
    "PatientReligiousPreference", "AdditionalPatientHistory", "PatientComments", "PatientInsurancePlanCodeSequence",
    "ResponsiblePerson", "ResponsibleOrganization", "CountryOfResidence", "RegionOfResidence",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord",
    "OperatorsName", "RequestingPhysician", "ScheduledPerformingPhysicianName",
    "AccessionNumber", "StudyID", "AdmissionID", "PerformedProcedureStepID", "RequestedProcedureID",
    "DeviceSerialNumber", "ImageComments", "StudyComments", "InterpretationText",
    "RequestedProcedureComments", "ImagingServiceRequestComments", "ContentCreatorName",
    "PersonName", "VerifyingObserverName", "ReviewerName", "TextComments",
})
PHI_TAGS = {Tag(kw): kw for kw in PHI_KEYWORDS}
# Any of those tags as encoded in a file (little or big endian): a sequence whose encoded
# bytes hold none of them has no such attribute in any item at any depth, and is not parsed.
DATE_TIME_VRS = ("DA", "DT", "TM")
_ENCODED_PHI_TAG = re.compile(b"|".join(
    re.escape(struct.pack(f"{order}HH", tag >> 16, tag & 0xFFFF)) for tag in PHI_TAGS for order in "<>"))


@dataclass(frozen=True)
class DeidScan:
    """What one file's header holds: keywords present (non-empty), flags, value fingerprints."""

    phi: tuple[str, ...]
    burned_in: bool
    identity_removed: bool
    fingerprints: tuple[str, ...]


def scan(ds: Dataset, key: bytes) -> DeidScan:
    """Scan the header (nested sequences included) against :data:`PHI_KEYWORDS`."""
    found: set[str] = set()
    prints: set[str] = set()
    _scan(ds, key, found, prints)
    return DeidScan(
        phi=tuple(sorted(found)),
        burned_in=header.text(ds, "BurnedInAnnotation").upper() == "YES",
        identity_removed=header.text(ds, "PatientIdentityRemoved").upper() == "YES",
        fingerprints=tuple(sorted(prints)),
    )


def _scan(ds: Dataset, key: bytes, found: set[str], prints: set[str], top: bool = True) -> None:
    # Only the profile's tags and sequences are converted from their raw bytes: converting
    # every element (``iterall``) costs more than decoding the pixels.
    for tag in ds.keys():
        if tag in PHI_TAGS:
            elem = ds[tag]
            if elem.VR == "SQ":
                if elem.value:
                    found.add(PHI_TAGS[tag])
                continue
            texts = _texts(elem)
            if texts:
                found.add(PHI_TAGS[tag])
                prints.update(fingerprint(key, f) for t in texts for f in header_forms(t, elem.VR))
        elif top and _SEQUENCE_VR[tag] in DATE_TIME_VRS:
            elem = ds[tag]
            prints.update(fingerprint(key, f) for t in _texts(elem) for f in header_forms(t, elem.VR))
        elif (_SEQUENCE_VR[tag] in ("SQ", None) and tag.group != 0x7FE0 and _is_sequence(ds, tag)
              and _may_hold_phi(ds, tag)):
            for item in ds[tag].value:
                _scan(item, key, found, prints, top=False)


def _texts(elem: DataElement) -> list[str]:
    values = elem.value if elem.VM > 1 else [elem.value]
    return [str(v).strip() for v in values if v is not None and str(v).strip()]


class _DictionaryVR(dict[int, str | None]):
    """tag -> VR from the DICOM dictionary (``None``: private or unknown), memoized."""

    def __missing__(self, tag: int) -> str | None:
        try:
            vr: str | None = dictionary_VR(tag)
        except KeyError:
            vr = None
        self[tag] = vr
        return vr


_SEQUENCE_VR = _DictionaryVR()


def _may_hold_phi(ds: Dataset, tag: BaseTag) -> bool:
    """False when the sequence is still encoded and its bytes contain no profile tag
    (enhanced multi-frame objects carry thousands of items that would otherwise be parsed)."""
    data = raw_bytes(ds, ds.get_item(tag, keep_deferred=True))
    return data is None or _ENCODED_PHI_TAG.search(data) is not None


def _is_sequence(ds: Dataset, tag: BaseTag) -> bool:
    vr = ds.get_item(tag, keep_deferred=True).VR  # raw element (a deferred one stays unread): VR of explicit VR files
    if vr is None:  # implicit VR: the dictionary's VR (private tags: unknown, not followed)
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return False
    return vr == "SQ"
