"""A Windows checkout: Git for Windows converts line ends to CRLF (core.autocrlf=true).

Two lines of defence, one test each:
- `.gitattributes` keeps LF in such a clone (no Docker needed for that test);
- a CRLF tree all the same (a zip download, a clone made before .gitattributes existed)
  still builds a working stack: the images strip carriage returns where they matter.
  That test makes a real `git -c core.autocrlf=true clone` of the stack without
  .gitattributes, checks the files really have CRLF, then plays the seed's demos on it.
"""
import shutil

import pytest

from compose_stack import (BUILD_TIMEOUT, REPO, Stack, commit_everything,
                           compose_down_any_previous_stack, copy_checkout, git, record,
                           windows_clone)
from test_compose_demos import (INTRUDER, NODES, POST_NGINX, log_shows, placement, reset,
                                runs_exactly_once, six_apps_then_node_1_stops, wait_until)

# What a Linux container or shell reads: one CR in any of them breaks the stack or the tests.
READ_BY_LINUX = ["docker/node-entrypoint.sh", "docker/sshd-pull-mode.conf",
                 "docker/controller-entrypoint.py", "Dockerfile.node", "Dockerfile.controller",
                 "docker-compose.yml", ".dockerignore", "app_controller.py", "dashboard.html",
                 "requirements.txt", "desired_state.txt", ".ci/docker-setup", ".ci/run",
                 "tests/run"]


def repository_files():
    """The repository's files as they are in this checkout (committed or not)."""
    listed = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO).stdout
    return [path for path in listed.split("\0") if path and (REPO / path).is_file()]


def snapshot(files, destination):
    """A one-commit repository holding `files` as they are in this checkout."""
    for path in files:
        (destination / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / path, destination / path)
    return commit_everything(destination)


def test_gitattributes_keeps_lf_in_a_windows_clone(tmp_path):
    files = repository_files()
    assert ".gitattributes" in files
    clone = windows_clone(snapshot(files, tmp_path / "repo"), tmp_path / "clone")
    # The same clone without .gitattributes: CRLF, so the clone above is a Windows one.
    without = [path for path in files if path != ".gitattributes"]
    old_clone = windows_clone(snapshot(without, tmp_path / "old"), tmp_path / "old-clone")
    for path in READ_BY_LINUX:
        assert b"\r\n" in (old_clone / path).read_bytes(), f"{path}: no CRLF without .gitattributes"
        assert b"\r" not in (clone / path).read_bytes(), f"{path}: CR in a Windows clone"
    # Every file, text or binary (the PNGs), arrives exactly as it is here.
    changed = [path for path in files if (clone / path).read_bytes() != (REPO / path).read_bytes()]
    assert not changed, f"converted by a Windows clone: {changed}"


@pytest.fixture(scope="module")
def crlf_stack(docker_client, tmp_path_factory):
    """The stack from a Windows clone made without .gitattributes: `docker compose up -d`."""
    base = tmp_path_factory.mktemp("windows")
    source = copy_checkout(base / "source")
    (source / ".gitattributes").unlink(missing_ok=True)
    clone = windows_clone(commit_everything(source), base / "pull-mode")
    for path in READ_BY_LINUX:
        if (clone / path).exists():  # the stack's copy has no tests/ nor .ci/
            assert b"\r\n" in (clone / path).read_bytes(), f"{path} has no CRLF"
    assert (clone / "docker/node-entrypoint.sh").read_bytes().startswith(b"#!/bin/sh\r\n")

    stack = Stack(clone, docker_client)
    compose_down_any_previous_stack(stack.env)  # the other module's stack holds the names
    try:
        _, seconds = stack.timed("docker compose build", timeout=BUILD_TIMEOUT)
        record("CRLF clone: docker compose build", seconds)
        try:
            stack.sh("docker compose up -d")
            wait_until(lambda: stack.health("controller") == "healthy",
                       "the controller's healthcheck passes", timeout=90)
        except AssertionError as error:  # say why: a node's log shows it
            logs = stack.sh("docker compose ps -a; docker compose logs --no-color --tail 20",
                            check=False)
            raise AssertionError(f"{error}\n{logs.stdout}{logs.stderr}") from None
        yield stack
    finally:
        stack.teardown()


def test_a_crlf_checkout_plays_the_demos(crlf_stack):
    stack = reset(crlf_stack)
    # Declare: nginx runs on a node.
    result = stack.sh(POST_NGINX)
    assert '"nginx"' in result.stdout, result.stdout
    wait_until(lambda: runs_exactly_once(stack, ["nginx"]), "nginx runs")
    # An intruder: stopped, nginx untouched.
    mark = len(stack.controller_log())
    stack.sh(INTRUDER)
    wait_until(lambda: log_shows(stack, mark, "◼ STOP: intruder on node-1"),
               "the log shows ◼ STOP: intruder on node-1")
    wait_until(lambda: runs_exactly_once(stack, ["nginx"]), "only nginx runs")

    # A node dies: its containers are rescheduled on the others.
    stack = reset(crlf_stack)
    six_apps_then_node_1_stops(stack)
    wait_until(lambda: runs_exactly_once(stack, [f"app{i}" for i in range(1, 7)]),
               "app1..app6 run once each on node-2 and node-3")
    assert set(placement(stack)) == set(NODES) - {"node-1"}
