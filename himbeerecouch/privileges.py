"""What a command document may do beyond the daemon's own user: `command_privileges`.

- `none` (the default): commands run as the daemon's user; a reboot, `sudo` or `"as": "root"`
  gets a final answer that names the setting which would allow it.
- `power`: also reboot, power off and restart the daemon's unit.
- `root`: commands run as root.

The daemon never gains a privilege itself: what needs root is asked of the root helper
(roothelper.py), a unit of its own started per connection on a socket, which checks that the
caller is the daemon's main process (programs run as the same user) and reads the setting
from the root-owned configuration itself. A power action is done only once its command's result
is written: the daemon asks the helper whether it may (`prepare`), writes the result, then says
`go`.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import pwd
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

NONE, POWER, ROOT = "none", "power", "root"
SETTINGS = (NONE, POWER, ROOT)
DEFAULT_SOCKET = "/run/himbeerecouch/root.sock"
MAX_MESSAGE = 1024 * 1024

# Power actions, and the command lines that ask for them. A command line is matched on its
# words, with the program's name taken from one of the system's usual directories.
REBOOT, POWEROFF, RESTART = "reboot", "poweroff", "restart"
DAEMON_UNIT = "himbeerecouch.service"
POWER_COMMANDS: dict[tuple[str, ...], str] = {
    ("reboot",): REBOOT,
    ("systemctl", "reboot"): REBOOT,
    ("shutdown", "-r", "now"): REBOOT,
    ("poweroff",): POWEROFF,
    ("systemctl", "poweroff"): POWEROFF,
    ("shutdown", "-h", "now"): POWEROFF,
    ("shutdown", "-P", "now"): POWEROFF,
    ("shutdown", "now"): POWEROFF,
    ("systemctl", "restart", "himbeerecouch"): RESTART,
    ("systemctl", "restart", DAEMON_UNIT): RESTART,
}
SYSTEM_DIRS = ("/sbin", "/usr/sbin", "/bin", "/usr/bin")
WHAT = {REBOOT: "reboot the Pi", POWEROFF: "power the Pi off", RESTART: "restart the daemon"}
# sudo's options that change nothing when the command runs as root without a password.
SUDO_HARMLESS = ("-n", "--non-interactive", "-E", "--preserve-env", "-H", "--set-home", "--")
CONFIG_HINT = "in /etc/himbeerecouch/himbeerecouch.conf or in the boot file"


@dataclass(frozen=True)
class Plan:
    """How one command runs: `user` (as the daemon's user), `root`, or the `power` action."""
    how: str
    argv: tuple[str, ...] = ()
    action: str = ""


class Refused(Exception):
    """The command is not run on this Pi; the message says which setting would allow it."""


def _program(word: str) -> str:
    head, name = os.path.split(word)
    return name if head in ("",) + SYSTEM_DIRS else word


def power_action(argv: list[str] | tuple[str, ...]) -> str | None:
    if not argv:
        return None
    return POWER_COMMANDS.get((_program(argv[0]), *argv[1:]))


def _without_sudo(argv: list[str]) -> tuple[list[str], bool]:
    """The command line without a leading `sudo` (and its harmless options); whether it had one."""
    if not argv or _program(argv[0]) != "sudo":
        return argv, False
    rest = argv[1:]
    while rest and rest[0].startswith("-"):
        if rest[0] not in SUDO_HARMLESS:
            raise Refused(f"sudo's option {rest[0]} is not supported: with command_privileges = root the "
                          f"command runs as root; send it without sudo")
        rest = rest[1:]
    if not rest:
        raise Refused("'sudo' needs a command to run")
    return rest, True


def plan(doc: dict, setting: str, user: str) -> Plan:
    """How the command of `doc` runs under `setting`, or Refused. `doc` is valid (commands.py)."""
    asked = doc.get("as")
    if asked is not None and asked != "root":
        raise Refused(f"'as' may only be \"root\" (or be left out), not {asked!r}")
    argv, sudo = _without_sudo(list(doc["cmd"]))
    action = power_action(argv)
    if asked == "root" and setting != ROOT:
        raise Refused(f"\"as\": \"root\" is not allowed on this Pi: command_privileges = {setting}; "
                      f"set command_privileges = root {CONFIG_HINT} to run commands as root")
    if action is not None:
        if setting == NONE:
            raise Refused(f"not allowed to {WHAT[action]}: command_privileges = none on this Pi; set "
                          f"command_privileges = power (or root) {CONFIG_HINT} to allow it")
        return Plan("power", tuple(argv), action)
    if setting == ROOT:
        return Plan("root", tuple(argv))
    if sudo:
        raise Refused(f"'sudo' is not available: commands on this Pi run as user {user} "
                      f"(command_privileges = {setting}); set command_privileges = root {CONFIG_HINT} "
                      f"to run commands as root, or send the command without sudo")
    return Plan("user", tuple(argv))


def user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def check_privileges(config: Any, server_url: str) -> None:
    """At start and on SIGHUP: protect the daemon from its programs when it may ask for more
    than its own user's rights, and say in the log what will keep that from working."""
    setting = config.command_privileges
    if setting == NONE:
        return
    try:
        forbid_tracing()
    except OSError as error:
        log.error("command_privileges = %s: cannot keep programs from tracing the daemon (%s); the root "
                  "helper refuses it", setting, error)
    log.info("command_privileges = %s: asking the root helper at %s", setting, config.root_helper)
    if not config.server:
        log.error("command_privileges = %s needs `server` set %s: the root helper refuses a daemon whose "
                  "server comes from %s, which programs can change", setting, CONFIG_HINT, config.server_file)
        return
    parts = urlsplit(server_url)
    if parts.scheme == "http" and parts.hostname not in ("localhost", "127.0.0.1", "::1"):
        log.warning("command_privileges = %s over plain http: whoever can change traffic between this Pi and "
                    "%s can send it commands; use https", setting, parts.hostname)


def forbid_tracing() -> None:
    """Make this process non-dumpable: programs run as the same user could otherwise attach to
    it (ptrace, /proc/PID/mem) and speak to the root helper as the daemon."""
    PR_SET_DUMPABLE = 4
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


# ---- the daemon's side of the root helper's socket ------------------------------------------

class HelperError(Exception):
    """The root helper cannot be reached, refused, or broke off; the message says which."""


def send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def receive(sock: socket.socket, fds: int = 0, flags: int = 0) -> tuple[dict | None, list[int]]:
    """One message (None when the other side closed) and the descriptors that came with it."""
    if fds:
        data, received, _, _ = socket.recv_fds(sock, MAX_MESSAGE, fds, flags)
    else:
        data, received = sock.recv(MAX_MESSAGE, flags), []
    if not data:
        return None, received
    try:
        message = json.loads(data)
    except ValueError:
        raise HelperError("a message on the root helper's socket is not JSON") from None
    if not isinstance(message, dict):
        raise HelperError("a message on the root helper's socket is not a JSON object")
    return message, received


class Helper:
    """One conversation with the root helper (one connection: one helper process)."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as error:
            self.sock.close()
            hint = " (it comes with the Debian package: himbeerecouch-root.socket)" \
                if isinstance(error, (FileNotFoundError, ConnectionRefusedError)) else ""
            raise HelperError(f"cannot reach the root helper at {path}: {error.strerror or error}{hint}") from None

    def ask(self, message: dict, fds: list[int] | None = None) -> dict:
        try:
            send(self.sock, message, fds)
            answer, _ = receive(self.sock)
        except OSError as error:
            raise HelperError(f"the root helper at {self.path} broke off: {error.strerror or error}") from None
        if answer is None:
            raise HelperError(f"the root helper at {self.path} closed the connection without an answer")
        if "error" in answer:
            raise HelperError(f"the root helper refused: {answer['error']}")
        return answer

    def close(self) -> None:
        self.sock.close()


class PowerRequest:
    """A power action the helper agreed to; done by `go()` once the command's result is written."""

    def __init__(self, path: str, action: str) -> None:
        self.action = action
        self._helper = Helper(path)
        try:
            self._helper.ask({"request": "power", "action": action})
        except HelperError:
            self._helper.close()
            raise

    def go(self) -> None:
        try:
            self._helper.ask({"go": True})
        finally:
            self._helper.close()

    def cancel(self) -> None:
        self._helper.close()


class RootProcess:
    """A command the root helper runs as root, seen as a subprocess.Popen is by commands.py:
    `stdout` and `stderr` pipes, `pid`, `poll()`, `wait()`, and `kill_tree()`, which asks the
    helper to kill its process group (the daemon may not signal root's processes)."""

    def __init__(self, path: str, argv: list[str], token: str) -> None:
        self._helper = Helper(path)
        self.returncode: int | None = None
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        try:
            answer = self._helper.ask({"request": "run", "argv": argv, "token": token}, [out_write, err_write])
        except BaseException:
            for fd in (out_read, err_read):
                os.close(fd)
            self._helper.close()
            raise
        finally:
            os.close(out_write)         # the helper's copies are the command's; EOF comes with its end
            os.close(err_write)
        if "cannot_start" in answer:                    # as Popen raises it: the same result
            for fd in (out_read, err_read):
                os.close(fd)
            self._helper.close()
            failure = answer["cannot_start"]
            raise OSError(failure.get("errno") or 0, failure.get("strerror") or "cannot start",
                          failure.get("filename"))
        self.pid = int(answer.get("started", 0))
        self.stdout = open(out_read, "rb", buffering=0)
        self.stderr = open(err_read, "rb", buffering=0)
        self._helper.sock.settimeout(None)
        self._killed_after_end = False

    def _take(self, answer: dict | None) -> None:
        if answer is None:
            self.returncode = -9 if self.returncode is None else self.returncode   # helper gone
        elif "returncode" in answer:
            self.returncode = int(answer["returncode"])

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self._take(receive(self._helper.sock, flags=socket.MSG_DONTWAIT)[0])
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._take(None)
        return self.returncode

    def wait(self) -> int:
        while self.returncode is None:
            try:
                self._take(receive(self._helper.sock)[0])
            except OSError:
                self._take(None)
        self._helper.close()
        return self.returncode

    def kill_tree(self) -> None:
        if self.returncode is not None:
            if self._killed_after_end:
                return                  # once is enough for what it left behind
            self._killed_after_end = True
        try:
            send(self._helper.sock, {"kill": True})
        except OSError:
            pass                        # the helper is gone: its unit's stop killed the rest
