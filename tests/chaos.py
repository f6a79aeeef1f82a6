#!/usr/bin/env python3
"""Chaos run: the real controller against real sshd nodes, random faults, then invariants.

What Jepsen does for databases, at this project's scale. For a set time the script
injects faults at random into a running cluster (3 local `sshd` nodes and the real
`python app_controller.py`, TICK_SECONDS=1, SSH_TIMEOUT=1.5):

  * nodes: killed (SIGKILL, like `docker stop`), hung (SIGSTOP: TCP connects, nothing
    answers), brought back, restarted;
  * node files: intruders, zombies and duplicates (a declared name on another node, or
    twice), a flood of lines, binary garbage, one 1 MB line;
  * hand edits of desired_state.txt: lines added, removed, moved to another node,
    invalid lines, `name : node` (spaces around the colon), a UTF-8 BOM, CRLF endings;
  * bursts of concurrent POST and DELETE (threads that start together), a few bad ones;
  * SIGTERM of the controller, and a restart.

Every so often (and at the end) the faults stop for a "calm window": every node is
brought back (the files are left as they are) and the invariants are checked:

  1. within two ticks, every declared container runs exactly once, on its node, a live
     one, and nothing undeclared runs anywhere (and it is still so two ticks later);
  2. no lost update: a name whose last POST was answered 201 (or 409) is declared, a name
     whose last DELETE was answered 200 (or 404) is not, unless a later hand edit changed
     it; the hand edits themselves still hold;
  3. the controller never crashed: its process stayed up except when this script sent
     SIGTERM (then it exited 0), and it printed no Python traceback; the API never
     answered 5xx, and answered 400 to bad requests;
  4. its memory stayed bounded: RSS (VmRSS every 0.5 s, and the kernel's high-water mark
     VmHWM) under a limit.

Then it prints a table: faults by kind, invariant checks held and failed, time to
converge after the last fault, peak RSS, ticks run. Exit status 1 if any check failed.

    .venv/bin/python tests/chaos.py                           # 120 s of faults
    .venv/bin/python tests/chaos.py --duration 600 --seed 7   # a long run
    .venv/bin/python tests/chaos.py --flood-lines 1000        # smaller floods

"Declared" is always what the controller's own parser says: the names GET
/api/containers lists: a hand edit the parser rejects (a truly invalid line)
counts as removing that container.

Deterministic given the seed as far as it can be: the sequence of faults (kinds,
targets, sizes, pauses) comes from one RNG seeded with --seed, and the node states it
depends on are changed only by the script. What the controller does in between, hence
the files' contents, which lines a hand edit picks and how many faults fit in the time,
depends on timing.

Needs root, OpenSSH's sshd and the controller's requirements. Traffic stays on
127.0.0.1. Not collected by pytest; tests/test_chaos.py runs a two-minute version.
"""

import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sshd_nodes import VERDICT, Controller, SshdCluster, memory_kb  # noqa: E402

TICK_SECONDS = 1.0
SSH_TIMEOUT = 1.5
API_TIMEOUT = 10.0  # seconds for one HTTP request; a loaded 2-core machine can be slow
SAMPLE_SECONDS = 0.5  # how often the controller's RSS and liveness are sampled

# A deck of faults: each kind appears this many times, shuffled; a new deck when it is
# empty. Drawing from decks (rather than independently) guarantees that every kind shows
# up in every ~30 faults, so a short run still covers them all.
DECK = {
    "node killed": 2,
    "node hung": 2,
    "node back (restarted or unhung)": 3,
    "node restarted": 1,
    "intruder in a node file": 2,
    "zombie or duplicate in a node file": 2,
    "flood in a node file": 1,
    "binary garbage in a node file": 1,
    "1 MB line in a node file": 1,
    "hand edit: lines added": 2,
    "hand edit: a line removed": 2,
    "hand edit: a container moved": 1,
    "hand edit: invalid lines": 1,
    "hand edit: spaces around the colon": 1,
    "hand edit: UTF-8 BOM": 1,
    "hand edit: CRLF line endings": 1,
    "burst of concurrent POST/DELETE": 4,
    "controller SIGTERM and restart": 1,
}

API_NAMES = [f"api-{k:02d}" for k in range(16)]  # few names, so concurrent requests collide
HAND_NAMES = [f"hand-{k:02d}" for k in range(10)]
BASE_NAMES = [f"base-{k}" for k in range(1, 7)]  # declared before the controller starts
INVALID_LINES = ["Bad Name", "UPPER", "under_score", "a:b:c", "-dash", "café", "x" * 70,
                 "  # an indented comment", "web:node-9"]
