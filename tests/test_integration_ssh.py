"""The seed's demos against real OpenSSH servers and the real controller process.

Every test starts three `sshd` nodes on 127.0.0.1 (tests/sshd_nodes.py) and runs
`python app_controller.py` against them with a 1-second tick. Assertions are on the
node files (what each node "runs") and on the controller's log lines; no SSH mocks.
Timeouts are generous (behaviour, not speed), but the latencies are measured and
printed at the end of the module.
"""

import os
import re
import secrets
import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sshd_nodes import (SSHD, TICK, VERDICT, Controller, SshdCluster, free_port,  # noqa: E402
                        wait_until)

# Skipped on a developer's machine without sshd; in CI (CI=true) it must run.
pytestmark = pytest.mark.skipif(
    os.environ.get("CI") != "true"
    and not (os.path.exists(SSHD) and shutil.which("ssh-keygen") and os.getuid() == 0),
    reason="needs root and OpenSSH (apt-get install -y openssh-server)")

TICK_SECONDS = 1
SSH_TIMEOUT = 1.5
WAIT = 15  # generous: assert behaviour, not speed

MEASURED = []  # (what, seconds), printed after the module


def measured(what, seconds):
    MEASURED.append((what, seconds))
    print(f"measured: {what}: {seconds:.3f} s")


def assert_no_traceback(ctl):
    """Nothing in the controller's output looks like a crash or an unhandled error."""
    output = ctl.lines + ctl.stderr_lines
    first = next((k for k, l in enumerate(output) if "Traceback" in l), None)
    assert first is None, "the controller printed a traceback:\n" + "\n".join(
        output[max(0, first - 2):first + 12])


def line(text):
    """A regex matching exactly this whole log line."""
    return re.compile("^" + re.escape(text) + "$")


# ----------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def latency_report(request):
    yield
    if not MEASURED:
        return
    text = "\n".join(f"  {what:<66} {sec * 1000:8.0f} ms" for what, sec in MEASURED)
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman:
        with capman.global_and_fixture_disabled():
            print(f"\n\nMeasured latencies (TICK_SECONDS={TICK_SECONDS}, "
                  f"SSH_TIMEOUT={SSH_TIMEOUT}):\n{text}")
    else:
        print(text)


@pytest.fixture(scope="session")
def ssh_keys(tmp_path_factory):
    return tmp_path_factory.mktemp("keys")


@pytest.fixture
def cluster(tmp_path, ssh_keys):
    """Three live sshd nodes, node-1..node-3."""
    c = SshdCluster(3, base_dir=tmp_path / "cluster", keys_dir=ssh_keys).start()
    yield c
    c.close()


@pytest.fixture
def start_controller(cluster, tmp_path):
    """Factory: start the real controller against `cluster`, stopped at teardown.
    The log is printed at teardown (pytest shows it when the test fails)."""
    started = []

    def start(**kw):
        kw.setdefault("tick_seconds", TICK_SECONDS)
        kw.setdefault("ssh_timeout", SSH_TIMEOUT)
        kw.setdefault("work_dir", tmp_path / f"controller{len(started)}")
        Path(kw["work_dir"]).mkdir(exist_ok=True)
        ctl = Controller(kw.pop("cluster", cluster), **kw)
        started.append(ctl)
        return ctl.start()

    yield start
    for ctl in started:
        ctl.stop()
        print(f"==== controller log ({ctl.work_dir}) ====\n{ctl.log()}")
        print("==== controller stderr ====\n" + "\n".join(ctl.stderr_lines))
    for ctl in started:
        assert_no_traceback(ctl)


@pytest.fixture
def ctl(start_controller):
    """The controller (English log) against three live nodes."""
    return start_controller()


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------

def post(ctl, name):
    status, body = ctl.post("/api/containers", {"name": name})
    assert status == 201, (status, body)
    assert body["name"] == name
    return body


def container(ctl, name):
    status, body = ctl.get(f"/api/containers/{name}")
    assert status == 200, (status, body)
    return body


def wait_running(ctl, name, timeout=WAIT):
    """Wait until the API reports `name` running; return its node."""
    wait_until(lambda: container(ctl, name)["status"] == "running", timeout,
               what=f"{name} running")
    return container(ctl, name)["node"]


def assert_each_once(cluster, names, live_only=True):
    """Every name in exactly one (live) node file, and nothing else anywhere."""
    placements = cluster.placements(live_only=live_only)
    assert {n: len(placements.get(n, [])) for n in names} == {n: 1 for n in names}, placements
    assert set(placements) == set(names), placements
    return {n: placements[n][0] for n in names}


