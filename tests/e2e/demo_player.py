"""Plays a document's demos on the classroom stack, as a teacher types them.

Each commands block runs in bash in the stack's directory (the commands terminal); a
commands block for another terminal (```bash log, ```bash kubectl) starts there and goes
on. Each expected block is then awaited: what the commands printed, or the lines that
terminal showed since the commands before it were typed (see tests/demo_documents.py).
"""
import os
import subprocess
import threading
import time

import requests

from demo_documents import find_in_order

COMMAND_TIMEOUT = 180  # seconds, for one commands block
EXPECT_TIMEOUT = 75    # seconds: a partition's 30 s grace period, ticks, SSH timeouts
SETTLE_TIMEOUT = 15    # seconds: a tick that acted is checked 0.3 s later, or by the timer


class Terminal:
    """A command that runs on in its own terminal: its output, line by line, as it comes."""

    def __init__(self, command, cwd, env):
        self.lines = []
        self.lock = threading.Lock()
        self.process = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, bufsize=1, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            with self.lock:
                self.lines.append(line.rstrip("\n"))

    def snapshot(self):
        with self.lock:
            return list(self.lines)

    def close(self):
        """Ctrl-C, as the teacher does at the end (the whole process group)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, 2)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(timeout=10)


class Player:
    """Plays demos in order on one stack; keeps the other terminals open between demos."""

    def __init__(self, stack, port, record=None):
        self.stack = stack
        self.port = port
        self.terminals = {}
        self.marks = {}       # terminal -> how far its output was already matched
        self.output = []      # what the last commands block printed, line by line
        self.errors = ""      # and on its standard error
        self.record = record  # a callable(text): print what each block saw, to write the docs

    def typed(self, text):
        """A block as typed on this stack: the API on PULL_MODE_PORT if it is not 8080."""
        return text.replace("localhost:8080", f"localhost:{self.port}")

    def play(self, number, blocks):
        self.settle()
        for block in blocks:
            if block.kind == "commands":
                self.run(number, block)
            else:
                self.expect(number, block)

    def settle(self):
        """Before a demo, as a teacher pauses between two: let the loop finish what the last
        demo set in motion. A tick that acted is checked by a requeue tick 0.3 s later. A demo
        whose first command lands before that check (a `docker stop`) makes the check tick act
        in its turn, and the "checking the last actions" tick its plan shows never comes. So
        wait until no tick is running and the last one started and stopped nothing, or the
        loop is paused, or no controller answers (nothing is in motion). This only paces the
        demos: it proves nothing. Returns the /api/state it decided on (None: no answer)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        state = None
        while time.monotonic() < deadline:
            try:
                state = requests.get(f"http://127.0.0.1:{self.port}/api/state", timeout=5).json()
            except (requests.RequestException, ValueError):
                return None
            loop, ticks = state.get("loop", {}), state.get("ticks") or [{}]
            newest = ticks[-1]
            in_progress = loop.get("tick_count", 0) > newest.get("number", 0)
            acted = any(action["kind"] in ("start", "stop") and action["ok"]
                        for action in newest.get("actions", []))
            if loop.get("paused") or not (in_progress or acted):
                return state
            time.sleep(0.1)
        return state

    def run(self, number, block):
        for name, terminal in self.terminals.items():
            self.marks[name] = max(self.marks.get(name, 0), len(terminal.snapshot()))
        if block.terminal:
            if block.terminal in self.terminals:
                self.terminals[block.terminal].close()
            self.terminals[block.terminal] = Terminal(self.typed(block.text), self.stack.directory,
                                                      self.stack.env)
            self.marks[block.terminal] = 0
            return
        result = self.stack.sh(self.typed(block.text), timeout=COMMAND_TIMEOUT)
        # What the teacher reads: its standard output (curl's progress meter, on stderr, shows
        # only when the output is not a terminal, as here).
        self.output = result.stdout.splitlines()
        self.errors = result.stderr
        if self.record:
            self.record(f"--- demo {number}, line {block.line}: printed\n" + "\n".join(self.output))

    def expect(self, number, block):
        wanted = block.lines()
        where = f"demo {number}, the block at line {block.line}"
        if not block.terminal:
            _, missing = find_in_order(wanted, self.output)
            assert missing is None, (f"{where}: the commands printed no {missing!r}; they printed:\n"
                                     + "\n".join(self.output) + "\n(stderr:)\n" + self.errors)
            return
        terminal = self.terminals.get(block.terminal)
        assert terminal is not None, f"{where}: no terminal {block.terminal!r} was started before"
        start = self.marks.get(block.terminal, 0)
        deadline = time.monotonic() + EXPECT_TIMEOUT
        while True:
            lines = terminal.snapshot()
            end, missing = find_in_order(wanted, lines, start)
            if missing is None:
                if self.record:
                    self.record(f"--- demo {number}, line {block.line}: terminal {block.terminal}\n"
                                + "\n".join(lines[start:end]))
                self.marks[block.terminal] = end
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{where}: terminal {block.terminal} never showed {missing!r} "
                                     f"within {EXPECT_TIMEOUT} s; it showed:\n"
                                     + "\n".join(lines[start:]))
            time.sleep(0.2)

    def close(self):
        for terminal in self.terminals.values():
            terminal.close()
