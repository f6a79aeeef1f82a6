"""The exercises (docs/exercises.md) in both directions: each check fails on the
controller as it is, and passes on a copy with its reference solution applied.

So a change to app_controller.py that breaks an exercise (a renamed function, a
solution that no longer applies) fails CI, and no check can pass by accident."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXERCISES = REPO / "tests" / "exercises"
NAMES = sorted(path.stem.removeprefix("test_") for path in EXERCISES.glob("test_*.py"))


def start_check(name, controller):
    """Start one exercise's check against `controller` (a subprocess: a fresh import)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "--no-header", "-p", "no:cacheprovider",
         f"tests/exercises/test_{name}.py"],
        cwd=REPO, env=dict(os.environ, PULL_MODE_CONTROLLER=str(controller)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(check):
    """(exit status, output) of a started check."""
    output, _ = check.communicate(timeout=120)
    return check.returncode, output


def test_every_exercise_has_a_solution_and_a_section():
    docs = (REPO / "docs" / "exercises.md").read_text(encoding="utf-8")
    docs_fr = (REPO / "docs" / "exercises.fr.md").read_text(encoding="utf-8")
    for name in NAMES:
        assert (EXERCISES / "solutions" / f"{name}.patch").is_file(), f"{name}: no solution patch"
        assert f"tests/exercises/check {name}" in docs, f"{name}: not in docs/exercises.md"
        assert f"tests/exercises/check {name}" in docs_fr, f"{name}: not in docs/exercises.fr.md"
    assert 4 <= len(NAMES) <= 6


@pytest.mark.parametrize("name", NAMES)
def test_fails_now_and_passes_with_its_solution(name, tmp_path):
    for module in ("app_controller.py", "machinery.py", "kubernetes_api.py"):  # beside each other
        shutil.copy(REPO / module, tmp_path / module)
    patch = EXERCISES / "solutions" / f"{name}.patch"
    applied = subprocess.run(["git", "apply", str(patch)], cwd=tmp_path,
                             capture_output=True, text=True)
    assert applied.returncode == 0, f"{patch.name} no longer applies:\n{applied.stderr}"
    # Both directions at once: two processes, half the wait.
    before = start_check(name, REPO / "app_controller.py")
    after = start_check(name, tmp_path / "app_controller.py")

    status, output = finish(before)
    assert status == 1, f"the check {name} should fail on the unsolved controller:\n{output}"
    # A student reads advice: a failure message, never a traceback (pytest marks a
    # traceback's lines with "E   "; pytest.fail(..., pytrace=False) has none).
    assert "Traceback" not in output and "\nE   " not in output, output

    status, output = finish(after)
    assert status == 0, f"the check {name} should pass with its solution:\n{output}"
