"""The fleet page as setup-db installs it: the design document's attachments and settings, kept
beside the validation function, updated only when they change; the server's CSP for it.
(What the page does in a browser: tests/browser/, scripts/browser-test.)"""
from __future__ import annotations

import base64
import uuid

import pytest
import requests

from himbeerecouch import __version__, page, pagecsp, security
from support import ADMIN, AdminClient
from test_operator import hc

DESIGN = security.DESIGN_DOC_ID


# ---- without a server ------------------------------------------------------------------------

def test_the_design_document_carries_the_files_inline_with_their_types():
    files = page.page_files()
    assert set(files) == {"index.html", "fleet.css", "fleet.js"}
    fields = page.page_fields({"status_database": "nedm/raspberries_status"}, files)
    for name, data in files.items():
        attachment = fields["_attachments"][name]
        assert base64.b64decode(attachment["data"]) == data
        assert attachment["content_type"] == page.FILES[name]
    assert fields["himbeerecouch"] == {"status_database": "nedm/raspberries_status", "version": __version__,
                                       "page_sha256": page.page_digest(files)}
    assert page.page_fields({"fleet_database": "nedm/raspberries"}, files)["himbeerecouch"]["fleet_database"] \
        == "nedm/raspberries"


def test_the_page_has_no_inline_code_and_loads_only_its_own_files():
    html = page.page_files()["index.html"].decode()
    assert "<script>" not in html and "style=" not in html and "<style" not in html
    assert 'src="fleet.js"' in html and 'href="fleet.css"' in html
    assert "http://" not in html and "https://" not in html and "//" not in html.replace("<!--", "")
    script = page.page_files()["fleet.js"].decode()
    assert "innerHTML" not in script and "outerHTML" not in script and "insertAdjacentHTML" not in script
    assert "eval(" not in script and "document.write" not in script


@pytest.mark.parametrize("policy, blocked", [
    (None, False),
    ("", False),
    ("sandbox", True),
    ("sandbox allow-scripts", True),                          # opaque origin: no session cookie
    ("sandbox allow-scripts allow-same-origin allow-forms", False),
    (pagecsp.PAGE_CSP, False),
    ("default-src 'none'", True),
    ("default-src 'self'; connect-src 'none'", True),
    ("script-src 'self'", False),
    ("frame-ancestors 'none'", False),
])
def test_which_policies_keep_the_page_from_working(policy, blocked):
    assert bool(pagecsp.csp_problems(policy)) is blocked


# ---- setup-db installs it ----------------------------------------------------------------------

@pytest.fixture
def fresh_db(couch):
    name = f"page_{uuid.uuid4().hex[:10]}/fleet"          # a slash, as nedm/raspberries
    yield AdminClient(couch.url, name)
    for each in (name, page.login_database(name), name + "_status"):
        AdminClient(couch.url, each).drop_db()


def page_response(couch, db: str, name: str = "index.html") -> requests.Response:
    return requests.get(f"{couch.url}/{requests.utils.quote(db, safe='')}/_design/himbeerecouch/{name}",
                        auth=ADMIN, timeout=10)


@pytest.fixture
def page_csp_allowed(couch):
    """The page's policy on a CouchDB (setup-db --page-csp sets it for the whole server, so the
    tests that need the default put it back themselves: default_attachment_csp)."""
    if couch.kind == "couchdb":
        set_attachment_csp(couch, pagecsp.PAGE_CSP)


def set_attachment_csp(couch, value: str | None) -> str | None:
    """Set (None: remove, back to the default) [csp] attachments_header_value; returns the old one."""
    url = f"{couch.url}/_node/_local/_config/csp/attachments_header_value"
    before = requests.get(url, auth=ADMIN, timeout=10)
    old = before.json() if before.status_code == 200 else None
    if value is None:
        requests.delete(url, auth=ADMIN, timeout=10)
    else:
        assert requests.put(url, json=value, auth=ADMIN, timeout=10).status_code == 200
    return old


@pytest.fixture
def default_attachment_csp(couch):
    old = set_attachment_csp(couch, None)
    yield
    set_attachment_csp(couch, old)


