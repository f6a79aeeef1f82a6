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


def start_check(name, controller, python=sys.executable):
    """Start one exercise's check against `controller` (a subprocess: a fresh import)."""
    return subprocess.Popen(
        [python, "-m", "pytest", "-q", "--no-header", "-p", "no:cacheprovider",
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


def solved_copy(name, directory):
    """A copy of the controller with the exercise's reference solution applied."""
    for module in ("app_controller.py", "machinery.py", "kubernetes_api.py"):  # beside each other
        shutil.copy(REPO / module, directory / module)
    patch = EXERCISES / "solutions" / f"{name}.patch"
    applied = subprocess.run(["git", "apply", str(patch)], cwd=directory,
                             capture_output=True, text=True)
    assert applied.returncode == 0, f"{patch.name} no longer applies:\n{applied.stderr}"
    return directory / "app_controller.py"


@pytest.mark.parametrize("name", NAMES)
def test_fails_now_and_passes_with_its_solution(name, tmp_path):
    solved = solved_copy(name, tmp_path)
    # Both directions at once: two processes, half the wait.
    before = start_check(name, REPO / "app_controller.py")
    after = start_check(name, solved)

    status, output = finish(before)
    assert status == 1, f"the check {name} should fail on the unsolved controller:\n{output}"
    # A student reads advice: a failure message, never a traceback (pytest marks a
    # traceback's lines with "E   "; pytest.fail(..., pytrace=False) has none).
    assert "Traceback" not in output and "\nE   " not in output, output

    status, output = finish(after)
    assert status == 0, f"the check {name} should pass with its solution:\n{output}"


def test_a_light_install_runs_every_check(tmp_path):
    """What docs/exercises.md tells a class on bad Wi-Fi: a fresh virtualenv with only
    tests/exercises/requirements.txt (the controller's requirements and pytest). Every
    check runs there: it fails on the unsolved controller, with advice, and passes solved."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "-r", str(EXERCISES / "requirements.txt")], check=True, timeout=600)
    installed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], check=True,
                               capture_output=True, text=True).stdout.lower()
    for heavy in ("hypothesis", "requests", "docker", "selenium", "kubectl"):
        assert f"{heavy}==" not in installed, f"the light install pulled {heavy}"
    for name in NAMES:
        directory = tmp_path / name
        directory.mkdir()
        solved = solved_copy(name, directory)
        status, output = finish(start_check(name, REPO / "app_controller.py", python))
        assert status == 1 and "Traceback" not in output and "\nE   " not in output, output
        status, output = finish(start_check(name, solved, python))
        assert status == 0, f"{name}, solved, in the light install:\n{output}"
