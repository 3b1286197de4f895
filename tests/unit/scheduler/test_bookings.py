"""The booking desk: a staff booking, cancellation or change and its audit entry are one service call."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import Engine

from compliance.audit import AuditLog, MemoryAuditStore
from ground.errors import CommandError, MedhotlineError
from scheduler.bookings import BookingDesk
from scheduler.vaccination import VaccinationStore
from tests.unit.scheduler.test_vaccination import DAY, T0, local, one_slot, seed


class Registry:
    """Holds the ids it was given; refuses any other as the registry does."""

    def __init__(self, *known: str) -> None:
        self.known = set(known)

    def ref(self, patient_id: str) -> object:
        if patient_id not in self.known:
            raise MedhotlineError("no such patient in the registry")
        return object()


def desk(engine: Engine, *known: str) -> tuple[BookingDesk, MemoryAuditStore]:
    store = VaccinationStore.for_engine(engine)
    seed(store)
    memory = MemoryAuditStore()
    return BookingDesk(store, AuditLog(memory), Registry(*known), clock=lambda: T0), memory


def test_book_change_cancel_each_append_one_entry_without_the_patient(engine: Engine) -> None:
    patient = str(uuid.uuid4())
    service, memory = desk(engine, patient)
    first, second = one_slot(service.store, local(DAY, "09:00")), one_slot(service.store, local(DAY, "10:00"))
    booked = service.book(patient, actor="agent1", slot_id=first.id)
    moved = service.change(booked.id, second.id, actor="agent1")
    cancelled = service.cancel(moved.id, actor="agent2")
    entries = [stored.to_entry() for stored in memory.entries()]
    assert [(e.actor, e.role, e.details["operation"], e.details["booking"]) for e in entries] == [
        ("agent1", "operator", "book", booked.id),
        ("agent1", "operator", "change", moved.id),
        ("agent2", "operator", "cancel", moved.id),
    ]
    assert entries[1].details["changed_from"] == booked.id
    assert cancelled.state == "cancelled"
    assert not any(patient in str(e.details) or e.patient for e in entries)


def test_a_patient_the_registry_lacks_books_nothing_and_audits_nothing(engine: Engine) -> None:
    service, memory = desk(engine)
    slot = one_slot(service.store, local(DAY, "09:00"))
    with pytest.raises(MedhotlineError, match="registry"):
        service.book(str(uuid.uuid4()), actor="agent1", slot_id=slot.id)
    assert service.store.slots(day=DAY)[0].free == slot.capacity
    assert list(memory.entries()) == []


def test_cancelling_twice_names_the_state_and_audits_once(engine: Engine) -> None:
    patient = str(uuid.uuid4())
    service, memory = desk(engine, patient)
    slot = one_slot(service.store, local(DAY, "09:00"))
    booked = service.book(patient, actor="agent1", slot_id=slot.id)
    service.cancel(booked.id, actor="agent1")
    with pytest.raises(CommandError, match=f"booking {booked.id} is cancelled: nothing cancelled"):
        service.cancel(booked.id, actor="agent1")
    assert [e.to_entry().details["operation"] for e in memory.entries()] == ["book", "cancel"]
