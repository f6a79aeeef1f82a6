"""A real classroom against real sshd nodes and the real controller process.

Students prank the node files (floods, binary bytes, a directory instead of the
file), teachers hand-edit desired_state.txt (spaces, a BOM, CRLF, a node that does
not exist), the log goes to a pipe that closes, a node hangs with small settings,
every tick fails. Nothing of that may crash the loop, grow memory without bound,
or move a healthy node's work.
"""

import os
import subprocess
import sys
import time
import urllib.request
import re
import signal
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sshd_nodes import VERDICT, Controller, children, memory_kb, wait_until  # noqa: E402
from test_integration_ssh import (SSH_TIMEOUT, TICK_SECONDS, WAIT, assert_each_once,  # noqa: E402,F401
                                  cluster, ctl, line, post, pytestmark, ssh_keys,
                                  start_controller, wait_each_once, wait_running)

RSS_LIMIT_MB = 150
STATE_LIMIT_BYTES = 200_000


def peak_rss_mb(ctl):
    """The controller process's peak resident memory so far (VmHWM), in MB."""
    _, peak_kb = memory_kb(ctl.proc.pid)
    return peak_kb / 1024


# --- pranks in a node's file ------------------------------------------------------------

PRANKS = {
    "200000 lines": lambda: "".join(f"intruder{i}\n" for i in range(200_000)).encode(),
    "10 MB": lambda: b"0123456789abcdef\n" * 620_000,
    "binary": lambda: bytes(range(256)) * 4000,
    "one 1 MB line": lambda: b"x" * 1_000_000 + b"\n",
}


@pytest.mark.parametrize("prank", list(PRANKS))
def test_a_pranked_node_file_is_healed_within_two_ticks_with_bounded_memory(cluster, ctl, prank):
    post(ctl, "nginx")
    node = wait_running(ctl, "nginx")
    ctl.wait_ticks(1)
    with open(cluster[node].state_file, "ab") as file:
        file.write(PRANKS[prank]())
    mark = ctl.mark()
    # Two ticks after the one that may have been in flight when the prank landed.
    ctl.wait_ticks(3, timeout=WAIT * 2)
    assert cluster[node].running == ["nginx"], "the prank is gone, nginx still runs once"
    lines = ctl.find_lines(lambda text: True, after=mark)
    assert len(lines) < 400, "the log of a flood is cut, not 200,000 lines"
    assert max(len(text) for _, text in lines) < 2000, "no log line carries the whole prank"
    with urllib.request.urlopen(ctl.base_url + "/api/state", timeout=10) as response:
        size = len(response.read())
    assert size < STATE_LIMIT_BYTES, f"/api/state is {size} bytes"
    assert peak_rss_mb(ctl) < RSS_LIMIT_MB, f"peak RSS {peak_rss_mb(ctl):.0f} MB"
    assert ctl.get("/api/containers/nginx")[1]["status"] == "running"


def test_a_flood_is_logged_cut_with_the_count(cluster, ctl):
    post(ctl, "nginx")
    node = wait_running(ctl, "nginx")
    with open(cluster[node].state_file, "a") as file:
        file.writelines(f"intruder{i}\n" for i in range(30))
    mark = ctl.mark()
    ctl.wait_for_line(line(f"  ◼ STOP: … and 10 more on {node}"), WAIT, after=mark)
    stops = ctl.find_lines(lambda text: text.startswith("  ◼ STOP: intruder"), after=mark)
    assert len(stops) == 20


# --- a node that answers but fails: NotReady, not Unknown ---------------------------------

def test_a_node_whose_file_is_a_directory_is_not_ready_and_comes_back(cluster, ctl):
    for name in ("app1", "app2", "app3"):
        post(ctl, name)
    placed = wait_each_once(cluster, ["app1", "app2", "app3"])
    victim = placed["app1"]
    ctl.wait_ticks(1)
    state_file = cluster[victim].state_file
    state_file.unlink()
    state_file.mkdir()  # a prank: the node answers, but cannot read or write its file
    mark = ctl.mark()
    ctl.wait_for_line(line(f"  ⚠️  {victim}: not ready ({state_file}: not a regular file)"),
                      WAIT, after=mark)
    ctl.wait_for_line(line(f"  💀 CLEANUP: app1 (node {victim} not ready)"), WAIT, after=mark)
    nodes = {node["name"]: node for node in ctl.get("/api/nodes")[1]}
    assert nodes[victim]["condition"] == "NotReady"
    assert nodes[victim]["reason"] == f"{state_file}: not a regular file"
    others = [n for n in ("node-1", "node-2", "node-3") if n != victim]
    assert {n: nodes[n]["condition"] for n in others} == {n: "Ready" for n in others}
    wait_until(lambda: sum("app1" in cluster[n].running for n in others) == 1,
               what="app1 moved to a Ready node")
    assert not ctl.find_lines(line(f"  ⚠️  {victim}: unavailable"), after=mark)

    state_file.rmdir()  # repaired
    wait_until(lambda: {n["name"]: n for n in ctl.get("/api/nodes")[1]}[victim]["condition"]
               == "Ready", what=f"{victim} Ready again")
    wait_each_once(cluster, ["app1", "app2", "app3"])


