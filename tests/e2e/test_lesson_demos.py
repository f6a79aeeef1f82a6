"""End to end: the lesson plan's demos, played from docs/lesson-plan.md's own blocks, and the
French plan's, docs/lesson-plan.fr.md, on a stack whose .env says LOG_LANG=fr as it advises.

Each test plays one demo of the plan on the compose stack, in the plan's order, as a teacher
types it: its commands in bash, its other terminals (the log loop, the kubectl watch) left
running, and each expected block awaited in the right terminal (tests/e2e/demo_player.py).
So the plan cannot promise a line the stack does not show, and the README and the French
plan, which tests/test_docs.py holds to the same blocks, cannot either. A few checks the
documents cannot state as lines follow some demos: what runs where, and what did not happen.
"""
import os
import re
import sys

import pytest
import requests

from compose_stack import API, PORT, REPO
from demo_documents import demos
from demo_player import Player
from test_compose_demos import api_names, placement, runs_exactly_once, wait_until

PLAN = REPO / "docs" / "lesson-plan.md"
DEMOS = demos(PLAN.read_text(encoding="utf-8"))
PLAN_FR = REPO / "docs" / "lesson-plan.fr.md"
DEMOS_FR = demos(PLAN_FR.read_text(encoding="utf-8"))
ALL_APPS = [f"app{i}" for i in range(1, 9)]


def before_class(stack, tmp_path_factory, settings=""):
    """The stack as a teacher finds it before class: down, empty nodes/, the checkout's
    desired_state.txt, the class's .env; kubectl on the PATH with no kubeconfig at all (it
    goes to localhost:8080, or to KUBERNETES_MASTER when the tests use another port)."""
    stack.sh("docker compose down -v --remove-orphans --timeout 5")
    for path in (stack.directory / "nodes").glob("*_running.txt"):
        path.unlink()
    (stack.directory / "desired_state.txt").write_bytes((REPO / "desired_state.txt").read_bytes())
    env_file = stack.directory / ".env"
    if settings:
        env_file.write_text(settings)
    elif env_file.exists():
        env_file.unlink()
    kube = tmp_path_factory.mktemp("kube")
    stack.env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + stack.env["PATH"]
    stack.env["KUBECONFIG"] = str(kube / "no-kubeconfig")  # absent: kubectl's defaults
    stack.env["KUBECACHEDIR"] = str(kube / "cache")
    if PORT != "8080":
        stack.env["KUBERNETES_MASTER"] = f"http://localhost:{PORT}"
    return Player(stack, PORT)


def after_class(stack, played):
    played.close()
    stack.sh("docker compose down -v --remove-orphans --timeout 5; rm -f .env", check=False)


@pytest.fixture(scope="module")
def player(built_stack, tmp_path_factory):
    """The English plan's class."""
    played = before_class(built_stack, tmp_path_factory)
    yield played
    after_class(built_stack, played)


def log_lines(player):
    """Everything the log terminal showed so far."""
    return player.terminals["log"].snapshot()


def between(lines, first, last):
    """The lines after the first one matching `first`, up to the next one matching `last`."""
    start = next(k for k, line in enumerate(lines) if re.search(first, line))
    end = next(k for k, line in enumerate(lines) if k > start and re.search(last, line))
    return lines[start + 1:end]


def test_the_plan_has_its_demos_in_order():
    assert sorted(DEMOS) == list(range(9)), sorted(DEMOS)


@pytest.mark.parametrize("number", sorted(DEMOS), ids=lambda number: f"demo-{number}")
def test_the_demo_shows_what_the_plan_says(player, number):
    title, blocks = DEMOS[number]
    player.play(number, blocks)
    if number == 3:
        wait_until(lambda: placement(player.stack) == {"node-2": ["app2", "app5", "app1"],
                                                      "node-3": ["app3", "app6", "app4"]},
                   "app1 and app4 moved, nothing else")
        assert player.stack.host_running("node-1") == ["app1", "app4"], "node-1's file kept them"
    if number == 4:
        wait_until(lambda: runs_exactly_once(player.stack, ALL_APPS[:6]), "each app once")
    if number == 5:
        assert player.terminals["kubectl"].process.poll() is None, "the watch goes on"
    if number == 6:
        lines = log_lines(player)
        # The short partition, from the cut to node-2's answer: nothing moved or started.
        short = between(lines, r"node-2: unavailable for", r"✓ node-2: app7, app8")
        assert not [line for line in short if re.search("💀 CLEANUP:|📍 SCHEDULE:|▶ START:|◼ STOP:", line)], short
        # The watch of demo 5 ended when the controller was recreated, quietly (exit 0).
        watch = player.terminals["kubectl"].process
        wait_until(lambda: watch.poll() is not None, "kubectl's watch ends", timeout=30)
        assert watch.returncode == 0, player.terminals["kubectl"].snapshot()[-5:]
        wait_until(lambda: runs_exactly_once(player.stack, ALL_APPS), "each app once, after the partition")
        wait_until(lambda: all(c["status"] == "running" and c["also_on"] == []
                               for c in api_names().values()), "all running, none also_on")
    if number == 7:
        lines = log_lines(player)
        restarted = max(k for k, line in enumerate(lines) if line.startswith("pull-mode controller: API on"))
        first_tick = lines[restarted:]
        assert not [line for line in first_tick if "▶ START" in line or "◼ STOP" in line], \
            "the restarted controller started or stopped something"
    if number == 8:
        wait_until(lambda: runs_exactly_once(player.stack, ALL_APPS), "each app once, at the end")
        assert requests.get(f"{API}/api/loop", timeout=5).json()["paused"] is False


@pytest.fixture(scope="module")
def player_fr(built_stack, tmp_path_factory, player):
    """The French plan's class, after the English one (`player`): LOG_LANG=fr in .env."""
    after_class(built_stack, player)
    played = before_class(built_stack, tmp_path_factory, settings="LOG_LANG=fr\n")
    yield played
    after_class(built_stack, played)


@pytest.mark.parametrize("number", sorted(DEMOS_FR), ids=lambda number: f"demo-{number}")
def test_the_french_demo_shows_what_the_french_plan_says(player_fr, number):
    title, blocks = DEMOS_FR[number]
    player_fr.play(number, blocks)
