"""Two sandbox Asterisk nodes behind Kamailio (``medhotline.cluster_sandbox``): calls spread over both, a node
whose Asterisk stops is taken out by the OPTIONS probes, and put back when it answers again.

No medhotline service runs on the nodes: each node's dialplan answers the hotline number on its own (Stasis
fails, the unavailable prompt plays, Asterisk hangs up), which is all the SIP routing needs. Which node took a
call is read from the Contact of its 200 OK: each node's Asterisk has its own SIP port.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ground.config import load_config
from medhotline.cluster_sandbox import ClusterSandbox, sip_options
from medhotline.free_ports import free_port
from medhotline.prompts import build_prompts

from .conftest import DIALPLANS, check_prerequisites, unavailable

TLS_MODULE = Path("/usr/lib/x86_64-linux-gnu/kamailio/modules/tls.so")

# A caller that follows the front's Record-Route (ACK and BYE go through Kamailio, [routes]/[next_url]) and logs
# the node that answered. It holds the call until the node hangs up, or hangs up itself after 4 s.
SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="call through the front">
  <send retrans="500">
    <![CDATA[
      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:front-test@[local_ip]:[local_port]>;tag=[pid]SIPpTag09[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: <sip:front-test@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000
    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
  <recv response="200" rrs="true">
    <action>
      <ereg regexp="sip:[^>;]*:([0-9]+)" search_in="hdr" header="Contact:" check_it="true"
            assign_to="contact,node_port"/>
      <log message="NODE [$node_port] from [$contact]"/>
    </action>
  </recv>
  <send>
    <![CDATA[
      ACK [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:front-test@[local_ip]:[local_port]>;tag=[pid]SIPpTag09[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      [routes]
      Contact: <sip:front-test@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv request="BYE" timeout="4000" ontimeout="hangup"/>
  <send next="end">
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:front-test@[local_ip]:[local_port]>
      Content-Length: 0

    ]]>
  </send>
  <label id="hangup"/>
  <send retrans="500">
    <![CDATA[
      BYE [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:front-test@[local_ip]:[local_port]>;tag=[pid]SIPpTag09[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 2 BYE
      [routes]
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200" crlf="true"/>
  <label id="end"/>
</scenario>
"""
_NODE = re.compile(r"^NODE (\d+) from ", re.MULTILINE)


def calls_through(cluster: ClusterSandbox, number: str, count: int, work: Path) -> Counter[int]:
    """Place ``count`` calls through the front, ten a second, all at once in flight; {node SIP port: calls}."""
    scenario = work / "front.xml"
    scenario.write_text(SCENARIO, encoding="utf-8")
    log_file = work / f"sipp-{time.monotonic_ns()}.log"
    args = ["sipp", f"{cluster.front_host}:{cluster.front_port}", "-sf", str(scenario), "-s", number]
    args += ["-i", "127.0.0.1", "-p", str(free_port(socket.SOCK_DGRAM)), "-mp", str(free_port(socket.SOCK_DGRAM))]
    args += ["-m", str(count), "-l", str(count), "-r", "10", "-nostdin", "-timeout", "30s", "-timeout_error"]
    args += ["-trace_logs", "-log_file", str(log_file), "-trace_err", "-error_file", str(work / "sipp-errors.log")]
    result = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=45,
        check=False,
    )
    found = Counter(int(port) for port in _NODE.findall(log_file.read_text() if log_file.exists() else ""))
    assert result.returncode == 0, f"sipp exit {result.returncode}, answered by {dict(found)}; {result.stderr[-800:]}"
    assert sum(found.values()) == count, found
    return found


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


@contextlib.contextmanager
def running_cluster(
    tmp_path: Path, instance: str, *, tls: bool = False, front_extra: str = ""
) -> Iterator[ClusterSandbox]:
    """Two sandbox nodes behind a front on a free UDP port; the sandbox instances are named ``instance`` and a
    number. ``tls``: the nodes have [sip] tls and the front reaches them over TLS (node_transport), its tls_listen
    and certificate paths left to the sandbox (a free port and its site CA's files) unless ``front_extra`` (more
    [cluster.front] keys) sets them."""
    check_prerequisites()
    if tls and (shutil.which("kamailio") is None or not TLS_MODULE.exists()):
        unavailable("kamailio or kamailio-tls-modules is not installed (scripts/bootstrap installs them)")
    if shutil.which("kamailio") is None:
        unavailable("kamailio is not installed (scripts/bootstrap installs it)")
    sip = "[sip]\ntls = true\n" if tls else ""
    node_transport = 'node_transport = "tls"\n' if tls else ""
    path = tmp_path / "medhotline.toml"
    path.write_text(
        f"""
[service]
state_dir = "{tmp_path}"
[asterisk.sandbox]
instance = "{instance}{time.monotonic_ns() % 10**8}"
[hotline]
flows_dir = "{DIALPLANS}"
[prompts]
speed = 240
{sip}[cluster.front]
listen = "127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
{node_transport}{front_extra}
""",
        encoding="utf-8",
    )
    config = load_config(path, environ={})
    cluster = ClusterSandbox(config, 2, tmp_path / "front")
    # The nodes' dialplans play this prompt before hanging up: rendered once, shared with the other tests.
    build_prompts(cluster.nodes[0].config)
    cluster.up()
    try:
        yield cluster
    finally:
        cluster.down()
        for node in cluster.nodes:
            shutil.rmtree(node.sandbox.instance_dir, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterSandbox]:
    with running_cluster(tmp_path, "front") as front:
        yield front


def test_front_spreads_calls_takes_a_dead_node_out_and_back(cluster: ClusterSandbox, tmp_path: Path) -> None:
    node_a, node_b = cluster.nodes
    port_a, port_b = node_a.config.asterisk.sip_port, node_b.config.asterisk.sip_port
    number = node_a.config.hotline.number

    # Calls in flight together go to the node with fewer calls: both nodes take some.
    spread = calls_through(cluster, number, 6, tmp_path)
    assert spread[port_a] >= 2, spread
    assert spread[port_b] >= 2, spread

    # Node B's Asterisk stops. Its probes go unanswered, and within a few seconds the front sends it nothing.
    node_b.sandbox.down()
    assert sip_options("127.0.0.1", port_b, 0.5) is None
    front = cluster.front
    time.sleep(front.ping_interval * front.probing_threshold + front.ping_timeout + 1)
    log_before = cluster.log_path.read_text(errors="replace")
    after = calls_through(cluster, number, 4, tmp_path)
    assert after == Counter({port_a: 4}), after
    # Taken out by the probes, not found dead by each call: no INVITE was even tried on node B.
    tried = cluster.log_path.read_text(errors="replace")[len(log_before) :]
    assert f"INVITE to sip:127.0.0.1:{port_b}" not in tried, tried[-2000:]
    assert tried.count(f"INVITE to sip:127.0.0.1:{port_a}") == 4, tried[-2000:]

    # Node B answers again: the next probe puts it back, and calls reach it again.
    node_b.sandbox.up()
    assert wait_until(lambda: sip_options("127.0.0.1", port_b, 0.5) is not None, 10)
    time.sleep(front.ping_interval * front.inactive_threshold + 1)
    back = calls_through(cluster, number, 4, tmp_path)
    assert back[port_b] >= 1, back
