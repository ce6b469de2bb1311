"""Invariant checks shared by the fault-injection tests (tests/faults/).

Each check raises AssertionError with what it found, or returns figures for the test's summary:

- `command_script(doc_id, runs)` and `check_commands(admin, ids, runs)`: a command that records
  each start and each end in a file, and the check that every command document was executed
  exactly once or was reported not run or interrupted, in words that match what happened;
- `check_program(admin, macid, doc_id)`: the program runs with the newest revision of its
  document (every code change applied);
- `leftover_processes(folder)` / `wait_no_leftovers(folder)`: processes still working in a test's
  folder (the programs' and commands' working directories are below its state dir) once the daemon is
  stopped;
- `check_state_files(state_dir)`: every JSON file there parses, and no temp file is left.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

from support import wait_for


def command_script(doc_id: str, runs: Path, seconds: float = 0.5) -> list[str]:
    """`cmd` of a command that appends "<id> start <pid>" and, `seconds` later, "<id> done" to
    `runs`, and prints "ok <id>"."""
    script = f'echo "$0 start $$" >> {runs}; sleep {seconds}; echo "$0 done" >> {runs}; echo "ok $0"'
    return ["sh", "-c", script, doc_id]


def side_effects(runs: Path) -> tuple[Counter, Counter]:
    """(starts, ends) per command id, from the file the commands append to."""
    starts, ends = Counter(), Counter()
    lines = runs.read_text().splitlines() if runs.exists() else []
    for line in lines:
        doc_id, what = line.split()[:2]
        (starts if what == "start" else ends)[doc_id] += 1
    return starts, ends


def check_commands(admin, ids: list[str], runs: Path) -> Counter:
    """Every document has a result that agrees with the side effects; returns outcome counts."""
    starts, ends = side_effects(runs)
    outcomes: Counter = Counter()
    for doc_id in ids:
        doc = admin.get(doc_id)
        assert doc and "ret" in doc, f"{doc_id} has no result: {doc}"
        ran, done = starts[doc_id], ends[doc_id]
        assert ran <= 1, f"{doc_id} ran {ran} times: {doc}"
        error = doc.get("error")
        detail = doc["ret"][1] or ""
        if error is None:
            assert (ran, done, doc["returncode"]) == (1, 1, 0) and doc["ret"][0] == f"ok {doc_id}\n", \
                f"{doc_id} reported done: {doc}; starts {ran}, ends {done}"
            outcomes["done once"] += 1
        elif error.startswith("not run"):
            assert ran == 0, f"{doc_id} reported not run but ran: {doc}"
            outcomes["not run"] += 1
        elif error == "interrupted":
            if "was still running" in detail:
                # It had not exited; a kill can still find it after its last line (done == 1).
                assert ran == 1, f"{doc_id} reported killed: {doc}; starts {ran}, ends {done}"
                outcomes["interrupted, killed" + (" after its last line" if done else "")] += 1
            elif "had ended (process group" in detail:
                assert (ran, done) == (1, 1), f"{doc_id} reported ended: {doc}; starts {ran}, ends {done}"
                outcomes["interrupted, had ended"] += 1
            elif "did not start or had ended" in detail:
                assert done == ran, f"{doc_id}: {doc}; starts {ran}, ends {done}"
                outcomes["interrupted, did not start or had ended"] += 1
            else:
                # No ledger record of it (lost, or a claim whose reply was lost): no details.
                assert done <= ran, f"{doc_id}: {doc}; starts {ran}, ends {done}"
                outcomes["interrupted, no record"] += 1
        else:
            raise AssertionError(f"{doc_id}: unexpected error {error!r}: {doc}")
    return outcomes


def check_program(admin, macid: int, doc_id: str, timeout: float = 20.0) -> dict:
    """The status document shows `doc_id` RUNNING with the document's current revision."""
    def current() -> dict | None:
        rev = (admin.get(doc_id) or {}).get("_rev")
        program = ((admin.get(f"{macid}_heartbeat") or {}).get("programs") or {}).get(doc_id) or {}
        return program if program.get("state") == "RUNNING" and program.get("rev") == rev else None
    return wait_for(current, timeout, interval=0.2,
                    message=f"{doc_id} RUNNING at its newest revision: "
                            f"{((admin.get(f'{macid}_heartbeat') or {}).get('programs') or {}).get(doc_id)}")


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its parent does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def leftover_processes(folder: Path) -> list[str]:
    """Live processes (not this one) whose working directory is in `folder` or whose command
    line names it: programs and commands of a daemon that keeps its state dir there."""
    folder = str(Path(folder).resolve())
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{name}/cwd")
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (cwd == folder or cwd.startswith(folder + "/") or folder in cmdline) and alive(int(name)):
            found.append(f"{name}: {cmdline.strip()} (in {cwd})")
    return found


def wait_no_leftovers(folder: Path, timeout: float = 10.0) -> None:
    wait_for(lambda: not leftover_processes(folder), timeout, interval=0.2,
             message=f"no process left in {folder}: {leftover_processes(folder)}")


def check_state_files(state_dir: Path) -> list[str]:
    """Every *.json file parses as an object; no temp file of a write is left. Returns the names."""
    names = sorted(os.listdir(state_dir))
    temps = [name for name in names if name.endswith(".tmp")]
    assert not temps, f"temp files left in {state_dir}: {temps}"
    for name in names:
        if name.endswith(".json"):
            content = json.loads((state_dir / name).read_text())
            assert isinstance(content, dict), f"{name}: {content!r}"
    return names


def seconds_since(start: float) -> float:
    return round(time.monotonic() - start, 1)
