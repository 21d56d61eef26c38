"""The console and the report page in a real browser (Debian's headless Chromium, driven by
playwright): what a person sees.  One browser and one console for the module, on Valkey only
(the HTTP tests run on both servers).  Screenshots go to $AGENTFLEET_SCREENSHOTS_DIR when set
(docs/screenshots/ holds the ones docs/console.md shows), else to a temporary folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from console_fleet import ConsoleProcess, populated

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.parametrize("server", ["valkey"], indirect=True)]

# Widths a person uses: a laptop, and a narrow window.  Nothing may widen the page.
NO_OVERFLOW = "() => document.documentElement.scrollWidth <= window.innerWidth"
# Cells whose text wrapped: taller than one line.
WRAPPED_CELLS = """() => [...document.querySelectorAll('td')].filter(td => {
  const lh = parseFloat(getComputedStyle(td).lineHeight) || 20;
  const pad = parseFloat(getComputedStyle(td).paddingTop) + parseFloat(getComputedStyle(td).paddingBottom);
  return td.getBoundingClientRect().height - pad > lh * 1.5;
}).map(td => td.textContent)"""


@pytest.fixture(scope="module")
def browser(site):
    # After `site`: playwright's sync API keeps an event loop running in this thread, and
    # filling the server takes asyncio.run.
    playwright = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian's chromium is not installed: `make test` installs it")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def site(server, tmp_path_factory):
    data = populated(server.url)
    home = tmp_path_factory.mktemp("console-browser")
    console = ConsoleProcess(server.url, home)
    yield data, console, home
    console.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    where = os.environ.get("AGENTFLEET_SCREENSHOTS_DIR")
    path = Path(where) if where else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _login(page, url: str, key: str) -> None:
    page.goto(url + "/login")
    page.fill("#key", key)
    page.click("button[type=submit]")
    page.wait_for_load_state()


def _check_layout(page, width: int) -> None:
    page.set_viewport_size({"width": width, "height": 900})
    assert page.evaluate(NO_OVERFLOW), f"the page is wider than a {width}px window"
    assert page.evaluate(WRAPPED_CELLS) == []


def test_console_pages_as_an_admin_sees_them(browser, site, shots):
    data, console, _ = site
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(console.url + "/")
    assert page.url.startswith(console.url + "/login")  # not logged in: the login page
    page.fill("#key", data.admin_key + "x")
    page.click("button[type=submit]")
    assert "unknown, revoked or malformed" in page.inner_text("main")
    page.screenshot(path=shots / "login.png")
    _login(page, console.url, data.admin_key)
    assert page.inner_text("h1") == "Models and lanes"
    assert "tenant ops (admin)" in page.inner_text("header")
    first = page.locator("table").first.inner_text()
    assert "m1" in first and "m2" in first
    _check_layout(page, 1280)
    page.screenshot(path=shots / "models.png", full_page=True)
    _check_layout(page, 700)  # the tables scroll inside their box

    page.set_viewport_size({"width": 1280, "height": 900})
    page.click("nav >> text=Batches")
    assert page.inner_text("h1") == "Batches"
    assert data.acme_batch in page.inner_text("main") and "40 / 40" in page.inner_text("main")
    _check_layout(page, 1280)
    page.screenshot(path=shots / "batches.png", full_page=True)
    page.click(f"text={data.acme_batch}")
    assert page.inner_text("h1") == f"Batch {data.acme_batch}"
    with page.expect_download() as download:
        page.click("text=Output file")
    assert len(Path(download.value.path()).read_text().splitlines()) == data.acme_batch_ok
    page.screenshot(path=shots / "batch.png", full_page=True)

    page.click("nav >> text=Dead letters")
    assert page.inner_text("h1") == "Dead letters"
    assert data.dead["acme"] in page.inner_text("main")
    _check_layout(page, 1280)
    page.screenshot(path=shots / "dead-letters.png", full_page=True)
    page.click(f"text={data.dead['acme']}")
    assert "attempts_exhausted" in page.inner_text("main")
    assert page.locator("button.danger").inner_text() == "Replay: queue the task again"
    page.screenshot(path=shots / "dead-letter.png", full_page=True)
    page.click("text=Its trace")
    assert page.inner_text("h1") == "Trace"

    page.click("nav >> text=Trace")
    page.fill("input[name=id]", data.acme_chain)
    page.click("main button")
    assert page.locator("svg.chart rect").count() >= 4  # the timeline's segments
    assert "4 task(s), 4 finished" in page.inner_text("main")
    _check_layout(page, 1280)
    page.screenshot(path=shots / "trace.png", full_page=True)

    page.click("nav >> text=Report")
    page.select_option("select[name=since]", "1h")
    page.click("main form button")
    assert page.locator("svg.chart").count() >= 6 * 2  # six plots per model
    slo = page.locator("#slos table").inner_text()
    assert "availability" in slo and "within the job's window" in slo
    _check_layout(page, 1280)
    page.screenshot(path=shots / "report.png", full_page=True)
    page.locator("#errors a").first.click()  # an error's example: its trace
    assert page.inner_text("h1") == "Trace" and "failed" in page.inner_text("main")
    page.close()


def test_a_read_key_cannot_replay_and_sees_its_tenant_only(browser, site):
    data, console, _ = site
    page = browser.new_page()
    _login(page, console.url, data.acme_key)
    page.goto(f"{console.url}/dead-letters/m1/{data.dead['acme']}")
    assert "Replaying takes an admin key" in page.inner_text("main")
    assert page.locator("button.danger").count() == 0
    refused = page.request.post(f"{console.url}/dead-letters/m1/{data.dead['acme']}/replay",
                                form={"csrf": "x"})
    assert refused.status == 403
    page.goto(console.url + "/dead-letters")
    assert data.dead["globex"] not in page.inner_text("main")
    page.goto(console.url + "/batches")
    assert data.globex_batch not in page.inner_text("main")
    page.close()


def test_the_mailed_report_in_light_and_dark(browser, site, server, shots):
    _, _, home = site
    path = home / "report.html"
    env = {**os.environ, "REDIS_URL": server.url, "AGENTFLEET_HOME": str(home),
           "AGENTFLEET_MODELS_FILE": str(home / "models.toml"),
           "AGENTFLEET_DEFAULT_MODEL": "m1"}
    made = subprocess.run([sys.executable, "-m", "agentfleet", "report", "--since", "1h",
                           "--html", str(path), "--price-per-gpu-hour", "3"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    for scheme in ("light", "dark"):
        page = browser.new_page(viewport={"width": 1100, "height": 900}, color_scheme=scheme)
        page.goto(path.as_uri())
        assert page.locator("svg.chart").count() >= 12
        assert page.locator("svg.chart polyline").count() > 0
        cards = page.inner_text(".cards")
        assert "tasks ended" in cards and "cost" in cards
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert (background == "rgb(255, 255, 255)") == (scheme == "light"), background
        _check_layout(page, 1100)
        page.screenshot(path=shots / f"report-file-{scheme}.png", full_page=True)
        page.close()
