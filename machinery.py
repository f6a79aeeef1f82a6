"""machinery.py: what the lesson in app_controller.py stands on, kept out of its way.

app_controller.py is the control loop a student reads; this module is what keeps that
loop standing in front of a class: settings checked before anything starts, SSH
connections kept open with a deadline on every stage, the bounds that survive a prank
in a node's file, desired_state.txt rewritten safely (atomic, compare-and-swap, a
Windows file keeping its CRLF and byte order mark), the log's words in English and in
the original project's French, the classroom page's document, the teacher's pause and
step, the token, errors told in words. You need not read it to understand the loop:
every name the lesson calls says what it does. It never imports app_controller (the
lesson imports it, never the other way round), and it keeps no state of its own: the
lesson makes the objects (Settings, TickLog, Nodes, DesiredStateFile, LoopTimer,
ClusterStatus) and holds them.
"""

import errno
import hmac
import logging
import math
import os
import re
import shlex
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from collections import deque
from typing import NamedTuple

import paramiko
from flask import abort, jsonify, request, send_file
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server


# ---------------------------------------------------------------------------
# Names: DNS-1123 labels, as in Kubernetes
# ---------------------------------------------------------------------------
# a-z, 0-9 and '-', alphanumeric at both ends, at most 63 characters. Safe, too, in a
# shell command and in a sed pattern: no name ever reaches a node unchecked.
NAME_PATTERN = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"


def is_valid_name(name):
    """True if `name` is a DNS-1123 label (see NAME_PATTERN)."""
    return isinstance(name, str) and re.fullmatch(NAME_PATTERN, name) is not None


def container_name(body):
    """The name a POST /api/containers body declares, or a 400 that says what is wrong.

    The name will reach a node's shell (quoted): only a DNS-1123 label gets through."""
    if not isinstance(body, dict):
        abort(400, 'the body must be a JSON object, like {"name": "nginx"}')
    name = body.get("name")
    if not isinstance(name, str):
        abort(400, '"name" is required and must be a string')
    if not is_valid_name(name):
        abort(400, f"{name!r} is not a valid name: use at most 63 lowercase letters, digits "
                   "and '-', starting and ending with a letter or digit (a DNS-1123 label)")
    return name


# ---------------------------------------------------------------------------
# Settings: environment variables, checked before anything starts
# ---------------------------------------------------------------------------
# A typo must not become a traceback in front of the class: a bad value is noted, and
# exit_if_wrong() prints them all, one line each, and exits with status 2.

class SettingError(ValueError):
    """A setting's value is wrong; the message says what, for people."""


class Settings:
    """Reads settings from the environment and notes every bad one in `errors`."""

    def __init__(self):
        self.errors = []

    def read(self, variable, default, convert, expected, is_ok=lambda value: True, secret=False):
        """The environment variable, converted; a bad value is noted (never shown if secret)."""
        raw = os.environ.get(variable, default)
        reason = f"expected {expected}"
        try:
            value = convert(raw)
            if is_ok(value):
                return value
        except SettingError as error:
            reason = str(error)
        except ValueError:
            pass
        self.errors.append(f"{variable}{'' if secret else '=' + repr(raw)}: {reason}")
        return convert(default)

    def text(self, variable, default):
        """A string, as it is."""
        return os.environ.get(variable, default)

    def port(self, variable, default):
        """A TCP port number."""
        return self.read(variable, str(default), int, "a port number, 1 to 65535",
                         lambda value: 1 <= value <= 65535)

    def seconds(self, variable, default, at_least=None, more_than=None):
        """A finite number of seconds, at least `at_least` or more than `more_than`."""
        if more_than is not None:
            return self.read(variable, str(default), float, f"seconds, more than {more_than:g}",
                             lambda value: math.isfinite(value) and value > more_than)
        return self.read(variable, str(default), float, f"seconds, at least {at_least:g}",
                         lambda value: math.isfinite(value) and value >= at_least)

    def choice(self, variable, default, choices):
        """One of `choices`."""
        return self.read(variable, default, str, " or ".join(choices),
                         lambda value: value in choices)

    def nodes(self, variable, default, default_port):
        """'node-1,node-2=10.0.0.2:2202,node-3=[::1]' -> {name: (host, port)}."""
        return self.read(variable, default, lambda spec: parse_nodes(spec, default_port),
                         "a list like node-1,node-2=10.0.0.2:22")

    def token(self, variable):
        """A bearer token, or None when unset or empty; never shown, even when wrong."""
        return self.read(variable, "", lambda text: text or None,
                         "printable ASCII without spaces (openssl rand -hex 16 makes one)",
                         lambda token: token is None or re.fullmatch(r"[\x21-\x7e]+", token),
                         secret=True)

    def exit_if_wrong(self):
        """Stop at once, with one line per bad setting and exit status 2, if a setting is wrong."""
        for error in self.errors:
            print(f"pull-mode: bad setting {error}", file=sys.stderr)
        if self.errors:
            sys.exit(2)


def parse_nodes(spec, default_port):
    """'node-1,node-2=10.0.0.2:2202,node-3=[::1]' -> {name: (host, port)}, or SettingError."""
    nodes = {}
    for entry in spec.split(","):
        name, _, address = (part.strip() for part in entry.partition("="))
        if not name:
            raise SettingError("an empty node name (a comma too many?)")
        if not is_valid_name(name):
            raise SettingError(f"{name!r} is not a valid node name (lowercase letters, digits, '-')")
        if name in nodes:
            raise SettingError(f"{name!r} is listed twice")
        address = address or name
        if address.startswith("["):  # [IPv6]:port
            host, _, port = address[1:].partition("]")
            port = port.removeprefix(":")
        elif address.count(":") == 1 or ":" not in address:  # host or host:port
            host, _, port = address.partition(":")
        else:
            raise SettingError(f"{address!r}: write host, host:port or [IPv6]:port")
        host, port = host.strip(), port.strip() or str(default_port)
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise SettingError(f"{name!r}: write host, host:port or [IPv6]:port, a port from 1 to 65535")
        nodes[name] = (host, int(port))
    return nodes


# ---------------------------------------------------------------------------
# The tick log: its words in English and in the original project's French, printed
# for the class and kept, tick by tick, as data for the page
# ---------------------------------------------------------------------------
# A long list (200,000 intruders in a node's file) is cut in the log and in the API
# after this many names: "… and 199,980 more".
LIST_LIMIT = 20
MAX_LINES_KEPT = 200  # per step of a tick, for the page: the log itself has them all
RECENT_TICKS = 20     # how many finished ticks the page can show

