"""End to end: the classroom stack on a real Docker engine, and the original project's demos.

Each demo test types the commands of the original project's README (duckConfKubernetes:
curl, docker exec/stop/start, docker compose) in a shell, as its demos give them, then
checks what runs inside each node container (/app/nodes/<node>_running.txt, read with
`docker exec`) and what the controller printed, its French log word for word. This
project's own demos, the lesson plan's, are played from the plan itself in
test_lesson_demos.py. Timeouts are generous: these tests check behaviour, not speed; the
durations they measure are printed at the end.
"""
import os
import re
import secrets
import socket
import time

import pytest
import requests

from compose_stack import API, BUILD_TIMEOUT, PORT, PROJECT, SEED_FAILOVER_LOG, TEACHER, record
from sshd_nodes import wait_until as shared_wait_until

NODES = ["node-1", "node-2", "node-3"]
CONVERGE_TIMEOUT = 60  # seconds: a few ticks of 5 s, plus SSH timeouts on a dead node
TICK_VISIBLE_WITHIN = 10  # seconds after `docker compose up -d` (from the issue)
NODE_STOP_LIMIT = 2.0  # seconds; the issue asks < 1 s: sshd as PID 1 exits on SIGTERM,
CONTROLLER_STOP_LIMIT = 4.0  # < 2 s asked; the limits double it against a busy CI machine,
#                              still far below the 10 s of a SIGKILL after an ignored SIGTERM.

# The original project's demo commands, as its README gives them (on PULL_MODE_PORT if it is not 8080).
def verbatim(command):
    return command.replace("localhost:8080", f"localhost:{PORT}")


POST_NGINX = """curl -X POST http://localhost:8080/api/containers \\
  -H "Content-Type: application/json" \\
  -d '{"name": "nginx"}'"""
POST_NGINX = verbatim(POST_NGINX)
LIST = verbatim("curl http://localhost:8080/api/containers")
DELETE_NGINX = verbatim("curl -X DELETE http://localhost:8080/api/containers/nginx")
INTRUDER = """docker exec pull-mode-node-1-1 sh -c "echo 'intruder' >> /app/nodes/node-1_running.txt\""""
SIX_APPS = """for i in {1..6}; do
  curl -X POST http://localhost:8080/api/containers \\
    -H "Content-Type: application/json" \\
    -d "{\\"name\\": \\"app$i\\"}";
done"""
SIX_APPS = verbatim(SIX_APPS)
STOP_NODE_1 = "docker stop pull-mode-node-1-1"
START_NODE_1 = "docker start pull-mode-node-1-1"


def wait_until(condition, what, timeout=CONVERGE_TIMEOUT, interval=0.25):
    """The suite's wait_until, timed: return (value, seconds waited). An API restarting is "not yet"."""
    started = time.monotonic()
    value = shared_wait_until(condition, timeout, interval, what=what,
                              ignoring=(requests.RequestException, OSError))
    return value, time.monotonic() - started


def placement(stack):
    """{node: [names it runs]} for the running nodes, read inside each node container."""
    return {node: names for node in NODES if (names := stack.running(node)) is not None}


def runs_exactly_once(stack, names):
    """True when every name runs on exactly one node, once, and nothing else runs."""
    everything = [name for names_on_node in placement(stack).values() for name in names_on_node]
    return sorted(everything) == sorted(names)


def api_names():
    response = requests.get(f"{API}/api/containers", timeout=5)
    response.raise_for_status()
    return {container["name"]: container for container in response.json()}


def new_log(stack, mark):
    """What the controller printed after `mark` (a length of its log)."""
    return stack.controller_log()[mark:]


def start_line_after(stack, mark):
    """Where, past `mark`, the log shows a controller process starting (None: not yet)."""
    at = new_log(stack, mark).rfind("pull-mode controller: API on")
    return None if at < 0 else mark + at


def log_shows(stack, mark, *lines):
    """All `lines` appear in the controller's log after `mark`."""
    log = new_log(stack, mark)
    return all(line in log for line in lines)


