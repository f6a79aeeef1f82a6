"""The classroom page (GET /) in a real browser: headless Chromium, the real controller, real sshd nodes.

What a class sees is checked the way a class sees it: the page is driven by clicks and
typing only, and read through the stable ids and data attributes of dashboard.html
(data-node, data-up, data-diff, data-container, data-status, data-tick...). The nodes
are three local `sshd` (tests/sshd_nodes.py); killing one is a real SIGKILL.

Browser: Debian's `chromium` driven by Debian's `chromium-driver` through selenium, with
explicit paths, so no tool ever downloads a browser. Missing browser, driver, selenium
or sshd: the tests skip on a developer's machine and FAIL in CI (CI=true).

Screenshots go to tests/artifacts/ (one per test, plus the interesting moments).
UPDATE_SCREENSHOT=1 also writes docs/dashboard.png, the README's picture.
"""

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import time
from pathlib import Path

import pytest

from sshd_nodes import SSHD, Controller, SshdCluster
from sshd_nodes import wait_until as shared_wait_until

try:
    from selenium import webdriver
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
except ImportError as error:
    webdriver = None
    SELENIUM_MISSING = f"selenium is not installed ({error}): pip install -r tests/requirements.txt"

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
README_SCREENSHOT = REPO_ROOT / "docs" / "dashboard.png"

TICK_SECONDS = 2  # long enough to see "pending" between the tick that starts and the one that observes
SSH_TIMEOUT = 1.5
WAIT = 20         # generous: assert behaviour, not speed
VIEWPORT = {"width": 1280, "height": 800}  # a common projector resolution
# axe-core, from npm (tests/run installs it there); injected into the page by the audit.
AXE_JS = Path(os.environ.get("AXE_JS", REPO_ROOT / "tests" / ".axe" / "node_modules" / "axe-core" / "axe.min.js"))


def unavailable(reason):
    """A missing tool: a failure in CI (CI=true), a skip on a developer's machine."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def wait_until(predicate, timeout=WAIT, interval=0.05, what="the condition"):
    """The suite's wait_until; a page that redrew under us, or has not drawn it yet, is "not yet"."""
    return shared_wait_until(predicate, timeout, interval, what=what,
                             ignoring=(StaleElementReferenceException, NoSuchElementException))


# What the page shows, read from its data attributes in one round trip.
SNAPSHOT_JS = """
const one = (selector) => document.querySelector(selector);
const nodes = {};
for (const card of document.querySelectorAll('#nodes .node')) {
  const chips = {};
  for (const chip of card.querySelectorAll('.chip')) chips[chip.querySelector('span').textContent] = chip.dataset.diff;
  nodes[card.dataset.node] = {up: card.dataset.up === 'true', chips: chips,
                              handshakes: +card.querySelector('[data-handshakes]').dataset.handshakes};
}
const containers = {};
for (const row of document.querySelectorAll('#containers tr[data-container]'))
  containers[row.dataset.container] = {status: row.dataset.status, node: row.dataset.node,
                                       also_on: row.dataset.alsoOn ? row.dataset.alsoOn.split(' ') : []};
const intruders = [...document.querySelectorAll('#containers tr[data-intruder]')].map(r => r.dataset.intruder);
const ticks = [...document.querySelectorAll('#ticks [data-tick]')].map(t => ({
  number: +t.dataset.tick, mode: t.dataset.mode, converged: t.dataset.converged === 'true',
  waiting: t.dataset.waiting === 'true', verdict: t.querySelector('.verdict').textContent,
  verdict_color: getComputedStyle(t.querySelector('.verdict')).color,
  steps: [...t.querySelectorAll('[data-step]')].map(s => +s.dataset.step)}));
const loop = one('#loop').dataset;
return {nodes, containers, intruders, ticks, paused: loop.paused === 'true', tick_count: +loop.tickCount,
        countdown: one('#countdown').textContent,
        error: one('#error').hidden ? null : one('#error-text').textContent,
        offline: one('#offline').hidden ? null : one('#offline').textContent,
        mode: one('#auth').dataset.mode,
        asking_token: one('#token-form').hidden ? null : one('#token-reason').textContent};
"""

# The newest tick's explanations ("why"), drawn from its structured decisions.
WHY_JS = """
const tick = document.querySelector('#ticks [data-tick]');
const why = {cleanup: {}, schedule: {}, reconcile: {}};
for (const li of tick.querySelectorAll('[data-cleanup]'))
  why.cleanup[li.dataset.cleanup] = {why: li.dataset.why, text: li.textContent};
for (const li of tick.querySelectorAll('[data-schedule]'))
  why.schedule[li.dataset.schedule] = {node: li.dataset.node, text: li.textContent,
                                       loads: JSON.parse(li.querySelector('[data-loads]').dataset.loads)};
for (const li of tick.querySelectorAll('[data-reconcile]')) why.reconcile[li.dataset.reconcile] = li.textContent;
return why;
"""