MESSAGES = {
    "en": {
        "tick": "TICK - {time}",
        "tick_wake": "TICK - {time} (woken by an API change)",
        "tick_step": "TICK - {time} (one step, loop paused)",
        "tick_requeue": "TICK - {time} (checking the last actions)",
        "step_1": "\n1️⃣  OBSERVE the current state (SSH to the nodes)",
        "node_up": "  ✓ {node}: {containers}",
        "node_empty": "  - {node}: empty",
        "node_down": "  ⚠️  {node}: unavailable",
        "node_not_ready": "  ⚠️  {node}: not ready ({reason})",
        "node_waiting": "  ⚠️  {node}: unavailable for {silent:.0f} s, eviction in {left:.0f} s",
        "running_count": "   → {containers} running on {nodes}",
        "step_2": "\n2️⃣  READ the desired state",
        "bad_line": "  ⚠️  {file} line {number} ignored: {line!r} ({reason})",
        "bad_lines_more": "  ⚠️  … and {more} more invalid lines",
        "declared_count": "   → {containers} declared",
        "step_3": "\n3️⃣  CLEANUP dead nodes",
        "cleanup_down": "  💀 CLEANUP: {name} (node {node} down)",
        "cleanup_not_ready": "  💀 CLEANUP: {name} (node {node} not ready)",
        "cleanup_unknown_node": "  💀 CLEANUP: {name} (node {node} unknown: not in NODES)",
        "step_4": "\n4️⃣  SCHEDULE unassigned containers",
        "schedule": "  📍 SCHEDULE: {name} → {node}",
        "unschedulable": "  ⏳ {name}: no live node, stays unscheduled",
        "step_5": "\n5️⃣  RECONCILE (diff + actions)",
        "start": "  ▶ START: {name} on {node}",
        "stop": "  ◼ STOP: {name} on {node}",
        "stop_more": "  ◼ STOP: … and {more} more on {node}",
        "actions_failed": "  ✗ {node}: actions failed ({error}), retry next tick",
        "converged": "\n✅ Converged",
        "not_converged": "\n❌ Not converged: {reasons}",
        "waiting": "\n⏳ Waiting: {nodes}",
        "waiting_node": "{node} silent, what it runs is unknown (eviction in {left:.0f} s)",
        "unscheduled_reason": "{containers} unscheduled",
        "tick_failed": "  ✗ tick failed: {error}, retry next tick",
        "paused": "\n⏸  Loop paused: no tick until step or resume (POST /api/loop/step or /resume)",
        "resumed": "\n⏯  Loop resumed",
        "started": "pull-mode controller: API on http://{host}:{port}, nodes {nodes}, a tick every {tick:g} s",
        "started_token": "pull-mode controller: API on http://{host}:{port} (writes need a token), "
                         "nodes {nodes}, a tick every {tick:g} s",
        "stopped": "pull-mode controller stopped",
        "more": "… and {more} more",
        "more_unread": "… and more (only the first {size} of the file read)",
        "container": ("container", "containers"),
        "node": ("node", "nodes"),
        "reason_timeout": "no answer within {seconds:g} s",
        "reason_dns": "name not found (DNS)",
        "reason_refused": "connection refused",
        "reason_unreachable": "host unreachable",
        "reason_auth": "authentication failed (is the controller's key authorized?)",
        "reason_edited": "desired_state.txt was edited during the tick",
        "reason_lost": "connection lost",
        "reason_actions_failed": "its last actions failed: {error}",
    },
    "fr": {
        "tick": "TICK - {time}",
        "tick_wake": "TICK - {time} (réveillé par l'API)",
        "tick_step": "TICK - {time} (un pas, boucle en pause)",
        "tick_requeue": "TICK - {time} (vérification des dernières actions)",
        "step_1": "\n1️⃣  OBSERVER l'état actuel (SSH sur les noeuds)",
        "node_up": "  ✓ {node}: {containers}",
        "node_empty": "  - {node}: vide",
        "node_down": "  ⚠️  {node}: indisponible",
        "node_not_ready": "  ⚠️  {node}: pas prêt ({reason})",
        "node_waiting": "  ⚠️  {node}: indisponible depuis {silent:.0f} s, éviction dans {left:.0f} s",
        "running_count": "   → {containers} tournent sur {nodes}",
        "step_2": "\n2️⃣  RÉCUPÉRER l'état désiré",
        "bad_line": "  ⚠️  {file} ligne {number} ignorée : {line!r} ({reason})",
        "bad_lines_more": "  ⚠️  … et {more} autres lignes invalides",
        "declared_count": "   → {containers} déclarés",
        "step_3": "\n3️⃣  CLEANUP des noeuds morts",
        "cleanup_down": "  💀 CLEANUP: {name} (node {node} down)",
        "cleanup_not_ready": "  💀 CLEANUP: {name} (node {node} pas prêt)",
        "cleanup_unknown_node": "  💀 CLEANUP: {name} (node {node} inconnu : absent de NODES)",
        "step_4": "\n4️⃣  SCHEDULER les containers non assignés",
        "schedule": "  📍 SCHEDULE: {name} → {node}",
        "unschedulable": "  ⏳ {name} : aucun noeud disponible, reste non assigné",
        "step_5": "\n5️⃣  RÉCONCILIER (diff + actions)",
        "start": "  ▶ START: {name} sur {node}",
        "stop": "  ◼ STOP: {name} sur {node}",
        "stop_more": "  ◼ STOP: … et {more} de plus sur {node}",
        "actions_failed": "  ✗ {node} : échec des actions ({error}), nouvel essai au prochain tick",
        "converged": "\n✅ Convergé",
        "not_converged": "\n❌ Non convergé : {reasons}",
        "waiting": "\n⏳ En attente : {nodes}",
        "waiting_node": "{node} silencieux, ce qu'il exécute est inconnu (éviction dans {left:.0f} s)",
        "unscheduled_reason": "{containers} non assignés",
        "tick_failed": "  ✗ tick en échec : {error}, nouvel essai au prochain tick",
        "paused": "\n⏸  Boucle en pause : aucun tick avant step ou resume (POST /api/loop/step ou /resume)",
        "resumed": "\n⏯  Boucle relancée",
        "started": "contrôleur pull-mode : API sur http://{host}:{port}, noeuds {nodes}, un tick toutes les {tick:g} s",
        "started_token": "contrôleur pull-mode : API sur http://{host}:{port} (les écritures demandent un jeton), "
                         "noeuds {nodes}, un tick toutes les {tick:g} s",
        "stopped": "contrôleur pull-mode arrêté",
        "more": "… et {more} de plus",
        "more_unread": "… et d'autres (seul le premier {size} du fichier est lu)",
        # The original project's own wording: "1 containers tournent sur 3 noeuds".
        "container": ("containers", "containers"),
        "node": ("noeuds", "noeuds"),
        "reason_timeout": "pas de réponse en {seconds:g} s",
        "reason_dns": "nom introuvable (DNS)",
        "reason_refused": "connexion refusée",
        "reason_unreachable": "hôte injoignable",
        "reason_auth": "authentification refusée (la clé du contrôleur est-elle autorisée ?)",
        "reason_edited": "desired_state.txt a été modifié pendant le tick",
        "reason_lost": "connexion perdue",
        "reason_actions_failed": "ses dernières actions ont échoué : {error}",
    },
}


