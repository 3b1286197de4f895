"""``medhotline demo``: the whole hotline on one machine, with simulated patients, and a summary.

Starts the sandboxed Asterisk, prepares the database and prompts, runs the service, lets SIPp patients call
the hotline over the ARI path and the FastAGI path, and prints what the phones observed next to what the
service recorded. Everything it started is stopped again unless ``--keep-running`` is given.
"""

from __future__ import annotations

import socket
from pathlib import Path

from medhotline import db
from medhotline.config import Config
from medhotline.phones import Press, place_call
from medhotline.prompts import build_prompts
from medhotline.sandbox import Sandbox
from medhotline.service_process import KeyServiceProcess, ServiceProcess

# A made-up caller number: the demo shows that it reaches neither the log nor the database.
DEMO_CALLER = "13800000000"

# What the simulated patients do: (dialled suffix, key presses, what it shows).
SCENES: list[tuple[str, list[Press], str]] = [
    ("", [Press(1500, "0")], "presses 0 during the greeting: straight to the emergency route (ARI)"),
    ("agi-", [Press(1500, "2")], "presses 2: medication guidance, pharmacist route (FastAGI)"),
    ("", [Press(1500, "3"), Press(2500, "3")], "3 then 3: vaccination, adverse reaction to medical staff"),
    ("agi-", [Press(1500, "7"), Press(2500, "8")], "wrong keys, then silence: retries, then a person"),
]


def free_udp_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def run_demo(config: Config, calls: int = 4, keep_running: bool = False, config_path: Path | None = None) -> int:
    sandbox = Sandbox(config)
    print("1/5 Asterisk sandbox (first run builds it with debootstrap, about a minute) …")
    status = sandbox.up()
    print(f"    {status.version}")
    print("2/5 database schema …")
    db.upgrade(config.database_url)
    print("3/5 prompts …")
    report = build_prompts(config)
    print(f"    {report.rendered} rendered, {report.cached} cached")
    print("4/5 key service and service …")
    state = config.service.state_dir
    state.mkdir(parents=True, exist_ok=True)
    keyservice = KeyServiceProcess(config, config_path, state / "demo-keyservice.log")
    keyservice.start()
    log_path = state / "demo-service.log"
    service = ServiceProcess(config, config_path, log_path)
    service.start()
    print(f"5/5 {calls} simulated patient call(s) …")
    observed = []
    try:
        for index in range(calls):
            prefix, presses, what = SCENES[index % len(SCENES)]
            number = prefix + config.hotline.number
            print(f"    patient {index + 1} {what}")
            host = config.asterisk.host
            phone = place_call(
                target_host=host,
                target_port=config.asterisk.sip_port,
                service=number,
                local_port=free_udp_port(host),
                media_port=free_udp_port(host),
                caller=DEMO_CALLER,
                presses=presses,
            )
            observed.append((number, phone))
    finally:
        if not keep_running:
            service.stop()
            keyservice.stop()
            sandbox.down()
    repo = db.CallRepository(db.make_sessionmaker(config.database_url))
    recent = list(reversed(repo.list_recent(len(observed))))
    print("\nWhat happened")
    failures = 0
    for (number, phone), record in zip(observed, recent, strict=False):
        heard = phone.stamps.get("HUNGUP_BY_SERVICE", 0) - phone.stamps.get("ANSWERED", 0)
        ok = phone.succeeded and record.outcome in ("routed", "completed", "transferred")
        failures += not ok
        route = f"{record.route_category} ({record.route_priority})" if record.route_category else "-"
        print(
            f"  {'OK ' if ok else 'FAIL'} dialled {number:<10} → {record.transport:<7} flow {record.flow} "
            f"({record.flow_version}), {heard:4.1f}s on the line: {record.outcome}, route {route}"
        )
        path = " → ".join(f"{step.node}[{step.input}]" if step.input else step.node for step in repo.steps(record.id))
        print(f"       path: {path}")
    leaked = DEMO_CALLER in log_path.read_text(errors="replace")
    print(f"  caller number in the service log: {'FOUND (bug!)' if leaked else 'never (redacted)'}")
    print(f"  service log: {log_path}\n  database: {db.mask_url(config.database_url)}")
    if keep_running:
        print("  still running: `medhotline asterisk down`, then stop `medhotline serve` and `medhotline keyservice`")
    return 1 if failures or leaked else 0