class Page:
    """The dashboard in the browser: clicks, typing, and snapshots of what it shows."""

    def __init__(self, driver, url):
        self.driver = driver
        self.url = url

    def open(self):
        self.driver.get(self.url)
        wait_until(lambda: self.snapshot()["ticks"], what="the page to show a tick")
        return self

    def snapshot(self):
        return self.driver.execute_script(SNAPSHOT_JS)

    def wait_for(self, predicate, message, timeout=WAIT):
        """Wait until predicate(snapshot) is true; return that snapshot."""
        def check():
            snapshot = self.snapshot()
            return snapshot if predicate(snapshot) else None
        return wait_until(check, timeout, what=message)

    def add(self, name):
        field = self.driver.find_element(By.ID, "add-name")
        field.clear()
        field.send_keys(name)
        self.driver.find_element(By.ID, "add-button").click()

    def enter_token(self, token):
        field = self.driver.find_element(By.ID, "token-input")
        field.clear()
        field.send_keys(token)
        self.driver.find_element(By.ID, "token-submit").click()

    def click(self, css):
        wait_until(lambda: self.driver.find_element(By.CSS_SELECTOR, css).click() or True,
                   what=f"a clickable {css}")

    def screenshot(self, name):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"dashboard-{name}.png"
        self.driver.save_screenshot(str(path))
        return path


def status_of(name):
    return lambda s: s["containers"].get(name, {}).get("status")


# ----------------------------------------------------------------------------
# Fixtures: one browser, three nodes and one controller for the module
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    """Headless Debian Chromium, with a throwaway profile and nothing phoning home."""
    if webdriver is None:
        unavailable(SELENIUM_MISSING)
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            unavailable(f"{path} not found: apt-get install -y {package}")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except WebDriverException as error:
        unavailable(f"chromium did not start: {error.msg}")
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {**VIEWPORT, "deviceScaleFactor": 1, "mobile": False})
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not (os.path.exists(SSHD) and shutil.which("ssh-keygen") and os.getuid() == 0):
        unavailable("needs root and OpenSSH (apt-get install -y openssh-server)")
    with SshdCluster(3, base_dir=tmp_path_factory.mktemp("cluster")) as nodes:
        yield nodes


@pytest.fixture(scope="module")
def ctl(cluster, tmp_path_factory):
    controller = Controller(cluster, tick_seconds=TICK_SECONDS, ssh_timeout=SSH_TIMEOUT,
                            work_dir=tmp_path_factory.mktemp("controller"))
    with controller:
        yield controller
    print(f"==== controller log ====\n{controller.log()}")
    assert not any("Traceback" in line for line in controller.lines + controller.stderr_lines), \
        "\n".join(controller.stderr_lines)


@pytest.fixture
def page(driver, ctl, request):
    """The page, opened fresh; a screenshot of it at the end of every test, passed or failed.
    A JavaScript error in the browser's console fails the test."""
    driver.get_log("browser")  # forget what earlier tests logged
    yield Page(driver, ctl.base_url + "/").open()
    Page(driver, None).screenshot(request.node.name.removeprefix("test_"))
    errors = [entry["message"] for entry in driver.get_log("browser") if entry["source"] == "javascript"]
    assert not errors, errors


def add_running(ctl, *names):
    """Declare containers through the API and wait until they run; return {name: node}."""
    for name in names:
        assert ctl.post("/api/containers", {"name": name})[0] == 201
    def all_running():
        listing = {c["name"]: c for c in ctl.get("/api/containers")[1]}
        return all(listing[n]["status"] == "running" for n in names) and {n: listing[n]["node"] for n in names}
    return wait_until(all_running, what=f"{names} running")


# ----------------------------------------------------------------------------
# The tests, in the order of a lesson
# ----------------------------------------------------------------------------

def test_page_shows_the_nodes_the_loop_and_the_five_steps(page):
    snapshot = page.wait_for(lambda s: all(n["up"] for n in s["nodes"].values()), "three nodes up")
    assert sorted(snapshot["nodes"]) == ["node-1", "node-2", "node-3"]
    assert all(n["handshakes"] >= 1 for n in snapshot["nodes"].values())
    assert not snapshot["paused"]
    assert snapshot["mode"] == "open"  # no API_TOKEN: anyone may write
    assert snapshot["ticks"][0]["steps"] == [1, 2, 3, 4, 5]
    page.wait_for(lambda s: s["countdown"].startswith("next tick in"), "a countdown to the next tick")


