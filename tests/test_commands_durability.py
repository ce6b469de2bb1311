"""At most once when the state dir fails, and commands left running by a killed daemon.

The runner tests use the real test server; only the disk is made to fail (write_atomic raises
ENOSPC, as a full SD card does), which the state-dir fault tier also does with real mounts.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from himbeerecouch import commands, state
from himbeerecouch.commands import CLAIMED, FINISHED, STARTED, CommandRunner, Limits
from himbeerecouch.couch import Database
from himbeerecouch.state import StateDir
from support import wait_for

MACID = 202481596538417
CMD = f"{MACID}_cmd"
OWNER = {"server": "test", "database": "test", "macid": MACID}


# ---- the decision, table-driven -------------------------------------------------------------

@pytest.mark.parametrize("doc, entry, action", [
    ({"cmd": ["true"]}, None, "claim"),
    ({"cmd": ["true"], "ret": ["", ""]}, None, "drop"),
    ({"cmd": ["true"], "ret": ["", ""]}, {"state": FINISHED, "result": {}}, "drop"),
    ({"cmd": ["true"], "claimed": "t"}, {"state": FINISHED, "result": {}}, "report"),
    ({"cmd": ["true"], "claimed": "t"}, {"state": CLAIMED}, "run"),
    ({"cmd": ["true"], "claimed": "t"}, {"state": STARTED, "token": "x"}, "interrupted"),
    ({"cmd": ["true"], "claimed": "t"}, None, "interrupted"),
    ({"cmd": ["true"]}, {"state": FINISHED, "result": {}}, "report"),
])
def test_decide(doc, entry, action):
    assert commands.decide(doc, entry) == action


# ---- the ledger -------------------------------------------------------------------------------

@pytest.fixture
def failing_disk(monkeypatch):
    """`fail(predicate)`: from now on, writes whose content matches raise ENOSPC."""
    real = state.write_atomic
    rules: list = []

    def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
        if any(rule(path, data) for rule in rules):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data, mode)

    monkeypatch.setattr(state, "write_atomic", write_atomic)
    return rules.append


def test_a_ledger_record_that_cannot_be_written_raises_and_is_not_kept(tmp_path, failing_disk):
    store = StateDir(tmp_path, OWNER)
    ledger = commands.Ledger(store)
    ledger.set("a", {"state": CLAIMED})
    failing_disk(lambda path, data: True)
    with pytest.raises(commands.LedgerError, match="No space left"):
        ledger.set("a", {"state": STARTED, "token": "t"})
    assert ledger.get("a") == {"state": CLAIMED}, "memory must agree with the disk"
    # Best-effort records (results) stay in memory for the report, though the disk refuses them.
    assert ledger.set("a", {"state": FINISHED, "result": {}}, durable=False) is False
    assert ledger.get("a")["state"] == FINISHED
    assert commands.Ledger(store).get("a") == {"state": CLAIMED}


def test_prepare_removes_temp_files_left_by_a_killed_writer(tmp_path):
    left = [tmp_path / ".commands.json.k2j3h4g5.tmp", tmp_path / ".code.json.abcdefgh.tmp"]
    for path in left:
        path.write_text("{half")
        os.utime(path, (state.PROCESS_STARTED - 60, state.PROCESS_STARTED - 60))   # a dead writer's
    keep = [tmp_path / "commands.json", tmp_path / "notes.tmp", tmp_path / ".hidden"]
    for path in keep:
        path.write_text("{}")
    StateDir(tmp_path, OWNER).prepare()
    assert not any(path.exists() for path in left)
    assert all(path.exists() for path in keep)


def test_prepare_keeps_a_temp_file_being_written_now(tmp_path):
    # Another writer (himbeerecouch-creds, or this daemon's own threads on SIGHUP) is mid-write.
    fresh = tmp_path / ".credentials.json.zzzzzzzz.tmp"
    fresh.write_text("{")
    StateDir(tmp_path, OWNER).prepare()
    assert fresh.exists()


def test_commands_run_in_the_limits_workdir_not_the_state_dir(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    result = commands.run_command(["pwd"], 5, Limits(timeout=5, output_cap=1000, workdir=str(workdir)))
    assert result["ret"][0] == f"{workdir}\n"


# ---- the runner against the real server, with a failing disk ----------------------------------

@pytest.fixture
def runner_factory(couch, admin, tmp_path):
    runners: list[CommandRunner] = []
    workdir = tmp_path / "run"
    workdir.mkdir()

    def factory() -> CommandRunner:
        runner = CommandRunner(connect=lambda: Database(couch.admin_url, admin.db), macid=MACID,
                               state=StateDir(tmp_path / "state", OWNER), max_parallel=1,
                               limits=Limits(timeout=10, output_cap=10000, workdir=str(workdir)))
        runner.ledger._state.prepare()
        runners.append(runner)
        runner.start()
        return runner

    yield factory
    for runner in runners:
        runner.stop()


def finished(admin, doc_id: str) -> dict:
    return wait_for(lambda: "ret" in (admin.get(doc_id) or {}) and admin.get(doc_id), timeout=15,
                    message=f"the result of {doc_id}: {admin.get(doc_id)}")


@pytest.mark.integration
def test_a_command_is_not_claimed_when_the_ledger_cannot_be_written(admin, runner_factory, tmp_path,
                                                                     failing_disk):
    failing_disk(lambda path, data: path.name == "commands.json")
    runs = tmp_path / "runs"
    doc = admin.put({"_id": "full", "type": CMD, "cmd": ["sh", "-c", f"echo run >> {runs}"]})
    runner_factory().offer(doc)
    done = finished(admin, "full")
    assert not runs.exists(), "the command ran without a record of it"
    assert done["error"].startswith("not run: cannot write the state dir")
    assert done["ret"][0] is None and "No space left on device" in done["ret"][1]
    assert done["returncode"] is None and "claimed" not in done


@pytest.mark.integration
def test_a_claimed_command_does_not_run_when_its_start_cannot_be_recorded(admin, runner_factory, tmp_path,
                                                                           failing_disk):
    # The disk fills between the claim and the start. Before, the command ran unrecorded, and a
    # daemon killed meanwhile found it "claimed, never started" at its restart and ran it again
    # (tests/faults/test_state_dir.py shows that with a real daemon and a real full disk).
    failing_disk(lambda path, data: path.name == "commands.json" and b'"state": "started"' in data)
    runs = tmp_path / "runs"
    doc = admin.put({"_id": "late", "type": CMD, "cmd": ["sh", "-c", f"echo run >> {runs}"]})
    runner = runner_factory()
    runner.offer(doc)
    done = finished(admin, "late")
    assert not runs.exists(), "the command ran although its start was not recorded"
    assert "claimed" in done and done["returncode"] is None and done["ret"][0] is None
    assert done["error"].startswith("not run: cannot write the state dir")
    assert "No space left on device" in done["ret"][1]
    assert runner.ledger.get("late") is None, "reported, so nothing is left to do"


# ---- leftovers of a killed daemon ---------------------------------------------------------------

def _spawn_group(token: str, tmp_path: Path) -> subprocess.Popen:
    """A command's process group as a killed daemon leaves it: a shell, a child, and a child
    that left the group (setsid)."""
    script = f"sleep 60 & setsid sleep 61 & echo $! > {tmp_path}/escaped; wait"
    return subprocess.Popen(["sh", "-c", script], start_new_session=True,
                            env={**os.environ, commands.COMMAND_ENV: token})


def test_end_leftovers_kills_the_group_and_what_left_it(tmp_path):
    process = _spawn_group("tok-1", tmp_path)
    wait_for(lambda: (tmp_path / "escaped").exists() and (tmp_path / "escaped").read_text().strip(),
             message="the group to form")
    escaped = int((tmp_path / "escaped").read_text())
    entry = {"state": STARTED, "token": "tok-1", "boot": commands.boot_id(), "pid": process.pid,
             "pgid": process.pid, "start_ticks": commands.start_ticks(process.pid)}
    what = commands.end_leftovers(entry)
    assert "still running" in what and "killed" in what
    assert process.wait(timeout=5) == -signal.SIGKILL
    wait_for(lambda: not commands._alive(escaped), timeout=5, message="the process that left the group")


def test_end_leftovers_spares_a_reused_pid(tmp_path):
    # The recorded pid now belongs to another process (other start time, no token): left alone.
    other = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        entry = {"state": STARTED, "token": "tok-2", "boot": commands.boot_id(), "pid": other.pid,
                 "pgid": other.pid, "start_ticks": (commands.start_ticks(other.pid) or 0) - 1}
        what = commands.end_leftovers(entry)
        assert "had ended" in what
        assert other.poll() is None, "an unrelated process was killed"
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("entry, words", [
    ({"state": STARTED, "token": "t", "boot": "another-boot", "pid": 1, "pgid": 1, "start_ticks": 1},
     "the Pi restarted"),
    ({"state": STARTED, "token": "t-nothing-left"}, "did not start or had ended"),
    ({"state": STARTED}, "did not start or had ended"),
])
def test_end_leftovers_says_what_it_found(entry, words):
    assert words in commands.end_leftovers(entry)


# ---- a real daemon, killed while a command runs -------------------------------------------------

def _gone(pid: int) -> bool:
    """Ended: no such process, or a zombie its new parent has not reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@pytest.mark.integration
