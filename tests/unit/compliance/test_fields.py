"""Field encryption: AES-256-GCM bound to table, column, row and key version; blind index of phone numbers."""

from __future__ import annotations

import base64
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from compliance.fields import (
    BlindIndex,
    FieldCipher,
    FieldCipherError,
    FieldDecryptError,
    associated_data,
    normalise_phone,
    token_key_version,
)

KEY = bytes(range(32))
ROW_IDS = st.one_of(st.integers(min_value=0, max_value=2**63), st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True))
NAMES = st.from_regex(r"[a-z_][a-z0-9_]{0,20}", fullmatch=True)


@given(value=st.text(max_size=2000), table=NAMES, column=NAMES, row_id=ROW_IDS)
def test_round_trip(value: str, table: str, column: str, row_id: str | int) -> None:
    cipher = FieldCipher.single(KEY)
    token = cipher.encrypt(value, table=table, column=column, row_id=row_id)
    assert cipher.decrypt(token, table=table, column=column, row_id=row_id) == value


@given(value=st.binary(max_size=2000))
def test_bytes_round_trip_and_token_is_base64url(value: bytes) -> None:
    cipher = FieldCipher.single(KEY, version=7)
    token = cipher.encrypt_bytes(value, table="calls", column="transcript", row_id="c-1")
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert raw[0] == 7
    assert len(raw) == 1 + 12 + len(value) + 16
    assert token_key_version(token) == 7
    assert cipher.decrypt_bytes(token, table="calls", column="transcript", row_id="c-1") == value


def test_encryption_is_randomised() -> None:
    cipher = FieldCipher.single(KEY)
    tokens = {cipher.encrypt("张三", table="patients", column="name", row_id=1) for _ in range(20)}
    assert len(tokens) == 20


@pytest.mark.parametrize(
    ("table", "column", "row_id"),
    [("patients", "phone", 2), ("patients", "name", 1), ("callers", "phone", 1)],
    ids=["other-row", "other-column", "other-table"],
)
def test_moved_ciphertext_fails_naming_place_not_value(table: str, column: str, row_id: int) -> None:
    cipher = FieldCipher.single(KEY)
    token = cipher.encrypt("13800138000", table="patients", column="phone", row_id=1)
    with pytest.raises(FieldDecryptError) as info:
        cipher.decrypt(token, table=table, column=column, row_id=row_id)
    message = str(info.value)
    assert f"{table}.{column}" in message
    assert f"row {row_id}" in message
    assert "13800138000" not in message
    assert info.value.table == table
    assert info.value.row_id == str(row_id)


@given(value=st.text(min_size=1, max_size=100), row=st.integers(0, 10_000), other=st.integers(0, 10_000))
def test_moved_ciphertext_never_decrypts(value: str, row: int, other: int) -> None:
    cipher = FieldCipher.single(KEY)
    token = cipher.encrypt(value, table="patients", column="notes", row_id=row)
    if other != row:
        with pytest.raises(FieldDecryptError):
            cipher.decrypt(token, table="patients", column="notes", row_id=other)


def test_wrong_key_fails() -> None:
    token = FieldCipher.single(KEY).encrypt("A123456789", table="patients", column="id_number", row_id=5)
    with pytest.raises(FieldDecryptError, match="authentication failed"):
        FieldCipher.single(os.urandom(32)).decrypt(token, table="patients", column="id_number", row_id=5)


def test_version_byte_is_bound_into_the_associated_data() -> None:
    """Changing the version byte to another loaded key version does not make a token decrypt."""
    cipher = FieldCipher({1: KEY, 2: KEY}, current=1)
    token = cipher.encrypt("x", table="patients", column="name", row_id=1)
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[0] = 2
    forged = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    with pytest.raises(FieldDecryptError):
        cipher.decrypt(forged, table="patients", column="name", row_id=1)


def test_several_data_key_versions() -> None:
    old = FieldCipher.single(KEY, version=1)
    token = old.encrypt("old", table="t", column="c", row_id=1)
    both = FieldCipher({1: KEY, 2: os.urandom(32)}, current=2)
    assert both.decrypt(token, table="t", column="c", row_id=1) == "old"
    new_token = both.encrypt("new", table="t", column="c", row_id=1)
    assert token_key_version(new_token) == 2
    with pytest.raises(FieldDecryptError, match="version 2 is not loaded"):
        old.decrypt(new_token, table="t", column="c", row_id=1)


@pytest.mark.parametrize("token", ["", "!!!", "AAAA", "é"])
def test_malformed_token_fails_clearly(token: str) -> None:
    with pytest.raises(FieldDecryptError, match=r"cannot decrypt t\.c of row 1"):
        FieldCipher.single(KEY).decrypt(token, table="t", column="c", row_id=1)


def test_associated_data_is_canonical_and_refuses_ambiguity() -> None:
    assert associated_data("patients", "phone", 42, 3) == b"patients|phone|42|3"
    cases: list[tuple[str, str, str | int]] = [
        ("pa|tients", "phone", 1),
        ("patients", "Phone", 1),
        ("patients", "phone", "4|2"),
    ]
    for table, column, row_id in cases:
        with pytest.raises(FieldCipherError):
            associated_data(table, column, row_id, 1)
    with pytest.raises(FieldCipherError):
        associated_data("t", "c", 1, 256)


def test_bad_keys_refused() -> None:
    with pytest.raises(FieldCipherError, match="32 bytes"):
        FieldCipher.single(b"short")
    with pytest.raises(FieldCipherError, match="current key version"):
        FieldCipher({1: KEY}, current=2)
    assert "0001020304" not in repr(FieldCipher.single(KEY))


@pytest.mark.parametrize(
    "number", ["13800138000", "138-0013-8000", "+86 138 0013 8000", "0086 13800138000", "(138) 0013.8000"]
)
def test_normalise_phone(number: str) -> None:
    assert normalise_phone(number) == "13800138000"


def test_normalise_phone_refuses_non_numbers() -> None:
    with pytest.raises(FieldCipherError):
        normalise_phone("call me")


class _Indexer:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def blind_index(self, value: str, purpose: str) -> str:
        self.calls.append((value, purpose))
        return f"idx:{purpose}:{len(value)}"


async def test_blind_index_normalises_then_asks_the_indexer() -> None:
    indexer = _Indexer()
    index = BlindIndex(indexer, "patients.phone")
    assert await index.index("+86 138-0013-8000") == await index.index("13800138000")
    assert indexer.calls == [("13800138000", "patients.phone")] * 2