def test_setup_db_installs_the_page_beside_the_validation_function_once(couch, fresh_db, page_csp_allowed):
    first = hc("setup-db", "--database", fresh_db.db, couch=couch)
    assert first.returncode == 0, first.stderr
    assert "installed the fleet page" in first.stdout and "validation function" in first.stdout
    design = fresh_db.get(DESIGN)
    assert design["validate_doc_update"] == security.VALIDATE_DOC_UPDATE
    assert set(design["_attachments"]) == set(page.FILES)
    assert design["himbeerecouch"]["status_database"] is None
    served = page_response(couch, fresh_db.db)
    assert served.status_code == 200 and served.headers["Content-Type"].startswith("text/html")
    assert served.content == page.page_files()["index.html"]
    assert page_response(couch, fresh_db.db, "fleet.js").content == page.page_files()["fleet.js"]

    again = hc("setup-db", "--database", fresh_db.db, couch=couch)
    assert again.returncode == 0 and "nothing changed" in again.stdout, again.stdout
    assert fresh_db.get(DESIGN)["_rev"] == design["_rev"]


def test_the_login_database_serves_the_page_to_anyone_and_takes_no_writes(couch, fresh_db, page_csp_allowed):
    made = hc("setup-db", "--database", fresh_db.db, couch=couch)
    login = page.login_database(fresh_db.db)
    assert f"created database {login}" in made.stdout
    assert f"the fleet page: {page.page_url(couch.url, login)}" in made.stdout
    # The code database answers its members only; the login database anyone.
    assert requests.get(page.page_url(couch.url, fresh_db.db), timeout=10).status_code == 401
    anonymous = requests.get(page.page_url(couch.url, login), timeout=10)
    assert anonymous.status_code == 200 and anonymous.content == page.page_files()["index.html"]
    design = requests.get(f"{couch.url}/{requests.utils.quote(login, safe='')}/{DESIGN}", timeout=10).json()
    assert design["himbeerecouch"]["fleet_database"] == fresh_db.db
    assert design["validate_doc_update"] == page.LOGIN_VALIDATE
    # Nobody but a server admin writes there: not anonymously, not a deployer.
    from test_operator import add_user, forget_users
    deployer = ("deployer-" + uuid.uuid4().hex[:8], "deploy-secret")
    assert add_user(couch, fresh_db.db, deployer[0], password=deployer[1]).returncode == 0
    try:
        for auth in (None, deployer):
            refused = requests.put(f"{couch.url}/{requests.utils.quote(login, safe='')}/note", auth=auth,
                                   json={"text": "hello"}, timeout=10)
            assert refused.status_code in (401, 403), refused.text
    finally:
        forget_users(couch, deployer[0])
    assert "nothing changed" in hc("setup-db", "--database", fresh_db.db, couch=couch).stdout


def test_setup_db_updates_what_changed_and_keeps_the_rest(couch, fresh_db, page_csp_allowed):
    assert hc("setup-db", "--database", fresh_db.db, couch=couch).returncode == 0
    # An older validation function: setup-db replaces it and keeps the page as it is.
    design = fresh_db.get(DESIGN)
    fresh_db.put({**design, "validate_doc_update": "function () {}", "note": "the site's own"})
    result = hc("setup-db", "--database", fresh_db.db, couch=couch)
    assert "validation function" in result.stdout and "fleet page" not in result.stdout, result.stdout
    kept = fresh_db.get(DESIGN)
    assert kept["validate_doc_update"] == security.VALIDATE_DOC_UPDATE and kept["note"] == "the site's own"
    assert set(kept["_attachments"]) == set(page.FILES)

    # The page's settings changed (a status database): the page is updated, the function kept.
    status_db = fresh_db.db + "_status"
    moved = hc("setup-db", "--database", fresh_db.db, "--status-database", status_db, couch=couch)
    assert moved.returncode == 0, moved.stderr
    assert f"status documents now read from {status_db}" in moved.stdout, moved.stdout
    after = fresh_db.get(DESIGN)
    assert after["himbeerecouch"]["status_database"] == status_db
    assert after["validate_doc_update"] == security.VALIDATE_DOC_UPDATE and after["note"] == "the site's own"
    assert "_attachments" not in (AdminClient(couch.url, status_db).get(DESIGN) or {})

    # A file removed by hand comes back.
    current = fresh_db.get(DESIGN)
    del current["_attachments"]["fleet.css"]
    fresh_db.put(current)
    assert "updated the fleet page" in hc("setup-db", "--database", fresh_db.db, "--status-database", status_db,
                                          couch=couch).stdout
    assert set(fresh_db.get(DESIGN)["_attachments"]) == set(page.FILES)


