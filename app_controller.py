"""The Kubernetes control loop, in one file you can read top to bottom.

You declare what should run, through a REST API that writes desired_state.txt. A loop
compares that with what really runs on the nodes and acts on the difference. Each tick starts
again from the whole state, so the loop is level-triggered: a missed event, a hand edit or a
node dying behind our back is seen at the next tick. An edge-triggered loop, acting once per
event, would miss them for good. Only two facts go from one tick to the next, and a restart
forgets them: when each node last answered (its grace period counts from there), and whose
last write failed (a full disk still reads fine, so only a failed write shows it).

    while True:                     control_loop(), then run_tick()    in Kubernetes
        1. get_current_state()      observe what each node runs        the kubelets' reports
        2. get_desired_state()      read what was declared             the API server, etcd
        3. cleanup_dead_nodes()     unassign what sat on dead nodes    node lifecycle controller
        4. schedule()               place what has no node             kube-scheduler
        5. reconcile()              diff, then start and stop          each kubelet's sync
        sleep TICK_SECONDS, or less: 0.3 s after a tick that acted, at once when woken
In Kubernetes each step is a program of its own with its own loop, all running at once.

Push or pull? The words, and this project's name, pull-mode, come from the talk it grew from,
github.com/silefort/duckConfKubernetes. It compares:

               the center keeps               who changes a node
    push       orders ("start nginx there")   the center, once per order: a lost one is lost
    pull       what should run (declared)     each node's own agent, again and again
    this file  what should run (declared)     the center, this loop, again at every tick

Kubernetes is pull: each node's kubelet watches the API server for its pods and runs them.
So this file is not pull mode. It keeps what makes pull converge: a declared state, compared
at every tick, so a lost action is redone. But to stay one program you can read, it runs no
agent on the nodes. Its loop reaches into them over SSH: pull's state, push's delivery.

Words:
    container  a line in node N's file, N_running.txt (simulated: append starts, remove stops).
    intruder   a line that nobody declared.
    zombie     a line a node kept (as a disk would) while it was away and its container moved.
    Ready      the node answers, and its commands work. It keeps its containers, gets new ones.
    NotReady   it answers, but a command fails there. Its containers move; it gets no new ones.
    Unknown    no answer within SSH_TIMEOUT, or SSH refused us. Its containers stay during its
               grace period (NODE_GRACE_SECONDS, 0 by default), then move; it gets no new ones.

machinery.py holds what this file stands on. You need not read it; trust it to do this:
    nodes         run one shell command on every node at once, each within SSH_TIMEOUT
    desired_file  read and save desired_state.txt: one lock, a version check, atomic saves
    timer         sleep until the next tick is due; timer.wake() (the API) cuts it short
    log           print the tick's lines (in English or French), keep them for the page
kubernetes_api.py answers the real kubectl from the same file and the same loop.
"""

import os
import threading
import time
from collections import Counter
from typing import NamedTuple

from flask import Flask, abort, jsonify, request

import kubernetes_api
import machinery

# --- Settings: environment variables, checked at start -----------------------
settings = machinery.Settings()

SSH_PORT = settings.port("SSH_PORT", 22)
# Each node is reached at its name (compose's DNS), unless given: "node-1,node-2=10.0.0.2:2202".
NODES = settings.nodes("NODES", "node-1,node-2,node-3", default_port=SSH_PORT)
SSH_USER = settings.text("SSH_USER", "root")
SSH_KEY_FILE = settings.text("SSH_KEY_FILE", "") or None  # None: paramiko looks in ~/.ssh
# How long a node may take to answer before it is Unknown. All nodes are asked at once.
SSH_TIMEOUT = settings.seconds("SSH_TIMEOUT", 3, more_than=0)
NODE_STATE_DIR = settings.text("NODE_STATE_DIR", "/app/nodes")  # on the nodes
DESIRED_STATE_FILE = settings.text("DESIRED_STATE_FILE", "desired_state.txt")
# Slow enough to read each tick on a projector, fast enough to see healing.
TICK_SECONDS = settings.seconds("TICK_SECONDS", 5, at_least=0.1)
REQUEUE_SECONDS = 0.3  # after a tick that acted, the next comes this soon to check it (requeue)
# How long an Unknown node keeps its containers (see grace_periods). The default is the
# original project's choice: the containers move at the node's first silence.
NODE_GRACE_SECONDS = settings.seconds("NODE_GRACE_SECONDS", 0, at_least=0)
API_HOST = settings.text("API_HOST", "127.0.0.1")  # this machine only (compose: 0.0.0.0)
API_PORT = settings.port("API_PORT", 8080)
# If unset, anyone may change the cluster; if set, a change needs "Authorization: Bearer <it>".
API_TOKEN = settings.token("API_TOKEN")
LOG_LANG = settings.choice("LOG_LANG", "en", ["en", "fr"])  # fr: the original project's words

