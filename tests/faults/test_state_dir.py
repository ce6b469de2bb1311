"""A state dir that fills up or turns read-only under a running daemon (a dying SD card).

The state dir is a small tmpfs mounted for the test (root and mount rights needed; the test is
skipped with the reason otherwise). A command is claimed (its "claimed" record on disk), then the
disk fails before it starts: it must not run, its document must say why, the daemon killed and
restarted on the same failing disk must not run it either, and programs keep running and keep
following code changes.
"""
from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

from invariants import check_program, check_state_files, wait_no_leftovers
from support import marker_program, starts, wait_for

pytestmark = pytest.mark.integration

MACID = 202481596538417
CMD = f"{MACID}_cmd"
REASONS = {"full": "No space left on device", "read-only": "Read-only file system"}


@pytest.fixture
def small_tmpfs():
    """`mount(path)`: a 512 KiB tmpfs on `path`, lazily unmounted after the test."""
    mounted: list[Path] = []

    def mount(path: Path) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs as the state dir needs root")
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0755", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"mount is not permitted here ({done.stderr.strip()}); this test needs "
                        "CAP_SYS_ADMIN to put the state dir on a small tmpfs")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> int:
    """Write a file until the file system is full; returns the bytes written."""
    written = 0
    with open(path / "filler", "wb", buffering=0) as stream:
        for size in (65536, 4096, 1):
            try:
                while True:
                    written += stream.write(b"\0" * size)
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
    return written


def break_disk(how: str, state_dir: Path) -> None:
    if how == "full":
        assert fill(state_dir) > 0
    else:
        done = subprocess.run(["mount", "-o", "remount,ro", str(state_dir)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    with pytest.raises(OSError):
        (state_dir / "probe").write_text("x" * 8192)


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_a_failing_state_dir_never_runs_a_command_twice(admin, make_daemon, small_tmpfs, tmp_path, how):
    daemon = make_daemon(max_parallel_commands=1)
    state_dir = small_tmpfs(daemon.state_dir)
    markers, runs, gate = tmp_path / "markers", tmp_path / "runs", tmp_path / "gate"
    markers.mkdir()
    admin.put({"_id": "steady", "type": MACID, "code": marker_program(markers, "steady")})
    daemon.start()
    wait_for(lambda: starts(markers, "steady"), message="the program")
    # One runner: `blocker` holds it while `victim` is claimed, so the disk can fail between the
    # claim of `victim` (on disk) and its start.
    admin.put({"_id": "blocker", "type": CMD,
               "cmd": ["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done; echo let through"]})
    wait_for(lambda: "claimed" in admin.get("blocker"), message="the blocker claimed")
    admin.put({"_id": "victim", "type": CMD, "cmd": ["sh", "-c", f"echo run >> {runs}; sleep 30"]})
    wait_for(lambda: "claimed" in admin.get("victim"), message="the victim claimed")
    break_disk(how, state_dir)
    gate.touch()

    wait_for(lambda: runs.exists() or "ret" in admin.get("victim"), timeout=15,
             message="the victim run or reported")

    # Killed and restarted on the same failing disk: nothing runs twice, programs run on.
    daemon.process.kill()
    daemon.process.wait()
    daemon.start()
    check_program(admin, MACID, "steady")
    admin.put({"_id": "steady", "type": MACID, "code": marker_program(markers, "steady2")})
    wait_for(lambda: starts(markers, "steady2"), message="a code change applied without a state dir")
    check_program(admin, MACID, "steady")
    admin.put({"_id": "after", "type": CMD, "cmd": ["sh", "-c", f"echo after >> {tmp_path / 'after'}"]})
    # Claims are decided in order: once `after` is decided, `victim` was decided too.
    wait_for(lambda: {"ret", "claimed"} & set(admin.get("after")), message="a new command decided")
    time.sleep(1)                                 # a wrongly queued run of `victim` would show now
    ran = runs.read_text().count("run") if runs.exists() else 0
    assert ran <= 1, f"the command ran {ran} times"
    assert ran == 0, "the command ran though its start could not be recorded"
    victim = admin.get("victim")
    assert victim["error"] == f"not run: cannot write the state dir ({REASONS[how]})", victim
    assert victim["ret"][0] is None and victim["returncode"] is None
    assert REASONS[how] in victim["ret"][1] and "send the command again" in victim["ret"][1]
    assert admin.get("blocker")["ret"][0] == "let through\n", "the command started before still reports"
    after = wait_for(lambda: "ret" in admin.get("after") and admin.get("after"), message="its answer")
    assert after["error"] == f"not run: cannot write the state dir ({REASONS[how]})", after
    assert "claimed" not in after and not (tmp_path / "after").exists()
    assert daemon.stop() == 0
    wait_no_leftovers(tmp_path)
    check_state_files(state_dir)
