"""Things the fault tests watch a daemon with: systemd's notify socket, cgroups, processes."""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path


class NotifySocket:
    """A stand-in for systemd's notification socket: records every message with its time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode(errors="replace")))

    def env(self, watchdog_seconds: float) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": str(int(watchdog_seconds * 1e6))}

    def pings(self, since: float = 0.0) -> list[float]:
        return [t for t, message in list(self.messages) if "WATCHDOG=1" in message and t >= since]

    def longest_silence(self, start: float, end: float) -> float:
        """The longest time without a watchdog ping between `start` and `end`."""
        times = [start] + [t for t in self.pings(start) if t <= end] + [end]
        return max(b - a for a, b in zip(times, times[1:]))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class Cgroup:
    """A cgroup (v1 controller or v2) the test puts a daemon into, as the unit's limits would."""

    def __init__(self, controller: str, name: str) -> None:
        self.controller = controller
        self.path = self._base(controller) / name

    @staticmethod
    def _base(controller: str) -> Path:
        v1 = Path("/sys/fs/cgroup") / controller
        if v1.is_dir():
            own = next((line.split(":", 2)[2].strip() for line in open("/proc/self/cgroup")
                        if controller in line.split(":")[1].split(",")), "/")
            return v1 / own.lstrip("/")
        return Path("/sys/fs/cgroup") / next(line.split(":", 2)[2].strip() for line in open("/proc/self/cgroup")
                                             if line.startswith("0::")).lstrip("/")

    @property
    def limit_file(self) -> str:
        """Where the limit goes: v1's memory.limit_in_bytes, else memory.max or pids.max."""
        if self.controller == "memory" and (self.path.parent / "memory.limit_in_bytes").exists():
            return "memory.limit_in_bytes"
        return f"{self.controller}.max"

    @classmethod
    def usable(cls, controller: str) -> str | None:
        """None when this machine lets the test make such a cgroup with a limit; else why not."""
        probe = cls(controller, f"himbeerecouch-probe-{os.getpid()}")
        try:
            probe.path.mkdir()
        except OSError as error:
            return f"cannot make a {controller} cgroup here: {error}"
        try:
            if not (probe.path / probe.limit_file).exists():     # v2 without the controller
                return f"a {controller} cgroup made here has no {probe.limit_file}"
        finally:
            probe.path.rmdir()
        return None

    def make(self, limit: str) -> "Cgroup":
        self.path.mkdir()
        (self.path / self.limit_file).write_text(limit)
        return self

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def remove(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while self.path.exists() and time.monotonic() < deadline:
            try:
                self.path.rmdir()
            except OSError:
                time.sleep(0.1)


def group_members(pgid: int) -> list[int]:
    """Live processes of process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members
