"""The CouchDB connection, on top of pycouchdb, with the fixes the daemon relies on.

pycouchdb 1.17 quotes nothing in URLs (a database `nedm/raspberries` or a document id with `/`
ends up as extra path segments) and resets TLS verification to off whenever it makes a
sub-resource; its changes feed cannot be stopped or resumed. This module keeps those details in
one place: callers see documents, selectors and change lines.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import quote, urlsplit, urlunsplit

import requests
from pycouchdb import exceptions as couch_errors
from pycouchdb import utils as couch_utils
from pycouchdb.resource import Resource

Conflict = couch_errors.Conflict
NotFound = couch_errors.NotFound

# What a server that went away looks like from requests and pycouchdb.
CONNECTION_ERRORS = (requests.RequestException, couch_errors.Error, ValueError)


class _Resource(Resource):
    """A pycouchdb Resource that always verifies TLS as configured (system CAs or ca_file)."""

    def __init__(self, base_url: str, *, verify: bool | str, **kwargs: Any) -> None:
        super().__init__(base_url, verify=verify, **kwargs)
        self.verify = verify

    def __call__(self, *path: str) -> "_Resource":
        return type(self)(couch_utils.urljoin(self.base_url, *path), session=self.session,
                          timeout=self.timeout, verify=self.verify)

    def request(self, method: str, path: Any = None, **kwargs: Any):
        # Per request: requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override a session's
        # own CA file, and pycouchdb may reset the session's setting.
        kwargs.setdefault("verify", self.verify)
        return super().request(method, path, **kwargs)


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """The URL without `user:password@`, and those credentials if it had them."""
    return couch_utils.extract_credentials(url)


def redact(url: str) -> str:
    """The URL as it may appear in logs and documents: never with a password."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def doc_path(doc_id: str) -> str:
    # Every character that means something in a URL path is escaped, `/` included, and so are
    # the ids "." and "..", which HTTP clients drop as path segments (the request would go to
    # the database, or the server).
    quoted = quote(doc_id, safe="")
    return quoted.replace(".", "%2E") if set(quoted) == {"."} else quoted


def describe_error(error: BaseException) -> str:
    """A server's refusal or a network failure, in one readable line."""
    if isinstance(error, requests.exceptions.SSLError):
        reason = str(error)
        if "CERTIFICATE_VERIFY_FAILED" in reason or "certificate verify failed" in reason:
            hint = reason.split("certificate verify failed:", 1)[-1].split("'")[0].strip(" ()")
            if "key usage" in hint.lower() or "basic constraints" in hint.lower():
                return (f"TLS certificate verification failed ({hint}): the CA certificate lacks the "
                        "extensions strict verification requires (basicConstraints CA:TRUE, keyUsage "
                        "keyCertSign): reissue it with them")
            return (f"TLS certificate verification failed ({hint}): the server's certificate is not "
                    "signed by a trusted CA or is made for another host name; give the CA that signed "
                    "it with ca_file (--ca-file)")
        return f"TLS error: {reason}"
    detail = error.args[0] if error.args else None
    if isinstance(error, NotFound):
        return f"not found ({detail or 'no such document or database'})"
    if isinstance(detail, dict):
        if detail.get("error") == "unauthorized":
            return f"the server refused our credentials: {detail.get('reason', '')}".rstrip(": ")
        if detail.get("error") == "forbidden":
            return f"the server forbids it: {detail.get('reason', '')}".rstrip(": ")
        return f"{detail.get('error', 'error')}: {detail.get('reason', '')}".rstrip(": ")
    return str(error) or type(error).__name__


@dataclass(frozen=True)
class Change:
    seq: Any            # opaque: CouchDB 2+ sends strings, others integers
    doc_id: str
    deleted: bool
    doc: dict | None


