"""End to end: the README's partition demo ("A partition: crash or cut cable?"), verbatim.

node-1 is cut off the compose network (`docker network disconnect`): it lives on and keeps
"running" its containers, but the controller cannot reach it. With the default settings
its containers start elsewhere while it still lists them (running twice, seen from the
host); with NODE_GRACE_SECONDS=30 a 10 s partition moves nothing. The times each step took
are recorded and printed at the end of the run; what the controller said about the
unreachable node (its reason, how long a tick took) is printed with `-rP`.
"""
import json
import re
import time

import pytest
import requests

from compose_stack import API, PORT, REPO, record
from test_compose_demos import (NODES, SIX_APPS, api_names, log_shows, new_log, placement,
                                reset, runs_exactly_once, verbatim, wait_until)

# The README's commands, as a teacher types them.
DELETE_SIX_APPS = verbatim(
    "for i in {1..6}; do curl -X DELETE http://localhost:8080/api/containers/app$i; done")
DISCONNECT_NODE_1 = "docker network disconnect pull-mode_default pull-mode-node-1-1"
CONNECT_NODE_1 = "docker network connect pull-mode_default pull-mode-node-1-1"
SEE_FROM_HOST = "grep . nodes/*_running.txt"
GRACE_UP = "NODE_GRACE_SECONDS=30 docker compose up -d"
DEFAULTS_UP = "docker compose up -d"

APPS = [f"app{i}" for i in range(1, 7)]
ROUND_ROBIN = {"node-1": ["app1", "app4"], "node-2": ["app2", "app5"], "node-3": ["app3", "app6"]}
COUNTDOWN = re.compile(r"⚠️  node-1: unavailable for (\d+) s, eviction in (\d+) s")
PARTITION_SECONDS = 10  # at least: the README's "a 10 s partition"