def wait_each_once(cluster, names, live_only=True, timeout=WAIT):
    def ok():
        try:
            return assert_each_once(cluster, names, live_only)
        except AssertionError:
            return None
    try:
        return wait_until(ok, timeout, what=f"each of {names} on exactly one node")
    except AssertionError:
        assert_each_once(cluster, names, live_only)  # shows the placements
        raise


def tick_blocks(ctl, after=0):
    """The complete ticks logged after line `after`, as lists of lines (TICK..verdict)."""
    blocks, current = [], None
    for _, text in ctl.find_lines(lambda s: True, after=after):
        if TICK.search(text):
            current = [text]
        elif current is not None:
            current.append(text)
            if VERDICT.search(text):
                blocks.append(current)
                current = None
    return blocks


def seed_failure_demo(cluster, ctl):
    """The seed's node-failure demo: app1..app6 added one by one, then node-1 stopped.
    Returns the log index at which node-1 was killed."""
    names = [f"app{i}" for i in range(1, 7)]
    for name in names:
        post(ctl, name)
    placed = wait_each_once(cluster, names)
    # Round-robin from empty: app1, app4 on node-1; app2, app5 on node-2; app3, app6 on node-3.
    assert placed == {"app1": "node-1", "app2": "node-2", "app3": "node-3",
                      "app4": "node-1", "app5": "node-2", "app6": "node-3"}
    ctl.wait_ticks(1)  # a full converged tick, so every assignment is written

    mark = ctl.mark()
    t0 = time.monotonic()
    cluster["node-1"].kill()  # like `docker stop pull-mode-node-1-1`
    i, _ = ctl.wait_for_line(line("  ⚠️  node-1: unavailable"), WAIT, after=mark)
    measured("node killed -> 'node-1: unavailable' logged", ctl.times[i] - t0)
    expected = [
        "  💀 CLEANUP: app1 (node node-1 down)",
        "  💀 CLEANUP: app4 (node node-1 down)",
        "  📍 SCHEDULE: app1 → node-2",
        "  📍 SCHEDULE: app4 → node-3",
        "  ▶ START: app1 on node-2",
        "  ▶ START: app4 on node-3",
    ]
    at = mark
    for text in expected:  # in this order, as in the seed
        at, _ = ctl.wait_for_line(line(text), WAIT, after=at)
    measured("node killed -> containers restarted elsewhere (START logged)", ctl.times[at] - t0)
    placed = wait_each_once(cluster, names)
    assert placed["app1"] == "node-2" and placed["app4"] == "node-3"
    return mark


# ----------------------------------------------------------------------------
# The seed's demos
# ----------------------------------------------------------------------------

def test_post_starts_container_on_a_node(cluster, ctl):
    """POST nginx -> `▶ START: nginx on node-X`, nginx in node-X's file, GET says running."""
    ctl.wait_ticks(1)
    mark = ctl.mark()
    t0 = time.monotonic()
    body = post(ctl, "nginx")
    assert body["status"] == "unscheduled", "the POST only declares it: the loop places it"
    i, text = ctl.wait_for_line(r"^  ▶ START: nginx on (node-\d)$", WAIT, after=mark)
    measured("POST -> 'START' logged", ctl.times[i] - t0)
    node = re.search(r"node-\d", text).group()
    wait_until(lambda: "nginx" in cluster[node].running, what="nginx in the node file")
    measured("POST -> name in the node file", time.monotonic() - t0)
    assert cluster[node].running == ["nginx"]
    assert wait_running(ctl, "nginx") == node
    measured("POST -> GET says running", time.monotonic() - t0)

    status, listing = ctl.get("/api/containers")
    assert status == 200
    assert [{k: c[k] for k in ("name", "node", "status")} for c in listing] == [
        {"name": "nginx", "node": node, "status": "running"}]
    assert_each_once(cluster, ["nginx"])

    # The tick that started it has the seed's shape, steps in order.
    ctl.wait_ticks(1)
    block = next(b for b in tick_blocks(ctl, after=mark) if f"  ▶ START: nginx on {node}" in b)
    headers = ["1️⃣  OBSERVE the current state (SSH to the nodes)",
               "2️⃣  READ the desired state",
               "3️⃣  CLEANUP dead nodes",
               "4️⃣  SCHEDULE unassigned containers",
               "5️⃣  RECONCILE (diff + actions)"]
    positions = [block.index(h) for h in headers]
    assert positions == sorted(positions), block
    assert block[-1] == "✅ Converged", block
    start = ctl.find_lines(TICK, after=mark)[0][0]
    assert ctl.lines[start - 1] == "=" * 70 and ctl.lines[start + 1] == "=" * 70


