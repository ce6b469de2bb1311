"""The supervisor and its helpers without a server: states, start failures, output, faults."""
from __future__ import annotations

import sys
import time

import pytest

from himbeerecouch import documents
from himbeerecouch.backoff import Backoff
from himbeerecouch.faultguard import FaultGuard, RepeatedFault
from himbeerecouch.output import LineBudget
from himbeerecouch.programs import State, Supervisor, TransitionError, Program, working_directory


def make_supervisor(tmp_path, python=sys.executable) -> Supervisor:
    return Supervisor(grace_seconds=1, start_seconds=1, backoff_cap=60, workdir=str(tmp_path),
                      database_settings=None, watch_fd=lambda fd, owner: None, unwatch_fd=lambda fd: None,
                      on_change=lambda: None, python=python)


def spec(code="def main(): pass", doc_id="p"):
    return documents.parse({"_id": doc_id, "_rev": "1-a", "type": 1, "code": code}, 10_000_000)


@pytest.mark.parametrize("start, end, allowed", [
    (State.STOPPED, State.STARTING, True),
    (State.STARTING, State.RUNNING, True),
    (State.RUNNING, State.STOPPING, True),
    (State.STOPPING, State.STARTING, True),      # the next spec, once the old process is gone
    (State.BACKOFF, State.STARTING, True),
    (State.FATAL, State.STARTING, True),
    (State.STOPPED, State.RUNNING, False),       # a start is always STARTING first
    (State.STOPPING, State.RUNNING, False),
    (State.EXITED, State.STOPPING, False),
    (State.BACKOFF, State.EXITED, False),
])
def test_only_the_listed_moves_are_allowed(start, end, allowed):
    program = Program(spec=spec(), fingerprint="f", backoff=Backoff(), state=start)
    if allowed:
        program.set_state(end)
        assert program.state == end
    else:
        with pytest.raises(TransitionError):
            program.set_state(end)


def test_a_failing_start_backs_off_further_each_time(tmp_path):
    supervisor = make_supervisor(tmp_path, python=str(tmp_path / "no-such-python"))
    supervisor.apply({"p": (spec(), "f")})
    program = supervisor.programs["p"]
    assert program.state == State.BACKOFF and "cannot start a process" in program.last_error
    delays = []
    for _ in range(4):
        program.deadline = 0.0                   # due now
        supervisor.tick()
        delays.append(program.deadline - time.monotonic())
    assert program.state == State.BACKOFF and program.restarts == 4
    assert delays[-1] > 2 * delays[0], delays


def test_a_large_program_never_blocks_the_start(tmp_path):
    # A child that never reads: writing the program into a pipe would block until it exits.
    sleeper = tmp_path / "python"
    sleeper.write_text("#!/bin/sh\nexec sleep 30\n")
    sleeper.chmod(0o755)
    supervisor = make_supervisor(tmp_path, python=str(sleeper))
    began = time.monotonic()
    supervisor.apply({"big": (spec("# " + "x" * 900_000 + "\ndef main(): pass", "big"), "f")})
    took = time.monotonic() - began
    program = supervisor.programs["big"]
    try:
        assert program.state == State.STARTING and took < 5
    finally:
        program.process.popen.kill()
        program.process.popen.wait()
        supervisor.close()


def test_each_program_works_in_a_directory_of_its_own(tmp_path):
    assert working_directory(tmp_path, "code:1:thermo").name == "code%3A1%3Athermo"
    assert working_directory(tmp_path, "..").name == "%2E."
    assert working_directory(tmp_path, "../../etc").parent == tmp_path
    assert len(working_directory(tmp_path, "x" * 300).name) < 100


def test_global_modules_count_towards_the_size_limit():
    docs = {"lib": {"_id": "lib", "_rev": "1-a", "type": 1, "global_modules": {"big": "#" * 600}},
            "p": {"_id": "p", "_rev": "1-a", "type": 1, "code": "#" * 500 + "\ndef main(): pass"}}
    wanted = documents.wanted_programs(docs, max_bytes=1000)
    assert "too large with the global modules" in wanted["p"][0].error
    assert wanted["lib"][0].error is None
    own = {"_id": "q", "_rev": "1-a", "type": 1, "code": "x = 1", "global_modules": {"g": "#" * 2000}}
    assert "too large" in documents.parse(own, 1000).error


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_line_budget_allows_bursts_then_a_rate_and_counts_the_rest():
    clock = FakeClock()
    budget = LineBudget(rate=10, burst=20, clock=clock)
    assert sum(budget.allow() for _ in range(50)) == 20
    assert budget.dropped == 30
    assert budget.take_report() == 0             # still flooding, and not 10 s yet
    clock.now += 1.0
    assert sum(budget.allow() for _ in range(50)) == 10
    clock.now += 10.0
    assert budget.take_report() == 70            # the flood is over: say how much was lost
    assert budget.take_report() == 0 and budget.dropped == 70


def test_a_flood_that_goes_on_is_reported_every_10_s_not_at_each_spare_token():
    """Each report marks the status changed (a write that wakes every feed): a flood must not
    look over because one token came back between two reads."""
    clock = FakeClock()
    budget = LineBudget(rate=10, burst=20, clock=clock)
    for _ in range(50):
        budget.allow()
    reports = []
    for _ in range(30):                          # 3 s of 100 lines/s against 10/s
        clock.now += 0.1
        reports.append(budget.take_report())     # a read that brought no whole line
        for _ in range(10):
            budget.allow()
    assert reports == [0] * 30
    clock.now += 1.0                             # a second of quiet: the flood is over
    assert budget.take_report() == budget.dropped > 0


def _fails(error=ValueError):
    raise error("boom")


@pytest.mark.parametrize("faults, spacing, gives_up", [
    ([_fails] * 4, 1.0, False),                  # fewer than five
    ([_fails] * 5, 1.0, True),                   # five within a minute
    ([_fails] * 5, 20.0, False),                 # five, but slowly
    ([_fails, lambda: _fails(KeyError)] * 3, 1.0, False),   # different faults
])
def test_the_fault_guard_gives_up_only_on_a_fast_repeat(faults, spacing, gives_up, caplog):
    clock = FakeClock()
    guard = FaultGuard(clock=clock)
    raised = False
    for step in faults:
        clock.now += spacing
        try:
            guard.run(step, "a step")
        except RepeatedFault:
            raised = True
    assert raised == gives_up
    assert "unexpected failure in a step" in caplog.text and "Traceback" in caplog.text


def test_a_line_the_daemon_fails_on_is_dropped_not_raised(tmp_path, monkeypatch, caplog):
    # An exception here would count against the daemon (faultguard): five of them within a
    # minute, all caused by one program's output, would make it exit.
    supervisor = make_supervisor(tmp_path)
    program = Program(spec=spec(), fingerprint="f", backoff=Backoff())

    def broken(text):
        raise KeyError("a bug of the daemon's")
    monkeypatch.setattr("himbeerecouch.programs.json.loads", broken)
    for _ in range(6):
        supervisor._line(program, "report", b'{"log": "x"}')
    assert "cannot handle a line of its report; dropped" in caplog.text
