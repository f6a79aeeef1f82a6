"""pull-mode: a teaching controller that makes the Kubernetes control loop visible.

One process, two threads:
  * a REST API (Flask) that only records what the user *wants* in desired_state.txt;
  * a control loop that, every tick, makes the nodes match that file:

        while True:
            1. get_current_state()   observe what runs on each node (SSH)
            2. get_desired_state()   read desired_state.txt
            3. cleanup_dead_nodes()  forget assignments to nodes that are down
            4. schedule()            assign unassigned containers to live nodes
            5. reconcile()           diff observed vs desired, then start/stop (SSH)

A "container" is simulated: node N runs the names listed, one per line, in its
file NODE_STATE_DIR/N_running.txt. Starting appends a line; stopping removes it.

Reading order: the file goes from the edges (configuration, the desired-state
file, SSH) to the decisions, then the five steps and run_tick(), the loop itself.

What this toy leaves out on purpose, and who does the job in Kubernetes:
  * real containers: the kubelet and a container runtime on every node;
  * a real database with watches: kube-apiserver in front of etcd;
  * high availability: there is one controller, no leader election;
  * heartbeats and grace periods (node lifecycle controller): here a node that
    does not answer within SSH_TIMEOUT is down for that tick.
"""

import hmac
import logging
import os
import re
import shlex
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from contextlib import contextmanager

import paramiko
from flask import Flask, abort, jsonify, request, send_file
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server


# ---------------------------------------------------------------------------
# Configuration (environment variables; the defaults fit docker-compose.yml)
# ---------------------------------------------------------------------------

def parse_nodes(spec, default_port):
    """'node-1,node-2=127.0.0.1:2202' -> {'node-1': ('node-1', 22), 'node-2': ('127.0.0.1', 2202)}"""
    nodes = {}
    for entry in spec.split(","):
        name, _, address = entry.strip().partition("=")
        host, _, port = (address or name).partition(":")
        nodes[name] = (host, int(port or default_port))
    return nodes


SSH_PORT = int(os.environ.get("SSH_PORT", "22"))
NODES = parse_nodes(os.environ.get("NODES", "node-1,node-2,node-3"), SSH_PORT)
SSH_USER = os.environ.get("SSH_USER", "root")
SSH_KEY_FILE = os.environ.get("SSH_KEY_FILE") or None  # None: paramiko looks in ~/.ssh
# One slow node must not freeze the lesson: past this many seconds it is down.
SSH_TIMEOUT = float(os.environ.get("SSH_TIMEOUT", "3"))
NODE_STATE_DIR = os.environ.get("NODE_STATE_DIR", "/app/nodes")
DESIRED_STATE_FILE = os.environ.get("DESIRED_STATE_FILE", "desired_state.txt")
# Slow enough to read each tick on a projector, fast enough to see healing.
TICK_SECONDS = float(os.environ.get("TICK_SECONDS", "5"))
# Loopback by default: only this machine can reach the API until you decide
# otherwise (docker-compose.yml sets 0.0.0.0 inside the controller's container).
API_HOST = os.environ.get("API_HOST", "127.0.0.1")
API_PORT = int(os.environ.get("API_PORT", "8080"))
# Unset (or empty): anyone who reaches the API may change the cluster. Set: every
# change needs "Authorization: Bearer <API_TOKEN>"; reading stays open to all.
API_TOKEN = os.environ.get("API_TOKEN") or None
LOG_LANG = os.environ.get("LOG_LANG", "en")

# A container name is a DNS-1123 label, as for Kubernetes objects: lowercase
# letters, digits and '-', alphanumeric at both ends, at most 63 characters.
# It also makes every name safe to put in a shell command and a sed pattern.
NAME_PATTERN = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"


def is_valid_name(name):
    return isinstance(name, str) and re.fullmatch(NAME_PATTERN, name) is not None


# ---------------------------------------------------------------------------
# The desired state: desired_state.txt (etcd, in Kubernetes)
# ---------------------------------------------------------------------------
# One container per line: "name" (declared, not scheduled yet) or "name:node".
# Blank lines and "# comments" are allowed, so a teacher can edit it by hand.

# The API thread and the loop both change the file: every read-modify-write
# holds this one lock, so no update is ever lost.
desired_lock = threading.Lock()