def test_intruder_is_stopped_and_other_lines_kept(cluster, ctl):
    """An intruder line appended on node-1 -> `◼ STOP: intruder on node-1`, line gone."""
    for name in ("app1", "app2", "app3"):
        post(ctl, name)
    placed = wait_each_once(cluster, ["app1", "app2", "app3"])
    assert placed["app1"] == "node-1"

    mark = ctl.mark()
    t0 = time.monotonic()
    with open(cluster["node-1"].state_file, "a") as f:  # docker exec ... echo intruder >> ...
        f.write("intruder\n")
    i, _ = ctl.wait_for_line(line("  ◼ STOP: intruder on node-1"), WAIT, after=mark)
    measured("intruder appended -> 'STOP' logged", ctl.times[i] - t0)
    wait_until(lambda: "intruder" not in cluster["node-1"].running, what="intruder removed")
    assert cluster["node-1"].running == ["app1"]
    assert cluster["node-2"].running == ["app2"]
    assert cluster["node-3"].running == ["app3"]
    assert ctl.find_lines(r"STOP: app", after=mark) == []


def test_invalid_intruder_lines_are_removed_never_executed(cluster, ctl, tmp_path):
    """Lines that are not valid names (shell tricks included) are removed, not run."""
    post(ctl, "app1")
    wait_each_once(cluster, ["app1"])
    marker1, marker2 = tmp_path / "pwned1", tmp_path / "pwned2"
    evil = [f"$(touch {marker1})", f"x; touch {marker2}", "Bad Name", "a.*", "'quoted'"]
    with open(cluster["node-1"].state_file, "a") as f:
        f.write("\n".join(evil) + "\n")
    wait_until(lambda: cluster["node-1"].running == ["app1"], what="only app1 left on node-1")
    ctl.wait_ticks(2)
    assert cluster["node-1"].running == ["app1"]
    assert not marker1.exists() and not marker2.exists()


def test_stopping_app1_never_touches_app10(cluster, start_controller):
    """DELETE app1 removes exactly the line `app1`, never `app10` or look-alikes."""
    ctl = start_controller()
    ctl.desired_state_file.write_text(
        "# hand-written\napp10:node-1\napp1:node-1\nxapp1:node-1\napp1-x:node-1\napp11:node-1\n")
    names = ["app10", "app1", "xapp1", "app1-x", "app11"]
    wait_until(lambda: sorted(cluster["node-1"].running) == sorted(names),
               what="all five on node-1")
    before = cluster["node-1"].running
    ctl.wait_ticks(1)

    mark = ctl.mark()
    status, _ = ctl.delete("/api/containers/app1")
    assert status == 200
    ctl.wait_for_line(line("  ◼ STOP: app1 on node-1"), WAIT, after=mark)
    wait_until(lambda: "app1" not in cluster["node-1"].running, what="app1 removed")
    ctl.wait_ticks(2)
    assert cluster["node-1"].running == [n for n in before if n != "app1"]
    assert [t for _, t in ctl.find_lines("STOP", after=mark)] == ["  ◼ STOP: app1 on node-1"]
    assert ctl.find_lines("START", after=mark) == []


def test_dead_node_containers_are_rescheduled(cluster, ctl):
    """Seed demo: app1..app6, stop node-1 -> CLEANUP app1, app4; app1 → node-2, app4 → node-3."""
    seed_failure_demo(cluster, ctl)
    assert container(ctl, "app1")["node"] == "node-2"
    assert container(ctl, "app4")["node"] == "node-3"
    status, nodes = ctl.get("/api/nodes")
    assert status == 200
    by_name = {n["name"]: n for n in nodes}
    assert by_name["node-1"]["up"] is False
    assert by_name["node-2"]["up"] is True and by_name["node-3"]["up"] is True
    # The dead node's file still lists its containers (like a stopped container's disk).
    assert sorted(cluster["node-1"].running) == ["app1", "app4"]


