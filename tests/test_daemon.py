"""The daemon against the real CouchDB-protocol test server: programs follow their documents."""
from __future__ import annotations

import os
import signal
import time

import pytest

from support import marker_program, starts
from support import ADMIN, wait_for

pytestmark = pytest.mark.integration
MACID = 202481596538417


def status_doc(admin, macid=MACID):
    return admin.get(f"{macid}_heartbeat")


def program_status(admin, doc_id, macid=MACID):
    doc = status_doc(admin, macid)
    return (doc or {}).get("programs", {}).get(doc_id)


def wait_state(admin, doc_id, state, timeout=15.0, macid=MACID):
    return wait_for(lambda: (program_status(admin, doc_id, macid) or {}).get("state") == state
                    and program_status(admin, doc_id, macid), timeout,
                    message=f"{doc_id} in state {state}; status is {program_status(admin, doc_id, macid)}")


def test_a_program_runs_and_its_output_is_logged(admin, make_daemon, tmp_path):
    admin.put({"_id": "hello", "type": MACID, "name": "greeter",
               "code": marker_program(tmp_path, "hello", '    print("to stdout")\n'
                                                         '    import sys; print("to stderr", file=sys.stderr)')})
    daemon = make_daemon()
    daemon.start()
    wait_for(lambda: starts(tmp_path, "hello"), message="the program to start")
    daemon.wait_log("greeter: started hello")
    daemon.wait_log("greeter: to stdout")
    daemon.wait_log("greeter: to stderr")
    status = wait_state(admin, "hello", "RUNNING")
    assert status["pid"] == int(starts(tmp_path, "hello")[0].split("-")[1])
    doc = status_doc(admin)
    assert doc["type"] == "heartbeat" and doc["running_ids"] == ["hello"]
    for field in ("ip", "timestamp", "version", "hostname", "uptime"):
        assert doc[field] is not None, field


def test_a_change_restarts_exactly_that_program(admin, make_daemon, tmp_path):
    admin.put({"_id": "a", "type": MACID, "code": marker_program(tmp_path, "a")})
    admin.put({"_id": "b", "type": str(MACID), "code": marker_program(tmp_path, "b")})
    daemon = make_daemon()
    daemon.start()
    wait_for(lambda: starts(tmp_path, "a") and starts(tmp_path, "b"), message="both programs")
    admin.put({"_id": "a", "type": MACID, "code": marker_program(tmp_path, "a", '    log("v2")')})
    daemon.wait_log("a: v2")
    daemon.wait_log("a: quitting a")
    assert len(starts(tmp_path, "a")) == 2
    time.sleep(0.5)
    assert len(starts(tmp_path, "b")) == 1


def test_delete_and_disable_stop_the_program(admin, make_daemon, tmp_path):
    admin.put({"_id": "gone", "type": MACID, "code": marker_program(tmp_path, "gone")})
    admin.put({"_id": "off", "type": MACID, "code": marker_program(tmp_path, "off")})
    daemon = make_daemon()
    daemon.start()
    wait_for(lambda: starts(tmp_path, "gone") and starts(tmp_path, "off"), message="both programs")
    admin.delete("gone")
    admin.put({"_id": "off", "type": MACID, "enabled": False, "code": marker_program(tmp_path, "off")})
    daemon.wait_log("gone: quitting gone")
    daemon.wait_log("off: quitting off")
    wait_for(lambda: program_status(admin, "gone") is None and
             (program_status(admin, "off") or {}).get("state") == "STOPPED", message="status of both")
    admin.put({"_id": "off", "type": MACID, "enabled": True, "code": marker_program(tmp_path, "off")})
    wait_for(lambda: len(starts(tmp_path, "off")) == 2, message="the re-enabled program")


def test_moving_a_document_to_another_pi_stops_it_here(admin, make_daemon, tmp_path):
    daemon = make_daemon()
    daemon.start()
    daemon.wait_log("following changes")
    # Created after start-up: the follower learns of it from the feed, not from the first read.
    admin.put({"_id": "mover", "type": MACID, "code": marker_program(tmp_path, "mover")})
    wait_for(lambda: starts(tmp_path, "mover"), message="the program")
    admin.put({"_id": "mover", "type": 1234, "code": marker_program(tmp_path, "mover")})
    daemon.wait_log("mover: quitting mover")


