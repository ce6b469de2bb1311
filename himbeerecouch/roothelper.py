"""The root helper: the one part of himbeerecouch that runs as root, for the daemon alone.

systemd starts one per connection on /run/himbeerecouch/root.sock (himbeerecouch-root.socket,
Accept=yes), with the connection as standard input. It answers one request and exits:
- only the daemon's main process is served: its programs run as the same user and may
  connect too, so the caller's process id (SO_PEERCRED) must be the unit's MainPID, and that
  process must have started before this connection (no reused process id);
- it reads `command_privileges` from the root-owned configuration itself, never from the
  caller, and serves nothing while the server comes from the state dir (/var/rspby/server,
  which the programs can write: a server of their choosing would send root commands);
- `run` (command_privileges = root): runs argv as root in its own process group, its output
  into the two pipes the daemon sent; kills the group when the daemon asks or goes away;
- `power` (power or root): says whether it may, then on `go` reboots, powers off or
  restarts the daemon's unit.
Messages are JSON objects on a SOCK_SEQPACKET connection (privileges.py is the other side).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

from . import config as config_module
from .privileges import (POWER, POWER_COMMANDS, POWEROFF, REBOOT, RESTART, ROOT, DAEMON_UNIT,
                         CONFIG_HINT, HelperError, receive, send)

log = logging.getLogger("himbeerecouch.roothelper")

ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REQUEST_SECONDS = 30.0          # for the first message
GO_SECONDS = 600.0              # between `ready` and `go`: the daemon writes the result meanwhile
AFTER_EXIT_SECONDS = 60.0       # after the command ended, for the daemon's last kill and goodbye


class Refusal(Exception):
    pass


def peer(sock: socket.socket) -> tuple[int, int]:
    """The caller's process and user ids, as they were when it connected."""
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


def start_ticks(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def main_pid(unit: str) -> int:
    result = subprocess.run(["systemctl", "show", "--property=MainPID", "--value", unit],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=30)
    try:
        return int(result.stdout.strip() or 0)
    except ValueError:
        return 0


def dumpable(pid: int, uid: int) -> bool:
    """Whether a process of user `uid` may be traced by that user's other processes: the
    kernel gives a non-dumpable process's /proc files to root (not its directory)."""
    try:
        return os.stat(f"/proc/{pid}/environ").st_uid == uid
    except OSError:
        return True


def check_caller(pid: int, uid: int, daemon: int) -> None:
    """The caller must be the daemon, started before this helper (a process id is reused only
    after its process ended), and not traceable by its programs (non-dumpable)."""
    if daemon <= 0 or pid != daemon:
        raise Refusal("only the himbeerecouch daemon may use the root helper; programs may not")
    theirs, mine = start_ticks(pid), start_ticks(os.getpid())
    if theirs is None or mine is None or theirs > mine:
        raise Refusal("the caller's process changed while it connected")
    if uid != 0 and dumpable(pid, uid):
        raise Refusal("the daemon can be traced by its programs (it is dumpable); it makes itself "
                      "non-dumpable when command_privileges is power or root")


def check_setting(config: config_module.Config, request: str) -> None:
    setting = config.command_privileges
    wanted = (ROOT,) if request == "run" else (POWER, ROOT)
    if setting not in wanted:
        what = "commands as root" if request == "run" else "this power action"
        raise Refusal(f"command_privileges = {setting} does not allow {what}")
    if not config.server:
        raise Refusal(f"command_privileges = {setting} needs `server` set {CONFIG_HINT}: the server in "
                      f"{config.server_file} can be changed by any program of this Pi")


def _argv(message: dict) -> list[str]:
    argv = message.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and "\0" not in a for a in argv):
        raise Refusal("argv must be a non-empty list of strings")
    return argv


