"""The outreach scheduler's leader election across two real ``medhotline serve`` node processes, each with its own
sandbox Asterisk, on one PostgreSQL (``test_cluster_nodes.two_nodes``).

Exactly one node leads (its log says so, and PostgreSQL shows one holder of the scheduler's advisory lock); the
follow-ups that come due are each called once, by the leader, to a SIPp patient phone. Then the leader's service
is SIGKILLed: the database drops the dead session's lock, the other node leads within a beat or two, and the
follow-ups due after the kill are called once, by the survivor. Nothing is called twice: every patient's phone
received exactly the calls due to it, and every plan has exactly one attempt row.

Each patient's "phone number" is the UDP port of its own SIPp phone (the dial string puts ``{number}`` in the
port), so the calls each patient received are counted apart without reading SIP traces.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import sessionmaker

from medhotline.free_ports import free_port, free_rtp_range
from medhotline.phones.patient import ANSWERED, PatientPhone
from scheduler.leader import ADVISORY_KEY
from scheduler.policy import LOCAL_TZ
from scheduler.store import AttemptRecord, AttemptStore, PlanStore, Threshold

from .test_cluster_nodes import WITHIN, Cluster, two_nodes, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

PATIENTS = 2
ENDED = ("completed", "failed", "cancelled")
# The patient answers, then hangs up: who placed the call is what matters here, not the flow.
ANSWER_MS, HANG_UP_MS = 300, 1_500


def outreach_config() -> str:
    # Quiet hours an hour long, twelve hours away: the test may run at any time of day. One attempt per round, so
    # a call the patient hangs up is not retried (a retry would count as a second call).
    far = datetime.now(LOCAL_TZ) + timedelta(hours=12)
    return f"""
[outreach]
dial_string = "PJSIP/patients/sip:patient@127.0.0.1:{{number}}"
ring_seconds = 10
quiet_hours = "{far:%H}:00-{(far + timedelta(hours=1)):%H}:00"
max_attempts = 1
"""


def node_log(cluster: Cluster, name: str) -> Path:
    log_file = cluster.config.service.log_file
    assert log_file is not None
    return log_file.with_name(f"{log_file.stem}-{name}{log_file.suffix}")


def leading(cluster: Cluster, name: str) -> bool:
    """Whether the node's log says its scheduler leads now (its last leading/stopped_leading event)."""
    path = node_log(cluster, name)
    state = False
    if not path.exists():
        return False
    for line in path.read_text(errors="replace").splitlines():
        if '"scheduler.' not in line:
            continue
        event = json.loads(line).get("event")
        if event == "scheduler.leading":
            state = True
        elif event == "scheduler.stopped_leading":
            state = False
    return state


def lock_holders(engine: Engine) -> list[int]:
    """The backends (server process ids) holding the scheduler's advisory lock, as PostgreSQL itself sees them."""
    with engine.connect() as conn:
        return [
            int(pid)
            for pid in conn.execute(
                text(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND ((classid::bigint << 32) | objid::bigint) = :key"
                ),
                {"key": ADVISORY_KEY},
            ).scalars()
        ]


