"""What a device may not do on every write path of the server: the rights that Apache CouchDB
enforces and pouchdb-server does not (it runs the validation function on PUT and POST only, and
lets a user change its own roles). test_operator.py holds the rights every server enforces."""
from __future__ import annotations

import pytest

from test_operator import OTHER, PI, device_session, fleet_db  # noqa: F401 (fleet_db: fixture)

pytestmark = [pytest.mark.integration,
              pytest.mark.only_on("couchdb", reason="pouchdb-server does not validate _bulk_docs "
                                                    "writes and lets users set their own roles")]

SNEAKY = "def main():\n    log('owned')\n"


def test_a_device_cannot_write_code_through_bulk_docs(couch, fleet_db, tmp_path):
    admin, _ = fleet_db
    admin.put({"_id": "code", "type": PI, "code": "def main(): pass"})
    device, _ = device_session(couch, admin, tmp_path / "pi", PI)
    docs = [{"_id": f"{PI}_sneaky", "type": PI, "code": SNEAKY},
            {**admin.get("code"), "code": SNEAKY},
            {"_id": f"{PI}_newcmd", "type": f"{PI}_cmd", "cmd": ["rm", "-rf", "/"]},
            {"_id": f"{OTHER}_heartbeat", "type": "heartbeat"},
            {"_id": f"{PI}_heartbeat", "type": "heartbeat"}]
    response = device.post(admin.url("_bulk_docs"), json={"docs": docs}, timeout=10)
    assert response.status_code == 201, response.text
    results = {row["id"]: row for row in response.json()}
    for doc in docs[:4]:
        assert results[doc["_id"]].get("error") == "forbidden", results[doc["_id"]]
    assert "error" not in results[f"{PI}_heartbeat"]          # its own data: allowed
    assert admin.get(f"{PI}_sneaky") is None and admin.get(f"{PI}_newcmd") is None
    assert admin.get("code")["code"] == "def main(): pass"


def test_a_device_cannot_write_code_as_a_replicator(couch, fleet_db, tmp_path):
    """new_edits: false is how replication writes; a device must not plant a winning revision."""
    admin, _ = fleet_db
    code = admin.put({"_id": "code", "type": PI, "code": "def main(): pass"})
    device, _ = device_session(couch, admin, tmp_path / "pi", PI)
    planted = [{"_id": "code", "_rev": "9-" + "f" * 32, "type": PI, "code": SNEAKY},
               {"_id": f"{PI}_sneaky", "_rev": "1-" + "e" * 32, "type": PI, "code": SNEAKY}]
    response = device.post(admin.url("_bulk_docs"), json={"docs": planted, "new_edits": False}, timeout=10)
    assert response.status_code == 201, response.text
    assert {row["id"]: row.get("error") for row in response.json()} == {
        "code": "forbidden", f"{PI}_sneaky": "forbidden"}
    current = admin.http.get(admin.url("code"), params={"conflicts": "true"}, timeout=10).json()
    assert current["_rev"] == code["_rev"] and current["code"] == "def main(): pass"
    assert "_conflicts" not in current
    assert admin.get(f"{PI}_sneaky") is None


def test_a_device_cannot_give_itself_roles(couch, fleet_db, tmp_path):
    admin, _ = fleet_db
    device, password = device_session(couch, admin, tmp_path / "pi", PI)
    user, _ = device.auth
    url = f"{couch.url}/_users/org.couchdb.user:{user}"
    mine = admin.http.get(url, timeout=10).json()          # CouchDB 3's _users is admin-only to read
    promoted = {**mine, "roles": mine["roles"] + ["deployer"], "password": password}
    response = device.put(url, json=promoted, timeout=10)
    assert response.status_code == 403, response.text
    assert admin.http.get(url, timeout=10).json()["roles"] == ["raspberry"]
    # And so it still cannot write code.
    refused = device.put(admin.url(f"{PI}_sneaky"), json={"type": PI, "code": SNEAKY}, timeout=10)
    assert refused.status_code == 403