def test_modules_and_global_modules(admin, make_daemon, tmp_path):
    user = '''
import helper, calib
def main():
    log("value", helper.double(calib.K))
    helper.wait_for_quit()
'''
    helper = '''
def double(x):
    return 2 * x
def wait_for_quit():
    import time
    while not should_quit():
        time.sleep(0.05)
'''
    admin.put({"_id": "user", "type": MACID, "code": user, "modules": {"helper": helper}})
    admin.put({"_id": "lib", "type": MACID, "global_modules": {"calib": "K = 21"}})
    admin.put({"_id": "other", "type": MACID, "code": marker_program(tmp_path, "other")})
    daemon = make_daemon()
    daemon.start()
    daemon.wait_log("user: value 42")
    wait_for(lambda: starts(tmp_path, "other"), message="the other program")
    # A change of the global modules restarts every program of this Pi (they all can see them).
    admin.put({"_id": "lib", "type": MACID, "global_modules": {"calib": "K = 50"}})
    daemon.wait_log("user: value 100")
    wait_for(lambda: len(starts(tmp_path, "other")) == 2, message="the other program to restart")


def test_a_program_that_ignores_quit_is_killed_after_the_grace_period(admin, make_daemon, tmp_path):
    stubborn = '''
import signal, time, os
def main():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(os.path.join(%r, "stubborn-" + str(os.getpid())), "w").close()
    while True:
        time.sleep(0.1)
''' % str(tmp_path)
    admin.put({"_id": "stubborn", "type": MACID, "code": stubborn})
    daemon = make_daemon(grace_seconds=1)
    daemon.start()
    wait_for(lambda: starts(tmp_path, "stubborn"), message="the program")
    pid = int(starts(tmp_path, "stubborn")[0].split("-")[1])
    admin.delete("stubborn")
    daemon.wait_log("did not quit within 1 s")
    daemon.wait_log("killed by SIGKILL after the grace period")
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), message="the process to be gone")
    assert daemon.log().count("did not quit within") == 1


def test_programs_do_not_outlive_a_killed_daemon(admin, make_daemon, tmp_path):
    stubborn = marker_program(tmp_path, "orphan", '    import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n'
                                                   '    register_quit_notification(lambda: log("told to quit"))\n'
                                                   '    while True: time.sleep(0.1)')
    admin.put({"_id": "orphan", "type": MACID, "code": stubborn})
    daemon = make_daemon(grace_seconds=1)
    daemon.start()
    wait_for(lambda: starts(tmp_path, "orphan"), message="the program")
    pid = int(starts(tmp_path, "orphan")[0].split("-")[1])
    daemon.process.kill()               # no systemd here to clean up after it
    daemon.process.wait()
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or " Z " in open(f"/proc/{pid}/stat").read(),
             timeout=10, message="the orphaned program to end itself after the grace period")


def test_restart_policies(admin, make_daemon, tmp_path):
    crash = 'import os\ndef main():\n    open(os.path.join(%r, "crash-" + str(os.getpid())), "w").close()\n' \
            '    raise RuntimeError("sensor on fire")\n' % str(tmp_path)
    once = 'import os\ndef main():\n    open(os.path.join(%r, "once-" + str(os.getpid())), "w").close()\n' % str(tmp_path)
    again = 'import os\ndef main():\n    open(os.path.join(%r, "again-" + str(os.getpid())), "w").close()\n' % str(tmp_path)
    admin.put({"_id": "crash", "type": MACID, "code": crash})
    admin.put({"_id": "never", "type": MACID, "code": crash.replace("crash-", "never-"), "restart": "no"})
    admin.put({"_id": "once", "type": MACID, "code": once})
    admin.put({"_id": "again", "type": MACID, "code": again, "restart": "always"})
    daemon = make_daemon()
    daemon.start()
    wait_for(lambda: len(starts(tmp_path, "crash")) >= 3, message="on-failure restarts")
    wait_for(lambda: len(starts(tmp_path, "again")) >= 3, message="always restarts")
    status = wait_for(lambda: (program_status(admin, "crash") or {}).get("restarts", 0) >= 2
                      and program_status(admin, "crash"), message="restarts counted")
    assert "RuntimeError: sensor on fire" in status["last_error"]
    assert status["last_exit"] == "exited with code 1"
    assert wait_state(admin, "once", "EXITED")["last_exit"] == "exited normally"
    assert wait_state(admin, "never", "EXITED")["restarts"] == 0
    assert len(starts(tmp_path, "once")) == 1 and len(starts(tmp_path, "never")) == 1
    daemon.wait_log("crash: main() raised RuntimeError: sensor on fire")