def test_a_command_left_running_by_a_killed_daemon_is_killed_and_reported(admin, make_daemon, tmp_path):
    daemon = make_daemon()
    daemon.start()
    pidfile, runs = tmp_path / "pid", tmp_path / "runs"
    admin.put({"_id": "orphan", "type": CMD,
               "cmd": ["sh", "-c", f"echo $$ > {pidfile}; echo run >> {runs}; sleep 30; echo done >> {runs}"]})
    wait_for(lambda: runs.exists() and pidfile.read_text().strip(), message="the command to start")
    pid = int(pidfile.read_text())
    daemon.process.kill()                        # no goodbye, and no systemd to kill the group
    daemon.process.wait()
    time.sleep(0.5)
    assert not _gone(pid), "the command outlives the daemon (what the restarted daemon must handle)"
    daemon.start()
    doc = wait_for(lambda: "ret" in admin.get("orphan") and admin.get("orphan"), message="the report")
    assert doc["error"] == "interrupted" and doc["ret"][0] is None and doc["returncode"] is None
    assert "still running" in doc["ret"][1] and "killed" in doc["ret"][1], doc["ret"][1]
    assert "not run again" in doc["ret"][1] and "output is lost" in doc["ret"][1]
    assert _gone(pid), "reported before the leftover was killed"
    time.sleep(1)
    assert runs.read_text() == "run\n"


