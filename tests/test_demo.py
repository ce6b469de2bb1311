"""README's first command: the demo runs the sample program, restarts it on an edit, and every
way of stopping it (Ctrl-C, kill, the terminal closed) stops the server, the daemon and its
programs. A second run finds the first one's data and warns of nothing."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import threading

import pytest

from support import ROOT, free_port, wait_for

pytestmark = pytest.mark.integration

DEMO = ROOT / "scripts" / "demo.py"


# ---- processes, by id -------------------------------------------------------------------------

def stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from the state field on (state, ppid, ..., starttime at 19), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except (OSError, IndexError):
        return None


def tree(pid: int) -> dict[int, str]:
    """pid and every process below it: {pid: start time}, the pair that names a process even
    after its id is reused."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := stat(int(entry))):
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = {}, [pid]
    while todo:
        current = todo.pop()
        if fields := stat(current):
            found[current] = fields[19]
            todo.extend(children.get(current, []))
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(processes: dict[int, str]) -> dict[int, str]:
    """Those of `processes` that still run (a zombie does not: it only waits to be reaped)."""
    left = {}
    for pid, started in processes.items():
        fields = stat(pid)
        if fields and fields[19] == started and fields[0] != "Z":
            left[pid] = cmdline(pid)
    return left


# ---- a running demo ---------------------------------------------------------------------------

