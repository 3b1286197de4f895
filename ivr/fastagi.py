"""``CallChannel`` over FastAGI, for hospitals whose dialplan sends calls to ``AGI(agi://…)``.

Wire parsing is kept apart from connection handling (panoramisk's layout). We use panoramisk's AGI result
parser, but not its ``Application`` accept loop: that loop reads headers with ``while b"\\n\\n" not in buffer``
and spins forever on a connection that closes early (``read`` keeps returning ``b""``), so one port scan
would pin a core. Here headers are read with a size limit and a timeout (see docs/decisions.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from panoramisk.utils import parse_agi_result

from ground.logs import get_logger
from telephony.channel import (
    DIGITS,
    CallerHungUp,
    CallerId,
    CallInfo,
    ChannelError,
    ConnectionLost,
    check_recording_name,
)

log = get_logger(__name__)

MAX_HEADER_BYTES = 16 * 1024
HEADER_TIMEOUT = 10.0
COMMAND_TIMEOUT = 600.0
# MixMonitor puts a relative file name under astspooldir/monitor; one level up is astspooldir/recording, where
# ARI's recordings go too, so both transports leave a recording in the same place.
MIXMONITOR_DIR = "../recording"
# MixMonitor stores its id here (option i), so StopMixMonitor can stop this recording and no other (a whole-call
# recording the dialplan may run stays untouched).
MIXMONITOR_ID_VAR = "MEDHOTLINE_MIXMONITOR_ID"
_MIXMONITOR_ID = re.compile(r"^[A-Za-z0-9_.:/-]{1,200}$")


class FastAgiProtocolError(ChannelError):
    """What arrived on the FastAGI socket is not the AGI protocol."""


async def read_agi_headers(reader: asyncio.StreamReader, limit_seconds: float = HEADER_TIMEOUT) -> dict[str, str]:
    """Read the ``agi_*: value`` block that opens a FastAGI session (ends with an empty line)."""
    headers: dict[str, str] = {}
    total = 0
    async with asyncio.timeout(limit_seconds):
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # one line longer than the stream's 64 KiB buffer limit
                raise FastAgiProtocolError(f"AGI headers exceed {MAX_HEADER_BYTES} bytes") from None
            if not line:
                raise FastAgiProtocolError("connection closed before the AGI headers ended")
            total += len(line)
            if total > MAX_HEADER_BYTES:
                raise FastAgiProtocolError(f"AGI headers exceed {MAX_HEADER_BYTES} bytes")
            text = line.decode("utf-8", errors="replace").rstrip("\r\n")
            if not text:
                break
            key, sep, value = text.partition(": ")
            if not sep or not key.startswith("agi_"):
                raise FastAgiProtocolError(f"line {len(headers) + 1} of the AGI headers is not 'agi_name: value'")
            headers[key] = value
    if "agi_channel" not in headers or "agi_uniqueid" not in headers:
        raise FastAgiProtocolError("AGI headers lack agi_channel/agi_uniqueid")
    return headers


def script_name(headers: dict[str, str]) -> str:
    """The flow named in ``agi://host:port/<flow>``."""
    return headers.get("agi_network_script", "").strip("/").split("?", 1)[0]


