"""What the exercises' checks share: a fresh copy of the controller, a fake cluster, advice.

A check loads app_controller.py (or the file in PULL_MODE_CONTROLLER: CI points it at a
copy with the reference solution applied), and the machinery.py beside it, as new
modules, with their own settings, so each check sees the controller exactly as a student
left it. The fake cluster answers the controller's calls to its nodes from memory: a
real tick, its real log, no network, a few milliseconds."""
import contextlib
import importlib.util
import io
import itertools
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONTROLLER = os.environ.get("PULL_MODE_CONTROLLER") or os.path.join(REPO, "app_controller.py")
_loaded = itertools.count(1)


def advise(message):
    """Fail with the message only: a student reads advice, not a traceback."""
    pytest.fail(message, pytrace=False)


def load_controller(directory, refuse_bad_settings=True, **settings):
    """app_controller.py as a new module, with these environment settings (strings)."""
    env = {"NODES": "node-1,node-2,node-3", "LOG_LANG": "en",
           "DESIRED_STATE_FILE": os.path.join(str(directory), "desired_state.txt"), **settings}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    # The controller imports the machinery.py of its own directory (a solution may change it).
    sys.path.insert(0, os.path.dirname(os.path.abspath(CONTROLLER)))
    sys.modules.pop("machinery", None)
    problem = None
    try:
        spec = importlib.util.spec_from_file_location(f"app_controller_{next(_loaded)}", CONTROLLER)
        module = importlib.util.module_from_spec(spec)
        with contextlib.redirect_stdout(io.StringIO()):
            spec.loader.exec_module(module)
    except SyntaxError as error:
        problem = f"{CONTROLLER} does not load: {error.msg}, line {error.lineno}:\n    {error.text}"
    except ModuleNotFoundError as error:
        problem = (f"{CONTROLLER} needs {error.name!r}, which this Python lacks: "
                   "python3 -m venv .venv && .venv/bin/pip install -r tests/exercises/requirements.txt "
                   "(tests/exercises/check then uses .venv)")
    except Exception as error:
        problem = (f"{CONTROLLER} does not load: {type(error).__name__}: {error}\n"
                   "(run `python app_controller.py` to see where)")
    finally:
        sys.path.pop(0)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    if problem:  # out of the except block, so pytest shows no chained traceback
        advise(problem)
    if refuse_bad_settings and module.settings.errors:
        advise("the controller refuses its settings: " + "; ".join(module.settings.errors))
    return module


class FakeCluster:
    """Nodes that live in memory, in place of the controller's `nodes` (machinery.Nodes).

    files: {node: [names, one per line of its <node>_running.txt]}; a node in `down`
    does not answer, as a stopped container does not."""

    def __init__(self, controller, running=None):
        self.controller = controller
        self.files = {node: list((running or {}).get(node, [])) for node in controller.NODES}
        self.down = set()
        controller.nodes = self

    def read_running_files(self):
        """What Nodes.read_running_files() answers: {node: NodeFile(names, truncated) or the error}."""
        node_file = self.controller.machinery.NodeFile
        return {node: TimeoutError() if node in self.down else node_file(list(self.files[node]), False)
                for node in self.files}

    def keep_and_start(self, plans):
        """What Nodes.keep_and_start() does: keep the lines listed in keep (as sed does),
        then append what starts; {node: None, or the error}."""
        results = {}
        for node, (keep, to_start) in plans.items():
            if node in self.down:
                results[node] = TimeoutError()
                continue
            self.files[node] = [name for name in self.files[node] if name in keep] + list(to_start)
            results[node] = None
        return results

    def declare(self, text):
        """Write desired_state.txt."""
        with open(self.controller.DESIRED_STATE_FILE, "w", encoding="utf-8") as file:
            file.write(text)

    def desired(self):
        with open(self.controller.DESIRED_STATE_FILE, encoding="utf-8") as file:
            return self.controller.parse_desired_state(file.read())[0]

    def tick(self):
        """One real tick of the controller; returns its log."""
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            self.controller.run_tick("timer", {})
        return log.getvalue()