def as_from_a_shell() -> None:
    """SIGINT and SIGHUP as an interactive shell leaves them to a command it starts, even when the
    tests themselves run with them ignored (under nohup, or as a background job): the demo keeps
    an ignored one ignored, as it should."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


class Demo:
    """scripts/demo.py in its own session, its output collected; on a terminal of its own (a pty
    whose closing is a real hang-up) when `terminal` is true."""

    def __init__(self, workdir, port: int, terminal: bool = False) -> None:
        self.text = ""
        self.port = port
        args = [sys.executable, str(DEMO), "--port", str(port), "--macid", "4242",
                "--workdir", str(workdir)]
        self._stop_reading = threading.Event()
        if terminal:
            self.master, slave = pty.openpty()
            self.process = subprocess.Popen(
                args, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                preexec_fn=lambda: (as_from_a_shell(), fcntl.ioctl(0, termios.TIOCSCTTY, 0)))  # its tty
            os.close(slave)
            self._reader = threading.Thread(target=self._read_terminal, daemon=True)
        else:
            self.master = None
            self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True, start_new_session=True, preexec_fn=as_from_a_shell)
            self._reader = threading.Thread(target=self._read_pipe, daemon=True)
        self._reader.start()
        self.processes: dict[int, str] = {}

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_pipe(self) -> None:
        for line in self.process.stdout:
            self.text += line

    def _read_terminal(self) -> None:
        while not self._stop_reading.is_set():
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    data = os.read(self.master, 65536)
                except OSError:             # EIO: nothing has the terminal open any more
                    return
                if not data:
                    return
                self.text += data.decode(errors="replace").replace("\r\n", "\n")

    def wait_running(self) -> None:
        """Until the sample program logs, then note every process of the demo: itself, the test
        server (couch-server and its node), the daemon and the program."""
        wait_for(lambda: "hello: hello from" in self.text, timeout=90,
                 message=f"the sample program:\n{self.text}")

        def complete():
            self.processes = tree(self.pid)
            lines = [cmdline(pid) for pid in self.processes]
            return all(any(part in line for line in lines)
                       for part in ("scripts/couch-server", "bin/pouchdb-server", "himbeerecouch run",
                                    "himbeerecouch.child"))
        wait_for(complete, timeout=10, message=f"the demo's processes: {self.processes}")

    def close_terminal(self) -> None:
        self._stop_reading.set()
        self._reader.join(timeout=5)
        os.close(self.master)               # the hang-up: SIGHUP to the session's leader
        self.master = None

    def wait(self, timeout: float = 60) -> int:
        returncode = self.process.wait(timeout=timeout)
        if self.master is None:
            self._reader.join(timeout=5)
        return returncode

    def kill(self) -> None:
        """At the end of a test, whatever happened: nothing of it may outlive the test."""
        for pid in [self.pid, *alive(self.processes)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        if self.master is not None:
            self.close_terminal()

    def stopped(self, stop) -> int:
        """Stop it with `stop(self)`; its exit status, once it and everything it started ended."""
        stop(self)
        try:
            returncode = self.wait()
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the demo did not stop:\n{self.text}") from None
        assert self.processes, "no processes noted"
        try:
            wait_for(lambda: not alive(self.processes), timeout=10)
        except AssertionError:
            raise AssertionError(f"left running after the demo exited ({returncode}): "
                                 f"{alive(self.processes)}") from None
        return returncode


def run_demo_and_edit(demo: Demo) -> None:
    demo.wait_running()
    # The lines the demo prints for editing the document, run as a user would paste them.
    edit = re.search(r"^  REV=.*?\n(?:^  .*\n)+", demo.text, re.MULTILINE)
    assert edit, demo.text
    pasted = subprocess.run(["bash", "-c", edit.group(0)], capture_output=True, text=True, timeout=30)
    assert pasted.returncode == 0 and '"ok":true' in pasted.stdout, pasted
    wait_for(lambda: "hello: edited!" in demo.text, message=f"the edited program:\n{demo.text}")
    assert "hello: asked to quit, bye" in demo.text       # the old version was asked to stop


# ---- the tests --------------------------------------------------------------------------------

def test_the_demo_as_the_readme_tells_it(tmp_path):
    demo = Demo(tmp_path / "demo", free_port())
    try:
        run_demo_and_edit(demo)
        # Ctrl-C: SIGINT to the terminal's whole foreground group. Server, node, daemon and
        # program are gone with the demo.
        assert demo.stopped(lambda demo: os.killpg(demo.pid, signal.SIGINT)) == 0, demo.text
    finally:
        demo.kill()
    assert "Traceback" not in demo.text


STOPS = {
    "SIGTERM (kill PID)": lambda demo: os.kill(demo.pid, signal.SIGTERM),
    "SIGINT to the demo alone": lambda demo: os.kill(demo.pid, signal.SIGINT),
    "SIGHUP to the demo alone": lambda demo: os.kill(demo.pid, signal.SIGHUP),
    "the terminal closed": Demo.close_terminal,
}


@pytest.mark.parametrize("how", list(STOPS))
def test_every_way_of_stopping_it_stops_everything(tmp_path, how):
    demo = Demo(tmp_path / "demo", free_port(), terminal=how == "the terminal closed")
    try:
        demo.wait_running()
        returncode = demo.stopped(STOPS[how])
    finally:
        demo.kill()
    assert returncode == 0, demo.text           # a stop that was asked for is a success
    if how != "the terminal closed":            # (then its output went with the terminal)
        assert "hello: asked to quit, bye" in demo.text, demo.text
        assert "Traceback" not in demo.text


def test_a_second_run_finds_the_first_ones_data_and_warns_of_nothing(tmp_path):
    workdir, port = tmp_path / "demo", free_port()    # the same server URL, as with the default
    first = Demo(workdir, port)
    try:
        run_demo_and_edit(first)               # the feed's checkpoint moves past the edit
        assert first.stopped(lambda demo: os.killpg(demo.pid, signal.SIGINT)) == 0, first.text
    finally:
        first.kill()

    second = Demo(workdir, port)
    try:
        wait_for(lambda: re.search(r"hello: (hello from|edited!)", second.text), timeout=90,
                 message=f"the program:\n{second.text}")
        second.processes = tree(second.pid)
        assert second.stopped(lambda demo: os.killpg(demo.pid, signal.SIGINT)) == 0, second.text
    finally:
        second.kill()
    assert "ahead of the database" not in second.text, second.text
    assert "WARNING" not in second.text, second.text
    # The program as the first run left it, edited, runs without another edit.
    assert "hello: edited!" in second.text and "hello: hello from" not in second.text, second.text
    assert "the last run left" in second.text, second.text
    assert "Traceback" not in first.text + second.text
