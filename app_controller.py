"""pull-mode: the Kubernetes control loop, in one file you can read top to bottom.

"Pull mode" is how Kubernetes works: nobody pushes orders to the nodes. You
*declare* what you want; a controller keeps pulling the real state and the
declared state, compares them, and acts on the difference, again and again:

    while True:                          control_loop() and run_tick()
        1. get_current_state()           observe what each node runs (SSH)
        2. get_desired_state()           read what was declared (desired_state.txt)
        3. cleanup_dead_nodes()          forget assignments to nodes that are gone
        4. schedule()                    place unassigned containers on live nodes
        5. reconcile()                   diff observed vs desired, then start/stop
        (save_assignments() writes what steps 3 and 4 decided into the file)

A REST API (a Flask thread) only writes desired_state.txt and wakes the loop.
A "container" is simulated: node N runs the names listed, one per line, in its
file NODE_STATE_DIR/N_running.txt. Starting appends a line; stopping removes it.
"The seed" is the French project this one grew from (github.com/silefort/
duckConfKubernetes): same five steps; LOG_LANG=fr prints its log word for word.

Words: a tick is one pass of the five steps. A node is Ready (it answers and
works), NotReady (it answers, but fails) or Unknown (silent). An intruder is a line
nobody declared; a zombie, a container still on a node it was moved away from.

What happens when...
  * a node dies: step 1 gets no answer (Unknown); step 3 unassigns its
    containers, at once or once it has been silent for the grace period,
    NODE_GRACE_SECONDS (NotReady: at once); step 4 puts them on the emptiest nodes;
    step 5 starts them there. Back alive, its file still lists them: zombies.
  * you POST nginx: the API appends "nginx" to desired_state.txt and wakes the
    loop; step 4 makes the line "nginx:node-2"; step 5 appends nginx to node-2's
    file; a check tick 0.3 s later sees it running.
  * two writers change desired_state.txt at once: the API and the loop take
    turns (one lock); a teacher's editor takes none, so a write first checks
    the file is still as read, else starts again from the teacher's text.

Below: settings, the loop, the five steps, the pure decisions, then machinery (timer,
SSH, file, API, log). Left out: real containers, etcd, leader election, heartbeats.
"""

import errno
import hmac
import logging
import math
import os
import re
import shlex
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from typing import NamedTuple

import paramiko
from flask import Flask, abort, jsonify, request, send_file
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server


# ---------------------------------------------------------------------------
# Settings: environment variables (the defaults fit docker-compose.yml)
# ---------------------------------------------------------------------------
# A typo must not become a traceback in front of the class: a bad value is
# noted, and main() prints them all and exits with status 2 before starting.
configuration_errors = []


class SettingError(ValueError):
    """A setting's value is wrong; the message says what, for people."""


def setting(variable, default, convert, expected, is_ok=lambda value: True, secret=False):
    """The environment variable, converted; a bad value is noted (never shown if secret)."""
    raw = os.environ.get(variable, default)
    reason = f"expected {expected}"
    try:
        value = convert(raw)
        if is_ok(value):
            return value
    except SettingError as error:
        reason = str(error)
    except ValueError:
        pass
    configuration_errors.append(f"{variable}{'' if secret else '=' + repr(raw)}: {reason}")
    return convert(default)


# A name is a DNS-1123 label, as in Kubernetes: a-z, 0-9 and '-', alphanumeric at both
# ends, at most 63 characters. Safe, too, in a shell command and a sed pattern.
NAME_PATTERN = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"


def is_valid_name(name):
    """True if `name` is a DNS-1123 label (see NAME_PATTERN)."""
    return isinstance(name, str) and re.fullmatch(NAME_PATTERN, name) is not None


def parse_nodes(spec, default_port):
    """'node-1,node-2=10.0.0.2:2202,node-3=[::1]' -> {name: (host, port)}, or SettingError."""
    nodes = {}
    for entry in spec.split(","):
        name, _, address = (part.strip() for part in entry.partition("="))
        if not name:
            raise SettingError("an empty node name (a comma too many?)")
        if not is_valid_name(name):
            raise SettingError(f"{name!r} is not a valid node name (lowercase letters, digits, '-')")
        if name in nodes:
            raise SettingError(f"{name!r} is listed twice")
        address = address or name
        if address.startswith("["):  # [IPv6]:port
            host, _, port = address[1:].partition("]")
            port = port.removeprefix(":")
        elif address.count(":") == 1 or ":" not in address:  # host or host:port
            host, _, port = address.partition(":")
        else:
            raise SettingError(f"{address!r}: write host, host:port or [IPv6]:port")
        host, port = host.strip(), port.strip() or str(default_port)
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise SettingError(f"{name!r}: write host, host:port or [IPv6]:port, a port from 1 to 65535")
        nodes[name] = (host, int(port))
    return nodes


def finite(low):
    """A check for setting(): a finite number, at least `low`."""
    return lambda value: math.isfinite(value) and value >= low


def tcp_port(value):
    """A check for setting(): a TCP port number."""
    return 1 <= value <= 65535


SSH_PORT = setting("SSH_PORT", "22", int, "a port number, 1 to 65535", tcp_port)
NODES = setting("NODES", "node-1,node-2,node-3", lambda spec: parse_nodes(spec, SSH_PORT),
                "a list like node-1,node-2=10.0.0.2:22")
SSH_USER = os.environ.get("SSH_USER", "root")
SSH_KEY_FILE = os.environ.get("SSH_KEY_FILE") or None  # None: paramiko looks in ~/.ssh
# One slow node must not freeze the lesson: past this many seconds it is down.
SSH_TIMEOUT = setting("SSH_TIMEOUT", "3", float, "seconds, more than 0",
                      lambda value: math.isfinite(value) and value > 0)
NODE_STATE_DIR = os.environ.get("NODE_STATE_DIR", "/app/nodes")
DESIRED_STATE_FILE = os.environ.get("DESIRED_STATE_FILE", "desired_state.txt")
# Slow enough to read each tick on a projector, fast enough to see healing.
TICK_SECONDS = setting("TICK_SECONDS", "5", float, "seconds, at least 0.1", finite(0.1))
# How long a silent node keeps its containers. 0, the seed's choice: they move at the
# first missed observation. Kubernetes waits 50 s, then 300 s more (its grace period,
# then a toleration): from here a crashed node and a cut cable look the same.
NODE_GRACE_SECONDS = setting("NODE_GRACE_SECONDS", "0", float, "seconds, at least 0", finite(0))
# After a tick that acted, the next one comes this soon to check (a controller's requeue).
REQUEUE_SECONDS = 0.3
# Loopback: this machine only, unless you decide (compose sets 0.0.0.0 in its container).
API_HOST = os.environ.get("API_HOST", "127.0.0.1")
API_PORT = setting("API_PORT", "8080", int, "a port number, 1 to 65535", tcp_port)
# Unset (or empty): anyone who reaches the API may change the cluster. Set: every
# change needs "Authorization: Bearer <API_TOKEN>"; reading stays open to all.
API_TOKEN = setting("API_TOKEN", "", lambda text: text or None,
                    "printable ASCII without spaces (openssl rand -hex 16 makes one)",
                    lambda token: token is None or re.fullmatch(r"[\x21-\x7e]+", token), secret=True)