shutting_down = threading.Event()  # set by SIGTERM or Ctrl-C
log = machinery.TickLog(LOG_LANG, SSH_TIMEOUT)  # the tick's log, and what the page shows of it
nodes = machinery.Nodes(NODES, NODE_STATE_DIR, SSH_USER, SSH_KEY_FILE, SSH_TIMEOUT, shutting_down)
status = machinery.ClusterStatus(nodes)  # the last observation, as the API and the page show it
timer = machinery.LoopTimer(shutting_down, log)  # the loop's clock; the API wakes it
# node -> when it last answered (at start: now). Only step 1 changes it, so it lives here;
# failed_writes goes from a tick's step 5 to the next tick's step 1, so run_tick passes it on.
last_answered = {node: time.monotonic() for node in NODES}


# --- The control loop: the five steps, a sleep, and again --------------------
def control_loop():
    """Tick, sleep, tick again, until SIGTERM or Ctrl-C."""
    trigger = "start"  # why a tick runs: start, timer, wake (the API), step (the teacher), requeue
    failed_writes = {}  # node -> why its last write failed there (see still_failing)
    while True:
        acted = False
        try:
            acted, failed_writes = run_tick(trigger, failed_writes)  # the five steps
        except machinery.ShuttingDown:
            return
        except Exception as error:  # a bug, a full disk here, a hand edit mid-tick: keep watching
            log.fail_tick(error)  # the tick ends ❌ Not converged, with the error
        seconds, reason = when_to_tick_again(acted, trigger)
        # Sleep that long. An API change, even one made during this tick, ends the sleep at once.
        trigger = timer.sleep(seconds, reason)  # why the next tick runs; None: we are stopping
        if trigger is None:
            return


def run_tick(trigger, failed_writes):
    """One tick: the five steps. Returns (did it start or stop something?, failed_writes).

    A POST of nginx, as the log tells it (cut short), then the requeue tick that checks it:
        TICK - 21:43:40 (woken by an API change)
          📍 SCHEDULE: nginx → node-1          (step 4)
          ▶ START: nginx on node-1             (step 5)
        ✅ Converged
        TICK - 21:43:41 (checking the last actions)
          ✓ node-1: nginx                      (step 1)
        ✅ Converged
    """
    log.begin_tick(trigger)

    log.begin_step(1)  # OBSERVE what really runs (in Kubernetes, each kubelet reports it)
    observed = get_current_state(failed_writes)

    # Steps 2 to 4 hold the file's lock, so a POST or DELETE waits for their save and nothing
    # decides on an old copy (see "Who writes it").
    with desired_file.lock:
        log.begin_step(2)  # READ what the users declared (the API server's objects)
        desired, version = get_desired_state()  # {name: its node, or None if it has none yet}

        log.begin_step(3)  # CLEANUP dead nodes (the node lifecycle controller)
        # A node in its grace period keeps its containers, because it may only be cut off.
        holding_nodes = observed.live_nodes + list(observed.in_grace)
        desired, orphans = cleanup_dead_nodes(desired, holding_nodes)
        log.say_cleanup(orphans, observed.conditions, last_answered, NODE_GRACE_SECONDS)

        log.begin_step(4)  # SCHEDULE what has no node (kube-scheduler)
        desired, placements = schedule(desired, observed.live_nodes)
        unscheduled = [name for name, node in desired.items() if node is None]  # no live node
        explain_schedule(placements, unscheduled)
        desired_file.save(desired, version)  # steps 3 and 4's decisions, into the file

    log.begin_step(5)  # RECONCILE: diff, then act (in Kubernetes, each kubelet syncs its node)
    acted, results = reconcile(observed, desired, failed_writes)
    failed_writes = still_failing(failed_writes, results)  # the next tick's step 1 reads it

    outcome = verdict(results, unscheduled, observed.in_grace)  # ✅ Converged, ⏳ Waiting or ❌
    log.end_tick(outcome, results, unscheduled, observed.in_grace)  # the log says which, and why
    return acted, failed_writes


