"""Patient-data crypto: field encryption, blind indexes, audit appends, and what encryption costs a write.

Run ``python -m benchmarks.crypto`` (``--rows``, ``--audit-entries``, ``--head-every``, ``--postgres URL``).
Every figure comes with a baseline measured in the same run, on the same machine and data:

- ``FieldCipher`` encrypt / decrypt of a phone-number field, next to bare AES-256-GCM of the same bytes (the
  cost of the associated data, the version byte and the base64 token);
- blind indexes: the HMAC inside the key service next to a round trip to the key service over its Unix socket
  (what the registry pays per lookup), and an unwrap round trip (what each registry operation pays for its
  data key, since nothing is cached);
- audit appends on SQLite (``AuditLog`` + ``SqlAuditStore``), with an Ed25519-signed tree head every N entries,
  next to the same appends without heads;
- the write path: N patient rows inserted in clear (one transaction each, as the registry does), the same rows
  encrypted with blind indexes computed in process, and the same rows through ``PatientRegistry.upsert`` with a
  key service in its own process (with and without the audit entry each upsert appends); and lookups by phone,
  a clear ``WHERE phone = ?`` next to ``lookup_by_phone``.

The key service runs as a separate process, as in production. The figures are for comparison on one host, not
promises: a loaded PostgreSQL over a network changes the absolute numbers, and mostly shrinks the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select, text

from compliance.audit import AuditLog, Ed25519Signer, SqlAuditStore
from compliance.data_keys import DataKeyRing, DataKeyStore
from compliance.fields import FieldCipher, normalise_phone
from compliance.keyservice_client import KeyServiceClient
from compliance.keystore import KeyStore
from ground import db
from ground.logs import configure_logging
from his.registry import PatientInput, PatientRegistry, encrypt_fields
from his.tables import PatientStore

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Rate:
    per_second: float
    p50_us: float
    p99_us: float

    def __str__(self) -> str:
        return f"{self.per_second:>10,.0f}/s   p50 {self.p50_us:>8.1f} µs   p99 {self.p99_us:>8.1f} µs"


def _rate(samples: list[float], elapsed: float) -> Rate:
    samples.sort()
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return Rate(len(samples) / elapsed, statistics.median(samples) * 1e6, p99 * 1e6)


def measure(func: Callable[[int], object], n: int, *, warm: int = 50) -> Rate:
    for i in range(min(n, warm)):  # warm up (not for inserts: they would repeat unique values)
        func(i)
    samples: list[float] = []
    started = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        func(i)
        samples.append(time.perf_counter() - t0)
    return _rate(samples, time.perf_counter() - started)


async def ameasure(func: Callable[[int], Awaitable[object]], n: int, *, warm: int = 20) -> Rate:
    for i in range(warm):
        await func(-1 - i)
    samples: list[float] = []
    started = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        await func(i)
        samples.append(time.perf_counter() - t0)
    return _rate(samples, time.perf_counter() - started)


def line(label: str, rate: Rate, baseline: Rate | None = None) -> None:
    ratio = f"   x{baseline.per_second / rate.per_second:5.2f} the time of the baseline" if baseline else ""
    print(f"  {label:<44} {rate}{ratio}")


# --- data ------------------------------------------------------------------------------------------------------

SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗"
GIVEN = "秀英建国小雨敏华伟芳娜静丽强磊军洋勇艳杰涛明超霞平刚"


def person(i: int) -> PatientInput:
    name = SURNAMES[i % len(SURNAMES)] + GIVEN[(i * 7) % len(GIVEN)] + GIVEN[(i * 13) % len(GIVEN)]
    return PatientInput(
        name=name,
        phone=f"+86 13{i % 10} {i:04d} {(i * 7919) % 10000:04d}",
        national_id=f"110105{1940 + i % 80}{(i % 12) + 1:02d}{(i % 28) + 1:02d}{i % 1000:03d}{i % 10}",
        record_number=f"MRN-{i:08d}",
        birth_year=1940 + i % 80,
        department=("cardiology", "pediatrics", "surgery")[i % 3],
    )


# --- the key service as its own process ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def key_service(workdir: Path) -> AsyncIterator[tuple[KeyServiceClient, KeyStore]]:
    keydir, run_dir = workdir / "keys", workdir / "run"
    store = KeyStore.create(keydir)
    token = secrets.token_urlsafe(32)
    token_path = workdir / "token"
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token)
    socket_path = run_dir / "ks.sock"
    code = (
        "import sys; from pathlib import Path; from ground.logs import configure_logging; "
        "configure_logging('warning'); from compliance.keyservice_server import run_keyservice; "
        f"sys.exit(run_keyservice(Path({str(keydir)!r}), Path({str(socket_path)!r}), Path({str(token_path)!r}), set()))"
    )
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", code, cwd=ROOT)
    try:
        for _ in range(400):
            if socket_path.exists():
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("the key service did not start")
        async with KeyServiceClient.unix(socket_path, token) as client:
            yield client, store
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


# --- sections ------------------------------------------------------------------------------------------------------


def bench_fields(n: int) -> None:
    print("field encryption (one phone number field, sans I/O)")
    key = secrets.token_bytes(32)
    cipher = FieldCipher.single(key)
    aes = AESGCM(key)
    value = "13800138000"
    raw = value.encode()
    tokens = [cipher.encrypt(value, table="patients", column="phone_enc", row_id=f"row-{i}") for i in range(n)]
    nonce = secrets.token_bytes(12)
    sealed = aes.encrypt(nonce, raw, None)
    bare_enc = measure(lambda i: aes.encrypt(secrets.token_bytes(12), raw, None), n)
    bare_dec = measure(lambda i: aes.decrypt(nonce, sealed, None), n)
    enc = measure(lambda i: cipher.encrypt(value, table="patients", column="phone_enc", row_id=f"row-{i}"), n)
    dec = measure(lambda i: cipher.decrypt(tokens[i], table="patients", column="phone_enc", row_id=f"row-{i}"), n)
    line("bare AES-256-GCM encrypt (baseline)", bare_enc)
    line("FieldCipher.encrypt (AAD, version, base64)", enc, bare_enc)
    line("bare AES-256-GCM decrypt (baseline)", bare_dec)
    line("FieldCipher.decrypt", dec, bare_dec)


async def bench_key_service(client: KeyServiceClient, store: KeyStore, n: int) -> None:
    print("blind index and data keys (key service in its own process, Unix socket)")
    phone = normalise_phone("+86 138 0013 8000")
    local = measure(lambda i: store.blind_index(phone, "patients.phone"), n)
    remote = await ameasure(lambda i: client.blind_index(phone, "patients.phone"), n)
    generated = await client.generate_data_key("dek:bench:v1")
    generated.wipe()
    unwrap = await ameasure(lambda i: client.unwrap(generated.wrapped, "dek:bench:v1"), n)
    line("HMAC-SHA256 inside the key service (baseline)", local)
    line("blind_index round trip", remote, local)
    line("unwrap round trip (one per registry call)", unwrap, local)


def bench_audit(workdir: Path, n: int, head_every: int) -> None:
    print(f"audit appends (SQLite file, {n} entries)")
    signer = Ed25519Signer.load_or_create(workdir / "audit-keys")

    def run(url: str, every: int | None) -> tuple[Rate, int]:
        db.upgrade(url)
        engine = db.make_engine(url)
        try:
            log = AuditLog(SqlAuditStore(engine))
            heads = 0

            def append(i: int) -> None:
                nonlocal heads
                log.append(
                    actor="nurse.liu",
                    role="nurse",
                    action="read",
                    outcome="success",
                    patient=secrets.token_hex(32),
                    reason="follow-up call",
                    details={"kind": "record"},
                )
                if every and (i + 1) % every == 0:
                    log.sign_head(signer)
                    heads += 1

            return measure(append, n), heads
        finally:
            engine.dispose()

    plain, _ = run(f"sqlite:///{workdir / 'audit-plain.db'}", None)
    signed, heads = run(f"sqlite:///{workdir / 'audit-signed.db'}", head_every)
    line("append, no signed heads (baseline)", plain)
    line(f"append + signed head every {head_every} ({heads} heads)", signed, plain)


CLEAR = MetaData()
clear_patients = Table(
    "bench_patients_clear",
    CLEAR,
    Column("id", String(36), primary_key=True),
    Column("name", String(128)),
    Column("phone", String(32), index=True),
    Column("national_id", String(32)),
    Column("record_number", String(32), unique=True),
    Column("birth_year", Integer),
    Column("department", String(64)),
    Column("created_at", String(32)),
    Column("updated_at", String(32)),
)


async def bench_writes(client: KeyServiceClient, store: KeyStore, url: str, rows: int) -> None:
    print(f"write path: {rows} patient rows, one transaction each ({db.mask_url(url)})")
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        CLEAR.create_all(engine)
        people = [person(i) for i in range(rows)]
        now = datetime.now(UTC).isoformat()

        def clear_insert(i: int) -> None:
            p = people[i]
            with engine.begin() as connection:
                connection.execute(insert(clear_patients).values(
                    id=str(uuid.uuid4()), name=p.name, phone=normalise_phone(p.phone), national_id=p.national_id,
                    record_number=p.record_number, birth_year=p.birth_year, department=p.department,
                    created_at=now, updated_at=now,
                ))  # fmt: skip

        clear = measure(clear_insert, rows, warm=0)
        ring = DataKeyRing(DataKeyStore.for_engine(engine), client)
        patients = PatientStore.for_engine(engine)
        key = await ring.current_key("patients")
        plain = await client.unwrap(key.wrapped, key.wrap_purpose)
        cipher = FieldCipher({key.version: plain}, key.version)

        def encrypted_insert(i: int) -> None:
            p = people[i].checked(datetime.now(UTC))
            patient_id = str(uuid.uuid4())
            patients.insert(
                patient_id=patient_id,
                blind_id=store.blind_index(patient_id, "patients.blind_id"),
                phone_bidx=store.blind_index(p.phone, "patients.phone"),
                record_bidx=store.blind_index(str(p.record_number), "patients.record_number"),
                tokens=encrypt_fields(cipher, patient_id, p),
                data_key_id=key.id,
                department=p.department,
                at=datetime.now(UTC),
            )

        encrypted = measure(encrypted_insert, rows, warm=0)
        registry = PatientRegistry(patients, ring, client)
        audit = AuditLog(SqlAuditStore(engine))
        audited_registry = PatientRegistry(patients, DataKeyRing(DataKeyStore.for_engine(engine), client, audit=audit),
                                           client, audit=audit)  # fmt: skip

        def renumbered(p: PatientInput, tag: str) -> PatientInput:
            return PatientInput(p.name, p.phone, p.national_id, f"{tag}{p.record_number}", p.birth_year, p.department)

        through_registry = await ameasure(
            lambda i: registry.upsert(renumbered(people[i], "R"), accessor="bench", role="system"), rows, warm=0
        )
        with_audit = await ameasure(
            lambda i: audited_registry.upsert(renumbered(people[i], "A"), accessor="bench", role="system"),
            rows, warm=0,
        )  # fmt: skip
        line("INSERT in clear (baseline)", clear)
        line("encrypted + blind indexes in process", encrypted, clear)
        line("PatientRegistry.upsert (key service)", through_registry, clear)
        line("PatientRegistry.upsert + audit entry", with_audit, clear)

        phones = [normalise_phone(p.phone) for p in people]

        def clear_lookup(i: int) -> None:
            with engine.connect() as connection:
                connection.execute(select(clear_patients.c.id).where(clear_patients.c.phone == phones[i % rows])).all()

        lookup_clear = measure(clear_lookup, rows)
        lookup = await ameasure(
            lambda i: registry.lookup_by_phone(people[i % rows].phone, accessor="ivr", role="system", reason="b"), rows
        )
        lookup_audited = await ameasure(
            lambda i: audited_registry.lookup_by_phone(people[i % rows].phone, accessor="ivr", role="system",
                                                       reason="caller identification"), rows,
        )  # fmt: skip
        line("SELECT ... WHERE phone = ? in clear (baseline)", lookup_clear)
        line("lookup_by_phone (blind index round trip)", lookup, lookup_clear)
        line("lookup_by_phone + audit entry (the IVR path)", lookup_audited, lookup_clear)
        with engine.connect() as connection:
            ids = list(connection.execute(text("SELECT id FROM patients ORDER BY id")).scalars())
        read = await ameasure(
            lambda i: audited_registry.get(ids[i % len(ids)], accessor="nurse.liu", role="nurse",
                                           reason="follow-up call"), min(rows, 500),
        )  # fmt: skip
        line("get + decrypt 5 fields + audit entry", read, lookup_clear)
    finally:
        engine.dispose()


@contextlib.contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    with db.scratch_postgres_database(admin_url, "medhotline_bench") as url:
        yield url


async def run(args: argparse.Namespace, workdir: Path) -> None:
    bench_fields(args.field_ops)
    print()
    async with key_service(workdir) as (client, store):
        await bench_key_service(client, store, args.round_trips)
        print()
        bench_audit(workdir, args.audit_entries, args.head_every)
        print()
        await bench_writes(client, store, f"sqlite:///{workdir / 'writes.db'}", args.rows)
        if args.postgres:
            print()
            with postgres_database(args.postgres) as url:
                await bench_writes(client, store, url, args.rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1000, help="patient rows per write variant (default 1000)")
    parser.add_argument("--field-ops", type=int, default=50_000, help="field encryptions/decryptions (default 50000)")
    parser.add_argument("--round-trips", type=int, default=5000, help="key service round trips (default 5000)")
    parser.add_argument("--audit-entries", type=int, default=2000, help="audit appends per variant (default 2000)")
    parser.add_argument("--head-every", type=int, default=100, help="sign a tree head every N entries (default 100)")
    parser.add_argument("--postgres", metavar="ADMIN_URL", help="also run the write path on PostgreSQL")
    args = parser.parse_args()
    configure_logging("warning")
    # A short path: the key service's Unix socket lives in it.
    workdir = Path(tempfile.mkdtemp(prefix="mhbench-"))
    try:
        asyncio.run(run(args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