def cut_text(text, limit=120):
    """A line a student may have made 1 MB long, cut to fit on one line of the log."""
    return text if len(text) <= limit else text[:limit] + "…"


def shown(name):
    """A container name as logged: garbage found on a node is shown quoted (and cut)."""
    return name if is_valid_name(name) else cut_text(repr(name), 40)


class TickLog:
    """The tick log: each line printed at once, and each tick kept as data for the page.

    The page explains a decision from what the step recorded (record()), never by
    parsing log text back. The loop thread writes; the API thread reads `ticks`
    and the health counters under `lock`."""

    def __init__(self, language="en", ssh_timeout=3.0):
        self.language = language
        self.ssh_timeout = ssh_timeout  # quoted by describe(): "no answer within 3 s"
        self.lock = threading.Lock()
        self.ticks = deque(maxlen=RECENT_TICKS)
        self.tick_count = 0
        self.failed_ticks_in_a_row = 0
        self.last_tick_finished = time.monotonic()
        self.current = None  # the tick being logged; only the loop thread touches it
        self.after_tick = []  # called with no argument once each tick is kept (kubectl's watches)

    # --- words ---

    def message(self, key, **values):
        """The log line `key` in this log's language, with its values filled in."""
        return MESSAGES[self.language][key].format(**values)

    def count(self, count, unit):
        """'1 container', '2 containers', '199,990' (unit "number"): English plurals, the original French."""
        text = f"{count:,}".replace(",", " ") if self.language == "fr" else f"{count:,}"
        if unit == "number":
            return text
        singular, plural = MESSAGES[self.language][unit]
        return f"{text} {singular if count == 1 else plural}"

    def listing(self, names, truncated=False):
        """Names for one log line, cut after LIST_LIMIT: 'a, b, … and 199,990 more'."""
        shown_names = [shown(name) for name in names[:LIST_LIMIT]]
        if len(names) > LIST_LIMIT:
            shown_names.append(self.message("more", more=self.count(len(names) - LIST_LIMIT, "number")))
        if truncated:
            shown_names.append(self.message("more_unread", size=f"{MAX_READ_BYTES // 1024 // 1024} MiB"))
        return ", ".join(shown_names)

    def describe(self, error):
        """Why something failed, in words for people rather than Python's exception text."""
        if isinstance(error, paramiko.ssh_exception.NoValidConnectionsError):
            error = next(iter(error.errors.values()), error)  # the socket error inside
        # paramiko says "Error reading SSH protocol banner" or "Timeout opening channel."
        # when the node is silent past SSH_TIMEOUT.
        if isinstance(error, (TimeoutError, socket.timeout)) or any(
                word in str(error).lower() for word in ("banner", "timeout")):
            return self.message("reason_timeout", seconds=self.ssh_timeout)
        if isinstance(error, socket.gaierror):
            return self.message("reason_dns")
        if isinstance(error, ConnectionRefusedError):
            return self.message("reason_refused")
        if isinstance(error, OSError) and error.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return self.message("reason_unreachable")
        if isinstance(error, paramiko.AuthenticationException):
            return self.message("reason_auth")
        if isinstance(error, (EOFError, ConnectionError, paramiko.SSHException)):
            return self.message("reason_lost")
        if isinstance(error, EditedMeanwhile):  # only the loop's save() logs it
            return self.message("reason_edited")
        return cut_text(str(error) or type(error).__name__, 200)

    # --- lines ---

    def emit(self, text):
        """Print one line of the log. A closed or broken stdout (`| head`) must not stop the loop."""
        try:
            print(text, flush=True)
        except (OSError, ValueError):
            pass  # the line is lost, the tick goes on; /api/state still has it

    def _open(self):
        """The tick being logged, if one is open."""
        if self.current is not None and not self.current.get("finished_at"):
            return self.current
        return None

    def say(self, key, **values):
        """Print one line of the tick log now, and keep it with its step for the page."""
        text = self.message(key, **values)
        self.emit(text)
        tick = self._open()
        if tick is None or not tick["steps"]:
            return
        lines = tick["steps"][-1]["lines"]
        if len(lines) < MAX_LINES_KEPT:  # the page's copy is bounded; the log has every line
            lines.append(text.strip())

    def say_node(self, node, condition, answer, in_grace):
        """Step 1's line for one node: what it runs, or why it is not Ready.

        condition: (Ready | NotReady | Unknown, reason); answer: a NodeFile or the
        error; in_grace: (silent for, eviction in) for a silent node in its grace period."""
        state, reason = condition
        if in_grace:
            self.say("node_waiting", node=node, silent=in_grace[0], left=in_grace[1])
        elif state != "Ready":
            self.say("node_down" if state == "Unknown" else "node_not_ready", node=node, reason=reason)
        elif answer[0]:
            self.say("node_up", node=node, containers=self.listing(*answer))
        else:
            self.say("node_empty", node=node)

    def say_observation(self, answers, observation):
        """Step 1's lines: one per node (say_node), then how many Ready nodes run how many
        containers. answers: {node: NodeFile or the error}; observation: the lesson's."""
        for node, answer in answers.items():
            self.say_node(node, observation.conditions[node], answer,
                          observation.in_grace.get(node))
        running = sum(len(observation.running[node]) for node in observation.live_nodes)
        self.say("running_count", nodes=self.count(len(observation.live_nodes), "node"),
                 containers=self.count(running, "container"))

    def say_started(self, host, port, nodes, tick_seconds, token):
        """The controller's first line: where its API listens, its nodes, its tick."""
        self.say("started_token" if token else "started", host=f"[{host}]" if ":" in host else host,
                 port=port, nodes=", ".join(nodes), tick=tick_seconds)

    def say_each(self, key, names, **values):
        """One line per name (say(key, name=...)), cut after LIST_LIMIT with '… and N more'."""
        for name in names[:LIST_LIMIT]:
            self.say(key, name=shown(name), **values)
        if len(names) > LIST_LIMIT:
            self.say(key + "_more", more=self.count(len(names) - LIST_LIMIT, "number"), **values)

    def say_cleanup(self, orphans, conditions, last_answered, grace_seconds):
        """Step 3's lines: why each container lost its node (down, not ready, not a node), and
        its record for the page. conditions: step 1's; last_answered: {node: monotonic time}."""
        now = time.monotonic()
        for name, node in orphans:
            why = ("unknown_node" if node not in conditions
                   else "not_ready" if conditions[node][0] == "NotReady" else "down")
            self.say("cleanup_" + why, name=name, node=node)
            self.record("cleanup", name=name, node=node, why=why, grace_seconds=grace_seconds,
                        silent_for=round(now - last_answered[node], 1) if node in conditions else None)

    def say_bad_lines(self, problems, file_name):
        """One line per bad line of desired_state.txt (cut after LIST_LIMIT): what was skipped, and why."""
        for number, line, reason in problems[:LIST_LIMIT]:
            self.say("bad_line", file=file_name, number=number, line=cut_text(line), reason=reason)
        if len(problems) > LIST_LIMIT:
            self.say("bad_lines_more", more=self.count(len(problems) - LIST_LIMIT, "number"))

    def record(self, step, **decision):
        """Record one decision of this tick, as data, for the page (which explains it)."""
        tick = self._open()
        if tick is not None and len(tick["decisions"][step]) < MAX_LINES_KEPT:
            tick["decisions"][step].append(decision)

    def say_actions(self, node, desired, ran, plan, error):
        """Step 5's lines for one node (◼ STOP, ▶ START, ✗ actions failed), and its record for
        the page: what should run, what ran, what it started and stopped."""
        should_run = [name for name, assigned in desired.items() if assigned == node]
        to_start, to_stop = plan.to_start, plan.to_stop
        self.record("reconcile", node=node, ok=error is None,
                    error=None if error is None else self.describe(error),
                    should_run=should_run[:LIST_LIMIT], ran=[cut_text(name) for name in ran[:LIST_LIMIT]],
                    ran_count=len(ran), start=to_start[:LIST_LIMIT],
                    stop=[cut_text(name) for name in to_stop[:LIST_LIMIT]], stop_count=len(to_stop))
        self.say_each("stop", to_stop, node=node)
        for name in to_start:
            self.say("start", name=name, node=node)
        if error is not None:
            self.say("actions_failed", node=node, error=self.describe(error))

    # --- ticks ---

    def begin_tick(self, reason):
        """Print a tick's header (its time, and why it runs), and open its record for the page."""
        self.tick_count += 1
        self.current = {"number": self.tick_count, "mode": reason, "started_at": time.time(),
                        "steps": [], "actions": [],
                        "decisions": {"cleanup": [], "schedule": [], "reconcile": []}}
        self.emit("\n" + "=" * 70)
        self.say("tick_" + reason if reason in ("wake", "step", "requeue") else "tick",
                 time=time.strftime("%H:%M:%S"))
        self.emit("=" * 70)

    def begin_step(self, number):
        """Print a step's title, and open its record for the page."""
        title = self.message(f"step_{number}")
        self.emit(title)
        tick = self._open()
        if tick is not None:
            tick["steps"].append({"number": number, "title": title.strip(), "lines": []})

    def end_tick(self, outcome, results, unscheduled, waiting, failed=None):
        """Print the tick's verdict and keep the finished tick for the page.

        outcome: the lesson's verdict(), "converged", "waiting" or "not_converged"; the
        rest says why. results: {node: None, or why its actions failed}; unscheduled: the
        names without a node once the tick saved its decisions; waiting: {node: (silent
        for, eviction in)} for the nodes in their grace period; failed: the error, when
        the tick itself failed."""
        reasons = [f"{node}: {self.describe(error)}" for node, error in results.items() if error is not None]
        if unscheduled:
            reasons.append(self.message("unscheduled_reason",
                                        containers=self.count(len(unscheduled), "container")))
        if failed:
            reasons.append(self.describe(failed))
        verdict = self.message(outcome, reasons="; ".join(reasons), nodes="; ".join(
            self.message("waiting_node", node=node, left=left) for node, (_, left) in waiting.items()))
        now = time.time()
        tick = self.current
        tick.update(finished_at=now, converged=outcome == "converged", outcome=outcome,
                    failed=failed is not None, waiting=sorted(waiting), verdict=verdict.strip(), actions=actions_of(tick["decisions"]),
                    duration_ms=round(1000 * (now - tick["started_at"]), 1))
        with self.lock:
            self.ticks.append(tick)
            self.last_tick_finished = time.monotonic()
            self.failed_ticks_in_a_row = self.failed_ticks_in_a_row + 1 if failed else 0
        for listener in self.after_tick:
            try:
                listener()
            except Exception as error:  # a listener's bug must not fail the tick it follows
                print(f"pull-mode: after tick {tick['number']}: {self.describe(error)}", file=sys.stderr)
        # Printed last: once the log shows a tick's verdict, /api/state and kubectl show the tick.
        self.emit(verdict)

    def fail_tick(self, error):
        """A tick raised: log it and end it as failed; the next tick retries from scratch."""
        try:
            if self._open() is None:
                self.begin_tick("start")  # it failed before it began
            if isinstance(error, EditedMeanwhile):
                # Steps 3 and 4 decided, but nothing was saved: the page and kubectl must not
                # show their decisions as done.
                self.current["decisions"]["cleanup"].clear()
                self.current["decisions"]["schedule"].clear()
            self.say("tick_failed", error=self.describe(error))
            self.end_tick("not_converged", {}, [], {}, failed=error)
        except Exception:
            pass  # even the report failed: the loop goes on, /healthz tells

    def recent_ticks(self):
        """The last finished ticks, oldest first, for the page."""
        with self.lock:
            return list(self.ticks)