def parse_line(line):
    """'app1' -> ('app1', None), 'app1:node-2' -> ('app1', 'node-2'), blank or comment -> None.

    Raises ValueError with the reason when the line is not valid."""
    code = line.partition("#")[0].strip()
    if not code:
        return None
    name, colon, node = code.partition(":")
    if not is_valid_name(name):
        raise ValueError("not a valid name")
    if colon and not is_valid_name(node):
        raise ValueError("not a valid node name")
    return name, (node if colon else None)


def parse_desired_state(text):
    """Parse the file's text into ({name: node or None} in file order, [problems]).

    A problem is (line number, line, reason): bad lines are reported and
    skipped, never fatal, because a hand edit must not stop the loop."""
    desired, problems = {}, []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            entry = parse_line(line)
        except ValueError as error:
            problems.append((number, line, str(error)))
            continue
        if entry is None:
            continue
        name, node = entry
        if name in desired:
            problems.append((number, line, "duplicate"))
            continue
        desired[name] = node
    return desired, problems


def format_entry(name, node):
    return name if node is None else f"{name}:{node}"


def render_desired_state(text, desired):
    """Rewrite the file's text so that it declares `desired`, changing only the lines that must.

    Comments, blank lines and invalid lines stay as they are; a container no
    longer desired loses its line(s); a new one gets a line at the end."""
    lines, seen = [], set()
    for line in text.splitlines():
        try:
            entry = parse_line(line)
        except ValueError:
            entry = None
        if entry is None:
            lines.append(line)
            continue
        name, node = entry
        if name not in desired:
            continue
        if name in seen or desired[name] == node:
            lines.append(line)  # a duplicate stays as it was, and reported
        else:
            comment = line.partition("#")[2]
            lines.append(format_entry(name, desired[name]) + (f"  #{comment}" if comment else ""))
        seen.add(name)
    lines += [format_entry(name, node) for name, node in desired.items() if name not in seen]
    return "".join(line + "\n" for line in lines)


def read_desired_text():
    try:
        with open(DESIRED_STATE_FILE, encoding="utf-8", errors="replace") as file:
            return file.read()
    except FileNotFoundError:
        return ""


