"""The programs' output on the server: the document `<MacID>_output` (outputtail.py), its tail,
its counts and last error, where it goes and how often it is written."""
from __future__ import annotations

import math
import re
import signal
import time
from collections import deque

import pytest

from himbeerecouch import child, output
from himbeerecouch.couch import Database
from himbeerecouch.outputtail import LINE_CHARS, OutputTails, OutputWriter
from support import free_port, wait_for
from test_operator import OTHER, PI, device_session, fleet_db  # noqa: F401 (fleet_db: fixture)
from test_status_database import status_db  # noqa: F401 (fixture)

MACID = 202481596538417
OUTPUT = f"{MACID}_output"
ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def program(body: str) -> str:
    """A program whose main() runs `body` (indented by 4), then waits to be asked to quit."""
    return f'''
import os, sys, threading, time
def main():
{body}
    done = threading.Event()
    register_quit_notification(done.set)
    done.wait()
'''


def shown_when(db, doc_id: str, condition, output_id: str = OUTPUT):
    """For wait_for: the output document once its entry for `doc_id` meets `condition`."""
    def check():
        doc = db.get(output_id)
        shown = (doc or {}).get("programs", {}).get(doc_id)
        return doc if shown is not None and condition(shown) else None
    return check


def texts(shown: dict) -> list[str]:
    return [line[2] for line in shown["lines"]]


# ---- the document ----------------------------------------------------------------------------

def test_what_a_program_prints_appears_with_its_stream_in_order(admin, make_daemon):
    admin.put({"_id": "p", "type": MACID, "name": "printer", "code": program(
        '    print("one")\n    time.sleep(0.3)\n    print("two", file=sys.stderr)\n'
        '    time.sleep(0.3)\n    print("three")\n')})
    make_daemon(output_interval_seconds=1).start()
    doc = wait_for(shown_when(admin, "p", lambda shown: len(shown["lines"]) == 3), message="three lines")
    assert set(doc) == {"_id", "_rev", "type", "macid", "timestamp", "output_tail_lines", "programs"}
    assert (doc["type"], doc["macid"], doc["output_tail_lines"]) == ("output", MACID, 20)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["timestamp"])
    shown = doc["programs"]["p"]
    assert [line[1:] for line in shown["lines"]] == [["stdout", "one"], ["stderr", "two"], ["stdout", "three"]]
    times = [line[0] for line in shown["lines"]]
    assert all(ISO_MS.fullmatch(when) for when in times) and times == sorted(times)
    assert shown == {"name": "printer", "lines": shown["lines"], "lines_seen": 3, "dropped_lines": 0,
                     "cut_lines": 0, "last_error": None}


def test_the_tail_keeps_only_the_last_lines(admin, make_daemon):
    admin.put({"_id": "p", "type": MACID, "code": program('    for n in range(12):\n        print("line", n)\n')})
    make_daemon(output_tail_lines=5, output_interval_seconds=1).start()
    doc = wait_for(shown_when(admin, "p", lambda shown: shown["lines_seen"] == 12), message="12 lines seen")
    shown = doc["programs"]["p"]
    assert texts(shown) == [f"line {n}" for n in range(7, 12)]
    assert shown["dropped_lines"] == 0 and doc["output_tail_lines"] == 5


def test_a_long_line_is_cut_and_counted(admin, make_daemon):
    admin.put({"_id": "p", "type": MACID, "code": program('    print("x" * 1200)\n    print("short")\n')})
    daemon = make_daemon(output_interval_seconds=1)
    daemon.start()
    doc = wait_for(shown_when(admin, "p", lambda shown: shown["lines_seen"] == 2), message="both lines")
    shown = doc["programs"]["p"]
    assert texts(shown) == ["x" * (LINE_CHARS - 1) + "…", "short"] and len(texts(shown)[0]) == LINE_CHARS == 500
    assert shown["cut_lines"] == 1
    assert "x" * 1200 in daemon.log()                       # the log has it whole


