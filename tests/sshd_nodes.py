"""Real OpenSSH "nodes" on 127.0.0.1, and the real controller process, for tests.

Each node is one `/usr/sbin/sshd -D` on a free local port, with generated host and
client keys and key-only login as the current user. All nodes share one state
directory (the controller's NODE_STATE_DIR), where node `node-1` "runs" the names
listed in `node-1_running.txt`. A node can be:

- killed, like `docker stop`: the listener and every descendant (each accepted SSH
  connection is its own process session, since sshd calls setsid) get SIGKILL;
  the node's file stays on disk, like a stopped container's filesystem;
- hung: the listener and every descendant get SIGSTOP (TCP still connects, nothing
  answers), then unhung with SIGCONT;
- restarted on the same port.

`Controller` runs `python app_controller.py` from the repository root, configured by
the environment, captures its stdout line by line in a thread and lets a test wait
for a log line.

Importable without pytest (the benchmark and browser scripts use it too); standard
library only. Linux only (descendants are found through /proc).

    with SshdCluster(3) as cluster, Controller(cluster, tick_seconds=1) as ctl:
        ctl.post("/api/containers", {"name": "nginx"})
        ctl.wait_for_line(r"▶ START: nginx on node-\\d")
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


# ----------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------

def free_port(host="127.0.0.1"):
    """Return a TCP port that is free right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ssh_banner(host, port, timeout=1.0):
    """Return the server's SSH banner line, or None if it does not answer in time."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            data = b""
            while b"\n" not in data and len(data) < 256:
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    line = data.split(b"\n", 1)[0].strip()
    return line.decode("ascii", "replace") if line.startswith(b"SSH-") else None


def wait_until(predicate, timeout=15.0, interval=0.05, what="the condition", ignoring=()):
    """Poll predicate() until it returns something truthy, and return that value.

    The suite's one way to wait: on timeout, raise AssertionError naming `what`
    was awaited (and the last value seen), so a test fails saying what never came.
    An exception of a type in `ignoring` (an API restarting, a page redrawing)
    counts as "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = last_seen = predicate()
        except ignoring as error:
            value, last_seen = None, error
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} "
                                 f"(last seen: {last_seen!r:.200})")
        time.sleep(interval)


def memory_kb(pid):
    """(VmRSS, VmHWM) of a process in kB, or None if it is gone."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def children(pid):
    """The PIDs of a process's direct children."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except OSError:  # kernels without /proc/PID/task/TID/children
        return [child for child, parent in parent_pids().items() if parent == pid]


def parent_pids():
    """{pid: its parent's pid} for every live process, read once from /proc/*/stat."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
        except OSError:
            continue  # it exited meanwhile
        # Field 2 (comm) may contain spaces and parentheses: split after the last ')'.
        parents[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
    return parents


def descendants(pid):
    """PIDs of every live descendant of `pid` (children, grandchildren...), via /proc."""
    children = {}
    for child, parent in parent_pids().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def signal_tree(pid, sig):
    """Send `sig` to `pid` and all its descendants; return the PIDs signalled.

    For SIGKILL the tree is frozen first (SIGSTOP, repeated until no new process
    appears), so nothing can fork a survivor between listing and killing.
    """
    def send(p, s):
        try:
            os.kill(p, s)
            return True
        except ProcessLookupError:
            return False

    if sig in (signal.SIGKILL, signal.SIGSTOP):
        frozen = {pid} if send(pid, signal.SIGSTOP) else set()
        while True:
            new = [p for p in descendants(pid) if p not in frozen]
            if not new:
                break
            frozen.update(p for p in new if send(p, signal.SIGSTOP))
            if not any(os.path.exists(f"/proc/{p}") for p in new):
                break
        if sig == signal.SIGSTOP:
            return sorted(frozen)
        for p in frozen:
            send(p, signal.SIGKILL)
        return sorted(frozen)
    tree = [pid] + descendants(pid)
    return [p for p in tree if send(p, sig)]


# ----------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------

def generate_keys(directory):
    """Create an ed25519 host key and client key pair in `directory`; return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("host_key", "client_key"):
        key = directory / name
        if not key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"pull-mode-test-{name}",
                 "-f", str(key)],
                check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return directory


# ----------------------------------------------------------------------------
# One node = one sshd
# ----------------------------------------------------------------------------

SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile none
StrictModes no
UsePAM no
UseDNS no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile {authorized_keys}
AllowUsers {user}
LogLevel ERROR
MaxStartups 100
MaxSessions 100
{extra}"""

# bash sources ~/.bashrc for a command run by sshd when it is a top-level shell.
# On a developer machine that file may be slow (pyenv init: ~160 ms per command
# here), which would measure the laptop, not the controller. With SHLVL=1 in the
# session's environment bash starts at level 2 and skips it, like a bare node image.
SKIP_BASHRC = "SetEnv SHLVL=1\n"


class SshdNode:
    """One sshd process playing the node `name` on 127.0.0.1:`port`."""

    def __init__(self, name, port, base_dir, keys_dir, state_dir, user, extra_config=""):
        self.name = name
        self.port = port
        self.host = "127.0.0.1"
        self.state_dir = Path(state_dir)
        self.config = Path(base_dir) / f"sshd_{name}.conf"
        self.log_path = Path(base_dir) / f"sshd_{name}.log"
        self.config.write_text(SSHD_CONFIG.format(
            port=port, host_key=Path(keys_dir) / "host_key",
            authorized_keys=Path(keys_dir) / "client_key.pub", user=user, extra=extra_config))
        self.proc = None
        self.hung = False

    @property
    def state_file(self):
        """The file listing what this node runs (`<state_dir>/<name>_running.txt`)."""
        return self.state_dir / f"{self.name}_running.txt"

    @property
    def running(self):
        """Lines of the node's state file (what it runs), [] when the file is missing."""
        try:
            return self.state_file.read_text().splitlines()
        except FileNotFoundError:
            return []

    @property
    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout=10.0):
        """Start sshd and wait until it answers the SSH banner."""
        if self.alive:
            raise RuntimeError(f"{self.name} is already running")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.config)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True)
        log.close()
        self.hung = False
        try:
            deadline = time.monotonic() + timeout
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"sshd for {self.name} exited with {self.proc.returncode}: "
                        f"{self.log_path.read_text(errors='replace')[-2000:]}")
                if ssh_banner(self.host, self.port, timeout=0.5):
                    return self
                if time.monotonic() > deadline:
                    raise TimeoutError(f"sshd for {self.name} gave no banner on port {self.port}")
                time.sleep(0.05)
        except BaseException:
            self.kill()
            raise

    def kill(self):
        """Stop the node like `docker stop`: SIGKILL the listener and all its sessions."""
        if self.proc is None:
            return []
        killed = signal_tree(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=5)
        self.proc = None
        self.hung = False
        return killed

    def hang(self):
        """Freeze the node (SIGSTOP everything): TCP still connects, nothing answers."""
        if not self.alive:
            raise RuntimeError(f"{self.name} is not running")
        self.hung = True
        return signal_tree(self.proc.pid, signal.SIGSTOP)

    def unhang(self):
        """Let a hung node go on (SIGCONT everything)."""
        if not self.alive:
            raise RuntimeError(f"{self.name} is not running")
        self.hung = False
        return signal_tree(self.proc.pid, signal.SIGCONT)

    def restart(self, timeout=10.0):
        """Kill (if needed) and start again on the same port."""
        self.kill()
        return self.start(timeout=timeout)

    def connections(self):
        """PIDs of the listener's direct children: one per open SSH connection."""
        return children(self.proc.pid) if self.alive else []

    def sessions(self):
        """PIDs of the processes forked by this sshd (one tree per SSH connection)."""
        return descendants(self.proc.pid) if self.alive else []


