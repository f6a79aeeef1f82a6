"""The REST API through Flask's test client.

Every test starts from a fresh controller: app_controller.py loaded anew as its own
module (what an app factory gives a Flask test), with the desired state in a temporary
file, no tick, nothing observed, a new loop timer. No node is contacted and no loop runs
here: the real loop's timer, pause, step and resume are tested against the real process
in test_loop_controls.py, and what the controller prints is kept by the fixture, never
in pytest's output.
"""

import importlib.util
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import machinery
import app_controller as c  # replaced, for each test, by a fresh copy (fresh_controller)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sshd_nodes import wait_until  # noqa: E402

REPO_ROOT = Path(c.__file__).resolve().parent
_copies = itertools.count(1)


def fresh_controller(monkeypatch, **settings):
    """app_controller.py loaded anew, with these settings in its environment; it becomes `c`."""
    for variable, value in settings.items():
        monkeypatch.setenv(variable, value)
    spec = importlib.util.spec_from_file_location(f"app_controller_{next(_copies)}", c.__file__)
    controller = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(controller)
    monkeypatch.setitem(globals(), "c", controller)  # every test below reads the fresh copy
    return controller


@pytest.fixture(autouse=True)
def printed(tmp_path, monkeypatch):
    """A fresh controller for every test; returns what it printed (kept out of pytest's output)."""
    path = tmp_path / "desired_state.txt"
    path.write_text("# header\n")
    monkeypatch.delenv("API_TOKEN", raising=False)
    controller = fresh_controller(monkeypatch, DESIRED_STATE_FILE=str(path))
    lines = []
    monkeypatch.setattr(controller.log, "emit", lines.append)
    yield lines
    controller.shutting_down.set()  # a timer still waiting in a failed test's thread returns
    with controller.timer.condition:
        controller.timer.condition.notify_all()


@pytest.fixture
def desired_file():
    return Path(c.DESIRED_STATE_FILE)


@pytest.fixture
def client():
    return c.api.test_client()


def what_the_loop_does_next(printed):
    """Ask the real loop timer what it would do now (wait_for_next_tick, with a 0 s period).

    "wake" or "step": a tick is due at once for that reason; "timer": nothing is
    pending (with a 0 s period the timer decides at once); "paused": the loop
    says it is paused and sleeps until step or resume."""
    result = []
    mark = len(printed)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(c.timer, "shutting_down", threading.Event())
        waiter = threading.Thread(target=lambda: result.append(c.timer.sleep(0, "timer")),
                                  daemon=True)
        waiter.start()
        wait_until(lambda: result or c.log.message("paused") in printed[mark:], timeout=5,
                   what="the timer to choose a tick or to sleep paused")
        if not result:  # asleep until step or resume: wake it as a shutdown would
            c.timer.shutting_down.set()
            with c.timer.condition:
                c.timer.condition.notify_all()
        waiter.join(timeout=5)
    assert not waiter.is_alive()
    return "paused" if result == [None] else result[0]


def observe(answers):
    """Remember what step 1 would have seen: {node: [names] or the exception it raised}."""
    observed = {node: answer for node, answer in answers.items() if not isinstance(answer, Exception)}
    c.status.remember(c.Observation(observed, [], {}, c.node_conditions(answers, {})))


def post(client, body, **kwargs):
    return client.post("/api/containers", data=body if isinstance(body, (str, bytes))
                       else json.dumps(body), **kwargs)


# --- POST ---------------------------------------------------------------------

def test_post_declares_an_unscheduled_container(client, desired_file):
    response = post(client, {"name": "nginx"}, content_type="application/json")
    assert response.status_code == 201
    assert response.get_json() == {"name": "nginx", "node": None, "status": "unscheduled", "also_on": []}
    assert desired_file.read_text() == "# header\nnginx\n"


def test_the_loop_sleeps_on_its_timer_until_something_happens(printed):
    assert what_the_loop_does_next(printed) == "timer"


def test_post_wakes_the_loop(client, printed):
    post(client, {"name": "nginx"})
    assert what_the_loop_does_next(printed) == "wake"
    assert what_the_loop_does_next(printed) == "timer", "one POST, one wake-up"


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