BAD_BODIES = [b'{"name": "Bad_Name"}', b'{"name": ""}', b"not json", b'["nginx"]',
              b'{"name": 42}', b'{"name": "a' + b"b" * 70 + b'"}']


# ----------------------------------------------------------------------------
# The history of operations on names, and what it implies (the Jepsen part)
# ----------------------------------------------------------------------------

@dataclass
class Op:
    """One operation on a name: a POST, a DELETE or a hand edit of desired_state.txt.

    outcome: "present" or "absent" (what the answer says the name is, right after the
    operation), or None when nobody knows (the request got no answer: it may or may not
    have been applied, now or later)."""
    name: str
    what: str  # "POST 201", "DELETE 404", "hand edit", ...
    start: float
    end: float
    outcome: str | None


class History:
    def __init__(self):
        self.lock = threading.Lock()
        self.ops = []

    def add(self, op):
        with self.lock:
            self.ops.append(op)

    def expectations(self):
        """{name: (expected outcome or None if undetermined, the deciding ops)}.

        The operations that may have been applied last are those that no other operation
        on the same name strictly follows (started after it ended). If they all say the
        same thing, the name must be in that state now; if they disagree (a POST and a
        DELETE that overlapped) or one got no answer, any final state is correct."""
        with self.lock:
            by_name = {}
            for op in self.ops:
                by_name.setdefault(op.name, []).append(op)
        result = {}
        for name, ops in by_name.items():
            last_start = max(op.start for op in ops)
            candidates = [op for op in ops if op.end >= last_start]
            outcomes = {op.outcome for op in candidates}
            expected = outcomes.pop() if len(outcomes) == 1 else None
            result[name] = (expected, candidates)
        return result


# ----------------------------------------------------------------------------
# Watching the controller process: liveness and memory
# ----------------------------------------------------------------------------

class Monitor(threading.Thread):
    """Samples the controller every SAMPLE_SECONDS: is it up, how much memory.

    The process may be down only while the script itself restarts it
    (`expected_down`); any other exit is a crash."""

    def __init__(self, ctl):
        super().__init__(name="chaos-monitor", daemon=True)
        self.ctl = ctl
        self.lock = threading.Lock()
        self.expected_down = False
        self.stopping = threading.Event()
        self.samples_up = 0
        self.peak_rss_kb = 0
        self.peak_hwm_kb = 0
        self.crashes = []  # (pid, exit code, log tail)
        self.crashed_pids = set()

    def sample(self):
        with self.lock:
            proc = self.ctl.proc
            if proc is None:
                return
            code = proc.poll()
            if code is None:
                memory = memory_kb(proc.pid)
                if memory:
                    self.peak_rss_kb = max(self.peak_rss_kb, memory[0])
                    self.peak_hwm_kb = max(self.peak_hwm_kb, memory[1])
                    self.samples_up += 1
            elif not self.expected_down and proc.pid not in self.crashed_pids:
                self.crashed_pids.add(proc.pid)
                self.crashes.append((proc.pid, code, self.ctl.tail(30)))

    def run(self):
        while not self.stopping.wait(SAMPLE_SECONDS):
            self.sample()

    def has_crashed(self):
        with self.lock:
            proc = self.ctl.proc
            return proc is not None and proc.pid in self.crashed_pids


# ----------------------------------------------------------------------------
# What the nodes run, as the controller sees it
# ----------------------------------------------------------------------------

def running_lines(path):
    """The containers a node file lists: all of it (the controller reads only its first
    MiB), UTF-8 with replacement, split on newlines, empty lines skipped."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return [line for line in data.decode("utf-8", errors="replace").split("\n") if line]


def short(text, limit=40):
    """A line as shown in a message: quoted, and cut if long (floods, 1 MB lines)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"… ({len(text):,} chars)"


# ----------------------------------------------------------------------------
# The result: counts, checks, figures, and the table
# ----------------------------------------------------------------------------

INVARIANTS = [
    ("converged", "converged in time: each declared container once, on its live node, "
                  "nothing else"),
    ("stable", "still converged two ticks later"),
    ("post", "last POST answered 201/409: name still declared (no lost update)"),
    ("delete", "last DELETE answered 200/404: name still gone (no lost update)"),
    ("edit", "last hand edit: name still as edited"),
    ("up", "controller up, unless SIGTERMed (samples every 0.5 s)"),
    ("sigterm", "SIGTERM: controller exits with status 0"),
    ("no_5xx", "API answers never 5xx (requests)"),
    ("bad_400", "bad POST answered 400"),
    ("ticking", "loop ticks (a verdict within 15 s when waited for)"),
    ("traceback", "no Python traceback in the controller's output"),
    ("rss", "peak RSS under the limit"),
]