# --- desired_state.txt: what the users declared (the API server, etcd) -------
# One container per line: "nginx" (no node yet) or "nginx:node-2" (assigned). Blank lines,
# "# comments" and bad lines stay when it is saved. A teacher may edit it; the next tick sees it.
# Who writes it, and how no write is lost:
#   the API (POST, DELETE)  holds desired_file.lock inside desired_file.update(change, name):
#                           it reads the file, changes it and saves it.
#   the loop (steps 3, 4)   holds the same lock from step 2's read to step 4's save. So the API
#                           and the loop take turns, and neither decides on an old copy.
#   a teacher's editor      takes no lock. So every save first checks that the file is still
#                           the version that was read (its inode, size and modification time).
#                           If not, the API's update starts again from the teacher's text. The
#                           loop's save raises machinery.EditedMeanwhile: the tick stops before
#                           step 5 (✗ tick failed: desired_state.txt was edited during the tick,
#                           retry next tick), and the next tick starts again from the edit.
# Kubernetes does the same with resourceVersion, a version that each write changes: a write made
# from an older version is refused (409 Conflict), and the writer reads again and retries.
# Step 5 acts on step 4's saved copy without the lock (SSH may take seconds): a DELETE made then
# may see its container started once, and the tick it wakes stops it. Every save is atomic.
# (An editor that saves an old copy still undoes what was saved since: no lock can stop that.)

def parse_desired_state(text):
    """The file's text -> ({name: node or None}, in file order; [problems]).

    A problem is (line number, line, reason): a bad line is reported and skipped. parse_line
    refuses a name that is not a DNS-1123 label, so a hand edit never reaches a node's shell."""
    desired, problems = {}, []
    for number, line in enumerate(machinery.split_lines(text), start=1):
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


# --- The five steps: ask the nodes, read the file, log what happens ----------
class Observation(NamedTuple):  # what step 1 saw
    running: dict     # node -> the names in its file, for each node whose read worked
    live_nodes: list  # the Ready nodes, the only ones that get new containers
    in_grace: dict    # Unknown nodes in their grace period: node -> (silent for, eviction in)
    conditions: dict  # node -> (Ready | NotReady | Unknown, reason)


def get_current_state(failed_writes):
    """Step 1, observe: ask every node, all at once, what it runs and whether it works."""
    answers = nodes.read_running_files()  # node -> what its file lists (a NodeFile), or the error
    now = time.monotonic()
    conditions = node_conditions(answers, failed_writes)
    running = {node: answer.names for node, answer in answers.items()
               if not isinstance(answer, Exception)}
    for node in NODES:
        if conditions[node][0] != "Unknown":  # it answered, even with an error
            last_answered[node] = now
    live_nodes = [node for node in NODES if conditions[node][0] == "Ready"]
    in_grace = grace_periods(conditions, last_answered, now, NODE_GRACE_SECONDS)
    observation = Observation(running, live_nodes, in_grace, conditions)
    status.remember(observation)  # what the API and the page show
    log.say_observation(answers, observation)  # ✓ node-1: nginx, ⚠️  node-2: unavailable
    return observation


def get_desired_state():
    """Step 2, read what desired_state.txt declares; a bad line is logged and skipped.
    Returns (desired, version): the version of the file read, for step 4's save."""
    desired, problems, version = desired_file.read_with_version()
    log.say_bad_lines(problems, os.path.basename(DESIRED_STATE_FILE))
    log.say("declared_count", containers=log.count(len(desired), "container"))
    return desired, version


