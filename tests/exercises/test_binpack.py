"""Exercise 2, bin-packing: fill the fullest node first (docs/exercises.md).

Kubernetes: the scheduler's scoring, NodeResourcesFit with the strategy
LeastAllocated (spread: the default, and this controller's) or MostAllocated
(bin-pack: fewer, fuller nodes, so a cluster autoscaler can remove the empty ones)."""
from harness import advise

NODES = ["node-1", "node-2", "node-3"]


def test_binpack_fills_one_node(controller_with):
    controller = controller_with(SCHEDULER_SCORING="MostAllocated")
    assignments, _ = controller.schedule({"a": None, "b": None, "c": None}, NODES)
    if set(assignments.values()) != {"node-1"}:
        advise(f"With SCHEDULER_SCORING=MostAllocated, three new containers on three empty "
               f"nodes must all go to node-1 (the fullest, first in NODES order on a tie); "
               f"schedule() gave {assignments}.\n"
               "Hint: add the setting SCHEDULER_SCORING (LeastAllocated or MostAllocated) "
               "and, in schedule(), use max() instead of min() for MostAllocated.")


def test_binpack_prefers_the_fullest(controller_with):
    controller = controller_with(SCHEDULER_SCORING="MostAllocated")
    declared = {"a": "node-3", "b": "node-2", "c": "node-2", "new": None}
    assignments, _ = controller.schedule(declared, NODES)
    if assignments["new"] != "node-2":
        advise(f"node-2 runs 2 containers, node-3 one, node-1 none: MostAllocated puts 'new' "
               f"on node-2, schedule() chose {assignments['new']}.")


def test_spread_stays_the_default(controller_with):
    controller = controller_with()  # SCHEDULER_SCORING not set
    assignments, _ = controller.schedule({"a": None, "b": None, "c": None}, NODES)
    if sorted(assignments.values()) != NODES:
        advise(f"Without SCHEDULER_SCORING, the scheduler must still spread (LeastAllocated): "
               f"one container per node, got {assignments}.")


def test_a_wrong_scoring_is_refused(setting_errors):
    errors = setting_errors(SCHEDULER_SCORING="Random")
    if not any("SCHEDULER_SCORING" in error for error in errors):
        advise("SCHEDULER_SCORING=Random must be refused at start, like every bad setting "
               "(exit status 2, a line naming SCHEDULER_SCORING): read it with "
               "settings.choice(\"SCHEDULER_SCORING\", \"LeastAllocated\", "
               "[\"LeastAllocated\", \"MostAllocated\"]).")
