"""The REST API through Flask's test client, and the loop's timing controls.

The desired state lives in a temporary file per test; no node is contacted here
(the control loop, when a test runs it, has no nodes).
"""

import json
import threading
import time

import pytest

import app_controller as c


@pytest.fixture
def desired_file(tmp_path, monkeypatch):
    path = tmp_path / "desired_state.txt"
    path.write_text("# header\n")
    monkeypatch.setattr(c, "DESIRED_STATE_FILE", str(path))
    monkeypatch.setattr(c, "loop_timer", c.LoopTimer())
    monkeypatch.setattr(c, "node_status", {node: c.unobserved_node() for node in c.NODES})
    monkeypatch.setattr(c, "running_names", {node: set() for node in c.NODES})
    monkeypatch.setattr(c, "failed_ticks_in_a_row", 0)
    return path


@pytest.fixture
def client(desired_file):
    return c.api.test_client()


def observe(answers):
    """Remember what step 1 would have seen: {node: [names] or the exception it raised}."""
    observed = {node: answer for node, answer in answers.items() if not isinstance(answer, Exception)}
    c.remember_observation(c.Observation(observed, [], {}, c.node_conditions(answers, {})))


def post(client, body, **kwargs):
    return client.post("/api/containers", data=body if isinstance(body, (str, bytes))
                       else json.dumps(body), **kwargs)


# --- POST ---------------------------------------------------------------------

def test_post_declares_an_unscheduled_container(client, desired_file):
    response = post(client, {"name": "nginx"}, content_type="application/json")
    assert response.status_code == 201
    assert response.get_json() == {"name": "nginx", "node": None, "status": "unscheduled", "also_on": []}
    assert desired_file.read_text() == "# header\nnginx\n"


def test_post_wakes_the_loop(client):
    post(client, {"name": "nginx"})
    assert c.loop_timer.woken


def test_post_without_json_content_type_still_works(client):
    assert post(client, '{"name": "nginx"}').status_code == 201


def test_post_of_an_existing_name_is_a_conflict(client, desired_file):
    post(client, {"name": "nginx"})
    response = post(client, {"name": "nginx"})
    assert response.status_code == 409
    assert "already exists" in response.get_json()["error"]
    assert desired_file.read_text() == "# header\nnginx\n"


@pytest.mark.parametrize("body", ["not json", "", "{", "[1, 2]", '"nginx"', "null", "42",
                                  b"\xff\xfe", {}, {"nom": "nginx"}, {"name": None},
                                  {"name": 42}, {"name": ["nginx"]}, {"name": {"a": 1}}])
def test_post_with_a_bad_body_is_a_400_with_a_json_error(client, desired_file, body):
    response = post(client, body, content_type="application/json")
    assert response.status_code == 400
    assert response.is_json and response.get_json()["error"]
    assert desired_file.read_text() == "# header\n"


@pytest.mark.parametrize("name", ["", "Nginx", "-nginx", "nginx-", "a" * 64, "a b", "ngin_x",
                                  "a;rm -rf /", "$(reboot)", "`id`", "x'y", "../etc", "café",
                                  "a\nb", "app1:node-1", "#comment"])
def test_post_of_an_invalid_name_is_a_400(client, desired_file, name):
    response = post(client, {"name": name})
    assert response.status_code == 400
    assert "not a valid name" in response.get_json()["error"]
    assert desired_file.read_text() == "# header\n"


def test_a_63_character_name_is_accepted(client):
    assert post(client, {"name": "a" * 63}).status_code == 201


def test_a_huge_body_is_refused_with_json(client):
    response = post(client, {"name": "a" * 200_000})
    assert response.status_code == 413
    assert response.is_json


# --- GET ------------------------------------------------------------------------

def test_get_lists_every_container_with_its_status(client, desired_file):
    desired_file.write_text("nginx:node-1\nredis:node-2\nmysql\n")
    observe({"node-1": ["nginx"], "node-2": [], "node-3": TimeoutError()})
    response = client.get("/api/containers")
    assert response.status_code == 200
    assert response.get_json() == [
        {"name": "nginx", "node": "node-1", "status": "running", "also_on": []},
        {"name": "redis", "node": "node-2", "status": "pending", "also_on": []},
        {"name": "mysql", "node": None, "status": "unscheduled", "also_on": []}]


def test_a_container_on_a_node_that_does_not_answer_is_unknown(client, desired_file):
    desired_file.write_text("nginx:node-1\n")
    observe({"node-1": ["nginx"]})
    observe({"node-1": ConnectionRefusedError()})
    assert client.get("/api/containers/nginx").get_json()["status"] == "unknown"


def test_a_container_last_seen_on_an_unreachable_node_may_run_twice(client, desired_file):
    desired_file.write_text("app1:node-2\n")  # moved to node-2 while node-1 was cut off
    observe({"node-1": ["app1"], "node-2": [], "node-3": []})
    observe({"node-1": TimeoutError(), "node-2": ["app1"], "node-3": []})
    view = client.get("/api/containers/app1").get_json()
    assert view["status"] == "running" and view["also_on"] == ["node-1"]


