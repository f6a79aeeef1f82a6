"""pull-mode: the Kubernetes control loop, in one file you can read top to bottom.

You declare what should run (desired_state.txt, through a REST API), and a loop keeps
comparing it with what really runs on the nodes and acts on the difference, tick after
tick. Each tick re-reads the *whole* state (level-triggered, not edge-triggered): a
missed event, a hand edit, a node dying behind our back are all seen at the next tick.

    while True:                     control_loop(), then run_tick()    in Kubernetes
        1. get_current_state()      observe what each node runs        the kubelets' reports
        2. get_desired_state()      read what was declared             the API server, etcd
        3. cleanup_dead_nodes()     unassign what sat on dead nodes    node lifecycle controller
        4. schedule()               place what has no node             kube-scheduler
        5. reconcile()              diff, then start and stop          a controller's sync
        sleep TICK_SECONDS, or wake at once when the API changes something

Push or pull? In the talk this project grew from (github.com/silefort/duckConfKubernetes,
whose five steps and French log it keeps: LOG_LANG=fr), *push* mode is a central brain
sending orders ("start nginx on node-2"): lose one, or restart the node, and nobody
notices. *Pull* mode is declarative: agents keep converging on a desired state. In
Kubernetes, each node's kubelet watches the API server for the pods bound to its node and
makes the node run them; the scheduler only writes down which node. This controller is
the step between the two. It is declarative and level-triggered, like pull mode; but to
keep the lesson in one process the nodes run no agent: the controller itself reaches
into each node over SSH, reads what it runs and changes it, as a push controller would.
What matters survives: it never sends an order once and trusts it; it checks every tick.

A "container" is simulated: node N runs the names listed, one per line, in its file
N_running.txt. Starting appends a line; stopping removes it. An intruder is a line nobody
declared; a zombie, a container still on a node it was moved away from. A node is Ready
(it answers and works), NotReady (it answers, but fails) or Unknown (silent: from here a
crashed node and a cut cable look the same). Left out: real containers, etcd and its
watches, leader election, heartbeats. machinery.py holds what only makes this file robust
(checked settings, kept SSH connections, safe file writes, the log's words, the page's
data): every name it gives says what it does, so you need not read it.
"""

import os
import signal
import threading
import time
from collections import Counter
from typing import NamedTuple

from flask import Flask, abort, jsonify, request

import machinery

# ---------------------------------------------------------------------------
# Settings: environment variables (the defaults fit docker-compose.yml), checked
# ---------------------------------------------------------------------------
settings = machinery.Settings()  # a bad value: main() says which in one line, exit status 2

SSH_PORT = settings.port("SSH_PORT", 22)
# "node-1,node-2=10.0.0.2:2202": a node's address is its name unless given (compose's DNS).
NODES = settings.nodes("NODES", "node-1,node-2,node-3", default_port=SSH_PORT)
SSH_USER = settings.text("SSH_USER", "root")
SSH_KEY_FILE = settings.text("SSH_KEY_FILE", "") or None  # None: paramiko looks in ~/.ssh
# One slow node must not freeze the lesson: past this many seconds it is down.
SSH_TIMEOUT = settings.seconds("SSH_TIMEOUT", 3, more_than=0)
NODE_STATE_DIR = settings.text("NODE_STATE_DIR", "/app/nodes")  # on the nodes
DESIRED_STATE_FILE = settings.text("DESIRED_STATE_FILE", "desired_state.txt")
# Slow enough to read each tick on a projector, fast enough to see healing.
TICK_SECONDS = settings.seconds("TICK_SECONDS", 5, at_least=0.1)
# After a tick that acted, the next one comes this soon to check (a controller's requeue).
REQUEUE_SECONDS = 0.3
# How long a silent node keeps its containers. 0, the original project's choice: they move
# at the first missed observation. Kubernetes waits 50 s, then 300 s more (its grace
# period, then a toleration), because a crashed node and a cut cable look the same.
NODE_GRACE_SECONDS = settings.seconds("NODE_GRACE_SECONDS", 0, at_least=0)
# Loopback: this machine only, unless you decide (compose sets 0.0.0.0 in its container).
API_HOST = settings.text("API_HOST", "127.0.0.1")
API_PORT = settings.port("API_PORT", 8080)
# Unset: whoever reaches the API may change the cluster. Set: every change needs the header
# "Authorization: Bearer <API_TOKEN>"; reading stays open to all.
API_TOKEN = settings.token("API_TOKEN")
LOG_LANG = settings.choice("LOG_LANG", "en", ["en", "fr"])  # fr: the original project's words