def run_as_root(sock: socket.socket, message: dict, fds: list[int]) -> None:
    argv = _argv(message)
    token = message.get("token")
    if len(fds) != 2 or not isinstance(token, str) or not token.isalnum():
        raise Refusal("a run request carries a token and the two output pipes")
    env = {"PATH": ROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "USER": "root", "LOGNAME": "root",
           "HIMBEERECOUCH_COMMAND": token}
    cwd = "/root" if os.access("/root", os.X_OK) else "/"
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fds[0], stderr=fds[1], cwd=cwd,
                                   env=env, start_new_session=True)
    except (OSError, ValueError) as error:
        send(sock, {"cannot_start": {"errno": getattr(error, "errno", None) or 0,
                                     "strerror": getattr(error, "strerror", None) or str(error),
                                     "filename": getattr(error, "filename", None)}})
        return
    finally:
        for fd in fds:
            os.close(fd)
    log.info("running as root for the daemon: %s (pid %d)", argv, process.pid)
    send(sock, {"started": process.pid})
    pidfd = os.pidfd_open(process.pid)
    ended = False
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ, "daemon")
        selector.register(pidfd, selectors.EVENT_READ, "command")
        while True:
            events = selector.select(AFTER_EXIT_SECONDS if ended else None)
            if not events:
                break                                   # the daemon said nothing after the end
            for key, _ in events:
                if key.data == "command":
                    selector.unregister(pidfd)
                    returncode = process.wait()
                    ended = True
                    log.info("pid %d ended: %d", process.pid, returncode)
                    send(sock, {"returncode": returncode})
                    continue
                try:
                    request, _ = receive(sock)
                except OSError:
                    request = None
                _kill_group(process.pid)                # asked to, or the daemon went away
                if ended:
                    _kill_the_rest_of_my_unit()
                if request is None:
                    if not ended:
                        process.wait()
                    os.close(pidfd)
                    return
    os.close(pidfd)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_the_rest_of_my_unit() -> None:
    """Once the command has ended: whatever it started in another session or process group
    would still hold its output pipes (and the daemon's wait). Under systemd this helper has a
    unit (a control group) of its own: every other process in it is the command's."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return
    candidates = []
    for line in lines:                                  # "0::/path" (v2), "1:name=systemd:/path" (v1)
        _, controllers, path = line.split(":", 2)
        if not re.search(r"/himbeerecouch-root@[^/]*\.service$", path):
            continue                                    # not the socket unit's (tests), or another hierarchy
        if controllers == "":
            candidates += [f"/sys/fs/cgroup{path}", f"/sys/fs/cgroup/unified{path}"]
        elif controllers == "name=systemd":
            candidates.append(f"/sys/fs/cgroup/systemd{path}")
    pids: list[str] = []
    for folder in candidates:
        try:
            pids = Path(folder, "cgroup.procs").read_text().split()
            break
        except OSError:
            continue
    for pid in map(int, pids):
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def power(sock: socket.socket, message: dict, unit: str, power_log: str | None) -> None:
    action = message.get("action")
    if action not in set(POWER_COMMANDS.values()):
        raise Refusal(f"unknown power action {action!r}")
    send(sock, {"ready": True})
    sock.settimeout(GO_SECONDS)
    try:
        go, _ = receive(sock)
    except (OSError, ValueError):
        go = None
    if not go or go.get("go") is not True:
        log.info("%s not done: the daemon did not confirm it", action)
        return
    command = {REBOOT: ["systemctl", "--no-block", "reboot"],
               POWEROFF: ["systemctl", "--no-block", "poweroff"],
               RESTART: ["systemctl", "--no-block", "restart", unit]}[action]
    log.info("%s for the daemon: %s", action, " ".join(command))
    if power_log:                                       # tests: record instead of doing it
        with open(power_log, "a") as stream:
            stream.write(action + "\n")
        send(sock, {"done": True})
        return
    result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=60)
    if result.returncode != 0:
        send(sock, {"error": f"{' '.join(command)} failed ({result.returncode}): {result.stdout.strip()}"})
    else:
        send(sock, {"done": True})


def serve(sock: socket.socket, args: argparse.Namespace) -> None:
    sock.settimeout(REQUEST_SECONDS)
    pid, uid = peer(sock)
    try:
        check_caller(pid, uid, args.daemon_pid if args.daemon_pid is not None else main_pid(args.unit))
        try:
            message, fds = receive(sock, fds=2)
        except HelperError as error:
            raise Refusal(str(error)) from None
        if message is None:
            return
        try:
            request = message.get("request")
            if request not in ("run", "power"):
                raise Refusal(f"unknown request {request!r}")
            check_setting(config_module.load(args.config), request)
        except Refusal:
            for fd in fds:
                os.close(fd)
            raise
        if request == "run":
            sock.settimeout(None)
            run_as_root(sock, message, fds)
        else:
            power(sock, message, args.unit, args.power_log)
    except Refusal as refusal:
        log.warning("refused (caller pid %d): %s", pid, refusal)
        try:
            send(sock, {"error": str(refusal)})
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="himbeerecouch-root-helper",
                                     description="Serve one request of the himbeerecouch daemon on standard "
                                                 "input (a socket passed by systemd); see himbeerecouch(8).")
    parser.add_argument("--config", default=str(config_module.DEFAULT_PATH))
    parser.add_argument("--unit", default=DAEMON_UNIT, help="the daemon's unit (its MainPID is the only caller)")
    parser.add_argument("--daemon-pid", type=int, help=argparse.SUPPRESS)     # tests: no systemd
    parser.add_argument("--power-log", help=argparse.SUPPRESS)                # tests: record, do not act
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        sock = socket.socket(fileno=0)
    except OSError as error:
        log.error("standard input is not a socket (%s): this helper is started by himbeerecouch-root.socket",
                  error)
        return 2
    if sock.family != socket.AF_UNIX:
        log.error("standard input is not a local socket")
        return 2
    try:
        serve(sock, args)
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
