"""The key service's key store: files and permissions, wrapping, rotation and rewrap, blind indexes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from compliance.fields import FieldCipher, FieldDecryptError
from compliance.keystore import (
    KEY_SIZE,
    KeyStore,
    KeyStoreError,
    KeyStorePermissionError,
    UnwrapError,
    read_token_file,
    wrapped_version,
)


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


@pytest.fixture
def store(keydir: Path) -> KeyStore:
    return KeyStore.create(keydir)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_create_lays_out_private_files(store: KeyStore, keydir: Path) -> None:
    assert _mode(keydir) == 0o700
    assert sorted(p.name for p in keydir.iterdir()) == ["blind-index.key", "current", "kek-v1.key"]
    for path in keydir.iterdir():
        assert _mode(path) == 0o600, path
    assert len((keydir / "kek-v1.key").read_bytes()) == KEY_SIZE
    assert (keydir / "current").read_text() == "1\n"
    assert store.status().versions == (1,)
    assert store.status().current == 1


def test_create_refuses_non_empty_directory(store: KeyStore, keydir: Path) -> None:
    with pytest.raises(KeyStoreError, match="not empty"):
        KeyStore.create(keydir)


def test_world_readable_key_file_refused_naming_file_and_mode(store: KeyStore, keydir: Path) -> None:
    kek = keydir / "kek-v1.key"
    os.chmod(kek, 0o644)
    with pytest.raises(KeyStorePermissionError) as info:
        KeyStore.open(keydir)
    assert str(kek) in str(info.value)
    assert "0644" in str(info.value)


def test_group_readable_blind_index_key_refused(store: KeyStore, keydir: Path) -> None:
    os.chmod(keydir / "blind-index.key", 0o640)
    with pytest.raises(KeyStorePermissionError, match=r"blind-index\.key has mode 0640"):
        KeyStore.open(keydir)


def test_open_directory_refused(store: KeyStore, keydir: Path) -> None:
    os.chmod(keydir, 0o755)
    with pytest.raises(KeyStorePermissionError, match="mode 0755"):
        KeyStore.open(keydir)


def test_symlinked_key_file_refused(store: KeyStore, keydir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.key"
    outside.write_bytes(os.urandom(KEY_SIZE))
    os.chmod(outside, 0o600)
    (keydir / "kek-v2.key").symlink_to(outside)
    with pytest.raises(KeyStorePermissionError, match="symlinks are refused"):
        KeyStore.open(keydir)


def test_truncated_key_file_refused(store: KeyStore, keydir: Path) -> None:
    (keydir / "kek-v1.key").write_bytes(b"short")
    with pytest.raises(KeyStoreError, match="exactly 32"):
        KeyStore.open(keydir)


def test_current_must_name_an_existing_version(store: KeyStore, keydir: Path) -> None:
    (keydir / "current").write_text("7\n")
    with pytest.raises(KeyStoreError, match="existing KEK version"):
        KeyStore.open(keydir)


def test_wrap_unwrap_round_trip_and_reopen(store: KeyStore, keydir: Path) -> None:
    plain, wrapped = store.generate_data_key("patient.phone")
    assert len(plain) == KEY_SIZE
    assert plain not in wrapped
    assert store.unwrap(wrapped, "patient.phone") == plain
    assert KeyStore.open(keydir).unwrap(wrapped, "patient.phone") == plain


def test_wrong_purpose_fails(store: KeyStore) -> None:
    _plain, wrapped = store.generate_data_key("patient.phone")
    with pytest.raises(UnwrapError, match="wrong purpose"):
        store.unwrap(wrapped, "patient.name")


def test_wrapped_key_from_another_store_fails(store: KeyStore, tmp_path: Path) -> None:
    other = KeyStore.create(tmp_path / "other")
    _plain, wrapped = other.generate_data_key("patient.phone")
    with pytest.raises(UnwrapError):
        store.unwrap(wrapped, "patient.phone")


@pytest.mark.parametrize("position", [0, 5, 20, 64])
def test_altered_wrapped_key_fails(store: KeyStore, position: int) -> None:
    _plain, wrapped = store.generate_data_key("patient.phone")
    altered = bytearray(wrapped)
    altered[position] ^= 0x01
    with pytest.raises(UnwrapError):
        store.unwrap(bytes(altered), "patient.phone")


def test_malformed_wrapped_key_and_purpose_refused(store: KeyStore) -> None:
    with pytest.raises(UnwrapError, match="must be 65 bytes"):
        store.unwrap(b"x" * 10, "patient.phone")
    with pytest.raises(KeyStoreError, match="purpose"):
        store.generate_data_key("bad|purpose")


def test_rotate_adds_version_and_old_kek_is_decrypt_only(store: KeyStore, keydir: Path) -> None:
    old_plain, old_wrapped = store.generate_data_key("notes")
    old_kek = (keydir / "kek-v1.key").read_bytes()
    assert store.rotate() == 2
    assert (keydir / "kek-v1.key").read_bytes() == old_kek
    assert _mode(keydir / "kek-v2.key") == 0o600
    assert (keydir / "current").read_text() == "2\n"
    assert store.status().versions == (1, 2)
    assert store.status().current == 2
    # Old version still unwraps; everything new (generate, rewrap) is wrapped under v2 only.
    assert store.unwrap(old_wrapped, "notes") == old_plain
    _plain, new_wrapped = store.generate_data_key("notes")
    assert wrapped_version(new_wrapped) == 2
    rewrapped = store.rewrap(old_wrapped, "notes")
    assert wrapped_version(rewrapped) == 2
    assert store.unwrap(rewrapped, "notes") == old_plain
    reopened = KeyStore.open(keydir)
    assert reopened.status().current == 2
    assert reopened.unwrap(old_wrapped, "notes") == old_plain
    assert not [p for p in keydir.iterdir() if p.name.endswith(".tmp")]


def test_rotation_and_rewrap_keep_all_data_readable(store: KeyStore) -> None:
    """50 fields under 50 data keys; rotate; rewrap every wrapped key; everything still decrypts."""
    rows: list[tuple[str, bytes, str, str]] = []
    for row in range(50):
        plain, wrapped = store.generate_data_key("patients.phone")
        value = f"1380013{row:04d}"
        token = FieldCipher.single(plain).encrypt(value, table="patients", column="phone", row_id=row)
        rows.append((value, wrapped, token, str(row)))
    store.rotate()
    store.rotate()
    rewrapped_rows = [
        (value, store.rewrap(wrapped, "patients.phone"), token, row) for value, wrapped, token, row in rows
    ]
    assert {wrapped_version(wrapped) for _v, wrapped, _t, _r in rewrapped_rows} == {3}
    for (value, wrapped, token, row_id), (_v, old_wrapped, old_token, _r) in zip(rewrapped_rows, rows, strict=True):
        assert old_token == token  # data was not re-encrypted
        assert wrapped != old_wrapped
        dek = store.unwrap(wrapped, "patients.phone")
        assert FieldCipher.single(dek).decrypt(token, table="patients", column="phone", row_id=row_id) == value


def test_data_key_of_another_row_fails(store: KeyStore) -> None:
    plain_a, _ = store.generate_data_key("patients.phone")
    plain_b, _ = store.generate_data_key("patients.phone")
    token = FieldCipher.single(plain_a).encrypt("13800138000", table="patients", column="phone", row_id=1)
    with pytest.raises(FieldDecryptError):
        FieldCipher.single(plain_b).decrypt(token, table="patients", column="phone", row_id=1)


def test_blind_index_is_keyed_deterministic_and_per_purpose(store: KeyStore, tmp_path: Path) -> None:
    index = store.blind_index("13800138000", "patients.phone")
    assert index == store.blind_index("13800138000", "patients.phone")
    assert len(index) == 64
    assert "13800138000" not in index
    assert index != store.blind_index("13800138001", "patients.phone")
    assert index != store.blind_index("13800138000", "callers.phone")
    assert index != KeyStore.create(tmp_path / "other").blind_index("13800138000", "patients.phone")


def test_no_operation_returns_key_material(store: KeyStore, keydir: Path) -> None:
    keys = [p.read_bytes() for p in keydir.iterdir() if p.name.endswith(".key")]
    plain, wrapped = store.generate_data_key("x")
    outputs = [plain, wrapped, store.rewrap(wrapped, "x"), store.blind_index("v", "x").encode(), repr(store).encode()]
    for key in keys:
        for output in outputs:
            assert key not in output
            assert key.hex().encode() not in output
    assert not [name for name in dir(store) if "kek" in name.lower() and not name.startswith("_")]


def test_open_or_create_initialises_once(keydir: Path) -> None:
    first = KeyStore.open_or_create(keydir)
    _plain, wrapped = first.generate_data_key("p")
    second = KeyStore.open_or_create(keydir)
    assert second.unwrap(wrapped, "p") == first.unwrap(wrapped, "p")


def test_token_file_must_be_private_and_long_enough(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    os.chmod(token, 0o600)
    assert read_token_file(token) == b"s3cret-token-0123456789"
    os.chmod(token, 0o644)
    with pytest.raises(KeyStorePermissionError, match="0644"):
        read_token_file(token)
    os.chmod(token, 0o600)
    token.write_text("short")
    with pytest.raises(KeyStoreError, match="at least"):
        read_token_file(token)