# The machinery's objects: the log (printed, and kept for the page), the nodes over SSH,
# what they last showed, and the loop's alarm clock. SIGTERM or Ctrl-C sets `stopping`.
stopping = threading.Event()
log = machinery.TickLog(LOG_LANG, SSH_TIMEOUT)
nodes = machinery.Nodes(NODES, NODE_STATE_DIR, SSH_USER, SSH_KEY_FILE, SSH_TIMEOUT, stopping)
status = machinery.ClusterStatus(nodes)
timer = machinery.LoopTimer(stopping, log)


# ---------------------------------------------------------------------------
# The control loop: the five steps, a sleep, and again, until the process stops
# ---------------------------------------------------------------------------

def control_loop():
    """Tick, sleep, tick again, until SIGTERM or Ctrl-C."""
    reason = "start"  # why a tick runs: start, timer, wake (an API change), step, requeue
    failing = {}      # node -> why its last actions failed there: NotReady until one works
    while True:
        acted = False
        try:
            acted, failing = run_tick(reason, failing)  # the five steps
        except machinery.ShuttingDown:
            return
        except Exception as error:  # a bug, a full disk: a dead loop would watch nothing
            log.fail_tick(error)
        seconds, reason = when_to_tick_again(acted, reason)
        reason = timer.sleep(seconds, reason)  # sooner if the API wakes it or the teacher steps
        if reason is None:  # SIGTERM or Ctrl-C
            return


def run_tick(reason, failing):
    """One tick: the five steps. Returns (whether it started or stopped something, failing)."""
    log.begin_tick(reason)

    log.begin_step(1)  # OBSERVE what really runs (the kubelets report it)
    observed = get_current_state(failing)

    log.begin_step(2)  # READ what the users declared (the API server's objects)
    desired = get_desired_state()

    log.begin_step(3)  # CLEANUP dead nodes (the node lifecycle controller)
    # A node in its grace period keeps its containers: it may only be cut off.
    desired, orphans = cleanup_dead_nodes(desired, observed.live_nodes + list(observed.in_grace))
    explain_cleanup(orphans, observed)

    log.begin_step(4)  # SCHEDULE what has no node (kube-scheduler)
    desired, placements = schedule(desired, observed.live_nodes)
    explain_schedule(placements, desired)
    # Steps 3 and 4 decided on a copy: write their decisions into the file, and go on
    # with what it says now (the API may have changed it meanwhile).
    desired = desired_file.update(apply_decisions, orphans, placements)

    log.begin_step(5)  # RECONCILE: diff, then act (a controller's sync; the kubelet acts)
    acted, results = reconcile(observed, desired, failing)
    # The feedback into the next tick: a node whose command failed *there* will be
    # NotReady until an action works, as a kubelet reports its node NotReady when its
    # container runtime fails. A node that did not answer proves nothing either way.
    failing = still_failing(failing, results)

    # The verdict: ✅ if every action worked, every container has a node and no node is
    # silent in its grace period (nobody knows what it runs); else ❌ or ⏳, saying why.
    log.end_tick(results, [name for name, node in desired.items() if node is None],
                 observed.in_grace)
    return acted, failing


# ---------------------------------------------------------------------------
# The five steps (what is not a decision: asking the nodes, the file, the log)
# ---------------------------------------------------------------------------

