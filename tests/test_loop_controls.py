"""The loop's timing, against the real controller process: the timer, an API change
waking it, the teacher's pause, step and resume, and what /api/state shows of it.

The loop belongs to the process (tests/sshd_nodes.Controller runs
`python app_controller.py`), so these tests watch its log and its API, never its
module state. No sshd is needed: NODES points at closed local ports, so every node
is unavailable at once and a tick takes milliseconds. The timer's decision itself
is the pure next_trigger(), tested with a fake clock in test_logic.py.

"Nothing happened" is always shown by something the test waits for: the log line
that says the loop went to sleep paused, and the controller's own count of seconds
since its last tick (/healthz) passing several tick periods.
"""

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sshd_nodes import TICK, VERDICT, Controller, free_port  # noqa: E402

WAIT = 15  # generous: behaviour, not speed
PERIOD = 0.3  # the tick period of most tests here
PAUSED = re.compile(r"^⏸  Loop paused: no tick until step or resume")
RESUMED = re.compile(r"^⏯  Loop resumed$")
STEP_TICK = re.compile(r"^TICK - \d\d:\d\d:\d\d \(one step, loop paused\)$")
WAKE_TICK = re.compile(r"^TICK - \d\d:\d\d:\d\d \(woken by an API change\)$")
TIMER_TICK = re.compile(r"^TICK - \d\d:\d\d:\d\d$")


@pytest.fixture
def start(tmp_path):
    """Factory: the real controller with three unreachable nodes; stopped at teardown,
    its log printed (pytest shows it when the test fails)."""
    started = []

    def start_controller(tick_seconds=PERIOD, desired_text=None):
        work_dir = tmp_path / f"controller{len(started)}"
        work_dir.mkdir()
        nodes = ",".join(f"node-{i}=127.0.0.1:{free_port()}" for i in (1, 2, 3))
        ctl = Controller(None, tick_seconds=tick_seconds, work_dir=work_dir,
                         env={"NODES": nodes, "SSH_KEY_FILE": None, "NODE_STATE_DIR": None})
        if desired_text is not None:
            ctl.desired_state_file.write_text(desired_text)
        started.append(ctl)
        return ctl.start()

    yield start_controller
    for ctl in started:
        code, _ = ctl.stop()
        print(f"==== controller log ====\n{ctl.log()}\n==== stderr ====\n"
              + "\n".join(ctl.stderr_lines))
        assert code == 0
        assert not [text for text in ctl.lines + ctl.stderr_lines if "Traceback" in text]


def loop(ctl):
    status, body = ctl.get("/api/loop")
    assert status == 200, body
    return body


def pause(ctl):
    """Pause, and wait for the loop to say it sleeps: return that log line's index."""
    mark = ctl.mark()
    status, body = ctl.post("/api/loop/pause")
    assert status == 200 and body["paused"] is True, body
    at, _ = ctl.wait_for_line(PAUSED, WAIT, after=mark)
    return at


def wait_silence(ctl, periods=4):
    """Wait until the controller says no tick finished for `periods` tick periods."""
    ctl.wait_quiet(periods * PERIOD + 0.1)


def test_the_loop_ticks_on_its_timer(start):
    ctl = start()
    ctl.wait_ticks(3, after=0)
    headers = [text for _, text in ctl.find_lines(TICK)]
    assert len(headers) >= 3
    assert TIMER_TICK.search(headers[1]) and TIMER_TICK.search(headers[2]), headers
    ticks = ctl.get("/api/state")[1]["ticks"]
    assert len(ticks) >= 3
    assert [tick["mode"] for tick in ticks[:3]] == ["start", "timer", "timer"]
    assert [tick["converged"] for tick in ticks] == [True] * len(ticks)
    assert [[step["number"] for step in tick["steps"]] for tick in ticks] == \
        [[1, 2, 3, 4, 5]] * len(ticks)