@pytest.fixture(scope="module")
def stack(built_stack):
    """The stack started with `docker compose up -d`; the tick log visible within 10 s."""
    _, seconds = built_stack.timed("docker compose up -d")
    record("docker compose up -d (nodes healthy, controller started)", seconds)
    _, seconds = wait_until(lambda: "TICK" in built_stack.sh("docker compose logs controller").stdout,
                            "a TICK in `docker compose logs controller`", timeout=60)
    record("up -d returned -> first TICK in the logs", seconds)
    assert seconds <= TICK_VISIBLE_WITHIN, f"first tick visible after {seconds:.1f} s"
    wait_until(lambda: built_stack.health("controller") == "healthy",
               "the controller's healthcheck passes", timeout=60)
    return built_stack


@pytest.fixture
def clean(stack):
    """Every node up, nothing declared, nothing running: the start of each demo."""
    return reset(stack)


def reset(stack):
    """What `clean` does, for any stack of this project (the Windows checkout's too)."""
    # A test before may have just recreated the controller (`LOG_LANG=fr docker compose up -d`).
    wait_until(lambda: requests.get(f"{API}/healthz", timeout=2).ok, "the API answers")
    for node in NODES:
        container = stack.container(node)
        if container.status != "running":
            container.start()
    wait_until(lambda: all(stack.running(node) is not None for node in NODES), "all nodes up")
    # The previous test may have just recreated the controller (`docker compose up -d`).
    wait_until(lambda: requests.get(f"{API}/healthz", timeout=2).status_code == 200, "the API answers")
    for name in api_names():
        requests.delete(f"{API}/api/containers/{name}", timeout=5).raise_for_status()
    wait_until(lambda: placement(stack) == {node: [] for node in NODES} and not api_names(),
               "all nodes empty")
    return stack


# --- the stack itself -------------------------------------------------------------------

def test_services_are_healthy_and_only_the_api_is_published_on_loopback(stack):
    ps = stack.sh("docker compose ps --format '{{.Service}} {{.Status}}'").stdout
    for service in ["controller", *NODES]:
        assert f"{service} Up" in ps and "(healthy)" in ps.split(f"{service} Up")[1].splitlines()[0], ps
    controller = stack.container("controller")
    assert controller.attrs["HostConfig"]["PortBindings"] == {
        "8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": PORT}]}
    for node in NODES:
        container = stack.container(node)
        assert not container.attrs["HostConfig"]["PortBindings"], f"{node} publishes a port"
        assert container.attrs["Config"]["Hostname"] == node
    assert requests.get(f"{API}/healthz", timeout=5).status_code == 200
    page = requests.get(f"{API}/", timeout=5)  # the classroom page, served from the image
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]


def test_nodes_run_sshd_as_pid_1_with_key_authentication_only(stack):
    for node in NODES:
        container = stack.container(node)
        # PID 1 is sshd itself (not a shell around it), in the foreground, logging to stderr.
        code, output = container.exec_run(["sh", "-c", "readlink /proc/1/exe; cat /proc/1/cmdline"])
        assert code == 0 and output.startswith(b"/usr/sbin/sshd\n"), output
        assert b"/usr/sbin/sshd -D -e" in output, output  # sshd rewrites its title, keeps the flags
        code, output = container.exec_run(["/usr/sbin/sshd", "-T"])
        config = output.decode()
        assert code == 0, config
        assert "passwordauthentication no" in config
        assert "kbdinteractiveauthentication no" in config
        assert "authorizedkeysfile /etc/ssh/pull-mode/authorized_keys" in config
    # Host keys are made when each container starts, not baked into the image.
    fingerprints = {stack.container(node).exec_run(
        ["ssh-keygen", "-lf", "/etc/ssh/ssh_host_ed25519_key.pub"]).output for node in NODES}
    assert len(fingerprints) == len(NODES)
    image = stack.container("node-1").image.id
    baked = stack.client.containers.run(image, entrypoint=["sh", "-c", "ls /etc/ssh"], remove=True)
    assert b"ssh_host_" not in baked


def test_controller_key_is_shared_read_only_with_the_nodes(stack):
    controller = stack.container("controller")
    code, output = controller.exec_run(["sh", "-c", "ls -l /keys; echo $SSH_KEY_FILE"])
    assert code == 0 and b"id_ed25519" in output and b"authorized_keys" in output, output
    for node in NODES:
        code, output = stack.container(node).exec_run(
            ["sh", "-c", "touch /etc/ssh/pull-mode/x"])
        assert code != 0 and b"Read-only file system" in output, output