CHATTY = '''
import threading, time
def main():
    n = 0
    end = time.monotonic() + {seconds}
    while time.monotonic() < end:
        print("n=%d" % n)
        n += 1
    with open({marker!r}, "w") as done:
        done.write(str(n))
    quit = threading.Event()
    register_quit_notification(quit.set)
    quit.wait()
'''


def test_a_chatty_program_costs_one_write_per_interval_and_its_counts_add_up(admin, make_daemon, tmp_path):
    interval = 1.0
    marker = tmp_path / "printed"
    admin.put({"_id": "chatty", "type": MACID, "name": "chatty",
               "code": CHATTY.format(seconds=6, marker=str(marker))})
    daemon = make_daemon(output_interval_seconds=interval)
    began = time.monotonic()
    daemon.start()
    printed = int(wait_for(lambda: marker.exists() and marker.read_text(), timeout=40,
                           message="the program to finish printing"))
    doc = wait_for(shown_when(admin, "chatty", lambda shown: shown["lines_seen"] == printed),
                   timeout=15, message=f"all {printed} lines counted")
    elapsed = time.monotonic() - began
    writes = int(doc["_rev"].split("-")[0])
    # Writes are at least `interval` apart, however many lines a second the program prints.
    assert 3 <= writes <= math.ceil(elapsed / interval) + 1, (writes, elapsed, printed)
    # Every line is either logged (and so went through the tail) or counted as dropped.
    logged = re.findall(r"himbeerecouch\.program: chatty: (n=\d+)$", daemon.log(), re.MULTILINE)
    shown = doc["programs"]["chatty"]
    assert printed > 10_000 and 0 < shown["dropped_lines"] == printed - len(logged), (printed, len(logged))
    assert texts(shown) == logged[-20:]


def test_the_lines_a_program_left_in_its_pipe_when_it_ended_are_counted_too(admin, make_daemon):
    # A pipe of 1 MiB holds nearly all the program's output when it ends: the daemon takes it
    # after the end (programs.py, _drain), not as it comes.
    admin.put({"_id": "burst", "type": MACID, "name": "burst", "restart": "no", "code": (
        "import fcntl, sys\ndef main():\n    fcntl.fcntl(1, fcntl.F_SETPIPE_SZ, 1 << 20)\n"
        "    sys.stdout.write(''.join('n=%d\\n' % n for n in range(100_000)))\n")})
    daemon = make_daemon(output_interval_seconds=1)
    daemon.start()
    doc = wait_for(shown_when(admin, "burst", lambda shown: shown["lines_seen"] >= 100_000),
                   message="every line counted")
    logged = re.findall(r"himbeerecouch\.program: burst: (n=\d+)$", daemon.log(), re.MULTILINE)
    shown = doc["programs"]["burst"]
    assert (shown["lines_seen"], shown["dropped_lines"]) == (100_000, 100_000 - len(logged))
    assert texts(shown) == logged[-20:]


def test_a_program_that_raises_shows_its_last_error_with_the_traceback(admin, make_daemon):
    admin.put({"_id": "p", "type": MACID, "code": (
        "def check(sensor):\n    raise ValueError('sensor %d unplugged' % sensor)\n"
        "def main():\n    check(7)\n")})
    make_daemon(output_interval_seconds=1).start()
    doc = wait_for(shown_when(admin, "p", lambda shown: shown["last_error"]), message="the last error")
    shown = doc["programs"]["p"]
    error = shown["last_error"]
    assert error["text"] == "main() raised ValueError: sensor 7 unplugged"
    assert ISO_MS.fullmatch(error["time"])
    trace = error["traceback"]
    assert trace.startswith("Traceback (most recent call last):")
    assert ", in check" in trace and trace.rstrip().endswith("ValueError: sensor 7 unplugged")
    # stderr is as it always was: the traceback is printed there too.
    doc = wait_for(shown_when(admin, "p", lambda shown: "ValueError: sensor 7 unplugged" in texts(shown)),
                   message="the traceback on stderr")
    assert {line[1] for line in doc["programs"]["p"]["lines"]} == {"stderr"}
    # New code: the old code's error is not shown as this program's.
    admin.put({"_id": "p", "type": MACID, "code": program('    print("fixed")\n')})
    doc = wait_for(shown_when(admin, "p", lambda shown: "fixed" in texts(shown)), message="the new code's output")
    assert doc["programs"]["p"]["last_error"] is None


