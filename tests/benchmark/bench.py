#!/usr/bin/env python3
"""Benchmark: how fast the controller reacts, and what a tick costs, from 3 to 50 nodes.

Starts real local `sshd` nodes (tests/sshd_nodes.py) and the real controller process
(`python app_controller.py`), and measures, for N nodes x M declared containers:

  * the steady tick: duration (median, p95, from GET /api/state), controller CPU per tick
    (/proc/<pid>/stat over a window of ticks), SSH handshakes per tick (the controller's
    counter in GET /api/nodes, and sshd's "Accepted publickey" log lines), RSS;
  * POST-to-running: from the POST until the name is in a node's file;
  * failover: from killing a node's sshd until its containers are in other nodes' files;
  * zombie cleanup: from the node answering again until its stale lines are gone;
  * a hung node (SIGSTOP'd sshd): the ticks while it hangs, and a POST meanwhile.

For contrast, a "naive" controller (the seed's simple design: a new SSH connection per
command, nodes one after another) runs against the same nodes in the same run; it lives
here, not in app_controller.py.

    .venv/bin/python tests/benchmark/bench.py                 # full run, about 10 minutes
    .venv/bin/python tests/benchmark/bench.py --quick         # 3 and 10 nodes, about 90 s
    .venv/bin/python tests/benchmark/bench.py --profile 3:1000  # py-spy: where the CPU goes

Results go to tests/benchmark/results/ (results.md, results.json, plot.png).
Needs root (sshd), OpenSSH, and tests/benchmark/requirements.txt (matplotlib for the plot,
py-spy for --profile). Not collected by pytest (no test_ prefix).
"""

import argparse
import json
import logging
import os
import platform
import random
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import paramiko

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from sshd_nodes import VERDICT, Controller, SshdCluster, generate_keys, wait_until  # noqa: E402

# The controller's settings during the run. One second keeps the runs short and is
# the integration tests' value; SSH_TIMEOUT differs from it so the hung-node cost shows.
TICK_SECONDS = 1.0
SSH_TIMEOUT = 2.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

FULL = {
    "nodes": [3, 10, 30, 50],
    "containers": [10, 100, 1000],
    # The latency measurements cost ~1 minute each: one size per node count.
    "latency_at": [(3, 10), (10, 100), (30, 100), (50, 1000)],
    "steady_ticks": 12, "naive_ticks": 4, "posts": 10, "failovers": 3,
}
QUICK = {
    "nodes": [3, 10],
    "containers": [10, 100],
    "latency_at": [(3, 10)],
    "steady_ticks": 5, "naive_ticks": 2, "posts": 5, "failovers": 1,
}

TARGETS = {
    "tick_3x10_ms": 50, "tick_50x1000_ms": 500, "handshakes_per_tick": 0,
    "post_median_3_s": 0.5, "failover_s": TICK_SECONDS + 1, "zombie_s": TICK_SECONDS + 1,
    "hung_extra_s": SSH_TIMEOUT + 0.5, "rss_50_mb": 100,
}


# ----------------------------------------------------------------------------
# Small measuring tools
# ----------------------------------------------------------------------------

def cpu_seconds(pid):
    """User + system CPU time of a process so far (fields 14 and 15 of /proc/pid/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_mb(pid):
    """(current RSS, peak RSS) of a process, in MB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(value.split()[0]) / 1024
    return values.get("VmRSS"), values.get("VmHWM")


def percentile(values, p):
    """Linear-interpolated percentile (p in 0..100) of a non-empty list."""
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    low = int(k)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (k - low)


def summary(values):
    if not values:
        return None
    return {"n": len(values), "median": statistics.median(values), "p95": percentile(values, 95),
            "min": min(values), "max": max(values)}


def accepted_logins(cluster):
    """SSH logins so far, counted in every node's sshd log ("Accepted publickey for ...")."""
    total = 0
    for node in cluster:
        try:
            total += node.log_path.read_text(errors="replace").count("Accepted publickey")
        except FileNotFoundError:
            pass
    return total


def load_average():
    return [round(x, 2) for x in os.getloadavg()]