def write_atomically(path, text):
    """Write to a temp file in the same directory, fsync, then rename over the file.

    A reader (or a crash) sees the old file or the new one, never half of one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp_path = tempfile.mkstemp(dir=directory, prefix=".desired_state.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp_path, 0o644)
        os.replace(temp_path, path)
    except BaseException:
        os.unlink(temp_path)
        raise


@contextmanager
def editing_desired_state():
    """Read-modify-write of desired_state.txt under the lock: change the dict, it is saved."""
    with desired_lock:
        text = read_desired_text()
        desired, _ = parse_desired_state(text)
        before = dict(desired)
        yield desired
        if desired != before:
            write_atomically(DESIRED_STATE_FILE, render_desired_state(text, desired))


# ---------------------------------------------------------------------------
# Talking to the nodes over SSH (the kubelet's job, in Kubernetes)
# ---------------------------------------------------------------------------
# One SSH connection per node, kept open across ticks: a handshake costs tens
# of milliseconds of crypto, a command on an open connection a round trip.
connections = {}  # node -> paramiko.SSHClient
connections_lock = threading.Lock()
handshakes = {node: 0 for node in NODES}  # shown by GET /api/nodes: reuse is visible


class NodeError(Exception):
    """A command ran on a node but failed there."""


class ShuttingDown(Exception):
    """The process is stopping: its closed connections say nothing about the nodes."""


def open_connection(node):
    host, port = NODES[node]
    client = paramiko.SSHClient()
    # The nodes make their host keys when they start, so we cannot know them in
    # advance: accept them. Fine on a classroom network; a real cluster pins keys.
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    try:
        client.connect(
            host, port=port, username=SSH_USER, key_filename=SSH_KEY_FILE,
            look_for_keys=SSH_KEY_FILE is None, allow_agent=SSH_KEY_FILE is None,
            # Every stage gets a deadline, or a hung node hangs us with it.
            timeout=SSH_TIMEOUT, banner_timeout=SSH_TIMEOUT,
            auth_timeout=SSH_TIMEOUT, channel_timeout=SSH_TIMEOUT)
    except BaseException:
        client.close()
        raise
    # A tick sends a node small commands in a row (observe, then act). With
    # Nagle's algorithm on, each one waits for the node's delayed ACK: +40 ms.
    client.get_transport().sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    handshakes[node] += 1
    return client


def get_connection(node):
    with connections_lock:
        client = connections.get(node)
    transport = client and client.get_transport()
    if transport and transport.is_active():
        return client
    client = open_connection(node)
    with connections_lock:
        old, connections[node] = connections.get(node), client
    if old:
        old.close()
    return client


def close_connection(node):
    with connections_lock:
        client = connections.pop(node, None)
    if client:
        client.close()


def run_on_node(node, command):
    """Run a shell command on a node over its open connection; return its output."""
    client = get_connection(node)
    try:
        _, stdout, stderr = client.exec_command(command, timeout=SSH_TIMEOUT)
        # Read the output *before* waiting for the exit status: a command whose
        # output fills the SSH window waits for a reader, and we would wait forever.
        output = stdout.read().decode("utf-8", errors="replace")
        errors = stderr.read().decode("utf-8", errors="replace")
        if not stdout.channel.status_event.wait(SSH_TIMEOUT):
            raise TimeoutError("no exit status")
    except Exception:
        close_connection(node)  # broken or hung: open a new one next time
        raise
    if stdout.channel.exit_status != 0:
        raise NodeError(errors.strip() or f"exit status {stdout.channel.exit_status}")
    return output


def on_every_node(action, nodes):
    """Run action(node) for all nodes at once; return {node: result or the exception}.

    One thread per node, so a hung node costs one SSH_TIMEOUT per tick, not
    one per node. Daemon threads: a node still hanging never blocks shutdown."""
    results = {}

    def work(node):
        try:
            results[node] = action(node)
        except Exception as error:
            results[node] = error

    threads = [threading.Thread(target=work, args=(node,), daemon=True) for node in nodes]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + SSH_TIMEOUT + 1
    for thread in threads:
        thread.join(max(0, deadline - time.monotonic()))
    if shutting_down.is_set():
        raise ShuttingDown()  # so no tick acts on nodes that only *look* down
    for node in nodes:
        if node not in results:
            close_connection(node)
            results[node] = TimeoutError(f"no answer within {SSH_TIMEOUT:g}s")
    return {node: results[node] for node in nodes}


def running_file(node):
    return f"{NODE_STATE_DIR}/{node}_running.txt"


def read_running_containers(node):
    """What a node runs: the lines of its file (a missing file means nothing)."""
    path = shlex.quote(running_file(node))
    output = run_on_node(node, f"test ! -e {path} || cat {path}")
    return [line for line in output.split("\n") if line]


def start_stop_command(node, to_start, to_stop):
    """One shell command that stops, then starts, containers on a node: one round trip."""
    for name in to_start:
        if not is_valid_name(name):  # never put an unchecked name in a shell
            raise ValueError(f"refusing to start {name!r}: not a valid name")
    path = shlex.quote(running_file(node))
    # Stopping deletes the whole line, ^name$ (so stopping app1 keeps app10).
    # A line that is not a valid name is deleted by pattern: garbage never
    # reaches the shell, not even quoted.
    sed_program = [f"/^{name}$/d" for name in to_stop if is_valid_name(name)]
    if any(not is_valid_name(name) for name in to_stop):
        sed_program.append(f"/^{NAME_PATTERN}$/!d")
    sed_program.append("$a\\")  # end the last line with a newline, so appends start a new one
    sed = " ".join(f"-e {shlex.quote(expression)}" for expression in sed_program)
    command = f"mkdir -p {shlex.quote(NODE_STATE_DIR)} && touch {path} && sed -i -E {sed} {path}"
    if to_start:
        command += f" && printf '%s\\n' {' '.join(shlex.quote(name) for name in to_start)} >> {path}"
    return command


# ---------------------------------------------------------------------------
# The decisions: pure functions over plain data, tested without a network
# ---------------------------------------------------------------------------

def cleanup_dead_nodes(desired, live_nodes):
    """Unassign every container whose node is down. Returns (new desired, [(name, dead node)])."""
    cleaned, orphans = {}, []
    for name, node in desired.items():
        if node is not None and node not in live_nodes:
            orphans.append((name, node))
            node = None
        cleaned[name] = node
    return cleaned, orphans


def schedule(desired, live_nodes):
    """Assign every unassigned container to a live node. Returns (new desired, [(name, node)]).

    Each goes to the live node with the fewest containers, the first in NODES
    order on a tie: from empty nodes that is round-robin, and after a failure
    it fills the emptiest nodes first, so the load stays even."""
    load = {node: 0 for node in live_nodes}
    for node in desired.values():
        if node in load:
            load[node] += 1
    scheduled, placements = {}, []
    for name, node in desired.items():
        if node is None and live_nodes:
            node = min(live_nodes, key=lambda candidate: load[candidate])
            load[node] += 1
            placements.append((name, node))
        scheduled[name] = node
    return scheduled, placements


def diff_node(running, wanted):
    """What to stop and start so that a node running `running` runs `wanted`, each once.

    Returns (to_start, to_stop). Anything running but not wanted is stopped:
    an intruder, or a zombie left by a node that was down while its containers
    moved. A wanted container listed twice is stopped and started once again."""
    listed = Counter(running)  # name -> how many lines; a dict, so lookups stay fast
    wanted_set = set(wanted)
    twice = {name for name in wanted if listed[name] > 1}
    to_stop = [name for name in listed if name not in wanted_set or name in twice]
    to_start = [name for name in wanted if name not in listed or name in twice]
    return to_start, to_stop


def plan_reconcile(observed, desired, live_nodes):
    """The diff for every live node: {node: (to_start, to_stop)}, only nodes with work."""
    wanted = {node: [] for node in live_nodes}
    for name, node in desired.items():
        if node in wanted:
            wanted[node].append(name)
    plan = {}
    for node in live_nodes:
        to_start, to_stop = diff_node(observed[node], wanted[node])
        if to_start or to_stop:
            plan[node] = (to_start, to_stop)
    return plan


# ---------------------------------------------------------------------------
# The five steps
# ---------------------------------------------------------------------------

def get_current_state():
    """Step 1, observe: ask every node what it runs. Returns (observed, live_nodes).

    A node that does not answer is down for this tick: a fact to log, not an error."""
    results = on_every_node(read_running_containers, list(NODES))
    observed = {node: result for node, result in results.items() if not isinstance(result, Exception)}
    live_nodes = [node for node in NODES if node in observed]
    for node, result in results.items():
        if isinstance(result, Exception):
            say("node_down", node=node)
        elif result:
            say("node_up", node=node, containers=", ".join(map(shown, result)))
        else:
            say("node_empty", node=node)
    say("running_count", count=sum(map(len, observed.values())), nodes=len(live_nodes))
    remember_observation(results)
    return observed, live_nodes


def get_desired_state():
    """Step 2: read desired_state.txt. Bad lines are logged and skipped."""
    desired, problems = parse_desired_state(read_desired_text())
    for number, line, reason in problems:
        say("bad_line", file=os.path.basename(DESIRED_STATE_FILE), number=number,
            line=line, reason=reason)
    say("declared_count", count=len(desired))
    return desired


def save_assignments(declared, desired):
    """Write the assignments that steps 3 and 4 changed; return the file's state now.

    The API may have changed the file since step 2 read it, so we re-read it and
    only change a line that still says what we read (optimistic concurrency,
    like resourceVersion on a Kubernetes update). A line changed meanwhile
    is left alone: the next tick decides again with fresh data."""
    with editing_desired_state() as current:
        for name, node in desired.items():
            if node != declared[name] and name in current and current[name] == declared[name]:
                current[name] = node
        return dict(current)


def reconcile(observed, desired, live_nodes):
    """Step 5: diff observed against desired on every live node, then start/stop.

    All of a node's actions go in one SSH command; nodes act in parallel.
    Returns {node: error} for the nodes whose actions failed (retried next tick)."""
    plan = plan_reconcile(observed, desired, live_nodes)
    commands = {node: start_stop_command(node, *plan[node]) for node in plan}
    results = on_every_node(lambda node: run_on_node(node, commands[node]), list(plan))
    failures = {node: result for node, result in results.items() if isinstance(result, Exception)}
    for node, (to_start, to_stop) in plan.items():
        for name in to_stop:
            say("stop", name=shown(name), node=node, ok=node not in failures)
        for name in to_start:
            say("start", name=name, node=node, ok=node not in failures)
        if node in failures:
            say("actions_failed", node=node, error=describe(failures[node]))
    return failures


def run_tick(mode):
    """One pass of the control loop: the five steps of the lesson."""
    begin_tick(mode)

    say("step_1")  # OBSERVE what really runs (the kubelets report it)
    observed, live_nodes = get_current_state()

    say("step_2")  # READ what the users declared (the API server's objects)
    declared = get_desired_state()

    say("step_3")  # CLEANUP dead nodes (the node lifecycle controller)
    desired, orphans = cleanup_dead_nodes(declared, live_nodes)
    for name, node in orphans:
        say("cleanup", name=name, node=node)

    say("step_4")  # SCHEDULE what has no node (kube-scheduler)
    desired, placements = schedule(desired, live_nodes)
    for name, node in placements:
        say("schedule", name=name, node=node)
    unscheduled = [name for name, node in desired.items() if node is None]
    for name in unscheduled:
        say("unschedulable", name=name)
    desired = save_assignments(declared, desired)  # steps 3 and 4 go into the file

    say("step_5")  # RECONCILE: diff, then act (every controller's sync)
    failures = reconcile(observed, desired, live_nodes)

    end_tick(failures, unscheduled)


# ---------------------------------------------------------------------------
# When to tick: the timer, API changes, and the teacher's pause and step
# ---------------------------------------------------------------------------
# Watch plus resync, as Kubernetes informers do: an API change wakes the loop
# at once (the watch: fast), and the timer ticks every TICK_SECONDS anyway (the
# resync: safe). Each tick re-reads the whole state (level-triggered), so a
# missed wake-up, a hand edit or a node dying behind our back is seen next tick.

class LoopTimer:
    """Decides when the next tick runs."""

    def __init__(self):
        self.condition = threading.Condition()
        self.paused = False
        self.steps_requested = 0
        self.woken = False
        self.next_tick_at = None  # wall-clock time, for the API and the page

    def wake(self):
        """Something changed: tick now (ignored while paused)."""
        with self.condition:
            self.woken = True
            self.condition.notify_all()

    def pause(self):
        with self.condition:
            self.paused = True
            self.condition.notify_all()

    def resume(self):
        with self.condition:
            self.paused, self.steps_requested, self.woken = False, 0, True
            self.condition.notify_all()

    def step(self):
        """Run exactly one tick now and stay paused, like a debugger's step."""
        with self.condition:
            self.paused = True
            self.steps_requested += 1
            self.condition.notify_all()

    def wait_for_next_tick(self):
        """Sleep until the next tick is due; return why it runs ('timer', 'wake', 'step'), or None at shutdown."""
        with self.condition:
            deadline = time.time() + TICK_SECONDS
            was_paused = False
            while not shutting_down.is_set():
                if self.paused:
                    if not was_paused:
                        say("paused")
                        was_paused = True
                    self.next_tick_at = None
                    if self.steps_requested:
                        self.steps_requested -= 1
                        return "step"
                    self.condition.wait()
                    continue
                if was_paused:
                    say("resumed")
                    was_paused = False
                self.next_tick_at = deadline
                if self.woken:
                    self.woken = False
                    return "wake"
                if time.time() >= deadline:
                    return "timer"
                self.condition.wait(deadline - time.time())
            return None

    def status(self):
        with self.condition:
            return {"paused": self.paused, "next_tick_at": self.next_tick_at,
                    "tick_seconds": TICK_SECONDS, "tick_count": tick_count}


