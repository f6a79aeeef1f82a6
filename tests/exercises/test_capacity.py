"""Exercise 1, capacity: a full node takes no more containers (docs/exercises.md).

Kubernetes: a pod's resource requests, the scheduler's filter (NodeResourcesFit),
and the FailedScheduling event "0/3 nodes are available: 3 Insufficient cpu"."""
from harness import FakeCluster, advise

NODES = ["node-1", "node-2", "node-3"]


def loads(assignments):
    count = {node: 0 for node in NODES}
    for node in assignments.values():
        if node in count:
            count[node] += 1
    return count


def test_schedule_skips_a_full_node(controller_with):
    controller = controller_with(NODE_CAPACITY="2")
    declared = {f"app{i}": None for i in range(1, 8)}  # 7 containers, room for 6
    assignments, _ = controller.schedule(declared, NODES)
    count = loads(assignments)
    if max(count.values()) > 2:
        advise(f"With NODE_CAPACITY=2, schedule() put {count} containers on the nodes: "
               "a node that already runs NODE_CAPACITY containers must not get another.\n"
               "Hint: add the setting NODE_CAPACITY next to TICK_SECONDS (settings.read(...)), "
               "then in schedule() choose only among the live nodes whose load is below it.")
    unplaced = [name for name, node in assignments.items() if node is None]
    if unplaced != ["app7"]:
        advise(f"7 containers, 3 nodes of capacity 2: app1..app6 fit and app7 must stay "
               f"unscheduled (None); schedule() left {unplaced or 'nothing'} unscheduled.")


def test_assigned_containers_count(controller_with):
    controller = controller_with(NODE_CAPACITY="2")
    declared = {"a": "node-1", "b": "node-1", "c": "node-2", "new": None}
    assignments, _ = controller.schedule(declared, NODES)
    if assignments["new"] == "node-1":
        advise("node-1 already runs a and b (capacity 2), yet schedule() put 'new' there: "
               "containers assigned before this tick take room too.")


def test_default_capacity_is_roomy(controller_with):
    controller = controller_with()  # NODE_CAPACITY not set
    declared = {f"app{i}": None for i in range(1, 31)}
    assignments, _ = controller.schedule(declared, NODES)
    if None in assignments.values():
        advise("Without NODE_CAPACITY set, 30 containers must fit on 3 nodes (default "
               "capacity: 10 per node, as the demos need).")


def test_the_log_says_no_room(controller_with):
    controller = controller_with(NODE_CAPACITY="1")
    cluster = FakeCluster(controller)
    cluster.declare("web\napi\ndb\nqueue\n")
    log = cluster.tick()
    if "queue" not in log or "no room" not in log:
        advise("With NODE_CAPACITY=1 and 4 containers on 3 live nodes, the tick log must "
               "say why queue waits, with the words 'no room', e.g.\n"
               "    ⏳ queue: no room (3 nodes full), stays unscheduled\n"
               "'no live node' is wrong here: the nodes are live, only full.\n"
               "Hint: explain_schedule() logs the unscheduled; it needs to know whether "
               "there were live nodes. The log was:\n" + log)
    if "no live node" in log:
        advise("The log says 'no live node' although all 3 nodes answered: with live "
               "nodes the reason is 'no room'.")