class NodeFiles:
    """Reads the nodes' state files fast: a file is re-read only when its stat changes."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.cache = {}

    def lines(self, node):
        path = node.state_file
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return []
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self.cache.get(path)
        if cached and cached[0] == key:
            return cached[1]
        lines = path.read_text(errors="replace").splitlines()
        self.cache[path] = (key, lines)
        return lines

    def where(self, skip=()):
        """{container: [nodes whose file lists it]}, skipping the nodes named in `skip`."""
        found = {}
        for node in self.cluster:
            if node.name in skip:
                continue
            for name in self.lines(node):
                found.setdefault(name, []).append(node.name)
        return found


def seconds_until(predicate, timeout, interval=0.005):
    """The seconds until predicate() holds (the suite's wait_until), or None if it never
    did within `timeout`: the benchmark records the miss and goes on."""
    t0 = time.monotonic()
    try:
        wait_until(predicate, timeout, interval)
    except AssertionError:
        return None
    return time.monotonic() - t0


def read_desired(path):
    desired = {}
    for line in Path(path).read_text().splitlines():
        code = line.partition("#")[0].strip()
        if code:
            name, _, node = code.partition(":")
            desired[name] = node or None
    return desired


def is_converged(cluster, desired_file, files, skip=()):
    """Every declared container runs exactly once, on its node, and nothing else runs."""
    desired = read_desired(desired_file)
    for node in cluster:
        if node.name in skip:
            continue
        wanted = sorted(name for name, assigned in desired.items() if assigned == node.name)
        if sorted(files.lines(node)) != wanted:
            return False
    return all(node is not None for node in desired.values())


# ----------------------------------------------------------------------------
# Nodes
# ----------------------------------------------------------------------------

def start_cluster(count, base_dir, keys_dir, neutral_home):
    """`count` sshd nodes that log each login; with neutral_home, the remote shell gets an
    empty HOME, so root's ~/.bashrc (pyenv init) does not run on every command."""
    # skip_bashrc=False: the harness's own trick (SHLVL=1) would hide root's ~/.bashrc
    # from the 'root HOME' measurement; here HOME alone decides.
    cluster = SshdCluster(count, base_dir=base_dir, keys_dir=keys_dir, skip_bashrc=False)
    home = Path(base_dir) / "home"
    home.mkdir(exist_ok=True)
    # sshd keeps the first value it reads for a keyword: put ours first.
    overrides = "LogLevel INFO\n" + (f"SetEnv HOME={home}\n" if neutral_home else "")
    for node in cluster:
        node.config.write_text(overrides + node.config.read_text())
    return cluster.start()


def declare(cluster, desired_file, count):
    """Declare `count` containers, spread as the scheduler would (round-robin from empty),
    and write the nodes' files so that the cluster starts converged."""
    nodes = list(cluster.nodes)
    placement = {f"c{i:04d}": nodes[i % len(nodes)] for i in range(count)}
    Path(desired_file).write_text(
        "# benchmark: declared and already placed\n"
        + "".join(f"{name}:{node}\n" for name, node in placement.items()))
    for node in cluster:
        node.state_file.write_text(
            "".join(f"{name}\n" for name, where in placement.items() if where == node.name))
    return placement


# ----------------------------------------------------------------------------
# The naive controller: the seed's simple design, for contrast
# ----------------------------------------------------------------------------

class NaiveController:
    """The seed's loop as first written: every SSH command opens (and closes) its own
    connection, and the nodes are visited one after another. Same five steps, same files."""

    def __init__(self, cluster, desired_file):
        self.cluster = cluster
        self.desired_file = desired_file and Path(desired_file)
        self.handshakes = 0

    def ssh(self, node, command):
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        try:
            client.connect(node.host, port=node.port, username=self.cluster.user,
                           key_filename=str(self.cluster.client_key), look_for_keys=False,
                           allow_agent=False, timeout=SSH_TIMEOUT, banner_timeout=SSH_TIMEOUT,
                           auth_timeout=SSH_TIMEOUT, channel_timeout=SSH_TIMEOUT)
            self.handshakes += 1
            _, stdout, _ = client.exec_command(command, timeout=SSH_TIMEOUT)
            output = stdout.read().decode()
            stdout.channel.recv_exit_status()
            return output
        finally:
            client.close()

    def tick(self):
        nodes = list(self.cluster)
        # 1. observe, one node after another
        current, live = {}, []
        for node in nodes:
            try:
                path = shlex.quote(str(node.state_file))
                current[node.name] = self.ssh(node, f"cat {path} 2>/dev/null || true").split()
                live.append(node.name)
            except Exception:
                pass
        # 2. desired
        desired = read_desired(self.desired_file)
        before = dict(desired)
        # 3. cleanup
        for name, node in desired.items():
            if node not in live:
                desired[name] = None
        # 4. schedule: the least loaded live node
        load = {node: 0 for node in live}
        for node in desired.values():
            if node in load:
                load[node] += 1
        for name, node in desired.items():
            if node is None and live:
                desired[name] = min(live, key=load.get)
                load[desired[name]] += 1
        if desired != before:
            self.desired_file.write_text("".join(f"{n}:{d}\n" for n, d in desired.items() if d))
        # 5. reconcile: one SSH connection per action
        for node in nodes:
            if node.name not in live:
                continue
            path = shlex.quote(str(node.state_file))
            wanted = [name for name, where in desired.items() if where == node.name]
            for name in set(current[node.name]) - set(wanted):
                self.ssh(node, f"sed -i '/^{name}$/d' {path}")
            for name in set(wanted) - set(current[node.name]):
                self.ssh(node, f"echo {name} >> {path}")


def measure_naive(cluster, desired_file, ticks):
    naive = NaiveController(cluster, desired_file)
    naive.tick()  # warm-up (imports, key loading)
    durations, cpu = [], []
    handshakes0, accepted0 = naive.handshakes, accepted_logins(cluster)
    for _ in range(ticks):
        c0, t0 = time.process_time(), time.perf_counter()
        naive.tick()
        durations.append(1000 * (time.perf_counter() - t0))
        cpu.append(1000 * (time.process_time() - c0))
    return {
        "tick_ms": summary(durations),
        "cpu_ms_per_tick": statistics.mean(cpu),
        "handshakes_per_tick": (naive.handshakes - handshakes0) / ticks,
        "accepted_per_tick": (accepted_logins(cluster) - accepted0) / ticks,
    }


def measure_naive_hung(cluster, desired_file, node):
    """One naive tick with `node` frozen: every node after it waits behind it."""
    naive = NaiveController(cluster, desired_file)
    node.hang()
    try:
        t0 = time.perf_counter()
        naive.tick()
        return 1000 * (time.perf_counter() - t0)
    finally:
        node.unhang()


# ----------------------------------------------------------------------------
# The real controller
# ----------------------------------------------------------------------------

def ticks_since(ctl, since):
    """Finished ticks (from GET /api/state) that started at or after `since` (epoch s)."""
    status, state = ctl.get("/api/state", timeout=30)
    if status != 200:
        raise RuntimeError(f"GET /api/state: {status}")
    return [tick for tick in state["ticks"] if tick["started_at"] >= since]


def handshakes(ctl):
    status, nodes = ctl.get("/api/nodes", timeout=30)
    return sum(node.get("handshakes", 0) for node in nodes)


def measure_steady(ctl, cluster, ticks):
    """Tick duration, CPU, handshakes and logins over `ticks` steady ticks."""
    ctl.wait_ticks(2, timeout=60)  # connections open, first ticks done
    pid = ctl.proc.pid
    handshakes0, accepted0 = handshakes(ctl), accepted_logins(cluster)
    mark = ctl.mark()
    ctl.wait_for_line(VERDICT, timeout=60, after=mark)  # start the window at a tick's end
    since, cpu0, mark = time.time(), cpu_seconds(pid), ctl.mark()
    last = ctl.wait_ticks(ticks, timeout=60 + 10 * ticks, after=mark)
    cpu1 = cpu_seconds(pid)
    counted = len(ctl.find_lines(VERDICT, after=mark, before=last + 1))
    accepted1 = accepted_logins(cluster)
    durations = [t["duration_ms"] for t in ticks_since(ctl, since)][:counted]
    rss, _ = memory_mb(pid)
    # The same process with the loop paused: what the open connections cost at rest
    # (paramiko's transport thread wakes every 0.1 s on each connection).
    ctl.post("/api/loop/pause")
    time.sleep(0.5)
    cpu2 = cpu_seconds(pid)
    time.sleep(3)
    idle_cpu_ms_per_s = 1000 * (cpu_seconds(pid) - cpu2) / 3
    ctl.post("/api/loop/resume")
    return {
        "idle_cpu_ms_per_s": idle_cpu_ms_per_s,
        "tick_ms": summary(durations),
        "cpu_ms_per_tick": 1000 * (cpu1 - cpu0) / counted,
        "handshakes_per_tick": (handshakes(ctl) - handshakes0) / counted,
        "accepted_per_tick": (accepted1 - accepted0) / counted,
        "converged": all(t["converged"] for t in ticks_since(ctl, since)),
        "rss_mb": rss,
    }


def measure_posts(ctl, cluster, count):
    """POST a new container; time until its name is in a node's file."""
    files, latencies = NodeFiles(cluster), []
    for k in range(count):
        time.sleep(random.uniform(0.2, 0.2 + TICK_SECONDS))  # land anywhere in the tick cycle
        name = f"post-{k}-{random.randrange(10**6)}"
        t0 = time.monotonic()
        status, body = ctl.post("/api/containers", {"name": name})
        if status != 201:
            raise RuntimeError(f"POST {name}: {status} {body}")
        seconds = seconds_until(lambda: name in files.where(), timeout=15)
        if seconds is not None:
            latencies.append(time.monotonic() - t0)
    return latencies


def measure_failover(ctl, cluster, desired_file, victim):
    """Kill a node's sshd: time until its containers run elsewhere. Restart it: time until
    its stale lines (zombies) are gone. Returns (failover s, zombie cleanup s, moved)."""
    files = NodeFiles(cluster)
    seconds_until(lambda: is_converged(cluster, desired_file, files), timeout=30, interval=0.05)
    time.sleep(random.uniform(0, TICK_SECONDS))
    moved = list(files.lines(victim))
    t0 = time.monotonic()
    victim.kill()
    failover = seconds_until(
        lambda: all(name in files.where(skip={victim.name}) for name in moved), timeout=30)
    time.sleep(random.uniform(0.5, 0.5 + TICK_SECONDS))
    victim.start()  # returns when the node answers its SSH banner again
    t1 = time.monotonic()
    zombies = seconds_until(lambda: not set(moved) & set(files.lines(victim)), timeout=30)
    zombie = zombies if zombies is not None else None
    return failover, zombie, len(moved), t1 - t0


def measure_hang(ctl, cluster, desired_file, victim, steady_ms):
    """Freeze a node's sshd (SIGSTOP): the ticks meanwhile, and a POST that the other
    nodes must still run. Then let it go on and time the cleanup of its zombies."""
    files = NodeFiles(cluster)
    seconds_until(lambda: is_converged(cluster, desired_file, files), timeout=30, interval=0.05)
    stale = list(files.lines(victim))
    since = time.time()
    victim.hang()
    try:
        time.sleep(0.3)
        name = f"during-hang-{random.randrange(10**6)}"
        t0 = time.monotonic()
        ctl.post("/api/containers", {"name": name})
        post = seconds_until(lambda: name in files.where(skip={victim.name}), timeout=30)
        moved = seconds_until(
            lambda: all(n in files.where(skip={victim.name}) for n in stale), timeout=30)
        moved = None if moved is None else moved + post
        # Let three whole ticks run while it still hangs.
        deadline = time.monotonic() + 4 * (TICK_SECONDS + SSH_TIMEOUT + 1)
        while time.monotonic() < deadline and len(ticks_since(ctl, since)) < 3:
            time.sleep(0.5)
        durations = [t["duration_ms"] for t in ticks_since(ctl, since)]
        converged = [t["converged"] for t in ticks_since(ctl, since)]
    finally:
        victim.unhang()
    t1 = time.monotonic()
    zombies = seconds_until(lambda: not set(stale) & set(files.lines(victim)), timeout=30)
    return {
        "tick_ms": durations,
        "extra_ms": [d - steady_ms for d in durations],
        "verdicts_converged": converged,
        "post_during_hang_s": post,
        "moved_off_hung_node_s": moved,
        "zombie_after_unhang_s": zombies,
        "seconds_hung": t1 - t0,
    }


# ----------------------------------------------------------------------------
# One size, and the whole run
# ----------------------------------------------------------------------------

def run_size(cluster, n, m, work_dir, plan, with_latency, log):
    result = {"nodes": n, "containers": m, "load_before": load_average()}
    desired_file = Path(work_dir) / "desired_state.txt"
    declare(cluster, desired_file, m)

    log(f"  naive: {plan['naive_ticks']} ticks")
    result["naive"] = measure_naive(cluster, desired_file, plan["naive_ticks"])
    if with_latency:
        result["naive"]["hung_tick_ms"] = measure_naive_hung(
            cluster, desired_file, cluster["node-1"])
    declare(cluster, desired_file, m)

    ctl = Controller(cluster, tick_seconds=TICK_SECONDS, ssh_timeout=SSH_TIMEOUT,
                     work_dir=work_dir, desired_state_file=desired_file, script=plan["script"])
    ctl.start(timeout=60)
    try:
        log(f"  controller: {plan['steady_ticks']} steady ticks")
        result["controller"] = steady = measure_steady(ctl, cluster, plan["steady_ticks"])
        if with_latency:
            log(f"  POST-to-running x{plan['posts']}")
            result["post_s"] = measure_posts(ctl, cluster, plan["posts"])
            failovers, zombies, moved, down = [], [], [], []
            victims = [f"node-{i}" for i in range(1, min(plan["failovers"], n - 1) + 1)]
            for victim in victims:
                log(f"  failover and zombies: kill and restart {victim}")
                f, z, count, seconds_down = measure_failover(ctl, cluster, desired_file,
                                                             cluster[victim])
                failovers.append(f)
                zombies.append(z)
                moved.append(count)
                down.append(seconds_down)
            result["failover_s"], result["zombie_s"] = failovers, zombies
            result["failover_moved"], result["seconds_down"] = moved, down
            log(f"  hung node-{n}")
            result["hang"] = measure_hang(ctl, cluster, desired_file, cluster[f"node-{n}"],
                                          steady["tick_ms"]["median"])
        result["controller"]["rss_peak_mb"] = memory_mb(ctl.proc.pid)[1]
        tracebacks = [line for line in ctl.lines + ctl.stderr_lines if "Traceback" in line]
        result["controller"]["tracebacks"] = len(tracebacks)
    finally:
        code, seconds = ctl.stop(timeout=5)
        result["controller_exit"] = {"code": code, "seconds": round(seconds, 2)}
        (Path(work_dir) / f"controller-{n}x{m}.log").write_text(ctl.log())
    result["load_after"] = load_average()
    return result


def timed_commands(client, command, count, gap):
    """Median ms of `command` on an open connection, `gap` seconds apart."""
    times = []
    for _ in range(count):
        time.sleep(gap)
        t0 = time.perf_counter()
        _, stdout, _ = client.exec_command(command, timeout=SSH_TIMEOUT)
        stdout.read()
        stdout.channel.recv_exit_status()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times[2:])


