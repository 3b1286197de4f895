"""The wallboard's update latency: a call event until the wallboard's stream (SSE) delivers it to the client.

``python -m benchmarks.api`` runs real calls by default (``--real-calls 200``, baseline ``--baseline 10`` in the
same run; ``--smoke`` for the tests): SIPp patients and agent phones through the Asterisk sandbox, the service and
``medhotline api``; see :mod:`benchmarks.api_calls`.

``python -m benchmarks.api --simulated`` (``--calls``, ``--events``, ``--rate-simulated``), without the sandbox:
the same event source the wallboard listens to, driven at the rate 200 calls produce. ``--calls`` calls are
waiting in the queue throughout (the snapshot is as large as with that many concurrent calls), and
``--rate-simulated`` new call events a second are written as the service writes them (a
call row and its ``queued`` step); 200 calls with a 3-minute handling time make about one new call a second and
four to five events each, so the default 5/s is on the heavy side. The wallboard's stream (uvicorn on loopback,
signed in as an admin) is read by one client; an event's latency runs from its commit to the first ``board``
event whose ``today.received`` counts it. Baseline in the same run: a bare SSE echo over the same uvicorn and
client, which pushes each event's text the moment it is written (no database, no poll): what transport alone
costs. Figures compare within one run; the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from benchmarks import api_calls
from compliance.accounts import AccountStore
from compliance.credentials import CredentialStore
from ground import db
from medhotline.api import ApiSettings, create_app
from routing.statistics import StatsSettings

PASSWORD = "benchmark password 1"
FLOWS_DIR = Path(__file__).resolve().parents[1] / "dialplans"


async def _until(condition: Callable[[], bool], seconds: float) -> None:
    """Wait (polling every 50 ms) until ``condition`` holds or ``seconds`` have passed."""
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_call(calls: db.CallRepository, call_id: str, at: datetime) -> None:
    calls.start(call_id=call_id, node="node1", transport="ari", channel_id=f"ch-{call_id}",
                channel_name="PJSIP/patients-00000001", flow="hotline", flow_version=None,
                started_at=at - timedelta(seconds=5))  # fmt: skip
    calls.add_step(call_id, flow="queue", node="queued", node_type="queue", edge="general", input="normal",
                   at=at, moves_last_step=False)  # fmt: skip


async def _serve(app: Starlette, port: int) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    await _until(lambda: server.started, 30)
    return server, task


async def _read(client: httpx.AsyncClient, url: str, headers: dict[str, str], seen: dict[int, float],
                key: str, done: asyncio.Event) -> None:  # fmt: skip
    """Note when each counter value first shows on the stream (``key``: the JSON path's last name)."""
    async with client.stream("GET", url, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or done.is_set():
                if done.is_set():
                    return
                continue
            data = json.loads(line[6:])
            value = data["today"]["received"] if key == "received" else data.get("n")
            if isinstance(value, int):
                now = time.perf_counter()
                for n in range(value + 1):
                    seen.setdefault(n, now)


async def wallboard(directory: Path, calls: int, events: int, rate: float) -> list[float]:
    url = f"sqlite:///{directory / 'bench.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    now = datetime.now(UTC)
    AccountStore.for_engine(engine).add("admin.bench", "Bench", ["admin"], now)
    CredentialStore.for_engine(engine).set_password("admin.bench", PASSWORD, now)
    repo = db.CallRepository.for_engine(engine)
    for i in range(calls):
        _write_call(repo, f"bench-wait-{i}", now - timedelta(seconds=i % 300))
    app = create_app(ApiSettings(engine=engine, statistics=StatsSettings(), flows_dir=FLOWS_DIR))
    port = _free_port()
    server, task = await _serve(app, port)
    seen: dict[int, float] = {}
    written: dict[int, float] = {}
    done = asyncio.Event()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            login = await client.post("/api/login", json={"account": "admin.bench", "password": PASSWORD})
            headers = {"Authorization": f"Bearer {login.json()['token']}"}
            reader = asyncio.create_task(_read(client, "/api/wallboard/events", headers, seen, "received", done))
            await _until(lambda: calls in seen, 30)
            for k in range(1, events + 1):
                await asyncio.to_thread(_write_call, repo, f"bench-new-{k}", datetime.now(UTC))
                written[calls + k] = time.perf_counter()
                await asyncio.sleep(1 / rate)
            await _until(lambda: calls + events in seen, 10)
            done.set()
            reader.cancel()
    finally:
        server.should_exit = True
        await task
        engine.dispose()
    return [seen[n] - t for n, t in written.items() if n in seen]


async def echo(events: int, rate: float) -> list[float]:
    """The bare SSE echo: each event's text pushed at once to the one stream."""
    queue: asyncio.Queue[str] = asyncio.Queue()

    async def stream(request: Request) -> Response:
        async def lines() -> AsyncIterator[str]:
            yield "retry: 1000\n\n"
            while True:
                yield f"event: board\ndata: {await queue.get()}\n\n"

        return StreamingResponse(lines(), media_type="text/event-stream")

    port = _free_port()
    server, task = await _serve(Starlette(routes=[Route("/events", stream)]), port)
    seen: dict[int, float] = {}
    written: dict[int, float] = {}
    done = asyncio.Event()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            reader = asyncio.create_task(_read(client, "/events", {}, seen, "n", done))
            await asyncio.sleep(0.2)
            for k in range(1, events + 1):
                written[k] = time.perf_counter()
                queue.put_nowait(json.dumps({"n": k}))
                await asyncio.sleep(1 / rate)
            await asyncio.sleep(0.5)
            done.set()
            reader.cancel()
    finally:
        server.should_exit = True
        await task
    return [seen[n] - t for n, t in written.items() if n in seen]


def _p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def simulated(args: argparse.Namespace) -> None:
    directory = Path(tempfile.mkdtemp(prefix="medhotline-bench-api-"))
    try:
        board = asyncio.run(wallboard(directory, args.calls, args.events, args.rate_simulated))
        bare = asyncio.run(echo(args.events, args.rate_simulated))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    for name, values in (("wallboard (database → poll → SSE)", board), ("bare SSE echo (baseline)", bare)):
        print(f"{name}: {len(values)}/{args.events} events seen, p50 {_p(values, 50) * 1000:.0f} ms, "
              f"p99 {_p(values, 99) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms")  # fmt: skip
    print(
        f"{args.calls} calls waiting, {args.rate_simulated:g} events/s; the machine is shared, compare within this run"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.api", description=__doc__.splitlines()[0])
    api_calls.add_arguments(parser)
    parser.add_argument("--simulated", action="store_true",
                        help="no sandbox: events written to the database at the rate of --calls calls")  # fmt: skip
    parser.add_argument("--calls", type=int, default=200, help="--simulated: calls waiting throughout (default 200)")
    parser.add_argument("--events", type=int, default=100, help="--simulated: new call events written (default 100)")
    parser.add_argument("--rate-simulated", type=float, default=5.0, help="--simulated: events a second (default 5)")
    args = parser.parse_args(argv)
    if args.simulated:
        simulated(args)
        return 0
    return api_calls.run(args)


if __name__ == "__main__":
    sys.exit(main())