loop_timer = LoopTimer()
shutting_down = threading.Event()


def control_loop():
    """The control loop: tick, wait, tick again, until the process is stopped."""
    mode = "start"
    while True:
        try:
            run_tick(mode)
        except ShuttingDown:
            return
        except Exception as error:  # nothing short of a shutdown ends the loop
            say("tick_failed", error=describe(error))
            end_tick({}, [], failed=error)
        mode = loop_timer.wait_for_next_tick()
        if mode is None:  # shutting down
            return


# ---------------------------------------------------------------------------
# What the API shows: the last observation and the last ticks
# ---------------------------------------------------------------------------
# Written by the loop, read by the API thread, guarded by one lock.
status_lock = threading.Lock()
node_status = {node: {"up": False, "containers": [], "last_seen": None, "since": None, "error": None}
               for node in NODES}
recent_ticks = deque(maxlen=20)
tick_count = 0
last_tick_finished = time.time()
current_tick = None  # the tick being logged; only the loop thread touches it


def remember_observation(results):
    now = time.time()
    with status_lock:
        for node, result in results.items():
            up = not isinstance(result, Exception)
            status = node_status[node]
            if status["since"] is None or status["up"] != up:
                status["since"] = now
            status["up"] = up
            status["error"] = None if up else describe(result)
            if up:
                status["containers"], status["last_seen"] = result, now


