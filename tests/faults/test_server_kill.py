"""Fault injection: the server is SIGKILLed and restarted at random moments while code and
commands keep being written.

The server is a test server of this test's own (of the kind the run uses), on its own port and on a
data dir (the databases survive a kill, as a real CouchDB's do). A writer thread updates three programs and writes
command documents all along; a killer thread kills the server and starts it again. At the end:
- every code change is applied: the newest version of each program runs, once, and nothing else;
- every command document has a result: run exactly once (its side effect, a line appended to a
  file, is there once) or reported not run (`interrupted`, with no side effect);
- the status document and the state files (they parse) agree with the server;
- after the daemon's stop no process of the test is left.

HIMBEERECOUCH_SERVER_KILL_CYCLES (default 30) sets the number of kills, HIMBEERECOUCH_SOAK=1
multiplies it by 10; HIMBEERECOUCH_FAULT_SEED replays a run (the seed is printed).
"""
from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import requests

from invariants import alive, leftover_processes
from support import AdminClient, CouchServer, DaemonProcess, free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.starts_servers]
MACID = 202481596538417
LABELS = ("a", "b", "c")
CYCLES = int(os.environ.get("HIMBEERECOUCH_SERVER_KILL_CYCLES", "30")) * (
    10 if os.environ.get("HIMBEERECOUCH_SOAK") == "1" else 1)

PROGRAM = '''
import os, threading
VERSION = {version!r}
def main():
    with open(os.path.join({markers!r}, "{label}-" + VERSION + "-" + str(os.getpid())), "w") as f:
        f.write(VERSION)
    done = threading.Event()
    register_quit_notification(done.set)
    done.wait()
'''


class Writer(threading.Thread):
    """Writes as an operator would, all along: new code for a program, or a new command."""

    def __init__(self, admin: AdminClient, rng: random.Random, markers: Path, effects: Path) -> None:
        super().__init__(name="writer", daemon=True)
        self.admin, self.rng, self.markers, self.effects = admin, rng, markers, effects
        self.serial = 0
        self.acked_versions: dict[str, int] = {}     # label -> newest version the server confirmed
        self.acked_commands: set[str] = set()
        self.failed = 0
        self.stopping = threading.Event()

    def code(self, label: str) -> dict:
        self.serial += 1
        version = f"v{self.serial}"
        return {"_id": label, "type": MACID, "version": self.serial,
                "code": PROGRAM.format(version=version, markers=str(self.markers), label=label)}

    def update(self, label: str) -> None:
        doc = self.code(label)
        current = self.admin.http.get(self.admin.url(label), timeout=5)
        if current.status_code == 200:
            doc["_rev"] = current.json()["_rev"]
        response = self.admin.http.put(self.admin.url(label), json=doc, timeout=5)
        if response.status_code in (201, 202):
            self.acked_versions[label] = doc["version"]

    def command(self) -> None:
        doc_id = f"cmd-{uuid.uuid4().hex[:10]}"
        doc = {"_id": doc_id, "type": f"{MACID}_cmd", "timeout": 20,
               "cmd": ["sh", "-c", 'echo "$1" >> "$2"', "sh", doc_id, str(self.effects)]}
        response = self.admin.http.put(self.admin.url(doc_id), json=doc, timeout=5)
        if response.status_code in (201, 202):
            self.acked_commands.add(doc_id)

    def step(self) -> None:
        try:
            if self.rng.random() < 0.3:
                self.command()
            else:
                self.update(self.rng.choice(LABELS))
        except (requests.RequestException, ValueError):
            self.failed += 1                 # the server is away: what landed is read back at the end

    def run(self) -> None:
        while not self.stopping.wait(self.rng.uniform(0.1, 0.5)):
            self.step()


def markers_of(markers: Path) -> list[tuple[str, int, int]]:
    """(label, version, pid) of every program start."""
    found = []
    for path in markers.iterdir():
        label, version, pid = path.name.split("-")
        found.append((label, int(version[1:]), int(pid)))
    return found


def server_docs(admin: AdminClient) -> dict[str, dict]:
    response = admin.http.get(admin.url("_all_docs"), params={"include_docs": "true"}, timeout=10)
    assert response.status_code == 200, response.text
    return {row["id"]: row["doc"] for row in response.json()["rows"]}


