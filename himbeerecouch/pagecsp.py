"""The server's Content-Security-Policy for attachments, as far as the fleet page is concerned.

CouchDB 3 sends `Content-Security-Policy: sandbox` with every attachment by default
(`[csp] attachments_header_value`), which keeps any page served as an attachment from running
scripts. `ensure_csp` says so, and only when the operator asks (setup-db --page-csp) sets a
policy that lets the page's own files run and nothing else. That setting is the server's: it
applies to every attachment of every database there.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING
from urllib.parse import quote

from .page import PAGE_PATH

if TYPE_CHECKING:
    from .couch import Database

# What the page needs and nothing more: its own files, requests to its own server, no inline
# code, no plugins, no framing, forms only to its own server.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
            "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
            "form-action 'self'")
CSP_SECTION, CSP_KEY = "csp", "attachments_header_value"


def page_csp_header(db: Database) -> str | None:
    """The Content-Security-Policy the server sends with the page (None: it sends none)."""
    response, _ = db.resource.request("GET", list(PAGE_PATH), stream=True,
                                      headers={"Accept": "text/html"})
    with response:
        response.raise_for_status()
        return response.headers.get("Content-Security-Policy")


def _directives(policy: str) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for part in policy.split(";"):
        words = part.split()
        if words:
            directives.setdefault(words[0].lower(), [w.lower() for w in words[1:]])
    return directives


def csp_problems(policy: str | None) -> list[str]:
    """What in a Content-Security-Policy keeps the page from working (empty: nothing)."""
    if not policy:
        return []
    directives = _directives(policy)
    problems = []
    if "sandbox" in directives:
        missing = [flag for flag in ("allow-scripts", "allow-same-origin", "allow-forms")
                   if flag not in directives["sandbox"]]
        if missing:
            effect = ("no scripts run" if "allow-scripts" in missing else
                      "the page cannot use its session" if "allow-same-origin" in missing else
                      "the login form cannot be sent")
            problems.append(f"'sandbox' without {', '.join(missing)} ({effect})")

    def allows_self(name: str) -> bool:
        values = directives.get(name, directives.get("default-src"))
        return values is None or "'self'" in values or "*" in values

    for name, what in (("script-src", "the page's script"), ("style-src", "its style sheet"),
                       ("connect-src", "its requests to the server")):
        if not allows_self(name):
            problems.append(f"{name} does not allow 'self' ({what})")
    return problems


def set_page_csp(db: Database) -> list[str]:
    """Make every node of the server send PAGE_CSP with attachments (all of its attachments, in
    every database); lists the nodes changed."""
    from .couch import NotFound
    _, membership = db.server.get("_membership")
    nodes = (membership or {}).get("all_nodes") or ["_local"]
    changed = []
    for node in nodes:
        path = ["_node", quote(node, safe="@"), "_config", CSP_SECTION, CSP_KEY]
        try:
            _, current = db.server.get(path)
        except NotFound:                            # the default, not in any ini file
            current = None
        if current != PAGE_CSP:
            db.server.put(path, data=json.dumps(PAGE_CSP).encode())
            changed.append(node)
    return changed


def ensure_csp(db: Database, allow: bool) -> tuple[list[str], list[str]]:
    """Check what the server sends with the page; with `allow` (setup-db --page-csp) make it
    PAGE_CSP when that blocks the page. Returns (what changed, warnings for the operator)."""
    policy = page_csp_header(db)
    problems = csp_problems(policy)
    if not problems:
        note = [] if not allow else [
            "the server's attachment policy lets the page run already"
            + (f" ({policy})" if policy else " (it sends no Content-Security-Policy)") + ": --page-csp changed nothing"]
        return note, []
    if not allow:
        return [], [f"the server sends 'Content-Security-Policy: {policy}' with attachments, so the fleet "
                    f"page cannot work there: {'; '.join(problems)}. To allow the page's own files "
                    "(for every attachment of this server, all databases), run himbeerecouch setup-db "
                    "--page-csp as a server admin, or set [csp] attachments_header_value yourself "
                    "(README, \"The fleet page\")"]
    nodes = set_page_csp(db)
    after = page_csp_header(db)
    still = csp_problems(after)
    changed = [f"set [csp] attachments_header_value on {', '.join(nodes)} (applies to every attachment "
               f"of this server): {PAGE_CSP}"] if nodes else []
    if still:
        return changed, [f"the server still sends 'Content-Security-Policy: {after}' with the page: "
                         f"{'; '.join(still)}; is a proxy in front of it setting its own?"]
    return changed, []