def test_get_one_container(client, desired_file):
    desired_file.write_text("nginx:node-2\n")
    response = client.get("/api/containers/nginx")
    assert response.status_code == 200
    assert response.get_json() == {"name": "nginx", "node": "node-2", "status": "unknown", "also_on": []}


@pytest.mark.parametrize("name", ["ghost", "Bad%20Name", "a;b"])
def test_get_of_an_unknown_container_is_a_404(client, name):
    response = client.get(f"/api/containers/{name}")
    assert response.status_code == 404
    assert response.get_json()["error"]


def test_garbage_in_the_file_does_not_break_the_api(client, desired_file):
    desired_file.write_bytes(b"nginx\n\xff\xfe garbage\nBad Name\n::\n")
    assert [x["name"] for x in client.get("/api/containers").get_json()] == ["nginx"]
    assert post(client, {"name": "redis"}).status_code == 201
    assert "Bad Name" in desired_file.read_text()


# --- DELETE ---------------------------------------------------------------------

def test_delete_removes_the_declaration(client, desired_file):
    desired_file.write_text("# header\nnginx:node-1\nredis\n")
    response = client.delete("/api/containers/nginx")
    assert response.status_code == 200
    assert response.get_json() == {"name": "nginx", "node": "node-1", "deleted": True}
    assert desired_file.read_text() == "# header\nredis\n"
    assert c.loop_timer.woken
    assert client.delete("/api/containers/nginx").status_code == 404


# --- everything else is JSON too -----------------------------------------------------

@pytest.mark.parametrize("method, url, status", [
    ("get", "/nope", 404), ("get", "/api", 404), ("put", "/api/containers", 405),
    ("patch", "/api/containers/nginx", 405), ("post", "/api/nodes", 405),
    ("post", "/api/loop/explode", 404), ("delete", "/api/containers", 405)])
def test_every_error_is_json(client, method, url, status):
    response = getattr(client, method)(url)
    assert response.status_code == status
    assert response.is_json and response.get_json()["error"]


def test_nodes_show_their_condition_and_what_runs(client):
    observe({"node-1": ["nginx"], "node-2": c.NodeError("sed: not found"),
             "node-3": ConnectionRefusedError("refused")})
    nodes = {node["name"]: node for node in client.get("/api/nodes").get_json()}
    assert nodes["node-1"]["up"] and nodes["node-1"]["containers"] == ["nginx"]
    assert nodes["node-1"]["condition"] == "Ready" and nodes["node-1"]["reason"] is None
    assert nodes["node-1"]["last_seen"] is not None
    assert nodes["node-2"]["condition"] == "NotReady" and nodes["node-2"]["reason"] == "sed: not found"
    assert nodes["node-3"]["condition"] == "Unknown" and not nodes["node-3"]["up"]
    assert nodes["node-3"]["reason"] == nodes["node-3"]["error"] == "connection refused"


def test_what_the_api_keeps_of_a_flooded_node_is_bounded(client, desired_file):
    flood = ["nginx"] + [f"intruder{i}" for i in range(200_000)] + ["\x00" * 1_000_000]
    desired_file.write_text("nginx:node-1\n" + "Bad Line\n" * 10_000)
    observe({"node-1": flood, "node-2": [], "node-3": []})
    nodes = {node["name"]: node for node in client.get("/api/nodes").get_json()}
    assert nodes["node-1"]["container_count"] == len(flood)
    assert len(nodes["node-1"]["containers"]) == c.LIST_LIMIT
    assert client.get("/api/containers/nginx").get_json()["status"] == "running"
    state = client.get("/api/state")
    assert len(state.data) < 200_000
    assert state.get_json()["invalid_line_count"] == 10_000


def stall(seconds_ago):
    """Pretend the last tick finished that many seconds ago."""
    return time.monotonic() - seconds_ago


def test_healthz_is_200_while_the_loop_ticks_and_503_when_it_stalls(client, monkeypatch):
    patience = 2 * (c.TICK_SECONDS + c.SSH_TIMEOUT + 1)
    monkeypatch.setattr(c, "last_tick_finished", stall(0))
    assert client.get("/healthz").status_code == 200
    monkeypatch.setattr(c, "last_tick_finished", stall(patience - 1))
    assert client.get("/healthz").status_code == 200, "a tick slowed by a hung node is not a stall"
    monkeypatch.setattr(c, "last_tick_finished", stall(patience + 1))
    response = client.get("/healthz")
    assert response.status_code == 503 and response.get_json()["status"] == "stalled"


def test_healthz_is_503_when_the_last_ticks_all_failed(client, monkeypatch):
    monkeypatch.setattr(c, "last_tick_finished", stall(0))
    monkeypatch.setattr(c, "failed_ticks_in_a_row", 2)
    assert client.get("/healthz").status_code == 200, "one or two failures may be bad luck"
    monkeypatch.setattr(c, "failed_ticks_in_a_row", 3)
    response = client.get("/healthz")
    assert response.status_code == 503 and response.get_json()["status"] == "failing"