def test_restarted_node_zombies_are_stopped(cluster, ctl):
    """node-1 comes back still listing app1, app4 (zombies): they are stopped there."""
    seed_failure_demo(cluster, ctl)
    names = [f"app{i}" for i in range(1, 7)]
    mark = ctl.mark()
    t0 = time.monotonic()
    cluster["node-1"].start()
    at = mark
    for text in ("  ◼ STOP: app1 on node-1", "  ◼ STOP: app4 on node-1"):
        at, _ = ctl.wait_for_line(line(text), WAIT, after=mark)
    measured("node restarted -> zombies stopped (STOP logged)", ctl.times[at] - t0)
    wait_until(lambda: cluster["node-1"].running == [], what="node-1 file emptied")
    placed = wait_each_once(cluster, names, live_only=False)  # exactly once overall
    assert placed["app1"] == "node-2" and placed["app4"] == "node-3"
    ctl.wait_ticks(2)
    assert_each_once(cluster, names, live_only=False)
    assert ctl.find_lines(r"START: app\d on node-1", after=mark) == []
    status, nodes = ctl.get("/api/nodes")
    assert {n["name"]: n["up"] for n in nodes} == {"node-1": True, "node-2": True, "node-3": True}


def test_ssh_connections_stay_open_across_ticks(cluster, ctl):
    """One SSH connection per node, reused tick after tick (no handshake per command)."""
    post(ctl, "nginx")
    wait_each_once(cluster, ["nginx"])
    ctl.wait_ticks(3)
    assert {n.name: len(n.connections()) for n in cluster} == \
        {"node-1": 1, "node-2": 1, "node-3": 1}
    status, nodes = ctl.get("/api/nodes")
    assert status == 200
    assert {n["name"]: n["handshakes"] for n in nodes} == {"node-1": 1, "node-2": 1, "node-3": 1}
    # A killed and restarted node gets one fresh connection, not one per tick.
    cluster["node-2"].restart()
    ctl.wait_for_line(line("  - node-2: empty"), WAIT, after=ctl.mark())
    ctl.wait_ticks(3)
    assert len(cluster["node-2"].connections()) == 1


