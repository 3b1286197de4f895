"""One patient-id rule (``ground.ids.is_patient_id``) behind both checks: the registry's (UUID only) and the access
policy's (UUID or opaque hex), so the two can't drift apart again."""

from __future__ import annotations

import pytest

from compliance.access import AccessError
from compliance.access import check_patient_id as access_check
from ground.ids import is_patient_id
from his.registry import PatientInputError
from his.registry import check_patient_id as registry_check

UUID = "5d3c1f2e-8a7b-4c6d-9e0f-1a2b3c4d5e6f"
HEX = "ab" * 16
NOT_IDS = ["13800138000", "MRN-2024-000417", "王秀英", UUID.upper(), UUID + "\n", "ab" * 15, "ab" * 65, "", "a" * 33]


def test_a_uuid_is_a_patient_id_everywhere() -> None:
    assert is_patient_id(UUID, allow="uuid")
    assert is_patient_id(UUID, allow="uuid_or_hex")
    assert registry_check(UUID) == access_check(UUID) == UUID


def test_hex_is_allowed_only_where_asked() -> None:
    assert not is_patient_id(HEX, allow="uuid")
    assert is_patient_id(HEX, allow="uuid_or_hex")
    assert access_check(HEX) == HEX
    with pytest.raises(PatientInputError):
        registry_check(HEX)


@pytest.mark.parametrize("value", NOT_IDS)
def test_names_phones_record_numbers_and_near_misses_are_refused_by_both(value: str) -> None:
    assert not is_patient_id(value, allow="uuid_or_hex")
    with pytest.raises(AccessError) as refused:
        access_check(value)
    assert value.strip() not in str(refused.value) or not value.strip()
    with pytest.raises(PatientInputError) as refused_too:
        registry_check(value)
    assert value.strip() not in str(refused_too.value) or not value.strip()