def test_the_three_nodes_run_one_image_built_once(stack):
    # All three run the image `pull-mode-node`, not one image per node.
    assert {node: stack.container(node).attrs["Config"]["Image"] for node in NODES} == {
        node: "pull-mode-node" for node in NODES}
    assert len({stack.container(node).image.id for node in NODES}) == 1
    # `docker compose build` (the fixture's) and `up -d --build` built it once: compose
    # prints "<service> Built" for each service it built.
    assert built_services(stack.build_output) == ["controller", "node-1"], stack.build_output
    result = stack.sh("docker compose up -d --build", timeout=BUILD_TIMEOUT)
    output = result.stdout + result.stderr
    assert built_services(output) == ["controller", "node-1"], output
    assert len({stack.container(node).image.id for node in NODES}) == 1


def built_services(compose_output):
    return sorted(re.findall(r"^\s*(\S+)\s+Built\s*$", compose_output, re.MULTILINE))


def test_node_files_belong_to_the_owner_of_nodes(clean):
    """On Linux a teacher edits nodes/*_running.txt as a normal user: the node's entrypoint
    gives its file to the owner of nodes/ (here uid 1000, as in a teacher's clone)."""
    stack = clean
    nodes = stack.directory / "nodes"
    assert (nodes.stat().st_uid, nodes.stat().st_gid) == TEACHER
    stack.sh("docker compose stop node-1 node-2 node-3")
    # node-1's file left root's (by an earlier run), node-2's missing: both are fixed on start.
    os.chown(nodes / "node-1_running.txt", 0, 0)
    (nodes / "node-2_running.txt").unlink()
    stack.sh("docker compose start node-1 node-2 node-3")
    wait_until(lambda: all(stack.running(node) is not None for node in NODES), "all nodes up")
    for node in NODES:
        status = (nodes / f"{node}_running.txt").stat()
        assert (status.st_uid, status.st_gid) == TEACHER, f"{node}: {status}"
    # The teacher's hand edit, as that uid (the same file, seen inside node-1): it works...
    stack.sh(f"docker exec -u {TEACHER[0]}:{TEACHER[1]} {PROJECT}-node-1-1 "
             "sh -c 'echo web >> /app/nodes/node-1_running.txt'")
    # ... and the controller sees it (an intruder) and stops it.
    wait_until(lambda: stack.running("node-1") == [], "the hand-written `web` is stopped")


# --- the demos, in the README's order ---------------------------------------------------

def test_curl_demo_post_list_delete(clean):
    stack = clean
    result, _ = stack.timed(POST_NGINX)
    posted = time.monotonic()
    assert '"nginx"' in result.stdout, result.stdout
    (where, seconds) = wait_until(
        lambda: [node for node, names in placement(stack).items() if "nginx" in names],
        "nginx runs on a node")
    record("POST nginx -> nginx running on a node", time.monotonic() - posted)
    assert len(where) == 1 and runs_exactly_once(stack, ["nginx"])
    # The state is the desired_state.txt at the top of the stack's directory, on the host.
    assert "nginx" in (stack.directory / "desired_state.txt").read_text()

    # The API says "running" once a tick has observed it there (it may say "pending" before).
    listing, _ = wait_until(lambda: (out := stack.sh(LIST).stdout) and '"running"' in out and out,
                            "GET /api/containers shows nginx running")
    record("POST nginx -> GET shows it running", time.monotonic() - posted)
    assert '"nginx"' in listing and f'"{where[0]}"' in listing, listing

    result = stack.sh(DELETE_NGINX)
    deleted = time.monotonic()
    assert result.stdout, "DELETE printed nothing"
    wait_until(lambda: placement(stack) == {node: [] for node in NODES}, "nginx is stopped")
    record("DELETE nginx -> nginx stopped", time.monotonic() - deleted)
    assert stack.sh(LIST).stdout.strip() in ("[]", "[ ]")
    assert "nginx" not in (stack.directory / "desired_state.txt").read_text()


