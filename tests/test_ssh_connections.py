"""The controller's SSH connections against a real node that answers slowly.

A loaded laptop can make one SSH handshake slow: every stage within its own
SSH_TIMEOUT, but the whole longer than the tick waits (SSH_TIMEOUT + 1 s). The
tick then gives up on that node's worker, and the next tick opens a fresh
connection. The late worker must change nothing when it finally connects: it used
to install its own connection and close the fresh one in the middle of a command,
so a healthy node looked down and its containers moved.

Here the node is a real sshd behind a TCP proxy that delays everything the node
sends on the first connection; the test calls the controller's own SSH machinery
(machinery.Nodes).
"""

import os
import queue
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machinery  # noqa: E402
from sshd_nodes import SSHD, SshdCluster, wait_until  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("CI") != "true"
    and not (os.path.exists(SSHD) and shutil.which("ssh-keygen") and os.getuid() == 0),
    reason="needs root and OpenSSH (apt-get install -y openssh-server)")


class SlowProxy:
    """A TCP proxy to a node; the connections marked slow get the node's bytes `delay` late."""

    def __init__(self, upstream_port, delay):
        self.upstream = ("127.0.0.1", upstream_port)
        self.delay = delay
        self.slow_next = 0  # how many of the next connections are slow
        self.closed_by_client = []  # one Event per accepted connection, in order
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            slow, self.slow_next = self.slow_next > 0, max(0, self.slow_next - 1)
            closed = threading.Event()
            self.closed_by_client.append(closed)
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, 0, closed), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, self.delay if slow else 0, None),
                             daemon=True).start()

    def _pump(self, source, sink, delay, closed):
        """Copy source to sink, each chunk `delay` seconds after it arrived, in order."""
        chunks = queue.Queue()

        def send():
            while True:
                due, data = chunks.get()
                time.sleep(max(0, due - time.monotonic()))
                try:
                    if data:
                        sink.sendall(data)
                    else:
                        sink.shutdown(socket.SHUT_WR)
                        return
                except OSError:
                    return

        threading.Thread(target=send, daemon=True).start()
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            chunks.put((time.monotonic() + delay, data))
            if not data:
                if closed is not None:
                    closed.set()
                return

    def close(self):
        self.listener.close()


@pytest.fixture
def slow_node(tmp_path):
    """(the proxy, the controller's Nodes): node-1, a real sshd, reached through a SlowProxy."""
    cluster = SshdCluster(1, base_dir=tmp_path / "cluster", keys_dir=tmp_path / "keys").start()
    timeout = 4.0
    proxy = SlowProxy(cluster["node-1"].port, delay=0.4 * timeout)
    nodes = machinery.Nodes({"node-1": ("127.0.0.1", proxy.port)}, str(cluster.state_dir),
                            cluster.user, str(cluster.client_key), timeout, threading.Event())
    yield proxy, nodes
    nodes.close_all()
    proxy.close()
    cluster.close()


def is_open(client):
    transport = client.get_transport()  # None once the client was closed
    return transport is not None and transport.is_active()


def test_a_late_worker_never_closes_the_connection_of_the_next_tick(slow_node):
    proxy, nodes = slow_node
    proxy.slow_next = 1
    started = time.monotonic()
    first = nodes.on_every_node({"node-1": "echo first"})
    gave_up_after = time.monotonic() - started
    assert isinstance(first["node-1"], TimeoutError), first
    assert gave_up_after < nodes.timeout + 1.5
    assert nodes.handshakes["node-1"] == 0, "the slow handshake was still going on when the tick gave up"

    # The next tick: a fresh, fast connection.
    second = nodes.on_every_node({"node-1": "echo second"})
    assert second == {"node-1": b"second\n"}
    fresh = nodes.connections["node-1"]

    # The late worker finishes its handshake (every stage within SSH_TIMEOUT) ...
    wait_until(lambda: nodes.handshakes["node-1"] == 2, 3 * nodes.timeout, what="the slow handshake to finish")
    # ... and then either closes its own connection (right) or the fresh one (the old bug).
    wait_until(lambda: proxy.closed_by_client[0].is_set() or not is_open(fresh),
               2 * nodes.timeout, what="the late worker to act")
    assert is_open(fresh), "the late worker closed the next tick's connection"
    assert nodes.connections["node-1"] is fresh
    assert proxy.closed_by_client[0].is_set(), "the late worker closed its own connection"
    third = nodes.on_every_node({"node-1": "echo third"})
    assert third == {"node-1": b"third\n"} and nodes.connections["node-1"] is fresh, \
        "the node is used over the same connection: it never looked down"
