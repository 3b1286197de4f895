"""his: the patient registry (encrypted identifiers, blind-index lookup) and HIS integration (HL7 v2 / MLLP)."""

from his.directory import PatientServices, RegistryPatientDirectory, open_patient_directory
from his.registry import (
    Authorize,
    PatientInput,
    PatientInputError,
    PatientRecord,
    PatientRegistry,
    RegistryError,
    check_patient_id,
)
from his.tables import PatientNotFound, PatientRef, PatientStore

__all__ = [
    "Authorize",
    "PatientInput",
    "PatientInputError",
    "PatientNotFound",
    "PatientRecord",
    "PatientRef",
    "PatientRegistry",
    "PatientServices",
    "PatientStore",
    "RegistryError",
    "RegistryPatientDirectory",
    "check_patient_id",
    "open_patient_directory",
]