LOG_LANG = setting("LOG_LANG", "en", str, "en or fr", lambda language: language in ("en", "fr"))


# ---------------------------------------------------------------------------
# The control loop
# ---------------------------------------------------------------------------

def control_loop():
    """Tick, wait, tick again, until the process is stopped."""
    trigger = "start"
    while True:
        acted = False
        try:
            acted = run_tick(trigger)  # the five steps: observe, read, cleanup, schedule, reconcile
        except ShuttingDown:
            return
        except Exception as error:  # a bug, a full disk: a dead loop would watch nothing
            fail_tick(error)
        # A tick that acted is checked soon after, once: if the check acts again, the
        # timer decides, so a node that keeps changing cannot make the loop spin.
        check_soon = acted and trigger != "requeue"
        trigger = loop_timer.wait_for_next_tick(check_soon)
        if trigger is None:  # the process got SIGTERM or Ctrl-C
            return


# ---------------------------------------------------------------------------
# The five steps
# ---------------------------------------------------------------------------

def run_tick(trigger):
    """One pass of the control loop: the five steps. Returns True if it started or stopped something."""
    begin_tick(trigger)  # trigger: why this tick runs (timer, wake, step, requeue, start)

    begin_step(1)  # OBSERVE what really runs (the kubelets report it)
    observed = get_current_state()

    begin_step(2)  # READ what the users declared (the API server's objects)
    declared = get_desired_state()

    begin_step(3)  # CLEANUP dead nodes (the node lifecycle controller)
    # A node in its grace period keeps its containers: it may only be cut off.
    holding_nodes = observed.live_nodes + list(observed.in_grace)
    assignments, orphans = cleanup_dead_nodes(declared, holding_nodes)
    explain_cleanup(orphans, observed)

    begin_step(4)  # SCHEDULE what has no node (kube-scheduler)
    assignments, placements = schedule(assignments, observed.live_nodes)
    explain_schedule(placements, assignments)
    # What steps 3 and 4 decided goes into the file; what it says now is desired.
    desired = save_assignments(declared, assignments)

    begin_step(5)  # RECONCILE: diff, then act (every controller's sync)
    failed_nodes, acted = reconcile(observed.running, desired)

    end_tick(failed_nodes, unscheduled=[name for name, node in assignments.items() if node is None])
    return acted


# Why each node's last actions failed, when the node answered but its command
# failed there: next tick that node is NotReady, until an action works again.
last_action_errors = {}
# When each node last answered (time.monotonic()): the start of its silence.
last_answered = {node: time.monotonic() for node in NODES}


class Observation(NamedTuple):
    """What step 1 saw."""
    running: dict     # node -> the names in its file, for every node that answered
    live_nodes: list  # the Ready nodes: they keep and get containers
    in_grace: dict    # Unknown nodes in their grace period: node -> (silent for, eviction in)
    conditions: dict  # node -> (Ready | NotReady | Unknown, reason)


def get_current_state():
    """Step 1, observe: ask every node what it runs and how it is.

    A node that does not answer is Unknown, one that answers but fails is
    NotReady: facts to log, not errors. Only Ready nodes are live."""
    answers = on_every_node({node: observe_command(node) for node in NODES})
    now = time.monotonic()
    conditions = node_conditions(answers, last_action_errors)
    running, truncated = {}, set()
    for node, answer in answers.items():
        if not isinstance(answer, Exception):
            last_answered[node] = now
            running[node], was_truncated = parse_running_file(answer)
            if was_truncated:
                truncated.add(node)
    live_nodes = [node for node in NODES if conditions[node][0] == "Ready"]
    in_grace = grace_periods(conditions, last_answered, now, NODE_GRACE_SECONDS)
    for node in NODES:
        condition, reason = conditions[node]
        if node in in_grace:
            silent_for, eviction_in = in_grace[node]
            say("node_waiting", node=node, silent=silent_for, left=eviction_in)
        elif condition == "Unknown":
            say("node_down", node=node)
        elif condition == "NotReady":
            say("node_not_ready", node=node, reason=reason)
        elif running[node]:
            say("node_up", node=node, containers=listing(running[node], truncated=node in truncated))
        else:
            say("node_empty", node=node)
    say("running_count", containers=count_of(sum(len(running[node]) for node in live_nodes),
                                             "container"),
        nodes=count_of(len(live_nodes), "node"))
    observation = Observation(running, live_nodes, in_grace, conditions)
    remember_observation(observation)
    return observation


def get_desired_state():
    """Step 2: read what desired_state.txt declares. Bad lines are logged and skipped."""
    declared, problems = parse_desired_state(read_desired_text())
    for number, line, reason in problems[:LIST_LIMIT]:
        say("bad_line", file=os.path.basename(DESIRED_STATE_FILE), number=number,
            line=cut_text(line), reason=reason)
    if len(problems) > LIST_LIMIT:
        say("bad_lines_more", more=count_of(len(problems) - LIST_LIMIT, "number"))
    say("declared_count", containers=count_of(len(declared), "container"))
    return declared


def explain_cleanup(orphans, observation):
    """Log why each container lost its node: down, not ready, or not a node at all."""
    now = time.monotonic()
    for name, node in orphans:
        if node not in NODES:
            why = "unknown_node"
            say("cleanup_unknown_node", name=name, node=node)
        elif observation.conditions[node][0] == "NotReady":
            why = "not_ready"
            say("cleanup_not_ready", name=name, node=node)
        else:
            why = "down"
            say("cleanup", name=name, node=node)
        silent_for = now - last_answered[node] if node in NODES else None
        record_decision("cleanup", name=name, node=node, why=why, grace_seconds=NODE_GRACE_SECONDS,
               silent_for=None if silent_for is None else round(silent_for, 1))


def explain_schedule(placements, assignments):
    """Log where each container went, and those that found no live node."""
    for name, node, loads in placements:
        say("schedule", name=name, node=node)
        record_decision("schedule", name=name, node=node, loads=loads)
    for name, node in assignments.items():
        if node is None:
            say("unschedulable", name=name)


def save_assignments(declared, assignments):
    """Write the assignments that steps 3 and 4 changed; return what the file declares now.

    The API may have changed the file since step 2 read it, so we re-read it and
    only change a line that still says what we read (optimistic concurrency,
    like resourceVersion on a Kubernetes update). A line changed meanwhile
    is left alone: the next tick decides again with fresh data."""
    def keep_what_we_decided(current):
        """Change only the lines that still say what step 2 read."""
        for name, node in assignments.items():
            if node != declared[name] and name in current and current[name] == declared[name]:
                current[name] = node
        return dict(current)

    return update_desired_state(keep_what_we_decided)