def test_container_added_from_the_form_goes_running(page, cluster):
    page.add("web")
    seen = []  # every status the page showed for web, in order
    def running():
        status = status_of("web")(page.snapshot())
        if status and (not seen or seen[-1] != status):
            seen.append(status)
        return status == "running"
    wait_until(running, what="web running on the page")
    # pending lasts about 0.3 s now (the requeue checks a START at once): the page,
    # polling twice a second, may or may not catch it, but never goes backwards.
    order = ["unscheduled", "pending", "running"]
    assert seen == sorted(seen, key=order.index) and seen[-1] == "running", seen
    snapshot = page.snapshot()
    node = snapshot["containers"]["web"]["node"]
    assert snapshot["nodes"][node]["chips"] == {"web": "running"}
    assert cluster[node].running == ["web"]
    assert page.driver.find_element(By.ID, "add-name").get_attribute("value") == ""
    assert snapshot["error"] is None


@pytest.mark.parametrize("name, expected_status", [("Bad_Name!", 400), ("taken", 409)])
def test_bad_input_shows_the_api_error_on_the_page(page, ctl, name, expected_status):
    if expected_status == 409:
        ctl.post("/api/containers", {"name": name})
    status, body = ctl.post("/api/containers", {"name": name})  # what curl gets
    assert status == expected_status
    page.add(name)
    exists = expected_status == 409
    snapshot = page.wait_for(lambda s: s["error"] and (name in s["containers"]) == exists,
                             "an error on the page")
    assert body["error"] in snapshot["error"] and str(expected_status) in snapshot["error"]
    page.screenshot(f"error-{expected_status}")


def test_intruder_is_highlighted_then_stopped(page, ctl, cluster):
    # Paused, then one step: the tick that sees the intruder stops it, and the page
    # keeps showing that observation until the loop resumes (a running loop checks
    # its work 0.3 s later, quicker than the page polls).
    assert ctl.post("/api/loop/pause")[0] == 200
    garbage = '<img src=x onerror="window.pwned=1">'
    with open(cluster["node-1"].state_file, "a") as file:
        file.write(f"intruder\n{garbage}\n")
    assert ctl.post("/api/loop/step")[0] == 200
    snapshot = page.wait_for(lambda s: s["nodes"]["node-1"]["chips"].get("intruder") == "intruder",
                             "the intruder flagged on node-1")
    assert ctl.post("/api/loop/resume")[0] == 200
    assert snapshot["nodes"]["node-1"]["chips"].get(garbage) == "intruder"  # shown as text
    assert "intruder" in snapshot["intruders"]
    page.screenshot("intruder")
    page.wait_for(lambda s: not set(s["nodes"]["node-1"]["chips"]) & {"intruder", garbage},
                  "the intruder gone from node-1")
    assert "intruder" not in cluster["node-1"].running
    assert page.driver.execute_script("return window.pwned") is None  # never run as HTML