def test_intruder_demo(clean):
    stack = clean
    stack.sh(POST_NGINX)
    wait_until(lambda: runs_exactly_once(stack, ["nginx"]), "nginx runs")
    mark = len(stack.controller_log())

    stack.sh(INTRUDER)
    injected = time.monotonic()
    wait_until(lambda: "intruder" not in stack.running("node-1"), "the intruder is stopped")
    record("intruder written -> intruder stopped", time.monotonic() - injected)
    wait_until(lambda: log_shows(stack, mark, "◼ STOP: intruder on node-1"),
               "the log shows ◼ STOP: intruder on node-1", timeout=15)
    assert runs_exactly_once(stack, ["nginx"]), placement(stack)


def six_apps_then_node_1_stops(stack):
    """The failure demo up to the reschedule; returns the log mark before the stop."""
    stack.sh(SIX_APPS)
    apps = [f"app{i}" for i in range(1, 7)]
    wait_until(lambda: runs_exactly_once(stack, apps), "app1..app6 run")
    # Round-robin from empty nodes, as in the seed.
    assert placement(stack) == {"node-1": ["app1", "app4"], "node-2": ["app2", "app5"],
                                "node-3": ["app3", "app6"]}

    mark = len(stack.controller_log())
    _, seconds = stack.timed(STOP_NODE_1)
    stopped = time.monotonic()
    record("docker stop pull-mode-node-1-1", seconds)
    assert seconds < NODE_STOP_LIMIT, f"docker stop of a node took {seconds:.1f} s"

    wait_until(lambda: ("app1" in (stack.running("node-2") or [])
                        and "app4" in (stack.running("node-3") or [])),
               "app1 runs on node-2 and app4 on node-3")
    record("failover: node-1 stopped -> app1, app4 running elsewhere",
           time.monotonic() - stopped)
    return mark, apps


def test_node_failure_demo(clean):
    stack = clean
    mark, apps = six_apps_then_node_1_stops(stack)
    expected = SEED_FAILOVER_LOG
    wait_until(lambda: log_shows(stack, mark, *expected), f"the log shows {expected}", timeout=15)
    log = new_log(stack, mark)
    positions = [log.index(line) for line in expected[1:]]
    assert positions == sorted(positions), "CLEANUP, SCHEDULE, START not in the seed's order"
    assert placement(stack) == {"node-2": ["app2", "app5", "app1"],
                                "node-3": ["app3", "app6", "app4"]}
    # node-1's file still lists app1 and app4: the zombies of the next demo.
    assert stack.host_running("node-1") == ["app1", "app4"]


def test_returning_node_zombies_are_stopped(clean):
    stack = clean
    _, apps = six_apps_then_node_1_stops(stack)
    mark = len(stack.controller_log())
    stack.sh(START_NODE_1)
    restarted = time.monotonic()
    wait_until(lambda: stack.running("node-1") == [], "node-1's zombies app1, app4 are stopped")
    record("zombies: node-1 started -> app1, app4 stopped there", time.monotonic() - restarted)
    wait_until(lambda: log_shows(stack, mark, "◼ STOP: app1 on node-1", "◼ STOP: app4 on node-1"),
               "the log shows the zombies' STOP lines", timeout=15)
    assert runs_exactly_once(stack, apps), placement(stack)
    assert "▶ START" not in new_log(stack, mark), "a container was started again"


def test_controller_restart_keeps_state_and_starts_nothing_twice(clean):
    stack = clean
    stack.sh(SIX_APPS)
    apps = [f"app{i}" for i in range(1, 7)]
    wait_until(lambda: runs_exactly_once(stack, apps), "app1..app6 run")
    wait_until(lambda: all(c["status"] == "running" for c in api_names().values()),
               "the API reports every container running")
    before = placement(stack)
    declared = (stack.directory / "desired_state.txt").read_text()
    mark = len(stack.controller_log())

    _, seconds = stack.timed("docker compose restart controller")
    restarted = time.monotonic()
    record("docker compose restart controller", seconds)
    # The container's log also holds the old process's last ticks: count from the
    # new process's start line.
    mark, _ = wait_until(lambda: start_line_after(stack, mark), "the new controller's start line")
    wait_until(lambda: log_shows(stack, mark, "TICK", "Converged"), "a converged tick after restart")
    record("controller restarted -> first converged tick", time.monotonic() - restarted)
    # One more converged tick at least: nothing happens in it either.
    wait_until(lambda: new_log(stack, mark).count("✅ Converged") >= 2, "a second converged tick")
    assert "▶ START" not in new_log(stack, mark) and "◼ STOP" not in new_log(stack, mark)
    assert placement(stack) == before
    assert (stack.directory / "desired_state.txt").read_text() == declared
    assert sorted(api_names()) == apps