def actions_of(decisions):
    """A tick's actions, one per container, for the page's "… sent" marks."""
    actions = [{"kind": step, "name": d["name"], "node": d["node"], "ok": True}
               for step in ("cleanup", "schedule") for d in decisions[step]]
    for d in decisions["reconcile"]:
        actions += [{"kind": "stop", "name": name, "node": d["node"], "ok": d["ok"]} for name in d["stop"]]
        actions += [{"kind": "start", "name": name, "node": d["node"], "ok": d["ok"]} for name in d["start"]]
    return actions


# ---------------------------------------------------------------------------
# The nodes over SSH: kept connections, deadlines, and the shell commands that
# read and change a node's file (in Kubernetes, the kubelet's and the runtime's job)
# ---------------------------------------------------------------------------

class NodeError(Exception):
    """The node answered, but the command failed there: the node is NotReady."""


class ShuttingDown(Exception):
    """The process is stopping: its closed connections say nothing about the nodes."""


class GaveUp(Exception):
    """The tick stopped waiting for this node; its late work must change nothing."""


# A node's file may hold anything a student wrote into it. We read at most this much
# of it: a 10 MB prank costs one megabyte, and what lies past it is not wanted anyway
# (the next action on that node removes it).
MAX_READ_BYTES = 1024 * 1024


def running_file(state_dir, node):
    """Where a node keeps the list of what it runs."""
    return f"{state_dir}/{node}_running.txt"


def observe_command(state_dir, node):
    """The shell command that reads a node's file, once it checked that the node can work.

    A node that answers but could not run containers (no sed, its file turned into a
    directory) fails here with a reason: it is NotReady, not down."""
    return (f"f={shlex.quote(running_file(state_dir, node))}; "
            "command -v sed >/dev/null || { echo 'sed: not found' >&2; exit 1; }; "
            "[ ! -e \"$f\" ] || [ -f \"$f\" ] || { echo \"$f: not a regular file\" >&2; exit 1; }; "
            f"[ ! -e \"$f\" ] || head -c {MAX_READ_BYTES + 1} \"$f\"")


