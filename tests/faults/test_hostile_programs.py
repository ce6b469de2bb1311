"""Hostile programs against a real daemon and test server: the daemon's loop stays in charge.

Each test checks what README promises whatever a program does: the watchdog is pinged on time
(a notify socket made by the test stands in for systemd), SIGTERM is honoured within the grace
period, another program's update still applies within 2 s, and nothing is left behind.
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from support import marker_program, starts, wait_for
from invariants import alive
from watch import Cgroup, NotifySocket, group_members

pytestmark = pytest.mark.integration
MACID = 202481596538417
WATCHDOG_SECONDS = 2.0          # pings are due every second, at half of it


def program_status(admin, doc_id):
    return ((admin.get(f"{MACID}_heartbeat") or {}).get("programs") or {}).get(doc_id) or {}


def pid_of(marker_dir, label, index=-1) -> int:
    return int(starts(marker_dir, label)[index].split("-")[1])


@pytest.fixture
def notify(tmp_path):
    socket = NotifySocket(tmp_path / "notify")
    yield socket
    socket.close()


def update_applies_quickly(admin, tmp_path, doc_id: str, label: str) -> float:
    """Rewrite `doc_id` to a program that records itself as `label`; seconds until it runs."""
    began = time.monotonic()
    admin.put({"_id": doc_id, "type": MACID, "code": marker_program(tmp_path, label)})
    wait_for(lambda: starts(tmp_path, label), timeout=15, message=f"{label} to start")
    return time.monotonic() - began


def stop_within_grace(daemon, grace: float) -> None:
    began = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=grace + 10) == 0
    assert time.monotonic() - began < grace + 3, daemon.log()[-2000:]


FLOODS = {
    "stdout": "print(line)",
    "stderr": "sys.stderr.write(line + '\\n')",
    "report": "log(line)",
}


@pytest.mark.parametrize("stream", sorted(FLOODS))
def test_an_output_flood_starves_nothing(admin, make_daemon, tmp_path, notify, stream):
    flood = f'''
import sys
def main():
    line = "flood " + "x" * 200
    while not should_quit():
        {FLOODS[stream]}
'''
    admin.put({"_id": "flood", "type": MACID, "code": flood})
    admin.put({"_id": "other", "type": MACID, "code": marker_program(tmp_path, "other")})
    daemon = make_daemon(grace_seconds=3)
    daemon.start(env=notify.env(WATCHDOG_SECONDS))
    wait_for(lambda: starts(tmp_path, "other"), message="the other program")
    daemon.wait_log("flood: flood xxx")
    began = time.monotonic()
    time.sleep(4)
    took = update_applies_quickly(admin, tmp_path, "other", "other-v2")
    assert took < 2.0
    time.sleep(1)
    silence = notify.longest_silence(began, time.monotonic())
    assert silence < WATCHDOG_SECONDS, f"no watchdog ping for {silence:.1f} s under a flood"
    status = wait_for(lambda: program_status(admin, "flood").get("dropped_lines")
                      and program_status(admin, "flood"), timeout=10,
                      message="the dropped lines in the status document")
    assert status["state"] == "RUNNING" and status["dropped_lines"] > 1000
    daemon.wait_log("lines of output dropped", timeout=15)    # logged every 10 s while it lasts
    print(f"flood on {stream}: longest watchdog silence {silence:.2f} s (a ping is due every "
          f"{WATCHDOG_SECONDS / 2:g} s), another program's update applied in {took:.2f} s, "
          f"{status['dropped_lines']} lines dropped")
    # The log is rate-limited: a few seconds of flood are a few hundred lines, not megabytes.
    assert daemon.log().count("flood xxx") < 2000
    stop_within_grace(daemon, 3)


def test_junk_on_the_report_pipe_is_only_text(admin, make_daemon, tmp_path):
    junk = '''
import os, time
def main():
    payloads = [b"[1, 2]\\n", b'"text"\\n', b"null\\n", b"42\\n", b'{"error": {"nested": [1]}}\\n',
                b'{"log": [1, {"a": null}]}\\n', b"\\xff\\xfe not utf-8\\n", b"{\\n", b"x" * 300000 + b"\\n",
                b'{"loaded": "yes"}\\n', b'{"fatal": 7}\\n'] + [b"[" * 60000 + b"\\n"] * 6   # too deep for json
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            for payload in payloads:
                try:
                    os.write(fd, payload)
                except OSError:
                    pass
    log("junk sent")
    while not should_quit():
        time.sleep(0.05)
'''
    admin.put({"_id": "junk", "type": MACID, "code": junk})
    admin.put({"_id": "other", "type": MACID, "code": marker_program(tmp_path, "other")})
    daemon = make_daemon()
    daemon.start()
    daemon.wait_log("junk: junk sent")
    wait_for(lambda: starts(tmp_path, "other"), message="the other program")
    assert update_applies_quickly(admin, tmp_path, "other", "other-v2") < 2.0
    assert daemon.process.poll() is None, daemon.log()[-3000:]
    assert "Traceback" not in daemon.log()
    # What is not a JSON object is logged as the text it is. (The junk also reached the child's
    # own quit pipe: the program may have ended itself, which is its own business.)
    for text in ("junk: [1, 2]", 'junk: "text"', "junk: null", "junk: 42", "junk: {\n"):
        assert text in daemon.log()


def test_stopped_silent_and_stubborn_programs_are_replaced(admin, make_daemon, tmp_path, notify):
    closer = marker_program(tmp_path, "closer", "    os.close(1); os.close(2)")
    stopper = marker_program(tmp_path, "stopper", "    import signal; os.kill(os.getpid(), signal.SIGSTOP)")
    stubborn = marker_program(tmp_path, "stubborn",
                              "    import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                              "    while True: time.sleep(0.1)")
    for doc_id, code in (("closer", closer), ("stopper", stopper), ("stubborn", stubborn)):
        admin.put({"_id": doc_id, "type": MACID, "code": code})
    daemon = make_daemon(grace_seconds=2)
    daemon.start(env=notify.env(WATCHDOG_SECONDS))
    wait_for(lambda: all(starts(tmp_path, label) for label in ("closer", "stopper", "stubborn")),
             message="the three programs")
    old = [pid_of(tmp_path, label) for label in ("closer", "stopper", "stubborn")]
    began = time.monotonic()
    for doc_id in ("closer", "stopper", "stubborn"):
        admin.put({"_id": doc_id, "type": MACID, "code": marker_program(tmp_path, f"{doc_id}-v2")})
    wait_for(lambda: all(starts(tmp_path, f"{label}-v2") for label in ("closer", "stopper", "stubborn")),
             timeout=15, message="the three replacements")
    wait_for(lambda: not any(alive(pid) for pid in old), timeout=5, message="the old processes gone")
    assert notify.longest_silence(began, time.monotonic()) < WATCHDOG_SECONDS
    stop_within_grace(daemon, 2)


def test_a_program_that_eats_memory_is_killed_not_the_daemon(admin, make_daemon, tmp_path):
    reason = Cgroup.usable("memory")
    if reason:
        pytest.skip(reason)
    hog = marker_program(tmp_path, "hog", "    hoard = []\n    while True: hoard.append(b'x' * 10_000_000)")
    daemon = make_daemon()
    cgroup = Cgroup("memory", f"himbeerecouch-test-{os.getpid()}-{time.monotonic_ns()}")
    # The unit's MemoryMax, small: the daemon and its programs share it, as under systemd.
    limit = str(400 * 1024 * 1024)
    try:
        cgroup.make(limit)
        daemon.start()
        cgroup.add(daemon.process.pid)
        daemon.wait_log("following changes")
        admin.put({"_id": "other", "type": MACID, "code": marker_program(tmp_path, "other")})
        admin.put({"_id": "hog", "type": MACID, "code": hog})
        wait_for(lambda: len(starts(tmp_path, "hog")) >= 2, timeout=30, message="the hog killed and restarted")
        wait_for(lambda: "SIGKILL" in (program_status(admin, "hog").get("last_exit") or "")
                 and program_status(admin, "hog").get("restarts", 0) >= 1, timeout=15,
                 message="the hog's kill and restart in the status")
        assert daemon.process.poll() is None
        assert update_applies_quickly(admin, tmp_path, "other", "other-v2") < 2.0
        admin.put({"_id": "hog", "type": MACID, "enabled": False, "code": hog})
        stop_within_grace(daemon, 3)
    finally:
        daemon.stop()
        cgroup.remove()


def test_a_fork_bomb_is_contained_and_cleared(admin, make_daemon, tmp_path, notify):
    reason = Cgroup.usable("pids")
    if reason:
        pytest.skip(reason)
    bomb = marker_program(tmp_path, "bomb", '''
    held = 0
    while True:                     # forever: every process that ends is replaced at once
        try:
            pid = os.fork()
        except OSError:
            if held:
                log("the bomb holds", held)
                held = 0
            time.sleep(0.01)
            continue
        if pid == 0:
            while True:
                time.sleep(1)
        held += 1''')
    daemon = make_daemon()
    cgroup = Cgroup("pids", f"himbeerecouch-test-{os.getpid()}-{time.monotonic_ns()}")
    try:
        cgroup.make("80")      # the unit's TasksMax, small
        daemon.start(env=notify.env(WATCHDOG_SECONDS))
        cgroup.add(daemon.process.pid)
        daemon.wait_log("following changes")
        admin.put({"_id": "other", "type": MACID, "code": marker_program(tmp_path, "other")})
        wait_for(lambda: starts(tmp_path, "other"), message="the other program")
        admin.put({"_id": "bomb", "type": MACID, "code": bomb})
        daemon.wait_log("bomb: the bomb holds", timeout=30)
        bomb_pgid = pid_of(tmp_path, "bomb")
        began = time.monotonic()
        # No process can be started now: a new program must wait, backing off.
        admin.put({"_id": "third", "type": MACID, "code": marker_program(tmp_path, "third")})
        wait_for(lambda: daemon.log().count("third: cannot start a process") >= 3, timeout=30,
                 message="repeated start failures of the new program")
        delays = [float(line.rsplit(" in ", 1)[1].split()[0]) for line in daemon.log().splitlines()
                  if "third: restarting in" in line]
        assert max(delays) >= 1.5, f"start failures must back off, not retry every second: {delays}"
        assert daemon.process.poll() is None
        assert notify.longest_silence(began, time.monotonic()) < WATCHDOG_SECONDS
        admin.put({"_id": "bomb", "type": MACID, "enabled": False, "code": bomb})
        wait_for(lambda: not group_members(bomb_pgid), timeout=15, message="every process of the bomb gone")
        wait_for(lambda: starts(tmp_path, "third"), timeout=15, message="the new program")
        assert update_applies_quickly(admin, tmp_path, "other", "other-v2") < 2.0
        stop_within_grace(daemon, 3)
    finally:
        daemon.stop()
        cgroup.remove()


def test_a_passing_import_failure_is_retried(admin, make_daemon, tmp_path):
    flaky = f'''
import os
attempts = os.path.join({str(tmp_path)!r}, "attempts")
with open(attempts, "a") as f:
    f.write("x")
if os.path.getsize(attempts) < 3:
    raise RuntimeError("sensor not ready yet")
import time
def main():
    log("sensor ready")
    while not should_quit():
        time.sleep(0.05)
'''
    admin.put({"_id": "flaky", "type": MACID, "code": flaky})
    admin.put({"_id": "quitter", "type": MACID, "code": "import sys\ndef main():\n    sys.exit(3)\n"})
    daemon = make_daemon()
    daemon.start()
    daemon.wait_log("flaky: sensor ready", timeout=20)
    assert (tmp_path / "attempts").read_text() == "xxx"
    wait_for(lambda: program_status(admin, "flaky").get("state") == "RUNNING", message="flaky RUNNING")
    # A program's own exit code 3 is its own, not "could not load the program".
    status = wait_for(lambda: program_status(admin, "quitter").get("restarts", 0) >= 1
                      and program_status(admin, "quitter"), message="quitter restarted")
    assert status["state"] in ("BACKOFF", "STARTING") and status["last_exit"] == "exited with code 3"


def test_programs_cannot_touch_the_state_dir_or_shadow_modules(admin, make_daemon, tmp_path):
    writer = marker_program(tmp_path, "writer", '''
    with open("signal.py", "w") as f:
        f.write("raise SystemExit('shadowed')\\n")
    for name in ("code.json", "commands.json", "credentials.json", "checkpoint.json"):
        with open(name, "w") as f:
            f.write("junk")
    log("cwd", os.getcwd())''')
    admin.put({"_id": "writer", "type": MACID, "code": writer})
    daemon = make_daemon()
    daemon.start()
    daemon.wait_log("writer: cwd ")
    cwd = daemon.log().split("writer: cwd ", 1)[1].splitlines()[0]
    assert os.path.realpath(cwd) != os.path.realpath(daemon.state_dir)
    # The next start of any program must not import the program's signal.py.
    admin.put({"_id": "writer", "type": MACID, "code": marker_program(tmp_path, "writer-v2")})
    wait_for(lambda: starts(tmp_path, "writer-v2"), message="the next start")
    admin.put({"_id": "second", "type": MACID, "code": marker_program(tmp_path, "second")})
    wait_for(lambda: starts(tmp_path, "second"), message="another program")
    for name in ("code.json", "checkpoint.json"):
        json.loads((daemon.state_dir / name).read_text())
