"""``medhotline cluster config`` and ``medhotline cluster up``: the SIP front (Kamailio) of several nodes."""

from __future__ import annotations

import argparse
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import FrameType

from ground.config import Config
from ground.errors import EXIT_OK, CommandError
from medhotline.cluster_sandbox import ClusterSandbox
from medhotline.kamailio_config import CONFIG_NAME, TLS_NAME, FrontConfigError, write_front
from medhotline.prompts import build_prompts
from medhotline.sandbox import SandboxError


def _config(config: Config, args: argparse.Namespace) -> int:
    out: Path = args.out
    try:
        path = write_front(config.cluster.front, out)
    except FrontConfigError as exc:
        raise CommandError(str(exc)) from None
    tls = f" and {out.resolve() / TLS_NAME}" if config.cluster.front.tls_listen else ""
    print(f"wrote {path}, {out.resolve() / 'dispatcher.list'}{tls}")
    if args.check:
        check = subprocess.run(["kamailio", "-c", "-f", str(path)], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise CommandError(f"kamailio -c -f {path} refused it:\n{check.stderr[-2000:]}")
        print("kamailio -c: config file ok")
    return EXIT_OK


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _up(config: Config, args: argparse.Namespace) -> int:
    directory = Path(tempfile.mkdtemp(prefix="medhotline-front-"))
    services = not args.asterisk_only
    try:
        # The services read the same file as this process (found the same way) plus their node's variables.
        cluster = ClusterSandbox(config, args.nodes, directory, listen=args.listen, services=services)
    except SandboxError as exc:
        raise CommandError(f"cluster up: {exc}") from None
    # The flows' prompts, and the unavailable prompt a node plays without a service; render what is missing.
    build_prompts(cluster.nodes[0].config)
    signal.signal(signal.SIGTERM, _interrupt)
    cluster.up()
    try:
        for node in cluster.nodes:
            ast = node.config.asterisk
            serving = f"  service log {node.service.log_path}" if node.service is not None else ""
            tls = f" tls {node.tls_address}" if node.config.sip.tls else ""
            print(
                f"node {node.config.service.node_name}: sandbox {ast.sandbox.instance!r} SIP udp {node.sip_address}"
                f"{tls}  ARI {ast.host}:{ast.ari_port}  AMI {ast.host}:{ast.ami_port}{serving}"
            )
        front = cluster.front
        tls = f" and tls {front.tls_listen}" if front.tls_listen else ""
        print(
            f"front: Kamailio on udp {cluster.front_address}{tls}, to the nodes over {front.node_transport}"
            f" ({CONFIG_NAME} in {directory}); Ctrl-C stops all"
        )
        while True:
            time.sleep(3600)
    finally:
        for name, code in cluster.down().items():
            if code != 0:
                print(f"node {name}: its service exited with {code}; see its log")
        print("cluster stopped")


def _command(config: Config, args: argparse.Namespace) -> int:
    if args.action == "config":
        return _config(config, args)
    return _up(config, args)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cluster = sub.add_parser("cluster", help="the SIP front (Kamailio dispatcher) before several nodes")
    actions = cluster.add_subparsers(dest="action", required=True)
    cfg = actions.add_parser("config", help="generate kamailio.cfg + dispatcher.list from [cluster.front]")
    cfg.add_argument("--out", type=Path, default=Path("kamailio"), help="directory to write into (default ./kamailio)")
    cfg.add_argument("--check", action="store_true", help="also run `kamailio -c` on the result")
    up = actions.add_parser(
        "up", help="start N sandbox nodes (Asterisk + medhotline service each) and Kamailio before them (until Ctrl-C)"
    )
    up.add_argument(
        "--asterisk-only",
        action="store_true",
        help="no medhotline service on the nodes (their dialplans answer alone); no PostgreSQL needed",
    )
    up.add_argument("--nodes", type=int, default=2, help="number of nodes (default 2)")
    up.add_argument("--listen", help="the front's host:port (default cluster.front.listen)")
    cluster.set_defaults(func=_command)