def test_the_demo_player_starts_a_demo_only_after_the_check_of_the_last_actions(cluster, ctl):
    """The lesson demos' player (tests/e2e/demo_player.py) waits, as a teacher pauses, until
    the requeue tick has checked what the last demo started: a `docker stop` typed before that
    check would make the check tick act itself, and the plan's "checking the last actions"
    tick would never come. Here a START is seen in the log; settle() must then return only
    once the requeue tick that checks it has finished."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))
    from demo_player import Player
    mark = ctl.mark()
    post(ctl, "nginx")
    ctl.wait_for_line(line("  ▶ START: nginx on node-1"), WAIT, after=mark)
    state = Player(None, ctl.api_port).settle()  # the /api/state it decided on
    [started] = [tick["number"] for tick in state["ticks"]
                 if {"kind": "start", "name": "nginx", "node": "node-1", "ok": True} in tick["actions"]]
    newest = state["ticks"][-1]
    assert newest["number"] > started, "the tick after the START (requeue or wake) had finished"
    assert newest["actions"] == [] and state["loop"]["tick_count"] == newest["number"], newest


def test_delete_stops_container(cluster, ctl):
    """DELETE -> `◼ STOP`, the line is removed, the container is gone from the API."""
    post(ctl, "nginx")
    post(ctl, "redis")
    placed = wait_each_once(cluster, ["nginx", "redis"])
    node = placed["nginx"]
    wait_running(ctl, "nginx")

    mark = ctl.mark()
    t0 = time.monotonic()
    status, body = ctl.delete("/api/containers/nginx")
    assert status == 200, body
    i, _ = ctl.wait_for_line(line(f"  ◼ STOP: nginx on {node}"), WAIT, after=mark)
    measured("DELETE -> 'STOP' logged", ctl.times[i] - t0)
    wait_until(lambda: "nginx" not in cluster[node].running, what="nginx removed")
    assert_each_once(cluster, ["redis"])
    assert ctl.get("/api/containers/nginx")[0] == 404
    assert ctl.delete("/api/containers/nginx")[0] == 404


def test_a_node_whose_actions_fail_is_not_ready_until_they_work(tmp_path, ssh_keys, start_controller):
    """node-1's `sed` fails (a real command failing on a real node, like a full disk):
    the tick says which node failed; next tick node-1 is NotReady, as in Kubernetes'
    NodeReady condition, and nginx moves to a Ready node; once node-1 is repaired its
    next action works and it is Ready again."""
    fake_bin = tmp_path / "fake-bin"
    fake_bin.mkdir()
    fake_sed = fake_bin / "sed"
    fake_sed.write_text('#!/bin/sh\n'
                        'case "$*" in *node-1_running.txt*) echo "sed: disk full" >&2; exit 4;; esac\n'
                        'exec /bin/sed "$@"\n')
    fake_sed.chmod(0o755)
    # sshd keeps only its first SetEnv line: SHLVL=1 (skip root's ~/.bashrc) goes on it too.
    broken = SshdCluster(3, base_dir=tmp_path / "cluster", keys_dir=ssh_keys, skip_bashrc=False,
                         extra_config=f"SetEnv SHLVL=1 PATH={fake_bin}:/usr/bin:/bin\n").start()
    try:
        ctl = start_controller(cluster=broken)
        mark = ctl.mark()
        post(ctl, "nginx")  # the first container goes to node-1
        ctl.wait_for_line(line("  ✗ node-1: actions failed (sed: disk full), retry next tick"),
                          WAIT, after=mark)
        ctl.wait_for_line(line("❌ Not converged: node-1: sed: disk full"), WAIT, after=mark)
        at, _ = ctl.wait_for_line(
            line("  ⚠️  node-1: not ready (its last actions failed: sed: disk full)"), WAIT, after=mark)
        ctl.wait_for_line(line("  💀 CLEANUP: nginx (node node-1 not ready)"), WAIT, after=at)
        ctl.wait_for_line(re.compile(r"^  ▶ START: nginx on node-[23]$"), WAIT, after=at)
        assert "nginx" not in broken["node-1"].running
        nodes = {node["name"]: node for node in ctl.get("/api/nodes")[1]}
        assert nodes["node-1"]["condition"] == "NotReady"
        assert nodes["node-1"]["reason"] == "its last actions failed: sed: disk full"
        wait_each_once(broken, ["nginx"])

        fake_sed.unlink()  # the node is repaired
        mark = ctl.mark()
        ctl.wait_for_line(line("  - node-1: empty"), WAIT, after=mark)
        nodes = {node["name"]: node for node in ctl.get("/api/nodes")[1]}
        assert nodes["node-1"]["condition"] == "Ready"
        post(ctl, "web")  # node-1 is the emptiest Ready node again
        ctl.wait_for_line(line("  ▶ START: web on node-1"), WAIT, after=mark)
        wait_each_once(broken, ["nginx", "web"])
    finally:
        broken.close()


def test_hung_node_does_not_block_the_others(cluster, ctl):
    """SIGSTOP node-3's sshd: ticks go on (about one SSH_TIMEOUT each, observed in
    parallel), a new container starts on a live node within one tick plus the timeout,
    node-3's container moves; SIGCONT: node-3 recovers and its zombie is stopped."""
    for name in ("a1", "a2", "a3"):
        post(ctl, name)
    placed = wait_each_once(cluster, ["a1", "a2", "a3"])
    assert placed["a3"] == "node-3"
    ctl.wait_ticks(1)

    mark = ctl.mark()
    cluster["node-3"].hang()
    ctl.wait_for_line(line("  ⚠️  node-3: unavailable"), WAIT, after=mark)
    ctl.wait_for_line(line("  💀 CLEANUP: a3 (node node-3 down)"), WAIT, after=mark)
    ctl.wait_for_line(r"^  ▶ START: a3 on node-[12]$", WAIT, after=mark)

    # A new container while node-3 still hangs.
    ctl.wait_for_line(line("  ⚠️  node-3: unavailable"), WAIT, after=ctl.mark())
    mark_post = ctl.mark()
    t0 = time.monotonic()
    post(ctl, "web")
    i, _ = ctl.wait_for_line(r"^  ▶ START: web on node-[12]$", WAIT, after=mark_post)
    latency = ctl.times[i] - t0
    measured("POST -> START on a live node while node-3 hangs", latency)
    assert latency < TICK_SECONDS + 2 * SSH_TIMEOUT + 2, \
        "a hung node delayed the others by more than one tick plus the timeout"
    wait_each_once(cluster, ["a1", "a2", "a3", "web"], live_only=True)

    # Ticks keep coming, each costing about one timeout (observed in parallel).
    # Hang node-2 too: observed one after the other, a tick would cost >= 2 timeouts.
    cluster["node-2"].hang()
    mark_two = ctl.mark()
    t_two = time.monotonic()
    ctl.wait_for_line(line("  ⚠️  node-2: unavailable"), WAIT, after=mark_two)
    first = ctl.wait_ticks(1)
    last = ctl.wait_ticks(3)
    ticks = ctl.find_lines(TICK, after=first + 1, before=last + 1)
    assert len(ticks) == 3
    window = ctl.times[last] - ctl.times[first]
    measured("tick period with 2 of 3 nodes hung (3 ticks, average)", window / 3)
    status, state = ctl.get("/api/state")
    assert status == 200, state
    # The three ticks above, as the API keeps them (their numbers follow the tick count).
    durations = [t["duration_ms"] / 1000 for t in state["ticks"]
                 if t.get("finished_at") and "node-2: unavailable" in str(t["steps"][0]["lines"])][-3:]
    assert len(durations) == 3, state["ticks"]
    measured("tick duration with 2 of 3 nodes hung (max of last 3, /api/state)", max(durations))
    assert max(durations) < 2 * SSH_TIMEOUT, durations
    assert window / 3 < TICK_SECONDS + 2 * SSH_TIMEOUT
    assert time.monotonic() - t_two < 60

    # SIGCONT: both recover, zombies stopped, everything runs exactly once.
    mark_back = ctl.mark()
    t0 = time.monotonic()
    cluster["node-2"].unhang()
    cluster["node-3"].unhang()
    i, _ = ctl.wait_for_line(r"^  (✓ node-3: |- node-3: empty$)", WAIT, after=mark_back)
    measured("SIGCONT -> node-3 observed again", ctl.times[i] - t0)
    ctl.wait_for_line(line("  ◼ STOP: a3 on node-3"), WAIT, after=mark_back)
    wait_each_once(cluster, ["a1", "a2", "a3", "web"], live_only=False)
    ctl.wait_for_line(line("✅ Converged"), WAIT, after=ctl.mark())