def test_dead_node_turns_down_its_containers_move_and_each_step_says_why(page, ctl, cluster):
    # One step at a time, paused in between, so each tick stays on the page to be read
    # (running, the loop checks its work 0.3 s later, quicker than the page polls).
    placed = add_running(ctl, "api", "db", "cache")
    victim = placed["api"]
    moved = sorted(name for name, node in placed.items() if node == victim)
    assert ctl.post("/api/loop/pause")[0] == 200
    count = page.wait_for(lambda s: s["paused"] and s["ticks"][0]["number"] == s["tick_count"],
                          "the loop paused, its last tick shown")["tick_count"]

    cluster[victim].kill()  # like `docker stop`
    page.click("#btn-step")
    snapshot = page.wait_for(lambda s: s["ticks"][0]["number"] == count + 1, "the tick that sees the node down")
    assert not snapshot["nodes"][victim]["up"]
    why = page.driver.execute_script(WHY_JS)
    # Step 3 says why each container lost its node, from the tick's decisions.
    assert sorted(why["cleanup"]) == moved, why
    for name in moved:
        assert why["cleanup"][name]["why"] == "down"
        assert f"{name} left {victim}: no answer since" in why["cleanup"][name]["text"]
        assert "no grace period" in why["cleanup"][name]["text"]
    # Step 4 shows the load of each live node when it placed each one: the least loaded won.
    assert sorted(why["schedule"]) == moved, why
    for name in moved:
        placement = why["schedule"][name]
        assert victim not in placement["loads"] and len(placement["loads"]) == 2, placement
        assert placement["loads"][placement["node"]] == min(placement["loads"].values())
        assert all(f"{node}: {load}" in placement["text"] for node, load in placement["loads"].items())
    # Step 5 shows, per node that acted, what should run and what ran.
    targets = {why["schedule"][name]["node"] for name in moved}
    assert targets <= set(why["reconcile"]), why
    for node in targets:
        assert "should run: " in why["reconcile"][node] and "ran: " in why["reconcile"][node]
    page.screenshot("node-down-why")

    page.click("#btn-step")  # the next observation sees them where they went
    snapshot = page.wait_for(
        lambda s: s["ticks"][0]["number"] == count + 2 and all(
            s["containers"][n]["node"] != victim and s["containers"][n]["status"] == "running" for n in moved),
        f"{moved} running elsewhere")
    # A killed node still listed them when last seen: from here, it may be only cut off.
    assert all(snapshot["nodes"][victim]["chips"][n] == "stale" for n in moved)
    assert all(snapshot["containers"][n]["also_on"] == [victim] for n in moved), snapshot["containers"]
    page.screenshot("node-down")

    # Back with its old file: what it still lists now runs elsewhere, a zombie to stop.
    cluster[victim].start()
    page.click("#btn-step")
    page.wait_for(lambda s: s["ticks"][0]["number"] == count + 3 and s["nodes"][victim]["up"]
                  and all(s["nodes"][victim]["chips"].get(n) == "zombie" for n in moved), f"zombies on {victim}")
    page.screenshot("zombie")
    page.click("#btn-resume")
    page.wait_for(lambda s: s["nodes"][victim]["up"] and "zombie" not in s["nodes"][victim]["chips"].values(),
                  f"the zombies on {victim} stopped")


def test_delete_button_stops_the_container(page, ctl, cluster):
    add_running(ctl, "doomed")
    page.click('button[data-delete="doomed"]')
    page.wait_for(lambda s: "doomed" not in s["containers"], "doomed gone from the containers")
    wait_until(lambda: "doomed" not in cluster.placements(), what="doomed gone from every node")


def test_pause_then_one_step_runs_exactly_one_tick(page, ctl):
    page.click("#btn-pause")
    # Paused, and the tick that may have been running has finished and is shown.
    snapshot = page.wait_for(lambda s: s["paused"] and s["ticks"][0]["number"] == s["tick_count"],
                             "the loop paused, its last tick shown")
    count = snapshot["tick_count"]
    assert snapshot["countdown"] == "timer off"

    page.add("late")  # while paused, an API change does not tick either
    ctl.wait_quiet(2.5 * TICK_SECONDS)
    snapshot = page.snapshot()
    assert snapshot["tick_count"] == count == ctl.get("/api/loop")[1]["tick_count"]
    assert snapshot["containers"]["late"]["status"] == "unscheduled"
    page.screenshot("paused")

    page.click("#btn-step")
    snapshot = page.wait_for(lambda s: s["ticks"][0]["number"] == count + 1, "the stepped tick shown")
    assert snapshot["ticks"][0]["mode"] == "step" and snapshot["paused"]
    ctl.wait_quiet(2.5 * TICK_SECONDS)
    snapshot = page.snapshot()
    assert snapshot["tick_count"] == count + 1 == ctl.get("/api/loop")[1]["tick_count"]
    assert snapshot["containers"]["late"]["status"] == "pending"  # scheduled by the step, not yet observed
    page.screenshot("stepped")


def test_resume_restarts_the_timer(page, ctl):
    ctl.post("/api/loop/pause")
    page.wait_for(lambda s: s["paused"], "paused")
    count = page.snapshot()["tick_count"]
    page.click("#btn-resume")
    page.wait_for(lambda s: not s["paused"] and s["countdown"].startswith(("next tick in", "ticking")),
                  "running with a countdown")
    page.wait_for(lambda s: s["tick_count"] >= count + 2, "two more ticks on the timer")
    assert not ctl.get("/api/loop")[1]["paused"]