def explain_schedule(placements, unscheduled):
    """Log where each container went, and those that found no live node."""
    for name, node, loads in placements:
        log.say("schedule", name=name, node=node)  # 📍 SCHEDULE: app1 → node-2
        log.record("schedule", name=name, node=node, loads=loads)
    for name in unscheduled:
        log.say("unschedulable", name=name)  # ⏳ app7: no live node, stays unscheduled


def reconcile(observed, desired, failed_writes):
    """Step 5: diff what each node runs against what it should run, then start and stop.

    Returns (acted, results). results maps each node that got an action to None or its error.
    acted is True if a node whose action worked started or stopped something."""
    plan = plan_reconcile(observed.running, desired, retry=failed_writes)
    # One SSH command per node, all at once. For node-1 keeping web and starting api, roughly:
    #     sed -i -E '/^(web)$/!d' node-1_running.txt && printf '%s\n' api >> node-1_running.txt
    # sed deletes (d) every line that is not (!) a to_keep name, so all the others stop at once.
    # Then printf appends what starts. The next tick finds whatever failed still to do.
    results = nodes.keep_and_start({node: (p.to_keep, p.to_start) for node, p in plan.items()})
    for node, p in plan.items():  # ◼ STOP: app1 on node-1, ▶ START: app1 on node-2, or ✗ ...
        log.say_actions(node, desired, observed.running[node], p, results[node])
    acted = any(p.to_start or p.to_stop for node, p in plan.items() if results[node] is None)
    return acted, results


# --- The decisions: pure functions over plain data, tested without a network -
def node_conditions(answers, failed_writes):
    """Step 1: each node's condition, as in Kubernetes' NodeReady: {node: (condition, reason)}.

    NotReady comes two ways. The read ran and failed there (a machinery.NodeError: no sed, its
    file a directory), and step 5 sends it nothing, as nothing was read. Or the read worked but
    the node's last write failed (see still_failing). Any other error: no command could run."""
    conditions = {}
    for node, answer in answers.items():
        if isinstance(answer, machinery.NodeError):
            conditions[node] = ("NotReady", log.describe(answer))
        elif isinstance(answer, Exception):
            conditions[node] = ("Unknown", log.describe(answer))
        elif node in failed_writes:
            why = log.message("reason_actions_failed", error=failed_writes[node])
            conditions[node] = ("NotReady", why)
        else:
            conditions[node] = ("Ready", None)
    return conditions


def grace_periods(conditions, answered_at, now, grace):
    """Step 1: which Unknown nodes keep their containers, as {node: (silent for, eviction in)}.

    A crash and a cut cable look alike, and a node cut off still runs its containers: starting
    them elsewhere at once would run them twice. So we wait. (Kubernetes waits 50 s before it
    calls a node unreachable, then 5 more minutes before it evicts its pods.) A NotReady node
    gets no grace: it answers, so it is broken, not cut off, and waiting would not mend it.

    Silence counts from the node's last answer, and the loop only looks at ticks. Each sleep
    starts when a tick ends, so ticks find a silent node 8 s apart: 5 s of sleep, then 3 s
    waiting for it (SSH_TIMEOUT). With grace 30:
        0 s            node-2 is cut off, just after a tick that it answered
        8, 16, 24 s    ⚠️  node-2: unavailable for 8 s, eviction in 22 s ... (⏳ Waiting)
        32 s           silent for longer than 30 s: its containers move (💀 CLEANUP)
    If it answers before 32 s, it keeps them. With no grace, they move at 8 s."""
    in_grace = {}
    for node, (condition, _) in conditions.items():
        silent_for = now - answered_at[node]
        if condition == "Unknown" and silent_for < grace:
            in_grace[node] = (silent_for, grace - silent_for)
    return in_grace


