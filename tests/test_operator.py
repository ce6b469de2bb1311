"""Operator commands and the rights model, against the real test server with a small fleet."""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
import uuid

import pytest
import requests

from support import marker_program, starts
from himbeerecouch import credentials
from himbeerecouch.config import Config
from support import ADMIN, AdminClient, wait_for

pytestmark = pytest.mark.integration
PI = 202481596538417
OTHER = 202481596538418


def operator_env(user=ADMIN, server=None, couch=None) -> dict:
    """The environment of an operator command: server and credentials from COUCHDB_* only
    (server=False: no COUCHDB_URL, for a test that names it otherwise)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HIMBEERECOUCH_ADMIN_CONFIG", "COUCHDB_URL", "COUCHDB_USER", "COUCHDB_PASSWORD",
                        "COUCHDB_DATABASE", "COUCHDB_STATUS_DATABASE", "COUCHDB_CA_FILE")}
    if server is not False:
        env["COUCHDB_URL"] = server or couch.url
    if user:
        env["COUCHDB_USER"], env["COUCHDB_PASSWORD"] = user
    return env


def hc(*args, user=ADMIN, input=None, server=None, timeout=60, couch=None):
    return subprocess.run([sys.executable, "-m", "himbeerecouch", *args], capture_output=True, text=True,
                          input=input, env=operator_env(user, server, couch), timeout=timeout)


def add_user(couch, db, name, *options, password="user-secret"):
    return hc("add-user", name, "--database", db, "--password-stdin", *options, input=password + "\n", couch=couch)


def user_session(name, password) -> requests.Session:
    session = requests.Session()
    session.auth = (name, password)
    return session


@pytest.fixture
def fleet_db(couch):
    """A database set up by setup-db, with a deployer user made by add-user."""
    name = f"fleet_{uuid.uuid4().hex[:10]}"
    result = hc("setup-db", "--database", name, couch=couch)
    assert result.returncode == 0, result.stderr
    admin = AdminClient(couch.url, name)
    deployer = ("deployer-" + name, "deploy-secret")
    made = add_user(couch, name, deployer[0], password=deployer[1])
    assert made.returncode == 0, made.stderr
    yield admin, deployer
    forget_users(couch, deployer[0])
    admin.http.delete(admin.url(), timeout=30)
    AdminClient(couch.url, name + "_login").drop_db()      # setup-db's public copy of the fleet page


def forget_users(couch, *names) -> None:
    """Remove users a test made (a server named by HIMBEERECOUCH_TEST_URL keeps nothing)."""
    http = requests.Session()
    http.auth = ADMIN
    for name in names:
        url = f"{couch.url}/_users/org.couchdb.user:{name}"
        current = http.get(url, timeout=10)
        if current.status_code == 200:
            http.delete(url, params={"rev": current.json()["_rev"]}, timeout=10)


def device_session(couch, admin, state_dir, macid) -> tuple[requests.Session, str]:
    creds, _ = credentials.load_or_create(Config(state_dir=state_dir), create=True, macid=macid)
    result = hc("add-device", "--database", admin.db, "--from", "-",
                input=json.dumps({"MacID": creds.macid, "password": creds.password}), couch=couch)
    assert result.returncode == 0, result.stderr
    session = requests.Session()
    session.auth = (creds.user, creds.password)
    # CouchDB learns a changed password from its _users feed: a moment after the write.
    wait_for(lambda: session.get(f"{couch.url}/_session", timeout=10).json().get("userCtx", {}).get("name")
             == creds.user, message="the device's new password to be accepted")
    return session, creds.password


def test_setup_db_is_idempotent(couch):
    name = f"setup_{uuid.uuid4().hex[:10]}"
    first = hc("setup-db", "--database", name, couch=couch)
    assert first.returncode == 0, first.stderr
    assert "created database" in first.stdout and "validation function" in first.stdout
    second = hc("setup-db", "--database", name, couch=couch)
    assert second.returncode == 0 and "nothing changed" in second.stdout
    AdminClient(couch.url, name).drop_db()
    AdminClient(couch.url, name + "_login").drop_db()


def test_setup_db_needs_credentials_and_says_so(couch):
    result = hc("setup-db", "--database", "whatever", user=None, couch=couch)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "himbeerecouch setup-db:" in result.stderr


def test_what_a_device_may_and_may_not_write(couch, fleet_db, tmp_path):
    admin, deployer = fleet_db
    admin.put({"_id": "code", "type": PI, "code": "def main(): pass"})
    admin.put({"_id": "mine", "type": f"{PI}_cmd", "cmd": ["true"]})
    admin.put({"_id": "theirs", "type": f"{OTHER}_cmd", "cmd": ["true"]})
    device, _ = device_session(couch, admin, tmp_path / "pi", PI)

    def write(doc):
        return device.put(admin.url(doc["_id"]), json=doc, timeout=10).status_code

    assert device.get(admin.url("code"), timeout=10).status_code == 200
    assert write({"_id": f"{PI}_heartbeat", "type": "heartbeat", "ip": "x"}) == 201
    assert write({"_id": f"{PI}_data_1", "type": "measurement", "t": 21.5}) == 201
    mine = admin.get("mine")
    assert write({**mine, "claimed": "now"}) == 201
    mine = admin.get("mine")
    assert write({**mine, "ret": ["", ""], "returncode": 0}) == 201
    # Refused: code, new commands, changing a command, another device's documents, design documents.
    assert write({"_id": f"{PI}_sneaky", "type": PI, "code": "def main(): pass"}) == 403
    assert write({**admin.get("code"), "code": "def main(): print('owned')"}) == 403
    assert write({"_id": f"{PI}_newcmd", "type": f"{PI}_cmd", "cmd": ["rm", "-rf", "/"]}) == 403
    fresh = admin.put({"_id": "mine2", "type": f"{PI}_cmd", "cmd": ["true"]})
    assert write({**fresh, "cmd": ["false"]}) == 403
    assert write({**admin.get("mine"), "ret": ["forged", ""]}) == 403
    assert write({**admin.get("theirs"), "ret": ["", ""]}) == 403
    assert write({"_id": f"{OTHER}_heartbeat", "type": "heartbeat"}) == 403
    assert device.put(admin.url("_design", "x").replace("%2Fx", "/x").replace("_design%2F", "_design/"),
                      json={"views": {}}, timeout=10).status_code in (401, 403)
    # A deployer can push; strangers read nothing.
    program = tmp_path / "prog.py"
    program.write_text("def main():\n    log('deployed')\n")
    pushed = hc("push", str(PI), str(program), "--database", admin.db, user=deployer, couch=couch)
    assert pushed.returncode == 0, pushed.stderr
    assert requests.get(admin.url(), timeout=10).status_code == 401
    assert requests.get(admin.url("code"), timeout=10).status_code == 401


def test_push_keeps_the_revision_and_unmanaged_fields(couch, fleet_db, tmp_path):
    admin, deployer = fleet_db
    program, helper, calib = tmp_path / "thermo.py", tmp_path / "helper.py", tmp_path / "calib.py"
    program.write_text("import helper\ndef main():\n    log(helper.X)\n")
    helper.write_text("X = 1\n")
    calib.write_text("K = 2\n")
    first = hc("push", str(PI), str(program), "--module", f"helper={helper}", "--global-module", f"calib={calib}",
               "--database", admin.db, user=deployer, couch=couch)
    assert first.returncode == 0 and "created code:%d:thermo" % PI in first.stdout, first.stderr
    doc = admin.get(f"code:{PI}:thermo")
    assert doc["type"] == PI and doc["modules"] == {"helper": "X = 1\n"} and doc["global_modules"] == {"calib": "K = 2\n"}
    admin.put({**doc, "restart": "always", "note": "kept"})
    program.write_text("def main():\n    log('v2')\n")
    second = hc("push", str(PI), str(program), "--database", admin.db, user=deployer, couch=couch)
    assert second.returncode == 0 and "updated" in second.stdout
    doc = admin.get(f"code:{PI}:thermo")
    assert doc["code"] == "def main():\n    log('v2')\n" and doc["note"] == "kept" and doc["restart"] == "always"
    assert doc["_rev"].startswith("3-")
    bad = tmp_path / "bad.py"
    bad.write_text("def main(:\n")
    refused = hc("push", str(PI), str(bad), "--database", admin.db, user=deployer, couch=couch)
    assert refused.returncode == 2 and "bad.py line 1" in refused.stderr


def test_cmd_and_status_on_a_fleet(couch, fleet_db, make_daemon, tmp_path):
    admin, deployer = fleet_db
    daemons = []
    for macid in (PI, OTHER):
        daemon = make_daemon(macid=macid, server=couch.url)
        daemon.settings["database"] = admin.db
        daemon.write_config()
        device_session(couch, admin, daemon.state_dir, macid)
        daemons.append(daemon)
    admin.put({"_id": "prog", "type": PI, "name": "blinker", "code": marker_program(tmp_path, "blinker")})
    for daemon in daemons:
        daemon.start()
    wait_for(lambda: starts(tmp_path, "blinker"), message="the program on the first Pi")
    # A device that went silent long ago.
    admin.put({"_id": "111_heartbeat", "type": "heartbeat", "macid": 111, "timestamp": "2020-01-01T00:00:00Z",
               "ip": "10.9.9.9", "version": "0.0.1", "programs": {}})

    done = hc("cmd", "--database", admin.db, str(PI), "--", "sh", "-c", "echo out; echo err >&2; exit 3",
              user=deployer, couch=couch)
    assert (done.returncode, done.stdout) == (3, "out\n"), done.stderr
    assert "err" in done.stderr
    other = hc("cmd", "--database", admin.db, str(OTHER), "--", "echo", "from the other Pi", user=deployer, couch=couch)
    assert other.returncode == 0 and other.stdout == "from the other Pi\n"
    killed = hc("cmd", "--database", admin.db, str(PI), "--timeout", "1", "--", "sleep", "30", user=deployer, couch=couch)
    assert killed.returncode == 137 and "timeout" in killed.stderr
    nobody = hc("cmd", "--database", admin.db, "999", "--wait", "1", "--", "true", user=deployer, couch=couch)
    assert nobody.returncode == 124 and "no result from 999" in nobody.stderr

    def table():
        result = hc("status", "--database", admin.db, user=deployer, couch=couch)
        return result.stdout if "blinker:RUNNING" in result.stdout and str(OTHER) in result.stdout else None
    out = wait_for(table, timeout=20, message="both Pis in the status table")
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "STALE" in lines["111"] and "STALE" not in lines[str(PI)] and "STALE" not in lines[str(OTHER)]
    assert "127.0.0.1" in lines[str(PI)]
    one = hc("status", str(OTHER), "--json", "--database", admin.db, user=deployer, couch=couch)
    assert json.loads(one.stdout)[0]["macid"] == OTHER


def test_passwords_stay_out_of_arguments_and_output(couch, fleet_db, tmp_path):
    admin, deployer = fleet_db
    result = hc("status", "--database", admin.db, user=deployer, couch=couch)
    assert deployer[1] not in result.stdout + result.stderr
    wrong = hc("status", "--database", admin.db, user=(deployer[0], "wrong-password"), couch=couch)
    assert wrong.returncode == 1 and f"refused user {deployer[0]}: " in wrong.stderr
    assert "wrong-password" not in wrong.stderr


def test_add_device_and_push_refuse_unreadable_files_in_one_line(couch, fleet_db, tmp_path):
    admin, deployer = fleet_db
    missing = tmp_path / "missing.json"
    result = hc("add-device", "--database", admin.db, "--from", str(missing), couch=couch)
    assert (result.returncode, result.stderr) == (
        2, f"himbeerecouch add-device: cannot read the credentials file {missing}: No such file or directory\n")
    garbage = tmp_path / "creds.json"
    garbage.write_text("MacID: 1\n")
    result = hc("add-device", "--database", admin.db, "--from", str(garbage), couch=couch)
    assert (result.returncode, result.stderr) == (2, f'himbeerecouch add-device: {garbage} does not hold '
                                                     '{"MacID": ..., "password": ...} as himbeerecouch-creds '
                                                     '--json prints it\n')
    result = hc("add-device", "--database", admin.db, "--from", "-", input="{", couch=couch)
    assert result.returncode == 2 and "stdin does not hold" in result.stderr
    program = tmp_path / "prog.py"
    program.write_text("def main():\n    pass\n")
    result = hc("push", str(PI), str(program), "--module", f"helper={tmp_path / 'helper.py'}", "--database",
                admin.db, user=deployer, couch=couch)
    assert (result.returncode, result.stderr) == (
        2, f"himbeerecouch push: cannot read the module file {tmp_path / 'helper.py'}: No such file or directory\n")
    assert admin.get(f"code:{PI}:prog") is None


# ---- add-user ---------------------------------------------------------------------------------

def test_add_user_makes_a_deployer_who_may_write_code_and_commands_and_a_device_may_not(couch, fleet_db, tmp_path):
    admin, _ = fleet_db
    name = f"alice-{uuid.uuid4().hex[:8]}"
    made = add_user(couch, admin.db, name, "--role", "deployer", password="alice-secret")
    try:
        assert made.returncode == 0, made.stderr
        assert made.stdout == f"created CouchDB user {name} with role deployer\n"
        assert "alice-secret" not in made.stdout + made.stderr
        alice = user_session(name, "alice-secret")
        device, _ = device_session(couch, admin, tmp_path / "pi", PI)
        for session, expected in ((alice, 201), (device, 403)):
            suffix = "a" if session is alice else "d"
            code = {"_id": f"code:{PI}:{suffix}", "type": PI, "code": "def main(): pass"}
            command = {"_id": f"cmd:{PI}:{suffix}", "type": f"{PI}_cmd", "cmd": ["true"]}
            for doc in (code, command):
                response = session.put(admin.url(doc["_id"]), json=doc, timeout=10)
                assert response.status_code == expected, (session.auth[0], doc["_id"], response.text)
        assert admin.get(f"code:{PI}:a") and admin.get(f"cmd:{PI}:a")
        assert admin.get(f"code:{PI}:d") is None and admin.get(f"cmd:{PI}:d") is None
        # The same command again updates the user: a new password, the roles kept.
        again = add_user(couch, admin.db, name, password="new-secret")
        assert again.returncode == 0 and again.stdout == f"updated CouchDB user {name} with role deployer\n"
        assert user_session(name, "new-secret").get(admin.url(), timeout=10).status_code == 200
        assert alice.get(admin.url(), timeout=10).status_code == 401
    finally:
        forget_users(couch, name)


def test_add_user_other_roles_read_only_and_a_refusal_says_each_thing_once(couch, fleet_db, tmp_path):
    admin, deployer = fleet_db
    name = f"dashboard-{uuid.uuid4().hex[:8]}"
    try:
        made = add_user(couch, admin.db, name, "--role", "viewer", password="view-secret")
        assert made.returncode == 0, made.stderr
        assert made.stdout == (f"created CouchDB user {name} with role viewer\n"
                               f"added role viewer to the members of database {admin.db}\n")
        roles = admin.http.get(admin.url("_security"), timeout=10).json()["members"]["roles"]
        assert roles[-1] == "viewer" and {"raspberry", "deployer"} < set(roles)   # added, nothing removed
        viewer = (name, "view-secret")
        assert json.loads(hc("status", "--json", "--database", admin.db, user=viewer, couch=couch).stdout) == []
        # The server comes from the operator's file only: the message names it once.
        config = tmp_path / "admin.conf"
        config.write_text(f"[himbeerecouch-admin]\nserver = {couch.url}\ndatabase = {admin.db}\n")
        program = tmp_path / "prog.py"
        program.write_text("def main():\n    pass\n")
        refused = hc("push", "--admin-config", str(config), str(PI), str(program), user=viewer, server=False,
                     couch=couch)
        assert refused.returncode == 1
        assert refused.stderr == (f"himbeerecouch push: the server {couch.url} refused user {name}: "
                                  "only deployers and devices may write to this database\n")
        # --keep-password: roles added to an existing user, its password unchanged.
        kept = hc("add-user", deployer[0], "--role", "viewer", "--keep-password", "--database", admin.db,
                  couch=couch)
        assert kept.returncode == 0, kept.stderr
        assert kept.stdout == (f"updated CouchDB user {deployer[0]} with roles deployer, viewer (viewer added); "
                               "password kept\n")
        assert user_session(*deployer).get(admin.url(), timeout=10).status_code == 200
    finally:
        forget_users(couch, name)


def test_add_user_passwords_never_in_arguments(couch, fleet_db):
    admin, _ = fleet_db
    name = f"ci-{uuid.uuid4().hex[:8]}"
    try:
        # Not a terminal and no option: nothing is made.
        refused = hc("add-user", name, "--database", admin.db, couch=couch)
        assert (refused.returncode, refused.stderr) == (2, (
            "himbeerecouch add-user: no password: stdin is not a terminal; give --password-stdin "
            "(the password as one line on stdin) or --generate-password\n"))
        assert hc("add-user", name, "--keep-password", "--database", admin.db, couch=couch).stderr == (
            f"himbeerecouch add-user: there is no user {name} whose password could be kept\n")
        for wrong in (["--role", "raspberry"], ["--role", "_admin"]):
            assert hc("add-user", name, *wrong, "--generate-password", "--database", admin.db,
                      couch=couch).returncode == 2
        assert user_session(name, "x").get(f"{couch.url}/_session", timeout=10).status_code == 401
        # A made-up password, printed once.
        made = hc("add-user", name, "--generate-password", "--database", admin.db, couch=couch)
        assert made.returncode == 0, made.stderr
        first, second = made.stdout.splitlines()
        assert first == f"created CouchDB user {name} with role deployer" and second.startswith("password: ")
        password = second.removeprefix("password: ")
        assert len(password) == 20 and password not in made.stderr
        assert user_session(name, password).get(admin.url(), timeout=10).status_code == 200
    finally:
        forget_users(couch, name)


def test_add_user_asks_twice_on_a_terminal(couch, fleet_db):
    admin, _ = fleet_db
    name = f"bob-{uuid.uuid4().hex[:8]}"

    def on_terminal(*answers):
        master, slave = os.openpty()
        process = subprocess.Popen([sys.executable, "-m", "himbeerecouch", "add-user", name, "--database", admin.db],
                                   stdin=slave, stdout=subprocess.PIPE, stderr=slave, text=True,
                                   env=operator_env(couch=couch), start_new_session=True)
        os.close(slave)
        screen = b""
        try:
            for prompt, answer in zip((b"new password for", b"the same password again"), answers):
                deadline = time.monotonic() + 30
                while prompt not in screen and time.monotonic() < deadline:
                    if select.select([master], [], [], 1)[0]:
                        screen += os.read(master, 1024)
                assert prompt in screen, screen
                os.write(master, answer.encode() + b"\n")
            out, _ = process.communicate(timeout=30)
            while select.select([master], [], [], 0.2)[0]:
                try:
                    screen += os.read(master, 1024)
                except OSError:
                    break
        finally:
            os.close(master)
        return process.returncode, out, screen.decode(errors="replace")

    try:
        code, out, screen = on_terminal("one-secret", "another-secret")
        assert code == 2 and "the two passwords differ; nothing changed" in screen, screen
        assert hc("add-user", name, "--keep-password", "--database", admin.db, couch=couch).returncode == 2
        code, out, screen = on_terminal("typed-secret", "typed-secret")
        assert code == 0 and out == f"created CouchDB user {name} with role deployer\n", screen
        assert "typed-secret" not in out + screen                      # not echoed
        assert user_session(name, "typed-secret").get(admin.url(), timeout=10).status_code == 200
    finally:
        forget_users(couch, name)


# ---- cmd: exit statuses, --cancel-after --------------------------------------------------------

def hc_start(*args, user=ADMIN, couch=None) -> subprocess.Popen:
    """An operator command that runs while the test does something else."""
    return subprocess.Popen([sys.executable, "-m", "himbeerecouch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env=operator_env(user, None, couch))


def fleet_daemon(couch, admin, make_daemon, macid=PI, **settings):
    """A daemon for `macid` on the fleet database, logged in as its own device user."""
    daemon = make_daemon(macid=macid, server=couch.url, **settings)
    daemon.settings["database"] = admin.db
    daemon.write_config()
    device_session(couch, admin, daemon.state_dir, macid)
    return daemon


def command_docs(admin) -> list[dict]:
    response = admin.http.post(admin.url("_find"), json={"selector": {"type": f"{PI}_cmd"}}, timeout=10)
    return response.json()["docs"]


def test_cmd_exit_statuses(couch, fleet_db, make_daemon, tmp_path):
    admin, deployer = fleet_db
    daemon = fleet_daemon(couch, admin, make_daemon)
    daemon.start()

    def cmd(*argv, options=()):
        return hc("cmd", "--database", admin.db, *options, str(PI), "--", *argv, user=deployer, couch=couch)

    assert cmd("true").returncode == 0
    signalled = cmd("sh", "-c", "kill -TERM $$")
    assert signalled.returncode == 128 + 15, signalled.stderr
    missing = cmd("no-such-program-here")
    assert missing.returncode == 127 and "No such file or directory" in missing.stderr
    not_executable = cmd("/dev/null")
    assert not_executable.returncode == 126 and "Permission denied" in not_executable.stderr
    # A command claimed before --cancel-after ends runs, and its result is waited for.
    claimed = cmd("sh", "-c", "sleep 2; echo ran", options=("--cancel-after", "1"))
    assert (claimed.returncode, claimed.stdout) == (0, "ran\n"), claimed.stderr
    assert not any(doc.get("error") == "withdrawn" for doc in command_docs(admin))
    # Its own failures: 125, never a number a command may use for itself.
    usage = hc("cmd", "--database", admin.db, "--bogus", str(PI), "--", "true", user=deployer, couch=couch)
    assert usage.returncode == 125 and "unrecognized arguments: --bogus" in usage.stderr
    assert cmd("true", options=("--timeout", "0")).returncode == 125
    assert cmd("true", options=("--wait", "1", "--cancel-after", "5")).returncode == 125
    refused = hc("cmd", "--database", admin.db, str(PI), "--", "true", user=(deployer[0], "wrong"), couch=couch)
    assert refused.returncode == 125 and f"refused user {deployer[0]}" in refused.stderr
    assert len(command_docs(admin)) == 5           # none of those was sent
    # A command still running when the daemon stops is interrupted: its own status, 123.
    running = hc_start("cmd", "--database", admin.db, str(PI), "--", "sleep", "30", user=deployer, couch=couch)
    daemon.wait_log("running ['sleep', '30']")
    daemon.stop()
    out, err = running.communicate(timeout=60)
    assert running.returncode == 123, err
    assert "himbeerecouch cmd: interrupted" in err


def test_cmd_not_run_when_the_device_cannot_record_it(couch, fleet_db, make_daemon, tmp_path):
    admin, deployer = fleet_db
    daemon = fleet_daemon(couch, admin, make_daemon)
    (daemon.state_dir / "commands.json").mkdir(parents=True)      # the ledger cannot be written
    daemon.start()
    marker = tmp_path / "ran"
    result = hc("cmd", "--database", admin.db, str(PI), "--", "touch", str(marker), user=deployer, couch=couch)
    assert result.returncode == 125, result.stderr
    assert "not run: cannot write the state dir" in result.stderr and not marker.exists()


def test_cancel_after_withdraws_an_unclaimed_command_for_good(couch, fleet_db, make_daemon, tmp_path):
    admin, deployer = fleet_db
    marker = tmp_path / "ran"
    started = time.monotonic()
    result = hc("cmd", "--database", admin.db, "--cancel-after", "1", str(PI), "--", "touch", str(marker),
                user=deployer, couch=couch)
    assert result.returncode == 122, result.stderr
    assert time.monotonic() - started < 20                 # not the 60 s of --wait
    [doc] = command_docs(admin)
    assert result.stderr == (f"himbeerecouch cmd: withdrawn: {PI} did not claim it within 1 s; it will not "
                             f"run (document {doc['_id']})\n")
    assert doc["error"] == "withdrawn" and doc["ret"][0] is None and "claimed" not in doc
    # A Pi that comes online afterwards never runs it, but runs what comes next.
    daemon = fleet_daemon(couch, admin, make_daemon)
    daemon.start()
    after = hc("cmd", "--database", admin.db, str(PI), "--", "echo", "next", user=deployer, couch=couch)
    assert (after.returncode, after.stdout) == (0, "next\n"), after.stderr
    time.sleep(1)
    assert not marker.exists()
    assert admin.get(doc["_id"]) == doc


def test_withdrawal_and_claim_race_on_the_revision(couch, fleet_db):
    from himbeerecouch.command_client import withdraw
    from himbeerecouch.couch import Conflict, Database
    admin, _ = fleet_db
    db = Database(couch.url, admin.db, credentials=ADMIN)
    # The device claims first: the withdrawal, made with the unclaimed revision, changes nothing.
    seen = db.put({"_id": "c1", "type": f"{PI}_cmd", "cmd": ["true"]})
    claimed = db.put({**seen, "claimed": "2026-11-28T00:00:00.000Z"})
    assert withdraw(db, seen, "withdrawn") is None
    assert db.get("c1") == claimed
    # The withdrawal comes first: the device's claim of that revision is refused, so it never runs.
    seen = db.put({"_id": "c2", "type": f"{PI}_cmd", "cmd": ["true"]})
    assert withdraw(db, seen, "withdrawn")["error"] == "withdrawn"
    with pytest.raises(Conflict):
        db.put({**seen, "claimed": "2026-11-28T00:00:00.000Z"})
    assert "claimed" not in db.get("c2") and db.get("c2")["ret"] == [None, "withdrawn"]
