"""The pure core of the controller: parsing, cleanup, schedule and the reconcile diff.

No network here: these are the decisions, tested as plain functions over plain
data, with property-based tests (hypothesis) for the invariants.
"""

import errno
import inspect
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import paramiko
import pytest
from hypothesis import example, given, settings, strategies as st

import app_controller as c
import machinery as m

NODES = ["node-1", "node-2", "node-3"]

names = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?\Z")
node_lists = st.lists(st.sampled_from(["node-1", "node-2", "node-3", "node-4", "node-5"]),
                      unique=True)


# --- names and configuration ------------------------------------------------

@pytest.mark.parametrize("name", ["nginx", "a", "app-1", "0", "a" * 63, "x9-y"])
def test_dns_labels_are_valid_names(name):
    assert m.is_valid_name(name)


@pytest.mark.parametrize("name", ["", "Nginx", "-a", "a-", "a" * 64, "a b", "a;rm -rf /",
                                  "$(reboot)", "ngin_x", "café", "a\n", "a.b", None, 3])
def test_everything_else_is_not_a_valid_name(name):
    assert not m.is_valid_name(name)


def test_nodes_can_point_at_other_addresses():
    assert m.parse_nodes("node-1, node-2=127.0.0.1:2202,node-3=10.0.0.3", 22) == {
        "node-1": ("node-1", 22), "node-2": ("127.0.0.1", 2202), "node-3": ("10.0.0.3", 22)}


@pytest.mark.parametrize("spec, expected", [
    ("node-1=[::1]:2202", {"node-1": ("::1", 2202)}),
    ("node-1=[::1]", {"node-1": ("::1", 22)}),
    (" node-1 = host : 2202 ", {"node-1": ("host", 2202)}),
])
def test_nodes_accept_ipv6_in_brackets_and_spaces(spec, expected):
    assert m.parse_nodes(spec, 22) == expected


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("variable, value, says", [
    ("NODES", "node-1=h:22x", "'node-1': write host, host:port or [IPv6]:port, a port from 1 to 65535"),
    ("NODES", "node-1=::1:22", "write host, host:port or [IPv6]:port"),
    ("NODES", "node-1,node-2,", "an empty node name (a comma too many?)"),
    ("NODES", "node-1,node-1=h:2202", "'node-1' is listed twice"),
    ("NODES", "Node_1", "not a valid node name"),
    ("NODES", "node-1=h:70000", "from 1 to 65535"),
    ("TICK_SECONDS", "0", "expected seconds, at least 0.1"),
    ("TICK_SECONDS", "five", "expected seconds, at least 0.1"),
    ("TICK_SECONDS", "nan", "expected seconds, at least 0.1"),
    ("SSH_TIMEOUT", "-1", "expected seconds, more than 0"),
    ("SSH_TIMEOUT", "3s", "expected seconds, more than 0"),
    ("NODE_GRACE_SECONDS", "-5", "expected seconds, at least 0"),
    ("API_PORT", "0", "expected a port number, 1 to 65535"),
    ("API_PORT", "http", "expected a port number, 1 to 65535"),
    ("SSH_PORT", "65536", "expected a port number, 1 to 65535"),
    ("LOG_LANG", "de", "expected en or fr"),
])
def test_a_bad_setting_is_one_clear_line_and_exit_status_2(tmp_path, variable, value, says):
    env = {**os.environ, variable: value, "DESIRED_STATE_FILE": str(tmp_path / "d.txt"),
           "API_PORT": os.environ.get("API_PORT", "1") if variable != "API_PORT" else value}
    result = subprocess.run([sys.executable, str(REPO / "app_controller.py")], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"pull-mode: bad setting {variable}={value!r}: ")
    assert says in lines[0]
    assert result.stdout == "", "nothing starts"


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
    assert m.render_desired_state(HAND_EDITED, desired) == """\
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
    assert m.render_desired_state(HAND_EDITED, desired) == HAND_EDITED


def test_deleting_a_container_also_drops_its_duplicate_lines():
    text = "app1\napp1:node-2\n"
    assert m.render_desired_state(text, {}) == ""


@given(st.dictionaries(names, st.sampled_from([None] + NODES)),
       st.dictionaries(names, st.sampled_from([None] + NODES)))
def test_what_is_rendered_parses_back_to_the_same_state(before, after):
    text = m.render_desired_state("# header\n\nNot Valid\n", before)
    rewritten = m.render_desired_state(text, after)
    assert c.parse_desired_state(rewritten)[0] == after
    assert rewritten.startswith("# header\n\nNot Valid\n")


def test_spaces_around_the_colon_are_what_a_teacher_means():
    assert c.parse_desired_state("nginx : node-1\nweb :node-2\n")[0] == {
        "nginx": "node-1", "web": "node-2"}


def test_a_byte_order_mark_does_not_hide_the_first_line():
    assert c.parse_desired_state("\ufeffnginx\nredis\n") == ({"nginx": None, "redis": None}, [])


def test_a_windows_file_keeps_its_crlf_and_bom_when_rewritten():
    text = "\ufeff# class\r\nnginx\r\nredis:node-2\r\n"
    desired, problems = c.parse_desired_state(text)
    assert desired == {"nginx": None, "redis": "node-2"} and problems == []
    desired["nginx"] = "node-1"
    desired["web"] = None
    assert m.render_desired_state(text, desired) == (
        "\ufeff# class\r\nnginx:node-1\r\nredis:node-2\r\nweb\r\n")


def test_the_file_is_read_with_its_line_endings(tmp_path, monkeypatch):
    path = tmp_path / "desired_state.txt"
    path.write_bytes(b"nginx\r\nredis\r\n")
    m.DesiredStateFile(str(path), c.parse_desired_state).update(lambda desired: desired.update(web=None))
    assert path.read_bytes() == b"nginx\r\nredis\r\nweb\r\n"


def test_a_hand_edit_saved_while_the_api_writes_is_never_lost(tmp_path, monkeypatch):
    """The teacher's editor takes no lock. Here the hand edit lands exactly between an API
    change's read of the file and its write (render_desired_state runs in between): update
    must see the file changed and start again from the teacher's text."""
    path = tmp_path / "desired_state.txt"
    path.write_text("app1\n")
    real_render, edits = m.render_desired_state, []

    def render_while_the_teacher_saves(text, desired):
        if not edits:  # once: `echo web >> desired_state.txt` at the worst moment
            with open(path, "a") as file:
                file.write("web\n")
            edits.append("web")
        return real_render(text, desired)

    monkeypatch.setattr(m, "render_desired_state", render_while_the_teacher_saves)
    desired_file = m.DesiredStateFile(str(path), c.parse_desired_state)
    def place_app1(desired):  # what an API change would do
        desired["app1"] = "node-1"
        return desired

    now = desired_file.update(place_app1)
    assert edits == ["web"]
    assert path.read_text() == "app1:node-1\nweb\n", "the hand edit and the assignment both kept"
    assert now == {"app1": "node-1", "web": None}