def add_patient(cluster: Cluster, phone: PatientPhone) -> str:
    """A registry patient whose number is the phone's port; the name is one the session scans the logs for."""
    added = subprocess.run(
        [sys.executable, "-m", "medhotline", "--config", str(cluster.config_path), "patients", "add",
         "--from-json", "-"],
        input=json.dumps({"name": "李建国", "phone": str(phone.sip_port), "birth_year": 1956}),
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    return added.stdout.strip()


def add_plans(cluster: Cluster, patients: list[str], due_in: float) -> list[str]:
    plans = PlanStore(sessionmaker(cluster.engine, expire_on_commit=False))
    now = datetime.now(UTC)
    return [
        plans.add(
            patient_id=patient,
            condition="hypertension",
            interval_days=7,
            window=("00:00", "23:59"),
            flow="followup",
            thresholds={"systolic": Threshold(90, 139)},
            responsible="doc1",
            first_due=now + timedelta(seconds=due_in),
            at=now,
            by="test",
        ).id
        for patient in patients
    ]


def attempts(cluster: Cluster, plans: list[str]) -> dict[str, list[AttemptRecord]]:
    store = AttemptStore(sessionmaker(cluster.engine, expire_on_commit=False))
    return {plan: store.for_subject(plan) for plan in plans}


def all_ended(cluster: Cluster, plans: list[str]) -> Callable[[], bool]:
    return lambda: all(rows and all(r.state in ENDED for r in rows) for rows in attempts(cluster, plans).values())


def test_one_service_leads_the_scheduler_and_the_other_takes_over_after_sigkill(
    tmp_path: Path, postgres_url: str
) -> None:
    with two_nodes(tmp_path, postgres_url, outreach_config(), agents=()) as cluster:
        node_a, node_b = cluster.sandbox.nodes
        names = (node_a.config.service.node_name, node_b.config.service.node_name)
        ranges = cluster.sandbox.rtp_ranges()
        phones = [
            PatientPhone(
                f"patient{i}",
                free_port(socket.SOCK_DGRAM),
                free_rtp_range(4, "127.0.0.1", ranges),
                answer_after_ms=ANSWER_MS,
                max_call_ms=HANG_UP_MS,
            ).start()
            for i in range(PATIENTS)
        ]
        try:
            patients = [add_patient(cluster, phone) for phone in phones]

            # Exactly one leader, in the services' logs and in PostgreSQL's locks, for a while.
            wait_for("a scheduler leader", lambda: any(leading(cluster, n) for n in names), time.monotonic() + 20)
            for _ in range(5):
                assert sum(leading(cluster, n) for n in names) == 1
                assert len(lock_holders(cluster.engine)) == 1
                time.sleep(0.2)
            (holder,) = lock_holders(cluster.engine)
            leader = next(n for n in names if leading(cluster, n))
            survivor = next(n for n in names if n != leader)

            # One follow-up per patient, due now: each called once, by the leader.
            first = add_plans(cluster, patients, due_in=0.5)
            wait_for("the first calls ended", all_ended(cluster, first), time.monotonic() + 30)
            assert [phone.count(ANSWERED) for phone in phones] == [1] * PATIENTS, [p.errors() for p in phones]
            assert {r.node for rows in attempts(cluster, first).values() for r in rows} == {leader}

            # Follow-ups due a few seconds after the leader's service dies (its job may already be persisted).
            second = add_plans(cluster, patients, due_in=3.0)
            killed_node = node_a if leader == names[0] else node_b
            cluster.sandbox.kill_service(killed_node)
            killed = time.monotonic()
            wait_for(f"{survivor} leading", lambda: leading(cluster, survivor), killed + WITHIN)
            takeover = time.monotonic() - killed
            # The dead service's session let go of the lock; the survivor's session holds it.
            (new_holder,) = lock_holders(cluster.engine)
            assert new_holder != holder
            wait_for("the second calls ended", all_ended(cluster, second), time.monotonic() + 30)
            time.sleep(3.0)  # a second placement (a job fired twice, a round opened twice) would show by now

            assert [phone.count(ANSWERED) for phone in phones] == [2] * PATIENTS, [p.errors() for p in phones]
            rows = attempts(cluster, first + second)
            assert {plan: len(r) for plan, r in rows.items()} == {plan: 1 for plan in first + second}, rows
            assert {r.node for plan in second for r in rows[plan]} == {survivor}, rows
            print(f"scheduler takeover after SIGKILL of {leader}'s service: {takeover:.2f} s")  # with -s, for docs
        finally:
            for phone in phones:
                phone.stop()
    assert cluster.exit_codes.get(survivor) == 0, f"{survivor}'s service exited with {cluster.exit_codes}"