def reconcile(observed, desired):
    """Step 5: diff observed against desired on every node that answered, then start/stop.

    All of a node's actions go in one SSH command; nodes act in parallel.
    Returns ({node: error} for the nodes whose actions failed (retried next
    tick), whether anything was started or stopped).
    A NotReady node is acted on too: its containers were moved away, so what
    still runs there is stopped, and a node that works again proves it here."""
    plan = plan_reconcile(observed, desired)
    for node in last_action_errors:
        if node in observed and node not in plan:
            # Nothing to start or stop there, but act anyway (an action that keeps
            # every line): that is how a NotReady node shows it works again.
            plan[node] = NodePlan([], [], list(observed[node]))
    commands = {node: act_command(node, node_plan.to_keep, node_plan.to_start)
                for node, node_plan in plan.items()}
    results = on_every_node(commands)
    failed_nodes = {node: result for node, result in results.items() if isinstance(result, Exception)}
    acted = any(plan[node].to_start or plan[node].to_stop for node in plan if node not in failed_nodes)
    for node, result in results.items():
        if isinstance(result, NodeError):
            last_action_errors[node] = describe(result)
        elif node not in failed_nodes:
            last_action_errors.pop(node, None)
    for node, (to_start, to_stop, _) in plan.items():
        ok = node not in failed_nodes
        record_decision("reconcile", node=node, ok=ok, error=describe(failed_nodes[node]) if not ok else None,
               should_run=[name for name, assigned in desired.items() if assigned == node][:LIST_LIMIT],
               ran=[cut_text(name) for name in observed[node][:LIST_LIMIT]],
               ran_count=len(observed[node]), start=to_start[:LIST_LIMIT],
               stop=[cut_text(name) for name in to_stop[:LIST_LIMIT]], stop_count=len(to_stop))
        for name in to_stop[:LIST_LIMIT]:
            say("stop", name=shown(name), node=node)
        if len(to_stop) > LIST_LIMIT:
            say("stop_more", more=count_of(len(to_stop) - LIST_LIMIT, "number"), node=node)
        for name in to_start:
            say("start", name=name, node=node)
        if not ok:
            say("actions_failed", node=node, error=describe(failed_nodes[node]))
    return failed_nodes, acted


# ---------------------------------------------------------------------------
# The decisions: pure functions over plain data, tested without a network
# (in Kubernetes: the node lifecycle controller, the kube-scheduler, every
# controller's diff)
# ---------------------------------------------------------------------------

def cleanup_dead_nodes(assignments, holding_nodes):
    """Unassign every container whose node may no longer hold it. Returns (new assignments, [(name, node)]).

    holding_nodes: the live nodes, and the silent ones still in their grace period."""
    cleaned, orphans = {}, []
    for name, node in assignments.items():
        if node is not None and node not in holding_nodes:
            orphans.append((name, node))
            node = None
        cleaned[name] = node
    return cleaned, orphans


def schedule(assignments, live_nodes):
    """Assign every unassigned container to a live node. Returns (new assignments, placements).

    Each goes to the live node with the fewest containers, the first in NODES
    order on a tie: from empty nodes that is round-robin, and after a failure
    it fills the emptiest nodes first, so the load stays even. A placement is
    (name, node, the loads it compared): why node-2 and not node-3."""
    load = {node: 0 for node in live_nodes}
    for node in assignments.values():
        if node in load:
            load[node] += 1
    scheduled, placements = {}, []
    for name, node in assignments.items():
        if node is None and live_nodes:
            loads_seen = dict(load)
            node = min(live_nodes, key=lambda candidate: load[candidate])
            load[node] += 1
            placements.append((name, node, loads_seen))
        scheduled[name] = node
    return scheduled, placements


class NodePlan(NamedTuple):
    """What reconcile will do on one node."""
    to_start: list  # wanted, not running: append a line
    to_stop: list   # running, not wanted: intruders, zombies, garbage, duplicates
    to_keep: list   # wanted and running once: the only lines the node's file keeps


def diff_node(running, wanted):
    """What to start, stop and keep so that a node running `running` runs `wanted`, each once.

    Returns a NodePlan. Anything running but not wanted is
    stopped: an intruder, or a zombie left by a node that was down while its
    containers moved. A wanted container listed twice is stopped and started
    once again."""
    # Counter: name -> how many lines list it. A dict and a set, not lists, so a
    # flood of 200,000 lines costs milliseconds (see docs/benchmark.md).
    listed = Counter(running)
    wanted_set = set(wanted)
    listed_twice = {name for name in wanted if listed[name] > 1}
    to_stop = [name for name in listed if name not in wanted_set or name in listed_twice]
    to_start = [name for name in wanted if name not in listed or name in listed_twice]
    to_keep = [name for name in wanted if listed[name] == 1]
    return NodePlan(to_start, to_stop, to_keep)


def plan_reconcile(observed, desired):
    """The diff for every observed node: {node: NodePlan}, only for nodes with work."""
    wanted = {node: [] for node in observed}
    for name, node in desired.items():
        if node in wanted:
            wanted[node].append(name)
    plan = {}
    for node in observed:
        node_plan = diff_node(observed[node], wanted[node])
        if node_plan.to_start or node_plan.to_stop:
            plan[node] = node_plan
    return plan


def node_conditions(answers, last_action_errors):
    """Each node's condition, as in Kubernetes' NodeReady: {node: (condition, reason)}.

    Ready: it answered and works. NotReady: it answered, but fails (its command
    failed, or its last actions did). Unknown: it did not answer at all, and
    from here we cannot tell a crashed node from a cut cable."""
    conditions = {}
    for node, answer in answers.items():
        if isinstance(answer, NodeError):
            conditions[node] = ("NotReady", describe(answer))
        elif isinstance(answer, Exception):
            conditions[node] = ("Unknown", describe(answer))
        elif node in last_action_errors:
            conditions[node] = ("NotReady", message("reason_actions_failed",
                                                    error=last_action_errors[node]))
        else:
            conditions[node] = ("Ready", None)
    return conditions


def grace_periods(conditions, last_answered, now, grace):
    """Unknown nodes that keep their containers for now: {node: (silent for, eviction in)} in seconds.

    From here a crashed node and a node cut off by the network look the same;
    the cut-off one still runs its containers, and starting them elsewhere at
    once would run them twice. So, as Kubernetes does, we wait a while."""
    in_grace = {}
    for node, (condition, _) in conditions.items():
        silent_for = now - last_answered[node]
        if condition == "Unknown" and silent_for < grace:
            in_grace[node] = (silent_for, grace - silent_for)
    return in_grace


# ---------------------------------------------------------------------------
# When to tick: the timer, the API's wake-ups, the teacher's pause and step
# ---------------------------------------------------------------------------
# Watch plus resync, as Kubernetes informers do: an API change wakes the loop
# at once (the watch: fast), and the timer ticks every TICK_SECONDS anyway (the
# resync: safe). Each tick re-reads the whole state (level-triggered), so a
# missed wake-up, a hand edit or a node dying behind our back is seen next tick.

def next_trigger(now, deadline, paused, steps_requested, woken, check_soon):
    """Why a tick runs now, or None to keep waiting.

    A tick runs when the teacher steps, or, unless the loop is paused, when the
    API woke it or the timer ran out."""
    if steps_requested:
        return "step"
    if paused:
        return None
    if woken:
        return "wake"
    if now >= deadline:
        return "requeue" if check_soon else "timer"
    return None