class SshdCluster:
    """`count` sshd nodes named node-1..node-N sharing one state directory.

    base_dir: where configs, logs and (by default) keys and state live; a fresh
    temporary directory if None (removed on close). keys_dir: reuse keys across
    clusters (generated if missing). skip_bashrc: see SKIP_BASHRC. extra_config:
    more sshd_config lines.
    """

    def __init__(self, count=3, base_dir=None, keys_dir=None, names=None, user=None,
                 skip_bashrc=True, extra_config=""):
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="pull-mode-sshd-"))
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.keys_dir = generate_keys(keys_dir or self.base_dir / "keys")
        self.state_dir = self.base_dir / "nodes"
        self.state_dir.mkdir(exist_ok=True)
        self.user = user or _current_user()
        names = names or [f"node-{i}" for i in range(1, count + 1)]
        self.nodes = {}
        for name in names:
            self.nodes[name] = SshdNode(name, free_port(), self.base_dir, self.keys_dir,
                                        self.state_dir, self.user,
                                        (SKIP_BASHRC if skip_bashrc else "") + extra_config)

    @property
    def client_key(self):
        """Private key the controller logs in with (SSH_KEY_FILE)."""
        return self.keys_dir / "client_key"

    def __getitem__(self, name):
        return self.nodes[name]

    def __iter__(self):
        return iter(self.nodes.values())

    def start(self):
        try:
            for node in self.nodes.values():
                node.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        for node in self.nodes.values():
            if node.alive:
                node.kill()

    def close(self):
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def nodes_env(self):
        """The NODES value pointing every node at its port: `node-1=127.0.0.1:PORT,...`."""
        return ",".join(f"{n.name}={n.host}:{n.port}" for n in self.nodes.values())

    def running(self):
        """{node name: [lines of its state file]} for every node, dead or alive."""
        return {name: node.running for name, node in self.nodes.items()}

    def placements(self, live_only=True):
        """{container: [nodes listing it]} over the nodes' files (live_only: skip the
        killed and the hung nodes)."""
        found = {}
        for node in self.nodes.values():
            if live_only and (not node.alive or node.hung):
                continue
            for line in node.running:
                if line.strip():
                    found.setdefault(line.strip(), []).append(node.name)
        return found


def _current_user():
    import pwd
    return pwd.getpwuid(os.getuid()).pw_name


# ----------------------------------------------------------------------------
# The real controller process
# ----------------------------------------------------------------------------

