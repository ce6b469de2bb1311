"""Small process helpers shared by programs and commands: environment, process groups, time."""
from __future__ import annotations

import logging
import os
import signal
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

# The signals the daemon catches: a program it starts has them at their default, even where the
# daemon itself found them ignored (`nohup`, a shell's `&`), as exec resets a caught signal.
DAEMON_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD)

# What belongs to systemd's dealings with the daemon, never to the processes it starts.
CHILD_ENV_DROP = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                  "LISTEN_FDNAMES")


def child_environment() -> dict[str, str]:
    """The daemon's environment without what belongs to systemd's dealings with the daemon."""
    return {key: value for key, value in os.environ.items() if key not in CHILD_ENV_DROP}


def kill_group(pgid: int) -> None:
    """SIGKILL a process group; one that is gone already is fine."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, whatever its session or group, read from /proc: how the demo
    and the tests stop what they started, by process id, never by a name pattern."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def make_workdir(path: Path) -> str:
    """`path`, made if needed, as a working directory; "/" when it cannot be made (a read-only
    or missing state dir), which is logged."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        log.error("cannot make the working directory %s: %s; using /", path, error)
        return "/"
    return str(path)


def now_iso(timespec: str = "seconds") -> str:
    return datetime.now(timezone.utc).isoformat(timespec=timespec).replace("+00:00", "Z")