def test_server_killed_at_random_moments(tmp_path):
    seed = int(os.environ.get("HIMBEERECOUCH_FAULT_SEED", str(time.time_ns() % 1_000_000)))
    print(f"HIMBEERECOUCH_FAULT_SEED={seed} cycles={CYCLES}")
    rng = random.Random(seed)
    markers, effects = tmp_path / "markers", tmp_path / "effects.txt"
    markers.mkdir()
    effects.touch()
    (tmp_path / "server").mkdir()
    server = CouchServer(free_port(), tmp_path / "server" / "server.log", data_dir=tmp_path / "server" / "data")
    server.start()
    daemon: DaemonProcess | None = None
    began = time.monotonic()
    try:
        admin = AdminClient(server.url, f"kill_{uuid.uuid4().hex[:8]}")
        admin.create_db()
        writer = Writer(admin, random.Random(seed + 1), markers, effects)
        for label in LABELS:
            writer.update(label)
        (tmp_path / "d").mkdir()
        # The default reconnect and restart caps, as on a Pi.
        daemon = DaemonProcess(tmp_path / "d", server.admin_url, admin.db, MACID,
                               restart_backoff_max_seconds=60)
        daemon.start()
        wait_for(lambda: {m[0] for m in markers_of(markers)} == set(LABELS), timeout=30,
                 message="the three programs")
        daemon.wait_log("following changes")
        writer.start()

        followed_between = 0
        follows = daemon.log().count("following changes") - 1     # it follows the server now
        for cycle in range(CYCLES):
            if rng.random() < 0.5:
                # Up until the daemon follows again, then a moment more: kills land mid-feed,
                # mid-claim, mid-result.
                wait_for(lambda: daemon.log().count("following changes") > follows, timeout=20,
                         message=f"cycle {cycle}: the daemon to follow the server again (seed {seed})")
                followed_between += 1
                time.sleep(rng.uniform(0, 1.0))
            else:
                time.sleep(rng.uniform(0.1, 2.0))     # often before the daemon is back: mid-reconnect
            server.kill()
            time.sleep(rng.uniform(0, 1.5))
            follows = daemon.log().count("following changes")
            server.start()
            assert daemon.process.poll() is None, f"the daemon died in cycle {cycle} (seed {seed})"
        writer.stopping.set()
        writer.join()
        # A last change of each program and a last command, with the server up for good.
        for label in LABELS:
            writer.update(label)
        writer.command()
        cycling = time.monotonic() - began

        # ---- the end state ------------------------------------------------------------------
        def settled() -> bool:
            docs = server_docs(admin)
            commands = [d for d in docs.values() if d.get("type") == f"{MACID}_cmd"]
            running = {(label, version) for label, version, pid in markers_of(markers) if alive(pid)}
            newest = {(label, docs[label]["version"]) for label in LABELS}
            status = docs.get(f"{MACID}_heartbeat", {}).get("programs", {})
            return (running == newest and all("ret" in d for d in commands)
                    and all(status.get(label, {}).get("rev") == docs[label]["_rev"]
                            and status[label].get("state") == "RUNNING" for label in LABELS))

        wait_for(settled, timeout=60, interval=0.5,
                 message=f"every change applied and every command answered (seed {seed}):\n{daemon.log()[-3000:]}")
        docs = server_docs(admin)

        # The database persisted across the kills: whatever the server confirmed is there.
        for label, version in writer.acked_versions.items():
            assert docs[label]["version"] >= version, (label, version, docs[label]["version"])
        assert writer.acked_commands <= set(docs), writer.acked_commands - set(docs)

        # Every code change applied: the newest version of each program runs, started once, and
        # no older version runs; no version started twice (a change seen again after a reconnect
        # leads to the same processes).
        starts = markers_of(markers)
        live = [(label, version) for label, version, pid in starts if alive(pid)]
        assert sorted(live) == sorted((label, docs[label]["version"]) for label in LABELS), live
        twice = [key for key, n in Counter((label, version) for label, version, _ in starts).items() if n > 1]
        assert not twice, f"started more than once: {twice} (seed {seed})"

        # Every command ran exactly once, or was reported not run and did not run.
        ran = Counter(effects.read_text().split())
        commands = {doc_id: d for doc_id, d in docs.items() if d.get("type") == f"{MACID}_cmd"}
        outcomes = Counter()
        for doc_id, doc in commands.items():
            if doc.get("returncode") == 0 and "error" not in doc:
                assert ran[doc_id] == 1, (doc_id, ran[doc_id], doc)
                outcomes["ran"] += 1
            else:
                assert doc.get("error") == "interrupted" and ran[doc_id] == 0, (doc_id, ran[doc_id], doc)
                outcomes["interrupted"] += 1
        assert set(ran) <= set(commands), set(ran) - set(commands)
        # The log says "interrupted" only of commands that were: a stale revision from the feed
        # is checked against the server before a command is judged interrupted.
        said = {line.split("command ", 1)[1].split()[0] for line in daemon.log().splitlines()
                if "marking it interrupted" in line}
        assert said <= {doc_id for doc_id, doc in commands.items() if doc.get("error") == "interrupted"}, said

        # The state files parse and agree with the server.
        for path in daemon.state_dir.glob("*.json"):
            json.loads(path.read_text())
        code = json.loads((daemon.state_dir / "code.json").read_text())["docs"]
        assert {doc_id: doc["_rev"] for doc_id, doc in code.items()} == \
            {label: docs[label]["_rev"] for label in LABELS}
        assert json.loads((daemon.state_dir / "checkpoint.json").read_text())["seq"] is not None
        ledger = daemon.state_dir / "commands.json"
        if ledger.exists():
            assert json.loads(ledger.read_text())["commands"] == {}, "results not reported"

        assert daemon.stop() == 0
        daemon = None
        server.stop()
        assert not [pid for _, _, pid in starts if alive(pid)]
        assert not leftover_processes(tmp_path), leftover_processes(tmp_path)
        print(f"server kill: {CYCLES} cycles ({followed_between} with the daemon following in between) "
              f"in {cycling:.0f} s; {writer.serial} code versions, {len(commands)} commands "
              f"{dict(outcomes)}, {writer.failed} writes failed on the absent server")
    finally:
        if daemon is not None:
            daemon.stop()
        server.stop()
