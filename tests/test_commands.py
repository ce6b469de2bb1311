"""Command documents, run by a daemon that logs in with its own device credentials."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
import requests

from support import marker_program, starts
from support import wait_for

pytestmark = pytest.mark.integration
MACID = 202481596538417
CMD = f"{MACID}_cmd"


def result(admin, doc_id, timeout=15.0):
    return wait_for(lambda: (admin.get(doc_id) or {}).get("ret") is not None and admin.get(doc_id),
                    timeout, message=f"the result of {doc_id}: {admin.get(doc_id)}")


def ended(pid: int) -> bool:
    """No such process, or a zombie that its new parent has not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_a_command_runs_once_and_its_output_is_written_back(couch, admin, device):
    daemon = device()
    daemon.start()
    daemon.wait_log("following changes")
    anonymous = requests.get(admin.url(), timeout=10)
    assert anonymous.status_code in (401, 403), "the database must be closed to strangers"
    admin.put({"_id": "c1", "type": CMD, "cmd": ["sh", "-c", "echo out; echo err >&2; exit 3"]})
    doc = result(admin, "c1")
    assert doc["ret"] == ["out\n", "err\n"] and doc["returncode"] == 3
    assert doc["started"] <= doc["finished"] and doc["finished"].endswith("Z")
    assert "claimed" in doc and "error" not in doc
    heartbeat = wait_for(lambda: admin.get(f"{MACID}_heartbeat"), message="the heartbeat written as the device")
    assert heartbeat["macid"] == MACID


@pytest.mark.parametrize("doc_id", [".", "..", "a/b", "?x=1#y"])
def test_a_command_whose_id_means_something_in_a_url_is_answered(admin, device, doc_id):
    """"." and ".." are path segments to an HTTP client, which drops them: the answer would go
    to the database itself, not to the command."""
    daemon = device()
    daemon.start()
    admin.put({"_id": doc_id, "type": CMD, "cmd": ["echo", "hi"]})
    doc = result(admin, doc_id)
    assert doc["ret"] == ["hi\n", ""] and doc["returncode"] == 0, doc


@pytest.mark.parametrize("cmd, reason", [
    ("uname -a", "'cmd' must be a list of strings"),
    ([1, 2], "every element of 'cmd' must be a string"),
    ([], "'cmd' is empty"),
    (None, "no 'cmd'"),
    ({"prog": "x"}, "'cmd' must be a list of strings"),
])
def test_malformed_commands_get_a_clear_reason_and_run_nothing(admin, device, cmd, reason, tmp_path):
    daemon = device()
    daemon.start()
    daemon.wait_log("following changes")
    doc = {"_id": "bad", "type": CMD}
    if cmd is not None:
        doc["cmd"] = cmd
    admin.put(doc)
    done = result(admin, "bad")
    assert done["ret"][0] is None and reason in done["ret"][1] and done["returncode"] is None


def test_a_program_that_cannot_start_is_reported_like_the_original(admin, device):
    daemon = device()
    daemon.start()
    admin.put({"_id": "missing", "type": CMD, "cmd": ["/no/such/program", "x"]})
    doc = result(admin, "missing")
    assert doc["ret"][0] is None and doc["ret"][1].startswith("FileNotFoundError(")
    assert doc["returncode"] is None


def test_timeout_kills_the_command_group(admin, device, tmp_path):
    daemon = device()
    daemon.start()
    marker = tmp_path / "grandchild"
    admin.put({"_id": "slow", "type": CMD, "timeout": 1,
               "cmd": ["sh", "-c", f"sleep 60 & echo $! > {marker}; echo partial; wait"]})
    doc = result(admin, "slow")
    assert doc["error"] == "timeout: killed after 1 s" and doc["returncode"] == -signal.SIGKILL
    assert doc["ret"][0] == "partial\n"
    pid = int(marker.read_text())
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=5, message="the background child killed too")