def test_lively_screenshot_for_the_readme(driver, tmp_path):
    """A state worth a picture: six containers, an intruder being stopped, node-2 just
    died and its containers moving. Paused after one step, so the picture is exactly that tick."""
    with SshdCluster(3, base_dir=tmp_path / "cluster") as cluster, \
            Controller(cluster, tick_seconds=TICK_SECONDS, ssh_timeout=SSH_TIMEOUT, work_dir=tmp_path) as ctl:
        add_running(ctl, "web", "api", "db", "cache", "queue", "auth")
        ctl.post("/api/loop/pause")
        wait_until(lambda: ctl.get("/api/state")[1]["ticks"][-1]["number"] == ctl.get("/api/loop")[1]["tick_count"],
                   what="the last tick finished")
        with open(cluster["node-1"].state_file, "a") as file:
            file.write("intruder\n")
        cluster["node-2"].kill()
        page = Page(driver, ctl.base_url + "/").open()
        count = page.snapshot()["tick_count"]
        page.click("#btn-step")
        page.wait_for(lambda s: s["ticks"][0]["number"] == count + 1 and not s["nodes"]["node-2"]["up"],
                      "the step that sees node-2 down")
        time.sleep(1)  # let the "since" durations read a round second
        path = page.screenshot("lively")
        if os.environ.get("UPDATE_SCREENSHOT") == "1":
            README_SCREENSHOT.parent.mkdir(exist_ok=True)
            shutil.copyfile(path, README_SCREENSHOT)


def test_with_a_token_the_page_asks_for_it_on_a_401_then_writes(driver, tmp_path):
    """API_TOKEN set: the page reads freely, a control answers 401, the page asks for the
    token (a wrong one is refused), then the same write goes through and later ones too."""
    token = secrets.token_hex(16)
    with SshdCluster(3, base_dir=tmp_path / "cluster") as cluster, \
            Controller(cluster, tick_seconds=TICK_SECONDS, ssh_timeout=SSH_TIMEOUT, work_dir=tmp_path,
                       env={"API_TOKEN": token}) as ctl:
        driver.get_log("browser")  # forget what earlier tests logged
        page = Page(driver, ctl.base_url + "/").open()
        snapshot = page.wait_for(lambda s: s["mode"] == "read-only", "the page in read-only mode")
        assert snapshot["asking_token"] is None and snapshot["nodes"]  # reading needs no token

        page.add("web")
        snapshot = page.wait_for(lambda s: s["asking_token"], "the page asking for the token")
        assert "401" in snapshot["asking_token"]
        assert '"Authorization: Bearer <token>"' in snapshot["asking_token"]
        assert page.driver.find_element(By.ID, "token-input").get_attribute("type") == "password"
        assert ctl.get("/api/containers") == (200, [])  # the 401 wrote nothing
        page.screenshot("token-asked")

        page.enter_token("not-the-token")
        page.wait_for(lambda s: s["asking_token"] and s["asking_token"].startswith(
            "POST /api/containers → 401: wrong token"), "asked again after a wrong token")
        assert ctl.get("/api/containers") == (200, [])

        page.enter_token(token)
        page.wait_for(lambda s: status_of("web")(s) == "running", "web, added with the token, running")
        snapshot = page.snapshot()
        assert snapshot["mode"] == "write" and snapshot["asking_token"] is None and snapshot["error"] is None
        assert page.driver.find_element(By.ID, "add-name").get_attribute("value") == ""
        assert cluster[snapshot["containers"]["web"]["node"]].running == ["web"]

        # Asked once: the next controls write at once, the token kept for the tab, shown nowhere.
        page.click("#btn-pause")
        page.wait_for(lambda s: s["paused"], "the loop paused from the page")
        assert ctl.get("/api/loop")[1]["paused"] is True
        page.click('button[data-delete="web"]')
        page.wait_for(lambda s: "web" not in s["containers"], "web deleted from the page")
        assert page.snapshot()["asking_token"] is None
        assert page.driver.execute_script("return sessionStorage.getItem('pull-mode-api-token')") == token
        assert token not in page.driver.current_url
        assert token not in page.driver.find_element(By.TAG_NAME, "body").text
        page.screenshot("token-allowed")

        page.click('#auth[data-mode="write"]')  # forget the token: read-only, as a student's tab is
        page.wait_for(lambda s: s["mode"] == "read-only", "read-only again after forgetting the token")
        page.click("#btn-resume")
        page.wait_for(lambda s: s["asking_token"], "asked again once the token is forgotten")
        assert ctl.get("/api/loop")[1]["paused"] is True
        page.click("#token-cancel")
        snapshot = page.wait_for(lambda s: s["error"], "the 401 shown as an error after cancel")
        assert "401" in snapshot["error"] and snapshot["asking_token"] is None

    assert token not in ctl.log() + "\n".join(ctl.stderr_lines)
    errors = [entry["message"] for entry in driver.get_log("browser") if entry["source"] == "javascript"]
    assert not errors, errors