def test_delete_removes_the_declaration(client, desired_file, printed):
    desired_file.write_text("# header\nnginx:node-1\nredis\n")
    response = client.delete("/api/containers/nginx")
    assert response.status_code == 200
    assert response.get_json() == {"name": "nginx", "node": "node-1", "deleted": True}
    assert desired_file.read_text() == "# header\nredis\n"
    assert what_the_loop_does_next(printed) == "wake"
    assert client.delete("/api/containers/nginx").status_code == 404


# --- everything else is JSON too -----------------------------------------------------

@pytest.mark.parametrize("method, url, status", [
    # (/api itself is Kubernetes' discovery now, for kubectl: see test_kubectl.py)
    ("get", "/nope", 404), ("get", "/api/nope", 404), ("put", "/api/containers", 405),
    ("patch", "/api/containers/nginx", 405), ("post", "/api/nodes", 405),
    ("post", "/api/loop/explode", 404), ("delete", "/api/containers", 405)])
def test_every_error_is_json(client, method, url, status):
    response = getattr(client, method)(url)
    assert response.status_code == status
    assert response.is_json and response.get_json()["error"]


def test_nodes_show_their_condition_and_what_runs(client):
    observe({"node-1": ["nginx"], "node-2": machinery.NodeError("sed: not found"),
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
    assert len(nodes["node-1"]["containers"]) == machinery.LIST_LIMIT
    assert client.get("/api/containers/nginx").get_json()["status"] == "running"
    state = client.get("/api/state")
    assert len(state.data) < 200_000
    assert state.get_json()["invalid_line_count"] == 10_000


def stall(seconds_ago):
    """Pretend the last tick finished that many seconds ago."""
    return time.monotonic() - seconds_ago


def test_healthz_is_200_while_the_loop_ticks_and_503_when_it_stalls(client, monkeypatch):
    patience = 2 * (c.TICK_SECONDS + c.SSH_TIMEOUT + 1)
    monkeypatch.setattr(c.log, "last_tick_finished", stall(0))
    assert client.get("/healthz").status_code == 200
    monkeypatch.setattr(c.log, "last_tick_finished", stall(patience - 1))
    assert client.get("/healthz").status_code == 200, "a tick slowed by a hung node is not a stall"
    monkeypatch.setattr(c.log, "last_tick_finished", stall(patience + 1))
    response = client.get("/healthz")
    assert response.status_code == 503 and response.get_json()["status"] == "stalled"


def test_healthz_is_503_when_the_last_ticks_all_failed(client, monkeypatch):
    monkeypatch.setattr(c.log, "last_tick_finished", stall(0))
    monkeypatch.setattr(c.log, "failed_ticks_in_a_row", 2)
    assert client.get("/healthz").status_code == 200, "one or two failures may be bad luck"
    monkeypatch.setattr(c.log, "failed_ticks_in_a_row", 3)
    response = client.get("/healthz")
    assert response.status_code == 503 and response.get_json()["status"] == "failing"


def test_healthz_is_200_while_paused_on_purpose(client, monkeypatch):
    monkeypatch.setattr(c.log, "last_tick_finished", stall(1000))
    assert client.get("/healthz").status_code == 503, "unpaused, that silence is a stall"
    assert client.post("/api/loop/pause").status_code == 200
    response = client.get("/healthz")
    assert response.status_code == 200 and response.get_json()["paused"] is True


def test_the_timer_ticks_on_time_when_the_clock_is_set_back(monkeypatch):
    real_time, calls = time.time, []

    def clock_going_backwards():  # every reading is an hour earlier than the one before
        calls.append(1)
        return real_time() - 3600 * len(calls)

    shutting_down, result = threading.Event(), []
    timer = machinery.LoopTimer(shutting_down, c.log)
    monkeypatch.setattr(time, "time", clock_going_backwards)
    thread = threading.Thread(target=lambda: result.append(timer.sleep(0.2, "timer")), daemon=True)
    thread.start()
    thread.join(timeout=5)
    shutting_down.set()
    with timer.condition:
        timer.condition.notify_all()
    assert result == ["timer"]


# --- who may change the cluster: API_TOKEN ------------------------------------------------
# With API_TOKEN set, every request that changes something needs
# "Authorization: Bearer <token>"; reading stays open. Unset, nothing changes for anyone.

TOKEN = "5f2b8c0e9a41d7366c1e0b2a4d9f8e71"

# (method, path, body, status when allowed, loop paused before the request,
#  what it changes: the desired-state file, paused, what the loop does next)
DECLARED = "# header\nredis\n"
WRITES = [
    pytest.param("post", "/api/containers", {"name": "nginx"}, 201, False,
                 ("# header\nredis\nnginx\n", False, "wake"), id="POST-containers"),
    pytest.param("delete", "/api/containers/redis", None, 200, False,
                 ("# header\n", False, "wake"), id="DELETE-container"),
    pytest.param("post", "/api/loop/pause", None, 200, False,
                 (DECLARED, True, "paused"), id="POST-loop-pause"),
    pytest.param("post", "/api/loop/step", None, 200, False,
                 (DECLARED, True, "step"), id="POST-loop-step"),
    pytest.param("post", "/api/loop/resume", None, 200, True,
                 (DECLARED, False, "wake"), id="POST-loop-resume"),
]


@pytest.fixture
def locked(desired_file, printed, monkeypatch):
    """The test client against a controller started with API_TOKEN set; redis is declared."""
    fresh = fresh_controller(monkeypatch, API_TOKEN=TOKEN, DESIRED_STATE_FILE=str(desired_file))
    monkeypatch.setattr(fresh.log, "emit", printed.append)
    desired_file.write_text(DECLARED)
    return fresh.api.test_client()


def what_a_write_can_change(desired_file, printed):
    """The declared state and the loop's controls: a refused write leaves all of it as it was."""
    return (desired_file.read_text(), c.timer.status()["paused"],
            what_the_loop_does_next(printed))


def send(client, method, path, body, authorization=None):
    headers = {"Authorization": authorization} if authorization is not None else {}
    return getattr(client, method)(path, headers=headers,
                                   data=None if body is None else json.dumps(body))


def assert_refused(response, before, desired_file, printed):
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    error = response.get_json()["error"]
    assert '"Authorization: Bearer <token>"' in error  # says how to send it...
    assert TOKEN not in response.get_data(as_text=True)  # ...never what it is
    assert what_a_write_can_change(desired_file, printed) == before


def unchanged(paused):
    """What a refused write leaves: the declared state, and a loop that would not tick now."""
    return DECLARED, paused, "paused" if paused else "timer"


@pytest.mark.parametrize("method, path, body, allowed_status, paused, effect", WRITES)
def test_a_write_without_a_token_is_a_401_and_changes_nothing(locked, desired_file, printed, method,
                                                               path, body, allowed_status, paused,
                                                               effect):
    if paused:
        c.timer.pause()
    before = what_a_write_can_change(desired_file, printed)
    assert before == unchanged(paused)
    response = send(locked, method, path, body)
    assert_refused(response, before, desired_file, printed)
    assert response.get_json()["error"].startswith("no token")


@pytest.mark.parametrize("authorization", [
    "Bearer wrong", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", f"Bearer {TOKEN.upper()}",
    TOKEN, f"Basic {TOKEN}", f"Token {TOKEN}", "Bearer"])
@pytest.mark.parametrize("method, path, body, allowed_status, paused, effect", WRITES)
def test_a_write_with_a_wrong_token_is_a_401_and_changes_nothing(locked, desired_file, printed, method,
                                                                 path, body, allowed_status, paused,
                                                                 effect, authorization):
    if paused:
        c.timer.pause()
    before = what_a_write_can_change(desired_file, printed)
    assert before == unchanged(paused)
    assert_refused(send(locked, method, path, body, authorization), before, desired_file, printed)


@pytest.mark.parametrize("method, path, body, allowed_status, paused, effect", WRITES)
def test_a_write_with_the_right_token_is_done(locked, desired_file, printed, method, path, body,
                                              allowed_status, paused, effect):
    if paused:
        c.timer.pause()
    response = send(locked, method, path, body, f"Bearer {TOKEN}")
    assert response.status_code == allowed_status, response.get_json()
    assert what_a_write_can_change(desired_file, printed) == effect


@pytest.mark.parametrize("method, path, body, allowed_status, paused, effect", WRITES)
def test_without_api_token_every_write_is_open_to_all(client, desired_file, printed, method, path,
                                                      body, allowed_status, paused, effect):
    # API_TOKEN unset (the fixture's default, as in every demo of the README).
    desired_file.write_text(DECLARED)
    if paused:
        c.timer.pause()
    response = send(client, method, path, body)
    assert response.status_code == allowed_status, response.get_json()
    assert what_a_write_can_change(desired_file, printed) == effect


def test_the_bearer_scheme_is_case_insensitive(locked, desired_file):
    response = send(locked, "post", "/api/containers", {"name": "nginx"}, f"bearer {TOKEN}")
    assert response.status_code == 201
    assert "nginx" in desired_file.read_text()


def test_a_token_in_the_url_is_refused(locked, desired_file):
    for query in (f"token={TOKEN}", f"access_token={TOKEN}", f"api_token={TOKEN}"):
        response = locked.post(f"/api/containers?{query}", data=json.dumps({"name": "nginx"}))
        assert response.status_code == 401
    assert desired_file.read_text() == "# header\nredis\n"


def test_any_other_write_method_needs_the_token_too(locked):
    # Even a route that does not exist: an anonymous client learns nothing but "401".
    for method, url in (("put", "/api/containers"), ("patch", "/api/containers/redis"),
                        ("post", "/api/nodes"), ("post", "/api/loop/explode")):
        response = getattr(locked, method)(url)
        assert response.status_code == 401 and response.is_json


@pytest.mark.parametrize("url", ["/api/containers", "/api/containers/redis", "/api/nodes",
                                 "/api/loop", "/api/state", "/healthz", "/"])
def test_reading_stays_open_with_a_token_set(locked, monkeypatch, url):
    monkeypatch.setattr(c.log, "last_tick_finished", stall(0))  # /healthz: a loop that ticks
    assert locked.get(url).status_code == 200
    assert locked.head(url).status_code == 200


def test_state_says_whether_writes_need_a_token_without_showing_it(client, monkeypatch):
    assert client.get("/api/state").get_json()["token_required"] is False
    fresh = fresh_controller(monkeypatch, API_TOKEN=TOKEN)
    response = fresh.api.test_client().get("/api/state")
    assert response.get_json()["token_required"] is True
    assert TOKEN not in response.get_data(as_text=True)


@pytest.mark.parametrize("token", ["two words", " padded", "caf\u00e9", "tab\there"])
def test_a_token_no_header_can_carry_stops_the_start_without_showing_it(tmp_path, token):
    env = {**os.environ, "API_TOKEN": token, "DESIRED_STATE_FILE": str(tmp_path / "d.txt")}
    result = subprocess.run([sys.executable, "app_controller.py"], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == ("pull-mode: bad setting API_TOKEN: expected printable ASCII "
                                     "without spaces (openssl rand -hex 16 makes one)")
    assert token.strip() not in result.stderr + result.stdout


def test_by_default_there_is_no_token_and_the_api_listens_on_loopback_only():
    """Outside compose nothing sets API_HOST; docker-compose.yml passes API_TOKEN: ${API_TOKEN:-},
    so an unset token arrives as '': both mean "no token"."""
    show = "import app_controller as c; print(repr(c.API_TOKEN), c.API_HOST)"
    for token in (None, ""):
        env = {key: value for key, value in os.environ.items() if key not in ("API_TOKEN", "API_HOST")}
        if token is not None:
            env["API_TOKEN"] = token
        result = subprocess.run([sys.executable, "-c", show], env=env, cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=30, check=True)
        assert result.stdout.split() == ["None", "127.0.0.1"]


# --- two writers: the API and the loop --------------------------------------------------

def test_concurrent_posts_and_the_loops_writes_lose_no_update(desired_file):
    """Four API clients declare 60 containers while the loop assigns 30 others, one
    placement at a time, as step 4 does: every change is in the file."""
    old = [f"old{i}" for i in range(30)]
    desired_file.write_text("# header\n" + "".join(f"{name}\n" for name in old))
    new = [f"app{i}" for i in range(60)]
    start = threading.Barrier(5)
    statuses = []

    def declare(names):
        client = c.api.test_client()
        start.wait()
        statuses.extend(post(client, {"name": name}).status_code for name in names)

    def assign():
        start.wait()
        for name in old:  # as steps 2 to 4 do: read, place a container that has no node, save
            with c.desired_file.lock:
                desired, _, version = c.desired_file.read_with_version()
                desired[name] = "node-1"
                c.desired_file.save(desired, version)

    threads = [threading.Thread(target=declare, args=(new[k::4],)) for k in range(4)]
    threads.append(threading.Thread(target=assign))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert statuses == [201] * len(new)
    desired, problems = c.parse_desired_state(desired_file.read_text())
    assert problems == []
    assert desired == {**{name: "node-1" for name in old}, **{name: None for name in new}}
