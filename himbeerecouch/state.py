"""What the daemon keeps on the Pi's disk between runs (the state dir, /var/rspby).

- code.json: the last-known code documents, so programs start while the server is away;
- checkpoint.json: the last processed seq of the changes feed, to resume where it stopped;
- commands.json: the ledger of claimed commands (see commands.py).
Both belong to one (server, database, MacID): after a change of any of them, or on a card
cloned into another Pi, they are ignored rather than applied to the wrong device.
Every write is atomic (temp file, fsync, rename), so a power cut leaves the old or the new file;
a writer killed before the rename leaves its temp file, which the next start removes.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from .processes import make_workdir

log = logging.getLogger(__name__)

# write_atomic's temp files: ".<name>.<8 random characters>.tmp" (tempfile.mkstemp).
TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
# A temp file last written before this process began belongs to a writer that died, not to one
# of this daemon's threads (SIGHUP prepares the dir again while they may be writing).
PROCESS_STARTED = time.time()


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so that readers see the old or the new content, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as stream:
            os.fchmod(stream.fileno(), mode)
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # The rename itself is durable only once the directory is synced.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateDir:
    CODE = "code.json"
    CHECKPOINT = "checkpoint.json"
    LEDGER = "commands.json"

    def __init__(self, path: Path, owner: dict[str, Any]) -> None:
        # `owner` names whose state this is: server (without password), database, macid.
        self.path = Path(path)
        self.owner = owner

    def prepare(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temp_files()

    def workdir(self, name: str) -> str:
        """A working directory below the state dir (for programs, for commands), never the state
        dir itself: a relative file name must not overwrite code.json or credentials.json.
        "/" when it cannot be made (a read-only or missing state dir)."""
        return make_workdir(self.path / name)

    def remove_stale_temp_files(self) -> list[str]:
        """Remove temp files of writers killed before their rename: each crash would otherwise
        leave one more on a card that may be failing already."""
        removed = []
        try:
            entries = list(os.scandir(self.path))
        except OSError as error:
            log.warning("cannot list %s: %s", self.path, error)
            return removed
        for entry in entries:
            try:
                if (TEMP_NAME.match(entry.name) and entry.is_file(follow_symlinks=False)
                        and entry.stat(follow_symlinks=False).st_mtime < PROCESS_STARTED):
                    os.unlink(entry.path)
                    removed.append(entry.name)
            except OSError as error:          # gone meanwhile, or a read-only card: not fatal
                log.debug("cannot remove %s: %s", entry.path, error)
        if removed:
            log.info("removed %d temp file(s) left by an interrupted write in %s", len(removed), self.path)
        return removed

    def _read(self, name: str) -> dict | None:
        file = self.path / name
        try:
            content = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            log.warning("ignoring unreadable %s: %s", file, error)
            return None
        if not isinstance(content, dict) or content.get("owner") != self.owner:
            log.info("ignoring %s: it belongs to %s, not %s", file,
                     content.get("owner") if isinstance(content, dict) else "?", self.owner)
            return None
        return content

    def _store(self, name: str, content: dict) -> None:
        """Write durably (fsynced) or raise OSError."""
        write_atomic(self.path / name, json.dumps({"owner": self.owner, **content}).encode())

    def _write(self, name: str, content: dict) -> bool:
        """Write; a full or read-only disk is logged and survived (the server still has it all)."""
        try:
            self._store(name, content)
            return True
        except OSError as error:
            log.error("cannot write %s: %s", self.path / name, error)
            return False

    def load_code(self) -> dict[str, dict]:
        content = self._read(self.CODE)
        docs = content.get("docs") if content else None
        return docs if isinstance(docs, dict) else {}

    def save_code(self, docs: dict[str, dict]) -> bool:
        return self._write(self.CODE, {"docs": docs})

    def load_seq(self) -> Any:
        content = self._read(self.CHECKPOINT)
        return content.get("seq") if content else None

    def save_seq(self, seq: Any) -> bool:
        return self._write(self.CHECKPOINT, {"seq": seq})

    def load_ledger(self) -> dict[str, dict]:
        content = self._read(self.LEDGER)
        entries = content.get("commands") if content else None
        return entries if isinstance(entries, dict) else {}

    def save_ledger(self, entries: dict[str, dict]) -> None:
        """Raises OSError: at most once depends on these records, so the caller must know."""
        self._store(self.LEDGER, {"commands": entries})