def test_controller_stops_in_under_two_seconds(clean):
    stack = clean
    _, seconds = stack.timed(f"docker stop {PROJECT}-controller-1")
    record("docker stop pull-mode-controller-1", seconds)
    stack.sh(f"docker start {PROJECT}-controller-1")
    assert stack.container("controller").attrs["State"]["ExitCode"] in (0, 143)
    assert seconds < CONTROLLER_STOP_LIMIT, f"docker stop of the controller took {seconds:.1f} s"
    wait_until(lambda: requests.get(f"{API}/healthz", timeout=2).status_code == 200,
               "the API answers again")


def test_desired_state_survives_down_and_up(clean):
    stack = clean
    stack.sh(POST_NGINX)
    wait_until(lambda: runs_exactly_once(stack, ["nginx"]), "nginx runs")
    declared = (stack.directory / "desired_state.txt").read_text()
    assert "nginx" in stack.sh("cat desired_state.txt").stdout

    stack.sh("docker compose down")
    assert (stack.directory / "desired_state.txt").read_text() == declared
    stack.sh("docker compose up -d")
    wait_until(lambda: "nginx" in api_names(), "nginx declared after up")
    wait_until(lambda: runs_exactly_once(stack, ["nginx"]), "nginx runs once after up")
    assert "▶ START" not in stack.controller_log(), "nginx was started again after up"


def test_french_log_is_the_seeds_word_for_word(clean):
    """LOG_LANG=fr: the node failure demo prints the seed's own lines (README.fr.md)."""
    stack = clean
    stack.sh("LOG_LANG=fr docker compose up -d")  # recreates the controller only
    try:
        wait_until(lambda: "✅ Convergé" in stack.controller_log(), "a French converged tick")
        mark, _ = six_apps_then_node_1_stops(stack)
        seed = ["⚠️  node-1: indisponible",
                "💀 CLEANUP: app1 (node node-1 down)",
                "💀 CLEANUP: app4 (node node-1 down)",
                "📍 SCHEDULE: app1 → node-2",
                "📍 SCHEDULE: app4 → node-3",
                "▶ START: app1 sur node-2",
                "▶ START: app4 sur node-3"]
        wait_until(lambda: log_shows(stack, mark, *seed), f"the log shows {seed}", timeout=15)
    finally:
        stack.sh("docker compose up -d")  # back to the default language


# --- docs/opening-to-a-class.md: a token for every write -----------------------------------

# As docs/opening-to-a-class.md shows it, with the token in a shell variable (never in the URL).
POST_NGINX_WITH_TOKEN = verbatim("""curl -X POST http://localhost:8080/api/containers \\
  -H "Authorization: Bearer $API_TOKEN" \\
  -H "Content-Type: application/json" \\
  -d '{"name": "nginx"}'""")
DELETE_NGINX_WITH_TOKEN = verbatim("""curl -X DELETE http://localhost:8080/api/containers/nginx \\
  -H "Authorization: Bearer $API_TOKEN\"""")
STATUS = " -s -w '\\n%{http_code}'"  # curl prints the status code on a last line


def token_required():
    return requests.get(f"{API}/api/state", timeout=2).json()["token_required"]