def shell_cost(base_dir, keys_dir):
    """What a remote command costs, and why: root's ~/.bashrc (pyenv init), a login, and
    Nagle's algorithm meeting delayed ACKs on commands sent back to back."""
    out = {}
    t0 = time.perf_counter()
    for _ in range(3):
        subprocess.run(["bash", "-c", ". ~/.bashrc"], capture_output=True)
    out["local_bashrc_source_ms"] = 1000 * (time.perf_counter() - t0) / 3
    for label, neutral in (("root_home", False), ("neutral_home", True)):
        cluster = start_cluster(1, Path(base_dir) / label, keys_dir, neutral)
        try:
            node = cluster["node-1"]
            naive = NaiveController(cluster, None)
            client = paramiko.SSHClient()
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            client.connect(node.host, port=node.port, username=cluster.user,
                           key_filename=str(cluster.client_key), look_for_keys=False,
                           allow_agent=False)
            _, stdout, _ = client.exec_command("echo ${PYENV_ROOT:-no}")
            row = {"bashrc_runs": stdout.read().decode().strip() != "no",
                   "command_ms": timed_commands(client, "true", 12, gap=0.2),
                   "back_to_back_ms": timed_commands(client, "true", 12, gap=0)}
            client.get_transport().sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            row["back_to_back_nodelay_ms"] = timed_commands(client, "true", 12, gap=0)
            row["command_nodelay_ms"] = timed_commands(client, "true", 12, gap=0.2)
            client.close()
            login = []
            for _ in range(10):
                t0 = time.perf_counter()
                naive.ssh(node, "true")
                login.append(1000 * (time.perf_counter() - t0))
            row["connect_and_command_ms"] = statistics.median(login)
            out[label] = row
        finally:
            cluster.close()
    out["bashrc_cost_ms"] = out["root_home"]["command_ms"] - out["neutral_home"]["command_ms"]
    return out