def test_healthz_is_200_while_paused_on_purpose(client, monkeypatch):
    monkeypatch.setattr(c, "last_tick_finished", stall(1000))
    client.post("/api/loop/pause")
    assert client.get("/healthz").status_code == 200


def test_the_timer_ticks_on_time_when_the_clock_is_set_back(monkeypatch):
    real_time, calls = time.time, []

    def clock_going_backwards():  # every reading is an hour earlier than the one before
        calls.append(1)
        return real_time() - 3600 * len(calls)

    monkeypatch.setattr(c, "TICK_SECONDS", 0.2)
    monkeypatch.setattr(c, "shutting_down", threading.Event())
    timer, result = c.LoopTimer(), []
    monkeypatch.setattr(c.time, "time", clock_going_backwards)
    thread = threading.Thread(target=lambda: result.append(timer.wait_for_next_tick()), daemon=True)
    thread.start()
    thread.join(timeout=5)
    c.shutting_down.set()
    with timer.condition:
        timer.condition.notify_all()
    assert result == ["timer"]


# --- the loop's timer, pause and step -------------------------------------------------------

@pytest.fixture
def running_loop(desired_file, monkeypatch):
    """The real control loop, in a thread, with no nodes and a 0.3 s tick."""
    monkeypatch.setattr(c, "NODES", {})
    monkeypatch.setattr(c, "TICK_SECONDS", 0.3)
    monkeypatch.setattr(c, "shutting_down", threading.Event())
    monkeypatch.setattr(c, "recent_ticks", c.deque(maxlen=100))
    thread = threading.Thread(target=c.control_loop, daemon=True)
    thread.start()
    yield c.api.test_client()
    c.shutting_down.set()
    c.loop_timer.wake()
    thread.join(timeout=2)
    assert not thread.is_alive()


def ticks():
    with c.status_lock:
        return list(c.recent_ticks)


def wait_until(condition, timeout=5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_the_loop_ticks_on_its_timer(running_loop):
    assert wait_until(lambda: len(ticks()) >= 3)
    assert {tick["mode"] for tick in ticks()} >= {"start", "timer"}
    assert all(tick["converged"] and len(tick["steps"]) == 5 for tick in ticks())


def test_an_api_change_wakes_the_loop_at_once(running_loop, monkeypatch):
    assert wait_until(lambda: len(ticks()) >= 1)
    monkeypatch.setattr(c, "TICK_SECONDS", 60)  # the timer alone would not tick now
    assert wait_until(lambda: ticks()[-1]["mode"] == "timer" or len(ticks()) >= 2)
    before = len(ticks())
    post(running_loop, {"name": "nginx"})
    assert wait_until(lambda: len(ticks()) > before, timeout=2)
    assert ticks()[-1]["mode"] == "wake"


def test_while_paused_no_tick_runs_on_the_timer_or_on_api_changes(running_loop):
    assert wait_until(lambda: len(ticks()) >= 1)
    response = running_loop.post("/api/loop/pause")
    assert response.status_code == 200 and response.get_json()["paused"] is True
    time.sleep(0.5)  # a tick in progress when pausing may still finish
    before = len(ticks())
    post(running_loop, {"name": "nginx"})
    time.sleep(1.2)  # four tick periods
    assert len(ticks()) == before
    assert running_loop.get("/api/loop").get_json()["next_tick_at"] is None


def test_a_step_runs_exactly_one_tick(running_loop):
    running_loop.post("/api/loop/pause")
    time.sleep(0.5)
    before = len(ticks())
    assert running_loop.post("/api/loop/step").status_code == 200
    assert wait_until(lambda: len(ticks()) == before + 1)
    time.sleep(1.0)
    assert len(ticks()) == before + 1
    assert ticks()[-1]["mode"] == "step"
    assert running_loop.get("/api/loop").get_json()["paused"] is True


def test_resume_ticks_again(running_loop):
    running_loop.post("/api/loop/pause")
    time.sleep(0.5)
    before = len(ticks())
    response = running_loop.post("/api/loop/resume")
    assert response.get_json()["paused"] is False
    assert wait_until(lambda: len(ticks()) >= before + 2)


def test_state_has_nodes_containers_ticks_and_loop(running_loop, desired_file):
    desired_file.write_text("nginx\nBad Name\n")
    assert wait_until(lambda: len(ticks()) >= 1)
    state = running_loop.get("/api/state").get_json()
    assert state["containers"] == [{"name": "nginx", "node": None, "status": "unscheduled", "also_on": []}]
    assert state["invalid_lines"] == [{"number": 2, "line": "Bad Name", "reason": "not a valid name"}]
    assert state["loop"]["tick_seconds"] == 0.3
    tick = state["ticks"][-1]
    assert [step["number"] for step in tick["steps"]] == [1, 2, 3, 4, 5]
    assert {"verdict", "converged", "duration_ms", "actions", "mode"} <= set(tick)