class LoopTimer:
    """The loop's alarm clock: it sleeps until next_trigger() says a tick is due."""

    def __init__(self):
        self.condition = threading.Condition()  # every change below notifies it
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
        """No tick runs until step or resume."""
        with self.condition:
            self.paused = True
            self.condition.notify_all()

    def resume(self):
        """Tick at once, then on the timer again."""
        with self.condition:
            self.paused, self.steps_requested, self.woken = False, 0, True
            self.condition.notify_all()

    def step(self):
        """Run exactly one tick now and stay paused, like a debugger's step."""
        with self.condition:
            self.paused = True
            self.steps_requested += 1
            self.condition.notify_all()

    def wait_for_next_tick(self, check_soon=False):
        """Sleep until the next tick is due; return why it runs, or None at shutdown.

        check_soon: the last tick acted, so the next one comes after
        REQUEUE_SECONDS, not TICK_SECONDS. The timer runs on time.monotonic(),
        which only goes forward: set the laptop's clock back an hour, the loop
        still ticks on time."""
        with self.condition:
            deadline = time.monotonic() + (REQUEUE_SECONDS if check_soon else TICK_SECONDS)
            said_paused = False
            while not shutting_down.is_set():
                now = time.monotonic()
                trigger = next_trigger(now, deadline, self.paused, self.steps_requested,
                                       self.woken, check_soon)
                if trigger:
                    if trigger == "step":
                        self.steps_requested -= 1
                    if trigger == "wake":
                        self.woken = False
                    if said_paused and not self.paused:
                        say("resumed")
                    return trigger
                if self.paused and not said_paused:
                    say("paused")
                    said_paused = True
                self.next_tick_at = None if self.paused else time.time() + deadline - now
                self.condition.wait(None if self.paused else deadline - now)
            return None

    def status(self):
        """The loop's state, for the API and the page."""
        with self.condition:
            return {"paused": self.paused, "next_tick_at": self.next_tick_at,
                    "tick_seconds": TICK_SECONDS, "tick_count": tick_count}


loop_timer = LoopTimer()
shutting_down = threading.Event()


# ---------------------------------------------------------------------------
# Talking to the nodes over SSH (the kubelet's job, in Kubernetes)
# ---------------------------------------------------------------------------
# One SSH connection per node, kept open across ticks: a handshake costs tens
# of milliseconds of crypto, a command on an open connection a round trip.
connections = {}  # node -> paramiko.SSHClient
connections_lock = threading.Lock()
handshakes = {node: 0 for node in NODES}  # shown by GET /api/nodes: reuse is visible


class NodeError(Exception):
    """The node answered, but the command failed there: the node is NotReady."""


class ShuttingDown(Exception):
    """The process is stopping: its closed connections say nothing about the nodes."""


class GaveUp(Exception):
    """The tick stopped waiting for this node; its late work must change nothing."""


def open_connection(node):
    """A new SSH connection to the node, with a deadline on every stage of the handshake."""
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
    # Speed (see the benchmark in docs/): a tick sends a node small commands in
    # a row, and with Nagle's algorithm each one waits for a delayed ACK, +40 ms.
    client.get_transport().sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    handshakes[node] += 1
    return client


def get_connection(node, gave_up):
    """The node's open connection, or a new one if it has none that works.

    Only a worker its tick still waits for may install a new connection: a
    late one (its tick gave up on it, and the next tick may already have
    opened a fresh connection) closes its own and changes nothing."""
    with connections_lock:
        client = connections.get(node)
    transport = client and client.get_transport()
    if transport and transport.is_active():
        return client
    new_client = open_connection(node)
    with connections_lock:
        late = gave_up.is_set()
        if not late:
            broken_client = connections.get(node)
            connections[node] = new_client
    if late:
        new_client.close()
        raise GaveUp()
    if broken_client:
        broken_client.close()
    return new_client


def close_connection(node, client=None):
    """Close the node's connection (only if it is still `client`, when given)."""
    with connections_lock:
        if client is not None and connections.get(node) is not client:
            return  # a newer connection took its place: not ours to close
        client = connections.pop(node, None)
    if client:
        client.close()


def run_on_node(node, command, gave_up):
    """Run a shell command on a node over its open connection; return its output (bytes)."""
    client = get_connection(node, gave_up)
    if gave_up.is_set():
        raise GaveUp()  # too late: the tick has moved on without this node
    try:
        _, stdout, stderr = client.exec_command(command, timeout=SSH_TIMEOUT)
        # Read the output *before* waiting for the exit status: a command whose
        # output fills the SSH window waits for a reader, and we would wait forever.
        output = stdout.read()
        errors = stderr.read(4096).decode("utf-8", errors="replace")
        if not stdout.channel.status_event.wait(SSH_TIMEOUT):
            raise TimeoutError("no exit status")
        if stdout.channel.exit_status == -1:  # closed before it said how the command ended
            raise ConnectionError("the connection closed during the command")
    except Exception:
        close_connection(node, client)  # broken or hung: open a new one next time
        raise
    if stdout.channel.exit_status != 0:
        first_line = (errors.strip().splitlines() or [""])[0][:200]
        raise NodeError(first_line or f"exit status {stdout.channel.exit_status}")
    return output


def on_every_node(commands):
    """Run {node: shell command} on all those nodes at once; return {node: output or the exception}.

    One thread per node, so a hung node costs one SSH_TIMEOUT per tick, not
    one per node. Daemon threads: a node still hanging never blocks shutdown."""
    results = {}
    gave_up = threading.Event()

    def work(node):
        """One node's command, in its own thread; an error is a result too."""
        try:
            results[node] = run_on_node(node, commands[node], gave_up)
        except Exception as error:
            results[node] = error

    threads = [threading.Thread(target=work, args=(node,), daemon=True) for node in commands]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + SSH_TIMEOUT + 1
    for thread in threads:
        thread.join(max(0, deadline - time.monotonic()))
    gave_up.set()  # from now on, a late worker changes nothing
    if shutting_down.is_set():
        raise ShuttingDown()  # so no tick acts on nodes that only *look* down
    for node in commands:
        if node not in results:
            close_connection(node)
            results[node] = TimeoutError()
    return {node: results[node] for node in commands}


# A node's file may hold anything a student wrote into it. We read at most this
# much of it: a 10 MB prank costs one megabyte, and what lies past it is not
# wanted anyway (the next action on that node removes it).
MAX_READ_BYTES = 1024 * 1024


def running_file(node):
    """Where a node keeps the list of what it runs."""
    return f"{NODE_STATE_DIR}/{node}_running.txt"


def observe_command(node):
    """The shell command that reads a node's file, once it checked that the node can work.

    A node that answers but could not run containers (no sed, its file turned
    into a directory) fails here with a reason: it is NotReady, not down."""
    return (f"f={shlex.quote(running_file(node))}; "
            "command -v sed >/dev/null || { echo 'sed: not found' >&2; exit 1; }; "
            "[ ! -e \"$f\" ] || [ -f \"$f\" ] || { echo \"$f: not a regular file\" >&2; exit 1; }; "
            f"[ ! -e \"$f\" ] || head -c {MAX_READ_BYTES + 1} \"$f\"")


def parse_running_file(output):
    """The names in a node's file (bytes, maybe cut at MAX_READ_BYTES). Returns (names, truncated).

    A file cut short ends with a partial line: we keep it. It is garbage (or
    the start of one), so step 5 acts on that node, and its action, keeping
    only the wanted lines, also removes everything we did not read."""
    truncated = len(output) > MAX_READ_BYTES
    text = output[:MAX_READ_BYTES].decode("utf-8", errors="replace")
    return [line for line in text.split("\n") if line], truncated