class Observation(NamedTuple):
    """What step 1 saw."""
    running: dict     # node -> the names in its file, for every node that answered
    live_nodes: list  # the Ready nodes: they keep and get containers
    in_grace: dict    # Unknown nodes in their grace period: node -> (silent for, eviction in)
    conditions: dict  # node -> (Ready | NotReady | Unknown, reason)


# Step 1's memory: when each node last answered. Its silence, and its grace, count from there.
last_answered = {node: time.monotonic() for node in NODES}


def get_current_state(failing):
    """Step 1, observe: ask every node, all at once, what it runs and how it is.

    A node that does not answer is Unknown; one that answers but fails, or whose last
    actions failed (`failing`), is NotReady: facts to log, not errors."""
    answers = nodes.read_running_files()  # {node: (names, truncated), or the error}
    now = time.monotonic()
    conditions = node_conditions(answers, failing)
    running = {node: answer[0] for node, answer in answers.items() if not isinstance(answer, Exception)}
    for node in running:
        last_answered[node] = now
    live_nodes = [node for node in NODES if conditions[node][0] == "Ready"]
    in_grace = grace_periods(conditions, last_answered, now, NODE_GRACE_SECONDS)
    observation = Observation(running, live_nodes, in_grace, conditions)
    status.remember(observation)  # for the API and the page, before the log says it
    for node in NODES:
        condition, reason = conditions[node]
        if node in in_grace:
            silent_for, eviction_in = in_grace[node]
            log.say("node_waiting", node=node, silent=silent_for, left=eviction_in)
        elif condition == "Unknown":
            log.say("node_down", node=node)
        elif condition == "NotReady":
            log.say("node_not_ready", node=node, reason=reason)
        elif running[node]:
            log.say("node_up", node=node, containers=log.listing(running[node], answers[node][1]))
        else:
            log.say("node_empty", node=node)
    log.say("running_count", containers=log.count(sum(len(running[n]) for n in live_nodes), "container"),
            nodes=log.count(len(live_nodes), "node"))
    return observation


def get_desired_state():
    """Step 2, read: what desired_state.txt declares, {name: node or None}. Bad lines are
    logged and skipped: a typo in a hand edit must not stop the loop."""
    desired, problems = desired_file.read()
    log.say_bad_lines(problems, os.path.basename(DESIRED_STATE_FILE))
    log.say("declared_count", containers=log.count(len(desired), "container"))
    return desired


def explain_cleanup(orphans, observed):
    """Log why each container lost its node: down, not ready, or not a node at all."""
    now = time.monotonic()
    for name, node in orphans:
        if node not in NODES:
            why = "unknown_node"
            log.say("cleanup_unknown_node", name=name, node=node)
        elif observed.conditions[node][0] == "NotReady":
            why = "not_ready"
            log.say("cleanup_not_ready", name=name, node=node)
        else:
            why = "down"
            log.say("cleanup", name=name, node=node)
        silent_for = round(now - last_answered[node], 1) if node in NODES else None
        log.record("cleanup", name=name, node=node, why=why, grace_seconds=NODE_GRACE_SECONDS,
                   silent_for=silent_for)


def explain_schedule(placements, desired):
    """Log where each container went, and those that found no live node."""
    for name, node, loads in placements:
        log.say("schedule", name=name, node=node)
        log.record("schedule", name=name, node=node, loads=loads)
    for name, node in desired.items():
        if node is None:
            log.say("unschedulable", name=name)


def reconcile(observed, desired, failing):
    """Step 5: diff what each node runs against what it should run, then start and stop.

    All of a node's actions go in one SSH command, and the nodes act at once. A
    NotReady node is acted on too: its containers were moved away, so what still runs
    there is stopped. Returns (whether anything was started or stopped, {node acted on:
    None, or the error}); a failed action is simply tried again next tick."""
    plan = plan_reconcile(observed.running, desired, retry=failing)
    results = nodes.keep_and_start({node: (p.to_keep, p.to_start) for node, p in plan.items()})
    for node, p in plan.items():
        should_run = [name for name, assigned in desired.items() if assigned == node]
        log.record_actions(node, should_run, observed.running[node], p.to_start, p.to_stop,
                           results[node])
        log.say_each("stop", p.to_stop, node=node)  # ◼ STOP: app1 on node-1
        for name in p.to_start:
            log.say("start", name=name, node=node)  # ▶ START: app1 on node-2
        if results[node] is not None:
            log.say("actions_failed", node=node, error=log.describe(results[node]))
    return any(p.to_start or p.to_stop for node, p in plan.items() if results[node] is None), results


