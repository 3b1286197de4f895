"""The HIS link of one node, built from ``config.his``: the PDQ directory and the outbox with its sender.

Two MLLP connections, one for caller identification and one for the outbox: HL7 original mode allows one
request in flight per connection, and a caller's identification must not queue behind an outbox message whose
reply the HIS is slow to send.
"""

from __future__ import annotations

from dataclasses import dataclass

from ground.config import Config, HisConfig
from his.audit import Hl7Audit
from his.directory import PatientServices
from his.hl7 import Party
from his.outbox import AnswerHook, Outbox
from his.outbox_store import OutboxStore
from his.pdq import HisPatientDirectory
from his.producer import HisOutbound
from his.transport import Backoff, MllpClient, client_tls


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
    producer = HisOutbound(services.registry, outbox, sender=sender, receiver=receiver)
    return HisLink(directory, outbox, pdq_client, outbox_client, producer)