def act_command(node, keep, to_start):
    """One shell command that makes a node run `keep` + `to_start`: one round trip.

    The file keeps only the lines of `keep` (sed deletes every other line:
    intruders, zombies, garbage, however many), then `to_start` is appended.
    A list of what to keep, not of what to delete: a flood of 200,000
    intruders costs one sed expression, and garbage never reaches the shell.
    Plain POSIX commands, so a BusyBox node (Alpine) works as well as Debian."""
    for name in [*keep, *to_start]:
        if not is_valid_name(name):  # never put an unchecked name in a shell
            raise ValueError(f"refusing {name!r}: not a valid name")
    # A whole line, ^(app1|app4)$, so keeping app1 does not keep app10.
    sed_program = "/^(" + "|".join(keep) + ")$/!d" if keep else "d"
    steps = [
        f"d={shlex.quote(NODE_STATE_DIR)}; f={shlex.quote(running_file(node))}; mkdir -p \"$d\"",
        # A missing file is created owned like its directory, so the teacher
        # who owns nodes/ on the host can still edit it by hand.
        '{ [ -e "$f" ] || { : > "$f" && { chown "$(stat -c %u:%g "$d")" "$f" 2>/dev/null || true; }; }; }',
        # sed -i writes a new file and renames it: atomic, and it keeps the owner.
        f"sed -i -E -e {shlex.quote(sed_program)} \"$f\"",
    ]
    if to_start:
        # If the last line has no newline, add one: what we append starts a new line.
        steps.append('{ [ -z "$(tail -c 1 "$f")" ] || echo >> "$f"; }')
        steps.append(f"printf '%s\\n' {' '.join(map(shlex.quote, to_start))} >> \"$f\"")
    return " && ".join(steps)


# ---------------------------------------------------------------------------
# The desired state: desired_state.txt (the API server and etcd, in Kubernetes)
# ---------------------------------------------------------------------------
# One container per line: "name" (declared, not scheduled yet) or "name:node".
# Blank lines and "# comments" are allowed, so a teacher can edit it by hand.

# The API thread and the loop both change the file: every read-modify-write
# holds this one lock, so neither ever loses the other's update (a teacher's
# editor takes no lock: see update_desired_state()).
desired_lock = threading.Lock()


BYTE_ORDER_MARK = "\ufeff"  # what Notepad may put at the start of a UTF-8 file


def parse_line(line):
    """'app1' -> ('app1', None), 'app1 : node-2' -> ('app1', 'node-2'), blank or comment -> None.

    Raises ValueError with the reason when the line is not valid. Spaces around
    the colon are fine: a teacher typing "nginx : node-1" means nginx on node-1."""
    code = line.partition("#")[0].strip()
    if not code:
        return None
    name, colon, node = (part.strip() for part in code.partition(":"))
    if not is_valid_name(name):
        raise ValueError("not a valid name")
    if colon and not is_valid_name(node):
        raise ValueError("not a valid node name")
    return name, (node if colon else None)


def split_lines(text):
    """The file's lines without their endings, whether they end in LF or CRLF (Windows)."""
    text = text.removeprefix(BYTE_ORDER_MARK)
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the text ended with a newline: no line after it
    return [line.removesuffix("\r") for line in lines]


def parse_desired_state(text):
    """Parse the file's text into ({name: node or None} in file order, [problems]).

    A problem is (line number, line, reason): bad lines are reported and
    skipped, never fatal, because a hand edit must not stop the loop."""
    desired, problems = {}, []
    for number, line in enumerate(split_lines(text), start=1):
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
    """One line of desired_state.txt: 'nginx' or 'nginx:node-1'."""
    return name if node is None else f"{name}:{node}"


def render_desired_state(text, desired):
    """Rewrite the file's text so that it declares `desired`, changing only the lines that must.

    Comments, blank lines and invalid lines stay as they are; a container no
    longer desired loses its line(s); a new one gets a line at the end. The
    file keeps its own line endings (CRLF if it was saved on Windows) and its
    byte order mark, if it had one."""
    lines, seen = [], set()
    for line in split_lines(text):
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
    newline = "\r\n" if "\r\n" in text else "\n"
    bom = BYTE_ORDER_MARK if text.startswith(BYTE_ORDER_MARK) else ""
    return bom + "".join(line + newline for line in lines)


def read_desired_text():
    """The text of desired_state.txt, line endings untouched ("" when there is no file)."""
    try:
        with open(DESIRED_STATE_FILE, encoding="utf-8", errors="replace", newline="") as file:
            return file.read()
    except FileNotFoundError:
        return ""


def write_atomically(path, text, unless_changed_since=False):
    """Write to a temp file in the same directory, fsync, then rename over the file.

    A reader (or a crash) sees the old file or the new one, never half of one.
    unless_changed_since: a file_version(); if the file is no longer that
    version when we are about to rename, write nothing and return False.
    The new file keeps the old one's owner and mode: the controller often runs
    as root (in its container), and the teacher who owns the file must still
    be able to edit it by hand afterwards."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        owner = os.stat(path)
    except FileNotFoundError:
        owner = os.stat(directory)  # a new file belongs to whoever owns the directory
    fd, temp_path = tempfile.mkstemp(dir=directory, prefix=".desired_state.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp_path, 0o644 if stat.S_ISDIR(owner.st_mode) else stat.S_IMODE(owner.st_mode))
        if (owner.st_uid, owner.st_gid) != (os.geteuid(), os.getegid()):
            try:
                os.chown(temp_path, owner.st_uid, owner.st_gid)
            except PermissionError:
                pass  # not root: the file becomes ours, which we can still edit
        if unless_changed_since is not False and file_version(path) != unless_changed_since:
            os.unlink(temp_path)
            return False  # someone edited it meanwhile: the caller starts again
        os.replace(temp_path, path)
        return True
    except BaseException:
        os.unlink(temp_path)
        raise


class EditedMeanwhile(Exception):
    """desired_state.txt kept changing under us: give up this once, nothing was written."""


def update_desired_state(change):
    """Let change(desired) modify the declared containers, then save them; return what change returns.

    Two writers at once: the API and the loop both hold desired_lock, so they
    take turns. A teacher's editor takes no lock, so just before replacing the
    file we check it is still the version we read (compare-and-swap, as a
    Kubernetes update checks resourceVersion); if not, we start again from the
    teacher's text. Only a save landing in the microseconds between that check
    and the rename could still be lost, instead of the milliseconds of a whole
    read, fsync and rename."""
    with desired_lock:
        for _ in range(10):
            version = file_version(DESIRED_STATE_FILE)
            text = read_desired_text()
            declared, _ = parse_desired_state(text)
            desired = dict(declared)
            result = change(desired)
            if desired == declared:
                return result  # nothing to write
            if write_atomically(DESIRED_STATE_FILE, render_desired_state(text, desired),
                                unless_changed_since=version):
                return result
        raise EditedMeanwhile("desired_state.txt keeps changing; try again")


def file_version(path):
    """What identifies one version of a file: inode, size, modification time (None: no file)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


# ---------------------------------------------------------------------------
# What the API shows: the last observation and the last ticks (in Kubernetes,
# the nodes' and pods' status, and events)
# ---------------------------------------------------------------------------
# Written by the loop, read by the API thread, guarded by one lock.
status_lock = threading.Lock()


