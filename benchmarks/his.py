"""HIS link: caller identification by PDQ over MLLP against the simulated HIS, and the outbox drained to it.

Run ``python -m benchmarks.his`` (``--lookups``, ``--messages``). Baselines measured in the same run:

- PDQ: ``HisPatientDirectory.lookup_caller`` (QBP^Q22 over MLLP on loopback to ``his.simulator.SimulatedHis``,
  the answer cached in the encrypted registry) next to ``RegistryPatientDirectory.lookup_caller`` (the local
  registry alone: a blind-index lookup through the key service), same caller, same database; p50/p99 per lookup.
- PDQ over MLLP+TLS: against a second simulator behind TLS 1.2+ (a throwaway CA and a server certificate for
  127.0.0.1, made here; the handshake is done before timing, as the client keeps its connection), the bare
  QBP^Q22 -> RSP^K22 round trip (``MllpClient.request``) and the whole lookup (with the registry cache), next to a
  plain TCP echo of the same query's frame on loopback (no TLS, no HL7, no database): the network path's floor on
  this machine, in the same run.
- Outbox: ``--messages`` SIU^S12 queued (encrypted) and then drained to the simulator one by one as the sender
  does (decrypt, send, wait for AA, mark sent, audit), next to a bare MLLP round trip of the same messages
  (no outbox, no database): messages/s.

The key service runs in its own process (as in production); SQLite in a temporary directory. Figures compare
within one run on one host; the machine is shared, so absolute numbers move.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from benchmarks.crypto import key_service
from compliance.audit import AuditLog, SqlAuditStore
from compliance.data_keys import DataKeyRing, DataKeyStore
from ground import db
from ground.logs import configure_logging
from his.audit import Hl7Audit
from his.directory import RegistryPatientDirectory
from his.hl7 import Message
from his.messages import build_pdq_query, new_control_id
from his.mllp import encode_frame
from his.outbound import Appointment, build_siu
from his.outbox import Outbox
from his.outbox_store import OutboxStore
from his.pdq import HisPatientDirectory
from his.registry import PatientRegistry
from his.simulator import HOTLINE_PARTY, SIMULATOR_PARTY, SYNTHETIC_PATIENTS, SimulatedHis
from his.tables import PatientStore
from his.transport import Backoff, MllpClient, client_tls, server_tls
from ivr.memory_channel import InMemoryCallChannel
from telephony.channel import CallerId, CallInfo


def _ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered) * 1000:7.2f} ms   p99 {p99 * 1000:7.2f} ms"


def _caller(number: str) -> InMemoryCallChannel:
    return InMemoryCallChannel(info=CallInfo("bench", "PJSIP/trunk-1", "ari", "hotline", "12320", CallerId(number)))


def _siu(n: int) -> Message:
    start = datetime(2026, 12, 10, 1, 0, tzinfo=UTC) + timedelta(minutes=15 * n)
    appointment = Appointment(f"bench-{n}", start, start + timedelta(minutes=15), "FLU", "influenza", "EAST")
    return build_siu("S12", appointment, SYNTHETIC_PATIENTS[n % 3], sender=HOTLINE_PARTY, receiver=SIMULATOR_PARTY,
                     at=start, control_id=new_control_id())  # fmt: skip


def _tls_files(workdir: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench HIS CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
          .not_valid_after(now + timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))  # fmt: skip
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench HIS")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))  # fmt: skip
    paths = (workdir / "ca.pem", workdir / "server.pem", workdir / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths[2].chmod(0o600)
    return paths


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _echo_round_trips(payload: bytes, count: int) -> list[float]:
    """Plain TCP on loopback: write the frame, read as many bytes back. The floor under any MLLP round trip."""
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    samples: list[float] = []
    for _ in range(count):
        t0 = time.perf_counter()
        writer.write(payload)
        await writer.drain()
        await reader.readexactly(len(payload))
        samples.append(time.perf_counter() - t0)
    writer.close()
    server.close()
    await server.wait_closed()
    return samples


async def _tls_pdq(args: argparse.Namespace, workdir: Path, registry: PatientRegistry, audit: AuditLog) -> None:
    ca, cert, key = _tls_files(workdir)
    sim = SimulatedHis(tls=server_tls(cert, key))
    port = await sim.start()
    client = MllpClient("127.0.0.1", port, tls=client_tls(ca))
    his = HisPatientDirectory(client, registry, audit=Hl7Audit(audit), sender=HOTLINE_PARTY,
                              receiver=SIMULATOR_PARTY, budget=5.0)  # fmt: skip
    caller = _caller(SYNTHETIC_PATIENTS[0].phone)
    assert await his.lookup_caller(caller) is not None  # warm: handshake done, connection kept
    frame = encode_frame(build_pdq_query(SYNTHETIC_PATIENTS[0].phone, sender=HOTLINE_PARTY, receiver=SIMULATOR_PARTY,
                                         at=datetime.now(UTC), control_id=new_control_id()).encode())  # fmt: skip
    echo = await _echo_round_trips(frame, args.lookups)
    tls: list[float] = []
    bare: list[float] = []
    for _ in range(args.lookups):
        query = build_pdq_query(SYNTHETIC_PATIENTS[0].phone, sender=HOTLINE_PARTY, receiver=SIMULATOR_PARTY,
                                at=datetime.now(UTC), control_id=new_control_id())  # fmt: skip
        t0 = time.perf_counter()
        await client.request(query)
        t1 = time.perf_counter()
        await his.lookup_caller(caller)
        tls.append(time.perf_counter() - t1)
        bare.append(t1 - t0)
    await client.aclose()
    await sim.aclose()
    print(f"PDQ over MLLP+TLS, {args.lookups} lookups")
    print(f"  plain TCP echo of the query (baseline) {_ms(echo)}")
    print(f"  QBP^Q22 -> RSP^K22 over TLS, bare     {_ms(bare)}   ratio p50 "
          f"{statistics.median(bare) / statistics.median(echo):.1f}x")  # fmt: skip
    print(f"  PDQ over TLS + registry                {_ms(tls)}   ratio p50 "
          f"{statistics.median(tls) / statistics.median(echo):.1f}x")  # fmt: skip


async def run(args: argparse.Namespace, workdir: Path) -> None:
    url = f"sqlite:///{workdir / 'his.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    sim = SimulatedHis()
    port = await sim.start()
    async with key_service(workdir) as (keys, _):
        audit = AuditLog(SqlAuditStore(engine))
        ring = DataKeyRing(DataKeyStore.for_engine(engine), keys, audit=audit)
        registry = PatientRegistry(PatientStore.for_engine(engine), ring, keys, audit=audit)
        local = RegistryPatientDirectory(registry)
        client = MllpClient("127.0.0.1", port)
        his = HisPatientDirectory(client, registry, audit=Hl7Audit(audit), sender=HOTLINE_PARTY,
                                  receiver=SIMULATOR_PARTY, budget=5.0, fallback=local)  # fmt: skip
        caller = _caller(SYNTHETIC_PATIENTS[0].phone)
        assert await his.lookup_caller(caller) is not None  # warm: connection open, patient cached
        pdq: list[float] = []
        baseline: list[float] = []
        for _ in range(args.lookups):
            t0 = time.perf_counter()
            await local.lookup_caller(caller)
            t1 = time.perf_counter()
            await his.lookup_caller(caller)
            t2 = time.perf_counter()
            baseline.append(t1 - t0)
            pdq.append(t2 - t1)
        print(f"caller identification, {args.lookups} lookups of one caller (interleaved)")
        print(f"  local registry (baseline)             {_ms(baseline)}")
        print(f"  PDQ to the simulated HIS + registry   {_ms(pdq)}   ratio p50 "
              f"{statistics.median(pdq) / statistics.median(baseline):.2f}x")  # fmt: skip
        await _tls_pdq(args, workdir, registry, audit)

        messages = [_siu(n) for n in range(args.messages)]
        t0 = time.perf_counter()
        for m in messages:
            await client.request(m)
        bare = time.perf_counter() - t0
        outbox = Outbox(OutboxStore.for_engine(engine), ring, audit=Hl7Audit(audit), node="bench",
                        backoff=Backoff(0.01, 0.01))  # fmt: skip
        fresh = [_siu(n) for n in range(args.messages)]
        t0 = time.perf_counter()
        for m in fresh:
            await outbox.enqueue(m)
        queued = time.perf_counter() - t0
        t0 = time.perf_counter()
        sent = 0
        while (await outbox.send_next(client)).kind == "sent":
            sent += 1
        drained = time.perf_counter() - t0
        await client.aclose()
        assert sent == args.messages, f"drained {sent} of {args.messages}"
        print(f"outbox, {args.messages} SIU^S12")
        print(f"  bare MLLP round trips (baseline)      {args.messages / bare:8.0f} msg/s")
        print(f"  enqueue (encrypt + insert)            {args.messages / queued:8.0f} msg/s")
        print(f"  drain (decrypt, send, AA, mark, audit){args.messages / drained:8.0f} msg/s   "
              f"{drained / bare:.1f}x the baseline's time")  # fmt: skip
    await sim.aclose()
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--lookups", type=int, default=200, help="caller identifications per variant (default 200)")
    parser.add_argument("--messages", type=int, default=300, help="outbox messages drained (default 300)")
    args = parser.parse_args()
    configure_logging("warning")
    workdir = Path(tempfile.mkdtemp(prefix="mhbench-"))  # short: the key service's socket lives in it
    try:
        asyncio.run(run(args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
