"""Shared pytest set-up: the tests import app_controller.py from the repository root,
and tests/sshd_nodes.py (real sshd nodes, the controller process, wait_until) from here."""

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))


# The exercises' checks fail on purpose until a student solves them: `pytest tests`
# leaves them out. Name them to run them (`pytest tests/exercises/test_capacity.py`);
# tests/test_exercises.py proves, in the default run, that each fails now and passes
# with its solution.
EXERCISES = os.path.join(REPO_ROOT, "tests", "exercises")


def pytest_ignore_collect(collection_path, config):
    """Skip tests/exercises/ unless a command-line argument points into it."""
    if not str(collection_path).startswith(EXERCISES):
        return None
    here = str(config.invocation_params.dir)
    asked = [os.path.abspath(os.path.join(here, arg.split("::")[0])) for arg in config.args]
    return not any(path.startswith(EXERCISES) for path in asked) or None