def test_a_file_that_never_stops_changing_is_left_alone(tmp_path, monkeypatch):
    path = tmp_path / "desired_state.txt"
    path.write_text("app1\n")
    real_render = m.render_desired_state

    def render_while_someone_keeps_saving(text, desired):
        with open(path, "a") as file:
            file.write("# another save\n")
        return real_render(text, desired)

    monkeypatch.setattr(m, "render_desired_state", render_while_someone_keeps_saving)
    with pytest.raises(m.EditedMeanwhile):
        m.DesiredStateFile(str(path), c.parse_desired_state).update(lambda desired: desired.update(app2=None))
    assert "app2" not in path.read_text() and path.read_text().startswith("app1\n")
    assert [p.name for p in tmp_path.iterdir()] == ["desired_state.txt"], "no temporary file left"


def test_the_loops_save_never_overwrites_a_hand_edit_made_while_it_writes(tmp_path, monkeypatch):
    """The loop's save (step 4) checks the version it read at step 2 once more just before
    the rename: a teacher's save landing while it renders the file is kept, and it raises."""
    path = tmp_path / "desired_state.txt"
    path.write_text("app1\n")
    desired_file = m.DesiredStateFile(str(path), c.parse_desired_state)
    desired, _, version = desired_file.read_with_version()
    real_render = m.render_desired_state

    def render_while_the_teacher_saves(text, desired):
        with open(path, "a") as file:  # `echo web >> desired_state.txt`, in place
            file.write("web\n")
        return real_render(text, desired)

    monkeypatch.setattr(m, "render_desired_state", render_while_the_teacher_saves)
    with pytest.raises(m.EditedMeanwhile):
        desired_file.save({"app1": "node-1"}, version)
    assert path.read_text() == "app1\nweb\n", "the teacher's save is kept"
    assert [p.name for p in tmp_path.iterdir()] == ["desired_state.txt"], "no temporary file left"


def test_a_hand_edit_made_while_step_2_reads_is_seen_by_the_save(tmp_path, monkeypatch):
    """read_with_version takes the version before the text: an edit landing between the two
    makes the save fail, instead of overwriting the edit with a copy that lacks it."""
    path = tmp_path / "desired_state.txt"
    path.write_text("app1\n")
    real_parse = c.parse_desired_state

    def parse_then_the_teacher_saves(text):
        result = real_parse(text)
        (tmp_path / "editor.tmp").write_text("app1\nweb\n")
        os.replace(tmp_path / "editor.tmp", path)
        return result

    desired_file = m.DesiredStateFile(str(path), parse_then_the_teacher_saves)
    desired, _, version = desired_file.read_with_version()
    assert desired == {"app1": None}, "the text as it was read"
    desired_file.parse = real_parse
    with pytest.raises(m.EditedMeanwhile):
        desired_file.save({"app1": "node-1"}, version)
    assert path.read_text() == "app1\nweb\n", "the teacher's save is kept"


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_a_rewrite_keeps_the_files_owner_and_mode(tmp_path):
    path = tmp_path / "desired_state.txt"
    path.write_text("nginx\n")
    os.chown(path, 1234, 1234)
    os.chmod(path, 0o664)
    m.write_atomically(str(path), "nginx:node-1\n")
    info = os.stat(path)
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (1234, 1234, 0o664)
    os.chown(tmp_path, 4321, 4321)
    m.write_atomically(str(tmp_path / "new.txt"), "web\n")
    assert os.stat(tmp_path / "new.txt").st_uid == 4321, "a new file belongs to the directory's owner"