def profile_size(n, m, seconds, work, keys_dir, neutral_home, script, out_dir, log):
    """Sample the controller with py-spy during steady ticks at n nodes x m containers;
    write the functions where its CPU goes (own time and with callees) to profile-NxM.txt."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    cluster = start_cluster(n, work / f"profile{n}", keys_dir, neutral_home)
    desired_file = work / f"profile{n}" / "desired_state.txt"
    declare(cluster, desired_file, m)
    ctl = Controller(cluster, tick_seconds=TICK_SECONDS, ssh_timeout=SSH_TIMEOUT,
                     work_dir=work / f"profile{n}", desired_state_file=desired_file, script=script)
    raw = work / "profile.raw"
    try:
        ctl.start(timeout=60)
        ctl.wait_ticks(2, timeout=60)
        log(f"py-spy: {seconds} s of steady ticks at {n} nodes x {m} containers")
        mark = ctl.mark()
        # --gil: only the thread holding the GIL, i.e. Python actually running (a thread
        # blocked in recv() would otherwise look busy).
        subprocess.run([py_spy, "record", "--gil", "--rate", "250", "--format", "raw",
                        "--duration", str(seconds), "--pid", str(ctl.proc.pid),
                        "--output", str(raw)], check=True, capture_output=True)
        ticks = len(ctl.find_lines(VERDICT, after=mark))
    finally:
        ctl.stop(timeout=5)
        cluster.close()
    own, total, samples = {}, {}, 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [re.sub(r" \(.*/(site-packages|lib/python3[.0-9]*)/", " (", frame)
                  for frame in stack.split(";") if not frame.startswith(("process ", "thread "))]
        if not frames:
            continue
        count = int(count)
        samples += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + count
    lines = [f"py-spy record --gil --rate 250, {seconds} s, {ticks} ticks, "
             f"{n} nodes x {m} containers, {samples} samples holding the GIL "
             f"({samples / 250 / max(1, ticks) * 1000:.0f} ms of Python per tick)",
             "", "own time (the function itself):"]
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:25]:
        lines.append(f"  {100 * count / samples:5.1f}%  {frame}")
    lines += ["", "with callees:"]
    for frame, count in sorted(total.items(), key=lambda kv: -kv[1])[:40]:
        lines.append(f"  {100 * count / samples:5.1f}%  {frame}")
    path = Path(out_dir) / f"profile-{n}x{m}.txt"
    path.write_text("\n".join(lines) + "\n")
    log(f"profile written: {path}")


def machine():
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True)
    try:
        os_name = dict(line.rstrip().split("=", 1) for line in open("/etc/os-release")
                       if "=" in line)["PRETTY_NAME"].strip('"')
    except (OSError, KeyError):
        os_name = platform.platform()
    return {"cpu": cpu, "cores": os.cpu_count(), "os": os_name, "kernel": platform.release(),
            "python": platform.python_version(), "paramiko": paramiko.__version__,
            "openssh": (ssh.stderr or ssh.stdout).strip()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a small run (3 and 10 nodes, about 90 s)")
    parser.add_argument("--home", choices=("neutral", "root"), default="neutral",
                        help="the nodes' shell HOME: 'neutral' (an empty directory, the "
                             "default, so no rc file of root's can add to the figures) or "
                             "'root' (root's own, as on a real node)")
    parser.add_argument("--out", default=str(HERE / "results"), help="results directory")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--nodes", help="node counts to run, e.g. 3,50 (default: all)")
    parser.add_argument("--containers", help="container counts to run, e.g. 10,1000")
    parser.add_argument("--profile", metavar="N:M",
                        help="instead of the benchmark, profile the controller with py-spy "
                             "at N nodes x M containers (e.g. 50:1000)")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite results.md and plot.png from results.json")
    parser.add_argument("--script", default=str(HERE.parent.parent / "app_controller.py"),
                        help="the controller to measure (e.g. a patched copy)")
    args = parser.parse_args()
    # The naive mode's failed logins (a hung node) would print paramiko's tracebacks.
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    if args.render:
        report = json.loads((Path(args.out) / "results.json").read_text())
        write_markdown(report, Path(args.out) / "results.md")
        write_plot(report, Path(args.out) / "plot.png")
        return
    if os.getuid() != 0 or not shutil.which("ssh-keygen"):
        sys.exit("needs root and OpenSSH (apt-get install -y openssh-server)")
    plan = dict(QUICK if args.quick else FULL)
    for key in ("nodes", "containers"):
        if getattr(args, key):
            plan[key] = [int(x) for x in getattr(args, key).split(",")]
    plan["script"] = args.script
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pull-mode-bench-"))
    keys_dir = generate_keys(work / "keys")
    started = time.monotonic()

    def log(text):
        print(f"[{time.monotonic() - started:6.0f}s] {text}", flush=True)

    if args.profile:
        n, m = (int(x) for x in args.profile.split(":"))
        try:
            profile_size(n, m, 20, work, keys_dir, args.home == "neutral", args.script,
                         out_dir, log)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return

    report = {"machine": machine(), "quick": args.quick, "home": args.home,
              "script": args.script,
              "tick_seconds": TICK_SECONDS, "ssh_timeout": SSH_TIMEOUT, "targets": TARGETS,
              "load_start": load_average(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "sizes": []}
    try:
        log("cost of one remote command: root's HOME vs an empty HOME, Nagle")
        report["shell"] = shell_cost(work / "shell", keys_dir)
        for n in plan["nodes"]:
            log(f"starting {n} sshd nodes")
            cluster = start_cluster(n, work / f"n{n}", keys_dir, args.home == "neutral")
            try:
                for m in plan["containers"]:
                    with_latency = (n, m) in plan["latency_at"]
                    log(f"{n} nodes x {m} containers{' (with latencies)' if with_latency else ''}"
                        f", load {load_average()[0]}")
                    size_dir = work / f"n{n}" / f"m{m}"
                    size_dir.mkdir(parents=True, exist_ok=True)
                    try:
                        result = run_size(cluster, n, m, size_dir, plan, with_latency, log)
                    except Exception as error:  # one size failing must not lose the others
                        log(f"  FAILED: {error!r}")
                        result = {"nodes": n, "containers": m, "error": repr(error)}
                    report["sizes"].append(result)
                    for node in cluster:  # a failed size may leave a node down or hung
                        if node.hung:
                            node.unhang()
                        if not node.alive:
                            node.start()
            finally:
                cluster.close()
    finally:
        report["load_end"] = load_average()
        report["seconds"] = round(time.monotonic() - started)
        (out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work directory kept: {work}")
    write_markdown(report, out_dir / "results.md")
    try:
        write_plot(report, out_dir / "plot.png")
    except ImportError:
        log("matplotlib is missing: no plot (.venv/bin/pip install matplotlib)")
    log(f"done: {out_dir}/results.md, results.json, plot.png")
    print((out_dir / "results.md").read_text())


# ----------------------------------------------------------------------------
# Output: markdown and plot
# ----------------------------------------------------------------------------

def fmt(value, digits=0, unit=""):
    if value is None:
        return "–"
    return f"{value:.{digits}f}{unit}"


def med(values):
    values = [v for v in values or [] if v is not None]
    return statistics.median(values) if values else None


def targets_check(report):
    """[(target, measured, met)] for the issue's targets."""
    sizes = {(s["nodes"], s["containers"]): s for s in report["sizes"] if "error" not in s}
    rows = []

    def tick(n, m):
        size = sizes.get((n, m))
        return size and size["controller"]["tick_ms"] and size["controller"]["tick_ms"]["median"]

    for (n, m), key in (((3, 10), "tick_3x10_ms"), ((50, 1000), "tick_50x1000_ms")):
        value = tick(n, m)
        if value is not None:
            rows.append((f"steady tick ≤ {TARGETS[key]} ms at {n} × {m}",
                         f"{value:.0f} ms median", value <= TARGETS[key]))
    worst = max((s["controller"]["handshakes_per_tick"] for s in sizes.values()), default=None)
    if worst is not None:
        rows.append(("0 SSH handshakes per steady tick", f"{worst:g} (worst size)", worst == 0))
    posts = [v for (n, _), s in sizes.items() if n == 3 for v in s.get("post_s", [])]
    if posts:
        value = statistics.median(posts)
        rows.append((f"POST-to-running median ≤ {TARGETS['post_median_3_s']} s at 3 nodes",
                     f"{value:.2f} s", value <= TARGETS["post_median_3_s"]))
    for key, label, target in (("failover_s", "failover", "failover_s"),
                               ("zombie_s", "zombie cleanup", "zombie_s")):
        values = [v for s in sizes.values() for v in s.get(key, [])]
        if values:
            worst = max(v for v in values if v is not None) if any(values) else None
            ok = None not in values and worst <= TARGETS[target]
            rows.append((f"{label} ≤ tick + 1 s = {TARGETS[target]:g} s (every run)",
                         f"{med(values):.2f} s median, {fmt(worst, 2)} s worst", ok))
    extras = [e for s in sizes.values() if "hang" in s for e in s["hang"]["extra_ms"]]
    if extras:
        worst = max(extras) / 1000
        posts_ok = all(s["hang"]["post_during_hang_s"] is not None
                       for s in sizes.values() if "hang" in s)
        rows.append((f"hung node adds ≤ SSH_TIMEOUT + 0.5 s = {TARGETS['hung_extra_s']:g} s "
                     "to a tick, others converge",
                     f"+{worst:.2f} s worst; POST during hang "
                     f"{'ran' if posts_ok else 'did NOT run'} on a live node",
                     worst <= TARGETS["hung_extra_s"] and posts_ok))
    rss = [s["controller"]["rss_peak_mb"] for (n, _), s in sizes.items() if n == 50]
    if rss:
        rows.append((f"RSS ≤ {TARGETS['rss_50_mb']} MB at 50 nodes", f"{max(rss):.0f} MB peak",
                     max(rss) <= TARGETS["rss_50_mb"]))
    return rows