class NodeFile(NamedTuple):
    """What a node's file lists, as step 1 read it."""
    names: list      # one per line, in file order
    truncated: bool  # only the first MAX_READ_BYTES were read


def parse_running_file(output):
    """The names in a node's file (bytes, maybe cut at MAX_READ_BYTES), as a NodeFile.

    A file cut short ends with a partial line: we keep it. It is garbage (or the start
    of one), so step 5 acts on that node, and its action, keeping only the wanted
    lines, also removes everything we did not read."""
    truncated = len(output) > MAX_READ_BYTES
    text = output[:MAX_READ_BYTES].decode("utf-8", errors="replace")
    return NodeFile([line for line in text.split("\n") if line], truncated)


def act_command(state_dir, node, keep, to_start):
    """One shell command that makes a node run `keep` + `to_start`: one round trip.

    The file keeps only the lines of `keep` (sed deletes every other line: intruders,
    zombies, garbage, however many), then `to_start` is appended. A list of what to
    keep, not of what to delete: a flood of 200,000 intruders costs one sed
    expression, and garbage never reaches the shell. Plain POSIX commands, so a
    BusyBox node (Alpine) works as well as Debian."""
    for name in [*keep, *to_start]:
        if not is_valid_name(name):  # never put an unchecked name in a shell
            raise ValueError(f"refusing {name!r}: not a valid name")
    # A whole line, ^(app1|app4)$, so keeping app1 does not keep app10.
    sed_program = "/^(" + "|".join(keep) + ")$/!d" if keep else "d"
    steps = [
        f"d={shlex.quote(state_dir)}; f={shlex.quote(running_file(state_dir, node))}; mkdir -p \"$d\"",
        # A missing file is created owned like its directory, so the teacher who owns
        # nodes/ on the host can still edit it by hand.
        '{ [ -e "$f" ] || { : > "$f" && { chown "$(stat -c %u:%g "$d")" "$f" 2>/dev/null || true; }; }; }',
        # sed -i writes a new file and renames it: atomic, and it keeps the owner.
        f"sed -i -E -e {shlex.quote(sed_program)} \"$f\"",
    ]
    if to_start:
        # If the last line has no newline, add one: what we append starts a new line.
        steps.append('{ [ -z "$(tail -c 1 "$f")" ] || echo >> "$f"; }')
        steps.append(f"printf '%s\\n' {' '.join(map(shlex.quote, to_start))} >> \"$f\"")
    return " && ".join(steps)


class Nodes:
    """The nodes, reached over SSH: read what each runs, make each run what it should.

    One SSH connection per node, kept open across ticks: a handshake costs tens of
    milliseconds of crypto, a command on an open connection one round trip. Every
    stage has a deadline (SSH_TIMEOUT), and all nodes are asked at once, so a hung
    node costs one timeout per tick, not one per node."""

    def __init__(self, addresses, state_dir, user, key_file, timeout, shutting_down):
        self.addresses = addresses  # {node: (host, port)}
        self.state_dir = state_dir  # where each node keeps <node>_running.txt
        self.user, self.key_file, self.timeout = user, key_file, timeout
        self.shutting_down = shutting_down  # set at shutdown: a closed connection proves nothing
        self.connections = {}       # node -> paramiko.SSHClient
        self.lock = threading.Lock()
        self.handshakes = {node: 0 for node in addresses}  # shown by GET /api/nodes: reuse is visible

    def read_running_files(self):
        """{node: NodeFile(names, truncated) or the error}: what every node's file lists."""
        answers = self.on_every_node({node: observe_command(self.state_dir, node) for node in self.addresses})
        return {node: answer if isinstance(answer, Exception) else parse_running_file(answer)
                for node, answer in answers.items()}

    def keep_and_start(self, plans):
        """{node: (keep, to_start)} -> {node: None, or the error}: each node's file keeps only
        `keep`, then gets `to_start` appended, in one SSH command per node, all at once."""
        commands = {node: act_command(self.state_dir, node, keep, to_start)
                    for node, (keep, to_start) in plans.items()}
        results = self.on_every_node(commands)
        return {node: result if isinstance(result, Exception) else None for node, result in results.items()}

    def address(self, node):
        """host:port of a node, with an IPv6 address in brackets."""
        host, port = self.addresses[node]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def on_every_node(self, commands):
        """Run {node: shell command} on all those nodes at once; return {node: output or the exception}.

        One thread per node; daemon threads, so a node still hanging never blocks shutdown."""
        results = {}
        gave_up = threading.Event()

        def work(node):
            """One node's command, in its own thread; an error is a result too."""
            try:
                results[node] = self.run_on_node(node, commands[node], gave_up)
            except Exception as error:
                results[node] = error

        threads = [threading.Thread(target=work, args=(node,), daemon=True) for node in commands]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + self.timeout + 1
        for thread in threads:
            thread.join(max(0, deadline - time.monotonic()))
        gave_up.set()  # from now on, a late worker changes nothing
        if self.shutting_down.is_set():
            raise ShuttingDown()  # so no tick acts on nodes that only *look* down
        for node in commands:
            if node not in results:
                self.close_connection(node)
                results[node] = TimeoutError()
        return {node: results[node] for node in commands}

    def run_on_node(self, node, command, gave_up):
        """Run a shell command on a node over its open connection; return its output (bytes)."""
        client = self.get_connection(node, gave_up)
        if gave_up.is_set():
            raise GaveUp()  # too late: the tick has moved on without this node
        try:
            _, stdout, stderr = client.exec_command(command, timeout=self.timeout)
            # Read the output *before* waiting for the exit status: a command whose output
            # fills the SSH window waits for a reader, and we would wait forever.
            output = stdout.read()
            errors = stderr.read(4096).decode("utf-8", errors="replace")
            if not stdout.channel.status_event.wait(self.timeout):
                raise TimeoutError("no exit status")
            if stdout.channel.exit_status == -1:  # closed before it said how the command ended
                raise ConnectionError("the connection closed during the command")
        except Exception:
            self.close_connection(node, client)  # broken or hung: open a new one next time
            raise
        if stdout.channel.exit_status != 0:
            first_line = (errors.strip().splitlines() or [""])[0][:200]
            raise NodeError(first_line or f"exit status {stdout.channel.exit_status}")
        return output

    def open_connection(self, node):
        """A new SSH connection to the node, with a deadline on every stage of the handshake."""
        host, port = self.addresses[node]
        client = paramiko.SSHClient()
        # The nodes make their host keys when they start, so we cannot know them in
        # advance: accept them. Fine on a classroom network; a real cluster pins keys.
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        try:
            client.connect(
                host, port=port, username=self.user, key_filename=self.key_file,
                look_for_keys=self.key_file is None, allow_agent=self.key_file is None,
                # Every stage gets a deadline, or a hung node hangs us with it.
                timeout=self.timeout, banner_timeout=self.timeout,
                auth_timeout=self.timeout, channel_timeout=self.timeout)
        except BaseException:
            client.close()
            raise
        # Speed (see docs/benchmark.md): a tick sends a node small commands in a row, and
        # with Nagle's algorithm each one waits for a delayed ACK, +40 ms.
        client.get_transport().sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.handshakes[node] += 1
        return client

    def get_connection(self, node, gave_up):
        """The node's open connection, or a new one if it has none that works.

        Only a worker its tick still waits for may install a new connection: a late
        one (its tick gave up on it, and the next tick may already have opened a
        fresh connection) closes its own and changes nothing."""
        with self.lock:
            client = self.connections.get(node)
        transport = client and client.get_transport()
        if transport and transport.is_active():
            return client
        new_client = self.open_connection(node)
        with self.lock:
            late = gave_up.is_set()
            if not late:
                broken_client = self.connections.get(node)
                self.connections[node] = new_client
        if late:
            new_client.close()
            raise GaveUp()
        if broken_client:
            broken_client.close()
        return new_client

    def close_connection(self, node, client=None):
        """Close the node's connection (only if it is still `client`, when given)."""
        with self.lock:
            if client is not None and self.connections.get(node) is not client:
                return  # a newer connection took its place: not ours to close
            client = self.connections.pop(node, None)
        if client:
            client.close()

    def close_all(self):
        """Close every connection (at shutdown)."""
        for node in list(self.addresses):
            self.close_connection(node)