# ---------------------------------------------------------------------------
# The decisions: pure functions over plain data, tested without a network
# ---------------------------------------------------------------------------

def cleanup_dead_nodes(desired, holding_nodes):
    """Unassign every container whose node may no longer hold it. Returns (new desired, orphans).

    holding_nodes: the live nodes, and the silent ones still in their grace period.
    An orphan is (name, the node it lost); step 4 places it again at once."""
    cleaned, orphans = {}, []
    for name, node in desired.items():
        if node is not None and node not in holding_nodes:
            orphans.append((name, node))
            node = None
        cleaned[name] = node
    return cleaned, orphans


def schedule(desired, live_nodes):
    """Assign every unassigned container to a live node. Returns (new desired, placements).

    Each goes to the live node with the fewest containers, the first in NODES order on a
    tie: from empty nodes that is round-robin, and after a failure it fills the emptiest
    nodes first, so the load stays even. A placement is (name, node, the loads it
    compared): why node-2 and not node-3."""
    load = {node: 0 for node in live_nodes}
    for node in desired.values():
        if node in load:
            load[node] += 1
    scheduled, placements = {}, []
    for name, node in desired.items():
        if node is None and live_nodes:
            loads_seen = dict(load)
            node = min(live_nodes, key=lambda candidate: load[candidate])  # the first on a tie
            load[node] += 1
            placements.append((name, node, loads_seen))
        scheduled[name] = node
    return scheduled, placements


def apply_decisions(desired, orphans, placements):
    """Apply steps 3 and 4's decisions to `desired`, the file as it is now; return it.

    The API, or a teacher's editor, may have changed the file since step 2 read it, so a
    decision only applies to a line that still says what step 2 read: an orphan that is
    still on its dead node, a placement that still has no node (optimistic concurrency,
    like a Kubernetes update's resourceVersion). Another line is left alone: the next tick
    decides again, with fresh data."""
    for name, node in orphans:
        if desired.get(name) == node:
            desired[name] = None
    for name, node, _ in placements:
        if name in desired and desired[name] is None:
            desired[name] = node
    return desired


class NodePlan(NamedTuple):
    """What reconcile will do on one node."""
    to_start: list  # wanted, not running: a line to append
    to_stop: list   # running, not wanted (intruders, zombies, garbage, duplicates): for the log
    to_keep: list   # wanted and running once: the node's file keeps these lines, and only these


def diff_node(running, wanted):
    """What to start, stop and keep so that a node running `running` runs `wanted`, each once.

    Anything running but not wanted is stopped: an intruder, or a zombie left by a node
    that was down while its containers moved. A wanted container listed twice is stopped
    and started once again. The node's command keeps only `to_keep`: whatever else is in
    its file goes, even what we could not read (see machinery.MAX_READ_BYTES)."""
    # Counter: name -> how many lines list it. A dict and a set, not lists, so a flood
    # of 200,000 lines costs milliseconds (see docs/benchmark.md).
    listed = Counter(running)
    wanted_set = set(wanted)
    listed_twice = {name for name in wanted if listed[name] > 1}
    return NodePlan(to_start=[name for name in wanted if name not in listed or name in listed_twice],
                    to_stop=[name for name in listed if name not in wanted_set or name in listed_twice],
                    to_keep=[name for name in wanted if listed[name] == 1])


