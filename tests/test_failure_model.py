"""The failure model, against real sshd nodes and the real controller process.

A node that stops answering may have crashed, or may only be cut off. With
NODE_GRACE_SECONDS, its containers wait (status `unknown`) before they move; a
node back within the grace period moved nothing and started nothing twice. And a
tick that acted is checked soon after (the requeue), so `running` shows at once.
"""

import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sshd_nodes import wait_until  # noqa: E402
from test_integration_ssh import (WAIT, cluster, line, measured, post, pytestmark,  # noqa: E402,F401
                                  ssh_keys, start_controller, wait_each_once)

GRACE = 6


def names_on(cluster):
    return {node.name: node.running for node in cluster}


def test_a_node_back_within_its_grace_period_moved_nothing(cluster, start_controller):
    ctl = start_controller(env={"NODE_GRACE_SECONDS": GRACE})
    names = ["app1", "app2", "app3", "app4"]
    for name in names:
        post(ctl, name)
    placed = wait_each_once(cluster, names)
    ctl.wait_ticks(1)
    on_node_1 = sorted(n for n, node in placed.items() if node == "node-1")
    assert on_node_1 == ["app1", "app4"], placed  # round robin from empty nodes
    mark = ctl.mark()
    cluster["node-1"].kill()
    at, text = ctl.wait_for_line(re.compile(
        r"^  ⚠️  node-1: unavailable for \d+ s, eviction in \d+ s$"), WAIT, after=mark)
    statuses = {c["name"]: c["status"] for c in ctl.get("/api/containers")[1]}
    assert {n: statuses[n] for n in on_node_1} == {"app1": "unknown", "app4": "unknown"}, statuses
    node_1 = {n["name"]: n for n in ctl.get("/api/nodes")[1]}["node-1"]
    assert node_1["condition"] == "Unknown" and 0 < node_1["eviction_in"] <= GRACE
    # Nobody knows what node-1 runs: the tick does not say "Converged", it says what it waits for.
    verdict_at = ctl.wait_ticks(1, after=at)
    assert re.fullmatch(r"⏳ Waiting: node-1 silent, what it runs is unknown \(eviction in \d+ s\)",
                        ctl.lines[verdict_at]), ctl.lines[verdict_at]
    tick = wait_until(lambda: [t for t in ctl.get("/api/state")[1]["ticks"]
                               if t["verdict"] == ctl.lines[verdict_at]], what="the tick on the page")[0]
    assert tick["converged"] is False and tick["waiting"] == ["node-1"]
    cluster["node-1"].start()  # back well within the grace period
    ctl.wait_for_line(line("  ✓ node-1: " + ", ".join(on_node_1)), WAIT, after=at)
    ctl.wait_ticks(1)
    acted = ctl.find_lines(lambda t: t.startswith(("  💀 CLEANUP:", "  📍 SCHEDULE:", "  ▶ START:")),
                           after=mark)
    assert acted == [], "nothing moved, nothing started twice"
    assert wait_each_once(cluster, names) == placed


def test_after_its_grace_period_a_silent_nodes_containers_move(cluster, start_controller):
    ctl = start_controller(env={"NODE_GRACE_SECONDS": GRACE})
    for name in ("app1", "app2", "app3"):
        post(ctl, name)
    placed = wait_each_once(cluster, ["app1", "app2", "app3"])
    victim = placed["app1"]
    mark = ctl.mark()
    killed = time.monotonic()
    cluster[victim].kill()
    ctl.wait_for_line(re.compile(rf"^  ⚠️  {victim}: unavailable for \d+ s, eviction in \d+ s$"),
                      WAIT, after=mark)
    at, _ = ctl.wait_for_line(line(f"  💀 CLEANUP: app1 (node {victim} down)"), WAIT + GRACE,
                              after=mark)
    measured(f"node killed -> CLEANUP with NODE_GRACE_SECONDS={GRACE}", ctl.times[at] - killed)
    assert ctl.times[at] - killed >= GRACE - 1.5, "not evicted before the grace period ended"
    assert ctl.find_lines(line(f"  ⚠️  {victim}: unavailable"), after=mark), \
        "after the grace period, the seed's line"
    ctl.wait_for_line(re.compile(r"^  ▶ START: app1 on node-\d$"), WAIT, after=at)
    wait_each_once(cluster, ["app1", "app2", "app3"])
    state = ctl.get("/api/state")[1]
    cleanups = [d for tick in state["ticks"] for d in tick["decisions"]["cleanup"]]
    assert any(d["name"] == "app1" and d["why"] == "down" and d["silent_for"] >= GRACE - 1.5
               for d in cleanups), cleanups


def test_a_tick_that_acted_is_checked_at_once(cluster, start_controller):
    ctl = start_controller(tick_seconds=5)  # a whole period would be 5 s
    ctl.wait_ticks(1)
    mark = ctl.mark()
    posted = time.monotonic()
    post(ctl, "nginx")
    wait_until(lambda: ctl.get("/api/containers/nginx")[1]["status"] == "running", timeout=WAIT,
               interval=0.02, what="nginx running in GET")
    seconds = time.monotonic() - posted
    measured("POST -> 'running' in GET (TICK_SECONDS=5)", seconds)
    at, _ = ctl.wait_for_line(re.compile(r"^TICK - \d\d:\d\d:\d\d \(checking the last actions\)$"),
                              WAIT, after=mark)
    start, _ = ctl.wait_for_line(re.compile(r"^  ▶ START: nginx on node-\d$"), WAIT, after=mark)
    assert start < at, "the check comes after the tick that started nginx"
    assert ctl.times[at] - ctl.times[start] < 2, "checked well before the next period"
    assert seconds < 4, f"running after {seconds:.2f} s: before the 5 s timer"
    # The check found nothing to do: no second check tick right after it.
    ctl.wait_ticks(1, after=at)
    assert len(ctl.find_lines(re.compile(r"checking the last actions"), after=mark)) == 1
