"""The classroom stack as the end-to-end tests drive it, and the times they measure."""
import os
import shutil
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROJECT = "pull-mode"
LOCAL_BASE_IMAGE = "pull-mode-base:bookworm"  # what .ci/docker-setup builds
BUILD_TIMEOUT = 900  # seconds: a first build installs flask and paramiko from PyPI
COMMAND_TIMEOUT = 180  # seconds, for any other docker command
# The API's port on the host: PULL_MODE_PORT, as docker-compose.yml reads it.
PORT = os.environ.get("PULL_MODE_PORT") or "8080"
API = f"http://127.0.0.1:{PORT}"
# The settings docker-compose.yml passes through to the controller: the tests run with
# its defaults (5 s ticks, English log, ...), whatever the calling shell exports.
PASSED_THROUGH = ["LOG_LANG", "TICK_SECONDS", "SSH_TIMEOUT", "NODE_GRACE_SECONDS", "API_TOKEN"]
# A teacher's own uid and gid on a Linux machine: the owner of a clone, so of its nodes/.
TEACHER = (1000, 1000)

# What the seed's README promises when node-1 stops (or is cut off) with app1..app6
# placed round-robin: the lines, in this order, in the English log.
SEED_FAILOVER_LOG = ["⚠️  node-1: unavailable",
                     "💀 CLEANUP: app1 (node node-1 down)",
                     "💀 CLEANUP: app4 (node node-1 down)",
                     "📍 SCHEDULE: app1 → node-2",
                     "📍 SCHEDULE: app4 → node-3",
                     "▶ START: app1 on node-2",
                     "▶ START: app4 on node-3"]

# Filled by the tests, printed at the end of the run (see pytest_terminal_summary).
MEASURED = {}


def record(what, seconds):
    """Keep a measured duration for the closing report (every measure, in order)."""
    MEASURED.setdefault(what, []).append(seconds)


def copy_checkout(destination):
    """Copy what the stack needs, with a fresh nodes/ and the checkout's desired_state.txt."""
    ignore = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", ".pytest_cache",
                                    ".hypothesis", "nodes", "tests", ".env")
    shutil.copytree(REPO, destination, ignore=ignore, symlinks=True)
    (destination / "nodes").mkdir()
    (destination / "nodes" / ".gitkeep").touch()
    return destination


def git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT)


def commit_everything(directory):
    """Make `directory` a git repository with one commit of its files, byte for byte
    (autocrlf off, whatever this machine's git config says)."""
    git("init", "-q", cwd=directory)
    git("-c", "core.autocrlf=false", "add", "-A", cwd=directory)
    git("-c", "core.autocrlf=false", "-c", "user.name=pull-mode tests",
        "-c", "user.email=tests@pull-mode.invalid", "commit", "-q", "-m", "snapshot", cwd=directory)
    return directory


def windows_clone(repository, destination):
    """Clone as Git for Windows does by default: line ends converted to CRLF on checkout,
    unless a .gitattributes says otherwise."""
    git("-c", "core.autocrlf=true", "clone", "-q", str(repository), str(destination),
        cwd=repository)
    return destination


class Stack:
    """The classroom stack, driven as a teacher does: shell commands in its directory."""

    def __init__(self, directory, client):
        self.directory = directory
        self.client = client
        self.env = dict(os.environ)
        # The tests read the default (English) log at the default pace, and the demos
        # write without a token, as the README does.
        for name in PASSED_THROUGH:
            self.env.pop(name, None)
        if "BASE_IMAGE" not in self.env and self.has_image(LOCAL_BASE_IMAGE):
            self.env["BASE_IMAGE"] = LOCAL_BASE_IMAGE

    def has_image(self, name):
        try:
            self.client.images.get(name)
            return True
        except Exception:
            return False

    def sh(self, command, timeout=COMMAND_TIMEOUT, check=True):
        """Run one command line exactly as typed in a terminal (bash, in the stack directory)."""
        result = subprocess.run(["bash", "-c", command], cwd=self.directory, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"`{command}` exited {result.returncode}\n"
                                 f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        return result

    def timed(self, command, timeout=COMMAND_TIMEOUT):
        """Run a command line, return (result, seconds it took)."""
        started = time.monotonic()
        result = self.sh(command, timeout=timeout)
        return result, time.monotonic() - started

    def container(self, service):
        return self.client.containers.get(f"{PROJECT}-{service}-1")

    def health(self, service):
        """The Docker healthcheck status of a service: starting, healthy or unhealthy."""
        return self.container(service).attrs["State"].get("Health", {}).get("Status")

    def controller_log(self):
        """Everything the controller printed since its container was created."""
        return self.container("controller").logs().decode("utf-8", "replace")

    def running(self, node):
        """The names a node runs: its /app/nodes/<node>_running.txt, read inside the node."""
        container = self.container(node)
        container.reload()
        if container.status != "running":
            return None
        code, output = container.exec_run(["cat", f"/app/nodes/{node}_running.txt"])
        if code != 0:
            return []
        return [line.strip() for line in output.decode().splitlines() if line.strip()]

    def host_running(self, node):
        """The same file seen from the host (works when the node is stopped)."""
        path = self.directory / "nodes" / f"{node}_running.txt"
        if not path.exists():
            return []
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]

    def teardown(self):
        self.sh("docker compose down -v --remove-orphans --timeout 5", check=False)


def compose_down_any_previous_stack(env):
    """A leftover `pull-mode` project (another checkout, a crashed run) holds the names."""
    subprocess.run(["docker", "compose", "-p", PROJECT, "down", "-v", "--remove-orphans",
                    "--timeout", "5"], env=env, capture_output=True, timeout=COMMAND_TIMEOUT)