def test_a_reader_never_sees_a_half_written_file(tmp_path):
    """Two big versions written in turn while another thread reads: every read is one
    whole version, and nothing is left behind but the file."""
    path = tmp_path / "desired_state.txt"
    versions = ["".join(f"app{i}:node-1\n" for i in range(40_000)),
                "".join(f"web{i}\n" for i in range(60_000))]
    path.write_text(versions[1])
    written = threading.Event()

    def writer():
        try:
            for k in range(30):
                m.write_atomically(str(path), versions[k % 2])
        finally:
            written.set()

    thread = threading.Thread(target=writer)
    thread.start()
    reads = []  # which version each read saw
    while not written.is_set():
        text = path.read_text()
        reads.append(versions.index(text) if text in versions else f"torn ({len(text)} characters)")
    thread.join()
    assert len(reads) >= 10, "the reader must read while the writes happen"
    assert [read for read in reads if read not in (0, 1)] == [], "a read saw a half-written file"
    assert set(reads) == {0, 1}, "both versions were seen while they were written"
    assert path.read_text() == versions[1]
    assert [p.name for p in tmp_path.iterdir()] == ["desired_state.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "desired_state.txt"
    path.write_text("old\n")
    with pytest.raises(UnicodeEncodeError):  # fails half-way through writing the new text
        m.write_atomically(str(path), "new\n" * 10_000 + "\udc80\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["desired_state.txt"]
    blocked = tmp_path / "blocked"
    (blocked / "inside").mkdir(parents=True)  # a directory where the file should be
    with pytest.raises(OSError):  # fails at the rename, once the temp file is complete
        m.write_atomically(str(blocked), "new\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked", "desired_state.txt"]
    assert [p.name for p in blocked.iterdir()] == ["inside"]


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
@example({"app1": "node-1", "app2": "node-2", "app3": None}, ["node-2"])
def test_after_cleanup_no_container_is_assigned_to_a_dead_node(desired, live_nodes):
    cleaned, orphans = c.cleanup_dead_nodes(desired, live_nodes)
    dead = {name: node for name, node in desired.items() if node is not None and node not in live_nodes}
    assert cleaned == {name: None if name in dead else node for name, node in desired.items()}
    assert list(cleaned) == list(desired)
    assert orphans == list(dead.items()), "every container of a dead node, in order, and no other"


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
    assert [(name, node) for name, node, _ in placements] == [("app1", "node-2"), ("app4", "node-3")]


def test_new_containers_fill_the_least_loaded_node_first():
    desired = {"a": "node-1", "b": "node-1", "c": "node-2", "new1": None, "new2": None}
    _, placements = c.schedule(desired, NODES)
    assert placements == [("new1", "node-3", {"node-1": 2, "node-2": 1, "node-3": 0}),
                          ("new2", "node-2", {"node-1": 2, "node-2": 1, "node-3": 1})], \
        "each placement carries the loads it compared"


def test_with_no_live_node_containers_stay_unscheduled():
    desired = {"app1": None, "app2": "node-1"}
    assert c.schedule(desired, []) == (desired, [])


@given(st.dictionaries(names, st.sampled_from([None] + NODES)),
       st.lists(st.sampled_from(NODES), min_size=1, unique=True))
@example({"a": None, "b": "node-1", "c": "node-3", "d": None}, ["node-1", "node-2"])
def test_after_cleanup_and_schedule_every_container_is_on_exactly_one_live_node(desired, live_nodes):
    cleaned, _ = c.cleanup_dead_nodes(desired, live_nodes)
    scheduled, placements = c.schedule(cleaned, live_nodes)
    assert list(scheduled) == list(desired)
    assert all(node in live_nodes for node in scheduled.values())
    assert [name for name, _, _ in placements] == [n for n, node in cleaned.items() if node is None]
    for name, node, loads in placements:
        assert loads[node] == min(loads.values()), "placed on a least loaded node"


@given(st.lists(names, unique=True), st.lists(st.sampled_from(NODES), min_size=1, unique=True))
def test_from_empty_nodes_loads_differ_by_at_most_one(containers, live_nodes):
    scheduled, _ = c.schedule(dict.fromkeys(containers), live_nodes)
    loads = [list(scheduled.values()).count(node) for node in live_nodes]
    assert max(loads) - min(loads) <= 1


# --- step 5: the reconcile diff -----------------------------------------------------

def test_diff_starts_the_missing_and_stops_intruders():
    assert c.diff_node(["nginx", "intruder"], ["nginx", "redis"]) == (
        ["redis"], ["intruder"], ["nginx"])


def test_diff_of_a_converged_node_is_empty():
    assert c.diff_node(["a", "b"], ["b", "a"]) == ([], [], ["b", "a"])


def test_a_container_listed_twice_is_brought_back_to_one():
    assert c.diff_node(["a", "a", "b"], ["a", "b"]) == (["a"], ["a"], ["b"])


def test_the_example_in_diff_nodes_docstring_is_what_it_returns():
    """The lesson shows one call and its result; a student may trust it."""
    assert c.diff_node(["web", "intruder", "db", "db"], wanted=["web", "db", "api"]) == c.NodePlan(
        to_start=["db", "api"], to_stop=["intruder", "db"], to_keep=["web"])
    assert 'diff_node(["web", "intruder", "db", "db"], wanted=["web", "db", "api"])' in c.diff_node.__doc__
    assert ('== NodePlan(to_start=["db", "api"], to_stop=["intruder", "db"], to_keep=["web"])'
            in c.diff_node.__doc__)


def test_zombies_on_a_node_that_came_back_are_stopped():
    # node-1 was down while app1 and app4 moved; it comes back still listing them.
    observed = {"node-1": ["app1", "app4"], "node-2": ["app2", "app5", "app1"],
                "node-3": ["app3", "app6", "app4"]}
    desired = {"app1": "node-2", "app2": "node-2", "app3": "node-3",
               "app4": "node-3", "app5": "node-2", "app6": "node-3"}
    assert c.plan_reconcile(observed, desired) == {"node-1": ([], ["app1", "app4"], [])}


def apply_plan(running, to_start, to_keep):
    """What the node's shell command does: keep the lines of to_keep, append to_start."""
    return [name for name in running if name in to_keep] + to_start


@given(st.dictionaries(st.sampled_from(NODES), st.lists(names | st.text(max_size=5))),
       st.dictionaries(names, st.sampled_from([None] + NODES)),
       st.lists(st.sampled_from(NODES), unique=True))
@example({"node-1": ["a", "x", "a", ""], "node-2": ["b"]}, {"a": "node-1", "b": "node-2", "c": "node-2"},
         ["node-1", "node-2"])
def test_applying_the_plan_to_the_observed_state_yields_the_desired_state(observed, desired,
                                                                          answering):
    observed = {node: observed.get(node, []) for node in answering}
    plan = c.plan_reconcile(observed, desired)
    for node in answering:
        to_start, to_stop, to_keep = plan.get(node, ([], [], observed[node]))
        after = apply_plan(observed[node], to_start, to_keep)
        wanted = [name for name, assigned in desired.items() if assigned == node]
        assert sorted(after) == sorted(wanted), "each wanted container exactly once, nothing else"
        assert sorted(set(observed[node]) - set(wanted)) == sorted(
            name for name in to_stop if name not in wanted), "every unwanted line is logged as a stop"


# --- node conditions: Ready, NotReady, Unknown ------------------------------------------

def test_a_node_that_answers_is_ready():
    assert c.node_conditions({"node-1": b"app1\n"}, {}) == {"node-1": ("Ready", None)}


def test_a_node_whose_command_fails_is_not_ready_with_the_reason():
    answers = {"node-1": m.NodeError("/app/nodes/node-1_running.txt: not a regular file")}
    assert c.node_conditions(answers, {}) == {
        "node-1": ("NotReady", "/app/nodes/node-1_running.txt: not a regular file")}


def test_a_node_that_does_not_answer_is_unknown():
    condition, reason = c.node_conditions({"node-1": TimeoutError()}, {})["node-1"]
    assert condition == "Unknown" and reason == f"no answer within {c.SSH_TIMEOUT:g} s"


def test_a_node_whose_last_actions_failed_is_not_ready_until_they_work():
    condition, reason = c.node_conditions({"node-1": b""}, {"node-1": "No space left on device"})["node-1"]
    assert condition == "NotReady" and "No space left on device" in reason


# --- reasons for people ----------------------------------------------------------------

@pytest.mark.parametrize("error, reason", [
    (TimeoutError(), "no answer within"),
    (socket.gaierror(-2, "Name or service not known"), "name not found (DNS)"),
    (ConnectionRefusedError(111, "Connection refused"), "connection refused"),
    (paramiko.ssh_exception.NoValidConnectionsError({("127.0.0.1", 22): ConnectionRefusedError(111, "x")}),
     "connection refused"),
    (OSError(errno.EHOSTUNREACH, "No route to host"), "host unreachable"),
    (paramiko.AuthenticationException("Authentication failed."), "authentication failed"),
    (paramiko.SSHException("No existing session"), "connection lost"),
    (paramiko.SSHException("Error reading SSH protocol banner"), "no answer within"),
    (paramiko.SSHException("Timeout opening channel."), "no answer within"),
    (EOFError(), "connection lost"),
])
def test_errors_are_told_in_words_for_people(error, reason):
    assert c.log.describe(error).startswith(reason)


def test_english_plurals_are_right():
    assert c.log.count(1, "container") == "1 container"
    assert c.log.count(2, "node") == "2 nodes"
    assert c.log.count(199990, "number") == "199,990"


def test_french_keeps_the_seeds_wording():
    french = m.TickLog("fr")
    assert french.message("running_count", containers=french.count(1, "container"),
                          nodes=french.count(3, "node")) == "   → 1 containers tournent sur 3 noeuds"


def test_a_long_list_is_cut_in_the_log():
    names = [f"intruder{i}" for i in range(200_000)]
    line = c.log.listing(names)
    assert line.endswith("… and 199,980 more") and len(line) < 400


def test_a_huge_garbage_line_is_cut_in_the_log():
    assert len(m.shown("\x00" * 1_000_000)) < 300


# --- the node commands, run by real shells on real files ---------------------------------
# Every node command is plain POSIX: it must work with Debian's dash and GNU sed,
# and with BusyBox's sh and sed (an Alpine node). BusyBox runs from a directory
# that holds only its applets, so no GNU tool can sneak in.

BUSYBOX_APPLETS = ["sh", "sed", "head", "tail", "cat", "printf", "mkdir", "chown", "stat",
                   "echo", "test", "["]


@pytest.fixture(scope="session")
def busybox_bin(tmp_path_factory):
    busybox = shutil.which("busybox")
    assert busybox, "busybox is not installed (tests/run installs Debian's busybox package)"
    directory = tmp_path_factory.mktemp("busybox-bin")
    for applet in BUSYBOX_APPLETS:
        (directory / applet).symlink_to(busybox)
    return directory


@pytest.fixture(params=["dash+gnu", "busybox"])
def node_shell(request, busybox_bin):
    """How to run a node command: [argv...] and the environment, for each kind of node."""
    if request.param == "busybox":
        return [str(busybox_bin / "sh"), "-c"], {"PATH": str(busybox_bin)}
    return ["sh", "-c"], {"PATH": os.environ["PATH"]}


def run_on(node_shell, command, check=True):
    argv, env = node_shell
    return subprocess.run([*argv, command], env=env, capture_output=True, check=check)


def converge(node_shell, directory, content, wanted):
    """Play one reconcile on a real file: observe it, diff, run the action command; return the file."""
    path = directory / "node-1_running.txt"
    if content is not None:
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    output = run_on(node_shell, m.observe_command(str(directory), "node-1")).stdout
    running, _ = m.parse_running_file(output)
    to_start, to_stop, to_keep = c.diff_node(running, wanted)
    command = m.act_command(str(directory), "node-1", to_keep, to_start)
    run_on(node_shell, command)
    return path.read_bytes().decode(), command


def test_stopping_app1_never_touches_app10(node_shell, tmp_path):
    after, _ = converge(node_shell, tmp_path, "app10\napp1\napp11\n", ["app10", "app11"])
    assert after == "app10\napp11\n"


def test_start_appends_a_line_even_after_a_line_without_newline(node_shell, tmp_path):
    after, _ = converge(node_shell, tmp_path, "nginx", ["nginx", "redis", "web"])
    assert after == "nginx\nredis\nweb\n"


def test_start_creates_the_missing_file(node_shell, tmp_path):
    assert converge(node_shell, tmp_path, None, ["nginx"])[0] == "nginx\n"


def test_garbage_lines_are_removed_without_reaching_the_shell(node_shell, tmp_path):
    garbage = "$(touch pwned); 'x\" `id`"
    after, command = converge(node_shell, tmp_path, f"nginx\n{garbage}\nBad Name\napp1\n", ["nginx"])
    assert garbage not in command and "Bad Name" not in command
    assert after == "nginx\n"
    assert not (tmp_path / "pwned").exists()


def test_a_flood_of_200000_intruders_is_healed_by_one_short_command(node_shell, tmp_path):
    flood = "nginx\n" + "".join(f"intruder{i}\n" for i in range(200_000))
    after, command = converge(node_shell, tmp_path, flood, ["nginx", "redis"])
    assert after == "nginx\nredis\n"
    assert len(command) < 500, "the command must not grow with the number of unwanted lines"


@pytest.mark.parametrize("prank", [
    b"\x00\xff\xfe binary \x00\n" * 1000 + b"nginx\n",
    b"x" * 1_000_000 + b"\nnginx\n",
    b"nginx\n" + b"0123456789abcdef\n" * 700_000,  # about 12 MB: more than the controller reads
], ids=["binary", "one-1MB-line", "12MB"])
def test_pranks_in_a_node_file_are_healed(node_shell, tmp_path, prank):
    after, _ = converge(node_shell, tmp_path, prank, ["nginx"])
    assert after.splitlines().count("nginx") == 1
    after, _ = converge(node_shell, tmp_path, None, ["nginx"])  # the next tick: converged
    assert after == "nginx\n"


def test_the_controller_reads_at_most_one_mebibyte_of_a_node_file(node_shell, tmp_path, monkeypatch):
    (tmp_path / "node-1_running.txt").write_bytes(b"intruder\n" * 2_000_000)  # 18 MB
    output = run_on(node_shell, m.observe_command(str(tmp_path), "node-1")).stdout
    assert len(output) == m.MAX_READ_BYTES + 1
    names, truncated = m.parse_running_file(output)
    assert truncated and set(names[:-1]) == {"intruder"}
    assert "intruder".startswith(names[-1]), "the line cut at 1 MiB is kept, as garbage"


def test_what_lies_past_the_first_mebibyte_is_removed_too(node_shell, tmp_path):
    """Found by the chaos run: a 1 MB line, then garbage. The controller reads only the
    first MiB, which holds nothing but the start of the long line: that partial line is
    still something to stop, so the node's file is rewritten and everything unwanted goes."""
    prank = "nginx\n" + "x" * 2_000_000 + "\n" + "\x1e\x00garbage\n" * 10 + "intruder\n"
    after, _ = converge(node_shell, tmp_path, prank, ["nginx"])
    assert after == "nginx\n"


def test_a_directory_instead_of_the_file_is_a_reason_not_a_silence(node_shell, tmp_path, monkeypatch):
    (tmp_path / "node-1_running.txt").mkdir()
    result = run_on(node_shell, m.observe_command(str(tmp_path), "node-1"), check=False)
    assert result.returncode != 0
    assert b"not a regular file" in result.stderr


def test_a_node_without_sed_says_so(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ["head"]:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    result = subprocess.run(["/bin/sh", "-c", m.observe_command(str(tmp_path), "node-1")],
                            env={"PATH": str(bin_dir)}, capture_output=True)
    assert result.returncode != 0 and b"sed: not found" in result.stderr


def test_the_command_the_lesson_quotes_is_the_one_a_node_gets():
    """reconcile()'s comment shows, roughly, what node-1 is sent to keep web and start api."""
    command = m.act_command("/app/nodes", "node-1", ["web"], ["api"])
    assert "sed -i -E -e '/^(web)$/!d'" in command and "printf '%s\\n' api >>" in command
    quoted = "sed -i -E '/^(web)$/!d' node-1_running.txt && printf '%s\\n' api >> node-1_running.txt"
    assert quoted in inspect.getsource(c.reconcile)


def test_an_unvalidated_name_is_never_started():
    with pytest.raises(ValueError):
        m.act_command("/app/nodes", "node-1", [], ["x; reboot"])
    with pytest.raises(ValueError):
        m.act_command("/app/nodes", "node-1", ["x|.*"], [])


@settings(max_examples=25, deadline=None)
@given(st.lists(names | st.text(max_size=4), max_size=6), st.lists(names, max_size=5, unique=True))
def test_the_shell_commands_make_the_file_list_what_is_wanted(tmp_path_factory, busybox_bin,
                                                               running, wanted):
    for shell in (["sh", "-c"], {"PATH": os.environ["PATH"]}), \
                 ([str(busybox_bin / "sh"), "-c"], {"PATH": str(busybox_bin)}):
        directory = tmp_path_factory.mktemp("node")
        content = "".join(line.replace("\n", "") + "\n" for line in running)
        after, _ = converge(shell, directory, content, wanted)
        assert sorted(after.splitlines()) == sorted(wanted)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")


@needs_root
def test_a_file_the_controller_creates_belongs_to_the_owner_of_the_directory(node_shell, tmp_path):
    os.chown(tmp_path, 1234, 1234)
    converge(node_shell, tmp_path, None, ["nginx"])
    assert os.stat(tmp_path / "node-1_running.txt").st_uid == 1234


@needs_root
def test_a_rewritten_node_file_keeps_its_owner(node_shell, tmp_path):
    path = tmp_path / "node-1_running.txt"
    path.write_text("nginx\nintruder\n")
    os.chown(path, 1234, 1234)
    converge(node_shell, tmp_path, None, ["nginx"])
    assert path.read_text() == "nginx\n" and os.stat(path).st_uid == 1234


# --- grace periods: a node that does not answer may only be cut off ------------------------

def test_with_no_grace_period_a_silent_node_is_evicted_at_once():
    conditions = {"node-1": ("Unknown", "no answer")}
    assert c.grace_periods(conditions, {"node-1": 99.0}, 100.0, grace=0) == {}


def test_within_its_grace_period_a_silent_node_keeps_its_containers():
    conditions = {"node-1": ("Unknown", "no answer"), "node-2": ("Ready", None)}
    waiting = c.grace_periods(conditions, {"node-1": 88.0, "node-2": 100.0}, 100.0, grace=30)
    assert waiting == {"node-1": (12.0, 18.0)}
    cleaned, orphans = c.cleanup_dead_nodes({"app1": "node-1", "app2": "node-2"},
                                            ["node-2"] + list(waiting))
    assert cleaned == {"app1": "node-1", "app2": "node-2"} and orphans == []


def test_after_its_grace_period_a_silent_node_is_evicted():
    conditions = {"node-1": ("Unknown", "no answer")}
    assert c.grace_periods(conditions, {"node-1": 69.0}, 100.0, grace=30) == {}


def test_a_not_ready_node_gets_no_grace_period():
    conditions = {"node-1": ("NotReady", "sed: not found")}
    assert c.grace_periods(conditions, {"node-1": 99.0}, 100.0, grace=30) == {}


@given(st.dictionaries(st.sampled_from(NODES), st.sampled_from(["Ready", "NotReady", "Unknown"]),
                       min_size=3),
       st.dictionaries(st.sampled_from(NODES), st.floats(0, 100), min_size=3),
       st.floats(0, 60), st.dictionaries(names, st.sampled_from([None] + NODES)))
@example({"node-1": "Unknown", "node-2": "Ready", "node-3": "Unknown"},
         {"node-1": 5.0, "node-2": 0.0, "node-3": 50.0}, 30.0,
         {"a": "node-1", "b": "node-3", "c": None, "d": "node-2"})
def test_grace_keeps_only_silent_nodes_work_and_schedules_only_on_ready_nodes(
        condition_of, silent_for, grace, declared):
    conditions = {node: (condition_of[node], None) for node in NODES}
    now = 1000.0
    waiting = c.grace_periods(conditions, {n: now - silent_for[n] for n in NODES}, now, grace)
    assert all(conditions[n][0] == "Unknown" and silent < grace and left == grace - silent
               for n, (silent, left) in waiting.items())
    assert all(n in waiting for n in NODES
               if conditions[n][0] == "Unknown" and silent_for[n] < grace - 1e-6), \
        "every silent node within its grace period waits"
    live = [n for n in NODES if conditions[n][0] == "Ready"]
    cleaned, _ = c.cleanup_dead_nodes(declared, live + list(waiting))
    scheduled, placements = c.schedule(cleaned, live)
    for name, node in declared.items():
        if node in waiting:
            assert scheduled[name] == node, "a node in its grace period keeps its containers"
    assert all(node in live for _, node, _ in placements), "new placements only on Ready nodes"
    assert all(node is None or node in live or node in waiting for node in scheduled.values())


# --- when to tick: next_trigger() on a fake clock ----------------------------------------
# The loop timer sleeps until next_trigger() names a reason to tick. A fake clock
# walks time forward in tenths of a second: no sleeps, no threads.

FAKE_CLOCK = [tenths / 10 for tenths in range(0, 201)]  # 0.0 .. 20.0 s


def first_trigger(deadline=5.0, paused=False, steps_requested=0, woken=False, check_soon=False):
    """(when, why) of the first tick next_trigger() allows on the fake clock, or None."""
    for now in FAKE_CLOCK:
        trigger = m.next_trigger(now, deadline, paused, steps_requested, woken,
                                 due="requeue" if check_soon else "timer")
        if trigger:
            return now, trigger
    return None


def test_the_timer_ticks_at_its_deadline_and_not_before():
    assert first_trigger(deadline=5.0) == (5.0, "timer")


def test_after_a_tick_that_acted_the_deadline_brings_a_requeue():
    assert first_trigger(deadline=0.3, check_soon=True) == (0.3, "requeue")


def test_the_requeue_rule_checks_a_tick_that_acted_once_and_only_once():
    assert c.when_to_tick_again(acted=True, trigger="timer") == (c.REQUEUE_SECONDS, "requeue")
    assert c.when_to_tick_again(acted=True, trigger="wake") == (c.REQUEUE_SECONDS, "requeue")
    assert c.when_to_tick_again(acted=True, trigger="requeue") == (c.TICK_SECONDS, "timer"), \
        "a check that acted again does not requeue: a node that keeps changing cannot make the loop spin"
    assert c.when_to_tick_again(acted=False, trigger="requeue") == (c.TICK_SECONDS, "timer")
    assert c.when_to_tick_again(acted=False, trigger="start") == (c.TICK_SECONDS, "timer")


def test_a_wake_up_ticks_at_once():
    assert first_trigger(deadline=5.0, woken=True) == (0.0, "wake")


def test_while_paused_neither_the_timer_nor_a_wake_up_ticks():
    assert first_trigger(deadline=5.0, paused=True) is None
    assert first_trigger(deadline=5.0, paused=True, woken=True) is None


def test_a_step_ticks_at_once_paused_or_not_and_before_a_wake_up():
    assert first_trigger(paused=True, steps_requested=1) == (0.0, "step")
    assert first_trigger(paused=True, steps_requested=1, woken=True) == (0.0, "step")
    assert first_trigger(paused=False, steps_requested=2, woken=True) == (0.0, "step")


def test_the_probe_action_on_a_not_ready_node_keeps_what_it_runs(tmp_path, monkeypatch):
    """Found in review: a NotReady node with nothing to do still gets an action (to see
    whether it works again). That action must keep the node's lines, not wipe them."""
    (tmp_path / "node-1_running.txt").write_text("web\n")
    nodes = m.Nodes({"node-1": ("127.0.0.1", 22)}, str(tmp_path), "root", None, 3.0, threading.Event())
    monkeypatch.setattr(c, "nodes", nodes)
    monkeypatch.setattr(c.log, "emit", lambda text: None)
    failing = {"node-1": "sed: disk full"}
    sent = {}

    def run_with_a_real_shell(commands):  # what SSH would do on the node
        sent.update(commands)
        return {node: subprocess.run(["sh", "-c", command], check=True).stdout or b""
                for node, command in commands.items()}

    monkeypatch.setattr(nodes, "on_every_node", run_with_a_real_shell)
    observed = c.Observation({"node-1": ["web"]}, [], {}, {"node-1": ("NotReady", "its last actions failed")})
    acted, results = c.reconcile(observed, {"web": "node-1"}, failing)
    assert list(sent) == ["node-1"], "the NotReady node was given its probe action"
    assert (results, acted) == ({"node-1": None}, False)
    assert (tmp_path / "node-1_running.txt").read_text() == "web\n"
    assert c.still_failing(failing, results) == {}, "the action worked: the node is Ready again"


def test_a_node_whose_action_fails_there_stays_not_ready_and_a_silence_changes_nothing():
    failing = {"node-2": "sed: disk full"}
    results = {"node-1": m.NodeError("sed: disk full"), "node-2": TimeoutError(), "node-3": None}
    assert c.still_failing(failing, results) == {"node-1": "sed: disk full", "node-2": "sed: disk full"}


# --- the tick's verdict ------------------------------------------------------------------

def verdicts(language, *ticks):
    """The verdict lines a TickLog prints for ticks given as (results, unscheduled, waiting):
    the lesson's verdict() decides, end_tick() prints."""
    log, lines = m.TickLog(language), []
    log.emit = lines.append
    for results, unscheduled, waiting in ticks:
        log.begin_tick("timer")
        log.end_tick(c.verdict(results, unscheduled, waiting), results, unscheduled, waiting)
    return [line.strip() for line in lines if line.startswith("\n") and line.strip()[:1] in "✅❌⏳"], log


def test_once_the_log_shows_a_verdict_the_page_and_kubectl_have_the_tick():
    """A student (or a test) who sees the verdict line and then asks /api/state or kubectl
    must find that tick: end_tick records it and tells its listeners before it prints."""
    log, seen = m.TickLog("en"), []
    log.after_tick.append(lambda: seen.append("listener"))
    log.emit = lambda text: seen.append(
        (text.strip(), [tick["number"] for tick in log.recent_ticks()]) if text.startswith("\n✅")
        else None)
    log.begin_tick("timer")
    log.end_tick("converged", {}, [], {})
    number = log.recent_ticks()[-1]["number"]
    assert [entry for entry in seen if entry] == ["listener", ("✅ Converged", [number])]


def test_a_node_silent_in_its_grace_period_makes_the_verdict_waiting_not_converged():
    silent = {"node-1": (12.0, 18.0)}
    for language, text in [
            ("en", "⏳ Waiting: node-1 silent, what it runs is unknown (eviction in 18 s)"),
            ("fr", "⏳ En attente : node-1 silencieux, ce qu'il exécute est inconnu (éviction dans 18 s)")]:
        lines, log = verdicts(language, ({"node-2": None}, [], silent))
        assert lines == [text]
        tick = log.recent_ticks()[-1]
        assert (tick["converged"], tick["outcome"], tick["waiting"], tick["verdict"]) == (
            False, "waiting", ["node-1"], text)


def test_the_verdict_is_a_pure_decision_over_results_unscheduled_and_grace():
    in_grace = {"node-3": (4.0, 26.0)}
    assert c.verdict({}, [], {}) == "converged", "nothing to do, nobody silent"
    assert c.verdict({"node-1": None, "node-2": None}, [], {}) == "converged"
    assert c.verdict({}, [], in_grace) == "waiting", "an empty node in its grace period waits too"
    assert c.verdict({"node-1": TimeoutError()}, [], {}) == "not_converged", "any error, a timeout too"
    assert c.verdict({"node-1": m.NodeError("sed: disk full")}, [], in_grace) == "not_converged"
    assert c.verdict({"node-1": None}, ["web"], in_grace) == "not_converged", "unscheduled outranks waiting"


def one_tick_setup(tmp_path, monkeypatch):
    """Real ticks on tmp_path: desired_state.txt holds app1, and the nodes' files are
    changed by a real shell. Returns (desired_state.txt, its DesiredStateFile, the log lines)."""
    path = tmp_path / "desired_state.txt"
    path.write_text("app1\n")
    desired_file = m.DesiredStateFile(str(path), c.parse_desired_state)
    nodes = m.Nodes({node: ("127.0.0.1", 22) for node in c.NODES}, str(tmp_path), "root", None,
                    3.0, threading.Event())
    monkeypatch.setattr(nodes, "on_every_node", lambda commands: {
        node: subprocess.run(["sh", "-c", command], check=True, capture_output=True).stdout
        for node, command in commands.items()})
    printed = []
    for name, value in [("desired_file", desired_file), ("nodes", nodes)]:
        monkeypatch.setattr(c, name, value)
    monkeypatch.setattr(c.log, "emit", printed.append)
    return path, desired_file, printed


def test_a_post_made_during_steps_2_to_4_waits_for_their_save(tmp_path, monkeypatch):
    """A POST arrives (in another thread, as the API's) while step 4 explains its placement:
    it waits for the file's lock, so the tick saves what it decided on the file it read, the
    POST is saved after, and the tick ends Converged. The next tick (its wake) places web."""
    path, desired_file, printed = one_tick_setup(tmp_path, monkeypatch)
    explain_schedule, posts, save = c.explain_schedule, [], desired_file.save

    def explain_while_a_post_arrives(placements, unscheduled):
        explain_schedule(placements, unscheduled)
        assert desired_file.lock.locked(), "steps 2 to 4 hold the lock: a POST must wait"
        post = threading.Thread(target=desired_file.update, args=(c.declare, "web"), daemon=True)
        post.start()
        posts.append(post)

    def save_under_the_lock(desired, version):
        assert desired_file.lock.locked(), "step 4 saves before it lets the POST in"
        assert "web" not in desired_file.read()[0], "the POST waited for the save"
        save(desired, version)

    monkeypatch.setattr(desired_file, "save", save_under_the_lock)

    monkeypatch.setattr(c, "explain_schedule", explain_while_a_post_arrives)
    c.run_tick("timer", {})
    posts[0].join(timeout=10)
    assert not posts[0].is_alive(), "the POST got the lock once the tick had saved"
    first = list(c.NODES)[0]
    assert path.read_text() == f"app1:{first}\nweb\n", "the placement and the POST both saved"
    assert (tmp_path / f"{first}_running.txt").read_text() == "app1\n"
    assert printed[-1].strip() == "✅ Converged", "the tick decided on the whole file it read"

    monkeypatch.setattr(c, "explain_schedule", explain_schedule)
    monkeypatch.setattr(desired_file, "save", save)
    c.run_tick("wake", {})
    assert c.parse_desired_state(path.read_text())[0]["web"] is not None
    assert printed[-1].strip() == "✅ Converged"


def test_a_hand_edit_saved_during_a_tick_fails_it_and_the_next_tick_starts_from_the_edit(
        tmp_path, monkeypatch):
    """A teacher's editor takes no lock: its save lands between step 2's read and step 4's
    save. The tick saves nothing and acts on no node; the log says why; the next tick
    places both app1 and the edit's web."""
    path, desired_file, printed = one_tick_setup(tmp_path, monkeypatch)
    explain_schedule = c.explain_schedule

    def explain_while_the_teacher_saves(placements, unscheduled):
        explain_schedule(placements, unscheduled)
        (tmp_path / "editor.tmp").write_text("app1\nweb\n")  # saved as editors do: a rename
        os.replace(tmp_path / "editor.tmp", path)

    monkeypatch.setattr(c, "explain_schedule", explain_while_the_teacher_saves)
    with pytest.raises(m.EditedMeanwhile) as raised:
        c.run_tick("timer", {})
    assert path.read_text() == "app1\nweb\n", "the teacher's save is kept, nothing of the tick's"
    assert not any(tmp_path.glob("*_running.txt")), "no node was acted on"
    c.log.fail_tick(raised.value)  # what control_loop does with it
    failed = c.log.recent_ticks()[-1]
    assert failed["decisions"]["schedule"] == [] and failed["actions"] == [], \
        "the page and kubectl must not show the placement the tick could not save"
    assert [line.strip() for line in printed[-2:]] == [
        "✗ tick failed: desired_state.txt was edited during the tick, retry next tick",
        "❌ Not converged: desired_state.txt was edited during the tick"]

    monkeypatch.setattr(c, "explain_schedule", explain_schedule)
    c.run_tick("timer", {})
    assert set(c.parse_desired_state(path.read_text())[0]) == {"app1", "web"}
    assert None not in c.parse_desired_state(path.read_text())[0].values()
    assert printed[-1].strip() == "✅ Converged"


def test_a_failure_outranks_waiting_and_nothing_silent_is_converged():
    lines, _ = verdicts("en", ({"node-2": m.NodeError("sed: disk full")}, [], {"node-1": (1.0, 29.0)}),
                        ({"node-2": None}, [], {}), ({}, ["web"], {}))
    assert lines == ["❌ Not converged: node-2: sed: disk full", "✅ Converged",
                     "❌ Not converged: 1 container unscheduled"]
    assert verdicts("fr", ({}, [], {}))[0] == ["✅ Convergé"], "the original project's word"
