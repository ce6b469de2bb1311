"""The fleet page: a web page that CouchDB itself serves, made of three files in the package
(himbeerecouch/fleetpage/) stored as attachments of a design document `_design/himbeerecouch`.

- In the code database, beside the validation function: the page at
  `<server>/<database>/_design/himbeerecouch/index.html`. The field `himbeerecouch` tells it
  where the devices' status documents are.
- In `<database>_login`, a database anyone may read and only server admins may write: the same
  page, which a browser can load before it has a session (the code database answers only its
  members, so its copy of the page cannot show a login form to someone not logged in yet). Its
  field names the code database, and the page works on that one.

The server's Content-Security-Policy for attachments is pagecsp.py's business.
"""
from __future__ import annotations

import base64
import hashlib
from importlib import resources
from typing import TYPE_CHECKING
from urllib.parse import quote

from . import __version__, security

if TYPE_CHECKING:
    from .couch import Database

PAGE_DIR = "fleetpage"
# name -> content type; index.html is the page, the others are what it loads.
FILES = {
    "index.html": "text/html; charset=utf-8",
    "fleet.css": "text/css; charset=utf-8",
    "fleet.js": "text/javascript; charset=utf-8",
}
FIELD = "himbeerecouch"
PAGE_PATH = ("_design", security.DESIGN_DOC_ID.partition("/")[2], "index.html")
LOGIN_SUFFIX = "_login"

# Anyone may read the login database; nobody but a server admin writes anything there.
LOGIN_SECURITY = {"admins": {"names": [], "roles": []}, "members": {"names": [], "roles": []}}
LOGIN_VALIDATE = """function (newDoc, oldDoc, userCtx) {
  if ((userCtx.roles || []).indexOf('_admin') === -1) {
    throw({forbidden: 'this database holds the fleet page only; server admins write it (himbeerecouch setup-db)'});
  }
}"""


def _is_public(security_object: dict) -> bool:
    """No members (anyone reads) and no database admins (only server admins write the page)."""
    return not any((security_object or {}).get(section, {}).get(kind)
                   for section in ("admins", "members") for kind in ("names", "roles"))


def login_database(database: str) -> str:
    return database + LOGIN_SUFFIX


def page_url(server: str, database: str) -> str:
    return f"{server.rstrip('/')}/{quote(database, safe='')}/{'/'.join(PAGE_PATH)}"


def page_files() -> dict[str, bytes]:
    """The page's files as the package installed them."""
    folder = resources.files(__package__).joinpath(PAGE_DIR)
    return {name: folder.joinpath(name).read_bytes() for name in FILES}


def page_digest(files: dict[str, bytes]) -> str:
    """One hash over names, types and contents: what decides whether the stored page is current
    (attachment digests differ between servers, and CouchDB stores text compressed)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        for part in (name, FILES[name]):
            digest.update(part.encode() + b"\0")
        digest.update(hashlib.sha256(files[name]).digest())
    return digest.hexdigest()


def page_field(settings: dict, files: dict[str, bytes]) -> dict:
    """What the page reads from its design document: `settings` (status_database in the code
    database, fleet_database in the login database), the version, and the files' hash."""
    return {**settings, "version": __version__, "page_sha256": page_digest(files)}


def page_fields(settings: dict, files: dict[str, bytes] | None = None) -> dict:
    """The design document's fields that make the page: attachments inline (base64) and the
    field the page reads its settings from."""
    files = page_files() if files is None else files
    attachments = {name: {"content_type": FILES[name], "data": base64.b64encode(data).decode("ascii")}
                   for name, data in files.items()}
    return {"_attachments": attachments, FIELD: page_field(settings, files)}


def is_current(design: dict | None, settings: dict, files: dict[str, bytes]) -> bool:
    """Whether the stored design document has this page already (each file too, in case
    someone removed or replaced one by hand)."""
    if not design or design.get(FIELD) != page_field(settings, files):
        return False
    stored = design.get("_attachments") or {}
    return set(stored) == set(FILES) and all(
        stored[name].get("content_type") == FILES[name] and stored[name].get("length") == len(data)
        for name, data in files.items())


def install(db: Database, settings: dict, extra: dict | None = None, attempts: int = 3) -> dict | None:
    """Store or update the page in `db`'s design document, keeping every other field (the
    validation function) and setting `extra` ones; returns the page field it replaced ({} when
    there was none), or None when the page was current already."""
    from .couch import Conflict
    files = page_files()
    design = db.get(security.DESIGN_DOC_ID)
    if is_current(design, settings, files) and all(design.get(k) == v for k, v in (extra or {}).items()):
        return None
    # `_attachments` is ours entirely: a file dropped from the page goes with it.
    doc = {**(design or {"_id": security.DESIGN_DOC_ID, "language": "javascript"}),
           **(extra or {}), **page_fields(settings, files)}
    try:
        db.put(doc)
    except Conflict:
        if attempts <= 1:
            raise                                   # someone keeps writing it: say so
        return install(db, settings, extra, attempts - 1)
    return (design or {}).get(FIELD) or {}


def install_fleet_page(db: Database, status_database: str | None) -> list[str]:
    """The page in the code database; lists what changed."""
    before = install(db, {"status_database": status_database or None})
    if before is None:
        return []
    where = status_database or f"{db.name} (no status database)"
    if not before:
        return [f"installed the fleet page in {db.name} (status documents in {where})"]
    if before.get("status_database") != (status_database or None):
        return [f"updated the fleet page: status documents now read from {where} "
                f"(was {before.get('status_database') or db.name})"]
    return [f"updated the fleet page in {db.name} (version {__version__})"]


def install_login_page(db: Database) -> list[str]:
    """The public copy of the page in `<database>_login`, working on `db`; lists what changed."""
    login = db.sibling(login_database(db.name))
    changes = []
    if not login.exists():
        login.create()
        changes.append(f"created database {login.name} (the fleet page's login: anyone may read it, "
                       "server admins write it)")
    if not _is_public(login.security()):
        login.set_security(LOGIN_SECURITY)
        changes.append(f"made database {login.name} readable without a login (it holds the page only)")
    before = install(login, {"fleet_database": db.name}, {"validate_doc_update": LOGIN_VALIDATE})
    if before is not None:
        verb = "installed" if not before else "updated"
        changes.append(f"{verb} the fleet page's login in {login.name}")
    return changes