def begin_tick(mode):
    global current_tick, tick_count
    tick_count += 1
    current_tick = {"number": tick_count, "mode": mode, "started_at": time.time(),
                    "steps": [], "actions": []}
    print("\n" + "=" * 70, flush=True)
    say("tick_" + mode if mode in ("wake", "step") else "tick", time=time.strftime("%H:%M:%S"))
    print("=" * 70, flush=True)


def end_tick(failures, unscheduled, failed=None):
    """Print the verdict and keep the finished tick for the API."""
    global last_tick_finished
    reasons = [f"{node}: {describe(error)}" for node, error in failures.items()]
    if unscheduled:
        reasons.append(message("unscheduled_reason", count=len(unscheduled)))
    if failed:
        reasons.append(describe(failed))
    verdict = message("not_converged" if reasons else "converged", reasons="; ".join(reasons))
    print(verdict, flush=True)
    now = time.time()
    current_tick.update(finished_at=now, converged=not reasons, verdict=verdict.strip(),
                        duration_ms=round(1000 * (now - current_tick["started_at"]), 1))
    with status_lock:
        recent_ticks.append(current_tick)
        last_tick_finished = now


def container_views(desired):
    """The API's view of each container: name, node and status."""
    with status_lock:
        seen = {node: set(status["containers"]) for node, status in node_status.items()
                if status["up"]}
    views = []
    for name, node in desired.items():
        if node is None:
            status = "unscheduled"
        elif name in seen.get(node, ()):
            status = "running"
        else:
            status = "pending"
        views.append({"name": name, "node": node, "status": status})
    return views