def test_bad_documents_get_clear_errors_and_disturb_nothing(admin, make_daemon, tmp_path):
    admin.put({"_id": "good", "type": MACID, "code": marker_program(tmp_path, "good")})
    daemon = make_daemon(max_program_bytes=100000)
    daemon.start()
    wait_for(lambda: starts(tmp_path, "good"), message="the good program")
    bad = {
        "syntax": ({"code": "def main(:\n  pass"}, "SyntaxError"),
        "nomain": ({"code": "x = 1"}, "defines no main()"),
        "raises": ({"code": "def main():\n    raise ValueError('bad value')", "restart": "no"},
                   "ValueError: bad value"),
        "wrongtype": ({"code": ["not", "a", "string"]}, "'code' must be a string"),
        "huge": ({"code": "# " + "x" * 200000 + "\ndef main(): pass"}, "too large"),
    }
    for doc_id, (fields, _) in bad.items():
        admin.put({"_id": doc_id, "type": MACID, "colour": "unknown fields are fine", **fields})
    def settled_with(doc_id, expected):
        # The child reports its error before it exits, so a heartbeat may briefly show the
        # error with the program still STARTING: wait for the state the exit leads to.
        status = program_status(admin, doc_id) or {}
        return (expected in (status.get("last_error") or "")
                and status.get("state") in ("FATAL", "EXITED") and status)

    for doc_id, (_, expected) in bad.items():
        wait_for(lambda: settled_with(doc_id, expected),
                 message=f"error {expected!r} and a final state for {doc_id}: {program_status(admin, doc_id)}")
        daemon.wait_log(expected)
    assert len(starts(tmp_path, "good")) == 1
    wait_state(admin, "good", "RUNNING")
    assert daemon.process.poll() is None
    # A module that is missing may be installed later: that program is retried, not given up.
    admin.put({"_id": "badmodule", "type": MACID, "code": "import missing_helper\ndef main(): pass"})
    status = wait_for(lambda: (program_status(admin, "badmodule") or {}).get("restarts", 0) >= 1
                      and program_status(admin, "badmodule"), message="badmodule retried")
    assert "ModuleNotFoundError" in status["last_error"] and status["state"] != "FATAL"
    # Fixing a document makes it run.
    admin.put({"_id": "syntax", "type": MACID, "code": marker_program(tmp_path, "fixed")})
    wait_for(lambda: starts(tmp_path, "fixed"), message="the fixed program")


def test_sigterm_stops_everything_with_no_orphans(admin, make_daemon, tmp_path):
    spawner = marker_program(tmp_path, "spawner",
                             '    import subprocess\n'
                             '    child = subprocess.Popen(["sleep", "300"])\n'
                             '    open(os.path.join(%r, "grandchild-" + str(child.pid)), "w").close()' % str(tmp_path))
    admin.put({"_id": "spawner", "type": MACID, "code": spawner})
    admin.put({"_id": "plain", "type": MACID, "code": marker_program(tmp_path, "plain")})
    daemon = make_daemon()
    daemon.start()
    wait_for(lambda: starts(tmp_path, "grandchild") and starts(tmp_path, "plain"), message="programs")
    pids = [int(name.split("-")[1]) for name in
            starts(tmp_path, "grandchild") + starts(tmp_path, "plain") + starts(tmp_path, "spawner")]
    assert daemon.stop() == 0
    assert "quitting plain" in daemon.log() and "stopped" in daemon.log()
    assert "ended unexpectedly" not in daemon.log()
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in pids), timeout=5,
             message="no process of the programs left")


