"""Exercise 4, a stop budget: at most STOPS_PER_TICK stops per tick (docs/exercises.md).

Kubernetes: a PodDisruptionBudget (maxUnavailable: 1) limits how many pods voluntary
disruptions (a drain, an eviction) may take down at once; the rest wait their turn."""
from harness import FakeCluster, advise


def stops(plan):
    return [(node, name) for node, (_, to_stop, _) in plan.items() for name in to_stop]


def test_one_stop_per_tick(controller_with):
    controller = controller_with()
    if not hasattr(controller, "STOPS_PER_TICK"):
        advise("Add the setting STOPS_PER_TICK = 1 next to TICK_SECONDS (a plain number is "
               "enough), and use it in plan_reconcile().")
    observed = {"node-1": ["app1", "app4"], "node-2": ["intruder"], "node-3": []}
    desired = {}
    plan = controller.plan_reconcile(observed, desired)
    if len(stops(plan)) != 1:
        advise(f"Three containers should stop (app1, app4, intruder) and STOPS_PER_TICK is 1: "
               f"plan_reconcile() must plan exactly one stop, it planned {stops(plan)}.")


def test_what_waits_is_kept(controller_with):
    controller = controller_with()
    observed = {"node-1": ["app1", "app4"], "node-2": [], "node-3": []}
    plan = controller.plan_reconcile(observed, {})
    to_start, to_stop, to_keep = plan.get("node-1", ([], [], []))
    waiting = {"app1", "app4"} - set(to_stop)
    if not waiting <= set(to_keep):
        advise(f"node-1 runs app1 and app4, one stops now ({to_stop}); the other must wait, so "
               f"it goes into to_keep, or the node's command deletes it anyway (it keeps only "
               f"the lines of to_keep). to_keep was {to_keep}.")


def test_starts_are_not_limited(controller_with):
    controller = controller_with()
    observed = {"node-1": ["old1", "old2"], "node-2": [], "node-3": []}
    desired = {"a": "node-1", "b": "node-2", "c": "node-3"}
    plan = controller.plan_reconcile(observed, desired)
    started = sorted(name for to_start, _, _ in plan.values() for name in to_start)
    if started != ["a", "b", "c"]:
        advise(f"The budget is for stops only: a, b and c must all start this tick, "
               f"the plan starts {started}.")


def test_the_budget_is_a_setting(controller_with):
    controller = controller_with()
    controller.STOPS_PER_TICK = 2
    observed = {"node-1": ["x", "y"], "node-2": ["z"], "node-3": []}
    if len(stops(controller.plan_reconcile(observed, {}))) != 2:
        advise("With STOPS_PER_TICK = 2, plan_reconcile() must plan two stops: read the "
               "setting, do not write 1 in the code.")


def test_zombies_leave_one_tick_at_a_time(controller_with):
    controller = controller_with()
    cluster = FakeCluster(controller, running={"node-1": ["app1", "app4"]})
    cluster.declare("app1:node-2\napp4:node-3\n")
    seen = []
    for _ in range(3):
        cluster.tick()
        seen.append(list(cluster.files["node-1"]))
    if seen[:2] != [["app4"], []]:
        advise("node-1 came back with the zombies app1 and app4: the first tick must stop one "
               f"(node-1 then runs ['app4']), the second the other; node-1 ran {seen}.")
    if sorted(cluster.files["node-2"] + cluster.files["node-3"]) != ["app1", "app4"]:
        advise(f"app1 and app4 must start on node-2 and node-3 at once; the nodes run {cluster.files}.")
