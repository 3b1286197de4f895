"""The ``patients`` table (created by migration ``0006_patients``) and its synchronous repository.

Every identifying column holds a ``FieldCipher`` token, never a value: the repository moves tokens and blind
indexes, and has no key to read them with. :class:`his.registry.PatientRegistry` does the encryption, asks the
key service for the indexes and calls this repository through ``asyncio.to_thread``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from sqlalchemy import CheckConstraint, ForeignKey, Index, Integer, String, Text, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from compliance.data_keys import DataKey, DataKeyRecord, data_key_record
from ground.db import DatabaseError, Repository
from ground.models import Base, UTCDateTime

TABLE: Final = "patients"
# The identifying columns, each a FieldCipher token bound to (patients, column, row id).
ENCRYPTED_COLUMNS: Final = ("name_enc", "phone_enc", "national_id_enc", "record_number_enc", "birth_year_enc")


class PatientNotFound(DatabaseError):
    """No patient with that id is registered."""


class RecordNumberTaken(DatabaseError):
    """Another patient row already holds this record number (two registrations raced); retry as an update."""


class Patient(Base):
    __tablename__ = TABLE

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    blind_id: Mapped[str] = mapped_column(String(64))
    phone_bidx: Mapped[str] = mapped_column(String(64))
    record_bidx: Mapped[str | None] = mapped_column(String(64))
    name_enc: Mapped[str] = mapped_column(Text)
    phone_enc: Mapped[str] = mapped_column(Text)
    national_id_enc: Mapped[str | None] = mapped_column(Text)
    record_number_enc: Mapped[str | None] = mapped_column(Text)
    birth_year_enc: Mapped[str | None] = mapped_column(Text)
    data_key_id: Mapped[int] = mapped_column(Integer, ForeignKey(DataKey.id, ondelete="RESTRICT"))
    department: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Set when the HIS merged this patient into another (ADT^A40, migration 0017): the row and its history stay.
    merged_into: Mapped[str | None] = mapped_column(String(36))

    __table_args__ = (
        CheckConstraint("(record_bidx IS NULL) = (record_number_enc IS NULL)", name="record_number_indexed"),
        Index("ix_patients_phone_bidx", "phone_bidx"),
        Index("uq_patients_record_bidx", "record_bidx", unique=True),
        Index("uq_patients_blind_id", "blind_id", unique=True),
        Index("ix_patients_data_key_id", "data_key_id"),
        Index("ix_patients_merged_into", "merged_into"),
    )


@dataclass(frozen=True, slots=True)
class StoredPatient:
    """One ``patients`` row as stored: tokens, indexes and the data key they are under. Nothing in clear."""

    id: str
    blind_id: str
    phone_bidx: str
    record_bidx: str | None
    tokens: Mapping[str, str | None] = field(repr=False)
    data_key: DataKeyRecord
    department: str | None
    created_at: datetime
    updated_at: datetime
    merged_into: str | None = None


@dataclass(frozen=True, slots=True)
class PatientRef:
    """A patient found by a blind index: its id and blind id, nothing else."""

    id: str
    blind_id: str
    department: str | None


def _stored(row: Patient, key: DataKey) -> StoredPatient:
    return StoredPatient(
        id=row.id,
        blind_id=row.blind_id,
        phone_bidx=row.phone_bidx,
        record_bidx=row.record_bidx,
        tokens={column: getattr(row, column) for column in ENCRYPTED_COLUMNS},
        data_key=data_key_record(key),
        department=row.department,
        created_at=row.created_at,
        updated_at=row.updated_at,
        merged_into=row.merged_into,
    )


class PatientStore(Repository):
    """Reads and writes ``patients`` rows (tokens and indexes only); each method is one transaction."""

    def load(self, patient_id: str) -> StoredPatient:
        with self._transaction(f"reading patient {patient_id}") as session:
            found = session.execute(
                select(Patient, DataKey)
                .join(DataKey, Patient.data_key_id == DataKey.id)
                .where(Patient.id == patient_id)
            ).first()
            if found is None:
                raise PatientNotFound(f"no patient {patient_id}")
            return _stored(found[0], found[1])

    def by_record(self, record_bidx: str) -> StoredPatient | None:
        with self._transaction("finding a patient by record number index") as session:
            found = session.execute(
                select(Patient, DataKey)
                .join(DataKey, Patient.data_key_id == DataKey.id)
                .where(Patient.record_bidx == record_bidx)
            ).first()
            return None if found is None else _stored(found[0], found[1])

    def by_phone(self, phone_bidx: str) -> list[PatientRef]:
        """Patients sharing this phone index, oldest registration first."""
        with self._transaction("finding patients by phone index") as session:
            rows = session.execute(
                select(Patient.id, Patient.blind_id, Patient.department)
                .where(Patient.phone_bidx == phone_bidx, Patient.merged_into.is_(None))
                .order_by(Patient.created_at, Patient.id)
            ).all()
            return [PatientRef(str(i), str(b), d) for i, b, d in rows]

    def ref(self, patient_id: str) -> PatientRef:
        """Id, blind id and department: what access checks and audit entries need, no token."""
        with self._transaction(f"reading patient {patient_id}") as session:
            row = session.execute(
                select(Patient.id, Patient.blind_id, Patient.department).where(Patient.id == patient_id)
            ).first()
            if row is None:
                raise PatientNotFound(f"no patient {patient_id}")
            return PatientRef(str(row[0]), str(row[1]), row[2])

    def insert(
        self,
        *,
        patient_id: str,
        blind_id: str,
        phone_bidx: str,
        record_bidx: str | None,
        tokens: Mapping[str, str | None],
        data_key_id: int,
        department: str | None,
        at: datetime,
    ) -> None:
        with self._transaction(f"registering patient {patient_id}") as session:
            row = Patient(
                id=patient_id,
                blind_id=blind_id,
                phone_bidx=phone_bidx,
                record_bidx=record_bidx,
                data_key_id=data_key_id,
                department=department,
                created_at=at,
                updated_at=at,
                **_checked_tokens(tokens, full=True),
            )
            session.add(row)
            self._flush(session, record_bidx)

    def update(
        self,
        patient_id: str,
        *,
        data_key_id: int,
        phone_bidx: str | None,
        record_bidx: str | None,
        tokens: Mapping[str, str | None],
        department: str | None,
        at: datetime,
    ) -> bool:
        """Replace the given tokens (and indexes), encrypted under ``data_key_id``, the row's own data key.

        False (nothing changed) if the row is under another key, which the tokens would not decrypt with. Fields
        not given keep their token, so concurrent updates of different fields both land (last writer wins per field).
        """
        with self._transaction(f"updating patient {patient_id}") as session:
            row = session.get(Patient, patient_id, with_for_update=True)
            if row is None:
                raise PatientNotFound(f"no patient {patient_id}")
            if row.data_key_id != data_key_id:
                return False
            for column, token in _checked_tokens(tokens, full=False).items():
                setattr(row, column, token)
            if phone_bidx is not None:
                row.phone_bidx = phone_bidx
            if record_bidx is not None:
                row.record_bidx = record_bidx
            if department is not None:
                row.department = department
            row.updated_at = at
            self._flush(session, record_bidx)
            return True

    def merge(self, merged_id: str, survivor_id: str, at: datetime) -> bool:
        """Mark ``merged_id`` merged into ``survivor_id``; False if it already was (an A40 sent again).

        Whatever was merged into ``merged_id`` before now points at the survivor too, so a chain never forms.
        """
        if merged_id == survivor_id:
            raise ValueError("a patient cannot be merged into itself")
        with self._transaction(f"merging patient {merged_id} into {survivor_id}") as session:
            rows = {
                r.id: r
                for r in session.scalars(
                    select(Patient).where(Patient.id.in_([merged_id, survivor_id])).with_for_update()
                )
            }
            merged, survivor = rows.get(merged_id), rows.get(survivor_id)
            if merged is None or survivor is None:
                raise PatientNotFound(f"no patient {merged_id if merged is None else survivor_id}")
            if survivor.merged_into is not None:
                raise DatabaseError(f"patient {survivor_id} was itself merged into another and cannot survive")
            if merged.merged_into == survivor_id:
                return False
            merged.merged_into = survivor_id
            merged.updated_at = at
            survivor.updated_at = at
            session.execute(
                update(Patient).where(Patient.merged_into == merged_id).values(merged_into=survivor_id, updated_at=at)
            )
            return True

    def count(self) -> int:
        with self._transaction("counting patients") as session:
            return int(session.scalar(select(func.count()).select_from(Patient)) or 0)

    @staticmethod
    def _flush(session: Session, record_bidx: str | None) -> None:
        try:
            session.flush()
        except IntegrityError:
            if record_bidx is not None:
                raise RecordNumberTaken("another patient registered with this record number at the same time") from None
            raise


def _checked_tokens(tokens: Mapping[str, str | None], *, full: bool) -> dict[str, str | None]:
    unknown = sorted(set(tokens) - set(ENCRYPTED_COLUMNS))
    if unknown:
        raise ValueError(f"not encrypted columns of {TABLE}: {', '.join(unknown)}")
    if full:
        return {column: tokens.get(column) for column in ENCRYPTED_COLUMNS}
    return dict(tokens)