def test_french_log_is_the_seed_word_for_word(cluster, start_controller):
    """LOG_LANG=fr prints the seed's French lines exactly."""
    ctl = start_controller(log_lang="fr")
    ctl.wait_ticks(1)
    mark = ctl.mark()
    post(ctl, "x")
    ctl.wait_for_line(line("  ▶ START: x sur node-1"), WAIT, after=mark)
    ctl.wait_for_line(line("✅ Convergé"), WAIT, after=mark)
    ctl.wait_for_line(line("  ✓ node-1: x"), WAIT, after=mark)
    ctl.wait_for_line(line("  - node-3: vide"), WAIT, after=mark)
    kill_mark = ctl.mark()
    cluster["node-3"].kill()
    ctl.wait_for_line(line("  ⚠️  node-3: indisponible"), WAIT, after=kill_mark)
    ctl.wait_ticks(1)

    for text in ["=" * 70,
                 "1️⃣  OBSERVER l'état actuel (SSH sur les noeuds)",
                 "2️⃣  RÉCUPÉRER l'état désiré",
                 "3️⃣  CLEANUP des noeuds morts",
                 "4️⃣  SCHEDULER les containers non assignés",
                 "5️⃣  RÉCONCILIER (diff + actions)",
                 "  📍 SCHEDULE: x → node-1",
                 "✅ Convergé"]:
        assert ctl.find_lines(line(text)), f"missing French line {text!r}"
    assert ctl.find_lines(r"^TICK - \d\d:\d\d:\d\d$")
    assert ctl.find_lines(r"^   → \d+ containers tournent sur \d+ noeuds$")
    assert ctl.find_lines(r"^   → \d+ containers déclarés$")
    # The seed's wording, plural even for one ("1 containers"): there is no other form.
    assert ctl.find_lines(line("   → 1 containers tournent sur 2 noeuds"), after=kill_mark)
    for english in ("OBSERVE the current", "READ the desired", "Converged", " on node-",
                    "unavailable", "empty"):
        assert ctl.find_lines(lambda s, e=english: e in s) == [], f"English in French log: {english}"