class Database:
    """One database on one server, reached with one set of credentials."""

    def __init__(self, url: str, name: str, *, credentials: tuple[str, str] | None = None,
                 ca_file: str = "", timeout: float = 30.0) -> None:
        self._url, self._credentials, self._ca_file = url, credentials, ca_file
        base, url_credentials = split_credentials(url)
        self.server_url = base.rstrip("/")
        self.name = name
        self.timeout = timeout
        verify: bool | str = ca_file or True          # certificates are always checked
        self.server = _Resource(self.server_url, credentials=url_credentials or credentials,
                                authmethod="basic", verify=verify, timeout=timeout)
        self.resource = self.server(quote(name, safe=""))

    def __repr__(self) -> str:
        return f"<Database {self.name} on {redact(self.server_url)}>"

    def info(self) -> dict:
        _, result = self.resource.get()
        return result

    def exists(self) -> bool:
        try:
            self.info()
        except NotFound:
            return False
        return True

    def create(self) -> None:
        self.resource.put()

    def security(self) -> dict:
        _, result = self.resource.get("_security")
        return result or {}

    def set_security(self, security: dict) -> None:
        self.resource.put("_security", data=json.dumps(security).encode())

    def ensure_index(self, fields: list[str], name: str, ddoc: str) -> bool:
        """Create a Mango index; False when it existed already."""
        body = {"index": {"fields": fields}, "name": name, "ddoc": ddoc, "type": "json"}
        _, result = self.resource.post("_index", data=json.dumps(body).encode())
        return result.get("result") != "exists"

    def sibling(self, name: str) -> "Database":
        """Another database of the same server, with the same credentials and TLS settings."""
        return Database(self._url, name, credentials=self._credentials, ca_file=self._ca_file,
                        timeout=self.timeout)

    def update_seq(self) -> Any:
        return self.info()["update_seq"]

    def get(self, doc_id: str) -> dict | None:
        try:
            _, result = self.resource(doc_path(doc_id)).get()
        except NotFound:
            return None
        return result

    def put(self, doc: dict) -> dict:
        """Store `doc` (with its `_rev` when it updates one); returns it with the new `_rev`."""
        data = json.dumps(doc).encode()
        _, result = self.resource(doc_path(doc["_id"])).put(data=data)
        return {**doc, "_rev": result["rev"]}

    def find(self, selector: dict, limit: int = 10000) -> list[dict]:
        data = json.dumps({"selector": selector, "limit": limit}).encode()
        _, result = self.resource.post("_find", data=data)
        return list(result.get("docs", []))

    def changes(self, since: Any, selector: dict, heartbeat_seconds: float) -> Iterator[Change | None]:
        """Follow the continuous changes feed: yields None once the feed is open, then a Change
        per change and None per heartbeat.

        The selector goes in the POST body, as CouchDB 3 expects. The read timeout is three
        heartbeats, so a half-open connection raises instead of hanging forever.
        """
        params = {"feed": "continuous", "include_docs": "true", "filter": "_selector",
                  "heartbeat": int(heartbeat_seconds * 1000), "since": str(since)}
        response, _ = self.resource.request(
            "POST", "_changes", params=params, data=json.dumps({"selector": selector}).encode(),
            # CouchDB never compresses the feed; ask nobody else to either.
            headers={"Accept-Encoding": "identity"}, stream=True,
            timeout=(self.timeout, 3 * heartbeat_seconds))
        with response:
            if response.status_code >= 400:
                raise couch_errors.GenericError(
                    f"changes feed refused: HTTP {response.status_code} {response.text[:200]}")
            yield None
            for line in _lines(response):
                if not line.strip():
                    yield None
                    continue
                row = json.loads(line)
                if "id" not in row:
                    if "last_seq" in row:      # the server ended the feed
                        return
                    raise couch_errors.GenericError(f"unexpected line in changes feed: {line[:200]!r}")
                yield Change(seq=row.get("seq"), doc_id=row["id"], deleted=bool(row.get("deleted")),
                             doc=row.get("doc"))


def _lines(response: requests.Response) -> Iterator[bytes]:
    """Lines of a streamed response as soon as each is complete (empty lines included)."""
    pending = b""
    for chunk in response.iter_content(chunk_size=None):
        pending += chunk
        *complete, pending = pending.split(b"\n")
        yield from complete
    if pending:
        yield pending


def server_error(error: BaseException, server: str, user: str | None) -> str:
    """What went wrong between us and the server, saying each thing once: which server, who we
    were, and the server's own reason."""
    if isinstance(error, requests.exceptions.SSLError):
        return f"{server}: {describe_error(error)}"
    if isinstance(error, requests.exceptions.ConnectionError):
        reason = re.findall(r"\[Errno -?\d+\] ([^'\")\]]+)", str(error))
        return f"cannot reach {server}" + (f": {reason[-1].strip()}" if reason else "")
    if isinstance(error, requests.exceptions.Timeout):
        return f"{server} did not answer in time"
    detail = error.args[0] if error.args else None
    if isinstance(detail, dict) and detail.get("error") in ("unauthorized", "forbidden"):
        who = f"user {user}" if user else "anonymous access (no user given)"
        reason = str(detail.get("reason") or detail["error"]).strip()
        return f"the server {server} refused {who}: {reason}"
    return f"the server {server} answered: {describe_error(error)}"