def plan_reconcile(observed, desired, retry=()):
    """The diff for every node that answered: {node: NodePlan}, for the nodes with work.

    retry: the nodes whose last actions failed. Each gets an action even with nothing to
    change (keeping every line): the only way to see that it works again."""
    wanted = {node: [] for node in observed}
    for name, node in desired.items():
        if node in wanted:
            wanted[node].append(name)
    plan = {}
    for node in observed:
        node_plan = diff_node(observed[node], wanted[node])
        if node_plan.to_start or node_plan.to_stop or node in retry:
            plan[node] = node_plan
    return plan


def node_conditions(answers, failing):
    """Each node's condition, as in Kubernetes' NodeReady: {node: (condition, reason)}.

    Ready: it answered and works. NotReady: it answered, but fails (its command failed,
    or its last actions did: `failing`). Unknown: it did not answer at all."""
    conditions = {}
    for node, answer in answers.items():
        if isinstance(answer, machinery.NodeError):
            conditions[node] = ("NotReady", log.describe(answer))
        elif isinstance(answer, Exception):
            conditions[node] = ("Unknown", log.describe(answer))
        elif node in failing:
            conditions[node] = ("NotReady", log.message("reason_actions_failed", error=failing[node]))
        else:
            conditions[node] = ("Ready", None)
    return conditions


def grace_periods(conditions, last_answered, now, grace):
    """Unknown nodes that keep their containers for now: {node: (silent for, eviction in)}, seconds.

    A node cut off by the network still runs its containers, and starting them elsewhere
    at once would run them twice. So, as Kubernetes does, we wait a while: a crashed node
    costs `grace` seconds of downtime, a short partition moves nothing."""
    in_grace = {}
    for node, (condition, _) in conditions.items():
        silent_for = now - last_answered[node]
        if condition == "Unknown" and silent_for < grace:
            in_grace[node] = (silent_for, grace - silent_for)
    return in_grace


def still_failing(failing, results):
    """The nodes NotReady at the next tick, {node: why}: `failing`, updated by this tick's
    actions. One that worked clears its node; one that failed on the node marks it."""
    failing = dict(failing)
    for node, error in results.items():
        if error is None:
            failing.pop(node, None)
        elif isinstance(error, machinery.NodeError):
            failing[node] = log.describe(error)
    return failing


def when_to_tick_again(acted, reason):
    """(seconds to sleep, why the next tick will run): the whole requeue rule.

    A tick that started or stopped something is checked REQUEUE_SECONDS later (a
    controller's requeue), once: if the check acts again, the timer decides, so a node
    that keeps changing cannot make the loop spin. Meanwhile an API change wakes the loop
    at once (a watch), and the timer ticks anyway (a resync): a missed wake-up is no loss."""
    if acted and reason != "requeue":
        return REQUEUE_SECONDS, "requeue"
    return TICK_SECONDS, "timer"


# ---------------------------------------------------------------------------
# desired_state.txt: what the users declared (the API server and etcd, in Kubernetes)
# ---------------------------------------------------------------------------
# One container per line: "nginx" (declared, no node yet) or "nginx:node-2" (assigned).
# Blank lines and "# comments" are fine, so a teacher may edit it by hand: the next tick
# reads it. Two writers change it, the API thread and the loop: desired_file.update()
# makes them take turns on one lock, and replaces the file only if nobody (a teacher's
# editor, which takes no lock) saved it meanwhile; else it starts again from that text.

def parse_desired_state(text):
    """The file's text -> ({name: node or None}, in file order; [problems]).

    A problem is (line number, line, reason): a bad line is reported and skipped."""
    desired, problems = {}, []
    for number, line in enumerate(machinery.split_lines(text), start=1):  # LF or CRLF
        try:
            entry = machinery.parse_line(line)  # "nginx : node-1" -> ("nginx", "node-1")
        except ValueError as error:
            problems.append((number, line, str(error)))
            continue
        if entry is None:  # a blank line or a comment
            continue
        name, node = entry
        if name in desired:
            problems.append((number, line, "duplicate"))
            continue
        desired[name] = node
    return desired, problems