def test_the_readme_shows_these_commands():
    """The commands below are the README's, character for character (on port 8080)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("### 5. A partition: crash or cut cable?", 1)[1].split("\n### ", 1)[0]
    for command in (DELETE_SIX_APPS, SIX_APPS, DISCONNECT_NODE_1, SEE_FROM_HOST, CONNECT_NODE_1,
                    GRACE_UP, DEFAULTS_UP, "⚠️  node-1: unavailable for"):
        assert command.replace(f"localhost:{PORT}", "localhost:8080") in section, command


@pytest.fixture
def clean(built_stack):
    """The stack up with the defaults, every node up, nothing declared (the demos' start).
    Run after test_compose_demos.py the stack is up already and `up -d` changes nothing."""
    built_stack.sh(DEFAULTS_UP)
    return reset(built_stack)


def seen_from_host(stack):
    """{node: [names]} from the README's `grep . nodes/*_running.txt` (lines `nodes/node-1_running.txt:app1`)."""
    found = {node: [] for node in NODES}
    for line in stack.sh(SEE_FROM_HOST, check=False).stdout.splitlines():
        path, _, name = line.partition(":")
        node = path.removeprefix("nodes/").removesuffix("_running.txt")
        found.setdefault(node, []).append(name.strip())
    return found


def node_1_connected(stack):
    container = stack.container("node-1")
    container.reload()
    return "pull-mode_default" in container.attrs["NetworkSettings"]["Networks"]


def reconnect_node_1(stack):
    """However a test ended, node-1 back on the network (the next tests need it)."""
    if not node_1_connected(stack):
        stack.sh(CONNECT_NODE_1)


def six_apps_in_round_robin(stack):
    """The README's start: delete the six apps, declare them again (demo 3's places)."""
    stack.sh(DELETE_SIX_APPS)
    stack.sh(SIX_APPS)
    posted = time.monotonic()
    wait_until(lambda: placement(stack) == ROUND_ROBIN, "app1..app6 run in round-robin")
    wait_until(lambda: sorted(api_names()) == APPS
               and all(c["status"] == "running" for c in api_names().values()),
               "GET /api/containers says app1..app6 running")
    record("POST app1..app6 -> GET says all six running", time.monotonic() - posted)


class NodeOneWatch:
    """What the API says about node-1 while it is cut off: each reason it gave, and how long
    the ticks took (a node that times out costs SSH_TIMEOUT; one that fails fast does not)."""

    def __init__(self):
        self.reasons = []
        self.tick_ms = {}

    def look(self):
        state = requests.get(f"{API}/api/state", timeout=5).json()
        node = next(n for n in state["nodes"] if n["name"] == "node-1")
        if node["condition"] != "Ready" and (not self.reasons or self.reasons[-1] != node["reason"]):
            self.reasons.append(node["reason"])
        for tick in state["ticks"]:
            if tick.get("finished_at"):
                self.tick_ms[tick["number"]] = (tick["mode"], tick["duration_ms"])

    def report(self, title):
        print(f"\n{title}: node-1's reasons in order: {self.reasons}")
        print(f"{title}: ticks (number: trigger, ms): "
              + ", ".join(f"{n}: {mode} {ms:.0f}" for n, (mode, ms) in sorted(self.tick_ms.items())))


def test_partition_without_grace_runs_app1_and_app4_twice_until_reconnected(clean):
    stack = clean
    six_apps_in_round_robin(stack)
    watch = NodeOneWatch()
    mark = len(stack.controller_log())

    _, seconds = stack.timed(DISCONNECT_NODE_1)
    cut = time.monotonic()
    record("docker network disconnect (node-1 cut off)", seconds)
    try:
        # The node lives on: its container still runs, and it still lists app1 and app4.
        assert stack.container("node-1").status == "running"
        wait_until(lambda: watch.look() or log_shows(stack, mark, "⚠️  node-1: unavailable"),
                   "the log shows ⚠️  node-1: unavailable")
        record("partition: cut -> node-1 unavailable in the log", time.monotonic() - cut)

        # Seen from the host: app1 and app4 run twice, on node-1 and where they moved.
        twice = {"node-1": ["app1", "app4"], "node-2": ["app2", "app5", "app1"],
                 "node-3": ["app3", "app6", "app4"]}
        wait_until(lambda: watch.look() or seen_from_host(stack) == twice,
                   f"`{SEE_FROM_HOST}` shows app1 and app4 twice: {twice}")
        twice_seen = time.monotonic()
        record("partition: cut -> app1, app4 started elsewhere (running twice)", twice_seen - cut)
        expected = ["⚠️  node-1: unavailable",
                    "💀 CLEANUP: app1 (node node-1 down)",
                    "💀 CLEANUP: app4 (node node-1 down)",
                    "📍 SCHEDULE: app1 → node-2",
                    "📍 SCHEDULE: app4 → node-3",
                    "▶ START: app1 on node-2",
                    "▶ START: app4 on node-3"]
        wait_until(lambda: log_shows(stack, mark, *expected), f"the log shows {expected}", timeout=15)

        # The API confirms the new places (observed there), and says where else they may run.
        def moved_and_confirmed():
            watch.look()
            containers = api_names()
            return all(containers[name]["node"] == node and containers[name]["status"] == "running"
                       and containers[name]["also_on"] == ["node-1"]
                       for name, node in (("app1", "node-2"), ("app4", "node-3")))
        wait_until(moved_and_confirmed,
                   "GET /api/containers: app1 running on node-2, app4 on node-3, also_on node-1")
        record("partition: cut -> GET says app1, app4 running elsewhere", time.monotonic() - cut)
        record("failover confirmation: started elsewhere (files) -> GET says running",
               time.monotonic() - twice_seen)
        listing = json.loads(stack.sh(verbatim("curl http://localhost:8080/api/containers")).stdout)
        assert sorted(c["name"] for c in listing if c["also_on"] == ["node-1"]) == ["app1", "app4"]

        # A second tick with node-1 still cut off: how the controller fails there now.
        wait_until(lambda: watch.look() or new_log(stack, mark).count("⚠️  node-1: unavailable") >= 2,
                   "a second tick with node-1 unavailable", timeout=30)
        assert stack.host_running("node-1") == ["app1", "app4"], "node-1's file changed while cut off"
        assert seen_from_host(stack) == twice

        mark = len(stack.controller_log())
        stack.sh(CONNECT_NODE_1)
        reconnected = time.monotonic()
    finally:
        reconnect_node_1(stack)
        watch.report("without grace")

    wait_until(lambda: stack.host_running("node-1") == [], "node-1's zombies app1, app4 are stopped")
    stopped = time.monotonic()
    record("partition: reconnect -> zombies stopped on node-1", stopped - reconnected)
    record("partition: app1, app4 seen running twice for (this test's partition)",
           stopped - twice_seen)
    wait_until(lambda: log_shows(stack, mark, "◼ STOP: app1 on node-1", "◼ STOP: app4 on node-1"),
               "the log shows the zombies' STOP lines", timeout=15)
    once = {"node-1": [], "node-2": ["app2", "app5", "app1"], "node-3": ["app3", "app6", "app4"]}
    assert seen_from_host(stack) == once
    assert runs_exactly_once(stack, APPS), placement(stack)
    assert "▶ START" not in new_log(stack, mark), "a container was started again after reconnect"
    wait_until(lambda: all(c["status"] == "running" and c["also_on"] == []
                           for c in api_names().values()),
               "GET /api/containers: all running, also_on empty")


def test_with_a_30_s_grace_a_10_s_partition_moves_nothing(clean):
    stack = clean
    six_apps_in_round_robin(stack)
    watch = NodeOneWatch()
    stack.sh(GRACE_UP)  # recreates the controller only
    try:
        assert "NODE_GRACE_SECONDS=30" in stack.container("controller").attrs["Config"]["Env"]
        wait_until(lambda: "✅ Converged" in stack.controller_log(),
                   "the new controller's first converged tick")
        assert placement(stack) == ROUND_ROBIN
        mark = len(stack.controller_log())

        stack.sh(DISCONNECT_NODE_1)
        cut = time.monotonic()
        wait_until(lambda: watch.look() or COUNTDOWN.search(new_log(stack, mark)),
                   "the log shows ⚠️  node-1: unavailable for N s, eviction in M s")
        record("grace: cut -> countdown in the log", time.monotonic() - cut)

        def app1_app4_unknown():
            watch.look()
            containers = api_names()
            return all(containers[name]["status"] == ("unknown" if name in ("app1", "app4")
                                                      else "running")
                       and containers[name]["node"] == node
                       for node, names in ROUND_ROBIN.items() for name in names)
        wait_until(app1_app4_unknown, "GET /api/containers: app1, app4 unknown on node-1")

        # The README's partition: at least 10 s, and two ticks counting down (a tick every
        # 5 s, the first one after the cut waits SSH_TIMEOUT: the second comes 10 to 15 s in).
        def cut_off_long_enough():
            watch.look()
            return (time.monotonic() - cut >= PARTITION_SECONDS
                    and len(COUNTDOWN.findall(new_log(stack, mark))) >= 2)
        wait_until(cut_off_long_enough, "10 s of partition and two countdown lines", timeout=30)
        assert app1_app4_unknown()
        stack.sh(CONNECT_NODE_1)
        reconnected = time.monotonic()
        partition = reconnected - cut
        record("grace: partition (cut -> connect)", partition)
        back = len(stack.controller_log())
    finally:
        reconnect_node_1(stack)
        watch.report("with a 30 s grace")

    try:
        wait_until(lambda: log_shows(stack, back, "✓ node-1: app1, app4"),
                   "node-1 observed again with app1, app4")
        record("grace: reconnect -> node-1 observed again", time.monotonic() - reconnected)
        # A whole tick after node-1 answered again, then nothing moved, nothing started twice.
        wait_until(lambda: "✅ Converged" in new_log(stack, back).split("✓ node-1: app1, app4", 1)[1],
                   "a converged tick with node-1 back")
        log = new_log(stack, mark)
        countdown = [(int(silent), int(left)) for silent, left in COUNTDOWN.findall(log)]
        print(f"\nwith a 30 s grace: partition of {partition:.1f} s, countdown lines {countdown}")
        assert len(countdown) >= 2 and all(silent + left in (29, 30, 31) and left > 0
                                 for silent, left in countdown), countdown
        lefts = [left for _, left in countdown]
        assert lefts == sorted(lefts, reverse=True) and lefts[0] > lefts[-1], countdown
        for moved in ("💀 CLEANUP", "📍 SCHEDULE", "▶ START", "◼ STOP"):
            assert moved not in log, f"{moved} in the log during a partition shorter than the grace"
        assert placement(stack) == ROUND_ROBIN
        assert seen_from_host(stack) == ROUND_ROBIN  # each container once
        wait_until(lambda: all(c["status"] == "running" and c["also_on"] == []
                               for c in api_names().values()),
                   "GET /api/containers: all six running again")
    finally:
        stack.sh(DEFAULTS_UP)  # back to the defaults (no grace), as the other demos expect
        wait_until(lambda: "NODE_GRACE_SECONDS=0" in stack.container("controller").attrs["Config"]["Env"]
                   and requests.get(f"{API}/healthz", timeout=2).ok,
                   "the controller back without a grace period")