def test_an_api_change_wakes_the_loop_at_once(start):
    ctl = start(tick_seconds=60)  # the timer alone would not tick again during this test
    first = ctl.wait_ticks(1, after=0)
    status, _ = ctl.post("/api/containers", {"name": "nginx"})
    assert status == 201
    at, _ = ctl.wait_for_line(TICK, WAIT, after=first)
    assert WAKE_TICK.search(ctl.lines[at]), "the first tick after the POST is the wake-up"
    ctl.wait_ticks(1, after=at)
    assert ctl.get("/api/state")[1]["ticks"][-1]["mode"] == "wake"
    assert ctl.find_lines(r"^  ⏳ nginx: no live node, stays unscheduled$", after=at)


def test_while_paused_no_tick_runs_on_the_timer_or_on_api_changes(start):
    ctl = start()
    ctl.wait_ticks(1, after=0)
    asleep = pause(ctl)
    count = loop(ctl)["tick_count"]
    status, _ = ctl.post("/api/containers", {"name": "nginx"})  # would wake an unpaused loop
    assert status == 201
    wait_silence(ctl)
    assert ctl.find_lines(TICK, after=asleep) == []
    status = loop(ctl)
    assert (status["paused"], status["next_tick_at"], status["tick_count"]) == (True, None, count)
    # The tick that finally runs is the teacher's step, not a timer or wake-up tick.
    assert ctl.post("/api/loop/step")[0] == 200
    at, _ = ctl.wait_for_line(TICK, WAIT, after=asleep)
    assert STEP_TICK.search(ctl.lines[at]), ctl.lines[at]


def test_a_step_runs_exactly_one_tick(start):
    ctl = start()
    ctl.wait_ticks(1, after=0)
    asleep = pause(ctl)
    count = loop(ctl)["tick_count"]
    status, body = ctl.post("/api/loop/step")
    assert status == 200 and body["paused"] is True, body
    at, _ = ctl.wait_for_line(STEP_TICK, WAIT, after=asleep)
    verdict, _ = ctl.wait_for_line(VERDICT, WAIT, after=at)
    ctl.wait_for_line(PAUSED, WAIT, after=verdict)  # and the loop sleeps again
    wait_silence(ctl)
    assert [i for i, _ in ctl.find_lines(TICK, after=asleep)] == [at]
    assert loop(ctl)["tick_count"] == count + 1
    assert loop(ctl)["paused"] is True
    assert ctl.get("/api/state")[1]["ticks"][-1]["mode"] == "step"


def test_resume_ticks_again(start):
    ctl = start()
    ctl.wait_ticks(1, after=0)
    asleep = pause(ctl)
    status, body = ctl.post("/api/loop/resume")
    assert status == 200 and body["paused"] is False, body
    resumed, _ = ctl.wait_for_line(RESUMED, WAIT, after=asleep)
    last = ctl.wait_ticks(2, after=resumed)
    headers = [text for _, text in ctl.find_lines(TICK, after=resumed, before=last)]
    assert WAKE_TICK.search(headers[0]) and TIMER_TICK.search(headers[1]), \
        "a tick at once, then the timer again"
    assert loop(ctl)["paused"] is False


def test_state_has_nodes_containers_ticks_and_loop(start):
    ctl = start(desired_text="nginx\nBad Name\n")
    ctl.wait_ticks(1, after=0)
    status, state = ctl.get("/api/state")
    assert status == 200
    assert [node["name"] for node in state["nodes"]] == ["node-1", "node-2", "node-3"]
    assert {node["condition"] for node in state["nodes"]} == {"Unknown"}
    assert state["containers"] == [{"name": "nginx", "node": None, "status": "unscheduled",
                                    "also_on": []}]
    assert state["invalid_lines"] == [{"number": 2, "line": "Bad Name", "reason": "not a valid name"}]
    assert state["invalid_line_count"] == 1
    assert state["loop"]["tick_seconds"] == PERIOD and state["loop"]["paused"] is False
    tick = state["ticks"][-1]
    assert [step["number"] for step in tick["steps"]] == [1, 2, 3, 4, 5]
    assert {"verdict", "converged", "duration_ms", "actions", "mode"} <= set(tick)
    assert tick["verdict"] == "❌ Not converged: 1 container unscheduled"
