"""The pure core of the controller: parsing, cleanup, schedule and the reconcile diff.

No network here: these are the decisions, tested as plain functions over plain
data, with property-based tests (hypothesis) for the invariants.
"""

import subprocess

import pytest
from hypothesis import given, settings, strategies as st

import app_controller as c

NODES = ["node-1", "node-2", "node-3"]

names = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?\Z")
node_lists = st.lists(st.sampled_from(["node-1", "node-2", "node-3", "node-4", "node-5"]),
                      unique=True)


# --- names and configuration ------------------------------------------------

@pytest.mark.parametrize("name", ["nginx", "a", "app-1", "0", "a" * 63, "x9-y"])
def test_dns_labels_are_valid_names(name):
    assert c.is_valid_name(name)


@pytest.mark.parametrize("name", ["", "Nginx", "-a", "a-", "a" * 64, "a b", "a;rm -rf /",
                                  "$(reboot)", "ngin_x", "café", "a\n", "a.b", None, 3])
def test_everything_else_is_not_a_valid_name(name):
    assert not c.is_valid_name(name)


def test_nodes_can_point_at_other_addresses():
    assert c.parse_nodes("node-1, node-2=127.0.0.1:2202,node-3=10.0.0.3", 22) == {
        "node-1": ("node-1", 22), "node-2": ("127.0.0.1", 2202), "node-3": ("10.0.0.3", 22)}


# --- desired_state.txt --------------------------------------------------------

HAND_EDITED = """\
# my cluster
nginx
redis:node-2   # the cache

Bad Name
mysql:node-1
nginx:node-3
web:no such node
"""


def test_parse_reads_names_and_assignments_and_reports_bad_lines():
    desired, problems = c.parse_desired_state(HAND_EDITED)
    assert desired == {"nginx": None, "redis": "node-2", "mysql": "node-1"}
    assert problems == [(5, "Bad Name", "not a valid name"),
                        (7, "nginx:node-3", "duplicate"),
                        (8, "web:no such node", "not a valid node name")]


def test_parse_survives_any_text():
    garbage = "\x00\x01:::\n:\n#\n" + "é" * 100 + "\n" + "a:" * 50
    desired, problems = c.parse_desired_state(garbage)
    assert desired == {}
    assert [number for number, _, _ in problems] == [1, 2, 4, 5]


def test_render_changes_only_the_lines_it_must():
    desired, _ = c.parse_desired_state(HAND_EDITED)
    desired["nginx"] = "node-1"       # scheduled
    desired["redis"] = None           # cleaned up
    del desired["mysql"]              # deleted
    desired["api"] = None             # added
    assert c.render_desired_state(HAND_EDITED, desired) == """\
# my cluster
nginx:node-1
redis  # the cache

Bad Name
nginx:node-3
web:no such node
api
"""


def test_render_of_an_unchanged_state_is_the_same_text():
    desired, _ = c.parse_desired_state(HAND_EDITED)
    assert c.render_desired_state(HAND_EDITED, desired) == HAND_EDITED


def test_deleting_a_container_also_drops_its_duplicate_lines():
    text = "app1\napp1:node-2\n"
    assert c.render_desired_state(text, {}) == ""


@given(st.dictionaries(names, st.sampled_from([None] + NODES)),
       st.dictionaries(names, st.sampled_from([None] + NODES)))
def test_what_is_rendered_parses_back_to_the_same_state(before, after):
    text = c.render_desired_state("# header\n\nNot Valid\n", before)
    rewritten = c.render_desired_state(text, after)
    assert c.parse_desired_state(rewritten)[0] == after
    assert rewritten.startswith("# header\n\nNot Valid\n")


