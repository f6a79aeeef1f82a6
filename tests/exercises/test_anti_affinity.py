"""Exercise 5, anti-affinity: two containers of one app on two nodes (docs/exercises.md).

Kubernetes: podAntiAffinity with topologyKey kubernetes.io/hostname,
preferredDuringSchedulingIgnoredDuringExecution (or topologySpreadConstraints)."""
from harness import advise

NODES = ["node-1", "node-2", "node-3"]


def test_app_of(controller_with):
    controller = controller_with()
    if not hasattr(controller, "app_of"):
        advise("Add a function app_of(name): the app a container belongs to, its name "
               "without a trailing '-<number>': app_of('web-2') == 'web', "
               "app_of('nginx') == 'nginx'.")
    for name, app in [("web-2", "web"), ("web-12", "web"), ("nginx", "nginx"),
                      ("node-exporter", "node-exporter"), ("redis-cache-3", "redis-cache")]:
        if controller.app_of(name) != app:
            advise(f"app_of({name!r}) must be {app!r}, got {controller.app_of(name)!r}.")


def test_siblings_go_apart(controller_with):
    controller = controller_with()
    # node-1 is the emptiest, but it already runs web-1.
    declared = {"web-1": "node-1", "db": "node-2", "queue": "node-2",
                "cache": "node-3", "mail": "node-3", "web-2": None}
    assignments, _ = controller.schedule(declared, NODES)
    if assignments["web-2"] == "node-1":
        advise("web-1 runs on node-1; schedule() put web-2 there too (the emptiest node). "
               "A node that already runs a container of the same app must come last: "
               "web-2 goes to node-2 (no web there, then the fewest containers, then NODES "
               "order).\nHint: in schedule(), choose with a key that compares "
               "(how many of this app the node runs, its load).")
    if assignments["web-2"] != "node-2":
        advise(f"web-2 must go to node-2 (no web, 2 containers, first in NODES order), "
               f"got {assignments['web-2']}.")


def test_siblings_in_one_batch(controller_with):
    controller = controller_with()
    declared = {"a": "node-1", "b": "node-1", "web-1": None, "web-2": None, "web-3": None}
    assignments, _ = controller.schedule(declared, NODES)
    nodes = sorted(assignments[f"web-{i}"] for i in (1, 2, 3))
    if nodes != NODES:
        advise(f"web-1, web-2, web-3 scheduled in one tick must land on three different nodes "
               f"(count the siblings placed earlier in the same call too); got {nodes}.")


def test_preferred_not_required(controller_with):
    controller = controller_with()
    declared = {f"web-{i}": None for i in range(1, 6)}
    assignments, _ = controller.schedule(declared, NODES)
    if None in assignments.values():
        advise("Five web containers on three nodes must all be placed: the rule is preferred "
               "(a node without a sibling if there is one), not required.")
    count = {node: list(assignments.values()).count(node) for node in NODES}
    if max(count.values()) > 2:
        advise(f"Five web containers on three nodes: at most two per node, got {count}.")