def test_a_removed_program_disappears_from_the_document(admin, make_daemon):
    for label in ("a", "b"):
        admin.put({"_id": label, "type": MACID, "code": program(f'    print("from {label}")\n')})
    make_daemon(output_interval_seconds=1).start()
    wait_for(lambda: all(shown_when(admin, label, lambda shown: shown["lines"])() for label in ("a", "b")),
             message="both programs' output")
    admin.delete("b")
    doc = wait_for(lambda: set((admin.get(OUTPUT) or {}).get("programs", {})) == {"a"} and admin.get(OUTPUT),
                   message="b gone from the output document")
    assert texts(doc["programs"]["a"]) == ["from a"]


def test_output_tail_lines_0_writes_no_document(admin, make_daemon):
    admin.put({"_id": "p", "type": MACID, "name": "quiet", "code": program('    print("hello")\n')})
    daemon = make_daemon(output_tail_lines=0, output_interval_seconds=0.5)
    daemon.start()
    daemon.wait_log("quiet: hello")
    wait_for(lambda: ((admin.get(f"{MACID}_heartbeat") or {}).get("programs", {}).get("p", {})
                      .get("state") == "RUNNING"), message="the program RUNNING in the status")
    time.sleep(2.0)                     # four intervals: a document would have been written by now
    assert admin.get(OUTPUT) is None


def test_with_a_status_database_the_output_goes_there(admin, status_db, make_daemon):  # noqa: F811
    admin.put({"_id": "p", "type": MACID, "code": program('    print("over there")\n')})
    make_daemon(status_database=status_db.db, output_interval_seconds=1).start()
    doc = wait_for(shown_when(status_db, "p", lambda shown: texts(shown) == ["over there"]),
                   message="the output in the status database")
    assert doc["macid"] == MACID
    assert admin.get(OUTPUT) is None                        # nothing in the code database


def test_a_device_writes_its_own_output_document_and_no_other(couch, fleet_db, make_daemon):  # noqa: F811
    """Under setup-db's validation function, logged in as the device itself."""
    admin, _ = fleet_db
    daemon = make_daemon(macid=PI, server=couch.url, output_interval_seconds=1)
    daemon.settings["database"] = admin.db
    daemon.write_config()
    session, _ = device_session(couch, admin, daemon.state_dir, PI)
    admin.put({"_id": "prog", "type": PI, "code": program('    print("as a device")\n')})
    daemon.start()
    wait_for(shown_when(admin, "prog", lambda shown: texts(shown) == ["as a device"]),
             message="the device's output document")
    assert "cannot write the output document" not in daemon.log()
    other = session.put(admin.url(f"{OTHER}_output"), json={"type": "output", "macid": OTHER, "programs": {}},
                        timeout=10)
    assert other.status_code == 403, other.text


def test_sighup_turns_the_output_on_and_sizes_it(admin, make_daemon):
    admin.put({"_id": "p", "type": MACID, "name": "ticker", "code": program(
        '    n = 0\n    while not should_quit():\n        print("tick", n)\n        n += 1\n'
        '        time.sleep(0.1)\n')})
    daemon = make_daemon(output_tail_lines=0, output_interval_seconds=0.5)
    daemon.start()
    daemon.wait_log("ticker: tick 5")
    assert admin.get(OUTPUT) is None
    daemon.settings["output_tail_lines"] = "3"
    daemon.write_config()
    daemon.signal(signal.SIGHUP)
    doc = wait_for(shown_when(admin, "p", lambda shown: len(shown["lines"]) == 3), message="the output after SIGHUP")
    assert doc["output_tail_lines"] == 3 and all(text.startswith("tick ") for text in texts(doc["programs"]["p"]))


# ---- the writer, on its own ------------------------------------------------------------------