# ----------------------------------------------------------------------------
# On a projector, with a keyboard: focus, selection, a hung controller, its errors
# ----------------------------------------------------------------------------

def wait_for_new_ticks(page, count=2):
    """Wait until the page has drawn `count` more ticks: that many redraws at least."""
    first = page.snapshot()["ticks"][0]["number"]
    page.wait_for(lambda s: s["ticks"][0]["number"] >= first + count, f"{count} more ticks drawn")


def test_typing_focus_and_selection_survive_the_redraws(page, ctl):
    add_running(ctl, "focus-me")
    driver = page.driver
    field = driver.find_element(By.ID, "add-name")
    field.click()
    field.send_keys("half-typ")
    wait_for_new_ticks(page)
    assert driver.execute_script("return document.activeElement.id") == "add-name"
    assert field.get_attribute("value") == "half-typ"
    field.clear()

    # Tab to a delete button: it keeps the keyboard's focus while ticks come and go.
    driver.execute_script("document.querySelector('button[data-delete=\"focus-me\"]').focus()")
    wait_for_new_ticks(page)
    assert driver.execute_script("return document.activeElement.dataset.delete") == "focus-me"

    # Text a student selected on the page stays selected.
    selected = driver.execute_script("""
        const heading = document.querySelector('#nodes [data-node="node-1"] h3');
        const range = document.createRange();
        range.selectNodeContents(heading.firstChild);
        getSelection().removeAllRanges();
        getSelection().addRange(range);
        return getSelection().toString();""")
    assert selected == "node-1"
    wait_for_new_ticks(page)
    assert driver.execute_script("return getSelection().toString()") == "node-1"


def test_a_hung_controller_shows_the_unreachable_banner(page, ctl):
    """SIGSTOP: what `docker pause` does. The connection is accepted, no answer ever comes."""
    page.wait_for(lambda s: s["offline"] is None, "the page online")
    ctl.proc.send_signal(signal.SIGSTOP)
    try:
        snapshot = page.wait_for(lambda s: s["offline"], "the unreachable banner")
        assert "Controller unreachable" in snapshot["offline"] and "no answer within 3 s" in snapshot["offline"]
        page.wait_for(lambda s: s["countdown"] == "no answer", "the countdown saying so")
        page.screenshot("hung")
    finally:
        ctl.proc.send_signal(signal.SIGCONT)
    page.wait_for(lambda s: s["offline"] is None, "the banner gone once the controller answers again")


def test_a_500_shows_the_controllers_error_text(page, ctl):
    """desired_state.txt made a directory: GET /api/state answers 500 with a JSON error."""
    assert ctl.post("/api/loop/pause")[0] == 200  # no tick touches the file meanwhile
    kept = ctl.desired_state_file.with_name("desired_state.kept")
    ctl.desired_state_file.rename(kept)
    try:
        ctl.desired_state_file.mkdir()
        status, body = ctl.get("/api/state")
        assert status == 500 and body["error"].startswith("internal error: ")
        snapshot = page.wait_for(lambda s: s["offline"], "the page saying what went wrong")
        assert "GET /api/state → 500: internal error: " in snapshot["offline"]
        assert body["error"] in snapshot["offline"]
    finally:
        ctl.desired_state_file.rmdir()
        kept.rename(ctl.desired_state_file)
    page.wait_for(lambda s: s["offline"] is None, "the page back")
    assert ctl.post("/api/loop/resume")[0] == 200


# ----------------------------------------------------------------------------
# Accessibility and the 1024x768 projector
# ----------------------------------------------------------------------------

OVERFLOW_JS = """
const html = document.documentElement;
const overflowing = [];
for (const box of document.querySelectorAll('main > section, .chip, .chip > *, .node, .step, .pill, .status, td, #loop, .controls > *')) {
  if (getComputedStyle(box).display === 'inline') continue;  // an inline box has no width of its own
  if (box.scrollWidth > box.clientWidth + 1) overflowing.push(box.className + ': ' + box.textContent);
}
return {scroll: html.scrollWidth, client: html.clientWidth, overflowing};
"""


def set_viewport(driver, width, height):
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})