def test_with_api_token_writes_need_the_bearer_header_and_reads_stay_open(clean):
    stack = clean
    token = secrets.token_hex(16)
    stack.sh(f"API_TOKEN={token} docker compose up -d")  # recreates the controller only
    try:
        wait_until(lambda: token_required() is True, "the controller back, with a token")
        # A student without the token: every write is a 401 that says how to send one.
        for command in (POST_NGINX, DELETE_NGINX, verbatim("curl -X POST http://localhost:8080/api/loop/pause")):
            output = stack.sh(command + STATUS).stdout
            body, status = output.rsplit("\n", 1)
            assert status == "401", output
            assert '\\"Authorization: Bearer <token>\\"' in body and token not in body, body
        assert api_names() == {}  # ... and reading stays open
        assert not requests.get(f"{API}/api/loop", timeout=5).json()["paused"]

        # The teacher, with the token.
        output = stack.sh(f"API_TOKEN={token}\n{POST_NGINX_WITH_TOKEN}{STATUS}").stdout
        assert output.endswith("\n201"), output
        wait_until(lambda: runs_exactly_once(stack, ["nginx"]), "nginx runs")
        output = stack.sh(f"API_TOKEN={token}\n{DELETE_NGINX_WITH_TOKEN}{STATUS}").stdout
        assert output.endswith("\n200"), output
        wait_until(lambda: placement(stack) == {node: [] for node in NODES}, "nginx is stopped")

        log = stack.controller_log()
        assert "pull-mode controller: API on http://0.0.0.0:8080 (writes need a token)" in log, log
        assert token not in log
        assert stack.container("controller").attrs["HostConfig"]["PortBindings"] == {
            "8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": PORT}]}

        # The documented way to keep a token across `docker compose up`: a .env file.
        kept = secrets.token_hex(16)
        stack.sh(f'echo "API_TOKEN={kept}" > .env')
        stack.sh("docker compose up -d")
        wait_until(lambda: requests.post(f"{API}/api/loop/pause", timeout=2).status_code == 401
                   and requests.post(f"{API}/api/loop/pause", timeout=2,
                                     headers={"Authorization": f"Bearer {kept}"}).status_code == 200,
                   "the controller recreated with the token of .env")
        assert requests.post(f"{API}/api/loop/resume", timeout=5,
                             headers={"Authorization": f"Bearer {kept}"}).status_code == 200
        assert kept not in stack.controller_log()
    finally:
        stack.sh("rm -f .env; docker compose up -d")  # back to no token, as the other demos expect
        wait_until(lambda: token_required() is False, "the controller back, without a token")
def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_port_and_settings_come_from_the_shell(clean):
    """`PULL_MODE_PORT=9090 docker compose up -d`: the API on another port (still loopback
    only), and the controller's settings passed through from the environment."""
    stack = clean
    controller = stack.container("controller")
    environment = controller.attrs["Config"]["Env"]
    for default in ["TICK_SECONDS=5", "SSH_TIMEOUT=3", "NODE_GRACE_SECONDS=0", "API_TOKEN=",
                    "LOG_LANG=en"]:
        assert default in environment, environment

    port = str(free_port())
    stack.sh(f"PULL_MODE_PORT={port} TICK_SECONDS=1 SSH_TIMEOUT=2 NODE_GRACE_SECONDS=0 "
             "API_TOKEN= docker compose up -d")  # recreates the controller only
    try:
        controller = stack.container("controller")
        assert controller.attrs["HostConfig"]["PortBindings"] == {
            "8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": port}]}
        environment = controller.attrs["Config"]["Env"]
        for setting in ["TICK_SECONDS=1", "SSH_TIMEOUT=2", "NODE_GRACE_SECONDS=0", "API_TOKEN="]:
            assert setting in environment, environment
        # The demo on the new port; an empty API_TOKEN changes nothing.
        wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok,
                   f"the API answers on port {port}")
        result = stack.sh(POST_NGINX.replace(f"localhost:{PORT}", f"localhost:{port}"))
        assert '"nginx"' in result.stdout, result.stdout
        wait_until(lambda: runs_exactly_once(stack, ["nginx"]), "nginx runs")
        # TICK_SECONDS=1: five more ticks within 10 s (every 5 s, there would be 3 at most).
        mark = len(stack.controller_log())
        wait_until(lambda: new_log(stack, mark).count("TICK - ") >= 5,
                   "five more ticks in the controller's log", timeout=10)
    finally:
        stack.sh("docker compose up -d")  # back to the defaults
        wait_until(lambda: requests.get(f"{API}/healthz", timeout=2).ok, "the API is back")
