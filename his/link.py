"""The HIS link of one node, built from ``config.his``: the PDQ directory and the outbox with its sender.

Two MLLP connections, one for caller identification and one for the outbox: HL7 original mode allows one
request in flight per connection, and a caller's identification must not queue behind an outbox message whose
reply the HIS is slow to send.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass

from ground.config import Config, HisConfig
from his.adt import AdtReceiver
from his.audit import Hl7Audit
from his.directory import PatientServices
from his.hl7 import Party
from his.outbox import AnswerHook, Outbox
from his.outbox_store import OutboxStore
from his.pdq import HisPatientDirectory
from his.producer import HisOutbound
from his.transport import Backoff, MllpClient, MllpServer, client_tls, server_tls


def his_client(his: HisConfig) -> MllpClient:
    """A client of the configured HIS endpoint (TLS, mutual when a certificate is configured)."""
    tls = client_tls(his.ca_file, his.cert_file, his.key_file) if his.tls and his.ca_file is not None else None
    return MllpClient(
        his.host,
        his.port,
        tls=tls,
        server_name=his.server_name or None,
        connect_timeout=his.connect_timeout,
        reply_timeout=his.reply_timeout,
        max_size=his.max_message_bytes,
        backoff=Backoff(his.backoff_initial, his.backoff_max),
    )


@dataclass
class HisLink:
    directory: HisPatientDirectory
    outbox: Outbox
    pdq_client: MllpClient
    outbox_client: MllpClient
    producer: HisOutbound  # what the scheduler and the CLI hand to the HIS (SIU, VXU, ORU) through the outbox

    async def run_sender(self) -> None:
        """Send the outbox until cancelled."""
        await self.outbox.run(self.outbox_client)

    async def aclose(self) -> None:
        await self.pdq_client.aclose()
        await self.outbox_client.aclose()


def open_his_link(config: Config, services: PatientServices, *, on_answer: AnswerHook | None = None) -> HisLink:
    """The link over the registry services (their key ring, audit log and database); ``on_answer`` is told of the
    HIS's final answer to each outbox message (the bookings follow it)."""
    his = config.his
    audit = Hl7Audit(services.audit)
    sender = Party(his.sending_application, his.sending_facility)
    receiver = Party(his.receiving_application, his.receiving_facility)
    pdq_client, outbox_client = his_client(his), his_client(his)
    directory = HisPatientDirectory(
        pdq_client,
        services.registry,
        audit=audit,
        sender=sender,
        receiver=receiver,
        budget=his.pdq_budget,
        fallback=services.directory,
    )
    outbox = Outbox(
        OutboxStore.for_engine(services.engine),
        services.ring,
        audit=audit,
        node=config.service.node_name,
        backoff=Backoff(his.backoff_initial, his.backoff_max),
        max_attempts=his.outbox_max_attempts,
        lease=max(60.0, his.reply_timeout * 3),
        on_answer=on_answer,
    )
    producer = HisOutbound(services.registry, outbox, sender=sender, receiver=receiver,
                           appointment_messages=his.appointment_messages)  # fmt: skip
    return HisLink(directory, outbox, pdq_client, outbox_client, producer)


async def start_adt_listener(config: Config, services: PatientServices) -> tuple[MllpServer, int] | None:
    """The hotline's MLLP listener for the HIS's ADT, from ``[his] listen_*``; None when ``listen_port`` is unset.

    Returns the started server and the port it listens on (``listen_port = 0`` picks a free one). The caller
    closes it (``MllpServer.aclose``: stops accepting and ends the open connections).
    """
    his = config.his
    if his.listen_port is None:
        return None
    tls = None
    if his.listen_cert_file is not None and his.listen_key_file is not None:
        tls = server_tls(his.listen_cert_file, his.listen_key_file, his.listen_client_ca_file)
    receiver = AdtReceiver(
        services.registry,
        audit=Hl7Audit(services.audit),
        sender=Party(his.sending_application, his.sending_facility),
    )
    server = MllpServer(
        receiver.handle,
        sender=Party(his.sending_application, his.sending_facility),
        tls=tls,
        max_size=his.max_message_bytes,
        observer=receiver.observe,
    )
    port = await server.start(his.listen_host, his.listen_port)
    return server, port


async def probe_his(his: HisConfig) -> str:
    """``up`` when the configured HIS accepts a connection (and its TLS handshake), else ``down: <why>``."""
    tls = client_tls(his.ca_file, his.cert_file, his.key_file) if his.tls and his.ca_file is not None else None
    try:
        async with asyncio.timeout(his.connect_timeout):
            _, writer = await asyncio.open_connection(
                his.host, his.port, ssl=tls, server_hostname=(his.server_name or his.host) if tls else None
            )
    except TimeoutError:
        return f"down: no connection within {his.connect_timeout} s"
    except ssl.SSLError as exc:
        return f"down: TLS: {exc.reason or type(exc).__name__}"
    except OSError as exc:
        return f"down: {exc.strerror or type(exc).__name__}"
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
        async with asyncio.timeout(1.0):
            await writer.wait_closed()
    return "up"
