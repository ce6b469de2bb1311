"""What the benchmarks share: a test server with one daemon on a fresh database, and percentiles."""
from __future__ import annotations

import contextlib
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support import DEVICE_MACID, AdminClient, DaemonProcess, make_server  # noqa: E402

MACID = DEVICE_MACID
MODES = ("fork-server", "exec")           # the config key `spawn`: both are measured, side by side


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


@contextlib.contextmanager
def server_and_daemon(**settings) -> Iterator[tuple[AdminClient, DaemonProcess, Path]]:
    """A running test server, a fresh database and a daemon for it (not started yet)."""
    with tempfile.TemporaryDirectory(prefix="hc-bench-") as tmp:
        tmp_path = Path(tmp)
        server = make_server(tmp_path)
        server.start()
        daemon = None
        try:
            admin = AdminClient(server.url, f"bench_{uuid.uuid4().hex[:8]}")
            admin.create_db()
            (tmp_path / "daemon").mkdir()
            daemon = DaemonProcess(tmp_path / "daemon", server.admin_url, admin.db, MACID,
                                   feed_heartbeat_seconds=10, status_interval_seconds=30, **settings)
            yield admin, daemon, tmp_path
        finally:
            if daemon is not None:
                daemon.stop()
            server.stop()


@contextlib.contextmanager
def test_server() -> Iterator[tuple[object, Path]]:
    """A running test server and a temporary folder, for several daemons one after the other."""
    with tempfile.TemporaryDirectory(prefix="hc-bench-") as tmp:
        tmp_path = Path(tmp)
        server = make_server(tmp_path)
        server.start()
        try:
            yield server, tmp_path
        finally:
            server.stop()


@contextlib.contextmanager
def daemon_on(server, tmp_path: Path, name: str, **settings) -> Iterator[tuple[AdminClient, DaemonProcess, Path]]:
    """A fresh database on `server` and a daemon for it (not started yet), in tmp_path/name."""
    folder = tmp_path / name
    folder.mkdir()
    admin = AdminClient(server.url, f"bench_{uuid.uuid4().hex[:8]}")
    admin.create_db()
    (folder / "daemon").mkdir()
    daemon = DaemonProcess(folder / "daemon", server.admin_url, admin.db, MACID,
                           **{"feed_heartbeat_seconds": 10, "status_interval_seconds": 30, **settings})
    try:
        yield admin, daemon, folder
    finally:
        daemon.stop()
        admin.drop_db()


def modes_argument(parser) -> None:
    parser.add_argument("--modes", default=",".join(MODES),
                        help="spawn modes to measure, comma-separated (default: both)")