def unobserved_node():
    """What the API says of a node before its first observation."""
    return {"condition": "Unknown", "reason": None, "up": False, "containers": [],
            "container_count": 0, "last_seen": None, "since": None, "error": None,
            "eviction_in": None, "eviction_at": None}


node_status = {node: unobserved_node() for node in NODES}
running_names = {node: set() for node in NODES}  # what each node ran when last seen, in full
recent_ticks = deque(maxlen=20)
tick_count = 0
failed_ticks_in_a_row = 0
last_tick_finished = time.monotonic()
current_tick = None  # the tick being logged; only the loop thread touches it
MAX_LINES_KEPT = 200  # per step of a tick, for the page: the log itself has them all


def remember_observation(observation):
    """Keep what step 1 saw for the API: each node's condition and what it ran (cut to LIST_LIMIT)."""
    now = time.time()
    with status_lock:
        for node, (condition, reason) in observation.conditions.items():
            status = node_status[node]
            if status["since"] is None or status["condition"] != condition:
                status["since"] = now
            status.update(condition=condition, reason=reason, up=condition == "Ready",
                          error=reason, eviction_in=None, eviction_at=None)
            if node in observation.in_grace:  # in its grace period: when will it be evicted?
                _, eviction_in = observation.in_grace[node]
                status.update(eviction_in=round(eviction_in, 1), eviction_at=now + eviction_in)
            if node in observation.running:
                names = observation.running[node]
                status.update(containers=[cut_text(name) for name in names[:LIST_LIMIT]],
                              container_count=len(names), last_seen=now)
                running_names[node] = set(names)


def begin_tick(trigger):
    """Print a tick's header (its time, and why it runs), and open its record for the page."""
    global current_tick, tick_count
    tick_count += 1
    current_tick = {"number": tick_count, "mode": trigger, "started_at": time.time(),
                    "steps": [], "actions": [],
                    "decisions": {"cleanup": [], "schedule": [], "reconcile": []}}
    emit("\n" + "=" * 70)
    say("tick_" + trigger if trigger in ("wake", "step", "requeue") else "tick",
        time=time.strftime("%H:%M:%S"))
    emit("=" * 70)


def end_tick(failed_nodes, unscheduled, failed=None):
    """Print the verdict and keep the finished tick for the API."""
    global last_tick_finished, failed_ticks_in_a_row
    reasons = [f"{node}: {describe(error)}" for node, error in failed_nodes.items()]
    if unscheduled:
        reasons.append(message("unscheduled_reason",
                               containers=count_of(len(unscheduled), "container")))
    if failed:
        reasons.append(describe(failed))
    verdict = message("not_converged" if reasons else "converged", reasons="; ".join(reasons))
    emit(verdict)
    now = time.time()
    current_tick.update(finished_at=now, converged=not reasons, failed=failed is not None,
                        verdict=verdict.strip(), actions=actions_of(current_tick["decisions"]),
                        duration_ms=round(1000 * (now - current_tick["started_at"]), 1))
    with status_lock:
        recent_ticks.append(current_tick)
        last_tick_finished = time.monotonic()
        failed_ticks_in_a_row = failed_ticks_in_a_row + 1 if failed else 0


def actions_of(decisions):
    """The tick's actions, one per container, for the page's "… sent" marks."""
    actions = [{"kind": step, "name": d["name"], "node": d["node"], "ok": True}
               for step in ("cleanup", "schedule") for d in decisions[step]]
    for d in decisions["reconcile"]:
        actions += [{"kind": "stop", "name": name, "node": d["node"], "ok": d["ok"]} for name in d["stop"]]
        actions += [{"kind": "start", "name": name, "node": d["node"], "ok": d["ok"]} for name in d["start"]]
    return actions


def fail_tick(error):
    """A tick raised: log it and end it as failed; the next tick retries from scratch."""
    try:
        if current_tick is None or current_tick.get("finished_at"):
            begin_tick("start")  # it failed before it began
        say("tick_failed", error=describe(error))
        end_tick({}, [], failed=error)
    except Exception:
        pass  # even the report failed: the loop goes on, /healthz tells


def container_views(desired):
    """The API's view of each container: name, node, status, and where else it may run.

    Status: running (seen on its node), pending (not seen there yet), unknown
    (its node does not answer: nobody knows), unscheduled (no node yet).
    also_on: unreachable nodes that still listed it when last seen: after a
    partition it may be running there too, twice."""
    with status_lock:
        conditions = {node: status["condition"] for node, status in node_status.items()}
        seen = {node: running_names[node] for node in node_status}
    views = []
    for name, node in desired.items():
        if node is None:
            status = "unscheduled"
        elif conditions.get(node) == "Unknown":
            status = "unknown"
        elif conditions.get(node) == "Ready" and name in seen[node]:
            status = "running"
        else:
            status = "pending"
        also_on = [other for other in NODES if other != node and conditions[other] == "Unknown"
                   and name in seen[other]]
        views.append({"name": name, "node": node, "status": status, "also_on": also_on})
    return views


def node_views():
    """The API's view of each node: its condition, what it ran, since when."""
    with status_lock:
        return [{"name": node, "address": address(node), "handshakes": handshakes[node],
                 **node_status[node]} for node in NODES]


# ---------------------------------------------------------------------------
# The REST API: it only reads and writes the desired state, then wakes the
# loop (kube-apiserver's job, in Kubernetes)
# ---------------------------------------------------------------------------
api = Flask(__name__)
api.config["MAX_CONTENT_LENGTH"] = 64 * 1024  # a name is short; refuse huge bodies


@api.errorhandler(HTTPException)
def json_error(error):
    """Every HTTP error (400, 401, 404, 405, 409, 413) as JSON, never an HTML page."""
    return jsonify(error=error.description), error.code


@api.errorhandler(EditedMeanwhile)
def edited_meanwhile(error):
    """The file changed under us ten times in a row: nothing was written, say so."""
    return jsonify(error=str(error)), 409


@api.errorhandler(Exception)
def unexpected_error(error):
    """A bug or a full disk, never bad input: still JSON, never an HTML page."""
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
    """POST /api/containers {"name": "nginx"}: declare a container (201), then wake the loop."""
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
    def declare(desired):
        """Add the name, unscheduled; 409 if it is already declared."""
        if name in desired:
            abort(409, f"container {name!r} already exists")
        desired[name] = None

    update_desired_state(declare)
    loop_timer.wake()
    return jsonify(container_views({name: None})[0]), 201


@api.get("/api/containers")
def list_containers():
    """GET /api/containers: every declared container, with its node and status."""
    desired, _ = parse_desired_state(read_desired_text())
    return jsonify(container_views(desired))


@api.get("/api/containers/<name>")
def get_container(name):
    """GET /api/containers/<name>: one container, or 404."""
    desired, _ = parse_desired_state(read_desired_text())
    if name not in desired:
        abort(404, f"no container named {name!r}")
    return jsonify(container_views({name: desired[name]})[0])