# --- hand edits of desired_state.txt ------------------------------------------------------

def test_hand_edits_with_spaces_a_bom_and_crlf_stop_nothing(cluster, ctl):
    post(ctl, "nginx")
    post(ctl, "redis")
    placed = wait_each_once(cluster, ["nginx", "redis"])
    ctl.wait_ticks(1)
    mark = ctl.mark()
    # A teacher on Windows retypes the file in Notepad: BOM, CRLF, spaces around the colon.
    ctl.desired_state_file.write_bytes(
        f"\ufeffnginx : {placed['nginx']}\r\nredis:{placed['redis']}\r\nweb\r\n".encode())
    wait_each_once(cluster, ["nginx", "redis", "web"])
    ctl.wait_ticks(1)
    assert not ctl.find_lines(lambda text: "STOP" in text or "ignored" in text, after=mark)
    now = assert_each_once(cluster, ["nginx", "redis", "web"])
    assert {n: now[n] for n in ("nginx", "redis")} == placed, "nothing moved"
    text = ctl.desired_state_file.read_bytes()
    assert text.startswith("\ufeff".encode()) and text.count(b"\r\n") == 3 and b"\n" not in \
        text.replace(b"\r\n", b""), f"the file keeps its BOM and CRLF: {text!r}"
    assert b"web:node-" in text, "web's assignment was written, in the file's own style"


def test_a_line_naming_a_node_that_does_not_exist_says_unknown(cluster, ctl):
    ctl.wait_ticks(1)
    mark = ctl.mark()
    ctl.desired_state_file.write_text("web:node-9\n")
    ctl.wait_for_line(line("  💀 CLEANUP: web (node node-9 unknown: not in NODES)"), WAIT, after=mark)
    assert not ctl.find_lines(line("  💀 CLEANUP: web (node node-9 down)"), after=mark)
    wait_each_once(cluster, ["web"])


# --- the loop survives, and /healthz tells the truth --------------------------------------

def test_the_loop_survives_a_closed_stdout(cluster, tmp_path):
    """`python app_controller.py | head -5`: once head exits, every print fails."""
    ctl = Controller(cluster, tick_seconds=TICK_SECONDS, ssh_timeout=SSH_TIMEOUT, work_dir=tmp_path)
    pipeline = subprocess.Popen(f"{sys.executable} {ctl.script} | head -5", shell=True,
                                cwd=str(ctl.script.parent), env=ctl.env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: ctl.get("/healthz", timeout=1)[0] == 200, what="the API answers",
                   ignoring=(OSError,))
        wait_until(lambda: "head" not in _children(pipeline), what="head took 5 lines and exited")
        post(ctl, "nginx")
        wait_each_once(cluster, ["nginx"])
        wait_until(lambda: ctl.get("/api/containers/nginx")[1]["status"] == "running",
                   what="the loop still observes")
        status, health = ctl.get("/healthz")
        assert status == 200, health
    finally:
        os.killpg(pipeline.pid, signal.SIGTERM)
        pipeline.wait(timeout=10)


def _children(process):
    """The command names of a process's children."""
    names = []
    for child in children(process.pid):
        try:
            names.append(Path(f"/proc/{child}/comm").read_text().strip())
        except FileNotFoundError:
            pass
    return names


def test_healthz_stays_200_while_one_node_hangs_with_small_settings(cluster, start_controller):
    ctl = start_controller(tick_seconds=1, ssh_timeout=3)
    ctl.wait_ticks(1)
    cluster["node-3"].hang()
    try:
        mark = ctl.mark()
        slow, _ = ctl.wait_for_line(line("  ⚠️  node-3: unavailable"), WAIT * 2, after=mark)
        # Sampled all along the next four ticks, each slowed by the hung node (about 4 s).
        answers = []
        deadline = time.monotonic() + WAIT * 4
        while len(ctl.find_lines(VERDICT, after=slow)) < 4:
            assert time.monotonic() < deadline, "four ticks did not come\n" + ctl.tail()
            answers.append(ctl.get("/healthz")[0])
            time.sleep(0.1)
        assert len(answers) > 50, f"only {len(answers)} answers sampled over four slow ticks"
        assert set(answers) == {200}, f"{answers.count(503)} of {len(answers)} answers were 503"
    finally:
        cluster["node-3"].unhang()


def test_healthz_is_503_when_every_tick_fails(cluster, start_controller, tmp_path):
    broken = tmp_path / "desired_state_is_a_directory"
    broken.mkdir()
    ctl = start_controller(desired_state_file=broken)
    ctl.wait_for_line(re.compile(r"^  ✗ tick failed: .*Is a directory.*, retry next tick$"), WAIT)
    wait_until(lambda: ctl.get("/healthz")[0] == 503, what="/healthz says 503")
    assert ctl.get("/healthz")[1]["status"] == "failing"
    assert ctl.alive
