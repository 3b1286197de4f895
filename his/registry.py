"""The patient registry: identifiers encrypted field by field, found through blind indexes, every access audited.

Each identifying value (name, phone, national id, record number, birth year) is stored as an AES-256-GCM token
(``compliance.fields.FieldCipher``) under the ``patients`` data key that the row names, with associated data
``patients|<column>|<row id>|<key version>``: a token copied into another row or column fails to decrypt.
Values are padded to a multiple of 32 bytes before encryption so a token's length does not give away the length
of a name. Lookups go through keyed HMAC blind indexes computed by the key service (the application never holds
the HMAC key): the normalised phone number (``138-0013-8000`` and ``+86 138 0013 8000`` index alike), the record
number, and the patient id itself (``blind_id``, how audit entries name the patient).

Access. ``authorize(accessor, action, patient_id)`` (the access-control policy, optional here) is awaited before
any decryption and raises to deny; the policy audits its own denials, so the registry does not add a second
entry for them. Every successful or failed read and every change is appended to the audit log (when one is
given) with the patient's blind id, never an identifier. A read returns its data only after its audit entry is
stored; a change is audited once it is stored, and if that append fails the caller gets a ``RegistryError`` (the
change stays, the failure is logged as ``patient.audit_failed``). Accessor, role and reason are checked against
the audit rules before anything is read, so a reason the log would refuse costs no decryption.

Keys. Each operation unwraps the one data key it needs through :class:`compliance.data_keys.DataKeyRing` and
forgets it when the operation ends (see that module for why nothing is cached).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Final, Literal

from compliance.audit import AuditEntry, AuditError, AuditLog, AuditOutcome, JsonValue
from compliance.data_keys import DataKeyRing
from compliance.fields import BlindIndexer, FieldCipher, FieldCipherError, normalise_phone
from ground.errors import MedhotlineError
from ground.ids import is_patient_id
from ground.logs import get_logger
from his.tables import TABLE, PatientRef, PatientStore, RecordNumberTaken, StoredPatient

log = get_logger("medhotline.his.registry")

PURPOSE: Final = "patients"  # the data key purpose of the patients table
PHONE_INDEX: Final = "patients.phone"
RECORD_INDEX: Final = "patients.record_number"
BLIND_ID_INDEX: Final = "patients.blind_id"
PAD_BLOCK: Final = 32
MIN_BIRTH_YEAR: Final = 1880
_UPSERT_ATTEMPTS: Final = 3
_NAME_MAX: Final = 128
_NATIONAL_ID: Final = re.compile(r"^[0-9A-Z]{6,32}$")
_RECORD_NUMBER: Final = re.compile(r"^[0-9A-Z][0-9A-Z-]{0,31}$")
_DEPARTMENT: Final = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")

AccessAction = Literal["read", "change", "create"]
# The access policy's check: ``await authorize(accessor, action, patient_id)`` returns to allow, raises to deny.
# "read" and "change" name a registered patient; "create" names the id a new registration is about to get (not
# yet stored). Lookups by phone or record number are not passed through it: they return opaque ids only, no
# patient is known before them, and they are audited.
Authorize = Callable[[str, AccessAction, str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Access:
    """Who is accessing (account or system id), in which role, and why: what each audit entry records."""

    accessor: str
    role: str
    reason: str


class RegistryError(MedhotlineError):
    """A registry operation failed; the message names the patient by id and the field, never a value."""


class PatientInputError(RegistryError):
    """A value given for a patient is not acceptable; the message names the field and the rule, not the value."""


class UnknownPatient(RegistryError):
    """No patient has this record number; ``role`` says which one of an operation (``survivor``, ``merged``)."""

    def __init__(self, message: str, role: str) -> None:
        super().__init__(message)
        self.role = role


@dataclass(frozen=True, slots=True)
class MergeResult:
    """A merge (ADT^A40) as stored: both ids and blind ids; ``changed`` False when it had been done already."""

    survivor_id: str
    survivor_blind_id: str
    merged_id: str
    merged_blind_id: str
    changed: bool


@dataclass(frozen=True)
class PatientInput:
    """What a registration or an HIS update says about a patient. ``None`` leaves a stored value as it is.

    ``repr`` shows no identifying value, so a ``PatientInput`` in a traceback or a log line leaks nothing.
    """

    name: str = field(repr=False)
    phone: str = field(repr=False)
    national_id: str | None = field(default=None, repr=False)
    record_number: str | None = field(default=None, repr=False)
    birth_year: int | None = field(default=None, repr=False)
    department: str | None = None

    def checked(self, now: datetime) -> PatientInput:
        """Validated and normalised (phone as digits, ids upper-case); PatientInputError names the field."""
        if not isinstance(self.name, str):
            raise PatientInputError("patient name must be text")
        name = " ".join(self.name.split())
        if not name or len(name) > _NAME_MAX:
            raise PatientInputError(f"patient name must be 1-{_NAME_MAX} characters")
        if any(not ch.isprintable() for ch in name):
            raise PatientInputError("patient name contains control characters")
        try:
            phone = normalise_phone(self.phone) if isinstance(self.phone, str) else ""
        except FieldCipherError:
            phone = ""
        if not phone:
            raise PatientInputError("patient phone must be 3-20 digits, optionally with a leading + and separators")
        national_id = _optional_code(self.national_id, _NATIONAL_ID, "national id", "6-32 letters or digits")
        record_number = normalise_record_number(self.record_number) if self.record_number is not None else None
        birth_year = self.birth_year
        if birth_year is not None and (
            isinstance(birth_year, bool)
            or not isinstance(birth_year, int)
            or not MIN_BIRTH_YEAR <= birth_year <= now.year
        ):
            raise PatientInputError(f"patient birth year must be a year from {MIN_BIRTH_YEAR} to {now.year}")
        department = self.department
        if department is not None and (not isinstance(department, str) or not _DEPARTMENT.match(department)):
            raise PatientInputError("department must be a-z 0-9 _ - starting with a letter (up to 64)")
        return PatientInput(name, phone, national_id, record_number, birth_year, department)


def _optional_code(value: str | None, pattern: re.Pattern[str], what: str, rule: str) -> str | None:
    if value is None:
        return None
    code = value.strip().upper() if isinstance(value, str) else ""
    if not pattern.match(code):
        raise PatientInputError(f"patient {what} must be {rule}")
    return code


def normalise_record_number(value: str) -> str:
    """Upper-case, surrounding space removed: the form that is indexed and stored."""
    code = _optional_code(value, _RECORD_NUMBER, "record number", "1-32 letters, digits or '-'")
    assert code is not None
    return code


@dataclass(frozen=True)
class PatientRecord:
    """A decrypted patient record. ``repr`` shows the id only: print fields deliberately, never the object."""

    id: str
    name: str = field(repr=False)
    phone: str = field(repr=False)
    national_id: str | None = field(repr=False)
    record_number: str | None = field(repr=False)
    birth_year: int | None = field(repr=False)
    department: str | None
    created_at: datetime
    updated_at: datetime


def check_patient_id(patient_id: str) -> str:
    """A patient id is a lower-case UUID; anything else is refused without echoing it (it may be a number)."""
    if not is_patient_id(patient_id, allow="uuid"):
        raise PatientInputError("a patient id is a UUID such as 0b7f5c7e-1d2a-4c1e-9a51-2f0d3c4b5a69")
    return patient_id


def _pad(value: str) -> bytes:
    """ISO/IEC 7816-4 padding to a multiple of PAD_BLOCK bytes: 0x80 then zeros."""
    raw = value.encode("utf-8") + b"\x80"
    return raw + bytes(-len(raw) % PAD_BLOCK)


def _unpad(raw: bytes, column: str, row_id: str) -> str:
    end = raw.rstrip(b"\x00")
    if not end.endswith(b"\x80"):
        raise RegistryError(f"{TABLE}.{column} of row {row_id}: decrypted value has invalid padding")
    try:
        return end[:-1].decode("utf-8")
    except UnicodeDecodeError:
        raise RegistryError(f"{TABLE}.{column} of row {row_id}: decrypted value is not UTF-8") from None


def _encrypt(cipher: FieldCipher, column: str, row_id: str, value: str | None) -> str | None:
    if value is None:
        return None
    return cipher.encrypt_bytes(_pad(value), table=TABLE, column=column, row_id=row_id)


def _decrypt(cipher: FieldCipher, column: str, row_id: str, token: str | None) -> str | None:
    if token is None:
        return None
    return _unpad(cipher.decrypt_bytes(token, table=TABLE, column=column, row_id=row_id), column, row_id)


def encrypt_fields(cipher: FieldCipher, row_id: str, patient: PatientInput) -> dict[str, str | None]:
    """Tokens (column -> token) for the fields ``patient`` gives: name and phone always, the others when set.

    Sans-I/O: ``patient`` must be :meth:`PatientInput.checked` and ``row_id`` the row the tokens will be stored in.
    """
    values: dict[str, str | None] = {"name_enc": patient.name, "phone_enc": patient.phone}
    if patient.national_id is not None:
        values["national_id_enc"] = patient.national_id
    if patient.record_number is not None:
        values["record_number_enc"] = patient.record_number
    if patient.birth_year is not None:
        values["birth_year_enc"] = str(patient.birth_year)
    return {column: _encrypt(cipher, column, row_id, value) for column, value in values.items()}


class PatientRegistry:
    """Upsert, look up and read patients. Async: key-service calls are awaited, database calls run in threads."""

    def __init__(
        self,
        store: PatientStore,
        ring: DataKeyRing,
        indexer: BlindIndexer,
        *,
        audit: AuditLog | None = None,
        authorize: Authorize | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._store = store
        self._ring = ring
        self._indexer = indexer
        self._audit = audit
        self._authorize = authorize
        self._clock = clock or (lambda: datetime.now(UTC))

    @property
    def store(self) -> PatientStore:
        return self._store

    # --- indexes --------------------------------------------------------------------------------------------

    async def phone_index(self, phone: str) -> str:
        """The blind index of a phone number in any usual spelling; PatientInputError if it is not a number."""
        try:
            normalised = normalise_phone(phone)
        except FieldCipherError:
            raise PatientInputError("phone must be 3-20 digits, optionally with a leading + and separators") from None
        return await self._indexer.blind_index(normalised, PHONE_INDEX)

    async def _record_index(self, record_number: str) -> str:
        return await self._indexer.blind_index(normalise_record_number(record_number), RECORD_INDEX)

    # --- lookups --------------------------------------------------------------------------------------------

    async def lookup_by_phone(self, phone: str, *, accessor: str, role: str, reason: str) -> list[str]:
        """Ids of the patients registered with this phone number (a family may share one), oldest first.

        Audited as a read: the patient's blind id when exactly one matches, else only the number of matches.
        """
        access = self._access(accessor, role, reason)
        index = await self.phone_index(phone)
        refs = await asyncio.to_thread(self._store.by_phone, index)
        blind_id = refs[0].blind_id if len(refs) == 1 else None
        await self._append(access, "read", blind_id, {"lookup": "phone", "matches": len(refs)})
        return [ref.id for ref in refs]

    async def lookup_by_record_number(self, record_number: str, *, accessor: str, role: str, reason: str) -> str | None:
        """The id of the patient with this HIS record number, or None. Audited as a read."""
        access = self._access(accessor, role, reason)
        index = await self._record_index(record_number)
        found = await asyncio.to_thread(self._store.by_record, index)
        if found is not None and found.merged_into is not None:
            found = await asyncio.to_thread(self._store.load, found.merged_into)  # the number of a merged patient
        blind_id = None if found is None else found.blind_id
        await self._append(access, "read", blind_id, {"lookup": "record_number", "matches": int(found is not None)})
        return None if found is None else found.id

    async def resolve(self, patient_id: str) -> str:
        """The id a patient is known by now: the survivor's when the HIS merged it (ADT^A40), else its own."""
        stored = await asyncio.to_thread(self._store.load, check_patient_id(patient_id))
        return stored.merged_into or stored.id

    async def ref(self, patient_id: str) -> PatientRef:
        """Id, blind id and department of a patient, without decrypting anything (for policies and audits)."""
        return await asyncio.to_thread(self._store.ref, check_patient_id(patient_id))

    # --- read -----------------------------------------------------------------------------------------------

    async def get(self, patient_id: str, *, accessor: str, role: str, reason: str) -> PatientRecord:
        """The decrypted record, after the access check and once the read is in the audit log."""
        check_patient_id(patient_id)
        if not reason.strip():
            raise RegistryError(f"reading patient {patient_id} needs a reason")
        access = self._access(accessor, role, reason)
        if self._authorize is not None:
            await self._authorize(accessor, "read", patient_id)
        stored = await asyncio.to_thread(self._store.load, patient_id)
        try:
            async with self._ring.cipher([stored.data_key]) as cipher:
                values = {col: _decrypt(cipher, col, patient_id, token) for col, token in stored.tokens.items()}
        except MedhotlineError as exc:
            log.error("patient.read_failed", patient_id=patient_id, error=type(exc).__name__)
            await self._append(access, "read", stored.blind_id, {"kind": "record"}, outcome="error")
            raise
        await self._append(access, "read", stored.blind_id, {"kind": "record"})
        return _record(stored, values)

    # --- write ----------------------------------------------------------------------------------------------

    async def upsert(self, patient: PatientInput, *, accessor: str, role: str, reason: str = "registration") -> str:
        """Register a patient, or update the one with the same record number; returns the patient id.

        With a record number the patient is matched by its blind index (the HIS's key for the patient), without
        one a new patient is registered. Fields left ``None`` keep their stored value on an update.
        """
        checked = patient.checked(self._clock())
        access = self._access(accessor, role, reason)
        phone_bidx = await self._indexer.blind_index(checked.phone, PHONE_INDEX)
        record_bidx = None if checked.record_number is None else await self._record_index(checked.record_number)
        indexes = _Indexes(phone_bidx, record_bidx)
        for _ in range(_UPSERT_ATTEMPTS):
            existing = None if record_bidx is None else await asyncio.to_thread(self._store.by_record, record_bidx)
            target, target_indexes = checked, indexes
            if existing is not None and existing.merged_into is not None:
                # A merged patient's number: the survivor is updated and keeps its own record number.
                existing = await asyncio.to_thread(self._store.load, existing.merged_into)
                target, target_indexes = replace(checked, record_number=None), _Indexes(phone_bidx, None)
            try:
                if existing is None:
                    return await self._create(checked, indexes, access)
                if await self._update(existing, target, target_indexes, access):
                    return existing.id
            except RecordNumberTaken:
                pass  # registered by someone else a moment ago: go round again and update that row
        raise RegistryError(f"patient registration did not settle after {_UPSERT_ATTEMPTS} concurrent attempts")

    async def _create(self, patient: PatientInput, indexes: _Indexes, access: _Access) -> str:
        patient_id = str(uuid.uuid4())
        if self._authorize is not None:
            await self._authorize(access.accessor, "create", patient_id)
        blind_id = await self._indexer.blind_index(patient_id, BLIND_ID_INDEX)
        key = await self._ring.current_key(PURPOSE)
        async with self._ring.cipher([key]) as cipher:
            tokens = encrypt_fields(cipher, patient_id, patient)
        now = self._clock()
        await asyncio.to_thread(
            lambda: self._store.insert(
                patient_id=patient_id,
                blind_id=blind_id,
                phone_bidx=indexes.phone,
                record_bidx=indexes.record,
                tokens=tokens,
                data_key_id=key.id,
                department=patient.department,
                at=now,
            )
        )
        log.info("patient.registered", patient_id=patient_id, data_key_version=key.version)
        await self._append(access, "change", blind_id, _change_details(created=True, fields=tokens))
        return patient_id

    async def _update(self, existing: StoredPatient, patient: PatientInput, indexes: _Indexes, access: _Access) -> bool:
        if self._authorize is not None:
            await self._authorize(access.accessor, "change", existing.id)
        # The row keeps the data key it was written under: its other tokens stay valid without re-encryption.
        async with self._ring.cipher([existing.data_key]) as cipher:
            tokens = encrypt_fields(cipher, existing.id, patient)
        now = self._clock()
        changed = await asyncio.to_thread(
            lambda: self._store.update(
                existing.id,
                data_key_id=existing.data_key.id,
                phone_bidx=indexes.phone,
                record_bidx=indexes.record,
                tokens=tokens,
                department=patient.department,
                at=now,
            )
        )
        if not changed:
            return False  # moved to another data key since it was read: the caller reads it again
        log.info("patient.updated", patient_id=existing.id)
        fields = [*tokens, *(["department"] if patient.department is not None else [])]
        await self._append(access, "change", existing.blind_id, _change_details(created=False, fields=fields))
        return True

    async def merge(
        self, survivor_record: str, merged_record: str, *, accessor: str, role: str, reason: str
    ) -> MergeResult:
        """Merge the patient with ``merged_record`` into the one with ``survivor_record`` (HIS record numbers).

        The merged row stays with its history and resolves to the survivor (:meth:`resolve`, lookups by either
        record number); it is no longer found by phone. Doing it again changes nothing (``changed`` False).
        UnknownPatient names which of the two has no registered record.
        """
        access = self._access(accessor, role, reason)
        survivor = await asyncio.to_thread(self._store.by_record, await self._record_index(survivor_record))
        if survivor is None:
            raise UnknownPatient("no registered patient has the surviving record number", "survivor")
        if survivor.merged_into is not None:
            survivor = await asyncio.to_thread(self._store.load, survivor.merged_into)
        merged = await asyncio.to_thread(self._store.by_record, await self._record_index(merged_record))
        if merged is None:
            raise UnknownPatient("no registered patient has the record number to merge", "merged")
        if merged.id == survivor.id:
            return MergeResult(survivor.id, survivor.blind_id, merged.id, merged.blind_id, changed=False)
        if self._authorize is not None:
            await self._authorize(accessor, "change", survivor.id)
            await self._authorize(accessor, "change", merged.id)
        changed = await asyncio.to_thread(self._store.merge, merged.id, survivor.id, self._clock())
        if changed:
            log.info("patient.merged", patient_id=merged.id, into=survivor.id)
            await self._append(access, "change", survivor.blind_id, {"merge": "survivor"})
            await self._append(access, "change", merged.blind_id, {"merge": "merged"})
        return MergeResult(survivor.id, survivor.blind_id, merged.id, merged.blind_id, changed=changed)

    # --- audit ----------------------------------------------------------------------------------------------

    def _access(self, accessor: str, role: str, reason: str) -> _Access:
        """Refuse now what the audit log would refuse later (an accessor that is no id, a number in the reason)."""
        if self._audit is not None:
            try:
                AuditEntry(0, self._clock(), accessor, role, "read", "success", None, reason)
            except AuditError as exc:
                raise RegistryError(f"cannot audit this access: {exc}") from None
        return _Access(accessor, role, reason)

    async def _append(
        self,
        access: _Access,
        action: Literal["read", "change"],
        blind_id: str | None,
        details: Mapping[str, JsonValue],
        *,
        outcome: AuditOutcome = "success",
    ) -> None:
        if self._audit is None:
            return
        audit = self._audit
        try:
            await asyncio.to_thread(
                lambda: audit.append(
                    actor=access.accessor,
                    role=access.role,
                    action=action,
                    outcome=outcome,
                    patient=blind_id,
                    reason=access.reason,
                    details=details,
                )
            )
        except AuditError as exc:
            # No unaudited access: the caller gets an error instead of the data.
            log.error("patient.audit_failed", action=action, error=str(exc))
            raise RegistryError(f"the audit log refused the {action} entry: {exc}") from None


@dataclass(frozen=True, slots=True)
class _Indexes:
    phone: str
    record: str | None


def _change_details(*, created: bool, fields: Iterable[str]) -> dict[str, JsonValue]:
    names: list[JsonValue] = [f.removesuffix("_enc") for f in sorted(fields)]
    return {"created": created, "fields": names}


def _record(stored: StoredPatient, values: Mapping[str, str | None]) -> PatientRecord:
    name, phone = values["name_enc"], values["phone_enc"]
    if name is None or phone is None:
        raise RegistryError(f"patient {stored.id} lacks a name or phone token")
    birth = values["birth_year_enc"]
    return PatientRecord(
        id=stored.id,
        name=name,
        phone=phone,
        national_id=values["national_id_enc"],
        record_number=values["record_number_enc"],
        birth_year=int(birth) if birth is not None and birth.isdigit() else None,
        department=stored.department,
        created_at=stored.created_at,
        updated_at=stored.updated_at,
    )