def node_views():
    with status_lock:
        return [{"name": node, "address": "%s:%d" % NODES[node], "handshakes": handshakes[node],
                 **node_status[node]} for node in NODES]


# ---------------------------------------------------------------------------
# The REST API: it only reads and writes the desired state, then wakes the loop
# ---------------------------------------------------------------------------
api = Flask(__name__)
api.config["MAX_CONTENT_LENGTH"] = 64 * 1024  # a name is short; refuse huge bodies


@api.errorhandler(HTTPException)
def json_error(error):
    return jsonify(error=error.description), error.code


@api.errorhandler(Exception)
def unexpected_error(error):
    # A bug or a full disk, never bad input: still JSON, never an HTML page.
    return jsonify(error=f"internal error: {describe(error)}"), 500


# Who may change the cluster. Kubernetes asks two questions of every request:
# who are you (authentication: here, do you hold the bearer token?) and may you
# do this (authorization: here, whoever holds it may do everything). Reading
# stays open, so a whole class can watch the loop without the token.
READ_ONLY_METHODS = ("GET", "HEAD", "OPTIONS")


@api.before_request
def require_token_to_write():
    """Refuse a request that changes something unless it carries the API_TOKEN (when one is set)."""
    if API_TOKEN is None or request.method in READ_ONLY_METHODS:
        return None  # None: Flask goes on to the route
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # compare_digest takes as long for a near miss as for a far one, so the
    # response time does not tell an attacker how many characters were right.
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), API_TOKEN.encode()):
        return None
    problem = "wrong token" if given else "no token"
    # The answer says how to send a token, never anything about the token itself.
    return (jsonify(error=f'{problem}: changing the cluster needs the header '
                          f'"Authorization: Bearer <token>" (the controller\'s API_TOKEN)'),
            401, {"WWW-Authenticate": "Bearer"})


@api.post("/api/containers")
def create_container():
    # force=True: a curl without "Content-Type: application/json" still works.
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        abort(400, 'the body must be a JSON object, like {"name": "nginx"}')
    name = body.get("name")
    if not isinstance(name, str):
        abort(400, '"name" is required and must be a string')
    if not is_valid_name(name):
        abort(400, f"{name!r} is not a valid name: use at most 63 lowercase letters, digits "
                   "and '-', starting and ending with a letter or digit (a DNS-1123 label)")
    with editing_desired_state() as desired:
        if name in desired:
            abort(409, f"container {name!r} already exists")
        desired[name] = None
    loop_timer.wake()
    return jsonify(container_views({name: None})[0]), 201


@api.get("/api/containers")
def list_containers():
    desired, _ = parse_desired_state(read_desired_text())
    return jsonify(container_views(desired))


@api.get("/api/containers/<name>")
def get_container(name):
    desired, _ = parse_desired_state(read_desired_text())
    if name not in desired:
        abort(404, f"no container named {name!r}")
    return jsonify(container_views({name: desired[name]})[0])


