"""De-identification preflight against the DICOM PS3.15 Basic Application Level
Confidentiality Profile (Annex E, table E.1-1): which identifying attributes a file
still carries, whether pixels have burned-in text, and keyed fingerprints of the
identifying values (for the egress guard) -- never the values themselves.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from pydicom.dataset import Dataset

# Attributes of the basic profile that carry identifying values in practice: names, IDs,
# dates of birth, addresses, phone numbers, institution and staff, free-text comments.
# UIDs and acquisition dates/times are also in the profile but are structural; they are
# handled by hashing (UIDs) and not reported per file.
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
FINGERPRINT_BYTES = 16


@dataclass(frozen=True)
class DeidScan:
    """What one file's header holds: keywords present (non-empty), flags, value fingerprints."""

    phi: tuple[str, ...]
    burned_in: bool
    identity_removed: bool
    fingerprints: tuple[str, ...]


def fingerprint(key: bytes, value: str) -> str:
    """Keyed fingerprint of an identifying value (HMAC-SHA256, hex, truncated)."""
    return hmac.new(key, value.strip().upper().encode("utf-8", "replace"), hashlib.sha256).hexdigest()[
        : 2 * FINGERPRINT_BYTES]


def scan(ds: Dataset, key: bytes) -> DeidScan:
    """Scan the header (nested sequences included) against :data:`PHI_KEYWORDS`."""
    found: set[str] = set()
    prints: set[str] = set()
    for elem in ds.iterall():
        kw = elem.keyword
        if kw not in PHI_KEYWORDS or elem.VR == "SQ":
            if kw in PHI_KEYWORDS and elem.value:
                found.add(kw)
            continue
        values = elem.value if elem.VM > 1 else [elem.value]
        texts = [str(v).strip() for v in values if v is not None and str(v).strip()]
        if texts:
            found.add(kw)
            prints.update(fingerprint(key, t) for t in texts)
    return DeidScan(
        phi=tuple(sorted(found)),
        burned_in=str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES",
        identity_removed=str(ds.get("PatientIdentityRemoved", "")).strip().upper() == "YES",
        fingerprints=tuple(sorted(prints)),
    )