def cleanup_dead_nodes(desired, holding_nodes):
    """Step 3: unassign what sits on a node that may no longer hold it. Returns (desired, orphans).
    holding_nodes are the Ready nodes and those in their grace period. A container on any other
    node (NotReady, silent past its grace, or not a node at all) becomes an orphan: (name, the
    node it lost). Step 4 places it again at once, and nothing moves back when a node returns.
    Kubernetes does not move a pod: it deletes it, and its ReplicaSet makes a new one.

    Say node-2 dies while it runs app1, with no grace period. The next tick logs:
          ⚠️  node-2: unavailable
          💀 CLEANUP: app1 (node node-2 down)
          📍 SCHEDULE: app1 → node-1
          ▶ START: app1 on node-1
    When node-2 answers again, it still lists app1, now a zombie: ◼ STOP: app1 on node-2."""
    cleaned, orphans = {}, []
    for name, node in desired.items():
        if node is not None and node not in holding_nodes:
            orphans.append((name, node))
            node = None
        cleaned[name] = node
    return cleaned, orphans


def schedule(desired, live_nodes):
    """Step 4: give every unassigned container a live node. Returns (new desired, placements).

    Each container goes to the live node with the fewest containers assigned. If nodes tie,
    the first one in NODES order wins. From empty nodes this gives round-robin. After a failure,
    the emptiest nodes fill first. A placement is (name, node, the loads it compared)."""
    assigned = Counter(desired.values())  # node -> how many containers the file gives it
    load = {node: assigned[node] for node in live_nodes}
    scheduled, placements = {}, []
    for name, node in desired.items():
        if node is None and live_nodes:
            loads_seen = dict(load)
            node = min(live_nodes, key=lambda candidate: load[candidate])  # the first on a tie
            load[node] += 1
            placements.append((name, node, loads_seen))
        scheduled[name] = node
    return scheduled, placements


class NodePlan(NamedTuple):  # what step 5 will do on one node
    to_start: list  # wanted, not running: a line to append
    to_stop: list   # running, not wanted (intruders, zombies), or listed twice: for the log
    to_keep: list   # wanted and listed once: the node's file keeps these lines, and only these


def diff_node(running, wanted):
    """Step 5: what to start, stop and keep, so that a node running `running` runs `wanted`.

    Whatever is listed but not wanted is stopped, intruders included, as a kubelet stops the
    containers of a pod no longer bound to its node. A wanted name listed twice cannot be kept,
    because keeping a name keeps all its lines. So it is stopped and started again:
        diff_node(["web", "intruder", "db", "db"], wanted=["web", "db", "api"])
        == NodePlan(to_start=["db", "api"], to_stop=["intruder", "db"], to_keep=["web"])
    Only to_keep and to_start reach the node's shell, and they hold only declared names."""
    listed = Counter(running)  # name -> how many of the node's lines list it
    to_keep = [name for name in wanted if listed[name] == 1]
    kept = set(to_keep)
    return NodePlan(
        to_start=[name for name in wanted if listed[name] != 1],
        to_stop=[name for name in listed if name not in kept],
        to_keep=to_keep)


def plan_reconcile(running, desired, retry=()):
    """Step 5: {node: NodePlan} for each node that answered and has work to do. running:
    {node: names}, from step 1. retry: nodes that get an action anyway (see still_failing)."""
    wanted = {node: [] for node in running}
    for name, node in desired.items():
        if node in wanted:
            wanted[node].append(name)
    plan = {}
    for node in running:
        node_plan = diff_node(running[node], wanted[node])
        if node_plan.to_start or node_plan.to_stop or node in retry:
            plan[node] = node_plan
    return plan


def still_failing(failed_writes, results):
    """Step 5's memory for the next tick: failed_writes, after this tick's actions.

    A full disk still reads fine, and only a failed write shows it. So the loop remembers it:
        tick N    step 5  ✗ node-1: actions failed (disk full), retry next tick
                          failed_writes = {"node-1": "disk full"}
        tick N+1  step 1  ⚠️  node-1: not ready (its last actions failed: disk full)
                  step 3  💀 CLEANUP: web (node node-1 not ready), and step 4 moves web
                  step 5  node-1 gets a write anyway, to test it: nothing is wanted there
                          now, so it keeps no line and its old containers stop
        when that write works, node-1 leaves failed_writes: Ready at the next tick;
        while it fails, node-1 stays NotReady, and gets the test write again each tick
    A node that does not answer stays as it was, because a silence proves nothing."""
    failed_writes = dict(failed_writes)
    for node, error in results.items():
        if error is None:
            failed_writes.pop(node, None)
        elif isinstance(error, machinery.NodeError):
            failed_writes[node] = log.describe(error)
    return failed_writes