@api.delete("/api/containers/<name>")
def delete_container(name):
    with editing_desired_state() as desired:
        if name not in desired:
            abort(404, f"no container named {name!r}")
        node = desired.pop(name)
    loop_timer.wake()  # the loop stops it on its node
    return jsonify(name=name, node=node, deleted=True)


@api.get("/api/nodes")
def list_nodes():
    return jsonify(node_views())


@api.get("/healthz")
def healthz():
    loop = loop_timer.status()
    silent_for = time.time() - last_tick_finished
    # Paused on purpose is healthy; a loop that stopped ticking on its own is not.
    healthy = loop["paused"] or silent_for < 3 * TICK_SECONDS
    return jsonify(status="ok" if healthy else "stalled", seconds_since_last_tick=round(silent_for, 1),
                   **loop), (200 if healthy else 503)


# Teaching controls: the same as the page's buttons, usable with curl.
@api.get("/api/loop")
def loop_status():
    return jsonify(loop_timer.status())


@api.post("/api/loop/<command>")
def loop_command(command):
    actions = {"pause": loop_timer.pause, "resume": loop_timer.resume, "step": loop_timer.step}
    if command not in actions:
        abort(404, "loop commands are pause, step and resume")
    actions[command]()
    return jsonify(loop_timer.status())


@api.get("/api/state")
def state():
    """Everything the classroom page shows, in one document."""
    desired, problems = parse_desired_state(read_desired_text())
    with status_lock:
        ticks = list(recent_ticks)
    # "now": the page counts down to next_tick_at on the controller's clock, not its own.
    # token_required: the page shows whether it may write, without knowing the token.
    return jsonify(now=time.time(), nodes=node_views(), containers=container_views(desired),
                   ticks=ticks, loop=loop_timer.status(), token_required=API_TOKEN is not None,
                   invalid_lines=[{"number": n, "line": line, "reason": r} for n, line, r in problems])


@api.get("/")
def classroom_page():
    return send_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard.html"))


# ---------------------------------------------------------------------------
# The tick log, in English or in the seed's French
# ---------------------------------------------------------------------------
MESSAGES = {
    "en": {
        "tick": "TICK - {time}",
        "tick_wake": "TICK - {time} (woken by an API change)",
        "tick_step": "TICK - {time} (one step, loop paused)",
        "step_1": "\n1️⃣  OBSERVE the current state (SSH to the nodes)",
        "node_up": "  ✓ {node}: {containers}",
        "node_empty": "  - {node}: empty",
        "node_down": "  ⚠️  {node}: unavailable",
        "running_count": "   → {count} containers running on {nodes} nodes",
        "step_2": "\n2️⃣  READ the desired state",
        "bad_line": "  ⚠️  {file} line {number} ignored: {line!r} ({reason})",
        "declared_count": "   → {count} containers declared",
        "step_3": "\n3️⃣  CLEANUP dead nodes",
        "cleanup": "  💀 CLEANUP: {name} (node {node} down)",
        "step_4": "\n4️⃣  SCHEDULE unassigned containers",
        "schedule": "  📍 SCHEDULE: {name} → {node}",
        "unschedulable": "  ⏳ {name}: no live node, stays unscheduled",
        "step_5": "\n5️⃣  RECONCILE (diff + actions)",
        "start": "  ▶ START: {name} on {node}",
        "stop": "  ◼ STOP: {name} on {node}",
        "actions_failed": "  ✗ {node}: actions failed ({error}), retry next tick",
        "converged": "\n✅ Converged",
        "not_converged": "\n❌ Not converged: {reasons}",
        "unscheduled_reason": "{count} containers unscheduled",
        "tick_failed": "  ✗ tick failed: {error}, retry next tick",
        "paused": "\n⏸  Loop paused: no tick until step or resume (POST /api/loop/step or /resume)",
        "resumed": "\n⏯  Loop resumed",
        "started": "pull-mode controller: API on http://{host}:{port}, nodes {nodes}, a tick every {tick:g} s",
        "started_token": "pull-mode controller: API on http://{host}:{port} (writes need a token), "
                         "nodes {nodes}, a tick every {tick:g} s",
        "stopped": "pull-mode controller stopped",
    },
    "fr": {
        "tick": "TICK - {time}",
        "tick_wake": "TICK - {time} (réveillé par l'API)",
        "tick_step": "TICK - {time} (un pas, boucle en pause)",
        "step_1": "\n1️⃣  OBSERVER l'état actuel (SSH sur les noeuds)",
        "node_up": "  ✓ {node}: {containers}",
        "node_empty": "  - {node}: vide",
        "node_down": "  ⚠️  {node}: indisponible",
        "running_count": "   → {count} containers tournent sur {nodes} noeuds",
        "step_2": "\n2️⃣  RÉCUPÉRER l'état désiré",
        "bad_line": "  ⚠️  {file} ligne {number} ignorée : {line!r} ({reason})",
        "declared_count": "   → {count} containers déclarés",
        "step_3": "\n3️⃣  CLEANUP des noeuds morts",
        "cleanup": "  💀 CLEANUP: {name} (node {node} down)",
        "step_4": "\n4️⃣  SCHEDULER les containers non assignés",
        "schedule": "  📍 SCHEDULE: {name} → {node}",
        "unschedulable": "  ⏳ {name} : aucun noeud disponible, reste non assigné",
        "step_5": "\n5️⃣  RÉCONCILIER (diff + actions)",
        "start": "  ▶ START: {name} sur {node}",
        "stop": "  ◼ STOP: {name} sur {node}",
        "actions_failed": "  ✗ {node} : échec des actions ({error}), nouvel essai au prochain tick",
        "converged": "\n✅ Convergé",
        "not_converged": "\n❌ Non convergé : {reasons}",
        "unscheduled_reason": "{count} containers non assignés",
        "tick_failed": "  ✗ tick en échec : {error}, nouvel essai au prochain tick",
        "paused": "\n⏸  Boucle en pause : aucun tick avant step ou resume (POST /api/loop/step ou /resume)",
        "resumed": "\n⏯  Boucle relancée",
        "started": "contrôleur pull-mode : API sur http://{host}:{port}, noeuds {nodes}, un tick toutes les {tick:g} s",
        "started_token": "contrôleur pull-mode : API sur http://{host}:{port} (les écritures demandent un jeton), "
                         "noeuds {nodes}, un tick toutes les {tick:g} s",
        "stopped": "contrôleur pull-mode arrêté",
    },
}
ACTION_KINDS = ("cleanup", "schedule", "start", "stop")


