"""A two-node RabbitMQ cluster of the test's own, and a replica on each node.

The fixture starts two RabbitMQ nodes on this machine beside the shared one
(``sq-a@localhost`` on 5682, ``sq-b@localhost`` on 5692, their own data, log
and plugin files in a temporary directory), joins ``sq-b`` to ``sq-a``, and
stops both and removes their files afterwards. The shared node on 5672 is not
touched. Two ``sessionq serve`` processes share one SQLite store: replica A is
given ``sq-a,sq-b`` and replica B ``sq-b,sq-a`` (SESSIONQ_BROKER_URL as a
list), so each sits on its own node.

When ``sq-a`` stops, replica A's exclusive queues die with it; replica A
connects to the next URL of its list, ``sq-b``, and recovers its sessions
from the store: its client gets every accepted request's final once, in seq
order, and replica B's client never notices.

Needs Debian's rabbitmq-server (scripts/sessionq installs it) and root or
password-less sudo (the nodes run as the ``rabbitmq`` user, with its Erlang
cookie, like the shared node). Deselect with ``-m "not cluster"``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import UNIT, Client, finals_of
from test_faults import ServerProcess, Start, open_client, start_server, wait_running

__all__ = ["start_server"]  # the fixture, shared with tests/test_faults.py

RABBITMQ_SERVER = "/usr/sbin/rabbitmq-server"
RABBITMQCTL = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
AS_RABBITMQ_ADMIN = [] if os.geteuid() == 0 else ["sudo", "-n"]

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.timeout(300),  # two node starts and a join take tens of seconds
    pytest.mark.skipif(
        not os.path.exists(RABBITMQ_SERVER),
        reason="needs Debian's rabbitmq-server (scripts/sessionq setup installs it)",
    ),
]


@dataclass(frozen=True)
class Node:
    short: str  # "sq-a": node sq-a@localhost
    port: int
    dist_port: int
    base: Path

    @property
    def name(self) -> str:
        return f"{self.short}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def pid_file(self) -> Path:
        return self.base / f"{self.short}.pid"

    def environment(self) -> list[str]:
        """RabbitMQ 3.10's variables for a node of its own beside the shared one."""
        return [
            f"RABBITMQ_NODENAME={self.name}",
            "RABBITMQ_NODE_IP_ADDRESS=127.0.0.1",
            f"RABBITMQ_NODE_PORT={self.port}",
            f"RABBITMQ_DIST_PORT={self.dist_port}",
            f"RABBITMQ_MNESIA_BASE={self.base / self.short / 'mnesia'}",
            f"RABBITMQ_LOG_BASE={self.base / self.short / 'log'}",
            f"RABBITMQ_PID_FILE={self.pid_file}",
            # No plugins (management, web-stomp ...) and no machine-wide
            # config: nothing else listens, nothing collides with the shared node.
            f"RABBITMQ_ENABLED_PLUGINS_FILE={self.base / 'enabled_plugins'}",
            f"RABBITMQ_CONFIG_FILE={self.base / 'rabbitmq.conf'}",
            f"RABBITMQ_CONFIG_FILES={self.base / 'conf.d'}",
        ]

    def ctl(self, *args: str, timeout: float = 120) -> str:
        run = subprocess.run(
            [*AS_RABBITMQ_ADMIN, RABBITMQCTL, "-q", "-n", self.name, *args],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if run.returncode != 0:
            raise RuntimeError(f"rabbitmqctl -n {self.name} {' '.join(args)}: {run.stderr}")
        return run.stdout

    def running(self) -> bool:
        try:
            self.ctl("status", timeout=30)
        except (RuntimeError, subprocess.TimeoutExpired):
            return False
        return True


@dataclass(frozen=True)
class Cluster:
    a: Node
    b: Node

    def connections(self, via: Node) -> list[str]:
        """The node of every client connection in the cluster, asked of ``via``."""
        pids = via.ctl("list_connections", "pid", "--no-table-headers").split()
        return sorted(pid.strip("<>").rsplit(".", 3)[0] for pid in pids)  # <node.x.y.z>


def _own_pid(node: Node) -> str | None:
    """The pid in ``node``'s pid file while that process is still this node
    (started with this node's name and directory), else None."""
    try:
        pid = node.pid_file.read_text().strip()
    except OSError:
        return None
    environ = subprocess.run(
        [*AS_RABBITMQ_ADMIN, "cat", f"/proc/{pid}/environ"], capture_output=True, check=False
    ).stdout.split(b"\0")
    mine = f"RABBITMQ_MNESIA_BASE={node.base / node.short / 'mnesia'}".encode()
    return pid if pid.isdigit() and mine in environ else None


def _stop(node: Node, server: subprocess.Popen[bytes] | None) -> None:
    """Stop a node (waiting until its process is gone); kill it if it hangs."""
    if _own_pid(node) is not None:
        try:
            node.ctl("stop", str(node.pid_file), timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired):
            if (pid := _own_pid(node)) is not None:
                subprocess.run([*AS_RABBITMQ_ADMIN, "kill", "-9", pid], check=False)
    if server is not None:
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    base = Path(tempfile.mkdtemp(prefix="sessionq-cluster-"))
    base.chmod(0o755)  # the nodes run as the rabbitmq user: it must reach its files
    (base / "enabled_plugins").write_text("[].\n")
    (base / "rabbitmq.conf").write_text("# nodes of tests/test_broker_cluster.py\n")
    (base / "conf.d").mkdir()
    a = Node("sq-a", 5682, 25682, base)
    b = Node("sq-b", 5692, 25692, base)
    servers: dict[Node, subprocess.Popen[bytes]] = {}
    try:
        for node in (a, b):
            # A node of an earlier run that died before its teardown: it holds
            # the name and the ports, and it is this test's to stop.
            if node.running():
                node.ctl("stop", timeout=60)
        subprocess.run([*AS_RABBITMQ_ADMIN, "chown", "-R", "rabbitmq:rabbitmq", str(base)],
                       check=True)  # fmt: skip
        for node in (a, b):
            log = open(base / f"{node.short}.out", "wb")
            servers[node] = subprocess.Popen(
                [*AS_RABBITMQ_ADMIN, "env", *node.environment(), RABBITMQ_SERVER],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            log.close()
        for node in (a, b):
            # Returns once the pid file is written and the node has booted
            # (fails at once if the node's process dies).
            try:
                node.ctl("wait", str(node.pid_file), "--timeout", "90", timeout=120)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                output = (base / f"{node.short}.out").read_text(errors="replace")
                raise RuntimeError(
                    f"{node.name} did not start ({exc}):\n{output[-3000:]}"
                ) from None
        b.ctl("stop_app")
        b.ctl("join_cluster", a.name)
        b.ctl("start_app")
        status = json.loads(a.ctl("cluster_status", "--formatter", "json"))
        assert sorted(status["running_nodes"]) == [a.name, b.name], status
        yield Cluster(a, b)
    finally:
        for node in (b, a):
            _stop(node, servers.get(node))
        subprocess.run([*AS_RABBITMQ_ADMIN, "rm", "-rf", str(base)], check=False)


def ready(server: ServerProcess) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/readyz", timeout=UNIT) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def submit_and_wait(client: Client, rid: str, value: Any) -> dict[str, Any]:
    await client.submit(rid, "echo", {"v": value})
    (final,) = finals_of(await client.finals(1))
    assert final["id"] == rid and final["value"] == {"v": value}, final
    return final


async def test_replicas_on_two_nodes_and_a_node_that_stops(
    cluster: Cluster, start_server: Start
) -> None:
    a, b = cluster.a, cluster.b
    replica_a = await start_server(broker_url=f"{a.url},{b.url}")
    replica_b = await start_server(broker_url=f"{b.url},{a.url}")
    # Each replica took the first URL of its own list: one connection per node.
    assert await asyncio.to_thread(cluster.connections, a) == [a.name, b.name]

    # A session on each replica works.
    on_a = await open_client(replica_a)
    on_b = await open_client(replica_b)
    assert (await submit_and_wait(on_a, "a1", 1))["seq"] == 1
    assert (await submit_and_wait(on_b, "b1", 1))["seq"] == 1

    # Replica A: a2 running, a3..a5 queued behind it, all accepted.
    await on_a.submit("a2", "test.attempt", {"seconds": 1})
    for i in range(3, 6):
        await on_a.submit(f"a{i}", "echo", {"v": i})
    await on_a.recv_until(lambda f: f.get("id") == "a5" and f["type"] == "accepted")
    await wait_running(on_a, "a2")

    # sq-a goes away, and with it every queue of replica A.
    await asyncio.to_thread(a.ctl, "stop", str(a.pid_file))
    finals = finals_of(await on_a.finals(4, timeout=6 * UNIT))
    assert [(f["seq"], f["id"], f["type"]) for f in finals] == [
        (2, "a2", "result"), (3, "a3", "result"), (4, "a4", "result"), (5, "a5", "result")
    ]  # fmt: skip
    assert [f["value"] for f in finals[1:]] == [{"v": 3}, {"v": 4}, {"v": 5}]

    # Replica A now lives on sq-b, beside replica B, and both are ready.
    assert await asyncio.to_thread(cluster.connections, b) == [b.name, b.name]
    assert await asyncio.to_thread(ready, replica_a) == 200
    assert await asyncio.to_thread(ready, replica_b) == 200
    # Both sessions go on where they were; no final came twice.
    assert (await submit_and_wait(on_a, "a6", 6))["seq"] == 6
    assert (await submit_and_wait(on_b, "b2", 2))["seq"] == 2
    await on_a.close()
    await on_b.close()
