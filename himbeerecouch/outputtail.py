"""The last lines each program printed, published as the document `<MacID>_output`.

    {"_id": "<MacID>_output", "type": "output", "macid": 202481596538417, "timestamp": "...Z",
     "output_tail_lines": 20,
     "programs": {"<doc id>": {"name": "thermo",
                               "lines": [["<ISO time>", "stdout" | "stderr", "<text>"], ...],
                               "lines_seen": 0, "dropped_lines": 0, "cut_lines": 0,
                               "last_error": null | {"time": "...", "text": "...", "traceback": "..." | null}}}}

What a program prints is worth seeing on the server, but a program that prints without end must
cost neither the Pi's memory nor the server's CPU. So each program keeps its last N lines
(`output_tail_lines`) of at most LINE_CHARS characters: N x LINE_CHARS characters per program,
whatever it prints. The tail gets the lines the log gets (after the rate limit of output.py); the
others are only counted. One document holds every program of the Pi, written by a thread
(docwriter.py) at most every `output_interval_seconds` and only when something changed.

The main loop records (a deque append under a lock); the writer thread takes a snapshot when it
is time to write, so a chatty program costs no copying between writes.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from .child import cut_traceback
from .couch import Database
from .docwriter import DocumentWriter
from .processes import now_iso

LINE_CHARS = 500                 # a longer line is cut to this (and counted in cut_lines)
CUT_MARK = "…"                   # ends a cut line, within LINE_CHARS, so a reader sees which


def cut(text: str, limit: int) -> tuple[str, bool]:
    """`text` at most `limit` characters long, and whether it was cut."""
    if len(text) <= limit:
        return text, False
    return text[:limit - len(CUT_MARK)] + CUT_MARK, True


@dataclass
class ProgramTail:
    name: str
    lines: deque = field(default_factory=deque)     # (time, stream, text); maxlen: the tail's size
    lines_seen: int = 0
    dropped_lines: int = 0
    cut_lines: int = 0
    last_error: dict[str, Any] | None = None

    def shown(self) -> dict[str, Any]:
        return {"name": self.name, "lines": [list(line) for line in self.lines],
                "lines_seen": self.lines_seen, "dropped_lines": self.dropped_lines,
                "cut_lines": self.cut_lines,
                "last_error": dict(self.last_error) if self.last_error else None}


class OutputTails:
    """Every program's tail, by document id. The main loop writes, the writer thread reads."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._programs: dict[str, ProgramTail] = {}
        self.version = 0                 # grows with every change: the writer skips none

    def _tail(self, doc_id: str, name: str) -> ProgramTail:
        tail = self._programs.get(doc_id)
        if tail is None:
            tail = self._programs[doc_id] = ProgramTail(name, deque(maxlen=self.size))
        return tail

    def track(self, doc_id: str, name: str) -> None:
        """A program of the Pi (new, or its document changed): listed even before it prints."""
        with self._lock:
            tail = self._programs.get(doc_id)
            if tail is not None and tail.name == name:
                return
            self._tail(doc_id, name).name = name
            self.version += 1

    def line(self, doc_id: str, name: str, stream: str, text: str) -> None:
        """One line of the program's stdout or stderr that the log got."""
        text, was_cut = cut(text, LINE_CHARS)
        when = now_iso("milliseconds")
        with self._lock:
            tail = self._tail(doc_id, name)
            tail.lines_seen += 1
            tail.cut_lines += was_cut
            tail.lines.append((when, stream, text))
            self.version += 1

    def dropped(self, doc_id: str, name: str, count: int) -> None:
        """`count` lines that the log's rate limit dropped: counted, not kept."""
        with self._lock:
            tail = self._tail(doc_id, name)
            tail.lines_seen += count
            tail.dropped_lines += count
            self.version += 1

    def error(self, doc_id: str, name: str, text: str, traceback: str | None) -> None:
        """The program's child reported an error or a fatal error (with the traceback, if any)."""
        entry = {"time": now_iso("milliseconds"), "text": cut(text, LINE_CHARS)[0],
                 "traceback": cut_traceback(traceback) if isinstance(traceback, str) else None}
        with self._lock:
            self._tail(doc_id, name).last_error = entry
            self.version += 1

    def clear_error(self, doc_id: str) -> None:
        """New code: the old code's error is no longer this program's."""
        with self._lock:
            tail = self._programs.get(doc_id)
            if tail is not None and tail.last_error is not None:
                tail.last_error = None
                self.version += 1

    def forget(self, doc_id: str) -> None:
        """The program's document is gone: so is its tail."""
        with self._lock:
            if self._programs.pop(doc_id, None) is not None:
                self.version += 1

    def resize(self, size: int) -> None:
        """A new `output_tail_lines` (SIGHUP): each tail keeps its newest lines."""
        with self._lock:
            if size == self.size:
                return
            self.size = size
            for tail in self._programs.values():
                tail.lines = deque(tail.lines, maxlen=size)
            self.version += 1

    def snapshot(self) -> tuple[int, dict[str, Any]]:
        """(version, the document's `output_tail_lines` and `programs`), taken at once."""
        with self._lock:
            return self.version, {"output_tail_lines": self.size,
                                  "programs": {doc_id: tail.shown() for doc_id, tail in sorted(self._programs.items())}}


class OutputWriter(DocumentWriter):
    """Writes `<MacID>_output`: at most every `interval` seconds, only when something changed,
    no keep-alive (the status document tells whether the Pi is alive)."""

    def __init__(self, *, connect: Callable[[], Database], macid: int, interval: float) -> None:
        # A failed write is tried again after the interval: nothing else would bring the
        # newest output to the server while the programs are quiet.
        super().__init__(name="output-writer", what="output document", connect=connect,
                         doc_id=f"{macid}_output", spacing=interval, keep_alive=None, retry_seconds=interval)
        self.macid = macid
        self._written: int | None = None      # the version of the tails on the server
        self._trying: int | None = None

    def document(self, tails: OutputTails) -> dict[str, Any] | None:
        version, fields = tails.snapshot()
        if version == self._written:
            return None
        self._trying = version
        return {"type": "output", "macid": self.macid, "timestamp": now_iso(), **fields}

    def write(self, tails: OutputTails) -> bool | None:
        written = super().write(tails)
        if written:
            self._written = self._trying
        return written