def message(key, **values):
    return MESSAGES[LOG_LANG][key].format(**values)


def say(key, ok=True, **values):
    """Print one line of the tick log now, and keep it for the API and the page."""
    text = message(key, **values)
    print(text, flush=True)
    if current_tick is None or current_tick.get("finished_at"):
        return
    if key.startswith("step_"):
        current_tick["steps"].append({"number": int(key[-1]), "title": text.strip(), "lines": []})
    elif current_tick["steps"]:
        current_tick["steps"][-1]["lines"].append(text.strip())
    if key in ACTION_KINDS:
        current_tick["actions"].append(
            {"kind": key, "name": values["name"], "node": values["node"], "ok": ok})


def shown(name):
    """A container name as logged: garbage found on a node is shown quoted."""
    return name if is_valid_name(name) else repr(name)


def describe(error):
    return str(error) or type(error).__name__


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------

def check_configuration():
    if LOG_LANG not in MESSAGES:
        sys.exit(f"LOG_LANG must be one of {', '.join(MESSAGES)}, not {LOG_LANG!r}")
    for node in NODES:
        if not is_valid_name(node):
            sys.exit(f"NODES: {node!r} is not a valid node name")
    # An HTTP header cannot carry every character; say so without showing the token.
    if API_TOKEN is not None and not re.fullmatch(r"[\x21-\x7e]+", API_TOKEN):
        sys.exit("API_TOKEN must be printable ASCII without spaces (openssl rand -hex 16 makes one)")


def main():
    check_configuration()
    # The tick log is the lesson: keep out of it one access-log line per request,
    # and paramiko's traceback for every node that does not answer (the tick log
    # already says "unavailable").
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    server = make_server(API_HOST, API_PORT, api, threaded=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                     name="api", daemon=True).start()
    say("started_token" if API_TOKEN else "started", host=API_HOST, port=API_PORT,
        nodes=", ".join(NODES), tick=TICK_SECONDS)

    def stop(signum, frame):
        shutting_down.set()
        loop_timer.wake()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    loop = threading.Thread(target=control_loop, name="control-loop", daemon=True)
    loop.start()
    while not shutting_down.wait(0.5):
        pass
    loop.join(timeout=1)  # let a tick in progress finish; a hung one is abandoned
    for node in list(NODES):
        close_connection(node)
    server.shutdown()
    say("stopped")


if __name__ == "__main__":
    main()