def test_setup_db_no_page_leaves_it_out(couch, fresh_db):
    result = hc("setup-db", "--database", fresh_db.db, "--no-page", couch=couch)
    assert result.returncode == 0 and "fleet page" not in result.stdout
    assert "_attachments" not in fresh_db.get(DESIGN) and "himbeerecouch" not in fresh_db.get(DESIGN)
    assert not AdminClient(couch.url, page.login_database(fresh_db.db)).get(DESIGN)
    both = hc("setup-db", "--database", fresh_db.db, "--no-page", "--page-csp", couch=couch)
    assert both.returncode == 2 and "--page-csp" in both.stderr


def test_a_deployer_cannot_replace_the_page(couch, fleet_db_with_page):
    """Design documents are for database admins: a deployer (who may write anything else)
    cannot change what every operator's browser runs."""
    admin, deployer = fleet_db_with_page
    session = requests.Session()
    session.auth = deployer
    design = admin.get(DESIGN)
    evil = {**design, "_attachments": {"fleet.js": {"content_type": "text/javascript",
                                                     "data": base64.b64encode(b"alert(1)").decode()}}}
    response = session.put(admin.url(DESIGN), json=evil, timeout=10)
    assert response.status_code in (401, 403), response.text
    assert set(admin.get(DESIGN)["_attachments"]) == set(page.FILES)


@pytest.fixture
def fleet_db_with_page(couch, page_csp_allowed):
    from test_operator import add_user, forget_users
    name = f"fleet_{uuid.uuid4().hex[:10]}"
    assert hc("setup-db", "--database", name, couch=couch).returncode == 0
    deployer = ("deployer-" + name, "deploy-secret")
    assert add_user(couch, name, deployer[0], password=deployer[1]).returncode == 0
    admin = AdminClient(couch.url, name)
    yield admin, deployer
    forget_users(couch, deployer[0])
    admin.drop_db()
    AdminClient(couch.url, page.login_database(name)).drop_db()


# ---- the server's Content-Security-Policy ------------------------------------------------------

@pytest.mark.only_on("couchdb", reason="CouchDB 3 sends 'Content-Security-Policy: sandbox' with attachments")
def test_setup_db_says_what_blocks_the_page_and_page_csp_allows_it(couch, fresh_db, default_attachment_csp):
    plain = hc("setup-db", "--database", fresh_db.db, couch=couch)
    assert plain.returncode == 0, plain.stderr
    assert page_response(couch, fresh_db.db).headers["Content-Security-Policy"] == "sandbox"
    assert "warning: the server sends 'Content-Security-Policy: sandbox'" in plain.stderr
    assert "--page-csp" in plain.stderr and "every attachment of this server" in plain.stderr

    allowed = hc("setup-db", "--database", fresh_db.db, "--page-csp", couch=couch)
    assert allowed.returncode == 0 and not allowed.stderr, allowed.stderr
    assert "set [csp] attachments_header_value on couchdb-" in allowed.stdout, allowed.stdout
    assert page_response(couch, fresh_db.db).headers["Content-Security-Policy"] == pagecsp.PAGE_CSP

    again = hc("setup-db", "--database", fresh_db.db, "--page-csp", couch=couch)
    assert "changed nothing" in again.stdout and not again.stderr, again.stdout + again.stderr


def test_page_csp_changes_nothing_where_nothing_blocks_the_page(couch, fresh_db, page_csp_allowed):
    result = hc("setup-db", "--database", fresh_db.db, "--page-csp", couch=couch)
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert "--page-csp changed nothing" in result.stdout