def write_markdown(report, path):
    m = report["machine"]
    lines = [
        "# pull-mode benchmark results",
        "",
        f"Measured {report['started']} on {m['os']}, kernel {m['kernel']}, {m['cores']} cores "
        f"({m['cpu']}), Python {m['python']}, paramiko {m['paramiko']}, {m['openssh']}; "
        f"real `sshd` nodes on 127.0.0.1 and the real controller process. "
        f"TICK_SECONDS={report['tick_seconds']:g}, SSH_TIMEOUT={report['ssh_timeout']:g}. "
        f"Remote shell HOME: {report['home']} "
        + ("(an empty directory, so root's ~/.bashrc, with its `pyenv init`, can never run)."
           if report["home"] == "neutral" else "(root's ~/.bashrc, `pyenv init` included, "
                                                "runs on every command)."),
        f"Load average (1, 5, 15 min): {report['load_start']} at the start, "
        f"{report['load_end']} at the end; run time {report['seconds']} s"
        + (" (--quick)." if report["quick"] else "."),
        "",
    ]
    if "shell" in report:
        p = report["shell"]
        r, e = p["root_home"], p["neutral_home"]
        lines += [
            "### One remote command",
            "",
            f"Sourcing root's ~/.bashrc (`pyenv init`) takes {p['local_bashrc_source_ms']:.0f} ms "
            f"locally, and the `bash -c` that sshd starts for a remote command "
            f"{'sources it too' if r['bashrc_runs'] else 'does **not** source it'}: `true` on an "
            f"open connection takes {r['command_ms']:.1f} ms with root's HOME and "
            f"{e['command_ms']:.1f} ms with an empty HOME ({p['bashrc_cost_ms']:+.1f} ms per "
            f"command). The nodes of this benchmark get an empty HOME, so the figures show the "
            f"controller, not this machine's shell set-up. A new connection plus the command "
            f"(the naive design) takes {e['connect_and_command_ms']:.0f} ms.",
            "",
            f"Commands sent back to back on one connection (as step 5 follows step 1) meet "
            f"Nagle's algorithm waiting for the peer's delayed ACK (paramiko leaves TCP_NODELAY "
            f"off): "
            f"{e['back_to_back_ms']:.1f} ms per command; with TCP_NODELAY "
            f"{e['back_to_back_nodelay_ms']:.1f} ms (spaced 0.2 s apart: {e['command_ms']:.1f} "
            f"ms, {e['command_nodelay_ms']:.1f} ms with TCP_NODELAY).",
            "",
        ]
    lines += [
        "## Steady state (converged, nothing to do)",
        "",
        "Tick: wall time of one tick (GET /api/state). CPU: controller process user+system "
        "time per tick (/proc); at rest: CPU per second with the loop paused and the "
        "connections open (paramiko's transport threads poll each socket every 0.1 s). "
        "Handshakes: the controller's counter (GET /api/nodes); logins: "
        "sshd's `Accepted publickey` lines. Naive: the seed's design (a new SSH connection per "
        "command, nodes one after another), run by the benchmark against the same nodes. Load: "
        "the 1-minute load average before the size (it counts the benchmark's own sshd and "
        "controller too; other test suites may have been running on the machine).",
        "",
        "| nodes | containers | tick median | tick p95 | CPU/tick | CPU at rest | handshakes/tick "
        "| logins/tick | RSS | naive tick median | naive CPU/tick | naive handshakes/tick "
        "| naive ÷ controller "
        "| load |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report["sizes"]:
        if "error" in s:
            lines.append(f"| {s['nodes']} | {s['containers']} | failed: {s['error']} |"
                         + " |" * 11)
            continue
        c, nv = s["controller"], s["naive"]
        ratio = nv["tick_ms"]["median"] / c["tick_ms"]["median"] if c["tick_ms"] else None
        lines.append(
            f"| {s['nodes']} | {s['containers']} | {fmt(c['tick_ms']['median'])} ms "
            f"| {fmt(c['tick_ms']['p95'])} ms | {fmt(c['cpu_ms_per_tick'])} ms "
            f"| {fmt(c.get('idle_cpu_ms_per_s'))} ms/s | {c['handshakes_per_tick']:g} "
            f"| {c['accepted_per_tick']:g} "
            f"| {fmt(c['rss_peak_mb'])} MB | {fmt(nv['tick_ms']['median'])} ms "
            f"| {fmt(nv['cpu_ms_per_tick'])} ms | {nv['handshakes_per_tick']:g} "
            f"| {fmt(ratio, 1)}× | {s['load_before'][0]} |")
    lat = [s for s in report["sizes"] if "post_s" in s]
    if lat:
        lines += [
            "",
            "## Reaction times",
            "",
            "POST: from the POST until the name is in a node's file. Failover: from killing a "
            "node's sshd (and its sessions) until all its containers are in other nodes' files. "
            "Zombies: from the restarted node answering its SSH banner until its stale lines "
            "are gone. Hung: a node's sshd SIGSTOP'd; the ticks that started while it hung, "
            "and a POST made meanwhile (run by a live node). Each event is started at a random "
            "point of the tick cycle.",
            "",
            "| nodes | containers | POST median | POST p95 | failover median (max) "
            "| zombies median (max) | steady tick | ticks while hung | POST while hung "
            "| naive tick, node-1 hung |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in lat:
            post = summary(s["post_s"]) or {}
            fo = [v for v in s["failover_s"] if v is not None]
            zo = [v for v in s["zombie_s"] if v is not None]
            hang = s["hang"]
            lines.append(
                f"| {s['nodes']} | {s['containers']} | {fmt(post.get('median'), 2)} s "
                f"| {fmt(post.get('p95'), 2)} s "
                f"| {fmt(med(fo), 2)} s ({fmt(max(fo) if fo else None, 2)} s) "
                f"| {fmt(med(zo), 2)} s ({fmt(max(zo) if zo else None, 2)} s) "
                f"| {fmt(s['controller']['tick_ms']['median'])} ms "
                f"| {', '.join(fmt(d) for d in hang['tick_ms'])} ms "
                f"| {fmt(hang['post_during_hang_s'], 2)} s "
                f"| {fmt(s['naive'].get('hung_tick_ms'))} ms |")
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|:-:|"]
    for target, measured, ok in targets_check(report):
        lines.append(f"| {target} | {measured} | {'yes' if ok else '**no**'} |")
    lines += ["", "![benchmark plot](plot.png)", ""]
    Path(path).write_text("\n".join(lines))


def write_plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s for s in report["sizes"] if "error" not in s]
    counts = sorted({s["containers"] for s in sizes})
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 5.2))
    colors = dict(zip(counts, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    for m in counts:
        row = sorted((s for s in sizes if s["containers"] == m), key=lambda s: s["nodes"])
        xs = [s["nodes"] for s in row]
        ax1.plot(xs, [s["controller"]["tick_ms"]["median"] for s in row], "o-",
                 color=colors[m], label=f"controller, {m} containers")
        ax1.plot(xs, [s["naive"]["tick_ms"]["median"] for s in row], "s--",
                 color=colors[m], alpha=0.6, label=f"naive, {m} containers")
        ax2.plot(xs, [s["controller"]["cpu_ms_per_tick"] for s in row], "o-",
                 color=colors[m], label=f"controller, {m}")
        ax2.plot(xs, [s["naive"]["cpu_ms_per_tick"] for s in row], "s--",
                 color=colors[m], alpha=0.6, label=f"naive, {m}")
    ax1.scatter([3, 50], [TARGETS["tick_3x10_ms"], TARGETS["tick_50x1000_ms"]], marker="*",
                s=180, color="black", zorder=5, label="targets (3×10, 50×1000)")
    for ax, title, unit in ((ax1, "Steady tick duration (median)", "ms"),
                            (ax2, "CPU per steady tick", "ms of CPU")):
        ax.set_yscale("log")
        ax.set_xlabel("nodes")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    lat = [s for s in sizes if "post_s" in s]
    labels = ["POST → running", "failover", "zombie cleanup", "hung node:\nadded to a tick"]
    width = 0.8 / max(1, len(lat))
    for k, s in enumerate(lat):
        values = [med(s["post_s"]), med(s["failover_s"]), med(s["zombie_s"]),
                  med([d / 1000 for d in s["hang"]["extra_ms"]])]
        xs = [i + (k - (len(lat) - 1) / 2) * width for i in range(len(labels))]
        ax3.bar(xs, [v or 0 for v in values], width, label=f"{s['nodes']} × {s['containers']}")
    limits = [TARGETS["post_median_3_s"], TARGETS["failover_s"], TARGETS["zombie_s"],
              TARGETS["hung_extra_s"]]
    for i, limit in enumerate(limits):
        ax3.hlines(limit, i - 0.45, i + 0.45, colors="black", linestyles=":")
    ax3.set_xticks(range(len(labels)), labels)
    ax3.set_ylabel("seconds (median)")
    ax3.set_title(f"Reaction times (tick {report['tick_seconds']:g} s, "
                  f"SSH_TIMEOUT {report['ssh_timeout']:g} s; dotted: targets)")
    ax3.legend(fontsize=7, title="nodes × containers", title_fontsize=7, loc="upper left")
    ax3.grid(True, axis="y", alpha=0.3)
    m = report["machine"]
    fig.suptitle(f"pull-mode: controller vs naive (new SSH connection per command, sequential) "
                 f"— {m['cores']} cores, {m['os']}, load {report['load_start'][0]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
