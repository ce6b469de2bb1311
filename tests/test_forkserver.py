"""Programs started from the fork server (spawn = fork-server) against a real daemon and test
server: it is used, a program started from it looks like one started as a fresh interpreter,
the server's failures cost nothing but speed, and exits are learned without polling."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from support import marker_program, starts, wait_for

pytestmark = pytest.mark.integration
MACID = 202481596538417


def status(admin) -> dict:
    return admin.get(f"{MACID}_heartbeat") or {}


def program_status(admin, doc_id) -> dict:
    return (status(admin).get("programs") or {}).get(doc_id) or {}


def alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def parent_of(pid: int) -> int:
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])


def pid_of(marker_dir, label, index=-1) -> int:
    return int(starts(marker_dir, label)[index].split("-")[-1])


def spawn_status(admin, mode: str, timeout: float = 15.0) -> dict:
    return wait_for(lambda: (status(admin).get("spawn") or {}).get("mode") == mode and status(admin)["spawn"],
                    timeout, message=f"spawn mode {mode} in the status document: {status(admin).get('spawn')}")


def server_pid(admin, other_than: int | None = None) -> int:
    def current():
        pid = (status(admin).get("spawn") or {}).get("fork_server_pid")
        return pid if pid and pid != other_than and alive(pid) else None
    return wait_for(current, message=f"a fork server (not {other_than}) in the status document")


# What a program sees of its process: compared between the two modes.
PORTRAIT = '''
import os, random, signal, sys
def main():
    fds = {}
    for name in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            fds[name] = os.readlink("/proc/self/fd/" + name)
        except OSError:
            pass                       # the listing's own descriptor, closed by now
    lines = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    portrait = {
        "fds": {fd: target.split(":")[0].split("/")[-1] if ":" in target else target
                for fd, target in fds.items()},
        "signals": {key: lines[key].strip() for key in ("SigBlk", "SigIgn", "SigCgt")},
        "session_leader": os.getsid(0) == os.getpid(), "group_leader": os.getpgid(0) == os.getpid(),
        "cwd": os.getcwd(), "env": sorted(os.environ), "argv": sys.argv,
        "path_has_cwd": "" in sys.path or os.getcwd() in sys.path,
        "random": random.random(), "ppid": os.getppid(),
        "unbuffered": not sys.stdout.line_buffering or sys.flags.unbuffered,
        "stdin": os.readlink("/proc/self/fd/0"),
        "cmdline": [arg.decode() for arg in open("/proc/self/cmdline", "rb").read().split(b"\\0") if arg],
    }
    with open(os.path.join(FOLDER, "LABEL-" + str(os.getpid())), "w") as f:
        json.dump(portrait, f)
    while not should_quit():
        import time; time.sleep(0.05)
import json
'''


def portrait(folder, label) -> dict:
    path = wait_for(lambda: list(folder.glob(f"{label}-*")), message=f"{label}'s portrait")[0]
    return wait_for(lambda: path.read_text() and json.loads(path.read_text()), message="a whole portrait")


def test_a_program_from_the_fork_server_looks_like_a_fresh_interpreter(admin, make_daemon, tmp_path):
    seen = {}
    for mode in ("exec", "fork-server"):
        folder = tmp_path / mode
        folder.mkdir()
        for label in ("a", "b"):
            admin.put({"_id": f"{mode}-{label}", "type": MACID,
                       "code": PORTRAIT.replace("FOLDER", repr(str(folder))).replace("LABEL", label)})
        daemon = make_daemon(spawn=mode, subdir=mode)
        # Started as `nohup ... &` starts it: an exec'd program keeps SIGQUIT ignored, and so
        # must a forked one; SIGINT and SIGHUP, which the daemon catches, an exec'd program
        # has at their default (Python's for SIGINT), and so must a forked one.
        daemon.start(ignored_signals=(signal.SIGQUIT, signal.SIGINT, signal.SIGHUP))
        seen[mode] = [portrait(folder, "a"), portrait(folder, "b")]
        spawn = spawn_status(admin, mode)
        parents = {parent_of(int(p.name.split("-")[-1])) for p in folder.glob("*-*")}
        expected = spawn["fork_server_pid"] if mode == "fork-server" else daemon.process.pid
        assert parents == {expected}, (mode, parents, spawn)
        daemon.stop()
        for label in ("a", "b"):
            admin.delete(f"{mode}-{label}")
    for mode, (a, b) in seen.items():
        assert a["random"] != b["random"], f"{mode}: two programs drew the same random number"
        assert a["session_leader"] and a["group_leader"], mode
        assert not a["path_has_cwd"] and a["unbuffered"] and a["stdin"] == "/dev/null", (mode, a)
        # Only the program's own descriptors: its pipes, none of the daemon's or the server's.
        assert not [t for t in a["fds"].values() if t.startswith(("socket", "anon_inode", "memfd"))], a["fds"]
    exec_a, fork_a = seen["exec"][0], seen["fork-server"][0]
    # (The numbers differ: exec passes the report pipe at whatever number the daemon had.)
    assert sorted(fork_a["fds"].values()) == sorted(exec_a["fds"].values()), (fork_a["fds"], exec_a["fds"])
    assert [fork_a["fds"][fd] for fd in "0123"] == ["/dev/null", "pipe", "pipe", "pipe"], fork_a["fds"]
    assert fork_a["signals"] == exec_a["signals"], (fork_a["signals"], exec_a["signals"])
    assert fork_a["env"] == exec_a["env"]
    assert fork_a["argv"] == exec_a["argv"]
    # ps shows a forked program as what it would be with exec.
    assert fork_a["cmdline"] == exec_a["cmdline"], (fork_a["cmdline"], exec_a["cmdline"])
    assert os.path.basename(fork_a["cwd"]) == os.path.basename(exec_a["cwd"]).replace("exec", "fork-server")


def test_restarts_use_the_fork_server_and_say_so(admin, make_daemon, tmp_path):
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "v1")})
    daemon = make_daemon(spawn="fork-server")
    daemon.start()
    wait_for(lambda: starts(tmp_path, "v1"), message="the first version")
    spawn = spawn_status(admin, "fork-server")
    assert spawn["error"] is None and alive(spawn["fork_server_pid"])
    daemon.wait_log("fork server ready")
    for version in range(2, 5):
        began = time.monotonic()
        admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, f"v{version}")})
        wait_for(lambda: starts(tmp_path, f"v{version}"), message=f"version {version}")
        assert time.monotonic() - began < 2.0
        assert parent_of(pid_of(tmp_path, f"v{version}")) == spawn["fork_server_pid"]
    wait_for(lambda: program_status(admin, "p").get("spawn") == "fork-server", message="the program's spawn")
    assert ", fork-server)" in daemon.log()


def test_programs_do_not_see_each_others_modules(admin, make_daemon, tmp_path):
    first = marker_program(tmp_path, "first", '''
    import json, sys, helpers
    json.left_behind = "first"              # a change to a shared module ...
    sys.modules["planted"] = helpers          # ... and a module of its own for anyone to find''')
    admin.put({"_id": "first", "type": MACID, "code": first, "modules": {"helpers": "VALUE = 1\n"}})
    daemon = make_daemon(spawn="fork-server")
    daemon.start()
    wait_for(lambda: starts(tmp_path, "first"), message="the first program")
    second = marker_program(tmp_path, "second", '''
    import json, sys
    seen = [name for name in ("helpers", "planted", "main_of_first") if name in sys.modules]
    seen += ["json.left_behind"] if hasattr(json, "left_behind") else []
    try:
        import helpers
        seen.append("import helpers")
    except ImportError:
        pass
    log("second sees", seen)''')
    admin.put({"_id": "second", "type": MACID, "code": second})
    daemon.wait_log("second: second sees")
    assert "second: second sees []" in daemon.log(), daemon.log()[-3000:]
    # The same document started again (a restart) starts clean too.
    admin.put({"_id": "first", "type": MACID, "code": first.replace('"first"', '"again"'),
               "modules": {"helpers": "VALUE = 2\n"}})
    wait_for(lambda: len(starts(tmp_path, "first")) == 2, message="the restart")
    assert "Traceback" not in daemon.log()


def test_a_server_that_cannot_start_falls_back_to_fresh_interpreters(admin, make_daemon, tmp_path):
    # A sitecustomize that ends the fork server (and only it) at once, as a broken install would.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\nif 'himbeerecouch.forkserver' in getattr(sys, 'orig_argv', []):\n    os._exit(7)\n")
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p")})
    daemon = make_daemon(spawn="fork-server")
    daemon.start(env={"PYTHONPATH": str(site)})
    wait_for(lambda: starts(tmp_path, "p"), message="the program, started anyway")
    assert parent_of(pid_of(tmp_path, "p")) == daemon.process.pid
    spawn = spawn_status(admin, "exec")
    assert "fork server" in spawn["error"] and "exited with code 7" in spawn["error"], spawn
    daemon.wait_log("programs start as fresh interpreters")
    assert program_status(admin, "p").get("spawn") == "exec"
    # Restarts work all the same.
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p2")})
    wait_for(lambda: starts(tmp_path, "p2"), message="the restart")


def test_a_killed_server_is_replaced_and_its_programs_keep_running(admin, make_daemon, tmp_path):
    admin.put({"_id": "old", "type": MACID, "code": marker_program(tmp_path, "old")})
    daemon = make_daemon(spawn="fork-server")
    daemon.start()
    wait_for(lambda: starts(tmp_path, "old"), message="the program")
    first_server = server_pid(admin)
    old_pid = pid_of(tmp_path, "old")
    os.kill(first_server, signal.SIGKILL)
    daemon.wait_log("keep running; starting a new one")
    second_server = server_pid(admin, other_than=first_server)
    assert alive(old_pid) and len(starts(tmp_path, "old")) == 1
    wait_for(lambda: program_status(admin, "old").get("state") == "RUNNING", message="old RUNNING")
    assert alive(old_pid) and len(starts(tmp_path, "old")) == 1
    admin.put({"_id": "new", "type": MACID, "code": marker_program(tmp_path, "new")})
    wait_for(lambda: starts(tmp_path, "new"), message="a program from the new server")
    assert parent_of(pid_of(tmp_path, "new")) == second_server
    # The orphan is still the daemon's to stop, without its exit status.
    admin.put({"_id": "old", "type": MACID, "code": marker_program(tmp_path, "old-v2")})
    wait_for(lambda: starts(tmp_path, "old-v2"), message="the orphan replaced")
    wait_for(lambda: not alive(old_pid), timeout=5, message="the orphan gone")
    daemon.wait_log("old: ended with an unknown status")
    assert daemon.stop() == 0


def test_sighup_replaces_the_server(admin, make_daemon, tmp_path):
    admin.put({"_id": "kept", "type": MACID, "code": marker_program(tmp_path, "kept")})
    daemon = make_daemon(spawn="fork-server")
    daemon.start()
    wait_for(lambda: starts(tmp_path, "kept"), message="the program")
    first_server = server_pid(admin)
    kept = pid_of(tmp_path, "kept")
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("fork server replaced")
    second_server = server_pid(admin, other_than=first_server)
    admin.put({"_id": "later", "type": MACID, "code": marker_program(tmp_path, "later")})
    wait_for(lambda: starts(tmp_path, "later"), message="a program after SIGHUP")
    assert parent_of(pid_of(tmp_path, "later")) == second_server
    # The running program is not restarted; the old server stays while it runs (its exit
    # status is wanted) and goes with it.
    assert alive(kept) and len(starts(tmp_path, "kept")) == 1 and alive(first_server)
    admin.put({"_id": "kept", "type": MACID, "code": marker_program(tmp_path, "kept-v2")})
    wait_for(lambda: starts(tmp_path, "kept-v2"), message="the restart")
    wait_for(lambda: not alive(first_server), timeout=5, message="the old server gone")
    daemon.wait_log("kept: exited normally")
    assert parent_of(pid_of(tmp_path, "kept-v2")) == second_server


def main_thread_wakeups(pid: int) -> int:
    lines = open(f"/proc/{pid}/task/{pid}/status").read().splitlines()
    return sum(int(line.split()[1]) for line in lines if "ctxt_switches" in line)


@pytest.mark.parametrize("mode", ["fork-server", "exec"])
def test_exits_are_learned_without_polling(admin, make_daemon, tmp_path, mode):
    for index in range(3):
        admin.put({"_id": f"idle{index}", "type": MACID, "code": marker_program(tmp_path, f"idle{index}")})
    trigger = tmp_path / "trigger"
    quitter = f'''
import os, time
def main():
    log("waiting")
    while not os.path.exists({str(trigger)!r}):
        time.sleep(0.01)
'''
    admin.put({"_id": "quitter", "type": MACID, "code": quitter, "restart": "no"})
    daemon = make_daemon(spawn=mode, start_seconds=0.5)
    daemon.start()
    daemon.wait_log("quitter: waiting")
    wait_for(lambda: all(program_status(admin, f"idle{i}").get("state") == "RUNNING" for i in range(3)),
             message="the programs RUNNING")
    time.sleep(1.5)
    before = main_thread_wakeups(daemon.process.pid)
    time.sleep(6)
    woke = main_thread_wakeups(daemon.process.pid) - before
    # The old loop woke every second and asked every child (wait4); now nothing wakes it.
    assert woke <= 3, f"the daemon's loop woke {woke} times in 6 s with idle programs"
    trigger.write_text("")
    ended = time.monotonic()
    daemon.wait_log("quitter: exited normally", timeout=5)
    noticed = time.monotonic() - ended
    assert noticed < 0.9, f"exit noticed after {noticed:.2f} s"


def test_a_hung_server_is_replaced_and_the_start_happens_anyway(admin, make_daemon, tmp_path):
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "v1")})
    daemon = make_daemon(spawn="fork-server")
    daemon.start()
    wait_for(lambda: starts(tmp_path, "v1"), message="the program")
    hung = server_pid(admin)
    os.kill(hung, signal.SIGSTOP)
    try:
        began = time.monotonic()
        admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "v2")})
        # The old program ends; its status cannot come from a stopped server (unknown after 2 s),
        # the start waits at most 5 s for the server's answer, then goes on without it.
        wait_for(lambda: starts(tmp_path, "v2"), timeout=20, message="the start despite the hung server")
        took = time.monotonic() - began
        assert took < 12, took
        daemon.wait_log("failed a start: no answer within")
        assert parent_of(pid_of(tmp_path, "v2")) == daemon.process.pid     # exec, this once
        wait_for(lambda: not alive(hung), timeout=5, message="the hung server killed")
        newer = server_pid(admin, other_than=hung)
        admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "v3")})
        wait_for(lambda: starts(tmp_path, "v3"), message="the next start")
        assert parent_of(pid_of(tmp_path, "v3")) == newer
    finally:
        try:
            os.kill(hung, signal.SIGCONT)
        except ProcessLookupError:
            pass


def test_sighup_switches_between_the_modes(admin, make_daemon, tmp_path):
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "forked")})
    daemon = make_daemon(spawn="fork-server")
    daemon.start()
    wait_for(lambda: starts(tmp_path, "forked"), message="the program")
    server = server_pid(admin)
    daemon.settings["spawn"] = "exec"
    daemon.write_config()
    daemon.signal(signal.SIGHUP)
    spawn_status(admin, "exec")
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "fresh")})
    wait_for(lambda: starts(tmp_path, "fresh"), message="the program after the switch")
    assert parent_of(pid_of(tmp_path, "fresh")) == daemon.process.pid
    # The forked program's exit status still came from its server, which then went.
    daemon.wait_log("p: exited normally")
    wait_for(lambda: not alive(server), timeout=5, message="the retired server gone")
    daemon.settings["spawn"] = "fork-server"
    daemon.write_config()
    daemon.signal(signal.SIGHUP)
    spawn_status(admin, "fork-server")
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "forked-again")})
    wait_for(lambda: starts(tmp_path, "forked-again"), message="the program after the switch back")
    assert parent_of(pid_of(tmp_path, "forked-again")) == server_pid(admin)


@pytest.mark.parametrize("mode", ["fork-server", "exec"])
def test_a_program_ends_as_an_interpreter_would(admin, make_daemon, tmp_path, mode):
    # Non-daemon threads are waited for, atexit functions run, the exit code or message is kept.
    ender = f'''
import atexit, os, sys, threading, time
def main():
    def late():
        time.sleep(0.3)
        open(os.path.join({str(tmp_path)!r}, "thread-done"), "w").close()
    threading.Thread(target=late).start()
    atexit.register(lambda: open(os.path.join({str(tmp_path)!r}, "atexit-ran"), "w").close())
    print("bye")
    sys.exit(3)
'''
    admin.put({"_id": "ender", "type": MACID, "code": ender, "restart": "no"})
    admin.put({"_id": "talker", "type": MACID, "code": "import sys\ndef main():\n    sys.exit('a message')\n",
               "restart": "no"})
    daemon = make_daemon(spawn=mode)
    daemon.start()
    daemon.wait_log("ender: exited with code 3")
    daemon.wait_log("talker: exited with code 1")
    assert (tmp_path / "thread-done").exists() and (tmp_path / "atexit-ran").exists()
    assert "ender: bye" in daemon.log() and "talker: a message" in daemon.log()