@api.delete("/api/containers/<name>")
def delete_container(name):
    """DELETE /api/containers/<name>: forget a container; the loop then stops it."""
    def forget(desired):
        """Remove the name; 404 if it is not declared. Returns the node it had."""
        if name not in desired:
            abort(404, f"no container named {name!r}")
        return desired.pop(name)

    node = update_desired_state(forget)
    loop_timer.wake()  # the loop stops it on its node
    return jsonify(name=name, node=node, deleted=True)


@api.get("/api/nodes")
def list_nodes():
    """GET /api/nodes: each node's condition and what it ran."""
    return jsonify(node_views())


@api.get("/healthz")
def healthz():
    """200 while the loop ticks and its ticks work; 503 when it stalled or keeps failing."""
    loop = loop_timer.status()
    with status_lock:
        silent_for = time.monotonic() - last_tick_finished
        failing = failed_ticks_in_a_row >= 3
    # A tick may legitimately take SSH_TIMEOUT + 1 s (a hung node) on top of the
    # wait: twice that with no finished tick means the loop is stuck.
    stalled = silent_for > 2 * (TICK_SECONDS + SSH_TIMEOUT + 1)
    # Paused on purpose is healthy; a loop that stopped ticking on its own is not.
    status = "ok" if loop["paused"] else "stalled" if stalled else "failing" if failing else "ok"
    return jsonify(status=status, seconds_since_last_tick=round(silent_for, 1),
                   failed_ticks_in_a_row=failed_ticks_in_a_row,
                   **loop), (200 if status == "ok" else 503)


# Teaching controls: the same as the page's buttons, usable with curl.
@api.get("/api/loop")
def loop_status():
    """GET /api/loop: paused or not, when the next tick runs, how many ticks so far."""
    return jsonify(loop_timer.status())


@api.post("/api/loop/<command>")
def loop_command(command):
    """POST /api/loop/pause, /step or /resume: the teacher's controls."""
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
    return jsonify(now=time.time(), utc_offset=time.localtime().tm_gmtoff, lang=LOG_LANG,
                   grace_seconds=NODE_GRACE_SECONDS, token_required=API_TOKEN is not None,
                   nodes=node_views(), containers=container_views(desired),
                   ticks=ticks, loop=loop_timer.status(),
                   invalid_lines=[{"number": n, "line": cut_text(line), "reason": r}
                                  for n, line, r in problems[:LIST_LIMIT]],
                   invalid_line_count=len(problems))


@api.get("/")
def classroom_page():
    """GET /: the classroom page (dashboard.html), which polls /api/state."""
    return send_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard.html"))


# ---------------------------------------------------------------------------
# The tick log, in English or in the seed's French (kubectl get events and
# the controllers' logs, in Kubernetes)
# ---------------------------------------------------------------------------
# A long list (200,000 intruders in a node's file) is cut in the log and in the API after this
# many names: "… and 199,980 more".
LIST_LIMIT = 20

MESSAGES = {
    "en": {
        "tick": "TICK - {time}",
        "tick_wake": "TICK - {time} (woken by an API change)",
        "tick_step": "TICK - {time} (one step, loop paused)",
        "tick_requeue": "TICK - {time} (checking the last actions)",
        "step_1": "\n1️⃣  OBSERVE the current state (SSH to the nodes)",
        "node_up": "  ✓ {node}: {containers}",
        "node_empty": "  - {node}: empty",
        "node_down": "  ⚠️  {node}: unavailable",
        "node_not_ready": "  ⚠️  {node}: not ready ({reason})",
        "node_waiting": "  ⚠️  {node}: unavailable for {silent:.0f} s, eviction in {left:.0f} s",
        "running_count": "   → {containers} running on {nodes}",
        "step_2": "\n2️⃣  READ the desired state",
        "bad_line": "  ⚠️  {file} line {number} ignored: {line!r} ({reason})",
        "bad_lines_more": "  ⚠️  … and {more} more invalid lines",
        "declared_count": "   → {containers} declared",
        "step_3": "\n3️⃣  CLEANUP dead nodes",
        "cleanup": "  💀 CLEANUP: {name} (node {node} down)",
        "cleanup_not_ready": "  💀 CLEANUP: {name} (node {node} not ready)",
        "cleanup_unknown_node": "  💀 CLEANUP: {name} (node {node} unknown: not in NODES)",
        "step_4": "\n4️⃣  SCHEDULE unassigned containers",
        "schedule": "  📍 SCHEDULE: {name} → {node}",
        "unschedulable": "  ⏳ {name}: no live node, stays unscheduled",
        "step_5": "\n5️⃣  RECONCILE (diff + actions)",
        "start": "  ▶ START: {name} on {node}",
        "stop": "  ◼ STOP: {name} on {node}",
        "stop_more": "  ◼ STOP: … and {more} more on {node}",
        "actions_failed": "  ✗ {node}: actions failed ({error}), retry next tick",
        "converged": "\n✅ Converged",
        "not_converged": "\n❌ Not converged: {reasons}",
        "unscheduled_reason": "{containers} unscheduled",
        "tick_failed": "  ✗ tick failed: {error}, retry next tick",
        "paused": "\n⏸  Loop paused: no tick until step or resume (POST /api/loop/step or /resume)",
        "resumed": "\n⏯  Loop resumed",
        "started": "pull-mode controller: API on http://{host}:{port}, nodes {nodes}, a tick every {tick:g} s",
        "started_token": "pull-mode controller: API on http://{host}:{port} (writes need a token), "
                         "nodes {nodes}, a tick every {tick:g} s",
        "stopped": "pull-mode controller stopped",
        "more": "… and {more} more",
        "more_unread": "… and more (only the first {size} of the file read)",
        "container": ("container", "containers"),
        "node": ("node", "nodes"),
        "reason_timeout": "no answer within {seconds:g} s",
        "reason_dns": "name not found (DNS)",
        "reason_refused": "connection refused",
        "reason_unreachable": "host unreachable",
        "reason_auth": "authentication failed (is the controller's key authorized?)",
        "reason_lost": "connection lost",
        "reason_actions_failed": "its last actions failed: {error}",
    },
    "fr": {
        "tick": "TICK - {time}",
        "tick_wake": "TICK - {time} (réveillé par l'API)",
        "tick_step": "TICK - {time} (un pas, boucle en pause)",
        "tick_requeue": "TICK - {time} (vérification des dernières actions)",
        "step_1": "\n1️⃣  OBSERVER l'état actuel (SSH sur les noeuds)",
        "node_up": "  ✓ {node}: {containers}",
        "node_empty": "  - {node}: vide",
        "node_down": "  ⚠️  {node}: indisponible",
        "node_not_ready": "  ⚠️  {node}: pas prêt ({reason})",
        "node_waiting": "  ⚠️  {node}: indisponible depuis {silent:.0f} s, éviction dans {left:.0f} s",
        "running_count": "   → {containers} tournent sur {nodes}",
        "step_2": "\n2️⃣  RÉCUPÉRER l'état désiré",
        "bad_line": "  ⚠️  {file} ligne {number} ignorée : {line!r} ({reason})",
        "bad_lines_more": "  ⚠️  … et {more} autres lignes invalides",
        "declared_count": "   → {containers} déclarés",
        "step_3": "\n3️⃣  CLEANUP des noeuds morts",
        "cleanup": "  💀 CLEANUP: {name} (node {node} down)",
        "cleanup_not_ready": "  💀 CLEANUP: {name} (node {node} pas prêt)",
        "cleanup_unknown_node": "  💀 CLEANUP: {name} (node {node} inconnu : absent de NODES)",
        "step_4": "\n4️⃣  SCHEDULER les containers non assignés",
        "schedule": "  📍 SCHEDULE: {name} → {node}",
        "unschedulable": "  ⏳ {name} : aucun noeud disponible, reste non assigné",
        "step_5": "\n5️⃣  RÉCONCILIER (diff + actions)",
        "start": "  ▶ START: {name} sur {node}",
        "stop": "  ◼ STOP: {name} sur {node}",
        "stop_more": "  ◼ STOP: … et {more} de plus sur {node}",
        "actions_failed": "  ✗ {node} : échec des actions ({error}), nouvel essai au prochain tick",
        "converged": "\n✅ Convergé",
        "not_converged": "\n❌ Non convergé : {reasons}",
        "unscheduled_reason": "{containers} non assignés",
        "tick_failed": "  ✗ tick en échec : {error}, nouvel essai au prochain tick",
        "paused": "\n⏸  Boucle en pause : aucun tick avant step ou resume (POST /api/loop/step ou /resume)",
        "resumed": "\n⏯  Boucle relancée",
        "started": "contrôleur pull-mode : API sur http://{host}:{port}, noeuds {nodes}, un tick toutes les {tick:g} s",
        "started_token": "contrôleur pull-mode : API sur http://{host}:{port} (les écritures demandent un jeton), "
                         "noeuds {nodes}, un tick toutes les {tick:g} s",
        "stopped": "contrôleur pull-mode arrêté",
        "more": "… et {more} de plus",
        "more_unread": "… et d'autres (seul le premier {size} du fichier est lu)",
        # The seed's own wording: "1 containers tournent sur 3 noeuds".
        "container": ("containers", "containers"),
        "node": ("noeuds", "noeuds"),
        "reason_timeout": "pas de réponse en {seconds:g} s",
        "reason_dns": "nom introuvable (DNS)",
        "reason_refused": "connexion refusée",
        "reason_unreachable": "hôte injoignable",
        "reason_auth": "authentification refusée (la clé du contrôleur est-elle autorisée ?)",
        "reason_lost": "connexion perdue",
        "reason_actions_failed": "ses dernières actions ont échoué : {error}",
    },
}