def test_output_is_capped_and_bad_bytes_are_replaced(admin, device):
    daemon = device(command_output_cap_bytes=1000)
    daemon.start()
    admin.put({"_id": "big", "type": CMD, "cmd": ["sh", "-c", "head -c 5000 /dev/zero | tr '\\0' x"]})
    admin.put({"_id": "bytes", "type": CMD, "cmd": ["printf", "ok \\377\\376 end"]})
    big = result(admin, "big")
    assert big["ret"][0].startswith("x" * 1000) and "[output truncated: 4000 more bytes" in big["ret"][0]
    assert big["truncated"] is True and big["returncode"] == 0
    assert result(admin, "bytes")["ret"][0] == "ok \ufffd\ufffd end"


def test_a_command_interrupted_by_a_crash_is_not_run_again(admin, device, tmp_path):
    daemon = device()
    daemon.start()
    runs = tmp_path / "runs"
    admin.put({"_id": "long", "type": CMD, "cmd": ["sh", "-c", f"echo $$ >> {runs}; exec sleep 60"]})
    wait_for(lambda: runs.exists() and runs.read_text().endswith("\n"), message="the command to start")
    daemon.process.kill()                       # no goodbye, as a crash; no systemd to end the group
    daemon.process.wait()
    daemon.start()
    doc = result(admin, "long")
    assert doc["error"] == "interrupted" and doc["ret"][0] is None and "not run again" in doc["ret"][1]
    assert "was still running" in doc["ret"][1] and "was killed" in doc["ret"][1]
    assert ended(int(runs.read_text())), "the leftover command still runs"
    time.sleep(1)
    assert len(runs.read_text().splitlines()) == 1


def test_duplicate_deliveries_run_a_command_once(admin, device, tmp_path):
    daemon = device()
    daemon.start()
    daemon.wait_log("following changes")
    assert daemon.stop() == 0
    runs = tmp_path / "runs"
    admin.put({"_id": "once", "type": CMD, "cmd": ["sh", "-c", f"echo run >> {runs}"]})
    # Replay the whole feed: the command arrives through the first read and the feed, twice over.
    checkpoint = daemon.state_dir / "checkpoint.json"
    content = json.loads(checkpoint.read_text())
    checkpoint.write_text(json.dumps({**content, "seq": 0}))
    daemon.start()
    result(admin, "once")
    admin.put({**admin.get("once"), "note": "touched after it ran"})
    time.sleep(1.5)
    assert runs.read_text() == "run\n"


def test_a_long_command_delays_neither_other_commands_nor_programs(admin, device, tmp_path):
    daemon = device(max_parallel_commands=1)
    daemon.start()
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p")})
    wait_for(lambda: starts(tmp_path, "p"), message="the program")
    admin.put({"_id": "sleeper", "type": CMD, "cmd": ["sleep", "20"]})
    wait_for(lambda: "claimed" in (admin.get("sleeper") or {}), message="the long command to be claimed")
    admin.put({"_id": "quick", "type": CMD, "cmd": ["true"]})
    wait_for(lambda: "claimed" in (admin.get("quick") or {}), timeout=3, message="the next claim, at once")
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p", '    log("v2")')})
    daemon.wait_log("p: v2", timeout=5)
    assert admin.get("sleeper").get("ret") is None
    # Stopping the daemon ends the long command, reported as interrupted.
    assert daemon.stop() == 0
    doc = admin.get("sleeper")
    assert doc.get("error") == "interrupted", doc


def test_commands_get_no_notify_socket(admin, device, tmp_path):
    daemon = device()
    daemon.start(env={"NOTIFY_SOCKET": str(tmp_path / "nowhere")})
    admin.put({"_id": "env", "type": CMD, "cmd": ["env"]})
    out = result(admin, "env")["ret"][0]
    assert "NOTIFY_SOCKET" not in out and "PATH=" in out


def test_sighup_lets_a_running_command_finish(admin, device, tmp_path):
    daemon = device()
    daemon.start()
    started = tmp_path / "started"
    admin.put({"_id": "steady", "type": CMD, "cmd": ["sh", "-c", f"touch {started}; sleep 2; echo done"]})
    wait_for(lambda: started.exists(), message="the command to start")
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("SIGHUP: re-reading")
    doc = result(admin, "steady")
    assert doc["ret"][0] == "done\n" and doc["returncode"] == 0 and "error" not in doc
