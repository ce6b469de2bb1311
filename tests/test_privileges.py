"""command_privileges: reboots and root commands, allowed by the Pi's setting, done by the root
helper for the daemon alone (privileges.py, roothelper.py).

Here the helper runs as the test's user behind support.RootHelperSocket (what systemd's socket
unit does) and records power actions instead of doing them; the package tier runs the real
units in a booted container (a real reboot, `id -u` = 0, a program refused as user rspby).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from himbeerecouch import roothelper
from himbeerecouch.privileges import Plan, Refused, plan
from support import RootHelperSocket, wait_for

MACID = 202481596538417
CMD = f"{MACID}_cmd"


# ---- which command runs how, per setting ------------------------------------------------------

def how(cmd, setting, **doc):
    try:
        return plan({"cmd": cmd, **doc}, setting, "rspby")
    except Refused as refusal:
        return str(refusal)


@pytest.mark.parametrize("cmd, action", [
    (["reboot"], "reboot"), (["/sbin/reboot"], "reboot"), (["systemctl", "reboot"], "reboot"),
    (["/usr/bin/systemctl", "reboot"], "reboot"), (["shutdown", "-r", "now"], "reboot"),
    (["sudo", "reboot"], "reboot"), (["sudo", "-n", "systemctl", "reboot"], "reboot"),
    (["poweroff"], "poweroff"), (["shutdown", "-h", "now"], "poweroff"), (["shutdown", "now"], "poweroff"),
    (["systemctl", "restart", "himbeerecouch"], "restart"),
    (["systemctl", "restart", "himbeerecouch.service"], "restart"),
])
def test_power_commands_are_recognised_and_allowed_from_power_on(cmd, action):
    assert "command_privileges = power" in how(cmd, "none")
    assert how(cmd, "power") == Plan("power", tuple(c for c in cmd if c not in ("sudo", "-n")), action)
    assert how(cmd, "root").how == "power", "as root too, a reboot waits for its result to be written"


def test_other_commands_run_as_the_user_unless_the_setting_is_root():
    assert how(["id", "-u"], "none") == Plan("user", ("id", "-u"))
    assert how(["id", "-u"], "power") == Plan("user", ("id", "-u"))
    assert how(["id", "-u"], "root") == Plan("root", ("id", "-u"))
    # Look-alikes are ordinary commands: another unit, another directory, more words.
    assert how(["systemctl", "restart", "nginx"], "power").how == "user"
    assert how(["/home/pi/reboot"], "power").how == "user"
    assert how(["reboot", "--force"], "root").how == "root"


def test_sudo_and_as_root_name_the_setting_that_allows_them():
    for setting in ("none", "power"):
        refusal = how(["sudo", "apt-get", "install", "-y", "python3-smbus"], setting)
        assert "'sudo' is not available" in refusal and "command_privileges = root" in refusal
        assert f"command_privileges = {setting}" in refusal and "rspby" in refusal
        refusal = how(["id"], setting, **{"as": "root"})
        assert '"as": "root" is not allowed' in refusal and "command_privileges = root" in refusal
    assert how(["sudo", "apt-get", "update"], "root") == Plan("root", ("apt-get", "update"))
    assert how(["sudo", "-E", "--", "id"], "root") == Plan("root", ("id",))
    assert "-u is not supported" in how(["sudo", "-u", "pi", "id"], "root")
    assert "needs a command" in how(["sudo"], "root")
    assert how(["id"], "root", **{"as": "root"}) == Plan("root", ("id",))
    assert "'as' may only be" in how(["id"], "root", **{"as": "pi"})


# ---- the root helper's checks --------------------------------------------------------------------

def test_the_helper_serves_the_daemon_alone_started_before_it():
    with pytest.raises(roothelper.Refusal, match="only the himbeerecouch daemon"):
        roothelper.check_caller(os.getpid(), os.getuid(), daemon=os.getpid() + 1)
    with pytest.raises(roothelper.Refusal, match="only the himbeerecouch daemon"):
        roothelper.check_caller(os.getpid(), os.getuid(), daemon=0)      # the unit is not running
    later = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.05)
        # A process that started after the helper: the caller's id was reused meanwhile.
        with pytest.raises(roothelper.Refusal, match="changed while it connected"):
            roothelper.check_caller(later.pid, os.getuid(), daemon=later.pid)
    finally:
        later.kill()
        later.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process as another user")
def test_the_helper_refuses_a_daemon_its_programs_could_trace():
    """A dumpable daemon can be attached to by its programs (same user) and made to ask."""
    code = ("import ctypes, sys, time\n"
            "if sys.argv[1] == 'protected': ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)\n"
            "print('ready', flush=True); time.sleep(30)\n")
    for kind, expected in (("plain", True), ("protected", False)):
        process = subprocess.Popen(["/usr/bin/python3", "-c", code, kind], user=65534, cwd="/",
                                   stdout=subprocess.PIPE)
        try:
            assert process.stdout.readline().strip() == b"ready"
            assert roothelper.dumpable(process.pid, 65534) is expected, kind
        finally:
            process.kill()
            process.wait()


# ---- a daemon and its helper ---------------------------------------------------------------------

def result(admin, doc_id, timeout=20.0):
    return wait_for(lambda: (admin.get(doc_id) or {}).get("ret") is not None and admin.get(doc_id),
                    timeout, message=f"the result of {doc_id}: {admin.get(doc_id)}")


@pytest.fixture
def privileged(make_daemon, tmp_path):
    """A daemon with `command_privileges` and a root helper on its socket (the test's user)."""
    sockets: list[RootHelperSocket] = []

    def factory(setting: str, **settings):
        path = tmp_path / f"root{len(sockets)}.sock"
        daemon = make_daemon(command_privileges=setting, root_helper=str(path), **settings)
        helper = RootHelperSocket(path, daemon.config_path, lambda: daemon.process.pid,
                                  tmp_path / f"power{len(sockets)}.log")
        sockets.append(helper)
        return daemon, helper

    yield factory
    for helper in sockets:
        helper.close()


def processes_with(word: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if word.encode() in Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0"):
                    found.append(int(name))
            except OSError:
                pass
    return found


def test_with_none_privileged_commands_are_answered_with_the_setting_and_nothing_runs(admin, make_daemon, tmp_path):
    daemon = make_daemon()          # the default: command_privileges = none
    daemon.start()
    daemon.wait_log("following changes")
    commands = {
        "reboot": (["systemctl", "reboot"], "command_privileges = power"),
        "poweroff": (["/sbin/poweroff"], "command_privileges = power"),
        "restart": (["systemctl", "restart", "himbeerecouch"], "command_privileges = power"),
        "sudo": (["sudo", "touch", str(tmp_path / "by-sudo")], "command_privileges = root"),
    }
    for doc_id, (cmd, _) in commands.items():
        admin.put({"_id": doc_id, "type": CMD, "cmd": cmd})
    admin.put({"_id": "as-root", "type": CMD, "cmd": ["touch", str(tmp_path / "as-root")], "as": "root"})
    for doc_id, (_, setting) in {**commands, "as-root": (None, "command_privileges = root")}.items():
        doc = result(admin, doc_id)
        assert doc["error"] == "not allowed" and doc["returncode"] is None, doc
        assert doc["ret"][0] is None and doc["ret"][1].startswith("not run: ") and setting in doc["ret"][1], doc
        assert "command_privileges = none" in doc["ret"][1]
    assert not (tmp_path / "by-sudo").exists() and not (tmp_path / "as-root").exists()
    admin.put({"_id": "plain", "type": CMD, "cmd": ["echo", "still fine"]})
    assert result(admin, "plain")["ret"] == ["still fine\n", ""]


def test_power_reboots_only_once_the_result_is_written_and_never_twice(admin, privileged):
    daemon, helper = privileged("power")
    # The server refuses the result at first (as when it is away): no reboot may happen before.
    admin.put({"_id": "_design/hold", "validate_doc_update":
               "function (doc) { if (doc.hold && doc.ret !== undefined) { throw({forbidden: 'held'}); } }"})
    daemon.start()
    daemon.wait_log("following changes")
    admin.put({"_id": "reboot", "type": CMD, "cmd": ["sudo", "reboot"], "hold": True})
    daemon.wait_log("will reboot the Pi once its result is written")
    wait_for(lambda: (admin.get("reboot") or {}).get("claimed"), message="the claim")
    time.sleep(2)
    assert helper.power_actions() == [] and "ret" not in admin.get("reboot"), helper.log()
    # The server takes results again; the daemon writes the result it kept, then reboots.
    admin.delete("_design/hold")
    daemon.stop()
    daemon.start()
    wait_for(lambda: helper.power_actions() == ["reboot"], message=f"the reboot\n{daemon.log()[-3000:]}")
    doc = admin.get("reboot")
    assert doc["returncode"] == 0 and "error" not in doc and doc["ret"][0].startswith("reboot: "), doc
    # "After the reboot" (a new daemon with the same state dir): done, not done again.
    daemon.stop()
    daemon.start()
    daemon.wait_log("following changes")
    admin.put({"_id": "after", "type": CMD, "cmd": ["echo", "up"]})
    assert result(admin, "after")["ret"] == ["up\n", ""]
    assert helper.power_actions() == ["reboot"]


def test_power_restarts_the_daemon_and_runs_other_commands_as_the_user(admin, privileged, tmp_path):
    daemon, helper = privileged("power")
    daemon.start()
    daemon.wait_log("following changes")
    admin.put({"_id": "restart", "type": CMD, "cmd": ["systemctl", "restart", "himbeerecouch.service"]})
    doc = result(admin, "restart")
    assert doc["returncode"] == 0 and "restart the daemon" in doc["ret"][0], doc
    wait_for(lambda: helper.power_actions() == ["restart"], message=helper.log())
    admin.put({"_id": "sudo", "type": CMD, "cmd": ["sudo", "id", "-u"]})
    assert "command_privileges = root" in result(admin, "sudo")["ret"][1]
    admin.put({"_id": "id", "type": CMD, "cmd": ["id", "-u"]})
    assert result(admin, "id")["ret"][0] == f"{os.getuid()}\n"
    assert admin.get(f"{MACID}_heartbeat")["command_privileges"] == "power"
    assert "running ['id', '-u'] as root" not in daemon.log() and "running ['id', '-u']" in daemon.log()


def test_a_missing_root_helper_is_a_clear_answer(admin, make_daemon, tmp_path):
    daemon = make_daemon(command_privileges="power", root_helper=str(tmp_path / "none.sock"))
    daemon.start()
    admin.put({"_id": "reboot", "type": CMD, "cmd": ["reboot"]})
    doc = result(admin, "reboot")
    assert doc["returncode"] is None and doc["ret"][0] is None, doc
    assert "cannot reach the root helper" in doc["ret"][1] and "himbeerecouch-root.socket" in doc["ret"][1]


def test_root_runs_commands_through_the_helper_with_timeouts_and_errors(admin, privileged):
    daemon, helper = privileged("root")
    daemon.start()
    daemon.wait_log("following changes")
    admin.put({"_id": "who", "type": CMD,
               "cmd": ["sh", "-c", "echo $HOME $USER; tr '\\0' ' ' < /proc/$PPID/cmdline; echo err >&2; exit 4"]})
    doc = result(admin, "who")
    home_user, parent = doc["ret"][0].splitlines()
    assert home_user == "/root root" and "himbeerecouch.roothelper" in parent, doc
    assert doc["ret"][1] == "err\n" and doc["returncode"] == 4
    admin.put({"_id": "sudo", "type": CMD, "cmd": ["sudo", "-n", "sh", "-c", "echo $HOME"]})
    assert result(admin, "sudo")["ret"] == ["/root\n", ""]
    admin.put({"_id": "slow", "type": CMD, "cmd": ["sh", "-c", "echo started; exec sleep 60.4321"], "timeout": 1})
    doc = result(admin, "slow")
    assert doc["error"].startswith("timeout") and doc["ret"][0] == "started\n", doc
    wait_for(lambda: not processes_with("60.4321"), 10, message="the timed-out command killed")
    admin.put({"_id": "missing", "type": CMD, "cmd": ["no-such-program-4711"]})
    doc = result(admin, "missing")
    assert doc["error"].startswith("cannot start") and "FileNotFoundError" in doc["ret"][1], doc
    admin.put({"_id": "big", "type": CMD, "cmd": ["head", "-c", "3000000", "/dev/zero"]})
    doc = result(admin, "big")
    assert doc["truncated"] is True and "[output truncated" in doc["ret"][0]


def test_a_root_command_ends_with_the_daemon_and_is_reported_interrupted(admin, privileged):
    daemon, helper = privileged("root")
    daemon.start()
    daemon.wait_log("following changes")
    admin.put({"_id": "long", "type": CMD, "cmd": ["sh", "-c", "exec sleep 61.4321"]})
    wait_for(lambda: processes_with("61.4321"), message="the root command running")
    daemon.process.kill()
    daemon.process.wait()
    wait_for(lambda: not processes_with("61.4321"), 10, message="the helper ending the command with the daemon")
    daemon.process = None
    daemon.start()
    doc = result(admin, "long")
    assert doc["error"] == "interrupted" and "ran as root" in doc["ret"][1], doc


def test_a_program_cannot_use_the_root_helper(admin, privileged, tmp_path):
    daemon, helper = privileged("root")
    daemon.start()
    daemon.wait_log("following changes")
    report = tmp_path / "program.json"
    admin.put({"_id": "sneaky", "type": MACID, "code": f'''
import json, os, socket
def main():
    found = {{}}
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect({str(helper.path)!r})
    r, w = os.pipe()
    socket.send_fds(s, [json.dumps({{"request": "run", "argv": ["touch", {str(tmp_path / "pwned")!r}],
                                     "token": "abc"}}).encode()], [w, w])
    found["answer"] = json.loads(s.recv(65536) or b"null")
    try:
        open("/proc/{daemon.process.pid}/environ", "rb").read()
        found["environ"] = "read"
    except OSError as error:
        found["environ"] = error.strerror
    with open({str(report)!r}, "w") as f:
        json.dump(found, f)
'''})
    found = json.loads(wait_for(lambda: report.exists() and report.stat().st_size and report.read_text(),
                                message=f"the program's report\n{daemon.log()[-2000:]}"))
    assert "only the himbeerecouch daemon" in found["answer"]["error"], found
    assert not (tmp_path / "pwned").exists()
    if os.geteuid() != 0:           # root may read any process; the package tier runs it as rspby
        assert found["environ"] == "Permission denied", found


def test_the_helper_refuses_while_the_server_comes_from_the_state_dir(admin, privileged, couch):
    daemon, helper = privileged("root", server="")
    daemon.state_dir.mkdir(parents=True, exist_ok=True)
    (daemon.state_dir / "server").write_text(couch.admin_url + "\n")
    daemon.start()
    daemon.wait_log("following changes")
    assert "needs `server` set" in daemon.log()
    admin.put({"_id": "id", "type": CMD, "cmd": ["id", "-u"]})
    doc = result(admin, "id")
    assert doc["error"].startswith("cannot start") and "needs `server` set" in doc["ret"][1], doc
    admin.put({"_id": "reboot", "type": CMD, "cmd": ["reboot"]})
    assert "needs `server` set" in result(admin, "reboot")["ret"][1]
    assert helper.power_actions() == []
