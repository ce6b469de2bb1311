"""Setting up what the browser tests look at: a fleet database made by setup-db with the page,
its users; and screenshots."""
from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
import requests

from himbeerecouch import page

import support
from support import AdminClient, wait_for
from test_operator import add_user, forget_users, hc

ARTIFACTS = support.ROOT / "build" / "browser-test"
DOCS = support.ROOT / "docs"
WIDTH, HEIGHT = 1280, 860


@dataclass
class Fleet:
    """A database set up by setup-db (with the page), a deployer and a viewer, and its URL."""
    couch: object
    admin: AdminClient
    deployer: tuple[str, str]
    viewer: tuple[str, str]
    status_db: str | None = None

    @property
    def page_url(self) -> str:
        """The page in the code database (members only: works once logged in)."""
        return page.page_url(self.couch.url, self.admin.db)

    @property
    def login_url(self) -> str:
        """The page in the login database (public): where an operator starts."""
        return page.page_url(self.couch.url, page.login_database(self.admin.db))

    def heartbeat_db(self) -> AdminClient:
        return AdminClient(self.couch.url, self.status_db) if self.status_db else self.admin


def wait_for_login(couch, name: str, password: str) -> None:
    # CouchDB learns a new user from its _users feed (auth cache): a moment after the write.
    wait_for(lambda: requests.get(f"{couch.url}/_session", auth=(name, password), timeout=10)
             .json().get("userCtx", {}).get("name") == name, message=f"the new user {name} to be accepted")


def setup_db(couch, database: str, *options: str) -> None:
    extra = ["--page-csp"] if couch.kind == "couchdb" else []
    result = hc("setup-db", "--database", database, *extra, *options, couch=couch)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stderr, result.stderr


def make_fleet(couch, status: bool = False):
    # A slash in the name, as nedm/raspberries: the page must find its database through %2F.
    name = f"fleet_{uuid.uuid4().hex[:10]}/pis"
    status_db = name + "_status" if status else None
    setup_db(couch, name, *(["--status-database", status_db] if status_db else []))
    suffix = uuid.uuid4().hex[:6]
    deployer = (f"dora-{suffix}", "deploy-secret")
    viewer = (f"victor-{suffix}", "view-secret")
    for (user, password), role in ((deployer, "deployer"), (viewer, "viewer")):
        options = ["--role", role] + (["--status-database", status_db] if status_db else [])
        made = add_user(couch, name, user, *options, password=password)
        assert made.returncode == 0, made.stderr
    for user, password in (deployer, viewer):
        wait_for_login(couch, user, password)
    fleet = Fleet(couch, AdminClient(couch.url, name), deployer, viewer, status_db)
    def cleanup() -> None:
        forget_users(couch, deployer[0], viewer[0])
        for each in (name, page.login_database(name), status_db):
            if each:
                AdminClient(couch.url, each).drop_db()
    return fleet, cleanup


def shots_dir(couch) -> Path:
    folder = ARTIFACTS / couch.kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def screenshot(driver, couch, name: str, docs_name: str | None = None) -> Path:
    """A screenshot of the whole page, 1280 px wide, as an artifact (and for README when asked)."""
    height = driver.execute_script("return Math.max(document.documentElement.scrollHeight, 400)")
    driver.set_window_size(WIDTH, min(int(height) + 20, 2400))
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.2)                                   # one frame for the new size
    path = shots_dir(couch) / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(WIDTH, HEIGHT)
    if docs_name and os.environ.get("HIMBEERECOUCH_DOCS_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(path, DOCS / docs_name)
    return path