desired_file = machinery.DesiredStateFile(DESIRED_STATE_FILE, parse_desired_state)


# ---------------------------------------------------------------------------
# The REST API: it only changes desired_state.txt and wakes the loop, which does the
# rest (in Kubernetes, the kube-apiserver stores objects; controllers act on them)
# ---------------------------------------------------------------------------
api = Flask(__name__)


def declare(desired, name):
    """Add the name, unscheduled; 409 if it is already declared."""
    if name in desired:
        abort(409, f"container {name!r} already exists")
    desired[name] = None


def forget(desired, name):
    """Remove the name; 404 if it is not declared. Returns the node it had."""
    if name not in desired:
        abort(404, f"no container named {name!r}")
    return desired.pop(name)


@api.post("/api/containers")
def create_container():
    """POST /api/containers {"name": "nginx"}: declare a container (201), then wake the loop.

    The woken tick schedules it ("nginx:node-2") and starts it; a check tick
    REQUEUE_SECONDS later sees it running."""
    body = request.get_json(force=True, silent=True)  # force: a curl without Content-Type works
    if not isinstance(body, dict):
        abort(400, 'the body must be a JSON object, like {"name": "nginx"}')
    name = body.get("name")
    if not isinstance(name, str):
        abort(400, '"name" is required and must be a string')
    if not machinery.is_valid_name(name):  # a name reaches a node's shell: check it here
        abort(400, f"{name!r} is not a valid name: use at most 63 lowercase letters, digits "
                   "and '-', starting and ending with a letter or digit (a DNS-1123 label)")
    desired_file.update(declare, name)
    timer.wake()
    return jsonify(status.container_views({name: None})[0]), 201


@api.get("/api/containers")
def list_containers():
    """GET /api/containers: every declared container, with its node and status."""
    desired, _ = desired_file.read()
    return jsonify(status.container_views(desired))


@api.get("/api/containers/<name>")
def get_container(name):
    """GET /api/containers/<name>: one container, or 404."""
    desired, _ = desired_file.read()
    if name not in desired:
        abort(404, f"no container named {name!r}")
    return jsonify(status.container_views({name: desired[name]})[0])


@api.delete("/api/containers/<name>")
def delete_container(name):
    """DELETE /api/containers/<name>: forget a container; the woken loop stops it on its node."""
    node = desired_file.update(forget, name)
    timer.wake()
    return jsonify(name=name, node=node, deleted=True)


# The rest of the API (JSON errors, the token, /api/nodes, /healthz, the teacher's
# /api/loop/pause|step|resume, the page and its /api/state) is machinery.
machinery.add_classroom_api(
    api, desired_file=desired_file, status=status, log=log, timer=timer, token=API_TOKEN,
    tick_seconds=TICK_SECONDS, grace_seconds=NODE_GRACE_SECONDS,
    page=os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard.html"))


# ---------------------------------------------------------------------------
# Entry point: the API thread and the control-loop thread
# ---------------------------------------------------------------------------

def main():
    """Check the settings, start the API thread and the control loop, stop on SIGTERM or Ctrl-C."""
    settings.exit_if_wrong()  # one line per bad setting, exit status 2: nothing starts
    server = machinery.quiet_server(api, API_HOST, API_PORT)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                     name="api", daemon=True).start()
    log.say("started_token" if API_TOKEN else "started",
            host=API_HOST if ":" not in API_HOST else f"[{API_HOST}]", port=API_PORT,
            nodes=", ".join(NODES), tick=TICK_SECONDS)

    def stop(signum, frame):
        """SIGTERM or Ctrl-C: end the loop (a tick in progress finishes or is abandoned)."""
        stopping.set()
        timer.wake()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    loop = threading.Thread(target=control_loop, name="control-loop", daemon=True)
    loop.start()
    while not stopping.wait(0.5):
        pass
    loop.join(timeout=1)  # let a tick in progress finish; a hung one is abandoned
    nodes.close_all()
    server.shutdown()
    log.say("stopped")


if __name__ == "__main__":
    main()