def test_hand_edited_desired_state_with_garbage(cluster, ctl, tmp_path):
    """Garbage lines are logged and skipped, kept in the file; the valid ones converge;
    a hand-added `web` is picked up next tick."""
    marker = tmp_path / "pwned"
    garbage = ["Bad Name", "UPPER", "under_score", "a:b:c", "-dash", f"$(touch {marker})",
               "ok3:node-9:extra"]
    text = "# written by hand\n\n" + "\n".join(
        ["ok1"] + garbage[:3] + ["ok2:node-2"] + garbage[3:]) + "\n"
    mark = ctl.mark()
    ctl.desired_state_file.write_text(text)
    file_lines = text.splitlines()
    for bad in garbage:
        number = file_lines.index(bad) + 1
        ctl.wait_for_line(
            re.compile(r"^  ⚠️  (.*/)?desired_state\.txt line " + str(number)
                       + r" ignored: " + re.escape(repr(bad)) + r" \(.+\)$"), WAIT, after=mark)
    placed = wait_each_once(cluster, ["ok1", "ok2"])
    assert placed["ok2"] == "node-2"
    ctl.wait_ticks(3)  # the loop keeps ticking
    assert ctl.alive
    assert not marker.exists()
    kept = ctl.desired_state_file.read_text().splitlines()
    for keep in ["# written by hand", ""] + garbage:
        assert keep in kept, f"{keep!r} was not kept in the desired state file: {kept}"

    mark = ctl.mark()
    t0 = time.monotonic()
    with open(ctl.desired_state_file, "a") as f:  # a teacher's hand edit
        f.write("web\n")
    i, _ = ctl.wait_for_line(r"^  ▶ START: web on node-\d$", WAIT, after=mark)
    measured("hand edit of desired_state.txt -> START", ctl.times[i] - t0)
    wait_each_once(cluster, ["ok1", "ok2", "web"])


def test_no_reachable_node_keeps_ticking(tmp_path):
    """NODES pointing at closed ports, no key: every node unavailable, no crash."""
    nodes = ",".join(f"node-{i}=127.0.0.1:{free_port()}" for i in (1, 2, 3))
    ctl = Controller(None, tick_seconds=TICK_SECONDS, ssh_timeout=SSH_TIMEOUT,
                     work_dir=tmp_path, env={"NODES": nodes, "SSH_KEY_FILE": None,
                                             "NODE_STATE_DIR": None})
    try:
        ctl.start()
        mark = ctl.mark()
        last = ctl.wait_ticks(3)
        for i in (1, 2, 3):
            assert ctl.find_lines(line(f"  ⚠️  node-{i}: unavailable"), after=mark)
        assert ctl.find_lines(r"^   → 0 containers running on 0 nodes$", after=mark)
        status, body = ctl.post("/api/containers", {"name": "nginx"})
        assert status == 201, body
        ctl.wait_for_line(line("  ⏳ nginx: no live node, stays unscheduled"), WAIT, after=last)
        ctl.wait_ticks(2)
        assert container(ctl, "nginx")["status"] == "unscheduled"
        assert ctl.get("/healthz")[0] == 200
        assert ctl.alive
        code, elapsed = ctl.stop()
        assert code == 0 and elapsed < 2
    finally:
        ctl.stop()
        print(ctl.log())
    assert_no_traceback(ctl)


def test_default_environment_starts_and_keeps_ticking(tmp_path):
    """Only API_PORT and the desired-state path set: nodes node-1..3 do not resolve here,
    they show as unavailable and the loop keeps going."""
    ctl = Controller(None, work_dir=tmp_path,
                     env={k: None for k in ("NODES", "SSH_KEY_FILE", "NODE_STATE_DIR",
                                            "TICK_SECONDS", "SSH_TIMEOUT", "LOG_LANG",
                                            "SSH_USER")})
    try:
        ctl.start()
        last = ctl.wait_ticks(1, timeout=30, after=0)
        for i in (1, 2, 3):
            assert ctl.find_lines(line(f"  ⚠️  node-{i}: unavailable"))
        ctl.wait_for_line(TICK, timeout=30, after=last)  # the next tick comes on the timer
        assert ctl.alive
    finally:
        code, elapsed = ctl.stop()
        print(ctl.log())
    assert code == 0 and elapsed < 2
    assert_no_traceback(ctl)


def test_sigterm_exits_cleanly_even_while_a_node_hangs(cluster, start_controller):
    """SIGTERM -> exit code 0 within 2 s, idle or in the middle of a hung observation."""
    ctl = start_controller()
    post(ctl, "nginx")
    wait_each_once(cluster, ["nginx"])
    code, elapsed = ctl.stop(timeout=5)
    measured("SIGTERM -> exit (idle)", elapsed)
    assert code == 0 and elapsed < 2

    ctl = start_controller()
    ctl.wait_ticks(1)
    cluster["node-2"].hang()
    ctl.wait_for_line(line("  ⚠️  node-2: unavailable"), WAIT, after=ctl.mark())
    # A tick is now waiting on node-2: its header and step 1's title are logged, and
    # nothing after them (step 1 waits SSH_TIMEOUT + 1 s for the hung node).
    tick, _ = ctl.wait_for_line(TICK, WAIT, after=ctl.mark())
    observing, _ = ctl.wait_for_line(line("1️⃣  OBSERVE the current state (SSH to the nodes)"),
                                     WAIT, after=tick)
    assert ctl.find_lines(lambda text: text.strip(), after=observing + 1) == [], \
        "the tick is still in step 1, waiting on node-2"
    code, elapsed = ctl.stop(timeout=5)
    measured("SIGTERM -> exit (tick blocked on a hung node)", elapsed)
    assert code == 0 and elapsed < 2
    assert not ctl.find_lines("2️⃣|" + VERDICT.pattern, after=tick), \
        "the SIGTERM came while the tick waited on node-2: it never finished"