def test_sighup_rereads_the_config(admin, make_daemon, tmp_path):
    admin.put({"_id": "first", "type": MACID, "code": marker_program(tmp_path, "first")})
    admin.put({"_id": "second", "type": 42, "code": marker_program(tmp_path, "second")})
    daemon = make_daemon()
    daemon.start()
    wait_for(lambda: starts(tmp_path, "first"), message="the first Pi's program")
    daemon.settings["macid"] = "42"
    daemon.write_config()
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: starts(tmp_path, "second"), message="the program of the new MacID")
    daemon.wait_log("first: quitting first")


def test_sighup_with_new_credentials_restarts_the_programs_with_them(couch, admin, make_daemon, tmp_path):
    reader = admin.http.put(f"{couch.url}/_users/org.couchdb.user:reader", timeout=10,
                            json={"name": "reader", "password": "pw2", "roles": [], "type": "user"})
    assert reader.status_code in (201, 202), reader.text
    acct = marker_program(tmp_path, "acct", '    log("account", get_acct()[0])')
    admin.put({"_id": "acct", "type": MACID, "code": acct})
    admin.put({"_id": "other", "type": MACID, "code": marker_program(tmp_path, "other")})
    daemon = make_daemon()
    daemon.start()
    daemon.wait_log(f"acct: account {ADMIN[0]}")
    wait_for(lambda: starts(tmp_path, "other"), message="the other program")
    # The same server as another user: the programs' get_database() must use it too.
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("SIGHUP: re-reading")
    time.sleep(0.5)
    assert len(starts(tmp_path, "acct")) == 1      # an unchanged configuration restarts nothing
    daemon.settings["server"] = f"http://reader:pw2@{couch.host}:{couch.port}"
    daemon.write_config()
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("acct: account reader")
    daemon.wait_log("acct: stopping: the database settings changed")
    wait_for(lambda: len(starts(tmp_path, "other")) == 2, message="the other program with the new settings")
    assert "pw2" not in daemon.log()


def test_sigusr1_logs_every_thread_stack(admin, make_daemon):
    daemon = make_daemon()
    daemon.start()
    daemon.wait_log("following changes")
    daemon.signal(signal.SIGUSR1)
    daemon.wait_log("stack of thread changes-follower")
    daemon.wait_log("stack of thread MainThread")
    assert daemon.process.poll() is None


def test_the_status_document_survives_a_conflicting_write(admin, make_daemon, tmp_path):
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p")})
    daemon = make_daemon()
    daemon.start()
    wait_state(admin, "p", "RUNNING")
    admin.put({"_id": f"{MACID}_heartbeat", "type": "heartbeat", "intruder": True})
    wait_for(lambda: "programs" in (status_doc(admin) or {}), message="the daemon's status again")


def test_the_status_uptime_is_current_in_every_write(admin, make_daemon):
    daemon = make_daemon(status_interval_seconds=1)
    daemon.start()
    first = wait_for(lambda: status_doc(admin), message="a status document")
    # Nothing changes from here on: the rewrites every interval must still carry a fresh uptime.
    later = wait_for(lambda: (status_doc(admin) or {}).get("uptime", 0) >= first["uptime"] + 2
                     and status_doc(admin), timeout=10, message="a later uptime")
    assert later["timestamp"] != first["timestamp"]


def test_sighup_applies_a_new_log_level(admin, make_daemon):
    daemon = make_daemon(log_level="WARNING")
    daemon.start()
    wait_for(lambda: status_doc(admin), message="a status document")
    assert " INFO " not in daemon.log()
    daemon.settings["log_level"] = "INFO"
    daemon.write_config()
    daemon.signal(signal.SIGHUP)
    daemon.wait_log(" INFO himbeerecouch.feed: following changes")