def test_writes_are_atomic_and_leave_no_temp_file(tmp_path):
    path = tmp_path / "desired_state.txt"
    path.write_text("old\n")
    c.write_atomically(str(path), "new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["desired_state.txt"]


# --- step 3: cleanup ------------------------------------------------------------

def test_containers_on_a_dead_node_lose_their_assignment():
    desired = {"app1": "node-1", "app2": "node-2", "app3": None, "app4": "node-1"}
    cleaned, orphans = c.cleanup_dead_nodes(desired, ["node-2", "node-3"])
    assert cleaned == {"app1": None, "app2": "node-2", "app3": None, "app4": None}
    assert orphans == [("app1", "node-1"), ("app4", "node-1")]
    assert desired["app1"] == "node-1", "the input is not changed"


def test_cleanup_does_nothing_when_every_node_is_up():
    desired = {"app1": "node-1", "app2": None}
    assert c.cleanup_dead_nodes(desired, NODES) == (desired, [])


@given(st.dictionaries(names, st.sampled_from([None] + NODES)), node_lists)
def test_after_cleanup_no_container_is_assigned_to_a_dead_node(desired, live_nodes):
    cleaned, orphans = c.cleanup_dead_nodes(desired, live_nodes)
    assert list(cleaned) == list(desired)
    assert all(node is None or node in live_nodes for node in cleaned.values())
    assert all(desired[name] == node and node not in live_nodes for name, node in orphans)


# --- step 4: schedule -------------------------------------------------------------

def test_seed_failure_demo_moves_app1_to_node2_and_app4_to_node3():
    # app1..app6 added one by one on three nodes, as the seed's demo does.
    desired = {}
    for i in range(1, 7):
        desired[f"app{i}"] = None
        desired, _ = c.schedule(desired, NODES)
    assert desired == {"app1": "node-1", "app2": "node-2", "app3": "node-3",
                       "app4": "node-1", "app5": "node-2", "app6": "node-3"}
    # Then node-1 is stopped.
    desired, orphans = c.cleanup_dead_nodes(desired, ["node-2", "node-3"])
    desired, placements = c.schedule(desired, ["node-2", "node-3"])
    assert orphans == [("app1", "node-1"), ("app4", "node-1")]
    assert placements == [("app1", "node-2"), ("app4", "node-3")]


def test_new_containers_fill_the_least_loaded_node_first():
    desired = {"a": "node-1", "b": "node-1", "c": "node-2", "new1": None, "new2": None}
    _, placements = c.schedule(desired, NODES)
    assert placements == [("new1", "node-3"), ("new2", "node-2")]


def test_with_no_live_node_containers_stay_unscheduled():
    desired = {"app1": None, "app2": "node-1"}
    assert c.schedule(desired, []) == (desired, [])


@given(st.dictionaries(names, st.sampled_from([None] + NODES)),
       st.lists(st.sampled_from(NODES), min_size=1, unique=True))
def test_after_cleanup_and_schedule_every_container_is_on_exactly_one_live_node(desired, live_nodes):
    cleaned, _ = c.cleanup_dead_nodes(desired, live_nodes)
    scheduled, placements = c.schedule(cleaned, live_nodes)
    assert list(scheduled) == list(desired)
    assert all(node in live_nodes for node in scheduled.values())
    assert [name for name, _ in placements] == [n for n, node in cleaned.items() if node is None]


@given(st.lists(names, unique=True), st.lists(st.sampled_from(NODES), min_size=1, unique=True))
def test_from_empty_nodes_loads_differ_by_at_most_one(containers, live_nodes):
    scheduled, _ = c.schedule(dict.fromkeys(containers), live_nodes)
    loads = [list(scheduled.values()).count(node) for node in live_nodes]
    assert max(loads) - min(loads) <= 1


# --- step 5: the reconcile diff -----------------------------------------------------

def test_diff_starts_the_missing_and_stops_intruders():
    assert c.diff_node(["nginx", "intruder"], ["nginx", "redis"]) == (["redis"], ["intruder"])


def test_diff_of_a_converged_node_is_empty():
    assert c.diff_node(["a", "b"], ["b", "a"]) == ([], [])


def test_a_container_listed_twice_is_brought_back_to_one():
    assert c.diff_node(["a", "a", "b"], ["a", "b"]) == (["a"], ["a"])


def test_zombies_on_a_node_that_came_back_are_stopped():
    # node-1 was down while app1 and app4 moved; it comes back still listing them.
    observed = {"node-1": ["app1", "app4"], "node-2": ["app2", "app5", "app1"],
                "node-3": ["app3", "app6", "app4"]}
    desired = {"app1": "node-2", "app2": "node-2", "app3": "node-3",
               "app4": "node-3", "app5": "node-2", "app6": "node-3"}
    assert c.plan_reconcile(observed, desired, NODES) == {"node-1": ([], ["app1", "app4"])}


def apply_plan(running, to_start, to_stop):
    """What the node's shell command does: remove the stopped lines, append the started."""
    return [name for name in running if name not in to_stop] + to_start


@given(st.dictionaries(st.sampled_from(NODES), st.lists(names | st.text(max_size=5))),
       st.dictionaries(names, st.sampled_from([None] + NODES)),
       st.lists(st.sampled_from(NODES), unique=True))
def test_applying_the_plan_to_the_observed_state_yields_the_desired_state(observed, desired,
                                                                          live_nodes):
    observed = {node: observed.get(node, []) for node in live_nodes}
    plan = c.plan_reconcile(observed, desired, live_nodes)
    for node in live_nodes:
        to_start, to_stop = plan.get(node, ([], []))
        after = apply_plan(observed[node], to_start, to_stop)
        wanted = [name for name, assigned in desired.items() if assigned == node]
        assert sorted(after) == sorted(wanted), "each wanted container exactly once, nothing else"


# --- the node command, run by a real shell on a real file ------------------------------

def run_node_command(tmp_path, monkeypatch, content, to_start, to_stop):
    monkeypatch.setattr(c, "NODE_STATE_DIR", str(tmp_path))
    path = tmp_path / "node-1_running.txt"
    if content is not None:
        path.write_text(content)
    subprocess.run(["sh", "-c", c.start_stop_command("node-1", to_start, to_stop)], check=True)
    return path.read_text()


def test_stopping_app1_never_touches_app10(tmp_path, monkeypatch):
    after = run_node_command(tmp_path, monkeypatch, "app10\napp1\napp11\n", [], ["app1"])
    assert after == "app10\napp11\n"


def test_start_appends_a_line_even_after_a_line_without_newline(tmp_path, monkeypatch):
    after = run_node_command(tmp_path, monkeypatch, "nginx", ["redis", "web"], [])
    assert after == "nginx\nredis\nweb\n"


def test_start_creates_the_missing_file(tmp_path, monkeypatch):
    assert run_node_command(tmp_path, monkeypatch, None, ["nginx"], []) == "nginx\n"


def test_garbage_lines_are_removed_without_reaching_the_shell(tmp_path, monkeypatch):
    garbage = "$(touch pwned); 'x\" `id`"
    content = f"nginx\n{garbage}\nBad Name\napp1\n"
    command = c.start_stop_command("node-1", [], [garbage, "Bad Name", "app1"])
    assert garbage not in command and "Bad Name" not in command
    after = run_node_command(tmp_path, monkeypatch, content, [], [garbage, "Bad Name", "app1"])
    assert after == "nginx\n"
    assert not (tmp_path / "pwned").exists()


def test_an_unvalidated_name_is_never_started():
    with pytest.raises(ValueError):
        c.start_stop_command("node-1", ["x; reboot"], [])


@settings(max_examples=30, deadline=None)
@given(st.lists(names, max_size=6), st.lists(names, max_size=4, unique=True),
       st.lists(names, max_size=4, unique=True))
def test_the_shell_command_does_what_the_plan_says(tmp_path_factory, running, to_start, to_stop):
    directory = tmp_path_factory.mktemp("node")
    path = directory / "node-1_running.txt"
    path.write_text("".join(name + "\n" for name in running))
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(c, "NODE_STATE_DIR", str(directory))
        subprocess.run(["sh", "-c", c.start_stop_command("node-1", to_start, to_stop)], check=True)
    assert path.read_text().splitlines() == apply_plan(running, to_start, to_stop)