BAD_NAMES = [
    "a;touch /tmp/pull-mode-pwned", "$(touch /tmp/pull-mode-pwned)", "`touch /tmp/pull-mode-pwned`",
    "a b", "a|b", "a&&b", "../etc", "a\nb", "nginx'", "'", "-rf", "A", "a" * 64, "", " nginx",
    "nginx\n", "a*", "~root"]


def test_shell_metacharacters_never_reach_a_node(cluster, ctl):
    """Names that are not DNS-1123 labels are rejected with 400 and never written."""
    for name in BAD_NAMES:
        status, body = ctl.post("/api/containers", {"name": name})
        assert status == 400, (name, status, body)
        assert isinstance(body, dict) and "error" in body, (name, body)
    ctl.wait_ticks(2)
    assert cluster.placements(live_only=False) == {}
    written = ctl.desired_state_file.read_text() if ctl.desired_state_file.exists() else ""
    assert written == "", "nothing was ever declared"
    assert not os.path.exists("/tmp/pull-mode-pwned")
    status, listing = ctl.get("/api/containers")
    assert status == 200 and listing == []


# ----------------------------------------------------------------------------
# API_TOKEN and API_HOST: the real process, its log and its socket
# ----------------------------------------------------------------------------

def listening_addresses(port):
    """The local addresses of the TCP sockets listening on `port`, from /proc/net/tcp and tcp6."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as file:
                rows = file.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                found.append(address)
    return found


@pytest.mark.parametrize("lang, says_token", [
    ("en", "(writes need a token)"), ("fr", "(les écritures demandent un jeton)")])
def test_the_token_never_appears_in_the_log(cluster, start_controller, lang, says_token):
    token = secrets.token_hex(16)
    ctl = start_controller(log_lang=lang, env={"API_TOKEN": token})
    ctl.wait_for_line(re.escape(f"http://127.0.0.1:{ctl.api_port} {says_token}"), timeout=WAIT)
    right = {"Authorization": f"Bearer {token}"}

    # Refused writes, then real work with the token: every path that could print it.
    assert ctl.post("/api/containers", {"name": "nginx"})[0] == 401
    assert ctl.post("/api/containers", {"name": "nginx"},
                    headers={"Authorization": f"Bearer {token[:-1]}"})[0] == 401
    assert ctl.post(f"/api/loop/pause?token={token}")[0] == 401
    assert ctl.post("/api/containers", {"name": "nginx"}, headers=right)[0] == 201
    node = wait_running(ctl, "nginx")
    assert cluster[node].running == ["nginx"]
    assert ctl.post("/api/loop/step", headers=right)[0] == 200
    assert ctl.post("/api/loop/resume", headers=right)[0] == 200
    assert ctl.delete("/api/containers/nginx", headers=right)[0] == 200
    wait_until(lambda: cluster[node].running == [], what="nginx stopped")
    code, _ = ctl.stop()
    assert code == 0

    output = "\n".join(ctl.lines + ctl.stderr_lines)
    assert ctl.find_lines(r"(START|STOP): nginx") and ctl.find_lines(r"pull-mode"), output
    assert token not in output and token[:8] not in output
    assert ctl.find_lines(r"^(pull-mode controller stopped|contrôleur pull-mode arrêté)$")


def test_without_settings_the_api_listens_on_loopback_with_the_usual_start_line(cluster, start_controller):
    ctl = start_controller(env={"API_HOST": None, "API_TOKEN": None})
    # The start line as before this token existed: where it listens, nothing about tokens.
    ctl.wait_for_line(line(f"pull-mode controller: API on http://127.0.0.1:{ctl.api_port}, "
                           f"nodes node-1, node-2, node-3, a tick every {TICK_SECONDS} s"), timeout=WAIT)
    assert listening_addresses(ctl.api_port) == ["0100007F"]  # 127.0.0.1, and nothing else
    post(ctl, "web")  # and without a token, anyone who reaches it may write
    assert wait_running(ctl, "web")
