"""The browser tier: the fleet page in Debian's chromium (headless, through chromedriver and
Selenium), against the real test server and real daemons. Run by scripts/browser-test, not by
scripts/test. The fixtures of tests/conftest.py (couch, admin, make_daemon) apply here too.

Screenshots go to build/browser-test/<server kind>/; with HIMBEERECOUCH_DOCS_SCREENSHOTS=1 the
fleet and Pi views are also saved as docs/fleet-page.png and docs/fleet-page-pi.png (README)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import requests

import support
from fleetsetup import ARTIFACTS, HEIGHT, WIDTH, make_fleet
from support import ADMIN

CHROMIUM = Path(os.environ.get("HIMBEERECOUCH_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("HIMBEERECOUCH_CHROMEDRIVER", "/usr/bin/chromedriver"))

# Never let Selenium look for (or download) a browser or driver of its own.
os.environ.setdefault("SE_OFFLINE", "true")
os.environ.setdefault("SE_AVOID_STATS", "true")


def pytest_configure(config):
    config.addinivalue_line("markers", "expect_blocked_scripts: the page's script is meant not to run")


def pytest_collection_modifyitems(config, items):
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    skip = pytest.mark.skip(reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (scripts/browser-test installs them)")
    for item in items:
        item.add_marker(skip)


@pytest.fixture
def browser(request):
    """A fresh headless chromium per test (no cookies carried over), 1280 px wide."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={WIDTH},{HEIGHT}", "--no-first-run", "--disable-extensions",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-default-apps", "--hide-scrollbars", "--lang=en-GB"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_window_size(WIDTH, HEIGHT)
    yield driver
    try:
        problems = page_errors(driver)
        if request.node.get_closest_marker("expect_blocked_scripts") is None:
            assert not problems, "the page logged errors:\n" + "\n".join(problems)
    finally:
        driver.quit()


def page_errors(driver) -> list[str]:
    """Console messages that mean the page is broken: a policy violation or an uncaught error.
    (Failed requests the page expects, such as a 404 for a missing output document, are not.)"""
    wrong = ("Content Security Policy", "Refused to", "Uncaught", "TypeError", "ReferenceError", "SyntaxError")
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and any(word in entry["message"] for word in wrong)]


@pytest.fixture
def fleet(couch):
    made, cleanup = make_fleet(couch)
    yield made
    cleanup()


@pytest.fixture
def status_fleet(couch):
    made, cleanup = make_fleet(couch, status=True)
    yield made
    cleanup()


@pytest.fixture(scope="session", autouse=True)
def fresh_artifacts():
    """Screenshots of this run only (of this server kind: the other one's stay)."""
    shutil.rmtree(ARTIFACTS / support.server_kind(), ignore_errors=True)
    yield


@pytest.fixture
def attachment_csp(couch):
    """Set [csp] attachments_header_value for one test (None: CouchDB's default, sandbox) and put
    back what was there."""
    url = f"{couch.url}/_node/_local/_config/csp/attachments_header_value"
    before = requests.get(url, auth=ADMIN, timeout=10)
    old = before.json() if before.status_code == 200 else None

    def put(value: str | None) -> None:
        if value is None:
            requests.delete(url, auth=ADMIN, timeout=10)
        else:
            assert requests.put(url, json=value, auth=ADMIN, timeout=10).status_code == 200

    yield put
    put(old)
