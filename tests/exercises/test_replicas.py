"""Exercise 3, replicas: `web x3` declares web-1, web-2, web-3 (docs/exercises.md).

Kubernetes: a ReplicaSet (or a Deployment's) `replicas: 3` makes three Pods named
after it; delete one and the ReplicaSet makes it again."""
from harness import FakeCluster, advise


def test_a_replica_line_declares_three(controller_with):
    controller = controller_with()
    desired, problems = controller.parse_desired_state("web x3\n")
    if problems:
        advise(f"parse_desired_state('web x3') reports {problems}: the line 'web x3' must be "
               "read as three containers, web-1, web-2 and web-3, not as a bad line.\n"
               "Hint: in parse_desired_state(), before parse_line(), recognise "
               "r'(name)\\s+x(\\d+)' and remember (name, count).")
    if desired != {"web-1": None, "web-2": None, "web-3": None}:
        advise("parse_desired_state('web x3') must give "
               "{'web-1': None, 'web-2': None, 'web-3': None} (unassigned: step 4 places "
               f"them), got {desired}.")


def test_a_replica_keeps_its_own_line(controller_with):
    controller = controller_with()
    desired, problems = controller.parse_desired_state("web x3\nweb-2:node-3\nnginx\n")
    if desired.get("web-2") != "node-3" or problems:
        advise("'web x3' followed by the line 'web-2:node-3' (written by the controller after "
               "it placed web-2) must give web-2 on node-3 with no problem reported, as "
               f"Pods keep their node; got {desired}, problems {problems}.\n"
               "Hint: add web-1..web-3 after reading every line, only those not declared "
               "by a line of their own.")
    if set(desired) != {"web-1", "web-2", "web-3", "nginx"}:
        advise(f"Expected web-1, web-2, web-3 and nginx, got {sorted(desired)}.")


def test_bad_replica_lines_are_reported(controller_with):
    controller = controller_with()
    _, problems = controller.parse_desired_state("Web x3\nweb xx\n")
    if len(problems) != 2:
        advise("'Web x3' (not a valid name) and 'web xx' (not a count) must still be reported "
               f"as bad lines, got {problems}.")


def test_a_tick_places_and_keeps_the_replica_line(controller_with):
    controller = controller_with()
    cluster = FakeCluster(controller)
    cluster.declare("web x3\n")
    cluster.tick()
    with open(controller.DESIRED_STATE_FILE, encoding="utf-8") as file:
        text = file.read()
    if not text.startswith("web x3\n"):
        advise(f"After a tick desired_state.txt must still start with 'web x3' (the "
               f"ReplicaSet stays declared), it reads:\n{text}")
    running = sorted(name for names in cluster.files.values() for name in names)
    if running != ["web-1", "web-2", "web-3"]:
        advise(f"After one tick web-1..web-3 must run, one each; the nodes run {cluster.files}.")
    # Delete one Pod (its line, as DELETE /api/containers/web-2 does): its ReplicaSet
    # declares it again.
    cluster.declare("".join(line + "\n" for line in text.splitlines()
                            if not line.startswith("web-2")))
    cluster.tick()
    running = sorted(name for names in cluster.files.values() for name in names)
    if running != ["web-1", "web-2", "web-3"]:
        advise(f"After deleting web-2, the next tick must run it again (web x3 declares it); "
               f"the nodes run {cluster.files}.")
