"""Fixtures of the end-to-end suite: a real Docker engine, the classroom stack, a clock.

The stack runs from a copy of the repository in a temporary directory, so the demos
write desired_state.txt and nodes/ there and leave the checkout clean. The compose
project keeps its name, `pull-mode`, because the demos type its container names
(`pull-mode-node-1-1`). The stack is torn down (`docker compose down -v`) after the
last test, whether the tests passed or not.
"""
import os
import subprocess

import pytest

from compose_stack import (BUILD_TIMEOUT, MEASURED, TEACHER, Stack,
                           compose_down_any_previous_stack, copy_checkout, record)


def engine_unavailable(reason):
    """No engine: a failure in CI (CI=true), a skip on a developer's machine."""
    message = f"Docker engine unavailable: {reason} (run .ci/docker-setup first)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def docker_client():
    """A Docker SDK client on the local engine, with Compose v2 checked too."""
    try:
        import docker
    except ImportError as error:
        engine_unavailable(f"the Docker SDK for Python is not installed ({error})")
    try:
        client = docker.from_env(version="auto", timeout=120)
        client.ping()
    except Exception as error:  # any reason: no socket, no permission, old engine
        engine_unavailable(str(error))
    version = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if version.returncode != 0:
        engine_unavailable(f"`docker compose` does not work: {version.stderr.strip()}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def stack_dir(tmp_path_factory):
    directory = copy_checkout(tmp_path_factory.mktemp("classroom") / "pull-mode")
    # As in a teacher's clone, nodes/ belongs to a normal user, not to root.
    os.chown(directory / "nodes", *TEACHER)
    return directory


@pytest.fixture(scope="session")
def built_stack(docker_client, stack_dir):
    """The stack's images built (not started): `docker compose build`."""
    stack = Stack(stack_dir, docker_client)
    compose_down_any_previous_stack(stack.env)
    result, seconds = stack.timed("docker compose build", timeout=BUILD_TIMEOUT)
    record("docker compose build", seconds)
    stack.build_output = result.stdout + result.stderr
    try:
        yield stack
    finally:
        stack.teardown()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember each phase's report on the test item (for the log dump below)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, "report_" + report.when, report)


@pytest.fixture(autouse=True)
def dump_logs_on_failure(request):
    """When a test fails, show the end of every service's log in its report."""
    yield
    report = getattr(request.node, "report_call", None)
    stack = None
    for name in ("stack", "built_stack", "crlf_stack"):
        if name in request.fixturenames:
            stack = request.getfixturevalue(name)
            break
    if report is not None and report.failed and stack is not None:
        logs = stack.sh("docker compose ps -a; docker compose logs --no-color --tail 150",
                        check=False)
        print("\n===== docker compose ps / logs (tail) =====\n" + logs.stdout + logs.stderr)


def pytest_terminal_summary(terminalreporter):
    if not MEASURED:
        return
    terminalreporter.section("classroom stack: measured times")
    for what, measures in MEASURED.items():
        seconds = ", ".join(f"{value:.2f}" for value in measures)
        terminalreporter.write_line(f"{what:<58} {seconds} s")