class Controller:
    """`python app_controller.py` against a cluster; stdout captured line by line.

    The script is the repository's app_controller.py, or $PULL_MODE_CONTROLLER.

    lines[i] was read at times[i] (time.monotonic()). Extra environment variables
    (or overrides, e.g. NODES) go in `env`; a value None removes the variable.
    """

    def __init__(self, cluster=None, tick_seconds=1, ssh_timeout=1.5, log_lang="en",
                 env=None, work_dir=None, desired_state_file=None, api_port=None,
                 script=None, python=None, echo=False):
        self.cluster = cluster
        self._own_dir = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="pull-mode-ctl-"))
        self.desired_state_file = Path(desired_state_file or self.work_dir / "desired_state.txt")
        self.api_port = api_port or free_port()
        self.base_url = f"http://127.0.0.1:{self.api_port}"
        self.script = Path(script or os.environ.get("PULL_MODE_CONTROLLER")
                           or REPO_ROOT / "app_controller.py")
        self.python = python or sys.executable
        self.echo = echo
        self.env = dict(os.environ)
        self.env.update({
            "SSH_USER": cluster.user if cluster else _current_user(),
            "TICK_SECONDS": str(tick_seconds),
            "SSH_TIMEOUT": str(ssh_timeout),
            "API_HOST": "127.0.0.1",
            "API_PORT": str(self.api_port),
            "DESIRED_STATE_FILE": str(self.desired_state_file),
            "LOG_LANG": log_lang,
            "PYTHONUNBUFFERED": "1",
            "PYTHONIOENCODING": "utf-8",
        })
        if cluster:
            self.env.update({
                "NODES": cluster.nodes_env(),
                "SSH_KEY_FILE": str(cluster.client_key),
                "NODE_STATE_DIR": str(cluster.state_dir),
            })
        for key, value in (env or {}).items():
            if value is None:
                self.env.pop(key, None)
            else:
                self.env[key] = str(value)
        self.proc = None
        self.lines, self.times = [], []
        self.stderr_lines = []
        self._cond = threading.Condition()
        self._threads = []

    # -- process -------------------------------------------------------------

    def start(self, wait_healthy=True, timeout=15.0):
        self.proc = subprocess.Popen(
            [self.python, str(self.script)], cwd=str(self.script.parent), env=self.env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for stream, sink in ((self.proc.stdout, self.lines), (self.proc.stderr, self.stderr_lines)):
            t = threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
            t.start()
            self._threads.append(t)
        if wait_healthy:
            self.wait_healthy(timeout=timeout)
        return self

    def _pump(self, stream, sink):
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with self._cond:
                sink.append(line)
                if sink is self.lines:
                    self.times.append(time.monotonic())
                self._cond.notify_all()
            if self.echo:
                print(("" if sink is self.lines else "[stderr] ") + line, flush=True)
        stream.close()
        with self._cond:
            self._cond.notify_all()

    def stop(self, timeout=2.0):
        """SIGTERM; return (exit code, seconds to exit). Kills it if it outlives `timeout`
        (exit code then None)."""
        if self.proc is None:
            return None, 0.0
        if self.proc.poll() is not None:
            return self.proc.returncode, 0.0
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        elapsed = time.monotonic() - t0
        for t in self._threads:
            t.join(timeout=2)
        return code, elapsed

    def close(self):
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    @property
    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    # -- log -----------------------------------------------------------------

    def mark(self):
        """Index of the next line to be read: pass it as `after=` to wait for new lines."""
        with self._cond:
            return len(self.lines)

    def wait_for_line(self, match, timeout=15.0, after=0):
        """Wait for a stdout line (index >= after) matching `match`: a regex string
        (re.search), a compiled regex or a predicate. Return (index, line).
        Raise AssertionError with the log tail on timeout or exit."""
        if isinstance(match, str):
            match = re.compile(match)
        test = match.search if isinstance(match, re.Pattern) else match
        deadline = time.monotonic() + timeout
        i = after
        with self._cond:
            while True:
                while i < len(self.lines):
                    if test(self.lines[i]):
                        return i, self.lines[i]
                    i += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not any(
                        t.is_alive() for t in self._threads)):
                    break
                self._cond.wait(min(remaining, 0.2))
        raise AssertionError(
            f"no log line matching {getattr(match, 'pattern', match)!r} after line {after} "
            f"within {timeout}s (controller {'alive' if self.alive else 'exited'}).\n"
            + self.tail())

    def find_lines(self, match, after=0, before=None):
        """All (index, line) in [after, before) matching a regex or predicate."""
        if isinstance(match, str):
            match = re.compile(match)
        test = match.search if isinstance(match, re.Pattern) else match
        with self._cond:
            snapshot = self.lines[after:before]
        return [(after + k, line) for k, line in enumerate(snapshot) if test(line)]

    def wait_ticks(self, count=1, timeout=15.0, after=None):
        """Wait until `count` more complete ticks (verdict lines) are logged; return the
        index of the last verdict line."""
        i = self.mark() if after is None else after
        for _ in range(count):
            i, _line = self.wait_for_line(VERDICT, timeout=timeout, after=i)
            i += 1
        return i - 1

    def tail(self, n=60):
        with self._cond:
            out = self.lines[-n:]
            err = self.stderr_lines[-20:]
        text = "---- controller stdout (tail) ----\n" + "\n".join(out)
        if err:
            text += "\n---- controller stderr (tail) ----\n" + "\n".join(err)
        return text

    def log(self):
        with self._cond:
            return "\n".join(self.lines)

    # -- API -----------------------------------------------------------------

    def request(self, method, path, body=None, raw=None, headers=None, timeout=10.0):
        """HTTP request to the API; return (status, parsed JSON or text)."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        hdrs = {"Content-Type": "application/json"} if body is not None else {}
        hdrs.update(headers or {})
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, payload = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, payload = e.code, e.read()
        text = payload.decode("utf-8", "replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)

    def wait_quiet(self, seconds, timeout=30.0):
        """Wait until the controller itself says no tick finished for `seconds` (its /healthz):
        how a test proves that nothing ticked, without a bare sleep."""
        wait_until(lambda: self.get("/healthz")[1]["seconds_since_last_tick"] >= seconds,
                   timeout=seconds + timeout, interval=0.1,
                   what=f"{seconds:g} s without a tick (/healthz)")

    def wait_healthy(self, timeout=15.0):
        """Wait until GET /healthz answers 200; return its body. AssertionError (with the
        log tail) if it does not within `timeout`, or as soon as the process exits."""
        def healthy():
            if self.proc.poll() is not None:
                raise AssertionError(f"the controller exited with {self.proc.returncode}.\n"
                                     + self.tail())
            try:
                status, body = self.get("/healthz", timeout=1.0)
            except OSError:
                return None
            return body if status == 200 else None
        try:
            return wait_until(healthy, timeout, 0.1, "GET /healthz to answer 200")
        except AssertionError as error:
            if self.proc.poll() is not None:
                raise
            raise AssertionError(f"{error}\n{self.tail()}") from None


# A tick ends with its verdict: "✅ Converged" / "❌ Not converged: ..." / "⏳ Waiting: ..."
# (en) or "✅ Convergé" / "❌ Non convergé : ..." / "⏳ En attente : ..." (fr).
VERDICT = re.compile(r"^(✅|❌|⏳) ")
TICK = re.compile(r"^TICK - \d\d:\d\d:\d\d")