def message(key, **values):
    """The log line `key` in LOG_LANG, with its values filled in."""
    return MESSAGES[LOG_LANG][key].format(**values)


def emit(text):
    """Print one line of the log. A closed or broken stdout (`| head`) must not stop the loop."""
    try:
        print(text, flush=True)
    except (OSError, ValueError):
        pass  # the line is lost, the tick goes on; /api/state still has it


def begin_step(number):
    """Print a step's title, and open its record for the page."""
    title = message(f"step_{number}")
    emit(title)
    if current_tick is not None and not current_tick.get("finished_at"):
        current_tick["steps"].append({"number": number, "title": title.strip(), "lines": []})


def say(key, **values):
    """Print one line of the tick log now, and keep it with its step for the page."""
    text = message(key, **values)
    emit(text)
    if current_tick is None or current_tick.get("finished_at") or not current_tick["steps"]:
        return
    lines = current_tick["steps"][-1]["lines"]
    if len(lines) < MAX_LINES_KEPT:  # the page's copy is bounded; the log has every line
        lines.append(text.strip())


def record_decision(step, **decision):
    """Record one decision of this tick, as data, for the page (which explains it)."""
    if current_tick is not None and not current_tick.get("finished_at"):
        decisions = current_tick["decisions"][step]
        if len(decisions) < MAX_LINES_KEPT:
            decisions.append(decision)


def count_of(count, unit):
    """'1 container', '2 containers', '199,990' (unit "number"): English plurals, the seed's French."""
    if LOG_LANG == "fr":
        text = f"{count:,}".replace(",", " ")
    else:
        text = f"{count:,}"
    if unit == "number":
        return text
    singular, plural = MESSAGES[LOG_LANG][unit]
    return f"{text} {singular if count == 1 else plural}"


def listing(names, truncated=False):
    """Names for one log line, cut after LIST_LIMIT: 'a, b, … and 199,990 more'."""
    shown_names = [shown(name) for name in names[:LIST_LIMIT]]
    if len(names) > LIST_LIMIT:
        shown_names.append(message("more", more=count_of(len(names) - LIST_LIMIT, "number")))
    if truncated:
        shown_names.append(message("more_unread", size=f"{MAX_READ_BYTES // 1024 // 1024} MiB"))
    return ", ".join(shown_names)


def cut_text(text, limit=120):
    """A line a student may have made 1 MB long, cut to fit on one line of the log."""
    return text if len(text) <= limit else text[:limit] + "…"


def shown(name):
    """A container name as logged: garbage found on a node is shown quoted (and cut)."""
    return name if is_valid_name(name) else cut_text(repr(name), 40)


def address(node):
    """host:port of a node, with an IPv6 address in brackets."""
    host, port = NODES[node]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe(error):
    """Why something failed, in words for people rather than Python's exception text."""
    if isinstance(error, paramiko.ssh_exception.NoValidConnectionsError):
        error = next(iter(error.errors.values()), error)  # the socket error inside
    # paramiko says "Error reading SSH protocol banner" or "Timeout opening channel."
    # when the node is silent past SSH_TIMEOUT.
    if isinstance(error, (TimeoutError, socket.timeout)) or any(
            word in str(error).lower() for word in ("banner", "timeout")):
        return message("reason_timeout", seconds=SSH_TIMEOUT)
    if isinstance(error, socket.gaierror):
        return message("reason_dns")
    if isinstance(error, ConnectionRefusedError):
        return message("reason_refused")
    if isinstance(error, OSError) and error.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return message("reason_unreachable")
    if isinstance(error, paramiko.AuthenticationException):
        return message("reason_auth")
    if isinstance(error, (EOFError, ConnectionError, paramiko.SSHException)):
        return message("reason_lost")
    return cut_text(str(error) or type(error).__name__, 200)


# ---------------------------------------------------------------------------
# Entry point: check the settings, start the API thread and the loop
# ---------------------------------------------------------------------------

def check_configuration():
    """Stop at once, with one line per bad setting and exit status 2, if a setting is wrong."""
    for error in configuration_errors:
        print(f"pull-mode: bad setting {error}", file=sys.stderr)
    if configuration_errors:
        sys.exit(2)


def main():
    """Check the settings, start the API thread and the control loop, stop on SIGTERM or Ctrl-C."""
    check_configuration()
    # The tick log is the lesson: keep out of it one access-log line per request,
    # and paramiko's traceback for every node that does not answer (the tick log
    # already says "unavailable").
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    server = make_server(API_HOST, API_PORT, api, threaded=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                     name="api", daemon=True).start()
    say("started_token" if API_TOKEN else "started",
        host=API_HOST if ":" not in API_HOST else f"[{API_HOST}]", port=API_PORT,
        nodes=", ".join(NODES), tick=TICK_SECONDS)

    def stop(signum, frame):
        """SIGTERM or Ctrl-C: end the loop (a tick in progress finishes or is abandoned)."""
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
