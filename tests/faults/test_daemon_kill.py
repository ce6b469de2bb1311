"""The daemon SIGKILLed at random moments, while code changes and commands keep coming.

Each cycle starts the daemon, writes a new version of a program and a new command (one that
records its start and its end in a file and sleeps half a second), and kills the daemon with
SIGKILL: at a random moment, while a command runs, or while a state file is being written (a
temp file of write_atomic is seen in the state dir). No systemd: nothing but the daemon itself
cleans up after the dead one. At the end a last daemon runs until everything is answered, is
stopped, and the invariants are checked (tests/faults/invariants.py).

HIMBEERECOUCH_FAULT_CYCLES (default 30) sets the number of cycles, HIMBEERECOUCH_SOAK=1
multiplies it by 10, HIMBEERECOUCH_FAULT_SEED replays a run (the seed is printed).
"""
from __future__ import annotations

import os
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from invariants import (check_commands, check_program, check_state_files, command_script,
                        seconds_since, side_effects, wait_no_leftovers)
from support import marker_program, wait_for

pytestmark = pytest.mark.integration

MACID = 202481596538417
CYCLES = int(os.environ.get("HIMBEERECOUCH_FAULT_CYCLES", "30")) * \
    (10 if os.environ.get("HIMBEERECOUCH_SOAK") == "1" else 1)


def _kill_mid_write(state_dir: Path, limit: float) -> bool:
    """Spin until a temp file of an atomic write shows up (True), or `limit` seconds pass."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if any(name.endswith(".tmp") for name in os.listdir(state_dir)):
                return True
        except FileNotFoundError:
            pass
    return False


def test_sigkill_at_random_moments_keeps_every_promise(admin, make_daemon, tmp_path):
    seed = int(os.environ.get("HIMBEERECOUCH_FAULT_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    began = time.monotonic()
    daemon = make_daemon(command_timeout_seconds=20)
    state_dir = daemon.state_dir
    runs = tmp_path / "runs"
    markers = tmp_path / "markers"
    markers.mkdir()
    admin.put({"_id": "steady", "type": MACID, "code": marker_program(markers, "steady")})
    commands: list[str] = []
    figures: Counter = Counter()

    for cycle in range(CYCLES):
        daemon.start()
        admin.put({"_id": "prog", "type": MACID, "code": marker_program(markers, f"v{cycle}")})
        doc_id = f"c{cycle:03d}"
        admin.put({"_id": doc_id, "type": f"{MACID}_cmd", "timeout": 10,
                   "cmd": command_script(doc_id, runs, seconds=round(rng.uniform(0.2, 2.0), 2))})
        commands.append(doc_id)
        mode = ("random", "mid-command", "mid-write")[cycle % 3]
        if mode == "random":
            time.sleep(rng.uniform(0.0, 1.5))
        elif mode == "mid-command":
            try:
                wait_for(lambda: side_effects(runs)[0][doc_id], timeout=5, interval=0.01)
            except AssertionError:
                figures["mid-command: the command had not started in 5 s"] += 1
            time.sleep(rng.uniform(0.0, 0.4))
        else:
            figures["mid-write: temp file seen at the kill"] += _kill_mid_write(state_dir, rng.uniform(0.3, 2.0))
        starts, ends = side_effects(runs)
        figures["killed while a command ran"] += any(starts[c] > ends[c] for c in commands)
        daemon.process.kill()
        daemon.process.wait()
        daemon.process = None
        figures["temp files left by a kill"] += sum(name.endswith(".tmp") for name in os.listdir(state_dir)) \
            if state_dir.exists() else 0

    # A last daemon, left alone: everything gets answered and the newest code runs.
    daemon.start()
    wait_for(lambda: all("ret" in (admin.get(c) or {}) for c in commands), timeout=60, interval=0.2,
             message="every command answered: " + str([c for c in commands if "ret" not in admin.get(c)]))
    check_program(admin, MACID, "prog")
    check_program(admin, MACID, "steady")
    newest = f"v{CYCLES - 1}"
    assert list(markers.glob(f"{newest}-*")), f"the newest code ({newest}) never started"
    assert daemon.stop() == 0
    wait_no_leftovers(tmp_path, timeout=15)
    check_state_files(state_dir)
    outcomes = check_commands(admin, commands, runs)
    assert sum(outcomes.values()) == CYCLES
    assert outcomes["done once"] > 0, f"no command ever completed: {outcomes}"
    # The ledger holds every claim before it is made: a claimed command always has a record.
    assert not outcomes["interrupted, no record"], outcomes
    print(f"\n[daemon kill] seed {seed}: {CYCLES} cycles in {seconds_since(began)} s; "
          f"commands: {dict(outcomes)}; {dict(figures)}")