@dataclass
class Result:
    seed: int
    duration: float
    settings: dict
    faults: Counter = field(default_factory=Counter)
    held: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    failures: list = field(default_factory=list)  # (invariant, message)
    converge_times: list = field(default_factory=list)  # seconds, one per calm window
    requests: Counter = field(default_factory=Counter)
    undetermined: int = 0
    peak_rss_mb: float = 0.0
    peak_hwm_mb: float = 0.0
    ticks: int = 0
    controller_starts: int = 0
    sigterm_seconds: list = field(default_factory=list)
    seconds: float = 0.0
    # The burst threads count too, and `counter[key] += 1` is not atomic across threads.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def check(self, invariant, ok, message=""):
        with self.lock:
            if ok:
                self.held[invariant] += 1
            else:
                self.failed[invariant] += 1
                self.failures.append((invariant, message))
        return ok

    def __repr__(self):  # short: pytest shows it next to a failing assertion
        return (f"Result(seed={self.seed}, {sum(self.faults.values())} faults, "
                f"{len(self.failures)} failed checks)")

    def count(self, request):
        with self.lock:
            self.requests[request] += 1

    @property
    def ok(self):
        return not self.failures

    def table(self):
        s = self.settings
        lines = [
            f"Chaos run: seed {self.seed}, {self.duration:g} s of faults (a calm window "
            f"every {s['calm_every']:g} s), {s['nodes']} sshd nodes, TICK_SECONDS="
            f"{TICK_SECONDS:g}, SSH_TIMEOUT={SSH_TIMEOUT:g}, flood {s['flood_lines']:,} lines",
            f"Controller: {s['controller']}; run took {self.seconds:.0f} s",
            "",
            f"{'Faults injected':<58}{'count':>7}",
        ]
        for kind in DECK:
            lines.append(f"  {kind:<56}{self.faults[kind]:>7}")
        lines.append(f"  {'total':<56}{sum(self.faults.values()):>7}")
        lines += ["", f"{'Invariant checks':<82}{'held':>7}{'failed':>8}"]
        for key, label in INVARIANTS:
            lines.append(f"  {label:<80}{self.held[key]:>7}{self.failed[key]:>8}")
        times = self.converge_times
        if times:
            lines += ["", f"Time to converge after the last fault: {times[-1]:.2f} s "
                          f"(every calm window: median {statistics.median(times):.2f} s, "
                          f"max {max(times):.2f} s, n={len(times)}; limit "
                          f"{s['converge_limit']:.1f} s)"]
        else:
            lines += ["", "Time to converge after the last fault: never converged"]
        lines += [
            f"Peak RSS of the controller: {self.peak_rss_mb:.0f} MB sampled, "
            f"{self.peak_hwm_mb:.0f} MB high-water mark (VmHWM); limit {s['rss_limit_mb']:g} MB",
            f"Ticks run: {self.ticks:,} (controller started {self.controller_starts} "
            f"time{'s' if self.controller_starts != 1 else ''}; "
            f"SIGTERM to exit: max {max(self.sigterm_seconds, default=0):.2f} s)",
            "API requests: " + ", ".join(f"{k} ×{v:,}" for k, v in sorted(self.requests.items()))
            + f"; (name, window) pairs left unchecked because the last operations "
              f"overlapped or got no answer: {self.undetermined}",
            "",
            "Result: " + ("PASS, every invariant held" if self.ok else
                          f"FAIL, {len(self.failures)} check(s) failed"),
        ]
        for invariant, message in self.failures[:20]:
            lines.append(f"  ✗ [{invariant}] {message}")
        if len(self.failures) > 20:
            lines.append(f"  … and {len(self.failures) - 20} more")
        return "\n".join(lines)

    def to_json(self):
        return {
            "seed": self.seed, "duration": self.duration, "settings": self.settings,
            "faults": dict(self.faults), "held": dict(self.held), "failed": dict(self.failed),
            "failures": self.failures, "converge_times": self.converge_times,
            "requests": dict(self.requests), "undetermined": self.undetermined,
            "peak_rss_mb": self.peak_rss_mb, "peak_hwm_mb": self.peak_hwm_mb,
            "ticks": self.ticks, "controller_starts": self.controller_starts,
            "sigterm_seconds": self.sigterm_seconds, "seconds": self.seconds, "ok": self.ok,
        }


# ----------------------------------------------------------------------------
# The chaos itself
# ----------------------------------------------------------------------------