class FastAgiCallChannel:
    """One call driven over a FastAGI socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, info: CallInfo) -> None:
        self._reader = reader
        self._writer = writer
        self._info = info
        self._hung_up = False
        self._mixmonitors: dict[str, str] = {}  # recording name → MixMonitor id, while it runs

    @property
    def info(self) -> CallInfo:
        return self._info

    async def command(self, command: str) -> dict[str, Any]:
        """Send one AGI command and return panoramisk's parsed result; hang-ups become CallerHungUp."""
        if self._hung_up:
            raise CallerHungUp("caller hung up")
        try:
            self._writer.write(command.encode() + b"\n")
            await self._writer.drain()
            async with asyncio.timeout(COMMAND_TIMEOUT):
                while True:
                    line = await self._reader.readline()
                    if not line.endswith(b"\n"):  # EOF, possibly in the middle of the result line
                        self._hung_up = True
                        raise CallerHungUp("caller hung up (AGI socket closed)")
                    text = line.decode("utf-8", errors="replace").rstrip("\r\n")
                    if text == "HANGUP":  # Asterisk's notice that the channel hung up; the result follows
                        self._hung_up = True
                        continue
                    result: dict[str, Any] = parse_agi_result(text)
                    if result.get("status_code") == 100:  # "100 Trying...": the real result follows
                        continue
                    break
        except (ConnectionError, OSError) as exc:
            raise ConnectionLost(f"FastAGI socket failed: {type(exc).__name__}") from None
        except ValueError:
            raise FastAgiProtocolError("unparseable AGI result line") from None
        if (
            result.get("status_code") == 511
            or result.get("error") == "AGIResultHangup"
            or (self._hung_up and "error" in result)
        ):
            self._hung_up = True
            raise CallerHungUp("caller hung up")
        if "error" in result:
            # result=-1 means "failed or hung up", and Asterisk may send its HANGUP notice after the result. A
            # status probe settles it: on a dead channel it is refused (511) or answered with HANGUP.
            if result.get("error") == "AGIAppError" and not command.startswith("CHANNEL STATUS"):
                await self.command("CHANNEL STATUS")
            raise ChannelError(f"AGI {command.split(maxsplit=1)[0]} failed: {result['error']}")
        return result

    async def answer(self) -> None:
        await self.command("ANSWER")

    async def play(self, sound: str, *, barge_in: bool = False) -> str | None:
        result = await self.command(f'STREAM FILE {sound} "{DIGITS if barge_in else ""}"')
        return _digit(result)

    async def read_digits(self, *, max_digits: int, timeout: float, terminator: str | None = None) -> str:
        digits = ""
        while len(digits) < max_digits:
            digit = _digit(await self.command(f"WAIT FOR DIGIT {int(timeout * 1000)}"))
            if digit is None or (terminator is not None and digit == terminator):
                break
            digits += digit
        return digits

    async def set_variable(self, name: str, value: str) -> None:
        await self.command(f'SET VARIABLE {name} "{value}"')

    async def transfer(self, extension: str, trunk: str | None = None) -> None:
        # Where the dialplan continues once this AGI session ends.
        await self.set_variable("MEDHOTLINE_TRUNK", trunk or "")
        await self.command("SET CONTEXT medhotline-transfer")
        await self.command(f"SET EXTENSION {extension}")
        await self.command("SET PRIORITY 1")
        self._hung_up = True  # nothing more to send on this session

    async def hand_over(self, context: str, variables: Mapping[str, str]) -> None:
        """Leave the IVR for ``context`` (extension ``s``) with ``variables`` set: e.g. the ARI queue, which a
        FastAGI session can't provide itself (bridging needs ARI)."""
        for name, value in variables.items():
            await self.set_variable(name, value)
        await self.command(f"SET CONTEXT {context}")
        await self.command("SET EXTENSION s")
        await self.command("SET PRIORITY 1")
        self._hung_up = True  # nothing more to send on this session

    async def hangup(self) -> None:
        if self._hung_up:
            return
        with contextlib.suppress(ChannelError):
            await self.command("HANGUP")
        self._hung_up = True

    async def start_recording(self, name: str) -> None:
        """MixMonitor both directions of the call into ``astspooldir/recording/<name>.wav`` (8 kHz WAV: the
        ``.wav`` extension chooses the format). Options: only ``i``, for the id. Not ``b`` (it would record only
        while bridged, and an IVR call is not), not ``a`` (a recording never extends an older file); MixMonitor
        writes the file as the call goes, with no other option needed."""
        check_recording_name(name)
        if name in self._mixmonitors:
            raise ChannelError(f"recording {name!r} is already running on this call")
        # Clear the id variable first: a value left by an earlier recording must not pass for this one's.
        await self.set_variable(MIXMONITOR_ID_VAR, "")
        await self.command(f"EXEC MixMonitor {MIXMONITOR_DIR}/{name}.wav,i({MIXMONITOR_ID_VAR})")
        result = await self.command(f"GET VARIABLE {MIXMONITOR_ID_VAR}")
        code, value = _variable(result)
        if code != "1" or not value or not _MIXMONITOR_ID.match(value):
            # MixMonitor sets the id only when its recording thread started.
            raise ChannelError(f"MixMonitor did not start recording {name!r}")
        self._mixmonitors[name] = value

    async def stop_recording(self, name: str) -> None:
        """StopMixMonitor for this recording only; it closes the file before it returns. After a hang-up there is
        nothing to send (Asterisk ended the MixMonitor with the channel)."""
        check_recording_name(name)
        mixmonitor = self._mixmonitors.pop(name, None)
        if mixmonitor is None or self._hung_up:
            return
        with contextlib.suppress(CallerHungUp):  # hung up meanwhile: the recording ended with the call
            await self.command(f"EXEC StopMixMonitor {mixmonitor}")


def _caller_number(headers: dict[str, str]) -> str:
    number = headers.get("agi_callerid", "").strip()
    return "" if number == "unknown" else number


def _variable(result: dict[str, Any]) -> tuple[str, str]:
    """GET VARIABLE's answer: ("1", value) when set (``200 result=1 (value)``), ("0", "") when not."""
    raw = result.get("result", ("0", ""))
    if isinstance(raw, tuple | list) and len(raw) == 2:
        return str(raw[0]), str(raw[1])
    return str(raw), ""


def _digit(result: dict[str, Any]) -> str | None:
    """AGI reports a key as its ASCII code in ``result``; 0 means none was pressed."""
    value = result.get("result", ("0", ""))[0]
    try:
        code = int(value)
    except (TypeError, ValueError):
        return None
    return chr(code) if code > 0 and chr(code) in DIGITS else None


CallHandler = Callable[[FastAgiCallChannel], Awaitable[None]]


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: CallHandler) -> None:
    """One FastAGI session: headers, then the call, then close. Never raises."""
    peer = writer.get_extra_info("peername")
    try:
        headers = await read_agi_headers(reader)
        info = CallInfo(
            channel_id=headers["agi_uniqueid"],
            channel_name=headers["agi_channel"],
            transport="fastagi",
            flow=script_name(headers),
            dialed=headers.get("agi_dnid", headers.get("agi_extension", "")),
            caller=CallerId(
                headers.get("agi_callerid", "").strip() if headers.get("agi_callerid") != "unknown" else ""
            ),
        )
        await handler(FastAgiCallChannel(reader, writer, info))
    except (FastAgiProtocolError, TimeoutError) as exc:
        log.warning("fastagi.bad_session", peer=str(peer), reason=str(exc) or type(exc).__name__)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def start_server(host: str, port: int, handler: CallHandler) -> asyncio.Server:
    try:
        return await asyncio.start_server(lambda r, w: serve_connection(r, w, handler), host, port)
    except OSError as exc:
        raise ChannelError(f"FastAGI cannot listen on {host}:{port} (fastagi.port): {exc.strerror}") from None