def run_axe(driver):
    """axe-core's violations on the page as it is now: [{id, impact, help, nodes}]."""
    driver.execute_script(AXE_JS.read_text(encoding="utf-8"))
    driver.set_script_timeout(60)
    result = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        axe.run(document, {resultTypes: ['violations']})
           .then((r) => done(r.violations.map((v) => ({id: v.id, impact: v.impact, help: v.help,
                                                       nodes: v.nodes.map((n) => n.target.join(' '))}))))
           .catch((e) => done({error: String(e)}));""")
    assert not isinstance(result, dict), result
    return result


@pytest.fixture
def node_down_paused(page, ctl, cluster):
    """The busiest page: the fullest node down after one step (stale chips, explanations), loop paused."""
    declared = {c["name"] for c in ctl.get("/api/containers")[1]}
    missing = sorted({"alpha", "beta", "gamma", "delta", "epsilon",
                      "a-very-long-container-name-for-the-projector"} - declared)
    if missing:
        add_running(ctl, *missing)
    assert ctl.post("/api/loop/pause")[0] == 200
    count = page.wait_for(lambda s: s["paused"] and s["ticks"][0]["number"] == s["tick_count"],
                          "the loop paused, its last tick shown")["tick_count"]
    nodes = [c["node"] for c in ctl.get("/api/containers")[1]]
    victim = max(sorted(set(nodes)), key=nodes.count)
    cluster[victim].kill()
    page.click("#btn-step")
    page.wait_for(lambda s: s["ticks"][0]["number"] == count + 1 and not s["nodes"][victim]["up"],
                  f"{victim} down after one step")
    yield page
    set_viewport(page.driver, **VIEWPORT)
    cluster[victim].start()
    assert ctl.post("/api/loop/resume")[0] == 200
    page.wait_for(lambda s: s["nodes"][victim]["up"], f"{victim} back")


@pytest.mark.parametrize("width, height", [(1024, 768), (1920, 1080)])
def test_accessibility_audit_finds_nothing_serious(node_down_paused, width, height):
    if not AXE_JS.is_file():
        unavailable(f"{AXE_JS} not found: npm install --prefix tests/.axe axe-core (tests/run does it)")
    driver = node_down_paused.driver
    set_viewport(driver, width, height)
    wait_until(lambda: driver.execute_script("return window.innerWidth") == width, what=f"a {width} px window")
    violations = run_axe(driver)
    print(json.dumps(violations, indent=1))
    node_down_paused.screenshot(f"axe-{width}x{height}")
    serious = [v for v in violations if v["impact"] in ("serious", "critical")]
    assert not serious, json.dumps(serious, indent=1)


@pytest.mark.parametrize("width, height", [(1024, 768), (1280, 800)])
def test_fits_a_projector_without_sideways_scrolling(node_down_paused, width, height):
    driver = node_down_paused.driver
    set_viewport(driver, width, height)
    wait_until(lambda: driver.execute_script("return window.innerWidth") == width, what=f"a {width} px window")
    chips = driver.execute_script("return document.querySelectorAll('#nodes .chip').length")
    assert chips >= 6, "the page should hold chips to measure"
    sizes = driver.execute_script(OVERFLOW_JS)
    node_down_paused.screenshot(f"{width}x{height}")
    assert width - 20 <= sizes["client"] <= width, sizes  # less a vertical scroll bar, if any
    assert sizes["scroll"] <= sizes["client"], sizes
    assert not sizes["overflowing"], sizes["overflowing"]


# ----------------------------------------------------------------------------
# The failure model: a grace period, on the page
# ----------------------------------------------------------------------------

@contextlib.contextmanager
def own_stack(tmp_path, **controller_options):
    """Three fresh nodes and a controller of their own, for settings the module's lacks."""
    with SshdCluster(3, base_dir=tmp_path / "cluster") as cluster, \
            Controller(cluster, **{"tick_seconds": TICK_SECONDS, "ssh_timeout": SSH_TIMEOUT, "work_dir": tmp_path,
                                   **controller_options}) as ctl:
        yield cluster, ctl
    assert not any("Traceback" in line for line in ctl.lines + ctl.stderr_lines), "\n".join(ctl.stderr_lines)


def eviction_seconds(driver, node):
    text = driver.execute_script(
        f"const e = document.querySelector('[data-node=\"{node}\"] [data-eviction-at]'); return e && e.textContent")
    match = re.search(r"eviction in (\d+) s", text or "")
    return match and int(match.group(1))


