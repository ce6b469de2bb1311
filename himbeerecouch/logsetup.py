"""Logging for the daemon: to stderr, in a form journald reads well under systemd."""
from __future__ import annotations

import logging
import os
import sys

# syslog priorities, which journald takes from a "<N>" prefix on each line.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """No timestamp (journald adds its own); the priority as a "<N>" prefix."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        priority = _PRIORITY.get(record.levelno, 6)
        # Every line of a multi-line message keeps its priority.
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines() or [""])


def under_systemd(environ=os.environ) -> bool:
    return bool(environ.get("JOURNAL_STREAM") or environ.get("INVOCATION_ID"))


def setup(level: str = "INFO", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    if under_systemd():
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)
    # The HTTP client's own chatter is not the daemon's story.
    for noisy in ("urllib3", "pycouchdb"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def set_level(level: str) -> None:
    """Apply a log level (at start, and again when the configuration is re-read)."""
    logging.getLogger().setLevel(level.upper())
