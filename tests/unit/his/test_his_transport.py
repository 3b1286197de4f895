"""MLLP client and server over real loopback sockets, with mutual TLS, timeouts, reconnect and bad input."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from his.hl7 import Hl7Error, Message, Party, parse
from his.messages import Ack, build_ack, build_pdq_query, read_ack
from his.mllp import MllpDecoder, encode_frame
from his.transport import (
    Backoff,
    HisTimeout,
    HisUnavailable,
    MllpClient,
    MllpServer,
    client_tls,
    server_tls,
)
from tests.unit.his.conftest import TlsFiles

HIS = Party("HIS", "HOSPITAL")
HOTLINE = Party("MEDHOTLINE", "HOTLINE")
AT = datetime(2026, 12, 9, 8, 30, tzinfo=UTC)


def ack_of(reply: Message) -> Ack:
    """The acknowledgement in ``reply``, whatever control id it acknowledges."""
    return read_ack(reply, reply.value(reply.all("MSA")[0], 2))


def query(control_id: str) -> Message:
    return build_pdq_query("5550100", sender=HOTLINE, receiver=HIS, at=AT, control_id=control_id)


async def accept_all(message: Message) -> Message:
    if message.trigger == "Z99":
        raise RuntimeError("handler bug quoting 5550100")
    if message.first("QPD") is None:
        raise Hl7Error("QPD", "QBP^Q22 without a QPD segment", "100")
    return build_ack(message, "AA", sender=HIS, at=datetime.now(UTC))


@pytest.fixture
async def tls_server(tls_files: TlsFiles) -> AsyncIterator[tuple[int, list[tuple[str | None, str]]]]:
    seen: list[tuple[str | None, str]] = []

    async def observe(message: Message | None, reply: Message, error: Hl7Error | None) -> None:
        seen.append(
            (None if message is None else message.control_id, read_ack(reply, reply.value(reply.all("MSA")[0], 2)).code)
        )

    server = MllpServer(
        accept_all,
        sender=HIS,
        tls=server_tls(tls_files.server_cert, tls_files.server_key, tls_files.ca),
        observer=observe,
        max_size=4096,
    )
    port = await server.start("127.0.0.1", 0)
    try:
        yield port, seen
    finally:
        await server.aclose()


def mutual_client(tls_files: TlsFiles, port: int, **kwargs: object) -> MllpClient:
    tls = client_tls(tls_files.ca, tls_files.client_cert, tls_files.client_key)
    return MllpClient("127.0.0.1", port, tls=tls, **kwargs)  # type: ignore[arg-type]


async def test_a_query_over_mutual_tls_is_acknowledged(
    tls_files: TlsFiles, tls_server: tuple[int, list[tuple[str | None, str]]]
) -> None:
    port, seen = tls_server
    client = mutual_client(tls_files, port)
    try:
        for n in ("MHFIRST", "MHSECOND"):
            reply = await client.request(query(n))
            assert read_ack(reply, n).accepted
    finally:
        await client.aclose()
    assert seen == [("MHFIRST", "AA"), ("MHSECOND", "AA")]


async def test_a_client_without_a_certificate_is_refused(
    tls_files: TlsFiles, tls_server: tuple[int, list[tuple[str | None, str]]]
) -> None:
    port, seen = tls_server
    for tls in (client_tls(tls_files.ca), client_tls(tls_files.ca, tls_files.rogue_cert, tls_files.rogue_key)):
        client = MllpClient("127.0.0.1", port, tls=tls, reply_timeout=5)
        with pytest.raises(HisUnavailable):
            await client.request(query("MHNOCERT"))
        await client.aclose()
    assert seen == []


async def test_a_server_of_another_ca_is_not_trusted(tls_files: TlsFiles) -> None:
    rogue = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    rogue.load_cert_chain(tls_files.rogue_cert, tls_files.rogue_key)
    server = MllpServer(accept_all, sender=HIS, tls=rogue)
    port = await server.start()
    client = mutual_client(tls_files, port)
    try:
        with pytest.raises(HisUnavailable, match="TLS"):
            await client.request(query("MHROGUE"))
    finally:
        await client.aclose()
        await server.aclose()


async def raw_exchange(tls_files: TlsFiles, port: int, wire: bytes, frames: int) -> list[Message]:
    """Send raw bytes over TLS and collect ``frames`` replies (the connection must stay usable)."""
    tls = client_tls(tls_files.ca, tls_files.client_cert, tls_files.client_key)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    decoder = MllpDecoder()
    replies: list[Message] = []
    try:
        writer.write(wire)
        await writer.drain()
        async with asyncio.timeout(10):
            while len(replies) < frames:
                data = await reader.read(65536)
                assert data, "the server closed the connection"
                replies += [parse(e.payload) for e in decoder.feed(data) if not hasattr(e, "reason")]
    finally:
        writer.close()
    return replies


async def test_bad_input_is_answered_naming_where_and_the_connection_survives(
    tls_files: TlsFiles, tls_server: tuple[int, list[tuple[str | None, str]]]
) -> None:
    port, seen = tls_server
    good = query("MHGOOD").encode()
    wire = (
        b"garbage before any frame\r"
        + encode_frame(b"MSH|^~|A|B\r")  # encoding characters
        + encode_frame(good.split(b"\rQPD")[0] + b"\r")  # no QPD
        + encode_frame(b"Z" * 5000)  # over max_size
        + encode_frame(good.replace(b"QBP^Q22", b"QBP^Z99"))  # handler failure
        + encode_frame(good)
    )
    replies = await raw_exchange(tls_files, port, wire, 5)
    acks = [ack_of(r) for r in replies]
    assert [(a.code, a.location) for a in acks] == [
        ("AR", "MSH-2"),
        ("AR", "QPD"),
        ("AR", "MSH"),
        ("AE", "MSH"),
        ("AA", ""),
    ]
    assert acks[-1].acknowledged == "MHGOOD"
    assert all("5550100" not in a.text for a in acks)
    assert [code for _, code in seen] == ["AR", "AR", "AR", "AE", "AA"]


async def test_a_stream_cut_mid_frame_does_not_stop_the_server(
    tls_files: TlsFiles, tls_server: tuple[int, list[tuple[str | None, str]]]
) -> None:
    port, _ = tls_server
    tls = client_tls(tls_files.ca, tls_files.client_cert, tls_files.client_key)
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    writer.write(b"\x0bMSH|^~\\&|half a mess")
    await writer.drain()
    writer.close()
    client = mutual_client(tls_files, port)
    try:
        assert read_ack(await client.request(query("MHAFTER")), "MHAFTER").accepted
    finally:
        await client.aclose()


async def test_a_silent_his_times_out_and_the_client_reconnects(tls_files: TlsFiles) -> None:
    release = asyncio.Event()

    async def slow_then_fast(message: Message) -> Message:
        if message.control_id == "MHSLOW":
            await release.wait()
        return build_ack(message, "AA", sender=HIS, at=datetime.now(UTC))

    server = MllpServer(slow_then_fast, sender=HIS, tls=server_tls(tls_files.server_cert, tls_files.server_key))
    port = await server.start()
    client = MllpClient("127.0.0.1", port, tls=client_tls(tls_files.ca), reply_timeout=0.2)
    try:
        with pytest.raises(HisTimeout):
            await client.request(query("MHSLOW"))
        assert not client.connected
        release.set()
        # The late reply to MHSLOW went to the dropped connection, never to this request.
        assert read_ack(await client.request(query("MHNEXT")), "MHNEXT").accepted
    finally:
        await client.aclose()
        await server.aclose()


async def test_a_down_his_is_refused_fast_during_backoff_and_reached_after() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()  # nothing listens on this port now
    client = MllpClient("127.0.0.1", port, backoff=Backoff(initial=0.3, maximum=0.3))
    with pytest.raises(HisUnavailable, match="cannot connect"):
        await client.request(query("MHDOWN1"))
    with pytest.raises(HisUnavailable, match="next connection attempt"):
        await client.request(query("MHDOWN2"))
    server = MllpServer(accept_all, sender=HIS)
    await server.start("127.0.0.1", port)
    try:
        await asyncio.sleep(0.35)
        assert read_ack(await client.request(query("MHUP")), "MHUP").accepted
    finally:
        await client.aclose()
        await server.aclose()