def test_grace_period_counts_down_and_a_node_back_in_time_moved_nothing(driver, tmp_path):
    grace = 10
    with own_stack(tmp_path, tick_seconds=1, env={"NODE_GRACE_SECONDS": grace}) as (cluster, ctl):
        placed = add_running(ctl, "app1", "app2", "app3")
        victim = placed["app1"]
        driver.get_log("browser")
        page = Page(driver, ctl.base_url + "/").open()
        mark = ctl.mark()

        cluster[victim].kill()
        first = wait_until(lambda: eviction_seconds(driver, victim), what=f"a countdown on {victim}")
        assert first <= grace
        snapshot = page.snapshot()
        assert snapshot["containers"]["app1"]["status"] == "unknown"
        assert snapshot["containers"]["app1"]["node"] == victim
        row = driver.find_element(By.CSS_SELECTOR, '#containers tr[data-container="app1"]').text
        assert f"{victim} does not answer: eviction in" in row
        wait_until(lambda: (eviction_seconds(driver, victim) or first) < first, what="the countdown going down")
        # The newest tick does not say "Converged": it says what it waits for, in amber.
        newest = page.wait_for(lambda s: s["ticks"] and s["ticks"][0]["waiting"],
                               "a waiting tick on the page")["ticks"][0]
        assert newest["verdict"].startswith(f"⏳ Waiting: {victim} silent") and not newest["converged"]
        assert newest["verdict_color"] == "rgb(138, 90, 0)", newest  # --wait (#8a5a00), not ✅'s green
        page.screenshot("grace")

        cluster[victim].start()
        page.wait_for(lambda s: s["nodes"][victim]["up"], f"{victim} up again")
        ctl.wait_ticks(2)  # two complete ticks after it answered again
        # Nothing moved: no cleanup, no placement, each container once, where it was.
        assert not ctl.find_lines("CLEANUP:|SCHEDULE:", after=mark), ctl.tail()
        assert ctl.find_lines(rf"{victim}: unavailable for \d+ s, eviction in", after=mark)
        listing = {c["name"]: c for c in ctl.get("/api/containers")[1]}
        assert {name: c["node"] for name, c in listing.items()} == placed
        assert all(c["status"] == "running" for c in listing.values())
        assert cluster.placements() == {name: [node] for name, node in placed.items()}
        assert eviction_seconds(driver, victim) is None  # the countdown gone with the silence
        errors = [entry["message"] for entry in driver.get_log("browser") if entry["source"] == "javascript"]
        assert not errors, errors


# ----------------------------------------------------------------------------
# The controller's language and clock
# ----------------------------------------------------------------------------

CONTROLLER_TZ = "XST-5:30"          # POSIX: 5 h 30 east of UTC, no tz database needed
BROWSER_TZ = "America/Los_Angeles"  # 13 h or so away: the two clocks never agree


@pytest.fixture(scope="module")
def french_ctl(tmp_path_factory):
    with own_stack(tmp_path_factory.mktemp("fr"), log_lang="fr", env={"TZ": CONTROLLER_TZ}) as (_, ctl):
        yield ctl


def test_french_log_makes_a_french_page(driver, french_ctl):
    page = Page(driver, french_ctl.base_url + "/").open()
    wait_until(lambda: driver.execute_script("return document.documentElement.lang") == "fr",
               what='<html lang="fr">')
    text = lambda css: driver.find_element(By.CSS_SELECTOR, css).text
    page.wait_for(lambda s: s["countdown"].startswith("prochain tick dans"), "a French countdown")
    assert text("#loop-badge") == "● en marche"
    assert text("#btn-step") == "⏭ Un pas" and text("#btn-resume") == "▶ Reprendre"
    assert text("#nodes-title").startswith("NOEUDS")  # h2 is upper-cased by CSS
    assert text('label[for="add-name"]') == "Nouveau container"
    assert driver.title == "pull-mode · la boucle de contrôle"
    body = text("body")
    assert "disponible depuis" in body and "Derniers ticks".upper() in body
    for english in ("next tick", "running", "up since", "Last ticks", "handshake"):
        assert english not in body, english
    page.screenshot("french")


def test_times_are_on_the_controllers_clock_as_in_its_log(driver, french_ctl):
    driver.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": BROWSER_TZ})
    try:
        Page(driver, french_ctl.base_url + "/").open()
        shown = driver.execute_script("""
            const tick = document.querySelector('#ticks [data-tick]');
            const when = tick.querySelector('[data-started-at]');
            return {number: +tick.dataset.tick, text: when.textContent, started_at: +when.dataset.startedAt,
                    browser: new Date(+when.dataset.startedAt * 1000).toLocaleTimeString('en-GB'),
                    zone: Intl.DateTimeFormat().resolvedOptions().timeZone};""")
        assert shown["zone"] == BROWSER_TZ
        ticks = french_ctl.find_lines(r"^TICK - \d\d:\d\d:\d\d")
        logged = re.search(r"\d\d:\d\d:\d\d", ticks[shown["number"] - 1][1]).group()
        assert shown["text"].startswith(logged + " · "), (shown, logged)
        assert shown["browser"] != logged  # the browser's own clock would have said something else
    finally:
        driver.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": ""})