def verdict(results, unscheduled, in_grace):
    """How the tick ends. It is ❌ Not converged if an action failed or a container has no node.
    Otherwise it is ⏳ Waiting while a node is in its grace period, since nobody knows what it
    runs. Otherwise ✅ Converged: each container has a node that answered, and no action failed."""
    if unscheduled or any(error is not None for error in results.values()):
        return "not_converged"
    return "waiting" if in_grace else "converged"


def when_to_tick_again(acted, trigger):
    """(seconds to sleep, why the next tick runs), the whole requeue rule. A tick that acted is
    checked REQUEUE_SECONDS later, once; if the check acts again, the timer decides (no spin)."""
    if acted and trigger != "requeue":
        return REQUEUE_SECONDS, "requeue"
    return TICK_SECONDS, "timer"


# --- The REST API: it only changes desired_state.txt and wakes the loop ------
api = Flask(__name__)


def declare(desired, name):
    """Add the name with no node. Abort with 409 if it is already declared."""
    if name in desired:
        abort(409, f"container {name!r} already exists")
    desired[name] = None


def forget(desired, name):
    """Remove the name and return the node it had. Abort with 404 if it is not declared."""
    if name not in desired:
        abort(404, f"no container named {name!r}")
    return desired.pop(name)


@api.post("/api/containers")
def create_container():
    """POST /api/containers {"name": "nginx"}: declare it, wake the loop; 201, unscheduled.
    (With API_TOKEN set, machinery has checked the token before: 401 without it.)"""
    body = request.get_json(force=True, silent=True)  # force: even without a Content-Type
    name = machinery.container_name(body)  # a DNS-1123 label (it reaches a shell), else 400
    desired_file.update(declare, name)
    timer.wake()
    return jsonify(status.container_views({name: None})[0]), 201


@api.get("/api/containers")
def list_containers():
    """GET /api/containers: each container, its node, and its status as step 1 last saw it."""
    desired, _ = desired_file.read()
    return jsonify(status.container_views(desired))


@api.delete("/api/containers/<name>")
def delete_container(name):
    """DELETE /api/containers/<name>: forget a container; the woken loop stops it on its node."""
    node = desired_file.update(forget, name)
    timer.wake()
    return jsonify(name=name, node=node, deleted=True)


# The rest of the API is machinery's: errors, the token, /api/nodes, the page, pause and step.
machinery.add_classroom_api(
    api, desired_file=desired_file, status=status, log=log, timer=timer, token=API_TOKEN,
    tick_seconds=TICK_SECONDS, grace_seconds=NODE_GRACE_SECONDS,
    page=os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard.html"))
# The same cluster for the real kubectl: kubectl run/delete use declare/forget, then wake the loop.
kubernetes_api.register(api, kubernetes_api.ControllerBackend(
    desired_file, status, log, timer, API_TOKEN, declare, forget))


# --- Entry point: the API thread and the control-loop thread -----------------
def main():
    """Check the settings, run the API and control-loop threads until SIGTERM or Ctrl-C."""
    settings.exit_if_wrong()  # one line per bad setting, exit status 2: nothing starts
    server = machinery.quiet_server(api, API_HOST, API_PORT)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                     name="api", daemon=True).start()
    log.say_started(API_HOST, API_PORT, NODES, TICK_SECONDS, token=API_TOKEN is not None)
    loop = threading.Thread(target=control_loop, name="control-loop", daemon=True)
    loop.start()
    machinery.wait_for_a_stop_signal(shutting_down, timer)  # SIGTERM or Ctrl-C: the loop ends
    loop.join(timeout=1)  # a tick in progress has 1 s to finish; a slower one is abandoned
    nodes.close_all()
    server.shutdown()
    log.say("stopped")


if __name__ == "__main__":
    main()