# ---------------------------------------------------------------------------
# desired_state.txt, rewritten safely
# ---------------------------------------------------------------------------
# A teacher edits the file by hand, perhaps on Windows (CRLF, a byte order mark), while
# the API and the loop rewrite it: a rewrite changes only the lines it must, keeps the
# file's line endings, BOM, owner and mode, replaces the file atomically, and never
# overwrites a hand edit saved meanwhile.

BYTE_ORDER_MARK = "\ufeff"  # what Notepad may put at the start of a UTF-8 file


def split_lines(text):
    """The file's lines without their endings, whether they end in LF or CRLF (Windows)."""
    text = text.removeprefix(BYTE_ORDER_MARK)
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the text ended with a newline: no line after it
    return [line.removesuffix("\r") for line in lines]


def parse_line(line):
    """'app1' -> ('app1', None), 'app1 : node-2' -> ('app1', 'node-2'), blank or comment -> None.

    Raises ValueError with the reason when the line is not valid. Spaces around the
    colon are fine: a teacher typing "nginx : node-1" means nginx on node-1."""
    code = line.partition("#")[0].strip()
    if not code:
        return None
    name, colon, node = (part.strip() for part in code.partition(":"))
    if not is_valid_name(name):
        raise ValueError("not a valid name")
    if colon and not is_valid_name(node):
        raise ValueError("not a valid node name")
    return name, (node if colon else None)


def format_entry(name, node):
    """One line of desired_state.txt: 'nginx' or 'nginx:node-1'."""
    return name if node is None else f"{name}:{node}"


def render_desired_state(text, desired):
    """Rewrite the file's text so that it declares `desired`, changing only the lines that must.

    Comments, blank lines and invalid lines stay as they are; a container no longer
    desired loses its line(s); a new one gets a line at the end. The file keeps its
    own line endings (CRLF if it was saved on Windows) and its byte order mark."""
    lines, seen = [], set()
    for line in split_lines(text):
        try:
            entry = parse_line(line)
        except ValueError:
            entry = None
        if entry is None:
            lines.append(line)
            continue
        name, node = entry
        if name not in desired:
            continue
        if name in seen or desired[name] == node:
            lines.append(line)  # a duplicate stays as it was, and reported
        else:
            comment = line.partition("#")[2]
            lines.append(format_entry(name, desired[name]) + (f"  #{comment}" if comment else ""))
        seen.add(name)
    lines += [format_entry(name, node) for name, node in desired.items() if name not in seen]
    newline = "\r\n" if "\r\n" in text else "\n"
    bom = BYTE_ORDER_MARK if text.startswith(BYTE_ORDER_MARK) else ""
    return bom + "".join(line + newline for line in lines)


