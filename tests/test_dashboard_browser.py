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

import os
import secrets
import shutil
import time
from pathlib import Path

import pytest

from sshd_nodes import SSHD, Controller, SshdCluster

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


def unavailable(reason):
    """A missing tool: a failure in CI (CI=true), a skip on a developer's machine."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def wait_until(predicate, timeout=WAIT, interval=0.05, message="condition"):
    """Return the first truthy predicate() within `timeout` seconds, or fail saying what was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (StaleElementReferenceException, NoSuchElementException):
            value = None  # the page redrew under us, or has not drawn it yet: ask again
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


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
  containers[row.dataset.container] = {status: row.dataset.status, node: row.dataset.node};
const intruders = [...document.querySelectorAll('#containers tr[data-intruder]')].map(r => r.dataset.intruder);
const ticks = [...document.querySelectorAll('#ticks [data-tick]')].map(t => ({
  number: +t.dataset.tick, mode: t.dataset.mode, converged: t.dataset.converged === 'true',
  steps: [...t.querySelectorAll('[data-step]')].map(s => +s.dataset.step)}));
const loop = one('#loop').dataset;
return {nodes, containers, intruders, ticks, paused: loop.paused === 'true', tick_count: +loop.tickCount,
        countdown: one('#countdown').textContent,
        error: one('#error').hidden ? null : one('#error-text').textContent,
        mode: one('#auth').dataset.mode,
        asking_token: one('#token-form').hidden ? null : one('#token-reason').textContent};
"""


class Page:
    """The dashboard in the browser: clicks, typing, and snapshots of what it shows."""

    def __init__(self, driver, url):
        self.driver = driver
        self.url = url

    def open(self):
        self.driver.get(self.url)
        wait_until(lambda: self.snapshot()["ticks"], message="the page to show a tick")
        return self

    def snapshot(self):
        return self.driver.execute_script(SNAPSHOT_JS)

    def wait_for(self, predicate, message, timeout=WAIT):
        """Wait until predicate(snapshot) is true; return that snapshot."""
        def check():
            snapshot = self.snapshot()
            return snapshot if predicate(snapshot) else None
        return wait_until(check, timeout, message=message)

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
                   message=f"a clickable {css}")

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
    return wait_until(all_running, message=f"{names} running")


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
    wait_until(running, message="web running on the page")
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


def test_dead_node_turns_down_and_its_containers_move(page, ctl, cluster):
    placed = add_running(ctl, "api", "db", "cache")
    victim = placed["api"]
    moved = [name for name, node in placed.items() if node == victim]

    cluster[victim].kill()  # like `docker stop`
    page.wait_for(lambda s: not s["nodes"][victim]["up"], f"{victim} down")
    snapshot = page.wait_for(
        lambda s: all(s["containers"][n]["node"] != victim and s["containers"][n]["status"] == "running"
                      for n in moved), f"{moved} running elsewhere")
    assert all(snapshot["nodes"][victim]["chips"][n] == "stale" for n in moved)
    page.screenshot("node-down")

    # Back with its old file: what it still lists now runs elsewhere, a zombie to stop.
    # Paused, then one step: the page keeps that tick's observation until resume
    # (a running loop checks its work 0.3 s later, quicker than the page polls).
    assert ctl.post("/api/loop/pause")[0] == 200
    cluster[victim].start()
    assert ctl.post("/api/loop/step")[0] == 200
    page.wait_for(lambda s: s["nodes"][victim]["up"] and "zombie" in s["nodes"][victim]["chips"].values(),
                  f"zombies on {victim}")
    page.screenshot("zombie")
    assert ctl.post("/api/loop/resume")[0] == 200
    page.wait_for(lambda s: s["nodes"][victim]["up"] and "zombie" not in s["nodes"][victim]["chips"].values(),
                  f"the zombies on {victim} stopped")


def test_delete_button_stops_the_container(page, ctl, cluster):
    add_running(ctl, "doomed")
    page.click('button[data-delete="doomed"]')
    page.wait_for(lambda s: "doomed" not in s["containers"], "doomed gone from the containers")
    wait_until(lambda: "doomed" not in cluster.placements(), message="doomed gone from every node")


def test_pause_then_one_step_runs_exactly_one_tick(page, ctl):
    page.click("#btn-pause")
    # Paused, and the tick that may have been running has finished and is shown.
    snapshot = page.wait_for(lambda s: s["paused"] and s["ticks"][0]["number"] == s["tick_count"],
                             "the loop paused, its last tick shown")
    count = snapshot["tick_count"]
    assert snapshot["countdown"] == "timer off"

    page.add("late")  # while paused, an API change does not tick either
    time.sleep(2.5 * TICK_SECONDS)
    snapshot = page.snapshot()
    assert snapshot["tick_count"] == count == ctl.get("/api/loop")[1]["tick_count"]
    assert snapshot["containers"]["late"]["status"] == "unscheduled"
    page.screenshot("paused")

    page.click("#btn-step")
    snapshot = page.wait_for(lambda s: s["ticks"][0]["number"] == count + 1, "the stepped tick shown")
    assert snapshot["ticks"][0]["mode"] == "step" and snapshot["paused"]
    time.sleep(2.5 * TICK_SECONDS)
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
                   message="the last tick finished")
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