class Chaos:
    def __init__(self, cluster, ctl, seed, result, flood_lines, converge_limit, log):
        self.cluster = cluster
        self.ctl = ctl
        self.result = result
        self.flood_lines = flood_lines
        self.converge_limit = converge_limit
        self.log = log
        # Two RNGs: `plan` draws everything that does not depend on what the controller
        # did (fault kinds, targets, sizes, pauses), so the same seed gives the same
        # faults; `content` draws what does (which line of a file to edit), so its
        # draws never shift the plan's.
        self.plan = random.Random(seed)
        self.content = random.Random(f"{seed}-content")
        self.deck = []
        self.history = History()
        self.monitor = Monitor(ctl)
        self.t0 = time.monotonic()
        self.last_fault = time.monotonic()

    def now(self):
        return time.monotonic() - self.t0

    # -- the API, with every answer recorded ---------------------------------

    def call(self, method, path, body=None, raw=None):
        """(status, payload), or (None, reason) when no answer came."""
        try:
            status, payload = self.ctl.request(method, path, body, raw=raw, timeout=API_TIMEOUT)
        except urllib.error.URLError as error:
            refused = isinstance(error.reason, ConnectionRefusedError)
            return None, "refused" if refused else repr(error.reason)
        except (OSError, http.client.HTTPException) as error:
            return None, repr(error)
        self.result.check("no_5xx", status < 500,
                          f"{method} {path} answered {status}: {str(payload)[:200]}")
        return status, payload

    def api_op(self, method, name):
        """POST or DELETE `name`, recorded in the history with its outcome."""
        start = self.now()
        if method == "POST":
            status, payload = self.call("POST", "/api/containers", {"name": name})
            outcome = {201: "present", 409: "present"}.get(status)
        else:
            status, payload = self.call("DELETE", f"/api/containers/{name}")
            outcome = {200: "absent", 404: "absent"}.get(status)
        end = self.now()
        self.result.count(f"{method} {status or ('refused' if payload == 'refused' else 'no answer')}")
        if status is None and payload == "refused":
            return  # the connection was refused: the request never reached the controller
        if outcome is None:
            end = float("inf")  # no answer, or an unexpected one: it may take effect any time
        self.history.add(Op(name, f"{method} {status}", start, end, outcome))

    def declared(self):
        """{name: node or None} as the controller declares it now (GET /api/containers)."""
        for _ in range(3):
            status, listing = self.call("GET", "/api/containers")
            if status == 200:
                return {c["name"]: c["node"] for c in listing}
            time.sleep(0.5)
        raise RuntimeError(f"GET /api/containers failed: {status} {listing}")

    # -- choosing the next fault ---------------------------------------------

    def eligible(self, kind):
        nodes = list(self.cluster)
        if kind == "node killed" or kind == "node restarted":
            return [n for n in nodes if n.alive]
        if kind == "node hung":
            return [n for n in nodes if n.alive and not n.hung]
        if kind == "node back (restarted or unhung)":
            return [n for n in nodes if not n.alive or n.hung]
        return nodes

    def next_fault(self):
        """The next fault kind from the deck, and its target node. A kind with no eligible
        node right now (nothing to bring back) goes to the bottom of the deck; if no card
        left is playable, the deck is dropped and a new one dealt."""
        postponed = 0
        while True:
            if not self.deck or postponed > len(self.deck):
                self.deck = [kind for kind, copies in DECK.items() for _ in range(copies)]
                self.plan.shuffle(self.deck)
                postponed = 0
            kind = self.deck.pop()
            candidates = self.eligible(kind)
            if candidates:
                return kind, self.plan.choice(candidates)
            self.deck.insert(0, kind)
            postponed += 1

    def inject(self, kind, node):
        action = {
            "node killed": lambda: node.kill(),
            "node hung": lambda: node.hang(),
            "node back (restarted or unhung)": lambda: node.unhang() if node.alive else node.start(),
            "node restarted": lambda: node.restart(),
            "intruder in a node file": lambda: self.intruder(node),
            "zombie or duplicate in a node file": lambda: self.zombie(node),
            "flood in a node file": lambda: self.flood(node),
            "binary garbage in a node file": lambda: self.garbage(node),
            "1 MB line in a node file": lambda: self.long_line(node),
            "burst of concurrent POST/DELETE": self.burst,
            "controller SIGTERM and restart": self.restart_controller,
        }.get(kind)
        detail = action() if action else self.hand_edit(kind)
        self.result.faults[kind] += 1
        target = "" if kind.startswith(("hand", "burst", "controller")) else f" {node.name}"
        self.log(f"[{self.now():7.1f}s] {kind}{target}{': ' + detail if isinstance(detail, str) else ''}")

    # -- node files ----------------------------------------------------------

    def append(self, node, data):
        # Plain appends, as `echo x >> file` in the node would do; whether the
        # controller's own rewrite (sed -i) happens to swallow one does not matter.
        with open(node.state_file, "ab") as f:
            f.write(data)

    def intruder(self, node):
        names = [f"intruder-{self.plan.randrange(1000)}" for _ in range(self.plan.randint(1, 3))]
        self.append(node, "".join(n + "\n" for n in names).encode())
        return ", ".join(names)

    def zombie(self, node):
        """A container that runs elsewhere (a zombie here) or here (now twice)."""
        k = self.plan.randrange(1 << 30)
        lines = sorted({line for other in self.cluster for line in running_lines(other.state_file)
                        if line.startswith(("api-", "hand-", "base-"))})
        if not lines:
            return "nothing runs yet, nothing to copy"
        name = lines[k % len(lines)]
        self.append(node, f"{name}\n".encode())
        return name

    def flood(self, node):
        # The same names every time, so floods on a node that stays down add up in lines,
        # not in distinct names (today's controller needs one sed argument per name).
        self.append(node, "".join(f"flood-{k:06d}\n" for k in range(self.flood_lines)).encode())
        return f"{self.flood_lines:,} lines"

    def garbage(self, node):
        size = self.plan.randint(1, 8) * 1024
        self.append(node, self.plan.randbytes(size))
        return f"{size:,} random bytes"

    def long_line(self, node):
        self.append(node, b"x" * (1 << 20) + b"\n")
        return "1,048,576 characters"

    # -- hand edits of desired_state.txt -------------------------------------

    def hand_edit(self, kind):
        """Edit desired_state.txt as a teacher would, between two ticks; record in the
        history every name whose declaration the edit changed (as the API then says)."""
        # Edit right after a tick ends: the controller then leaves the file alone for
        # about a second. A save that lands inside the loop's own read-modify-write of
        # the file (the few milliseconds it takes to save assignments) is overwritten by
        # it; this run does not try to provoke that race, it tests the rest.
        mark = self.ctl.mark()
        try:
            self.ctl.wait_for_line(VERDICT, timeout=15, after=mark)
            self.result.check("ticking", True)
        except AssertionError:
            self.result.check("ticking", False, f"no tick ended within 15 s (at {self.now():.0f} s)")
        before = self.declared()
        path = self.ctl.desired_state_file
        raw = path.read_bytes() if path.exists() else b""
        text = raw.decode("utf-8", errors="replace")
        bom = text.startswith("\ufeff")
        newline = "\r\n" if "\r\n" in text else "\n"
        lines = text.removeprefix("\ufeff").splitlines()
        detail = self.edit_lines(kind, lines)
        if kind == "hand edit: UTF-8 BOM":
            bom = True  # as Windows Notepad saves "UTF-8 with BOM"
        if kind == "hand edit: CRLF line endings":
            newline = "\r\n"  # as a Windows editor saves
        new_text = ("\ufeff" if bom else "") + "".join(line + newline for line in lines)
        # Saved the way most editors save: a new file renamed over the old one, so the
        # controller never reads half a file.
        temp = path.with_name(".chaos-hand-edit.tmp")
        temp.write_bytes(new_text.encode("utf-8"))
        start = self.now()
        os.replace(temp, path)
        after = self.declared()
        end = self.now()
        for name in sorted(set(before) ^ set(after)):
            self.history.add(Op(name, "hand edit", start, end,
                                "present" if name in after else "absent"))
        changed = sorted(set(before) ^ set(after))
        return detail + (f" (declared set changed: {', '.join(changed)})" if changed else "")

    def edit_lines(self, kind, lines):
        """Change `lines` in place for the edit `kind`; return what was done."""
        def code(line):  # (name, colon, node): a rough split, enough to find a container's line
            name, colon, node = line.partition("#")[0].partition(":")
            return name.strip(), colon, node.strip()

        containers = [i for i, line in enumerate(lines) if code(line)[0]]
        node_names = list(self.cluster.nodes)
        # Drawn whether or not it is used, so the plan's sequence never depends on the
        # file's contents.
        pick = self.plan.randrange(len(node_names) - 1)
        if kind == "hand edit: lines added":
            added = []
            for _ in range(self.plan.randint(1, 3)):
                name = self.plan.choice(HAND_NAMES + API_NAMES)
                node = self.plan.choice([None, None] + node_names)
                added.append(name if node is None else f"{name}:{node}")
            lines.extend(added)
            return ", ".join(added)
        if kind == "hand edit: invalid lines":
            added = self.plan.sample(INVALID_LINES, self.plan.randint(1, 3))
            for line in added:
                lines.insert(self.content.randint(0, len(lines)), line)
            return ", ".join(short(line, 20) for line in added)
        if not containers:
            return "no container line to edit"
        i = self.content.choice(containers)
        name, colon, node = code(lines[i])
        target = [n for n in node_names if n != node][pick] if node in node_names else node_names[pick]
        if kind == "hand edit: a line removed":
            removed = [line for line in lines if code(line)[0] == name]
            lines[:] = [line for line in lines if code(line)[0] != name]
            return f"removed {', '.join(map(repr, removed))}"
        if kind == "hand edit: a container moved":
            old, lines[i] = lines[i], f"{name}:{target}"
            return f"{old!r} -> {lines[i]!r}"
        if kind == "hand edit: spaces around the colon":
            old, lines[i] = lines[i], f"{name} : {node or target}"
            return f"{old!r} -> {lines[i]!r}"
        if kind == "hand edit: UTF-8 BOM":
            return f"file saved with a BOM (first line {lines[0]!r})" if lines else "BOM"
        if kind == "hand edit: CRLF line endings":
            return f"file saved with CRLF, {len(lines)} lines"
        raise ValueError(kind)

    # -- the API: bursts -----------------------------------------------------

    def burst(self):
        """Threads that start together, each with a few POST/DELETE on a small set of
        names, so requests on the same name overlap; now and then a bad request."""
        plans = []
        for _ in range(self.plan.randint(3, 8)):
            plans.append([(self.plan.choice(["POST", "DELETE"]), self.plan.choice(API_NAMES),
                           self.plan.random() < 0.1) for _ in range(self.plan.randint(2, 6))])
        bad_bodies = [self.plan.choice(BAD_BODIES) for _ in plans]
        start_together = threading.Barrier(len(plans))

        def worker(plan, bad_body):
            try:
                start_together.wait(timeout=API_TIMEOUT)
            except threading.BrokenBarrierError:
                pass
            for method, name, bad in plan:
                if bad:
                    status, _ = self.call("POST", "/api/containers", raw=bad_body)
                    self.result.count(f"bad POST {status or 'no answer'}")
                    if status is not None:
                        self.result.check("bad_400", status == 400,
                                          f"POST {bad_body[:40]!r} answered {status}")
                else:
                    self.api_op(method, name)

        threads = [threading.Thread(target=worker, args=(plan, bad), daemon=True)
                   for plan, bad in zip(plans, bad_bodies)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=API_TIMEOUT * 8)  # bounded: at most 6 requests, each with its timeout
        return f"{len(plans)} threads, {sum(len(p) for p in plans)} requests"

    # -- the controller ------------------------------------------------------

    def start_controller(self):
        self.ctl.start(timeout=30)
        self.result.controller_starts += 1

    def restart_controller(self, pause=None):
        """SIGTERM, check it exits 0, a pause (the controller is down), start again."""
        with self.monitor.lock:
            self.monitor.expected_down = True
        self.monitor.sample()  # last memory sample of this process
        code, seconds = self.ctl.stop(timeout=5)
        self.result.sigterm_seconds.append(seconds)
        self.result.check("sigterm", code == 0,
                          f"SIGTERM: exit status {code} after {seconds:.1f} s (None: killed "
                          f"after 5 s)")
        time.sleep(self.plan.uniform(0, 2) if pause is None else pause)
        self.start_controller()
        with self.monitor.lock:
            self.monitor.expected_down = False
        return f"exited {code} in {seconds:.2f} s"

    def restart_if_crashed(self):
        if self.monitor.has_crashed():
            self.log(f"[{self.now():7.1f}s] the controller crashed: restarting it")
            self.start_controller()

    # -- phases --------------------------------------------------------------

    def chaos(self, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            # The pause comes before the fault, so the calm window starts right after
            # the last one and the time to converge is measured from it.
            time.sleep(self.plan.uniform(0.1, 1.0))
            self.restart_if_crashed()
            kind, node = self.next_fault()
            try:
                self.inject(kind, node)
            except Exception as error:  # a fault that could not be injected is reported, not fatal
                self.result.failures.append(("script", f"injecting {kind!r} raised {error!r}"))
                self.log(f"[{self.now():7.1f}s] {kind}: raised {error!r}")
        self.last_fault = time.monotonic()

    def convergence_problems(self):
        """What stops the cluster from being converged right now ([] if it is)."""
        status, listing = self.call("GET", "/api/containers")
        status_nodes, nodes = self.call("GET", "/api/nodes")
        if status != 200 or status_nodes != 200:
            return [f"API: GET /api/containers {status}, GET /api/nodes {status_nodes}"], {}
        declared = {c["name"]: c["node"] for c in listing}
        # "up" today; a Kubernetes-like "condition" once nodes can be NotReady (issue 8).
        up = {n["name"] for n in nodes if n.get("up") is True or n.get("condition") == "Ready"}
        where = {}
        for node in self.cluster:
            for line in running_lines(node.state_file):
                where.setdefault(line, []).append(node.name)
        problems = []
        for name, node in declared.items():
            if node is None:
                problems.append(f"{name} is declared but not scheduled")
            elif where.get(name, []) != [node]:
                problems.append(f"{name} is declared on {node} but runs on "
                                f"{where.get(name) or 'no node'}")
            elif node not in up or not self.cluster[node].alive or self.cluster[node].hung:
                problems.append(f"{name} runs on {node}, which is not live")
        undeclared = [(line, nodes) for line, nodes in where.items() if line not in declared]
        if undeclared:
            problems.append(f"{len(undeclared):,} undeclared line(s) run: " + ", ".join(
                f"{short(line)} on {', '.join(nodes)}" for line, nodes in undeclared[:4]))
        return problems, declared

    def calm(self):
        """Stop the faults, bring every node back, check every invariant."""
        recovered = [node for node in self.cluster if node.hung or not node.alive]
        for node in recovered:
            if node.hung:
                node.unhang()
            else:
                node.start()
        self.restart_if_crashed()
        # The faults stopped when the last one was injected, or, if nodes were down or
        # hung, when the last of them answered again.
        faults_stopped = time.monotonic() if recovered else self.last_fault
        deadline = faults_stopped + self.converge_limit
        while True:
            problems, declared = self.convergence_problems()
            if not problems or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        seconds = time.monotonic() - faults_stopped
        if self.result.check("converged", not problems,
                             f"at {self.now():.0f} s, not converged {seconds:.1f} s after the "
                             f"faults stopped: " + "; ".join(problems[:5])):
            self.result.converge_times.append(seconds)
            self.log(f"[{self.now():7.1f}s] calm: converged {seconds:.2f} s after the faults "
                     f"stopped, {len(declared)} containers declared")
            # Two more whole ticks: converged must mean stable, not a lucky moment.
            try:
                self.ctl.wait_ticks(2, timeout=30)
                problems, declared = self.convergence_problems()
                self.result.check("stable", not problems,
                                  f"at {self.now():.0f} s, converged then not: "
                                  + "; ".join(problems[:5]))
            except AssertionError:
                self.result.check("ticking", False, "no two ticks within 30 s in a calm window")
        else:
            self.log(f"[{self.now():7.1f}s] calm: NOT converged: {'; '.join(problems[:3])}")
        try:
            self.check_history(declared or self.declared())
        except RuntimeError as error:
            self.result.check("post", False, f"no lost-update check at {self.now():.0f} s: {error}")

    def check_history(self, declared):
        for name, (expected, deciding) in sorted(self.history.expectations().items()):
            if expected is None:
                self.result.undetermined += 1
                continue
            what = [op.what for op in deciding]
            invariant = ("edit" if all(w == "hand edit" for w in what)
                         else "post" if expected == "present" else "delete")
            is_declared = name in declared
            self.result.check(
                invariant, is_declared == (expected == "present"),
                f"at {self.now():.0f} s, {name} is {'declared' if is_declared else 'not declared'}"
                f" but its last operation(s) ({', '.join(f'{o.what} at {o.start:.1f} s' for o in deciding)})"
                f" left it {expected}: a lost update")


# ----------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------

def run(duration=120.0, seed=None, calm_every=30.0, flood_lines=200_000, rss_limit_mb=150.0,
        slack=4.0, work_dir=None, keep=False, verbose=False, out=print):
    """Run the chaos for `duration` seconds of faults; return a Result."""
    seed = random.randrange(10**6) if seed is None else seed
    converge_limit = 2 * (TICK_SECONDS + SSH_TIMEOUT) + slack
    own_dir = work_dir is None
    work = Path(work_dir or tempfile.mkdtemp(prefix="pull-mode-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    script = Path(os.environ.get("PULL_MODE_CONTROLLER") or HERE.parent / "app_controller.py")
    try:
        commit = subprocess.run(["git", "-C", str(script.parent), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    result = Result(seed, duration, {
        "calm_every": calm_every, "nodes": 3, "flood_lines": flood_lines,
        "rss_limit_mb": rss_limit_mb, "converge_limit": converge_limit,
        "controller": f"{script} ({commit or 'not a git tree'})"})
    fault_log = open(work / "faults.log", "w")

    def log(line):
        fault_log.write(line + "\n")
        fault_log.flush()
        if verbose or "calm" in line or "crashed" in line:
            out(line)

    out(f"chaos: seed {seed}, {duration:g} s of faults, work directory {work}")
    started = time.monotonic()
    cluster = SshdCluster(3, base_dir=work / "cluster").start()
    ctl = Controller(cluster, tick_seconds=TICK_SECONDS, ssh_timeout=SSH_TIMEOUT,
                     work_dir=work / "controller", script=script)
    (work / "controller").mkdir(exist_ok=True)
    # A few containers declared by hand before the controller starts (no comment header:
    # the first line is a container, so a BOM added later has something to break).
    ctl.desired_state_file.write_text("".join(f"{name}\n" for name in BASE_NAMES))
    chaos = Chaos(cluster, ctl, seed, result, flood_lines, converge_limit, log)
    for name in BASE_NAMES:
        chaos.history.add(Op(name, "hand edit", 0.0, 0.0, "present"))
    try:
        chaos.start_controller()
        chaos.monitor.start()
        ctl.wait_ticks(1, timeout=30)
        done = 0.0
        while done < duration:
            phase = min(calm_every, duration - done)
            chaos.chaos(phase)
            done += phase
            chaos.calm()
        chaos.monitor.sample()
    finally:
        chaos.monitor.stopping.set()
        # The final SIGTERM is part of the run: it must exit 0 too.
        with chaos.monitor.lock:
            chaos.monitor.expected_down = True
        if ctl.alive:
            code, seconds = ctl.stop(timeout=5)
            result.sigterm_seconds.append(seconds)
            result.check("sigterm", code == 0, f"final SIGTERM: exit status {code}")
        cluster.close()
        (work / "controller.log").write_text(ctl.log() + "\n---- stderr ----\n"
                                             + "\n".join(ctl.stderr_lines))
        fault_log.close()

    for pid, code, tail in chaos.monitor.crashes:
        result.check("up", False, f"controller (pid {pid}) exited by itself with status {code}:\n"
                                  + tail)
    result.held["up"] += chaos.monitor.samples_up
    output = ctl.lines + ctl.stderr_lines
    first = next((k for k, line in enumerate(output) if "Traceback" in line), None)
    result.check("traceback", first is None,
                 "traceback in the controller's output:\n"
                 + "\n".join(output[max(0, (first or 0) - 2):(first or 0) + 15]))
    result.peak_rss_mb = chaos.monitor.peak_rss_kb / 1024
    result.peak_hwm_mb = chaos.monitor.peak_hwm_kb / 1024
    peak = max(result.peak_rss_mb, result.peak_hwm_mb)
    result.check("rss", 0 < peak <= rss_limit_mb,
                 f"peak RSS {peak:.0f} MB, limit {rss_limit_mb:g} MB")
    result.ticks = len(ctl.find_lines(VERDICT))
    result.seconds = time.monotonic() - started
    if own_dir and result.ok and not keep:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    else:
        out(f"chaos: kept {work} (faults.log, controller.log)")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120,
                        help="seconds of faults, calm windows not counted (default 120)")
    parser.add_argument("--seed", type=int, help="RNG seed (default: random, printed)")
    parser.add_argument("--calm-every", type=float, default=30,
                        help="seconds of faults between two calm windows (default 30)")
    parser.add_argument("--flood-lines", type=int, default=200_000,
                        help="lines per flood (default 1000; the issue's 200000 is not healed "
                             "by today's controller)")
    parser.add_argument("--rss-limit", type=float, default=150, help="MB (default 150)")
    parser.add_argument("--slack", type=float, default=4,
                        help="seconds added to 2 x (TICK_SECONDS + SSH_TIMEOUT) to converge "
                             "(default 4)")
    parser.add_argument("--work-dir", help="keep everything here (default: a temporary "
                                           "directory, removed if the run passes)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every fault")
    args = parser.parse_args()
    if os.getuid() != 0:
        sys.exit("chaos: run as root (the sshd nodes need it)")
    result = run(args.duration, args.seed, args.calm_every, args.flood_lines, args.rss_limit,
                 args.slack, args.work_dir, args.keep, args.verbose)
    print()
    print(result.table())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