def file_version(path):
    """What identifies one version of a file: inode, size, modification time (None: no file)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def write_atomically(path, text, unless_changed_since=False):
    """Write to a temp file in the same directory, fsync, then rename over the file.

    A reader (or a crash) sees the old file or the new one, never half of one.
    unless_changed_since: a file_version(); if the file is no longer that version
    when we are about to rename, write nothing and return False. The new file keeps
    the old one's owner and mode: the controller often runs as root (in its
    container), and the teacher who owns the file must still be able to edit it."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        owner = os.stat(path)
    except FileNotFoundError:
        owner = os.stat(directory)  # a new file belongs to whoever owns the directory
    fd, temp_path = tempfile.mkstemp(dir=directory, prefix=".desired_state.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp_path, 0o644 if stat.S_ISDIR(owner.st_mode) else stat.S_IMODE(owner.st_mode))
        if (owner.st_uid, owner.st_gid) != (os.geteuid(), os.getegid()):
            try:
                os.chown(temp_path, owner.st_uid, owner.st_gid)
            except PermissionError:
                pass  # not root: the file becomes ours, which we can still edit
        if unless_changed_since is not False and file_version(path) != unless_changed_since:
            os.unlink(temp_path)
            return False  # someone edited it meanwhile: the caller starts again
        os.replace(temp_path, path)
        return True
    except BaseException:
        os.unlink(temp_path)
        raise


class EditedMeanwhile(Exception):
    """desired_state.txt changed under us: nothing was written. update() raises it after ten
    tries, the loop's save() at the first change (the next tick starts from the edit)."""


class DesiredStateFile:
    """desired_state.txt: read it, or change it safely: update() for the API, and for the
    loop read_with_version() then save(), both while it holds self.lock.

    parse: the lesson's parse_desired_state(text) -> ({name: node or None}, problems)."""

    def __init__(self, path, parse):
        self.path = path
        self.parse = parse
        # The API thread and the loop both change the file: every read-modify-write
        # holds this one lock (the loop's from step 2 to step 4), so neither ever loses
        # the other's update.
        self.lock = threading.Lock()

    def read_text(self):
        """The file's text, line endings untouched ("" when there is no file)."""
        try:
            with open(self.path, encoding="utf-8", errors="replace", newline="") as file:
                return file.read()
        except FileNotFoundError:
            return ""

    def read(self):
        """({name: node or None}, [problems]): what the file declares now."""
        return self.parse(self.read_text())

    def read_with_version(self):
        """(desired, problems, version): read(), and the version of the file it read, for
        save(). The version is taken first: a save landing in between then looks like a
        change, never like no change."""
        version = file_version(self.path)
        desired, problems = self.read()
        return desired, problems, version

    def save(self, desired, version):
        """Save `desired`, if the file is still `version`; the caller holds self.lock.

        Comments, bad lines, the BOM and the line endings stay. If a teacher's editor saved
        the file since it was read, nothing is written and EditedMeanwhile says so."""
        text = self.read_text()
        if file_version(self.path) != version:
            raise EditedMeanwhile("desired_state.txt was edited during the tick")
        if self.parse(text)[0] == desired:
            return  # nothing to write
        if not write_atomically(self.path, render_desired_state(text, desired),
                                unless_changed_since=version):
            raise EditedMeanwhile("desired_state.txt was edited during the tick")

    def update(self, change, *args):
        """Let change(desired, *args) modify the declared containers, save them, and
        return what change returns.

        The API holds the lock here, and the loop from step 2 to step 4, so they take
        turns. A teacher's editor takes none: when save() finds the file changed since
        it was read, we start again from the teacher's text (at most ten times)."""
        with self.lock:
            for _ in range(10):
                desired, _, version = self.read_with_version()
                result = change(desired, *args)
                try:
                    self.save(desired, version)
                    return result
                except EditedMeanwhile:
                    continue
        raise EditedMeanwhile("desired_state.txt keeps changing; try again")


# ---------------------------------------------------------------------------
# When to tick: the loop's alarm clock, woken by the API, paused and stepped by
# the teacher
# ---------------------------------------------------------------------------

def next_trigger(now, deadline, paused, steps_requested, woken, due):
    """Why a tick runs now, or None to keep waiting.

    A tick runs when the teacher steps, or, unless the loop is paused, when the API
    woke it, or when the deadline came (for the reason `due`: timer or requeue)."""
    if steps_requested:
        return "step"
    if paused:
        return None
    if woken:
        return "wake"
    if now >= deadline:
        return due
    return None


class LoopTimer:
    """The loop's alarm clock: it sleeps until next_trigger() says a tick is due.

    It runs on time.monotonic(), which only goes forward: set the laptop's clock
    back an hour, the loop still ticks on time."""

    def __init__(self, shutting_down, log):
        self.shutting_down = shutting_down  # set at shutdown: sleep() then returns None
        self.log = log            # where it says "Loop paused" and "Loop resumed"
        self.condition = threading.Condition()  # every change below notifies it
        self.paused = False
        self.steps_requested = 0
        self.woken = False
        self.next_tick_at = None  # wall-clock time, for the API and the page

    def wake(self):
        """Something changed: tick now (ignored while paused)."""
        with self.condition:
            self.woken = True
            self.condition.notify_all()

    def pause(self):
        """No tick runs until step or resume."""
        with self.condition:
            self.paused = True
            self.condition.notify_all()

    def resume(self):
        """Tick at once, then on the timer again."""
        with self.condition:
            self.paused, self.steps_requested, self.woken = False, 0, True
            self.condition.notify_all()

    def step(self):
        """Run exactly one tick now and stay paused, like a debugger's step."""
        with self.condition:
            self.paused = True
            self.steps_requested += 1
            self.condition.notify_all()

    def sleep(self, seconds, reason):
        """Sleep `seconds`, then return `reason`; or return sooner "wake" (the API) or
        "step" (the teacher); or None at shutdown. While paused, it sleeps until step
        or resume, and says so in the log."""
        with self.condition:
            deadline = time.monotonic() + seconds
            said_paused = False
            while not self.shutting_down.is_set():
                now = time.monotonic()
                trigger = next_trigger(now, deadline, self.paused, self.steps_requested,
                                       self.woken, reason)
                if trigger:
                    if trigger == "step":
                        self.steps_requested -= 1
                    if trigger == "wake":
                        self.woken = False
                    if said_paused and not self.paused:
                        self.log.say("resumed")
                    return trigger
                if self.paused and not said_paused:
                    self.log.say("paused")
                    said_paused = True
                self.next_tick_at = None if self.paused else time.time() + deadline - now
                self.condition.wait(None if self.paused else deadline - now)
            return None

    def status(self):
        """Paused or not, and when the next tick runs."""
        with self.condition:
            return {"paused": self.paused, "next_tick_at": self.next_tick_at}


# ---------------------------------------------------------------------------
# What the API shows: the last observation (in Kubernetes, the nodes' and pods' status)
# ---------------------------------------------------------------------------

def unobserved_node():
    """What the API says of a node before its first observation."""
    return {"condition": "Unknown", "reason": None, "up": False, "containers": [],
            "container_count": 0, "last_seen": None, "since": None, "error": None,
            "eviction_in": None, "eviction_at": None}


class ClusterStatus:
    """What step 1 last saw of each node, kept for the API thread (under `lock`)."""

    def __init__(self, nodes):
        self.nodes = nodes  # the Nodes: their addresses and handshake counts
        self.lock = threading.Lock()
        self.node_status = {node: unobserved_node() for node in nodes.addresses}
        self.running_names = {node: set() for node in nodes.addresses}  # in full, not cut

    def remember(self, observation):
        """Keep what step 1 saw: each node's condition, and what it ran (cut to LIST_LIMIT)."""
        now = time.time()
        with self.lock:
            for node, (condition, reason) in observation.conditions.items():
                status = self.node_status[node]
                if status["since"] is None or status["condition"] != condition:
                    status["since"] = now
                status.update(condition=condition, reason=reason, up=condition == "Ready",
                              error=reason, eviction_in=None, eviction_at=None)
                if node in observation.in_grace:  # in its grace period: when will it be evicted?
                    _, eviction_in = observation.in_grace[node]
                    status.update(eviction_in=round(eviction_in, 1), eviction_at=now + eviction_in)
                if node in observation.running:
                    names = observation.running[node]
                    status.update(containers=[cut_text(name) for name in names[:LIST_LIMIT]],
                                  container_count=len(names), last_seen=now)
                    self.running_names[node] = set(names)

    def container_views(self, desired):
        """Each container: name, node, status, and where else it may run.

        Status: running (seen on its node), pending (not seen there yet), unknown (its
        node does not answer: nobody knows), unscheduled (no node yet). also_on:
        unreachable nodes that still listed it when last seen: after a partition it may
        be running there too, twice."""
        with self.lock:
            conditions = {node: status["condition"] for node, status in self.node_status.items()}
            seen = {node: self.running_names[node] for node in self.node_status}
        views = []
        for name, node in desired.items():
            if node is None:
                status = "unscheduled"
            elif conditions.get(node) == "Unknown":
                status = "unknown"
            elif conditions.get(node) == "Ready" and name in seen[node]:
                status = "running"
            else:
                status = "pending"
            also_on = [other for other in conditions if other != node and conditions[other] == "Unknown"
                       and name in seen[other]]
            views.append({"name": name, "node": node, "status": status, "also_on": also_on})
        return views

    def node_views(self):
        """Each node: its condition, what it ran, since when."""
        with self.lock:
            return [{"name": node, "address": self.nodes.address(node),
                     "handshakes": self.nodes.handshakes[node], **self.node_status[node]}
                    for node in self.node_status]


# ---------------------------------------------------------------------------
# The classroom's side of the API: JSON errors, the token, the nodes, the loop's
# health and controls, the page and its document
# ---------------------------------------------------------------------------
# Who may change the cluster. Kubernetes asks two questions of every request: who are
# you (authentication: here, do you hold the bearer token?) and may you do this
# (authorization: here, whoever holds it may do everything). Reading stays open, so a
# whole class can watch the loop without the token.
READ_ONLY_METHODS = ("GET", "HEAD", "OPTIONS")


def token_allows(token, authorization):
    """True if a request with this Authorization header ("" if none) may change the cluster:
    no token is set, or the header is "Bearer <token>"."""
    if token is None:
        return True
    scheme, _, given = authorization.partition(" ")
    # compare_digest takes as long for a near miss as for a far one, so the response
    # time does not tell an attacker how many characters were right.
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def add_classroom_api(api, *, desired_file, status, log, timer, token, tick_seconds,
                      grace_seconds, page):
    """Add to the Flask app everything but the seed's container routes: JSON errors, the
    token check, /api/nodes, /healthz, /api/loop, /api/state and the page at /."""
    api.config["MAX_CONTENT_LENGTH"] = 64 * 1024  # a name is short; refuse huge bodies

    @api.errorhandler(HTTPException)
    def json_error(error):
        """Every HTTP error (400, 401, 404, 405, 409, 413) as JSON, never an HTML page."""
        return jsonify(error=error.description), error.code

    @api.errorhandler(EditedMeanwhile)
    def edited_meanwhile(error):
        """The file changed under us ten times in a row: nothing was written, say so."""
        return jsonify(error=str(error)), 409

    @api.errorhandler(Exception)
    def unexpected_error(error):
        """A bug or a full disk, never bad input: still JSON, never an HTML page."""
        return jsonify(error=f"internal error: {log.describe(error)}"), 500

    @api.before_request
    def require_token_to_write():
        """Refuse a request that changes something unless it carries the token (when one is set)."""
        if request.method in READ_ONLY_METHODS or token_allows(token, request.headers.get("Authorization", "")):
            return None  # None: Flask goes on to the route
        if request.blueprint == "kubernetes":
            return None  # kubernetes_api.py answers kubectl itself, with a Status that says why
        problem = "wrong token" if request.headers.get("Authorization", "").partition(" ")[2] else "no token"
        # The answer says how to send a token, never anything about the token itself.
        return (jsonify(error=f'{problem}: changing the cluster needs the header '
                              f'"Authorization: Bearer <token>" (the controller\'s API_TOKEN)'),
                401, {"WWW-Authenticate": "Bearer"})

    def loop_status():
        """The loop's state: paused or not, when the next tick runs, how many ticks so far."""
        return {**timer.status(), "tick_seconds": tick_seconds, "tick_count": log.tick_count}

    @api.get("/api/containers/<name>")
    def get_container(name):
        """GET /api/containers/<name>: one container, or 404."""
        desired, _ = desired_file.read()
        if name not in desired:
            abort(404, f"no container named {name!r}")
        return jsonify(status.container_views({name: desired[name]})[0])

    @api.get("/api/nodes")
    def list_nodes():
        """GET /api/nodes: each node's condition and what it ran."""
        return jsonify(status.node_views())

    @api.get("/healthz")
    def healthz():
        """200 while the loop ticks and its ticks work; 503 when it stalled or keeps failing."""
        loop = loop_status()
        with log.lock:
            silent_for = time.monotonic() - log.last_tick_finished
            failed_in_a_row = log.failed_ticks_in_a_row
        # A tick may legitimately take SSH_TIMEOUT + 1 s (a hung node) on top of the wait:
        # twice that with no finished tick means the loop is stuck.
        stalled = silent_for > 2 * (tick_seconds + log.ssh_timeout + 1)
        # Paused on purpose is healthy; a loop that stopped ticking on its own is not.
        health = ("ok" if loop["paused"] else "stalled" if stalled
                  else "failing" if failed_in_a_row >= 3 else "ok")
        return jsonify(status=health, seconds_since_last_tick=round(silent_for, 1),
                       failed_ticks_in_a_row=failed_in_a_row, **loop), (200 if health == "ok" else 503)

    # Teaching controls: the same as the page's buttons, usable with curl.
    @api.get("/api/loop")
    def loop():
        """GET /api/loop: paused or not, when the next tick runs, how many ticks so far."""
        return jsonify(loop_status())

    @api.post("/api/loop/<command>")
    def loop_command(command):
        """POST /api/loop/pause, /step or /resume: the teacher's controls."""
        actions = {"pause": timer.pause, "resume": timer.resume, "step": timer.step}
        if command not in actions:
            return jsonify(error="loop commands are pause, step and resume"), 404
        actions[command]()
        return jsonify(loop_status())

    @api.get("/api/state")
    def state():
        """Everything the classroom page shows, in one document."""
        desired, problems = desired_file.read()
        # "now": the page counts down to next_tick_at on the controller's clock, not its own.
        # token_required: the page shows whether it may write, without knowing the token.
        return jsonify(now=time.time(), utc_offset=time.localtime().tm_gmtoff, lang=log.language,
                       grace_seconds=grace_seconds, token_required=token is not None,
                       nodes=status.node_views(), containers=status.container_views(desired),
                       ticks=log.recent_ticks(), loop=loop_status(),
                       invalid_lines=[{"number": n, "line": cut_text(line), "reason": r}
                                      for n, line, r in problems[:LIST_LIMIT]],
                       invalid_line_count=len(problems))

    @api.get("/")
    def classroom_page():
        """GET /: the classroom page (dashboard.html), which polls /api/state."""
        return send_file(page)


def wait_for_a_stop_signal(shutting_down, timer):
    """Return once SIGTERM (docker stop) or SIGINT (Ctrl-C) came: shutting_down is set and the
    loop's timer woken, so a sleeping loop ends at once (a tick in progress finishes first)."""
    def stop(signum, frame):
        shutting_down.set()
        timer.wake()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not shutting_down.wait(0.5):  # signals reach the main thread, which waits here
        pass


def quiet_server(api, host, port):
    """A threaded HTTP server for the app, with the libraries' chatter kept out of the tick log.

    The tick log is the lesson: no access-log line per request, and no paramiko
    traceback for every node that does not answer (the tick log already says
    "unavailable")."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    return make_server(host, port, api, threaded=True)