def test_the_writer_writes_only_changes_and_the_newest_last(admin, couch):
    interval = 1.0
    tails = OutputTails(5)
    writer = OutputWriter(connect=lambda: Database(couch.admin_url, admin.db), macid=9, interval=interval)
    writer.start()
    try:
        start = time.monotonic()
        for n in range(30):
            tails.line("p", "p", "stdout", f"line {n}")
            writer.publish(tails)
            time.sleep(0.1)
        newest = wait_for(shown_when(admin, "p", lambda shown: texts(shown)[-1] == "line 29", "9_output"),
                          message="the newest tail written")
        elapsed = time.monotonic() - start
        writes = int(newest["_rev"].split("-")[0])
        assert 2 <= writes <= math.ceil(elapsed / interval) + 1, (writes, elapsed)
        # Published again without a change: nothing to write.
        writer.publish(tails)
        time.sleep(2.5 * interval)
        assert admin.get("9_output")["_rev"] == newest["_rev"]
    finally:
        writer.stop()
        writer.join(5)


def test_a_failed_write_is_tried_again_without_a_new_publish(admin, couch):
    dead = f"http://127.0.0.1:{free_port()}"                 # nobody listens there
    attempts = []

    def connect():
        attempts.append(1)
        return Database(dead if len(attempts) == 1 else couch.admin_url, admin.db)
    tails = OutputTails(5)
    tails.line("p", "p", "stderr", "written in the end")
    writer = OutputWriter(connect=connect, macid=9, interval=0.5)
    writer.start()
    try:
        writer.publish(tails)
        doc = wait_for(lambda: admin.get("9_output"), timeout=10, message="the output written on the retry")
        assert texts(doc["programs"]["p"]) == ["written in the end"] and len(attempts) == 2
    finally:
        writer.stop()
        writer.join(5)


# ---- the bookkeeping, on its own -------------------------------------------------------------

def test_the_memory_of_a_tail_is_bounded_whatever_is_printed():
    tails = OutputTails(20)
    huge = "y" * output.MAX_LINE
    for n in range(5000):
        if n % 3:
            tails.line("p", "p", "stdout", huge)
        else:
            tails.dropped("p", "p", 1)
    tails.error("p", "p", "e" * 100_000, "t" * 100_000)
    shown = tails.snapshot()[1]["programs"]["p"]
    assert len(shown["lines"]) == 20 and sum(len(text) for text in texts(shown)) == 20 * LINE_CHARS
    assert (shown["lines_seen"], shown["dropped_lines"]) == (5000, 1667)
    assert shown["cut_lines"] == 5000 - 1667
    assert len(shown["last_error"]["text"]) == LINE_CHARS
    assert len(shown["last_error"]["traceback"]) == child.TRACEBACK_CHARS


def test_resizing_keeps_the_newest_lines_and_forget_removes_a_program():
    tails = OutputTails(5)
    tails.track("quiet", "quiet one")
    for n in range(5):
        tails.line("p", "p", "stdout", str(n))
    tails.resize(2)
    version, fields = tails.snapshot()
    assert fields["output_tail_lines"] == 2
    assert texts(fields["programs"]["p"]) == ["3", "4"] and fields["programs"]["quiet"]["lines"] == []
    tails.line("p", "p", "stdout", "5")
    assert texts(tails.snapshot()[1]["programs"]["p"]) == ["4", "5"]
    tails.forget("quiet")
    assert set(tails.snapshot()[1]["programs"]) == {"p"} and tails.version > version


@pytest.mark.parametrize("lines", [1, 20, 1000])
def test_a_tail_holds_n_lines(lines):
    tails = OutputTails(lines)
    expected: deque = deque(maxlen=lines)
    for n in range(2 * lines + 3):
        tails.line("p", "p", "stdout", str(n))
        expected.append(str(n))
    assert texts(tails.snapshot()[1]["programs"]["p"]) == list(expected)


def test_the_childs_report_line_fits_the_daemons_longest_line():
    assert child.REPORT_LINE_LIMIT < output.MAX_LINE
