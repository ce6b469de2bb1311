"""The operator's side of a command document (`himbeerecouch cmd`): write it, wait for its
result, withdraw it when no device claimed it in time, and turn the outcome into an exit status.
(commands.py is the device's side: claim, run, write the result.)"""
from __future__ import annotations

import errno
import re
import time
import uuid
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from .couch import Database
# The CouchDB client is imported when a command runs (see admin.py).

# Exit statuses of `himbeerecouch cmd` besides the command's own (0-255) and 128+N (killed by
# signal N, as a shell reports it; --timeout kills with SIGKILL: 137). 124-127 are what timeout(1),
# env(1) and docker use; 122 and 123 sit below them, away from the small numbers programs use.
EXIT_WITHDRAWN = 122        # --cancel-after: no device claimed it in time; withdrawn, it never runs
EXIT_INTERRUPTED = 123      # the device's daemon stopped while it ran; its result is lost
EXIT_NO_RESULT = 124        # no result within --wait; it stays pending and may still run
EXIT_NOT_RUN = 125          # not run: himbeerecouch failed (here: usage, server; or on the device)
EXIT_CANNOT_EXECUTE = 126   # the device found the program but could not execute it
EXIT_NOT_FOUND = 127        # the device has no such program

EXIT_STATUS_HELP = f"""\
exit status:
  0-255  the command's own exit status
  {EXIT_WITHDRAWN}    withdrawn by --cancel-after before any device claimed it: it never runs
  {EXIT_INTERRUPTED}    interrupted: the device's daemon stopped while it ran; its output is
         lost and it is not run again
  {EXIT_NO_RESULT}    no result within --wait: a command no device has claimed stays pending
         and runs whenever its device next sees it, possibly hours later
  {EXIT_NOT_RUN}    not run: bad usage, the server unreachable or refusing, or the device
         refused it (it cannot write its state dir)
  {EXIT_CANNOT_EXECUTE}    the device could not execute it (not executable, permission denied)
  {EXIT_NOT_FOUND}    the device has no such program
  128+N  killed by signal N (--timeout kills with SIGKILL: 137)
  130    Ctrl-C while waiting: the command stays pending
"""


def withdraw(db: Database, seen: dict, reason: str) -> dict | None:
    """Withdraw a command document that was unclaimed in the revision `seen`: it gets a result
    (a document with `ret` is never run) written with that very revision, so that it races
    safely with a device's claim, which is a write of that revision too. None when the
    document changed meanwhile (claimed, most likely): then it was not withdrawn."""
    from .couch import Conflict
    from .processes import now_iso
    if "claimed" in seen or "ret" in seen:
        return None
    withdrawn = {**seen, "ret": [None, reason], "returncode": None, "error": "withdrawn",
                 "finished": now_iso("milliseconds")}
    try:
        return db.put(withdrawn)
    except Conflict:
        return None


def exit_status(doc: dict) -> int:
    """The exit status of `himbeerecouch cmd` for a command document with its result."""
    error = doc.get("error") or ""
    returncode = doc.get("returncode")
    if error == "withdrawn":
        return EXIT_WITHDRAWN
    if error.startswith("interrupted"):
        return EXIT_INTERRUPTED
    if isinstance(returncode, int) and not isinstance(returncode, bool):
        return returncode if returncode >= 0 else 128 - returncode
    if error.startswith("cannot start"):
        code = re.search(r"\[Errno (\d+)\]", error)
        return EXIT_NOT_FOUND if code and int(code.group(1)) == errno.ENOENT else EXIT_CANNOT_EXECUTE
    if error:                                   # invalid, not run: nothing ran
        return EXIT_NOT_RUN
    return EXIT_NOT_FOUND                       # the original daemon's [null, error]: it could not start


def run_remote(db: Database, macid: int, argv: list[str], timeout: float | None, wait: float,
               progress: TextIO, out: TextIO, err: TextIO, cancel_after: float | None = None,
               user: str | None = None) -> int:
    from .couch import CONNECTION_ERRORS, redact, server_error
    doc = {"_id": f"cmd:{macid}:{uuid.uuid4().hex[:12]}", "type": f"{macid}_cmd", "cmd": argv}
    if timeout is not None:
        doc["timeout"] = timeout
    db.put(doc)
    doc_id = doc["_id"]
    interactive = progress.isatty()
    started = time.monotonic()
    shown = 0
    current: dict = doc
    claimed_seen = False
    trouble = None                                  # the server's last failure while waiting

    def say(line: str) -> None:
        if interactive:
            progress.write("\r" + " " * 40 + "\r")
        err.write(f"himbeerecouch cmd: {line}\n")
        err.flush()

    try:
        while True:
            elapsed = time.monotonic() - started
            try:
                fresh = db.get(doc_id)
                trouble = None
            except CONNECTION_ERRORS as error:      # the command is stored: keep waiting for it
                trouble, fresh = server_error(error, redact(db.server_url), user), current
            if fresh is None:
                say(f"the command document {doc_id} was deleted before a result came; "
                    "whether it ran is not known")
                return EXIT_NO_RESULT
            current = fresh
            if current.get("ret") is not None:
                break
            if "claimed" in current and not claimed_seen:
                claimed_seen = True
                if cancel_after is not None and elapsed >= cancel_after:
                    say(f"{macid} claimed it before it was withdrawn; waiting for its result")
            if cancel_after is not None and elapsed >= cancel_after and not claimed_seen and trouble is None:
                try:
                    withdrawn = withdraw(db, current, f"withdrawn: no device claimed it within "
                                                      f"{cancel_after:g} s (himbeerecouch cmd --cancel-after); "
                                                      "it is not run")
                except CONNECTION_ERRORS as error:  # perhaps written: the next read tells
                    trouble = server_error(error, redact(db.server_url), user)
                    time.sleep(0.5)
                    continue
                if withdrawn is not None:
                    say(f"withdrawn: {macid} did not claim it within {cancel_after:g} s; it will not run "
                        f"(document {doc_id})")
                    return EXIT_WITHDRAWN
                continue                            # claimed (or changed) meanwhile: read it again
            if elapsed > wait:
                if claimed_seen:
                    say(f"no result from {macid} within {wait:g} s: it claimed the command, which may "
                        f"still run; its result will be in document {doc_id}")
                else:
                    say(f"no result from {macid} within {wait:g} s; the command stays pending as document "
                        f"{doc_id} and runs whenever {macid} next sees it (is it online? himbeerecouch "
                        "status; --cancel-after withdraws a command no device claimed in time)")
                if trouble:
                    say(f"the last reading of the result failed: {trouble}")
                return EXIT_NO_RESULT
            if interactive:
                progress.write(f"\rwaiting for {macid}: {elapsed:4.0f} s")
                progress.flush()
            elif int(elapsed / 5) > shown:          # a line every 5 s when not on a terminal
                shown = int(elapsed / 5)
                progress.write(f"waiting for {macid}: {elapsed:.0f} s\n")
                progress.flush()
            time.sleep(0.2 if elapsed < 2 else 0.5)
    except KeyboardInterrupt:
        say(f"stopped waiting; the command stays {'claimed by' if claimed_seen else 'pending for'} "
            f"{macid} as document {doc_id}")
        return 130
    if interactive:
        progress.write("\r" + " " * 40 + "\r")
    stdout, stderr = (list(current["ret"]) + [None, None])[:2]
    if stdout:
        out.write(stdout)
    if stderr:
        err.write(stderr if stderr.endswith("\n") else stderr + "\n")
    if current.get("error") and current.get("error") != "invalid":
        err.write(f"himbeerecouch cmd: {current['error']}\n")
    return exit_status(current)