@pytest.mark.integration
def test_a_command_that_ended_while_the_daemon_was_down_is_reported_as_ended(admin, make_daemon, tmp_path):
    daemon = make_daemon()
    daemon.start()
    pidfile = tmp_path / "pid"
    admin.put({"_id": "quick", "type": CMD, "cmd": ["sh", "-c", f"echo $$ > {pidfile}; sleep 1"]})
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), message="the command to start")
    daemon.process.kill()
    daemon.process.wait()
    wait_for(lambda: _gone(int(pidfile.read_text())), timeout=5, message="the command to end by itself")
    daemon.start()
    doc = wait_for(lambda: "ret" in admin.get("quick") and admin.get("quick"), message="the report")
    assert doc["error"] == "interrupted" and "had ended" in doc["ret"][1], doc["ret"][1]
    assert "output is lost" in doc["ret"][1]


def test_a_kill_recorded_by_a_daemon_that_died_in_turn_is_still_reported_as_a_kill():
    entry = {"state": STARTED, "token": "t-gone", "boot": commands.boot_id(), "pid": 999999999,
             "pgid": 999999999, "start_ticks": 5, "killing": True}
    assert "was still running (process group 999999999) and was killed" in commands.end_leftovers(entry)


def test_end_leftovers_records_the_kill_before_it_kills(tmp_path):
    process = subprocess.Popen(["sleep", "30"], start_new_session=True,
                               env={**os.environ, commands.COMMAND_ENV: "tok-3"})
    seen = []
    entry = {"state": STARTED, "token": "tok-3", "boot": commands.boot_id(), "pid": process.pid,
             "pgid": process.pid, "start_ticks": commands.start_ticks(process.pid)}
    commands.end_leftovers(entry, before_kill=lambda: seen.append(process.poll()))
    assert seen == [None], "recorded while the process still ran"
    assert process.wait(timeout=5) == -signal.SIGKILL


def test_a_stopped_runner_never_writes_its_ledger_again(tmp_path):
    # After SIGHUP a new runner owns commands.json; a thread of the old one that outlived its
    # stop() must not overwrite it.
    owner = {"server": "http://a", "database": "db", "macid": 1}
    old = commands.Ledger(StateDir(tmp_path, owner))
    old.set("cmd-old", {"state": CLAIMED})
    old.close()
    new = commands.Ledger(StateDir(tmp_path, owner))
    new.set("cmd-new", {"state": STARTED})
    with pytest.raises(commands.LedgerError, match="closed"):
        old.set("cmd-late", {"state": STARTED})
    assert not old.set("cmd-late", {"state": FINISHED, "result": {}}, durable=False)
    old.drop("cmd-old")
    on_disk = json.loads((tmp_path / "commands.json").read_text())["commands"]
    assert on_disk == {"cmd-old": {"state": CLAIMED}, "cmd-new": {"state": STARTED}}
