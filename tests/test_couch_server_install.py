"""scripts/couch-server installs pouchdb-server's tree from its lock file, without npm: every
package pinned by version and sha512, checked on download, unpacked inside its folder only."""
from __future__ import annotations

import base64
import hashlib
import http.server
import importlib.machinery
import importlib.util
import io
import json
import tarfile
import threading

import pytest

from support import ROOT


def load_couch_server():
    loader = importlib.machinery.SourceFileLoader("couch_server", str(ROOT / "scripts" / "couch-server"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


couch_server = load_couch_server()


def sha512(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def tarball(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name.endswith(".sh") else 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_the_lock_pins_every_package_by_version_and_sha512():
    lock = json.loads((ROOT / "scripts" / "couch-server-lock.json").read_text())
    assert lock["packages"][""]["dependencies"] == {"pouchdb-server": couch_server.VERSION}
    packages = couch_server.read_lock()
    assert packages["node_modules/pouchdb-server"]["version"] == couch_server.VERSION
    for path, entry in packages.items():
        assert path.startswith("node_modules/"), path
        assert entry["version"] and entry["integrity"].startswith("sha512-"), path
        assert not entry.get("link") and "resolved" not in entry, path   # all from the registry
    # Every file the patches change is in the tree.
    assert {f"node_modules/{rel.split('/lib/')[0]}" for rel, _, _ in couch_server.PATCHES} <= set(packages)


def test_tarball_addresses_follow_the_registry_layout():
    assert couch_server.tarball_url("node_modules/@gerhobbelt/nomnom", {"version": "1.8.4-31"}) == \
        f"{couch_server.REGISTRY}/@gerhobbelt/nomnom/-/nomnom-1.8.4-31.tgz"
    assert couch_server.tarball_url("node_modules/recast/node_modules/esprima", {"version": "4.0.1"}) == \
        f"{couch_server.REGISTRY}/esprima/-/esprima-4.0.1.tgz"


def test_a_tarball_unpacks_inside_its_folder_only(tmp_path):
    data = tarball({"package/package.json": b"{}", "package/bin/run.sh": b"#!/bin/sh\n",
                    "package/../../escaped": b"no", "/etc/absolute": b"no"})
    dest = tmp_path / "node_modules" / "x"
    couch_server.extract(data, dest)
    assert (dest / "package.json").read_bytes() == b"{}"
    assert (dest / "bin" / "run.sh").stat().st_mode & 0o111
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "node_modules" / "escaped").exists()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == \
        ["node_modules/x/bin/run.sh", "node_modules/x/package.json"]


@pytest.fixture
def registry():
    """A registry on 127.0.0.1 that serves the bytes put in `files` by path."""
    files: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"          # kept alive, as couch-server's downloads are

        def do_GET(self):
            data = files.get(self.path)
            self.send_response(200 if data is not None else 404)
            self.send_header("Content-Length", str(len(data or b"")))
            self.end_headers()
            self.wfile.write(data or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", files
    server.shutdown()
    server.server_close()


def test_a_download_must_match_the_locks_sha512(registry):
    base, files = registry
    good = tarball({"package/index.js": b"1"})
    files["/a/-/a-1.0.0.tgz"] = good
    assert couch_server.download(f"{base}/a/-/a-1.0.0.tgz", sha512(good)) == good
    assert couch_server.download(f"{base}/a/-/a-1.0.0.tgz", sha512(good)) == good   # same connection
    with pytest.raises(ValueError, match="sha512"):
        couch_server.download(f"{base}/a/-/a-1.0.0.tgz", sha512(b"something else"))
    with pytest.raises(OSError, match="HTTP 404"):
        couch_server.download(f"{base}/missing/-/missing-1.0.0.tgz", sha512(good))
